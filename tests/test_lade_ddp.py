"""LADELoss(gather_batch=True) under DDP with 2 CPU processes (gloo): the loss on every rank and the
DDP-averaged parameter gradients equal the single-process loss and gradients on the whole batch."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ltfast
from ddp_support import leave_worker, leave_worker_after_error

COUNTS = [400, 150, 60, 20, 8, 3, 1]
SIZES = (13, 11)  # unequal local batches: the gather pads with ignored rows


def make_problem():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(sum(SIZES), 16, generator=gen)
    target = torch.randint(0, len(COUNTS), (sum(SIZES),), generator=gen)
    target[5] = -100
    torch.manual_seed(1)
    model = torch.nn.Linear(16, len(COUNTS))
    return features, target, model


def worker(rank, world, init_file, out_dir, gather):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features, target, model = make_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        start = sum(SIZES[:rank])
        local = slice(start, start + SIZES[rank])
        criterion = ltfast.nn.LADELoss(COUNTS, gather_batch=gather)
        loss = criterion(ddp(features[local]), target[local])
        loss.backward()
        torch.save({"loss": loss.detach(), "weight_grad": model.weight.grad, "bias_grad": model.bias.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_worker_after_error()
    leave_worker()


def run(gather):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, os.path.join(tmp, "store"), tmp, gather), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_gather_batch_matches_single_process():
    features, target, model = make_problem()
    criterion = ltfast.nn.LADELoss(COUNTS)
    single = criterion(model(features), target)
    single.backward()

    results = run(gather=True)
    for rank in range(2):
        torch.testing.assert_close(results[rank]["loss"], single.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank]["weight_grad"], model.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank]["bias_grad"], model.bias.grad, rtol=1e-5, atol=1e-6)

    # Without gathering each rank sees its own 13 or 11 rows: a different estimator.
    local = run(gather=False)
    assert not torch.allclose(local[0]["loss"], single.detach(), rtol=1e-3)
