// fastlora CUDA kernels: the fused LoRA GEMM (forward y and backward grad_x), the rank-r GEMMs
// that feed its epilogue and the deterministic split-M reductions of the adapter and bias grads
// where the narrow kernel (lora_narrow.cu) does not take them, and the split sums.
// See DESIGN.md for the why; lora_kernels.cuh for each launcher's contract.

#include "lora_kernels.cuh"
#include "lora_device.cuh"

#include <mma.h>

#include <algorithm>
#include <type_traits>

namespace fastlora {
namespace {

using namespace device;

constexpr int kTileK = 32;     // reduction depth of one main-loop step
constexpr int kTileR = 16;     // rank chunk of one low-rank epilogue step
constexpr int kReduceRows = 16;  // rows of M per step of the split-M reductions

// Thread-owned outputs: thread t owns rows ty + 8i (i < 8) and columns tx + 16j (j < 4) of the 64 x 64
// tile, tx = t % 16, ty = t / 16. A warp then stores two rows of 16 consecutive columns (coalesced),
// reads its 4 column operands from consecutive shared-memory words and its 8 row operands as broadcasts.
constexpr int kThreadCols = 16;
constexpr int kRowsPerThread = kTile / (kThreads / kThreadCols);  // 8
constexpr int kColsPerThread = kTile / kThreadCols;               // 4

__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// Shared-memory layouts of the main loop's operand tiles: As[m][k]; Bs[n][k] when k is B's contiguous
// index (kKContig), else Bs[k][n], so the tile copies stay coalesced on both sides.
template <bool kKContig>
struct BTile {
  static constexpr int kRows = kKContig ? kTile : kTileK;
  static constexpr int kCols = kKContig ? kTileK : kTile;
};

// Accumulator hand-off buffer: fp32 [64][kLdC]. The 16-float pad puts the two rows a warp reads in one
// instruction (ty, ty + 1) in disjoint bank halves; kLdC % 4 == 0 as WMMA stores require.
constexpr int kLdC = kTile + 16;

// Tensor-core main loop: the 4 warps form a 2 x 2 grid, each owning a 32 x 32 block of the tile as 2 x 2
// WMMA 16x16x16 fragments (fp16/bf16 inputs, fp32 accumulators).
template <typename T, bool kKContig>
struct WmmaCore {
  // 8-element (16-byte) row pads: WMMA needs ldm % 8 == 0 and 32-byte-aligned fragment pointers (every
  // fragment starts at a multiple of 16 rows and 16 columns, so both hold), and the pad staggers banks.
  static constexpr int kLdA = kTileK + 8;
  static constexpr int kLdB = BTile<kKContig>::kCols + 8;
  using BLayout = std::conditional_t<kKContig, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.f);
  }

  __device__ __forceinline__ void step(const T* As, const T* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2 * 32, wn = warp % 2 * 32;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm + 16 * i) * kLdA + kk, kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // col_major B: element (k, n) at ptr[n * ld + k], i.e. Bs[n][k]; row_major: Bs[k][n].
        const T* ptr = kKContig ? Bs + (wn + 16 * j) * kLdB + kk : Bs + kk * kLdB + wn + 16 * j;
        wmma::load_matrix_sync(b[j], ptr, kLdB);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }

  // Fragment element positions are opaque, so the accumulators reach the epilogue's thread layout
  // through shared memory. Cs may alias the operand tiles: the main loop ended on a barrier.
  __device__ __forceinline__ void collect(float* Cs, float (&acc)[kRowsPerThread][kColsPerThread]) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2 * 32, wn = warp % 2 * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm + 16 * i) * kLdC + wn + 16 * j, c[i][j], kLdC, wmma::mem_row_major);
    __syncthreads();
    const int tx = threadIdx.x % kThreadCols, ty = threadIdx.x / kThreadCols;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = Cs[(ty + 8 * i) * kLdC + tx + 16 * j];
    __syncthreads();  // the epilogue reuses this memory
  }
};

// c[i][j] += Σ_k As[row_i][k] · B(k, col_j) over kDepth k, with this thread's rows ty + 8i and
// columns tx + 16j; As is row-major (row stride lda), B is Bs[col·ldb + k] when kKContig, else
// Bs[k·ldb + col]. The fp32 main loop and the low-rank epilogue both run on it.
template <bool kKContig, int kDepth, int kUnroll>
__device__ __forceinline__ void fma_tile(float (&c)[kRowsPerThread][kColsPerThread], const float* As, int lda,
                                         const float* Bs, int ldb) {
  const int tx = threadIdx.x % kThreadCols, ty = threadIdx.x / kThreadCols;
#pragma unroll kUnroll
  for (int kk = 0; kk < kDepth; ++kk) {
    float a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) a[i] = As[(ty + 8 * i) * lda + kk];
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) b[j] = kKContig ? Bs[(tx + 16 * j) * ldb + kk] : Bs[kk * ldb + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
  }
}

// fp32 main loop: plain FMAs straight into the thread-owned outputs (exact fp32, no TF32).
template <bool kKContig>
struct FmaCore {
  // Odd row strides keep the strided column reads (Bs[n][k] across n) on distinct banks.
  static constexpr int kLdA = kTileK + 1;
  static constexpr int kLdB = BTile<kKContig>::kCols + 1;

  float c[kRowsPerThread][kColsPerThread];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) c[i][j] = 0.f;
  }

  __device__ __forceinline__ void step(const float* As, const float* Bs) {
    fma_tile<kKContig, kTileK, 8>(c, As, kLdA, Bs, kLdB);
  }

  __device__ __forceinline__ void collect(float*, float (&acc)[kRowsPerThread][kColsPerThread]) const {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = c[i][j];
  }
};

// The fused LoRA GEMM (contract in lora_kernels.cuh). Phases, all in one block-shared buffer:
//   1. main loop over K: A and B tiles through shared memory into tensor cores (or FMAs), the next
//      tile's global loads overlapping the current tile's math;
//   2. the accumulators move to the thread-owned layout (rows ty + 8i, cols tx + 16j);
//   3. epilogue: XA·L in fp32, R in chunks of 16 staged through shared memory, then
//      out = A·B + scaling · XA·L + bias (dropout applied per dropout_site), one rounded, predicated
//      store per output element.
template <bool kKContig, typename T, typename TB, typename TL, typename TO>
__global__ void __launch_bounds__(kThreads) lora_gemm_kernel(const GemmParams<T, TB, TL, TO> p) {
  // The main loop's element type: tensor cores when both operands are fp16/bf16; exact fp32 FMAs when
  // either is fp32 (fp32 inputs, and fp32 adapters in x·Aᵀ and gy·B, where rounding the adapter to
  // bf16 would cost up to ~1e-2 relative error), converting the other operand as it is loaded.
  using C = std::conditional_t<std::is_same_v<T, float> || std::is_same_v<TB, float>, float, T>;
  using Core = std::conditional_t<std::is_same_v<C, float>, FmaCore<kKContig>, WmmaCore<C, kKContig>>;
  using BT = BTile<kKContig>;
  // Low-rank staging: XAs[m][r], and Ls[n][r] (kKContig) or Ls[r][n]; odd strides, conflict-free reads.
  constexpr int kLdX = kTileR + 1;
  constexpr int kLRows = kKContig ? kTile : kTileR;
  constexpr int kLCols = kKContig ? kTileR : kTile;
  constexpr int kLdL = kLCols + 1;

  constexpr size_t kMainBytes = sizeof(C) * (kTile * Core::kLdA + BT::kRows * Core::kLdB);
  constexpr size_t kAccBytes = std::is_same_v<C, float> ? 0 : sizeof(float) * kTile * kLdC;
  constexpr size_t kLowRankBytes = sizeof(float) * (kTile * kLdX + kLRows * kLdL);
  __shared__ __align__(128) unsigned char smem[cmax(kMainBytes, cmax(kAccBytes, kLowRankBytes))];

  const int64_t m0 = int64_t{blockIdx.x} * kTile;
  const int64_t n0 = int64_t{blockIdx.y} * kTile;
  const int tx = threadIdx.x % kThreadCols, ty = threadIdx.x / kThreadCols;
  // This block's share of K (all of it unless split); dropout counters stay global (m * K + k).
  const int64_t k_begin = p.k_per_split > 0 ? int64_t{blockIdx.z} * p.k_per_split : 0;
  const int64_t k_end = p.k_per_split > 0 ? min64(p.K, k_begin + p.k_per_split) : p.K;
  TO* const out = p.out + int64_t{blockIdx.z} * p.out_split_stride;

  // 1. Main loop.
  C* As = reinterpret_cast<C*>(smem);
  C* Bs = As + kTile * Core::kLdA;
  TileCopy<C, kTile, kTileK> a_copy;
  TileCopy<C, BT::kRows, BT::kCols> b_copy;
  const bool drop_a = p.dropout.p > 0.f && p.dropout_site == DropoutSite::kA;
  auto fetch = [&](int64_t k0) {
    a_copy.fetch(p.a, p.lda, m0, p.M, k0, k_end);
    if (drop_a) a_copy.drop(p.dropout, p.K, m0, k0);
    if constexpr (kKContig) {
      b_copy.fetch(p.b, p.ldb, n0, p.N, k0, k_end);
    } else {
      b_copy.fetch(p.b, p.ldb, k0, k_end, n0, p.N);
    }
  };

  Core core;
  core.init();
  fetch(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    a_copy.store(As, Core::kLdA);
    b_copy.store(Bs, Core::kLdB);
    __syncthreads();
    if (k0 + kTileK < k_end) fetch(k0 + kTileK);
    core.step(As, Bs);
    __syncthreads();
  }

  // 2. Accumulators to the thread-owned layout.
  float acc[kRowsPerThread][kColsPerThread];
  core.collect(reinterpret_cast<float*>(smem), acc);

  // 3. Epilogue: the low-rank product in its own fp32 accumulators (dropout may apply to it alone).
  // Zero-filled rank padding contributes nothing; columns past N are never stored.
  float low_rank[kRowsPerThread][kColsPerThread] = {};
  if (p.R > 0) {
    float* XAs = reinterpret_cast<float*>(smem);
    float* Ls = XAs + kTile * kLdX;
    TileCopy<float, kTile, kTileR> xa_copy;
    TileCopy<float, kLRows, kLCols> l_copy;
    for (int64_t r0 = 0; r0 < p.R; r0 += kTileR) {
      xa_copy.fetch(p.xa, p.ldxa, m0, p.M, r0, p.R);
      if constexpr (kKContig) {
        l_copy.fetch(p.l, p.ldl, n0, p.N, r0, p.R);
      } else {
        l_copy.fetch(p.l, p.ldl, r0, p.R, n0, p.N);
      }
      xa_copy.store(XAs, kLdX);
      l_copy.store(Ls, kLdL);
      __syncthreads();
      fma_tile<kKContig, kTileR, 4>(low_rank, XAs, kLdX, Ls, kLdL);
      __syncthreads();
    }
  }

  const float base_scale = drop_a ? p.dropout.scale : 1.f;  // D(A)·B = scale · (mask ⊙ A)·B, exactly
  const bool drop_low_rank = p.dropout.p > 0.f && p.dropout_site == DropoutSite::kLowRank;
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) {
    const int64_t n = n0 + tx + 16 * j;
    if (n >= p.N) continue;
    const float bias = p.bias != nullptr ? to_float(p.bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t m = m0 + ty + 8 * i;
      if (m >= p.M) continue;
      float lr = p.scaling * low_rank[i][j];
      if (drop_low_rank) lr = dropout_keep(p.dropout, m * p.N + n) ? lr * p.dropout.scale : 0.f;
      out[m * p.ldo + n] = from_float<TO>(base_scale * acc[i][j] + lr + bias);
    }
  }
}

// Split-M partial products (contract in lora_kernels.cuh): block (x, y, z) = (q tile, p tile, split).
// Both operands are row-major with M as their row index, so each step stages 16 rows of each.
template <typename TL, typename TR>
__global__ void __launch_bounds__(kThreads)
    row_reduce_kernel(const TL* __restrict__ l, int64_t ldl, const TR* __restrict__ r, int64_t ldr, int64_t M,
                      int64_t P, int64_t Q, const Dropout r_dropout, int64_t rows_per_split, float* __restrict__ ws) {
  __shared__ float Ls[kReduceRows * kTile];  // [m][p]
  __shared__ float Rs[kReduceRows * kTile];  // [m][q]
  const int64_t q0 = int64_t{blockIdx.x} * kTile;
  const int64_t p0 = int64_t{blockIdx.y} * kTile;
  const int64_t m_begin = int64_t{blockIdx.z} * rows_per_split;
  const int64_t m_end = min64(M, m_begin + rows_per_split);
  const int tx = threadIdx.x % kThreadCols, ty = threadIdx.x / kThreadCols;

  float acc[kRowsPerThread][kColsPerThread] = {};
  TileCopy<float, kReduceRows, kTile> l_copy, r_copy;
  const bool drop_r = r_dropout.p > 0.f;
  auto fetch = [&](int64_t m) {
    l_copy.fetch(l, ldl, m, m_end, p0, P);
    r_copy.fetch(r, ldr, m, m_end, q0, Q);
    if (drop_r) r_copy.drop(r_dropout, Q, m, q0);
  };
  fetch(m_begin);
  for (int64_t m = m_begin; m < m_end; m += kReduceRows) {
    l_copy.store(Ls, kTile);
    r_copy.store(Rs, kTile);
    __syncthreads();
    if (m + kReduceRows < m_end) fetch(m + kReduceRows);
#pragma unroll 4
    for (int mm = 0; mm < kReduceRows; ++mm) {
      float a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a[i] = Ls[mm * kTile + ty + 8 * i];
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) b[j] = Rs[mm * kTile + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* out = ws + int64_t{blockIdx.z} * P * Q;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t pp = p0 + ty + 8 * i;
    if (pp >= P) continue;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t qq = q0 + tx + 16 * j;
      if (qq < Q) out[pp * Q + qq] = acc[i][j];
    }
  }
}

// Block (x, y) = (column block, split); one thread per column, walking its split's rows in order.
template <typename T>
__global__ void __launch_bounds__(kColumnSumThreads)
    column_sum_kernel(const T* __restrict__ g, int64_t ldg, int64_t M, int64_t N, int64_t rows_per_split,
                      float* __restrict__ ws) {
  const int64_t n = int64_t{blockIdx.x} * kColumnSumThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t m_begin = int64_t{blockIdx.y} * rows_per_split;
  const int64_t m_end = min64(M, m_begin + rows_per_split);
  float sum = 0.f;
  for (int64_t m = m_begin; m < m_end; ++m) sum += to_float(g[m * ldg + n]);
  ws[int64_t{blockIdx.y} * N + n] = sum;
}

template <typename TO>
__device__ __forceinline__ void sum_one_split_sum(const SplitSum<TO>& job) {
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < job.count; e += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < job.splits; ++s) sum += job.ws[s * job.count + e];
    job.out[e] = from_float<TO>(job.scaling * sum);
  }
}

// blockIdx.y picks the job (block-uniform); a job with count 0 has nothing to do.
template <typename T0, typename T1, typename T2>
__global__ void __launch_bounds__(256) sum_splits_kernel(const SplitSum<T0> a, const SplitSum<T1> b, const SplitSum<T2> c) {
  if (blockIdx.y == 0) {
    sum_one_split_sum(a);
  } else if (blockIdx.y == 1) {
    sum_one_split_sum(b);
  } else {
    sum_one_split_sum(c);
  }
}

// Headroom of fp16's range for a scaled column of s·xa (LoRAExtParams): |values| <= 2^14.
constexpr int kHalfHeadroomExponent = 14;

__device__ __forceinline__ float ext_down(const float* col_max, float scaling, int64_t j) {
  if (col_max == nullptr) return 1.f;
  int top = 0;
  frexpf(fabsf(scaling) * col_max[j], &top);  // |s|·max < 2^top (0 for 0; unspecified for inf/NaN: clamped)
  const int e = top - kHalfHeadroomExponent;
  return e <= 0 ? 1.f : ldexpf(1.f, -(e < 126 ? e : 126));
}

// One thread per output element over a_ext ([M, D]) and then b_ext ([N, D] or [D, N]), in a grid-stride
// loop; each part's index runs along its output's contiguous dimension, so the stores coalesce.
template <typename T, typename TA>
__global__ void __launch_bounds__(256) lora_ext_kernel(const LoRAExtParams<T, TA> p) {
  const int64_t a_count = p.M * p.D;
  const int64_t total = a_count + p.N * p.D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < total; i += stride) {
    if (i < a_count) {
      const int64_t m = i / p.D, d = i % p.D;
      const int64_t part = d / p.R, j = d % p.R;
      T v = from_float<T>(0.f);
      if (part < p.parts) {
        const float sxa = p.xa[m * p.ldxa + j] * p.scaling * ext_down(p.col_max, p.scaling, j);
        const T hi = split_hi<T>(sxa);
        v = part == 1 ? split_lo(sxa, hi) : hi;
      }
      p.a_ext[m * p.lda_ext + d] = v;
    } else {
      const int64_t e = i - a_count;
      const int64_t n = p.b_k_major ? e / p.D : e % p.N;
      const int64_t d = p.b_k_major ? e % p.D : e / p.N;
      const int64_t part = d / p.R, j = d % p.R;
      T v = from_float<T>(0.f);
      if (part < p.parts) {
        const float l = to_float(p.l[n * p.l_sn + j * p.l_sr]) / ext_down(p.col_max, p.scaling, j);
        const T hi = split_hi<T>(l);
        v = part == 2 ? split_lo(l, hi) : hi;
      }
      p.b_ext[p.b_k_major ? n * p.ldb_ext + d : d * p.ldb_ext + n] = v;
    }
  }
}

}  // namespace

template <typename T, typename TA>
cudaError_t launch_lora_ext(const LoRAExtParams<T, TA>& p, cudaStream_t stream) {
  const int64_t total = (p.M + p.N) * p.D;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, 256) < 4096 ? ceil_div(total, 256) : 4096;
  lora_ext_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <bool kKContig, typename T, typename TB, typename TL, typename TO>
cudaError_t launch_gemm(const GemmParams<T, TB, TL, TO>& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const int64_t splits = p.k_per_split > 0 ? ceil_div(p.K, p.k_per_split) : 1;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kTile)), static_cast<unsigned>(ceil_div(p.N, kTile)),
                  static_cast<unsigned>(splits));
  lora_gemm_kernel<kKContig><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename TL, typename TR>
cudaError_t launch_row_reduce(const TL* l, int64_t ldl, const TR* r, int64_t ldr, int64_t M, int64_t P, int64_t Q,
                              const Dropout& r_dropout, int64_t splits, int64_t rows_per_split, float* ws,
                              cudaStream_t stream) {
  if (P == 0 || Q == 0 || splits == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(Q, kTile)), static_cast<unsigned>(ceil_div(P, kTile)),
                  static_cast<unsigned>(splits));
  row_reduce_kernel<<<grid, kThreads, 0, stream>>>(l, ldl, r, ldr, M, P, Q, r_dropout, rows_per_split, ws);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_column_sum(const T* g, int64_t ldg, int64_t M, int64_t N, int64_t splits, int64_t rows_per_split,
                              float* ws, cudaStream_t stream) {
  if (N == 0 || splits == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kColumnSumThreads)), static_cast<unsigned>(splits));
  column_sum_kernel<<<grid, kColumnSumThreads, 0, stream>>>(g, ldg, M, N, rows_per_split, ws);
  return cudaGetLastError();
}

template <typename T0, typename T1, typename T2>
cudaError_t launch_sum_splits(const SplitSum<T0>& a, const SplitSum<T1>& b, const SplitSum<T2>& c,
                              cudaStream_t stream) {
  const int64_t count = std::max({a.count, b.count, c.count});
  if (count == 0) return cudaSuccess;
  const unsigned jobs = c.count > 0 ? 3 : b.count > 0 ? 2 : 1;
  // A grid-stride loop: a few waves' worth of blocks is plenty for this memory-bound pass.
  const int64_t blocks = ceil_div(count, 256) < 4096 ? ceil_div(count, 256) : 4096;
  sum_splits_kernel<<<dim3(static_cast<unsigned>(blocks), jobs), 256, 0, stream>>>(a, b, c);
  return cudaGetLastError();
}

// Explicit instantiations: the combinations lora_ops.cpp launches. For activations T and adapters TA
// (TA = T, or float): y and grad_x are <T, T, TA, T>; the rank-r GEMMs xa = x·Aᵀ and gy·B are
// <T, TA, float, float> where the narrow kernel (lora_narrow.cu) does not take them: fp16 with fp32
// adapters, and fp32 (for T = TA = float the two coincide).
#define FASTLORA_GEMM(KC, T, TB, TL, TO) \
  template cudaError_t launch_gemm<KC, T, TB, TL, TO>(const GemmParams<T, TB, TL, TO>&, cudaStream_t);
#define FASTLORA_FUSED(T, TA)      \
  FASTLORA_GEMM(true, T, T, TA, T) \
  FASTLORA_GEMM(false, T, T, TA, T)
FASTLORA_FUSED(__half, __half)
FASTLORA_FUSED(__half, float)
FASTLORA_FUSED(__nv_bfloat16, __nv_bfloat16)
FASTLORA_FUSED(__nv_bfloat16, float)
FASTLORA_GEMM(true, __half, float, float, float)
FASTLORA_GEMM(false, __half, float, float, float)
FASTLORA_GEMM(true, float, float, float, float)
FASTLORA_GEMM(false, float, float, float, float)

// grad_A reduces (gy B in fp32, x); grad_B reduces (gy, xa in fp32): for fp16 and fp32 activations
// (bf16's are on the narrow kernel).
#define FASTLORA_ROW_REDUCE(TL, TR)                                                                          \
  template cudaError_t launch_row_reduce<TL, TR>(const TL*, int64_t, const TR*, int64_t, int64_t, int64_t, \
                                                 int64_t, const Dropout&, int64_t, int64_t, float*, cudaStream_t);
FASTLORA_ROW_REDUCE(float, __half)
FASTLORA_ROW_REDUCE(__half, float)
FASTLORA_ROW_REDUCE(float, float)

template cudaError_t launch_column_sum<__half>(const __half*, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                                               cudaStream_t);
template cudaError_t launch_column_sum<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, int64_t, int64_t,
                                                      int64_t, float*, cudaStream_t);
template cudaError_t launch_column_sum<float>(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                                              cudaStream_t);

// Split sums: one job of any output type (<T, T, T>), and the backward's grad_A, grad_B and bias
// gradient in one launch (<TA, TA, T>, TA = float with fp32 adapters).
#define FASTLORA_SUM_SPLITS(T0, T1, T2)                                                                  \
  template cudaError_t launch_sum_splits<T0, T1, T2>(const SplitSum<T0>&, const SplitSum<T1>&, const SplitSum<T2>&, \
                                                     cudaStream_t);
FASTLORA_SUM_SPLITS(__half, __half, __half)
FASTLORA_SUM_SPLITS(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
FASTLORA_SUM_SPLITS(float, float, float)
FASTLORA_SUM_SPLITS(float, float, __half)
FASTLORA_SUM_SPLITS(float, float, __nv_bfloat16)

// The CUTLASS paths' K-block operands: fp16/bf16 activations, adapters in that dtype or fp32.
template cudaError_t launch_lora_ext<__half, __half>(const LoRAExtParams<__half, __half>&, cudaStream_t);
template cudaError_t launch_lora_ext<__half, float>(const LoRAExtParams<__half, float>&, cudaStream_t);
template cudaError_t launch_lora_ext<__nv_bfloat16, __nv_bfloat16>(const LoRAExtParams<__nv_bfloat16, __nv_bfloat16>&,
                                                                   cudaStream_t);
template cudaError_t launch_lora_ext<__nv_bfloat16, float>(const LoRAExtParams<__nv_bfloat16, float>&, cudaStream_t);

}  // namespace fastlora
