// CUDA kernels of LADE and their launch plan, with no torch glue (compiled by nvcc through
// lade_cuda.cu, and by the host compiler for the SIMT emulator). Saved statistics: lade.h.
//
// Forward, after the cross-entropy family's row kernel (PriorCE rows and their block partials):
//   1. column pass: a block covers a tile of up to 2040 (bf16) classes x a block of rows, streams
//      each row's slice in 16-byte vectors (column_partials_kernel); its threads split the rows
//      too when C is small (C = 10: 4 column threads x 64 row lanes), merge their column states in
//      shared memory in a fixed order, and write one partial per (row block, class) plus the row
//      block's count of non-ignored rows;
//   2. per-class finish over a grid (a thread per class): merges the row blocks' partials in
//      order, writes column_stats and the class's LADER term, summed per block in a fixed order;
//   3. scalar finish, one block: the PriorCE sum, the row count and the LADER partials.
// Backward, one launch: a row group per row (gpu_reduce::with_row_group), each element's row and
// column softmax from the saved statistics; the logits read once, the gradient written once, both
// in 16-byte vectors with a scalar head and tail per row (gpu_row_stream).
// Deterministic (no atomics), no host synchronisation.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/gpu_row_stream.cuh"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace lade_kernels {

using gpu_reduce::kBlockThreads;
using gpu_row_stream::fill_row;
using gpu_row_stream::kVectorElements;
using gpu_row_stream::kVectorUnroll;
using gpu_row_stream::RowSplit;
using gpu_row_stream::split_row;
// At most this many row blocks in the column pass: with C = 1000 that is 4 x 64 = 256 blocks (an
// H100 has 132 SMs), and the per-class finish merges at most 64 partials per class.
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMinRowsPerBlock = 64;
// Classes per column-pass tile: 255 16-byte vectors, so that a tile's head, body and tail take at
// most one block of column threads (2040 bf16 classes: C = 8142 is 4 tiles).
template <typename scalar_t>
constexpr int kTileColumns = (kBlockThreads - 1) * kVectorElements<scalar_t>;
// Rows whose vectors a column thread loads before merging any: 4 x 16 bytes in flight per thread.
constexpr int kColumnRowUnroll = 4;

// The head and the tail of a row slice (< V elements, against a 16-byte boundary) as the column
// pass loads them, into the slots of a vector that their classes take: in naturally aligned pieces
// of V/2, V/4, ..., 1 elements (bf16: at most 8, 4 and 2 bytes), as the bits of their length say.
// One thread owns them, so each load is a warp request of its own: element loads (up to 7 per end)
// measured 0.930 sector efficiency at 64 x 8142 bf16, where the tiles' slices start unaligned.
template <int W, int V, typename T>
__device__ __forceinline__ void load_piece(const T* address, int slot, gpu::Vector<T, V>& out) {
  T piece[W];
  if constexpr (W == 1) {
    piece[0] = gpu::load(address);
  } else {
    const gpu::Vector<T, W> loaded = gpu::load_vector<W>(address);
#pragma unroll
    for (int i = 0; i < W; ++i) piece[i] = loaded.v[i];
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      if (k == slot + i) out.v[k] = piece[i];
    }
  }
}

// n elements ending at the 16-byte boundary `end`, into slots V - n .. V - 1 (pieces from the end).
template <int W, int V, typename T>
__device__ __forceinline__ void load_head_pieces(const T* end, int n, int slot, gpu::Vector<T, V>& out) {
  if constexpr (W >= 1) {
    if (n & W) {
      slot -= W;
      load_piece<W>(end - (V - slot), slot, out);
    }
    load_head_pieces<W / 2>(end, n, slot, out);
  }
}

// n elements from the 16-byte boundary `begin`, into slots 0 .. n - 1 (pieces from the start).
template <int W, int V, typename T>
__device__ __forceinline__ void load_tail_pieces(const T* begin, int n, int slot, gpu::Vector<T, V>& out) {
  if constexpr (W >= 1) {
    if (n & W) {
      load_piece<W>(begin + slot, slot, out);
      slot += W;
    }
    load_tail_pieces<W / 2>(begin, n, slot, out);
  }
}

// Column pass. A block covers a tile of up to kTileColumns<scalar_t> classes (255 16-byte vectors)
// x a block of rows. Each row's slice of the tile is split at its own first 16-byte boundary
// (gpu_row_stream::split_row): a scalar head, 16-byte vectors, a scalar tail. Column thread j owns
// the tile's "virtual vector" j of that split: the head (j = 0), body vector j - 1, or the tail
// (j = vectors + 1). With C * sizeof(T) not a multiple of 16 the split moves from row to row, but
// rows i and i + row_phases share it (bf16: 8 phases at odd C, 4 at C = 8142, 1 at C = 1000). So
// the block walks the rows phase by phase; in a phase every thread keeps the online column
// softmax, target sum and count of its <= V classes in registers, over the rows of its row lane
// (the threads past the column threads split the rows: C = 10 needs 4 column threads, 64 row
// lanes), loading kColumnRowUnroll rows' vectors before merging any. At the end of a phase the row
// lanes merge their registers into the tile's shared column states in lane order; a class belongs
// to one thread of each lane, so the merges need no atomics and the order is fixed. Element-wise
// 2-byte loads measured 0.695 (64 x 8142) and 0.796 (256 x 1000) sector efficiency in the
// emulator; the vectors >= 0.9 (tests/test_memory_traffic.py).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    column_partials_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N,
                           int64_t C, int64_t rows_per_block, int64_t ignore_index, int column_threads,
                           int row_phases, at::opmath_type<scalar_t>* __restrict__ partials,
                           int64_t* __restrict__ count_partials, int64_t* __restrict__ valid_partials) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kColumnRowUnroll;
  constexpr int kTile = kTileColumns<scalar_t>;
  LTFAST_SHARED_ARRAY(acc_t, tile_max, kTile);
  LTFAST_SHARED_ARRAY(acc_t, tile_sum, kTile);
  LTFAST_SHARED_ARRAY(acc_t, tile_target_sum, kTile);
  LTFAST_SHARED_ARRAY(int, tile_count, kTile);  // <= rows_per_block
  LTFAST_SHARED_ARRAY(int64_t, lane_valid, kBlockThreads);
  const int column_thread = threadIdx.x % column_threads;
  const int row_lane = threadIdx.x / column_threads;
  const int row_lanes = kBlockThreads / column_threads;
  const int64_t c0 = int64_t(blockIdx.x) * kTile;
  const int width = static_cast<int>(C - c0 < kTile ? C - c0 : kTile);
  const int64_t first = int64_t(blockIdx.y) * rows_per_block;
  const int64_t last = first + rows_per_block < N ? first + rows_per_block : N;
  for (int c = threadIdx.x; c < width; c += kBlockThreads) {
    tile_max[c] = math::negative_infinity<acc_t>();
    tile_sum[c] = acc_t(0);
    tile_target_sum[c] = acc_t(0);
    tile_count[c] = 0;
  }
  int64_t valid = 0;  // non-ignored rows of this thread's row lane; exact: a float count stops at 2^24
  const int64_t row_step = int64_t(row_phases) * row_lanes;
  for (int phase = 0; phase < row_phases && first + phase < last; ++phase) {  // uniform over the block
    const RowSplit split = split_row(logits + (first + phase) * C + c0, width);
    // Classes lo .. lo + V - 1 of the tile: those in [0, width) are this thread's (the head's and
    // the tail's partly, none past the tail).
    const int lo = split.head + (column_thread - 1) * V;
    const bool full = column_thread >= 1 && column_thread <= split.vectors;  // 16-byte aligned
    const bool owns_classes = lo + V > 0 && lo < width;
    const bool head_at_boundary = split.head < width;  // else the slice ends first
    bool mine[V];
#pragma unroll
    for (int k = 0; k < V; ++k) mine[k] = full || (lo + k >= 0 && lo + k < width);
    math::SoftmaxState<acc_t> state[V];
    acc_t target_sum[V];
    int count[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      state[k] = math::empty_softmax_state<acc_t>();
      target_sum[k] = acc_t(0);
      count[k] = 0;
    }
    for (int64_t base = first + phase + int64_t(row_lane) * row_phases; base < last; base += row_step * U) {
      gpu::mark_row_start();
      int64_t row_target[U];
      gpu::Vector<scalar_t, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // U independent predicated loads before any use
        const int64_t row = base + u * row_step;
        const int64_t y = row < last ? gpu::load(target + row) : ignore_index;  // a broadcast load per warp
        row_target[u] = y;
        if (y == ignore_index) continue;
        // once per row, outside the class loop
        CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
        ++valid;
        if (!owns_classes) continue;
        const scalar_t* z = logits + row * C + c0;
        if (full) {
          x[u] = gpu::load_vector<V>(z + lo);
        } else if (column_thread != 0) {  // the tail: from a 16-byte boundary
          load_tail_pieces<V / 2>(z + split.tail_begin, width - split.tail_begin, 0, x[u]);
        } else if (head_at_boundary) {
          load_head_pieces<V / 2>(z + split.head, split.head, V, x[u]);
        } else {  // a slice shorter than its way to the boundary (width < V)
#pragma unroll
          for (int k = 0; k < V; ++k) {
            if (mine[k]) x[u].v[k] = gpu::load(z + (lo + k));
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (row_target[u] == ignore_index || !owns_classes) continue;
        const int64_t target_k = row_target[u] - (c0 + lo);  // the target's slot, if in [0, V)
#pragma unroll
        for (int k = 0; k < V; ++k) {
          if (!mine[k]) continue;
          const acc_t zk = static_cast<acc_t>(x[u].v[k]);
          state[k] = math::merge_softmax_states(state[k], math::SoftmaxState<acc_t>{zk, acc_t(1)});
          if (target_k == k) {
            target_sum[k] += zk;
            ++count[k];
          }
        }
      }
    }
    // Lane order: deterministic. Lanes past the phase's row count hold empty states: C = 10 with
    // 64 rows per block has 16 rows per phase for 64 row lanes, so 16 barriers per phase, not 64.
    const int64_t rows_from_phase = last - first - phase;  // the phase has ceil(this / row_phases) rows
    const int merging_lanes = rows_from_phase > int64_t(row_lanes - 1) * row_phases
                                  ? row_lanes
                                  : (static_cast<int>(rows_from_phase) + row_phases - 1) / row_phases;
    for (int lane = 0; lane < merging_lanes; ++lane) {
      __syncthreads();
      if (row_lane != lane || !owns_classes) continue;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (!mine[k]) continue;
        const int c = lo + k;
        const auto merged =
            math::merge_softmax_states(math::SoftmaxState<acc_t>{tile_max[c], tile_sum[c]}, state[k]);
        tile_max[c] = merged.max;
        tile_sum[c] = merged.sum;
        tile_target_sum[c] += target_sum[k];
        tile_count[c] += count[k];
      }
    }
  }
  if (column_thread == 0) lane_valid[row_lane] = valid;
  __syncthreads();
  const int64_t slot = int64_t(blockIdx.y) * C + c0;
  const int64_t plane = int64_t(gridDim.y) * C;
  for (int c = threadIdx.x; c < width; c += kBlockThreads) {
    gpu::store(partials + slot + c, tile_max[c]);
    gpu::store(partials + plane + slot + c, tile_sum[c]);
    gpu::store(partials + 2 * plane + slot + c, tile_target_sum[c]);
    gpu::store(count_partials + slot + c, static_cast<int64_t>(tile_count[c]));
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    int64_t block_valid = 0;
    for (int r = 0; r < row_lanes; ++r) block_valid += lane_valid[r];
    gpu::store(valid_partials + blockIdx.y, block_valid);
  }
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

// The per-class values of the backward V classes from c0 need: column_stats rows 0-2 (lade.h) and,
// with the CE term, log_prior. count == V (the vector body): in the widest loads their alignment
// allows (gpu_row_stream::load_run); else one element (a head or tail element, at index 0).
template <int V, typename acc_t>
struct ColumnValues {
  acc_t column_max[V];
  acc_t column_log_sum[V];
  acc_t sigma_coef[V];
  acc_t log_prior[V];

  __device__ __forceinline__ void load(const acc_t* column_stats, const acc_t* log_prior_c, int64_t C, int c0,
                                       int count) {
    if (count == V) {
      gpu_row_stream::load_run<V>(column_stats + c0, column_max);
      gpu_row_stream::load_run<V>(column_stats + C + c0, column_log_sum);
      gpu_row_stream::load_run<V>(column_stats + 2 * C + c0, sigma_coef);
      if (log_prior_c) gpu_row_stream::load_run<V>(log_prior_c + c0, log_prior);
    } else {
      column_max[0] = gpu::load(column_stats + c0);
      column_log_sum[0] = gpu::load(column_stats + C + c0);
      sigma_coef[0] = gpu::load(column_stats + 2 * C + c0);
      if (log_prior_c) log_prior[0] = gpu::load(log_prior_c + c0);
    }
  }
};

// A row group per row; each row of the logits (and of the gradient, when it shares their split)
// is streamed as a scalar head, 16-byte vectors and a scalar tail (gpu_row_stream::split_row), as
// the soft-target backward: element-wise 2-byte loads measured 0.695 / 0.796 sector efficiency.
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                    const at::opmath_type<scalar_t>* __restrict__ log_prior,
                    const at::opmath_type<scalar_t>* __restrict__ row_stats,
                    const at::opmath_type<scalar_t>* __restrict__ column_stats,
                    const at::opmath_type<scalar_t>* __restrict__ grad_loss, const int64_t* __restrict__ num_valid,
                    int64_t N, int64_t num_classes, int64_t ignore_index, double ce_weight,
                    scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = kVectorElements<scalar_t>;
  // float64: 4 vectors of 2 (not kVectorUnroll's 8), as 8 took 128 registers and spilled 64 bytes
  constexpr int U = kVectorUnroll<scalar_t> < 4 ? kVectorUnroll<scalar_t> : 4;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(num_classes);
  const acc_t g = gpu::load(grad_loss);
  const bool with_ce = ce_weight != 0.0;
  const acc_t ce_coef = with_ce ? g * static_cast<acc_t>(ce_weight) / static_cast<acc_t>(gpu::load(num_valid)) : acc_t(0);
  // column_stats layout: lade.h (M_c, L_c, sigma coefficient, target coefficient).
  const acc_t* target_coef = column_stats + 3 * num_classes;
  const acc_t* class_log_prior = with_ce ? log_prior : nullptr;
  // The gradient rows share the logits rows' split when their bases are equally far from a 16-byte
  // boundary (both have C elements per row): stored in vectors then; else element-wise.
  const bool vector_stores = gpu_row_stream::same_split(logits, grad_logits);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* out = grad_logits + row * num_classes;
    const int64_t y = gpu::load(target + row);
    if (y == ignore_index) {
      fill_row<GROUP>(out, C, lane, scalar_t(0));
      continue;
    }
    const math::RowLogSumExp<acc_t> stats{gpu::load(row_stats + row), gpu::load(row_stats + N + row)};
    if (with_ce && math::row_is_nan(stats)) {  // NaN/inf in the row: NaN gradients, as F.cross_entropy
      fill_row<GROUP>(out, C, lane, static_cast<scalar_t>(stats.log_sum));
      continue;
    }
    // The forward validated the targets; an out-of-range one here matches no class.
    const bool target_in_range = y >= 0 && y < num_classes;
    const int y_c = target_in_range ? static_cast<int>(y) : -1;
    // subtracted at the target entry (read once per row, by the lanes that store it)
    auto target_term = [&]() -> acc_t { return ce_coef + g * gpu::load(target_coef + y_c); };
    auto gradient = [&](acc_t z, int c, const ColumnValues<V, acc_t>& run, int i) -> acc_t {
      const acc_t sigma = math::exp_fn(math::log_softmax_of(z, run.column_max[i], run.column_log_sum[i]));
      acc_t value = g * run.sigma_coef[i] * sigma;
      if (with_ce) value += ce_coef * math::softmax_probability(math::adjusted_logit(z, run.log_prior[i]), stats);
      if (c == y_c) value -= target_term();
      return value;
    };
    const scalar_t* z_row = logits + row * num_classes;
    auto scalar_gradient = [&](int c) -> scalar_t {
      ColumnValues<V, acc_t> run;
      run.load(column_stats, class_log_prior, num_classes, c, 1);
      return static_cast<scalar_t>(gradient(static_cast<acc_t>(gpu::load(z_row + c)), c, run, 0));
    };
    const RowSplit split = split_row(z_row, C);
    if (lane < split.head) gpu::store(out + lane, scalar_gradient(lane));
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // U independent loads before any use
        const int v = first + u * GROUP;
        if (v < split.vectors) x[u] = gpu::load_vector<V>(z_row + split.head + v * V);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v >= split.vectors) continue;
        const int c0 = split.head + v * V;
        ColumnValues<V, acc_t> run;
        run.load(column_stats, class_log_prior, num_classes, c0, V);
        gpu::Vector<scalar_t, V> result;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          result.v[i] = static_cast<scalar_t>(gradient(static_cast<acc_t>(x[u].v[i]), c0 + i, run, i));
        }
        if (vector_stores) {
          gpu::store_vector<V>(out + c0, result);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) gpu::store(out + c0 + i, result.v[i]);
        }
      }
    }
    if (split.tail_begin + lane < C) gpu::store(out + split.tail_begin + lane, scalar_gradient(split.tail_begin + lane));
  }
}

// ------------------------------------------------------------------------------ launch plan
// Row blocks of the column pass: one per 64 rows, at most kMaxRowBlocks.
inline int64_t row_blocks_for(int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxRowBlocks, (N + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
}

// Column threads of a column-pass block: one per virtual vector of a tile's row slice (its head, its
// 16-byte body vectors, its tail: at most ceil(width / V) + 1), rounded up to a power of two; the
// block's threads past them are row lanes (C = 1000 bf16: 128 column threads x 2 row lanes).
inline int column_threads_for(int64_t C, int vector_elements) {
  const int64_t width = std::min<int64_t>(C, int64_t(kBlockThreads - 1) * vector_elements);
  const int64_t needed = (width + vector_elements - 1) / vector_elements + 1;
  int threads = 1;
  while (threads < needed) threads *= 2;
  return threads;  // <= kBlockThreads: width <= 255 vectors
}

// Rows i and i + row_phases_for(...) start equally far from a 16-byte boundary (rows of C elements
// of element_size bytes): 8 for odd C in bf16, 1 when a row is a whole number of vectors.
inline int row_phases_for(int64_t C, int64_t element_size) {
  int phases = 1;
  while ((C * element_size * phases) % 16 != 0) phases *= 2;
  return phases;
}

inline void check_class_count(int64_t num_classes) {
  if (!gpu_row_stream::fits_row_index(num_classes)) {
    throw std::invalid_argument("ltfast.lade (CUDA): logits have " + std::to_string(num_classes) +
                                " classes; expected at most 2^31 - 1");
  }
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
  check_class_count(C);
  if (N > 0) {
    const int64_t rows_per_block = (N + num_row_blocks - 1) / num_row_blocks;
    constexpr int kTile = kTileColumns<scalar_t>;
    const gpu::dim3 grid(static_cast<unsigned>((C + kTile - 1) / kTile), static_cast<unsigned>(num_row_blocks));
    gpu::launch("lade column_partials_kernel", &column_partials_kernel<scalar_t>, grid, kBlockThreads, stream, logits,
                target, N, C, rows_per_block, ignore_index, column_threads_for(C, kVectorElements<scalar_t>),
                row_phases_for(C, sizeof(scalar_t)), partials, count_partials, valid_partials);
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
  check_class_count(C);
  gpu_reduce::with_row_group(C, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("lade backward_kernel", &backward_kernel<scalar_t, kGroup>, gpu_reduce::row_blocks(N, kGroup),
                kBlockThreads, stream, logits, target, log_prior, row_stats, column_stats, grad_loss, num_valid, N, C,
                ignore_index, ce_weight, grad_logits);
  });
}

}  // namespace lade_kernels
}  // namespace ltfast
