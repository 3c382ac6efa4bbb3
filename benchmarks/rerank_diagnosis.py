"""How the two stages rank inside each query's top-k: the evidence for the re-rank score (results/flickr8k-cn.md).

  python benchmarks/rerank_diagnosis.py --model runs/demo/model --data .cache/data/synthetic --split test

For an exported model on one split it prints, over the top-k candidates of every query (the ones re-ranking
reorders): the spread (std) of the cosine, of the mean ITM match probability (the released score adds these two),
of the ITM log-odds and of the scaled cosine (the fused score adds these two); and, for text queries whose image
is among the candidates, the probability that the positive scores above a negative by ITM and by cosine
(a within-top-k AUC: which stage orders the candidates better), for the mean of the two cross encoders'
log-odds and for each alone.
"""

from __future__ import annotations

import argparse
import sys

import torch

import r2d2ds  # noqa: F401  (torchvision shim before timm)
from r2d2ds.data import load_retrieval_split
from r2d2ds.model_dir import load_model_dir
from r2d2ds.rerank import RerankScore, itm_scorer, rerank


def within_topk_auc(scores: torch.Tensor, is_pos: torch.Tensor) -> float:
    """scores (Q, k), is_pos (Q, k) bool -> mean over queries with one positive and >= 1 negative of
    P(positive's score > a negative's score)."""
    keep = is_pos.any(1) & (~is_pos).any(1)
    s, p = scores[keep], is_pos[keep]
    pos_score = (s * p).sum(1) / p.sum(1)  # (Q,) (one positive per query in t2i)
    above = (pos_score[:, None] > s) & ~p
    return (above.sum(1).float() / (~p).sum(1).float()).mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    model, tok, cfg = load_model_dir(args.model, device="cpu")
    split = load_retrieval_split(args.data, args.split, tok, cfg.data.image_size, max_text_len=cfg.data.max_text_len,
                                 limits=cfg.data)
    with torch.no_grad():
        it, ie = model.encode_image(split.images)
        tt, te = model.encode_text(split.input_ids, split.attention_mask)
        scale = float(model.logit_scale())
        t2i, i2t = rerank(ie.float() @ te.float().t(), args.topk,
                          itm_scorer(model, it, tt, split.attention_mask, args.batch_size), RerankScore("released"))
    print(f"{args.model} on '{args.split}', top-{args.topk}, logit scale {scale:.3g}; std over each query's "
          "candidates, mean over queries:")
    for name, r in (("text->image", t2i), ("image->text", i2t)):
        s, lo = r.cand_sim, r.itm.mean(-1)
        print(f"  {name}: cosine {s.std(1).mean():.3f}, mean ITM probability "
              f"{torch.sigmoid(r.itm).mean(-1).std(1).mean():.3f} | ITM log-odds {lo.std(1).mean():.2f}, "
              f"scaled cosine {(scale * s).std(1).mean():.2f}")
    is_pos = t2i.cand == torch.as_tensor(split.text_to_image)[:, None]
    print(f"  text->image, positive among the candidates for {100 * is_pos.any(1).float().mean():.1f}% of queries; "
          f"P(positive above a negative): ITM log-odds {within_topk_auc(t2i.itm.mean(-1), is_pos):.3f}, "
          f"cosine {within_topk_auc(t2i.cand_sim, is_pos):.3f}")
    # The score averages the two heads' log-odds: if one head ranks far better, the mean dilutes it.
    print(f"  text->image, P(positive above a negative) by head: text-query "
          f"{within_topk_auc(t2i.itm[..., 0], is_pos):.3f}, image-query {within_topk_auc(t2i.itm[..., 1], is_pos):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
