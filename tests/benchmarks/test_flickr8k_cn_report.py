"""benchmarks/flickr8k_cn.py report --update: each table block of the results file is replaced on its own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flickr8k_cn.py"


def _module():
    spec = importlib.util.spec_from_file_location("flickr8k_cn_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOC = """# results
<!-- table: python benchmarks/flickr8k_cn.py report --update F -->
old first
<!-- end table -->
between
<!-- table budget2: python benchmarks/flickr8k_cn.py report --update F --block budget2 -->
old second
<!-- end table budget2 -->
after
"""


def test_blocks_are_replaced_one_at_a_time(tmp_path):
    mod, f = _module(), tmp_path / "r.md"
    f.write_text(DOC)
    mod.update_markdown(f, "new second\nrow", "budget2")
    text = f.read_text()
    assert "old first" in text and "old second" not in text and "new second\nrow\n<!-- end table budget2 -->" in text
    mod.update_markdown(f, "new first")
    text = f.read_text()
    assert "old first" not in text and "new first\n<!-- end table -->\nbetween" in text and "new second" in text
    with pytest.raises(SystemExit, match="budget3"):
        mod.update_markdown(f, "x", "budget3")


def _fake_run(folder: Path, steps: int, mr: float) -> None:
    import json

    folder.mkdir(parents=True)
    stage = {"t2i_r1": 1.0, "t2i_r5": 2.0, "t2i_r10": 3.0, "i2t_r1": 4.0, "i2t_r5": 5.0, "i2t_r10": 6.0, "mr": mr}
    (folder / "eval.json").write_text(json.dumps({"two_tower": stage, "two_stage": stage, "rerank": {"weight": 1.0}}))
    (folder / "bench.json").write_text(json.dumps({
        "variant": "full", "seed": 0, "command": f"train --train.steps={steps}", "commit": "0" * 40, "dirty": False,
        "date": "d", "wall_s": 60.0, "loadavg_before": [0, 0, 0], "loadavg_after": [0, 0, 0]}))
    (folder / "config.yaml").write_text(f"train:\n  steps: {steps}\n")
    (folder / "metrics.jsonl").write_text('{"step": 20, "acc/itm": 0.5}\n')


def test_runs_of_different_budgets_are_labelled_with_their_steps(tmp_path):
    """Two folders in one report, the same run at two budgets: each row says its steps; one budget alone keeps
    the plain label."""
    mod = _module()
    _fake_run(tmp_path / "a" / "full-s0", 2000, 19.0)
    _fake_run(tmp_path / "b" / "full-s0", 1000, 20.0)
    rows = mod.collect(tmp_path / "a", tmp_path / "b")
    assert [r["steps"] for r in rows] == [1000, 2000]  # sorted by steps within variant and seed
    text = mod.table(rows) + mod.runs_table(rows)
    assert "| full s0, 1,000 steps | two-tower |" in text and "| full s0, 2,000 steps | two-stage |" in text
    assert "| full s0, 2,000 steps | `train --train.steps=2000`" in text
    alone = mod.table(mod.collect(tmp_path / "a"))
    assert "| full s0 | two-tower |" in alone and "steps |" not in alone


def test_the_recorded_command_names_every_option_that_is_not_its_default():
    """A run written elsewhere is reproduced by its command: --runs (and --config, --ranks) appear when set."""
    mod = _module()
    assert (mod.train_command("full", 0, ["--train.steps=2000"]) ==
            "python benchmarks/flickr8k_cn.py train --variant full --seed 0 --train.steps=2000")
    cmd = mod.train_command("no_mlm", 1, [], runs="runs/flickr8k-cn-long", ranks=4)
    assert cmd == ("python benchmarks/flickr8k_cn.py train --variant no_mlm --seed 1 --runs runs/flickr8k-cn-long"
                   " --ranks 4")
