"""benchmarks/bench_gradcache_gpu.py in its CPU rehearsal (--tiny): the doubling/bisection search, recovery from an
out-of-memory error raised in the middle of a step (a fresh trainer fits afterwards), GradCache's micro-step count
and the JSON the GPU check reads. The GPU check runs the same script on ViT-B/16 + BERT-base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_gradcache_gpu_tiny_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gradcache_gpu.py"), "--tiny", "--tiny-cap-rows", "24",
           "--chunk", "8", "--max-batch", "64", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gradcache_gpu.json").read_text())
    assert data["meta"]["preset"] == "tiny" and data["meta"]["negatives"] == "cached"
    plain, gc = data["modes"]["plain"], data["modes"]["gradcache"]
    # plain: 16 fits, 32 runs out (the image tower sees the whole batch), bisection: 24 fits, closed at 8 apart
    assert [(t["batch"], t["fits"]) for t in plain["trials"]] == [(16, True), (32, False), (24, True)]
    assert (plain["largest_fit"], plain["smallest_oom"], plain["limited_by"]) == (24, 32, "oom")
    assert "simulated" in plain["trials"][1]["oom"]
    assert plain["trials"][2]["step_s"] > 0  # a fresh trainer after the mid-step OOM trains again
    # GradCache: the towers see one chunk of 8, whatever the batch: it doubles up to --max-batch
    assert [t["batch"] for t in gc["trials"]] == [8, 16, 32, 64] and all(t["fits"] for t in gc["trials"])
    assert (gc["largest_fit"], gc["smallest_oom"], gc["limited_by"]) == (64, None, "max_batch")
    # "cached" negatives: a ranking and a tower micro step per chunk
    assert [t["engine_micro_steps"] for t in gc["trials"]] == [2, 4, 8, 16]
    assert gc["peak_gib_at_largest"] > 0 and gc["step_s_at_largest"] > 0
    assert "gradcache" in proc.stdout and "max_batch" in proc.stdout
