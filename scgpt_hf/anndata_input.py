"""Expression input: which matrix of an AnnData, which gene names, and its rows in bounded CSR blocks.

Every entry point that reads cells (the tokenizer, `embed`/`annotate`, the datasets, gene networks,
perturbation, pretraining and the Triton client) goes through this module, so they choose the matrix,
name the genes, read in-memory and backed (on-disk) matrices and refuse bad values the same way.

- `expression_input` resolves an AnnData (X, a layer or raw; gene names from ``var_names`` or a
  ``var`` column), a scipy sparse matrix, a dense array or a DataFrame to an `ExpressionInput`.
- `row_blocks` reads rows as CSR blocks of bounded size, never densifying or loading the whole
  matrix: a backed matrix is read one slice at a time.
- `csr_rows` reads one block; float16 (which scipy cannot hold) becomes float32, exactly.
- `check_numeric` and `check_values` refuse non-numeric, NaN/infinite and negative values with the
  position of the first bad entry and the fix.
- `batch_codes` maps an ``obs`` column of batches to a model's batch ids.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "ExpressionInput",
    "batch_codes",
    "check_numeric",
    "check_values",
    "csr_rows",
    "expression_input",
    "row_blocks",
    "select_matrix",
]

# A block of a dense matrix holds at most this many elements; a block of a sparse matrix this many rows.
DENSE_BLOCK_ELEMENTS = 1 << 24
SPARSE_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class ExpressionInput:
    """A cells x genes matrix (not read yet when backed), one gene name per column, and where it came from."""

    matrix: Any
    gene_names: list[str]
    where: str
    var: Any = None  # the AnnData's var frame for that matrix (None for matrix input), to suggest gene columns

    @property
    def n_cells(self) -> int:
        return int(self.matrix.shape[0])


def select_matrix(
    adata: Any, layer: str | None = None, use_raw: bool = False, gene_column: str | None = None
) -> ExpressionInput:
    """The AnnData matrix to read (X, ``layers[layer]`` or ``raw.X``) with its gene names, without reading it."""
    if layer is not None and use_raw:
        raise ValueError("Give either layer= or use_raw=True, not both.")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but this AnnData has no .raw; use X or a layer instead.")
        matrix, var, where = adata.raw.X, adata.raw.var, "raw.X"
    elif layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"Layer {layer!r} not found; available layers: {list(adata.layers.keys())}.")
        matrix, var, where = adata.layers[layer], adata.var, f"layers/{layer}"
    else:
        matrix, var, where = adata.X, adata.var, "X"
    if matrix is None:
        raise ValueError(f"adata.{where} is empty (None); pass layer= or use_raw=True.")
    if gene_column is None:
        names = var.index.astype(str).tolist()
    elif gene_column not in var.columns:
        raise ValueError(f"gene_column {gene_column!r} not in var; available columns: {list(var.columns)}.")
    else:
        names = var[gene_column].astype(str).tolist()
    return ExpressionInput(matrix, names, where, var)


def expression_input(
    data: Any,
    gene_names: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
) -> ExpressionInput:
    """Resolve an AnnData, scipy sparse matrix, dense 2-D array or DataFrame (cells x genes) and its gene names.

    ``gene_names`` (one per column) is required for matrices and overrides an AnnData's own names;
    ``layer``, ``use_raw`` and ``gene_column`` apply to AnnData only.
    """
    # An AnnData or DataFrame argument means its module is loaded: looked up, not imported, so that this module
    # (saved beside the tokenizer for trust_remote_code) requires neither anndata nor pandas where it is loaded.
    anndata, pandas = sys.modules.get("anndata"), sys.modules.get("pandas")
    if gene_names is not None and gene_column is not None:
        raise ValueError("Give either gene_names or gene_column, not both.")
    if anndata is not None and isinstance(data, anndata.AnnData):
        source = select_matrix(data, layer, use_raw, gene_column)
        if gene_names is not None:
            source = ExpressionInput(source.matrix, [str(g) for g in gene_names], source.where, source.var)
        return _checked_shape(source)
    if layer is not None or use_raw or gene_column is not None:
        raise ValueError("layer=, use_raw= and gene_column= only apply to AnnData input.")
    if pandas is not None and isinstance(data, pandas.DataFrame):
        if gene_names is None:
            gene_names = [str(c) for c in data.columns]
        data = data.to_numpy()
    if not (sp.issparse(data) or isinstance(data, np.ndarray)):
        raise TypeError(
            f"Unsupported input type {type(data).__name__}: pass an AnnData, a scipy sparse matrix, "
            "a dense 2-D numpy array or a pandas DataFrame (cells x genes)."
        )
    if data.ndim != 2:
        raise ValueError(f"Expected a 2-D cells x genes matrix, got {data.ndim}-D; for one cell use x.reshape(1, -1).")
    if gene_names is None:
        raise ValueError(
            f"gene_names is required for a matrix input: one gene symbol per column ({data.shape[1]} columns)."
        )
    return _checked_shape(ExpressionInput(data, [str(g) for g in gene_names], "matrix"))


def _checked_shape(source: ExpressionInput) -> ExpressionInput:
    if len(source.gene_names) != source.matrix.shape[1]:
        raise ValueError(
            f"Shape mismatch: the matrix has {source.matrix.shape[1]} gene columns but {len(source.gene_names)} "
            "gene names were given; pass exactly one name per column."
        )
    return source


def check_numeric(matrix: Any) -> None:
    """Refuse a matrix whose dtype is not numeric (strings, objects), before reading any row."""
    dtype = getattr(matrix, "dtype", None)
    if dtype is None or np.dtype(dtype).kind not in "biuf":
        raise ValueError(
            f"Expression values must be numeric (int, float or bool), got dtype {dtype}. "
            "Convert the matrix, e.g. X.astype(np.float32), after checking it holds counts."
        )


def csr_rows(matrix: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows start:stop of a cells x genes matrix (scipy sparse, dense numpy, backed dense or CSR) as CSR.

    scipy holds no float16, so float16 values (dense, or a CSR that another tool wrote to an .h5ad) are cast to
    float32 here, one block of rows at a time: exact, and binning works in float32 anyway.
    """
    if not sp.issparse(matrix) and getattr(matrix, "format", None) in ("csr", "csc") and matrix.dtype == np.float16:
        # anndata's backed sparse dataset would build a float16 scipy matrix, which scipy refuses: read its arrays.
        if matrix.format != "csr":
            raise ValueError(
                "The matrix is stored as float16 CSC, which scipy cannot read and which streams by genes, not "
                "cells: rewrite the file with the matrix as CSR (float16 is fine) or as float32."
            )
        group = matrix.group
        indptr = np.asarray(group["indptr"][start : stop + 1], dtype=np.int64)
        first, last = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix(
            (np.asarray(group["data"][first:last], dtype=np.float32), np.asarray(group["indices"][first:last]),
             indptr - first),
            shape=(stop - start, matrix.shape[1]),
        )
    block = matrix[start:stop]
    if sp.issparse(block):
        return block.tocsr()
    block = np.asarray(block)
    return sp.csr_matrix(block.astype(np.float32) if block.dtype == np.float16 else block)


def row_blocks(matrix: Any, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR block) over rows start:stop, each block bounded in rows or elements.

    In-memory sparse matrices are sliced (CSC converted once); dense and backed matrices are read one
    bounded slice at a time, so neither the whole matrix nor a dense copy of it is ever held.
    """
    stop = int(matrix.shape[0]) if stop is None else int(stop)
    if sp.issparse(matrix):
        matrix = matrix.tocsr() if matrix.format != "csr" else matrix
        step = SPARSE_BLOCK_ROWS
    else:
        step = max(1, DENSE_BLOCK_ELEMENTS // max(1, int(matrix.shape[1])))
        if not isinstance(matrix, np.ndarray):  # backed: h5py datasets and anndata's sparse datasets
            step = min(step, SPARSE_BLOCK_ROWS)
    for s in range(start, stop, step):
        yield s, csr_rows(matrix, s, min(stop, s + step))


def check_values(block: sp.csr_matrix, start: int, gene_names: Sequence[str] | None = None) -> None:
    """Refuse NaN, infinite or negative entries in a block of rows (first row ``start``), naming where they are."""
    data = block.data
    if data.dtype.kind not in "biuf":
        raise ValueError(f"Expression values must be numeric, got dtype {data.dtype}.")
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise ValueError(
                f"Expression values contain NaN or infinity ({_where(block, start, bad, gene_names)}). "
                "Fix or drop these entries (e.g. np.nan_to_num on counts) before tokenising."
            )
    negative = data < 0
    if negative.any():
        raise ValueError(
            f"Expression values must be non-negative, found {data[negative].min()} "
            f"({_where(block, start, negative, gene_names)}). This looks like scaled/centred data "
            "(e.g. after sc.pp.scale), which scGPT cannot use: pass raw counts or normalised/log1p "
            "values (e.g. layer='counts' or use_raw=True)."
        )


def _where(block: sp.csr_matrix, start: int, bad: np.ndarray, gene_names: Sequence[str] | None) -> str:
    pos = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(block.indptr, pos, side="right") - 1) + start
    col = int(block.indices[pos])
    gene = f", gene {gene_names[col]!r}" if gene_names is not None else ""
    return f"first at cell {row}, column {col}{gene}; {int(bad.sum())} entries in rows {start}-{start + block.shape[0] - 1}"


def batch_codes(
    adata: Any,
    batch_key: str | None,
    *,
    needs_batch_labels: bool,
    num_batch_labels: int | None,
    batch2id: Mapping[str, int] | None,
    as_ids: bool = False,
) -> np.ndarray | None:
    """Each cell's batch id from ``obs[batch_key]``, or None for a model that takes no batch labels.

    The model's batch settings (its config's, or those a served model publishes) decide: `needs_batch_labels`
    (batch embeddings or domain-specific batch norm), `num_batch_labels` and `batch2id`. Values are names of
    `batch2id` whatever the column's dtype; integer ids only where the model has no names, or with `as_ids`.
    A missing or needless `batch_key`, or a batch the model was not trained on, is an error naming the fix.
    """
    from .modeling_scgpt import batch_ids

    if not needs_batch_labels:
        if batch_key is not None:
            raise ValueError(f"batch_key={batch_key!r} was given but this model takes no batch labels; drop it.")
        return None
    if batch_key is None:
        raise ValueError(
            "This model needs batch labels (batch embeddings or domain-specific batch norm): pass batch_key=, the "
            "obs column with each cell's batch (names of config.batch2id, or the integer ids used in training "
            "when the model has no names)."
        )
    if batch_key not in adata.obs:
        raise ValueError(f"obs has no column {batch_key!r}; available: {list(adata.obs.columns)}.")
    try:
        return np.asarray(batch_ids(adata.obs[batch_key], num_batch_labels, batch2id, as_ids=as_ids), dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"obs[{batch_key!r}]: {err}") from err
