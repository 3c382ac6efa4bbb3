"""MLM: BERT masking, seeded, and CE on the masked positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, probability: float, mask_token_id: int,
                vocab_size: int, special_token_ids: list[int], generator: torch.Generator | None
                ) -> tuple[Tensor, Tensor]:
    """BERT masking -> (masked_ids (B, L), labels (B, L) with IGNORE_INDEX off the selected positions).

    Each non-special, non-pad token is selected with `probability`; a selected token becomes [MASK] with
    probability 0.8, a uniformly random vocabulary token with 0.1, and stays with 0.1. If nothing was
    selected, one eligible token (uniformly chosen) is forced, so every batch has at least one MLM target;
    this is done with tensor ops, without a host sync.
    """
    specials = torch.tensor(special_token_ids, dtype=input_ids.dtype, device=input_ids.device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)  # (B, L); never in-place on the mask
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    selected = (u < probability) & eligible
    # Guarantee one target: the eligible position with the largest fresh random score, only if none selected.
    score = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) * eligible  # (B, L)
    pick = score.flatten().argmax()
    force = ~selected.any() & eligible.flatten()[pick]
    flat = selected.flatten().clone()
    flat[pick] = flat[pick] | force
    selected = flat.view_as(selected)

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    r = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = selected & (r < 0.8)
    to_random = selected & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device,
                               dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over the positions whose label is not IGNORE_INDEX; 0 when there are none. 0-dim fp32.

    `logits` (..., V) and `labels` (...) may already be restricted to the masked positions.
    """
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (labels != IGNORE_INDEX).sum().clamp_min(1).float()
