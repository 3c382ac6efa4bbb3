"""A cross-encoder layer gives the same outputs and gradients with the Triton kernel as with the SDPA path.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py); on CUDA natively.
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from r2d2ds.models.cross_encoder import CrossEncoderLayer, MultiHeadAttention

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The package re-exports the function under the module's name, so fetch the module itself.
ca_module = importlib.import_module("r2d2ds.kernels.cross_attention")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts launches of the Triton autograd function, so a test sees the kernel really ran."""
    calls = []
    real_apply = ca_module._CrossAttentionTriton.apply

    def spy(*args):
        calls.append(1)
        return real_apply(*args)

    monkeypatch.setattr(ca_module._CrossAttentionTriton, "apply", spy)
    return calls


def _layers(width=64, heads=2, ffn=128):
    torch.manual_seed(0)
    ref = CrossEncoderLayer(width, heads, ffn, dropout=0.1, attention_impl="torch").to(DEVICE).eval()
    fused = CrossEncoderLayer(width, heads, ffn, dropout=0.1, attention_impl="triton").to(DEVICE).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _inputs(B=3, Lq=9, Lk=21, width=64, ctx_mask_kind="padding"):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, Lq, width, generator=gen).to(DEVICE)
    ctx = torch.randn(B, Lk, width, generator=gen).to(DEVICE)
    x_mask = (torch.arange(Lq)[None, :] < torch.tensor([Lq, 4, 1])[:, None]).to(DEVICE)  # text padding
    if ctx_mask_kind == "none":
        ctx_mask = None
    else:
        ctx_mask = torch.arange(Lk)[None, :] < torch.tensor([Lk, 7, 0])[:, None]  # element 2: no valid key
        ctx_mask = ctx_mask.to(DEVICE)
    grad_out = torch.randn(B, Lq, width, generator=gen).to(DEVICE)
    return x, x_mask, ctx, ctx_mask, grad_out


def _forward_backward(layer, x, x_mask, ctx, ctx_mask, grad_out):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    ctx = ctx.detach().clone().requires_grad_()
    out = layer(x, x_mask, ctx, ctx_mask)
    out.backward(grad_out)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), x.grad, ctx.grad, grads


@pytest.mark.parametrize("ctx_mask_kind", ["padding", "none"])
def test_layer_triton_matches_torch(ctx_mask_kind, triton_calls):
    ref_layer, fused_layer = _layers()
    inputs = _inputs(ctx_mask_kind=ctx_mask_kind)
    out_r, dx_r, dctx_r, grads_r = _forward_backward(ref_layer, *inputs)
    assert not triton_calls
    out_f, dx_f, dctx_f, grads_f = _forward_backward(fused_layer, *inputs)
    assert len(triton_calls) == 2, "self- and cross-attention must both run the Triton kernel"

    tol = dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out_f, out_r, **tol)
    torch.testing.assert_close(dx_f, dx_r, **tol)
    torch.testing.assert_close(dctx_f, dctx_r, **tol)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        assert grads_r[name] is not None and grads_f[name] is not None, name
        torch.testing.assert_close(grads_f[name], grads_r[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    # The gradients are not trivially zero, and a context with no valid key passes none.
    assert dctx_r.abs().sum() > 0 and grads_r["cross_attn.k.weight"].abs().sum() > 0
    if ctx_mask_kind == "padding":
        assert (dctx_f[2] == 0).all() and (dctx_f[1, 7:] == 0).all()


def test_default_impl_uses_the_kernel_on_cuda_only(triton_calls):
    torch.manual_seed(0)
    layer = CrossEncoderLayer(64, 2, 128, dropout=0.0).to(DEVICE).eval()  # attention_impl defaults to "auto"
    x, x_mask, ctx, ctx_mask, _ = _inputs()
    with torch.no_grad():
        layer(x, x_mask, ctx, ctx_mask)
    assert len(triton_calls) == (2 if DEVICE.type == "cuda" else 0)


class _CopyCounter(TorchDispatchMode):
    """Counts the aten ops that copy tensor data (clone, copy_, _to_copy, ...: what .contiguous(), a copying
    .reshape() and their backwards dispatch), except inside Triton interpreter launches, which stage their
    arguments with copies of their own (a GPU launch dispatches no aten op)."""

    def __init__(self):
        super().__init__()
        self.copies = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self.paused and ("clone" in name or "copy" in name):
            self.copies[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("layout", "copies"), [("strided", 0), ("contiguous", 8)])
def test_attention_copies_nothing_on_the_strided_path(layout, copies, monkeypatch):
    """MultiHeadAttention forward + backward on the Triton path (a padded key mask): with the strided layout no
    op copies (q, k, v read from the projections' (B, L, H, Dh) views, out written where the output projection
    reads it, dO read from its input gradient, dq / dk / dv written in the projections' layouts). The previous
    layout is the control that shows the counter sees copies: 8, namely q, k, v and the head merge forward, dO
    and the dq, dk, dv head merges backward."""
    monkeypatch.setenv("R2D2DS_CROSS_ATTENTION_LAYOUT", layout)
    counter = _CopyCounter()
    if DEVICE.type == "cpu":
        from triton.runtime import interpreter

        real_call = interpreter.GridExecutor.__call__

        def paused(self, *args, **kwargs):
            counter.paused = True
            try:
                return real_call(self, *args, **kwargs)
            finally:
                counter.paused = False

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", paused)
    torch.manual_seed(0)
    attn = MultiHeadAttention(64, 2, attention_impl="triton").to(DEVICE)
    x, _, ctx, ctx_mask, grad_out = _inputs()
    x, ctx = x.requires_grad_(), ctx.requires_grad_()
    with counter:
        attn(x, ctx, ctx_mask).backward(grad_out)
    assert sum(counter.copies.values()) == copies, dict(counter.copies)
    assert x.grad.abs().sum() > 0 and ctx.grad.abs().sum() > 0
