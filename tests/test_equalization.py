"""Equalization losses: SEQL (softmax, random per-element drops of tail negatives) and EQL (sigmoid)."""
import math

import pytest
import torch
import torch.nn.functional as F

import ltfast
from ltfast import reference
from conftest import device_params
from test_cross_entropy import DTYPES, REDUCTIONS, SHAPES, TOL, make_inputs

IGNORE = -100


def tail_for(C, gen, device, fraction=0.6):
    tail = torch.rand(C, generator=gen) < fraction
    return tail.to(device)


def tail_negatives(target, tail):
    N, C = target.shape[0], tail.shape[0]
    columns = torch.arange(C, device=target.device)
    return tail[None, :].expand(N, C) & (columns[None, :] != target[:, None]) & (target != IGNORE)[:, None]


def seql_with_grad(logits, target, tail, gamma, seed, reduction="mean", grad_out=None):
    x = logits.detach().clone().requires_grad_()
    loss = ltfast.softmax_equalization_loss(x, target, tail, gamma, reduction, IGNORE, seed=seed)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    return loss, grad


# ------------------------------------------------------------------ SEQL
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_seql_matches_reference_on_its_mask(shape, dtype, reduction, device):
    """Replaying the kernel's own drop decisions (the exactly-zero gradients) in the survey's
    -1e7 formulation gives the same loss and gradients."""
    logits, target, gen = make_inputs(shape, dtype, device, ignored_rows=(1, 4))
    tail = tail_for(shape[1], gen, device)
    seed = ltfast.ops.new_seed(device)
    grad_out = torch.rand((shape[0],) if reduction == "none" else (), generator=gen).to(device)
    loss, grad = seql_with_grad(logits, target, tail, 0.9, seed, reduction, grad_out.to(dtype))
    dropped = tail_negatives(target, tail) & (grad == 0)
    x64 = logits.detach().double().requires_grad_()
    expected = reference.softmax_equalization_loss(x64, target, tail, 0.9, reduction, IGNORE, keep=~dropped)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad_out.double())
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    scale = expected_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_seql_gamma_zero_is_cross_entropy_and_one_drops_every_tail_negative(dtype, device):
    logits, target, gen = make_inputs((50, 30), dtype, device, ignored_rows=(7,))
    tail = tail_for(30, gen, device)
    seed = ltfast.ops.new_seed(device)
    for reduction in REDUCTIONS:
        loss, grad = seql_with_grad(logits, target, tail, 0.0, seed, reduction)
        x = logits.detach().clone().requires_grad_()
        expected = F.cross_entropy(x, target, reduction=reduction, ignore_index=IGNORE)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0], rtol=2e-5, atol=2e-6)

        loss, grad = seql_with_grad(logits, target, tail, 1.0, seed, reduction)
        removed = tail_negatives(target, tail)
        x = logits.detach().clone().requires_grad_()
        expected = F.cross_entropy(x.masked_fill(removed, float("-inf")), target, reduction=reduction,
                                   ignore_index=IGNORE)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
        expected_grad = torch.autograd.grad(expected.sum(), x)[0]
        torch.testing.assert_close(grad, expected_grad, rtol=2e-5, atol=2e-6)
        assert torch.equal(grad[removed], torch.zeros_like(grad[removed]))


@pytest.mark.parametrize("device", device_params())
def test_seql_keep_fraction_is_one_minus_gamma(device):
    """Over many elements the fraction of tail negatives kept (non-zero gradient) is within 3
    standard errors of 1 - gamma; head and target entries are always kept."""
    gamma = 0.9
    logits, target, gen = make_inputs((2048, 300), torch.float32, device, scale=1.0)
    tail = tail_for(300, gen, device, fraction=0.5)
    _, grad = seql_with_grad(logits, target, tail, gamma, ltfast.ops.new_seed(device))
    candidates = tail_negatives(target, tail)
    kept = (grad != 0)[candidates].double()
    n = kept.numel()
    standard_error = math.sqrt(gamma * (1 - gamma) / n)
    assert abs(kept.mean().item() - (1 - gamma)) < 3 * standard_error, (kept.mean().item(), n)
    assert (grad != 0)[~candidates].all()  # head classes and targets: always in the softmax
    # the decisions are not shared between rows or columns: per-row and per-column keep rates vary
    per_row = (grad != 0).double().where(candidates, torch.nan).nanmean(1)
    assert per_row.std().item() > 0


@pytest.mark.parametrize("device", device_params())
def test_seql_reproducible_and_seed_dependent(device):
    logits, target, gen = make_inputs((64, 100), torch.float32, device)
    tail = tail_for(100, gen, device)
    torch.manual_seed(123)
    first = seql_with_grad(logits, target, tail, 0.9, None)
    torch.manual_seed(123)
    second = seql_with_grad(logits, target, tail, 0.9, None)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    third = seql_with_grad(logits, target, tail, 0.9, None)
    assert not torch.equal(first[1] != 0, third[1] != 0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_seql_never_nan_even_when_every_negative_is_dropped(dtype, device):
    logits, target, gen = make_inputs((16, 12), dtype, device, scale=50.0)
    tail = torch.ones(12, dtype=torch.bool, device=device)  # every class tail, gamma = 1: only targets remain
    loss, grad = seql_with_grad(logits, target, tail, 1.0, ltfast.ops.new_seed(device), "none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.float(), torch.zeros(16, device=device), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", device_params())
def test_seql_opcheck_gradcheck_compile(device):
    logits, target, gen = make_inputs((9, 11), torch.float64, device, ignored_rows=(2,))
    tail = tail_for(11, gen, device)
    seed = ltfast.ops.new_seed(device)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.ltfast.softmax_equalization_loss,
                              (logits.clone().requires_grad_(), target, tail, seed, 0.9, reduction, IGNORE))
        torch.library.opcheck(torch.ops.ltfast._softmax_equalization_loss_forward,
                              (logits.float().requires_grad_(), target, tail, seed, 0.5, reduction, IGNORE))
        assert torch.autograd.gradcheck(
            lambda x: ltfast.softmax_equalization_loss(x, target, tail, 0.7, reduction, IGNORE, seed=seed),
            (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-7)
    torch._dynamo.reset()
    module = ltfast.nn.SoftmaxEqualizationLoss([500, 200, 90, 30, 12, 5, 2, 1, 1, 1, 1], lambda_=0.05).to(device)
    compiled = torch.compile(lambda x, y: module(x, y), fullgraph=True, backend="aot_eager")
    x = logits.float().requires_grad_()
    compiled(x, target).backward()
    # a new seed every call is data, not a guard: no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            got = compiled(x, target)
            assert torch.isfinite(got)
            got.backward()


# ------------------------------------------------------------------ EQL
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eql_matches_reference(shape, dtype, reduction, device):
    logits, target, gen = make_inputs(shape, dtype, device, ignored_rows=(1, 4), scale=4.0)
    tail = tail_for(shape[1], gen, device)
    x = logits.detach().requires_grad_()
    loss = ltfast.equalization_loss(x, target, tail, reduction, IGNORE)
    assert loss.dtype == dtype
    x64 = logits.detach().double().requires_grad_()
    expected = reference.equalization_loss(x64, target, tail, reduction, IGNORE)
    grad_out = torch.rand(expected.shape, generator=gen, dtype=torch.float64).to(device)
    (grad,) = torch.autograd.grad(loss, x, grad_out.to(dtype))
    (expected_grad,) = torch.autograd.grad(expected, x64, grad_out)
    tol = TOL[dtype]
    # the loss sums C per-class terms: its bf16/fp16 rounding is relative to that sum; a float16 sum
    # beyond 65504 is inf, as any float16 result would be
    representable = expected.detach().abs() <= torch.finfo(dtype).max
    assert torch.isinf(loss[~representable]).all()
    torch.testing.assert_close(loss.double()[representable], expected.detach()[representable], rtol=tol["rtol"],
                               atol=tol["atol"] * shape[1])
    scale = expected_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


@pytest.mark.parametrize("device", device_params())
def test_eql_suppresses_tail_negatives_and_opchecks(device):
    logits, target, gen = make_inputs((20, 15), torch.float64, device, ignored_rows=(3,), scale=30.0)
    tail = tail_for(15, gen, device)
    x = logits.clone().requires_grad_()
    loss = ltfast.equalization_loss(x, target, tail, "sum")
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.equal(grad[tail_negatives(target, tail)], torch.zeros_like(grad[tail_negatives(target, tail)]))
    no_tail = torch.zeros_like(tail)
    plain = F.binary_cross_entropy_with_logits(logits, F.one_hot(target.clamp_min(0), 15).double(), reduction="none")
    plain = plain.sum(1)[target != IGNORE].mean()
    torch.testing.assert_close(ltfast.equalization_loss(logits, target, no_tail), plain)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.ltfast.equalization_loss, (x, target, tail, reduction, IGNORE))
        torch.library.opcheck(torch.ops.ltfast._equalization_loss_forward, (x, target, tail, reduction, IGNORE))
        assert torch.autograd.gradcheck(lambda z: ltfast.equalization_loss(z, target, tail, reduction),
                                        (logits.clone().div(10).requires_grad_(),), eps=1e-6, atol=1e-7)
    torch._dynamo.reset()
    module = ltfast.nn.EqualizationLoss([500, 200, 90, 30, 12, 5, 2, 1, 1, 1, 1, 1, 1, 1, 1], lambda_=0.05).to(device)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, target), module(logits, target))


def test_tail_classes_and_module_errors():
    counts = [1000, 500, 100, 40, 10, 3]
    total = sum(counts)
    assert ltfast.priors.tail_classes(counts, lambda_=40 / total).tolist() == [False, False, False, True, True, True]
    assert ltfast.priors.tail_classes(counts, count_threshold=50).tolist() == [False, False, False, True, True, True]
    # ImageNet-LT: the survey's 4.3e-4 puts classes with 49 or fewer of 115,846 images in the tail
    assert ltfast.priors.tail_classes([49, 50, 115846 - 99]).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="gamma must be a probability"):
        ltfast.nn.SoftmaxEqualizationLoss(counts, gamma=1.5)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"tail_mask must be a 1-D tensor of C = 6 elements"):
        ltfast.softmax_equalization_loss(x, y, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"tail_mask must be a bool"):
        ltfast.equalization_loss(x, y, torch.ones(6))
    with pytest.raises(ValueError, match=r"seed must be an int64 tensor of 2 elements"):
        ltfast.softmax_equalization_loss(x, y, torch.ones(6, dtype=torch.bool), seed=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"gamma \(drop probability\) must be in \[0, 1\]"):
        ltfast.softmax_equalization_loss(x, y, torch.ones(6, dtype=torch.bool), gamma=2.0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eql_large_logits(dtype, device):
    """Issue 11.1 (EQL): a huge target logit must not swamp the rest of the row (11.3125 instead of
    11.3969 at 1e6, C = 16; 0 instead of 1.104 at 1e8, C = 3)."""
    gen = torch.Generator().manual_seed(4)
    for C, value in ((16, 1e6), (3, 1e8), (37, -1e6), (37, 1e30)):
        logits = torch.randn(4, C, generator=gen, dtype=torch.float64).to(dtype)
        target = torch.tensor([0, 1, 2, C - 1])
        logits[torch.arange(4), target] = value
        logits[3, 0] = -value  # a huge negative of the opposite sign
        tail = torch.zeros(C, dtype=torch.bool)
        tail[1::3] = True
        x = logits.to(device).requires_grad_()
        loss = ltfast.equalization_loss(x, target.to(device), tail.to(device), "none")
        x64 = logits.double().requires_grad_()
        expected = reference.equalization_loss(x64, target, tail, "none")
        torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=TOL[dtype]["rtol"], atol=1e-6,
                                   msg=lambda m: f"C={C}, {value}: {m}")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x64)
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=TOL[dtype]["rtol"], atol=1e-6)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eql_confident_rows_keep_their_tiny_terms(dtype, device):
    """A row whose every logit has the sign of its label, |z| in [17, 40]: each term log1p(exp(-|z|))
    is 4e-18 to 4e-8, below float32's epsilon relative to 1, and the row's loss is their sum alone.
    The CUDA forward takes one log1p per 16 elements (math::eql_accumulate_element): it must keep
    that sum to relative precision, as a running product of the (1 + e) factors would not (it
    rounds to exactly 1, a loss of 0). C = 1000 and an odd C with a misaligned row start."""
    gen = torch.Generator().manual_seed(11)
    for C, offset in ((1000, 0), (333, 3)):
        magnitude = 17 + 23 * torch.rand(6, C + offset, generator=gen, dtype=torch.float64)
        target = torch.randint(0, C, (6,), generator=gen)
        sign = -torch.ones(6, C + offset, dtype=torch.float64)
        sign[torch.arange(6), target + offset] = 1.0  # the target's logit positive, every other negative
        logits = (sign * magnitude).to(dtype)[:, offset:]  # a view: rows start `offset` elements in
        tail = torch.zeros(C, dtype=torch.bool)
        loss = ltfast.equalization_loss(logits.to(device), target.to(device), tail.to(device), "none")
        expected = reference.equalization_loss(logits.double(), target, tail, "none")
        assert (expected > 0).all() and (expected < 1e-5).all()
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=0.0, msg=lambda m: f"C={C}, offset={offset}: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eql_non_finite_logits(dtype, device):
    """Issue 11.2: one EQL semantics per element on every backend. Suppressed (tail negative) entries
    are exactly 0 in loss and gradient even for NaN/inf logits; kept entries give
    F.binary_cross_entropy_with_logits, with its limit (0 or inf) at z = +-inf where PyTorch gives
    NaN; the gradient is sigmoid(z) - y."""
    inf, nan = float("inf"), float("nan")
    # C = 20 so that both the vector lanes and the scalar tail lanes of the CPU kernel see each case.
    C = 20
    tail = torch.zeros(C, dtype=torch.bool)
    tail[[2, 3, 4, 17, 18, 19]] = True
    cases = [  # (column, value) per row; column 0 is the target of rows 0-3, column 10 of rows 4-7
        [(2, nan), (3, inf), (4, -inf), (17, nan), (18, inf), (19, -inf)],  # suppressed only: finite
        [(0, inf), (5, -inf), (16, -inf)],                                  # limits 0: loss finite
        [(0, -inf)],                                                        # target at -inf: inf
        [(6, inf)],                                                         # kept negative at +inf: inf
        [(10, nan)],                                                        # kept NaN: NaN
        [(15, nan), (18, nan)],                                             # kept NaN in a tail lane
        [(10, inf), (17, -inf), (2, inf)],                                 # limit 0, suppressed: finite
        [],
    ]
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(len(cases), C, generator=gen)
    for row, entries in enumerate(cases):
        for column, value in entries:
            logits[row, column] = value
    target = torch.tensor([0, 0, 0, 0, 10, 10, 10, 10])
    logits = logits.to(dtype)
    x = logits.to(device).requires_grad_()
    loss = ltfast.equalization_loss(x, target.to(device), tail.to(device), "none")
    x64 = logits.double().requires_grad_()
    expected = reference.equalization_loss(x64, target, tail, "none")
    expected_finite = [True, True, False, False, False, False, True, True]
    assert torch.isfinite(expected).tolist() == expected_finite
    assert expected[2] == inf and expected[3] == inf and torch.isnan(expected[4:6]).all()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=tol["rtol"], atol=tol["atol"] * C,
                               equal_nan=True)
    # Finite elements agree with PyTorch's BCE; the suppressed ones are exactly 0 in the gradient.
    plain = F.binary_cross_entropy_with_logits(logits.double(), F.one_hot(target, C).double(), reduction="none")
    suppressed = tail_negatives(target, tail)
    finite_rows = torch.tensor(expected_finite)
    torch.testing.assert_close(expected[finite_rows], (plain * ~suppressed).nan_to_num(0.0).sum(1)[finite_rows])
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    (expected_grad,) = torch.autograd.grad(expected, x64, torch.ones_like(expected))
    grad = grad.double().cpu()
    assert (grad[suppressed] == 0).all() and (expected_grad[suppressed] == 0).all()
    torch.testing.assert_close(grad, expected_grad, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True)
    assert grad[1, 0] == 0 and grad[2, 0] == -1 and grad[3, 6] == 1 and torch.isnan(grad[4, 10])
