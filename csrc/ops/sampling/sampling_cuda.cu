// CUDA backend of the sampler index draws: torch glue only. The kernels and the launch plan are in
// sampling_kernels.cuh; the SIMT test build compiles this same file for the host.
#include <ATen/ATen.h>

#include "../../common/gpu_glue.h"
#include "sampling.h"
#include "sampling_kernels.cuh"

namespace ltfast {

at::Tensor class_aware_sample_cuda(const SamplingArgs& args) {
  gpu::DeviceGuard guard(args.members.device());
  at::Tensor out = at::empty({args.count}, args.members.options());
  const uint64_t groups = static_cast<uint64_t>((args.epoch_length + args.per_class - 1) / args.per_class);
  sampling_kernels::launch_class_aware(
      args.class_offsets.data_ptr<int64_t>(), args.members.data_ptr<int64_t>(), args.num_classes,
      math::seed_key(args.seed, sampling::kClassOrderTag), math::seed_key(args.seed, sampling::kMemberOrderTag),
      static_cast<uint64_t>(args.epoch), groups, static_cast<uint64_t>(args.start),
      static_cast<uint64_t>(args.per_class), args.count, out.data_ptr<int64_t>(), gpu::current_stream());
  return out;
}

at::Tensor class_weighted_sample_cuda(const SamplingArgs& args) {
  gpu::DeviceGuard guard(args.members.device());
  at::Tensor out = at::empty({args.count}, args.members.options());
  const uint64_t first = static_cast<uint64_t>(args.epoch) * static_cast<uint64_t>(args.epoch_length) +
                         static_cast<uint64_t>(args.start);
  sampling_kernels::launch_weighted(args.class_cdf.data_ptr<double>(), args.class_offsets.data_ptr<int64_t>(),
                                    args.members.data_ptr<int64_t>(), args.num_classes,
                                    math::seed_key(args.seed, sampling::kWeightedTag), first, args.count,
                                    out.data_ptr<int64_t>(), gpu::current_stream());
  return out;
}

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "class_aware_sample", &class_aware_sample<class_aware_sample_cuda>);
  LTFAST_GPU_IMPL(m, "class_weighted_sample", &class_weighted_sample<class_weighted_sample_cuda>);
}

}  // namespace ltfast
