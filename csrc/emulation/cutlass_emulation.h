// A CPU stand-in for the CUTLASS launchers of lora_cutlass.cuh and for the device properties the host
// code reads, so that tests/test_cuda_emulation.py runs lora_ops.cpp's CUTLASS paths on the CPU: the
// kernel choice for a given device, the operands of the LoRA K-blocks (lora_blocks) as the launchers
// receive them (pointers, leading dimensions, both W layouts, the 16-byte contract asserted), the
// portable fallback after a rejection and the error raised after a failed launch.
//
// The stand-in computes LoRAGemmArgs' contract in plain C++ (exact products of the fp16/bf16
// operands summed in fp32, one rounding), as the tensor-core kernels do: it checks what lora_ops.cpp
// hands the kernels, not the kernels (those need a GPU: tests/test_cuda_gpu.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "lora_cutlass.cuh"

namespace fastlora_emulation {

// What the stand-in launchers do: compute the product, refuse like a can_implement rejection, or fail
// like a launch that asked for too many resources.
enum class CutlassMode : int64_t { kRun = 0, kReject = 1, kFailLaunch = 2 };

struct State {
  cudaDeviceProp props;
  CutlassMode mode;
  int64_t attempts[2];  // launcher calls per path: [0] sm80, [1] sm90
  int64_t launches[2];  // of those, the ones that computed
};

// A device of compute capability 7.5 (the host code's CUTLASS paths need 8.0) and an H100's 132 SMs
// (the split counts) until a test configures another.
inline State& state() {
  static State s = [] {
    State init{};
    init.props.major = 7;
    init.props.minor = 5;
    init.props.multiProcessorCount = 132;
    init.mode = CutlassMode::kRun;
    return init;
  }();
  return s;
}

// Replaces at::cuda::getCurrentDeviceProperties() in the emulated lora_ops.cpp.
inline cudaDeviceProp* device_properties() { return &state().props; }

// Replace cudaGetErrorName / cudaGetErrorString there (no CUDA runtime is linked).
inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorLaunchOutOfResources:
      return "cudaErrorLaunchOutOfResources";
    default:
      return "cudaErrorUnknown";
  }
}
inline const char* error_string(cudaError_t e) {
  return e == cudaErrorLaunchOutOfResources ? "too many resources requested for launch" : "emulated CUDA error";
}

#define CUTLASS_EMULATION_CHECK(cond)                                                             \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::fprintf(stderr, "CUTLASS emulation: %s failed at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                               \
    }                                                                                             \
  } while (0)

template <typename T>
float widen(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}
template <typename T>
T narrow(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kKMajor>
fastlora::CutlassLaunch launch(const fastlora::LoRAGemmArgs& p, int path) {
  using fastlora::CutlassStatus;
  State& s = state();
  ++s.attempts[path];
  if (s.mode == CutlassMode::kReject) return {CutlassStatus::kRejected, cudaSuccess, 7};  // 7: kErrorNotSupported-like
  if (s.mode == CutlassMode::kFailLaunch) return {CutlassStatus::kLaunchFailed, cudaErrorLaunchOutOfResources, 0};
  // The contract lora_cutlass.cuh states and choose_gemm_path promises.
  CUTLASS_EMULATION_CHECK(p.M >= 1 && p.N >= 1 && p.K >= 1 && p.R >= 1);
  CUTLASS_EMULATION_CHECK(p.K % 8 == 0 && p.N % 8 == 0 && p.R % 8 == 0);
  CUTLASS_EMULATION_CHECK(p.lda % 8 == 0 && p.lda_ext % 8 == 0 && p.ldb % 8 == 0 && p.ldb_ext % 8 == 0 && p.ldo % 8 == 0);
  CUTLASS_EMULATION_CHECK(p.lda >= p.K && p.lda_ext >= p.R && p.ldo >= p.N);
  CUTLASS_EMULATION_CHECK(kKMajor ? p.ldb >= p.K && p.ldb_ext >= p.R : p.ldb >= p.N && p.ldb_ext >= p.N);
  CUTLASS_EMULATION_CHECK(aligned16(p.a) && aligned16(p.a_ext) && aligned16(p.b) && aligned16(p.b_ext) &&
                          aligned16(p.out) && (p.bias == nullptr || aligned16(p.bias)));
  CUTLASS_EMULATION_CHECK(p.sm_count >= 1);
  const T* a = static_cast<const T*>(p.a);
  const T* a_ext = static_cast<const T*>(p.a_ext);
  const T* b = static_cast<const T*>(p.b);
  const T* b_ext = static_cast<const T*>(p.b_ext);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) {
        acc += widen(a[m * p.lda + k]) * widen(kKMajor ? b[n * p.ldb + k] : b[k * p.ldb + n]);
      }
      for (int64_t r = 0; r < p.R; ++r) {
        acc += widen(a_ext[m * p.lda_ext + r]) * widen(kKMajor ? b_ext[n * p.ldb_ext + r] : b_ext[r * p.ldb_ext + n]);
      }
      if (bias != nullptr) acc += widen(bias[n]);
      out[m * p.ldo + n] = narrow<T>(acc);
    }
  }
  ++s.launches[path];
  return {CutlassStatus::kLaunched, cudaSuccess, 0};
}

}  // namespace fastlora_emulation

namespace fastlora {
template <typename T, bool kKMajor>
CutlassLaunch launch_lora_gemm_sm90(const LoRAGemmArgs& p, cudaStream_t) {
  return fastlora_emulation::launch<T, kKMajor>(p, 1);
}
template <typename T, bool kKMajor>
CutlassLaunch launch_lora_gemm_sm80(const LoRAGemmArgs& p, cudaStream_t) {
  return fastlora_emulation::launch<T, kKMajor>(p, 0);
}
}  // namespace fastlora
