"""GCPR and TgD as the objective uses them: hand-computed multi-positive cases, and the objective's mix."""

from __future__ import annotations

import math

import pytest
import torch

import r2d2ds  # noqa: F401
from r2d2ds.losses import R2D2Pretraining, gcpr_loss, tgd_loss
from r2d2ds.models import make_teacher
from tests.losses import reference
from tests.models.tiny import (
    MASK,
    PAD,
    SPECIALS,
    VOCAB,
    no_dropout,
    tiny_batch,
    tiny_loss_config,
    tiny_model_config,
)


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


# Three pairs, ids [0, 0, 1]: pairs 0 and 1 are positives of each other. scale 2.
IMG = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
TXT = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
IDS = [0, 0, 1]
# s = 2 * IMG @ TXT^T, written out by hand:
S = [[2.0, 1.2, 0.0],
     [0.0, 1.6, 2.0],
     [1.2, 2.0, 1.6]]


def hand_gcpr() -> float:
    # i2t row i: LSE(s_i.) - mean of s_ij over i's positives j; t2i the same on columns.
    i2t = [lse(S[0]) - (2.0 + 1.2) / 2, lse(S[1]) - (0.0 + 1.6) / 2, lse(S[2]) - 1.6]
    cols = [[S[0][j], S[1][j], S[2][j]] for j in range(3)]
    t2i = [lse(cols[0]) - (2.0 + 0.0) / 2, lse(cols[1]) - (1.2 + 1.6) / 2, lse(cols[2]) - 1.6]
    return sum((a + b) / 2 for a, b in zip(i2t, t2i)) / 3


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_gcpr_hand_computed_multi_positive(impl):
    img, txt = torch.tensor(IMG), torch.tensor(TXT)
    scale = torch.tensor(2.0, requires_grad=True)
    loss = gcpr_loss(img, txt, scale, torch.tensor(IDS), impl=impl)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(hand_gcpr(), rel=1e-6)
    loss.backward()
    assert scale.grad is not None and scale.grad.item() != 0.0
    # labels None = the diagonal: pair 1 is no longer a positive of pair 0.
    diag = gcpr_loss(img, txt, 2.0, None, impl=impl)
    i2t = [lse(S[i]) - S[i][i] for i in range(3)]
    t2i = [lse([S[0][j], S[1][j], S[2][j]]) - S[j][j] for j in range(3)]
    assert diag.item() == pytest.approx(sum((a + b) / 2 for a, b in zip(i2t, t2i)) / 3, rel=1e-6)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_tgd_hand_computed(impl):
    # Teacher: identity embeddings in 3-D -> s_t = 2 * I, softmax row = [e^2, 1, 1] / (e^2 + 2) (permuted).
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0]])
    t = torch.eye(3)
    loss = tgd_loss(img, txt, torch.tensor(2.0), torch.tensor(IDS), t, t, impl=impl)
    hi, lo = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    q = [[hi if i == j else lo for j in range(3)] for i in range(3)]  # symmetric: same for t2i
    cols = [[S[0][j], S[1][j], S[2][j]] for j in range(3)]
    i2t = [lse(S[i]) - sum(q[i][j] * S[i][j] for j in range(3)) for i in range(3)]
    t2i = [lse(cols[j]) - sum(q[j][i] * S[i][j] for i in range(3)) for j in range(3)]
    assert loss.item() == pytest.approx(sum((a + b) / 2 for a, b in zip(i2t, t2i)) / 3, rel=1e-6)


def test_objective_mixes_gcpr_and_tgd_like_the_paper_targets():
    """total = (1-a) gcpr + a tgd == CE against q = (1-a) y + a softmax(s_teacher), value AND gradient."""
    torch.manual_seed(0)
    lc = tiny_loss_config(fgr_weight=0.0, fgd_weight=0.0, mlm_weight=0.0, tgd_alpha=0.4)
    obj = R2D2Pretraining(no_dropout(tiny_model_config()), lc, VOCAB, PAD, MASK, SPECIALS)
    teacher = make_teacher(obj.model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = tiny_batch(b=6, ids=[0, 0, 1, 2, 2, 3])
    out = obj(batch, teacher, seed=1)
    assert out["loss/fgr"].item() == out["loss/fgd"].item() == out["loss/mlm"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.6 * out["loss/gcpr"].item() + 0.4 * out["loss/tgd"].item(),
                                               rel=1e-6)
    # Parts no active term reaches are frozen (tests/losses/test_frozen_parts.py): compare the trainable ones.
    named = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)

    m = obj.model
    _, ie = m.encode_image(batch["image"])
    _, te = m.encode_text(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        _, tie = teacher.encode_image(batch["image"])
        _, tte = teacher.encode_text(batch["input_ids"], batch["attention_mask"])
    scale = m.logit_scale()
    ref = reference.contrastive(ie, te, scale, batch["image_id"], tie, tte, alpha=0.4)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["loss/gcpr"].item() == pytest.approx(
        reference.contrastive(ie, te, scale, batch["image_id"]).item(), rel=1e-5)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for (name, _), g, r in zip(named, grads, ref_grads):
        if r is None:  # cross encoders / MLM head: unused by the contrastive terms
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            # fp32 through the whole model: summation-order noise ~1e-6 of the gradient's scale.
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 + 2e-5 * r.abs().max().item(),
                                       msg=name)


def test_no_teacher_means_plain_gcpr_weight():
    torch.manual_seed(0)
    lc = tiny_loss_config(fgr_weight=0.0, fgd_weight=0.0, mlm_weight=0.0, tgd_alpha=0.4, gcpr_weight=0.5)
    obj = R2D2Pretraining(no_dropout(tiny_model_config()), lc, VOCAB, PAD, MASK, SPECIALS)
    out = obj(tiny_batch(b=4), None, seed=0)
    assert out["loss/tgd"].item() == 0.0
    # Without a teacher there is nothing to mix: gcpr keeps its full weight (not (1 - alpha) of it).
    assert out["loss"].item() == pytest.approx(0.5 * out["loss/gcpr"].item(), rel=1e-6)
