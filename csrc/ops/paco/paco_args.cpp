// Argument checks of the PaCo ops (paco.h), shared by every backend (CPU, CUDA, the simt emulator).
// Nothing here reads tensor values: the label range (labels in [0, C) or ignore_index when C > 0) is
// checked by the CPU kernel as it reads each label (an IndexError naming the row, as the
// cross-entropy family's checked_target), and by a device-side assert on CUDA.
#include "paco.h"

#include <ATen/ATen.h>

#include <cmath>

namespace ltfast {

namespace {

void check_label_vector(const at::Tensor& t, const char* name, int64_t size, const char* size_name,
                        const at::Tensor& similarity, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D tensor [", size_name, "] of labels, got a ",
                    t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor of labels, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) == size, op, ": ", name, " must have ", size_name, " = ", size,
                    " elements, got shape ", t.sizes());
  TORCH_CHECK(t.device() == similarity.device(), op, ": ", name, " must be on the same device as similarity (",
              similarity.device(), "), got ", t.device());
}

void check_positive_temperature(double value, const char* name, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0.0, op, ": ", name, " must be a finite number > 0, got ",
                    value);
}

void check_nonnegative_weight(double value, const char* name, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op, ": ", name, " must be a finite number >= 0, got ",
                    value);
}

}  // namespace

PacoArgs prepare_paco_args(const char* op, const at::Tensor& similarity, const at::Tensor& labels,
                           const at::Tensor& key_labels, const c10::optional<at::Tensor>& sup_logits,
                           const c10::optional<at::Tensor>& log_prior, double temperature, double alpha,
                           double beta, double gamma, double sup_temperature, double base_temperature,
                           c10::string_view reduction, int64_t ignore_index) {
  TORCH_CHECK_VALUE(similarity.dim() == 2, op,
                    ": similarity must be a 2-D tensor [B, M] (anchors x keys, q @ keys.T), got a ",
                    similarity.dim(), "-D tensor of shape ", similarity.sizes());
  TORCH_CHECK_TYPE(is_supported_float(similarity.scalar_type()), op,
                   ": similarity must be float32, float64, float16 or bfloat16, got ", similarity.scalar_type());
  const int64_t B = similarity.size(0), M = similarity.size(1);
  // The first B keys are the anchors themselves (key column i is anchor i's self-contrast).
  TORCH_CHECK_VALUE(M >= B, op, ": similarity [B, M] must have at least as many keys as anchors (M >= B: the "
                    "first B keys are the anchors themselves), got shape ", similarity.sizes());
  check_label_vector(labels, "labels", B, "B", similarity, op);
  check_label_vector(key_labels, "key_labels", M, "M", similarity, op);
  check_positive_temperature(temperature, "temperature", op);
  check_positive_temperature(sup_temperature, "sup_temperature", op);
  check_positive_temperature(base_temperature, "base_temperature", op);
  check_nonnegative_weight(alpha, "alpha", op);
  check_nonnegative_weight(beta, "beta", op);
  check_nonnegative_weight(gamma, "gamma", op);

  PacoArgs args;
  args.accumulate_type = similarity.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.similarity = similarity.contiguous();
  args.labels = labels.contiguous();
  args.key_labels = key_labels.contiguous();
  const bool has_classes = sup_logits.has_value() && sup_logits->defined();
  if (has_classes) {
    const at::Tensor& s = *sup_logits;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == B, op, ": sup_logits must be a 2-D tensor [B = ", B,
                      ", C] (one row of class logits per anchor), got shape ", s.sizes());
    TORCH_CHECK_VALUE(s.size(1) >= 1, op,
                      ": sup_logits must have at least one class (C >= 1; pass None for no class columns), "
                      "got shape ", s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == similarity.scalar_type(), op,
                     ": sup_logits must have the same dtype as similarity (", similarity.scalar_type(), "), got ",
                     s.scalar_type());
    TORCH_CHECK(s.device() == similarity.device(), op, ": sup_logits must be on the same device as similarity (",
                similarity.device(), "), got ", s.device());
    args.sup_logits = s.contiguous();
    args.num_classes = s.size(1);
  }
  if (log_prior.has_value() && log_prior->defined()) {
    const at::Tensor& p = *log_prior;
    TORCH_CHECK_VALUE(has_classes, op, ": log_prior is added to sup_logits, which is None; pass sup_logits or "
                      "drop log_prior");
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == args.num_classes, op, ": log_prior must be a 1-D tensor of C = ",
                      args.num_classes, " elements (one per class of sup_logits), got shape ", p.sizes());
    TORCH_CHECK_TYPE(is_supported_float(p.scalar_type()), op, ": log_prior must be a floating-point tensor, got ",
                     p.scalar_type());
    TORCH_CHECK(p.device() == similarity.device(), op, ": log_prior must be on the same device as similarity (",
                similarity.device(), "), got ", p.device());
    // [C] elements: converting costs nothing next to the [B, C + M] pass, and the kernels read one dtype.
    args.log_prior = p.to(args.accumulate_type).contiguous();
  }
  args.inv_temperature = 1.0 / temperature;
  args.inv_sup_temperature = 1.0 / sup_temperature;
  args.alpha = alpha;
  args.beta = beta;
  args.gamma = gamma;
  args.loss_scale = temperature / base_temperature;
  args.reduction = parse_reduction(reduction, op);
  args.ignore_index = ignore_index;
  args.num_rows = B;
  args.num_keys = M;
  return args;
}

void check_paco_backward_args(const char* op, const PacoArgs& args, const at::Tensor& grad_loss,
                              const at::Tensor& row_stats, const at::Tensor& denominator) {
  const at::Tensor& similarity = args.similarity;
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == 2 && row_stats.size(1) == args.num_rows, op,
                    ": row_stats must have shape [2, B = ", args.num_rows,
                    "] (log-sum-exp and positive weight per anchor), got shape ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == args.accumulate_type, op, ": row_stats must be ",
                   args.accumulate_type, ", got ", row_stats.scalar_type());
  TORCH_CHECK(row_stats.device() == similarity.device(), op, ": row_stats must be on the same device as similarity (",
              similarity.device(), "), got ", row_stats.device());
  TORCH_CHECK_VALUE(denominator.numel() == 1, op, ": denominator must have one element, got shape ",
                    denominator.sizes());
  TORCH_CHECK(denominator.device() == similarity.device(), op,
              ": denominator must be on the same device as similarity (", similarity.device(), "), got ",
              denominator.device());
  if (args.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == args.num_rows, op,
                      ": grad_loss must be a 1-D tensor of B = ", args.num_rows,
                      " elements for reduction 'none', got shape ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element for reduction '",
                      args.reduction == Reduction::Mean ? "mean" : "sum", "', got shape ", grad_loss.sizes());
  }
  TORCH_CHECK(grad_loss.device() == similarity.device(), op, ": grad_loss must be on the same device as similarity (",
              similarity.device(), "), got ", grad_loss.device());
}

}  // namespace ltfast
