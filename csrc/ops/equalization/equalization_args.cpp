#include "equalization.h"

#include <ATen/ATen.h>

namespace ltfast {

EqualizationArgs prepare_equalization_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                           const at::Tensor& tail_mask, c10::string_view reduction,
                                           int64_t ignore_index) {
  check_logits(logits, op);
  check_target(target, logits, op);
  check_tail_mask(tail_mask, logits, op);
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
