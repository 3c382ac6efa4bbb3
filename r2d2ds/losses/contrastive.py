"""GCPR (global contrastive pre-ranking) and TgD (target-guided distillation) through the fused op.

Both are `r2d2ds.kernels.contrastive_loss` over the GLOBAL batch of `group` (None: the default group), so the
gradient invariant of DESIGN.md section 3 holds: after the engine AVERAGES gradients over ranks, every
parameter gets the gradient of the single-process loss on the concatenated batch.

  gcpr = CE(y, s),               y_ij = 1[id_i = id_j] / #positives(i),  s = f_I . f_T * logit_scale
  tgd  = CE(softmax(s_t), s),    s_t from the EMA teacher's embeddings (same, detached scale)
Mixing (1 - a) * gcpr + a * tgd equals the paper's CE against q = (1 - a) y + a softmax(s_t) (CE is linear
in the target), which is why the two terms can be logged and weighted separately.
"""

from __future__ import annotations

from torch import Tensor

from r2d2ds.kernels import contrastive_loss


def gcpr_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None,
              group=None, impl: str = "auto", negatives_seed: int | None = None):
    """Multi-positive symmetric InfoNCE over the global batch; 0-dim fp32 (this rank's local-row mean).

    With `negatives_seed`, returns (loss, (neg_txt_for_img, neg_img_for_txt)): FGR's softmax hard negatives
    (global indices) drawn in the same pass over the similarity matrix, so it is computed once."""
    if negatives_seed is None:
        return contrastive_loss(image_emb, text_emb, logit_scale, labels=labels, group=group, impl=impl)
    loss, neg_txt, neg_img = contrastive_loss(image_emb, text_emb, logit_scale, labels=labels, group=group,
                                              impl=impl, return_negatives=True, seed=negatives_seed)
    return loss, (neg_txt, neg_img)


def tgd_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None,
             teacher_image_emb: Tensor, teacher_text_emb: Tensor, group=None, impl: str = "auto") -> Tensor:
    """CE of the student's similarities against the teacher's softmax only (alpha = 1); 0-dim fp32."""
    return contrastive_loss(image_emb, text_emb, logit_scale, labels=labels,
                            teacher_image_emb=teacher_image_emb.detach().to(image_emb.dtype),
                            teacher_text_emb=teacher_text_emb.detach().to(text_emb.dtype),
                            alpha=1.0, group=group, impl=impl)
