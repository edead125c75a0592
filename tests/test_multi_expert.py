"""ltfast.diverse_expert_loss / ltfast.ride_loss (SADE and RIDE on expert logits [N, E, C]) against
the plain-PyTorch references in ltfast.reference, the nn modules, and the compat classes against
the transcribed originals (tests/_survey_originals.py)."""
import math
import os
import sys

import pytest
import torch

import ltfast
from ltfast import priors, reference
from ltfast.compat import ensemble
from conftest import device_params, expect_kernel_assert
from test_cross_entropy import DTYPES, TOL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _survey_originals as orig  # noqa: E402
from test_compat import experts_extra_info, profile_counts  # noqa: E402

IGNORE = -100
# (N, E, C): one row; odd class counts; one expert; the three thread-group sizes of the CUDA
# kernels (C <= 32: 8 lanes, <= 1024: a warp, above: the block) and, on the CPU, a row longer
# than one 2048-class tile.
SHAPES = [(1, 3, 7), (7, 1, 33), (6, 2, 10), (9, 3, 1000), (5, 4, 33), (3, 3, 2100)]
SHAPE_IDS = [f"{n}x{e}x{c}" for n, e, c in SHAPES]


def make_inputs(shape, dtype, device, seed=0, ignored_rows=(1, 4), scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    N, E, C = shape
    logits = (torch.randn(N, E, C, generator=gen) * scale).to(dtype).to(device)
    target = torch.randint(0, C, (N,), generator=gen)
    for row in ignored_rows:
        if row < N:
            target[row] = IGNORE
    return logits, target.to(device), gen


def counts_for(C, gen):
    return torch.randint(1, 1280, (C,), generator=gen).double()


def assert_matches(loss, grad, expected, expected_grad, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * max(1.0, expected.detach().abs().max().item()))
    grad_scale = expected_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * grad_scale)


def run_both(fused, ref, logits, *args):
    """Value and gradient of the fused op on `logits` and of the reference on their float64 copy."""
    x = logits.detach().requires_grad_()
    loss = fused(x, *args)
    assert loss.dtype == logits.dtype
    x64 = logits.detach().double().requires_grad_()
    expected = ref(x64, *args)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype).to(loss.device))
    (expected_grad,) = torch.autograd.grad(expected, x64, upstream.to(x64.device))
    return loss, grad, expected, expected_grad


# ---------------------------------------------------------------------------- diverse_expert_loss
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_diverse_expert_matches_reference(shape, dtype, reduction, device):
    logits, target, gen = make_inputs(shape, dtype, device)
    adjustments = (torch.randn(shape[1], shape[2], generator=gen) * 2).to(device)
    loss, grad, expected, expected_grad = run_both(
        lambda x, *a: ltfast.diverse_expert_loss(x, *a), reference.diverse_expert_loss, logits, target,
        adjustments, reduction)
    assert loss.shape == ((shape[0],) if reduction == "none" else ())
    assert_matches(loss, grad, expected, expected_grad, dtype)
    if reduction == "none" and shape[0] > 4:
        assert loss[1] == 0 and loss[4] == 0 and (grad[1] == 0).all()


@pytest.mark.parametrize("device", device_params())
def test_diverse_expert_sade_adjustments_equal_three_cross_entropies(device):
    logits, target, gen = make_inputs((17, 3, 12), torch.float64, device)
    counts = counts_for(12, gen)
    criterion = ltfast.nn.DiverseExpertLoss(counts, tau=2.0).to(device)
    pi = counts / counts.sum()
    log_pi = torch.log(pi + 1e-9).to(device)
    inverse = torch.log(priors.inverse_prior(pi) + 1e-9).to(device)
    F = torch.nn.functional
    expected = (F.cross_entropy(logits[:, 0], target) + F.cross_entropy(logits[:, 1] + log_pi, target)
                + F.cross_entropy(logits[:, 2] + log_pi - 2.0 * inverse, target))
    torch.testing.assert_close(criterion(logits, target), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- ride_loss
def ride_options(variant, C, gen, device):
    counts = counts_for(C, gen)
    margin = 30.0 * priors.ldam_margins(counts, 0.5, dtype=torch.float64)
    if variant == "plain":
        return dict()
    if variant == "ldam":
        return dict(target_margin=margin.to(device))
    # after DRW: CE weights and per-class temperature, a base temperature other than 1
    return dict(target_margin=margin.to(device),
                weight=priors.effective_number_weights(counts, 0.9999, dtype=torch.float64).to(device),
                temperature=priors.ride_diversity_temperature(counts, 0.02).to(device), base_temperature=1.5,
                diversity_factor=-0.3)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", ["plain", "ldam", "drw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ride_matches_reference(shape, dtype, variant, device):
    logits, target, gen = make_inputs(shape, dtype, device)
    options = ride_options(variant, shape[2], gen, device)
    loss, grad, expected, expected_grad = run_both(
        lambda x, y: ltfast.ride_loss(x, y, **options), lambda x, y: reference.ride_loss(x, y, **options),
        logits, target)
    assert loss.shape == ()
    assert_matches(loss, grad, expected, expected_grad, dtype)
    if shape[0] > 4:
        assert (grad[1] == 0).all() and (grad[4] == 0).all()


@pytest.mark.parametrize("device", device_params())
def test_ride_diversity_gradient_formula(device):
    # The KL term's gradient w.r.t. z_k is diversity_factor * Tbar^2 / N' * (p_k - pbar) / T_c.
    logits, target, gen = make_inputs((6, 3, 9), torch.float64, device, ignored_rows=(2,))
    temperature = torch.rand(9, generator=gen, dtype=torch.float64).to(device) + 0.5
    x = logits.clone().requires_grad_()
    with_kl = ltfast.ride_loss(x, target, temperature=temperature, base_temperature=2.0, diversity_factor=-0.2)
    without_kl = ltfast.ride_loss(x, target, temperature=temperature, base_temperature=2.0, diversity_factor=0.0)
    (grad,) = torch.autograd.grad(with_kl - without_kl, x)
    T = 2.0 * temperature
    p = torch.softmax(logits / T, -1)
    pbar = torch.softmax(logits.mean(1) / T, -1)[:, None]
    expected = -0.2 * T.mean() ** 2 / 5 * (p - pbar) / T
    expected[2] = 0
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- large logits (issue 19)
# float32 offsets up to 1e30: z / T (T >= 0.5 here) and every sum of the kernels stay below the
# float32 max (3.4e38).
LARGE_OFFSETS = [1e4, 1e6, 1e8, 1e10, 1e20, 1e30]


def large_logits(offset, gen, shape=(12, 3, 10)):
    """float32 logits offset + spread: sample 0 a tie of every class and expert (all exactly the
    offset), the others spread by 3 or by 8 float32 ulps of the offset, whichever is larger (a
    smaller spread rounds to ties)."""
    ulp = 2.0 ** (math.floor(math.log2(offset)) - 23)
    logits = (torch.randn(*shape, generator=gen, dtype=torch.float64) * max(3.0, 8 * ulp) + offset).float()
    logits[0] = offset
    return logits


def shifted_cross_entropy(adjusted32, target, weight=None, reduction="mean"):
    """F.cross_entropy in float64 of float32 adjusted logits [N, C] that carry a float64 graph
    (`adjusted32` as float64 values), shifted by each row's max first: exact at any magnitude."""
    return torch.nn.functional.cross_entropy(adjusted32 - adjusted32.detach().amax(-1, keepdim=True), target,
                                             weight=weight, reduction=reduction)


def ride_oracle(logits32, target, target_margin=None, weight=None, temperature=None, base_temperature=1.0,
                diversity_factor=-0.2):
    """RIDE's loss (reference.ride_loss's formula) in float64 on float32 logits, exact at any magnitude
    for what float32 holds: the CE of each expert on the margin-adjusted logits rounded to float32 as
    the kernels round them (z_y - m_y), and the KL on the tempered logits u = z * (1 / T) rounded to
    float32 as the kernels (and a float32 PyTorch reference) round them: 0.5 ulp of u is 0.03 at
    z = 1e6, T = 1, a visible part of the KL. Each is then shifted by its row's (the KL: sample's)
    max, which changes no softmax, and taken in float64. Returns (loss, the float64 logits it
    differentiates)."""
    N, E, C = logits32.shape
    z = logits32.double().requires_grad_()
    adjusted32 = logits32.clone()
    if target_margin is not None:
        rows = torch.arange(N, device=logits32.device)
        adjusted32[rows, :, target] -= target_margin.float()[target][:, None]
    adjusted = z + (adjusted32.double() - logits32.double())  # the float32 rounding, as a constant
    loss = sum(shifted_cross_entropy(adjusted[:, k], target, weight) for k in range(E))
    ones = torch.ones(C, dtype=torch.float32, device=z.device)
    temperature32 = torch.tensor(base_temperature, dtype=torch.float32) * (
        temperature.float() if temperature is not None else ones)
    inv_t32 = 1 / temperature32
    u = z * inv_t32.double()
    u = u + ((logits32 * inv_t32).double() - u.detach())  # the float32 product, as a constant
    u = u - u.detach().amax(dim=(1, 2), keepdim=True)
    pbar = torch.softmax(u.detach().mean(1), -1)
    log_p = torch.log_softmax(u, -1)
    kl = torch.nn.functional.kl_div(log_p, pbar[:, None].expand_as(log_p), reduction="none").sum((1, 2)).mean()
    mean_temperature = temperature32.double().mean()
    return loss + diversity_factor * mean_temperature ** 2 * kl, z


def assert_close_at_scale(got, expected, what, rtol=2e-5):
    """Relative to the largest magnitude of `expected` (the losses grow with the spread)."""
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(got.double(), expected.detach(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", ["plain", "ldam", "drw"])
def test_ride_large_logits_match_float64(variant, device):
    """Issue 19 §4.2: RIDE's KL was formed as sum_k lse(z_k / T) - E lse(zbar / T), which cancels at
    large logits (620.64 for 6.238 at 1e10; -inf with a per-class temperature). Value and gradient
    against a float64 oracle at offsets up to 1e30."""
    gen = torch.Generator().manual_seed(19)
    options = ride_options(variant, 10, gen, device)
    target = torch.randint(0, 10, (12,), generator=gen).to(device)
    for offset in LARGE_OFFSETS:
        logits = large_logits(offset, gen).to(device)
        x = logits.clone().requires_grad_()
        loss = ltfast.ride_loss(x, target, **options)
        expected, z = ride_oracle(logits, target, **options)
        assert torch.isfinite(loss), (offset, loss)
        assert_close_at_scale(loss, expected, f"offset {offset} loss")
        (grad,) = torch.autograd.grad(loss, x)
        (expected_grad,) = torch.autograd.grad(expected, z)
        assert torch.isfinite(grad).all(), offset
        assert_close_at_scale(grad, expected_grad, f"offset {offset} grad")


@pytest.mark.parametrize("device", device_params())
def test_ride_issue_example_at_1e10(device):
    """The issue's case: randn + 1e10 in float32 is a tie of every logit (one ulp is 1024), so the loss
    is E log C (6.238 for E = 3, C = 8) and the gradient is that of the three CEs alone."""
    z = (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)) + 1e10).to(device)
    target = torch.tensor([1, 6], device=device)
    x = z.clone().requires_grad_()
    loss = ltfast.ride_loss(x, target)
    assert abs(loss.item() - 3 * math.log(8)) < 1e-5, loss.item()
    loss.backward()
    expected = torch.full((2, 3, 8), 1 / 16, dtype=torch.float64)
    expected[[0, 1], :, [1, 6]] -= 0.5
    torch.testing.assert_close(x.grad.cpu().double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_diverse_expert_large_logits_match_float64(reduction, device):
    """SADE's loss at offsets up to 1e30: each expert's CE from (a - max) - log_sum. The oracle adds
    the adjustments in float32 (as the kernels do, then rounded) and runs in float64 shifted."""
    gen = torch.Generator().manual_seed(23)
    adjustments = (torch.randn(3, 10, generator=gen) * 2).to(device)
    target = torch.randint(0, 10, (12,), generator=gen).to(device)
    for offset in LARGE_OFFSETS:
        logits = large_logits(offset, gen).to(device)
        x = logits.clone().requires_grad_()
        loss = ltfast.diverse_expert_loss(x, target, adjustments, reduction=reduction)
        z = logits.double().requires_grad_()
        adjusted = z + ((logits + adjustments).double() - logits.double())
        expected = sum(shifted_cross_entropy(adjusted[:, e], target, reduction=reduction) for e in range(3))
        assert_close_at_scale(loss, expected, f"offset {offset} loss")
        upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64, device=device).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
        (expected_grad,) = torch.autograd.grad(expected, z, upstream)
        assert_close_at_scale(grad, expected_grad, f"offset {offset} grad")


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("device", device_params())
def test_all_rows_ignored_is_nan_like_cross_entropy(device):
    logits, target, _ = make_inputs((3, 2, 5), torch.float32, device, ignored_rows=(0, 1, 2))
    x = logits.requires_grad_()
    assert torch.isnan(ltfast.diverse_expert_loss(x, target, torch.zeros(2, 5, device=device)))
    loss = ltfast.ride_loss(x, target)
    assert torch.isnan(loss)
    loss.backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("device", device_params())
def test_nan_logit_gives_nan_loss_and_gradients_in_its_row(device):
    logits, target, _ = make_inputs((4, 3, 6), torch.float32, device, ignored_rows=())
    logits[2, 1, 3] = float("nan")
    for fn in (lambda x: ltfast.diverse_expert_loss(x, target, torch.zeros(3, 6, device=device)),
               lambda x: ltfast.ride_loss(x, target)):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        assert torch.isnan(loss)
        assert torch.isnan(x.grad[2, 1]).all() and torch.isfinite(x.grad[0]).all()


def test_empty_batch():
    x = torch.zeros(0, 3, 5, requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64)
    assert torch.isnan(ltfast.diverse_expert_loss(x, y, torch.zeros(3, 5)))
    assert ltfast.diverse_expert_loss(x, y, torch.zeros(3, 5), reduction="none").shape == (0,)
    loss = ltfast.ride_loss(x, y)
    loss.backward()
    assert torch.isnan(loss) and x.grad.shape == (0, 3, 5)


@pytest.mark.parametrize("device", device_params())
def test_bad_inputs_name_the_argument(device):
    x = torch.randn(4, 3, 5, device=device)
    y = torch.tensor([0, 1, 2, 4], device=device)
    adj = torch.zeros(3, 5, device=device)
    with pytest.raises(ValueError, match=r"logits must be a 3-D tensor \[N, E, C\]"):
        ltfast.diverse_expert_loss(x[:, 0], y, adj)
    with pytest.raises(ValueError, match=r"adjustments must be a 2-D tensor \[E = 3, C = 5\]"):
        ltfast.diverse_expert_loss(x, y, torch.zeros(2, 5, device=device))
    with pytest.raises(ValueError, match="reduction must be"):
        ltfast.diverse_expert_loss(x, y, adj, reduction="avg")
    with pytest.raises(ValueError, match="target must have N = 4"):
        ltfast.ride_loss(x, y[:3])
    with pytest.raises(TypeError, match="target must be an int64"):
        ltfast.ride_loss(x, y.int())
    with pytest.raises(ValueError, match="target_margin must be a 1-D tensor of C = 5"):
        ltfast.ride_loss(x, y, target_margin=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="temperature must be a 1-D tensor of C = 5"):
        ltfast.ride_loss(x, y, temperature=torch.ones(5, 1, device=device))
    with pytest.raises(ValueError, match="base_temperature must be a finite number > 0"):
        ltfast.ride_loss(x, y, base_temperature=0.0)
    with pytest.raises(ValueError, match="diversity_factor must be finite"):
        ltfast.ride_loss(x, y, diversity_factor=float("inf"))
    with pytest.raises(ValueError, match="at least one expert"):
        ltfast.ride_loss(x[:, :0], y)
    with pytest.raises(RuntimeError, match="gradient with respect to `weight` is not implemented"):
        ltfast.ride_loss(x, y, weight=torch.ones(5, device=device, requires_grad=True))
    with pytest.raises(RuntimeError, match="gradient with respect to `adjustments` is not implemented"):
        ltfast.diverse_expert_loss(x, y, adj.clone().requires_grad_())


@pytest.mark.device_assert
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", ["ride_loss", "diverse_expert_loss"])
def test_target_out_of_range(op, device):
    """The CPU kernels raise IndexError naming the row; the CUDA kernels assert on the device (on a
    GPU this test's cuda variant runs in a child process: tests/conftest.py, device_assert)."""
    x = torch.randn(4, 3, 5, device=device)
    bad = torch.tensor([0, 1, 2, 5], device=device)
    call = {"ride_loss": lambda: ltfast.ride_loss(x, bad),
            "diverse_expert_loss": lambda: ltfast.diverse_expert_loss(x, bad, torch.zeros(3, 5, device=device))}[op]
    with expect_kernel_assert(device, IndexError, r"target\[3\] = 5", "target out of range"):
        call()


def test_modules_check_their_inputs():
    with pytest.raises(ValueError, match=r"E = 3 experts"):
        ltfast.nn.DiverseExpertLoss([5, 3, 2])(torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"C = 3 classes"):
        ltfast.nn.RIDELoss([5, 3, 2])(torch.randn(4, 2, 4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"3-D tensor \[N, E, C\]"):
        ltfast.nn.RIDELoss([5, 3, 2])(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="reweight_factor"):
        ltfast.nn.RIDELoss([5000, 1], reweight_factor=2.0)
    assert ltfast.nn.RIDELoss.takes_expert_logits and ltfast.nn.DiverseExpertLoss.takes_expert_logits


# ---------------------------------------------------------------------------- autograd, compile
@pytest.mark.parametrize("device", device_params())
def test_gradcheck_float64(device):
    logits, target, gen = make_inputs((5, 3, 6), torch.float64, device, ignored_rows=(2,))
    adjustments = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device)
    options = ride_options("drw", 6, gen, device)
    for fn in (lambda x: ltfast.diverse_expert_loss(x, target, adjustments, "none"),
               lambda x: ltfast.ride_loss(x, target, **options)):
        # nondet_tol: gradcheck's reentrancy check runs backward twice; the first returns the
        # forward-time gradient (CPU), the second the backward kernel's, equal up to rounding.
        assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-7,
                                        nondet_tol=1e-12)


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    logits, target, gen = make_inputs((6, 3, 7), torch.float32, device, ignored_rows=(4,))
    adjustments = torch.randn(3, 7, generator=gen).to(device)
    options = ride_options("drw", 7, gen, device)
    margin, weight, temperature = options["target_margin"], options["weight"], options["temperature"]
    grad_flags = (False, True)  # with_grad: the forward-time gradient of the CPU kernels (multi_expert.h)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = logits.to(dtype).requires_grad_()
        for reduction in ("mean", "none"):
            torch.library.opcheck(torch.ops.ltfast.diverse_expert_loss, (x, target, adjustments, reduction, IGNORE))
        for with_grad in grad_flags:
            torch.library.opcheck(torch.ops.ltfast._diverse_expert_loss_forward,
                                  (x.detach(), target, adjustments, "mean", IGNORE, with_grad))
        _, stats, denominator, _ = torch.ops.ltfast._diverse_expert_loss_forward(x.detach(), target, adjustments,
                                                                                 "mean", IGNORE)
        grad = torch.ones((), dtype=stats.dtype, device=device)
        torch.library.opcheck(torch.ops.ltfast._diverse_expert_loss_backward,
                              (grad, x.detach(), target, adjustments, stats, denominator, "mean", IGNORE))
        args = (x, target, margin, weight, temperature, 1.5, -0.2, IGNORE)
        torch.library.opcheck(torch.ops.ltfast.ride_loss, args)
        torch.library.opcheck(torch.ops.ltfast.ride_loss, (x, target, None, None, None, 1.0, -0.2, IGNORE))
        for with_grad in grad_flags:
            torch.library.opcheck(torch.ops.ltfast._ride_loss_forward, (x.detach(), *args[1:], with_grad))
        _, stats, denominators, _ = torch.ops.ltfast._ride_loss_forward(x.detach(), *args[1:])
        torch.library.opcheck(torch.ops.ltfast._ride_loss_backward,
                              (grad, x.detach(), target, margin, weight, temperature, stats, denominators, 1.5, -0.2,
                               IGNORE))


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    counts = [900, 300, 120, 40, 9, 3]
    sade = ltfast.nn.DiverseExpertLoss(counts).to(device)
    ride = ltfast.nn.RIDELoss(counts, drw_epoch=1).to(device)
    ride.set_epoch(1)

    def step(x, y):
        return sade(x, y) + ride(x, y)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        logits, target, _ = make_inputs((32, 3, 6), torch.float32, device, seed=seed, ignored_rows=(3,))
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got, want = compiled(x1, target), step(x2, target)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_reads_low_precision_and_returns_float32(dtype):
    logits, target, gen = make_inputs((8, 3, 10), dtype, "cpu")
    with torch.autocast("cpu", dtype=dtype):
        sade = ltfast.diverse_expert_loss(logits, target, torch.zeros(3, 10))
        ride = ltfast.ride_loss(logits, target)
    assert sade.dtype == torch.float32 and ride.dtype == torch.float32
    torch.testing.assert_close(ride.double(), reference.ride_loss(logits.double(), target), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- nn modules
def test_ride_module_drw_schedule_and_state_dict():
    counts = [500, 200, 50, 20, 5]
    logits, target, _ = make_inputs((16, 3, 5), torch.float64, "cpu")
    criterion = ltfast.nn.RIDELoss(counts, drw_epoch=2, reweight_factor=0.02)
    margin = 30.0 * priors.ldam_margins(counts, 0.5, dtype=torch.float64)
    before = reference.ride_loss(logits, target, margin)
    after = reference.ride_loss(logits, target, margin, priors.effective_number_weights(counts, dtype=torch.float64),
                                priors.ride_diversity_temperature(counts, 0.02))
    for epoch, expected in ((0, before), (1, before), (2, after), (3, after)):
        criterion.set_epoch(epoch)
        torch.testing.assert_close(criterion(logits, target), expected, rtol=1e-12, atol=1e-12)
    restored = ltfast.nn.RIDELoss(counts, drw_epoch=2)
    restored.load_state_dict(criterion.state_dict())
    assert restored.epoch == 3 and restored.reweighting
    never = ltfast.nn.RIDELoss(counts)
    never.set_epoch(500)
    torch.testing.assert_close(never(logits, target), before, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- compat vs originals
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,c", [(1, 10), (33, 37), (129, 100)])
@pytest.mark.parametrize("config", [
    dict(reweight_epoch=160, reweight_factor=0.02),                       # the survey's config
    dict(reweight_epoch=160, base_diversity_temperature=1.5, max_m=0.3, s=16, additional_diversity_factor=-0.4),
    dict(reweight_epoch=5, base_loss_factor=0.5),
])
def test_compat_ride_matches_original(config, n, c, dtype):
    counts = profile_counts(c)
    ours = ensemble.RIDELoss(cls_num_list=counts, **config)
    original = orig.OriginalRIDELoss(cls_num_list=counts, **config)
    stacked, target = experts_extra_info(n, c, dtype, absent=True)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for epoch in (1, config["reweight_epoch"] + 1):  # before and after DRW
        ours._hook_before_epoch(epoch)
        original._hook_before_epoch(epoch)
        results = []
        for loss_fn in (ours, original):
            x = stacked.detach().clone().requires_grad_(True)
            loss = loss_fn(output_logits=x.mean(1), target=target, extra_info={"logits": x.transpose(0, 1)})
            loss.backward()
            results.append((loss.detach(), x.grad))
        (loss, grad), (ref_loss, ref_grad) = results
        if epoch > config["reweight_epoch"] and dtype == torch.float64:
            # After DRW the original's Tbar is a float32 mean (.item() of float32 temperatures), ltfast's
            # the float64 mean of the same values: up to ~1e-6 relative apart at C = 100 (docs/migrating.md).
            tol = dict(rtol=2e-6, atol=2e-6 * ref_grad.abs().max().item())
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(grad, ref_grad, **tol)


def test_compat_ride_zero_diversity_and_no_extra_info():
    counts = profile_counts(12)
    ours = ensemble.RIDELoss(cls_num_list=counts, reweight_epoch=3, additional_diversity_factor=0.0)
    original = orig.OriginalRIDELoss(cls_num_list=counts, reweight_epoch=3, additional_diversity_factor=0.0)
    stacked, target = experts_extra_info(9, 12, torch.float64, absent=False)
    for epoch in (1, 4):
        ours._hook_before_epoch(epoch)
        original._hook_before_epoch(epoch)
        output = stacked.mean(1)
        extra = {"logits": stacked.transpose(0, 1)}
        torch.testing.assert_close(ours(output, target, extra), original(output, target, extra), rtol=1e-12, atol=0)
        torch.testing.assert_close(ours(output, target), original(output, target), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="base_loss_factor must be non-zero"):
        ensemble.RIDELoss(cls_num_list=counts, base_loss_factor=0.0)


def test_direct_entry_points_match_the_dispatcher_path():
    if not ltfast._extension.AVAILABLE:
        pytest.skip("needs the compiled extension")
    from torch.overrides import TorchFunctionMode
    logits, target, gen = make_inputs((5, 3, 8), torch.float32, "cpu")
    options = ride_options("drw", 8, gen, "cpu")
    adjustments = torch.randn(3, 8, generator=gen)
    fast = ltfast._dispatch.fast
    direct = fast.ride_loss(logits, target, options["target_margin"], options["weight"], options["temperature"], 1.5,
                            -0.3, IGNORE)
    assert torch.equal(direct, ltfast.ride_loss(logits, target, **options))
    assert torch.equal(direct, torch.ops.ltfast.ride_loss.default(logits, target, options["target_margin"],
                                                                  options["weight"], options["temperature"], 1.5,
                                                                  -0.3, IGNORE))
    direct = fast.diverse_expert_loss(logits, target, adjustments, "none", IGNORE)
    assert torch.equal(direct, torch.ops.ltfast.diverse_expert_loss.default(logits, target, adjustments, "none",
                                                                            IGNORE))
    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():  # a mode on the stack: the entry point declines, the functional still works
        assert fast.diverse_expert_loss(logits, target, adjustments, "none", IGNORE) is NotImplemented
        assert torch.equal(ltfast.diverse_expert_loss(logits, target, adjustments, "none"), direct)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["sade_mean", "sade_none", "ride"])
def test_forward_time_gradient_equals_backward_kernel(op, dtype):
    # CPU: with the logits requiring grad, the forward also writes the gradient (multi_expert.h); the
    # backward returns it for an upstream gradient of exactly 1 and runs the backward kernel otherwise.
    logits, target, gen = make_inputs((9, 3, 1000), dtype, "cpu")
    adjustments = torch.randn(3, 1000, generator=gen)
    options = ride_options("drw", 1000, gen, "cpu")
    if op == "ride":
        forward = torch.ops.ltfast._ride_loss_forward
        args = (target, options["target_margin"], options["weight"], options["temperature"], 1.5, -0.3, IGNORE)
        backward = lambda g, stats, den: torch.ops.ltfast._ride_loss_backward(  # noqa: E731
            g, logits, *args[:4], stats, den, 1.5, -0.3, IGNORE)
    else:
        reduction = op.split("_")[1]
        forward = torch.ops.ltfast._diverse_expert_loss_forward
        args = (target, adjustments, reduction, IGNORE)
        backward = lambda g, stats, den: torch.ops.ltfast._diverse_expert_loss_backward(  # noqa: E731
            g, logits, target, adjustments, stats, den, reduction, IGNORE)
    loss, stats, den, grad = forward(logits, *args, True)
    plain = forward(logits, *args, False)
    assert plain[3].numel() == 0 and grad.shape == logits.shape and grad.dtype == logits.dtype
    torch.testing.assert_close(loss, plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats, plain[1], rtol=1e-6, atol=1e-6)
    expected = backward(torch.ones_like(loss), stats, den)
    tol = TOL[dtype]
    torch.testing.assert_close(grad.double(), expected.double(), rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * 1e-2)
    assert (grad[1] == 0).all() and (grad[4] == 0).all()
    # Through autograd: upstream 1 takes the saved gradient, upstream 0.5 the backward kernel.
    functional = ((lambda x: ltfast.ride_loss(x, target, **options)) if op == "ride"
                  else (lambda x: ltfast.diverse_expert_loss(x, target, adjustments, op.split("_")[1])))
    for scale in (1.0, 0.5):
        x = logits.clone().requires_grad_()
        out = functional(x)
        (got,) = torch.autograd.grad(out, x, torch.full_like(out, scale))
        torch.testing.assert_close(got.double(), scale * expected.double(), rtol=tol["rtol"],
                                   atol=tol["atol"] + tol["rtol"] * 1e-2)


def test_forward_time_gradient_with_retain_graph_and_create_graph():
    logits, target, _ = make_inputs((6, 3, 11), torch.float64, "cpu")
    x = logits.clone().requires_grad_()
    loss = ltfast.ride_loss(x, target)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    first.mul_(0)  # the caller owns the gradient it got; a second backward is unaffected
    (second,) = torch.autograd.grad(loss, x)
    x64 = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.ride_loss(x64, target), x64)
    torch.testing.assert_close(second, expected, rtol=1e-9, atol=1e-12)
    (with_graph,) = torch.autograd.grad(ltfast.ride_loss(x, target), x, create_graph=True)
    torch.testing.assert_close(with_graph, expected, rtol=1e-9, atol=1e-12)
