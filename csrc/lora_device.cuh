// Device helpers shared by the kernel files of csrc/ (lora_kernels.cu, lora_narrow.cu): element
// conversions and the two-part split of fp32 values, LoRA dropout's keep bit and the predicated tile
// copy into shared memory. No torch
// headers; every function is inline, so each .cu file carries its own copy.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lora_kernels.cuh"

namespace fastlora {
namespace device {

constexpr int kThreads = 128;  // 4 warps per block, in every kernel that uses TileCopy

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    static_assert(std::is_same_v<T, float>, "element types are __half, __nv_bfloat16 and float");
    return v;
  }
}

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else {
    return from_float<To>(to_float(v));
  }
}

// The two-part split of an fp32 value v into T (the narrow kernel's fp32 operands, the CUTLASS
// K-blocks' s·xa and fp32 adapters): hi + lo carries v to ~2⁻¹⁶ relative in bf16, products with
// fp16/bf16 operands exact in fp32. bf16 truncates hi: rounding a finite v near fp32's maximum up
// to bf16's inf made hi + lo = inf − inf = NaN. fp16's callers keep v in range (lora_ext's column
// scaling); where hi is not finite anyway (v infinite or NaN, or beyond fp16), lo is 0, so the sum
// is hi's ±inf or NaN, as an fp32 FMA would give.
template <typename T>
__device__ __forceinline__ T split_hi(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rz(v);
  } else {
    return from_float<T>(v);
  }
}
template <typename T>
__device__ __forceinline__ T split_lo(float v, T hi) {
  const float h = to_float(hi);
  return from_float<T>(fabsf(h) <= 3.4028235e38f ? v - h : 0.f);  // false for inf and NaN
}

// LoRA dropout's keep bit for one counter: the counter-th output of splitmix64 seeded with d.seed (a
// strong 64-bit mix, so neighbouring counters are independent), its top 24 bits as u in [0, 1).
__device__ __forceinline__ bool dropout_keep(const Dropout& d, int64_t counter) {
  uint64_t z = d.seed + 0x9e3779b97f4a7c15ull * (static_cast<uint64_t>(counter) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f >= d.p;
}

// Moves an OUTER x INNER tile of a global matrix G(o, c) = g[o * ld + c] (inner index contiguous) into
// shared memory as S, zero outside o < outer_end, c < inner_end: every load is predicated, so any
// shape is safe. Consecutive threads take consecutive c, so global loads and shared stores coalesce;
// each thread keeps one column c = tid % INNER and walks rows tid / INNER + q * kRowStep, so its
// addresses are one base pointer plus multiples of ld * kRowStep.
// fetch() and store() are separate so that the next tile's global loads are in flight while the
// current tile is consumed (register double-buffering).
template <typename S, int OUTER, int INNER>
struct TileCopy {
  static_assert(kThreads % INNER == 0 && OUTER % (kThreads / INNER) == 0, "a tile must split evenly over the block");
  static constexpr int kRowStep = kThreads / INNER;
  static constexpr int kPerThread = OUTER / kRowStep;
  S v[kPerThread];

  template <typename G>
  __device__ __forceinline__ void fetch(const G* __restrict__ g, int64_t ld, int64_t outer0, int64_t outer_end,
                                        int64_t inner0, int64_t inner_end) {
    const int64_t o = outer0 + threadIdx.x / INNER;
    const int64_t c = inner0 + threadIdx.x % INNER;
    // Element q is in range iff q * kRowStep < rows: one small-int compare each. (Predicating with
    // 64-bit compares per element cost ~120 registers once the loads overlap the tensor-core math.)
    const int rows = c < inner_end ? static_cast<int>(max64(min64(outer_end - o, OUTER), 0)) : 0;
    const G* src = g + o * ld + c;  // dereferenced only in range
    const int64_t step = ld * kRowStep;
#pragma unroll
    for (int q = 0; q < kPerThread; ++q, src += step) {
      v[q] = q * kRowStep < rows ? convert<S>(*src) : from_float<S>(0.f);
    }
  }

  // Zeroes the fetched elements that dropout drops; element (o, c) has counter o * row_len + c.
  __device__ __forceinline__ void drop(const Dropout& d, int64_t row_len, int64_t outer0, int64_t inner0) {
    const int64_t o = outer0 + threadIdx.x / INNER;
    const int64_t c = inner0 + threadIdx.x % INNER;
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      if (!dropout_keep(d, (o + q * kRowStep) * row_len + c)) v[q] = from_float<S>(0.f);
    }
  }

  __device__ __forceinline__ void store(S* s, int ld) const {
    S* dst = s + (threadIdx.x / INNER) * ld + threadIdx.x % INNER;
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) dst[q * kRowStep * ld] = v[q];
  }
};

}  // namespace device
}  // namespace fastlora
