// CPU backend of the soft-target cross-entropy ops: at::parallel_for over rows, each row taken in
// L1-sized tiles with at::vec, as the hard-target kernels (cross_entropy_cpu.cpp). Mixed targets
// reuse the hard-target row softmax (cpu::adjusted_row_softmax_state) once per row for both terms;
// probability targets stream the target row alongside the logits.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../../common/cpu_softmax.h"
#include "../../common/soft_target_math.h"
#include "../../common/cpu_dispatch.h"
#include "soft_targets.h"

namespace ltfast {
namespace CPU_CAPABILITY {  // one build per CPU capability: csrc/common/cpu_dispatch.h
namespace {

using at::vec::Vectorized;
using namespace cpu;

// ------------------------------------------------------------------------------ mixed targets
template <typename acc_t>
struct MixedView {
  const int64_t* target_a;
  const int64_t* target_b;  // nullptr: single target
  const acc_t* mix;         // nullptr: the scalar
  int64_t mix_stride;       // 0 for a 0-dim mix_weight
  acc_t mix_scalar;
  const acc_t* class_smoothing;  // nullptr: cfg smoothing for every row
  acc_t smoothing;
  const acc_t* adjustment;
  const acc_t* margin;
  const acc_t* weight;
  int64_t num_classes;
  int64_t ignore_index;
  math::CrossEntropyConfig<acc_t> cfg;

  explicit MixedView(const MixedArgs& args) {
    const auto& ce = args.ce;
    target_a = ce.target.data_ptr<int64_t>();
    target_b = args.has_target_b() ? args.target_b.data_ptr<int64_t>() : nullptr;
    mix = data_or_null<acc_t>(args.mix_weight);
    mix_stride = args.mix_weight.defined() && args.mix_weight.dim() == 1 ? 1 : 0;
    mix_scalar = static_cast<acc_t>(args.mix);
    class_smoothing = data_or_null<acc_t>(args.class_smoothing);
    smoothing = static_cast<acc_t>(ce.label_smoothing);
    adjustment = data_or_null<acc_t>(ce.adjustment);
    margin = data_or_null<acc_t>(ce.target_margin);
    weight = data_or_null<acc_t>(ce.weight);
    num_classes = ce.num_classes;
    ignore_index = ce.ignore_index;
    cfg.gamma = static_cast<acc_t>(ce.gamma);
    cfg.label_smoothing = acc_t(0);  // per term
    cfg.inv_num_classes = acc_t(1) / static_cast<acc_t>(num_classes);
    cfg.total_weight = (ce.weight.defined() && args.smoothing()) ? static_cast<acc_t>(ce.weight.sum().item<double>())
                                                                  : static_cast<acc_t>(num_classes);
  }

  acc_t lambda(int64_t i) const { return mix ? mix[i * mix_stride] : mix_scalar; }

  template <typename scalar_t>
  math::TargetTerm<acc_t> term(const scalar_t* logits_row, int64_t y) const {
    return {adjusted_target_logit(logits_row, adjustment, margin, y), weight ? weight[y] : acc_t(1),
            class_smoothing ? class_smoothing[y] : smoothing};
  }
};

template <typename scalar_t>
void mixed_forward_kernel(const MixedArgs& args, at::Tensor& term_loss, at::Tensor& row_stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = args.ce.num_rows, C = args.ce.num_classes;
  const scalar_t* logits = args.ce.logits.data_ptr<scalar_t>();
  const MixedView<acc_t> v(args);
  const bool smoothing = args.smoothing();
  acc_t* loss_a = term_loss.data_ptr<acc_t>();  // term_loss[0]: lambda * l_a
  acc_t* loss_b = loss_a + N;                   // term_loss[1]: (1 - lambda) * l_b
  acc_t* max_out = row_stats.data_ptr<acc_t>();
  acc_t* log_sum_out = max_out + N;

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(std::min(C, kTileClasses));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ya = checked_target(v.target_a, i, C, v.ignore_index);
      const int64_t yb = v.target_b ? checked_target(v.target_b, i, C, v.ignore_index) : v.ignore_index;
      const bool active_a = ya != v.ignore_index, active_b = yb != v.ignore_index;
      if (!active_a && !active_b) {
        loss_a[i] = loss_b[i] = max_out[i] = log_sum_out[i] = acc_t(0);
        continue;
      }
      const scalar_t* logits_row = logits + i * C;
      // The reference target: its logit anchors the smoothing offsets (and carries the margin,
      // which only a single target can have).
      const int64_t y_ref = active_a ? ya : yb;
      const auto ref = v.term(logits_row, y_ref);
      acc_t offset_sum = acc_t(0);
      const auto state = adjusted_row_softmax_state(logits_row, C, v.adjustment, v.margin, y_ref, ref.logit,
                                                    tile.data(), v.weight, smoothing ? &offset_sum : nullptr);
      const auto row = math::finish_row(state);
      max_out[i] = row.max;
      log_sum_out[i] = row.log_sum;
      const acc_t lam = v.lambda(i);
      loss_a[i] = active_a ? lam * math::mixed_term_loss(v.cfg, row, v.term(logits_row, ya), ref, offset_sum)
                           : acc_t(0);
      loss_b[i] = active_b ? (acc_t(1) - lam) *
                                 math::mixed_term_loss(v.cfg, row, v.term(logits_row, yb), ref, offset_sum)
                           : acc_t(0);
    }
  });
}

template <typename scalar_t>
at::Tensor mixed_backward_kernel(const MixedArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                 const at::Tensor& denominators) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.ce.num_rows, C = args.ce.num_classes;
  at::Tensor grad_logits = at::empty_like(args.ce.logits, at::MemoryFormat::Contiguous);
  const scalar_t* logits = args.ce.logits.data_ptr<scalar_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const MixedView<acc_t> v(args);
  const acc_t* max_in = row_stats.data_ptr<acc_t>();
  const acc_t* log_sum_in = max_in + N;
  const bool per_row_grad = args.ce.reduction == Reduction::None;
  const at::Tensor grad_acc = grad_loss.to(args.ce.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const at::Tensor denominators_acc = denominators.to(args.ce.accumulate_type).contiguous();
  const acc_t scale_a = per_row_grad ? acc_t(0) : grad_in[0] / denominators_acc.data_ptr<acc_t>()[0];
  const acc_t scale_b = per_row_grad ? acc_t(0) : grad_in[0] / denominators_acc.data_ptr<acc_t>()[1];

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(gradient_tile_size<scalar_t, acc_t>(C));
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad + i * C;
      const int64_t ya = checked_target(v.target_a, i, C, v.ignore_index);
      const int64_t yb = v.target_b ? checked_target(v.target_b, i, C, v.ignore_index) : v.ignore_index;
      const bool active_a = ya != v.ignore_index, active_b = yb != v.ignore_index;
      if (!active_a && !active_b) {
        std::fill(grad_row, grad_row + C, scalar_t(0));
        continue;
      }
      const math::RowLogSumExp<acc_t> row{max_in[i], log_sum_in[i]};
      if (math::row_is_nan(row)) {
        std::fill(grad_row, grad_row + C, static_cast<scalar_t>(row.log_sum));
        continue;
      }
      const scalar_t* logits_row = logits + i * C;
      const acc_t lam = v.lambda(i);
      const acc_t g = per_row_grad ? grad_in[i] : acc_t(1);
      math::RowGradientCoefficients<acc_t> coef_a{0, 0, 0}, coef_b{0, 0, 0};
      math::TargetTerm<acc_t> term_a{0, 0, 0}, term_b{0, 0, 0};
      if (active_a) {
        term_a = v.term(logits_row, ya);
        coef_a = math::mixed_term_coefficients(v.cfg, g * lam * (per_row_grad ? acc_t(1) : scale_a), row, term_a);
      }
      if (active_b) {
        term_b = v.term(logits_row, yb);
        coef_b = math::mixed_term_coefficients(v.cfg, g * (acc_t(1) - lam) * (per_row_grad ? acc_t(1) : scale_b), row,
                                               term_b);
      }
      const acc_t prob_coef = coef_a.prob_coef + coef_b.prob_coef;
      const acc_t class_coef = coef_a.class_coef + coef_b.class_coef;
      const Vec vmax(row.max), vlog_sum(row.log_sum), vprob(prob_coef), vclass(class_coef), vone(acc_t(1));
      for_each_gradient_tile(logits_row, grad_row, C, tile.data(),
                             [&](const acc_t* source, acc_t* out, int64_t start, int64_t len) {
        const acc_t* adj = v.adjustment ? v.adjustment + start : nullptr;
        const acc_t* w = v.weight ? v.weight + start : nullptr;
        int64_t c = 0;
        for (; c + Vec::size() <= len; c += Vec::size()) {
          Vec a = Vec::loadu(source + c);
          if (adj) a = math::adjusted_logit(a, Vec::loadu(adj + c));
          const Vec p = vec_exp(math::log_softmax_of(a, vmax, vlog_sum));
          math::element_gradient(p, vprob, vclass, w ? Vec::loadu(w + c) : vone).store(out + c);
        }
        for (; c < len; ++c) {
          const acc_t a = adj ? math::adjusted_logit(source[c], adj[c]) : source[c];
          out[c] = math::element_gradient(math::softmax_probability(a, row), prob_coef, class_coef, w ? w[c] : acc_t(1));
        }
        // The targets: the margin-adjusted probability (single target), then each term's one-hot part.
        if (active_a && ya >= start && ya < start + len) {
          out[ya - start] = math::element_gradient(math::softmax_probability(term_a.logit, row), prob_coef, class_coef,
                                                   w ? w[ya - start] : acc_t(1)) -
                            coef_a.target_coef;
        }
        if (active_b && yb >= start && yb < start + len) {
          if (active_a && yb == ya) {
            out[yb - start] -= coef_b.target_coef;
          } else {
            out[yb - start] = math::element_gradient(math::softmax_probability(term_b.logit, row), prob_coef,
                                                     class_coef, w ? w[yb - start] : acc_t(1)) -
                              coef_b.target_coef;
          }
        }
      });
    }
  });
  return grad_logits;
}

// Serial float64 sums (bit-identical whatever the thread count, as reduce_rows in cross_entropy_cpu.cpp).
template <typename acc_t>
void mixed_reduce(const MixedArgs& args, const at::Tensor& term_loss, at::Tensor& loss, at::Tensor& denominators) {
  const int64_t N = args.ce.num_rows;
  const acc_t* rows = term_loss.data_ptr<acc_t>();
  const MixedView<acc_t> v(args);
  double sum_a = 0.0, sum_b = 0.0, weight_a = 0.0, weight_b = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    sum_a += static_cast<double>(rows[i]);
    sum_b += static_cast<double>(rows[N + i]);
    const int64_t ya = v.target_a[i];
    if (ya != v.ignore_index) weight_a += v.weight ? static_cast<double>(v.weight[ya]) : 1.0;
    if (v.target_b) {
      const int64_t yb = v.target_b[i];
      if (yb != v.ignore_index) weight_b += v.weight ? static_cast<double>(v.weight[yb]) : 1.0;
    }
  }
  const bool mean = args.ce.reduction == Reduction::Mean;
  const double denom_a = mean ? weight_a : 1.0;
  const double denom_b = (mean && v.target_b) ? weight_b : 1.0;
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(sum_a / denom_a + (v.target_b ? sum_b / denom_b : 0.0));
  denominators.data_ptr<acc_t>()[0] = static_cast<acc_t>(denom_a);
  denominators.data_ptr<acc_t>()[1] = static_cast<acc_t>(denom_b);
}

SoftForwardResult mixed_forward_cpu(const MixedArgs& args) {
  const auto options = args.ce.logits.options().dtype(args.ce.accumulate_type);
  at::Tensor term_loss = at::empty({2, args.ce.num_rows}, options);
  at::Tensor row_stats = at::empty({2, args.ce.num_rows}, options);
  at::Tensor denominators = at::ones({2}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.ce.logits.scalar_type(), "ltfast_mixed_forward_cpu",
                                  [&] { mixed_forward_kernel<scalar_t>(args, term_loss, row_stats); });
  if (args.ce.reduction == Reduction::None) return {term_loss[0] + term_loss[1], row_stats, denominators};
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(args.ce.accumulate_type, "ltfast_mixed_reduce",
                             [&] { mixed_reduce<scalar_t>(args, term_loss, loss, denominators); });
  return {loss, row_stats, denominators};
}

at::Tensor mixed_backward_cpu(const MixedArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                              const at::Tensor& denominators) {
  at::Tensor result;
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.ce.logits.scalar_type(), "ltfast_mixed_backward_cpu",
                                  [&] { result = mixed_backward_kernel<scalar_t>(args, grad_loss, stats, denominators); });
  return result;
}

// ------------------------------------------------------------------------------ probability targets
// The target row as acc_t values: the tensor's own memory when it is already acc_t, else converted
// into `buffer`.
template <typename target_t, typename acc_t>
const acc_t* target_tile(const target_t* row, int64_t len, acc_t* buffer) {
  if constexpr (std::is_same_v<target_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, buffer, len);
    return buffer;
  }
}

// Independent vector accumulators per row pass: the exp of one vector is a ~20-instruction chain,
// and four chains in flight keep both FMA pipes busy where one loop-carried sum did not (the same
// unroll as PyTorch's own vec reductions).
constexpr int kUnroll = 4;

// Per-class factors of w_c q_c = w_c ((1 - eps) t_c + eps / C). kPlain: no weight and eps = 0, so
// w_c q_c = t_c (the common case: distillation, mixed one-hots) without the two multiply-adds.
template <typename acc_t>
struct WeightedTarget {
  const acc_t* weight;  // nullable
  acc_t one_minus_eps;
  acc_t eps_over_c;

  template <bool kPlain>
  Vectorized<acc_t> at(const acc_t* t, int64_t start, int64_t c) const {
    using Vec = Vectorized<acc_t>;
    const Vec target = Vec::loadu(t + c);
    if constexpr (kPlain) {
      return target;
    } else {
      return math::weighted_probability(target, weight ? Vec::loadu(weight + start + c) : Vec(acc_t(1)),
                                        Vec(one_minus_eps), Vec(eps_over_c));
    }
  }
  acc_t at_scalar(const acc_t* t, int64_t start, int64_t c) const {
    return math::weighted_probability(t[c], weight ? weight[start + c] : acc_t(1), one_minus_eps, eps_over_c);
  }
};

// max_c a_c of one tile, NaN-propagating.
template <typename acc_t>
acc_t tile_max_of(const acc_t* a, int64_t len) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec vmax[kUnroll];
  for (int u = 0; u < kUnroll; ++u) vmax[u] = Vec(math::negative_infinity<acc_t>());
  int64_t c = 0;
  for (; c + kUnroll * W <= len; c += kUnroll * W) {
    for (int u = 0; u < kUnroll; ++u) vmax[u] = at::vec::maximum(vmax[u], Vec::loadu(a + c + u * W));
  }
  for (; c + W <= len; c += W) vmax[0] = at::vec::maximum(vmax[0], Vec::loadu(a + c));
  for (int u = 1; u < kUnroll; ++u) vmax[0] = at::vec::maximum(vmax[0], vmax[u]);
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax[0]);
  for (; c < len; ++c) m = nan_propagating_max(m, a[c]);
  return m;
}

// (max, exp-sum, mass, offset) of one tile of adjusted logits `a` and targets `t` against the
// tile's max (a finite one: an all -inf tile takes the scalar loop of the caller).
template <bool kPlain, typename acc_t>
math::ProbabilityState<acc_t> probability_tile_state(const acc_t* a, const acc_t* t, int64_t start, int64_t len,
                                                     acc_t tile_max, const WeightedTarget<acc_t>& wt) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vmax(tile_max);
  Vec vsum[kUnroll], vmass[kUnroll], voffset[kUnroll];
  for (int u = 0; u < kUnroll; ++u) vsum[u] = vmass[u] = voffset[u] = Vec(acc_t(0));
  int64_t c = 0;
  for (; c + kUnroll * W <= len; c += kUnroll * W) {
    for (int u = 0; u < kUnroll; ++u) {
      const Vec shifted = Vec::loadu(a + c + u * W) - vmax;
      const Vec wq = wt.template at<kPlain>(t, start, c + u * W);
      vsum[u] = vsum[u] + vec_exp(shifted);
      vmass[u] = vmass[u] + wq;
      voffset[u] = voffset[u] + wq * shifted;
    }
  }
  for (; c + W <= len; c += W) {
    const Vec shifted = Vec::loadu(a + c) - vmax;
    const Vec wq = wt.template at<kPlain>(t, start, c);
    vsum[0] = vsum[0] + vec_exp(shifted);
    vmass[0] = vmass[0] + wq;
    voffset[0] = voffset[0] + wq * shifted;
  }
  for (int u = 1; u < kUnroll; ++u) {
    vsum[0] = vsum[0] + vsum[u];
    vmass[0] = vmass[0] + vmass[u];
    voffset[0] = voffset[0] + voffset[u];
  }
  auto add = [](Vec& x, Vec& y) { return x + y; };
  math::ProbabilityState<acc_t> part{tile_max, at::vec::vec_reduce_all<acc_t>(add, vsum[0]),
                                     at::vec::vec_reduce_all<acc_t>(add, vmass[0]),
                                     at::vec::vec_reduce_all<acc_t>(add, voffset[0])};
  for (; c < len; ++c) {
    const acc_t wq = wt.at_scalar(t, start, c);
    part.sum += math::exp_shifted(a[c], tile_max);
    part.mass += wq;
    part.offset += math::probability_offset(wq, a[c], tile_max);
  }
  return part;
}

template <typename scalar_t, typename target_t, bool kPlain>
void probability_forward_kernel(const CrossEntropyArgs& args, at::Tensor& row_loss, at::Tensor& row_stats) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const target_t* target = args.target.data_ptr<target_t>();
  const acc_t* adjustment = data_or_null<acc_t>(args.adjustment);
  const acc_t eps = static_cast<acc_t>(args.label_smoothing);
  const WeightedTarget<acc_t> wt{data_or_null<acc_t>(args.weight), acc_t(1) - eps, eps / static_cast<acc_t>(C)};
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  acc_t* stats_out = row_stats.data_ptr<acc_t>();  // [3, N]: max, log_sum, mass

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    const bool direct = kSameType && adjustment == nullptr;  // the logits themselves are the adjusted row
    std::vector<acc_t> tile(direct ? 0 : std::min(C, kTileClasses)), target_buffer(std::min(C, kTileClasses));
    for (int64_t i = begin; i < end; ++i) {
      auto state = math::empty_probability_state<acc_t>();
      for (int64_t start = 0; start < C; start += kTileClasses) {
        const int64_t len = std::min(kTileClasses, C - start);
        const acc_t* a;
        acc_t tile_max;
        if (direct) {
          a = reinterpret_cast<const acc_t*>(logits + i * C + start);
          tile_max = tile_max_of(a, len);
        } else {
          tile_max =
              load_adjusted_row(logits + i * C + start, adjustment ? adjustment + start : nullptr, len, tile.data());
          a = tile.data();
        }
        const acc_t* t = target_tile(target + i * C + start, len, target_buffer.data());
        math::ProbabilityState<acc_t> part{tile_max, acc_t(0), acc_t(0), acc_t(0)};
        if (tile_max > math::negative_infinity<acc_t>()) {
          part = probability_tile_state<kPlain>(a, t, start, len, tile_max, wt);
        } else {  // every element -inf (rare): scalar, with probability_offset's -inf rule
          for (int64_t c = 0; c < len; ++c) {
            const acc_t wq = wt.at_scalar(t, start, c);
            part.sum += math::exp_shifted(a[c], tile_max);
            part.mass += wq;
            part.offset += math::probability_offset(wq, a[c], tile_max);
          }
        }
        state = math::merge_probability_states(state, part);
      }
      const auto row = math::finish_row(math::SoftmaxState<acc_t>{state.max, state.sum});
      if (state.mass == -math::negative_infinity<acc_t>() && !(state.offset == state.offset) && !math::row_is_nan(row)) {
        // A target of +inf: the vector loop's inf * 0 at the max is NaN where probability_offset
        // adds 0 (soft_target_math.h). Rare, so the row's offset again, scalar, against the row max.
        state.offset = acc_t(0);
        std::vector<acc_t> adjusted(C), targets(C);
        load_adjusted_row(logits + i * C, adjustment, C, adjusted.data());
        const acc_t* t = target_tile(target + i * C, C, targets.data());
        for (int64_t c = 0; c < C; ++c) {
          state.offset += math::probability_offset(wt.at_scalar(t, 0, c), adjusted[c], row.max);
        }
      }
      stats_out[i] = row.max;
      stats_out[N + i] = row.log_sum;
      stats_out[2 * N + i] = state.mass;
      loss_out[i] = math::probability_row_loss(row, state.mass, state.offset);
    }
  });
}

template <typename scalar_t, typename target_t, bool kPlain>
void probability_backward_kernel(const CrossEntropyArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                 const at::Tensor& denominator, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const target_t* target = args.target.data_ptr<target_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const acc_t* adjustment = data_or_null<acc_t>(args.adjustment);
  const acc_t eps = static_cast<acc_t>(args.label_smoothing);
  const WeightedTarget<acc_t> wt{data_or_null<acc_t>(args.weight), acc_t(1) - eps, eps / static_cast<acc_t>(C)};
  const acc_t* stats = row_stats.data_ptr<acc_t>();
  const bool per_row_grad = args.reduction == Reduction::None;
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const acc_t shared_scale =
      per_row_grad ? acc_t(0) : grad_in[0] / *denominator.to(args.accumulate_type).data_ptr<acc_t>();

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(kSameType ? 0 : std::min(C, kTileClasses)), target_buffer(std::min(C, kTileClasses));
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad + i * C;
      const math::RowLogSumExp<acc_t> row{stats[i], stats[N + i]};
      if (math::row_is_nan(row)) {
        std::fill(grad_row, grad_row + C, static_cast<scalar_t>(row.log_sum));
        continue;
      }
      const acc_t scale = per_row_grad ? grad_in[i] : shared_scale;
      const acc_t mass_scale = scale * stats[2 * N + i];
      const Vec vmax(row.max), vlog_sum(row.log_sum), vmass(mass_scale), vscale(scale);
      for (int64_t start = 0; start < C; start += kTileClasses) {
        const int64_t len = std::min(kTileClasses, C - start);
        // float32/float64: read the logits and write the gradient in place; else through `tile`.
        const acc_t* source;
        acc_t* out;
        if constexpr (kSameType) {
          source = logits + i * C + start;
          out = grad_row + start;
        } else {
          at::vec::convert(logits + i * C + start, tile.data(), len);
          source = out = tile.data();
        }
        const acc_t* t = target_tile(target + i * C + start, len, target_buffer.data());
        const acc_t* adj = adjustment ? adjustment + start : nullptr;
        // d loss / d a_c = mass p_c - w_c q_c, times the upstream gradient (soft_target_math.h).
        auto element = [&](int64_t c) {
          Vec a = Vec::loadu(source + c);
          if (adj) a = math::adjusted_logit(a, Vec::loadu(adj + c));
          const Vec p = vec_exp(math::log_softmax_of(a, vmax, vlog_sum));
          return p * vmass - wt.template at<kPlain>(t, start, c) * vscale;
        };
        int64_t c = 0;
        for (; c + kUnroll * W <= len; c += kUnroll * W) {
          Vec g[kUnroll];
          for (int u = 0; u < kUnroll; ++u) g[u] = element(c + u * W);
          for (int u = 0; u < kUnroll; ++u) g[u].store(out + c + u * W);
        }
        for (; c + W <= len; c += W) element(c).store(out + c);
        for (; c < len; ++c) {
          const acc_t a = adj ? math::adjusted_logit(source[c], adj[c]) : source[c];
          out[c] = math::softmax_probability(a, row) * mass_scale - wt.at_scalar(t, start, c) * scale;
        }
        if constexpr (!kSameType) at::vec::convert(tile.data(), grad_row + start, len);
      }
    }
  });
}

// Dispatches on the logits dtype, on whether the target is in that dtype or the accumulation dtype,
// and on whether w q is the target itself (no weight, no smoothing).
template <typename F>
void dispatch_probability(const CrossEntropyArgs& args, F&& f) {
  const bool plain = !args.weight.defined() && args.label_smoothing == 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_probability_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto with_plain = [&](auto target_zero) {
      if (plain) {
        f(scalar_t(0), target_zero, std::true_type{});
      } else {
        f(scalar_t(0), target_zero, std::false_type{});
      }
    };
    if (args.target.scalar_type() == args.logits.scalar_type()) {
      with_plain(scalar_t(0));
    } else {
      with_plain(acc_t(0));
    }
  });
}

SoftForwardResult probability_forward_cpu(const CrossEntropyArgs& args) {
  const auto options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, options);
  at::Tensor row_stats = at::empty({3, args.num_rows}, options);
  dispatch_probability(args, [&](auto s, auto t, auto plain) {
    probability_forward_kernel<decltype(s), decltype(t), decltype(plain)::value>(args, row_loss, row_stats);
  });
  if (args.reduction == Reduction::None) return {row_loss, row_stats, at::ones({}, options)};
  const double denom = args.reduction == Reduction::Mean ? static_cast<double>(args.num_rows) : 1.0;
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_probability_reduce", [&] {
    // Serial float64 sum: bit-identical whatever the thread count.
    const scalar_t* rows = row_loss.data_ptr<scalar_t>();
    double total = 0.0;
    for (int64_t i = 0; i < args.num_rows; ++i) total += static_cast<double>(rows[i]);
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total / denom);
  });
  return {loss, row_stats, at::full({}, denom, options)};
}

at::Tensor probability_backward_cpu(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                    const at::Tensor& row_stats, const at::Tensor& denominator) {
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const at::Tensor stats = row_stats.contiguous();
  dispatch_probability(args, [&](auto s, auto t, auto plain) {
    probability_backward_kernel<decltype(s), decltype(t), decltype(plain)::value>(args, grad_loss, stats, denominator,
                                                                                 grad_logits);
  });
  return grad_logits;
}

}  // namespace

// This build's entry points (the kernels above have internal linkage).
SoftForwardResult mixed_forward_cpu_entry(const MixedArgs& args) { return mixed_forward_cpu(args); }
at::Tensor mixed_backward_cpu_entry(const MixedArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                    const at::Tensor& denominators) {
  return mixed_backward_cpu(args, grad_loss, row_stats, denominators);
}
SoftForwardResult probability_forward_cpu_entry(const CrossEntropyArgs& args) { return probability_forward_cpu(args); }
at::Tensor probability_backward_cpu_entry(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                          const at::Tensor& row_stats, const at::Tensor& denominator) {
  return probability_backward_cpu(args, grad_loss, row_stats, denominator);
}

}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_DEFAULT)
// Once, in the build without -m flags: the entry points that pick a capability's kernels, and the
// registrations (static initialisers, which must not hold AVX code).
LTFAST_CPU_DISPATCH(SoftForwardResult, mixed_forward_cpu_entry,
                    (const MixedArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, mixed_backward_cpu_entry,
                    (const MixedArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominators),
                    (args, grad_loss, row_stats, denominators))
LTFAST_CPU_DISPATCH(SoftForwardResult, probability_forward_cpu_entry,
                    (const CrossEntropyArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, probability_backward_cpu_entry,
                    (const CrossEntropyArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominator),
                    (args, grad_loss, row_stats, denominator))

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_mixed_cross_entropy_forward", &mixed_forward<mixed_forward_cpu_entry>);
  m.impl("_mixed_cross_entropy_backward", &mixed_backward<mixed_backward_cpu_entry>);
  m.impl("_probability_cross_entropy_forward", &probability_forward<probability_forward_cpu_entry>);
  m.impl("_probability_cross_entropy_backward", &probability_backward<probability_backward_cpu_entry>);
}
#endif  // CPU_CAPABILITY_DEFAULT

}  // namespace ltfast
