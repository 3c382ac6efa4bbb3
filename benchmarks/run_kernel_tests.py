"""GPU-check phase: the kernel tests against the installed wheel, their counts written as they run.

Runs pytest on tests/kernels with `--import-mode=importlib` (pytest then puts no test folder on sys.path, so the
source `r2d2ds/` cannot shadow the wheel; start Python with -P so the working directory is not there either).
After every test, OUT/kernel_tests.json holds the counts so far (passed / failed / skipped / errors), so a phase
killed by its time budget still reports what ran; `finished` says whether the session ended by itself. Before
any test it checks that r2d2ds.kernels comes from --site, and fails the phase when it does not.

    R2D2DS_AUTOTUNE=0 python -P benchmarks/run_kernel_tests.py --site SITE --out OUT [--max-tests N] [-- ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


class Counter:
    """pytest plugin: counts outcomes and rewrites the JSON after each test."""

    def __init__(self, path: Path, max_tests: int | None):
        self.path, self.max_tests = path, max_tests
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0}
        self.failures: list[str] = []
        self.meta = {"collected": None, "deselected": 0, "finished": False, "exit_status": None,
                     "autotune": os.environ.get("R2D2DS_AUTOTUNE", "1"),
                     "interpreter": os.environ.get("TRITON_INTERPRET", "") == "1"}
        self.t0 = time.perf_counter()
        self.write()

    def write(self) -> None:
        data = {**self.counts, **self.meta, "wall_s": round(time.perf_counter() - self.t0, 1),
                "failures": self.failures[:50]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path)  # a reader (or a kill) never sees half a file

    def pytest_collection_modifyitems(self, config, items):
        if self.max_tests is not None and len(items) > self.max_tests:
            # Spread the picks over the whole list so every test file is represented at a tiny size.
            step = len(items) / self.max_tests
            keep = {int(i * step) for i in range(self.max_tests)}
            dropped = [it for i, it in enumerate(items) if i not in keep]
            items[:] = [it for i, it in enumerate(items) if i in keep]
            config.hook.pytest_deselected(items=dropped)
            self.meta["deselected"] = len(dropped)
        self.meta["collected"] = len(items)
        self.write()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if hasattr(report, "wasxfail"):
                key = "xfailed" if report.skipped else "xpassed"
            elif report.when != "call" and report.failed:
                key = "errors"
            else:
                key = report.outcome  # passed / failed / skipped
            self.counts[key] += 1
            if report.failed:
                self.failures.append(report.nodeid)
            self.write()

    def pytest_collectreport(self, report):
        if report.failed:
            self.counts["errors"] += 1
            self.failures.append(f"collection: {report.nodeid}")
            self.write()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", required=True, help="folder the wheels were installed into (pip --target)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tests", default="tests/kernels")
    ap.add_argument("--max-tests", type=int, default=None, help="run N tests spread over the collected list")
    ap.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = ap.parse_args()
    # What tests/conftest.py and tests/kernels/conftest.py would set, needed here already: the kernels are
    # imported (and their autotune lists built) before pytest reads any conftest.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("R2D2DS_AUTOTUNE", "0")
    import r2d2ds.kernels

    where = Path(r2d2ds.kernels.__file__).resolve()
    if not where.is_relative_to(Path(args.site).resolve()):
        print(f"error: r2d2ds.kernels imported from {where}, not from the wheel under {args.site}", file=sys.stderr)
        return 3
    import pytest

    os.makedirs(args.out, exist_ok=True)
    counter = Counter(Path(args.out) / "kernel_tests.json", args.max_tests)
    status = pytest.main(["-q", "-p", "no:cacheprovider", "--import-mode=importlib", "-rfE", args.tests,
                          *args.pytest_args], plugins=[counter])
    counter.meta.update(finished=True, exit_status=int(status))
    counter.write()
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
