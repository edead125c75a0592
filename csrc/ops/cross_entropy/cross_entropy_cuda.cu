// CUDA backend of the softmax cross-entropy family: torch glue only (allocation, stream, dtype
// dispatch, registration). The kernels and the launch plan are in cross_entropy_kernels.cuh; the
// SIMT test build compiles this same file for the host (see csrc/common/gpu_glue.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/gpu_glue.h"
#include "cross_entropy.h"
#include "cross_entropy_kernels.cuh"

namespace ltfast {
namespace cross_entropy_cuda {

using cross_entropy_kernels::KernelParams;

template <typename acc_t>
KernelParams<acc_t> make_params(const CrossEntropyArgs& args) {
  auto ptr = [](const at::Tensor& t) -> const acc_t* { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  KernelParams<acc_t> p;
  p.target = args.target.data_ptr<int64_t>();
  p.adjustment = ptr(args.adjustment);
  p.target_margin = ptr(args.target_margin);
  p.weight = ptr(args.weight);
  p.num_rows = args.num_rows;
  p.num_classes = args.num_classes;
  p.ignore_index = args.ignore_index;
  p.cfg.gamma = static_cast<acc_t>(args.gamma);
  p.cfg.label_smoothing = static_cast<acc_t>(args.label_smoothing);
  p.cfg.inv_num_classes = acc_t(1) / static_cast<acc_t>(args.num_classes);
  p.cfg.total_weight = static_cast<acc_t>(args.num_classes);
  p.tail = args.tail_mask.defined() ? args.tail_mask.data_ptr<uint8_t>() : nullptr;
  p.seed = args.seed.defined() ? args.seed.data_ptr<int64_t>() : nullptr;
  p.drop_threshold = math::seql_threshold(args.drop_probability);
  return p;
}

// Block partials of the row kernel (double [2, blocks]: loss and target-weight sums), zeros when
// there are no rows (the row kernel then does not run and the finish kernel adds zeros).
at::Tensor row_partials(const CrossEntropyArgs& args) {
  const int64_t blocks = cross_entropy_kernels::row_kernel_blocks(args.num_rows, args.num_classes);
  const auto options = args.logits.options().dtype(at::kDouble);
  return args.num_rows == 0 ? at::zeros({2, blocks}, options) : at::empty({2, blocks}, options);
}

CrossEntropyForwardOutputs forward(const CrossEntropyArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  const bool none = args.reduction == Reduction::None;
  const bool mean = args.reduction == Reduction::Mean;
  at::Tensor row_loss = at::empty({args.num_rows}, acc_options);
  at::Tensor row_stats = at::empty({2, args.num_rows}, acc_options);  // layout: cross_entropy.h
  at::Tensor loss = none ? row_loss : at::empty({}, acc_options);
  at::Tensor denominator = at::empty({}, acc_options);
  at::Tensor partials = none ? at::Tensor() : row_partials(args);
  // The forward-time gradient (cross_entropy.h): [N, C] for an upstream gradient of 1, and for 'mean'
  // the scalar its scale is divided by, computed before the rows (mean_denominator_kernel).
  at::Tensor grad_logits = args.with_grad ? at::empty_like(args.logits, at::MemoryFormat::Contiguous)
                                          : at::empty({0}, args.logits.options());
  at::Tensor grad_denominator = args.with_grad && mean ? at::empty({}, acc_options) : at::Tensor();
  if (none && args.num_rows == 0) denominator.fill_(1.0);
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_kernels::launch_forward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args), row_loss.data_ptr<acc_t>(),
        row_stats.data_ptr<acc_t>(), none ? denominator.data_ptr<acc_t>() : nullptr, !none, mean,
        none ? nullptr : partials.data_ptr<double>(), loss.data_ptr<acc_t>(), denominator.data_ptr<acc_t>(),
        none ? nullptr : gpu::ticket_counter(stream), stream,
        args.with_grad ? grad_logits.data_ptr<scalar_t>() : nullptr,
        grad_denominator.defined() ? grad_denominator.data_ptr<acc_t>() : nullptr);
  });
  return {loss, row_stats, denominator, grad_logits};
}

CrossEntropyRows rows(const CrossEntropyArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  CrossEntropyRows out;
  out.row_loss = at::empty({args.num_rows}, acc_options);
  out.row_stats = at::empty({2, args.num_rows}, acc_options);
  out.partials = row_partials(args);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_kernels::launch_forward_rows<scalar_t>(
        args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args), out.row_loss.data_ptr<acc_t>(),
        out.row_stats.data_ptr<acc_t>(), nullptr, out.partials.data_ptr<double>(), gpu::current_stream());
  });
  return out;
}

at::Tensor backward(const CrossEntropyArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                    const at::Tensor& denominator) {
  gpu::DeviceGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor denom = denominator.to(args.accumulate_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_kernels::launch_backward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args), stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
        args.reduction == Reduction::None, denom.data_ptr<acc_t>(), grad_logits.data_ptr<scalar_t>(),
        gpu::current_stream());
  });
  return grad_logits;
}

// ltfast::_scale_forward_grad_: grad (the forward-time gradient, [N, C] contiguous) *= upstream, a
// scalar or one factor per row, read on the device (cross_entropy_kernels::scale_rows_kernel).
void scale_forward_grad(at::Tensor& grad, const at::Tensor& upstream) {
  check_scale_forward_grad_args(grad, upstream);
  if (grad.numel() == 0) return;
  gpu::DeviceGuard guard(grad.device());
  const at::Tensor factors = upstream.to(at::toOpMathType(grad.scalar_type())).contiguous();
  const int64_t num_rows = grad.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ltfast_scale_forward_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_kernels::launch_scale_rows<scalar_t>(grad.data_ptr<scalar_t>(), num_rows, grad.numel() / num_rows,
                                                       factors.data_ptr<acc_t>(), /*per_row=*/upstream.dim() == 1,
                                                       gpu::current_stream());
  });
}

}  // namespace cross_entropy_cuda

CrossEntropyForwardOutputs cross_entropy_forward_cuda(const CrossEntropyArgs& args) {
  return cross_entropy_cuda::forward(args);
}

CrossEntropyRows cross_entropy_rows_cuda(const CrossEntropyArgs& args) { return cross_entropy_cuda::rows(args); }

at::Tensor cross_entropy_backward_cuda(const CrossEntropyArgs& args, const at::Tensor& grad_loss,
                                       const at::Tensor& row_stats, const at::Tensor& denominator) {
  return cross_entropy_cuda::backward(args, grad_loss, row_stats, denominator);
}

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "_softmax_equalization_loss_forward", &seql_forward<cross_entropy_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_softmax_equalization_loss_backward", &seql_backward<cross_entropy_backward_cuda>);
  LTFAST_GPU_IMPL(m, "_balanced_softmax_forward", &balanced_softmax_forward<cross_entropy_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_balanced_softmax_backward", &balanced_softmax_backward<cross_entropy_backward_cuda>);
  LTFAST_GPU_IMPL(m, "_adjusted_cross_entropy_forward", &adjusted_cross_entropy_forward<cross_entropy_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_adjusted_cross_entropy_backward", &adjusted_cross_entropy_backward<cross_entropy_backward_cuda>);
  LTFAST_GPU_IMPL(m, "_scale_forward_grad_", &cross_entropy_cuda::scale_forward_grad);
}

}  // namespace ltfast
