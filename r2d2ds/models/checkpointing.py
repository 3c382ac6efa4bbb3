"""Activation checkpointing (`model.activation_checkpointing`): keep only each block's input in the forward and
recompute the block in the backward, trading one extra forward of the block for its activations.

One mechanism for all three parts: torch.utils.checkpoint, non-reentrant, with the RNG state preserved.
- Towers: the libraries' own switches, which call the same torch function per block: timm's
  `set_grad_checkpointing` (each ViT block one segment; timm's default is non-reentrant unless the environment
  sets TIMM_REENTRANT_CKPT) and transformers' `activation_checkpointing_enable` (each BertLayer), asked for
  `use_reentrant=False`.
- Cross encoders: `checkpointed(layer, ...)` per `CrossEncoderLayer` below.

Why not DeepSpeed's `deepspeed.checkpointing`: models are single-device code (no deepspeed import here), and that
API is Megatron's reentrant checkpoint whose extras (partitioning activations across model-parallel ranks, its
model-parallel CUDA RNG tracker) need a model-parallel group we do not have. Under ZeRO-3 the non-reentrant
recompute calls the block's submodules through `__call__`, so ZeRO-3's pre-forward hooks gather their partitioned
parameters again during the backward and release them after (tests/training/test_activation_checkpointing.py
checks the gradients and that nothing stays gathered).

RNG: `preserve_rng_state=True` stores the CPU (and, for CUDA inputs, the CUDA) generator state at the block's
forward and replays it in the recompute, inside a forked RNG, so dropout draws the same masks in both and the
global streams are left where the forward left them. The forward consumes the streams exactly as without
checkpointing: on and off give the same gradients, and GradCache's own per-chunk replay stays exact (the
recompute of a chunk's block replays the state the chunk's replayed forward saw).
"""

from __future__ import annotations

import logging

import torch
import torch.utils.checkpoint
from torch import nn

log = logging.getLogger(__name__)

KEY = "model.activation_checkpointing"


def wants(setting: str, part: str) -> bool:
    """Whether `part` ("towers" or "cross") is checkpointed under the config value `setting`."""
    return setting in (part, "all")


def checkpointed(module: nn.Module, *args):
    """`module(*args)`, its activations recomputed in the backward (only when a backward can follow)."""
    if not (module.training and torch.is_grad_enabled()):
        return module(*args)  # eval / no_grad (GradCache's pass 1, the teacher): nothing to save
    # The module itself (its __call__, hooks included) is the recomputed function: ZeRO-3 gathers again.
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True)


def enable_timm(body: nn.Module, model_name: str) -> None:
    """Per-block checkpointing of a timm model (its own switch; every timm family implements it or refuses)."""
    try:
        body.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError) as err:
        raise ValueError(f"{KEY}: the image model {model_name!r} does not support activation checkpointing "
                         f"({err or type(err).__name__}); use 'cross' or 'none'") from err
    from timm.layers import use_reentrant_ckpt

    if use_reentrant_ckpt():
        log.warning("%s: TIMM_REENTRANT_CKPT makes timm checkpoint the image tower re-entrantly; the rest of "
                    "the model uses non-reentrant checkpoints", KEY)


def enable_transformers(body: nn.Module, model_name: str) -> None:
    """Per-layer checkpointing of a transformers encoder, non-reentrant."""
    # `activation_checkpointing_enable` in newer transformers, `gradient_checkpointing_enable` before; both take
    # the torch.utils.checkpoint kwargs as their first argument.
    enable = getattr(body, "activation_checkpointing_enable", None) or body.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as err:
        raise ValueError(f"{KEY}: the text model {model_name!r} does not support activation checkpointing "
                         f"({err}); use 'cross' or 'none'") from err
    # transformers also hooks the embeddings to make their output require grad, which only a reentrant checkpoint
    # needs (its segment must have an input that requires grad); ours does not, and the hook would mark tensors
    # made under inference_mode.
    body.disable_input_require_grads()
