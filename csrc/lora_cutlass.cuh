// Launchers of the CUTLASS/CuTe fused LoRA GEMMs: Hopper (lora_sm90_gemm.cuh, lora_sm90_*.cu) and
// Ampere-class (lora_sm80_gemm.cuh, lora_sm80_*.cu). No torch or CUTLASS headers here, so the host
// file (lora_ops.cpp) includes it cheaply.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastlora {

// out[M, N] = [a | a_ext] · [b | b_ext]ᵀ + bias: the LoRA term rides on the base GEMM's accumulator as
// ceil(R / BLK_K) extra K-blocks (zero-filled past R), so it costs one more K-block of tensor-core
// work instead of an epilogue with r FMAs per output element.
//   a(m, k)     = a[m * lda + k]                      [M, K]  (x in the forward, gy in grad_x)
//   a_ext(m, r) = a_ext[m * lda_ext + r]              [M, R]  (s·xa, s·(gy B), rounded to the element type)
//   b and b_ext, the [N, K] and [N, R] right operands, in one of two stored layouts (the template flag):
//     kKMajor:  b(n, k) = b[n * ldb + k]    b_ext(n, r) = b_ext[n * ldb_ext + r]   (forward, row-major W)
//     else:     b(n, k) = b[k * ldb + n]    b_ext(n, r) = b_ext[r * ldb_ext + n]   (grad_x, row-major W)
//   bias[N] or nullptr; out(m, n) = out[m * ldo + n].
// Element type T: __half or __nv_bfloat16 for every operand; fp32 accumulation; one rounding of out.
// The 16-byte vector contract (TMA on Hopper, cp.async on Ampere), which lora_ops.cpp checks before
// choosing these kernels: every pointer 16-byte aligned, every leading dimension and the contiguous
// extents (K and R of a, the contiguous one of b, N of out) multiples of 8 elements; M, N, K < 2^31;
// K >= 1, R >= 1.
struct LoRAGemmArgs {
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
  int sm_count;  // the persistent grid's size (sm90)
};

// What a launcher did. The host (lora_ops.cpp, cutlass_outcome) takes the portable kernel after
// kRejected and raises, naming the kernel and `error`, after kLaunchFailed.
enum class CutlassStatus : int {
  kLaunched = 0,      // the kernel is queued on the stream and cudaGetLastError() said cudaSuccess
  kRejected = 1,      // CUTLASS refused the problem before anything was launched (can_implement,
                      // a workspace it would need, initialize, or the shared-memory attribute)
  kLaunchFailed = 2,  // the launch itself failed
};
struct CutlassLaunch {
  CutlassStatus status;
  // The CUDA error behind kLaunchFailed (and behind a kRejected initialize or attribute set-up), taken
  // with cudaGetLastError(), so it is not left pending for an unrelated later check; else cudaSuccess.
  cudaError_t error;
  int cutlass_status;  // the cutlass::Status of the refusing step (0: kSuccess, or not a CUTLASS step)
};

// Persistent, warp-specialised TMA + wgmma kernel (compute capability 9.0 only: the binary is sm_90a).
template <typename T, bool kKMajor>
CutlassLaunch launch_lora_gemm_sm90(const LoRAGemmArgs& p, cudaStream_t stream);

// Multistage cp.async + ldmatrix + mma.sync kernel (compute capability 8.0 and newer).
template <typename T, bool kKMajor>
CutlassLaunch launch_lora_gemm_sm80(const LoRAGemmArgs& p, cudaStream_t stream);

}  // namespace fastlora
