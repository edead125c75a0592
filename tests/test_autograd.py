"""Autograd and autocast registered in C++ (csrc/autograd/), issue 12 section 1: second-order
gradients refused with an error naming the op, gradients of the class vectors, autocast, and the
ltfast.nn modules' per-call work (no tensor op besides the loss op)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ltfast
import ltfast.nn
from conftest import RecordOps, device_params

IGNORE = -100
C = 5


def _inputs(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, C, generator=gen) * 2).to(device=device, dtype=dtype)
    target = torch.tensor([0, 1, 2, IGNORE, 4, 1], device=device)
    prior = torch.randn(C, generator=gen).to(device=device, dtype=torch.float64 if dtype == torch.float64 else
                                             torch.float32)
    tail = torch.tensor([False, False, True, True, True], device=device)
    seed = torch.tensor([3, 4], device=device)
    return logits, target, prior, tail, seed


# name in the error message -> loss of (logits, target, prior, tail, seed)
LOSSES = {
    "ltfast.balanced_softmax": lambda x, y, p, t, s: ltfast.balanced_softmax_loss(x, y, p),
    "ltfast.adjusted_cross_entropy": lambda x, y, p, t, s: ltfast.adjusted_cross_entropy(
        x, y, p, p.abs(), p.abs() + 0.5, label_smoothing=0.1),
    "ltfast.adjusted_cross_entropy focal": lambda x, y, p, t, s: ltfast.adjusted_cross_entropy(x, y, gamma=2.0),
    "ltfast.softmax_equalization_loss": lambda x, y, p, t, s: ltfast.softmax_equalization_loss(x, y, t, 0.5, seed=s),
    "ltfast.equalization_loss": lambda x, y, p, t, s: ltfast.equalization_loss(x, y, t),
    "ltfast.lade": lambda x, y, p, t, s: ltfast.lade_loss(x, y, p),
    "ltfast.lade regularizer": lambda x, y, p, t, s: ltfast.lade_regularizer(x, y, p),
}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(LOSSES))
def test_second_order_gradients_raise_naming_the_op(name, device):
    # Before (Python register_autograd), create_graph=True gave a first-order gradient that was a
    # constant of the logits (PyTorch only warned), so a second derivative silently missed the loss's
    # curvature: here grad(g.sum(), x) returned 6 x (3 x^2 term) only, without an error.
    logits, target, prior, tail, seed = _inputs(device, torch.float64)
    loss_of = LOSSES[name]
    op = name.split(" ")[0]
    x = logits.clone().requires_grad_()
    (first,) = torch.autograd.grad(loss_of(x, target, prior, tail, seed), x)
    # A first-order gradient taken with create_graph=True is still right...
    loss = loss_of(x, target, prior, tail, seed) + (x ** 3).sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    torch.testing.assert_close(g.detach(), first + 3 * x.detach() ** 2)
    # ...but differentiating it again raises instead of dropping the loss's Hessian.
    with pytest.raises(RuntimeError, match=rf"{op}: second-order gradients \(create_graph=True"):
        torch.autograd.grad(g.sum(), x)
    with pytest.raises(RuntimeError, match=rf"{op}: second-order gradients"):
        (g2,) = torch.autograd.grad(loss_of(x, target, prior, tail, seed), x, create_graph=True)
        g2.pow(2).sum().backward()


@pytest.mark.parametrize("device", device_params())
def test_second_order_through_class_vectors_raises(device):
    logits, target, prior, _, _ = _inputs(device, torch.float64)
    prior = prior.clone().requires_grad_()
    margin = prior.detach().abs().requires_grad_()
    loss = ltfast.adjusted_cross_entropy(logits, target, prior, margin)
    g_prior, g_margin = torch.autograd.grad(loss, (prior, margin), create_graph=True)
    for g in (g_prior, g_margin):
        with pytest.raises(RuntimeError, match=r"ltfast.adjusted_cross_entropy: second-order gradients"):
            torch.autograd.grad(g.sum(), (prior, margin), allow_unused=True)


@pytest.mark.parametrize("device", device_params())
def test_autograd_is_a_cpp_node(device):
    """The graph node is the C++ torch::autograd::Function (csrc/autograd/), not a Python one."""
    logits, target, prior, tail, seed = _inputs(device)
    x = logits.clone().requires_grad_()
    nodes = {
        "BalancedSoftmaxFunction": ltfast.balanced_softmax_loss(x, target, prior),
        "AdjustedCrossEntropyFunction": ltfast.adjusted_cross_entropy(x, target, prior),
        "SoftmaxEqualizationFunction": ltfast.softmax_equalization_loss(x, target, tail, seed=seed),
        "EqualizationFunction": ltfast.equalization_loss(x, target, tail),
        "LadeFunction": ltfast.lade_loss(x, target, prior),
    }
    for name, loss in nodes.items():
        assert name in loss.grad_fn.name(), loss.grad_fn.name()
    for op in ("_balanced_softmax_forward", "_adjusted_cross_entropy_forward", "_softmax_equalization_loss_forward",
               "_equalization_loss_forward", "_lade_forward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ltfast::{op}", "Autograd"), op


def test_lade_log_prior_gradient_is_refused():
    logits, target, prior, _, _ = _inputs("cpu")
    with pytest.raises(RuntimeError, match=r"ltfast.lade: the gradient with respect to `log_prior` is not implemented"):
        ltfast.lade_loss(logits.requires_grad_(), target, prior.requires_grad_())
    with torch.no_grad():  # no graph, no gradient asked for: allowed, as before
        ltfast.lade_loss(logits, target, prior)


@pytest.mark.parametrize("name", ["balanced_softmax", "adjusted_cross_entropy", "softmax_equalization_loss",
                                  "equalization_loss", "lade", "lade_regularizer"])
def test_cpu_autocast_every_op_returns_float32_without_upcasting_logits(name):
    logits, target, prior, tail, seed = _inputs("cpu")
    calls = {
        "balanced_softmax": lambda x: torch.ops.ltfast.balanced_softmax(x, target, prior),
        "adjusted_cross_entropy": lambda x: torch.ops.ltfast.adjusted_cross_entropy(x, target, prior, None, None, 0.0,
                                                                                   0.1),
        "softmax_equalization_loss": lambda x: torch.ops.ltfast.softmax_equalization_loss(x, target, tail, seed, 0.5),
        "equalization_loss": lambda x: torch.ops.ltfast.equalization_loss(x, target, tail),
        "lade": lambda x: torch.ops.ltfast.lade(x, target, prior),
        "lade_regularizer": lambda x: torch.ops.ltfast.lade_regularizer(x, target, prior),
    }
    x = logits.bfloat16().requires_grad_()

    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps() as recorded:
        loss = calls[name](x)
    assert loss.dtype == torch.float32
    assert not [n for n in recorded.names if "copy" in n or n.endswith(".to")], recorded.names
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == torch.bfloat16
    # The same value as the float32 op on the same bf16 values (the kernels accumulate in float32).
    torch.testing.assert_close(loss, calls[name](x.detach().float()).float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ ltfast.nn per-call work
COUNTS = [500, 120, 40, 9, 2]


def _modules():
    ldam = ltfast.nn.LDAMLoss(COUNTS, drw_epoch=0)
    return {
        "BalancedSoftmaxLoss": ltfast.nn.BalancedSoftmaxLoss(COUNTS),
        "BalancedSoftmaxLoss smoothing": ltfast.nn.BalancedSoftmaxLoss(COUNTS, label_smoothing=0.1),
        "LogitAdjustedLoss": ltfast.nn.LogitAdjustedLoss(COUNTS, tau=1.5),
        "WeightedCrossEntropyLoss": ltfast.nn.WeightedCrossEntropyLoss(COUNTS),
        "LDAMLoss": ldam,
        "FocalLoss": ltfast.nn.FocalLoss(2.0, weight=torch.rand(C, dtype=torch.float64) + 0.5),
        "LADELoss": ltfast.nn.LADELoss(COUNTS),
    }



@pytest.mark.parametrize("name", list(_modules()))
def test_module_forward_runs_only_the_loss_op(name):
    """After the first call, a module's forward dispatches the loss op and nothing else: the float32
    copies of its float64 buffers are cached (issue 12: the per-call .to() was host overhead)."""
    module = _modules()[name]
    logits, target, _, _, _ = _inputs("cpu")
    module(logits, target)
    with RecordOps() as recorded:
        module(logits, target)
    assert recorded.names and all(n.startswith("ltfast.") for n in recorded.names), recorded.names


@pytest.mark.parametrize("name", list(_modules()))
def test_module_buffers_in_the_accumulation_dtype(name):
    """float64 logits see the exact float64 buffers, float32 and bf16 logits their float32 values,
    and the cached copies follow load_state_dict, in-place updates and .to()."""
    module = _modules()[name]
    logits, target, _, _, _ = _inputs("cpu")
    buffers = {k: v for k, v in module.named_buffers()}

    def seen(x):
        """The class vectors the loss op receives for logits x."""
        got = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "ltfast":
                    got.extend(a for a in list(args) + list((kwargs or {}).values())
                               if torch.is_tensor(a) and a.dim() == 1 and a.is_floating_point())
                return func(*args, **(kwargs or {}))

        with Record():
            module(x, target)
        return got

    for x in (logits.double(), logits, logits.bfloat16(), logits):
        vectors = seen(x)
        assert vectors
        want_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        assert all(v.dtype == want_dtype for v in vectors), [v.dtype for v in vectors]
        if want_dtype == torch.float64:
            used = [b for b in buffers.values() if any(v is b for v in vectors)]
            assert len(used) == len(vectors)  # the buffers themselves, no copy
        else:
            assert all(any(torch.equal(v, b.float()) for b in buffers.values()) for v in vectors)

    # load_state_dict copies into the buffers in place: the float32 copies must follow.
    state = {k: (v * 0.5 + 0.25 if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in module.state_dict().items()}
    before = module(logits, target)
    module.load_state_dict(state)
    for v in seen(logits):
        assert any(torch.equal(v, b.float()) for b in buffers.values())
    after = module(logits, target)
    assert not torch.equal(before, after)
    # The module moved: .to(device)/.cuda() replace the buffer objects through _apply.
    module._apply(lambda t: t * 2 if t.is_floating_point() else t)
    for v in seen(logits):
        assert any(torch.equal(v, b.float()) for b in dict(module.named_buffers()).values())


def test_module_float64_matches_cross_entropy_exactly():
    logits, target, _, _, _ = _inputs("cpu", torch.float64)
    module = ltfast.nn.BalancedSoftmaxLoss(COUNTS)
    x = logits.clone().requires_grad_()
    want = F.cross_entropy(logits + module.log_prior, target)
    torch.testing.assert_close(module(x, target), want, rtol=1e-14, atol=1e-14)
