// Shared pieces of the C++ autograd and autocast registrations (csrc/autograd/*_autograd.cpp).
//
// Why C++: the per-call host cost. Through Python's torch.library.register_autograd a 1 x 2
// forward+backward of ltfast.balanced_softmax_loss cost 91.6 us against 38.8 us for eager
// F.cross_entropy(z + log_prior, y) (issue 12 section 1); a torch::autograd::Function registered on
// the Autograd key of the private forward op (as torchvision registers its ops) keeps the whole call,
// dispatcher to kernel and back, in C++.
//
// Each family file registers:
// - Autograd kernels for the private forward ops `_<name>_forward`: a torch::autograd::Function whose
//   forward calls the op below autograd and saves the logits (already contiguous: the public
//   composites in csrc/ltfast.cpp make them so) and the per-row statistics, and whose backward calls
//   the private backward op `_<name>_backward` below autograd. The public ops stay
//   CompositeImplicitAutograd composites over the private ones, so torch.compile and opcheck see the
//   same graph as before, and the CUDA/SIMT backends keep registering kernels for the private ops
//   only.
// - AutocastCPU/AutocastCUDA kernels for the public ops: the private forward op runs on the original
//   bf16/fp16 logits (the kernels read them and accumulate in float32) and its float32 loss is
//   returned as it is, as F.cross_entropy returns float32 under autocast, without an upcast copy of
//   the [N, C] logits.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "common/torch_compat.h"

#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace ltfast {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline at::ScalarType accumulate_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// d loss / d adjustment_c = sum_i d loss / d z_ic, since a = z + adjustment.
inline at::Tensor column_sum(const at::Tensor& grad_logits, at::ScalarType out_dtype) {
  return grad_logits.sum(0, /*keepdim=*/false, accumulate_dtype(grad_logits)).to(out_dtype);
}

// d loss / d margin_c = -sum over the rows of class c of d loss / d z_{i,y_i}. Ignored rows have a
// zero gradient row, so they add nothing wherever they point (here: class 0). index_put_ with
// accumulate=true: on CUDA a sort-based kernel that adds each class's rows in a fixed order, so the
// result is the same run to run; index_add (atomics on CUDA) was not.
inline at::Tensor margin_grad(const at::Tensor& grad_logits, const at::Tensor& target, int64_t ignore_index,
                              at::ScalarType out_dtype) {
  const auto safe_target = target.masked_fill(target == ignore_index, 0);
  const auto acc = accumulate_dtype(grad_logits);
  const auto at_target = grad_logits.gather(1, safe_target.unsqueeze(1)).squeeze(1).to(acc);
  auto total = at::zeros({grad_logits.size(1)}, grad_logits.options().dtype(acc));
  total.index_put_({safe_target}, at_target, /*accumulate=*/true);
  return total.neg().to(out_dtype);
}

// The backward ops are first-order only. Under create_graph=True (grad mode on inside backward) the
// gradients returned here get an autograd::Error node as their history, whose edges lead to the
// differentiable inputs of the loss (the logits, the incoming gradient, the class vectors): a
// first-order gradient taken with create_graph=True still works, but differentiating it again with
// respect to anything it depends on raises this error instead of returning a second derivative that
// silently misses the loss's curvature (before, PyTorch only warned "autograd kernel was not
// registered" and treated the first-order gradient as a constant of the logits). The edges matter:
// an Error node hanging off detached aliases (what Python's @once_differentiable builds) is pruned by
// torch.autograd.grad(g, x) whenever g also reaches x another way, and the answer is silently wrong.
inline void refuse_double_backward(variable_list& grads, const char* op, const variable_list& differentiable) {
  if (!at::GradMode::is_enabled() || !torch::autograd::any_variable_requires_grad(differentiable)) {
    return;
  }
  const auto error = torch_compat::make_node<torch::autograd::Error>(
      std::string(op) +
          ": second-order gradients (create_graph=True followed by a backward through the gradient) are not "
          "supported: the backward kernel is first-order only. Use the plain-PyTorch ltfast.reference "
          "implementation of this loss where double backward is needed.",
      torch::autograd::collect_next_edges(differentiable));
  for (auto& grad : grads) {
    if (grad.defined()) {
      torch::autograd::set_history(grad, error);
    }
  }
}

// The typed handle of a registered operator.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ------------------------------------------------------------------ the forward-time gradient
// Where the logits need a gradient and the backend's forward kernel can write it (the CPU and CUDA
// kernels of the cross-entropy family, the CPU kernels of the multi-expert ops), the autograd kernel
// asks the forward op for it (with_grad=True): the kernel reads the logits once and writes the
// gradient for an upstream gradient of 1 while each row is still in L1, and the backward hands that
// tensor out instead of running the backward op, scaled in place when the upstream gradient is not 1.
// A training step is then one read of [N, C] and one write instead of two reads and one write.
//
// Cost: the [N, C] gradient (in the logits dtype) is allocated in the forward instead of the backward,
// so it is held from the forward to the backward (16 MB at 4096 x 1000 float32). In the usual step
// (loss.backward() right after the forward) the peak is unchanged: the backward op would allocate the
// same buffer at its start, while every activation is still alive. It is wasted where the logits
// require grad but no backward follows. ltfast.set_forward_gradient(enabled) sets it for the
// cross-entropy family (process-wide).
//
// The backward op still runs for create_graph=True (so that double backward is refused with an error
// naming the op), for a second backward through the graph (retain_graph=True: the gradient is handed
// out once, so the caller owns it and AccumulateGrad can take it without a copy), for a non-finite
// upstream gradient, and under torch.compile/FakeTensor (values cannot be read there).
//
// The cross-entropy family's switch starts off here and ltfast/_extension.py turns it on at import
// (FORWARD_GRADIENT_DEFAULT, next to ltfast.set_forward_gradient and its documentation). On the CPU
// the forward-time gradient reuses the exponentials of the statistics pass
// (RowGradient::write_from_exponentials): a float32 4096 x 1000 balanced_softmax step took 2.97 ms
// with it against 3.74 ms with the backward op (Zen 4, AVX512 kernels, 1 thread, minima of 60 steps).
// A first version that recomputed each exponential was slower (9.3 vs 4.2 ms on a busy machine): the
// exponentials, not the memory traffic, bound it there. The multi-expert kernels keep theirs on
// unconditionally (`wants_forward_grad(logits, requested)` without the switch).
inline std::atomic<bool>& forward_gradient_switch() {
  static std::atomic<bool> enabled{false};
  return enabled;
}

inline bool cross_entropy_forward_gradient_enabled() {
  return forward_gradient_switch().load(std::memory_order_relaxed);
}

// A real tensor with concrete sizes: not a FakeTensor or a functional wrapper (torch.compile,
// opcheck), whose values cannot be read and whose graph must not depend on them.
inline bool is_plain_tensor(const at::Tensor& t) {
  return t.defined() && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
         !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

inline bool is_plain_cpu_tensor(const at::Tensor& t) { return is_plain_tensor(t) && t.device().is_cpu(); }

// The backends whose forward kernels write the gradient. A backend adopts the forward-time gradient by
// returning it from its forward kernel (see with_forward_grad in cross_entropy.h) and being named
// here; its backward must then also read the upstream gradient where it lives (on a GPU: a scaling
// kernel that reads it on the device, no host synchronisation: ltfast::_scale_forward_grad_).
// `cuda`: the family's CUDA forward kernels write it too (the cross-entropy family).
inline bool backend_writes_forward_grad(const at::Tensor& logits, bool cuda) {
  return logits.device().is_cpu() || (cuda && logits.device().is_cuda());
}

// Whether the forward should also compute the gradient.
// `enabled`: the family's switch (the cross-entropy family: forward_gradient_switch()); `cuda`: see
// backend_writes_forward_grad.
inline bool wants_forward_grad(const at::Tensor& logits, bool requested, bool enabled = true, bool cuda = false) {
  return requested || (enabled && at::GradMode::is_enabled() && logits.requires_grad() &&
                       backend_writes_forward_grad(logits, cuda) && is_plain_tensor(logits));
}

// The cross-entropy family's choice (its CPU and CUDA forward kernels write the gradient).
inline bool cross_entropy_wants_forward_grad(const at::Tensor& logits, bool requested) {
  return wants_forward_grad(logits, requested, cross_entropy_forward_gradient_enabled(), /*cuda=*/true);
}

// The private forward op's grad_logits output as its caller sees it: the forward-time gradient only
// where the caller asked for it (with_grad=True), else empty, as without autograd: the op's outputs
// must not depend on whether autograd turned the gradient on (torch.compile traces it without).
inline at::Tensor requested_forward_grad(bool requested, const at::Tensor& grad_logits, const at::Tensor& logits) {
  return requested || grad_logits.numel() == 0 ? grad_logits : at::empty({0}, logits.options());
}

// Keeps the forward op's gradient in the context for the backward, when the kernel returned one.
inline void keep_forward_grad(AutogradContext* ctx, const at::Tensor& grad_logits) {
  if (is_plain_tensor(grad_logits) && grad_logits.numel() > 0) ctx->saved_data["forward_grad"] = grad_logits;
}

// Takes the forward-time gradient out of the context (once): undefined where there is none.
inline at::Tensor take_forward_grad(AutogradContext* ctx) {
  auto& data = ctx->saved_data;
  const auto it = data.find("forward_grad");
  if (it == data.end()) return at::Tensor();
  at::Tensor grad = it->second.toTensor();
  data.erase(it);
  return grad;
}

// Whether the forward-time gradient can stand for the backward op's result for `upstream`.
inline bool forward_grad_usable(const at::Tensor& forward_grad, const at::Tensor& logits, const at::Tensor& upstream) {
  return forward_grad.defined() && !at::GradMode::is_enabled() && is_plain_tensor(forward_grad) &&
         is_plain_tensor(upstream) && is_plain_tensor(logits) && forward_grad.numel() == logits.numel() &&
         forward_grad.numel() > 0 && upstream.device() == forward_grad.device();
}

// The multi-expert ops: the forward-time gradient when the upstream gradient is exactly 1 everywhere,
// else undefined (the backward op runs).
inline at::Tensor forward_grad_if_unit_upstream(AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& upstream) {
  at::Tensor grad = take_forward_grad(ctx);
  if (!forward_grad_usable(grad, logits, upstream)) return at::Tensor();
  const bool unit = upstream.numel() == 1 ? upstream.item<double>() == 1.0 : upstream.eq(1).all().item<bool>();
  return unit ? grad : at::Tensor();
}

// The cross-entropy family: the forward-time gradient for the upstream gradient `upstream` (a scalar
// for a reduced loss, [N] for reduction 'none'), or undefined where the backward op must run. An
// upstream gradient of exactly 1 (loss.backward() on the loss itself) returns the tensor as it is:
// bit-identical to the backward op. Any other finite one scales it in place (per row for [N]), one
// pass with no exponentials instead of the backward op's: equal to it within rounding (the backward
// op folds the upstream gradient into the per-row coefficients before the product, this multiplies
// after it; and an ignored row of a negative upstream gradient gets -0 rather than 0). Reading a CPU
// scalar costs nothing; a non-finite upstream gradient takes the backward op (0 * inf).
//
// On a GPU the upstream gradient is not read on the host (that would synchronise every step):
// ltfast::_scale_forward_grad_ reads it on the device and returns at once where it is exactly 1,
// else scales in place. A non-finite factor is applied too, where the CPU path runs the backward op:
// elements that are exactly 0 stay 0 (ignored rows, SEQL's drops: as the backward op writes them),
// the others become inf or NaN, though not entry for entry as the backward op's (where a probability
// underflowed to 0 that op gives 0 * inf = NaN, this 0).
inline at::Tensor forward_grad_for_upstream(AutogradContext* ctx, const at::Tensor& logits,
                                            const at::Tensor& upstream) {
  at::Tensor grad = take_forward_grad(ctx);
  if (!forward_grad_usable(grad, logits, upstream)) return at::Tensor();
  if (!upstream.device().is_cpu()) {
    const bool per_row = upstream.dim() == 1 && upstream.size(0) == grad.size(0) && grad.size(0) != 1;
    if (!per_row && upstream.numel() != 1) return at::Tensor();
    static const auto scale_op =
        typed_op<void(at::Tensor&, const at::Tensor&)>("ltfast::_scale_forward_grad_");
    at::AutoDispatchBelowADInplaceOrView guard;
    scale_op.call(grad, per_row ? upstream : upstream.reshape({}));
    return grad;
  }
  if (upstream.numel() == 1) {
    const double g = upstream.item<double>();
    if (g == 1.0) return grad;
    if (!std::isfinite(g)) return at::Tensor();
    at::AutoDispatchBelowADInplaceOrView guard;
    return grad.mul_(upstream.reshape({}));
  }
  if (upstream.dim() != 1 || upstream.size(0) != grad.size(0)) return at::Tensor();
  if (upstream.eq(1).all().item<bool>()) return grad;
  if (!upstream.isfinite().all().item<bool>()) return at::Tensor();
  at::AutoDispatchBelowADInplaceOrView guard;
  std::vector<int64_t> row_shape(grad.dim(), 1);
  row_shape[0] = grad.size(0);
  return grad.mul_(upstream.reshape(row_shape));
}

// ------------------------------------------------------------------ autocast
// The AutocastCPU/AutocastCUDA kernel of a public loss op, from `float_loss`: the op's private forward
// op called on the original logits (made contiguous, as the composites in csrc/ltfast.cpp make them),
// returning its float32 loss as it is. Below autocast (the key excluded), so nothing casts the
// bf16/fp16 logits: the kernels read them and accumulate in float32. Registered as
//   m.impl("balanced_softmax", TORCH_FN(Autocast<balanced_softmax_float_loss>::call<c10::DispatchKey::AutocastCPU>));
template <auto float_loss>
struct Autocast;

template <typename... Args, at::Tensor (*float_loss)(Args...)>
struct Autocast<float_loss> {
  template <c10::DispatchKey Key>
  static at::Tensor call(Args... args) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    return float_loss(args...);
  }
};

}  // namespace autograd
}  // namespace ltfast
