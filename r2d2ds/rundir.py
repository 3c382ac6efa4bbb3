"""Run-directory lifecycle: never silently restart over a previous run; keep metrics.jsonl free of duplicates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from r2d2ds import checkpoint
from r2d2ds.config import ConfigError
from r2d2ds.fileio import atomic_write_text

METRICS = "metrics.jsonl"
# What a fresh start in an existing run directory removes with train.overwrite (model/ is replaced by the export).
_RUN_OUTPUTS = ("checkpoints", METRICS, "eval.json", "tensorboard")


def check_restart(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a directory that holds another run's checkpoints, naming the choices.
    Read-only: every rank can call it before anything is built."""
    if resume or overwrite:
        return
    found = checkpoint.tags(run_dir)
    if found or checkpoint.latest_tag(run_dir):
        latest = checkpoint.latest_tag(run_dir) or found[-1]
        raise ConfigError(
            f"config key 'train.run_dir': '{run_dir}' already holds checkpoints of a run (latest: {latest}). "
            "Pass --resume to continue that run, choose a new --train.run_dir, or pass --train.overwrite=true "
            "to delete its checkpoints and metrics and start over.")


def clear_previous_run(run_dir: str | Path) -> None:
    """train.overwrite: delete a previous run's checkpoints, metrics, eval and TensorBoard events (rank 0)."""
    for name in _RUN_OUTPUTS:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop metrics.jsonl records past `step` (rank 0, at start or resume): the steps after the checkpoint will
    be trained and logged again, and a reader must see each step once. Returns the number of records dropped.
    A torn last line (the process died mid-write) is dropped too."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            keep = int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped
