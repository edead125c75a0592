// Direct Python entry points of the public loss ops: ltfast._C.<op>(positional arguments) with the
// C-API's METH_FASTCALL convention, calling the op through a cached typed c10::Dispatcher handle.
//
// Why: the generic binding torch.ops.ltfast.<op>.default (OpOverload.__call__, then boxing the
// arguments against the schema and unboxing them again) cost ~3 us per call at 1 x 2, more than the
// kernel itself; eager torch functions use generated bindings that skip both. Going through the
// dispatcher (not calling a kernel directly) keeps everything the op does today: autograd, autocast,
// every backend, dispatch modes, functorch, the profiler.
//
// Each entry point takes every schema argument, positionally, in schema order, and handles only the
// plain case: every tensor argument exactly a torch.Tensor (or nn.Parameter, which has no
// __torch_function__ of its own), no TorchFunctionMode active, str/int/float arguments of exactly
// those Python types. Anything else returns NotImplemented, and the caller (ltfast/ops.py) takes
// torch.ops.ltfast.<op>.default, so __torch_function__ subclasses and modes, and argument type errors,
// behave exactly as before. The callers also skip these entry points under torch.compile, which cannot
// trace them. Errors raised by the op (argument checks in the kernels) are translated to Python
// exceptions by torch's HANDLE_TH_ERRORS, as torch.ops does, so they keep their type and message.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

#include "autograd/autograd_common.h"
#include "common/cpu_dispatch.h"
#include "common/torch_compat.h"

namespace ltfast {
namespace python_entry {
namespace {

using OptionalTensor = c10::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// No TorchFunctionMode on the stack and torch function not disabled or being skipped one hop: then a
// plain tensor argument cannot route the call anywhere but the dispatcher.
inline bool plain_torch_function_state() {
  return !at::impl::torch_function_mode_enabled() &&
         at::impl::PythonTorchFunctionTLS::get_disabled_state() == at::impl::TorchFunctionDisabledState::ENABLED &&
         !torch_compat::torch_function_skip_next_pending<at::impl::PythonTorchFunctionTLS>();
}

inline bool as_tensor(PyObject* obj, const at::Tensor** out) {
  if (!THPVariable_CheckExact(obj)) {
    return false;
  }
  *out = &THPVariable_Unpack(obj);
  return true;
}

inline bool as_optional_tensor(PyObject* obj, OptionalTensor* out) {
  if (obj == Py_None) {
    *out = c10::nullopt;
    return true;
  }
  if (!THPVariable_CheckExact(obj)) {
    return false;
  }
  *out = THPVariable_Unpack(obj);
  return true;
}

inline bool as_string(PyObject* obj, c10::string_view* out) {
  if (!PyUnicode_CheckExact(obj)) {
    return false;
  }
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (data == nullptr) {
    PyErr_Clear();
    return false;
  }
  *out = c10::string_view(data, static_cast<size_t>(size));
  return true;
}

inline bool as_int(PyObject* obj, int64_t* out) {
  if (!PyLong_CheckExact(obj)) {  // bool and int subclasses take the generic path
    return false;
  }
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  *out = static_cast<int64_t>(value);
  return true;
}

inline bool as_double(PyObject* obj, double* out) {
  if (PyFloat_CheckExact(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  int64_t value = 0;
  if (as_int(obj, &value)) {
    *out = static_cast<double>(value);
    return true;
  }
  return false;
}

// Runs the op with the GIL released (as torch.ops and torch's generated bindings do), wraps the result.
template <typename Call>
inline PyObject* run(Call&& call) {
  at::Tensor result;
  {
    pybind11::gil_scoped_release no_gil;
    result = call();
  }
  return THPVariable_Wrap(std::move(result));
}

#define LTFAST_FALLBACK() Py_RETURN_NOTIMPLEMENTED

// balanced_softmax(Tensor logits, Tensor target, Tensor log_prior, str reduction, int ignore_index)
PyObject* balanced_softmax(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::balanced_softmax");
  const at::Tensor *logits, *target, *log_prior;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 5 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_tensor(args[2], &log_prior) || !as_string(args[3], &reduction) || !as_int(args[4], &ignore_index) ||
      !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] { return op.call(*logits, *target, *log_prior, reduction, ignore_index); });
  END_HANDLE_TH_ERRORS
}

// adjusted_cross_entropy(Tensor logits, Tensor target, Tensor? adjustment, Tensor? target_margin,
//                        Tensor? weight, float gamma, float label_smoothing, str reduction, int ignore_index)
PyObject* adjusted_cross_entropy(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                               const OptionalTensor&, double, double, c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::adjusted_cross_entropy");
  const at::Tensor *logits, *target;
  OptionalTensor adjustment, target_margin, weight;
  double gamma, label_smoothing;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 9 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_optional_tensor(args[2], &adjustment) || !as_optional_tensor(args[3], &target_margin) ||
      !as_optional_tensor(args[4], &weight) || !as_double(args[5], &gamma) ||
      !as_double(args[6], &label_smoothing) || !as_string(args[7], &reduction) || !as_int(args[8], &ignore_index) ||
      !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] {
    return op.call(*logits, *target, adjustment, target_margin, weight, gamma, label_smoothing, reduction,
                   ignore_index);
  });
  END_HANDLE_TH_ERRORS
}

// softmax_equalization_loss(Tensor logits, Tensor target, Tensor tail_mask, Tensor seed, float gamma,
//                           str reduction, int ignore_index)
PyObject* softmax_equalization_loss(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                               c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::softmax_equalization_loss");
  const at::Tensor *logits, *target, *tail_mask, *seed;
  double gamma;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 7 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_tensor(args[2], &tail_mask) || !as_tensor(args[3], &seed) || !as_double(args[4], &gamma) ||
      !as_string(args[5], &reduction) || !as_int(args[6], &ignore_index) || !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] { return op.call(*logits, *target, *tail_mask, *seed, gamma, reduction, ignore_index); });
  END_HANDLE_TH_ERRORS
}

// equalization_loss(Tensor logits, Tensor target, Tensor tail_mask, str reduction, int ignore_index)
PyObject* equalization_loss(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::equalization_loss");
  const at::Tensor *logits, *target, *tail_mask;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 5 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_tensor(args[2], &tail_mask) || !as_string(args[3], &reduction) || !as_int(args[4], &ignore_index) ||
      !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] { return op.call(*logits, *target, *tail_mask, reduction, ignore_index); });
  END_HANDLE_TH_ERRORS
}

// lade(Tensor logits, Tensor target, Tensor log_prior, float alpha, float remine_lambda, int ignore_index)
PyObject* lade(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t);
  static const auto op = typed_op<Signature>("ltfast::lade");
  const at::Tensor *logits, *target, *log_prior;
  double alpha, remine_lambda;
  int64_t ignore_index;
  if (nargs != 6 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_tensor(args[2], &log_prior) || !as_double(args[3], &alpha) || !as_double(args[4], &remine_lambda) ||
      !as_int(args[5], &ignore_index) || !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] { return op.call(*logits, *target, *log_prior, alpha, remine_lambda, ignore_index); });
  END_HANDLE_TH_ERRORS
}

// lade_regularizer(Tensor logits, Tensor target, Tensor log_prior, float remine_lambda, int ignore_index)
PyObject* lade_regularizer(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t);
  static const auto op = typed_op<Signature>("ltfast::lade_regularizer");
  const at::Tensor *logits, *target, *log_prior;
  double remine_lambda;
  int64_t ignore_index;
  if (nargs != 5 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_tensor(args[2], &log_prior) || !as_double(args[3], &remine_lambda) || !as_int(args[4], &ignore_index) ||
      !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] { return op.call(*logits, *target, *log_prior, remine_lambda, ignore_index); });
  END_HANDLE_TH_ERRORS
}

// mixed_cross_entropy(Tensor logits, Tensor target, Tensor? target_b, Tensor? mix_weight, float mix,
//                     Tensor? adjustment, Tensor? target_margin, Tensor? weight, float gamma, float label_smoothing,
//                     Tensor? class_label_smoothing, str reduction, int ignore_index)
PyObject* mixed_cross_entropy(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                               double, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double,
                               double, const OptionalTensor&, c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::mixed_cross_entropy");
  const at::Tensor *logits, *target;
  OptionalTensor target_b, mix_weight, adjustment, target_margin, weight, class_label_smoothing;
  double mix, gamma, label_smoothing;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 13 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_optional_tensor(args[2], &target_b) || !as_optional_tensor(args[3], &mix_weight) ||
      !as_double(args[4], &mix) || !as_optional_tensor(args[5], &adjustment) ||
      !as_optional_tensor(args[6], &target_margin) || !as_optional_tensor(args[7], &weight) ||
      !as_double(args[8], &gamma) || !as_double(args[9], &label_smoothing) ||
      !as_optional_tensor(args[10], &class_label_smoothing) || !as_string(args[11], &reduction) ||
      !as_int(args[12], &ignore_index) || !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] {
    return op.call(*logits, *target, target_b, mix_weight, mix, adjustment, target_margin, weight, gamma,
                   label_smoothing, class_label_smoothing, reduction, ignore_index);
  });
  END_HANDLE_TH_ERRORS
}

// diverse_expert_loss(Tensor logits, Tensor target, Tensor adjustments, str reduction, int ignore_index)
PyObject* diverse_expert_loss(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::diverse_expert_loss");
  const at::Tensor *logits, *target, *adjustments;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 5 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_tensor(args[2], &adjustments) || !as_string(args[3], &reduction) || !as_int(args[4], &ignore_index) ||
      !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] { return op.call(*logits, *target, *adjustments, reduction, ignore_index); });
  END_HANDLE_TH_ERRORS
}

// ride_loss(Tensor logits, Tensor target, Tensor? target_margin, Tensor? weight, Tensor? temperature,
//           float base_temperature, float diversity_factor, int ignore_index)
PyObject* ride_loss(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                               const OptionalTensor&, double, double, int64_t);
  static const auto op = typed_op<Signature>("ltfast::ride_loss");
  const at::Tensor *logits, *target;
  OptionalTensor target_margin, weight, temperature;
  double base_temperature, diversity_factor;
  int64_t ignore_index;
  if (nargs != 8 || !as_tensor(args[0], &logits) || !as_tensor(args[1], &target) ||
      !as_optional_tensor(args[2], &target_margin) || !as_optional_tensor(args[3], &weight) ||
      !as_optional_tensor(args[4], &temperature) || !as_double(args[5], &base_temperature) ||
      !as_double(args[6], &diversity_factor) || !as_int(args[7], &ignore_index) || !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  return run([&] {
    return op.call(*logits, *target, target_margin, weight, temperature, base_temperature, diversity_factor,
                   ignore_index);
  });
  END_HANDLE_TH_ERRORS
}

// paco_loss(Tensor similarity, Tensor labels, Tensor key_labels, Tensor? sup_logits, Tensor? log_prior,
//           float temperature, float alpha, float beta, float gamma, float sup_temperature,
//           float? base_temperature, str reduction, int ignore_index)
PyObject* paco_loss(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                               const OptionalTensor&, double, double, double, double, double, c10::optional<double>,
                               c10::string_view, int64_t);
  static const auto op = typed_op<Signature>("ltfast::paco_loss");
  const at::Tensor *similarity, *labels, *key_labels;
  OptionalTensor sup_logits, log_prior;
  double temperature, alpha, beta, gamma, sup_temperature, base_value = 0.0;
  c10::optional<double> base_temperature;
  c10::string_view reduction;
  int64_t ignore_index;
  if (nargs != 13 || !as_tensor(args[0], &similarity) || !as_tensor(args[1], &labels) ||
      !as_tensor(args[2], &key_labels) || !as_optional_tensor(args[3], &sup_logits) ||
      !as_optional_tensor(args[4], &log_prior) || !as_double(args[5], &temperature) || !as_double(args[6], &alpha) ||
      !as_double(args[7], &beta) || !as_double(args[8], &gamma) || !as_double(args[9], &sup_temperature) ||
      !(args[10] == Py_None || as_double(args[10], &base_value)) || !as_string(args[11], &reduction) ||
      !as_int(args[12], &ignore_index) || !plain_torch_function_state()) {
    LTFAST_FALLBACK();
  }
  if (args[10] != Py_None) base_temperature = base_value;
  return run([&] {
    return op.call(*similarity, *labels, *key_labels, sup_logits, log_prior, temperature, alpha, beta, gamma,
                   sup_temperature, base_temperature, reduction, ignore_index);
  });
  END_HANDLE_TH_ERRORS
}

#undef LTFAST_FALLBACK

// ltfast.cpu_capability(): which build of the CPU kernels runs (csrc/common/cpu_dispatch.h).
PyObject* cpu_capability(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(cpu_kernel_capability_name());
}

// ltfast.set_forward_gradient(enabled): turns the forward-time gradient of the CPU kernels on or off
// (csrc/autograd/autograd_common.h) and returns the previous setting.
PyObject* set_forward_gradient(PyObject* /*self*/, PyObject* enabled) {
  if (!PyBool_Check(enabled)) {
    PyErr_Format(PyExc_TypeError, "ltfast.set_forward_gradient: enabled must be a bool, got %s",
                 Py_TYPE(enabled)->tp_name);
    return nullptr;
  }
  const bool previous = autograd::forward_gradient_switch().exchange(enabled == Py_True);
  return PyBool_FromLong(previous);
}

#define LTFAST_ENTRY(name, doc) \
  { #name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&name)), METH_FASTCALL, doc }

PyMethodDef methods[] = {
    LTFAST_ENTRY(balanced_softmax,
                 "balanced_softmax(logits, target, log_prior, reduction, ignore_index): "
                 "torch.ops.ltfast.balanced_softmax for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(adjusted_cross_entropy,
                 "adjusted_cross_entropy(logits, target, adjustment, target_margin, weight, gamma, "
                 "label_smoothing, reduction, ignore_index): torch.ops.ltfast.adjusted_cross_entropy for plain "
                 "tensors, else NotImplemented"),
    LTFAST_ENTRY(softmax_equalization_loss,
                 "softmax_equalization_loss(logits, target, tail_mask, seed, gamma, reduction, ignore_index): "
                 "torch.ops.ltfast.softmax_equalization_loss for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(equalization_loss,
                 "equalization_loss(logits, target, tail_mask, reduction, ignore_index): "
                 "torch.ops.ltfast.equalization_loss for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(lade,
                 "lade(logits, target, log_prior, alpha, remine_lambda, ignore_index): torch.ops.ltfast.lade "
                 "for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(lade_regularizer,
                 "lade_regularizer(logits, target, log_prior, remine_lambda, ignore_index): "
                 "torch.ops.ltfast.lade_regularizer for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(mixed_cross_entropy,
                 "mixed_cross_entropy(logits, target, target_b, mix_weight, mix, adjustment, target_margin, weight, "
                 "gamma, label_smoothing, class_label_smoothing, reduction, ignore_index): "
                 "torch.ops.ltfast.mixed_cross_entropy for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(diverse_expert_loss,
                 "diverse_expert_loss(logits, target, adjustments, reduction, ignore_index): "
                 "torch.ops.ltfast.diverse_expert_loss for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(ride_loss,
                 "ride_loss(logits, target, target_margin, weight, temperature, base_temperature, diversity_factor, "
                 "ignore_index): torch.ops.ltfast.ride_loss for plain tensors, else NotImplemented"),
    LTFAST_ENTRY(paco_loss,
                 "paco_loss(similarity, labels, key_labels, sup_logits, log_prior, temperature, alpha, beta, gamma, "
                 "sup_temperature, base_temperature, reduction, ignore_index): torch.ops.ltfast.paco_loss for plain "
                 "tensors, else NotImplemented"),
    {"cpu_capability", &cpu_capability, METH_NOARGS,
     "cpu_capability(): 'AVX512', 'AVX2' or 'DEFAULT', the instruction set of the CPU kernels that run "
     "(follows torch's, so ATEN_CPU_CAPABILITY=avx2 forces the AVX2 kernels)"},
    {"set_forward_gradient", &set_forward_gradient, METH_O,
     "set_forward_gradient(enabled): whether the CPU forward kernels also write the gradient where the logits "
     "require grad (one pass fewer per training step, the [N, C] gradient held from forward to backward); returns "
     "the previous setting"},
    {nullptr, nullptr, 0, nullptr}};

#undef LTFAST_ENTRY

}  // namespace

PyMethodDef* module_methods() { return methods; }

}  // namespace python_entry
}  // namespace ltfast
