#!/usr/bin/env bash
# Run on the CPU machine (with network) before a GPU check: puts every wheel the GPU image lacks into .gpu_wheels/
# (git ignores it; the device run carries it): r2d2ds itself (so that kernels/ imports as r2d2ds.kernels), pytest
# and its dependencies and scipy (the kernel tests), inf-cl (the contrastive benchmark's baseline), deepspeed and
# the dependencies the image lacks (the step phases: bench_step.py trains through a ZeRO-2 engine), and
# webdataset, braceexpand (not used by the check; there so the image can run more). The GPU image has Python
# 3.12, torch, triton, transformers, timm, numpy and mpi4py (DESIGN.md section 7).
#
#   bash benchmarks/prepare_gpu_check.sh [--wheels DIR] [--rehearse]
#
# --rehearse (the CPU rehearsal, no network): only r2d2ds's own wheel, since this machine's environment already
# has everything else.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="$ROOT/.gpu_wheels"
REHEARSE=0
while (($#)); do
  case "$1" in
    --wheels) W="$2"; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    *) echo "usage: $0 [--wheels DIR] [--rehearse]" >&2; exit 2 ;;
  esac
done
if ((REHEARSE)); then
  python() { "${PYTHON:-python3}" "$@"; }  # the caller's environment (CI's), which has setuptools and wheel
else
  source "$ROOT/scripts/env.sh"
fi
cd "$ROOT"
rm -rf "$W" && mkdir -p "$W"
W="$(cd "$W" && pwd)"
# Build from a clean copy of the working tree (tracked and new files, not ignored ones): setuptools never empties
# build/, so a file deleted from the source would otherwise still ship in the wheel.
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [[ -e "$f" ]] && printf '%s\0' "$f"
done | tar -cf - --null -T - | tar -xf - -C "$SRC"
python -m pip wheel -q --no-deps --no-build-isolation -w "$W" "$SRC"
if ((REHEARSE)); then
  ls -la "$W"
  exit 0
fi
# Binary packages for the GPU image's Python (3.12, manylinux x86_64); pure-Python ones fit any.
FOR_GPU=(--no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
         --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$W")
python -m pip download -q "${FOR_GPU[@]}" pytest pluggy iniconfig pygments packaging scipy
python -m pip download -q "${FOR_GPU[@]}" inf-cl braceexpand ||
  echo "warning: inf-cl has no wheel for the GPU image: its benchmark row will say so" >&2
python -m pip wheel -q --no-deps -w "$W" deepspeed webdataset
# deepspeed's requirements beyond torch, numpy, packaging and tqdm (which the image has), resolved together so
# pydantic gets the pydantic-core it pins (that download resolves dependencies: no --no-deps)
python -m pip download -q "${FOR_GPU[@]:1}" hjson msgpack psutil py-cpuinfo "pydantic>=2" einops ninja
ls -la "$W"
du -sh "$W"
