"""sample_hard_negatives: never a positive, the exact row-softmax distribution (chi-square), seeding.

The 2-rank case (global indices of the right owner) is in tests/distributed/test_contrastive_distributed.py.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from r2d2ds.kernels import sample_hard_negatives
from r2d2ds.kernels.hard_negatives import exact_negative_probs
from scipy.stats import chisquare

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
IMPLS = ["reference", "torch", "triton"]


def batch(b: int, d: int, seed: int, groups: bool):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=gen), dim=1).to(DEV)
    txt = F.normalize(torch.randn(b, d, generator=gen), dim=1).to(DEV)
    labels = torch.randint(0, max(1, b // 3), (b,), generator=gen).to(DEV) if groups else None
    return img, txt, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", [False, True])
def test_never_a_positive_and_global_range(impl, groups):
    img, txt, labels = batch(150, 32, seed=1, groups=groups)
    ids = labels if groups else torch.arange(150, device=DEV)
    for seed in range(3):
        n_t, n_i = sample_hard_negatives(img, txt, 1 / 0.07, labels, impl=impl, seed=seed)
        for n in (n_t, n_i):
            assert n.dtype == torch.long and n.shape == (150,)
            assert ((n >= 0) & (n < 150)).all()
            assert not (ids[n] == ids).any(), "a positive was drawn"


@pytest.mark.parametrize("impl", IMPLS)
def test_row_without_negative_returns_minus_one(impl):
    img, txt, _ = batch(9, 16, seed=2, groups=False)
    labels = torch.tensor([4] * 6 + [1, 2, 3], device=DEV)
    labels_all_same = torch.full((9,), 4, device=DEV)
    n_t, n_i = sample_hard_negatives(img, txt, 10.0, labels_all_same, impl=impl, seed=0)
    assert (n_t == -1).all() and (n_i == -1).all()
    n_t, n_i = sample_hard_negatives(img, txt, 10.0, labels, impl=impl, seed=0)
    assert (n_t[:6] >= 6).all() and (n_i[:6] >= 6).all()  # group 4 rows can only draw ids 1-3


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_draws_and_generator_state(impl):
    img, txt, labels = batch(100, 32, seed=3, groups=True)
    a = sample_hard_negatives(img, txt, 5.0, labels, impl=impl, seed=42)
    b = sample_hard_negatives(img, txt, 5.0, labels, impl=impl, seed=42)
    c = sample_hard_negatives(img, txt, 5.0, labels, impl=impl, seed=43)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    d = sample_hard_negatives(img, txt, 5.0, labels, generator=g1, impl=impl)
    e = sample_hard_negatives(img, txt, 5.0, labels, generator=g2, impl=impl)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_distribution_chi_square(impl):
    """R identical rows (one id group, so the same excluded set) give R independent draws of one small row.

    Group 0: R pairs with the same image x* and text t*; then M pairs with distinct ids. Every group-0 image
    row must draw text j (j in the M others) with softmax_j(s * <x*, t_j>), each group-0 text row image j with
    softmax_j(s * <t*, x_j>). Chi-square against the exact probabilities over a few seeds, p > 0.001.
    """
    r, m, d, scale = 240, 5, 16, 3.0
    gen = torch.Generator().manual_seed(0)
    x_star, t_star = (F.normalize(torch.randn(1, d, generator=gen), dim=1) for _ in range(2))
    img = torch.cat([x_star.expand(r, d), F.normalize(torch.randn(m, d, generator=gen), dim=1)]).to(DEV)
    txt = torch.cat([t_star.expand(r, d), F.normalize(torch.randn(m, d, generator=gen), dim=1)]).to(DEV)
    labels = torch.cat([torch.zeros(r, dtype=torch.long), torch.arange(1, m + 1)]).to(DEV)
    p_t = exact_negative_probs(img[:1], txt, scale, labels[:1], labels)[0, r:].cpu()  # (m,)
    p_i = exact_negative_probs(txt[:1], img, scale, labels[:1], labels)[0, r:].cpu()
    assert p_t.min() > 0.02 and p_i.min() > 0.02  # every category expected often enough for chi-square
    counts_t = torch.zeros(m, dtype=torch.float64)
    counts_i = torch.zeros(m, dtype=torch.float64)
    for seed in range(4):
        n_t, n_i = sample_hard_negatives(img, txt, scale, labels, impl=impl, seed=1000 + seed)
        assert (n_t[:r] >= r).all() and (n_i[:r] >= r).all()
        counts_t += torch.bincount(n_t[:r].cpu() - r, minlength=m).double()
        counts_i += torch.bincount(n_i[:r].cpu() - r, minlength=m).double()
    for counts, p in ((counts_t, p_t), (counts_i, p_i)):
        stat = chisquare(counts.numpy(), (p * counts.sum()).numpy())
        assert stat.pvalue > 1e-3, f"{impl}: counts {counts.tolist()} vs p {p.tolist()} (p={stat.pvalue:.2g})"


def test_chi_square_detects_a_wrong_distribution():
    """The test above can fail: draws at a different temperature are rejected."""
    r, m, d = 240, 5, 16
    gen = torch.Generator().manual_seed(0)
    x_star = F.normalize(torch.randn(1, d, generator=gen), dim=1)
    img = torch.cat([x_star.expand(r, d), F.normalize(torch.randn(m, d, generator=gen), dim=1)])
    txt = F.normalize(torch.randn(r + m, d, generator=gen), dim=1)
    labels = torch.cat([torch.zeros(r, dtype=torch.long), torch.arange(1, m + 1)])
    p = exact_negative_probs(img[:1], txt, 3.0, labels[:1], labels)[0, r:]
    counts = torch.zeros(m, dtype=torch.float64)
    for seed in range(4):
        n_t, _ = sample_hard_negatives(img, txt, 12.0, labels, impl="torch", seed=seed)  # wrong temperature
        counts += torch.bincount(n_t[:r] - r, minlength=m).double()
    assert chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue < 1e-3


# Negatives spread over the columns so the Triton kernel's running (max, argmax) must merge across column tiles
# (the interpreter's BLOCK_N is 64: columns 3, 70, 140, 200 and 290 lie in five different tiles).
SPREAD = (3, 70, 140, 200, 290)


def _spread_batch(n: int = 300, d: int = 16):
    """n pairs: identical group-0 rows everywhere except the SPREAD columns, which hold distinct ids."""
    gen = torch.Generator().manual_seed(5)
    x_star, t_star = (F.normalize(torch.randn(1, d, generator=gen), dim=1) for _ in range(2))
    img, txt = x_star.repeat(n, 1), t_star.repeat(n, 1)
    labels = torch.zeros(n, dtype=torch.long)
    for i, c in enumerate(SPREAD):
        img[c], txt[c] = (F.normalize(torch.randn(d, generator=gen), dim=0) for _ in range(2))
        labels[c] = i + 1
    return img.to(DEV), txt.to(DEV), labels.to(DEV)


@pytest.mark.parametrize("source", ["torch", "triton", "triton-loss-pass"])
def test_distribution_across_many_column_tiles(source):
    """The merge of per-tile Gumbel maxima is exact: the group-0 rows' draws over negatives that lie in five
    column tiles follow the exact masked softmax (chi-square, p > 0.001), for the sampler and the loss pass."""
    from r2d2ds.kernels import contrastive_loss

    scale = 3.0
    img, txt, labels = _spread_batch()
    rows = (labels == 0).nonzero().squeeze(1).cpu()
    cols = torch.tensor(SPREAD)
    p_t = exact_negative_probs(img[:1], txt, scale, labels[:1], labels)[0, cols].cpu()
    p_i = exact_negative_probs(txt[:1], img, scale, labels[:1], labels)[0, cols].cpu()
    assert p_t.min() > 0.02 and p_i.min() > 0.02 and abs(float(p_t.sum()) - 1) < 1e-9
    counts_t = torch.zeros(len(SPREAD), dtype=torch.float64)
    counts_i = torch.zeros(len(SPREAD), dtype=torch.float64)
    where = {c: i for i, c in enumerate(SPREAD)}
    for seed in range(3):
        if source == "triton-loss-pass":
            _, n_t, n_i = contrastive_loss(img, txt, scale, labels, impl="triton", return_negatives=True,
                                           seed=2000 + seed)
        else:
            n_t, n_i = sample_hard_negatives(img, txt, scale, labels, impl=source, seed=2000 + seed)
        for n, counts in ((n_t, counts_t), (n_i, counts_i)):
            drawn = n.cpu()[rows].tolist()
            assert set(drawn) <= set(SPREAD), "a positive was drawn"
            counts += torch.bincount(torch.tensor([where[c] for c in drawn]), minlength=len(SPREAD)).double()
    for counts, p in ((counts_t, p_t), (counts_i, p_i)):
        stat = chisquare(counts.numpy(), (p * counts.sum()).numpy())
        assert stat.pvalue > 1e-3, f"{source}: counts {counts.tolist()} vs p {p.tolist()} (p={stat.pvalue:.2g})"


def test_triton_draws_do_not_depend_on_the_tiling(monkeypatch):
    """Same seed, column tiles of 64 and of 16 (Philox offsets per group of 4 columns, all four outputs used):
    identical draws, so the loss pass, the sampler and any autotuned tile agree."""
    tk = importlib.import_module("r2d2ds.kernels.contrastive_loss.triton_kernels")
    img, txt, labels = batch(70, 32, seed=8, groups=True)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    a = sample_hard_negatives(img, txt, 0.5, labels, impl="triton", seed=77)
    tiles = {"_INTERPRET_TILE": (32, 16, 16, 4, 1), "_TILES": [(32, 16, 16, 4, 3)]}
    for name, value in tiles.items():
        monkeypatch.setattr(tk, name, value)
    tk.define_kernels()
    try:
        b = sample_hard_negatives(img, txt, 0.5, labels, impl="triton", seed=77)
    finally:
        monkeypatch.undo()
        tk.define_kernels()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_split_and_rows_forwards_draw_the_same(monkeypatch):
    """The split forward (chunks x splits, partial maxima merged) and the previous one-program-per-row-block
    forward draw identical negatives: the draws depend on (seed, row, column) only."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    img, txt, labels = batch(150, 32, seed=9, groups=True)
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_FWD", "split")
    a = sample_hard_negatives(img, txt, 2.0, labels, impl="triton", seed=5)
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_FWD", "rows")
    b = sample_hard_negatives(img, txt, 2.0, labels, impl="triton", seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
