// Autograd and autocast of the equalization losses: softmax_equalization_loss (SEQL) and
// equalization_loss (sigmoid EQL) (see autograd_common.h for the design). Only the logits are
// differentiable: tail_mask is a bool mask and the SEQL seed int64.
#include "autograd/autograd_common.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

// ------------------------------------------------------------------ softmax_equalization_loss
// The fourth output: the forward-time gradient (autograd_common.h).
using SeqlForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SeqlForward = SeqlForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       double, c10::string_view, int64_t, bool);
using SeqlBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, c10::string_view,
                                int64_t);

const c10::TypedOperatorHandle<SeqlForward>& seql_forward_op() {
  static const auto op = typed_op<SeqlForward>("ltfast::_softmax_equalization_loss_forward");
  return op;
}

class SoftmaxEqualizationFunction : public torch::autograd::Function<SoftmaxEqualizationFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& tail_mask, const at::Tensor& seed, double gamma,
                               c10::string_view reduction, int64_t ignore_index, bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator, grad_logits] =
        seql_forward_op().call(logits, target, tail_mask, seed, gamma, reduction, ignore_index, with_grad);
    // The drop mask is not saved: backward regenerates it from `seed`.
    ctx->save_for_backward({logits, target, tail_mask, seed, row_stats, denominator});
    keep_forward_grad(ctx, grad_logits);
    ctx->saved_data["gamma"] = gamma;
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
    if (!grads[0].defined()) return variable_list(8);
    static const auto backward_op = typed_op<SeqlBackward>("ltfast::_softmax_equalization_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits = forward_grad_for_upstream(ctx, saved[0], grads[0]);
    if (!grad_logits.defined()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                     ctx->saved_data["gamma"].toDouble(), ctx->saved_data["reduction"].toStringRef(),
                                     ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(),
                            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.softmax_equalization_loss", {saved[0], grads[0]});
    return result;
  }
};

SeqlForwardOutputs seql_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                         const at::Tensor& tail_mask, const at::Tensor& seed, double gamma,
                                         c10::string_view reduction, int64_t ignore_index, bool with_grad) {
  auto out = SoftmaxEqualizationFunction::apply(logits, target, tail_mask, seed, gamma, reduction, ignore_index,
                                                cross_entropy_wants_forward_grad(logits, with_grad));
  return {out[0], out[1], out[2], requested_forward_grad(with_grad, out[3], logits)};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor seql_float_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tail_mask,
                           const at::Tensor& seed, double gamma, c10::string_view reduction, int64_t ignore_index) {
  return std::get<0>(seql_forward_op().call(logits.contiguous(), target, tail_mask, seed, gamma, reduction,
                                            ignore_index, false));
}

// ------------------------------------------------------------------ equalization_loss (EQL)
using EqlForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      c10::string_view, int64_t);
using EqlBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, c10::string_view, int64_t);

const c10::TypedOperatorHandle<EqlForward>& eql_forward_op() {
  static const auto op = typed_op<EqlForward>("ltfast::_equalization_loss_forward");
  return op;
}

class EqualizationFunction : public torch::autograd::Function<EqualizationFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& tail_mask, c10::string_view reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, denominator] = eql_forward_op().call(logits, target, tail_mask, reduction, ignore_index);
    ctx->save_for_backward({logits, target, tail_mask, denominator});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({denominator});
    return {loss, denominator};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<EqlBackward>("ltfast::_equalization_loss_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], saved[2], saved[3],
                                     ctx->saved_data["reduction"].toStringRef(),
                                     ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.equalization_loss", {saved[0], grads[0]});
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> eql_forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                        const at::Tensor& tail_mask, c10::string_view reduction,
                                                        int64_t ignore_index) {
  auto out = EqualizationFunction::apply(logits, target, tail_mask, reduction, ignore_index);
  return {out[0], out[1]};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor eql_float_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tail_mask,
                          c10::string_view reduction, int64_t ignore_index) {
  return std::get<0>(eql_forward_op().call(logits.contiguous(), target, tail_mask, reduction, ignore_index));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) {
  m.impl("_softmax_equalization_loss_forward", TORCH_FN(seql_forward_autograd));
  m.impl("_equalization_loss_forward", TORCH_FN(eql_forward_autograd));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("softmax_equalization_loss", TORCH_FN(Autocast<seql_float_loss>::call<c10::DispatchKey::AutocastCPU>));
  m.impl("equalization_loss", TORCH_FN(Autocast<eql_float_loss>::call<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("softmax_equalization_loss", TORCH_FN(Autocast<seql_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
  m.impl("equalization_loss", TORCH_FN(Autocast<eql_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
