"""Run-directory lifecycle: never silently restart over a previous run; keep metrics.jsonl and the TensorBoard
events free of duplicates after a resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from r2d2ds import checkpoint
from r2d2ds.config import ConfigError
from r2d2ds.fileio import atomic_write_text

METRICS = "metrics.jsonl"
# What a fresh start in an existing run directory removes with train.overwrite (model/ is replaced by the export).
TENSORBOARD = "tensorboard"
_RUN_OUTPUTS = ("checkpoints", METRICS, "eval.json", TENSORBOARD)
# DeepSpeed's monitor logs its own scalars (Train/Samples/lr, ...) against samples, not optimizer steps.
_SAMPLE_AXIS_PREFIX = "Train/Samples/"


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


def truncate_tensorboard(run_dir: str | Path, step: int, samples: int) -> int:
    """Drop TensorBoard scalars past the resumed position from the event files already in RUN_DIR/tensorboard
    (rank 0, at start or resume), as `truncate_metrics` does for metrics.jsonl; returns how many were dropped.

    Each resume opens a new event file and logs the steps after the checkpoint again: left alone, TensorBoard
    would draw two points for each of them (and a line folding back). TensorBoard's own remedy, a SummaryWriter
    `purge_step` (a SessionLog.START event), discards everything at or past that step in every tag, which would
    also wipe DeepSpeed's sample-indexed `Train/Samples/*` scalars (their steps are sample counts). So each old
    file is rewritten without the values past `step` (past `samples` for DeepSpeed's tags), atomically (temp
    file, fsync, rename, same name so the files keep their order); files with nothing to drop, such as the one
    the new writer just opened, are not touched. A record torn by a kill mid-write ends a file's readable
    events (TensorBoard reads it the same way) and goes with the rewrite."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer.record_writer import RecordWriter

    root = Path(run_dir) / TENSORBOARD
    if not root.is_dir():
        return 0
    total = 0
    for path in sorted(p for p in root.rglob("events.out.tfevents.*") if p.is_file() and not p.name.endswith(".tmp")):
        kept, dropped = [], 0
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary"):
                values = [v for v in event.summary.value
                          if event.step <= (samples if v.tag.startswith(_SAMPLE_AXIS_PREFIX) else step)]
                dropped += len(event.summary.value) - len(values)
                if not values:
                    continue
                del event.summary.value[:]
                event.summary.value.extend(values)
            elif event.step > step and not event.HasField("file_version"):
                dropped += 1
                continue
            kept.append(event)
        if not dropped:
            continue
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for event in kept:
                writer.write(event.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        total += dropped
    return total
