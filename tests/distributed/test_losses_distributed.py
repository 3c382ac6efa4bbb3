"""Gradient invariant of the objective's contrastive terms under 2 gloo ranks (DESIGN.md section 3).

Each rank holds half of a global batch whose positives (equal image ids) straddle the rank boundary. After the
data-parallel AVERAGE of gradients across ranks, every parameter must hold the gradient of the single-process
loss on the concatenated batch (fp32, tight tolerance). FGR (tests/distributed/test_negative_exchange.py) and
MLM are off here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import r2d2ds  # noqa: F401
from tests.dist_utils import run_ranks
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

IDS = [0, 1, 2, 3, 3, 4, 0, 5]  # ids 0 and 3 have a positive on the other rank
LOSS = dict(gcpr_weight=1.0, tgd_weight=1.0, tgd_alpha=0.4, fgr_weight=0.0, fgd_weight=0.0, mlm_weight=0.0)


def _build():
    from r2d2ds.losses import R2D2Pretraining
    from r2d2ds.models import make_teacher

    torch.manual_seed(0)  # identical initialisation on every rank and in the single-process run
    mc, lc = no_dropout(tiny_model_config()), tiny_loss_config(**LOSS)
    obj = R2D2Pretraining(mc, lc, VOCAB, PAD, MASK, SPECIALS)
    teacher = make_teacher(obj.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return obj, teacher


def _grads(obj, batch, teacher):
    out = obj(batch, teacher, seed=0)
    out["loss"].backward()
    return out, {n: p.grad.detach().clone() for n, p in obj.named_parameters() if p.grad is not None}


def _rank_fn(rank: int, world: int, batch: dict):
    torch.set_num_threads(1)
    b = batch["input_ids"].shape[0] // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    obj, teacher = _build()
    out, grads = _grads(obj, local, teacher)
    for g in grads.values():  # what the engine does: average over data-parallel ranks
        dist.all_reduce(g)
        g /= world
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)

    # The embedding-level statement: d(local loss)/d(local emb) = world * d(global loss)/d(emb rows).
    from r2d2ds.losses import gcpr_loss

    gen = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(2 * b, 16, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(2 * b, 16, generator=gen), dim=-1)
    li = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    lt = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    gcpr_loss(li, lt, torch.tensor(10.0), local["image_id"], impl="torch").backward()
    # FGR with fgr_negative_scope="local" (a one-rank group): local indices, the same draws as one process.
    from r2d2ds.losses import pick_negatives
    from r2d2ds.losses.fgr import fgr_group

    negs = pick_negatives(li, lt, torch.tensor(10.0), local["image_id"], 9, group=fgr_group("local"))
    return {"grads": grads, "loss": loss / world, "emb_grads": (li.grad / world, lt.grad / world, img, txt),
            "negatives": negs}


_CACHE: dict = {}


def _results(batch):
    """One 2-rank run serves both tests (spawning ranks costs seconds of imports)."""
    if "r" not in _CACHE:
        _CACHE["r"] = run_ranks(_rank_fn, 2, batch)
    return _CACHE["r"]


def test_contrastive_terms_gradient_invariant_two_ranks():
    batch = tiny_batch(b=8, length=10, ids=IDS)
    results = _results(batch)
    obj, teacher = _build()
    out, ref = _grads(obj, batch, teacher)
    for r in results:  # every rank holds the same averaged gradient
        assert abs(r["loss"].item() - out["loss"].item()) < 1e-6 * max(1.0, out["loss"].item())
        assert set(r["grads"]) == set(ref)
        for name, g in ref.items():
            # fp32; the only differences are summation order across the rank split
            atol = 1e-6 + 1e-5 * g.abs().max().item()
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=atol, msg=name)
    assert ref["model.temperature.log_tau"].abs().item() > 0  # the scale's gradient is part of the check

    from r2d2ds.losses import gcpr_loss

    _, _, img, txt = results[0]["emb_grads"]
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    gcpr_loss(img, txt, torch.tensor(10.0), batch["image_id"], impl="torch").backward()
    got_img = torch.cat([r["emb_grads"][0] for r in results])
    got_txt = torch.cat([r["emb_grads"][1] for r in results])
    torch.testing.assert_close(got_img, img.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_txt, txt.grad, rtol=1e-5, atol=1e-7)


def test_fgr_local_scope_negatives_stay_local_under_two_ranks():
    """Reuses the ranks' results: with fgr_negative_scope="local" each rank's negatives index its own batch and
    match a one-process draw (the global default is tested in test_negative_exchange.py)."""
    from r2d2ds.losses import pick_negatives

    batch = tiny_batch(b=8, length=10, ids=IDS)
    results = _results(batch)
    b = 4
    for rank, r in enumerate(results):
        _, _, img, txt = r["emb_grads"]
        ids = batch["image_id"][rank * b:(rank + 1) * b]
        sl = slice(rank * b, (rank + 1) * b)
        expect = pick_negatives(img[sl], txt[sl], torch.tensor(10.0), ids, 9)
        for got, exp in zip(r["negatives"], expect):
            assert torch.equal(got, exp)
            ok = got >= 0
            assert ((got < b) | ~ok).all() and (ids[got.clamp(min=0)] != ids)[ok].all()
