"""Checkpoint files r2d2ds writes itself (no pickle), manifest verification, fallback choice, run-dir rules.

Fast: no DeepSpeed engine. The end-to-end paths (kill during save, resume) are in tests/training/.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from r2d2ds import checkpoint, rundir
from r2d2ds.checkpoint import MANIFEST, CheckpointError
from r2d2ds.config import ConfigError


def test_rank_state_roundtrip_restores_every_generator_without_pickle(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached gaussian is part of NumPy's state
    state = {"data": {"epoch": 2, "slots": [[2, 17, 3]], "skip_reasons": {"corrupt_image": 1}},
             "rng": checkpoint.rng_state(), "skipped_total": 7}
    want = (random.random(), np.random.random(), np.random.normal(), torch.rand(3))
    path = tmp_path / "rank0.safetensors"
    checkpoint.write_rank_state(path, state)
    raw = path.read_bytes()
    assert raw[8:9] == b"{" and b"PK" != raw[:2]  # safetensors (length + JSON header), not torch.save's zip
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    back = checkpoint.read_rank_state(path)
    checkpoint.set_rng_state(back["rng"])
    got = (random.random(), np.random.random(), np.random.normal(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    assert back["data"] == state["data"] and back["skipped_total"] == 7
    # The file is plain safetensors: readable without torch.load.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["data"]["epoch"] == 2


def test_truncated_rank_state_names_the_file(tmp_path):
    path = tmp_path / "rank1.safetensors"
    checkpoint.write_rank_state(path, {"rng": checkpoint.rng_state()})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="rank1.safetensors"):
        checkpoint.read_rank_state(path)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.read_rank_state(tmp_path / "rank5.safetensors")


def _fake_tag(run_dir, step: int, world: int = 1, complete: bool = True) -> str:
    tag = checkpoint.tag_for(step)
    d = checkpoint.checkpoint_dir(run_dir) / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    for r in range(world):
        checkpoint.write_rank_state(d / f"rank{r}.safetensors", {"rng": checkpoint.rng_state()})
    if complete:
        files = {p.name: p.stat().st_size for p in d.iterdir()}
        (d / MANIFEST).write_text(json.dumps({"format": checkpoint.FORMAT, "step": step, "world_size": world,
                                              "files": files}))
    return tag


def _commit(run_dir, tag: str) -> None:
    (checkpoint.checkpoint_dir(run_dir) / "latest").write_text(tag + "\n")


def test_verify_names_missing_truncated_and_incomplete(tmp_path):
    t2 = _fake_tag(tmp_path, 2)
    assert checkpoint.verify(tmp_path, t2, world=1, rank=0) is None
    model = checkpoint.checkpoint_dir(tmp_path) / t2 / "mp_rank_00_model_states.pt"
    model.write_bytes(b"x" * 60)
    assert "mp_rank_00_model_states.pt" in checkpoint.verify(tmp_path, t2, 1, 0)
    assert "truncated" in checkpoint.verify(tmp_path, t2, 1, 0)
    model.unlink()
    assert "is missing" in checkpoint.verify(tmp_path, t2, 1, 0)
    t4 = _fake_tag(tmp_path, 4, complete=False)
    assert "interrupted" in checkpoint.verify(tmp_path, t4, 1, 0)
    t6 = _fake_tag(tmp_path, 6, world=2)
    with pytest.raises(CheckpointError, match="written by 2 rank"):
        checkpoint.verify(tmp_path, t6, 1, 0)


def test_choose_uses_latest_refuses_a_bad_one_and_falls_back_only_when_asked(tmp_path):
    cpu = torch.device("cpu")
    assert checkpoint.choose(tmp_path, fallback=False, device=cpu) is None
    _fake_tag(tmp_path, 2)
    t4 = _fake_tag(tmp_path, 4)
    _commit(tmp_path, t4)
    _fake_tag(tmp_path, 6, complete=False)  # an interrupted save after the commit
    assert checkpoint.choose(tmp_path, False, cpu) == t4
    bad = checkpoint.checkpoint_dir(tmp_path) / t4 / "rank0.safetensors"
    bad.write_bytes(bad.read_bytes()[:10])
    with pytest.raises(CheckpointError) as err:
        checkpoint.choose(tmp_path, False, cpu)
    assert "rank0.safetensors" in str(err.value) and "resume_fallback" in str(err.value)
    assert checkpoint.choose(tmp_path, True, cpu) == checkpoint.tag_for(2)
    # The bad checkpoint is kept aside for inspection and `latest` names the one resumed from.
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_for(2)
    assert (checkpoint.checkpoint_dir(tmp_path) / f"{t4}.corrupt" / "rank0.safetensors").is_file()
    assert checkpoint.tag_for(4) not in checkpoint.tags(tmp_path)


def test_choose_without_latest_takes_the_newest_complete_tag(tmp_path):
    _fake_tag(tmp_path, 2)
    _fake_tag(tmp_path, 4, complete=False)  # killed before the manifest of the first commit
    assert checkpoint.choose(tmp_path, False, torch.device("cpu")) == checkpoint.tag_for(2)


def test_only_interrupted_saves_and_no_latest_start_from_scratch(tmp_path):
    _fake_tag(tmp_path, 3, complete=False)  # killed during the very first save
    assert checkpoint.choose(tmp_path, False, torch.device("cpu")) is None


def _fake_universal(run_dir, tag: str) -> Path:
    """A conversion as `to-universal` marks it: its files with their sizes and the source manifest's digest."""
    root = checkpoint.checkpoint_dir(run_dir)
    out = root / (tag + checkpoint.UNIVERSAL_SUFFIX)
    (out / "zero" / "w").mkdir(parents=True)
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"y" * 50)
    (out / "mp_rank_00_model_states.pt").write_bytes(b"z" * 30)
    files = {str(f.relative_to(out)): f.stat().st_size for f in out.rglob("*") if f.is_file()}
    (out / checkpoint.UNIVERSAL_DONE).write_text(json.dumps(
        {"files": files, "manifest_sha256": checkpoint._manifest_sha(root / tag)}))
    return out


def test_elastic_fallback_passes_over_a_bad_checkpoint_or_conversion_to_a_converted_one(tmp_path):
    """Resuming 2 ranks' checkpoints on 1 rank: a corrupt newest checkpoint, or a damaged conversion of it, is
    named; with train.resume_fallback the newest earlier converted checkpoint is used, its bad successor and the
    successor's conversion are set aside; an earlier one never converted is named with its conversion command."""
    cpu = torch.device("cpu")
    root = checkpoint.checkpoint_dir(tmp_path)
    t2, t4 = _fake_tag(tmp_path, 2, world=2), _fake_tag(tmp_path, 4, world=2)
    _commit(tmp_path, t4)
    with pytest.raises(CheckpointError, match=f"to-universal {tmp_path} --tag {t4}"):
        checkpoint.choose(tmp_path, True, cpu)  # intact but never converted: never passed over for an older one
    conv4 = _fake_universal(tmp_path, t4)
    assert checkpoint.choose(tmp_path, False, cpu) == t4 and checkpoint.is_elastic(tmp_path, t4, world=1)

    # A damaged conversion is named like a damaged checkpoint.
    fp32 = conv4 / "zero" / "w" / "fp32.pt"
    fp32.write_bytes(b"y" * 20)
    with pytest.raises(CheckpointError) as err:
        checkpoint.choose(tmp_path, False, cpu)
    assert str(fp32) in str(err.value) and "truncated" in str(err.value) and t2 in str(err.value)
    # The earlier checkpoint was not converted: the error names the command for exactly that tag.
    with pytest.raises(CheckpointError, match=f"to-universal {tmp_path} --tag {t2}"):
        checkpoint.choose(tmp_path, True, cpu)
    assert checkpoint.latest_tag(tmp_path) == t4  # nothing moved while no good checkpoint was found

    # A corrupt rank file of the newest checkpoint (its conversion repaired) is named too; with the earlier one
    # converted, the fallback resumes from it.
    fp32.write_bytes(b"y" * 50)
    bad = root / t4 / "rank1.safetensors"
    bad.write_bytes(bad.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="rank1.safetensors"):
        checkpoint.choose(tmp_path, False, cpu)
    _fake_universal(tmp_path, t2)
    assert checkpoint.choose(tmp_path, True, cpu) == t2
    assert checkpoint.latest_tag(tmp_path) == t2
    assert (root / f"{t4}.corrupt").is_dir() and (root / f"{t4}_universal.corrupt").is_dir()
    assert not conv4.exists()  # a new save of step 4 cannot meet the old conversion


def test_a_conversion_of_another_checkpoint_of_the_same_step_is_not_used(tmp_path):
    t2 = _fake_tag(tmp_path, 2, world=2)
    _commit(tmp_path, t2)
    _fake_universal(tmp_path, t2)
    mf = checkpoint.checkpoint_dir(tmp_path) / t2 / MANIFEST
    mf.write_text(mf.read_text().replace('"step": 2', '"step": 2 '))  # re-saved: another manifest
    with pytest.raises(CheckpointError, match="another checkpoint"):
        checkpoint.choose(tmp_path, True, torch.device("cpu"))


def test_to_universal_names_the_bad_file_and_an_earlier_tag_to_convert(tmp_path):
    t2, t4 = _fake_tag(tmp_path, 2, world=2), _fake_tag(tmp_path, 4, world=2)
    _commit(tmp_path, t4)
    bad = checkpoint.checkpoint_dir(tmp_path) / t4 / "rank0.safetensors"
    bad.unlink()
    with pytest.raises(CheckpointError) as err:
        checkpoint.convert_to_universal(tmp_path)
    assert str(bad) in str(err.value) and f"--tag {t2}" in str(err.value)


def test_prune_keeps_the_newest_complete_and_deletes_older_partial(tmp_path):
    root = checkpoint.checkpoint_dir(tmp_path)
    for step in (1, 2, 3, 4):
        _fake_tag(tmp_path, step, complete=step != 2)
    checkpoint._prune(root, keep=2, current=checkpoint.tag_for(4))
    assert checkpoint.tags(tmp_path) == [checkpoint.tag_for(3), checkpoint.tag_for(4)]


def test_restart_guard_names_the_choices(tmp_path):
    rundir.check_restart(tmp_path, resume=False, overwrite=False)  # empty: fine
    _commit(tmp_path, _fake_tag(tmp_path, 3))
    with pytest.raises(ConfigError) as err:
        rundir.check_restart(tmp_path, resume=False, overwrite=False)
    msg = str(err.value)
    assert "train.run_dir" in msg and "--resume" in msg and "train.overwrite" in msg and "step00000003" in msg
    rundir.check_restart(tmp_path, resume=True, overwrite=False)
    rundir.check_restart(tmp_path, resume=False, overwrite=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    rundir.clear_previous_run(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_truncate_metrics_drops_steps_after_the_resume_point_and_a_torn_line(tmp_path):
    lines = [json.dumps({"step": s, "loss/gcpr": float(s)}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 5, "loss/gc')
    assert rundir.truncate_metrics(tmp_path, 2) == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_truncate_tensorboard_drops_events_past_the_resume_point_on_both_axes(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from tests.training.launchers import tensorboard_scalars

    tb = tmp_path / "tensorboard"
    first = SummaryWriter(log_dir=str(tb), filename_suffix=".a")  # the interrupted run: steps 1-4
    for step in (1, 2, 3, 4):
        first.add_scalar("loss/gcpr", float(step), step)
        first.add_scalar("Train/Samples/lr", 0.1 * step, 16 * step)  # DeepSpeed's axis: samples
    first.close()
    old = next(tb.glob("events.out.tfevents.*.a"))
    with open(old, "ab") as f:
        f.write(b"\x30\x00\x00\x00\x00\x00\x00\x00torn")  # a record cut short by a kill
    resumed = SummaryWriter(log_dir=str(tb), filename_suffix=".b")  # opened by the resumed engine, still empty
    resumed.flush()
    new = next(tb.glob("events.out.tfevents.*.b"))
    before = new.read_bytes()
    assert rundir.truncate_tensorboard(tmp_path, step=2, samples=32) == 4
    assert new.read_bytes() == before  # the live writer's file is not touched
    for step in (3, 4):  # the resumed run logs its steps again
        resumed.add_scalar("loss/gcpr", 10.0 * step, step)
        resumed.add_scalar("Train/Samples/lr", step, 16 * step)
    resumed.close()
    got = tensorboard_scalars(tmp_path)
    assert got["loss/gcpr"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [s for s, _ in got["Train/Samples/lr"]] == [16, 32, 48, 64]
    assert rundir.truncate_tensorboard(tmp_path, step=4, samples=64) == 0  # nothing past: nothing rewritten
    assert not list(tb.glob("*.tmp"))


def test_each_rank_fsyncs_only_its_own_finished_files(tmp_path, monkeypatch):
    # Rank 1 may still be renaming rank1.safetensors.tmp while rank 0 walks the directory: a rank that opened
    # another rank's temp file failed the save (FileNotFoundError) and srun then killed the other rank (143).
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank0.safetensors", "rank1.safetensors.tmp",
                 "rank1.safetensors", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (tmp_path / name).write_bytes(b"x")
    synced: dict[int, list[str]] = {}
    for rank in (0, 1):
        monkeypatch.setattr(checkpoint, "fsync_file", lambda p, r=rank: synced.setdefault(r, []).append(p.name))
        checkpoint._fsync_own_files(tmp_path, rank)
    assert sorted(synced[0]) == ["mp_rank_00_model_states.pt", "rank0.safetensors",
                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert sorted(synced[1]) == ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank1.safetensors",
                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_config_keys_for_checkpoints_and_timeouts():
    from r2d2ds.config import load_config

    cfg = load_config(None, {})
    assert cfg.train.ckpt_every > 0 and cfg.train.ckpt_every_minutes > 0  # a preemption never loses the run
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        load_config(None, ["--train.collective_timeout_s=0"])
    with pytest.raises(ConfigError, match="train.overwrite"):
        load_config(None, ["--train.overwrite=true", "--train.resume=true"])
    with pytest.raises(ConfigError, match="data.loader_timeout_s"):
        load_config(None, ["--data.loader_timeout_s=-1"])
