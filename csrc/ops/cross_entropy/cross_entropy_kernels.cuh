// CUDA kernels of the softmax cross-entropy family and their launch plan, with no torch glue:
// compiled by nvcc into ltfast._C (through cross_entropy_cuda.cu) and by the host compiler into
// the SIMT emulator's test library. The arithmetic is csrc/common/softmax_math.h, shared with the
// CPU kernels; this file holds only the parallel decomposition.
//
// A "group" of threads owns a row (gpu_reduce::with_row_group): 8 lanes for C <= 32, a warp for
// C <= 1024, the whole block otherwise. Forward streams the row once with an online softmax (the
// row max and exp-sum merged chunk by chunk), reduces the group's partial states with shuffles
// and, for block groups, a fixed-order pass over shared memory. For 'mean'/'sum' each block also
// writes its rows' loss and weight sums (fixed order) and one small block adds those partials:
// two launches, deterministic, no serial pass over N in one block. Backward streams the row once
// more and writes the gradient once. No host synchronisation: grad_output and the mean's
// denominator are read from device memory by the kernels.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace cross_entropy_kernels {

using gpu_reduce::kBlockThreads;
constexpr int kWarpsPerBlock = kBlockThreads / 32;
// Elements each thread keeps in flight per iteration: 4 independent loads hide DRAM latency
// while the online-softmax merge costs one extra exp per 4 elements.
constexpr int kUnroll = 4;

// Reduces a softmax state and two plain sums over the GROUP threads that own a row; every thread
// of the group gets the result. Fixed reduction order: deterministic. The scratch arrays are
// __shared__ [kWarpsPerBlock], used only when the group is the whole block.
template <int GROUP, typename T, typename StateScratch, typename SumScratch>
__device__ __forceinline__ void group_reduce(math::SoftmaxState<T>& state, T& sum_a, T& sum_b,
                                             StateScratch& scratch_state, SumScratch& scratch_a,
                                             SumScratch& scratch_b) {
  constexpr int kWarpWidth = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int offset = kWarpWidth / 2; offset > 0; offset /= 2) {
    math::SoftmaxState<T> other{gpu_reduce::group_shuffle_xor<GROUP>(state.max, offset),
                                gpu_reduce::group_shuffle_xor<GROUP>(state.sum, offset)};
    state = math::merge_softmax_states(state, other);
    sum_a += gpu_reduce::group_shuffle_xor<GROUP>(sum_a, offset);
    sum_b += gpu_reduce::group_shuffle_xor<GROUP>(sum_b, offset);
  }
  if constexpr (GROUP > 32) {
    constexpr int kWarps = GROUP / 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      scratch_state[warp] = state;
      scratch_a[warp] = sum_a;
      scratch_b[warp] = sum_b;
    }
    __syncthreads();
    state = scratch_state[0];
    sum_a = scratch_a[0];
    sum_b = scratch_b[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const math::SoftmaxState<T> other = scratch_state[w];
      state = math::merge_softmax_states(state, other);
      sum_a += scratch_a[w];
      sum_b += scratch_b[w];
    }
    __syncthreads();  // scratch is reused by the next row
  }
}

template <typename acc_t>
struct KernelParams {
  const int64_t* target;
  const acc_t* adjustment;     // nullable
  const acc_t* target_margin;  // nullable
  const acc_t* weight;         // nullable
  int64_t num_rows;
  int64_t num_classes;
  int64_t ignore_index;
  math::CrossEntropyConfig<acc_t> cfg;  // total_weight is filled in-kernel when weights are given
  // SEQL (nullable tail): tail-class negatives dropped per element, keys read from device memory.
  const uint8_t* tail;
  const int64_t* seed;
  uint64_t drop_threshold;
};

// The row's SEQL key (0 when SEQL is off); the element decision is then per class.
template <typename acc_t>
__device__ __forceinline__ uint32_t seql_row_key(const KernelParams<acc_t>& p, int64_t row) {
  return p.tail ? math::seql_row_key(row, static_cast<uint32_t>(p.seed[1])) : 0u;
}

template <typename acc_t>
__device__ __forceinline__ bool seql_dropped(const KernelParams<acc_t>& p, uint32_t row_key, int64_t c, int64_t y) {
  return p.tail && c != y && p.tail[c] &&
         math::seql_dropped(math::seql_column_key(c, static_cast<uint32_t>(p.seed[0])), row_key, p.drop_threshold);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_adjusted(const scalar_t* row, const KernelParams<acc_t>& p,
                                               int64_t c) {
  const acc_t z = static_cast<acc_t>(row[c]);
  return p.adjustment ? math::adjusted_logit(z, p.adjustment[c]) : z;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t target_logit_of(const scalar_t* row, const KernelParams<acc_t>& p,
                                                 int64_t y) {
  const acc_t a = load_adjusted(row, p, y);
  return p.target_margin ? a - p.target_margin[y] : a;
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    forward_rows_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                        at::opmath_type<scalar_t>* __restrict__ row_loss,
                        at::opmath_type<scalar_t>* __restrict__ row_stats,
                        at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_weight, kRowsPerBlock);
  // This group's rows, summed by its lane 0 in row order (only read when partials are requested).
  double group_loss = 0.0, group_weight = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int64_t C = p.num_classes;
  const bool smoothing = p.cfg.label_smoothing != acc_t(0);
  const bool sum_weights = smoothing && p.weight != nullptr;
  // reduction 'none': the denominator is 1, written here rather than by a separate fill launch.
  if (unit_denominator != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *unit_denominator = acc_t(1);

  // Every thread of a block runs the same number of iterations (the row loop bound is uniform
  // per group, and for block groups the group is the block), so __syncthreads in group_reduce is safe.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t y = p.target[row];
    if (y == p.ignore_index) {
      if (lane == 0) {
        row_loss[row] = acc_t(0);
        row_stats[row] = acc_t(0);
        row_stats[p.num_rows + row] = acc_t(0);
      }
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const scalar_t* z = logits + row * C;
    const acc_t target_logit = target_logit_of(z, p, y);
    const uint32_t row_key = seql_row_key(p, row);

    math::SoftmaxState<acc_t> state = math::empty_softmax_state<acc_t>();
    acc_t offset_sum = acc_t(0), weight_sum = acc_t(0);
    for (int64_t base = lane; base < C; base += int64_t(GROUP) * kUnroll) {
      acc_t a[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        a[k] = (c >= C || seql_dropped(p, row_key, c, y)) ? math::negative_infinity<acc_t>()
                                                          : (c == y ? target_logit : load_adjusted(z, p, c));
      }
      acc_t chunk_max = a[0];
#pragma unroll
      for (int k = 1; k < kUnroll; ++k) chunk_max = a[k] > chunk_max ? a[k] : chunk_max;
      acc_t chunk_sum = acc_t(0);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) chunk_sum += math::exp_shifted(a[k], chunk_max);
      state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{chunk_max, chunk_sum});
      if (smoothing) {
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int64_t c = base + int64_t(k) * GROUP;
          if (c < C) {
            const acc_t w = p.weight ? p.weight[c] : acc_t(1);
            offset_sum += w * (a[k] - target_logit);
            weight_sum += w;
          }
        }
      }
    }
    group_reduce<GROUP>(state, offset_sum, weight_sum, scratch_state, scratch_a, scratch_b);
    if (lane == 0) {
      auto cfg = p.cfg;
      if (sum_weights) cfg.total_weight = weight_sum;
      const math::RowLogSumExp<acc_t> finished = math::finish_row(state);
      const acc_t target_weight = p.weight ? p.weight[y] : acc_t(1);
      const acc_t loss = math::row_loss(cfg, finished, target_logit, target_weight, offset_sum);
      row_stats[row] = finished.max;
      row_stats[p.num_rows + row] = finished.log_sum;
      row_loss[row] = loss;
      group_loss += static_cast<double>(loss);
      group_weight += static_cast<double>(target_weight);
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_weight, partials, partial_loss, partial_weight);
  }
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    backward_rows_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                         const at::opmath_type<scalar_t>* __restrict__ row_stats,
                         const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                         const at::opmath_type<scalar_t>* __restrict__ denominator,
                         scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  const int lane = threadIdx.x % GROUP;
  const int64_t C = p.num_classes;
  const bool sum_weights = p.cfg.label_smoothing != acc_t(0) && p.weight != nullptr;
  const acc_t shared_scale = per_row_grad ? acc_t(0) : grad_loss[0] / denominator[0];

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    scalar_t* g = grad_logits + row * C;
    const int64_t y = p.target[row];
    if (y == p.ignore_index) {
      for (int64_t c = lane; c < C; c += GROUP) g[c] = scalar_t(0);
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const math::RowLogSumExp<acc_t> stats{row_stats[row], row_stats[p.num_rows + row]};
    if (math::row_is_nan(stats)) {  // NaN/inf in the row: every gradient is NaN, as in F.cross_entropy
      for (int64_t c = lane; c < C; c += GROUP) g[c] = static_cast<scalar_t>(stats.log_sum);
      continue;  // row-uniform: the whole group (for block groups, the block) takes this branch
    }
    const scalar_t* z = logits + row * C;
    auto cfg = p.cfg;
    if (sum_weights) {  // W = sum_c w_c from the [C] vector (L2-resident), only with smoothing
      math::SoftmaxState<acc_t> unused = math::empty_softmax_state<acc_t>();
      acc_t weight_sum = acc_t(0), unused_sum = acc_t(0);
      for (int64_t c = lane; c < C; c += GROUP) weight_sum += p.weight[c];
      group_reduce<GROUP>(unused, weight_sum, unused_sum, scratch_state, scratch_a, scratch_b);
      cfg.total_weight = weight_sum;
    }
    const acc_t target_logit = target_logit_of(z, p, y);
    const acc_t scale = per_row_grad ? grad_loss[row] : shared_scale;
    const uint32_t row_key = seql_row_key(p, row);
    const auto coef = math::row_gradient_coefficients(cfg, scale, stats, target_logit,
                                                      p.weight ? p.weight[y] : acc_t(1));
    for (int64_t base = lane; base < C; base += int64_t(GROUP) * kUnroll) {
      acc_t a[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        a[k] = c < C ? (c == y ? target_logit : load_adjusted(z, p, c)) : acc_t(0);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        if (c < C) {
          acc_t grad = math::element_gradient(math::softmax_probability(a[k], stats), coef.prob_coef, coef.class_coef,
                                              p.weight ? p.weight[c] : acc_t(1));
          if (c == y) grad -= coef.target_coef;
          if (seql_dropped(p, row_key, c, y)) grad = acc_t(0);  // dropped: exactly zero gradient
          g[c] = static_cast<scalar_t>(grad);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ launch plan
// Blocks of the row kernels for this call (the partials buffer of forward has 2 x this many).
inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes) {
  unsigned blocks = 1;
  gpu_reduce::with_row_group(num_classes, [&](auto group) { blocks = gpu_reduce::row_blocks(num_rows, group); });
  return blocks;
}

// Row kernel: per-row loss, row_stats [2, N] (row max, log-sum offset) and, when `partials` (double
// [2, row_kernel_blocks]) is given, the blocks' loss and weight sums. `unit_denominator`
// (reduction 'none') receives 1.
template <typename scalar_t>
void launch_forward_rows(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                         at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                         at::opmath_type<scalar_t>* unit_denominator, double* partials, gpu::Stream stream) {
  if (p.num_rows == 0) return;
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("cross_entropy forward_rows_kernel", &forward_rows_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_loss, row_stats,
                unit_denominator, partials);
  });
}

// Forward: the row kernel, then (reduce) the one-block finish over its partials. With N = 0 the
// partials are zeros filled by the caller, and the finish still writes the loss (NaN for 'mean',
// as F.cross_entropy) and the denominator.
template <typename scalar_t>
void launch_forward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                    at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                    at::opmath_type<scalar_t>* unit_denominator, bool reduce, bool mean, double* partials,
                    at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominator, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  launch_forward_rows(logits, p, row_loss, row_stats, unit_denominator, reduce ? partials : nullptr, stream);
  if (reduce) {
    gpu::launch("cross_entropy finish_kernel", &gpu_reduce::finish_mean_kernel<acc_t>, 1, kBlockThreads, stream,
                static_cast<const double*>(partials), static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes)),
                mean, loss, denominator);
  }
}

template <typename scalar_t>
void launch_backward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                     const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* grad_loss,
                     bool per_row_grad, const at::opmath_type<scalar_t>* denominator, scalar_t* grad_logits,
                     gpu::Stream stream) {
  if (p.num_rows == 0) return;
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("cross_entropy backward_rows_kernel", &backward_rows_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_stats, grad_loss,
                per_row_grad, denominator, grad_logits);
  });
}

}  // namespace cross_entropy_kernels
}  // namespace ltfast
