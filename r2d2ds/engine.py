"""The one place that turns an r2d2ds config plus a ds_config file into a DeepSpeed engine.

ds_configs/*.json hold engine policy only (ZeRO stage, precision, buckets, offload). Everything that is training
policy comes from the r2d2ds config and is written into the ds_config here, once, with the batch identity
train_batch_size = micro x accumulation x world asserted (DeepSpeed-Chat's convention).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r2d2ds.config import Config, ConfigError


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Biases, norms, embeddings of position/class tokens and the temperature are not weight-decayed (CLIP, ALBEF).
    return param.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "temperature", "LayerNorm", "norm"))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_ds_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'train.ds_config': file '{p}' does not exist")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'train.ds_config': '{p}' is not valid JSON ({e})") from e
    return {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys are for readers only


def _check_batch_key(ds: dict[str, Any], key: str, value: int, path: str) -> None:
    if key in ds and ds[key] != value:
        raise ConfigError(f"ds_config '{path}' sets {key}={ds[key]} but the r2d2ds config implies {value}: "
                          f"remove it from the ds_config (it is filled from data.micro_batch and train.grad_accum)")


# ZeRO sizes a ds_config may leave as "auto", derived from the model's hidden size h (the Hugging Face DeepSpeed
# integration's rules, plus allgather and max live/reuse). Units are elements, not bytes. Buckets of h^2
# elements (0.6M for h = 768, 1M for h = 1024) are large enough to keep the collectives efficient and small
# against the model states; the fixed 5e8 of DeepSpeed's examples is a 2 GB fp32 buffer whatever the model.
# The persistence threshold keeps biases and norms (<= 10 h elements) whole on every rank under ZeRO-3 instead
# of all-gathering them one by one; max live / reuse distance (24 h^2: about two transformer layers' weights,
# 12 h^2 each) bound what ZeRO-3 holds gathered beyond the module that is running.
AUTO_ZERO_SIZES: dict[str, Callable[[int], int]] = {
    "reduce_bucket_size": lambda h: h * h,
    "allgather_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
    "stage3_max_live_parameters": lambda h: 24 * h * h,
    "stage3_max_reuse_distance": lambda h: 24 * h * h,
}


def model_hidden_size(model: torch.nn.Module) -> int:
    """The widest hidden size among the model's towers (an R2D2 or the module that wraps one as `.model`)."""
    model = getattr(model, "model", model)
    widths = [int(t.width) for t in (getattr(model, "image_tower", None), getattr(model, "text_tower", None))
              if t is not None and hasattr(t, "width")]
    if not widths:
        raise ValueError(f"{type(model).__name__} has no image_tower/text_tower width to size ZeRO buckets by")
    return max(widths)


def _fill_auto_sizes(ds: dict[str, Any], hidden_size: int | None, path: str) -> None:
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    for key, value in list(zero.items()):
        if value != "auto":
            continue
        if key not in AUTO_ZERO_SIZES:
            raise ConfigError(f"ds_config '{path}': zero_optimization.{key} is \"auto\" but r2d2ds only derives "
                              f"{sorted(AUTO_ZERO_SIZES)}; give it a number")
        if hidden_size is None:
            raise ConfigError(f"ds_config '{path}': zero_optimization.{key} is \"auto\", which needs the model's "
                              "hidden size (pass hidden_size to fill_ds_config)")
        zero[key] = AUTO_ZERO_SIZES[key](int(hidden_size))


def fill_ds_config(cfg: Config, world_size: int, run_dir: str | None = None,
                   hidden_size: int | None = None) -> dict[str, Any]:
    """The ds_config DeepSpeed receives: the file's engine policy plus our training policy.

    `hidden_size` (model_hidden_size of the built model) sizes the ZeRO buckets the file leaves "auto".
    """
    ds = load_ds_config(cfg.train.ds_config)
    _fill_auto_sizes(ds, hidden_size, cfg.train.ds_config)
    micro, accum = cfg.data.micro_batch, cfg.train.grad_accum
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                       ("train_batch_size", micro * accum * world_size)):
        _check_batch_key(ds, key, value, cfg.train.ds_config)
        ds[key] = value
    assert ds["train_batch_size"] == micro * accum * world_size  # the batch identity
    ds["gradient_clipping"] = cfg.train.grad_clip

    # Precision "auto": bf16 on GPUs that have it; fp32 on CPUs (bf16 there is ~10x slower, DESIGN.md 5).
    for key in ("bf16", "fp16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            want = key == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            ds[key]["enabled"] = bool(want)
    if not torch.cuda.is_available() and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"ds_config '{cfg.train.ds_config}': fp16 is not supported on the CPU; use bf16 or fp32")

    if cfg.train.optimizer == "ds_config":
        if "optimizer" not in ds:
            raise ConfigError(f"config key 'train.optimizer' is 'ds_config' but '{cfg.train.ds_config}' has no "
                              "optimizer block; add one or set --train.optimizer=torch_adamw")
        params = ds["optimizer"].setdefault("params", {})
        params.update(lr=cfg.train.lr, betas=list(cfg.train.betas), eps=1e-8, weight_decay=cfg.train.weight_decay)
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
        if not torch.cuda.is_available() and not offload:
            # DeepSpeed's CPU FusedAdam is a ~70 s JIT build; torch_adam selects torch.optim.AdamW (Adam for
            # type "Adam") inside the engine with the same update rule. Offload keeps DeepSpeedCPUAdam.
            params.setdefault("torch_adam", True)
            # torch's fused CPU AdamW updates the flat fp32 partition in place; the default foreach path
            # allocates temporaries the size of the whole partition (sqrt, denominators) at every step, which
            # set the per-rank peak (benchmarks/results/cpu/zero_memory_*.md).
            params.setdefault("fused", True)
    else:
        ds.pop("optimizer", None)

    if run_dir is not None:  # DeepSpeed's monitor writes the TensorBoard events on rank 0
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(run_dir) / "tensorboard"), "job_name": "."}
    return ds


def lr_lambda(cfg: Config):
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at train.steps (multiplier of lr)."""
    warm, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr / cfg.train.lr

    def fn(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def _client_optimizer(groups, cfg: Config):
    """A torch client optimizer: NVIDIA apex's FusedAdam when it is importable on CUDA, else torch AdamW."""
    if torch.cuda.is_available() and importlib.util.find_spec("apex") is not None:
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex only; PyPI's "apex" has no such module

            return FusedAdam(groups, lr=cfg.train.lr, betas=cfg.train.betas, adam_w_mode=True)
        except ImportError:
            pass
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas,
                             fused=torch.cuda.is_available() or None)


def build_engine(module: torch.nn.Module, cfg: Config, ds_config: dict[str, Any]):
    """deepspeed.initialize with our param groups, optimizer choice and LR schedule."""
    import deepspeed

    groups = param_groups(module, cfg.train.weight_decay)
    optimizer = None if "optimizer" in ds_config else _client_optimizer(groups, cfg)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if optimizer is None and offload != "none":
        # DeepSpeedCPUAdam is a JIT-built op: load it (the builder it uses) under the guard against a killed
        # builder's lock file.
        from deepspeed.ops.op_builder import CPUAdamBuilder

        from r2d2ds.distributed.launch import load_jit_op

        load_jit_op(CPUAdamBuilder())
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=copy.deepcopy(ds_config))
    share_fp32_master(engine)
    from r2d2ds.distributed.overlap import overlap_grad_average

    # ZeRO-0 in fp32: the gradient all-reduce runs during the backward (as DDP's) instead of after it
    engine.r2d2ds_grad_average = overlap_grad_average(engine)
    return engine


def share_fp32_master(engine) -> int:
    """In fp32 training, make the ZeRO optimizer's fp32 master partition the parameters' own partition; bytes freed.

    ZeRO keeps an fp32 "master" copy of this rank's parameter partition for the optimizer to step, and copies it
    back into the (bf16) parameters after the step. When the parameters are fp32 themselves and on the same device
    (no offload), that copy duplicates the partition: 4 P / N bytes per rank that the ZeRO paper's fp32 accounting
    (4 P params, 4 P grads, 8 P Adam) does not have. ZeRO-3 means to alias them in that case but compares a
    torch.device with a device-name string (`torch.device("cpu") == "cpu"` is False in torch 2.13, on CUDA too),
    so it always clones; ZeRO-1/2 always clone. Pointing the master tensor's .data at the parameter partition
    keeps the optimizer's references (param_groups, state keys) and makes the step update the parameters in
    place; the copy back becomes a copy onto itself. Values are unchanged: the clone and the partition were equal,
    and every later write goes through the step (tests/distributed/test_fp32_master.py: parameters equal to the
    cloning engine's bit for bit, and a checkpoint round trip).
    bf16 / fp16 training (master and parameters of different dtypes) and CPU offload (master on the host) keep
    their copy. Returns the bytes of the released clones."""
    opt = engine.optimizer
    freed = 0

    def alias(master: torch.Tensor, partition: torch.Tensor) -> int:
        if (master is None or partition is None or master.dtype != partition.dtype
                or master.device != partition.device or master.shape != partition.shape
                or master.untyped_storage().data_ptr() == partition.untyped_storage().data_ptr()):
            return 0
        size = master.untyped_storage().nbytes()
        master.data = partition.data
        return size

    stage = engine.zero_optimization_stage()
    if stage in (1, 2) and hasattr(opt, "single_partition_of_fp32_groups") and not opt.cpu_offload:
        import deepspeed.comm as dist

        for i, master in enumerate(opt.single_partition_of_fp32_groups):
            rank = dist.get_rank(group=opt.real_dp_process_group[i])
            freed += alias(master, opt.parallel_partitioned_bit16_groups[i][rank])
        if freed:
            # Each parameter's lp -> hp mapping (safe_get_full_fp32_param, universal checkpoints) holds views of the
            # master partition: re-link them to the shared one, or they would keep the clone alive, stale. The
            # optimizer-state fragments are linked again lazily at the next step.
            opt._link_all_hp_params()
            opt._hp_optimizer_states_linked = False
    elif stage == 3 and hasattr(opt, "fp32_partitioned_groups_flat") and not (opt.offload_optimizer
                                                                                or opt.offload_param):
        for i, master in enumerate(opt.fp32_partitioned_groups_flat):
            if not opt._swappable_optimizer_subgroup(i):
                freed += alias(master, opt.fp16_partitioned_groups_flat[i])
    return freed
