"""Config errors name the offending key; overrides and the ds_config fill behave as documented."""

import json

import pytest

from r2d2ds.config import ConfigError, load_config
from r2d2ds.engine import fill_ds_config, lr_lambda


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("override, key", [
    (["--train.steps=0"], "train.steps"),
    (["--train.stepz=10"], "train.stepz"),
    (["--model.temperature_init=0.9"], "model.temperature_init"),
    (["--loss.tgd_alpha=1.5"], "loss.tgd_alpha"),
    (["--data.micro_batch=abc"], "data.micro_batch"),
    (["--data.caption=longest"], "data.caption"),
    (["--train.optimizer=sgd"], "train.optimizer"),
    (["--model.attention_impl=cuda"], "model.attention_impl"),
    (["--loss.fgr_class_weights=[1.0]"], "loss.fgr_class_weights"),
    (["--eval.topk=0"], "eval.topk"),
    (["--eval.rerank=sum"], "eval.rerank"),
    (["--eval.rerank_weight=-1"], "eval.rerank_weight"),
    (["--eval.rerank_weights=[]"], "eval.rerank_weights"),
    (["--model.image_freeze=true"], "model.image_freeze"),
    (["--eval.calibration_split=val"], "eval.calibration_split"),  # data.val_split is val: the reported split
    (["--nosection=1"], "nosection"),
    (["--train.resume=maybe"], "train.resume"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)


def test_unknown_section_in_yaml_names_key(tmp_path):
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(_yaml(tmp_path, "trian:\n  steps: 3\n"))
    with pytest.raises(ConfigError, match="'model.image_kwargs'"):
        load_config(_yaml(tmp_path, "model:\n  image_kwargs: 3\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_then_overrides(tmp_path):
    cfg = load_config(_yaml(tmp_path, "train:\n  steps: 7\n  lr: 0.01\nmodel:\n  image_kwargs: {depth: 2}\n"),
                      ["--train.steps=9", "--model.image_kwargs.img_size=32", "--loss.fgr_class_weights", "[1, 3]"])
    assert cfg.train.steps == 9 and cfg.train.lr == 0.01
    assert cfg.model.image_kwargs == {"depth": 2, "img_size": 32}
    assert cfg.loss.fgr_class_weights == (1.0, 3.0)
    assert load_config(None, ["--train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 reads this as a string


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(None, ["--train.steps=5", "--data.micro_batch=3"])
    cfg.save(tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg


def test_ds_config_batch_identity_and_conflicts(tmp_path):
    cfg = load_config(None, ["--data.micro_batch=4", "--train.grad_accum=3", "--train.grad_clip=0.5"])
    ds = fill_ds_config(cfg, world_size=2, hidden_size=768)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert "_comment" not in ds

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 100, "zero_optimization": {"stage": 1}}))
    cfg = load_config(None, [f"--train.ds_config={bad}", "--data.micro_batch=4"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        fill_ds_config(cfg, world_size=2)
    cfg = load_config(None, ["--train.ds_config=missing.json"])
    with pytest.raises(ConfigError, match="'train.ds_config'.*missing.json"):
        fill_ds_config(cfg, world_size=1)
    noopt = tmp_path / "noopt.json"
    noopt.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg = load_config(None, [f"--train.ds_config={noopt}"])
    with pytest.raises(ConfigError, match="'train.optimizer'"):
        fill_ds_config(cfg, world_size=1)
    cfg = load_config(None, [f"--train.ds_config={noopt}", "--train.optimizer=torch_adamw"])
    assert "optimizer" not in fill_ds_config(cfg, world_size=1)


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config(None, ["--train.steps=110", "--train.warmup_steps=10", "--train.lr=1.0",
                             "--train.min_lr=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
