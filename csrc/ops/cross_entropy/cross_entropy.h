// The softmax cross-entropy family behind ltfast::balanced_softmax and
// ltfast::adjusted_cross_entropy: argument preparation shared by the CPU and CUDA backends, and
// the backend entry points. See csrc/common/softmax_math.h for the math.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <utility>

#include "../../common/checks.h"

namespace ltfast {

// Everything a backend kernel needs, validated and in kernel-friendly form: logits contiguous in
// their own dtype, per-class vectors contiguous in the accumulation dtype (float32, or float64 for
// float64 logits), undefined tensors for absent options.
struct CrossEntropyArgs {
  at::Tensor logits;
  at::Tensor target;
  at::Tensor adjustment;
  at::Tensor target_margin;
  at::Tensor weight;
  double gamma = 0.0;
  double label_smoothing = 0.0;
  Reduction reduction = Reduction::Mean;
  int64_t ignore_index = -100;
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  at::ScalarType accumulate_type = at::kFloat;
  // SEQL: tail-class negatives dropped with probability drop_probability, decided per element by
  // math::seql_dropped from the two int64 keys in `seed`. Undefined tail_mask = no dropping.
  at::Tensor tail_mask;  // uint8 [C], 1 = tail class
  at::Tensor seed;       // int64 [2]
  double drop_probability = 0.0;
  // Forward only: also write d loss / d logits for an upstream gradient of 1 (see
  // CrossEntropyForwardOutputs). Set by the autograd kernel where the logits need a gradient.
  bool with_grad = false;
};

CrossEntropyArgs prepare_seql_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& tail_mask, const at::Tensor& seed, double gamma,
                                   c10::string_view reduction, int64_t ignore_index);

CrossEntropyArgs prepare_cross_entropy_args(const char* op, const at::Tensor& logits,
                                            const at::Tensor& target,
                                            const c10::optional<at::Tensor>& adjustment,
                                            const char* adjustment_name,
                                            const c10::optional<at::Tensor>& target_margin,
                                            const c10::optional<at::Tensor>& weight, double gamma,
                                            double label_smoothing, c10::string_view reduction,
                                            int64_t ignore_index);

// Checks the saved statistics and the upstream gradient handed to a backward op.
void check_cross_entropy_backward_args(const char* op, const CrossEntropyArgs& args,
                                       const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                       const at::Tensor& denominator);

// Forward: (loss, row_stats, denominator). loss is [N] for reduction 'none', else a scalar;
// row_stats [2, N] is the only per-row statistic saved for backward: row_stats[0, i] = m_i, the max
// of row i's adjusted logits (SEQL: of its kept entries), row_stats[1, i] = log sum_c exp(a_ic - m_i)
// (math::RowLogSumExp, from math::finish_row: both NaN for a row with a NaN or a +-inf max, both 0
// for an ignored row). Backward takes p_ic = exp((a_ic - m_i) - row_stats[1, i]), never
// exp(a_ic - lse_i) with a rounded lse_i. denominator is the scalar the summed loss was divided by
// (sum of target weights for 'mean', 1 otherwise). All three are in the accumulation dtype.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// The private forward ops return a fourth tensor, grad_logits: empty ([0]) unless args.with_grad and
// the backend computes it (the CPU and CUDA kernels; a backend whose forward kernel returns a
// ForwardResult gets the empty one, see with_forward_grad below). Then it is d loss / d logits for an
// upstream gradient of exactly 1, in the logits dtype, equal to the backward op's result for that
// gradient within rounding (the CPU takes p_c from the exponentials of the statistics pass instead of a
// second exponential: RowGradient::write_from_exponentials), and autograd returns it
// instead of running the backward (csrc/autograd/autograd_common.h): one read of the logits and one
// write of the gradient per training step instead of two reads and one write.
using CrossEntropyForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
CrossEntropyForwardOutputs cross_entropy_forward_cpu(const CrossEntropyArgs& args);
// ltfast::_scale_forward_grad_: the forward-time gradient `grad` times the upstream gradient (a scalar,
// or one factor per row), in place; see csrc/autograd/autograd_common.h, forward_grad_for_upstream.
void check_scale_forward_grad_args(const at::Tensor& grad, const at::Tensor& upstream);
void scale_forward_grad_cpu(at::Tensor& grad, const at::Tensor& upstream);
at::Tensor cross_entropy_backward_cpu(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& row_stats, const at::Tensor& denominator);
CrossEntropyForwardOutputs cross_entropy_forward_cuda(const CrossEntropyArgs& args);

// The CUDA row kernel alone (LADE's PriorCE rows): row_loss [N], row_stats [2, N] and the row
// blocks' partial sums, double [2, blocks] (row 0: the loss sum of the block's rows, row 1: their
// target-weight sum, i.e. the number of non-ignored rows without class weights).
struct CrossEntropyRows {
  at::Tensor row_loss;
  at::Tensor row_stats;
  at::Tensor partials;
};
CrossEntropyRows cross_entropy_rows_cuda(const CrossEntropyArgs& args);
at::Tensor cross_entropy_backward_cuda(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                       const at::Tensor& row_stats, const at::Tensor& denominator);

}  // namespace ltfast

namespace ltfast {

// Schema-shaped adapters: each backend registers these with its own kernels, so the argument
// handling of the four private ops is written once for all backends. A forward kernel returns either
// a ForwardResult (no forward-time gradient: the CUDA kernels today) or CrossEntropyForwardOutputs;
// adopting the forward-time gradient on a backend is then a change of its kernel's return type.
inline CrossEntropyForwardOutputs with_forward_grad(const CrossEntropyArgs& args, ForwardResult result) {
  auto& [loss, row_stats, denominator] = result;
  return {std::move(loss), std::move(row_stats), std::move(denominator), at::empty({0}, args.logits.options())};
}
inline CrossEntropyForwardOutputs with_forward_grad(const CrossEntropyArgs& /*args*/,
                                                    CrossEntropyForwardOutputs result) {
  return result;
}
using BackwardKernel = at::Tensor (*)(const CrossEntropyArgs&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&);

template <auto kernel>
CrossEntropyForwardOutputs balanced_softmax_forward(const at::Tensor& logits, const at::Tensor& target,
                                                    const at::Tensor& log_prior, c10::string_view reduction,
                                                    int64_t ignore_index, bool with_grad) {
  auto args = prepare_cross_entropy_args("ltfast.balanced_softmax", logits, target, log_prior,
                                         "log_prior", c10::nullopt, c10::nullopt, 0.0, 0.0,
                                         reduction, ignore_index);
  args.with_grad = with_grad;
  return with_forward_grad(args, kernel(args));
}

template <BackwardKernel kernel>
at::Tensor balanced_softmax_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                     const at::Tensor& target, const at::Tensor& log_prior,
                                     const at::Tensor& row_stats, const at::Tensor& denominator,
                                     c10::string_view reduction, int64_t ignore_index) {
  const char* op = "ltfast._balanced_softmax_backward";
  const auto args = prepare_cross_entropy_args(op, logits, target, log_prior, "log_prior",
                                               c10::nullopt, c10::nullopt, 0.0, 0.0, reduction,
                                               ignore_index);
  check_cross_entropy_backward_args(op, args, grad_loss, row_stats, denominator);
  return kernel(args, grad_loss, row_stats, denominator);
}

template <auto kernel>
CrossEntropyForwardOutputs adjusted_cross_entropy_forward(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& adjustment,
    const c10::optional<at::Tensor>& target_margin, const c10::optional<at::Tensor>& weight,
    double gamma, double label_smoothing, c10::string_view reduction, int64_t ignore_index, bool with_grad) {
  auto args = prepare_cross_entropy_args("ltfast.adjusted_cross_entropy", logits, target,
                                         adjustment, "adjustment", target_margin, weight, gamma,
                                         label_smoothing, reduction, ignore_index);
  args.with_grad = with_grad;
  return with_forward_grad(args, kernel(args));
}

template <BackwardKernel kernel>
at::Tensor adjusted_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const c10::optional<at::Tensor>& adjustment, const c10::optional<at::Tensor>& target_margin,
    const c10::optional<at::Tensor>& weight, const at::Tensor& row_stats,
    const at::Tensor& denominator, double gamma, double label_smoothing, c10::string_view reduction,
    int64_t ignore_index) {
  const char* op = "ltfast._adjusted_cross_entropy_backward";
  const auto args = prepare_cross_entropy_args(op, logits, target, adjustment, "adjustment",
                                               target_margin, weight, gamma, label_smoothing,
                                               reduction, ignore_index);
  check_cross_entropy_backward_args(op, args, grad_loss, row_stats, denominator);
  return kernel(args, grad_loss, row_stats, denominator);
}

}  // namespace ltfast

namespace ltfast {

template <auto kernel>
CrossEntropyForwardOutputs seql_forward(const at::Tensor& logits, const at::Tensor& target,
                                        const at::Tensor& tail_mask, const at::Tensor& seed, double gamma,
                                        c10::string_view reduction, int64_t ignore_index, bool with_grad) {
  auto args = prepare_seql_args("ltfast.softmax_equalization_loss", logits, target, tail_mask, seed, gamma,
                                reduction, ignore_index);
  args.with_grad = with_grad;
  return with_forward_grad(args, kernel(args));
}

template <BackwardKernel kernel>
at::Tensor seql_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& tail_mask, const at::Tensor& seed, const at::Tensor& row_stats,
                         const at::Tensor& denominator, double gamma, c10::string_view reduction,
                         int64_t ignore_index) {
  const char* op = "ltfast._softmax_equalization_loss_backward";
  const auto args = prepare_seql_args(op, logits, target, tail_mask, seed, gamma, reduction, ignore_index);
  check_cross_entropy_backward_args(op, args, grad_loss, row_stats, denominator);
  return kernel(args, grad_loss, row_stats, denominator);
}

}  // namespace ltfast
