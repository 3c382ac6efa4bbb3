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

from r2d2ds.distributed.collectives import (
    all_gather_rows,
    all_gather_rows_async,
    gather_sizes,
    reduce_scatter_rows,
    reduce_scatter_rows_async,
    row_offset,
)

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


# ----------------------------------------------------------------------------------------------------------
# Blockwise PyTorch (impl="torch"): row blocks of the (B, N) logits, recompute in backward; O(B*D + blk*N).
# ----------------------------------------------------------------------------------------------------------

_TORCH_BLOCK_ELEMS = 1 << 21  # ~8 MiB of fp32 logits per row block; a few such temporaries live at once


def _torch_block_rows(n_cols: int) -> int:
    return max(16, min(4096, _TORCH_BLOCK_ELEMS // max(n_cols, 1)))


def _segment_sum(keys: torch.Tensor, vals: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(Q, D): for each query id, the sum of the `vals` rows whose key equals it (0 when none).

    O((K + Q) log K). The uniform multi-positive targets only meet the logits as sums over same-id rows, so
    their part of the loss and of every gradient is an O(N*D) segment sum instead of a (B, N) mask:
    sum_j y_ij s_ij = scale * <x_i, sum_{j: id_j = id_i} y_j> / cnt_i.
    """
    uniq, inv = torch.unique(keys, return_inverse=True)
    sums = vals.new_zeros(uniq.shape[0], vals.shape[1]).index_add_(0, inv, vals)
    idx = torch.searchsorted(uniq, query).clamp_(max=uniq.shape[0] - 1)
    return sums[idx] * (uniq[idx] == query)[:, None]


class _Blocks:
    """Row blocks of a (B, N) product and reused (blk, N) fp32 buffers: every block writes into the same
    memory (torch.mm(out=), in-place elementwise ops), so a step allocates a few blocks once instead of a
    dozen temporaries per block (a fresh large temporary costs page faults when freed memory is unmapped)."""

    def __init__(self, b: int, n: int, device, count: int):
        self.step = _torch_block_rows(n)
        rows = min(b, self.step)
        self.bufs = [torch.empty(rows, n, dtype=torch.float32, device=device) for _ in range(count)]

    def ranges(self, b: int):
        for r0 in range(0, b, self.step):
            r1 = min(b, r0 + self.step)
            yield r0, r1, [buf[: r1 - r0] for buf in self.bufs]


def _row_lse(s: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """(blk,) logsumexp of the rows of s, using `work` (same shape) as scratch: max-shifted, fp32."""
    mx = s.amax(dim=1)
    torch.sub(s, mx[:, None], out=work).exp_()
    return mx + work.sum(dim=1).log_()


def _torch_dir_fwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, tlse, sample_gen=None):
    """One direction, rows x (B, D) over columns y (N, D): lse (B,), tgt (B,) fp32 and sampled negatives.

    tlse (B,) is the teacher rows' LSE (None: no teacher). sample_gen: a Generator to draw one Gumbel-max
    negative per row (positives excluded), else None.
    """
    b = x.shape[0]
    xf, yf = x.float(), y.float()
    lse = torch.empty(b, dtype=torch.float32, device=x.device)
    # label part of sum_j q_ij s_ij: (1 - alpha) * scale * <x_i, sum of same-id columns> / cnt_i
    tgt = (1.0 - alpha) * scale * (xf * _segment_sum(ids_c, yf, ids_r)).sum(1) / cnt_r
    neg = torch.empty(b, dtype=torch.long, device=x.device) if sample_gen is not None else None
    ytf = None if yt is None else yt.float()
    blocks = _Blocks(b, y.shape[0], x.device, 3 if tlse is not None else 2)
    for r0, r1, bufs in blocks.ranges(b):
        s = torch.mm(xf[r0:r1], yf.T, out=bufs[0]).mul_(scale)  # (blk, N) fp32 logits
        lse[r0:r1] = _row_lse(s, bufs[1])
        if tlse is not None:  # teacher part: alpha * sum_j softmax(t)_ij s_ij
            t = torch.mm(xt[r0:r1].float(), ytf.T, out=bufs[2]).mul_(scale).sub_(tlse[r0:r1, None]).exp_()
            tgt[r0:r1] += alpha * (t.mul_(s)).sum(1)
        if sample_gen is not None:
            neg[r0:r1] = _gumbel_argmax(s, ids_r[r0:r1, None] == ids_c[None, :], sample_gen)
    return lse, tgt, neg


def _torch_fwd_both(x, y, scale, ids, cnt, xt, yt, alpha, tlse_r, tlse_c):
    """Single process, both directions from one pass over the row blocks of s = scale * x y^T (B = N).

    Row (i2t) LSEs come from each block; column (t2i) LSEs are merged online over blocks (running max m and
    sum l per column, O(N) state), so the forward does one (B, N, D) product instead of two. With a teacher,
    tlse_r / tlse_c are its row / column LSEs. Returns lse_r, tgt_r, lse_c, tgt_c (all fp32 (B,)).
    """
    b, n = x.shape[0], y.shape[0]
    xf, yf = x.float(), y.float()
    lse_r = torch.empty(b, dtype=torch.float32, device=x.device)
    m_c = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    l_c = torch.zeros(n, dtype=torch.float32, device=x.device)
    tgt_r = (1.0 - alpha) * scale * (xf * _segment_sum(ids, yf, ids)).sum(1) / cnt
    tgt_c = (1.0 - alpha) * scale * (yf * _segment_sum(ids, xf, ids)).sum(1) / cnt
    teacher = tlse_r is not None
    xtf = xt.float() if teacher else None
    ytf = yt.float() if teacher else None
    for r0, r1, bufs in _Blocks(b, n, x.device, 3 if teacher else 2).ranges(b):
        s = torch.mm(xf[r0:r1], yf.T, out=bufs[0]).mul_(scale)  # (blk, N)
        lse_r[r0:r1] = _row_lse(s, bufs[1])
        m_new = torch.maximum(m_c, s.amax(dim=0))
        l_c.mul_(torch.exp(m_c - m_new)).add_(torch.sub(s, m_new[None, :], out=bufs[1]).exp_().sum(dim=0))
        m_c = m_new
        if teacher:
            t = torch.mm(xtf[r0:r1], ytf.T, out=bufs[2]).mul_(scale)
            tgt_r[r0:r1] += alpha * torch.sub(t, tlse_r[r0:r1, None], out=bufs[1]).exp_().mul_(s).sum(1)
            tgt_c += alpha * t.sub_(tlse_c[None, :]).exp_().mul_(s).sum(0)
    return lse_r, tgt_r, m_c + l_c.log(), tgt_c


def _torch_lse_both(x, y, scale):
    """Row and column LSEs of scale * x y^T in one pass (the teacher's, for the TgD targets)."""
    b, n = x.shape[0], y.shape[0]
    xf, yf = x.float(), y.float()
    lse_r = torch.empty(b, dtype=torch.float32, device=x.device)
    m_c = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    l_c = torch.zeros(n, dtype=torch.float32, device=x.device)
    for r0, r1, bufs in _Blocks(b, n, x.device, 2).ranges(b):
        s = torch.mm(xf[r0:r1], yf.T, out=bufs[0]).mul_(scale)
        lse_r[r0:r1] = _row_lse(s, bufs[1])
        m_new = torch.maximum(m_c, s.amax(dim=0))
        l_c.mul_(torch.exp(m_c - m_new)).add_(torch.sub(s, m_new[None, :], out=bufs[1]).exp_().sum(dim=0))
        m_c = m_new
    return lse_r, m_c + l_c.log()


def _gumbel_argmax(s: torch.Tensor, pos: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gumbel-max: argmax_j (s_ij + g_ij) over non-positive j samples the row softmax restricted to them."""
    u = torch.rand(s.shape, generator=gen, device=s.device, dtype=torch.float32).clamp_(min=1e-20)
    z = (s.detach().float() - torch.log(-torch.log(u))).masked_fill_(pos, float("-inf"))
    best, idx = z.max(dim=1)
    return torch.where(torch.isneginf(best), torch.full_like(idx, -1), idx)


def _torch_teacher_lse(xt, yt, scale):
    b = xt.shape[0]
    out = torch.empty(b, dtype=torch.float32, device=xt.device)
    xtf, ytf = xt.float(), yt.float()
    for r0, r1, bufs in _Blocks(b, yt.shape[0], xt.device, 2).ranges(b):
        out[r0:r1] = _row_lse(torch.mm(xtf[r0:r1], ytf.T, out=bufs[0]).mul_(scale), bufs[1])
    return out


def _torch_dir_bwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, lse, tlse, w,
                   cnt_c=None, lse_c=None, tlse_c=None, out_dtype=None):
    """Gradient of sum_i w * CE_i: dx (B, D), dy (N, D) and the dot-product part of dscale (0-dim).

    lse_c (N,) given: rows and columns are the same batch (single process), and the column direction's rows
    (t2i, LSE lse_c, teacher LSE tlse_c, counts cnt_c) join the same tiles: one backward pass for both.
    G = w (p - q): the dense part w (p - alpha softmax(t)) goes through the (blk, N) tiles, the label part
    -w (1 - alpha) pos / cnt through segment sums (_segment_sum), O(N*D).
    """
    b = x.shape[0]
    xf, yf = x.float(), y.float()
    ytf = None if yt is None else yt.float()
    dx = torch.empty(b, x.shape[1], dtype=torch.float32, device=x.device)
    dy = torch.zeros_like(yf)
    ds = torch.zeros((), dtype=torch.float32, device=x.device)
    blocks = _Blocks(b, y.shape[0], x.device, 3 + (tlse is not None))
    for r0, r1, bufs in blocks.ranges(b):
        xb = xf[r0:r1]
        dot = torch.mm(xb, yf.T, out=bufs[0])  # (blk, N) <x, y>
        g = torch.mul(dot, scale, out=bufs[1]).sub_(lse[r0:r1, None]).exp_()  # p
        if lse_c is not None:
            g += torch.mul(dot, scale, out=bufs[2]).sub_(lse_c[None, :]).exp_()
        if tlse is not None:
            t = torch.mm(xt[r0:r1].float(), ytf.T, out=bufs[3]).mul_(scale)
            g -= torch.sub(t, tlse[r0:r1, None], out=bufs[2]).exp_().mul_(alpha)
            if lse_c is not None:
                g -= t.sub_(tlse_c[None, :]).exp_().mul_(alpha)
        g *= w  # (blk, N) dense part of dLoss/ds
        ds += torch.dot(g.reshape(-1), dot.reshape(-1))
        g *= scale  # dLoss/d<x, y>: the chain rule through s = scale * <x, y>
        torch.mm(g, yf, out=dx[r0:r1])
        dy.addmm_(g.T, xb)
    # label part: G_ij -= c pos_ij / cnt_i (row direction) and, fused, c pos_ij / cnt_j (column direction)
    c = (1.0 - alpha) * w
    y_same = _segment_sum(ids_c, yf, ids_r)  # (B, D) sum of same-id columns per row
    x_same = _segment_sum(ids_r, xf / cnt_r[:, None], ids_c)  # (N, D) sum of same-id rows / cnt_i per column
    dx -= (c * scale) * y_same / cnt_r[:, None]
    dy -= (c * scale) * x_same
    ds -= c * (xf * y_same).sum(1).div(cnt_r).sum()
    if lse_c is not None:
        x_same_c = _segment_sum(ids_r, xf, ids_c)  # (N, D)
        y_same_c = _segment_sum(ids_c, yf / cnt_c[:, None], ids_r)  # (B, D)
        dx -= (c * scale) * y_same_c
        dy -= (c * scale) * x_same_c / cnt_c[:, None]
        ds -= c * (yf * x_same_c).sum(1).div(cnt_c).sum()
    if out_dtype is not None:
        dx, dy = dx.to(out_dtype), dy.to(out_dtype)
    return dx, dy, ds


# ----------------------------------------------------------------------------------------------------------
# Triton: autotune configs
# ----------------------------------------------------------------------------------------------------------

triton = None  # bound by _triton() on first use (lazy import; see the module docstring)
tl = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_M rows, BLOCK_N columns, BLOCK_D, num_warps, num_stages). The reduction dim D (256..1024) is walked
# in BLOCK_D chunks, so any D works; rows and columns are both "long" (the global batch), so square-ish tiles.
_TILES = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 3), (128, 256, 32, 8, 3),
]
# The interpreter runs programs one by one in numpy: one config, no tuning (tuning there only wastes time).
_INTERPRET_TILE = (64, 64, 64, 4, 1)


def _configs() -> list:
    tiles = [_INTERPRET_TILE] if _interpreting() else _TILES
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for m, n, d, w, s in tiles]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles wider than the problem (B = 7 needs no 128-row tile) and chunks wider than D."""
    args = {**named_args, **kwargs}
    m_cap = max(16, triton.next_power_of_2(args["B"]))
    n_cap = max(16, triton.next_power_of_2(args["N"]))
    d_cap = max(16, triton.next_power_of_2(args["D"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap
            and c.kwargs["BLOCK_D"] <= d_cap]
    volume = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"]
    return kept or [min(configs, key=volume)]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# Layout: X (B, D) rows, Y (N, D) gathered columns, row-major with unit last stride (any dtype of fp32/bf16/
# fp16); XT / YT the teacher's, same shapes. IDS_R (B,) / IDS_C (N,) int64 ids, CNT_R / CNT_C fp32 positive
# counts, LSE_* / TLSE_* fp32 row LSEs (student / teacher). SCALE is a 0-dim fp32 tensor read in-kernel (no
# host sync). All accumulation is fp32: tl.dot accumulates fp32, LSE is online (running max m, sum l).
# DOT_FP32 (interpreter only) upcasts tiles before tl.dot: the interpreter multiplies bf16 bits wrongly.
# PREC is "ieee" for fp32 inputs (match fp32 PyTorch, not tf32) unless torch allows tf32 matmuls.


def _define_kernels():
    global triton, tl, _dot_tile, _grad_tile, _row_stats, _col_stats, _add_tile_matmul
    global _fwd_kernel, _bwd_dx_kernel, _bwd_dy_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_FP32: tl.constexpr, PREC: tl.constexpr):
        # (BLOCK_M, BLOCK_N) fp32 <x_r, y_c>, D walked in BLOCK_D chunks (masked: zeros add nothing).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            km = ks < D
            x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & km[None, :],
                        other=0.0)
            y = tl.load(Y + cols[:, None] * stride_y + ks[None, :], mask=cmask[:, None] & km[None, :],
                        other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _grad_tile(X, Y, XT, YT, rows, cols, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r, lse_c,
                   tlse_r, tlse_c, scale, w, alpha, D, stride_x, stride_y,
                   HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
        # G = dLoss/ds for one (BLOCK_M, BLOCK_N) tile: w * (p - q) of the row direction, plus (FUSE_T, single
        # process, rows and columns are the same batch) the column direction's w * (p^T - q^T) on the same s.
        dot = _dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D,
                        DOT_FP32, PREC)
        s = dot * scale
        pos = ids_r[:, None] == ids_c[None, :]
        g = tl.exp(s - lse_r[:, None]) - tl.where(pos, (1.0 - alpha) / cnt_r[:, None], 0.0)
        if FUSE_T:
            g += tl.exp(s - lse_c[None, :]) - tl.where(pos, (1.0 - alpha) / cnt_c[None, :], 0.0)
        if HAS_TEACHER:
            t = _dot_tile(XT, YT, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D,
                          DOT_FP32, PREC) * scale
            g -= alpha * tl.exp(t - tlse_r[:, None])
            if FUSE_T:
                g -= alpha * tl.exp(t - tlse_c[None, :])
        g = tl.where(rmask[:, None] & cmask[None, :], g * w, 0.0)
        return g, dot

    @triton.jit
    def _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows, rmask, HAS_TEACHER: tl.constexpr):
        # The backward's per-row inputs: ids, positive counts, student LSE, teacher LSE (lse_r stands in for an
        # absent teacher: _grad_tile does not read it then).
        ids_r = tl.load(IDS_R + rows, mask=rmask, other=0)
        cnt_r = tl.load(CNT_R + rows, mask=rmask, other=1.0)
        lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0)
        tlse_r = lse_r
        if HAS_TEACHER:
            tlse_r = tl.load(TLSE_R + rows, mask=rmask, other=0.0)
        return ids_r, cnt_r, lse_r, tlse_r

    @triton.jit
    def _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr):
        # The backward's per-column inputs; the column LSEs are only read under FUSE_T (cnt_c stands in
        # otherwise, unread by _grad_tile).
        ids_c = tl.load(IDS_C + cols, mask=cmask, other=0)
        cnt_c = tl.load(CNT_C + cols, mask=cmask, other=1.0)
        lse_c = cnt_c
        tlse_c = cnt_c
        if FUSE_T:
            lse_c = tl.load(LSE_C + cols, mask=cmask, other=0.0)
            if HAS_TEACHER:
                tlse_c = tl.load(TLSE_C + cols, mask=cmask, other=0.0)
        return ids_c, cnt_c, lse_c, tlse_c

    @triton.jit
    def _add_tile_matmul(G, Src, src_idx, src_mask, stride_src, Dst, dst_idx, dst_mask, D, accumulate,
                         BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
        # Dst[dst_idx] = G @ Src[src_idx] (+ Dst[dst_idx] when accumulate), D walked in BLOCK_D chunks: G (I, J)
        # fp32, Src rows (J, D) of the input dtype, Dst fp32 rows of length D (row stride D).
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            km = ks < D
            src = tl.load(Src + src_idx[:, None] * stride_src + ks[None, :],
                          mask=src_mask[:, None] & km[None, :], other=0.0)
            if DOT_FP32:
                contrib = tl.dot(G, src.to(tl.float32), input_precision=PREC)
            else:
                contrib = tl.dot(G.to(src.dtype), src, input_precision=PREC)  # (I, BLOCK_D) fp32
            ptrs = Dst + dst_idx[:, None] * D + ks[None, :]
            dmask = dst_mask[:, None] & km[None, :]
            if accumulate:
                contrib += tl.load(ptrs, mask=dmask, other=0.0)
            tl.store(ptrs, contrib, mask=dmask)

    @triton.autotune(configs=_configs(), key=["D", "HAS_TEACHER", "COMPUTE_TGT", "SAMPLE"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _fwd_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, TLSE_R, SCALE, LSE, TGT, NEG,
                    B, N, D, stride_x, stride_y, alpha, seed, row_off,
                    HAS_TEACHER: tl.constexpr, COMPUTE_TGT: tl.constexpr, SAMPLE: tl.constexpr,
                    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per BLOCK_M rows, walking all N columns: online LSE, target term sum_j q_ij s_ij and the
        # Gumbel-max negative, never more than one (BLOCK_M, BLOCK_N) tile of s alive.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        scale = tl.load(SCALE)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        tgt = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_idx = tl.full((BLOCK_M,), -1, tl.int64)
        ids_r = tl.load(IDS_R + rows, mask=rmask, other=0)
        cnt_r = tl.load(CNT_R + rows, mask=rmask, other=1.0)
        tlse_r = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_TEACHER:
            tlse_r = tl.load(TLSE_R + rows, mask=rmask, other=0.0)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            cols64 = cols.to(tl.int64)
            s = _dot_tile(X, Y, rows64, cols64, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N,
                          BLOCK_D, DOT_FP32, PREC) * scale
            # (BLOCK_M, BLOCK_N); padded columns -inf for the LSE (every tile has at least one real column)
            s_lse = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_lse, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_lse - m_new[:, None]), 1)
            m_i = m_new
            if COMPUTE_TGT or SAMPLE:
                ids_c = tl.load(IDS_C + cols, mask=cmask, other=0)
                pos = (ids_r[:, None] == ids_c[None, :]) & cmask[None, :]
                if COMPUTE_TGT:
                    q = tl.where(pos, (1.0 - alpha) / cnt_r[:, None], 0.0)
                    if HAS_TEACHER:
                        t = _dot_tile(XT, YT, rows64, cols64, rmask, cmask, D, stride_x, stride_y, BLOCK_M,
                                      BLOCK_N, BLOCK_D, DOT_FP32, PREC) * scale
                        q += alpha * tl.exp(t - tlse_r[:, None])
                    tgt += tl.sum(tl.where(cmask[None, :], q * s, 0.0), 1)
                if SAMPLE:
                    # Philox keyed by (seed, global row * N + column): the draw of an entry does not depend on
                    # the tiling, so the loss pass and the standalone sampler draw the same numbers.
                    offs = (row_off + rows64)[:, None] * N + cols64[None, :]
                    u = tl.maximum(tl.rand(seed, offs), 1e-20)
                    z = tl.where(cmask[None, :] & (pos == 0), s - tl.log(-tl.log(u)), float("-inf"))
                    tile_best = tl.max(z, 1)
                    tile_arg = tl.argmax(z, 1).to(tl.int64) + n0
                    better = tile_best > best
                    best_idx = tl.where(better, tile_arg, best_idx)
                    best = tl.where(better, tile_best, best)
        tl.store(LSE + rows, m_i + tl.log(l_i), mask=rmask)
        if COMPUTE_TGT:
            tl.store(TGT + rows, tgt, mask=rmask)
        if SAMPLE:
            tl.store(NEG + rows, best_idx, mask=rmask)

    @triton.autotune(configs=_configs(), key=["D", "HAS_TEACHER", "FUSE_T"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _bwd_dx_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, CNT_C, LSE_R, LSE_C, TLSE_R, TLSE_C, SCALE, DX, DS,
                       B, N, D, stride_x, stride_y, W, alpha,
                       HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        # One program per BLOCK_M rows: dx = scale * G y accumulated in DX (fp32, this program's rows only, so
        # no atomics; the first column tile stores, later ones add, so reruns by the autotuner are harmless),
        # and this program's part of dscale = sum G * <x, y> into DS[pid].
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        scale = tl.load(SCALE)
        w = tl.load(W)  # the row weight (grad_out * W_ranks / 2N), read in-kernel: no host sync
        ids_r, cnt_r, lse_r, tlse_r = _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows, rmask, HAS_TEACHER)
        ds = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            cols64 = cols.to(tl.int64)
            ids_c, cnt_c, lse_c, tlse_c = _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER, FUSE_T)
            g, dot = _grad_tile(X, Y, XT, YT, rows64, cols64, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r,
                                lse_c, tlse_r, tlse_c, scale, w, alpha, D, stride_x, stride_y, HAS_TEACHER,
                                FUSE_T, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PREC)
            ds += tl.sum(g * dot, 1)
            g = g * scale  # dLoss/d<x, y>
            _add_tile_matmul(g, Y, cols64, cmask, stride_y, DX, rows64, rmask, D, n0 > 0, BLOCK_D, DOT_FP32, PREC)
        tl.store(DS + pid, tl.sum(ds, 0))

    @triton.autotune(configs=_configs(), key=["D", "HAS_TEACHER", "FUSE_T"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _bwd_dy_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, CNT_C, LSE_R, LSE_C, TLSE_R, TLSE_C, SCALE, DY,
                       B, N, D, stride_x, stride_y, W, alpha,
                       HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        # One program per BLOCK_N columns, walking all B rows: dy = scale * G^T x into DY (fp32, own columns).
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        scale = tl.load(SCALE)
        w = tl.load(W)
        ids_c, cnt_c, lse_c, tlse_c = _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER, FUSE_T)
        for m0 in range(0, B, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < B
            rows64 = rows.to(tl.int64)
            ids_r, cnt_r, lse_r, tlse_r = _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows, rmask, HAS_TEACHER)
            g, dot = _grad_tile(X, Y, XT, YT, rows64, cols64, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r,
                                lse_c, tlse_r, tlse_c, scale, w, alpha, D, stride_x, stride_y, HAS_TEACHER,
                                FUSE_T, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PREC)
            g = g * scale
            _add_tile_matmul(tl.trans(g), X, rows64, rmask, stride_x, DY, cols64, cmask, D, m0 > 0, BLOCK_D,
                             DOT_FP32, PREC)


# ----------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, y: torch.Tensor, xt, yt, ids_r, ids_c) -> None:
    assert x.dim() == 2 and y.dim() == 2 and x.shape[1] == y.shape[1], f"x {x.shape} vs y {y.shape}"
    assert x.dtype in _KERNEL_DTYPES and y.dtype == x.dtype, f"fp32/bf16/fp16, one dtype: {x.dtype}/{y.dtype}"
    assert x.is_contiguous() and y.is_contiguous(), "x and y must be contiguous"
    assert x.device == y.device == ids_r.device == ids_c.device, "all inputs on one device"
    assert x.is_cuda or _interpreting(), "triton on CPU needs TRITON_INTERPRET=1 before importing triton"
    assert ids_r.shape == (x.shape[0],) and ids_c.shape == (y.shape[0],) and ids_r.dtype == torch.long
    if xt is not None:
        assert xt.shape == x.shape and yt.shape == y.shape and xt.dtype == x.dtype and yt.dtype == y.dtype
        assert xt.is_contiguous() and yt.is_contiguous(), "teacher embeddings must be contiguous"


def _flags(x: torch.Tensor) -> dict:
    # fp32 on CUDA: IEEE products unless torch itself allows tf32 matmuls; bf16 / fp16: Triton's default
    # (the precision flag only changes fp32 operands); the interpreter computes exactly anyway.
    interp = _interpreting()
    ieee = interp or (x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"DOT_FP32": interp, "PREC": "ieee" if ieee else "tf32"}


def _triton_fwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, tlse, seed, row_off, compute_tgt=True):
    """(lse, tgt, neg) for rows x over columns y; tgt / neg are None when not asked for."""
    _check(x, y, xt, yt, ids_r, ids_c)
    b, d = x.shape
    n = y.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    lse = torch.full((b,), float("nan"), **f32)  # poisoned: an unwritten row fails the tests
    tgt = torch.full((b,), float("nan"), **f32) if compute_tgt else lse
    sample = seed is not None
    neg = torch.full((b,), -7, dtype=torch.long, device=x.device) if sample else lse
    teacher = xt is not None
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)
    _fwd_kernel[grid](
        x, y, xt if teacher else x, yt if teacher else y, ids_r, ids_c, cnt_r, tlse if teacher else lse,
        scale, lse, tgt, neg, b, n, d, x.stride(0), y.stride(0), float(alpha), int(seed or 0), int(row_off),
        HAS_TEACHER=teacher, COMPUTE_TGT=compute_tgt, SAMPLE=sample, **_flags(x))
    return lse, (tgt if compute_tgt else None), (neg if sample else None)


def _triton_bwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, lse_r, tlse_r, w,
                cnt_c=None, lse_c=None, tlse_c=None, out_dtype=None):
    """dx (B, D), dy (N, D) and dscale's dot part; lse_c given = FUSE_T (rows and columns one batch).

    dx and dy are accumulated in fp32 buffers; out_dtype casts each one when its kernel is done, so at most
    one fp32 buffer is alive (peak: the grads plus one fp32 (B, D) buffer = 2x the bf16 embeddings).
    """
    _check(x, y, xt, yt, ids_r, ids_c)
    b, d = x.shape
    n = y.shape[0]
    teacher = xt is not None
    fuse = lse_c is not None
    cnt_c = cnt_r if cnt_c is None else cnt_c
    if not fuse:  # column counts are only read under FUSE_T; any (N,) fp32 buffer will do
        cnt_c = torch.ones(n, dtype=torch.float32, device=x.device) if cnt_c.shape[0] != n else cnt_c
    dx = torch.full((b, d), float("nan"), dtype=torch.float32, device=x.device)
    ds = torch.full((triton.cdiv(b, 16),), float("nan"), dtype=torch.float32, device=x.device)
    args = (x, y, xt if teacher else x, yt if teacher else y, ids_r, ids_c, cnt_r, cnt_c, lse_r,
            lse_c if fuse else lse_r, tlse_r if teacher else lse_r,
            tlse_c if (teacher and fuse) else lse_r, scale)
    w = w.to(device=x.device, dtype=torch.float32).reshape(())
    flags = dict(HAS_TEACHER=teacher, FUSE_T=fuse, **_flags(x))
    used = {}

    def grid_dx(meta):
        used["m"] = meta["BLOCK_M"]
        return (triton.cdiv(b, meta["BLOCK_M"]),)

    _bwd_dx_kernel[grid_dx](*args, dx, ds, b, n, d, x.stride(0), y.stride(0), w, float(alpha), **flags)
    if out_dtype is not None:
        dx = dx.to(out_dtype)
    dy = torch.full((n, d), float("nan"), dtype=torch.float32, device=x.device)
    _bwd_dy_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        *args, dy, b, n, d, x.stride(0), y.stride(0), w, float(alpha), **flags)
    if out_dtype is not None:
        dy = dy.to(out_dtype)
    return dx, dy, ds[: triton.cdiv(b, used["m"])].sum()


class _TritonBackend:
    @staticmethod
    def teacher_lse(xt, yt, scale):
        n = yt.shape[0]
        ids = torch.zeros(xt.shape[0], dtype=torch.long, device=xt.device)
        ones = torch.ones(xt.shape[0], dtype=torch.float32, device=xt.device)
        lse, _, _ = _triton_fwd(xt, yt, scale, ids, torch.zeros(n, dtype=torch.long, device=xt.device), ones,
                                None, None, 0.0, None, None, 0, compute_tgt=False)
        return lse

    fwd = staticmethod(_triton_fwd)
    bwd = staticmethod(_triton_bwd)

    @staticmethod
    def sample(x, y, scale, ids_r, ids_c, seed, row_off):
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        _, _, neg = _triton_fwd(x, y, scale, ids_r, ids_c, ones, None, None, 0.0, None, seed, row_off,
                                compute_tgt=False)
        return neg


def _triton():
    """Import Triton and define the kernels once (lazily: TRITON_INTERPRET must be set before the import)."""
    if triton is None:
        _define_kernels()
    return _TritonBackend


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
        if world == 1 and not sample and hasattr(backend, "fwd_both"):
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

    bwd = staticmethod(_torch_dir_bwd)
    fwd_both = staticmethod(_torch_fwd_both)
    lse_both = staticmethod(_torch_lse_both)


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
    if impl == "triton" and image_emb.device.type != "cuda" and not _interpreting():
        raise RuntimeError("impl='triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    backend = _TorchBackend if impl == "torch" else _triton()
    if teacher_image_emb is not None and alpha != 0.0:
        t_img, t_txt = t_img.contiguous(), t_txt.contiguous()
    return _ContrastiveLoss.apply(image_emb.contiguous(), text_emb.contiguous(), scale, labels, t_img, t_txt,
                                  float(alpha), group, backend, sd)

