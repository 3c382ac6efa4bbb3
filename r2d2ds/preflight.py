"""Check a training config against this machine before any rank builds a model.

`Config` validates types and ranges on its own (`r2d2ds.config`); what it cannot know is whether the files it
names exist here. `check_training_paths` resolves every path-like key and raises `ConfigError` naming the key:
the dataset splits (to their shard files), the tokenizer (loaded), the ds_config (a JSON object), the image
checkpoint and a text model given as a path. Keys that also accept names (`data.tokenizer`, `model.text_model`,
`model.image_model`) are checked as names when they do not look like paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from r2d2ds.config import Config, ConfigError


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(("~", ".")) or spec.endswith((".json", ".txt", ".yaml"))


def _fail(key: str, err: Exception | str) -> ConfigError:
    return ConfigError(f"config key '{key}': {err}")


def check_training_paths(cfg: Config) -> Any:
    """Raise ConfigError for the first path key that does not resolve; return the loaded tokenizer."""
    from r2d2ds.data import load_tokenizer, resolve_shards

    d, m, t = cfg.data, cfg.model, cfg.train
    if not d.train:
        raise _fail("data.train", "no training data given (a dataset directory, manifest or shard pattern)")
    for key, spec, split in (("data.train", d.train, d.train_split), ("data.val", d.val, d.val_split)):
        if spec:
            try:
                resolve_shards(spec, split)
            except (OSError, ValueError) as err:
                raise _fail(key, err) from None
    try:
        tokenizer = load_tokenizer(d.tokenizer, dataset=d.train)
    except Exception as err:  # missing files, a broken vocab, a name not in the local cache
        raise _fail("data.tokenizer", err) from None
    ds = Path(t.ds_config)
    if not ds.is_file():
        raise _fail("train.ds_config", f"file '{ds}' does not exist")
    try:
        if not isinstance(json.loads(ds.read_text(encoding="utf-8")), dict):
            raise ValueError("the top level is not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail("train.ds_config", f"'{ds}' is not a DeepSpeed JSON config: {err}") from None
    if m.image_checkpoint is not None and not os.path.isfile(m.image_checkpoint):
        raise _fail("model.image_checkpoint", f"file '{m.image_checkpoint}' does not exist")
    if m.text_model != "config" and _looks_like_path(m.text_model) and not os.path.exists(m.text_model):
        raise _fail("model.text_model", f"'{m.text_model}' looks like a path but does not exist (give a local "
                                        "directory, a config .json, a cached hub name, or 'config')")
    import timm

    if not timm.is_model(m.image_model):
        raise _fail("model.image_model", f"{m.image_model!r} is not a timm model name")
    return tokenizer
