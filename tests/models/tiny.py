"""Tiny configs and batches shared by the model, loss and distributed tests (no hub, fp32, fast)."""

from __future__ import annotations

import torch

from r2d2ds.config import LossConfig, ModelConfig

VOCAB = 100
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = [PAD, CLS, SEP, MASK]


def tiny_model_config(**over) -> ModelConfig:
    kw = dict(
        image_model="vit_tiny_patch16_224",
        image_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
        text_model="config",
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64),
        embed_dim=16, cross_layers=2, cross_heads=2, cross_dropout=0.1,
        attention_impl="torch", contrastive_impl="torch",
    )
    kw.update(over)
    return ModelConfig(**kw)


def no_dropout(cfg: ModelConfig) -> ModelConfig:
    """Same config with every dropout off (deterministic forward in train mode too)."""
    text = dict(cfg.text_config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ModelConfig(**{**cfg.__dict__, "text_config": text, "cross_dropout": 0.0})


def tiny_loss_config(**over) -> LossConfig:
    return LossConfig(**over)


def tiny_batch(b: int = 4, length: int = 12, seed: int = 0, ids: list[int] | None = None) -> dict:
    """[CLS] w ... w [SEP] [PAD]... texts of varying length; image_id repeats so multi-positives occur."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(SPECIALS), VOCAB, (b, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (b,), generator=g)
    pos = torch.arange(length)[None, :]
    attention_mask = (pos < lengths[:, None]).long()
    input_ids[:, 0] = CLS
    input_ids[torch.arange(b), lengths - 1] = SEP
    input_ids[attention_mask == 0] = PAD
    image_id = torch.tensor(ids) if ids is not None else torch.arange(b) // 2
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "input_ids": input_ids,
            "attention_mask": attention_mask, "image_id": image_id}
