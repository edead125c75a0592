"""Soft targets of the fused cross-entropy family (ltfast/soft_targets.py): mixed (mixup) targets
against the lambda combination of F.cross_entropy, probability targets against F.cross_entropy with
a floating target, per-class label smoothing against F.cross_entropy's formula row by row; values,
gradients, dtypes, reductions, ignore_index, opcheck, gradcheck, torch.compile, ltfast.nn and bad
inputs, on `cpu`, `cuda` and `simt` (the CUDA kernels in the emulator)."""
import math

import pytest
import torch
import torch.nn.functional as F

import ltfast
from ltfast import reference
from conftest import device_params, expect_kernel_assert

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 2), (7, 10), (129, 1000), (3, 8142)]  # the three row-group sizes of the CUDA kernels
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
}


def _counts(C, g):
    return torch.randint(1, 1000, (C,), generator=g).double()


# Keyword arguments of ltfast.mixed_cross_entropy (besides the targets and lambda).
MIXED_VARIANTS = {
    "cross_entropy": lambda C, g: dict(),
    "balanced_softmax": lambda C, g: dict(adjustment=ltfast.priors.log_prior(_counts(C, g))),
    "weighted_smoothing": lambda C, g: dict(weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
                                            label_smoothing=0.2),
    "focal_weighted_adjusted": lambda C, g: dict(gamma=2.0, weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
                                                 adjustment=torch.randn(C, generator=g, dtype=torch.float64)),
    "class_smoothing_weighted": lambda C, g: dict(label_smoothing=0.3 * torch.rand(C, generator=g, dtype=torch.float64),
                                                  weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
                                                  adjustment=torch.randn(C, generator=g, dtype=torch.float64)),
}

PROBABILITY_VARIANTS = {
    "cross_entropy": lambda C, g: dict(),
    "balanced_softmax": lambda C, g: dict(adjustment=ltfast.priors.log_prior(_counts(C, g))),
    "smoothing_weighted_adjusted": lambda C, g: dict(label_smoothing=0.2,
                                                     weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
                                                     adjustment=torch.randn(C, generator=g, dtype=torch.float64)),
}


def _vectors(kwargs, device, dtype):
    """Class vectors in the accumulation dtype on `device` (float64 for the reference)."""
    return {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v) else v) for k, v in kwargs.items()}


def _make(shape, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    N, C = shape
    logits = (torch.randn(N, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    target_a = torch.randint(0, C, (N,), generator=g)
    target_b = torch.randint(0, C, (N,), generator=g)
    if N > 4:  # ignored rows: in a only, in b only, in both
        target_a[1] = IGNORE
        target_b[2] = IGNORE
        target_a[4] = target_b[4] = IGNORE
    if N > 3:
        target_b[3] = target_a[3]  # both terms on the same class
    return logits.to(device), target_a.to(device), target_b.to(device), g


def _compare(loss, logits, expected, logits64, g, dtype):
    grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64).to(expected.device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out.to(loss.dtype))
    (expected_grad,) = torch.autograd.grad(expected, logits64, grad_out)
    assert loss.dtype == dtype and loss.shape == expected.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    scale = expected_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


def _mixed_case(variant, shape, dtype, reduction, device, mix):
    logits, a, b, g = _make(shape, dtype, device)
    kwargs = MIXED_VARIANTS[variant](shape[1], g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if mix == "rows":
        lam = torch.rand(shape[0], generator=g, dtype=torch.float64)
    elif mix == "tensor":
        lam = torch.tensor(0.35, dtype=torch.float64)
    else:
        lam = 0.35
    lam_op = lam.to(device=device, dtype=acc) if torch.is_tensor(lam) else lam
    x = logits.detach().requires_grad_()
    loss = ltfast.mixed_cross_entropy(x, a, b, lam_op, reduction=reduction, ignore_index=IGNORE,
                                      **_vectors(kwargs, device, acc))
    x64 = logits.detach().double().requires_grad_()
    lam64 = lam.to(device) if torch.is_tensor(lam) else lam
    expected = reference.mixed_cross_entropy(x64, a, b, lam64, reduction=reduction, ignore_index=IGNORE,
                                             **_vectors(kwargs, device, torch.float64))
    _compare(loss, x, expected, x64, g, dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", [v for v in MIXED_VARIANTS if v != "cross_entropy"])
def test_mixed_matches_lambda_combination(variant, shape, dtype, reduction, device):
    """Per-row lambda over the full matrix (the general case); scalar forms and the plain
    cross-entropy below (the plain case is also test_mixed_is_exactly_the_f_cross_entropy_combination)."""
    _mixed_case(variant, shape, dtype, reduction, device, "rows")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mix", ["float", "tensor"])
@pytest.mark.parametrize("variant", list(MIXED_VARIANTS))
def test_mixed_scalar_lambda(variant, mix, reduction, device):
    _mixed_case(variant, (33, 70), torch.float32, reduction, device, mix)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixed_is_exactly_the_f_cross_entropy_combination(reduction, device):
    """With a float lambda: lam * F.cross_entropy(z, a, w, eps) + (1 - lam) * F.cross_entropy(z, b, w, eps),
    with ignored rows (each term's mean over its own rows), to float32 rounding."""
    logits, a, b, g = _make((40, 17), torch.float32, device)
    w = (torch.rand(17, generator=g) + 0.5).to(device)
    lam = 0.7
    got = ltfast.mixed_cross_entropy(logits, a, b, lam, weight=w, label_smoothing=0.1, reduction=reduction)
    want = (lam * F.cross_entropy(logits, a, weight=w, label_smoothing=0.1, reduction=reduction) +
            (1 - lam) * F.cross_entropy(logits, b, weight=w, label_smoothing=0.1, reduction=reduction))
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_mixed_equals_probability_targets_of_the_mixed_one_hots(reduction, device):
    """Mixup's two formulations agree: hard targets mixed by lambda per row, and F.cross_entropy
    with the probability target lam * onehot(a) + (1 - lam) * onehot(b) (weighted, smoothed)."""
    logits, a, b, g = _make((25, 12), torch.float64, device)
    a, b = a.clamp(min=0), b.clamp(min=0)
    lam = torch.rand(25, generator=g, dtype=torch.float64).to(device)
    w = (torch.rand(12, generator=g, dtype=torch.float64) + 0.5).to(device)
    soft = lam[:, None] * F.one_hot(a, 12) + (1 - lam[:, None]) * F.one_hot(b, 12)
    got = ltfast.mixed_cross_entropy(logits, a, b, lam, weight=w, label_smoothing=0.1, reduction=reduction)
    want = F.cross_entropy(logits, soft, weight=w, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_probability = ltfast.adjusted_cross_entropy(logits, soft, weight=w, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(got_probability, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", [v for v in PROBABILITY_VARIANTS if v != "cross_entropy"])
def test_probability_targets_match_f_cross_entropy(variant, shape, dtype, reduction, device):
    logits, _, _, g = _make(shape, dtype, device)
    kwargs = PROBABILITY_VARIANTS[variant](shape[1], g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Sharp and flat rows, and exact zeros (a zero probability contributes nothing).
    target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 4, dim=1)
    target[0, : shape[1] // 2] = 0.0
    target = (target / target.sum(1, keepdim=True)).to(dtype).to(device)
    x = logits.detach().requires_grad_()
    loss = ltfast.adjusted_cross_entropy(x, target, reduction=reduction, **_vectors(kwargs, device, acc))
    x64 = logits.detach().double().requires_grad_()
    expected = reference.probability_cross_entropy(x64, target.double(), reduction=reduction,
                                                   **_vectors(kwargs, device, torch.float64))
    _compare(loss, x, expected, x64, g, dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probability_targets_plain(dtype, reduction, device):
    test_probability_targets_match_f_cross_entropy("cross_entropy", (33, 70), dtype, reduction, device)


@pytest.mark.parametrize("device", device_params())
def test_probability_target_in_float32_with_bfloat16_logits(device):
    """A float32 target with bf16 logits (what autocast produces) is read in float32, not rounded."""
    logits, _, _, g = _make((9, 300), torch.bfloat16, device)
    target = torch.softmax(torch.randn(9, 300, generator=g), dim=1).to(device)
    x = logits.detach().requires_grad_()
    loss = ltfast.probability_cross_entropy(x, target, reduction="none")
    x64 = logits.detach().double().requires_grad_()
    expected = F.cross_entropy(x64, target.double(), reduction="none")
    _compare(loss, x, expected, x64, g, torch.bfloat16)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_per_class_smoothing_single_target(shape, reduction, device):
    """label_smoothing as a [C] tensor, one target per row (margin and weight included)."""
    logits, a, _, g = _make(shape, torch.float32, device)
    C = shape[1]
    kwargs = dict(label_smoothing=0.3 * torch.rand(C, generator=g, dtype=torch.float64),
                  weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
                  target_margin=torch.rand(C, generator=g, dtype=torch.float64))
    x = logits.detach().requires_grad_()
    loss = ltfast.adjusted_cross_entropy(x, a, reduction=reduction, **_vectors(kwargs, device, torch.float32))
    x64 = logits.detach().double().requires_grad_()
    expected = reference.mixed_cross_entropy(x64, a, reduction=reduction, **_vectors(kwargs, device, torch.float64))
    _compare(loss, x, expected, x64, g, torch.float32)


@pytest.mark.parametrize("device", device_params())
def test_constant_per_class_smoothing_is_the_scalar_smoothing(device):
    logits, a, b, g = _make((30, 50), torch.float64, device)
    w = (torch.rand(50, generator=g, dtype=torch.float64) + 0.5).to(device)
    eps = torch.full((50,), 0.15, dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(ltfast.adjusted_cross_entropy(logits, a, weight=w, label_smoothing=eps,
                                                                 reduction=reduction),
                                   F.cross_entropy(logits, a, weight=w, label_smoothing=0.15, reduction=reduction))
        torch.testing.assert_close(
            ltfast.mixed_cross_entropy(logits, a, b, 0.25, weight=w, label_smoothing=eps, reduction=reduction),
            ltfast.mixed_cross_entropy(logits, a, b, 0.25, weight=w, label_smoothing=0.15, reduction=reduction))
    # and the reference's own row-by-row formula agrees with F.cross_entropy's
    torch.testing.assert_close(reference.mixed_cross_entropy(logits, a, weight=w, label_smoothing=eps),
                               F.cross_entropy(logits, a, weight=w, label_smoothing=0.15))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixed_ignore_index_and_all_ignored(reduction, device):
    logits, a, b, g = _make((12, 9), torch.float32, device)
    a, b = a.clamp(min=0), b.clamp(min=0)
    a[5], b[6] = 7, 7
    lam = torch.rand(12, generator=g).to(device)
    x = logits.clone().requires_grad_()
    got = ltfast.mixed_cross_entropy(x, a, b, lam, label_smoothing=0.1, reduction=reduction, ignore_index=7)
    want = reference.mixed_cross_entropy(logits, a, b, lam, label_smoothing=0.1, reduction=reduction, ignore_index=7)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    none_a, none_b = torch.full_like(a, IGNORE), torch.full_like(b, IGNORE)
    loss = ltfast.mixed_cross_entropy(x, none_a, none_b, lam, reduction=reduction)
    if reduction == "mean":  # 0 / 0 in each term, as F.cross_entropy
        assert torch.isnan(loss)
    else:
        assert torch.equal(loss, torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", device_params())
def test_empty_batch(device):
    x = torch.zeros(0, 5, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64, device=device)
    assert torch.isnan(ltfast.mixed_cross_entropy(x, y, y, 0.5))
    assert ltfast.mixed_cross_entropy(x, y, y, 0.5, reduction="sum").item() == 0.0
    assert torch.isnan(ltfast.probability_cross_entropy(x, torch.zeros(0, 5, device=device)))
    loss = ltfast.probability_cross_entropy(x, torch.zeros(0, 5, device=device), reduction="sum")
    loss.backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("device", device_params())
def test_non_finite_logits(device):
    """-inf (impossible class), +inf and NaN give what F.cross_entropy gives; a wide row with a whole
    tile of -inf (CPU tiles of 2048 classes) too."""
    C = 2500
    logits = torch.randn(5, C, dtype=torch.float64)
    logits[0, :2100] = float("-inf")   # a whole -inf tile; the targets are in the finite part
    logits[1, 7] = float("-inf")
    logits[2, 3] = float("inf")
    logits[3, 9] = float("nan")
    logits = logits.to(device)
    a = torch.tensor([2200, 1, 0, 2, 5], device=device)
    b = torch.tensor([2300, 2, 1, 3, 6], device=device)
    got = ltfast.mixed_cross_entropy(logits, a, b, 0.4, reduction="none")
    want = reference.mixed_cross_entropy(logits, a, b, 0.4, reduction="none")
    torch.testing.assert_close(got, want, equal_nan=True)
    smoothed = ltfast.mixed_cross_entropy(logits, a, b, 0.4, label_smoothing=0.1, reduction="none")
    assert smoothed[0] == float("inf") and smoothed[1] == float("inf")  # -inf logits with eps > 0, as F
    target = torch.softmax(torch.randn(5, C, dtype=torch.float64), 1).to(device)
    target[0, :2100] = 0.0
    target[1, 7] = 0.0
    got = ltfast.probability_cross_entropy(logits, target, reduction="none")
    want = F.cross_entropy(logits, target, reduction="none")  # 0 * log(0) is NaN in PyTorch's formula
    torch.testing.assert_close(got, want, equal_nan=True)


# float32 offsets up to 1e30 (issue 19 §4.2): loss and gradient from (a - max) - log_sum at any
# magnitude, against float64 on the float32 adjusted logits shifted by their row max.
LARGE_OFFSETS = [1e4, 1e6, 1e8, 1e10, 1e20, 1e30]


def _large_logits(offset, g, shape=(16, 10)):
    """offset + a spread of 3 or of 8 float32 ulps of the offset (whichever is larger); row 0 a tie."""
    ulp = 2.0 ** (math.floor(math.log2(offset)) - 23)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * max(3.0, 8 * ulp) + offset).float()
    logits[0] = offset
    return logits


def _shifted_float64(logits32, adjustment):
    """(float64 logits to differentiate, their float32-rounded adjusted values shifted by the row max)."""
    z = logits32.double().requires_grad_()
    adjusted32 = logits32 if adjustment is None else logits32 + adjustment.float()
    adjusted = z + (adjusted32.double() - logits32.double())
    return z, adjusted - adjusted.detach().amax(-1, keepdim=True)


def _assert_close_at_scale(got, expected, what):
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(got.double(), expected.detach(), rtol=2e-5, atol=2e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def _assert_loss_and_grad_at_scale(loss, x, expected, z, offset):
    """The [16] per-row loss and its gradient (under a non-uniform upstream) against the float64
    reference computed on the shifted logits z."""
    _assert_close_at_scale(loss, expected, f"offset {offset} loss")
    upstream = torch.linspace(0.5, 1.5, 16, dtype=torch.float64, device=loss.device)
    (grad,) = torch.autograd.grad(loss, x, upstream.float())
    (expected_grad,) = torch.autograd.grad(expected, z, upstream)
    _assert_close_at_scale(grad, expected_grad, f"offset {offset} grad")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", ["cross_entropy", "balanced_softmax", "weighted_smoothing",
                                     "class_smoothing_weighted"])
def test_mixed_large_logits_match_float64(variant, device):
    g = torch.Generator().manual_seed(41)
    kwargs = MIXED_VARIANTS[variant](10, g)
    adjustment = kwargs.pop("adjustment", None)
    a = torch.randint(0, 10, (16,), generator=g).to(device)
    b = torch.randint(0, 10, (16,), generator=g).to(device)
    lam = torch.rand(16, generator=g, dtype=torch.float64).to(device)
    for offset in LARGE_OFFSETS:
        logits = _large_logits(offset, g).to(device)
        x = logits.clone().requires_grad_()
        loss = ltfast.mixed_cross_entropy(x, a, b, lam.float(), reduction="none",
                                          adjustment=None if adjustment is None else adjustment.float().to(device),
                                          **_vectors(kwargs, device, torch.float32))
        z, shifted = _shifted_float64(logits, None if adjustment is None else adjustment.to(device))
        expected = reference.mixed_cross_entropy(shifted, a, b, lam, reduction="none",
                                                 **_vectors(kwargs, device, torch.float64))
        _assert_loss_and_grad_at_scale(loss, x, expected, z, offset)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", list(PROBABILITY_VARIANTS))
def test_probability_large_logits_match_float64(variant, device):
    g = torch.Generator().manual_seed(43)
    kwargs = PROBABILITY_VARIANTS[variant](10, g)
    adjustment = kwargs.pop("adjustment", None)
    target = torch.softmax(torch.randn(16, 10, generator=g, dtype=torch.float64) * 2, 1).to(device)
    for offset in LARGE_OFFSETS:
        logits = _large_logits(offset, g).to(device)
        x = logits.clone().requires_grad_()
        loss = ltfast.probability_cross_entropy(x, target.float(), reduction="none",
                                                adjustment=None if adjustment is None else adjustment.float().to(device),
                                                **_vectors(kwargs, device, torch.float32))
        z, shifted = _shifted_float64(logits, None if adjustment is None else adjustment.to(device))
        expected = reference.probability_cross_entropy(shifted, target, reduction="none",
                                                       **_vectors(kwargs, device, torch.float64))
        _assert_loss_and_grad_at_scale(loss, x, expected, z, offset)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_label_smoothing_with_impossible_target_is_inf_as_f_cross_entropy(dtype, device):
    """Issue 19 §4.6: a target logit of -inf with label smoothing is +inf in F.cross_entropy (NaN with a
    zero target weight), in each mixed term and with per-class smoothing; gradients as PyTorch's
    (finite: p = 0 at the impossible class)."""
    g = torch.Generator().manual_seed(47)
    C = 9
    logits = torch.randn(6, C, generator=g, dtype=torch.float64).to(dtype)
    a = torch.tensor([2, 0, 4, 7, 1, 3])
    b = torch.tensor([5, 3, 4, 2, 8, 6])
    logits[0, 2] = float("-inf")                            # term a's target
    logits[1, 3] = float("-inf")                            # term b's target
    logits[2, 4] = float("-inf")                            # both terms' target
    logits[3, 7] = logits[3, 2] = float("-inf")             # both targets, different classes
    logits[4, 0] = float("-inf")                            # a non-target class (already +inf)
    logits, a, b = logits.to(device), a.to(device), b.to(device)
    lam = torch.rand(6, generator=g, dtype=torch.float64).to(device)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device)
    zero_weight = weight.clone()
    zero_weight[2] = 0.0                                     # 0 * inf in rows 0 and 3: NaN in PyTorch
    class_eps = (0.3 * torch.rand(C, generator=g, dtype=torch.float64)).to(device)
    cases = [(dict(label_smoothing=0.1), ()), (dict(label_smoothing=0.25, weight=weight), ()),
             (dict(label_smoothing=0.1, weight=zero_weight), (0, 3)), (dict(label_smoothing=class_eps, weight=weight), ())]
    for kwargs, nan_rows in cases:
        x = logits.clone().requires_grad_()
        loss = ltfast.mixed_cross_entropy(x, a, b, lam.to(dtype), reduction="none", **_vectors(kwargs, device, dtype))
        x_ref = logits.clone().requires_grad_()
        expected = reference.mixed_cross_entropy(x_ref, a, b, lam.to(dtype), reduction="none",
                                                  **_vectors(kwargs, device, dtype))
        # the case of the issue, as the reference (F.cross_entropy) has it
        assert all(expected[i].isnan() if i in nan_rows else expected[i].isinf() for i in range(5))
        torch.testing.assert_close(loss, expected.detach(), equal_nan=True, msg=lambda m: f"{kwargs}: {m}")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x_ref)
        torch.testing.assert_close(grad, expected_grad, equal_nan=True, msg=lambda m: f"{kwargs} grad: {m}")
        if nan_rows:
            continue  # row 3's single target: ltfast +inf, PyTorch NaN from class 2's 0 * inf (documented)
        # a single target (the hard-target smoothing path of mixed_cross_entropy)
        x = logits.clone().requires_grad_()
        loss = ltfast.mixed_cross_entropy(x, a, reduction="none", **_vectors(kwargs, device, dtype))
        expected = reference.mixed_cross_entropy(logits, a, reduction="none", **_vectors(kwargs, device, dtype))
        torch.testing.assert_close(loss, expected, equal_nan=True, msg=lambda m: f"{kwargs} single: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_probability_target_of_inf_is_inf_as_f_cross_entropy(dtype, device):
    """Issue 19 §4.6: an entry of +inf in a probability target makes F.cross_entropy +inf, also where it
    sits on the row's largest logit (inf * 0 there must not turn into NaN), and an impossible class
    (-inf logit) with label smoothing +inf; gradients with PyTorch's pattern of inf and NaN."""
    g = torch.Generator().manual_seed(53)
    C = 7
    logits = torch.randn(5, C, generator=g, dtype=torch.float64).to(dtype)
    target = torch.softmax(torch.randn(5, C, generator=g, dtype=torch.float64), 1).to(dtype)
    target[0, 3] = float("inf")
    target[1, int(logits[1].argmax())] = float("inf")      # on the row max
    logits[2, 5] = float("-inf")                           # an impossible class with probability
    target[3, 1] = float("inf")
    logits[3, 4] = float("-inf")
    logits, target = logits.to(device), target.to(device)
    for label_smoothing in (0.0, 0.2):
        x = logits.clone().requires_grad_()
        loss = ltfast.probability_cross_entropy(x, target, label_smoothing=label_smoothing, reduction="none")
        x_ref = logits.clone().requires_grad_()
        expected = F.cross_entropy(x_ref, target, label_smoothing=label_smoothing, reduction="none")
        assert expected[:4].isinf().all() and torch.isfinite(expected[4])
        torch.testing.assert_close(loss, expected.detach(), equal_nan=True)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x_ref)
        torch.testing.assert_close(grad, expected_grad, equal_nan=True)


@pytest.mark.parametrize("device", device_params())
def test_gradcheck_float64(device):
    logits, a, b, g = _make((7, 9), torch.float64, device)
    adjustment = torch.randn(9, generator=g, dtype=torch.float64).to(device)
    w = (torch.rand(9, generator=g, dtype=torch.float64) + 0.5).to(device)
    eps = (0.3 * torch.rand(9, generator=g, dtype=torch.float64)).to(device)
    lam = torch.rand(7, generator=g, dtype=torch.float64).to(device)
    target = torch.softmax(torch.randn(7, 9, generator=g, dtype=torch.float64), 1).to(device)
    margin = torch.rand(9, generator=g, dtype=torch.float64).to(device)
    for reduction in REDUCTIONS:
        inputs = (logits.clone().requires_grad_(), adjustment.clone().requires_grad_())
        assert torch.autograd.gradcheck(
            lambda x, adj: ltfast.mixed_cross_entropy(x, a, b, lam, adjustment=adj, weight=w, label_smoothing=eps,
                                                      reduction=reduction), inputs, eps=1e-6, atol=1e-7)
        assert torch.autograd.gradcheck(
            lambda x, adj: ltfast.probability_cross_entropy(x, target, adjustment=adj, weight=w, label_smoothing=0.1,
                                                            reduction=reduction), inputs, eps=1e-6, atol=1e-7)
        inputs = (logits.clone().requires_grad_(), margin.clone().requires_grad_())
        assert torch.autograd.gradcheck(
            lambda x, m: ltfast.adjusted_cross_entropy(x, a, target_margin=m, label_smoothing=eps,
                                                       reduction=reduction), inputs, eps=1e-6, atol=1e-7)


def _opcheck_samples(device):
    logits, a, b, g = _make((8, 13), torch.float32, device)
    prior = ltfast.priors.log_prior(_counts(13, g)).float().to(device)
    w = (torch.rand(13, generator=g) + 0.5).to(device)
    eps = (0.2 * torch.rand(13, generator=g)).to(device)
    lam = torch.rand(8, generator=g).to(device)
    target = torch.softmax(torch.randn(8, 13, generator=g), 1).to(device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = logits.to(dtype).requires_grad_()
        t = target.to(dtype)
        for reduction in REDUCTIONS:
            yield torch.ops.ltfast.mixed_cross_entropy, (x, a, b, lam, 1.0, prior, None, w, 0.0, 0.1, None,
                                                         reduction, IGNORE)
            yield torch.ops.ltfast._mixed_cross_entropy_forward, (x, a, b, None, 0.3, None, None, w, 1.5, 0.0, None,
                                                                  reduction, IGNORE)
            yield torch.ops.ltfast._mixed_cross_entropy_forward, (x, a, None, None, 1.0, prior, prior.abs(), None,
                                                                  0.0, 0.0, eps, reduction, IGNORE)
            yield torch.ops.ltfast.probability_cross_entropy, (x, t, prior, w, 0.1, reduction)
            yield torch.ops.ltfast._probability_cross_entropy_forward, (x, t, None, None, 0.0, reduction)


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", device_params())
def test_opcheck_backward_ops(device):
    logits, a, b, g = _make((8, 13), torch.float32, device)
    w = (torch.rand(13, generator=g) + 0.5).to(device)
    lam = torch.rand(8, generator=g).to(device)
    target = torch.softmax(torch.randn(8, 13, generator=g), 1).to(device)
    for reduction in REDUCTIONS:
        loss, stats, denom = torch.ops.ltfast._mixed_cross_entropy_forward(
            logits, a, b, lam, 1.0, None, None, w, 0.0, 0.1, None, reduction, IGNORE)
        torch.library.opcheck(torch.ops.ltfast._mixed_cross_entropy_backward,
                              (torch.ones_like(loss), logits, a, b, lam, 1.0, None, None, w, stats, denom, 0.0, 0.1,
                               None, reduction, IGNORE))
        loss, stats, denom = torch.ops.ltfast._probability_cross_entropy_forward(logits, target, None, w, 0.1,
                                                                                 reduction)
        torch.library.opcheck(torch.ops.ltfast._probability_cross_entropy_backward,
                              (torch.ones_like(loss), logits, target, None, w, stats, denom, 0.1, reduction))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    counts = [500, 100, 20, 5, 3, 200, 40]
    bs = ltfast.nn.BalancedSoftmaxLoss(counts).to(device)
    ce = ltfast.nn.CrossEntropyLoss(label_smoothing=torch.linspace(0.0, 0.3, 7)).to(device)
    focal = ltfast.nn.FocalLoss(weight=torch.rand(7) + 0.5).to(device)

    def step(x, y_a, y_b, lam, soft):
        return (bs(x, y_a, target_b=y_b, mix_weight=lam) + ce(x, y_a) + focal(x, y_a, target_b=y_b, mix_weight=lam)
                + bs(x, soft) + ltfast.adjusted_cross_entropy(x, y_a, target_b=y_b, mix_weight=0.25))

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for seed in range(3):  # different values, same shapes: no recompilation needed
        logits, a, b, g = _make((16, 7), torch.float32, device, seed=seed)
        lam = torch.rand((), generator=g).to(device)
        soft = torch.softmax(torch.randn(16, 7, generator=g), 1).to(device)
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got = compiled(x1, a, b, lam, soft)
        want = step(x2, a, b, lam, soft)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("device", device_params())
def test_saves_only_row_statistics(device):
    """Backward keeps the logits and per-row statistics (and the probability target it must read),
    never a new [N, C] buffer."""
    N, C = 64, 100
    logits, a, b, g = _make((N, C), torch.float32, device)
    logits.requires_grad_()
    lam = torch.rand(N, generator=g).to(device)
    target = torch.softmax(torch.randn(N, C, generator=g), 1).to(device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ltfast.mixed_cross_entropy(logits, a, b, lam, label_smoothing=0.1)
        ltfast.probability_cross_entropy(logits, target)
    large = [t for t in saved if t.numel() >= N * C]
    assert all(t.data_ptr() in (logits.data_ptr(), target.data_ptr()) for t in large), [t.shape for t in large]
    assert all(t.numel() in (1, 2, N, 2 * N, 3 * N, C, N * C) for t in saved)


@pytest.mark.parametrize("device", device_params())
def test_deterministic(device):
    logits, a, b, g = _make((513, 1000), torch.float32, device)
    lam = torch.rand(513, generator=g).to(device)
    target = torch.softmax(torch.randn(513, 1000, generator=g), 1).to(device)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss = (ltfast.mixed_cross_entropy(x, a, b, lam, label_smoothing=0.1)
                + ltfast.probability_cross_entropy(x, target))
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------ ltfast.nn
COUNTS = [400, 120, 60, 20, 9, 4, 2]


def _modules():
    w = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    return {
        "CrossEntropyLoss": (ltfast.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1),
                             dict(weight=w, label_smoothing=0.1)),
        "BalancedSoftmaxLoss": (ltfast.nn.BalancedSoftmaxLoss(COUNTS, label_smoothing=0.05),
                                dict(adjustment=ltfast.priors.log_prior(COUNTS, dtype=torch.float64),
                                     label_smoothing=0.05)),
        "LogitAdjustedLoss": (ltfast.nn.LogitAdjustedLoss(COUNTS, tau=0.5),
                              dict(adjustment=0.5 * ltfast.priors.log_prior(COUNTS, dtype=torch.float64))),
        "WeightedCrossEntropyLoss": (ltfast.nn.WeightedCrossEntropyLoss(COUNTS),
                                     dict(weight=ltfast.priors.survey_class_weights(COUNTS, dtype=torch.float64))),
        "FocalLoss": (ltfast.nn.FocalLoss(gamma=2.0, weight=w), dict(gamma=2.0, weight=w)),
    }


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(_modules()))
def test_modules_mixed_and_probability_targets(name, device):
    module, kwargs = _modules()[name]
    module = module.to(device)
    assert type(module).supports_mixed_targets is True
    kwargs = _vectors(kwargs, device, torch.float64)
    logits, a, b, g = _make((20, 7), torch.float64, device)
    lam = torch.rand(20, generator=g, dtype=torch.float64).to(device)
    for mix in (lam, 0.3):
        torch.testing.assert_close(module(logits, a, target_b=b, mix_weight=mix),
                                   reference.mixed_cross_entropy(logits, a, b, mix, **kwargs))
    soft = torch.softmax(torch.randn(20, 7, generator=g, dtype=torch.float64), 1).to(device)
    if name == "FocalLoss":
        with pytest.raises(ValueError, match="gamma"):
            module(logits, soft)
    else:
        torch.testing.assert_close(module(logits, soft), reference.probability_cross_entropy(logits, soft, **kwargs))


@pytest.mark.parametrize("device", device_params())
def test_cross_entropy_loss_is_a_drop_in(device):
    logits, a, b, g = _make((30, 11), torch.float32, device)
    w = (torch.rand(11, generator=g) + 0.5)
    soft = torch.softmax(torch.randn(30, 11, generator=g), 1).to(device)
    for reduction in REDUCTIONS:
        ours = ltfast.nn.CrossEntropyLoss(w, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1).to(device)
        theirs = torch.nn.CrossEntropyLoss(w, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1).to(device)
        torch.testing.assert_close(ours(logits, a), theirs(logits, a))
        torch.testing.assert_close(ours(logits, soft), theirs(logits, soft))
    with pytest.raises(ValueError, match="deprecated"):
        ltfast.nn.CrossEntropyLoss(size_average=True)


def test_ldam_per_class_smoothing_and_refusals():
    eps = torch.linspace(0.0, 0.2, 7)
    module = ltfast.nn.LDAMLoss(COUNTS, label_smoothing=eps, drw_epoch=0)
    assert ltfast.nn.LDAMLoss.supports_mixed_targets is False
    assert "class_label_smoothing" in module.state_dict() and "per-class" in repr(module)
    logits, a, b, _ = _make((15, 7), torch.float64, "cpu")
    torch.testing.assert_close(module(logits, a),
                               reference.mixed_cross_entropy(logits, a, target_margin=module.target_margin,
                                                             weight=module.drw_weight, label_smoothing=eps.double()))
    with pytest.raises(ValueError, match="target_margin.*target_b"):
        module(logits, a, target_b=b, mix_weight=0.5)
    with pytest.raises(ValueError, match="target_margin"):
        module(logits, torch.softmax(logits, 1))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ltfast.nn.CrossEntropyLoss(label_smoothing=torch.tensor([0.1, 1.5]))


# ------------------------------------------------------------------------------ bad inputs
def _mixed(device, **overrides):
    logits, a, b, g = _make((6, 5), torch.float32, device)
    args = dict(logits=logits, target=a, target_b=b, mix_weight=0.5)
    args.update(overrides)
    return ltfast.mixed_cross_entropy(**args)


@pytest.mark.simt_no_kernel  # some cases are refused in Python or by autograd, before any kernel
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(target_b=torch.zeros(5, dtype=torch.int64)), ValueError, "target_b must be a 1-D tensor of N = 6"),
    (dict(target_b=torch.zeros(6)), TypeError, "target_b must be an int64"),
    (dict(mix_weight=None), ValueError, "mix_weight .* is required with target_b"),
    (dict(mix_weight=torch.rand(5)), ValueError, "mix_weight must be a 0-dim tensor .* N = 6"),
    (dict(mix_weight=torch.tensor(0.5, requires_grad=True)), RuntimeError, "not to mix_weight"),
    (dict(target_margin=torch.rand(5)), ValueError, "target_margin .* cannot be combined with target_b"),
    (dict(label_smoothing=torch.rand(4)), ValueError, "class_label_smoothing must be a 1-D tensor of C = 5"),
    (dict(label_smoothing=torch.full((5,), 1.5)), ValueError, r"per-class label_smoothing must be in \[0, 1\]"),
    (dict(label_smoothing=torch.full((5,), 0.1), gamma=2.0), ValueError, "gamma > 0 .* label smoothing"),
])
def test_mixed_bad_inputs_name_the_argument(overrides, error, pattern, device):
    overrides = {k: (v.to(device) if torch.is_tensor(v) and not v.requires_grad else v) for k, v in overrides.items()}
    with pytest.raises(error, match=pattern):
        _mixed(device, **overrides)


@pytest.mark.device_assert
@pytest.mark.parametrize("device", device_params())
def test_target_b_out_of_range(device):
    """CPU: an IndexError naming the row; the CUDA kernels (here emulated): an in-kernel assert
    naming target_b, as for every ltfast loss (docs/ops.md, "Targets out of range"); on a GPU a
    device-side assert, in a child process (tests/conftest.py, device_assert)."""
    logits, a = torch.randn(4, 5, device=device), torch.tensor([0, 1, 2, 3], device=device)
    b = torch.tensor([0, 1, 7, 3], device=device)
    with expect_kernel_assert(device, IndexError, r"target\[2\] = 7 is out of range", "target_b out of range"):
        ltfast.mixed_cross_entropy(logits, a, b, 0.5)


@pytest.mark.simt_no_kernel
@pytest.mark.parametrize("device", device_params())
def test_probability_bad_inputs(device):
    logits = torch.randn(6, 5, device=device)
    target = torch.softmax(torch.randn(6, 5), 1).to(device)
    with pytest.raises(ValueError, match=r"probability target must have the logits' shape"):
        ltfast.probability_cross_entropy(logits, target[:, :4])
    with pytest.raises(ValueError, match="gamma"):
        ltfast.adjusted_cross_entropy(logits, target, gamma=2.0)
    with pytest.raises(ValueError, match="target_margin"):
        ltfast.adjusted_cross_entropy(logits, target, target_margin=torch.rand(5, device=device))
    with pytest.raises(ValueError, match="per-class label_smoothing is not defined for probability"):
        ltfast.adjusted_cross_entropy(logits, target, label_smoothing=torch.rand(5, device=device))
    with pytest.raises(ValueError, match="target_b/mix_weight are for class-index targets"):
        ltfast.adjusted_cross_entropy(logits, target, target_b=target.argmax(1), mix_weight=0.5)
    with pytest.raises(RuntimeError, match="probability target is not implemented"):
        ltfast.probability_cross_entropy(logits, target.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        ltfast.probability_cross_entropy(logits, target, label_smoothing=2.0)


def test_cpu_autocast_returns_float32():
    """Under autocast the kernels read the bf16 logits as they are and return the float32 loss."""
    logits, a, b, g = _make((10, 30), torch.float32, "cpu")
    target = torch.softmax(torch.randn(10, 30, generator=g), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = logits.bfloat16()
        mixed = ltfast.mixed_cross_entropy(half, a, b, 0.4)
        probability = ltfast.probability_cross_entropy(half, target)
    assert mixed.dtype == torch.float32 and probability.dtype == torch.float32
    torch.testing.assert_close(mixed, reference.mixed_cross_entropy(half.float(), a, b, 0.4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probability, F.cross_entropy(half.float(), target), rtol=1e-5, atol=1e-5)
