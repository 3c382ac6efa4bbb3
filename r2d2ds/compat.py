"""Import-time compatibility shims, applied once when `r2d2ds` is imported.

The torchvision wheel that timm and open_clip pull in on CPU machines is a CUDA build. Beside a CPU torch its
import fails with "operator torchvision::nms does not exist", because its Python layer registers fake kernels for
ops whose schemas only its C++ library defines. Defining the two schemas first lets it import; we never call
nms, so no kernel is needed. Only done when torch has no CUDA, and only when torchvision is not yet imported.
"""

import sys

import torch


def _define_torchvision_schemas() -> None:
    if torch.version.cuda is not None or "torchvision" in sys.modules:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (exists when torchvision's C++ ops are loadable)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
               "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor"):
        try:
            lib.define(op)
        except RuntimeError:  # already defined by a real torchvision build
            pass
    # Keep the library object alive: dropping it would unregister the schemas.
    _define_torchvision_schemas.lib = lib


_define_torchvision_schemas()
