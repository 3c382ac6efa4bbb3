"""Naive B x B contrastive loss: the float64 ground truth of the tests and impl="reference" (math: package
docstring). Holds the whole (N, N) logit matrix: for tests and small batches only."""

from __future__ import annotations

import torch

from r2d2ds.distributed.collectives import all_gather_rows, gather_sizes, reduce_scatter_rows, row_offset

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
    sizes = gather_sizes(image_emb.shape[0], group)
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
