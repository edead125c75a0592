// Per-row arithmetic of the cross-entropy family with soft targets, shared by the CPU and the CUDA
// kernels (csrc/ops/soft_targets/). Builds on softmax_math.h (same notation: a_c adjusted logits,
// m the row max, log_sum = log sum_c exp(a_c - m), nll_c = log_sum - (a_c - m)).
//
// Mixed targets (mixup/CutMix): two hard targets y_a, y_b and a weight lambda per row share one
// softmax. Each term is the hard-target loss of softmax_math.h (row_loss) with its own target and
// its own smoothing eps (a scalar, or eps[y] per class); the row's loss is
//   lambda * l(y_a) + (1 - lambda) * l(y_b),
// and 'mean' divides the two sums by their own denominators (sum of w_y over each term's
// non-ignored rows), as lambda * F.cross_entropy(z, y_a) + (1 - lambda) * F.cross_entropy(z, y_b).
//
// Probability targets t [N, C] (F.cross_entropy with a floating target):
//   q_c = (1 - eps) t_c + eps / C,   loss = sum_c w_c q_c nll_c = mass * log_sum - offset,
//   mass = sum_c w_c q_c,  offset = sum_c w_c q_c (a_c - m),
// d loss / d a_c = mass * p_c - w_c q_c. The row is streamed once: (max, exp-sum, mass, offset)
// is an online state like SoftmaxState, the offset re-based when the max grows.
#pragma once

#include "capability_namespace.h"

#include "softmax_math.h"

namespace ltfast {
namespace math {
LTFAST_CAPABILITY_NAMESPACE_BEGIN

// ---------------------------------------------------------------- mixed targets
// One hard-target term of a row. `logit` is a_y (margin applied in single-target mode),
// `weight` w_y, `smoothing` the term's eps.
template <typename T>
struct TargetTerm {
  T logit;
  T weight;
  T smoothing;
};

// Loss of one term. The smoothing part needs sum_c w_c (a_c - a_y); the kernels accumulate it once
// per row against a reference logit r (the first active term's a_y) and each term re-bases it:
// sum_c w_c (a_c - a_y) = reference_offset_sum + W (r - a_y), exact for the reference term itself.
// A reference logit of -inf (a term's a_y of -inf: row_loss) makes the reference sum NaN (its own
// -inf - -inf); another term's sum then holds w_r (-inf - a_y): -inf (NaN for w_r = 0), which makes
// its loss +inf, as F.cross_entropy's w_r * (-log p_r) = w_r * inf.
template <typename T>
LTFAST_HOST_DEVICE T mixed_term_loss(CrossEntropyConfig<T> cfg, const RowLogSumExp<T>& row, const TargetTerm<T>& term,
                                     const TargetTerm<T>& reference, T reference_offset_sum) {
  cfg.label_smoothing = term.smoothing;
  const T offset_sum = (reference.logit == negative_infinity<T>() && term.logit != reference.logit)
                           ? reference.weight * negative_infinity<T>()
                           : reference_offset_sum + cfg.total_weight * (reference.logit - term.logit);
  return row_loss(cfg, row, term.logit, term.weight, offset_sum);
}

// Gradient coefficients of one term, already multiplied by its scale (upstream gradient times
// lambda or 1 - lambda, over the term's denominator for 'mean').
template <typename T>
LTFAST_HOST_DEVICE RowGradientCoefficients<T> mixed_term_coefficients(CrossEntropyConfig<T> cfg, T scale,
                                                                      const RowLogSumExp<T>& row,
                                                                      const TargetTerm<T>& term) {
  cfg.label_smoothing = term.smoothing;
  return row_gradient_coefficients(cfg, scale, row, term.logit, term.weight);
}

// ---------------------------------------------------------------- probability targets
template <typename T>
struct ProbabilityState {
  T max;     // running max of the adjusted logits
  T sum;     // sum exp(a_c - max)
  T mass;    // sum w_c q_c
  T offset;  // sum w_c q_c (a_c - max)
};

template <typename T>
LTFAST_HOST_DEVICE ProbabilityState<T> empty_probability_state() {
  return {negative_infinity<T>(), T(0), T(0), T(0)};
}

// w_c q_c (a_c - max) of one element against the max of its chunk. An a_c of -inf gives
// w q * -inf: -inf for a positive target (an impossible class with probability: loss +inf) and NaN
// for a zero one, as PyTorch's -(log_softmax * target) gives 0 * -inf = NaN there. The max element
// itself adds exactly 0, also for a target of +inf (inf * 0 would be NaN): its loss term
// inf * (-log p) = inf * (log_sum - 0) is then carried by mass * log_sum, +inf as in PyTorch (NaN
// when log_sum = 0, where PyTorch's -log p = 0 gives inf * 0 = NaN too).
template <typename T>
LTFAST_HOST_DEVICE T probability_offset(T weighted_q, T a, T max) {
  return a == negative_infinity<T>() ? weighted_q * a : (a == max ? T(0) : weighted_q * (a - max));
}

// Merges two partial states (see merge_softmax_states for the NaN rule). The offset of the side
// with the smaller max is re-based: sum wq (a - M) = offset + mass * (max - M), skipped when that
// side has no mass (an empty state has max -inf) or the same max.
template <typename T>
LTFAST_HOST_DEVICE ProbabilityState<T> merge_probability_states(ProbabilityState<T> a, ProbabilityState<T> b) {
  if (b.max > a.max) {
    const ProbabilityState<T> t = a;
    a = b;
    b = t;
  }
  const T shift = (b.mass == T(0) || b.max == a.max) ? T(0) : b.mass * (b.max - a.max);
  return {a.max, a.sum + b.sum * exp_shifted(b.max, a.max), a.mass + b.mass, a.offset + b.offset + shift};
}

// Loss of a finished row: mass * log_sum - offset (NaN rows: NaN).
template <typename T>
LTFAST_HOST_DEVICE T probability_row_loss(const RowLogSumExp<T>& row, T mass, T offset) {
  if (row_is_nan(row)) return row.log_sum;
  return mass * row.log_sum - offset;
}

// q_c = (1 - eps) t_c + eps / C, times w_c.
template <typename T>
LTFAST_HOST_DEVICE T weighted_probability(T target, T weight, T one_minus_eps, T eps_over_c) {
  return weight * (one_minus_eps * target + eps_over_c);
}

LTFAST_CAPABILITY_NAMESPACE_END
}  // namespace math
}  // namespace ltfast
