"""Runs that are interrupted: exact resume, a rank killed mid-step, a process killed mid-save, the restart guard,
a corrupt checkpoint, plain `python train.py` and `mpirun`. Real processes on the CPU; slow (CI runs them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.launchers import (
    assert_same_losses,
    kill_all,
    logged_steps,
    ok,
    python_cmd,
    run,
    start_ranks,
    wait_for_step,
)
from tests.training.test_deepspeed_e2e import (
    GOLDEN,
    LOSS_KEYS,
    ROOT,
    TINY,
    _env,
    dataset,
    ds_config_for,
    launch,
    losses,
)

pytestmark = pytest.mark.slow
__all__ = ["dataset"]  # the module-scoped synthetic dataset fixture, shared with the e2e tests' definition


def exact_overrides(data: Path, folder: Path) -> list[str]:
    """Everything that can break an exact resume at once: dropout, augmentation, 2 loader workers per rank,
    gradient accumulation 2 (the EMA updates once per optimizer step) and really partitioned ZeRO-3."""
    return [f"--data.train={data}", f"--train.ds_config={ds_config_for(3, folder)}",
            "--model.cross_dropout=0.1", "--model.text_config.hidden_dropout_prob=0.1",
            "--model.text_config.attention_probs_dropout_prob=0.1", "--data.augment=true", "--data.num_workers=2",
            "--train.grad_accum=2", "--train.steps=6", "--train.ckpt_every=2", "--train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("exact")
    over = exact_overrides(dataset, folder)
    launch(folder / "run", *over)
    return folder / "run", over


def test_exact_resume_with_dropout_augment_workers_accum_zero3(reference, tmp_path):
    full, over = reference
    want = losses(full)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints", resumed / "checkpoints")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    (resumed / "checkpoints" / "latest").write_text("step00000002\n")
    launch(resumed, *over, "--resume")
    assert_same_losses(losses(resumed), want, range(3, 7))
    assert logged_steps(resumed) == [1, 2, 3, 4, 5, 6]  # the records after step 2 were replaced, not doubled


def test_sigkill_of_one_rank_fails_the_other_within_the_timeout_and_resume_is_exact(reference, tmp_path):
    full, over = reference
    run_dir = tmp_path / "run"
    timeout_s = 30
    procs = start_ranks(run_dir, 2, *over, f"--train.collective_timeout_s={timeout_s}", log_dir=tmp_path)
    try:
        wait_for_step(run_dir, 3, procs)  # the step-2 checkpoint is committed; rank 1 is inside step 4
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=timeout_s + 30)
        elapsed = time.monotonic() - t0
    finally:
        kill_all(procs)
    log0 = (tmp_path / "rank0.log").read_text()
    assert rc != 0, log0[-3000:]
    assert elapsed < timeout_s + 20, f"rank 0 took {elapsed:.0f} s to notice the dead rank"
    # The plain-environment launch (torchrun's variables) is resumed by the deepspeed launcher: same ranks.
    launch(run_dir, *over, "--resume")
    assert_same_losses(losses(run_dir), losses(full), range(3, 7))
    assert sorted(set(logged_steps(run_dir))) == logged_steps(run_dir)


def test_kill_during_save_guard_fallback_and_finished_run_single_process(dataset, tmp_path):
    """Plain `python train.py` (one process, no launcher, no mpi4py needed) through a kill in the middle of saving
    step 4: the restart guard refuses a fresh start, --resume uses step 2 and reproduces steps 3 and 4, a corrupt
    latest checkpoint is named and only passed over with train.resume_fallback, a finished run is not re-saved."""
    run_dir = tmp_path / "run"
    over = [f"--data.train={dataset}", "--train.steps=4", "--train.ckpt_every=2",
            f"--train.ds_config={ROOT}/ds_configs/zero1.json"]
    env = _env()
    env["R2D2DS_FAULT_KILL_IN_SAVE"] = "4"
    killed = run(python_cmd(run_dir, *over), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert (ckpts / "step00000004").is_dir() and not (ckpts / "step00000004" / "r2d2ds-checkpoint.json").exists()
    before = losses(run_dir)
    assert sorted(before) == [1, 2, 3, 4]

    refused = run(python_cmd(run_dir, *over))
    assert refused.returncode == 2
    for choice in ("--resume", "train.run_dir", "train.overwrite", "step00000002"):
        assert choice in refused.stderr, (choice, refused.stderr[-2000:])

    resumed = ok(run(python_cmd(run_dir, *over, "--resume")))
    assert "resumed from step00000002" in resumed.stderr
    assert_same_losses(losses(run_dir), before, (3, 4))
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert (ckpts / "latest").read_text().strip() == "step00000004"

    # A finished run resumed again trains nothing and leaves its last checkpoint untouched.
    model_file = ckpts / "step00000004" / "mp_rank_00_model_states.pt"
    stamp = model_file.stat().st_mtime_ns
    again = ok(run(python_cmd(run_dir, *over, "--resume")))
    assert "already finished at step 4" in again.stderr
    assert model_file.stat().st_mtime_ns == stamp and logged_steps(run_dir) == [1, 2, 3, 4]

    # Truncate the latest checkpoint: resume names the file and refuses; the fallback flag takes step 2.
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    bad = run(python_cmd(run_dir, *over, "--resume", "--train.steps=5"))
    assert bad.returncode == 2 and "mp_rank_00_model_states.pt" in bad.stderr and "resume_fallback" in bad.stderr
    fell_back = ok(run(python_cmd(run_dir, *over, "--resume", "--train.resume_fallback=true")))
    assert "resuming from the earlier checkpoint 'step00000002'" in fell_back.stderr
    assert_same_losses(losses(run_dir), before, (3, 4))


def test_mpirun_two_ranks_reproduce_the_golden_curve(dataset, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed (scripts/env.sh installs Open MPI when run as root on Debian)")
    if subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode != 0:
        pytest.skip("mpi4py not importable in this environment")
    run_dir = tmp_path / "run"
    env = _env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl_tcp_if_include", "lo",
           "--mca", "oob_tcp_if_include", "lo", "-x", "MASTER_ADDR", "-x", "GLOO_SOCKET_IFNAME", "-x",
           "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", "-x", "TORCH_EXTENSIONS_DIR", "-x", "PATH",
           sys.executable, str(ROOT / "train.py"), "--config", str(TINY), f"--train.run_dir={run_dir}",
           f"--data.train={dataset}"]
    proc = run(cmd, env=env)
    ok(proc)
    assert "launcher=mpi" in proc.stderr or "mpi" in proc.stderr
    want = json.loads(GOLDEN.read_text())
    got = losses(run_dir)
    assert sorted(got) == [int(s) for s in sorted(want, key=int)]
    for step, rec in want.items():
        for k in LOSS_KEYS:
            assert got[int(step)][k] == pytest.approx(rec[k], rel=2e-3, abs=1e-4), (step, k)
    assert os.path.isfile(run_dir / "checkpoints" / "latest")
