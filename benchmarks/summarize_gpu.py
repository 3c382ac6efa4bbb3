"""The GPU check's final table, as markdown: machine and versions, every phase (status, time, budget), the
kernel-test counts and every benchmark's rows.

gpu_check.sh records each phase in OUT/phases.tsv (name, exit status, seconds, budget); phase NAME writes
OUT/NAME.json as it goes. With --check, exit 1 unless every phase finished with status 0 and left its JSON, the
kernel tests ran with none failed, and every section below is present (the CPU rehearsal uses this).

    python benchmarks/summarize_gpu.py OUT [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VERSION_KEYS = ("gpu", "python", "torch", "cuda", "triton", "transformers", "timm", "numpy", "pytest", "scipy",
                "deepspeed", "r2d2ds_version", "r2d2ds_from", "r2d2ds.kernels_from", "deepspeed_from",
                "import_isolation", "date")
COUNT_KEYS = ("passed", "failed", "skipped", "errors", "xfailed", "xpassed", "deselected", "finished", "wall_s")


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    """Scalar columns only: nested values (per-part FLOPs, per-kernel times) stay in the JSON."""
    cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def read_phases(folder: Path) -> list[dict]:
    path = folder / "phases.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds, budget = line.split("\t")
        rows.append({"phase": name, "status": "ok" if status == "0" else
                     ("timed out" if status in ("124", "137") else f"failed ({status})"),
                     "seconds": int(seconds), "budget_s": int(budget)})
    return rows


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def render(folder: Path) -> tuple[str, list[str]]:
    """(markdown, problems): the table and what --check would fail on."""
    out, problems = [], []
    phases = read_phases(folder)
    env = load(folder / "env.json") or {}
    out.append(f"# GPU check: {env.get('gpu', '?')}\n")
    out.append("## versions\n")
    out += [f"- {k}: {env[k]}" for k in VERSION_KEYS if k in env]
    if not env:
        problems.append("env.json missing: versions and GPU name unknown")
    elif env.get("import_isolation") != "ok":
        problems.append(f"import isolation: {env.get('import_isolation')}")
    out.append("\n## phases\n")
    out.append(table(phases) if phases else "(no phases.tsv)")
    if not phases:
        problems.append("phases.tsv missing")
    for p in phases:
        if p["status"] != "ok":
            problems.append(f"phase {p['phase']}: {p['status']} after {p['seconds']} s (budget {p['budget_s']} s)")
        if not (folder / f"{p['phase']}.json").exists():
            problems.append(f"phase {p['phase']} left no {p['phase']}.json")
    tests = load(folder / "kernel_tests.json")
    out.append("\n## kernel tests\n")
    if tests is None:
        out.append("(no kernel_tests.json)")
        problems.append("kernel_tests.json missing")
    else:
        out.append(table([{k: tests.get(k) for k in COUNT_KEYS}]))
        if tests.get("failures"):
            out.append("\nfailed: " + ", ".join(tests["failures"]))
        if tests.get("failed") or tests.get("errors") or not tests.get("passed"):
            problems.append(f"kernel tests: {tests.get('passed')} passed, {tests.get('failed')} failed, "
                            f"{tests.get('errors')} errors")
    for name in [p["phase"] for p in phases if p["phase"] not in ("env", "kernel_tests")]:
        data = load(folder / f"{name}.json")
        if data is None:
            continue
        out.append(f"\n## {name}\n")
        facts = {**data.get("meta", {}), **{k: v for k, v in data.items() if not isinstance(v, (list, dict))}}
        out += [f"- {k}: {fmt(v)}" for k, v in facts.items() if k not in VERSION_KEYS or k == "gpu"]
        for key, value in data.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                out.append(f"\n{key}:\n\n{table(value)}")
        if not any(isinstance(v, list) and v for v in data.values()) and not facts:
            problems.append(f"{name}.json holds no results")
    return "\n".join(out) + "\n", problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--check", action="store_true", help="exit 1 when a phase or section is missing or failed")
    args = ap.parse_args()
    text, problems = render(Path(args.folder))
    print(text)
    if problems:
        print("## problems\n\n" + "\n".join(f"- {p}" for p in problems))
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
