// CUDA backend of the sigmoid equalization loss: torch glue only. The kernels and the launch plan
// are in equalization_kernels.cuh; the SIMT test build compiles this same file for the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/gpu_glue.h"
#include "equalization.h"
#include "equalization_kernels.cuh"

namespace ltfast {
namespace equalization_cuda {

EqualizationForwardResult forward(const EqualizationArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const auto options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, options);
  at::Tensor denominator = at::empty({}, options);
  const bool none = args.reduction == Reduction::None;
  at::Tensor loss = none ? row_loss : at::empty({}, options);
  at::Tensor partials;  // the row blocks' loss sums and row counts, double [2, blocks]
  if (!none) {
    const int64_t blocks = equalization_kernels::row_kernel_blocks(args.num_rows, args.num_classes);
    const auto double_options = options.dtype(at::kDouble);
    partials = args.num_rows == 0 ? at::zeros({2, blocks}, double_options) : at::empty({2, blocks}, double_options);
  } else if (args.num_rows == 0) {
    denominator.fill_(1.0);
  }
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_eql_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    equalization_kernels::launch_forward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<int64_t>(), args.tail_mask.data_ptr<uint8_t>(),
        args.num_rows, args.num_classes, args.ignore_index, !none, args.reduction == Reduction::Mean,
        row_loss.data_ptr<acc_t>(), none ? nullptr : partials.data_ptr<double>(), loss.data_ptr<acc_t>(),
        denominator.data_ptr<acc_t>(), none ? nullptr : gpu::ticket_counter(stream), stream);
  });
  return {loss, denominator};
}

at::Tensor backward(const EqualizationArgs& args, const at::Tensor& grad_loss, const at::Tensor& denominator) {
  gpu::DeviceGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor denom = denominator.to(args.accumulate_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_eql_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    equalization_kernels::launch_backward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<int64_t>(), args.tail_mask.data_ptr<uint8_t>(),
        grad.data_ptr<acc_t>(), args.reduction == Reduction::None, denom.data_ptr<acc_t>(), args.num_rows,
        args.num_classes, args.ignore_index, grad_logits.data_ptr<scalar_t>(), gpu::current_stream());
  });
  return grad_logits;
}

}  // namespace equalization_cuda

EqualizationForwardResult equalization_forward_cuda(const EqualizationArgs& args) {
  return equalization_cuda::forward(args);
}

at::Tensor equalization_backward_cuda(const EqualizationArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& denominator) {
  return equalization_cuda::backward(args, grad_loss, denominator);
}

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "_equalization_loss_forward", &equalization_forward<equalization_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_equalization_loss_backward", &equalization_backward<equalization_backward_cuda>);
}

}  // namespace ltfast
