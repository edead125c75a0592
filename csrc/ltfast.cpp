// Every ltfast op schema lives here, in one TORCH_LIBRARY block; each backend file
// (csrc/ops/<family>/<family>_{cpu,cuda}.*) registers its own kernels, csrc/autograd/ the autograd
// kernels of the private forward ops and the autocast kernels of the public ops, and ltfast/_meta.py
// the fake (meta) kernels.
//
// Each public loss op is a thin composite over a private forward op that also returns the per-row
// statistics backward needs (autograd can only save what an op returns), and a private backward op.
// The composites pass logits.contiguous() to the private forward op: the kernels need contiguous
// rows, and autograd then saves that copy, so a non-contiguous input is copied once per step rather
// than once in forward and again in backward (contiguous() of a contiguous tensor is free).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace ltfast {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// The cross-entropy family's private forward ops also return grad_logits (cross_entropy.h); the
// composites pass with_grad=false and the autograd kernel turns it on (csrc/autograd/).
using CrossEntropyForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// float32 logits (the common case) skip the dispatcher round trip of a no-op .to().
at::Tensor in_logits_dtype(const at::Tensor& loss, const at::Tensor& logits) {
  return loss.scalar_type() == logits.scalar_type() ? loss : loss.to(logits.scalar_type());
}

at::Tensor balanced_softmax(const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& log_prior, c10::string_view reduction,
                            int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_balanced_softmax_forward", "")
          .typed<CrossEntropyForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            c10::string_view, int64_t, bool)>();
  const auto loss =
      std::get<0>(forward.call(logits.contiguous(), target, log_prior, reduction, ignore_index, false));
  // The kernels return the loss in the float32 accumulation dtype; like F.cross_entropy, the
  // public op returns it in the logits dtype (the autocast kernels in csrc/autograd/ keep float32).
  return in_logits_dtype(loss, logits);
}

at::Tensor adjusted_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& adjustment,
                                  const c10::optional<at::Tensor>& target_margin,
                                  const c10::optional<at::Tensor>& weight, double gamma,
                                  double label_smoothing, c10::string_view reduction,
                                  int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_adjusted_cross_entropy_forward", "")
          .typed<CrossEntropyForwardOutputs(const at::Tensor&, const at::Tensor&,
                                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                            const c10::optional<at::Tensor>&, double, double, c10::string_view,
                                            int64_t, bool)>();
  const auto loss = std::get<0>(forward.call(logits.contiguous(), target, adjustment, target_margin, weight, gamma,
                                             label_smoothing, reduction, ignore_index, false));
  return in_logits_dtype(loss, logits);
}

at::Tensor softmax_equalization_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tail_mask,
                                     const at::Tensor& seed, double gamma, c10::string_view reduction,
                                     int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_softmax_equalization_loss_forward", "")
          .typed<CrossEntropyForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, double, c10::string_view, int64_t, bool)>();
  const auto loss = std::get<0>(
      forward.call(logits.contiguous(), target, tail_mask, seed, gamma, reduction, ignore_index, false));
  return in_logits_dtype(loss, logits);
}

at::Tensor equalization_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tail_mask,
                             c10::string_view reduction, int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_equalization_loss_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    c10::string_view, int64_t)>();
  return in_logits_dtype(std::get<0>(forward.call(logits.contiguous(), target, tail_mask, reduction, ignore_index)),
                         logits);
}

using LadeForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor lade_composite(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior,
                          double ce_weight, double alpha, double remine_lambda, int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_lade_forward", "")
          .typed<LadeForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                    double, int64_t)>();
  const auto loss =
      std::get<0>(forward.call(logits.contiguous(), target, log_prior, ce_weight, alpha, remine_lambda, ignore_index));
  return in_logits_dtype(loss, logits);
}

at::Tensor lade(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior, double alpha,
                double remine_lambda, int64_t ignore_index) {
  return lade_composite(logits, target, log_prior, 1.0, alpha, remine_lambda, ignore_index);
}

at::Tensor lade_regularizer(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& log_prior,
                            double remine_lambda, int64_t ignore_index) {
  return lade_composite(logits, target, log_prior, 0.0, 1.0, remine_lambda, ignore_index);
}

// Soft targets (csrc/ops/soft_targets/): mixed (mixup) targets with per-class smoothing, and
// probability targets.
at::Tensor mixed_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                               const c10::optional<at::Tensor>& target_b, const c10::optional<at::Tensor>& mix_weight,
                               double mix, const c10::optional<at::Tensor>& adjustment,
                               const c10::optional<at::Tensor>& target_margin, const c10::optional<at::Tensor>& weight,
                               double gamma, double label_smoothing,
                               const c10::optional<at::Tensor>& class_label_smoothing, c10::string_view reduction,
                               int64_t ignore_index) {
  using Optional = c10::optional<at::Tensor>;
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_mixed_cross_entropy_forward", "")
          .typed<ForwardOutputs(const at::Tensor&, const at::Tensor&, const Optional&, const Optional&, double,
                                const Optional&, const Optional&, const Optional&, double, double, const Optional&,
                                c10::string_view, int64_t)>();
  const auto loss = std::get<0>(forward.call(logits.contiguous(), target, target_b, mix_weight, mix, adjustment,
                                             target_margin, weight, gamma, label_smoothing, class_label_smoothing,
                                             reduction, ignore_index));
  return in_logits_dtype(loss, logits);
}

at::Tensor probability_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& adjustment,
                                     const c10::optional<at::Tensor>& weight, double label_smoothing,
                                     c10::string_view reduction) {
  using Optional = c10::optional<at::Tensor>;
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("ltfast::_probability_cross_entropy_forward", "")
                                  .typed<ForwardOutputs(const at::Tensor&, const at::Tensor&, const Optional&,
                                                        const Optional&, double, c10::string_view)>();
  const auto loss =
      std::get<0>(forward.call(logits.contiguous(), target, adjustment, weight, label_smoothing, reduction));
  return in_logits_dtype(loss, logits);
}

using MultiExpertForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor diverse_expert_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& adjustments,
                               c10::string_view reduction, int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_diverse_expert_loss_forward", "")
          .typed<MultiExpertForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                           int64_t, bool)>();
  // with_grad: the autograd kernel turns it on where the logits need a gradient (csrc/autograd/).
  return in_logits_dtype(
      std::get<0>(forward.call(logits.contiguous(), target, adjustments, reduction, ignore_index, false)), logits);
}

at::Tensor ride_loss(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& target_margin,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& temperature,
                     double base_temperature, double diversity_factor, int64_t ignore_index) {
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_ride_loss_forward", "")
          .typed<MultiExpertForwardOutputs(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double,
                                           double, int64_t, bool)>();
  return in_logits_dtype(std::get<0>(forward.call(logits.contiguous(), target, target_margin, weight, temperature,
                                                  base_temperature, diversity_factor, ignore_index, false)),
                         logits);
}

// PaCo's parametric contrastive loss (csrc/ops/paco/paco.h). base_temperature None: T_base = T.
using PacoForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor paco_loss(const at::Tensor& similarity, const at::Tensor& labels, const at::Tensor& key_labels,
                     const c10::optional<at::Tensor>& sup_logits, const c10::optional<at::Tensor>& log_prior,
                     double temperature, double alpha, double beta, double gamma, double sup_temperature,
                     c10::optional<double> base_temperature, c10::string_view reduction, int64_t ignore_index) {
  using Optional = c10::optional<at::Tensor>;
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ltfast::_paco_forward", "")
          .typed<PacoForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Optional&,
                                    const Optional&, double, double, double, double, double, double,
                                    c10::string_view, int64_t, bool)>();
  // The kernels need contiguous rows; autograd then saves these copies (see the top of this file).
  const Optional sup = sup_logits.has_value() && sup_logits->defined() ? Optional(sup_logits->contiguous())
                                                                       : Optional();
  const auto loss = std::get<0>(forward.call(similarity.contiguous(), labels, key_labels, sup, log_prior,
                                             temperature, alpha, beta, gamma, sup_temperature,
                                             base_temperature.value_or(temperature), reduction, ignore_index,
                                             false));
  return in_logits_dtype(loss, similarity);
}

}  // namespace

TORCH_LIBRARY(ltfast, m) {
  // Balanced Softmax (Ren et al. 2020; "PriorCE"/LADE-CE in the survey): F.cross_entropy on
  // logits + log_prior.
  m.def("balanced_softmax(Tensor logits, Tensor target, Tensor log_prior, str reduction=\"mean\", "
        "int ignore_index=-100) -> Tensor",
        &balanced_softmax);
  // with_grad (the CE family and the multi-expert ops): the forward also returns grad_logits, the
  // gradient for an upstream gradient of 1 (cross_entropy.h): the CE family's CPU and CUDA kernels,
  // the multi-expert CPU kernels; the other backends an empty tensor.
  m.def("_balanced_softmax_forward(Tensor logits, Tensor target, Tensor log_prior, str reduction, "
        "int ignore_index, bool with_grad=False) -> (Tensor loss, Tensor row_stats, Tensor denominator, "
        "Tensor grad_logits)");
  m.def("_balanced_softmax_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor log_prior, "
        "Tensor row_stats, Tensor denominator, str reduction, int ignore_index) -> Tensor");
  // The forward-time gradient (grad_logits of a with_grad forward) times the upstream gradient, in
  // place: a scalar or one factor per row, read where it lives (on a GPU: on the device, returning at
  // once when it is 1). The CE family's autograd calls it on CUDA (autograd_common.h).
  m.def("_scale_forward_grad_(Tensor(a!) grad, Tensor upstream) -> ()");

  // The cross-entropy family: CE on logits + adjustment - target_margin[y] * onehot(y), per-class
  // weights with PyTorch's weighted mean, focal factor (1 - p_y)^gamma, label smoothing.
  m.def("adjusted_cross_entropy(Tensor logits, Tensor target, Tensor? adjustment=None, "
        "Tensor? target_margin=None, Tensor? weight=None, float gamma=0.0, float label_smoothing=0.0, "
        "str reduction=\"mean\", int ignore_index=-100) -> Tensor",
        &adjusted_cross_entropy);
  m.def("_adjusted_cross_entropy_forward(Tensor logits, Tensor target, Tensor? adjustment, "
        "Tensor? target_margin, Tensor? weight, float gamma, float label_smoothing, str reduction, "
        "int ignore_index, bool with_grad=False) -> (Tensor loss, Tensor row_stats, Tensor denominator, "
        "Tensor grad_logits)");
  m.def("_adjusted_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
        "Tensor? adjustment, Tensor? target_margin, Tensor? weight, Tensor row_stats, "
        "Tensor denominator, float gamma, float label_smoothing, str reduction, int ignore_index) "
        "-> Tensor");

  // SEQL (Tan et al. 2021, "ESQL" in the survey): cross-entropy where each tail-class negative logit
  // is dropped from the softmax with probability gamma, per element, from a counter-based hash of
  // `seed` (int64 [2]) and the element's position; backward regenerates the same decisions.
  m.def("softmax_equalization_loss(Tensor logits, Tensor target, Tensor tail_mask, Tensor seed, float gamma=0.9, "
        "str reduction=\"mean\", int ignore_index=-100) -> Tensor",
        &softmax_equalization_loss);
  m.def("_softmax_equalization_loss_forward(Tensor logits, Tensor target, Tensor tail_mask, Tensor seed, "
        "float gamma, str reduction, int ignore_index, bool with_grad=False) -> (Tensor loss, Tensor row_stats, "
        "Tensor denominator, Tensor grad_logits)");
  m.def("_softmax_equalization_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor tail_mask, "
        "Tensor seed, Tensor row_stats, Tensor denominator, float gamma, str reduction, int ignore_index) -> Tensor");

  // EQL (Tan et al. 2020), sigmoid form: sum_c w_ic BCE(z_ic, y_ic), w = 0 for tail-class negatives.
  m.def("equalization_loss(Tensor logits, Tensor target, Tensor tail_mask, str reduction=\"mean\", "
        "int ignore_index=-100) -> Tensor",
        &equalization_loss);
  m.def("_equalization_loss_forward(Tensor logits, Tensor target, Tensor tail_mask, str reduction, "
        "int ignore_index) -> (Tensor loss, Tensor denominator)");
  m.def("_equalization_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor tail_mask, "
        "Tensor denominator, str reduction, int ignore_index) -> Tensor");

  // LADE (Hong et al. 2021) as in the survey's code: PriorCE (mean) + alpha * LADER, and LADER alone.
  // LADER = -sum_c pi_c (F_c - S_c - lambda S_c^2), a column-wise log-mean-exp over the batch.
  m.def("lade(Tensor logits, Tensor target, Tensor log_prior, float alpha=0.1, float remine_lambda=0.1, "
        "int ignore_index=-100) -> Tensor",
        &lade);
  m.def("lade_regularizer(Tensor logits, Tensor target, Tensor log_prior, float remine_lambda=0.1, "
        "int ignore_index=-100) -> Tensor",
        &lade_regularizer);
  m.def("_lade_forward(Tensor logits, Tensor target, Tensor log_prior, float ce_weight, float alpha, "
        "float remine_lambda, int ignore_index) -> (Tensor loss, Tensor row_stats, Tensor column_stats, "
        "Tensor num_valid)");
  m.def("_lade_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor log_prior, Tensor row_stats, "
        "Tensor column_stats, Tensor num_valid, float ce_weight, int ignore_index) -> Tensor");

  // Mixed targets (mixup/CutMix) and per-class label smoothing: lambda * CE(a, target) +
  // (1 - lambda) * CE(a, target_b), one softmax per row, each term reduced like F.cross_entropy (its
  // own weighted-mean denominator). lambda = mix_weight ([N] or 0-dim) if given, else `mix`. Without
  // target_b: one hard target with class_label_smoothing[y] as the row's smoothing.
  m.def("mixed_cross_entropy(Tensor logits, Tensor target, Tensor? target_b=None, Tensor? mix_weight=None, "
        "float mix=1.0, Tensor? adjustment=None, Tensor? target_margin=None, Tensor? weight=None, float gamma=0.0, "
        "float label_smoothing=0.0, Tensor? class_label_smoothing=None, str reduction=\"mean\", "
        "int ignore_index=-100) -> Tensor",
        &mixed_cross_entropy);
  m.def("_mixed_cross_entropy_forward(Tensor logits, Tensor target, Tensor? target_b, Tensor? mix_weight, "
        "float mix, Tensor? adjustment, Tensor? target_margin, Tensor? weight, float gamma, float label_smoothing, "
        "Tensor? class_label_smoothing, str reduction, int ignore_index) "
        "-> (Tensor loss, Tensor row_stats, Tensor denominator)");
  m.def("_mixed_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? target_b, "
        "Tensor? mix_weight, float mix, Tensor? adjustment, Tensor? target_margin, Tensor? weight, "
        "Tensor row_stats, Tensor denominator, float gamma, float label_smoothing, Tensor? class_label_smoothing, "
        "str reduction, int ignore_index) -> Tensor");
  // Probability targets [N, C] as F.cross_entropy takes them: -sum_c w_c q_c log p_c with
  // q = (1 - eps) target + eps / C, 'mean' over N. row_stats [3, N] (max, log-sum offset, sum_c w_c q_c).
  m.def("probability_cross_entropy(Tensor logits, Tensor target, Tensor? adjustment=None, Tensor? weight=None, "
        "float label_smoothing=0.0, str reduction=\"mean\") -> Tensor",
        &probability_cross_entropy);
  m.def("_probability_cross_entropy_forward(Tensor logits, Tensor target, Tensor? adjustment, Tensor? weight, "
        "float label_smoothing, str reduction) -> (Tensor loss, Tensor row_stats, Tensor denominator)");
  m.def("_probability_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? adjustment, "
        "Tensor? weight, Tensor row_stats, Tensor denominator, float label_smoothing, str reduction) -> Tensor");
  // Multi-expert losses of the survey's Ensemble-codebase on expert logits [N, E, C]
  // (csrc/ops/multi_expert/multi_expert.h). SADE: sum_e CE(z_e + adjustments_e, y). RIDE: per expert,
  // LDAM-DRW CE plus diversity_factor * Tbar^2 * KL(pbar || softmax(z_k / T)) (batchmean), 'mean' only.
  m.def("diverse_expert_loss(Tensor logits, Tensor target, Tensor adjustments, str reduction=\"mean\", "
        "int ignore_index=-100) -> Tensor",
        &diverse_expert_loss);
  // with_grad: the CPU kernels also return the gradient for an upstream gradient of 1 (multi_expert.h).
  m.def("_diverse_expert_loss_forward(Tensor logits, Tensor target, Tensor adjustments, str reduction, "
        "int ignore_index, bool with_grad=False) -> (Tensor loss, Tensor row_stats, Tensor denominator, "
        "Tensor grad_logits)");
  m.def("_diverse_expert_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor adjustments, "
        "Tensor row_stats, Tensor denominator, str reduction, int ignore_index) -> Tensor");
  m.def("ride_loss(Tensor logits, Tensor target, Tensor? target_margin=None, Tensor? weight=None, "
        "Tensor? temperature=None, float base_temperature=1.0, float diversity_factor=-0.2, "
        "int ignore_index=-100) -> Tensor",
        &ride_loss);
  m.def("_ride_loss_forward(Tensor logits, Tensor target, Tensor? target_margin, Tensor? weight, "
        "Tensor? temperature, float base_temperature, float diversity_factor, int ignore_index, "
        "bool with_grad=False) -> (Tensor loss, Tensor row_stats, Tensor denominators, Tensor grad_logits)");
  m.def("_ride_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? target_margin, "
        "Tensor? weight, Tensor? temperature, Tensor row_stats, Tensor denominators, float base_temperature, "
        "float diversity_factor, int ignore_index) -> Tensor");

  // PaCo (Cui et al. 2021; csrc/ops/paco/paco.h): multi-positive contrastive loss on the row
  // [(sup_logits + log_prior) / sup_temperature, similarity / temperature], positives from the labels
  // (beta on the class column, alpha on the keys of the same label, self excluded), gamma on the key
  // columns of the denominator, scaled by temperature / base_temperature. SupCon: sup_logits None.
  m.def("paco_loss(Tensor similarity, Tensor labels, Tensor key_labels, Tensor? sup_logits=None, "
        "Tensor? log_prior=None, float temperature=0.07, float alpha=0.05, float beta=1.0, float gamma=1.0, "
        "float sup_temperature=1.0, float? base_temperature=None, str reduction=\"mean\", "
        "int ignore_index=-100) -> Tensor",
        &paco_loss);
  // with_grad: the forward also returns both gradients for an upstream gradient of 1 (paco.h).
  m.def("_paco_forward(Tensor similarity, Tensor labels, Tensor key_labels, Tensor? sup_logits, "
        "Tensor? log_prior, float temperature, float alpha, float beta, float gamma, float sup_temperature, "
        "float base_temperature, str reduction, int ignore_index, bool with_grad=False) -> (Tensor loss, "
        "Tensor row_stats, Tensor denominator, Tensor grad_similarity, Tensor grad_sup_logits)");
  m.def("_paco_backward(Tensor grad_loss, Tensor similarity, Tensor labels, Tensor key_labels, "
        "Tensor? sup_logits, Tensor? log_prior, Tensor row_stats, Tensor denominator, float temperature, "
        "float alpha, float beta, float gamma, float sup_temperature, float base_temperature, str reduction, "
        "int ignore_index) -> (Tensor grad_similarity, Tensor grad_sup_logits)");

  // Sampler index draws (ltfast/data/samplers.py): positions [start, start + count) of epoch
  // `epoch` (epoch_length positions over all ranks), each a pure function of (seed, epoch,
  // position). Classes in CSR form: members[class_offsets[k]:class_offsets[k + 1]] is class k.
  // class_aware_sample: the survey's ClassAwareSampler (class cycles, num_samples_cls per visit).
  // class_weighted_sample: class by inverse CDF, then a uniform member (square-root, progressive).
  m.def("class_aware_sample(Tensor class_offsets, Tensor members, int seed, int epoch, int start, int count, "
        "int num_samples_cls, int epoch_length) -> Tensor");
  m.def("class_weighted_sample(Tensor class_cdf, Tensor class_offsets, Tensor members, int seed, int epoch, "
        "int start, int count, int epoch_length) -> Tensor");
}

}  // namespace ltfast

namespace ltfast {
namespace python_entry {
PyMethodDef* module_methods();  // csrc/python_entry.cpp
}  // namespace python_entry
}  // namespace ltfast

// `import ltfast._C` loads this library, which runs the registrations above; the module holds the
// direct entry points of the public loss ops (csrc/python_entry.cpp), which ltfast/ops.py calls
// instead of torch.ops.ltfast.<op>.default when that is safe.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          ltfast::python_entry::module_methods()};
  return PyModule_Create(&module_def);
}
