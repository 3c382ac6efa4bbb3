"""r2d2ds: DeepSpeed-optimised large-batch trainer for R2D2 vision-language pre-training."""

from r2d2ds import compat as _compat  # noqa: F401  (must run before timm/transformers import torchvision)

__version__ = "0.1.0"
