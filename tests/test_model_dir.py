"""Tampered and incomplete model directories: `api.load` and `r2d2ds eval` fail with an error naming the file and
the key, before the weights are read or a full-size model is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import r2d2ds.model_dir as model_dir
from r2d2ds.api import load
from r2d2ds.eval import main as eval_main
from r2d2ds.export import export_model
from r2d2ds.model_dir import CONFIG, TEXT_CONFIG, WEIGHTS, ModelDirError, read_safetensors_header
from tests.test_export import _config, _model, tokenizer  # noqa: F401  (the module-scoped fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):  # noqa: F811
    return export_model(_model(tokenizer), _config(), tokenizer, tmp_path_factory.mktemp("m") / "export")


@pytest.fixture()
def copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


@pytest.fixture()
def no_weights_read(monkeypatch):
    """Fail the test if anything reads the weights or builds a model off the meta device."""
    import safetensors.torch
    import torch

    def refuse(*a, **k):
        raise AssertionError("the weights were read before the directory was validated")

    real_build = model_dir.build_model

    def meta_only(*a, **k):
        assert torch.empty(0).device.type == "meta", "a full-size model was built before validation"
        return real_build(*a, **k)

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(model_dir, "build_model", meta_only)


def _rewrite(path: Path, change) -> None:
    """Rewrite a safetensors header (dict incl. __metadata__) in place, keeping the tensor bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_the_untampered_export_loads(exported):
    assert load(exported).encode_text(["左上有一个红色圆形"]).shape[0] == 1


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG, TEXT_CONFIG, "tokenizer.json"])
def test_missing_file_is_named(copy, name, no_weights_read):
    (copy / name).unlink()
    if name == "tokenizer.json":
        (copy / "vocab.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=name.split(".")[0]):
        load(copy)


def test_truncated_weights_name_file_and_tensor(copy, no_weights_read):
    raw = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(raw[:-100])
    with pytest.raises(ModelDirError, match=rf"{WEIGHTS}' is truncated: tensor '[^']+' ends at byte"):
        load(copy)
    (copy / WEIGHTS).write_bytes(raw[:200])  # cut inside the header
    with pytest.raises(ModelDirError, match="header length .* exceeds the file"):
        load(copy)
    (copy / WEIGHTS).write_bytes(raw[:5])
    with pytest.raises(ModelDirError, match="truncated"):
        load(copy)


@pytest.mark.parametrize("key,value,match", [
    ("vocab_size", "999", r"metadata key 'vocab_size' = 999 disagrees with tensor 'text_tower\."),
    ("vocab_size", "lots", r"metadata key 'vocab_size' = 'lots' is not an integer"),
    ("pad_token_id", "100000", r"metadata key 'pad_token_id' = 100000"),
    ("aliases", '{"a.weight": "missing.weight"}', r"metadata key 'aliases'"),
    ("format", "other-format", r"metadata key 'format'"),
])
def test_tampered_metadata_is_named(copy, key, value, match, no_weights_read):
    _rewrite(copy / WEIGHTS, lambda h: h["__metadata__"].__setitem__(key, value))
    with pytest.raises(ModelDirError, match=match):
        load(copy)


def test_tokenizer_larger_than_the_embedding_is_named(copy, no_weights_read):
    vocab = copy / "vocab.txt"
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"].update({f"extra{i}": 10_000 + i for i in range(5)})
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    vocab.unlink(missing_ok=True)
    with pytest.raises(ModelDirError, match="the tokenizer has .* tokens but metadata key 'vocab_size'"):
        load(copy)


def test_width_that_disagrees_with_the_weights_is_named(copy, no_weights_read):
    cfg = yaml.safe_load((copy / CONFIG).read_text())
    cfg["model"]["text_config"]["hidden_size"] = 64  # the text tower's width
    (copy / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelDirError, match=r"shape mismatch '[a-z_.0-9]+': file \(32,\), model \(64,\)"):
        load(copy)


def test_text_config_that_disagrees_with_the_weights_is_named(copy, no_weights_read):
    text = json.loads((copy / TEXT_CONFIG).read_text())
    text["type_vocab_size"] = 5
    (copy / TEXT_CONFIG).write_text(json.dumps(text))
    with pytest.raises(ModelDirError, match=r"'text_tower\.body\.embeddings\.token_type_embeddings\.weight': "
                                            r"file \(2, 32\), model \(5, 32\)"):
        load(copy)


def test_config_that_disagrees_with_the_weights_is_named(copy, no_weights_read):
    cfg = yaml.safe_load((copy / CONFIG).read_text())
    cfg["model"]["embed_dim"] = 24
    (copy / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelDirError, match=r"'image_proj\.linear\.weight': file \(16, 32\), model \(24, 32\)"):
        load(copy)
    cfg["model"]["embed_dim"] = "wide"
    (copy / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelDirError, match=rf"{CONFIG}': config key 'model.embed_dim'"):
        load(copy)


def test_renamed_tensor_is_named(copy, no_weights_read):
    def rename(h):
        name = next(k for k in h if k != "__metadata__")
        h["renamed.weight"] = h.pop(name)

    _rewrite(copy / WEIGHTS, rename)
    with pytest.raises(ModelDirError, match=r"missing tensors \['.*'\]; unexpected tensors \['renamed.weight'\]"):
        load(copy)


def test_header_is_read_without_the_tensors(exported):
    tensors, meta = read_safetensors_header(exported / WEIGHTS)
    assert meta["format"] == model_dir.FORMAT and int(meta["vocab_size"]) > 5
    assert all(e.dtype == "F32" for e in tensors.values())


def test_eval_command_names_the_damage(copy, capsys):
    _rewrite(copy / WEIGHTS, lambda h: h["__metadata__"].__setitem__("vocab_size", "999"))
    assert eval_main(["--model", str(copy), "--data", str(copy), "--out", str(copy / "e.json")]) == 2
    err = capsys.readouterr().err
    assert WEIGHTS in err and "'vocab_size'" in err
