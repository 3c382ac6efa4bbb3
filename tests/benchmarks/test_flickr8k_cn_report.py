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
