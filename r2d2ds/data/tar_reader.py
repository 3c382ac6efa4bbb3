"""One tar shard -> raw samples, with every limit checked from the tar headers before a member is read.

Grouping follows webdataset (and img2dataset): consecutive members `KEY.EXT` form one sample, the key being the
name up to the first dot of its last path component, EXT lower-cased. Why not `webdataset.tarfile_to_samples`:
it reads every member whole before anyone can look at its size, and it reads members we never use (a `.pyd` or
`.pickle` member is read into memory and only a decode stage would unpickle it). Here only the members a sample
needs (`USED_EXTS`) are read at all, each only after its header size passed `data.max_member_bytes`; nothing else
leaves the tar.

Failures never raise. A sample that cannot be trusted is yielded as an error item
`{"__key__", "__url__", "__error__": (reason, detail)}` so that it flows through the same pipeline stages as good
samples (rank/worker split, shuffle, resume fast-forward) and exactly one slot counts it. Shard-level failures
(unreadable file, not a tar, a tar cut in the middle, an empty tar) are one error item each, with key "-" or the
key of the sample that was being read when the tar broke.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
USED_EXTS = frozenset(IMAGE_EXTS + ("json", "txt"))
_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's base_plus_ext: (dir/key, ext)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: no end-of-archive check through them


def error_item(url: str, key: str, reason: str, detail: str = "") -> dict[str, Any]:
    return {"__key__": key, "__url__": url, "__error__": (reason, detail)}


class _Group:
    """The members of one sample as they are read; `error` marks it bad but keeps grouping its members."""

    def __init__(self, key: str, url: str) -> None:
        self.key, self.url = key, url
        self.members: dict[str, bytes | None] = {}
        self.error: tuple[str, str] | None = None

    def item(self) -> dict[str, Any]:
        if self.error is not None:
            return error_item(self.url, self.key, *self.error)
        sample: dict[str, Any] = {"__key__": self.key, "__url__": self.url}
        sample.update({ext: data for ext, data in self.members.items() if data is not None})
        return sample


def _trailer_ok(f, end: int) -> bool:
    """A plain tar ends with two zero blocks after its last member; a tar cut at a member boundary does not
    (tarfile's stream mode reads such a cut, or a cut inside a header, as a normal end)."""
    f.seek(end)
    tail = f.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


def read_shard(url: str, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """Raw samples of the tar at `url` ({"__key__", "__url__", ext: bytes}) and error items, in tar order."""
    try:
        f = open(url, "rb")  # noqa: SIM115 (closed below; a generator cannot use `with` around its yields)
    except OSError as exn:
        yield error_item(url, "-", "unreadable_shard", f"{type(exn).__name__}: {exn}")
        return
    try:
        yield from _read_open(f, url, max_member_bytes)
    finally:
        f.close()


def _read_open(f, url: str, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    compressed = f.read(6).startswith(_COMPRESSED)
    f.seek(0)
    group: _Group | None = None
    keys: set[str] = set()
    samples = 0
    try:
        tf = tarfile.open(fileobj=f, mode="r|*" if compressed else "r|")
        for info in tf:
            if not info.isfile():
                continue  # directories, links, devices: never followed, never part of a sample
            m = _NAME.match(info.name)
            if m is None:
                continue  # no extension: not a sample member (webdataset ignores these too)
            key, ext = m.group(1), m.group(2).lower()
            if group is None or key != group.key:
                if group is not None:
                    samples += 1
                    yield group.item()
                group = _Group(key, url)
                if key in keys:
                    group.error = ("duplicate_key", "the key appeared earlier in this shard")
                keys.add(key)
            if ext in group.members:
                group.error = group.error or ("duplicate_member", f"two members named '{info.name}'")
                continue
            if ext not in USED_EXTS:
                group.members[ext] = None  # never read: pickles and other payloads stay inside the tar
                continue
            if info.size > max_member_bytes:
                group.members[ext] = None
                group.error = group.error or ("member_too_large", f"'{info.name}' is {info.size} bytes > "
                                              f"data.max_member_bytes={max_member_bytes}")
                continue
            if group.error is not None:
                group.members[ext] = None
                continue
            group.members[ext] = tf.extractfile(info).read()
    except Exception as exn:  # ReadError, EOFError, zlib errors...: the rest of this shard is unreadable
        reason = "unreadable_shard" if group is None and samples == 0 else "broken_tar"
        yield error_item(url, group.key if group is not None else "-", reason, f"{type(exn).__name__}: {exn}")
        return
    if group is not None:
        if not compressed and not _trailer_ok(f, tf.offset):
            # The last sample may be incomplete (and more samples may be lost): drop it with the report.
            yield error_item(url, group.key, "broken_tar", "no end-of-archive marker: the tar was cut")
            return
        yield group.item()
        return
    if not compressed and os.fstat(f.fileno()).st_size > 0 and not _trailer_ok(f, tf.offset):
        yield error_item(url, "-", "unreadable_shard", "no tar member and no end-of-archive marker")
    else:
        yield error_item(url, "-", "empty_shard", "the tar holds no sample")
