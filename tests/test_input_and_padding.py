"""The AnnData input layer and the padding module that every entry point shares (synthetic data)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_hf.anndata_input import check_numeric, check_values, csr_rows, expression_input, row_blocks, select_matrix
from scgpt_hf.padding import pad_cells, pad_rows, padded_length


def _adata() -> ad.AnnData:
    x = sp.random(50, 7, density=0.3, format="csr", dtype=np.float32, random_state=0)
    a = ad.AnnData(x, var=pd.DataFrame({"symbol": [f"S{i}" for i in range(7)]}, index=[f"G{i}" for i in range(7)]))
    a.layers["counts"] = x * 2
    a.raw = a.copy()
    return a


def test_select_matrix_choices_and_errors():
    a = _adata()
    assert select_matrix(a).where == "X" and select_matrix(a).gene_names[0] == "G0"
    assert select_matrix(a, layer="counts").where == "layers/counts"
    assert select_matrix(a, use_raw=True).where == "raw.X"
    assert select_matrix(a, gene_column="symbol").gene_names[-1] == "S6"
    with pytest.raises(ValueError, match="available layers"):
        select_matrix(a, layer="missing")
    with pytest.raises(ValueError, match="available columns"):
        select_matrix(a, gene_column="missing")
    with pytest.raises(ValueError, match="not both"):
        select_matrix(a, layer="counts", use_raw=True)


def test_expression_input_kinds():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert expression_input(x, ["a", "b", "c"]).where == "matrix"
    assert expression_input(pd.DataFrame(x, columns=["a", "b", "c"])).gene_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="gene_names is required"):
        expression_input(x)
    with pytest.raises(ValueError, match="Shape mismatch"):
        expression_input(x, ["a"])
    with pytest.raises(ValueError, match="only apply to AnnData"):
        expression_input(x, ["a", "b", "c"], layer="counts")
    with pytest.raises(TypeError, match="Unsupported input"):
        expression_input([[1, 2]], ["a", "b"])


@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "float16"])
def test_row_blocks_cover_every_row_once(kind, monkeypatch):
    import scgpt_hf.anndata_input as ai

    monkeypatch.setattr(ai, "SPARSE_BLOCK_ROWS", 7)
    monkeypatch.setattr(ai, "DENSE_BLOCK_ELEMENTS", 7 * 9)
    dense = np.random.default_rng(0).poisson(1.0, (40, 9)).astype(np.float32)
    matrix = {"csr": sp.csr_matrix(dense), "csc": sp.csc_matrix(dense), "dense": dense,
              "float16": dense.astype(np.float16)}[kind]
    blocks = list(row_blocks(matrix, 3, 38))
    assert [s for s, _ in blocks] == list(range(3, 38, 7))
    assert all(b.dtype == np.float32 and b.shape[0] <= 7 for _, b in blocks)
    np.testing.assert_array_equal(sp.vstack([b for _, b in blocks]).toarray(), dense[3:38])
    np.testing.assert_array_equal(csr_rows(matrix, 0, 2).toarray(), dense[:2])


def test_value_checks_name_the_entry():
    check_numeric(np.zeros((1, 1), dtype=np.int32))
    with pytest.raises(ValueError, match="must be numeric"):
        check_numeric(np.array([["a"]], dtype=object))
    block = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, -2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"non-negative.*cell 11, column 1, gene 'B'"):
        check_values(block, 10, ["A", "B"])
    block = sp.csr_matrix(np.array([[np.nan, 1.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinity"):
        check_values(block, 0)


def test_padding():
    cells = [(np.array([1, 2, 3]), np.array([0.5, 1.0, 2.0])), (np.array([4]), np.array([3.0]))]
    ids, values, mask = pad_cells(cells, pad_id=0, pad_value=-2.0, pad_to_multiple_of=4)
    assert ids.dtype == np.int64 and values.dtype == np.float32 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, [[1, 2, 3, 0], [4, 0, 0, 0]])
    np.testing.assert_array_equal(values, [[0.5, 1.0, 2.0, -2.0], [3.0, -2.0, -2.0, -2.0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert pad_cells(cells, 0, 0.0, length=5)[0].shape == (2, 5)
    with pytest.raises(ValueError, match="more than the padding length 2"):
        padded_length(3, length=2)
    np.testing.assert_array_equal(pad_rows([np.array([1.0]), np.array([])], -1.0, width=2), [[1, -1], [-1, -1]])
    assert pad_cells([], 0, 0.0)[0].shape == (0, 0)
