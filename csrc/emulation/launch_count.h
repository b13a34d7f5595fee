// The emulation's count of kernel launches (emulation::launch increments it), in a header of its own
// so that the host code's test hooks (tests/test_cuda_emulation.py) read the same inline variable
// without including cuda_emulation.h's CUDA keyword macros.
#pragma once

#include <cstdint>

namespace emulation {
inline int64_t launch_count = 0;
}  // namespace emulation
