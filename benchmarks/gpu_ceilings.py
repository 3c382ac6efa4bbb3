"""Measured ceilings of the GPU at hand: dense bf16 matmul TFLOP/s and device-to-device copy GB/s.

Kernel efficiency in benchmarks/results is reported against these measured numbers, not datasheet values.
--smoke measures tiny sizes on whatever device there is (the CPU in the rehearsal): it checks the script only.
"""

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, wall clock (checks the script)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("gpu_ceilings.py needs a CUDA device (or --smoke)")
    import triton

    if args.smoke:
        def do_bench(fn, warmup, rep):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench

    device = "cuda" if cuda else "cpu"
    n = 256 if args.smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    matmul_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    x = torch.empty(2**20 if args.smoke else 2**28, device=device, dtype=torch.float32)  # 1 GiB on the GPU
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=20, rep=200)
    copy_gbs = 2 * x.numel() * 4 / (ms_copy * 1e-3) / 1e9  # read + write
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run)", "smoke": args.smoke,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "bf16_matmul_tflops": matmul_tflops, "matmul_shape": [n, n, n],
        "copy_gbs": copy_gbs, "copy_bytes": 2 * x.numel() * 4,
    }
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
