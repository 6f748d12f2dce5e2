#!/usr/bin/env bash
# Prepare .gpu-pack/: everything bench/gpu/run.sh needs on the lent GPU machine beyond its own image
# (bench/gpu/lent_image.txt) and this working tree, at most 45 MiB, for one Python version.
#
#   bash bench/gpu/pack.sh [--python X.Y] [--out DIR] [--max-mib N] [--fast]
#       defaults: 3.12 (the lent machine's), .gpu-pack, 45 (what may travel); --fast compresses with xz -0 on
#       every core instead of -6/-9 on one: a pack some 30 % larger in seconds instead of minutes, for a pack
#       that never travels (bench/gpu/quick.sh)
#
# Contents (MANIFEST.json lists files and sizes):
#   wheels/           wheels missing there: anndata and its deps (zarr, which it imports), tritonclient +
#                     python-rapidjson,
#                     and the ORIGINAL scgpt 0.2.4 (the comparison); installed with pip --no-index --no-deps
#   triton.tar.xz     nvidia-pytriton 0.7.0's Triton server trimmed to what ldd shows the server, the python
#                     backend and the X.Y stub load (its bundled Python 3.13 and other stubs stay behind)
#   stub-numpy.tar.xz numpy 1.26.4 for the stubs: the python backend stub corrupts numpy 2 arrays (measured:
#                     as_numpy() hands a model zeros, BYTES inputs abort the stub), and the lent image has numpy 2
#   libpython.tar.xz  (when this machine has a shared libpython X.Y) a stripped copy, used there only if the
#                     image lacks libpythonX.Y.so.1.0, which every stub links
#   wu2020.npz        the real cells: scirpy's Wu et al. 2020 T cells (200 cells, raw counts, CSR) and gene names
# Needs the project's .venv (pip with access to a package index, downloads cached; h5py) or PACK_PYTHON, unzip,
# xz, ldd and strip.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYVER=3.12
OUT="$REPO_ROOT/.gpu-pack"
MAX_MIB=45
FAST=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --max-mib) MAX_MIB="$2"; shift 2 ;;
        --fast) FAST=1; shift ;;
        *) echo "usage: bash bench/gpu/pack.sh [--python X.Y] [--out DIR] [--max-mib N] [--fast]" >&2; exit 2 ;;
    esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "[pack] --python wants X.Y, got $PYVER" >&2; exit 2; }
LIMIT=$((MAX_MIB * 1024 * 1024))
PY="${PACK_PYTHON:-$REPO_ROOT/.venv/bin/python}"  # pip, and h5py to read the cells
log() { printf '[pack] %s\n' "$*"; }
compress() {  # compress LEVEL: xz stdin to stdout at LEVEL on one core, or at 0 on every core with --fast
    if (( FAST )); then xz -T0 -0; else xz -T1 "-$1"; fi
}

# Client-side wheels missing from the lent image (pure python, or binary for PYVER).
WHEELS=(anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3
        "zarr>=3.1" "numcodecs>=0.16.6,!=0.17.0" donfig google-crc32c msgspec
        tritonclient==2.73.0 python-rapidjson==1.25 scgpt==0.2.4)
PLATFORMS=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
download() {  # download DEST SPEC...: binary wheels for PYVER, no dependencies
    local dest="$1"; shift
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp "${PLATFORMS[@]}" -d "$dest" "$@" 2>&1 | grep -v '^WARNING: Location' || true
    for spec in "$@"; do
        local name="${spec%%[=<>]*}"
        ls "$dest"/"${name//-/_}"-*.whl >/dev/null 2>&1 || ls "$dest"/"$name"-*.whl >/dev/null 2>&1 \
            || { echo "[pack] ERROR: no wheel of $spec for Python $PYVER" >&2; exit 1; }
    done
}

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/scgpt-gpu-pack.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/pack/wheels"

log "wheels for Python $PYVER: ${WHEELS[*]}"
download "$STAGE/pack/wheels" "${WHEELS[@]}"

log "numpy<2 for the python backend stubs"
download "$STAGE/numpy" numpy==1.26.4
mkdir -p "$STAGE/stub-numpy"
unzip -q "$STAGE"/numpy/numpy-*.whl -d "$STAGE/stub-numpy"
rm -rf "$STAGE"/stub-numpy/numpy-*.data
tar -C "$STAGE/stub-numpy" -cf - . | compress 6 > "$STAGE/pack/stub-numpy.tar.xz"

log "Triton server from nvidia-pytriton 0.7.0, trimmed with ldd"
download "$STAGE/pytriton" nvidia-pytriton==0.7.0
T="$STAGE/triton"
mkdir -p "$T"
unzip -q "$STAGE"/pytriton/nvidia_pytriton-*.whl -d "$T" \
    'pytriton/tritonserver/bin/tritonserver' 'pytriton/tritonserver/backends/python/*' \
    "pytriton/tritonserver/python_backend_stubs/$PYVER/*" 'nvidia_pytriton.libs/*'
rm -rf "$T/pytriton/tritonserver/backends/python/__pycache__"
STUB="$T/pytriton/tritonserver/python_backend_stubs/$PYVER/triton_python_backend_stub"
[[ -f "$STUB" ]] || { echo "[pack] ERROR: nvidia-pytriton has no stub for Python $PYVER" >&2; exit 1; }
chmod +x "$T/pytriton/tritonserver/bin/tritonserver" "$STUB"
LIBS="$T/nvidia_pytriton.libs"
needed="$(for bin in "$T/pytriton/tritonserver/bin/tritonserver" \
                    "$T/pytriton/tritonserver/backends/python/libtriton_python.so" "$STUB"; do
              LD_LIBRARY_PATH="$LIBS" ldd "$bin"; done)"
if grep 'not found' <<<"$needed" | grep -v "libpython$PYVER.so" >&2; then
    echo "[pack] ERROR: the Triton server needs libraries that are neither bundled nor on this system" >&2
    exit 1
fi
kept=0
for lib in "$LIBS"/*; do
    if grep -qF "$(basename "$lib")" <<<"$needed"; then kept=$((kept + 1)); else rm -f "$lib"; fi
done
log "kept $kept of nvidia_pytriton.libs (those ldd resolves for the server, the python backend and the stub)"
tar -C "$T" -cf - . | compress 9 > "$STAGE/pack/triton.tar.xz"

LIBPY=""  # a shared libpython of this version here: the system's, or a pyenv build
for cand in "$("python$PYVER" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))' 2>/dev/null)" \
            /usr/lib/x86_64-linux-gnu "$HOME"/.pyenv/versions/"$PYVER".*/lib; do
    if [[ -n "$cand" && -f "$cand/libpython$PYVER.so.1.0" ]]; then LIBPY="$cand/libpython$PYVER.so.1.0"; break; fi
done
if [[ -n "$LIBPY" ]]; then
    log "fallback libpython$PYVER from $LIBPY (stripped)"
    mkdir -p "$STAGE/libpython"
    cp "$LIBPY" "$STAGE/libpython/"
    strip --strip-unneeded "$STAGE/libpython/$(basename "$LIBPY")" 2>/dev/null || true
    tar -C "$STAGE/libpython" -cf - . | compress 9 > "$STAGE/pack/libpython.tar.xz"
else
    log "no shared libpython$PYVER here: the pack carries none (the lent image must have one for Triton)"
fi

log "real cells: scirpy's wu2020 (200 T cells)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$STAGE/scirpy" scirpy==0.22.5 2>&1 \
    | grep -v '^WARNING: Location' || true
unzip -q -o "$STAGE"/scirpy/scirpy-*.whl 'scirpy/tests/data/wu2020_200_v0_11.h5ad' -d "$STAGE/scirpy"
"$PY" - "$STAGE/scirpy/scirpy/tests/data/wu2020_200_v0_11.h5ad" "$STAGE/pack/wu2020.npz" <<'PY'
import sys

import h5py
import numpy as np

# Read the raw counts (CSR) and gene names with h5py alone, so packing needs no anndata.
with h5py.File(sys.argv[1], "r") as f:
    X = f["X"]
    names = f["var"][f["var"].attrs["_index"]][:]
    np.savez_compressed(sys.argv[2], data=X["data"][:].astype(np.float32), indices=X["indices"][:].astype(np.int32),
                        indptr=X["indptr"][:].astype(np.int64), shape=np.array(X.attrs["shape"]),
                        genes=np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names]))
PY

"$PY" - "$STAGE/pack" "$PYVER" <<'PY'
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
(root / "MANIFEST.json").write_text(json.dumps({"python": sys.argv[2], "bytes": sum(files.values()), "files": files},
                                               indent=1) + "\n")
PY
total=$(du -sb "$STAGE/pack" | cut -f1)
if (( total > LIMIT )); then
    echo "[pack] ERROR: the pack is $total bytes, over the $MAX_MIB MiB limit; its largest files:" >&2
    (cd "$STAGE/pack" && find . -type f -printf '%s %p\n' | sort -rn | head -8) >&2
    exit 1
fi
rm -rf "$OUT.tmp" && mv "$STAGE/pack" "$OUT.tmp" && rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
log "wrote $OUT: $((total / 1024 / 1024)) MiB ($total bytes) for Python $PYVER"
