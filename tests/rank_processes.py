"""Spawning the ranks of a data-parallel test. A module of its own, not ``conftest``: a spawned rank re-imports
its test module, and there ``conftest`` may name the repository root's instead of this folder's."""

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _run_then_exit(rank: int, worker, args: tuple) -> None:
    """``worker(rank, *args)``, then leave at once. Under torch 2.14.1 a gloo rank occasionally aborts in the
    interpreter's teardown ("terminate called without an active exception", SIGABRT) after its work and its
    ``destroy_process_group`` are done; a finished rank therefore skips that teardown. A rank that raises
    still exits with the error."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker, args: tuple, out_dir: str, nprocs: int, timeout_s: float) -> list:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes, each saving ``rank{r}.pt`` in ``out_dir``;
    the saved objects by rank. Kills them all and raises ``TimeoutError`` after ``timeout_s`` (a collective
    one rank never joins hangs the others)."""
    context = mp.start_processes(
        _run_then_exit, args=(worker, args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"the {nprocs} DDP workers did not finish within {timeout_s} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]



def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world: int, port: int) -> None:
    """Set the environment ``torchrun`` gives rank ``rank`` of ``world`` on one node (the frameworks' launchers
    read it), offline, one thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        NODE_RANK="0",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
