"""Every parallel decomposition of the CUDA kernels, on the `simt` device (and `cuda` where present):
row groups of 8 lanes (C <= 32), a warp (C <= 1024) and a block (C > 1024) for every row kernel; the
grid cap with several rows per group; the two-level 'mean'/'sum' reductions over up to a few
thousand rows; LADE's column pass with row lanes (small C), its per-class finish over a grid and
its scalar finish. Forward and gradients against ltfast.reference (SEQL against the CPU kernels,
whose drop decisions are the same hash)."""
import pytest
import torch

import ltfast
from conftest import device_params
from ltfast import reference

# (N, C): C = 1, 10, 1000, 8142 and 100k with small N; N in the thousands for the reductions
# (3000 x 10: 94 blocks of 32 rows; 2500 x 37: a warp per row, 313 blocks).
SHAPES = [(5, 1), (7, 10), (9, 1000), (3, 8142), (2, 100_000), (3000, 10), (2500, 37)]
IGNORE = -100


def inputs(N, C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, C, (N,), generator=gen)
    target[::7] = IGNORE
    counts = torch.randint(1, 500, (C,), generator=gen).double()
    return logits, target, counts, gen


def check(device, op, ref, logits, target, rtol=2e-5, atol=2e-6):
    x = logits.float().to(device).requires_grad_()
    loss = op(x, target.to(device))
    grad_out = torch.rand(loss.shape, dtype=torch.float32).to(device) + 0.5
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    x_ref = logits.requires_grad_()
    expected = ref(x_ref, target)
    (expected_grad,) = torch.autograd.grad(expected, x_ref, grad_out.double().cpu())
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_family(shape, reduction, device):
    logits, target, counts, gen = inputs(*shape)
    log_prior = ltfast.priors.log_prior(counts, dtype=torch.float64)
    weight = (torch.rand(shape[1], generator=gen) + 0.5).double()
    check(device, lambda x, y: ltfast.balanced_softmax_loss(x, y, log_prior.float().to(device), reduction),
          lambda x, y: reference.balanced_softmax(x, y, log_prior, reduction), logits, target)
    # weighted mean (the finish divides by the sum of target weights) with label smoothing
    check(device, lambda x, y: ltfast.adjusted_cross_entropy(x, y, weight=weight.float().to(device),
                                                             label_smoothing=0.1, reduction=reduction),
          lambda x, y: reference.adjusted_cross_entropy(x, y, weight=weight, label_smoothing=0.1,
                                                        reduction=reduction), logits, target)


@pytest.mark.parametrize("device", [p for p in device_params() if p.id != "cpu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_seql_matches_the_cpu_kernel(shape, device):
    logits, target, counts, gen = inputs(*shape)
    tail = ltfast.priors.tail_classes(counts, count_threshold=250)
    seed = torch.tensor([12345, 678], dtype=torch.int64)
    check(device, lambda x, y: ltfast.softmax_equalization_loss(x, y, tail.to(device), 0.9, seed=seed.to(device)),
          lambda x, y: ltfast.softmax_equalization_loss(x, y, tail, 0.9, seed=seed), logits, target)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_equalization_loss(shape, reduction, device):
    logits, target, counts, gen = inputs(*shape)
    tail = ltfast.priors.tail_classes(counts, count_threshold=250)
    check(device, lambda x, y: ltfast.equalization_loss(x, y, tail.to(device), reduction),
          lambda x, y: reference.equalization_loss(x, y, tail, reduction), logits, target)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lade(shape, device):
    logits, target, counts, gen = inputs(*shape)
    log_prior = ltfast.priors.log_prior(counts, dtype=torch.float64)
    lp = log_prior.float().to(device)
    check(device, lambda x, y: ltfast.lade_loss(x, y, lp), lambda x, y: reference.lade(x, y, log_prior),
          logits, target, rtol=1e-4, atol=1e-5)
    check(device, lambda x, y: ltfast.lade_regularizer(x, y, lp),
          lambda x, y: reference.lade_regularizer(x, y, log_prior), logits, target, rtol=1e-4, atol=1e-5)
