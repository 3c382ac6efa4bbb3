#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: creates the project's virtual environment when it is missing
# and installs r2d2ds into it. A torch that is already installed (a GPU box) is reused and never replaced.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${R2D2DS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[env] creating $VENV on top of the installed torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "[env] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
# Re-install only when the dependency list changed.
STAMP="$VENV/.r2d2ds-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
# mpi4py (mpirun launches) needs an MPI library, its compiler wrapper and mpirun. As root on Debian/Ubuntu (CI, a
# fresh container) install Open MPI when it is missing; elsewhere load your cluster's MPI module first.
if ! command -v mpicc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[env] installing Open MPI (openmpi-bin libopenmpi-dev) for mpi4py"
  (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq \
    && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev \
    >/dev/null)
fi
if [ ! -f "$STAMP" ]; then
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    # The CPU build of this version lies on these machines' disk; torchvision 0.28.0 is the one that matches it.
    "${PIP[@]}" "torch==2.13.0" "torchvision==0.28.0"
  fi
  # Pin what is installed so no dependency can pull a different torch/triton (a multi-GB CUDA build).
  CONSTRAINTS="$VENV/r2d2ds-constraints.txt"
  "$VENV/bin/python" - > "$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
  EXTRAS="test"
  "$VENV/bin/python" -c "import triton" >/dev/null 2>&1 || EXTRAS="test,triton"
  (cd "$ROOT" && "${PIP[@]}" -c "$CONSTRAINTS" -e ".[$EXTRAS]")
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# DeepSpeed JIT-builds its CPU shared-memory collective once (~60 s); keep the build inside the project.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
