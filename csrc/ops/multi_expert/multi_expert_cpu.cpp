// CPU backend of the multi-expert losses: at::parallel_for over samples; each sample's E x C block
// of logits is read from memory once (converted once to the accumulation dtype for fp16/bf16) and
// every softmax of the row is taken from it while it sits in L1/L2 (E x C = 3 x 1000 floats is
// 12 KB). Backward reads the block once and writes its gradient once. Losses are summed serially in
// float64 after the parallel pass, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../common/cpu_softmax.h"
#include "../../common/softmax_math.h"
#include "../../common/cpu_dispatch.h"
#include "multi_expert.h"

namespace ltfast {
namespace CPU_CAPABILITY {  // one build per CPU capability: csrc/common/cpu_dispatch.h
namespace {

using at::vec::Vectorized;
using namespace cpu;

template <typename acc_t>
acc_t reduce_max(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return at::vec::maximum(x, z); }, v);
}

template <typename acc_t>
acc_t reduce_sum(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, v);
}

// The E x C block of sample i in the accumulation dtype: the logits themselves for float32/float64,
// else converted into `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* block_in_acc(const scalar_t* block, int64_t count, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return block;
  } else {
    at::vec::convert(block, buffer.data(), count);
    return buffer.data();
  }
}

// The tempered row u_c = x_c * scale_c, written to `scaled` and read back by every later use: the
// compiler contracts a product that feeds a subtraction into an FMA (exact product minus the max),
// so that exp(x * scale - max) of the max element itself was exp(-0.03) at x = 1e6 (its product's
// rounding) and log_sum came out negative. Products taken once and stored are rounded once.
template <typename acc_t>
void store_scaled(const acc_t* x, const acc_t* scale, int64_t n, acc_t* scaled) {
  using Vec = Vectorized<acc_t>;
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(x + c) * Vec::loadu(scale + c)).store(scaled + c);
  for (; c < n; ++c) scaled[c] = x[c] * scale[c];
}

// max_c x_c (m_plain) and max_c u_c (m_scaled), NaN-propagating.
template <typename acc_t>
void max_plain_and_scaled(const acc_t* x, const acc_t* u, int64_t n, acc_t& m_plain, acc_t& m_scaled) {
  using Vec = Vectorized<acc_t>;
  Vec vplain(math::negative_infinity<acc_t>()), vscaled(math::negative_infinity<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    vplain = at::vec::maximum(vplain, Vec::loadu(x + c));
    vscaled = at::vec::maximum(vscaled, Vec::loadu(u + c));
  }
  m_plain = reduce_max(vplain);
  m_scaled = reduce_max(vscaled);
  for (; c < n; ++c) {
    m_plain = nan_propagating_max(m_plain, x[c]);
    m_scaled = nan_propagating_max(m_scaled, u[c]);
  }
}

// Adds sum_c exp(x_c - shift_plain) to sum_plain and sum_c exp(u_c - shift_scaled) to sum_scaled
// over c in [begin, end); with kStore, also writes the exponentials to out_plain[c] and
// out_scaled[c] (for the forward-time gradient).
template <bool kStore, typename acc_t>
void add_exp_sums(const acc_t* x, const acc_t* u, int64_t begin, int64_t end, acc_t shift_plain,
                  acc_t shift_scaled, acc_t& sum_plain, acc_t& sum_scaled, acc_t* out_plain = nullptr,
                  acc_t* out_scaled = nullptr) {
  using Vec = Vectorized<acc_t>;
  const Vec vshift_plain(shift_plain), vshift_scaled(shift_scaled);
  Vec vplain(acc_t(0)), vscaled(acc_t(0));
  int64_t c = begin;
  for (; c + Vec::size() <= end; c += Vec::size()) {
    const Vec v = Vec::loadu(x + c);
    const Vec e_plain = vec_exp(v - vshift_plain);
    const Vec e_scaled = vec_exp(Vec::loadu(u + c) - vshift_scaled);
    if constexpr (kStore) {
      e_plain.store(out_plain + c);
      e_scaled.store(out_scaled + c);
    }
    vplain = vplain + e_plain;
    vscaled = vscaled + e_scaled;
  }
  sum_plain += reduce_sum(vplain);
  sum_scaled += reduce_sum(vscaled);
  for (; c < end; ++c) {
    const acc_t e_plain = math::exp_shifted(x[c], shift_plain);
    const acc_t e_scaled = math::exp_shifted(u[c], shift_scaled);
    if constexpr (kStore) {
      out_plain[c] = e_plain;
      out_scaled[c] = e_scaled;
    }
    sum_plain += e_plain;
    sum_scaled += e_scaled;
  }
}

// (max, sum exp(x_c - max)) of one row; with `out`, also the exponentials exp(x_c - max).
template <typename acc_t>
math::SoftmaxState<acc_t> row_softmax_state(const acc_t* x, int64_t n, acc_t* out = nullptr) {
  using Vec = Vectorized<acc_t>;
  Vec vmax(math::negative_infinity<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + c));
  acc_t m = reduce_max(vmax);
  for (; c < n; ++c) m = nan_propagating_max(m, x[c]);
  if (!(m > math::negative_infinity<acc_t>() && m < -math::negative_infinity<acc_t>())) return {m, acc_t(0)};
  const Vec vshift(m);
  Vec vsum(acc_t(0));
  c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec e = vec_exp(Vec::loadu(x + c) - vshift);
    if (out) e.store(out + c);
    vsum = vsum + e;
  }
  acc_t s = reduce_sum(vsum);
  for (; c < n; ++c) {
    const acc_t e = math::exp_shifted(x[c], m);
    if (out) out[c] = e;
    s += e;
  }
  return {m, s};
}

// The expert mean of the tempered logits, shifted: w_c = (sum_k (u_kc - shift)) / E over the E rows
// of `tempered` (u = z * inv_t, store_scaled: the products of the tempered softmaxes). With shift the
// largest tempered row max, w is small wherever pbar is not negligible, so that pbar = softmax(w)
// (= softmax(zbar / T): the shift is one constant per sample) and the KL are free of the
// cancellation of lse(zbar / T) ~ |z| / T against the experts' lse: at z ~ 1e10 in float32 that
// difference lost every digit (issue 19). The same arithmetic in forward and backward.
template <typename acc_t>
void shifted_tempered_mean(const acc_t* tempered, int64_t E, int64_t C, acc_t shift, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const acc_t inv_e = acc_t(1) / static_cast<acc_t>(E);
  const Vec vinv_e(inv_e), vshift(shift);
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    Vec total = Vec::loadu(tempered + c) - vshift;
    for (int64_t k = 1; k < E; ++k) total = total + (Vec::loadu(tempered + k * C + c) - vshift);
    (total * vinv_e).store(out + c);
  }
  for (; c < C; ++c) {
    acc_t total = tempered[c] - shift;
    for (int64_t k = 1; k < E; ++k) total += tempered[k * C + c] - shift;
    out[c] = total * inv_e;
  }
}

// The shift of shifted_tempered_mean: the largest of the E tempered row maxes (NaN if one is NaN).
template <typename acc_t>
acc_t tempered_shift(const acc_t* tempered_max, int64_t E) {
  acc_t shift = math::negative_infinity<acc_t>();
  for (int64_t k = 0; k < E; ++k) shift = nan_propagating_max(shift, tempered_max[k]);
  return shift;
}

bool finished_is_nan(const double log_sum) { return !(log_sum == log_sum); }

// ------------------------------------------------------------------------------ diverse_expert_loss
// With grad_out: also the gradient for an upstream gradient of 1, grad_coef (p - onehot) with
// grad_coef = 1 / denominator, from the exponentials of the forward (multi_expert.h).
template <typename scalar_t>
void diverse_forward_kernel(const MultiExpertArgs& args, at::Tensor& row_loss, at::Tensor& row_stats,
                            scalar_t* grad_out, at::opmath_type<scalar_t> grad_coef) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, E = args.num_experts, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* adjustments = args.adjustments.data_ptr<acc_t>();
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  acc_t* max_out = row_stats.data_ptr<acc_t>();  // row_stats[0]: [N, E]
  acc_t* log_sum_out = max_out + N * E;          // row_stats[1]

  at::parallel_for(0, N, rows_per_task(E * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(grad_out ? C : std::min(C, kTileClasses));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        loss_out[i] = acc_t(0);
        std::fill(max_out + i * E, max_out + (i + 1) * E, acc_t(0));
        std::fill(log_sum_out + i * E, log_sum_out + (i + 1) * E, acc_t(0));
        if (grad_out) std::fill(grad_out + i * E * C, grad_out + (i + 1) * E * C, scalar_t(0));
        continue;
      }
      acc_t total = acc_t(0);
      for (int64_t e = 0; e < E && grad_out; ++e) {
        // The whole adjusted row in `tile` (L1/L2), its exponentials in place, then the gradient.
        const scalar_t* row = logits + (i * E + e) * C;
        const acc_t* adjustment = adjustments + e * C;
        acc_t* a = tile.data();
        const acc_t m = load_adjusted_row(row, adjustment, C, a);
        const acc_t target_logit = a[y];
        acc_t sum = acc_t(0);
        if (m > math::negative_infinity<acc_t>() && m < -math::negative_infinity<acc_t>()) {
          const Vec vmax(m);
          Vec vsum(acc_t(0));
          int64_t c = 0;
          for (; c + Vec::size() <= C; c += Vec::size()) {
            const Vec ex = vec_exp(Vec::loadu(a + c) - vmax);
            ex.store(a + c);
            vsum = vsum + ex;
          }
          sum = reduce_sum(vsum);
          for (; c < C; ++c) {
            a[c] = math::exp_shifted(a[c], m);
            sum += a[c];
          }
        }
        const auto finished = math::finish_row(math::SoftmaxState<acc_t>{m, sum});
        max_out[i * E + e] = finished.max;
        log_sum_out[i * E + e] = finished.log_sum;
        total += finished.log_sum - (target_logit - finished.max);
        scalar_t* grad_row = grad_out + (i * E + e) * C;
        if (math::row_is_nan(finished)) {
          std::fill(grad_row, grad_row + C, static_cast<scalar_t>(finished.log_sum));
          continue;
        }
        const acc_t scale = grad_coef / sum;
        const Vec vscale(scale);
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) (Vec::loadu(a + c) * vscale).store(a + c);
        for (; c < C; ++c) a[c] *= scale;
        a[y] -= grad_coef;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::copy(a, a + C, grad_row);
        } else {
          at::vec::convert(a, grad_row, C);
        }
      }
      for (int64_t e = 0; e < E && !grad_out; ++e) {
        const scalar_t* row = logits + (i * E + e) * C;
        const acc_t* adjustment = adjustments + e * C;
        const acc_t target_logit = adjusted_target_logit(row, adjustment, static_cast<const acc_t*>(nullptr), y);
        const auto state = adjusted_row_softmax_state(row, C, adjustment, static_cast<const acc_t*>(nullptr), y,
                                                      target_logit, tile.data(), static_cast<const acc_t*>(nullptr),
                                                      static_cast<acc_t*>(nullptr));
        const auto finished = math::finish_row(state);
        max_out[i * E + e] = finished.max;
        log_sum_out[i * E + e] = finished.log_sum;
        total += finished.log_sum - (target_logit - finished.max);
      }
      loss_out[i] = total;
    }
  });
}

template <typename scalar_t>
void diverse_backward_kernel(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                             const at::Tensor& denominator, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, E = args.num_experts, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* adjustments = args.adjustments.data_ptr<acc_t>();
  const acc_t* max_in = row_stats.data_ptr<acc_t>();
  const acc_t* log_sum_in = max_in + N * E;
  const bool per_row_grad = args.reduction == Reduction::None;
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const at::Tensor denominator_acc = denominator.to(args.accumulate_type);
  const acc_t inv_denominator = acc_t(1) / *denominator_acc.data_ptr<acc_t>();

  at::parallel_for(0, N, rows_per_task(E * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(gradient_tile_size<scalar_t, acc_t>(C));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        std::fill(grad + i * E * C, grad + (i + 1) * E * C, scalar_t(0));
        continue;
      }
      const acc_t scale = per_row_grad ? grad_in[i] : grad_in[0] * inv_denominator;
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* logits_row = logits + (i * E + e) * C;
        scalar_t* grad_row = grad + (i * E + e) * C;
        const math::RowLogSumExp<acc_t> row{max_in[i * E + e], log_sum_in[i * E + e]};
        if (math::row_is_nan(row)) {  // NaN/inf in the row: NaN gradients, as F.cross_entropy
          std::fill(grad_row, grad_row + C, static_cast<scalar_t>(row.log_sum));
          continue;
        }
        const acc_t* adjustment = adjustments + e * C;
        const Vec vmax(row.max), vlog_sum(row.log_sum), vscale(scale);
        for_each_gradient_tile(logits_row, grad_row, C, tile.data(),
                               [&](const acc_t* source, acc_t* out, int64_t start, int64_t len) {
          const acc_t* adj = adjustment + start;
          int64_t c = 0;
          for (; c + Vec::size() <= len; c += Vec::size()) {
            const Vec a = math::adjusted_logit(Vec::loadu(source + c), Vec::loadu(adj + c));
            (vscale * vec_exp(math::log_softmax_of(a, vmax, vlog_sum))).store(out + c);
          }
          for (; c < len; ++c) {
            out[c] = scale * math::softmax_probability(math::adjusted_logit(source[c], adj[c]), row);
          }
          if (y >= start && y < start + len) out[y - start] -= scale;
        });
      }
    }
  });
}

// ------------------------------------------------------------------------------ ride_loss
// 1 / T_c for every class (T_c = base_temperature * temperature_c, or base_temperature), and Tbar.
template <typename acc_t>
std::vector<acc_t> inverse_temperatures(const MultiExpertArgs& args, double* mean_temperature) {
  const int64_t C = args.num_classes;
  std::vector<acc_t> inv(C);
  const acc_t base = static_cast<acc_t>(args.base_temperature);
  const acc_t* t = args.temperature.defined() ? args.temperature.data_ptr<acc_t>() : nullptr;
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t temperature = t ? base * t[c] : base;
    inv[c] = acc_t(1) / temperature;
    total += static_cast<double>(temperature);
  }
  *mean_temperature = total / static_cast<double>(C);
  return inv;
}

struct RideRowSums {
  std::vector<double> ce;  // w_{y_i} sum_k CE_ik per row (0 for ignored rows)
  std::vector<double> kl;  // sum_k KL(pbar_i || p_ik) per row
};

// Gradient coefficients for an upstream gradient of 1: d/dz of the CE term is ce_scale w_y (q - onehot),
// of the KL term kl_scale / T_c (p - pbar).
template <typename acc_t>
struct RideGradCoefficients {
  double ce_scale = 0.0;  // 1 / sum_i w_{y_i}
  acc_t kl_scale = acc_t(0);  // diversity_factor Tbar^2 / N'
};

template <typename scalar_t>
void ride_forward_kernel(const MultiExpertArgs& args, const std::vector<at::opmath_type<scalar_t>>& inv_temperature,
                         RideRowSums& sums, at::Tensor& row_stats, scalar_t* grad_out,
                         const RideGradCoefficients<at::opmath_type<scalar_t>>& coefficients) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t N = args.num_rows, E = args.num_experts, C = args.num_classes, S = 2 * E + 1;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* margin = data_or_null<acc_t>(args.target_margin);
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  const acc_t* inv_t = inv_temperature.data();
  acc_t* max_out = row_stats.data_ptr<acc_t>();  // row_stats[0]: [N, 2E + 1]
  acc_t* log_sum_out = max_out + N * S;          // row_stats[1]

  at::parallel_for(0, N, rows_per_task(E * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> converted(kSameType ? 0 : E * C);
    std::vector<acc_t> mean_row(C), sum_ce(E), sum_t(E), tempered(E * C);
    // The row's exponentials for the forward-time gradient (2E + 1 rows of C: 28 KB at E = 3, C = 1000).
    std::vector<acc_t> exp_ce(grad_out ? E * C : 0), exp_t(grad_out ? E * C : 0), exp_bar(grad_out ? C : 0);
    std::vector<acc_t> out_buffer(grad_out && !kSameType ? E * C : 0);
    for (int64_t i = begin; i < end; ++i) {
      acc_t* row_max = max_out + i * S;
      acc_t* row_log_sum = log_sum_out + i * S;
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        std::fill(row_max, row_max + S, acc_t(0));
        std::fill(row_log_sum, row_log_sum + S, acc_t(0));
        sums.ce[i] = 0.0;
        sums.kl[i] = 0.0;
        if (grad_out) std::fill(grad_out + i * E * C, grad_out + (i + 1) * E * C, scalar_t(0));
        continue;
      }
      const acc_t* block = block_in_acc(logits + i * E * C, E * C, converted);
      double ce = 0.0, kl = 0.0;
      for (int64_t k = 0; k < E; ++k) {
        const acc_t* z = block + k * C;
        acc_t* u = tempered.data() + k * C;
        store_scaled(z, inv_t, C, u);
        const acc_t target_logit = margin ? z[y] - margin[y] : z[y];
        acc_t m_ce, m_t;
        max_plain_and_scaled(z, u, C, m_ce, m_t);
        // The target's original logit stays in the max: with a margin >= 0 still a valid shift (one
        // that overflows nothing), and the sums below leave it out and add the margin-adjusted one.
        m_ce = nan_propagating_max(m_ce, target_logit);
        acc_t s_ce = acc_t(0), s_t = acc_t(0);
        const bool finite_ce = m_ce > math::negative_infinity<acc_t>() && m_ce < -math::negative_infinity<acc_t>();
        const bool finite_t = m_t > math::negative_infinity<acc_t>() && m_t < -math::negative_infinity<acc_t>();
        if (finite_ce && finite_t) {
          if (grad_out) {
            acc_t* e_ce = exp_ce.data() + k * C;
            acc_t* e_t = exp_t.data() + k * C;
            add_exp_sums<true>(z, u, 0, y, m_ce, m_t, s_ce, s_t, e_ce, e_t);
            add_exp_sums<true>(z, u, y + 1, C, m_ce, m_t, s_ce, s_t, e_ce, e_t);
            e_ce[y] = math::exp_shifted(target_logit, m_ce);
            e_t[y] = math::exp_shifted(u[y], m_t);
            s_ce += e_ce[y];
            s_t += e_t[y];
          } else {
            add_exp_sums<false>(z, u, 0, y, m_ce, m_t, s_ce, s_t);
            add_exp_sums<false>(z, u, y + 1, C, m_ce, m_t, s_ce, s_t);
            s_ce += math::exp_shifted(target_logit, m_ce);
            s_t += math::exp_shifted(u[y], m_t);
          }
        }
        sum_ce[k] = s_ce;
        sum_t[k] = s_t;
        const auto finished_ce = math::finish_row(math::SoftmaxState<acc_t>{m_ce, s_ce});
        const auto finished_t = math::finish_row(math::SoftmaxState<acc_t>{m_t, s_t});
        row_max[k] = finished_ce.max;
        row_log_sum[k] = finished_ce.log_sum;
        row_max[E + k] = finished_t.max;
        row_log_sum[E + k] = finished_t.log_sum;
        ce += static_cast<double>(finished_ce.log_sum - (target_logit - finished_ce.max));
      }
      // sum_k KL(pbar || p_k) = sum_k lse(z_k / T) - E lse(zbar / T) (multi_expert.h), every lse
      // taken against the shift s: sum_k ((m_k - s) + log_sum_k) - E (m_w + log_sum_w) with w the
      // shifted mean. m_k - s is exact in float64 and every other term is as small as the logits'
      // spread, not their magnitude.
      const acc_t shift = tempered_shift(row_max + E, E);
      for (int64_t k = 0; k < E; ++k) {
        kl += (static_cast<double>(row_max[E + k]) - static_cast<double>(shift)) +
              static_cast<double>(row_log_sum[E + k]);
      }
      shifted_tempered_mean(tempered.data(), E, C, shift, mean_row.data());
      const auto bar_state = row_softmax_state(mean_row.data(), C, grad_out ? exp_bar.data() : nullptr);
      const auto finished_bar = math::finish_row(bar_state);
      row_max[2 * E] = finished_bar.max;
      row_log_sum[2 * E] = finished_bar.log_sum;
      kl -= static_cast<double>(E) * (static_cast<double>(finished_bar.max) + static_cast<double>(finished_bar.log_sum));
      sums.ce[i] = (weight ? static_cast<double>(weight[y]) : 1.0) * ce;
      sums.kl[i] = kl;
      if (grad_out) {
        // The gradient for an upstream gradient of 1 (multi_expert.h), from the exponentials above:
        // q = e_ce / s_ce, p = e_t / s_t, pbar = e_bar / s_bar.
        scalar_t* grad_block = grad_out + i * E * C;
        bool nan_row = false;
        for (int64_t j = 0; j < S; ++j) nan_row = nan_row || finished_is_nan(static_cast<double>(row_log_sum[j]));
        if (nan_row) {
          std::fill(grad_block, grad_block + E * C, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
          continue;
        }
        acc_t* out = kSameType ? reinterpret_cast<acc_t*>(grad_block) : out_buffer.data();
        const acc_t ce_coef = static_cast<acc_t>(coefficients.ce_scale * (weight ? static_cast<double>(weight[y]) : 1.0));
        const Vec vce_coef(ce_coef), vkl_scale(coefficients.kl_scale), vinv_bar(acc_t(1) / bar_state.sum);
        for (int64_t k = 0; k < E; ++k) {
          const acc_t* e_ce = exp_ce.data() + k * C;
          const acc_t* e_t = exp_t.data() + k * C;
          acc_t* o = out + k * C;
          const acc_t inv_ce = acc_t(1) / sum_ce[k], inv_t_sum = acc_t(1) / sum_t[k];
          const Vec vq(vce_coef * Vec(inv_ce)), vinv_t_sum(inv_t_sum);
          int64_t c = 0;
          for (; c + Vec::size() <= C; c += Vec::size()) {
            const Vec p = Vec::loadu(e_t + c) * vinv_t_sum;
            const Vec pbar = Vec::loadu(exp_bar.data() + c) * vinv_bar;
            (vq * Vec::loadu(e_ce + c) + vkl_scale * Vec::loadu(inv_t + c) * (p - pbar)).store(o + c);
          }
          for (; c < C; ++c) {
            o[c] = ce_coef * inv_ce * e_ce[c] +
                   coefficients.kl_scale * inv_t[c] * (e_t[c] * inv_t_sum - exp_bar[c] / bar_state.sum);
          }
          o[y] -= ce_coef;
        }
        if constexpr (!kSameType) at::vec::convert(out, grad_block, E * C);
      }
    }
  });
}

template <typename scalar_t>
void ride_backward_kernel(const MultiExpertArgs& args, const std::vector<at::opmath_type<scalar_t>>& inv_temperature,
                          const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominators,
                          at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, E = args.num_experts, C = args.num_classes, S = 2 * E + 1;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* margin = data_or_null<acc_t>(args.target_margin);
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  const acc_t* inv_t = inv_temperature.data();
  const acc_t* max_in = row_stats.data_ptr<acc_t>();
  const acc_t* log_sum_in = max_in + N * S;
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor denominators_acc = denominators.to(at::kDouble).contiguous();
  const double* denominator = denominators_acc.data_ptr<double>();  // (sum w, N', Tbar)
  const double g = static_cast<double>(*grad_acc.data_ptr<acc_t>());
  const acc_t kl_scale =
      static_cast<acc_t>(g * args.diversity_factor * denominator[2] * denominator[2] / denominator[1]);
  const double ce_scale = g / denominator[0];

  at::parallel_for(0, N, rows_per_task(E * C), [&](int64_t begin, int64_t end) {
    constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> converted(kSameType ? 0 : E * C), out_buffer(kSameType ? 0 : E * C);
    std::vector<acc_t> mean_row(C), tempered(E * C);
    std::vector<acc_t> ce_max(E), ce_log_sum(E), t_max(E), t_log_sum(E);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_block = grad + i * E * C;
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        std::fill(grad_block, grad_block + E * C, scalar_t(0));
        continue;
      }
      const acc_t* row_max = max_in + i * S;
      const acc_t* row_log_sum = log_sum_in + i * S;
      bool nan_row = false;
      for (int64_t j = 0; j < S; ++j) nan_row = nan_row || finished_is_nan(static_cast<double>(row_log_sum[j]));
      if (nan_row) {  // NaN/inf in the sample's logits: NaN gradients, as the PyTorch composition gives
        std::fill(grad_block, grad_block + E * C, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
      const acc_t ce_coef = static_cast<acc_t>(ce_scale * (weight ? static_cast<double>(weight[y]) : 1.0));
      const acc_t* block = block_in_acc(logits + i * E * C, E * C, converted);
      acc_t* out = kSameType ? reinterpret_cast<acc_t*>(grad_block) : out_buffer.data();
      for (int64_t k = 0; k < E; ++k) store_scaled(block + k * C, inv_t, C, tempered.data() + k * C);
      shifted_tempered_mean(tempered.data(), E, C, tempered_shift(row_max + E, E), mean_row.data());
      const math::RowLogSumExp<acc_t> bar{row_max[2 * E], row_log_sum[2 * E]};
      const Vec vbar_max(bar.max), vbar_log_sum(bar.log_sum), vce_coef(ce_coef), vkl_scale(kl_scale);
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec vinv_t = Vec::loadu(inv_t + c);
        const Vec pbar = vec_exp(math::log_softmax_of(Vec::loadu(mean_row.data() + c), vbar_max, vbar_log_sum));
        const Vec kl_coef = vkl_scale * vinv_t;
        for (int64_t k = 0; k < E; ++k) {
          const Vec z = Vec::loadu(block + k * C + c);
          const Vec q = vec_exp(math::log_softmax_of(z, Vec(row_max[k]), Vec(row_log_sum[k])));
          const Vec u = Vec::loadu(tempered.data() + k * C + c);
          const Vec p = vec_exp(math::log_softmax_of(u, Vec(row_max[E + k]), Vec(row_log_sum[E + k])));
          (vce_coef * q + kl_coef * (p - pbar)).store(out + k * C + c);
        }
      }
      for (; c < C; ++c) {
        const acc_t pbar = math::softmax_probability(mean_row[c], bar);
        for (int64_t k = 0; k < E; ++k) {
          const acc_t z = block[k * C + c];
          const acc_t q = math::softmax_probability(z, math::RowLogSumExp<acc_t>{row_max[k], row_log_sum[k]});
          const acc_t p =
              math::softmax_probability(tempered[k * C + c], math::RowLogSumExp<acc_t>{row_max[E + k], row_log_sum[E + k]});
          out[k * C + c] = ce_coef * q + kl_scale * inv_t[c] * (p - pbar);
        }
      }
      // The target entries: the CE softmax of the margin-adjusted logit, minus the one-hot.
      const acc_t pbar_y = math::softmax_probability(mean_row[y], bar);
      for (int64_t k = 0; k < E; ++k) {
        const acc_t z = block[k * C + y];
        const acc_t a = margin ? z - margin[y] : z;
        const acc_t q = math::softmax_probability(a, math::RowLogSumExp<acc_t>{row_max[k], row_log_sum[k]});
        const acc_t p =
            math::softmax_probability(tempered[k * C + y], math::RowLogSumExp<acc_t>{row_max[E + k], row_log_sum[E + k]});
        out[k * C + y] = ce_coef * (q - acc_t(1)) + kl_scale * inv_t[y] * (p - pbar_y);
      }
      if constexpr (!kSameType) at::vec::convert(out, grad_block, E * C);
    }
  });
}

// ------------------------------------------------------------------------------ entry points
MultiExpertForwardResult diverse_forward_cpu(const MultiExpertArgs& args) {
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, acc_options);
  at::Tensor row_stats = at::empty({2, args.num_rows, args.num_experts}, acc_options);  // layout: multi_expert.h
  at::Tensor denominator = at::empty({}, acc_options);
  at::Tensor grad_logits = at::empty(args.with_grad ? args.logits.sizes() : at::IntArrayRef{0}, args.logits.options());
  const int64_t* target = args.target.data_ptr<int64_t>();
  double grad_coef = 1.0;  // 1 / denominator of 'mean' (the number of non-ignored rows), else 1
  if (args.with_grad && args.reduction == Reduction::Mean) {
    int64_t valid = 0;
    for (int64_t i = 0; i < args.num_rows; ++i) valid += target[i] != args.ignore_index ? 1 : 0;
    grad_coef = 1.0 / static_cast<double>(valid);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_diverse_expert_forward_cpu", [&] {
                                    diverse_forward_kernel<scalar_t>(
                                        args, row_loss, row_stats,
                                        args.with_grad ? grad_logits.data_ptr<scalar_t>() : nullptr,
                                        static_cast<at::opmath_type<scalar_t>>(grad_coef));
                                  });
  AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_diverse_expert_reduce", [&] {
    if (args.reduction == Reduction::None) {
      *denominator.data_ptr<scalar_t>() = scalar_t(1);
      return;
    }
    // Serial float64 sums: the same result whatever the thread count.
    const scalar_t* rows = row_loss.data_ptr<scalar_t>();
    double total = 0.0, valid = 0.0;
    for (int64_t i = 0; i < args.num_rows; ++i) {
      total += static_cast<double>(rows[i]);
      valid += target[i] != args.ignore_index ? 1.0 : 0.0;
    }
    const double denom = args.reduction == Reduction::Mean ? valid : 1.0;
    row_loss = at::empty({}, row_loss.options());
    *row_loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total / denom);
    *denominator.data_ptr<scalar_t>() = static_cast<scalar_t>(denom);
  });
  return {row_loss, row_stats, denominator, grad_logits};
}

at::Tensor diverse_backward_cpu(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                const at::Tensor& denominator) {
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_diverse_expert_backward_cpu", [&] {
                                    diverse_backward_kernel<scalar_t>(args, grad_loss, stats, denominator,
                                                                      grad_logits);
                                  });
  return grad_logits;
}

MultiExpertForwardResult ride_forward_cpu_impl(const MultiExpertArgs& args) {
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_stats = at::empty({2, args.num_rows, 2 * args.num_experts + 1}, acc_options);  // multi_expert.h
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor denominators = at::empty({3}, acc_options);
  RideRowSums sums{std::vector<double>(args.num_rows), std::vector<double>(args.num_rows)};
  double mean_temperature = 0.0;
  // The denominators first (serially in float64, independent of the thread count): the forward-time
  // gradient needs them.
  const int64_t* target = args.target.data_ptr<int64_t>();
  const auto weight = args.weight.defined() ? args.weight.to(at::kDouble) : at::Tensor();
  const double* w = weight.defined() ? weight.data_ptr<double>() : nullptr;
  double weight_sum = 0.0, valid = 0.0;
  for (int64_t i = 0; i < args.num_rows; ++i) {
    const int64_t y = checked_target(target, i, args.num_classes, args.ignore_index);
    if (y != args.ignore_index) {
      weight_sum += w ? w[y] : 1.0;
      valid += 1.0;
    }
  }
  at::Tensor grad_logits = at::empty(args.with_grad ? args.logits.sizes() : at::IntArrayRef{0}, args.logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_ride_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto inv_t = inverse_temperatures<acc_t>(args, &mean_temperature);
    RideGradCoefficients<acc_t> coefficients;
    coefficients.ce_scale = 1.0 / weight_sum;
    coefficients.kl_scale = static_cast<acc_t>(args.diversity_factor * mean_temperature * mean_temperature / valid);
    ride_forward_kernel<scalar_t>(args, inv_t, sums, row_stats,
                                  args.with_grad ? grad_logits.data_ptr<scalar_t>() : nullptr, coefficients);
  });
  double ce = 0.0, kl = 0.0;
  for (int64_t i = 0; i < args.num_rows; ++i) {  // serial float64: independent of the thread count
    ce += sums.ce[i];
    kl += sums.kl[i];
  }
  const double value =
      ce / weight_sum + args.diversity_factor * mean_temperature * mean_temperature * kl / valid;
  AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_ride_reduce", [&] {
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(value);
    scalar_t* d = denominators.data_ptr<scalar_t>();
    d[0] = static_cast<scalar_t>(weight_sum);
    d[1] = static_cast<scalar_t>(valid);
    d[2] = static_cast<scalar_t>(mean_temperature);
  });
  return {loss, row_stats, denominators, grad_logits};
}

at::Tensor ride_backward_cpu_impl(const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                  const at::Tensor& row_stats, const at::Tensor& denominators) {
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_ride_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    double unused = 0.0;
    const auto inv_t = inverse_temperatures<acc_t>(args, &unused);
    ride_backward_kernel<scalar_t>(args, inv_t, grad_loss, stats, denominators, grad_logits);
  });
  return grad_logits;
}

}  // namespace

MultiExpertForwardResult diverse_expert_forward_cpu(const MultiExpertArgs& args) { return diverse_forward_cpu(args); }

at::Tensor diverse_expert_backward_cpu(const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                       const at::Tensor& row_stats, const at::Tensor& denominator) {
  return diverse_backward_cpu(args, grad_loss, row_stats, denominator);
}

MultiExpertForwardResult ride_forward_cpu(const MultiExpertArgs& args) { return ride_forward_cpu_impl(args); }

at::Tensor ride_backward_cpu(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                             const at::Tensor& denominators) {
  return ride_backward_cpu_impl(args, grad_loss, row_stats, denominators);
}

}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_DEFAULT)
// Once, in the build without -m flags: the entry points that pick a capability's kernels, and the
// registrations (static initialisers, which must not hold AVX code).
LTFAST_CPU_DISPATCH(MultiExpertForwardResult, diverse_expert_forward_cpu,
                    (const MultiExpertArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, diverse_expert_backward_cpu,
                    (const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominator),
                    (args, grad_loss, row_stats, denominator))
LTFAST_CPU_DISPATCH(MultiExpertForwardResult, ride_forward_cpu,
                    (const MultiExpertArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, ride_backward_cpu,
                    (const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominators),
                    (args, grad_loss, row_stats, denominators))

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_diverse_expert_loss_forward", &diverse_expert_forward<diverse_expert_forward_cpu>);
  m.impl("_diverse_expert_loss_backward", &diverse_expert_backward<diverse_expert_backward_cpu>);
  m.impl("_ride_loss_forward", &ride_forward<ride_forward_cpu>);
  m.impl("_ride_loss_backward", &ride_backward<ride_backward_cpu>);
}
#endif  // CPU_CAPABILITY_DEFAULT

}  // namespace ltfast
