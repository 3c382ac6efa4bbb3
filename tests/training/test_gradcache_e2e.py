"""`deepspeed --num_gpus 2 train.py` with GradCache on 2 CPU ranks: the tiny run (global batch 16 in chunks of
3, 3 and 2 rows per rank, every block activation-checkpointed) reproduces the losses of the non-cached run of the
same config without checkpointing, step by step (so the optimizer saw the same gradients), and a resume from the
step-3 checkpoint continues exactly. Slow (real launches); CI runs it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.training.test_deepspeed_e2e import LOSS_KEYS, ROOT, dataset, launch, losses  # noqa: F401

pytestmark = pytest.mark.slow

GRADCACHE = ("--train.global_batch=16", "--train.chunk_size=3", f"--train.ds_config={ROOT}/ds_configs/zero2.json",
             "--model.activation_checkpointing=all")


@pytest.fixture(scope="module")
def gradcache_run(tmp_path_factory, dataset):  # noqa: F811
    run = tmp_path_factory.mktemp("gradcache") / "run"
    launch(run, f"--data.train={dataset}", *GRADCACHE)
    return run


def test_gradcache_run_reproduces_the_non_cached_run(gradcache_run, dataset, tmp_path):  # noqa: F811
    plain = tmp_path / "plain"  # data.micro_batch 8 x 2 ranks: the same global batch of 16, one micro step
    launch(plain, f"--data.train={dataset}", f"--train.ds_config={ROOT}/ds_configs/zero2.json", "--train.steps=3",
           "--train.ckpt_every=0")
    got, want = losses(gradcache_run), losses(plain)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and sorted(want) == [1, 2, 3]
    for step in want:  # steps 2 and 3 follow optimizer steps taken with GradCache's gradients
        for k in LOSS_KEYS:
            # fp32; GradCache changes only the summation order (per-chunk sums with batch denominators)
            assert got[step][k] == pytest.approx(want[step][k], rel=2e-4, abs=1e-5), (step, k)
    ds = json.loads((gradcache_run / "ds_config.json").read_text())
    # "cached" negatives (the default): a ranking and a tower micro step per chunk, 3 chunks
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 6)
    records = [json.loads(x) for x in (gradcache_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss/gcpr" in r]
    assert all(r["memory/peak_gib"] > 0 and r["perf/samples_per_s"] > 0 for r in train)
    assert train[-1]["train/samples_seen"] == 6 * 16


def test_gradcache_resume_continues_exactly(gradcache_run, dataset, tmp_path):  # noqa: F811
    resumed = tmp_path / "resumed"
    shutil.copytree(gradcache_run / "checkpoints", resumed / "checkpoints")
    (resumed / "checkpoints" / "latest").write_text("step00000003\n")
    launch(resumed, f"--data.train={dataset}", *GRADCACHE, "--resume")
    after, want = losses(resumed), losses(gradcache_run)
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        for k in LOSS_KEYS:
            assert after[step][k] == pytest.approx(want[step][k], rel=1e-5, abs=1e-6), (step, k)
