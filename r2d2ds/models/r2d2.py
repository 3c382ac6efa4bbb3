"""R2D2: two towers with projection heads, a learnable temperature, and two cross encoders with ITM/MLM heads.

Single-device code (no torch.distributed, no deepspeed). ZeRO-3 gathers a parameter only in the forward
pre-hook of the module that owns it, so R2D2 holds no parameter of its own: the temperature is a submodule
called through its forward(), every head is its own module, and the MLM decoder is not tied to the embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r2d2ds.config import ModelConfig
from r2d2ds.models.checkpointing import wants
from r2d2ds.models.cross_encoder import CrossEncoder, MLMHead
from r2d2ds.models.towers import ImageTower, TextTower


class Temperature(nn.Module):
    """Learnable tau = exp(log_tau), clamped to [tau_min, tau_max]; forward() returns the logit scale 1/tau.

    Clamping log_tau (not 1/tau) keeps the bound exact; the gradient is zero while the clamp is active (CLIP).
    """

    def __init__(self, init: float, tau_min: float, tau_max: float) -> None:
        super().__init__()
        # Shape (1,), not 0-dim: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors cannot
        # take.
        self.log_tau = nn.Parameter(torch.full((1,), math.log(init), dtype=torch.float32))
        self.log_min, self.log_max = math.log(tau_min), math.log(tau_max)

    def forward(self) -> Tensor:
        # fp32 whatever the module dtype: the scale multiplies logits accumulated in fp32.
        return torch.exp(-self.log_tau.float().clamp(self.log_min, self.log_max)).squeeze(0)  # 0-dim, 1/tau


class Projection(nn.Module):
    """Linear to the shared embedding size, then L2 normalisation (in fp32, returned in the input dtype)."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return F.normalize(y.float(), dim=-1, eps=1e-6).to(y.dtype)  # (B, D)


class ITMHead(nn.Module):
    """Match / no-match logits from the first token of a cross encoder's output (class 1 = match)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden[:, 0])  # (B, 2)


class R2D2(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg, vocab_size, pad_token_id)
        self.image_proj = Projection(self.image_tower.pooled_width, cfg.embed_dim)
        self.text_proj = Projection(self.text_tower.width, cfg.embed_dim)
        self.temperature = Temperature(cfg.temperature_init, cfg.temperature_min, cfg.temperature_max)

        width = self.text_tower.width  # the cross encoders work at the text tower's width
        ffn = cfg.cross_ffn or 4 * width
        # Image tokens enter both cross encoders at the cross width (one shared projection).
        self.image_to_cross = (nn.Linear(self.image_tower.width, width) if self.image_tower.width != width
                               else nn.Identity())
        ckpt = wants(cfg.activation_checkpointing, "cross")
        self.text_query_encoder = CrossEncoder(cfg.cross_layers, width, cfg.cross_heads, ffn,
                                               cfg.cross_dropout, cfg.attention_impl, ckpt)
        self.image_query_encoder = CrossEncoder(cfg.cross_layers, width, cfg.cross_heads, ffn,
                                                cfg.cross_dropout, cfg.attention_impl, ckpt)
        self.itm_text_query = ITMHead(width)
        self.itm_image_query = ITMHead(width)
        self.mlm_head = MLMHead(width, vocab_size)

    def _image_dtype(self) -> torch.dtype:
        # dtype only (no data read), so this is safe on ZeRO-3-partitioned parameters.
        return next(self.image_tower.parameters()).dtype

    def encode_image(self, image: Tensor, with_pooled: bool = False,
                     cache_keys: Tensor | None = None) -> tuple[Tensor, ...]:
        """image (B, 3, H, W) -> tokens (B, N, W_img), CLS/pooled token first; emb (B, D) L2-normalised; with
        `with_pooled` also the tower's pooled vector (B, W_pool) that `emb` projects. `cache_keys`: (B,) image
        ids for the frozen tower's feature cache (model.image_feature_cache; ignored without it)."""
        tokens, pooled = self.image_tower(image.to(self._image_dtype()), cache_keys)
        emb = self.image_proj(pooled)
        return (tokens, emb, pooled) if with_pooled else (tokens, emb)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids, mask (B, L) -> tokens (B, L, W_txt), emb (B, D) L2-normalised from the CLS token."""
        tokens, cls = self.text_tower(input_ids, attention_mask)
        return tokens, self.text_proj(cls)

    def logit_scale(self) -> Tensor:
        """0-dim fp32 1/tau."""
        return self.temperature()

    def text_query(self, txt_tokens: Tensor, attention_mask: Tensor, img_tokens: Tensor) -> Tensor:
        """Text tokens (B, L, W) attend to image tokens (B, N, W_img) -> hidden (B, L, W)."""
        img = self.image_to_cross(img_tokens)  # (B, N, W)
        return self.text_query_encoder(txt_tokens, attention_mask.bool(), img, None)

    def image_query(self, img_tokens: Tensor, txt_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """Image tokens (B, N, W_img) attend to text tokens (B, L, W) -> hidden (B, N, W)."""
        img = self.image_to_cross(img_tokens)  # (B, N, W)
        return self.image_query_encoder(img, None, txt_tokens, attention_mask.bool())

    def itm_logits(self, img_tokens: Tensor, txt_tokens: Tensor,
                   attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """((B, 2) text-query ITM logits, (B, 2) image-query ITM logits); class 1 = match."""
        tq = self.text_query(txt_tokens, attention_mask, img_tokens)
        iq = self.image_query(img_tokens, txt_tokens, attention_mask)
        return self.itm_text_query(tq), self.itm_image_query(iq)

    def mlm_logits(self, text_query_hidden: Tensor) -> Tensor:
        """(..., W) text-query hidden states -> (..., vocab_size) logits."""
        return self.mlm_head(text_query_hidden)
