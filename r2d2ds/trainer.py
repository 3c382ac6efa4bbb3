"""The R2D2 pre-training loop on a DeepSpeed engine: build, fit, checkpoint, evaluate, export.

One optimizer step = grad_accum micro steps of `engine(batch) -> engine.backward(loss)` followed by one
`engine.step()`; the engine owns clipping, ZeRO partitioning, loss scaling and the LR schedule. The EMA teacher
lives outside the engine (it is never optimised) and is updated after every optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2d2ds import checkpoint, rundir
from r2d2ds import distributed as rd
from r2d2ds.config import Config
from r2d2ds.distributed.launch import init_distributed
from r2d2ds.engine import build_engine, fill_ds_config, model_hidden_size
from r2d2ds.flops import training_perf_model
from r2d2ds.metrics import MetricLogger
from r2d2ds.preemption import Preempted, StopControl
from r2d2ds.preflight import check_training_paths

log = logging.getLogger("r2d2ds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(base: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro step on one rank (MLM masks, hard negatives): a pure function of the position,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    return ((base * 1_000_003 + step) * 257 + micro) * 4099 + rank


class Trainer:
    def __init__(self, cfg: Config):
        from r2d2ds.data import TrainStream
        from r2d2ds.losses.gradcache import GradCache, plan_batch
        from r2d2ds.losses.objective import R2D2Pretraining
        from r2d2ds.teacher import EMATeacher

        self.cfg = cfg
        self.launch = init_distributed(cfg.train.collective_timeout_s)
        self.rank, self.world = rd.get_rank(), rd.get_world_size()
        # The batch plan: per-rank batch from train.global_batch, GradCache chunks as engine micro steps.
        self.plan = plan_batch(cfg, self.world)
        if rd.is_main_process():
            log.info("%d rank(s), launcher=%s, rendezvous %s:%d, collective timeout %.0f s", self.world,
                     self.launch.launcher, self.launch.master_addr, self.launch.master_port,
                     cfg.train.collective_timeout_s)
        self.run_dir = Path(cfg.train.run_dir)
        # A run directory holding checkpoints is resumed or explicitly overwritten, never silently restarted.
        rundir.check_restart(self.run_dir, cfg.train.resume, cfg.train.overwrite)
        if rd.is_main_process():
            if cfg.train.overwrite:
                rundir.clear_previous_run(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        rd.barrier()

        # Every path key (dataset, tokenizer, ds_config...) fails here, named, on every rank, before any model.
        self.tokenizer = check_training_paths(cfg)
        specials = sorted(set(self.tokenizer.all_special_ids))
        # Identical initial weights on every rank (ZeRO-3 partitions each rank's copy without broadcasting).
        seed_everything(cfg.train.seed)
        module = R2D2Pretraining(cfg.model, cfg.loss, vocab_size=len(self.tokenizer),
                                 pad_token_id=self.tokenizer.pad_token_id,
                                 mask_token_id=self.tokenizer.mask_token_id, special_token_ids=specials)
        # Copied before the engine partitions the student (ZeRO-3), placed like the student once the engine exists.
        self.teacher = EMATeacher(module.model, cfg.model.ema_momentum) if module.uses_teacher() else None

        self.gradcache = GradCache(self.plan, cfg.train.gradcache_negatives) if self.plan.gradcache else None
        self.ds_config = fill_ds_config(self.plan.engine_config(cfg), self.world, run_dir=str(self.run_dir),
                                        hidden_size=model_hidden_size(module))
        # The checkpoint to resume from is chosen (verified, falling back if asked) before the engine exists: one
        # written by another number of ranks needs an engine that loads DeepSpeed's universal format.
        self._resume_tag = (checkpoint.choose(self.run_dir, cfg.train.resume_fallback, rd.comm_device())
                            if cfg.train.resume else None)
        if checkpoint.is_elastic(self.run_dir, self._resume_tag, self.world):
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine = build_engine(module, cfg, self.ds_config)
        self.device = self.engine.device
        if self.teacher is not None:
            self.teacher.place(self.engine)
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.bf16 = bool(self.ds_config.get("bf16", {}).get("enabled"))
        # Dropout streams differ per rank (different data); the model init above was shared.
        seed_everything(cfg.train.seed * 7919 + self.rank)

        self.stream = TrainStream(self.plan.data_config(cfg).data, self.tokenizer, rank=self.rank, world=self.world,
                                  seed=cfg.train.seed)
        self.step = 0
        self.samples_seen = 0
        self.bar = None
        self._saved_step = -1  # the step of the newest checkpoint on disk (a finished run is never re-saved)
        self.stop = StopControl(cfg.train.ckpt_every_minutes, self.device)
        flops_per_sample, peak_tflops = training_perf_model(module.model, cfg, self.device, self.bf16, self.world)
        self.logger = MetricLogger(self.run_dir, monitor=getattr(self.engine, "monitor", None),
                                   flops_per_sample=flops_per_sample, peak_tflops=peak_tflops)
        self._eval_split = None
        if rd.is_main_process():
            cfg.save(self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        if cfg.train.resume:
            self._resume()
        if rd.is_main_process():
            rundir.truncate_metrics(self.run_dir, self.step)  # steps past the start are logged again
            rundir.truncate_tensorboard(self.run_dir, self.step, self.engine.global_samples)

    # ----------------------------------------------------------------------------------------- state
    def _client_state(self) -> dict[str, Any]:
        state = {"step": self.step, "samples_seen": self.samples_seen, "config": self.cfg.to_dict()}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()  # whole, or the layout of a partitioned one
        return state

    def _rank_state(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "rng": checkpoint.rng_state(),
                "skipped_total": self.logger.skipped_total,
                "teacher": self.teacher.rank_state_dict() if self.teacher is not None else None}

    def save_checkpoint(self) -> str:
        tag = checkpoint.save(self.engine, self.run_dir, self.step, self._client_state(), self._rank_state(),
                              keep=self.cfg.train.keep_checkpoints)
        self._saved_step = self.step
        self.stop.saved()
        return tag

    def _resume(self) -> None:
        loaded = checkpoint.load(self.engine, self.run_dir, tag=self._resume_tag) if self._resume_tag else None
        if loaded is None:
            if rd.is_main_process():
                log.warning("train.resume is set but %s has no checkpoint: starting from step 0",
                            checkpoint.checkpoint_dir(self.run_dir))
            return
        tag, client, rank_state, all_rank_states = loaded
        self.step, self.samples_seen = int(client["step"]), int(client["samples_seen"])
        if self.teacher is not None and "teacher" in client:
            # Elastic ZeRO-3: whole tensors consolidated by the conversion, re-partitioned for this world size.
            full = checkpoint.read_universal_teacher(self.run_dir, tag) if rank_state is None else None
            self.teacher.load_state_dict(client["teacher"], rank_state and rank_state.get("teacher"), full=full)
        if rank_state is not None:  # same world size: exactly where this rank stopped
            self.stream.load_state_dict(rank_state["data"], all_states=lambda: [s["data"] for s in all_rank_states()])
            checkpoint.set_rng_state(rank_state["rng"])
            self.logger.skipped_total = int(rank_state.get("skipped_total", 0))
        else:  # elastic: the data position is remapped from every saved rank's (r2d2ds/data/shards.py)
            states = all_rank_states()
            self.stream.load_state_dict(states[0]["data"], all_states=[s["data"] for s in states])
            # Per-rank generator streams (dropout) do not map onto another number of ranks; reseed from the
            # position, as a fresh start does, so the resumed run is reproducible. Batches, MLM masks and
            # negatives are seeded by position already.
            seed_everything(step_seed(self.cfg.train.seed, self.step, 0, self.rank))
            self.logger.skipped_total = sum(int(s.get("skipped_total", 0)) for r, s in enumerate(states)
                                            if r % self.world == self.rank)
        self._saved_step = self.step
        if rd.is_main_process():
            log.info("resumed from %s: step %d (%d samples seen)", tag, self.step, self.samples_seen)

    # ------------------------------------------------------------------------------------------ loop
    def _autocast(self):
        if self.bf16 and self.device.type == "cuda":
            # Student weights are bf16 inside the engine, the EMA teacher stays fp32 (EMA increments of
            # (1 - m) x delta vanish in bf16); autocast lets both run on the same fp32 inputs.
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _ema_update(self) -> None:
        self.teacher.update(self.engine.module.model)  # shard by shard under ZeRO-3: no gather

    def train_step(self, batches) -> None:
        accum = self.plan.grad_accum
        for micro in range(accum):
            batch = next(batches)
            skipped = int(batch.pop("skipped", 0))
            batch.pop("key", None)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            seed = step_seed(self.cfg.train.seed, self.step, micro, self.rank)
            teacher = self.teacher.module if self.teacher is not None else None
            # GradCache: engine micro steps (forward, backward, step), one per chunk (two with cached negatives)
            if self.gradcache is not None:
                out = self.gradcache.step(self.engine, batch, teacher, seed, autocast=self._autocast)
            else:
                with self._autocast():
                    out = self.engine(batch, teacher, seed)
                self.engine.backward(out["loss"])
                self.engine.step()
            self.logger.accumulate(out, samples=batch["image"].shape[0], skipped=skipped)
        self.step += 1
        self.samples_seen += self.plan.global_batch
        if self.teacher is not None:
            self._ema_update()

    def fit(self) -> dict[str, Any] | None:
        from tqdm import tqdm

        cfg = self.cfg.train
        bar = self.bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and rd.is_main_process()),
                   dynamic_ncols=True, desc="train")
        batches = iter(self.stream)
        self.engine.train()
        while self.step < cfg.steps:
            self.train_step(batches)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log()
            stop, due = self.stop.poll()  # collective: every rank, every step
            if stop:  # SIGTERM / SIGUSR1 on any rank: all finished this step; save together and leave
                if self.logger.pending:
                    self._log()
                bar.close()
                if self._saved_step != self.step:
                    self.save_checkpoint()
                checkpoint.wait_for_pruning()
                raise Preempted(self.step, self.stop.signum)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0 or due) and self.step < cfg.steps:
                self.save_checkpoint()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps and self.cfg.data.val:
                self.evaluate()
        bar.close()
        if self._saved_step != self.step:
            self.save_checkpoint()
        elif rd.is_main_process():
            log.info("the run already finished at step %d: its last checkpoint is kept as is", self.step)
        metrics = self.evaluate() if self.cfg.data.val else None
        self.export()
        checkpoint.wait_for_pruning()
        self.stop.close()
        return metrics

    def _log(self) -> None:
        rec = self.logger.flush(self.step, lr=self.engine.get_lr()[0], extra={"train/samples_seen": self.samples_seen})
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in rec.items()
                                  if k.startswith("loss/") or k == "perf/samples_per_s"})

    # -------------------------------------------------------------------------------- eval, export
    def evaluate(self) -> dict[str, Any]:
        from r2d2ds.data import load_retrieval_split
        from r2d2ds.eval import evaluate_calibrated, format_table, write_eval_json

        if self._eval_split is None:
            load = lambda name: load_retrieval_split(self.cfg.data.val, name, self.tokenizer, self.cfg.data.image_size,
                                                     max_images=self.cfg.eval.max_images,
                                                     max_text_len=self.cfg.data.max_text_len, limits=self.cfg.data)
            cal = self.cfg.eval.calibration_split
            self._eval_split = (load(self.cfg.data.val_split), load(cal) if cal else None)
        split, calibration = self._eval_split
        with self._autocast():
            metrics = evaluate_calibrated(self.engine.module.model, split, self.cfg.eval, calibration,
                                          device=self.device)
        if "calibration" in metrics:  # the export (and r2d2ds.api's rank) re-ranks with the chosen weight
            self.cfg.eval.rerank_weight = metrics["calibration"]["weight"]
            if rd.is_main_process():  # a ZeRO-3 export (and `r2d2ds export --run`) reads the run's config.yaml
                self.cfg.save(self.run_dir / "config.yaml")
        self.engine.train()
        flat = {f"eval/{stage}/{k}": v for stage in ("two_tower", "two_stage") for k, v in metrics[stage].items()}
        self.logger.write({"step": self.step, **flat})
        if rd.is_main_process():
            metrics["step"] = self.step
            write_eval_json(metrics, self.run_dir / "eval.json")
            print(f"\nRetrieval on '{self.cfg.data.val_split}' at step {self.step} "
                  f"({metrics['num_images']} images, {metrics['num_texts']} texts):")
            print(format_table(metrics), flush=True)
        return metrics

    def export(self) -> None:
        """Rank 0 writes the export alone and no rank waits for it: a large export can take longer than
        train.collective_timeout_s, and it is the last thing the run does."""
        from r2d2ds.export import export_from_checkpoint, export_model

        if not rd.is_main_process():
            return
        if self.zero3:
            # Gathering partitioned parameters is collective and DeepSpeed's gather context ends with an
            # all-reduce, so the other ranks would wait for the whole write. The final checkpoint holds the same
            # weights (fp32 master copy): consolidate it on rank 0 with no collective at all.
            export_from_checkpoint(self.run_dir, self.run_dir / "model", tag=checkpoint.tag_for(self._saved_step))
        else:
            export_model(self.engine.module.model, self.cfg, self.tokenizer, self.run_dir / "model")


def configure_logging() -> None:
    # torch 2.13 flags all_gather_into_tensor (used inside DeepSpeed's ZeRO) as deprecated on every call.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    # Before init: the rank comes from whichever launcher started us (r2d2ds/distributed/launch.py).
    rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
                 if k in os.environ), "0")
    level = logging.INFO if int(rank) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
