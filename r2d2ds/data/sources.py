"""Readers for caption files of an image folder: Flickr8k-CN lines, TSV, CSV and JSONL.

Each reader returns records in a deterministic order (first appearance in the file); several lines or rows
for the same image are grouped into one record with several captions.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("flickr8k", "tsv", "csv", "jsonl")
_FLICKR_LINE = re.compile(r"^(?P<image>[^#\s]+)#[A-Za-z]+#(?P<k>\d+)\s+(?P<caption>.*)$")
_IMAGE_HEADERS = {"image", "image_path", "file", "filename", "file_name", "path", "url"}
_CAPTION_HEADERS = {"caption", "text", "captions"}


@dataclass
class Record:
    image: str  # path relative to the images folder (or absolute)
    captions: list[str] = field(default_factory=list)
    image_id: int | None = None
    line: int = 0  # first line in the caption file, for error messages


class CaptionFileError(ValueError):
    pass


def _group(rows: list[tuple[str, str, int]]) -> list[Record]:
    records: dict[str, Record] = {}
    for image, caption, line in rows:
        rec = records.get(image)
        if rec is None:
            rec = records[image] = Record(image=image, line=line)
        rec.captions.append(caption)
    return list(records.values())


def read_flickr8k(path: Path) -> list[Record]:
    """`<id>.jpg#zhc#<k> <caption>` lines; captions of an image ordered by k."""
    rows: dict[str, list[tuple[int, str]]] = {}
    first: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            m = _FLICKR_LINE.match(line)
            if m is None:
                # A line with an id but no caption text is an empty caption, not a format error.
                head = line.split()[0] if line.split() else ""
                if "#" in head and len(line.split()) == 1:
                    image = head.split("#")[0]
                    rows.setdefault(image, [])
                    first.setdefault(image, n)
                    continue
                raise CaptionFileError(f"{path}:{n}: expected '<id>.jpg#zhc#<k> <caption>', "
                                       f"got {line[:80]!r}")
            image = m["image"]
            rows.setdefault(image, []).append((int(m["k"]), m["caption"]))
            first.setdefault(image, n)
    return [Record(image=img, captions=[c for _, c in sorted(caps, key=lambda t: t[0])], line=first[img])
            for img, caps in rows.items()]


def read_delimited(path: Path, delimiter: str) -> list[Record]:
    """Two columns, image and caption; an optional header row `image,caption`."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        rows: list[tuple[str, str, int]] = []
        for n, row in enumerate(reader, 1):
            if not row or not any(c.strip() for c in row):
                continue
            if n == 1 and row[0].strip().lower() in _IMAGE_HEADERS and len(row) > 1 \
                    and row[1].strip().lower() in _CAPTION_HEADERS:
                continue
            if len(row) < 2:
                rows.append((row[0].strip(), "", n))  # no caption column: an empty caption, skipped later
                continue
            # A caption containing the delimiter (unquoted TSV) is joined back rather than truncated.
            rows.append((row[0].strip(), delimiter.join(row[1:]), n))
    return _group(rows)


def read_jsonl(path: Path) -> list[Record]:
    """{"image": ..., "caption": str | "captions": [...], optional "image_id": int} per line."""
    records: dict[str, Record] = {}
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exn:
                raise CaptionFileError(f"{path}:{n}: not valid JSON: {exn}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise CaptionFileError(f"{path}:{n}: expected an object with an 'image' string")
            caps = obj.get("captions", obj.get("caption", []))
            caps = [caps] if isinstance(caps, str) else [c for c in caps if isinstance(c, str)]
            rec = records.get(obj["image"])
            if rec is None:
                rec = records[obj["image"]] = Record(image=obj["image"], line=n)
            rec.captions.extend(caps)
            iid = obj.get("image_id")
            if isinstance(iid, int) and not isinstance(iid, bool):
                rec.image_id = iid
    return list(records.values())


def read_captions(path: str | Path, fmt: str) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--captions '{path}' does not exist")
    if fmt == "flickr8k":
        return read_flickr8k(path)
    if fmt == "tsv":
        return read_delimited(path, "\t")
    if fmt == "csv":
        return read_delimited(path, ",")
    if fmt == "jsonl":
        return read_jsonl(path)
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")


def read_id_list(path: str | Path) -> list[str]:
    """Image ids, one per line (Flickr8k's split files: ids without the extension)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--split id list '{path}' does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
