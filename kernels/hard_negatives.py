"""Hard-negative sampling for FGR over the global batch (DESIGN.md section 3, `sample_hard_negatives`).

For each local image one text, and for each local text one image, drawn from softmax(s) over the row of the
global batch with every positive (same id; the diagonal when labels is None) excluded. Gumbel-max: argmax_j
(s_ij + g_ij) with g_ij = -log(-log u_ij), u ~ U(0, 1), is exactly a draw from softmax_j(s_ij) over the
allowed j, so the sampler needs neither the row LSE nor a B x B matrix: one running (max, argmax) per row over
column tiles. The Triton kernel draws u with Philox (`tl.rand(seed, global_row * N + col)`), so the draws do
not depend on the tiling or the launch; the torch path draws u with torch.rand on a seeded Generator row block
by row block. Same seed, same draws within an impl; the impls draw different (equally distributed) numbers.

Returned indices are GLOBAL (rank-major order of the gathered batch); a row without any negative returns -1.
The same draw is available from the loss pass (`contrastive_loss(..., return_negatives=True)`)."""

from __future__ import annotations

import torch
from r2d2ds.kernels.contrastive_loss import (
    _global_ids,
    _gumbel_argmax,
    _interpreting,
    _mix_seed,
    _resolve_impl,
    _torch_block_rows,
    _triton,
    draw_seed,
)

from r2d2ds.distributed.collectives import all_gather_rows, gather_sizes, row_offset

__all__ = ["sample_hard_negatives", "sample_hard_negatives_reference"]


def sample_hard_negatives_reference(x: torch.Tensor, y: torch.Tensor, scale, ids_r: torch.Tensor,
                                    ids_c: torch.Tensor,
                                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Naive (B, N) sampler for one direction: multinomial on the masked softmax; -1 where no negative."""
    s = float(scale) * x.double() @ y.double().T  # (B, N)
    pos = ids_r[:, None] == ids_c[None, :]
    s = s.masked_fill(pos, float("-inf"))
    has_neg = (~pos).any(1)
    p = torch.softmax(s, dim=1)
    p[~has_neg] = 1.0  # any valid distribution; overwritten below
    idx = torch.multinomial(p, 1, generator=generator).squeeze(1)
    return torch.where(has_neg, idx, torch.full_like(idx, -1))


def exact_negative_probs(x: torch.Tensor, y: torch.Tensor, scale, ids_r: torch.Tensor,
                         ids_c: torch.Tensor) -> torch.Tensor:
    """(B, N) float64 probabilities the sampler must follow (0 on positives), the chi-square tests' truth."""
    s = float(scale) * x.double() @ y.double().T
    s = s.masked_fill(ids_r[:, None] == ids_c[None, :], float("-inf"))
    return torch.softmax(s, dim=1).nan_to_num(0.0)


def _torch_sample(x, y, scale, ids_r, ids_c, gen) -> torch.Tensor:
    b = x.shape[0]
    out = torch.empty(b, dtype=torch.long, device=x.device)
    yf = y.float()
    step = _torch_block_rows(y.shape[0])
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        s = (x[r0:r1].float() @ yf.T) * scale  # (blk, N) fp32
        out[r0:r1] = _gumbel_argmax(s, ids_r[r0:r1, None] == ids_c[None, :], gen)
    return out


@torch.no_grad()
def sample_hard_negatives(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float | torch.Tensor,
                          labels: torch.Tensor | None = None, group=None,
                          generator: torch.Generator | None = None, impl: str = "auto", *,
                          seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg_txt_for_img, neg_img_for_txt): int64 (B_local,) global indices, see the module docstring.

    Seeded by `seed` if given, else by an int drawn from `generator` (or the default RNG when both are None).
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must both be (B, D), got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if labels is not None and labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be ({image_emb.shape[0]},), got {tuple(labels.shape)}")
    impl = _resolve_impl(impl, image_emb.device)
    b = image_emb.shape[0]
    scale = logit_scale.detach() if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale))
    scale = scale.to(device=image_emb.device, dtype=torch.float32).reshape(())
    sizes = gather_sizes(b, group)
    off = row_offset(sizes, group)
    img_all = all_gather_rows(image_emb, sizes, group)
    txt_all = all_gather_rows(text_emb, sizes, group)
    ids_r, ids_c, _ = _global_ids(labels, b, sizes, group, image_emb.device)
    sd = draw_seed(generator, seed, image_emb.device)
    dirs = ((image_emb.contiguous(), txt_all), (text_emb.contiguous(), img_all))
    out = []
    for k, (x, y) in enumerate(dirs):
        if impl == "triton":
            if x.device.type != "cuda" and not _interpreting():
                raise RuntimeError("impl='triton' on CPU needs TRITON_INTERPRET=1 before importing triton")
            out.append(_triton().sample(x, y, scale, ids_r, ids_c, sd + k, off))
            continue
        gen = torch.Generator(device=x.device)
        gen.manual_seed(_mix_seed(sd + k, off))
        if impl == "reference":
            out.append(sample_hard_negatives_reference(x, y, scale, ids_r, ids_c, gen))
        else:
            out.append(_torch_sample(x, y, scale, ids_r, ids_c, gen))
    return out[0], out[1]
