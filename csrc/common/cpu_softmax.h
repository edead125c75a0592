// CPU building blocks shared by the row-softmax kernels (cross-entropy family, LADE): at::vec
// exp, NaN-propagating max, target checks, and the tiled online softmax of one adjusted row.
// Compiled into each *_cpu.cpp with the same flags (AVX2 on x86-64, see setup.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "softmax_math.h"

namespace ltfast {
namespace cpu {

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

// Writes the adjusted logits a_c = z_c + adjustment_c of C classes (the margin is applied by the
// caller) into `adjusted` and returns their max (NaN if any entry is NaN).
template <typename scalar_t, typename acc_t>
acc_t load_adjusted_row(const scalar_t* logits_row, const acc_t* adjustment, int64_t C,
                        acc_t* adjusted) {
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
    v.store(adjusted + c);
    vmax = at::vec::maximum(vmax, v);
  }
  acc_t row_max = math::negative_infinity<acc_t>();
  for (; c < C; ++c) {
    const acc_t v = adjustment ? math::adjusted_logit(source[c], adjustment[c]) : source[c];
    adjusted[c] = v;
    row_max = nan_propagating_max(row_max, v);
  }
  alignas(64) acc_t lanes[Vec::size()];
  vmax.store(lanes);
  for (int64_t k = 0; k < Vec::size(); ++k) row_max = nan_propagating_max(row_max, lanes[k]);
  return row_max;
}

// SEQL's per-row drop decisions (see math::seql_dropped): tail-class entries other than the target
// whose hash falls below the threshold are removed from the softmax.
struct RowDrops {
  const uint8_t* tail;           // [C], 1 = tail class
  const uint32_t* column_keys;   // [C], math::seql_column_key
  uint32_t row_key;              // math::seql_row_key of this row
  uint64_t threshold;            // math::seql_threshold(gamma)
  int64_t target;

  // Sets values[c] = value for every dropped entry c in [start, start + len) (the target is never
  // dropped). Branch-free uint32 arithmetic that the compiler vectorises (AVX2 vpmulld): a scalar
  // loop with branches took 2/3 of the SEQL forward at [4096, 1000].
  template <typename T>
  void overwrite_dropped(T* values, int64_t start, int64_t len, T value) const {
    const uint8_t* t = tail + start;
    const uint32_t* keys = column_keys + start;
    const bool all = threshold > 0xffffffffULL;
    const uint32_t below = static_cast<uint32_t>(all ? 0xffffffffULL : threshold);
    const bool keeps_target = target >= start && target < start + len;
    const T target_value = keeps_target ? values[target - start] : T(0);
    for (int64_t c = 0; c < len; ++c) {
      const uint32_t h = math::hash32(keys[c] ^ row_key);
      const bool drop = (t[c] != 0) & (all | (h < below));
      values[c] = drop ? value : values[c];
    }
    if (keeps_target) values[target - start] = target_value;
  }
};

// Online-softmax state (max, sum exp) of one adjusted row a_c = z_c + adjustment_c, with the
// target's logit replaced by `target_logit` when a margin is given. The row is taken in L1-sized
// tiles: each tile is read from memory once (max pass), re-read from L1 (exp pass) and merged into
// the state. With `offset_sum`, also accumulates sum_c w_c * (a_c - target_logit) (label smoothing).
template <typename scalar_t, typename acc_t>
math::SoftmaxState<acc_t> adjusted_row_softmax_state(const scalar_t* logits_row, int64_t C,
                                                     const acc_t* adjustment, const acc_t* margin,
                                                     int64_t y, acc_t target_logit, acc_t* tile,
                                                     const acc_t* weight, acc_t* offset_sum,
                                                     const RowDrops* drops = nullptr) {
  using Vec = Vectorized<acc_t>;
  const Vec vtarget(target_logit);
  auto state = math::empty_softmax_state<acc_t>();
  Vec voffset(acc_t(0));
  for (int64_t start = 0; start < C; start += kTileClasses) {
    const int64_t len = std::min(kTileClasses, C - start);
    acc_t tile_max = load_adjusted_row(logits_row + start, adjustment ? adjustment + start : nullptr, len, tile);
    if (margin && y >= start && y < start + len) {
      tile[y - start] = target_logit;
      tile_max = nan_propagating_max(tile_max, target_logit);  // a valid shift either way
    }
    if (drops) {  // dropped entries become -inf: exactly 0 in the sum; the max is taken again
      drops->overwrite_dropped(tile, start, len, math::negative_infinity<acc_t>());
      Vec vmax(math::negative_infinity<acc_t>());
      int64_t c = 0;
      for (; c + Vec::size() <= len; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(tile + c));
      tile_max = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return at::vec::maximum(x, z); }, vmax);
      for (; c < len; ++c) tile_max = nan_propagating_max(tile_max, tile[c]);
    }
    if (tile_max == math::negative_infinity<acc_t>()) {
      // A tile of -inf adds exactly 0 to the exp-sum (and exp(-inf - -inf) would be NaN), but its
      // entries are still part of the smoothing term: -inf - a_y makes the loss +inf, as in
      // F.cross_entropy. Rare, so a scalar loop.
      if (offset_sum) {
        const acc_t* w = weight ? weight + start : nullptr;
        for (int64_t c = 0; c < len; ++c) *offset_sum += (tile[c] - target_logit) * (w ? w[c] : acc_t(1));
      }
      continue;
    }
    const Vec vmax(tile_max);
    Vec vsum(acc_t(0));
    const acc_t* w = weight ? weight + start : nullptr;
    int64_t c = 0;
    for (; c + Vec::size() <= len; c += Vec::size()) {
      const Vec v = Vec::loadu(tile + c);
      vsum = vsum + vec_exp(v - vmax);
      if (offset_sum) {
        const Vec offset = v - vtarget;
        voffset = voffset + (w ? offset * Vec::loadu(w + c) : offset);
      }
    }
    acc_t tile_sum = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, vsum);
    for (; c < len; ++c) {
      tile_sum += std::exp(tile[c] - tile_max);
      if (offset_sum) *offset_sum += (tile[c] - target_logit) * (w ? w[c] : acc_t(1));
    }
    state = math::merge_softmax_states(state, math::SoftmaxState<acc_t>{tile_max, tile_sum});
  }
  if (offset_sum) *offset_sum += at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& z) { return x + z; }, voffset);
  return state;
}

}  // namespace cpu
}  // namespace ltfast
