"""Run a function on N gloo ranks on the CPU and collect each rank's return value (torchtitan-style tests)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report the rank's traceback to the parent
        result = ("error", traceback.format_exc())
    with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


def run_ranks(fn, world: int = 2, *args):
    """fn(rank, world, *args) on `world` gloo ranks; returns the list of results (tensors moved to CPU)."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_worker, args=(world, free_port(), outdir, fn, args), nprocs=world,
                           join=True, start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(outdir, f"{r}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
