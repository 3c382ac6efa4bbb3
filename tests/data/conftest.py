"""Fixtures for the data tests: a small synthetic dataset and hand-built shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from r2d2ds.data.prepare import prepare_synthetic
from r2d2ds.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """240 train samples in 6 shards of 40, 30 val samples; 32 px images to keep decoding cheap."""
    out = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(out, train=240, val=30, test=0, image_size=32, seed=0, shard_size=40)
    return out


@pytest.fixture(scope="session")
def synth_tokenizer(synth_dir):
    return load_tokenizer("auto", str(synth_dir))


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
