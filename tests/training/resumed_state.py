"""Resume a run (any world size, rigid or universal load) and write what the resume restored, without training.

Run once per rank with RANK/WORLD_SIZE/MASTER_* set (tests/training/test_elastic_zero3.py starts it like
torchrun would): `python resumed_state.py OUT.safetensors --config ... --train.run_dir=... [overrides]`.
Rank 0 writes OUT.safetensors with whole tensors, consolidated over the ranks by DeepSpeed's own collectives:
  student.<name>                  the engine's module weights (state_dict_by_module: one module gathered at a time)
  teacher.<name>                  the EMA teacher (partitioned under ZeRO-3, gathered the same way)
  fp32.<name>, exp_avg.<name>, exp_avg_sq.<name>
                                  the fp32 master weights and Adam moments (deepspeed.utils.safe_get_full_*)
and in the metadata (JSON): the resumed step, the optimizer's step counts, and the keys of every sample the
ranks would read in the rest of the interrupted epoch (with the tail short of a batch that is dropped).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import torch
    from safetensors.torch import save_file

    import r2d2ds  # noqa: F401  (CPU torchvision shim)
    from r2d2ds import distributed as rd
    from r2d2ds.config import load_config
    from r2d2ds.distributed.zero import state_dict_by_module
    from r2d2ds.trainer import Trainer, configure_logging

    out, rest = argv[0], argv[1:]
    config = rest[rest.index("--config") + 1]
    overrides = [a for a in rest if a != "--config" and a != config]
    configure_logging()
    trainer = Trainer(load_config(config, overrides + ["--train.resume=true"]))
    engine = trainer.engine
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # ZeRO-1/2 link each parameter to its optimizer-state fragments only after the first step(); a resumed engine
    # that has not stepped yet is linked here, to the states the load restored.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state_dict_by_module(engine.module.model).items():
        tensors[f"student.{k}"] = v.float()
    if trainer.teacher is not None:
        for k, v in state_dict_by_module(trainer.teacher.module).items():
            tensors[f"teacher.{k}"] = v.float()
    for name, p in engine.module.model.named_parameters():
        if not p.requires_grad:
            continue
        # Collective under ZeRO-3 (every rank calls it, in the same order); a local read under ZeRO-1/2.
        for key, value in (("fp32", safe_get_full_fp32_param(p)),
                           ("exp_avg", safe_get_full_optimizer_state(p, "exp_avg")),
                           ("exp_avg_sq", safe_get_full_optimizer_state(p, "exp_avg_sq"))):
            if value is None:
                raise RuntimeError(f"DeepSpeed returned no {key} for parameter {name}")
            tensors[f"{key}.{name}"] = value.detach().float().cpu().clone()
    steps = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})

    # The rest of the interrupted epoch as this rank would read it: epoch of the resumed position, then stop.
    stream = trainer.stream
    stream.max_epochs = int(stream.state_dict()["epoch"]) + 1
    keys = [k for batch in stream for k in batch["key"]]
    gathered: list = [None] * rd.get_world_size()
    torch.distributed.all_gather_object(gathered, {"keys": keys, "tail_dropped": stream.tail_dropped})
    if rd.is_main_process():
        meta = {"step": trainer.step, "samples_seen": trainer.samples_seen, "optimizer_steps": steps,
                "world": rd.get_world_size(), "rest_of_epoch": gathered}
        save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata={"meta": json.dumps(meta)})
    rd.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
