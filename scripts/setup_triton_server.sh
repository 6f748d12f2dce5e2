#!/usr/bin/env bash
# Create or update the Triton server environment used by `scgpt-hf serve` and tests/test_triton.py
# (idempotent).
#
#   bash scripts/setup_triton_server.sh [VENV_DIR]     # default: .venv-triton in the repo root
#
# The PyPI wheel nvidia-pytriton==0.7.0 ships a real Triton Inference Server 2.51 (CPU capable,
# python backend only). It gets its own virtual environment because the python backend stub needs
# numpy<2 (with numpy 2 it answers "output tensor shape does not match"), while the library and
# its clients use numpy 2. onnxruntime is there for the CPU encoder model (a python-backend model
# that runs the exported ONNX graph); the tokenizer model needs numpy only.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv-triton}"
PYTHON="${PYTHON:-python3.11}"
SPECS=("nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.18")

log() { printf '[setup_triton_server] %s\n' "$*"; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "[setup_triton_server] ERROR: $PYTHON not found (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
VPY="$VENV_DIR/bin/python"
if [[ -x "$VPY" ]] && "$VPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    log "reusing $VENV_DIR"
else
    log "creating $VENV_DIR with $PYTHON"
    "$PYTHON" -m venv --clear "$VENV_DIR"
fi
log "installing ${SPECS[*]}"
"$VPY" -m pip --disable-pip-version-check --no-input -q install "${SPECS[@]}"

"$VPY" - <<'PY'
import pathlib
import sys

import numpy
import pytriton

root = pathlib.Path(pytriton.__file__).parent
server = root / "tritonserver" / "bin" / "tritonserver"
ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
stub = root / "tritonserver" / "python_backend_stubs" / ver / "triton_python_backend_stub"
for path in (server, stub, root / "tritonserver" / "backends" / "python" / "libtriton_python.so"):
    if not path.exists():
        sys.exit(f"[setup_triton_server] ERROR: {path} missing from nvidia-pytriton")
if int(numpy.__version__.split(".")[0]) >= 2:
    sys.exit(f"[setup_triton_server] ERROR: the server environment needs numpy<2, got {numpy.__version__}")
print(f"[setup_triton_server] ready: {server} (python {ver}, numpy {numpy.__version__})")
PY
