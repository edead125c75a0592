// CUDA kernels of LADE and their launch plan, with no torch glue (compiled by nvcc through
// lade_cuda.cu, and by the host compiler for the SIMT emulator). Saved statistics: lade.h.
//
// Forward, after the cross-entropy family's row kernel (PriorCE rows and their block partials):
//   1. column pass: a block covers `column_lanes` classes x a block of rows; its threads split the
//      rows too when C is small (C = 10: 16 classes x 16 row lanes, instead of 246 idle threads),
//      merge their column states in shared memory in a fixed order, and write one partial per
//      (row block, class) plus the row block's count of non-ignored rows;
//   2. per-class finish over a grid (a thread per class): merges the row blocks' partials in
//      order, writes column_stats and the class's LADER term, summed per block in a fixed order;
//   3. scalar finish, one block: the PriorCE sum, the row count and the LADER partials.
// Backward, one launch: a row group per row (gpu_reduce::with_row_group), each element's row and
// column softmax from the saved statistics; the logits read once, the gradient written once.
// Deterministic (no atomics), no host synchronisation.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace lade_kernels {

using gpu_reduce::kBlockThreads;
// At most this many row blocks in the column pass: with C = 1000 that is 4 x 64 = 256 blocks (an
// H100 has 132 SMs), and the per-class finish merges at most 64 partials per class.
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMinRowsPerBlock = 64;

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    column_partials_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N,
                           int64_t C, int64_t rows_per_block, int64_t ignore_index, int column_lanes,
                           at::opmath_type<scalar_t>* __restrict__ partials, int64_t* __restrict__ count_partials,
                           int64_t* __restrict__ valid_partials) {
  using acc_t = at::opmath_type<scalar_t>;
  LTFAST_SHARED_ARRAY(acc_t, lane_max, kBlockThreads);
  LTFAST_SHARED_ARRAY(acc_t, lane_sum, kBlockThreads);
  LTFAST_SHARED_ARRAY(acc_t, lane_target_sum, kBlockThreads);
  LTFAST_SHARED_ARRAY(int64_t, lane_count, kBlockThreads);
  LTFAST_SHARED_ARRAY(int64_t, lane_valid, kBlockThreads);
  const int column_lane = threadIdx.x % column_lanes;
  const int row_lane = threadIdx.x / column_lanes;
  const int row_lanes = kBlockThreads / column_lanes;
  const int64_t c = int64_t(blockIdx.x) * column_lanes + column_lane;
  const bool active = c < C;  // inactive threads still count rows and reach the barrier
  const int64_t first = int64_t(blockIdx.y) * rows_per_block;
  const int64_t last = first + rows_per_block < N ? first + rows_per_block : N;
  auto state = math::empty_softmax_state<acc_t>();
  acc_t target_sum = acc_t(0);
  int64_t count = 0, valid = 0;  // exact: a float count stops at 2^24
  for (int64_t i = first + row_lane; i < last; i += row_lanes) {
    const int64_t y = gpu::load(target + i);  // the same address for a warp's columns: one broadcast load
    if (y == ignore_index) continue;
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    ++valid;
    if (!active) continue;
    const acc_t z = static_cast<acc_t>(gpu::load(logits + i * C + c));  // consecutive threads, consecutive classes
    state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{z, acc_t(1)});
    if (y == c) {
      target_sum += z;
      ++count;
    }
  }
  if (row_lanes > 1) {  // merge the row lanes of each column in order 0, 1, ..., row_lanes - 1
    lane_max[threadIdx.x] = state.max;
    lane_sum[threadIdx.x] = state.sum;
    lane_target_sum[threadIdx.x] = target_sum;
    lane_count[threadIdx.x] = count;
    lane_valid[threadIdx.x] = valid;
    __syncthreads();
    if (row_lane == 0) {
      for (int r = 1; r < row_lanes; ++r) {
        const int other = r * column_lanes + column_lane;
        state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{lane_max[other], lane_sum[other]});
        target_sum += lane_target_sum[other];
        count += lane_count[other];
        valid += lane_valid[other];
      }
    }
  }
  if (row_lane != 0) return;
  if (active) {
    const int64_t slot = int64_t(blockIdx.y) * C + c;
    const int64_t plane = int64_t(gridDim.y) * C;
    gpu::store(partials + slot, state.max);
    gpu::store(partials + plane + slot, state.sum);
    gpu::store(partials + 2 * plane + slot, target_sum);
    gpu::store(count_partials + slot, count);
  }
  if (blockIdx.x == 0 && column_lane == 0) gpu::store(valid_partials + blockIdx.y, valid);
}

// A thread per class: merges the row blocks' column partials in order, writes column_stats (lade.h)
// and adds the class's LADER term to its block's partial (fixed order).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    finish_columns_kernel(const acc_t* __restrict__ partials, const int64_t* __restrict__ count_partials,
                          const int64_t* __restrict__ valid_partials, int64_t num_row_blocks,
                          const acc_t* __restrict__ log_prior, int64_t C, double alpha, double remine_lambda,
                          double balanced, acc_t* __restrict__ column_stats, double* __restrict__ lader_partials) {
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  int64_t num_valid = 0;
  for (int64_t b = 0; b < num_row_blocks; ++b) num_valid += gpu::load(valid_partials + b);  // <= 64 cached loads
  const double log_n = log(static_cast<double>(num_valid));
  const int64_t c = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x;
  double term = 0.0;
  if (c < C) {
    const int64_t plane = num_row_blocks * C;
    auto state = math::empty_softmax_state<acc_t>();
    double target_sum = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < num_row_blocks; ++b) {
      state = math::merge_softmax_states(
          state, math::SoftmaxState<acc_t>{gpu::load(partials + b * C + c), gpu::load(partials + plane + b * C + c)});
      target_sum += static_cast<double>(gpu::load(partials + 2 * plane + b * C + c));
      count += gpu::load(count_partials + b * C + c);
    }
    const math::RowLogSumExp<acc_t> column = math::finish_row(state);
    // log sum_i exp(z_ic) as M_c + L_c in float64: S_c keeps L_c's digits at |z| ~ 1e6.
    const double column_lse = static_cast<double>(column.max) + static_cast<double>(column.log_sum);
    const double class_log_prior = static_cast<double>(gpu::load(log_prior + c));
    const double prior = exp(class_log_prior);
    const double s_c = column_lse - class_log_prior + balanced - log_n;
    // The survey's n_c + 1e-8 (float32) is n_c for every n_c >= 1; the 1e-8 only keeps an absent
    // class finite (as the CPU kernel, lade.h).
    const double count_term = count > 0 ? static_cast<double>(count) : 1e-8;
    const double f_c = target_sum / count_term;
    term = -prior * (f_c - s_c - remine_lambda * s_c * s_c);
    gpu::store(column_stats + c, column.max);
    gpu::store(column_stats + C + c, column.log_sum);
    gpu::store(column_stats + 2 * C + c, static_cast<acc_t>(alpha * prior * (1.0 + 2.0 * remine_lambda * s_c)));
    gpu::store(column_stats + 3 * C + c, static_cast<acc_t>(alpha * prior / count_term));
  }
  const double block_total = gpu_reduce::block_sum(term, scratch);
  if (threadIdx.x == 0) gpu::store(lader_partials + blockIdx.x, block_total);
}

// One block: loss = ce_weight * PriorCE_sum / N' + alpha * LADER, and N' (int64).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    finish_scalar_kernel(const double* __restrict__ ce_partials, int64_t num_ce_blocks,
                         const int64_t* __restrict__ valid_partials, int64_t num_row_blocks,
                         const double* __restrict__ lader_partials, int64_t num_column_blocks, double ce_weight,
                         double alpha, acc_t* __restrict__ loss, int64_t* __restrict__ num_valid_out) {
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  const double ce_total = ce_partials != nullptr ? gpu_reduce::sum_in_block(ce_partials, num_ce_blocks, scratch) : 0.0;
  const double lader = gpu_reduce::sum_in_block(lader_partials, num_column_blocks, scratch);
  if (threadIdx.x == 0) {
    int64_t num_valid = 0;
    for (int64_t b = 0; b < num_row_blocks; ++b) num_valid += gpu::load(valid_partials + b);
    const double ce = ce_partials != nullptr ? ce_weight * ce_total / static_cast<double>(num_valid) : 0.0;
    gpu::store(loss, static_cast<acc_t>(ce + alpha * lader));
    gpu::store(num_valid_out, num_valid);
  }
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                    const at::opmath_type<scalar_t>* __restrict__ log_prior,
                    const at::opmath_type<scalar_t>* __restrict__ row_stats,
                    const at::opmath_type<scalar_t>* __restrict__ column_stats,
                    const at::opmath_type<scalar_t>* __restrict__ grad_loss, const int64_t* __restrict__ num_valid,
                    int64_t N, int64_t C, int64_t ignore_index, double ce_weight, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  const int lane = threadIdx.x % GROUP;
  const acc_t g = gpu::load(grad_loss);
  const bool with_ce = ce_weight != 0.0;
  const acc_t ce_coef = with_ce ? g * static_cast<acc_t>(ce_weight) / static_cast<acc_t>(gpu::load(num_valid)) : acc_t(0);
  // column_stats layout: lade.h (M_c, L_c, sigma coefficient, target coefficient).
  const acc_t* column_max = column_stats;
  const acc_t* column_log_sum = column_stats + C;
  const acc_t* sigma_coef = column_stats + 2 * C;
  const acc_t* target_coef = column_stats + 3 * C;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* out = grad_logits + row * C;
    const int64_t y = gpu::load(target + row);
    if (y == ignore_index) {
      for (int64_t c = lane; c < C; c += GROUP) gpu::store(out + c, scalar_t(0));
      continue;
    }
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + N + row)};
    if (with_ce && math::row_is_nan(stats)) {  // NaN/inf in the row: NaN gradients, as F.cross_entropy
      for (int64_t c = lane; c < C; c += GROUP) gpu::store(out + c, stats.log_sum);
      continue;
    }
    const scalar_t* z_row = logits + row * C;
    for (int64_t c = lane; c < C; c += GROUP) {
      const acc_t z = static_cast<acc_t>(gpu::load(z_row + c));
      const acc_t sigma =
          math::exp_fn(math::log_softmax_of(z, gpu::load(column_max + c), gpu::load(column_log_sum + c)));
      acc_t value = g * gpu::load(sigma_coef + c) * sigma;
      if (with_ce) {
        value += ce_coef * math::softmax_probability(math::adjusted_logit(z, gpu::load(log_prior + c)), stats);
      }
      if (c == y) value -= ce_coef + g * gpu::load(target_coef + c);
      gpu::store(out + c, value);
    }
  }
}

// ------------------------------------------------------------------------------ launch plan
// Row blocks of the column pass: one per 64 rows, at most kMaxRowBlocks.
inline int64_t row_blocks_for(int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxRowBlocks, (N + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
}

// Classes per column-pass block: the smallest power of two >= C, at most a block; the other threads
// of the block split the rows (row lanes).
inline int column_lanes_for(int64_t C) {
  int lanes = 1;
  while (lanes < C && lanes < kBlockThreads) lanes *= 2;
  return lanes;
}

// Blocks of the per-class finish: a thread per class (the LADER partials buffer has this many).
inline int64_t column_blocks_for(int64_t C) { return (C + kBlockThreads - 1) / kBlockThreads; }

// Column pass (when N > 0), per-class finish and scalar finish. Buffers (lade_cuda.cu allocates
// them; with N = 0 it fills the partials with empty states): partials [3, row_blocks_for(N), C]
// (column max, exp-sum, target-logit sum), count_partials and the row-block counts int64
// [row_blocks_for(N), C] and [row_blocks_for(N)], lader_partials double [column_blocks_for(C)].
// `ce_partials` (double [2, num_ce_blocks]) is null for the regulariser alone.
template <typename scalar_t>
void launch_forward(const scalar_t* logits, const int64_t* target, const at::opmath_type<scalar_t>* log_prior,
                    const double* ce_partials, int64_t num_ce_blocks, int64_t N, int64_t C, int64_t ignore_index,
                    double ce_weight, double alpha, double remine_lambda, double balanced,
                    at::opmath_type<scalar_t>* partials, int64_t* count_partials, int64_t* valid_partials,
                    double* lader_partials, at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* column_stats,
                    int64_t* num_valid, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_row_blocks = row_blocks_for(N);
  const int column_lanes = column_lanes_for(C);
  if (N > 0) {
    const int64_t rows_per_block = (N + num_row_blocks - 1) / num_row_blocks;
    const gpu::dim3 grid(static_cast<unsigned>((C + column_lanes - 1) / column_lanes),
                         static_cast<unsigned>(num_row_blocks));
    gpu::launch("lade column_partials_kernel", &column_partials_kernel<scalar_t>, grid, kBlockThreads, stream, logits,
                target, N, C, rows_per_block, ignore_index, column_lanes, partials, count_partials, valid_partials);
  }
  const int64_t column_blocks = column_blocks_for(C);
  gpu::launch("lade finish_columns_kernel", &finish_columns_kernel<acc_t>, static_cast<unsigned>(column_blocks),
              kBlockThreads, stream, static_cast<const acc_t*>(partials), static_cast<const int64_t*>(count_partials),
              static_cast<const int64_t*>(valid_partials), num_row_blocks, log_prior, C, alpha, remine_lambda,
              balanced, column_stats, lader_partials);
  gpu::launch("lade finish_scalar_kernel", &finish_scalar_kernel<acc_t>, 1, kBlockThreads, stream, ce_partials,
              num_ce_blocks, static_cast<const int64_t*>(valid_partials), num_row_blocks,
              static_cast<const double*>(lader_partials), column_blocks, ce_weight, alpha, loss, num_valid);
}

template <typename scalar_t>
void launch_backward(const scalar_t* logits, const int64_t* target, const at::opmath_type<scalar_t>* log_prior,
                     const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* column_stats,
                     const at::opmath_type<scalar_t>* grad_loss, const int64_t* num_valid, int64_t N, int64_t C,
                     int64_t ignore_index, double ce_weight, scalar_t* grad_logits, gpu::Stream stream) {
  if (N == 0) return;
  gpu_reduce::with_row_group(C, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("lade backward_kernel", &backward_kernel<scalar_t, kGroup>, gpu_reduce::row_blocks(N, kGroup),
                kBlockThreads, stream, logits, target, log_prior, row_stats, column_stats, grad_loss, num_valid, N, C,
                ignore_index, ce_weight, grad_logits);
  });
}

}  // namespace lade_kernels
}  // namespace ltfast
