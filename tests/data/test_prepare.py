"""`prepare`: the synthetic generator and image folders (flickr8k / tsv / csv / jsonl) round-trip."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from r2d2ds.config import DataConfig
from r2d2ds.data import TrainStream, load_retrieval_split, load_tokenizer
from r2d2ds.data import synthetic as syn
from r2d2ds.data.prepare import main
from r2d2ds.data.writer import ShardWriter


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_round_trip(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["synthetic", "--out", str(out), "--train", "50", "--val", "10", "--test", "5",
            "--shard-size", "20", "--image-size", "32", "--seed", "7"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "r2d2ds-shards/1" and manifest["skipped"] == {}
    shards = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert manifest["splits"]["train"] == {"shards": shards, "samples": 50, "captions": 150}
    assert manifest["splits"]["val"]["samples"] == 10 and manifest["splits"]["test"]["samples"] == 5
    assert not list(out.glob("*.tmp"))

    # Every sample is exactly what the generator makes for (seed, split, index): image bytes and captions.
    members = _tar_members(out / "train-000001.tar")
    image, caps, groups = syn.make_sample(7, "train", 25, 32)
    assert members["train_00000025.jpg"] == image
    meta = json.loads(members["train_00000025.json"])
    assert meta["captions"] == caps and len(caps) == 3 and len(set(caps)) == 3
    assert members["train_00000025.txt"].decode() == caps[0]
    assert isinstance(meta["image_id"], int) and meta["key"] == "train_00000025"

    # Deterministic given the seed: a second run writes byte-identical shards; another seed differs.
    assert main(args[:2] + [str(tmp_path / "again")] + args[3:]) == 0
    assert (tmp_path / "again" / "train-000002.tar").read_bytes() == (out / "train-000002.tar").read_bytes()
    assert main(["synthetic", "--out", str(tmp_path / "other"), "--train", "5", "--val", "0", "--test", "0",
                 "--image-size", "32", "--seed", "8"]) == 0
    assert _tar_members(tmp_path / "other" / "train-000000.tar")["train_00000000.json"] != \
        _tar_members(out / "train-000000.tar")["train_00000000.json"]

    # The vocab covers every character: no [UNK] with tokenizer "auto"; ids survive the round trip.
    tok = load_tokenizer("auto", str(out))
    assert len(tok) == len((out / "vocab.txt").read_text().splitlines())
    split = load_retrieval_split(str(out), "val", tok, image_size=32, max_text_len=48)
    assert split.input_ids.shape == (30, 48)
    assert tok.unk_token_id not in split.input_ids.tolist()[0] + sum(split.input_ids.tolist(), [])
    assert split.captions[:3] == syn.make_sample(7, "val", 0, 32)[1]
    assert "train: 50 samples, 150 captions, 3 shard(s)" in capsys.readouterr().out


def test_synthetic_captions_describe_the_drawing():
    seen_counts, seen_positions = set(), set()
    for i in range(200):
        groups = syn.sample_scene(__import__("random").Random(i))
        img = syn.render(groups, 64)
        caps = syn.captions(groups)
        for g in groups:
            seen_counts.add(g.count)
            seen_positions.add(g.position)
            for c in caps:  # every phrasing names every group's count, colour and shape
                assert syn.NUMERALS[g.count] + "个" + g.colour in c.replace("的", "") or \
                    syn.NUMERALS[g.count] + "个" + g.colour in c
                assert g.shape in c
            # the first object's centre has the named colour
            x0, y0, side = syn._region(g.position, 64)
            fx, fy = syn._LAYOUT[g.count][0][0]
            px = img.getpixel((int(x0 + fx * side), int(y0 + fy * side)))
            assert max(abs(a - b) for a, b in zip(px, syn.COLOURS[g.colour])) < 40, (g, px)
        # nothing is drawn outside the named groups' regions: the other quadrants are plain background
        named = {g.position for g in groups}
        if "中间" not in named:
            for q in set(syn.QUADRANTS) - named:
                x0, y0, side = syn._region(q, 64)
                crop = img.crop((int(x0), int(y0), int(x0 + side), int(y0 + side)))
                assert crop.getextrema() == tuple((v, v) for v in syn.BACKGROUND) or \
                    all(hi - lo <= 6 for lo, hi in crop.getextrema())
    assert seen_counts == {1, 2, 3} and seen_positions == set(syn.POSITIONS)


def test_synthetic_vocab_covers_all_phrasings():
    chars = syn.vocab_chars()
    for i in range(2000):
        for c in syn.captions(syn.sample_scene(__import__("random").Random(i))):
            assert set(c) <= chars, set(c) - chars


# ------------------------------------------------------------------------------------------ folders


# image -> captions; "missing.jpg" has no file, "nocap.jpg" has an empty caption.
FOLDER = {
    "img_0.jpg": ["一只狗在草地上奔跑。", "草地上的小狗，正在跑。"],
    "img_1.jpg": ["两个孩子在海边玩耍。"],
    "img_2.jpg": ["一个男人骑自行车。", "骑车的人", "街道上有人骑车。"],
    "img_3.jpg": ["红色的房子。"],
    "sub/img_4.png": ["一只猫坐在窗台上。", "窗台上的猫"],
    "missing.jpg": ["这张图片不存在。"],
    "nocap.jpg": [""],
}


def _make_folder(root: Path) -> Path:
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(FOLDER):
        if name == "missing.jpg":
            continue
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        Image.new("RGB", (40 + 8 * i, 30), (30 * i, 200 - 20 * i, 90)).save(images / name, format=fmt)
    return images


def _write_captions(root: Path, fmt: str) -> Path:
    rows = [(img, cap) for img, caps in FOLDER.items() for cap in caps]
    if fmt == "flickr8k":
        text = "".join(f"{img}#zhc#{k} {cap}\n" for img, caps in FOLDER.items() for k, cap in enumerate(caps))
        path = root / "captions.txt"
    elif fmt == "tsv":
        text = "image\tcaption\n" + "".join(f"{img}\t{cap}\n" for img, cap in rows)
        path = root / "captions.tsv"
    elif fmt == "csv":
        import csv

        path = root / "captions.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows(rows + [("img_3.jpg", "房子, 红色的")])  # a comma inside a quoted caption
        return path
    else:
        lines = [json.dumps({"image": img, "captions": caps, **({"image_id": 7} if img == "img_1.jpg" else {})
                             }, ensure_ascii=False) for img, caps in FOLDER.items()]
        text = "\n".join(lines) + "\n"
        path = root / "captions.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["flickr8k", "tsv", "csv", "jsonl"])
def test_folder_round_trip(tmp_path, fmt, synth_tokenizer):
    images = _make_folder(tmp_path)
    captions = _write_captions(tmp_path, fmt)
    out = tmp_path / "out"
    args = ["folder", "--images", str(images), "--captions", str(captions), "--format", fmt,
            "--out", str(out), "--shard-size", "3"]
    if fmt == "flickr8k":  # Flickr8k-style split files: ids without the extension
        (tmp_path / "train.txt").write_text("img_0\nimg_1\nimg_2\nimg_4\n")
        (tmp_path / "val.txt").write_text("img_3\nmissing\nnocap\n")
        args += ["--split", f"train={tmp_path / 'train.txt'}", "--split", f"val={tmp_path / 'val.txt'}"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"missing_image": 1, "empty_caption": 1}
    expected = {k: v for k, v in FOLDER.items() if k not in ("missing.jpg", "nocap.jpg")}
    if fmt == "csv":
        expected["img_3.jpg"] = expected["img_3.jpg"] + ["房子, 红色的"]
    by_key = {}
    for split in manifest["splits"]:
        data = load_retrieval_split(str(out), split, synth_tokenizer, image_size=16)
        for i, key in enumerate(data.image_keys):
            by_key[key] = [c for c, t in zip(data.captions, data.text_to_image.tolist()) if t == i]
    assert by_key == {Path(k).with_suffix("").as_posix().replace("/", "_"): v for k, v in expected.items()}
    if fmt == "flickr8k":
        assert manifest["splits"]["train"]["samples"] == 4 and manifest["splits"]["val"]["samples"] == 1
        assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    else:
        assert set(manifest["splits"]) == {"train"} and manifest["splits"]["train"]["samples"] == 5
    members = {}
    for shard in manifest["splits"]["train"]["shards"]:
        members.update(_tar_members(out / shard))
    assert members["img_0.jpg"] == (images / "img_0.jpg").read_bytes()  # JPEG bytes copied as they are
    assert Image.open(io.BytesIO(members["sub_img_4.jpg"])).format == "JPEG"  # PNG re-encoded
    if fmt == "jsonl":
        assert json.loads(members["img_1.json"])["image_id"] == 7
    assert not list(out.glob("*.tmp"))


def test_folder_resize_and_errors(tmp_path, capsys):
    images = _make_folder(tmp_path)
    captions = _write_captions(tmp_path, "tsv")
    out = tmp_path / "out"
    assert main(["folder", "--images", str(images), "--captions", str(captions), "--format", "tsv",
                 "--out", str(out), "--image-size", "20"]) == 0
    members = _tar_members(out / "train-000000.tar")
    assert min(Image.open(io.BytesIO(members["img_2.jpg"])).size) == 20
    # Unreadable inputs are clear errors naming the path, not tracebacks.
    assert main(["folder", "--images", str(tmp_path / "nope"), "--captions", str(captions), "--format", "tsv",
                 "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("this line has no id\n")
    assert main(["folder", "--images", str(images), "--captions", str(bad), "--format", "flickr8k",
                 "--out", str(out)]) == 2
    assert "bad.txt:1" in capsys.readouterr().err


def test_interrupted_writer_leaves_no_shard(tmp_path):
    w = ShardWriter(tmp_path, "train", shard_size=10)
    w.write("k0", b"not checked here", ["说明"], 1)
    assert not list(tmp_path.glob("*.tar")) and len(list(tmp_path.glob("*.tar.tmp"))) == 1
    w.close()
    assert [p.name for p in tmp_path.glob("*.tar")] == ["train-000000.tar"]
    with pytest.raises(ValueError, match="must not contain"):
        ShardWriter(tmp_path, "val").write("a.b", b"", ["x"], 1)


# ------------------------------------------------------------------------------------------ Flickr8k-CN


def test_real_flickr8k_cn_subset(shared_dir, tmp_path):
    src = Path(shared_dir) / "data" / "flickr8k-cn"
    if not (src / "flickr8kzhc.caption.txt").is_file():
        pytest.skip(f"Flickr8k-CN not found under {src}")
    train_ids = (src / "flickr8ktrain.txt").read_text().split()[:30]
    val_ids = (src / "flickr8kval.txt").read_text().split()[:20]
    wanted = {i + ".jpg" for i in train_ids + val_ids}
    lines = [ln for ln in (src / "flickr8kzhc.caption.txt").read_text(encoding="utf-8").splitlines()
             if ln.split("#", 1)[0] in wanted]
    (tmp_path / "caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "train.txt").write_text("\n".join(train_ids) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(val_ids) + "\n")
    out = tmp_path / "shards"
    assert main(["folder", "--images", str(src / "images"), "--captions", str(tmp_path / "caps.txt"),
                 "--format", "flickr8k", "--split", f"train={tmp_path / 'train.txt'}",
                 "--split", f"val={tmp_path / 'val.txt'}", "--out", str(out), "--shard-size", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 30 and manifest["splits"]["val"]["samples"] == 20
    assert manifest["splits"]["val"]["captions"] == 100  # five human captions per image
    assert manifest["skipped"] == {}
    tok = load_tokenizer(str(Path(shared_dir) / "tokenizers" / "bert-base-chinese" / "vocab.txt"))
    val = load_retrieval_split(str(out), "val", tok, image_size=32, max_text_len=32)
    assert val.image_keys == val_ids and val.input_ids.shape == (100, 32)
    first = [ln.split(" ", 1)[1] for ln in lines if ln.startswith(val_ids[0] + ".jpg#zhc#0 ")][0]
    assert val.captions[0] == first
    assert (val.input_ids[:, 0] == tok.cls_token_id).all()
    members = _tar_members(out / "val-000000.tar")
    assert members[f"{val_ids[0]}.jpg"] == (src / "images" / f"{val_ids[0]}.jpg").read_bytes()
    cfg = DataConfig(train=str(out), image_size=32, micro_batch=8, shuffle_buffer=16, max_text_len=32)
    batches = list(TrainStream(cfg, tok, max_epochs=1))
    assert len(batches) == 3 and sorted(k for b in batches for k in b["key"])[0] in train_ids
