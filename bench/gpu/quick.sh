#!/usr/bin/env bash
# The GPU suite in quick mode on this CPU machine, exactly as the lent GPU machine would run it: a virtual
# environment holding only what the lent image holds (bench/gpu/lent_image.txt, cached in .venv-gpu-quick),
# a pack for this Python (bench/gpu/pack.sh, cached in .gpu-pack-quick while pack.sh is unchanged), then
# bench/gpu/run.sh with SCGPT_GPU_SUITE_QUICK=1 (tiny model, a few cells, CPU, every section).
#
#   bash bench/gpu/quick.sh OUT_DIR
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:?usage: bash bench/gpu/quick.sh OUT_DIR}"
VENV="$REPO_ROOT/.venv-gpu-quick"
PACK="$REPO_ROOT/.gpu-pack-quick"
PYTHON="${PYTHON:-python3.11}"
log() { printf '[quick] %s\n' "$*"; }

image_hash="$(sha256sum "$REPO_ROOT/bench/gpu/lent_image.txt" | cut -c1-16)"
if [[ "$(cat "$VENV/.lent_image" 2>/dev/null)" != "$image_hash" ]]; then
    log "building $VENV from bench/gpu/lent_image.txt"
    SECONDS=0
    "$PYTHON" -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REPO_ROOT/bench/gpu/lent_image.txt" 2>&1 \
        | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c 'import torch, transformers, numpy' || { log "ERROR: $VENV is incomplete"; exit 1; }
    echo "$image_hash" > "$VENV/.lent_image"
    log "built $VENV in ${SECONDS}s"
fi
PYVER="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
pack_hash="$(sha256sum "$REPO_ROOT/bench/gpu/pack.sh" | cut -c1-16)-$PYVER"
if [[ "$(cat "$PACK/.pack_sh" 2>/dev/null)" != "$pack_hash" ]]; then
    log "packing for Python $PYVER into $PACK"
    SECONDS=0
    # This pack never travels; for Python 3.11 it exceeds 45 MiB by numcodecs alone (9 MB, 1.4 MB for 3.12).
    bash "$REPO_ROOT/bench/gpu/pack.sh" --python "$PYVER" --out "$PACK" --max-mib 56
    echo "$pack_hash" > "$PACK/.pack_sh"
    log "packed in ${SECONDS}s"
fi
SCGPT_GPU_SUITE_QUICK=1 SCGPT_GPU_SUITE_PYTHON="$VENV/bin/python" SCGPT_GPU_PACK="$PACK" \
    bash "$REPO_ROOT/bench/gpu/run.sh" "$OUT"
