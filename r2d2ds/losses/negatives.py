"""FGR's hard-negative choice over the GLOBAL batch: strategies, the false-negative guard, their references.

For each local image one negative text and for each local text one negative image, chosen among every column
of the global batch (all ranks, rank-major order) with every positive (same id) excluded. Returned indices are
GLOBAL; -1 where a row has no allowed candidate. Strategies (LossConfig.fgr_negatives):

  softmax  p_ij ~ exp(s_ij / T) over allowed j (released R2D2/ALBEF). T: fgr_softmax_temperature, or the
           learned contrastive temperature when that is 0 (s_ij = cos_ij * logit_scale, as released).
  topk     uniform over the k most similar allowed candidates (fewer when fewer are allowed).
  mixed    with probability f (fgr_mixed_uniform) uniform over the allowed candidates, else softmax:
           p = (1 - f) softmax + f uniform.

False-negative guard (fgr_false_negative_guard): also exclude candidates whose cosine similarity to the
anchor's own positive (image i: texts j with cos(t_j, t_i) > threshold; text j: images k with
cos(v_k, v_j) > threshold) is above fgr_false_negative_threshold: near-duplicate captions or images under a
different id are not negatives.

The plain softmax draw (no guard) is `r2d2ds.kernels.sample_hard_negatives` (fused Triton on GPU). The other
strategies and the guard run here in blockwise torch over column tiles of the gathered embeddings: memory
O(B_local x block), never B_local x N. Gumbel-max makes each a running (max, argmax) over tiles: argmax_j
(log w_ij + g_ij), g ~ Gumbel(0, 1), is a draw from w_ij / sum_j w_ij; top-k keeps a running (B, k) set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r2d2ds.distributed import get_rank
from r2d2ds.distributed.collectives import all_gather_rows, gather_sizes, row_offset
from r2d2ds.kernels import sample_hard_negatives

STRATEGIES = ("softmax", "topk", "mixed")
_BLOCK_ELEMS = 1 << 22  # (B_local, block) fp32 tiles of about 16 MiB


@dataclass(frozen=True)
class NegativeSampling:
    """The sampler's settings (LossConfig's fgr_* keys, validated there)."""

    strategy: str = "softmax"
    temperature: float = 0.0  # 0: the learned contrastive temperature
    topk: int = 16
    mixed_uniform: float = 0.5
    guard: bool = False
    guard_threshold: float = 0.9

    @classmethod
    def from_loss_config(cls, lc) -> NegativeSampling:
        return cls(lc.fgr_negatives, lc.fgr_softmax_temperature, lc.fgr_topk, lc.fgr_mixed_uniform,
                   lc.fgr_false_negative_guard, lc.fgr_false_negative_threshold)

    def uses_kernel(self) -> bool:
        """The plain softmax draw, which the fused sampler (or the GCPR pass's return_negatives) computes."""
        return self.strategy == "softmax" and not self.guard

    def draw_scale(self, logit_scale: Tensor) -> Tensor:
        """Multiplier of the cosine similarity inside the softmax: 1 / T, or the learned logit scale."""
        s = logit_scale.detach().float().reshape(())
        return s if self.temperature == 0 else torch.full_like(s, 1.0 / self.temperature)


@torch.no_grad()
def sample_negatives(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None,
                     cfg: NegativeSampling, seed: int, group=None, block: int | None = None,
                     impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(neg_txt_for_img, neg_img_for_txt): int64 (B_local,) GLOBAL indices, -1 without a candidate.

    Embeddings are L2-normalised (B_local, D); `labels` int64 ids (None: the diagonal); `seed` an int (each
    rank mixes in its rank, so one seed gives independent draws per rank); `block` the column tile (tests);
    `impl` the fused sampler's implementation for the plain softmax draw (`sample_hard_negatives`)."""
    scale = cfg.draw_scale(logit_scale)
    if cfg.uses_kernel():
        return sample_hard_negatives(image_emb.detach(), text_emb.detach(), scale, labels=labels, group=group,
                                     seed=seed, impl=impl)
    b = image_emb.shape[0]
    sizes = gather_sizes(b, group)
    off = row_offset(sizes, group)
    img_all = all_gather_rows(image_emb, sizes, group)  # (N, D), no autograd: the draw has no gradient
    txt_all = all_gather_rows(text_emb, sizes, group)
    ids_all = _global_labels(labels, b, sizes, off, group, image_emb.device)
    ids = ids_all[off:off + b]
    gen = torch.Generator(device=image_emb.device)
    out = []
    for k, (x, pos, y) in enumerate(((image_emb, text_emb, txt_all), (text_emb, image_emb, img_all))):
        gen.manual_seed(_mix(seed, k, get_rank(group)))
        out.append(_sample_blockwise(x.detach(), pos.detach(), y, scale, ids, ids_all, cfg, gen, block))
    return out[0], out[1]


def _mix(seed: int, direction: int, rank: int) -> int:
    return (int(seed) * 0x9E3779B1 + direction * 0x632BE5AB + rank * 0x85EBCA77) % (1 << 63)


def _global_labels(labels, b, sizes, off, group, device) -> Tensor:
    if labels is None:  # diagonal positives: the id is the global row index
        return torch.arange(sum(sizes), device=device)
    return all_gather_rows(labels.to(device=device, dtype=torch.long), sizes, group)


def _sample_blockwise(x: Tensor, pos: Tensor, y: Tensor, scale: Tensor, ids_r: Tensor, ids_c: Tensor,
                      cfg: NegativeSampling, gen: torch.Generator, block: int | None) -> Tensor:
    """One direction: anchors x (B, D) with their positives `pos` (B, D), candidates y (N, D)."""
    b, n = x.shape[0], y.shape[0]
    dev = x.device
    block = block or max(64, _BLOCK_ELEMS // max(b, 1))
    xf, pf = x.float(), pos.float()
    neg_inf = float("-inf")
    best = torch.full((b,), neg_inf, device=dev)  # running Gumbel-max (softmax part)
    best_j = torch.full((b,), -1, dtype=torch.long, device=dev)
    ubest = torch.full((b,), neg_inf, device=dev)  # running Gumbel-max of a constant score (uniform part)
    ubest_j = torch.full((b,), -1, dtype=torch.long, device=dev)
    k = cfg.topk
    top_s = torch.full((b, k), neg_inf, device=dev)  # running k most similar allowed (value, index)
    top_j = torch.full((b, k), -1, dtype=torch.long, device=dev)
    for c0 in range(0, n, block):
        c1 = min(n, c0 + block)
        yt = y[c0:c1].float()
        cos = xf @ yt.T  # (B, blk) fp32
        banned = ids_r[:, None] == ids_c[None, c0:c1]
        if cfg.guard:
            banned |= (pf @ yt.T) > cfg.guard_threshold
        cols = torch.arange(c0, c1, device=dev)
        if cfg.strategy == "topk":
            cand = torch.cat([top_s, cos.masked_fill(banned, neg_inf)], dim=1)  # (B, k + blk)
            cand_j = torch.cat([top_j, cols.expand(b, -1)], dim=1)
            top_s, sel = cand.topk(min(k, cand.shape[1]), dim=1)
            top_j = cand_j.gather(1, sel)
            continue
        g = _gumbel((b, c1 - c0), gen, dev)
        z = (cos * scale + g).masked_fill_(banned, neg_inf)
        best, best_j = _merge(best, best_j, z, cols)
        if cfg.strategy == "mixed":
            u = _gumbel((b, c1 - c0), gen, dev).masked_fill_(banned, neg_inf)
            ubest, ubest_j = _merge(ubest, ubest_j, u, cols)
    if cfg.strategy == "topk":
        allowed = torch.isfinite(top_s)  # (B, k); the finite entries are the first ones (sorted)
        cnt = allowed.sum(1)
        pick = (torch.rand(b, generator=gen, device=dev) * cnt).long().clamp(max=k - 1)
        j = top_j.gather(1, pick[:, None]).squeeze(1)
        return torch.where(cnt > 0, j, torch.full_like(j, -1))
    if cfg.strategy == "mixed":
        coin = torch.rand(b, generator=gen, device=dev) < cfg.mixed_uniform
        best_j = torch.where(coin, ubest_j, best_j)
    return best_j


def _gumbel(shape, gen, dev) -> Tensor:
    u = torch.rand(shape, generator=gen, device=dev).clamp_(min=1e-20)
    return -torch.log(-torch.log(u))


def _merge(best: Tensor, best_j: Tensor, z: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Fold one tile's per-row max into the running (max, argmax); -inf rows keep index -1."""
    m, a = z.max(dim=1)
    take = m > best
    return torch.where(take, m, best), torch.where(take, cols[a], best_j)


def negative_probs_reference(x: Tensor, pos: Tensor, y: Tensor, scale: float, ids_r: Tensor, ids_c: Tensor,
                             cfg: NegativeSampling) -> Tensor:
    """(B, N) float64 probability of each candidate under `cfg` (naive, all columns at once): the tests' truth.

    x: anchors, pos: the anchors' own positives (for the guard), y: every candidate of the global batch."""
    x, pos, y = x.double(), pos.double(), y.double()
    cos = x @ y.T
    banned = ids_r[:, None] == ids_c[None, :]
    if cfg.guard:
        banned |= (pos @ y.T) > cfg.guard_threshold
    allowed = (~banned).double()
    uniform = allowed / allowed.sum(1, keepdim=True).clamp_min(1)
    if cfg.strategy == "topk":
        k = min(cfg.topk, y.shape[0])
        idx = cos.masked_fill(banned, float("-inf")).topk(k, dim=1).indices
        top = torch.zeros_like(cos).scatter_(1, idx, 1.0) * allowed
        return top / top.sum(1, keepdim=True).clamp_min(1)
    soft = torch.softmax((cos * float(scale)).masked_fill(banned, float("-inf")), dim=1).nan_to_num(0.0)
    if cfg.strategy == "mixed":
        return (1 - cfg.mixed_uniform) * soft + cfg.mixed_uniform * uniform
    return soft
