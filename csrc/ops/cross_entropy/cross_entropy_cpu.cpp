// CPU backend of the softmax cross-entropy family: at::parallel_for over rows, each row processed
// with at::vec (AVX2 where setup.py enables it). Forward takes each row in L1-sized tiles: one pass
// over the logits in memory (adding the adjustment, writing the tile to an L1 buffer and taking its
// max) and one over the buffer (exp-sum), merged tile by tile into an online softmax. Backward
// reads the logits once and writes the gradient once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../../common/cpu_softmax.h"
#include "../../common/softmax_math.h"
#include "../../common/cpu_dispatch.h"
#include "cross_entropy.h"

namespace ltfast {
namespace CPU_CAPABILITY {  // one build per CPU capability: csrc/common/cpu_dispatch.h
namespace {

using at::vec::Vectorized;
using namespace cpu;

template <typename acc_t>
math::CrossEntropyConfig<acc_t> make_config(const CrossEntropyArgs& args) {
  math::CrossEntropyConfig<acc_t> cfg;
  cfg.gamma = static_cast<acc_t>(args.gamma);
  cfg.label_smoothing = static_cast<acc_t>(args.label_smoothing);
  cfg.inv_num_classes = acc_t(1) / static_cast<acc_t>(args.num_classes);
  // W = sum_c w_c only enters the label-smoothing term.
  cfg.total_weight = (args.weight.defined() && args.label_smoothing != 0.0)
                         ? static_cast<acc_t>(args.weight.sum().item<double>())
                         : static_cast<acc_t>(args.num_classes);
  return cfg;
}

// The per-call half of SEQL's drop decisions: the column keys and the threshold.
class SeqlKeys {
 public:
  explicit SeqlKeys(const CrossEntropyArgs& args) {
    if (!args.tail_mask.defined()) return;
    const int64_t* seed = args.seed.data_ptr<int64_t>();
    row_seed_ = static_cast<uint32_t>(seed[1]);
    tail_ = args.tail_mask.data_ptr<uint8_t>();
    threshold_ = math::seql_threshold(args.drop_probability);
    column_keys_.resize(args.num_classes);
    for (int64_t c = 0; c < args.num_classes; ++c) {
      column_keys_[c] = math::seql_column_key(c, static_cast<uint32_t>(seed[0]));
    }
  }
  bool enabled() const { return tail_ != nullptr; }
  RowDrops row(int64_t i, int64_t y) const {
    return RowDrops{tail_, column_keys_.data(), enabled() ? math::seql_row_key(i, row_seed_) : 0u, threshold_, y};
  }

 private:
  const uint8_t* tail_ = nullptr;
  std::vector<uint32_t> column_keys_;
  uint32_t row_seed_ = 0;
  uint64_t threshold_ = 0;
};

// The denominator of the reduced loss: the sum of the target weights of the non-ignored rows for
// 'mean' (their count without class weights), 1 otherwise; serially in float64 so that the result is
// bit-identical run to run whatever the thread count (4096 rows take ~4 us).
template <typename acc_t>
double loss_denominator(const CrossEntropyArgs& args) {
  if (args.reduction != Reduction::Mean) return 1.0;
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  double total_weight = 0.0;
  for (int64_t i = 0; i < args.num_rows; ++i) {
    const int64_t y = target[i];
    if (y != args.ignore_index) total_weight += weight ? static_cast<double>(weight[y]) : 1.0;
  }
  return total_weight;
}

// d loss / d logits of one row, given its saved statistics and its upstream gradient: what the
// backward op writes for every row (write: p_c = exp((a_c - m) - log_sum) from the logits), and what
// the forward writes with args.with_grad (with the upstream gradient 1) right after the row's
// statistics (write_from_exponentials: from the exponentials the statistics pass left in L1, a
// 1000-class float32 row being 4 KB). The two share the per-row coefficients; they differ only in
// how p_c is rounded (see write_from_exponentials).
template <typename scalar_t>
class RowGradient {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;

  explicit RowGradient(const CrossEntropyArgs& args)
      : args_(args),
        logits_(args.logits.data_ptr<scalar_t>()),
        adjustment_(data_or_null<acc_t>(args.adjustment)),
        margin_(data_or_null<acc_t>(args.target_margin)),
        weight_(data_or_null<acc_t>(args.weight)),
        cfg_(make_config<acc_t>(args)),
        seql_(args) {}

  // Scratch for half-precision rows, one per parallel task.
  std::vector<acc_t> make_tile() const { return std::vector<acc_t>(gradient_tile_size<scalar_t, acc_t>(args_.num_classes)); }

  // Row i's gradient from the exponentials of the forward's statistics pass
  // (adjusted_row_softmax_state with tile_maxes): `exponentials` holds e_c = exp(a_c - M_k) for the
  // C entries, M_k = tile_maxes[k] the max of the c's kTileClasses-class tile, and is overwritten. Then
  // p_c = e_c * exp((M_k - m) - log_sum): one multiply per entry instead of the backward's second
  // exponential, which bounded the fused forward (float32 4096 x 1000, AVX-512, 1 thread: 3.78 ms
  // recomputing them vs 2.00 ms forward + 1.80 ms backward op). The result equals write()'s within the
  // rounding of two products instead of one exponential (a few float32 ulp of p_c; one ulp of
  // bfloat16/float16 after the final rounding; tests/test_cross_entropy.py states the tolerance).
  // The target entry is written as write() writes it (its margin-adjusted logit, exactly), and SEQL's
  // dropped entries (loaded as -inf, so e_c = 0; SEQL has no smoothing, so class_coef = 0) get 0.
  // For float32 `exponentials` may be grad_row itself; otherwise it is converted into it. Not used
  // for float64 (see forward_kernel).
  void write_from_exponentials(int64_t i, int64_t y, const math::RowLogSumExp<acc_t>& row, acc_t scale,
                               const acc_t* tile_maxes, acc_t* exponentials, scalar_t* grad_row) const {
    const int64_t C = args_.num_classes;
    if (math::row_is_nan(row)) {  // NaN/inf in the row: every gradient is NaN, as in F.cross_entropy
      std::fill(grad_row, grad_row + C, static_cast<scalar_t>(row.log_sum));
      return;
    }
    const scalar_t* logits_row = logits_ + i * C;
    const acc_t target_logit = adjusted_target_logit(logits_row, adjustment_, margin_, y);
    const auto coef = math::row_gradient_coefficients(cfg_, scale, row, target_logit,
                                                      weight_ ? weight_[y] : acc_t(1));
    const Vec vclass(coef.class_coef), vone(acc_t(1));
    for (int64_t start = 0; start < C; start += kTileClasses) {
      const int64_t len = std::min(kTileClasses, C - start);
      const acc_t tile_max = tile_maxes[start / kTileClasses];
      // A tile of -inf holds zeros (p_c = 0): its factor must not be 0 * exp(-inf - m) = NaN-prone.
      const acc_t factor = tile_max == math::negative_infinity<acc_t>()
                               ? acc_t(0)
                               : coef.prob_coef * std::exp((tile_max - row.max) - row.log_sum);
      const Vec vfactor(factor);
      acc_t* out = exponentials + start;
      const acc_t* w = weight_ ? weight_ + start : nullptr;
      int64_t c = 0;
      for (; c + Vec::size() <= len; c += Vec::size()) {
        math::element_gradient(Vec::loadu(out + c), vfactor, vclass, w ? Vec::loadu(w + c) : vone).store(out + c);
      }
      for (; c < len; ++c) out[c] = math::element_gradient(out[c], factor, coef.class_coef, w ? w[c] : acc_t(1));
      if (y >= start && y < start + len) {
        out[y - start] = math::element_gradient(math::softmax_probability(target_logit, row), coef.prob_coef,
                                                coef.class_coef, w ? w[y - start] : acc_t(1)) -
                         coef.target_coef;
      }
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(exponentials, grad_row, C);
  }

  // Writes row i's gradient into grad_row; y is its (checked) target, scale its upstream gradient
  // (divided by the denominator for a reduced loss).
  void write(int64_t i, int64_t y, const math::RowLogSumExp<acc_t>& row, acc_t scale, scalar_t* grad_row,
             acc_t* tile) const {
    const int64_t C = args_.num_classes;
    if (y == args_.ignore_index) {
      std::fill(grad_row, grad_row + C, scalar_t(0));
      return;
    }
    if (math::row_is_nan(row)) {  // NaN/inf in the row: every gradient is NaN, as in F.cross_entropy
      std::fill(grad_row, grad_row + C, static_cast<scalar_t>(row.log_sum));
      return;
    }
    const scalar_t* logits_row = logits_ + i * C;
    const acc_t target_logit = adjusted_target_logit(logits_row, adjustment_, margin_, y);
    const auto coef = math::row_gradient_coefficients(cfg_, scale, row, target_logit,
                                                      weight_ ? weight_[y] : acc_t(1));
    const Vec vmax(row.max), vlog_sum(row.log_sum), vprob(coef.prob_coef), vclass(coef.class_coef), vone(acc_t(1));
    const RowDrops row_drops = seql_.row(i, y);
    const RowDrops* drops = seql_.enabled() ? &row_drops : nullptr;  // SEQL: dropped entries get exactly 0
    for_each_gradient_tile(logits_row, grad_row, C, tile, [&](const acc_t* source, acc_t* out, int64_t start,
                                                              int64_t len) {
      const acc_t* adj = adjustment_ ? adjustment_ + start : nullptr;
      const acc_t* w = weight_ ? weight_ + start : nullptr;
      int64_t c = 0;
      for (; c + Vec::size() <= len; c += Vec::size()) {
        Vec a = Vec::loadu(source + c);
        if (adj) a = math::adjusted_logit(a, Vec::loadu(adj + c));
        const Vec p = vec_exp(math::log_softmax_of(a, vmax, vlog_sum));
        Vec g = math::element_gradient(p, vprob, vclass, w ? Vec::loadu(w + c) : vone);
        if (drops) g = drops->drop_lanes(g, start + c, acc_t(0));
        g.store(out + c);
      }
      for (; c < len; ++c) {
        const acc_t a = adj ? math::adjusted_logit(source[c], adj[c]) : source[c];
        out[c] = (drops && drops->dropped(start + c))
                     ? acc_t(0)
                     : math::element_gradient(math::softmax_probability(a, row), coef.prob_coef, coef.class_coef,
                                              w ? w[c] : acc_t(1));
      }
      if (y >= start && y < start + len) {
        // The target element: its probability uses the margin-adjusted logit, then the one-hot term.
        out[y - start] = math::element_gradient(math::softmax_probability(target_logit, row), coef.prob_coef,
                                                coef.class_coef, w ? w[y - start] : acc_t(1)) -
                         coef.target_coef;
      }
    });
  }

 private:
  const CrossEntropyArgs& args_;
  const scalar_t* logits_;
  const acc_t* adjustment_;
  const acc_t* margin_;
  const acc_t* weight_;
  math::CrossEntropyConfig<acc_t> cfg_;
  SeqlKeys seql_;
};

// grad_logits: with args.with_grad, [N, C] in the logits dtype, receives d loss / d logits for an
// upstream gradient of 1; else undefined or empty.
template <typename scalar_t>
void forward_kernel(const CrossEntropyArgs& args, at::Tensor& row_loss, at::Tensor& row_stats,
                    at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* adjustment = data_or_null<acc_t>(args.adjustment);
  const acc_t* margin = data_or_null<acc_t>(args.target_margin);
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  const auto cfg = make_config<acc_t>(args);
  const bool smoothing = cfg.label_smoothing != acc_t(0);
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  acc_t* max_out = row_stats.data_ptr<acc_t>();  // row_stats[0]
  acc_t* log_sum_out = max_out + N;              // row_stats[1]
  const SeqlKeys seql(args);
  // The forward-time gradient takes the upstream gradient as 1: the backward op's scale for a
  // reduced loss is then 1 * (1 / denominator), computed here from the same float64 sum reduce_rows
  // stores, rounded the same way.
  scalar_t* grad = args.with_grad ? grad_logits.data_ptr<scalar_t>() : nullptr;
  std::optional<RowGradient<scalar_t>> row_gradient;
  acc_t grad_scale = acc_t(1);
  if (grad) {
    row_gradient.emplace(args);
    if (args.reduction != Reduction::None) grad_scale = acc_t(1) / static_cast<acc_t>(loss_denominator<acc_t>(args));
  }

  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  // float64 (the gradcheck dtype, where speed is secondary) recomputes the exponentials with the
  // backward op's own code instead, so that its forward-time gradient is bit-identical to the backward
  // op's: gradcheck's reentrancy check compares a first backward (the forward-time gradient) with a
  // second one (the backward op) at nondet_tol = 0.
  constexpr bool kReuseExponentials = !std::is_same_v<scalar_t, double>;
  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(std::min(C, kTileClasses));
    // With the gradient: the row's exponentials, kept for it (in grad itself for float32; a float32
    // row buffer for half-precision logits).
    std::vector<acc_t> exponential_row(grad && !kSameType ? C : 0);
    std::vector<acc_t> tile_maxes(grad ? (C + kTileClasses - 1) / kTileClasses : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        loss_out[i] = acc_t(0);
        max_out[i] = acc_t(0);
        log_sum_out[i] = acc_t(0);
        if (grad) std::fill(grad + i * C, grad + (i + 1) * C, scalar_t(0));
        continue;
      }
      const scalar_t* logits_row = logits + i * C;
      const acc_t target_logit = adjusted_target_logit(logits_row, adjustment, margin, y);
      acc_t offset_sum = acc_t(0);
      const RowDrops drops = seql.row(i, y);
      acc_t* exponentials = nullptr;
      if constexpr (!kReuseExponentials) {
        exponentials = nullptr;
      } else if constexpr (kSameType) {
        exponentials = grad ? grad + i * C : nullptr;
      } else {
        exponentials = grad ? exponential_row.data() : nullptr;
      }
      const auto state = adjusted_row_softmax_state(logits_row, C, adjustment, margin, y, target_logit, tile.data(),
                                                    weight, smoothing ? &offset_sum : nullptr,
                                                    seql.enabled() ? &drops : nullptr, exponentials,
                                                    tile_maxes.data());
      const auto row = math::finish_row(state);
      max_out[i] = row.max;
      log_sum_out[i] = row.log_sum;
      loss_out[i] = math::row_loss(cfg, row, target_logit, weight ? weight[y] : acc_t(1), offset_sum);
      if (exponentials) {
        row_gradient->write_from_exponentials(i, y, row, grad_scale, tile_maxes.data(), exponentials, grad + i * C);
      } else if (grad) {
        row_gradient->write(i, y, row, grad_scale, grad + i * C, nullptr);  // float64: no tile needed
      }
    }
  });
}

// Sum of the row losses, serially in float64 so that the result is bit-identical run to run whatever
// the thread count.
template <typename acc_t>
void reduce_rows(const CrossEntropyArgs& args, const at::Tensor& row_loss, at::Tensor& loss,
                 at::Tensor& denominator) {
  const acc_t* rows = row_loss.data_ptr<acc_t>();
  double total = 0.0;
  for (int64_t i = 0; i < args.num_rows; ++i) total += static_cast<double>(rows[i]);
  const double denom = loss_denominator<acc_t>(args);
  // Direct stores rather than fill_: two dispatcher round trips are ~10% of a small call.
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(total / denom);
  *denominator.data_ptr<acc_t>() = static_cast<acc_t>(denom);
}

template <typename scalar_t>
void backward_kernel(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                     const at::Tensor& row_stats, const at::Tensor& denominator,
                     at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* max_in = row_stats.data_ptr<acc_t>();  // row_stats[0]
  const acc_t* log_sum_in = max_in + N;               // row_stats[1]
  const bool per_row_grad = args.reduction == Reduction::None;
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const at::Tensor denominator_acc = denominator.to(args.accumulate_type);
  const acc_t inv_denominator = acc_t(1) / *denominator_acc.data_ptr<acc_t>();
  const RowGradient<scalar_t> row_gradient(args);

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile = row_gradient.make_tile();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      const acc_t scale = per_row_grad ? grad_in[i] : grad_in[0] * inv_denominator;
      row_gradient.write(i, y, math::RowLogSumExp<acc_t>{max_in[i], log_sum_in[i]}, scale, grad + i * C,
                         tile.data());
    }
  });
}

CrossEntropyForwardOutputs forward_cpu(const CrossEntropyArgs& args) {
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, acc_options);
  // row_stats [2, N]: row max m and log sum_c exp(a_c - m) per row (see cross_entropy.h).
  at::Tensor row_stats = at::empty({2, args.num_rows}, acc_options);
  at::Tensor denominator = at::empty({}, acc_options);
  at::Tensor grad_logits = args.with_grad ? at::empty_like(args.logits, at::MemoryFormat::Contiguous)
                                          : at::empty({0}, args.logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(args, row_loss, row_stats, grad_logits); });
  if (args.reduction == Reduction::None) {
    AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_denominator", [&] {
      *denominator.data_ptr<scalar_t>() = scalar_t(1);
    });
    return {row_loss, row_stats, denominator, grad_logits};
  }
  at::Tensor loss = at::empty({}, acc_options);
  AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_reduce_rows",
                             [&] { reduce_rows<scalar_t>(args, row_loss, loss, denominator); });
  return {loss, row_stats, denominator, grad_logits};
}

at::Tensor backward_cpu(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                        const at::Tensor& row_stats, const at::Tensor& denominator) {
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_backward_cpu", [&] {
                                    backward_kernel<scalar_t>(args, grad_loss, stats, denominator,
                                                              grad_logits);
                                  });
  return grad_logits;
}

}  // namespace

CrossEntropyForwardOutputs cross_entropy_forward_cpu(const CrossEntropyArgs& args) { return forward_cpu(args); }

at::Tensor cross_entropy_backward_cpu(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& row_stats, const at::Tensor& denominator) {
  return backward_cpu(args, grad_loss, row_stats, denominator);
}

}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_DEFAULT)
// Once, in the build without -m flags: the entry points that pick a capability's kernels, and the
// registrations (static initialisers, which must not hold AVX code).
LTFAST_CPU_DISPATCH(CrossEntropyForwardOutputs, cross_entropy_forward_cpu,
                    (const CrossEntropyArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, cross_entropy_backward_cpu,
                    (const CrossEntropyArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominator),
                    (args, grad_loss, row_stats, denominator))

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_softmax_equalization_loss_forward", &seql_forward<cross_entropy_forward_cpu>);
  m.impl("_softmax_equalization_loss_backward", &seql_backward<cross_entropy_backward_cpu>);
  m.impl("_balanced_softmax_forward", &balanced_softmax_forward<cross_entropy_forward_cpu>);
  m.impl("_balanced_softmax_backward", &balanced_softmax_backward<cross_entropy_backward_cpu>);
  m.impl("_adjusted_cross_entropy_forward", &adjusted_cross_entropy_forward<cross_entropy_forward_cpu>);
  m.impl("_adjusted_cross_entropy_backward", &adjusted_cross_entropy_backward<cross_entropy_backward_cpu>);
  m.impl("_scale_forward_grad_", &scale_forward_grad_cpu);
}
#endif  // CPU_CAPABILITY_DEFAULT

}  // namespace ltfast
