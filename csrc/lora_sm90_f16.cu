// The sm_90a fused LoRA GEMMs for __half (lora_sm90_gemm.cuh): one translation unit per element type,
// so that ninja compiles the types in parallel. Empty unless the build targets sm_90a (setup.py).
#ifdef FASTLORA_SM90A
#include "lora_sm90_gemm.cuh"

namespace fastlora {
template CutlassLaunch launch_lora_gemm_sm90<__half, true>(const LoRAGemmArgs&, cudaStream_t);
template CutlassLaunch launch_lora_gemm_sm90<__half, false>(const LoRAGemmArgs&, cudaStream_t);
}  // namespace fastlora
#endif
