// Index drawing for the class-aware samplers (ltfast/data/samplers.py). Each output position is a
// pure function of (seed, epoch, position), computed independently, so one epoch of any length is
// drawn in parallel on the CPU or the GPU, and a rank draws its shard without the others.
//
// The classes are given in CSR form: `members` holds dataset indices grouped by class and class k
// owns members[class_offsets[k] : class_offsets[k + 1]] (every class non-empty; the Python side
// drops empty classes).
#pragma once

#include <ATen/core/Tensor.h>

#include "../../common/counter_random.h"

namespace ltfast {

namespace sampling {

// Stream tags keep the class order, the per-class orders and the weighted draws independent.
constexpr uint32_t kClassOrderTag = 0x636c6173U;   // "clas"
constexpr uint32_t kMemberOrderTag = 0x6d656d62U;  // "memb"
constexpr uint32_t kWeightedTag = 0x77676874U;     // "wght"

// The survey's ClassAwareSampler (Main-codebase/data/ClassAwareSampler.py) without its state:
// classes are visited in cycles, each cycle a fresh shuffle of the classes; a visited class yields
// `per_class` consecutive items of its own cycle over its members, also reshuffled at every wrap.
// Each epoch starts a new group (the survey restarts its generator per epoch and drops the rest of
// a partial group), and the cycles carry on across epochs as the survey's iterators do:
//   group g = epoch * groups_per_epoch + position / per_class,  j = position % per_class
//   class   = permute(g mod C, C, key(class cycle g / C))
//   draw m  = (g / C) * per_class + j  (the m-th draw from that class: each cycle visits it once)
//   member  = members[offset + permute(m mod n_c, n_c, key(class, m / n_c))]
LTFAST_RANDOM_HD int64_t class_aware_index(const int64_t* class_offsets, const int64_t* members, int64_t num_classes,
                                           uint32_t class_key, uint32_t member_key, uint64_t epoch,
                                           uint64_t groups_per_epoch, uint64_t position, uint64_t per_class) {
  const uint64_t group = epoch * groups_per_epoch + position / per_class;
  const uint64_t within_group = position % per_class;
  const uint64_t classes = static_cast<uint64_t>(num_classes);
  const uint64_t class_cycle = group / classes;
  const uint64_t cls = math::permute(group % classes, classes, math::mix_key(class_key, class_cycle));
  const int64_t begin = class_offsets[cls];
  const uint64_t size = static_cast<uint64_t>(class_offsets[cls + 1] - begin);
  const uint64_t draw = class_cycle * per_class + within_group;
  const uint32_t this_class_key = math::mix_key(member_key, cls);
  const uint64_t slot = math::permute(draw % size, size, math::mix_key(this_class_key, draw / size));
  return members[begin + static_cast<int64_t>(slot)];
}

// Class first, by inverse CDF over `class_cdf` (cumulative class probabilities, last entry 1),
// then a member uniformly within the class, with replacement: P(index i) = p_class / n_class, the
// sample weights of the survey's MixedPrioritizedSampler without its sum tree.
LTFAST_RANDOM_HD int64_t weighted_class_index(const double* class_cdf, const int64_t* class_offsets,
                                              const int64_t* members, int64_t num_classes, uint32_t key,
                                              uint64_t counter) {
  const double u = math::uniform01(key, 2 * counter);
  int64_t lo = 0, hi = num_classes - 1;  // first class whose cdf exceeds u
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (class_cdf[mid] > u) hi = mid; else lo = mid + 1;
  }
  const int64_t begin = class_offsets[lo];
  const int64_t size = class_offsets[lo + 1] - begin;
  int64_t slot = static_cast<int64_t>(math::uniform01(key, 2 * counter + 1) * static_cast<double>(size));
  if (slot >= size) slot = size - 1;
  return members[begin + slot];
}

}  // namespace sampling

struct SamplingArgs {
  at::Tensor class_offsets;  // int64 [C + 1], contiguous
  at::Tensor members;        // int64 [M], contiguous
  at::Tensor class_cdf;      // float64 [C] (weighted draw only)
  int64_t num_classes = 0;
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t start = 0;
  int64_t count = 0;
  int64_t per_class = 1;
  int64_t epoch_length = 0;
};

SamplingArgs prepare_class_aware_args(const at::Tensor& class_offsets, const at::Tensor& members, int64_t seed,
                                      int64_t epoch, int64_t start, int64_t count, int64_t num_samples_cls,
                                      int64_t epoch_length);
SamplingArgs prepare_weighted_args(const at::Tensor& class_cdf, const at::Tensor& class_offsets,
                                   const at::Tensor& members, int64_t seed, int64_t epoch, int64_t start,
                                   int64_t count, int64_t epoch_length);

at::Tensor class_aware_sample_cpu(const SamplingArgs& args);
at::Tensor class_weighted_sample_cpu(const SamplingArgs& args);
at::Tensor class_aware_sample_cuda(const SamplingArgs& args);
at::Tensor class_weighted_sample_cuda(const SamplingArgs& args);

template <at::Tensor (*kernel)(const SamplingArgs&)>
at::Tensor class_aware_sample(const at::Tensor& class_offsets, const at::Tensor& members, int64_t seed,
                              int64_t epoch, int64_t start, int64_t count, int64_t num_samples_cls,
                              int64_t epoch_length) {
  return kernel(prepare_class_aware_args(class_offsets, members, seed, epoch, start, count, num_samples_cls,
                                         epoch_length));
}

template <at::Tensor (*kernel)(const SamplingArgs&)>
at::Tensor class_weighted_sample(const at::Tensor& class_cdf, const at::Tensor& class_offsets,
                                 const at::Tensor& members, int64_t seed, int64_t epoch, int64_t start, int64_t count,
                                 int64_t epoch_length) {
  return kernel(prepare_weighted_args(class_cdf, class_offsets, members, seed, epoch, start, count, epoch_length));
}

}  // namespace ltfast
