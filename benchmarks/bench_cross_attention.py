"""Cross-attention at R2D2's cross-encoder shapes, bf16: our Triton kernel vs PyTorch SDPA (vs FA-2 varlen).

Cases (issue #4): B = 512 pairs, H = 12, Dh = 64
  text_query:  Lq = 64 text tokens over Lk = 257 image tokens, no key mask (image tokens are never padded);
  image_query: Lq = 257 image tokens over Lk = 64 text tokens with a text padding mask (lengths 8..64).
Each is timed forward and forward+backward with triton.testing.do_bench (median ms).

FLOPs (written out so the TFLOP/s column can be checked): forward = 4 * B * H * Lq * Lk * Dh (QK^T and PV,
2 flops per multiply-add), over the full Lk even where keys are padded; forward+backward = 3.5 x forward
(FlashAttention's convention: the backward is 2.5 x the forward, 5 matmuls against 2). Recomputation inside
our backward is not counted.

Every provider runs attention as the cross encoder does: from the (B, L, H*Dh) projection outputs (the leaves),
heads split by a view, attention, heads merged back to (B, Lq, H*Dh); forward+backward includes whatever copies
that layout costs each provider.

Rows: triton (our kernels as the model calls them: strided views read in place, out / grads written in the
projections' layout), triton_copies (the previous path, R2D2DS_CROSS_ATTENTION_LAYOUT=contiguous: q, k, v and dO
copied to contiguous (B, H, L, Dh), so the head merges copy too; *_speedup_vs_copies says what reading the views
in place saves), triton_split_bwd (the backward forced onto the split dK/dV + dQ kernels where a fused backward
would run: says whether fusing pays).

Baselines:
  sdpa       F.scaled_dot_product_attention on the same views with PyTorch's own backend choice (recorded per
             case), with the contract's mask handling (impl="torch"); speedups are against this row.
  sdpa_<b>   the same forced onto one backend (flash / efficient / cudnn) where that backend accepts the case.
  fa2_varlen flash_attn_varlen_func on packed tokens (padding keys dropped, packing not timed), if importable.

Writes <out>/cross_attention.json and prints a markdown table. --smoke runs tiny shapes with a wall-clock
timer (on CPU: the Triton interpreter) to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

CASES = {
    # name: (B, H, Lq, Lk, Dh, masked keys)
    "text_query": (512, 12, 64, 257, 64, False),
    "image_query": (512, 12, 257, 64, 64, True),
}
SMOKE_CASES = {"text_query": (2, 2, 16, 33, 64, False), "image_query": (2, 2, 33, 16, 64, True)}
FWD_BWD_FACTOR = 3.5


def _timer(smoke: bool):
    if not smoke:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def _sdpa_choice(q, k, v, mask) -> str:
    """The backend SDPA picks for these inputs (private API; 'unknown' if it moved)."""
    try:
        from torch.nn.attention import SDPBackend

        attn_mask = None if mask is None else mask[:, None, None, :]
        return SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, False)).name.lower()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def _fa2_varlen():
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001  (absent, or a wheel built for another torch)
        return None, None
    return flash_attn_varlen_func, flash_attn.__version__


def _heads(t, H):
    """(B, L, H*Dh) -> (B, H, L, Dh), a view (as r2d2ds.models.cross_encoder splits heads)."""
    B, L, W = t.shape
    return t.view(B, L, H, W // H).transpose(1, 2)


def _merge(o):
    """(B, H, Lq, Dh) -> (B, Lq, H*Dh): a view when o is laid out as (B, Lq, H, Dh), else a copy."""
    B, H, Lq, Dh = o.shape
    return o.transpose(1, 2).reshape(B, Lq, H * Dh)


def _providers(q, k, v, mask, scale, H):
    """name -> callable taking the (B, L, H*Dh) projection leaves and returning the merged (B, Lq, H*Dh)."""
    from r2d2ds.kernels import cross_attention

    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk)

    def ours(layout):
        def fn(q, k, v):
            # Read at each forward (and kept for its backward); setting it costs microseconds of host time.
            os.environ["R2D2DS_CROSS_ATTENTION_LAYOUT"] = layout
            return _merge(cross_attention(_heads(q, H), _heads(k, H), _heads(v, H), key_mask=mask, scale=scale,
                                          impl="triton"))
        return fn

    provs = {"triton": ours("strided"), "triton_copies": ours("contiguous")}
    Dh = q.shape[2] // H
    if _ca_module()._bwd_path(q.shape[1], k.shape[1], Dh) != "split":
        # Same kernels with the backward forced onto the split dK/dV + dQ pair: measures the fused backward
        # (over all queries, or over all keys for the image-query direction).
        provs["triton_split_bwd"] = ours("strided")

    def sdpa(q, k, v):  # plain SDPA with its own backend choice: PyTorch's fastest route (no empty rows here)
        return _merge(F.scaled_dot_product_attention(_heads(q, H), _heads(k, H), _heads(v, H), attn_mask=attn_mask,
                                                     scale=scale))

    provs["sdpa"] = sdpa
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION))
        for name, backend in backends:
            def forced(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return sdpa(q, k, v)
            provs[f"sdpa_{name}"] = forced

        varlen, _ = _fa2_varlen()
        if varlen is not None:
            B, Lq, W = q.shape
            Lk = k.shape[1]
            lengths = mask.sum(1) if mask is not None else torch.full((B,), Lk, device=q.device)
            cu_k = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Lq
            keep = mask.reshape(-1) if mask is not None else None

            def fa2(q, k, v):  # packed (tokens, H, Dh) leaves: packing happens before timing
                return varlen(q, k, v, cu_q, cu_k, Lq, Lk, softmax_scale=scale).reshape(B, Lq, W)

            def pack_q(t):
                return t.reshape(B * Lq, H, Dh)

            def pack_kv(t):
                t = t.reshape(B * Lk, H, Dh)
                return t[keep] if keep is not None else t

            fa2.pack = (pack_q, pack_kv)
            provs["fa2_varlen"] = fa2
    return provs


def _ca_module():
    # The package re-exports the function under the module's name, so fetch the module itself.
    return importlib.import_module("r2d2ds.kernels.cross_attention")


def _measure(bench, fn, leaves, grad_out) -> tuple[float, float]:
    """(forward ms, forward+backward ms); gradients are reset each call so nothing accumulates."""

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)

    return bench(lambda: fn(*leaves)), bench(fwd_bwd)


def run_case(name, shape, dtype, device, bench, smoke):
    B, H, Lq, Lk, Dh, masked = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    # The projections' outputs, (B, L, H*Dh): what the cross encoder hands attention.
    q = torch.randn(B, Lq, H * Dh, generator=gen).to(device, dtype)
    k = torch.randn(B, Lk, H * Dh, generator=gen).to(device, dtype)
    v = torch.randn(B, Lk, H * Dh, generator=gen).to(device, dtype)
    mask = None
    if masked:  # text padding: valid prefix of 8..Lk tokens
        lengths = torch.randint(min(8, Lk), Lk + 1, (B,), generator=gen)
        mask = (torch.arange(Lk)[None, :] < lengths[:, None]).to(device)
    scale = Dh**-0.5
    flops_fwd = 4 * B * H * Lq * Lk * Dh
    choice = _sdpa_choice(_heads(q, H), _heads(k, H), _heads(v, H), mask) if q.is_cuda else "cpu"
    rows = []
    ref = None
    layout = os.environ.get("R2D2DS_CROSS_ATTENTION_LAYOUT")
    for prov, fn in _providers(q, k, v, mask, scale, H).items():
        pq, pkv = getattr(fn, "pack", (lambda t: t, lambda t: t))
        leaves = [pq(q).detach().requires_grad_(), pkv(k).detach().requires_grad_(),
                  pkv(v).detach().requires_grad_()]
        fused_tile = _ca_module()._FUSED_BWD_MAX_TILE
        if prov == "triton_split_bwd":
            _ca_module()._FUSED_BWD_MAX_TILE = 0
        try:
            out = fn(*leaves)  # (B, Lq, H*Dh)
            grad_out = torch.randn_like(out)
            if ref is None:  # the first provider (ours) is the yardstick for the others' outputs
                ref = out.detach().float()
            err = (out.detach().float() - ref).abs().max().item()
            fwd_ms, fwd_bwd_ms = _measure(bench, fn, leaves, grad_out)
        except Exception as e:  # noqa: BLE001  (a forced backend that refuses the case: record why)
            rows.append({"case": name, "impl": prov, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        finally:
            _ca_module()._FUSED_BWD_MAX_TILE = fused_tile
            if layout is None:
                os.environ.pop("R2D2DS_CROSS_ATTENTION_LAYOUT", None)
            else:
                os.environ["R2D2DS_CROSS_ATTENTION_LAYOUT"] = layout
        row = {"case": name, "impl": prov,
               "fwd_ms": fwd_ms, "fwd_tflops": flops_fwd / (fwd_ms * 1e-3) / 1e12,
               "fwd_bwd_ms": fwd_bwd_ms,
               "fwd_bwd_tflops": FWD_BWD_FACTOR * flops_fwd / (fwd_bwd_ms * 1e-3) / 1e12}
        row["max_abs_diff_vs_triton"] = err
        rows.append(row)
    timed = {r["impl"]: r for r in rows if "fwd_ms" in r}
    for r in timed.values():
        for base_name, tag in (("sdpa", "sdpa"), ("triton_copies", "copies")):
            if base_name in timed and (tag == "sdpa" or r["impl"] == "triton"):
                r[f"fwd_speedup_vs_{tag}"] = timed[base_name]["fwd_ms"] / r["fwd_ms"]
                r[f"fwd_bwd_speedup_vs_{tag}"] = timed[base_name]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    facts = {"case": name, "B": B, "H": H, "Lq": Lq, "Lk": Lk, "Dh": Dh, "key_mask": masked,
             "valid_key_fraction": (mask.float().mean().item() if mask is not None else 1.0),
             "flops_fwd": flops_fwd, "sdpa_default_backend": choice}
    return facts, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, wall-clock timer (checks the script)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_cross_attention.py needs a CUDA device (or --smoke)")
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = _timer(args.smoke)
    cases = SMOKE_CASES if args.smoke else CASES
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)",
        "smoke": args.smoke,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "flash_attn": _fa2_varlen()[1], "python": platform.python_version(), "dtype": str(dtype),
        "flops": "fwd = 4*B*H*Lq*Lk*Dh; fwd_bwd = 3.5 * fwd",
        "timer": "wall clock, 1 run" if args.smoke else "do_bench median, warmup 25 ms, rep 100 ms",
    }
    if device.type == "cuda":
        result["sdpa_backends_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    result["cases"], result["rows"] = [], []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cross_attention.json")

    def save(finished: bool) -> None:  # after every case: a run stopped by its budget keeps what it measured
        with open(path + ".tmp", "w") as f:
            json.dump({**result, "finished": finished}, f, indent=2)
        os.replace(path + ".tmp", path)

    save(False)
    for name, shape in cases.items():
        t0 = time.perf_counter()
        facts, rows = run_case(name, shape, dtype, device, bench, args.smoke)
        facts["wall_s"] = time.perf_counter() - t0  # includes the autotuner's first-call search
        result["cases"].append(facts)
        result["rows"].extend(rows)
        save(False)
        print(f"{name}: done in {facts['wall_s']:.1f} s (sdpa picks {facts['sdpa_default_backend']})",
              file=sys.stderr)
    save(True)
    cols = ["case", "impl", "fwd_ms", "fwd_tflops", "fwd_speedup_vs_sdpa", "fwd_bwd_ms", "fwd_bwd_tflops",
            "fwd_bwd_speedup_vs_sdpa", "fwd_speedup_vs_copies", "fwd_bwd_speedup_vs_copies"]
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['case']} | {r['impl']} | {r['error']} |")
        else:
            print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
