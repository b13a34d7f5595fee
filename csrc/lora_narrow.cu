// The narrow tensor-core GEMM: the cuda backend's rank-r passes (x Aᵀ, gy B) and adapter-gradient
// reductions (gᵀ x, gyᵀ xa) on WMMA tiles r columns wide. Contract in lora_narrow.cuh; why in
// DESIGN.md ("The rank-r passes").
//
// Before this kernel those passes ran on the portable kernel's 64 × 64 tiles: at r = 16 three of
// every four output columns were zero padding, and every pass with an fp32 operand (fp32 adapters,
// and all four reductions, whose g and xa are fp32) ran on fp32 FMAs, ~16× below the tensor cores'
// rate: the issue's estimate for the x Aᵀ pass with fp32 adapters was a quarter of the base GEMM.
// Here a block is 64 rows (u) by the 16-wide fragments its columns need, the activations go to the
// tensor cores as they are (exact), and an fp32 operand enters as two bf16 parts.

#include "lora_narrow.cuh"

#include "lora_device.cuh"

#include <mma.h>

#include <type_traits>

namespace fastlora {
namespace {

using namespace device;

constexpr int kStepT = 32;    // reduction depth of one main-loop step (two WMMA k-steps)
constexpr int kFrags = kNarrowCols / 16;  // 16-wide column fragments of a full column block
constexpr int kLdOut = kNarrowCols + 4;   // fp32 output staging: ldm % 4 == 0 for WMMA stores
static_assert(kThreads == 2 * kNarrowRows, "the column sums take two threads per row of u");

// Shared-memory tile of one operand, stored with its contiguous index inner (so the global loads and
// the shared stores coalesce): OUTER x INNER elements, rows padded by 8 elements (16 bytes: WMMA's
// ldm rule, and a bank stagger). Fragment pointers land on multiples of 16 rows and 16 columns, so
// they are 32-byte aligned as WMMA requires.
template <int OUTER, int INNER>
struct SmemTile {
  static constexpr int kOuter = OUTER;
  static constexpr int kInner = INNER;
  static constexpr int kLd = INNER + 8;
  static constexpr int kElems = OUTER * kLd;
};

// W's 64 x 32 tile: Ws[u][t] when t is its contiguous index, else Ws[t][u].
template <bool kWideTContig>
using WideTile = std::conditional_t<kWideTContig, SmemTile<kNarrowRows, kStepT>, SmemTile<kStepT, kNarrowRows>>;
// R's 32 x 64 tile: Rs[j][t] when t is its contiguous index, else Rs[t][j].
template <bool kNarrowTContig>
using NarrowTile = std::conditional_t<kNarrowTContig, SmemTile<kNarrowCols, kStepT>, SmemTile<kStepT, kNarrowCols>>;

// Block (x, y, z) = (64-row tile of u, 64-column block of j, split of t). Warp w owns rows
// 16w .. 16w + 15 of the tile and the column fragments the block needs.
template <bool kWideTContig, bool kNarrowTContig, typename T, typename TR>
__global__ void __launch_bounds__(kThreads, 4) narrow_gemm_kernel(const NarrowParams<T, TR> p) {
  using namespace nvcuda;
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "W is fp16 or bf16");
  constexpr bool kSplit = std::is_same_v<TR, float>;
  static_assert(std::is_same_v<TR, T> || (kSplit && std::is_same_v<T, __nv_bfloat16>),
                "R is W's type, or fp32 with bf16 W (the split needs fp32's exponent range)");
  using WT = WideTile<kWideTContig>;
  using NT = NarrowTile<kNarrowTContig>;
  constexpr int kParts = kSplit ? 2 : 1;  // R_hi (+ R_lo)
  // W(u, t) as matrix_a (rows u, columns t): row-major in Ws[u][t], column-major in Ws[t][u].
  using ALayout = std::conditional_t<kWideTContig, wmma::row_major, wmma::col_major>;
  // R(t, j) as matrix_b (rows t, columns j): column-major in Rs[j][t], row-major in Rs[t][j].
  using BLayout = std::conditional_t<kNarrowTContig, wmma::col_major, wmma::row_major>;
  using RStage = std::conditional_t<kSplit, float, T>;  // R in registers between fetch and store

  constexpr size_t kOperandBytes = sizeof(T) * (WT::kElems + kParts * NT::kElems);
  constexpr size_t kOutBytes = sizeof(float) * kNarrowRows * kLdOut;
  __shared__ __align__(128) unsigned char smem[kOperandBytes > kOutBytes ? kOperandBytes : kOutBytes];
  T* const Ws = reinterpret_cast<T*>(smem);
  T* const Rs = Ws + WT::kElems;  // part q (hi, lo) at Rs + q * NT::kElems

  const int64_t u0 = int64_t{blockIdx.x} * kNarrowRows;
  const int64_t j0 = int64_t{blockIdx.y} * kNarrowCols;
  const int64_t t_begin = p.t_per_split > 0 ? int64_t{blockIdx.z} * p.t_per_split : 0;
  const int64_t t_end = p.t_per_split > 0 ? min64(p.T_len, t_begin + p.t_per_split) : p.T_len;
  // The 16-wide fragments this column block needs: r = 16 runs one, not four (block-uniform, so
  // every warp takes the same branches).
  const int frags = static_cast<int>(min64((p.J - j0 + 15) / 16, kFrags));
  const int wu = threadIdx.x / 32 * 16;
  // Column sums of W (p.col_sum): thread tid sums column tid % 64 of each Ws[t][u] tile over its half
  // of t (16 rows), the halves added in the epilogue; block-uniform, like frags.
  [[maybe_unused]] const bool sum_cols = !kWideTContig && p.col_sum != nullptr && blockIdx.y == 0;
  [[maybe_unused]] float col_acc = 0.f;

  TileCopy<T, WT::kOuter, WT::kInner> w_copy;
  TileCopy<RStage, NT::kOuter, NT::kInner> r_copy;
  const bool drop = p.dropout.p > 0.f;
  auto fetch = [&](int64_t t0) {
    if constexpr (kWideTContig) {
      w_copy.fetch(p.w, p.ldw, u0, p.U, t0, t_end);
      if (drop) w_copy.drop(p.dropout, p.dropout_row_len, u0, t0);
    } else {
      w_copy.fetch(p.w, p.ldw, t0, t_end, u0, p.U);
      if (drop) w_copy.drop(p.dropout, p.dropout_row_len, t0, u0);
    }
    if constexpr (kNarrowTContig) {
      r_copy.fetch(p.r, p.ldr, j0, p.J, t0, t_end);
    } else {
      r_copy.fetch(p.r, p.ldr, t0, t_end, j0, p.J);
    }
  };
  auto store = [&] {
    w_copy.store(Ws, WT::kLd);
    if constexpr (kSplit) {
      // R = hi + lo (split_hi / split_lo: hi truncated to bf16, lo the rest rounded, 0 for a
      // non-finite R): the products hi·W and lo·W are exact in fp32, so R·W is carried to ~2⁻¹⁶
      // relative, not bf16's 2⁻⁹.
      T* hi = Rs + (threadIdx.x / NT::kInner) * NT::kLd + threadIdx.x % NT::kInner;
      T* lo = hi + NT::kElems;
      constexpr int kStep = decltype(r_copy)::kRowStep * NT::kLd;
#pragma unroll
      for (int q = 0; q < decltype(r_copy)::kPerThread; ++q) {
        const T h = split_hi<T>(r_copy.v[q]);
        hi[q * kStep] = h;
        lo[q * kStep] = split_lo(r_copy.v[q], h);
      }
    } else {
      r_copy.store(Rs, NT::kLd);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(acc[f], 0.f);

  fetch(t_begin);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kStepT) {
    store();
    __syncthreads();
    if (t0 + kStepT < t_end) fetch(t0 + kStepT);  // in flight while the tensor cores work
    if constexpr (!kWideTContig) {
      if (sum_cols) {
        const T* col = Ws + (threadIdx.x / kNarrowRows) * (kStepT / 2) * WT::kLd + threadIdx.x % kNarrowRows;
#pragma unroll
        for (int i = 0; i < kStepT / 2; ++i) col_acc += to_float(col[i * WT::kLd]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kStepT; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
      wmma::load_matrix_sync(a, kWideTContig ? Ws + wu * WT::kLd + kk : Ws + kk * WT::kLd + wu, WT::kLd);
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        if (f >= frags) break;
#pragma unroll
        for (int part = 0; part < kParts; ++part) {
          const T* rs = Rs + part * NT::kElems;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
          wmma::load_matrix_sync(b, kNarrowTContig ? rs + f * 16 * NT::kLd + kk : rs + kk * NT::kLd + f * 16, NT::kLd);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
    }
    __syncthreads();
  }

  // Epilogue: the fragments (opaque layouts) through shared memory (the operand tiles are free: the
  // loop ended on a barrier), then stores along whichever of u, j is out's contiguous index.
  float* const Cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int f = 0; f < kFrags; ++f) {
    if (f < frags) wmma::store_matrix_sync(Cs + wu * kLdOut + f * 16, acc[f], kLdOut, wmma::mem_row_major);
  }
  [[maybe_unused]] __shared__ float col_half[kThreads];
  if constexpr (!kWideTContig) {
    if (sum_cols) col_half[threadIdx.x] = col_acc;
  }
  __syncthreads();
  if constexpr (!kWideTContig) {
    if (sum_cols && threadIdx.x < kNarrowRows && u0 + threadIdx.x < p.U) {
      p.col_sum[int64_t{blockIdx.z} * p.col_sum_split_stride + u0 + threadIdx.x] =
          col_half[threadIdx.x] + col_half[threadIdx.x + kNarrowRows];
    }
  }
  float* const out = p.out + int64_t{blockIdx.z} * p.out_split_stride;
  const int cols = frags * 16;
  const bool j_fastest = p.ldo_j == 1;
  for (int e = threadIdx.x; e < kNarrowRows * cols; e += kThreads) {
    const int uu = j_fastest ? e / cols : e % kNarrowRows;
    const int jj = j_fastest ? e % cols : e / kNarrowRows;
    const int64_t u = u0 + uu, j = j0 + jj;
    if (u < p.U && j < p.J) out[u * p.ldo_u + j * p.ldo_j] = p.scale * Cs[uu * kLdOut + jj];
  }
}

}  // namespace

template <bool kWideTContig, bool kNarrowTContig, typename T, typename TR>
cudaError_t launch_narrow_gemm(const NarrowParams<T, TR>& p, cudaStream_t stream) {
  if (p.U == 0 || p.J == 0) return cudaSuccess;
  const int64_t splits = p.t_per_split > 0 ? ceil_div(p.T_len, p.t_per_split) : 1;
  if (splits == 0) return cudaSuccess;  // t_per_split with T_len == 0: no partial to write
  const dim3 grid(static_cast<unsigned>(ceil_div(p.U, kNarrowRows)), static_cast<unsigned>(ceil_div(p.J, kNarrowCols)),
                  static_cast<unsigned>(splits));
  narrow_gemm_kernel<kWideTContig, kNarrowTContig><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The combinations lora_ops.cpp launches: x Aᵀ (W t-contiguous, A t-contiguous) and gy B (B
// j-contiguous) for bf16 with either adapter dtype and for fp16 with fp16 adapters; the two
// reductions (W = x or gy and R = g or xa, both m-major) for bf16.
#define FASTLORA_NARROW(WTC, NTC, T, TR) \
  template cudaError_t launch_narrow_gemm<WTC, NTC, T, TR>(const NarrowParams<T, TR>&, cudaStream_t);
#define FASTLORA_NARROW_RANK(T, TR)     \
  FASTLORA_NARROW(true, true, T, TR)    \
  FASTLORA_NARROW(true, false, T, TR)
FASTLORA_NARROW_RANK(__nv_bfloat16, __nv_bfloat16)
FASTLORA_NARROW_RANK(__nv_bfloat16, float)
FASTLORA_NARROW_RANK(__half, __half)
FASTLORA_NARROW(false, false, __nv_bfloat16, float)

}  // namespace fastlora
