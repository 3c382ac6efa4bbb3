"""First phase of the GPU check: the machine and library versions, and where r2d2ds imports from.

The check runs from the repository root, whose source folder `r2d2ds/` has no `kernels/` inside: if it came
first on sys.path it would shadow the installed wheel and every kernel import would fail. This phase proves it
does not: r2d2ds and r2d2ds.kernels must both come from the install folder given as --site (run it with
`python -P`, which keeps the working directory off sys.path). Exit status 1 when they do not.

    python -P benchmarks/gpu_env.py --site SITE --out OUT   # -> OUT/env.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path


def version(name: str) -> str:
    """The installed distribution's version (its metadata: importing transformers alone takes seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", required=True, help="folder the wheels were installed into (pip --target)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    site = Path(args.site).resolve()
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU rehearsal)",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": version("triton"), "transformers": version("transformers"), "timm": version("timm"),
        "numpy": version("numpy"), "pytest": version("pytest"), "scipy": version("scipy"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "site": str(site), "cwd": os.getcwd(), "cwd_on_sys_path": any(p in ("", ".", os.getcwd()) for p in sys.path),
    }
    problems = []
    for mod in ("r2d2ds", "r2d2ds.kernels"):
        try:
            where = Path(importlib.import_module(mod).__file__).resolve()
        except Exception as e:  # noqa: BLE001
            where = None
            problems.append(f"{mod} does not import: {type(e).__name__}: {e}")
        env[f"{mod}_from"] = str(where)
        if where is not None and not where.is_relative_to(site):
            problems.append(f"{mod} imported from {where}, not from the installed wheel under {site}")
    env["r2d2ds_version"] = version("r2d2ds")
    # The step phases need deepspeed, which the GPU image lacks: from the wheels there (with its dependencies,
    # benchmarks/prepare_gpu_check.sh), from the environment in the CPU rehearsal. Recorded, not required here:
    # without it only the step phases fail, and their logs say why.
    env["deepspeed"] = version("deepspeed")
    try:
        env["deepspeed_from"] = str(Path(importlib.import_module("deepspeed").__file__).resolve().parent)
    except Exception as e:  # noqa: BLE001
        env["deepspeed_from"] = f"does not import: {type(e).__name__}: {e}"
    env["import_isolation"] = "ok" if not problems else "; ".join(problems)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
