// CPU backend of the softmax cross-entropy family: at::parallel_for over rows, each row processed
// with at::vec (AVX2 where setup.py enables it). Per row, forward makes one pass over the logits
// in memory (adding the adjustment, writing the adjusted row to an L1-resident buffer and taking
// its max) and one over that buffer (exp-sum); backward reads the logits once and writes the
// gradient once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../../common/softmax_math.h"
#include "cross_entropy.h"

namespace ltfast {
namespace {

using at::vec::Vectorized;

Vectorized<float> vec_exp(const Vectorized<float>& x) {
  // exp_u20: pure-intrinsics polynomial (max 20 ulp, ~2.4e-6 relative), about 2x the speed of the
  // Sleef u10 exp; it is only ever applied to a - max <= 0 or a - lse, where that error is far
  // below the fp32 test tolerance. It maps NaN to a finite value, hence the row-level NaN rule in
  // backward below.
  return x.exp_u20();
}
Vectorized<double> vec_exp(const Vectorized<double>& x) {
  // float64 is the gradcheck dtype: exact std::exp, speed is secondary.
  return x.map([](double v) { return std::exp(v); });
}

template <typename T>
T nan_propagating_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Rows per parallel task: enough work (~32K elements) to amortise the task overhead.
int64_t rows_per_task(int64_t num_classes) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_classes));
}

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

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

int64_t checked_target(const int64_t* target, int64_t row, int64_t num_classes,
                       int64_t ignore_index) {
  const int64_t y = target[row];
  TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < num_classes), "target[", row, "] = ", y,
                    " is out of range: expected a class index in [0, ", num_classes,
                    ") or ignore_index (", ignore_index, ")");
  return y;
}

// Writes the adjusted row a_c = z_c + adjustment_c (the margin is applied by the caller) into
// `adjusted` and returns its max (NaN if any entry is NaN).
template <typename scalar_t, typename acc_t>
acc_t load_adjusted_row(const scalar_t* logits_row, const acc_t* adjustment, int64_t C,
                        acc_t* adjusted) {
  using Vec = Vectorized<acc_t>;
  const acc_t* source;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    source = logits_row;
  } else {
    at::vec::convert(logits_row, adjusted, C);
    source = adjusted;
  }
  Vec vmax(math::negative_infinity<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    Vec v = Vec::loadu(source + c);
    if (adjustment) v = math::adjusted_logit(v, Vec::loadu(adjustment + c));
    v.store(adjusted + c);
    vmax = at::vec::maximum(vmax, v);
  }
  acc_t row_max = math::negative_infinity<acc_t>();
  for (; c < C; ++c) {
    const acc_t v = adjustment ? math::adjusted_logit(source[c], adjustment[c]) : source[c];
    adjusted[c] = v;
    row_max = nan_propagating_max(row_max, v);
  }
  alignas(64) acc_t lanes[Vec::size()];
  vmax.store(lanes);
  for (int64_t k = 0; k < Vec::size(); ++k) row_max = nan_propagating_max(row_max, lanes[k]);
  return row_max;
}

template <typename scalar_t>
void forward_kernel(const CrossEntropyArgs& args, at::Tensor& row_loss, at::Tensor& row_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* adjustment = data_or_null<acc_t>(args.adjustment);
  const acc_t* margin = data_or_null<acc_t>(args.target_margin);
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  const auto cfg = make_config<acc_t>(args);
  const bool smoothing = cfg.label_smoothing != acc_t(0);
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  acc_t* lse_out = row_lse.data_ptr<acc_t>();

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> adjusted(C);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        loss_out[i] = acc_t(0);
        lse_out[i] = acc_t(0);
        continue;
      }
      acc_t row_max = load_adjusted_row(logits + i * C, adjustment, C, adjusted.data());
      if (margin) {
        adjusted[y] -= margin[y];
        row_max = nan_propagating_max(row_max, adjusted[y]);  // a valid shift either way
      }
      const acc_t target_logit = adjusted[y];
      const Vec vmax(row_max), vtarget(target_logit);
      Vec vsum(acc_t(0)), voffset(acc_t(0));
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec a = Vec::loadu(adjusted.data() + c);
        vsum = vsum + vec_exp(a - vmax);
        if (smoothing) {
          const Vec offset = a - vtarget;
          voffset = voffset + (weight ? offset * Vec::loadu(weight + c) : offset);
        }
      }
      acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, vsum);
      acc_t offset_sum = smoothing ? at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, voffset)
                                   : acc_t(0);
      for (; c < C; ++c) {
        sum += std::exp(adjusted[c] - row_max);
        if (smoothing) offset_sum += (adjusted[c] - target_logit) * (weight ? weight[c] : acc_t(1));
      }
      const acc_t lse = math::finish_log_sum_exp(math::SoftmaxState<acc_t>{row_max, sum});
      lse_out[i] = lse;
      loss_out[i] = math::row_loss(cfg, lse, target_logit, weight ? weight[y] : acc_t(1), offset_sum);
    }
  });
}

// Sum of the row losses and of the target weights, serially in float64 so that the result is
// bit-identical run to run whatever the thread count (4096 rows take ~4 us).
template <typename acc_t>
void reduce_rows(const CrossEntropyArgs& args, const at::Tensor& row_loss, at::Tensor& loss,
                 at::Tensor& denominator) {
  const acc_t* rows = row_loss.data_ptr<acc_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  double total = 0.0, total_weight = 0.0;
  for (int64_t i = 0; i < args.num_rows; ++i) {
    total += static_cast<double>(rows[i]);
    const int64_t y = target[i];
    if (y != args.ignore_index) total_weight += weight ? static_cast<double>(weight[y]) : 1.0;
  }
  const double denom = args.reduction == Reduction::Mean ? total_weight : 1.0;
  loss.fill_(total / denom);
  denominator.fill_(denom);
}

template <typename scalar_t>
void backward_kernel(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                     const at::Tensor& row_lse, const at::Tensor& denominator,
                     at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* adjustment = data_or_null<acc_t>(args.adjustment);
  const acc_t* margin = data_or_null<acc_t>(args.target_margin);
  const acc_t* weight = data_or_null<acc_t>(args.weight);
  const acc_t* lse_in = row_lse.data_ptr<acc_t>();
  const auto cfg = make_config<acc_t>(args);
  const bool per_row_grad = args.reduction == Reduction::None;
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const acc_t inv_denominator = acc_t(1) / denominator.to(args.accumulate_type).item<acc_t>();

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(C);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad + i * C;
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        std::fill(grad_row, grad_row + C, scalar_t(0));
        continue;
      }
      const scalar_t* logits_row = logits + i * C;
      const acc_t lse = lse_in[i];
      const acc_t target_logit = (adjustment ? math::adjusted_logit(static_cast<acc_t>(logits_row[y]), adjustment[y])
                                             : static_cast<acc_t>(logits_row[y])) -
                                 (margin ? margin[y] : acc_t(0));
      if (lse != lse) {  // NaN/inf in the row: every gradient is NaN, as in F.cross_entropy
        std::fill(grad_row, grad_row + C, static_cast<scalar_t>(lse));
        continue;
      }
      const acc_t scale = per_row_grad ? grad_in[i] : grad_in[0] * inv_denominator;
      const auto coef = math::row_gradient_coefficients(cfg, scale, lse, target_logit,
                                                        weight ? weight[y] : acc_t(1));
      acc_t* out = reinterpret_cast<acc_t*>(grad_row);
      const acc_t* source;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        source = logits_row;
      } else {
        at::vec::convert(logits_row, buffer.data(), C);
        source = buffer.data();
        out = buffer.data();
      }
      const Vec vlse(lse), vprob(coef.prob_coef), vclass(coef.class_coef), vone(acc_t(1));
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        Vec a = Vec::loadu(source + c);
        if (adjustment) a = math::adjusted_logit(a, Vec::loadu(adjustment + c));
        const Vec w = weight ? Vec::loadu(weight + c) : vone;
        math::element_gradient(vec_exp(a - vlse), vprob, vclass, w).store(out + c);
      }
      for (; c < C; ++c) {
        const acc_t a = adjustment ? math::adjusted_logit(source[c], adjustment[c]) : source[c];
        out[c] = math::element_gradient(std::exp(a - lse), coef.prob_coef, coef.class_coef,
                                        weight ? weight[c] : acc_t(1));
      }
      // The target element: its probability uses the margin-adjusted logit, then the one-hot term.
      const acc_t target_weight_c = weight ? weight[y] : acc_t(1);
      out[y] = math::element_gradient(std::exp(target_logit - lse), coef.prob_coef, coef.class_coef,
                                      target_weight_c) -
               coef.target_coef;
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        at::vec::convert(buffer.data(), grad_row, C);
      }
    }
  });
}

ForwardResult forward_cpu(const CrossEntropyArgs& args) {
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, acc_options);
  at::Tensor row_lse = at::empty({args.num_rows}, acc_options);
  at::Tensor denominator = at::empty({}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(args, row_loss, row_lse); });
  if (args.reduction == Reduction::None) {
    denominator.fill_(1.0);
    return {row_loss, row_lse, denominator};
  }
  at::Tensor loss = at::empty({}, acc_options);
  if (args.accumulate_type == at::kDouble) {
    reduce_rows<double>(args, row_loss, loss, denominator);
  } else {
    reduce_rows<float>(args, row_loss, loss, denominator);
  }
  return {loss, row_lse, denominator};
}

at::Tensor backward_cpu(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                        const at::Tensor& row_lse, const at::Tensor& denominator) {
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const at::Tensor lse = row_lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_backward_cpu", [&] {
                                    backward_kernel<scalar_t>(args, grad_loss, lse, denominator,
                                                              grad_logits);
                                  });
  return grad_logits;
}

}  // namespace

ForwardResult cross_entropy_forward_cpu(const CrossEntropyArgs& args) { return forward_cpu(args); }

at::Tensor cross_entropy_backward_cpu(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& row_lse, const at::Tensor& denominator) {
  return backward_cpu(args, grad_loss, row_lse, denominator);
}

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_balanced_softmax_forward", &balanced_softmax_forward<cross_entropy_forward_cpu>);
  m.impl("_balanced_softmax_backward", &balanced_softmax_backward<cross_entropy_backward_cpu>);
  m.impl("_adjusted_cross_entropy_forward", &adjusted_cross_entropy_forward<cross_entropy_forward_cpu>);
  m.impl("_adjusted_cross_entropy_backward", &adjusted_cross_entropy_backward<cross_entropy_backward_cpu>);
}

}  // namespace ltfast
