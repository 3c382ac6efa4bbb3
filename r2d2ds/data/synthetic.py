"""A built-in synthetic image-caption set: PIL drawings of shapes with Chinese captions that say exactly what
is drawn (position, count, colour, shape), so a tiny two-tower model can learn it in minutes on a CPU.

Everything in the image is named by the caption: a plain grey background, 1-3 groups of identical objects,
each group in its own well-separated region (a quadrant, or the centre when it is the only group), large
saturated shapes. Several phrasings per image give caption variety without changing the content.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Name -> RGB; saturated and far apart so colour survives resizing and JPEG.
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 20, 20), "绿色": (20, 170, 40), "蓝色": (30, 60, 230), "黄色": (245, 220, 0),
    "紫色": (140, 30, 190), "橙色": (255, 130, 0), "白色": (255, 255, 255), "黑色": (0, 0, 0),
}
SHAPES = ("圆形", "正方形", "三角形", "星形", "十字")
QUADRANTS = ("左上", "右上", "左下", "右下")
POSITIONS = QUADRANTS + ("中间",)
NUMERALS = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九")
BACKGROUND = (128, 128, 128)
# Every literal the phrasings below can emit; the vocab is built from this and checked against every caption.
_TEMPLATE_TEXT = "有的，。是在角画面中图一共个形：这张里"


@dataclass(frozen=True)
class Group:
    position: str
    count: int
    colour: str
    shape: str


def vocab_chars() -> set[str]:
    words = list(COLOURS) + list(SHAPES) + list(POSITIONS) + list(NUMERALS) + [_TEMPLATE_TEXT]
    return set("".join(words))


def sample_scene(rng: random.Random) -> list[Group]:
    n = rng.choices((1, 2, 3), weights=(0.4, 0.4, 0.2))[0]
    positions = [rng.choice(POSITIONS)] if n == 1 else rng.sample(QUADRANTS, n)
    groups = [Group(p, rng.randint(1, 3), rng.choice(list(COLOURS)), rng.choice(SHAPES)) for p in positions]
    return sorted(groups, key=lambda g: POSITIONS.index(g.position))


def _region(position: str, size: float) -> tuple[float, float, float]:
    """(x0, y0, side) of the square a group is drawn in."""
    half = size / 2
    if position == "中间":
        return size * 0.15, size * 0.15, size * 0.7
    x0 = 0.0 if position in ("左上", "左下") else half
    y0 = 0.0 if position in ("左上", "右上") else half
    return x0, y0, half


# Object centres (fractions of the region side) and radius fraction, per count.
_LAYOUT = {1: ([(0.5, 0.5)], 0.36), 2: ([(0.27, 0.5), (0.73, 0.5)], 0.21),
           3: ([(0.27, 0.29), (0.73, 0.29), (0.5, 0.73)], 0.2)}


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "圆形":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "正方形":
        s = r * 0.85
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "三角形":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "星形":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "十字":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render(groups: list[Group], image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw at `supersample` x and downsample (antialiased edges, so shapes stay recognisable when small)."""
    big = image_size * supersample
    img = Image.new("RGB", (big, big), BACKGROUND)
    d = ImageDraw.Draw(img)
    for g in groups:
        x0, y0, side = _region(g.position, big)
        centres, rfrac = _LAYOUT[g.count]
        for fx, fy in centres:
            _draw_shape(d, g.shape, x0 + fx * side, y0 + fy * side, rfrac * side, COLOURS[g.colour])
    return img.resize((image_size, image_size), Image.LANCZOS)


def _place(position: str) -> str:
    return position if position == "中间" else position + "角"


def captions(groups: list[Group]) -> list[str]:
    """Three phrasings of the same content (all only from `vocab_chars()`)."""
    a = "，".join(f"{g.position}有{NUMERALS[g.count]}个{g.colour}的{g.shape}" for g in groups) + "。"
    b = "画面" + "，".join(f"{g.position}是{NUMERALS[g.count]}个{g.colour}{g.shape}" for g in groups) + "。"
    total = sum(g.count for g in groups)
    c = (f"这张图里一共有{NUMERALS[total]}个图形：" +
         "，".join(f"{NUMERALS[g.count]}个{g.colour}的{g.shape}在{_place(g.position)}"
                  for g in reversed(groups))
         + "。")
    return [a, b, c]


def make_sample(seed: int, split: str, index: int,
                image_size: int = 64) -> tuple[bytes, list[str], list[Group]]:
    """JPEG bytes, captions and scene of sample `index` of `split`: a pure function of its arguments."""
    rng = random.Random(f"r2d2ds-synthetic:{seed}:{split}:{index}")
    groups = sample_scene(rng)
    buf = io.BytesIO()
    render(groups, image_size).save(buf, format="JPEG", quality=95)
    return buf.getvalue(), captions(groups), groups
