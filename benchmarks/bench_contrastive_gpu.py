"""GPU benchmark of the two-direction contrastive loss (issue #3): ours (Triton) vs naive PyTorch vs Inf-CL.

One GPU, bf16 embeddings, B in {16k, 64k, 256k}, D in {512, 768}; forward + backward of (i2t CE + t2i CE) / 2
with diagonal positives and a learnable scale. For each method: time per step (triton.testing.do_bench for
short steps; CUDA events around a few steps when one step takes longer than ~0.3 s, so the whole run fits in
minutes), peak loss memory (max_memory_allocated during the step minus the memory held before it: inputs and
their grads are not counted) and TFLOP/s.

FLOP formula (stated once, used for every method): 8 * B^2 * D per forward + backward, i.e. forward 2 B^2 D
(one B x B x D product, both directions read the same logits), backward 2 B^2 D to recompute the logits plus
two 2 B^2 D products (dL/d image, dL/d text). Methods that do more work (ours computes the logits once per
direction in the forward: 4 B^2 D; Inf-CL both directions = two one-direction calls) are still credited 8 B^2
D, so TFLOP/s compares time for the same useful work. The bf16 matmul ceiling (torch.mm, B x D @ D x B-sized
tiles) is measured alongside so "fraction of matmul rate" is reported too.

Methods: "ours" = r2d2ds.kernels.contrastive_loss(impl="triton"); "naive" = PyTorch logits + F.cross_entropy
in both directions (B x B in bf16, softmax in fp32: OOMs at large B, recorded as such); "infcl" =
inf_cl.cal_inf_loss(img, txt) + cal_inf_loss(txt, img) (skipped with the reason when inf-cl is not
importable); "ours-full" = ours with everything R2D2 adds (multi-positive ids, TgD teacher targets at alpha 0.4,
hard negatives from the same pass), still credited 8 B^2 D so its time shows the price of the extras;
"ours-previous" = ours on the previous kernels (R2D2DS_CONTRASTIVE_FWD=rows: a forward pass per direction;
R2D2DS_CONTRASTIVE_BWD=tiles: per-tile fp32 read-modify-write), side by side with "ours" (split forward + panel
backward) until one GPU run decides (predictions: benchmarks/roofline.py).

Inf-CL all-reduces its scale gradient, so a one-rank process group (NCCL on a free loopback port) is started
when none exists. The JSON is rewritten after every case, so a run stopped by its time budget keeps the cases it
finished. --smoke runs tiny sizes on the CPU (Triton interpreter, wall clock) to check the script; its numbers
mean nothing.

    python benchmarks/bench_contrastive_gpu.py --out "$OUT"  # -> $OUT/contrastive_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import time

import torch
import torch.nn.functional as F


def flops(b: int, d: int) -> float:
    return 8.0 * b * b * d


def naive_loss(img, txt, scale):
    logits = scale * img @ txt.T  # (B, B) in the input dtype
    target = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.T.float(), target)) / 2


_FULL_CACHE: dict = {}


def make_methods():
    from r2d2ds.kernels import contrastive_loss

    def ours_full(i, t, s):
        """The whole R2D2 GCPR pass: ids in groups of 4, EMA-teacher TgD targets (alpha 0.4) and the
        hard negatives drawn in the same pass (teacher = a fixed perturbation of the student, made once)."""
        key = (i.shape, i.data_ptr())
        if key not in _FULL_CACHE:
            _FULL_CACHE.clear()
            ti = F.normalize(i.detach().float() + 0.1 * torch.randn_like(i, dtype=torch.float32), dim=1)
            tt = F.normalize(t.detach().float() + 0.1 * torch.randn_like(t, dtype=torch.float32), dim=1)
            labels = torch.arange(i.shape[0], device=i.device) // 4
            _FULL_CACHE[key] = (ti.to(i.dtype), tt.to(t.dtype), labels)
        ti, tt, labels = _FULL_CACHE[key]
        loss, _, _ = contrastive_loss(i, t, s, labels, ti, tt, alpha=0.4, impl="triton", return_negatives=True,
                                      seed=0)
        return loss

    def ours_previous(i, t, s):
        """Ours on the previous kernels (R2D2DS_CONTRASTIVE_FWD=rows, _BWD=tiles; read at the forward)."""
        saved = {k: os.environ.get(k) for k in ("R2D2DS_CONTRASTIVE_FWD", "R2D2DS_CONTRASTIVE_BWD")}
        os.environ.update(R2D2DS_CONTRASTIVE_FWD="rows", R2D2DS_CONTRASTIVE_BWD="tiles")
        try:
            return contrastive_loss(i, t, s, impl="triton")
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v

    methods = {"ours": lambda i, t, s: contrastive_loss(i, t, s, impl="triton"), "naive": naive_loss,
               "ours-full": ours_full, "ours-previous": ours_previous}
    try:
        from inf_cl import cal_inf_loss

        def infcl(i, t, s):
            head = 256 if i.shape[1] % 256 == 0 else 128
            i2t = cal_inf_loss(i, t, scale=s, head_dim=head)
            return (i2t + cal_inf_loss(t, i, scale=s, head_dim=head)) / 2

        methods["infcl"] = infcl
        infcl_reason = None
    except Exception as e:  # not installed on this machine (DESIGN.md section 7): say so in the JSON
        infcl_reason = f"inf_cl not importable: {type(e).__name__}: {e}"
    return methods, infcl_reason


def one_rank_group() -> None:
    """Inf-CL all-reduces the scale's gradient: give it a process group of this one rank (a free loopback port)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{port}")


def time_step(fn, long_s: float = 0.3, reps: int = 3) -> tuple[float, str]:
    """Milliseconds per call: do_bench for short calls, CUDA events over `reps` calls for long ones; on the
    CPU (--smoke) the wall clock of one call after a warm-up."""
    if not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, "wall x1"
    import triton.testing

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()  # warm-up (and autotuning on the first size of each D)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first < long_s:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200)), "do_bench"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 1 if first > 3 * long_s else reps
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, f"events x{n}"


def matmul_ceiling(d: int) -> float:
    """Measured bf16 TFLOP/s of a (16384, d) @ (d, 16384) product: the rate a logits tile can reach."""
    import triton.testing

    a = torch.randn(16384, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(d, 16384, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100)
    return 2 * 16384 * 16384 * d / (ms * 1e-3) / 1e12


def run_case(name, fn, b, d, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)
    txt = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    if device.type == "cpu":  # --smoke: the script's plumbing only
        try:
            ms, how = time_step(lambda: fn(img, txt, scale).backward())
            return {"method": name, "B": b, "D": d, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
                    "timing": how, "tflops": flops(b, d) / (ms * 1e-3) / 1e12}
        except Exception as e:  # noqa: BLE001
            return {"method": name, "B": b, "D": d, "skipped": f"{type(e).__name__}: {str(e)[:200]}"}

    def step():
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale).backward()

    row = {"method": name, "B": b, "D": d, "dtype": "bf16"}
    try:
        step()  # allocate the grads once so the memory baseline holds them
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms, how = time_step(step)
        emb_bytes = 2 * b * d * 2
        row.update(ms=ms, timing=how, tflops=flops(b, d) / (ms * 1e-3) / 1e12, loss_mem_gib=peak / 2**30,
                   loss_mem_over_embeddings=peak / emb_bytes)
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError only from torch 2.5
        row.update(skipped=f"OOM: {str(e).splitlines()[0][:160]}")
    except Exception as e:  # record and continue: one failing method must not lose the others' numbers
        row.update(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    p.add_argument("--methods", nargs="+", default=["ours", "ours-previous", "naive", "infcl", "ours-full"])
    p.add_argument("--budget-s", type=float, default=240.0, help="skip cases past this wall time")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; on the CPU in the Triton interpreter")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_contrastive_gpu.py needs a CUDA device (or --smoke)")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if args.smoke:
        args.sizes, args.dims = [64], [128]  # D: a multiple of the head_dim Inf-CL splits into
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    t_start = time.perf_counter()
    one_rank_group()
    methods, infcl_reason = make_methods()
    import triton

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "gpu": torch.cuda.get_device_name() if cuda else "cpu (interpreter smoke run)", "smoke": args.smoke,
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "flop_formula": "8 * B^2 * D per forward+backward (fwd 2B^2D, bwd recompute 2B^2D + 2 x 2B^2D)"}
    ceilings = {d: matmul_ceiling(d) if cuda else float("nan") for d in args.dims}
    meta["bf16_matmul_tflops"] = ceilings
    rows = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "contrastive_gpu.json")

    def save():  # after every case: a run stopped by its budget keeps what it measured
        with open(path + ".tmp", "w") as f:
            json.dump({"meta": meta, "rows": rows, "finished": False}, f, indent=1)
        os.replace(path + ".tmp", path)

    save()
    for d in args.dims:
        for b in args.sizes:
            for name in args.methods:
                if name not in methods:
                    rows.append({"method": name, "B": b, "D": d, "skipped": infcl_reason or "unknown method"})
                    continue
                if time.perf_counter() - t_start > args.budget_s:
                    rows.append({"method": name, "B": b, "D": d, "skipped": "time budget"})
                    continue
                if cuda and name == "naive" and 6 * b * b > torch.cuda.get_device_properties(0).total_memory:
                    # bf16 logits + fp32 copies for both directions would OOM: do not spend time finding out
                    rows.append({"method": name, "B": b, "D": d, "skipped": "OOM (estimated >= 6 B^2 bytes)"})
                    continue
                row = run_case(name, methods[name], b, d, device, dtype)
                if cuda:
                    torch.cuda.empty_cache()  # the case's tensors are gone: free their blocks
                if "tflops" in row:
                    row["fraction_of_matmul"] = row["tflops"] / ceilings[d]
                print(json.dumps(row), flush=True)
                rows.append(row)
                save()
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "finished": True}, f, indent=1)
    print(f"{'method':>6} {'B':>7} {'D':>4} {'ms':>9} {'TFLOP/s':>8} {'of mm':>6} {'mem GiB':>8}")
    for r in rows:
        if "ms" in r:
            print(f"{r['method']:>6} {r['B']:>7} {r['D']:>4} {r['ms']:>9.2f} {r['tflops']:>8.1f} "
                  f"{r['fraction_of_matmul']:>6.2f} {r.get('loss_mem_gib', float('nan')):>8.3f}")
        else:
            print(f"{r['method']:>6} {r['B']:>7} {r['D']:>4}  skipped: {r['skipped']}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
