// Autograd and autocast of paco_loss, the composite over _paco_forward (csrc/ops/paco/paco.h; see
// autograd_common.h for the design). Differentiable: similarity and sup_logits; log_prior is a
// constant of the training set (no gradient, as in the original): one that requires grad is refused.
// Saved: the inputs and row_stats [2, B] + the denominator, nothing of size [B, C + M].
//
// Where an input needs a gradient on the CPU and the cross-entropy family's switch
// (ltfast.set_forward_gradient) is on, the forward op also writes both gradients for an upstream
// gradient of 1 ("the forward-time gradient" in autograd_common.h) and the backward hands them out,
// scaled for the upstream gradient, instead of running the backward op.
#include "autograd/autograd_common.h"
#include "common/checks.h"

#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace autograd {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = c10::optional<at::Tensor>;
constexpr const char* kOp = "ltfast.paco_loss";

inline OptionalTensor optional_of(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : OptionalTensor(); }
inline bool defined(const OptionalTensor& t) { return t.has_value() && t->defined(); }

using PacoForward = ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                   const OptionalTensor&, double, double, double, double, double, double,
                                   c10::string_view, int64_t, bool);
using PacoBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const OptionalTensor&,
                                                        const OptionalTensor&, const at::Tensor&, const at::Tensor&,
                                                        double, double, double, double, double, double,
                                                        c10::string_view, int64_t);

const c10::TypedOperatorHandle<PacoForward>& paco_forward_op() {
  static const auto op = typed_op<PacoForward>("ltfast::_paco_forward");
  return op;
}

// The forward-time gradients for the upstream gradient `upstream` (a scalar, or [B] for 'none'), or a
// pair of undefined tensors where the backward op must run. An upstream gradient of exactly 1 hands
// them out as they are (bit-identical to the backward op for float64); another finite one scales them
// in place (per row for [B]), as forward_grad_for_upstream does for one tensor.
std::tuple<at::Tensor, at::Tensor> forward_grads_for_upstream(AutogradContext* ctx, const at::Tensor& similarity,
                                                              const at::Tensor& upstream) {
  at::Tensor grad_similarity = take_forward_grad(ctx);
  at::Tensor grad_sup;
  auto& data = ctx->saved_data;
  if (const auto it = data.find("forward_grad_sup"); it != data.end()) {
    grad_sup = it->second.toTensor();
    data.erase(it);
  }
  if (!forward_grad_usable(grad_similarity, similarity, upstream) || !upstream.device().is_cpu()) return {};
  std::vector<at::Tensor> grads = {grad_similarity};
  if (grad_sup.defined() && grad_sup.numel() > 0) grads.push_back(grad_sup);
  if (upstream.numel() == 1) {
    const double g = upstream.item<double>();
    if (g == 1.0) return {grad_similarity, grad_sup};
    if (!std::isfinite(g)) return {};
    at::AutoDispatchBelowADInplaceOrView guard;
    for (auto& grad : grads) grad.mul_(upstream.reshape({}));
    return {grad_similarity, grad_sup};
  }
  if (upstream.dim() != 1 || upstream.size(0) != grad_similarity.size(0)) return {};
  if (upstream.eq(1).all().item<bool>()) return {grad_similarity, grad_sup};
  if (!upstream.isfinite().all().item<bool>()) return {};
  at::AutoDispatchBelowADInplaceOrView guard;
  for (auto& grad : grads) grad.mul_(upstream.reshape({-1, 1}));
  return {grad_similarity, grad_sup};
}

class PacoFunction : public torch::autograd::Function<PacoFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& similarity, const at::Tensor& labels,
                               const at::Tensor& key_labels, const OptionalTensor& sup_logits,
                               const OptionalTensor& log_prior, double temperature, double alpha, double beta,
                               double gamma, double sup_temperature, double base_temperature,
                               c10::string_view reduction, int64_t ignore_index, bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats, denominator, grad_similarity, grad_sup] =
        paco_forward_op().call(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta, gamma,
                               sup_temperature, base_temperature, reduction, ignore_index, with_grad);
    ctx->save_for_backward({similarity, labels, key_labels, sup_logits.value_or(at::Tensor()),
                            log_prior.value_or(at::Tensor()), row_stats, denominator});
    keep_forward_grad(ctx, grad_similarity);
    if (is_plain_tensor(grad_sup) && grad_sup.numel() > 0) ctx->saved_data["forward_grad_sup"] = grad_sup;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["sup_temperature"] = sup_temperature;
    ctx->saved_data["base_temperature"] = base_temperature;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({row_stats, denominator, grad_similarity, grad_sup});
    // Only the loss is differentiable: no zero [B, M] / [B, C] gradients materialised for the others
    // (see BalancedSoftmaxFunction).
    ctx->set_materialize_grads(false);
    return {loss, row_stats, denominator, grad_similarity, grad_sup};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(14);
    if (!grads[0].defined()) return result;
    static const auto backward_op = typed_op<PacoBackward>("ltfast::_paco_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& similarity = saved[0];
    const auto& sup_logits = saved[3];
    auto [grad_similarity, grad_sup] = forward_grads_for_upstream(ctx, similarity, grads[0]);
    if (!grad_similarity.defined()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      const auto& data = ctx->saved_data;
      std::tie(grad_similarity, grad_sup) = backward_op.call(
          grads[0], similarity, saved[1], saved[2], optional_of(sup_logits), optional_of(saved[4]), saved[5],
          saved[6], data.at("temperature").toDouble(), data.at("alpha").toDouble(), data.at("beta").toDouble(),
          data.at("gamma").toDouble(), data.at("sup_temperature").toDouble(), data.at("base_temperature").toDouble(),
          data.at("reduction").toStringRef(), data.at("ignore_index").toInt());
    }
    if (ctx->needs_input_grad(0)) result[0] = grad_similarity;
    if (sup_logits.defined() && ctx->needs_input_grad(3)) result[3] = grad_sup;
    variable_list differentiable = {similarity, grads[0]};
    if (sup_logits.defined()) differentiable.push_back(sup_logits);
    refuse_double_backward(result, kOp, differentiable);
    return result;
  }
};

ForwardOutputs paco_forward_autograd(const at::Tensor& similarity, const at::Tensor& labels,
                                     const at::Tensor& key_labels, const OptionalTensor& sup_logits,
                                     const OptionalTensor& log_prior, double temperature, double alpha, double beta,
                                     double gamma, double sup_temperature, double base_temperature,
                                     c10::string_view reduction, int64_t ignore_index, bool with_grad) {
  TORCH_CHECK(!(defined(log_prior) && log_prior->requires_grad() && at::GradMode::is_enabled()), kOp,
              ": the gradient with respect to `log_prior` is not implemented (a constant of the training set, as "
              "in the original); pass log_prior.detach()");
  // The forward-time gradient is written for similarity and sup_logits alike, so it is asked for when
  // either needs one (wants_forward_grad looks at one tensor: the other is checked here).
  bool wants = wants_forward_grad(similarity, with_grad, cross_entropy_forward_gradient_enabled());
  if (!wants && defined(sup_logits) && !similarity.requires_grad()) {
    wants = wants_forward_grad(*sup_logits, false, cross_entropy_forward_gradient_enabled()) &&
            is_plain_tensor(similarity);
  }
  auto out = PacoFunction::apply(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta,
                                 gamma, sup_temperature, base_temperature, reduction, ignore_index, wants);
  return {out[0], out[1], out[2], requested_forward_grad(with_grad, out[3], similarity),
          requested_forward_grad(with_grad, out[4], similarity)};
}

// The float32 loss of the public op, for Autocast (autograd_common.h). similarity and sup_logits must
// share a dtype: where autocast left them different (e.g. a float32 classifier head next to a bfloat16
// matmul), both are read as float32.
at::Tensor paco_float_loss(const at::Tensor& similarity, const at::Tensor& labels, const at::Tensor& key_labels,
                           const OptionalTensor& sup_logits, const OptionalTensor& log_prior, double temperature,
                           double alpha, double beta, double gamma, double sup_temperature,
                           c10::optional<double> base_temperature, c10::string_view reduction, int64_t ignore_index) {
  at::Tensor sim = similarity.contiguous();
  OptionalTensor sup = defined(sup_logits) ? OptionalTensor(sup_logits->contiguous()) : OptionalTensor();
  if (sup.has_value() && sup->scalar_type() != sim.scalar_type() && is_supported_float(sim.scalar_type()) &&
      is_supported_float(sup->scalar_type())) {
    const auto common = at::promote_types(at::promote_types(sim.scalar_type(), sup->scalar_type()), at::kFloat);
    sim = sim.to(common);
    sup = sup->to(common);
  }
  return std::get<0>(paco_forward_op().call(sim, labels, key_labels, sup, log_prior, temperature, alpha, beta, gamma,
                                            sup_temperature, base_temperature.value_or(temperature), reduction,
                                            ignore_index, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(ltfast, Autograd, m) { m.impl("_paco_forward", TORCH_FN(paco_forward_autograd)); }

TORCH_LIBRARY_IMPL(ltfast, AutocastCPU, m) {
  m.impl("paco_loss", TORCH_FN(Autocast<paco_float_loss>::call<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(ltfast, AutocastCUDA, m) {
  m.impl("paco_loss", TORCH_FN(Autocast<paco_float_loss>::call<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace autograd
}  // namespace ltfast
