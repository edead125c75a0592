// CUDA kernels of the sampler index draws and their launch plan, with no torch glue (compiled by
// nvcc through sampling_cuda.cu, and by the host compiler for the SIMT emulator): one thread per
// position, no shared state, so an epoch is drawn where the data lives with no host round trip.
#pragma once

#include <cstdint>

#include "../../common/gpu_kernel.h"
#include "sampling.h"

namespace ltfast {
namespace sampling_kernels {

constexpr int kThreads = 256;

__global__ void class_aware_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ members,
                                   int64_t num_classes, uint32_t class_key, uint32_t member_key, uint64_t epoch,
                                   uint64_t groups_per_epoch, uint64_t start, uint64_t per_class, int64_t count,
                                   int64_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  // The gathers inside sampling:: (shared with the CPU kernels) are not traced; the emulator's
  // traffic count covers this store only.
  gpu::store(out + i, sampling::class_aware_index(offsets, members, num_classes, class_key, member_key, epoch,
                                                  groups_per_epoch, start + static_cast<uint64_t>(i), per_class));
}

__global__ void weighted_kernel(const double* __restrict__ cdf, const int64_t* __restrict__ offsets,
                                const int64_t* __restrict__ members, int64_t num_classes, uint32_t key,
                                uint64_t first, int64_t count, int64_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  gpu::store(out + i,
             sampling::weighted_class_index(cdf, offsets, members, num_classes, key, first + static_cast<uint64_t>(i)));
}

// ------------------------------------------------------------------------------ launch plan
inline unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

inline void launch_class_aware(const int64_t* offsets, const int64_t* members, int64_t num_classes,
                               uint32_t class_key, uint32_t member_key, uint64_t epoch, uint64_t groups_per_epoch,
                               uint64_t start, uint64_t per_class, int64_t count, int64_t* out, gpu::Stream stream) {
  if (count == 0) return;
  gpu::launch("sampling class_aware_kernel", &class_aware_kernel, blocks_for(count), kThreads, stream, offsets,
              members, num_classes, class_key, member_key, epoch, groups_per_epoch, start, per_class, count, out);
}

inline void launch_weighted(const double* cdf, const int64_t* offsets, const int64_t* members, int64_t num_classes,
                            uint32_t key, uint64_t first, int64_t count, int64_t* out, gpu::Stream stream) {
  if (count == 0) return;
  gpu::launch("sampling weighted_kernel", &weighted_kernel, blocks_for(count), kThreads, stream, cdf, offsets,
              members, num_classes, key, first, count, out);
}

}  // namespace sampling_kernels
}  // namespace ltfast
