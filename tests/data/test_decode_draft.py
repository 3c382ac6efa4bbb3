"""decode_image's JPEG draft mode: smaller DCT-scaled decodes, never below the size asked for."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from r2d2ds.data import decode_image, image_transform


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    # smooth content (a gradient plus mild noise), as photos are, so scaled decodes stay close to full ones
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([xx * 255 / size[0], yy * 255 / size[1], (xx + yy) * 127 / sum(size)], -1)
    arr = np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("size, min_size, expect", [
    ((256, 256), 60, (64, 64)),  # 1/4 scale: 64 >= 60 (1/8 would be 32 < 60)
    ((224, 224), 80, (112, 112)),  # a 224 px photo for a 64 px model (1.25 x 64 = 80)
    ((300, 200), 60, (150, 100)),  # both sides must stay >= 60: 1/2, not 1/4 (75x50)
    ((256, 256), 0, (256, 256)),  # off by default
    ((100, 100), 80, (100, 100)),  # 1/2 would be 50 < 80: full size
])
def test_jpeg_draft_sizes(size, min_size, expect):
    assert decode_image(_encoded(size, "JPEG"), min_size=min_size).size == expect


def test_other_formats_ignore_min_size():
    assert decode_image(_encoded((256, 256), "PNG"), min_size=60).size == (256, 256)


def test_drafted_pixels_match_the_full_decode_after_the_transform():
    data = _encoded((256, 256), "JPEG")
    t = image_transform(48, train=False)
    full, drafted = t(decode_image(data)), t(decode_image(data, min_size=60))
    assert drafted.shape == full.shape == (3, 48, 48)
    # normalised units (std ~ 0.27 of 255): a scaled DCT decode differs by a few grey levels at most
    assert torch.mean(torch.abs(drafted - full)) < 0.05
