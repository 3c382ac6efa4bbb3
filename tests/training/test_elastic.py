"""Elastic resume: a run saved by 2 ranks continues on 1, then on 2 again, through DeepSpeed's universal
checkpoints (`python -m r2d2ds.checkpoint to-universal RUN_DIR`), with DataLoader workers whose data positions
are remapped across the rank/worker slots (the exact coverage itself is proven in tests/data/test_elastic_positions).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.training.launchers import logged_steps, ok, python_cmd, run
from tests.training.test_deepspeed_e2e import ROOT, dataset, launch, losses

pytestmark = pytest.mark.slow
__all__ = ["dataset"]


def _samples_seen(run_dir) -> dict[int, int]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/samples_seen"] for r in recs if "loss/gcpr" in r}


def _convert(run_dir):
    return ok(run([sys.executable, "-m", "r2d2ds.checkpoint", "to-universal", str(run_dir), "--workers", "1"]))


def test_two_to_one_to_two_ranks(dataset, tmp_path):
    run_dir = tmp_path / "run"
    common = [f"--data.train={dataset}", f"--train.ds_config={ROOT}/ds_configs/zero2.json", "--train.ckpt_every=2",
              "--data.num_workers=2"]
    launch(run_dir, *common, "--train.steps=4")  # 2 ranks x 2 workers, 8 samples per rank and step

    # Another world size without a conversion: refused, naming the command and the alternative.
    refused = run(python_cmd(run_dir, *common, "--train.steps=6", "--resume"))
    assert refused.returncode == 2
    assert "r2d2ds.checkpoint to-universal" in refused.stderr and "resume on 2 rank(s)" in refused.stderr, \
        refused.stderr[-2000:]

    _convert(run_dir)
    assert (run_dir / "checkpoints" / "step00000004_universal" / "r2d2ds-universal.json").is_file()
    # The universal checkpoint holds the same weights: a finished run resumed on 1 rank exports what the
    # 2-rank checkpoint consolidates to.
    from safetensors.torch import load_file

    from r2d2ds.export import export_from_checkpoint

    export_from_checkpoint(run_dir, tmp_path / "from_two", tag="step00000004")
    shutil.rmtree(run_dir / "model")  # the 2-rank run's own export
    finished = ok(run(python_cmd(run_dir, *common, "--train.steps=4", "--resume")))
    assert "resumed from step00000004" in finished.stderr and "already finished at step 4" in finished.stderr
    want = load_file(tmp_path / "from_two" / "model.safetensors")
    got = load_file(run_dir / "model" / "model.safetensors")
    assert sorted(want) == sorted(got) and all(want[k].equal(got[k]) for k in want)

    one = ok(run(python_cmd(run_dir, *common, "--train.steps=6", "--resume")))  # 1 rank x 2 workers
    assert "resumed from step00000004" in one.stderr and "different layout" not in one.stderr + one.stdout
    _convert(run_dir)  # step 6, written by 1 rank
    two = launch(run_dir, *common, "--train.steps=8", "--resume")
    assert "resumed from step00000006" in two.stdout + two.stderr

    assert logged_steps(run_dir) == list(range(1, 9))  # each step once
    # 16 samples per step on 2 ranks, 8 on 1: the count carries over every change of world size.
    assert _samples_seen(run_dir) == {1: 16, 2: 32, 3: 48, 4: 64, 5: 72, 6: 80, 7: 96, 8: 112}
    got_losses = losses(run_dir)
    assert all(v == v and 0 < v < 100 for s in got_losses.values() for v in s.values())  # finite, trained on


def test_elastic_fallback_resumes_from_the_previous_converted_checkpoint(dataset, tmp_path):
    """ZeRO-3, 2 ranks -> 1: the newest conversion is damaged (its consolidated EMA teacher truncated). Without
    train.resume_fallback the error names the file; with it the run resumes from the previous converted
    checkpoint, sets the bad one aside and trains on, every step logged once."""
    from tests.training.test_deepspeed_e2e import ds_config_for

    run_dir = tmp_path / "run"
    common = [f"--data.train={dataset}", f"--train.ds_config={ds_config_for(3, tmp_path)}", "--train.ckpt_every=2"]
    launch(run_dir, *common, "--train.steps=4")
    root = run_dir / "checkpoints"
    _convert(run_dir)
    ok(run([sys.executable, "-m", "r2d2ds.checkpoint", "to-universal", str(run_dir), "--tag", "step00000002",
            "--workers", "1"]))
    teacher = root / "step00000004_universal" / "r2d2ds-teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:-100])

    refused = run(python_cmd(run_dir, *common, "--train.steps=6", "--resume"))
    assert refused.returncode == 2 and str(teacher) in refused.stderr and "resume_fallback" in refused.stderr, \
        refused.stderr[-2000:]
    one = ok(run(python_cmd(run_dir, *common, "--train.steps=6", "--resume", "--train.resume_fallback=true")))
    assert "resumed from step00000002" in one.stderr, one.stderr[-3000:]
    assert (root / "step00000004.corrupt").is_dir() and (root / "step00000004_universal.corrupt").is_dir()
    assert logged_steps(run_dir) == list(range(1, 7))
    assert _samples_seen(run_dir) == {1: 16, 2: 32, 3: 40, 4: 48, 5: 56, 6: 64}
    assert json.loads((root / "step00000006" / "r2d2ds-checkpoint.json").read_text())["world_size"] == 1

    # Back on 2 ranks to step 8, then that 2-rank checkpoint is damaged: resumed on 1 rank with the fallback, the
    # run goes back to the 1-rank step 6, a same-size load (the engine is built after the choice, without the
    # universal loader the damaged newest checkpoint would have needed).
    _convert(run_dir)
    launch(run_dir, *common, "--train.steps=8", "--resume")
    bad = root / "step00000008" / "rank0.safetensors"
    bad.write_bytes(bad.read_bytes()[:50])
    back = ok(run(python_cmd(run_dir, *common, "--train.steps=8", "--resume", "--train.resume_fallback=true")))
    assert "resumed from step00000006" in back.stderr and str(bad) in back.stderr, back.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, 9))
    assert _samples_seen(run_dir) == {1: 16, 2: 32, 3: 40, 4: 48, 5: 56, 6: 64, 7: 72, 8: 80}
