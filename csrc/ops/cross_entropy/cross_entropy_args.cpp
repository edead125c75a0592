#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>

namespace ltfast {

namespace {

at::Tensor class_vector_or_undefined(const c10::optional<at::Tensor>& t, const char* name,
                                     const at::Tensor& logits, at::ScalarType accumulate_type,
                                     const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_class_vector(*t, name, logits, op);
  // [C] elements: converting costs nothing next to the [N, C] pass, and the kernels then read one
  // dtype. The nn modules store their buffers in float32 already, so this is usually a no-op.
  return t->to(accumulate_type).contiguous();
}

}  // namespace

CrossEntropyArgs prepare_cross_entropy_args(const char* op, const at::Tensor& logits,
                                            const at::Tensor& target,
                                            const c10::optional<at::Tensor>& adjustment,
                                            const char* adjustment_name,
                                            const c10::optional<at::Tensor>& target_margin,
                                            const c10::optional<at::Tensor>& weight, double gamma,
                                            double label_smoothing, c10::string_view reduction,
                                            int64_t ignore_index) {
  check_logits(logits, op);
  check_target(target, logits, op);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0, op, ": gamma must be a finite number >= 0, got ",
                    gamma);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(gamma == 0.0 || label_smoothing == 0.0, op,
                    ": gamma > 0 (focal) together with label_smoothing > 0 is not supported; "
                    "use one of them, got gamma=", gamma, " and label_smoothing=", label_smoothing);

  CrossEntropyArgs args;
  args.accumulate_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.logits = logits.contiguous();
  args.target = target.contiguous();
  args.adjustment = class_vector_or_undefined(adjustment, adjustment_name, logits, args.accumulate_type, op);
  args.target_margin = class_vector_or_undefined(target_margin, "target_margin", logits, args.accumulate_type, op);
  args.weight = class_vector_or_undefined(weight, "weight", logits, args.accumulate_type, op);
  args.gamma = gamma;
  args.label_smoothing = label_smoothing;
  args.reduction = parse_reduction(reduction, op);
  args.ignore_index = ignore_index;
  args.num_rows = logits.size(0);
  args.num_classes = logits.size(1);
  return args;
}

CrossEntropyArgs prepare_seql_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& tail_mask, const at::Tensor& seed, double gamma,
                                   c10::string_view reduction, int64_t ignore_index) {
  CrossEntropyArgs args = prepare_cross_entropy_args(op, logits, target, c10::nullopt, "adjustment", c10::nullopt,
                                                     c10::nullopt, 0.0, 0.0, reduction, ignore_index);
  check_tail_mask(tail_mask, logits, op);
  TORCH_CHECK_VALUE(seed.numel() == 2 && seed.scalar_type() == at::kLong, op,
                    ": seed must be an int64 tensor of 2 elements (e.g. ltfast.ops.new_seed(device)), got ",
                    seed.scalar_type(), " of shape ", seed.sizes());
  check_same_device(seed, "seed", logits, op);
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, op, ": gamma (drop probability) must be in [0, 1], got ", gamma);
  args.tail_mask = tail_mask.to(at::kByte).contiguous();
  args.seed = seed.contiguous();
  args.drop_probability = gamma;
  return args;
}

void check_cross_entropy_backward_args(const char* op, const CrossEntropyArgs& args,
                                       const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                       const at::Tensor& denominator) {
  check_row_stats(row_stats, args.logits, args.accumulate_type, op);
  TORCH_CHECK_VALUE(denominator.numel() == 1, op, ": denominator must have one element, got shape ",
                    denominator.sizes());
  check_same_device(denominator, "denominator", args.logits, op);
  if (args.reduction == Reduction::None) {
    check_row_statistic(grad_loss, "grad_loss", args.logits, op);
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element for reduction '",
                      args.reduction == Reduction::Mean ? "mean" : "sum", "', got shape ", grad_loss.sizes());
    check_same_device(grad_loss, "grad_loss", args.logits, op);
  }
}

// ltfast::_scale_forward_grad_(grad, upstream): grad is a forward-time gradient (contiguous, floating,
// at least 1-D: its rows are dim 0), upstream a scalar or one factor per row on the same device.
void check_scale_forward_grad_args(const at::Tensor& grad, const at::Tensor& upstream) {
  const char* op = "ltfast._scale_forward_grad_";
  TORCH_CHECK_VALUE(grad.dim() >= 1 && grad.is_contiguous() && at::isFloatingType(grad.scalar_type()), op,
                    ": grad must be a contiguous floating tensor of at least one dimension, got shape ", grad.sizes(),
                    " and dtype ", grad.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(upstream.scalar_type()), op, ": upstream must be floating, got ",
                    upstream.scalar_type());
  TORCH_CHECK_VALUE(upstream.dim() == 0 || (upstream.dim() == 1 && upstream.size(0) == grad.size(0)), op,
                    ": upstream must be a scalar or have one value per row of grad (", grad.size(0),
                    "), got shape ", upstream.sizes());
  check_same_device(upstream, "upstream", grad, op);
}

// The CPU kernel of ltfast::_scale_forward_grad_ (the CPU autograd scales on the host instead; this
// is the op's reference and CPU form): x *= factor in the accumulation type, rows whose factor is 1
// unchanged, elements that are 0 stay +0.
void scale_forward_grad_cpu(at::Tensor& grad, const at::Tensor& upstream) {
  check_scale_forward_grad_args(grad, upstream);
  if (grad.numel() == 0) return;
  std::vector<int64_t> factor_shape(grad.dim(), 1);
  if (upstream.dim() == 1) factor_shape[0] = grad.size(0);
  const at::Tensor factor = upstream.to(at::toOpMathType(grad.scalar_type())).reshape(factor_shape);
  const at::Tensor product = grad.to(factor.scalar_type()).mul(factor);
  grad.copy_(at::where(grad == 0, at::zeros({}, grad.options()), product));
}

}  // namespace ltfast
