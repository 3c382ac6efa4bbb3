#!/usr/bin/env bash
# Run on the CPU machine before a GPU check: puts the wheels the GPU image lacks (deepspeed, webdataset, inf-cl,
# and r2d2ds itself, so that kernels/ imports as r2d2ds.kernels) into .gpu_wheels/, which git ignores and the
# device run carries. The GPU image has torch, triton, transformers, timm and numpy (DESIGN.md section 7).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
W=.gpu_wheels
rm -rf "$W" && mkdir -p "$W"
python -m pip wheel -q --no-deps --no-build-isolation -w "$W" .
python -m pip wheel -q --no-deps -w "$W" deepspeed webdataset
# Binary-only packages for the GPU image's Python (3.12, manylinux x86_64); pure-Python ones fit any.
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$W" inf-cl braceexpand || true
ls -la "$W"
