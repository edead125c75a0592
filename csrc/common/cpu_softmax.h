// CPU building blocks shared by the row-softmax kernels (cross-entropy family, LADE): at::vec
// exp, NaN-propagating max, target checks, and the tiled online softmax of one adjusted row.
// Compiled into each *_cpu.cpp once per CPU capability (DEFAULT, AVX2, AVX512 on x86-64: setup.py),
// so everything here lives in ltfast::cpu::CPU_CAPABILITY (see capability_namespace.h).
#pragma once

#if !defined(CPU_CAPABILITY)
#error "cpu_softmax.h is CPU kernel code: include it only from a *_cpu.cpp built per CPU capability (setup.py)"
#endif

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "softmax_math.h"

namespace ltfast {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

inline Vectorized<float> vec_exp(const Vectorized<float>& x) {
  // exp_u20: pure-intrinsics polynomial (max 20 ulp, ~2.4e-6 relative), about 2x the speed of the
  // Sleef u10 exp; it is only ever applied to (a - max) - log_sum <= 0 (or a - max), where that error is far
  // below the fp32 test tolerance. It maps NaN to a finite value, hence the row-level NaN rule in
  // the backward kernels.
  return x.exp_u20();
}
inline Vectorized<double> vec_exp(const Vectorized<double>& x) {
  // float64 is the gradcheck dtype: exact std::exp, speed is secondary.
  return x.map([](double v) { return std::exp(v); });
}

template <typename T>
T nan_propagating_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Classes per tile: 2048 floats (8 KB) of adjusted logits plus the same slice of the per-class
// vectors stay in a 32 KB L1d. A whole 8142-class row (32 KB) did not: forward at [1024, 8142]
// took 0.67 ns per element against 0.55 ns at [4096, 1000].
constexpr int64_t kTileClasses = 2048;

// Rows per parallel task: enough work (~32K elements) to amortise the task overhead.
inline int64_t rows_per_task(int64_t num_classes) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_classes));
}

// The backward tile loop of the row kernels: body(source, out, start, len) sees entries start ..
// start + len - 1 of a row as acc_t logits (`source`) and writes their gradient as acc_t (`out`).
// float32/float64 rows are read and written in place; half-precision rows are converted into `tile`
// (gradient_tile_size elements), and the gradient is converted back from it, one L1-sized tile at a time.
template <typename scalar_t, typename acc_t>
int64_t gradient_tile_size(int64_t num_classes) {
  return std::is_same_v<scalar_t, acc_t> ? 0 : std::min(num_classes, kTileClasses);
}

template <typename scalar_t, typename acc_t, typename Body>
inline void for_each_gradient_tile(const scalar_t* logits_row, scalar_t* grad_row, int64_t num_classes, acc_t* tile,
                                   Body&& body) {
  for (int64_t start = 0; start < num_classes; start += kTileClasses) {
    const int64_t len = std::min(kTileClasses, num_classes - start);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      body(static_cast<const acc_t*>(logits_row + start), grad_row + start, start, len);
    } else {
      at::vec::convert(logits_row + start, tile, len);
      body(static_cast<const acc_t*>(tile), tile, start, len);
      at::vec::convert(tile, grad_row + start, len);
    }
  }
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

inline int64_t checked_target(const int64_t* target, int64_t row, int64_t num_classes,
                       int64_t ignore_index) {
  const int64_t y = target[row];
  TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < num_classes), "target[", row, "] = ", y,
                    " is out of range: expected a class index in [0, ", num_classes,
                    ") or ignore_index (", ignore_index, ")");
  return y;
}

template <typename scalar_t, typename acc_t>
acc_t adjusted_target_logit(const scalar_t* logits_row, const acc_t* adjustment, const acc_t* margin,
                            int64_t y) {
  const acc_t z = static_cast<acc_t>(logits_row[y]);
  return (adjustment ? math::adjusted_logit(z, adjustment[y]) : z) - (margin ? margin[y] : acc_t(0));
}

// SEQL's per-row drop decisions (see math::seql_dropped): tail-class entries other than the target
// whose hash falls below the threshold are removed from the softmax. The kernels apply them to each
// vector of logits as they load it (forward: dropped entries become -inf; backward: their gradient
// becomes 0), with the hash computed in the vector registers of the capability: 16 lanes of
// vpmulld under AVX512, 8 under AVX2. A separate overwrite pass over the tile after the exp pass
// (the previous AVX2-only scheme) re-read and re-wrote every tile and took the max twice.
struct RowDrops {
  const uint8_t* tail;           // [C], 1 = tail class
  const uint32_t* column_keys;   // [C], math::seql_column_key
  uint32_t row_key;              // math::seql_row_key of this row
  uint64_t threshold;            // math::seql_threshold(gamma)
  int64_t target;

  bool drops_all() const { return threshold > 0xffffffffULL; }
  uint32_t below() const { return static_cast<uint32_t>(drops_all() ? 0xffffffffULL : threshold); }

  // Whether entry c of the row is dropped.
  bool dropped(int64_t c) const {
    return c != target && tail[c] != 0 && (drops_all() || math::hash32(column_keys[c] ^ row_key) < below());
  }

  // v (entries c .. c + Vec::size() - 1 of the row) with its dropped lanes replaced by `value`.
  template <typename T>
  Vectorized<T> drop_lanes(const Vectorized<T>& v, int64_t c, T value) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      __m512i x = _mm512_xor_si512(_mm512_loadu_si512(column_keys + c), _mm512_set1_epi32(static_cast<int>(row_key)));
      x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));  // math::hash32, 16 lanes
      x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
      x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
      x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bU)));
      x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
      const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tail + c));
      __mmask16 drop = _mm_test_epi8_mask(t, t);
      if (!drops_all()) drop &= _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(static_cast<int>(below())));
      if (target >= c && target < c + 16) drop &= static_cast<__mmask16>(~(1u << (target - c)));
      return _mm512_mask_blend_ps(drop, v, _mm512_set1_ps(value));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      __m256i x = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(column_keys + c)),
                                   _mm256_set1_epi32(static_cast<int>(row_key)));
      x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));  // math::hash32, 8 lanes
      x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
      x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
      x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
      x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
      const __m128i t = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tail + c));
      __m256i drop = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(t), _mm256_setzero_si256());
      if (!drops_all()) {  // unsigned h < below as a signed compare of both with the sign bit flipped
        const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000U));
        drop = _mm256_and_si256(drop, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(below() ^ 0x80000000U)),
                                                         _mm256_xor_si256(x, sign)));
      }
      if (target >= c && target < c + 8) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        drop = _mm256_andnot_si256(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int>(target - c))), drop);
      }
      return _mm256_blendv_ps(v, _mm256_set1_ps(value), _mm256_castsi256_ps(drop));
    }
#endif
    alignas(64) T lanes[Vectorized<T>::size()];
    v.store(lanes);
    for (int64_t k = 0; k < Vectorized<T>::size(); ++k) {
      if (dropped(c + k)) lanes[k] = value;
    }
    return Vectorized<T>::loadu(lanes);
  }
};

// Writes the adjusted logits a_c = z_c + adjustment_c of C classes (the margin is applied by the
// caller) into `adjusted` and returns their max (NaN if any entry is NaN). With `drops`, the row's
// entries start .. start + C - 1 that SEQL drops are written as -inf (and so left out of the max).
template <typename scalar_t, typename acc_t>
acc_t load_adjusted_row(const scalar_t* logits_row, const acc_t* adjustment, int64_t C,
                        acc_t* adjusted, const RowDrops* drops = nullptr, int64_t start = 0) {
  using Vec = Vectorized<acc_t>;
  const acc_t* source;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    source = logits_row;
  } else {
    at::vec::convert(logits_row, adjusted, C);
    source = adjusted;
  }
  Vec vmax(math::negative_infinity<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    Vec v = Vec::loadu(source + c);
    if (adjustment) v = math::adjusted_logit(v, Vec::loadu(adjustment + c));
    if (drops) v = drops->drop_lanes(v, start + c, math::negative_infinity<acc_t>());
    v.store(adjusted + c);
    vmax = at::vec::maximum(vmax, v);
  }
  acc_t row_max = math::negative_infinity<acc_t>();
  for (; c < C; ++c) {
    acc_t v = adjustment ? math::adjusted_logit(source[c], adjustment[c]) : source[c];
    if (drops && drops->dropped(start + c)) v = math::negative_infinity<acc_t>();
    adjusted[c] = v;
    row_max = nan_propagating_max(row_max, v);
  }
  alignas(64) acc_t lanes[Vec::size()];
  vmax.store(lanes);
  for (int64_t k = 0; k < Vec::size(); ++k) row_max = nan_propagating_max(row_max, lanes[k]);
  return row_max;
}

// sum_c exp(tile_c - shift) over the whole vectors of a tile (the first len - len % Vec::size()
// entries; returned as a vector), with `offset` += sum_c w_c * (tile_c - target) when asked; with
// kStore, each exponential is also written to exponentials[c]. Returns the number of entries done.
template <bool kStore, typename acc_t>
int64_t add_tile_exponentials(const acc_t* tile, int64_t len, acc_t shift, Vectorized<acc_t>& sum,
                              Vectorized<acc_t>* offset, acc_t target, const acc_t* w, acc_t* exponentials) {
  using Vec = Vectorized<acc_t>;
  const Vec vshift(shift), vtarget(target);
  int64_t c = 0;
  for (; c + Vec::size() <= len; c += Vec::size()) {
    const Vec v = Vec::loadu(tile + c);
    const Vec e = vec_exp(v - vshift);
    if constexpr (kStore) e.store(exponentials + c);
    sum = sum + e;
    if (offset) {
      const Vec d = v - vtarget;
      *offset = *offset + (w ? d * Vec::loadu(w + c) : d);
    }
  }
  return c;
}

// Online-softmax state (max, sum exp) of one adjusted row a_c = z_c + adjustment_c, with the
// target's logit replaced by `target_logit` when a margin is given. The row is taken in L1-sized
// tiles: each tile is read from memory once (max pass), re-read from L1 (exp pass) and merged into
// the state. With `offset_sum`, also accumulates sum_c w_c * (a_c - target_logit) (label smoothing).
//
// With `exponentials` (C entries) and `tile_maxes` (one per kTileClasses-class tile), also writes
// the row's exponentials e_c = exp(a_c - M_k), M_k = tile_maxes[k] the max of c's tile (-inf for a
// tile of -inf, whose e_c are 0): the softmax is then p_c = e_c * exp((M_k - m) - log_sum), one
// multiply per entry instead of a second exponential (the forward-time gradient,
// cross_entropy_cpu.cpp). They are written by the exp pass, not the load pass, so that the first
// touch of a fresh output row overlaps the exponentials. The state is bit-identical either way.
template <typename scalar_t, typename acc_t>
math::SoftmaxState<acc_t> adjusted_row_softmax_state(const scalar_t* logits_row, int64_t C,
                                                     const acc_t* adjustment, const acc_t* margin,
                                                     int64_t y, acc_t target_logit, acc_t* tile,
                                                     const acc_t* weight, acc_t* offset_sum,
                                                     const RowDrops* drops = nullptr, acc_t* exponentials = nullptr,
                                                     acc_t* tile_maxes = nullptr) {
  using Vec = Vectorized<acc_t>;
  auto state = math::empty_softmax_state<acc_t>();
  Vec voffset(acc_t(0));
  for (int64_t start = 0; start < C; start += kTileClasses) {
    const int64_t len = std::min(kTileClasses, C - start);
    acc_t* const tile_exponentials = exponentials ? exponentials + start : nullptr;
    // Dropped entries become -inf as they are loaded: exactly 0 in the sum, never the max.
    acc_t tile_max = load_adjusted_row(logits_row + start, adjustment ? adjustment + start : nullptr, len, tile,
                                       drops, start);
    if (margin && y >= start && y < start + len) {
      tile[y - start] = target_logit;
      tile_max = nan_propagating_max(tile_max, target_logit);  // a valid shift either way
    }
    if (tile_max == math::negative_infinity<acc_t>()) {
      // A tile of -inf adds exactly 0 to the exp-sum (and exp(-inf - -inf) would be NaN), but its
      // entries are still part of the smoothing term: -inf - a_y makes the loss +inf, as in
      // F.cross_entropy. Rare, so a scalar loop.
      if (offset_sum) {
        const acc_t* w = weight ? weight + start : nullptr;
        for (int64_t c = 0; c < len; ++c) *offset_sum += (tile[c] - target_logit) * (w ? w[c] : acc_t(1));
      }
      if (tile_exponentials) {
        std::fill(tile_exponentials, tile_exponentials + len, acc_t(0));
        tile_maxes[start / kTileClasses] = tile_max;
      }
      continue;
    }
    Vec vsum(acc_t(0));
    const acc_t* w = weight ? weight + start : nullptr;
    Vec* voffset_or_null = offset_sum ? &voffset : nullptr;
    int64_t c = tile_exponentials ? add_tile_exponentials<true>(tile, len, tile_max, vsum, voffset_or_null,
                                                                target_logit, w, tile_exponentials)
                                  : add_tile_exponentials<false>(tile, len, tile_max, vsum, voffset_or_null,
                                                                 target_logit, w, tile_exponentials);
    acc_t tile_sum = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, vsum);
    for (; c < len; ++c) {
      const acc_t e = std::exp(tile[c] - tile_max);
      tile_sum += e;
      if (offset_sum) *offset_sum += (tile[c] - target_logit) * (w ? w[c] : acc_t(1));
      if (tile_exponentials) tile_exponentials[c] = e;
    }
    if (tile_exponentials) tile_maxes[start / kTileClasses] = tile_max;
    state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{tile_max, tile_sum});
  }
  if (offset_sum) *offset_sum += at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, voffset);
  return state;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ltfast
