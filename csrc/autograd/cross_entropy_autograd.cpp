// Autograd and autocast of the cross-entropy family: balanced_softmax and adjusted_cross_entropy
// (see autograd_common.h for the design). Where the logits need a gradient on the CPU, the forward op
// also writes it (with_grad; "the forward-time gradient" in autograd_common.h) and the backward hands
// it out, scaled for the upstream gradient, instead of running the backward op.
#include "autograd/autograd_common.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = c10::optional<at::Tensor>;

inline OptionalTensor optional_of(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : OptionalTensor();
}

// ------------------------------------------------------------------ balanced_softmax
using BalancedSoftmaxForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              c10::string_view, int64_t, bool);
using BalancedSoftmaxBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           c10::string_view, int64_t);

const c10::TypedOperatorHandle<BalancedSoftmaxForward>& balanced_softmax_forward_op() {
  static const auto op = typed_op<BalancedSoftmaxForward>("ltfast::_balanced_softmax_forward");
  return op;
}

class BalancedSoftmaxFunction : public torch::autograd::Function<BalancedSoftmaxFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& log_prior, c10::string_view reduction, int64_t ignore_index,
                               bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator, grad_logits] =
        balanced_softmax_forward_op().call(logits, target, log_prior, reduction, ignore_index, with_grad);
    ctx->save_for_backward({logits, target, log_prior, row_stats, denominator});
    keep_forward_grad(ctx, grad_logits);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominator, grad_logits});
    // Only the loss is differentiable: without this, autograd fills a zero gradient for each other
    // output before every backward, an [N, C] one for grad_logits (16 MB, ~1 ms at 4096 x 1000 float32,
    // which undid the forward-time gradient's saving). The backward then sees the loss's gradient
    // undefined where no gradient reached it, and returns none.
    ctx->set_materialize_grads(false);
    return {loss, row_stats, denominator, grad_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(6);
    static const auto backward_op = typed_op<BalancedSoftmaxBackward>("ltfast::_balanced_softmax_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto& target = saved[1];
    const auto& log_prior = saved[2];
    const auto& reduction = ctx->saved_data["reduction"].toStringRef();
    const auto ignore_index = ctx->saved_data["ignore_index"].toInt();
    at::Tensor grad_logits = forward_grad_for_upstream(ctx, logits, grads[0]);
    at::Tensor grad_prior;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (!grad_logits.defined()) {
        grad_logits = backward_op.call(grads[0], logits, target, log_prior, saved[3], saved[4], reduction,
                                       ignore_index);
      }
      if (ctx->needs_input_grad(2)) {
        grad_prior = column_sum(grad_logits, log_prior.scalar_type());
      }
    }
    variable_list result = {ctx->needs_input_grad(0) ? grad_logits : at::Tensor(), at::Tensor(), grad_prior,
                            at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.balanced_softmax", {logits, grads[0], log_prior});
    return result;
  }
};

ForwardOutputs balanced_softmax_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                 const at::Tensor& log_prior, c10::string_view reduction,
                                                 int64_t ignore_index, bool with_grad) {
  auto out = BalancedSoftmaxFunction::apply(logits, target, log_prior, reduction, ignore_index,
                                            cross_entropy_wants_forward_grad(logits, with_grad));
  return {out[0], out[1], out[2], requested_forward_grad(with_grad, out[3], logits)};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor balanced_softmax_float_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior,
                                       c10::string_view reduction, int64_t ignore_index) {
  return std::get<0>(
      balanced_softmax_forward_op().call(logits.contiguous(), target, log_prior, reduction, ignore_index, false));
}

// ------------------------------------------------------------------ adjusted_cross_entropy
using AdjustedForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&, double, double,
                                       c10::string_view, int64_t, bool);
using AdjustedBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                    const OptionalTensor&, const OptionalTensor&, const at::Tensor&,
                                    const at::Tensor&, double, double, c10::string_view, int64_t);

const c10::TypedOperatorHandle<AdjustedForward>& adjusted_forward_op() {
  static const auto op = typed_op<AdjustedForward>("ltfast::_adjusted_cross_entropy_forward");
  return op;
}

class AdjustedCrossEntropyFunction : public torch::autograd::Function<AdjustedCrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const OptionalTensor& adjustment, const OptionalTensor& target_margin,
                               const OptionalTensor& weight, double gamma, double label_smoothing,
                               c10::string_view reduction, int64_t ignore_index, bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator, grad_logits] =
        adjusted_forward_op().call(logits, target, adjustment, target_margin, weight, gamma, label_smoothing,
                                   reduction, ignore_index, with_grad);
    // Absent optional tensors are saved as undefined ones.
    ctx->save_for_backward({logits, target, adjustment.value_or(at::Tensor()), target_margin.value_or(at::Tensor()),
                            weight.value_or(at::Tensor()), row_stats, denominator});
    keep_forward_grad(ctx, grad_logits);
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominator, grad_logits});
    // Only the loss is differentiable: without this, autograd fills a zero gradient for each other
    // output before every backward, an [N, C] one for grad_logits (16 MB, ~1 ms at 4096 x 1000 float32,
    // which undid the forward-time gradient's saving). The backward then sees the loss's gradient
    // undefined where no gradient reached it, and returns none.
    ctx->set_materialize_grads(false);
    return {loss, row_stats, denominator, grad_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(10);
    static const auto backward_op = typed_op<AdjustedBackward>("ltfast::_adjusted_cross_entropy_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto& target = saved[1];
    const auto adjustment = optional_of(saved[2]);
    const auto target_margin = optional_of(saved[3]);
    const auto weight = optional_of(saved[4]);
    const auto ignore_index = ctx->saved_data["ignore_index"].toInt();
    // needs_input_grad counts the tensor inputs only; an absent optional is not one.
    const size_t adjustment_edge = 2;
    const size_t margin_edge = adjustment.has_value() ? 3 : 2;
    at::Tensor grad_logits = forward_grad_for_upstream(ctx, logits, grads[0]);
    at::Tensor grad_adjustment, grad_margin;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (!grad_logits.defined()) {
        grad_logits = backward_op.call(grads[0], logits, target, adjustment, target_margin, weight, saved[5],
                                       saved[6], ctx->saved_data["gamma"].toDouble(),
                                       ctx->saved_data["label_smoothing"].toDouble(),
                                       ctx->saved_data["reduction"].toStringRef(), ignore_index);
      }
      if (adjustment.has_value() && ctx->needs_input_grad(adjustment_edge)) {
        grad_adjustment = column_sum(grad_logits, adjustment->scalar_type());
      }
      if (target_margin.has_value() && ctx->needs_input_grad(margin_edge)) {
        grad_margin = margin_grad(grad_logits, target, ignore_index, target_margin->scalar_type());
      }
    }
    variable_list result = {ctx->needs_input_grad(0) ? grad_logits : at::Tensor(),
                            at::Tensor(),
                            grad_adjustment,
                            grad_margin,
                            at::Tensor(),
                            at::Tensor(),
                            at::Tensor(),
                            at::Tensor(),
                            at::Tensor(),
                            at::Tensor()};
    refuse_double_backward(result, "ltfast.adjusted_cross_entropy",
                           {logits, grads[0], saved[2], saved[3]});
    return result;
  }
};

ForwardOutputs adjusted_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                         const OptionalTensor& adjustment, const OptionalTensor& target_margin,
                                         const OptionalTensor& weight, double gamma, double label_smoothing,
                                         c10::string_view reduction, int64_t ignore_index, bool with_grad) {
  TORCH_CHECK(!(weight.has_value() && weight->requires_grad() && at::GradMode::is_enabled()),
              "ltfast.adjusted_cross_entropy: the gradient with respect to `weight` is not implemented; pass "
              "weight.detach()");
  auto out = AdjustedCrossEntropyFunction::apply(logits, target, adjustment, target_margin, weight, gamma,
                                                 label_smoothing, reduction, ignore_index,
                                                 cross_entropy_wants_forward_grad(logits, with_grad));
  return {out[0], out[1], out[2], requested_forward_grad(with_grad, out[3], logits)};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor adjusted_cross_entropy_float_loss(const at::Tensor& logits, const at::Tensor& target,
                                             const OptionalTensor& adjustment, const OptionalTensor& target_margin,
                                             const OptionalTensor& weight, double gamma, double label_smoothing,
                                             c10::string_view reduction, int64_t ignore_index) {
  return std::get<0>(adjusted_forward_op().call(logits.contiguous(), target, adjustment, target_margin, weight, gamma,
                                                label_smoothing, reduction, ignore_index, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) {
  m.impl("_balanced_softmax_forward", TORCH_FN(balanced_softmax_forward_autograd));
  m.impl("_adjusted_cross_entropy_forward", TORCH_FN(adjusted_forward_autograd));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("balanced_softmax", TORCH_FN(Autocast<balanced_softmax_float_loss>::call<c10::DispatchKey::AutocastCPU>));
  m.impl("adjusted_cross_entropy", TORCH_FN(Autocast<adjusted_cross_entropy_float_loss>::call<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("balanced_softmax", TORCH_FN(Autocast<balanced_softmax_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
  m.impl("adjusted_cross_entropy", TORCH_FN(Autocast<adjusted_cross_entropy_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
