"""The two towers: an image encoder from any timm model and a text encoder from any BERT-family model.

Both return the full token sequence (fed to the cross encoders) and a pooled vector (fed to the projection
heads). Nothing here downloads: configs are local or built from `text_config`, weights only when asked for.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

import r2d2ds  # noqa: F401  (the torchvision shim must run before timm/transformers import torchvision)
from r2d2ds.config import ModelConfig
from r2d2ds.models.checkpointing import enable_timm, enable_transformers, wants

log = logging.getLogger(__name__)

# `model.text_model: config` builds the text tower from `model.text_config` alone (a BertConfig).
CONFIG_ONLY = "config"


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers of saved checkpoints
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _features_and_pooled(body: nn.Module, image: Tensor) -> tuple[Tensor, Tensor]:
    """Bound as the timm model's forward: (forward_features output, forward_head(pre_logits=True))."""
    feats = body.forward_features(image)
    return feats, body.forward_head(feats, pre_logits=True)


class ImageTower(nn.Module):
    """timm model -> (tokens (B, N, W) with the CLS/pooled token first, pooled (B, W_pool))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(cfg.image_model, pretrained=cfg.image_pretrained, num_classes=0,
                                      **cfg.image_kwargs)
        if cfg.image_checkpoint:
            state = _load_state_dict(cfg.image_checkpoint)
            missing, unexpected = self.body.load_state_dict(state, strict=False)
            # A classifier head in the file is unused here (num_classes=0); any other mismatch is an error.
            unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
            if missing or unexpected:
                raise ValueError(f"model.image_checkpoint {cfg.image_checkpoint!r} does not fit "
                                 f"{cfg.image_model!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        # Tokens and pooled vector come out of ONE call of the timm module (its own forward replaced on this
        # instance): ZeRO-3 gathers a module's direct parameters (a ViT's cls_token, pos_embed) in its forward
        # pre-hook, which calling forward_features() directly would bypass. A partial of a module-level
        # function (not a bound method) survives deepcopy and pickling with the instance.
        self.body.forward = functools.partial(_features_and_pooled, self.body)
        if wants(cfg.activation_checkpointing, "towers"):
            enable_timm(self.body, cfg.image_model)
        # ViTs with a class token already put it first; others (avg-pooled ViTs, CNNs) get the pooled vector
        # prepended so that "first token" always means a summary token for the image-query ITM head.
        self.has_cls = getattr(self.body, "cls_token", None) is not None
        self.width = self.body.num_features
        # forward_head(pre_logits=True) returns head_hidden_size features (== num_features unless the head
        # has a pre-logits layer).
        self.pooled_width = int(getattr(self.body, "head_hidden_size", None) or self.body.num_features)
        self.frozen = cfg.image_freeze
        if self.frozen:
            self.body.requires_grad_(False)
            self.body.eval()
        # image_id -> (tokens (N, W), pooled (W_pool)) of the frozen body (model.image_feature_cache). A plain
        # dict, not a buffer: it is derived data, never saved, and rebuilt by a resumed run.
        self.feature_cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cfg.image_feature_cache else None

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        if self.frozen:  # pretrained BatchNorm statistics (and no dropout / drop-path) whatever the model's mode
            self.body.eval()
        return self

    def forward(self, image: Tensor, cache_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """image (B, 3, H, W) -> (tokens (B, N, W), pooled (B, W_pool)). `cache_keys` (B,) int64 image ids: with
        model.image_feature_cache, rows already seen are served from memory and only the others run the body."""
        if self.feature_cache is None or cache_keys is None:
            return self._compute(image)
        keys = cache_keys.tolist()  # one host sync per call
        cache = self.feature_cache
        miss = [i for i, k in enumerate(keys) if k not in cache]
        if miss:
            feats, pooled = self._compute(image if len(miss) == len(keys) else image[miss])
            for j, i in enumerate(miss):
                # clone: a row view would keep the whole batch's output alive
                cache[keys[i]] = (feats[j].clone(), pooled[j].clone())
        return torch.stack([cache[k][0] for k in keys]), torch.stack([cache[k][1] for k in keys])

    def _compute(self, image: Tensor) -> tuple[Tensor, Tensor]:
        feats, pooled = self.body(image)  # (B, N, W) or (B, C, H, W); (B, W_pool)
        if feats.dim() == 4:  # CNN feature map (B, C, H, W) -> tokens (B, H*W, C)
            feats = feats.flatten(2).transpose(1, 2)
        if not self.has_cls:
            if pooled.shape[-1] != feats.shape[-1]:
                raise ValueError(f"image model {type(self.body).__name__}: pooled width "
                                 f"{pooled.shape[-1]} != token width {feats.shape[-1]}; "
                                 "cannot prepend a summary token")
            feats = torch.cat([pooled.unsqueeze(1), feats], dim=1)
        return feats, pooled  # (B, N, W), (B, W_pool)


def _text_config(cfg: ModelConfig, vocab_size: int):
    """Resolve the transformers config for the text tower, offline.

    - `text_model: config`: BertConfig(**text_config) from scratch.
    - a local directory or a config .json file: that config (+ text_config overrides).
    - a hub name (e.g. bert-base-chinese): the locally cached config when there is one; when there is none and
      `text_pretrained` is false, fall back to BertConfig(**text_config) (BertConfig's defaults are the
      bert-base architecture, which is what bert-base-chinese and chinese-roberta-wwm-ext use) with a warning.
      With `text_pretrained: true` the weights must be local: no fallback.
    `vocab_size` (from the tokenizer) always wins over the config's.
    """
    from transformers import AutoConfig, BertConfig

    overrides: dict[str, Any] = dict(cfg.text_config)
    overrides["vocab_size"] = vocab_size
    name = cfg.text_model
    if name == CONFIG_ONLY:
        return BertConfig(**overrides)
    if os.path.isfile(name) and name.endswith(".json"):
        with open(name) as f:
            raw = json.load(f)
        model_type = raw.pop("model_type", "bert")
        raw.update(overrides)
        return AutoConfig.for_model(model_type, **raw)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if cfg.text_pretrained:
            raise ValueError(f"model.text_model {name!r}: pretrained weights requested "
                             f"(model.text_pretrained) but not available offline: {err}") from err
        log.warning("model.text_model %r not available offline; building BertConfig(**model.text_config) "
                    "from scratch (set model.text_model=config to make this explicit)", name)
        return BertConfig(**overrides)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


class TextTower(nn.Module):
    """transformers encoder -> (tokens (B, L, W), CLS (B, W))."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0) -> None:
        super().__init__()
        from transformers import AutoModel

        config = _text_config(cfg, vocab_size)
        config.pad_token_id = pad_token_id
        if cfg.text_pretrained and cfg.text_model != CONFIG_ONLY:
            # Overrides (dropout, ...) apply; the checkpoint keeps its vocabulary size, resized below when the
            # tokenizer's differs.
            over = {k: v for k, v in cfg.text_config.items() if k != "vocab_size"}
            self.body = self._build(lambda **kw: AutoModel.from_pretrained(
                cfg.text_model, local_files_only=True, **{**over, **kw}))
            if self.body.get_input_embeddings().num_embeddings != vocab_size:
                self.body.resize_token_embeddings(vocab_size)
        else:
            self.body = self._build(lambda **kw: AutoModel.from_config(config, **kw))
        if wants(cfg.activation_checkpointing, "towers"):
            enable_transformers(self.body, cfg.text_model)
        self.width = int(self.body.config.hidden_size)

    @staticmethod
    def _build(make):
        # The pooler (tanh on CLS) is unused: leaving it out keeps every parameter in the graph (DDP/ZeRO).
        try:
            return make(add_pooling_layer=False)
        except TypeError:  # families without a pooler do not take the argument
            return make()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, W)
        return tokens, tokens[:, 0]
