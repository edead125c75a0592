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

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace autograd
}  // namespace ltfast
