// CUDA kernels of the softmax cross-entropy family and their launch plan, with no torch glue:
// compiled by nvcc into ltfast._C (through cross_entropy_cuda.cu) and by the host compiler into
// the SIMT emulator's test library. The arithmetic is csrc/common/softmax_math.h, shared with the
// CPU kernels; this file holds only the parallel decomposition.
//
// A "group" of threads owns a row (gpu_reduce::with_row_group): 8 lanes for C <= 32, a warp for
// C <= 1024, the whole block otherwise. Forward streams the row once in 16-byte vectors (a scalar
// head and tail around them: split_row) with an online softmax (the row max and exp-sum merged
// once per 16 elements), reduces the group's partial states with shuffles
// and, for block groups, a fixed-order pass over shared memory. For 'mean'/'sum' each block also
// writes its rows' loss and weight sums (fixed order), and the block that takes the last ticket adds
// those partials in a fixed order (gpu_reduce::finish_in_last_block): one launch, deterministic, no
// serial pass over N in one block (two launches, row kernel then finish_mean_kernel, under CUDA
// graph capture, which has no ticket counter: gpu_glue.h). Backward streams the row once
// more and writes the gradient once. No host synchronisation: grad_output and the mean's
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

// ------------------------------------------------------------------------------ kernels
template <typename scalar_t, int GROUP, InnerLoop kInner>
__global__ void __launch_bounds__(kBlockThreads)
    forward_rows_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                        at::opmath_type<scalar_t>* __restrict__ row_loss,
                        at::opmath_type<scalar_t>* __restrict__ row_stats,
                        at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials,
                        gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
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
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_weight, partials, partial_loss, partial_weight);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t, int GROUP, InnerLoop kInner>
__global__ void __launch_bounds__(kBlockThreads)
    backward_rows_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                         const at::opmath_type<scalar_t>* __restrict__ row_stats,
                         const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                         const at::opmath_type<scalar_t>* __restrict__ denominator,
                         scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const bool sum_weights = p.cfg.label_smoothing != acc_t(0) && p.weight != nullptr;
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
    auto cfg = p.cfg;
    if constexpr (kInner == InnerLoop::kGeneral) {
      if (sum_weights) {  // W = sum_c w_c from the [C] vector (L2-resident), only with smoothing
        math::SoftmaxState<acc_t> unused = math::empty_softmax_state<acc_t>();
        acc_t weight_sum = acc_t(0), unused_sum = acc_t(0);
        for (int c = lane; c < C; c += GROUP) weight_sum += gpu::load(p.weight + c);
        group_reduce<GROUP>(unused, weight_sum, unused_sum, scratch_state, scratch_a, scratch_b);
        cfg.total_weight = weight_sum;
      }
    }
    const RowInfo<acc_t> r{static_cast<int>(y), target_logit_of(z, p, y),
                           tail_on ? math::seql_row_key(row, row_seed) : 0u};
    const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
    const auto coef = math::row_gradient_coefficients(cfg, scale, stats, r.target_logit,
                                                      p.weight ? gpu::load(p.weight + y) : acc_t(1));
    // d loss / d z_c of one element (per-class values in `run` at i).
    auto gradient = [&](acc_t zc, int c, const ClassRun<kInner, V, acc_t>& run, int i) -> acc_t {
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
}

// ------------------------------------------------------------------------------ launch plan
// The kernels index within a row in 32 bits.
inline void check_class_count(int64_t num_classes) {
  if (!gpu_row_stream::fits_row_index(num_classes)) {
    throw std::invalid_argument("ltfast cross_entropy (CUDA): logits have " + std::to_string(num_classes) +
                                " classes; expected at most 2^31 - 1");
  }
}

// Blocks of the row kernels for this call (the partials buffer of forward has 2 x this many).
inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes) {
  unsigned blocks = 1;
  gpu_reduce::with_row_group(num_classes, [&](auto group) { blocks = gpu_reduce::row_blocks(num_rows, group); });
  return blocks;
}

// Row kernel: per-row loss, row_stats [2, N] (row max, log-sum offset) and, when `partials` (double
// [2, row_kernel_blocks]) is given, the blocks' loss and weight sums, which the last block finishes
// into loss and denominator when `finish` has a ticket counter. `unit_denominator` (reduction
// 'none') receives 1.
template <typename scalar_t>
void launch_forward_rows(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                         at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                         at::opmath_type<scalar_t>* unit_denominator, double* partials, gpu::Stream stream,
                         const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish = {}) {
  if (p.num_rows == 0) return;
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    with_inner_loop(inner_loop_of(p), [&](auto inner) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("cross_entropy forward_rows_kernel", &forward_rows_kernel<scalar_t, kGroup, decltype(inner)::value>,
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_loss, row_stats,
                  unit_denominator, partials, finish);
    });
  });
}

// Forward: one launch. For 'mean'/'sum' the row kernel's last block finishes the loss from the
// partials when `ticket` (the stream's counter, gpu::ticket_counter) is given; without one (CUDA
// graph capture) the one-block finish kernel follows the row kernel. With N = 0 the row kernel does
// not run: the finish kernel alone sums the partials, zeros filled by the caller, and still writes
// the loss (NaN for 'mean', as F.cross_entropy) and the denominator.
template <typename scalar_t>
void launch_forward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                    at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats,
                    at::opmath_type<scalar_t>* unit_denominator, bool reduce, bool mean, double* partials,
                    at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominator, unsigned int* ticket,
                    gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  launch_forward_rows(logits, p, row_loss, row_stats, unit_denominator, reduce ? partials : nullptr, stream,
                      {reduce ? ticket : nullptr, mean, loss, denominator});
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
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_stats, grad_loss,
                  per_row_grad, denominator, grad_logits);
    });
  });
}

}  // namespace cross_entropy_kernels
}  // namespace ltfast
