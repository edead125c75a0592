// CPU backend of the sigmoid equalization loss: at::parallel_for over rows, at::vec per row.
// Forward: sum_c w_c [max(z, 0) - y z] plus sum_c w_c log(1 + exp(-|z|)), the latter as the log of
// a running product of (1 + exp(-|z|)) factors (each in (1, 2]) taken every 16 vectors, so a row
// of C elements costs C exponentials and C/16 vector logarithms. Backward: w (sigmoid(z) - y).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../../common/cpu_softmax.h"
#include "../../common/softmax_math.h"
#include "equalization.h"

namespace ltfast {
namespace {

using namespace cpu;

// Vectors multiplied into the running product before its logarithm: 16 factors of at most 2 stay
// below 2^16, far from float overflow, and cost one log per 16 exponentials.
constexpr int kProductVectors = 16;

template <typename acc_t>
acc_t sum_of_logs(const Vectorized<acc_t>& product) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  product.store(lanes);
  acc_t total = acc_t(0);
  for (int k = 0; k < Vectorized<acc_t>::size(); ++k) total += std::log(lanes[k]);
  return total;
}

// w_c of a negative entry: 0 for tail classes, 1 otherwise (the target entry always has w = 1).
template <typename acc_t>
std::vector<acc_t> negative_weights(const EqualizationArgs& args) {
  const uint8_t* tail = args.tail_mask.data_ptr<uint8_t>();
  std::vector<acc_t> weights(args.num_classes);
  for (int64_t c = 0; c < args.num_classes; ++c) {
    weights[c] = math::eql_suppressed(tail[c] != 0, false) ? acc_t(0) : acc_t(1);
  }
  return weights;
}

template <typename scalar_t>
EqualizationForwardResult forward_kernel(const EqualizationArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const auto options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({N}, options);
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  const std::vector<acc_t> negative_weight = negative_weights<acc_t>(args);

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(std::is_same_v<scalar_t, acc_t> ? 0 : C);
    const Vec vzero(acc_t(0)), vone(acc_t(1));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        loss_out[i] = acc_t(0);
        continue;
      }
      const acc_t* z;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        z = logits + i * C;
      } else {
        at::vec::convert(logits + i * C, buffer.data(), C);
        z = buffer.data();
      }
      // Negatives with weight w_c (target handled after): y = 0, so the linear part is max(z, 0).
      Vec vlinear(acc_t(0)), vproduct(acc_t(1));
      acc_t log_sum = acc_t(0);
      int pending = 0;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec v = Vec::loadu(z + c);
        const Vec w = Vec::loadu(negative_weight.data() + c);
        vlinear = vlinear + w * at::vec::maximum(v, vzero);  // bce_linear_part(z, y = 0)
        const Vec e = vec_exp(vzero - v.abs());
        vproduct = vproduct * (vone + w * e);  // w = 0 contributes a factor of 1
        if (++pending == kProductVectors) {
          log_sum += sum_of_logs(vproduct);
          vproduct = vone;
          pending = 0;
        }
      }
      acc_t loss = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vlinear) + log_sum +
                   sum_of_logs(vproduct);
      for (; c < C; ++c) {
        const acc_t w = negative_weight[c];
        loss += w * (math::bce_linear_part(z[c], acc_t(0)) + std::log1p(std::exp(-std::abs(z[c]))));
      }
      // The target entry: remove its negative-term contribution, add its positive term (w = 1).
      const acc_t zy = z[y];
      const acc_t softplus_tail = std::log1p(std::exp(-std::abs(zy)));
      loss -= negative_weight[y] * (math::bce_linear_part(zy, acc_t(0)) + softplus_tail);
      loss += math::bce_linear_part(zy, acc_t(1)) + softplus_tail;
      loss_out[i] = loss;
    }
  });

  at::Tensor denominator = at::empty({}, options);
  double total = 0.0, valid = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    if (target[i] == args.ignore_index) continue;
    total += static_cast<double>(loss_out[i]);
    valid += 1.0;
  }
  const double denom = args.reduction == Reduction::Mean ? valid : 1.0;
  *denominator.data_ptr<acc_t>() = static_cast<acc_t>(denom);
  if (args.reduction == Reduction::None) return {row_loss, denominator};
  at::Tensor loss = at::empty({}, options);
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(total / denom);
  return {loss, denominator};
}

template <typename scalar_t>
at::Tensor backward_kernel(const EqualizationArgs& args, const at::Tensor& grad_loss, const at::Tensor& denominator) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  scalar_t* grad = grad_logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const acc_t inv_denominator = acc_t(1) / *denominator.to(args.accumulate_type).data_ptr<acc_t>();
  const bool per_row = args.reduction == Reduction::None;
  const std::vector<acc_t> negative_weight = negative_weights<acc_t>(args);

  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(std::is_same_v<scalar_t, acc_t> ? 0 : C);
    const Vec vzero(acc_t(0)), vone(acc_t(1));
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad + i * C;
      const int64_t y = checked_target(target, i, C, args.ignore_index);
      if (y == args.ignore_index) {
        std::fill(grad_row, grad_row + C, scalar_t(0));
        continue;
      }
      const acc_t scale = per_row ? grad_in[i] : grad_in[0] * inv_denominator;
      const acc_t* z;
      acc_t* out;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        z = logits + i * C;
        out = grad_row;
      } else {
        at::vec::convert(logits + i * C, buffer.data(), C);
        z = out = buffer.data();
      }
      const acc_t target_logit = z[y];  // read before `out`, which may alias `z`, is written
      const Vec vscale(scale);
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec v = Vec::loadu(z + c);
        const Vec e = vec_exp(vzero - v.abs());  // sigmoid without overflow: 1/(1+e) or e/(1+e)
        const Vec sigmoid = Vec::blendv(e / (vone + e), vone / (vone + e), v >= vzero);
        (vscale * Vec::loadu(negative_weight.data() + c) * sigmoid).store(out + c);
      }
      for (; c < C; ++c) out[c] = scale * negative_weight[c] * math::sigmoid_fn(z[c]);
      out[y] = scale * (math::sigmoid_fn(target_logit) - acc_t(1));  // the target: w = 1, y = 1
      if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(buffer.data(), grad_row, C);
    }
  });
  return grad_logits;
}

}  // namespace

EqualizationForwardResult equalization_forward_cpu(const EqualizationArgs& args) {
  EqualizationForwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_eql_forward_cpu",
                                  [&] { result = forward_kernel<scalar_t>(args); });
  return result;
}

at::Tensor equalization_backward_cpu(const EqualizationArgs& args, const at::Tensor& grad_loss,
                                     const at::Tensor& denominator) {
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_eql_backward_cpu",
                                  [&] { result = backward_kernel<scalar_t>(args, grad_loss, denominator); });
  return result;
}

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_equalization_loss_forward", &equalization_forward<equalization_forward_cpu>);
  m.impl("_equalization_loss_backward", &equalization_backward<equalization_backward_cpu>);
}

}  // namespace ltfast
