"""`python -m r2d2ds.data.prepare {synthetic,folder} ...`: write webdataset shards plus manifest.json.

    synthetic --out DIR [--train 8000 --val 300 --test 300 --image-size 64 --seed 0 --shard-size 1000]
    folder --images DIR --captions FILE --format {flickr8k,tsv,csv,jsonl} [--split NAME=IDLIST ...] --out DIR
           [--image-size S] [--shard-size 1000]

Output: DIR/{split}-{000000..}.tar (KEY.jpg, KEY.json {"captions", "image_id", "key"}, KEY.txt first caption)
and DIR/manifest.json; the synthetic set also writes DIR/vocab.txt (tokenizer "auto").
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from r2d2ds.data import synthetic
from r2d2ds.data.samples import key_to_image_id
from r2d2ds.data.sources import FORMATS, CaptionFileError, Record, read_captions, read_id_list
from r2d2ds.data.tokenizer import write_vocab
from r2d2ds.data.writer import ShardWriter, write_manifest

logger = logging.getLogger("r2d2ds.data.prepare")


# ----------------------------------------------------------------------------------------------- synthetic


def prepare_synthetic(out: str | Path, train: int = 8000, val: int = 300, test: int = 300,
                      image_size: int = 64, seed: int = 0, shard_size: int = 1000) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = synthetic.vocab_chars()
    splits: dict[str, Any] = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        if n <= 0:
            continue
        writer = ShardWriter(out, split, shard_size)
        for i in range(n):
            image, caps, groups = synthetic.make_sample(seed, split, i, image_size)
            stray = set("".join(caps)) - chars
            if stray:  # the vocab must cover every caption, or "auto" tokenization would emit [UNK]
                raise AssertionError(f"synthetic caption uses characters outside the vocab: {sorted(stray)}")
            key = f"{split}_{i:08d}"
            writer.write(key, image, caps, key_to_image_id(key),
                         extra={"objects": [[g.position, g.count, g.colour, g.shape] for g in groups]})
        splits[split] = writer.close()
    vocab_size = write_vocab(out / "vocab.txt", chars)
    write_manifest(out, splits, {"kind": "synthetic", "seed": seed, "image_size": image_size},
                   {}, vocab="vocab.txt", vocab_size=vocab_size)
    return splits


# ----------------------------------------------------------------------------------------------- folder


def _key_of(image: str) -> str:
    stem = str(Path(image).with_suffix(""))
    return re.sub(r"[^0-9A-Za-z_\-]", "_", stem).strip("_") or "sample"


def _image_bytes(path: Path, image_size: int | None) -> bytes:
    """Bytes to store as KEY.jpg. Decodes fully first so a corrupt file is skipped here, not at training time.
    JPEG sources are copied as they are unless a size is asked for; anything else is re-encoded as JPEG."""
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
    if image_size is None and fmt == "JPEG":
        return data
    img = img.convert("RGB")
    if image_size is not None:
        w, h = img.size
        scale = image_size / min(w, h)  # shorter side to image_size, aspect kept (the transform center-crops)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _assign_splits(records: list[Record], split_args: list[str], skipped: Counter) -> dict[str, list[Record]]:
    if not split_args:
        return {"train": records}
    lookup: dict[str, Record] = {}
    for rec in records:
        p = Path(rec.image)
        for name in (rec.image, p.name, p.stem, str(p.with_suffix(""))):
            lookup.setdefault(name, rec)
    out: dict[str, list[Record]] = {}
    for arg in split_args:
        if "=" not in arg:
            raise ValueError(f"--split expects NAME=IDLIST_FILE, got {arg!r}")
        name, file = arg.split("=", 1)
        chosen = []
        for image_id in read_id_list(file):
            rec = lookup.get(image_id)
            if rec is None:
                skipped["no_caption"] += 1
                logger.warning("prepare: id '%s' of split '%s' (%s) has no caption line; skipped",
                               image_id, name, file)
                continue
            chosen.append(rec)
        out[name] = chosen
    return out


def prepare_folder(images: str | Path, captions: str | Path, fmt: str, out: str | Path,
                   splits: list[str] | None = None, image_size: int | None = None,
                   shard_size: int = 1000) -> dict[str, Any]:
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"--images '{images}' is not a directory")
    records = read_captions(captions, fmt)
    skipped: Counter[str] = Counter()
    assignment = _assign_splits(records, splits or [], skipped)
    used_keys: set[str] = set()
    result: dict[str, Any] = {}
    for split, recs in assignment.items():
        writer = ShardWriter(out, split, shard_size)
        for rec in recs:
            caps = [c.strip() for c in rec.captions if c.strip()]
            path = Path(rec.image) if Path(rec.image).is_absolute() else images / rec.image
            reason = None
            if not caps:
                reason = "empty_caption"
            elif not path.is_file():
                reason = "missing_image"
            else:
                try:
                    data = _image_bytes(path, image_size)
                except Exception as exn:  # any PIL failure: unreadable or corrupt image
                    reason = f"corrupt_image ({type(exn).__name__}: {exn})"
            if reason is not None:
                skipped[reason.split(" ")[0]] += 1
                logger.warning("prepare: %s (line %d of %s): %s; skipped",
                               rec.image, rec.line, captions, reason)
                continue
            key = base = _key_of(rec.image)
            n = 1
            while key in used_keys:  # the same file name in two sub-folders
                key, n = f"{base}_{n}", n + 1
            used_keys.add(key)
            iid = rec.image_id if rec.image_id is not None else key_to_image_id(key)
            writer.write(key, data, caps, iid)
        result[split] = writer.close()
    source = {"kind": "folder", "format": fmt, "images": str(images), "captions": str(captions),
              "image_size": image_size}
    write_manifest(out, result, source, skipped)
    return {"splits": result, "skipped": dict(skipped)}


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r2d2ds prepare", description="Convert data into webdataset shards.")
    sub = ap.add_subparsers(dest="source", required=True)
    s = sub.add_parser("synthetic", help="the built-in synthetic shapes set (Chinese captions)")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, default=8000)
    s.add_argument("--val", type=int, default=300)
    s.add_argument("--test", type=int, default=300)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=1000)
    f = sub.add_parser("folder", help="a folder of images plus a caption file")
    f.add_argument("--images", required=True)
    f.add_argument("--captions", required=True)
    f.add_argument("--format", required=True, choices=FORMATS)
    f.add_argument("--split", action="append", default=[], metavar="NAME=IDLIST_FILE",
                   help="repeatable; ids one per line (no extension); default: everything in split 'train'")
    f.add_argument("--out", required=True)
    f.add_argument("--image-size", type=int, default=None,
                   help="resize the shorter side, re-encode as JPEG (default: copy JPEG bytes as they are)")
    f.add_argument("--shard-size", type=int, default=1000)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.source == "synthetic":
            splits = prepare_synthetic(args.out, args.train, args.val, args.test, args.image_size, args.seed,
                                       args.shard_size)
            skipped: dict[str, int] = {}
        else:
            res = prepare_folder(args.images, args.captions, args.format, args.out, args.split,
                                 args.image_size, args.shard_size)
            splits, skipped = res["splits"], res["skipped"]
    except (FileNotFoundError, ValueError, CaptionFileError) as exn:
        print(f"prepare: error: {exn}", file=sys.stderr)
        return 2
    for name, s in splits.items():
        print(f"{name}: {s['samples']} samples, {s['captions']} captions, {len(s['shards'])} shard(s)")
    if skipped:
        print(f"skipped: {skipped}")
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
