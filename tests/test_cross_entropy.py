"""The fused cross-entropy family against ltfast.reference: values, gradients, dtypes, reductions,
ignore_index, non-finite logits, opcheck, gradcheck, torch.compile, determinism and bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import ltfast
from ltfast import reference
from conftest import RecordOps, device_params, expect_kernel_assert, is_simt

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 2), (7, 10), (129, 1000), (3, 8142)]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100

# Forward/backward tolerances against a float64 reference on the same (rounded) inputs. Low
# precision: the op reads the same bf16/fp16 values and accumulates in fp32, so the error is the
# final rounding of the loss/gradient to the logits dtype.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
}

# name -> builder(C, gen) giving the keyword arguments of ltfast.adjusted_cross_entropy (or the
# balanced softmax op for "balanced_softmax").
def _counts(C, gen):
    return torch.randint(1, 1000, (C,), generator=gen).double()


VARIANTS = {
    "balanced_softmax": lambda C, g: dict(log_prior=ltfast.priors.log_prior(_counts(C, g))),
    "cross_entropy": lambda C, g: dict(),
    "logit_adjusted": lambda C, g: dict(adjustment=1.5 * ltfast.priors.log_prior(_counts(C, g))),
    "ldam": lambda C, g: dict(target_margin=30 * ltfast.priors.ldam_margins(_counts(C, g)) / 10),
    "ldam_drw": lambda C, g: dict(target_margin=3 * ltfast.priors.ldam_margins(_counts(C, g)),
                                  weight=ltfast.priors.effective_number_weights(_counts(C, g))),
    "weighted": lambda C, g: dict(weight=ltfast.priors.survey_class_weights(_counts(C, g))),
    "focal": lambda C, g: dict(gamma=2.0),
    "focal_weighted_adjusted": lambda C, g: dict(gamma=0.5, weight=torch.rand(C, generator=g) + 0.5,
                                                 adjustment=torch.randn(C, generator=g)),
    "label_smoothing": lambda C, g: dict(label_smoothing=0.1),
    "smoothing_weighted_adjusted": lambda C, g: dict(label_smoothing=0.2, weight=torch.rand(C, generator=g) + 0.5,
                                                     adjustment=torch.randn(C, generator=g),
                                                     target_margin=torch.rand(C, generator=g)),
}


def run_op(variant, logits, target, kwargs, reduction="mean", ignore_index=IGNORE):
    if variant == "balanced_softmax":
        return ltfast.balanced_softmax_loss(logits, target, kwargs["log_prior"], reduction, ignore_index)
    return ltfast.adjusted_cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index, **kwargs)


def run_reference(variant, logits, target, kwargs, reduction="mean", ignore_index=IGNORE):
    if variant == "balanced_softmax":
        return reference.balanced_softmax(logits, target, kwargs["log_prior"], reduction, ignore_index)
    return reference.adjusted_cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index, **kwargs)


def make_inputs(shape, dtype, device, seed=0, ignored_rows=(), scale=3.0, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)
    N, C = shape
    if non_contiguous:  # a transposed view: column-major [N, C]
        logits = (torch.randn(C, N, generator=gen) * scale).to(dtype).to(device).t()
    else:
        logits = (torch.randn(N, C, generator=gen) * scale).to(dtype).to(device)
    target = torch.randint(0, C, (N,), generator=gen)
    for row in ignored_rows:
        if row < N:
            target[row] = IGNORE
    return logits, target.to(device), gen


def to_device(kwargs, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}


def check_against_reference(variant, shape, dtype, reduction, device, ignored_rows=(1, 4), non_contiguous=False,
                            scale=3.0):
    logits, target, gen = make_inputs(shape, dtype, device, ignored_rows=ignored_rows, non_contiguous=non_contiguous,
                                      scale=scale)
    kwargs = to_device(VARIANTS[variant](shape[1], gen), device)
    logits = logits.detach().requires_grad_()
    loss = run_op(variant, logits, target, kwargs, reduction)
    assert loss.dtype == dtype
    expected_shape = (shape[0],) if reduction == "none" else ()
    assert loss.shape == expected_shape

    logits64 = logits.detach().double().requires_grad_()
    kwargs64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    expected = run_reference(variant, logits64, target, kwargs64, reduction)

    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out.to(loss.dtype))
    (expected_grad,) = torch.autograd.grad(expected, logits64, grad_out)
    assert grad.dtype == dtype and grad.shape == logits.shape
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    # Gradients: absolute tolerance relative to the gradient's scale (mean divides by N).
    grad_scale = expected_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * grad_scale)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, shape, dtype, reduction, device):
    check_against_reference(variant, shape, dtype, reduction, device)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_non_contiguous_logits(variant, dtype, device):
    check_against_reference(variant, (33, 70), dtype, "mean", device, non_contiguous=True)
    # a column slice: rows are strided in memory
    logits, target, gen = make_inputs((9, 40), dtype, device)
    kwargs = to_device(VARIANTS[variant](20, gen), device)
    sliced = logits[:, ::2]
    torch.testing.assert_close(run_op(variant, sliced, target % 20, kwargs).double(),
                               run_op(variant, sliced.contiguous(), target % 20, kwargs).double())


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_rows_ignored(variant, reduction, device):
    logits, target, gen = make_inputs((5, 11), torch.float32, device)
    target = torch.full_like(target, IGNORE)
    kwargs = to_device(VARIANTS[variant](11, gen), device)
    logits.requires_grad_()
    loss = run_op(variant, logits, target, kwargs, reduction)
    expected = run_reference(variant, logits, target, kwargs, reduction)
    if reduction == "mean":  # 0 / 0, as F.cross_entropy
        assert torch.isnan(loss) and torch.isnan(expected)
    else:
        torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", ["balanced_softmax", "ldam_drw", "smoothing_weighted_adjusted", "focal"])
def test_custom_ignore_index(variant, device):
    logits, target, gen = make_inputs((12, 9), torch.float32, device)
    target[3] = 7
    kwargs = to_device(VARIANTS[variant](9, gen), device)
    for reduction in REDUCTIONS:
        got = run_op(variant, logits, target, kwargs, reduction, ignore_index=7)
        want = run_reference(variant, logits, target, kwargs, reduction, ignore_index=7)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_logits_match_cross_entropy(dtype, device):
    """Logits of +-1e4 stay finite; +-inf and NaN give what F.cross_entropy gives."""
    C = 37
    logits = torch.randn(6, C).to(dtype)
    logits[0] *= 1e4                       # huge spread
    logits[1, 5] = float("-inf")           # one impossible class (not the target)
    logits[2, :] = float("-inf")           # every class impossible -> NaN
    logits[3, 9] = float("inf")            # +inf -> NaN
    logits[4, 2] = float("nan")            # NaN -> NaN
    target = torch.tensor([3, 1, 0, 9, 2, 8])
    logits = logits.to(device).requires_grad_()
    target = target.to(device)
    loss = ltfast.adjusted_cross_entropy(logits, target, reduction="none")
    expected = F.cross_entropy(logits.detach().float(), target, reduction="none")
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-3, equal_nan=True)
    assert torch.isfinite(loss[:2]).all() and torch.isfinite(loss[5])
    ref_logits = logits.detach().float().requires_grad_()
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(ref_logits, target, reduction="sum"), ref_logits)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_float64(variant, device):
    logits, target, gen = make_inputs((6, 9), torch.float64, device, ignored_rows=(2,))
    kwargs = to_device(VARIANTS[variant](9, gen), device)
    kwargs = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    differentiable = [k for k in ("log_prior", "adjustment", "target_margin") if k in kwargs]
    for reduction in REDUCTIONS:
        if kwargs.get("gamma", 0.0) != 0.0:
            # The survey's focal factor is detached, so finite differences (which see it) are not
            # the intended gradient: compare with the reference's autograd in float64 instead.
            check_against_reference(variant, (6, 9), torch.float64, reduction, device)
            continue
        inputs = [logits.clone().requires_grad_()] + [kwargs[k].clone().requires_grad_() for k in differentiable]

        def fn(x, *vectors):
            return run_op(variant, x, target, {**kwargs, **dict(zip(differentiable, vectors))}, reduction)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def _opcheck_samples(device):
    logits, target, gen = make_inputs((8, 13), torch.float32, device, ignored_rows=(3,))
    prior = ltfast.priors.log_prior(_counts(13, gen)).to(device)
    w = (torch.rand(13, generator=gen) + 0.5).to(device)
    m = torch.rand(13, generator=gen).to(device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = logits.to(dtype).requires_grad_()
        for reduction in REDUCTIONS:
            yield torch.ops.ltfast.balanced_softmax, (x, target, prior, reduction, IGNORE)
            yield torch.ops.ltfast._balanced_softmax_forward, (x, target, prior, reduction, IGNORE)
            yield torch.ops.ltfast.adjusted_cross_entropy, (x, target, prior, m, w, 0.0, 0.1, reduction, IGNORE)
            yield torch.ops.ltfast._adjusted_cross_entropy_forward, (x, target, prior, m, w, 1.5, 0.0, reduction, IGNORE)
            yield torch.ops.ltfast._adjusted_cross_entropy_forward, (x, target, None, None, None, 0.0, 0.0, reduction, IGNORE)
            # with_grad: the forward-time gradient (a [N, C] fourth output, from the CPU and CUDA kernels).
            yield torch.ops.ltfast._balanced_softmax_forward, (x, target, prior, reduction, IGNORE, True)
            yield torch.ops.ltfast._adjusted_cross_entropy_forward, (x, target, prior, m, w, 0.0, 0.1, reduction,
                                                                     IGNORE, True)


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", device_params())
def test_opcheck_backward_ops(device):
    logits, target, gen = make_inputs((8, 13), torch.float32, device, ignored_rows=(3,))
    prior = ltfast.priors.log_prior(_counts(13, gen)).to(device)
    for reduction in REDUCTIONS:
        loss, lse, denom, _ = torch.ops.ltfast._balanced_softmax_forward(logits, target, prior, reduction, IGNORE)
        grad = torch.ones_like(loss)
        torch.library.opcheck(torch.ops.ltfast._balanced_softmax_backward,
                              (grad, logits, target, prior, lse, denom, reduction, IGNORE))
        loss, lse, denom, _ = torch.ops.ltfast._adjusted_cross_entropy_forward(
            logits, target, prior, prior.abs(), prior.abs(), 0.0, 0.1, reduction, IGNORE)
        torch.library.opcheck(torch.ops.ltfast._adjusted_cross_entropy_backward,
                              (grad, logits, target, prior, prior.abs(), prior.abs(), lse, denom, 0.0, 0.1,
                               reduction, IGNORE))
        _, _, _, forward_grad = torch.ops.ltfast._balanced_softmax_forward(logits, target, prior, reduction, IGNORE,
                                                                           True)
        torch.library.opcheck(torch.ops.ltfast._scale_forward_grad_, (forward_grad, grad * 0.5))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    criterion = ltfast.nn.LDAMLoss([500, 100, 20, 5, 3, 200, 40], drw_epoch=0).to(device)
    bs = ltfast.nn.BalancedSoftmaxLoss([500, 100, 20, 5, 3, 200, 40]).to(device)

    def step(x, y):
        return bs(x, y) + criterion(x, y) + ltfast.adjusted_cross_entropy(x, y, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for seed in range(3):  # different values, same shapes: no recompilation needed
        logits, target, _ = make_inputs((16, 7), torch.float32, device, seed=seed, ignored_rows=(5,))
        x1 = logits.clone().requires_grad_()
        x2 = logits.clone().requires_grad_()
        got = compiled(x1, target)
        want = step(x2, target)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", ["balanced_softmax", "smoothing_weighted_adjusted", "ldam_drw"])
def test_deterministic(variant, device):
    logits, target, gen = make_inputs((513, 1000), torch.float32, device)
    kwargs = to_device(VARIANTS[variant](1000, gen), device)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss = run_op(variant, x, target, kwargs)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("device", device_params())
def test_saves_only_row_statistics(device):
    """Backward saves the input logits and [N]/scalar statistics, never a new [N, C] buffer (the CPU
    forward-time gradient is not a saved tensor: test_forward_time_gradient_equals_backward_kernel)."""
    N, C = 64, 100
    logits, target, gen = make_inputs((N, C), torch.float32, device)
    logits.requires_grad_()
    prior = ltfast.priors.log_prior(_counts(C, gen)).to(device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for fn in (lambda: ltfast.balanced_softmax_loss(logits, target, prior),
                   lambda: ltfast.adjusted_cross_entropy(logits, target, prior, prior.abs(), prior.abs(),
                                                         label_smoothing=0.1)):
            fn()
    large = [t for t in saved if t.numel() >= N * C]
    assert all(t.data_ptr() == logits.data_ptr() for t in large), [t.shape for t in large]
    assert all(t.numel() in (1, N, 2 * N, C, N * C) for t in saved)  # 2N: row_stats [2, N]


@pytest.mark.parametrize("device", device_params())
def test_log_prior_and_margin_gradients(device):
    logits, target, gen = make_inputs((20, 6), torch.float64, device, ignored_rows=(0,))
    prior = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    margin = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    got = torch.autograd.grad(ltfast.adjusted_cross_entropy(logits, target, prior, margin), (prior, margin))
    want = torch.autograd.grad(reference.adjusted_cross_entropy(logits, target, prior, margin), (prior, margin))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", device_params())
def test_margin_gradient_accumulates_without_atomics(device):
    # index_add is an atomicAdd per row on CUDA: the margin gradient then differed run to run. The
    # per-class sums must come from an op that adds each class's rows in a fixed order.
    logits, target, gen = make_inputs((64, 5), torch.float32, device, ignored_rows=(0,))
    margin = torch.rand(5, device=device, requires_grad=True)
    loss = ltfast.adjusted_cross_entropy(logits, target, target_margin=margin)
    with RecordOps() as recorded:
        (grad,) = torch.autograd.grad(loss, margin)
    assert not [n for n in recorded.names if "index_add" in n or "scatter_add" in n], recorded.names
    assert torch.equal(grad, torch.autograd.grad(ltfast.adjusted_cross_entropy(logits, target, target_margin=margin),
                                                 margin)[0])


# ------------------------------------------------------------------ bad inputs
def _bad_call(device, **overrides):
    args = dict(logits=torch.randn(4, 5, device=device), target=torch.tensor([0, 1, 2, 3], device=device),
                log_prior=torch.zeros(5, device=device))
    args.update(overrides)
    return lambda: ltfast.balanced_softmax_loss(args["logits"], args["target"], args["log_prior"],
                                                args.get("reduction", "mean"))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(logits=torch.randn(20)), ValueError, r"logits must be a 2-D tensor \[N, C\], got a 1-D"),
    (dict(logits=torch.randn(4, 5, 2)), ValueError, r"logits must be a 2-D tensor \[N, C\], got a 3-D"),
    (dict(logits=torch.randn(4, 5).int()), TypeError, r"logits must be float32, float64, float16 or bfloat16"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, r"target must have N = 4 elements"),
    (dict(target=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"target must be a 1-D tensor"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, r"target must be an int64 tensor"),
    (dict(log_prior=torch.zeros(4)), ValueError, r"log_prior must be a 1-D tensor of C = 5 elements"),
    (dict(log_prior=torch.zeros(5, 1)), ValueError, r"log_prior must be a 1-D tensor of C = 5 elements"),
    (dict(reduction="avg"), ValueError, r"reduction must be 'none', 'mean' or 'sum', got 'avg'"),
])
def test_bad_inputs_name_the_argument(overrides, error, pattern, device):
    overrides = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in overrides.items()}
    with pytest.raises(error, match=pattern):
        _bad_call(device, **overrides)()


def test_target_out_of_range_names_the_row():
    for bad in (5, -1):
        with pytest.raises(IndexError, match=rf"target\[2\] = {bad} is out of range: expected a class index in \[0, 5\)"):
            _bad_call("cpu", target=torch.tensor([0, 1, bad, 3]))()


@pytest.mark.device_assert
@pytest.mark.parametrize("device", [p for p in device_params() if p.id != "cpu"])
@pytest.mark.parametrize("loss", ["balanced_softmax", "adjusted_cross_entropy", "seql", "eql", "lade",
                                  "lade_regularizer"])
def test_target_out_of_range_is_a_kernel_assert_on_cuda(loss, device):
    # Documented behaviour (docs/ops.md, "Targets out of range"): the CUDA kernels check in-kernel with
    # CUDA_KERNEL_ASSERT, which the emulator raises as an error naming the kernel and the line; on a
    # GPU it is a device-side assert (this test's cuda variant then runs in a child process).
    logits, target = torch.randn(4, 5, device=device), torch.tensor([0, 1, 7, 3], device=device)
    prior = torch.zeros(5, device=device)
    tail = torch.tensor([False, False, True, True, True], device=device)
    calls = {
        "balanced_softmax": lambda: ltfast.balanced_softmax_loss(logits, target, prior),
        "adjusted_cross_entropy": lambda: ltfast.adjusted_cross_entropy(logits, target),
        "seql": lambda: ltfast.softmax_equalization_loss(logits, target, tail),
        "eql": lambda: ltfast.equalization_loss(logits, target, tail),
        "lade": lambda: ltfast.lade_loss(logits, target, prior),
        # no CE rows: LADE's column pass checks the targets, once per row
        "lade_regularizer": lambda: ltfast.lade_regularizer(logits, target, prior),
    }
    with expect_kernel_assert(device, kernel_match=r"\(y >= 0 && y < C .*\) failed at csrc/ops/"):
        calls[loss]()


def test_prior_on_another_device():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match=r"log_prior must be on the same device as logits"):
        _bad_call("cpu", log_prior=torch.zeros(5, device=other))()
    with pytest.raises(RuntimeError, match=r"weight must be on the same device as logits"):
        ltfast.adjusted_cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]),
                                      weight=torch.ones(5, device=other))


def test_bad_hyperparameters():
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0, got -1"):
        ltfast.adjusted_cross_entropy(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        ltfast.adjusted_cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"gamma > 0 \(focal\) together with label_smoothing > 0"):
        ltfast.adjusted_cross_entropy(x, y, gamma=1.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"target_margin must be a 1-D tensor of C = 5"):
        ltfast.adjusted_cross_entropy(x, y, target_margin=torch.zeros(6))


def test_weight_gradient_is_refused():
    x, y = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match=r"gradient with respect to `weight` is not implemented"):
        ltfast.adjusted_cross_entropy(x, y, weight=torch.ones(5, requires_grad=True))


# ------------------------------------------------------------------ CUDA-only properties
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_host_sync_and_graph_capture():
    logits, target, gen = make_inputs((256, 1000), torch.bfloat16, "cuda", ignored_rows=(3,))
    prior = ltfast.priors.log_prior(_counts(1000, gen)).cuda()
    weight = ltfast.priors.survey_class_weights(_counts(1000, gen)).cuda()
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in (lambda: ltfast.balanced_softmax_loss(x, target, prior),
                   lambda: ltfast.adjusted_cross_entropy(x, target, prior, weight, weight, label_smoothing=0.1),
                   lambda: ltfast.adjusted_cross_entropy(x, target, weight=weight, gamma=2.0, reduction="none").sum()):
            fn().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # CUDA graph capture of forward + backward of the private ops.
    static_x = logits.float().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            loss, lse, denom, _ = torch.ops.ltfast._balanced_softmax_forward(static_x, target, prior, "mean", IGNORE)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, lse, denom, _ = torch.ops.ltfast._balanced_softmax_forward(static_x, target, prior, "mean", IGNORE)
        grad = torch.ops.ltfast._balanced_softmax_backward(torch.ones_like(loss), static_x, target, prior, lse,
                                                           denom, "mean", IGNORE)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    replayed_x = static_x.detach().clone().requires_grad_()
    expected = F.cross_entropy(replayed_x + prior, target, ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    expected.backward()   # the captured backward replayed on the new logits too
    torch.testing.assert_close(grad, replayed_x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_returns_float32():
    logits, target, gen = make_inputs((32, 100), torch.float32, "cuda")
    prior = ltfast.priors.log_prior(_counts(100, gen)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ltfast.balanced_softmax_loss(logits.bfloat16(), target, prior)
        expected = F.cross_entropy(logits.bfloat16() + prior, target)
    assert loss.dtype == torch.float32 == expected.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_cpu_autocast_returns_float32():
    logits, target, gen = make_inputs((32, 100), torch.float32, "cpu")
    prior = ltfast.priors.log_prior(_counts(100, gen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ltfast.balanced_softmax_loss(logits.bfloat16(), target, prior)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.bfloat16().double() + prior.double(), target)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_is_exactly_balanced_softmax_definition():
    """balanced_softmax == F.cross_entropy(logits + log_prior) to float32 rounding, every reduction."""
    logits, target, gen = make_inputs((100, 50), torch.float32, "cpu", ignored_rows=(7, 8))
    prior = ltfast.priors.log_prior(_counts(50, gen))
    for reduction in REDUCTIONS:
        got = torch.ops.ltfast.balanced_softmax(logits, target, prior, reduction, IGNORE)
        want = F.cross_entropy(logits + prior, target, reduction=reduction, ignore_index=IGNORE)
        torch.testing.assert_close(got, want, rtol=3e-6, atol=1e-6)
    assert math.isclose(
        torch.ops.ltfast.balanced_softmax(logits, target, prior).item(),
        F.cross_entropy(logits + prior, target).item(), rel_tol=3e-6)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_with_non_finite_tiles(dtype, device):
    """Rows wider than one CPU tile (2048 classes): a whole tile of -inf, a NaN in a later tile."""
    C = 5000
    logits = torch.randn(3, C).to(dtype)
    logits[0, :2048] = float("-inf")
    logits[1, 4500] = float("nan")
    target = torch.tensor([3000, 10, 4999])
    margin = torch.rand(C)
    logits = logits.to(device).requires_grad_()
    target, margin = target.to(device), margin.to(device)
    loss = ltfast.adjusted_cross_entropy(logits, target, target_margin=margin, reduction="none")
    ref_logits = logits.detach().double().requires_grad_()
    expected = reference.adjusted_cross_entropy(ref_logits, target, target_margin=margin.double(), reduction="none")
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-2, atol=1e-3, equal_nan=True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isfinite(loss[2])
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (ref_grad,) = torch.autograd.grad(expected.sum(), ref_logits)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3, equal_nan=True)


# Logit offsets at which a loss taken as lse - z with a rounded lse (one ulp of lse: 0.06 at 1e6
# in float32, 0.125 at 1e15 in float64) is visibly wrong; the kernels take (z - max) - log_sum.
LARGE_OFFSETS = {torch.float32: [1e4, 1e6, 1e7, 1e8], torch.float64: [1e15, 1e16]}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["cross_entropy", "balanced_softmax", "label_smoothing", "focal", "ldam_drw"])
def test_large_logits_match_cross_entropy(variant, dtype, device):
    """Issue 11.1: loss and gradient match PyTorch at any finite magnitude. The reference runs in the
    logits dtype, so that it rounds the adjusted logits (z + log_prior, z - margin) as the kernels do."""
    gen = torch.Generator().manual_seed(11)
    kwargs = to_device(VARIANTS[variant](10, gen), device)
    target = torch.randint(0, 10, (64,), generator=gen).to(device)
    for offset in LARGE_OFFSETS[dtype]:
        logits = (torch.randn(64, 10, generator=gen, dtype=torch.float64) * 3 + offset).to(dtype).to(device)
        logits[0] = offset  # a tie of every class: the loss is exactly log C
        x = logits.clone().requires_grad_()
        loss = run_op(variant, x, target, kwargs, "none")
        x_ref = logits.clone().requires_grad_()
        expected = run_reference(variant, x_ref, target, {k: (v.to(dtype) if torch.is_tensor(v) else v)
                                                          for k, v in kwargs.items()}, "none")
        torch.testing.assert_close(loss, expected.detach(), rtol=TOL[dtype]["rtol"], atol=1e-5,
                                   msg=lambda m: f"offset {offset}: {m}")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x_ref)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5 * expected_grad.abs().max().item(),
                                   msg=lambda m: f"offset {offset}: {m}")


@pytest.mark.parametrize("device", device_params())
def test_large_logits_issue_examples(device):
    """The cases of issue 11.1: [[1e4, 1e4]] is log 2, a row of 1e30 is log C (float32 and float64)."""
    for dtype in (torch.float32, torch.float64):
        two = torch.tensor([[1e4, 1e4]], dtype=dtype, device=device)
        got = ltfast.adjusted_cross_entropy(two, torch.tensor([1], device=device))
        assert abs(got.item() - math.log(2)) < 1e-6, got.item()
        huge = torch.full((2, 7), 1e30, dtype=dtype, device=device)
        got = ltfast.adjusted_cross_entropy(huge, torch.tensor([3, 6], device=device), reduction="none")
        torch.testing.assert_close(got.double(), torch.full((2,), math.log(7), dtype=torch.float64), rtol=1e-6, atol=0)
        got = ltfast.balanced_softmax_loss(huge, torch.tensor([3, 6], device=device),
                                           torch.zeros(7, device=device), reduction="none")
        torch.testing.assert_close(got.double(), torch.full((2,), math.log(7), dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_label_smoothing_with_impossible_target_matches_cross_entropy(dtype, device):
    """Issue 19 §4.6: label smoothing with a target logit of -inf is +inf in F.cross_entropy (NaN for a
    zero target weight), not NaN; its gradient is PyTorch's, finite (p = 0 at the target)."""
    gen = torch.Generator().manual_seed(19)
    C = 9
    logits = torch.randn(5, C, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.tensor([2, 0, 4, 7, 1])
    logits[0, 2] = float("-inf")                       # the target
    logits[1, 0] = logits[1, 5] = float("-inf")        # the target and another class
    logits[2, 6] = float("-inf")                       # another class only (+inf already)
    logits[3, 7] = float("-inf")
    logits, target = logits.to(device), target.to(device)
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(device)
    zero_weight = weight.clone()
    zero_weight[7] = 0.0                               # row 3: 0 * inf, NaN in PyTorch
    for kwargs in (dict(label_smoothing=0.1), dict(label_smoothing=0.3, weight=weight),
                   dict(label_smoothing=0.1, weight=zero_weight)):
        for reduction in ("none", "sum"):
            x = logits.clone().requires_grad_()
            loss = ltfast.adjusted_cross_entropy(x, target, reduction=reduction, **kwargs)
            x_ref = logits.clone().requires_grad_()
            expected = F.cross_entropy(x_ref, target, reduction=reduction, **kwargs)
            if reduction == "none":
                assert expected[:3].isinf().all() and torch.isfinite(expected[4])
            torch.testing.assert_close(loss, expected.detach(), equal_nan=True,
                                       msg=lambda m: f"{kwargs} {reduction}: {m}")
            (grad,) = torch.autograd.grad(loss.sum(), x)
            (expected_grad,) = torch.autograd.grad(expected.sum(), x_ref)
            torch.testing.assert_close(grad, expected_grad, equal_nan=True,
                                       msg=lambda m: f"{kwargs} {reduction} grad: {m}")


@pytest.mark.parametrize("device", device_params())
def test_row_stats_layout(device):
    """The forward ops save row_stats [2, N] in the accumulation dtype: (max, log sum exp(a - max)),
    both 0 for ignored rows (the contract the CUDA kernels follow too)."""
    logits, target, gen = make_inputs((5, 9), torch.bfloat16, device, ignored_rows=(2,))
    prior = ltfast.priors.log_prior(_counts(9, gen)).to(device)
    _, stats, _, _ = torch.ops.ltfast._balanced_softmax_forward(logits, target, prior, "mean", IGNORE)
    assert stats.shape == (2, 5) and stats.dtype == torch.float32
    adjusted = logits.float() + prior
    row_max = adjusted.max(1).values
    expected_log_sum = torch.log(torch.exp(adjusted - row_max[:, None]).sum(1))
    valid = target != IGNORE
    torch.testing.assert_close(stats[0][valid], row_max[valid])
    torch.testing.assert_close(stats[1][valid], expected_log_sum[valid])
    assert (stats[:, ~valid] == 0).all()


@pytest.mark.parametrize("device", device_params())
def test_label_smoothing_counts_a_tile_of_neg_inf(device):
    """Issue 11.3: a whole CPU tile (2048 classes) of -inf still enters the smoothing term, so the loss
    is inf as in F.cross_entropy (it was 9.36: the tile was skipped)."""
    C = 5000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, C, generator=gen)
    logits[0, :2048] = float("-inf")
    logits[1, 2048:4096] = float("-inf")  # a later tile
    target = torch.tensor([3000, 10])
    expected = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    assert torch.isinf(expected).all()
    got = ltfast.adjusted_cross_entropy(logits.to(device), target.to(device), label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(got.cpu(), expected)
    # Without smoothing the -inf tile adds exactly nothing.
    got = ltfast.adjusted_cross_entropy(logits.to(device), target.to(device), reduction="none")
    torch.testing.assert_close(got.cpu(), F.cross_entropy(logits, target, reduction="none"))


def _saved_large_tensors(fn, numel):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fn()
    return loss, [t for t in saved if t.numel() == numel]


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_logits_are_copied_once(device):
    """Issue 11.4: non-contiguous logits are made contiguous once, before the private forward op,
    and backward receives that copy (before, forward and backward each copied the strided input)."""
    N, C = 12, 9
    logits, target, gen = make_inputs((N, C), torch.float32, device, ignored_rows=(2,), non_contiguous=True)
    assert not logits.is_contiguous()
    prior = ltfast.priors.log_prior(_counts(C, gen)).to(device)
    tail = (torch.rand(C, generator=gen) < 0.5).to(device)
    seed = torch.tensor([5, 7], device=device)
    calls = {
        "balanced_softmax": lambda x: ltfast.balanced_softmax_loss(x, target, prior),
        "balanced_softmax_op": lambda x: torch.ops.ltfast.balanced_softmax(x, target, prior),
        "adjusted_cross_entropy": lambda x: ltfast.adjusted_cross_entropy(x, target, prior, label_smoothing=0.1),
        "adjusted_cross_entropy_op": lambda x: torch.ops.ltfast.adjusted_cross_entropy(x, target, prior),
        "seql": lambda x: ltfast.softmax_equalization_loss(x, target, tail, 0.5, seed=seed),
        "seql_op": lambda x: torch.ops.ltfast.softmax_equalization_loss(x, target, tail, seed, 0.5),
        "eql": lambda x: ltfast.equalization_loss(x, target, tail),
        "eql_op": lambda x: torch.ops.ltfast.equalization_loss(x, target, tail),
        "lade": lambda x: ltfast.lade_loss(x, target, prior),
        "lade_op": lambda x: torch.ops.ltfast.lade(x, target, prior),
        "lade_regularizer": lambda x: ltfast.lade_regularizer(x, target, prior),
    }
    for name, fn in calls.items():
        x = logits.detach().requires_grad_()
        loss, large = _saved_large_tensors(lambda: fn(x), N * C)
        assert large and all(t.is_contiguous() for t in large), (name, [t.stride() for t in large])
        (grad,) = torch.autograd.grad(loss, x)
        x_contiguous = logits.detach().contiguous().requires_grad_()
        (expected,) = torch.autograd.grad(fn(x_contiguous), x_contiguous)
        torch.testing.assert_close(grad, expected, msg=name)


def _forward_time_gradient_cases(logits, target, gen):
    """(name, forward(x, with_grad), backward(grad_loss, x, stats, denominator), functional(x)) per op."""
    C, device = logits.shape[1], logits.device
    prior = ltfast.priors.log_prior(_counts(C, gen)).to(device)
    margin = (3 * ltfast.priors.ldam_margins(_counts(C, gen))).to(device)
    weight = (torch.rand(C, generator=gen) + 0.5).to(device)
    tail = (torch.rand(C, generator=gen) < 0.6).to(device)
    seed = torch.tensor([11, 23], device=device)
    ops = torch.ops.ltfast
    cases = []
    for reduction in REDUCTIONS:
        cases.append((f"balanced_softmax-{reduction}",
                      lambda x, g, r=reduction: ops._balanced_softmax_forward(x, target, prior, r, IGNORE, g),
                      lambda gl, x, s, d, r=reduction: ops._balanced_softmax_backward(gl, x, target, prior, s, d, r,
                                                                                       IGNORE),
                      lambda x, r=reduction: ltfast.balanced_softmax_loss(x, target, prior, r)))
        for variant, gamma, smoothing in (("ldam_drw_smoothing", 0.0, 0.1), ("ldam_drw_focal", 1.5, 0.0)):
            cases.append((f"{variant}-{reduction}",
                          lambda x, g, r=reduction, a=gamma, s=smoothing: ops._adjusted_cross_entropy_forward(
                              x, target, prior, margin, weight, a, s, r, IGNORE, g),
                          lambda gl, x, st, d, r=reduction, a=gamma, s=smoothing: ops._adjusted_cross_entropy_backward(
                              gl, x, target, prior, margin, weight, st, d, a, s, r, IGNORE),
                          lambda x, r=reduction, a=gamma, s=smoothing: ltfast.adjusted_cross_entropy(
                              x, target, prior, margin, weight, a, s, r)))
        cases.append((f"seql-{reduction}",
                      lambda x, g, r=reduction: ops._softmax_equalization_loss_forward(x, target, tail, seed, 0.7, r,
                                                                                       IGNORE, g),
                      lambda gl, x, s, d, r=reduction: ops._softmax_equalization_loss_backward(
                          gl, x, target, tail, seed, s, d, 0.7, r, IGNORE),
                      lambda x, r=reduction: ltfast.softmax_equalization_loss(x, target, tail, 0.7, r, seed=seed)))
    return cases


# The forward-time gradient against the backward op's: the forward takes p_c = e_c * exp((M - m) -
# log_sum) from the exponentials e_c = exp(a_c - M) of its statistics pass, the backward
# exp((a_c - m) - log_sum) (cross_entropy_cpu.cpp, write_from_exponentials). Measured at C = 13, 1000,
# 4500 over these cases: float32 at most 1.2e-7 apart (3e-6 relative where the smoothing term does
# not cancel), bfloat16 one ulp after the final rounding (1.9e-6 at most). float64 recomputes them
# with the backward's code: bit-identical (gradcheck's reentrancy check needs that).
FORWARD_GRADIENT_TOL = {
    torch.float64: dict(rtol=0, atol=0),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [1000, 4500])  # 4500: three 2048-class tiles
def test_forward_time_gradient_equals_backward_kernel(C, dtype):
    """CPU, one pass fewer per training step (autograd_common.h): with with_grad the forward op also
    writes the gradient for an upstream gradient of 1, equal to the backward op's within
    FORWARD_GRADIENT_TOL (it reuses the exponentials of the statistics pass), with the same loss and
    statistics bit for bit; through autograd, loss.backward() returns it as it is, another upstream
    gradient scales it, and ltfast.set_forward_gradient(False) runs the backward op."""
    logits, target, gen = make_inputs((9, C), dtype, "cpu", ignored_rows=(1, 4))
    logits[6, 17] = float("nan")  # a NaN row: NaN gradient row either way
    for name, forward, backward, functional in _forward_time_gradient_cases(logits, target, gen):
        loss, stats, den, grad = forward(logits, True)
        plain = forward(logits, False)
        assert plain[3].numel() == 0 and grad.shape == logits.shape and grad.dtype == logits.dtype, name
        for got, want in zip((loss, stats, den), plain[:3]):
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), name
        expected = backward(torch.ones_like(loss), logits, stats, den)
        torch.testing.assert_close(grad, expected, **FORWARD_GRADIENT_TOL[dtype], equal_nan=True, msg=name)
        assert (grad[1] == 0).all() and (grad[4] == 0).all(), name
        assert grad[6].isnan().all() or name.startswith("seql"), name  # SEQL may drop the NaN entry
        for upstream in ("one", "scalar", "per_row", "negative"):
            x = logits.clone().requires_grad_()
            previous = ltfast.set_forward_gradient(True)
            try:
                out = functional(x)
            finally:
                ltfast.set_forward_gradient(previous)
            g = {"one": torch.ones_like(out), "scalar": torch.full_like(out, 0.37),
                 "per_row": torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape).to(out.dtype),
                 "negative": torch.full_like(out, -2.5)}[upstream]
            (got,) = torch.autograd.grad(out, x, g)
            want = backward(g.to(loss.dtype), logits, stats, den)
            if upstream == "one":  # the forward op's gradient itself, not a copy scaled by 1
                assert torch.equal(got.nan_to_num(7.0), grad.nan_to_num(7.0)), name
            else:
                tol = TOL[dtype]
                torch.testing.assert_close(got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"],
                                           equal_nan=True, msg=f"{name} {upstream}")
        previous = ltfast.set_forward_gradient(False)
        try:
            x = logits.clone().requires_grad_()
            out = functional(x)
            g = torch.full_like(out, 0.37)  # in the loss dtype: bf16 rounds 0.37
            (got,) = torch.autograd.grad(out, x, g)
            want = backward(g.to(loss.dtype), logits, stats, den)
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), name
        finally:
            ltfast.set_forward_gradient(previous)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(9, 13), (7, 77), (5, 1100)], ids=str)  # 8-lane, warp and block row groups
def test_gpu_forward_time_gradient_is_the_backward_kernels(shape, dtype, device):
    """CUDA (issue 20, one pass fewer per training step): the forward kernel's gradient pass runs the
    backward kernel's code on the statistics it just reduced, scaled for 'mean' by the denominator
    mean_denominator_kernel computes before the rows, so with_grad returns the backward op's gradient
    for an upstream gradient of 1 bit for bit, with the same loss, statistics and denominator."""
    if not (is_simt(device) or device == "cuda"):
        pytest.skip("the CPU kernels' forward-time gradient: test_forward_time_gradient_equals_backward_kernel")
    logits, target, gen = make_inputs(shape, dtype, device, ignored_rows=(1, 4))
    logits[6 % shape[0], 3] = float("nan")  # a NaN row: NaN gradient row either way
    # A view whose rows start 2 bytes past a 16-byte boundary: the gradient (contiguous) then splits
    # differently from the logits and is stored element by element.
    offset = torch.empty(logits.numel() + 1, dtype=dtype, device=device)[1:].view(shape)
    offset.copy_(logits)
    for x in (logits, offset):
        for name, forward, backward, _ in _forward_time_gradient_cases(x, target, gen):
            loss, stats, den, grad = forward(x, True)
            plain = forward(x, False)
            assert plain[3].numel() == 0 and grad.shape == x.shape and grad.dtype == dtype, name
            for got, want in zip((loss, stats, den), plain[:3]):
                assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), name
            expected = backward(torch.ones_like(loss), x, stats, den)
            assert torch.equal(grad.nan_to_num(7.0), expected.nan_to_num(7.0)), name
            assert (grad[1] == 0).all() and (grad[4 % shape[0]] == 0).all() or shape[0] <= 4, name


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_forward_grad(dtype, device):
    """ltfast::_scale_forward_grad_, the GPU half of the forward-time gradient: the gradient times the
    upstream gradient in place, read on the device; rows whose factor is exactly 1 are not touched (NaN
    entries included), and exact zeros stay +0 (ignored rows, SEQL drops), also for inf and NaN."""
    gen = torch.Generator().manual_seed(3)
    for C in (13, 77, 1100):
        base = (torch.randn(6, C, generator=gen) * 3).to(dtype)
        base[2] = 0.0
        base[3, :5] = 0.0
        base[4, 7] = float("nan")
        factors = [torch.tensor(1.0), torch.tensor(0.37), torch.tensor(-2.5), torch.tensor(float("inf")),
                   torch.tensor(float("nan")), torch.tensor([1.0, 0.5, -3.0, 1.0, 1.0, float("inf")])]
        for upstream in factors:
            grad = base.clone().to(device)
            torch.ops.ltfast._scale_forward_grad_(grad, upstream.to(device))
            factor = upstream.float().reshape(-1, 1) if upstream.dim() == 1 else upstream.float()
            product = (base.float() * factor).to(dtype).double()  # in the accumulation type, as the kernels
            want = torch.where(base == 0, torch.zeros((), dtype=torch.float64), product)
            ones = (factor == 1).expand_as(want)
            want = torch.where(ones, base.double(), want)
            got = grad.cpu().double()
            assert torch.equal(got.nan_to_num(7.0, 8.0, -8.0), want.nan_to_num(7.0, 8.0, -8.0)), (C, upstream)
            assert not torch.signbit(got[2]).any(), (C, upstream)  # +0, as the backward kernel writes
    with pytest.raises(ValueError, match="upstream must be a scalar or have one value per row"):
        torch.ops.ltfast._scale_forward_grad_(torch.zeros(4, 3, dtype=dtype, device=device),
                                              torch.ones(3, device=device))
    with pytest.raises(ValueError, match="grad must be a contiguous floating tensor"):
        torch.ops.ltfast._scale_forward_grad_(torch.zeros(3, 4, dtype=dtype, device=device).t(),
                                              torch.ones((), device=device))


@pytest.mark.parametrize("device", device_params())
def test_gpu_forward_time_gradient_through_autograd(device):
    """The forward-time gradient end to end through autograd on the GPU kernels: loss.backward()
    hands out the forward's gradient as it is; other upstream gradients scale it (on a GPU with
    _scale_forward_grad_ on the device); a second backward (retain_graph) runs the backward op."""
    if not (is_simt(device) or device == "cuda"):
        pytest.skip("the CPU path: test_forward_time_gradient_equals_backward_kernel")
    logits, target, gen = make_inputs((9, 77), torch.float32, device, ignored_rows=(1, 4))
    previous = ltfast.set_forward_gradient(True)
    try:
        for name, forward, backward, functional in _forward_time_gradient_cases(logits, target, gen):
            loss, stats, den, grad = forward(logits, True)
            for upstream in ("one", "scalar", "per_row"):
                x = logits.clone().requires_grad_()
                out = functional(x)
                g = {"one": torch.ones_like(out), "scalar": torch.full_like(out, 0.37),
                     "per_row": torch.linspace(-1.0, 2.0, out.numel(), device=device).reshape(out.shape)}[upstream]
                (got,) = torch.autograd.grad(out, x, g, retain_graph=True)
                want = backward(g.to(loss.dtype), logits, stats, den)
                if upstream == "one":
                    assert torch.equal(got, grad), name
                else:
                    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=f"{name} {upstream}")
                (again,) = torch.autograd.grad(out, x, g)  # the forward's gradient was handed out once
                assert torch.equal(again, backward(g.to(loss.dtype), logits, stats, den)), name
    finally:
        ltfast.set_forward_gradient(previous)


class _NoGradient(torch.autograd.Function):
    """Identity forward whose backward returns no gradient (None)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("forward_gradient", [True, False])
def test_loss_without_upstream_gradient(forward_gradient):
    """The CE family's autograd functions do not materialise zero gradients for their outputs (that was
    an [N, C] fill for grad_logits per step), so their backward can see the loss's gradient undefined:
    it then returns none, and the logits get only what the rest of the graph gives them."""
    logits, target, gen = make_inputs((5, 9), torch.float32, "cpu", ignored_rows=(1,))
    prior = ltfast.priors.log_prior(_counts(9, gen))
    tail = torch.rand(9, generator=gen) < 0.5
    previous = ltfast.set_forward_gradient(forward_gradient)
    try:
        for loss_of in (lambda x: ltfast.balanced_softmax_loss(x, target, prior),
                        lambda x: ltfast.adjusted_cross_entropy(x, target, prior, label_smoothing=0.1),
                        lambda x: ltfast.softmax_equalization_loss(x, target, tail, 0.5, seed=torch.tensor([1, 2]))):
            x = logits.clone().requires_grad_()
            (_NoGradient.apply(loss_of(x)) + (3 * x).sum()).backward()
            torch.testing.assert_close(x.grad, torch.full_like(x, 3.0), rtol=0, atol=0)
    finally:
        ltfast.set_forward_gradient(previous)


def test_forward_time_gradient_retain_graph_create_graph_and_switch():
    logits, target, gen = make_inputs((6, 11), torch.float64, "cpu", ignored_rows=(2,))
    prior = ltfast.priors.log_prior(_counts(11, gen))
    x = logits.clone().requires_grad_()
    previous = ltfast.set_forward_gradient(True)
    try:
        loss = ltfast.balanced_softmax_loss(x, target, prior)
        forward_time = ltfast.balanced_softmax_loss(x, target, prior)
    finally:
        assert ltfast.set_forward_gradient(previous) is True
    assert previous is ltfast._extension.FORWARD_GRADIENT_DEFAULT is True  # on from import (_extension.py)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    first.mul_(0)  # the caller owns the gradient it got; a second backward is unaffected
    (second,) = torch.autograd.grad(loss, x)
    x64 = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.balanced_softmax(x64, target, prior), x64)
    torch.testing.assert_close(second, expected, rtol=1e-9, atol=1e-12)
    (with_graph,) = torch.autograd.grad(forward_time, x, create_graph=True)
    torch.testing.assert_close(with_graph, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="ltfast.balanced_softmax: second-order gradients"):
        torch.autograd.grad(with_graph.sum(), x)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ltfast.set_forward_gradient(1)
