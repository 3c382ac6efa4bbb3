"""FGR's negative strategies (softmax, topk, mixed) and the false-negative guard in one process: each follows
its reference distribution (chi-square, candidates spread over many column tiles), never a positive or an
excluded candidate, -1 without a candidate, seeded reproducibility, and the LossConfig keys' validation.

The same checks over 2 gloo ranks (global draws) are in tests/distributed/test_negative_exchange.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

import r2d2ds  # noqa: F401
from r2d2ds.config import ConfigError, LossConfig
from r2d2ds.losses.negatives import NegativeSampling, negative_probs_reference, sample_negatives

CASES = {
    "softmax": NegativeSampling("softmax"),  # the fused sampler (kernels), learned temperature
    "softmax_T": NegativeSampling("softmax", temperature=0.5),  # its own temperature, still the kernel
    "softmax_guard": NegativeSampling("softmax", guard=True, guard_threshold=0.3),  # blockwise torch
    "topk": NegativeSampling("topk", topk=3),
    "mixed": NegativeSampling("mixed", mixed_uniform=0.3),
    "mixed_guard": NegativeSampling("mixed", mixed_uniform=0.5, guard=True, guard_threshold=0.2),
}


def data(b: int, d: int, seed: int, n_ids: int):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(b, d, generator=g), dim=1)
    ids = torch.randint(0, n_ids, (b,), generator=g)
    return img, txt, ids


def reference_probs(img, txt, ids, scale, cfg):
    """(B, N) exact probabilities of both directions (image -> texts, text -> images)."""
    s = float(cfg.draw_scale(torch.tensor(scale)))
    return (negative_probs_reference(img, txt, txt, s, ids, ids, cfg),
            negative_probs_reference(txt, img, img, s, ids, ids, cfg))


def assert_follows(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> None:
    """counts (R, N) of `draws` draws per row follow probs (R, N): never where p = 0, chi-square p > 0.001.

    Per row, the candidates expected fewer than 5 times are pooled into one bin (the usual chi-square rule)."""
    assert (counts[probs == 0] == 0).all(), "drew a candidate with probability 0 (positive / excluded)"
    obs, exp, rows = [], [], 0
    for c, p in zip(counts.double(), probs * draws):
        if p.sum() == 0:
            continue
        rows += 1
        big, small = p >= 5, (p > 0) & (p < 5)
        obs += c[big].tolist()
        exp += p[big].tolist()
        if small.any():
            obs.append(c[small].sum().item())
            exp.append(p[small].sum().item())
    pval = chisquare(obs, exp, ddof=rows - 1).pvalue
    assert pval > 1e-3, f"chi-square p = {pval:.2e}"


def count_draws(fn, rows: int, n: int, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    c_t = torch.zeros(rows, n, dtype=torch.long)
    c_i = torch.zeros(rows, n, dtype=torch.long)
    r = torch.arange(rows)
    for seed in range(draws):
        nt, ni = fn(seed)
        assert ((nt >= -1) & (nt < n)).all() and ((ni >= -1) & (ni < n)).all()
        c_t[r[nt >= 0], nt[nt >= 0]] += 1
        c_i[r[ni >= 0], ni[ni >= 0]] += 1
    return c_t, c_i


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_follows_its_reference_over_many_tiles(name):
    cfg = CASES[name]
    img, txt, ids = data(12, 6, seed=1, n_ids=9)
    scale, draws = 1.5, 2000
    p_t, p_i = reference_probs(img, txt, ids, scale, cfg)
    c_t, c_i = count_draws(lambda s: sample_negatives(img, txt, torch.tensor(scale), ids, cfg, s, block=5),
                           12, 12, draws)
    assert_follows(c_t, p_t, draws)
    assert_follows(c_i, p_i, draws)
    # No anchor without a candidate here, so every draw landed.
    assert (c_t.sum(1) == draws).all() and (c_i.sum(1) == draws).all()


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_and_tile_independent_validity(name):
    cfg = CASES[name]
    img, txt, ids = data(40, 8, seed=2, n_ids=12)
    a = sample_negatives(img, txt, torch.tensor(5.0), ids, cfg, seed=11, block=7)
    b = sample_negatives(img, txt, torch.tensor(5.0), ids, cfg, seed=11, block=7)
    c = sample_negatives(img, txt, torch.tensor(5.0), ids, cfg, seed=12, block=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    p_t, p_i = reference_probs(img, txt, ids, 5.0, cfg)
    for n, p in zip(a, (p_t, p_i)):
        assert (ids[n] != ids).all(), "a positive was drawn"
        assert (p[torch.arange(40), n] > 0).all()


@pytest.mark.parametrize("name", list(CASES))
def test_rows_without_a_candidate_get_minus_one(name):
    cfg = CASES[name]
    img, txt, _ = data(6, 8, seed=3, n_ids=2)
    same = torch.zeros(6, dtype=torch.long)
    nt, ni = sample_negatives(img, txt, torch.tensor(5.0), same, cfg, seed=0, block=4)
    assert (nt == -1).all() and (ni == -1).all()


def test_guard_excludes_near_duplicates_of_the_anchor_positive():
    """Text 1 duplicates text 0's caption under another id: image 0 must never get it with the guard on."""
    img, txt, _ = data(8, 16, seed=4, n_ids=8)
    txt = txt.clone()
    txt[1] = txt[0]
    img = img.clone()
    img[0] = txt[0]  # and make it the hardest candidate of image 0 by far
    ids = torch.arange(8)
    on = NegativeSampling("softmax", guard=True, guard_threshold=0.95)
    off = NegativeSampling("topk", topk=1)
    got_on = torch.stack([sample_negatives(img, txt, torch.tensor(30.0), ids, on, s)[0][0] for s in range(50)])
    assert (got_on != 1).all()
    assert sample_negatives(img, txt, torch.tensor(30.0), ids, off, 0)[0][0] == 1  # hardest without the guard


@pytest.mark.parametrize("key,value", [("fgr_negatives", "hardest"), ("fgr_negative_scope", "node"),
                                       ("fgr_topk", 0), ("fgr_mixed_uniform", 1.5),
                                       ("fgr_softmax_temperature", -0.1), ("fgr_false_negative_threshold", 2.0)])
def test_loss_config_rejects_bad_sampler_keys(key, value):
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        LossConfig(**{key: value})


def test_defaults_are_the_released_global_softmax():
    lc = LossConfig()
    cfg = NegativeSampling.from_loss_config(lc)
    assert lc.fgr_negative_scope == "global" and cfg.strategy == "softmax" and cfg.uses_kernel()
    assert not cfg.guard and cfg.temperature == 0
