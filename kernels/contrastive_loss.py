"""GCPR contrastive loss over the global batch with O(B*D) memory (DESIGN.md section 3, `contrastive_loss`).

Math. With N global rows, s_ij = scale * <x_i, y_j> and row targets q_ij (sum_j q_ij = 1), one direction's row
loss is the cross entropy  CE_i = LSE_j(s_ij) - sum_j q_ij s_ij,  so the forward needs only the per-row LSE
and the target-weighted term. q_ij = (1 - alpha) * 1[id_i = id_j] / cnt_i + alpha * exp(t_ij - TLSE_i), where
t = scale * <x_teacher_i, y_teacher_j> and TLSE_i is the teacher row's own LSE (one extra tiled pass, no B x
B). The gradient of sum_i w_i CE_i w.r.t. s_ij is G_ij = w_i (p_ij - q_ij) with p_ij = exp(s_ij - LSE_i): the
backward recomputes s (and t) tile by tile from the stored LSE, and dx = scale * G y, dy = scale * G^T x,
dscale = sum_ij G_ij <x_i, y_j>.

The loss is (i2t + t2i) / 2: i2t rows are this rank's images over all gathered texts, t2i rows this rank's
texts over all gathered images. Gathered columns carry no autograd graph; their gradients are reduce-scattered
to their owners in backward. Rows are weighted by W / N (W ranks, N global rows) in backward, so that after
the data-parallel gradient average every parameter gets exactly d(global-batch loss)/d(param) (the gradient
invariant), for any world size and even for uneven local batches; with equal local batches this is open_clip's
gather_with_grad convention.

File order (DESIGN.md section 4): reference -> autotune configs -> Triton kernels -> launchers ->
autograd.Function -> functional API. Triton is imported lazily (`_triton()`), so impl="torch" works where
Triton is absent and the interpreter flag can still be set before the first Triton import."""

from __future__ import annotations

import os

import torch

from r2d2ds.distributed.collectives import all_gather_rows, gather_sizes, reduce_scatter_rows, row_offset

__all__ = ["contrastive_loss", "contrastive_loss_reference"]

# ----------------------------------------------------------------------------------------------------------
# Reference (naive B x B): the float64 ground truth of the tests and impl="reference".
# ----------------------------------------------------------------------------------------------------------


def _soft_targets(ids_r: torch.Tensor, ids_c: torch.Tensor, t_logits: torch.Tensor | None, alpha: float,
                  dim: int) -> torch.Tensor:
    """(R, C) targets: uniform over same-id entries along `dim`, mixed with softmax(t_logits) along `dim`."""
    pos = (ids_r[:, None] == ids_c[None, :]).to(t_logits.dtype if t_logits is not None else torch.float64)
    y = pos / pos.sum(dim=dim, keepdim=True)
    if t_logits is None or alpha == 0.0:
        return y
    return (1.0 - alpha) * y + alpha * torch.softmax(t_logits, dim=dim)


def contrastive_loss_reference(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                               labels: torch.Tensor | None = None,
                               teacher_image_emb: torch.Tensor | None = None,
                               teacher_text_emb: torch.Tensor | None = None, alpha: float = 0.0,
                               row_offset_: int = 0, num_rows: int | None = None) -> torch.Tensor:
    """Naive loss on gathered (N, D) inputs, averaged over rows [row_offset_, row_offset_ + num_rows).

    Computes in the inputs' dtype (pass float64 for ground truth). Single process: the defaults (all rows).
    """
    n = image_emb.shape[0]
    num_rows = n if num_rows is None else num_rows
    rows = slice(row_offset_, row_offset_ + num_rows)
    ids = torch.arange(n, device=image_emb.device) if labels is None else labels
    logits = logit_scale * image_emb @ text_emb.T  # (N, N) i2t logits; t2i is its transpose
    t_logits = None
    if teacher_image_emb is not None and alpha != 0.0:
        scale_t = logit_scale.detach() if torch.is_tensor(logit_scale) else logit_scale
        t_logits = (scale_t * teacher_image_emb @ teacher_text_emb.T).detach().to(logits.dtype)
    ids_rows = ids[rows]
    # i2t: local image rows over all texts
    q_i2t = _soft_targets(ids_rows, ids, None if t_logits is None else t_logits[rows], alpha, dim=1)
    l_i2t = -(q_i2t.to(logits.dtype) * torch.log_softmax(logits[rows], dim=1)).sum(1)
    # t2i: local text rows over all images (= columns of the i2t matrix)
    q_t2i = _soft_targets(ids_rows, ids, None if t_logits is None else t_logits[:, rows].T, alpha, dim=1)
    l_t2i = -(q_t2i.to(logits.dtype) * torch.log_softmax(logits[:, rows].T, dim=1)).sum(1)
    return ((l_i2t + l_t2i) / 2).mean()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows forward; reduce-scatter (sum) of the gradient backward: open_clip's gather_with_grad"""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return all_gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_rows(g, ctx.sizes, ctx.group), None, None


def _reference_impl(image_emb, text_emb, scale, labels, t_img, t_txt, alpha, group):
    sizes = gather_sizes(image_emb.shape[0], image_emb.device, group)
    world, n, b = len(sizes), sum(sizes), image_emb.shape[0]
    img = _GatherWithGrad.apply(image_emb, sizes, group).float()
    txt = _GatherWithGrad.apply(text_emb, sizes, group).float()
    lab = None if labels is None else all_gather_rows(labels, sizes, group)
    ti = None if t_img is None else all_gather_rows(t_img, sizes, group).float()
    tt = None if t_txt is None else all_gather_rows(t_txt, sizes, group).float()
    loss = contrastive_loss_reference(img, txt, scale, lab, ti, tt, alpha, row_offset(sizes, group), b)
    if world == 1 or min(sizes) == max(sizes):
        return loss
    # Uneven local batches: the value stays the local mean, the gradient is that of (W / N) * local sum.
    weighted = loss * (b * world / n)
    return weighted + (loss - weighted).detach()


# ----------------------------------------------------------------------------------------------------------
# Blockwise PyTorch (impl="torch"): row blocks of the (B, N) logits, recompute in backward; O(B*D + blk*N).
# ----------------------------------------------------------------------------------------------------------

_TORCH_BLOCK_ELEMS = 1 << 21  # ~8 MiB of fp32 logits per row block; a few such temporaries live at once


def _torch_block_rows(n_cols: int) -> int:
    return max(16, min(4096, _TORCH_BLOCK_ELEMS // max(n_cols, 1)))


def _torch_dir_fwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, tlse, sample_gen=None):
    """One direction, rows x (B, D) over columns y (N, D): lse (B,), tgt (B,) fp32 and sampled negatives.

    tlse (B,) is the teacher rows' LSE (None: no teacher). sample_gen: a Generator to draw one Gumbel-max
    negative per row (positives excluded), else None.
    """
    b = x.shape[0]
    lse = torch.empty(b, dtype=torch.float32, device=x.device)
    tgt = torch.empty_like(lse)
    neg = torch.empty(b, dtype=torch.long, device=x.device) if sample_gen is not None else None
    yf = y.float()
    ytf = None if yt is None else yt.float()
    step = _torch_block_rows(y.shape[0])
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        s = (x[r0:r1].float() @ yf.T) * scale  # (blk, N) fp32
        lse[r0:r1] = torch.logsumexp(s, dim=1)
        pos = ids_r[r0:r1, None] == ids_c[None, :]  # (blk, N) positives
        q = pos.float() / cnt_r[r0:r1, None]
        if tlse is not None:
            t = (xt[r0:r1].float() @ ytf.T) * scale
            q = (1.0 - alpha) * q + alpha * torch.exp(t - tlse[r0:r1, None])
        tgt[r0:r1] = (q * s).sum(1)
        if sample_gen is not None:
            neg[r0:r1] = _gumbel_argmax(s, pos, sample_gen)
    return lse, tgt, neg


def _gumbel_argmax(s: torch.Tensor, pos: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gumbel-max: argmax_j (s_ij + g_ij) over non-positive j samples the row softmax restricted to them."""
    u = torch.rand(s.shape, generator=gen, device=s.device, dtype=torch.float32).clamp_(min=1e-20)
    z = (s.detach().float() - torch.log(-torch.log(u))).masked_fill_(pos, float("-inf"))
    best, idx = z.max(dim=1)
    return torch.where(torch.isneginf(best), torch.full_like(idx, -1), idx)


def _torch_teacher_lse(xt, yt, scale):
    b = xt.shape[0]
    out = torch.empty(b, dtype=torch.float32, device=xt.device)
    ytf = yt.float()
    step = _torch_block_rows(yt.shape[0])
    for r0 in range(0, b, step):
        out[r0:r0 + step] = torch.logsumexp((xt[r0:r0 + step].float() @ ytf.T) * scale, dim=1)
    return out


def _torch_dir_bwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, lse, tlse, w):
    """Gradient of sum_i w * CE_i: dx (B, D), dy (N, D) fp32 and the dot-product part of dscale (0-dim)."""
    b = x.shape[0]
    yf = y.float()
    ytf = None if yt is None else yt.float()
    dx = torch.empty(b, x.shape[1], dtype=torch.float32, device=x.device)
    dy = torch.zeros_like(yf)
    ds = torch.zeros((), dtype=torch.float32, device=x.device)
    step = _torch_block_rows(y.shape[0])
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        xb = x[r0:r1].float()
        dot = xb @ yf.T  # (blk, N)
        g = torch.exp(dot * scale - lse[r0:r1, None])  # p
        pos = ids_r[r0:r1, None] == ids_c[None, :]
        q = pos.float() / cnt_r[r0:r1, None]
        if tlse is not None:
            t = (xt[r0:r1].float() @ ytf.T) * scale
            q = (1.0 - alpha) * q + alpha * torch.exp(t - tlse[r0:r1, None])
        g = (g - q) * w  # (blk, N) dLoss/ds
        ds += (g * dot).sum()
        g.mul_(scale)  # dLoss/d<x, y>: the chain rule through s = scale * <x, y>
        dx[r0:r1] = g @ yf
        dy.addmm_(g.T, xb)
    return dx, dy, ds


# ----------------------------------------------------------------------------------------------------------
# Triton: autotune configs, kernels (defined on first use by _triton()), launchers.
# ----------------------------------------------------------------------------------------------------------

_TRITON = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton():
    """Import Triton and define the kernels once (lazily: TRITON_INTERPRET must be set before the import)."""
    global _TRITON
    if _TRITON is None:
        raise RuntimeError("impl='triton' is being built; use impl='torch'")
    return _TRITON


# ----------------------------------------------------------------------------------------------------------
# autograd.Function: both directions, gather / reduce-scatter, backend = "torch" or "triton".
# ----------------------------------------------------------------------------------------------------------


def _global_ids(labels, b, sizes, group, device):
    """Local row ids (B,), global column ids (N,), and per-local-row positive counts (B,) (fp32)."""
    if labels is None:  # diagonal positives: the id is the global row index
        off = row_offset(sizes, group)
        ids_r = torch.arange(off, off + b, device=device)
        ids_c = torch.arange(sum(sizes), device=device)
        return ids_r, ids_c, torch.ones(b, dtype=torch.float32, device=device)
    ids_r = labels.to(device=device, dtype=torch.long).contiguous()
    ids_c = all_gather_rows(ids_r, sizes, group)
    srt = torch.sort(ids_c).values  # O(N log N) counts instead of a (B, N) comparison
    cnt = torch.searchsorted(srt, ids_r, right=True) - torch.searchsorted(srt, ids_r)
    return ids_r, ids_c, cnt.float()


class _ContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_emb, text_emb, scale, labels, t_img, t_txt, alpha, group, backend, seed):
        b = image_emb.shape[0]
        sizes = gather_sizes(b, image_emb.device, group)
        world, n = len(sizes), sum(sizes)
        img_all = all_gather_rows(image_emb, sizes, group)  # (N, D) no autograd
        txt_all = all_gather_rows(text_emb, sizes, group)
        ids_r, ids_c, cnt = _global_ids(labels, b, sizes, group, image_emb.device)
        teacher = t_img is not None and alpha != 0.0
        ti_all = all_gather_rows(t_img, sizes, group) if teacher else None
        tt_all = all_gather_rows(t_txt, sizes, group) if teacher else None
        scale_d = scale.detach()
        sample = seed is not None
        off = row_offset(sizes, group)
        dirs = ((image_emb, txt_all, t_img, tt_all), (text_emb, img_all, t_txt, ti_all))
        lses, tlses, negs = [], [], []
        total = torch.zeros((), dtype=torch.float32, device=image_emb.device)
        for k, (x, y, xt, yt) in enumerate(dirs):
            tlse = backend.teacher_lse(xt, yt, scale_d) if teacher else None
            lse, tgt, neg = backend.fwd(x, y, scale_d, ids_r, ids_c, cnt, xt if teacher else None,
                                        yt, alpha, tlse, None if not sample else seed + k, off)
            total = total + (lse - tgt).sum()
            lses.append(lse)
            tlses.append(tlse)
            negs.append(neg)
        ctx.save_for_backward(image_emb, text_emb, img_all, txt_all, t_img if teacher else None,
                              t_txt if teacher else None, ti_all, tt_all, ids_r, ids_c, cnt, scale_d,
                              lses[0], lses[1], *tlses)
        ctx.meta = (sizes, group, backend, alpha, teacher, world, n)
        loss = total / (2 * b)
        if sample:
            ctx.mark_non_differentiable(negs[0], negs[1])
            return loss, negs[0], negs[1]
        return loss

    @staticmethod
    def backward(ctx, grad, *unused):
        (image_emb, text_emb, img_all, txt_all, t_img, t_txt, ti_all, tt_all, ids_r, ids_c, cnt, scale,
         lse0, lse1, tlse0, tlse1) = ctx.saved_tensors
        sizes, group, backend, alpha, teacher, world, n = ctx.meta
        # Row weight W / N (not 1 / B): the gradient invariant for any world size (module docstring).
        w = grad.float() * (0.5 * world / n)
        dx_img, dy_txt, ds0 = backend.bwd(image_emb, txt_all, scale, ids_r, ids_c, cnt, t_img, tt_all, alpha,
                                          lse0, tlse0, w)
        dx_txt, dy_img, ds1 = backend.bwd(text_emb, img_all, scale, ids_r, ids_c, cnt, t_txt, ti_all, alpha,
                                          lse1, tlse1, w)
        d_img = dx_img + reduce_scatter_rows(dy_img, sizes, group)  # columns' grads go back to their owners
        d_txt = dx_txt + reduce_scatter_rows(dy_txt, sizes, group)
        d_scale = None
        if ctx.needs_input_grad[2]:
            d_scale = (ds0 + ds1).reshape(())
        return (d_img.to(image_emb.dtype), d_txt.to(text_emb.dtype), d_scale,
                None, None, None, None, None, None, None)


class _TorchBackend:
    @staticmethod
    def teacher_lse(xt, yt, scale):
        return _torch_teacher_lse(xt, yt, scale)

    @staticmethod
    def fwd(x, y, scale, ids_r, ids_c, cnt, xt, yt, alpha, tlse, seed, off):
        gen = None
        if seed is not None:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(_mix_seed(seed, off))
        return _torch_dir_fwd(x, y, scale, ids_r, ids_c, cnt, xt, yt, alpha, tlse, gen)

    @staticmethod
    def bwd(x, y, scale, ids_r, ids_c, cnt, xt, yt, alpha, lse, tlse, w):
        return _torch_dir_bwd(x, y, scale, ids_r, ids_c, cnt, xt, yt, alpha, lse, tlse, w)


def _mix_seed(seed: int, offset: int) -> int:
    """A distinct generator seed per (seed, rank offset): ranks draw independent noise from one user seed."""
    return (seed * 0x9E3779B1 + offset * 0x85EBCA77) % (1 << 63)


def draw_seed(generator: torch.Generator | None, seed: int | None, device) -> int:
    """`seed` if given, else an int drawn from `generator` (or the default RNG); same state, same seed."""
    if seed is not None:
        return int(seed) % (1 << 62)
    dev = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=dev).item())  # host sync, once


# ----------------------------------------------------------------------------------------------------------
# Functional API (DESIGN.md section 3)
# ----------------------------------------------------------------------------------------------------------


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl not in ("triton", "torch", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton', 'torch' or 'reference', got {impl!r}")
    return impl


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float | torch.Tensor,
                     labels: torch.Tensor | None = None, teacher_image_emb: torch.Tensor | None = None,
                     teacher_text_emb: torch.Tensor | None = None, alpha: float = 0.0, group=None,
                     impl: str = "auto", *, return_negatives: bool = False,
                     generator: torch.Generator | None = None, seed: int | None = None):
    """GCPR loss (+ TgD targets) over the global batch of `group` (DESIGN.md section 3, module docstring).

    Returns a 0-dim fp32 tensor, or with return_negatives=True `(loss, neg_txt_for_img, neg_img_for_txt)`:
    int64 (B_local,) global indices drawn in the same pass, as `sample_hard_negatives` would (positives
    excluded, -1 for a row without negatives), seeded by `seed` or `generator`.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must both be (B, D), got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if labels is not None and labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be ({image_emb.shape[0]},), got {tuple(labels.shape)}")
    if (teacher_image_emb is None) != (teacher_text_emb is None):
        raise ValueError("pass both teacher_image_emb and teacher_text_emb, or neither")
    if teacher_image_emb is not None and teacher_image_emb.shape != image_emb.shape:
        raise ValueError("teacher embeddings must have the student's shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    impl = _resolve_impl(impl, image_emb.device)
    scale = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale))
    scale = scale.to(device=image_emb.device, dtype=torch.float32).reshape(())
    t_img = None if teacher_image_emb is None else teacher_image_emb.detach()
    t_txt = None if teacher_text_emb is None else teacher_text_emb.detach()
    if impl == "reference":
        if return_negatives:
            raise ValueError("return_negatives needs impl 'torch' or 'triton' (use sample_hard_negatives)")
        return _reference_impl(image_emb, text_emb, scale, labels, t_img, t_txt, alpha, group)
    sd = draw_seed(generator, seed, image_emb.device) if return_negatives else None
    backend = _TorchBackend if impl == "torch" else _triton().Backend
    if impl == "triton" and image_emb.device.type != "cuda" and not _interpreting():
        raise RuntimeError("impl='triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    if teacher_image_emb is not None and alpha != 0.0:
        t_img, t_txt = t_img.contiguous(), t_txt.contiguous()
    return _ContrastiveLoss.apply(image_emb.contiguous(), text_emb.contiguous(), scale, labels, t_img, t_txt,
                                  float(alpha), group, backend, sd)

