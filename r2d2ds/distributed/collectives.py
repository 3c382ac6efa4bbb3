"""Row exchanges for the global-batch losses: all-gather of columns without autograd, reduce-scatter of their
grads.

The contrastive wrappers (kernels/contrastive_loss.py, kernels/hard_negatives.py) gather the other ranks'
embeddings as plain tensors (no autograd graph, no extra copy kept for backward) and route the gradient of the
gathered columns back to the rank that owns them with one reduce-scatter in their own backward. Ranks may hold
different numbers of rows: the sizes are exchanged once per call (`gather_sizes`, one host sync)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from r2d2ds.distributed import get_rank, get_world_size


def gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Rows held by every rank of `group`, in rank order. One small all-gather and one host sync."""
    world = get_world_size(group)
    if world == 1:
        return [n]
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = torch.empty(world, device=device, dtype=torch.long)
    _all_gather_into(out, t, group)
    return [int(s) for s in out.tolist()]  # host sync: the sizes decide the shapes below


def row_offset(sizes: list[int], group=None) -> int:
    """Global index of this rank's first row in the rank-major gathered batch."""
    return sum(sizes[: get_rank(group)])


def all_gather_rows(t: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """(sum(sizes), ...) rank-major concatenation of every rank's `t` (sizes[rank] rows); no autograd."""
    t = t.detach().contiguous()
    world = len(sizes)
    if world == 1:
        return t
    width = max(sizes)
    if min(sizes) == width:  # equal rows: one collective straight into the output
        out = t.new_empty((width * world, *t.shape[1:]))
        _all_gather_into(out, t, group)
        return out
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = t.new_empty((width * world, *t.shape[1:]))
    _all_gather_into(out, padded, group)
    return torch.cat([out[r * width: r * width + s] for r, s in enumerate(sizes)])


def reduce_scatter_rows(t: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Sum over ranks of (sum(sizes), ...) `t`, returning this rank's rows (routes grads to their owners)."""
    return reduce_scatter_rows_async(t, sizes, group).wait()


class _Pending:
    """A reduce-scatter in flight: `wait()` returns this rank's rows once the collective is done."""

    def __init__(self, out: torch.Tensor, work=None, rows: int | None = None):
        self.out, self.work, self.rows = out, work, rows

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.out if self.rows is None else self.out[: self.rows]


def reduce_scatter_rows_async(t: torch.Tensor, sizes: list[int], group=None) -> _Pending:
    """Start `reduce_scatter_rows` without waiting (async_op): the caller overlaps it with more compute, e.g.
    the second direction's backward kernels while the first direction's column grads travel."""
    world = len(sizes)
    if world == 1:
        return _Pending(t)
    t = t.contiguous()
    width = max(sizes)
    if min(sizes) != width:  # uneven rows: pad every rank's block to the widest, drop the padding after
        padded = t.new_zeros((width * world, *t.shape[1:]))
        start = 0
        for r, s in enumerate(sizes):
            padded[r * width: r * width + s] = t[start: start + s]
            start += s
        t = padded
    out = t.new_empty((width, *t.shape[1:]))
    with warnings.catch_warnings():  # torch >= 2.12 renames it; older GPU images only have this name
        warnings.simplefilter("ignore", FutureWarning)
        work = dist.reduce_scatter_tensor(out, t, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return _Pending(out, work, sizes[get_rank(group)] if min(sizes) != width else None)


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(out, t, group=group)
