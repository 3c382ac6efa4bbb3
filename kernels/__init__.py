"""Fused kernels, installed as `r2d2ds.kernels` (public contracts: DESIGN.md section 3).

One op per file, each with its PyTorch reference, its Triton kernels and its autograd wrapper. Triton is imported
lazily by each op, so the torch paths work where Triton is absent.
"""

if __name__ == "kernels":
    # This folder was found under the bare name `kernels` because the repository root is on sys.path
    # (`deepspeed train.py`, or `python -m pytest` / `python -m r2d2ds.eval` run from the root). That name belongs to
    # Hugging Face's `kernels` package, a dependency of recent transformers, which imports it as soon as a BERT model
    # is imported: shadowing it broke every model import. Hand the import over to the real package (found on sys.path
    # without the repository root), or fail as if this folder were not there. Standard library only: transformers
    # is half-imported at this point.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the repository's kernels/ folder installs as "
                                  "r2d2ds.kernels, not as a top-level package)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    # The import system returns whatever sys.modules holds for the name once this file has run, and removes the
    # name again if this file raises (the real package failing to import included).
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
else:
    from r2d2ds.kernels.contrastive_loss import contrastive_loss
    from r2d2ds.kernels.cross_attention import cross_attention
    from r2d2ds.kernels.hard_negatives import sample_hard_negatives

    __all__ = ["contrastive_loss", "cross_attention", "sample_hard_negatives"]
