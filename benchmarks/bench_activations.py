"""Activation memory per training sample of the mission's model, measured: what autograd saves for the backward.

The model: timm ViT-L/14 (`vit_large_patch14_224`, 224 px, 257 tokens) + BERT-base (12 x 768, the bert-base-chinese
vocabulary of 21128, 64 text tokens, dropout 0.1 as configured by default) + two 6-layer cross encoders
(cross dropout 0.1), the R2D2 pre-training objective with every loss on (GCPR, TgD and FgD against an fp32 EMA
teacher, FGR, MLM), one process, no engine. bf16 as DeepSpeed's bf16 engine runs it: the student's weights in bf16,
the forward inside bf16 autocast (CPU autocast here), the teacher fp32.

Per micro batch B (1, then 2), after one warm-up step at B = 1 so the parameter gradients are resident:

  saved      bytes of the distinct storages autograd keeps for the backward at the end of the forward, recorded by
             a torch.autograd.graph.saved_tensors_hooks pack hook (each storage counted once, at its full size);
             weights and other batch-independent tensors are saved at every B and cancel in the difference
  peak       peak anonymous RSS over forward + backward above the RSS before the forward (MALLOC_MMAP_THRESHOLD_
             set so freed blocks go back to the OS); it holds the saved tensors plus the transients
  transient  peak - saved: temporaries that live only inside one op or one block (attention scores, the
             recompute of a checkpointed block, the teacher's forward, the loss's similarity matrices)

per sample = value(B = 2) - value(B = 1). The same with model.activation_checkpointing = "all" (every ViT block,
BERT layer and cross-encoder layer keeps only its input and is recomputed in the backward).

Measured on the CPU in bf16; attention runs through F.scaled_dot_product_attention on the CPU as on the GPU (the
kernel each device picks decides whether the (L x L) probabilities are saved: the "largest saved tensors" list in
the results shows which), and GPU kernels (flash attention) save no more. Results: JSON + markdown in --out.

    python benchmarks/bench_activations.py          # ~5-10 GB, tens of minutes on one core
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # RSS follows live tensors
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # hostinfo: see its docstring
from hostinfo import host, status_kib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpu"
MIB = 1024**2
VOCAB = 21128  # bert-base-chinese
BATCHES = (1, 2, 4)
MISSION = {
    "model": {"image_model": "vit_large_patch14_224", "image_kwargs": {}, "text_model": "config",
              "text_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "intermediate_size": 3072, "max_position_embeddings": 512},
              "embed_dim": 256, "cross_layers": 6, "cross_heads": 12},
    "loss": {"tgd_alpha": 0.4},
    "image_size": 224, "text_len": 64,
}


def _rss() -> int:
    return status_kib("RssAnon") * 1024


def _peak() -> int:  # peak RSS since the last reset without the file-backed / shared pages (shared libraries)
    return (status_kib("VmHWM") - status_kib("RssFile") - status_kib("RssShmem")) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(checkpointing: str):
    import torch

    from r2d2ds.config import config_from_dict
    from r2d2ds.losses.objective import R2D2Pretraining
    from r2d2ds.models.ema import make_teacher

    model = dict(MISSION["model"], activation_checkpointing=checkpointing)
    cfg = config_from_dict({"model": model, "loss": MISSION["loss"]})
    torch.manual_seed(0)
    module = R2D2Pretraining(cfg.model, cfg.loss, vocab_size=VOCAB, pad_token_id=0, mask_token_id=103,
                             special_token_ids=[0, 100, 101, 102, 103])
    teacher = make_teacher(module.model).float()  # the EMA teacher stays fp32 (r2d2ds/teacher.py)
    module = module.to(torch.bfloat16).train()
    return module, teacher


def batch_of(b: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    size, length = MISSION["image_size"], MISSION["text_len"]
    ids = torch.randint(104, VOCAB, (b, length), generator=g)
    ids[:, 0] = 101
    return {"image": torch.randn(b, 3, size, size, generator=g).to(torch.bfloat16), "input_ids": ids,
            "attention_mask": torch.ones(b, length, dtype=torch.long), "image_id": torch.arange(b)}


def step(module, teacher, b: int, seed: int) -> dict:
    """One forward + backward at micro batch `b`; saved bytes, peak above the start, the largest saved tensors."""
    import torch

    batch = batch_of(b, seed)
    saved: dict[int, int] = {}
    shapes: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if st.nbytes() > saved.get(key, -1):
            saved[key] = st.nbytes()
            shapes[key] = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    gc.collect()
    rss0 = _rss()
    _reset_peak()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module(batch, teacher, seed=seed)["loss"]
    fwd_peak = _peak() - rss0
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _peak() - rss0
    del loss
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    act = {k: v for k, v in saved.items() if k not in params}  # the weights were resident before the forward
    biggest = Counter()
    scores = 0
    for k, v in act.items():
        shape, dtype = shapes[k]
        biggest[f"{list(shape)} {dtype}"] += v
        # (.., queries, keys) over the 257 image tokens, or 64 x 64 (text self-attention scores and dropout masks;
        # a text tower's per-head q/k/v has that shape too, so this is an upper bound for the text part)
        if len(shape) == 4 and (shape[-1] == 257 or shape[-2:] == (64, 64)):
            scores += v
    held = sum(act.values())
    return {"batch": b, "saved": held, "saved_params": sum(v for k, v in saved.items() if k in params),
            "saved_storages": len(saved), "score_shaped": scores, "fwd_peak": fwd_peak, "peak": peak,
            "transient": peak - held, "seconds": round(seconds, 1),
            "largest_saved": [[k, v] for k, v in biggest.most_common(8)]}


def measure(checkpointing: str) -> dict:
    import torch

    module, teacher = build(checkpointing)
    n_params = sum(p.numel() for p in module.model.parameters())
    step(module, teacher, 1, seed=0)  # warm-up: the gradients become resident, like the engine's
    runs = []
    for b in BATCHES:
        module.zero_grad(set_to_none=False)
        runs.append(step(module, teacher, b, seed=b))
    one, two, four = runs
    keys = ("saved", "score_shaped", "fwd_peak", "peak", "transient")
    per = {k: two[k] - one[k] for k in keys}  # the figure: B 2 - B 1
    per_2_4 = {k: (four[k] - two[k]) / 2 for k in keys}  # linearity check
    out = {"activation_checkpointing": checkpointing, "psi": n_params,
           "grad_bytes": sum(p.grad.untyped_storage().nbytes() for p in module.parameters() if p.grad is not None),
           "runs": runs, "per_sample": per, "per_sample_2_4": per_2_4, "torch_threads": torch.get_num_threads()}
    del module, teacher
    gc.collect()
    return out


def markdown(res: dict) -> str:
    def m(x: float) -> str:
        return f"{x / MIB:,.0f}"

    meta = res["meta"]
    lines = [
        "# Activation memory per sample: ViT-L/14 + BERT-base + two 6-layer cross encoders, bf16",
        "",
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores, {meta.get('memory_gib', '')} GiB; python "
        f"{meta['python']}, torch {meta['torch']}, timm {meta.get('timm', '')}, transformers "
        f"{meta.get('transformers', '')}. **Measured on CPU in bf16** (bf16 student weights under CPU bf16 autocast, "
        f"fp32 EMA teacher), one process, {res['threads']} thread(s). Model: `vit_large_patch14_224` + BERT-base + "
        f"2 x 6 cross-encoder layers, {res['psi'] / 1e6:.1f}M parameters (student); 224 px images (257 tokens), "
        "64 text tokens, every loss on (GCPR, TgD, FGR, FgD, MLM), dropout 0.1 in BERT and the cross encoders. "
        "Command: `python benchmarks/bench_activations.py`.",
        "",
        "MiB. saved = distinct storages autograd keeps for the backward at the end of the forward "
        "(saved_tensors_hooks), weights excluded (they are resident before the forward and saved at any B); "
        "peak = peak RSS over forward + backward above the RSS before it (parameter gradients already resident); "
        "transient = peak - saved. Per sample = B 2 - B 1 (the figure); B 4 - B 2 halved beside it as a check.",
        "",
        "| activation checkpointing | saved B=1 / 2 / 4 | **saved / sample** | (2->4) | peak B=1 / 2 / 4 | "
        "**peak / sample** | (2->4) | forward peak / sample | transient B=2 | attention-score-shaped saved / "
        "sample | s (B=4) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        one, two, four = r["runs"]
        p, q = r["per_sample"], r["per_sample_2_4"]
        lines.append(f"| {r['activation_checkpointing']} | {m(one['saved'])} / {m(two['saved'])} / "
                     f"{m(four['saved'])} | **{m(p['saved'])}** | {m(q['saved'])} | {m(one['peak'])} / "
                     f"{m(two['peak'])} / {m(four['peak'])} | **{m(p['peak'])}** | {m(q['peak'])} | "
                     f"{m(p['fwd_peak'])} | {m(two['transient'])} | {m(p['score_shaped'])} | {four['seconds']} |")
    lines += ["", "Largest saved tensors at B = 4 (shape, dtype: MiB summed over the storages of that shape):", ""]
    for r in res["results"]:
        lines.append(f"- {r['activation_checkpointing']}: " + "; ".join(
            f"{k}: {m(v)}" for k, v in r["runs"][2]["largest_saved"]))
    lines += ["", "Reading it. The CPU's scaled_dot_product_attention runs a fused (flash-style) kernel where it "
              "can, so the ViT's 257 x 257 attention probabilities are not saved here either; what is saved "
              "score-shaped (the attention-score-shaped column: any saved [.., 257] or [.., 64, 64] tensor, an upper "
              "bound) is the text towers' 64 x 64 attention under dropout, which the CPU runs unfused "
              "(probabilities and dropout mask); GPU flash attention with dropout keeps neither, so a GPU saves "
              "at most this much (GPU kernels save less). The teacher's forward runs without gradient: it saves "
              "nothing and shows in the transient only. With checkpointing, the backward's peak is mostly "
              "batch-independent (the recompute of one block, ~200 MiB at B = 1) and grows 18 MiB per sample, "
              "while the forward's grows by its own per-sample column: at the batch sizes that matter the "
              "forward's slope is the working set per sample; the saved figure is what stays per sample."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpointing", nargs="+", default=["none", "all"], choices=["none", "towers", "cross", "all"])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="activations_mission_bf16")
    args = p.parse_args(argv)
    import torch

    import r2d2ds  # noqa: F401

    results = []
    for ck in args.checkpointing:
        results.append(measure(ck))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "runs"}), flush=True)
    res = {"meta": host("torch", "timm", "transformers"), "model": MISSION, "psi": results[0]["psi"],
           "threads": torch.get_num_threads(), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
