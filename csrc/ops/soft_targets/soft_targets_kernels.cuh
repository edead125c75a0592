// CUDA kernels of the soft-target cross-entropy ops and their launch plans, with no torch glue
// (compiled by nvcc into ltfast._C and by the host compiler into the SIMT emulator's test library).
// The parallel decomposition is the hard-target one (cross_entropy_kernels.cuh): a row group of 8
// lanes, a warp or the block per row, one streaming pass forward with an online softmax, one pass
// backward, fixed-order reductions, no host synchronisation. The [N, C] rows (logits, gradient,
// probability targets) are streamed in 16-byte vectors with a scalar head and tail per row
// (gpu_row_stream::split_row): element-wise loads of 2 bytes strided by the group measured 0.63-0.67
// sector efficiency in the emulator (tests/test_memory_traffic.py). The arithmetic is
// csrc/common/soft_target_math.h, shared with the CPU kernels. Rows of C <= 32 classes go through
// shared-memory tiles instead of being streamed one by one (gpu_reduce.cuh, tiled rows).
//
// Mixed targets: both terms share the row's softmax; 'mean'/'sum' write four block partials (each
// term's loss sum and weight sum) and the block that takes the last ticket divides each term by its
// own sum (gpu_reduce::finish_in_last_block: one launch; the finish kernel after the row kernel
// under CUDA graph capture, and alone when N = 0).
// Probability targets: the target row is streamed next to the logits, the online state carries
// (max, exp-sum, mass, offset); 'mean' divides by N (the finish of the hard-target path, whose
// second partial is then the row count, in the last block as well).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/gpu_row_stream.cuh"
#include "../../common/soft_target_math.h"
#include "../cross_entropy/cross_entropy_kernels.cuh"

namespace ltfast {
namespace soft_target_kernels {

using cross_entropy_kernels::kWarpsPerBlock;
using gpu_reduce::kBlockThreads;
using gpu_row_stream::fill_row;
using gpu_row_stream::kVectorElements;
using gpu_row_stream::kVectorUnroll;
using gpu_row_stream::RowSplit;
using gpu_row_stream::split_row;

// The per-class values V classes from c0 need (each pointer nullable: not read): the adjustment and
// the class weights. count == V (the vector body): in the widest loads their alignment allows
// (gpu_row_stream::load_run); else one element (a scalar head or tail element, at index 0).
template <int V, typename acc_t>
struct ClassValues {
  acc_t adjustment[V];
  acc_t weight[V];

  __device__ __forceinline__ void load(const acc_t* adjustment_c, const acc_t* weight_c, int c0, int count) {
    if (count == V) {
      if (adjustment_c) gpu_row_stream::load_run<V>(adjustment_c + c0, adjustment);
      if (weight_c) gpu_row_stream::load_run<V>(weight_c + c0, weight);
    } else {
      if (adjustment_c) adjustment[0] = gpu::load(adjustment_c + c0);
      if (weight_c) weight[0] = gpu::load(weight_c + c0);
    }
  }
};

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

// Merges K logits (invalid ones: padding of -inf) into the row's online softmax state with one
// rescaling exponential and, with smoothing, adds w * (a - ref_logit) and w of the valid ones.
template <int K, typename acc_t>
__device__ __forceinline__ void merge_mixed_chunk(const acc_t (&a)[K], const acc_t (&w)[K], const bool (&valid)[K],
                                                  acc_t ref_logit, bool smoothing, math::SoftmaxState<acc_t>& state,
                                                  acc_t& offset_sum, acc_t& weight_sum) {
  acc_t chunk_max = a[0];
#pragma unroll
  for (int k = 1; k < K; ++k) chunk_max = a[k] > chunk_max ? a[k] : chunk_max;
  acc_t chunk_sum = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) chunk_sum += math::exp_shifted(a[k], chunk_max);
  state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{chunk_max, chunk_sum});
  if (smoothing) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (valid[k]) {
        offset_sum += w[k] * (a[k] - ref_logit);
        weight_sum += w[k];
      }
    }
  }
}

// A group's running sums over its rows (lane 0's), for the block partials.
struct MixedSums {
  double loss_a = 0.0, weight_a = 0.0, loss_b = 0.0, weight_b = 0.0;
};

// Lane 0's end of a mixed-target row in the forward, from the group's reduced state: each active
// term's loss (times lam or 1 - lam), the row's statistics and loss, the group's sums. `ref` is the
// term whose logit the softmax saw at its class; term_of_class(y) the target term of class y.
template <typename acc_t, typename TermOf>
__device__ __forceinline__ void finish_mixed_row(const MixedParams<acc_t>& p, int64_t row,
                                                 const math::SoftmaxState<acc_t>& state, acc_t offset_sum,
                                                 acc_t weight_sum, const math::TargetTerm<acc_t>& ref, int64_t ya,
                                                 int64_t yb, bool active_a, bool active_b, TermOf&& term_of_class,
                                                 acc_t* row_loss, acc_t* row_stats, MixedSums& sums) {
  auto cfg = p.cfg;
  if (p.any_smoothing && p.weight != nullptr) cfg.total_weight = weight_sum;
  const math::RowLogSumExp<acc_t> finished = math::finish_row(state);
  const acc_t lam = mix_of(p, row);
  acc_t loss_a = acc_t(0), loss_b = acc_t(0);
  if (active_a) {
    const auto term = term_of_class(ya);
    loss_a = lam * math::mixed_term_loss(cfg, finished, term, ref, offset_sum);
    sums.loss_a += static_cast<double>(loss_a);
    sums.weight_a += static_cast<double>(term.weight);
  }
  if (active_b) {
    const auto term = term_of_class(yb);
    loss_b = (acc_t(1) - lam) * math::mixed_term_loss(cfg, finished, term, ref, offset_sum);
    sums.loss_b += static_cast<double>(loss_b);
    sums.weight_b += static_cast<double>(term.weight);
  }
  gpu::store(row_stats + row, finished.max);
  gpu::store(row_stats + (p.num_rows + row), finished.log_sum);
  if (row_loss) gpu::store(row_loss + row, loss_a + loss_b);
}

// The gradient of one mixed-target row, d loss / d z_c for each class c (`at`), from the row's
// statistics and each active term's coefficients: shared by the streamed and the tiled backward.
template <typename acc_t>
struct MixedRowGradient {
  math::RowLogSumExp<acc_t> stats;
  acc_t prob_coef, class_coef, target_a_coef, target_b_coef;
  acc_t term_a_logit;  // the softmax sees term a's logit (with its margin) at ya
  int ya_c, yb_c;      // an inactive target's class is -1: no c matches it

  // Per-class values in `run` at i.
  template <int V>
  __device__ __forceinline__ acc_t at(const MixedParams<acc_t>& p, acc_t zc, int c, const ClassValues<V, acc_t>& run,
                                      int i) const {
    const acc_t a = c == ya_c ? term_a_logit : (p.adjustment ? math::adjusted_logit(zc, run.adjustment[i]) : zc);
    acc_t grad = math::element_gradient(math::softmax_probability(a, stats), prob_coef, class_coef,
                                        p.weight ? run.weight[i] : acc_t(1));
    if (c == ya_c) grad -= target_a_coef;
    if (c == yb_c) grad -= target_b_coef;
    return grad;
  }
};

// The row's MixedRowGradient: term t's coefficients scaled by scale_t (upstream x lam or 1 - lam,
// over the term's denominator); term_of_class(y) is the target term of class y from the row.
template <typename acc_t, typename TermOf>
__device__ __forceinline__ MixedRowGradient<acc_t> mixed_row_gradient(const math::CrossEntropyConfig<acc_t>& cfg,
                                                                      const math::RowLogSumExp<acc_t>& stats,
                                                                      acc_t scale_a, acc_t scale_b, int64_t ya,
                                                                      int64_t yb, bool active_a, bool active_b,
                                                                      TermOf&& term_of_class) {
  math::RowGradientCoefficients<acc_t> coef_a{0, 0, 0}, coef_b{0, 0, 0};
  math::TargetTerm<acc_t> term_a{0, 0, 0};
  if (active_a) {
    term_a = term_of_class(ya);
    coef_a = math::mixed_term_coefficients(cfg, scale_a, stats, term_a);
  }
  if (active_b) coef_b = math::mixed_term_coefficients(cfg, scale_b, stats, term_of_class(yb));
  return {stats,
          coef_a.prob_coef + coef_b.prob_coef,
          coef_a.class_coef + coef_b.class_coef,
          coef_a.target_coef,
          coef_b.target_coef,
          term_a.logit,
          active_a ? static_cast<int>(ya) : -1,
          active_b ? static_cast<int>(yb) : -1};
}

// loss = S_a / D_a + S_b / D_b (mean) or S_a + S_b (sum) from the partials [4, num_blocks], by every
// thread of one block in a fixed order (the last block of mixed_forward_kernel, or
// mixed_finish_kernel); writes the two denominators (term b: 1 without target_b).
template <typename acc_t, typename Scratch>
__device__ void mixed_finish(const double* partials, int64_t num_blocks, bool mean, bool has_target_b, acc_t* loss,
                             acc_t* denominators, Scratch& scratch) {
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
__device__ __forceinline__ void mixed_forward_streamed_rows(
    const scalar_t* __restrict__ logits, const MixedParams<at::opmath_type<scalar_t>>& p,
    at::opmath_type<scalar_t>* __restrict__ row_loss, at::opmath_type<scalar_t>* __restrict__ row_stats,
    double* __restrict__ partials, const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss_a, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_weight_a, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss_b, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_weight_b, kRowsPerBlock);
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  MixedSums sums;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  // The class weights are read in the row pass only for the smoothing term's sums.
  const acc_t* smoothing_weight = p.any_smoothing ? p.weight : nullptr;

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
    const scalar_t* z = logits + row * p.num_classes;
    const int64_t y_ref = active_a ? ya : yb;
    const auto ref = term_of(z, p, y_ref);
    const acc_t ref_logit = ref.logit;
    const int y_ref_c = static_cast<int>(y_ref);
    // The logit the softmax sees at class c (per-class values in `run` at i): the reference term's
    // (with its margin) at y_ref, else z + adjustment.
    auto softmax_logit = [&](acc_t zc, int c, const ClassValues<V, acc_t>& run, int i) -> acc_t {
      if (c == y_ref_c) return ref_logit;
      return p.adjustment ? math::adjusted_logit(zc, run.adjustment[i]) : zc;
    };
    auto scalar_element = [&](int c, math::SoftmaxState<acc_t>& state, acc_t& offset_sum, acc_t& weight_sum) {
      ClassValues<V, acc_t> run;
      run.load(p.adjustment, smoothing_weight, c, 1);
      const acc_t a[1] = {softmax_logit(static_cast<acc_t>(gpu::load(z + c)), c, run, 0)};
      const acc_t w[1] = {smoothing_weight ? run.weight[0] : acc_t(1)};
      const bool valid[1] = {true};
      merge_mixed_chunk(a, w, valid, ref_logit, p.any_smoothing, state, offset_sum, weight_sum);
    };

    math::SoftmaxState<acc_t> state = math::empty_softmax_state<acc_t>();
    acc_t offset_sum = acc_t(0), weight_sum = acc_t(0);
    const RowSplit split = split_row(z, C);
    if (lane < split.head) scalar_element(lane, state, offset_sum, weight_sum);
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) x[u] = gpu::load_vector<V>(z + split.head + v * V);
      }
      acc_t a[U * V], w[U * V];
      bool valid[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        const bool in_row = v < split.vectors;
        const int c0 = split.head + v * V;
        ClassValues<V, acc_t> run;
        if (in_row) run.load(p.adjustment, smoothing_weight, c0, V);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          valid[u * V + i] = in_row;
          a[u * V + i] = in_row ? softmax_logit(static_cast<acc_t>(x[u].v[i]), c0 + i, run, i)
                                : math::negative_infinity<acc_t>();
          w[u * V + i] = (in_row && smoothing_weight) ? run.weight[i] : acc_t(1);
        }
      }
      merge_mixed_chunk(a, w, valid, ref_logit, p.any_smoothing, state, offset_sum, weight_sum);
    }
    if (split.tail_begin + lane < C) scalar_element(split.tail_begin + lane, state, offset_sum, weight_sum);
    cross_entropy_kernels::group_reduce<GROUP>(state, offset_sum, weight_sum, scratch_state, scratch_a, scratch_b);
    if (lane == 0) {
      finish_mixed_row(p, row, state, offset_sum, weight_sum, ref, ya, yb, active_a, active_b,
                       [&](int64_t y) { return term_of(z, p, y); }, row_loss, row_stats, sums);
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(sums.loss_a, sums.weight_a, partials, partial_loss_a, partial_weight_a);
    gpu_reduce::write_block_partials<GROUP>(sums.loss_b, sums.weight_b, partials + 2 * gridDim.x, partial_loss_b,
                                            partial_weight_b);
    gpu_reduce::finish_in_last_block(finish.ticket, [&](auto& scratch) {
      mixed_finish(partials, gridDim.x, finish.mean, p.target_b != nullptr, finish.loss, finish.denominator, scratch);
    });
  }
}

// ------------------------------------------------------------------------------ tiled rows
// Rows of C <= 32 classes (both ops): a block's 32 x tile_rows_per_group(C) rows, one flat span of
// the contiguous [N, C] logits (and of the probability targets), through __shared__ tiles in 16-byte
// vectors, as the hard-target kernels do (gpu_reduce.cuh, tiled rows). Streamed one by one these
// rows read at 0.23 / 0.32 (mixed) and 0.45 / 0.43 (probability) sector efficiency at 1024 x 10
// bf16 in the emulator. Lane l owns classes l + 8 k of every row and loads their per-class values
// once per kernel.
using gpu_reduce::kClassesPerLane;
using gpu_reduce::kTileElements;
using gpu_reduce::kTileGroups;

// The per-class values (each pointer nullable: not read) of the classes lane + 8 k that are < C.
template <typename acc_t>
__device__ __forceinline__ ClassValues<kClassesPerLane, acc_t> lane_class_values(const acc_t* adjustment,
                                                                                 const acc_t* weight, int lane,
                                                                                 int C) {
  ClassValues<kClassesPerLane, acc_t> run;
#pragma unroll
  for (int k = 0; k < kClassesPerLane; ++k) {
    const int c = lane + k * gpu_reduce::kSmallGroup;
    if (c >= C) continue;
    if (adjustment) run.adjustment[k] = gpu::load(adjustment + c);
    if (weight) run.weight[k] = gpu::load(weight + c);
  }
  return run;
}

// The target term of class y from a tile row (term_of from global memory).
template <typename acc_t, typename Tile>
__device__ __forceinline__ math::TargetTerm<acc_t> tile_term(const Tile& tile, int row_base,
                                                             const MixedParams<acc_t>& p, int64_t y) {
  const acc_t z = tile[row_base + static_cast<int>(y)];
  const acc_t a = p.adjustment ? math::adjusted_logit(z, gpu::load(p.adjustment + y)) : z;
  return {p.target_margin ? a - gpu::load(p.target_margin + y) : a, p.weight ? gpu::load(p.weight + y) : acc_t(1),
          p.class_smoothing ? gpu::load(p.class_smoothing + y) : p.smoothing};
}

template <typename scalar_t>
__device__ __forceinline__ void mixed_forward_tiled_rows(
    const scalar_t* __restrict__ logits, const MixedParams<at::opmath_type<scalar_t>>& p,
    at::opmath_type<scalar_t>* __restrict__ row_loss, at::opmath_type<scalar_t>* __restrict__ row_stats,
    double* __restrict__ partials, const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, kTileElements);
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, 1);  // group_reduce: block groups only
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, 1);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, 1);
  LTFAST_SHARED_ARRAY(double, partial_loss_a, kTileGroups);
  LTFAST_SHARED_ARRAY(double, partial_weight_a, kTileGroups);
  LTFAST_SHARED_ARRAY(double, partial_loss_b, kTileGroups);
  LTFAST_SHARED_ARRAY(double, partial_weight_b, kTileGroups);
  MixedSums sums;
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int tile_rows = kTileGroups * gpu_reduce::tile_rows_per_group(C);
  // The class weights are read in the row pass only for the smoothing term's sums.
  const acc_t* smoothing_weight = p.any_smoothing ? p.weight : nullptr;
  const ClassValues<K, acc_t> run = lane_class_values(p.adjustment, smoothing_weight, lane, C);

  // The tile loop's bounds are uniform over the block: every thread reaches each __syncthreads.
  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < p.num_rows;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(p.num_rows - first_row < tile_rows ? p.num_rows - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * p.num_classes, rows * C, tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int row_base = tile_row * C;
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
      CUDA_KERNEL_ASSERT((!active_a || (ya >= 0 && ya < C)) &&
                         "ltfast: target out of range [0, C) and not ignore_index");
      CUDA_KERNEL_ASSERT((!active_b || (yb >= 0 && yb < C)) &&
                         "ltfast: target_b out of range [0, C) and not ignore_index");
      const int64_t y_ref = active_a ? ya : yb;
      const auto ref = tile_term(tile, row_base, p, y_ref);
      acc_t a[K], w[K];
      bool valid[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        valid[k] = c < C;
        // the reference term's logit (with its margin) at y_ref, else z + adjustment
        a[k] = !valid[k] ? math::negative_infinity<acc_t>()
               : c == y_ref ? ref.logit
               : p.adjustment ? math::adjusted_logit(static_cast<acc_t>(tile[row_base + c]), run.adjustment[k])
                              : static_cast<acc_t>(tile[row_base + c]);
        w[k] = (valid[k] && smoothing_weight) ? run.weight[k] : acc_t(1);
      }
      math::SoftmaxState<acc_t> state = math::empty_softmax_state<acc_t>();
      acc_t offset_sum = acc_t(0), weight_sum = acc_t(0);
      merge_mixed_chunk(a, w, valid, ref.logit, p.any_smoothing, state, offset_sum, weight_sum);
      cross_entropy_kernels::group_reduce<GROUP>(state, offset_sum, weight_sum, scratch_state, scratch_a, scratch_b);
      if (lane == 0) {
        finish_mixed_row(p, row, state, offset_sum, weight_sum, ref, ya, yb, active_a, active_b,
                         [&](int64_t y) { return tile_term(tile, row_base, p, y); }, row_loss, row_stats, sums);
      }
    }
    __syncthreads();  // the next tile overwrites the tile
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(sums.loss_a, sums.weight_a, partials, partial_loss_a, partial_weight_a);
    gpu_reduce::write_block_partials<GROUP>(sums.loss_b, sums.weight_b, partials + 2 * gridDim.x, partial_loss_b,
                                            partial_weight_b);
    gpu_reduce::finish_in_last_block(finish.ticket, [&](auto& scratch) {
      mixed_finish(partials, gridDim.x, finish.mean, p.target_b != nullptr, finish.loss, finish.denominator, scratch);
    });
  }
}

template <typename scalar_t>
__device__ __forceinline__ void mixed_backward_tiled_rows(
    const scalar_t* __restrict__ logits, const MixedParams<at::opmath_type<scalar_t>>& p,
    const at::opmath_type<scalar_t>* __restrict__ row_stats, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
    bool per_row_grad, const at::opmath_type<scalar_t>* __restrict__ denominators, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, grad_tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, scratch_sum, 1);  // group_sum: block groups only
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int tile_rows = kTileGroups * gpu_reduce::tile_rows_per_group(C);
  const bool sum_weights = p.any_smoothing && p.weight != nullptr;
  const acc_t shared_a = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominators);
  const acc_t shared_b = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominators + 1);
  const ClassValues<K, acc_t> run = lane_class_values(p.adjustment, p.weight, lane, C);

  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < p.num_rows;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(p.num_rows - first_row < tile_rows ? p.num_rows - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * p.num_classes, rows * C, tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int row_base = tile_row * C;
      auto fill = [&](acc_t value) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (lane + k * GROUP < C) grad_tile[row_base + lane + k * GROUP] = value;
        }
      };
      const int64_t ya = gpu::load(p.target_a + row);
      const int64_t yb = p.target_b ? gpu::load(p.target_b + row) : p.ignore_index;
      const bool active_a = ya != p.ignore_index, active_b = yb != p.ignore_index;
      if (!active_a && !active_b) {
        fill(acc_t(0));
        continue;
      }
      CUDA_KERNEL_ASSERT((!active_a || (ya >= 0 && ya < C)) &&
                         "ltfast: target out of range [0, C) and not ignore_index");
      CUDA_KERNEL_ASSERT((!active_b || (yb >= 0 && yb < C)) &&
                         "ltfast: target_b out of range [0, C) and not ignore_index");
      const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + (p.num_rows + row))};
      if (math::row_is_nan(stats)) {  // row-uniform, as in the streamed kernel
        fill(stats.log_sum);
        continue;
      }
      auto cfg = p.cfg;
      if (sum_weights) cfg.total_weight = class_weight_total<GROUP>(p, lane, scratch_sum);
      const acc_t lam = mix_of(p, row);
      const acc_t upstream = per_row_grad ? gpu::load(grad_loss + row) : acc_t(1);
      const auto row_gradient = mixed_row_gradient(
          cfg, stats, upstream * lam * (per_row_grad ? acc_t(1) : shared_a),
          upstream * (acc_t(1) - lam) * (per_row_grad ? acc_t(1) : shared_b), ya, yb, active_a, active_b,
          [&](int64_t y) { return tile_term(tile, row_base, p, y); });
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        if (c < C) grad_tile[row_base + c] = row_gradient.at(p, static_cast<acc_t>(tile[row_base + c]), c, run, k);
      }
    }
    __syncthreads();
    gpu_row_stream::store_tile_to_span<kBlockThreads, acc_t>(grad_tile, rows * C,
                                                             grad_logits + first_row * p.num_classes);
    __syncthreads();  // the next tile overwrites both tiles
  }
}

// ------------------------------------------------------------------------------ mixed kernels
// Tiles for rows of <= 32 classes, streamed rows otherwise (with_row_group picks GROUP from C).
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    mixed_forward_kernel(const scalar_t* __restrict__ logits, MixedParams<at::opmath_type<scalar_t>> p,
                         at::opmath_type<scalar_t>* __restrict__ row_loss, at::opmath_type<scalar_t>* __restrict__ row_stats,
                         double* __restrict__ partials, gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    mixed_forward_tiled_rows(logits, p, row_loss, row_stats, partials, finish);
  } else {
    mixed_forward_streamed_rows<scalar_t, GROUP>(logits, p, row_loss, row_stats, partials, finish);
  }
}

// One block finishes: loss = S_a / D_a + S_b / D_b (mean) or S_a + S_b (sum) from the partials [4,
// num_blocks]; writes the two denominators (term b: 1 without target_b).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mixed_finish_kernel(const double* __restrict__ partials, int64_t num_blocks, bool mean, bool has_target_b,
                        acc_t* __restrict__ loss, acc_t* __restrict__ denominators) {
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  mixed_finish(partials, num_blocks, mean, has_target_b, loss, denominators, scratch);
}

template <typename scalar_t, int GROUP>
__device__ __forceinline__ void mixed_backward_streamed_rows(
    const scalar_t* __restrict__ logits, const MixedParams<at::opmath_type<scalar_t>>& p,
    const at::opmath_type<scalar_t>* __restrict__ row_stats, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
    bool per_row_grad, const at::opmath_type<scalar_t>* __restrict__ denominators, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(acc_t, scratch_sum, kWarpsPerBlock);
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const bool sum_weights = p.any_smoothing && p.weight != nullptr;
  const acc_t shared_a = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominators);
  const acc_t shared_b = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominators + 1);
  // Rows of the logits and of the gradient share their split when their bases are equally far from
  // a 16-byte boundary (both have C elements per row): the gradient is then stored in vectors; else
  // (a logits view at an odd storage offset) element-wise, as in the hard-target backward.
  const bool vector_stores = gpu_row_stream::same_split(logits, grad_logits);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g = grad_logits + row * p.num_classes;
    const int64_t ya = gpu::load(p.target_a + row);
    const int64_t yb = p.target_b ? gpu::load(p.target_b + row) : p.ignore_index;
    const bool active_a = ya != p.ignore_index, active_b = yb != p.ignore_index;
    if (!active_a && !active_b) {
      fill_row<GROUP>(g, C, lane, scalar_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT((!active_a || (ya >= 0 && ya < C)) && "ltfast: target out of range [0, C) and not ignore_index");
    CUDA_KERNEL_ASSERT((!active_b || (yb >= 0 && yb < C)) &&
                       "ltfast: target_b out of range [0, C) and not ignore_index");
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + (p.num_rows + row))};
    if (math::row_is_nan(stats)) {  // row-uniform branch, as in the hard-target kernel
      fill_row<GROUP>(g, C, lane, static_cast<scalar_t>(stats.log_sum));
      continue;
    }
    const scalar_t* z = logits + row * p.num_classes;
    auto cfg = p.cfg;
    if (sum_weights) cfg.total_weight = class_weight_total<GROUP>(p, lane, scratch_sum);
    const acc_t lam = mix_of(p, row);
    const acc_t upstream = per_row_grad ? gpu::load(grad_loss + row) : acc_t(1);
    const auto row_gradient = mixed_row_gradient(
        cfg, stats, upstream * lam * (per_row_grad ? acc_t(1) : shared_a),
        upstream * (acc_t(1) - lam) * (per_row_grad ? acc_t(1) : shared_b), ya, yb, active_a, active_b,
        [&](int64_t y) { return term_of(z, p, y); });
    auto gradient = [&](acc_t zc, int c, const ClassValues<V, acc_t>& run, int i) -> acc_t {
      return row_gradient.at(p, zc, c, run, i);
    };
    auto scalar_gradient = [&](int c) -> acc_t {
      ClassValues<V, acc_t> run;
      run.load(p.adjustment, p.weight, c, 1);
      return gradient(static_cast<acc_t>(gpu::load(z + c)), c, run, 0);
    };
    const RowSplit split = split_row(z, C);
    if (lane < split.head) gpu::store(g + lane, scalar_gradient(lane));
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) x[u] = gpu::load_vector<V>(z + split.head + v * V);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) {
          const int c0 = split.head + v * V;
          ClassValues<V, acc_t> run;
          run.load(p.adjustment, p.weight, c0, V);
          gpu::Vector<scalar_t, V> out;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            out.v[i] = static_cast<scalar_t>(gradient(static_cast<acc_t>(x[u].v[i]), c0 + i, run, i));
          }
          if (vector_stores) {
            gpu::store_vector<V>(g + c0, out);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) gpu::store(g + c0 + i, out.v[i]);
          }
        }
      }
    }
    if (split.tail_begin + lane < C) gpu::store(g + split.tail_begin + lane, scalar_gradient(split.tail_begin + lane));
  }
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    mixed_backward_kernel(const scalar_t* __restrict__ logits, MixedParams<at::opmath_type<scalar_t>> p,
                          const at::opmath_type<scalar_t>* __restrict__ row_stats,
                          const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                          const at::opmath_type<scalar_t>* __restrict__ denominators,
                          scalar_t* __restrict__ grad_logits) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    mixed_backward_tiled_rows(logits, p, row_stats, grad_loss, per_row_grad, denominators, grad_logits);
  } else {
    mixed_backward_streamed_rows<scalar_t, GROUP>(logits, p, row_stats, grad_loss, per_row_grad, denominators,
                                                  grad_logits);
  }
}

// Blocks of the row kernels of both ops (rows of <= 32 classes tiled, gpu_reduce.cuh).
inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes) {
  return gpu_reduce::tiled_row_blocks(num_rows, num_classes);
}

// The row kernels index within a row in 32 bits.
inline void check_class_count(int64_t num_classes) {
  if (!gpu_row_stream::fits_row_index(num_classes)) {
    throw std::invalid_argument("ltfast soft-target cross-entropy (CUDA): logits have " + std::to_string(num_classes) +
                                " classes; expected at most 2^31 - 1");
  }
}

// Forward: row_loss [N] ('none', else nullptr), row_stats [2, N]; with `partials` (double
// [4, row_kernel_blocks], zeros when N = 0) the finish writes loss and denominators [2]: in the row
// kernel's last block when `ticket` (gpu::ticket_counter) is given, else (CUDA graph capture, or
// N = 0 alone) the finish kernel.
template <typename scalar_t>
void launch_mixed_forward(const scalar_t* logits, const MixedParams<at::opmath_type<scalar_t>>& p,
                          at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats, double* partials,
                          bool mean, at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominators,
                          unsigned int* ticket, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.num_rows > 0) {
    check_class_count(p.num_classes);
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("soft_targets mixed_forward_kernel", &mixed_forward_kernel<scalar_t, kGroup>,
                  row_kernel_blocks(p.num_rows, p.num_classes), kBlockThreads, stream, logits, p, row_loss, row_stats,
                  partials, gpu_reduce::FinishArgs<acc_t>{partials ? ticket : nullptr, mean, loss, denominators});
    });
  }
  if (partials != nullptr && (p.num_rows == 0 || ticket == nullptr)) {
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
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("soft_targets mixed_backward_kernel", &mixed_backward_kernel<scalar_t, kGroup>,
                row_kernel_blocks(p.num_rows, p.num_classes), kBlockThreads, stream, logits, p, row_stats, grad_loss,
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

// Merges K (logit, weighted target) pairs (invalid ones: padding of -inf and 0) into the row's
// probability state with one rescaling exponential.
template <int K, typename acc_t>
__device__ __forceinline__ void merge_probability_chunk(const acc_t (&a)[K], const acc_t (&wq)[K],
                                                        const bool (&valid)[K], math::ProbabilityState<acc_t>& state) {
  math::ProbabilityState<acc_t> chunk{a[0], acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
  for (int k = 1; k < K; ++k) chunk.max = a[k] > chunk.max ? a[k] : chunk.max;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    chunk.sum += math::exp_shifted(a[k], chunk.max);
    if (valid[k]) {  // padding adds nothing (0 * -inf would be NaN)
      chunk.mass += wq[k];
      chunk.offset += math::probability_offset(wq[k], a[k], chunk.max);
    }
  }
  state = math::merge_probability_states(state, chunk);
}

// Whether the target rows share the logits rows' split (same dtype, bases equally far from a
// 16-byte boundary): then each logits vector has its target in one 16-byte vector.
template <typename scalar_t, typename target_t>
__device__ __forceinline__ bool target_shares_split(const scalar_t* logits, const target_t* target) {
  if constexpr (std::is_same_v<scalar_t, target_t>) {
    return gpu_row_stream::same_split(logits, target);
  } else {
    return false;
  }
}

// The target row's V elements from c0 next to a logits vector: one 16-byte vector when the target
// rows share the logits' split (same dtype, bases equally far from a 16-byte boundary), else the
// widest loads the address allows (gpu_row_stream::load_run: a float target of bf16 logits is two
// 16-byte vectors when aligned).
template <int V, typename target_t>
__device__ __forceinline__ void load_target_run(const target_t* t, bool target_vectors, int c0, target_t (&out)[V]) {
  if constexpr (sizeof(target_t) * V == 16) {
    if (target_vectors) {
      const gpu::Vector<target_t, V> w = gpu::load_vector<V>(t + c0);
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = w.v[i];
      return;
    }
  }
  gpu_row_stream::load_run<V>(t + c0, out);
}

template <typename scalar_t, typename target_t, int GROUP>
__device__ __forceinline__ void probability_forward_streamed_rows(
    const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
    const ProbabilityParams<at::opmath_type<scalar_t>>& p, at::opmath_type<scalar_t>* __restrict__ row_loss,
    at::opmath_type<scalar_t>* __restrict__ row_stats, double* __restrict__ partials,
    const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::ProbabilityState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_rows, kRowsPerBlock);
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  double group_loss = 0.0, group_rows = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const bool target_vectors = target_shares_split(logits, target);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const scalar_t* z = logits + row * p.num_classes;
    const target_t* t = target + row * p.num_classes;
    auto state = math::empty_probability_state<acc_t>();
    // The adjusted logit and the weighted target of class c (per-class values in `run` at i).
    auto adjusted = [&](acc_t zc, const ClassValues<V, acc_t>& run, int i) -> acc_t {
      return p.adjustment ? math::adjusted_logit(zc, run.adjustment[i]) : zc;
    };
    auto weighted = [&](acc_t tc, const ClassValues<V, acc_t>& run, int i) -> acc_t {
      return math::weighted_probability(tc, p.weight ? run.weight[i] : acc_t(1), p.one_minus_eps, p.eps_over_c);
    };
    auto scalar_element = [&](int c) {
      ClassValues<V, acc_t> run;
      run.load(p.adjustment, p.weight, c, 1);
      const acc_t a[1] = {adjusted(static_cast<acc_t>(gpu::load(z + c)), run, 0)};
      const acc_t wq[1] = {weighted(static_cast<acc_t>(gpu::load(t + c)), run, 0)};
      const bool valid[1] = {true};
      merge_probability_chunk(a, wq, valid, state);
    };
    const RowSplit split = split_row(z, C);
    if (lane < split.head) scalar_element(lane);
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
      target_t q[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) {
          x[u] = gpu::load_vector<V>(z + split.head + v * V);
          load_target_run<V>(t, target_vectors, split.head + v * V, q[u]);
        }
      }
      acc_t a[U * V], wq[U * V];
      bool valid[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        const bool in_row = v < split.vectors;
        ClassValues<V, acc_t> run;
        if (in_row) run.load(p.adjustment, p.weight, split.head + v * V, V);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          valid[u * V + i] = in_row;
          a[u * V + i] = in_row ? adjusted(static_cast<acc_t>(x[u].v[i]), run, i) : math::negative_infinity<acc_t>();
          wq[u * V + i] = in_row ? weighted(static_cast<acc_t>(q[u][i]), run, i) : acc_t(0);
        }
      }
      merge_probability_chunk(a, wq, valid, state);
    }
    if (split.tail_begin + lane < C) scalar_element(split.tail_begin + lane);
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
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t, typename target_t, int GROUP>
__device__ __forceinline__ void probability_backward_streamed_rows(
    const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
    const ProbabilityParams<at::opmath_type<scalar_t>>& p, const at::opmath_type<scalar_t>* __restrict__ row_stats,
    const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
    const at::opmath_type<scalar_t>* __restrict__ denominator, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);
  // The split of the logits rows serves the gradient and the target rows when their bases are
  // equally far from a 16-byte boundary (else: element stores, narrower target loads).
  const bool vector_stores = gpu_row_stream::same_split(logits, grad_logits);
  const bool target_vectors = target_shares_split(logits, target);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g = grad_logits + row * p.num_classes;
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + (p.num_rows + row))};
    if (math::row_is_nan(stats)) {
      fill_row<GROUP>(g, C, lane, static_cast<scalar_t>(stats.log_sum));
      continue;
    }
    const scalar_t* z = logits + row * p.num_classes;
    const target_t* t = target + row * p.num_classes;
    const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
    const acc_t mass_scale = scale * gpu::load(row_stats + (2 * p.num_rows + row));
    // d loss / d z_c of one element from its logit and target (per-class values in `run` at i).
    auto gradient = [&](acc_t zc, acc_t tc, const ClassValues<V, acc_t>& run, int i) -> acc_t {
      const acc_t a = p.adjustment ? math::adjusted_logit(zc, run.adjustment[i]) : zc;
      const acc_t wq =
          math::weighted_probability(tc, p.weight ? run.weight[i] : acc_t(1), p.one_minus_eps, p.eps_over_c);
      return math::softmax_probability(a, stats) * mass_scale - wq * scale;
    };
    auto scalar_gradient = [&](int c) -> acc_t {
      ClassValues<V, acc_t> run;
      run.load(p.adjustment, p.weight, c, 1);
      return gradient(static_cast<acc_t>(gpu::load(z + c)), static_cast<acc_t>(gpu::load(t + c)), run, 0);
    };
    const RowSplit split = split_row(z, C);
    if (lane < split.head) gpu::store(g + lane, scalar_gradient(lane));
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
      target_t q[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) {
          x[u] = gpu::load_vector<V>(z + split.head + v * V);
          load_target_run<V>(t, target_vectors, split.head + v * V, q[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) {
          const int c0 = split.head + v * V;
          ClassValues<V, acc_t> run;
          run.load(p.adjustment, p.weight, c0, V);
          gpu::Vector<scalar_t, V> out;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            out.v[i] =
                static_cast<scalar_t>(gradient(static_cast<acc_t>(x[u].v[i]), static_cast<acc_t>(q[u][i]), run, i));
          }
          if (vector_stores) {
            gpu::store_vector<V>(g + c0, out);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) gpu::store(g + c0 + i, out.v[i]);
          }
        }
      }
    }
    if (split.tail_begin + lane < C) gpu::store(g + split.tail_begin + lane, scalar_gradient(split.tail_begin + lane));
  }
}

// ------------------------------------------------------------------------------ probability: tiled rows
template <typename scalar_t, typename target_t>
__device__ __forceinline__ void probability_forward_tiled_rows(
    const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
    const ProbabilityParams<at::opmath_type<scalar_t>>& p, at::opmath_type<scalar_t>* __restrict__ row_loss,
    at::opmath_type<scalar_t>* __restrict__ row_stats, double* __restrict__ partials,
    const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, target_tile, kTileElements);
  LTFAST_SHARED_ARRAY(math::ProbabilityState<acc_t>, scratch_state, 1);  // block groups only
  LTFAST_SHARED_ARRAY(double, partial_loss, kTileGroups);
  LTFAST_SHARED_ARRAY(double, partial_rows, kTileGroups);
  double group_loss = 0.0, group_rows = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int tile_rows = kTileGroups * gpu_reduce::tile_rows_per_group(C);
  const ClassValues<K, acc_t> run = lane_class_values(p.adjustment, p.weight, lane, C);

  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < p.num_rows;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(p.num_rows - first_row < tile_rows ? p.num_rows - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * p.num_classes, rows * C, tile);
    gpu_row_stream::load_second_span_to_tile<kBlockThreads, acc_t>(target + first_row * p.num_classes, rows * C,
                                                                   target_tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int row_base = tile_row * C;
      acc_t a[K], wq[K];
      bool valid[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        valid[k] = c < C;
        const acc_t zc = valid[k] ? static_cast<acc_t>(tile[row_base + c]) : acc_t(0);
        a[k] = !valid[k] ? math::negative_infinity<acc_t>()
                         : (p.adjustment ? math::adjusted_logit(zc, run.adjustment[k]) : zc);
        wq[k] = !valid[k] ? acc_t(0)
                          : math::weighted_probability(static_cast<acc_t>(target_tile[row_base + c]),
                                                       p.weight ? run.weight[k] : acc_t(1), p.one_minus_eps,
                                                       p.eps_over_c);
      }
      auto state = math::empty_probability_state<acc_t>();
      merge_probability_chunk(a, wq, valid, state);
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
    __syncthreads();  // the next tile overwrites both tiles
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_rows, partials, partial_loss, partial_rows);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t, typename target_t>
__device__ __forceinline__ void probability_backward_tiled_rows(
    const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
    const ProbabilityParams<at::opmath_type<scalar_t>>& p, const at::opmath_type<scalar_t>* __restrict__ row_stats,
    const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
    const at::opmath_type<scalar_t>* __restrict__ denominator, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, target_tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, grad_tile, kTileElements);
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int tile_rows = kTileGroups * gpu_reduce::tile_rows_per_group(C);
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);
  const ClassValues<K, acc_t> run = lane_class_values(p.adjustment, p.weight, lane, C);

  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < p.num_rows;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(p.num_rows - first_row < tile_rows ? p.num_rows - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * p.num_classes, rows * C, tile);
    gpu_row_stream::load_second_span_to_tile<kBlockThreads, acc_t>(target + first_row * p.num_classes, rows * C,
                                                                   target_tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int row_base = tile_row * C;
      const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + (p.num_rows + row))};
      const bool nan_row = math::row_is_nan(stats);
      const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
      const acc_t mass_scale = nan_row ? acc_t(0) : scale * gpu::load(row_stats + (2 * p.num_rows + row));
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        if (c >= C) continue;
        if (nan_row) {  // every gradient of the row is NaN, as in the streamed kernel
          grad_tile[row_base + c] = stats.log_sum;
          continue;
        }
        const acc_t zc = tile[row_base + c];
        const acc_t a = p.adjustment ? math::adjusted_logit(zc, run.adjustment[k]) : zc;
        const acc_t wq = math::weighted_probability(static_cast<acc_t>(target_tile[row_base + c]),
                                                    p.weight ? run.weight[k] : acc_t(1), p.one_minus_eps,
                                                    p.eps_over_c);
        grad_tile[row_base + c] = math::softmax_probability(a, stats) * mass_scale - wq * scale;
      }
    }
    __syncthreads();
    gpu_row_stream::store_tile_to_span<kBlockThreads, acc_t>(grad_tile, rows * C,
                                                             grad_logits + first_row * p.num_classes);
    __syncthreads();  // the next tile overwrites the tiles
  }
}

// ------------------------------------------------------------------------------ probability kernels
// Tiles for rows of <= 32 classes, streamed rows otherwise (with_row_group picks GROUP from C).
template <typename scalar_t, typename target_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    probability_forward_kernel(const scalar_t* __restrict__ logits, const target_t* __restrict__ target,
                               ProbabilityParams<at::opmath_type<scalar_t>> p,
                               at::opmath_type<scalar_t>* __restrict__ row_loss,
                               at::opmath_type<scalar_t>* __restrict__ row_stats, double* __restrict__ partials,
                               gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    probability_forward_tiled_rows(logits, target, p, row_loss, row_stats, partials, finish);
  } else {
    probability_forward_streamed_rows<scalar_t, target_t, GROUP>(logits, target, p, row_loss, row_stats, partials,
                                                                 finish);
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
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    probability_backward_tiled_rows(logits, target, p, row_stats, grad_loss, per_row_grad, denominator, grad_logits);
  } else {
    probability_backward_streamed_rows<scalar_t, target_t, GROUP>(logits, target, p, row_stats, grad_loss,
                                                                  per_row_grad, denominator, grad_logits);
  }
}

template <typename scalar_t, typename target_t>
void launch_probability_forward(const scalar_t* logits, const target_t* target,
                                const ProbabilityParams<at::opmath_type<scalar_t>>& p,
                                at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                                double* partials, bool mean, at::opmath_type<scalar_t>* loss,
                                at::opmath_type<scalar_t>* denominator, unsigned int* ticket, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.num_rows > 0) {
    check_class_count(p.num_classes);
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("soft_targets probability_forward_kernel", &probability_forward_kernel<scalar_t, target_t, kGroup>,
                  row_kernel_blocks(p.num_rows, p.num_classes), kBlockThreads, stream, logits, target, p, row_loss,
                  row_stats, partials, gpu_reduce::FinishArgs<acc_t>{partials ? ticket : nullptr, mean, loss, denominator});
    });
  }
  if (partials != nullptr && (p.num_rows == 0 || ticket == nullptr)) {
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
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("soft_targets probability_backward_kernel", &probability_backward_kernel<scalar_t, target_t, kGroup>,
                row_kernel_blocks(p.num_rows, p.num_classes), kBlockThreads, stream, logits, target, p, row_stats,
                grad_loss, per_row_grad, denominator, grad_logits);
  });
}

}  // namespace soft_target_kernels
}  // namespace ltfast
