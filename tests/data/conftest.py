"""Fixtures for the data tests: a small synthetic dataset and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

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
