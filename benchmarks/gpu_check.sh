#!/usr/bin/env bash
# The one-shot GPU check (DESIGN.md section 7): kernel tests natively on the GPU (bf16/fp16 included), the matmul
# and copy ceilings, the contrastive-loss and cross-attention benchmarks. Writes JSON and logs into the output
# folder (first argument, else $OUT) and prints a short table last. Budget: at most ~8 minutes, no network.
# Prepare first on the CPU machine: bash benchmarks/prepare_gpu_check.sh (wheels into .gpu_wheels/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-${OUT:-benchmarks/results/gpu-local}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

SITE="$(mktemp -d)"
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl 2>&1 | tail -3
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

"$PY" benchmarks/gpu_ceilings.py --out "$OUT"
R2D2DS_AUTOTUNE=0 timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -25 | tee "$OUT/kernel_tests.log"
timeout 180 "$PY" benchmarks/bench_contrastive_gpu.py --out "$OUT" 2>&1 | tail -40 | tee "$OUT/contrastive.log"
timeout 90 "$PY" benchmarks/bench_cross_attention.py --out "$OUT" 2>&1 | tail -40 | tee "$OUT/cross_attention.log"
"$PY" benchmarks/summarize_gpu.py "$OUT" | tee "$OUT/summary.md"
