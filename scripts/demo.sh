#!/usr/bin/env bash
# The main job (README): creates the environment if missing, writes the built-in synthetic dataset once, then
# trains R2D2 on 2 CPU ranks with DeepSpeed ZeRO-2 and prints two-stage retrieval on the held-out split.
# Extra arguments are config overrides, e.g. --train.steps=100 or --train.ds_config=ds_configs/zero3.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
DATA=.cache/data/synthetic
if [ ! -f "$DATA/manifest.json" ]; then
  python -m r2d2ds.data.prepare synthetic --out "$DATA" --seed 0
fi
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The demo run directory is started over on every run (train.overwrite) unless --resume is given.
OVERWRITE=--train.overwrite=true
for arg in "$@"; do [ "$arg" = --resume ] && OVERWRITE=""; done
exec deepspeed --num_gpus "${NUM_RANKS:-2}" --master_addr 127.0.0.1 --master_port "$PORT" \
  train.py --config configs/demo.yaml $OVERWRITE "$@"
