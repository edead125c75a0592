// CUDA kernels of LADE and their launch plan, with no torch glue (compiled by nvcc through
// lade_cuda.cu, and by the host compiler for the SIMT emulator). Forward, after the cross-entropy
// family's row kernel (the PriorCE rows): one column pass (per class and block of rows: online
// max/exp-sum, target-logit sum and count) and a one-block finishing kernel that merges the row
// blocks in a fixed order and reduces the scalar loss. Saved statistics: lade.h. Backward, one launch: each element's row
// softmax and column softmax from the saved statistics, the logits read once and the gradient
// written once. Deterministic (no atomics), no host synchronisation.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../../common/gpu_kernel.h"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace lade_kernels {

constexpr int kColumnThreads = 256;
constexpr int kFinishThreads = 1024;
constexpr int kRowThreads = 256;
// At most this many row blocks in the column pass: enough blocks to fill an H100 at C = 1000
// (4 x 64 = 256 blocks), and few enough that the one-block finish reads at most 64 x C partials.
constexpr int64_t kMaxRowBlocks = 64;

template <typename scalar_t>
__global__ void __launch_bounds__(kColumnThreads)
    column_partials_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N,
                           int64_t C, int64_t rows_per_block, int64_t ignore_index,
                           at::opmath_type<scalar_t>* __restrict__ partials, int64_t* __restrict__ count_partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t first = int64_t(blockIdx.y) * rows_per_block;
  const int64_t last = first + rows_per_block < N ? first + rows_per_block : N;
  auto state = math::empty_softmax_state<acc_t>();
  acc_t target_sum = acc_t(0);
  int64_t count = 0;  // exact: a float count stops at 2^24
#pragma unroll 4
  for (int64_t i = first; i < last; ++i) {
    const int64_t y = target[i];  // the same address for the whole warp: one broadcast load
    if (y == ignore_index) continue;
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const acc_t z = static_cast<acc_t>(logits[i * C + c]);  // consecutive threads, consecutive classes
    state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{z, acc_t(1)});
    if (y == c) {
      target_sum += z;
      ++count;
    }
  }
  const int64_t slot = int64_t(blockIdx.y) * C + c;
  const int64_t plane = int64_t(gridDim.y) * C;
  partials[slot] = state.max;
  partials[plane + slot] = state.sum;
  partials[2 * plane + slot] = target_sum;
  count_partials[slot] = count;
}

// Sum over the block in a fixed order; every thread gets the total. `scratch` is __shared__
// double[kFinishThreads].
template <typename Scratch>
__device__ double block_sum(double value, Scratch& scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kFinishThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();
  return total;
}

template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const acc_t* __restrict__ partials, const int64_t* __restrict__ count_partials,
                  int64_t num_blocks, const acc_t* __restrict__ row_nll, const int64_t* __restrict__ target,
                  const acc_t* __restrict__ log_prior, int64_t N, int64_t C, int64_t ignore_index, double ce_weight,
                  double alpha, double remine_lambda, double balanced, acc_t* __restrict__ loss,
                  acc_t* __restrict__ column_stats, int64_t* __restrict__ num_valid_out) {
  LTFAST_SHARED_ARRAY(double, scratch, kFinishThreads);
  double valid = 0.0, ce_total = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kFinishThreads) {
    if (target[i] != ignore_index) {
      valid += 1.0;
      if (row_nll != nullptr) ce_total += static_cast<double>(row_nll[i]);
    }
  }
  const double num_valid = block_sum(valid, scratch);
  ce_total = block_sum(ce_total, scratch);
  const double log_n = log(num_valid);
  const int64_t plane = num_blocks * C;
  double lader = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += kFinishThreads) {
    auto state = math::empty_softmax_state<acc_t>();
    double target_sum = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < num_blocks; ++b) {
      state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{partials[b * C + c], partials[plane + b * C + c]});
      target_sum += static_cast<double>(partials[2 * plane + b * C + c]);
      count += count_partials[b * C + c];
    }
    const math::RowLogSumExp<acc_t> column = math::finish_row(state);
    // log sum_i exp(z_ic) as M_c + L_c in float64: S_c keeps L_c's digits at |z| ~ 1e6.
    const double column_lse = static_cast<double>(column.max) + static_cast<double>(column.log_sum);
    const double prior = exp(static_cast<double>(log_prior[c]));
    const double s_c = column_lse - static_cast<double>(log_prior[c]) + balanced - log_n;
    // The survey's n_c + 1e-8 (float32) is n_c for every n_c >= 1; the 1e-8 only keeps an absent
    // class finite (as the CPU kernel, lade.h).
    const double count_term = count > 0 ? static_cast<double>(count) : 1e-8;
    const double f_c = target_sum / count_term;
    lader -= prior * (f_c - s_c - remine_lambda * s_c * s_c);
    column_stats[c] = column.max;
    column_stats[C + c] = column.log_sum;
    column_stats[2 * C + c] = static_cast<acc_t>(alpha * prior * (1.0 + 2.0 * remine_lambda * s_c));
    column_stats[3 * C + c] = static_cast<acc_t>(alpha * prior / count_term);
  }
  lader = block_sum(lader, scratch);
  if (threadIdx.x == 0) {
    const double ce = row_nll != nullptr ? ce_weight * ce_total / num_valid : 0.0;
    *loss = static_cast<acc_t>(ce + alpha * lader);
    *num_valid_out = static_cast<int64_t>(num_valid);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                    const at::opmath_type<scalar_t>* __restrict__ log_prior,
                    const at::opmath_type<scalar_t>* __restrict__ row_stats,
                    const at::opmath_type<scalar_t>* __restrict__ column_stats,
                    const at::opmath_type<scalar_t>* __restrict__ grad_loss, const int64_t* __restrict__ num_valid,
                    int64_t N, int64_t C, int64_t ignore_index, double ce_weight, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g = grad_loss[0];
  const bool with_ce = ce_weight != 0.0;
  const acc_t ce_coef = with_ce ? g * static_cast<acc_t>(ce_weight) / static_cast<acc_t>(num_valid[0]) : acc_t(0);
  // column_stats layout: lade.h (M_c, L_c, sigma coefficient, target coefficient).
  const acc_t* column_max = column_stats;
  const acc_t* column_log_sum = column_stats + C;
  const acc_t* sigma_coef = column_stats + 2 * C;
  const acc_t* target_coef = column_stats + 3 * C;
  // One block per row (grid-stride), threads over classes: coalesced reads of the row and of the
  // per-class vectors, which stay in L2 across rows.
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    scalar_t* out = grad_logits + row * C;
    const int64_t y = target[row];
    if (y == ignore_index) {
      for (int64_t c = threadIdx.x; c < C; c += kRowThreads) out[c] = scalar_t(0);
      continue;
    }
    const math::RowLogSumExp<acc_t> stats{row_stats[row], row_stats[N + row]};
    if (with_ce && math::row_is_nan(stats)) {  // NaN/inf in the row: NaN gradients, as F.cross_entropy
      for (int64_t c = threadIdx.x; c < C; c += kRowThreads) out[c] = static_cast<scalar_t>(stats.log_sum);
      continue;
    }
    const scalar_t* z_row = logits + row * C;
    for (int64_t c = threadIdx.x; c < C; c += kRowThreads) {
      const acc_t z = static_cast<acc_t>(z_row[c]);
      const acc_t sigma = math::exp_fn(math::log_softmax_of(z, column_max[c], column_log_sum[c]));
      acc_t value = g * sigma_coef[c] * sigma;
      if (with_ce) value += ce_coef * math::softmax_probability(math::adjusted_logit(z, log_prior[c]), stats);
      if (c == y) value -= ce_coef + g * target_coef[c];
      out[c] = static_cast<scalar_t>(value);
    }
  }
}

// ------------------------------------------------------------------------------ launch plan
inline int64_t row_blocks_for(int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxRowBlocks, (N + 63) / 64));
}

// Column pass (when N > 0) and finish. `partials` is [3, row_blocks_for(N), C] (column max, exp-sum,
// target-logit sum) and `count_partials` [row_blocks_for(N), C]; with N = 0 the caller fills them
// with empty states instead.
template <typename scalar_t>
void launch_forward(const scalar_t* logits, const int64_t* target, const at::opmath_type<scalar_t>* log_prior,
                    const at::opmath_type<scalar_t>* row_nll, int64_t N, int64_t C, int64_t ignore_index,
                    double ce_weight, double alpha, double remine_lambda, double balanced,
                    at::opmath_type<scalar_t>* partials, int64_t* count_partials, at::opmath_type<scalar_t>* loss,
                    at::opmath_type<scalar_t>* column_stats, int64_t* num_valid, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_blocks = row_blocks_for(N);
  if (N > 0) {
    const int64_t rows_per_block = (N + num_blocks - 1) / num_blocks;
    const gpu::dim3 grid(static_cast<unsigned>((C + kColumnThreads - 1) / kColumnThreads),
                         static_cast<unsigned>(num_blocks));
    gpu::launch("lade column_partials_kernel", &column_partials_kernel<scalar_t>, grid, kColumnThreads, stream,
                logits, target, N, C, rows_per_block, ignore_index, partials, count_partials);
  }
  gpu::launch("lade finish_kernel", &finish_kernel<acc_t>, 1, kFinishThreads, stream,
              static_cast<const acc_t*>(partials), static_cast<const int64_t*>(count_partials), num_blocks, row_nll,
              target, log_prior, N, C, ignore_index, ce_weight, alpha, remine_lambda, balanced, loss, column_stats,
              num_valid);
}

template <typename scalar_t>
void launch_backward(const scalar_t* logits, const int64_t* target, const at::opmath_type<scalar_t>* log_prior,
                     const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* column_stats,
                     const at::opmath_type<scalar_t>* grad_loss, const int64_t* num_valid, int64_t N, int64_t C,
                     int64_t ignore_index, double ce_weight, scalar_t* grad_logits,
                     gpu::Stream stream) {
  if (N == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(N, int64_t(1) << 30));
  gpu::launch("lade backward_kernel", &backward_kernel<scalar_t>, grid, kRowThreads, stream, logits, target,
              log_prior, row_stats, column_stats, grad_loss, num_valid, N, C, ignore_index, ce_weight, grad_logits);
}

}  // namespace lade_kernels
}  // namespace ltfast
