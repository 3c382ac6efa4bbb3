"""FGR: weighted ITM CE by hand, pair construction, masking of rows without a negative, and the sampler as
FGR uses it never pairing a positive."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import r2d2ds  # noqa: F401
from r2d2ds.losses import build_itm_pairs, fgr_loss, pick_negatives, weighted_itm_loss
from r2d2ds.models import R2D2
from tests.models.tiny import VOCAB, no_dropout, tiny_batch, tiny_model_config


def ce(logits, k):
    return math.log(sum(math.exp(x) for x in logits)) - logits[k]


def test_weighted_itm_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [1.0, 3.0]])
    target = torch.tensor([1, 0, 0, 1])
    valid = torch.tensor([True, True, True, False])
    w_neg, w_pos = 1.0, 2.0
    num = w_pos * ce([0.0, 1.0], 1) + w_neg * ce([2.0, -1.0], 0) + w_neg * ce([0.5, 0.5], 0)
    expect = num / (w_pos + w_neg + w_neg)  # the invalid row counts in neither sum
    got = weighted_itm_loss(logits, target, valid, (w_neg, w_pos))
    assert got.item() == pytest.approx(expect, rel=1e-6)
    # Same as torch's weighted mean on the valid rows.
    ref = F.cross_entropy(logits[:3], target[:3], weight=torch.tensor([w_neg, w_pos]))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_build_itm_pairs_layout_and_validity():
    b, n, l, w = 3, 2, 4, 5
    img = torch.arange(b, dtype=torch.float)[:, None, None].expand(b, n, w)  # row value = image index
    txt = torch.arange(b, dtype=torch.float)[:, None, None].expand(b, l, w) + 10
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    neg_txt = torch.tensor([2, -1, 0])
    neg_img = torch.tensor([1, 2, -1])
    pairs = build_itm_pairs(img, txt, mask, neg_txt, neg_img)  # one process: global indices = local rows
    pi, pt, pm, target, valid = pairs.img, pairs.txt, pairs.mask, pairs.target, pairs.valid
    assert pi.shape == (9, n, w) and pt.shape == (9, l, w) and pm.shape == (9, l)
    assert pi[:, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 2]  # no negative: its own row, masked
    assert pt[:, 0, 0].tolist() == [10, 11, 12, 12, 11, 10, 10, 11, 12]
    assert torch.equal(pm[3], mask[2]) and torch.equal(pm[6], mask[0])  # masks travel with their text
    assert target.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert valid.tolist() == [True, True, True, True, False, True, True, True, False]
    assert pairs.stats["bytes_recv"].item() == 0 and pairs.stats["bytes_sent"].item() == 0


def test_pick_negatives_never_returns_a_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        b = 12
        img = F.normalize(torch.randn(b, 8, generator=g), dim=-1)
        # Make positives the MOST similar pairs, so a sampler that forgot to exclude them would pick them.
        txt = F.normalize(img + 0.05 * torch.randn(b, 8, generator=g), dim=-1)
        ids = torch.randint(0, 4, (b,), generator=g)
        neg_txt, neg_img = pick_negatives(img, txt, torch.tensor(20.0), ids, seed=trial)
        for i in range(b):
            has_neg = bool((ids != ids[i]).any())
            for j in (neg_txt[i].item(), neg_img[i].item()):
                if has_neg:
                    assert 0 <= j < b and ids[j] != ids[i], (trial, i, j)
                else:
                    assert j == -1


def test_pick_negatives_edge_cases_and_seed():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.tensor([5, 5, 5, 7])  # rows 0-2 have exactly one negative (3); row 3 has three
    a = pick_negatives(img, txt, torch.tensor(10.0), ids, 1)
    assert a[0][:3].tolist() == [3, 3, 3] and a[1][:3].tolist() == [3, 3, 3]
    assert a[0][3].item() in (0, 1, 2) and a[1][3].item() in (0, 1, 2)
    b = pick_negatives(img, txt, torch.tensor(10.0), ids, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # reproducible from the seed
    same = pick_negatives(img, txt, torch.tensor(10.0), torch.zeros(4, dtype=torch.long), 0)
    assert same[0].tolist() == [-1] * 4 and same[1].tolist() == [-1] * 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return R2D2(no_dropout(tiny_model_config()), VOCAB)


def test_fgr_loss_matches_hand_assembly(model):
    batch = tiny_batch(b=4, ids=[0, 1, 2, 3])
    m = model
    it, ie = m.encode_image(batch["image"])
    tt, te = m.encode_text(batch["input_ids"], batch["attention_mask"])
    scale = m.logit_scale()
    loss, stats = fgr_loss(m, it, tt, batch["attention_mask"], ie, te, scale, batch["image_id"], 3, (1.0, 2.0))
    nt, ni = pick_negatives(ie, te, scale, batch["image_id"], 3)
    # Score every pair one at a time, then the weighted mean by hand (pos weight 2, neg 1), per encoder.
    pairs = [(i, i, 1) for i in range(4)] + [(i, int(nt[i]), 0) for i in range(4)] + \
            [(int(ni[j]), j, 0) for j in range(4)]
    total = 0.0
    for enc in (0, 1):
        num = den = 0.0
        for i, j, y in pairs:
            mask = batch["attention_mask"][j:j + 1]
            logits = m.itm_logits(it[i:i + 1], tt[j:j + 1], mask)[enc][0].tolist()
            wt = 2.0 if y == 1 else 1.0
            num += wt * ce(logits, y)
            den += wt
        total += 0.5 * num / den
    assert loss.item() == pytest.approx(total, rel=1e-5)
    # Accuracy on positives and on negatives separately, both encoders averaged, by hand.
    with torch.no_grad():
        hits = {1: [], 0: []}
        for i, j, y in pairs:
            for logits in m.itm_logits(it[i:i + 1], tt[j:j + 1], batch["attention_mask"][j:j + 1]):
                hits[y].append(float(logits.argmax(-1).item() == y))
    assert stats["acc/itm_pos"].item() == pytest.approx(sum(hits[1]) / len(hits[1]))
    assert stats["acc/itm_neg"].item() == pytest.approx(sum(hits[0]) / len(hits[0]))
    assert stats["acc/itm"].item() == pytest.approx((sum(hits[1]) + sum(hits[0])) / 24)
    # Similarity counters: mean cosine of the chosen negatives and of the off-diagonal entries, by hand.
    cos = (ie @ te.T).detach()
    neg_sim = (sum(cos[i, int(nt[i])] for i in range(4)) + sum(cos[int(ni[j]), j] for j in range(4))) / 8
    off = (cos.sum() - cos.diagonal().sum()) / 12
    assert stats["fgr/neg_sim"].item() == pytest.approx(neg_sim.item(), abs=1e-6)
    assert stats["fgr/offdiag_sim"].item() == pytest.approx(off.item(), abs=1e-6)
    loss.backward()  # gradients reach both towers through the tokens (ALBEF style)
    assert m.image_tower.body.patch_embed.proj.weight.grad is not None
    assert m.text_tower.body.embeddings.word_embeddings.weight.grad is not None


def test_fgr_rows_without_negative_are_masked(model):
    """All pairs share one id: no negatives anywhere, so FGR is the positive pairs' CE alone."""
    batch = tiny_batch(b=3, ids=[4, 4, 4])
    m = model
    with torch.no_grad():
        it, ie = m.encode_image(batch["image"])
        tt, te = m.encode_text(batch["input_ids"], batch["attention_mask"])
        loss, stats = fgr_loss(m, it, tt, batch["attention_mask"], ie, te, m.logit_scale(), batch["image_id"],
                               0, (1.0, 2.0))
        tq, iq = m.itm_logits(it, tt, batch["attention_mask"])
    ones = torch.ones(3, dtype=torch.long)
    expect = 0.5 * (F.cross_entropy(tq, ones) + F.cross_entropy(iq, ones))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    expect_acc = 0.5 * ((tq.argmax(-1) == 1).float().mean() + (iq.argmax(-1) == 1).float().mean())
    assert stats["acc/itm"].item() == pytest.approx(expect_acc.item())
    assert stats["acc/itm_pos"].item() == pytest.approx(expect_acc.item())
