"""R2D2 model: shapes, L2 norms, temperature clamp, text-tower resolution, CNN towers, ZeRO-3 ownership."""

from __future__ import annotations

import json
import math

import pytest
import torch

import r2d2ds  # noqa: F401  (torchvision shim before timm/transformers)
from r2d2ds.models import R2D2
from r2d2ds.models.towers import ImageTower, TextTower
from tests.models.tiny import VOCAB, tiny_batch, tiny_model_config


@pytest.fixture(scope="module")
def model() -> R2D2:
    torch.manual_seed(0)
    return R2D2(tiny_model_config(), vocab_size=VOCAB).eval()


def test_shapes_and_norms(model):
    b = tiny_batch(b=3, length=10)
    img_tokens, img_emb = model.encode_image(b["image"])
    txt_tokens, txt_emb = model.encode_text(b["input_ids"], b["attention_mask"])
    assert img_tokens.shape == (3, 1 + (32 // 8) ** 2, 64)  # CLS + 4x4 patches, ViT width
    assert txt_tokens.shape == (3, 10, 32)
    assert img_emb.shape == txt_emb.shape == (3, 16)
    torch.testing.assert_close(img_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt_emb.norm(dim=-1), torch.ones(3))
    tq = model.text_query(txt_tokens, b["attention_mask"], img_tokens)
    iq = model.image_query(img_tokens, txt_tokens, b["attention_mask"])
    assert tq.shape == (3, 10, 32) and iq.shape == (3, 17, 32)  # cross width = text width
    itm_t, itm_i = model.itm_logits(img_tokens, txt_tokens, b["attention_mask"])
    assert itm_t.shape == itm_i.shape == (3, 2)
    assert model.mlm_logits(tq).shape == (3, 10, VOCAB)
    # ITM heads read the first token of each encoder.
    torch.testing.assert_close(itm_t, model.itm_text_query(tq))
    torch.testing.assert_close(itm_i, model.itm_image_query(iq))


def test_padding_does_not_leak(model):
    """Changing a padded token id changes nothing at valid positions (masks reach both attentions)."""
    b = tiny_batch(b=2, length=10)
    ids, mask = b["input_ids"].clone(), b["attention_mask"].clone()
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    img_tokens, _ = model.encode_image(b["image"])
    txt, _ = model.encode_text(ids, mask)
    ids2 = ids.clone()
    ids2[0, 7] = 42
    txt2, _ = model.encode_text(ids2, mask)
    torch.testing.assert_close(txt[0, :6], txt2[0, :6])
    txt2 = txt2.clone()
    txt2[0, 6:] += 5.0  # garbage in padded text tokens must not reach either cross encoder's valid outputs
    torch.testing.assert_close(model.text_query(txt, mask, img_tokens)[0, :6],
                               model.text_query(txt2, mask, img_tokens)[0, :6])
    torch.testing.assert_close(model.image_query(img_tokens, txt, mask),
                               model.image_query(img_tokens, txt2, mask))


def test_temperature_init_clamp_and_gradient(model):
    t = model.temperature
    assert model.logit_scale().dim() == 0
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        t.log_tau.fill_(math.log(10.0))  # tau above the max 0.5 -> 1/0.5
    assert model.logit_scale().item() == pytest.approx(2.0, rel=1e-6)
    with torch.no_grad():
        t.log_tau.fill_(math.log(1e-5))  # below the min 0.001 -> 1000
    assert model.logit_scale().item() == pytest.approx(1000.0, rel=1e-5)
    t.log_tau.grad = None
    model.logit_scale().backward()
    assert t.log_tau.grad.item() == 0.0  # clamped: no gradient
    with torch.no_grad():
        t.log_tau.fill_(math.log(0.1))
    model.logit_scale().backward()
    assert t.log_tau.grad.item() == pytest.approx(-10.0, rel=1e-5)  # d exp(-x)/dx = -1/tau
    with torch.no_grad():
        t.log_tau.fill_(math.log(0.07))
    t.log_tau.grad = None


def test_model_holds_no_direct_parameter(model):
    """ZeRO-3 gathers parameters per owning module: R2D2 itself owns none (temperature is a submodule)."""
    assert list(model.parameters(recurse=False)) == []


def test_copy_and_pickle_roundtrip(model):
    """deepcopy (the EMA teacher) and whole-module pickling keep the image tower's tokens+pooled entry."""
    import copy
    import io

    x = torch.randn(2, 3, 32, 32)
    clone = copy.deepcopy(model)
    assert clone.image_tower.body.forward.args[0] is clone.image_tower.body
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.image_tower.body.forward.args[0] is loaded.image_tower.body
    for m in (clone, loaded):
        torch.testing.assert_close(m.encode_image(x)[0], model.encode_image(x)[0])


def test_vocab_size_argument_wins_and_no_tied_decoder():
    cfg = tiny_model_config(text_config={**tiny_model_config().text_config, "vocab_size": 7})
    m = R2D2(cfg, vocab_size=55)
    assert m.text_tower.body.get_input_embeddings().num_embeddings == 55
    assert m.mlm_head.decoder.out_features == 55
    assert m.mlm_head.decoder.weight.data_ptr() != m.text_tower.body.get_input_embeddings().weight.data_ptr()


def test_text_tower_resolution(tmp_path, caplog):
    small = tiny_model_config().text_config
    # A hub name that is not available offline, config-only: falls back to BertConfig(**text_config).
    cfg = tiny_model_config(text_model="bert-base-chinese", text_config=small, text_pretrained=False)
    tower = TextTower(cfg, vocab_size=VOCAB)
    assert tower.width == 32 and tower.body.config.num_hidden_layers == 2
    # A config.json file and a local directory.
    from transformers import BertConfig

    small_cfg = BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    small_cfg.save_pretrained(tmp_path)
    assert TextTower(tiny_model_config(text_model=str(tmp_path), text_config={}), VOCAB).width == 24
    cfg_json = tmp_path / "config.json"
    assert json.loads(cfg_json.read_text())["model_type"] == "bert"
    cfg = tiny_model_config(text_model=str(cfg_json), text_config={"num_hidden_layers": 3})
    tower = TextTower(cfg, VOCAB)
    assert tower.width == 24 and tower.body.config.num_hidden_layers == 3
    assert tower.body.get_input_embeddings().num_embeddings == VOCAB
    # Pretrained weights that are not local: a clear error, no silent random init.
    with pytest.raises(ValueError, match="text_pretrained"):
        TextTower(tiny_model_config(text_model="surely-not-a-local-model-xyz", text_pretrained=True), VOCAB)


def test_text_tower_pretrained_from_local_dir(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    src = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48), add_pooling_layer=False)
    src.save_pretrained(tmp_path)
    cfg = tiny_model_config(text_model=str(tmp_path), text_pretrained=True, text_config={})
    tower = TextTower(cfg, VOCAB)
    for (n, a), b in zip(src.state_dict().items(), tower.body.state_dict().values()):
        assert torch.equal(a, b), n  # weights loaded, not re-initialised
    bigger = TextTower(cfg, VOCAB + 7)  # tokenizer with more tokens: the table is resized, old rows kept
    emb = bigger.body.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 7
    assert torch.equal(emb[:VOCAB], src.get_input_embeddings().weight)


def test_cnn_image_tower_gets_pooled_token_first():
    tower = ImageTower(tiny_model_config(image_model="test_convnext", image_kwargs={}))
    tokens, pooled = tower(torch.randn(2, 3, 64, 64))
    assert tokens.shape[0] == 2 and tokens.shape[2] == tower.width and pooled.shape == (2, tower.pooled_width)
    assert tokens.shape[1] == 1 + 2 * 2  # pooled + 2x2 feature map
    torch.testing.assert_close(tokens[:, 0], pooled)
    m = R2D2(tiny_model_config(image_model="test_convnext", image_kwargs={}), VOCAB)
    img_tokens, emb = m.encode_image(torch.randn(2, 3, 64, 64))
    ids = torch.randint(4, VOCAB, (2, 6))
    txt, _ = m.encode_text(ids, torch.ones_like(ids))
    assert m.image_query(img_tokens, txt, torch.ones_like(ids)).shape == (2, 5, 32)


def test_image_checkpoint_roundtrip(tmp_path):
    cfg = tiny_model_config()
    a = ImageTower(cfg)
    path = tmp_path / "vit.pt"
    torch.save(a.body.state_dict(), path)
    b = ImageTower(tiny_model_config(image_checkpoint=str(path)))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x)[0], b.eval()(x)[0])
    torch.save({"nope": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="image_checkpoint"):
        ImageTower(tiny_model_config(image_checkpoint=str(path)))
