"""GradCache (r2d2ds/losses/gradcache.py) gives the parameter gradients of one step on the whole batch.

2 gloo ranks, each holding 8 rows of a 16-row global batch whose positives straddle the rank boundary. After the
data-parallel AVERAGE of gradients, every parameter must hold the gradient of the reference step (fp32, tight
tolerance). The engine is a stand-in here (forward = the module, backward = autograd); the real DeepSpeed engine
under ZeRO 1/2/3 is tests/training/test_gradcache_engine.py. All cases run in ONE spawned 2-rank job.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

import r2d2ds  # noqa: F401
from r2d2ds.config import Config, ConfigError, DataConfig, LossConfig, TrainConfig
from tests.dist_utils import run_ranks
from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, no_dropout, tiny_batch, tiny_loss_config, tiny_model_config

IDS = [0, 1, 2, 3, 3, 4, 0, 5, 6, 7, 8, 8, 9, 1, 10, 11]  # ids 0, 1 and 3 have positives on the other rank
ROWS = 8  # per rank
GCPR = dict(gcpr_weight=1.0, tgd_weight=0.0, fgr_weight=0.0, fgd_weight=0.0, mlm_weight=0.0)
GCPR_TGD = dict(GCPR, tgd_weight=1.0, tgd_alpha=0.4)
FULL = dict(gcpr_weight=1.0, tgd_weight=1.0, tgd_alpha=0.4, fgr_weight=1.0, fgd_weight=0.5, mlm_weight=1.0)
SEED = 1234


class _Engine:
    """What GradCache needs of a DeepSpeed engine, without one: forward, backward, step, module; `loss_scale`
    multiplies every backward's loss as fp16 loss scaling does (the caller divides the gradients back)."""

    def __init__(self, module, loss_scale: float = 1.0):
        self.module = module
        self.optimizer = type("Opt", (), {"loss_scale": loss_scale})()
        self.micro_steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False  # the chunk losses already sum to the batch loss
        (loss * self.optimizer.loss_scale).backward()
        self.micro_steps += 1

    def step(self):
        pass


def _build(loss: dict, dropout: bool, ckpt: str = "none"):
    from r2d2ds.losses import R2D2Pretraining
    from r2d2ds.models import make_teacher

    torch.manual_seed(0)  # identical initialisation on every rank
    mc = tiny_model_config(image_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                             proj_drop_rate=0.1), activation_checkpointing=ckpt)
    mc = mc if dropout else no_dropout(tiny_model_config(activation_checkpointing=ckpt))
    obj = R2D2Pretraining(mc, tiny_loss_config(**loss), VOCAB, PAD, MASK, SPECIALS)
    teacher = make_teacher(obj.model) if obj.uses_teacher() else None
    if teacher is not None:  # a teacher that differs from the student, so TgD/FgD are not trivial
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return obj, teacher


def _averaged_grads(obj, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in obj.named_parameters():
        if p.grad is not None:
            g = p.grad.detach().clone()
            dist.all_reduce(g)  # what the engine does: average over data-parallel ranks (and unscale)
            out[n] = g / (dist.get_world_size() * loss_scale)
    return out


def _reference(loss: dict, batch: dict) -> dict[str, torch.Tensor]:
    """One-shot objective on the rank batch (no dropout), one backward."""
    obj, teacher = _build(loss, dropout=False)
    obj(batch, teacher, SEED)["loss"].backward()
    return _averaged_grads(obj)


def _chunked_reference(loss: dict, batch: dict, chunk: int, rng_seed: int,
                       ckpt: str = "none") -> dict[str, torch.Tensor]:
    """With dropout: the towers run chunk by chunk WITH gradient (the dropout masks GradCache's pass 1 draws from
    the same starting RNG state), the contrastive terms on the concatenation, one backward over everything."""
    from r2d2ds.losses import gcpr_loss, tgd_loss

    obj, teacher = _build(loss, dropout=True, ckpt=ckpt)
    model, lc = obj.model, obj.loss_cfg
    torch.manual_seed(rng_seed)
    img, txt = [], []
    for s in range(0, ROWS, chunk):
        sl = slice(s, s + chunk)
        img.append(model.encode_image(batch["image"][sl])[1])
        txt.append(model.encode_text(batch["input_ids"][sl], batch["attention_mask"][sl])[1])
    img, txt, scale = torch.cat(img), torch.cat(txt), model.logit_scale()
    a = lc.tgd_alpha if lc.tgd_weight > 0 else 0.0
    total = (1 - a) * lc.gcpr_weight * gcpr_loss(img, txt, scale, batch["image_id"], impl="torch")
    if a:
        with torch.no_grad():
            ti = teacher.encode_image(batch["image"])[1]
            tt = teacher.encode_text(batch["input_ids"], batch["attention_mask"])[1]
        total = total + a * lc.tgd_weight * tgd_loss(img, txt, scale, batch["image_id"], ti, tt, impl="torch")
    total.backward()
    return _averaged_grads(obj)


def _chunked_full_reference(loss: dict, batch: dict, chunk: int, rng_seed: int) -> dict[str, torch.Tensor]:
    """The full loss with dropout, everything in ONE graph and one backward, drawing dropout in the order the
    "cached" mode draws it: the towers chunk by chunk (pass 1's masks, replayed in pass 3), then both cross
    encoders on each chunk's pairs (pass 2), then each chunk's masked-text tower and text-query encoder (pass 3).
    A negative's tokens are its row's tokens, as in the one-shot objective (`build_itm_pairs` on the whole
    batch, its all-to-all carrying the gradient to the owner rank)."""
    from r2d2ds.losses import gcpr_loss, tgd_loss
    from r2d2ds.losses.distill import fgd_loss
    from r2d2ds.losses.fgr import build_itm_pairs, weighted_itm_loss
    from r2d2ds.losses.mlm import IGNORE_INDEX, mask_tokens, mlm_loss

    obj, teacher = _build(loss, dropout=True)
    model, lc = obj.model, obj.loss_cfg
    image, ids, mask, labels = batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_id"]
    chunks = [slice(s, min(s + chunk, ROWS)) for s in range(0, ROWS, chunk)]
    torch.manual_seed(rng_seed)
    parts = [(model.encode_image(image[sl]), model.encode_text(ids[sl], mask[sl])) for sl in chunks]
    img_tok, img = (torch.cat(x) for x in zip(*(p[0] for p in parts)))
    txt_tok, txt = (torch.cat(x) for x in zip(*(p[1] for p in parts)))
    scale = model.logit_scale()
    fgr_seed, fuse = obj.fgr_draw(SEED)
    assert fuse  # the released draw rides on the GCPR pass
    gcpr, (neg_txt, neg_img) = gcpr_loss(img, txt, scale, labels, impl="torch", negatives_seed=fgr_seed)
    with torch.no_grad():
        t_img_tok, ti = teacher.encode_image(image)
        t_txt_tok, tt = teacher.encode_text(ids, mask)
    a = lc.tgd_alpha
    total = (1 - a) * lc.gcpr_weight * gcpr + a * lc.tgd_weight * tgd_loss(img, txt, scale, labels, ti, tt,
                                                                        impl="torch")
    pairs = build_itm_pairs(img_tok, txt_tok, mask, neg_txt, neg_img)  # rows: B pos, B (img, neg txt), B (neg img, txt)
    tq, iq, order = [], [], []
    for sl in chunks:
        idx = torch.cat([torch.arange(sl.start, sl.stop) + k * ROWS for k in range(3)])
        logits = model.itm_logits(pairs.img[idx], pairs.txt[idx], pairs.mask[idx])
        tq.append(logits[0]), iq.append(logits[1]), order.append(idx)
    order = torch.cat(order)
    t, v, w = pairs.target[order], pairs.valid[order], lc.fgr_class_weights
    total = total + lc.fgr_weight * 0.5 * (weighted_itm_loss(torch.cat(tq), t, v, w)
                                           + weighted_itm_loss(torch.cat(iq), t, v, w))
    masked, mlm_labels = mask_tokens(ids, mask, lc.mlm_probability, obj.mask_token_id, obj.vocab_size,
                                     obj.special_token_ids, torch.Generator().manual_seed(SEED))
    hidden = torch.cat([model.text_query(model.encode_text(masked[sl], mask[sl])[0], mask[sl], img_tok[sl])
                        for sl in chunks])
    sel = mlm_labels != IGNORE_INDEX
    total = total + lc.mlm_weight * mlm_loss(model.mlm_logits(hidden[sel]), mlm_labels[sel])
    with torch.no_grad():
        t_hidden = teacher.text_query(t_txt_tok, mask, t_img_tok)
    total = total + lc.fgd_weight * fgd_loss(hidden, t_hidden, mask)
    total.backward()
    return _averaged_grads(obj)


def _gradcache(loss: dict, batch: dict, chunk: int, dropout: bool = False, negatives: str = "cached",
               rng_seed: int = 0, ckpt: str = "none",
               loss_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from r2d2ds.losses.gradcache import BatchPlan, GradCache

    obj, teacher = _build(loss, dropout, ckpt)
    plan = BatchPlan(global_batch=2 * ROWS, world=2, grad_accum=1, rank_batch=ROWS, chunk_size=chunk,
                     negatives=negatives, fgr=obj.loss_cfg.fgr_weight > 0)
    torch.manual_seed(rng_seed)
    engine = _Engine(obj, loss_scale)
    out = GradCache(plan).step(engine, batch, teacher, SEED)
    assert engine.micro_steps == plan.engine_accum  # the engine's accumulation boundary falls on the last one
    return _averaged_grads(obj, loss_scale), out


def _accumulated(loss: dict, batch: dict, chunk: int, negatives: str = "cached") -> tuple[dict, dict]:
    """train.grad_accum = 2: two GradCache passes of 4 rows per optimizer step vs two one-shot micro steps
    (each engine.backward divided by the accumulation steps, as DeepSpeed does)."""
    from r2d2ds.losses.gradcache import BatchPlan, GradCache

    halves = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]
    obj, teacher = _build(loss, dropout=False)
    for i, half in enumerate(halves):
        (obj(half, teacher, SEED + i)["loss"] / 2).backward()
    ref = _averaged_grads(obj)
    obj, teacher = _build(loss, dropout=False)
    plan = BatchPlan(global_batch=2 * ROWS, world=2, grad_accum=2, rank_batch=4, chunk_size=chunk,
                     negatives=negatives)
    gc = GradCache(plan)
    for i, half in enumerate(halves):
        gc.step(_Engine(obj), half, teacher, SEED + i)
    return ref, _averaged_grads(obj)


PARTS = ("model.image_tower", "model.text_tower", "model.text_query_encoder", "model.image_query_encoder")
BLOCKS = re.compile(r"(model\.image_tower\.body\.blocks|model\.text_tower\.body\.encoder\.layer|"
                    r"model\.(?:text|image)_query_encoder\.layers)\.\d+")


def _plain(loss: dict, batch: dict, ckpt: str, rng_seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One-shot step with dropout on. Also counts the Linear calls of every block (ViT block, BertLayer,
    cross-encoder layer) in the forward and in the backward (the recompute: none without checkpointing)."""
    obj, teacher = _build(loss, dropout=True, ckpt=ckpt)
    calls: dict = {}
    phase = ["fwd"]

    def count(block):
        def hook(*_):
            calls[block, phase[0]] = calls.get((block, phase[0]), 0) + 1
        return hook

    for name, mod in obj.named_modules():
        block = BLOCKS.match(name)
        if block is not None and isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(count(block.group(0)))
    torch.manual_seed(rng_seed)
    loss_value = obj(batch, teacher, SEED)["loss"]
    phase[0] = "bwd"
    loss_value.backward()
    return _averaged_grads(obj), calls


def _checkpointing_cases(rank: int, local: dict) -> dict:
    """Activation checkpointing with dropout on: on/off give the same gradients for a plain step and for
    GradCache (full loss); GradCache with it on equals the chunked reference without it; each setting
    recomputes exactly its parts; without RNG preservation the recompute draws other masks."""
    res = {}
    for ckpt in ("none", "towers", "cross", "all"):
        res[f"ckpt/plain/{ckpt}"], res[f"ckpt/recomputed/{ckpt}"] = _plain(FULL, local, ckpt, 11 + rank)
    for ckpt in ("none", "all"):
        res[f"ckpt/gc/{ckpt}"], _ = _gradcache(FULL, local, 3, dropout=True, rng_seed=11 + rank, ckpt=ckpt)
    res["ckpt/gcpr_tgd/gc"], _ = _gradcache(GCPR_TGD, local, 3, dropout=True, rng_seed=7 + rank, ckpt="all")
    checkpoint = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: checkpoint(*a, **{**k, "preserve_rng_state": False})
    try:  # the image tower's and the cross encoders' recomputes (timm's and ours call it by attribute)
        res["ckpt/plain/all/no_rng"], _ = _plain(FULL, local, "all", 11 + rank)
    finally:
        torch.utils.checkpoint.checkpoint = checkpoint
    return res


def _rank_fn(rank: int, world: int, batch: dict):
    torch.set_num_threads(1)
    local = {k: v[rank * ROWS:(rank + 1) * ROWS] for k, v in batch.items()}
    res: dict = {}
    for name, loss in (("gcpr", GCPR), ("gcpr_tgd", GCPR_TGD), ("full", FULL)):
        res[f"{name}/ref"] = _reference(loss, local)
        for chunk in (3, 8) if name != "full" else (1, 3, 5, 8):
            res[f"{name}/chunk{chunk}"], out = _gradcache(loss, local, chunk)
            res[f"{name}/chunk{chunk}/out"] = out
    with torch.no_grad():  # the one-shot objective's logged terms, to compare with GradCache's
        obj, teacher = _build(FULL, dropout=False)
        res["full/ref/out"] = obj(local, teacher, SEED)
    res["full/detached"], _ = _gradcache(FULL, local, 3, negatives="detached")
    res["full/reembed"], res["full/reembed/out"] = _gradcache(FULL, local, 3, negatives="reembed")
    res["full/scaled"], _ = _gradcache(FULL, local, 3, loss_scale=1024.0)  # fp16-style loss scaling
    res["accum/ref"], res["accum/gc"] = _accumulated(FULL, local, 3)
    _, res["accum/reembed"] = _accumulated(FULL, local, 3, negatives="reembed")
    # Dropout on, full loss: "cached" equals the one-graph step drawing the same masks; "reembed" does not
    # (its re-embedded negatives draw masks of their own).
    for chunk in (3, 8):
        res[f"dropfull/ref/{chunk}"] = _chunked_full_reference(FULL, local, chunk, rng_seed=5 + rank)
        res[f"dropfull/cached/{chunk}"], _ = _gradcache(FULL, local, chunk, dropout=True, rng_seed=5 + rank)
    res["dropfull/reembed/3"], _ = _gradcache(FULL, local, 3, dropout=True, rng_seed=5 + rank, negatives="reembed")
    res["dropfull/cached/3/ckpt"], _ = _gradcache(FULL, local, 3, dropout=True, rng_seed=5 + rank, ckpt="all")
    # FGR's local scope with the top-k sampler: the non-fused draw, negatives from this rank only
    local_scope = dict(FULL, fgr_negative_scope="local", fgr_negatives="topk", fgr_topk=3)
    res["local/ref"] = _reference(local_scope, local)
    res["local/chunk3"], _ = _gradcache(local_scope, local, 3)

    # Dropout on: GradCache with RNG replay equals the chunked-with-graph step; without replay it does not.
    for name, loss in (("gcpr", GCPR), ("gcpr_tgd", GCPR_TGD)):
        res[f"drop/{name}/ref"] = _chunked_reference(loss, local, 3, rng_seed=7 + rank)
        res[f"drop/{name}/gc"], _ = _gradcache(loss, local, 3, dropout=True, rng_seed=7 + rank)
    from r2d2ds.losses import gradcache

    replay = gradcache._replay_rng
    gradcache._replay_rng = lambda state, device: contextlib.nullcontext()  # pass 2 draws fresh masks
    try:
        res["drop/gcpr/no_replay"], _ = _gradcache(GCPR, local, 3, dropout=True, rng_seed=7 + rank)
    finally:
        gradcache._replay_rng = replay
    res.update(_checkpointing_cases(rank, local))
    return res


_CACHE: dict = {}


def _results() -> dict:
    if "r" not in _CACHE:
        batch = tiny_batch(b=2 * ROWS, length=10, ids=IDS)
        _CACHE["r"] = run_ranks(_rank_fn, 2, batch)[0]  # after averaging, every rank holds the same gradients
    return _CACHE["r"]


def _assert_grads_equal(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name, g in want.items():
        # fp32; chunking only changes summation order (per-chunk sums, global denominators)
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=1e-6 + 1e-5 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("chunk", [3, 8])
@pytest.mark.parametrize("terms", ["gcpr", "gcpr_tgd"])
def test_contrastive_terms_match_one_step(terms, chunk):
    r = _results()
    _assert_grads_equal(r[f"{terms}/chunk{chunk}"], r[f"{terms}/ref"])
    assert r[f"{terms}/ref"]["model.temperature.log_tau"].abs().item() > 0  # the cached scale gradient counts


@pytest.mark.parametrize("chunk", [1, 3, 5, 8])  # 3 and 5 do not divide the rank batch of 8
def test_full_loss_matches_one_step(chunk):
    r = _results()
    got, want = r[f"full/chunk{chunk}"], r["full/ref"]
    _assert_grads_equal(got, want)
    # Every stage has a live gradient: both cross encoders (FGR), the MLM head, the towers.
    for key in ("model.text_query_encoder.layers.0.ffn.fc1.weight", "model.image_query_encoder.layers.0.ffn.fc1.weight",
                "model.itm_image_query.linear.weight", "model.mlm_head.decoder.weight",
                "model.text_tower.body.embeddings.word_embeddings.weight"):
        assert want[key].abs().max() > 0, key
    assert r[f"full/chunk{chunk}/out"]["fgr/remote_frac"] > 0  # negatives from the other rank are re-embedded
    # The logged terms are the rank batch's, equal to the one-shot objective's.
    out, ref = r[f"full/chunk{chunk}/out"], r["full/ref/out"]
    for k in ("loss", "loss/gcpr", "loss/tgd", "loss/fgr", "loss/fgd", "loss/mlm", "acc/itm", "logit_scale"):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("mode", ["gc", "reembed"])  # gc: the default, "cached"
def test_two_passes_per_step_match_two_accumulated_micro_steps(mode):
    r = _results()
    _assert_grads_equal(r[f"accum/{mode}"], r["accum/ref"])


def test_reembed_negatives_match_one_step_without_dropout():
    r = _results()
    _assert_grads_equal(r["full/reembed"], r["full/ref"])
    for k in ("loss", "loss/fgr", "loss/fgd", "loss/mlm", "acc/itm", "logit_scale"):
        assert r["full/reembed/out"][k].item() == pytest.approx(r["full/ref/out"][k].item(), rel=1e-5, abs=1e-6), k


def test_cached_token_gradients_are_unscaled_by_the_engines_loss_scale():
    # fp16 loss scaling multiplies the ranking pass's token gradients too; they must enter the tower pass once.
    r = _results()
    _assert_grads_equal(r["full/scaled"], r["full/ref"])


@pytest.mark.parametrize("chunk", [3, 8])
def test_cached_negatives_are_exact_with_dropout(chunk):
    r = _results()
    _assert_grads_equal(r[f"dropfull/cached/{chunk}"], r[f"dropfull/ref/{chunk}"])


def test_cached_negatives_exact_with_dropout_and_checkpointing():
    r = _results()
    _assert_grads_equal(r["dropfull/cached/3/ckpt"], r["dropfull/ref/3"])


def test_reembed_negatives_are_not_exact_with_dropout():
    r = _results()
    got, want = r["dropfull/reembed/3"], r["dropfull/ref/3"]
    tower = [n for n in want if n.startswith(("model.text_tower", "model.image_tower"))]
    diff = max((got[n] - want[n]).abs().max().item() / (want[n].abs().max().item() + 1e-12) for n in tower)
    assert diff > 1e-3


def test_local_scope_and_non_fused_sampler_match_one_step():
    r = _results()
    _assert_grads_equal(r["local/chunk3"], r["local/ref"])


def test_detached_negatives_drop_only_the_towers_gradient_through_negatives():
    r = _results()
    got, want = r["full/detached"], r["full/ref"]
    # Cross encoders and heads see the same values either way: their gradients are exact.
    for n in want:
        if any(s in n for s in ("query_encoder", "itm_", "mlm_head", "image_to_cross")):
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6 + 1e-5 * want[n].abs().max().item())
    # The towers lose the FGR gradient through the negative sides of the negative pairs.
    tower = [n for n in want if n.startswith(("model.text_tower", "model.image_tower"))]
    assert max((got[n] - want[n]).abs().max().item() for n in tower) > 1e-4


@pytest.mark.parametrize("terms", ["gcpr", "gcpr_tgd"])
def test_dropout_rng_replay_makes_it_exact(terms):
    r = _results()
    _assert_grads_equal(r[f"drop/{terms}/gc"], r[f"drop/{terms}/ref"])


def test_without_rng_replay_dropout_breaks_exactness():
    r = _results()
    got, want = r["drop/gcpr/no_replay"], r["drop/gcpr/ref"]
    diff = max((got[n] - want[n]).abs().max().item() / (want[n].abs().max().item() + 1e-12) for n in want)
    assert diff > 1e-3


# --------------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("ckpt", ["towers", "cross", "all"])
def test_checkpointing_gives_the_same_gradients_with_dropout(ckpt):
    r = _results()
    _assert_grads_equal(r[f"ckpt/plain/{ckpt}"], r["ckpt/plain/none"])


@pytest.mark.parametrize("ckpt,recomputed", [("none", ()), ("towers", PARTS[:2]), ("cross", PARTS[2:]),
                                              ("all", PARTS)])
def test_checkpointing_recomputes_every_block_of_its_parts(ckpt, recomputed):
    calls = _results()[f"ckpt/recomputed/{ckpt}"]
    blocks = sorted({b for b, _ in calls})
    assert len(blocks) == 8  # 2 ViT blocks, 2 BERT layers, 2 + 2 cross-encoder layers
    for block in blocks:
        fwd, bwd = calls[block, "fwd"], calls.get((block, "bwd"), 0)
        # each forward call of a checkpointed block is recomputed once in the backward; others never
        assert bwd == (fwd if block.startswith(recomputed) else 0), (block, fwd, bwd)


def test_gradcache_with_checkpointing_matches_without():
    r = _results()
    _assert_grads_equal(r["ckpt/gc/all"], r["ckpt/gc/none"])  # full loss, dropout in towers and cross encoders
    _assert_grads_equal(r["ckpt/gcpr_tgd/gc"], r["drop/gcpr_tgd/ref"])  # = the chunked step with its graph


def test_checkpointing_without_rng_preservation_breaks_exactness():
    r = _results()
    got, want = r["ckpt/plain/all/no_rng"], r["ckpt/plain/none"]
    diff = max((got[n] - want[n]).abs().max().item() / (want[n].abs().max().item() + 1e-12) for n in want)
    assert diff > 1e-3


# --------------------------------------------------------------------------------------- batch plan
def _cfg(**train) -> Config:
    return Config(data=DataConfig(micro_batch=8), train=TrainConfig(**train))


def test_plan_derives_rank_batch_and_engine_micro_steps():
    from r2d2ds.losses.gradcache import plan_batch

    p = plan_batch(_cfg(global_batch=1024, chunk_size=48, grad_accum=2), world=8)
    # "cached" (the default) with FGR on: a ranking and a tower micro step per chunk
    assert (p.rank_batch, len(p.chunks()), p.engine_accum, p.engine_micro_batch) == (64, 2, 8, 48)
    assert p.chunks() == [slice(0, 48), slice(48, 64)]  # the last chunk is shorter
    ecfg = p.engine_config(_cfg(global_batch=1024, chunk_size=48, grad_accum=2))
    assert (ecfg.data.micro_batch, ecfg.train.grad_accum) == (48, 8)
    for negatives in ("reembed", "detached"):  # one micro step per chunk
        assert plan_batch(_cfg(global_batch=1024, chunk_size=48, grad_accum=2, gradcache_negatives=negatives),
                          world=8).engine_accum == 4
    no_fgr = Config(data=DataConfig(micro_batch=8), train=TrainConfig(global_batch=1024, chunk_size=48, grad_accum=2),
                    loss=LossConfig(fgr_weight=0.0))
    assert plan_batch(no_fgr, world=8).engine_accum == 4  # "cached" without FGR: no ranking pass
    assert p.data_config(_cfg()).data.micro_batch == 64
    off = plan_batch(_cfg(), world=2)  # no global_batch, no GradCache: the old identity
    assert (off.rank_batch, off.global_batch, off.engine_accum, off.gradcache) == (8, 16, 1, False)


@pytest.mark.parametrize("train,world,key", [
    (dict(global_batch=100, chunk_size=4), 8, "train.global_batch"),
    (dict(global_batch=64, chunk_size=64), 2, "train.chunk_size"),
    (dict(chunk_size=9), 1, "train.chunk_size"),
])
def test_plan_errors_name_the_key(train, world, key):
    from r2d2ds.losses.gradcache import plan_batch

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_batch(_cfg(**train), world)


@pytest.mark.parametrize("key,value", [("chunk_size", -1), ("global_batch", -8), ("gradcache_negatives", "x")])
def test_config_rejects_bad_gradcache_keys(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainConfig(**{key: value})


@pytest.mark.parametrize("value", ["yes", "blocks", ""])
def test_config_rejects_bad_checkpointing_setting(value):
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing"):
        tiny_model_config(activation_checkpointing=value)
