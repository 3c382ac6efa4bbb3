"""The skip contract: one raw sample -> a decoded, tokenised sample, or a counted and reported skip.

`decode_or_skip` is the only place where a sample is read: the training stream and the retrieval split both go
through it. ANY exception while decoding one sample (json, text, ids, image, transform, tokenisation) turns into a
skip counted by reason and reported once with shard and key; nothing about a sample can stop a run. Error items
of the tar reader (broken tar, oversized or duplicate members) are counted the same way. What does stop a run is
a skipped fraction above `data.max_skipped_fraction` (`SkipCounter.check`): a wrong path or a broken dataset must
not quietly train on nothing.

Only safe decoders run on shard bytes, each under a limit from `DataConfig`: PIL restricted to
`data.image_formats` with the pixel count checked from the image header before any pixel is decoded, `json` after
a size and a nesting-depth check that does not recurse, strict UTF-8 for text. Nothing is ever unpickled or
evaluated.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from r2d2ds.config import DataConfig
from r2d2ds.data.tar_reader import IMAGE_EXTS

logger = logging.getLogger("r2d2ds.data.shards")  # one logger for every data/skipped report

_INT64 = (-(2**63), 2**63 - 1)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_REPORTED: set[tuple[str, str, str]] = set()  # per process: each bad (shard, key, reason) is logged once
MAX_REPORTED = 100_000  # bounds the memory of that set (and the log) on a huge, badly broken dataset


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataError(RuntimeError):
    """The data as a whole is unusable (too many skips, no valid sample): the run stops with this."""


def key_to_image_id(key: str) -> int:
    """A stable non-negative 63-bit id from a sample key (equal keys, equal ids; not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


# ----------------------------------------------------------------------------------------------- counting


class SkipCounter:
    """Samples seen and skipped, by reason. `take()` returns and clears the skips since the previous call."""

    def __init__(self) -> None:
        self.seen = 0  # raw items looked at: good samples + skipped ones
        self.total = 0
        self.reasons: Counter[str] = Counter()
        self._delta: Counter[str] = Counter()

    def skip(self, shard: str, key: str, reason: str, detail: str = "") -> None:
        self.total += 1
        self.reasons[reason] += 1
        self._delta[reason] += 1
        ident = (shard, key, reason)
        if ident in _REPORTED or len(_REPORTED) > MAX_REPORTED:
            return
        _REPORTED.add(ident)
        if len(_REPORTED) > MAX_REPORTED:
            logger.warning("data/skipped: %d distinct bad samples reported; further ones are only counted",
                           MAX_REPORTED)
            return
        logger.warning("data/skipped: shard '%s' key '%s': %s%s", shard, key, reason, f" ({detail})" if detail else "")

    def take(self) -> tuple[int, dict[str, int]]:
        delta = dict(self._delta)
        self._delta.clear()
        return sum(delta.values()), delta

    def check(self, max_fraction: float, where: str) -> None:
        """Raise DataError when more than `max_fraction` of the items seen so far were skipped."""
        if self.seen and self.total > max_fraction * self.seen:
            raise DataError(
                f"data: {self.total} of {self.seen} samples ({100 * self.total / self.seen:.1f}%) were skipped "
                f"in {where}, more than data.max_skipped_fraction={max_fraction} allows "
                f"(reasons: {dict(self.reasons)}). Check the data path and the shards (the log names each bad "
                f"shard and key), or raise data.max_skipped_fraction.")


# ----------------------------------------------------------------------------------------------- decoders


def json_depth(data: bytes) -> int:
    """Nesting depth of the JSON text `data`, without recursion (json.loads recurses once per level and a
    deep enough document raises RecursionError, or overflows the C stack)."""
    if data.count(b"[") + data.count(b"{") <= 1:
        return data.count(b"[") + data.count(b"{")
    brackets = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    step = np.isin(brackets, (ord("["), ord("{"))).astype(np.int64) - np.isin(brackets, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _parse_json(data: bytes, cfg: DataConfig) -> dict[str, Any]:
    if len(data) > cfg.max_json_bytes:
        raise BadSample("json_too_large", f"{len(data)} bytes > data.max_json_bytes={cfg.max_json_bytes}")
    # Counting brackets is a cheap upper bound of the depth; the exact scan runs only when it might be over.
    depth = json_depth(data) if data.count(b"[") + data.count(b"{") > cfg.max_json_depth else 0
    if depth > cfg.max_json_depth:
        raise BadSample("json_too_deep", f"nesting depth {depth} > data.max_json_depth={cfg.max_json_depth}")
    try:
        meta = json.loads(data.decode("utf-8"))
    except Exception as exn:  # UnicodeDecodeError, JSONDecodeError, int digit limits...
        raise BadSample("bad_json", f"{type(exn).__name__}: {exn}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", "top level is not an object")
    return meta


def parse_sample(raw: dict[str, Any], cfg: DataConfig | None = None) -> tuple[bytes, list[str], int]:
    """(image bytes, non-empty captions, image id) of a raw sample; raises BadSample. No image decoding here,
    so callers can check a sample cheaply before paying for the decode. Captions are stripped, cut to
    `data.max_caption_chars` and at most `data.max_captions` are kept."""
    cfg = cfg or DataConfig()
    if "__error__" in raw:
        raise BadSample(*raw["__error__"])
    captions: list[str] | None = None
    image_id: int | None = None
    if "json" in raw:
        meta = _parse_json(raw["json"], cfg)
        if isinstance(meta.get("captions"), list):
            captions = [c for c in meta["captions"] if isinstance(c, str)]
        elif isinstance(meta.get("caption"), str):
            captions = [meta["caption"]]
        iid = meta.get("image_id")
        if iid is not None:
            # Checked here, not in the collate: an id that int64 cannot hold would fail a whole batch there.
            if isinstance(iid, bool) or not isinstance(iid, int) or not _INT64[0] <= iid <= _INT64[1]:
                raise BadSample("bad_image_id", f"image_id {str(iid)[:40]!r} is not an int64 integer")
            image_id = iid
    if captions is None and "txt" in raw:
        try:
            captions = raw["txt"].decode("utf-8").splitlines()
        except UnicodeDecodeError as exn:
            raise BadSample("bad_text", str(exn)) from None
    if captions is None:
        raise BadSample("no_caption")
    captions = [c.strip()[: cfg.max_caption_chars] for c in captions if c.strip()][: cfg.max_captions]
    if not captions:
        raise BadSample("empty_caption")
    image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if image is None:
        raise BadSample("no_image")
    return image, captions, image_id if image_id is not None else key_to_image_id(raw.get("__key__", "?"))


def decode_image(data: bytes, cfg: DataConfig | None = None, min_size: int = 0) -> Image.Image:
    """Decode image bytes with PIL only, as RGB; raises BadSample.

    Only `data.image_formats` are tried (a TIFF, EPS or PSD named .jpg never reaches its parser), and the
    pixel count is checked from the header before `load()` decodes anything. `load()` forces the full decode
    here, so a truncated JPEG fails now (LOAD_TRUNCATED_IMAGES stays False), not later in a transform.
    `min_size` > 0 lets a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT (PIL's draft mode) as long as both
    sides stay >= min_size: a 224 px JPEG for a 64 px model decodes at 112 px, which measured 38% less time
    per image for decode + crop + resize (the loader shares the CPU with the ranks). Other formats ignore it.
    """
    cfg = cfg or DataConfig()
    if not data:
        raise BadSample("empty_image", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(cfg.image_formats))
        except UnidentifiedImageError:
            raise BadSample("image_format", f"not {'/'.join(cfg.image_formats)} "
                                            f"(starts with {data[:8]!r})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
            # PIL's own header check (above Image.MAX_IMAGE_PIXELS) fired before ours could.
            raise BadSample("too_many_pixels", str(exn)) from None
        pixels = img.width * img.height
        if pixels > cfg.max_image_pixels:
            raise BadSample("too_many_pixels", f"{img.width}x{img.height} > data.max_image_pixels="
                                               f"{cfg.max_image_pixels}")
        if min_size > 0 and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------- one sample


@dataclass
class Sample:
    key: str
    image_id: int
    pixels: Any  # the transform's output, e.g. uint8 (3, S, S)
    captions: list[str]
    input_ids: list[list[int]]  # one row per caption, padded to max_text_len
    attention_mask: list[list[int]]


def decode_sample(raw: dict[str, Any], cfg: DataConfig, tokenizer: Any, max_text_len: int,
                  transform: Callable[[Image.Image, str], Any],
                  pick: Callable[[list[str], str], list[str]] | None = None, min_size: int = 0) -> Sample:
    """Everything one sample needs, or BadSample. `pick(captions, key)` chooses the captions to keep (the
    training stream keeps one); `transform(image, key)` makes the pixels; `min_size`: see `decode_image`."""
    key = raw.get("__key__", "?")
    image, captions, image_id = parse_sample(raw, cfg)
    if pick is not None:
        captions = pick(captions, key)
    try:
        pixels = transform(decode_image(image, cfg, min_size), key)
    except BadSample:
        raise
    except Exception as exn:  # PIL: OSError, SyntaxError, ValueError, DecompressionBomb...; a degenerate transform
        raise BadSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    try:
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_text_len)
    except Exception as exn:
        raise BadSample("bad_caption", f"tokenizer: {type(exn).__name__}: {exn}") from None
    return Sample(key, image_id, pixels, captions, enc["input_ids"], enc["attention_mask"])


def decode_or_skip(raw: dict[str, Any], counter: SkipCounter, **kwargs: Any) -> Sample | None:
    """`decode_sample(raw, **kwargs)`, or None after counting and reporting the skip. The one place where a bad
    sample is caught: any Exception (RecursionError, MemoryError and all) is a skip, never a crash."""
    counter.seen += 1
    try:
        return decode_sample(raw, **kwargs)
    except BadSample as bad:
        reason, detail = bad.reason, bad.detail
    except Exception as exn:
        reason, detail = "bad_sample", f"{type(exn).__name__}: {exn}"
    counter.skip(raw.get("__url__", "?"), raw.get("__key__", "?"), reason, detail[:300])
    return None
