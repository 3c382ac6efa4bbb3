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
