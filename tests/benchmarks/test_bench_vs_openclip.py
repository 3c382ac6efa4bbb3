"""The arithmetic of benchmarks/bench_vs_openclip.py: timed window, per-pair ratios, the markdown table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_vs_openclip", ROOT / "benchmarks" / "bench_vs_openclip.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_timed_rate_skips_the_first_steps():
    steps = [9.0, 9.0, 9.0] + [0.5] * 17  # slow warm-up steps must not count
    assert bench.timed_rate(steps, global_batch=64, skip=3) == pytest.approx(17 * 64 / (17 * 0.5))


def test_summary_ratios_are_ours_over_open_clip():
    rows = []
    for rep, (oc, us) in enumerate([(100.0, 120.0), (90.0, 99.0), (110.0, 110.0)]):
        rows += [{"side": "open_clip", "bs": 32, "samples_per_s": oc, "peak_rss_mb_rank0": 780.0, "repeat": rep},
                 {"side": "r2d2ds", "bs": 32, "samples_per_s": us, "peak_rss_mb_rank0": 700.0, "repeat": rep}]
    rows.append({"side": "r2d2ds_full", "bs": 32, "samples_per_s": 50.0, "peak_rss_mb_rank0": 900.0, "repeat": 1})
    table = bench.summarize(rows, [32])
    line = next(ln for ln in table.splitlines() if ln.startswith("| 32 (64)"))
    assert "1.20, 1.10, 1.00" in line  # per interleaved pair
    assert "**1.10**" in line  # median of the pair ratios (not of unpaired runs)
    assert "780 / 700" in line
    assert "| 32 (64) | 50.0 | 0.56 |" in table  # the full step against the open_clip run of its repeat (90)


def test_written_after_each_run(tmp_path):
    import argparse
    import json

    args = argparse.Namespace(workers=1, steps=20, skip=3, repeats=3)
    meta = {"cpu": "cpu", "cores": 2, "versions": {"torch": "2.13.0"}, "load_avg_before": [3.0, 2.0, 1.0]}
    rows = [{"side": "open_clip", "bs": 32, "samples_per_s": 100.0, "peak_rss_mb_rank0": 780.0, "repeat": 0,
             "command": "bash run_openclip.sh --bs 32", "exact_command": "torchrun ... --batch-size 32"}]
    bench.write_results(tmp_path, meta, rows, [32, 64], args)  # one side of one pair done: still a valid file
    rows.append({"side": "r2d2ds", "bs": 32, "samples_per_s": 105.0, "peak_rss_mb_rank0": 760.0, "repeat": 0,
                 "command": "deepspeed ... train.py --data.micro_batch=32"})
    bench.write_results(tmp_path, meta, rows, [32, 64], args)
    data = json.loads((tmp_path / "vs_openclip.json").read_text())
    assert data["meta"]["runs_done"] == 2 and len(data["meta"]["load_avg_after"]) == 3
    md = (tmp_path / "vs_openclip.md").read_text()
    assert "**1.05**" in md and "1 of 3 repeats done" in md and "3.0, 2.0, 1.0" in md
    assert "deepspeed ... train.py --data.micro_batch=32" in md and "torchrun ... --batch-size 32" in md


def test_int_id_shards_map_string_ids_and_keep_every_other_byte(tmp_path):
    import io
    import json
    import tarfile

    from r2d2ds.data import key_to_image_id

    src, members = tmp_path / "src", {"000.jpg": b"\xff\xd8jpeg", "000.txt": "狗".encode(),
                                     "000.json": json.dumps({"key": "000", "image_id": "2513260012_03d33305cf",
                                                             "caption": "狗"}).encode(),
                                     "001.json": json.dumps({"key": "001", "image_id": 7}).encode()}
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = bench.int_id_shards(src, ["00000.tar"], tmp_path / "dst")
    with tarfile.open(out / "00000.tar") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert list(got) == list(members)  # same members, same order
    assert got["000.jpg"] == members["000.jpg"] and got["000.txt"] == members["000.txt"]
    assert json.loads(got["000.json"]) == {"key": "000", "image_id": key_to_image_id("2513260012_03d33305cf"),
                                           "caption": "狗"}
    assert got["001.json"] == members["001.json"]  # an int id is left as it is


def test_same_base_env_installs_runtime_requirements_only():
    reqs = bench.runtime_requirements(ROOT / "pyproject.toml")
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}
    assert {"torch", "deepspeed", "timm", "transformers"} <= names
    # the dev venv's extras are what the same-base comparison leaves out (triton, scipy: ~100 MB of imports)
    assert not names & {"triton", "scipy", "open-clip-torch", "pytest"}


def test_this_env_rows_get_their_own_table_and_the_environment_is_stated(tmp_path):
    import argparse

    rows = [{"side": "open_clip", "bs": 32, "samples_per_s": 100.0, "peak_rss_mb_rank0": 780.0, "repeat": 0,
             "command": "bash run_openclip.sh --bs 32"},
            {"side": "r2d2ds", "bs": 32, "samples_per_s": 110.0, "peak_rss_mb_rank0": 700.0, "repeat": 0,
             "command": "$OCBASE/r2d2ds-venv/bin/deepspeed ... train.py"},
            {"side": "r2d2ds_this_env", "bs": 32, "samples_per_s": 105.0, "peak_rss_mb_rank0": 805.0, "repeat": 0,
             "command": "deepspeed ... train.py"}]
    table = bench.summarize(rows, [32])
    main_line = next(ln for ln in table.splitlines() if ln.startswith("| 32 (64)"))
    assert "**1.10**" in main_line and "780 / 700" in main_line  # the same-base run, not the dev-venv one
    assert "| 32 (64) | 105.0 | 1.05 | 805 |" in table
    meta = {"cpu": "cpu", "cores": 2, "versions": {"torch": "2.13.0", "deepspeed": "0.19.8"},
            "open_clip_side_versions": {"torch": "2.13.0", "open_clip_torch": "3.3.0"},
            "load_avg_before": [1.0, 1.0, 1.0],
            "env": "same-base", "importable": {"open_clip": {"triton": False}, "r2d2ds": {"triton": False}}}
    bench.write_results(tmp_path, meta, rows, [32], argparse.Namespace(workers=1, steps=20, skip=3, repeats=1))
    md = (tmp_path / "vs_openclip.md").read_text()
    assert "same installed packages" in md and "importable: open_clip triton no; r2d2ds triton no" in md
    # Both sides' versions come from env_versions and read alike.
    assert "r2d2ds side: torch 2.13.0, deepspeed 0.19.8; open_clip side: torch 2.13.0, open_clip_torch 3.3.0." in md
