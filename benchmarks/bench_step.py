"""Full R2D2 training steps on synthetic tensors already on the device: samples/s, model TFLOP/s, MFU, peak memory.

Every step is the trainer's own `Trainer.train_step` on a DeepSpeed engine (ZeRO-2 by default, one process):
both towers, the EMA teacher, the masked-text pass, both cross encoders over the 3B ITM pairs, every loss term
(GCPR, TgD, FGR, FgD, MLM), backward, the engine's step and the EMA update. Only the data loader is replaced:
a fixed batch (random pixels, random token ids of random lengths, ids in pairs so multi-positives occur) made
once on the device, so the figures are the model step alone.

TFLOP/s = r2d2ds.flops' count of one step (forward and backward of every part, written out in that module)
x steps / time; MFU = that / the dense matmul rate measured in the same run (torch.mm: bf16 on a GPU training
in bf16, fp32 otherwise). Peak memory: torch.cuda.max_memory_allocated on a GPU, peak RSS on the CPU.

  python benchmarks/bench_step.py --out OUT_DIR                      # GPU: ViT-B/16 and ViT-L/14 presets
  python benchmarks/bench_step.py --tiny --out OUT_DIR               # CPU: a tiny model, seconds (CI)
  python benchmarks/bench_step.py --model vit-b16 --gradcache-chunk 32 --out OUT_DIR   # GradCache off, then on
  python benchmarks/bench_step.py --model vit-b16 --micro-batch 64 --set loss.fgr_weight=0 --out OUT_DIR
`--set section.key=value` (repeatable) overrides any r2d2ds config key. `--gradcache-chunk N` adds, after each
preset's plain case, the same case with GradCache on (train.chunk_size=N): the same samples per step, so the two
rows compare its recomputation cost (its extra forward is not credited in TFLOP/s or MFU: model FLOPs only).
Writes OUT_DIR/bench_step.json (or --json NAME) after every case, so a run stopped by a time budget keeps the
cases it finished ("finished": false until the last one), and prints a table.

One process is one rank, so DeepSpeed's CPU shared-memory all-reduce op, which would reduce nothing here, is not
loaded: its first JIT build takes about a minute of compiling (several on a loaded machine) and would dominate
the CPU mode, whose steps take a fraction of a second.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from r2d2ds.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hostinfo: see its docstring
from hostinfo import host  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 21128  # bert-base-chinese / chinese-roberta-wwm-ext
SPECIALS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}  # their ids in that vocabulary

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}
PRESETS = {
    # ViT-B/16 at 224 px (197 tokens) + BERT-base, two 6-layer cross encoders at 768 wide (DESIGN.md section 1).
    "vit-b16": {"model": {"image_model": "vit_base_patch16_224", "text_model": "config", "text_config": BERT_BASE,
                          "embed_dim": 256, "cross_layers": 6, "cross_heads": 12},
                "data": {"image_size": 224, "max_text_len": 64, "micro_batch": 128}},
    # The released R2D2 image tower: CLIP's ViT-L/14 at 224 px (257 tokens, 1024 wide -> 768 for the cross).
    "vit-l14": {"model": {"image_model": "vit_large_patch14_clip_224", "text_model": "config",
                          "text_config": BERT_BASE, "embed_dim": 768, "cross_layers": 6, "cross_heads": 12},
                "data": {"image_size": 224, "max_text_len": 64, "micro_batch": 64}},
    # CPU mode (CI, gpu_check's rehearsal): the tests' tiny shapes, every term still on.
    "tiny": {"model": {"image_model": "vit_tiny_patch16_224",
                       "image_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64,
                                        "num_heads": 2},
                       "text_model": "config",
                       "text_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "intermediate_size": 64, "max_position_embeddings": 64},
                       "embed_dim": 16, "cross_layers": 2, "cross_heads": 2},
             "data": {"image_size": 32, "max_text_len": 16, "micro_batch": 8}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """A one-rank torch.distributed world (DeepSpeed wants one) on loopback, without DeepSpeed's CPU shm op."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] == "1":
        # DeepSpeed's torch backend loads its CPU shared-memory all-reduce (a JIT build the first time) whenever
        # the accelerator is the CPU, whatever the world size; with one rank there is nothing to reduce, and
        # without the op its collectives fall back to torch.distributed (gloo), which is what the op would skip.
        import importlib

        # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm imports torch)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def build_config(preset: str, micro_batch: int | None, steps: int, ds_config: str, sets: list[str], folder: Path):
    """The preset as a YAML config file plus `--set` overrides, read by the trainer's own config loader."""
    from r2d2ds.config import load_config

    tree = json.loads(json.dumps(PRESETS[preset]))
    if micro_batch:
        tree["data"]["micro_batch"] = micro_batch
    # A torch client optimizer (fused AdamW on CUDA): no DeepSpeed FusedAdam JIT build inside a timed check.
    tree["train"] = {"ds_config": ds_config, "steps": steps, "optimizer": "torch_adamw", "warmup_steps": 0,
                     "log_every": 1_000_000, "progress": False}
    path = folder / f"{preset}.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    return load_config(path, [s if s.startswith("--") else f"--{s}" for s in sets])


def synthetic_batch(b: int, image_size: int, text_len: int, device: torch.device, seed: int = 0) -> dict:
    """[CLS] tokens [SEP] [PAD]... of random lengths in [L/2, L]; image ids in pairs (multi-positives)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (b, text_len), generator=g)
    lengths = torch.randint(text_len // 2, text_len + 1, (b,), generator=g)
    mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
    ids[:, 0] = SPECIALS["cls"]
    ids[torch.arange(b), lengths - 1] = SPECIALS["sep"]
    ids[mask == 0] = SPECIALS["pad"]
    batch = {"image": torch.randn(b, 3, image_size, image_size, generator=g), "input_ids": ids,
             "attention_mask": mask, "image_id": torch.arange(b) // 2}
    return {k: v.to(device) for k, v in batch.items()}


class SyntheticTrainer:
    """The trainer's step on a fixed on-device batch: builds what `Trainer.train_step` reads, without data,
    tokenizer or run directory, and borrows the step itself from `Trainer` unchanged."""

    train_step = Trainer.train_step
    _autocast = Trainer._autocast
    _ema_update = Trainer._ema_update

    def __init__(self, cfg, run_dir: Path):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from r2d2ds.engine import build_engine, fill_ds_config, model_hidden_size
        from r2d2ds.losses.gradcache import GradCache, plan_batch
        from r2d2ds.losses.objective import R2D2Pretraining
        from r2d2ds.metrics import MetricLogger
        from r2d2ds.teacher import EMATeacher
        from r2d2ds.trainer import seed_everything

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        self.cfg, self.rank, self.world = cfg, 0, 1
        seed_everything(cfg.train.seed)
        self.module = R2D2Pretraining(cfg.model, cfg.loss, vocab_size=VOCAB, pad_token_id=SPECIALS["pad"],
                                      mask_token_id=SPECIALS["mask"], special_token_ids=sorted(SPECIALS.values()))
        self.plan = plan_batch(cfg, 1)  # train.global_batch / train.chunk_size (GradCache) as in the trainer
        self.gradcache = GradCache(self.plan, cfg.train.gradcache_negatives) if self.plan.gradcache else None
        self.teacher = EMATeacher(self.module.model, cfg.model.ema_momentum) if self.module.uses_teacher() else None
        self.ds_config = fill_ds_config(self.plan.engine_config(cfg), 1,
                                        hidden_size=model_hidden_size(self.module))
        self.engine = build_engine(self.module, cfg, self.ds_config)
        self.device = self.engine.device
        if self.teacher is not None:
            self.teacher.place(self.engine)
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.bf16 = bool(self.ds_config.get("bf16", {}).get("enabled"))
        self.logger = MetricLogger(run_dir)
        self.step, self.samples_seen = 0, 0
        self.engine.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: timing only


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release(device: torch.device) -> None:
    """Free the previous case's engine, teacher and optimizer state before the next case is built."""
    gc.collect()  # the engine's hooks hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(preset: str, chunk: int, args) -> dict:
    """One preset's timed steps; chunk > 0: GradCache on at that chunk size."""
    sets = [*(args.set or []), *([f"train.chunk_size={chunk}"] if chunk else [])]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(preset, args.micro_batch, args.warmup + args.steps, args.ds_config, sets, Path(tmp))
        tr = SyntheticTrainer(cfg, Path(tmp))
        dev = tr.device
        try:
            return time_case(tr, cfg, preset, sets, args)
        finally:
            tr.engine.destroy()
            del tr
            release(dev)


def time_case(tr: SyntheticTrainer, cfg, preset: str, sets: list[str], args) -> dict:
    from r2d2ds import flops as F

    dev = tr.device
    # What an earlier case in this process left allocated (~0 after release()): it counts in this case's peak.
    mem_at_start = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    b = cfg.data.micro_batch
    batch = synthetic_batch(b, cfg.data.image_size, cfg.data.max_text_len, dev)

    def batches():
        while True:
            yield dict(batch)  # train_step pops bookkeeping keys from its copy

    it = batches()
    for _ in range(args.warmup):
        tr.train_step(it)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tr.train_step(it)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak_mem = peak_memory_gib(dev)
    mm_dtype = torch.bfloat16 if (tr.bf16 and dev.type == "cuda") else torch.float32
    matmul = F.measure_matmul_tflops(dev, mm_dtype, n=args.matmul_n)
    dims = F.model_dims(tr.module.model, cfg.data.image_size, cfg.data.max_text_len)
    step = F.step_flops(dims, b, world=1, terms=F.Terms.from_config(cfg.loss), grad_accum=cfg.train.grad_accum,
                        mlm_probability=cfg.loss.mlm_probability)
    params = sum(p.numel() for p in tr.module.parameters())
    per_step = seconds / args.steps
    tflops = step.total / per_step / 1e12
    row = {"case": preset, "micro_batch": b, "grad_accum": cfg.train.grad_accum,
           "gradcache_chunk": cfg.train.chunk_size, "steps": args.steps, "warmup": args.warmup,
           "zero_stage": tr.engine.zero_optimization_stage(),
           "precision": "bf16" if tr.bf16 else "fp32", "params_m": params / 1e6, "step_s": per_step,
           "samples_per_s": b * cfg.train.grad_accum / per_step, "model_tflop_per_step": step.total / 1e12,
           "tflops": tflops, "matmul_tflops": matmul, "matmul_dtype": str(mm_dtype).replace("torch.", ""),
           "mfu": tflops / matmul, "peak_mem_gib": peak_mem,
           "flops_by_part": {k: f + bw for k, (f, bw) in step.parts.items()}, "overrides": sets}
    if mem_at_start is not None:
        row["mem_at_start_gib"] = mem_at_start
    return row


def meta() -> dict:
    m = {**host("torch", "deepspeed", "transformers", "timm", "triton"),
         "flop_model": "r2d2ds.flops: 2 m n k per matmul, backward 2x forward, "
         "contrastive 8 B_local B_global D per call; model FLOPs only (GradCache's recomputed forward is not "
         "credited); MFU against torch.mm measured in the same run",
         "triton_autotune": os.environ.get("R2D2DS_AUTOTUNE", "1") != "0"}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def print_table(rows: list[dict]) -> None:
    print(f"{'case':>8} {'B':>5} {'chunk':>5} {'step s':>8} {'samples/s':>10} {'TFLOP/s':>9} {'matmul':>8} "
          f"{'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:>8} {r['micro_batch']!s:>5} {r['gradcache_chunk']:>5} skipped: {r['skipped'][:60]}")
            continue
        print(f"{r['case']:>8} {r['micro_batch']:>5} {r['gradcache_chunk']:>5} {r['step_s']:>8.3f} "
              f"{r['samples_per_s']:>10.1f} {r['tflops']:>9.3f} {r['matmul_tflops']:>8.3f} {r['mfu']:>6.1%} "
              f"{r['peak_mem_gib']:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=sorted(PRESETS),
                   help="preset(s) to run (repeatable); default: vit-b16 and vit-l14 on a GPU, tiny on the CPU")
    p.add_argument("--tiny", action="store_true", help="CPU mode: the tiny preset only (seconds; CI)")
    p.add_argument("--micro-batch", type=int, default=None, help="per-step batch (default: the preset's)")
    p.add_argument("--gradcache-chunk", type=int, default=0,
                   help="also run each preset with GradCache on at this chunk size (0: off only)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on a GPU, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 GPU, 1 CPU)")
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--matmul-n", type=int, default=None, help="side of the square torch.mm for the MFU ceiling")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="r2d2ds config override")
    p.add_argument("--out", default="benchmarks/results/local", help="folder for the JSON")
    p.add_argument("--json", default="bench_step.json", help="file name of the JSON in --out")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    presets = ["tiny"] if args.tiny else (args.model or (["vit-b16", "vit-l14"] if gpu else ["tiny"]))
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    single_process_env()
    cases = [(preset, chunk) for preset in presets for chunk in dict.fromkeys([0, args.gradcache_chunk])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i, (preset, chunk) in enumerate(cases):
        try:
            rows.append(run_case(preset, chunk, args))
        except torch.cuda.OutOfMemoryError as err:  # a bigger micro batch than the device holds: say so, go on
            rows.append({"case": preset, "micro_batch": args.micro_batch, "gradcache_chunk": chunk,
                         "skipped": f"OOM: {err}"[:300]})
            release(torch.device("cuda"))
        # after every case: a time budget that stops the next one keeps this one's row
        (out / args.json).write_text(json.dumps({"meta": meta(), "finished": i == len(cases) - 1, "rows": rows},
                                                indent=1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
