"""Run gloo ranks as if the backend were NCCL and record every collective whose tensors NCCL would refuse.

NCCL moves only CUDA tensors; gloo only CPU ones. CI has no GPU, so "CUDA" is simulated on the CPU:

- `torch.distributed.get_backend` reports "nccl" and `torch.cuda.current_device` returns 0, so
  `r2d2ds.distributed.comm_device()` answers cuda:0 as it would on a GPU node;
- `FakeCudaMode` (a TorchFunctionMode) gives every tensor that code creates or moves onto a CUDA device (a
  `device=` argument, `.to(...)`, `.cuda()`) the type `FakeCuda`: CPU storage that reports `device == cuda:0`.
  Ops on a FakeCuda tensor return FakeCuda tensors (subclass propagation), so `t.new_zeros`, `empty_like`,
  `torch.cat` ... of a "CUDA" tensor stay "CUDA", and `.cpu()` / `.to("cpu")` returns a plain tensor;
- the torch.distributed collectives are wrapped: every tensor argument must be a FakeCuda tensor (what NCCL
  needs), else the call site is recorded as a violation. The collective then runs on gloo with the same storage,
  so all ranks stay in step (raising on one rank would hang the others in the collective) and the results are
  real. DeepSpeed's and torch's own collectives are not ours to check: only call sites outside torch/deepspeed
  count.
"""

from __future__ import annotations

import functools
import os
import traceback

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

# Every torch.distributed entry point that takes tensors (object collectives pickle through a CUDA tensor of their
# own under NCCL, so they are legal whatever the caller holds).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv")
_SKIP_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,))


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0 (what `comm_device()` asks for under NCCL)."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    @property
    def is_cuda(self):
        return True


def _wants_cuda(target) -> bool:
    if isinstance(target, torch.Tensor):
        return isinstance(target, FakeCuda)
    if isinstance(target, (str, torch.device)):
        return torch.device(target).type == "cuda"
    return isinstance(target, int) and not isinstance(target, bool)  # .to(0) / device=0 means cuda:0


def _as(x, cls):
    if isinstance(x, torch.Tensor):
        return x.as_subclass(cls)
    if isinstance(x, (list, tuple)):
        return type(x)(_as(i, cls) for i in x)
    return x


class FakeCudaMode(TorchFunctionMode):
    """Tensors created on or moved to "cuda" become FakeCuda; moved to "cpu", plain again."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda", "cpu") and args and isinstance(args[0], torch.Tensor):
            return self._move(name, args, kwargs)
        if "device" in kwargs and _wants_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
            return _as(func(*args, **kwargs), FakeCuda)
        return func(*args, **kwargs)

    @staticmethod
    def _move(name, args, kwargs):
        src, rest = args[0], list(args[1:])
        target = {"cuda": "cuda", "cpu": "cpu"}.get(name, kwargs.pop("device", None))
        dtype = kwargs.pop("dtype", None)
        for a in list(rest):  # .to(device[, dtype]) / .to(other) / .to(dtype)
            if isinstance(a, (str, torch.device, torch.Tensor)) and target is None:
                target = a
                if isinstance(a, torch.Tensor):
                    dtype = a.dtype
            elif isinstance(a, torch.dtype):
                dtype = a
        out = src.as_subclass(torch.Tensor)
        cls = type(src) if target is None else (FakeCuda if _wants_cuda(target) else torch.Tensor)
        if kwargs.get("copy") or isinstance(src, FakeCuda) != (cls is FakeCuda):
            out = out.clone()  # a real device change copies: writes to the result must not reach `src`
        if dtype is not None and dtype != out.dtype:
            out = out.to(dtype)
        if kwargs.get("memory_format") is not None:
            out = out.contiguous(memory_format=kwargs["memory_format"])
        return out.as_subclass(cls)


def _call_site() -> tuple[str, str]:
    """(file:line of the innermost frame outside torch and DeepSpeed, the code that issued the collective;
    file:line of the innermost frame outside r2d2ds/distributed too, the code that asked for it)."""
    site = origin = "?"
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name.startswith(_SKIP_DIRS) or os.sep + "deepspeed" + os.sep in name or name.endswith("fake_nccl.py"):
            continue
        if site == "?":
            site = f"{name}:{frame.lineno}"
        if os.sep.join(("r2d2ds", "distributed", "")) not in name:
            origin = f"{name}:{frame.lineno}"
            break
    return site, origin


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for i in x:
            yield from _tensors(i)


class FakeNccl:
    """Context manager: backend reported as NCCL, CUDA simulated, collectives checked (see the module doc).

    `violations`: (collective, call site, device of the offending tensor, the caller outside r2d2ds/distributed);
    `sites`: {call site: collective} of every checked collective, so a test can say which calls it exercised."""

    def __init__(self):
        self.violations: list[tuple[str, str, str]] = []
        self.sites: dict[str, str] = {}
        self._saved: dict[str, object] = {}
        self._mode = FakeCudaMode()

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            site, origin = _call_site()
            self.sites[site] = name
            for t in _tensors(list(args) + list(kwargs.values())):
                if not isinstance(t, FakeCuda):
                    self.violations.append((name, site, str(t.device), origin))
            return fn(*_as(args, torch.Tensor), **{k: _as(v, torch.Tensor) for k, v in kwargs.items()})

        return checked

    def __enter__(self):
        for name in COLLECTIVES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, getattr(dist, name)))
        self._saved["get_backend"] = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"
        self._saved["current_device"] = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        # The autograd engine runs custom Functions' backward (the kernels' reduce-scatter) with an empty mode
        # stack: enter the mode there too.
        backward = self._saved["backward"] = torch.autograd.function.BackwardCFunction.apply
        mode = self._mode

        def apply(ctx, *args):
            with mode:
                return backward(ctx, *args)

        torch.autograd.function.BackwardCFunction.apply = apply
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        torch.autograd.function.BackwardCFunction.apply = self._saved.pop("backward")
        torch.cuda.current_device = self._saved.pop("current_device")
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return False
