// CUDA backend of the multi-expert losses: torch glue only (allocation, stream, dtype dispatch,
// registration). The kernels and the launch plan are in multi_expert_kernels.cuh; the SIMT test
// build compiles this same file for the host (see csrc/common/gpu_glue.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/gpu_glue.h"
#include "multi_expert.h"
#include "multi_expert_kernels.cuh"

namespace ltfast {
namespace multi_expert_cuda {

using multi_expert_kernels::KernelParams;

template <typename acc_t>
KernelParams<acc_t> make_params(const MultiExpertArgs& args) {
  auto ptr = [](const at::Tensor& t) -> const acc_t* { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  KernelParams<acc_t> p;
  p.target = args.target.data_ptr<int64_t>();
  p.adjustments = ptr(args.adjustments);
  p.target_margin = ptr(args.target_margin);
  p.weight = ptr(args.weight);
  p.temperature = ptr(args.temperature);
  p.base_temperature = static_cast<acc_t>(args.base_temperature);
  p.diversity_factor = args.diversity_factor;
  p.num_rows = args.num_rows;
  p.num_experts = args.num_experts;
  p.num_classes = args.num_classes;
  p.ignore_index = args.ignore_index;
  return p;
}

// Block partials of a row kernel (double [rows, blocks]); zeros when there are no rows (the row
// kernel then does not run and the finish kernel adds zeros).
at::Tensor row_partials(const MultiExpertArgs& args, int64_t quantities) {
  const int64_t blocks = multi_expert_kernels::row_kernel_blocks(args.num_rows, args.num_classes);
  const auto options = args.logits.options().dtype(at::kDouble);
  return args.num_rows == 0 ? at::zeros({quantities, blocks}, options) : at::empty({quantities, blocks}, options);
}

at::Tensor diverse_backward(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                            const at::Tensor& denominator);
at::Tensor ride_backward(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                         const at::Tensor& denominators);

// grad_logits of the forward ops (multi_expert.h): the CUDA kernels compute no forward-time
// gradient ([0]; autograd then runs the backward kernel). Only the SIMT test build sees CPU tensors
// here, where the with_grad contract of the CPU backend (and of the fake kernels) says [N, E, C]: it
// runs the emulated backward kernel with an upstream gradient of 1.
template <typename Backward>
at::Tensor forward_time_grad(const MultiExpertArgs& args, const at::Tensor& row_stats, const at::Tensor& denominator,
                             Backward backward) {
  if (!(args.with_grad && args.logits.device().is_cpu())) return at::empty({0}, args.logits.options());
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  const at::Tensor ones =
      args.reduction == Reduction::None ? at::ones({args.num_rows}, acc_options) : at::ones({}, acc_options);
  return backward(args, ones, row_stats, denominator);
}

MultiExpertForwardResult diverse_forward(const MultiExpertArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  const bool none = args.reduction == Reduction::None;
  at::Tensor row_loss = at::empty({args.num_rows}, acc_options);
  at::Tensor row_stats = at::empty({2, args.num_rows, args.num_experts}, acc_options);  // layout: multi_expert.h
  at::Tensor loss = none ? row_loss : at::empty({}, acc_options);
  at::Tensor denominator = none ? at::ones({}, acc_options) : at::empty({}, acc_options);
  at::Tensor partials = none ? at::Tensor() : row_partials(args, 2);
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_diverse_expert_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_expert_kernels::launch_diverse_forward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args), row_loss.data_ptr<acc_t>(),
        row_stats.data_ptr<acc_t>(), !none, args.reduction == Reduction::Mean,
        none ? nullptr : partials.data_ptr<double>(), loss.data_ptr<acc_t>(), denominator.data_ptr<acc_t>(),
        none ? nullptr : gpu::ticket_counter(stream), stream);
  });
  return {loss, row_stats, denominator, forward_time_grad(args, row_stats, denominator, diverse_backward)};
}

at::Tensor diverse_backward(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                            const at::Tensor& denominator) {
  gpu::DeviceGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor denom = denominator.to(args.accumulate_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(),
                                  "ltfast_diverse_expert_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_expert_kernels::launch_diverse_backward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args), stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
        args.reduction == Reduction::None, denom.data_ptr<acc_t>(), grad_logits.data_ptr<scalar_t>(),
        gpu::current_stream());
  });
  return grad_logits;
}

MultiExpertForwardResult ride_forward(const MultiExpertArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_stats = at::empty({2, args.num_rows, 2 * args.num_experts + 1}, acc_options);  // multi_expert.h
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor denominators = at::empty({3}, acc_options);
  at::Tensor partials = row_partials(args, 4);
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_ride_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_expert_kernels::launch_ride_forward<scalar_t>(args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args),
                                                        row_stats.data_ptr<acc_t>(), partials.data_ptr<double>(),
                                                        loss.data_ptr<acc_t>(), denominators.data_ptr<acc_t>(),
                                                        gpu::ticket_counter(stream), stream);
  });
  return {loss, row_stats, denominators, forward_time_grad(args, row_stats, denominators, ride_backward)};
}

at::Tensor ride_backward(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                         const at::Tensor& denominators) {
  gpu::DeviceGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor denoms = denominators.to(args.accumulate_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_ride_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_expert_kernels::launch_ride_backward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), make_params<acc_t>(args), stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
        denoms.data_ptr<acc_t>(), grad_logits.data_ptr<scalar_t>(), gpu::current_stream());
  });
  return grad_logits;
}

}  // namespace multi_expert_cuda

MultiExpertForwardResult diverse_expert_forward_cuda(const MultiExpertArgs& args) {
  return multi_expert_cuda::diverse_forward(args);
}

at::Tensor diverse_expert_backward_cuda(const MultiExpertArgs& args, const at::Tensor& grad_loss,
                                        const at::Tensor& row_stats, const at::Tensor& denominator) {
  return multi_expert_cuda::diverse_backward(args, grad_loss, row_stats, denominator);
}

MultiExpertForwardResult ride_forward_cuda(const MultiExpertArgs& args) { return multi_expert_cuda::ride_forward(args); }

at::Tensor ride_backward_cuda(const MultiExpertArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                              const at::Tensor& denominators) {
  return multi_expert_cuda::ride_backward(args, grad_loss, row_stats, denominators);
}

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "_diverse_expert_loss_forward", &diverse_expert_forward<diverse_expert_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_diverse_expert_loss_backward", &diverse_expert_backward<diverse_expert_backward_cuda>);
  LTFAST_GPU_IMPL(m, "_ride_loss_forward", &ride_forward<ride_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_ride_loss_backward", &ride_backward<ride_backward_cuda>);
}

}  // namespace ltfast
