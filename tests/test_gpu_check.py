"""The GPU check rehearsed on the CPU (benchmarks/gpu_check.sh --rehearse), so a broken check fails CI instead of
wasting a rare GPU lease: fresh wheel install into a temporary folder, run from the repository root, kernel tests
in the interpreter, every benchmark at a tiny size, and a summary that must hold every section."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## versions", "## phases", "## kernel tests", "## ceilings", "## roofline", "## contrastive_gpu",
            "## cross_attention", "## step_b16", "## step_l14", "## gradcache_gpu")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_rehearsal_runs_every_phase_from_the_installed_wheel(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--rehearse", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"gpu_check.sh --rehearse failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    summary = (out / "summary.md").read_text()
    for section in SECTIONS:
        assert section in summary, f"summary lacks {section!r}:\n{summary}"
    env = json.loads((out / "env.json").read_text())
    for mod in ("r2d2ds", "r2d2ds.kernels"):  # the wheel, never the source tree in the working directory
        where = Path(env[f"{mod}_from"])
        assert not where.is_relative_to(ROOT) and where.is_relative_to(env["site"]), (mod, where)
    tests = json.loads((out / "kernel_tests.json").read_text())
    assert tests["finished"] and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0, tests
    rows = json.loads((out / "contrastive_gpu.json").read_text())["rows"]
    assert {r["method"] for r in rows if "ms" in r} >= {"ours", "naive", "ours-full"}, rows
    # the step phases: the full R2D2 step through a ZeRO-2 engine, GradCache off and on (tiny on the CPU)
    b16, l14 = (json.loads((out / f"{name}.json").read_text()) for name in ("step_b16", "step_l14"))
    assert b16["finished"] and [r["gradcache_chunk"] for r in b16["rows"]] == [0, 4], b16["rows"]
    assert l14["finished"] and len(l14["rows"]) == 1
    assert all(r["zero_stage"] == 2 and r["samples_per_s"] > 0 for r in b16["rows"] + l14["rows"])
    assert not b16["meta"]["triton_autotune"] and env["deepspeed_from"].startswith("/"), env["deepspeed_from"]
    # the largest-batch search, non-cached vs GradCache (tiny model, simulated memory limit on the CPU)
    gc = json.loads((out / "gradcache_gpu.json").read_text())["modes"]
    assert gc["plain"]["limited_by"] == "oom" and gc["gradcache"]["largest_fit"] > gc["plain"]["largest_fit"], gc


def _fake_site(folder: Path) -> Path:
    """An install folder holding a stand-in r2d2ds with kernels/ (what the wheel provides)."""
    (folder / "r2d2ds" / "kernels").mkdir(parents=True)
    (folder / "r2d2ds" / "__init__.py").write_text("")
    (folder / "r2d2ds" / "kernels" / "__init__.py").write_text("")
    return folder


@pytest.mark.parametrize("shadowed", [False, True])
def test_env_phase_fails_when_the_source_tree_shadows_the_wheel(tmp_path, shadowed):
    site = _fake_site(tmp_path / "site")
    path = f"{ROOT}{os.pathsep}{site}" if shadowed else str(site)  # the source tree first: it wins
    proc = subprocess.run([sys.executable, "-P", "benchmarks/gpu_env.py", "--site", str(site), "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=_env(PYTHONPATH=path), capture_output=True,
                          text=True, timeout=120)
    env = json.loads((tmp_path / "out" / "env.json").read_text())
    if shadowed:
        assert proc.returncode == 1 and "not from the installed wheel" in env["import_isolation"], proc.stderr
    else:
        assert proc.returncode == 0 and env["import_isolation"] == "ok", proc.stderr
        assert Path(env["r2d2ds.kernels_from"]).is_relative_to(site.resolve())


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize_gpu", ROOT / "benchmarks" / "summarize_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_keeps_the_other_phases_when_one_times_out(tmp_path):
    """A phase killed by its budget is reported as timed out (and fails --check); what it wrote before the kill and
    every other phase's results are still in the table."""
    (tmp_path / "phases.tsv").write_text("env\t0\t3\t30\nkernel_tests\t0\t90\t150\ncontrastive_gpu\t124\t150\t150\n"
                                         "cross_attention\t0\t20\t60\n")
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
                                                   "import_isolation": "ok"}))
    (tmp_path / "kernel_tests.json").write_text(json.dumps({"passed": 170, "failed": 0, "skipped": 7, "errors": 0,
                                                            "finished": True}))
    (tmp_path / "contrastive_gpu.json").write_text(json.dumps({"meta": {}, "finished": False, "rows": [
        {"method": "ours", "B": 16384, "D": 512, "ms": 3.2}]}))
    (tmp_path / "cross_attention.json").write_text(json.dumps({"finished": True, "rows": [
        {"case": "text_query", "impl": "triton", "fwd_ms": 0.5}]}))
    text, problems = _summarize().render(tmp_path)
    assert problems == ["phase contrastive_gpu: timed out after 150 s (budget 150 s)"], problems
    assert "NVIDIA H200" in text and "| 170 | 0 | 7 | 0 |" in text
    assert "| ours | 16384 | 512 | 3.2 |" in text and "| text_query | triton | 0.5 |" in text
