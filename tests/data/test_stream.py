"""TrainStream and load_retrieval_split: bad input, rank/worker splitting, exact resume, resampling."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from itertools import islice

import pytest
import torch

from r2d2ds.config import DataConfig
from r2d2ds.data import DataError, TrainStream, key_to_image_id, load_retrieval_split, resolve_shards
from r2d2ds.data.shards import epoch_shards

from .shard_utils import add_member, caption_json, jpeg_bytes


def _cfg(train: str, **kw) -> DataConfig:
    base = dict(train=train, image_size=32, micro_batch=1, shuffle_buffer=8, max_text_len=16, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def _keys(stream) -> list[str]:
    return [k for batch in stream for k in batch["key"]]


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture()
def bad_shards(tmp_path):
    """train-000000.tar: good samples mixed with a truncated JPEG, a text file named .jpg, an empty caption
    and a sample without any caption. train-000001.tar: two good samples, then cut inside a member's data.
    train-000002.tar: good samples only, so the stream must carry on after the broken shard."""
    good = []
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tf:
        jpg = jpeg_bytes()
        for i in range(3):
            add_member(tf, f"a{i}.jpg", jpeg_bytes((40 * i, 100, 200)))
            add_member(tf, f"a{i}.json", caption_json(f"好的样本{i}", "第二个说明", image_id=100 + i))
            good.append(f"a{i}")
        add_member(tf, "trunc.jpg", jpg[: len(jpg) // 2])
        add_member(tf, "trunc.json", caption_json("截断的图片"))
        add_member(tf, "notimage.jpg", "这不是图片，只是一段文字。".encode())
        add_member(tf, "notimage.txt", "一段说明".encode())
        add_member(tf, "empty.jpg", jpg)
        add_member(tf, "empty.txt", b"  \n\n")
        add_member(tf, "nocaption.jpg", jpg)
        add_member(tf, "a3.jpg", jpg)
        add_member(tf, "a3.txt", "只有文本文件的样本\n另一行说明\n".encode())  # txt only: two captions
        good.append("a3")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            add_member(tf, f"b{i}.jpg", jpeg_bytes((200, 40 * i, 60), size=48))
            add_member(tf, f"b{i}.json", caption_json(f"第二个分片{i}"))
    raw = buf.getvalue()
    # Cut in the middle of b2.jpg's data: b0 and b1 are complete, b2 is lost with the rest of the shard.
    cut = raw.index(b"b2.jpg") + 512 + 100
    (tmp_path / "train-000001.tar").write_bytes(raw[:cut])
    good += ["b0", "b1"]
    with tarfile.open(tmp_path / "train-000002.tar", "w") as tf:
        for i in range(4):
            add_member(tf, f"c{i}.jpg", jpeg_bytes((10, 200, 40 * i)))
            add_member(tf, f"c{i}.txt", f"第三个分片{i}".encode())
            good.append(f"c{i}")
    expected = {"corrupt_image": 1, "image_format": 1, "empty_caption": 1, "no_caption": 1, "broken_tar": 1}
    return tmp_path, sorted(good), expected


def test_bad_samples_skipped_counted_and_reported_once(bad_shards, synth_tokenizer, caplog):
    root, good, expected = bad_shards
    stream = TrainStream(_cfg(str(root)), synth_tokenizer, max_epochs=1)
    with caplog.at_level(logging.WARNING, logger="r2d2ds.data.shards"):
        batches = list(stream)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == good  # every good sample exactly once
    assert stream.skipped == sum(expected.values())
    assert dict(stream.skip_reasons) == expected
    assert sum(b["skipped"] for b in batches) <= stream.skipped  # the tail after the last batch is kept too
    reports = [r.getMessage() for r in caplog.records if "data/skipped" in r.getMessage()]
    assert len(reports) == 5
    assert any("train-000001.tar" in m and "broken_tar" in m for m in reports)
    assert any("'trunc'" in m and "train-000000.tar" in m for m in reports)
    # image ids: from the json where given, else a stable hash of the key
    ids = {k: int(i) for b in batches for k, i in zip(b["key"], b["image_id"])}
    assert ids["a1"] == 101 and ids["c2"] == key_to_image_id("c2")

    # A second pass counts again (data/skipped is per occurrence) but does not log again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r2d2ds.data.shards"):
        again = TrainStream(_cfg(str(root)), synth_tokenizer, max_epochs=1)
        assert sorted(_keys(again)) == good
    assert again.skipped == sum(expected.values())
    assert not [r for r in caplog.records if "data/skipped" in r.getMessage()]


def test_bad_samples_with_workers(bad_shards, synth_tokenizer):
    root, good, expected = bad_shards
    stream = TrainStream(_cfg(str(root), num_workers=2), synth_tokenizer, max_epochs=1)
    assert sorted(_keys(stream)) == good
    assert dict(stream.skip_reasons) == expected  # counts from worker processes reach the main process


def test_bad_samples_in_retrieval_split(bad_shards, synth_tokenizer):
    root, good, expected = bad_shards
    split = load_retrieval_split(str(root), "train", synth_tokenizer, image_size=32, max_text_len=16)
    assert sorted(split.image_keys) == good
    assert split.skipped == sum(expected.values()) and split.skip_reasons == expected
    # every caption of every image: a0-a2 have two, a3 has two txt lines, b*/c* one each
    assert split.input_ids.shape == (2 * 4 + 2 + 4, 16)
    assert split.images.shape == (len(good), 3, 32, 32) and split.images.dtype == torch.float32
    per_image = Counter(split.text_to_image.tolist())
    assert per_image[split.image_keys.index("a3")] == 2 and per_image[split.image_keys.index("c0")] == 1
    first_text = split.text_to_image.tolist().index(split.image_keys.index("a3"))
    assert split.captions[first_text] == "只有文本文件的样本"


def test_retrieval_split_caps_and_order(synth_dir, synth_tokenizer):
    a = load_retrieval_split(str(synth_dir), "val", synth_tokenizer, image_size=32, max_images=10)
    b = load_retrieval_split(str(synth_dir), "val", synth_tokenizer, image_size=32)
    assert len(a.image_keys) == 10 and a.image_keys == b.image_keys[:10]
    assert len(b.image_keys) == 30 and a.input_ids.shape[0] == 30  # three phrasings per synthetic image
    assert (b.text_to_image[:6] == torch.tensor([0, 0, 0, 1, 1, 1])).all()


# ------------------------------------------------------------------------------------------ splitting


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_cover_epoch_disjointly(synth_dir, synth_tokenizer, workers):
    all_keys = []
    for rank in range(2):
        stream = TrainStream(_cfg(str(synth_dir), num_workers=workers), synth_tokenizer, rank=rank, world=2,
                             seed=3, max_epochs=1)
        all_keys.append(_keys(stream))
    assert not set(all_keys[0]) & set(all_keys[1])
    assert sorted(all_keys[0] + all_keys[1]) == [f"train_{i:08d}" for i in range(240)]


def test_fewer_shards_than_slots_falls_back_to_sample_split(synth_dir, synth_tokenizer):
    shards = resolve_shards(str(synth_dir), "train")[:1]  # 40 samples, 2 ranks x 2 workers = 4 slots
    seen = []
    for rank in range(2):
        stream = TrainStream(_cfg(str(synth_dir), num_workers=2), synth_tokenizer, rank=rank, world=2,
                             max_epochs=1, shards=shards)
        seen += _keys(stream)
    assert sorted(seen) == [f"train_{i:08d}" for i in range(40)]


def test_epoch_shards_permute_per_epoch_and_cover():
    shards = [f"s{i}" for i in range(10)]
    for epoch in range(3):
        dealt = [epoch_shards(shards, s, 4, seed=1, epoch=epoch, resampled=False)[0] for s in range(4)]
        assert sorted(sum(dealt, [])) == sorted(shards)
    assert epoch_shards(shards, 0, 4, 1, 0, False) != epoch_shards(shards, 0, 4, 1, 1, False)
    drawn = [epoch_shards(shards, 0, 2, seed=1, epoch=e, resampled=True)[0] for e in range(20)]
    assert all(len(d) == 5 for d in drawn)
    assert any(len(set(d)) < len(d) for d in drawn)  # with replacement: repeats happen


def test_batches_have_exact_shape_and_drop_remainder(synth_dir, synth_tokenizer):
    cfg = _cfg(str(synth_dir), micro_batch=7, caption="first")
    stream = TrainStream(cfg, synth_tokenizer, max_epochs=1)
    batches = list(stream)
    assert len(batches) == 240 // 7
    for b in batches:
        assert b["image"].shape == (7, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["input_ids"].shape == (7, 16) and b["input_ids"].dtype == torch.int64
        assert b["attention_mask"].shape == (7, 16) and b["image_id"].shape == (7,)
        assert isinstance(b["skipped"], int) and len(b["key"]) == 7
    assert set(batches[0]) == {"image", "input_ids", "attention_mask", "image_id", "key", "skipped"}


def test_resampled_stream_runs_and_differs_per_rank(synth_dir, synth_tokenizer):
    cfg = _cfg(str(synth_dir), micro_batch=4, resampled=True)
    a = [k for b in islice(TrainStream(cfg, synth_tokenizer, rank=0, world=2), 30) for k in b["key"]]
    b = [k for b in islice(TrainStream(cfg, synth_tokenizer, rank=1, world=2), 30) for k in b["key"]]
    assert len(a) == 120 and a != b


# ------------------------------------------------------------------------------------------ resume


def _assert_same(x: dict, y: dict) -> None:
    assert x["key"] == y["key"]
    for name in ("image", "input_ids", "attention_mask", "image_id"):
        assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("workers,augment", [(0, True), (2, False)])
def test_exact_resume(synth_dir, synth_tokenizer, workers, augment):
    # 240 samples / 8 = 30 batches per epoch (0 workers): 40 batches cross an epoch boundary.
    cfg = _cfg(str(synth_dir), micro_batch=8, shuffle_buffer=50, num_workers=workers, augment=augment)
    total, cut = 40, 17  # an odd cut: with 2 workers the next batch is due from the second worker
    reference = list(islice(TrainStream(cfg, synth_tokenizer, seed=5), total))
    first = TrainStream(cfg, synth_tokenizer, seed=5)
    head = list(islice(first, cut))
    state = first.state_dict()
    assert state["batches"] >= 1 and "epoch" in state
    resumed = TrainStream(cfg, synth_tokenizer, seed=5)
    resumed.load_state_dict(state)
    tail = list(islice(resumed, total - cut))
    for x, y in zip(reference, head + tail):
        _assert_same(x, y)
    # Random caption choice differs between epochs but is reproducible.
    assert reference[0]["key"] != reference[-1]["key"]


def test_resume_skips_without_decoding(synth_dir, synth_tokenizer, monkeypatch):
    cfg = _cfg(str(synth_dir), micro_batch=8, shuffle_buffer=50)
    first = TrainStream(cfg, synth_tokenizer)
    list(islice(first, 20))
    state = first.state_dict()
    import r2d2ds.data.samples as samples_mod

    calls = []
    real = samples_mod.decode_image
    monkeypatch.setattr(samples_mod, "decode_image", lambda *a: calls.append(1) or real(*a))
    resumed = TrainStream(cfg, synth_tokenizer)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert len(calls) == 8  # only the next batch is decoded, not the 160 samples before it


def test_resume_with_other_streams_warns_and_other_micro_batch_continues(synth_dir, synth_tokenizer):
    cfg = _cfg(str(synth_dir), micro_batch=8)
    reference = [k for b in islice(TrainStream(cfg, synth_tokenizer), 4) for k in b["key"]]
    first = TrainStream(cfg, synth_tokenizer)
    list(islice(first, 3))
    other = TrainStream(_cfg(str(synth_dir), micro_batch=8, shuffle_buffer=7), synth_tokenizer)
    with pytest.warns(UserWarning, match="different layout"):
        other.load_state_dict(first.state_dict())
    # The micro batch does not define the streams: the position holds, batches are cut differently.
    smaller = TrainStream(_cfg(str(synth_dir), micro_batch=4), synth_tokenizer)
    smaller.load_state_dict(first.state_dict())
    assert [k for b in islice(smaller, 2) for k in b["key"]] == reference[24:32]


def test_other_world_size_needs_every_ranks_state(synth_dir, synth_tokenizer):
    cfg = _cfg(str(synth_dir), micro_batch=8)
    first = TrainStream(cfg, synth_tokenizer, rank=0, world=2)
    list(islice(first, 2))
    alone = TrainStream(cfg, synth_tokenizer)
    with pytest.raises(ValueError, match="every rank"):
        alone.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="each of the 2 saved ranks"):
        alone.load_state_dict(first.state_dict(), all_states=[first.state_dict()])


# ------------------------------------------------------------------------------------------ specs


def test_resolve_shards_forms_and_errors(synth_dir, tmp_path):
    listed = resolve_shards(str(synth_dir), "train")
    assert len(listed) == 6 and listed == resolve_shards(str(synth_dir / "manifest.json"), "train")
    assert resolve_shards(str(synth_dir / "train-{000000..000005}.tar"), "train") == listed
    assert resolve_shards(str(synth_dir / "{split}-*.tar"), "train") == listed
    with pytest.raises(ValueError, match=r"no split 'test'.*train, val"):
        resolve_shards(str(synth_dir), "test")
    with pytest.raises(FileNotFoundError, match="nothere"):
        resolve_shards(str(tmp_path / "nothere-{0..3}.tar"), "train")
    with pytest.raises(FileNotFoundError, match="'val'"):
        resolve_shards(str(tmp_path), "val")


def test_all_bad_data_raises_instead_of_hanging(tmp_path, synth_tokenizer):
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tf:
        for i in range(3):
            add_member(tf, f"x{i}.jpg", b"not an image")
            add_member(tf, f"x{i}.txt", "说明".encode())
    stream = TrainStream(_cfg(str(tmp_path)), synth_tokenizer)
    with pytest.raises(DataError, match=r"no valid sample in 3 epochs.*image_format"):
        next(iter(stream))
