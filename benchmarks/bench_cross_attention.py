"""Cross-attention at R2D2's cross-encoder shapes, bf16: our Triton kernel vs PyTorch SDPA (vs FA-2 varlen).

Cases (issue #4): B = 512 pairs, H = 12, Dh = 64
  text_query:  Lq = 64 text tokens over Lk = 257 image tokens, no key mask (image tokens are never padded);
  image_query: Lq = 257 image tokens over Lk = 64 text tokens with a text padding mask (lengths 8..64).
Each is timed forward and forward+backward with triton.testing.do_bench (median ms).

FLOPs (written out so the TFLOP/s column can be checked): forward = 4 * B * H * Lq * Lk * Dh (QK^T and PV,
2 flops per multiply-add), over the full Lk even where keys are padded; forward+backward = 3.5 x forward
(FlashAttention's convention: the backward is 2.5 x the forward, 5 matmuls against 2). Recomputation inside
our backward is not counted.

Rows: triton (our kernels as the model calls them), triton_split_bwd (the backward forced onto the split
dK/dV + dQ kernels where the fused short-query backward would run: says whether fusing pays).

Baselines:
  sdpa       F.scaled_dot_product_attention with PyTorch's own backend choice (recorded per case), with the
             contract's mask handling (impl="torch"); speedups are against this row.
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


def _providers(q, k, v, mask, scale):
    """name -> forward callable taking (q, k, v) leaves; each returns a (B, H, Lq, Dh)-sized tensor."""
    from r2d2ds.kernels import cross_attention

    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk)
    ours = lambda q, k, v: cross_attention(q, k, v, key_mask=mask, scale=scale, impl="triton")
    provs = {"triton": ours}
    if _ca_module()._bwd_path(q.shape[2], k.shape[2], q.shape[3]) != "split":
        # Same kernels with the backward forced onto the split dK/dV + dQ pair: measures the fused backward
        # (over all queries, or over all keys for the image-query direction).
        provs["triton_split_bwd"] = ours
    provs.update({
        # Plain SDPA with its own backend choice: PyTorch's fastest route (these cases have no empty rows).
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale),
    })
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION))
        for name, backend in backends:
            def forced(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            provs[f"sdpa_{name}"] = forced

        varlen, _ = _fa2_varlen()
        if varlen is not None:
            B, H, Lq, Dh = q.shape
            Lk = k.shape[2]
            lengths = mask.sum(1) if mask is not None else torch.full((B,), Lk, device=q.device)
            cu_k = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Lq
            keep = mask.reshape(-1) if mask is not None else None

            def fa2(q, k, v):  # packed (tokens, H, Dh) leaves: packing happens before timing
                return varlen(q, k, v, cu_q, cu_k, Lq, Lk, softmax_scale=scale)

            def pack_q(t):
                return t.transpose(1, 2).reshape(B * Lq, H, Dh)

            def pack_kv(t):
                t = t.transpose(1, 2).reshape(B * Lk, H, Dh)
                return t[keep] if keep is not None else t

            fa2.pack = (pack_q, pack_kv)
            fa2.unpack = lambda o: o.reshape(B, Lq, H, Dh).transpose(1, 2)  # (B, H, Lq, Dh)
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
    q = torch.randn(B, H, Lq, Dh, generator=gen).to(device, dtype)
    k = torch.randn(B, H, Lk, Dh, generator=gen).to(device, dtype)
    v = torch.randn(B, H, Lk, Dh, generator=gen).to(device, dtype)
    mask = None
    if masked:  # text padding: valid prefix of 8..Lk tokens
        lengths = torch.randint(min(8, Lk), Lk + 1, (B,), generator=gen)
        mask = (torch.arange(Lk)[None, :] < lengths[:, None]).to(device)
    scale = Dh**-0.5
    flops_fwd = 4 * B * H * Lq * Lk * Dh
    choice = _sdpa_choice(q, k, v, mask) if q.is_cuda else "cpu"
    rows = []
    ref = None
    for prov, fn in _providers(q, k, v, mask, scale).items():
        pq, pkv = getattr(fn, "pack", (lambda t: t, lambda t: t))
        leaves = [pq(q).detach().requires_grad_(), pkv(k).detach().requires_grad_(),
                  pkv(v).detach().requires_grad_()]
        fused_tile = _ca_module()._FUSED_BWD_MAX_TILE
        if prov == "triton_split_bwd":
            _ca_module()._FUSED_BWD_MAX_TILE = 0
        try:
            out = fn(*leaves)
            grad_out = torch.randn_like(out)
            out_bhld = getattr(fn, "unpack", lambda o: o)(out.detach()).float()
            if ref is None:  # the first provider (ours) is the yardstick for the others' outputs
                ref = out_bhld
            err = (out_bhld - ref).abs().max().item()
            fwd_ms, fwd_bwd_ms = _measure(bench, fn, leaves, grad_out)
        except Exception as e:  # noqa: BLE001  (a forced backend that refuses the case: record why)
            rows.append({"case": name, "impl": prov, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        finally:
            _ca_module()._FUSED_BWD_MAX_TILE = fused_tile
        row = {"case": name, "impl": prov,
               "fwd_ms": fwd_ms, "fwd_tflops": flops_fwd / (fwd_ms * 1e-3) / 1e12,
               "fwd_bwd_ms": fwd_bwd_ms,
               "fwd_bwd_tflops": FWD_BWD_FACTOR * flops_fwd / (fwd_bwd_ms * 1e-3) / 1e12}
        row["max_abs_diff_vs_triton"] = err
        rows.append(row)
    base = next((r for r in rows if r["impl"] == "sdpa" and "fwd_ms" in r), None)
    for r in rows:
        if base is not None and "fwd_ms" in r:
            r["fwd_speedup_vs_sdpa"] = base["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup_vs_sdpa"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
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
            "fwd_bwd_speedup_vs_sdpa"]
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['case']} | {r['impl']} | {r['error']} |")
        else:
            print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
