"""Regenerate tests/assets/golden_tiny_zero2.json, deliberately (the golden-curve test never writes it).

Runs the same tiny 2-rank ZeRO-2 job as tests/training/test_deepspeed_e2e.py (`golden_run`) on the same
synthetic dataset and records its per-step losses. Use it only when a change is MEANT to move the curve (e.g. a
new FGR negative sampler) and say why in the commit message.

    .venv/bin/python scripts/regenerate_golden.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.training.test_deepspeed_e2e import GOLDEN, golden_run, losses, make_dataset  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "synthetic")
        run = golden_run(Path(tmp) / "run", data)
        curve = {str(step): v for step, v in losses(run).items()}
    GOLDEN.write_text(json.dumps(curve, indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(curve)} steps)")


if __name__ == "__main__":
    main()
