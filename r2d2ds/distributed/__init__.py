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


def comm_device(group=None) -> torch.device:
    """The device every tensor of a collective on `group` must live on: the backend's device.

    NCCL moves only CUDA tensors (this rank's current CUDA device); gloo and MPI only CPU ones. A per-device
    backend string ("cpu:gloo,cuda:nccl", torch's choice when init_process_group gets no backend) moves both:
    CUDA then, where the compute is. Without a process group nothing is communicated: the CPU. Every collective
    in the project gets its tensors from this rule (through the helpers here and in `collectives`), never from
    where the caller's tensor happens to be: a CPU counter all-reduced under NCCL raises on the first call.
    """
    if not is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    raise ValueError(f"no comm-device rule for torch.distributed backend {backend!r} (known: nccl, gloo, mpi)")


def to_comm(t: torch.Tensor, group=None, copy: bool = False) -> torch.Tensor:
    """`t` (detached) on `comm_device(group)`; a copy when it moves or when `copy` (safe to reduce in place)."""
    return t.detach().to(comm_device(group), copy=copy)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    out = to_comm(t, group, copy=True)
    if get_world_size(group) > 1:
        dist.all_reduce(out, op=op, group=group)
    return out.to(t.device)


def all_reduce_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of `t` over ranks: a copy on `t`'s device (no autograd); any device, whatever the backend."""
    return _all_reduce(t, dist.ReduceOp.SUM, group) / get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `t` over ranks: a copy on `t`'s device (no autograd)."""
    return _all_reduce(t, dist.ReduceOp.SUM, group)


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise max of `t` over ranks: a copy on `t`'s device (no autograd)."""
    return _all_reduce(t, dist.ReduceOp.MAX, group)


def all_reduce_min(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise min of `t` over ranks: a copy on `t`'s device (no autograd)."""
    return _all_reduce(t, dist.ReduceOp.MIN, group)


def all_gather_variable(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `t` (rows may differ per rank) over ranks in rank order, on `t`'s device; no autograd.
    Used by eval."""
    world = get_world_size(group)
    if world == 1:
        return t.detach()
    x = to_comm(t, group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]  # host sync: once per gather, eval only
    width = max(sizes)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


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
