// The Ampere-class fused LoRA GEMM (contract in lora_cutlass.cuh): CUTLASS 3.x's SM80 multistage
// mainloop collective (cp.async into swizzled shared memory, ldmatrix, mma.sync) run twice into one
// accumulator — over (a, b) and then over (a_ext, b_ext) — and its default epilogue. Included by the
// lora_sm80_*.cu files only.
#pragma once

#include "lora_cutlass.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/default_epilogue.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_mma.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"

namespace fastlora {
namespace sm80 {

using namespace cute;

template <typename T>
using CutlassType = std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::bfloat16_t>;

// 128 x 128 x 32 tiles, 4 warps as 2 x 2 (each 64 x 64 of the tile), 4 stages: 64 KiB of shared
// memory, which fits every sm_8x part (sm_86/89 allow 99 KiB per block), two blocks per A100 SM.
template <typename T, bool kKMajor>
struct Config {
  using Element = CutlassType<T>;
  using TileShape = Shape<_128, _128, _32>;
  static constexpr int kStages = 4;
  static constexpr int kThreads = 128;
  using MmaOp = std::conditional_t<std::is_same_v<T, __half>, SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x16_F32BF16BF16F32_TN>;
  // 2 x 2 warps; the 32 x 32 x 16 permutation lets one ldmatrix.x4 feed two 16 x 8 atoms along N.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<_2, _2, _1>>, Tile<_32, _32, _16>>;

  // K-major operand: rows of 32 k (64 bytes) in 8-row swizzled atoms, so ldmatrix's 8 row reads hit
  // distinct banks; each thread moves 8 contiguous k (16 bytes) per cp.async.
  using SmemAtomK = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{}));
  using CopyK = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<uint128_t>, Element>{},
                                         Layout<Shape<_32, _4>, Stride<_4, _1>>{}, Layout<Shape<_1, _8>>{}));
  // MN-major operand (b in grad_x): 64 contiguous n per row of the atom; each thread moves 8
  // contiguous n; the transposing ldmatrix hands mma.sync its K-major fragments.
  using SmemAtomMN = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{}));
  using CopyMN = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<uint128_t>, Element>{},
                                          Layout<Shape<_16, _8>, Stride<_1, _16>>{}, Layout<Shape<_8, _1>>{}));

  using StrideA = Stride<int64_t, _1, int64_t>;
  using StrideB = std::conditional_t<kKMajor, Stride<int64_t, _1, int64_t>, Stride<_1, int64_t, int64_t>>;
  using Mainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<kStages>, TileShape, Element, StrideA, Element, StrideB, TiledMma,
      CopyK, SmemAtomK, Copy_Atom<SM75_U32x4_LDSM_N, Element>, cute::identity,
      std::conditional_t<kKMajor, CopyK, CopyMN>, std::conditional_t<kKMajor, SmemAtomK, SmemAtomMN>,
      Copy_Atom<std::conditional_t<kKMajor, SM75_U32x4_LDSM_N, SM75_U16x8_LDSM_T>, Element>, cute::identity>;

  // out = acc + 1 · C with C the bias read through row stride 0 (a row broadcast); without a bias
  // beta is 0 and C is never read.
  using StrideD = Stride<int64_t, _1, int64_t>;
  using StrideBias = Stride<_0, _1, int64_t>;
  using Epilogue = cutlass::epilogue::collective::DefaultEpilogue<
      Element, StrideBias, StrideD, cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>,
      cutlass::gemm::EpilogueDefault>;

  static constexpr size_t kSmemBytes = sizeof(typename Mainloop::SharedStorage);
};

// One block per 128 x 128 output tile (blockIdx.x over M, blockIdx.y over N).
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) lora_gemm_sm80_kernel(const LoRAGemmArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E = typename Cfg::Element;
  extern __shared__ __align__(128) char smem[];
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N);
  const auto blk = typename Cfg::TileShape{};
  const int m_coord = blockIdx.x, n_coord = blockIdx.y;

  typename Cfg::TiledMma mma;
  Tensor accum = partition_fragment_C(mma, take<0, 2>(blk));
  clear(accum);

  // acc += a(:, 0:depth) · b(:, 0:depth)ᵀ for one part; the collective predicates rows past M and N
  // and takes the ragged K-block first (its k residue), so any depth is safe.
  auto accumulate = [&](const void* a, int64_t lda, const void* b, int64_t ldb, int depth) {
    typename Cfg::StrideA stride_a{};
    get<0>(stride_a) = lda;
    typename Cfg::StrideB stride_b{};
    if constexpr (std::is_same_v<typename Cfg::StrideB, typename Cfg::StrideA>) {
      get<0>(stride_b) = ldb;
    } else {
      get<1>(stride_b) = ldb;
    }
    Tensor mA = make_tensor(make_gmem_ptr(static_cast<const E*>(a)), make_shape(M, depth, 1), stride_a);
    Tensor mB = make_tensor(make_gmem_ptr(static_cast<const E*>(b)), make_shape(N, depth, 1), stride_b);
    Tensor gA = local_tile(mA(_, _, 0), blk, make_coord(m_coord, n_coord, _), Step<_1, X, _1>{});
    Tensor gB = local_tile(mB(_, _, 0), blk, make_coord(m_coord, n_coord, _), Step<X, _1, _1>{});
    const auto residue = make_tuple(M - size<0>(gA) * m_coord, N - size<0>(gB) * n_coord,
                                    depth - size<1>(gA) * size<2>(gA));
    typename Cfg::Mainloop mainloop;
    mainloop(accum, gA, gB, accum, make_coord_iterator(shape<2>(gA)), static_cast<int>(size<2>(gA)), residue,
             static_cast<int>(threadIdx.x), smem);
  };
  accumulate(p.a, p.lda, p.b, p.ldb, static_cast<int>(p.K));
  // The second part refills the stages the first one may still be reading.
  cp_async_wait<0>();
  __syncthreads();
  accumulate(p.a_ext, p.lda_ext, p.b_ext, p.ldb_ext, static_cast<int>(p.R));

  typename Cfg::StrideD stride_d{};
  get<0>(stride_d) = p.ldo;
  typename Cfg::Epilogue::Params ep{};
  ep.thread.alpha = 1.f;
  ep.thread.beta = p.bias != nullptr ? 1.f : 0.f;
  ep.ptr_C = static_cast<const E*>(p.bias);
  ep.ptr_D = static_cast<E*>(p.out);
  ep.dD = stride_d;
  typename Cfg::Epilogue epilogue{ep};
  const auto residue_mn = make_tuple(M - size<0>(blk) * m_coord, N - size<1>(blk) * n_coord, 0);
  epilogue(make_shape(M, N, static_cast<int>(p.K), 1), blk, make_coord(m_coord, n_coord, _, 0), accum, mma,
           residue_mn, static_cast<int>(threadIdx.x), smem);
#endif
}

template <typename T, bool kKMajor>
CutlassLaunch launch(const LoRAGemmArgs& p, cudaStream_t stream) {
  using Cfg = Config<T, kKMajor>;
  auto kernel = lora_gemm_sm80_kernel<Cfg>;
  // Above 48 KiB, dynamic shared memory must be opted into per kernel; a device that cannot give this
  // much is a rejection (the portable kernel needs less), its error taken so that none stays pending.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg::kSmemBytes)) !=
      cudaSuccess) {
    return {CutlassStatus::kRejected, cudaGetLastError(), 0};
  }
  // M tiles on gridDim.x (M < 2^31: fewer than 2^24), N tiles on gridDim.y, at most 65535 (lora_ops.cpp
  // caps N at 65535 * 64, so at most 32768 here: a guard against a change of either limit).
  const int64_t n_tiles = (p.N + 127) / 128;
  if (n_tiles > 65535) return {CutlassStatus::kRejected, cudaSuccess, 0};
  const dim3 grid(static_cast<unsigned>((p.M + 127) / 128), static_cast<unsigned>(n_tiles));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return {err == cudaSuccess ? CutlassStatus::kLaunched : CutlassStatus::kLaunchFailed, err, 0};
}

}  // namespace sm80

template <typename T, bool kKMajor>
CutlassLaunch launch_lora_gemm_sm80(const LoRAGemmArgs& p, cudaStream_t stream) {
  return sm80::launch<T, kKMajor>(p, stream);
}

}  // namespace fastlora
