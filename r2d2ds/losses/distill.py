"""FgD (feature-guided distillation): student features on the MASKED text regress onto the EMA teacher's
features on the FULL text (text-query cross encoder outputs, the teacher with no gradient).

Our choice of distance (the paper's exact form is not public in text we could read): the squared L2 distance
between L2-normalised features, 2 - 2 cos(s, t) per token, in [0, 4], scale-free so its weight does not depend
on the hidden width or LayerNorm gain; averaged over the valid (non-pad) token positions of the batch.
TgD lives with GCPR in `contrastive.py` (same fused op).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from r2d2ds.losses.contrastive import tgd_loss

__all__ = ["fgd_loss", "tgd_loss"]


def fgd_loss(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """student/teacher hidden (B, L, W), mask (B, L) 1 = valid -> 0-dim fp32 mean ||s/|s| - t/|t|||^2."""
    s = F.normalize(student_hidden.float(), dim=-1, eps=1e-6)
    t = F.normalize(teacher_hidden.detach().float(), dim=-1, eps=1e-6)
    d = (s - t).pow(2).sum(-1)  # (B, L)
    m = attention_mask.float()
    return (d * m).sum() / m.sum().clamp_min(1.0)
