"""Hostile shards through TrainStream (ranks x workers) and load_retrieval_split: every good sample is seen exactly
once per epoch, every bad one is a counted skip with its reason, nothing from a shard is ever unpickled, and a
dataset that is mostly bad stops with an error instead of training on what is left."""

from __future__ import annotations

import logging
import pickle
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

import r2d2ds.data.samples as samples_mod
from r2d2ds.config import DataConfig
from r2d2ds.data import DataError, TrainStream, load_retrieval_split, load_tokenizer, resolve_shards
from r2d2ds.data.samples import BadSample, decode_image, json_depth, parse_sample

from .hostile import HOSTILE_LIMITS, image_bytes, pickle_payload, write_hostile_dataset
from .shard_utils import add_member, caption_json, jpeg_bytes


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ds = write_hostile_dataset(root / "data", marker=root / "PWNED")
    yield ds
    assert not ds.marker.exists(), "a pickle payload from a shard was loaded"


@pytest.fixture(scope="module")
def tokenizer(hostile):
    return load_tokenizer("auto", str(hostile.root))


def _cfg(root, **kw) -> DataConfig:
    base = dict(train=str(root), image_size=32, micro_batch=1, shuffle_buffer=8, max_text_len=16, **HOSTILE_LIMITS)
    base.update(kw)
    return DataConfig(**base)


def _run(cfg, tokenizer, world: int, **kw) -> tuple[Counter, Counter, list[TrainStream]]:
    keys: Counter = Counter()
    reasons: Counter = Counter()
    streams = []
    for rank in range(world):
        stream = TrainStream(cfg, tokenizer, rank=rank, world=world, **kw)
        for batch in stream:
            assert batch["image"].shape[1:] == (3, 32, 32) and batch["image_id"].dtype == torch.int64
            keys.update(batch["key"])
        assert stream.skipped == sum(stream.skip_reasons.values())
        reasons.update(stream.skip_reasons)
        streams.append(stream)
    return keys, reasons, streams


def test_the_payload_is_live(tmp_path):
    # The guard below is only meaningful if unpickling the payload really would write the marker.
    pickle.loads(pickle_payload(tmp_path / "marker"))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_stream_sees_every_good_sample_once_and_counts_every_skip(hostile, tokenizer, world, workers):
    keys, reasons, _ = _run(_cfg(hostile.root, num_workers=workers), tokenizer, world, seed=world, max_epochs=1)
    assert keys == Counter(hostile.good)  # the exact multiset: each good sample once, PNG-named-.jpg included
    assert reasons == hostile.skipped
    assert not hostile.marker.exists()


def test_fewer_shards_than_slots_still_counts_each_skip_once(hostile, tokenizer):
    # 3 shards for 2 ranks x 2 workers: every slot reads every shard and keeps every 4th item, error items too.
    shards = [s for s in resolve_shards(str(hostile.root), "train") if s.endswith(("0.tar", "1.tar", "4.tar"))]
    keys, reasons, _ = _run(_cfg(hostile.root, num_workers=2), tokenizer, 2, max_epochs=1, shards=shards)
    want = {k for k in hostile.good if k[0] in "gpwlc"}
    assert keys == Counter(want)
    expected = hostile.skipped - Counter(empty_shard=1, unreadable_shard=1, broken_tar=1)  # shards 2, 3, 6
    assert reasons == expected


def test_every_skip_is_reported_with_shard_and_key(hostile, tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(samples_mod, "_REPORTED", set())
    with caplog.at_level(logging.WARNING, logger="r2d2ds.data.shards"):
        _run(_cfg(hostile.root), tokenizer, 1, max_epochs=1)
    reports = [r.getMessage() for r in caplog.records if "data/skipped" in r.getMessage()]
    assert len(reports) == sum(hostile.skipped.values())
    assert any("train-000000.tar' key 'deep': json_too_deep" in m for m in reports)
    assert any("train-000000.tar' key 'dup': duplicate_member" in m for m in reports)
    assert any("train-000001.tar' key 'c3': broken_tar" in m for m in reports)
    assert any("train-000002.tar' key '-': empty_shard" in m for m in reports)
    assert any("train-000004.tar' key '-': unreadable_shard" in m for m in reports)


def test_tail_carries_over_into_the_next_epoch(hostile, tokenizer):
    cfg = _cfg(hostile.root, micro_batch=3)
    keys, _, (stream,) = _run(cfg, tokenizer, 1, max_epochs=2)
    n = len(hostile.good)
    # Dropping each epoch's tail would lose 2 * (n % 3); carrying it over loses only the last (2n) % 3.
    assert stream.tail_dropped == (2 * n) % 3
    assert sum(keys.values()) == 2 * n - stream.tail_dropped
    assert set(keys) == set(hostile.good) and max(keys.values()) == 2


def test_retrieval_split_skips_the_same_samples(hostile, tokenizer):
    split = load_retrieval_split(str(hostile.root), "train", tokenizer, image_size=32, max_text_len=16,
                                 limits=_cfg(hostile.root))
    assert sorted(split.image_keys) == hostile.good
    assert Counter(split.skip_reasons) == hostile.skipped and split.skipped == sum(hostile.skipped.values())
    assert split.input_ids.shape == (sum(hostile.captions.values()), 16)
    per_image = Counter(split.text_to_image.tolist())
    assert all(per_image[i] == hostile.captions[k] for i, k in enumerate(split.image_keys))
    long = split.captions[split.text_to_image.tolist().index(split.image_keys.index("long_caption"))]
    assert long == "长" * DataConfig().max_caption_chars
    assert int(split.image_ids[split.image_keys.index("g0")]) == 7


def test_max_skipped_fraction_stops_the_retrieval_split(hostile, tokenizer):
    cfg = _cfg(hostile.root, max_skipped_fraction=0.3)
    with pytest.raises(DataError, match=r"skipped in split 'train'.*data\.max_skipped_fraction=0\.3"):
        load_retrieval_split(str(hostile.root), "train", tokenizer, 32, max_text_len=16, limits=cfg)


def test_max_skipped_fraction_stops_an_endless_stream(tmp_path, tokenizer):
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tf:
        for i in range(1200):
            if i % 200 == 0:
                add_member(tf, f"k{i:05d}.jpg", jpeg_bytes())
            else:
                add_member(tf, f"k{i:05d}.jpg", b"<html>not found</html>")
            add_member(tf, f"k{i:05d}.txt", "说明".encode())
    stream = TrainStream(_cfg(tmp_path, max_skipped_fraction=0.5), tokenizer)
    with pytest.raises(DataError, match=r"of 1000 samples .*image_format"):
        for _ in islice(stream, 50):
            pass


def test_any_exception_in_one_sample_is_a_skip(hostile, tokenizer, monkeypatch):
    real_parse = samples_mod.parse_sample

    def exploding_parse(raw, cfg=None):  # e.g. a RecursionError, or a bug, inside a decoder
        if raw.get("__key__") == "g0":
            raise RecursionError("maximum recursion depth exceeded")
        return real_parse(raw, cfg)

    class Tokenizer:  # a tokenizer that fails on one caption
        def __call__(self, texts, **kw):
            if any("绿" in t for t in texts):
                raise ValueError("tokenizer bug")
            return tokenizer(texts, **kw)

    monkeypatch.setattr(samples_mod, "parse_sample", exploding_parse)
    shards = resolve_shards(str(hostile.root), "train")[:1]
    keys, reasons, _ = _run(_cfg(hostile.root), Tokenizer(), 1, max_epochs=1, shards=shards)
    assert "g0" not in keys and "g1" not in keys and "g2" in keys
    assert reasons["bad_sample"] == 1 and reasons["bad_caption"] == 1


# ------------------------------------------------------------------------------------------ decoders, limits


def test_image_limits_come_from_the_config():
    png = image_bytes("PNG")
    assert decode_image(png).size == (32, 32)
    with pytest.raises(BadSample, match="image_format"):
        decode_image(png, DataConfig(image_formats=("JPEG",)))
    with pytest.raises(BadSample, match="too_many_pixels.*32x32"):
        decode_image(png, DataConfig(max_image_pixels=1000))
    assert decode_image(image_bytes("GIF"), DataConfig(image_formats=("JPEG", "GIF"))).mode == "RGB"


def test_json_limits_and_depth_without_recursion():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{"}], "c": "\\"[["}') == 3  # brackets in strings do not count
    assert json_depth(b"[" * 200_000 + b"]" * 200_000) == 200_000
    raw = {"__key__": "k", "jpg": b"x", "json": caption_json("说明", extra=[[[1]]])}
    assert parse_sample(raw, DataConfig(max_json_depth=4))[1] == ["说明"]
    with pytest.raises(BadSample, match="json_too_deep"):
        parse_sample(raw, DataConfig(max_json_depth=3))
    with pytest.raises(BadSample, match="json_too_large"):
        parse_sample(raw, DataConfig(max_json_bytes=10))
    many = {"__key__": "k", "jpg": b"x", "json": caption_json(*[f"说明{i}" for i in range(50)])}
    assert len(parse_sample(many, DataConfig(max_captions=4))[1]) == 4
    assert parse_sample({"__key__": "k", "jpg": b"x", "txt": b"abcdef"}, DataConfig(max_caption_chars=3))[1] == [
        "abc"]
    for iid in (2**63, -(2**63) - 1, 1.5, "3", True, [1]):
        with pytest.raises(BadSample, match="bad_image_id"):
            parse_sample({"__key__": "k", "jpg": b"x", "json": caption_json("说明", image_id=iid)})
    assert parse_sample({"__key__": "k", "jpg": b"x", "json": caption_json("说明", image_id=2**63 - 1)})[2] == \
        2**63 - 1


def test_readme_documents_the_limit_defaults():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    d = DataConfig()
    for key in ("max_member_bytes", "max_image_pixels", "max_json_bytes", "max_json_depth", "max_caption_chars",
                "max_captions"):
        assert f"| `{key}` | {getattr(d, key)} " in readme, key
    assert f"| `image_formats` | `[{', '.join(d.image_formats)}]` |" in readme
    assert f"`data.max_skipped_fraction` (default {d.max_skipped_fraction})" in readme


def test_reports_are_bounded_but_counting_is_not(monkeypatch, caplog):
    monkeypatch.setattr(samples_mod, "_REPORTED", set())
    monkeypatch.setattr(samples_mod, "MAX_REPORTED", 2)
    counter = samples_mod.SkipCounter()
    with caplog.at_level(logging.WARNING, logger="r2d2ds.data.shards"):
        for i in range(5):
            counter.skip("s.tar", f"k{i}", "corrupt_image")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "further ones are only counted" in messages[-1]
    assert counter.total == 5 and counter.take() == (5, {"corrupt_image": 5})


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_with_skips_and_carried_tails(hostile, tokenizer, workers):
    cfg = _cfg(hostile.root, micro_batch=3, num_workers=workers)
    total = 14  # about two and a half epochs of 17 good samples: batches that span epochs included
    reference = list(islice(TrainStream(cfg, tokenizer, seed=1), total))
    ref_keys = [b["key"] for b in reference]
    full = TrainStream(cfg, tokenizer, seed=1)
    list(islice(full, total))
    for cut in (5, 6, 9):
        first = TrainStream(cfg, tokenizer, seed=1)
        head = [b["key"] for b in islice(first, cut)]
        resumed = TrainStream(cfg, tokenizer, seed=1)
        resumed.load_state_dict(first.state_dict())
        tail = [b["key"] for b in islice(resumed, total - cut)]
        assert head + tail == ref_keys, cut
        assert resumed.skipped == full.skipped  # restored, and no skip counted twice or lost
