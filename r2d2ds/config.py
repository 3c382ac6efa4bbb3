"""Typed run configuration: dataclasses filled from a YAML file and `--section.key=value` overrides.

Every section validates itself in `__post_init__`; errors raise `ConfigError` naming the dotted key to change,
so a bad launch fails before any rank builds a model. The resolved config is saved in the run directory and in
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range. The message names the dotted key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_keys(cond: bool, keys: tuple[str, ...], msg: str) -> None:
    """A condition between several keys: the message names every one of them (any of them may be the wrong one)."""
    if not cond:
        raise ConfigError(f"config keys {', '.join(repr(k) for k in keys)}: {msg}")


def _nonempty(obj: Any, section: str, *names: str) -> None:
    for name in names:
        _check(getattr(obj, name) != "", f"{section}.{name}", "must not be empty")


_IMPLS = ("auto", "torch", "triton", "reference")
CHECKPOINTING = ("none", "towers", "cross", "all")  # model.activation_checkpointing (r2d2ds/models/checkpointing.py)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # what data.image_formats may allow


@dataclass
class ModelConfig:
    # Image tower: any timm model name; kwargs go to timm.create_model (img_size, depth, embed_dim, ...).
    image_model: str = "vit_tiny_patch16_224"
    image_kwargs: dict[str, Any] = field(default_factory=dict)
    image_pretrained: bool = False  # True needs the weights in the local HF cache (no hub access at run time)
    image_checkpoint: str | None = None  # optional local state_dict / safetensors file for the image tower
    # Keep the image tower as loaded (pretrained features): no gradient, no optimizer state, BatchNorm statistics
    # frozen too (eval mode). The projection and the cross encoders' image input still train.
    image_freeze: bool = False
    # With a frozen tower and no augmentation an image's tower output never changes, so compute it once per image
    # (keyed by its image_id) and serve it from memory from then on (LiT-style locked features): the tower's
    # forward leaves the step after the first epoch. Memory per rank: images seen x (tokens x width + pooled
    # width) x the tower's dtype size (Flickr8k-CN, EfficientNet-Lite0 at 160 px, fp32: 6,000 x 26 x 1,280 x
    # 4 B = 0.8 GB). Training only (eval and the export compute features as usual).
    image_feature_cache: bool = False
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
    # Recompute blocks in the backward instead of keeping their activations: the towers' blocks, the cross
    # encoders' layers, both, or none. Same gradients (dropout replayed), about one extra forward of what it covers.
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        _check(self.embed_dim > 0, "model.embed_dim", f"must be > 0, got {self.embed_dim}")
        _check(self.cross_layers >= 1, "model.cross_layers", f"must be >= 1, got {self.cross_layers}")
        _check(self.cross_heads >= 1, "model.cross_heads", f"must be >= 1, got {self.cross_heads}")
        _nonempty(self, "model", "image_model", "text_model")
        _check(self.image_checkpoint != "", "model.image_checkpoint", "must be a file path or null")
        _check(not self.image_freeze or self.image_pretrained or bool(self.image_checkpoint), "model.image_freeze",
               "freezes a randomly initialised image tower: set model.image_checkpoint or model.image_pretrained")
        _check(not self.image_feature_cache or self.image_freeze, "model.image_feature_cache",
               "needs model.image_freeze: a tower that trains changes its features every step")
        _check(self.cross_ffn >= 0, "model.cross_ffn", f"must be >= 0 (0: 4 x width), got {self.cross_ffn}")
        _check(0.0 <= self.cross_dropout < 1.0, "model.cross_dropout", "must be in [0, 1)")
        _check(self.temperature_min > 0, "model.temperature_min", f"must be > 0, got {self.temperature_min}")
        _check_keys(self.temperature_min <= self.temperature_init <= self.temperature_max,
                    ("model.temperature_min", "model.temperature_init", "model.temperature_max"),
                    f"need temperature_min <= temperature_init <= temperature_max, got "
                    f"{self.temperature_min}, {self.temperature_init}, {self.temperature_max}")
        _check(0.0 <= self.ema_momentum < 1.0, "model.ema_momentum", f"must be in [0, 1), got {self.ema_momentum}")
        _check(self.attention_impl in _IMPLS, "model.attention_impl", f"must be one of {_IMPLS}")
        _check(self.contrastive_impl in _IMPLS, "model.contrastive_impl", f"must be one of {_IMPLS}")
        _check(self.activation_checkpointing in CHECKPOINTING, "model.activation_checkpointing",
               f"must be one of {CHECKPOINTING}, got {self.activation_checkpointing!r}")


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
    # FGR hard negatives (r2d2ds/losses/negatives.py): drawn over the global batch (scope "global") or this
    # rank's rows ("local"); strategy softmax (released) | topk | mixed; optional false-negative guard.
    fgr_negative_scope: str = "global"
    fgr_negatives: str = "softmax"
    fgr_softmax_temperature: float = 0.0  # 0: the learned contrastive temperature (released); > 0: fixed T
    fgr_topk: int = 16  # topk: uniform among the k most similar non-positives
    fgr_mixed_uniform: float = 0.5  # mixed: probability of a uniform draw over the non-positives
    fgr_false_negative_guard: bool = False  # exclude candidates too similar to the anchor's own positive
    fgr_false_negative_threshold: float = 0.9  # cosine above which the guard excludes a candidate

    def __post_init__(self) -> None:
        self.fgr_class_weights = tuple(float(w) for w in self.fgr_class_weights)
        _check(self.fgr_negative_scope in ("global", "local"), "loss.fgr_negative_scope",
               f"must be 'global' or 'local', got {self.fgr_negative_scope!r}")
        _check(self.fgr_negatives in ("softmax", "topk", "mixed"), "loss.fgr_negatives",
               f"must be 'softmax', 'topk' or 'mixed', got {self.fgr_negatives!r}")
        _check(self.fgr_softmax_temperature >= 0, "loss.fgr_softmax_temperature",
               f"must be > 0 (a fixed temperature) or 0 (the learned one), got {self.fgr_softmax_temperature}")
        _check(self.fgr_topk >= 1, "loss.fgr_topk", f"must be >= 1, got {self.fgr_topk}")
        _check(0.0 <= self.fgr_mixed_uniform <= 1.0, "loss.fgr_mixed_uniform",
               f"must be in [0, 1], got {self.fgr_mixed_uniform}")
        _check(-1.0 <= self.fgr_false_negative_threshold <= 1.0, "loss.fgr_false_negative_threshold",
               f"is a cosine similarity: must be in [-1, 1], got {self.fgr_false_negative_threshold}")
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
    # Hostile input (README "Data"): every skipped sample is counted in data/skipped; above this fraction of the
    # samples read the run stops with an error instead of training on whatever is left.
    max_skipped_fraction: float = 0.5
    # Decoding limits, each checked before the work it bounds (tar header, image header, raw JSON bytes).
    max_member_bytes: int = 32 * 2**20  # a larger tar member skips its sample without being read
    max_image_pixels: int = 50_000_000  # width x height from the image header; 50 MP = 150 MB of RGB
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # PIL format names; img2dataset writes these three
    max_json_bytes: int = 2**20
    max_json_depth: int = 32
    max_caption_chars: int = 512  # longer captions are cut (tokenisation truncates to max_text_len anyway)
    max_captions: int = 32  # captions kept per sample (retrieval evaluates every kept caption)
    # A DataLoader worker that delivers no batch for this long raises instead of hanging the run (0: wait).
    loader_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _nonempty(self, "data", "train_split", "val_split", "tokenizer")
        _check(self.max_text_len >= 4, "data.max_text_len", f"must be >= 4, got {self.max_text_len}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.micro_batch >= 1, "data.micro_batch", f"must be >= 1, got {self.micro_batch}")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.caption in ("random", "first"), "data.caption", "must be 'random' or 'first'")
        _check(0.0 <= self.max_skipped_fraction <= 1.0, "data.max_skipped_fraction",
               f"must be in [0, 1] (1 disables the check), got {self.max_skipped_fraction}")
        for name in ("max_member_bytes", "max_image_pixels", "max_json_bytes", "max_json_depth",
                     "max_caption_chars", "max_captions"):
            _check(getattr(self, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(self, name)}")
        self.image_formats = tuple(f.upper() for f in self.image_formats)
        _check(len(self.image_formats) >= 1 and set(self.image_formats) <= set(IMAGE_FORMATS), "data.image_formats",
               f"must be a non-empty list of {IMAGE_FORMATS} (formats with well-kept PIL decoders), got "
               f"{list(self.image_formats)}")
        _check(self.loader_timeout_s >= 0, "data.loader_timeout_s", "must be >= 0 (0: no timeout)")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    ds_config: str = "ds_configs/zero2.json"
    steps: int = 1000
    grad_accum: int = 1
    # Global batch per optimizer step; 0: data.micro_batch x grad_accum x world. When set, the trainer derives
    # the per-rank batch (global_batch / (world x grad_accum)) and data.micro_batch is not used.
    global_batch: int = 0
    # GradCache (r2d2ds/losses/gradcache.py): > 0 embeds each rank batch in chunks of this many rows and
    # back-propagates chunk by chunk, so activation memory follows chunk_size, not the batch. 0: off.
    chunk_size: int = 0
    # How GradCache gives FGR's negatives (rows of other chunks/ranks) their towers' gradient: cached (exact,
    # towers run forward twice + backward once) | reembed (exact up to dropout, towers re-run on negatives) |
    # detached (drops the towers' gradient through negatives). Cost and memory: r2d2ds/losses/gradcache.py.
    gradcache_negatives: str = "cached"
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # written into the ds_config's gradient_clipping: the engine clips
    optimizer: str = "ds_config"  # ds_config: the ds_config's optimizer block; torch_adamw: a client optimizer
    seed: int = 0
    log_every: int = 10
    # Periodic checkpoints by optimizer steps and by wall-clock minutes (whichever comes first; 0 disables
    # that trigger); a checkpoint is also written at the end and when SIGTERM/SIGUSR1 asks the run to stop.
    ckpt_every: int = 1000
    ckpt_every_minutes: float = 30.0
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False  # continue from run_dir's latest complete checkpoint (a fresh start when it has none)
    resume_fallback: bool = False  # a corrupt/incomplete latest checkpoint: resume from the newest good one
    overwrite: bool = False  # start over in a run_dir that holds checkpoints (deletes them and the metrics)
    # Every collective (and so every rank's wait on a dead or stuck peer) fails after this many seconds;
    # passed to deepspeed.init_distributed. Rank-0-only work never sits between two collectives for long.
    collective_timeout_s: float = 600.0
    progress: bool = True
    peak_tflops: float = 0.0  # per-device matmul TFLOP/s for perf/mfu; 0: measured at start-up (r2d2ds.flops)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _nonempty(self, "train", "run_dir", "ds_config")
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.global_batch >= 0, "train.global_batch", f"must be >= 0 (0: derived), got {self.global_batch}")
        _check(self.chunk_size >= 0, "train.chunk_size", f"must be >= 0 (0: GradCache off), got {self.chunk_size}")
        _check(self.gradcache_negatives in ("cached", "reembed", "detached"), "train.gradcache_negatives",
               f"must be 'cached', 'reembed' or 'detached', got {self.gradcache_negatives!r}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.min_lr >= 0, "train.min_lr", f"must be >= 0, got {self.min_lr}")
        _check_keys(self.min_lr <= self.lr, ("train.min_lr", "train.lr"), "need min_lr <= lr")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "train.betas",
               f"must be two numbers in [0, 1), got {list(self.betas)}")
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2^32), got {self.seed}")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0 (runs shorter than it stay in warm-up)")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.optimizer in ("ds_config", "torch_adamw"), "train.optimizer",
               "must be 'ds_config' or 'torch_adamw'")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0 (0: no step-based checkpoints)")
        _check(self.ckpt_every_minutes >= 0, "train.ckpt_every_minutes",
               "must be >= 0 (0: no time-based checkpoints)")
        _check(self.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0 seconds")
        _check(not (self.resume and self.overwrite), "train.overwrite",
               "cannot be combined with train.resume (--resume): pick one")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0: measure the matmul rate at start-up)")


@dataclass
class EvalConfig:
    topk: int = 128  # re-ranked candidates per query (released: 128)
    batch_size: int = 64
    max_images: int = 0  # 0: the whole split
    # Re-rank score of the top-k (r2d2ds/rerank.py): fused = mean ITM log-odds + rerank_weight x logit scale x
    # cosine; released = cosine + mean ITM match probability (yuxie11/R2D2).
    rerank: str = "fused"
    rerank_weight: float = 1.0
    # A split of data.val to choose rerank_weight on (from rerank_weights, by two-stage MR) before the reported
    # split (data.val_split) is evaluated; empty: rerank_weight as given. Never the reported split itself.
    calibration_split: str = ""
    rerank_weights: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

    def __post_init__(self) -> None:
        _check(self.topk >= 1, "eval.topk", f"must be >= 1, got {self.topk}")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_images >= 0, "eval.max_images", "must be >= 0 (0: the whole split)")
        _check(self.rerank in ("fused", "released"), "eval.rerank",
               f"must be 'fused' or 'released', got {self.rerank!r}")
        _check(self.rerank_weight >= 0, "eval.rerank_weight", f"must be >= 0, got {self.rerank_weight}")
        self.rerank_weights = tuple(float(w) for w in self.rerank_weights)
        _check(len(self.rerank_weights) >= 1 and min(self.rerank_weights) >= 0, "eval.rerank_weights",
               f"must be a non-empty list of numbers >= 0, got {list(self.rerank_weights)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check_keys(not self.eval.calibration_split or self.eval.calibration_split != self.data.val_split,
                    ("eval.calibration_split", "data.val_split"),
                    "must differ: a re-rank weight chosen on the reported split overstates it")
        _check_keys(not (self.model.image_feature_cache and self.data.augment),
                    ("model.image_feature_cache", "data.augment"),
                    "a cached image feature is only valid for a deterministic transform: turn augmentation off")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by their dotted name; ranges are
    then checked by the section's own __post_init__."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix}': expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, val in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"config key '{dotted}': unknown key (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, val, dotted)
        else:
            kwargs[key] = _coerce(val, hint, dotted)
    return cls(**kwargs)


def _short(val: Any) -> str:
    text = repr(val)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_text(text: str, key: str) -> None:
    """Control characters, lone surrogates and Unicode line separators have no place in a path or a name, and
    YAML does not read them back as written (the resolved config is saved as YAML with every run)."""
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        raise ConfigError(f"config key '{key}': contains the control character {bad!r}")


def _plain(val: Any, key: str, depth: int = 0) -> None:
    """Library kwargs (model.image_kwargs, model.text_config): YAML scalars, lists and string-keyed mappings only,
    so the resolved config can be saved and read back."""
    if depth > 16:
        raise ConfigError(f"config key '{key}': nested deeper than 16 levels")
    if isinstance(val, dict):
        for k, v in val.items():
            if not isinstance(k, str):
                raise ConfigError(f"config key '{key}': keys must be strings, got {_short(k)}")
            _check_text(k, key)
            _plain(v, key, depth + 1)
    elif isinstance(val, list):
        for v in val:
            _plain(v, key, depth + 1)
    elif isinstance(val, str):
        _check_text(val, key)
    elif isinstance(val, float) and not math.isfinite(val):
        raise ConfigError(f"config key '{key}': values must be finite numbers, got {val}")
    elif not (val is None or isinstance(val, (bool, int, float, str))):
        raise ConfigError(f"config key '{key}': unsupported value {_short(val)}")


def _coerce(val: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if val is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _coerce(val, inner[0], key)
        except ConfigError:
            raise ConfigError(f"config key '{key}': expected {getattr(inner[0], '__name__', inner[0])} or null, "
                              f"got {_short(val)}") from None
    if hint is bool:
        if not isinstance(val, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {_short(val)}")
        return val
    if hint is int:
        if isinstance(val, bool) or not isinstance(val, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {_short(val)}")
        if not -(2**63) <= val < 2**63:
            raise ConfigError(f"config key '{key}': {_short(val)} does not fit in 64 bits")
        return val
    if hint is float:
        if isinstance(val, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                val = float(val)
            except ValueError:
                pass
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {_short(val)}")
        try:
            val = float(val)
        except OverflowError:
            val = math.inf
        if not math.isfinite(val):
            raise ConfigError(f"config key '{key}': expected a finite number, got {_short(val)}")
        return val
    if hint is str:
        if not isinstance(val, str):
            raise ConfigError(f"config key '{key}': expected a string, got {_short(val)}")
        _check_text(val, key)
        return val
    if origin is tuple:
        if not isinstance(val, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {_short(val)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in val)
        if len(val) != len(args):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)}, got {_short(val)}")
        return tuple(_coerce(v, a, key) for v, a in zip(val, args))
    if origin is list:
        if not isinstance(val, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {_short(val)}")
        return [_coerce(v, args[0], key) for v in val] if args else list(val)
    if origin is dict:
        if not isinstance(val, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {_short(val)}")
        _plain(val, key)
        return dict(val)
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError) as exn:
            raise ConfigError(f"config key '{key}': cannot parse {raw[:80]!r} as a YAML value ({exn})") from None
        _set_dotted(tree, key, value)
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
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exn:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exn}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}': top level must be a mapping of sections")
        tree = loaded
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        tree = _merge(tree, over)
    return _build(Config, tree, "")


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, json.loads(json.dumps(tree)), "")
