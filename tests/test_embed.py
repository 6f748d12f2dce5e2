"""Zero-shot embedding (`scgpt_hf.embedding.embed`) against the original scGPT, on real wu2020 T cells."""

from __future__ import annotations

import copy
import tracemalloc
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import reference
from scgpt_hf.convert import convert_original_checkpoint
from scgpt_hf.embedding import embed
from scgpt_hf.modeling_scgpt import ScGPTForPreTraining, ScGPTModel
from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

SMALL = dict(d_model=64, nhead=4, d_hid=64, nlayers=2)
N_LEFT_OUT = 200  # the first genes of wu2020 are kept out of the vocabulary (for cells with no vocab gene)


@pytest.fixture(scope="module")
def checkpoint(original_scgpt, wu2020_adata, tmp_path_factory):
    """A small original model over wu2020's genes, saved in the released layout and converted."""
    genes = list(wu2020_adata.var_names[N_LEFT_OUT:])
    vocab = reference.make_vocab(len(genes), genes)
    model = reference.build_original_model(
        flash=False, seed=3, ntoken=len(vocab), vocab=vocab, do_mvc=True, pad_value=-2, **SMALL
    )
    root = tmp_path_factory.mktemp("ckpt")
    original = reference.save_original_checkpoint(model, root / "original", args={}, vocab=vocab, layout="released")
    converted = root / "converted"
    convert_original_checkpoint(original, converted, verbose=False)
    return {"original": original, "converted": converted, "model": model, "vocab": vocab}


@pytest.fixture(scope="module")
def ours(checkpoint):
    model = ScGPTModel.from_pretrained(checkpoint["converted"]).eval()
    return model, ScGPTTokenizer.from_pretrained(checkpoint["converted"])


@pytest.fixture
def cells(wu2020_adata):
    return wu2020_adata[:60].copy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_same_tokens_match_original_encoder(checkpoint, ours, wu2020_adata):
    """(a) Fed the same binned tokens, converted weights give the original's normalised <cls> output."""
    model, tok = ours
    cells = wu2020_adata[::5]  # 40 cells, some longer than max_length
    enc = tok(cells, max_length=1200, padding=True, return_tensors="pt", seed=0, cls_value=-2.0)
    assert enc["attention_mask"].sum(1).max() == 1200 and (enc["attention_mask"] == 0).any()
    original = checkpoint["model"]
    with torch.no_grad():
        theirs = original._encode(
            enc["input_ids"], enc["values"], src_key_padding_mask=enc["attention_mask"] == 0
        )[:, 0, :]
        mine = model(**enc).cell_embedding
    theirs = torch.nn.functional.normalize(theirs, dim=1).numpy()
    mine = torch.nn.functional.normalize(mine, dim=1).numpy()
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)

    # embed() itself gives the same numbers as this direct call (same seed, same tokens).
    adata = cells.copy()
    embed(adata, model, tok, progress=False)
    np.testing.assert_allclose(adata.obsm["X_scGPT"], mine, atol=1e-5, rtol=0)


def test_end_to_end_matches_original_embed_data(original_scgpt, checkpoint, wu2020_adata):
    """(b) The original `embed_data` on the original folder vs `embed` on the converted folder."""
    from scgpt.tasks import embed_data

    wu2020_adata = wu2020_adata[:96]  # 1.5 of the original's batches; 27 cells longer than max_length

    np.random.seed(0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = embed_data(
            wu2020_adata.copy(), checkpoint["original"], gene_col="index", device="cpu",
            use_fast_transformer=False, return_new_adata=True,
        ).X
    adata = wu2020_adata.copy()
    embed(adata, checkpoint["converted"], progress=False)
    mine = adata.obsm["X_scGPT"]
    assert mine.dtype == np.float32 and mine.shape == theirs.shape
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-5)
    cos = _cosine(mine, theirs)
    long = adata.obs["X_scGPT_n_genes"].to_numpy() >= 1200
    print(
        f"\nper-cell cosine ours vs original embed_data ({len(cos)} cells): mean {cos.mean():.6f}, "
        f"min {cos.min():.6f}, 5th percentile {np.percentile(cos, 5):.6f}; "
        f"cells sampled down to 1200 tokens: {long.sum()} (mean cosine {cos[long].mean():.6f})"
    )
    assert cos.mean() >= 0.995


def test_invariant_to_batch_chunk_and_order(ours, cells):
    """(c) A cell's embedding depends on neither batch size, chunk size, token budget nor cell order."""
    model, tok = ours
    ref = embed(cells.copy(), model, tok, progress=False).obsm["X_scGPT"]
    small = embed(cells.copy(), model, tok, batch_size=5, chunk_size=17, max_tokens=None, progress=False)
    np.testing.assert_allclose(small.obsm["X_scGPT"], ref, atol=1e-6, rtol=0)
    order = np.random.default_rng(0).permutation(cells.n_obs)
    shuffled = embed(cells[order].copy(), model, tok, batch_size=7, chunk_size=25, progress=False)
    np.testing.assert_allclose(shuffled.obsm["X_scGPT"], ref[order], atol=1e-6, rtol=0)
    # A head model is embedded through its backbone (base_model_prefix) with the same result.
    head = ScGPTForPreTraining.from_pretrained(model.name_or_path).eval()
    via_head = embed(cells.copy(), head, tok, progress=False)
    np.testing.assert_allclose(via_head.obsm["X_scGPT"], ref, atol=1e-6, rtol=0)
    # Another seed breaks ties differently: embeddings move (a little).
    other = embed(cells.copy(), model, tok, seed=1, progress=False).obsm["X_scGPT"]
    assert np.abs(other - ref).max() > 1e-6


def test_backed_equals_in_memory(ours, cells, tmp_path):
    """(d) A backed AnnData is streamed and gets the same embeddings, in obsm, as in memory."""
    model, tok = ours
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    ref = embed(cells.copy(), model, tok, progress=False)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        embed(backed, model, tok, chunk_size=16, progress=False)
        assert backed.isbacked
        np.testing.assert_allclose(backed.obsm["X_scGPT"], ref.obsm["X_scGPT"], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(backed.obs["X_scGPT_n_genes"], ref.obs["X_scGPT_n_genes"])
        backed.write_h5ad(tmp_path / "out.h5ad")
    finally:
        backed.file.close()
    written = anndata.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(written.obsm["X_scGPT"], backed.obsm["X_scGPT"])
    assert (written.X != cells.X).nnz == 0
    assert written.uns["X_scGPT_params"]["seed"] == 0


def test_float16_matrices_dense_sparse_and_backed(ours, cells, tmp_path):
    """float16 counts (dense in memory or on disk, CSR on disk; scipy holds no float16) embed as their float32
    values do."""
    import h5py

    model, tok = ours
    cells = cells[:24].copy()
    half = cells.X.toarray().astype(np.float16)
    reference = cells.copy()
    reference.X = sp.csr_matrix(half.astype(np.float32))
    want = embed(reference, model, tok, progress=False).obsm["X_scGPT"]
    dense = cells.copy()
    dense.X = half
    np.testing.assert_array_equal(embed(dense.copy(), model, tok, progress=False).obsm["X_scGPT"], want)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    reference.write_h5ad(tmp_path / "sparse.h5ad")
    with h5py.File(tmp_path / "sparse.h5ad", "r+") as f:  # what other writers leave: float16 CSR data
        data = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    for name in ("dense", "sparse"):
        backed = anndata.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
        try:
            assert backed.X.dtype == np.float16
            embed(backed, model, tok, chunk_size=10, progress=False)
            np.testing.assert_allclose(backed.obsm["X_scGPT"], want, atol=1e-6, rtol=0, err_msg=name)
        finally:
            backed.file.close()


def test_cells_without_vocabulary_genes(ours, cells):
    """(e) No crash: NaN row, n_genes == 0, one warning with the count; other cells unaffected."""
    model, tok = ours
    ref = embed(cells.copy(), model, tok, progress=False).obsm["X_scGPT"]
    x = cells.X.tolil()
    x[3, :] = 0  # no counts at all
    x[7, :] = 0
    x[7, :N_LEFT_OUT] = 5  # counts only in genes the vocabulary lacks
    broken = cells.copy()
    broken.X = x.tocsr()
    with pytest.warns(UserWarning, match=r"2 of 60 cells express no gene"):
        embed(broken, model, tok, key_added="emb", progress=False)
    emb = broken.obsm["emb"]
    n_genes = broken.obs["emb_n_genes"].to_numpy()
    assert np.isnan(emb[[3, 7]]).all() and n_genes[3] == 0 and n_genes[7] == 0
    keep = np.setdiff1d(np.arange(cells.n_obs), [3, 7])
    assert (n_genes[keep] > 0).all()
    np.testing.assert_allclose(emb[keep], ref[keep], atol=1e-6, rtol=0)
    assert broken.uns["emb_params"]["n_cells_empty"] == 2


def test_low_vocabulary_coverage_warns_once(ours, cells):
    """Mouse-style symbols leave most expressed genes out: one warning, as soon as the first chunk shows it,
    with the fraction and the cause; the coverage is recorded in uns."""
    model, tok = ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real names: no warning at all
        fine = embed(cells.copy(), model, tok, progress=False)
    assert fine.uns["X_scGPT_params"]["vocabulary_coverage"] > 0.95
    mouse = cells.copy()
    mouse.var_names = [g[:1] + g[1:].lower() for g in cells.var_names]
    with pytest.warns(UserWarning) as record:
        embed(mouse, model, tok, chunk_size=20, progress=False)
    [message] = [str(w.message) for w in record if "expressed genes" in str(w.message)]
    assert "mouse-style" in message and "% of the cells' expressed genes" in message
    assert mouse.uns["X_scGPT_params"]["vocabulary_coverage"] < 0.1


def test_sparse_matrix_never_densified(ours, wu2020_adata, monkeypatch):
    """(f) A wide CSR matrix is read in row chunks: no whole-matrix toarray, bounded Python-side memory."""
    model, tok = ours
    wide = sp.hstack([wu2020_adata.X, sp.csr_matrix((wu2020_adata.n_obs, 170_000), dtype=np.float32)]).tocsr()
    names = list(wu2020_adata.var_names) + [f"FILLER{i}" for i in range(170_000)]
    adata = anndata.AnnData(X=wide, var={"symbol": names})
    adata.var_names = [f"col{i}" for i in range(len(names))]  # symbols come from a var column
    dense_bytes = wide.shape[0] * wide.shape[1] * 4  # 160 MB as float32

    densified_rows: list[int] = []
    original_toarray = sp.csr_matrix.toarray

    def recording_toarray(self, *args, **kwargs):
        densified_rows.append(self.shape[0])
        return original_toarray(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", recording_toarray)
    monkeypatch.setattr(sp.csr_array, "toarray", recording_toarray)
    tracemalloc.start()
    try:
        embed(adata, model, tok, gene_column="symbol", chunk_size=50, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(densified_rows, default=0) <= 50, densified_rows
    assert peak < dense_bytes / 4, f"peak traced memory {peak / 1e6:.0f} MB"
    assert np.isfinite(adata.obsm["X_scGPT"]).all()


def test_errors_are_clear(ours, cells):
    model, tok = ours
    with pytest.raises(ValueError, match="gene_column 'nope' not in var"):
        embed(cells.copy(), model, tok, gene_column="nope", progress=False)
    with pytest.raises(ValueError, match="Layer 'counts' not found"):
        embed(cells.copy(), model, tok, layer="counts", progress=False)
    config = copy.deepcopy(model.config)
    config._name_or_path = ""
    with pytest.raises(ValueError, match="No tokenizer given"):
        embed(cells.copy(), ScGPTModel(config), progress=False)


@pytest.mark.parametrize("batch_norm", [False, "dsbn"])
def test_batch_label_models_embed_with_batch_key(ours, cells, batch_norm):
    """An integration-style model (batch embedding, optional per-batch norm) embeds with obs batch ids,
    equal to running it directly with those batch labels."""
    model, tok = ours
    config = copy.deepcopy(model.config)
    config.use_batch_labels, config.num_batch_labels, config.domain_spec_batchnorm = True, 3, batch_norm
    torch.manual_seed(0)
    batched = ScGPTModel(config).eval()
    batched.load_state_dict(model.state_dict(), strict=False)
    if batch_norm:
        for bn in batched.embeddings.dsbn.bns:
            bn.running_mean.normal_()
    adata = cells.copy()
    adata.obs["batch_id"] = np.arange(adata.n_obs) % 3
    embed(adata, batched, tok, batch_key="batch_id", progress=False, max_length=64)
    enc = tok(adata, max_length=64, truncation="random", seed=0, cls_value=config.pad_value, return_tensors="pt")
    with torch.no_grad():
        direct = batched(**enc, batch_labels=torch.as_tensor(adata.obs["batch_id"].to_numpy())).cell_embedding
    direct = torch.nn.functional.normalize(direct, dim=1).numpy()
    np.testing.assert_allclose(adata.obsm["X_scGPT"], direct, atol=1e-5)
    assert adata.uns["X_scGPT_params"]["batch_key"] == "batch_id"
    with pytest.raises(ValueError, match="needs batch labels"):
        embed(cells.copy(), batched, tok, progress=False)
    bad = cells.copy()
    bad.obs["batch_id"] = 5
    with pytest.raises(ValueError, match=r"obs\['batch_id'\]: batch_labels must lie in \[0, 3\)"):
        embed(bad, batched, tok, batch_key="batch_id", progress=False)
    with pytest.raises(ValueError, match="takes no batch labels"):
        embed(cells.copy(), model, tok, batch_key="batch_id", progress=False)
    # With the training batch names in config.batch2id, obs may hold the names.
    batched.config.batch2id = {"donor_a": 0, "donor_b": 1, "donor_c": 2}
    named = cells.copy()
    named.obs["donor"] = pd.Categorical(np.array(["donor_a", "donor_b", "donor_c"])[adata.obs["batch_id"]])
    embed(named, batched, tok, batch_key="donor", progress=False, max_length=64)
    np.testing.assert_allclose(named.obsm["X_scGPT"], adata.obsm["X_scGPT"], atol=1e-6)
    named.obs["donor"] = named.obs["donor"].cat.rename_categories({"donor_c": "donor_z"})
    with pytest.raises(ValueError, match=r"obs\['donor'\]: Batches 'donor_z' are not among the 3 .*donor_a"):
        embed(named, batched, tok, batch_key="donor", progress=False)
