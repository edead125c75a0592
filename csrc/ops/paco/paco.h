// PaCo's parametric contrastive loss (Cui et al. 2021, the survey's PaCo-codebase/losses.py) as one
// multi-positive contrastive op that SupCon (no class columns, alpha 1, beta 0) shares.
//
// Row i (one of the B anchors) of the logits the original concatenates, without the concatenation:
//   class columns c < C:  l_ic      = (sup_logits_ic + log_prior_c) * inv_sup_temperature
//   key columns j < M:    l_i(C+j)  = similarity_ij * inv_temperature
// The first B keys are the anchors themselves (PaCo: keys = [q, k, queue], M = 2B + K; SupCon: the
// views), so key column j = i is the anchor's self-contrast.
// Positive weights (the original's `mask`), from the labels inside the kernel:
//   m_ic = beta  * [c == y_i]
//   m_ij = alpha * [key_labels_j == y_i] * [j != i]          (key_labels_j == ignore_index: never)
// Denominator weights (the original's `logits_mask`): 1 on class columns, gamma on key columns,
// 0 on the self column j = i.
// With mx_i = max over EVERY column of row i (the self column included, as the original's max):
//   lse_i   = mx_i + log(sum_col w_col exp(l_col - mx_i) + 1e-12)      (the original's + 1e-12)
//   P_i     = sum_col m_col                                            (positive weight)
//   loss_i  = loss_scale * (lse_i - sum_col m_col l_col / P_i),   loss_scale = T / T_base
// Rows whose label is ignore_index, and rows without any positive (P_i = 0: the original divides
// 0 by 0), give loss 0 and are not counted: 'mean' divides the sum by the number of counted rows
// (NaN when none is counted, as F.cross_entropy with every row ignored).
// Gradient, with g_i = grad_loss * loss_scale (/ counted rows for 'mean'; grad_loss_i for 'none'),
// p_col = w_col exp(l_col - lse_i), and 0 for rows not counted:
//   d loss / d sup_logits_ic  = g_i (p_ic - m_ic / P_i) * inv_sup_temperature
//   d loss / d similarity_ij  = g_i (p_ij - m_ij / P_i) * inv_temperature
// (log_prior gets no gradient: it is a constant of the training set, as in the original.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "../../common/checks.h"

namespace ltfast {

struct PacoArgs {
  at::Tensor similarity;  // [B, M], contiguous, own dtype (float16 / bfloat16 / float32 / float64)
  at::Tensor labels;      // [B] int64, contiguous: the anchors' labels
  at::Tensor key_labels;  // [M] int64, contiguous: the keys' labels
  at::Tensor sup_logits;  // [B, C], contiguous, the similarity's dtype; undefined when C == 0
  at::Tensor log_prior;   // [C], contiguous, accumulation dtype; undefined = no prior
  double inv_temperature = 1.0;      // 1 / T (moco-t)
  double inv_sup_temperature = 1.0;  // 1 / supt
  double alpha = 1.0;
  double beta = 1.0;
  double gamma = 1.0;
  double loss_scale = 1.0;  // T / T_base
  Reduction reduction = Reduction::Mean;
  int64_t ignore_index = -100;
  int64_t num_rows = 0;     // B
  int64_t num_keys = 0;     // M (>= B)
  int64_t num_classes = 0;  // C (0 without sup_logits)
  at::ScalarType accumulate_type = at::kFloat;  // float32, float64 for float64 inputs
  // Forward only: also write the gradients for an upstream gradient of 1 (as the cross-entropy family,
  // cross_entropy.h: CrossEntropyForwardOutputs), set by the autograd kernel when an input needs one.
  bool with_grad = false;
};

// Validates every argument (shape, dtype, device, label range when C > 0, finite scalars,
// temperatures > 0, alpha / beta / gamma >= 0) with errors that name the argument.
PacoArgs prepare_paco_args(const char* op, const at::Tensor& similarity, const at::Tensor& labels,
                           const at::Tensor& key_labels, const c10::optional<at::Tensor>& sup_logits,
                           const c10::optional<at::Tensor>& log_prior, double temperature, double alpha,
                           double beta, double gamma, double sup_temperature, double base_temperature,
                           c10::string_view reduction, int64_t ignore_index);

// Forward: (loss, row_stats, denominator, grad_similarity, grad_sup_logits).
//   loss: [B] for 'none', else a scalar, accumulation dtype.
//   row_stats [2, B], accumulation dtype: row_stats[0, i] = lse_i, row_stats[1, i] = P_i (0 for a row
//     that is not counted: backward writes 0 there).
//   denominator: 0-dim, accumulation dtype: the number of counted rows for 'mean', 1 otherwise.
//   grad_similarity / grad_sup_logits: empty ([0]) unless args.with_grad and the backend computes
//     them; then the gradients for an upstream gradient of 1, in the inputs' dtype
//     (grad_sup_logits empty when C == 0).
using PacoForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
PacoForwardResult paco_forward_cpu(const PacoArgs& args);
PacoForwardResult paco_forward_cuda(const PacoArgs& args);

// Backward: (grad_similarity, grad_sup_logits) in the inputs' dtype (grad_sup_logits empty when C == 0).
using PacoBackwardResult = std::tuple<at::Tensor, at::Tensor>;
PacoBackwardResult paco_backward_cpu(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                     const at::Tensor& denominator);
PacoBackwardResult paco_backward_cuda(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                      const at::Tensor& denominator);

using PacoForwardKernel = PacoForwardResult (*)(const PacoArgs&);
using PacoBackwardKernel = PacoBackwardResult (*)(const PacoArgs&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&);

void check_paco_backward_args(const char* op, const PacoArgs& args, const at::Tensor& grad_loss,
                              const at::Tensor& row_stats, const at::Tensor& denominator);

// The private ops' kernels (schemas in csrc/ltfast.cpp), one per backend:
//   _paco_forward(similarity, labels, key_labels, sup_logits?, log_prior?, temperature, alpha, beta, gamma,
//                 sup_temperature, base_temperature, reduction, ignore_index, with_grad)
//       -> (loss, row_stats, denominator, grad_similarity, grad_sup_logits)
//   _paco_backward(grad_loss, similarity, labels, key_labels, sup_logits?, log_prior?, row_stats, denominator,
//                  temperature, alpha, beta, gamma, sup_temperature, base_temperature, reduction, ignore_index)
//       -> (grad_similarity, grad_sup_logits)
template <PacoForwardKernel kernel>
PacoForwardResult paco_forward_op(const at::Tensor& similarity, const at::Tensor& labels, const at::Tensor& key_labels,
                                  const c10::optional<at::Tensor>& sup_logits,
                                  const c10::optional<at::Tensor>& log_prior, double temperature, double alpha,
                                  double beta, double gamma, double sup_temperature, double base_temperature,
                                  c10::string_view reduction, int64_t ignore_index, bool with_grad) {
  PacoArgs args = prepare_paco_args("ltfast.paco_loss", similarity, labels, key_labels, sup_logits, log_prior,
                                    temperature, alpha, beta, gamma, sup_temperature, base_temperature, reduction,
                                    ignore_index);
  args.with_grad = with_grad;
  return kernel(args);
}

template <PacoBackwardKernel kernel>
PacoBackwardResult paco_backward_op(const at::Tensor& grad_loss, const at::Tensor& similarity,
                                    const at::Tensor& labels, const at::Tensor& key_labels,
                                    const c10::optional<at::Tensor>& sup_logits,
                                    const c10::optional<at::Tensor>& log_prior, const at::Tensor& row_stats,
                                    const at::Tensor& denominator, double temperature, double alpha, double beta,
                                    double gamma, double sup_temperature, double base_temperature,
                                    c10::string_view reduction, int64_t ignore_index) {
  const char* op = "ltfast._paco_backward";
  const PacoArgs args = prepare_paco_args(op, similarity, labels, key_labels, sup_logits, log_prior, temperature,
                                          alpha, beta, gamma, sup_temperature, base_temperature, reduction,
                                          ignore_index);
  check_paco_backward_args(op, args, grad_loss, row_stats, denominator);
  return kernel(args, grad_loss, row_stats, denominator);
}

}  // namespace ltfast
