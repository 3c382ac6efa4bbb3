"""Fused kernels, installed as `r2d2ds.kernels` (public contracts: DESIGN.md section 3).

One op per file, each with its PyTorch reference, its Triton kernels and its autograd wrapper. Triton is imported
lazily by each op, so the torch paths work where Triton is absent.
"""

from r2d2ds.kernels.contrastive_loss import contrastive_loss
from r2d2ds.kernels.cross_attention import cross_attention
from r2d2ds.kernels.hard_negatives import sample_hard_negatives

__all__ = ["contrastive_loss", "cross_attention", "sample_hard_negatives"]
