// CPU backend of the sampler index draws: one independent counter-based draw per position.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sampling.h"

namespace ltfast {
namespace {

// 115,846 positions (one ImageNet-LT epoch) cost ~0.2 us each here; 16k per task keeps the
// fork/join overhead of at::parallel_for below 1% while both cores get work.
constexpr int64_t kGrain = 16384;

uint64_t groups_per_epoch(const SamplingArgs& args) {
  return static_cast<uint64_t>((args.epoch_length + args.per_class - 1) / args.per_class);
}

}  // namespace

at::Tensor class_aware_sample_cpu(const SamplingArgs& args) {
  at::Tensor out = at::empty({args.count}, args.members.options());
  const int64_t* offsets = args.class_offsets.data_ptr<int64_t>();
  const int64_t* members = args.members.data_ptr<int64_t>();
  int64_t* result = out.data_ptr<int64_t>();
  const uint32_t class_key = math::seed_key(args.seed, sampling::kClassOrderTag);
  const uint32_t member_key = math::seed_key(args.seed, sampling::kMemberOrderTag);
  const uint64_t groups = groups_per_epoch(args);
  at::parallel_for(0, args.count, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      result[i] = sampling::class_aware_index(offsets, members, args.num_classes, class_key, member_key,
                                              static_cast<uint64_t>(args.epoch), groups,
                                              static_cast<uint64_t>(args.start + i),
                                              static_cast<uint64_t>(args.per_class));
    }
  });
  return out;
}

at::Tensor class_weighted_sample_cpu(const SamplingArgs& args) {
  at::Tensor out = at::empty({args.count}, args.members.options());
  const double* cdf = args.class_cdf.data_ptr<double>();
  const int64_t* offsets = args.class_offsets.data_ptr<int64_t>();
  const int64_t* members = args.members.data_ptr<int64_t>();
  int64_t* result = out.data_ptr<int64_t>();
  const uint32_t key = math::seed_key(args.seed, sampling::kWeightedTag);
  const uint64_t first = static_cast<uint64_t>(args.epoch) * static_cast<uint64_t>(args.epoch_length) +
                         static_cast<uint64_t>(args.start);
  at::parallel_for(0, args.count, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      result[i] = sampling::weighted_class_index(cdf, offsets, members, args.num_classes, key,
                                                 first + static_cast<uint64_t>(i));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("class_aware_sample", &class_aware_sample<class_aware_sample_cpu>);
  m.impl("class_weighted_sample", &class_weighted_sample<class_weighted_sample_cpu>);
}

}  // namespace ltfast
