"""MLM masking statistics and loss on masked positions only; FgD by hand."""

from __future__ import annotations

import math

import pytest
import torch

import r2d2ds  # noqa: F401
from r2d2ds.losses import fgd_loss, mask_tokens, mlm_loss
from r2d2ds.losses.mlm import IGNORE_INDEX
from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, tiny_batch


def test_mask_tokens_statistics_and_rules():
    b = tiny_batch(b=400, length=40, seed=1)
    ids, mask = b["input_ids"], b["attention_mask"]
    masked, labels = mask_tokens(ids, mask, 0.15, MASK, VOCAB, SPECIALS, torch.Generator().manual_seed(0))
    eligible = (mask == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    selected = labels != IGNORE_INDEX
    assert not (selected & ~eligible).any()  # never a special token or padding
    assert torch.equal(labels[selected], ids[selected])  # targets are the original tokens
    assert torch.equal(masked[~selected], ids[~selected])  # unselected tokens untouched
    n_sel, n_el = selected.sum().item(), eligible.sum().item()
    # Binomial(n, 0.15): 5 standard deviations.
    assert abs(n_sel - 0.15 * n_el) < 5 * math.sqrt(n_el * 0.15 * 0.85)
    to_mask = (masked == MASK) & selected
    kept = (masked == ids) & selected
    changed = selected & ~to_mask & ~kept  # random replacements (a random draw can also equal the original)
    frac_mask, frac_kept, frac_rand = (x.sum().item() / n_sel for x in (to_mask, kept, changed))
    tol = 5 * math.sqrt(0.1 * 0.9 / n_sel)
    assert abs(frac_mask - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n_sel)
    assert abs(frac_kept - (0.1 + 0.1 / VOCAB)) < tol
    assert abs(frac_rand - 0.1 * (1 - 1 / VOCAB)) < tol
    assert ((masked[changed] >= 0) & (masked[changed] < VOCAB)).all()


def test_mask_tokens_seeded_and_at_least_one():
    b = tiny_batch(b=4, length=12)
    ids, mask = b["input_ids"], b["attention_mask"]
    a = mask_tokens(ids, mask, 0.15, MASK, VOCAB, SPECIALS, torch.Generator().manual_seed(5))
    c = mask_tokens(ids, mask, 0.15, MASK, VOCAB, SPECIALS, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    eligible = (mask == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    for seed in range(20):  # a tiny probability would often select nothing: one token is forced
        _, labels = mask_tokens(ids, mask, 1e-6, MASK, VOCAB, SPECIALS, torch.Generator().manual_seed(seed))
        sel = labels != IGNORE_INDEX
        assert sel.sum().item() == 1 and (sel & eligible).sum().item() == 1
    # No eligible token at all: nothing is forced (the loss then returns 0, see below).
    only_special = torch.full((2, 5), PAD)
    only_special[:, 0] = SPECIALS[1]
    m2 = torch.zeros_like(only_special)
    m2[:, 0] = 1
    _, labels = mask_tokens(only_special, m2, 0.5, MASK, VOCAB, SPECIALS, None)
    assert (labels == IGNORE_INDEX).all()
    assert mlm_loss(torch.randn(2, 5, VOCAB), labels).item() == 0.0


def test_mlm_loss_counts_only_masked_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    logits[0, 2] = torch.tensor([0.0, 1.0, 0.0, 3.0])
    labels = torch.tensor([[0, IGNORE_INDEX, 3]])
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))
    expect = ((lse([2, 0, 0, 0]) - 2) + (lse([0, 1, 0, 3]) - 3)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expect, rel=1e-6)
    logits[0, 1] = torch.tensor([9.0, -9.0, 4.0, 1.0])  # an unmasked position: no effect
    assert mlm_loss(logits, labels).item() == pytest.approx(expect, rel=1e-6)


def test_fgd_by_hand():
    # Student and teacher features, 1 x 3 tokens x 2 dims; features are compared after L2 normalisation.
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 5.0], [0.0, 0.5], [-3.0, -4.0]]])
    # token 0: orthogonal -> |(1,0)-(0,1)|^2 = 2; token 1: same direction -> 0; token 2: opposite -> 4.
    assert fgd_loss(s, t, torch.tensor([[1, 1, 1]])).item() == pytest.approx((2 + 0 + 4) / 3, rel=1e-6)
    assert fgd_loss(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx((2 + 0) / 2, rel=1e-6)
    loss = fgd_loss(s, t, torch.tensor([[1, 0, 1]]))
    assert loss.item() == pytest.approx(3.0, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(s.grad[0, 1]) == 0  # padded token: no gradient
    t.requires_grad_(True)
    fgd_loss(s, t, torch.tensor([[1, 1, 1]])).backward()
    assert t.grad is None  # the teacher side is a target
