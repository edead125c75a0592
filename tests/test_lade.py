"""ltfast.lade / lade_regularizer against the survey transcription in ltfast.reference."""
import math

import pytest
import torch

import ltfast
from ltfast import priors, reference
from conftest import device_params
from test_cross_entropy import DTYPES, SHAPES, TOL, make_inputs

OPS = {
    "lade": (lambda x, y, lp, **kw: ltfast.lade_loss(x, y, lp, **kw), reference.lade),
    "lade_regularizer": (lambda x, y, lp, **kw: ltfast.lade_regularizer(x, y, lp, **kw), reference.lade_regularizer),
}


def prior_for(C, gen, device, dtype=torch.float32):
    counts = torch.randint(1, 1280, (C,), generator=gen)
    return priors.log_prior(counts).to(device=device, dtype=dtype)


def check(op, shape, dtype, device, ignored_rows=(1, 4), scale=3.0, kwargs=None, log_prior=None):
    kwargs = kwargs or {}
    fused, ref = OPS[op]
    logits, target, gen = make_inputs(shape, dtype, device, ignored_rows=ignored_rows, scale=scale)
    lp = prior_for(shape[1], gen, device) if log_prior is None else log_prior.to(device)
    x = logits.detach().requires_grad_()
    loss = fused(x, target, lp, **kwargs)
    assert loss.dtype == dtype and loss.shape == ()
    x64 = logits.detach().double().requires_grad_()
    expected = ref(x64, target, lp.double(), **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(expected, x64)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"])
    grad_scale = expected_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * grad_scale)
    return loss, grad


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(256, 1000), (64, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", list(OPS))
def test_matches_reference(op, shape, dtype, device):
    # With C >= N most classes are absent from the batch: F_c = 0, they count through S_c only.
    check(op, shape, dtype, device)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", list(OPS))
def test_hyperparameters_and_ignore_index(op, device):
    kwargs = {"remine_lambda": 0.5, "ignore_index": 3}
    if op == "lade":
        kwargs["alpha"] = 0.05  # the upstream LADE ImageNet-LT setting
    logits, target, gen = make_inputs((40, 12), torch.float64, device)
    target[::5] = 3
    lp = prior_for(12, gen, device, torch.float64)
    fused, ref = OPS[op]
    x = logits.clone().requires_grad_()
    x64 = logits.clone().requires_grad_()
    got, want = fused(x, target, lp, **kwargs), ref(x64, target, lp, **kwargs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x64)[0])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", list(OPS))
def test_all_rows_ignored_is_nan_with_zero_grad(op, device):
    logits, target, gen = make_inputs((6, 9), torch.float32, device)
    target = torch.full_like(target, -100)
    x = logits.requires_grad_()
    loss = OPS[op][0](x, target, prior_for(9, gen, device))
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_finite_for_huge_logits_and_tiny_priors(dtype, device):
    """Logits of +-1e4 and classes with a prior near zero (log(0 + 1e-9)) keep LADE finite."""
    C = 50
    counts = torch.randint(1, 500, (C,))
    counts[:5] = 0  # no training image: log prior = log(1e-9)
    lp = priors.log_prior(counts)
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, C, generator=gen) * 1e4).to(dtype).to(device).requires_grad_()
    target = torch.randint(0, C, (64,), generator=gen).to(device)
    loss = ltfast.lade_loss(logits, target, lp.to(device))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    expected = reference.lade(logits.detach().double(), target, lp.double().to(device))
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_float64(op, device):
    logits, target, gen = make_inputs((9, 6), torch.float64, device, ignored_rows=(2,))
    target[5] = target[6]  # a class seen twice
    lp = prior_for(6, gen, device, torch.float64)
    fused = OPS[op][0]
    assert torch.autograd.gradcheck(lambda x: fused(x, target, lp), (logits.clone().requires_grad_(),),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    logits, target, gen = make_inputs((10, 7), torch.float32, device, ignored_rows=(4,))
    lp = prior_for(7, gen, device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = logits.to(dtype).requires_grad_()
        torch.library.opcheck(torch.ops.ltfast.lade, (x, target, lp, 0.1, 0.1, -100))
        torch.library.opcheck(torch.ops.ltfast.lade_regularizer, (x, target, lp, 0.3, -100))
        torch.library.opcheck(torch.ops.ltfast._lade_forward, (x, target, lp, 1.0, 0.1, 0.1, -100))
        _, lse, stats, count = torch.ops.ltfast._lade_forward(x.detach(), target, lp, 1.0, 0.1, 0.1, -100)
        grad = torch.ones((), dtype=lse.dtype, device=device)
        torch.library.opcheck(torch.ops.ltfast._lade_backward, (grad, x.detach(), target, lp, lse, stats, count, 1.0, -100))


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    criterion = ltfast.nn.LADELoss([900, 300, 120, 40, 9, 3]).to(device)

    def step(x, y):
        return criterion(x, y) + ltfast.lade_regularizer(x, y, criterion.log_prior)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        logits, target, _ = make_inputs((32, 6), torch.float32, device, seed=seed, ignored_rows=(3,))
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got, want = compiled(x1, target), step(x2, target)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("device", device_params())
def test_deterministic(device):
    logits, target, gen = make_inputs((1000, 1000), torch.float32, device)
    lp = prior_for(1000, gen, device)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss = ltfast.lade_loss(x, target, lp)
        loss.backward()
        runs.append((loss.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_saves_only_row_and_column_statistics():
    N, C = 64, 100
    logits, target, gen = make_inputs((N, C), torch.float32, "cpu")
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ltfast.lade_loss(logits, target, prior_for(C, gen, "cpu"))
    large = [t for t in saved if t.numel() >= N * C]
    assert all(t.data_ptr() == logits.data_ptr() for t in large)
    assert all(t.numel() in (1, N, 2 * N, C, 4 * C, N * C) for t in saved)  # row_stats [2, N], column_stats [4, C]


def test_module_and_bad_inputs():
    counts = [500, 100, 20, 5]
    module = ltfast.nn.LADELoss(counts, alpha=0.2, remine_lambda=0.3)
    assert "log_prior" in module.state_dict()
    x, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    torch.testing.assert_close(module(x, y), reference.lade(x, y, priors.log_prior(counts), 0.2, 0.3),
                               rtol=2e-5, atol=2e-6)
    lp = priors.log_prior(counts)
    with pytest.raises(ValueError, match=r"log_prior must be a 1-D tensor of C = 4 elements"):
        ltfast.lade_loss(x, y, lp[:3])
    with pytest.raises(ValueError, match=r"target must have N = 16 elements"):
        ltfast.lade_loss(x, y[:5], lp)
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor"):
        ltfast.lade_loss(x[0], y, lp)
    with pytest.raises(TypeError, match=r"target must be an int64 tensor"):
        ltfast.lade_loss(x, y.float(), lp)
    with pytest.raises(IndexError, match=r"target\[0\] = 9 is out of range"):
        ltfast.lade_loss(x, torch.full_like(y, 9), lp)
    with pytest.raises(ValueError, match=r"remine_lambda must be a finite number >= 0"):
        ltfast.lade_loss(x, y, lp, remine_lambda=-1.0)
    with pytest.raises(RuntimeError, match=r"log_prior must be on the same device as logits"):
        ltfast.lade_loss(x, y, lp.to("cuda" if torch.cuda.is_available() else "meta"))
    with pytest.raises(ValueError, match="remine_lambda must be >= 0"):
        ltfast.nn.LADELoss(counts, remine_lambda=-0.1)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [0.1, 8.0, 30.0])
def test_wide_and_narrow_logit_spreads(scale, dtype, device):
    """The CPU kernels share one exponential between the row and column softmax when the logits'
    spread allows it (kSharedExpSpread) and take two otherwise: both regimes match the reference."""
    for op in OPS:
        check(op, (300, 97), dtype, device, scale=scale)


@pytest.mark.parametrize("device", device_params())
def test_rare_class_with_tiny_row_probability(device):
    """A class every sample scores very low (tiny row softmax) still has a column softmax of order
    1/N: its gradient must stay exact (the shared-exponential shortcut must not drop it)."""
    logits, target, gen = make_inputs((64, 20), torch.float64, device, scale=2.0)
    logits[:, 7] -= 60.0
    logits[:, 3] += 25.0
    lp = prior_for(20, gen, device, torch.float64)
    for op, (fused, ref) in OPS.items():
        x, x64 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got, want = fused(x, target, lp), ref(x64, target, lp)
        torch.testing.assert_close(got, want)
        g, w = torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x64)[0]
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-14)
        assert w[:, 7].abs().max() > 1e-6  # the column term is what carries this gradient


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_logits(dtype, device):
    """Issue 11.1 (LADE): the row softmax (PriorCE) and the column softmax (LADER) are taken from
    (z - max) - log_sum, so the gradient stays exact when every logit is ~1e6 (1e15 in float64).

    The oracle is the reference on z' = z - o (exact) plus the analytic effect of the shift o:
    PriorCE, F - S and both softmaxes are shift-invariant, S_c = S'_c + o, so
    LADER(z) = LADER(z') + sum_c pi_c lambda (2 o S'_c + o^2) and its gradient gains
    2 lambda o pi_c sigma_ic. (The reference on z itself is not exact at 1e15: torch.logsumexp's
    backward takes exp(z - lse) with lse rounded to 0.125.)"""
    offset = 1e6 if dtype == torch.float32 else 1e15
    gen = torch.Generator().manual_seed(9)
    small = torch.randn(64, 10, generator=gen, dtype=torch.float64) * 3
    logits = (small + offset).to(dtype)
    shifted = logits.double() - offset  # exact
    target = torch.randint(0, 10, (64,), generator=gen)
    target[5] = -100
    valid = target != -100
    # log_prior = 0 keeps z + log_prior exact in float32 at 1e6, so PriorCE sees the same rows.
    lp = torch.zeros(10, dtype=torch.float64)
    lam, alpha = 0.1, 0.1
    for op, (fused, ref) in OPS.items():
        a = alpha if op == "lade" else 1.0
        x = logits.to(device).requires_grad_()
        got = fused(x, target.to(device), lp.to(device=device, dtype=dtype))
        xs = shifted.clone().requires_grad_()
        want_shifted = ref(xs, target, lp)
        (want_grad,) = torch.autograd.grad(want_shifted, xs)
        s_shifted = torch.logsumexp(shifted[valid] + math.log(1 / 10 + 1e-9), 0) - math.log(int(valid.sum()))
        want = want_shifted.item() + a * lam * float((2 * offset * s_shifted + offset ** 2).sum())
        sigma = torch.zeros_like(shifted)
        sigma[valid] = torch.softmax(shifted[valid], 0)
        want_grad = want_grad + a * 2 * lam * offset * sigma
        assert math.isclose(got.item(), want, rel_tol=TOL[dtype]["rtol"]), (op, got.item(), want)
        (g,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(g.double().cpu(), want_grad, rtol=0, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("device", device_params())
def test_statistics_layout_and_exact_count(device):
    """Issue 11.5: num_valid is an exact int64 count; row_stats [2, N] and column_stats [4, C] as
    documented in csrc/ops/lade/lade.h (row/column max and log-sum-exp offset kept apart)."""
    logits, target, gen = make_inputs((10, 7), torch.float32, device, ignored_rows=(4, 6))
    lp = prior_for(7, gen, device)
    _, row_stats, column_stats, num_valid = torch.ops.ltfast._lade_forward(logits, target, lp, 1.0, 0.1, 0.1, -100)
    assert num_valid.dtype == torch.int64 and num_valid.shape == () and num_valid.item() == 8
    assert row_stats.shape == (2, 10) and column_stats.shape == (4, 7)
    valid = target != -100
    adjusted = logits + lp
    torch.testing.assert_close(row_stats[0][valid], adjusted[valid].max(1).values)
    torch.testing.assert_close(row_stats[1][valid], torch.logsumexp(adjusted[valid] - row_stats[0][valid][:, None], 1))
    assert (row_stats[:, ~valid] == 0).all()
    torch.testing.assert_close(column_stats[0], logits[valid].max(0).values)
    torch.testing.assert_close(column_stats[1], torch.logsumexp(logits[valid] - column_stats[0], 0))
