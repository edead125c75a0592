// CUDA kernels of PaCo's parametric contrastive loss (the math: paco.h) and their launch plan, with
// no torch glue: compiled by nvcc into ltfast._C (through paco_cuda.cu) and by the host compiler
// into the SIMT emulator's test library.
//
// Row i of the loss is two segments of one logical row of C + M columns: the C class columns
// (sup_logits row i, + log_prior, * inv_sup_temperature) and the M key columns (similarity row i *
// inv_temperature). A group of threads owns a row, sized by C + M as the cross-entropy family's
// rows (gpu_reduce::with_row_group: 8 lanes up to 32 columns, a warp up to 1024, the block beyond).
// Forward streams each segment once in 16-byte vectors (a scalar head and tail around them:
// gpu_row_stream::split_row, per segment, since the two rows start at unrelated alignments) with
// one online softmax state across both segments (the weighted exp-sum: weight 1 on class columns,
// gamma on keys, 0 on the self column, which still counts in the max) and two plain sums: the
// positive-weighted logit sum and the positive weight P_i. The group's partial states are reduced
// with shuffles (and, for block groups, a fixed-order pass over shared memory), so results are
// identical run to run. For 'mean'/'sum' each block writes its rows' loss sum and counted-row count
// and the block that takes the last ticket adds those partials in a fixed order
// (gpu_reduce::finish_in_last_block): one launch (two under CUDA graph capture, which has no ticket
// counter: the row kernel, then gpu_reduce::finish_mean_kernel). Backward is element-wise from
// row_stats (lse_i, P_i): each segment streamed once more, each gradient written once, in vectors
// when its rows share the input's alignment.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../../common/gpu_kernel.h"
#include "../../common/gpu_reduce.cuh"
#include "../../common/gpu_row_stream.cuh"
#include "../../common/softmax_math.h"

namespace ltfast {
namespace paco_kernels {

using gpu_reduce::kBlockThreads;
using gpu_row_stream::fill_row;
using gpu_row_stream::kVectorElements;
using gpu_row_stream::kVectorUnroll;
using gpu_row_stream::RowSplit;
using gpu_row_stream::split_row;
constexpr int kWarpsPerBlock = kBlockThreads / 32;

template <typename acc_t>
struct KernelParams {
  const int64_t* labels;      // [B]
  const int64_t* key_labels;  // [M]
  const acc_t* log_prior;     // [C], nullable
  int64_t num_rows;           // B
  int64_t num_keys;           // M
  int64_t num_classes;        // C
  int64_t ignore_index;
  acc_t inv_temperature;
  acc_t inv_sup_temperature;
  acc_t alpha;
  acc_t beta;
  acc_t gamma;
  acc_t loss_scale;
};

// The original's + 1e-12 inside the log (paco.h), added in the accumulation type as the reference does.
template <typename acc_t>
constexpr acc_t kLogEpsilon = acc_t(1e-12);

// ------------------------------------------------------------------------------ the two segments
// The source sites of the accesses to a segment's rows, one per access of the row loops: the
// emulator groups a site's executions by warp into requests and tells a stream by the tensor a site
// touches, so the class and key segments, streamed by the same helpers, name their own sites
// (Segment::sites()). Empty on the GPU.
struct RowSites {
  gpu::AccessSite load_head, load_body, load_tail;
  gpu::AccessSite store_head, store_body, store_body_element, store_tail;
};

// What a column of a segment contributes, for K consecutive columns from c0 (K = 1 or the vector
// width V) whose raw values are x[0 .. K): the logit a, its denominator weight w and its positive
// weight m. Each segment loads its per-column vector (log_prior, key labels) in the widest accesses
// its alignment allows (gpu_row_stream::load_run): a scalar int64 key-label load per element would
// be 32 sectors per warp request, 8 times the lookups of a bf16 similarity vector.
template <typename acc_t>
struct ClassSegment {
  const KernelParams<acc_t>& p;
  int y;  // the row's label (its class column)

  static __device__ __forceinline__ RowSites sites() {
    return {gpu::AccessSite::current(), gpu::AccessSite::current(), gpu::AccessSite::current(),
            gpu::AccessSite::current(), gpu::AccessSite::current(), gpu::AccessSite::current(),
            gpu::AccessSite::current()};
  }

  template <int K, typename scalar_t>
  __device__ __forceinline__ void columns(int c0, const scalar_t (&x)[K], acc_t (&a)[K], acc_t (&w)[K],
                                          acc_t (&m)[K]) const {
    acc_t prior[K];
    if (p.log_prior != nullptr) {
      if constexpr (K == 1) {
        prior[0] = gpu::load(p.log_prior + c0);
      } else {
        gpu_row_stream::load_run<K>(p.log_prior + c0, prior);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t z = static_cast<acc_t>(x[k]);
      a[k] = (p.log_prior != nullptr ? z + prior[k] : z) * p.inv_sup_temperature;
      w[k] = acc_t(1);
      m[k] = c0 + k == y ? p.beta : acc_t(0);
    }
  }
};

template <typename acc_t>
struct KeySegment {
  const KernelParams<acc_t>& p;
  int64_t y;     // the row's label
  int64_t self;  // the row's own key column (i < B <= M)

  static __device__ __forceinline__ RowSites sites() {
    return {gpu::AccessSite::current(), gpu::AccessSite::current(), gpu::AccessSite::current(),
            gpu::AccessSite::current(), gpu::AccessSite::current(), gpu::AccessSite::current(),
            gpu::AccessSite::current()};
  }

  template <int K, typename scalar_t>
  __device__ __forceinline__ void columns(int j0, const scalar_t (&x)[K], acc_t (&a)[K], acc_t (&w)[K],
                                          acc_t (&m)[K]) const {
    int64_t key[K];
    if constexpr (K == 1) {
      key[0] = gpu::load(p.key_labels + j0);
    } else {
      gpu_row_stream::load_run<K>(p.key_labels + j0, key);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const bool is_self = j0 + k == self;
      a[k] = static_cast<acc_t>(x[k]) * p.inv_temperature;
      w[k] = is_self ? acc_t(0) : p.gamma;
      // y != ignore_index here (ignored rows are skipped), so key == y excludes ignored keys.
      m[k] = !is_self && key[k] == y ? p.alpha : acc_t(0);
    }
  }
};

// The forward state of a row's group: the online softmax (max over every column, weighted exp-sum)
// and the positive sums.
template <typename acc_t>
struct RowState {
  math::SoftmaxState<acc_t> softmax = math::empty_softmax_state<acc_t>();
  acc_t positive_logits = acc_t(0);  // sum_col m_col a_col
  acc_t positive_weight = acc_t(0);  // P_i = sum_col m_col
};

// Merges K columns into the state with one rescaling exponential. Padding columns have a = -inf,
// w = m = 0. The max includes weight-0 columns (the self column), as the original's does.
template <int K, typename acc_t>
__device__ __forceinline__ void accumulate(const acc_t (&a)[K], const acc_t (&w)[K], const acc_t (&m)[K],
                                           RowState<acc_t>& s) {
  acc_t chunk_max = a[0];
#pragma unroll
  for (int k = 1; k < K; ++k) chunk_max = a[k] > chunk_max ? a[k] : chunk_max;
  acc_t chunk_sum = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    // w = 0 columns (self, gamma 0, padding) add nothing, also when their exponential overflows.
    if (w[k] != acc_t(0)) chunk_sum += w[k] * math::exp_shifted(a[k], chunk_max);
    if (m[k] != acc_t(0)) {
      s.positive_logits += m[k] * a[k];
      s.positive_weight += m[k];
    }
  }
  s.softmax = math::merge_softmax_states(s.softmax, math::SoftmaxState<acc_t>{chunk_max, chunk_sum});
}

// One segment of a row (n columns at `row`) into the state by the GROUP threads of the row.
template <int GROUP, typename scalar_t, typename acc_t, typename Segment>
__device__ __forceinline__ void forward_segment(const scalar_t* row, int n, int lane, const Segment& segment,
                                                RowState<acc_t>& s) {
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  const RowSites sites = Segment::sites();
  const RowSplit split = split_row(row, n);
  if (lane < split.head) {
    const scalar_t x[1] = {gpu::load(row + lane, sites.load_head)};
    acc_t a[1], w[1], m[1];
    segment.columns(lane, x, a, w, m);
    accumulate(a, w, m, s);
  }
  for (int first = lane; first < split.vectors; first += GROUP * U) {
    gpu::Vector<scalar_t, V> x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = first + u * GROUP;
      if (v < split.vectors) x[u] = gpu::load_vector<V>(row + split.head + v * V, sites.load_body);
    }
    // One merge per vector (not per U vectors, as the cross-entropy rows do): the per-column
    // weights and key labels of U vectors at once took 96-106 registers (ptxas, sm_90).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = first + u * GROUP;
      if (v < split.vectors) {
        acc_t a[V], w[V], m[V];
        segment.columns(split.head + v * V, x[u].v, a, w, m);
        accumulate(a, w, m, s);
      }
    }
  }
  if (split.tail_begin + lane < n) {
    const int c = split.tail_begin + lane;
    const scalar_t x[1] = {gpu::load(row + c, sites.load_tail)};
    acc_t a[1], w[1], m[1];
    segment.columns(c, x, a, w, m);
    accumulate(a, w, m, s);
  }
}

// Reduces the row state over the GROUP threads of the row; every thread of the group gets it.
// Fixed order: deterministic. Scratch arrays are __shared__ [kWarpsPerBlock], used for block groups.
template <int GROUP, typename acc_t, typename StateScratch, typename SumScratch>
__device__ __forceinline__ void group_reduce(RowState<acc_t>& s, StateScratch& scratch_state,
                                             SumScratch& scratch_logits, SumScratch& scratch_weight) {
  constexpr int kWarpWidth = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int offset = kWarpWidth / 2; offset > 0; offset /= 2) {
    const math::SoftmaxState<acc_t> other{gpu_reduce::group_shuffle_xor<GROUP>(s.softmax.max, offset),
                                          gpu_reduce::group_shuffle_xor<GROUP>(s.softmax.sum, offset)};
    s.softmax = math::merge_softmax_states(s.softmax, other);
    s.positive_logits += gpu_reduce::group_shuffle_xor<GROUP>(s.positive_logits, offset);
    s.positive_weight += gpu_reduce::group_shuffle_xor<GROUP>(s.positive_weight, offset);
  }
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      scratch_state[warp] = s.softmax;
      scratch_logits[warp] = s.positive_logits;
      scratch_weight[warp] = s.positive_weight;
    }
    __syncthreads();
    s.softmax = scratch_state[0];
    s.positive_logits = scratch_logits[0];
    s.positive_weight = scratch_weight[0];
#pragma unroll
    for (int w = 1; w < GROUP / 32; ++w) {
      const math::SoftmaxState<acc_t> other = scratch_state[w];
      s.softmax = math::merge_softmax_states(s.softmax, other);
      s.positive_logits += scratch_logits[w];
      s.positive_weight += scratch_weight[w];
    }
    __syncthreads();  // scratch is reused by the next row
  }
}

// The row's label, checked against the class columns when there are any (SupCon, C = 0: any label).
template <typename acc_t>
__device__ __forceinline__ int64_t checked_label(const KernelParams<acc_t>& p, int64_t row) {
  const int64_t y = gpu::load(p.labels + row);
  if (y != p.ignore_index && p.num_classes > 0) {
    CUDA_KERNEL_ASSERT(y >= 0 && y < p.num_classes && "ltfast: paco label out of range [0, C) and not ignore_index");
  }
  return y;
}

// ------------------------------------------------------------------------------ kernels
// Per row: row_stats[0, i] = lse_i, row_stats[1, i] = P_i (0 when not counted), row_loss[i]; with
// `partials`, the block's loss sum and counted-row count (double [2, gridDim.x]).
template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    forward_rows_kernel(const scalar_t* __restrict__ similarity, const scalar_t* __restrict__ sup_logits,
                        KernelParams<at::opmath_type<scalar_t>> p, at::opmath_type<scalar_t>* __restrict__ row_loss,
                        at::opmath_type<scalar_t>* __restrict__ row_stats,
                        at::opmath_type<scalar_t>* __restrict__ unit_denominator, double* __restrict__ partials,
                        gpu_reduce::FinishArgs<at::opmath_type<scalar_t>> finish) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  LTFAST_SHARED_ARRAY(math::SoftmaxState<acc_t>, scratch_state, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_logits, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(acc_t, scratch_weight, kWarpsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_loss, kRowsPerBlock);
  LTFAST_SHARED_ARRAY(double, partial_counted, kRowsPerBlock);
  double group_loss = 0.0, group_counted = 0.0;  // this group's rows, summed by its lane 0 in row order
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int M = static_cast<int>(p.num_keys);
  if (unit_denominator != nullptr && blockIdx.x == 0 && threadIdx.x == 0) gpu::store(unit_denominator, acc_t(1));

  // The row loop bound is uniform per group (for block groups the group is the block), and so is
  // every `continue`: the __syncthreads of group_reduce are reached by the whole block.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    const int64_t y = checked_label(p, row);
    if (y == p.ignore_index) {  // not counted: loss 0, P 0 (backward writes zeros)
      if (lane == 0) {
        gpu::store(row_loss + row, acc_t(0));
        gpu::store(row_stats + row, acc_t(0));
        gpu::store(row_stats + p.num_rows + row, acc_t(0));
      }
      continue;
    }
    RowState<acc_t> s;
    if (C > 0) {
      forward_segment<GROUP>(sup_logits + row * p.num_classes, C, lane,
                             ClassSegment<acc_t>{p, static_cast<int>(y)}, s);
    }
    forward_segment<GROUP>(similarity + row * p.num_keys, M, lane, KeySegment<acc_t>{p, y, row}, s);
    group_reduce<GROUP>(s, scratch_state, scratch_logits, scratch_weight);
    if (lane == 0) {
      // A row whose max is +-inf or NaN is NaN, as the original's max-shifted logits are.
      const math::SoftmaxState<acc_t> st = s.softmax;
      const bool finite_max = st.max > math::negative_infinity<acc_t>() && st.max < -math::negative_infinity<acc_t>();
      const acc_t lse = finite_max ? st.max + math::log_fn(st.sum + kLogEpsilon<acc_t>) : st.max - st.max;
      const acc_t P = s.positive_weight;
      const bool counted = P > acc_t(0);
      const acc_t loss = counted ? p.loss_scale * (lse - s.positive_logits / P) : acc_t(0);
      gpu::store(row_stats + row, lse);
      gpu::store(row_stats + p.num_rows + row, counted ? P : acc_t(0));
      gpu::store(row_loss + row, loss);
      group_loss += static_cast<double>(loss);
      group_counted += counted ? 1.0 : 0.0;
    }
  }
  if (partials != nullptr) {
    gpu_reduce::write_block_partials<GROUP>(group_loss, group_counted, partials, partial_loss, partial_counted);
    gpu_reduce::finish_mean_in_last_block(partials, finish);
  }
}

// Gradient of one segment of a row: grad_col = g (w_col exp(a_col - lse) - m_col / P) * inv_scale.
template <int GROUP, typename scalar_t, typename acc_t, typename Segment>
__device__ __forceinline__ void backward_segment(const scalar_t* row, scalar_t* grad, int n, int lane,
                                                 const Segment& segment, acc_t lse, acc_t inv_P, acc_t coef) {
  constexpr int V = kVectorElements<scalar_t>;
  constexpr int U = kVectorUnroll<scalar_t>;
  auto gradient = [&](acc_t a, acc_t w, acc_t m) -> acc_t {
    // w = 0 (self column, gamma 0): exactly 0 * p, also when exp(a - lse) is large.
    const acc_t probability = w != acc_t(0) ? w * math::exp_fn(a - lse) : acc_t(0);
    return coef * (probability - m * inv_P);
  };
  const RowSites sites = Segment::sites();
  auto scalar_column = [&](int c, const gpu::AccessSite& load_site, const gpu::AccessSite& store_site) {
    const scalar_t x[1] = {gpu::load(row + c, load_site)};
    acc_t a[1], w[1], m[1];
    segment.columns(c, x, a, w, m);
    gpu::store(grad + c, static_cast<scalar_t>(gradient(a[0], w[0], m[0])), store_site);
  };
  // Rows of the input and of the gradient share their split when their bases do (both have n
  // elements per row); else (an input view at an odd storage offset) the gradient is stored per element.
  const bool vector_stores = gpu_row_stream::same_split(row, grad);
  const RowSplit split = split_row(row, n);
  if (lane < split.head) scalar_column(lane, sites.load_head, sites.store_head);
  for (int first = lane; first < split.vectors; first += GROUP * U) {
    gpu::Vector<scalar_t, V> x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = first + u * GROUP;
      if (v < split.vectors) x[u] = gpu::load_vector<V>(row + split.head + v * V, sites.load_body);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = first + u * GROUP;
      if (v < split.vectors) {
        const int c0 = split.head + v * V;
        acc_t a[V], w[V], m[V];
        segment.columns(c0, x[u].v, a, w, m);
        gpu::Vector<scalar_t, V> out;
#pragma unroll
        for (int i = 0; i < V; ++i) out.v[i] = static_cast<scalar_t>(gradient(a[i], w[i], m[i]));
        if (vector_stores) {
          gpu::store_vector<V>(grad + c0, out, sites.store_body);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) gpu::store(grad + c0 + i, out.v[i], sites.store_body_element);
        }
      }
    }
  }
  if (split.tail_begin + lane < n) scalar_column(split.tail_begin + lane, sites.load_tail, sites.store_tail);
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlockThreads)
    backward_rows_kernel(const scalar_t* __restrict__ similarity, const scalar_t* __restrict__ sup_logits,
                         KernelParams<at::opmath_type<scalar_t>> p,
                         const at::opmath_type<scalar_t>* __restrict__ row_stats,
                         const at::opmath_type<scalar_t>* __restrict__ grad_loss, bool per_row_grad,
                         const at::opmath_type<scalar_t>* __restrict__ denominator,
                         scalar_t* __restrict__ grad_similarity, scalar_t* __restrict__ grad_sup_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  const int lane = threadIdx.x % GROUP;
  const int C = static_cast<int>(p.num_classes);
  const int M = static_cast<int>(p.num_keys);
  const acc_t shared_scale = per_row_grad ? acc_t(0) : gpu::load(grad_loss) / gpu::load(denominator);

  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < p.num_rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    gpu::mark_row_start();
    scalar_t* g_keys = grad_similarity + row * p.num_keys;
    scalar_t* g_classes = C > 0 ? grad_sup_logits + row * p.num_classes : nullptr;
    const int64_t y = checked_label(p, row);
    // P_i = 0 marks every row that is not counted (ignored, or without a positive): zeros.
    const acc_t P = y == p.ignore_index ? acc_t(0) : gpu::load(row_stats + p.num_rows + row);
    if (!(P > acc_t(0))) {
      if (C > 0) fill_row<GROUP>(g_classes, C, lane, scalar_t(0));
      fill_row<GROUP>(g_keys, M, lane, scalar_t(0));
      continue;
    }
    const acc_t lse = gpu::load(row_stats + row);
    const acc_t g = (per_row_grad ? gpu::load(grad_loss + row) : shared_scale) * p.loss_scale;
    const acc_t inv_P = acc_t(1) / P;
    if (C > 0) {
      backward_segment<GROUP>(sup_logits + row * p.num_classes, g_classes, C, lane,
                              ClassSegment<acc_t>{p, static_cast<int>(y)}, lse, inv_P, g * p.inv_sup_temperature);
    }
    backward_segment<GROUP>(similarity + row * p.num_keys, g_keys, M, lane, KeySegment<acc_t>{p, y, row}, lse, inv_P,
                            g * p.inv_temperature);
  }
}

// ------------------------------------------------------------------------------ launch plan
// The kernels index within a row (class columns + key columns) in 32 bits.
inline void check_row_length(int64_t num_classes, int64_t num_keys) {
  if (!gpu_row_stream::fits_row_index(num_classes + num_keys)) {
    throw std::invalid_argument("ltfast paco_loss (CUDA): sup_logits and similarity have " +
                                std::to_string(num_classes) + " + " + std::to_string(num_keys) +
                                " columns per row; expected at most 2^31 - 1 together");
  }
}

// Blocks of the row kernels (the forward's partials buffer has 2 x this many).
inline unsigned row_kernel_blocks(int64_t num_rows, int64_t num_classes, int64_t num_keys) {
  unsigned blocks = 1;
  gpu_reduce::with_row_group(num_classes + num_keys,
                             [&](auto group) { blocks = gpu_reduce::row_blocks(num_rows, group); });
  return blocks;
}

// Forward: the row kernel, whose last block (reduce) finishes the loss from its partials when
// `ticket` (gpu::ticket_counter) is given (else, under CUDA graph capture, the one-block finish
// kernel follows): sum / counted rows for 'mean' (NaN when none is counted), and the denominator.
// With B = 0 the finish kernel alone sums the partials, zeros filled by the caller;
// `unit_denominator` ('none') receives 1.
template <typename scalar_t>
void launch_forward(const scalar_t* similarity, const scalar_t* sup_logits,
                    const KernelParams<at::opmath_type<scalar_t>>& p, at::opmath_type<scalar_t>* row_loss,
                    at::opmath_type<scalar_t>* row_stats, at::opmath_type<scalar_t>* unit_denominator, bool reduce,
                    bool mean, double* partials, at::opmath_type<scalar_t>* loss,
                    at::opmath_type<scalar_t>* denominator, unsigned int* ticket, gpu::Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  check_row_length(p.num_classes, p.num_keys);
  if (p.num_rows > 0) {
    gpu_reduce::with_row_group(p.num_classes + p.num_keys, [&](auto group) {
      constexpr int kGroup = decltype(group)::value;
      gpu::launch("paco forward_rows_kernel", &forward_rows_kernel<scalar_t, kGroup>,
                  gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, similarity, sup_logits, p,
                  row_loss, row_stats, unit_denominator, reduce ? partials : nullptr,
                  gpu_reduce::FinishArgs<acc_t>{reduce ? ticket : nullptr, mean, loss, denominator});
    });
  }
  if (reduce && (p.num_rows == 0 || ticket == nullptr)) {
    gpu::launch("paco finish_kernel", &gpu_reduce::finish_mean_kernel<acc_t>, 1, kBlockThreads, stream,
                static_cast<const double*>(partials),
                static_cast<int64_t>(row_kernel_blocks(p.num_rows, p.num_classes, p.num_keys)), mean, loss,
                denominator);
  }
}

template <typename scalar_t>
void launch_backward(const scalar_t* similarity, const scalar_t* sup_logits,
                     const KernelParams<at::opmath_type<scalar_t>>& p, const at::opmath_type<scalar_t>* row_stats,
                     const at::opmath_type<scalar_t>* grad_loss, bool per_row_grad,
                     const at::opmath_type<scalar_t>* denominator, scalar_t* grad_similarity,
                     scalar_t* grad_sup_logits, gpu::Stream stream) {
  if (p.num_rows == 0) return;
  check_row_length(p.num_classes, p.num_keys);
  gpu_reduce::with_row_group(p.num_classes + p.num_keys, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    gpu::launch("paco backward_rows_kernel", &backward_rows_kernel<scalar_t, kGroup>,
                gpu_reduce::row_blocks(p.num_rows, kGroup), kBlockThreads, stream, similarity, sup_logits, p,
                row_stats, grad_loss, per_row_grad, denominator, grad_similarity, grad_sup_logits);
  });
}

}  // namespace paco_kernels
}  // namespace ltfast
