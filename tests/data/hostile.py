"""A generator of hostile shards: what a web crawl produces, plus deliberate attacks on the reader.

`write_hostile_dataset(root)` writes `train-*.tar` shards (and a `vocab.txt` for tokenizer "auto") and returns
the exact keys that must be trained on and the exact skip count per reason. Use it with `HOSTILE_LIMITS`, the
DataConfig overrides the expectations assume (a small member cap, so the oversized caption stays small on disk).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from r2d2ds.data.tokenizer import write_vocab

from .shard_utils import add_member, caption_json, jpeg_bytes

HOSTILE_LIMITS = dict(max_member_bytes=256 * 1024, max_skipped_fraction=0.95)


class Payload:
    """Unpickling this runs `touch marker` (the classic __reduce__ attack). Nothing may ever unpickle it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def image_bytes(fmt: str, colour=(30, 120, 200), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes: decoding it would fail
    or allocate width * height * 3 bytes, so a sample skipped as too_many_pixels was rejected from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


@dataclass
class HostileDataset:
    root: Path
    good: list[str]  # keys that must be seen exactly once per epoch
    skipped: Counter = field(default_factory=Counter)  # reason -> exact count
    marker: Path | None = None  # must never exist
    captions: dict[str, int] = field(default_factory=dict)  # key -> number of captions kept (retrieval)


def write_hostile_dataset(root: Path, marker: Path) -> HostileDataset:
    root.mkdir(parents=True, exist_ok=True)
    ds = HostileDataset(root=root, good=[], marker=marker)
    caps: set[str] = set()

    def good(tf, key: str, image: bytes, *captions: str, ext: str = "jpg", **extra) -> None:
        add_member(tf, f"{key}.{ext}", image)
        add_member(tf, f"{key}.json", caption_json(*captions, **extra))
        ds.good.append(key)
        ds.captions[key] = sum(1 for c in captions if c.strip())
        caps.update("".join(captions))

    def bad(tf, reason: str, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            add_member(tf, name, data)
        ds.skipped[reason] += 1

    jpg = jpeg_bytes()
    cap = caption_json("一只猫")
    payload = pickle_payload(marker)
    # --- shard 0: one of each kind of bad sample between good ones
    with tarfile.open(root / "train-000000.tar", "w") as tf:
        good(tf, "g0", jpeg_bytes((200, 30, 30)), "红色的图片", "第二个说明", image_id=7)
        good(tf, "png_named_jpg", image_bytes("PNG"), "文件名是jpg的PNG图片")  # must be KEPT
        good(tf, "webp", image_bytes("WEBP"), "一张WebP图片", ext="webp")
        good(tf, "long_caption", jpg, "长" * 20000)  # very long but under the member cap: cut, kept
        good(tf, "ws_and_good", jpg, "   ", "\t\n", "有效的说明")  # blank captions dropped, one kept
        # The pickle payload beside a good sample: the sample is trained on, the payload is never read.
        add_member(tf, "pickled.jpg", jpg)
        add_member(tf, "pickled.json", caption_json("旁边有pickle的样本"))
        add_member(tf, "pickled.pyd", payload)
        add_member(tf, "pickled.pickle", payload)
        add_member(tf, "pickled.pth", payload)
        ds.good.append("pickled")
        ds.captions["pickled"] = 1
        caps.update("旁边有pickle的样本")
        bad(tf, "corrupt_image", [("trunc.jpg", jpg[: len(jpg) // 2]), ("trunc.json", cap)])
        bad(tf, "empty_image", [("zero.jpg", b""), ("zero.json", cap)])
        bad(tf, "image_format", [("text.jpg", "这不是图片，只是一段文字。".encode()), ("text.json", cap)])
        bad(tf, "image_format", [("tiff.jpg", image_bytes("TIFF")), ("tiff.json", cap)])
        bad(tf, "image_format", [("bmp.jpg", image_bytes("BMP")), ("bmp.json", cap)])
        bad(tf, "image_format", [("pickle_as_image.jpg", payload), ("pickle_as_image.json", cap)])
        bad(tf, "too_many_pixels", [("big.png", png_header_only(9000, 9000)), ("big.json", cap)])  # > our cap
        bad(tf, "too_many_pixels", [("bomb.png", png_header_only(20000, 20000)), ("bomb.json", cap)])  # > PIL's
        bad(tf, "empty_caption", [("empty.jpg", jpg), ("empty.json", caption_json(""))])
        bad(tf, "empty_caption", [("blank.jpg", jpg), ("blank.txt", b"  \n\t\n")])
        bad(tf, "no_caption", [("nocap.jpg", jpg)])
        bad(tf, "no_image", [("noimg.json", cap)])
        bad(tf, "bad_text", [("latin1.jpg", jpg), ("latin1.txt", "café au lait".encode("latin-1"))])
        bad(tf, "bad_json", [("gbk.jpg", jpg), ("gbk.json", json.dumps({"caption": "中文"},
                                                                      ensure_ascii=False).encode("gbk"))])
        bad(tf, "bad_json", [("malformed.jpg", jpg), ("malformed.json", b'{"captions": ["a", ')])
        bad(tf, "bad_json", [("pickle_as_json.jpg", jpg), ("pickle_as_json.json", payload)])
        bad(tf, "bad_json", [("toplist.jpg", jpg), ("toplist.json", b'["a caption"]')])
        bad(tf, "json_too_deep", [("deep.jpg", jpg), ("deep.json", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000
                                                                       + b', "caption": "deep"}')])
        bad(tf, "bad_image_id", [("hugeid.jpg", jpg), ("hugeid.json", caption_json("大的编号", image_id=2**70))])
        bad(tf, "bad_image_id", [("strid.jpg", jpg), ("strid.json", caption_json("文字编号", image_id="12"))])
        bad(tf, "member_too_large", [("hugecap.jpg", jpg), ("hugecap.txt", ("巨" * 200_000).encode())])
        bad(tf, "duplicate_member", [("dup.jpg", jpg), ("dup.jpg", jpeg_bytes((0, 0, 0))), ("dup.json", cap)])
        good(tf, "g1", jpeg_bytes((30, 200, 30)), "绿色的图片")
        good(tf, "g2", jpeg_bytes((30, 30, 200)), "蓝色的图片")
        bad(tf, "duplicate_key", [("g1.jpg", jpg), ("g1.json", cap)])  # g1 again, after another sample
    # --- shard 1: good samples, then cut in the middle of a member
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(4):
            add_member(tf, f"c{i}.jpg", jpeg_bytes((40 * i, 90, 60), size=40))
            add_member(tf, f"c{i}.json", caption_json(f"被截断的分片{i}"))
    raw = buf.getvalue()
    (root / "train-000001.tar").write_bytes(raw[: raw.index(b"c3.jpg") + 512 + 200])
    for i in range(3):
        ds.good.append(f"c{i}")
        ds.captions[f"c{i}"] = 1
    caps.update("被截断的分片")
    ds.skipped["broken_tar"] += 1  # c3, lost with the rest of the shard
    # --- shard 2: an empty (valid) tar; shard 3: zero bytes; shard 4: not a tar
    with tarfile.open(root / "train-000002.tar", "w"):
        pass
    ds.skipped["empty_shard"] += 1
    (root / "train-000003.tar").write_bytes(b"")
    (root / "train-000004.tar").write_bytes(b"<html>404 Not Found</html>\n" * 40)
    ds.skipped["unreadable_shard"] += 2
    # --- shard 5: good samples only, with txt captions
    with tarfile.open(root / "train-000005.tar", "w") as tf:
        for i in range(5):
            add_member(tf, f"t{i}.jpg", jpeg_bytes((10, 200, 40 * i)))
            add_member(tf, f"t{i}.txt", f"第六个分片{i}\n另一行\n".encode())
            ds.good.append(f"t{i}")
            ds.captions[f"t{i}"] = 2
        caps.update("第六个分片另一行0123456789")
    # --- shard 6: cut exactly between two members: tarfile reads that as a normal end, but the end-of-archive
    # marker is missing, so the sample read last (complete or not, nobody can tell) is dropped and reported.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            add_member(tf, f"e{i}.jpg", jpeg_bytes((90, 40 * i, 160)))
            add_member(tf, f"e{i}.txt", f"边界{i}".encode())
    raw = buf.getvalue()
    (root / "train-000006.tar").write_bytes(raw[: raw.index(b"e2.jpg")])
    ds.good.append("e0")
    ds.captions["e0"] = 1
    caps.update("边界")
    ds.skipped["broken_tar"] += 1
    write_vocab(root / "vocab.txt", caps | set("0123456789"))
    ds.good.sort()
    return ds
