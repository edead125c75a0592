// CUDA backend of the soft-target cross-entropy ops: torch glue only (allocation, stream, dtype
// dispatch, registration). Kernels and launch plans: soft_targets_kernels.cuh. The SIMT test build
// compiles this same file for the host (csrc/simt/soft_targets_simt.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/gpu_glue.h"
#include "soft_targets.h"
#include "soft_targets_kernels.cuh"

namespace ltfast {
namespace soft_targets_cuda {

using soft_target_kernels::MixedParams;
using soft_target_kernels::ProbabilityParams;

template <typename acc_t>
const acc_t* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
MixedParams<acc_t> make_mixed_params(const MixedArgs& args) {
  const auto& ce = args.ce;
  MixedParams<acc_t> p;
  p.target_a = ce.target.data_ptr<int64_t>();
  p.target_b = args.has_target_b() ? args.target_b.data_ptr<int64_t>() : nullptr;
  p.mix = pointer_or_null<acc_t>(args.mix_weight);
  p.mix_stride = args.mix_weight.defined() && args.mix_weight.dim() == 1 ? 1 : 0;
  p.mix_scalar = static_cast<acc_t>(args.mix);
  p.class_smoothing = pointer_or_null<acc_t>(args.class_smoothing);
  p.smoothing = static_cast<acc_t>(ce.label_smoothing);
  p.any_smoothing = args.smoothing();
  p.adjustment = pointer_or_null<acc_t>(ce.adjustment);
  p.target_margin = pointer_or_null<acc_t>(ce.target_margin);
  p.weight = pointer_or_null<acc_t>(ce.weight);
  p.num_rows = ce.num_rows;
  p.num_classes = ce.num_classes;
  p.ignore_index = ce.ignore_index;
  p.cfg.gamma = static_cast<acc_t>(ce.gamma);
  p.cfg.label_smoothing = acc_t(0);  // per term
  p.cfg.inv_num_classes = acc_t(1) / static_cast<acc_t>(ce.num_classes);
  p.cfg.total_weight = static_cast<acc_t>(ce.num_classes);
  return p;
}

template <typename acc_t>
ProbabilityParams<acc_t> make_probability_params(const CrossEntropyArgs& args) {
  ProbabilityParams<acc_t> p;
  p.adjustment = pointer_or_null<acc_t>(args.adjustment);
  p.weight = pointer_or_null<acc_t>(args.weight);
  p.one_minus_eps = acc_t(1) - static_cast<acc_t>(args.label_smoothing);
  p.eps_over_c = static_cast<acc_t>(args.label_smoothing) / static_cast<acc_t>(args.num_classes);
  p.num_rows = args.num_rows;
  p.num_classes = args.num_classes;
  return p;
}

// double [rows, blocks] block partials, zeros when there are no rows (the finish kernel then adds zeros).
at::Tensor partials_for(const CrossEntropyArgs& args, int64_t rows) {
  const int64_t blocks = soft_target_kernels::row_kernel_blocks(args.num_rows, args.num_classes);
  const auto options = args.logits.options().dtype(at::kDouble);
  return args.num_rows == 0 ? at::zeros({rows, blocks}, options) : at::empty({rows, blocks}, options);
}

SoftForwardResult mixed_forward(const MixedArgs& args) {
  const auto& ce = args.ce;
  gpu::DeviceGuard guard(ce.logits.device());
  const auto options = ce.logits.options().dtype(ce.accumulate_type);
  const bool none = ce.reduction == Reduction::None;
  at::Tensor row_loss = none ? at::empty({ce.num_rows}, options) : at::Tensor();
  at::Tensor row_stats = at::empty({2, ce.num_rows}, options);
  at::Tensor loss = none ? row_loss : at::empty({}, options);
  at::Tensor denominators = none ? at::ones({2}, options) : at::empty({2}, options);
  at::Tensor partials = none ? at::Tensor() : partials_for(ce, 4);
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ce.logits.scalar_type(), "ltfast_mixed_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    soft_target_kernels::launch_mixed_forward<scalar_t>(
        ce.logits.data_ptr<scalar_t>(), make_mixed_params<acc_t>(args), none ? row_loss.data_ptr<acc_t>() : nullptr,
        row_stats.data_ptr<acc_t>(), none ? nullptr : partials.data_ptr<double>(), ce.reduction == Reduction::Mean,
        none ? nullptr : loss.data_ptr<acc_t>(), denominators.data_ptr<acc_t>(),
        none ? nullptr : gpu::ticket_counter(stream), stream);
  });
  return {loss, row_stats, denominators};
}

at::Tensor mixed_backward(const MixedArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                          const at::Tensor& denominators) {
  const auto& ce = args.ce;
  gpu::DeviceGuard guard(ce.logits.device());
  at::Tensor grad_logits = at::empty_like(ce.logits, at::MemoryFormat::Contiguous);
  if (ce.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(ce.accumulate_type).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor denoms = denominators.to(ce.accumulate_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ce.logits.scalar_type(), "ltfast_mixed_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    soft_target_kernels::launch_mixed_backward<scalar_t>(
        ce.logits.data_ptr<scalar_t>(), make_mixed_params<acc_t>(args), stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
        ce.reduction == Reduction::None, denoms.data_ptr<acc_t>(), grad_logits.data_ptr<scalar_t>(),
        gpu::current_stream());
  });
  return grad_logits;
}

// Calls f(scalar_t{}, target_t{}): the target in the logits dtype or in the accumulation dtype.
template <typename F>
void dispatch_probability(const CrossEntropyArgs& args, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_probability_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (args.target.scalar_type() == args.logits.scalar_type()) {
      f(scalar_t(0), scalar_t(0));
    } else {
      f(scalar_t(0), acc_t(0));
    }
  });
}

SoftForwardResult probability_forward(const CrossEntropyArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const auto options = args.logits.options().dtype(args.accumulate_type);
  const bool none = args.reduction == Reduction::None;
  at::Tensor row_loss = at::empty({args.num_rows}, options);
  at::Tensor row_stats = at::empty({3, args.num_rows}, options);
  at::Tensor loss = none ? row_loss : at::empty({}, options);
  at::Tensor denominator = none ? at::ones({}, options) : at::empty({}, options);
  at::Tensor partials = none ? at::Tensor() : partials_for(args, 2);
  const gpu::Stream stream = gpu::current_stream();
  dispatch_probability(args, [&](auto s, auto t) {
    using scalar_t = decltype(s);
    using target_t = decltype(t);
    using acc_t = at::opmath_type<scalar_t>;
    soft_target_kernels::launch_probability_forward<scalar_t, target_t>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<target_t>(), make_probability_params<acc_t>(args),
        row_loss.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(), none ? nullptr : partials.data_ptr<double>(),
        args.reduction == Reduction::Mean, none ? nullptr : loss.data_ptr<acc_t>(),
        none ? nullptr : denominator.data_ptr<acc_t>(), none ? nullptr : gpu::ticket_counter(stream), stream);
  });
  return {loss, row_stats, denominator};
}

at::Tensor probability_backward(const CrossEntropyArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                const at::Tensor& denominator) {
  gpu::DeviceGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor denom = denominator.to(args.accumulate_type).contiguous();
  dispatch_probability(args, [&](auto s, auto t) {
    using scalar_t = decltype(s);
    using target_t = decltype(t);
    using acc_t = at::opmath_type<scalar_t>;
    soft_target_kernels::launch_probability_backward<scalar_t, target_t>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<target_t>(), make_probability_params<acc_t>(args),
        stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(), args.reduction == Reduction::None, denom.data_ptr<acc_t>(),
        grad_logits.data_ptr<scalar_t>(), gpu::current_stream());
  });
  return grad_logits;
}

SoftForwardResult mixed_forward_entry(const MixedArgs& args) { return mixed_forward(args); }
at::Tensor mixed_backward_entry(const MixedArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                const at::Tensor& denominators) {
  return mixed_backward(args, grad_loss, row_stats, denominators);
}
SoftForwardResult probability_forward_entry(const CrossEntropyArgs& args) { return probability_forward(args); }
at::Tensor probability_backward_entry(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& row_stats, const at::Tensor& denominator) {
  return probability_backward(args, grad_loss, row_stats, denominator);
}

}  // namespace soft_targets_cuda

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "_mixed_cross_entropy_forward", &mixed_forward<soft_targets_cuda::mixed_forward_entry>);
  LTFAST_GPU_IMPL(m, "_mixed_cross_entropy_backward", &mixed_backward<soft_targets_cuda::mixed_backward_entry>);
  LTFAST_GPU_IMPL(m, "_probability_cross_entropy_forward",
                  &probability_forward<soft_targets_cuda::probability_forward_entry>);
  LTFAST_GPU_IMPL(m, "_probability_cross_entropy_backward",
                  &probability_backward<soft_targets_cuda::probability_backward_entry>);
}

}  // namespace ltfast
