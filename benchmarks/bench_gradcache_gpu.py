"""The largest global batch per GPU that fits, with and without GradCache (issue 10's GPU benchmark).

ViT-B/16 at 224 px + a 12-layer 768-wide BERT on the bert-base-chinese vocabulary (21128), two 6-layer 768-wide
cross encoders (bench_step.py's "vit-b16" preset, the mission's shapes), every loss term on, bf16, ZeRO-2, one GPU.
Each trial is the trainer's own `Trainer.train_step` (bench_step.SyntheticTrainer: a fresh model, EMA teacher and
DeepSpeed engine, torch AdamW) on a synthetic batch made on the device, for --steps optimizer steps. Modes:

  plain      one micro step on the whole batch (data.micro_batch = B)
  gradcache  train.global_batch = B in chunks of --chunk rows (train.gradcache_negatives = cached, the default)

Search per mode: double B from --start (GradCache: --gc-start) while a trial fits, then bisect between the largest
batch that fitted and the smallest that ran out of memory (torch.cuda.OutOfMemoryError) until they are
--resolution apart (relative).
After every trial, fitted or not, the trainer is torn down (engine.destroy, every reference dropped, gc,
torch.cuda.empty_cache) and the memory still allocated is recorded (`residual_gib`; it must stay near 0 or later
trials would fail early, and the JSON says so). A trial is not started when its predicted time (the last trial's
build time + its step time scaled by the batch ratio) exceeds what is left of the mode's share of --budget-s; the
result then reads "at least `largest_fit`" (`limited_by: "budget"`). `limited_by: "oom"` means the bisection
closed: the limit lies in [largest_fit, smallest_oom). The JSON is rewritten after every trial, so a timeout of
the whole phase keeps what was measured.

    python -P benchmarks/bench_gradcache_gpu.py --out OUT --budget-s 300   # GPU -> OUT/gradcache_gpu.json
    python benchmarks/bench_gradcache_gpu.py --tiny --out OUT              # CPU rehearsal (CI), seconds

`fit` (GPU): peak memory = a + b x batch fitted over the trials that fitted, and the batch at which it would
reach the device's memory, `estimated_max_batch`: an extrapolation, labelled as such, for when the search stops at
the budget.

--tiny: bench_step's tiny preset on the CPU (fp32: precision "auto"), a simulated memory limit: the image tower
raises torch.cuda.OutOfMemoryError in the middle of the forward when it sees more than --tiny-cap-rows rows (the
plain step runs it on the whole batch, GradCache on a chunk), so the search, the mid-step OOM recovery and the
JSON are exercised; GradCache then stops at --max-batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_step, hostinfo: see hostinfo's docstring
import bench_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def device_batch(b: int, image_size: int, text_len: int, device: torch.device, seed: int = 0) -> dict:
    """bench_step.synthetic_batch's layout, drawn on the device: a GradCache batch of tens of thousands of
    224 px images is GBs, too slow to draw on the host and copy."""
    g = torch.Generator(device=device).manual_seed(seed)
    vocab, s = bench_step.VOCAB, bench_step.SPECIALS
    ids = torch.randint(1000, vocab, (b, text_len), generator=g, device=device)
    lengths = torch.randint(text_len // 2, text_len + 1, (b,), generator=g, device=device)
    mask = (torch.arange(text_len, device=device)[None] < lengths[:, None]).long()
    ids[:, 0] = s["cls"]
    ids[torch.arange(b, device=device), lengths - 1] = s["sep"]
    ids[mask == 0] = s["pad"]
    image = torch.randn(b, 3, image_size, image_size, generator=g, device=device)
    return {"image": image, "input_ids": ids, "attention_mask": mask,
            "image_id": torch.arange(b, device=device) // 2}


def _repeat(batch: dict):
    while True:
        yield dict(batch)  # train_step pops bookkeeping keys from its copy


def _is_oom(err: BaseException) -> bool:
    """CUDA OOM, also when it surfaces as a plain RuntimeError (inside a collective, cuBLAS workspace, ...)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0


class _SimulatedLimit:
    """--tiny: the image tower 'runs out of memory' in the middle of the forward above `rows` rows."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def attach(self, tr) -> None:
        def hook(_module, args):
            if args[0].shape[0] > self.rows:
                raise torch.cuda.OutOfMemoryError(f"simulated: {args[0].shape[0]} image rows > {self.rows}")

        tr.module.model.image_tower.register_forward_pre_hook(hook)


def trial(mode: str, b: int, args, tmp: Path, limit: _SimulatedLimit | None) -> dict:
    """One trial: a fresh trainer for batch `b`, --steps optimizer steps. Returns the measurements, or the OOM."""
    sets = list(args.set or [])
    if mode == "gradcache":
        sets += [f"train.global_batch={b}", f"train.chunk_size={min(args.chunk, b)}"]
    res: dict = {"mode": mode, "batch": b}
    t0 = time.perf_counter()
    tr = batch = it = None
    try:
        cfg = bench_step.build_config(args.preset, b, args.steps, args.ds_config, sets, tmp)
        tr = bench_step.SyntheticTrainer(cfg, tmp)
        dev = tr.device
        if limit is not None:
            limit.attach(tr)
        batch = device_batch(b, cfg.data.image_size, cfg.data.max_text_len, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # host sync: timing only
            torch.cuda.reset_peak_memory_stats(dev)
        res["build_s"] = time.perf_counter() - t0

        it = _repeat(batch)
        t1 = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step(it)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
            res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / GIB
        else:
            res["peak_rss_gib"] = bench_step.peak_memory_gib(dev)
        res["step_s"] = (time.perf_counter() - t1) / args.steps
        res["fits"] = True
        if tr.plan.gradcache:
            res["chunk"] = tr.plan.chunk_size
            res["engine_micro_steps"] = tr.plan.engine_accum
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # the exception and its frames' tensors die here
        if not _is_oom(err):
            raise
        res["fits"] = False
        res["oom"] = str(err).splitlines()[0][:300]
    finally:
        engine = getattr(tr, "engine", None)
        if engine is not None and hasattr(engine, "destroy"):  # releases the optimizer's buffers and hooks
            engine.destroy()
        del tr, batch, engine, it  # `it` holds the batch in its frame
        gc.collect()
        if torch.cuda.is_available():
            try:
                torch.cuda.synchronize()  # kernels still queued on side streams (overlap_comm) hold blocks
            except RuntimeError:
                pass
            torch.cuda.empty_cache()
            res["residual_gib"] = _allocated_gib(torch.device("cuda", torch.cuda.current_device()))
    res["wall_s"] = time.perf_counter() - t0
    return res


def search(mode: str, args, budget_s: float, record, tmp: Path, limit: _SimulatedLimit | None) -> dict:
    """Doubling, then bisection, within `budget_s` seconds; `record(trials)` after every trial."""
    t_end = time.perf_counter() + budget_s
    trials: list[dict] = []
    fit, oom = 0, None
    b = max(args.chunk, args.gc_start) if mode == "gradcache" else args.start
    limited_by = None
    while True:
        if b > args.max_batch:
            limited_by = "max_batch"
            break
        last = next((t for t in reversed(trials) if t.get("fits")), None)
        if last is not None:  # predicted time of this trial: the last one's build + its steps scaled to b
            predicted = last["build_s"] + args.steps * last["step_s"] * b / last["batch"]
            if time.perf_counter() + predicted > t_end:
                limited_by = "budget"
                break
        elif time.perf_counter() > t_end:
            limited_by = "budget"
            break
        r = trial(mode, b, args, tmp, limit)
        trials.append(r)
        record(trials)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        if r["fits"]:
            fit = b
        else:
            oom = b if oom is None else min(oom, b)
        if oom is None:
            b *= 2  # doubling until the first OOM
            continue
        if fit == 0:
            limited_by = "oom_at_start"
            break
        if oom - fit <= max(args.granularity, args.resolution * fit):
            limited_by = "oom"
            break
        b = max(fit + args.granularity, (fit + oom) // 2 // args.granularity * args.granularity)
        if b >= oom:
            limited_by = "oom"
            break
    best = next((t for t in trials if t.get("fits") and t["batch"] == fit), None)
    best = best or {}
    # Peak memory against the batch over the trials that fitted (least squares, a + b x batch) and the batch at
    # which it would reach the device's memory: an ESTIMATE (extrapolated), beside the measured largest_fit.
    pts = [(t["batch"], t["peak_allocated_gib"]) for t in trials if t.get("fits") and "peak_allocated_gib" in t]
    fitted = {}
    if len(pts) >= 2 and torch.cuda.is_available():
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        var = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
        fitted = {"peak_gib_intercept": my - slope * mx, "peak_mib_per_sample": slope * 1024,
                  "device_gib": total, "estimated_max_batch": int((total - (my - slope * mx)) / slope)
                  if slope > 0 else None}
    return {"mode": mode, "largest_fit": fit, "smallest_oom": oom, "limited_by": limited_by, "fit": fitted,
            # torch.cuda.max_memory_allocated on a GPU; the process's peak RSS in the CPU rehearsal
            "peak_gib_at_largest": best.get("peak_allocated_gib", best.get("peak_rss_gib")),
            "step_s_at_largest": best.get("step_s"), "trials": trials}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/local")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall clock for the whole search (both modes)")
    p.add_argument("--plain-share", type=float, default=0.35, help="share of the budget for the plain mode")
    p.add_argument("--chunk", type=int, default=64, help="train.chunk_size of the GradCache mode")
    p.add_argument("--start", type=int, default=None, help="first batch of the plain mode (default 64; --tiny 16)")
    p.add_argument("--gc-start", type=int, default=None, help="first batch of the GradCache mode (default 1024, "
                   "which fits by the README's estimate, so no build is spent on small batches; --tiny: one chunk)")
    p.add_argument("--max-batch", type=int, default=1 << 20)
    p.add_argument("--resolution", type=float, default=0.1, help="bisect until (oom - fit) <= this x fit")
    p.add_argument("--granularity", type=int, default=8, help="batches are multiples of this in the bisection")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per trial (the first one allocates the "
                   "optimizer state, so it holds every buffer a later step needs)")
    p.add_argument("--modes", nargs="+", default=["plain", "gradcache"], choices=["plain", "gradcache"])
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="r2d2ds config override")
    p.add_argument("--tiny", "--smoke", action="store_true", help="CPU rehearsal: tiny model, simulated memory limit")
    p.add_argument("--tiny-cap-rows", type=int, default=24, help="--tiny: image-tower rows that 'fit'")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.start = args.start or (16 if args.tiny else 64)
    args.gc_start = args.gc_start or (0 if args.tiny else 1024)
    if args.tiny:
        args.preset, limit = "tiny", _SimulatedLimit(args.tiny_cap_rows)
        if args.max_batch == 1 << 20:
            args.max_batch = 64
        if args.chunk == 64:
            args.chunk = 8
    elif not gpu:
        p.error("no GPU: run with --tiny for the CPU rehearsal")
    else:
        args.preset, limit = "vit-b16", None
    bench_step.single_process_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**bench_step.meta(), "preset": args.preset, "model": bench_step.PRESETS[args.preset]["model"],
            "ds_config": os.path.relpath(args.ds_config, ROOT), "chunk": args.chunk, "steps": args.steps,
            "budget_s": args.budget_s, "negatives": "cached", "simulated_limit_rows": limit.rows if limit else None}
    results: dict = {"meta": meta, "modes": {}}

    def write() -> None:
        (out / "gradcache_gpu.json").write_text(json.dumps(results, indent=1))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(args.modes):
            left = args.budget_s - (time.perf_counter() - t0)
            share = left * args.plain_share if (mode == "plain" and i < len(args.modes) - 1) else left

            def record(trials, mode=mode):
                results["modes"][mode] = {"mode": mode, "trials": trials, "partial": True}
                write()

            results["modes"][mode] = search(mode, args, share, record, Path(tmp), limit)
            write()
    print(f"{'mode':>10} {'largest fit':>12} {'smallest OOM':>13} {'limited by':>11} {'peak GiB':>9} {'step s':>8}")
    for r in results["modes"].values():
        peak = r["peak_gib_at_largest"]
        step = r["step_s_at_largest"]
        print(f"{r['mode']:>10} {r['largest_fit']:>12} {r['smallest_oom']!s:>13} {r['limited_by']!s:>11} "
              f"{'-' if peak is None else f'{peak:.1f}':>9} {'-' if step is None else f'{step:.2f}':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
