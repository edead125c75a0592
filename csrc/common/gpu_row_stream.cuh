// Rows of the [N, C] streams in 16-byte vectors, shared by the row kernels of every family: a row
// of odd C starts at any element boundary, so each row is split at its own first 16-byte boundary
// into a scalar head, the vector body and a scalar tail (split_row). In-row indices are 32-bit: the
// launch plans refuse C >= 2^31.
#pragma once

#include <cstdint>

#include "gpu_kernel.h"

namespace ltfast {
namespace gpu_row_stream {

// Elements of T in one 16-byte vector (LDG/STG.128). 8142 bf16 classes: rows are 4-byte aligned.
template <typename scalar_t>
constexpr int kVectorElements = 16 / static_cast<int>(sizeof(scalar_t));
// Vectors each thread loads before using any, so that 32 bytes (bf16: 2 vectors) to 64 bytes are
// in flight per thread: 2048 resident threads x 32 B = 64 KiB per SM, past the ~16-18 KiB Little's
// law asks of an H100 SM (3.35 TB/s x ~0.7 us / 132 SMs); one online-softmax merge per 16 elements.
template <typename scalar_t>
constexpr int kVectorUnroll = kVectorElements<scalar_t> >= 8 ? 2 : 16 / kVectorElements<scalar_t>;

struct RowSplit {
  int head;        // elements before the first 16-byte boundary (or C, if the row ends first)
  int vectors;     // 16-byte vectors after the head
  int tail_begin;  // first element after the vectors
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int C) {
  constexpr int V = kVectorElements<scalar_t>;
  const int misaligned =
      static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16) / static_cast<int>(sizeof(scalar_t));
  const int head = misaligned == 0 ? 0 : (V - misaligned < C ? V - misaligned : C);
  const int vectors = (C - head) / V;
  return {head, vectors, head + vectors * V};
}

// row[0 .. C) = value by the GROUP threads of the row (ignore_index and NaN rows of backward).
template <int GROUP, typename scalar_t>
__device__ __forceinline__ void fill_row(scalar_t* row, int C, int lane, scalar_t value) {
  constexpr int V = kVectorElements<scalar_t>;
  const RowSplit split = split_row(row, C);
  if (lane < split.head) gpu::store(row + lane, value);
  gpu::Vector<scalar_t, V> splat;
#pragma unroll
  for (int i = 0; i < V; ++i) splat.v[i] = value;
  for (int v = lane; v < split.vectors; v += GROUP) gpu::store_vector<V>(row + split.head + v * V, splat);
  if (split.tail_begin + lane < C) gpu::store(row + split.tail_begin + lane, value);
}

// Tiles of short rows. A row of C <= 32 classes is at most 64 bytes in bf16 (CIFAR-10-LT: 20 bytes), less
// than one warp request: split per row, its head, vectors and tail are three requests that each touch
// the sectors of neighbouring rows (sector efficiency 0.42 forward / 0.52 backward at 256 x 20 bf16,
// benchmarks/results/memory_model.json before the tiles). Consecutive rows of a contiguous [N, C] are
// one flat span, so a block copies the span of its rows between global memory and a __shared__ tile
// split once for the whole span: a scalar head, 16-byte vectors over the block's threads, a scalar
// tail. The tile holds acc_t (the kernels compute in it; bf16 -> float -> bf16 is exact), indexed as
// tile[i] so that the emulator's checked shared arrays work too.

// tile[0 .. count) = span[0 .. count) as acc_t, by the THREADS threads of the block (count <= the
// tile's size; every thread calls it).
template <int THREADS, typename acc_t, typename scalar_t, typename Tile>
__device__ __forceinline__ void load_span_to_tile(const scalar_t* span, int count, Tile& tile) {
  constexpr int V = kVectorElements<scalar_t>;
  static_assert(V <= THREADS, "one thread per head or tail element");
  const RowSplit split = split_row(span, count);
  const int t = static_cast<int>(threadIdx.x);
  if (t < split.head) tile[t] = static_cast<acc_t>(gpu::load(span + t));
  for (int v = t; v < split.vectors; v += THREADS) {
    const gpu::Vector<scalar_t, V> x = gpu::load_vector<V>(span + split.head + v * V);
#pragma unroll
    for (int i = 0; i < V; ++i) tile[split.head + v * V + i] = static_cast<acc_t>(x.v[i]);
  }
  if (split.tail_begin + t < count) {
    tile[split.tail_begin + t] = static_cast<acc_t>(gpu::load(span + split.tail_begin + t));
  }
}

// load_span_to_tile for a second stream read beside the first (the probability targets beside the
// logits). The same code at source lines of its own: the emulator counts requests per source site,
// and a site whose accesses span two tensors is a stream of neither (benchmarks/memory_model.py).
template <int THREADS, typename acc_t, typename scalar_t, typename Tile>
__device__ __forceinline__ void load_second_span_to_tile(const scalar_t* span, int count, Tile& tile) {
  constexpr int V = kVectorElements<scalar_t>;
  static_assert(V <= THREADS, "one thread per head or tail element");
  const RowSplit split = split_row(span, count);
  const int t = static_cast<int>(threadIdx.x);
  if (t < split.head) tile[t] = static_cast<acc_t>(gpu::load(span + t));
  for (int v = t; v < split.vectors; v += THREADS) {
    const gpu::Vector<scalar_t, V> x = gpu::load_vector<V>(span + split.head + v * V);
#pragma unroll
    for (int i = 0; i < V; ++i) tile[split.head + v * V + i] = static_cast<acc_t>(x.v[i]);
  }
  if (split.tail_begin + t < count) {
    tile[split.tail_begin + t] = static_cast<acc_t>(gpu::load(span + split.tail_begin + t));
  }
}

// span[0 .. count) = tile[0 .. count) converted to scalar_t, split by span's own alignment.
template <int THREADS, typename acc_t, typename scalar_t, typename Tile>
__device__ __forceinline__ void store_tile_to_span(const Tile& tile, int count, scalar_t* span) {
  constexpr int V = kVectorElements<scalar_t>;
  static_assert(V <= THREADS, "one thread per head or tail element");
  const RowSplit split = split_row(span, count);
  const int t = static_cast<int>(threadIdx.x);
  auto element = [&](int i) -> scalar_t { return static_cast<scalar_t>(static_cast<acc_t>(tile[i])); };
  if (t < split.head) gpu::store(span + t, element(t));
  for (int v = t; v < split.vectors; v += THREADS) {
    gpu::Vector<scalar_t, V> x;
#pragma unroll
    for (int i = 0; i < V; ++i) x.v[i] = element(split.head + v * V + i);
    gpu::store_vector<V>(span + split.head + v * V, x);
  }
  if (split.tail_begin + t < count) gpu::store(span + split.tail_begin + t, element(split.tail_begin + t));
}

// Loads V consecutive elements of a per-class vector ([C]: the adjustment, weights, the tail mask)
// at an address aligned to sizeof(T) only, in the widest accesses its alignment allows (16, 8, 4
// bytes, else one element each). A thread of the vector body needs the V classes of its logits
// vector: V scalar loads of 4 bytes would be 32 sectors per warp request each (one per lane), 8 to
// 16 times the L1 sector lookups of the logits themselves; 16-byte loads cut that to 2 per vector.
template <int W, int V, typename T>
__device__ __forceinline__ void load_run_as(const T* address, T (&out)[V]) {
#pragma unroll
  for (int j = 0; j < V / W; ++j) {
    const gpu::Vector<T, W> w = gpu::load_vector<W>(address + j * W);
#pragma unroll
    for (int i = 0; i < W; ++i) out[j * W + i] = w.v[i];
  }
}

template <int V, typename T>
__device__ __forceinline__ void load_run(const T* address, T (&out)[V]) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  constexpr int kSize = static_cast<int>(sizeof(T));
  if constexpr (kSize <= 16 && 16 % kSize == 0 && V % (16 / kSize) == 0) {
    if (a % 16 == 0) return load_run_as<16 / kSize>(address, out);
  }
  if constexpr (kSize <= 8 && 8 % kSize == 0 && V % (8 / kSize) == 0) {
    if (a % 8 == 0) return load_run_as<8 / kSize>(address, out);
  }
  if constexpr (kSize <= 4) {  // nested: 4 / kSize is 0 for wider T
    if constexpr (4 % kSize == 0 && V % (4 / kSize) == 0) {
      if (a % 4 == 0) return load_run_as<4 / kSize>(address, out);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = gpu::load(address + i);
}

// Whether rows of C elements at a and at b share their split: their bases are equally far from a
// 16-byte boundary (else the second is accessed element-wise, e.g. a logits view at an odd offset).
template <typename T>
__device__ __forceinline__ bool same_split(const T* a, const T* b) {
  return (reinterpret_cast<uintptr_t>(a) - reinterpret_cast<uintptr_t>(b)) % 16 == 0;
}

// The kernels index within a row in 32 bits.
inline bool fits_row_index(int64_t num_classes) { return num_classes <= INT32_MAX; }

}  // namespace gpu_row_stream
}  // namespace ltfast
