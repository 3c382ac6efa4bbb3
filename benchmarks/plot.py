"""PNG plots from the committed benchmark JSON (the README's performance section shows them).

  python benchmarks/plot.py                       # reads benchmarks/results, writes benchmarks/results/plots
  python benchmarks/plot.py --results DIR --out DIR

- contrastive_memory.png: extra peak memory of the contrastive loss (forward + backward) vs global batch, per
  implementation, from results/cpu/contrastive_memory*.json (bench_contrastive_memory.py).
- step_throughput.png: global samples/s vs batch per rank, open_clip's own loop vs r2d2ds (and the full R2D2
  step when measured), medians with the min-max range of the interleaved repeats, from
  results/cpu/vs_openclip.json (bench_vs_openclip.py).
- bench_step.png: samples/s and MFU of the full R2D2 step per case, from any results/*/bench_step.json
  (bench_step.py); only written when such a file exists.
Only what was measured is plotted; a missing input file skips its plot with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read benchmark JSON '{path}': {err}") from err


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # figures are kept alive by pyplot until closed
    return path


def plot_memory(files: list[Path], out: Path) -> Path | None:
    rows = [r for f in files for r in _load(f).get("rows", []) if "extra_peak_mib" in r and "B" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_impl: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_impl[r["impl"]][int(r["B"])].append(float(r["extra_peak_mib"]))
    for impl, pts in sorted(by_impl.items()):
        bs = sorted(pts)
        ax.plot(bs, [statistics.median(pts[b]) for b in bs], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch B")
    ax.set_ylabel("extra peak memory of loss fwd+bwd (MiB)")
    dims = sorted({int(r["D"]) for r in rows if "D" in r})
    ax.set_title(f"Contrastive loss memory vs batch (D = {', '.join(map(str, dims))}, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(plt, fig, out / "contrastive_memory.png")


SIDE_LABELS = {"open_clip": "open_clip 3.3 own loop (DDP)", "r2d2ds": "r2d2ds (contrastive step)",
               "r2d2ds_full": "r2d2ds full R2D2 step"}


def plot_throughput(path_json: Path, out: Path) -> Path | None:
    if not path_json.is_file():
        return None
    data = _load(path_json)
    rows = data.get("rows", [])
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_side: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_side[r["side"]][int(r["bs"])].append(float(r["samples_per_s"]))
    for side in [s for s in SIDE_LABELS if s in by_side]:
        pts = by_side[side]
        bs = sorted(pts)
        med = [statistics.median(pts[b]) for b in bs]
        lo = [m - min(pts[b]) for m, b in zip(med, bs)]
        hi = [max(pts[b]) - m for m, b in zip(med, bs)]
        ax.errorbar(bs, med, yerr=[lo, hi], marker="o", capsize=4, label=SIDE_LABELS[side])
    ax.set_xlabel("batch per rank (2 ranks)")
    ax.set_ylabel("global samples/s (steps 4-20)")
    meta = data.get("meta", {})
    load = meta.get("load_avg_before")
    ax.set_title("Step throughput, CPU fp32" + (f" (load avg {load[0]:.1f} at start)" if load else ""))
    ax.set_xticks(sorted({int(r["bs"]) for r in rows}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(plt, fig, out / "step_throughput.png")


def plot_bench_step(files: list[Path], out: Path) -> Path | None:
    rows = []
    for f in files:
        hw = _load(f).get("meta", {}).get("gpu") or f.parent.name
        rows += [dict(r, hw=hw) for r in _load(f).get("rows", []) if "samples_per_s" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [f"{r['case']}\nB={r['micro_batch']}\n{r['hw']}" for r in rows]
    a1.bar(labels, [r["samples_per_s"] for r in rows])
    a1.set_ylabel("samples/s per device")
    a2.bar(labels, [100 * r["mfu"] for r in rows])
    a2.set_ylabel("MFU (%) vs measured matmul rate")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Full R2D2 training step (bench_step.py)")
    return _save(plt, fig, out / "bench_step.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--out", default=None, help="default: RESULTS/plots")
    args = p.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made = {
        "contrastive_memory": plot_memory(sorted((results / "cpu").glob("contrastive_memory*.json")), out),
        "step_throughput": plot_throughput(results / "cpu" / "vs_openclip.json", out),
        "bench_step": plot_bench_step(sorted(results.glob("*/bench_step.json")), out),
    }
    for name, path in made.items():
        print(f"{name}: {path if path else 'no measured input, skipped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
