"""Row exchanges for the global-batch losses: all-gather of columns without autograd, reduce-scatter of their
grads.

The contrastive wrappers (kernels/contrastive_loss/, kernels/hard_negatives.py) gather the other ranks'
embeddings as plain tensors (no autograd graph, no extra copy kept for backward) and route the gradient of the
gathered columns back to the rank that owns them with one reduce-scatter in their own backward. Ranks may hold
different numbers of rows: the sizes are exchanged once per call (`gather_sizes`, one host sync).

Every exchange runs on `comm_device(group)` (CUDA under NCCL, CPU under gloo) and hands its result back on the
caller's device; on a GPU node under NCCL both are the same CUDA device and nothing is copied."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from r2d2ds.distributed import comm_device, get_rank, get_world_size, to_comm


def gather_sizes(n: int, group=None) -> list[int]:
    """Rows held by every rank of `group`, in rank order. One small all-gather and one host sync."""
    world = get_world_size(group)
    if world == 1:
        return [n]
    device = comm_device(group)
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = torch.empty(world, device=device, dtype=torch.long)
    _all_gather_into(out, t, group)
    return [int(s) for s in out.tolist()]  # host sync: the sizes decide the shapes below


def row_offset(sizes: list[int], group=None) -> int:
    """Global index of this rank's first row in the rank-major gathered batch."""
    return sum(sizes[: get_rank(group)])


class _Pending:
    """A collective in flight: `wait()` returns its result (after `post`, e.g. dropping padding) once done."""

    def __init__(self, out: torch.Tensor, work=None, post=None):
        self.out, self.work, self.post = out, work, post

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out if self.post is None else self.post(self.out)


def all_gather_rows(t: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """(sum(sizes), ...) rank-major concatenation of every rank's `t` (sizes[rank] rows); no autograd."""
    return all_gather_rows_async(t, sizes, group).wait()


def all_gather_rows_async(t: torch.Tensor, sizes: list[int], group=None) -> _Pending:
    """Start `all_gather_rows` without waiting: e.g. images travel while the i2t pass (texts only) runs."""
    world = len(sizes)
    if world == 1:
        return _Pending(t.detach())
    home = t.device
    t = to_comm(t, group).contiguous()
    width = max(sizes)
    if min(sizes) != width:  # uneven rows: pad to the widest, gather, then keep each rank's real rows
        padded = t.new_zeros((width, *t.shape[1:]))
        padded[: t.shape[0]] = t
        t = padded
    out = t.new_empty((width * world, *t.shape[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        work = dist.all_gather_into_tensor(out, t, group=group, async_op=True)
    if min(sizes) == width:
        return _Pending(out, work, post=lambda o: o.to(home))
    return _Pending(out, work, post=lambda o: torch.cat([o[r * width: r * width + s]
                                                         for r, s in enumerate(sizes)]).to(home))


def reduce_scatter_rows(t: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Sum over ranks of (sum(sizes), ...) `t`, returning this rank's rows (routes grads to their owners)."""
    return reduce_scatter_rows_async(t, sizes, group).wait()


def reduce_scatter_rows_async(t: torch.Tensor, sizes: list[int], group=None) -> _Pending:
    """Start `reduce_scatter_rows` without waiting (async_op): the caller overlaps it with more compute, e.g.
    the second direction's backward kernels while the first direction's column grads travel."""
    world = len(sizes)
    if world == 1:
        return _Pending(t)
    home = t.device
    t = to_comm(t, group).contiguous()
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
    rows = sizes[get_rank(group)]
    return _Pending(out, work, lambda o: o[:rows].to(home))


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(out, t, group=group)
