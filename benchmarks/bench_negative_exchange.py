"""FGR's negative tokens across ranks: gather-everything (released R2D2) vs our exchange of the chosen rows.

Per rank and step, with W ranks, local batch b and S bytes per sample's token set (image tokens + text tokens
+ attention mask), forward (the backward moves the same amounts again, reversed):

  gather-everything  all-gathers every rank's token tensors: receives (W - 1) b S, holds W b S.
  exchange           receives only the chosen rows of other ranks: one image per local text and one text per
                     local image, deduplicated, so at most b S (b image + b text token sets) and (W - 1) / W b S
                     for a uniform choice; plus 8 bytes per requested id and 2 x 8 W bytes of counts.

Measured: 2 gloo ranks on the CPU (fp32), one fresh process group per method, negatives drawn uniformly over the
other rows of the global batch; bytes from the exchange's own counts; extra peak memory = VmHWM during one
forward+backward of the fetch minus VmRSS before it (after a warm-up, MALLOC_MMAP_THRESHOLD_=65536).
Computed with the same formula: 8, 64 and 512 GPUs at ViT-L/14 (257 x 1024) and ViT-B/16 (197 x 768) image
tokens + BERT-base text tokens (64 x 768 + an int64 mask), bf16 features, b = 64 (32k global batch at 512).

    python benchmarks/bench_negative_exchange.py             # -> benchmarks/results/cpu/negative_exchange.*
    python benchmarks/bench_negative_exchange.py --local-batch 8 --out scratch/
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository (tests/)
from bench_contrastive_memory import RESULTS  # noqa: E402
from hostinfo import host, status_kib  # noqa: E402

MODELS = {"ViT-L/14": (257, 1024), "ViT-B/16": (197, 768)}
TEXT = (64, 768)  # BERT-base, max length 64


def sample_bytes(model: str, feat_bytes: int, mask_bytes: int = 8) -> dict[str, int]:
    n, w = MODELS[model]
    lt, wt = TEXT
    return {"image": n * w * feat_bytes, "text": lt * wt * feat_bytes + lt * mask_bytes}


def formula(world: int, b: int, model: str, feat_bytes: int) -> dict:
    """Per-rank bytes received and token memory held, both methods (module docstring)."""
    s = sample_bytes(model, feat_bytes)
    per = s["image"] + s["text"]
    return {"world": world, "local_batch": b, "model": model, "bytes_per_sample": per,
            "gather_recv": (world - 1) * b * per, "gather_held": world * b * per,
            "exchange_recv_max": b * per + 2 * b * 8 + 4 * world * 8,
            "exchange_recv_uniform": (world - 1) / world * b * per + 2 * b * 8 + 4 * world * 8,
            "exchange_held_max": b * per}


class _GatherRows(torch.autograd.Function):
    """Released R2D2 / open_clip style: all-gather forward, reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx, t, sizes):
        from r2d2ds.distributed.collectives import all_gather_rows

        ctx.sizes = sizes
        return all_gather_rows(t, sizes)

    @staticmethod
    def backward(ctx, g):
        from r2d2ds.distributed.collectives import reduce_scatter_rows

        return reduce_scatter_rows(g, ctx.sizes), None


def _rank(rank: int, world: int, port: int, out: str, method: str, b: int, model: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    from r2d2ds.distributed.exchange import plan_row_exchange

    n, w = MODELS[model]
    lt, wt = TEXT
    g = torch.Generator().manual_seed(rank)
    img = torch.randn(b, n, w, generator=g).requires_grad_()
    txt = torch.randn(b, lt, wt, generator=g).requires_grad_()
    mask = torch.ones(b, lt, dtype=torch.long)
    total, off = world * b, rank * b
    own = torch.arange(off, off + b)
    # Uniform negatives over the other rows of the global batch (the anchor's own row is its positive).
    nt = (own + 1 + torch.randint(0, total - 1, (b,), generator=g)) % total
    ni = (own + 1 + torch.randint(0, total - 1, (b,), generator=g)) % total
    sizes = [b] * world
    row = {"image": img[0].numel() * 4, "text": txt[0].numel() * 4 + mask[0].numel() * 8}

    def step() -> int:
        if method == "gather":
            neg_img = _GatherRows.apply(img, sizes)[ni]
            neg_txt = _GatherRows.apply(txt, sizes)[nt]
            _ = _GatherRows.apply(mask.float(), sizes)[nt]
            recv = (world - 1) * b * (row["image"] + row["text"])
        else:
            ip, tp = plan_row_exchange(ni, sizes), plan_row_exchange(nt, sizes)
            neg_img, neg_txt, _ = ip.fetch(img), tp.fetch(txt), tp.fetch(mask)
            recv = ip.rows_received * row["image"] + tp.rows_received * row["text"] + 8 * (
                ip.rows_received + tp.rows_received) + 4 * world * 8
        (neg_img.sum() + neg_txt.sum()).backward()
        img.grad = txt.grad = None
        return recv

    step()  # warm-up: one-time allocations (gloo buffers, autograd) are not the method's memory
    gc.collect()
    dist.barrier()
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter to the current RSS
        f.write("5")
    recv = step()
    peak = status_kib("VmHWM")
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"rank": rank, "bytes_recv": recv, "extra_peak_mib": (peak - base) / 1024}, f)
    dist.destroy_process_group()


def measure(method: str, world: int, b: int, model: str) -> list[dict]:
    from tests.dist_utils import free_port

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks: RSS follows live tensors
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, free_port(), out, method, b, model), nprocs=world, join=True,
                           start_method="spawn")
        return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]


def markdown(meta: dict, measured: list[dict], table: list[dict]) -> str:
    mib = 2 ** 20
    lines = [
        "# FGR negatives across ranks: gather-everything vs the exchange of chosen rows",
        "",
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores; python {meta['python']}, torch {meta['torch']}.",
        "Measured: 2 gloo ranks on this CPU, fp32 features, negatives uniform over the other rows, one "
        "forward+backward of the fetch per method in its own process group; bytes received per rank in the "
        "forward (the backward sends the same amount back); extra peak = VmHWM during the step minus VmRSS "
        "before it (MALLOC_MMAP_THRESHOLD_=65536).",
        "",
        "| model | W | b | method | rank | received (MiB) | formula (MiB) | extra peak (MiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in measured:
        lines.append(f"| {m['model']} | {m['world']} | {m['local_batch']} | {m['method']} | {m['rank']} | "
                     f"{m['bytes_recv'] / mib:.1f} | {m['formula_mib']} | {m['extra_peak_mib']:.1f} |")
    lines += [
        "",
        "Computed (same formula), bf16 features + int64 mask, b = 64 per GPU; per rank and forward step. "
        "Exchange: at most b image + b text token sets received (`max`), (W - 1) / W of that for a uniform "
        "choice; the gather receives (W - 1) b sets of both.",
        "",
        "| model | GPUs | global batch | gather recv (GiB) | exchange recv max (GiB) | uniform (GiB) | "
        "ratio gather / exchange max | gather holds (GiB) | exchange holds (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gib = 2 ** 30
    for r in table:
        lines.append(f"| {r['model']} | {r['world']} | {r['world'] * r['local_batch']} | "
                     f"{r['gather_recv'] / gib:.3f} | {r['exchange_recv_max'] / gib:.3f} | "
                     f"{r['exchange_recv_uniform'] / gib:.3f} | {r['gather_recv'] / r['exchange_recv_max']:.1f} | "
                     f"{r['gather_held'] / gib:.2f} | {r['exchange_held_max'] / gib:.3f} |")
    lines += ["", "Skew: the rows a rank SENDS are bounded by what others ask of it, (W - 1) b per modality in the "
              "worst case (every rank picks the same rank's rows); the exchange never gathers whole tensors, so "
              "even then no rank holds more than its own rows plus b received ones per modality."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-batch", type=int, default=16)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    measured = []
    for model in args.models:
        for method in ("gather", "exchange"):
            for r in measure(method, 2, args.local_batch, model):
                f = formula(2, args.local_batch, model, 4)
                r.update(model=model, method=method, world=2, local_batch=args.local_batch,
                         formula_mib=f"{f['gather_recv'] / 2**20:.1f}" if method == "gather" else
                         f"<= {f['exchange_recv_max'] / 2**20:.1f}")
                print(json.dumps(r), flush=True)
                measured.append(r)
    table = [formula(w, 64, model, 2) for model in MODELS for w in (8, 64, 512)]
    meta = host("torch")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "negative_exchange.json"), "w") as f:
        json.dump({"meta": meta, "measured": measured, "computed": table}, f, indent=1)
    md = markdown(meta, measured, table)
    with open(os.path.join(args.out, "negative_exchange.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
