#!/usr/bin/env bash
# The GPU suite in quick mode on this CPU machine, exactly as the lent GPU machine would run it: a virtual
# environment holding only what the lent image holds (bench/gpu/lent_image.txt, cached in .venv-gpu-quick;
# distributions the project's .venv holds at the resolved version are hard-linked from it), a pack for this
# Python (bench/gpu/pack.sh --fast, cached in .gpu-pack-quick while pack.sh is unchanged), then
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

pip_quiet() {  # pip in $VENV without the index's "Location ... is ignored" warnings; fails when pip fails
    "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}

build_venv() {
    log "building $VENV from bench/gpu/lent_image.txt"
    SECONDS=0
    "$PYTHON" -m venv --clear --upgrade-deps "$VENV"  # a current pip: it resolves 3x faster than 3.11's own
    # Resolve once; what the project's .venv holds at the resolved version (44 of 53, torch among them) is
    # hard-linked from it instead of unpacked and byte-compiled again, pip installs the others at their resolved
    # versions. Console scripts are not linked: they name .venv's interpreter.
    pip_quiet install --dry-run --report "$VENV/resolved.json" -r "$REPO_ROOT/bench/gpu/lent_image.txt"
    "$VENV/bin/python" - "$VENV/resolved.json" "$REPO_ROOT/.venv" > "$VENV/to_install.txt" <<'PY'
import json
import os
import re
import shutil
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


target = Path(sysconfig.get_paths()["purelib"])
source = Path(sys.argv[2]) / target.relative_to(sys.prefix)
held = {key(d.metadata["Name"]): d for d in distributions(path=[str(source)])} if source.is_dir() else {}
present = {key(d.metadata["Name"]) for d in distributions(path=[str(target)])}
for item in json.loads(Path(sys.argv[1]).read_text())["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    dist = held.get(key(name))
    if key(name) in present or dist is None or dist.version != version or not dist.files:
        print(f"{name}=={version}")
        continue
    for file in dist.files:
        if file.parts[0] == ".." or not (source / file).is_file():
            continue
        (target / file).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / file, target / file)
        except OSError:  # another file system
            shutil.copy2(source / file, target / file)
PY
    mapfile -t rest < "$VENV/to_install.txt"
    log "the rest linked from .venv; installing ${#rest[@]}: ${rest[*]}"
    if (( ${#rest[@]} )); then
        pip_quiet install --no-deps "${rest[@]}"
    fi
    "$VENV/bin/python" -c 'import torch, transformers, numpy' || { log "ERROR: $VENV is incomplete"; exit 1; }
    echo "$venv_key" > "$VENV/.lent_image"
    log "built $VENV in ${SECONDS}s"
}

build_pack() {
    log "packing for Python $PYVER into $PACK"
    SECONDS=0
    bash "$REPO_ROOT/bench/gpu/pack.sh" --out "$PACK" "${PACK_ARGS[@]}"
    echo "$pack_key" > "$PACK/.pack_sh"
    log "packed in ${SECONDS}s"
}

PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
venv_key="$(sha256sum "$REPO_ROOT/bench/gpu/lent_image.txt" | cut -c1-16) $PYVER"
# This pack never travels: compressed fast, 60 MiB for Python 3.11 (whose numcodecs wheel alone is 9 MB,
# 1.4 MB for 3.12), over the 45 MiB that may travel.
PACK_ARGS=(--python "$PYVER" --max-mib 80 --fast)
pack_key="$(sha256sum "$REPO_ROOT/bench/gpu/pack.sh" | cut -c1-16) ${PACK_ARGS[*]}"
# Both at once on a clean clone, each in its own process: either keeps one core busy most of the time.
jobs=()
if [[ "$(cat "$VENV/.lent_image" 2>/dev/null)" != "$venv_key" ]]; then
    build_venv &
    jobs+=($!)
fi
if [[ "$(cat "$PACK/.pack_sh" 2>/dev/null)" != "$pack_key" ]]; then
    build_pack &
    jobs+=($!)
fi
failed=0
for job in "${jobs[@]}"; do
    wait "$job" || failed=1
done
(( ! failed )) || { log "ERROR: building $VENV or $PACK failed (above)"; exit 1; }
# One thread per process (as the Triton server's already run): the tiny model's operations are too small to
# share between threads, which on a busy machine mostly wait for each other (a warm run here: 52 CPU-s against 74).
OMP_NUM_THREADS=1 SCGPT_GPU_SUITE_QUICK=1 SCGPT_GPU_SUITE_PYTHON="$VENV/bin/python" SCGPT_GPU_PACK="$PACK" \
    bash "$REPO_ROOT/bench/gpu/run.sh" "$OUT"
