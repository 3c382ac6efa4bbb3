"""model.image_feature_cache: a frozen image tower's output is computed once per image id and served from memory
afterwards. The step must be the one computed without the cache (loss and every gradient), only unseen images
may run the tower's body, and the configuration refuses the cases where a cached feature would be stale."""

from __future__ import annotations

import pytest
import torch

import r2d2ds  # noqa: F401
from r2d2ds.config import Config, ConfigError, DataConfig
from tests.dist_utils import run_ranks
from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, no_dropout, tiny_batch, tiny_loss_config, tiny_model_config

SEED = 7


def _config(tmp_path, cache: bool):
    """A tiny frozen timm CNN with BatchNorm (its own checkpoint), dropout off: two builds give one function."""
    import timm

    path = tmp_path / "cnn.pt"
    if not path.exists():
        torch.manual_seed(1)
        torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)
    return no_dropout(tiny_model_config(image_model="resnet10t", image_kwargs={}, image_checkpoint=str(path),
                                        image_freeze=True, image_feature_cache=cache))


def _batch(ids: list[int]) -> dict:
    """Same id -> same pixels (what an image id means in real data); texts from tiny_batch."""
    b = tiny_batch(b=len(ids), ids=ids)
    b["image"] = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(100 + i)) for i in ids])
    return b


def _build(cfg):
    from r2d2ds.losses import R2D2Pretraining
    from r2d2ds.models import make_teacher

    torch.manual_seed(0)
    obj = R2D2Pretraining(cfg, tiny_loss_config(), VOCAB, PAD, MASK, SPECIALS).train()
    sizes: list[int] = []  # batch size of every call of the frozen body
    obj.model.image_tower.body.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return obj, make_teacher(obj.model), sizes


def _grads(obj) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}


STEPS = ([0, 1, 2, 3, 4, 5], [3, 4, 6, 7, 5, 8])  # the second batch repeats three images of the first


def test_cached_steps_equal_computed_steps_and_only_unseen_images_run_the_tower(tmp_path):
    runs = {}
    for cache in (False, True):
        obj, teacher, sizes = _build(_config(tmp_path, cache))
        assert teacher.image_tower.feature_cache is None  # the teacher reuses the student's output
        losses, grads = [], []
        for step, ids in enumerate(STEPS):
            obj.zero_grad()
            out = obj(_batch(ids), teacher, seed=SEED + step)
            out["loss"].backward()
            losses.append(out["loss"].detach())
            grads.append(_grads(obj))
        runs[cache] = (losses, grads, sizes, obj)
    (l0, g0, s0, _), (l1, g1, s1, obj) = runs[False], runs[True]
    assert s0 == [6, 6]
    assert s1 == [6, 3]  # step 2 ran the body on its three new images only
    assert sorted(obj.model.image_tower.feature_cache) == list(range(9))
    for a, b in zip(l0, l1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(g0, g1):
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_batch_without_ids_is_computed(tmp_path):
    obj, _, sizes = _build(_config(tmp_path, True))
    b = _batch([0, 1, 2])
    with torch.no_grad():
        obj.model.encode_image(b["image"], cache_keys=b["image_id"])
        obj.model.encode_image(b["image"])  # eval-style call: no ids, no cache
    assert sizes == [3, 3]


def _gradcache_rank(rank: int, world: int, cfg, ids: list[int], chunk: int):
    from r2d2ds.losses.gradcache import BatchPlan, GradCache
    from tests.losses.test_gradcache import _Engine

    obj, teacher, sizes = _build(cfg)
    batch = _batch(ids)
    plan = BatchPlan(global_batch=len(ids), world=1, grad_accum=1, rank_batch=len(ids), chunk_size=chunk,
                     negatives="cached", fgr=True)
    out = []
    for step in range(2):  # the second step is served from the cache entirely
        obj.zero_grad()
        GradCache(plan).step(_Engine(obj), batch, teacher, SEED + step)
        out.append(_grads(obj))
    return out, sizes


def test_gradcache_chunks_use_the_cache_and_give_the_same_gradients(tmp_path):
    ids, chunk = [0, 1, 2, 3, 4, 5], 2
    (plain, s0), = run_ranks(_gradcache_rank, 1, _config(tmp_path, False), ids, chunk)
    (cached, s1), = run_ranks(_gradcache_rank, 1, _config(tmp_path, True), ids, chunk)
    assert all(s == chunk for s in s0) and len(s0) > 2 * len(ids) // chunk  # pass 1 and the tower micro steps
    assert s1 == [chunk] * (len(ids) // chunk)  # each image ran once: pass 1 of the first step
    for ga, gb in zip(plain, cached):
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_config_refuses_a_cache_that_would_go_stale(tmp_path):
    with pytest.raises(ConfigError, match="model.image_feature_cache"):
        tiny_model_config(image_feature_cache=True)  # the tower trains
    model = _config(tmp_path, True)
    with pytest.raises(ConfigError, match="data.augment"):
        Config(model=model, data=DataConfig(augment=True))
    Config(model=model, data=DataConfig(augment=False))
