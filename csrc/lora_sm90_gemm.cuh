// The Hopper fused LoRA GEMM (contract in lora_cutlass.cuh): CUTLASS 3.x's persistent, warp-specialised
// cooperative kernel with a mainloop that appends the LoRA K-blocks. Included by the lora_sm90_*.cu
// files only (each instantiates a few types: every instantiation costs ~30-60 s of nvcc).
#pragma once

#include "lora_cutlass.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace fastlora {
namespace sm90 {

using namespace cute;

// A CUTLASS TMA + GMMA warp-specialised mainloop (Base) whose reduction is [a | a_ext] · [b | b_ext]ᵀ:
// the kernel is given the problem K' = (k-blocks of K + k-blocks of R) · BLK_K, so its pipeline
// bookkeeping (k_tile_count from load_init, the stage counters it advances) covers both parts; the
// producer issues the K-blocks of (a, b) and then those of (a_ext, b_ext) into the same smem stages,
// and the consumer (Base::mma, unchanged) multiplies them all into one accumulator. The two parts are
// two Base::load calls over two sets of TMA descriptors (Base::Params each), so every TMA, barrier
// and multicast detail stays CUTLASS's own.
template <class Base>
struct LoRAMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  static constexpr int kBlockK = size<2>(TileShape{});

  struct Arguments {
    typename Base::Arguments base;  // a [M, K], b [N, K]
    typename Base::Arguments ext;   // a_ext [M, R], b_ext [N, R]
    int K, R;
  };

  struct Params {
    typename Base::Params base, ext;
    int K, R;
    // Bytes one stage's TMA loads deliver (the kernel arms the pipeline barriers with it): the two
    // parts' tiles have the same shape, so one number serves both.
    uint32_t tma_transaction_bytes;
  };

  // The K' the kernel is launched with.
  static int padded_k(int K, int R) { return (ceil_div(K, kBlockK) + ceil_div(R, kBlockK)) * kBlockK; }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K_padded, L] = append<4>(problem_shape, 1);
    auto base = Base::to_underlying_arguments(make_shape(M, N, args.K, L), args.base, workspace);
    auto ext = Base::to_underlying_arguments(make_shape(M, N, args.R, L), args.ext, workspace);
    return {base, ext, args.K, args.R, base.tma_transaction_bytes};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K_padded, L] = append<4>(problem_shape, 1);
    return args.K > 0 && args.R > 0 && K_padded == padded_k(args.K, args.R) &&
           Base::can_implement(make_shape(M, N, args.K, L), args.base) &&
           Base::can_implement(make_shape(M, N, args.R, L), args.ext);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params.base);
    Base::prefetch_tma_descriptors(params.ext);
  }

  // (gA, gB) over K' first, as the kernel requires (it takes the k-block count from gA's 4th mode),
  // then the tiled TMA tensors of the two parts.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto [M, N, K_padded, L] = problem_shape_MNKL;
    auto whole = Base::load_init(problem_shape_MNKL, params.base);
    auto base = Base::load_init(make_shape(M, N, params.K, L), params.base);
    auto ext = Base::load_init(make_shape(M, N, params.R, L), params.ext);
    return make_tuple(get<0>(whole), get<1>(whole), get<0>(base), get<1>(base), get<0>(ext), get<1>(ext));
  }

  // Producer: every K-block of the base, then every K-block of the LoRA part, for the whole K' (the
  // persistent data-parallel scheduler never splits K, so the kernel's k-iterator always starts at 0).
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           LoadInputs const& load_inputs, BlockCoord const& blk_coord, KTileIterator,
                           int, int thread_idx, uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    auto g_base = make_tuple(get<2>(load_inputs), get<3>(load_inputs));
    auto g_ext = make_tuple(get<4>(load_inputs), get<5>(load_inputs));
    const int k_base = size<3>(get<2>(load_inputs));
    const int k_ext = size<3>(get<4>(load_inputs));
    Base::load(params.base, pipeline, smem_pipe_write, g_base, blk_coord, make_coord_iterator(shape<3>(get<2>(load_inputs))),
               k_base, thread_idx, block_rank_in_cluster, shared_tensors);
    smem_pipe_write.advance(k_base);
    Base::load(params.ext, pipeline, smem_pipe_write, g_ext, blk_coord, make_coord_iterator(shape<3>(get<4>(load_inputs))),
               k_ext, thread_idx, block_rank_in_cluster, shared_tensors);
  }

  // Consumer: Base's, over all K' blocks (its Params only carry TMA state the consumer does not use).
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    Base::mma(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors, params.base);
  }
};

template <typename T>
using CutlassType = std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::bfloat16_t>;

// Tile 128 x 256 x 64 for two consumer warpgroups (cooperative: each owns 64 x 256), cluster 1 x 1:
// the configuration CUTLASS's profiler ranks first for large bf16 GEMMs on H100 apart from the
// cluster, which is left at 1 so that any M and N tile count launches (a 2 x 1 cluster multicasts B).
template <typename T, bool kKMajor>
struct Kernel {
  using Element = CutlassType<T>;
  using LayoutA = cutlass::layout::RowMajor;
  // CUTLASS's B is K x N: column-major B is an N x K row-major (K-major) matrix.
  using LayoutB = std::conditional_t<kKMajor, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _1, _1>;

  // out = acc + bias (bias per column, nullptr = none); no C operand is read.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, Element, LayoutD, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinCombPerColBias<Element, float, Element, void>>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = LoRAMainloop<BaseMainloop>;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                          cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

template <typename T, bool kKMajor>
CutlassLaunch launch(const LoRAGemmArgs& p, cudaStream_t stream) {
  using K = Kernel<T, kKMajor>;
  using E = typename K::Element;
  using StrideA = typename K::Mainloop::StrideA;
  using StrideB = typename K::Mainloop::StrideB;
  using StrideD = typename K::GemmKernel::StrideD;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), Kd = static_cast<int>(p.K), R = static_cast<int>(p.R);
  // Strides are (M or N mode, K mode, batch); the unit one is a compile-time _1 in the type.
  auto stride_a = [](int64_t ld) {
    StrideA s{};
    get<0>(s) = ld;
    return s;
  };
  auto stride_b = [](int64_t ld) {
    StrideB s{};
    if constexpr (kKMajor) {
      get<0>(s) = ld;
    } else {
      get<1>(s) = ld;
    }
    return s;
  };
  StrideD stride_d{};
  get<0>(stride_d) = p.ldo;

  typename K::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = make_shape(M, N, K::Mainloop::padded_k(Kd, R), 1);
  args.mainloop.base = {static_cast<const E*>(p.a), stride_a(p.lda), static_cast<const E*>(p.b), stride_b(p.ldb)};
  args.mainloop.ext = {static_cast<const E*>(p.a_ext), stride_a(p.lda_ext), static_cast<const E*>(p.b_ext),
                       stride_b(p.ldb_ext)};
  args.mainloop.K = Kd;
  args.mainloop.R = R;
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.thread.bias_ptr = static_cast<const E*>(p.bias);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = static_cast<E*>(p.out);
  args.epilogue.dD = stride_d;
  args.hw_info.sm_count = p.sm_count;

  typename K::Gemm gemm;
  // The data-parallel persistent scheduler needs no workspace; a CUTLASS that wanted one is refused
  // rather than handed a null pointer.
  if (K::Gemm::get_workspace_size(args) != 0) return {CutlassStatus::kRejected, cudaSuccess, 0};
  if (const cutlass::Status s = gemm.can_implement(args); s != cutlass::Status::kSuccess) {
    return {CutlassStatus::kRejected, cudaSuccess, static_cast<int>(s)};
  }
  // initialize builds the TMA descriptors and sets the kernel's dynamic shared-memory attribute; when
  // that call fails, its CUDA error is still pending: take it, so no later check blames another kernel.
  if (const cutlass::Status s = gemm.initialize(args, nullptr, stream); s != cutlass::Status::kSuccess) {
    return {CutlassStatus::kRejected, cudaGetLastError(), static_cast<int>(s)};
  }
  // The launch gemm.run() would do for a static 1 x 1 x 1 cluster without PDL (cutlass::kernel_launch),
  // done here: run() reads cudaGetLastError() itself and returns only kErrorInternal, so the real CUDA
  // error (say, too many resources requested) would be lost.
  using GemmKernel = typename K::GemmKernel;
  const dim3 grid = K::Gemm::get_grid_shape(gemm.params());
  const dim3 block = GemmKernel::get_block_shape();
  cutlass::device_kernel<GemmKernel><<<grid, block, GemmKernel::SharedStorageSize, stream>>>(gemm.params());
  const cudaError_t err = cudaGetLastError();
  return {err == cudaSuccess ? CutlassStatus::kLaunched : CutlassStatus::kLaunchFailed, err, 0};
}

}  // namespace sm90

template <typename T, bool kKMajor>
CutlassLaunch launch_lora_gemm_sm90(const LoRAGemmArgs& p, cudaStream_t stream) {
  return sm90::launch<T, kKMajor>(p, stream);
}

}  // namespace fastlora
