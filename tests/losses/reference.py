"""Naive single-process oracles for the losses' tests (B x B matrices, float64-friendly).

Independent of `r2d2ds.kernels`, so the objective's terms can be checked against a second implementation.
"""

from __future__ import annotations

import torch


def targets(labels: torch.Tensor | None, n: int) -> torch.Tensor:
    """y_ij = 1[id_i = id_j] / #positives(i); the identity when labels is None."""
    if labels is None:
        return torch.eye(n, dtype=torch.float64)
    pos = (labels[:, None] == labels[None, :]).double()
    return pos / pos.sum(1, keepdim=True)


def contrastive(img, txt, scale, labels=None, t_img=None, t_txt=None, alpha=0.0) -> torch.Tensor:
    """Mean over rows of (i2t CE + t2i CE) / 2 against q = (1 - alpha) y + alpha softmax(s_teacher)."""
    s = scale * img @ txt.T  # (B, B)
    y = targets(labels, s.shape[0]).to(s.dtype)
    q_i2t, q_t2i = y, y.T
    if t_img is not None and alpha > 0:
        st = float(scale.detach() if torch.is_tensor(scale) else scale) * t_img @ t_txt.T
        q_i2t = (1 - alpha) * y + alpha * st.softmax(1)
        q_t2i = (1 - alpha) * y.T + alpha * st.T.softmax(1)
    i2t = -(q_i2t * s.log_softmax(1)).sum(1)
    t2i = -(q_t2i * s.T.log_softmax(1)).sum(1)
    return ((i2t + t2i) / 2).mean()


def sample_negatives(img, txt, scale, labels=None, generator=None):
    """Multinomial draw from softmax(s) per row with positives excluded; -1 where a row has no negative."""
    s = (float(scale) * img @ txt.T).double()
    n = s.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if labels is None else labels[:, None] == labels[None, :]

    def draw(logits, excl):
        out = torch.full((n,), -1, dtype=torch.long)
        for i in range(n):
            if (~excl[i]).any():
                p = logits[i].masked_fill(excl[i], float("-inf")).softmax(0)
                out[i] = torch.multinomial(p, 1, generator=generator)[0]
        return out

    return draw(s, pos), draw(s.T, pos.T)
