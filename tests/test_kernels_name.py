"""The repository's kernels/ folder installs as r2d2ds.kernels, yet from the repository root (`deepspeed train.py`,
`python -m pytest`) it sits on sys.path under the bare name `kernels`, which belongs to Hugging Face's package of
that name. transformers (5.25) depends on that package and imports it whenever a BERT model is imported: the folder
must hand a bare `kernels` import over to the real package, never shadow it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_bare_kernels_import_from_the_root_gets_the_other_package(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARKER = 'the other kernels'\n")
    proc = _python(code=f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(other.parent)!r}]  # the root first, as `deepspeed train.py` puts it
import kernels
from kernels import MARKER
assert sys.modules["kernels"] is kernels, kernels
import r2d2ds.kernels as ours
print(MARKER, "|", kernels.__file__, "|", ours.contrastive_loss.__module__)
""")
    assert proc.returncode == 0, proc.stderr
    marker, path, ours = (s.strip() for s in proc.stdout.strip().split("|"))
    assert marker == "the other kernels" and Path(path) == other / "__init__.py"
    assert ours.startswith("r2d2ds.kernels.contrastive_loss")


def test_bare_kernels_import_without_the_other_package_fails_as_if_absent():
    # -S: no site-packages, so no other `kernels` anywhere; the hand-over itself needs only the standard library.
    proc = _python("-S", code=f"""
import sys
sys.path[:0] = [{str(ROOT)!r}]
try:
    import kernels
except ModuleNotFoundError as e:
    print(e.name, "kernels" in sys.modules)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["kernels", "False"]


def test_bert_imports_from_the_repository_root():
    # What broke every model test and `deepspeed train.py` once transformers started importing `kernels`.
    proc = _python(code="import r2d2ds, transformers.models.bert.modeling_bert as m; print(m.BertModel.__name__)")
    assert proc.returncode == 0 and proc.stdout.strip() == "BertModel", proc.stderr[-2000:]
