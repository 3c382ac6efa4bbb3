"""Data-parallel gradient averaging overlapped with the backward, for DeepSpeed's ZeRO stage 0 in fp32.

DeepSpeed's stage-0 engine averages every gradient after the backward has finished (`allreduce_gradients`):
nothing overlaps the transfer. On two CPU ranks training a small model that was ~7% of the contrastive step
(the flatten, the gloo all-reduce and the copy back), where DDP (open_clip's loop) runs the same all-reduce
while autograd is still computing. This does what DDP's reducer does:

- the optimizer's parameters are grouped into buckets of about `bucket_elems` elements in reverse registration
  order (roughly the order in which the backward finishes their gradients);
- when the last gradient of a bucket has been accumulated (`register_post_accumulate_grad_hook`), the bucket is
  flattened and its SUM all-reduce is launched asynchronously, so the transfer runs while autograd computes the
  earlier layers;
- buckets are launched strictly in order (a finished bucket waits for the ones before it), so every rank issues
  the same sequence of collectives even when their backwards finish gradients in different orders;
- an end-of-backward callback launches what is left, with zeros for the gradients that never arrived (a parameter
  this rank's step did not reach: the same sizes on every rank, as DeepSpeed's own reduction does), waits for every
  bucket, divides by the world size and makes each `.grad` its slice of the reduced bucket (a view: no copy back)
  before `engine.backward` returns.

It reduces only at gradient-accumulation boundaries (earlier micro steps accumulate locally, as DeepSpeed's own
reduction does), so the numerics are DeepSpeed's: grad = (1 / world) x sum over ranks of the accumulated local
gradient (the loss already carries DeepSpeed's 1 / accumulation scale). Used only where the engine hands `.grad`
straight to a plain torch optimizer (stage 0, fp32); every other configuration keeps DeepSpeed's reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from r2d2ds.distributed import to_comm

# 4 MiB of fp32: 9 buckets for the 8.7 M-parameter CPU benchmark model. Buckets launch in order, so a large one
# holds back the ones after it: with 16 MiB buckets (3 here) the interleaved open_clip comparison measured lower
# ratios (under heavy machine load, so a weak signal).
DEFAULT_BUCKET_ELEMS = 2**20


class OverlappedGradAverage:
    """Average `params`' gradients over the default process group during the backward (see the module doc).

    `is_boundary()` is asked at the first gradient of each backward: False leaves that backward's gradients to
    accumulate locally."""

    def __init__(self, params: list[torch.nn.Parameter], is_boundary: Callable[[], bool],
                 bucket_elems: int = DEFAULT_BUCKET_ELEMS, group=None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.is_boundary = is_boundary
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(params):  # the backward finishes the last layers first
            if not self.buckets or size + p.numel() > bucket_elems and self.buckets[-1]:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel()
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self._ready = [0] * len(self.buckets)
        self._next = 0  # the next bucket to launch: launches go in bucket order on every rank
        self._pending: list[tuple[dist.Work, torch.Tensor, list[torch.nn.Parameter]]] = []
        self._active: bool | None = None  # None: no gradient seen yet in this backward
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if self._active is None:  # first gradient of this backward
            self._active = bool(self.is_boundary())
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        if not self._active:
            return
        self._ready[self.bucket_of[p]] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch()

    def _launch(self) -> None:
        params = self.buckets[self._next]
        for p in params:  # only at the end of the backward: a gradient this rank's step never reached
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # (sum of numel,) on the backend's device (the comm-device rule): the parameters' own device in every
        # configuration that uses this reducer (CUDA under NCCL, CPU under gloo), so no copy in practice
        flat = to_comm(torch.cat([p.grad.reshape(-1) for p in params]), self.group)
        self._pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, params))
        self._next += 1

    def _finish(self) -> None:
        """End of the backward: launch what is left, wait, and make each .grad its slice of the average."""
        try:
            if self._active:
                while self._next < len(self.buckets):
                    self._launch()
                for work, flat, params in self._pending:
                    work.wait()
                    flat.div_(self.world)
                    if flat.device != params[0].device:  # only where the rule moved it (not in training)
                        flat = flat.to(params[0].device)
                    offset = 0
                    for p in params:  # each .grad becomes its slice of the reduced buffer: no copy back
                        n = p.numel()
                        p.grad = flat[offset:offset + n].view_as(p)
                        offset += n
        finally:
            self._pending.clear()
            self._next = 0
            self._ready = [0] * len(self.buckets)
            self._active = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def overlap_grad_average(engine, bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> OverlappedGradAverage | None:
    """Take over the engine's gradient averaging with an overlapped one where that is the same arithmetic:
    ZeRO stage 0, fp32, a plain torch optimizer, more than one rank. Returns the reducer, or None (the engine
    keeps its own reduction)."""
    opt = getattr(engine, "optimizer", None)
    if (engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
            or not isinstance(opt, torch.optim.Optimizer) or type(opt).__module__.startswith("deepspeed")
            or not dist.is_initialized() or dist.get_world_size() == 1):
        return None
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() and id(p) in in_opt]
    reducer = OverlappedGradAverage(params, engine.is_gradient_accumulation_boundary, bucket_elems)
    engine.enable_backward_allreduce = False  # the reducer above does it, during the backward
    return reducer
