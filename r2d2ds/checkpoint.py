"""DeepSpeed checkpoints plus our per-rank state: committed atomically and durably, verified before loading.

Layout of RUN_DIR/checkpoints/:
  <tag>/                        DeepSpeed's model/optimizer shards; our client state (step, samples seen, the
                                EMA teacher, the resolved config) rides in DeepSpeed's model-states file.
  <tag>/rank<R>.safetensors     rank R's own state: RNG states as tensors, data position and counters as JSON
                                in the metadata (they differ per rank; DeepSpeed saves client state on rank 0).
  <tag>/r2d2ds-checkpoint.json  the manifest: step, world size, every file of the tag with its size. Written by
                                rank 0 only after every rank has written and fsynced its files, so a tag
                                without it is an interrupted save.
  latest                        names the newest committed tag. Moved (temp file, fsync, rename, fsync of the
                                directory) only after the manifest is on disk: a crash or kill at any point of
                                a save leaves `latest` naming the previous complete checkpoint.

Loading checks the manifest against the files first (missing or truncated files are named); with
`train.resume_fallback` a bad newest checkpoint is passed over for the newest good one. Every rank must agree,
so the choice is all-reduced.

Elastic resume (another number of ranks): DeepSpeed's ZeRO shards are laid out for the world size that wrote
them, so the checkpoint is converted once into DeepSpeed's universal format (`python -m r2d2ds.checkpoint
to-universal RUN_DIR` writes <tag>_universal/ beside the tag) and the engine loads that with
`checkpoint.load_universal`. Our client state rides along (DeepSpeed copies the model-states file); the per-rank
files of every saved rank are read by every new rank, which remaps the data position from all of them. Under ZeRO-3
the EMA teacher is saved in per-rank partitions: the conversion consolidates them into whole tensors
(<tag>_universal/r2d2ds-teacher.safetensors) and every new rank cuts its own partition out of them. The
conversion is written under a temporary name and renamed when complete; its marker file lists every file with its
size, so a damaged conversion is named like a damaged checkpoint (and `train.resume_fallback` passes over it).

Trust: DeepSpeed writes its own files with torch.save (pickle) and reads them back with weights_only=False;
loading a checkpoint can therefore run code stored in it. Resume only from run directories you trust. The files
r2d2ds writes itself (rank state, manifest, `latest`) are safetensors, JSON and text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2d2ds import distributed as rd
from r2d2ds.fileio import atomic_write_text, fsync_dir, fsync_file

log = logging.getLogger("r2d2ds")

MANIFEST = "r2d2ds-checkpoint.json"
UNIVERSAL_SUFFIX = "_universal"  # <tag>_universal/: the DeepSpeed universal conversion of <tag>
UNIVERSAL_DONE = "r2d2ds-universal.json"  # written last into a complete conversion: files and their sizes
UNIVERSAL_TEACHER = "r2d2ds-teacher.safetensors"  # the ZeRO-3 EMA teacher, consolidated from every rank's partition
FORMAT = "r2d2ds-checkpoint-1"
# Fault injection for tests: R2D2DS_FAULT_KILL_IN_SAVE=<step> SIGKILLs rank 0 in the middle of saving that step
# (after DeepSpeed's shards are written, before the manifest and `latest`), like a node lost mid-save.
FAULT_ENV = "R2D2DS_FAULT_KILL_IN_SAVE"
_TAG = re.compile(r"^step(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or does not match this run. The message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def tags(run_dir: str | Path) -> list[str]:
    """Every step tag directory (complete or not), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)),
                  key=lambda t: int(_TAG.match(t).group(1)))


def latest_tag(run_dir: str | Path) -> str | None:
    f = checkpoint_dir(run_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag or None


# ------------------------------------------------------------------------------------------ rank state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as JSON-able values and tensors (no pickle needed)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": name}, collecting it under that name."""
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise CheckpointError(f"'{path}' names tensor {obj['__tensor__']!r} it does not hold")
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors, path) for v in obj]
    return obj


def write_rank_state(path: Path, state: dict[str, Any]) -> None:
    """One safetensors file: the tensors of `state`, and the rest of it as JSON in the metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta = _split_tensors(state, "state", tensors)
    data = save(tensors, metadata={"format": FORMAT, "state": json.dumps(meta)})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rank_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types on truncated or foreign files
        raise CheckpointError(f"checkpoint file '{path}' cannot be read ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file '{path}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    return _join_tensors(state, tensors, path)


# --------------------------------------------------------------------------------------------- saving


def _file_owner(name: str) -> int:
    """The rank that wrote a file of a tag: ours are rank<R>.safetensors; DeepSpeed's per-rank shards carry
    `pp_rank_<R>_` (the data-parallel rank); the rest (mp_rank_00_model_states.pt) is written by rank 0."""
    m = re.match(r"^rank(\d+)\.safetensors$", name) or re.search(r"pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else 0


def _fsync_own_files(tag_dir: Path, rank: int) -> None:
    # Each rank flushes what it wrote (on a multi-node filesystem only the writer's fsync is meaningful).
    # Another rank's temp file (rank<R>.safetensors.tmp, renamed any moment) is never ours: skip temp names.
    for p in tag_dir.iterdir():
        if p.suffix != ".tmp" and p.is_file() and _file_owner(p.name) == rank:
            fsync_file(p)


def _maybe_inject_fault(step: int) -> None:
    want = os.environ.get(FAULT_ENV)
    if want is not None and rd.is_main_process() and int(want) == step:
        log.error("%s=%s: killing rank 0 in the middle of saving step %d", FAULT_ENV, want, step)
        os.kill(os.getpid(), signal.SIGKILL)


_pruner: threading.Thread | None = None


def wait_for_pruning() -> None:
    """Block until the background deletion of old checkpoints (rank 0) has finished."""
    global _pruner
    if _pruner is not None:
        _pruner.join()
        _pruner = None


def _prune(root: Path, keep: int, current: str) -> None:
    """Keep the `keep` newest committed checkpoints; delete older tags and interrupted saves older than
    `current`. Runs in a thread on rank 0 so deleting gigabytes never stalls the other ranks' collectives."""
    names = tags(root.parent)
    complete = [t for t in names if (root / t / MANIFEST).is_file()]
    keep_set = set(complete[-keep:]) | {current}
    cur = int(_TAG.match(current).group(1))
    for t in names:
        if t not in keep_set and int(_TAG.match(t).group(1)) < cur:
            # The manifest goes first: a deletion cut short leaves an incomplete tag, never a "complete" one
            # with files missing.
            (root / t / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(root / t, ignore_errors=True)
            shutil.rmtree(root / (t + UNIVERSAL_SUFFIX), ignore_errors=True)


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep: int) -> str:
    """Save on every rank (DeepSpeed requires all ranks), commit `latest` on rank 0, prune in the background.
    Never writes into the tag that `latest` names: a committed checkpoint is immutable."""
    global _pruner
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    rank, world = rd.get_rank(), rd.get_world_size()
    if latest_tag(run_dir) == tag:  # every rank reads it, so every rank stops here (no one left in a barrier)
        raise CheckpointError(f"refusing to save step {step} over the committed checkpoint '{tag_dir}'")
    if rd.is_main_process():
        if tag_dir.exists():  # an interrupted save of the same step (fallback resume): not committed, replace
            shutil.rmtree(tag_dir)
        # A conversion of an earlier checkpoint of this step (set aside or interrupted) describes other weights.
        shutil.rmtree(root / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    rd.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    write_rank_state(tag_dir / f"rank{rank}.safetensors", rank_state)
    _maybe_inject_fault(step)
    _fsync_own_files(tag_dir, rank)
    rd.barrier()  # every rank's files are on disk before the manifest may describe them
    if rd.is_main_process():
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "tag": tag, "world_size": world,
                    "zero_stage": int(engine.zero_optimization_stage()), "files": files}
        fsync_dir(tag_dir)
        atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        fsync_dir(root)
        atomic_write_text(root / "latest", tag + "\n")
        # A deletion still running from the previous save is left alone (never waited for here, where the
        # other ranks would sit in the barrier below): this round's pruning then happens at the next save.
        if _pruner is None or not _pruner.is_alive():
            _pruner = threading.Thread(target=_prune, args=(root, keep, tag), name="r2d2ds-prune", daemon=False)
            _pruner.start()
    # No rank leaves before `latest` is committed: a launcher that kills the job when the first rank exits
    # (srun --kill-on-bad-exit, the deepspeed launcher) must not cut rank 0's commit short.
    rd.barrier()
    return tag


# -------------------------------------------------------------------------------------------- loading


def verify(run_dir: str | Path, tag: str, world: int, rank: int) -> str | None:
    """None when `tag` is a complete checkpoint this rank can load; else the problem, naming the file.
    A checkpoint of a different world size needs its complete universal conversion: raises CheckpointError,
    naming the command, when the (otherwise intact) checkpoint was never converted; falling back past it to an
    older one would silently throw away the newest good state."""
    tag_dir = checkpoint_dir(run_dir) / tag
    mf = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        return f"checkpoint directory '{tag_dir}' does not exist"
    if not mf.is_file():
        return f"'{mf}' is missing: the save of '{tag_dir}' was interrupted (incomplete checkpoint)"
    try:
        manifest = json.loads(mf.read_text())
        files = dict(manifest["files"])
        saved_world = int(manifest["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        return f"manifest '{mf}' is corrupt ({type(e).__name__}: {e})"
    for name, size in sorted(files.items()):
        p = tag_dir / name
        if not p.is_file():
            return f"checkpoint file '{p}' is missing"
        if p.stat().st_size != size:
            return f"checkpoint file '{p}' is {p.stat().st_size} bytes, the manifest says {size} (truncated?)"
    if saved_world != world:
        missing = [r for r in range(saved_world) if f"rank{r}.safetensors" not in files]
        if missing:
            return f"checkpoint '{tag_dir}' lacks the state of rank(s) {missing} ({mf})"
        # Raises, naming the conversion command, when it was never converted; names a damaged conversion's file.
        return _check_universal(tag_dir, manifest, world)
    if f"rank{rank}.safetensors" not in files:
        return f"checkpoint file '{tag_dir / f'rank{rank}.safetensors'}' is not in the manifest {mf}"
    return None


def _all_ok(ok: bool, device) -> bool:
    flag = rd.all_reduce_min(torch.tensor([1.0 if ok else 0.0], device=device))  # on the comm device
    return bool(flag.item())  # host sync: once per candidate at resume


def _set_aside(run_dir: str | Path, bad: str, good: str) -> None:
    """After falling back: keep the bad checkpoint for inspection under another name (pruning ignores it) and
    point `latest` at the good one, so the resumed run can commit its own checkpoint of the same step."""
    root = checkpoint_dir(run_dir)
    rd.barrier()  # every rank has verified `bad` before it moves
    if rd.is_main_process():
        aside = root / f"{bad}.corrupt"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(root / bad, aside)
        conv = root / (bad + UNIVERSAL_SUFFIX)
        if conv.exists():  # its conversion goes aside with it: a new save of that step must not find it
            shutil.rmtree(root / (conv.name + ".corrupt"), ignore_errors=True)
            os.replace(conv, root / (conv.name + ".corrupt"))
        atomic_write_text(root / "latest", good + "\n")
        log.warning("moved the unusable checkpoint to '%s'; 'latest' now names %s", aside, good)
    rd.barrier()


def choose(run_dir: str | Path, fallback: bool, device) -> str | None:
    """The tag to resume from (all ranks agree), or None when the run directory holds no checkpoint."""
    latest = latest_tag(run_dir)
    names = tags(run_dir)
    if latest is None and not names:
        return None
    newest_first = ([latest] if latest else []) + [t for t in reversed(names) if t != latest]
    rank, world = rd.get_rank(), rd.get_world_size()
    problems: list[str] = []
    for i, tag in enumerate(newest_first):
        problem = verify(run_dir, tag, world, rank)
        if _all_ok(problem is None, device):
            if problems:
                log.warning("resuming from the earlier checkpoint '%s' (train.resume_fallback): %s",
                            tag, "; ".join(problems))
                if latest is not None and latest != tag:
                    _set_aside(run_dir, latest, tag)
            return tag
        problems.append(problem or f"checkpoint '{tag}' is bad on another rank")
        # With `latest` present only it may be used unless the user opted into falling back; without it
        # (a crash before the first commit) a complete tag is as good as committed.
        if latest is not None and not fallback:
            later = newest_first[i + 1:]
            hint = (f"set --train.resume_fallback=true to resume from the newest earlier good checkpoint "
                    f"(candidates: {', '.join(later)})" if later else "no earlier checkpoint exists")
            raise CheckpointError(f"cannot resume: {problems[-1]}. {hint}; or start over with a new "
                                  f"train.run_dir or --train.overwrite=true")
    if latest is None:
        # Only interrupted saves and nothing ever committed (killed during the first save): like a fresh run
        # directory, start at step 0. A requeued job must not fail here forever.
        log.warning("no complete checkpoint in '%s' (%s): starting from step 0", checkpoint_dir(run_dir),
                    "; ".join(problems))
        return None
    raise CheckpointError(f"cannot resume: no complete checkpoint in '{checkpoint_dir(run_dir)}': "
                          + "; ".join(problems))


def load(engine, run_dir: str | Path, fallback: bool = False, device=None, tag: str | None = None):
    """Load `tag` (the result of `choose`, made before the engine was built) or else the latest (with `fallback`,
    the newest good) checkpoint into `engine`.

    Returns None when there is no checkpoint, else (tag, client_state, rank_state, all_rank_states):
    `rank_state` is this rank's saved state, or None after an elastic load (the checkpoint was written by
    another number of ranks: the engine must have been built with `checkpoint.load_universal`, see
    `is_elastic`); `all_rank_states()` reads the state of every saved rank."""
    if tag is None:
        tag = choose(run_dir, fallback, device if device is not None else engine.device)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    saved_world = _manifest(root / tag)["world_size"]
    elastic = saved_world != rd.get_world_size()
    if elastic != bool(engine.load_universal_checkpoint()):
        raise CheckpointError(f"checkpoint '{root / tag}' was written by {saved_world} rank(s) and this run has "
                              f"{rd.get_world_size()}, but the engine was built "
                              f"{'without' if elastic else 'with'} checkpoint.load_universal")
    load_tag = tag + UNIVERSAL_SUFFIX if elastic else tag
    try:
        path, client_state = engine.load_checkpoint(str(root), tag=load_tag)
    except Exception as e:  # unpickling a damaged file raises anything from EOFError to RuntimeError
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{root / load_tag}' "
                              f"({type(e).__name__}: {e})") from e
    if path is None or client_state is None:
        raise CheckpointError(f"DeepSpeed found no loadable model states in '{root / load_tag}' "
                              f"(files: {sorted(p.name for p in (root / load_tag).iterdir())})")
    if elastic:
        _unshare_optimizer_steps(engine)
    rank_state = None if elastic else read_rank_state(root / tag / f"rank{rd.get_rank()}.safetensors")

    def all_rank_states() -> list[dict[str, Any]]:
        return [read_rank_state(root / tag / f"rank{r}.safetensors") for r in range(saved_world)]

    return tag, client_state, rank_state, all_rank_states


# ------------------------------------------------------------------------------------------ elastic


def _unshare_optimizer_steps(engine) -> None:
    """Give every optimizer state its own `step` tensor after a universal load.

    DeepSpeed 0.19's ZeRO-3 universal load assigns ONE step tensor to the state of every fp32 sub-group
    (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3). torch's Adam/AdamW increment `step` in
    place once per sub-group, so with two parameter groups (decay / no decay) the shared counter advanced twice
    per optimizer step and the bias corrections 1 - beta^t used a wrong t from the first step after the resume."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in getattr(base, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def _manifest(tag_dir: Path) -> dict[str, Any]:
    mf = tag_dir / MANIFEST
    try:
        return json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"manifest '{mf}' cannot be read ({type(e).__name__}: {e})") from e


def _convert_hint(tag_dir: Path) -> str:
    run_dir = tag_dir.parent.parent
    return f"`python -m r2d2ds.checkpoint to-universal {run_dir} --tag {tag_dir.name}`"


def _check_universal(tag_dir: Path, manifest: dict[str, Any], world: int) -> str | None:
    """For `tag_dir` written by another world size: None when its universal conversion is complete and intact,
    the problem (naming the file) when the conversion is damaged; raises when it was never converted."""
    saved_world = int(manifest["world_size"])
    out = tag_dir.parent / (tag_dir.name + UNIVERSAL_SUFFIX)
    done = out / UNIVERSAL_DONE
    if not done.is_file():
        raise CheckpointError(
            f"checkpoint '{tag_dir}' was written by {saved_world} rank(s) but this run has {world}: convert it "
            f"once to DeepSpeed's universal format with {_convert_hint(tag_dir)} (writes '{out}'), then resume "
            f"on any number of ranks; or resume on {saved_world} rank(s)")
    try:
        marker = json.loads(done.read_text())
        files = dict(marker.get("files", {}))
    except (ValueError, TypeError, AttributeError) as e:
        return f"universal conversion marker '{done}' is corrupt ({type(e).__name__}: {e})"
    if marker.get("manifest_sha256", _manifest_sha(tag_dir)) != _manifest_sha(tag_dir):
        raise CheckpointError(f"the universal conversion '{out}' was made from another checkpoint than the current "
                              f"'{tag_dir}' (manifest differs): convert again with {_convert_hint(tag_dir)}")
    if int(manifest.get("zero_stage", 0)) == 3 and UNIVERSAL_TEACHER not in files and _has_partitioned_teacher(tag_dir):
        return (f"the universal conversion '{out}' has no consolidated EMA teacher ({UNIVERSAL_TEACHER}): "
                f"convert again with {_convert_hint(tag_dir)}")
    for name, size in sorted(files.items()):
        p = out / name
        if not p.is_file():
            return f"universal checkpoint file '{p}' is missing"
        if p.stat().st_size != size:
            return f"universal checkpoint file '{p}' is {p.stat().st_size} bytes, '{done}' says {size} (truncated?)"
    return None


def _manifest_sha(tag_dir: Path) -> str:
    return hashlib.sha256((tag_dir / MANIFEST).read_bytes()).hexdigest()


def _has_partitioned_teacher(tag_dir: Path) -> bool:
    return bool(read_rank_state(tag_dir / "rank0.safetensors").get("teacher"))


def is_elastic(run_dir: str | Path, tag: str | None, world: int) -> bool:
    """True when checkpoint `tag` (chosen by `choose`) was written by another number of ranks: the engine must
    then be built with `checkpoint.load_universal` and loads <tag>_universal/."""
    return tag is not None and int(_manifest(checkpoint_dir(run_dir) / tag)["world_size"]) != world


class _TensorFile(Mapping):
    """The tensors of a safetensors file, each read when asked for: a rank cutting its partitions out of the whole
    EMA teacher holds one whole parameter at a time in host memory, not the teacher."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
        except Exception as e:  # safetensors raises its own error types on truncated files
            raise CheckpointError(f"checkpoint file '{path}' cannot be read ({type(e).__name__}: {e})") from e

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"checkpoint file '{self.path}' cannot be read ({type(e).__name__}: {e})") from e

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_universal_teacher(run_dir: str | Path, tag: str) -> Mapping[str, torch.Tensor] | None:
    """The consolidated ZeRO-3 EMA teacher of <tag>_universal/ (whole tensors, read one at a time), None when
    there is none."""
    path = checkpoint_dir(run_dir) / (tag + UNIVERSAL_SUFFIX) / UNIVERSAL_TEACHER
    return _TensorFile(path) if path.is_file() else None


def _consolidate_teacher(tag_dir: Path, saved_world: int, out: Path) -> bool:
    """Write the whole EMA teacher of a ZeRO-3 checkpoint into `out` (from every rank's partition and the layout
    in the client state). False when the checkpoint has no partitioned teacher."""
    from safetensors.torch import save_file

    from r2d2ds.teacher import FORMAT_PARTITIONED, consolidate_partitions

    states = [read_rank_state(tag_dir / f"rank{r}.safetensors") for r in range(saved_world)]
    if not states[0].get("teacher"):
        return False
    model_states = sorted(tag_dir.glob("*zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not model_states:
        raise CheckpointError(f"'{tag_dir}' has no ZeRO-3 model states file (zero_pp_rank_0_mp_rank_*)")
    client = torch.load(model_states[0], map_location="cpu", weights_only=False)  # trusted run dir (module doc)
    layout = client.get("teacher") or {}
    if layout.get("format") != FORMAT_PARTITIONED or int(layout.get("world_size", -1)) != saved_world:
        raise CheckpointError(f"'{model_states[0]}' holds no EMA teacher layout partitioned over {saved_world} "
                              f"rank(s) (got format {layout.get('format')!r})")
    try:
        whole = consolidate_partitions(layout["shapes"], [s.get("teacher") for s in states])
    except ValueError as e:
        raise CheckpointError(f"cannot consolidate the EMA teacher of '{tag_dir}': {e}") from e
    save_file(whole, str(out), metadata={"format": FORMAT, "world_size": str(saved_world)})
    return True


def convert_to_universal(run_dir: str | Path, tag: str | None = None, workers: int = 2) -> Path:
    """Convert committed checkpoint `tag` (default: `latest`) into DeepSpeed's universal format, beside it as
    <tag>_universal/, written under a temporary name and renamed when complete. One process, no ranks.

    `--inject_missing_state`: DeepSpeed's converter wants the universal-checkpoint info that Megatron-style
    clients add to their client state; our ZeRO-1/2 parameters are plain (no tensor or pipeline parallel
    slicing), which is what the injected default describes. ZeRO-3 checkpoints need no injection; our own per-rank
    state of them (the partitioned EMA teacher) is consolidated into whole tensors beside DeepSpeed's."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = checkpoint_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"'{root}' has no committed checkpoint to convert")
    saved_world = int(_manifest(root / tag)["world_size"]) if (root / tag / MANIFEST).is_file() else 1
    problem = verify(run_dir, tag, saved_world, 0)
    if problem:
        good = [t for t in reversed(tags(run_dir)) if t != tag and (root / t / MANIFEST).is_file()]
        hint = (f"; an earlier complete checkpoint can be converted with --tag {good[0]} (then resume with "
                f"--train.resume_fallback=true)" if good else "")
        raise CheckpointError(f"cannot convert: {problem}{hint}")
    manifest = _manifest(root / tag)
    out = root / (tag + UNIVERSAL_SUFFIX)
    tmp = root / (tag + UNIVERSAL_SUFFIX + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(argparse.Namespace(input_folder=str(root / tag), output_folder=str(tmp),
                                       num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                                       keep_temp_folder=False, strict=True, inject_missing_state=True))
    if int(manifest.get("zero_stage", 0)) == 3:
        _consolidate_teacher(root / tag, saved_world, tmp / UNIVERSAL_TEACHER)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            fsync_file(p)
            files[str(p.relative_to(tmp))] = p.stat().st_size
    for d in sorted({p.parent for p in tmp.rglob("*")}, key=lambda d: -len(d.parts)):
        fsync_dir(d)
    # Written last: a conversion cut short has no marker and is redone.
    atomic_write_text(tmp / UNIVERSAL_DONE, json.dumps({"format": FORMAT, "tag": tag, "step": manifest["step"],
                                                        "world_size": saved_world, "files": files,
                                                        "manifest_sha256": _manifest_sha(root / tag)}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(root)
    # DeepSpeed's converter points its own `latest_universal` at the folder it wrote (our temporary name).
    atomic_write_text(root / "latest_universal", out.name + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m r2d2ds.checkpoint",
                                     description="Checkpoint tools. to-universal: convert a run's checkpoint to "
                                                 "DeepSpeed's universal format, to resume on another number of "
                                                 "ranks (elastic resume).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("to-universal", help="convert RUN_DIR's latest (or --tag) checkpoint")
    conv.add_argument("run_dir")
    conv.add_argument("--tag", default=None, help="a step tag such as step00001000 (default: latest)")
    conv.add_argument("--workers", type=int, default=2, help="processes extracting ZeRO shards")
    args = parser.parse_args(argv)
    try:
        out = convert_to_universal(args.run_dir, args.tag, args.workers)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: resume with --resume on any number of ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
