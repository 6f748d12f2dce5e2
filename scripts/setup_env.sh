#!/usr/bin/env bash
# Create or update the project's virtual environment (idempotent).
#
#   bash scripts/setup_env.sh [VENV_DIR]      # default: .venv in the repo root
#
# 1. a Python 3.11 venv;
# 2. torch==2.13.0 first, pinned: pip takes the CPU wheel from the local
#    find-links here, instead of resolving "torch>=2.4" to a multi-GB CUDA build;
# 3. the project itself, editable, with its test, demo, export, serve (tritonclient) and soma (tiledbsoma) extras;
# 4. the ORIGINAL scGPT 0.2.4 (reference for parity tests) and scirpy 0.22.5
#    (only for its bundled real data file), both --no-deps: their dependency
#    pins (torchtext, old numpy, mudata, ...) do not install on torch 2.13;
#    tests/reference.py stands in for torchtext, IPython, datasets and
#    flash-attn instead. What scgpt imports at module level beyond that
#    (networkx, seaborn, typing_extensions) is installed explicitly;
# 5. the Triton server environment .venv-triton (scripts/setup_triton_server.sh: nvidia-pytriton's
#    real Triton server with numpy<2) for tests/test_triton.py and `scgpt-hf serve`; only for the
#    default VENV_DIR (SKIP_TRITON_SERVER=1 skips it).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"

TORCH_SPEC="torch==2.13.0"
REFERENCE_SPECS=(scgpt==0.2.4 scirpy==0.22.5)
REFERENCE_IMPORT_DEPS=(networkx seaborn typing_extensions)

log() { printf '[setup_env] %s\n' "$*"; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "[setup_env] ERROR: $PYTHON not found (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

VPY="$VENV_DIR/bin/python"
if [[ -x "$VPY" ]] && "$VPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    log "reusing $VENV_DIR"
else
    log "creating $VENV_DIR with $PYTHON"
    "$PYTHON" -m venv --clear "$VENV_DIR"
fi

PIP=("$VPY" -m pip --disable-pip-version-check --no-input -q)

log "installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"

log "installing the project (editable) with extras test,demo,export,serve,soma"
"${PIP[@]}" install -e "$REPO_ROOT[test,demo,export,serve,soma]" "$TORCH_SPEC"

log "installing reference code and data: ${REFERENCE_SPECS[*]} (--no-deps)"
"${PIP[@]}" install "${REFERENCE_IMPORT_DEPS[@]}" "$TORCH_SPEC"
"${PIP[@]}" install --no-deps "${REFERENCE_SPECS[@]}"

"$VPY" - <<'PY'
import importlib.util
import sys

import torch

if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"[setup_env] ERROR: expected torch 2.13.0, got {torch.__version__}")
for name in ("scgpt", "scirpy", "tiledbsoma"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f"[setup_env] ERROR: {name} is not importable after install")
print(f"[setup_env] ready: python {sys.version.split()[0]}, torch {torch.__version__}")
PY

if [[ -z "${1:-}" && "${SKIP_TRITON_SERVER:-0}" != "1" ]]; then
    bash "$REPO_ROOT/scripts/setup_triton_server.sh"
fi
