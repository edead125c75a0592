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
// The emulator's one stream has one counter (simt.h, ticket_counter; null while a test forces the
// finish kernels).
inline unsigned int* ticket_counter(Stream /*stream*/) { return simt::ticket_counter(); }
}  // namespace gpu
}  // namespace ltfast

#define LTFAST_GPU_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(ltfast_simt, CPU, m)
#define LTFAST_GPU_IMPL(m, name, function) m.impl(name, &::ltfast::simt::Scheduled<function>::call)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <mutex>
#include <utility>

namespace ltfast {
namespace gpu {
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;

// The ticket counter of the current device and `stream` (gpu_reduce::took_last_ticket): one
// unsigned int in device memory per (device, stream), zeroed on that stream when first asked for
// and kept for the life of the process (4 bytes per stream; PyTorch's streams come from fixed
// pools). One counter per stream is enough because the kernels of a stream run one after another
// and each returns the counter to 0 (atomicInc wraps at its last ticket). nullptr, and the launch
// plans then run the two-launch path (row kernel, then the finish kernel), while the stream is
// being captured into a CUDA graph: a graph may be replayed on any stream, next to other work on
// the stream the counter belongs to. Likewise for cudaStreamPerThread, one handle for a different
// stream in each host thread.
inline unsigned int* ticket_counter(Stream stream) {
  if (stream == cudaStreamPerThread) return nullptr;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return nullptr;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<int, Stream>, unsigned int*> counters;
  const std::lock_guard<std::mutex> lock(mutex);
  unsigned int*& counter = counters[{device, stream}];
  if (counter == nullptr) {
    // From the caching allocator on this stream, never freed: a cudaMalloc here would synchronise
    // the device (and is refused while another stream captures in the global mode).
    void* memory = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(sizeof(unsigned int), stream);
    C10_CUDA_CHECK(cudaMemsetAsync(memory, 0, sizeof(unsigned int), stream));
    counter = static_cast<unsigned int*>(memory);
  }
  return counter;
}
}  // namespace gpu
}  // namespace ltfast

#define LTFAST_GPU_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(ltfast, CUDA, m)
#define LTFAST_GPU_IMPL(m, name, function) m.impl(name, function)
#endif
