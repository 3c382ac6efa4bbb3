"""The autograd.Function over both directions (gather / reduce-scatter, backend "torch" or "triton") and the
functional API `contrastive_loss` (DESIGN.md section 3)."""

from __future__ import annotations

import torch
from r2d2ds.kernels.contrastive_loss.blockwise_torch import _TorchBackend
from r2d2ds.kernels.contrastive_loss.launchers import _triton
from r2d2ds.kernels.contrastive_loss.reference import _reference_impl
from r2d2ds.kernels.contrastive_loss.triton_kernels import _interpreting

from r2d2ds.distributed.collectives import (
    all_gather_rows,
    all_gather_rows_async,
    gather_sizes,
    reduce_scatter_rows,
    reduce_scatter_rows_async,
    row_offset,
)

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
        sizes = gather_sizes(b, group)
        world, n = len(sizes), sum(sizes)
        # (N, D) gathered columns, no autograd. The images (and teacher images) are only needed by the t2i
        # pass: they travel while the i2t pass runs.
        img_pending = all_gather_rows_async(image_emb, sizes, group)
        txt_all = all_gather_rows(text_emb, sizes, group)
        ids_r, ids_c, cnt = _global_ids(labels, b, sizes, group, image_emb.device)
        teacher = t_img is not None and alpha != 0.0
        ti_pending = all_gather_rows_async(t_img, sizes, group) if teacher else None
        tt_all = all_gather_rows(t_txt, sizes, group) if teacher else None
        scale_d = scale.detach()
        sample = seed is not None
        off = row_offset(sizes, group)
        lses, tlses, negs = [], [], []
        total = torch.zeros((), dtype=torch.float32, device=image_emb.device)
        if world == 1 and not sample and getattr(backend, "fwd_both", None) is not None:
            # single process: both directions from one pass over the logits (column LSE merged online)
            tlses = list(backend.lse_both(t_img, t_txt, scale_d)) if teacher else [None, None]
            lse0, tgt0, lse1, tgt1 = backend.fwd_both(image_emb, text_emb, scale_d, ids_r, cnt,
                                                      t_img if teacher else None, t_txt if teacher else None,
                                                      alpha, *tlses)
            total = (lse0 - tgt0).sum() + (lse1 - tgt1).sum()
            lses = [lse0, lse1]
            negs = [None, None]
            img_all = img_pending.wait()
            ti_all = ti_pending.wait() if teacher else None
        # Otherwise a pass per direction: 0 = i2t (local images, all texts), 1 = t2i (local texts, all images)
        for k in range(2 if not lses else 0):
            if k == 0:
                x, y, xt, yt = image_emb, txt_all, t_img, tt_all
            else:
                img_all = img_pending.wait()
                ti_all = ti_pending.wait() if teacher else None
                x, y, xt, yt = text_emb, img_all, t_txt, ti_all
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
        if sample:  # (the fused single-process pass above never samples)
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
        if world == 1:  # rows and columns are one batch: both directions in one pass over the tiles
            d_img, d_txt, ds = backend.bwd(image_emb, text_emb, scale, ids_r, ids_c, cnt, t_img, t_txt, alpha,
                                           lse0, tlse0, w, cnt_c=cnt, lse_c=lse1, tlse_c=tlse1,
                                           out_dtype=image_emb.dtype)
        else:
            # t2i first; its column grads (all images) travel to their owners while i2t computes.
            dx_txt, dy_img, ds1 = backend.bwd(text_emb, img_all, scale, ids_r, ids_c, cnt, t_txt, ti_all,
                                              alpha, lse1, tlse1, w)
            img_owner = reduce_scatter_rows_async(dy_img, sizes, group)
            dx_img, dy_txt, ds0 = backend.bwd(image_emb, txt_all, scale, ids_r, ids_c, cnt, t_img, tt_all,
                                              alpha, lse0, tlse0, w)
            d_txt = dx_txt + reduce_scatter_rows(dy_txt, sizes, group)
            d_img = dx_img + img_owner.wait()
            ds = ds0 + ds1
        d_scale = None
        if ctx.needs_input_grad[2]:
            d_scale = ds.reshape(())
        return (d_img.to(image_emb.dtype), d_txt.to(text_emb.dtype), d_scale,
                None, None, None, None, None, None, None)


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
    if impl == "triton" and image_emb.device.type != "cuda" and not _interpreting():
        raise RuntimeError("impl='triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    backend = _TorchBackend if impl == "torch" else _triton()
    if teacher_image_emb is not None and alpha != 0.0:
        t_img, t_txt = t_img.contiguous(), t_txt.contiguous()
    return _ContrastiveLoss.apply(image_emb.contiguous(), text_emb.contiguous(), scale, labels, t_img, t_txt,
                                  float(alpha), group, backend, sd)
