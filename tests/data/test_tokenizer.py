"""Tokenizer loading and the image transforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from r2d2ds.config import DataConfig
from r2d2ds.data import TrainStream, decode_image, image_transform, load_retrieval_split, load_tokenizer
from r2d2ds.data.transforms import MEAN, STD


def test_vocab_txt_size_checked(shared_dir):
    path = Path(shared_dir) / "tokenizers" / "bert-base-chinese" / "vocab.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tok = load_tokenizer(str(path))
    # count "\n" only: str.splitlines() would also split inside two tokens that hold Unicode line separators
    assert len(tok) == 21128 == path.read_bytes().count(b"\n")
    ids = tok("一只狗在草地上。")["input_ids"]
    assert ids[0] == tok.cls_token_id and tok.unk_token_id not in ids


def test_auto_saved_dir_and_errors(synth_dir, tmp_path, monkeypatch):
    tok = load_tokenizer("auto", str(synth_dir))
    assert len(tok) == len((synth_dir / "vocab.txt").read_text().splitlines())
    by_pattern = load_tokenizer("auto", str(synth_dir / "train-{000000..000005}.tar"))
    assert by_pattern.get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again("左上有一个红色的圆形。")["input_ids"] == tok("左上有一个红色的圆形。")["input_ids"]

    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer.*nowhere/vocab\.txt"):
        load_tokenizer(str(tmp_path / "nowhere" / "vocab.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer='auto'.*empty"):
        load_tokenizer("auto", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        load_tokenizer("auto", None)
    dup = tmp_path / "dup.txt"
    dup.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n红\n红\n")
    with pytest.raises(ValueError, match="7 lines"):
        load_tokenizer(str(dup))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer: 'surely-not-a-cached-model-r2d2ds'"):
        load_tokenizer("surely-not-a-cached-model-r2d2ds")


def test_image_transform_eval_and_augment():
    img = Image.new("RGB", (48, 32), (255, 255, 255))
    x = image_transform(24, train=False)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)  # CLIP mean/std
    assert torch.allclose(x[:, 12, 12], expected, atol=1e-4)
    # Eval keeps the whole square: a red left edge and a blue right edge survive the center crop of a square.
    sq = Image.new("RGB", (32, 32), (128, 128, 128))
    sq.paste((255, 0, 0), (0, 0, 2, 32))
    y = image_transform(32, train=False)(sq)
    assert y[0, 16, 0] > y[2, 16, 0]
    z = image_transform(24, train=True, augment=True)(img)
    assert z.shape == (3, 24, 24)


def test_stream_and_eval_pixels_match_image_transform(synth_dir, synth_tokenizer):
    """The pipelines normalise per batch (uint8 per image); the numbers must equal the public transform's."""
    import tarfile

    split = load_retrieval_split(str(synth_dir), "val", synth_tokenizer, image_size=48, max_images=3)
    with tarfile.open(synth_dir / "val-000000.tar") as tf:
        data = tf.extractfile("val_00000002.jpg").read()
    expected = image_transform(48, train=False)(decode_image(data))
    assert split.image_keys[2] == "val_00000002"
    assert torch.allclose(split.images[2], expected, atol=1e-5)
    cfg = DataConfig(train=str(synth_dir), image_size=48, micro_batch=2, shuffle_buffer=0, max_text_len=16)
    batch = next(iter(TrainStream(cfg, synth_tokenizer, shards=[str(synth_dir / "val-000000.tar")])))
    assert batch["key"] == ["val_00000000", "val_00000001"]  # no shuffle buffer: tar order
    with tarfile.open(synth_dir / "val-000000.tar") as tf:
        first = tf.extractfile("val_00000000.jpg").read()
    assert torch.allclose(batch["image"][0], image_transform(48, train=True)(decode_image(first)), atol=1e-5)
