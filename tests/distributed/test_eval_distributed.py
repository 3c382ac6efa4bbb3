"""Retrieval eval on 3 gloo ranks equals the single-process run, and every rank makes the same forward
calls (ZeRO-3 gathers parameters collectively in forward hooks: a rank that skipped a call would hang)."""

from __future__ import annotations

import pytest
import torch

import r2d2ds  # noqa: F401  (torchvision shim first)
from r2d2ds.config import EvalConfig
from r2d2ds.eval import METRIC_KEYS, evaluate
from tests.dist_utils import run_ranks
from tests.test_eval import tiny_model, tiny_split


def _counting(model):
    """Count calls of the three entry points the eval uses (one forward of each submodule per call)."""
    counts = {"encode_image": 0, "encode_text": 0, "itm_logits": 0}
    for name in counts:
        fn = getattr(model, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            counts[_name] += 1
            return _fn(*a, **kw)

        setattr(model, name, wrapped)
    return counts


# (n_img, captions per image, topk, batch_size); on 3 ranks:
SCENARIOS = [
    (7, 2, 3, 2),  # uneven slices (3/2/2 images, 5/5/4 texts), padded batches, k < candidates
    (3, 3, 128, 4),  # k > candidates: everything re-ranked; fewer rows than one batch
    (2, 1, 2, 2),  # 2 images, 2 texts over 3 ranks: rank 2 has no rows at all but joins every forward
]
WORLD = 3


def _eval_on_rank(rank: int, world: int):
    out = []
    for n_img, caps, topk, batch_size in SCENARIOS:  # one spawn for all cases: rank start-up dominates
        model = tiny_model(seed=0)  # same seed on every rank: identical weights
        counts = _counting(model)
        split = tiny_split(n_img=n_img, caps=caps)
        out.append((evaluate(model, split, EvalConfig(topk=topk, batch_size=batch_size)), counts))
    return out


def test_ranks_match_one_process_and_stay_in_lockstep():
    results = run_ranks(_eval_on_rank, WORLD)
    for i, (n_img, caps, topk, batch_size) in enumerate(SCENARIOS):
        single = evaluate(tiny_model(seed=0), tiny_split(n_img=n_img, caps=caps),
                          EvalConfig(topk=topk, batch_size=batch_size))
        for rank in range(WORLD):
            metrics, counts = results[rank][i]
            for stage in ("two_tower", "two_stage"):
                for k in METRIC_KEYS:
                    assert metrics[stage][k] == pytest.approx(single[stage][k], abs=1e-9), (i, rank, stage, k)
            assert metrics["num_images"] == single["num_images"]
            assert metrics["num_texts"] == single["num_texts"]
            # Lockstep: every rank calls every module the same number of times, padding included.
            assert counts == results[0][i][1], (i, rank)
            assert counts["itm_logits"] > 0


def test_rerank_same_scores_across_ranks():
    """The two-stage score matrix rows computed by rank slices equal the single-process rows."""
    from r2d2ds.eval import itm_scorer, rerank
    from r2d2ds.rerank import RerankScore

    model = tiny_model(seed=0).eval()
    split = tiny_split(n_img=5, caps=2)
    with torch.no_grad():
        it, ie = model.encode_image(split.images)
        tt, te = model.encode_text(split.input_ids, split.attention_mask)
        sim = ie @ te.t()
        scorer = itm_scorer(model, it, tt, split.attention_mask, 3, lockstep=True)
        score = RerankScore("fused", 1.0, float(model.logit_scale()))
        full_t2i, _ = rerank(sim, 2, scorer, score)
        a, _ = rerank(sim, 2, scorer, score, text_rows=slice(0, 5), image_rows=slice(0, 3))
        b, _ = rerank(sim, 2, scorer, score, text_rows=slice(5, 10), image_rows=slice(3, 5))
    assert torch.equal(torch.cat([a.order, b.order]), full_t2i.order)
    assert torch.allclose(torch.cat([a.scores, b.scores]), full_t2i.scores, atol=1e-6)
