// CUDA kernels of the sigmoid equalization loss and their launch plan, with no torch glue (compiled
// by nvcc through equalization_cuda.cu, and by the host compiler for the SIMT emulator): a block
// per row (grid-stride) for the forward row sums, a one-block fixed-order finishing kernel for
// 'mean'/'sum', an elementwise backward.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "../../common/gpu_kernel.h"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace equalization_kernels {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                        const uint8_t* __restrict__ tail, int64_t N, int64_t C, int64_t ignore_index,
                        at::opmath_type<scalar_t>* __restrict__ row_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  LTFAST_SHARED_ARRAY(acc_t, partial, kThreads);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = target[row];
    acc_t sum = acc_t(0);
    if (y != ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
      for (int64_t c = threadIdx.x; c < C; c += kThreads) {
        // Per-element semantics (non-finite logits, suppressed entries exactly 0): softmax_math.h.
        sum += math::eql_element_loss(static_cast<acc_t>(logits[row * C + c]), c == y,
                                      math::eql_suppressed(tail[c] != 0, c == y));
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
    finish_kernel(const acc_t* __restrict__ row_loss, const int64_t* __restrict__ target, int64_t N,
                  int64_t ignore_index, bool mean, bool reduce, acc_t* __restrict__ loss,
                  acc_t* __restrict__ denominator) {
  LTFAST_SHARED_ARRAY(double, totals, kThreads);
  LTFAST_SHARED_ARRAY(double, counts, kThreads);
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
    const double denom = mean ? static_cast<double>(counts[0]) : 1.0;
    *denominator = static_cast<acc_t>(denom);
    if (reduce) *loss = static_cast<acc_t>(totals[0] / denom);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                         const uint8_t* __restrict__ tail, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                         bool per_row, const at::opmath_type<scalar_t>* __restrict__ denominator, int64_t N,
                         int64_t C, int64_t ignore_index, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = target[row];
    const acc_t scale = y == ignore_index ? acc_t(0) : (per_row ? grad_loss[row] : grad_loss[0] / denominator[0]);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      acc_t g = acc_t(0);
      const bool suppressed = math::eql_suppressed(tail[c] != 0, c == y);
      if (y != ignore_index && !suppressed) {  // suppressed: exactly 0, the logit is never read
        g = scale * math::eql_element_gradient(static_cast<acc_t>(logits[row * C + c]), c == y, false);
      }
      grad_logits[row * C + c] = static_cast<scalar_t>(g);
    }
  }
}

// ------------------------------------------------------------------------------ launch plan
inline unsigned grid_rows(int64_t N) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(N, int64_t(1) << 30)));
}

template <typename scalar_t>
void launch_forward(const scalar_t* logits, const int64_t* target, const uint8_t* tail, int64_t N, int64_t C,
                    int64_t ignore_index, bool mean, bool reduce, at::opmath_type<scalar_t>* row_loss,
                    at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominator, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (N > 0) {
    gpu::launch("equalization forward_rows_kernel", &forward_rows_kernel<scalar_t>, grid_rows(N), kThreads, stream,
                logits, target, tail, N, C, ignore_index, row_loss);
  }
  gpu::launch("equalization finish_kernel", &finish_kernel<acc_t>, 1, kThreads, stream,
              static_cast<const acc_t*>(row_loss), target, N, ignore_index, mean, reduce, loss, denominator);
}

template <typename scalar_t>
void launch_backward(const scalar_t* logits, const int64_t* target, const uint8_t* tail,
                     const at::opmath_type<scalar_t>* grad_loss, bool per_row,
                     const at::opmath_type<scalar_t>* denominator, int64_t N, int64_t C, int64_t ignore_index,
                     scalar_t* grad_logits, gpu::Stream stream) {
  if (N == 0) return;
  gpu::launch("equalization backward_rows_kernel", &backward_rows_kernel<scalar_t>, grid_rows(N), kThreads, stream,
              logits, target, tail, grad_loss, per_row, denominator, N, C, ignore_index, grad_logits);
}

}  // namespace equalization_kernels
}  // namespace ltfast
