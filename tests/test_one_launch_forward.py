"""A reduced forward ('mean'/'sum') is one launch: each block of the row kernel writes its partial
sums and takes a ticket from the stream's counter, and the block with the last ticket sums every
block's partials in a fixed order and writes the loss (gpu_reduce::finish_in_last_block). Checked in
the SIMT emulator for every row-kernel family: one launch per call (N = 0 included: the finish kernel
alone), the loss bit-identical under the emulator's three block orders (ascending, descending,
shuffled: every emulated call compares them, so a different last block must give the same bits), and
bit-identical to the two-launch path (the row kernel, then the one-block finish kernel) that the
launch plans take under CUDA graph capture, forced here by the test switch
ltfast_simt::force_finish_kernels."""
from __future__ import annotations

import contextlib

import pytest
import torch

import simt_support

# (N, C): 8-lane row groups over 94 blocks, warps over 75 blocks, a block per row over 5 blocks, one
# block, and no rows.
SHAPES = [(3000, 10), (600, 37), (5, 1500), (3, 40), (0, 10)]


@pytest.fixture(scope="module", autouse=True)
def _library():
    simt_support.load()


@contextlib.contextmanager
def finish_kernels_forced():
    previous = torch.ops.ltfast_simt.force_finish_kernels(True)
    try:
        yield
    finally:
        torch.ops.ltfast_simt.force_finish_kernels(previous)


def forward_call(op: str, N: int, C: int, reduction: str):
    """fn() -> the outputs of the emulated forward op (the mirror of torch.ops.ltfast._<op>_forward)."""
    gen = torch.Generator().manual_seed(N * 7919 + C)
    logits = torch.randn(N, C, generator=gen) * 3
    target = torch.randint(0, C, (N,), generator=gen)
    target[::5] = -100  # ignored rows: not counted in the mean
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    weight = torch.rand(C, generator=gen) + 0.5
    ops = torch.ops.ltfast_simt
    if op == "balanced_softmax":
        return lambda: ops._balanced_softmax_forward(logits, target, log_prior, reduction, -100)
    if op == "adjusted_cross_entropy":  # weighted: the mean divides by the target weights' sum
        return lambda: ops._adjusted_cross_entropy_forward(logits, target, None, None, weight, 0.0, 0.1, reduction,
                                                           -100)
    if op == "equalization_loss":
        tail = torch.rand(C, generator=gen) < 0.5
        return lambda: ops._equalization_loss_forward(logits, target, tail, reduction, -100)
    if op == "mixed_cross_entropy":  # two targets: four partials per block
        target_b = torch.randint(0, C, (N,), generator=gen)
        mix_weight = torch.rand(N, generator=gen)
        return lambda: ops._mixed_cross_entropy_forward(logits, target, target_b, mix_weight, 1.0, None, None,
                                                        weight, 0.0, 0.0, None, reduction, -100)
    if op == "probability_cross_entropy":
        probabilities = torch.softmax(torch.randn(N, C, generator=gen), 1)
        return lambda: ops._probability_cross_entropy_forward(logits, probabilities, log_prior, None, 0.0,
                                                              reduction)
    if op == "diverse_expert_loss":
        experts = torch.randn(N, 3, C, generator=gen) * 3
        adjustments = torch.stack([log_prior * k for k in (-1.0, 0.0, 1.0)])
        return lambda: ops._diverse_expert_loss_forward(experts, target, adjustments, reduction, -100)
    if op == "ride_loss":  # always 'mean': four partials per block and a mean temperature
        experts = torch.randn(N, 3, C, generator=gen) * 3
        temperature = torch.rand(C, generator=gen) + 0.5
        return lambda: ops._ride_loss_forward(experts, target, None, weight, temperature, 1.5, -0.2, -100)
    if op == "paco_loss":  # rows of C class columns and M = 2N + 4 key columns
        M = 2 * N + 4
        similarity = torch.randn(N, M, generator=gen)
        labels = torch.randint(0, C, (N,), generator=gen)
        key_labels = torch.randint(0, C, (M,), generator=gen)
        return lambda: ops._paco_forward(similarity, labels, key_labels, logits, log_prior, 0.2, 0.05, 1.0, 1.0,
                                         1.0, 0.2, reduction, -100)
    raise ValueError(op)


OPS = ["balanced_softmax", "adjusted_cross_entropy", "equalization_loss", "mixed_cross_entropy",
       "probability_cross_entropy", "diverse_expert_loss", "ride_loss", "paco_loss"]
CASES = [(op, reduction) for op in OPS for reduction in (["mean"] if op == "ride_loss" else ["mean", "sum"])]


def launches_per_call(fn):
    """(outputs, launches of one call): the emulator runs each call under its 3 schedules."""
    before = simt_support.counters()["launches"]
    out = fn()
    made = simt_support.counters()["launches"] - before
    assert made % 3 == 0
    return out, made // 3


def outputs(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t.numel() > 0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op, reduction", CASES, ids=[f"{op}-{r}" for op, r in CASES])
def test_reduced_forward_is_one_launch_and_equals_the_two_launch_path(op, reduction, shape):
    fn = forward_call(op, *shape, reduction)
    one, launches = launches_per_call(fn)  # bit-identical under the 3 block orders, or it raises
    assert launches == 1, f"{op} {reduction} {shape}: {launches} launches"
    with finish_kernels_forced():
        two, launches_forced = launches_per_call(fn)
    assert launches_forced == (1 if shape[0] == 0 else 2)
    for a, b in zip(outputs(one), outputs(two), strict=True):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), (op, reduction, shape)
    loss = one[0]
    if shape[0] == 0 and reduction == "mean":
        assert loss.isnan()  # as F.cross_entropy over no rows
    else:
        assert loss.isfinite()


def test_none_stays_one_launch_without_a_finish():
    fn = forward_call("balanced_softmax", 600, 37, "none")
    out, launches = launches_per_call(fn)
    assert launches == 1 and out[0].shape == (600,)


def test_the_ticket_counter_is_back_at_zero_after_each_call():
    """The emulator checks after every launch that the counter is at 0 (the last ticket wraps it);
    calls with different block counts in a row would otherwise pick the wrong last block."""
    for shape in [(3000, 10), (3, 40), (600, 37), (3000, 10)]:
        a = forward_call("balanced_softmax", *shape, "mean")()
        b = forward_call("balanced_softmax", *shape, "mean")()
        assert torch.equal(a[0], b[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_takes_the_two_launch_path_with_the_same_bits():
    """Under capture the stream has no ticket counter (a graph may be replayed on any stream): the
    captured forward is the row kernel + the finish kernel, and its replay gives the eager
    one-launch loss bit for bit. Two streams running reduced forwards at once use their own
    counters."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3000, 1000, generator=gen) * 3).cuda()
    target = torch.randint(0, 1000, (3000,), generator=gen).cuda()
    prior = torch.log_softmax(torch.randn(1000, generator=gen), 0).cuda()
    forward = torch.ops.ltfast._balanced_softmax_forward
    eager = forward(logits, target, prior, "mean", -100)[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(logits, target, prior, "mean", -100)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward(logits, target, prior, "mean", -100)[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # Concurrent reduced forwards on two streams, of different block counts.
    small_logits, small_target = logits[:37], target[:37]
    small = forward(small_logits, small_target, prior, "sum", -100)[0].clone()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = {0: [], 1: []}
    for _ in range(20):
        with torch.cuda.stream(streams[0]):
            outs[0].append(forward(logits, target, prior, "mean", -100)[0])
        with torch.cuda.stream(streams[1]):
            outs[1].append(forward(small_logits, small_target, prior, "sum", -100)[0])
    torch.cuda.synchronize()
    assert all(torch.equal(o, eager) for o in outs[0]) and all(torch.equal(o, small) for o in outs[1])
