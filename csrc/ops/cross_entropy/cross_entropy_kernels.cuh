// CUDA kernels of the softmax cross-entropy family and their launch plan, with no torch glue:
// compiled by nvcc into ltfast._C (through cross_entropy_cuda.cu) and by the host compiler into
// the SIMT emulator's test library. The arithmetic is csrc/common/softmax_math.h, shared with the
// CPU kernels; this file holds only the parallel decomposition.
//
// A "group" of threads owns a row (gpu_reduce::with_row_group): 8 lanes for C <= 32, a warp for
// C <= 1024, the whole block otherwise. Forward streams the row once in 16-byte vectors (a scalar
// head and tail around them: split_row) with an online softmax (the row max and exp-sum merged
// once per 16 elements), reduces the group's partial states with shuffles and, for block groups, a
// fixed-order pass over shared memory. Rows of C <= 32 are too short to stream one by one: a block
// copies 32 x floor(32 / C) of them, one flat span, through a shared-memory tile ("tiled rows"
// below). For 'mean'/'sum' each block also writes its rows' loss and weight sums (fixed order), and
// the block that takes the last ticket adds those partials in a fixed order
// (gpu_reduce::finish_in_last_block): one launch, deterministic, no serial pass over N in one block
// (two launches, row kernel then finish_mean_kernel, under CUDA graph capture, which has no ticket
// counter: gpu_glue.h). Backward streams the row once more (tiled rows: the tile) and writes the
// gradient once. No host synchronisation: grad_output and the mean's
// denominator are read from device memory by the kernels.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/gpu_row_stream.cuh"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace cross_entropy_kernels {

using gpu_reduce::kBlockThreads;
using gpu_row_stream::fill_row;
using gpu_row_stream::kVectorElements;
using gpu_row_stream::kVectorUnroll;
using gpu_row_stream::RowSplit;
using gpu_row_stream::split_row;
constexpr int kWarpsPerBlock = kBlockThreads / 32;
// Elements each thread of the element-wise (scalar) loops of soft_targets_kernels.cuh keeps in
// flight per iteration: 4 independent loads hide DRAM latency while the online-softmax merge costs
// one extra exp per 4 elements. The row kernels here use 16-byte vectors (gpu_row_stream.cuh).
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

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_adjusted(const scalar_t* row, const KernelParams<acc_t>& p,
                                               int64_t c) {
  const acc_t z = static_cast<acc_t>(gpu::load(row + c));
  return p.adjustment ? math::adjusted_logit(z, gpu::load(p.adjustment + c)) : z;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t target_logit_of(const scalar_t* row, const KernelParams<acc_t>& p,
                                                 int64_t y) {
  const acc_t a = load_adjusted(row, p, y);
  return p.target_margin ? a - gpu::load(p.target_margin + y) : a;
}

// ------------------------------------------------------------------------------ inner loops
// What the per-element work of a call needs, fixed at compile time so that the hot loops carry
// none of the unused options (inner_loop_of picks one per call):
enum class InnerLoop : int {
  kAdjusted = 0,  // an optional adjustment only: CE, balanced softmax, logit adjustment, focal
  kTail = 1,      // SEQL: tail-mask drops (and an optional adjustment)
  kGeneral = 2,   // target margin, class weights or label smoothing: every option checked at run time
};

template <typename acc_t>
InnerLoop inner_loop_of(const KernelParams<acc_t>& p) {
  if (p.target_margin != nullptr || p.weight != nullptr || p.cfg.label_smoothing != acc_t(0)) {
    return InnerLoop::kGeneral;
  }
  return p.tail != nullptr ? InnerLoop::kTail : InnerLoop::kAdjusted;
}

template <typename F>
void with_inner_loop(InnerLoop inner, F&& f) {
  switch (inner) {
    case InnerLoop::kAdjusted: f(std::integral_constant<InnerLoop, InnerLoop::kAdjusted>{}); break;
    case InnerLoop::kTail: f(std::integral_constant<InnerLoop, InnerLoop::kTail>{}); break;
    case InnerLoop::kGeneral: f(std::integral_constant<InnerLoop, InnerLoop::kGeneral>{}); break;
  }
}

// One row's constants for the element loops.
template <typename acc_t>
struct RowInfo {
  int y;               // the target class
  acc_t target_logit;  // adjusted, less the margin
  uint32_t row_key;    // SEQL
};

// Whether SEQL drops element c of the row (never the target), given tail[c]. `column_seed` is the
// seed word the kernel loaded once (the per-element reload of p.seed[0] was 4 loads per 4 elements).
template <InnerLoop kInner, typename acc_t>
__device__ __forceinline__ bool dropped_at(const KernelParams<acc_t>& p, const RowInfo<acc_t>& r,
                                           uint32_t column_seed, int c, uint8_t tail_c) {
  if constexpr (kInner == InnerLoop::kAdjusted) {
    return false;
  } else {
    const bool tail_on = kInner == InnerLoop::kTail || p.tail != nullptr;
    return tail_on && c != r.y && tail_c &&
           math::seql_dropped(math::seql_column_key(c, column_seed), r.row_key, p.drop_threshold);
  }
}

// The per-class values V classes from c0 need: the adjustment, the tail mask and (general loop,
// `with_weight`: the backward) the class weights, each in the widest loads its alignment allows
// (gpu_row_stream::load_run); entries of absent options are not read.
template <InnerLoop kInner, int V, typename acc_t>
struct ClassRun {
  acc_t adjustment[V];
  uint8_t tail[V];
  acc_t weight[kInner == InnerLoop::kGeneral ? V : 1];

  __device__ __forceinline__ void load(const KernelParams<acc_t>& p, int c0, int count, bool with_weight = false) {
    if (count == V) {
      if (p.adjustment) gpu_row_stream::load_run<V>(p.adjustment + c0, adjustment);
      if constexpr (kInner != InnerLoop::kAdjusted) {
        if (kInner == InnerLoop::kTail || p.tail) gpu_row_stream::load_run<V>(p.tail + c0, tail);
      }
      if constexpr (kInner == InnerLoop::kGeneral) {
        if (with_weight && p.weight) gpu_row_stream::load_run<V>(p.weight + c0, weight);
      }
    } else {  // a scalar head or tail element
      if (p.adjustment) adjustment[0] = gpu::load(p.adjustment + c0);
      if constexpr (kInner != InnerLoop::kAdjusted) {
        if (kInner == InnerLoop::kTail || p.tail) tail[0] = gpu::load(p.tail + c0);
      }
      if constexpr (kInner == InnerLoop::kGeneral) {
        if (with_weight && p.weight) weight[0] = gpu::load(p.weight + c0);
      }
    }
  }
};

// The logit the softmax sees at class c (per-class values in `run` at i): -inf when dropped, the
// target's (with its margin) at y, else z + adjustment. Without a margin the target's value is
// z_y + adjustment_y, so only the general loop compares c with y.
template <InnerLoop kInner, int V, typename acc_t>
__device__ __forceinline__ acc_t softmax_logit(const KernelParams<acc_t>& p, const RowInfo<acc_t>& r,
                                               uint32_t column_seed, acc_t z, int c,
                                               const ClassRun<kInner, V, acc_t>& run, int i) {
  if constexpr (kInner != InnerLoop::kAdjusted) {
    if (dropped_at<kInner>(p, r, column_seed, c, run.tail[i])) return math::negative_infinity<acc_t>();
  }
  if constexpr (kInner == InnerLoop::kGeneral) {
    if (c == r.y) return r.target_logit;
  }
  return p.adjustment ? math::adjusted_logit(z, run.adjustment[i]) : z;
}

// Merges K logits (classes cls, those >= C are padding of -inf) into the row's online softmax state
// with one rescaling exponential, and (general loop, label smoothing) adds the smoothing sums.
template <InnerLoop kInner, int K, typename acc_t>
__device__ __forceinline__ void accumulate_logits(const acc_t (&a)[K], const int (&cls)[K], int C,
                                                  const KernelParams<acc_t>& p, acc_t target_logit, bool smoothing,
                                                  math::SoftmaxState<acc_t>& state, acc_t& offset_sum,
                                                  acc_t& weight_sum) {
  acc_t chunk_max = a[0];
#pragma unroll
  for (int k = 1; k < K; ++k) chunk_max = a[k] > chunk_max ? a[k] : chunk_max;
  acc_t chunk_sum = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) chunk_sum += math::exp_shifted(a[k], chunk_max);
  state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{chunk_max, chunk_sum});
  if constexpr (kInner == InnerLoop::kGeneral) {
    if (smoothing) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (cls[k] < C) {
          const acc_t w = p.weight ? gpu::load(p.weight + cls[k]) : acc_t(1);
          offset_sum += w * (a[k] - target_logit);
          weight_sum += w;
        }
      }
    }
  }
}

// The loss configuration the gradient of a row uses: with label smoothing and class weights, the
// total weight W = sum_c w_c, summed from the [C] vector (L2-resident) in the backward's lane order,
// so that the forward's gradient pass and the backward get the same W bit for bit (the forward's own
// W, summed in its vector order, may differ in the last bit). Every lane of the group must call it.
template <int GROUP, InnerLoop kInner, typename acc_t, typename StateScratch, typename SumScratch>
__device__ __forceinline__ math::CrossEntropyConfig<acc_t> gradient_config(const KernelParams<acc_t>& p, int lane,
                                                                           StateScratch& scratch_state,
                                                                           SumScratch& scratch_a,
                                                                           SumScratch& scratch_b) {
  auto cfg = p.cfg;
  if constexpr (kInner == InnerLoop::kGeneral) {
    if (p.cfg.label_smoothing != acc_t(0) && p.weight != nullptr) {
      math::SoftmaxState<acc_t> unused = math::empty_softmax_state<acc_t>();
      acc_t weight_sum = acc_t(0), unused_sum = acc_t(0);
      for (int c = lane; c < static_cast<int>(p.num_classes); c += GROUP) weight_sum += gpu::load(p.weight + c);
      group_reduce<GROUP>(unused, weight_sum, unused_sum, scratch_state, scratch_a, scratch_b);
      cfg.total_weight = weight_sum;
    }
  }
  return cfg;
}

// d loss / d z_c of one element z_c of a row (per-class values in `run` at i): every kernel that writes
// a cross-entropy gradient computes it here, so that they agree bit for bit.
template <InnerLoop kInner, int V, typename acc_t>
__device__ __forceinline__ acc_t gradient_at(const KernelParams<acc_t>& p, const RowInfo<acc_t>& r,
                                             const math::RowLogSumExp<acc_t>& stats,
                                             const math::RowGradientCoefficients<acc_t>& coef, uint32_t column_seed,
                                             acc_t zc, int c, const ClassRun<kInner, V, acc_t>& run, int i) {
  acc_t a = p.adjustment ? math::adjusted_logit(zc, run.adjustment[i]) : zc;
  if constexpr (kInner == InnerLoop::kGeneral) {
    if (c == r.y) a = r.target_logit;
  }
  acc_t class_weight = acc_t(1);
  if constexpr (kInner == InnerLoop::kGeneral) {
    if (p.weight) class_weight = run.weight[i];
  }
  acc_t grad =
      math::element_gradient(math::softmax_probability(a, stats), coef.prob_coef, coef.class_coef, class_weight);
  if (c == r.y) grad -= coef.target_coef;
  if constexpr (kInner != InnerLoop::kAdjusted) {
    if (dropped_at<kInner>(p, r, column_seed, c, run.tail[i])) grad = acc_t(0);  // dropped: exactly zero
  }
  return grad;
}

// Writes row g = d loss / d z of one row z (GROUP lanes, `lane` of them), from the row's statistics
// and gradient coefficients: a scalar head, 16-byte vectors, a scalar tail (split_row), the
// gradient stored in vectors when its row splits like the logits row (`vector_stores`). Shared by the
// backward kernel and the forward's gradient pass, so that the two write bit-identical gradients.
template <int GROUP, InnerLoop kInner, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_row_gradient(const scalar_t* z, scalar_t* g, int C, int lane,
                                                   const KernelParams<acc_t>& p, const RowInfo<acc_t>& r,
                                                   const math::RowLogSumExp<acc_t>& stats,
                                                   const math::RowGradientCoefficients<acc_t>& coef,
                                                   uint32_t column_seed, bool vector_stores) {
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  auto gradient = [&](acc_t zc, int c, const ClassRun<kInner, V, acc_t>& run, int i) -> acc_t {
    return gradient_at<kInner>(p, r, stats, coef, column_seed, zc, c, run, i);
  };
  auto scalar_gradient = [&](int c) -> acc_t {
    ClassRun<kInner, V, acc_t> run;
    run.load(p, c, 1, true);
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
        ClassRun<kInner, V, acc_t> run;
        run.load(p, c0, V, true);
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
  if (split.tail_begin + lane < C) {
    const int c = split.tail_begin + lane;
    gpu::store(g + c, scalar_gradient(c));
  }
}

// ------------------------------------------------------------------------------ streamed rows
// Rows of more than 32 classes, each streamed from global memory by its group (a warp or the block).
// kWithGrad: the forward-time gradient. Once a row's statistics are reduced, the group streams the
// row again (from L1/L2: the block read it microseconds before) and writes grad_logits for an
// upstream gradient of 1, with write_row_gradient, the backward's code: bit-identical to the backward
// kernel's result for that upstream. The scale is 1 / *grad_denominator for 'mean' (computed before
// this kernel by mean_denominator_kernel, the value the finish will write), 1 otherwise (nullptr).
template <typename scalar_t, int GROUP, InnerLoop kInner, bool kWithGrad>
__device__ __forceinline__ void forward_streamed_rows(
    const scalar_t* __restrict__ logits, const KernelParams<at::opmath_type<scalar_t>>& p,
    at::opmath_type<scalar_t>* __restrict__ row_loss, at::opmath_type<scalar_t>* __restrict__ row_stats,
    at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials,
    const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish, scalar_t* __restrict__ grad_logits,
    const at::opmath_type<scalar_t>* __restrict__ grad_denominator) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_weight, kRowsPerBlock);
  // This group's rows, summed by its lane 0 in row order (only read when partials are requested).
  double group_loss = 0.0, group_weight = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const bool smoothing = p.cfg.label_smoothing != acc_t(0);
  const bool sum_weights = smoothing && p.weight != nullptr;
  const bool tail_on = kInner != InnerLoop::kAdjusted && p.tail != nullptr;
  const uint32_t column_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed)) : 0u;
  const uint32_t row_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed + 1)) : 0u;
  // The gradient rows split like the logits rows when their bases do (see the backward kernel).
  const bool vector_stores = kWithGrad && gpu_row_stream::same_split(logits, grad_logits);
  // reduction 'none': the denominator is 1, written here rather than by a separate fill launch.
  if (unit_denominator != nullptr && blockIdx.x == 0 && threadIdx.x == 0) gpu::store(unit_denominator, acc_t(1));

  // Every thread of a block runs the same number of iterations (the row loop bound is uniform
  // per group, and for block groups the group is the block), so __syncthreads in group_reduce is safe.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t y = gpu::load(p.target + row);
    if (y == p.ignore_index) {
      if (lane == 0) {
        gpu::store(row_loss + row, acc_t(0));
        gpu::store(row_stats + row, acc_t(0));
        gpu::store(row_stats + p.num_rows + row, acc_t(0));
      }
      if constexpr (kWithGrad) fill_row<GROUP>(grad_logits + row * p.num_classes, C, lane, scalar_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const scalar_t* z = logits + row * p.num_classes;
    const RowInfo<acc_t> r{static_cast<int>(y), target_logit_of(z, p, y),
                           tail_on ? math::seql_row_key(row, row_seed) : 0u};

    math::SoftmaxState<acc_t> state = math::empty_softmax_state<acc_t>();
    acc_t offset_sum = acc_t(0), weight_sum = acc_t(0);
    const RowSplit split = split_row(z, C);
    if (lane < split.head) {
      ClassRun<kInner, V, acc_t> run;
      run.load(p, lane, 1);
      const acc_t a[1] = {softmax_logit<kInner>(p, r, column_seed, static_cast<acc_t>(gpu::load(z + lane)), lane,
                                                run, 0)};
      const int cls[1] = {lane};
      accumulate_logits<kInner>(a, cls, C, p, r.target_logit, smoothing, state, offset_sum, weight_sum);
    }
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) x[u] = gpu::load_vector<V>(z + split.head + v * V);
      }
      acc_t a[U * V];
      int cls[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        const bool valid = v < split.vectors;
        ClassRun<kInner, V, acc_t> run;
        if (valid) run.load(p, split.head + v * V, V);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int c = split.head + v * V + i;
          cls[u * V + i] = valid ? c : C;
          a[u * V + i] = valid ? softmax_logit<kInner>(p, r, column_seed, static_cast<acc_t>(x[u].v[i]), c, run, i)
                               : math::negative_infinity<acc_t>();
        }
      }
      accumulate_logits<kInner>(a, cls, C, p, r.target_logit, smoothing, state, offset_sum, weight_sum);
    }
    if (split.tail_begin + lane < C) {
      const int c = split.tail_begin + lane;
      ClassRun<kInner, V, acc_t> run;
      run.load(p, c, 1);
      const acc_t a[1] = {softmax_logit<kInner>(p, r, column_seed, static_cast<acc_t>(gpu::load(z + c)), c, run, 0)};
      const int cls[1] = {c};
      accumulate_logits<kInner>(a, cls, C, p, r.target_logit, smoothing, state, offset_sum, weight_sum);
    }
    group_reduce<GROUP>(state, offset_sum, weight_sum, scratch_state, scratch_a, scratch_b);
    if (lane == 0) {
      auto cfg = p.cfg;
      if (sum_weights) cfg.total_weight = weight_sum;
      const math::RowLogSumExp<acc_t> finished = math::finish_row(state);
      const acc_t target_weight = p.weight ? gpu::load(p.weight + y) : acc_t(1);
      const acc_t loss = math::row_loss(cfg, finished, r.target_logit, target_weight, offset_sum);
      gpu::store(row_stats + row, finished.max);
      gpu::store(row_stats + p.num_rows + row, finished.log_sum);
      gpu::store(row_loss + row, loss);
      group_loss += static_cast<double>(loss);
      group_weight += static_cast<double>(target_weight);
    }
    if constexpr (kWithGrad) {
      // Every lane holds the same reduced state (merge_softmax_states is symmetric, so the shuffle
      // butterfly gives all lanes lane 0's bits), hence the same statistics lane 0 stored.
      const math::RowLogSumExp<acc_t> stats = math::finish_row(state);
      scalar_t* g = grad_logits + row * p.num_classes;
      if (math::row_is_nan(stats)) {  // as the backward: a NaN row of gradients
        fill_row<GROUP>(g, C, lane, static_cast<scalar_t>(stats.log_sum));
        continue;
      }
      const auto cfg = gradient_config<GROUP, kInner>(p, lane, scratch_state, scratch_a, scratch_b);
      const acc_t scale = grad_denominator != nullptr ? acc_t(1) / gpu::load(grad_denominator) : acc_t(1);
      const auto coef = math::row_gradient_coefficients(cfg, scale, stats, r.target_logit,
                                                        p.weight ? gpu::load(p.weight + y) : acc_t(1));
      write_row_gradient<GROUP, kInner>(z, g, C, lane, p, r, stats, coef, column_seed, vector_stores);
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_weight, partials, partial_loss, partial_weight);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t, int GROUP, InnerLoop kInner>
__device__ __forceinline__ void backward_streamed_rows(const scalar_t* __restrict__ logits,
                                                       const KernelParams<at::opmath_type<scalar_t>>& p,
                                                       const at::opmath_type<scalar_t>* __restrict__ row_stats,
                                                       const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                                       bool per_row_grad,
                                                       const at::opmath_type<scalar_t>* __restrict__ denominator,
                                                       scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);
  const bool tail_on = kInner != InnerLoop::kAdjusted && p.tail != nullptr;
  const uint32_t column_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed)) : 0u;
  const uint32_t row_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed + 1)) : 0u;
  // Rows of the logits and of the gradient start at the same offset from a 16-byte boundary when
  // their bases do (both have C elements per row): then one split serves both and the gradient is
  // stored in vectors; else (a logits view with an odd storage offset) it is stored element-wise.
  const bool vector_stores = gpu_row_stream::same_split(logits, grad_logits);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g = grad_logits + row * p.num_classes;
    const int64_t y = gpu::load(p.target + row);
    if (y == p.ignore_index) {
      fill_row<GROUP>(g, C, lane, scalar_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + p.num_rows + row)};
    if (math::row_is_nan(stats)) {  // NaN/inf in the row: every gradient is NaN, as in F.cross_entropy
      fill_row<GROUP>(g, C, lane, static_cast<scalar_t>(stats.log_sum));
      continue;  // row-uniform: the whole group (for block groups, the block) takes this branch
    }
    const scalar_t* z = logits + row * p.num_classes;
    const auto cfg = gradient_config<GROUP, kInner>(p, lane, scratch_state, scratch_a, scratch_b);
    const RowInfo<acc_t> r{static_cast<int>(y), target_logit_of(z, p, y),
                           tail_on ? math::seql_row_key(row, row_seed) : 0u};
    const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
    const auto coef = math::row_gradient_coefficients(cfg, scale, stats, r.target_logit,
                                                      p.weight ? gpu::load(p.weight + y) : acc_t(1));
    write_row_gradient<GROUP, kInner>(z, g, C, lane, p, r, stats, coef, column_seed, vector_stores);
  }
}

// ------------------------------------------------------------------------------ tiled rows
// Rows of C <= 32 classes (kSmallGroup = 8 lanes each) in tiles: a block's tile of rows is one flat
// span of the contiguous [N, C], copied to a __shared__ tile in 16-byte vectors
// (gpu_row_stream::load_span_to_tile) and computed from there; gradients go back out through a second
// tile the same way. Streamed per row, these rows ran at sector efficiency 0.42 (forward) and 0.52
// (backward) at 256 x 20 bf16. A tile is 32 x T rows, T = tile_rows_per_group(C): group g takes
// rows g, g + 32, ..., g + 32 (T - 1) of it (gpu_reduce.cuh, tiled rows). Lane l owns classes l,
// l + 8, l + 16, l + 24 of every row, so it loads their per-class values (adjustment, tail mask,
// weights) once per kernel.
using gpu_reduce::kClassesPerLane;
using gpu_reduce::kTileElements;
using gpu_reduce::kTileGroups;
using gpu_reduce::tile_rows_per_group;

// The per-class values of the classes lane + 8 k (k < kClassesPerLane) that are < C.
template <InnerLoop kInner, typename acc_t>
__device__ __forceinline__ ClassRun<kInner, kClassesPerLane, acc_t> lane_classes(const KernelParams<acc_t>& p,
                                                                                 int lane, int C, bool with_weight) {
  ClassRun<kInner, kClassesPerLane, acc_t> run;
#pragma unroll
  for (int k = 0; k < kClassesPerLane; ++k) {
    const int c = lane + k * gpu_reduce::kSmallGroup;
    if (c >= C) continue;
    if (p.adjustment) run.adjustment[k] = gpu::load(p.adjustment + c);
    if constexpr (kInner != InnerLoop::kAdjusted) {
      if (kInner == InnerLoop::kTail || p.tail) run.tail[k] = gpu::load(p.tail + c);
    }
    if constexpr (kInner == InnerLoop::kGeneral) {
      if (with_weight && p.weight) run.weight[k] = gpu::load(p.weight + c);
    }
  }
  return run;
}

// The target's logit from the tile row `z` (as target_logit_of from global memory).
template <typename acc_t, typename Tile>
__device__ __forceinline__ acc_t tile_target_logit(const Tile& tile, int row_base, const KernelParams<acc_t>& p,
                                                   int y) {
  const acc_t z = tile[row_base + y];
  const acc_t a = p.adjustment ? math::adjusted_logit(z, gpu::load(p.adjustment + y)) : z;
  return p.target_margin ? a - gpu::load(p.target_margin + y) : a;
}

// The gradient of the tile row at row_base (grad_tile, same layout) for an upstream scale `scale`:
// from the row's statistics, with gradient_at as every other cross-entropy gradient. Every lane of
// the group calls it (gradient_config reduces over the group).
template <InnerLoop kInner, typename acc_t, typename Tile, typename GradTile, typename StateScratch,
          typename SumScratch>
__device__ __forceinline__ void write_tile_row_gradient(const Tile& tile, GradTile& grad_tile, int row_base, int C,
                                                        int lane, const KernelParams<acc_t>& p,
                                                        const RowInfo<acc_t>& r,
                                                        const math::RowLogSumExp<acc_t>& stats, acc_t scale,
                                                        const ClassRun<kInner, kClassesPerLane, acc_t>& run,
                                                        uint32_t column_seed, StateScratch& scratch_state,
                                                        SumScratch& scratch_a, SumScratch& scratch_b) {
  if (math::row_is_nan(stats)) {  // NaN/inf in the row: every gradient is NaN, as in F.cross_entropy
#pragma unroll
    for (int k = 0; k < kClassesPerLane; ++k) {
      const int c = lane + k * gpu_reduce::kSmallGroup;
      if (c < C) grad_tile[row_base + c] = stats.log_sum;
    }
    return;  // row-uniform: the whole group returns
  }
  const auto cfg = gradient_config<gpu_reduce::kSmallGroup, kInner>(p, lane, scratch_state, scratch_a, scratch_b);
  const auto coef = math::row_gradient_coefficients(cfg, scale, stats, r.target_logit,
                                                    p.weight ? gpu::load(p.weight + r.y) : acc_t(1));
#pragma unroll
  for (int k = 0; k < kClassesPerLane; ++k) {
    const int c = lane + k * gpu_reduce::kSmallGroup;
    if (c < C) {
      grad_tile[row_base + c] =
          gradient_at<kInner>(p, r, stats, coef, column_seed, static_cast<acc_t>(tile[row_base + c]), c, run, k);
    }
  }
}

template <typename scalar_t, InnerLoop kInner, bool kWithGrad>
__device__ __forceinline__ void forward_tiled_rows(
    const scalar_t* __restrict__ logits, const KernelParams<at::opmath_type<scalar_t>>& p,
    at::opmath_type<scalar_t>* __restrict__ row_loss, at::opmath_type<scalar_t>* __restrict__ row_stats,
    at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials,
    const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish, scalar_t* __restrict__ grad_logits,
    const at::opmath_type<scalar_t>* __restrict__ grad_denominator) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, grad_tile, kWithGrad ? kTileElements : 1);
  // group_reduce uses its scratch only for block groups; 8-lane groups reduce with shuffles.
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, 1);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, 1);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, 1);
  LTFAST_SHARED_ARRAY(double, partial_loss, kTileGroups);
  LTFAST_SHARED_ARRAY(double, partial_weight, kTileGroups);
  double group_loss = 0.0, group_weight = 0.0;  // this group's rows, summed by its lane 0 in row order
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int tile_rows = kTileGroups * tile_rows_per_group(C);
  const bool smoothing = p.cfg.label_smoothing != acc_t(0);
  const bool sum_weights = smoothing && p.weight != nullptr;
  const bool tail_on = kInner != InnerLoop::kAdjusted && p.tail != nullptr;
  const uint32_t column_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed)) : 0u;
  const uint32_t row_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed + 1)) : 0u;
  const acc_t grad_scale = kWithGrad && grad_denominator != nullptr ? acc_t(1) / gpu::load(grad_denominator) : acc_t(1);
  if (unit_denominator != nullptr && blockIdx.x == 0 && threadIdx.x == 0) gpu::store(unit_denominator, acc_t(1));
  const ClassRun<kInner, K, acc_t> run = lane_classes<kInner>(p, lane, C, /*with_weight=*/kWithGrad);

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
      const int64_t y = gpu::load(p.target + row);
      if (y == p.ignore_index) {
        if (lane == 0) {
          gpu::store(row_loss + row, acc_t(0));
          gpu::store(row_stats + row, acc_t(0));
          gpu::store(row_stats + p.num_rows + row, acc_t(0));
        }
        if constexpr (kWithGrad) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            if (lane + k * GROUP < C) grad_tile[row_base + lane + k * GROUP] = acc_t(0);
          }
        }
        continue;
      }
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
      const RowInfo<acc_t> r{static_cast<int>(y), tile_target_logit(tile, row_base, p, static_cast<int>(y)),
                             tail_on ? math::seql_row_key(row, row_seed) : 0u};
      acc_t a[K];
      int cls[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        cls[k] = c < C ? c : C;
        a[k] = c < C ? softmax_logit<kInner>(p, r, column_seed, static_cast<acc_t>(tile[row_base + c]), c, run, k)
                     : math::negative_infinity<acc_t>();
      }
      math::SoftmaxState<acc_t> state = math::empty_softmax_state<acc_t>();
      acc_t offset_sum = acc_t(0), weight_sum = acc_t(0);
      accumulate_logits<kInner>(a, cls, C, p, r.target_logit, smoothing, state, offset_sum, weight_sum);
      group_reduce<GROUP>(state, offset_sum, weight_sum, scratch_state, scratch_a, scratch_b);
      const math::RowLogSumExp<acc_t> stats = math::finish_row(state);  // every lane: lane 0's bits
      if (lane == 0) {
        auto cfg = p.cfg;
        if (sum_weights) cfg.total_weight = weight_sum;
        const acc_t target_weight = p.weight ? gpu::load(p.weight + y) : acc_t(1);
        const acc_t loss = math::row_loss(cfg, stats, r.target_logit, target_weight, offset_sum);
        gpu::store(row_stats + row, stats.max);
        gpu::store(row_stats + p.num_rows + row, stats.log_sum);
        gpu::store(row_loss + row, loss);
        group_loss += static_cast<double>(loss);
        group_weight += static_cast<double>(target_weight);
      }
      if constexpr (kWithGrad) {
        write_tile_row_gradient<kInner>(tile, grad_tile, row_base, C, lane, p, r, stats, grad_scale, run,
                                        column_seed, scratch_state, scratch_a, scratch_b);
      }
    }
    if constexpr (kWithGrad) {
      __syncthreads();
      gpu_row_stream::store_tile_to_span<kBlockThreads, acc_t>(grad_tile, rows * C,
                                                               grad_logits + first_row * p.num_classes);
    }
    __syncthreads();  // the next tile overwrites both tiles
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_weight, partials, partial_loss, partial_weight);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t, InnerLoop kInner>
__device__ __forceinline__ void backward_tiled_rows(const scalar_t* __restrict__ logits,
                                                    const KernelParams<at::opmath_type<scalar_t>>& p,
                                                    const at::opmath_type<scalar_t>* __restrict__ row_stats,
                                                    const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                                    bool per_row_grad,
                                                    const at::opmath_type<scalar_t>* __restrict__ denominator,
                                                    scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  LTFAST_SHARED_ARRAY(acc_t, tile, kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, grad_tile, kTileElements);
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, 1);  // unused by 8-lane groups
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, 1);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, 1);
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int tile_rows = kTileGroups * tile_rows_per_group(C);
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);
  const bool tail_on = kInner != InnerLoop::kAdjusted && p.tail != nullptr;
  const uint32_t column_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed)) : 0u;
  const uint32_t row_seed = tail_on ? static_cast<uint32_t>(gpu::load(p.seed + 1)) : 0u;
  const ClassRun<kInner, kClassesPerLane, acc_t> run = lane_classes<kInner>(p, lane, C, /*with_weight=*/true);

  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < p.num_rows;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(p.num_rows - first_row < tile_rows ? p.num_rows - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * p.num_classes, rows * C, tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int row_base = tile_row * C;
      const int64_t y = gpu::load(p.target + row);
      if (y == p.ignore_index) {
#pragma unroll
        for (int k = 0; k < kClassesPerLane; ++k) {
          if (lane + k * GROUP < C) grad_tile[row_base + lane + k * GROUP] = acc_t(0);
        }
        continue;
      }
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
      const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + p.num_rows + row)};
      const RowInfo<acc_t> r{static_cast<int>(y), tile_target_logit(tile, row_base, p, static_cast<int>(y)),
                             tail_on ? math::seql_row_key(row, row_seed) : 0u};
      const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
      write_tile_row_gradient<kInner>(tile, grad_tile, row_base, C, lane, p, r, stats, scale, run, column_seed,
                                      scratch_state, scratch_a, scratch_b);
    }
    __syncthreads();
    gpu_row_stream::store_tile_to_span<kBlockThreads, acc_t>(grad_tile, rows * C,
                                                             grad_logits + first_row * p.num_classes);
    __syncthreads();  // the next tile overwrites both tiles
  }
}

// ------------------------------------------------------------------------------ kernels
// The row kernels: tiles for rows of <= 32 classes, streamed rows otherwise (with_row_group picks
// GROUP from C, so each instantiation compiles one of the two).
template <typename scalar_t, int GROUP, InnerLoop kInner, bool kWithGrad>
__global__ void __launch_bounds__(kBlockThreads)
    forward_rows_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                        at::opmath_type<scalar_t>* __restrict__ row_loss,
                        at::opmath_type<scalar_t>* __restrict__ row_stats,
                        at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials,
                        gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish, scalar_t* __restrict__ grad_logits,
                        const at::opmath_type<scalar_t>* __restrict__ grad_denominator) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    forward_tiled_rows<scalar_t, kInner, kWithGrad>(logits, p, row_loss, row_stats, unit_denominator, partials,
                                                     finish, grad_logits, grad_denominator);
  } else {
    forward_streamed_rows<scalar_t, GROUP, kInner, kWithGrad>(logits, p, row_loss, row_stats, unit_denominator,
                                                              partials, finish, grad_logits, grad_denominator);
  }
}

template <typename scalar_t, int GROUP, InnerLoop kInner>
__global__ void __launch_bounds__(kBlockThreads)
    backward_rows_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                         const at::opmath_type<scalar_t>* __restrict__ row_stats,
                         const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                         const at::opmath_type<scalar_t>* __restrict__ denominator,
                         scalar_t* __restrict__ grad_logits) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    backward_tiled_rows<scalar_t, kInner>(logits, p, row_stats, grad_loss, per_row_grad, denominator, grad_logits);
  } else {
    backward_streamed_rows<scalar_t, GROUP, kInner>(logits, p, row_stats, grad_loss, per_row_grad, denominator,
                                                    grad_logits);
  }
}

// 'mean' with the forward-time gradient: the denominator the gradient is scaled by must be known
// before the row kernel writes any gradient, but the finish computes it only after every row. This
// one-block kernel computes that very value first: the sum of the target weights (1 without class
// weights) over the rows not ignored, added in the row kernel's exact order (each group's rows in
// grid-stride order, T = tile_rows_per_group(C) of them per tile for tiled rows, the groups of a
// block in order, the blocks as gpu_reduce::finish_mean_kernel adds them: thread t the blocks t,
// t + 256, ..., then block_sum), so it equals the finish's denominator bit for bit. It reads the [N]
// targets (and gathers the weights): 512 KB at N = 65536, ~3 % of the 65536 x 8142 bf16 row
// kernel's 2.1 GB (estimate: no GPU has run it).
template <typename acc_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    mean_denominator_kernel(KernelParams<acc_t> p, int64_t row_blocks, acc_t* __restrict__ denominator) {
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  const int64_t C = p.num_classes;
  const int64_t tile_rows = int64_t(kRowsPerBlock) * tile_rows_per_group(C);  // streamed rows: one per group
  const int64_t tile_stride = row_blocks * tile_rows;
  double value = 0.0;
  for (int64_t block = threadIdx.x; block < row_blocks; block += kBlockThreads) {
    double block_weight = 0.0;
    for (int group = 0; group < kRowsPerBlock; ++group) {
      double group_weight = 0.0;
      for (int64_t first_row = block * tile_rows; first_row < p.num_rows; first_row += tile_stride) {
        for (int64_t row = first_row + group; row < first_row + tile_rows && row < p.num_rows; row += kRowsPerBlock) {
          const int64_t y = gpu::load(p.target + row);
          if (y == p.ignore_index) continue;
          CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
          group_weight += static_cast<double>(p.weight ? gpu::load(p.weight + y) : acc_t(1));
        }
      }
      block_weight += group_weight;  // one group per block: 0.0 + x is x, the partial the row kernel stores
    }
    value += block_weight;
  }
  const double total = gpu_reduce::block_sum(value, scratch);
  if (threadIdx.x == 0) gpu::store(denominator, total);
}

// The forward-time gradient handed to an upstream gradient (ltfast::_scale_forward_grad_, the CUDA
// side of autograd_common.h's forward_grad_for_upstream): grad [N, C] was written for an upstream
// gradient of 1; here each row is multiplied in place by upstream[0] (a reduced loss) or
// upstream[row] ('none'), read on the device: no host synchronisation. Where the factor is exactly 1
// (loss.backward() on the loss itself) the kernel returns before touching [N, C], so a training
// step stays 1 read + 1 write of [N, C]. Elements that are exactly 0 (ignored rows, SEQL's dropped
// entries) stay +0, as the backward kernel writes them, also for a negative or non-finite factor.
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    scale_rows_kernel(scalar_t* __restrict__ grad, int64_t num_rows, int64_t num_classes,
                      const at::opmath_type<scalar_t>* __restrict__ upstream, bool per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  const acc_t shared_factor = per_row ? acc_t(1) : gpu::load(upstream);
  if (!per_row && shared_factor == acc_t(1)) return;  // uniform over the grid
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(num_classes);
  auto scaled = [](scalar_t x, acc_t factor) -> scalar_t {
    const acc_t value = static_cast<acc_t>(x);
    return value == acc_t(0) ? scalar_t(0) : static_cast<scalar_t>(value * factor);
  };
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const acc_t factor = per_row ? gpu::load(upstream + row) : shared_factor;
    if (factor == acc_t(1)) continue;
    scalar_t* g = grad + row * num_classes;
    const RowSplit split = split_row(g, C);
    if (lane < split.head) gpu::store(g + lane, scaled(gpu::load(g + lane), factor));
    for (int v = lane; v < split.vectors; v += GROUP) {
      scalar_t* at = g + split.head + v * V;
      gpu::Vector<scalar_t, V> x = gpu::load_vector<V>(at);
#pragma unroll
      for (int i = 0; i < V; ++i) x.v[i] = scaled(x.v[i], factor);
      gpu::store_vector<V>(at, x);
    }
    if (split.tail_begin + lane < C) {
      const int c = split.tail_begin + lane;
      gpu::store(g + c, scaled(gpu::load(g + c), factor));
    }
  }
}

// ------------------------------------------------------------------------------ launch plan
// The kernels index within a row in 32 bits.
inline void check_class_count(int64_t num_classes) {
  if (!gpu_row_stream::fits_row_index(num_classes)) {
    throw std::invalid_argument("ltfast cross_entropy (CUDA): logits have " + std::to_string(num_classes) +
                                " classes; expected at most 2^31 - 1");
  }
}

// Blocks of the row kernels for this call (the partials buffer of forward has 2 x this many): the
// groups of a block take tile_rows_per_group(C) rows each per tile (1 for streamed rows).
inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes) {
  return gpu_reduce::tiled_row_blocks(num_rows, num_classes);
}

// Row kernel: per-row loss, row_stats [2, N] (row max, log-sum offset) and, when `partials` (double
// [2, row_kernel_blocks]) is given, the blocks' loss and weight sums, which the last block finishes
// into loss and denominator when `finish` has a ticket counter. `unit_denominator` (reduction
// 'none') receives 1. With `grad_logits` ([N, C], contiguous), also the gradient for an upstream
// gradient of 1, scaled by 1 / *grad_denominator when that is given ('mean').
template <typename scalar_t>
void launch_forward_rows(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                         at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                         at::opmath_type<scalar_t>* unit_denominator, double* partials, gpu::Stream stream,
                         const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish = {},
                         scalar_t* grad_logits = nullptr,
                         const at::opmath_type<scalar_t>* grad_denominator = nullptr) {
  if (p.num_rows == 0) return;
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    with_inner_loop(inner_loop_of(p), [&](auto inner) {
      constexpr int kGroup = decltype(group)::value;
      constexpr InnerLoop kInner = decltype(inner)::value;
      const unsigned blocks = row_kernel_blocks(p.num_rows, p.num_classes);
      if (grad_logits == nullptr) {
        gpu::launch("cross_entropy forward_rows_kernel", &forward_rows_kernel<scalar_t, kGroup, kInner, false>, blocks,
                    kBlockThreads, stream, logits, p, row_loss, row_stats, unit_denominator, partials, finish,
                    grad_logits, grad_denominator);
      } else {
        gpu::launch("cross_entropy forward_rows_kernel", &forward_rows_kernel<scalar_t, kGroup, kInner, true>, blocks,
                    kBlockThreads, stream, logits, p, row_loss, row_stats, unit_denominator, partials, finish,
                    grad_logits, grad_denominator);
      }
    });
  });
}

// Forward: one launch. For 'mean'/'sum' the row kernel's last block finishes the loss from the
// partials when `ticket` (the stream's counter, gpu::ticket_counter) is given; without one (CUDA
// graph capture) the one-block finish kernel follows the row kernel. With N = 0 the row kernel does
// not run: the finish kernel alone sums the partials, zeros filled by the caller, and still writes
// the loss (NaN for 'mean', as F.cross_entropy) and the denominator. With `grad_logits`, the row
// kernel also writes the forward-time gradient; for 'mean' mean_denominator_kernel first writes its
// scale's denominator to `grad_denominator` (an accumulation-type scalar): two launches.
template <typename scalar_t>
void launch_forward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                    at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                    at::opmath_type<scalar_t>* unit_denominator, bool reduce, bool mean, double* partials,
                    at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominator, unsigned int* ticket,
                    gpu::Stream stream, scalar_t* grad_logits = nullptr,
                    at::opmath_type<scalar_t>* grad_denominator = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool scaled_gradient = grad_logits != nullptr && mean && p.num_rows > 0;
  if (scaled_gradient) {
    check_class_count(p.num_classes);
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("cross_entropy mean_denominator_kernel", &mean_denominator_kernel<acc_t, kGroup>, 1, kBlockThreads,
                  stream, p, static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes)), grad_denominator);
    });
  }
  launch_forward_rows(logits, p, row_loss, row_stats, unit_denominator, reduce ? partials : nullptr, stream,
                      {reduce ? ticket : nullptr, mean, loss, denominator}, grad_logits,
                      scaled_gradient ? grad_denominator : nullptr);
  if (reduce && (p.num_rows == 0 || ticket == nullptr)) {
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
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    with_inner_loop(inner_loop_of(p), [&](auto inner) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("cross_entropy backward_rows_kernel",
                  &backward_rows_kernel<scalar_t, kGroup, decltype(inner)::value>,
                  row_kernel_blocks(p.num_rows, p.num_classes), kBlockThreads, stream, logits, p, row_stats, grad_loss,
                  per_row_grad, denominator, grad_logits);
    });
  });
}

// grad [N, C] (contiguous) *= upstream per row (per_row: upstream [N]) or upstream[0].
template <typename scalar_t>
void launch_scale_rows(scalar_t* grad, int64_t num_rows, int64_t num_classes,
                       const at::opmath_type<scalar_t>* upstream, bool per_row, gpu::Stream stream) {
  if (num_rows == 0 || num_classes == 0) return;
  check_class_count(num_classes);
  gpu_reduce::with_row_group(num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("cross_entropy scale_rows_kernel", &scale_rows_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(num_rows, kGroup), kBlockThreads, stream, grad, num_rows, num_classes, upstream,
                per_row);
  });
}

}  // namespace cross_entropy_kernels
}  // namespace ltfast
