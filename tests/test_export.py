"""Export -> load round trip, replacing exports safely, checkpoint export, the load errors, and the eval
command on an exported model over a real (synthetic) dataset."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import r2d2ds  # noqa: F401  (torchvision shim first)
from r2d2ds.config import Config, DataConfig, EvalConfig
from r2d2ds.data import load_tokenizer, write_vocab
from r2d2ds.data.synthetic import vocab_chars
from r2d2ds.data.transforms import image_transform
from r2d2ds.eval import itm_scorer, rerank
from r2d2ds.export import CONFIG, WEIGHTS, export_from_checkpoint, export_model
from r2d2ds.export import main as export_main
from r2d2ds.rerank import RerankScore
from tests.test_eval import tiny_model_config

TEXTS = ["左上有一个红色圆形", "右下有两个蓝色正方形", "中间有三个黄色星形", "图中一共一个十字"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    write_vocab(d / "vocab.txt", vocab_chars())
    return load_tokenizer(str(d / "vocab.txt"))


def _config() -> Config:
    return Config(model=tiny_model_config(), data=DataConfig(image_size=32, max_text_len=16),
                  eval=EvalConfig(topk=2, batch_size=8))  # one batch: bit-equal to the reference


def _model(tokenizer, seed: int = 0):
    from r2d2ds.models import R2D2

    torch.manual_seed(seed)
    model = R2D2(_config().model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    # Move every weight off its init so a load that silently kept fresh weights would be caught.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _images(n: int = 5) -> list[Image.Image]:
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


def test_round_trip_same_embeddings_and_rank(tmp_path, tokenizer):
    from r2d2ds.api import load

    model = _model(tokenizer)
    out = export_model(model, _config(), tokenizer, tmp_path / "export")
    assert {WEIGHTS, CONFIG, "text_encoder_config.json"} <= {p.name for p in out.iterdir()}
    r = load(out)
    assert not r.model.training
    images = _images()
    # Reference: the in-memory model on the same transformed pixels and tokens.
    tf = image_transform(32, train=False)
    pixels = torch.stack([tf(im) for im in images])
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        it, ie = model.encode_image(pixels)
        tt, te = model.encode_text(enc["input_ids"], enc["attention_mask"])
        sim = ie @ te.t()
        ec = _config().eval
        score = RerankScore(ec.rerank, ec.rerank_weight, float(model.logit_scale()))
        t2i, i2t = rerank(sim, 2, itm_scorer(model, it, tt, enc["attention_mask"], 8), score)
    assert torch.equal(r.encode_image(images), ie)
    assert torch.equal(r.encode_image(pixels), ie)
    assert torch.equal(r.encode_text(TEXTS), te)
    ranked = r.rank(images, TEXTS)
    assert ranked["topk"] == 2
    assert ranked["scores"].shape == (len(TEXTS), len(images))
    assert torch.equal(ranked["order"], t2i.order)
    assert torch.equal(ranked["scores"], t2i.scores)
    assert torch.equal(ranked["similarity"], sim.t())
    assert torch.equal(ranked["image_to_text"]["order"], i2t.order)
    assert torch.equal(ranked["image_to_text"]["scores"], i2t.scores)
    # Re-ranking changes something with these weights, so rank() really applied the cross encoders.
    assert not torch.equal(ranked["scores"], ranked["similarity"])
    # Smaller batches change float rounding only (a GEMM's result depends on its shape in the last bits).
    r.batch_size = 2
    assert torch.allclose(r.encode_image(images), ie, atol=1e-6)
    assert torch.allclose(r.encode_text(TEXTS), te, atol=1e-6)
    full = r.rank(images, TEXTS, topk=100)  # k > candidates: every pair re-ranked
    assert torch.equal(full["order"], torch.sort(full["scores"], dim=1, descending=True, stable=True).indices)


def test_image_paths_and_errors(tmp_path, tokenizer):
    from r2d2ds.api import load

    out = export_model(_model(tokenizer), _config(), tokenizer, tmp_path / "export")
    r = load(out)
    im = _images(1)[0]
    im.save(tmp_path / "a.png")
    assert torch.equal(r.encode_image([tmp_path / "a.png"]), r.encode_image([im]))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        r.encode_image([tmp_path / "nope.png"])
    with pytest.raises(TypeError):
        r.encode_text("one string")


def test_load_errors_name_the_missing_path(tmp_path):
    from r2d2ds.api import load

    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load(tmp_path / "missing_export")
    assert "missing_export" in str(err.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CONFIG).write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load(tmp_path / "half")


def test_export_replaces_an_export_but_never_other_folders(tmp_path, tokenizer):
    from r2d2ds.api import load

    target = tmp_path / "export"
    export_model(_model(tokenizer, seed=0), _config(), tokenizer, target)
    export_model(_model(tokenizer, seed=1), _config(), tokenizer, target)
    second = _model(tokenizer, seed=1)
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expect = second.encode_text(enc["input_ids"], enc["attention_mask"])[1]
    assert torch.equal(load(target).encode_text(TEXTS), expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or old folders left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an r2d2ds export"):
        export_model(_model(tokenizer), _config(), tokenizer, other)
    assert (other / "keep.txt").read_text() == "mine"


def _fake_run(run_dir, tokenizer, model) -> None:
    """A run directory as the trainer leaves it, with a ZeRO-0 style checkpoint (whole module state) whose
    keys are R2D2Pretraining's ("model." prefix) plus a non-model entry that export must drop."""
    tag = "step00000010"
    ckpt = run_dir / "checkpoints" / tag
    ckpt.mkdir(parents=True)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["loss_buffer"] = torch.zeros(1)
    torch.save({"module": state}, ckpt / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(tag + "\n")
    _config().save(run_dir / "config.yaml")
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))


def test_export_from_checkpoint_command(tmp_path, tokenizer, capsys):
    from r2d2ds.api import load

    model = _model(tokenizer, seed=2)
    run = tmp_path / "run"
    _fake_run(run, tokenizer, model)
    assert export_main(["--run", str(run), "--out", str(tmp_path / "out")]) == 0
    with torch.no_grad():
        enc = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        expect = model.encode_text(enc["input_ids"], enc["attention_mask"])[1]
    assert torch.equal(load(tmp_path / "out").encode_text(TEXTS), expect)
    # A tag folder works as well; a missing tag and a missing run are named in the error.
    export_from_checkpoint(run / "checkpoints" / "step00000010", tmp_path / "out2")
    assert (tmp_path / "out2" / WEIGHTS).is_file()
    capsys.readouterr()
    assert export_main(["--run", str(run), "--out", str(tmp_path / "o3"), "--tag", "step9"]) == 2
    assert "step9" in capsys.readouterr().err
    assert export_main(["--run", str(tmp_path / "norun"), "--out", str(tmp_path / "o4")]) == 2
    assert "norun" in capsys.readouterr().err


def test_eval_command_on_export(tmp_path, tokenizer, capsys):
    from r2d2ds.data.prepare import prepare_synthetic
    from r2d2ds.eval import main as eval_main

    data = tmp_path / "data"
    prepare_synthetic(data, train=0, val=6, test=5, image_size=32, shard_size=4)
    tok = load_tokenizer("auto", dataset=str(data))
    out = export_model(_model(tok), _config(), tok, tmp_path / "export")
    res = tmp_path / "eval.json"
    assert eval_main(["--model", str(out), "--data", str(data), "--split", "val", "--topk", "3",
                      "--out", str(res)]) == 0
    printed = capsys.readouterr().out
    assert "two-tower" in printed and "two-stage" in printed
    metrics = json.loads(res.read_text())
    assert metrics["num_images"] == 6 and metrics["num_texts"] >= 6 and metrics["topk"] == 3
    assert 0 <= metrics["two_stage"]["mr"] <= 100
    assert eval_main(["--model", str(out), "--data", str(tmp_path / "nodata"), "--out", str(res)]) == 2
    assert "nodata" in capsys.readouterr().err
    # The weight chosen on another split of the same data; choosing it on the reported split is refused.
    assert eval_main(["--model", str(out), "--data", str(data), "--split", "test", "--calibration-split", "val",
                      "--topk", "3", "--out", str(res)]) == 0
    metrics = json.loads(res.read_text())
    assert metrics["calibration"]["split"] == "val" and metrics["num_images"] == 5
    assert "chosen on 'val'" in capsys.readouterr().out
    assert eval_main(["--model", str(out), "--data", str(data), "--split", "val", "--calibration-split", "val",
                      "--out", str(res)]) == 2
    assert "--calibration-split" in capsys.readouterr().err
    assert eval_main(["--model", str(out), "--data", str(data), "--split", "val", "--rerank", "released",
                      "--topk", "3", "--out", str(res)]) == 0
    assert json.loads(res.read_text())["rerank"]["mode"] == "released"


@pytest.mark.parametrize("feature_cache", [False, True])
def test_export_of_a_frozen_image_tower_loads(tmp_path, tokenizer, feature_cache):
    """model.image_freeze needs a pretrained file to train; the export holds the weights, so loading it needs none
    (nor the frozen tower's feature cache, a training setting that needs image_freeze)."""
    import dataclasses

    from r2d2ds.api import load

    cfg = _config()
    cfg.model = dataclasses.replace(cfg.model, image_checkpoint=str(tmp_path / "pretrained.safetensors"),
                                    image_freeze=True, image_feature_cache=feature_cache)
    model = _model(tokenizer)
    out = export_model(model, cfg, tokenizer, tmp_path / "export")
    r = load(out)
    enc = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(r.encode_text(TEXTS), model.encode_text(enc["input_ids"], enc["attention_mask"])[1])

