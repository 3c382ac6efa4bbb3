"""Two-stage re-ranking: one code path for the retrieval eval (`r2d2ds.eval`) and `r2d2ds.api`'s rank().

Every query's top-k candidates by cosine similarity are re-scored from the two cross encoders' ITM logits and
the towers' similarity (`RerankScore`); the rest keeps its pre-rank order below them (protocol in
r2d2ds/eval.py's docstring). Under ZeRO-3 (`lockstep`) every rank runs the same number of cross-encoder batches.

Scores (s = cosine similarity, l_h = log-odds logit[1] - logit[0] of ITM head h, h in {text query, image query}):

  fused     mean_h(l_h) + w * logit_scale * s. Both terms are logits: ITM's log-odds of "match", and the
            towers' contrastive logit, whose softmax over candidates is the towers' retrieval distribution.
            Their sum is a product of the two experts; w (eval.rerank_weight) is chosen on a calibration split
            (`r2d2ds.eval.evaluate_calibrated`). w -> infinity gives back the two-tower order.
  released  s + mean_h(sigmoid(l_h)) (yuxie11/R2D2): a probability in [0, 1] added to a cosine whose spread
            over a query's top-k is a few hundredths, so the ITM heads alone decide the order; an undertrained
            ITM then ranks worse than the towers (benchmarks/results/flickr8k-cn.md, "Why re-ranking lost").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from r2d2ds.distributed import all_reduce_max, get_world_size

# (txt_idx (P,), img_idx (P,)) int64 -> (P, 2) fp32 ITM log-odds of each (text, image) pair, one column per
# cross encoder (text query, image query).
PairScorer = Callable[[Tensor, Tensor], Tensor]
RERANK_MODES = ("fused", "released")


@dataclass(frozen=True)
class RerankScore:
    """The re-rank score of a query's top-k candidates (module docstring): mode, w, the model's logit scale."""

    mode: str = "fused"
    weight: float = 1.0
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in RERANK_MODES:
            raise ValueError(f"re-rank mode must be one of {RERANK_MODES}, got {self.mode!r}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"re-rank weight must be a finite number >= 0, got {self.weight}")

    def __call__(self, sim: Tensor, itm: Tensor) -> Tensor:
        """sim (Q, k) cosine, itm (Q, k, 2) log-odds -> (Q, k) fp32 score, higher first."""
        if self.mode == "released":
            return sim + torch.sigmoid(itm).mean(-1)  # sigmoid(l1 - l0) == softmax(logits)[1]
        return itm.mean(-1) + (self.weight * self.logit_scale) * sim


@dataclass
class Ranking:
    """Rankings of a block of queries over all candidates (text queries over images, or the reverse)."""

    pre_order: Tensor  # (Q, C) int64 candidate indices by sim, best first (stable: ties by index)
    order: Tensor  # (Q, C) int64 two-stage order: re-ranked top-k first, then the rest in pre-rank order
    # (Q, C) fp32: the re-rank score on the top-k; below every one of them elsewhere, in pre-rank order
    # (released: plain sim; fused: the lowest re-ranked score minus the sim gap to the k-th candidate).
    scores: Tensor
    cand: Tensor  # (Q, k) int64 the top-k candidates in pre-rank order
    cand_sim: Tensor  # (Q, k) fp32 their cosine similarity
    itm: Tensor  # (Q, k, 2) fp32 their ITM log-odds (text-query head, image-query head)

    def reorder(self, score: RerankScore) -> Tensor:
        """(Q, C) two-stage order under another score, from the stored top-k scores (no cross-encoder pass)."""
        return _order(self.pre_order, self.cand, score(self.cand_sim, self.itm))


def _pre_rank(sim_q: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """(Q, C) sim -> pre-order (Q, C) and the top-k candidates (Q, k). Stable sort: ties go to the lower
    index, so a sharded run and a single-process run order identical rows identically."""
    pre_order = torch.sort(sim_q, dim=1, descending=True, stable=True).indices
    k = min(topk, sim_q.shape[1])
    return pre_order, pre_order[:, :k]


def _order(pre_order: Tensor, cand: Tensor, new: Tensor) -> Tensor:
    """The top-k `cand` (Q, k) sorted by `new` (Q, k) (stable: ties keep pre-rank order), then the rest."""
    perm = torch.sort(new, dim=1, descending=True, stable=True).indices
    return torch.cat([cand.gather(1, perm), pre_order[:, cand.shape[1]:]], dim=1)


def _apply(sim_q: Tensor, pre_order: Tensor, cand: Tensor, itm: Tensor, score: RerankScore) -> Ranking:
    """Re-order the top-k `cand` (Q, k) by `score`; the rest keeps its pre-rank order below them.

    `scores` orders like `order` up to exact ties with the lowest re-ranked score; `order` is built explicitly
    so that ties cannot break the rule.
    """
    cand_sim = sim_q.gather(1, cand)  # (Q, k)
    new = score(cand_sim, itm)  # (Q, k)
    if score.mode == "released":  # sim + prob >= sim_kth >= any sim outside the top-k (prob >= 0)
        rest = sim_q.clone()
    else:  # monotone in sim and <= the lowest re-ranked score, since sim <= sim_kth outside the top-k
        rest = new.min(dim=1, keepdim=True).values - (cand_sim[:, -1:] - sim_q)
    scores = rest.scatter_(1, cand, new)
    return Ranking(pre_order=pre_order, order=_order(pre_order, cand, new), scores=scores, cand=cand,
                   cand_sim=cand_sim, itm=itm)


def rerank(sim: Tensor, topk: int, score_pairs: PairScorer, score: RerankScore, text_rows: slice | None = None,
           image_rows: slice | None = None) -> tuple[Ranking, Ranking]:
    """Two-stage ranking of the text queries in `text_rows` (over all images) and of the image queries in
    `image_rows` (over all texts).

    sim: (N_img, T) cosine similarities of ALL images and texts. `score_pairs` gets every (text, image)
    pair among the candidates once (a pair that is a candidate in both directions is scored once: both ITM
    heads see the same pair either way) and returns its (P, 2) ITM log-odds; `score` combines them with sim.
    Returns (t2i, i2t) Rankings whose rows are the queries of the slices, in order.
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
    itm = score_pairs(keys // n_img, keys % n_img).float().to(sim.device)[inverse]  # (P, 2)
    n_t2i = cand_t2i.numel()
    t2i = _apply(sim_t2i, pre_t2i, cand_t2i, itm[:n_t2i].view(*cand_t2i.shape, 2), score)
    i2t = _apply(sim_i2t, pre_i2t, cand_i2t, itm[n_t2i:].view(*cand_i2t.shape, 2), score)
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
    """PairScorer from the model's two ITM heads: (P, 2) log-odds logit[1] - logit[0] of (text-query, image-query).

    With `lockstep`, batches are padded to exactly `batch_size` pairs and every rank of `group` runs the same
    number of them (ZeRO-3; see the module docstring).
    """

    def score(txt_idx: Tensor, img_idx: Tensor) -> Tensor:
        device = img_tokens.device
        txt_idx, img_idx = txt_idx.to(device), img_idx.to(device)
        n = txt_idx.numel()
        out = torch.empty(n, 2, dtype=torch.float32, device=device)
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
            lo = torch.stack([tq.float()[:, 1] - tq.float()[:, 0], iq.float()[:, 1] - iq.float()[:, 0]], dim=1)
            out[pos[:valid]] = lo[:valid]
        return out

    return score
