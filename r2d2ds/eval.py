"""Two-stage retrieval evaluation (pre-rank with the towers, re-rank the top-k with both cross encoders).

Protocol (yuxie11/R2D2's, with our score): sim = cosine(f_I, f_T); for every query the top-k candidates by
sim are re-scored (eval.rerank, r2d2ds/rerank.py): by default the fused score mean ITM log-odds + w x logit
scale x sim, with w chosen on eval.calibration_split when one is given (`evaluate_calibrated`), or the released
sim + mean ITM match probability; everything outside the top-k keeps its pre-rank order below the re-ranked
ones. k = min(topk, #candidates). The two-stage MR at every w of eval.rerank_weights is reported as well
(`two_stage_mr_by_weight`, from the same ITM scores: no extra cross-encoder pass). Reported as Recall@1/5/10
for text->image and image->text (an image counts as found when ANY of its captions is in the top K, the
Flickr/COCO protocol) and their mean (MR), for the two-tower stage alone and for the two stages, as percentages.

Several ranks: every rank holds the same split; rank r embeds its contiguous slice of images and texts, and
embeddings and tokens are all-gathered so every rank has the full similarity matrix and every candidate's
tokens. Re-ranking is split by query slices and only the per-query hit positions are gathered. Under ZeRO-3 a
module's parameters are gathered collectively in its forward hooks, so every rank makes the same number of
forward calls of every module: slices are padded to the same number of full batches (the last row repeated,
its result dropped).

Memory: all image tokens (N, N_tok, W_img) and text tokens (T, L, W_txt) are kept on the compute device,
because every one of them is somebody's candidate and recomputing tokens per pair would cost k tower passes
per query.
For Flickr30k-CN/COCO-CN test splits with ViT-L that is a few GiB.

Command: `python -m r2d2ds.eval --model EXPORT_DIR --data SPEC [--split val] [--topk K] [--batch-size N]
[--max-images N] [--out eval.json]`; under torchrun/deepspeed with WORLD_SIZE > 1 it joins the process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from r2d2ds.config import EvalConfig
from r2d2ds.distributed import all_gather_variable, get_rank, get_world_size, is_main_process
from r2d2ds.fileio import atomic_write_text
from r2d2ds.rerank import RerankScore, itm_scorer, padded_batches, rerank

RECALL_KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_r{k}" for d in ("t2i", "i2t") for k in RECALL_KS) + ("mr",)

# ------------------------------------------------------------------------------------------------------------
# Recall.


def hit_positions_t2i(order: Tensor, gt_image: Tensor) -> Tensor:
    """order (Q, N_img) image ids per text query, gt_image (Q,) -> (Q,) 0-based position of the own image."""
    hit = order == gt_image[:, None]
    return hit.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index


def hit_positions_i2t(order: Tensor, image_ids: Tensor, text_to_image: Tensor) -> Tensor:
    """order (Q, T) text ids per image query -> (Q,) position of the image's first caption, -1 if none."""
    hit = text_to_image[order] == image_ids[:, None]  # (Q, T)
    pos = hit.to(torch.uint8).argmax(dim=1)
    return torch.where(hit.any(dim=1), pos, torch.full_like(pos, -1))


def recalls(t2i_pos: Tensor, i2t_pos: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K in percent from hit positions; i2t queries with position -1 (no caption) are left out. MR is
    the mean of all the recalls."""
    out: dict[str, float] = {}
    i2t_pos = i2t_pos[i2t_pos >= 0]
    for name, pos in (("t2i", t2i_pos), ("i2t", i2t_pos)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (pos < k).double().mean().item() if pos.numel() else 0.0
    out["mr"] = sum(out.values()) / len(out)
    return out


# ------------------------------------------------------------------------------------------------------------
# Evaluation.


def shard(n: int, world: int, rank: int) -> slice:
    """Contiguous slice of range(n) for `rank`: the first n % world ranks get one row more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _encode_all(encode: Callable[[Tensor], tuple[Tensor, Tensor]], n: int, batch_size: int,
                device: torch.device, group=None) -> tuple[Tensor, Tensor]:
    """Run `encode(idx)` over this rank's slice of range(n) in lockstep batches and all-gather (tokens, emb)
    of every row, so each rank ends with all n rows in global order."""
    world, rank = get_world_size(group), get_rank(group)
    slices = [shard(n, world, r) for r in range(world)]
    mine = slices[rank]
    n_mine = mine.stop - mine.start
    num_batches = math.ceil(max(s.stop - s.start for s in slices) / batch_size)  # same on every rank
    tokens = emb = None
    for b, (idx, valid) in enumerate(padded_batches(n_mine, batch_size, num_batches, torch.device("cpu"))):
        # An empty slice (n < world) encodes row 0 and keeps nothing: it still joins the forward (ZeRO-3).
        tok_b, emb_b = encode(idx + mine.start if n_mine else torch.zeros_like(idx))
        tok_all = all_gather_variable(tok_b[:valid], group)  # rank-major rows of batch b
        emb_all = all_gather_variable(emb_b[:valid], group)
        if tokens is None:
            tokens = tok_b.new_empty((n, *tok_b.shape[1:]), device=device)
            emb = emb_b.new_empty((n, *emb_b.shape[1:]), device=device)
        # Batch b of rank r holds rows s_r.start + b*bs ... of its slice; place them at their global index.
        dst = torch.cat([torch.arange(s.start + b * batch_size,
                                      min(s.stop, s.start + (b + 1) * batch_size)) for s in slices])
        tokens[dst.to(device)] = tok_all.to(device)
        emb[dst.to(device)] = emb_all.to(device)
    return tokens, emb


def _gathered_recalls(t2i_order: Tensor, i2t_order: Tensor, gt_q: Tensor, img_ids: Tensor, gt: Tensor,
                      group) -> dict[str, float]:
    """Recalls of this rank's query slices' orders, gathered over `group` (every rank gets all queries')."""
    t2i_pos = hit_positions_t2i(t2i_order, gt_q)
    i2t_pos = hit_positions_i2t(i2t_order, img_ids, gt)
    return recalls(all_gather_variable(t2i_pos, group).cpu(), all_gather_variable(i2t_pos, group).cpu())


def evaluate(model: nn.Module, split: Any, eval_cfg: EvalConfig, device: torch.device | str | None = None,
             group=None, weight: float | None = None) -> dict[str, Any]:
    """Two-tower and two-stage Recall@1/5/10 (percent) of `model` (an R2D2) on a retrieval split.

    `split` has images (N, 3, H, W) float, input_ids / attention_mask (T, L) and text_to_image (T,) int64.
    `weight`: the fused score's w (default eval_cfg.rerank_weight). Every rank of `group` must call this with
    the same split; all get the same metrics.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    world, rank = get_world_size(group), get_rank(group)
    images, input_ids, attention_mask = split.images, split.input_ids, split.attention_mask
    text_to_image = torch.as_tensor(split.text_to_image, dtype=torch.long)
    n_img, n_txt = int(images.shape[0]), int(input_ids.shape[0])
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval split is empty ({n_img} images, {n_txt} texts)")
    if text_to_image.shape[0] != n_txt or int(text_to_image.max()) >= n_img or int(text_to_image.min()) < 0:
        raise ValueError("split.text_to_image must give, for every text, the index of its image")
    bs = eval_cfg.batch_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            img_tok, img_emb = _encode_all(lambda i: model.encode_image(images[i].to(device)), n_img, bs,
                                           device, group)
            txt_tok, txt_emb = _encode_all(
                lambda i: model.encode_text(input_ids[i].to(device), attention_mask[i].to(device)),
                n_txt, bs, device, group)
            # Cosine in fp32; the fused score multiplies it by the learned logit scale itself.
            sim = img_emb.float() @ txt_emb.float().t()  # (N_img, T)
            scale = float(model.logit_scale())
            score = RerankScore(eval_cfg.rerank, eval_cfg.rerank_weight if weight is None else weight, scale)
            mask = attention_mask.to(device)
            scorer = itm_scorer(model, img_tok, txt_tok, mask, bs, lockstep=True, group=group)
            text_rows, image_rows = shard(n_txt, world, rank), shard(n_img, world, rank)
            t2i, i2t = rerank(sim, eval_cfg.topk, scorer, score, text_rows=text_rows, image_rows=image_rows)
            gt = text_to_image.to(device)
            args = (gt[text_rows], torch.arange(n_img, device=device)[image_rows], gt, group)
            out: dict[str, Any] = {"two_tower": _gathered_recalls(t2i.pre_order, i2t.pre_order, *args),
                                   "two_stage": _gathered_recalls(t2i.order, i2t.order, *args)}
            # The same ITM scores under every w of the grid: what calibration chooses from, and the evidence of
            # how much each stage contributes (w = 0: the cross encoders alone; large w: the towers' order).
            by_weight = []  # [[w, two-stage MR], ...] in the grid's order
            for w in eval_cfg.rerank_weights if eval_cfg.rerank == "fused" else ():
                s_w = RerankScore("fused", w, scale)
                by_weight.append([w, _gathered_recalls(t2i.reorder(s_w), i2t.reorder(s_w), *args)["mr"]])
    finally:
        model.train(was_training)
    out.update(num_images=n_img, num_texts=n_txt, topk=eval_cfg.topk,
               topk_effective={"t2i": min(eval_cfg.topk, n_img), "i2t": min(eval_cfg.topk, n_txt)},
               rerank={"mode": score.mode, "weight": score.weight, "logit_scale": scale},
               two_stage_mr_by_weight=by_weight)
    return out


def best_weight(mr_by_weight: list[list[float]]) -> float:
    """The w of [[w, MR], ...] with the highest two-stage MR; ties go to the larger w (closer to the towers'
    own order)."""
    if not mr_by_weight:
        raise ValueError("no two-stage MR per weight to choose from (eval.rerank must be 'fused')")
    return max((mr, w) for w, mr in mr_by_weight)[1]


def evaluate_calibrated(model: nn.Module, split: Any, eval_cfg: EvalConfig, calibration: Any | None,
                        device: torch.device | str | None = None, group=None) -> dict[str, Any]:
    """`evaluate` on `split`, with the fused score's w first chosen on the `calibration` split (by its
    two-stage MR over eval_cfg.rerank_weights) when one is given and eval.rerank is fused; metrics["calibration"]
    records the choice and the calibration split's whole MR curve."""
    if calibration is None or eval_cfg.rerank != "fused":
        return evaluate(model, split, eval_cfg, device=device, group=group)
    cal = evaluate(model, calibration, eval_cfg, device=device, group=group)
    w = best_weight(cal["two_stage_mr_by_weight"])
    out = evaluate(model, split, eval_cfg, device=device, group=group, weight=w)
    # two_stage_mr: the calibration split's MR at the chosen w (cal["two_stage"] was scored at the configured w).
    out["calibration"] = {"split": eval_cfg.calibration_split, "weight": w,
                          "two_tower_mr": cal["two_tower"]["mr"],
                          "two_stage_mr": dict(cal["two_stage_mr_by_weight"])[w],
                          "two_stage_mr_by_weight": cal["two_stage_mr_by_weight"]}
    return out


# ------------------------------------------------------------------------------------------------------------
# Reporting.


def _rerank_note(metrics: dict[str, Any]) -> str:
    r = metrics.get("rerank")
    if not r:
        return ""
    if r["mode"] == "released":
        return ", re-rank: released (cosine + ITM probability)"
    cal = metrics.get("calibration")
    where = f" chosen on '{cal['split']}'" if cal else ""
    return f", re-rank: ITM log-odds + {r['weight']:g}{where} x {r['logit_scale']:.3g} x cosine"


def format_table(metrics: dict[str, Any]) -> str:
    """Rows two-tower / two-stage; columns t2i R@1 R@5 R@10, i2t R@1 R@5 R@10, MR (percent)."""
    head = (f"{'stage':<10} | {'t2i R@1':>7} {'R@5':>6} {'R@10':>6} | "
            f"{'i2t R@1':>7} {'R@5':>6} {'R@10':>6} | {'MR':>6}")
    lines = [f"retrieval: {metrics.get('num_images', '?')} images, {metrics.get('num_texts', '?')} texts, "
             f"top-k {metrics.get('topk', '?')}{_rerank_note(metrics)}", head, "-" * len(head)]
    for key, label in (("two_tower", "two-tower"), ("two_stage", "two-stage")):
        m = metrics.get(key)
        if m is None:
            continue
        lines.append(f"{label:<10} | {m['t2i_r1']:7.2f} {m['t2i_r5']:6.2f} {m['t2i_r10']:6.2f} | "
                     f"{m['i2t_r1']:7.2f} {m['i2t_r5']:6.2f} {m['i2t_r10']:6.2f} | {m['mr']:6.2f}")
    return "\n".join(lines)


def print_table(metrics: dict[str, Any], file=None) -> None:
    print(format_table(metrics), file=file or sys.stdout, flush=True)


def write_eval_json(metrics: dict[str, Any], path: str | Path) -> None:
    """Write `metrics` as JSON atomically (temp file, then os.replace): no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------------
# Command line.


def _init_distributed_from_env() -> bool:
    """Join the process group when launched by torchrun/deepspeed with WORLD_SIZE > 1; True when we did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r2d2ds.eval",
                                description="Two-stage retrieval evaluation of an exported R2D2 model.")
    p.add_argument("--model", required=True, help="export directory written by r2d2ds.export")
    p.add_argument("--data", required=True, help="dataset spec (directory, manifest or shards)")
    p.add_argument("--split", default="val", help="split name (default: val)")
    p.add_argument("--topk", type=int, default=None, help="re-ranked per query (default: config's)")
    p.add_argument("--batch-size", type=int, default=None, help="rows/pairs per forward (default: config's)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images (0: all)")
    p.add_argument("--rerank", choices=("fused", "released"), default=None,
                   help="re-rank score (default: the model's config, eval.rerank)")
    p.add_argument("--rerank-weight", type=float, default=None,
                   help="fused score's weight of the towers' logit (default: the model's, as calibrated in training)")
    p.add_argument("--calibration-split", default=None,
                   help="choose the weight on this split of --data first (never the evaluated --split)")
    p.add_argument("--out", default="eval.json", help="metrics JSON path (default: eval.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from r2d2ds.config import ConfigError
    from r2d2ds.model_dir import ModelDirError, load_model_dir

    joined = _init_distributed_from_env()
    try:
        if args.device:
            device = args.device
        elif torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        else:
            device = "cpu"
        try:
            model, tokenizer, cfg = load_model_dir(args.model, device=device)
        except (FileNotFoundError, ModelDirError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        pick = lambda arg, default: arg if arg is not None else default
        try:
            eval_cfg = dataclasses.replace(
                cfg.eval, topk=pick(args.topk, cfg.eval.topk), batch_size=pick(args.batch_size, cfg.eval.batch_size),
                max_images=pick(args.max_images, cfg.eval.max_images), rerank=pick(args.rerank, cfg.eval.rerank),
                rerank_weight=pick(args.rerank_weight, cfg.eval.rerank_weight),
                calibration_split=pick(args.calibration_split, ""))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if eval_cfg.calibration_split and eval_cfg.calibration_split == args.split:
            print(f"error: --calibration-split must differ from --split ({args.split!r}): a weight chosen on the "
                  "reported split overstates it", file=sys.stderr)
            return 2
        if not (os.path.exists(args.data) or any(c in args.data for c in "{*")):
            print(f"error: dataset '{args.data}' does not exist", file=sys.stderr)
            return 2
        from r2d2ds.data import load_retrieval_split

        load = lambda name: load_retrieval_split(args.data, name, tokenizer, cfg.data.image_size,
                                                 max_images=eval_cfg.max_images, max_text_len=cfg.data.max_text_len,
                                                 limits=cfg.data)
        calibration = load(eval_cfg.calibration_split) if eval_cfg.calibration_split else None
        metrics = evaluate_calibrated(model, load(args.split), eval_cfg, calibration, device=device)
        if is_main_process():
            print_table(metrics)
            write_eval_json(metrics, args.out)
            print(f"wrote {args.out}", flush=True)
        return 0
    finally:
        if joined:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
