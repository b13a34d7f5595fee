// The sm_80-class fused LoRA GEMMs for __nv_bfloat16 (lora_sm80_gemm.cuh): one translation unit per element
// type, so that ninja compiles the types in parallel.
#include "lora_sm80_gemm.cuh"

namespace fastlora {
template CutlassLaunch launch_lora_gemm_sm80<__nv_bfloat16, true>(const LoRAGemmArgs&, cudaStream_t);
template CutlassLaunch launch_lora_gemm_sm80<__nv_bfloat16, false>(const LoRAGemmArgs&, cudaStream_t);
}  // namespace fastlora
