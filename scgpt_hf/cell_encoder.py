"""The matrix side of scGPT tokenization: each cell (row) of an expression matrix as ``<cls>``-first tokens.

`ScGPTTokenizer` owns the vocabulary (gene names to ids, special tokens, saving and loading) and
transformers' contract (``__call__``, ``pad``, `BatchEncoding`); it hands the matrix to a `CellEncoder`,
which reads it in bounded CSR blocks (`anndata_input.row_blocks`: never the whole matrix, never densified),
refuses bad values (`anndata_input.check_values`), and bins and truncates each cell with the numpy core in
`cell_encoding`, which the Triton tokenizer model shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .anndata_input import check_numeric, check_values, row_blocks
from .cell_encoding import encode_cell, encode_sparse_cell

__all__ = ["CellEncoder", "EncodedCells"]


@dataclass(frozen=True)
class EncodedCells:
    """Each cell's unpadded tokens, and what the tokenizer reports about them.

    ``n_genes``: expressed vocabulary genes per cell before truncation (0: the cell is just ``<cls>``);
    ``n_expressed``: non-zero entries per cell, vocabulary genes or not; ``non_integer``: some value has a
    fractional part (normalised or log1p input).
    """

    input_ids: list[np.ndarray]
    values: list[np.ndarray]
    n_genes: np.ndarray
    n_expressed: np.ndarray
    non_integer: bool


@dataclass(frozen=True)
class CellEncoder:
    """How the cells of a matrix become tokens: ``<cls>`` (value `cls_value`) then the cell's expressed genes
    in column order, binned per cell into `n_bins` bins (unless not `do_binning`) and, past `max_length`
    tokens, cut by `strategy` ("random", "highest" or None to keep all), every random draw seeded by `seed`
    and the cell's content (see `cell_encoding`). `include_zero_genes` also emits every matched gene the
    cell does not express, with value 0."""

    cls_id: int
    cls_value: float
    n_bins: int
    max_length: int
    strategy: str | None
    seed: int
    include_zero_genes: bool = False
    do_binning: bool = True

    def encode(self, matrix: Any, gene_ids: np.ndarray, gene_names: Sequence[str] | None = None) -> EncodedCells:
        """Every row of `matrix` (cells x genes: scipy sparse, dense numpy, or a backed matrix with row slices),
        whose column ``j`` is vocabulary gene ``gene_ids[j]`` (-1: left out); `gene_names` name the columns in
        errors."""
        if not (sp.issparse(matrix) or hasattr(matrix, "shape")) or len(matrix.shape) != 2:
            raise TypeError(f"Expected a 2-D cells x genes matrix, got {type(matrix).__name__}.")
        check_numeric(matrix)
        gene_ids = np.asarray(gene_ids, dtype=np.int64)
        if gene_ids.shape != (matrix.shape[1],):
            raise ValueError(
                f"Shape mismatch: the matrix has {matrix.shape[1]} gene columns but {gene_ids.size} gene ids were "
                "given."
            )
        matched = np.flatnonzero(gene_ids >= 0)
        input_ids: list[np.ndarray] = []
        values: list[np.ndarray] = []
        n_genes = np.zeros(matrix.shape[0], dtype=np.int64)
        n_expressed = np.zeros(matrix.shape[0], dtype=np.int64)
        non_integer = False
        settings = {"seed": self.seed, "strategy": self.strategy, "max_length": self.max_length,
                    "n_bins": self.n_bins, "do_binning": self.do_binning}
        for start, block in row_blocks(matrix):
            check_values(block, start, gene_names)
            non_integer = non_integer or _has_fractions(block.data)
            indptr, indices, data = block.indptr, block.indices, block.data
            for r in range(block.shape[0]):
                cols, vals = indices[indptr[r] : indptr[r + 1]], data[indptr[r] : indptr[r + 1]]
                n_expressed[start + r] = np.count_nonzero(vals)
                ids, tokens, n_genes[start + r] = self._encode_row(cols, vals, gene_ids, matched, settings)
                input_ids.append(ids)
                values.append(tokens)
        return EncodedCells(input_ids, values, n_genes, n_expressed, non_integer)

    def _encode_row(
        self, cols: np.ndarray, vals: np.ndarray, gene_ids: np.ndarray, matched: np.ndarray, settings: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """One CSR row -> (input_ids, values, expressed vocabulary genes), genes in column order."""
        order = np.argsort(cols, kind="stable")  # column order (CSR may be unsorted)
        cols, vals = cols[order], vals[order]
        if not self.include_zero_genes:
            return encode_sparse_cell(gene_ids[cols], vals, cls_id=self.cls_id, cls_value=self.cls_value, **settings)
        keep = (gene_ids[cols] >= 0) & (vals != 0)
        raw = np.zeros(matched.size, dtype=np.float32)
        raw[np.searchsorted(matched, cols[keep])] = vals[keep]
        ids, tokens = encode_cell(gene_ids[matched], raw, **settings)
        return (np.concatenate(([self.cls_id], ids)).astype(np.int64),
                np.concatenate(([self.cls_value], tokens)).astype(np.float32), int(keep.sum()))


def _has_fractions(data: np.ndarray) -> bool:
    return data.dtype.kind == "f" and data.size > 0 and bool(np.any(data != np.floor(data)))
