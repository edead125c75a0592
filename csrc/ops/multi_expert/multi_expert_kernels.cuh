// CUDA kernels of the multi-expert losses and their launch plan, with no torch glue: compiled by
// nvcc into ltfast._C (through multi_expert_cuda.cu) and by the host compiler into the SIMT
// emulator's test library.
//
// A row group (gpu_reduce::with_row_group of C: 8 lanes, a warp or the block) owns one sample and
// streams its E x C logits: per expert, an online softmax (one exp per element, two for RIDE's CE
// and tempered softmaxes) reduced over the group with cross_entropy_kernels::group_reduce, and for
// RIDE one more pass over the E rows (from L1/L2) for the softmax of the expert mean. Each block
// writes its rows' sums (fixed order) and the block that takes the last ticket finishes them in a
// fixed order (gpu_reduce::finish_in_last_block: one launch; a one-block finish kernel after the row
// kernel under CUDA graph capture): deterministic, no host synchronisation. Backward streams the
// block once more and writes each gradient once.
//
// The [N, E, C] rows (logits, gradient) are streamed in 16-byte vectors with a scalar head and tail
// per row (gpu_row_stream::split_row), the online softmax merged once per U x V elements:
// element-wise loads of 2 bytes strided by the group measured 0.70-0.80 sector efficiency in the
// emulator at 128 x 3 x 1000 bf16 (tests/test_memory_traffic.py). At C * sizeof(T) not a multiple
// of 16 (CIFAR-100: 200 bytes) the E rows of a sample start at different offsets from a 16-byte
// boundary, while RIDE's expert mean needs every expert's logit of one class together: those
// cross-row runs are read as the two aligned 16-byte vectors around them (load_elements).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/gpu_row_stream.cuh"
#include "../../common/softmax_math.h"
#include "../cross_entropy/cross_entropy_kernels.cuh"

namespace ltfast {
namespace multi_expert_kernels {

using gpu_reduce::kBlockThreads;
using gpu_row_stream::fill_row;
using gpu_row_stream::kVectorElements;
using gpu_row_stream::kVectorUnroll;
using gpu_row_stream::RowSplit;
using gpu_row_stream::split_row;
constexpr int kWarpsPerBlock = kBlockThreads / 32;

template <typename acc_t>
struct KernelParams {
  const int64_t* target;
  const acc_t* adjustments;    // diverse_expert_loss: [E, C]
  const acc_t* target_margin;  // ride_loss, nullable
  const acc_t* weight;         // ride_loss, nullable
  const acc_t* temperature;    // ride_loss, nullable (T = base_temperature)
  acc_t base_temperature;
  double diversity_factor;
  int64_t num_rows;
  int64_t num_experts;
  int64_t num_classes;
  int64_t ignore_index;
};

// Adds one element to an online softmax state: one exponential per element.
template <typename T>
__device__ __forceinline__ void accumulate(math::SoftmaxState<T>& state, T a) {
  if (a > state.max) {
    state.sum = state.sum * math::exp_shifted(state.max, a) + T(1);
    state.max = a;
  } else {
    state.sum += math::exp_shifted(a, state.max);
  }
}

// 1 / T_c, the same arithmetic as the CPU kernel.
template <typename acc_t>
__device__ __forceinline__ acc_t inverse_temperature(const KernelParams<acc_t>& p, int64_t c) {
  return acc_t(1) / (p.temperature ? p.base_temperature * gpu::load(p.temperature + c) : p.base_temperature);
}

// The tempered logit u = z * (1 / T), rounded once: nvcc contracts a product that feeds a
// subtraction into an FMA (exact product minus the max), and then exp(u - max) of the max element is
// not 1 but exp(its product's rounding), exp(-0.03) at z = 1e6 (the CPU kernel stores u instead).
template <typename acc_t>
__device__ __forceinline__ acc_t tempered_logit(acc_t z, acc_t inv_t) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    return __fmul_rn(z, inv_t);
  } else {
    return __dmul_rn(z, inv_t);
  }
#else
  return z * inv_t;  // the SIMT emulator's host build has no FMA (no -mfma)
#endif
}

// w_c = (sum_k (z_kc / T_c - shift)) / E, the shifted expert mean of the tempered logits whose
// softmax is pbar (multi_expert.h), the same arithmetic as the CPU kernel (shifted_tempered_mean).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t shifted_tempered_mean(const scalar_t* block, int64_t E, int64_t C, int64_t c,
                                                       acc_t inv_t, acc_t shift) {
  acc_t total = tempered_logit(static_cast<acc_t>(gpu::load(block + c)), inv_t) - shift;
  for (int64_t k = 1; k < E; ++k) total += tempered_logit(static_cast<acc_t>(gpu::load(block + (k * C + c))), inv_t) - shift;
  return total * (acc_t(1) / static_cast<acc_t>(E));
}

// max(a, b) that keeps a NaN of either side.
template <typename T>
__device__ __forceinline__ T nan_propagating_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Reduces one softmax state over the row group (every thread gets it).
template <int GROUP, typename T, typename StateScratch, typename SumScratch>
__device__ __forceinline__ void reduce_state(math::SoftmaxState<T>& state, StateScratch& scratch_state,
                                             SumScratch& scratch_a, SumScratch& scratch_b) {
  T unused_a = T(0), unused_b = T(0);
  cross_entropy_kernels::group_reduce<GROUP>(state, unused_a, unused_b, scratch_state, scratch_a, scratch_b);
}

// Merges K elements (padding: -inf) into an online softmax state with one rescaling exponential.
template <int K, typename acc_t>
__device__ __forceinline__ void merge_chunk(const acc_t (&a)[K], math::SoftmaxState<acc_t>& state) {
  acc_t chunk_max = a[0];
#pragma unroll
  for (int k = 1; k < K; ++k) chunk_max = a[k] > chunk_max ? a[k] : chunk_max;
  acc_t chunk_sum = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) chunk_sum += math::exp_shifted(a[k], chunk_max);
  state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{chunk_max, chunk_sum});
}

// out = elements [M, M + V) of the 2V elements lo, hi, for the runtime shift m (M: compile-time
// candidates 1 .. V - 1, so that every case indexes registers, not local memory).
template <int M, int V, typename T>
__device__ __forceinline__ void shift_window(const gpu::Vector<T, V>& lo, const gpu::Vector<T, V>& hi, int m,
                                             gpu::Vector<T, V>& out) {
  if constexpr (M < V) {
    if (m == M) {
#pragma unroll
      for (int i = 0; i < V; ++i) out.v[i] = i + M < V ? lo.v[i + M] : hi.v[i + M - V];
      return;
    }
    shift_window<M + 1, V>(lo, hi, m, out);
  }
}

// The V elements of T at `address`, aligned to sizeof(T) only (a run of another expert's row, or of
// a logits row next to a gradient row of another split): one 16-byte vector when aligned, else the
// two aligned vectors around it, shifted (the second is mostly the next run's: an L1 hit), and
// element loads where those would leave the tensor [begin, end). Both vectors are whole-sector
// requests: V element loads of consecutive runs would be 16 bytes apart per lane (0.125 sectors).
template <int V, typename T>
__device__ __forceinline__ gpu::Vector<T, V> load_elements(const T* address, const T* begin, const T* end) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  const int misaligned = static_cast<int>(a % 16) / static_cast<int>(sizeof(T));
  if (misaligned == 0) return gpu::load_vector<V>(address);
  gpu::Vector<T, V> out;
  const uintptr_t window = a - static_cast<uintptr_t>(misaligned) * sizeof(T);
  if (window >= reinterpret_cast<uintptr_t>(begin) && window + 2 * V * sizeof(T) <= reinterpret_cast<uintptr_t>(end)) {
    const T* w = address - misaligned;
    const gpu::Vector<T, V> lo = gpu::load_vector<V>(w);
    const gpu::Vector<T, V> hi = gpu::load_vector<V>(w + V);
    shift_window<1, V>(lo, hi, misaligned, out);
    return out;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out.v[i] = gpu::load(address + i);
  return out;
}

// 1 / T_c of V classes from c0 (the temperature run in the widest loads its alignment allows).
template <int V, typename acc_t>
__device__ __forceinline__ void inverse_temperatures(const KernelParams<acc_t>& p, int c0, acc_t (&out)[V]) {
  if (p.temperature) {
    acc_t t[V];
    gpu_row_stream::load_run<V>(p.temperature + c0, t);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = acc_t(1) / (p.base_temperature * t[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = acc_t(1) / p.base_temperature;
  }
}

// ------------------------------------------------------------------------------ diverse_expert_loss
// Per sample: the E softmaxes of z_e + adjustments_e, row_stats [2, N, E], the per-row loss (the sum
// over experts) and, with `partials` (double [2, gridDim.x]), the block's loss sum and row count.
// Each expert row has its own split (its adjustment row is read in runs beside it).
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    diverse_forward_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                           at::opmath_type<scalar_t>* __restrict__ row_loss,
                           at::opmath_type<scalar_t>* __restrict__ row_stats, double* __restrict__ partials,
                           gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_count, kRowsPerBlock);
  double group_loss = 0.0, group_count = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int64_t E = p.num_experts, N = p.num_rows;
  const int C = static_cast<int>(p.num_classes);
  // Uniform row loop per group (for block groups the group is the block): group_reduce's barriers are safe.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t y = gpu::load(p.target + row);
    if (y == p.ignore_index) {
      for (int64_t e = lane; e < E; e += GROUP) {
        gpu::store(row_stats + (row * E + e), acc_t(0));
        gpu::store(row_stats + (N * E + row * E + e), acc_t(0));
      }
      if (lane == 0) gpu::store(row_loss + row, acc_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    acc_t total = acc_t(0);
    for (int64_t e = 0; e < E; ++e) {
      const scalar_t* z = logits + (row * E + e) * p.num_classes;
      const acc_t* adjustment = p.adjustments + e * p.num_classes;
      auto state = math::empty_softmax_state<acc_t>();
      auto scalar_element = [&](int c) {
        accumulate(state, math::adjusted_logit(static_cast<acc_t>(gpu::load(z + c)), gpu::load(adjustment + c)));
      };
      const RowSplit split = split_row(z, C);
      if (lane < split.head) scalar_element(lane);
      for (int first = lane; first < split.vectors; first += GROUP * U) {
        gpu::Vector<scalar_t, V> x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) x[u] = gpu::load_vector<V>(z + split.head + v * V);
        }
        acc_t a[U * V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          const bool in_row = v < split.vectors;
          acc_t adjust[V];
          if (in_row) gpu_row_stream::load_run<V>(adjustment + split.head + v * V, adjust);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            a[u * V + i] = in_row ? math::adjusted_logit(static_cast<acc_t>(x[u].v[i]), adjust[i])
                                  : math::negative_infinity<acc_t>();
          }
        }
        merge_chunk(a, state);
      }
      if (split.tail_begin + lane < C) scalar_element(split.tail_begin + lane);
      reduce_state<GROUP>(state, scratch_state, scratch_a, scratch_b);
      if (lane == 0) {
        const math::RowLogSumExp<acc_t> finished = math::finish_row(state);
        gpu::store(row_stats + (row * E + e), finished.max);
        gpu::store(row_stats + (N * E + row * E + e), finished.log_sum);
        const acc_t target_logit = math::adjusted_logit(static_cast<acc_t>(gpu::load(z + y)), gpu::load(adjustment + y));
        total += finished.log_sum - (target_logit - finished.max);
      }
    }
    if (lane == 0) {
      gpu::store(row_loss + row, total);
      group_loss += static_cast<double>(total);
      group_count += 1.0;
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_count, partials, partial_loss, partial_count);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

// Each gradient row is split on its own 16-byte boundaries (every store a vector); the logits run
// beside it is one aligned vector when the logits share the gradient's split, else load_elements'
// two (a logits view at an odd storage offset).
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    diverse_backward_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                            const at::opmath_type<scalar_t>* __restrict__ row_stats,
                            const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                            const at::opmath_type<scalar_t>* __restrict__ denominator,
                            scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  const int lane = threadIdx.x % GROUP;
  const int64_t E = p.num_experts, N = p.num_rows;
  const int C = static_cast<int>(p.num_classes);
  const scalar_t* const logits_end = logits + N * E * p.num_classes;
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g = grad_logits + row * E * p.num_classes;
    const int64_t y = gpu::load(p.target + row);
    if (y == p.ignore_index) {
      for (int64_t e = 0; e < E; ++e) fill_row<GROUP>(g + e * p.num_classes, C, lane, scalar_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const int y_c = static_cast<int>(y);
    const acc_t scale = per_row_grad ? gpu::load(grad_loss + row) : shared_scale;
    for (int64_t e = 0; e < E; ++e) {
      const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + (row * E + e)), gpu::load(row_stats + (N * E + row * E + e))};
      const scalar_t* z = logits + (row * E + e) * p.num_classes;
      scalar_t* out = g + e * p.num_classes;
      const acc_t* adjustment = p.adjustments + e * p.num_classes;
      if (math::row_is_nan(stats)) {  // NaN/inf in the row: NaN gradients, as F.cross_entropy
        fill_row<GROUP>(out, C, lane, static_cast<scalar_t>(stats.log_sum));
        continue;
      }
      auto gradient = [&](acc_t zc, acc_t adjust, int c) -> acc_t {
        const acc_t prob = math::softmax_probability(math::adjusted_logit(zc, adjust), stats);
        return c == y_c ? scale * prob - scale : scale * prob;
      };
      auto scalar_gradient = [&](int c) -> acc_t {
        return gradient(static_cast<acc_t>(gpu::load(z + c)), gpu::load(adjustment + c), c);
      };
      const RowSplit split = split_row(out, C);
      if (lane < split.head) gpu::store(out + lane, scalar_gradient(lane));
      for (int first = lane; first < split.vectors; first += GROUP * U) {
        gpu::Vector<scalar_t, V> x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) x[u] = load_elements<V>(z + split.head + v * V, logits, logits_end);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) {
            const int c0 = split.head + v * V;
            acc_t adjust[V];
            gpu_row_stream::load_run<V>(adjustment + c0, adjust);
            gpu::Vector<scalar_t, V> result;
#pragma unroll
            for (int i = 0; i < V; ++i) {
              result.v[i] = static_cast<scalar_t>(gradient(static_cast<acc_t>(x[u].v[i]), adjust[i], c0 + i));
            }
            gpu::store_vector<V>(out + c0, result);
          }
        }
      }
      if (split.tail_begin + lane < C) gpu::store(out + split.tail_begin + lane, scalar_gradient(split.tail_begin + lane));
    }
  }
}

// ------------------------------------------------------------------------------ ride_loss
// Vectors per thread and iteration of the RIDE row kernels: half the other kernels' (8 elements of
// 2 or 4 bytes), as each element carries two softmaxes and its 1 / T_c (a division). With 16,
// ptxas (sm_90) gave ride_forward_kernel 181-188 registers for bf16/float (one 256-thread block per
// SM) and, capped at 128, spilled ~350 bytes; with 8: 100 (bf16) and 128 (float), no spills.
template <typename scalar_t>
constexpr int kRideUnroll = kVectorUnroll<scalar_t> / 2;

// loss = CE_sum / W + diversity_factor Tbar^2 KL_sum / N', denominators = (W, N', Tbar), from the
// partials [4, num_blocks], by every thread of one block in a fixed order (the last block of
// ride_forward_kernel, or ride_finish_kernel).
template <typename acc_t, typename Scratch>
__device__ void ride_finish(const double* partials, int64_t num_blocks, const KernelParams<acc_t>& p, acc_t* loss,
                            acc_t* denominators, Scratch& scratch) {
  const double ce = gpu_reduce::sum_in_block(partials, num_blocks, scratch);
  const double weight = gpu_reduce::sum_in_block(partials + num_blocks, num_blocks, scratch);
  const double kl = gpu_reduce::sum_in_block(partials + 2 * num_blocks, num_blocks, scratch);
  const double count = gpu_reduce::sum_in_block(partials + 3 * num_blocks, num_blocks, scratch);
  double temperature = 0.0;
  for (int64_t c = threadIdx.x; c < p.num_classes; c += kBlockThreads) {
    temperature += static_cast<double>(p.temperature ? p.base_temperature * gpu::load(p.temperature + c) : p.base_temperature);
  }
  const double mean_temperature = gpu_reduce::block_sum(temperature, scratch) / static_cast<double>(p.num_classes);
  if (threadIdx.x == 0) {
    gpu::store(loss, ce / weight + p.diversity_factor * mean_temperature * mean_temperature * kl / count);
    gpu::store(denominators, static_cast<acc_t>(weight));
    gpu::store(denominators + 1, static_cast<acc_t>(count));
    gpu::store(denominators + 2, static_cast<acc_t>(mean_temperature));
  }
}

// Per sample: row_stats [2, N, 2E + 1] (multi_expert.h) and the block's sums (double [4, gridDim.x]:
// weighted CE, target weights, KL, rows). The expert rows are each split on their own boundaries;
// the expert-mean pass takes expert 0's split and reads the other experts' runs with load_elements.
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    ride_forward_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                        at::opmath_type<scalar_t>* __restrict__ row_stats, double* __restrict__ partials,
                        gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kRideUnroll<scalar_t>;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_a, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_b, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_a, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_b, kRowsPerBlock);
  double group_ce = 0.0, group_weight = 0.0, group_kl = 0.0, group_count = 0.0;
  const int lane = threadIdx.x % GROUP;
  const int64_t E = p.num_experts, N = p.num_rows, S = 2 * E + 1;
  const int C = static_cast<int>(p.num_classes);
  const scalar_t* const logits_end = logits + N * E * p.num_classes;
  acc_t* max_out = row_stats;
  acc_t* log_sum_out = row_stats + N * S;
  const acc_t inverse_e = acc_t(1) / static_cast<acc_t>(E);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t y = gpu::load(p.target + row);
    if (y == p.ignore_index) {
      for (int64_t j = lane; j < S; j += GROUP) {
        gpu::store(max_out + (row * S + j), acc_t(0));
        gpu::store(log_sum_out + (row * S + j), acc_t(0));
      }
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const int y_c = static_cast<int>(y);
    const scalar_t* block = logits + row * E * p.num_classes;
    const acc_t margin = p.target_margin ? gpu::load(p.target_margin + y) : acc_t(0);
    double ce = 0.0, kl = 0.0, tempered_max_sum = 0.0;
    // shift: the largest tempered row max (every thread has it: the reduced states are everyone's).
    acc_t shift = math::negative_infinity<acc_t>();
    for (int64_t k = 0; k < E; ++k) {
      const scalar_t* z = block + k * p.num_classes;
      auto ce_state = math::empty_softmax_state<acc_t>();
      auto t_state = math::empty_softmax_state<acc_t>();
      auto scalar_element = [&](int c) {
        const acc_t value = static_cast<acc_t>(gpu::load(z + c));
        accumulate(ce_state, c == y_c ? value - margin : value);
        accumulate(t_state, tempered_logit(value, inverse_temperature(p, c)));
      };
      const RowSplit split = split_row(z, C);
      if (lane < split.head) scalar_element(lane);
      for (int first = lane; first < split.vectors; first += GROUP * U) {
        gpu::Vector<scalar_t, V> x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) x[u] = gpu::load_vector<V>(z + split.head + v * V);
        }
        acc_t a_ce[U * V], a_t[U * V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          const bool in_row = v < split.vectors;
          const int c0 = split.head + v * V;
          acc_t inv_t[V];
          if (in_row) inverse_temperatures<V>(p, c0, inv_t);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const acc_t value = static_cast<acc_t>(x[u].v[i]);
            a_ce[u * V + i] = in_row ? (c0 + i == y_c ? value - margin : value) : math::negative_infinity<acc_t>();
            a_t[u * V + i] = in_row ? tempered_logit(value, inv_t[i]) : math::negative_infinity<acc_t>();
          }
        }
        merge_chunk(a_ce, ce_state);
        merge_chunk(a_t, t_state);
      }
      if (split.tail_begin + lane < C) scalar_element(split.tail_begin + lane);
      reduce_state<GROUP>(ce_state, scratch_state, scratch_a, scratch_b);
      reduce_state<GROUP>(t_state, scratch_state, scratch_a, scratch_b);
      const math::RowLogSumExp<acc_t> finished_t = math::finish_row(t_state);
      shift = nan_propagating_max(shift, finished_t.max);
      if (lane == 0) {
        const math::RowLogSumExp<acc_t> finished_ce = math::finish_row(ce_state);
        gpu::store(max_out + (row * S + k), finished_ce.max);
        gpu::store(log_sum_out + (row * S + k), finished_ce.log_sum);
        gpu::store(max_out + (row * S + E + k), finished_t.max);
        gpu::store(log_sum_out + (row * S + E + k), finished_t.log_sum);
        const acc_t target_logit = static_cast<acc_t>(gpu::load(z + y)) - margin;
        ce += static_cast<double>(finished_ce.log_sum - (target_logit - finished_ce.max));
        // Kept apart from the log-sums: E float32 maxes and E s add up exactly in float64.
        tempered_max_sum += static_cast<double>(finished_t.max);
        kl += static_cast<double>(finished_t.log_sum);
      }
    }
    // The softmax of the expert mean: runs of expert 0's split, each expert's run added in expert
    // order (the arithmetic of shifted_tempered_mean, element by element).
    auto bar_state = math::empty_softmax_state<acc_t>();
    auto scalar_mean = [&](int c) {
      accumulate(bar_state, shifted_tempered_mean<scalar_t, acc_t>(block, E, p.num_classes, c, inverse_temperature(p, c), shift));
    };
    const RowSplit split = split_row(block, C);
    if (lane < split.head) scalar_mean(lane);
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      acc_t inv_t[U][V], total[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) inverse_temperatures<V>(p, split.head + v * V, inv_t[u]);
      }
      for (int64_t k = 0; k < E; ++k) {
        gpu::Vector<scalar_t, V> x[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) x[u] = load_elements<V>(block + k * p.num_classes + split.head + v * V, logits, logits_end);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const acc_t term = tempered_logit(static_cast<acc_t>(x[u].v[i]), inv_t[u][i]) - shift;
            total[u * V + i] = k == 0 ? term : total[u * V + i] + term;
          }
        }
      }
      acc_t w[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in_row = first + u * GROUP < split.vectors;
#pragma unroll
        for (int i = 0; i < V; ++i) w[u * V + i] = in_row ? total[u * V + i] * inverse_e : math::negative_infinity<acc_t>();
      }
      merge_chunk(w, bar_state);
    }
    if (split.tail_begin + lane < C) scalar_mean(split.tail_begin + lane);
    reduce_state<GROUP>(bar_state, scratch_state, scratch_a, scratch_b);
    if (lane == 0) {
      const math::RowLogSumExp<acc_t> finished_bar = math::finish_row(bar_state);
      gpu::store(max_out + (row * S + 2 * E), finished_bar.max);
      gpu::store(log_sum_out + (row * S + 2 * E), finished_bar.log_sum);
      // sum_k KL(pbar || p_k) = sum_k lse(z_k / T) - E lse(zbar / T) (multi_expert.h), with
      // lse(zbar / T) = s + m_w + log_sum_w: sum_k (m_k + log_sum_k) - E s is formed first, in float64.
      kl += tempered_max_sum - static_cast<double>(E) * static_cast<double>(shift);
      kl -= static_cast<double>(E) *
            (static_cast<double>(finished_bar.max) + static_cast<double>(finished_bar.log_sum));
      const double w = p.weight ? static_cast<double>(gpu::load(p.weight + y)) : 1.0;
      group_ce += w * ce;
      group_weight += w;
      group_kl += kl;
      group_count += 1.0;
    }
  }
  gpu_reduce::write_block_partials<GROUP>(group_ce, group_weight, partials, partial_a, partial_b);
  __syncthreads();  // partial_a/b are reused
  gpu_reduce::write_block_partials<GROUP>(group_kl, group_count, partials + 2 * gridDim.x, partial_a, partial_b);
  gpu_reduce::finish_in_last_block(finish.ticket, [&](auto& scratch) {
    ride_finish(partials, gridDim.x, p, finish.loss, finish.denominator, scratch);
  });
}

// One block finishes (ride_finish) after the row kernel: under CUDA graph capture, and alone when N = 0.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    ride_finish_kernel(const double* __restrict__ partials, int64_t num_blocks, KernelParams<acc_t> p,
                       acc_t* __restrict__ loss, acc_t* __restrict__ denominators) {
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  ride_finish(partials, num_blocks, p, loss, denominators, scratch);
}

// Each gradient row k is split on its own 16-byte boundaries (every store a vector); the expert
// mean of its classes reads every expert's run beside it (load_elements: rows of other experts start
// elsewhere at C * sizeof(T) not a multiple of 16), the other runs from L1/L2.
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    ride_backward_kernel(const scalar_t* __restrict__ logits, KernelParams<at::opmath_type<scalar_t>> p,
                         const at::opmath_type<scalar_t>* __restrict__ row_stats,
                         const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                         const at::opmath_type<scalar_t>* __restrict__ denominators,
                         scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kRideUnroll<scalar_t>;
  const int lane = threadIdx.x % GROUP;
  const int64_t E = p.num_experts, N = p.num_rows, S = 2 * E + 1;
  const int C = static_cast<int>(p.num_classes);
  const scalar_t* const logits_end = logits + N * E * p.num_classes;
  const acc_t* max_in = row_stats;
  const acc_t* log_sum_in = row_stats + N * S;
  const acc_t inverse_e = acc_t(1) / static_cast<acc_t>(E);
  const double g = static_cast<double>(gpu::load(grad_loss));
  const double mean_temperature = static_cast<double>(gpu::load(denominators + 2));
  const acc_t kl_scale = static_cast<acc_t>(g * p.diversity_factor * mean_temperature * mean_temperature /
                                            static_cast<double>(gpu::load(denominators + 1)));
  const double ce_scale = g / static_cast<double>(gpu::load(denominators));
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* out = grad_logits + row * E * p.num_classes;
    const int64_t y = gpu::load(p.target + row);
    if (y == p.ignore_index) {
      for (int64_t k = 0; k < E; ++k) fill_row<GROUP>(out + k * p.num_classes, C, lane, scalar_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    bool nan_row = false;
    for (int64_t j = 0; j < S; ++j) {
      const acc_t log_sum = gpu::load(log_sum_in + (row * S + j));
      nan_row = nan_row || log_sum != log_sum;
    }
    if (nan_row) {  // NaN/inf in the sample's logits: NaN gradients
      for (int64_t k = 0; k < E; ++k) fill_row<GROUP>(out + k * p.num_classes, C, lane, static_cast<scalar_t>(NAN));
      continue;
    }
    const int y_c = static_cast<int>(y);
    const acc_t ce_coef = static_cast<acc_t>(ce_scale * (p.weight ? static_cast<double>(gpu::load(p.weight + y)) : 1.0));
    const acc_t margin = p.target_margin ? gpu::load(p.target_margin + y) : acc_t(0);
    const math::RowLogSumExp<acc_t> bar{gpu::load(max_in + (row * S + 2 * E)), gpu::load(log_sum_in + (row * S + 2 * E))};
    acc_t shift = math::negative_infinity<acc_t>();
    for (int64_t k = 0; k < E; ++k) shift = nan_propagating_max(shift, gpu::load(max_in + (row * S + E + k)));
    const scalar_t* block = logits + row * E * p.num_classes;
    for (int64_t k = 0; k < E; ++k) {
      const math::RowLogSumExp<acc_t> ce_stats{gpu::load(max_in + (row * S + k)), gpu::load(log_sum_in + (row * S + k))};
      const math::RowLogSumExp<acc_t> t_stats{gpu::load(max_in + (row * S + E + k)), gpu::load(log_sum_in + (row * S + E + k))};
      scalar_t* out_k = out + k * p.num_classes;
      // d loss / d z_kc from z_kc, the shifted expert mean w_c and 1 / T_c.
      auto gradient = [&](acc_t z, acc_t mean, acc_t inv_t, int c) -> acc_t {
        const acc_t pbar = math::softmax_probability(mean, bar);
        const acc_t q = math::softmax_probability(c == y_c ? z - margin : z, ce_stats);
        const acc_t prob = math::softmax_probability(tempered_logit(z, inv_t), t_stats);
        const acc_t ce_grad = c == y_c ? ce_coef * (q - acc_t(1)) : ce_coef * q;
        return ce_grad + kl_scale * inv_t * (prob - pbar);
      };
      auto scalar_gradient = [&](int c) -> acc_t {
        const acc_t inv_t = inverse_temperature(p, c);
        const acc_t mean = shifted_tempered_mean<scalar_t, acc_t>(block, E, p.num_classes, c, inv_t, shift);
        return gradient(static_cast<acc_t>(gpu::load(block + (k * p.num_classes + c))), mean, inv_t, c);
      };
      const RowSplit split = split_row(out_k, C);
      if (lane < split.head) gpu::store(out_k + lane, scalar_gradient(lane));
      for (int first = lane; first < split.vectors; first += GROUP * U) {
        acc_t inv_t[U][V], total[U][V], own[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) inverse_temperatures<V>(p, split.head + v * V, inv_t[u]);
        }
        for (int64_t j = 0; j < E; ++j) {
          gpu::Vector<scalar_t, V> x[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int v = first + u * GROUP;
            if (v < split.vectors) x[u] = load_elements<V>(block + j * p.num_classes + split.head + v * V, logits, logits_end);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
              const acc_t z = static_cast<acc_t>(x[u].v[i]);
              const acc_t term = tempered_logit(z, inv_t[u][i]) - shift;
              total[u][i] = j == 0 ? term : total[u][i] + term;
              if (j == k) own[u][i] = z;
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = first + u * GROUP;
          if (v < split.vectors) {
            const int c0 = split.head + v * V;
            gpu::Vector<scalar_t, V> result;
#pragma unroll
            for (int i = 0; i < V; ++i) {
              result.v[i] = static_cast<scalar_t>(gradient(own[u][i], total[u][i] * inverse_e, inv_t[u][i], c0 + i));
            }
            gpu::store_vector<V>(out_k + c0, result);
          }
        }
      }
      if (split.tail_begin + lane < C) gpu::store(out_k + split.tail_begin + lane, scalar_gradient(split.tail_begin + lane));
    }
  }
}

// ------------------------------------------------------------------------------ launch plan
// The row kernels index within a row in 32 bits.
inline void check_class_count(int64_t num_classes) {
  if (!gpu_row_stream::fits_row_index(num_classes)) {
    throw std::invalid_argument("ltfast multi-expert loss (CUDA): logits have " + std::to_string(num_classes) +
                                " classes; expected at most 2^31 - 1");
  }
}

inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes) {
  return gpu_reduce::row_blocks_for_classes(num_rows, num_classes);
}

// diverse_expert_loss forward: the row kernel, whose last block (reduce) finishes the loss from its
// partials (double [2, row_kernel_blocks]) when `ticket` (gpu::ticket_counter) is given; else (CUDA
// graph capture) the one-block finish kernel follows. With N = 0 the finish kernel alone sums the
// partials, zeros filled by the caller.
template <typename scalar_t>
void launch_diverse_forward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                            at::opmath_type<scalar_t>* row_loss, at::opmath_type<scalar_t>* row_stats, bool reduce,
                            bool mean, double* partials, at::opmath_type<scalar_t>* loss,
                            at::opmath_type<scalar_t>* denominator, unsigned int* ticket, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.num_rows > 0) {
    check_class_count(p.num_classes);
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("multi_expert diverse_forward_kernel", &diverse_forward_kernel<scalar_t, kGroup>,
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_loss, row_stats,
                  reduce ? partials : static_cast<double*>(nullptr),
                  gpu_reduce::FinishArgs<acc_t>{reduce ? ticket : nullptr, mean, loss, denominator});
    });
  }
  if (reduce && (p.num_rows == 0 || ticket == nullptr)) {
    gpu::launch("multi_expert diverse finish_mean_kernel", &gpu_reduce::finish_mean_kernel<acc_t>, 1, kBlockThreads,
                stream, static_cast<const double*>(partials),
                static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes)), mean, loss, denominator);
  }
}

template <typename scalar_t>
void launch_diverse_backward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                             const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* grad_loss,
                             bool per_row_grad, const at::opmath_type<scalar_t>* denominator, scalar_t* grad_logits,
                             gpu::Stream stream) {
  if (p.num_rows == 0) return;
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("multi_expert diverse_backward_kernel", &diverse_backward_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_stats, grad_loss,
                per_row_grad, denominator, grad_logits);
  });
}

// ride_loss forward: the row kernel, whose last block finishes when `ticket` (gpu::ticket_counter)
// is given, else (CUDA graph capture; N = 0, alone) the finish kernel. partials: double [4,
// row_kernel_blocks] (zeros filled by the caller when N = 0).
template <typename scalar_t>
void launch_ride_forward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                         at::opmath_type<scalar_t>* row_stats, double* partials, at::opmath_type<scalar_t>* loss,
                         at::opmath_type<scalar_t>* denominators, unsigned int* ticket, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.num_rows > 0) {
    check_class_count(p.num_classes);
    gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("multi_expert ride_forward_kernel", &ride_forward_kernel<scalar_t, kGroup>,
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_stats, partials,
                  gpu_reduce::FinishArgs<acc_t>{ticket, true, loss, denominators});
    });
  }
  if (p.num_rows == 0 || ticket == nullptr) {
    gpu::launch("multi_expert ride_finish_kernel", &ride_finish_kernel<acc_t>, 1, kBlockThreads, stream,
                static_cast<const double*>(partials),
                static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes)), p, loss, denominators);
  }
}

template <typename scalar_t>
void launch_ride_backward(const scalar_t* logits, const KernelParams<at::opmath_type<scalar_t>>& p,
                          const at::opmath_type<scalar_t>* row_stats, const at::opmath_type<scalar_t>* grad_loss,
                          const at::opmath_type<scalar_t>* denominators, scalar_t* grad_logits, gpu::Stream stream) {
  if (p.num_rows == 0) return;
  check_class_count(p.num_classes);
  gpu_reduce::with_row_group(p.num_classes, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("multi_expert ride_backward_kernel", &ride_backward_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, logits, p, row_stats, grad_loss,
                denominators, grad_logits);
  });
}

}  // namespace multi_expert_kernels
}  // namespace ltfast
