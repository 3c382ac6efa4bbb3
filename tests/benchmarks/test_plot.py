"""benchmarks/plot.py draws the README's PNGs from benchmark JSON of the committed shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="plots need matplotlib (the test extra installs it)")


def _run(results: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)


def test_plots_from_results(tmp_path):
    cpu = tmp_path / "results" / "cpu"
    cpu.mkdir(parents=True)
    mem = [{"impl": impl, "B": b, "D": 256, "extra_peak_mib": (4 * b * b * 4 / 2**20 if impl == "naive" else b / 8)}
           for impl in ("naive", "torch") for b in (4096, 8192, 16384)]
    (cpu / "contrastive_memory.json").write_text(json.dumps({"meta": {}, "rows": mem}))
    runs = [{"side": side, "bs": bs, "samples_per_s": rate + rep} for rep in range(3) for bs in (32, 64)
            for side, rate in (("open_clip", 100 + bs), ("r2d2ds", 110 + bs), ("r2d2ds_full", 50 + bs))]
    (cpu / "vs_openclip.json").write_text(json.dumps({"meta": {"load_avg_before": [1.2, 1, 1]}, "rows": runs}))
    out = tmp_path / "plots"
    proc = _run(tmp_path / "results", out)
    assert proc.returncode == 0, proc.stderr
    for name in ("contrastive_memory.png", "step_throughput.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert not (out / "bench_step.png").exists() and "bench_step: no measured input" in proc.stdout

    gpu = tmp_path / "results" / "h100"
    gpu.mkdir()
    (gpu / "bench_step.json").write_text(json.dumps({"meta": {"gpu": "H100"}, "rows": [
        {"case": "vit-b16", "micro_batch": 128, "samples_per_s": 900.0, "mfu": 0.41}]}))
    assert _run(tmp_path / "results", out).returncode == 0
    assert (out / "bench_step.png").read_bytes().startswith(PNG)


def test_unreadable_json_is_named(tmp_path):
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "vs_openclip.json").write_text("{not json")
    proc = _run(tmp_path, tmp_path / "plots")
    assert proc.returncode != 0 and "vs_openclip.json" in proc.stderr
