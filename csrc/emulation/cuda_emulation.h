// A CPU stand-in for the CUDA features lora_kernels.cu and lora_narrow.cu use, so that the kernels and host code of
// csrc/ can be compiled by a host compiler and checked without a GPU (tests/test_cuda_emulation.py).
//
// Blocks run one after another, each as blockDim.x std::threads with a std::barrier for
// __syncthreads, so a missing barrier or a thread-indexing error shows up as a wrong result. WMMA
// fragments hold the whole 16 x 16 tile in every lane (loads and MMAs are done redundantly per lane,
// stores by lane 0), and load/store assert the API's rules: 32-byte-aligned pointers, ldm a
// multiple of 16 bytes. It checks indexing, predication, layouts and synchronisation, not the
// hardware: timing, real fragment layouts and memory-model subtleties need a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <vector>

#include "emulation/launch_count.h"

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one instance per kernel, shared by the threads of the running block
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

#define EMULATION_CHECK(cond)                                                                  \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "CUDA emulation: %s failed at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)

namespace emulation {
inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

// kernel<<<grid, block>>>(args) becomes launch(grid, block, [&] { kernel(args); }).
template <class Body>
void launch(dim3 grid, dim3 block, Body&& body) {
  EMULATION_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535);
  EMULATION_CHECK(block.x >= 1 && block.x <= 1024 && block.y == 1 && block.z == 1);
  ++launch_count;
  grid_dim = grid;
  block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> barrier(block.x);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block.x; ++t)
          threads.emplace_back([&, t, x, y, z] {
            thread_idx = {t, 0, 0};
            block_idx = {x, y, z};
            body();
          });
        for (auto& thread : threads) thread.join();
      }
}
}  // namespace emulation

#define threadIdx emulation::thread_idx
#define blockIdx emulation::block_idx
#define blockDim emulation::block_dim
#define gridDim emulation::grid_dim
#define __syncthreads() emulation::block_barrier->arrive_and_wait()
#define cudaGetLastError() cudaSuccess

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the 16x16x16 shape is emulated");
  float v[16][16];  // (row, column) of the fragment's matrix
};

inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  EMULATION_CHECK(reinterpret_cast<uintptr_t>(p) % 32 == 0);
  EMULATION_CHECK(ldm * sizeof(T) % 16 == 0);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = widen(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (auto& row : f.v)
    for (auto& e : row) e = value;
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i][j];
      for (int k = 0; k < 16; ++k) sum = std::fma(a.v[i][k], b.v[k][j], sum);
      out[i][j] = sum;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  EMULATION_CHECK(reinterpret_cast<uintptr_t>(p) % 32 == 0);
  EMULATION_CHECK(ldm % 4 == 0);
  EMULATION_CHECK(layout == mem_row_major);
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.v[i][j];
}
}  // namespace nvcuda::wmma
