"""Process-group facts and the cross-rank exchanges used by the losses, the trainer and eval.

Models never import this package (they are single-device code); losses, kernels' wrappers, the trainer and eval do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of `t` over ranks (a copy; no autograd)."""
    t = t.detach().clone()
    if get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t /= get_world_size(group)
    return t


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.detach().clone()
    if get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_variable(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `t` (rows may differ per rank) over ranks in rank order; no autograd. Used by eval."""
    world = get_world_size(group)
    if world == 1:
        return t.detach()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]  # host sync: once per gather, eval only
    width = max(sizes)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t.detach()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


_LOCAL_GROUPS: dict[int, object] = {}


def local_group():
    """A process group holding only this rank: exchanges through it stay on this rank.

    Used where an op takes a `group` but must see only the local batch (FGR's negatives until the global
    hard-negative exchange lands). Only this rank takes part in creating it, so ranks may call it at any time.
    Returns None when torch.distributed is not initialised (None then means single process everywhere).
    """
    if not is_initialized():
        return None
    rank = dist.get_rank()
    if rank not in _LOCAL_GROUPS:
        _LOCAL_GROUPS[rank] = dist.new_group([rank], use_local_synchronization=True)
    return _LOCAL_GROUPS[rank]
