"""Side by side on the CPU: open_clip's own training loop vs r2d2ds on the same contrastive step, interleaved.

Both sides train the same towers (timm vit_tiny_patch16_224 at 64 px, a 2-layer 128-wide BERT on the
bert-base-chinese vocabulary, embedding 128) on the same Flickr8k-CN webdataset shards, fp32, 2 ranks over gloo,
contrastive loss only, 20 steps; steps 4..20 are timed (each side's own per-step log: open_clip's `Batch (t)`,
our `perf/samples_per_s` with train.log_every 1, both including the data wait). Our side reads the baseline's
shards through `int_id_shards` (its string image ids as int64, everything else byte for byte). The open_clip side is
../shared/tools/openclip_baseline/run_openclip.sh (its README; nothing of it is copied here), the r2d2ds side is
`deepspeed --num_gpus 2 train.py --config benchmarks/configs/openclip_match.yaml`. Runs alternate (open_clip
and ours back to back, which goes first alternating by repeat, then ours full R2D2 if asked) per batch size per
repeat, so machine-load drift hits both sides alike; the ratio of each interleaved pair is the figure to read.
`uptime`'s load average is recorded before and after every run.

Both sides run on the same installed packages (`--env same-base`, the default): open_clip's side in the baseline's
venv, ours in `$OCBASE/r2d2ds-venv`, a venv layered on the same read-only base venv (one torch, timm, transformers,
webdataset, numpy install for both) plus only r2d2ds's runtime requirements, pinned to this interpreter's versions,
and r2d2ds itself (editable, no dependencies). Peak RSS counts every imported module: the repository's dev venv
also holds triton (an optional extra; torch._dynamo imports it whenever it is installed) and scipy (a test extra;
transformers imports scipy.optimize whenever it is installed), about 100 MB per process that the baseline's venv
lacks, so a comparison in the dev venv (`--env this`) measures the environments as much as the trainers.
`--with-this-env` also runs ours in this interpreter once per batch size, to show that difference side by side.

  python benchmarks/bench_vs_openclip.py --out benchmarks/results/cpu               # 3 repeats x 32, 64 per rank
  python benchmarks/bench_vs_openclip.py --bs 32 --repeats 1 --full-r2d2 --out DIR  # + the full R2D2 step
  python benchmarks/bench_vs_openclip.py --env this --out DIR                        # ours in this interpreter
Writes DIR/vs_openclip.json (every run, its exact command, per-step times) and DIR/vs_openclip.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hostinfo: see its docstring
from hostinfo import cpu_name  # noqa: E402

STACK = ("torch", "deepspeed", "timm", "transformers", "webdataset", "open_clip_torch")  # this side's stack

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "benchmarks/configs/openclip_match.yaml"
# The full R2D2 step on the same towers: every term back on (TgD, FGR, FgD, MLM) and 2 cross layers.
FULL_R2D2 = ["--loss.tgd_alpha=0.4", "--loss.fgr_weight=1.0", "--loss.fgd_weight=1.0", "--loss.mlm_weight=1.0",
             "--model.cross_layers=2"]


def load_average() -> list[float]:
    return [float(x) for x in os.getloadavg()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_rate(step_seconds: list[float], global_batch: int, skip: int) -> float:
    """Global samples/s over the steps after the first `skip`: (n - skip) x global batch / their summed time."""
    timed = step_seconds[skip:]
    return len(timed) * global_batch / sum(timed)


def run_openclip(oc_dir: Path, bs: int, steps: int, skip: int, workers: int) -> dict:
    cmd = ["bash", str(oc_dir / "run_openclip.sh"), "--data", "wds", "--bs", str(bs), "--precision", "fp32",
           "--steps", str(steps), "--skip", str(skip), "--workers", str(workers), "--tag", f"vs-r2d2ds-b{bs}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines or "status=OK" not in lines[-1]:
        raise RuntimeError(f"open_clip run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    result = lines[-1]
    rate = float(re.search(r"samples/s=([0-9.]+)", result).group(1))
    rss = [float(x) for x in re.findall(r"rank\d=([0-9.]+)MB", result)]
    log_dir = re.search(r"logs in (\S+)", proc.stdout)
    times = re.search(r"step times \(s\): ([0-9. ]+)", proc.stdout)
    row = {"side": "open_clip", "bs": bs, "samples_per_s": rate, "peak_rss_mb_rank0": rss[0] if rss else None,
           "peak_rss_mb": rss, "result_line": result, "command": shlex.join(cmd),
           "step_s": [float(t) for t in times.group(1).split()] if times else None}
    if log_dir:
        cmd_txt = Path(log_dir.group(1)) / "cmd.txt"
        if cmd_txt.is_file():
            row["exact_command"] = cmd_txt.read_text().strip()
    return row


def runtime_requirements(pyproject: Path) -> list[str]:
    """r2d2ds's [project] dependencies: what a user's install brings, no optional or test extras."""
    import tomllib

    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def same_base_env(ocbase: Path, python: str = sys.executable) -> Path:
    """The interpreter of `ocbase/r2d2ds-venv`: built once (rebuilt when the pins or the checkout change) on the
    baseline's base venv through the same `site.addsitedir` .pth as the baseline's own venv, so torch, timm,
    transformers and webdataset are the very files open_clip's side imports. Into it: r2d2ds's runtime
    requirements pinned to `python`'s installed versions (`pip freeze`), then r2d2ds from ROOT without deps."""
    import hashlib

    base = ocbase / "base-venv"
    venv = ocbase / "r2d2ds-venv"
    py = venv / "bin" / "python"
    if not (base / "bin" / "python").is_file():
        raise RuntimeError(f"no baseline base venv at {base}: run the baseline's setup.sh first")
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout
    pins = "\n".join(ln for ln in freeze.splitlines() if "==" in ln and not ln.startswith("r2d2ds=="))
    reqs = runtime_requirements(ROOT / "pyproject.toml")
    stamp = hashlib.sha256("\n".join([pins, *reqs, str(ROOT)]).encode()).hexdigest()
    marker = venv / ".r2d2ds_env"
    if py.is_file() and marker.is_file() and marker.read_text() == stamp:
        return py
    shutil.rmtree(venv, ignore_errors=True)
    interp = os.path.realpath(base / "bin" / "python")
    subprocess.run([interp, "-m", "venv", str(venv)], check=True)
    site = lambda p: subprocess.run([str(p), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    Path(site(py), "zz_base_venv.pth").write_text(f"import site; site.addsitedir({site(base / 'bin' / 'python')!r})\n")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pinfile:
        pinfile.write(pins + "\n")
        pinfile.flush()
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", pinfile.name, *reqs], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    marker.write_text(stamp)
    return py


def importable(python: str, modules: list[str]) -> dict[str, bool]:
    """Whether each module can be imported by `python` (found on its path, not imported)."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    return json.loads(subprocess.run([python, "-c", code, *modules], capture_output=True, text=True,
                                     check=True).stdout)


def env_versions(python: str) -> dict[str, str]:
    """STACK's versions as installed for `python` (hostinfo.versions run by that interpreter)."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from hostinfo import versions; "
            f"print(json.dumps(versions(*{STACK!r})))")
    out = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    return {k: v for k, v in out.items() if v}


def _versions_text(versions: dict[str, str] | str | None) -> str:
    """'torch 2.x, timm 1.x, ...' from env_versions' dict (a string: a record written before both sides used
    env_versions, kept as written)."""
    if isinstance(versions, str) or not versions:
        return versions or ""
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def run_ours(shards: str, bs: int, steps: int, skip: int, workers: int, ds_config: str, extra: list[str],
             side: str, python: str = sys.executable) -> dict:
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(python)) or "deepspeed"
    with tempfile.TemporaryDirectory(prefix="r2d2ds-vs-oc-") as run_dir:
        cmd = [deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "train.py", "--config", CONFIG, f"--data.train={shards}", f"--data.micro_batch={bs}",
               f"--data.num_workers={workers}", f"--train.steps={steps}", f"--train.ds_config={ds_config}",
               f"--train.run_dir={run_dir}", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"r2d2ds run failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout[-3000:]}"
                               f"\n{proc.stderr[-3000:]}")
        recs = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "perf/samples_per_s" in r]
    gbs = 2 * bs
    step_s = [gbs / r["perf/samples_per_s"] for r in sorted(recs, key=lambda r: r["step"])]
    if len(step_s) != steps:
        raise RuntimeError(f"expected {steps} per-step records (train.log_every 1), got {len(step_s)}")
    cmd[cmd.index(next(c for c in cmd if c.startswith("--train.run_dir=")))] = "--train.run_dir=RUN_DIR"
    cmd[0], cmd[6] = ("deepspeed" if python == sys.executable else deepspeed), "PORT"
    return {"side": side, "bs": bs, "samples_per_s": timed_rate(step_s, gbs, skip),
            "peak_rss_mb_rank0": recs[-1]["memory/peak_gib"] * 1024, "step_s": step_s,
            "tflops_per_rank": recs[-1].get("perf/tflops"), "mfu": recs[-1].get("perf/mfu"),
            "command": "OMP_NUM_THREADS=1 MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo " + shlex.join(cmd)}


def int_id_shards(src: Path, names: list[str], dst: Path) -> Path:
    """The baseline's shards for our side: every member byte for byte, except that a string `image_id` in a
    sample's .json (the baseline's make_shards writes Flickr8k-CN's file stem) becomes the int64 our data
    contract requires, `key_to_image_id` of that string (equal strings, equal ids: the same positives). Written
    once into `dst` (rebuilt when a source shard is newer); returns `dst`."""
    import io
    import tarfile

    from r2d2ds.data import key_to_image_id

    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        source, target = src / name, dst / name
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        partial = target.with_suffix(".partial")
        with tarfile.open(source) as tin, tarfile.open(partial, "w") as tout:
            for member in tin:
                data = tin.extractfile(member).read() if member.isfile() else None
                if data is not None and member.name.endswith(".json"):
                    meta = json.loads(data)
                    if isinstance(meta.get("image_id"), str):
                        meta["image_id"] = key_to_image_id(meta["image_id"])
                        data = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                        member.size = len(data)
                tout.addfile(member, io.BytesIO(data) if data is not None else None)
        partial.replace(target)
    return dst


def _rates(rows: list[dict]) -> str:
    return ", ".join(f"{r['samples_per_s']:.1f}" for r in rows)


def _median_rss(rows: list[dict]) -> float:
    vals = [r["peak_rss_mb_rank0"] for r in rows if r.get("peak_rss_mb_rank0")]
    return statistics.median(vals) if vals else float("nan")


def _same_repeat_ratios(runs: list[dict], oc: list[dict]) -> str:
    """Each run against the open_clip run of its own repeat (interleaved), not an unpaired median."""
    return ", ".join(f"{r['samples_per_s'] / o['samples_per_s']:.2f}" for r in runs for o in oc
                     if o["repeat"] == r["repeat"])


def summarize(rows: list[dict], batch_sizes: list[int]) -> str:
    out = ["| per rank (global) | open_clip samples/s | r2d2ds samples/s | ratio per interleaved pair | "
           "median pair ratio | peak RSS rank 0 MB (open_clip / r2d2ds) |", "|---|---|---|---|---|---|"]
    full_lines, this_lines = [], []
    for bs in batch_sizes:
        side = {name: [r for r in rows if r["bs"] == bs and r["side"] == name]
                for name in ("open_clip", "r2d2ds", "r2d2ds_full", "r2d2ds_this_env")}
        oc, us, full, this = side.values()
        pairs = [u["samples_per_s"] / o["samples_per_s"] for o, u in zip(oc, us)]
        rss_o, rss_u = _median_rss(oc), _median_rss(us)
        out.append(f"| {bs} ({2 * bs}) | {_rates(oc)} | {_rates(us)} | {', '.join(f'{p:.2f}' for p in pairs)} | "
                   f"**{statistics.median(pairs) if pairs else float('nan'):.2f}** | {rss_o:.0f} / {rss_u:.0f} |")
        if full:
            full_lines.append(f"| {bs} ({2 * bs}) | {_rates(full)} | {_same_repeat_ratios(full, oc)} |")
        if this:
            this_lines.append(f"| {bs} ({2 * bs}) | {_rates(this)} | {_same_repeat_ratios(this, oc)} | "
                              f"{_median_rss(this):.0f} |")
    if this_lines:
        out += ["", "The same r2d2ds step in the repository's dev venv (triton and scipy installed), same repeat:", "",
                "| per rank (global) | r2d2ds samples/s | ratio to open_clip's run in the same repeat | "
                "peak RSS rank 0 MB |", "|---|---|---|---|", *this_lines]
    if full_lines:
        out += ["", "Full R2D2 step (GCPR + TgD + FGR + FgD + MLM, 2 cross layers), same towers and data, as a ratio "
                "to open_clip's contrastive step:", "", "| per rank (global) | r2d2ds full samples/s | "
                "ratio to open_clip's run in the same repeat |", "|---|---|---|", *full_lines]
    return "\n".join(out)






# Committed results name no folder of the machine that measured them: (absolute prefix, portable name) pairs.
PORTABLE: list[tuple[str, str]] = []


def portable(text: str) -> str:
    for prefix, name in PORTABLE:
        text = text.replace(prefix, name)
    return text


ENV_LINES = {
    "same-base": "both sides on the same installed packages (r2d2ds in `$OCBASE/r2d2ds-venv`: the baseline's base "
                 "venv plus r2d2ds's runtime requirements, see the script's docstring); ",
    "this": "r2d2ds side in the repository's dev venv, open_clip's in the baseline's venv (different package sets: "
            "see the script's docstring); ",
}


def _importable_line(found: dict | None) -> str:
    if not found:
        return ""
    sides = [side + " " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in mods.items())
             for side, mods in found.items()]
    return "importable: " + "; ".join(sides) + "; "


def write_results(out: Path, base_meta: dict, rows: list[dict], batch_sizes: list[int], args) -> str:
    rows = json.loads(portable(json.dumps(rows)))
    # a re-render (--render) keeps the measured run's date and final load; a live run stamps them now
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg_after": load_average(), **base_meta, "runs_done": len(rows)}
    for r in rows:  # tables written before the port placeholder was fixed named the address PORT
        r["command"] = re.sub(r"--master_addr PORT --master_port \d+", "--master_addr 127.0.0.1 --master_port PORT",
                              r["command"])
    (out / "vs_openclip.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = summarize(rows, batch_sizes)
    cmds = sorted({r["command"] for r in rows})
    lb, la = meta["load_avg_before"], meta["load_avg_after"]
    md = [f"# open_clip's own loop vs r2d2ds, contrastive step, CPU ({meta['date']})", "",
          f"{meta['cpu']}, {meta['cores']} cores; {ENV_LINES.get(meta.get('env'), '')}"
          f"{_importable_line(meta.get('importable'))}r2d2ds side: "
          f"{_versions_text(meta['versions'])}; open_clip side: "
          f"{_versions_text(meta.get('open_clip_side_versions')) or 'see its README'}.",
          f"2 ranks (gloo), fp32, {args.workers} loader worker per rank, {args.steps} steps, steps "
          f"{args.skip + 1}-{args.steps} timed, runs interleaved, {len({r['repeat'] for r in rows})} of "
          f"{args.repeats} repeats done. Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in lb)}; "
          f"after: {', '.join(f'{x:.1f}' for x in la)} (a {meta['cores']}-core machine: above {meta['cores']} "
          "means other work shared it; each run's own load is in the JSON).",
          "", table, "", "Commands (r2d2ds from the repository root; RUN_DIR and PORT are per run):", "",
          *[f"    {c}" for c in cmds], ""]
    oc_exact = next((r["exact_command"] for r in rows if r.get("exact_command")), None)
    if oc_exact:
        md += ["open_clip's exact command (its cmd.txt):", "", f"    {oc_exact}", ""]
    (out / "vs_openclip.md").write_text(portable("\n".join(md)))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bs", type=int, action="append", help="per-rank batch (repeatable); default 32 and 64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="untimed first steps (3: steps 4..20 timed)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers per rank (both sides)")
    # ZeRO-0: open_clip's DDP is plain data parallel too; in fp32 our gradient average overlaps the backward as
    # DDP's does (r2d2ds/distributed/overlap.py). --ds-config ds_configs/zero1.json: the partitioned engine.
    p.add_argument("--ds-config", default="ds_configs/zero0.json")
    p.add_argument("--full-r2d2", action="store_true",
                   help="also time the full R2D2 step (every term on), once per batch size in the first repeat")
    p.add_argument("--openclip-dir", default=str(ROOT.parent / "shared" / "tools" / "openclip_baseline"))
    p.add_argument("--shards", default=None, help="brace pattern of the baseline's shards (default: its setup's)")
    p.add_argument("--env", choices=["same-base", "this"], default="same-base",
                   help="our side's interpreter: same-base (the baseline's base venv + r2d2ds's runtime requirements, "
                        "see the module docstring) or this one")
    p.add_argument("--with-this-env", action="store_true",
                   help="with --env same-base, also run ours in this interpreter once per batch size (first repeat)")
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--render", action="store_true", help="only re-write OUT's table from its vs_openclip.json")
    args = p.parse_args(argv)
    batch_sizes = args.bs or [32, 64]
    oc_dir = Path(args.openclip_dir)
    if not (oc_dir / "run_openclip.sh").is_file():
        print(f"error: no open_clip baseline harness in {oc_dir} (pass --openclip-dir)", file=sys.stderr)
        return 2
    subprocess.run(["bash", str(oc_dir / "setup.sh")], check=True, capture_output=True)  # idempotent
    ocbase = Path(os.environ.get("OCBASE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                 / "r2d2ds-openclip-baseline"))
    shards_dir = Path(os.environ.get("SHARDS_DIR", ocbase / "shards"))
    n = len(json.loads((shards_dir / "sizes.json").read_text()))
    ours_dir = int_id_shards(shards_dir, [f"{i:05d}.tar" for i in range(n)], ocbase / "shards-int-ids")
    shards = args.shards or f"{ours_dir}/{{00000..{n - 1:05d}}}.tar"
    PORTABLE.extend([(str(ours_dir.resolve()), "$OCBASE/shards-int-ids"), (str(ours_dir), "$OCBASE/shards-int-ids"),
                     (str(shards_dir.resolve()), "$OCBASE/shards"), (str(shards_dir), "$OCBASE/shards"),
                     (str(ocbase.resolve()), "$OCBASE"), (str(ocbase), "$OCBASE"),
                     (str(oc_dir.resolve()), "../shared/tools/openclip_baseline"),
                     (str(oc_dir), "../shared/tools/openclip_baseline"), (str(ROOT), "."),
                     (str(Path.home()), "~")])
    if args.render:  # re-write the table from an existing JSON (e.g. a run cut short), nothing measured
        data = json.loads((Path(args.out) / "vs_openclip.json").read_text())
        print(write_results(Path(args.out), data["meta"], data["rows"], batch_sizes, args))
        return 0

    oc_py = Path(os.environ.get("VENV", ocbase / ".venv")) / "bin" / "python"
    oc_versions = env_versions(str(oc_py))
    ours_py = str(same_base_env(ocbase)) if args.env == "same-base" else sys.executable
    PORTABLE.insert(0, (str(ocbase / "r2d2ds-venv"), "$OCBASE/r2d2ds-venv"))
    probe = ["triton", "scipy"]  # the ~100 MB of imports the dev venv adds (module docstring)
    envs = {"open_clip": importable(str(oc_py), probe), "r2d2ds": importable(ours_py, probe)}
    load_before = load_average()
    base_meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "versions": env_versions(ours_py),
                 "load_avg_before": load_before, "env": args.env, "importable": envs,
                 "open_clip_side_versions": oc_versions,
                 "steps": args.steps, "skip": args.skip, "workers": args.workers, "ds_config": args.ds_config,
                 "config": CONFIG, "repeats": args.repeats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for rep in range(args.repeats):
        for bs in batch_sizes:
            pair = [("open_clip", None), ("r2d2ds", [])]
            # alternate which side goes first, so a load trend within a pair does not favour one side
            full = [("r2d2ds_full", FULL_R2D2)] if args.full_r2d2 and rep == 0 else []  # once per batch size
            this = [("r2d2ds_this_env", [])] if args.with_this_env and args.env != "this" and rep == 0 else []
            sides = (pair if rep % 2 == 0 else pair[::-1]) + this + full
            for side, extra in sides:
                load = load_average()
                if side == "open_clip":
                    row = run_openclip(oc_dir, bs, args.steps, args.skip, args.workers)
                else:
                    py = sys.executable if side == "r2d2ds_this_env" else ours_py
                    row = run_ours(shards, bs, args.steps, args.skip, args.workers, args.ds_config, extra, side, py)
                row.update(repeat=rep, load_avg_before=load)
                rows.append(row)
                print(f"rep {rep} bs {bs:>3} {side:<12} {row['samples_per_s']:7.1f} samples/s  "
                      f"rss0 {row['peak_rss_mb_rank0'] or 0:.0f} MB  load {load[0]:.1f}", flush=True)
                # written after every run: a cut-short session still leaves the interleaved pairs done so far
                table = write_results(out, base_meta, rows, batch_sizes, args)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
