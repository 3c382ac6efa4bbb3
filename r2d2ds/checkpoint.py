"""DeepSpeed checkpoints with our client state, committed atomically.

Layout: RUN_DIR/checkpoints/<tag>/ holds DeepSpeed's model/optimizer shards, `client_state` (step, samples seen,
the EMA teacher, the resolved config) inside DeepSpeed's model-states file, and one `rank<R>.pt` per rank with that
rank's data position and RNG states (they differ per rank, and DeepSpeed saves client state from rank 0 only).
RUN_DIR/checkpoints/latest names the newest COMPLETE tag: it is written (temp file + os.replace) only after every
rank has finished writing, so a crash mid-save leaves the previous checkpoint as the one --resume loads.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2d2ds import distributed as rd
from r2d2ds.fileio import atomic_write_text


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(run_dir: str | Path) -> str | None:
    f = checkpoint_dir(run_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag or None


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep: int) -> str:
    """Save on every rank (DeepSpeed requires all ranks), then commit `latest` and prune old tags on rank 0."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank_file = root / tag / f"rank{rd.get_rank()}.pt"
    tmp = rank_file.with_name(rank_file.name + ".tmp")
    torch.save(rank_state, tmp)
    os.replace(tmp, rank_file)
    rd.barrier()  # every rank's files are on disk before `latest` may point at them
    if rd.is_main_process():
        atomic_write_text(root / "latest", tag + "\n")
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
    rd.barrier()
    return tag


def load(engine, run_dir: str | Path, tag: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Load the named (or latest complete) checkpoint into `engine`; returns (client_state, rank_state)."""
    root = checkpoint_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"checkpoint '{root / tag}' named by {root / 'latest'} does not exist")
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    rank_file = root / tag / f"rank{rd.get_rank()}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint '{root / tag}' has no {rank_file.name}: it was written with a "
                                f"different number of ranks (resume needs the same world size)")
    # Our own file, written above: RNG states are tuples/arrays of plain numbers, not arbitrary objects.
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return client_state, rank_state
