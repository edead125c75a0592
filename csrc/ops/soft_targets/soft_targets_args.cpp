#include "soft_targets.h"

#include <ATen/ATen.h>

#include <cmath>

namespace ltfast {

MixedArgs prepare_mixed_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                             const c10::optional<at::Tensor>& target_b, const c10::optional<at::Tensor>& mix_weight,
                             double mix, const c10::optional<at::Tensor>& adjustment,
                             const c10::optional<at::Tensor>& target_margin, const c10::optional<at::Tensor>& weight,
                             double gamma, double label_smoothing,
                             const c10::optional<at::Tensor>& class_label_smoothing, c10::string_view reduction,
                             int64_t ignore_index) {
  MixedArgs args;
  args.ce = prepare_cross_entropy_args(op, logits, target, adjustment, "adjustment", target_margin, weight, gamma,
                                       label_smoothing, reduction, ignore_index);
  const bool has_b = target_b.has_value() && target_b->defined();
  if (has_b) {
    const at::Tensor& b = *target_b;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == logits.size(0), op,
                      ": target_b must be a 1-D tensor of N = ", logits.size(0), " class indices, got shape ",
                      b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == at::kLong, op, ": target_b must be an int64 tensor of class indices, got ",
                     b.scalar_type());
    check_same_device(b, "target_b", logits, op);
    // LDAM's margin changes the softmax per target: the two terms would need two softmaxes.
    TORCH_CHECK_VALUE(!args.ce.target_margin.defined(), op,
                      ": target_margin (LDAM) cannot be combined with target_b: the margin is subtracted from "
                      "the target's logit, so the two targets would need two different softmaxes. Use a loss "
                      "without a margin for mixed targets, or mix the inputs only");
    args.target_b = b.contiguous();
  }
  const bool has_mix = mix_weight.has_value() && mix_weight->defined();
  if (has_mix) {
    const at::Tensor& w = *mix_weight;
    TORCH_CHECK_VALUE(has_b, op, ": mix_weight is only meaningful together with target_b");
    TORCH_CHECK_VALUE(w.dim() == 0 || (w.dim() == 1 && w.size(0) == logits.size(0)), op,
                      ": mix_weight must be a 0-dim tensor (one lambda for every row) or a 1-D tensor of N = ",
                      logits.size(0), " elements, got shape ", w.sizes());
    TORCH_CHECK_TYPE(is_supported_float(w.scalar_type()), op, ": mix_weight must be a floating-point tensor, got ",
                     w.scalar_type());
    check_same_device(w, "mix_weight", logits, op);
    args.mix_weight = w.to(args.ce.accumulate_type).contiguous();
  }
  TORCH_CHECK_VALUE(std::isfinite(mix), op, ": mix must be a finite number, got ", mix);
  TORCH_CHECK_VALUE(has_b || mix == 1.0, op, ": mix = ", mix, " needs target_b (the second target)");
  args.mix = mix;
  if (class_label_smoothing.has_value() && class_label_smoothing->defined()) {
    const at::Tensor& eps = *class_label_smoothing;
    check_class_vector(eps, "class_label_smoothing", logits, op);
    TORCH_CHECK_VALUE(label_smoothing == 0.0, op,
                      ": give label_smoothing either as a float or per class (class_label_smoothing), not both; "
                      "got label_smoothing=", label_smoothing);
    TORCH_CHECK_VALUE(gamma == 0.0, op,
                      ": gamma > 0 (focal) together with label smoothing is not supported, got gamma=", gamma,
                      " and a per-class label_smoothing");
    args.class_smoothing = eps.to(args.ce.accumulate_type).contiguous();
    if (!eps.is_cuda()) {  // a value check on the GPU would synchronise the host; ltfast.nn checks at construction
      const bool in_range = ((args.class_smoothing >= 0) & (args.class_smoothing <= 1)).all().item<bool>();
      TORCH_CHECK_VALUE(in_range, op, ": every per-class label_smoothing must be in [0, 1], got min ",
                        args.class_smoothing.min().item<double>(), " and max ",
                        args.class_smoothing.max().item<double>());
    }
  }
  return args;
}

CrossEntropyArgs prepare_probability_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                          const c10::optional<at::Tensor>& adjustment,
                                          const c10::optional<at::Tensor>& weight, double label_smoothing,
                                          c10::string_view reduction) {
  check_logits(logits, op);
  TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), op,
                    ": a probability target must have the logits' shape [N, C] = ", logits.sizes(), ", got ",
                    target.sizes());
  TORCH_CHECK_TYPE(is_supported_float(target.scalar_type()), op,
                   ": a probability target must be a floating-point tensor, got ", target.scalar_type());
  check_same_device(target, "target", logits, op);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  CrossEntropyArgs args;
  args.accumulate_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.logits = logits.contiguous();
  auto class_vector = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    check_class_vector(*t, name, logits, op);
    return t->to(args.accumulate_type).contiguous();
  };
  args.adjustment = class_vector(adjustment, "adjustment");
  args.weight = class_vector(weight, "weight");
  args.label_smoothing = label_smoothing;
  args.reduction = parse_reduction(reduction, op);
  args.num_rows = logits.size(0);
  args.num_classes = logits.size(1);
  // Targets in the logits dtype are read as they are; any other dtype is read in the accumulation
  // dtype (float32 probabilities with bf16 logits, as autocast produces, keep their precision).
  args.target = target.scalar_type() == logits.scalar_type() ? target.contiguous()
                                                             : target.to(args.accumulate_type).contiguous();
  return args;
}

void check_mixed_backward_args(const char* op, const MixedArgs& args, const at::Tensor& grad_loss,
                               const at::Tensor& row_stats, const at::Tensor& denominators) {
  check_row_stats(row_stats, args.ce.logits, args.ce.accumulate_type, op);
  TORCH_CHECK_VALUE(denominators.numel() == 2, op,
                    ": denominator must have two elements (one per target term), got shape ", denominators.sizes());
  check_same_device(denominators, "denominator", args.ce.logits, op);
  if (args.ce.reduction == Reduction::None) {
    check_row_statistic(grad_loss, "grad_loss", args.ce.logits, op);
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element for a reduced loss, got shape ",
                      grad_loss.sizes());
    check_same_device(grad_loss, "grad_loss", args.ce.logits, op);
  }
}

void check_probability_backward_args(const char* op, const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                     const at::Tensor& row_stats, const at::Tensor& denominator) {
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == 3 && row_stats.size(1) == args.num_rows, op,
                    ": row_stats must have shape [3, N = ", args.num_rows,
                    "] (row max, log-sum-exp offset and target mass per row), got shape ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == args.accumulate_type, op, ": row_stats must be ",
                   args.accumulate_type, ", got ", row_stats.scalar_type());
  check_same_device(row_stats, "row_stats", args.logits, op);
  TORCH_CHECK_VALUE(denominator.numel() == 1, op, ": denominator must have one element, got shape ",
                    denominator.sizes());
  check_same_device(denominator, "denominator", args.logits, op);
  if (args.reduction == Reduction::None) {
    check_row_statistic(grad_loss, "grad_loss", args.logits, op);
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element for a reduced loss, got shape ",
                      grad_loss.sizes());
    check_same_device(grad_loss, "grad_loss", args.logits, op);
  }
}

}  // namespace ltfast
