// CUDA backend of the sigmoid equalization loss: a block per row (grid-stride) for the forward row
// sums, a one-block fixed-order finishing kernel for 'mean'/'sum', an elementwise backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../../common/softmax_math.h"
#include "equalization.h"

namespace ltfast {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ acc_t element_loss(acc_t z, bool is_target, bool tail) {
  if (math::eql_suppressed(tail, is_target)) return acc_t(0);
  const acc_t y = is_target ? acc_t(1) : acc_t(0);
  return math::bce_linear_part(z, y) + log1p(math::exp_fn(z > acc_t(0) ? -z : z));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_rows(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                 const uint8_t* __restrict__ tail, int64_t N, int64_t C, int64_t ignore_index,
                 at::opmath_type<scalar_t>* __restrict__ row_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kThreads];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = target[row];
    acc_t sum = acc_t(0);
    if (y != ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
      for (int64_t c = threadIdx.x; c < C; c += kThreads) {
        sum += element_loss(static_cast<acc_t>(logits[row * C + c]), c == y, tail[c] != 0);
      }
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) row_loss[row] = partial[0];
    __syncthreads();
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish(const acc_t* __restrict__ row_loss, const int64_t* __restrict__ target, int64_t N, int64_t ignore_index,
           bool mean, bool reduce, acc_t* __restrict__ loss, acc_t* __restrict__ denominator) {
  __shared__ double totals[kThreads];
  __shared__ double counts[kThreads];
  double total = 0.0, count = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    if (target[i] == ignore_index) continue;
    total += static_cast<double>(row_loss[i]);
    count += 1.0;
  }
  totals[threadIdx.x] = total;
  counts[threadIdx.x] = count;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      totals[threadIdx.x] += totals[threadIdx.x + stride];
      counts[threadIdx.x] += counts[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double denom = mean ? counts[0] : 1.0;
    *denominator = static_cast<acc_t>(denom);
    if (reduce) *loss = static_cast<acc_t>(totals[0] / denom);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_rows(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                  const uint8_t* __restrict__ tail, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                  bool per_row, const at::opmath_type<scalar_t>* __restrict__ denominator, int64_t N, int64_t C,
                  int64_t ignore_index, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = target[row];
    const acc_t scale = y == ignore_index ? acc_t(0) : (per_row ? grad_loss[row] : grad_loss[0] / denominator[0]);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      acc_t g = acc_t(0);
      if (y != ignore_index && !math::eql_suppressed(tail[c] != 0, c == y)) {
        g = scale * (math::sigmoid_fn(static_cast<acc_t>(logits[row * C + c])) - (c == y ? acc_t(1) : acc_t(0)));
      }
      grad_logits[row * C + c] = static_cast<scalar_t>(g);
    }
  }
}

int64_t grid_rows(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(N, int64_t(1) << 30)); }

EqualizationForwardResult forward_cuda(const EqualizationArgs& args) {
  c10::cuda::CUDAGuard guard(args.logits.device());
  const auto options = args.logits.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, options);
  at::Tensor denominator = at::empty({}, options);
  const bool none = args.reduction == Reduction::None;
  at::Tensor loss = none ? row_loss : at::empty({}, options);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_eql_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (args.num_rows > 0) {
      forward_rows<scalar_t><<<grid_rows(args.num_rows), kThreads, 0, stream>>>(
          args.logits.data_ptr<scalar_t>(), args.target.data_ptr<int64_t>(), args.tail_mask.data_ptr<uint8_t>(),
          args.num_rows, args.num_classes, args.ignore_index, row_loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish<acc_t><<<1, kThreads, 0, stream>>>(row_loss.data_ptr<acc_t>(), args.target.data_ptr<int64_t>(),
                                               args.num_rows, args.ignore_index,
                                               args.reduction == Reduction::Mean, !none, loss.data_ptr<acc_t>(),
                                               denominator.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, denominator};
}

at::Tensor backward_cuda(const EqualizationArgs& args, const at::Tensor& grad_loss, const at::Tensor& denominator) {
  c10::cuda::CUDAGuard guard(args.logits.device());
  at::Tensor grad_logits = at::empty_like(args.logits, at::MemoryFormat::Contiguous);
  if (args.num_rows == 0) return grad_logits;
  const at::Tensor grad = grad_loss.to(args.accumulate_type).contiguous();
  const at::Tensor denom = denominator.to(args.accumulate_type).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "ltfast_eql_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows<scalar_t><<<grid_rows(args.num_rows), kThreads, 0, stream>>>(
        args.logits.data_ptr<scalar_t>(), args.target.data_ptr<int64_t>(), args.tail_mask.data_ptr<uint8_t>(),
        grad.data_ptr<acc_t>(), args.reduction == Reduction::None, denom.data_ptr<acc_t>(), args.num_rows,
        args.num_classes, args.ignore_index, grad_logits.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace

EqualizationForwardResult equalization_forward_cuda(const EqualizationArgs& args) { return forward_cuda(args); }

at::Tensor equalization_backward_cuda(const EqualizationArgs& args, const at::Tensor& grad_loss,
                                      const at::Tensor& denominator) {
  return backward_cuda(args, grad_loss, denominator);
}

TORCH_LIBRARY_IMPL(ltfast, CUDA, m) {
  m.impl("_equalization_loss_forward", &equalization_forward<equalization_forward_cuda>);
  m.impl("_equalization_loss_backward", &equalization_backward<equalization_backward_cuda>);
}

}  // namespace ltfast
