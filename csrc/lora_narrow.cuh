// Launcher of the narrow tensor-core GEMM (lora_narrow.cu): the rank-r passes of the cuda backend,
// whose output has r columns, on WMMA tiles as wide as r instead of the portable kernel's 64 × 64.
//
//   xa     = D(x) Aᵀ   [M, r]   wide u = m, reduction t = k   (forward)
//   g      = gy B      [M, r]   wide u = m, reduction t = n   (backward)
//   grad_A ∝ gᵀ D(x)   [r, K]   wide u = k, reduction t = m   (backward, split-M partials)
//   grad_B ∝ gyᵀ xa    [N, r]   wide u = n, reduction t = m   (backward, split-M partials)
//
// One contract for the four: out(u, j) = scale · Σ_t W(u, t) · R(t, j), where W, the wide operand, is
// an activation (x or gy, fp16/bf16: exact on the tensor cores) and R, the narrow one, has r
// columns. R in fp32 (fp32 adapters, g, xa) is split on its way into shared memory into
// R_hi = R truncated to bf16 and R_lo = bf16(R − R_hi), both multiplied by W into one fp32 accumulator:
// R_hi + R_lo holds R to ~2⁻¹⁶ relative (16 significant bits), far inside the 1e-2 budget of a
// bf16 computation, with products exact in fp32. The split needs fp32's exponent range, so it is
// bf16-only: fp16 with an fp32 R (its gradients underflow fp16 where loss scaling does not
// lift them) stays on the portable FMA kernels, as do fp32 activations (exact FMAs, no TF32).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "lora_kernels.cuh"

namespace fastlora {

// Columns (j) of one block: r is covered by ceil(r / 64) column blocks (gridDim.y), each running
// only the 16-wide fragments its columns need (so r = 16 runs one, not four).
constexpr int kNarrowCols = 64;
// Rows (u) of one block: 4 warps of 16 rows each.
constexpr int kNarrowRows = 64;

// T: the wide operand's element type (__half or __nv_bfloat16); TR: the narrow one's (T, or float
// with T = __nv_bfloat16).
//   W(u, t) = w[u * ldw + t] if kWideTContig, else w[t * ldw + u]
//   R(t, j) = r[j * ldr + t] if kNarrowTContig, else r[t * ldr + j]
//   out(u, j) (fp32) = out[z * out_split_stride + u * ldo_u + j * ldo_j], for split z
// With t_per_split > 0, block z reduces t in [z * t_per_split, (z + 1) * t_per_split) (a multiple of
// 32) and writes its own partial; 0 reduces all of t in one block per (u, j) tile.
// With dropout.p > 0, W's element stored at w[o * ldw + c] is dropped by counter o * dropout_row_len + c
// (the counter of x's element (m, k) is m * K + k whichever of m, k is the reduction index); the
// caller folds dropout's 1 / (1 − p) into scale.
// With col_sum set (kWideTContig = false only), the blocks of column block 0 also write the column
// sums of W over their split, col_sum[z * col_sum_split_stride + u] = Σ_t W(u, t) (fp32, unscaled, W as
// loaded): grad_B's pass over gy gives the bias gradient from the tiles already in shared memory.
template <typename T, typename TR>
struct NarrowParams {
  int64_t U, J, T_len;
  const T* w;
  int64_t ldw;
  const TR* r;
  int64_t ldr;
  float* out;
  int64_t ldo_u, ldo_j;
  float scale;
  Dropout dropout;
  int64_t dropout_row_len;
  int64_t t_per_split;
  int64_t out_split_stride;
  float* col_sum;
  int64_t col_sum_split_stride;
};

// Nothing is launched when U or J is 0 (T_len == 0 writes zeros). J <= kMaxColumns, splits <= 65535.
template <bool kWideTContig, bool kNarrowTContig, typename T, typename TR>
cudaError_t launch_narrow_gemm(const NarrowParams<T, TR>& p, cudaStream_t stream);

}  // namespace fastlora
