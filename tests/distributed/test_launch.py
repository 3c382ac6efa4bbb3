"""Rank discovery for each launcher (environment only; the real launches are in tests/training and tests/slurm)."""

from __future__ import annotations

import pytest

from r2d2ds.distributed.launch import discover


def test_deepspeed_or_torchrun_environment_is_taken_as_is():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29501",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}  # a launcher inside an srun step wins over Slurm
    got = discover(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == \
        (3, 4, 1, "10.0.0.5", 29501, "env")


def test_rank_env_without_port_fails_by_name():
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_srun_step_maps_slurm_variables_and_agrees_on_the_port():
    base = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
            "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16"}
    a = discover({**base, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_ADDR": "gpu07"})
    b = discover({**base, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "MASTER_ADDR": "gpu07"})
    assert (b.rank, b.world_size, b.local_rank, b.launcher) == (9, 16, 1, "slurm")
    assert a.master_port == b.master_port and 10000 <= a.master_port < 30000
    other_job = discover({**base, "SLURM_JOB_ID": "4243", "SLURM_PROCID": "0", "MASTER_ADDR": "gpu07"})
    assert other_job.master_port != a.master_port
    one_node = discover({**base, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})
    assert one_node.master_addr == "127.0.0.1" and one_node.world_size == 2


def test_plain_python_inside_a_batch_script_is_one_process():
    # The batch step carries SLURM_PROCID/SLURM_NTASKS too, but no SLURM_STEP_NUM_TASKS: not an srun step.
    got = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_LOCALID": "0"})
    assert (got.rank, got.world_size, got.launcher) == (0, 1, "single")


def test_nothing_set_is_one_process_on_loopback():
    got = discover({})
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.launcher) == \
        (0, 1, 0, "127.0.0.1", "single")
    assert got.master_port > 0


def _stuck_peer(rank: int, port: int, out: str) -> None:
    import os
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch
    import torch.distributed as dist

    from r2d2ds.distributed.launch import init_distributed

    init_distributed(timeout_s=4)
    if rank == 1:  # alive but never joins the collective (a hung or SIGSTOPped rank), until rank 0 is done
        t0 = time.monotonic()
        while not os.path.exists(out) and time.monotonic() - t0 < 600:
            time.sleep(0.5)
        return
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        result = "returned"
    except Exception as e:  # gloo raises on the timeout
        result = f"raised {type(e).__name__}"
    with open(out, "w") as f:
        f.write(f"{result} {time.monotonic() - t0:.2f}")


@pytest.mark.slow
def test_collective_timeout_reaches_the_process_group(tmp_path):
    """train.collective_timeout_s is really the process group's timeout: a peer that never joins an all-reduce
    makes it fail after about that long (gloo), not after DeepSpeed's default 10 minutes."""
    import multiprocessing as mp

    from tests.dist_utils import free_port

    ctx = mp.get_context("spawn")
    port, out = free_port(), str(tmp_path / "rank0.txt")
    procs = [ctx.Process(target=_stuck_peer, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    # Generous: on a loaded 2-core machine the first DeepSpeed import and init take minutes. Killing a rank
    # inside init could leave torch's JIT-extension lock file behind, so the ranks end on their own.
    for p in procs:
        p.join(600)
    result, elapsed = open(out).read().rsplit(" ", 1)
    assert result.startswith("raised"), result
    assert 3.0 <= float(elapsed) < 30.0, elapsed


class _FakeBuilder:
    """Stands in for a DeepSpeed op builder: load() records whether torch's build lock was there (torch would
    wait on it forever) and returns a module-like marker."""

    name = "r2d2ds_test_op"

    def __init__(self, build_dir):
        self.build_dir, self.saw_lock = build_dir, None

    def load(self):
        self.saw_lock = (self.build_dir / "lock").exists()
        return "module"


def test_jit_op_load_removes_a_build_lock_left_by_a_killed_process(tmp_path, monkeypatch, caplog):
    from r2d2ds.distributed.launch import load_jit_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = _FakeBuilder(tmp_path / _FakeBuilder.name)
    builder.build_dir.mkdir()
    (builder.build_dir / "lock").touch()  # what torch's FileBaton leaves when its holder is SIGKILLed
    assert load_jit_op(builder) == "module"
    assert builder.saw_lock is False and not (builder.build_dir / "lock").exists()
    assert "stale JIT build lock" in caplog.text


def test_jit_op_load_waits_for_a_live_builder_instead_of_breaking_its_lock(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    from r2d2ds.distributed.launch import load_jit_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = _FakeBuilder(tmp_path / _FakeBuilder.name)
    builder.build_dir.mkdir()
    # A live r2d2ds builder: holds the flock, has torch's lock, finishes its build after a moment.
    live = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"g = open({str(builder.build_dir / '.r2d2ds.flock')!r}, 'a'); fcntl.flock(g, fcntl.LOCK_EX)\n"
        f"lock = {str(builder.build_dir / 'lock')!r}; open(lock, 'w').close()\n"
        "print('building', flush=True); time.sleep(1.5); os.unlink(lock)\n")], stdout=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "building"
    t0 = time.monotonic()
    assert load_jit_op(builder) == "module"
    assert time.monotonic() - t0 > 0.5  # it waited for the builder's flock
    assert builder.saw_lock is False  # and found the lock removed by its owner, not broken by us
    assert live.wait(timeout=30) == 0
