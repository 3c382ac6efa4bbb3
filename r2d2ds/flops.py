"""The FLOP model of one R2D2 training step: the numerator of `perf/tflops`, `perf/mfu` and bench_step's TFLOP/s.

Counting convention (the one MFU figures of PaLM, Megatron and nanoGPT use): every matmul of an (m, k) by a
(k, n) operand costs 2*m*k*n FLOPs (one multiply + one add per MAC); attention scores and attention-times-values
count as matmuls over the full (padded) sequence length; norms, softmax, GELU, embedding look-ups and the
optimizer are not counted (they are memory-bound and small next to the matmuls). The backward pass of a trained
part costs 2x its forward (a gradient for the input and one for the weights); a part run under no_grad (the EMA
teacher, the hard-negative similarity) counts its forward only.

One exception, kept consistent with benchmarks/bench_contrastive_gpu.py: the contrastive loss is credited
8*B^2*D per call, forward and backward, for a global batch B of D-dim embeddings (forward 2 B^2 D for the logits;
backward 2 B^2 D to recompute them plus 2 x 2 B^2 D for the two embedding gradients). Each rank computes its own
B_local rows against all B_global columns, so a rank is credited its share 8 * B_local * B_global * D.

The parts of one micro step (R2D2Pretraining.forward, B = micro batch per rank, L text tokens, N image tokens):
  image tower (ViT) fwd+bwd on B images; text tower (BERT) fwd+bwd on B texts; both projections;
  GCPR (and TgD, a second contrastive call, plus the teacher's own logits forward for its softmax);
  EMA teacher forwards of both towers (when TgD or FgD run); MLM/FgD: the text tower on the masked text and the
  text-query cross encoder on B pairs, fwd+bwd, the MLM head on the masked positions, the teacher's text-query
  forward on the full text (FgD); FGR: the hard-negative similarity (no grad, local batch), then BOTH cross
  encoders on the 3B (image, text) pairs fwd+bwd with their ITM heads.
Sequence lengths are the padded ones the matmuls really run over; MLM positions are mlm_probability x B x L
unless the caller knows the real count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BACKWARD_FACTOR = 2.0  # backward FLOPs = 2 x forward for every trained matmul
CONTRASTIVE_FWD_BWD = 8.0  # x B_local x B_global x D per contrastive call (see the module docstring)


def linear(tokens: int, d_in: int, d_out: int) -> float:
    """Forward FLOPs of a Linear on `tokens` rows: 2 * tokens * d_in * d_out."""
    return 2.0 * tokens * d_in * d_out


def attention_core(lq: int, lk: int, width: int) -> float:
    """Forward FLOPs of scores (Lq x Dh by Dh x Lk) and probs @ V (Lq x Lk by Lk x Dh), summed over heads."""
    return 2.0 * (2.0 * lq * lk * width)


@dataclass(frozen=True)
class EncoderDims:
    """A pre-/post-LN transformer stack: `layers` blocks of self-attention + FFN at `width`, FFN hidden `ffn`."""

    layers: int
    width: int
    ffn: int

    def forward(self, seqs: int, length: int) -> float:
        """Forward FLOPs of `seqs` sequences of `length` tokens: per layer Q,K,V,O (4 W^2), FFN (2 W F), attention."""
        per_layer = linear(length, self.width, 4 * self.width) + linear(length, self.width, 2 * self.ffn) \
            + attention_core(length, length, self.width)
        return seqs * self.layers * per_layer


@dataclass(frozen=True)
class ViTDims:
    """A timm ViT: patch embedding (a conv = a matmul over patches) + an EncoderDims stack over N tokens."""

    encoder: EncoderDims
    patch_size: int
    in_chans: int
    image_size: int
    prefix_tokens: int  # class / register tokens prepended to the patches

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + self.prefix_tokens

    def forward(self, images: int) -> float:
        patch_embed = images * linear(self.patches, self.in_chans * self.patch_size ** 2, self.encoder.width)
        return patch_embed + self.encoder.forward(images, self.tokens)


@dataclass(frozen=True)
class CrossDims:
    """One R2D2 cross encoder: `layers` x (self-attn on the queries, cross-attn to the context, FFN)."""

    layers: int
    width: int
    ffn: int

    def forward(self, pairs: int, lq: int, lk: int) -> float:
        self_attn = linear(lq, self.width, 4 * self.width) + attention_core(lq, lq, self.width)
        # Q and O on the queries, K and V on the context tokens.
        cross_attn = linear(lq, self.width, 2 * self.width) + linear(lk, self.width, 2 * self.width) \
            + attention_core(lq, lk, self.width)
        ffn = linear(lq, self.width, 2 * self.ffn)
        return pairs * self.layers * (self_attn + cross_attn + ffn)


@dataclass(frozen=True)
class ModelDims:
    """Everything the FLOP model needs to know about an R2D2 model and its inputs."""

    image: ViTDims
    text: EncoderDims
    text_len: int
    cross: CrossDims
    image_width: int  # image tower token width (enters the cross encoders through image_to_cross)
    image_pooled_width: int
    embed_dim: int
    vocab_size: int

    @property
    def image_to_cross(self) -> bool:
        return self.image_width != self.cross.width


@dataclass(frozen=True)
class Terms:
    """Which loss terms run (mirrors R2D2Pretraining.forward's conditions)."""

    gcpr: bool = True
    tgd: bool = False
    fgr: bool = False
    fgd: bool = False
    mlm: bool = False

    @classmethod
    def from_config(cls, loss_cfg) -> Terms:
        """From a LossConfig, with the EMA teacher present whenever a term needs it (the trainer's rule)."""
        tgd = loss_cfg.tgd_alpha > 0 and loss_cfg.tgd_weight > 0
        return cls(gcpr=loss_cfg.gcpr_weight > 0, tgd=tgd, fgr=loss_cfg.fgr_weight > 0,
                   fgd=loss_cfg.fgd_weight > 0, mlm=loss_cfg.mlm_weight > 0)

    @property
    def teacher(self) -> bool:
        return self.tgd or self.fgd


@dataclass
class StepFlops:
    """FLOPs of one optimizer step on ONE rank, per part: {name: (forward, backward)}."""

    parts: dict[str, tuple[float, float]]
    samples: int  # samples this rank processes in the step

    @property
    def forward(self) -> float:
        return sum(f for f, _ in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(b for _, b in self.parts.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def table(self) -> str:
        rows = [f"{'part':<28}{'fwd GFLOP':>14}{'bwd GFLOP':>14}{'share':>8}"]
        for name, (f, b) in self.parts.items():
            rows.append(f"{name:<28}{f / 1e9:>14.3f}{b / 1e9:>14.3f}{(f + b) / self.total:>8.1%}")
        rows.append(f"{'total':<28}{self.forward / 1e9:>14.3f}{self.backward / 1e9:>14.3f}{1:>8.0%}")
        return "\n".join(rows)


def step_flops(dims: ModelDims, micro_batch: int, world: int = 1, terms: Terms = Terms(), grad_accum: int = 1,
               mlm_probability: float = 0.15, mlm_tokens: float | None = None) -> StepFlops:
    """FLOPs of one optimizer step on one rank (grad_accum micro steps of `micro_batch` samples)."""
    b, bg, lt, n = micro_batch, micro_batch * world, dims.text_len, dims.image.tokens
    cross, d = dims.cross, dims.embed_dim
    parts: dict[str, tuple[float, float]] = {}

    def trained(name: str, fwd: float) -> None:
        f0, b0 = parts.get(name, (0.0, 0.0))
        parts[name] = (f0 + fwd, b0 + BACKWARD_FACTOR * fwd)

    def frozen(name: str, fwd: float) -> None:
        f0, b0 = parts.get(name, (0.0, 0.0))
        parts[name] = (f0 + fwd, b0)

    def contrastive(name: str) -> None:
        fwd = 2.0 * b * bg * d
        parts[name] = (fwd, (CONTRASTIVE_FWD_BWD - 2.0) * b * bg * d)

    def to_cross(pairs: int) -> float:
        return linear(pairs * n, dims.image_width, cross.width) if dims.image_to_cross else 0.0

    image_fwd = dims.image.forward(b)
    text_fwd = dims.text.forward(b, lt)
    proj_fwd = linear(b, dims.image_pooled_width, d) + linear(b, dims.text.width, d)
    trained("image_tower", image_fwd)
    trained("text_tower", text_fwd)
    trained("projections", proj_fwd)
    if terms.gcpr:
        contrastive("loss_gcpr")
    if terms.teacher:
        frozen("teacher_towers", image_fwd + text_fwd + proj_fwd)
    if terms.tgd:
        contrastive("loss_tgd")
        frozen("teacher_logits", 2.0 * b * bg * d)  # the teacher's softmax targets (no grad)
    if terms.mlm or terms.fgd:
        trained("masked_text_tower", text_fwd)
        trained("masked_text_query", cross.forward(b, lt, n) + to_cross(b))
        if terms.mlm:
            m = mlm_probability * b * lt if mlm_tokens is None else mlm_tokens
            trained("mlm_head", linear(m, cross.width, cross.width) + linear(m, cross.width, dims.vocab_size))
        if terms.fgd:
            frozen("teacher_text_query", cross.forward(b, lt, n) + to_cross(b))
    if terms.fgr:
        frozen("hard_negatives", 2.0 * b * b * d)  # local-batch similarity for the sampler (no grad)
        pairs = 3 * b  # B positives + B negative texts + B negative images
        trained("itm_text_query", cross.forward(pairs, lt, n) + to_cross(pairs) + linear(pairs, cross.width, 2))
        trained("itm_image_query", cross.forward(pairs, n, lt) + to_cross(pairs) + linear(pairs, cross.width, 2))

    parts = {k: (f * grad_accum, bw * grad_accum) for k, (f, bw) in parts.items()}
    return StepFlops(parts=parts, samples=b * grad_accum)


def model_dims(model, image_size: int, text_len: int) -> ModelDims:
    """ModelDims of a built `r2d2ds.models.R2D2` (a ViT image tower and a BERT-family text tower).

    Raises ValueError for towers the FLOP model does not describe (e.g. a CNN image tower).
    """
    body = model.image_tower.body
    blocks = getattr(body, "blocks", None)
    patch = getattr(getattr(body, "patch_embed", None), "proj", None)
    if blocks is None or patch is None or not hasattr(blocks[0], "mlp"):
        raise ValueError(f"FLOP model: image tower {type(body).__name__} is not a timm ViT (needs .blocks and "
                         ".patch_embed.proj)")
    width = int(body.embed_dim)
    vit = ViTDims(encoder=EncoderDims(len(blocks), width, int(blocks[0].mlp.fc1.out_features)),
                  patch_size=int(patch.kernel_size[0]), in_chans=int(patch.in_channels),
                  image_size=int(image_size), prefix_tokens=int(getattr(body, "num_prefix_tokens", 1)))
    tc = model.text_tower.body.config
    text = EncoderDims(int(tc.num_hidden_layers), int(tc.hidden_size), int(tc.intermediate_size))
    layer = model.text_query_encoder.layers[0]
    cross = CrossDims(len(model.text_query_encoder.layers), int(layer.ffn.fc1.in_features),
                      int(layer.ffn.fc1.out_features))
    return ModelDims(image=vit, text=text, text_len=int(text_len), cross=cross, image_width=width,
                     image_pooled_width=int(model.image_tower.pooled_width),
                     embed_dim=int(model.cfg.embed_dim), vocab_size=int(model.vocab_size))


def with_batch_shapes(dims: ModelDims, image_size: int | None = None, text_len: int | None = None) -> ModelDims:
    """The same model at other input shapes (e.g. the padded text length of the batches really seen)."""
    image = dataclasses.replace(dims.image, image_size=image_size) if image_size else dims.image
    return dataclasses.replace(dims, image=image, text_len=text_len or dims.text_len)


def measure_matmul_tflops(device=None, dtype=None, n: int | None = None, min_seconds: float = 0.2) -> float:
    """Measured dense matmul rate (TFLOP/s) of `torch.mm` on (n, n) operands: the denominator of MFU.

    Defaults: bf16 at n = 8192 on a CUDA device, fp32 at n = 512 on the CPU (one rank's threads, as the ranks
    run). Best of repeated timings after a warm-up, so a transient stall does not lower the ceiling.
    """
    import time

    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.mm(a, b)
    sync()
    best, spent, reps = float("inf"), 0.0, 1
    while spent < min_seconds or reps < 3:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()  # host sync: timing only
        dt = (time.perf_counter() - t0) / reps
        best, spent = min(best, dt), spent + dt * reps
        reps = min(reps * 2, 64)
    return 2.0 * n ** 3 / best / 1e12


def training_perf_model(model, cfg, device, bf16: bool, world: int) -> tuple[float | None, float | None]:
    """(model FLOPs per sample of one rank's step, matmul TFLOP/s for MFU) for a training run's logs.

    The rate is `cfg.train.peak_tflops` when set, else measured once here: bf16 on a GPU that trains in bf16,
    fp32 otherwise. Towers the FLOP model does not describe give (None, rate): the perf keys are then omitted.
    """
    import logging

    import torch

    peak = cfg.train.peak_tflops or measure_matmul_tflops(
        device, torch.bfloat16 if (bf16 and torch.device(device).type == "cuda") else torch.float32)
    try:
        dims = model_dims(model, cfg.data.image_size, cfg.data.max_text_len)
    except ValueError as err:
        logging.getLogger("r2d2ds").warning("no perf/tflops, perf/mfu: %s", err)
        return None, peak
    step = step_flops(dims, cfg.data.micro_batch, world=world, terms=Terms.from_config(cfg.loss),
                      grad_accum=cfg.train.grad_accum, mlm_probability=cfg.loss.mlm_probability)
    return step.total / step.samples, peak

