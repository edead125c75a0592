// CPU backend of the sigmoid equalization loss: at::parallel_for over rows, at::vec per row.
// Forward: sum_c math::eql_element_loss, i.e. sum over the kept elements of max(y ? -z : z, 0) plus
// log(1 + exp(-|z|)), the latter as one log1p of a running product of (1 + exp(-|z|)) factors (each
// in (1, 2]) taken every 16 vectors, so a row of C elements costs C exponentials and C/16 vector
// logarithms. The product is kept as q = product - 1 (math::eql_accumulate_element): a product of
// 1 + 4e-8 factors rounds to exactly 1 in float32, which gave a loss of 0 for a confident row whose
// true loss is their sum (test_eql_confident_rows_keep_their_tiny_terms).
// Backward: math::eql_element_gradient, sigmoid(z) - y for kept elements, exactly 0 for suppressed
// ones (tail negatives), whatever their logit.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../../common/cpu_softmax.h"
#include "../../common/softmax_math.h"
#include "../../common/cpu_dispatch.h"
#include "equalization.h"

namespace ltfast {
namespace CPU_CAPABILITY {  // one build per CPU capability: csrc/common/cpu_dispatch.h
namespace {

using namespace cpu;

// Vectors multiplied into the running product before its logarithm: 16 factors of at most 2 stay
// below 2^16, far from float overflow, and cost one log per 16 exponentials.
constexpr int kProductVectors = 16;

// sum over the lanes of log1p(q), q = each lane's product of factors less 1, as log(u) q / (u - 1)
// with u = 1 + q (Goldberg's accurate log1p from log: the rounding of u cancels in q / (u - 1)).
// glibc's log1pf per lane made the float32 4096 x 1000 forward 1.8x slower (3.7-3.8 ms against
// 2.0-2.1 ms with the plain log of the product it replaces, 2 threads), at::vec's log1p ~1.2x.
template <typename acc_t>
acc_t sum_of_log1p(const Vectorized<acc_t>& factors_minus_one) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  factors_minus_one.store(lanes);
  acc_t total = acc_t(0);
  for (int k = 0; k < Vectorized<acc_t>::size(); ++k) {
    const acc_t q = lanes[k], u = acc_t(1) + q;
    total += u == acc_t(1) ? q : std::log(u) * (q / (u - acc_t(1)));
  }
  return total;
}

// Per-class lane masks for the vector loops: all bits set for a class whose negative term counts,
// 0 for a tail class (suppressed). A suppressed lane is cleared with a bitwise AND, so it is exactly
// 0 even when z is NaN or +-inf (multiplying by a weight of 0 would give NaN).
template <typename acc_t>
std::vector<acc_t> negative_keep_masks(const EqualizationArgs& args) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  const uint8_t* tail = args.tail_mask.data_ptr<uint8_t>();
  std::vector<acc_t> masks(args.num_classes);
  for (int64_t c = 0; c < args.num_classes; ++c) {
    const bits_t bits = math::eql_suppressed(tail[c] != 0, false) ? bits_t(0) : ~bits_t(0);
    std::memcpy(&masks[c], &bits, sizeof(bits));
  }
  return masks;
}

template <typename scalar_t>
EqualizationForwardResult forward_kernel(const EqualizationArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = args.num_rows, C = args.num_classes;
  const scalar_t* logits = args.logits.data_ptr<scalar_t>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const uint8_t* tail = args.tail_mask.data_ptr<uint8_t>();
  const auto options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({N}, options);
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  const std::vector<acc_t> keep_mask = negative_keep_masks<acc_t>(args);

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
      // Every element is added once with its own label: the negatives in the vector loop
      // (bce_linear_part(z, false) = max(z, 0)), the vector that holds the target and the tail
      // lanes element by element through math::eql_element_loss. No term is added and subtracted
      // again, so a target logit of 1e6 does not swamp the rest of the row.
      const int64_t target_vector = y - y % Vec::size();
      Vec vlinear(acc_t(0)), vfactors_minus_one(acc_t(0));
      acc_t log_sum = acc_t(0), scalar_part = acc_t(0);
      int pending = 0;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        if (c == target_vector) {
          for (int64_t k = c; k < c + Vec::size(); ++k) {
            scalar_part += math::eql_element_loss(z[k], k == y, math::eql_suppressed(tail[k] != 0, k == y));
          }
          continue;
        }
        const Vec v = Vec::loadu(z + c);
        const Vec keep = Vec::loadu(keep_mask.data() + c);
        vlinear = vlinear + (at::vec::maximum(v, vzero) & keep);  // bce_linear_part(z, false); NaN kept
        const Vec e = vec_exp(vzero - v.abs()) & keep;  // a suppressed lane contributes a factor of 1
        // (1 + q)(1 + e) - 1 = q + e + q e
        vfactors_minus_one = at::vec::fmadd(vfactors_minus_one, e, vfactors_minus_one + e);
        if (++pending == kProductVectors) {
          log_sum += sum_of_log1p(vfactors_minus_one);
          vfactors_minus_one = vzero;
          pending = 0;
        }
      }
      acc_t loss = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vlinear) + log_sum +
                   sum_of_log1p(vfactors_minus_one) + scalar_part;
      for (; c < C; ++c) {
        loss += math::eql_element_loss(z[c], c == y, math::eql_suppressed(tail[c] != 0, c == y));
      }
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
  const uint8_t* tail = args.tail_mask.data_ptr<uint8_t>();
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const acc_t inv_denominator = acc_t(1) / *denominator.to(args.accumulate_type).data_ptr<acc_t>();
  const bool per_row = args.reduction == Reduction::None;
  const std::vector<acc_t> keep_mask = negative_keep_masks<acc_t>(args);

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
        Vec sigmoid = Vec::blendv(e / (vone + e), vone / (vone + e), v >= vzero);
        sigmoid = Vec::blendv(sigmoid, v, v.isnan());  // vec_exp maps NaN to a number: keep the NaN
        // math::eql_element_gradient(z, false, suppressed): suppressed lanes exactly 0 (bitwise AND).
        ((vscale * sigmoid) & Vec::loadu(keep_mask.data() + c)).store(out + c);
      }
      for (; c < C; ++c) out[c] = scale * math::eql_element_gradient(z[c], false, math::eql_suppressed(tail[c] != 0, false));
      out[y] = scale * math::eql_element_gradient(target_logit, true, math::eql_suppressed(tail[y] != 0, true));
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

}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_DEFAULT)
// Once, in the build without -m flags: the entry points that pick a capability's kernels, and the
// registrations (static initialisers, which must not hold AVX code).
LTFAST_CPU_DISPATCH(EqualizationForwardResult, equalization_forward_cpu,
                    (const EqualizationArgs& args),
                    (args))
LTFAST_CPU_DISPATCH(at::Tensor, equalization_backward_cpu,
                    (const EqualizationArgs& args, const at::Tensor& grad_loss, const at::Tensor& denominator),
                    (args, grad_loss, denominator))

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_equalization_loss_forward", &equalization_forward<equalization_forward_cpu>);
  m.impl("_equalization_loss_backward", &equalization_backward<equalization_backward_cpu>);
}
#endif  // CPU_CAPABILITY_DEFAULT

}  // namespace ltfast
