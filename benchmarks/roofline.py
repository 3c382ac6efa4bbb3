"""Roofline of every kernel path: FLOPs, HBM bytes and transcendental ops by a written formula, and the time
predicted at the GPU's ceilings. A prediction, not a measurement: `gpu_check.sh` measures; this says what the
design can reach and where each path's time goes, before and after issue 13.

Ceilings (defaults: an H200 as `gpu_ceilings.py` measures it; pass its JSON with --ceilings to use measured ones):
  matmul   790 TFLOP/s bf16 (`bf16_matmul_tflops`), the tensor-core rate of every tl.dot / GEMM
  HBM      4.3 TB/s (`copy_gbs`: read + write bytes of a device copy per second)
  SFU      4.2 Tops/s exp / log (132 SMs x 16 MUFU ops per clock x 1.98 GHz; from the datasheet, not measured)
  INT32    16.7 Tops/s (132 SMs x 64 INT32 lanes x 1.98 GHz; datasheet) for the Philox rounds of the sampler
A kernel's predicted time is max(FLOPs / matmul, bytes / HBM, exp / SFU, int / INT32) divided by its SM fill
(min(1, programs / SMs): a grid with fewer programs than SMs leaves SMs idle), and a path's time is the sum over
its kernels (they run one after the other).

Notation: B rows (local batch), N columns (global batch; one GPU: N = B), D embedding width, e bytes per input
element (bf16: 2), BM x BN the logit tile (128 x 128, the first autotune config), R the panel rows of the panel
backward (launchers.panel_rows: 256 MiB of G), S the SM count. HBM traffic of a streamed operand: the programs of
one wave (S at a time) walk the same column tiles together, so L2 serves a tile to the wave and HBM delivers it
once per wave: waves(P) = ceil(P / S) reads of it.

Contrastive loss, diagonal ids, no teacher (credited 8 B N D FLOPs per forward + backward, the benchmark's rule):
  fwd "rows" (one per direction: two)                    FLOPs 2BND;  bytes BDe + waves(B/BM) N D e;  exp BN
  fwd "split" (both directions, CHUNKS x SPLITS ~ 2S programs)  FLOPs 2BND;  exp 2BN;  bytes
      ceil(B / BM / CHUNKS) N D e + SPLITS B D e + (B / BM) N 24 (column partials) + SPLITS B 12
  bwd "tiles" dx kernel (FUSE_T: both directions)        FLOPs 4BND (logits recomputed + G Y);  exp 2BN;
      bytes waves(B/BM) 2 N D e (Y twice) + B N D (8 + e) / BN: each (row block, column tile) step reads and
      writes its BM x D fp32 dx rows and rereads its x rows: 132 programs x (BM D 4 + BM D e) = 78 MB at D = 768
      does not stay in the 60 MB L2
  bwd "tiles" dy kernel                                  the same with rows and columns swapped
  bwd "panel" G kernel (per panel of R rows, B/R panels)  FLOPs 2BND;  exp 2BN;
      bytes (B/R) N D e (Y once per panel) + B D e + B N e (G written once, input dtype)
  bwd "panel" dX GEMM  dX = G Y                           FLOPs 2BND;  bytes B N e + (B/R) N D e + B D e
  bwd "panel" dY GEMM  dY (+)= G^T X                      FLOPs 2BND;  bytes B N e + B D e + (B/R) N D 8 (dY fp32
      read + written once per panel)
  teacher (alpha > 0): + 2BND per pass that reads the teacher logits (fwd: its LSE pass and the target term;
      bwd: G), + the teacher embeddings' bytes
  sampler (return_negatives, both directions): the forward kernels plus per logit 2 logs and Philox4x32-10
      (10 rounds x 6 INT32 ops per call): one call per logit before, one per 4 logits after (all outputs used)
Cross-attention (R2D2's ITM shapes, bf16, BH = batch x heads, Lq / Lk, Dh):
  fwd                  FLOPs 4 BH Lq Lk Dh; exp BH Lq Lk;  bytes BH (2 Lq + 2 Lk) Dh e + BH Lq 4 (LSE)
  bwd fused (all queries, Lq <= 128, or after issue 13 all keys, Lk <= 128; block x Dh <= 8192)
                       FLOPs 10 BH Lq Lk Dh (5 products); exp BH Lq Lk;
      bytes BH (3 Lq + 4 Lk) Dh e (read q dO o k v, write dq dk dv)
  bwd split            FLOPs 14 BH Lq Lk Dh (7 products: the logits and dP recomputed in both kernels);
      exp 2 BH Lq Lk; bytes BH (4 Lq + 4 Lk) Dh e + BH Lq 8 + the dK/dV kernel's rereads of q and dO per key
      block: BH ceil(Lk / BN) 2 Lq Dh e
  layout copies (before issue 13 only; now the kernels take every operand's strides)
                       fwd: q, k, v made contiguous from the projections' (B, L, H, Dh) views and the output's
                       head merge (B, H, Lq, Dh) -> (B, Lq, H*Dh); bwd: dO made contiguous and the dq, dk, dv head
                       merges; each reads and writes its tensor once: 2 BH (2 Lq + 2 Lk) Dh e per direction.
                       The strided kernels read the same bytes as the contiguous ones: a row of a (B, L, H, Dh)
                       view is Dh e = 128 contiguous bytes at Dh 64 bf16 (whole 32-byte sectors, aligned since the
                       sequence stride H Dh e is a multiple of 128), so no sector is fetched for a partial row.

    python benchmarks/roofline.py                              # prints the table
    python benchmarks/roofline.py --out benchmarks/results/roofline --ceilings OUT/ceilings.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

from r2d2ds.kernels.contrastive_loss.launchers import panel_rows

DEFAULT_CEILINGS = {"bf16_matmul_tflops": 790.0, "copy_gbs": 4300.0, "sfu_tops": 4.2, "int32_tops": 16.7, "sms": 132}
TARGET_MS = 66.0  # issue 13: forward + backward at B = 64k, D = 768, bf16 on one H200
BM = BN = 128
PHILOX_INT_OPS = 60  # Philox4x32-10: 10 rounds of 2 multiply-high/low pairs + xors + key bumps, ~6 INT32 ops each


@dataclass
class Kernel:
    name: str
    flops: float
    bytes: float
    programs: int
    exp: float = 0.0
    int_ops: float = 0.0

    def ms(self, c: dict) -> float:
        t = max(self.flops / (c["bf16_matmul_tflops"] * 1e12), self.bytes / (c["copy_gbs"] * 1e9),
                self.exp / (c["sfu_tops"] * 1e12), self.int_ops / (c["int32_tops"] * 1e12))
        return 1e3 * t / min(1.0, self.programs / c["sms"])


def waves(programs: int, sms: int) -> int:
    return math.ceil(programs / sms)


def loss_fwd(b: int, n: int, d: int, e: int, sms: int, teacher: bool = False, sample: bool = False,
             philox_per_logit: float = 0.25) -> Kernel:
    """One direction's forward kernel: rows b over columns n (LSE, target term, optional negatives drawn with
    `philox_per_logit` Philox calls per logit: 1 before issue 13, 1/4 after, all four outputs used)."""
    p = math.ceil(b / BM)
    mult = 2 if teacher else 1  # the teacher logits tile for the target term
    return Kernel("fwd", mult * 2 * b * n * d, mult * (b * d * e + waves(p, sms) * n * d * e) + 8 * b, p,
                  exp=b * n * (mult + (2 if sample else 0)),
                  int_ops=PHILOX_INT_OPS * philox_per_logit * b * n if sample else 0)


def loss_fwd_split(b: int, n: int, d: int, e: int, sms: int, teacher: bool = False) -> Kernel:
    """The split forward, both directions in one pass (single process): CHUNKS x SPLITS programs (~2 per SM);
    Y streamed once per round of CHUNKS row blocks, X once per split, the column partials (max, sum, target: 12
    bytes) read and written per (row block, column), the row partials written per split."""
    from r2d2ds.kernels.contrastive_loss.launchers import split_shape

    chunks, splits = split_shape(b, n, 2 * sms)
    mult = 2 if teacher else 1
    rounds = math.ceil(math.ceil(b / BM) / chunks)
    nbytes = mult * (rounds * n * d * e + splits * b * d * e) + math.ceil(b / BM) * n * 24 + splits * b * 12
    return Kernel("fwd both (split)", mult * 2 * b * n * d, nbytes, chunks * splits, exp=2 * mult * b * n)


def loss_bwd_tiles(b: int, n: int, d: int, e: int, sms: int, teacher: bool = False) -> list[Kernel]:
    out = []
    for name, rows, cols in (("bwd tiles dx", b, n), ("bwd tiles dy", n, b)):
        p = math.ceil(rows / BM)
        rmw = rows * cols * d * (8 + e) / BN  # fp32 accumulator read + write and x reread, per column tile
        extra = 2 * rows * cols * d if teacher else 0
        out.append(Kernel(name, 4 * rows * cols * d + extra,
                          waves(p, sms) * 2 * cols * d * e * (1.5 if teacher else 1) + rmw, p,
                          exp=(3 if teacher else 2) * rows * cols))
    return out


def loss_bwd_panel(b: int, n: int, d: int, e: int, sms: int, teacher: bool = False) -> list[Kernel]:
    r = panel_rows(b, n, e)
    panels = math.ceil(b / r)
    g_programs = math.ceil(min(r, b) / BM) * math.ceil(n / BN)
    g = Kernel("bwd panel G", (4 if teacher else 2) * b * n * d,
               panels * n * d * e * (2 if teacher else 1) + b * d * e * (2 if teacher else 1) + b * n * e,
               g_programs, exp=(3 if teacher else 2) * b * n)
    dx = Kernel("bwd panel dX=GY", 2 * b * n * d, b * n * e + panels * n * d * e + b * d * e,
                math.ceil(min(r, b) / BM) * math.ceil(d / BN))
    dy = Kernel("bwd panel dY+=G^TX", 2 * b * n * d, b * n * e + b * d * e + panels * n * d * 8,
                math.ceil(n / BM) * math.ceil(d / BN))
    return [g, dx, dy]


def loss_paths(b: int, d: int, sms: int, e: int = 2) -> dict[str, list[Kernel]]:
    """Single GPU (N = B): the Triton path before (a forward pass per direction + the tiles backward) and after
    (one split forward for both directions + the panel backward); with the teacher: its LSE passes too (before:
    one per direction; after: one split pass for both)."""
    n = b
    fwd2 = [loss_fwd(b, n, d, e, sms), loss_fwd(n, b, d, e, sms)]
    fwd2_t = [loss_fwd(b, n, d, e, sms), loss_fwd(n, b, d, e, sms),  # teacher LSE passes
              loss_fwd(b, n, d, e, sms, teacher=True), loss_fwd(n, b, d, e, sms, teacher=True)]
    both, both_t = loss_fwd_split(b, n, d, e, sms), loss_fwd_split(b, n, d, e, sms, teacher=True)
    return {"loss before (rows fwd x2, tiles bwd)": fwd2 + loss_bwd_tiles(b, n, d, e, sms),
            "loss after (split fwd, panel bwd)": [both] + loss_bwd_panel(b, n, d, e, sms),
            "loss+teacher before": fwd2_t + loss_bwd_tiles(b, n, d, e, sms, teacher=True),
            "loss+teacher after": [both, both_t] + loss_bwd_panel(b, n, d, e, sms, teacher=True),
            "sampler before (1 Philox / logit)": [loss_fwd(b, n, d, e, sms, sample=True, philox_per_logit=1),
                                                  loss_fwd(n, b, d, e, sms, sample=True, philox_per_logit=1)],
            "sampler after (1/4 Philox / logit)": [loss_fwd(b, n, d, e, sms, sample=True),
                                                   loss_fwd(n, b, d, e, sms, sample=True)]}


def _fits(length: int, dh: int) -> bool:
    block = max(16, 1 << (length - 1).bit_length())
    return block <= 128 and block * max(16, 1 << (dh - 1).bit_length()) <= 8192


def attention_paths(bh: int, lq: int, lk: int, dh: int, e: int = 2, copies: bool = False,
                    key_fused: bool = True) -> dict[str, list]:
    """Forward and backward kernels at one shape. Before issue 13: copies (the layout copies around the kernels)
    and no key-fused backward; after: neither copies nor the split backward at Lk <= 128."""
    fused = _fits(lq, dh) or (key_fused and _fits(lk, dh))
    fwd = Kernel("fwd", 4 * bh * lq * lk * dh, bh * (2 * lq + 2 * lk) * dh * e + bh * lq * 4,
                 bh * math.ceil(lq / 64), exp=bh * lq * lk)
    if fused:
        bwd = [Kernel("bwd fused", 10 * bh * lq * lk * dh, bh * (3 * lq + 4 * lk) * dh * e + bh * lq * 4, bh,
                      exp=bh * lq * lk)]
    else:
        bwd = [Kernel("bwd split", 14 * bh * lq * lk * dh,
                      bh * (4 * lq + 4 * lk) * dh * e + bh * lq * 8 + bh * math.ceil(lk / 64) * 2 * lq * dh * e,
                      bh * math.ceil(lk / 64), exp=2 * bh * lq * lk)]
    fwd = [fwd]
    if copies:  # a copy kernel fills every SM (programs: any number past the SM count)
        copy_bytes = 2 * bh * (2 * lq + 2 * lk) * dh * e
        fwd.append(Kernel("copies q k v + merge o", 0, copy_bytes, 10**6))
        bwd.append(Kernel("copies dO + merge dq dk dv", 0, copy_bytes, 10**6))
    return {"fwd": fwd, "bwd": bwd}


def table(ceilings: dict | None = None) -> dict:
    c = {**DEFAULT_CEILINGS, **(ceilings or {})}
    rows = []
    for b in (16 * 1024, 64 * 1024, 256 * 1024):
        for d in (512, 768):
            credited = 8.0 * b * b * d
            for path, kernels in loss_paths(b, d, c["sms"]).items():
                ms = sum(k.ms(c) for k in kernels)
                row = {"op": "contrastive", "path": path, "B": b, "D": d,
                       "tflop": sum(k.flops for k in kernels) / 1e12, "gb": sum(k.bytes for k in kernels) / 1e9,
                       "ms": ms, "kernels": {k.name: round(k.ms(c), 2) for k in kernels}}
                if path.startswith("loss"):  # forward + backward: the benchmark's 8 B^2 D credit
                    row["credited_tflops"] = credited / (ms * 1e-3) / 1e12
                rows.append(row)
    for name, (batch, lq, lk) in {"text-query (ITM)": (3 * 512, 64, 257),
                                  "image-query (ITM)": (3 * 512, 257, 64)}.items():
        for when, after in (("before", False), ("after", True)):
            for path in ("fwd", "bwd"):
                kernels = attention_paths(batch * 12, lq, lk, 64, copies=not after, key_fused=after)[path]
                rows.append({"op": "cross_attention", "path": f"{name} {path} {when}", "B": batch, "D": 64,
                             "tflop": sum(k.flops for k in kernels) / 1e12,
                             "gb": sum(k.bytes for k in kernels) / 1e9, "ms": sum(k.ms(c) for k in kernels),
                             "kernels": {k.name: round(k.ms(c), 3) for k in kernels}})
    return {"ceilings": c, "target_ms": TARGET_MS, "rows": rows}


def markdown(t: dict) -> str:
    c = t["ceilings"]
    lines = ["# Roofline prediction (benchmarks/roofline.py; not a measurement)\n",
             f"Ceilings: {c['bf16_matmul_tflops']:.0f} TFLOP/s bf16, {c['copy_gbs'] / 1e3:.1f} TB/s, "
             f"{c['sfu_tops']} Tops/s exp, {c['int32_tops']} Tops/s INT32, {c['sms']} SMs. bf16 inputs, one GPU "
             f"(N = B). Target: the loss forward+backward at B = 64k, D = 768 in <= {t['target_ms']:.0f} ms.\n",
             "| op | path | B | D | TFLOP | HBM GB | predicted ms | credited TFLOP/s | per kernel (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        cred = f"{r['credited_tflops']:.0f}" if "credited_tflops" in r else "-"
        per = ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
        lines.append(f"| {r['op']} | {r['path']} | {r['B']} | {r['D']} | {r['tflop']:.1f} | {r['gb']:.1f} | "
                     f"{r['ms']:.2f} | {cred} | {per} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ceilings", help="ceilings.json written by gpu_ceilings.py (default: the H200 defaults)")
    ap.add_argument("--out", help="folder for roofline.json and roofline.md")
    args = ap.parse_args()
    ceilings = None
    if args.ceilings:
        with open(args.ceilings) as f:
            measured = json.load(f)
        ceilings = {k: measured[k] for k in ("bf16_matmul_tflops", "copy_gbs") if k in measured}
    t = table(ceilings)
    md = markdown(t)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "roofline.json"), "w") as f:
            json.dump(t, f, indent=1)
        with open(os.path.join(args.out, "roofline.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
