"""FGR (fine-grained ranking): image-text matching with one hard negative per image and per text, drawn over
the GLOBAL batch, on both cross encoders, class-weighted CE (released weights: negative 1, positive 2).

Three steps, each its own function so a chunked pass (GradCache) can reuse the seam:
  1. `pick_negatives`: global indices (rank-major) of one negative text per local image and one negative
     image per local text (`r2d2ds.losses.negatives`; the released softmax by default).
  2. `build_itm_pairs`: negatives in (global indices) -> pairs out. Fetches exactly the chosen tokens from
     their owner ranks (`r2d2ds.distributed.exchange`: deduplicated requests, one variable-count all-to-all
     per tensor, gradients back to the owners' towers) and lays out B positives + 2B negatives.
  3. `fgr_loss`: both cross encoders on the pairs, weighted ITM CE, and the per-step counters.

Gradient convention (DESIGN.md section 3): each rank's loss is the mean over its own pairs; a negative's
tokens get their gradient from the rank that scored it. After the engine AVERAGES parameter gradients over
ranks, every parameter holds the gradient of (1 / W) sum_r loss_r computed in one process on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from r2d2ds.distributed import all_reduce_sum, get_world_size, local_group
from r2d2ds.distributed.collectives import gather_sizes, row_offset
from r2d2ds.distributed.exchange import plan_row_exchanges
from r2d2ds.losses.negatives import NegativeSampling, sample_negatives
from r2d2ds.models.r2d2 import R2D2


@torch.no_grad()
def pick_negatives(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None,
                   seed: int, sampling: NegativeSampling | None = None, group=None,
                   impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(neg_txt_for_img, neg_img_for_txt): int64 (B_local,) GLOBAL indices over `group`'s batch (None: the
    default group; `local_group()` restricts the choice to this rank's rows), -1 where a row has no negative.
    Never a positive (same id). Reproducible from `seed`."""
    return sample_negatives(image_emb, text_emb, logit_scale, labels, sampling or NegativeSampling(), seed,
                            group=group, impl=impl)


@dataclass
class ItmPairs:
    """3B (image, text) pairs: rows [0, B) positives, [B, 2B) (image i, its negative text), [2B, 3B)
    (the negative image of text j, text j). `valid` False where the anchor had no negative (its pair holds an
    arbitrary local row and its loss is masked: static shapes, no host sync)."""

    img: Tensor  # (3B, N, Wi)
    txt: Tensor  # (3B, L, Wt)
    mask: Tensor  # (3B, L)
    target: Tensor  # int64 (3B,), 1 = match
    valid: Tensor  # bool (3B,)
    stats: dict[str, Tensor] = field(default_factory=dict)  # exchange counters, detached


def build_itm_pairs(img_tokens: Tensor, txt_tokens: Tensor, attention_mask: Tensor, neg_txt_for_img: Tensor,
                    neg_img_for_txt: Tensor, group=None, sizes: list[int] | None = None,
                    extra: dict[str, tuple[Tensor, str]] | None = None) -> ItmPairs:
    """Negatives in (GLOBAL indices over `group`, -1 = none) -> pairs out; collective over `group`.

    img_tokens (B, N, Wi), txt_tokens (B, L, Wt), attention_mask (B, L): this rank's rows. Only the chosen
    rows of other ranks travel (deduplicated); their gradients flow back to the owners. `sizes`: rows per
    rank if already known (saves one small all-gather). `extra`: name -> (local (B, ...) tensor, "image" or
    "text") fetched with the same plan, returned in `stats` (e.g. embeddings for the counters)."""
    b, dev = img_tokens.shape[0], img_tokens.device
    sizes = sizes if sizes is not None else gather_sizes(b, group)
    off = row_offset(sizes, group)
    # A row without a negative asks for its own row: served locally, no traffic, loss masked by `valid`.
    own = torch.arange(off, off + b, device=dev)
    nt = torch.where(neg_txt_for_img >= 0, neg_txt_for_img, own)
    ni = torch.where(neg_img_for_txt >= 0, neg_img_for_txt, own)
    txt_plan, img_plan = plan_row_exchanges([nt, ni], sizes, group)  # one counts all-to-all for both
    neg_txt, neg_mask = txt_plan.fetch(txt_tokens), txt_plan.fetch(attention_mask)
    neg_img = img_plan.fetch(img_tokens)

    img = torch.cat([img_tokens, img_tokens, neg_img])
    txt = torch.cat([txt_tokens, neg_txt, txt_tokens])
    mask = torch.cat([attention_mask, neg_mask, attention_mask])
    target = torch.cat([torch.ones(b, dtype=torch.long, device=dev), torch.zeros(2 * b, dtype=torch.long, device=dev)])
    valid = torch.cat([torch.ones(b, dtype=torch.bool, device=dev), neg_txt_for_img >= 0, neg_img_for_txt >= 0])

    # Counters (detached). Bytes: token features + mask rows that crossed ranks (ids and counts excluded).
    txt_row = (txt_tokens[0].numel() * txt_tokens.element_size()
               + attention_mask[0].numel() * attention_mask.element_size()) if b else 0
    img_row = img_tokens[0].numel() * img_tokens.element_size() if b else 0
    sent = txt_plan.rows_sent * txt_row + img_plan.rows_sent * img_row
    recv = txt_plan.rows_received * txt_row + img_plan.rows_received * img_row
    negs = torch.cat([neg_txt_for_img, neg_img_for_txt])
    ok = negs >= 0
    remote = ok & ((negs < off) | (negs >= off + b))
    stats = {"bytes_sent": torch.tensor(float(sent), device=dev), "bytes_recv": torch.tensor(float(recv), device=dev),
             "remote_frac": remote.float().sum() / ok.float().sum().clamp_min(1.0)}
    for name, (t, kind) in (extra or {}).items():
        stats[name] = (img_plan if kind == "image" else txt_plan).fetch(t.detach())
    return ItmPairs(img, txt, mask, target, valid, stats)


def weighted_itm_loss(logits: Tensor, target: Tensor, valid: Tensor,
                      class_weights: tuple[float, float]) -> Tensor:
    """Weighted-mean CE over valid rows (torch's `weight=` semantics: sum w_y ce / sum w_y); 0-dim fp32."""
    w = logits.new_tensor(class_weights, dtype=torch.float32)[target] * valid.float()  # (R,)
    ce = F.cross_entropy(logits.float(), target, reduction="none")  # (R,)
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def itm_accuracy(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    correct = (logits.argmax(-1) == target) & valid
    return correct.float().sum() / valid.float().sum().clamp_min(1.0)


def fgr_loss(model: R2D2, img_tokens: Tensor, txt_tokens: Tensor, attention_mask: Tensor, image_emb: Tensor,
             text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None, seed: int,
             class_weights: tuple[float, float], sampling: NegativeSampling | None = None, group=None,
             negatives: tuple[Tensor, Tensor] | None = None, impl: str = "auto"
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """(FGR loss = mean over the two cross encoders of the weighted ITM CE, counters).

    `group`: the batch negatives are drawn from (None: the default group = the global batch; `local_group()`
    for the local batch). `negatives`: global indices already drawn (e.g. by the GCPR pass with
    `return_negatives=True`), else drawn here with `sampling` and `seed`. Collective over `group`.
    Counters (detached 0-dim fp32, averaged over ranks by the logger): acc/itm, acc/itm_pos, acc/itm_neg,
    fgr/neg_sim (mean cosine of the chosen negatives), fgr/offdiag_sim (mean off-diagonal cosine of the
    global image-text matrix), fgr/neg_sim_lift (their difference), fgr/remote_frac, fgr/bytes_sent,
    fgr/bytes_recv (token bytes this rank sent / received)."""
    b = image_emb.shape[0]
    sizes = gather_sizes(b, group)
    if negatives is None:
        negatives = pick_negatives(image_emb, text_emb, logit_scale, labels, seed, sampling, group, impl)
    neg_txt, neg_img = negatives
    pairs = build_itm_pairs(img_tokens, txt_tokens, attention_mask, neg_txt, neg_img, group, sizes,
                            extra={"neg_text_emb": (text_emb, "text"), "neg_image_emb": (image_emb, "image")})
    tq_logits, iq_logits = model.itm_logits(pairs.img, pairs.txt, pairs.mask)  # (3B, 2) each
    t, v = pairs.target, pairs.valid
    loss = 0.5 * (weighted_itm_loss(tq_logits, t, v, class_weights) + weighted_itm_loss(iq_logits, t, v, class_weights))
    with torch.no_grad():
        pos, neg = v & (t == 1), v & (t == 0)
        stats = {
            "acc/itm": 0.5 * (itm_accuracy(tq_logits, t, v) + itm_accuracy(iq_logits, t, v)),
            "acc/itm_pos": 0.5 * (itm_accuracy(tq_logits, t, pos) + itm_accuracy(iq_logits, t, pos)),
            "acc/itm_neg": 0.5 * (itm_accuracy(tq_logits, t, neg) + itm_accuracy(iq_logits, t, neg)),
        }
        stats.update(_similarity_counters(image_emb, text_emb, pairs, sizes, group))
        stats.update({f"fgr/{k}": pairs.stats[k] for k in ("remote_frac", "bytes_sent", "bytes_recv")})
    return loss, {k: x.detach().float() for k, x in stats.items()}


def _similarity_counters(image_emb: Tensor, text_emb: Tensor, pairs: ItmPairs, sizes: list[int],
                         group) -> dict[str, Tensor]:
    """Mean cosine of the chosen negatives vs the mean off-diagonal cosine of the global matrix (this rank's
    rows; the logger's cross-rank mean makes it global for equal local batches). O(B D), one all-reduce."""
    b = image_emb.shape[0]
    x, y = image_emb.detach().float(), text_emb.detach().float()
    nt_ok, ni_ok = pairs.valid[b:2 * b], pairs.valid[2 * b:]
    s_nt = (x * pairs.stats["neg_text_emb"].float()).sum(-1)  # cos(image i, its negative text)
    s_ni = (y * pairs.stats["neg_image_emb"].float()).sum(-1)  # cos(its negative image, text j)
    n_ok = (nt_ok.sum() + ni_ok.sum()).float()
    neg_sim = ((s_nt * nt_ok).sum() + (s_ni * ni_ok).sum()) / n_ok.clamp_min(1.0)  # masked: no host sync
    # Row i's off-diagonal mean: (x_i . sum_j y_j - x_i . y_i) / (N - 1), with sum_j y_j over all ranks.
    n = sum(sizes)
    y_sum = all_reduce_sum(y.sum(0), group) if get_world_size(group) > 1 else y.sum(0)
    off = ((x @ y_sum) - (x * y).sum(-1)) / max(n - 1, 1)
    offdiag = off.mean() if b else x.new_zeros(())
    return {"fgr/neg_sim": neg_sim, "fgr/offdiag_sim": offdiag, "fgr/neg_sim_lift": neg_sim - offdiag}


def fgr_group(scope: str):
    """The process group FGR draws negatives from: None (the default group: the global batch) or this rank's."""
    return local_group() if scope == "local" else None
