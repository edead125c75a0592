// Per-element and per-row arithmetic of the softmax cross-entropy family, shared by the CPU and
// the CUDA kernels so that the CPU tests exercise the very arithmetic the GPU runs. The kernels
// only add the parallel decomposition around these functions.
//
// Notation (one row i of the batch, target class y, accumulation type T = float or double):
//   a_c  = z_c + adjustment_c - [c == y] * target_margin_y     (the "adjusted logit")
//   m    = max_c a_c,  log_sum = log sum_c exp(a_c - m)           (RowLogSumExp)
//   nll  = log_sum - (a_y - m)                                 (= -log p_y)
//   loss = (1 - eps) * w_y * (1 - p_y)^gamma * nll + eps / C * sum_c w_c * (-log p_c)
// which is F.cross_entropy(a, y, weight=w, label_smoothing=eps) for gamma = 0, and the survey's
// focal loss (Main-codebase/loss/FocalLoss.py: modulating factor detached) for eps = 0.
#pragma once

#include "capability_namespace.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "counter_random.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LTFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LTFAST_HOST_DEVICE inline
#endif

namespace ltfast {
namespace math {
LTFAST_CAPABILITY_NAMESPACE_BEGIN

template <typename T>
LTFAST_HOST_DEVICE T negative_infinity() {
  return -std::numeric_limits<T>::infinity();
}

LTFAST_HOST_DEVICE float exp_fn(float x) {
#if defined(__CUDA_ARCH__)
  // MUFU.EX2 based: ~2 ulp, well inside the fp32 test tolerance, and the fwd+bwd of a bf16
  // [65536, 8142] batch evaluates 1.07e9 of them, so the full-precision expf would cost SFU time.
  return __expf(x);
#else
  return std::exp(x);
#endif
}
LTFAST_HOST_DEVICE double exp_fn(double x) { return exp(x); }
LTFAST_HOST_DEVICE float log_fn(float x) { return logf(x); }
LTFAST_HOST_DEVICE double log_fn(double x) { return log(x); }
LTFAST_HOST_DEVICE float log1p_fn(float x) { return log1pf(x); }
LTFAST_HOST_DEVICE double log1p_fn(double x) { return log1p(x); }
LTFAST_HOST_DEVICE float expm1_fn(float x) { return expm1f(x); }
LTFAST_HOST_DEVICE double expm1_fn(double x) { return expm1(x); }
LTFAST_HOST_DEVICE float pow_fn(float x, float y) { return powf(x, y); }
LTFAST_HOST_DEVICE double pow_fn(double x, double y) { return pow(x, y); }

// exp(x - shift) where an x of -inf contributes exactly 0 even when shift is -inf too
// (exp(-inf - -inf) would be NaN). A NaN x still gives NaN, so NaN logits propagate.
template <typename T>
LTFAST_HOST_DEVICE T exp_shifted(T x, T shift) {
  return x == negative_infinity<T>() ? T(0) : exp_fn(x - shift);
}

// Adjusted logit of one element. Works on scalars and on at::vec::Vectorized alike.
template <typename T>
LTFAST_HOST_DEVICE T adjusted_logit(T z, T adjustment) {
  return z + adjustment;
}

// Online softmax state of a (partial) row: running max m and sum s = sum exp(a - m).
template <typename T>
struct SoftmaxState {
  T max;
  T sum;
};

template <typename T>
LTFAST_HOST_DEVICE SoftmaxState<T> empty_softmax_state() {
  return {negative_infinity<T>(), T(0)};
}

// Merges two partial states. Comparison-based (not fmax) so that a NaN never becomes the max and
// is instead carried in the sum, which makes the final log-sum-exp NaN as F.cross_entropy does.
template <typename T>
LTFAST_HOST_DEVICE SoftmaxState<T> merge_softmax_states(SoftmaxState<T> a, SoftmaxState<T> b) {
  if (b.max > a.max) {
    return {b.max, b.sum + a.sum * exp_shifted(a.max, b.max)};
  }
  return {a.max, a.sum + b.sum * exp_shifted(b.max, a.max)};
}

// The log-sum-exp of a finished row, kept as its two parts: the row max m and
// log_sum = log sum_c exp(a_c - m). The loss and the softmax are taken from (a - m) - log_sum, never
// from a - lse with lse = m + log_sum rounded: at |a| ~ 1e6 in float32 one ulp of lse is 0.06, so
// a rounded lse is off by up to 3% in each probability (and by the whole loss at 1e8).
template <typename T>
struct RowLogSumExp {
  T max;
  T log_sum;
};

// Finishes an online softmax state. A row whose max is +inf or -inf (all entries -inf) is NaN in
// F.cross_entropy (its log_softmax computes inf - inf): both parts are then NaN, as they are for a
// NaN max. A NaN entry below a finite max is carried in the sum and makes log_sum NaN.
template <typename T>
LTFAST_HOST_DEVICE RowLogSumExp<T> finish_row(SoftmaxState<T> state) {
  if (!(state.max > negative_infinity<T>() && state.max < -negative_infinity<T>())) {
    const T nan = state.max - state.max;  // NaN for +-inf and for NaN
    return {nan, nan};
  }
  return {state.max, log_fn(state.sum)};
}

// Whether a finished row is NaN (non-finite max, or a NaN entry): every loss and gradient of the row
// is then NaN, as in F.cross_entropy.
template <typename T>
LTFAST_HOST_DEVICE bool row_is_nan(const RowLogSumExp<T>& row) {
  return !(row.log_sum == row.log_sum);
}

// log p_c = (a_c - m) - log_sum. Works on scalars and on at::vec::Vectorized alike (T may be a
// vector type with the row's m and log_sum broadcast into it).
template <typename T>
LTFAST_HOST_DEVICE T log_softmax_of(T a, T max, T log_sum) {
  return (a - max) - log_sum;
}

// p_c = exp((a_c - m) - log_sum): the softmax probability of one adjusted logit.
template <typename T>
LTFAST_HOST_DEVICE T softmax_probability(T a, const RowLogSumExp<T>& row) {
  return exp_fn(log_softmax_of(a, row.max, row.log_sum));
}

// Hyper-parameters of one call, shared by every row.
template <typename T>
struct CrossEntropyConfig {
  T gamma;             // focal exponent, 0 = plain cross-entropy
  T label_smoothing;   // eps in [0, 1]
  T inv_num_classes;   // 1 / C
  T total_weight;      // W = sum_c w_c (C when there are no class weights)
};

// Loss of one non-ignored row. `weighted_logit_offset_sum` is sum_c w_c * (a_c - a_y): the
// smoothing term is eps/C * (W * nll - that sum), which stays accurate for logits of 1e4 where
// lse * W - sum_c w_c a_c would cancel catastrophically in float32.
template <typename T>
LTFAST_HOST_DEVICE T row_loss(const CrossEntropyConfig<T>& cfg, const RowLogSumExp<T>& row, T target_logit,
                              T target_weight, T weighted_logit_offset_sum) {
  const T nll = row.log_sum - (target_logit - row.max);  // exact at any magnitude: a_y - m is small
  T loss = target_weight * nll;
  if (cfg.gamma != T(0)) {
    const T one_minus_p = -expm1_fn(-nll);  // 1 - p_y without cancellation near p_y = 1
    loss *= pow_fn(one_minus_p, cfg.gamma);
  }
  if (cfg.label_smoothing != T(0)) {
    // An a_y of -inf (nll = +inf; the row max is finite here) makes every offset a_c - a_y +inf and
    // the target's own -inf - -inf NaN. F.cross_entropy's sum_c w_c (-log p_c) is then w_y * inf
    // (+inf, NaN for w_y = 0), and so is the loss.
    const T smooth = nll == -negative_infinity<T>()
                         ? cfg.inv_num_classes * (target_weight * nll)
                         : cfg.inv_num_classes * (cfg.total_weight * nll - weighted_logit_offset_sum);
    loss = (T(1) - cfg.label_smoothing) * loss + cfg.label_smoothing * smooth;
  }
  return loss;
}

// Per-row coefficients of the gradient: d loss / d z_c = p_c * prob_coef - class_coef * w_c
// - [c == y] * target_coef, all already multiplied by the upstream gradient `scale`
// (grad_output / denominator for mean). The focal factor (1 - p_y)^gamma is treated as a
// constant, as in the survey's FocalLoss which detaches p_t.
template <typename T>
struct RowGradientCoefficients {
  T prob_coef;
  T class_coef;
  T target_coef;
};

template <typename T>
LTFAST_HOST_DEVICE RowGradientCoefficients<T> row_gradient_coefficients(
    const CrossEntropyConfig<T>& cfg, T scale, const RowLogSumExp<T>& row, T target_logit, T target_weight) {
  T nll_coef = target_weight;
  if (cfg.gamma != T(0)) {
    nll_coef *= pow_fn(-expm1_fn(log_softmax_of(target_logit, row.max, row.log_sum)), cfg.gamma);
  }
  const T eps = cfg.label_smoothing;
  const T hard = (T(1) - eps) * nll_coef;
  RowGradientCoefficients<T> out;
  out.prob_coef = scale * (hard + eps * cfg.total_weight * cfg.inv_num_classes);
  out.class_coef = scale * eps * cfg.inv_num_classes;
  out.target_coef = scale * hard;
  return out;
}

// Gradient of one element before the target correction. Works on scalars and on
// at::vec::Vectorized alike; `probability` is p_c = exp((a_c - m) - log_sum) computed by the
// backend (softmax_probability, or its vectorised equivalent).
template <typename T>
LTFAST_HOST_DEVICE T element_gradient(T probability, T prob_coef, T class_coef, T class_weight) {
  return probability * prob_coef - class_coef * class_weight;
}

LTFAST_CAPABILITY_NAMESPACE_END
}  // namespace math
}  // namespace ltfast

namespace ltfast {
namespace math {
LTFAST_CAPABILITY_NAMESPACE_BEGIN

// ---------------------------------------------------------------- SEQL drop decisions
// hash32 (counter_random.h) decides whether element (i, c) of a batch is dropped. Nothing is stored:
// backward recomputes the forward's decisions from the same seed. Two rounds (per-class key, per-row
// key, then the element hash) keep different rows' masks independent.
LTFAST_HOST_DEVICE uint32_t seql_column_key(int64_t c, uint32_t key) {
  return hash32(static_cast<uint32_t>(c) ^ key);
}

LTFAST_HOST_DEVICE uint32_t seql_row_key(int64_t i, uint32_t key) {
  return hash32(hash32(static_cast<uint32_t>(i)) ^ static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32) ^ key);
}

// Drop threshold for probability gamma: an element is dropped when its hash < gamma * 2^32
// (held in 64 bits so that gamma = 1 drops every candidate).
inline uint64_t seql_threshold(double gamma) {
  const double t = gamma * 4294967296.0;
  return t <= 0.0 ? 0 : (t >= 4294967296.0 ? (uint64_t(1) << 32) : static_cast<uint64_t>(t));
}

// Whether element (row_key, column_key) of a tail class that is not the row's target is dropped.
LTFAST_HOST_DEVICE bool seql_dropped(uint32_t column_key, uint32_t row_key, uint64_t threshold) {
  return static_cast<uint64_t>(hash32(column_key ^ row_key)) < threshold;
}

LTFAST_CAPABILITY_NAMESPACE_END
}  // namespace math
}  // namespace ltfast

namespace ltfast {
namespace math {
LTFAST_CAPABILITY_NAMESPACE_BEGIN

// ---------------------------------------------------------------- EQL (sigmoid)
// Binary cross-entropy with logits of one element, against y = is_target in {0, 1}:
//   max(z, 0) - y z + log(1 + exp(-|z|)) = max(y ? -z : z, 0) + log(1 + exp(-|z|)),
// written as the part without the logarithm plus log1p_term = exp(-|z|) (the CPU kernel multiplies
// the (1 + exp(-|z|)) factors of each lane over 16 vectors and takes one log per 16 elements; the
// CUDA forward one per 16 elements of a thread: eql_accumulate_element).
// The linear part never forms y * z: that is NaN for y = 0 and z = +-inf, and a row sum of
// max(z, 0) - y z adds +z_y and then subtracts it again, which at z_y = 1e6 cancels every other
// term of the row in float32. max(+-z, 0) >= 0 has no cancellation.
template <typename T>
LTFAST_HOST_DEVICE T bce_linear_part(T z, bool is_target) {
  const T signed_z = is_target ? -z : z;
  return signed_z > T(0) ? signed_z : (signed_z != signed_z ? signed_z : T(0));  // NaN stays NaN
}

// a / b for a denominator in [1, 2] (the sigmoid's 1 + exp(-|z|)). On the GPU, float division is
// __fdividef (MUFU.RCP and a multiply, 2 ulp in this range) instead of the IEEE division's ~8-instruction
// Newton sequence with its slow-path branch: the EQL backward divides once per element.
LTFAST_HOST_DEVICE float divide_by_one_to_two(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
LTFAST_HOST_DEVICE double divide_by_one_to_two(double a, double b) { return a / b; }

template <typename T>
LTFAST_HOST_DEVICE T sigmoid_fn(T z) {
  const T e = exp_fn(z > T(0) ? -z : z);  // exp(-|z|) <= 1: no overflow
  return divide_by_one_to_two(z >= T(0) ? T(1) : e, T(1) + e);
}

// EQL's weight of element (i, c): the negative term of a tail class is suppressed (Tan et al. 2020,
// with E(r) = 1 for classification): w = 1 - tail_c * (1 - y_ic).
LTFAST_HOST_DEVICE bool eql_suppressed(bool tail, bool is_target) {
  return tail && !is_target;
}

// EQL's semantics of one element, shared by every backend and by ltfast.reference:
// - a suppressed element (tail negative) contributes exactly 0 to the loss and the gradient, even
//   for a NaN or infinite logit (it is never read into the arithmetic);
// - otherwise the loss is F.binary_cross_entropy_with_logits(z, y) where that is finite or NaN for a
//   NaN z, and its limit for z = +-inf: 0 when z has the sign of the label (y = 0, z = -inf and
//   y = 1, z = +inf) and +inf otherwise. PyTorch itself returns NaN for three of these four cases
//   (its formula forms 0 * inf); its gradients are already the limits: sigmoid(z) - y.
template <typename T>
LTFAST_HOST_DEVICE T eql_element_loss(T z, bool is_target, bool suppressed) {
  if (suppressed) return T(0);
  const T abs_z = z < T(0) ? -z : z;
  return bce_linear_part(z, is_target) + log1p_fn(exp_fn(-abs_z));
}

// eql_element_loss of a run of elements (the GPU kernels' vector body) with one logarithm per run
// instead of one log1p per element: linear += the linear parts, and factors_minus_one = q with
// 1 + q = the product of the (1 + exp(-|z|)) factors, so that the run's loss is linear + log1p(q).
// Keeping q = product - 1 rather than the product (the CPU kernel does the same) keeps factors
// below the float epsilon: 1 + 1e-9 rounds to 1, while q + e + q e adds the 1e-9. Runs of at most 16
// factors of at most 2 keep q < 2^16.
template <typename T>
LTFAST_HOST_DEVICE void eql_accumulate_element(T z, bool is_target, bool suppressed, T& linear,
                                               T& factors_minus_one) {
  if (suppressed) return;
  const T abs_z = z < T(0) ? -z : z;
  linear += bce_linear_part(z, is_target);
  const T e = exp_fn(-abs_z);
  factors_minus_one += e + factors_minus_one * e;
}

template <typename T>
LTFAST_HOST_DEVICE T eql_element_gradient(T z, bool is_target, bool suppressed) {
  if (suppressed) return T(0);
  return sigmoid_fn(z) - (is_target ? T(1) : T(0));
}

LTFAST_CAPABILITY_NAMESPACE_END
}  // namespace math
}  // namespace ltfast
