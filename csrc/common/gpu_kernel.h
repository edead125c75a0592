// What a kernel header (csrc/ops/<family>/<family>_kernels.cuh) needs to compile both for the GPU
// (nvcc) and for the SIMT emulator (host compiler with LTFAST_SIMT, csrc/simt/): the launch call,
// the stream type and __shared__ arrays. Kernel headers hold no torch glue.
#pragma once

#include <c10/macros/Macros.h>

#include <source_location>
#include <utility>

#if defined(LTFAST_SIMT)
#include "../simt/simt.h"

namespace ltfast {
namespace gpu {
using Stream = simt::Stream;
using simt::dim3;

// kernel<<<grid, block, 0, stream>>>(args...), run to completion by the emulator.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block, Stream /*stream*/,
            Args&&... args) {
  simt::launch(kernel_name, std::source_location::current(), kernel, grid, block, std::forward<Args>(args)...);
}
}  // namespace gpu
}  // namespace ltfast

// A __shared__ array of `count` elements of T (a scalar is an array of 1): poisoned per block and
// checked for reads before writes by the emulator.
#define LTFAST_SHARED_ARRAY(T, name, count) LTFAST_SIMT_SHARED_ARRAY(T, name, count)
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace ltfast {
namespace gpu {
using Stream = cudaStream_t;
using ::dim3;

// kernel<<<grid, block, 0, stream>>>(args...) and the launch error check. `kernel_name` names the
// kernel in the emulator's reports.
template <typename... Params, typename... Args>
void launch(const char* /*kernel_name*/, void (*kernel)(Params...), dim3 grid, dim3 block, Stream stream,
            Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace gpu
}  // namespace ltfast

#define LTFAST_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#endif
