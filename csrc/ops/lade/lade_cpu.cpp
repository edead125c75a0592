// CPU backend of LADE. Forward: blocks of rows (a fixed number per block, so the result does not
// depend on the thread count); per block, one read of its rows from memory gives each row's max
// (PriorCE) and the column maxima, and a second pass from L2 the row and column exp-sums, sharing
// one exponential per element where the logits' spread allows it; the block states are merged per
// class in a fixed order. Backward: one pass per row, reading the logits once and writing the
// gradient once (row softmax and column softmax of each element from the saved statistics).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../../common/cpu_softmax.h"
#include "../../common/softmax_math.h"
#include "../../common/cpu_dispatch.h"
#include "lade.h"

namespace ltfast {
namespace CPU_CAPABILITY {  // one build per CPU capability: csrc/common/cpu_dispatch.h
namespace {

using namespace cpu;

// Largest spread (in log units) of the row maxima and the class terms for which one exponential
// per element serves both the row and the column softmax (forward and backward): the scale factors
// stay within e^+-20, and an element whose column term exceeds e^-47 keeps a row term above e^-87,
// the smallest normal float. Random N(0, 2^2) logits at C = 1000 spread over ~10.
constexpr double kSharedExpSpread = 40.0;

// Classes per column tile: the tile's column max, column sum and log prior (3 x 4 KB) stay in a
// 32 KB L1d while the block's rows stream through.
constexpr int64_t kColumnTile = 1024;

// Rows per block: ~128K elements (512 KB of float32), so that pass B re-reads the block from L2
// (1 MB per core here); at least 4 rows so a block amortises its [C] partial states.
int64_t rows_per_block(int64_t num_classes) {
  return std::max<int64_t>(4, std::min<int64_t>(64, 131072 / std::max<int64_t>(1, num_classes)));
}

template <typename scalar_t>
LadeForwardResult forward_kernel(const LadeArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* log_prior = args.log_prior.data_ptr<acc_t>();
  const bool with_ce = args.ce_weight != 0.0;
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);

  at::Tensor row_stats = at::zeros({2, N}, acc_options);  // layout: lade.h
  at::Tensor column_stats = at::empty({4, C}, acc_options);
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor num_valid_out = at::empty({}, acc_options.dtype(at::kLong));
  std::vector<acc_t> row_nll(N, acc_t(0));
  acc_t* row_max_out = row_stats.data_ptr<acc_t>();
  acc_t* row_log_sum_out = row_max_out + N;

  const int64_t block_rows = rows_per_block(C);
  const int64_t num_blocks = (N + block_rows - 1) / block_rows;
  std::vector<acc_t> partial_max(num_blocks * C), partial_sum(num_blocks * C);

  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> block_buffer(std::is_same_v<scalar_t, acc_t> ? 0 : block_rows * C);
    std::vector<acc_t> row_max(block_rows), row_sum(block_rows), row_scale(block_rows);
    std::vector<const acc_t*> rows;
    std::vector<int64_t> row_ids;
    rows.reserve(block_rows);
    row_ids.reserve(block_rows);
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t first = b * block_rows, last = std::min(N, first + block_rows);
      acc_t* col_max = partial_max.data() + b * C;
      acc_t* col_sum = partial_sum.data() + b * C;
      std::fill(col_max, col_max + C, math::negative_infinity<acc_t>());
      std::fill(col_sum, col_sum + C, acc_t(0));
      rows.clear();
      row_ids.clear();
      for (int64_t i = first; i < last; ++i) {
        const int64_t y = checked_target(target, i, C, args.ignore_index);
        if (y == args.ignore_index) continue;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          rows.push_back(logits + i * C);
        } else {
          acc_t* converted = block_buffer.data() + (i - first) * C;
          at::vec::convert(logits + i * C, converted, C);
          rows.push_back(converted);
        }
        row_ids.push_back(i);
      }
      const int64_t R = static_cast<int64_t>(rows.size());
      std::fill(row_max.begin(), row_max.end(), math::negative_infinity<acc_t>());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      // Both passes go column tile by column tile so that the tile's per-class arrays stay in L1
      // while the block's rows stream through it (at C = 8142 whole-row arrays did not fit).
      // Pass A: the max of z + log_prior of each row (PriorCE) and the column maxima.
      for (int64_t start = 0; start < C; start += kColumnTile) {
        const int64_t len = std::min(kColumnTile, C - start), vec_len = len - len % Vec::size();
        acc_t* cmax = col_max + start;
        const acc_t* lp = log_prior + start;
        for (int64_t k = 0; k < R; ++k) {
          const acc_t* row = rows[k] + start;
          Vec vmax(math::negative_infinity<acc_t>());
          for (int64_t c = 0; c < vec_len; c += Vec::size()) {
            const Vec z = Vec::loadu(row + c);
            at::vec::maximum(Vec::loadu(cmax + c), z).store(cmax + c);
            if (with_ce) vmax = at::vec::maximum(vmax, math::adjusted_logit(z, Vec::loadu(lp + c)));
          }
          acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return at::vec::maximum(x, z); }, vmax);
          for (int64_t c = vec_len; c < len; ++c) {
            cmax[c] = nan_propagating_max(cmax[c], row[c]);
            m = nan_propagating_max(m, math::adjusted_logit(row[c], lp[c]));
          }
          row_max[k] = nan_propagating_max(row_max[k], m);
        }
      }
      // exp(z_ic - M_c) = exp(z_ic + lp_c - m_i) * exp(m_i - G) * exp(G - lp_c - M_c): when every m_i
      // and every lp_c + M_c of the block lie within kSharedExpSpread of each other, the row
      // softmax's exponential also gives the column's, both factors within e^+-20 and no column term
      // that matters (> e^-47 of its column max) underflowing. Otherwise (e.g. logits of 1e4) each
      // softmax takes its own exponential.
      acc_t lo = -math::negative_infinity<acc_t>(), hi = math::negative_infinity<acc_t>();
      for (int64_t k = 0; k < R; ++k) {
        lo = std::min(lo, row_max[k]);
        hi = std::max(hi, row_max[k]);
      }
      for (int64_t c = 0; c < C && with_ce && R > 0; ++c) {
        lo = std::min(lo, log_prior[c] + col_max[c]);
        hi = std::max(hi, log_prior[c] + col_max[c]);
      }
      const bool shared = with_ce && R > 0 && std::isfinite(lo) && std::isfinite(hi) && hi - lo <= kSharedExpSpread;
      const acc_t center = (lo + hi) / 2;
      for (int64_t k = 0; k < R && shared; ++k) row_scale[k] = std::exp(row_max[k] - center);
      // Pass B: exp-sums of every row and column.
      for (int64_t start = 0; start < C; start += kColumnTile) {
        const int64_t len = std::min(kColumnTile, C - start), vec_len = len - len % Vec::size();
        acc_t* cmax = col_max + start;
        acc_t* csum = col_sum + start;
        const acc_t* lp = log_prior + start;
        for (int64_t k = 0; k < R && with_ce; ++k) {
          const acc_t* row = rows[k] + start;
          const acc_t m = row_max[k];
          const Vec vm(m), vscale(shared ? row_scale[k] : acc_t(0));
          Vec vsum(acc_t(0));
          for (int64_t c = 0; c < vec_len; c += Vec::size()) {
            const Vec e = vec_exp(math::adjusted_logit(Vec::loadu(row + c), Vec::loadu(lp + c)) - vm);
            vsum = vsum + e;
            if (shared) (Vec::loadu(csum + c) + e * vscale).store(csum + c);
          }
          acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, vsum);
          for (int64_t c = vec_len; c < len; ++c) {
            const acc_t e = std::exp(math::adjusted_logit(row[c], lp[c]) - m);
            sum += e;
            if (shared) csum[c] += e * row_scale[k];
          }
          row_sum[k] += sum;
        }
        if (shared) {  // the per-class factor, C exponentials per block, vectorised
          const Vec vcenter(center);
          for (int64_t c = 0; c < vec_len; c += Vec::size()) {
            // (G - M_c) first: both may be ~1e6, their difference is exact and small.
            (Vec::loadu(csum + c) * vec_exp((vcenter - Vec::loadu(cmax + c)) - Vec::loadu(lp + c))).store(csum + c);
          }
          for (int64_t c = vec_len; c < len; ++c) csum[c] *= std::exp((center - cmax[c]) - lp[c]);
        } else {
          for (int64_t k = 0; k < R; ++k) {
            const acc_t* row = rows[k] + start;
            for (int64_t c = 0; c < vec_len; c += Vec::size()) {
              (Vec::loadu(csum + c) + vec_exp(Vec::loadu(row + c) - Vec::loadu(cmax + c))).store(csum + c);
            }
            for (int64_t c = vec_len; c < len; ++c) csum[c] += std::exp(row[c] - cmax[c]);
          }
          for (int64_t c = 0; c < len; ++c) {
            if (cmax[c] == math::negative_infinity<acc_t>()) csum[c] = acc_t(0);  // exactly 0, not exp(NaN)
          }
        }
      }
      for (int64_t k = 0; k < R && with_ce; ++k) {
        const int64_t i = row_ids[k], y = target[i];
        const auto row = math::finish_row(math::SoftmaxState<acc_t>{row_max[k], row_sum[k]});
        row_max_out[i] = row.max;
        row_log_sum_out[i] = row.log_sum;
        row_nll[i] = row.log_sum - (math::adjusted_logit(rows[k][y], log_prior[y]) - row.max);
      }
    }
  });

  // Per class: merge the block states in block order (deterministic). Vectorised over classes: first
  // the overall column max, then sum_b sum_bc * exp(max_bc - max_c). A per-class scalar merge cost
  // ~1 ms of serial exps at [4096, 1000] (64 blocks x 1000 classes), a fifth of the forward.
  std::vector<acc_t> column_max(C, math::negative_infinity<acc_t>()), column_sum(C, acc_t(0));
  const int64_t vec_end = C - C % Vec::size();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const acc_t* block_max = partial_max.data() + b * C;
    for (int64_t c = 0; c < vec_end; c += Vec::size()) {
      at::vec::maximum(Vec::loadu(column_max.data() + c), Vec::loadu(block_max + c)).store(column_max.data() + c);
    }
    for (int64_t c = vec_end; c < C; ++c) column_max[c] = nan_propagating_max(column_max[c], block_max[c]);
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    const acc_t* block_max = partial_max.data() + b * C;
    const acc_t* block_sum = partial_sum.data() + b * C;
    for (int64_t c = 0; c < vec_end; c += Vec::size()) {
      const Vec scale = vec_exp(Vec::loadu(block_max + c) - Vec::loadu(column_max.data() + c));
      (Vec::loadu(column_sum.data() + c) + Vec::loadu(block_sum + c) * scale).store(column_sum.data() + c);
    }
    for (int64_t c = vec_end; c < C; ++c) column_sum[c] += block_sum[c] * std::exp(block_max[c] - column_max[c]);
  }
  // Blocks whose column is all -inf (sum 0) may have multiplied 0 by exp(NaN) above: redo those
  // columns with the -inf-safe scalar merge.
  for (int64_t c = 0; c < C; ++c) {
    if (!(column_sum[c] == column_sum[c]) || column_max[c] == math::negative_infinity<acc_t>()) {
      auto state = math::empty_softmax_state<acc_t>();
      for (int64_t b = 0; b < num_blocks; ++b) {
        state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{partial_max[b * C + c], partial_sum[b * C + c]});
      }
      column_max[c] = state.max;
      column_sum[c] = state.sum;
    }
  }

  // The survey's terms, per class, in float64; counts in int64 (exact at any batch size).
  std::vector<double> target_sum(C, 0.0);
  std::vector<int64_t> class_count(C, 0);
  double ce_total = 0.0;
  int64_t num_valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = target[i];
    if (y == args.ignore_index) continue;
    target_sum[y] += static_cast<double>(static_cast<acc_t>(logits[i * C + y]));
    class_count[y] += 1;
    ce_total += static_cast<double>(row_nll[i]);
    ++num_valid;
  }
  const double log_n = std::log(static_cast<double>(num_valid));
  const double balanced = lade_balanced_log_prior(C);
  const double lambda = args.remine_lambda, alpha = args.alpha;
  acc_t* stats = column_stats.data_ptr<acc_t>();
  double lader = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const auto column = math::finish_row(math::SoftmaxState<acc_t>{column_max[c], column_sum[c]});
    // log sum_i exp(z_ic), of z_ic alone; M_c + L_c in float64, so S_c keeps L_c's digits at |z| ~ 1e6.
    const double column_lse = static_cast<double>(column.max) + static_cast<double>(column.log_sum);
    const double prior = std::exp(static_cast<double>(log_prior[c]));
    const double s_c = column_lse - static_cast<double>(log_prior[c]) + balanced - log_n;
    // n_c + 1e-8 as the survey's code computes it in float32 (`.float()` counts): there the 1e-8
    // only keeps absent classes (n_c = 0, F_c = 0) finite and vanishes in rounding for every
    // n_c >= 1. Taken exactly here: n_c itself, 1e-8 for an absent class (float32 counts would
    // also round n_c above 2^24).
    const double count_term = class_count[c] > 0 ? static_cast<double>(class_count[c]) : 1e-8;
    const double f_c = target_sum[c] / count_term;
    lader -= prior * (f_c - s_c - lambda * s_c * s_c);
    stats[c] = column.max;
    stats[C + c] = column.log_sum;
    stats[2 * C + c] = static_cast<acc_t>(alpha * prior * (1.0 + 2.0 * lambda * s_c));
    stats[3 * C + c] = static_cast<acc_t>(alpha * prior / count_term);
  }
  const double ce = with_ce ? args.ce_weight * ce_total / static_cast<double>(num_valid) : 0.0;
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(ce + alpha * lader);
  *num_valid_out.data_ptr<int64_t>() = num_valid;
  return {loss, row_stats, column_stats, num_valid_out};
}

template <typename scalar_t>
at::Tensor backward_kernel(const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                           const at::Tensor& column_stats, const at::Tensor& num_valid) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* log_prior = args.log_prior.data_ptr<acc_t>();
  const at::Tensor row_t = row_stats.contiguous(), stats_t = column_stats.contiguous();
  const acc_t* row_max_in = row_t.data_ptr<acc_t>();
  const acc_t* row_log_sum_in = row_max_in + N;
  const acc_t* column_max = stats_t.data_ptr<acc_t>();
  const acc_t* column_log_sum = column_max + C;
  const acc_t* sigma_coef = column_max + 2 * C;
  const acc_t* target_coef = column_max + 3 * C;
  const acc_t g = *grad_loss.to(args.accumulate_type).data_ptr<acc_t>();
  const acc_t count = static_cast<acc_t>(*num_valid.to(at::kLong).data_ptr<int64_t>());
  const bool with_ce = args.ce_weight != 0.0;
  const acc_t ce_coef = with_ce ? g * static_cast<acc_t>(args.ce_weight) / count : acc_t(0);

  // sigma_ic = exp((z_ic - M_c) - L_c) = p_ic * exp(lse_i - G) * exp(G - a_c), a_c = M_c + L_c + lp_c,
  // lse_i = m_i + log_sum_i: as in the forward, one exponential per element serves both softmaxes
  // for the rows whose lse_i lies with every a_c within kSharedExpSpread; the per-class factor times
  // g * sigma_coef_c is computed once per call. The factors subtract the maxima first
  // ((m_i - G) + log_sum_i, ((G - M_c) - lp_c) - L_c), so no rounded lse enters at |z| ~ 1e6.
  acc_t lo = -math::negative_infinity<acc_t>(), hi = math::negative_infinity<acc_t>();
  for (int64_t c = 0; c < C && with_ce; ++c) {
    const acc_t a_c = log_prior[c] + column_max[c] + column_log_sum[c];  // only to pick the regime
    lo = std::min(lo, a_c);
    hi = std::max(hi, a_c);
  }
  const bool classes_shared = with_ce && std::isfinite(lo) && std::isfinite(hi) && hi - lo <= kSharedExpSpread;
  const acc_t center = (lo + hi) / 2;
  std::vector<acc_t> shared_coef(classes_shared ? C : 0);
  for (int64_t c = 0; c < static_cast<int64_t>(shared_coef.size()); ++c) {
    shared_coef[c] = g * sigma_coef[c] * std::exp(((center - column_max[c]) - log_prior[c]) - column_log_sum[c]);
  }

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(gradient_tile_size<scalar_t, acc_t>(C));
    const Vec vg(g), vce(ce_coef);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad + i * C;
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        std::fill(grad_row, grad_row + C, scalar_t(0));
        continue;
      }
      const math::RowLogSumExp<acc_t> row{row_max_in[i], row_log_sum_in[i]};
      if (with_ce && math::row_is_nan(row)) {  // NaN/inf in the row: NaN gradients, as F.cross_entropy
        std::fill(grad_row, grad_row + C, static_cast<scalar_t>(row.log_sum));
        continue;
      }
      const acc_t lse = row.max + row.log_sum;  // only to pick the regime
      const bool shared = classes_shared && std::isfinite(lse) && std::max(hi, lse) - std::min(lo, lse) <= kSharedExpSpread;
      const Vec vrow_max(row.max), vrow_log_sum(row.log_sum),
          vrow_scale(shared ? std::exp((row.max - center) + row.log_sum) : acc_t(0));
      for_each_gradient_tile(logits + i * C, grad_row, C, tile.data(),
                             [&](const acc_t* source, acc_t* out, int64_t start, int64_t len) {
        const acc_t* lp = log_prior + start;
        const acc_t* cmax = column_max + start;
        const acc_t* clog_sum = column_log_sum + start;
        const acc_t* coef = sigma_coef + start;
        int64_t c = 0;
        if (shared) {
          const acc_t* scoef = shared_coef.data() + start;
          for (; c + Vec::size() <= len; c += Vec::size()) {
            const Vec a = math::adjusted_logit(Vec::loadu(source + c), Vec::loadu(lp + c));
            const Vec p = vec_exp(math::log_softmax_of(a, vrow_max, vrow_log_sum));
            (p * (vce + Vec::loadu(scoef + c) * vrow_scale)).store(out + c);
          }
        } else {
          for (; c + Vec::size() <= len; c += Vec::size()) {
            const Vec z = Vec::loadu(source + c);
            const Vec sigma = vec_exp(math::log_softmax_of(z, Vec::loadu(cmax + c), Vec::loadu(clog_sum + c)));
            Vec value = vg * Vec::loadu(coef + c) * sigma;
            if (with_ce) {
              const Vec a = math::adjusted_logit(z, Vec::loadu(lp + c));
              value = value + vce * vec_exp(math::log_softmax_of(a, vrow_max, vrow_log_sum));
            }
            value.store(out + c);
          }
        }
        for (; c < len; ++c) {
          acc_t value = g * coef[c] * std::exp(math::log_softmax_of(source[c], cmax[c], clog_sum[c]));
          if (with_ce) value += ce_coef * math::softmax_probability(math::adjusted_logit(source[c], lp[c]), row);
          out[c] = value;
        }
        if (y >= start && y < start + len) out[y - start] -= ce_coef + g * target_coef[y];
      });
    }
  });
  return grad_logits;
}

}  // namespace

LadeForwardResult lade_forward_cpu(const LadeArgs& args) {
  LadeForwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_lade_forward_cpu",
                                  [&] { result = forward_kernel<scalar_t>(args); });
  return result;
}

at::Tensor lade_backward_cpu(const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                             const at::Tensor& column_stats, const at::Tensor& num_valid) {
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_lade_backward_cpu",
                                  [&] { result = backward_kernel<scalar_t>(args, grad_loss, row_stats, column_stats, num_valid); });
  return result;
}

}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_DEFAULT)
// Once, in the build without -m flags: the entry points that pick a capability's kernels, and the
// registrations (static initialisers, which must not hold AVX code).
LTFAST_CPU_DISPATCH(LadeForwardResult, lade_forward_cpu,
                    (const LadeArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, lade_backward_cpu,
                    (const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& column_stats, const at::Tensor& num_valid),
                    (args, grad_loss, row_stats, column_stats, num_valid))

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_lade_forward", &lade_forward<lade_forward_cpu>);
  m.impl("_lade_backward", &lade_backward<lade_backward_cpu>);
}
#endif  // CPU_CAPABILITY_DEFAULT

}  // namespace ltfast
