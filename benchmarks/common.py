"""Timing helpers and the JSON record shared by every benchmark suite (see DESIGN.md "Benchmarks")."""
from __future__ import annotations

import platform
import statistics  # noqa: F401  (re-exported for the suites)
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Record:
    suite: str
    name: str
    impl: str
    device: str
    device_name: str
    dtype: str
    shape: list
    mode: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float | None
    items_per_s: float | None
    extra: dict = field(default_factory=dict)


def keep_freed_memory_in_the_heap() -> bool:
    """glibc returns freed blocks of more than 32 MB of heap top to the OS after every call, so the
    next [4096, 1000] allocation page-faults and zeroes 16 MB again (eager fwd: 12.6 ms instead of
    2.9 ms here). That measures the allocator, not the loss: raise the trim threshold for every
    implementation alike, as a caching allocator (jemalloc, tcmalloc) would."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # mallopt takes C ints: 1 GiB is the largest round trim threshold that fits.
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_memory_mb(fn, device: str) -> float | None:
    """MiB allocated at the peak of one call above what was in use before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_interleaved(calls: dict, device: str, min_time_s: float, max_reps: int, warmup: int):
    """Times the implementations round-robin, one call each per round, until min_time_s has
    passed (at least 5, at most max_reps rounds), so that a slow spell of a shared machine hits
    every implementation alike. Returns {impl: [ms per call]}."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {impl: [] for impl in calls}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < 5 or time.perf_counter() - start_all < min_time_s * len(calls)):
        for impl, fn in calls.items():
            times[impl].append(time_call(fn, device))
        rounds += 1
    return times


def percentile(values, q):
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def loss_calls(functions: dict, x, loss_of, mode: str) -> dict:
    """One zero-argument call per implementation: ``loss_of(fn, x)`` forward under no_grad
    (``mode='fwd'``) or forward and backward into ``x.grad`` (``'fwd_bwd'``)."""
    calls = {}
    for impl, fn in functions.items():
        if mode == "fwd":
            def call(fn=fn):
                with torch.no_grad():
                    loss_of(fn, x)
        else:
            def call(fn=fn):
                x.grad = None
                loss_of(fn, x).backward()
        calls[impl] = call
    return calls


# Host-overhead and small-batch shapes (loss and compat suites); single-threaded on the CPU.
OVERHEAD_SHAPES = [(1, 2), (64, 1000)]


def is_overhead_shape(shape) -> bool:
    return tuple(shape) in OVERHEAD_SHAPES


class SingleThread:
    """torch.set_num_threads(1) for the overhead rows on the CPU, restored afterwards."""

    def __init__(self, active: bool):
        self.active, self.saved = active, torch.get_num_threads()

    def __enter__(self):
        if self.active:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def out_of_budget(args) -> bool:
    deadline = getattr(args, "deadline", None)
    return deadline is not None and time.monotonic() > deadline
