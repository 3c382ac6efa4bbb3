"""BERT-style cross encoder: N layers of self-attention -> cross-attention -> FFN (post-LN, as BERT/ALBEF).

Every attention goes through `r2d2ds.kernels.cross_attention` (DESIGN.md section 3), so the fused kernel
serves both self-attention (Lq == Lk, the query's own padding mask as key mask) and cross-attention (queries
from one modality, keys/values from the other). Attention-probability dropout is not applied: the kernel
contract has none (flash-attention style); residual dropout after each sub-layer stays. Every parameter is
used only inside its owning module's forward(), so ZeRO-3's per-module gather hooks see every use.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from r2d2ds.kernels import cross_attention
from r2d2ds.models.checkpointing import checkpointed


class MultiHeadAttention(nn.Module):
    """q from `x`, k/v from `ctx`; heads split to (B, H, L, Dh) for the kernel, merged and projected back."""

    def __init__(self, width: int, heads: int, attention_impl: str = "auto") -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"cross-encoder width {width} is not divisible by model.cross_heads={heads}")
        self.heads = heads
        self.attention_impl = attention_impl
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, t: Tensor) -> Tensor:
        b, n, w = t.shape
        # A view, no copy: (B, H, L, Dh) with the strides of the (B, L, H, Dh) projection output.
        return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        # x: (B, Lq, W), ctx: (B, Lk, W), ctx_mask: bool (B, Lk) True = attend, or None
        q, k, v = self._split(self.q(x)), self._split(self.k(ctx)), self._split(self.v(ctx))
        # The Triton kernel reads these strided views in place and writes o in q's (B, Lq, H, Dh) layout, so the
        # merge below is a view and its backward hands the kernel dO as a view too (dq / dk / dv come back in
        # the projections' layouts): no copy either way. The SDPA path copies where it must.
        o = cross_attention(q, k, v, key_mask=ctx_mask, impl=self.attention_impl)  # (B, H, Lq, Dh)
        b, h, lq, dh = o.shape
        return self.out(o.transpose(1, 2).reshape(b, lq, h * dh))  # (B, Lq, W)


class FeedForward(nn.Module):
    def __init__(self, width: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CrossEncoderLayer(nn.Module):
    """x <- LN(x + SelfAttn(x)); x <- LN(x + CrossAttn(x, ctx)); x <- LN(x + FFN(x)).

    Post-LN as BERT (LayerNorm eps 1e-12), dropout on each sub-layer's output before the residual add.
    """

    def __init__(self, width: int, heads: int, ffn: int, dropout: float = 0.1,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        self.attention_impl = attention_impl
        self.self_attn = MultiHeadAttention(width, heads, attention_impl)
        self.self_norm = nn.LayerNorm(width, eps=1e-12)
        self.cross_attn = MultiHeadAttention(width, heads, attention_impl)
        self.cross_norm = nn.LayerNorm(width, eps=1e-12)
        self.ffn = FeedForward(width, ffn)
        self.ffn_norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, x_mask: Tensor | None, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        # x: (B, Lq, W), x_mask bool (B, Lq) True = valid, or None; ctx: (B, Lk, W), ctx_mask (B, Lk) or None.
        # Padded query rows are computed like any other and ignored by every loss.
        x = self.self_norm(x + self.dropout(self.self_attn(x, x, x_mask)))
        x = self.cross_norm(x + self.dropout(self.cross_attn(x, ctx, ctx_mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))  # (B, Lq, W)


class CrossEncoder(nn.Module):
    """A stack of `CrossEncoderLayer`s sharing one query/context pair of masks.

    `checkpointing`: each layer keeps only its input and is recomputed in the backward (models/checkpointing.py).
    """

    def __init__(self, layers: int, width: int, heads: int, ffn: int, dropout: float = 0.1,
                 attention_impl: str = "auto", checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.layers = nn.ModuleList(
            CrossEncoderLayer(width, heads, ffn, dropout, attention_impl) for _ in range(layers))

    def forward(self, x: Tensor, x_mask: Tensor | None, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = checkpointed(layer, x, x_mask, ctx, ctx_mask) if self.checkpointing else layer(x, x_mask, ctx, ctx_mask)
        return x


class MLMHead(nn.Module):
    """BERT's prediction head: Linear -> GELU -> LayerNorm -> decoder to the vocabulary.

    The decoder is NOT tied to the word embeddings: under ZeRO-3 a tied weight would be read outside its
    owning module's forward (where it is not gathered).
    """

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (..., vocab_size)
