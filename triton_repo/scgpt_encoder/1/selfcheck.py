"""How close an exported graph must stay to PyTorch, and the self-check that every load of a graph runs.

numpy only: `onnx_export` uses it to validate exports and in `OnnxScGPT`, and the Triton CPU encoder (a
python-backend model in a stock Triton container) loads the copy written beside its ``model.py``.

An export writes ``selfcheck.npz`` beside ``model.onnx``: a padded batch of a few real cells (every graph
input) and PyTorch's fp32 outputs for them; the graph's metadata records the file's sha256. Loading runs the
graph on those cells and holds the outputs to the bound of the graph's precision, so a host whose kernels
compute the graph differently (int8 on a CPU whose u8s8 kernels saturate, say) is caught at load, not in
the answers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FILE = "selfcheck.npz"
METADATA_KEY = "scgpt_hf.selfcheck_sha256"
# Bounds against PyTorch fp32, for export validation and the self-check alike.
FP32_MAX_ABS = 1e-4
MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
# Outputs with one row per cell; every other output has one value (or vector) per token.
PER_CELL_OUTPUTS = frozenset({"cell_embedding", "batch_embedding", "logits", "batch_logits"})
ON_FAILURE = ("raise", "warn")


class SelfCheckError(RuntimeError):
    """This host computes an exported graph outside its precision's bound (or its reference is missing)."""


def criterion(precision: str) -> str:
    """The bound a graph of this precision is held to, in words."""
    if precision == "fp32":
        return f"max |onnx - torch| <= {FP32_MAX_ABS:g} at non-padded positions"
    return f"cell_embedding cosine >= {MIN_COSINE[precision]} per cell"


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def compare(name: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Max abs difference (non-padded positions only) and, for cell-level outputs, the per-cell cosine."""
    if got.shape != ref.shape:
        raise ValueError(f"output {name!r}: ONNX shape {got.shape} != PyTorch shape {ref.shape}")
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    if name in PER_CELL_OUTPUTS:
        out = {"max_abs_diff": float(np.abs(got - ref).max()), "min_cosine": float(_cosine_rows(ref, got).min())}
    else:
        keep = mask.astype(bool)  # (n_real_tokens, ...): padded positions are never compared
        a, b = ref[keep].ravel(), got[keep].ravel()
        out = {"max_abs_diff": float(np.abs(a - b).max()),
               "cosine": float((a @ b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))}
    out["max_abs_ref"] = float(np.abs(ref).max())
    out["finite"] = bool(np.isfinite(got).all())
    return out


def within_bound(precision: str, figures: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether `compare` figures of every output meet the bound of `precision` (NaN never does)."""
    if not all(f["finite"] for f in figures.values()):
        return False
    if precision == "fp32":
        return all(f["max_abs_diff"] <= FP32_MAX_ABS for f in figures.values())
    cell = figures.get("cell_embedding")
    return cell is None or cell["min_cosine"] >= MIN_COSINE[precision]


def worst(precision: str, figures: Mapping[str, Mapping[str, Any]]) -> str:
    """The figure that decides `within_bound`, in words (for one-line messages)."""
    if precision != "fp32" and "cell_embedding" in figures:
        return f"cell_embedding cosine {figures['cell_embedding']['min_cosine']:.4f}"
    name = max(figures, key=lambda n: (not figures[n]["finite"], figures[n]["max_abs_diff"]))
    return f"{name} max |d| {figures[name]['max_abs_diff']:.2e}" + ("" if figures[name]["finite"] else " (non-finite)")


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (ONNX models can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(path: str | os.PathLike, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> str:
    """Write the self-check cells (graph inputs) and PyTorch's outputs for them; returns the file's sha256."""
    arrays = {f"input.{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"output.{k}": np.asarray(v, dtype=np.float32) for k, v in outputs.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return sha256(path)


def cpu_features() -> list[str]:
    """The CPU's int8-relevant x86 features from /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(set(flags) & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"})


def run(session: Any, folder: str | os.PathLike, *, on_failure: str = "raise") -> dict[str, Any]:
    """Run an exported graph (an ONNX Runtime session) on its stored cells and hold it to its precision's bound.

    Raises `SelfCheckError` naming the problem and the way out when the outputs are outside the bound, or the
    check cannot run (no reference in the export, its file missing or another graph's); with
    ``on_failure="warn"`` it warns instead. Returns the figures (``passed``, ``outputs``, ``criterion``).
    """
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")
    meta = session.get_modelmeta().custom_metadata_map
    precision = meta.get("scgpt_hf.precision", "fp32")
    want = meta.get(METADATA_KEY)
    path = Path(folder) / FILE
    if not want:
        problem = ("this graph was exported without a self-check reference (by an earlier scgpt-hf), so nothing "
                   "tells whether this host computes it within its bound. Re-export it with `scgpt-hf export onnx`")
    elif not path.is_file():
        problem = (f"{path} is missing: it holds the cells this {precision} graph is checked on at load. Copy it "
                   "together with model.onnx (or re-export)")
    elif sha256(path) != want:
        problem = f"{path} is not the self-check reference this graph was exported with. Copy the pair again"
    else:
        with np.load(path, allow_pickle=False) as stored:
            feed = {k[len("input."):]: stored[k] for k in stored.files if k.startswith("input.")}
            ref = {k[len("output."):]: stored[k] for k in stored.files if k.startswith("output.")}
        names = list(ref)
        got = dict(zip(names, session.run(names, feed)))
        figures = {n: compare(n, ref[n], got[n], feed["attention_mask"]) for n in names}
        result = {"passed": within_bound(precision, figures), "criterion": criterion(precision), "outputs": figures}
        if result["passed"]:
            return result
        way_out = {"int8": "Re-export it with this version of scgpt-hf (7-bit int8 weights, which no x86 kernel "
                           "saturates) or serve the fp32 graph",
                   "fp16": "fp16 graphs are meant for CUDA hosts: serve the fp32 graph here",
                   "fp32": "Re-export it; if that fails too, please report it with these figures"}[precision]
        problem = (f"this host computes the {precision} graph outside its bound on the stored cells: "
                   f"{worst(precision, figures)} ({criterion(precision)}; CPU features: "
                   f"{', '.join(cpu_features()) or 'unknown'}). {way_out}")
    message = f"Self-check failed: {problem}; to load it anyway, ask for a warning instead (self_check='warn')."
    if on_failure == "raise":
        raise SelfCheckError(message)
    warnings.warn(message, stacklevel=3)
    return {"passed": False, "problem": problem}
