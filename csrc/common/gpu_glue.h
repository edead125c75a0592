// Torch glue of the CUDA backends (csrc/ops/<family>/<family>_cuda.cu): the stream, the device
// guard and the kernel registration. The same .cu file is compiled by nvcc into ltfast._C, where it
// registers CUDA kernels of the ltfast ops, and, with LTFAST_SIMT, by the host compiler into the
// test-only SIMT library, where it registers CPU kernels of the mirror ops ltfast_simt::* that run
// the very same launch plans and kernel bodies in the emulator, each under every schedule.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "gpu_kernel.h"

#if defined(LTFAST_SIMT)
#include "../simt/scheduled.h"

namespace ltfast {
namespace gpu {
inline Stream current_stream() { return Stream{}; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device& /*device*/) {}
};
}  // namespace gpu
}  // namespace ltfast

#define LTFAST_GPU_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(ltfast_simt, CPU, m)
#define LTFAST_GPU_IMPL(m, name, function) m.impl(name, &::ltfast::simt::Scheduled<function>::call)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace ltfast {
namespace gpu {
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
}  // namespace gpu
}  // namespace ltfast

#define LTFAST_GPU_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(ltfast, CUDA, m)
#define LTFAST_GPU_IMPL(m, name, function) m.impl(name, function)
#endif
