"""Helpers for building shards by hand in the data tests."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def caption_json(*captions: str, **extra) -> bytes:
    return json.dumps({"captions": list(captions), **extra}, ensure_ascii=False).encode("utf-8")
