"""The EMA teacher of TgD and FgD, placed the way the student's ZeRO stage places parameters.

- ZeRO-3: the teacher is partitioned like the student (same element ranges of every parameter on every rank,
  see r2d2ds/distributed/zero.py) and gets DeepSpeed's per-module gather hooks, so its forward gathers one
  module at a time as the student's does and it holds 4 P / N bytes per rank between forwards. The EMA update
  lerps each rank's teacher partition towards the student's matching partition: no gather at all.
- ZeRO-1/2 (and no ZeRO): the student's parameters are whole on every rank anyway, so the teacher is a whole
  fp32 copy on the device (4 P bytes) and the update needs no communication either. Sharding it there would
  add an all-gather of 4 P bytes to every teacher forward, the cost ZeRO-1/2 users chose to avoid.

The teacher stays fp32 whatever the student's precision: its EMA increments (1 - m) x delta (m = 0.995) are
below bf16's resolution and would vanish. Under bf16 it runs inside the trainer's autocast.

Checkpoints: a whole teacher goes into the client state (rank 0 saves it); a partitioned one is saved by every
rank in its own rank file (`rank_state_dict`), keyed by parameter name with the world size checked on load, and
restored bit for bit. On another number of ranks (elastic resume) the universal conversion consolidates the saved
partitions into whole tensors (`consolidate_partitions`) and `load_state_dict` cuts them again for this world size
exactly as ZeRO-3 lays out the student: rank r takes flat[r * n : (r + 1) * n], n = ceil(numel / world).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from r2d2ds.distributed import get_world_size
from r2d2ds.distributed.zero import is_partitioned, local_partition, partition_range, partitioned_numel
from r2d2ds.models.ema import ema_update_, make_teacher

FORMAT_FULL = "full"
FORMAT_PARTITIONED = "zero3-partitioned"


class EMATeacher:
    """t <- m t + (1 - m) s after every optimizer step, for a teacher placed like the student (module docstring).

    Build it from the student BEFORE the engine partitions the student (`deepspeed.initialize`), then call
    `place(engine)` once the engine exists.
    """

    def __init__(self, student: nn.Module, momentum: float) -> None:
        self.module = make_teacher(student).float()  # a whole, frozen, eval-mode fp32 copy (host memory for now)
        self.momentum = float(momentum)
        self.partitioned = False
        self._offload = None  # DeepSpeed's per-module gather hooks of a partitioned teacher

    # ---------------------------------------------------------------------------------------------- placement
    def place(self, engine) -> None:
        """Partition the teacher like `engine`'s module under ZeRO-3, else move it whole to the engine's device."""
        if engine.zero_optimization_stage() != 3:
            self.module.to(engine.device)
            return
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.utils.timer import NoopTimer

        # Persistence threshold 0: no teacher parameter is kept whole (the student keeps small ones whole to skip
        # tiny all-gathers; for the never-optimised teacher that would mean whole copies to keep in sync). Each
        # module's parameters are still gathered in one coalesced all-gather.
        self._offload = DeepSpeedZeRoOffload(
            self.module, timers=NoopTimer(), ds_config=engine.config, overlap_comm=engine.zero_overlap_comm(),
            prefetch_bucket_size=engine.zero_prefetch_bucket_size(),
            max_reuse_distance=engine.zero_max_reuse_distance(),
            max_live_parameters=engine.zero_max_live_parameters(), param_persistence_threshold=0,
            model_persistence_threshold=0, offload_param_config=engine.zero_offload_param(), mpu=engine.mpu)
        self.partitioned = True
        self._check_aligned(engine.module.model)

    def _pairs(self, student: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
        t_named = list(self.module.named_parameters())
        s_named = list(student.named_parameters())
        if [n for n, _ in t_named] != [n for n, _ in s_named]:
            raise ValueError("EMA teacher and student have different parameter names or order")
        return [(n, t, s) for (n, t), (_, s) in zip(t_named, s_named)]

    def _check_aligned(self, student: nn.Module) -> None:
        """Each rank's teacher partition must cover the same elements as its student partition."""
        for name, t, s in self._pairs(student):
            if not (is_partitioned(t) and is_partitioned(s)):
                raise ValueError(f"parameter '{name}': teacher and student must both be ZeRO-3 partitioned")
            if t.ds_numel != s.ds_numel or t.ds_tensor.ds_numel != s.ds_tensor.ds_numel or \
                    torch.distributed.get_world_size(t.ds_process_group) != \
                    torch.distributed.get_world_size(s.ds_process_group):
                raise ValueError(f"parameter '{name}': teacher partition ({t.ds_numel} elements, "
                                 f"{t.ds_tensor.ds_numel} per rank) does not match the student's "
                                 f"({s.ds_numel}, {s.ds_tensor.ds_numel})")

    # ------------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards `student` (the engine's R2D2) after an optimizer step."""
        if not self.partitioned:
            ema_update_(self.module, student.parameters(), self.momentum)
            return
        weight = 1.0 - self.momentum
        for _, t, s in self._pairs(student):
            # Same element range on both sides (checked in place()); the student's partition is the weights its
            # forward uses (bf16 under bf16 training), accumulated into the fp32 teacher partition.
            tp, sp = local_partition(t), local_partition(s)
            tp.lerp_(sp.to(device=tp.device, dtype=tp.dtype), weight)
        # The teacher runs the same module sequence every step: let DeepSpeed record it once and prefetch by it.
        self._offload.get_param_coordinator().reset_step()

    # ----------------------------------------------------------------------------------------------- numbers
    def numel(self) -> tuple[int, int]:
        """(parameter elements this rank holds, elements of the whole teacher)."""
        return partitioned_numel(self.module)

    # -------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The part every rank shares, saved once (client state): the whole teacher, or the partition layout."""
        buffers = {k: v.detach().cpu() for k, v in self.module.named_buffers()}
        if not self.partitioned:
            params = {k: v.detach().cpu() for k, v in self.module.named_parameters()}
            return {"format": FORMAT_FULL, "params": params, "buffers": buffers}
        return {"format": FORMAT_PARTITIONED, "world_size": get_world_size(), "buffers": buffers,
                "shapes": {n: tuple(p.ds_shape) for n, p in self.module.named_parameters()}}

    def rank_state_dict(self) -> dict[str, Tensor] | None:
        """This rank's partition of every parameter (padding excluded) when partitioned, else None."""
        if not self.partitioned:
            return None
        return {n: local_partition(p).detach().cpu().clone() for n, p in self.module.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], rank_state: dict[str, Tensor] | None = None,
                        full: Mapping[str, Tensor] | None = None) -> None:
        """Restore what state_dict / rank_state_dict saved (a plain state dict of an older checkpoint works too).
        `full`: the whole tensors a universal conversion consolidated from a partitioned teacher saved by another
        number of ranks; each rank then takes its partition of them."""
        fmt = state.get("format") if isinstance(state.get("format"), str) else None
        if fmt is None:  # a plain state_dict() of a whole teacher
            state = {"format": FORMAT_FULL, "params": {k: v for k, v in state.items()}, "buffers": {}}
            fmt = FORMAT_FULL
        for name, b in self.module.named_buffers():
            if name in state["buffers"]:
                b.copy_(state["buffers"][name])
        if fmt == FORMAT_FULL:
            if self.partitioned:
                raise ValueError("the checkpoint holds a whole EMA teacher but this run partitions it (ZeRO-3); "
                                 "resume with the ZeRO stage the checkpoint was written with")
            self.module.load_state_dict(state["params"], strict=False)
            missing = {n for n, _ in self.module.named_parameters()} - set(state["params"])
            if missing:
                raise ValueError(f"EMA teacher checkpoint lacks parameters {sorted(missing)[:5]}")
            return
        if fmt != FORMAT_PARTITIONED:
            raise ValueError(f"unknown EMA teacher checkpoint format '{fmt}'")
        if not self.partitioned:
            raise ValueError("the checkpoint holds a ZeRO-3-partitioned EMA teacher but this run keeps it whole; "
                             "resume with the ZeRO stage the checkpoint was written with")
        if state["world_size"] != get_world_size():
            if full is None:
                raise ValueError(f"the EMA teacher was partitioned over {state['world_size']} ranks, this run has "
                                 f"{get_world_size()}: resume on the same world size, or from the universal conversion "
                                 "(elastic resume)")
            self._load_whole_into_partitions(full, state["shapes"])
            return
        if rank_state is None:
            raise ValueError("the checkpoint's rank file has no EMA teacher partition")
        for name, p in self.module.named_parameters():
            if name not in rank_state:
                raise ValueError(f"EMA teacher partition lacks parameter '{name}'")
            local = local_partition(p)
            if rank_state[name].shape != local.shape:
                raise ValueError(f"EMA teacher partition of '{name}' has {tuple(rank_state[name].shape)} "
                                 f"elements, this rank holds {tuple(local.shape)}")
            local.copy_(rank_state[name])

    @torch.no_grad()
    def _load_whole_into_partitions(self, full: Mapping[str, Tensor], shapes: dict[str, Any]) -> None:
        for name, p in self.module.named_parameters():
            if name not in full:
                raise ValueError(f"the consolidated EMA teacher lacks parameter '{name}'")
            whole = full[name]
            if tuple(whole.shape) != tuple(p.ds_shape) or tuple(shapes.get(name, ())) != tuple(p.ds_shape):
                raise ValueError(f"consolidated EMA teacher parameter '{name}' has shape {tuple(whole.shape)} "
                                 f"(saved layout {shapes.get(name)}), this model's is {tuple(p.ds_shape)}")
            # The same element range as the student's partition of this parameter (partition_range: this rank's
            # ds_numel-sized slice of the flat tensor, the padding of the last rank left out).
            start, length = partition_range(p)
            local_partition(p).copy_(whole.reshape(-1).narrow(0, start, length))


def consolidate_partitions(shapes: dict[str, Any], rank_states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Whole tensors from the partitions that ranks 0..N-1 saved (`rank_state_dict`, padding excluded): each
    parameter is the concatenation of its partitions in rank order, reshaped to its saved shape."""
    out: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        parts = []
        for r, rs in enumerate(rank_states):
            if rs is None or name not in rs:
                raise ValueError(f"rank {r}'s EMA teacher partition lacks parameter '{name}'")
            parts.append(rs[name].reshape(-1))
        flat = torch.cat(parts)
        numel = 1
        for d in shape:
            numel *= int(d)
        if flat.numel() != numel:
            raise ValueError(f"EMA teacher partitions of '{name}' hold {flat.numel()} elements over "
                             f"{len(rank_states)} ranks, its shape {tuple(shape)} has {numel}")
        out[name] = flat.reshape(tuple(int(d) for d in shape)).clone()
    return out
