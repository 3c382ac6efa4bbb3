"""The FLOP model (r2d2ds.flops) against hand counts, against torch's FlopCounterMode, and in the metric logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from r2d2ds import flops as F
from r2d2ds.config import LossConfig
from r2d2ds.metrics import MetricLogger
from r2d2ds.models.r2d2 import R2D2
from tests.models.tiny import VOCAB, no_dropout, tiny_batch, tiny_model_config


def hand_dims(image_width: int = 8) -> F.ModelDims:
    """ViT: 1 layer, width 8 (or `image_width`), FFN 16, 4x4 patches of an 8x8 image -> 4 patches + CLS = 5
    tokens. BERT: 1 layer, width 8, FFN 16, 6 tokens. Cross encoders: 1 layer, width 8, FFN 16. D = 4, V = 10."""
    return F.ModelDims(
        image=F.ViTDims(F.EncoderDims(1, image_width, 16), patch_size=4, in_chans=3, image_size=8, prefix_tokens=1),
        text=F.EncoderDims(1, 8, 16), text_len=6, cross=F.CrossDims(1, 8, 16), image_width=image_width,
        image_pooled_width=image_width, embed_dim=4, vocab_size=10)


# Hand counts (2 FLOPs per multiply-add), written out term by term.
IMAGE_ONE = (2 * 4 * 48 * 8  # patch embedding: 4 patches x (3*4*4) inputs x 8 outputs
             + 2 * 5 * 8 * 32  # Q, K, V, O: 5 tokens x 8 x (4*8)
             + 2 * 5 * 8 * 32  # FFN: 5 tokens x 8 x 16, twice
             + 2 * 5 * 5 * 8 * 2)  # scores + probs@V: 5 x 5 x 8 each
TEXT_ONE = 2 * 6 * 8 * 32 + 2 * 6 * 8 * 32 + 2 * 6 * 6 * 8 * 2
TQ_PAIR = (2 * 6 * 8 * 32 + 2 * 6 * 6 * 8 * 2  # self-attention over 6 text tokens
           + 2 * 6 * 8 * 16 + 2 * 5 * 8 * 16 + 2 * 6 * 5 * 8 * 2  # cross: Q,O on 6 texts, K,V on 5 image tokens
           + 2 * 6 * 8 * 32)  # FFN
IQ_PAIR = (2 * 5 * 8 * 32 + 2 * 5 * 5 * 8 * 2
           + 2 * 5 * 8 * 16 + 2 * 6 * 8 * 16 + 2 * 5 * 6 * 8 * 2
           + 2 * 5 * 8 * 32)


def test_hand_counts_of_the_parts():
    d = hand_dims()
    assert (IMAGE_ONE, TEXT_ONE, TQ_PAIR, IQ_PAIR) == (8992, 7296, 11072, 9696)
    assert d.image.tokens == 5
    assert d.image.forward(2) == 2 * IMAGE_ONE
    assert d.text.forward(2, 6) == 2 * TEXT_ONE
    assert d.cross.forward(3, 6, 5) == 3 * TQ_PAIR
    assert d.cross.forward(3, 5, 6) == 3 * IQ_PAIR


def test_contrastive_only_step_by_hand():
    # B = 2 per rank, 2 ranks: the contrastive loss is credited 8 x B_local x B_global x D = 8 * 2 * 4 * 4.
    s = F.step_flops(hand_dims(), micro_batch=2, world=2, terms=F.Terms(gcpr=True))
    towers = 2 * IMAGE_ONE + 2 * TEXT_ONE + (2 * 2 * 8 * 4) * 2  # + both projections
    assert set(s.parts) == {"image_tower", "text_tower", "projections", "loss_gcpr"}
    assert s.forward == towers + 2 * 2 * 4 * 4
    assert s.backward == 2 * towers + 6 * 2 * 4 * 4
    assert s.total == 3 * towers + 8 * 2 * 4 * 4 == 98752
    assert s.samples == 2
    acc = F.step_flops(hand_dims(), micro_batch=2, world=2, terms=F.Terms(gcpr=True), grad_accum=3)
    assert (acc.total, acc.samples) == (3 * s.total, 6)


def test_full_r2d2_step_by_hand():
    s = F.step_flops(hand_dims(), micro_batch=2, world=2, terms=F.Terms(True, True, True, True, True),
                     mlm_tokens=3)
    towers = 2 * IMAGE_ONE + 2 * TEXT_ONE + 256
    mlm_head = 2 * 3 * 8 * 8 + 2 * 3 * 8 * 10  # dense + decoder on 3 masked positions
    itm = 6 * TQ_PAIR + 6 * IQ_PAIR + 2 * (2 * 6 * 8 * 2)  # 3B = 6 pairs through both encoders + ITM heads
    trained_fwd = towers + 2 * TEXT_ONE + 2 * TQ_PAIR + mlm_head + itm  # + masked text pass
    frozen_fwd = towers + 2 * 2 * 4 * 4 + 2 * TQ_PAIR + 2 * 2 * 2 * 4  # teacher towers, logits, text-query; negatives
    contrastive = 2 * 8 * 2 * 4 * 4  # GCPR and TgD calls
    assert s.total == 3 * trained_fwd + frozen_fwd + contrastive
    assert s.forward == trained_fwd + frozen_fwd + contrastive / 4
    # An image tower wider than the cross encoders adds image_to_cross (5 tokens x 16 -> 8) on every call:
    # B pairs for the masked text-query pass (+ the teacher's), 3B pairs for each ITM encoder.
    wide = F.step_flops(hand_dims(image_width=16), micro_batch=2, world=2,
                        terms=F.Terms(True, True, True, True, True), mlm_tokens=3)
    assert wide.parts["itm_text_query"][0] - s.parts["itm_text_query"][0] == 2 * (6 * 5) * 16 * 8
    assert wide.parts["itm_image_query"][0] - s.parts["itm_image_query"][0] == 2 * (6 * 5) * 16 * 8
    assert wide.parts["masked_text_query"][0] - s.parts["masked_text_query"][0] == 2 * (2 * 5) * 16 * 8


@pytest.mark.parametrize("kw, present, absent", [
    ({}, {"teacher_towers", "loss_tgd", "mlm_head", "itm_text_query", "teacher_text_query"}, set()),
    ({"tgd_alpha": 0.0, "fgd_weight": 0.0}, {"mlm_head", "itm_image_query"},
     {"teacher_towers", "loss_tgd", "teacher_text_query"}),
    ({"tgd_alpha": 0.0, "fgr_weight": 0.0, "fgd_weight": 0.0, "mlm_weight": 0.0}, {"loss_gcpr"},
     {"teacher_towers", "masked_text_tower", "itm_text_query", "hard_negatives"}),
    ({"mlm_weight": 0.0, "tgd_weight": 0.0}, {"masked_text_query", "teacher_text_query", "teacher_towers"},
     {"mlm_head", "loss_tgd"}),
])
def test_terms_follow_the_loss_config(kw, present, absent):
    s = F.step_flops(hand_dims(), 2, 2, F.Terms.from_config(LossConfig(**kw)))
    assert present <= set(s.parts) and not absent & set(s.parts)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = R2D2(no_dropout(tiny_model_config()), VOCAB).eval()
    return model, tiny_batch(b=4, length=12), F.model_dims(model, 32, 12)


def test_model_dims_read_from_a_built_model(tiny):
    _, _, d = tiny  # tests/models/tiny.py: ViT depth 2 width 64 at 32 px / 8 px patches; BERT 2 x 32; cross 2
    assert d.image == F.ViTDims(F.EncoderDims(2, 64, 256), 8, 3, 32, 1)
    assert d.image.tokens == 17
    assert d.text == F.EncoderDims(2, 32, 64)
    assert d.cross == F.CrossDims(2, 32, 128)
    assert (d.image_width, d.image_pooled_width, d.embed_dim, d.vocab_size, d.image_to_cross) == (64, 64, 16,
                                                                                                   VOCAB, True)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_forward_counts_match_flop_counter_mode(tiny):
    """torch's FlopCounterMode counts every Linear and the patch conv exactly like the model; on the CPU it does
    not count attention (sdpa's CPU kernel and our cross_attention's blockwise path are not in its table), so
    its total must equal ours either with or without the attention cores."""
    model, batch, d = tiny
    b, n, lt = 4, d.image.tokens, 12
    img_tokens, _ = model.encode_image(batch["image"])
    txt_tokens, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    to_cross = F.linear(b * n, 64, 32)
    cases = {
        "image": (lambda: model.encode_image(batch["image"]), d.image.forward(b) + F.linear(b, 64, 16),
                  b * 2 * F.attention_core(n, n, 64)),
        "text": (lambda: model.encode_text(batch["input_ids"], batch["attention_mask"]),
                 d.text.forward(b, lt) + F.linear(b, 32, 16), b * 2 * F.attention_core(lt, lt, 32)),
        "text_query": (lambda: model.text_query(txt_tokens, batch["attention_mask"], img_tokens),
                       d.cross.forward(b, lt, n) + to_cross,
                       b * 2 * (F.attention_core(lt, lt, 32) + F.attention_core(lt, n, 32))),
        "image_query": (lambda: model.image_query(img_tokens, txt_tokens, batch["attention_mask"]),
                        d.cross.forward(b, n, lt) + to_cross,
                        b * 2 * (F.attention_core(n, n, 32) + F.attention_core(n, lt, 32))),
    }
    for name, (fn, ours, attention) in cases.items():
        got = _counted(fn)
        assert got in (ours, ours - attention), (name, got, ours, attention)


def test_measured_matmul_rate_is_plausible():
    rate = F.measure_matmul_tflops("cpu", torch.float32, n=128, min_seconds=0.02)
    assert math.isfinite(rate) and 1e-5 < rate < 100  # a CPU core: ~0.01-0.2 TFLOP/s in fp32


def test_metric_logger_writes_tflops_and_mfu(tmp_path):
    logger = MetricLogger(tmp_path, flops_per_sample=3e9, peak_tflops=0.5)
    logger.accumulate({"loss/gcpr": torch.tensor(1.0)}, samples=40, skipped=0)
    rec = logger.flush(1, lr=0.1)
    # single process: TFLOP/s = FLOPs/sample x samples/s / 1e12; MFU = that / the matmul rate
    assert rec["perf/tflops"] == pytest.approx(3e9 * rec["perf/samples_per_s"] / 1e12)
    assert rec["perf/mfu"] == pytest.approx(rec["perf/tflops"] / 0.5)
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["perf/mfu"] == pytest.approx(rec["perf/mfu"])
    plain = MetricLogger(tmp_path / "x")
    (tmp_path / "x").mkdir()
    plain.accumulate({"loss/gcpr": torch.tensor(1.0)}, samples=4, skipped=0)
    assert "perf/tflops" not in plain.flush(1, lr=0.1)
