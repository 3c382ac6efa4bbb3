"""Measured ceilings of the GPU at hand: dense bf16 matmul TFLOP/s and device-to-device copy GB/s.

Kernel efficiency in benchmarks/results is reported against these measured numbers, not datasheet values.
"""

import argparse
import json
import os
import platform
from datetime import datetime, timezone

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings.py needs a CUDA device")
    import triton
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    matmul_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=20, rep=200)
    copy_gbs = 2 * x.numel() * 4 / (ms_copy * 1e-3) / 1e9  # read + write
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
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
