"""Per-cell encoding core of scGPT tokenization: binning, content hash, truncation.

Depends on numpy and hashlib only, so one implementation serves both :class:`ScGPTTokenizer`
(``from .cell_encoding import ...``) and the Triton tokenizer model, which loads this very file
(copied beside its ``model.py`` by the repository builder) in a stock Triton container's Python.

Binning is the original scGPT's (``scgpt.preprocess`` ``binning``/``_digitize``): for a cell's
non-zero values ``x`` (float32), ``edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))``,
``left = np.digitize(x, edges)``, ``right = np.digitize(x, edges, right=True)``,
``bin = ceil(u * (right - left) + left)`` with ``u`` uniform in [0, 1).  Every random draw for a
cell (``u`` and the genes kept by random truncation) comes from
``np.random.default_rng([seed, cell_hash(...)])``, where the hash covers the cell's expressed gene
ids and float32 values in gene-id order, so a cell's tokens never depend on its batch-mates, its
row or the column order.  numpy's ``SeedSequence``/``PCG64`` streams, ``quantile`` and
``digitize`` are stable across numpy 1.17+ and 2.x, so a numpy-1 server and a numpy-2 client agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = [
    "TRUNCATION_STRATEGIES",
    "bin_nonzero_values",
    "cell_hash",
    "encode_cell",
    "encode_sparse_cell",
    "match_gene_names",
]

TRUNCATION_STRATEGIES = ("random", "highest")


def match_gene_names(
    names: Sequence[str], vocab: dict[str, int], specials: Sequence[str] = ()
) -> tuple[np.ndarray, list[str], list[str]]:
    """Map gene names to vocabulary ids: (ids with -1 where unknown, unmatched names, repeated names).

    A repeated name uses its first occurrence only (later ones get -1); special tokens never match.
    """
    ids = np.full(len(names), -1, dtype=np.int64)
    seen: set[str] = set()
    unmatched: list[str] = []
    duplicates: list[str] = []
    special = set(specials)
    for j, name in enumerate(names):
        if name in seen:
            duplicates.append(name)
            continue
        seen.add(name)
        idx = vocab.get(name)
        if idx is None or name in special:
            unmatched.append(name)
        else:
            ids[j] = idx
    return ids, unmatched, duplicates


def bin_nonzero_values(values: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    """Bin one cell's non-zero values exactly like the original scGPT.

    ``uniform`` holds one draw in [0, 1) per value; it only matters where a value
    coincides with repeated quantile edges (``left > right``).  Returns int64 bins in
    ``1 .. n_bins - 1``.
    """
    x = np.asarray(values, dtype=np.float32)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    return np.ceil(uniform * (right - left) + left).astype(np.int64)


def cell_hash(gene_ids: np.ndarray, values: np.ndarray) -> int:
    """Stable 64-bit hash of a cell's content (gene ids and float32 values, in the given order)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(gene_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return int.from_bytes(h.digest(), "little")


def encode_cell(
    ids: np.ndarray,
    raw: np.ndarray,
    *,
    seed: int,
    strategy: str | None,
    max_length: int,
    n_bins: int,
    do_binning: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Bin and truncate one cell's gene tokens (without ``<cls>``), keeping the given order.

    Args:
        ids: int64 vocabulary ids of the cell's genes (no repeats), in the order tokens should come out.
        raw: float32 values of those genes (zeros allowed: they get bin 0).
        seed: non-negative seed, combined with the cell's content hash.
        strategy: ``"random"`` (seeded random subset), ``"highest"`` (largest values, ties to the
            smaller id) or None (no truncation).
        max_length: tokens per cell including ``<cls>``; truncation keeps ``max_length - 1`` genes.
        n_bins: bins including the zero bin.
        do_binning: False passes values through unbinned.

    Returns:
        (ids, values) of the kept genes: int64 and float32, in the input order.
    """
    n = ids.size
    need_trunc = strategy is not None and n > max_length - 1
    nonzero = raw != 0
    needs_rng = (do_binning and nonzero.any()) or (need_trunc and strategy == "random")
    if do_binning:
        values = np.zeros(n, dtype=np.float32)
    else:
        values = raw.astype(np.float32)
    if needs_rng:
        canon = np.argsort(ids, kind="stable")  # gene-id order: independent of column order
        nz_canon = canon[nonzero[canon]]
        rng = np.random.default_rng([int(seed), cell_hash(ids[nz_canon], raw[nz_canon])])
        if do_binning and nz_canon.size:
            uniform = rng.random(nz_canon.size)
            values[nz_canon] = bin_nonzero_values(raw[nz_canon], n_bins, uniform)
    if need_trunc:
        k = max_length - 1
        if strategy == "random":
            keep = canon[rng.permutation(n)[:k]]
        else:
            # Highest raw value first; ties go to the smaller vocabulary id.
            keep = np.lexsort((ids, -raw))[:k]
        keep = np.sort(keep)
        return ids[keep], values[keep]
    return ids, values


def encode_sparse_cell(
    gene_ids: np.ndarray,
    counts: np.ndarray,
    *,
    cls_id: int,
    cls_value: float,
    seed: int,
    strategy: str | None,
    max_length: int,
    n_bins: int,
    do_binning: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One cell given as (vocabulary id, value) pairs -> ``<cls>``-first token ids and values.

    Entries with id < 0 (unmatched genes, padding slots) or value 0 are dropped, the rest keep
    their order, exactly as ``ScGPTTokenizer.encode_with_ids`` treats a CSR row whose columns
    carry these ids.  Returns (input_ids int64, values float32, n_genes before truncation).
    """
    gene_ids = np.asarray(gene_ids, dtype=np.int64)
    counts = np.asarray(counts)
    keep = (gene_ids >= 0) & (counts != 0)
    ids, vals = gene_ids[keep], counts[keep].astype(np.float32)
    tok_ids, tok_vals = encode_cell(
        ids, vals, seed=seed, strategy=strategy, max_length=max_length, n_bins=n_bins, do_binning=do_binning
    )
    out_ids = np.concatenate(([cls_id], tok_ids)).astype(np.int64)
    out_vals = np.concatenate(([cls_value], tok_vals)).astype(np.float32)
    return out_ids, out_vals, int(ids.size)

