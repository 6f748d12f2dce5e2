"""Gene networks (`scgpt_hf.gene_networks`): gene embeddings, similarity graph, gene programs, attention scores.

A small random model (hidden 32, 2 layers) over a vocabulary of real wu2020 genes; every expected value is
computed directly from the model's own modules, outside the code under test.
"""

from __future__ import annotations

import importlib.util
import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from reference import make_vocab
from scipy.stats import rankdata

from scgpt_hf import ScGPTConfig, ScGPTForPreTraining, ScGPTModel, ScGPTTokenizer
from scgpt_hf import gene_networks as gn

N_VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer(wu2020_adata, tmp_path_factory) -> ScGPTTokenizer:
    counts = np.asarray(wu2020_adata.X.sum(axis=0)).ravel()
    genes = [str(g) for g in wu2020_adata.var_names[np.argsort(-counts, kind="stable")[:N_VOCAB]]]
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps(make_vocab(len(genes), genes)))
    return ScGPTTokenizer(str(path))


def config_for(tokenizer: ScGPTTokenizer) -> ScGPTConfig:
    v = tokenizer.get_vocab()
    return ScGPTConfig(
        vocab_size=len(v), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        dropout=0.0, pad_token_id=v["<pad>"], cls_token_id=v["<cls>"], eoc_token_id=v["<eoc>"], max_seq_len=400,
    )


@pytest.fixture(scope="module")
def model(tokenizer) -> ScGPTModel:
    torch.manual_seed(0)
    return ScGPTModel(config_for(tokenizer)).eval()


@pytest.fixture(scope="module")
def vocab_genes(tokenizer) -> list[str]:
    return [g for g, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if not g.startswith("<")]


@pytest.fixture(scope="module")
def cells(wu2020_adata):
    return wu2020_adata[:12].copy()


def direct_gene_vectors(model: ScGPTModel, ids) -> np.ndarray:
    with torch.no_grad():
        emb = model.embeddings
        return emb.gene_norm(emb.gene_embeddings(torch.as_tensor(ids))).numpy()


# ----------------------------------------------------------------------------------------------
# Gene embeddings


def test_gene_embeddings_are_the_gene_encoder_output(model, tokenizer, vocab_genes):
    g = gn.gene_embeddings(model, tokenizer)
    assert g.shape == (N_VOCAB, 32) and g.X.dtype == np.float32
    assert list(g.obs_names) == vocab_genes  # every vocabulary gene, special tokens left out, in id order
    ids = [tokenizer.get_vocab()[x] for x in vocab_genes]
    assert g.obs["token_id"].tolist() == ids
    np.testing.assert_allclose(g.X, direct_gene_vectors(model, ids), atol=1e-6)
    raw = model.embeddings.gene_embeddings.weight.detach().numpy()[ids]
    assert not np.allclose(g.X, raw, atol=1e-3)  # the LayerNorm is applied

    subset = ["B2M", vocab_genes[5], vocab_genes[0]]
    s = gn.gene_embeddings(model, tokenizer, subset)
    assert list(s.obs_names) == subset
    np.testing.assert_allclose(s.X, g[subset].X, atol=1e-6)
    assert s.uns["gene_embedding"]["missing_genes"] == []


def test_gene_embeddings_from_a_head_model_use_its_backbone(model, tokenizer):
    head = ScGPTForPreTraining(model.config)
    head.scgpt.load_state_dict(model.state_dict())
    np.testing.assert_allclose(
        gn.gene_embeddings(head, tokenizer, ["B2M", "MALAT1"]).X,
        gn.gene_embeddings(model, tokenizer, ["B2M", "MALAT1"]).X, atol=1e-6,
    )


def test_gene_embeddings_missing_genes_error_or_are_reported(model, tokenizer):
    with pytest.raises(ValueError, match="NOTAGENE1.*NOTAGENE2|not in the model's vocabulary") as err:
        gn.gene_embeddings(model, tokenizer, ["B2M", "NOTAGENE1", "NOTAGENE2"])
    assert "NOTAGENE1" in str(err.value) and "NOTAGENE2" in str(err.value)
    with pytest.raises(ValueError, match="<cls>"):
        gn.gene_embeddings(model, tokenizer, ["B2M", "<cls>"])  # special tokens are not genes
    with pytest.raises(ValueError, match="repeated"):
        gn.gene_embeddings(model, tokenizer, ["B2M", "B2M"])
    dropped = gn.gene_embeddings(model, tokenizer, ["B2M", "NOTAGENE1"], missing="drop")
    assert list(dropped.obs_names) == ["B2M"]
    assert dropped.uns["gene_embedding"]["missing_genes"] == ["NOTAGENE1"]


# ----------------------------------------------------------------------------------------------
# Similarity network


def cosine(x: np.ndarray) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return u @ u.T


def test_similarity_is_cosine_and_knn_graph_is_symmetric(model, tokenizer, monkeypatch):
    g = gn.gene_similarity_network(gn.gene_embeddings(model, tokenizer), top_k=5)
    direct = cosine(g.X.astype(np.float64))
    np.testing.assert_allclose(g.obsp["similarity"], direct, atol=1e-5)
    graph = g.obsp["connectivities"]
    assert sp.issparse(graph) and graph.shape == (N_VOCAB, N_VOCAB)
    assert abs(graph - graph.T).max() == 0 and graph.diagonal().sum() == 0
    rows, cols = graph.nonzero()
    np.testing.assert_allclose(np.asarray(graph[rows, cols]).ravel(), direct[rows, cols], atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.obsp["distances"][rows, cols]).ravel(), 1 - direct[rows, cols], atol=1e-5)
    # each gene keeps (at least, after symmetrising) its 5 nearest genes
    np.fill_diagonal(direct, -np.inf)
    for i in range(0, N_VOCAB, 37):
        nearest = set(np.argsort(-direct[i])[:5])
        assert nearest <= set(graph[i].indices)
    assert g.uns["neighbors"]["connectivities_key"] == "connectivities"

    # computed in row blocks: same graph
    monkeypatch.setattr(gn, "_BLOCK_ELEMENTS", 7 * N_VOCAB)
    blocked = gn.gene_similarity_network(g.copy(), top_k=5, store_similarity=False)
    assert "similarity" not in blocked.obsp
    assert abs(blocked.obsp["connectivities"] - graph).max() < 1e-6


def test_threshold_graph_holds_exactly_the_pairs_above_it(model, tokenizer):
    g = gn.gene_similarity_network(gn.gene_embeddings(model, tokenizer), threshold=0.3)
    direct = cosine(g.X.astype(np.float64))
    np.fill_diagonal(direct, 0)
    expected = direct >= 0.3
    got = g.obsp["connectivities"].toarray() > 0
    assert expected.sum() > 0
    assert (got == expected).all()
    with pytest.raises(ValueError, match="threshold"):
        gn.gene_similarity_network(g, threshold=0.0)


def test_most_similar_genes(model, tokenizer):
    g = gn.gene_embeddings(model, tokenizer)
    top = gn.most_similar_genes(g, "B2M", top_n=3)
    sims = cosine(g.X.astype(np.float64))[g.obs_names.get_loc("B2M")]
    sims[g.obs_names.get_loc("B2M")] = -np.inf
    assert top["gene"].tolist() == g.obs_names[np.argsort(-sims)[:3]].tolist()


# ----------------------------------------------------------------------------------------------
# Gene programs


def _installed(*names: str) -> bool:
    return any(importlib.util.find_spec(n) is not None for n in names)


# "components" needs nothing; the others only where their libraries are installed (networkx is in CI).
METHODS = ["components"] + ["louvain"] * _installed("networkx") + ["leiden"] * _installed("igraph", "leidenalg")


@pytest.mark.parametrize("method", METHODS)
def test_gene_programs_recover_planted_groups(tokenizer, vocab_genes, method):
    torch.manual_seed(1)
    planted = ScGPTModel(config_for(tokenizer)).eval()
    vocab = tokenizer.get_vocab()
    group_a, group_b = vocab_genes[:20], vocab_genes[20:40]
    others = vocab_genes[40:100]
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(2, 32))
    with torch.no_grad():
        w = planted.embeddings.gene_embeddings.weight
        for group, d in ((group_a, directions[0]), (group_b, directions[1])):
            ids = [vocab[x] for x in group]
            w[ids] = torch.as_tensor(d + 0.15 * rng.normal(size=(len(ids), 32)), dtype=w.dtype)
    g = gn.gene_embeddings(planted, tokenizer, group_a + group_b + others)
    gn.gene_similarity_network(g, top_k=10, threshold=0.6 if method == "components" else None)
    table = gn.gene_programs(g, resolution=1.0, min_size=5, method=method)

    label = g.obs["gene_program"]
    assert label[group_a].nunique() == 1 and label[group_a].notna().all()
    assert label[group_b].nunique() == 1 and label[group_b].notna().all()
    a, b = label[group_a].iloc[0], label[group_b].iloc[0]
    assert a != b
    assert set(group_a) <= set(table.loc[a, "genes"]) and set(group_b) <= set(table.loc[b, "genes"])
    assert table.loc[a, "mean_similarity"] > 0.5
    assert list(table.columns) == ["n_genes", "genes", "mean_similarity"]
    assert (table["n_genes"] >= 5).all() and table["n_genes"].is_monotonic_decreasing
    assert table["n_genes"].sum() == label.notna().sum()
    assert g.uns["gene_program"]["method"] == method
    if method == "components":  # the planted groups are the only components of 5 genes or more
        assert sorted(table["n_genes"]) == [20, 20]


def test_gene_programs_builds_the_graph_when_missing(model, tokenizer):
    g = gn.gene_embeddings(model, tokenizer)
    table = gn.gene_programs(g, min_size=1)
    assert "connectivities" in g.obsp and g.obs["gene_program"].notna().all()
    assert table["n_genes"].sum() == N_VOCAB


# ----------------------------------------------------------------------------------------------
# Attention scores


def direct_attention_scores(model, tokenizer, adata, row: int, genes: list[str], layer: int, rank: bool):
    """One cell's scores from model(..., output_attentions=True) and scipy ranks."""
    vocab = tokenizer.get_vocab()
    match = tokenizer.match_genes(list(adata.var_names))
    enc = tokenizer.encode_with_ids(
        adata.X[row : row + 1], match.ids, truncation=False, padding=False, return_tensors=None, seed=0
    )
    bins = dict(zip(enc["input_ids"][0][1:].tolist(), enc["values"][0][1:].tolist()))  # expressed genes only
    ids = [tokenizer.cls_token_id] + [vocab[x] for x in genes]
    values = [tokenizer.cls_value] + [bins.get(i, 0.0) for i in ids[1:]]
    eager = ScGPTModel(model.config).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([ids]), values=torch.tensor([values]), output_attentions=True)
    probs = out.attentions[layer][0].double().numpy()  # (heads, M, M)
    m = len(ids)
    if rank:
        probs = (rankdata(probs, axis=-1, method="average") - 1) / m
        probs = (rankdata(probs, axis=-2, method="average") - 1) / m
    return probs.mean(0)[1:, 1:]


@pytest.mark.parametrize(("layer", "normalization"), [(-1, "rank"), (0, "rank"), (-1, "none")])
def test_attention_scores_match_direct_computation_on_one_cell(model, tokenizer, cells, vocab_genes,
                                                               layer, normalization):
    genes = vocab_genes[:25]
    before = model.config._attn_implementation
    scores = gn.attention_gene_scores(cells, model, tokenizer, genes, layer=layer, cells=[3],
                                      normalization=normalization)
    assert model.config._attn_implementation == before  # restored
    assert scores.shape == (25, 25) and list(scores.index) == genes and list(scores.columns) == genes
    assert np.isfinite(scores.values).all()
    expected = direct_attention_scores(model, tokenizer, cells, 3, genes, layer, normalization == "rank")
    np.testing.assert_allclose(scores.values, expected, atol=1e-6)
    assert np.abs(scores.values - scores.values.T).max() > 1e-4  # documented: not symmetric
    assert scores.attrs["n_cells"] == 1 and scores.attrs["layer"] == layer % 2
    if normalization == "rank":
        assert scores.values.min() >= 0 and scores.values.max() < 1


def test_attention_scores_average_cells_independent_of_batching(model, tokenizer, cells, vocab_genes):
    genes = vocab_genes[:30]
    single = [gn.attention_gene_scores(cells, model, tokenizer, genes, cells=[i]).values for i in (1, 4, 9)]
    avg = gn.attention_gene_scores(cells, model, tokenizer, genes, cells=[9, 1, 4], batch_size=2, chunk_size=3)
    np.testing.assert_allclose(avg.values, np.mean(single, axis=0), atol=1e-9)
    mask = np.zeros(cells.n_obs, dtype=bool)
    mask[[1, 4, 9]] = True
    by_mask = gn.attention_gene_scores(cells, model, tokenizer, genes, cells=mask, batch_size=3)
    by_name = gn.attention_gene_scores(cells, model, tokenizer, genes, cells=list(cells.obs_names[[1, 4, 9]]))
    np.testing.assert_allclose(by_mask.values, avg.values, atol=1e-9)
    np.testing.assert_allclose(by_name.values, avg.values, atol=1e-9)
    assert avg.attrs["n_cells"] == 3
    assert not np.allclose(single[0], single[1], atol=1e-3)  # cells differ: the average means something


def test_attention_scores_stream_backed_and_dense_input(model, tokenizer, cells, vocab_genes, tmp_path):
    genes = vocab_genes[:20]
    expected = gn.attention_gene_scores(cells, model, tokenizer, genes)
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    np.testing.assert_allclose(
        gn.attention_gene_scores(backed, model, tokenizer, genes, chunk_size=5).values, expected.values, atol=1e-9
    )
    dense = anndata.AnnData(X=cells.X.toarray(), obs=cells.obs[[]], var=cells.var[[]])
    np.testing.assert_allclose(
        gn.attention_gene_scores(dense, model, tokenizer, genes).values, expected.values, atol=1e-9
    )


def test_attention_scores_bad_input(model, tokenizer, cells, vocab_genes):
    with pytest.raises(ValueError, match="NOTAGENE"):
        gn.attention_gene_scores(cells, model, tokenizer, ["B2M", "NOTAGENE"])
    dropped = gn.attention_gene_scores(cells, model, tokenizer, ["B2M", "MALAT1", "NOTAGENE"], missing="drop",
                                       cells=[0])
    assert list(dropped.index) == ["B2M", "MALAT1"] and dropped.attrs["missing_genes"] == ["NOTAGENE"]
    with pytest.raises(ValueError, match="max_length"):
        gn.attention_gene_scores(cells, model, tokenizer, vocab_genes[:50], max_length=40)
    with pytest.raises(ValueError, match="layer"):
        gn.attention_gene_scores(cells, model, tokenizer, vocab_genes[:5], layer=2)
    with pytest.raises(ValueError, match="no cell"):
        gn.attention_gene_scores(cells, model, tokenizer, vocab_genes[:5], cells=np.zeros(cells.n_obs, bool))
