// CUDA backend of PaCo's parametric contrastive loss: torch glue only (allocation, stream, dtype
// dispatch, registration). The kernels and the launch plan are in paco_kernels.cuh; the SIMT test
// build compiles this same file for the host (see csrc/common/gpu_glue.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/gpu_glue.h"
#include "paco.h"
#include "paco_kernels.cuh"

namespace ltfast {
namespace paco_cuda {

using paco_kernels::KernelParams;

template <typename acc_t>
KernelParams<acc_t> make_params(const PacoArgs& args) {
  KernelParams<acc_t> p;
  p.labels = args.labels.data_ptr<int64_t>();
  p.key_labels = args.key_labels.data_ptr<int64_t>();
  p.log_prior = args.num_classes > 0 && args.log_prior.defined() ? args.log_prior.data_ptr<acc_t>() : nullptr;
  p.num_rows = args.num_rows;
  p.num_keys = args.num_keys;
  p.num_classes = args.num_classes;
  p.ignore_index = args.ignore_index;
  p.inv_temperature = static_cast<acc_t>(args.inv_temperature);
  p.inv_sup_temperature = static_cast<acc_t>(args.inv_sup_temperature);
  p.alpha = static_cast<acc_t>(args.alpha);
  p.beta = static_cast<acc_t>(args.beta);
  p.gamma = static_cast<acc_t>(args.gamma);
  p.loss_scale = static_cast<acc_t>(args.loss_scale);
  return p;
}

// No gradient from this backend's forward (paco.h: empty unless the backend computes them).
at::Tensor no_gradient(const PacoArgs& args) { return at::empty({0}, args.similarity.options()); }

PacoBackwardResult backward(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                            const at::Tensor& denominator);

// The forward-time gradients (paco.h): the CUDA kernels compute none ([0]; autograd then runs the
// backward kernel). Only the SIMT test build sees CPU tensors here, where the with_grad contract of
// the CPU backend (and of the fake kernels, ltfast/_meta.py) says [B, M] and [B, C]: it runs the
// emulated backward kernel with an upstream gradient of 1, as multi_expert_cuda.cu does.
PacoBackwardResult forward_time_grads(const PacoArgs& args, const at::Tensor& row_stats,
                                      const at::Tensor& denominator) {
  if (!(args.with_grad && args.similarity.device().is_cpu())) return {no_gradient(args), no_gradient(args)};
  const auto acc_options = args.similarity.options().dtype(args.accumulate_type);
  const at::Tensor ones =
      args.reduction == Reduction::None ? at::ones({args.num_rows}, acc_options) : at::ones({}, acc_options);
  return backward(args, ones, row_stats, denominator);
}

PacoForwardResult forward(const PacoArgs& args) {
  gpu::DeviceGuard guard(args.similarity.device());
  const int64_t B = args.num_rows;
  const auto acc_options = args.similarity.options().dtype(args.accumulate_type);
  const bool none = args.reduction == Reduction::None;
  at::Tensor row_loss = at::empty({B}, acc_options);
  at::Tensor row_stats = at::empty({2, B}, acc_options);  // layout: paco.h
  at::Tensor loss = none ? row_loss : at::empty({}, acc_options);
  at::Tensor denominator = at::empty({}, acc_options);
  at::Tensor partials;  // double [2, row blocks]: loss sums and counted rows per block
  if (!none) {
    const int64_t blocks = paco_kernels::row_kernel_blocks(B, args.num_classes, args.num_keys);
    const auto options = acc_options.dtype(at::kDouble);
    partials = B == 0 ? at::zeros({2, blocks}, options) : at::empty({2, blocks}, options);
  }
  if (none && B == 0) denominator.fill_(1.0);
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.similarity.scalar_type(), "ltfast_paco_forward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    paco_kernels::launch_forward<scalar_t>(
        args.similarity.data_ptr<scalar_t>(), args.num_classes > 0 ? args.sup_logits.data_ptr<scalar_t>() : nullptr,
        make_params<acc_t>(args), row_loss.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(),
        none ? denominator.data_ptr<acc_t>() : nullptr, !none, args.reduction == Reduction::Mean,
        none ? nullptr : partials.data_ptr<double>(), loss.data_ptr<acc_t>(), denominator.data_ptr<acc_t>(),
        none ? nullptr : gpu::ticket_counter(stream), stream);
  });
  auto [grad_similarity, grad_sup_logits] = forward_time_grads(args, row_stats, denominator);
  return {loss, row_stats, denominator, grad_similarity, grad_sup_logits};
}

PacoBackwardResult backward(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                            const at::Tensor& denominator) {
  gpu::DeviceGuard guard(args.similarity.device());
  at::Tensor grad_similarity = at::empty_like(args.similarity, at::MemoryFormat::Contiguous);
  at::Tensor grad_sup_logits = args.num_classes > 0 ? at::empty_like(args.sup_logits, at::MemoryFormat::Contiguous)
                                                    : no_gradient(args);
  if (args.num_rows == 0) return {grad_similarity, grad_sup_logits};
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor stats = row_stats.to(args.accumulate_type).contiguous();
  const at::Tensor denom = denominator.to(args.accumulate_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.similarity.scalar_type(),
                                  "ltfast_paco_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    paco_kernels::launch_backward<scalar_t>(
        args.similarity.data_ptr<scalar_t>(), args.num_classes > 0 ? args.sup_logits.data_ptr<scalar_t>() : nullptr,
        make_params<acc_t>(args), stats.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
        args.reduction == Reduction::None, denom.data_ptr<acc_t>(), grad_similarity.data_ptr<scalar_t>(),
        args.num_classes > 0 ? grad_sup_logits.data_ptr<scalar_t>() : nullptr, gpu::current_stream());
  });
  return {grad_similarity, grad_sup_logits};
}

}  // namespace paco_cuda

PacoForwardResult paco_forward_cuda(const PacoArgs& args) { return paco_cuda::forward(args); }

PacoBackwardResult paco_backward_cuda(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                      const at::Tensor& denominator) {
  return paco_cuda::backward(args, grad_loss, row_stats, denominator);
}

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "_paco_forward", &paco_forward_op<paco_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_paco_backward", &paco_backward_op<paco_backward_cuda>);
}

}  // namespace ltfast
