"""paco_loss's CUDA kernels (csrc/ops/paco/paco_kernels.cuh) against reference.paco_loss, forward and
both gradients, run by the SIMT emulator on the CPU (the `simt` device; `cuda` where a GPU is present).
The CPU kernel is tested in tests/test_paco_op.py. The shapes reach each row-group size of the launch
plan (a row is C + M columns: 8 lanes up to 32, a warp up to 1024, the block beyond), odd row
lengths (scalar head and tail around the 16-byte vectors, per segment), rows without a positive and
ignored rows and keys. Each emulated call also runs under every block schedule and must give
bit-identical outputs (tests/simt_support.py)."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import device_params, expect_kernel_assert
from ltfast import reference

GPU_DEVICES = [p for p in device_params() if p.id != "cpu"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (loss rtol, loss atol, gradient rtol, gradient atol) against the float64 reference on the same
# (rounded) inputs. Half types: the loss and the gradients are returned in the input dtype (8 / 11
# significant bits); the kernels accumulate in float32 (float64 for float64). float32: the GPU's
# exp is MUFU.EX2-based (~2 ulp), summed over up to ~2000 columns.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12, 1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6, 1e-4, 1e-7),
    torch.bfloat16: (1e-2, 1e-3, 1e-2, 1e-5),
    torch.float16: (2e-3, 1e-4, 2e-3, 1e-6),
}


def make_inputs(B, C, K, dtype, device, *, num_labels=None, ignored_row=None, ignored_key=None, seed=0):
    """similarity [B, M = 2B + K] (keys: the anchors twice, then a queue of K), labels in [0, C)
    (or [0, num_labels) when C = 0), sup_logits [B, C] or None, log_prior [C] or None."""
    gen = torch.Generator().manual_seed(seed)
    M = 2 * B + K
    span = num_labels or (C if C > 0 else 4)
    similarity = (torch.randn(B, M, generator=gen) * 0.6).to(dtype)
    labels = torch.randint(0, span, (B,), generator=gen)
    key_labels = torch.cat([labels, labels, torch.randint(0, span, (K,), generator=gen)])
    if ignored_row is not None:
        labels[ignored_row] = -100
    if ignored_key is not None:
        key_labels[ignored_key] = -100
    sup_logits = (torch.randn(B, C, generator=gen) * 2).to(dtype) if C > 0 else None
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0) if C > 0 else None
    return tuple(None if t is None else t.to(device) for t in (similarity, labels, key_labels, sup_logits, log_prior))


def check_against_reference(similarity, labels, key_labels, sup_logits, log_prior, reduction="mean", *,
                            temperature=0.2, alpha=0.05, beta=1.0, gamma=1.0, sup_temperature=0.5,
                            base_temperature=0.07, ignore_index=-100, seed=1):
    """The op's loss and gradients (upstream gradient random for 'none') against the reference on
    float64 copies of the same inputs."""
    dtype = similarity.dtype
    sim = similarity.detach().clone().requires_grad_()
    sup = None if sup_logits is None else sup_logits.detach().clone().requires_grad_()
    loss = torch.ops.ltfast.paco_loss(sim, labels, key_labels, sup, log_prior, temperature, alpha, beta, gamma,
                                      sup_temperature, base_temperature, reduction, ignore_index)
    sim64 = similarity.detach().cpu().double().requires_grad_()
    sup64 = None if sup_logits is None else sup_logits.detach().cpu().double().requires_grad_()
    expected = reference.paco_loss(sim64, labels.cpu(), key_labels.cpu(), sup64,
                                   None if log_prior is None else log_prior.cpu(), temperature, alpha, beta, gamma,
                                   sup_temperature, base_temperature, reduction, ignore_index)
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(1.5, dtype=torch.float64)
    expected.backward(upstream)
    loss.backward(upstream.to(loss.dtype).to(loss.device))
    loss_rtol, loss_atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    assert loss.dtype == dtype and loss.shape == expected.shape
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), rtol=loss_rtol, atol=loss_atol, equal_nan=True)
    assert sim.grad.dtype == dtype
    torch.testing.assert_close(sim.grad.cpu().double(), sim64.grad, rtol=grad_rtol, atol=grad_atol)
    if sup is not None:
        assert sup.grad.dtype == dtype
        torch.testing.assert_close(sup.grad.cpu().double(), sup64.grad, rtol=grad_rtol, atol=grad_atol)
    return loss


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, C, K", list(itertools.product((1, 3, 33), (0, 1, 100), (0, 7))))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(device, dtype, B, C, K, reduction):
    ignored = dict(ignored_row=B // 2, ignored_key=B + 1) if B > 1 else {}
    check_against_reference(*make_inputs(B, C, K, dtype, device, **ignored), reduction)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("option", [dict(gamma=0.0), dict(beta=0.0), dict(alpha=0.0), dict(no_prior=True),
                                    dict(ignore_index=3), dict(sup_temperature=0.07, temperature=0.05)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("C", [0, 10])
def test_options(device, option, C):
    option = dict(option)
    similarity, labels, key_labels, sup_logits, log_prior = make_inputs(9, C, 13, torch.float32, device)
    if option.pop("no_prior", False):
        log_prior = None
    if option.get("ignore_index") == 3:  # an ignore_index inside the label range: rows and keys of label 3
        labels[0] = 3
    check_against_reference(similarity, labels, key_labels, sup_logits, log_prior, "mean", **option)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("B, C, K, dtype", [
    (4, 5, 3, torch.bfloat16),        # C + M = 16: 8-lane groups, rows shorter than one vector
    (6, 9, 11, torch.float16),        # 32 columns: the largest 8-lane row
    (5, 333, 505, torch.bfloat16),    # a warp per row, odd lengths in both segments
    (3, 1500, 701, torch.float32),    # a block per row
    (2, 0, 2000, torch.bfloat16),     # SupCon rows (no class columns) of a block
    (40, 1, 2, torch.float64),        # many 8-lane rows per block, a single class column
])
def test_row_groups(device, B, C, K, dtype):
    check_against_reference(*make_inputs(B, C, K, dtype, device, ignored_row=B - 1), "mean")


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("classes", [0, 12])
def test_normalized_features(device, dtype, gamma, classes):
    """PaCo's own inputs: L2-normalised q, k and queue, so the self column (q_i . q_i = 1) is every
    row's max while its weight is 0; with gamma = 0 and no class columns the denominator is the
    original's 1e-12 alone."""
    gen = torch.Generator().manual_seed(5)
    B, K, D = 16, 40, 8
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1)
    k = torch.nn.functional.normalize(q + 0.1 * torch.randn(B, D, generator=gen), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(K, D, generator=gen), dim=1)
    similarity = (q @ torch.cat([q, k, queue]).T).to(dtype).to(device)
    labels = torch.randint(0, max(classes, 3), (B,), generator=gen)
    key_labels = torch.cat([labels, labels, torch.randint(0, max(classes, 3), (K,), generator=gen)]).to(device)
    sup_logits = torch.randn(B, classes, generator=gen).to(dtype).to(device) if classes else None
    check_against_reference(similarity, labels.to(device), key_labels, sup_logits, None, "mean", temperature=0.07,
                            gamma=gamma, base_temperature=0.07)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("offset", [1, 3])
def test_inputs_at_an_odd_storage_offset(device, offset):
    """Rows starting 2 or 6 bytes past a 16-byte boundary (bf16 views at an odd offset): the vector
    body keeps its 16-byte loads after a per-row peel, the gradients (fresh tensors, aligned otherwise)
    are stored per element; the values are those of the aligned call, bit for bit."""
    B, C, K = 5, 101, 203
    similarity, labels, key_labels, sup_logits, log_prior = make_inputs(B, C, K, torch.bfloat16, device)
    M = similarity.shape[1]
    base_sim = torch.zeros(B * M + offset, dtype=torch.bfloat16, device=device)
    base_sup = torch.zeros(B * C + offset, dtype=torch.bfloat16, device=device)
    base_sim[offset:] = similarity.flatten()
    base_sup[offset:] = sup_logits.flatten()
    shifted = (base_sim[offset:].view(B, M), base_sup[offset:].view(B, C))
    assert shifted[0].storage_offset() == offset and shifted[0].is_contiguous()  # the op does not copy it
    results = []
    for sim, sup in (shifted, (similarity, sup_logits)):
        sim = sim.detach().requires_grad_()  # a leaf on the same storage, at the same offset
        sup = sup.detach().requires_grad_()
        loss = torch.ops.ltfast.paco_loss(sim, labels, key_labels, sup, log_prior, 0.2, 0.05, 1.0, 1.0, 0.5, 0.07,
                                          "mean", -100)
        loss.backward()
        results.append((loss.detach(), sim.grad, sup.grad))
    for shifted, aligned in zip(*results):
        assert torch.equal(shifted, aligned)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_no_counted_row(device):
    """SupCon rows whose labels no other key has: no positive, nothing counted: 'mean' is NaN (0 / 0,
    as F.cross_entropy with every target ignored), 'sum' 0, and every gradient 0."""
    B = 4
    similarity = torch.randn(B, 2 * B, device=device)
    labels = torch.arange(B, device=device)
    key_labels = torch.cat([labels, labels + B])  # the second view of each anchor has another label
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        sim = similarity.clone().requires_grad_()
        loss = torch.ops.ltfast.paco_loss(sim, labels, key_labels, None, None, 0.1, 1.0, 0.0, 1.0, 1.0, 0.1,
                                          reduction, -100)
        torch.testing.assert_close(loss.cpu(), torch.tensor(expected), equal_nan=True)
        loss.backward()
        assert torch.equal(sim.grad, torch.zeros_like(sim))


@pytest.mark.device_assert
@pytest.mark.parametrize("device", GPU_DEVICES)
def test_label_out_of_range_is_a_kernel_assert(device):
    similarity, labels, key_labels, sup_logits, log_prior = make_inputs(4, 5, 2, torch.float32, device)
    labels[2] = 7
    with expect_kernel_assert(device, kernel_match=r"paco label out of range .* failed at csrc/ops/paco/"):
        torch.ops.ltfast.paco_loss(similarity, labels, key_labels, sup_logits, log_prior, 0.2, 0.05, 1.0, 1.0, 1.0,
                                   0.2, "mean", -100)
