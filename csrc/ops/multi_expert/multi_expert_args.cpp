#include "multi_expert.h"

#include <ATen/ATen.h>

#include <cmath>

namespace ltfast {

namespace {

void check_expert_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be a 3-D tensor [N, E, C] of expert logits, got a ",
                    logits.dim(), "-D tensor of shape ", logits.sizes());
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()), op,
                   ": logits must be float32, float64, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one expert (E >= 1), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) >= 1, op, ": logits must have at least one class (C >= 1), got shape ",
                    logits.sizes());
}

// A per-class vector of the [N, E, C] logits: 1-D float of C elements, converted to the accumulation dtype.
at::Tensor class_vector(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& logits,
                        at::ScalarType accumulate_type, const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const int64_t C = logits.size(2);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must be a 1-D tensor of C = ", C,
                    " elements (one per class of logits), got shape ", t->sizes());
  TORCH_CHECK_TYPE(is_supported_float(t->scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                   t->scalar_type());
  check_same_device(*t, name, logits, op);
  return t->to(accumulate_type).contiguous();
}

MultiExpertArgs common_args(const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  check_expert_logits(logits, op);
  TORCH_CHECK_VALUE(target.dim() == 1, op, ": target must be a 1-D tensor [N] of class indices, got a ",
                    target.dim(), "-D tensor of shape ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be an int64 tensor of class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == logits.size(0), op, ": target must have N = ", logits.size(0),
                    " elements (one per row of logits [N, E, C]), got shape ", target.sizes());
  check_same_device(target, "target", logits, op);
  MultiExpertArgs args;
  args.accumulate_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.logits = logits.contiguous();
  args.target = target.contiguous();
  args.ignore_index = ignore_index;
  args.num_rows = logits.size(0);
  args.num_experts = logits.size(1);
  args.num_classes = logits.size(2);
  return args;
}

}  // namespace

MultiExpertArgs prepare_diverse_expert_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                            const at::Tensor& adjustments, c10::string_view reduction,
                                            int64_t ignore_index) {
  MultiExpertArgs args = common_args(op, logits, target, ignore_index);
  TORCH_CHECK_VALUE(adjustments.dim() == 2 && adjustments.size(0) == args.num_experts &&
                        adjustments.size(1) == args.num_classes,
                    op, ": adjustments must be a 2-D tensor [E = ", args.num_experts, ", C = ", args.num_classes,
                    "] (one per-class adjustment per expert), got shape ", adjustments.sizes());
  TORCH_CHECK_TYPE(is_supported_float(adjustments.scalar_type()), op,
                   ": adjustments must be a floating-point tensor, got ", adjustments.scalar_type());
  check_same_device(adjustments, "adjustments", logits, op);
  args.adjustments = adjustments.to(args.accumulate_type).contiguous();
  args.reduction = parse_reduction(reduction, op);
  return args;
}

MultiExpertArgs prepare_ride_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& target_margin,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& temperature, double base_temperature,
                                  double diversity_factor, int64_t ignore_index) {
  MultiExpertArgs args = common_args(op, logits, target, ignore_index);
  TORCH_CHECK_VALUE(std::isfinite(base_temperature) && base_temperature > 0.0, op,
                    ": base_temperature must be a finite number > 0, got ", base_temperature);
  TORCH_CHECK_VALUE(std::isfinite(diversity_factor), op, ": diversity_factor must be finite, got ",
                    diversity_factor);
  args.target_margin = class_vector(target_margin, "target_margin", logits, args.accumulate_type, op);
  args.weight = class_vector(weight, "weight", logits, args.accumulate_type, op);
  args.temperature = class_vector(temperature, "temperature", logits, args.accumulate_type, op);
  args.base_temperature = base_temperature;
  args.diversity_factor = diversity_factor;
  args.reduction = Reduction::Mean;
  return args;
}

void check_multi_expert_backward_args(const char* op, const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& row_stats, int64_t stats_per_row,
                                      const at::Tensor& denominator, int64_t denominator_size) {
  TORCH_CHECK_VALUE(row_stats.dim() == 3 && row_stats.size(0) == 2 && row_stats.size(1) == args.num_rows &&
                        row_stats.size(2) == stats_per_row,
                    op, ": row_stats must have shape [2, N = ", args.num_rows, ", ", stats_per_row, "], got shape ",
                    row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == args.accumulate_type, op, ": row_stats must be ",
                   args.accumulate_type, ", got ", row_stats.scalar_type());
  check_same_device(row_stats, "row_stats", args.logits, op);
  TORCH_CHECK_VALUE(denominator.numel() == denominator_size, op, ": denominator must have ", denominator_size,
                    " element(s), got shape ", denominator.sizes());
  check_same_device(denominator, "denominator", args.logits, op);
  if (args.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == args.num_rows, op,
                      ": grad_loss must be a 1-D tensor of N = ", args.num_rows, " elements, got shape ",
                      grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ", grad_loss.sizes());
  }
  check_same_device(grad_loss, "grad_loss", args.logits, op);
}

}  // namespace ltfast
