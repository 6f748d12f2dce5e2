#!/usr/bin/env bash
# The GPU suite, as the lent GPU machine runs it: from the repository root, with .gpu-pack carried, no network.
#
#   bash bench/gpu/run.sh OUT_DIR
#   SCGPT_GPU_SUITE_QUICK=1 SCGPT_GPU_SUITE_PYTHON=.venv-gpu-quick/bin/python bash bench/gpu/run.sh OUT_DIR
#
# 1. records what the machine offers, first of all whether its Python has the shared libpython every Triton
#    python-backend stub links (ldconfig, sysconfig LDLIBRARY/LIBDIR), then the GPU, CPU flags and packages;
# 2. installs from the pack alone: wheels (pip --no-index --no-deps --target), this package (copied from
#    the working tree), and a server environment for Triton: a virtual environment of the same Python
#    holding the trimmed Triton server and numpy<2 for its stubs (the stubs borrow torch and transformers
#    from the machine's own environment, see scgpt_hf.serving.TritonServer python_path);
# 3. runs bench/gpu/suite.py (correctness, scgpt_hf.embed vs the original, Triton), which writes
#    OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.md, and prints the table.
# Quick mode (SCGPT_GPU_SUITE_QUICK=1): tiny model, a few cells, CPU; every section still runs.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:?usage: bash bench/gpu/run.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${SCGPT_GPU_SUITE_PYTHON:-python3}"
PACK="${SCGPT_GPU_PACK:-$REPO_ROOT/.gpu-pack}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/scgpt-gpu-suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log() { printf '[run] %s\n' "$*" | tee -a "$OUT/run.log"; }
: > "$OUT/run.log"

PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
{
    echo "== libpython$PYVER (every python-backend stub links it)"
    ldconfig -p 2>/dev/null | grep "libpython$PYVER" || echo "ldconfig: no libpython$PYVER"
    "$PY" -c "import sysconfig; print('LDLIBRARY', sysconfig.get_config_var('LDLIBRARY'), 'LIBDIR', sysconfig.get_config_var('LIBDIR'), 'INSTSONAME', sysconfig.get_config_var('INSTSONAME'))"
    echo "== python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0], sys.prefix, sys.base_prefix)')"
    echo "== gpu"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    echo "== cpu: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|amx_tile|amx_bf16)$' | tr '\n' ' '; echo
    echo "== packages"
    "$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|numpy|scipy|pandas|h5py|grpcio|protobuf|onnx|onnxruntime|huggingface.hub|safetensors|accelerate|tqdm|packaging)=='
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [[ ! -f "$PACK/MANIFEST.json" ]]; then
    log "ERROR: no pack at $PACK: run bash bench/gpu/pack.sh --python $PYVER on a machine with network first"
    exit 1
fi
PACKVER="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"])' "$PACK/MANIFEST.json")"
if [[ "$PACKVER" != "$PYVER" ]]; then
    log "ERROR: the pack is for Python $PACKVER but $PY is Python $PYVER: bash bench/gpu/pack.sh --python $PYVER"
    exit 1
fi

SECONDS=0
SITE="$WORK/site"
log "installing the pack's wheels into $SITE"
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE" \
    "$PACK"/wheels/*.whl >> "$OUT/run.log" 2>&1 || { log "ERROR: pip install from the pack failed"; exit 1; }
log "installing scgpt-hf from the working tree (the package layout of pyproject.toml, no build)"
cp -r "$REPO_ROOT/scgpt_hf" "$SITE/scgpt_hf" && rm -rf "$SITE/scgpt_hf/export" "$SITE/scgpt_hf/model_cards" \
    && cp -r "$REPO_ROOT/export" "$SITE/scgpt_hf/export" && cp -r "$REPO_ROOT/model_cards" "$SITE/scgpt_hf/model_cards" \
    || { log "ERROR: copying scgpt_hf failed"; exit 1; }
find "$SITE/scgpt_hf" -name __pycache__ -prune -exec rm -rf {} +

TENV="$WORK/triton-env"
log "server environment $TENV: Triton (trimmed), numpy<2 for the stubs"
if "$PY" -m venv --without-pip "$TENV" >> "$OUT/run.log" 2>&1; then
    TSITE="$("$TENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    mkdir -p "$TSITE"
    tar -C "$TSITE" -xJf "$PACK/triton.tar.xz" && tar -C "$TSITE" -xJf "$PACK/stub-numpy.tar.xz"
    LIBDIR="$("$TENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
    if [[ ! -e "$LIBDIR/libpython$PYVER.so.1.0" ]] && ! ldconfig -p 2>/dev/null | grep -q "libpython$PYVER.so.1.0"; then
        if [[ -f "$PACK/libpython.tar.xz" ]]; then
            log "this Python has no shared libpython$PYVER: using the pack's (the stubs link it)"
            tar -C "$TSITE/nvidia_pytriton.libs" -xJf "$PACK/libpython.tar.xz"
        else
            log "WARNING: no shared libpython$PYVER here nor in the pack: Triton's python backend stubs cannot start"
        fi
    fi
    export SCGPT_HF_TRITON_ENV="$TENV"
else
    log "WARNING: could not make a virtual environment with $PY: the Triton section will fail"
fi
log "installed in ${SECONDS}s"

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$WORK" || exit 1  # never import scgpt_hf from the working tree: the installed copy is what runs
"$PY" "$REPO_ROOT/bench/gpu/suite.py" "$OUT" --pack "$PACK" 2>&1 | tee -a "$OUT/run.log"
status=${PIPESTATUS[0]}
log "suite exit $status after ${SECONDS}s"
exit "$status"
