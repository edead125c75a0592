"""The SIMT emulator itself: each defect it claims to catch is caught, with the kernel and the
source line named, and correct kernels pass under every schedule (csrc/simt/selftest_kernels.cpp)."""
import os

import pytest
import torch

import simt_support


@pytest.fixture(scope="module", autouse=True)
def _library():
    simt_support.load()


def selftest(name, blocks=2, threads=64):
    return torch.ops.ltfast_simt.selftest(name, blocks, threads)


def test_correct_kernel_runs_under_every_schedule():
    before = simt_support.counters()
    out = selftest("correct", blocks=3, threads=256).view(3, 256)
    lane = torch.arange(256) % 32
    expected_sum = 256 * 257 // 2
    down = torch.where(lane + 4 < 32, lane + 4, lane)
    up = torch.where(lane % 16 >= 2, lane - 2, lane)
    expected = expected_sum * 1000000 + (lane ^ 1) * 10000 + down * 100 + up
    assert torch.equal(out, expected.expand(3, 256))
    after = simt_support.counters()
    assert after["launches"] - before["launches"] == 3  # one per schedule
    assert after["barriers"] - before["barriers"] == 3 * 3 * 9  # 9 barriers per block
    assert after["collectives"] - before["collectives"] > 0


@pytest.mark.parametrize("name, message", [
    ("unwritten_shared", r"thread \(63, 0, 0\): read of __shared__ values\[0\] .*selftest_kernels.cpp:\d+.*which no thread of this "
                         r"block has written .*last passed the barrier at csrc/simt/selftest_kernels.cpp:\d+"),
    ("missing_barrier", r"output 0 differs between the schedules .*selftest missing_barrier_kernel.*missing "
                        r"__syncthreads"),
    ("divergent_barrier", r"divergent __syncthreads: this thread waits at csrc/simt/selftest_kernels.cpp:\d+ while "
                          r"thread .* waits at csrc/simt/selftest_kernels.cpp:\d+"),
    ("barrier_after_exit", r"__syncthreads at csrc/simt/selftest_kernels.cpp:\d+ is reached by part of the block "
                           r"while thread \(5, 0, 0\) has exited"),
    ("divergent_shuffle", r"deadlock: the warp collective at csrc/simt/selftest_kernels.cpp:\d+ \(mask 0xffffffff\) "
                          r"names lane 16, which has exited"),
    ("shuffle_barrier_deadlock", r"names lane 16, which waits at __syncthreads at csrc/simt/selftest_kernels.cpp"),
    ("assert", r"kernel selftest assert_kernel.*thread \(7, 0, 0\): CUDA_KERNEL_ASSERT\(threadIdx.x != 7 && "
               r"\"thread 7 is not allowed\"\) failed at csrc/simt/selftest_kernels.cpp:\d+"),
    ("block_order", r"output 0 differs between the schedules"),
    ("shared_out_of_bounds", r"__shared__ values\[256\] is out of bounds .* with 256 elements"),
])
def test_defect_is_caught_with_its_source_line(name, message):
    threads = 256 if name == "shared_out_of_bounds" else 64
    with pytest.raises(RuntimeError, match=message):
        selftest(name, blocks=4, threads=threads)


@pytest.mark.parametrize("blocks", [1, 5])
def test_last_block_ticket_sums_every_block_under_every_schedule(blocks):
    # The block that takes the last ticket differs between the schedules (ascending, descending,
    # shuffled block orders); every one sees all blocks' values (selftest compares the schedules).
    out = selftest("last_block_ticket", blocks=blocks, threads=64).view(blocks, 64)
    assert out[0, 1] == blocks * (blocks + 1) // 2
    assert torch.equal(out[:, 0], torch.arange(1, blocks + 1))


def test_ticket_counter_left_off_zero_is_reported():
    with pytest.raises(RuntimeError, match="selftest missing_ticket_kernel left the ticket counter at 1"):
        selftest("missing_ticket", blocks=4)
    selftest("last_block_ticket", blocks=3)  # reset after the failed launch: the next one is right


def test_invalid_launch_configuration_is_reported():
    with pytest.raises(RuntimeError, match="bad launch size"):
        selftest("correct", blocks=1, threads=2048)


def test_every_cuda_op_has_an_emulated_kernel():
    import ltfast
    cuda_ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                if n.startswith("ltfast::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")}
    if not ltfast.has_cuda_kernels():  # CI builds them (LTFAST_CUDA=1): there this is a failure
        message = "ltfast._C was built without its CUDA kernels (no nvcc): rebuild with LTFAST_CUDA=1"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert cuda_ops == set(simt_support.emulated_ops())


def test_expf_emulates_the_rounding_of_x_log2e():
    # CUDA documents __expf's maximum error as 2 + floor(|1.16 x|) ulp: it computes ex2.approx of
    # x * log2(e) rounded to float32, whose rounding error grows with |x|. The emulator reproduces
    # that rounding (not ex2.approx's own <= 2 ulp), so the kernels' fast exp is tested with an
    # error of the GPU's size, not with the host's correctly rounded expf.
    x = torch.linspace(-87.0, 88.0, 20001, dtype=torch.float32)
    got = torch.ops.ltfast_simt.selftest_expf(x).double()
    exact = torch.exp(x.double())
    ulp = torch.nextafter(exact.float(), torch.tensor(float("inf"))).double() - exact.float().double()
    allowed = 2 + torch.floor(1.16 * x.double().abs())
    assert ((got - exact).abs() / ulp <= allowed).all()
    assert not torch.equal(got, torch.exp(x).double())  # the emulated error is really there
