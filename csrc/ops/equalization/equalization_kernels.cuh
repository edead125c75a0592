// CUDA kernels of the sigmoid equalization loss and their launch plan, with no torch glue (compiled
// by nvcc through equalization_cuda.cu, and by the host compiler for the SIMT emulator). A row
// group (8 lanes for C <= 32, a warp up to 1024 classes, a block beyond: gpu_reduce::with_row_group)
// sums a row's element losses; for 'mean'/'sum' each block also writes its rows' loss sum and row
// count, which the block that takes the last ticket adds in a fixed order (one launch;
// gpu_reduce::finish_in_last_block). Backward is elementwise, a row group per row.
// Both stream rows in 16-byte vectors around a scalar head and tail (gpu_row_stream::split_row);
// rows of C <= 32 classes, too short to stream one by one, go through shared-memory tiles instead
// (gpu_reduce.cuh, tiled rows; as cross_entropy_kernels.cuh). The per-element rule (non-finite
// logits, suppressed entries exactly 0) is softmax_math.h's.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/gpu_row_stream.cuh"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace equalization_kernels {

using gpu_reduce::kBlockThreads;

// ------------------------------------------------------------------------------ streamed rows
template <typename scalar_t, int GROUP>
__device__ __forceinline__ void forward_streamed_rows(const scalar_t* __restrict__ logits,
                                                      const int64_t* __restrict__ target,
                                                      const uint8_t* __restrict__ tail, int64_t N, int64_t C,
                                                      int64_t ignore_index,
                                                      at::opmath_type<scalar_t>* __restrict__ row_loss,
                                                      at::opmath_type<scalar_t>* __restrict__ unit_denominator,
                                                      double* __restrict__ partials,
                                                      const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = gpu_row_stream::kVectorElements<scalar_t>;
  constexpr int U = gpu_row_stream::kVectorUnroll<scalar_t>;
  const int C32 = static_cast<int>(C);
  LTFAST_SHARED_ARRAY(acc_t, scratch, kBlockThreads / 32);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_rows, kRowsPerBlock);
  const int lane = threadIdx.x % GROUP;
  // reduction 'none': the denominator is 1, written here rather than by a separate launch.
  if (unit_denominator != nullptr && blockIdx.x == 0 && threadIdx.x == 0) gpu::store(unit_denominator, acc_t(1));
  double group_loss = 0.0, group_rows = 0.0;  // this group's rows, summed by lane 0 in row order
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t y = gpu::load(target + row);
    if (y == ignore_index) {  // row-uniform: the whole group skips
      if (lane == 0) gpu::store(row_loss + row, acc_t(0));
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
    const scalar_t* z = logits + row * C;
    const int y32 = static_cast<int>(y);
    auto element_loss = [&](acc_t zc, int c) -> acc_t {
      return math::eql_element_loss(zc, c == y32, math::eql_suppressed(gpu::load(tail + c) != 0, c == y32));
    };
    acc_t sum = acc_t(0);
    const gpu_row_stream::RowSplit split = gpu_row_stream::split_row(z, C32);
    if (lane < split.head) sum += element_loss(static_cast<acc_t>(gpu::load(z + lane)), lane);
    // The vector body: U x V = 16 elements per thread and iteration (bf16 2 x 8, fp32 4 x 4, fp64
    // 8 x 2) take one log1p between them (math::eql_accumulate_element), where one per element was
    // the hot loop's most expensive instruction sequence (log1pf is ~20 instructions, not one MUFU).
    for (int first = lane; first < split.vectors; first += GROUP * U) {
      gpu::Vector<scalar_t, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) x[u] = gpu::load_vector<V>(z + split.head + v * V);
      }
      acc_t linear = acc_t(0), factors_minus_one = acc_t(0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = first + u * GROUP;
        if (v < split.vectors) {
          const int c0 = split.head + v * V;
          uint8_t tail_run[V];
          gpu_row_stream::load_run<V>(tail + c0, tail_run);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const bool is_target = c0 + i == y32;
            math::eql_accumulate_element(static_cast<acc_t>(x[u].v[i]), is_target,
                                         math::eql_suppressed(tail_run[i] != 0, is_target), linear,
                                         factors_minus_one);
          }
        }
      }
      sum += linear + math::log1p_fn(factors_minus_one);
    }
    if (split.tail_begin + lane < C32) {
      const int c = split.tail_begin + lane;
      sum += element_loss(static_cast<acc_t>(gpu::load(z + c)), c);
    }
    sum = gpu_reduce::group_sum<GROUP>(sum, scratch);
    if (lane == 0) {
      gpu::store(row_loss + row, sum);
      group_loss += static_cast<double>(sum);
      group_rows += 1.0;
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_rows, partials, partial_loss, partial_rows);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t, int GROUP>
__device__ __forceinline__ void backward_streamed_rows(const scalar_t* __restrict__ logits,
                                                       const int64_t* __restrict__ target,
                                                       const uint8_t* __restrict__ tail,
                                                       const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                                       bool per_row,
                                                       const at::opmath_type<scalar_t>* __restrict__ denominator,
                                                       int64_t N, int64_t C, int64_t ignore_index,
                                                       scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  constexpr int V = gpu_row_stream::kVectorElements<scalar_t>;
  constexpr int U = gpu_row_stream::kVectorUnroll<scalar_t>;
  const int C32 = static_cast<int>(C);
  const int lane = threadIdx.x % GROUP;
  const bool vector_stores = gpu_row_stream::same_split(logits, static_cast<const scalar_t*>(grad_logits));
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < N;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t y = gpu::load(target + row);
    const acc_t scale = y == ignore_index ? acc_t(0)
                                          : (per_row ? gpu::load(grad_loss + row)
                                                     : gpu::load(grad_loss) / gpu::load(denominator));
    const scalar_t* z = logits + row * C;
    scalar_t* out = grad_logits + row * C;
    if (y == ignore_index) {
      gpu_row_stream::fill_row<GROUP>(out, C32, lane, scalar_t(0));
      continue;
    }
    const int y32 = static_cast<int>(y);
    auto gradient_of = [&](acc_t zc, int c, bool tail_class) -> acc_t {
      const bool suppressed = math::eql_suppressed(tail_class, c == y32);
      // suppressed: exactly 0 (the element's logit is loaded with its vector, its value unused)
      return suppressed ? acc_t(0) : scale * math::eql_element_gradient(zc, c == y32, false);
    };
    auto gradient = [&](acc_t zc, int c) -> acc_t { return gradient_of(zc, c, gpu::load(tail + c) != 0); };
    const gpu_row_stream::RowSplit split = gpu_row_stream::split_row(z, C32);
    if (lane < split.head) gpu::store(out + lane, gradient(static_cast<acc_t>(gpu::load(z + lane)), lane));
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
          uint8_t tail_run[V];  // the V mask bytes in one 8- or 16-byte load where aligned, not V loads
          gpu_row_stream::load_run<V>(tail + c0, tail_run);
          gpu::Vector<scalar_t, V> g;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            g.v[i] = static_cast<scalar_t>(gradient_of(static_cast<acc_t>(x[u].v[i]), c0 + i, tail_run[i] != 0));
          }
          if (vector_stores) {
            gpu::store_vector<V>(out + c0, g);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) gpu::store(out + c0 + i, g.v[i]);
          }
        }
      }
    }
    if (split.tail_begin + lane < C32) {
      const int c = split.tail_begin + lane;
      gpu::store(out + c, gradient(static_cast<acc_t>(gpu::load(z + c)), c));
    }
  }
}

// ------------------------------------------------------------------------------ tiled rows
// Rows of C <= 32 classes: a block's 32 x tile_rows_per_group(C) rows, one flat span, through a
// __shared__ tile in 16-byte vectors (streamed one by one they read at 0.42 sector efficiency at
// 1024 x 10 bf16 in the emulator). Lane l owns classes l + 8 k of every row and loads their tail
// mask bytes once per kernel.

// Whether the classes lane + 8 k (k < kClassesPerLane) are tail classes (false past C).
__device__ __forceinline__ void load_lane_tail(const uint8_t* tail, int lane, int C,
                                               bool (&tail_class)[gpu_reduce::kClassesPerLane]) {
#pragma unroll
  for (int k = 0; k < gpu_reduce::kClassesPerLane; ++k) {
    const int c = lane + k * gpu_reduce::kSmallGroup;
    tail_class[k] = c < C && gpu::load(tail + c) != 0;
  }
}

template <typename scalar_t>
__device__ __forceinline__ void forward_tiled_rows(const scalar_t* __restrict__ logits,
                                                   const int64_t* __restrict__ target,
                                                   const uint8_t* __restrict__ tail, int64_t N, int64_t C,
                                                   int64_t ignore_index,
                                                   at::opmath_type<scalar_t>* __restrict__ row_loss,
                                                   at::opmath_type<scalar_t>* __restrict__ unit_denominator,
                                                   double* __restrict__ partials,
                                                   const gpu_reduce::FinishArgs<at::opmath_type<scalar_t>>& finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = gpu_reduce::kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, gpu_reduce::kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, scratch, 1);  // group_sum's scratch: block groups only
  LTFAST_SHARED_ARRAY(double, partial_loss, gpu_reduce::kTileGroups);
  LTFAST_SHARED_ARRAY(double, partial_rows, gpu_reduce::kTileGroups);
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C32 = static_cast<int>(C);
  const int tile_rows = gpu_reduce::kTileGroups * gpu_reduce::tile_rows_per_group(C);
  if (unit_denominator != nullptr && blockIdx.x == 0 && threadIdx.x == 0) gpu::store(unit_denominator, acc_t(1));
  bool tail_class[K];
  load_lane_tail(tail, lane, C32, tail_class);
  double group_loss = 0.0, group_rows = 0.0;  // this group's rows, summed by lane 0 in row order
  // The tile loop's bounds are uniform over the block: every thread reaches each __syncthreads.
  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < N;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(N - first_row < tile_rows ? N - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * C, rows * C32, tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += gpu_reduce::kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int64_t y = gpu::load(target + row);
      if (y == ignore_index) {  // row-uniform: the whole group skips
        if (lane == 0) gpu::store(row_loss + row, acc_t(0));
        continue;
      }
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "ltfast: target out of range [0, C) and not ignore_index");
      const int y32 = static_cast<int>(y);
      // The lane's <= 4 elements take one log1p between them (math::eql_accumulate_element).
      acc_t linear = acc_t(0), factors_minus_one = acc_t(0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        if (c < C32) {
          const bool is_target = c == y32;
          math::eql_accumulate_element(static_cast<acc_t>(tile[tile_row * C32 + c]), is_target,
                                       math::eql_suppressed(tail_class[k], is_target), linear, factors_minus_one);
        }
      }
      const acc_t sum = gpu_reduce::group_sum<GROUP>(linear + math::log1p_fn(factors_minus_one), scratch);
      if (lane == 0) {
        gpu::store(row_loss + row, sum);
        group_loss += static_cast<double>(sum);
        group_rows += 1.0;
      }
    }
    __syncthreads();  // the next tile overwrites the tile
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_rows, partials, partial_loss, partial_rows);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void backward_tiled_rows(const scalar_t* __restrict__ logits,
                                                    const int64_t* __restrict__ target,
                                                    const uint8_t* __restrict__ tail,
                                                    const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                                    bool per_row,
                                                    const at::opmath_type<scalar_t>* __restrict__ denominator,
                                                    int64_t N, int64_t C, int64_t ignore_index,
                                                    scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int GROUP = gpu_reduce::kSmallGroup;
  constexpr int K = gpu_reduce::kClassesPerLane;
  LTFAST_SHARED_ARRAY(acc_t, tile, gpu_reduce::kTileElements);
  LTFAST_SHARED_ARRAY(acc_t, grad_tile, gpu_reduce::kTileElements);
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const int C32 = static_cast<int>(C);
  const int tile_rows = gpu_reduce::kTileGroups * gpu_reduce::tile_rows_per_group(C);
  bool tail_class[K];
  load_lane_tail(tail, lane, C32, tail_class);
  for (int64_t first_row = int64_t(blockIdx.x) * tile_rows; first_row < N;
       first_row += int64_t(gridDim.x) * tile_rows) {
    gpu::mark_row_start();
    const int rows = static_cast<int>(N - first_row < tile_rows ? N - first_row : tile_rows);
    gpu_row_stream::load_span_to_tile<kBlockThreads, acc_t>(logits + first_row * C, rows * C32, tile);
    __syncthreads();
    for (int tile_row = group; tile_row < rows; tile_row += gpu_reduce::kTileGroups) {
      const int64_t row = first_row + tile_row;
      const int64_t y = gpu::load(target + row);
      const bool ignored = y == ignore_index;
      const acc_t scale =
          ignored ? acc_t(0) : (per_row ? gpu::load(grad_loss + row) : gpu::load(grad_loss) / gpu::load(denominator));
      const int y32 = static_cast<int>(y);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = lane + k * GROUP;
        if (c >= C32) continue;
        const bool suppressed = ignored || math::eql_suppressed(tail_class[k], c == y32);
        // suppressed (and ignored rows): exactly 0, as the streamed kernel writes them
        grad_tile[tile_row * C32 + c] =
            suppressed ? acc_t(0)
                       : scale * math::eql_element_gradient(static_cast<acc_t>(tile[tile_row * C32 + c]), c == y32,
                                                            false);
      }
    }
    __syncthreads();
    gpu_row_stream::store_tile_to_span<kBlockThreads, acc_t>(grad_tile, rows * C32, grad_logits + first_row * C);
    __syncthreads();  // the next tile overwrites both tiles
  }
}

// ------------------------------------------------------------------------------ kernels
// Tiles for rows of <= 32 classes, streamed rows otherwise (with_row_group picks GROUP from C).
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    forward_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                        const uint8_t* __restrict__ tail, int64_t N, int64_t C, int64_t ignore_index,
                        at::opmath_type<scalar_t>* __restrict__ row_loss,
                        at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials,
                        gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    forward_tiled_rows(logits, target, tail, N, C, ignore_index, row_loss, unit_denominator, partials, finish);
  } else {
    forward_streamed_rows<scalar_t, GROUP>(logits, target, tail, N, C, ignore_index, row_loss, unit_denominator,
                                           partials, finish);
  }
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    backward_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                         const uint8_t* __restrict__ tail, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                         bool per_row, const at::opmath_type<scalar_t>* __restrict__ denominator, int64_t N,
                         int64_t C, int64_t ignore_index, scalar_t* __restrict__ grad_logits) {
  if constexpr (GROUP == gpu_reduce::kSmallGroup) {
    backward_tiled_rows(logits, target, tail, grad_loss, per_row, denominator, N, C, ignore_index, grad_logits);
  } else {
    backward_streamed_rows<scalar_t, GROUP>(logits, target, tail, grad_loss, per_row, denominator, N, C,
                                            ignore_index, grad_logits);
  }
}

// ------------------------------------------------------------------------------ launch plan
// The kernels index within a row in 32 bits.
inline void check_class_count(int64_t C) {
  if (!gpu_row_stream::fits_row_index(C)) {
    throw std::invalid_argument("ltfast equalization_loss (CUDA): logits have " + std::to_string(C) +
                                " classes; expected at most 2^31 - 1");
  }
}

// Blocks of the row kernels (the forward partials buffer holds 2 x this many doubles).
inline unsigned row_kernel_blocks(int64_t N, int64_t C) { return gpu_reduce::tiled_row_blocks(N, C); }

// Forward: one launch. For 'mean'/'sum' the row kernel's last block finishes the loss from its
// partials when `ticket` (gpu::ticket_counter) is given, else (CUDA graph capture) the finish
// kernel follows; with N = 0 the finish kernel alone sums the partials, zeros filled by the caller.
// For 'none', `unit_denominator` receives 1 (and with N = 0 the caller fills it).
template <typename scalar_t>
void launch_forward(const scalar_t* logits, const int64_t* target, const uint8_t* tail, int64_t N, int64_t C,
                    int64_t ignore_index, bool reduce, bool mean, at::opmath_type<scalar_t>* row_loss,
                    double* partials, at::opmath_type<scalar_t>* loss, at::opmath_type<scalar_t>* denominator,
                    unsigned int* ticket, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  check_class_count(C);
  if (N > 0) {
    gpu_reduce::with_row_group(C, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("equalization forward_rows_kernel", &forward_rows_kernel<scalar_t, kGroup>,
                  row_kernel_blocks(N, C), kBlockThreads, stream, logits, target, tail, N, C, ignore_index,
                  row_loss, reduce ? nullptr : denominator, reduce ? partials : nullptr,
                  gpu_reduce::FinishArgs<acc_t>{reduce ? ticket : nullptr, mean, loss, denominator});
    });
  }
  if (reduce && (N == 0 || ticket == nullptr)) {
    gpu::launch("equalization finish_kernel", &gpu_reduce::finish_mean_kernel<acc_t>, 1, kBlockThreads, stream,
                static_cast<const double*>(partials), static_cast<int64_t>(row_kernel_blocks(N, C)), mean, loss,
                denominator);
  }
}

template <typename scalar_t>
void launch_backward(const scalar_t* logits, const int64_t* target, const uint8_t* tail,
                     const at::opmath_type<scalar_t>* grad_loss, bool per_row,
                     const at::opmath_type<scalar_t>* denominator, int64_t N, int64_t C, int64_t ignore_index,
                     scalar_t* grad_logits, gpu::Stream stream) {
  if (N == 0) return;
  check_class_count(C);
  gpu_reduce::with_row_group(C, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("equalization backward_rows_kernel", &backward_rows_kernel<scalar_t, kGroup>,
                row_kernel_blocks(N, C), kBlockThreads, stream, logits, target, tail, grad_loss, per_row,
                denominator, N, C, ignore_index, grad_logits);
  });
}

}  // namespace equalization_kernels
}  // namespace ltfast
