"""Typed run configuration: dataclasses filled from a YAML file and `--section.key=value` overrides.

Every section validates itself in `__post_init__`; errors raise `ConfigError` naming the dotted key to change,
so a bad launch fails before any rank builds a model. The resolved config is saved in the run directory and in
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range. The message names the dotted key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


_IMPLS = ("auto", "torch", "triton", "reference")


@dataclass
class ModelConfig:
    # Image tower: any timm model name; kwargs go to timm.create_model (img_size, depth, embed_dim, ...).
    image_model: str = "vit_tiny_patch16_224"
    image_kwargs: dict[str, Any] = field(default_factory=dict)
    image_pretrained: bool = False  # True needs the weights in the local HF cache (no hub access at run time)
    image_checkpoint: str | None = None  # optional local state_dict / safetensors file for the image tower
    # Text tower: a transformers BERT-family name, local directory or config.json; text_config overrides fields.
    # "config": BertConfig(**text_config) from scratch (no hub); a name is read from the local cache only.
    text_model: str = "bert-base-chinese"
    text_config: dict[str, Any] = field(default_factory=dict)
    text_pretrained: bool = False
    embed_dim: int = 256
    # Cross encoders (both the text-query and the image-query one); width defaults to the text tower's.
    cross_layers: int = 6
    cross_heads: int = 12
    cross_ffn: int = 0  # 0: 4 x width
    cross_dropout: float = 0.1
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    ema_momentum: float = 0.995
    attention_impl: str = "auto"  # r2d2ds.kernels.cross_attention impl
    contrastive_impl: str = "auto"  # r2d2ds.kernels.contrastive_loss impl

    def __post_init__(self) -> None:
        _check(self.embed_dim > 0, "model.embed_dim", f"must be > 0, got {self.embed_dim}")
        _check(self.cross_layers >= 1, "model.cross_layers", f"must be >= 1, got {self.cross_layers}")
        _check(self.cross_heads >= 1, "model.cross_heads", f"must be >= 1, got {self.cross_heads}")
        _check(0.0 <= self.cross_dropout < 1.0, "model.cross_dropout", "must be in [0, 1)")
        _check(0 < self.temperature_min <= self.temperature_init <= self.temperature_max,
               "model.temperature_init",
               f"need 0 < temperature_min <= temperature_init <= temperature_max, got "
               f"{self.temperature_min}, {self.temperature_init}, {self.temperature_max}")
        _check(0.0 <= self.ema_momentum < 1.0, "model.ema_momentum", f"must be in [0, 1), got {self.ema_momentum}")
        _check(self.attention_impl in _IMPLS, "model.attention_impl", f"must be one of {_IMPLS}")
        _check(self.contrastive_impl in _IMPLS, "model.contrastive_impl", f"must be one of {_IMPLS}")


@dataclass
class LossConfig:
    # Weights of the separately logged terms. With gcpr = CE(y, s) and tgd = CE(softmax(s_teacher), s), the
    # total (1 - tgd_alpha) * gcpr + tgd_alpha * tgd equals the paper's CE against q = (1-a) y + a softmax(s_t).
    gcpr_weight: float = 1.0
    tgd_weight: float = 1.0
    tgd_alpha: float = 0.4  # ALBEF's distillation alpha; our default (the paper's value is not public)
    fgr_weight: float = 1.0
    fgr_class_weights: tuple[float, float] = (1.0, 2.0)  # (negative, positive), as released
    fgd_weight: float = 1.0  # our default
    mlm_weight: float = 1.0
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        self.fgr_class_weights = tuple(float(w) for w in self.fgr_class_weights)
        for name in ("gcpr_weight", "tgd_weight", "fgr_weight", "fgd_weight", "mlm_weight"):
            v = getattr(self, name)
            _check(v >= 0, f"loss.{name}", f"must be >= 0, got {v}")
        _check(0.0 <= self.tgd_alpha <= 1.0, "loss.tgd_alpha", f"must be in [0, 1], got {self.tgd_alpha}")
        _check(len(self.fgr_class_weights) == 2 and min(self.fgr_class_weights) > 0, "loss.fgr_class_weights",
               "must be two positive numbers [negative, positive]")
        _check(0.0 < self.mlm_probability < 1.0, "loss.mlm_probability", "must be in (0, 1)")


@dataclass
class DataConfig:
    train: str = ""  # dataset directory with manifest.json, a manifest path, or a brace pattern of .tar shards
    val: str = ""  # held-out split for retrieval eval (same forms); empty: no eval
    train_split: str = "train"
    val_split: str = "val"
    tokenizer: str = "auto"  # a name, a tokenizer directory, a vocab.txt; auto: the dataset's vocab.txt
    max_text_len: int = 32
    image_size: int = 224
    micro_batch: int = 32  # per rank, per micro step
    shuffle_buffer: int = 1000
    num_workers: int = 0
    resampled: bool = False  # sample shards with replacement (multi-node: no rank runs out of shards)
    augment: bool = False  # timm RandomResizedCrop + flip for training
    caption: str = "random"  # which caption of a multi-caption sample to train on: random | first

    def __post_init__(self) -> None:
        _check(self.max_text_len >= 4, "data.max_text_len", f"must be >= 4, got {self.max_text_len}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.micro_batch >= 1, "data.micro_batch", f"must be >= 1, got {self.micro_batch}")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.caption in ("random", "first"), "data.caption", "must be 'random' or 'first'")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    ds_config: str = "ds_configs/zero2.json"
    steps: int = 1000
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # written into the ds_config's gradient_clipping: the engine clips
    optimizer: str = "ds_config"  # ds_config: the ds_config's optimizer block; torch_adamw: a client optimizer
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    peak_tflops: float = 0.0  # per-device matmul TFLOP/s for perf/mfu; 0: measured at start-up (r2d2ds.flops)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0 (runs shorter than it stay in warm-up)")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.optimizer in ("ds_config", "torch_adamw"), "train.optimizer",
               "must be 'ds_config' or 'torch_adamw'")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0: measure the matmul rate at start-up)")


@dataclass
class EvalConfig:
    topk: int = 128  # re-ranked candidates per query (released: 128)
    batch_size: int = 64
    max_images: int = 0  # 0: the whole split

    def __post_init__(self) -> None:
        _check(self.topk >= 1, "eval.topk", f"must be >= 1, got {self.topk}")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys by their dotted name."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix}': expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, val in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"config key '{dotted}': unknown key (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, val, dotted)
        else:
            kwargs[key] = _coerce(val, hint, dotted)
    return cls(**kwargs)


def _coerce(val: Any, hint: Any, key: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    text = str(hint)
    if hint is bool:
        if not isinstance(val, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {val!r}")
        return val
    if hint is int:
        if isinstance(val, bool) or not isinstance(val, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {val!r}")
        return val
    if hint is float:
        if isinstance(val, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                val = float(val)
            except ValueError:
                pass
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {val!r}")
        return float(val)
    if hint is str:
        if not isinstance(val, str):
            raise ConfigError(f"config key '{key}': expected a string, got {val!r}")
        return val
    if origin is dict:
        if not isinstance(val, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {val!r}")
        return val
    if origin is tuple:
        if not isinstance(val, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {val!r}")
        return tuple(val)
    if "None" in text:  # Optional[...]
        if val is None or isinstance(val, str):
            return val
        raise ConfigError(f"config key '{key}': expected a string or null, got {val!r}")
    return val


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--a.b=value` (or `--a.b value`) pairs -> a nested dict. Values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"cannot parse argument {arg!r}: expected --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"config key '{body}': no value given")
            key, raw = body, args[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"config key '{key}': overrides take the form --section.key=value")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else "")
        i += 1
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("image_kwargs", "text_config"):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Config from an optional YAML file plus overrides (CLI strings or a nested dict)."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}': top level must be a mapping of sections")
        tree = loaded
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        tree = _merge(tree, over)
    return _build(Config, tree, "")


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, json.loads(json.dumps(tree)), "")
