"""The objective as the engine runs it: all terms with a teacher, weights, skips, seeding, and that every
parameter is used only inside its owning module's forward (what ZeRO-3's gathering needs)."""

from __future__ import annotations

import pytest
import torch

import r2d2ds  # noqa: F401
from r2d2ds.losses import R2D2Pretraining, fgd_loss, mask_tokens, mlm_loss
from r2d2ds.models import make_teacher
from tests.models.tiny import (
    MASK,
    PAD,
    SPECIALS,
    VOCAB,
    no_dropout,
    tiny_batch,
    tiny_loss_config,
    tiny_model_config,
)

KEYS = {"loss", "loss/gcpr", "loss/tgd", "loss/fgr", "loss/fgd", "loss/mlm", "acc/itm", "logit_scale",
        "acc/itm_pos", "acc/itm_neg", "fgr/neg_sim", "fgr/offdiag_sim", "fgr/neg_sim_lift", "fgr/remote_frac",
        "fgr/bytes_sent", "fgr/bytes_recv"}


def build(lc=None, dropout=True):
    torch.manual_seed(0)
    mc = tiny_model_config() if dropout else no_dropout(tiny_model_config())
    obj = R2D2Pretraining(mc, lc or tiny_loss_config(), VOCAB, PAD, MASK, SPECIALS)
    teacher = make_teacher(obj.model)
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return obj, teacher


def test_forward_backward_all_terms_with_teacher():
    lc = tiny_loss_config(gcpr_weight=1.0, tgd_weight=0.7, tgd_alpha=0.4, fgr_weight=0.5, fgd_weight=2.0,
                          mlm_weight=0.3)
    obj, teacher = build(lc)
    obj.train()
    out = obj(tiny_batch(b=6, ids=[0, 0, 1, 2, 3, 3]), teacher, seed=7)
    assert set(out) == KEYS
    for k, v in out.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v), k
    for k in ("gcpr", "tgd", "fgr", "fgd", "mlm"):
        assert out[f"loss/{k}"].item() > 0, k
    expect = (0.6 * 1.0 * out["loss/gcpr"] + 0.4 * 0.7 * out["loss/tgd"] + 0.5 * out["loss/fgr"]
              + 2.0 * out["loss/fgd"] + 0.3 * out["loss/mlm"])
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    out["loss"].backward()
    missing = [n for n, p in obj.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []  # every parameter takes part (DDP/ZeRO need no unused-parameter handling)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("over", [dict(gcpr_weight=0.0), dict(fgr_negatives="topk", fgr_topk=2),
                                  dict(fgr_negatives="mixed", fgr_false_negative_guard=True),
                                  dict(fgr_softmax_temperature=0.2), dict(fgr_negative_scope="local")])
def test_every_sampler_setting_trains(over):
    """FGR's negatives drawn outside the GCPR pass (no GCPR, other strategies, own temperature, local scope)."""
    obj, _ = build(tiny_loss_config(**over), dropout=False)
    out = obj(tiny_batch(b=6, ids=[0, 0, 1, 2, 3, 3]), None, seed=3)
    assert out["loss/fgr"].item() > 0 and set(out) == KEYS
    assert 0.0 <= out["acc/itm_neg"].item() <= 1.0
    out["loss"].backward()


def test_zero_weights_skip_terms_and_no_teacher():
    lc = tiny_loss_config(fgr_weight=0.0, fgd_weight=0.0, mlm_weight=0.0, tgd_weight=0.0)
    obj, teacher = build(lc)
    out = obj(tiny_batch(b=4), teacher, seed=0)
    for k in ("tgd", "fgr", "fgd", "mlm"):
        assert out[f"loss/{k}"].item() == 0.0
    assert out["acc/itm"].item() == 0.0
    # tgd_weight 0 means no TgD: gcpr keeps its whole weight (alpha ignored).
    assert out["loss"].item() == pytest.approx(out["loss/gcpr"].item(), rel=1e-6)
    obj, _ = build(tiny_loss_config())
    out = obj(tiny_batch(b=4), None, seed=0)  # no teacher: TgD and FgD skipped, the rest runs
    assert out["loss/tgd"].item() == 0.0 and out["loss/fgd"].item() == 0.0
    assert out["loss/fgr"].item() > 0 and out["loss/mlm"].item() > 0


def test_mlm_and_fgd_terms_match_a_manual_recompute():
    lc = tiny_loss_config(fgr_weight=0.0)
    obj, teacher = build(lc, dropout=False)
    batch = tiny_batch(b=4)
    out = obj(batch, teacher, seed=11)
    m, ids, mask = obj.model, batch["input_ids"], batch["attention_mask"]
    gen = torch.Generator().manual_seed(11)  # masking is the generator's first use
    masked, labels = mask_tokens(ids, mask, lc.mlm_probability, MASK, VOCAB, SPECIALS, gen)
    img_tokens, _ = m.encode_image(batch["image"])
    hidden = m.text_query(m.encode_text(masked, mask)[0], mask, img_tokens)
    assert out["loss/mlm"].item() == pytest.approx(mlm_loss(m.mlm_logits(hidden), labels).item(), rel=1e-5)
    with torch.no_grad():
        t_img, _ = teacher.encode_image(batch["image"])
        t_hidden = teacher.text_query(teacher.encode_text(ids, mask)[0], mask, t_img)  # FULL text
    assert out["loss/fgd"].item() == pytest.approx(fgd_loss(hidden, t_hidden, mask).item(), rel=1e-5)


def test_seed_reproducible():
    obj, teacher = build(tiny_loss_config(), dropout=False)
    batch = tiny_batch(b=6, ids=[0, 1, 2, 3, 4, 5])
    a, b, c = obj(batch, teacher, 3), obj(batch, teacher, 3), obj(batch, teacher, 4)
    for k in KEYS:
        assert a[k].item() == b[k].item(), k
    assert a["loss/mlm"].item() != c["loss/mlm"].item()  # a different seed masks differently


def _simulate_zero3(module: torch.nn.Module) -> list:
    """Empty every parameter outside its owning module's forward, as ZeRO-3 partitioning does."""
    handles, full = [], {}
    for mod in module.modules():
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        for p in own:
            full[p] = p.data
            p.data = torch.empty(0, dtype=p.dtype)

        def pre(m, args, own=own):
            for p in own:
                p.data = full[p]

        def post(m, args, out, own=own):
            for p in own:
                p.data = torch.empty(0, dtype=p.dtype)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles, full


def test_parameters_are_used_only_inside_their_owners_forward():
    obj, teacher = build(tiny_loss_config(), dropout=False)
    batch = tiny_batch(b=4, ids=[0, 1, 2, 3])
    with torch.no_grad():
        ref = obj(batch, teacher, seed=2)
        handles, full = _simulate_zero3(obj)
        try:
            out = obj(batch, teacher, seed=2)  # fails (shape error) if any parameter is read outside
        finally:
            for h in handles:
                h.remove()
            for p, data in full.items():
                p.data = data
    for k in KEYS:
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-6), k


def test_bf16_student_with_fp32_teacher():
    """The GPU configuration in miniature: bf16 student weights, fp32 EMA teacher, fp32 logged terms."""
    obj, teacher = build(tiny_loss_config())
    obj = obj.to(torch.bfloat16)
    out = obj(tiny_batch(b=6, ids=[0, 0, 1, 2, 3, 3]), teacher, seed=1)
    for k, v in out.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
    out["loss"].backward()
    bad = [n for n, p in obj.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert bad == []
