"""impl="torch": the loss by row blocks of the (B, N) logits in PyTorch, recomputed in backward; O(B*D + blk*N)
memory (math: package docstring). The CPU default and the exact fp32 baseline of the Triton path."""

from __future__ import annotations

import torch

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
