"""The two ends of a two-process DDP test's worker (torch.multiprocessing.spawn, gloo on the CPU).

Why a worker leaves by ``os._exit`` once its results are on disk: a worker that ran a backward under
DDP and then returned normally died with SIGABRT at interpreter exit ("terminate called without an
active exception") in 3 of ~85 runs of test_reslt's DDP test on this project's 2-core machine
(torch 2.14.1), and once in CI. The core dump's stack, in the gloo worker thread:
``ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> ~ThreadLocalState -> SafePyObject decref ->
gil_scoped_acquire -> take_gil -> PyThread_exit_thread -> forced unwind -> std::terminate``, while the
main thread was in ``Py_FinalizeEx``. torch's backward stashes a ``contextvars.Context`` in the
thread-local state (``torch.autograd.graph._engine_run_backward``), each gloo work snapshots that
state, and the worker thread drops the last reference to a finished all-reduce only after the
collective's waiters were released; when it gets the GIL after finalisation has begun, the process
aborts. ``destroy_process_group`` does not join gloo's threads (the DDP reducer still holds the
group). Skipping interpreter finalisation once everything is written removes the race; a worker that
raised still goes through ``torch.multiprocessing``'s error reporting.

``python -m ltfast.train`` is not exposed in the same way: its last collectives (evaluation's
gathers and the final barrier) are not issued from a backward, so their work holds no Python object.
"""
from __future__ import annotations

import os
import socket
import sys

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_torchrun_environment(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets, for code that initialises the group itself (the trainer)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def leave_worker() -> None:
    """Call at the end of a worker that succeeded: a barrier (no rank tears its connections down
    while another still uses them), the group destroyed, then exit 0 without finalisation."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave_worker_after_error() -> None:
    """Call from ``finally``: tears the group down when the worker is leaving by an exception."""
    if dist.is_initialized():
        dist.destroy_process_group()
