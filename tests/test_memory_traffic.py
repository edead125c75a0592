"""Global-memory traffic of the CUDA kernels, counted by the SIMT emulator (no GPU needed): the
bytes each kernel moves equal benchmarks/traffic_model.py's, the launches per call are the plan's,
and the [N, C] streams are read and written with full sectors (benchmarks/memory_model.py).

The emulator's counting itself is checked first on access patterns whose sector efficiency is known
(csrc/simt/selftest_kernels.cpp)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import ltfast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import memory_model  # noqa: E402
import simt_support  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _emulator():
    try:
        simt_support.load()
    except Exception as error:  # the simt tests of the other files report the same cause
        pytest.skip(f"SIMT emulator unavailable: {error}")


def _selftest_trace(name, blocks=2, threads=64):
    out, launches = memory_model.traced(lambda: torch.ops.ltfast_simt.selftest(name, blocks, threads))
    assert len(launches) == 1
    return out, launches[0]


@pytest.mark.parametrize("name, efficiency, width, written", [
    ("coalesced_store", 1.0, 8, 2 * 64 * 8),   # 32 lanes x 8 contiguous bytes: 8 sectors per request
    ("strided_store", 0.5, 8, 2 * 32 * 8),     # every other 8-byte element: half of each sector unused
    ("vector_store", 1.0, 16, 2 * 64 * 8),     # 32 lanes x 16 contiguous bytes: 16 sectors per request
])
def test_sector_efficiency_of_known_patterns(name, efficiency, width, written):
    _, launch = _selftest_trace(name)
    (site,) = launch.sites
    assert site.write and site.widest == width
    assert site.efficiency == pytest.approx(efficiency)
    assert launch.bytes_written == written and launch.bytes_read == 0
    # one request per warp that stores (2 blocks x 2 warps; strided/vector: only the first warp)
    assert site.requests == (4 if name == "coalesced_store" else 2)


def test_misaligned_vector_access_is_reported():
    with pytest.raises(RuntimeError, match="16-byte vector access at .*selftest_kernels.cpp:\\d+ is misaligned"):
        _selftest_trace("misaligned_vector")


def test_trace_is_off_outside_start_and_stop():
    torch.ops.ltfast_simt.selftest("coalesced_store", 1, 32)
    assert memory_model.traced(lambda: None)[1] == []


# Kernels whose [N, C] streams are vectorised (16-byte accesses, per-row alignment peel): sector
# efficiency >= 0.9 on those streams, at odd C and any row alignment.
VECTORISED = {"cross_entropy forward_rows_kernel", "cross_entropy backward_rows_kernel",
              "equalization forward_rows_kernel", "equalization backward_rows_kernel",
              # paco_loss: the [B, C] sup_logits and [B, M] similarity rows, each with its own peel
              "paco forward_rows_kernel", "paco backward_rows_kernel",
              # soft targets: the logits rows (and the probability target's, split like them)
              "soft_targets mixed_forward_kernel", "soft_targets mixed_backward_kernel",
              "soft_targets probability_forward_kernel", "soft_targets probability_backward_kernel",
              # multi-expert: the [N, E, C] logits and gradient rows, each expert row with its own peel
              "multi_expert diverse_forward_kernel", "multi_expert diverse_backward_kernel",
              "multi_expert ride_forward_kernel", "multi_expert ride_backward_kernel",
              # LADE: the column pass streams each row's slice of a class tile, the backward its rows
              "lade column_partials_kernel", "lade backward_kernel"}
CASES = memory_model.cases(quick=True)


@pytest.fixture(scope="module")
def records():
    out = {}
    for case in CASES:
        out[case.label] = memory_model.measure(case)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_counted_bytes_equal_the_model(records, case):
    for r in records[case.label]:
        assert r["bytes_model"] is not None, f"{case.label}: {r['kernel']} is not in traffic_model.kernel_model"
        assert r["launches"] == r["launches_model"], (case.label, r["kernel"])
        assert r["bytes_read"] == pytest.approx(r["bytes_read_model"], rel=0.02), (case.label, r["kernel"], "read")
        assert r["bytes_written"] == pytest.approx(r["bytes_written_model"], rel=0.02), (case.label, r["kernel"],
                                                                                          "written")


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_sector_efficiency_of_the_row_streams(records, case):
    streams = [r for r in records[case.label] if r["sector_efficiency"] is not None]
    assert streams, f"{case.label}: no kernel reads the logits"
    for r in streams:
        # every kernel that streams [N, C] rows is vectorised: a new one must join VECTORISED
        assert r["kernel"] in VECTORISED, (case.label, r["kernel"], r["sector_efficiency"])
        assert r["sector_efficiency"] >= 0.9, (case.label, r["kernel"], r["sector_efficiency"])
        assert r["max_access_bytes"] == 16, (case.label, r["kernel"], r["max_access_bytes"])


@pytest.mark.parametrize("offset", [1, 3, 5])
def test_vector_body_at_any_row_alignment(offset):
    """A logits view whose rows start 2, 6 or 10 bytes past a 16-byte boundary (a storage offset) with
    odd C: the per-row peel keeps 16-byte loads, the gradient (a fresh tensor, aligned otherwise than
    the logits) falls back to element stores, and the values match the aligned call."""
    gen = torch.Generator().manual_seed(offset)
    N, C = 6, 1001
    base = torch.randn(N * C + offset, generator=gen).to(torch.bfloat16)
    logits = base[offset:].view(N, C).requires_grad_()
    target = torch.randint(0, C, (N,), generator=gen)
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    previous = ltfast.set_forward_gradient(False)  # the backward kernel's stores are under test
    try:
        with simt_support.emulate_cuda_kernels():
            loss, fwd = memory_model.traced(lambda: torch.ops.ltfast.balanced_softmax(logits, target, log_prior))
            _, bwd = memory_model.traced(lambda: loss.backward())
            aligned = logits.detach().clone().requires_grad_()
            expected = torch.ops.ltfast.balanced_softmax(aligned, target, log_prior)
            expected.backward()
    finally:
        ltfast.set_forward_gradient(previous)
    assert torch.equal(loss, expected) and torch.equal(logits.grad, aligned.grad)
    begin, end = logits.data_ptr(), logits.data_ptr() + logits.numel() * 2
    (rows,) = [launch for launch in fwd if launch.kernel == "cross_entropy forward_rows_kernel"]
    reads = memory_model.stream_sites(rows, [(begin, end)])
    assert max(s.widest for s in reads) == 16
    assert sum(s.bytes for s in reads) / (32 * sum(s.sectors for s in reads)) >= 0.9
    (backward,) = [launch for launch in bwd if launch.kernel == "cross_entropy backward_rows_kernel"]
    assert max(s.widest for s in memory_model.stream_sites(backward, [(begin, end)])) == 16


def _assert_full_width(launch, ranges, write):
    """The launch's loads (write=False) or stores of the [N, C] streams in `ranges`: 16-byte accesses
    at >= 0.9 sector efficiency."""
    sites = [s for s in memory_model.stream_sites(launch, ranges) if s.write == write]
    assert max(s.widest for s in sites) == 16, (launch.kernel, write)
    assert _sector_efficiency(sites) >= 0.9, (launch.kernel, write, _sector_efficiency(sites))


@pytest.mark.parametrize("with_grad", [False, True], ids=["backward", "fused"])
@pytest.mark.parametrize("C, offset", [(10, 3), (13, 1), (20, 0), (20, 1), (32, 5)])
def test_tiled_short_rows(C, offset, with_grad):
    """Rows of C <= 32 classes go through shared-memory tiles of 32 x floor(32 / C) rows (one flat
    span each): the logits are read and the gradient written in 16-byte vectors at >= 0.9 sector
    efficiency (streamed per row they were at 0.42 / 0.52), at a storage offset of 0, 2, 6 or 10
    bytes; the loss and gradient equal the aligned call's bit for bit and the float64 reference's to
    bf16 rounding. The 200 rows end in a partial tile, and rows 3 and 41 are ignored. A tile's head
    and tail sectors are each counted twice (the scalar and the vector requests touch them): with one
    row per group a misaligned C = 10 tile (640 bytes) read at 0.86, hence floor(32 / C) rows."""
    gen = torch.Generator().manual_seed(C + offset)
    N = 200
    base = torch.randn(N * C + offset, generator=gen).mul(3).to(torch.bfloat16)
    target = torch.randint(0, C, (N,), generator=gen)
    target[[3, 41]] = -100
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    previous = ltfast.set_forward_gradient(with_grad)
    try:
        with simt_support.emulate_cuda_kernels():
            logits = base.clone()[offset:].view(N, C).requires_grad_()
            loss, fwd = memory_model.traced(lambda: torch.ops.ltfast.balanced_softmax(logits, target, log_prior))
            _, bwd = memory_model.traced(lambda: loss.backward())
            aligned = base[offset:].view(N, C).clone().requires_grad_()
            expected = torch.ops.ltfast.balanced_softmax(aligned, target, log_prior)
            expected.backward()
    finally:
        ltfast.set_forward_gradient(previous)
    assert torch.equal(loss, expected) and torch.equal(logits.grad, aligned.grad)
    reference = logits.detach().double().requires_grad_()
    want = ltfast.reference.balanced_softmax(reference, target, log_prior.double())
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=4e-3, atol=0)  # the loss is bf16: half its spacing
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-2, atol=2e-3)  # bf16 gradient
    begin, end = logits.data_ptr(), logits.data_ptr() + N * C * 2
    (rows,) = [launch for launch in fwd if launch.kernel == "cross_entropy forward_rows_kernel"]
    writer = rows if with_grad else next(launch for launch in bwd if launch.kernel == "cross_entropy backward_rows_kernel")
    grad_begin = logits.grad.data_ptr()
    for launch in {id(rows): rows, id(writer): writer}.values():  # the forward, and the backward if separate
        _assert_full_width(launch, [(begin, end)], write=False)
    _assert_full_width(writer, [(grad_begin, grad_begin + N * C * 2)], write=True)


@pytest.mark.parametrize("C, offset", [(10, 3), (20, 1), (32, 0)])
def test_tiled_short_rows_equalization(C, offset):
    """equalization_loss tiles rows of <= 32 classes as the cross-entropy family does: 16-byte loads
    and stores at >= 0.9 sector efficiency (streamed per row: 0.42 at 1024 x 10 bf16), values equal
    to the aligned call's bit for bit and to the float64 reference's to bf16 rounding; rows 3 and
    41 ignored, a partial last tile."""
    gen = torch.Generator().manual_seed(C + offset)
    N = 200
    base = torch.randn(N * C + offset, generator=gen).mul(3).to(torch.bfloat16)
    target = torch.randint(0, C, (N,), generator=gen)
    target[[3, 41]] = -100
    tail = torch.rand(C, generator=gen) < 0.5
    with simt_support.emulate_cuda_kernels():
        logits = base.clone()[offset:].view(N, C).requires_grad_()
        loss, fwd = memory_model.traced(lambda: torch.ops.ltfast.equalization_loss(logits, target, tail))
        _, bwd = memory_model.traced(lambda: loss.backward())
        aligned = base[offset:].view(N, C).clone().requires_grad_()
        expected = torch.ops.ltfast.equalization_loss(aligned, target, tail)
        expected.backward()
    assert torch.equal(loss, expected) and torch.equal(logits.grad, aligned.grad)
    reference = logits.detach().double().requires_grad_()
    want = ltfast.reference.equalization_loss(reference, target, tail)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=4e-3, atol=0)
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-2, atol=1e-4)
    begin, end = logits.data_ptr(), logits.data_ptr() + N * C * 2
    grad_begin = logits.grad.data_ptr()
    (rows,) = [launch for launch in fwd if launch.kernel == "equalization forward_rows_kernel"]
    (backward,) = [launch for launch in bwd if launch.kernel == "equalization backward_rows_kernel"]
    for launch in (rows, backward):
        _assert_full_width(launch, [(begin, end)], write=False)
    _assert_full_width(backward, [(grad_begin, grad_begin + N * C * 2)], write=True)


@pytest.mark.parametrize("op", ["mixed_cross_entropy", "probability_cross_entropy"])
@pytest.mark.parametrize("C, offset", [(10, 3), (20, 1), (32, 0)])
def test_tiled_short_rows_soft_targets(op, C, offset):
    """The soft-target ops tile rows of <= 32 classes as the hard-target ones do: the logits (and the
    probability targets, at an offset of their own) read and the gradient written in 16-byte
    vectors at >= 0.9 sector efficiency (streamed per row: 0.23-0.45 at 1024 x 10 bf16); loss and
    gradient equal the aligned call's bit for bit and the float64 reference's to bf16 rounding.
    Mixed: label smoothing, class weights, a per-row mix and an ignored row in each target."""
    gen = torch.Generator().manual_seed(C + offset)
    N = 200
    base = torch.randn(N * C + offset, generator=gen).mul(3).to(torch.bfloat16)
    target_a = torch.randint(0, C, (N,), generator=gen)
    target_b = torch.randint(0, C, (N,), generator=gen)
    target_a[3] = -100
    target_b[[3, 41]] = -100
    mix = torch.rand(N, generator=gen)
    weight = torch.rand(C, generator=gen) + 0.5
    q = torch.softmax(torch.randn(N, C, generator=gen), 1)
    q_shifted = torch.empty(N * C + 1)[1:].view(N, C).copy_(q)  # 4 bytes off the logits' alignment
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    ops = torch.ops.ltfast

    def call(x, reference=False):
        if op == "mixed_cross_entropy":
            if reference:
                return ltfast.reference.mixed_cross_entropy(x, target_a, target_b, mix.double(), weight=weight.double(),
                                                            label_smoothing=0.1)
            return ops.mixed_cross_entropy(x, target_a, target_b, mix, weight=weight, label_smoothing=0.1)
        if reference:
            return ltfast.reference.probability_cross_entropy(x, q.double(), log_prior.double())
        return ops.probability_cross_entropy(x, q_shifted, log_prior)

    with simt_support.emulate_cuda_kernels():
        logits = base.clone()[offset:].view(N, C).requires_grad_()
        loss, fwd = memory_model.traced(lambda: call(logits))
        _, bwd = memory_model.traced(lambda: loss.backward())
        aligned = base[offset:].view(N, C).clone().requires_grad_()
        expected = call(aligned)
        expected.backward()
    assert torch.equal(loss, expected) and torch.equal(logits.grad, aligned.grad)
    reference = logits.detach().double().requires_grad_()
    want = call(reference, reference=True)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=4e-3, atol=0)
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-2, atol=2e-3)
    kernel = {"mixed_cross_entropy": "mixed", "probability_cross_entropy": "probability"}[op]
    (rows,) = [launch for launch in fwd if launch.kernel == f"soft_targets {kernel}_forward_kernel"]
    (backward,) = [launch for launch in bwd if launch.kernel == f"soft_targets {kernel}_backward_kernel"]
    streams = [(logits.data_ptr(), logits.data_ptr() + N * C * 2)]
    if op == "probability_cross_entropy":
        streams.append((q_shifted.data_ptr(), q_shifted.data_ptr() + N * C * 4))
    for launch in (rows, backward):
        _assert_full_width(launch, streams, write=False)
    grad_begin = logits.grad.data_ptr()
    _assert_full_width(backward, [(grad_begin, grad_begin + N * C * 2)], write=True)


@pytest.mark.parametrize("op", ["mixed_cross_entropy", "probability_cross_entropy"])
@pytest.mark.parametrize("offset", [1, 3])
def test_soft_target_vector_body_at_any_row_alignment(op, offset):
    """The soft-target kernels on a logits view whose rows start 2 or 6 bytes past a 16-byte boundary,
    odd C: 16-byte loads of the logits rows at >= 0.9 sector efficiency, and (probability targets) a
    target of the logits' alignment read in 16-byte vectors as well, one of another alignment in
    element loads; the values match the aligned call to bf16 rounding (the per-row split moves the
    online-softmax chunk boundaries)."""
    gen = torch.Generator().manual_seed(offset)
    N, C = 6, 1001
    base = torch.randn(N * C + offset, generator=gen).to(torch.bfloat16)
    logits = base[offset:].view(N, C)
    target = torch.randint(0, C, (N,), generator=gen)
    target_b = torch.randint(0, C, (N,), generator=gen)
    probabilities = torch.softmax(torch.randn(N, C, generator=gen), 1).to(torch.bfloat16)
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    ops = torch.ops.ltfast
    kernels = {"mixed_cross_entropy": "mixed", "probability_cross_entropy": "probability"}[op]

    def call(x, q):
        if op == "mixed_cross_entropy":
            return ops.mixed_cross_entropy(x, target, target_b, None, 0.7)
        return ops.probability_cross_entropy(x, q, log_prior)

    # the target at the logits' offset (shared split), then at an aligned base (its own split)
    shifted = torch.empty(N * C + offset, dtype=torch.bfloat16)[offset:].view(N, C).copy_(probabilities)
    for q in (shifted, probabilities):
        x = base.clone()[offset:].view(N, C).requires_grad_()
        with simt_support.emulate_cuda_kernels():
            loss, fwd = memory_model.traced(lambda: call(x, q))
            _, bwd = memory_model.traced(lambda: loss.backward())
            aligned = logits.detach().clone().requires_grad_()
            expected = call(aligned, probabilities.clone())
            expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(x.grad, aligned.grad)
        begin, end = x.data_ptr(), x.data_ptr() + x.numel() * 2
        (rows,) = [launch for launch in fwd if launch.kernel == f"soft_targets {kernels}_forward_kernel"]
        reads = memory_model.stream_sites(rows, [(begin, end)])
        assert max(s.widest for s in reads) == 16
        assert sum(s.bytes for s in reads) / (32 * sum(s.sectors for s in reads)) >= 0.9
        (backward,) = [launch for launch in bwd if launch.kernel == f"soft_targets {kernels}_backward_kernel"]
        assert max(s.widest for s in memory_model.stream_sites(backward, [(begin, end)])) == 16
        if op == "probability_cross_entropy":
            q_begin, q_end = q.data_ptr(), q.data_ptr() + q.numel() * 2
            q_reads = memory_model.stream_sites(rows, [(q_begin, q_end)])
            # an aligned target next to logits rows 2 or 6 bytes off: only 2-byte aligned at the vectors
            assert max(s.widest for s in q_reads) == (16 if q is shifted else 2)
        if op == "mixed_cross_entropy":
            break  # no target rows


def _sector_efficiency(sites):
    return sum(s.bytes for s in sites) / (32 * sum(s.sectors for s in sites))


@pytest.mark.parametrize("op", ["diverse_expert_loss", "ride_loss"])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_multi_expert_vector_body_at_any_row_alignment(op, offset):
    """The multi-expert kernels on [N, E, C] logits of odd C (row r starts r x 2 bytes past its
    base's 16-byte offset: every element offset occurs) at a storage offset of 0, 2 or 6 bytes: 16-byte
    loads of the logits rows and stores of the gradient rows at >= 0.9 sector efficiency, RIDE's
    cross-expert runs included (load_elements), and the values match the aligned call to rounding
    (the per-row splits move the online-softmax chunk boundaries)."""
    gen = torch.Generator().manual_seed(offset)
    N, E, C = 6, 3, 1001
    base = (torch.randn(N * E * C + offset, generator=gen) * 2).to(torch.bfloat16)
    target = torch.randint(0, C, (N,), generator=gen)
    target[1] = -100  # an ignored sample: its gradient rows are filled
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    adjustments = torch.stack([-log_prior, torch.zeros(C), log_prior])
    margin = torch.rand(C, generator=gen)
    weight = torch.rand(C, generator=gen) + 0.5
    temperature = torch.rand(C, generator=gen) + 0.5

    def call(x):
        if op == "diverse_expert_loss":
            return torch.ops.ltfast.diverse_expert_loss(x, target, adjustments)
        return ltfast.ride_loss(x, target, target_margin=margin, weight=weight, temperature=temperature,
                                base_temperature=1.5, diversity_factor=-0.3)

    x = base.clone()[offset:].view(N, E, C).requires_grad_()
    with simt_support.emulate_cuda_kernels():
        loss, fwd = memory_model.traced(lambda: call(x))
        _, bwd = memory_model.traced(lambda: loss.backward())
        aligned = base[offset:].view(N, E, C).clone().requires_grad_()
        expected = call(aligned)
        expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, aligned.grad)
    assert (x.grad[1] == 0).all()
    kernel = {"diverse_expert_loss": "diverse", "ride_loss": "ride"}[op]
    launches = fwd + bwd  # on CPU tensors the forward call runs the backward kernel too (memory_model.measure)
    begin, end = x.data_ptr(), x.data_ptr() + x.numel() * 2
    (rows,) = [launch for launch in launches if launch.kernel == f"multi_expert {kernel}_forward_kernel"]
    reads = memory_model.stream_sites(rows, [(begin, end)])
    assert max(s.widest for s in reads) == 16
    assert _sector_efficiency(reads) >= 0.9
    (backward,) = [launch for launch in launches if launch.kernel == f"multi_expert {kernel}_backward_kernel"]
    backward_reads = memory_model.stream_sites(backward, [(begin, end)])
    assert max(s.widest for s in backward_reads) == 16
    assert _sector_efficiency(backward_reads) >= 0.9
    stores = [s for s in backward.sites if s.write]
    assert max(s.widest for s in stores) == 16
    assert _sector_efficiency(stores) >= 0.9


@pytest.mark.parametrize("op", ["lade", "lade_regularizer"])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_lade_vector_body_at_any_row_alignment(op, offset):
    """LADE on a logits view whose first row starts `offset` bf16 elements past a 16-byte boundary, odd C
    (the 8 rows then start at all 8 element offsets) and several class tiles of the column pass
    (2040 bf16 classes each): 16-byte loads of the logits in the column pass and the backward, at
    >= 0.9 sector efficiency, with an ignored row; the values match the aligned call to float
    rounding (the split moves the order of the column and row merges)."""
    gen = torch.Generator().manual_seed(offset)
    N, C = 8, 4093
    base = torch.randn(N * C + offset, generator=gen).to(torch.bfloat16)
    logits = base[offset:].view(N, C)
    target = torch.randint(0, C, (N,), generator=gen)
    target[5] = -100
    log_prior = torch.log_softmax(torch.randn(C, generator=gen), 0)
    fn = getattr(torch.ops.ltfast, op)
    x = base.clone()[offset:].view(N, C).requires_grad_()
    with simt_support.emulate_cuda_kernels():
        loss, fwd = memory_model.traced(lambda: fn(x, target, log_prior))
        _, bwd = memory_model.traced(lambda: loss.backward())
        aligned = logits.detach().clone().requires_grad_()
        expected = fn(aligned, target, log_prior)
        expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, aligned.grad)
    begin, end = x.data_ptr(), x.data_ptr() + x.numel() * 2
    for launches, kernel in ((fwd, "lade column_partials_kernel"), (bwd, "lade backward_kernel")):
        (launch,) = [launch for launch in launches if launch.kernel == kernel]
        reads = memory_model.stream_sites(launch, [(begin, end)])
        assert max(s.widest for s in reads) == 16, kernel
        assert sum(s.bytes for s in reads) / (32 * sum(s.sectors for s in reads)) >= 0.9, kernel
