// The cross-entropy family with soft targets (ltfast issue 15 part 3): mixed targets (mixup/CutMix:
// two class indices and a weight per row), per-class label smoothing, and dense probability targets.
// Separate ops from the hard-target path (csrc/ops/cross_entropy/) so that its kernels, argument
// handling and launch plans stay exactly as fast as before; the arithmetic is shared
// (csrc/common/softmax_math.h, soft_target_math.h) and so are the CPU row-softmax building blocks
// (csrc/common/cpu_softmax.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "../cross_entropy/cross_entropy.h"

namespace ltfast {

// ltfast::mixed_cross_entropy. `ce` holds what the hard-target path takes (target = y_a); then:
// target_b [N] int64 (undefined: a single target, lambda = 1, used for per-class smoothing alone),
// mix_weight in the accumulation dtype, [N] per row or a 0-dim tensor (undefined: the scalar `mix`),
// class_smoothing [C] in the accumulation dtype (undefined: ce.label_smoothing for every row).
struct MixedArgs {
  CrossEntropyArgs ce;
  at::Tensor target_b;
  at::Tensor mix_weight;
  double mix = 1.0;
  at::Tensor class_smoothing;
  bool has_target_b() const { return target_b.defined(); }
  bool smoothing() const { return class_smoothing.defined() || ce.label_smoothing != 0.0; }
};

MixedArgs prepare_mixed_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                             const c10::optional<at::Tensor>& target_b, const c10::optional<at::Tensor>& mix_weight,
                             double mix, const c10::optional<at::Tensor>& adjustment,
                             const c10::optional<at::Tensor>& target_margin, const c10::optional<at::Tensor>& weight,
                             double gamma, double label_smoothing,
                             const c10::optional<at::Tensor>& class_label_smoothing, c10::string_view reduction,
                             int64_t ignore_index);

// ltfast::probability_cross_entropy: ce.target is the [N, C] probability target, in the logits
// dtype or (when it was given in another dtype) in the accumulation dtype.
CrossEntropyArgs prepare_probability_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& adjustment,
                                          const c10::optional<at::Tensor>& weight, double label_smoothing,
                                          c10::string_view reduction);

// Mixed forward: (loss, row_stats [2, N] as in cross_entropy.h, denominators [2]): the sums the
// two terms' summed losses were divided by (term b: 1 without target_b).
// Probability forward: (loss, row_stats [3, N]: row max, log-sum offset, mass = sum_c w_c q_c,
// denominator: N for 'mean', else 1).
using SoftForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_mixed_backward_args(const char* op, const MixedArgs& args, const at::Tensor& grad_loss,
                               const at::Tensor& row_stats, const at::Tensor& denominators);
void check_probability_backward_args(const char* op, const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                     const at::Tensor& row_stats, const at::Tensor& denominator);

using MixedForwardKernel = SoftForwardResult (*)(const MixedArgs&);
using MixedBackwardKernel = at::Tensor (*)(const MixedArgs&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using ProbabilityForwardKernel = SoftForwardResult (*)(const CrossEntropyArgs&);
using ProbabilityBackwardKernel = at::Tensor (*)(const CrossEntropyArgs&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&);

// Schema-shaped adapters, registered by each backend with its kernels.
template <MixedForwardKernel kernel>
SoftForwardResult mixed_forward(const at::Tensor& logits, const at::Tensor& target,
                                const c10::optional<at::Tensor>& target_b, const c10::optional<at::Tensor>& mix_weight,
                                double mix, const c10::optional<at::Tensor>& adjustment,
                                const c10::optional<at::Tensor>& target_margin,
                                const c10::optional<at::Tensor>& weight, double gamma, double label_smoothing,
                                const c10::optional<at::Tensor>& class_label_smoothing, c10::string_view reduction,
                                int64_t ignore_index) {
  return kernel(prepare_mixed_args("ltfast.mixed_cross_entropy", logits, target, target_b, mix_weight, mix,
                                   adjustment, target_margin, weight, gamma, label_smoothing, class_label_smoothing,
                                   reduction, ignore_index));
}

template <MixedBackwardKernel kernel>
at::Tensor mixed_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                          const c10::optional<at::Tensor>& target_b, const c10::optional<at::Tensor>& mix_weight,
                          double mix, const c10::optional<at::Tensor>& adjustment,
                          const c10::optional<at::Tensor>& target_margin, const c10::optional<at::Tensor>& weight,
                          const at::Tensor& row_stats, const at::Tensor& denominators, double gamma,
                          double label_smoothing, const c10::optional<at::Tensor>& class_label_smoothing,
                          c10::string_view reduction, int64_t ignore_index) {
  const char* op = "ltfast._mixed_cross_entropy_backward";
  const auto args = prepare_mixed_args(op, logits, target, target_b, mix_weight, mix, adjustment, target_margin,
                                       weight, gamma, label_smoothing, class_label_smoothing, reduction, ignore_index);
  check_mixed_backward_args(op, args, grad_loss, row_stats, denominators);
  return kernel(args, grad_loss, row_stats, denominators);
}

template <ProbabilityForwardKernel kernel>
SoftForwardResult probability_forward(const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& adjustment,
                                      const c10::optional<at::Tensor>& weight, double label_smoothing,
                                      c10::string_view reduction) {
  return kernel(prepare_probability_args("ltfast.probability_cross_entropy", logits, target, adjustment, weight,
                                         label_smoothing, reduction));
}

template <ProbabilityBackwardKernel kernel>
at::Tensor probability_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                const c10::optional<at::Tensor>& adjustment, const c10::optional<at::Tensor>& weight,
                                const at::Tensor& row_stats, const at::Tensor& denominator, double label_smoothing,
                                c10::string_view reduction) {
  const char* op = "ltfast._probability_cross_entropy_backward";
  const auto args = prepare_probability_args(op, logits, target, adjustment, weight, label_smoothing, reduction);
  check_probability_backward_args(op, args, grad_loss, row_stats, denominator);
  return kernel(args, grad_loss, row_stats, denominator);
}

}  // namespace ltfast
