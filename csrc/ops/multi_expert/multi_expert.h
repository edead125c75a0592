// Multi-expert losses of the survey's Ensemble-codebase (seed-methods.md §6) on expert logits
// [N, E, C] (row i holds the E experts' logits of sample i, expert-major):
//
// diverse_expert_loss (SADE, "DiverseExpertLoss"): loss_i = sum_e CE(z_ie + adjustments_e, y_i),
//   reduced as F.cross_entropy reduces (per-row sum over experts for 'none'; 'mean' divides by the
//   number of non-ignored rows).
// ride_loss (RIDE, "RIDELoss"), reduction 'mean' only:
//   loss = sum_k [ sum_i w_{y_i} CE(z_ik - s m_{y_i} e_{y_i}, y_i) / sum_i w_{y_i}
//                  + diversity_factor * Tbar^2 * (1/N') sum_i KL(pbar_i || p_ik) ]
//   p_ik = softmax(z_ik / T), pbar_i = softmax(zbar_i / T) with zbar_i = mean_k z_ik (no gradient),
//   T_c = base_temperature * temperature_c (base_temperature alone without `temperature`),
//   Tbar = mean_c T_c, N' the number of non-ignored rows, w = 1 without `weight`.
//   Since sum_k zbar_ic = sum_k z_ikc, sum_k KL(pbar_i || p_ik) = sum_k lse(z_ik / T) - E lse(zbar_i / T):
//   the forward needs only log-sum-exps, one pass over each row. Each lse is taken against the shift
//   s_i = max_k max_c z_ikc / T_c, as (m - s_i) + log sum exp(. - m), and pbar_i as the softmax of the
//   shifted mean w_ic = mean_k (z_ikc / T_c - s_i) (a per-sample constant away from zbar_ic / T_c):
//   the lse themselves are ~|z| / T, and their difference taken directly loses every digit at
//   z ~ 1e10 in float32 (issue 19: 620.6 for 6.238).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "../../common/checks.h"

namespace ltfast {

struct MultiExpertArgs {
  at::Tensor logits;       // [N, E, C] contiguous, own dtype
  at::Tensor target;       // [N] contiguous int64
  at::Tensor adjustments;  // diverse_expert_loss: [E, C], accumulation dtype
  at::Tensor target_margin;  // ride_loss: [C] or undefined
  at::Tensor weight;         // ride_loss: [C] or undefined
  at::Tensor temperature;    // ride_loss: [C] or undefined (then T = base_temperature)
  double base_temperature = 1.0;
  double diversity_factor = 0.0;
  Reduction reduction = Reduction::Mean;
  int64_t ignore_index = -100;
  int64_t num_rows = 0;
  int64_t num_experts = 0;
  int64_t num_classes = 0;
  at::ScalarType accumulate_type = at::kFloat;
  // Forward also writes the gradient for an upstream gradient of 1 (1 per row for 'none'), see
  // below. Only the CPU kernels do; the CUDA kernels return an empty grad_logits.
  bool with_grad = false;
};

MultiExpertArgs prepare_diverse_expert_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                            const at::Tensor& adjustments, c10::string_view reduction,
                                            int64_t ignore_index);

MultiExpertArgs prepare_ride_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& target_margin,
                                  const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& temperature, double base_temperature,
                                  double diversity_factor, int64_t ignore_index);

// Both forwards return (loss, row_stats, denominator(s), grad_logits). grad_logits is empty ([0])
// unless args.with_grad and the backend is the CPU: then it is d loss / d logits [N, E, C] in the
// logits dtype for an upstream gradient of 1 (of 1 for every row with 'none'), computed from the
// exponentials of the forward while each row is in L1/L2: the logits are read once and the gradient
// written once, where a separate backward reads them again (3 passes instead of 2: at 4096 x 3 x 1000
// float32 the CPU is memory-bound). Autograd uses it when the upstream gradient is exactly 1 (the
// loss itself), else the backward kernel.
//
// diverse_expert_loss forward: (loss, row_stats [2, N, E], denominator, grad_logits), accumulation dtype.
//   row_stats[0, i, e] = max_c a_iec, row_stats[1, i, e] = log sum_c exp(a_iec - max) with
//   a_iec = z_iec + adjustments_ec (math::finish_row: NaN for a non-finite max; 0 for ignored rows).
//   denominator: the number of non-ignored rows for 'mean', 1 otherwise.
// Backward: d loss / d z_iec = g_i (p_iec - [c = y_i]) with g_i = grad / denominator (or grad_i for
//   'none'), 0 for ignored rows.
using MultiExpertForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
MultiExpertForwardResult diverse_expert_forward_cpu(const MultiExpertArgs& args);
at::Tensor diverse_expert_backward_cpu(const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                       const at::Tensor& row_stats, const at::Tensor& denominator);
MultiExpertForwardResult diverse_expert_forward_cuda(const MultiExpertArgs& args);
at::Tensor diverse_expert_backward_cuda(const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                        const at::Tensor& row_stats, const at::Tensor& denominator);

// ride_loss forward: (loss, row_stats [2, N, 2E + 1], denominators [3], grad_logits), accumulation dtype.
//   row_stats[:, i, k]         (k < E): the CE softmax of expert k (target logit minus its margin);
//   row_stats[:, i, E + k]     (k < E): the softmax of z_ik / T;
//   row_stats[:, i, 2E]:                the softmax of w_i = mean_k (z_ik / T - s_i) (pbar), with
//                                       s_i = max_k row_stats[0, i, E + k] (see above);
//   each as (max, log sum exp(. - max)) (math::RowLogSumExp), 0 for ignored rows.
//   denominators = (sum_i w_{y_i}, N', Tbar) over the non-ignored rows.
// Backward: d loss / d z_ikc = g (w_{y_i} / sum w (q_ikc - [c = y_i])
//                                 + diversity_factor Tbar^2 / N' (p_ikc - pbar_ic) / T_c)
//   with q the CE softmax; 0 for ignored rows.
MultiExpertForwardResult ride_forward_cpu(const MultiExpertArgs& args);
at::Tensor ride_backward_cpu(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                             const at::Tensor& denominators);
MultiExpertForwardResult ride_forward_cuda(const MultiExpertArgs& args);
at::Tensor ride_backward_cuda(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                              const at::Tensor& denominators);

void check_multi_expert_backward_args(const char* op, const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& row_stats, int64_t stats_per_row,
                                      const at::Tensor& denominator, int64_t denominator_size);

using MultiExpertForwardKernel = MultiExpertForwardResult (*)(const MultiExpertArgs&);
using MultiExpertBackwardKernel = at::Tensor (*)(const MultiExpertArgs&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&);

// Schema-shaped adapters, registered by each backend with its own kernels.
template <MultiExpertForwardKernel kernel>
MultiExpertForwardResult diverse_expert_forward(const at::Tensor& logits, const at::Tensor& target,
                                                const at::Tensor& adjustments, c10::string_view reduction,
                                                int64_t ignore_index, bool with_grad) {
  auto args = prepare_diverse_expert_args("ltfast.diverse_expert_loss", logits, target, adjustments, reduction,
                                          ignore_index);
  args.with_grad = with_grad;
  return kernel(args);
}

template <MultiExpertBackwardKernel kernel>
at::Tensor diverse_expert_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& adjustments, const at::Tensor& row_stats,
                                   const at::Tensor& denominator, c10::string_view reduction,
                                   int64_t ignore_index) {
  const char* op = "ltfast._diverse_expert_loss_backward";
  const auto args = prepare_diverse_expert_args(op, logits, target, adjustments, reduction, ignore_index);
  check_multi_expert_backward_args(op, args, grad_loss, row_stats, args.num_experts, denominator, 1);
  return kernel(args, grad_loss, row_stats, denominator);
}

template <MultiExpertForwardKernel kernel>
MultiExpertForwardResult ride_forward(const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& target_margin,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& temperature, double base_temperature,
                                      double diversity_factor, int64_t ignore_index, bool with_grad) {
  auto args = prepare_ride_args("ltfast.ride_loss", logits, target, target_margin, weight, temperature,
                                base_temperature, diversity_factor, ignore_index);
  args.with_grad = with_grad;
  return kernel(args);
}

template <MultiExpertBackwardKernel kernel>
at::Tensor ride_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& target_margin, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& temperature, const at::Tensor& row_stats,
                         const at::Tensor& denominators, double base_temperature, double diversity_factor,
                         int64_t ignore_index) {
  const char* op = "ltfast._ride_loss_backward";
  const auto args = prepare_ride_args(op, logits, target, target_margin, weight, temperature, base_temperature,
                                      diversity_factor, ignore_index);
  check_multi_expert_backward_args(op, args, grad_loss, row_stats, 2 * args.num_experts + 1, denominators, 3);
  return kernel(args, grad_loss, row_stats, denominators);
}

}  // namespace ltfast
