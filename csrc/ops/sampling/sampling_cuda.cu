// CUDA backend of the sampler index draws: one thread per position, no shared state, so an epoch
// is drawn where the data lives (DeviceTensorLoader) with no host round trip.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sampling.h"

namespace ltfast {
namespace {

constexpr int kThreads = 256;

__global__ void class_aware_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ members,
                                   int64_t num_classes, uint32_t class_key, uint32_t member_key, uint64_t epoch,
                                   uint64_t groups_per_epoch, uint64_t start, uint64_t per_class, int64_t count,
                                   int64_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  out[i] = sampling::class_aware_index(offsets, members, num_classes, class_key, member_key, epoch, groups_per_epoch,
                                       start + static_cast<uint64_t>(i), per_class);
}

__global__ void weighted_kernel(const double* __restrict__ cdf, const int64_t* __restrict__ offsets,
                                const int64_t* __restrict__ members, int64_t num_classes, uint32_t key,
                                uint64_t first, int64_t count, int64_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  out[i] = sampling::weighted_class_index(cdf, offsets, members, num_classes, key, first + static_cast<uint64_t>(i));
}

unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace

at::Tensor class_aware_sample_cuda(const SamplingArgs& args) {
  const c10::cuda::CUDAGuard guard(args.members.device());
  at::Tensor out = at::empty({args.count}, args.members.options());
  if (args.count == 0) return out;
  const uint64_t groups = static_cast<uint64_t>((args.epoch_length + args.per_class - 1) / args.per_class);
  class_aware_kernel<<<blocks_for(args.count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      args.class_offsets.data_ptr<int64_t>(), args.members.data_ptr<int64_t>(), args.num_classes,
      math::seed_key(args.seed, sampling::kClassOrderTag), math::seed_key(args.seed, sampling::kMemberOrderTag),
      static_cast<uint64_t>(args.epoch), groups, static_cast<uint64_t>(args.start),
      static_cast<uint64_t>(args.per_class), args.count, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor class_weighted_sample_cuda(const SamplingArgs& args) {
  const c10::cuda::CUDAGuard guard(args.members.device());
  at::Tensor out = at::empty({args.count}, args.members.options());
  if (args.count == 0) return out;
  const uint64_t first = static_cast<uint64_t>(args.epoch) * static_cast<uint64_t>(args.epoch_length) +
                         static_cast<uint64_t>(args.start);
  weighted_kernel<<<blocks_for(args.count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      args.class_cdf.data_ptr<double>(), args.class_offsets.data_ptr<int64_t>(), args.members.data_ptr<int64_t>(),
      args.num_classes, math::seed_key(args.seed, sampling::kWeightedTag), first, args.count,
      out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(ltfast, CUDA, m) {
  m.impl("class_aware_sample", &class_aware_sample<class_aware_sample_cuda>);
  m.impl("class_weighted_sample", &class_weighted_sample<class_weighted_sample_cuda>);
}

}  // namespace ltfast
