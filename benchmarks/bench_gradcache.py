"""CPU benchmark of GradCache vs the non-cached step: peak RSS per rank and step time over the global batch.

A small R2D2 (ViT 32 px / patch 8 = 17 tokens, width 64, 2 layers; BERT 16 tokens, width 64, 2 layers; 2 + 2
cross-encoder layers; every loss term on) trains through the real DeepSpeed engine (ZeRO-2, fp32, torch AdamW)
on 2 gloo ranks. All cases run in ONE 2-rank job (start-up paid once), in order, with
MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so RSS follows the live tensors). Per rank:

  peak     = VmHWM during the timed steps (absolute: imports, model, optimizer state, inputs and the step)
  extra    = peak - VmRSS after one warm-up step (what the step itself adds on top of the resident state)

"gradcache" = train.chunk_size rows per engine micro step (r2d2ds/losses/gradcache.py) with the default
train.gradcache_negatives=cached (token-gradient cache: towers forward twice + backward once, exact);
"gradcache-reembed" / "gradcache-detached" = the same with negatives from other chunks re-embedded with gradient /
without gradient; "plain" = the one-shot objective on the whole rank batch in one micro step. "+ckpt" = the same with
model.activation_checkpointing=all (tower blocks and cross-encoder layers recomputed in the backward). Cases run
interleaved (every mode at each size, the order alternating) so slow phases of the shared machine hit every mode;
read the ratios. The 1-minute load average is recorded before and after every case.

    python benchmarks/bench_gradcache.py                      # 64 .. 1024 -> benchmarks/results/cpu/
    python benchmarks/bench_gradcache.py --sizes 64 128 --out scratch/
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hostinfo: see its docstring
from hostinfo import host, status_kib  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 1, 2, 3
LENGTH = 16


def _model_config(checkpointing: str = "none"):
    from r2d2ds.config import ModelConfig

    return ModelConfig(activation_checkpointing=checkpointing, image_model="vit_tiny_patch16_224",
                       image_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
                       text_model="config",
                       text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=256, max_position_embeddings=64),
                       embed_dim=64, cross_layers=2, cross_heads=2, attention_impl="torch", contrastive_impl="torch")


def _batch(rows: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(4, VOCAB, (rows, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (rows,), generator=g)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return {"image": torch.randn(rows, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "image_id": torch.arange(rows) + rank * rows}


def _case(rank: int, world: int, mode: str, global_batch: int, chunk: int, steps: int) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from r2d2ds.config import LossConfig
    from r2d2ds.losses import R2D2Pretraining
    from r2d2ds.losses.gradcache import BatchPlan, GradCache
    from r2d2ds.models import make_teacher

    torch.manual_seed(0)
    base, _, ckpt = mode.partition("+")
    obj = R2D2Pretraining(_model_config("all" if ckpt else "none"), LossConfig(), VOCAB, PAD, MASK,
                          [PAD, CLS, SEP, MASK])
    teacher = make_teacher(obj.model)
    rows = global_batch // world
    plan = BatchPlan(global_batch=global_batch, world=world, grad_accum=1, rank_batch=rows,
                     chunk_size=chunk if mode.startswith("gradcache") else 0)
    plan = dataclasses.replace(plan, negatives=mode.partition("+")[0].partition("-")[2] or "cached")
    ds = {"train_micro_batch_size_per_gpu": plan.engine_micro_batch, "gradient_accumulation_steps": plan.engine_accum,
          "train_batch_size": plan.engine_micro_batch * plan.engine_accum * world, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=obj, optimizer=opt, config=ds)
    gradcache = GradCache(plan) if plan.gradcache else None  # plan.negatives: gradcache[-reembed|-detached]
    batch = _batch(rows, rank)

    def step(i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if gradcache is not None:
            gradcache.step(engine, batch, teacher, seed=i)
        else:
            out = engine(batch, teacher, i)
            engine.backward(out["loss"])
            engine.step()
        dist.barrier()
        return time.perf_counter() - t0

    load_before = os.getloadavg()[0]
    warm_s = step(0)  # one-time costs (optimizer state, thread stacks, allocator arenas) are not the step's
    gc.collect()
    base_kib = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM (peak RSS) to the current RSS
        f.write("5")
    times = [step(i + 1) for i in range(steps)]
    peak_kib = status_kib("VmHWM")
    return {"peak_mib": peak_kib / 1024, "base_mib": base_kib / 1024, "extra_mib": (peak_kib - base_kib) / 1024,
            "step_s": min(times), "warmup_s": warm_s, "load_before": load_before, "load_after": os.getloadavg()[0]}


def _rank(rank: int, world: int, port: int, cases: list, chunk: int, steps: int, outdir: str) -> None:
    """Every case on this rank, in order, in one process: the peak-RSS counter is reset per case and the
    previous case's tensors are freed (and returned to the OS) before the next one's baseline is read."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    with open(os.path.join(outdir, f"{rank}.jsonl"), "w") as f:
        for mode, global_batch in cases:
            r = _case(rank, world, mode, global_batch, chunk, steps)
            f.write(json.dumps(r) + "\n")
            f.flush()
            gc.collect()
            if rank == 0:
                print(json.dumps({"mode": mode, "global_batch": global_batch, **r}), flush=True)
    dist.destroy_process_group()


def run_cases(cases: list, chunk: int, steps: int, world: int) -> list[dict]:
    """All cases on `world` fresh gloo ranks (one job: process start-up and imports are paid once)."""
    import torch.multiprocessing as mp

    os.environ.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # inherited by the spawned ranks
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_rank, args=(world, port, cases, chunk, steps, outdir), nprocs=world, join=True,
                           start_method="spawn")
        per_rank = []
        for r in range(world):
            with open(os.path.join(outdir, f"{r}.jsonl")) as f:
                per_rank.append([json.loads(line) for line in f])
    rows = []
    for i, (mode, global_batch) in enumerate(cases):
        ranks = [per_rank[r][i] for r in range(world)]
        rows.append({"mode": mode, "global_batch": global_batch, "rank_batch": global_batch // world,
                     "chunk": chunk if mode.startswith("gradcache") else None, "ranks": ranks,
                     "peak_mib": max(x["peak_mib"] for x in ranks), "extra_mib": max(x["extra_mib"] for x in ranks),
                     "step_s": max(x["step_s"] for x in ranks),
                     "load": [ranks[0]["load_before"], ranks[0]["load_after"]]})
    return rows


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    plain = {r["global_batch"]: r for r in ok if r["mode"] == "plain"}
    gc_ = {r["global_batch"]: r for r in ok if r["mode"] == "gradcache"}
    sizes = sorted(set(plain) & set(gc_))
    out: dict = {"sizes": sizes}
    if not sizes:
        return out
    lo, hi = sizes[0], sizes[-1]
    out["gradcache_peak_growth"] = gc_[hi]["peak_mib"] / gc_[lo]["peak_mib"]
    out["plain_peak_growth"] = plain[hi]["peak_mib"] / plain[lo]["peak_mib"]
    out["time_ratio"] = {b: gc_[b]["step_s"] / plain[b]["step_s"] for b in sizes}
    out["peak_ratio"] = {b: gc_[b]["peak_mib"] / plain[b]["peak_mib"] for b in sizes}
    for neg in ("reembed", "detached"):
        other = {r["global_batch"]: r for r in ok if r["mode"] == f"gradcache-{neg}"}
        out[f"time_ratio_{neg}"] = {b: other[b]["step_s"] / plain[b]["step_s"] for b in sizes if b in other}
        out[f"peak_ratio_{neg}"] = {b: other[b]["peak_mib"] / plain[b]["peak_mib"] for b in sizes if b in other}
    # Activation checkpointing: the same mode with and without it, side by side at each size.
    out["checkpointing"] = {}
    for mode in ("plain", "gradcache"):
        on = {r["global_batch"]: r for r in ok if r["mode"] == mode + "+ckpt"}
        off = {r["global_batch"]: r for r in ok if r["mode"] == mode}
        out["checkpointing"][mode] = {b: {"extra": on[b]["extra_mib"] / off[b]["extra_mib"],
                                          "peak": on[b]["peak_mib"] / off[b]["peak_mib"],
                                          "time": on[b]["step_s"] / off[b]["step_s"]}
                                      for b in sorted(set(on) & set(off))}
    ckpt_gc = {r["global_batch"]: r for r in ok if r["mode"] == "gradcache+ckpt"}
    out["time_ratio_ckpt"] = {b: ckpt_gc[b]["step_s"] / plain[b]["step_s"] for b in sizes if b in ckpt_gc}
    # Per-rank memory model from the measured points: the plain step's extra memory per sample (activations),
    # and GradCache's per-sample slope (inputs, O(B*D) caches, the token cache of "cached") plus its intercept
    # (one chunk's activations).
    rb = [plain[b]["rank_batch"] for b in sizes]
    out["plain_extra_mib_per_sample"] = _fit(rb, [plain[b]["extra_mib"] for b in sizes])[1]
    a, slope = _fit(rb, [gc_[b]["extra_mib"] for b in sizes])
    out["gradcache_extra_mib_per_sample"] = slope
    out["gradcache_extra_mib_intercept"] = a
    re_ = {r["global_batch"]: r for r in ok if r["mode"] == "gradcache-reembed"}
    if len(set(re_) & set(sizes)) > 1:
        both = sorted(set(re_) & set(sizes))
        out["reembed_extra_mib_intercept"], out["reembed_extra_mib_per_sample"] = _fit(
            [re_[b]["rank_batch"] for b in both], [re_[b]["extra_mib"] for b in both])
    return out


def markdown(meta: dict, rows: list[dict], s: dict, chunk: int, world: int) -> str:
    lines = [
        "# GradCache vs non-cached step: CPU peak memory per rank and step time",
        "",
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB; python "
        f"{meta['python']}, torch {meta['torch']}, deepspeed {meta['deepspeed']}; {world} gloo ranks, "
        "OMP_NUM_THREADS=1 each, ZeRO-2 fp32, every loss term on (GCPR, TgD, FGR with global negatives, FgD, "
        f"MLM), chunk_size {chunk}.",
        "Peak = per-rank VmHWM during the timed steps (max over ranks; fresh processes, "
        "MALLOC_MMAP_THRESHOLD_=65536); extra = peak minus RSS after one warm-up step. Time = best of the timed "
        "steps (max over ranks). The machine is SHARED with other engineers' jobs: absolute times are noisy, "
        "and the plain/GradCache cases of one size run back to back so their ratio is the figure to read.",
        "",
        "| global batch | rank batch | mode | peak (MiB) | extra (MiB) | time / step (s) | samples/s | load 1 min "
        "(before, after) |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['global_batch']} | | {r['mode']} | error: {r['error']} | | | | |")
            continue
        load = "{:.1f}, {:.1f}".format(*r["load"]) if "load" in r else ""
        lines.append(f"| {r['global_batch']} | {r['rank_batch']} | {r['mode']} | {r['peak_mib']:.0f} | "
                     f"{r['extra_mib']:.0f} | {r['step_s']:.2f} | {r['global_batch'] / r['step_s']:.1f} | {load} |")
    if s.get("sizes"):
        lo, hi = s["sizes"][0], s["sizes"][-1]
        nan = float("nan")
        tr, pr = s.get("time_ratio_reembed", {}), s.get("peak_ratio_reembed", {})
        td, pd = s.get("time_ratio_detached", {}), s.get("peak_ratio_detached", {})
        lines += [
            "",
            "| global batch | cached / plain time | cached / plain peak | target time <= 1.5 | reembed / plain time | "
            "reembed / plain peak | detached / plain time | detached / plain peak |",
            "|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {b} | {s['time_ratio'][b]:.2f} | {s['peak_ratio'][b]:.2f} | "
                  f"{'met' if s['time_ratio'][b] <= 1.5 else 'NOT met'} | {tr.get(b, nan):.2f} | "
                  f"{pr.get(b, nan):.2f} | {td.get(b, nan):.2f} | {pd.get(b, nan):.2f} |" for b in s["sizes"]]
        worst_t = max(s["time_ratio"].values())
        lines += [
            "",
            f"Targets (issue 10), GradCache = the default \"cached\" negatives: peak growth from global batch {lo} to "
            f"{hi}: x{s['gradcache_peak_growth']:.2f} (target <= 1.3: "
            f"{'met' if s['gradcache_peak_growth'] <= 1.3 else 'NOT met'}; plain: x{s['plain_peak_growth']:.2f}). "
            f"Step time GradCache / plain at most {worst_t:.2f} (target <= 1.5: "
            f"{'met' if worst_t <= 1.5 else 'NOT met'} at every size); reembed at most "
            f"{max(tr.values()) if tr else nan:.2f}, detached at most {max(td.values()) if td else nan:.2f}.",
            f"Per-rank memory model fitted on these points (extra = a + b x rank batch): plain b = "
            f"{s['plain_extra_mib_per_sample']:.2f} MiB/sample (activations of the whole batch); GradCache (cached) "
            f"b = {s['gradcache_extra_mib_per_sample']:.3f} MiB/sample (inputs, O(B x D) caches, the token cache "
            f"and its gradient), a = {s['gradcache_extra_mib_intercept']:.0f} MiB (one chunk of {chunk})"
            + (f"; reembed b = {s['reembed_extra_mib_per_sample']:.3f} MiB/sample, a = "
               f"{s['reembed_extra_mib_intercept']:.0f} MiB (one chunk with its re-embedded negatives)."
               if "reembed_extra_mib_per_sample" in s else "."),
        ]
    ck = s.get("checkpointing", {})
    if any(ck.values()):
        lines += [
            "",
            "Activation checkpointing (model.activation_checkpointing=all) vs off, the same mode at the same size "
            "(ratios on / off; extra = the step's own memory above the resident state):",
            "",
            "| global batch | plain: extra | plain: peak | plain: time | GradCache: extra | GradCache: peak | "
            "GradCache: time | GradCache+ckpt / plain time |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        nan = {"extra": float("nan"), "peak": float("nan"), "time": float("nan")}
        tc = s.get("time_ratio_ckpt", {})
        for b in sorted(set(ck.get("plain", {})) | set(ck.get("gradcache", {}))):
            p, g = ck.get("plain", {}).get(b, nan), ck.get("gradcache", {}).get(b, nan)
            lines.append(f"| {b} | {p['extra']:.2f} | {p['peak']:.2f} | {p['time']:.2f} | {g['extra']:.2f} | "
                         f"{g['peak']:.2f} | {g['time']:.2f} | {tc.get(b, float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="global batches")
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (best is kept)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["plain", "gradcache", "gradcache-reembed", "gradcache-detached",
                                                  "plain+ckpt", "gradcache+ckpt"], help="run at every size, "
                   "in this order, reversed at every other size")
    p.add_argument("--render", metavar="JSON", help="print the markdown table of a saved JSON and exit")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    if args.render:  # re-render an existing JSON (no measurement)
        with open(args.render) as f:
            saved = json.load(f)
        print(markdown(saved["meta"], saved["rows"], summary(saved["rows"]), saved["chunk"], saved["world"]))
        return
    cases = []
    for i, b in enumerate(args.sizes):  # interleaved, the order alternating per size
        modes = args.modes
        cases += [(m, b) for m in (modes if i % 2 == 0 else modes[::-1])]
    rows = run_cases(cases, args.chunk, args.steps, args.world)
    meta = host("torch", "deepspeed")
    s = summary(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradcache.json"), "w") as f:
        json.dump({"meta": meta, "chunk": args.chunk, "world": args.world, "rows": rows, "summary": s}, f, indent=1)
    md = markdown(meta, rows, s, args.chunk, args.world)
    with open(os.path.join(args.out, "gradcache.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
