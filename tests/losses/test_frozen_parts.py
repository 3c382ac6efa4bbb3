"""Parts of the model that no active loss term reaches are frozen (out of the optimizer and the gradient
reduction), and nothing a term does use is frozen."""

from __future__ import annotations

import pytest
import torch

import r2d2ds  # noqa: F401
from r2d2ds.losses import R2D2Pretraining
from r2d2ds.models import make_teacher
from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, tiny_batch, tiny_loss_config, tiny_model_config

CONFIGS = {
    "all_terms": {},
    "contrastive_only": dict(tgd_alpha=0.0, fgr_weight=0.0, fgd_weight=0.0, mlm_weight=0.0),
    "no_fgr": dict(fgr_weight=0.0),
    "mlm_only": dict(gcpr_weight=0.0, tgd_alpha=0.0, fgr_weight=0.0, fgd_weight=0.0),
    "fgd_without_mlm": dict(mlm_weight=0.0, fgr_weight=0.0),
    "fgr_without_text_query_terms": dict(mlm_weight=0.0, fgd_weight=0.0),
}


def _used_parameters(lc) -> set[str]:
    """Names of the parameters that receive a gradient when NOTHING is frozen."""
    torch.manual_seed(0)
    obj = R2D2Pretraining(tiny_model_config(), lc, VOCAB, PAD, MASK, SPECIALS)
    obj.requires_grad_(True)
    teacher = make_teacher(obj.model) if obj.uses_teacher() else None
    obj(tiny_batch(b=6), teacher, seed=3)["loss"].backward()
    return {n for n, p in obj.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trainable_parameters_are_exactly_the_used_ones(name):
    lc = tiny_loss_config(**CONFIGS[name])
    obj = R2D2Pretraining(tiny_model_config(), lc, VOCAB, PAD, MASK, SPECIALS)
    trainable = {n for n, p in obj.named_parameters() if p.requires_grad}
    assert trainable == _used_parameters(lc)
    if name == "contrastive_only":
        frozen = {n.split(".")[1] for n, p in obj.named_parameters() if not p.requires_grad}
        assert frozen == {"text_query_encoder", "image_query_encoder", "image_to_cross", "itm_text_query",
                          "itm_image_query", "mlm_head"}


def _frozen_cnn_config(tmp_path):
    """A tiny timm CNN with BatchNorm (so frozen statistics are observable), saved as its own checkpoint."""
    import timm

    kwargs = dict(image_model="resnet10t", image_kwargs={})
    torch.manual_seed(1)
    body = timm.create_model("resnet10t", num_classes=0)
    path = tmp_path / "cnn.pt"
    torch.save(body.state_dict(), path)
    return tiny_model_config(**kwargs, image_checkpoint=str(path), image_freeze=True)


def test_image_freeze_keeps_the_tower_as_loaded_and_the_teacher_reuses_its_output(tmp_path):
    """model.image_freeze: no image-tower parameter trains, BatchNorm statistics do not move in train mode, and
    the teacher's image features (taken from the student's frozen tower, not recomputed) equal what the
    teacher's own tower computes."""
    cfg = _frozen_cnn_config(tmp_path)
    torch.manual_seed(0)
    obj = R2D2Pretraining(cfg, tiny_loss_config(), VOCAB, PAD, MASK, SPECIALS).train()
    tower = obj.model.image_tower
    assert not any(p.requires_grad for p in tower.parameters())
    assert not tower.body.training  # eval mode although the model is in train mode
    assert obj.model.image_proj.linear.weight.requires_grad
    bn = {k: v.clone() for k, v in tower.state_dict().items() if "running" in k}
    teacher = make_teacher(obj.model)
    batch = tiny_batch(b=4)
    out = obj(batch, teacher, seed=3)
    out["loss"].backward()
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in bn.items())  # statistics unchanged
    assert all(p.grad is None for p in tower.parameters())
    with torch.no_grad():
        s_tok, _, s_pooled = obj.model.encode_image(batch["image"], with_pooled=True)
        t_tok, t_emb = teacher.encode_image(batch["image"])
    assert torch.allclose(s_tok, t_tok, atol=1e-6)
    assert torch.allclose(teacher.image_proj(s_pooled), t_emb, atol=1e-6)


def test_image_freeze_needs_weights():
    from r2d2ds.config import ConfigError

    with pytest.raises(ConfigError, match="model.image_freeze"):
        tiny_model_config(image_freeze=True)


def test_teacher_image_side_with_a_frozen_tower_equals_the_teachers_own(tmp_path):
    """R2D2Pretraining.teacher_image (used by the one-shot objective and both GradCache passes): with the frozen
    tower it reuses the student's tower output but projects with the TEACHER's projection, which has drifted
    from the student's after training steps; the result equals the teacher's own encode_image."""
    cfg = _frozen_cnn_config(tmp_path)
    torch.manual_seed(0)
    obj = R2D2Pretraining(cfg, tiny_loss_config(), VOCAB, PAD, MASK, SPECIALS).train()
    teacher = make_teacher(obj.model)
    with torch.no_grad():  # the student's projection moves on, the EMA teacher's lags behind
        obj.model.image_proj.linear.weight.add_(0.5)
    image = tiny_batch(b=4)["image"]
    with torch.no_grad():
        s_tok, _, s_pooled = obj.model.encode_image(image, with_pooled=True)
        t_tok, t_emb = obj.teacher_image(teacher, image, s_tok, s_pooled)
        ref_tok, ref_emb = teacher.encode_image(image)
        assert obj.teacher_image(teacher, image, s_tok)[1] is None  # tokens only (FgD)
    assert torch.allclose(t_tok, ref_tok, atol=1e-6) and torch.allclose(t_emb, ref_emb, atol=1e-6)
    assert not torch.allclose(obj.model.image_proj(s_pooled), ref_emb, atol=1e-3)  # the student's would differ
