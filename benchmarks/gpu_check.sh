#!/usr/bin/env bash
# The one-shot GPU check (DESIGN.md section 7): where r2d2ds imports from and the versions, the kernel tests
# natively on the GPU (bf16/fp16 included, one autotune config), the matmul and copy ceilings and the roofline at
# those ceilings, the contrastive-loss and cross-attention benchmarks, the full R2D2 training step (bench_step.py:
# ViT-B/16 with GradCache off and on, ViT-L/14; ZeRO-2 on one GPU, bf16), then a summary table (OUT/summary.md).
# No network; at most ~8 minutes.
#
#   bash benchmarks/prepare_gpu_check.sh      # first, on the CPU machine: wheels into .gpu_wheels/
#   bash benchmarks/gpu_check.sh OUT_DIR      # on the GPU machine, from the repository root, .gpu_wheels/ carried
#   bash benchmarks/gpu_check.sh --rehearse OUT_DIR   # the CPU rehearsal CI runs (see below)
#
# The wheels go into a fresh temporary folder (pip --target) and every Python runs with -P, so the source folder
# r2d2ds/ in the working directory (which has no kernels/ inside) never shadows the installed wheel; the env phase
# proves it and fails otherwise. Each phase has its own time budget (timeout) and writes OUT/<phase>.json as it
# goes, so a phase that runs out of time loses itself, not the others. To add a phase, add one `phase` line: its
# command must write OUT/<name>.json. Exit status 0 only when every phase succeeded and the summary is complete.
#
# --rehearse: the same script on the CPU, as CI runs it: builds r2d2ds's wheel afresh (the environment has the
# rest), hides webdataset, tensorboard and the editable install of r2d2ds as the GPU image lacks them, runs the
# kernels in the Triton interpreter, a few kernel tests spread over every file and every benchmark at a tiny size
# (--smoke; bench_step.py --tiny), with 3x the budgets. deepspeed (and its dependencies) comes from the wheels on
# the GPU machine and from the environment in the rehearsal, which cannot build its wheel without network; the
# env phase records which.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REHEARSE=0
if [[ "${1:-}" == "--rehearse" ]]; then
  REHEARSE=1
  shift
fi
OUT="${1:-${OUT:-benchmarks/results/gpu-local}}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT/summary.md"  # a previous run's files must not pass for this run's
: > "$OUT/phases.tsv"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
PY=("${PYTHON:-python3}" -P)  # -P: the working directory (the source tree) is not put on sys.path
WHEELS="${R2D2DS_GPU_WHEELS:-.gpu_wheels}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
SITE="$TMP/site"
SMOKE=()
KERNEL_TESTS=()
# bench_step.py's presets (ViT-B/16 + BERT-base, two 6-layer cross encoders, 224 px, B = 128; ViT-L/14, B = 64):
# 2 untimed steps (Triton compiles, allocator growth), 5 timed; GradCache off and on (32-row chunks) for ViT-B/16.
STEP_B16=(--model vit-b16 --gradcache-chunk 32 --warmup 2 --steps 5)
STEP_L14=(--model vit-l14 --warmup 2 --steps 5)
BUDGET_SCALE=1
PATH_FRONT="$SITE"

if ((REHEARSE)); then
  WHEELS="$TMP/wheels"
  bash benchmarks/prepare_gpu_check.sh --rehearse --wheels "$WHEELS" >"$OUT/prepare.log" 2>&1 ||
    { cat "$OUT/prepare.log"; echo "error: building the r2d2ds wheel failed" >&2; exit 1; }
  for mod in webdataset tensorboard; do  # absent on the GPU image: the check must not need them
    mkdir -p "$TMP/absent/$mod"
    echo "raise ImportError('$mod is not installed on the GPU machine (gpu_check.sh --rehearse)')" \
      >"$TMP/absent/$mod/__init__.py"
  done
  # The development (editable) install of r2d2ds maps the source tree, kernels/ included: the GPU image has none.
  cat >"$TMP/absent/sitecustomize.py" <<'PYEOF'
import sys

sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___r2d2ds")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable___r2d2ds")]
PYEOF
  PATH_FRONT="$TMP/absent:$SITE"
  export TRITON_INTERPRET=1
  SMOKE=(--smoke)
  KERNEL_TESTS=(--max-tests "${R2D2DS_REHEARSE_TESTS:-6}")
  STEP_B16=(--tiny --gradcache-chunk 4 --warmup 1 --steps 2 --matmul-n 128)  # the same code path, tiny
  STEP_L14=(--tiny --warmup 1 --steps 2 --matmul-n 128)
  BUDGET_SCALE=3  # a shared CI machine is slow and its timings mean nothing: only a hang should time out
fi

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "error: no wheels in $WHEELS: run 'bash benchmarks/prepare_gpu_check.sh' on a machine with network and" \
    "carry .gpu_wheels/ along" >&2
  exit 1
fi
install_wheels() {
  if "${PY[@]}" -m pip --version >/dev/null 2>&1; then
    "${PY[@]}" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
  else  # no pip in the image: a wheel is a zip laid out for site-packages
    for whl in "$WHEELS"/*.whl; do "${PY[@]}" -m zipfile -e "$whl" "$SITE" || return 1; done
  fi
}
install_wheels >"$OUT/install.log" 2>&1 ||
  { cat "$OUT/install.log"; echo "error: installing $WHEELS failed" >&2; exit 1; }
export PYTHONPATH="$PATH_FRONT${PYTHONPATH:+:$PYTHONPATH}"

phase() {  # phase NAME BUDGET_S COMMAND...: run COMMAND under its own time budget, log to OUT/NAME.log
  local name="$1" budget=$(($2 * BUDGET_SCALE)) t0=$SECONDS rc
  shift 2
  echo "== $name (budget ${budget} s)"
  timeout -k 10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$budget" >>"$OUT/phases.tsv"
  tail -n 4 "$OUT/$name.log"
  echo "   exit $rc after $((SECONDS - t0)) s"
}

# The largest global batch one GPU fits, non-cached vs GradCache (benchmarks/bench_gradcache_gpu.py: ViT-B/16 +
# BERT-base, 6 + 6 cross-encoder layers, bf16, ZeRO-2; doubling then bisection, each trial a fresh trainer, CUDA
# OOM caught and freed). Its own --budget-s stops starting trials in time; a search cut by it reports "at least N"
# (limited_by: budget) plus a fitted memory-vs-batch extrapolation labelled as an estimate. The rehearsal runs the
# tiny CPU model with a simulated memory limit.
gradcache_gpu() {
  local cmd=("${PY[@]}" benchmarks/bench_gradcache_gpu.py --out "$OUT")
  if ((REHEARSE)); then
    cmd+=(--tiny --tiny-cap-rows 24 --chunk 8 --max-batch 64)
  else
    cmd+=(--budget-s 75)
  fi
  phase gradcache_gpu 95 env R2D2DS_AUTOTUNE=0 "${cmd[@]}"
}

# One line per phase (name = the JSON it writes; budget in seconds). The budgets add up to 530 s (with
# gradcache_gpu's 95): with the wheel install and the summary, about 9.5 minutes of the GPU. The step phases come after the
# kernel phases, whose Triton compilations (same single config) they then find in the cache; they run with one
# autotune config too (R2D2DS_AUTOTUNE=0), so a first call never benchmarks a tile list inside a timed budget.
phase env 15 "${PY[@]}" benchmarks/gpu_env.py --site "$SITE" --out "$OUT"
phase kernel_tests 110 env R2D2DS_AUTOTUNE=0 "${PY[@]}" benchmarks/run_kernel_tests.py --site "$SITE" --out "$OUT" \
  "${KERNEL_TESTS[@]}"
phase ceilings 15 "${PY[@]}" benchmarks/gpu_ceilings.py --out "$OUT" "${SMOKE[@]}"
phase roofline 10 "${PY[@]}" benchmarks/roofline.py --ceilings "$OUT/ceilings.json" --out "$OUT"
phase contrastive_gpu 80 "${PY[@]}" benchmarks/bench_contrastive_gpu.py --out "$OUT" --budget-s 65 "${SMOKE[@]}"
phase cross_attention 65 "${PY[@]}" benchmarks/bench_cross_attention.py --out "$OUT" "${SMOKE[@]}"
phase step_b16 85 env R2D2DS_AUTOTUNE=0 "${PY[@]}" benchmarks/bench_step.py --out "$OUT" --json step_b16.json \
  "${STEP_B16[@]}"
phase step_l14 55 env R2D2DS_AUTOTUNE=0 "${PY[@]}" benchmarks/bench_step.py --out "$OUT" --json step_l14.json \
  "${STEP_L14[@]}"
gradcache_gpu

"${PY[@]}" benchmarks/summarize_gpu.py "$OUT" --check >"$OUT/summary.md"
status=$?
cat "$OUT/summary.md"
exit $status
