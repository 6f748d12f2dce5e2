"""Tests for ScGPTTokenizer: binning parity with the original scGPT on real cells,
per-cell reproducibility, truncation, padding, input types, save/load and errors."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

# Import transformers (through the tokenizer) before the original scGPT's stand-ins.
from scgpt_hf.tokenization_scgpt import ScGPTTokenizer, bin_nonzero_values, cell_hash

from reference import SPECIAL_TOKENS, make_vocab

LOGGER = "scgpt_hf.tokenization_scgpt"


# ----------------------------------------------------------------------------- fixtures
def _census_genes() -> list[str]:
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("original scgpt package (with its bundled gene vocabulary) not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "default_census_vocab.json"
    census = json.loads(path.read_text())
    return [g for g, _ in sorted(census.items(), key=lambda kv: kv[1])]


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A released-style vocab.json: the original's 60,694 census genes, then <pad>, <cls>, <eoc>."""
    genes = _census_genes()
    vocab = make_vocab(len(genes), genes)
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps(vocab))
    return path


@pytest.fixture
def tok(vocab_file: Path) -> ScGPTTokenizer:
    return ScGPTTokenizer(str(vocab_file))


@pytest.fixture
def adata(wu2020_adata):  # type: ignore[no-untyped-def]
    """Real raw counts: 200 T cells, CSR float32, gene symbols (some not in the vocabulary)."""
    return wu2020_adata


def _cells(enc) -> list[tuple[np.ndarray, np.ndarray]]:  # type: ignore[no-untyped-def]
    """(ids, values) of the real tokens of each cell, whatever the output format."""
    out = []
    for ids, vals, mask in zip(enc["input_ids"], enc["values"], enc["attention_mask"]):
        ids, vals, mask = (np.asarray(x) for x in (ids, vals, mask))
        out.append((ids[mask == 1], vals[mask == 1]))
    return out


def _as_dict(cell: tuple[np.ndarray, np.ndarray]) -> dict[int, float]:
    return dict(zip(cell[0][1:].tolist(), cell[1][1:].tolist()))


def _expected_genes(tok: ScGPTTokenizer, adata, i: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Vocabulary ids and counts of cell i's expressed vocabulary genes, in column order."""
    ids = tok.match_genes(list(adata.var_names)).ids
    row = np.asarray(adata.X[i].toarray()).ravel()
    cols = np.flatnonzero((row != 0) & (ids >= 0))
    return ids[cols], row[cols].astype(np.float32)


# ----------------------------------------------------------------------------- binning parity
def test_binning_identical_to_original_given_same_uniform_draws(original_scgpt, adata) -> None:  # type: ignore[no-untyped-def]
    """Feed our binning the very uniform numbers the original draws: bins must be identical,
    for the original's numpy path (Preprocessor/binning) and its torch path (DataCollator)."""
    import torch

    binning = original_scgpt.preprocess.binning
    X = adata.X.tocsr()
    n_tied = n_total = 0
    for i in range(X.shape[0]):
        row = X[i].toarray().ravel().astype(np.float32)
        nz = row[row != 0]
        np.random.seed(1000 + i)
        orig_np = binning(row.copy(), 51)[row != 0].astype(np.int64)
        np.random.seed(1000 + i)
        orig_pt = binning(torch.from_numpy(nz.copy()), 51).numpy()
        np.random.seed(1000 + i)
        uniform = np.random.rand(nz.size)
        ours = bin_nonzero_values(nz, 51, uniform)
        np.testing.assert_array_equal(ours, orig_np)
        np.testing.assert_array_equal(ours, orig_pt)
        edges = np.quantile(nz, np.linspace(0, 1, 50))
        n_tied += int((np.digitize(nz, edges) > np.digitize(nz, edges, right=True)).sum())
        n_total += nz.size
    assert n_tied > 0.5 * n_total  # raw counts are full of ties: the random part is exercised


def test_tokenizer_bins_match_original_on_real_cells(original_scgpt, tok, adata, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Through the public API: identical bins where the original has no tie, and inside the
    original's own range (its _digitize with the draw forced to the extremes) where it has one."""
    digitize = original_scgpt.preprocess._digitize
    enc = tok(adata, truncation=False, padding=False)
    cells = _cells(enc)
    n_tied = 0
    for i in range(adata.n_obs):
        ids, counts = _expected_genes(tok, adata, i)
        got_ids, got_vals = cells[i]
        assert got_ids[0] == tok.cls_token_id and got_vals[0] == 0.0
        np.testing.assert_array_equal(got_ids[1:], ids)
        edges = np.quantile(counts, np.linspace(0, 1, 50))
        left = digitize(counts, edges, side="one")
        monkeypatch.setattr(np.random, "rand", lambda n: np.zeros(n))
        upper = digitize(counts, edges)
        monkeypatch.setattr(np.random, "rand", lambda n: np.full(n, 1 - 1e-9))
        lower = digitize(counts, edges)
        monkeypatch.undo()
        tied = lower < upper
        n_tied += int(tied.sum())
        np.testing.assert_array_equal(upper, left)
        got = got_vals[1:].astype(np.int64)
        np.testing.assert_array_equal(got[~tied], left[~tied])
        assert np.all((got >= lower) & (got <= upper))
        assert got.min() >= 1 and got.max() <= 50
    assert n_tied > 1000


def test_all_equal_values_get_random_bins_like_original(original_scgpt, tok) -> None:  # type: ignore[no-untyped-def]
    """The original quirk: a cell whose non-zero values are all equal gets bins spread over 1..n_bins-1."""
    np.random.seed(0)
    orig = original_scgpt.preprocess.binning(np.ones(500, dtype=np.float32), 51)
    assert orig.min() >= 1 and orig.max() <= 50 and len(np.unique(orig)) > 40
    names = list(tok.get_vocab())[:500]
    enc = tok(np.ones((1, 500), dtype=np.float32), names, truncation=False, return_tensors="np")
    ours = enc["values"][0, 1:]
    assert ours.min() >= 1 and ours.max() <= 50 and len(np.unique(ours)) > 40


# ----------------------------------------------------------------------------- reproducibility
def test_same_cell_same_tokens_across_batches_chunks_orders(tok, adata) -> None:  # type: ignore[no-untyped-def]
    full = _cells(tok(adata, padding=False))
    chunked = []
    for start in range(0, adata.n_obs, 7):
        chunked += _cells(tok(adata[start : start + 7], padding=False))
    order = np.random.default_rng(3).permutation(adata.n_obs)
    shuffled = _cells(tok(adata[order], padding=False))
    singles = [_cells(tok(adata[i : i + 1]))[0] for i in (0, 57, 199)]
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(full[i][0], chunked[i][0])
        np.testing.assert_array_equal(full[i][1], chunked[i][1])
        np.testing.assert_array_equal(full[order[i]][0], shuffled[i][0])
        np.testing.assert_array_equal(full[order[i]][1], shuffled[i][1])
    for cell, i in zip(singles, (0, 57, 199)):
        np.testing.assert_array_equal(cell[1], full[i][1])
    # Column order does not matter either (same genes, same bins; output follows column order).
    cols = np.random.default_rng(4).permutation(adata.n_vars)
    permuted = _cells(tok(adata[:, cols], padding=False, truncation=False))
    reference_cells = _cells(tok(adata, padding=False, truncation=False))
    for a, b in zip(reference_cells, permuted):
        assert _as_dict(a) == _as_dict(b)


def test_seed_changes_tie_breaking_only(tok, adata) -> None:  # type: ignore[no-untyped-def]
    a = _cells(tok(adata[:20], truncation=False, seed=0))
    a2 = _cells(tok(adata[:20], truncation=False, seed=0))
    b = _cells(tok(adata[:20], truncation=False, seed=1))
    n_diff = 0
    for i, (ca, ca2, cb) in enumerate(zip(a, a2, b)):
        np.testing.assert_array_equal(ca[1], ca2[1])
        np.testing.assert_array_equal(ca[0], cb[0])
        ids, counts = _expected_genes(tok, adata, i)
        edges = np.quantile(counts, np.linspace(0, 1, 50))
        untied = np.digitize(counts, edges) == np.digitize(counts, edges, right=True)
        np.testing.assert_array_equal(ca[1][1:][untied], cb[1][1:][untied])
        n_diff += int((ca[1] != cb[1]).sum())
    assert n_diff > 100


def test_draws_differ_between_cells_and_repeat_for_identical_cells(tok) -> None:
    """Each cell gets its own stream (seed + content hash), not one shared stream."""
    names = list(tok.get_vocab())[:400]
    X = np.zeros((3, 400), dtype=np.float32)
    X[0, :200] = 1.0
    X[1, 200:] = 1.0  # same values, other genes
    X[2] = X[0]  # an exact repeat of cell 0
    cells = _cells(tok(X, names, truncation=False))
    assert not np.array_equal(cells[0][1], cells[1][1])
    np.testing.assert_array_equal(cells[0][1], cells[2][1])


def test_values_are_binned_as_float32_like_the_original_embedding_path(tok, adata) -> None:  # type: ignore[no-untyped-def]
    """The original casts expression to float32 before binning; values that differ only
    below float32 precision are ties there, and must be here too."""
    dense = adata[:10].X.toarray().astype(np.float64)
    dense[dense > 0] += 1e-9 * np.arange(int((dense > 0).sum()))
    names = list(adata.var_names)
    a = tok(dense, names, truncation=False, return_tensors="np")
    b = tok(dense.astype(np.float32), names, truncation=False, return_tensors="np")
    np.testing.assert_array_equal(a["values"], b["values"])


def test_cell_hash_is_content_based() -> None:
    ids = np.array([5, 9, 2])
    vals = np.array([1.0, 2.0, 3.0])
    assert cell_hash(ids, vals) == cell_hash(ids.astype(np.int32), vals.astype(np.float32))
    assert cell_hash(ids, vals) != cell_hash(ids, vals + 1)
    assert cell_hash(ids, vals) != cell_hash(ids + 1, vals)


# ----------------------------------------------------------------------------- truncation
def test_random_truncation_keeps_cls_and_max_length(tok, adata) -> None:  # type: ignore[no-untyped-def]
    full = _cells(tok(adata, truncation=False, padding=False))
    enc = tok(adata, max_length=100, return_tensors="np", return_n_genes=True)
    assert enc["input_ids"].shape == (adata.n_obs, 100)
    cells = _cells(enc)
    n_long = 0
    for i, (ids, vals) in enumerate(cells):
        n = enc["n_genes"][i]
        assert ids[0] == tok.cls_token_id
        assert len(ids) == min(100, n + 1)
        assert len(np.unique(ids)) == len(ids)
        kept = _as_dict((ids, vals))
        whole = _as_dict(full[i])
        assert all(whole[g] == v for g, v in kept.items())  # bins computed on the whole cell
        if n > 99:
            n_long += 1
    assert n_long > 150
    again = _cells(tok(adata, max_length=100))
    other = _cells(tok(adata, max_length=100, seed=5))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(cells, again))
    assert sum(not np.array_equal(a[0], b[0]) for a, b in zip(cells, other)) > 150


def test_highest_truncation_keeps_top_genes(tok, adata) -> None:  # type: ignore[no-untyped-def]
    enc = tok(adata, max_length=50, truncation="highest", padding=False)
    for i, (ids, _) in enumerate(_cells(enc)):
        all_ids, counts = _expected_genes(tok, adata, i)
        if len(all_ids) <= 49:
            assert len(ids) == len(all_ids) + 1
            continue
        assert len(ids) == 50
        kept = np.isin(all_ids, ids[1:])
        assert counts[kept].min() >= counts[~kept].max()
        # ties at the cut-off go to the smaller vocabulary ids
        cut = counts[kept].min()
        tied_kept = all_ids[kept & (counts == cut)]
        tied_dropped = all_ids[~kept & (counts == cut)]
        if tied_dropped.size:
            assert tied_kept.max() < tied_dropped.min()
        np.testing.assert_array_equal(ids[1:], all_ids[kept])  # column order kept
    assert _cells(tok(adata, max_length=50, truncation="highest", seed=9))[0][0].tolist() == _cells(enc)[0][0].tolist()


def test_default_strategy_from_settings_and_no_truncation(vocab_file, adata) -> None:  # type: ignore[no-untyped-def]
    tok_h = ScGPTTokenizer(str(vocab_file), truncation_strategy="highest", max_length=30)
    a = tok_h(adata[:5], padding=False)
    b = tok_h(adata[:5], padding=False, truncation="highest")
    assert all(np.array_equal(x, y) for x, y in zip(a["input_ids"], b["input_ids"]))
    assert max(len(x) for x in a["input_ids"]) == 30
    c = tok_h(adata[:5], truncation=False, padding=False, return_n_genes=True)
    assert [len(x) for x in c["input_ids"]] == (c["n_genes"] + 1).tolist()


# ----------------------------------------------------------------------------- padding / tensors
def test_padding_modes_and_attention_mask(tok, adata) -> None:  # type: ignore[no-untyped-def]
    import torch

    enc = tok(adata[:10], max_length=300, return_tensors="pt", return_n_genes=True)
    assert enc["input_ids"].dtype == torch.int64
    assert enc["values"].dtype == torch.float32
    assert enc["attention_mask"].dtype == torch.int64
    lengths = enc["attention_mask"].sum(1)
    assert enc["input_ids"].shape[1] == int(lengths.max()) <= 300
    for i, n in enumerate(lengths.tolist()):
        assert enc["attention_mask"][i, :n].eq(1).all() and enc["attention_mask"][i, n:].eq(0).all()
        assert enc["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert enc["values"][i, n:].eq(-2.0).all()
        assert not enc["input_ids"][i, :n].eq(tok.pad_token_id).any()
    assert enc["n_genes"].shape == (10,)

    mx = tok(adata[:10], max_length=3000, padding="max_length", return_tensors="np")
    assert mx["input_ids"].shape == (10, 3000) and mx["values"].dtype == np.float32
    mult = tok(adata[:10], max_length=300, pad_to_multiple_of=64, return_tensors="np")
    assert mult["input_ids"].shape[1] % 64 == 0

    lst = tok(adata[:10], max_length=300, padding=True)
    assert isinstance(lst["input_ids"], list) and len({len(x) for x in lst["input_ids"]}) == 1


def test_unpadded_lists_then_pad(tok, adata) -> None:  # type: ignore[no-untyped-def]
    """padding=False gives lists of 1-D arrays; grouping cells by length and padding later
    gives exactly the directly padded tensors."""
    import torch

    raw = tok(adata[:16], max_length=400, padding=False, return_n_genes=True)
    assert isinstance(raw["input_ids"], list) and all(x.ndim == 1 for x in raw["input_ids"])
    assert raw["input_ids"][0].dtype == np.int64 and raw["values"][0].dtype == np.float32
    assert len({len(x) for x in raw["input_ids"]}) > 1
    direct = tok(adata[:16], max_length=400, return_tensors="pt")
    padded = tok.pad(raw, padding="longest", return_tensors="pt")
    for k in ("input_ids", "values", "attention_mask"):
        assert torch.equal(padded[k], direct[k])
    assert padded["n_genes"].tolist() == raw["n_genes"].tolist()

    by_len = np.argsort([len(x) for x in raw["input_ids"]])[:4]
    sub = {k: [raw[k][i] for i in by_len] for k in ("input_ids", "values", "attention_mask")}
    small = tok.pad(sub, return_tensors="pt")
    assert small["input_ids"].shape[1] == max(len(raw["input_ids"][i]) for i in by_len)

    # a list of per-cell dicts (DataLoader collate_fn) and re-padding an already padded batch
    examples = [{k: raw[k][i] for k in ("input_ids", "values")} for i in range(16)]
    collated = tok.pad(examples, return_tensors="pt")
    assert torch.equal(collated["input_ids"], direct["input_ids"])
    assert torch.equal(collated["attention_mask"], direct["attention_mask"])
    wider = tok.pad(direct, padding="max_length", max_length=512, return_tensors="np")
    assert wider["input_ids"].shape == (16, 512)
    np.testing.assert_array_equal(wider["values"][:, : direct["values"].shape[1]], direct["values"].numpy())

    with pytest.raises(ValueError, match="different lengths"):
        tok(adata[:16], max_length=400, padding=False, return_tensors="pt")
    with pytest.raises(ValueError, match="more than the padding length"):
        tok.pad(raw, padding="max_length", max_length=10)


# ----------------------------------------------------------------------------- input types
def test_input_types_give_identical_tokens(tok, adata) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    sub = adata[:12].copy()
    names = list(sub.var_names)
    ref = tok(sub, return_tensors="np")
    variants = {
        "csr": tok(sub.X.tocsr(), names, return_tensors="np"),
        "csc": tok(sub.X.tocsc(), names, return_tensors="np"),
        "coo": tok(sub.X.tocoo(), names, return_tensors="np"),
        "dense": tok(sub.X.toarray(), names, return_tensors="np"),
        "dense_int": tok(sub.X.toarray().astype(np.int32), names, return_tensors="np"),
        "dense_f64": tok(sub.X.toarray().astype(np.float64), names, return_tensors="np"),
        "dataframe": tok(pd.DataFrame(sub.X.toarray(), columns=names), return_tensors="np"),
        "view": tok(adata[:12], return_tensors="np"),
    }
    for name, enc in variants.items():
        for k in ("input_ids", "values", "attention_mask"):
            np.testing.assert_array_equal(enc[k], ref[k], err_msg=name)


def test_anndata_layer_raw_and_var_column(tok, adata) -> None:  # type: ignore[no-untyped-def]
    import anndata

    sub = adata[:12].copy()
    ref = tok(sub, return_tensors="np")
    counts = sub.X.copy()

    layered = sub.copy()
    layered.layers["counts"] = counts
    layered.X = sp.csr_matrix(counts.shape, dtype=np.float32)  # X is empty: must not be read
    out = tok(layered, layer="counts", return_tensors="np")
    np.testing.assert_array_equal(out["values"], ref["values"])

    with_raw = sub.copy()
    with_raw.raw = sub
    with_raw = with_raw[:, :500].copy()  # X now has a subset of genes; raw keeps them all
    out = tok(with_raw, use_raw=True, return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])

    by_column = anndata.AnnData(counts, var={"symbol": list(sub.var_names)})
    by_column.var_names = [f"ENSG{i:011d}" for i in range(sub.n_vars)]
    out = tok(by_column, gene_column="symbol", return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["values"], ref["values"])


def test_backed_anndata_and_row_slices(tok, adata, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import anndata

    sparse_path = tmp_path / "sparse.h5ad"
    adata.write_h5ad(sparse_path)
    dense = adata[:30].copy()
    dense.X = dense.X.toarray()
    dense_path = tmp_path / "dense.h5ad"
    dense.write_h5ad(dense_path)
    ref = _cells(tok(adata, padding=False))

    backed = anndata.read_h5ad(sparse_path, backed="r")
    streamed = []
    for start in range(0, backed.n_obs, 64):
        streamed += _cells(tok(backed[start : start + 64], padding=False))
    whole_backed = _cells(tok(backed, padding=False))
    dense_backed = _cells(tok(anndata.read_h5ad(dense_path, backed="r"), padding=False))
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(streamed[i][1], ref[i][1])
        np.testing.assert_array_equal(whole_backed[i][1], ref[i][1])
    for i in range(30):
        np.testing.assert_array_equal(dense_backed[i][0], ref[i][0])
        np.testing.assert_array_equal(dense_backed[i][1], ref[i][1])


def test_float16_counts_are_read_as_float32(tok, adata, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """scipy holds no float16: dense float16 and float16 CSR on disk are cast chunk by chunk."""
    import anndata
    import h5py

    half = adata[:20].X.toarray().astype(np.float16)
    names = list(adata.var_names)
    ref = _cells(tok(sp.csr_matrix(half.astype(np.float32)), names, padding=False))
    dense = _cells(tok(half, names, padding=False))
    path = tmp_path / "half.h5ad"
    anndata.AnnData(sp.csr_matrix(half.astype(np.float32)), var=adata.var[[]]).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        data = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        on_disk = _cells(tok(backed, padding=False))
    finally:
        backed.file.close()
    for i in range(20):
        for got in (dense, on_disk):
            np.testing.assert_array_equal(got[i][0], ref[i][0])
            np.testing.assert_array_equal(got[i][1], ref[i][1])


def test_encode_with_ids_streaming(tok, adata) -> None:  # type: ignore[no-untyped-def]
    match = tok.match_genes(list(adata.var_names))
    ref = _cells(tok(adata, padding=False))
    X = adata.X.tocsr()
    got = []
    for start in range(0, adata.n_obs, 50):
        got += _cells(tok.encode_with_ids(X[start : start + 50], match.ids, padding=False))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    bad = match.ids.copy()
    bad[np.flatnonzero(bad < 0)[0]] = bad[np.flatnonzero(bad >= 0)[0]]
    with pytest.raises(ValueError, match="same vocabulary id"):
        tok.encode_with_ids(X, bad)
    with pytest.raises(ValueError, match="Shape mismatch"):
        tok.encode_with_ids(X, match.ids[:-1])


def test_include_zero_genes_and_no_binning(vocab_file, tok) -> None:  # type: ignore[no-untyped-def]
    names = list(tok.get_vocab())[:6] + ["NOT_A_GENE"]
    X = np.array([[0, 3, 0, 1, 7, 0, 5], [2, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    tz = ScGPTTokenizer(str(vocab_file), include_zero_genes=True)
    enc = tz(X, names, return_tensors="np")
    assert enc["input_ids"].shape == (2, 7)
    np.testing.assert_array_equal(enc["input_ids"][0, 1:], [tok.vocab[n] for n in names[:6]])
    assert (enc["values"][0, 1:] == 0).tolist() == (X[0, :6] == 0).tolist()
    nb = ScGPTTokenizer(str(vocab_file), do_binning=False)(X, names, return_tensors="np", cls_value=-2.0)
    np.testing.assert_array_equal(nb["values"][0], [-2, 3, 1, 7])
    assert nb["values"][1].tolist() == [-2, 2, -2, -2]  # padded with pad_value


def test_log_normalised_input_bins_like_counts(tok, adata, caplog) -> None:  # type: ignore[no-untyped-def]
    import scanpy as sc

    counts = adata[:30].copy()
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        a = _cells(tok(lognorm, truncation=False))
        tok(lognorm[:3])
    warnings = [r for r in caplog.records if "not integers" in r.getMessage()]
    assert len(warnings) == 1 and "rank-based" in warnings[0].getMessage()
    b = _cells(tok(counts, truncation=False))
    for i, (ca, cb) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(ca[0], cb[0])
        ids, c = _expected_genes(tok, counts, i)
        edges = np.quantile(c, np.linspace(0, 1, 50))
        untied = np.digitize(c, edges) == np.digitize(c, edges, right=True)
        np.testing.assert_array_equal(ca[1][1:][untied], cb[1][1:][untied])


# ----------------------------------------------------------------------------- gene matching
def test_match_genes_reports_and_logs(tok, adata, caplog) -> None:  # type: ignore[no-untyped-def]
    names = ["CD3E", "NOT_A_GENE", "GAPDH", "CD3E", "<cls>"]
    match = tok.match_genes(names)
    assert match.ids.tolist() == [tok.vocab["CD3E"], -1, tok.vocab["GAPDH"], -1, -1]
    assert (match.n_matched, match.n_total) == (2, 5)
    assert match.unmatched == ["NOT_A_GENE", "<cls>"] and match.duplicates == ["CD3E"]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        tok(adata[:3])
        tok(adata[:3])
    infos = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Matched")]
    assert len(infos) == 2 and "Matched 22948 of 30727 genes" in infos[0]


def test_low_vocabulary_coverage_warns_with_the_likely_cause(tok, adata, caplog) -> None:  # type: ignore[no-untyped-def]
    """Coverage counts the cells' expressed genes (non-zero entries) the vocabulary knows: wu2020 as it is
    (92 %, its unmatched genes are mostly unexpressed LOC genes) is fine; mouse-style symbols or gene ids
    warn with the fraction and the cause, and name a var column holding symbols when there is one."""
    cells = adata[:20].copy()

    def coverage_warnings(data, **kwargs) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            enc = tok(data, padding=False, return_n_genes=True, **kwargs)
        assert (enc["n_genes"] <= enc["n_expressed"]).all()
        return [r.getMessage() for r in caplog.records if "expressed genes" in r.getMessage()]

    assert coverage_warnings(cells) == []
    mouse = cells.copy()
    mouse.var_names = [g[:1] + g[1:].lower() for g in cells.var_names]  # Cd3e, Gapdh, ...
    [message] = coverage_warnings(mouse)
    assert "mouse-style" in message and "% of the cells' expressed genes" in message and "human" in message
    ids = cells.copy()  # NCBI ids ("GeneID:100505874") as names, symbols in a column, a few symbols left
    ids.var["symbol"] = list(cells.var_names)
    ids.var_names = [i if n >= 3000 else g for n, (i, g) in enumerate(zip(cells.var["gene_ids"], cells.var_names))]
    [message] = coverage_warnings(ids)
    assert "NCBI (Entrez) gene IDs" in message and "gene_column='symbol'" in message
    assert coverage_warnings(ids, gene_column="symbol") == []
    ensembl = cells.copy()
    ensembl.var_names = [f"ENSG{n:011d}" if n >= 3000 else g for n, g in enumerate(cells.var_names)]
    [message] = coverage_warnings(ensembl)
    assert "Ensembl gene IDs" in message and "human gene symbols" in message


def test_duplicate_gene_names_use_first_column(tok, caplog) -> None:  # type: ignore[no-untyped-def]
    X = np.array([[1, 2, 3, 4], [0, 5, 1, 0]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        enc = tok(X, ["CD3E", "GAPDH", "CD3E", "MS4A1"], return_tensors="np")
    assert any("more than once" in r.getMessage() and "first column" in r.getMessage() for r in caplog.records)
    dedup = tok(X[:, [0, 1, 3]], ["CD3E", "GAPDH", "MS4A1"], return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], dedup["input_ids"])
    np.testing.assert_array_equal(enc["values"], dedup["values"])


def test_no_gene_matches_is_a_clear_error(tok) -> None:
    X = sp.random(3, 20, density=0.5, format="csr", random_state=0)
    ensembl = [f"ENSG{i:011d}" for i in range(20)]
    with pytest.raises(ValueError, match=r"(?s)gene symbols.*CD3E.*Ensembl gene IDs"):
        tok(X, ensembl)
    with pytest.raises(ValueError, match="mouse-style"):
        tok(X, ["Cd3e", "Gapdh", "Ms4a1", "Actb"] * 5)


def test_zero_match_suggests_var_column(tok, adata) -> None:  # type: ignore[no-untyped-def]
    sub = adata[:5].copy()
    sub.var["symbol"] = list(sub.var_names)
    sub.var_names = [f"ENSG{i:011d}" for i in range(sub.n_vars)]
    with pytest.raises(ValueError, match="gene_column='symbol'"):
        tok(sub)


def test_cell_without_vocabulary_gene_gets_only_cls(tok, caplog) -> None:  # type: ignore[no-untyped-def]
    X = sp.csr_matrix(np.array([[1, 0, 2], [0, 4, 0], [0, 0, 0], [3, 0, 0]], dtype=np.float32))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        enc = tok(X, ["CD3E", "NOT_A_GENE", "GAPDH"], return_tensors="pt", return_n_genes=True)
    assert enc["n_genes"].tolist() == [2, 0, 0, 1]
    assert enc["attention_mask"].sum(1).tolist() == [3, 1, 1, 2]
    assert enc["input_ids"][1, 0] == tok.cls_token_id
    assert any("2 of 4 cells express no vocabulary gene" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- bad input
def test_bad_values_are_clear_errors(tok, pbmc68k_adata) -> None:  # type: ignore[no-untyped-def]
    names = ["CD3E", "GAPDH", "MS4A1"]
    with pytest.raises(ValueError, match=r"(?s)non-negative.*scaled.*raw counts"):
        tok(np.array([[1.0, -0.5, 2.0]]), names)
    with pytest.raises(ValueError, match=r"NaN or infinity.*cell 1, column 2, gene 'MS4A1'"):
        tok(np.array([[1.0, 0.0, 2.0], [1.0, 0.0, np.nan]]), names)
    with pytest.raises(ValueError, match="NaN or infinity"):
        tok(sp.csr_matrix(np.array([[np.inf, 0.0, 2.0]])), names)
    with pytest.raises(ValueError, match="must be numeric"):
        tok(np.array([["1", "2", "3"]], dtype=object), names)
    with pytest.raises(ValueError, match=r"Shape mismatch.*3 gene columns but 2"):
        tok(np.ones((2, 3)), names[:2])
    with pytest.raises(ValueError, match="gene_names is required"):
        tok(np.ones((2, 3)))
    with pytest.raises(ValueError, match="reshape"):
        tok(np.ones(3), names)
    with pytest.raises(TypeError, match="not text"):
        tok("CD3E GAPDH")
    with pytest.raises(TypeError, match="Unsupported input type"):
        tok([[1, 2, 3]], names)
    # real scaled data (scanpy's pbmc68k_reduced, after sc.pp.scale)
    with pytest.raises(ValueError, match="scaled"):
        tok(pbmc68k_adata)
    # ...whose .raw holds log-normalised values, which are fine
    enc = tok(pbmc68k_adata, use_raw=True, return_tensors="np")
    assert enc["input_ids"].shape[0] == 700


def test_bad_anndata_options(tok, adata) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="Layer 'counts' not found"):
        tok(adata, layer="counts")
    with pytest.raises(ValueError, match="no .raw"):
        tok(adata, use_raw=True)
    with pytest.raises(ValueError, match="gene_column 'symbol' not in var"):
        tok(adata, gene_column="symbol")
    with pytest.raises(ValueError, match="only apply to AnnData"):
        tok(adata.X, list(adata.var_names), layer="counts")
    with pytest.raises(ValueError, match="truncation must be"):
        tok(adata, truncation="left")


def test_vocab_missing_special_tokens(tmp_path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"CD3E": 0, "GAPDH": 1, "<pad>": 2}))
    with pytest.raises(ValueError, match=r"(?s)lacks the special token\(s\) \['<cls>', '<eoc>'\].*Add them"):
        ScGPTTokenizer(str(path))
    path.write_text(json.dumps(["CD3E", "GAPDH"]))
    with pytest.raises(ValueError, match="JSON object"):
        ScGPTTokenizer(str(path))


# ----------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(vocab_file, adata, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = ScGPTTokenizer(
        str(vocab_file), n_bins=31, max_length=300, truncation_strategy="highest", cls_value=-2.0, pad_value=-1.0
    )
    tok.save_pretrained(tmp_path / "tok")
    saved_vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text())
    assert saved_vocab == json.loads(Path(vocab_file).read_text())
    assert list(saved_vocab)[-3:] == list(SPECIAL_TOKENS)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ScGPTTokenizer"
    for key, value in dict(n_bins=31, max_length=300, truncation_strategy="highest", cls_value=-2.0,
                           pad_value=-1.0, eoc_token="<eoc>", include_zero_genes=False, do_binning=True).items():
        assert config[key] == value, key

    loaded = ScGPTTokenizer.from_pretrained(tmp_path / "tok")
    assert (loaded.n_bins, loaded.max_length, loaded.truncation_strategy) == (31, 300, "highest")
    assert (loaded.pad_token_id, loaded.cls_token_id) == (tok.pad_token_id, tok.cls_token_id)
    assert loaded.convert_tokens_to_ids("<eoc>") == tok.vocab["<eoc>"]
    a, b = tok(adata[:8], return_tensors="np"), loaded(adata[:8], return_tensors="np")
    for k in ("input_ids", "values", "attention_mask"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["values"][:, 1:].max() <= 30 and (a["values"][:, 0] == -2).all()
    overridden = ScGPTTokenizer.from_pretrained(tmp_path / "tok", max_length=100)
    assert overridden.max_length == 100


def test_auto_tokenizer_loads_it(vocab_file, adata, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    class _TokenizerTestConfig(PretrainedConfig):
        model_type = "scgpt-tokenizer-test"

    AutoConfig.register(_TokenizerTestConfig.model_type, _TokenizerTestConfig, exist_ok=True)
    AutoTokenizer.register(_TokenizerTestConfig, tokenizer_class=ScGPTTokenizer, exist_ok=True)
    tok = ScGPTTokenizer(str(vocab_file), max_length=64)
    _TokenizerTestConfig().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    auto = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert isinstance(auto, ScGPTTokenizer) and auto.max_length == 64
    np.testing.assert_array_equal(
        auto(adata[:4], return_tensors="np")["values"], tok(adata[:4], return_tensors="np")["values"]
    )


def test_auto_tokenizer_with_package_config(vocab_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With the package's own ScGPTConfig, registered as scgpt_hf/__init__ is meant to do."""
    import scgpt_hf
    from transformers import AutoTokenizer

    if not hasattr(scgpt_hf, "ScGPTTokenizer"):
        AutoTokenizer.register(scgpt_hf.ScGPTConfig, tokenizer_class=ScGPTTokenizer, exist_ok=True)
    scgpt_hf.ScGPTConfig().save_pretrained(tmp_path / "m")
    ScGPTTokenizer(str(vocab_file)).save_pretrained(tmp_path / "m")
    auto = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert type(auto).__name__ == "ScGPTTokenizer"
