"""FGR's global hard negatives on 1, 2 and 3 gloo ranks: the draws follow the exact masked GLOBAL distribution
of every strategy, the token exchange returns the owner's rows and routes gradients back to the owner, and FGR
through the model gives every parameter the gradient of a single process that gathers everything.

The single-process reference: hold the whole batch, index each rank's pairs by the global indices the ranks
drew, loss = (1 / W) sum_r loss_r (what the engine's gradient AVERAGE over ranks produces)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import r2d2ds  # noqa: F401
from tests.dist_utils import run_ranks
from tests.losses.test_negatives import CASES, assert_follows, data, reference_probs
from tests.models.tiny import VOCAB, no_dropout, tiny_batch, tiny_model_config

B_LOCAL, D, DRAWS = 6, 6, 400
SAMPLER_CASES = ["softmax", "topk", "mixed_guard"]


def _sampler_rank(rank: int, world: int, names: list[str]):
    from r2d2ds.losses.negatives import sample_negatives

    img, txt, ids = data(B_LOCAL * world, D, seed=5, n_ids=8)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    n = B_LOCAL * world
    out = {}
    for name in names:
        c_t = torch.zeros(B_LOCAL, n, dtype=torch.long)
        c_i = torch.zeros(B_LOCAL, n, dtype=torch.long)
        rows = torch.arange(B_LOCAL)
        for seed in range(DRAWS):  # the same seed on every rank: ranks must still draw independently
            nt, ni = sample_negatives(img[sl], txt[sl], torch.tensor(1.5), ids[sl], CASES[name], seed, block=4)
            c_t[rows[nt >= 0], nt[nt >= 0]] += 1
            c_i[rows[ni >= 0], ni[ni >= 0]] += 1
        again = sample_negatives(img[sl], txt[sl], torch.tensor(1.5), ids[sl], CASES[name], 7, block=4)
        first = sample_negatives(img[sl], txt[sl], torch.tensor(1.5), ids[sl], CASES[name], 7, block=4)
        out[name] = (c_t, c_i, torch.equal(again[0], first[0]) and torch.equal(again[1], first[1]))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_draws_follow_the_exact_masked_global_distribution(world):
    names = SAMPLER_NAMES[world]
    results = [r["sampler"] for r in _results(world)]
    img, txt, ids = data(B_LOCAL * world, D, seed=5, n_ids=8)
    for name in names:
        p_t, p_i = reference_probs(img, txt, ids, 1.5, CASES[name])
        c_t = torch.cat([r[name][0] for r in results])
        c_i = torch.cat([r[name][1] for r in results])
        assert_follows(c_t, p_t, DRAWS)  # rows of every rank over the columns of every rank (global)
        assert_follows(c_i, p_i, DRAWS)
        assert all(r[name][2] for r in results), "same seed, different draws"
        # Every rank drew from the other ranks' columns too (not a local sampler).
        for rank in range(world if world > 1 else 0):
            own = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            assert results[rank][name][0].sum() > results[rank][name][0][:, own].sum()


def _token_table(n: int):
    """The global batch's 'tokens' as a deterministic function of the row: (N, 3, 2) image-like, (N, 4) mask."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 2, generator=g), torch.randint(0, 2, (n, 4), generator=g)


def _requests(rank: int, world: int, pattern: str) -> torch.Tensor:
    n = B_LOCAL * world
    g = torch.Generator().manual_seed(100 + rank)
    if pattern == "skewed":  # every rank asks rank 0 only, with repeats
        return torch.randint(0, B_LOCAL, (2 * B_LOCAL,), generator=g)
    if pattern == "unequal":  # rank r asks 3 r rows: rank 0 asks nothing but must still take part
        return torch.randint(0, n, (3 * rank,), generator=g)
    return torch.randint(0, n, (B_LOCAL,), generator=g)


def _exchange_rank(rank: int, world: int, pattern: str):
    from r2d2ds.distributed.collectives import gather_sizes
    from r2d2ds.distributed.exchange import fetch_rows

    tokens, mask = _token_table(B_LOCAL * world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    local = tokens[sl].clone().requires_grad_(True)
    idx = _requests(rank, world, pattern)
    sizes = gather_sizes(B_LOCAL)
    (got, got_mask), plan = fetch_rows(idx, [local, mask[sl]], sizes)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(200 + rank))
    (w * got).sum().backward()
    return {"got": got.detach(), "mask": got_mask, "grad": local.grad, "w": w, "idx": idx,
            "recv": plan.rows_received, "sent": plan.rows_sent}


@pytest.mark.parametrize("world,pattern", [(1, "random"), (2, "random"), (2, "skewed"), (3, "skewed"),
                                           (3, "unequal")])
def test_exchange_returns_owner_rows_and_routes_gradients_back(world, pattern):
    results = [r["exchange"][pattern] for r in _results(world)]
    tokens, mask = _token_table(B_LOCAL * world)
    ref = tokens.clone().requires_grad_(True)
    total = 0
    for rank, r in enumerate(results):
        assert torch.equal(r["got"], tokens[r["idx"]]) and torch.equal(r["mask"], mask[r["idx"]])
        total = total + (r["w"] * ref[r["idx"]]).sum()
        # Deduplicated: a rank receives each distinct remote row once.
        uniq = torch.unique(r["idx"])
        remote = ((uniq < rank * B_LOCAL) | (uniq >= (rank + 1) * B_LOCAL)).sum().item()
        assert r["recv"] == remote
    total.backward()
    grad = torch.cat([r["grad"] for r in results])
    torch.testing.assert_close(grad, ref.grad, rtol=1e-6, atol=1e-6)
    assert sum(r["sent"] for r in results) == sum(r["recv"] for r in results)


def _model():
    from r2d2ds.models import R2D2

    torch.manual_seed(0)
    return R2D2(no_dropout(tiny_model_config()), VOCAB)


IDS = [0, 1, 2, 3, 3, 4, 0, 5, 6, 7, 8, 9]  # ids 0 and 3 straddle ranks


def _fgr_rank(rank: int, world: int, batch: dict):
    from r2d2ds.losses.fgr import fgr_loss, pick_negatives

    b = batch["input_ids"].shape[0] // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    m = _model()
    it, ie = m.encode_image(local["image"])
    tt, te = m.encode_text(local["input_ids"], local["attention_mask"])
    scale = m.logit_scale()
    negs = pick_negatives(ie, te, scale, local["image_id"], seed=3)
    loss, stats = fgr_loss(m, it, tt, local["attention_mask"], ie, te, scale, local["image_id"], 3, (1.0, 2.0),
                           negatives=negs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    for g in grads.values():  # the engine's data-parallel AVERAGE
        dist.all_reduce(g)
        g /= world
    return {"loss": loss.detach(), "negs": negs, "grads": grads, "stats": stats}


def _reference_fgr(batch: dict, world: int, negs: list):
    """One process, every token at hand: each rank's pairs by global index, (1/W) sum of the rank losses."""
    from r2d2ds.losses.fgr import weighted_itm_loss

    m = _model()
    it, _ = m.encode_image(batch["image"])
    tt, _ = m.encode_text(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    b = it.shape[0] // world
    total, losses = 0.0, []
    for r, (nt, ni) in enumerate(negs):
        own = torch.arange(r * b, (r + 1) * b)
        nt_c, ni_c = torch.where(nt >= 0, nt, own), torch.where(ni >= 0, ni, own)
        img = torch.cat([it[own], it[own], it[ni_c]])
        txt = torch.cat([tt[own], tt[nt_c], tt[own]])
        msk = torch.cat([mask[own], mask[nt_c], mask[own]])
        target = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
        valid = torch.cat([torch.ones(b, dtype=torch.bool), nt >= 0, ni >= 0])
        tq, iq = m.itm_logits(img, txt, msk)
        loss = 0.5 * (weighted_itm_loss(tq, target, valid, (1.0, 2.0)) + weighted_itm_loss(iq, target, valid,
                                                                                               (1.0, 2.0)))
        losses.append(loss.detach())
        total = total + loss / world
    total.backward()
    return losses, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fgr_gradients_reach_owner_towers_like_one_process(world):
    batch = _fgr_batch(world)
    results = [r["fgr"] for r in _results(world)]
    ids = batch["image_id"]
    for rank, r in enumerate(results):
        for n in r["negs"]:
            assert (ids[n] != ids[rank * 4:(rank + 1) * 4]).all(), "a positive was drawn"
    ref_losses, ref = _reference_fgr(batch, world, [r["negs"] for r in results])
    for r, want in zip(results, ref_losses):
        torch.testing.assert_close(r["loss"], want, rtol=1e-5, atol=1e-6)
    assert ref["image_tower.body.patch_embed.proj.weight"].abs().sum() > 0
    assert ref["text_tower.body.embeddings.word_embeddings.weight"].abs().sum() > 0
    for r in results:
        assert set(r["grads"]) == set(ref)
        for name, g in ref.items():
            atol = 1e-6 + 1e-5 * g.abs().max().item()  # fp32; summation order differs across the split
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=atol, msg=name)
    # Counters: remote fraction as drawn; bytes received = distinct remote rows x row bytes.
    for rank, r in enumerate(results):
        negs = torch.cat(r["negs"])
        ok = negs >= 0
        remote = ok & ((negs < rank * 4) | (negs >= rank * 4 + 4))
        assert r["stats"]["fgr/remote_frac"].item() == pytest.approx(remote.sum().item() / ok.sum().item())
        assert r["stats"]["fgr/bytes_recv"].item() > 0 or remote.sum().item() == 0
    assert sum(r["stats"]["fgr/bytes_sent"].item() for r in results) == \
        sum(r["stats"]["fgr/bytes_recv"].item() for r in results)


def _fgr_batch(world: int) -> dict:
    return tiny_batch(b=4 * world, length=10, ids=IDS[:4 * world])


PATTERNS = {1: ["random"], 2: ["random", "skewed"], 3: ["skewed", "unequal"]}
SAMPLER_NAMES = {1: ["mixed_guard"], 2: SAMPLER_CASES, 3: ["softmax"]}


def _rank_fn(rank: int, world: int):
    """Everything a world size checks, in one spawn (starting ranks costs seconds of imports each)."""
    return {"sampler": _sampler_rank(rank, world, SAMPLER_NAMES[world]),
            "exchange": {p: _exchange_rank(rank, world, p) for p in PATTERNS[world]},
            "fgr": _fgr_rank(rank, world, _fgr_batch(world))}


_CACHE: dict[int, list] = {}


def _results(world: int) -> list:
    if world not in _CACHE:
        _CACHE[world] = run_ranks(_rank_fn, world)
    return _CACHE[world]


def test_single_process_fgr_uses_no_exchange():
    """No process group at all: the same code path, global indices are local ones, zero bytes moved."""
    from r2d2ds.losses.fgr import fgr_loss

    m = _model()
    batch = tiny_batch(b=4, ids=[0, 1, 2, 2])
    it, ie = m.encode_image(batch["image"])
    tt, te = m.encode_text(batch["input_ids"], batch["attention_mask"])
    _, stats = fgr_loss(m, it, tt, batch["attention_mask"], ie, te, m.logit_scale(), batch["image_id"], 0, (1, 2))
    assert stats["fgr/bytes_recv"].item() == 0 and stats["fgr/remote_frac"].item() == 0
