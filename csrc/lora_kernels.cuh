// Launchers of the fastlora CUDA kernels (lora_kernels.cu).
//
// The host side (lora_ops.cpp) owns argument checks, allocation and the order of launches; these
// launchers take raw pointers with explicit row strides and a stream, so this header and the .cu
// file need no torch headers. Every launcher returns cudaGetLastError() after its launch.
//
// Element types: __half, __nv_bfloat16 or float. Every operand is read through a row stride, so an
// operand may be any view whose inner stride is 1 (row stride 0 included, e.g. an expanded gradient).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastlora {

// Output tile of every kernel: 64 x 64 elements per block of 128 threads.
constexpr int kTile = 64;
// Threads per block of the column-sum kernel (one column per thread).
constexpr int kColumnSumThreads = 256;
// The widest output a GEMM or reduction accepts: its column tiles lie on gridDim.y (at most 65535).
constexpr int64_t kMaxColumns = int64_t{65535} * kTile;

// LoRA dropout: element (m, c) of an [M, C] matrix is kept iff a counter-based hash of
// (seed, m * C + c) maps to a uniform u in [0, 1) with u >= p; kept elements are scaled by 1 / (1 - p).
// The mask is a pure function of (seed, counter), so the backward regenerates the forward's mask.
struct Dropout {
  float p = 0.f;      // 0: no dropout
  float scale = 1.f;  // 1 / (1 - p); 0 when p == 1 (nothing is kept)
  uint64_t seed = 0;
};

// Where a GEMM applies its Dropout: to A (the forward's D(x) Aᵀ: dropped elements of A are zeroed and
// the A·B product is scaled), or to the low-rank term of the output (the backward's D((gy B) A)).
enum class DropoutSite { kA, kLowRank };

// out[M, N] = A[M, K] · B[K, N] + scaling · XA[M, R] · L[R, N] + bias[N], accumulated in fp32 and
// rounded once to TO. With dropout.p > 0, D applies where dropout_site says: kA drops A(m, k) by
// counter m * K + k, kLowRank drops the low-rank term at (m, n) by counter m * N + n.
//   A(m, k) = a[m * lda + k]                   (x in the forward, gy in the backward)
//   XA(m, r) = xa[m * ldxa + r], float32       (x Aᵀ in the forward, gy B in the backward)
// B and L share one layout, chosen by launch_gemm's kKContig:
//   kKContig:  B(k, n) = b[n * ldb + k], L(r, n) = l[n * ldl + r]   (forward: W [N, K], B [N, R])
//   otherwise: B(k, n) = b[k * ldb + n], L(r, n) = l[r * ldl + n]   (backward: W [N, K], A [R, K])
// R == 0 drops the low-rank term (xa and l unused); bias == nullptr drops the bias.
// T is the element type of A and of bias, TB of B, TL of L. The main loop runs on tensor cores when
// T and TB are both fp16/bf16 (TB == T), else on fp32 FMAs; L is read as float.
template <typename T, typename TB, typename TL, typename TO>
struct GemmParams {
  int64_t M, N, K;
  const T* a;
  int64_t lda;
  const TB* b;
  int64_t ldb;
  int64_t R;
  const float* xa;
  int64_t ldxa;
  const TL* l;
  int64_t ldl;
  float scaling;
  const T* bias;
  TO* out;
  int64_t ldo;
  Dropout dropout;
  DropoutSite dropout_site;
  // Split-K (the rank-r GEMMs, whose N = r gives one column tile): with k_per_split > 0, block z
  // reduces k in [z * k_per_split, (z + 1) * k_per_split) and writes its partial product to
  // out + z * out_split_stride (R must be 0 and bias nullptr); 0 reduces all of K in every block.
  int64_t k_per_split;
  int64_t out_split_stride;
};

// One block per 64 x 64 output tile (and K split, see k_per_split); nothing is launched when M or N
// is 0. N <= kMaxColumns, K splits <= 65535.
template <bool kKContig, typename T, typename TB, typename TL, typename TO>
cudaError_t launch_gemm(const GemmParams<T, TB, TL, TO>& p, cudaStream_t stream);

// Split-M partial products for the adapter gradients:
//   ws[s, p, q] = Σ_{m in split s} L(m, p) · R(m, q),   L(m, p) = l[m * ldl + p], R(m, q) = r[m * ldr + q]
// for p < P, q < Q, where split s holds rows [s * rows_per_split, min(M, (s + 1) * rows_per_split)).
// With r_dropout, R's dropped elements (counter m * Q + q) count as 0; its scale is left to the caller.
// ws is float32 [splits, P, Q]; every element is written. P <= kMaxColumns, splits <= 65535.
template <typename TL, typename TR>
cudaError_t launch_row_reduce(const TL* l, int64_t ldl, const TR* r, int64_t ldr, int64_t M, int64_t P, int64_t Q,
                              const Dropout& r_dropout, int64_t splits, int64_t rows_per_split, float* ws,
                              cudaStream_t stream);

// Split-M column sums for the bias gradient: ws[s, n] = Σ_{m in split s} g[m * ldg + n] (float32
// [splits, N]). splits <= 65535.
template <typename T>
cudaError_t launch_column_sum(const T* g, int64_t ldg, int64_t M, int64_t N, int64_t splits, int64_t rows_per_split,
                              float* ws, cudaStream_t stream);

// The operands of the CUTLASS kernels' LoRA K-blocks (lora_ops.cpp, lora_blocks), in one pass:
//   a_ext[m, d] (row-major [M, D], leading dimension lda_ext), for d = part · R + j:
//     part 0 (and 2): hi = T(s·xa[m, j]·down_j),  part 1: lo = T(s·xa[m, j]·down_j − hi),  d ≥ parts·R: 0
//   b_ext (n, d) = b_ext[n * ldb_ext + d] if b_k_major (else b_ext[d * ldb_ext + n]), for d = part · R + j:
//     parts 0, 1: T(l(n, j) / down_j),  part 2: the rest, T(l(n, j) / down_j − that),  d ≥ parts·R: 0
// with xa(m, j) = xa[m * ldxa + j] (fp32), l(n, j) = l[n * l_sn + j * l_sr] (TA), parts = 2 when
// TA = T else 3, D = parts·R rounded up to a multiple of 8; each hi/lo pair is lora_device.cuh's
// split_hi / split_lo (bf16's hi truncated, so a finite value never splits into inf − inf; lo 0 where
// hi is not finite). down_j = 1 without col_max; with it (fp16's
// range), down_j = 2^-e_j, e_j = max(0, E_j − 14) for |s|·col_max[j] < 2^E_j (frexp), so that the
// scaled column lies in [−2^14, 2^14]: powers of two, a_ext · b_extᵀ = s · xa · lᵀ unchanged.
template <typename T, typename TA>
struct LoRAExtParams {
  int64_t M, N, R, D;
  int parts;
  const float* xa;
  int64_t ldxa;
  const TA* l;
  int64_t l_sn, l_sr;
  float scaling;
  const float* col_max;  // [R] max_m |xa[m, j]|, or nullptr
  T* a_ext;
  int64_t lda_ext;
  T* b_ext;
  int64_t ldb_ext;
  bool b_k_major;
};
template <typename T, typename TA>
cudaError_t launch_lora_ext(const LoRAExtParams<T, TA>& p, cudaStream_t stream);

// One split sum: out[e] = scaling · Σ_s ws[s * count + e] for e < count, summed in split order
// (deterministic), rounded to TO. count 0: nothing to do.
template <typename TO>
struct SplitSum {
  const float* ws = nullptr;
  int64_t splits = 0, count = 0;
  float scaling = 1.f;
  TO* out = nullptr;
};

// Up to three split sums in one launch (the backward's grad_A, grad_B and bias gradient); a job
// with count 0 is skipped. Nothing is launched when every count is 0.
template <typename T0, typename T1, typename T2>
cudaError_t launch_sum_splits(const SplitSum<T0>& a, const SplitSum<T1>& b, const SplitSum<T2>& c,
                              cudaStream_t stream);

template <typename TO>
cudaError_t launch_sum_splits(const float* ws, int64_t splits, int64_t count, float scaling, TO* out,
                              cudaStream_t stream) {
  return launch_sum_splits(SplitSum<TO>{ws, splits, count, scaling, out}, SplitSum<TO>{}, SplitSum<TO>{}, stream);
}

}  // namespace fastlora
