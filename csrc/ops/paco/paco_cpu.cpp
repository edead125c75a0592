// CPU backend of the PaCo loss (paco.h): at::parallel_for over the anchors, each row of C class columns
// and M key columns taken in L1-sized tiles with at::vec. The forward reads each input element once
// from memory: the load pass scales the tile into an L1 buffer, takes its max and adds the positive
// key logits (a compare of the key labels' codes with the anchor's, no [B, C + M] mask); the exp pass
// re-reads the buffer; the tiles' (max, sum) states are merged online across the two segments. With
// with_grad the forward also writes both gradients for an upstream gradient of 1 from the exponentials
// the exp pass left (one multiply per entry instead of a second exponential), as the cross-entropy
// family's forward-time gradient (cross_entropy_cpu.cpp): fwd+bwd at B = 256, C = 1000, M = 8704 float32,
// 1 thread (shared machine, medians of 40) took 2.05 ms with it against 2.79 ms with the backward op
// (forward alone: 1.56 ms); float64 recomputes them with the backward's own code, so that gradcheck's
// reentrancy check sees bit-identical gradients.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../../common/cpu_dispatch.h"
#include "../../common/cpu_softmax.h"
#include "../../common/softmax_math.h"
#include "paco.h"

namespace ltfast {
namespace CPU_CAPABILITY {  // one build per CPU capability: csrc/common/cpu_dispatch.h
namespace {

using at::vec::Vectorized;
using namespace cpu;

// The labels as floating-point codes, so that a key column's positive test is one vector compare in
// the lanes of the logits: equal codes = equal labels. With classes (C > 0) the code of a label is the
// label itself (labels are checked to be in [0, C)); without (SupCon), a dense id per distinct anchor
// label. Keys whose label is ignore_index or matches no anchor get NaN, which equals nothing.
// Per call: O(B + M) (a histogram of the keys' codes gives each anchor's positive weight
// P_i = beta [C > 0] + alpha (number of keys of its label, self excluded) before any row is read, so
// the forward-time gradient of 'mean' knows the number of counted rows up front).
template <typename acc_t>
struct PacoLabels {
  std::vector<acc_t> key_codes;        // [M]
  std::vector<acc_t> anchor_codes;     // [B], NaN for an anchor labelled ignore_index
  std::vector<acc_t> positive_weight;  // [B] P_i, 0 for a row that is not counted
  int64_t counted_rows = 0;
};

template <typename acc_t>
PacoLabels<acc_t> code_labels(const PacoArgs& args) {
  const int64_t B = args.num_rows, M = args.num_keys, C = args.num_classes;
  const int64_t ignore = args.ignore_index;
  const int64_t* labels = args.labels.data_ptr<int64_t>();
  const int64_t* key_labels = args.key_labels.data_ptr<int64_t>();
  std::vector<int64_t> anchor_ids(B, -1), key_ids(M, -1);
  int64_t num_ids = 0;
  if (C > 0) {
    for (int64_t i = 0; i < B; ++i) {
      const int64_t y = labels[i];
      if (y == ignore) continue;
      TORCH_CHECK_INDEX(y >= 0 && y < C, "ltfast.paco_loss: labels[", i, "] = ", y,
                        " is out of range: expected a class index in [0, C = ", C, ") (C: the classes of sup_logits) "
                        "or ignore_index (", ignore, ")");
      anchor_ids[i] = y;
    }
    for (int64_t j = 0; j < M; ++j) {
      const int64_t k = key_labels[j];
      if (k != ignore && k >= 0 && k < C) key_ids[j] = k;
    }
    num_ids = C;
  } else {
    std::unordered_map<int64_t, int64_t> ids;
    ids.reserve(static_cast<size_t>(B));
    for (int64_t i = 0; i < B; ++i) {
      if (labels[i] == ignore) continue;
      anchor_ids[i] = ids.emplace(labels[i], static_cast<int64_t>(ids.size())).first->second;
    }
    for (int64_t j = 0; j < M; ++j) {
      if (key_labels[j] == ignore) continue;
      const auto it = ids.find(key_labels[j]);
      if (it != ids.end()) key_ids[j] = it->second;
    }
    num_ids = static_cast<int64_t>(ids.size());
  }
  // Codes must be exact in acc_t: 2^24 distinct labels in float32.
  TORCH_CHECK_VALUE(num_ids <= (int64_t(1) << std::numeric_limits<acc_t>::digits),
                    "ltfast.paco_loss: more than 2^", std::numeric_limits<acc_t>::digits,
                    " classes or distinct labels are not supported, got ", num_ids);
  std::vector<int64_t> key_count(static_cast<size_t>(num_ids), 0);
  for (int64_t j = 0; j < M; ++j) {
    if (key_ids[j] >= 0) ++key_count[key_ids[j]];
  }
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  PacoLabels<acc_t> out;
  out.key_codes.resize(M);
  for (int64_t j = 0; j < M; ++j) out.key_codes[j] = key_ids[j] >= 0 ? static_cast<acc_t>(key_ids[j]) : nan;
  out.anchor_codes.resize(B);
  out.positive_weight.resize(B);
  const acc_t class_weight = C > 0 ? static_cast<acc_t>(args.beta) : acc_t(0);
  const acc_t alpha = static_cast<acc_t>(args.alpha);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t id = anchor_ids[i];
    out.anchor_codes[i] = id >= 0 ? static_cast<acc_t>(id) : nan;
    acc_t weight = acc_t(0);
    if (id >= 0) {
      const int64_t key_positives = key_count[id] - (key_ids[i] == id ? 1 : 0);  // key i is anchor i: not a positive
      weight = class_weight + alpha * static_cast<acc_t>(key_positives);
    }
    out.positive_weight[i] = weight;
    if (weight > acc_t(0)) ++out.counted_rows;
  }
  return out;
}

template <typename acc_t>
acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& x, Vectorized<acc_t>& y) { return x + y; }, v);
}

template <typename acc_t>
acc_t reduce_max(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t result = math::negative_infinity<acc_t>();
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) result = nan_propagating_max(result, lanes[k]);
  return result;
}

// sum_c exp(tile_c - shift) over a tile (shift finite), each exponential also written to
// exponentials[c] when given.
template <typename acc_t>
acc_t tile_exponential_sum(const acc_t* tile, int64_t len, acc_t shift, acc_t* exponentials) {
  Vectorized<acc_t> vsum(acc_t(0));
  Vectorized<acc_t>* no_offset = nullptr;
  const acc_t* no_weight = nullptr;
  int64_t c = exponentials
                  ? add_tile_exponentials<true, acc_t>(tile, len, shift, vsum, no_offset, acc_t(0), no_weight, exponentials)
                  : add_tile_exponentials<false, acc_t>(tile, len, shift, vsum, no_offset, acc_t(0), no_weight, nullptr);
  acc_t sum = reduce_sum(vsum);
  for (; c < len; ++c) {
    const acc_t e = std::exp(tile[c] - shift);
    sum += e;
    if (exponentials) exponentials[c] = e;
  }
  return sum;
}

// What the forward keeps of a row: lse_i and sum_col m_col l_col.
template <typename acc_t>
struct RowStatistics {
  acc_t lse;
  acc_t positive_sum;
};

template <typename scalar_t>
class PacoRows {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;

  PacoRows(const PacoArgs& args, const PacoLabels<acc_t>& labels)
      : args_(args),
        labels_(labels),
        similarity_(args.similarity.data_ptr<scalar_t>()),
        sup_logits_(args.num_classes > 0 ? args.sup_logits.data_ptr<scalar_t>() : nullptr),
        log_prior_(data_or_null<acc_t>(args.log_prior)),
        label_values_(args.labels.data_ptr<int64_t>()),
        inv_temperature_(static_cast<acc_t>(args.inv_temperature)),
        inv_sup_temperature_(static_cast<acc_t>(args.inv_sup_temperature)),
        alpha_(static_cast<acc_t>(args.alpha)),
        beta_(static_cast<acc_t>(args.beta)),
        gamma_(static_cast<acc_t>(args.gamma)) {}

  int64_t num_tiles() const { return tiles_of(args_.num_classes) + tiles_of(args_.num_keys); }

  // Row i's lse and positive sum (row i counted: its label is a class, P_i > 0). With `class_exps`
  // ([C]) and `key_exps` ([M]), the exp pass also writes e_col = exp(l_col - M_k) there, M_k =
  // tile_maxes[k] the max of the column's tile (class tiles first; e = 0 in a tile of -inf and on the
  // self column).
  RowStatistics<acc_t> statistics(int64_t i, acc_t* tile, acc_t* class_exps, acc_t* key_exps,
                                  acc_t* tile_maxes) const {
    const int64_t C = args_.num_classes, M = args_.num_keys;
    auto state = math::empty_softmax_state<acc_t>();
    acc_t positive_sum = acc_t(0);
    int64_t k = 0;
    if (C > 0) {
      const scalar_t* row = sup_logits_ + i * C;
      const Vec vinv(inv_sup_temperature_);
      for (int64_t start = 0; start < C; start += kTileClasses, ++k) {
        const int64_t len = std::min(kTileClasses, C - start);
        const acc_t* source = tile_source(row + start, len, tile);
        const acc_t* prior = log_prior_ ? log_prior_ + start : nullptr;
        Vec vmax(math::negative_infinity<acc_t>());
        int64_t c = 0;
        for (; c + Vec::size() <= len; c += Vec::size()) {
          Vec v = Vec::loadu(source + c);
          if (prior) v = v + Vec::loadu(prior + c);
          v = v * vinv;
          v.store(tile + c);
          vmax = at::vec::maximum(vmax, v);
        }
        acc_t tile_max = reduce_max(vmax);
        for (; c < len; ++c) {
          const acc_t v = (prior ? source[c] + prior[c] : source[c]) * inv_sup_temperature_;
          tile[c] = v;
          tile_max = nan_propagating_max(tile_max, v);
        }
        state = merge_tile(state, tile, len, tile_max, acc_t(1), class_exps ? class_exps + start : nullptr,
                           tile_maxes, k);
      }
      positive_sum = beta_ * class_logit(i, label_values_[i]);
    }
    const scalar_t* row = similarity_ + i * M;
    const acc_t code = labels_.anchor_codes[i];
    const Vec vinv(inv_temperature_), vcode(code);
    Vec vpositive(acc_t(0));
    acc_t key_positive_sum = acc_t(0);
    for (int64_t start = 0; start < M; start += kTileClasses, ++k) {
      const int64_t len = std::min(kTileClasses, M - start);
      const acc_t* source = tile_source(row + start, len, tile);
      const acc_t* codes = labels_.key_codes.data() + start;
      // The self column (key i, in the first tile) is in the max but neither a positive nor in the sum:
      // the vector loops run around it.
      const int64_t self = i >= start && i < start + len ? i - start : -1;
      Vec vmax(math::negative_infinity<acc_t>());
      acc_t tile_max = math::negative_infinity<acc_t>();
      const auto load_range = [&](int64_t begin, int64_t end) {
        int64_t j = begin;
        for (; j + Vec::size() <= end; j += Vec::size()) {
          const Vec v = Vec::loadu(source + j) * vinv;
          v.store(tile + j);
          vmax = at::vec::maximum(vmax, v);
          vpositive = vpositive + (v & (Vec::loadu(codes + j) == vcode));
        }
        for (; j < end; ++j) {
          const acc_t v = source[j] * inv_temperature_;
          tile[j] = v;
          tile_max = nan_propagating_max(tile_max, v);
          if (codes[j] == code) key_positive_sum += v;
        }
      };
      if (self >= 0) {
        load_range(0, self);
        const acc_t v = source[self] * inv_temperature_;
        tile_max = nan_propagating_max(tile_max, v);
        tile[self] = math::negative_infinity<acc_t>();  // weight 0 in the denominator: exp gives exactly 0
        load_range(self + 1, len);
      } else {
        load_range(0, len);
      }
      tile_max = nan_propagating_max(tile_max, reduce_max(vmax));
      state = merge_tile(state, tile, len, tile_max, gamma_, key_exps ? key_exps + start : nullptr, tile_maxes, k);
    }
    positive_sum += alpha_ * (key_positive_sum + reduce_sum(vpositive));
    return {row_lse(state), positive_sum};
  }

  // Row i's gradient for the scale g (upstream gradient * loss_scale, / counted rows for 'mean'),
  // recomputing p_col = w_col exp(l_col - lse) from the inputs: the backward op, and the float64
  // forward-time gradient. grad_sup_row is null when C == 0; `tile` has kTileClasses entries.
  void write_gradient(int64_t i, acc_t lse, acc_t positive_weight, acc_t scale, scalar_t* grad_sup_row,
                      scalar_t* grad_sim_row, acc_t* tile) const {
    const int64_t C = args_.num_classes, M = args_.num_keys;
    const Vec vlse(lse);
    if (C > 0) {
      const scalar_t* row = sup_logits_ + i * C;
      const acc_t coef = scale * inv_sup_temperature_;
      const Vec vinv(inv_sup_temperature_), vcoef(coef);
      const int64_t y = label_values_[i];
      for (int64_t start = 0; start < C; start += kTileClasses) {
        const int64_t len = std::min(kTileClasses, C - start);
        const acc_t* source = tile_source(row + start, len, tile);
        acc_t* out = kSameType ? reinterpret_cast<acc_t*>(grad_sup_row + start) : tile;
        const acc_t* prior = log_prior_ ? log_prior_ + start : nullptr;
        int64_t c = 0;
        for (; c + Vec::size() <= len; c += Vec::size()) {
          Vec v = Vec::loadu(source + c);
          if (prior) v = v + Vec::loadu(prior + c);
          (vec_exp(v * vinv - vlse) * vcoef).store(out + c);
        }
        for (; c < len; ++c) {
          const acc_t v = (prior ? source[c] + prior[c] : source[c]) * inv_sup_temperature_;
          out[c] = std::exp(v - lse) * coef;
        }
        if (y >= start && y < start + len) {
          out[y - start] = (std::exp(class_logit(i, y) - lse) - beta_ / positive_weight) * coef;
        }
        store_tile(out, grad_sup_row + start, len);
      }
    }
    const scalar_t* row = similarity_ + i * M;
    const acc_t coef = scale * inv_temperature_;
    const acc_t positive = alpha_ / positive_weight;
    const Vec vinv(inv_temperature_), vcoef(coef), vgamma(gamma_), vpositive(positive), vcode(labels_.anchor_codes[i]);
    for (int64_t start = 0; start < M; start += kTileClasses) {
      const int64_t len = std::min(kTileClasses, M - start);
      const acc_t* source = tile_source(row + start, len, tile);
      const acc_t* codes = labels_.key_codes.data() + start;
      acc_t* out = kSameType ? reinterpret_cast<acc_t*>(grad_sim_row + start) : tile;
      int64_t j = 0;
      for (; j + Vec::size() <= len; j += Vec::size()) {
        const Vec p = vgamma * vec_exp(Vec::loadu(source + j) * vinv - vlse);
        ((p - (vpositive & (Vec::loadu(codes + j) == vcode))) * vcoef).store(out + j);
      }
      for (; j < len; ++j) {
        const acc_t p = gamma_ * std::exp(source[j] * inv_temperature_ - lse);
        out[j] = (p - (codes[j] == labels_.anchor_codes[i] ? positive : acc_t(0))) * coef;
      }
      if (i >= start && i < start + len) out[i - start] = acc_t(0);  // the self column: weight 0, no positive
      store_tile(out, grad_sim_row + start, len);
    }
  }

  // Row i's forward-time gradient from the exponentials `statistics` wrote (class_exps / key_exps,
  // overwritten; for float32 they are the gradient rows themselves): p_col = w_col e_col exp(M_k - lse).
  void write_gradient_from_exponentials(int64_t i, acc_t lse, acc_t positive_weight, acc_t scale,
                                        const acc_t* tile_maxes, acc_t* class_exps, acc_t* key_exps,
                                        scalar_t* grad_sup_row, scalar_t* grad_sim_row) const {
    const int64_t C = args_.num_classes, M = args_.num_keys;
    int64_t k = 0;
    if (C > 0) {
      const acc_t coef = scale * inv_sup_temperature_;
      for (int64_t start = 0; start < C; start += kTileClasses, ++k) {
        const int64_t len = std::min(kTileClasses, C - start);
        const Vec vfactor(tile_factor(tile_maxes[k], lse) * coef);
        acc_t* e = class_exps + start;
        int64_t c = 0;
        for (; c + Vec::size() <= len; c += Vec::size()) (Vec::loadu(e + c) * vfactor).store(e + c);
        const acc_t factor = tile_factor(tile_maxes[k], lse) * coef;
        for (; c < len; ++c) e[c] *= factor;
      }
      const int64_t y = label_values_[i];
      class_exps[y] = (std::exp(class_logit(i, y) - lse) - beta_ / positive_weight) * coef;
      if constexpr (!kSameType) at::vec::convert(class_exps, grad_sup_row, C);
    }
    const acc_t coef = scale * inv_temperature_;
    const acc_t positive = alpha_ / positive_weight * coef;
    const acc_t code = labels_.anchor_codes[i];
    const Vec vpositive(positive), vcode(code);
    for (int64_t start = 0; start < M; start += kTileClasses, ++k) {
      const int64_t len = std::min(kTileClasses, M - start);
      const acc_t factor = tile_factor(tile_maxes[k], lse) * gamma_ * coef;
      const Vec vfactor(factor);
      acc_t* e = key_exps + start;
      const acc_t* codes = labels_.key_codes.data() + start;
      int64_t j = 0;
      for (; j + Vec::size() <= len; j += Vec::size()) {
        (Vec::loadu(e + j) * vfactor - (vpositive & (Vec::loadu(codes + j) == vcode))).store(e + j);
      }
      for (; j < len; ++j) e[j] = e[j] * factor - (codes[j] == code ? positive : acc_t(0));
      if (i >= start && i < start + len) e[i - start] = acc_t(0);
    }
    if constexpr (!kSameType) at::vec::convert(key_exps, grad_sim_row, M);
  }

 private:
  static int64_t tiles_of(int64_t n) { return (n + kTileClasses - 1) / kTileClasses; }

  // The tile's input as acc_t: the row itself for float32/float64, else converted into `tile`.
  static const acc_t* tile_source(const scalar_t* row, int64_t len, acc_t* tile) {
    if constexpr (kSameType) {
      return row;
    } else {
      at::vec::convert(row, tile, len);
      return tile;
    }
  }

  // A gradient tile computed in `out` (the gradient row itself for float32/float64) into the row.
  static void store_tile(const acc_t* out, scalar_t* grad_row, int64_t len) {
    if constexpr (!kSameType) at::vec::convert(out, grad_row, len);
  }

  // exp(M_k - lse): turns the tile's e_col into probabilities (0 for a tile of -inf, whose e are 0).
  static acc_t tile_factor(acc_t tile_max, acc_t lse) {
    return tile_max == math::negative_infinity<acc_t>() ? acc_t(0) : std::exp(tile_max - lse);
  }

  acc_t class_logit(int64_t i, int64_t y) const {
    const acc_t z = static_cast<acc_t>(sup_logits_[i * args_.num_classes + y]);
    return (log_prior_ ? z + log_prior_[y] : z) * inv_sup_temperature_;
  }

  // Merges a loaded tile (max tile_max) into the row's state with denominator weight `weight`.
  static math::SoftmaxState<acc_t> merge_tile(math::SoftmaxState<acc_t> state, const acc_t* tile, int64_t len,
                                              acc_t tile_max, acc_t weight, acc_t* exponentials, acc_t* tile_maxes,
                                              int64_t k) {
    if (tile_maxes) tile_maxes[k] = tile_max;
    if (tile_max == math::negative_infinity<acc_t>()) {  // exp(-inf - -inf) would be NaN: the tile adds 0
      if (exponentials) std::fill(exponentials, exponentials + len, acc_t(0));
      return math::merge_softmax_states(state, math::SoftmaxState<acc_t>{tile_max, acc_t(0)});
    }
    const acc_t sum = tile_exponential_sum(tile, len, tile_max, exponentials);
    return math::merge_softmax_states(state, math::SoftmaxState<acc_t>{tile_max, weight * sum});
  }

  // lse = mx + log(S + 1e-12), S relative to mx, the max over every column (as the original). A
  // non-finite max (+inf, or every column -inf) makes the original's row NaN (inf - inf), and so it is here.
  static acc_t row_lse(const math::SoftmaxState<acc_t>& state) {
    if (!(state.max > math::negative_infinity<acc_t>() && state.max < -math::negative_infinity<acc_t>())) {
      return state.max - state.max;
    }
    return state.max + std::log(state.sum + acc_t(1e-12));
  }

  const PacoArgs& args_;
  const PacoLabels<acc_t>& labels_;
  const scalar_t* similarity_;
  const scalar_t* sup_logits_;
  const acc_t* log_prior_;
  const int64_t* label_values_;
  acc_t inv_temperature_, inv_sup_temperature_, alpha_, beta_, gamma_;
};

// Rows per parallel task: ~32K elements, as the cross-entropy family (rows_per_task).
int64_t paco_rows_per_task(const PacoArgs& args) { return rows_per_task(args.num_classes + args.num_keys); }

template <typename scalar_t>
void forward_kernel(const PacoArgs& args, const PacoLabels<at::opmath_type<scalar_t>>& labels, at::Tensor& row_loss,
                    at::Tensor& row_stats, at::Tensor& grad_similarity, at::Tensor& grad_sup_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  // float64 (gradcheck) recomputes its forward-time gradient with the backward's code: bit-identical.
  constexpr bool kReuseExponentials = !std::is_same_v<scalar_t, double>;
  const int64_t B = args.num_rows, C = args.num_classes, M = args.num_keys;
  const PacoRows<scalar_t> rows(args, labels);
  acc_t* loss_out = row_loss.data_ptr<acc_t>();
  acc_t* lse_out = row_stats.data_ptr<acc_t>();  // row_stats[0]
  acc_t* weight_out = lse_out + B;               // row_stats[1]
  const bool with_grad = args.with_grad;
  scalar_t* grad_sim = with_grad ? grad_similarity.data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_sup = with_grad && C > 0 ? grad_sup_logits.data_ptr<scalar_t>() : nullptr;
  // The upstream gradient 1, divided by the counted rows for 'mean', as the backward op computes it.
  acc_t inv_denominator = acc_t(1);
  if (args.reduction == Reduction::Mean) inv_denominator = acc_t(1) / static_cast<acc_t>(labels.counted_rows);
  const acc_t loss_scale = static_cast<acc_t>(args.loss_scale);
  const acc_t grad_scale = (acc_t(1) * inv_denominator) * loss_scale;

  at::parallel_for(0, B, paco_rows_per_task(args), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(std::min<int64_t>(std::max(C, M), kTileClasses));
    std::vector<acc_t> tile_maxes(rows.num_tiles());
    // Half-precision gradients: the row's exponentials in a float32 buffer (float32: the gradient rows).
    std::vector<acc_t> exponential_row(with_grad && kReuseExponentials && !kSameType ? C + M : 0);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t positive_weight = labels.positive_weight[i];
      if (!(positive_weight > acc_t(0))) {  // ignored, or no positive: 0 and not counted
        loss_out[i] = acc_t(0);
        lse_out[i] = acc_t(0);
        weight_out[i] = acc_t(0);
        if (grad_sim) std::fill(grad_sim + i * M, grad_sim + (i + 1) * M, scalar_t(0));
        if (grad_sup) std::fill(grad_sup + i * C, grad_sup + (i + 1) * C, scalar_t(0));
        continue;
      }
      acc_t* class_exps = nullptr;
      acc_t* key_exps = nullptr;
      if constexpr (kReuseExponentials) {
        if (with_grad) {
          if constexpr (kSameType) {
            class_exps = grad_sup ? reinterpret_cast<acc_t*>(grad_sup + i * C) : nullptr;
            key_exps = reinterpret_cast<acc_t*>(grad_sim + i * M);
          } else {
            class_exps = exponential_row.data();
            key_exps = exponential_row.data() + C;
          }
        }
      }
      const auto stats = rows.statistics(i, tile.data(), class_exps, key_exps, tile_maxes.data());
      lse_out[i] = stats.lse;
      weight_out[i] = positive_weight;
      loss_out[i] = loss_scale * (stats.lse - stats.positive_sum / positive_weight);
      if (!with_grad) continue;
      if (key_exps) {
        rows.write_gradient_from_exponentials(i, stats.lse, positive_weight, grad_scale, tile_maxes.data(), class_exps,
                                              key_exps, grad_sup ? grad_sup + i * C : nullptr, grad_sim + i * M);
      } else {
        rows.write_gradient(i, stats.lse, positive_weight, grad_scale, grad_sup ? grad_sup + i * C : nullptr,
                            grad_sim + i * M, tile.data());
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const PacoArgs& args, const PacoLabels<at::opmath_type<scalar_t>>& labels,
                     const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& denominator,
                     at::Tensor& grad_similarity, at::Tensor& grad_sup_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = args.num_rows, C = args.num_classes, M = args.num_keys;
  const PacoRows<scalar_t> rows(args, labels);
  const acc_t* lse_in = row_stats.data_ptr<acc_t>();
  const acc_t* weight_in = lse_in + B;
  const bool per_row = args.reduction == Reduction::None;
  const at::Tensor grad_acc = grad_loss.to(args.accumulate_type).contiguous();
  const acc_t* grad_in = grad_acc.data_ptr<acc_t>();
  const at::Tensor denominator_acc = denominator.to(args.accumulate_type);
  const acc_t inv_denominator = acc_t(1) / *denominator_acc.data_ptr<acc_t>();
  const acc_t loss_scale = static_cast<acc_t>(args.loss_scale);
  scalar_t* grad_sim = grad_similarity.data_ptr<scalar_t>();
  scalar_t* grad_sup = C > 0 ? grad_sup_logits.data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, B, paco_rows_per_task(args), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(std::min<int64_t>(std::max(C, M), kTileClasses));
    for (int64_t i = begin; i < end; ++i) {
      const acc_t positive_weight = weight_in[i];
      if (!(positive_weight > acc_t(0))) {
        std::fill(grad_sim + i * M, grad_sim + (i + 1) * M, scalar_t(0));
        if (grad_sup) std::fill(grad_sup + i * C, grad_sup + (i + 1) * C, scalar_t(0));
        continue;
      }
      const acc_t scale = per_row ? grad_in[i] * loss_scale : (grad_in[0] * inv_denominator) * loss_scale;
      rows.write_gradient(i, lse_in[i], positive_weight, scale, grad_sup ? grad_sup + i * C : nullptr,
                          grad_sim + i * M, tile.data());
    }
  });
}

PacoForwardResult forward_cpu(const PacoArgs& args) {
  const auto acc_options = args.similarity.options().dtype(args.accumulate_type);
  at::Tensor row_loss = at::empty({args.num_rows}, acc_options);
  at::Tensor row_stats = at::empty({2, args.num_rows}, acc_options);
  at::Tensor denominator = at::empty({}, acc_options);
  // Two distinct empty tensors where there is no gradient: outputs must not alias each other.
  at::Tensor grad_similarity = args.with_grad ? at::empty_like(args.similarity, at::MemoryFormat::Contiguous)
                                              : at::empty({0}, args.similarity.options());
  at::Tensor grad_sup_logits = args.with_grad && args.num_classes > 0
                                   ? at::empty_like(args.sup_logits, at::MemoryFormat::Contiguous)
                                   : at::empty({0}, args.similarity.options());
  double total = 0.0, counted = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.similarity.scalar_type(), "ltfast_paco_forward_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const auto labels = code_labels<acc_t>(args);
                                    forward_kernel<scalar_t>(args, labels, row_loss, row_stats, grad_similarity,
                                                             grad_sup_logits);
                                    // Serially in float64: bit-identical run to run whatever the thread count.
                                    const acc_t* rows = row_loss.data_ptr<acc_t>();
                                    for (int64_t i = 0; i < args.num_rows; ++i) total += static_cast<double>(rows[i]);
                                    counted = static_cast<double>(labels.counted_rows);
                                  });
  const double denom = args.reduction == Reduction::Mean ? counted : 1.0;
  AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_paco_reduce", [&] {
    *denominator.data_ptr<scalar_t>() = static_cast<scalar_t>(denom);
  });
  if (args.reduction == Reduction::None) return {row_loss, row_stats, denominator, grad_similarity, grad_sup_logits};
  at::Tensor loss = at::empty({}, acc_options);
  AT_DISPATCH_FLOATING_TYPES(args.accumulate_type, "ltfast_paco_reduce", [&] {
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(total / denom);  // 'mean' of no counted row: 0 / 0 = NaN
  });
  return {loss, row_stats, denominator, grad_similarity, grad_sup_logits};
}

PacoBackwardResult backward_cpu(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                const at::Tensor& denominator) {
  at::Tensor grad_similarity = at::empty_like(args.similarity, at::MemoryFormat::Contiguous);
  at::Tensor grad_sup_logits = args.num_classes > 0 ? at::empty_like(args.sup_logits, at::MemoryFormat::Contiguous)
                                                    : at::empty({0}, args.similarity.options());
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.similarity.scalar_type(), "ltfast_paco_backward_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const auto labels = code_labels<acc_t>(args);
                                    backward_kernel<scalar_t>(args, labels, grad_loss, stats, denominator,
                                                              grad_similarity, grad_sup_logits);
                                  });
  return {grad_similarity, grad_sup_logits};
}

}  // namespace

PacoForwardResult paco_forward_cpu(const PacoArgs& args) { return forward_cpu(args); }

PacoBackwardResult paco_backward_cpu(const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                                     const at::Tensor& denominator) {
  return backward_cpu(args, grad_loss, row_stats, denominator);
}

}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_DEFAULT)
// Once, in the build without -m flags: the entry points that pick a capability's kernels, and the
// registrations (static initialisers, which must not hold AVX code).
LTFAST_CPU_DISPATCH(PacoForwardResult, paco_forward_cpu, (const PacoArgs& args), (args))
LTFAST_CPU_DISPATCH(PacoBackwardResult, paco_backward_cpu,
                    (const PacoArgs& args, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                     const at::Tensor& denominator),
                    (args, grad_loss, row_stats, denominator))

TORCH_LIBRARY_IMPL(ltfast, CPU, m) {
  m.impl("_paco_forward", &paco_forward_op<paco_forward_cpu>);
  m.impl("_paco_backward", &paco_backward_op<paco_backward_cpu>);
}
#endif  // CPU_CAPABILITY_DEFAULT

}  // namespace ltfast
