"""Masked cross-attention for the two R2D2 cross encoders (contract: DESIGN.md section 3).

    out = cross_attention(q, k, v, key_mask=None, scale=None, impl="auto")

q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), Lq != Lk allowed; key_mask bool (B, Lk), True = attend. A query row
whose keys are all masked returns zeros and passes zero gradient (never NaN).

impl:
  "reference"  naive softmax(q k^T) v in the input dtype (holds Lq x Lk); the test oracle in float64.
  "torch"      F.scaled_dot_product_attention with the contract's mask handling; the CPU default.
  "triton"     fused FlashAttention-2 style kernels (forward: online softmax, per-row LSE saved; backward:
               tiles recomputed from the LSE); CUDA, or the Triton interpreter on CPU (TRITON_INTERPRET=1).
  "auto"       "triton" on CUDA when triton is importable, else "torch".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_IMPLS = ("auto", "triton", "torch", "reference")


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def cross_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Naive masked attention computed in the inputs' dtype (call it on float64 copies for an oracle).

    Written with an explicit max-subtracted softmax so a fully masked row is 0 / 1 = 0 with finite, zero
    gradients (softmax over an all -inf row would be NaN).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if key_mask is not None:
        valid = key_mask[:, None, None, :]  # (B, 1, 1, Lk)
        s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()  # (B, H, Lq, 1); -inf on fully masked rows
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)  # exp(-inf) = 0 with a zero derivative on masked keys
    denom = p.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1); 0 on fully masked rows
    out = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (SDPA)
# ----------------------------------------------------------------------------------------------------------


def _cross_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA with the contract's empty-row rule.

    SDPA returns NaN for a query row whose boolean mask is all False. The key mask is per (batch, key), so a
    row is empty exactly when its whole batch element is: give those elements an all-True mask (finite
    numbers) and multiply their output by 0, which also makes every gradient through them exactly 0.
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_key = key_mask.any(dim=-1)  # (B,)
    safe_mask = key_mask | ~has_key[:, None]  # (B, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :], scale=scale)
    if bool(has_key.all()):  # host sync on a (B,) bool; skips the multiply in the common case
        return out
    return out * has_key[:, None, None, None].to(out.dtype)


# ----------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        raise ValueError(f"q, k, v must be (B, H, L, Dh); got {shapes}")
    B, H, _, Dh = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dh:
        raise ValueError(f"k, v must be (B={B}, H={H}, Lk, Dh={Dh}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.shape != (B, k.shape[2]):
            raise ValueError(
                f"key_mask must be bool (B, Lk) = ({B}, {k.shape[2]}); "
                f"got {key_mask.dtype} {tuple(key_mask.shape)}"
            )


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Masked multi-head attention of q over (k, v); returns (B, H, Lq, Dh) in q's dtype.

    q (B, H, Lq, Dh); k, v (B, H, Lk, Dh); key_mask bool (B, Lk), True = attend; scale defaults to 1/sqrt(Dh).
    Differentiable in q, k, v. Rows with no valid key return zeros and pass zero gradient.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl!r}")
    _check_inputs(q, k, v, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if impl == "auto":
        impl = "triton" if q.is_cuda and _triton_importable() else "torch"
    if impl == "reference":
        return cross_attention_reference(q, k, v, key_mask, scale)
    if impl == "torch":
        return _cross_attention_torch(q, k, v, key_mask, scale)
    raise NotImplementedError("impl='triton' is not built yet; use impl='torch'")
