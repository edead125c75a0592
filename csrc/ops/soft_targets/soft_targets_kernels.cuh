// CUDA kernels of the soft-target cross-entropy ops and their launch plans, with no torch glue
// (compiled by nvcc into ltfast._C and by the host compiler into the SIMT emulator's test library).
// The parallel decomposition is the hard-target one (cross_entropy_kernels.cuh): a row group of 8
// lanes, a warp or the block per row, one streaming pass forward with an online softmax, one pass
// backward, fixed-order reductions, no host synchronisation. The arithmetic is
// csrc/common/soft_target_math.h, shared with the CPU kernels.
//
// Mixed targets: both terms share the row's softmax; 'mean'/'sum' write four block partials (each
// term's loss sum and weight sum) and a one-block finish divides each term by its own sum.
// Probability targets: the target row is streamed next to the logits, the online state carries
// (max, exp-sum, mass, offset); 'mean' divides by N (the finish of the hard-target path, whose
// second partial is then the row count).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/soft_target_math.h"
#include "../cross_entropy/cross_entropy_kernels.cuh"

namespace ltfast {
namespace soft_target_kernels {

using cross_entropy_kernels::kUnroll;
using cross_entropy_kernels::kWarpsPerBlock;
using gpu_reduce::kBlockThreads;

// ------------------------------------------------------------------------------ mixed targets
template <typename acc_t>
struct MixedParams {
  const int64_t* target_a;
  const int64_t* target_b;         // nullable: single target
  const acc_t* mix;                // nullable: mix_scalar for every row
  int64_t mix_stride;              // 0 for a 0-dim mix_weight
  acc_t mix_scalar;
  const acc_t* class_smoothing;    // nullable: `smoothing` for every row
  acc_t smoothing;
  bool any_smoothing;
  const acc_t* adjustment;         // nullable
  const acc_t* target_margin;      // nullable (single target only)
  const acc_t* weight;             // nullable
  int64_t num_rows;
  int64_t num_classes;
  int64_t ignore_index;
  math::CrossEntropyConfig<acc_t> cfg;  // label_smoothing per term; total_weight filled in-kernel with weights
};

template <typename acc_t>
__device__ __forceinline__ acc_t mix_of(const MixedParams<acc_t>& p, int64_t row) {
  return p.mix ? gpu::load(p.mix + (row * p.mix_stride)) : p.mix_scalar;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t adjusted_at(const scalar_t* row, const MixedParams<acc_t>& p, int64_t c) {
  const acc_t z = static_cast<acc_t>(gpu::load(row + c));
  return p.adjustment ? math::adjusted_logit(z, gpu::load(p.adjustment + c)) : z;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ math::TargetTerm<acc_t> term_of(const scalar_t* row, const MixedParams<acc_t>& p,
                                                           int64_t y) {
  const acc_t a = adjusted_at(row, p, y);
  return {p.target_margin ? a - gpu::load(p.target_margin + y) : a, p.weight ? gpu::load(p.weight + y) : acc_t(1),
          p.class_smoothing ? gpu::load(p.class_smoothing + y) : p.smoothing};
}

// Sum of the [C] weights over the row group (the smoothing term's W), every thread gets it.
template <int GROUP, typename acc_t, typename Scratch>
__device__ __forceinline__ acc_t class_weight_total(const MixedParams<acc_t>& p, int lane, Scratch& scratch) {
  acc_t total = acc_t(0);
  for (int64_t c = lane; c < p.num_classes; c += GROUP) total += gpu::load(p.weight + c);
  return gpu_reduce::group_sum<GROUP>(total, scratch);
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    mixed_forward_kernel(const scalar_t* __restrict__ logits, MixedParams<at::opmath_type<scalar_t>> p,
                         at::opmath_type<scalar_t>* __restrict__ row_loss, at::opmath_type<scalar_t>* __restrict__ row_stats,
                         double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss_a, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_weight_a, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss_b, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_weight_b, kRowsPerBlock);
  double loss_a_sum = 0.0, weight_a_sum = 0.0, loss_b_sum = 0.0, weight_b_sum = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int64_t C = p.num_classes;
  const bool sum_weights = p.any_smoothing && p.weight != nullptr;

  // Uniform trip count per group (see cross_entropy_kernels.cuh): the barriers in group_reduce are safe.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t ya = gpu::load(p.target_a + row);
    const int64_t yb = p.target_b ? gpu::load(p.target_b + row) : p.ignore_index;
    const bool active_a = ya != p.ignore_index, active_b = yb != p.ignore_index;
    if (!active_a && !active_b) {
      if (lane == 0) {
        if (row_loss) gpu::store(row_loss + row, acc_t(0));
        gpu::store(row_stats + row, acc_t(0));
        gpu::store(row_stats + (p.num_rows + row), acc_t(0));
      }
      continue;
    }
    CUDA_KERNEL_ASSERT((!active_a || (ya >= 0 && ya < C)) && "ltfast: target out of range [0, C) and not ignore_index");
    CUDA_KERNEL_ASSERT((!active_b || (yb >= 0 && yb < C)) &&
                       "ltfast: target_b out of range [0, C) and not ignore_index");
    const scalar_t* z = logits + row * C;
    const int64_t y_ref = active_a ? ya : yb;
    const auto ref = term_of(z, p, y_ref);
    const acc_t ref_logit = ref.logit;

    math::SoftmaxState<acc_t> state = math::empty_softmax_state<acc_t>();
    acc_t offset_sum = acc_t(0), weight_sum = acc_t(0);
    for (int64_t base = lane; base < C; base += int64_t(GROUP) * kUnroll) {
      acc_t a[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        a[k] = c >= C ? math::negative_infinity<acc_t>() : (c == y_ref ? ref_logit : adjusted_at(z, p, c));
      }
      acc_t chunk_max = a[0];
#pragma unroll
      for (int k = 1; k < kUnroll; ++k) chunk_max = a[k] > chunk_max ? a[k] : chunk_max;
      acc_t chunk_sum = acc_t(0);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) chunk_sum += math::exp_shifted(a[k], chunk_max);
      state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{chunk_max, chunk_sum});
      if (p.any_smoothing) {
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int64_t c = base + int64_t(k) * GROUP;
          if (c < C) {
            const acc_t w = p.weight ? gpu::load(p.weight + c) : acc_t(1);
            offset_sum += w * (a[k] - ref_logit);
            weight_sum += w;
          }
        }
      }
    }
    cross_entropy_kernels::group_reduce<GROUP>(state, offset_sum, weight_sum, scratch_state, scratch_a, scratch_b);
    if (lane == 0) {
      auto cfg = p.cfg;
      if (sum_weights) cfg.total_weight = weight_sum;
      const math::RowLogSumExp<acc_t> finished = math::finish_row(state);
      const acc_t lam = mix_of(p, row);
      acc_t loss_a = acc_t(0), loss_b = acc_t(0);
      if (active_a) {
        const auto term = term_of(z, p, ya);
        loss_a = lam * math::mixed_term_loss(cfg, finished, term, ref, offset_sum);
        loss_a_sum += static_cast<double>(loss_a);
        weight_a_sum += static_cast<double>(term.weight);
      }
      if (active_b) {
        const auto term = term_of(z, p, yb);
        loss_b = (acc_t(1) - lam) * math::mixed_term_loss(cfg, finished, term, ref, offset_sum);
        loss_b_sum += static_cast<double>(loss_b);
        weight_b_sum += static_cast<double>(term.weight);
      }
      gpu::store(row_stats + row, finished.max);
      gpu::store(row_stats + (p.num_rows + row), finished.log_sum);
      if (row_loss) gpu::store(row_loss + row, loss_a + loss_b);
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(loss_a_sum, weight_a_sum, partials, partial_loss_a, partial_weight_a);
    gpu_reduce::write_block_partials<GROUP>(loss_b_sum, weight_b_sum, partials + 2 * gridDim.x, partial_loss_b,
                                            partial_weight_b);
  }
}

// loss = S_a / D_a + S_b / D_b (mean) or S_a + S_b (sum) from the partials [4, num_blocks]; writes the
// two denominators (term b: 1 without target_b).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mixed_finish_kernel(const double* __restrict__ partials, int64_t num_blocks, bool mean, bool has_target_b,
                        acc_t* __restrict__ loss, acc_t* __restrict__ denominators) {
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  const double sum_a = gpu_reduce::sum_in_block(partials, num_blocks, scratch);
  const double weight_a = gpu_reduce::sum_in_block(partials + num_blocks, num_blocks, scratch);
  const double sum_b = gpu_reduce::sum_in_block(partials + 2 * num_blocks, num_blocks, scratch);
  const double weight_b = gpu_reduce::sum_in_block(partials + 3 * num_blocks, num_blocks, scratch);
  if (threadIdx.x == 0) {
    const double denom_a = mean ? weight_a : 1.0;
    const double denom_b = (mean && has_target_b) ? weight_b : 1.0;
    gpu::store(loss, sum_a / denom_a + (has_target_b ? sum_b / denom_b : 0.0));
    gpu::store(denominators, static_cast<acc_t>(denom_a));
    gpu::store(denominators + 1, static_cast<acc_t>(denom_b));
  }
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    mixed_backward_kernel(const scalar_t* __restrict__ logits, MixedParams<at::opmath_type<scalar_t>> p,
                          const at::opmath_type<scalar_t>* __restrict__ row_stats,
                          const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                          const at::opmath_type<scalar_t>* __restrict__ denominators,
                          scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(acc_t, scratch_sum, kWarpsPerBlock);
  const int lane = threadIdx.x % GROUP;
  const int64_t C = p.num_classes;
  const bool sum_weights = p.any_smoothing && p.weight != nullptr;
  const acc_t shared_a = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominators);
  const acc_t shared_b = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominators + 1);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g = grad_logits + row * C;
    const int64_t ya = gpu::load(p.target_a + row);
    const int64_t yb = p.target_b ? gpu::load(p.target_b + row) : p.ignore_index;
    const bool active_a = ya != p.ignore_index, active_b = yb != p.ignore_index;
    if (!active_a && !active_b) {
      for (int64_t c = lane; c < C; c += GROUP) gpu::store(g + c, scalar_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT((!active_a || (ya >= 0 && ya < C)) && "ltfast: target out of range [0, C) and not ignore_index");
    CUDA_KERNEL_ASSERT((!active_b || (yb >= 0 && yb < C)) &&
                       "ltfast: target_b out of range [0, C) and not ignore_index");
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + (p.num_rows + row))};
    if (math::row_is_nan(stats)) {  // row-uniform branch, as in the hard-target kernel
      for (int64_t c = lane; c < C; c += GROUP) gpu::store(g + c, stats.log_sum);
      continue;
    }
    const scalar_t* z = logits + row * C;
    auto cfg = p.cfg;
    if (sum_weights) cfg.total_weight = class_weight_total<GROUP>(p, lane, scratch_sum);
    const acc_t lam = mix_of(p, row);
    const acc_t upstream = per_row_grad ? gpu::load(grad_loss + row) : acc_t(1);
    math::RowGradientCoefficients<acc_t> coef_a{0, 0, 0}, coef_b{0, 0, 0};
    math::TargetTerm<acc_t> term_a{0, 0, 0}, term_b{0, 0, 0};
    if (active_a) {
      term_a = term_of(z, p, ya);
      coef_a = math::mixed_term_coefficients(cfg, upstream * lam * (per_row_grad ? acc_t(1) : shared_a), stats, term_a);
    }
    if (active_b) {
      term_b = term_of(z, p, yb);
      coef_b = math::mixed_term_coefficients(cfg, upstream * (acc_t(1) - lam) * (per_row_grad ? acc_t(1) : shared_b),
                                             stats, term_b);
    }
    const acc_t prob_coef = coef_a.prob_coef + coef_b.prob_coef;
    const acc_t class_coef = coef_a.class_coef + coef_b.class_coef;
    for (int64_t base = lane; base < C; base += int64_t(GROUP) * kUnroll) {
      acc_t a[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        a[k] = c < C ? ((active_a && c == ya) ? term_a.logit : adjusted_at(z, p, c)) : acc_t(0);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        if (c < C) {
          acc_t grad = math::element_gradient(math::softmax_probability(a[k], stats), prob_coef, class_coef,
                                              p.weight ? gpu::load(p.weight + c) : acc_t(1));
          if (active_a && c == ya) grad -= coef_a.target_coef;
          if (active_b && c == yb) grad -= coef_b.target_coef;
          gpu::store(g + c, grad);
        }
      }
    }
  }
}

inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes) {
  return cross_entropy_kernels::row_kernel_blocks(num_rows, num_classes);
}

// Forward: row_loss [N] ('none', else nullptr), row_stats [2, N]; with `partials` (double
// [4, row_kernel_blocks], zeros when N = 0) the finish writes loss and denominators [2].
template <typename scalar_t>
void launch_mixed_forward(const scalar_t* logits, const MixedParams<at::opmath_type<scalar_t>>& p,
                          at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats, double* partials,
                          bool mean, at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominators,
                          gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.num_rows > 0) {
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("soft_targets mixed_forward_kernel", &mixed_forward_kernel<scalar_t, kGroup>,
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_loss, row_stats,
                  partials);
    });
  }
  if (partials != nullptr) {
    gpu::launch("soft_targets mixed_finish_kernel", &mixed_finish_kernel<acc_t>, 1, kBlockThreads, stream,
                static_cast<const double*>(partials),
                static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes)), mean, p.target_b != nullptr, loss,
                denominators);
  }
}

template <typename scalar_t>
void launch_mixed_backward(const scalar_t* logits, const MixedParams<at::opmath_type<scalar_t>>& p,
                           const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* grad_loss,
                           bool per_row_grad, const at::opmath_type<scalar_t>* denominators, scalar_t* grad_logits,
                           gpu::Stream stream) {
  if (p.num_rows == 0) return;
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("soft_targets mixed_backward_kernel", &mixed_backward_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_stats, grad_loss,
                per_row_grad, denominators, grad_logits);
  });
}

// ------------------------------------------------------------------------------ probability targets
template <typename acc_t>
struct ProbabilityParams {
  const acc_t* adjustment;  // nullable
  const acc_t* weight;      // nullable
  acc_t one_minus_eps;
  acc_t eps_over_c;
  int64_t num_rows;
  int64_t num_classes;
};

// Reduces a ProbabilityState over the GROUP threads of a row (fixed order); every thread gets it.
// `scratch` is __shared__ ProbabilityState[kWarpsPerBlock], used only for block groups.
template <int GROUP, typename T, typename Scratch>
__device__ __forceinline__ math::ProbabilityState<T> group_reduce_probability(math::ProbabilityState<T> state,
                                                                             Scratch& scratch) {
  constexpr int kWarpWidth = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int offset = kWarpWidth / 2; offset > 0; offset /= 2) {
    const math::ProbabilityState<T> other{gpu_reduce::group_shuffle_xor<GROUP>(state.max, offset),
                                          gpu_reduce::group_shuffle_xor<GROUP>(state.sum, offset),
                                          gpu_reduce::group_shuffle_xor<GROUP>(state.mass, offset),
                                          gpu_reduce::group_shuffle_xor<GROUP>(state.offset, offset)};
    state = math::merge_probability_states(state, other);
  }
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = state;
    __syncthreads();
    state = scratch[0];
#pragma unroll
    for (int w = 1; w < GROUP / 32; ++w) {
      const math::ProbabilityState<T> other = scratch[w];
      state = math::merge_probability_states(state, other);
    }
    __syncthreads();  // scratch is reused by the next row
  }
  return state;
}

template <typename scalar_t, typename target_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    probability_forward_kernel(const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
                               ProbabilityParams<at::opmath_type<scalar_t>> p,
                               at::opmath_type<scalar_t>* __restrict__ row_loss,
                               at::opmath_type<scalar_t>* __restrict__ row_stats, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::ProbabilityState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_rows, kRowsPerBlock);
  double group_loss = 0.0, group_rows = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int64_t C = p.num_classes;

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const scalar_t* z = logits + row * C;
    const target_t* t = target + row * C;
    auto state = math::empty_probability_state<acc_t>();
    for (int64_t base = lane; base < C; base += int64_t(GROUP) * kUnroll) {
      acc_t a[kUnroll], wq[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        if (c < C) {
          const acc_t zc = static_cast<acc_t>(gpu::load(z + c));
          a[k] = p.adjustment ? math::adjusted_logit(zc, gpu::load(p.adjustment + c)) : zc;
          wq[k] = math::weighted_probability(static_cast<acc_t>(gpu::load(t + c)), p.weight ? gpu::load(p.weight + c) : acc_t(1),
                                             p.one_minus_eps, p.eps_over_c);
        } else {
          a[k] = math::negative_infinity<acc_t>();
          wq[k] = acc_t(0);
        }
      }
      math::ProbabilityState<acc_t> chunk{a[0], acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
      for (int k = 1; k < kUnroll; ++k) chunk.max = a[k] > chunk.max ? a[k] : chunk.max;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t c = base + int64_t(k) * GROUP;
        chunk.sum += math::exp_shifted(a[k], chunk.max);
        if (c < C) {  // padding adds nothing (0 * -inf would be NaN)
          chunk.mass += wq[k];
          chunk.offset += math::probability_offset(wq[k], a[k], chunk.max);
        }
      }
      state = math::merge_probability_states(state, chunk);
    }
    state = group_reduce_probability<GROUP>(state, scratch_state);
    if (lane == 0) {
      const auto finished = math::finish_row(math::SoftmaxState<acc_t>{state.max, state.sum});
      const acc_t loss = math::probability_row_loss(finished, state.mass, state.offset);
      gpu::store(row_stats + row, finished.max);
      gpu::store(row_stats + (p.num_rows + row), finished.log_sum);
      gpu::store(row_stats + (2 * p.num_rows + row), state.mass);
      gpu::store(row_loss + row, loss);
      group_loss += static_cast<double>(loss);
      group_rows += 1.0;
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_rows, partials, partial_loss, partial_rows);
  }
}

template <typename scalar_t, typename target_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    probability_backward_kernel(const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
                                ProbabilityParams<at::opmath_type<scalar_t>> p,
                                const at::opmath_type<scalar_t>* __restrict__ row_stats,
                                const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                                const at::opmath_type<scalar_t>* __restrict__ denominator,
                                scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  const int lane = threadIdx.x % GROUP;
  const int64_t C = p.num_classes;
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g = grad_logits + row * C;
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + (p.num_rows + row))};
    if (math::row_is_nan(stats)) {
      for (int64_t c = lane; c < C; c += GROUP) gpu::store(g + c, stats.log_sum);
      continue;
    }
    const scalar_t* z = logits + row * C;
    const target_t* t = target + row * C;
    const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
    const acc_t mass_scale = scale * gpu::load(row_stats + (2 * p.num_rows + row));
    for (int64_t c = lane; c < C; c += GROUP) {
      const acc_t zc = static_cast<acc_t>(gpu::load(z + c));
      const acc_t a = p.adjustment ? math::adjusted_logit(zc, gpu::load(p.adjustment + c)) : zc;
      const acc_t wq = math::weighted_probability(static_cast<acc_t>(gpu::load(t + c)), p.weight ? gpu::load(p.weight + c) : acc_t(1),
                                                  p.one_minus_eps, p.eps_over_c);
      gpu::store(g + c, math::softmax_probability(a, stats) * mass_scale - wq * scale);
    }
  }
}

template <typename scalar_t, typename target_t>
void launch_probability_forward(const scalar_t* logits, const target_t* target,
                                const ProbabilityParams<at::opmath_type<scalar_t>>& p,
                                at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                                double* partials, bool mean, at::opmath_type<scalar_t>* loss,
                                at::opmath_type<scalar_t>* denominator, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.num_rows > 0) {
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("soft_targets probability_forward_kernel", &probability_forward_kernel<scalar_t, target_t, kGroup>,
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, target, p, row_loss,
                  row_stats, partials);
    });
  }
  if (partials != nullptr) {
    gpu::launch("soft_targets probability_finish_kernel", &gpu_reduce::finish_mean_kernel<acc_t>, 1, kBlockThreads,
                stream, static_cast<const double*>(partials),
                static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes)), mean, loss, denominator);
  }
}

template <typename scalar_t, typename target_t>
void launch_probability_backward(const scalar_t* logits, const target_t* target,
                                 const ProbabilityParams<at::opmath_type<scalar_t>>& p,
                                 const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* grad_loss,
                                 bool per_row_grad, const at::opmath_type<scalar_t>* denominator,
                                 scalar_t* grad_logits, gpu::Stream stream) {
  if (p.num_rows == 0) return;
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("soft_targets probability_backward_kernel", &probability_backward_kernel<scalar_t, target_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, target, p, row_stats,
                grad_loss, per_row_grad, denominator, grad_logits);
  });
}

}  // namespace soft_target_kernels
}  // namespace ltfast
