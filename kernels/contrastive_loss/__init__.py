"""GCPR contrastive loss over the global batch with O(B*D) memory (DESIGN.md section 3, `contrastive_loss`).

Math. With N global rows, s_ij = scale * <x_i, y_j> and row targets q_ij (sum_j q_ij = 1), one direction's row
loss is the cross entropy  CE_i = LSE_j(s_ij) - sum_j q_ij s_ij,  so the forward needs only the per-row LSE
and the target-weighted term. q_ij = (1 - alpha) * 1[id_i = id_j] / cnt_i + alpha * exp(t_ij - TLSE_i), where
t = scale * <x_teacher_i, y_teacher_j> and TLSE_i is the teacher row's own LSE (one extra tiled pass, no B x
B). The gradient of sum_i w_i CE_i w.r.t. s_ij is G_ij = w_i (p_ij - q_ij) with p_ij = exp(s_ij - LSE_i): the
backward recomputes s (and t) tile by tile from the stored LSE, and dx = scale * G y, dy = scale * G^T x,
dscale = sum_ij G_ij <x_i, y_j>.

The loss is (i2t + t2i) / 2: i2t rows are this rank's images over all gathered texts, t2i rows this rank's
texts over all gathered images. Gathered columns carry no autograd graph; their gradients are reduce-scattered
to their owners in backward. Rows are weighted by W / N (W ranks, N global rows) in backward, so that after
the data-parallel gradient average every parameter gets exactly d(global-batch loss)/d(param) (the gradient
invariant), for any world size and even for uneven local batches; with equal local batches this is open_clip's
gather_with_grad convention.

Triton backward (R2D2DS_CONTRASTIVE_BWD, read at the forward): "panel" (default) writes the gradient tile G of
R rows x N columns once, in the input dtype, and two GEMMs with fp32 accumulation read it (dX = G Y, dY += G^T X);
memory O(B*D + R*N) with R*N*e <= 1 GiB (or R = 4096); "tiles" (the previous design) recomputes the logits in a
dx and a dy kernel that read and write fp32 accumulators per tile. benchmarks/roofline.py predicts both.

Files, in the order of DESIGN.md section 4:
  reference.py        naive B x B loss (impl="reference"; the tests' float64 truth)
  blockwise_torch.py  row-blocked PyTorch forward / backward (impl="torch", the CPU default)
  triton_kernels.py   the Triton kernels and their autotune configs (impl="triton")
  launchers.py        launch grids, argument checks and the Triton backend object
  autograd.py         the autograd.Function over both directions and the functional API
Triton is imported lazily (`_triton()`), so impl="torch" works where Triton is absent and the interpreter flag
can still be set before the first Triton import."""

from r2d2ds.kernels.contrastive_loss.autograd import _global_ids, _resolve_impl, contrastive_loss, draw_seed
from r2d2ds.kernels.contrastive_loss.blockwise_torch import (
    _gumbel_argmax,
    _mix_seed,
    _torch_block_rows,
    _torch_fwd_both,
)
from r2d2ds.kernels.contrastive_loss.launchers import _triton
from r2d2ds.kernels.contrastive_loss.reference import _soft_targets, contrastive_loss_reference
from r2d2ds.kernels.contrastive_loss.triton_kernels import _interpreting

__all__ = ["contrastive_loss", "contrastive_loss_reference"]
# Shared with hard_negatives.py (the same ids, seeds and Gumbel-max draws) and the tests.
_SHARED = [_global_ids, _resolve_impl, draw_seed, _gumbel_argmax, _mix_seed, _torch_block_rows, _torch_fwd_both,
           _triton, _soft_targets, _interpreting]
