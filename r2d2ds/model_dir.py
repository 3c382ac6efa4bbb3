"""The model directory format: written by `r2d2ds.export`, read by `r2d2ds.api.load` and `r2d2ds eval`.

  model.safetensors          the R2D2 state dict (metadata: format, vocab_size, pad_token_id, tied-name aliases)
  config.yaml                the full resolved run config (Config.save)
  text_encoder_config.json   the text tower's transformers config, so loading needs nothing outside the folder
  tokenizer files            tokenizer.save_pretrained(dir)

A model directory may come from someone else and may be tampered with or incomplete. `load_model_dir` checks
it before anything large is allocated: every file exists, the config parses, the safetensors header (read
by hand, a few KB) is consistent with the file size, the metadata parses, and the architecture the config
describes, built on the meta device (no memory), has exactly the tensor names and shapes the header lists.
Each failure names the file and the key. Only then are the weights read, with safetensors (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TEXT_CONFIG = "text_encoder_config.json"
FORMAT = "r2d2ds-export-1"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


class ModelDirError(ValueError):
    """A model directory is inconsistent or damaged; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensors, metadata) from a safetensors file's header, checked against the file size; reads no tensor."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"'{path}' is truncated: {size} bytes, not even a safetensors header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ModelDirError(f"'{path}': the header length {n} exceeds the file ({size} bytes): truncated, or "
                                "not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelDirError(f"'{path}': the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"'{path}': the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelDirError(f"'{path}': '__metadata__' must map names to strings")
    data = size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (dtype in _ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and end - begin == math.prod(shape) * _ITEMSIZE[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelDirError(f"'{path}': tensor '{name}' has an invalid header entry {str(entry)[:200]}")
        if end > data:
            raise ModelDirError(f"'{path}' is truncated: tensor '{name}' ends at byte {end} of the data but the "
                                f"file holds {data} bytes of data")
        tensors[name] = TensorEntry(dtype, shape, (begin, end))
    return tensors, meta


def build_model(cfg: Any, vocab_size: int, pad_token_id: int = 0, text_config: str | Path | None = None):
    """An R2D2 with the architecture of `cfg` and no pretrained weights loaded (they come from a file next).

    `text_config`: a transformers config .json that fixes the text tower's architecture (an export's), so
    nothing outside the export is needed. Call under `torch.device("meta")` to get shapes without memory.
    """
    from r2d2ds.models import R2D2

    # The weights come from the export: no pretrained file is read, and freezing and the frozen tower's feature
    # cache (training settings that need one) do not apply.
    changes: dict[str, Any] = dict(image_pretrained=False, image_checkpoint=None, image_freeze=False,
                                   image_feature_cache=False, text_pretrained=False)
    if text_config is not None:
        changes["text_model"] = str(text_config)
    return R2D2(dataclasses.replace(cfg.model, **changes), vocab_size=vocab_size, pad_token_id=pad_token_id)


def _int_meta(meta: dict[str, str], key: str, path: Path, default: int) -> int:
    if key not in meta:
        return default
    try:
        value = int(meta[key])
    except ValueError:
        raise ModelDirError(f"'{path}': metadata key '{key}' = {meta[key][:40]!r} is not an integer") from None
    if value < 0:
        raise ModelDirError(f"'{path}': metadata key '{key}' = {value} is negative")
    return value


def _aliases(meta: dict[str, str], tensors: dict[str, TensorEntry], path: Path) -> dict[str, str]:
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
    except ValueError:
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and v in tensors for k, v in aliases.items()):
        raise ModelDirError(f"'{path}': metadata key 'aliases' must map tied names to stored tensors, got "
                            f"{meta.get('aliases', '')[:200]!r}")
    return aliases


def _check_shapes(model: torch.nn.Module, tensors: dict[str, TensorEntry], aliases: dict[str, str],
                  path: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: e.shape for k, e in tensors.items()} | {a: tensors[k].shape for a, k in aliases.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = [f"'{k}': file {have[k]}, model {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if missing or unexpected or wrong:
        raise ModelDirError(
            f"'{path}' does not fit the model that '{CONFIG}', '{TEXT_CONFIG}' and the metadata describe: "
            + "; ".join(part for part in (
                f"missing tensors {missing[:5]}" if missing else "",
                f"unexpected tensors {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {', '.join(wrong[:5])}" if wrong else "") if part))


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, tokenizer, Config) from a model directory, checked as described above."""
    from safetensors.torch import load_file

    from r2d2ds.config import ConfigError, load_config
    from r2d2ds.data import load_tokenizer

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"export directory '{root}' does not exist (write one with "
                                f"`python -m r2d2ds.export --run RUN_DIR --out {root}`)")
    for name in (WEIGHTS, CONFIG, TEXT_CONFIG):
        if not (root / name).is_file():
            raise FileNotFoundError(f"'{root / name}' does not exist: '{root}' is not a complete r2d2ds export")
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"'{root}' has no tokenizer ({' or '.join(_TOKENIZER_FILES)}): not a complete "
                                "r2d2ds export")
    try:
        cfg = load_config(root / CONFIG)
    except ConfigError as err:
        raise ModelDirError(f"'{root / CONFIG}': {err}") from None
    try:
        text_cfg = json.loads((root / TEXT_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ModelDirError(f"'{root / TEXT_CONFIG}' is not JSON: {err}") from None
    if not isinstance(text_cfg, dict):
        raise ModelDirError(f"'{root / TEXT_CONFIG}': the top level is not an object")

    weights = root / WEIGHTS
    tensors, meta = read_safetensors_header(weights)
    if meta.get("format", FORMAT) != FORMAT:
        raise ModelDirError(f"'{weights}': metadata key 'format' is {meta['format'][:40]!r}, not {FORMAT!r}")
    try:
        tokenizer = load_tokenizer(str(root))
    except Exception as err:  # a damaged tokenizer.json / vocab.txt
        raise ModelDirError(f"'{root}': the tokenizer files cannot be loaded: {err}") from None
    vocab_size = _int_meta(meta, "vocab_size", weights, len(tokenizer))
    pad_id = _int_meta(meta, "pad_token_id", weights, tokenizer.pad_token_id or 0)
    aliases = _aliases(meta, tensors, weights)
    words = [k for k in tensors if k.endswith("word_embeddings.weight") and k.startswith("text_tower.")]
    if words and tensors[words[0]].shape[:1] != (vocab_size,):
        raise ModelDirError(f"'{weights}': metadata key 'vocab_size' = {vocab_size} disagrees with tensor "
                            f"'{words[0]}' of shape {tensors[words[0]].shape}")
    if len(tokenizer) > vocab_size:
        raise ModelDirError(f"'{root}': the tokenizer has {len(tokenizer)} tokens but metadata key 'vocab_size' of "
                            f"'{weights}' is {vocab_size}: token ids would index past the embedding")
    if pad_id >= vocab_size:
        raise ModelDirError(f"'{weights}': metadata key 'pad_token_id' = {pad_id} is not below vocab_size "
                            f"{vocab_size}")
    try:
        with torch.device("meta"):  # the architecture only: shapes, no memory
            shell = build_model(cfg, vocab_size, pad_id, root / TEXT_CONFIG)
    except Exception as err:  # e.g. a text config whose hidden size does not divide into its heads
        raise ModelDirError(f"'{root / CONFIG}' / '{root / TEXT_CONFIG}' do not describe a buildable model: "
                            f"{type(err).__name__}: {err}") from None
    _check_shapes(shell, tensors, aliases, weights)
    del shell

    model = build_model(cfg, vocab_size, pad_id, root / TEXT_CONFIG)
    state = load_file(str(weights))
    for alias, kept in aliases.items():  # tied weights saved once
        state[alias] = state[kept]
    model.load_state_dict(state, strict=True)
    return model.to(torch.device(device)).eval(), tokenizer, cfg
