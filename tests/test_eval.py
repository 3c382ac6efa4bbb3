"""Retrieval evaluation: recall from known ranks, re-rank semantics, end to end on a tiny random R2D2, the
table, the JSON file and the command's errors. 2 ranks vs 1: tests/distributed/test_eval_distributed.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import r2d2ds  # noqa: F401  (torchvision shim first)
from r2d2ds.config import EvalConfig, ModelConfig
from r2d2ds.eval import (
    METRIC_KEYS,
    best_weight,
    format_table,
    hit_positions_i2t,
    hit_positions_t2i,
    main,
    recalls,
    rerank,
    shard,
    write_eval_json,
)
from r2d2ds.rerank import RerankScore


def tiny_model_config() -> ModelConfig:
    return ModelConfig(image_model="vit_tiny_patch16_224",
                       image_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
                                     "num_heads": 2},
                       text_model="config",
                       text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 64, "max_position_embeddings": 64},
                       cross_layers=1, cross_heads=2, embed_dim=16, cross_dropout=0.0, attention_impl="torch")


def tiny_model(seed: int = 0, vocab_size: int = 40):
    from r2d2ds.models import R2D2

    torch.manual_seed(seed)
    return R2D2(tiny_model_config(), vocab_size=vocab_size, pad_token_id=0)


def tiny_split(n_img: int = 7, caps: int = 2, seed: int = 1, vocab_size: int = 40, length: int = 8):
    """Random images and token ids in the shape load_retrieval_split returns; `caps` captions per image."""
    g = torch.Generator().manual_seed(seed)
    n_txt = n_img * caps
    ids = torch.randint(5, vocab_size, (n_txt, length), generator=g)
    lens = torch.randint(3, length + 1, (n_txt,), generator=g)
    mask = (torch.arange(length)[None] < lens[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 2  # [CLS]
    return SimpleNamespace(images=torch.randn(n_img, 3, 32, 32, generator=g), input_ids=ids,
                           attention_mask=mask, text_to_image=torch.arange(n_img).repeat_interleave(caps),
                           image_keys=[f"img{i}" for i in range(n_img)])


# ------------------------------------------------------------------------------------------------ recall


def test_recall_from_hand_made_sim():
    # 4 images, 6 texts; text t belongs to image gt[t]. sim (N_img, T), columns chosen so ranks are known.
    gt = torch.tensor([0, 0, 1, 2, 3, 3])
    sim = torch.tensor([
        #  t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.0, 0.8, 0.0, 0.5],  # img0
        [0.1, 0.2, 0.9, 0.7, 0.6, 0.4],  # img1
        [0.0, 0.3, 0.1, 0.6, 0.9, 0.3],  # img2
        [0.2, 0.4, 0.2, 0.5, 0.1, 0.2],  # img3
    ])
    # t2i positions of the own image: t0 -> img0 first (0); t1 -> img0 is last of [0.4,0.3,0.2,0.1] (3);
    # t2 -> img1 first (0); t3 -> img2 third (0.8, 0.7, 0.6) (2); t4 -> img3 after img2, img1 (2);
    # t5 -> img3 last (3).
    order_t2i = torch.sort(sim.t(), dim=1, descending=True, stable=True).indices
    t2i = hit_positions_t2i(order_t2i, gt)
    assert t2i.tolist() == [0, 3, 0, 2, 2, 3]
    # i2t, any caption counts: img0 row [.9 t0, .8 t3, .5 t5, ...] -> t0 (own) at 0; img1 [.9 t2] -> 0;
    # img2 row [.9 t4, .6 t3 (own)] -> 1; img3 row [.5 t3, .4 t1, .2 t0/t2/t5 ...]: t5 own; ties broken by
    # index: t0 (2), t2 (3), t5 (4) -> 4.
    order_i2t = torch.sort(sim, dim=1, descending=True, stable=True).indices
    i2t = hit_positions_i2t(order_i2t, torch.arange(4), gt)
    assert i2t.tolist() == [0, 0, 1, 4]
    r = recalls(t2i, i2t, ks=(1, 3, 5))
    assert r["t2i_r1"] == pytest.approx(100 * 2 / 6)
    assert r["t2i_r3"] == pytest.approx(100 * 4 / 6)
    assert r["t2i_r5"] == pytest.approx(100.0)
    assert r["i2t_r1"] == pytest.approx(50.0)
    assert r["i2t_r3"] == pytest.approx(75.0)
    assert r["i2t_r5"] == pytest.approx(100.0)
    assert r["mr"] == pytest.approx((200 / 6 + 400 / 6 + 100 + 50 + 75 + 100) / 6)


def test_i2t_skips_images_without_captions():
    order = torch.tensor([[1, 0], [0, 1]])  # 2 image queries over 2 texts
    pos = hit_positions_i2t(order, torch.tensor([0, 1]), text_to_image=torch.tensor([0, 0]))
    assert pos.tolist() == [0, -1]
    r = recalls(torch.tensor([0, 1]), pos, ks=(1,))
    assert r["i2t_r1"] == 100.0  # only image 0 counts
    assert r["t2i_r1"] == 50.0


def test_shard_covers_range_contiguously():
    for n in (0, 1, 5, 7, 64):
        for world in (1, 2, 3, 8):
            parts = [shard(n, world, r) for r in range(world)]
            assert [i for s in parts for i in range(s.start, s.stop)] == list(range(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------------------------------------ re-rank


SIM_6x3 = torch.tensor([[0.60, 0.10, 0.20],
                        [0.50, 0.20, 0.30],
                        [0.40, 0.30, 0.10],
                        [0.30, 0.40, 0.00],
                        [0.20, 0.50, 0.40],
                        [0.10, 0.60, 0.50]])  # (N_img, T)


def _log_odds(n_txt: int, n_img: int, seed: int = 0) -> torch.Tensor:
    """Hand-built (T, N_img, 2) ITM log-odds of every (text, image) pair, one column per head."""
    return torch.randn(n_txt, n_img, 2, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("score", [RerankScore("released"), RerankScore("fused", 0.5, 10.0),
                                   RerankScore("fused", 0.0, 10.0)])
def test_rerank_reorders_topk_by_the_score_and_keeps_the_rest(score):
    sim = SIM_6x3
    n_img, n_txt = sim.shape
    lo = _log_odds(n_txt, n_img)
    # Text 0: image 2 has by far the best ITM; image 5 even better but it is outside the top-3.
    lo[0] = torch.tensor([[-4.0, -4.0], [-3.0, -3.0], [4.0, 4.0], [-4.0, -4.0], [-4.0, -4.0], [9.0, 9.0]])
    calls = []

    def scorer(txt_idx, img_idx):
        calls.append(torch.stack([txt_idx, img_idx], 1))
        return lo[txt_idx, img_idx]

    def expected(s, itm):  # the module docstring's formulas, written out
        if score.mode == "released":
            return s + torch.sigmoid(itm).mean(-1)
        return itm.mean(-1) + score.weight * score.logit_scale * s

    t2i, i2t = rerank(sim, 3, scorer, score)
    # Text 0: image 2 jumps ahead; the rest 3,4,5 stay in pre-order although image 5 has the top ITM.
    assert t2i.order[0, 0].item() == 2 and t2i.order[0, 3:].tolist() == [3, 4, 5]
    assert t2i.pre_order[0].tolist() == [0, 1, 2, 3, 4, 5]
    for q in range(n_txt):
        pre = torch.sort(sim[:, q], descending=True, stable=True).indices
        top, rest = pre[:3], pre[3:]
        new = expected(sim[top, q], lo[q, top])
        expect = top[torch.sort(new, descending=True, stable=True).indices].tolist() + rest.tolist()
        assert t2i.order[q].tolist() == expect
        assert torch.allclose(t2i.scores[q, top], new)
        assert t2i.scores[q, rest].max() <= t2i.scores[q, top].min()  # scores order like `order`
        assert torch.equal(torch.sort(t2i.scores[q, rest], descending=True, stable=True).indices,
                           torch.arange(3))  # the rest keeps its pre-rank order in the scores too
        if score.mode == "released":
            assert torch.equal(t2i.scores[q, rest], sim[rest, q])
    for i in range(n_img):
        pre = torch.sort(sim[i], descending=True, stable=True).indices
        top = pre[:3]
        new = expected(sim[i, top], lo[top, i])
        expect = top[torch.sort(new, descending=True, stable=True).indices].tolist() + pre[3:].tolist()
        assert i2t.order[i].tolist() == expect
    # Each candidate pair scored exactly once, though many are candidates in both directions.
    pairs = torch.cat(calls)
    assert len({tuple(p) for p in pairs.tolist()}) == pairs.shape[0]
    assert pairs.shape[0] < n_txt * 3 + n_img * 3


def test_rerank_k_larger_than_candidates_and_query_slices():
    sim = torch.randn(4, 5)
    lo = _log_odds(5, 4)
    scorer = lambda t, i: lo[t, i]
    score = RerankScore("fused", 1.0, 5.0)
    full_t2i, full_i2t = rerank(sim, 128, scorer, score)  # k = min(128, 4 images) / min(128, 5 texts)
    assert full_t2i.order.shape == (5, 4) and full_i2t.order.shape == (4, 5)
    expect = torch.sort(lo.mean(-1) + 5.0 * sim.t(), dim=1, descending=True, stable=True).indices
    assert torch.equal(full_t2i.order, expect)  # everything re-ranked
    part_t2i, part_i2t = rerank(sim, 128, scorer, score, text_rows=slice(2, 5), image_rows=slice(1, 2))
    assert torch.equal(part_t2i.order, full_t2i.order[2:5])
    assert torch.equal(part_i2t.order, full_i2t.order[1:2])


def test_reorder_matches_a_fresh_rerank_and_the_weight_moves_between_the_stages():
    """Ranking.reorder (the calibration sweep) gives exactly what re-ranking with that score gives; w = 0 is
    the ITM order alone and a large w gives back the towers' order."""
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(9, 12, generator=g)
    lo = _log_odds(12, 9, seed=4)
    scorer = lambda t, i: lo[t, i]
    t2i, i2t = rerank(sim, 4, scorer, RerankScore("fused", 1.0, 20.0))
    for w in (0.0, 0.3, 2.0):
        s = RerankScore("fused", w, 20.0)
        f_t2i, f_i2t = rerank(sim, 4, scorer, s)
        assert torch.equal(t2i.reorder(s), f_t2i.order) and torch.equal(i2t.reorder(s), f_i2t.order)
    itm_only = t2i.reorder(RerankScore("fused", 0.0, 20.0))
    by_itm = torch.sort(lo.mean(-1).gather(1, t2i.cand), dim=1, descending=True, stable=True).indices
    assert torch.equal(itm_only[:, :4], t2i.cand.gather(1, by_itm))
    assert torch.equal(t2i.reorder(RerankScore("fused", 1e6, 20.0)), t2i.pre_order)


def test_rerank_score_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        RerankScore("sum")
    with pytest.raises(ValueError, match="weight"):
        RerankScore("fused", float("inf"))
    with pytest.raises(ValueError, match="weight"):
        RerankScore("fused", -1.0)


def test_best_weight_takes_the_best_mr_and_breaks_ties_towards_the_towers():
    assert best_weight([[0.0, 70.0], [1.0, 82.0], [4.0, 81.0]]) == 1.0
    assert best_weight([[0.5, 80.0], [2.0, 82.0], [8.0, 82.0], [16.0, 79.0]]) == 8.0
    with pytest.raises(ValueError):
        best_weight([])


# ------------------------------------------------------------------------------------------------ end to end


def test_evaluate_tiny_model_end_to_end():
    from r2d2ds.eval import evaluate, itm_scorer

    model = tiny_model()
    model.train()
    split = tiny_split(n_img=7, caps=2)
    cfg = EvalConfig(topk=3, batch_size=4)
    m = evaluate(model, split, cfg)
    assert model.training  # mode restored
    assert m["num_images"] == 7 and m["num_texts"] == 14 and m["topk"] == 3
    for stage in ("two_tower", "two_stage"):
        assert set(m[stage]) == set(METRIC_KEYS)
        for k in METRIC_KEYS:
            assert 0.0 <= m[stage][k] <= 100.0
        r = m[stage]
        assert r["t2i_r1"] <= r["t2i_r5"] <= r["t2i_r10"] and r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"]
        assert r["t2i_r10"] == 100.0 and r["i2t_r10"] == 100.0  # only 7 images: every one is in the top 10
    # Recompute both stages by hand from the model's own outputs.
    model.eval()
    with torch.no_grad():
        img_tok, img_emb = model.encode_image(split.images)
        txt_tok, txt_emb = model.encode_text(split.input_ids, split.attention_mask)
        sim = img_emb.float() @ txt_emb.float().t()
        scale = float(model.logit_scale())
        score = RerankScore(cfg.rerank, cfg.rerank_weight, scale)
        t2i, i2t = rerank(sim, 3, itm_scorer(model, img_tok, txt_tok, split.attention_mask, 5), score)
    gt = split.text_to_image
    for stage, field in (("two_tower", "pre_order"), ("two_stage", "order")):
        expect = recalls(hit_positions_t2i(getattr(t2i, field), gt),
                         hit_positions_i2t(getattr(i2t, field), torch.arange(7), gt))
        for k in METRIC_KEYS:
            assert m[stage][k] == pytest.approx(expect[k]), (stage, k)
    # The score of a re-ranked pair is the mean of both ITM heads' log-odds + w x logit scale x sim.
    t, i = 0, int(t2i.order[0, 0])
    with torch.no_grad():
        tq, iq = model.itm_logits(img_tok[i:i + 1], txt_tok[t:t + 1], split.attention_mask[t:t + 1])
    lo = ((tq[0, 1] - tq[0, 0]) + (iq[0, 1] - iq[0, 0])) / 2
    assert m["rerank"] == {"mode": "fused", "weight": cfg.rerank_weight, "logit_scale": pytest.approx(scale)}
    assert t2i.scores[0, i].item() == pytest.approx(lo.item() + cfg.rerank_weight * scale * sim[i, 0].item(),
                                                    abs=1e-4)
    # The sweep re-scores the same pairs: its entry at the configured w is the two-stage MR itself.
    by_w = dict((w, mr) for w, mr in m["two_stage_mr_by_weight"])
    assert list(by_w) == list(cfg.rerank_weights)
    assert by_w[cfg.rerank_weight] == pytest.approx(m["two_stage"]["mr"])


def test_evaluate_calibrated_chooses_the_weight_on_the_calibration_split_only():
    from r2d2ds.eval import evaluate, evaluate_calibrated

    model = tiny_model()
    test_split, cal_split = tiny_split(n_img=7, caps=2, seed=1), tiny_split(n_img=6, caps=2, seed=9)
    cfg = EvalConfig(topk=4, batch_size=4, calibration_split="val", rerank_weights=(0.0, 0.5, 2.0, 8.0))
    m = evaluate_calibrated(model, test_split, cfg, cal_split)
    cal = evaluate(model, cal_split, cfg)
    w = best_weight(cal["two_stage_mr_by_weight"])
    assert m["calibration"]["weight"] == w and m["rerank"]["weight"] == w
    assert m["calibration"]["two_stage_mr_by_weight"] == cal["two_stage_mr_by_weight"]
    again = evaluate(model, test_split, cfg, weight=w)
    assert m["two_stage"] == again["two_stage"] and m["two_tower"] == again["two_tower"]
    # Released scores have no weight to choose: nothing is calibrated.
    rel = EvalConfig(topk=4, batch_size=4, rerank="released", calibration_split="val")
    assert "calibration" not in evaluate_calibrated(model, test_split, rel, cal_split)


def test_calibration_records_the_split_mr_at_the_chosen_weight():
    """metrics["calibration"]["two_stage_mr"] is the calibration split's MR at the w it chose, not at the configured
    eval.rerank_weight (which the calibration pass scores its two_stage row with)."""
    from r2d2ds.eval import evaluate, evaluate_calibrated

    model = tiny_model()
    test_split, cal_split = tiny_split(n_img=7, caps=2, seed=1), tiny_split(n_img=6, caps=2, seed=2)
    cfg = EvalConfig(topk=8, batch_size=8, calibration_split="val", rerank_weights=(0.0, 0.5, 2.0, 8.0))
    plain = evaluate(model, cal_split, cfg)
    curve = dict(plain["two_stage_mr_by_weight"])
    assert plain["two_stage"]["mr"] != max(curve.values())  # the two readings differ here
    cal = evaluate_calibrated(model, test_split, cfg, cal_split)["calibration"]
    assert cal["two_stage_mr"] == curve[cal["weight"]] == max(curve.values())


# ------------------------------------------------------------------------------------------------ reporting


def _metrics():
    stage = {k: float(i) * 10 for i, k in enumerate(METRIC_KEYS)}
    return {"two_tower": stage, "two_stage": {k: v + 1 for k, v in stage.items()}, "num_images": 7,
            "num_texts": 14, "topk": 128}


def test_format_table_rows_and_columns():
    text = format_table(_metrics())
    lines = text.splitlines()
    assert "t2i R@1" in lines[1] and "i2t R@1" in lines[1] and "MR" in lines[1]
    assert lines[3].startswith("two-tower") and lines[4].startswith("two-stage")
    assert "60.00" in lines[3] and "61.00" in lines[4]  # MR column


def test_write_eval_json_atomic(tmp_path):
    path = tmp_path / "sub" / "eval.json"
    write_eval_json(_metrics(), path)
    assert json.loads(path.read_text())["two_stage"]["mr"] == 61.0
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temp file left behind


def test_cli_names_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_export"
    assert main(["--model", str(missing), "--data", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
