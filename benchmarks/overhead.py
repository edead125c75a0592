"""Host overhead of one training-step loss call: forward+backward at 1 x 2 on the CPU, 1 thread,
where the kernels cost nothing and what is left is Python, dispatch and autograd. Compares
ltfast.nn.BalancedSoftmaxLoss, the functional, torch.ops and the C entry point with eager
F.cross_entropy(z + log_prior, y), interleaved rounds, CPU time per call (time.thread_time: stable
when the 2 shared cores are loaded, where wall time was inflated up to 9x), median over rounds.

    python benchmarks/overhead.py [--rounds 15]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ltfast  # noqa: E402
import ltfast.nn  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    counts = [10, 3]
    z = torch.randn(1, 2, requires_grad=True)
    y = torch.tensor([1])
    module = ltfast.nn.BalancedSoftmaxLoss(counts)
    log_prior = ltfast.priors.log_prior(counts)

    def step(loss_fn):
        def run():
            z.grad = None
            loss_fn().backward()
        return run

    paths = {
        "eager F.cross_entropy(z + log_prior, y)": step(lambda: F.cross_entropy(z + log_prior, y)),
        "ltfast.nn.BalancedSoftmaxLoss": step(lambda: module(z, y)),
        "ltfast.balanced_softmax_loss": step(lambda: ltfast.balanced_softmax_loss(z, y, log_prior)),
        "torch.ops.ltfast.balanced_softmax": step(lambda: torch.ops.ltfast.balanced_softmax(z, y, log_prior)),
    }
    for run in paths.values():  # warm-up: allocator, first-call caches
        for _ in range(500):
            run()
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            start = time.thread_time()
            for _ in range(args.calls):
                run()
            times[name].append((time.thread_time() - start) / args.calls * 1e6)
    eager = statistics.median(times["eager F.cross_entropy(z + log_prior, y)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:42s} {median:6.1f} us per fwd+bwd  ({median / eager:.2f}x eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
