// Autograd and autocast of the multi-expert losses: diverse_expert_loss and ride_loss, composites
// over _diverse_expert_loss_forward and _ride_loss_forward (see autograd_common.h for the design).
// Only the logits are differentiable; a per-class tensor that requires grad is refused (its gradient
// is not implemented), rather than silently given none.
#include "autograd/autograd_common.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = c10::optional<at::Tensor>;

inline OptionalTensor optional_of(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : OptionalTensor(); }

void refuse_grad_of(const OptionalTensor& t, const char* name, const char* op) {
  TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled()), op,
              ": the gradient with respect to `", name, "` is not implemented; pass ", name, ".detach()");
}

// ------------------------------------------------------------------ diverse_expert_loss
using DiverseForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                      int64_t);
using DiverseBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);

const c10::TypedOperatorHandle<DiverseForward>& diverse_forward_op() {
  static const auto op = typed_op<DiverseForward>("ltfast::_diverse_expert_loss_forward");
  return op;
}

class DiverseExpertFunction : public torch::autograd::Function<DiverseExpertFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& adjustments, c10::string_view reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator] = diverse_forward_op().call(logits, target, adjustments, reduction,
                                                                    ignore_index);
    ctx->save_for_backward({logits, target, adjustments, row_stats, denominator});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominator});
    return {loss, row_stats, denominator};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<DiverseBackward>("ltfast::_diverse_expert_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                     ctx->saved_data["reduction"].toStringRef(),
                                     ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.diverse_expert_loss", {saved[0], grads[0]});
    return result;
  }
};

ForwardOutputs diverse_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                        const at::Tensor& adjustments, c10::string_view reduction,
                                        int64_t ignore_index) {
  refuse_grad_of(adjustments, "adjustments", "ltfast.diverse_expert_loss");
  auto out = DiverseExpertFunction::apply(logits, target, adjustments, reduction, ignore_index);
  return {out[0], out[1], out[2]};
}

template <c10::DispatchKey Key>
at::Tensor diverse_autocast(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& adjustments,
                            c10::string_view reduction, int64_t ignore_index) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  return std::get<0>(diverse_forward_op().call(logits.contiguous(), target, adjustments, reduction, ignore_index));
}

// ------------------------------------------------------------------ ride_loss
using RideForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                   const OptionalTensor&, double, double, int64_t);
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
                               int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominators] = ride_forward_op().call(logits, target, target_margin, weight, temperature,
                                                                  base_temperature, diversity_factor, ignore_index);
    ctx->save_for_backward({logits, target, target_margin.value_or(at::Tensor()), weight.value_or(at::Tensor()),
                            temperature.value_or(at::Tensor()), row_stats, denominators});
    ctx->saved_data["base_temperature"] = base_temperature;
    ctx->saved_data["diversity_factor"] = diversity_factor;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominators});
    return {loss, row_stats, denominators};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<RideBackward>("ltfast::_ride_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], optional_of(saved[2]), optional_of(saved[3]),
                                     optional_of(saved[4]), saved[5], saved[6],
                                     ctx->saved_data["base_temperature"].toDouble(),
                                     ctx->saved_data["diversity_factor"].toDouble(),
                                     ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(),
                            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.ride_loss", {saved[0], grads[0]});
    return result;
  }
};

ForwardOutputs ride_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                     const OptionalTensor& target_margin, const OptionalTensor& weight,
                                     const OptionalTensor& temperature, double base_temperature,
                                     double diversity_factor, int64_t ignore_index) {
  refuse_grad_of(target_margin, "target_margin", "ltfast.ride_loss");
  refuse_grad_of(weight, "weight", "ltfast.ride_loss");
  refuse_grad_of(temperature, "temperature", "ltfast.ride_loss");
  auto out = RideFunction::apply(logits, target, target_margin, weight, temperature, base_temperature,
                                 diversity_factor, ignore_index);
  return {out[0], out[1], out[2]};
}

template <c10::DispatchKey Key>
at::Tensor ride_autocast(const at::Tensor& logits, const at::Tensor& target, const OptionalTensor& target_margin,
                         const OptionalTensor& weight, const OptionalTensor& temperature, double base_temperature,
                         double diversity_factor, int64_t ignore_index) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
  return std::get<0>(ride_forward_op().call(logits.contiguous(), target, target_margin, weight, temperature,
                                            base_temperature, diversity_factor, ignore_index));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) {
  m.impl("_diverse_expert_loss_forward", TORCH_FN(diverse_forward_autograd));
  m.impl("_ride_loss_forward", TORCH_FN(ride_forward_autograd));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("diverse_expert_loss", TORCH_FN(diverse_autocast<c10::DispatchKey::AutocastCPU>));
  m.impl("ride_loss", TORCH_FN(ride_autocast<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("diverse_expert_loss", TORCH_FN(diverse_autocast<c10::DispatchKey::AutocastCUDA>));
  m.impl("ride_loss", TORCH_FN(ride_autocast<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
