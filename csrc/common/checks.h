// Input validation shared by every op and backend. Each message names the op, the argument and
// what was expected, so that a user sees e.g. "ltfast.balanced_softmax: log_prior must have C = 10
// elements (one per class of logits), got shape [9]".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace ltfast {

enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

inline Reduction parse_reduction(c10::string_view reduction, const char* op) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, op, ": reduction must be 'none', 'mean' or 'sum', got '",
                    std::string(reduction), "'");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be a 2-D tensor [N, C], got a ",
                    logits.dim(), "-D tensor of shape ", logits.sizes());
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()), op,
                   ": logits must be float32, float64, float16 or bfloat16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one class (C >= 1), got shape ",
                    logits.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& logits,
                              const char* op) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the same device as logits (",
              logits.device(), "), got ", t.device());
}

inline void check_target(const at::Tensor& target, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(target.dim() == 1, op, ": target must be a 1-D tensor [N] of class indices, got a ",
                    target.dim(), "-D tensor of shape ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                   ": target must be an int64 tensor of class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == logits.size(0), op, ": target must have N = ", logits.size(0),
                    " elements (one per row of logits), got shape ", target.sizes());
  check_same_device(target, "target", logits, op);
}

// A per-class vector (log prior, adjustment, margin, weight): 1-D float of C elements.
inline void check_class_vector(const at::Tensor& t, const char* name, const at::Tensor& logits,
                               const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(1), op, ": ", name, " must be a 1-D tensor of C = ",
                    logits.size(1), " elements (one per class of logits), got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  check_same_device(t, name, logits, op);
}

// The equalization losses' per-class tail flags: 1-D bool (or uint8) of C elements.
inline void check_tail_mask(const at::Tensor& tail_mask, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(tail_mask.dim() == 1 && tail_mask.size(0) == logits.size(1), op,
                    ": tail_mask must be a 1-D tensor of C = ", logits.size(1), " elements, got shape ",
                    tail_mask.sizes());
  TORCH_CHECK_TYPE(tail_mask.scalar_type() == at::kBool || tail_mask.scalar_type() == at::kByte, op,
                   ": tail_mask must be a bool (or uint8) tensor, got ", tail_mask.scalar_type());
  check_same_device(tail_mask, "tail_mask", logits, op);
}

// A per-row vector handed to a backward op (grad_loss of reduction 'none'): 1-D of N elements.
inline void check_row_statistic(const at::Tensor& t, const char* name, const at::Tensor& logits,
                                const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name,
                    " must be a 1-D tensor of N = ", logits.size(0), " elements, got shape ", t.sizes());
  check_same_device(t, name, logits, op);
}

// The per-row softmax statistics a forward op saves for backward (math::RowLogSumExp of each row):
// row_stats [2, N] in the accumulation dtype, row_stats[0] = max m of the adjusted row,
// row_stats[1] = log sum_c exp(a_c - m); both 0 for ignored rows.
inline void check_row_stats(const at::Tensor& row_stats, const at::Tensor& logits,
                            at::ScalarType accumulate_type, const char* op) {
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == 2 && row_stats.size(1) == logits.size(0), op,
                    ": row_stats must have shape [2, N = ", logits.size(0),
                    "] (row max and log-sum-exp offset per row), got shape ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == accumulate_type, op, ": row_stats must be ", accumulate_type,
                   ", got ", row_stats.scalar_type());
  check_same_device(row_stats, "row_stats", logits, op);
}

}  // namespace ltfast
