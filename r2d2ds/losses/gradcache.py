"""GradCache (Gao et al., 2021) for R2D2: global batches far beyond one micro step's activation memory, with the
same parameter gradients as one step on the whole batch.

One optimizer step over a rank batch of B rows, cut into chunks of `chunk_size` rows (B_c):

  pass 1 (one engine forward, no grad): per chunk, save the CPU/CUDA RNG states, run both towers (and the EMA
    teacher's towers for TgD) -> (B, D) embeddings. On them: GCPR/TgD over the GLOBAL batch (the fused O(B*D)
    `contrastive_loss`) and their gradient w.r.t. the local embeddings and the logit scale, cached
    (B, D) + (B, D) + 1 floats; the MLM masks and the FGR hard negatives for the whole rank batch, drawn in the
    same generator order as the objective's one-shot forward, so both pick the same ones.
  then engine micro steps per chunk that re-run the towers WITH gradient from the chunk's saved RNG state (same
    dropout masks as pass 1, so the cached gradient belongs to these activations) and back-propagate
      surrogate = <img_emb, g_img> + <txt_emb, g_txt> + scale * g_scale * (rows / B)
    with the ranking stage: both cross encoders on the chunk's B_c positives and 2 B_c hard negatives (FGR), MLM
    and FgD on its masked texts. Every term is a mean over the rank batch in the one-shot objective (weighted
    ITM mean, mean over masked tokens, mean over valid tokens); here each chunk contributes its SUM divided by
    the rank batch's denominator, counted in pass 1, so the chunk losses add up to the one-shot loss exactly.

FGR's negatives live in other chunks and on other ranks; how their towers get the gradient that flows through
them (train.gradcache_negatives):

  "cached" (default; exact, dropout included): pass 1 also keeps the token sequences the cross encoders consume,
    image (B, N, Wi) and text (B, L, Wt), for the whole rank batch, and
    pass 2 (ranking; one engine micro step per chunk, `rank_pass`): the rows of the cache the chunk touches (its
      positives, its negatives held here, the rows other ranks ask for) become ONE leaf with requires_grad; the
      remote negatives arrive through FGR's exchange (r2d2ds/distributed/exchange.py), whose backward returns
      their gradient to the owner rank's leaf. Both cross encoders score the chunk's pairs; engine.backward
      gives the cross encoders' parameter gradients and the leaves' gradients, which are added (fp32, divided
      by the engine's loss scale) into token gradients G_img (B, N, Wi), G_txt (B, L, Wt).
    pass 3 (towers; one engine micro step per chunk, `tower_pass`): the towers again from the chunk's RNG state,
      back-propagating surrogate + <img_tokens, G_img> + <txt_tokens, G_txt>, plus MLM/FgD on the chunk's
      masked texts (their own text-tower forward, against the chunk's image tokens).
    A negative's tokens are its row's tokens (the dropout mask its row drew), as in the one-shot step.
    Cost: the towers run forward twice and backward once (one-shot: once and once), the cross encoders as in
    the one-shot step. Engine micro steps: 2 per chunk (1 without FGR: no pass 2).
    Memory: the token cache, B x (N Wi + L Wt) values in the towers' dtype plus as many fp32 gradients, held
    for the step (ViT-B/16 at 224 px + BERT-base at 64 tokens: 261 x 768 values, 1.2 MB per sample in bf16
    with fp32 gradients), instead of O(B x D); activations per chunk as in the other modes, without negatives.
    RNG: only the towers are replayed; the cross encoders (pass 2) and the masked-text tower and text-query
    encoder (pass 3) draw from the global stream, each draw once per step.
  "reembed" (exact without dropout): no pass 2; each chunk's micro step re-runs the towers, with gradient, on
    the negatives from other chunks/ranks from their raw inputs (fetched from the owner rank with FGR's
    exchange plan): the towers receive exactly the gradient they get through the negatives' tokens in the
    one-shot step (there it reaches the owner's replica through the all-to-all's backward; here this rank's
    replica; the data-parallel average makes them the same). With dropout on, a re-embedded negative draws its
    own dropout mask (the one-shot step reuses its row's): not exact. Cost: per chunk the towers also run
    forward and backward on up to 2 B_c negatives, up to ~3x the towers' work of the one-shot step, plus pass
    1's forward. Memory: O(B x D) + the raw inputs; a chunk's activations include its negatives' (up to 3 B_c
    tower rows). The ranking stage continues the chunk's replayed RNG stream.
  "detached": as "reembed" but the negatives (and in-chunk negatives) run without gradient: cheaper (no
    backward through, and no activations kept for, up to 2 B_c extra tower rows per chunk), and it DROPS the
    gradient of FGR w.r.t. the tower parameters through the negative side of each negative pair (the image
    tower through negative images, the text tower through negative texts); the cross encoders, heads and the
    positive sides keep their exact gradients.

DeepSpeed: each chunk's forward + `engine.backward` + `engine.step` is one engine micro step, so the engine's
gradient-accumulation boundary semantics hold (gradient_accumulation_steps = passes x chunks x micro steps per
chunk, `BatchPlan.engine_accum`): ZeRO-2/3 reduce each micro step's gradients once in their backward epilogue
and the optimizer steps once at the boundary. The failure "Gradient computed twice for this partition" of naive
GradCache comes from calling `backward()` several times inside ONE engine micro step (the reduce hooks fire per
backward, the per-step bookkeeping is reset only by the engine's epilogue); here there is exactly one backward
per engine forward. `backward(..., scale_wrt_gas=False)`: the chunk losses already sum to the rank batch's loss,
so the engine's 1/GAS division would be wrong; we divide by the number of GradCache passes per step ourselves
(same as plain accumulation). Loss scaling (fp16) is linear, so a scaled surrogate yields the scaled gradient;
the token gradients read back from the leaves are divided by the engine's loss scale before they enter pass 3,
which the engine scales again. bf16/fp32 need none.

ZeRO-3 gathers a module's parameters (an all-gather, collective) when the module runs, so every rank must run the
same modules in the same order: in "reembed"/"detached" each chunk runs the negatives' towers on every rank even
with nothing to re-embed (`_negative_tokens`); in "cached" the ranking and tower passes run the same modules on
every rank whatever the negatives, and the exchange (forward and its backward, both collectives) runs in every
chunk on every rank. ZeRO-3 copies (rather than adds) a parameter's gradient partition only in a step's micro
step 0, so every trainable parameter must get a gradient there: "cached"'s first ranking micro step adds a zero
one-row pass through the parts it does not otherwise reach (`_zero_touch`). Its prefetcher replays the module
order recorded in one engine forward in the next; pass 1 (towers only, chunk after chunk) has another order than
the chunk passes, which all share one, so the trace is dropped once per step ("Invalidate trace cache" in
DeepSpeed's debug log; "cached": once per pass type, at most 4 per step, whatever the number of chunks): the first
forward of each kind fetches on demand, later chunks prefetch; gradients and the release of gathered parameters
are unaffected (tests/training/test_gradcache_engine.py). Activation checkpointing
(model.activation_checkpointing) stays exact here: a block's recompute replays the RNG state its (replayed)
forward saw.
"""


from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from r2d2ds.config import Config, ConfigError
from r2d2ds.distributed.collectives import gather_sizes, row_offset
from r2d2ds.distributed.exchange import RowExchange, plan_row_exchanges
from r2d2ds.losses.contrastive import gcpr_loss, tgd_loss
from r2d2ds.losses.distill import fgd_loss
from r2d2ds.losses.fgr import fgr_group, itm_accuracy, pick_negatives, weighted_itm_loss
from r2d2ds.losses.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from r2d2ds.losses.objective import TERMS

NEGATIVE_MODES = ("cached", "reembed", "detached")


# ----------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is cut: passes x ranks x rank_batch, each pass in chunks."""

    global_batch: int
    world: int
    grad_accum: int  # GradCache passes (or plain micro steps) per optimizer step
    rank_batch: int  # rows per rank per pass
    chunk_size: int  # 0: GradCache off (one micro step per pass)
    negatives: str = "cached"  # train.gradcache_negatives
    fgr: bool = True  # FGR runs (loss.fgr_weight > 0): the "cached" mode's ranking pass exists

    @property
    def gradcache(self) -> bool:
        return self.chunk_size > 0

    @property
    def micro_per_chunk(self) -> int:
        """Engine micro steps per chunk: 2 for "cached" with FGR (a ranking and a tower pass), else 1."""
        return 2 if self.gradcache and self.negatives == "cached" and self.fgr else 1

    def chunks(self) -> list[slice]:
        """Row slices of one pass; the last chunk is shorter when chunk_size does not divide rank_batch."""
        size = self.chunk_size or self.rank_batch
        return [slice(s, min(s + size, self.rank_batch)) for s in range(0, self.rank_batch, size)]

    @property
    def engine_micro_batch(self) -> int:
        return self.chunk_size if self.gradcache else self.rank_batch

    @property
    def engine_accum(self) -> int:
        """gradient_accumulation_steps of the engine: one engine micro step per chunk and GradCache pass."""
        return self.grad_accum * len(self.chunks()) * self.micro_per_chunk

    def data_config(self, cfg: Config) -> Config:
        """`cfg` with data.micro_batch = the rank batch of one pass (what the stream yields)."""
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch=self.rank_batch))

    def engine_config(self, cfg: Config) -> Config:
        """`cfg` as the engine's batch identity sees it: micro = chunk, accumulation = passes x chunks.

        When chunk_size does not divide the rank batch the ds_config's train_batch_size (chunk x accumulation
        x world) overstates the real batch; DeepSpeed only counts samples with it (throughput, monitor)."""
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch=self.engine_micro_batch),
                                   train=dataclasses.replace(cfg.train, grad_accum=self.engine_accum))


def plan_batch(cfg: Config, world: int) -> BatchPlan:
    """Derive the per-rank batch from train.global_batch (or data.micro_batch) and validate it, naming keys."""
    t = cfg.train
    if t.global_batch:
        per_pass = world * t.grad_accum
        if t.global_batch % per_pass:
            raise ConfigError(f"config key 'train.global_batch': {t.global_batch} is not divisible by world size "
                              f"{world} x train.grad_accum {t.grad_accum} = {per_pass}")
        rank_batch = t.global_batch // per_pass
    else:
        rank_batch = cfg.data.micro_batch
    if t.chunk_size > rank_batch:
        raise ConfigError(f"config key 'train.chunk_size': {t.chunk_size} is larger than the rank batch of one "
                          f"pass ({rank_batch} = train.global_batch / (world {world} x train.grad_accum); "
                          f"data.micro_batch when train.global_batch is 0)")
    return BatchPlan(global_batch=rank_batch * world * t.grad_accum, world=world, grad_accum=t.grad_accum,
                     rank_batch=rank_batch, chunk_size=t.chunk_size, negatives=t.gradcache_negatives,
                     fgr=cfg.loss.fgr_weight > 0)


# -------------------------------------------------------------------------------------------- RNG states
def _keys(labels: Tensor | None, sl: slice) -> Tensor | None:
    """The chunk's image ids for the frozen image tower's feature cache (None: no ids, computed as usual)."""
    return None if labels is None else labels[sl]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state: tuple[Tensor, Tensor | None], device: torch.device):
    """Run the block from a saved RNG state and leave the global streams where they were (fork_rng)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


# ---------------------------------------------------------------------------------------------- pass 1
@dataclass
class _Cache:
    """What pass 1 leaves for pass 2 (all O(B) or O(B x D); no activations)."""

    chunks: list[slice]
    rng: list[tuple[Tensor, Tensor | None]]
    g_img: Tensor | None  # (B, D) d(rank loss)/d(img_emb); None when no contrastive term runs
    g_txt: Tensor | None
    g_scale: Tensor | None  # 0-dim
    masked_ids: Tensor | None  # (B, L) MLM/FgD inputs for the whole rank batch
    mlm_labels: Tensor | None
    neg_txt: Tensor | None  # (B,) GLOBAL index (over `group`) of each image's negative text, -1: none
    neg_img: Tensor | None
    group: Any  # FGR's process group (None: the default group, the global batch)
    sizes: list[int]  # rows per rank of `group`
    offset: int  # global index of this rank's first row
    mlm_count: Tensor  # denominators of the rank-batch means (0-dim fp32)
    fgd_count: Tensor
    itm_weight: Tensor
    itm_valid: Tensor
    scale: Tensor  # 0-dim logit scale of this step (logged)
    terms: dict[str, Tensor]
    # "cached" negatives only: the tokens the cross encoders consume, for the whole rank batch (no graph), and
    # d(rank loss)/d(tokens) accumulated over the ranking pass, fp32 (unscaled: no loss scale, no 1/passes).
    img_tok: Tensor | None = None  # (B, N, Wi)
    txt_tok: Tensor | None = None  # (B, L, Wt)
    g_img_tok: Tensor | None = None  # (B, N, Wi) fp32
    g_txt_tok: Tensor | None = None  # (B, L, Wt) fp32
    leaves: list[tuple[Tensor, Tensor, str]] = dataclasses.field(default_factory=list)  # (rows, leaf, kind)


def _flags(obj, teacher) -> dict[str, Any]:
    lc = obj.loss_cfg
    use_tgd = teacher is not None and obj._tgd_on()
    return dict(tgd=use_tgd, fgd=teacher is not None and lc.fgd_weight > 0, mlm=lc.mlm_weight > 0,
                fgr=lc.fgr_weight > 0, gcpr=lc.gcpr_weight > 0, a=lc.tgd_alpha if use_tgd else 0.0)


def embed_pass(obj, batch: dict, teacher, seed: int, chunks: list[slice], keep_tokens: bool = False) -> _Cache:
    """Pass 1 on objective `obj` (R2D2Pretraining). Called inside the engine's forward under no_grad.
    `keep_tokens`: also keep the towers' token outputs of the rank batch ("cached" negatives)."""
    lc, impl, model = obj.loss_cfg, obj.model_cfg.contrastive_impl, obj.model
    f = _flags(obj, teacher)
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    labels = batch.get("image_id")
    device = ids.device
    rng, img, txt, t_img, t_txt = [], [], [], [], []
    img_tok = txt_tok = None
    with torch.no_grad():
        for sl in chunks:
            rng.append(_rng_state(device))
            i_tokens, emb, pooled = model.encode_image(image[sl], with_pooled=True, cache_keys=_keys(labels, sl))
            img.append(emb)
            if keep_tokens:  # written in place: no list + cat, which would hold the cache twice
                img_tok = i_tokens.new_empty((ids.shape[0], *i_tokens.shape[1:])) if img_tok is None else img_tok
                img_tok[sl] = i_tokens
            tokens, emb = model.encode_text(ids[sl], mask[sl])
            txt.append(emb)
            if keep_tokens:
                txt_tok = tokens.new_empty((ids.shape[0], *tokens.shape[1:])) if txt_tok is None else txt_tok
                txt_tok[sl] = tokens
            if f["tgd"]:  # the teacher is in eval mode: no dropout, nothing to replay
                t_img.append(obj.teacher_image(teacher, image[sl], i_tokens, pooled)[1])
                t_txt.append(teacher.encode_text(ids[sl], mask[sl])[1])
        img_emb, txt_emb = torch.cat(img), torch.cat(txt)  # (B, D)
        scale = model.logit_scale().detach()

    zero = scale.new_zeros((), dtype=torch.float32)
    terms = dict.fromkeys(TERMS, zero)
    g_img = g_txt = g_scale = None
    if f["gcpr"] or f["tgd"]:
        # The contrastive terms and their gradient w.r.t. the embeddings: leaves, so the backward stops there.
        with torch.enable_grad():
            xi = img_emb.detach().requires_grad_(True)
            xt = txt_emb.detach().requires_grad_(True)
            s = scale.detach().clone().requires_grad_(True)
            total = zero
            if f["gcpr"]:
                terms["gcpr"] = gcpr_loss(xi, xt, s, labels, impl=impl)
                total = total + (1.0 - f["a"]) * lc.gcpr_weight * terms["gcpr"]
            if f["tgd"]:
                terms["tgd"] = tgd_loss(xi, xt, s, labels, torch.cat(t_img), torch.cat(t_txt), impl=impl)
                total = total + f["a"] * lc.tgd_weight * terms["tgd"]
            g_img, g_txt, g_scale = torch.autograd.grad(total, [xi, xt, s])
        terms = {k: v.detach() for k, v in terms.items()}

    # The same draws as the objective's one-shot forward on this rank batch: masks from the step seed's
    # generator, FGR's negatives from its own seed, fused into the GCPR pass under the same rule.
    gen = torch.Generator(device=device).manual_seed(int(seed))
    masked_ids = mlm_labels = neg_txt = neg_img = None
    mlm_count = fgd_count = itm_weight = itm_valid = zero
    if f["mlm"] or f["fgd"]:
        masked_ids, mlm_labels = mask_tokens(ids, mask, lc.mlm_probability, obj.mask_token_id, obj.vocab_size,
                                             obj.special_token_ids, gen)
        mlm_count = (mlm_labels != IGNORE_INDEX).sum().clamp_min(1).float()
        fgd_count = mask.float().sum().clamp_min(1.0)
    group, sizes, offset = None, [ids.shape[0]], 0
    if f["fgr"]:
        fgr_seed, fuse = obj.fgr_draw(seed)
        group = fgr_group(lc.fgr_negative_scope)
        sizes = gather_sizes(ids.shape[0], group)
        offset = row_offset(sizes, group)
        if fuse:  # the draw rides on a (no-grad) GCPR pass, exactly as in the one-shot forward
            _, (neg_txt, neg_img) = gcpr_loss(img_emb, txt_emb, scale, labels, impl=impl, negatives_seed=fgr_seed)
        else:
            neg_txt, neg_img = pick_negatives(img_emb, txt_emb, scale, labels, fgr_seed, obj.sampling, group, impl)
        w_neg, w_pos = lc.fgr_class_weights
        n_valid = (neg_txt >= 0).sum() + (neg_img >= 0).sum()
        itm_weight = (ids.shape[0] * w_pos + w_neg * n_valid).float().clamp_min(1e-12)
        itm_valid = (ids.shape[0] + n_valid).float()
        negs = torch.cat([neg_txt, neg_img])
        ok = negs >= 0
        remote = ok & ((negs < offset) | (negs >= offset + ids.shape[0]))
        terms["remote_frac"] = remote.float().sum() / ok.float().sum().clamp_min(1.0)
    return _Cache(chunks, rng, g_img, g_txt, g_scale, masked_ids, mlm_labels, neg_txt, neg_img, group, sizes,
                  offset, mlm_count, fgd_count, itm_weight, itm_valid, scale, terms, img_tok, txt_tok)


# ---------------------------------------------------------------------------------------------- pass 2
def _negative_rows(rows: Tensor, cache: _Cache, chunk: slice) -> tuple[Tensor, Tensor]:
    """Where the negatives `rows` (B_c,) (GLOBAL indices, -1: none) of this chunk's anchors come from.

    Returns idx (B_c,) into cat([this chunk's rows, the U rows of `outside`]) and `outside` (U,), the sorted
    global indices outside this chunk (another chunk, another rank): those are fetched from their owners (raw
    inputs, FGR's exchange plan) and re-embedded here."""
    start, stop = cache.offset + chunk.start, cache.offset + chunk.stop
    own = torch.arange(start, stop, device=rows.device)
    rows = torch.where(rows >= 0, rows, own)  # no negative: any partner keeps shapes static; `valid` masks it
    inside = (rows >= start) & (rows < stop)
    outside = torch.unique(rows[~inside])  # sorted; a host sync (the re-embedding's shape), once per chunk
    idx = torch.where(inside, rows - start, (stop - start) + torch.searchsorted(outside, rows.contiguous()))
    return idx, outside


def _negative_tokens(encode, raw: list[Tensor], own: list[Tensor], idx: Tensor, chunk_tokens: Tensor,
                     negatives: str) -> Tensor:
    """Tokens of the negatives: this chunk's own tokens, or the fetched rows re-embedded by `encode(*raw)`,
    with gradient ("reembed") or without ("detached", where in-chunk negatives are detached too).

    The tower runs on every rank for every chunk, also when this rank has nothing to re-embed (one of the chunk's
    `own` rows stands in, its output dropped): under ZeRO-3 a tower's forward all-gathers its parameters, a
    collective, so a rank skipping it while another runs it pairs mismatched all-gathers (gloo aborts with a
    collective-size mismatch, NCCL hangs); the dropped row also keeps every rank's backward over the same
    parameters, and the module order the same from chunk to chunk (ZeRO-3's prefetch trace stays valid)."""
    grad, n = negatives == "reembed", raw[0].shape[0]
    with contextlib.nullcontext() if grad else torch.no_grad():
        extra = encode(*(raw if n else [t[:1] for t in own]))[:n]
    pool = chunk_tokens if grad else chunk_tokens.detach()
    return torch.cat([pool, extra])[idx]


def _masked_text_terms(obj, batch: dict, teacher, cache: _Cache, sl: slice, img_tokens: Tensor,
                       f: dict[str, Any]) -> dict[str, Tensor]:
    """MLM and FgD of chunk `sl`: the student's text tower on its masked texts (with gradient), the text-query
    encoder against `img_tokens` (B_c, N, Wi); each term scaled to the chunk's share of the rank batch's mean."""
    model, terms = obj.model, {}
    if not (f["mlm"] or f["fgd"]):
        return terms
    m_mask = batch["attention_mask"][sl]
    m_txt_tokens, _ = model.encode_text(cache.masked_ids[sl], m_mask)
    m_hidden = model.text_query(m_txt_tokens, m_mask, img_tokens)  # (B_c, L, W)
    if f["mlm"]:
        lab = cache.mlm_labels[sl]
        sel = lab != IGNORE_INDEX  # host sync (boolean index), as in the one-shot objective
        # mean over this chunk's targets x (its targets / the rank batch's): its share of the batch mean
        terms["mlm"] = mlm_loss(model.mlm_logits(m_hidden[sel]), lab[sel]) * (sel.sum().float() / cache.mlm_count)
    if f["fgd"]:
        with torch.no_grad():  # the teacher on the full text (eval mode: no dropout, no RNG draw)
            t_img_tokens = obj.teacher_image(teacher, batch["image"][sl], img_tokens)[0]
            t_txt_tokens, _ = teacher.encode_text(batch["input_ids"][sl], m_mask)
            t_hidden = teacher.text_query(t_txt_tokens, m_mask, t_img_tokens)
        terms["fgd"] = fgd_loss(m_hidden, t_hidden, m_mask) * (m_mask.float().sum() / cache.fgd_count)
    return terms


def _itm_terms(obj, cache: _Cache, sl: slice, pos: tuple[Tensor, Tensor, Tensor],
               neg: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    """FGR of chunk `sl`: both cross encoders on its B_c positives and 2 B_c negatives.

    pos = (img_tokens, txt_tokens, mask) of the chunk's rows; neg = (negative image tokens of its texts, negative
    text tokens of its images, their mask). The chunk's weighted-mean CE x its share of the batch's weight."""
    lc, model = obj.loss_cfg, obj.model
    img_tokens, txt_tokens, mask = pos
    neg_img_tok, neg_txt_tok, neg_mask = neg
    rows, device = txt_tokens.shape[0], txt_tokens.device
    nt, ni = cache.neg_txt[sl], cache.neg_img[sl]
    img = torch.cat([img_tokens, img_tokens, neg_img_tok])  # (3 B_c, N, Wi)
    txt = torch.cat([txt_tokens, neg_txt_tok, txt_tokens])  # (3 B_c, L, Wt)
    pair_mask = torch.cat([mask, neg_mask, mask])
    target = torch.cat([torch.ones(rows, dtype=torch.long, device=device),
                        torch.zeros(2 * rows, dtype=torch.long, device=device)])
    valid = torch.cat([torch.ones(rows, dtype=torch.bool, device=device), nt >= 0, ni >= 0])
    tq, iq = model.itm_logits(img, txt, pair_mask)  # (3 B_c, 2) each
    w = torch.tensor(lc.fgr_class_weights, device=device, dtype=torch.float32)[target] * valid.float()
    share = w.sum() / cache.itm_weight  # the chunk's weighted-mean x its share of the batch's weight
    terms = {"fgr": 0.5 * (weighted_itm_loss(tq, target, valid, lc.fgr_class_weights)
                           + weighted_itm_loss(iq, target, valid, lc.fgr_class_weights)) * share}
    with torch.no_grad():  # correct-pair counts, normalised by the batch's valid pairs
        acc_share = valid.float().sum() / cache.itm_valid
        terms["acc"] = 0.5 * (itm_accuracy(tq, target, valid) + itm_accuracy(iq, target, valid)) * acc_share
    return terms


def _total(obj, loss: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    lc = obj.loss_cfg
    loss = (loss + lc.fgr_weight * terms.get("fgr", 0.0) + lc.fgd_weight * terms.get("fgd", 0.0)
            + lc.mlm_weight * terms.get("mlm", 0.0))
    out = {"loss": loss.float()}
    out.update({k: v.detach().float() for k, v in terms.items()})
    return out


def _surrogate(model, cache: _Cache, sl: slice, img_emb: Tensor, txt_emb: Tensor, n_rows: int) -> Tensor:
    """<emb, cached d(loss)/d(emb)> for the chunk's rows (+ the logit scale's share): its backward puts the
    contrastive terms' gradient into the towers."""
    loss = img_emb.new_zeros((), dtype=torch.float32)
    if cache.g_img is not None:
        rows = sl.stop - sl.start
        loss = (loss + (img_emb.float() * cache.g_img[sl].float()).sum()
                + (txt_emb.float() * cache.g_txt[sl].float()).sum()
                + model.logit_scale() * cache.g_scale * (rows / n_rows))
    return loss


def chunk_pass(obj, batch: dict, teacher, cache: _Cache, c: int, negatives: str) -> dict[str, Tensor]:
    """Pass 2 of the "reembed"/"detached" modes for chunk `c`, inside the engine's forward with gradient."""
    model = obj.model
    f = _flags(obj, teacher)
    sl = cache.chunks[c]
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    terms: dict[str, Tensor] = {}
    with _replay_rng(cache.rng[c], ids.device):
        # The replayed stream: these towers see pass 1's dropout masks; what follows continues the same stream.
        img_tokens, img_emb = model.encode_image(image[sl], cache_keys=_keys(batch.get("image_id"), sl))
        txt_tokens, txt_emb = model.encode_text(ids[sl], mask[sl])  # (B_c, L, Wt), (B_c, D)
        loss = _surrogate(model, cache, sl, img_emb, txt_emb, ids.shape[0])
        terms.update(_masked_text_terms(obj, batch, teacher, cache, sl, img_tokens, f))
        if f["fgr"]:
            nt, ni = cache.neg_txt[sl], cache.neg_img[sl]
            (t_idx, t_rows), (i_idx, i_rows) = _negative_rows(nt, cache, sl), _negative_rows(ni, cache, sl)
            # Collective over the FGR group: every rank plans once per chunk, in the same order, even with no
            # requests. Raw inputs travel (pixels, ids, mask), only the chosen rows, no autograd.
            t_plan, i_plan = plan_row_exchanges([t_rows, i_rows], cache.sizes, cache.group)
            t_ids, t_mask, i_image = t_plan.fetch(ids), t_plan.fetch(mask), i_plan.fetch(image)
            neg_txt_tok = _negative_tokens(lambda i, m: model.encode_text(i, m)[0], [t_ids, t_mask],
                                           [ids[sl], mask[sl]], t_idx, txt_tokens, negatives)
            neg_img_tok = _negative_tokens(lambda x: model.encode_image(x)[0], [i_image], [image[sl]], i_idx,
                                           img_tokens, negatives)
            neg_mask = torch.cat([mask[sl], t_mask])[t_idx]
            terms.update(_itm_terms(obj, cache, sl, (img_tokens, txt_tokens, mask[sl]),
                                    (neg_img_tok, neg_txt_tok, neg_mask)))
    return _total(obj, loss, terms)


# ------------------------------------------------------------------------- "cached" negatives: passes 2 and 3
def _leaf_rows(tokens: Tensor, pos_rows: Tensor, plan: RowExchange) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows of the token cache `tokens` (B, ...) one ranking chunk touches, as ONE small leaf with gradient.

    Rows: the chunk's positives `pos_rows`, its negatives held by this rank (`plan.local_rows`) and the rows other
    ranks asked this rank for (`plan.send_rows`). Returns (rows (U,) sorted rank-batch rows, leaf (U, ...), the
    positives' tokens, the negatives' tokens (R, ...) in request order). The negatives come through the
    plan's exchange on the leaf: its backward returns a remote negative's gradient to the owner rank's leaf
    row (a collective in the backward). A leaf of U rows instead of the whole cache keeps autograd's
    index/slice backward buffers at chunk size (a (B, ...) leaf would allocate a zero-filled (B, ...) gradient
    per use per chunk)."""
    rows = torch.unique(torch.cat([pos_rows, plan.local_rows, plan.send_rows]))  # sorted
    leaf = tokens.index_select(0, rows).requires_grad_(True)
    at = functools.partial(torch.searchsorted, rows)
    on_leaf = dataclasses.replace(plan, local_rows=at(plan.local_rows), send_rows=at(plan.send_rows))
    return rows, leaf, leaf.index_select(0, at(pos_rows)), on_leaf.fetch(leaf)


def _zero_touch(obj, batch: dict) -> Tensor:
    """0 x (a one-row pass through every trainable part the ranking pass does not reach: towers, projections,
    temperature, MLM head): exact zero gradients. Added to the FIRST micro step of a step under ZeRO-3, whose
    gradient partitions are copied (not added) only in a step's micro step 0 (stage3.py `partition_grads`,
    `micro_step_id == 0`): a parameter whose first gradient of the step came later would be ADDED to the
    previous step's stale partition. Forked RNG: the global stream stays where it was."""
    model, lc = obj.model, obj.loss_cfg
    device = batch["input_ids"].device
    with _replay_rng(_rng_state(device), device):
        _, img_emb = model.encode_image(batch["image"][:1])
        txt_tokens, txt_emb = model.encode_text(batch["input_ids"][:1], batch["attention_mask"][:1])
        z = img_emb.float().sum() + txt_emb.float().sum() + model.logit_scale()
        if lc.mlm_weight > 0:
            z = z + model.mlm_logits(txt_tokens[:, 0]).float().sum()
    return 0.0 * z


def rank_pass(obj, batch: dict, teacher, cache: _Cache, c: int, touch: bool = False) -> dict[str, Tensor]:
    """"cached" pass 2 for chunk `c`: both cross encoders on its positives and hard negatives, from leaves of the
    token cache (no tower runs). The leaves are left in `cache.leaves` for the driver to collect their
    gradients after the engine's backward. Every rank runs the same modules and collectives every chunk.
    `touch`: add `_zero_touch` (ZeRO-3, first chunk)."""
    sl = cache.chunks[c]
    mask = batch["attention_mask"]
    device = mask.device
    nt, ni = cache.neg_txt[sl], cache.neg_img[sl]
    # A row without a negative asks for its own row: served locally, no traffic, loss masked by `valid`.
    own = torch.arange(cache.offset + sl.start, cache.offset + sl.stop, device=device)
    t_plan, i_plan = plan_row_exchanges([torch.where(nt >= 0, nt, own), torch.where(ni >= 0, ni, own)],
                                        cache.sizes, cache.group)  # collective: one counts all-to-all for both
    pos_rows = torch.arange(sl.start, sl.stop, device=device)
    t_rows, t_leaf, txt_pos, neg_txt_tok = _leaf_rows(cache.txt_tok, pos_rows, t_plan)
    i_rows, i_leaf, img_pos, neg_img_tok = _leaf_rows(cache.img_tok, pos_rows, i_plan)
    neg_mask = t_plan.fetch(mask)
    cache.leaves = [(t_rows, t_leaf, "txt"), (i_rows, i_leaf, "img")]
    # The cross encoders' dropout draws from the global stream (once per step, like every other draw here).
    terms = _itm_terms(obj, cache, sl, (img_pos, txt_pos, mask[sl]), (neg_img_tok, neg_txt_tok, neg_mask))
    zero = _zero_touch(obj, batch) if touch else txt_pos.new_zeros((), dtype=torch.float32)
    return _total(obj, zero, terms)


def tower_pass(obj, batch: dict, teacher, cache: _Cache, c: int) -> dict[str, Tensor]:
    """"cached" pass 3 for chunk `c`: the towers again with gradient (pass 1's RNG state: its dropout masks, so
    these ARE the activations the cached gradients belong to), back-propagating the cached embedding and token
    gradients, plus MLM/FgD on the chunk's masked texts."""
    model = obj.model
    f = _flags(obj, teacher)
    sl = cache.chunks[c]
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    with _replay_rng(cache.rng[c], ids.device):
        img_tokens, img_emb = model.encode_image(image[sl], cache_keys=_keys(batch.get("image_id"), sl))
        txt_tokens, txt_emb = model.encode_text(ids[sl], mask[sl])  # (B_c, L, Wt), (B_c, D)
    loss = _surrogate(model, cache, sl, img_emb, txt_emb, ids.shape[0])
    if cache.g_img_tok is not None:  # FGR's gradient w.r.t. the tokens, from every chunk on every rank
        loss = (loss + (img_tokens.float() * cache.g_img_tok[sl]).sum()
                + (txt_tokens.float() * cache.g_txt_tok[sl]).sum())
    # Outside the replay: the masked-text tower and the text-query encoder draw from the global stream.
    return _total(obj, loss, _masked_text_terms(obj, batch, teacher, cache, sl, img_tokens, f))


def _loss_scale(engine) -> float:
    """The factor the engine's backward multiplies the loss by (fp16 loss scaling; 1 for bf16/fp32): the token
    gradients read back from the leaves carry it and must not carry it twice into pass 3."""
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
    return float(scale) if scale is not None else 1.0


# ------------------------------------------------------------------------------------------- the driver
class GradCache:
    """Runs one GradCache pass (pass 1, then engine micro steps per chunk) on a DeepSpeed engine whose module is
    an R2D2Pretraining and whose gradient_accumulation_steps is `plan.engine_accum`."""

    def __init__(self, plan: BatchPlan, negatives: str | None = None) -> None:
        negatives = plan.negatives if negatives is None else negatives
        if negatives not in NEGATIVE_MODES:
            raise ConfigError(f"config key 'train.gradcache_negatives': must be one of {NEGATIVE_MODES}, "
                              f"got {negatives!r}")
        if negatives != plan.negatives:  # the plan's engine_accum counts the mode's micro steps
            raise ValueError(f"GradCache: negatives={negatives!r} but the batch plan was made for "
                             f"{plan.negatives!r} (plan_batch reads train.gradcache_negatives)")
        if not plan.gradcache:
            raise ValueError("GradCache needs plan.chunk_size > 0")
        self.plan = plan
        self.negatives = negatives

    def _micro_step(self, engine, batch, teacher, seed, autocast, run, sums: dict) -> None:
        """One engine micro step: forward (running `run` inside the engine's forward), its one backward, step."""
        with autocast():
            out = engine(batch, teacher, seed, run=run)
        # The chunk losses add up to the pass's loss; passes are averaged as plain accumulation does.
        engine.backward(out.pop("loss") / self.plan.grad_accum, scale_wrt_gas=False)
        engine.step()
        for k, v in out.items():
            sums[k] = sums[k] + v if k in sums else v

    def step(self, engine, batch: dict, teacher, seed: int, autocast=contextlib.nullcontext) -> dict[str, Tensor]:
        """One pass over `batch` (the rank batch): plan.micro_per_chunk x len(chunks) engine micro steps, each with
        its backward and `engine.step()` (the engine applies the optimizer at its accumulation boundary). Returns
        the rank batch's loss terms for logging (detached)."""
        chunks = self.plan.chunks()
        if batch["input_ids"].shape[0] != self.plan.rank_batch:
            raise ValueError(f"GradCache: batch of {batch['input_ids'].shape[0]} rows, the plan expects "
                             f"{self.plan.rank_batch}")
        fgr = engine.module.loss_cfg.fgr_weight > 0
        cached = self.negatives == "cached"
        if cached and fgr != self.plan.fgr:
            raise ValueError(f"GradCache: loss.fgr_weight > 0 is {fgr} but the batch plan was made for {self.plan.fgr}"
                             " (the ranking pass's micro steps are counted in the engine's accumulation)")
        ranking = cached and fgr
        with torch.no_grad(), autocast():
            cache = engine(batch, teacher, seed,
                           run=lambda obj, b, t, s: embed_pass(obj, b, t, s, chunks, keep_tokens=ranking))
        sums: dict[str, Tensor] = {}
        if not cached:
            for c in range(len(chunks)):
                self._micro_step(engine, batch, teacher, seed, autocast, sums=sums,
                                 run=lambda obj, b, t, s, c=c: chunk_pass(obj, b, t, cache, c, self.negatives))
        else:
            if ranking:  # pass 2: the cross encoders, chunk by chunk; token gradients collected in fp32
                cache.g_img_tok = torch.zeros(cache.img_tok.shape, dtype=torch.float32, device=cache.img_tok.device)
                cache.g_txt_tok = torch.zeros(cache.txt_tok.shape, dtype=torch.float32, device=cache.txt_tok.device)
                # A leaf's gradient = loss scale x d(chunk loss)/d(tokens) / passes: keep d(pass loss)/d(tokens).
                unscale = self.plan.grad_accum / _loss_scale(engine)
                zero3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
                for c in range(len(chunks)):
                    self._micro_step(engine, batch, teacher, seed, autocast, sums=sums,
                                     run=lambda obj, b, t, s, c=c: rank_pass(obj, b, t, cache, c,
                                                                             touch=c == 0 and zero3))
                    for rows, leaf, kind in cache.leaves:  # incl. gradients other ranks sent back for our rows
                        g = cache.g_img_tok if kind == "img" else cache.g_txt_tok
                        g.index_add_(0, rows, leaf.grad.float(), alpha=unscale)
                    cache.leaves = []
                cache.img_tok = cache.txt_tok = None  # pass 3 needs only the gradients
            for c in range(len(chunks)):  # pass 3: the towers, chunk by chunk
                self._micro_step(engine, batch, teacher, seed, autocast, sums=sums,
                                 run=lambda obj, b, t, s, c=c: tower_pass(obj, b, t, cache, c))
        terms = {k: cache.terms[k] for k in TERMS}
        terms.update({k: v for k, v in sums.items() if k in terms})
        lc = engine.module.loss_cfg
        a = lc.tgd_alpha if teacher is not None and engine.module._tgd_on() else 0.0
        total = ((1.0 - a) * lc.gcpr_weight * terms["gcpr"] + a * lc.tgd_weight * terms["tgd"]
                 + lc.fgr_weight * terms["fgr"] + lc.fgd_weight * terms["fgd"] + lc.mlm_weight * terms["mlm"])
        out = {"loss": total.detach().float()}
        out.update({f"loss/{k}": v.float() for k, v in terms.items()})
        out["acc/itm"] = sums.get("acc", total.new_zeros(())).float()
        if "remote_frac" in cache.terms:  # share of FGR negatives that live on other ranks
            out["fgr/remote_frac"] = cache.terms["remote_frac"].float()
        out["logit_scale"] = cache.scale.float()
        return out
