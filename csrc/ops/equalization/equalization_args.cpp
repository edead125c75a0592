#include "equalization.h"

#include <ATen/ATen.h>

namespace ltfast {

EqualizationArgs prepare_equalization_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                           const at::Tensor& tail_mask, c10::string_view reduction,
                                           int64_t ignore_index) {
  check_logits(logits, op);
  check_target(target, logits, op);
  TORCH_CHECK_VALUE(tail_mask.dim() == 1 && tail_mask.size(0) == logits.size(1), op,
                    ": tail_mask must be a 1-D tensor of C = ", logits.size(1), " elements, got shape ",
                    tail_mask.sizes());
  TORCH_CHECK_TYPE(tail_mask.scalar_type() == at::kBool || tail_mask.scalar_type() == at::kByte, op,
                   ": tail_mask must be a bool (or uint8) tensor, got ", tail_mask.scalar_type());
  check_same_device(tail_mask, "tail_mask", logits, op);
  EqualizationArgs args;
  args.accumulate_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.logits = logits.contiguous();
  args.target = target.contiguous();
  args.tail_mask = tail_mask.to(at::kByte).contiguous();
  args.reduction = parse_reduction(reduction, op);
  args.ignore_index = ignore_index;
  args.num_rows = logits.size(0);
  args.num_classes = logits.size(1);
  return args;
}

}  // namespace ltfast
