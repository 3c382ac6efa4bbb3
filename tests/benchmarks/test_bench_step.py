"""benchmarks/bench_step.py in its CPU mode: the full R2D2 step runs through the trainer's own train_step and the
JSON it writes is self-consistent with the FLOP model (the GPU check runs the same script at real sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_step_tiny_cpu(tmp_path):
    """Seconds, not minutes: one rank never loads (so never JIT-builds) DeepSpeed's CPU shm all-reduce op, whose
    first build alone took minutes on a loaded machine; the empty extensions folder proves nothing was built."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               TORCH_EXTENSIONS_DIR=str(extensions))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--tiny", "--gradcache-chunk", "4",
           "--steps", "2", "--warmup", "1", "--matmul-n", "128", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not any(extensions.iterdir()), f"a JIT build ran: {list(extensions.iterdir())}"
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert data["finished"] and [r["gradcache_chunk"] for r in data["rows"]] == [0, 4]
    for row in data["rows"]:
        assert row["case"] == "tiny" and row["micro_batch"] == 8 and row["zero_stage"] == 2
        assert row["precision"] == "fp32" and row["steps"] == 2
        # every part of the R2D2 step is counted (all terms on in the preset)
        assert {"image_tower", "text_tower", "loss_gcpr", "loss_tgd", "teacher_towers", "masked_text_query",
                "mlm_head", "teacher_text_query", "itm_text_query", "itm_image_query"} <= set(row["flops_by_part"])
        assert sum(row["flops_by_part"].values()) == pytest.approx(row["model_tflop_per_step"] * 1e12)
        assert row["samples_per_s"] == pytest.approx(8 / row["step_s"])
        assert row["tflops"] == pytest.approx(row["model_tflop_per_step"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["tflops"] / row["matmul_tflops"])
        assert 0 < row["mfu"] < 1.5 and row["peak_mem_gib"] > 0
    # GradCache changes the schedule, not the work credited: the same model FLOPs per step
    plain, cached = data["rows"]
    assert cached["model_tflop_per_step"] == pytest.approx(plain["model_tflop_per_step"])
    assert cached["overrides"] == ["train.chunk_size=4"]
    assert data["meta"]["torch"] and "tiny" in proc.stdout
