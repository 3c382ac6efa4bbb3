"""Shared test set-up. The Triton interpreter must be chosen before triton is imported (DESIGN.md section 4)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
try:  # CPU-only machines run the kernels in the interpreter
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def shared_dir():
    """The read-only shared folder beside the repository (real data, tokenizer); skip when absent."""
    path = os.path.abspath(os.environ.get("R2D2DS_SHARED", SHARED))
    if not os.path.isdir(path):
        pytest.skip(f"shared data folder not found at {path} (set R2D2DS_SHARED)")
    return path
