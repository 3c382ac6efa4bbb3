"""Elastic resume restores the whole training state, for ZeRO-1, 2 and 3: 2 ranks -> 1 -> 2 through universal
checkpoints, compared after each universal load with the source run's state consolidated at its own world size.

After a universal load at the new world size (tests/training/resumed_state.py writes the state, whole):
- the student's weights and fp32 master weights, the Adam moments exp_avg / exp_avg_sq and the optimizer step equal
  the source checkpoint's (loaded rigidly on the world size that wrote it) exactly (fp32);
- the EMA teacher equals the source's exactly; under ZeRO-3 it is partitioned per rank, consolidated by the
  conversion and re-partitioned for the new world size;
- the rest of the interrupted epoch is remapped: the new ranks read exactly the samples the source ranks had left
  (none twice, none already seen; the same count with the tails short of a batch);
and the training continues from there: every step logged once, samples counted across the world-size changes,
losses finite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.dist_utils import free_port
from tests.training.launchers import logged_steps, ok, python_cmd, run
from tests.training.test_deepspeed_e2e import ROOT, TINY, _env, dataset, ds_config_for, launch, losses

pytestmark = pytest.mark.slow
__all__ = ["dataset"]

DUMP = str(Path(__file__).with_name("resumed_state.py"))


def dump_resumed(run_dir: Path, world: int, out: Path, *overrides: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Resume `run_dir` on `world` ranks (hand-set rank environment, as torchrun sets it) and read back the state."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = _env()
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, DUMP, str(out), "--config", str(TINY),
                                       f"--train.run_dir={run_dir}", *overrides], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for prefix in ("student.", "teacher.", "fp32.", "exp_avg.", "exp_avg_sq."):
        assert any(k.startswith(prefix) for k in want), prefix  # every kind of state is compared
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ after the universal load, e.g. {bad[:6]}"
    # The comparison can fail: the moments were updated (not a fresh optimizer's zeros).
    assert any(want[k].abs().sum() > 0 for k in want if k.startswith("exp_avg_sq."))


def assert_same_rest_of_epoch(got: dict, want: dict) -> None:
    got_keys = [k for r in got["rest_of_epoch"] for k in r["keys"]]
    want_keys = [k for r in want["rest_of_epoch"] for k in r["keys"]]
    dup = [k for k, n in Counter(got_keys).items() if n > 1]
    assert not dup, f"samples read twice in the rest of the epoch after the remap: {dup[:5]}"
    extra = set(got_keys) - set(want_keys)  # the source ranks' rest: every sample of the epoch not yet read
    assert not extra, f"samples of the interrupted epoch read again after the remap (already seen): {sorted(extra)[:5]}"
    # Same samples left, up to the tails short of a batch that each layout drops at the epoch's end.
    got_total = len(got_keys) + sum(r["tail_dropped"] for r in got["rest_of_epoch"])
    want_total = len(want_keys) + sum(r["tail_dropped"] for r in want["rest_of_epoch"])
    assert got_total == want_total and want_keys, (got_total, want_total)


def _convert(run_dir: Path):
    return ok(run([sys.executable, "-m", "r2d2ds.checkpoint", "to-universal", str(run_dir), "--workers", "1"]))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_elastic_resume_restores_weights_teacher_moments_and_data(stage, dataset, tmp_path):
    run_dir = tmp_path / "run"
    common = [f"--data.train={dataset}", f"--train.ds_config={ds_config_for(stage, tmp_path)}",
              "--train.ckpt_every=2", "--data.num_workers=2"]
    launch(run_dir, *common, "--train.steps=4")  # 2 ranks x 2 workers, 8 samples per rank and step

    want, want_meta = dump_resumed(run_dir, 2, tmp_path / "src2.safetensors", *common, "--train.steps=6")
    _convert(run_dir)
    got, got_meta = dump_resumed(run_dir, 1, tmp_path / "uc1.safetensors", *common, "--train.steps=6")
    assert got_meta["step"] == want_meta["step"] == 4 and got_meta["samples_seen"] == 64
    assert got_meta["optimizer_steps"] == want_meta["optimizer_steps"] == [4.0]
    assert_same_state(got, want)
    assert_same_rest_of_epoch(got_meta, want_meta)

    ok(run(python_cmd(run_dir, *common, "--train.steps=6", "--resume")))  # 1 rank: steps 5, 6
    want, want_meta = dump_resumed(run_dir, 1, tmp_path / "src1.safetensors", *common, "--train.steps=8")
    _convert(run_dir)
    got, got_meta = dump_resumed(run_dir, 2, tmp_path / "uc2.safetensors", *common, "--train.steps=8")
    assert got_meta["step"] == want_meta["step"] == 6 and got_meta["optimizer_steps"] == [6.0]
    assert_same_state(got, want)
    assert_same_rest_of_epoch(got_meta, want_meta)

    two = launch(run_dir, *common, "--train.steps=8", "--resume")
    assert "resumed from step00000006" in two.stdout + two.stderr
    assert logged_steps(run_dir) == list(range(1, 9))  # each step once
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: r["train/samples_seen"] for r in recs if "loss/gcpr" in r}
    assert seen == {1: 16, 2: 32, 3: 48, 4: 64, 5: 72, 6: 80, 7: 96, 8: 112}
    assert all(v == v and 0 < v < 100 for s in losses(run_dir).values() for v in s.values())
