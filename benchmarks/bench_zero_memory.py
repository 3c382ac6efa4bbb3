"""Per-rank memory of R2D2 pre-training under ZeRO 1/2/3 and CPU offload, beside the ZeRO paper's formulas.

Each ds_config runs `deepspeed --num_gpus N` (N = --ranks CPU ranks, gloo; 2 by default) on the synthetic dataset
for a few optimizer steps of the real trainer (every loss on, EMA teacher, fp32, AdamW), with
MALLOC_MMAP_THRESHOLD_=65536 so freed blocks go back to the OS and RSS follows the live tensors (DESIGN.md
section 5). Every rank reports:

  peak          the largest peak RSS of the rank over model building and every phase of every step, without the
                file-backed pages (shared libraries, which other processes' memory pressure evicts and
                faults back: VmHWM - RssFile - RssShmem); the baseline likewise counts RssAnon only
  model states  counted from the engine's own tensors after the first step (distinct storages, bytes):
                params (the module's parameters: whole under ZeRO-1/2, this rank's partitions under ZeRO-3),
                grads (the most gradient storage alive at once at the end of the backward: before the engine's
                reduction, where ZeRO-1 holds the whole .grad, or after it, where every stage holds this rank's
                partition + reduce buckets), master (the optimizer's fp32 partition where it is a
                separate copy: none in fp32, where r2d2ds.engine.share_fp32_master makes it the parameters'
                own partition; the host copy under CPU offload), adam (exp_avg, exp_avg_sq, step of this
                rank's partition); CPU offload's staging buffers are counted beside them ("offload buffers")
  teacher       the EMA teacher's parameter storage on this rank (whole under ZeRO-1/2, a partition under ZeRO-3)
  activations   peak RSS during forward + backward minus RSS before the forward minus the gradients made in it
  rest          peak - baseline - model states - teacher - activations (communication buffers, allocator slack)
  baseline      anonymous RSS after imports, before the process group and the model (Python, torch, DeepSpeed)

and the formulas for fp32 + Adam with Psi parameters and N ranks (Rajbhandari et al. 2020, section 5):
stage 1: 4 Psi + 4 Psi + 8 Psi / N, stage 2: 4 Psi + 12 Psi / N, stage 3: 16 Psi / N; the teacher: 4 Psi, or
4 Psi / N when partitioned. The CPU-offload config (ZeRO-2 + DeepSpeedCPUAdam) keeps 4 Psi + 4 Psi / N on the
accelerator and the optimizer (its own fp32 copy of the partition + Adam, 12 Psi / N) in host memory; on a CPU
machine the accelerator IS the host, so both are the same RSS and the formula is their sum (see `formula`).

    python benchmarks/bench_zero_memory.py --config issue   # ~320M parameters, ~5-7 GB per rank
    python benchmarks/bench_zero_memory.py --config tiny --out scratch/ --ds-configs zero1 zero3
Results: JSON + markdown (date, CPU, versions) in --out (default benchmarks/results/cpu/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # hostinfo: see its docstring
from hostinfo import host, status_kib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpu"
GIB = 1024**3
MIB = 1024**2
VOCAB = ROOT.parent / "shared" / "tokenizers" / "bert-base-chinese" / "vocab.txt"

# The issue's configuration: timm ViT-B/16 at 64 px, a 12-layer 768-wide BERT on the bert-base-chinese vocabulary
# (21128), two 6-layer cross encoders (~320M parameters), every loss on, micro batch 4.
ISSUE = {
    "model": {"image_model": "vit_base_patch16_224", "image_kwargs": {"img_size": 64}, "text_model": "config",
              "text_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "intermediate_size": 3072, "max_position_embeddings": 512},
              "embed_dim": 256, "cross_layers": 6, "cross_heads": 12},
    "data": {"tokenizer": str(VOCAB), "image_size": 64, "max_text_len": 32, "micro_batch": 4},
}
# The CI configuration: ~40M parameters so that model states (tens of MB per stage step) dominate the noise of
# allocator and communication buffers, at a few seconds per step. No dropout: runs are reproducible.
TINY = {
    "model": {"image_model": "vit_tiny_patch16_224",
              "image_kwargs": {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 192, "num_heads": 3},
              "text_model": "config",
              "text_config": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                              "intermediate_size": 2048, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
                              "attention_probs_dropout_prob": 0.0},
              "embed_dim": 64, "cross_layers": 2, "cross_heads": 8, "cross_dropout": 0.0},
    "data": {"tokenizer": "auto", "image_size": 32, "max_text_len": 16, "micro_batch": 8},
}
CONFIGS = {"issue": ISSUE, "tiny": TINY}

DS_CONFIGS = ("zero1", "zero2", "zero3", "zero2_offload")
COMMON = {"loss": {"tgd_alpha": 0.4}, "data": {"shuffle_buffer": 16},
          "train": {"log_every": 1, "ckpt_every": 0, "eval_every": 0, "progress": False, "warmup_steps": 0}}


# ------------------------------------------------------------------------------------------------ worker side
def _status_bytes(field: str) -> int:
    return status_kib(field) * 1024


def _peak() -> int:
    """Peak RSS since the last reset minus the file-backed and shared pages resident now (shared libraries).

    Library pages are evicted and faulted back under memory pressure from other processes, which moves RSS by
    100 MB and more between identical runs; the anonymous memory (tensors, allocator) is what ZeRO changes.
    """
    return _status_bytes("VmHWM") - _status_bytes("RssFile") - _status_bytes("RssShmem")


def _rss() -> int:
    return _status_bytes("RssAnon")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM (peak RSS) to the current RSS
        f.write("5")


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the distinct non-empty storages behind `tensors`."""
    out = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        s = t.untyped_storage()
        if s.nbytes() > 0:
            out[s.data_ptr()] = s.nbytes()
    return out


def _tensors_in(obj, depth: int = 3):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth - 1)


def _optimizer_attrs(opt, words: tuple[str, ...]):
    """Tensors held in the ZeRO optimizer's attributes whose names contain one of `words`."""
    for name, value in vars(opt).items():
        if any(w in name.lower() for w in words):
            yield from _tensors_in(value)


def grad_storages(engine) -> dict[int, int]:
    params = list(engine.module.parameters())
    found = _storages(p.grad for p in params)
    found.update(_storages(_optimizer_attrs(engine.optimizer, ("grad", "ipg"))))
    found.update(_storages(g.grad for g in getattr(engine.optimizer, "single_partition_of_fp32_groups", [])))
    return found


def state_storages(engine) -> dict[str, dict[int, int]]:
    """Parameter, fp32 master and Adam storages of the engine on this rank (after a step)."""
    params = list(engine.module.parameters())
    out = {"params": _storages([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params])}
    opt = engine.optimizer
    masters = list(_tensors_in(getattr(opt, "single_partition_of_fp32_groups", None)))
    masters += list(_tensors_in(getattr(opt, "fp32_partitioned_groups_flat", None)))
    out["master"] = {k: v for k, v in _storages(masters).items() if k not in out["params"]}
    inner = getattr(opt, "optimizer", opt)
    out["adam"] = _storages(t for st in inner.state.values() for t in _tensors_in(st))
    return out


def worker(args) -> None:
    baseline = _rss()
    import torch

    import r2d2ds  # noqa: F401
    from r2d2ds.config import load_config
    from r2d2ds.trainer import Trainer

    baseline = max(baseline, _rss())
    _reset_peak()
    cfg = load_config(args.cfg)
    trainer = Trainer(cfg)
    peak = build_peak = _peak()
    built_rss = _rss()
    engine, rec, steps = trainer.engine, {}, []
    real_step = engine.step

    def step_hook(*a, **k):  # the end of the backward: activations and gradients are at their peak
        rec["fwd_bwd_peak"] = _peak()
        rec["grads"] = sum(grad_storages(engine).values())
        _reset_peak()
        out = real_step(*a, **k)
        rec["opt_step_peak"] = _peak()
        _reset_peak()
        return out

    engine.step = step_hook
    real_reduce = engine.allreduce_gradients

    def reduce_hook(*a, **k):  # the end of the backward, before the engine's reduction: ZeRO-1's whole .grad
        rec["grads_before_reduce"] = max(rec.get("grads_before_reduce", 0), sum(grad_storages(engine).values()))
        return real_reduce(*a, **k)

    engine.allreduce_gradients = reduce_hook
    if trainer.teacher is not None:
        real_update = trainer.teacher.update

        def update_hook(student):
            _reset_peak()
            rss = _rss()
            real_update(student)
            rec["ema_extra"] = _peak() - rss

        trainer.teacher.update = update_hook
    batches = iter(trainer.stream)
    trainer.engine.train()
    states = None
    for _ in range(cfg.train.steps):
        rec.clear()
        rss_before = _rss()
        _reset_peak()
        trainer.train_step(batches)
        rec["after_step_peak"] = _peak()
        rec["rss_before"] = rss_before
        held = max(rec["grads"], rec.get("grads_before_reduce", 0))  # gradients alive at the backward's end
        rec["activations"] = max(0, rec["fwd_bwd_peak"] - rss_before - held)
        rec["peak"] = max(rec["fwd_bwd_peak"], rec["opt_step_peak"], rec["after_step_peak"])
        peak = max(peak, rec["peak"])
        steps.append(dict(rec))
        if states is None:
            found = state_storages(engine)
            states = {k: sum(v.values()) for k, v in found.items()}
            # The most gradient bytes held at once: before the reduction (ZeRO-1: the whole .grad) or after.
            states["grads"] = max(rec["grads"], rec.get("grads_before_reduce", 0))
            # CPU offload's own host buffers (bf16 staging copy of the partition, gradient staging): not model
            # states of the paper's count, reported beside them.
            counted = set(grad_storages(engine)).union(*found.values())
            states["offload_buffers"] = sum(v for k, v in _storages(_optimizer_attrs(
                engine.optimizer, ("cpu_offload", "in_cpu"))).items() if k not in counted)
    teacher_bytes = 0
    teacher_numel = (0, 0)
    if trainer.teacher is not None:
        tparams = list(trainer.teacher.module.parameters())
        teacher_bytes = sum(_storages([p.data for p in tparams] + [getattr(p, "ds_tensor", None)
                                                                     for p in tparams]).values())
        teacher_numel = trainer.teacher.numel()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.model.parameters())
    result = {"rank": trainer.rank, "world": trainer.world, "stage": engine.zero_optimization_stage(),
              "offload": engine.zero_cpu_offload(), "psi": n_params, "baseline": baseline, "built_rss": built_rss,
              "build_peak": build_peak, "step_peak": max(s["peak"] for s in steps),
              "peak": peak, "states": states, "teacher": teacher_bytes, "teacher_numel": list(teacher_numel),
              "activations": max(s["activations"] for s in steps[1:] or steps),
              "ema_update_extra": max(s.get("ema_extra", 0) for s in steps), "steps": steps,
              "ds_zero": {k: v for k, v in trainer.ds_config["zero_optimization"].items()},
              "torch_threads": torch.get_num_threads()}
    Path(args.result).mkdir(parents=True, exist_ok=True)
    (Path(args.result) / f"rank{trainer.rank}.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------ driver side
def formula(stage: int, psi: int, n: int, offload: bool = False) -> dict[str, float]:
    """Bytes per rank of fp32 + Adam model states (ZeRO paper) and of the EMA teacher.

    With the optimizer offloaded (ZeRO-2 + DeepSpeedCPUAdam) the accelerator keeps 4 Psi parameters and the
    4 Psi / N gradient partition, the host the optimizer's own fp32 copy of the partition (4 Psi / N: it cannot
    be the accelerator's parameters) and Adam (8 Psi / N); on a CPU machine both are the same RSS, so the formula
    is their sum, 4 Psi + 16 Psi / N, of which "host" is 12 Psi / N.
    """
    if offload:
        if stage != 2:
            raise ValueError(f"no offload formula for stage {stage}")
        return {"states": 4 * psi + 16 * psi / n, "host": 12 * psi / n, "teacher": 4 * psi}
    states = {1: 4 * psi + 4 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[stage]
    return {"states": states, "host": 0.0, "teacher": 4 * psi / n if stage == 3 else 4 * psi}


def _tree_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _tree_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1",
               MALLOC_MMAP_THRESHOLD_="65536",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    env.pop("TRITON_INTERPRET", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_data(folder: Path) -> Path:
    out = folder / "synthetic"
    subprocess.run([sys.executable, "-m", "r2d2ds.data.prepare", "synthetic", "--out", str(out), "--train", "64",
                    "--val", "0", "--test", "0", "--image-size", "64", "--shard-size", "32", "--seed", "1"],
                   check=True, cwd=ROOT, env=_env(), capture_output=True)
    return out


def run_one(config: str, ds_config: str, data: Path, steps: int, folder: Path, ranks: int = 2,
            micro_batch: int | None = None) -> dict:
    """One deepspeed launch; returns {"ranks": [per-rank results], ...} or {"error": ...}."""
    import yaml

    if config == "issue" and not VOCAB.is_file():
        raise FileNotFoundError(f"the issue configuration needs the bert-base-chinese vocabulary at {VOCAB}")
    tree = _tree_merge(_tree_merge(COMMON, CONFIGS[config]),
                       {"data": {"train": str(data), **({"micro_batch": micro_batch} if micro_batch else {})},
                        "train": {"steps": steps, "run_dir": str(folder / "run"),
                                  "ds_config": str(ROOT / "ds_configs" / f"{ds_config}.json")}})
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    result = folder / "result"
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(__file__).resolve()), "--worker", "--cfg", str(cfg_path), "--result", str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
        return {"ds_config": ds_config, "error": f"exit {proc.returncode}: {tail}"}
    ranks_out = [json.loads((result / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"ds_config": ds_config, "ranks": ranks_out}


def summarize(run: dict) -> dict:
    """The table row of one launch: the worst rank's figures (bytes), the formulas beside."""
    if "error" in run:
        return {"ds_config": run["ds_config"], "error": run["error"]}
    ranks = run["ranks"]
    worst = max(ranks, key=lambda r: r["peak"])
    st = worst["states"]
    states = st["params"] + st["grads"] + st["master"] + st["adam"]
    f = formula(worst["stage"], worst["psi"], worst["world"], bool(worst["offload"]))
    rest = worst["peak"] - worst["baseline"] - states - worst["teacher"] - worst["activations"]
    return {"ds_config": run["ds_config"], "stage": worst["stage"], "offload": worst["offload"],
            "psi": worst["psi"], "world": worst["world"], "peak": worst["peak"],
            "peak_per_rank": [r["peak"] for r in ranks], "baseline": worst["baseline"],
            "states": states, "params": st["params"], "grads": st["grads"], "master": st["master"],
            "adam": st["adam"], "offload_buffers": st.get("offload_buffers", 0), "teacher": worst["teacher"],
            "teacher_numel": worst["teacher_numel"],
            "activations": worst["activations"], "rest": rest, "ema_update_extra": worst["ema_update_extra"],
            "formula_states": f["states"], "formula_host": f["host"], "formula_teacher": f["teacher"],
            "states_vs_formula": states / f["states"],
            "ds_zero": worst["ds_zero"],
            # where the peak happens: model building, forward + backward, the optimizer step, the rest of the step
            # (EMA update, logging); each above nothing (absolute peaks, anonymous memory)
            "phase_peaks": {"build": worst["build_peak"],
                            "fwd_bwd": max(s["fwd_bwd_peak"] for s in worst["steps"]),
                            "optimizer_step": max(s["opt_step_peak"] for s in worst["steps"]),
                            "after_step": max(s["after_step_peak"] for s in worst["steps"])}}


def markdown(meta: dict, config: str, steps: int, rows: list[dict]) -> str:
    def g(x: float) -> str:
        return f"{x / GIB:.2f}"

    ok = [r for r in rows if "error" not in r]
    psi = ok[0]["psi"] if ok else 0
    mem = f"{meta['memory_gib']} GiB" if "memory_gib" in meta else meta.get("memory", "")  # older results
    lines = [
        f"# ZeRO per-rank memory: `{config}` configuration ({psi / 1e6:.1f}M parameters, "
        f"{ok[0]['world'] if ok else '?'} CPU ranks)",
        "",
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores, {mem}; python {meta['python']}, "
        f"torch {meta['torch']}, deepspeed {meta['deepspeed']}. fp32, AdamW, every loss on, EMA teacher, "
        f"{steps} optimizer steps, MALLOC_MMAP_THRESHOLD_=65536, OMP_NUM_THREADS=1 per rank. GiB per rank "
        "(the rank with the higher peak). Columns: see benchmarks/bench_zero_memory.py's docstring; formula = "
        "fp32 + Adam model states of the ZeRO paper (stage 1: 4P + 4P + 8P/N, stage 2: 4P + 12P/N, "
        "stage 3: 16P/N; CPU offload, stage 2: 4P + 16P/N, of which 12P/N, the optimizer's own fp32 copy and "
        "Adam, in host memory: on this CPU-only machine host and device are one RSS) and the teacher (4P, or 4P/N "
        "partitioned).",
        "",
        "| ds_config | peak | model states (params / grads / master / adam) | formula | states / formula | "
        "teacher (formula) | activations | rest | baseline | EMA update extra (MiB) |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['ds_config']} | error: {r['error'].splitlines()[-1][:200]} ||||||||| |")
            continue
        lines.append(
            f"| {r['ds_config']} | **{g(r['peak'])}** | {g(r['states'])} ({g(r['params'])} / {g(r['grads'])} / "
            f"{g(r['master'])} / {g(r['adam'])}) | {g(r['formula_states'])} | {r['states_vs_formula']:.2f} | "
            f"{g(r['teacher'])} ({g(r['formula_teacher'])}) | {g(r['activations'])} | {g(r['rest'])} | "
            f"{g(r['baseline'])} | {r['ema_update_extra'] / MIB:.1f} |")
    by = {r["ds_config"]: r for r in ok}
    if all(k in by for k in ("zero1", "zero2", "zero3")):
        order = by["zero3"]["peak"] < by["zero2"]["peak"] < by["zero1"]["peak"]
        lines += ["", f"Peak ordering stage 3 < stage 2 < stage 1: {'yes' if order else 'NO'} "
                  f"({g(by['zero3']['peak'])} < {g(by['zero2']['peak'])} < {g(by['zero1']['peak'])} GiB)."]
    if ok:
        lines += ["", "Accounting per stage, in bytes per parameter of the whole model (P = Psi = "
                  f"{psi:,}, N = {ok[0]['world']}), counted storages beside the paper's terms:", "",
                  "| ds_config | params | grads | master | adam | states | formula | offload buffers | where |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in ok:
            def p(x: float, psi: int = r["psi"]) -> str:
                return f"{x / psi:.2f}P"

            where = {1: "params whole, grads reduced to the partition at the end of the backward (whole until "
                        "then), Adam partitioned",
                     2: "params whole, grads partitioned during the backward, Adam partitioned",
                     3: "params, grads, Adam partitioned (small parameters whole: persistence threshold)"}
            where = ("host: master + Adam (DeepSpeedCPUAdam) and the staging buffers; accelerator: params whole, "
                     "grads partitioned" if r["offload"] else where[r["stage"]])
            lines.append(f"| {r['ds_config']} | {p(r['params'])} | {p(r['grads'])} | {p(r['master'])} | "
                         f"{p(r['adam'])} | {p(r['states'])} | {p(r['formula_states'])} | "
                         f"{p(r.get('offload_buffers', 0))} | {where} |")
    lines += ["", "Reading it. Formula: fp32 parameters 4P (4P/N under ZeRO-3), gradients 4P (4P/N from ZeRO-2), "
              "Adam 8P/N; fp32 training needs no separate master copy, and r2d2ds keeps none: "
              "`r2d2ds.engine.share_fp32_master` points DeepSpeed's fp32 master partition at the parameters' own "
              "partition (DeepSpeed clones it: ZeRO-1/2 always, ZeRO-3 because its alias test compares a "
              "torch.device with a device-name string, never equal in torch 2.13), which removed 4P/N = 2P per "
              "rank at N = 2 at every stage. Gradients are the most held at once at the end of the backward: "
              "ZeRO-1's whole .grad (4P) before its reduction, ZeRO-2/3's partition (4P/N) + buckets. ZeRO-3's "
              "params exceed 4P/N by the parameters kept whole under the persistence threshold and the "
              "partitions' padding. Under CPU offload the "
              "master is a real second copy (host vs accelerator) and is in the formula; its staging buffers "
              "(a copy of the partition in the parameters' dtype, a gradient buffer of the largest parameter) are "
              "counted apart.",
              "", "Peak: \"activations\" is the forward + backward peak above the RSS before the step minus the "
              "gradient storages alive at the end of the backward. ZeRO-2/3 reduce gradients into buckets during "
              "the backward and ZeRO-3 keeps a persistent fp32 gradient partition, so for them the split between "
              "activations and rest is approximate; peak, model states and teacher are exact. In fp32, "
              "DeepSpeed's ZeRO-1/2 step flattens the gradient partition into a second copy (+4P/N during the "
              "step, DeepSpeed's code, not ours), so at N = 2 ZeRO-2's step holds 4P + 2 x 4P/N of parameters and "
              "gradients, as much as ZeRO-1's backward end (4P + 4P): their peaks differ by the activations and "
              "buffers alive at those moments only; the bf16 path accumulates into one flat partition and has no "
              "such copy. \"EMA update extra\": memory the teacher update allocated (a whole-model gather "
              "would be 4P). Phase peaks (absolute, GiB): " + "; ".join(
                  f"{r['ds_config']}: " + ", ".join(f"{k} {g(v)}" for k, v in r["phase_peaks"].items())
                  for r in ok if "phase_peaks" in r) + "."]
    if meta.get("runs"):
        lines += ["", f"Stages measured in separate launches of this script (sequential, one at a time): "
                  f"{', '.join(meta['runs'])}."]
    lines += ["", "ZeRO sizes used (elements; \"auto\" in ds_configs/ filled from the hidden size): " + "; ".join(
        f"{r['ds_config']}: " + ", ".join(f"{k}={v}" for k, v in r["ds_zero"].items()
                                          if "bucket" in k or "stage3_" in k) for r in ok)]
    return "\n".join(lines) + "\n"


def _wait_for_memory(gib: float, patience_s: float = 600.0) -> None:
    """On a shared machine: wait until MemAvailable reaches `gib` before a launch (give up after patience_s)."""
    import time

    def available() -> float:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")) * 1024 / GIB

    deadline = time.monotonic() + patience_s
    while gib > 0 and available() < gib:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {available():.1f} GiB available after {patience_s:.0f} s; need {gib} GiB")
        time.sleep(15)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", choices=sorted(CONFIGS), default="issue")
    p.add_argument("--ds-configs", nargs="+", default=list(DS_CONFIGS), choices=DS_CONFIGS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks (N) of each launch")
    p.add_argument("--micro-batch", type=int, default=None, help="data.micro_batch (default: the configuration's)")
    p.add_argument("--data", help="synthetic dataset directory (default: a fresh one in a temporary folder)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--min-available-gib", type=float, default=0.0,
                   help="wait until the machine has this much available memory before each launch")
    p.add_argument("--name", default=None, help="result file stem (default zero_memory_<config>)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine saved result files (a later file's row replaces an earlier one of the same "
                        "ds_config) into --out/--name and exit; for stages measured in separate runs")
    args = p.parse_args(argv)
    if args.merge:
        saved = [json.loads(Path(f).read_text()) for f in args.merge]
        rows_by = {}
        for one in saved:
            rows_by.update({r["ds_config"]: r for r in one["rows"]})
        rows = [rows_by[d] for d in DS_CONFIGS if d in rows_by]
        meta, config = saved[-1]["meta"], saved[-1]["config"]
        meta["runs"] = [one["meta"]["date"] for one in saved]
        _write(Path(args.out), args.name or f"zero_memory_{config}", meta, config, saved[-1]["steps"], rows)
        return 0
    if args.worker:
        worker(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as tmp:
        data = Path(args.data) if args.data else prepare_data(Path(tmp))
        for ds in args.ds_configs:  # sequential: one launch (2 ranks) at a time
            _wait_for_memory(args.min_available_gib)
            folder = Path(tmp) / ds
            folder.mkdir()
            run = run_one(args.config, ds, data, args.steps, folder, ranks=args.ranks, micro_batch=args.micro_batch)
            row = summarize(run)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ds_zero"}), flush=True)
    meta = host("torch", "deepspeed")
    _write(Path(args.out), args.name or f"zero_memory_{args.config}", meta, args.config, args.steps, rows)
    return 1 if any("error" in r for r in rows) else 0


def _write(out: Path, stem: str, meta: dict, config: str, steps: int, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "config": config, "steps": steps, "rows": rows},
                                                 indent=1))
    md = markdown(meta, config, steps, rows)
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
