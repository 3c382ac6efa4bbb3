"""EMA teacher for TgD and FgD (ALBEF's momentum distillation): t <- m t + (1 - m) s after each step."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor

from r2d2ds.models.r2d2 import R2D2


def make_teacher(model: R2D2) -> R2D2:
    """A frozen copy of `model` in eval mode (no dropout: the teacher's targets are deterministic)."""
    teacher = copy.deepcopy(model)
    # No feature cache of its own: with a frozen image tower the objective hands the teacher the student's
    # output (a second cache would double its memory).
    teacher.image_tower.feature_cache = None
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher: R2D2, student_params: Iterable[Tensor], momentum: float,
                student_buffers: Iterable[Tensor] | None = None) -> None:
    """t = m t + (1 - m) s for the teacher's parameters in `teacher.parameters()` order; buffers copied.

    `student_params` must follow the student's `parameters()` order (under ZeRO-3 the caller passes the
    gathered full parameters). Buffers: `student_buffers` (in `buffers()` order) are copied when given;
    without them the teacher keeps its own (our towers' buffers are constants such as position ids).
    Accumulates in the teacher's dtype (keep the teacher in fp32 for small (1 - m)).
    """
    t_params = list(teacher.parameters())
    s_params = list(student_params)
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update_: teacher has {len(t_params)} parameters, student {len(s_params)}")
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
        # lerp: t + (1 - m) (s - t) == m t + (1 - m) s
        t.lerp_(s.detach().to(device=t.device, dtype=t.dtype), 1.0 - momentum)
    if student_buffers is not None:
        t_bufs = list(teacher.buffers())
        s_bufs = list(student_buffers)
        if len(t_bufs) != len(s_bufs):
            raise ValueError(f"ema_update_: teacher has {len(t_bufs)} buffers, student {len(s_bufs)}")
        for t, s in zip(t_bufs, s_bufs):
            t.copy_(s)
