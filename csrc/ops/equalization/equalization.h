// Equalization loss (Tan et al., CVPR 2020), the sigmoid form: per-class binary cross-entropy with
// the negative term of tail classes suppressed, summed over classes, averaged over the rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../../common/checks.h"

namespace ltfast {

struct EqualizationArgs {
  at::Tensor logits;     // contiguous
  at::Tensor target;     // contiguous int64
  at::Tensor tail_mask;  // uint8 [C]
  Reduction reduction = Reduction::Mean;
  int64_t ignore_index = -100;
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  at::ScalarType accumulate_type = at::kFloat;
};

EqualizationArgs prepare_equalization_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                           const at::Tensor& tail_mask, c10::string_view reduction,
                                           int64_t ignore_index);

// (loss: [N] for 'none' else scalar, denominator: number of non-ignored rows for 'mean', else 1)
using EqualizationForwardResult = std::tuple<at::Tensor, at::Tensor>;
EqualizationForwardResult equalization_forward_cpu(const EqualizationArgs& args);
at::Tensor equalization_backward_cpu(const EqualizationArgs& args, const at::Tensor& grad_loss,
                                     const at::Tensor& denominator);
EqualizationForwardResult equalization_forward_cuda(const EqualizationArgs& args);
at::Tensor equalization_backward_cuda(const EqualizationArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& denominator);

template <EqualizationForwardResult (*kernel)(const EqualizationArgs&)>
EqualizationForwardResult equalization_forward(const at::Tensor& logits, const at::Tensor& target,
                                               const at::Tensor& tail_mask, c10::string_view reduction,
                                               int64_t ignore_index) {
  return kernel(prepare_equalization_args("ltfast.equalization_loss", logits, target, tail_mask, reduction,
                                          ignore_index));
}

template <at::Tensor (*kernel)(const EqualizationArgs&, const at::Tensor&, const at::Tensor&)>
at::Tensor equalization_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& tail_mask, const at::Tensor& denominator,
                                 c10::string_view reduction, int64_t ignore_index) {
  const char* op = "ltfast._equalization_loss_backward";
  const auto args = prepare_equalization_args(op, logits, target, tail_mask, reduction, ignore_index);
  if (args.reduction == Reduction::None) {
    check_row_statistic(grad_loss, "grad_loss", args.logits, op);
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ", grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(denominator.numel() == 1, op, ": denominator must have one element");
  check_same_device(grad_loss, "grad_loss", args.logits, op);
  check_same_device(denominator, "denominator", args.logits, op);
  return kernel(args, grad_loss, denominator);
}

}  // namespace ltfast
