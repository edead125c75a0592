"""ltfast.paco_loss (torch.ops.ltfast.paco_loss, PaCo's parametric contrastive loss) against the
plain-PyTorch reference ltfast.reference.paco_loss (itself checked against a transcription of the
original PaCoLoss.forward in tests/test_compat.py): values and the gradients of similarity and
sup_logits over odd shapes, dtypes, reductions, ignore_index and the weights; opcheck, gradcheck,
torch.compile, autocast and the argument errors."""
import os

import pytest
import torch

import ltfast
from ltfast import reference
from conftest import RecordOps, device_params, expect_kernel_assert, is_simt
from test_cross_entropy import DTYPES, TOL

IGNORE = -100
# The simt variants run once the emulator has the op's CUDA kernels (csrc/simt/paco_simt.cpp, written
# with the CUDA backend).
HAS_SIMT_KERNEL = os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                              "csrc", "simt", "paco_simt.cpp"))


def paco_devices():
    params = []
    for param in device_params():
        if param.id == "simt":
            param = pytest.param(*param.values, id="simt", marks=[
                *param.marks, pytest.mark.skipif(not HAS_SIMT_KERNEL, reason="no emulated PaCo kernel yet")])
        params.append(param)
    return params


# (B, C, K): M = 2B + K keys (PaCo's [q, k, queue]); C = 0 is SupCon (no sup_logits). One anchor; one
# class; the CUDA helper's thread-group sizes; and, on the CPU, rows longer than one 2048-column tile in
# both segments.
SHAPES = [(1, 0, 0), (1, 5, 40), (3, 1, 0), (3, 100, 257), (7, 5, 0), (7, 0, 257), (33, 100, 40), (33, 0, 0),
          (33, 1, 257), (5, 2100, 2500)]
SHAPE_IDS = [f"B{b}-C{c}-K{k}" for b, c, k in SHAPES]


def make_inputs(batch, classes, queue, dtype, device, seed=0, num_labels=None, ignored=(), ignored_keys=(),
                normalized=True):
    """similarity = q @ [q, k, queue].T of unit features (the self column is then each row's max, as in
    PaCo), labels with repeats so that most rows have key positives, and sup_logits [B, C]."""
    gen = torch.Generator().manual_seed(seed)
    num_labels = num_labels or classes or 4
    dim = 16
    q = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    k = q + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    keys = torch.cat([q, k, torch.randn(queue, dim, generator=gen, dtype=torch.float64)])
    if normalized:
        q, keys = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(keys, dim=1)
        similarity = q @ keys.T
    else:
        similarity = torch.randn(batch, keys.shape[0], generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, num_labels, (batch,), generator=gen)
    if classes == 0:  # SupCon: any int64 labels, not class indices
        labels = labels * 1_000_003 - 7
    queue_labels = labels[torch.randint(0, batch, (queue,), generator=gen)] if queue else labels[:0]
    queue_labels = torch.where(torch.rand(queue, generator=gen) < 0.5, queue_labels,
                               torch.randint(0, num_labels, (queue,), generator=gen) * (1_000_003 if classes == 0 else 1))
    for row in ignored:
        if row < batch:
            labels[row] = IGNORE
    key_labels = torch.cat([labels, labels, queue_labels])
    for column in ignored_keys:
        if column < key_labels.numel():
            key_labels[column] = IGNORE
    sup_logits = (torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2) if classes else None

    def cast(t):
        return t.to(dtype).to(device)
    return (cast(similarity), labels.to(device), key_labels.to(device),
            cast(sup_logits) if sup_logits is not None else None, gen)


def run_both(similarity, labels, key_labels, sup_logits, upstream_scale=1.0, **options):
    """Loss and gradients of the fused op on the inputs and of the reference on their float64 copies."""
    x = similarity.detach().requires_grad_()
    s = sup_logits.detach().requires_grad_() if sup_logits is not None else None
    loss = ltfast.paco_loss(x, labels, key_labels, s, **options)
    assert loss.dtype == similarity.dtype
    x64 = similarity.detach().double().requires_grad_()
    s64 = sup_logits.detach().double().requires_grad_() if sup_logits is not None else None
    options64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    expected = reference.paco_loss(x64, labels, key_labels, s64, **options64)
    if loss.dim() == 0:
        upstream = torch.tensor(upstream_scale, dtype=torch.float64)
    else:
        upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64) * upstream_scale
    inputs, inputs64 = [x], [x64]
    if s is not None:
        inputs.append(s)
        inputs64.append(s64)
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype).to(loss.device))
    expected_grads = torch.autograd.grad(expected, inputs64, upstream, allow_unused=True)
    expected_grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(expected_grads, inputs64)]
    return loss, grads, expected, expected_grads


def assert_matches(loss, grads, expected, expected_grads, dtype):
    tol = TOL[dtype]
    expected = expected.detach()
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale,
                               equal_nan=True)
    for grad, expected_grad in zip(grads, expected_grads):
        grad_scale = expected_grad.abs().max().item() if expected_grad.numel() else 1.0
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=tol["rtol"],
                                   atol=tol["atol"] + tol["rtol"] * (grad_scale or 1.0))


# ---------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("device", paco_devices())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(shape, dtype, reduction, device):
    batch, classes, queue = shape
    similarity, labels, key_labels, sup_logits, _ = make_inputs(batch, classes, queue, dtype, device,
                                                                ignored=(2, 5), ignored_keys=(2 * batch,))
    loss, grads, expected, expected_grads = run_both(similarity, labels, key_labels, sup_logits,
                                                     temperature=0.07, alpha=0.05, reduction=reduction)
    assert loss.shape == ((batch,) if reduction == "none" else ())
    assert_matches(loss, grads, expected, expected_grads, dtype)
    if batch > 5:  # ignored anchors: 0, not counted, no gradient
        if reduction == "none":
            assert loss[2] == 0 and loss[5] == 0
        assert (grads[0][2] == 0).all() and (grads[0][5] == 0).all()


# alpha / beta / gamma, temperatures, the log prior: each against the reference.
VARIANTS = {
    "paco": dict(temperature=0.07, alpha=0.05, beta=1.0, gamma=1.0),
    "gamma0": dict(temperature=0.2, alpha=0.5, gamma=0.0),
    "beta0": dict(temperature=0.2, alpha=1.0, beta=0.0),
    "alpha0": dict(temperature=0.1, alpha=0.0, beta=2.0, gamma=0.5),
    "supcon": dict(temperature=0.1, alpha=1.0, beta=0.0, gamma=1.0),
    "temperatures": dict(temperature=0.3, sup_temperature=0.5, base_temperature=0.7, alpha=0.3, gamma=2.0),
    "log_prior": dict(temperature=0.07, alpha=0.05, log_prior=True),
}


@pytest.mark.parametrize("device", paco_devices())
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
# log_prior needs sup_logits: no (0, "log_prior") case (a skip inside a simt test fails it: conftest
# requires every simt test to run an emulated kernel).
@pytest.mark.parametrize("classes, variant", [(c, v) for c in (0, 10) for v in VARIANTS
                                              if not (c == 0 and v == "log_prior")])
def test_options_match_reference(classes, variant, dtype, reduction, device):
    options = dict(VARIANTS[variant])
    if options.pop("log_prior", False):
        counts = torch.arange(1, classes + 1, dtype=torch.float64) ** 2
        options["log_prior"] = torch.log(counts / counts.sum() + 1e-9).float().to(device)
    similarity, labels, key_labels, sup_logits, _ = make_inputs(9, classes, 31, dtype, device, seed=3, ignored=(4,),
                                                                normalized=variant != "temperatures")
    loss, grads, expected, expected_grads = run_both(similarity, labels, key_labels, sup_logits, reduction=reduction,
                                                     **options)
    assert_matches(loss, grads, expected, expected_grads, dtype)


@pytest.mark.parametrize("device", paco_devices())
def test_rows_without_positives(device):
    """beta = 0 (or no classes) and an anchor whose label no other key has: the original's 0 / 0 row is
    0 and not counted here; every row without a positive gives NaN for 'mean', as the reference."""
    similarity, labels, key_labels, sup_logits, _ = make_inputs(4, 6, 5, torch.float32, device, seed=1)
    labels = torch.tensor([0, 1, 1, 2], device=device)
    key_labels = torch.cat([labels, torch.tensor([3, 1, 1, 3, 4, 4, 4, 4, 4], device=device)])  # M = 2B + K = 13
    for options in (dict(sup_logits=sup_logits, beta=0.0), dict(sup_logits=None)):
        loss, grads, expected, expected_grads = run_both(similarity, labels, key_labels, options["sup_logits"],
                                                         reduction="none", beta=options.get("beta", 1.0),
                                                         alpha=0.5)
        assert_matches(loss, grads, expected, expected_grads, torch.float32)
        assert loss[0] == 0 and loss[3] == 0 and loss[1] > 0 and (grads[0][0] == 0).all()
        mean = ltfast.paco_loss(similarity, labels, key_labels, options["sup_logits"], beta=options.get("beta", 1.0),
                                alpha=0.5)
        torch.testing.assert_close(mean, loss.sum() / 2)
    none_counted = ltfast.paco_loss(similarity, torch.tensor([0, 5, 6, 7], device=device), key_labels, None)
    assert torch.isnan(none_counted)
    torch.testing.assert_close(ltfast.paco_loss(similarity, torch.full((4,), IGNORE, device=device), key_labels,
                                                sup_logits, reduction="sum"), torch.zeros((), device=device))


@pytest.mark.parametrize("device", paco_devices())
@pytest.mark.parametrize("forward_gradient", [True, False], ids=["forward_grad", "backward_op"])
def test_upstream_gradients(forward_gradient, device):
    """Both gradient paths (the forward-time gradient, scaled for the upstream gradient, and the backward
    op) for upstream gradients other than 1, and only sup_logits or only similarity requiring grad."""
    previous = ltfast.set_forward_gradient(forward_gradient)
    try:
        similarity, labels, key_labels, sup_logits, _ = make_inputs(6, 7, 20, torch.float32, device, ignored=(1,))
        for reduction, scale in (("mean", 2.5), ("sum", -0.5), ("none", 3.0)):
            loss, grads, expected, expected_grads = run_both(similarity, labels, key_labels, sup_logits,
                                                             upstream_scale=scale, reduction=reduction)
            assert_matches(loss, grads, expected, expected_grads, torch.float32)
        s = sup_logits.clone().requires_grad_()
        ltfast.paco_loss(similarity, labels, key_labels, s).backward()
        x = similarity.clone().requires_grad_()
        ltfast.paco_loss(x, labels, key_labels, sup_logits).backward()
        _, (grad_x, grad_s), _, _ = run_both(similarity, labels, key_labels, sup_logits)
        torch.testing.assert_close(s.grad, grad_s)
        torch.testing.assert_close(x.grad, grad_x)
    finally:
        ltfast.set_forward_gradient(previous)


def test_forward_time_gradient_equals_backward_op():
    """The CPU forward's with_grad gradients (from the statistics pass's exponentials) against the backward
    op's (recomputed): equal within float32 rounding; float64 bit-identical (gradcheck's reentrancy)."""
    for dtype, exact in ((torch.float32, False), (torch.float64, True), (torch.bfloat16, False)):
        similarity, labels, key_labels, sup_logits, _ = make_inputs(7, 100, 2500, dtype, "cpu", ignored=(3,))
        args = (similarity, labels, key_labels, sup_logits, None, 0.07, 0.05, 1.0, 1.0, 1.0, 0.07, "mean", IGNORE)
        loss, stats, denominator, grad_x, grad_s = torch.ops.ltfast._paco_forward(*args, True)
        plain = torch.ops.ltfast._paco_forward(*args, False)
        assert plain[3].numel() == 0 and plain[4].numel() == 0
        torch.testing.assert_close(plain[0], loss, rtol=0, atol=0)
        back_x, back_s = torch.ops.ltfast._paco_backward(torch.ones((), dtype=stats.dtype), similarity, labels,
                                                         key_labels, sup_logits, None, stats, denominator,
                                                         *args[5:])
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])
        torch.testing.assert_close(grad_x, back_x, **tol)
        torch.testing.assert_close(grad_s, back_s, **tol)


# ---------------------------------------------------------------------------- autograd, compile
@pytest.mark.parametrize("device", paco_devices())
def test_gradcheck_float64(device):
    for classes, queue in ((5, 6), (0, 3)):
        similarity, labels, key_labels, sup_logits, _ = make_inputs(4, classes, queue, torch.float64, device,
                                                                    ignored=(2,), normalized=False)
        log_prior = torch.randn(classes, dtype=torch.float64, device=device) if classes else None
        for reduction in ("mean", "none"):
            if classes:
                def fn(x, s):
                    return ltfast.paco_loss(x, labels, key_labels, s, log_prior, temperature=0.5, alpha=0.3,
                                            gamma=0.7, sup_temperature=2.0, reduction=reduction)
                inputs = (similarity.clone().requires_grad_(), sup_logits.clone().requires_grad_())
            else:
                def fn(x):
                    return ltfast.paco_loss(x, labels, key_labels, None, temperature=0.5, alpha=1.0,
                                            reduction=reduction)
                inputs = (similarity.clone().requires_grad_(),)
            # nondet_tol: gradcheck's reentrancy check runs backward twice; the first hands out the forward-time
            # gradient (CPU), scaled per row for 'none', the second runs the backward op: equal up to rounding.
            assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, nondet_tol=1e-12)


@pytest.mark.parametrize("device", paco_devices())
def test_opcheck(device):
    similarity, labels, key_labels, sup_logits, _ = make_inputs(6, 7, 9, torch.float32, device, ignored=(4,))
    log_prior = torch.randn(7, device=device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = similarity.to(dtype).requires_grad_()
        s = sup_logits.to(dtype).requires_grad_()
        for reduction in ("mean", "none"):
            torch.library.opcheck(torch.ops.ltfast.paco_loss,
                                  (x, labels, key_labels, s, log_prior, 0.1, 0.05, 1.0, 1.0, 1.0, None, reduction,
                                   IGNORE))
        torch.library.opcheck(torch.ops.ltfast.paco_loss, (x, labels, key_labels),
                              dict(alpha=1.0, reduction="sum"))
        args = (x.detach(), labels, key_labels, s.detach(), log_prior, 0.1, 0.05, 1.0, 1.0, 1.0, 0.2, "mean", IGNORE)
        for with_grad in (False, True):
            torch.library.opcheck(torch.ops.ltfast._paco_forward, (*args, with_grad))
        _, stats, denominator, _, _ = torch.ops.ltfast._paco_forward(*args)
        grad = torch.ones((), dtype=stats.dtype, device=device)
        torch.library.opcheck(torch.ops.ltfast._paco_backward, (grad, *args[:5], stats, denominator, *args[5:]))


@pytest.mark.parametrize("device", paco_devices())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(x, s, labels, key_labels):
        return ltfast.paco_loss(x, labels, key_labels, s, temperature=0.07, alpha=0.05) + \
            ltfast.paco_loss(x, labels, key_labels, None, alpha=1.0, reduction="sum")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        similarity, labels, key_labels, sup_logits, _ = make_inputs(8, 5, 16, torch.float32, device, seed=seed,
                                                                    ignored=(3,))
        x1, x2 = similarity.clone().requires_grad_(), similarity.clone().requires_grad_()
        s1, s2 = sup_logits.clone().requires_grad_(), sup_logits.clone().requires_grad_()
        got, want = compiled(x1, s1, labels, key_labels), step(x2, s2, labels, key_labels)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(s1.grad, s2.grad)


def test_double_backward_raises_naming_the_op():
    similarity, labels, key_labels, sup_logits, _ = make_inputs(4, 5, 6, torch.float64, "cpu")
    x = similarity.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ltfast.paco_loss(x, labels, key_labels, sup_logits), x, create_graph=True)
    with pytest.raises(RuntimeError, match="ltfast.paco_loss: second-order gradients"):
        grad.sum().backward()
    # Through sup_logits too, and with a first-order gradient that is still right under create_graph.
    s = sup_logits.clone().requires_grad_()
    (first,) = torch.autograd.grad(ltfast.paco_loss(x, labels, key_labels, s), s)
    (g,) = torch.autograd.grad(ltfast.paco_loss(x, labels, key_labels, s) + (s ** 3).sum(), s, create_graph=True)
    torch.testing.assert_close(g.detach(), first + 3 * s.detach() ** 2)
    with pytest.raises(RuntimeError, match="ltfast.paco_loss: second-order gradients"):
        torch.autograd.grad(g.sum(), s)


def test_autocast_returns_float32_without_upcasting():
    similarity, labels, key_labels, sup_logits, _ = make_inputs(6, 7, 20, torch.bfloat16, "cpu")
    x, s = similarity.clone().requires_grad_(), sup_logits.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordOps() as recorded:
        loss = ltfast.paco_loss(x, labels, key_labels, s)
    assert not [n for n in recorded.names if "copy" in n or n.endswith(".to")], recorded.names
    assert "PacoFunction" in loss.grad_fn.name()  # the C++ autograd node (csrc/autograd/paco_autograd.cpp)
    grads = torch.autograd.grad(loss, (x, s))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ltfast.paco_loss(similarity, labels, key_labels, sup_logits.float())  # dtypes differ: float32
    assert loss.dtype == torch.float32 and mixed.dtype == torch.float32
    expected = reference.paco_loss(similarity.double(), labels, key_labels, sup_logits.double())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.double(), expected, rtol=1e-5, atol=1e-6)


def test_log_prior_requiring_grad_is_refused():
    similarity, labels, key_labels, sup_logits, _ = make_inputs(4, 5, 6, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="log_prior"):
        ltfast.paco_loss(similarity, labels, key_labels, sup_logits, torch.zeros(5, requires_grad=True))


# ---------------------------------------------------------------------------- bad input
def _bad_inputs():
    similarity, labels, key_labels, sup_logits, _ = make_inputs(4, 5, 6, torch.float32, "cpu")
    good = dict(similarity=similarity, labels=labels, key_labels=key_labels, sup_logits=sup_logits)
    return good, [
        (dict(similarity=similarity[0]), ValueError, "similarity must be a 2-D tensor"),
        (dict(similarity=similarity.long()), TypeError, "similarity must be float32"),
        (dict(similarity=similarity[:, :3], key_labels=key_labels[:3]), ValueError, r"similarity \[B, M\] must .*M >= B"),
        (dict(labels=labels[:3]), ValueError, "labels must have B = 4"),
        (dict(labels=labels.float()), TypeError, "labels must be an int64"),
        (dict(key_labels=key_labels[:-1]), ValueError, "key_labels must have M = 14"),
        (dict(key_labels=key_labels[None]), ValueError, "key_labels must be a 1-D"),
        (dict(sup_logits=sup_logits[:3]), ValueError, r"sup_logits must be a 2-D tensor \[B = 4"),
        (dict(sup_logits=sup_logits.double()), TypeError, "sup_logits must have the same dtype as similarity"),
        (dict(sup_logits=sup_logits[:, :0]), ValueError, "sup_logits must have at least one class"),
        (dict(log_prior=torch.zeros(4)), ValueError, "log_prior must be a 1-D tensor of C = 5"),
        (dict(sup_logits=None, log_prior=torch.zeros(5)), ValueError, "log_prior is added to sup_logits"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(sup_temperature=-1.0), ValueError, "sup_temperature must be a finite number > 0"),
        (dict(base_temperature=float("inf")), ValueError, "base_temperature must be a finite number > 0"),
        (dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
        (dict(beta=float("inf")), ValueError, "beta must be a finite number >= 0"),
        (dict(gamma=-1.0), ValueError, "gamma must be a finite number >= 0"),
        (dict(reduction="avg"), ValueError, "reduction must be 'none', 'mean' or 'sum'"),
    ]


def test_argument_errors_name_the_argument():
    good, cases = _bad_inputs()
    for change, error, message in cases:
        kwargs = {**good, **change}
        with pytest.raises(error, match=f"ltfast.paco_loss: {message}"):
            ltfast.paco_loss(**kwargs)
        # The fake kernels (torch.compile, meta tensors) name the same argument.
        meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        argument = message.split(" ")[0]
        with pytest.raises(Exception, match=f"ltfast.paco_loss: {argument}"):
            ltfast.paco_loss(**meta)


def test_device_mismatch_names_the_argument():
    good, _ = _bad_inputs()
    with pytest.raises(RuntimeError, match="ltfast.paco_loss: key_labels must be on the same device as similarity"):
        ltfast.paco_loss(**{**good, "key_labels": good["key_labels"].to("meta")})


@pytest.mark.device_assert
@pytest.mark.parametrize("device", paco_devices())
def test_label_out_of_range(device):
    similarity, labels, key_labels, sup_logits, _ = make_inputs(4, 5, 6, torch.float32, device)
    labels = labels.clone()
    labels[2] = 5
    with expect_kernel_assert(device, IndexError, r"labels\[2\] = 5 is out of range: expected a class index in \[0, C = 5\)"):
        ltfast.paco_loss(similarity, labels, key_labels, sup_logits)
    if not is_simt(device) and not str(device).startswith("cuda"):
        # Without classes any int64 label is fine (SupCon), and key labels are never range-checked.
        ltfast.paco_loss(similarity, labels * 10**12, key_labels * 10**12 + 3, None)
        ltfast.paco_loss(similarity, labels.clamp(max=4), key_labels * 10**12, sup_logits)


def test_fallback_without_extension_matches(monkeypatch):
    from ltfast import _extension
    similarity, labels, key_labels, sup_logits, _ = make_inputs(5, 4, 7, torch.float32, "cpu")
    fused = ltfast.paco_loss(similarity, labels, key_labels, sup_logits)
    monkeypatch.setattr(_extension, "AVAILABLE", False)
    monkeypatch.setattr(_extension, "warn_fallback_once", lambda: None)
    torch.testing.assert_close(ltfast.paco_loss(similarity, labels, key_labels, sup_logits), fused)


def test_fast_path_taken_in_eager_and_declined_under_a_mode(monkeypatch):
    """ltfast.paco_loss calls ltfast._C.paco_loss (csrc/python_entry.cpp) with plain tensors and takes
    torch.ops under a TorchFunctionMode; both give the same loss and gradients."""
    from torch.overrides import TorchFunctionMode

    from ltfast import _dispatch
    calls = []
    inner = _dispatch.fast

    class Recorder:
        def __getattr__(self, name):
            def call(*args):
                out = getattr(inner, name)(*args)
                calls.append((name, out is not NotImplemented))
                return out
            return call

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(_dispatch, "fast", Recorder())
    similarity, labels, key_labels, sup_logits, _ = make_inputs(5, 4, 7, torch.float32, "cpu", ignored=(1,))
    results = []
    for mode in (None, PassThrough()):
        x, s = similarity.clone().requires_grad_(), sup_logits.clone().requires_grad_()
        if mode is None:
            loss = ltfast.paco_loss(x, labels, key_labels, s, base_temperature=0.2, reduction="none")
        else:
            with mode:
                loss = ltfast.paco_loss(x, labels, key_labels, s, base_temperature=0.2, reduction="none")
        loss.sum().backward()
        results.append((loss.detach(), x.grad, s.grad))
    assert calls == [("paco_loss", True), ("paco_loss", False)]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
