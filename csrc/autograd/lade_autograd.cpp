// Autograd and autocast of LADE: lade and lade_regularizer, both composites over _lade_forward
// (see autograd_common.h for the design). Only the logits are differentiable; a log_prior that
// requires grad is refused (its gradient is not implemented).
#include "autograd/autograd_common.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

using LadeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LadeForward = LadeOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                                int64_t);
using LadeBackward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t);

const c10::TypedOperatorHandle<LadeForward>& lade_forward_op() {
  static const auto op = typed_op<LadeForward>("ltfast::_lade_forward");
  return op;
}

class LadeFunction : public torch::autograd::Function<LadeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& log_prior, double ce_weight, double alpha, double remine_lambda,
                               int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, column_stats, num_valid] =
        lade_forward_op().call(logits, target, log_prior, ce_weight, alpha, remine_lambda, ignore_index);
    ctx->save_for_backward({logits, target, log_prior, row_stats, column_stats, num_valid});
    ctx->saved_data["ce_weight"] = ce_weight;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, column_stats, num_valid});
    return {loss, row_stats, column_stats, num_valid};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = typed_op<LadeBackward>("ltfast::_lade_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = backward_op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                     ctx->saved_data["ce_weight"].toDouble(), ctx->saved_data["ignore_index"].toInt());
    }
    variable_list result = {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(),
                            at::Tensor(), at::Tensor(), at::Tensor()};
    refuse_double_backward(result, "ltfast.lade", {saved[0], grads[0]});
    return result;
  }
};

LadeOutputs lade_forward_autograd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior,
                                  double ce_weight, double alpha, double remine_lambda, int64_t ignore_index) {
  TORCH_CHECK(!(log_prior.requires_grad() && at::GradMode::is_enabled()),
              "ltfast.lade: the gradient with respect to `log_prior` is not implemented; pass log_prior.detach()");
  auto out = LadeFunction::apply(logits, target, log_prior, ce_weight, alpha, remine_lambda, ignore_index);
  return {out[0], out[1], out[2], out[3]};
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor lade_float_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior, double alpha,
                           double remine_lambda, int64_t ignore_index) {
  return std::get<0>(
      lade_forward_op().call(logits.contiguous(), target, log_prior, 1.0, alpha, remine_lambda, ignore_index));
}

// The float32 loss of the public op, for Autocast (autograd_common.h).
at::Tensor lade_regularizer_float_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior,
                                       double remine_lambda, int64_t ignore_index) {
  return std::get<0>(
      lade_forward_op().call(logits.contiguous(), target, log_prior, 0.0, 1.0, remine_lambda, ignore_index));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) {
  m.impl("_lade_forward", TORCH_FN(lade_forward_autograd));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("lade", TORCH_FN(Autocast<lade_float_loss>::call<c10::DispatchKey::AutocastCPU>));
  m.impl("lade_regularizer", TORCH_FN(Autocast<lade_regularizer_float_loss>::call<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("lade", TORCH_FN(Autocast<lade_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
  m.impl("lade_regularizer", TORCH_FN(Autocast<lade_regularizer_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
