// Autograd and autocast of the multi-expert losses: diverse_expert_loss and ride_loss, composites
// over _diverse_expert_loss_forward and _ride_loss_forward (see autograd_common.h for the design).
// Only the logits are differentiable; a per-class tensor that requires grad is refused (its gradient
// is not implemented), rather than silently given none.
//
// Where the logits need a gradient and live on the CPU, the forward op is asked for the gradient
// too (with_grad, multi_expert.h; see "the forward-time gradient" in autograd_common.h): it reads the
// logits once and writes the gradient once, and the backward returns that tensor when the upstream
// gradient is exactly 1 (loss.backward() on the loss itself). Any other upstream gradient,
// create_graph, and the CUDA kernels (which return no gradient) take the backward op. At 4096 x 3 x 1000 float32 on one CPU thread this is 2 passes
// over the logits instead of 3, and the exponentials of the forward are reused. The gradient is kept
// in saved_data and handed out once: the caller owns it (AccumulateGrad can take it without a copy,
// in-place changes cannot reach a later backward), and a second backward (retain_graph=True) runs
// the backward op.
#include "autograd/autograd_common.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = c10::optional<at::Tensor>;

inline OptionalTensor optional_of(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : OptionalTensor(); }

void refuse_grad_of(const OptionalTensor& t, const char* name, const char* op) {
  TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled()), op,
              ": the gradient with respect to `", name, "` is not implemented; pass ", name, ".detach()");
}

// ------------------------------------------------------------------ diverse_expert_loss
using DiverseForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                      int64_t, bool);
using DiverseBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);

const c10::TypedOperatorHandle<DiverseForward>& diverse_forward_op() {
  static const auto op = typed_op<DiverseForward>("ltfast::_diverse_expert_loss_forward");
  return op;
}

class DiverseExpertFunction : public torch::autograd::Function<DiverseExpertFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& adjustments, c10::string_view reduction, int64_t ignore_index,
                               bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator, grad_logits] =
        diverse_forward_op().call(logits, target, adjustments, reduction, ignore_index, with_grad);
    ctx->save_for_backward({logits, target, adjustments, row_stats, denominator});
    keep_forward_grad(ctx, grad_logits);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominator, grad_logits});
    return {loss, row_stats, denominator, grad_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<DiverseBackward>("ltfast::_diverse_expert_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits = forward_grad_if_unit_upstream(ctx, saved[0], grads[0]);
    if (!grad_logits.defined()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                     ctx->saved_data["reduction"].toStringRef(),
                                     ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.diverse_expert_loss", {saved[0], grads[0]});
    return result;
  }
};

ForwardOutputs diverse_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                        const at::Tensor& adjustments, c10::string_view reduction,
                                        int64_t ignore_index, bool with_grad) {
  refuse_grad_of(adjustments, "adjustments", "ltfast.diverse_expert_loss");
  auto out = DiverseExpertFunction::apply(logits, target, adjustments, reduction, ignore_index,
                                          wants_forward_grad(logits, with_grad));
  return {out[0], out[1], out[2], out[3]};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor diverse_float_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& adjustments,
                              c10::string_view reduction, int64_t ignore_index) {
  return std::get<0>(
      diverse_forward_op().call(logits.contiguous(), target, adjustments, reduction, ignore_index, false));
}

// ------------------------------------------------------------------ ride_loss
using RideForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                   const OptionalTensor&, double, double, int64_t, bool);
using RideBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                const OptionalTensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
                                double, double, int64_t);

const c10::TypedOperatorHandle<RideForward>& ride_forward_op() {
  static const auto op = typed_op<RideForward>("ltfast::_ride_loss_forward");
  return op;
}

class RideFunction : public torch::autograd::Function<RideFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const OptionalTensor& target_margin, const OptionalTensor& weight,
                               const OptionalTensor& temperature, double base_temperature, double diversity_factor,
                               int64_t ignore_index, bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominators, grad_logits] = ride_forward_op().call(
        logits, target, target_margin, weight, temperature, base_temperature, diversity_factor, ignore_index, with_grad);
    ctx->save_for_backward({logits, target, target_margin.value_or(at::Tensor()), weight.value_or(at::Tensor()),
                            temperature.value_or(at::Tensor()), row_stats, denominators});
    keep_forward_grad(ctx, grad_logits);
    ctx->saved_data["base_temperature"] = base_temperature;
    ctx->saved_data["diversity_factor"] = diversity_factor;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominators, grad_logits});
    return {loss, row_stats, denominators, grad_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<RideBackward>("ltfast::_ride_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits = forward_grad_if_unit_upstream(ctx, saved[0], grads[0]);
    if (!grad_logits.defined()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], optional_of(saved[2]), optional_of(saved[3]),
                                     optional_of(saved[4]), saved[5], saved[6],
                                     ctx->saved_data["base_temperature"].toDouble(),
                                     ctx->saved_data["diversity_factor"].toDouble(),
                                     ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.ride_loss", {saved[0], grads[0]});
    return result;
  }
};

ForwardOutputs ride_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                     const OptionalTensor& target_margin, const OptionalTensor& weight,
                                     const OptionalTensor& temperature, double base_temperature,
                                     double diversity_factor, int64_t ignore_index, bool with_grad) {
  refuse_grad_of(target_margin, "target_margin", "ltfast.ride_loss");
  refuse_grad_of(weight, "weight", "ltfast.ride_loss");
  refuse_grad_of(temperature, "temperature", "ltfast.ride_loss");
  auto out = RideFunction::apply(logits, target, target_margin, weight, temperature, base_temperature,
                                 diversity_factor, ignore_index, wants_forward_grad(logits, with_grad));
  return {out[0], out[1], out[2], out[3]};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor ride_float_loss(const at::Tensor& logits, const at::Tensor& target, const OptionalTensor& target_margin,
                           const OptionalTensor& weight, const OptionalTensor& temperature, double base_temperature,
                           double diversity_factor, int64_t ignore_index) {
  return std::get<0>(ride_forward_op().call(logits.contiguous(), target, target_margin, weight, temperature,
                                            base_temperature, diversity_factor, ignore_index, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) {
  m.impl("_diverse_expert_loss_forward", TORCH_FN(diverse_forward_autograd));
  m.impl("_ride_loss_forward", TORCH_FN(ride_forward_autograd));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("diverse_expert_loss", TORCH_FN(Autocast<diverse_float_loss>::call<c10::DispatchKey::AutocastCPU>));
  m.impl("ride_loss", TORCH_FN(Autocast<ride_float_loss>::call<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("diverse_expert_loss", TORCH_FN(Autocast<diverse_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
  m.impl("ride_loss", TORCH_FN(Autocast<ride_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
