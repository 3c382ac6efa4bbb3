"""FGR (fine-grained ranking): image-text matching with one hard negative per image and per text, on both
cross encoders, class-weighted CE (released weights: negative 1, positive 2).

The negative choice lives in one function, `pick_negatives`, with the exchange of negative tokens next to it
in `build_itm_pairs`: today both work on the LOCAL batch (negatives drawn by `sample_hard_negatives` through a
one-rank group); the global hard-negative exchange replaces just these two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from r2d2ds.distributed import local_group
from r2d2ds.kernels import sample_hard_negatives
from r2d2ds.models.r2d2 import R2D2


@torch.no_grad()
def pick_negatives(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None,
                   generator: torch.Generator | None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(neg_txt_for_img, neg_img_for_txt): int64 (B,) LOCAL row indices, -1 where the row has no negative.

    Drawn from softmax(s) over the local batch with every same-id entry excluded (never a positive).
    """
    return sample_hard_negatives(image_emb.detach(), text_emb.detach(), logit_scale.detach(), labels=labels,
                                 group=local_group(), generator=generator, impl=impl)


def build_itm_pairs(img_tokens: Tensor, txt_tokens: Tensor, attention_mask: Tensor, neg_txt_for_img: Tensor,
                    neg_img_for_txt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """3B (image, text) pairs: B positives, B (image i, negative text), B (negative image, text j).

    Returns img (3B, N, Wi), txt (3B, L, Wt), mask (3B, L), target int64 (3B,) (1 = match), valid bool (3B,).
    Rows whose negative is -1 get an arbitrary partner (row 0) and valid False: their loss is masked, which
    keeps shapes static (no host sync). Gradients flow into the negative tokens too (ALBEF).
    """
    b = img_tokens.shape[0]
    nt, ni = neg_txt_for_img.clamp(min=0), neg_img_for_txt.clamp(min=0)
    img = torch.cat([img_tokens, img_tokens, img_tokens[ni]])
    txt = torch.cat([txt_tokens, txt_tokens[nt], txt_tokens])
    mask = torch.cat([attention_mask, attention_mask[nt], attention_mask])
    target = torch.cat([torch.ones(b, dtype=torch.long, device=img_tokens.device),
                        torch.zeros(2 * b, dtype=torch.long, device=img_tokens.device)])
    valid = torch.cat([torch.ones(b, dtype=torch.bool, device=img_tokens.device),
                       neg_txt_for_img >= 0, neg_img_for_txt >= 0])
    return img, txt, mask, target, valid


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
             text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None, generator: torch.Generator | None,
             class_weights: tuple[float, float], impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(FGR loss = mean over the two cross encoders of the weighted ITM CE, ITM accuracy over both)."""
    neg_txt, neg_img = pick_negatives(image_emb, text_emb, logit_scale, labels, generator, impl)
    img, txt, mask, target, valid = build_itm_pairs(img_tokens, txt_tokens, attention_mask, neg_txt, neg_img)
    tq_logits, iq_logits = model.itm_logits(img, txt, mask)  # (3B, 2) each
    loss = 0.5 * (weighted_itm_loss(tq_logits, target, valid, class_weights)
                  + weighted_itm_loss(iq_logits, target, valid, class_weights))
    with torch.no_grad():
        acc = 0.5 * (itm_accuracy(tq_logits, target, valid) + itm_accuracy(iq_logits, target, valid))
    return loss, acc
