// Autograd and autocast of the soft-target cross-entropy ops: mixed_cross_entropy and
// probability_cross_entropy (see autograd_common.h for the design). The gradient flows to the
// logits and to the additive class vectors (adjustment; target_margin in single-target mode) only:
// mix_weight, weight, class_label_smoothing and a probability target must not require grad, and
// say so, rather than receive a silently missing gradient.
#include "autograd/autograd_common.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = c10::optional<at::Tensor>;

inline OptionalTensor optional_of(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : OptionalTensor();
}

inline bool requires_grad(const OptionalTensor& t) {
  return t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled();
}

// ------------------------------------------------------------------ mixed_cross_entropy
using MixedForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                    double, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double,
                                    double, const OptionalTensor&, c10::string_view, int64_t);
using MixedBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                 const OptionalTensor&, double, const OptionalTensor&, const OptionalTensor&,
                                 const OptionalTensor&, const at::Tensor&, const at::Tensor&, double, double,
                                 const OptionalTensor&, c10::string_view, int64_t);

const c10::TypedOperatorHandle<MixedForward>& mixed_forward_op() {
  static const auto op = typed_op<MixedForward>("ltfast::_mixed_cross_entropy_forward");
  return op;
}

class MixedCrossEntropyFunction : public torch::autograd::Function<MixedCrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const OptionalTensor& target_b, const OptionalTensor& mix_weight, double mix,
                               const OptionalTensor& adjustment, const OptionalTensor& target_margin,
                               const OptionalTensor& weight, double gamma, double label_smoothing,
                               const OptionalTensor& class_label_smoothing, c10::string_view reduction,
                               int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator] =
        mixed_forward_op().call(logits, target, target_b, mix_weight, mix, adjustment, target_margin, weight, gamma,
                                label_smoothing, class_label_smoothing, reduction, ignore_index);
    ctx->save_for_backward({logits, target, target_b.value_or(at::Tensor()), mix_weight.value_or(at::Tensor()),
                            adjustment.value_or(at::Tensor()), target_margin.value_or(at::Tensor()),
                            weight.value_or(at::Tensor()), class_label_smoothing.value_or(at::Tensor()), row_stats,
                            denominator});
    ctx->saved_data["mix"] = mix;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominator});
    return {loss, row_stats, denominator};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<MixedBackward>("ltfast::_mixed_cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto& target = saved[1];
    const auto target_b = optional_of(saved[2]);
    const auto mix_weight = optional_of(saved[3]);
    const auto adjustment = optional_of(saved[4]);
    const auto target_margin = optional_of(saved[5]);
    const auto weight = optional_of(saved[6]);
    const auto class_label_smoothing = optional_of(saved[7]);
    const auto ignore_index = ctx->saved_data["ignore_index"].toInt();
    // needs_input_grad counts the tensor inputs only; an absent optional is not one.
    const size_t adjustment_edge = 2 + target_b.has_value() + mix_weight.has_value();
    const size_t margin_edge = adjustment_edge + adjustment.has_value();
    at::Tensor grad_logits, grad_adjustment, grad_margin;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], logits, target, target_b, mix_weight,
                                     ctx->saved_data["mix"].toDouble(), adjustment, target_margin, weight, saved[8],
                                     saved[9], ctx->saved_data["gamma"].toDouble(),
                                     ctx->saved_data["label_smoothing"].toDouble(), class_label_smoothing,
                                     ctx->saved_data["reduction"].toStringRef(), ignore_index);
      if (adjustment.has_value() && ctx->needs_input_grad(adjustment_edge)) {
        grad_adjustment = column_sum(grad_logits, adjustment->scalar_type());
      }
      if (target_margin.has_value() && ctx->needs_input_grad(margin_edge)) {
        // target_margin is refused together with target_b: the target is `target` alone.
        grad_margin = margin_grad(grad_logits, target, ignore_index, target_margin->scalar_type());
      }
    }
    variable_list result(13);
    result[0] = ctx->needs_input_grad(0) ? grad_logits : at::Tensor();
    result[5] = grad_adjustment;
    result[6] = grad_margin;
    refuse_double_backward(result, "ltfast.mixed_cross_entropy", {logits, grads[0], saved[4], saved[5]});
    return result;
  }
};

ForwardOutputs mixed_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                      const OptionalTensor& target_b, const OptionalTensor& mix_weight, double mix,
                                      const OptionalTensor& adjustment, const OptionalTensor& target_margin,
                                      const OptionalTensor& weight, double gamma, double label_smoothing,
                                      const OptionalTensor& class_label_smoothing, c10::string_view reduction,
                                      int64_t ignore_index) {
  TORCH_CHECK(!requires_grad(mix_weight),
              "ltfast.mixed_cross_entropy: the gradient flows to the logits only, not to mix_weight (lambda is a "
              "mixing coefficient, as in mixup); pass mix_weight.detach()");
  TORCH_CHECK(!requires_grad(weight),
              "ltfast.mixed_cross_entropy: the gradient with respect to `weight` is not implemented; pass "
              "weight.detach()");
  TORCH_CHECK(!requires_grad(class_label_smoothing),
              "ltfast.mixed_cross_entropy: the gradient with respect to a per-class label_smoothing is not "
              "implemented; pass label_smoothing.detach()");
  auto out = MixedCrossEntropyFunction::apply(logits, target, target_b, mix_weight, mix, adjustment, target_margin,
                                              weight, gamma, label_smoothing, class_label_smoothing, reduction,
                                              ignore_index);
  return {out[0], out[1], out[2]};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor mixed_cross_entropy_float_loss(const at::Tensor& logits, const at::Tensor& target,
                                          const OptionalTensor& target_b, const OptionalTensor& mix_weight, double mix,
                                          const OptionalTensor& adjustment, const OptionalTensor& target_margin,
                                          const OptionalTensor& weight, double gamma, double label_smoothing,
                                          const OptionalTensor& class_label_smoothing, c10::string_view reduction,
                                          int64_t ignore_index) {
  return std::get<0>(mixed_forward_op().call(logits.contiguous(), target, target_b, mix_weight, mix, adjustment,
                                             target_margin, weight, gamma, label_smoothing, class_label_smoothing,
                                             reduction, ignore_index));
}

// ------------------------------------------------------------------ probability_cross_entropy
using ProbabilityForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                          const OptionalTensor&, double, c10::string_view);
using ProbabilityBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, const at::Tensor&, const at::Tensor&, double,
                                       c10::string_view);

const c10::TypedOperatorHandle<ProbabilityForward>& probability_forward_op() {
  static const auto op = typed_op<ProbabilityForward>("ltfast::_probability_cross_entropy_forward");
  return op;
}

class ProbabilityCrossEntropyFunction : public torch::autograd::Function<ProbabilityCrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const OptionalTensor& adjustment, const OptionalTensor& weight, double label_smoothing,
                               c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator] =
        probability_forward_op().call(logits, target, adjustment, weight, label_smoothing, reduction);
    ctx->save_for_backward({logits, target, adjustment.value_or(at::Tensor()), weight.value_or(at::Tensor()),
                            row_stats, denominator});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({row_stats, denominator});
    return {loss, row_stats, denominator};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<ProbabilityBackward>("ltfast::_probability_cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto adjustment = optional_of(saved[2]);
    const auto weight = optional_of(saved[3]);
    at::Tensor grad_logits, grad_adjustment;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], logits, saved[1], adjustment, weight, saved[4], saved[5],
                                     ctx->saved_data["label_smoothing"].toDouble(),
                                     ctx->saved_data["reduction"].toStringRef());
      if (adjustment.has_value() && ctx->needs_input_grad(2)) {
        grad_adjustment = column_sum(grad_logits, adjustment->scalar_type());
      }
    }
    variable_list result = {ctx->needs_input_grad(0) ? grad_logits : at::Tensor(), at::Tensor(), grad_adjustment,
                            at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.probability_cross_entropy", {logits, grads[0], saved[2]});
    return result;
  }
};

ForwardOutputs probability_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                            const OptionalTensor& adjustment, const OptionalTensor& weight,
                                            double label_smoothing, c10::string_view reduction) {
  TORCH_CHECK(!(target.requires_grad() && at::GradMode::is_enabled()),
              "ltfast.probability_cross_entropy: the gradient with respect to a probability target is not "
              "implemented (the gradient flows to the logits only); pass target.detach()");
  TORCH_CHECK(!requires_grad(weight),
              "ltfast.probability_cross_entropy: the gradient with respect to `weight` is not implemented; pass "
              "weight.detach()");
  auto out = ProbabilityCrossEntropyFunction::apply(logits, target, adjustment, weight, label_smoothing, reduction);
  return {out[0], out[1], out[2]};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor probability_cross_entropy_float_loss(const at::Tensor& logits, const at::Tensor& target,
                                                const OptionalTensor& adjustment, const OptionalTensor& weight,
                                                double label_smoothing, c10::string_view reduction) {
  return std::get<0>(
      probability_forward_op().call(logits.contiguous(), target, adjustment, weight, label_smoothing, reduction));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) {
  m.impl("_mixed_cross_entropy_forward", TORCH_FN(mixed_forward_autograd));
  m.impl("_probability_cross_entropy_forward", TORCH_FN(probability_forward_autograd));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("mixed_cross_entropy", TORCH_FN(Autocast<mixed_cross_entropy_float_loss>::call<c10::DispatchKey::AutocastCPU>));
  m.impl("probability_cross_entropy", TORCH_FN(Autocast<probability_cross_entropy_float_loss>::call<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("mixed_cross_entropy", TORCH_FN(Autocast<mixed_cross_entropy_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
  m.impl("probability_cross_entropy", TORCH_FN(Autocast<probability_cross_entropy_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
