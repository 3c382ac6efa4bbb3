"""Export a trained R2D2 for use after training: safetensors weights, resolved config, tokenizer.

The directory layout and its reader are `r2d2ds.model_dir` (read back by `r2d2ds.api.load` and `r2d2ds eval`).

The folder is built in a temporary directory beside `out_dir` and renamed into place, so a crash never leaves
a half-written export under the final name; an existing export at `out_dir` is replaced only after the new one
is complete, and a non-empty directory that is not an export is never replaced.

Command: `python -m r2d2ds.export --run RUN_DIR --out DIR [--tag TAG]` consolidates the DeepSpeed checkpoint
RUN_DIR/checkpoints/<tag or latest>/ (any ZeRO stage) with RUN_DIR/config.yaml and RUN_DIR/tokenizer/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import r2d2ds
from r2d2ds.config import Config, load_config
from r2d2ds.model_dir import CONFIG, FORMAT, TEXT_CONFIG, WEIGHTS, build_model


def _dedupe_shared(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one name per storage and return the
    others as aliases {dropped_name: kept_name}, restored on load."""
    kept: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name in sorted(state):
        t = state[name]
        if t.numel() == 0:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in kept:
            aliases[name] = kept[key]
        else:
            kept[key] = name
            out[name] = t
    # Cloned to CPU: partly overlapping views (not aliases) become separate tensors that safetensors accepts.
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}, aliases


def _check_not_partitioned(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") and p.numel() == 0:
            raise ValueError(f"parameter '{name}' is a ZeRO-3 partition (empty on this rank): gather it "
                             f"(deepspeed.zero.GatheredParameters) or export from the checkpoint with "
                             f"`python -m r2d2ds.export --run RUN_DIR`")


def _replace_dir(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory with `build(tmp)` beside `out_dir`, then move it into place."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"export target '{out_dir}' exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / WEIGHTS).is_file():
            raise FileExistsError(f"export target '{out_dir}' is a non-empty directory that is not an r2d2ds "
                                  f"export; refusing to replace it (choose another --out)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "export")  # rename, same filesystem: the old export stays whole
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_model(model: nn.Module, cfg: Config, tokenizer: Any, out_dir: str | Path,
                 state: dict[str, Tensor] | None = None) -> Path:
    """Write `model` (an R2D2), its config and tokenizer to `out_dir`; call it on one rank only.

    `state`: the model's state dict when its parameters are not whole on this process (ZeRO-3: collect it with
    r2d2ds.distributed.zero.state_dict_by_module, one module gathered at a time); None: `model.state_dict()`,
    which needs full parameters (else use export_from_checkpoint). Returns the export directory.
    """
    from safetensors.torch import save_file

    if state is None:
        _check_not_partitioned(model)
        state = model.state_dict()
    state, aliases = _dedupe_shared(state)
    text_body = getattr(getattr(model, "text_tower", None), "body", None)
    pad_id = getattr(getattr(text_body, "config", None), "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    meta = {"format": FORMAT, "r2d2ds_version": r2d2ds.__version__,
            "vocab_size": str(int(getattr(model, "vocab_size", len(tokenizer)))),
            "pad_token_id": str(int(pad_id)), "aliases": json.dumps(aliases)}

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata=meta)
        cfg.save(tmp / CONFIG)
        if text_body is not None:
            # The exact architecture of the text tower, so loading never depends on a hub name or a local path
            # that existed only on the training machine.
            (tmp / TEXT_CONFIG).write_text(text_body.config.to_json_string())
        tokenizer.save_pretrained(str(tmp))

    return _replace_dir(Path(out_dir), build)


def _resolve_run(path: Path, tag: str | None) -> tuple[Path, Path, str]:
    """RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/<tag> -> (run_dir, ckpt_dir, tag)."""
    if not path.exists():
        raise FileNotFoundError(f"run directory '{path}' does not exist")
    if (path / "checkpoints").is_dir():
        run_dir, ckpt_dir = path, path / "checkpoints"
    elif (path / "latest").is_file() or tag is not None and (path / tag).is_dir():
        run_dir, ckpt_dir = path.parent, path
    elif any(path.glob("*model_states.pt")):  # a tag directory itself
        run_dir, ckpt_dir, tag = path.parent.parent, path.parent, tag or path.name
    else:
        raise FileNotFoundError(f"'{path}' holds no DeepSpeed checkpoints "
                                f"(expected '{path / 'checkpoints'}')")
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"'{latest}' does not exist: no complete checkpoint (or pass --tag)")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"checkpoint '{ckpt_dir / tag}' does not exist")
    return run_dir, ckpt_dir, tag


def _consolidated_state(ckpt_dir: Path, tag: str) -> dict[str, Tensor]:
    """Full fp32 state dict of the engine's module from any ZeRO stage (stage 0 saves it whole)."""
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint '{tag_dir}' has no model states (mp_rank_*_model_states.pt)")
    # Our own checkpoint: DeepSpeed pickles client state next to the weights, so weights_only cannot be used.
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def export_from_checkpoint(run_dir_or_ckpt_dir: str | Path, out_dir: str | Path,
                           tag: str | None = None) -> Path:
    """Consolidate a DeepSpeed checkpoint of a run and export its R2D2 (see the module docstring)."""
    from r2d2ds.data import load_tokenizer

    run_dir, ckpt_dir, tag = _resolve_run(Path(run_dir_or_ckpt_dir), tag)
    cfg_path, tok_dir = run_dir / "config.yaml", run_dir / "tokenizer"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"resolved run config '{cfg_path}' does not exist")
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"run tokenizer directory '{tok_dir}' does not exist")
    cfg = load_config(cfg_path)
    tokenizer = load_tokenizer(str(tok_dir))
    full = _consolidated_state(ckpt_dir, tag)
    # The engine wraps R2D2Pretraining: the R2D2 lives under "model."; anything else (loss state) is dropped.
    state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"checkpoint '{ckpt_dir / tag}' has no 'model.*' weights "
                         f"(keys: {list(full)[:5]} ...)")
    model = build_model(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint '{ckpt_dir / tag}' does not fit the config's model: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return export_model(model, cfg, tokenizer, out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m r2d2ds.export",
                                description="Export a trained run as safetensors + config + tokenizer.")
    p.add_argument("--run", required=True, help="run directory (or its checkpoints/ or a tag folder)")
    p.add_argument("--out", required=True, help="export directory to write (replaced if it is an export)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    args = p.parse_args(argv)
    try:
        out = export_from_checkpoint(args.run, args.out, tag=args.tag)
    except (FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
