// Host side of the fastlora CUDA backend: argument checks, allocation, the order of kernel launches,
// and the registration of the CUDA kernels of fastlora::cuda_forward and fastlora::cuda_backward.
// Those ops, their schemas (FORWARD_SCHEMA, BACKWARD_SCHEMA), fake kernels and autograd are defined
// once, in Python (fastlora/ops/_contract.py, fastlora/ops/cuda_lora.py); this file only implements them.
#include <Python.h>

// The per-op headers of the two ATen functions used, not ATen/ATen.h (every op's declarations).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora_kernels.cuh"
#include "lora_narrow.cuh"
#ifdef FASTLORA_CUTLASS
#include "lora_cutlass.cuh"
#endif

namespace fastlora {
namespace {

using at::Tensor;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}, Tag<TA>{}) with the CUDA element types of the activations (T) and adapters (TA).
template <typename Fn>
void dispatch_dtypes(at::ScalarType x, at::ScalarType adapters, Fn&& fn) {
  const bool fp32_adapters = adapters == at::kFloat;
  switch (x) {
    case at::kHalf:
      return fp32_adapters ? fn(Tag<__half>{}, Tag<float>{}) : fn(Tag<__half>{}, Tag<__half>{});
    case at::kBFloat16:
      return fp32_adapters ? fn(Tag<__nv_bfloat16>{}, Tag<float>{})
                           : fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
    case at::kFloat:
      return fn(Tag<float>{}, Tag<float>{});
    default:
      TORCH_CHECK(false, "fastlora: unsupported dtype ", x);  // unreachable: check_dtypes ran first
  }
}

// at::Half / at::BFloat16 storage is bit-identical to __half / __nv_bfloat16.
template <typename T>
const T* ptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_ptr(Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// Every launcher returns cudaGetLastError() right after its launch (so the error is taken, not left
// pending for a later, unrelated check); a failure raises naming the kernel and the CUDA error.
void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "fastlora: launching the ", kernel, " kernel failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// The kernels read every 2-D operand through its row stride (0 included), so only a non-unit inner
// stride costs a copy.
Tensor unit_inner_stride(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& x, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move all tensors to one device");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// x, weight, lora_A, lora_B: devices, ranks, shapes and dtypes shared by both ops.
void check_common(const char* op, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B) {
  check_tensor(op, "x", x, x, 2);
  check_tensor(op, "weight", weight, x, 2);
  check_tensor(op, "lora_A", lora_A, x, 2);
  check_tensor(op, "lora_B", lora_B, x, 2);
  const int64_t K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  check_shape(op, "weight", weight, {N, K});
  check_shape(op, "lora_A", lora_A, {R, K});
  check_shape(op, "lora_B", lora_B, {N, R});
  TORCH_CHECK(N <= kMaxColumns && K <= kMaxColumns, op, ": in_features and out_features must be at most ",
              kMaxColumns, ", got weight of shape ", weight.sizes());

  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
              ": x must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, op, ": weight's dtype must equal x's dtype ", dtype, ", got ",
              weight.scalar_type());
  const auto adapters = lora_A.scalar_type();
  TORCH_CHECK(adapters == dtype || adapters == at::kFloat, op, ": lora_A must be in x's dtype ", dtype,
              " or float32, got ", adapters);
  TORCH_CHECK(lora_B.scalar_type() == adapters, op, ": lora_B's dtype must equal lora_A's dtype ", adapters,
              ", got ", lora_B.scalar_type());
}

// Splits of a memory-bound pass over `depth` (the reduction) for `tiles` output tiles: at most 4
// blocks per SM (the kernels' residency), each split at least min_depth deep and a whole number of
// 32-deep main-loop steps. Rounded down: one wave, not 1.2 (at M = 8192, K = 4096, r = 16 on 132
// SMs rounding up gave 640 blocks for 528 slots, a last wave of 112 blocks costing a whole block time).
int64_t split_depth(int64_t depth, int64_t tiles, int64_t min_depth) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = std::clamp<int64_t>(4 * sms / std::max<int64_t>(tiles, 1), 1,
                                             std::clamp<int64_t>(depth / min_depth, 1, 65535));
  return wanted == 1 ? 0 : ceil_div(ceil_div(depth, wanted), 32) * 32;
}

// How the M reduction of one gradient is split (the adapter and bias gradients' kernels): split_depth
// over M, at least 256 rows a split, no split empty. A function of the shapes and the device only, so
// a given GPU reproduces its results bit for bit.
struct RowSplits {
  int64_t splits, rows_per_split;
};
RowSplits split_rows(int64_t M, int64_t blocks_per_split) {
  const int64_t depth = split_depth(M, blocks_per_split, 256);
  const int64_t rows = depth > 0 ? depth : std::max<int64_t>(M, 1);  // one split of all M (M = 0: none)
  return {ceil_div(M, rows), rows};
}

// A split sum not launched yet, and the workspace it reads. The backward's gradients queue theirs
// for one launch_sum_splits at the end (one launch, not three); the workspace stays alive until that
// launch is queued: freed earlier, the caching allocator could give its memory to a later workspace
// whose kernel, queued before the sum, would overwrite the partials.
template <typename TO>
struct [[nodiscard]] PendingSum {
  Tensor ws;
  SplitSum<TO> job;  // count 0: nothing to sum
};

template <typename TO>
PendingSum<TO> pending_sum(Tensor ws, int64_t splits, int64_t count, float scaling, Tensor& out) {
  const float* partials = ws.const_data_ptr<float>();
  return {std::move(ws), SplitSum<TO>{partials, splits, count, scaling, mutable_ptr<TO>(out)}};
}

// out[P, Q] = scaling · Σ_m L(m, p) · D(R)(m, q), through an fp32 split-M workspace (no atomics):
// launches the split-M partials, returns their sum.
template <typename TO, typename TL, typename TR>
PendingSum<TO> reduce_rows(const TL* l, int64_t ldl, const TR* r, int64_t ldr, int64_t M, double scaling,
                           const Dropout& r_dropout, Tensor& out, cudaStream_t stream) {
  const int64_t P = out.size(0), Q = out.size(1);
  if (P == 0 || Q == 0) return {};
  const auto [splits, rows] = split_rows(M, ceil_div(P, kTile) * ceil_div(Q, kTile));
  Tensor ws = at::empty({splits, P, Q}, out.options().dtype(at::kFloat));
  check_launch(launch_row_reduce(l, ldl, r, ldr, M, P, Q, r_dropout, splits, rows, ws.mutable_data_ptr<float>(), stream),
               "split-M adapter-gradient reduction (row_reduce)");
  // D(R) = scale · (mask ⊙ R): the kernel applied the mask, the scale joins scaling here.
  const float total_scale = static_cast<float>(scaling) * (r_dropout.p > 0.f ? r_dropout.scale : 1.f);
  return pending_sum<TO>(std::move(ws), splits, P * Q, total_scale, out);
}

// grad_bias[n] = Σ_m gy[m, n]: launches the split-M column sums, returns their sum.
template <typename T>
PendingSum<T> column_sums(const Tensor& gy, Tensor& grad_bias, cudaStream_t stream) {
  const int64_t M = gy.size(0), N = gy.size(1);
  if (N == 0) return {};
  const auto [splits, rows] = split_rows(M, ceil_div(N, kColumnSumThreads));
  Tensor ws = at::empty({splits, N}, gy.options().dtype(at::kFloat));
  check_launch(launch_column_sum(ptr<T>(gy), gy.stride(0), M, N, splits, rows, ws.mutable_data_ptr<float>(), stream),
               "bias-gradient column sum (column_sum)");
  return pending_sum<T>(std::move(ws), splits, N, 1.f, grad_bias);
}

// LoRA dropout of one call (see Dropout in lora_kernels.cuh); the seed is a 0-d int64 CPU tensor.
Dropout make_dropout(const char* op, double dropout_p, const std::optional<Tensor>& seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  Dropout d;
  if (dropout_p == 0.0) return d;
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": dropout_p > 0 needs seed, a one-element int64 tensor");
  d.p = static_cast<float>(dropout_p);
  d.scale = dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.f;
  d.seed = static_cast<uint64_t>(seed->item<int64_t>());
  return d;
}

// Whether the narrow tensor-core kernel (lora_narrow.cu) takes a pass whose wide operand is T and
// narrow one TR: fp16/bf16 activations with a narrow operand of their own type, or bf16 with an fp32
// one (split into two bf16 parts; fp16's range is too small for that split, and fp32 activations
// keep exact FMAs).
template <typename T, typename TR>
constexpr bool kNarrowTakes = (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) &&
                              (std::is_same_v<TR, T> || (std::is_same_v<T, __nv_bfloat16> && std::is_same_v<TR, float>));

// xa[M, R] (fp32) = D(a)[M, K] · the rank-r factor b on the narrow tensor-core kernel (kNarrowTakes):
// blocks of 64 rows by the r columns, split over K like the portable pass below.
template <bool kKContig, typename T, typename TA>
void launch_narrow_rank_gemm(const Tensor& a, const Tensor& b, const Dropout& dropout, Tensor& out,
                             cudaStream_t stream) {
  NarrowParams<T, TA> p{};
  p.U = a.size(0), p.J = out.size(1), p.T_len = a.size(1);
  p.w = ptr<T>(a), p.ldw = a.stride(0);
  p.r = ptr<TA>(b), p.ldr = b.stride(0);
  p.scale = dropout.p > 0.f ? dropout.scale : 1.f;  // D(a)·b = scale · (mask ⊙ a)·b
  p.dropout = dropout, p.dropout_row_len = p.T_len;
  p.t_per_split = split_depth(p.T_len, ceil_div(p.U, kNarrowRows) * ceil_div(p.J, kNarrowCols), 512);
  if (p.t_per_split == 0) {
    p.out = mutable_ptr<float>(out), p.ldo_u = out.stride(0), p.ldo_j = out.stride(1);
    check_launch(launch_narrow_gemm<true, kKContig>(p, stream), "narrow rank-r GEMM (narrow_gemm)");
    return;
  }
  const int64_t splits = ceil_div(p.T_len, p.t_per_split);
  Tensor ws = at::empty({splits, p.U, p.J}, out.options());
  p.out = ws.mutable_data_ptr<float>(), p.ldo_u = p.J, p.ldo_j = 1, p.out_split_stride = p.U * p.J;
  check_launch(launch_narrow_gemm<true, kKContig>(p, stream), "narrow split-K rank-r GEMM (narrow_gemm)");
  check_launch(launch_sum_splits(ws.const_data_ptr<float>(), splits, p.U * p.J, 1.f, mutable_ptr<float>(out), stream),
               "rank-r GEMM split sum (sum_splits)");
}

// The same on the portable kernel (fp16 with fp32 adapters, fp32): 64 × 64 tiles, FMAs for fp32.
template <bool kKContig, typename T, typename TA>
void launch_portable_rank_gemm(const Tensor& a, const Tensor& b, const Dropout& dropout, Tensor& out,
                               cudaStream_t stream) {
  GemmParams<T, TA, float, float> p{};
  p.M = a.size(0), p.N = out.size(1), p.K = a.size(1);
  p.a = ptr<T>(a), p.lda = a.stride(0);
  p.b = ptr<TA>(b), p.ldb = b.stride(0);
  p.dropout = dropout, p.dropout_site = DropoutSite::kA;
  // N = r is one or a few 64-wide column tiles, so M / 64 blocks alone leave most SMs idle while
  // they stream all of a (x or gy: the whole pass is memory-bound): split K until the grid has
  // about 4 blocks per SM, each split at least 512 deep, partials summed in split order
  // (deterministic) from an fp32 workspace of splits · M · r floats.
  p.k_per_split = split_depth(p.K, ceil_div(p.M, kTile) * ceil_div(p.N, kTile), 512);
  if (p.k_per_split == 0) {
    p.out = mutable_ptr<float>(out), p.ldo = out.stride(0);
    check_launch(launch_gemm<kKContig>(p, stream), "portable rank-r GEMM (lora_gemm)");
    return;
  }
  const int64_t splits = ceil_div(p.K, p.k_per_split);
  Tensor ws = at::empty({splits, p.M, p.N}, out.options());
  p.out = ws.mutable_data_ptr<float>(), p.ldo = p.N, p.out_split_stride = p.M * p.N;
  check_launch(launch_gemm<kKContig>(p, stream), "portable split-K rank-r GEMM (lora_gemm)");
  check_launch(launch_sum_splits(ws.const_data_ptr<float>(), splits, p.M * p.N, 1.f, mutable_ptr<float>(out), stream),
               "rank-r GEMM split sum (sum_splits)");
}

// xa[M, R] (fp32) = D(a)[M, K] · the rank-r factor b, D applied to a's elements when dropout.p > 0:
// x Aᵀ in the forward (b = A [R, K], k-contiguous), gy B in the backward (b = B [N, R], no dropout).
// out is a fresh contiguous fp32 tensor.
template <bool kKContig, typename T, typename TA>
void launch_rank_gemm(const Tensor& a, const Tensor& b, const Dropout& dropout, Tensor& out, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat);
  if constexpr (kNarrowTakes<T, TA>) {
    launch_narrow_rank_gemm<kKContig, T, TA>(a, b, dropout, out, stream);
  } else {
    launch_portable_rank_gemm<kKContig, T, TA>(a, b, dropout, out, stream);
  }
}

// An adapter gradient out[P, Q] (TO) = scaling · Σ_m over a wide bf16 operand (x or gy) and a
// narrow fp32 one (g_xa or xa), on the narrow tensor-core kernel:
//   grad_A[r, k] = scaling · Σ_m g_xa[m, r] D(x)[m, k]   (wide_is_p = false: u = k is out's column)
//   grad_B[n, r] = scaling · Σ_m gy[m, n] xa[m, r]       (wide_is_p = true: u = n is out's row)
// Split over M like reduce_rows (split_rows); launches the partials and returns their sum (in split
// order: deterministic, with the scale and the cast to TO).
// With col_sum (grad_B's call; [P] in the wide operand's dtype), the same pass also gives
// col_sum[n] = Σ_m gy[m, n], the bias gradient, from the gy tiles it has loaded anyway: one read of
// gy (64 MiB at M = 8192, N = 4096) and one launch fewer than a separate column sum; its sum is the
// second result.
template <typename TO, typename T>
std::pair<PendingSum<TO>, PendingSum<T>> narrow_reduce_rows(const T* wide, int64_t ld_wide, const float* narrow,
                                                            int64_t ld_narrow, int64_t M, double scaling,
                                                            const Dropout& wide_dropout, bool wide_is_p, Tensor& out,
                                                            Tensor* col_sum, cudaStream_t stream) {
  const int64_t P = out.size(0), Q = out.size(1);
  if (P == 0 || Q == 0) return {};  // (col_sum not queued either: the caller's column_sums takes r = 0)
  NarrowParams<T, float> p{};
  // u is the wide operand's column index: k (grad_A, out[j = r][u = k]) or n (grad_B, out[u = n][j = r]).
  p.U = wide_is_p ? P : Q, p.J = wide_is_p ? Q : P, p.T_len = M;
  p.w = wide, p.ldw = ld_wide;
  p.r = narrow, p.ldr = ld_narrow;
  p.scale = 1.f;
  p.dropout = wide_dropout, p.dropout_row_len = p.U;  // x's element (m, k) has counter m · K + k
  const auto [splits, rows] = split_rows(M, ceil_div(p.U, kNarrowRows) * ceil_div(p.J, kNarrowCols));
  p.t_per_split = splits == 1 ? 0 : rows;  // split rows are a multiple of 32; M = 0: no split, no launch
  Tensor ws = at::empty({splits, P, Q}, out.options().dtype(at::kFloat));
  p.out = ws.mutable_data_ptr<float>(), p.out_split_stride = P * Q;
  p.ldo_u = wide_is_p ? Q : 1, p.ldo_j = wide_is_p ? 1 : Q;
  Tensor col_ws;
  if (col_sum != nullptr) {
    TORCH_INTERNAL_ASSERT(wide_is_p && wide_dropout.p == 0.f && col_sum->numel() == P);
    col_ws = at::empty({splits, P}, out.options().dtype(at::kFloat));
    p.col_sum = col_ws.mutable_data_ptr<float>(), p.col_sum_split_stride = P;
  }
  check_launch(launch_narrow_gemm<false, false>(p, stream), "narrow split-M adapter-gradient reduction (narrow_gemm)");
  // D(x) = scale · (mask ⊙ x): the kernel applied the mask, the scale joins scaling here.
  const float total_scale = static_cast<float>(scaling) * (wide_dropout.p > 0.f ? wide_dropout.scale : 1.f);
  std::pair<PendingSum<TO>, PendingSum<T>> sums;
  sums.first = pending_sum<TO>(std::move(ws), splits, P * Q, total_scale, out);
  if (col_sum != nullptr) sums.second = pending_sum<T>(std::move(col_ws), splits, P, 1.f, *col_sum);
  return sums;
}

// out = a · b + scaling · D(xa · l) + bias, the fused kernel: y = x Wᵀ + s·xa Bᵀ + bias in the forward
// (kKContig: W and B read as stored), grad_x = gy W + s·D(g_xa A) in the backward (W and A read
// untransposed). bias may be undefined; D applies to the low-rank term when dropout.p > 0.
template <bool kKContig, typename T, typename TA>
void launch_fused(const Tensor& a, const Tensor& b, const Tensor& xa, const Tensor& l, const Tensor& bias,
                  double scaling, const Dropout& dropout, Tensor& out, cudaStream_t stream) {
  GemmParams<T, T, TA, T> p{};
  p.M = a.size(0), p.N = out.size(1), p.K = a.size(1);
  p.a = ptr<T>(a), p.lda = a.stride(0);
  p.b = ptr<T>(b), p.ldb = b.stride(0);
  p.R = xa.size(1), p.xa = ptr<float>(xa), p.ldxa = xa.stride(0);
  p.l = ptr<TA>(l), p.ldl = l.stride(0);
  p.scaling = static_cast<float>(scaling);
  p.bias = bias.defined() ? ptr<T>(bias) : nullptr;
  p.out = mutable_ptr<T>(out), p.ldo = out.stride(0);
  p.dropout = dropout, p.dropout_site = DropoutSite::kLowRank;
  check_launch(launch_gemm<kKContig>(p, stream), "portable fused LoRA GEMM (lora_gemm)");
}

// Which kernel computes out = a · bᵀ + [s·xa rounded to T] · lᵀ (+ bias), for a [M, K] (x, or gy in
// grad_x), b_nk the [N, K] right operand as a view (W, or Wᵀ in grad_x), rank r, and out [M, N]:
//   kSm90: the TMA + wgmma kernel, on compute capability 9.0 when the build has sm_90a;
//   kSm80: the cp.async + mma.sync kernel, on any other compute capability >= 8.0;
//   kPortable: the WMMA/FMA kernel of lora_kernels.cu, for everything the CUTLASS kernels cannot
//     take: fp32, K = 0 or r = 0, sizes >= 2^31, and operands off the 16-byte vector contract
//     (a base pointer not 16-byte aligned, an inner stride other than 1 in both of b's layouts, a
//     leading dimension or a contiguous extent K, N not a multiple of 8 elements).
// A pure function of the device and the tensors' metadata (no device access), so it is unit-tested
// on the CPU; DESIGN.md has the table. The callers also keep grad_x with dropout on kPortable (the
// mask applies to the low-rank term alone, which shares the CUTLASS kernels' accumulator).
enum class GemmPath : int64_t { kPortable = 0, kSm80 = 1, kSm90 = 2 };
constexpr int64_t kVecElems = 8;  // 16 bytes of fp16/bf16: one TMA or cp.async vector

// (A row stride of 0, as an expanded gradient has, is not a valid TMA stride.)
bool vector_ready(const Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) > 0 && t.stride(0) % kVecElems == 0 && t.size(1) % kVecElems == 0 &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// b_nk as the CUTLASS kernels read it: itself when its rows are contiguous (K-major), else its
// transpose (N-major), so that a transposed W (GPT-2's Conv1D) is read in place.
bool k_major(const Tensor& b_nk) { return b_nk.stride(1) == 1; }
Tensor stored(const Tensor& b_nk) { return k_major(b_nk) ? b_nk : b_nk.t(); }

GemmPath choose_gemm_path(int64_t major, int64_t minor, bool sm90a_built, const Tensor& a, const Tensor& b_nk,
                          int64_t R, const Tensor& bias, const Tensor& out) {
  const auto dtype = a.scalar_type();
  const int64_t M = a.size(0), K = a.size(1), N = b_nk.size(0);
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || b_nk.scalar_type() != dtype || major < 8) {
    return GemmPath::kPortable;
  }
  if (K == 0 || R == 0 || std::max({M, N, K}) >= (int64_t{1} << 31)) return GemmPath::kPortable;
  if (!vector_ready(a) || !vector_ready(stored(b_nk)) || !vector_ready(out)) return GemmPath::kPortable;
  if (bias.defined() && reinterpret_cast<uintptr_t>(bias.const_data_ptr()) % 16 != 0) return GemmPath::kPortable;
  return major == 9 && minor == 0 && sm90a_built ? GemmPath::kSm90 : GemmPath::kSm80;
}

#ifdef FASTLORA_SM90A
constexpr bool kSm90aBuilt = true;
#else
constexpr bool kSm90aBuilt = false;
#endif

// The operands of the CUTLASS kernels' LoRA K-blocks, for xa [M, r] fp32 and l_nr, the [N, r]
// rank-r factor as a view (B in the forward, Aᵀ in grad_x): a_ext [M, D] and b_ext in b's layout
// ([N, D] K-major, else [D, N]) with a_ext · b_extᵀ = s · xa · l_nrᵀ to ~2⁻¹⁶ relative. Rounding
// s·xa once to fp16/bf16 would cost the low-rank term 2⁻⁹ (bf16) relative, more than the 1e-2 budget
// where it cancels against x Wᵀ (the fuzzer's cases), so it is split into hi + lo parts, each
// multiplied by l: D = 2r (3r with fp32 adapters, whose l is split the same way: hi·hi + hi·lo +
// lo·hi), padded with zeros to a multiple of 8. At r ≤ 32 that is still one 64-deep K-block.
// M·D and N·D elements: small next to the GEMM.
//
// fp16's range: s·xa is kept in fp32 by the portable kernel, so |s·xa| beyond 65504 must not overflow
// here either. In fp16, column j of s·xa whose largest magnitude is 2^14 or more is scaled by 2^-e_j
// into [-2^14, 2^14] and column j of l by 2^e_j (a_ext · b_extᵀ unchanged; powers of two, so exact
// while l·2^e_j stays in range: that overflows only where one rank-1 term s·xa[m, j]·l[n, j] alone
// is beyond fp16, i.e. where y overflows anyway). Other columns, and bf16 (fp32's exponent range),
// are not scaled, so their operands are bit for bit what they were.
//
// One kernel (launch_lora_ext: the scale, the hi/lo split, the casts, the concatenation, the zero
// padding and b's layout in one pass over M·D + N·D elements) into two at::empty outputs; in fp16 one
// reduction before it, the column maxima of |xa|. (It was 10-12 ATen kernels in bf16, ~18 in fp16.)
std::tuple<Tensor, Tensor> lora_blocks(const Tensor& xa_in, const Tensor& l_nr, double scaling, at::ScalarType dtype,
                                       bool k_major_b, cudaStream_t stream) {
  const Tensor xa = unit_inner_stride(xa_in);
  const int64_t M = xa.size(0), N = l_nr.size(0), R = xa.size(1);
  const int parts = l_nr.scalar_type() == dtype ? 2 : 3;
  const int64_t D = ceil_div(parts * R, kVecElems) * kVecElems;
  const auto options = xa.options().dtype(dtype);
  Tensor a_ext = at::empty({M, D}, options);
  Tensor b_ext = k_major_b ? at::empty({N, D}, options) : at::empty({D, N}, options);
  Tensor col_max;
  if (dtype == at::kHalf && M > 0 && R > 0) col_max = at::linalg_vector_norm(xa, INFINITY, {0}, false, at::kFloat);
  auto launch = [&](auto t, auto ta) {
    using T = typename decltype(t)::type;
    using TA = typename decltype(ta)::type;
    LoRAExtParams<T, TA> p{};
    p.M = M, p.N = N, p.R = R, p.D = D, p.parts = parts;
    p.xa = ptr<float>(xa), p.ldxa = xa.stride(0);
    p.l = ptr<TA>(l_nr), p.l_sn = l_nr.stride(0), p.l_sr = l_nr.stride(1);
    p.scaling = static_cast<float>(scaling);
    p.col_max = col_max.defined() ? ptr<float>(col_max) : nullptr;
    p.a_ext = mutable_ptr<T>(a_ext), p.lda_ext = a_ext.stride(0);
    p.b_ext = mutable_ptr<T>(b_ext), p.ldb_ext = b_ext.stride(0);
    p.b_k_major = k_major_b;
    check_launch(launch_lora_ext(p, stream), "CUTLASS K-block operands (lora_ext)");
  };
  const bool fp32_adapters = parts == 3;
  if (dtype == at::kHalf) {
    fp32_adapters ? launch(Tag<__half>{}, Tag<float>{}) : launch(Tag<__half>{}, Tag<__half>{});
  } else {
    fp32_adapters ? launch(Tag<__nv_bfloat16>{}, Tag<float>{}) : launch(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
  }
  return {a_ext, b_ext};
}

#ifdef FASTLORA_CUTLASS
// What the host does with a CUTLASS launcher's outcome (a pure function, unit-tested on the CPU):
// kLaunched: done (true); kRejected: nothing was launched, take the portable kernel (false); a
// failed launch raises, naming the kernel, the problem and the CUDA error.
bool cutlass_outcome(const CutlassLaunch& r, const char* kernel, const LoRAGemmArgs& p) {
  if (r.status == CutlassStatus::kLaunched) return true;
  TORCH_CHECK(r.status == CutlassStatus::kRejected, "fastlora: launching the ", kernel, " kernel (M=", p.M, ", N=", p.N,
              ", K=", p.K, ", LoRA depth ", p.R, ") failed: ", cudaGetErrorName(r.error), " (", cudaGetErrorString(r.error),
              ")");
  TORCH_WARN_ONCE("fastlora: the ", kernel, " kernel rejected a problem fastlora's checks accepted (M=", p.M, ", N=", p.N,
                  ", K=", p.K, ", LoRA depth ", p.R, ", CUTLASS status ", r.cutlass_status, ", CUDA ",
                  cudaGetErrorName(r.error), "); the portable kernel computes it instead (slower). Please report it.");
  return false;
}

// Runs the CUTLASS kernel choose_gemm_path picked (not kPortable): out = a · b_nkᵀ + s·xa · l_nrᵀ
// + bias, the low-rank term as the K-blocks of lora_blocks. Returns false, having launched nothing
// but lora_blocks' kernels (whose outputs are then unused), when CUTLASS rejects the problem: the caller then takes the
// portable kernel.
bool run_cutlass(GemmPath path, const Tensor& a, const Tensor& b_nk, const Tensor& xa, const Tensor& l_nr,
                 const Tensor& bias, double scaling, Tensor& out, cudaStream_t stream) {
  const bool kmaj = k_major(b_nk);
  const Tensor b = stored(b_nk);
  const auto [a_ext, b_ext] = lora_blocks(xa, l_nr, scaling, a.scalar_type(), kmaj, stream);
  LoRAGemmArgs p{};
  p.M = a.size(0), p.N = b_nk.size(0), p.K = a.size(1), p.R = a_ext.size(1);
  p.a = a.const_data_ptr(), p.lda = a.stride(0);
  p.a_ext = a_ext.const_data_ptr(), p.lda_ext = a_ext.stride(0);
  p.b = b.const_data_ptr(), p.ldb = b.stride(0);
  p.b_ext = b_ext.const_data_ptr(), p.ldb_ext = b_ext.stride(0);
  p.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr(), p.ldo = out.stride(0);
  p.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  const bool half = a.scalar_type() == at::kHalf;
  const bool sm90 = path == GemmPath::kSm90;
  // e.g. "CUTLASS sm90 LoRA GEMM (bf16, W K-major)"
  static constexpr const char* kNames[2][2][2] = {
      {{"CUTLASS sm80 LoRA GEMM (bf16, W N-major)", "CUTLASS sm80 LoRA GEMM (bf16, W K-major)"},
       {"CUTLASS sm80 LoRA GEMM (fp16, W N-major)", "CUTLASS sm80 LoRA GEMM (fp16, W K-major)"}},
      {{"CUTLASS sm90 LoRA GEMM (bf16, W N-major)", "CUTLASS sm90 LoRA GEMM (bf16, W K-major)"},
       {"CUTLASS sm90 LoRA GEMM (fp16, W N-major)", "CUTLASS sm90 LoRA GEMM (fp16, W K-major)"}}};
  auto launch = [&](auto tag) -> CutlassLaunch {
    using T = typename decltype(tag)::type;
#ifdef FASTLORA_SM90A
    if (sm90) {
      return kmaj ? launch_lora_gemm_sm90<T, true>(p, stream) : launch_lora_gemm_sm90<T, false>(p, stream);
    }
#endif
    return kmaj ? launch_lora_gemm_sm80<T, true>(p, stream) : launch_lora_gemm_sm80<T, false>(p, stream);
  };
  const CutlassLaunch result = half ? launch(Tag<__half>{}) : launch(Tag<__nv_bfloat16>{});
  return cutlass_outcome(result, kNames[sm90][half][kmaj], p);
}

// choose_gemm_path for the current device.
GemmPath device_gemm_path(const Tensor& a, const Tensor& b_nk, int64_t R, const Tensor& bias, const Tensor& out) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return choose_gemm_path(props->major, props->minor, kSm90aBuilt, a, b_nk, R, bias, out);
}
#endif

std::tuple<Tensor, Tensor> cuda_forward(const Tensor& x_in, const Tensor& weight_in,
                                        const std::optional<Tensor>& bias_in, const Tensor& lora_A_in,
                                        const Tensor& lora_B_in, double scaling, double dropout_p,
                                        const std::optional<Tensor>& seed) {
  constexpr const char* op = "fastlora::cuda_forward";
  check_common(op, x_in, weight_in, lora_A_in, lora_B_in);
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  const int64_t M = x_in.size(0), N = weight_in.size(0), R = lora_A_in.size(0);
  Tensor bias;
  if (bias_in.has_value()) {
    check_tensor(op, "bias", *bias_in, x_in, 1);
    check_shape(op, "bias", *bias_in, {N});
    TORCH_CHECK(bias_in->scalar_type() == x_in.scalar_type(), op, ": bias's dtype must equal x's dtype ",
                x_in.scalar_type(), ", got ", bias_in->scalar_type());
    bias = bias_in->contiguous();
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_inner_stride(x_in);
  const Tensor lora_A = unit_inner_stride(lora_A_in), lora_B = unit_inner_stride(lora_B_in);
  Tensor y = at::empty({M, N}, x.options());
  Tensor xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_dtypes(x.scalar_type(), lora_A.scalar_type(), [&](auto t, auto ta) {
    using T = typename decltype(t)::type;
    using TA = typename decltype(ta)::type;
    // xa = D(x) Aᵀ, kept in fp32: the main kernel's epilogue and the backward both read it.
    launch_rank_gemm<true, T, TA>(x, lora_A, dropout, xa, stream);
    // y = x Wᵀ + scaling · xa Bᵀ + bias (dropout already applied inside xa). The CUTLASS kernels read
    // W in place in either layout (GPT-2's Conv1D passes a transposed view); the portable one needs
    // unit inner stride.
#ifdef FASTLORA_CUTLASS
    if (const GemmPath path = device_gemm_path(x, weight_in, R, bias, y);
        path != GemmPath::kPortable && run_cutlass(path, x, weight_in, xa, lora_B, bias, scaling, y, stream)) {
      return;
    }
#endif
    launch_fused<true, T, TA>(x, unit_inner_stride(weight_in), xa, lora_B, bias, scaling, Dropout{}, y, stream);
  });
  return {y, xa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_backward(const Tensor& gy_in, const Tensor& x_in,
                                                         const Tensor& xa_in, const Tensor& weight_in,
                                                         const Tensor& lora_A_in, const Tensor& lora_B_in,
                                                         double scaling, double dropout_p,
                                                         const std::optional<Tensor>& seed, bool need_x, bool need_A,
                                                         bool need_B, bool need_bias) {
  constexpr const char* op = "fastlora::cuda_backward";
  check_common(op, x_in, weight_in, lora_A_in, lora_B_in);
  const Dropout dropout = make_dropout(op, dropout_p, seed);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0), R = lora_A_in.size(0);
  check_tensor(op, "gy", gy_in, x_in, 2);
  check_shape(op, "gy", gy_in, {M, N});
  TORCH_CHECK(gy_in.scalar_type() == x_in.scalar_type(), op, ": gy's dtype must equal x's dtype ",
              x_in.scalar_type(), ", got ", gy_in.scalar_type());
  check_tensor(op, "xa", xa_in, x_in, 2);
  check_shape(op, "xa", xa_in, {M, R});
  TORCH_CHECK(xa_in.scalar_type() == at::kFloat, op, ": xa must be float32 (as cuda_forward returns it), got ",
              xa_in.scalar_type());

  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor gy = unit_inner_stride(gy_in), x = unit_inner_stride(x_in), xa = unit_inner_stride(xa_in);
  const Tensor lora_A = unit_inner_stride(lora_A_in), lora_B = unit_inner_stride(lora_B_in);
  auto maybe_empty = [](bool needed, const Tensor& like, at::IntArrayRef shape) {
    return needed ? at::empty(shape, like.options()) : at::empty({0}, like.options());
  };
  Tensor grad_x = maybe_empty(need_x, x, {M, K});
  Tensor grad_A = maybe_empty(need_A, lora_A, {R, K});
  Tensor grad_B = maybe_empty(need_B, lora_B, {N, R});
  Tensor grad_bias = maybe_empty(need_bias, x, {N});
  if (M == 0) {  // sums over no rows
    grad_A.zero_();
    grad_B.zero_();
    grad_bias.zero_();
    return {grad_x, grad_A, grad_B, grad_bias};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_dtypes(x.scalar_type(), lora_A.scalar_type(), [&](auto t, auto ta) {
    using T = typename decltype(t)::type;
    using TA = typename decltype(ta)::type;
    // g_xa = gy B in fp32: the low-rank operand of grad_x and the left factor of grad_A.
    Tensor g_xa;
    if (need_x || need_A) {
      g_xa = at::empty({M, R}, x.options().dtype(at::kFloat));
      launch_rank_gemm<false, T, TA>(gy, lora_B, Dropout{}, g_xa, stream);
    }
    // grad_x = gy W + scaling · D(g_xa A): the forward's kernel with W and A read untransposed.
    if (need_x) {
      bool done = false;
#ifdef FASTLORA_CUTLASS
      // (Dropout's mask applies to the low-rank term alone, which shares the CUTLASS accumulator.)
      const GemmPath path = dropout.p == 0.f ? device_gemm_path(gy, weight_in.t(), R, Tensor(), grad_x) : GemmPath::kPortable;
      done = path != GemmPath::kPortable &&
             run_cutlass(path, gy, weight_in.t(), g_xa, lora_A.t(), Tensor(), scaling, grad_x, stream);
#endif
      if (!done) {
        launch_fused<false, T, TA>(gy, unit_inner_stride(weight_in), g_xa, lora_A, Tensor(), scaling, dropout, grad_x,
                                   stream);
      }
    }
    // grad_A[r, k] = scaling · Σ_m g_xa[m, r] D(x)[m, k]
    // grad_B[n, r] = scaling · Σ_m gy[m, n] xa[m, r]   (xa already holds D(x) Aᵀ)
    // grad_bias[n] = Σ_m gy[m, n]
    // Each launches its split-M partials here; the three split sums go in one launch at the end.
    // bf16 runs grad_A and grad_B on the narrow tensor-core kernel (g_xa and xa enter as bf16 hi + lo
    // parts), and with grad_B needed its pass gives the bias gradient too; fp16 (whose range cannot
    // hold that split) and fp32 keep the exact FMA reductions.
    PendingSum<TA> sum_A, sum_B;
    PendingSum<T> sum_bias;  // from grad_B's narrow pass where it ran, else column_sums below
    if constexpr (kNarrowTakes<T, float>) {
      if (need_A) {
        sum_A = narrow_reduce_rows<TA>(ptr<T>(x), x.stride(0), ptr<float>(g_xa), R, M, scaling, dropout, false, grad_A,
                                       nullptr, stream)
                    .first;
      }
      if (need_B) {
        std::tie(sum_B, sum_bias) = narrow_reduce_rows<TA>(ptr<T>(gy), gy.stride(0), ptr<float>(xa), xa.stride(0), M,
                                                           scaling, Dropout{}, true, grad_B,
                                                           need_bias ? &grad_bias : nullptr, stream);
      }
    } else {
      if (need_A) sum_A = reduce_rows<TA>(ptr<float>(g_xa), R, ptr<T>(x), x.stride(0), M, scaling, dropout, grad_A, stream);
      if (need_B) {
        sum_B = reduce_rows<TA>(ptr<T>(gy), gy.stride(0), ptr<float>(xa), xa.stride(0), M, scaling, Dropout{}, grad_B,
                                stream);
      }
    }
    if (need_bias && sum_bias.job.count == 0) sum_bias = column_sums<T>(gy, grad_bias, stream);  // (N = 0: nothing)
    check_launch(launch_sum_splits(sum_A.job, sum_B.job, sum_bias.job, stream),
                 "adapter- and bias-gradient split sums (sum_splits)");
  });
  return {grad_x, grad_A, grad_B, grad_bias};
}

}  // namespace
}  // namespace fastlora

// The dispatcher accepts kernels for ops not yet defined: loading this library before or after
// fastlora.ops.cuda_lora defines them from the shared schemas both work.
TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  m.impl("cuda_forward", &fastlora::cuda_forward);
  m.impl("cuda_backward", &fastlora::cuda_backward);
}

// `import fastlora._C` loads this library, whose static initialiser above registers the kernels; the
// Python module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
