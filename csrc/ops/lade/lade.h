// LADE (Hong et al. 2021) as the survey's code computes it (seed-methods.md §1.4-1.5):
//   loss = ce_weight * PriorCE_mean + alpha * LADER
//   LADER = -sum_c pi_c (F_c - S_c - lambda S_c^2)
//   F_c = sum_{i: y_i = c} z_ic / (n_c + 1e-8)                       (mean target logit of class c)
//   S_c = log sum_i exp(z_ic - log_prior_c + log(1/C + 1e-9)) - log N  (column log-mean-exp)
// over the N non-ignored rows, with pi_c = exp(log_prior_c). ltfast::lade uses ce_weight = 1,
// ltfast::lade_regularizer ce_weight = 0 and alpha = 1; both share the private ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../../common/checks.h"

namespace ltfast {

struct LadeArgs {
  at::Tensor logits;     // contiguous, own dtype
  at::Tensor target;     // contiguous int64
  at::Tensor log_prior;  // contiguous, accumulation dtype
  double ce_weight = 1.0;
  double alpha = 0.1;
  double remine_lambda = 0.1;
  int64_t ignore_index = -100;
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  at::ScalarType accumulate_type = at::kFloat;
};

// log(1/C + 1e-9): the survey's "balanced prior" shift of the column log-sum-exp.
double lade_balanced_log_prior(int64_t num_classes);

LadeArgs prepare_lade_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                           const at::Tensor& log_prior, double ce_weight, double alpha,
                           double remine_lambda, int64_t ignore_index);

// Forward: (loss, row_stats [2, N], column_stats [4, C], num_valid), all in the accumulation dtype
// (float32, float64 for float64 logits) except num_valid.
// row_stats, per row i (PriorCE's softmax over a_ic = z_ic + log_prior_c; math::RowLogSumExp):
//   0: m_i = max_c a_ic
//   1: log sum_c exp(a_ic - m_i)
//   both 0 for ignored rows and, when ce_weight == 0 (no PriorCE), for every row; both NaN for a
//   row with a NaN or +-inf max (math::finish_row). p_ic = exp((a_ic - m_i) - row_stats[1, i]).
// column_stats, per class c (the column softmax over the N' non-ignored rows of z_ic alone):
//   0: M_c = max_i z_ic                                  (math::finish_row: NaN if not finite)
//   1: L_c = log sum_i exp(z_ic - M_c)                   (NaN with row 0)
//   2: alpha * pi_c * (1 + 2 lambda S_c)                 (coefficient of sigma_ic in the gradient)
//   3: alpha * pi_c / (n_c + 1e-8)                       (subtracted at the target entries; n_c exact,
//                                                         1e-8 only for n_c = 0)
//   so that sigma_ic = exp((z_ic - column_stats[0, c]) - column_stats[1, c]) is the column softmax,
//   taken without a rounded column log-sum-exp (M_c + L_c loses L_c's digits at |z| ~ 1e6).
// num_valid: int64 scalar (0-dim), the number N' of non-ignored rows (exact at any batch size).
// Backward: d loss / d z_ic = g * (ce_weight / N' * (p_ic - [c = y_i]) + row2_c * sigma_ic
//   - [c = y_i] * row3_c) for non-ignored rows, 0 for ignored rows.
using LadeForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
LadeForwardResult lade_forward_cpu(const LadeArgs& args);
at::Tensor lade_backward_cpu(const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                             const at::Tensor& column_stats, const at::Tensor& num_valid);
LadeForwardResult lade_forward_cuda(const LadeArgs& args);
at::Tensor lade_backward_cuda(const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                              const at::Tensor& column_stats, const at::Tensor& num_valid);

using LadeForwardKernel = LadeForwardResult (*)(const LadeArgs&);
using LadeBackwardKernel = at::Tensor (*)(const LadeArgs&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&);

void check_lade_backward_args(const char* op, const LadeArgs& args, const at::Tensor& grad_loss,
                              const at::Tensor& row_stats, const at::Tensor& column_stats,
                              const at::Tensor& num_valid);

template <LadeForwardKernel kernel>
LadeForwardResult lade_forward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior,
                               double ce_weight, double alpha, double remine_lambda, int64_t ignore_index) {
  return kernel(prepare_lade_args("ltfast.lade", logits, target, log_prior, ce_weight, alpha, remine_lambda,
                                  ignore_index));
}

template <LadeBackwardKernel kernel>
at::Tensor lade_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& log_prior, const at::Tensor& row_stats, const at::Tensor& column_stats,
                         const at::Tensor& num_valid, double ce_weight, int64_t ignore_index) {
  const char* op = "ltfast._lade_backward";
  // alpha and lambda are folded into column_stats by the forward.
  const auto args = prepare_lade_args(op, logits, target, log_prior, ce_weight, 1.0, 0.0, ignore_index);
  check_lade_backward_args(op, args, grad_loss, row_stats, column_stats, num_valid);
  return kernel(args, grad_loss, row_stats, column_stats, num_valid);
}

}  // namespace ltfast
