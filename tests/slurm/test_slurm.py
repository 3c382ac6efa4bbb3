"""slurm/train_cpu.sbatch on a real one-node Slurm (../shared/tools/slurm/slurm-up.sh): a job trains to the end,
and a job signalled like a preemption checkpoints, requeues itself, resumes and ends with the same losses.

Needs root and Debian's slurm packages (slurm-up.sh installs what is missing); CI has both. Slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.launchers import assert_same_losses, logged_steps, wait_for_step
from tests.training.test_deepspeed_e2e import ROOT, TINY, _env, dataset, losses

pytestmark = pytest.mark.slow
__all__ = ["dataset"]

STEPS = 12  # long enough to signal mid-run on 2 cores; the tiny config checkpoints every 3 steps


@pytest.fixture(scope="module")
def slurm(shared_dir) -> None:
    up = Path(shared_dir) / "tools" / "slurm" / "slurm-up.sh"
    if not up.is_file():
        pytest.skip(f"{up} not found: no local Slurm to test against")
    if os.geteuid() != 0:
        pytest.skip("bringing up a local Slurm needs root (CI runs as root)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no Debian packages for Slurm (apt-get missing and slurmctld not installed)")
    subprocess.run(["bash", str(up)], check=True, timeout=600, capture_output=True)


_submitted: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A test that fails while its job runs must not leave the job holding the one-node cluster: the next
    tests' jobs would wait behind it until they time out too."""
    yield
    for job in _submitted:
        if job_info(job).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED"):
            subprocess.run(["scancel", job], capture_output=True)
    _submitted.clear()


def submit(run_dir: Path, data: Path, log: Path, *overrides: str) -> str:
    env = _env()
    env["R2D2DS_PYTHON"] = sys.executable
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", "slurm/train_cpu.sbatch", "--config", str(TINY),
                          f"--data.train={data}", f"--train.run_dir={run_dir}", f"--train.steps={STEPS}",
                          *overrides], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job = out.stdout.strip().split(";")[0]
    _submitted.append(job)
    return job


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(job: str, log: Path, timeout: float = 420) -> dict[str, str]:
    t0, held_since = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        info = job_info(job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            # Slurm holds a requeued batch job for a while before it is eligible again (about 2 min here);
            # what matters is that it was requeued, so make it eligible now. Not before the previous instance's
            # steps are gone and slurmd has had a moment: launched while slurmd still holds the killed instance,
            # the job fails ("Job N already killed, do not launch batch job"; seen with a step that took 3 s
            # to end after the batch script).
            steps = subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True).stdout
            held_since = held_since or time.monotonic()
            if not steps.strip() and time.monotonic() - held_since >= 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        else:
            held_since = None
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not end in {timeout} s: {job_info(job)}\n"
                         f"{log.read_text()[-4000:] if log.exists() else ''}")


@pytest.fixture(scope="module")
def uninterrupted(slurm, dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm_full")
    log = folder / "job.out"
    job = submit(folder / "run", dataset, log)
    info = wait_done(job, log)
    assert info["JobState"] == "COMPLETED", (info, log.read_text()[-4000:])
    return folder / "run"


def test_cpu_sbatch_trains_to_the_end(uninterrupted):
    got = losses(uninterrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert (uninterrupted / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (uninterrupted / "model" / "model.safetensors").is_file()


def test_preempted_job_checkpoints_requeues_resumes_and_matches(uninterrupted, dataset, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(run_dir, dataset, log)
    wait_for_step(run_dir, 2, timeout=300)
    # What `#SBATCH --signal=B:USR1@N` does before the time limit, now: the batch shell's trap forwards it.
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True)
    info = wait_done(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text[-4000:])
    assert int(info.get("Restarts", "0")) >= 1, info
    assert "requeueing the job" in text and "stopped at step" in text, text[-4000:]
    stopped = int(re.search(r"stopped at step (\d+) by SIGUSR1", text).group(1))
    assert 2 <= stopped < STEPS
    assert f"resumed from step{stopped:08d}" in text
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # no step lost, none logged twice
    assert_same_losses(losses(run_dir), losses(uninterrupted), range(1, STEPS + 1))


def test_scancel_ends_the_job_for_good(slurm, dataset, tmp_path):
    # `scancel JOBID` reaches the batch shell as SIGTERM, like a preemption; Slurm accepts `scontrol requeue` of
    # the cancelled job, so a script that requeued on every stop signal brought cancelled jobs back.
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(run_dir, dataset, log)
    wait_for_step(run_dir, 1, timeout=300)
    subprocess.run(["scancel", job], check=True)
    wait_done(job, log)
    t0 = time.monotonic()
    # The batch script's own last words (its log lines end the "[r2d2ds ... restart N]" prefix), whichever path;
    # not the ranks' "exiting with 75 so the job is requeued", which comes first.
    final = re.compile(r"\] (stopped \(exit code|Slurm was already ending the job|training step ended with exit code)")
    while not final.search(log.read_text()) and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    time.sleep(5)  # a requeue would follow the script's last line at once
    text = log.read_text()
    assert "requeueing the job" not in text, text[-4000:]
    # Usually every rank writes its stop checkpoint and exits 75 (what a preemption requeues); under heavy load
    # srun may give up on the step first and end 0. Either way the script must not requeue, and says why. Under
    # heavier load still, the stop checkpoint outlasts the cluster's KillWait (10 s on the test cluster) and Slurm
    # SIGKILLs the batch shell before its last words: then only the job's end state below can be checked.
    if final.search(text) and "training step ended with exit code 0" not in text:
        assert "Slurm was already ending the job (state COMPLETING" in text, text[-4000:]
    info = job_info(job)
    assert info["JobState"] == "CANCELLED" and info.get("Restarts", "0") == "0", info
