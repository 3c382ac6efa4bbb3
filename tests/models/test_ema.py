"""EMA teacher: frozen eval-mode copy; t = m t + (1 - m) s by hand; buffers; order/shape checks."""

from __future__ import annotations

import pytest
import torch

import r2d2ds  # noqa: F401
from r2d2ds.models import R2D2, ema_update_, make_teacher
from tests.models.tiny import VOCAB, tiny_batch, tiny_model_config


def test_make_teacher_is_a_frozen_independent_copy():
    torch.manual_seed(0)
    student = R2D2(tiny_model_config(), VOCAB).train()
    teacher = make_teacher(student)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))
    # The teacher's forward is deterministic (no dropout) and works on its own copy of the tower.
    b = tiny_batch(b=2)
    with torch.no_grad():
        a1 = teacher.encode_text(b["input_ids"], b["attention_mask"])[1]
        a2 = teacher.encode_text(b["input_ids"], b["attention_mask"])[1]
        i1 = teacher.encode_image(b["image"])[1]
    torch.testing.assert_close(a1, a2)
    assert i1.shape == (2, 16)


def test_ema_update_by_hand():
    torch.manual_seed(0)
    student = R2D2(tiny_model_config(), VOCAB)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.full_like(p, 2.0))
        for p in teacher.parameters():
            p.copy_(torch.full_like(p, 1.0))
    ema_update_(teacher, student.parameters(), momentum=0.9)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 1.0 + 0.1 * 2.0))
    ema_update_(teacher, student.parameters(), momentum=0.5)
    for p in teacher.parameters():  # 0.5 * 1.1 + 0.5 * 2
        torch.testing.assert_close(p, torch.full_like(p, 1.55))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_ema_buffers_and_mismatch():
    torch.manual_seed(0)
    student = R2D2(tiny_model_config(), VOCAB)
    teacher = make_teacher(student)
    bufs = [b.clone() + 1 for b in student.buffers()]
    assert bufs, "the text tower has buffers (position ids) to copy"
    ema_update_(teacher, student.parameters(), 0.99, student_buffers=bufs)
    for t, b in zip(teacher.buffers(), bufs):
        assert torch.equal(t, b)
    with pytest.raises(ValueError, match="parameters"):
        ema_update_(teacher, list(student.parameters())[:-1], 0.99)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(teacher, list(reversed(list(student.parameters()))), 0.99)
