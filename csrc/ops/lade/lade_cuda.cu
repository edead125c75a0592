// CUDA backend of LADE: torch glue only. The kernels and the launch plan are in lade_kernels.cuh;
// the SIMT test build compiles this same file for the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "../../common/gpu_glue.h"
#include "../cross_entropy/cross_entropy.h"
#include "lade.h"
#include "lade_kernels.cuh"

namespace ltfast {
namespace lade_cuda {

LadeForwardResult forward(const LadeArgs& args) {
  gpu::DeviceGuard guard(args.logits.device());
  const int64_t N = args.num_rows, C = args.num_classes;
  const auto acc_options = args.logits.options().dtype(args.accumulate_type);
  const auto long_options = acc_options.dtype(at::kLong);
  const bool with_ce = args.ce_weight != 0.0;
  at::Tensor row_stats, ce_partials;
  if (with_ce) {  // PriorCE rows: the cross-entropy family's row kernel with adjustment = log_prior
    CrossEntropyArgs ce;
    ce.logits = args.logits;
    ce.target = args.target;
    ce.adjustment = args.log_prior;
    ce.reduction = Reduction::Sum;
    ce.ignore_index = args.ignore_index;
    ce.num_rows = N;
    ce.num_classes = C;
    ce.accumulate_type = args.accumulate_type;
    CrossEntropyRows rows = cross_entropy_rows_cuda(ce);
    row_stats = rows.row_stats;  // [2, N]: row max and log-sum offset (layout: lade.h)
    ce_partials = rows.partials;
  } else {
    row_stats = at::zeros({2, N}, acc_options);
  }
  const int64_t row_blocks = lade_kernels::row_blocks_for(N);
  at::Tensor partials = at::empty({3, row_blocks, C}, acc_options);
  at::Tensor count_partials = at::empty({row_blocks, C}, long_options);
  at::Tensor valid_partials = at::empty({row_blocks}, long_options);
  at::Tensor lader_partials = at::empty({lade_kernels::column_blocks_for(C)}, acc_options.dtype(at::kDouble));
  at::Tensor column_stats = at::empty({4, C}, acc_options);
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor num_valid = at::empty({}, long_options);
  if (N == 0) {  // empty column states for the finishing kernels (the column pass does not run)
    partials.select(0, 0).fill_(-std::numeric_limits<double>::infinity());
    partials.narrow(0, 1, 2).zero_();
    count_partials.zero_();
    valid_partials.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_lade_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lade_kernels::launch_forward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<int64_t>(), args.log_prior.data_ptr<acc_t>(),
        with_ce ? ce_partials.data_ptr<double>() : nullptr, with_ce ? ce_partials.size(1) : 0, N, C,
        args.ignore_index, args.ce_weight, args.alpha, args.remine_lambda, lade_balanced_log_prior(C),
        partials.data_ptr<acc_t>(), count_partials.data_ptr<int64_t>(), valid_partials.data_ptr<int64_t>(),
        lader_partials.data_ptr<double>(), loss.data_ptr<acc_t>(), column_stats.data_ptr<acc_t>(),
        num_valid.data_ptr<int64_t>(), gpu::current_stream());
  });
  return {loss, row_stats, column_stats, num_valid};
}

at::Tensor backward(const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                    const at::Tensor& column_stats, const at::Tensor& num_valid) {
  gpu::DeviceGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor rows = row_stats.contiguous(), columns = column_stats.contiguous();
  const at::Tensor count = num_valid.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_lade_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lade_kernels::launch_backward<scalar_t>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<int64_t>(), args.log_prior.data_ptr<acc_t>(),
        rows.data_ptr<acc_t>(), columns.data_ptr<acc_t>(), grad.data_ptr<acc_t>(), count.data_ptr<int64_t>(),
        args.num_rows, args.num_classes, args.ignore_index, args.ce_weight,
        grad_logits.data_ptr<scalar_t>(), gpu::current_stream());
  });
  return grad_logits;
}

}  // namespace lade_cuda

LadeForwardResult lade_forward_cuda(const LadeArgs& args) { return lade_cuda::forward(args); }

at::Tensor lade_backward_cuda(const LadeArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                              const at::Tensor& column_stats, const at::Tensor& num_valid) {
  return lade_cuda::backward(args, grad_loss, row_stats, column_stats, num_valid);
}

LTFAST_GPU_LIBRARY_IMPL(m) {
  LTFAST_GPU_IMPL(m, "_lade_forward", &lade_forward<lade_forward_cuda>);
  LTFAST_GPU_IMPL(m, "_lade_backward", &lade_backward<lade_backward_cuda>);
}

}  // namespace ltfast
