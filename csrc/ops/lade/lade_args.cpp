#include "lade.h"

#include <ATen/ATen.h>

#include <cmath>

namespace ltfast {

double lade_balanced_log_prior(int64_t num_classes) {
  return std::log(1.0 / static_cast<double>(num_classes) + 1e-9);
}

LadeArgs prepare_lade_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                           const at::Tensor& log_prior, double ce_weight, double alpha,
                           double remine_lambda, int64_t ignore_index) {
  check_logits(logits, op);
  check_target(target, logits, op);
  check_class_vector(log_prior, "log_prior", logits, op);
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(remine_lambda) && remine_lambda >= 0.0, op,
                    ": remine_lambda must be a finite number >= 0, got ", remine_lambda);
  TORCH_CHECK_VALUE(std::isfinite(ce_weight), op, ": ce_weight must be finite, got ", ce_weight);
  LadeArgs args;
  args.accumulate_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.logits = logits.contiguous();
  args.target = target.contiguous();
  args.log_prior = log_prior.to(args.accumulate_type).contiguous();
  args.ce_weight = ce_weight;
  args.alpha = alpha;
  args.remine_lambda = remine_lambda;
  args.ignore_index = ignore_index;
  args.num_rows = logits.size(0);
  args.num_classes = logits.size(1);
  return args;
}

void check_lade_backward_args(const char* op, const LadeArgs& args, const at::Tensor& grad_loss,
                              const at::Tensor& row_stats, const at::Tensor& column_stats,
                              const at::Tensor& num_valid) {
  check_row_stats(row_stats, args.logits, args.accumulate_type, op);
  TORCH_CHECK_VALUE(column_stats.dim() == 2 && column_stats.size(0) == 4 && column_stats.size(1) == args.num_classes,
                    op, ": column_stats must have shape [4, C = ", args.num_classes, "], got ", column_stats.sizes());
  TORCH_CHECK_TYPE(column_stats.scalar_type() == args.accumulate_type, op, ": column_stats must be ",
                   args.accumulate_type, ", got ", column_stats.scalar_type());
  TORCH_CHECK_TYPE(num_valid.scalar_type() == at::kLong, op, ": num_valid must be int64, got ",
                   num_valid.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(num_valid.numel() == 1, op, ": num_valid must have one element, got shape ", num_valid.sizes());
  check_same_device(column_stats, "column_stats", args.logits, op);
  check_same_device(grad_loss, "grad_loss", args.logits, op);
  check_same_device(num_valid, "num_valid", args.logits, op);
}

}  // namespace ltfast
