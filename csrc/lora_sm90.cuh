// Launcher of the Hopper (sm_90a) fused LoRA GEMM, built from CUTLASS 3.x collectives
// (lora_sm90_gemm.cuh; instantiated in lora_sm90_*.cu). No torch or CUTLASS headers here, so the host
// file (lora_ops.cpp) includes it cheaply.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastlora {

// out[M, N] = [a | a_ext] · [b | b_ext]ᵀ + bias, in one persistent, warp-specialised TMA + wgmma
// kernel: the LoRA term rides on the base GEMM's accumulator as ceil(R / 64) extra K-blocks, whose
// tiles come from a second pair of TMA descriptors (their out-of-bounds zero fill pads R to the block).
//   a(m, k)     = a[m * lda + k]                      [M, K]  (x in the forward, gy in grad_x)
//   a_ext(m, r) = a_ext[m * lda_ext + r]              [M, R]  (s·xa, s·(gy B), rounded to the element type)
//   b and b_ext, the [N, K] and [N, R] right operands, in one of two stored layouts (the template flag):
//     kKMajor:  b(n, k) = b[n * ldb + k]    b_ext(n, r) = b_ext[n * ldb_ext + r]   (forward, row-major W)
//     else:     b(n, k) = b[k * ldb + n]    b_ext(n, r) = b_ext[r * ldb_ext + n]   (grad_x, row-major W)
//   bias[N] or nullptr; out(m, n) = out[m * ldo + n].
// Element type T: __half or __nv_bfloat16 for every operand; fp32 accumulation; one rounding of out.
// TMA's contract, which lora_ops.cpp checks before choosing this kernel: every pointer 16-byte
// aligned, every leading dimension and the contiguous extents (K or N of b, N of out) multiples of
// 8 elements, M, N, K < 2^31, K >= 1, R >= 1.
struct Sm90LoRAGemm {
  int64_t M, N, K, R;
  const void* a;
  int64_t lda;
  const void* a_ext;
  int64_t lda_ext;
  const void* b;
  int64_t ldb;
  const void* b_ext;
  int64_t ldb_ext;
  const void* bias;
  void* out;
  int64_t ldo;
  int sm_count;  // the persistent grid's size
};

// Returns cudaErrorNotSupported (launching nothing) if CUTLASS rejects the problem, else the launch's
// status. Only for devices of compute capability 9.0 (the binary is sm_90a).
template <typename T, bool kKMajor>
cudaError_t launch_lora_gemm_sm90(const Sm90LoRAGemm& p, cudaStream_t stream);

}  // namespace fastlora
