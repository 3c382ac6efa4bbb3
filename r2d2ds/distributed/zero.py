"""ZeRO-3 partition facts and per-module gathering, for code that touches parameters outside the engine's step.

Under ZeRO-3 (deepspeed.zero.Init) every parameter `p` is an empty placeholder; its values live in `p.ds_tensor`,
this rank's slice of the flattened tensor padded to a multiple of the partition world size:
rank r holds flat[r * n : (r + 1) * n] with n = p.ds_tensor.ds_numel, the last rank's tail being padding. Two
modules of the same architecture partitioned over the same group therefore hold the SAME element ranges of every
parameter on every rank, which is what lets the EMA teacher update shard by shard (r2d2ds/teacher.py).

Nothing here gathers a whole model: `state_dict_by_module` gathers one module's own parameters at a time, so the
device holds at most the largest module whole (the rest stays partitioned).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from torch import Tensor, nn

from r2d2ds.distributed import get_rank


def is_partitioned(param: Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data is a placeholder; the values live in `param.ds_tensor`)."""
    return hasattr(param, "ds_id") and getattr(param, "ds_tensor", None) is not None


def partition_range(param: Tensor) -> tuple[int, int]:
    """(start, length) of the flat elements of `param` that this rank's partition holds, padding excluded."""
    n = param.ds_tensor.ds_numel
    start = n * get_rank(param.ds_process_group)
    return start, max(0, min(n, param.ds_numel - start))


def local_partition(param: Tensor) -> Tensor:
    """A view of this rank's partition of a ZeRO-3 parameter without its padding (possibly empty)."""
    if str(getattr(param.ds_tensor, "final_location", None)).endswith("nvme"):
        raise NotImplementedError(f"parameter {param.ds_id} is offloaded to NVMe: its partition is not in memory")
    _, length = partition_range(param)
    return param.ds_tensor.data.view(-1).narrow(0, 0, length)


def gathered(params: Iterable[Tensor]):
    """Whole `params` on every rank inside the block (a no-op for parameters that are not partitioned)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def state_dict_by_module(model: nn.Module, to_cpu_rank: int | None = 0) -> dict[str, Tensor]:
    """`model.state_dict()` collected one module at a time; every rank must call it (the gathers are collective).

    Each module's own parameters are gathered, copied to host memory on rank `to_cpu_rank` (every rank when None)
    and released before the next module's, so device memory holds one module whole at a time, never the model.
    Other ranks return an empty dict. Parameters shared between modules appear under every name, as in
    `state_dict()`; non-persistent buffers are left out, as `state_dict()` does.
    """
    keep = to_cpu_rank is None or get_rank() == to_cpu_rank
    out: dict[str, Tensor] = {}
    seen: dict[int, Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(recurse=False))
        with gathered([p for _, p in own]):
            if keep:
                for name, p in own:
                    if id(p) not in seen:
                        seen[id(p)] = p.detach().to("cpu", copy=True)
                    out[_join(prefix, name)] = seen[id(p)]
        if keep:
            skip = getattr(module, "_non_persistent_buffers_set", set())
            for name, b in module.named_buffers(recurse=False):
                if name not in skip and b is not None:
                    out[_join(prefix, name)] = b.detach().to("cpu", copy=True)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def partitioned_numel(module: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole module) over the module's parameters.

    A ZeRO-3 parameter counts its partition (padding included: it is allocated) plus any gathered data it
    currently holds; any other parameter counts whole.
    """
    held = total = 0
    for p in module.parameters():
        if is_partitioned(p):
            held += p.ds_tensor.numel() + p.data.numel()
            total += p.ds_numel
        else:
            held += p.numel()
            total += p.numel()
    return held, total
