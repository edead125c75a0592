// Parallel decompositions shared by the CUDA kernels (and their SIMT emulation): how many threads
// own a row, the grid cap, and deterministic two-level reductions over rows: per-block partial sums
// in a fixed order, then one block sums the partials in a fixed order. That block is the row
// kernel's last one (finish_in_last_block: a ticket taken from a per-stream counter after the
// block's partials are written), so a reduced forward is one launch; where the stream has no
// counter (CUDA graph capture, gpu_glue.h ticket_counter) a one-block finish kernel runs the same
// finish code after the row kernel. Both sum in the same order: the loss is bit-identical either way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gpu_kernel.h"

namespace ltfast {
namespace gpu_reduce {

constexpr int kBlockThreads = 256;

// Grid cap of the row kernels (they loop over rows grid-stride). 4096 blocks of 256 threads are
// about 4 waves on an H100/H200 (132 SMs x 2048 resident threads), and the cap bounds the partials
// that the finishing block sums: 4096 per quantity, 16 per thread. The cap is a constant, not a
// function of the device, so that results are bit-identical on every GPU.
constexpr int64_t kMaxRowBlocks = 4096;

// Threads that own one row of C classes: 8 lanes for C <= 32 (a warp handled rows of 10 classes
// with 22 of 32 lanes idle), a warp up to 1024 classes, the whole block beyond.
constexpr int kSmallGroup = 8;
constexpr int64_t kSmallGroupMaxClasses = 32;
constexpr int64_t kWarpGroupMaxClasses = 1024;

// Calls f(std::integral_constant<int, GROUP>) with the row group size for C classes.
template <typename F>
void with_row_group(int64_t num_classes, F&& f) {
  if (num_classes <= kSmallGroupMaxClasses) {
    f(std::integral_constant<int, kSmallGroup>{});
  } else if (num_classes <= kWarpGroupMaxClasses) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, kBlockThreads>{});
  }
}

// Blocks for N rows with GROUP threads per row, capped at kMaxRowBlocks.
inline unsigned row_blocks(int64_t num_rows, int group) {
  const int64_t rows_per_block = kBlockThreads / group;
  const int64_t blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxRowBlocks)));
}

// Blocks of a row kernel whose groups (with_row_group's size for C) take one row at a time.
inline unsigned row_blocks_for_classes(int64_t num_rows, int64_t num_classes) {
  unsigned blocks = 1;
  with_row_group(num_classes, [&](auto group) { blocks = row_blocks(num_rows, group); });
  return blocks;
}

// Tiled rows: row kernels whose rows of C <= kSmallGroupMaxClasses classes are one flat span per
// block, copied through a __shared__ tile of kTileElements (gpu_row_stream::load_span_to_tile):
// 8-lane groups, lane l owning classes l + 8 k (k < kClassesPerLane), each group taking
// tile_rows_per_group(C) rows of a tile (group g: rows g, g + 32, ...).
constexpr int kTileGroups = kBlockThreads / kSmallGroup;                 // 32
constexpr int kTileClasses = static_cast<int>(kSmallGroupMaxClasses);    // 32
constexpr int kTileElements = kTileGroups * kTileClasses;                // 1024
constexpr int kClassesPerLane = kTileClasses / kSmallGroup;              // 4

// Rows each group takes per tile: floor(32 / C) for C <= 32, so that every tile holds more than 512
// elements (> 1 KiB in bf16). The span's scalar head and tail each touch a sector its vectors touch
// too, 2 sectors per tile counted twice; at one row per group a tile of C = 10 bf16 was 640 bytes
// and read at 0.86 sector efficiency (emulator, a span 6 bytes off 16), at T = 3 it is 1920 bytes.
// Streamed rows (C > 32): 1, the row loop of the block and warp groups.
__host__ __device__ inline int tile_rows_per_group(int64_t num_classes) {
  if (num_classes < 1 || num_classes > kSmallGroupMaxClasses) return 1;
  return static_cast<int>(kSmallGroupMaxClasses / num_classes);
}

// Blocks of a row kernel that tiles rows of <= 32 classes (and streams longer ones one per group).
inline unsigned tiled_row_blocks(int64_t num_rows, int64_t num_classes) {
  const int64_t rows_per_group = tile_rows_per_group(num_classes);
  return row_blocks_for_classes((num_rows + rows_per_group - 1) / rows_per_group, num_classes);
}

// The lanes of the calling thread's row group within its warp: groups smaller than a warp must
// not name the other groups' lanes, which may have left the row loop already.
template <int GROUP>
__device__ __forceinline__ unsigned group_lane_mask() {
  if constexpr (GROUP >= 32) {
    return 0xffffffffu;
  } else {
    return ((1u << GROUP) - 1u) << (threadIdx.x % 32 / GROUP * GROUP);
  }
}

// value of the lane `offset` away (xor) within the row group; offset < min(GROUP, 32).
template <int GROUP, typename T>
__device__ __forceinline__ T group_shuffle_xor(T value, int offset) {
  return __shfl_xor_sync(group_lane_mask<GROUP>(), value, offset);
}

// Sum over the GROUP threads of a row group (GROUP <= 32: shuffles within the group's lanes; a
// whole block: shuffles, then the warps' sums in order through `scratch`, __shared__ T[8]). Every
// thread of the group gets the result; fixed order, so deterministic.
template <int GROUP, typename T, typename Scratch>
__device__ __forceinline__ T group_sum(T value, Scratch& scratch) {
  constexpr int kWidth = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) value += group_shuffle_xor<GROUP>(value, offset);
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = value;
    __syncthreads();
    value = scratch[0];
#pragma unroll
    for (int w = 1; w < GROUP / 32; ++w) value += scratch[w];
    __syncthreads();  // scratch is reused by the next row
  }
  return value;
}

// End of a row kernel: the block's partial sums (a, b) in a fixed order. Each group's lane 0 holds
// its rows' sums; they go to partials[blockIdx.x] and partials[gridDim.x + blockIdx.x] (double
// [2, gridDim.x]). `scratch_a`/`scratch_b` are __shared__ double[kBlockThreads / GROUP]. Every
// thread of the block must call it (it has a barrier when a block holds several groups).
template <int GROUP, typename Scratch>
__device__ __forceinline__ void write_block_partials(double a, double b, double* partials, Scratch& scratch_a,
                                                     Scratch& scratch_b) {
  constexpr int kGroups = kBlockThreads / GROUP;
  if constexpr (kGroups == 1) {
    if (threadIdx.x == 0) {
      gpu::store(partials + blockIdx.x, a);
      gpu::store(partials + gridDim.x + blockIdx.x, b);
    }
  } else {
    if (threadIdx.x % GROUP == 0) {
      scratch_a[threadIdx.x / GROUP] = a;
      scratch_b[threadIdx.x / GROUP] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double total_a = 0.0, total_b = 0.0;
      for (int g = 0; g < kGroups; ++g) {
        total_a += scratch_a[g];
        total_b += scratch_b[g];
      }
      gpu::store(partials + blockIdx.x, total_a);
      gpu::store(partials + gridDim.x + blockIdx.x, total_b);
    }
  }
}

// Sum of `value` over the kBlockThreads threads of a block, in a fixed tree order; every thread
// gets it. `scratch` is __shared__ double[kBlockThreads].
template <typename Scratch>
__device__ double block_sum(double value, Scratch& scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kBlockThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();  // scratch may be reused by the caller's next block_sum
  return total;
}

// Sum of values[0 .. count) by one block of kBlockThreads threads: thread t adds t, t + 256, ...
// in order, then block_sum. Every thread gets the total. The values are read through L2
// (load_coherent): they may have been written by other blocks of the running kernel.
template <typename Scratch>
__device__ double sum_in_block(const double* values, int64_t count, Scratch& scratch) {
  double value = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kBlockThreads) value += gpu::load_coherent(values + i);
  return block_sum(value, scratch);
}

// What a row kernel needs to finish a reduced forward in its last block: the stream's ticket
// counter (gpu::ticket_counter; nullptr: the row kernel only writes its partials and the launch
// plan runs the family's finish kernel after it), 'mean' or 'sum', and where the loss and the
// denominator(s) go (a family with several denominators writes denominator[0 ..)).
template <typename acc_t>
struct FinishArgs {
  unsigned int* ticket = nullptr;
  bool mean = false;
  acc_t* loss = nullptr;
  acc_t* denominator = nullptr;
};

// Called by every thread of a block after its partials are written (by thread 0: write_block_partials):
// whether this block took the last of the gridDim.x tickets, i.e. every other block's partials are
// written and visible. Thread 0 fences its partial stores before taking the ticket (release) and,
// in the last block, after it (acquire); atomicInc with limit gridDim.x - 1 gives tickets 0 ..
// gridDim.x - 1 and wraps the counter back to 0 with the last one, so the next launch on the stream
// finds it at 0 with no reset.
__device__ __forceinline__ bool took_last_ticket(unsigned int* ticket) {
  LTFAST_SHARED_ARRAY(int, last_block, 1);
  if (threadIdx.x == 0) {
    gpu::thread_fence();
    const bool last = gpu::atomic_inc(ticket, gridDim.x - 1) == gridDim.x - 1;
    if (last) gpu::thread_fence();
    last_block[0] = last ? 1 : 0;
  }
  __syncthreads();
  return last_block[0] != 0;
}

// The end of a row kernel that finishes its own forward: in the block that takes the last ticket,
// every thread calls finish(scratch) (scratch: __shared__ double[kBlockThreads], for sum_in_block),
// the same finish the family's finish kernel runs. No-op with a null ticket. Every thread of every
// block must call it (it has a barrier).
template <typename Finish>
__device__ __forceinline__ void finish_in_last_block(unsigned int* ticket, Finish&& finish) {
  if (ticket == nullptr || !took_last_ticket(ticket)) return;
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  finish(scratch);
}

// The scalar loss from a row kernel's block partials (double [2, num_blocks]: loss sums, then the
// sums the mean divides by: target weights for the cross-entropy family, rows for EQL), by every
// thread of one block in a fixed order. loss = sum / denominator, denominator = that sum for 'mean',
// 1 for 'sum'.
template <typename acc_t, typename Scratch>
__device__ void finish_mean(const double* partials, int64_t num_blocks, bool mean, acc_t* loss, acc_t* denominator,
                            Scratch& scratch) {
  const double total = sum_in_block(partials, num_blocks, scratch);
  const double divisor = sum_in_block(partials + num_blocks, num_blocks, scratch);
  if (threadIdx.x == 0) {
    const double denom = mean ? divisor : 1.0;
    gpu::store(loss, total / denom);
    gpu::store(denominator, denom);
  }
}

// finish_mean in the last block of a row kernel that wrote `partials` (double [2, gridDim.x]).
template <typename acc_t>
__device__ __forceinline__ void finish_mean_in_last_block(const double* partials, const FinishArgs<acc_t>& finish) {
  finish_in_last_block(finish.ticket, [&](auto& scratch) {
    finish_mean(partials, gridDim.x, finish.mean, finish.loss, finish.denominator, scratch);
  });
}

// finish_mean as a one-block kernel after the row kernel: the launch plans' path when the stream has
// no ticket counter, and with no rows (the row kernel does not run; the partials are zeros).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    finish_mean_kernel(const double* __restrict__ partials, int64_t num_blocks, bool mean, acc_t* __restrict__ loss,
                       acc_t* __restrict__ denominator) {
  LTFAST_SHARED_ARRAY(double, scratch, kBlockThreads);
  finish_mean(partials, num_blocks, mean, loss, denominator, scratch);
}

}  // namespace gpu_reduce
}  // namespace ltfast
