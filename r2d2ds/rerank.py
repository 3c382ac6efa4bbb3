"""Two-stage re-ranking: one code path for the retrieval eval (`r2d2ds.eval`) and `r2d2ds.api`'s rank().

Every query's top-k candidates by cosine similarity are re-scored with sim + the mean ITM match probability of
the two cross encoders; the rest keeps its pre-rank order below them (protocol in r2d2ds/eval.py's docstring).
Under ZeRO-3 (`lockstep`) every rank runs the same number of cross-encoder batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from r2d2ds.distributed import all_reduce_max, get_world_size

# (txt_idx (P,), img_idx (P,)) int64 -> (P,) fp32 mean ITM match probability of each (text, image) pair.
PairScorer = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Ranking:
    """Rankings of a block of queries over all candidates (text queries over images, or the reverse)."""

    pre_order: Tensor  # (Q, C) int64 candidate indices by sim, best first (stable: ties by index)
    order: Tensor  # (Q, C) int64 two-stage order: re-ranked top-k first, then the rest in pre-rank order
    scores: Tensor  # (Q, C) fp32: sim + mean ITM prob on the top-k, plain sim elsewhere (always below them)


def _pre_rank(sim_q: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """(Q, C) sim -> pre-order (Q, C) and the top-k candidates (Q, k). Stable sort: ties go to the lower
    index, so a sharded run and a single-process run order identical rows identically."""
    pre_order = torch.sort(sim_q, dim=1, descending=True, stable=True).indices
    k = min(topk, sim_q.shape[1])
    return pre_order, pre_order[:, :k]


def _apply(sim_q: Tensor, pre_order: Tensor, cand: Tensor, prob: Tensor) -> Ranking:
    """Re-order the top-k `cand` (Q, k) by sim + prob (Q, k); the rest keeps its pre-rank order below them.

    sim + prob >= sim_kth >= any sim outside the top-k because prob >= 0, so `scores` orders like `order`
    (up to exact ties at prob == 0); `order` is built explicitly so that ties cannot break the rule.
    """
    k = cand.shape[1]
    new = sim_q.gather(1, cand) + prob  # (Q, k)
    perm = torch.sort(new, dim=1, descending=True, stable=True).indices
    order = torch.cat([cand.gather(1, perm), pre_order[:, k:]], dim=1)
    scores = sim_q.clone().scatter_(1, cand, new)
    return Ranking(pre_order=pre_order, order=order, scores=scores)


def rerank(sim: Tensor, topk: int, score_pairs: PairScorer, text_rows: slice | None = None,
           image_rows: slice | None = None) -> tuple[Ranking, Ranking]:
    """Two-stage ranking of the text queries in `text_rows` (over all images) and of the image queries in
    `image_rows` (over all texts).

    sim: (N_img, T) cosine similarities of ALL images and texts. `score_pairs` gets every (text, image)
    pair among the candidates once (a pair that is a candidate in both directions is scored once: both ITM
    heads see the same pair either way) and returns the mean ITM match probability. Returns (t2i, i2t)
    Rankings whose rows are the queries of the slices, in order.
    """
    sim = sim.float()
    n_img, n_txt = sim.shape
    text_rows = text_rows if text_rows is not None else slice(0, n_txt)
    image_rows = image_rows if image_rows is not None else slice(0, n_img)
    txt_q = torch.arange(n_txt, device=sim.device)[text_rows]  # (Qt,) global text ids of the text queries
    img_q = torch.arange(n_img, device=sim.device)[image_rows]  # (Qi,)
    sim_t2i = sim.t()[text_rows]  # (Qt, N_img)
    sim_i2t = sim[image_rows]  # (Qi, T)
    pre_t2i, cand_t2i = _pre_rank(sim_t2i, topk)  # cand_t2i: image ids (Qt, kt)
    pre_i2t, cand_i2t = _pre_rank(sim_i2t, topk)  # cand_i2t: text ids (Qi, ki)

    # Every candidate pair as (text, image); deduplicate across the two directions.
    pair_txt = torch.cat([txt_q[:, None].expand_as(cand_t2i).reshape(-1), cand_i2t.reshape(-1)])
    pair_img = torch.cat([cand_t2i.reshape(-1), img_q[:, None].expand_as(cand_i2t).reshape(-1)])
    keys, inverse = torch.unique(pair_txt * n_img + pair_img, return_inverse=True)
    prob = score_pairs(keys // n_img, keys % n_img).float().to(sim.device)[inverse]  # (P,)
    n_t2i = cand_t2i.numel()
    t2i = _apply(sim_t2i, pre_t2i, cand_t2i, prob[:n_t2i].view_as(cand_t2i))
    i2t = _apply(sim_i2t, pre_i2t, cand_i2t, prob[n_t2i:].view_as(cand_i2t))
    return t2i, i2t


def padded_batches(n: int, batch_size: int, num_batches: int,
                    device: torch.device) -> list[tuple[Tensor, int]]:
    """`num_batches` index batches of exactly `batch_size` over range(n): past the end the last index
    repeats (index 0 when n == 0) so every rank runs the same forward calls; each comes with its count of
    real rows."""
    out = []
    for b in range(num_batches):
        start = b * batch_size
        idx = torch.arange(start, start + batch_size, device=device)
        valid = max(0, min(batch_size, n - start))
        out.append((idx.clamp_(max=max(n - 1, 0)), valid))
    return out


def _lockstep_batches(n: int, batch_size: int, group=None) -> int:
    """Number of batches every rank of `group` runs: the max over ranks of ceil(n / batch_size)."""
    mine = math.ceil(n / batch_size)
    if get_world_size(group) == 1:
        return mine
    return int(all_reduce_max(torch.tensor([mine]), group).item())  # host sync: the loop length depends on it


def itm_scorer(model: nn.Module, img_tokens: Tensor, txt_tokens: Tensor, txt_mask: Tensor, batch_size: int,
               lockstep: bool = False, group=None) -> PairScorer:
    """PairScorer from the model's two ITM heads: (softmax(tq)[:, 1] + softmax(iq)[:, 1]) / 2 per pair.

    With `lockstep`, batches are padded to exactly `batch_size` pairs and every rank of `group` runs the same
    number of them (ZeRO-3; see the module docstring).
    """

    def score(txt_idx: Tensor, img_idx: Tensor) -> Tensor:
        device = img_tokens.device
        txt_idx, img_idx = txt_idx.to(device), img_idx.to(device)
        n = txt_idx.numel()
        out = torch.empty(n, dtype=torch.float32, device=device)
        if lockstep:
            batches = padded_batches(n, batch_size, _lockstep_batches(n, batch_size, group), device)
        else:
            batches = [(torch.arange(s, min(s + batch_size, n), device=device), min(batch_size, n - s))
                       for s in range(0, n, batch_size)]
        for pos, valid in batches:
            if n == 0:  # this rank has no pair but must still take part in the forward (ZeRO-3)
                ti = torch.zeros_like(pos)
                ii = torch.zeros_like(pos)
            else:
                ti, ii = txt_idx[pos], img_idx[pos]
            tq, iq = model.itm_logits(img_tokens[ii], txt_tokens[ti], txt_mask[ti])
            p = (tq.float().softmax(-1)[:, 1] + iq.float().softmax(-1)[:, 1]) / 2
            out[pos[:valid]] = p[:valid]
        return out

    return score
