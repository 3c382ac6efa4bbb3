"""Starting train.py the ways users do (plain python, hand-set rank environment, mpirun) and reading runs back.

The `deepspeed` launcher itself is `launch()` in test_deepspeed_e2e; these helpers cover the other launchers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.dist_utils import free_port
from tests.training.test_deepspeed_e2e import LOSS_KEYS, ROOT, TINY, _env

TRAIN = str(ROOT / "train.py")


def python_cmd(run_dir: Path, *overrides: str) -> list[str]:
    """One process, no launcher: the debugging path of the README."""
    return [sys.executable, TRAIN, "--config", str(TINY), f"--train.run_dir={run_dir}", *overrides]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_ranks(run_dir: Path, world: int, *overrides: str, log_dir: Path) -> list[subprocess.Popen]:
    """`world` plain processes with RANK/WORLD_SIZE/MASTER_* set by hand, as torchrun would set them."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = _env()
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_PORT=str(port))
        out = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen([sys.executable, TRAIN, "--config", str(TINY), f"--train.run_dir={run_dir}",
                                       *overrides], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss/gcpr" in rec:
            steps.append(int(rec["step"]))
    return steps


def wait_for_step(run_dir: Path, step: int, procs=(), timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if max(logged_steps(run_dir), default=0) >= step:
            return
        dead = [p.returncode for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"a rank exited ({dead}) before step {step} was logged")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not logged in {run_dir} within {timeout} s")


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def assert_same_losses(got: dict[int, dict[str, float]], want: dict[int, dict[str, float]], steps) -> None:
    """fp32 on the CPU with the same world size: the resumed run reproduces the uninterrupted one exactly."""
    for step in steps:
        assert step in got, f"step {step} missing after resume (have {sorted(got)})"
        for k in LOSS_KEYS:
            assert got[step][k] == want[step][k], (step, k, got[step][k], want[step][k])


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of RUN_DIR/tensorboard as (step, value) per tag, files read in TensorBoard's order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else float(v.tensor.float_val[0])
                out.setdefault(v.tag, []).append((event.step, value))
    return out
