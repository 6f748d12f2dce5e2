"""Gene networks from an scGPT model: gene embeddings, a similarity graph, gene programs, attention scores.

What the original offers (``scgpt.tasks.GeneEmbedding`` and the GRN tutorials), rebuilt on this package:

* ``gene_embeddings``: each gene's vector from the gene encoder (token embedding, then its LayerNorm: the
  original's ``model.encoder``), data-independent, as an AnnData with genes as observations;
* ``gene_similarity_network``: cosine (or Pearson) similarity between those vectors and a sparse kNN /
  threshold graph in scanpy's layout (``obsp["connectivities"]``, ``uns["neighbors"]``), so
  ``sc.tl.leiden`` / ``sc.tl.umap`` run on it directly;
* ``gene_programs``: clusters of that graph (Leiden through scanpy when ``igraph`` or ``leidenalg`` is
  installed, else Louvain from ``networkx``, else connected components), as the tutorial's "metagenes";
* ``most_similar_genes``: the genes closest to one gene (the original's ``compute_similarities``);
* ``attention_gene_scores``: attention-derived gene x gene scores averaged over a set of cells, with the
  tutorial's rank normalisation, computed layer by layer on streamed batches of cells.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .anndata_input import ExpressionInput, check_values, row_blocks, select_matrix
from .cell_encoding import encode_cell, match_gene_names
from .inference import eval_mode, load_model, pick_device
from .modeling_scgpt import ScGPTModel, ScGPTPreTrainedModel
from .tokenization_scgpt import ScGPTTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "attention_gene_scores",
    "gene_embeddings",
    "gene_programs",
    "gene_similarity_network",
    "most_similar_genes",
]

# Largest number of similarity entries computed at once (block of rows x all genes).
_BLOCK_ELEMENTS = 1 << 24
# Above this many genes the dense similarity matrix is not kept in obsp unless asked for.
_DENSE_SIMILARITY_LIMIT = 5000

MissingPolicy = Literal["error", "drop"]


# ----------------------------------------------------------------------------------------------
# Helpers


def _special_tokens(tokenizer: ScGPTTokenizer) -> tuple[str, ...]:
    return tuple(str(t) for t in (tokenizer.pad_token, tokenizer.cls_token, getattr(tokenizer, "eoc_token", None)) if t)


def _resolve_genes(
    genes: Sequence[str],
    known: dict[str, int],
    missing: MissingPolicy,
    where: str,
    specials: Sequence[str] = (),
) -> tuple[list[str], np.ndarray, list[str]]:
    """(kept genes, their ids in `known`, missing genes); raises on repeats and, with missing="error", on gaps."""
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', got {missing!r}.")
    if isinstance(genes, str):
        raise TypeError("genes must be a sequence of gene symbols, not a single string; wrap it in a list.")
    names = [str(g) for g in genes]
    if not names:
        raise ValueError("genes is empty; pass at least one gene symbol.")
    ids, unmatched, duplicates = match_gene_names(names, known, specials)
    if duplicates:
        raise ValueError(f"genes holds repeated names, e.g. {sorted(set(duplicates))[:10]}; pass each gene once.")
    if unmatched and missing == "error":
        raise ValueError(
            f"{len(unmatched)} of {len(names)} genes are not in {where}: {unmatched[:20]}"
            f"{' ...' if len(unmatched) > 20 else ''}. Pass genes it knows, or missing='drop' to leave them out "
            "(they are then listed in the result's uns)."
        )
    keep = ids >= 0
    if not keep.any():
        raise ValueError(f"None of the {len(names)} genes is in {where} (e.g. {names[:5]}).")
    if unmatched:
        logger.warning("%d genes not in %s were left out: %s", len(unmatched), where, unmatched[:20])
    return [n for n, k in zip(names, keep) if k], ids[keep], unmatched


def _gene_vectors(gene_adata: AnnData, use_rep: str | None = None) -> np.ndarray:
    """The genes' vectors (`X`, or `obsm[use_rep]`) as a dense array."""
    x = gene_adata.X if use_rep is None else gene_adata.obsm[use_rep]
    if x is None:
        raise ValueError("gene_adata has no X; pass use_rep= naming an obsm entry with the gene vectors.")
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _unit_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """Rows scaled so that their dot products are the similarity `metric` ("cosine" or "correlation")."""
    x = np.asarray(x, dtype=np.float64)
    if metric == "correlation":
        x = x - x.mean(axis=1, keepdims=True)
    elif metric != "cosine":
        raise ValueError(f"metric must be 'cosine' or 'correlation', got {metric!r}.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = np.flatnonzero(norms.ravel() == 0)[:5].tolist()
        raise ValueError(f"Some gene vectors have zero norm (rows {bad}); their {metric} similarity is undefined.")
    return x / norms


# ----------------------------------------------------------------------------------------------
# Gene embeddings and the similarity graph


def gene_embeddings(
    model: ScGPTPreTrainedModel | str | os.PathLike,
    tokenizer: ScGPTTokenizer | str | os.PathLike | None = None,
    genes: Sequence[str] | None = None,
    *,
    missing: MissingPolicy = "error",
    batch_size: int = 4096,
) -> AnnData:
    """Gene-encoder vectors (token embedding, then its LayerNorm) of `genes`, genes as observations.

    Args:
        model: any scGPT model (its backbone is used) or a folder / Hub id.
        tokenizer: the model's `ScGPTTokenizer` (default: the one saved with the model).
        genes: gene symbols; default every vocabulary gene (special tokens left out), in id order.
        missing: genes not in the vocabulary raise ("error", naming them) or are left out and listed
            in `uns["gene_embedding"]["missing_genes"]` ("drop").
        batch_size: genes per forward pass of the encoder.

    Returns:
        AnnData (n_genes x hidden_size): `X` float32 gene-encoder output, `obs_names` gene symbols,
        `obs["token_id"]` vocabulary ids, `uns["gene_embedding"]` = {`model`, `source`, `missing_genes`}.
    """
    backbone, tokenizer, name = load_model(model, tokenizer)
    vocab = tokenizer.get_vocab()
    specials = _special_tokens(tokenizer)
    if genes is None:
        genes = [g for g, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if g not in specials]
    names, ids, dropped = _resolve_genes(genes, vocab, missing, "the model's vocabulary", specials)
    encoder = backbone.embeddings
    device = encoder.gene_embeddings.weight.device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = torch.as_tensor(ids[start : start + batch_size], dtype=torch.long, device=device)
            rows.append(encoder.gene_norm(encoder.gene_embeddings(chunk)).float().cpu().numpy())
    out = AnnData(
        X=np.concatenate(rows).astype(np.float32),
        obs=pd.DataFrame({"token_id": ids.astype(np.int64)}, index=pd.Index(names, name="gene")),
    )
    out.uns["gene_embedding"] = {
        "model": name or type(backbone).__name__,
        "source": "embeddings.gene_norm(embeddings.gene_embeddings(token_id))",
        "missing_genes": list(dropped),
    }
    return out


def gene_similarity_network(
    gene_adata: AnnData,
    *,
    metric: Literal["cosine", "correlation"] = "cosine",
    threshold: float | None = None,
    top_k: int | None = None,
    use_rep: str | None = None,
    store_similarity: bool | None = None,
) -> AnnData:
    """Gene-gene similarity and a sparse graph on it, written into `gene_adata` (returned).

    Edges join each gene to its `top_k` most similar genes (default 15, as `sc.pp.neighbors`), keeping
    only those with similarity >= `threshold` when given; with `threshold` alone, every pair at or above
    it. Edge weights are the similarities; edges of similarity <= 0 are dropped (community detection needs
    positive weights); the graph is made symmetric with the larger weight of i->j and j->i. Similarities
    are computed in row blocks, so the dense matrix exists only when kept.

    Args:
        gene_adata: genes x features, e.g. from `gene_embeddings`.
        metric: "cosine" (the original's) or "correlation" (Pearson across features).
        threshold: minimum similarity of an edge, in (0, 1].
        top_k: neighbours per gene.
        use_rep: `obsm` key holding the vectors (default `X`).
        store_similarity: keep the dense similarity in `obsp["similarity"]` (default: when n_genes <= 5000).

    Writes:
        `obsp["connectivities"]` (CSR, similarity weights), `obsp["distances"]` (CSR, 1 - similarity on
        the same edges), `obsp["similarity"]` (dense float32, if kept), `uns["neighbors"]` in scanpy's
        layout (`connectivities_key`, `distances_key`, `params` with `n_neighbors`, `metric`,
        `threshold`, `method`, `use_rep`) so `sc.tl.leiden(gene_adata)` / `sc.tl.umap` work.
    """
    x = _gene_vectors(gene_adata, use_rep)
    if threshold is not None and not 0 < float(threshold) <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}.")
    if top_k is None and threshold is None:
        top_k = 15
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    keep_dense = x.shape[0] <= _DENSE_SIMILARITY_LIMIT if store_similarity is None else bool(store_similarity)
    graph, dense = _similarity_graph(_unit_rows(x, metric), top_k, threshold, keep_dense)
    _store_graph(gene_adata, graph, dense, {
        "n_neighbors": int(top_k) if top_k is not None else 0,
        "metric": metric,
        "threshold": float(threshold) if threshold is not None else None,
        "method": "scgpt_hf.gene_similarity_network",
        "use_rep": use_rep if use_rep is not None else "X",
    })
    return gene_adata


def _similarity_graph(
    unit: np.ndarray, top_k: int | None, threshold: float | None, keep_dense: bool
) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """The symmetric similarity graph of unit rows (float32 CSR) and, with `keep_dense`, the dense similarity.

    Similarities are computed a block of rows at a time (at most `_BLOCK_ELEMENTS` entries); a pair is joined
    with the larger weight of i->j and j->i.
    """
    n = unit.shape[0]
    dense = np.empty((n, n), dtype=np.float32) if keep_dense else None
    k = None if top_k is None else min(int(top_k), n - 1)
    rows_i, cols_j, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n, step):
        block = np.clip(unit[start : start + step] @ unit.T, -1.0, 1.0)
        if dense is not None:
            dense[start : start + step] = block
        r, c, v = _block_edges(block, start, k, threshold)
        rows_i.append(r + start)
        cols_j.append(c)
        weights.append(v)
    edges = (np.concatenate(weights), (np.concatenate(rows_i), np.concatenate(cols_j)))
    graph = sp.csr_matrix(edges, shape=(n, n), dtype=np.float64)
    graph = graph.maximum(graph.T).tocsr().astype(np.float32)
    graph.sort_indices()
    return graph, dense


def _block_edges(
    block: np.ndarray, start: int, k: int | None, threshold: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges out of a block of similarity rows (first row `start`): (row in the block, column, similarity).

    Each row's `k` most similar genes (with `k` None: every gene at or above `threshold`), itself left out,
    keeping only positive similarities at or above `threshold` (community detection needs positive weights).
    """
    local = np.arange(block.shape[0])
    block[local, start + local] = -np.inf  # no self loops
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if k is not None:
        cand = np.argpartition(-block, k - 1, axis=1)[:, :k]
        r, c = np.repeat(local, k), cand.ravel()
        v = np.take_along_axis(block, cand, axis=1).ravel()
    else:
        r, c = np.nonzero(block >= threshold)
        v = block[r, c]
    ok = (v > 0) & (v >= (threshold if threshold is not None else 0.0))
    return r[ok], c[ok], v[ok]


def _store_graph(gene_adata: AnnData, graph: sp.csr_matrix, dense: np.ndarray | None, params: dict) -> None:
    """Write the graph in scanpy's neighbors layout (distances = 1 - similarity on the same edges)."""
    distances = graph.copy()
    distances.data = 1.0 - distances.data
    gene_adata.obsp["connectivities"] = graph
    gene_adata.obsp["distances"] = distances
    if dense is not None:
        gene_adata.obsp["similarity"] = dense
    elif "similarity" in gene_adata.obsp:
        del gene_adata.obsp["similarity"]
    gene_adata.uns["neighbors"] = {
        "connectivities_key": "connectivities", "distances_key": "distances", "params": params,
    }


def most_similar_genes(
    gene_adata: AnnData, gene: str, *, top_n: int | None = 10, metric: Literal["cosine", "correlation"] = "cosine"
) -> pd.DataFrame:
    """The genes most similar to `gene` (itself left out): DataFrame with columns `gene`, `similarity`, best first."""
    if gene not in gene_adata.obs_names:
        raise KeyError(f"{gene!r} is not among the {gene_adata.n_obs} genes of gene_adata.")
    unit = _unit_rows(_gene_vectors(gene_adata), metric)
    i = gene_adata.obs_names.get_loc(gene)
    sims = unit @ unit[i]
    order = [j for j in np.argsort(-sims, kind="stable") if j != i]
    if top_n is not None:
        order = order[:top_n]
    return pd.DataFrame({"gene": gene_adata.obs_names[order].astype(str), "similarity": sims[order].astype(np.float32)})


# ----------------------------------------------------------------------------------------------
# Gene programs


def gene_programs(
    gene_adata: AnnData,
    resolution: float = 1.0,
    min_size: int = 5,
    *,
    method: Literal["auto", "leiden", "louvain", "components"] = "auto",
    seed: int = 0,
    key_added: str = "gene_program",
) -> pd.DataFrame:
    """Gene programs: communities of the gene similarity graph, as the original's "metagenes".

    Uses `obsp["connectivities"]`, building it with `gene_similarity_network` defaults when absent. The
    original tutorial runs Leiden (resolution 40 on ~1,200 genes' 15-NN graph) and keeps clusters of at
    least 5 genes; higher `resolution` gives more, smaller programs.

    Args:
        gene_adata: genes as observations (e.g. from `gene_embeddings`), modified in place.
        resolution: community-detection resolution (unused by "components").
        min_size: smallest program kept; genes of smaller clusters get no program (NaN).
        method: "leiden" (scanpy, needs `igraph` or `leidenalg`), "louvain" (networkx), "components"
            (connected components of the graph, no extra dependency; sensible with a `threshold` graph);
            "auto" takes the first available in that order.
        seed: random state of the community detection.
        key_added: `obs` column and `uns` key written.

    Returns:
        DataFrame, one row per program (index `key_added`: "0", "1", ... by decreasing size) with
        `n_genes`, `genes` (list of symbols, by decreasing weighted degree within the program) and
        `mean_similarity` (mean pairwise cosine similarity of the program's vectors). Also writes
        `obs[key_added]` (categorical, NaN for genes in no kept program) and `uns[key_added]` =
        {`method`, `resolution`, `min_size`, `seed`, `n_programs`}.
    """
    if int(min_size) < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}.")
    if "connectivities" not in gene_adata.obsp:
        gene_similarity_network(gene_adata)
    graph = sp.csr_matrix(gene_adata.obsp["connectivities"])
    method = _pick_method(method)
    raw = _cluster(graph, method, float(resolution), int(seed))
    sizes = np.bincount(raw)
    big = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] >= min_size]
    rename = {int(c): str(i) for i, c in enumerate(big)}
    names = [str(i) for i in range(len(big))]
    labels = pd.Categorical([rename.get(int(c)) for c in raw], categories=names)
    gene_adata.obs[key_added] = labels

    unit = _unit_rows(_gene_vectors(gene_adata), "cosine")
    genes = gene_adata.obs_names.astype(str).to_numpy()
    records = []
    for c in big:
        members = np.flatnonzero(raw == c)
        degree = np.asarray(graph[members][:, members].sum(axis=1)).ravel()
        order = members[np.argsort(-degree, kind="stable")]
        total = unit[members].sum(axis=0)
        m = len(members)
        mean_sim = float((total @ total - m) / (m * (m - 1))) if m > 1 else 1.0
        records.append({"n_genes": m, "genes": genes[order].tolist(), "mean_similarity": mean_sim})
    table = pd.DataFrame.from_records(records, columns=["n_genes", "genes", "mean_similarity"])
    table.index = pd.Index(names, name=key_added)
    gene_adata.uns[key_added] = {
        "method": method, "resolution": float(resolution), "min_size": int(min_size), "seed": int(seed),
        "n_programs": len(names),
    }
    return table


def _pick_method(method: str) -> str:
    has = {m: importlib.util.find_spec(m) is not None for m in ("scanpy", "igraph", "leidenalg", "networkx")}
    available = {
        "leiden": has["scanpy"] and (has["igraph"] or has["leidenalg"]),
        "louvain": has["networkx"],
        "components": True,
    }
    if method == "auto":
        return next(m for m in ("leiden", "louvain", "components") if available[m])
    if method not in available:
        raise ValueError(f"method must be 'auto', 'leiden', 'louvain' or 'components', got {method!r}.")
    if not available[method]:
        need = "scanpy and igraph (pip install igraph)" if method == "leiden" else "networkx"
        raise ImportError(f"method={method!r} needs {need}; install it or use method='auto'.")
    return method


def _cluster(graph: sp.csr_matrix, method: str, resolution: float, seed: int) -> np.ndarray:
    """Integer community of every node of a symmetric weighted graph."""
    n = graph.shape[0]
    if method == "leiden":
        import scanpy as sc

        flavor = "igraph" if importlib.util.find_spec("igraph") is not None else "leidenalg"
        extra: dict[str, Any] = {"n_iterations": 2, "directed": False} if flavor == "igraph" else {}
        holder = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
        sc.tl.leiden(
            holder, resolution=resolution, random_state=seed, adjacency=graph, key_added="program",
            flavor=flavor, **extra,
        )
        return holder.obs["program"].astype(int).to_numpy()
    if method == "louvain":
        import networkx as nx

        g = nx.from_scipy_sparse_array(graph, edge_attribute="weight")
        communities = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
        labels = np.empty(n, dtype=np.int64)
        for c, members in enumerate(communities):
            labels[list(members)] = c
        return labels
    _, labels = sp.csgraph.connected_components(graph, directed=False)
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Attention-derived scores


def attention_gene_scores(
    adata: AnnData,
    model: ScGPTPreTrainedModel | str | os.PathLike,
    tokenizer: ScGPTTokenizer | str | os.PathLike | None = None,
    genes: Sequence[str] | None = None,
    *,
    layer: int = -1,
    cells: Any = None,
    normalization: Literal["rank", "none"] = "rank",
    batch_size: int = 8,
    max_length: int | None = None,
    missing: MissingPolicy = "error",
    seed: int = 0,
    expression_layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 1024,
) -> pd.DataFrame:
    """Gene x gene attention scores of one transformer layer, averaged over heads and over `cells`.

    As in the original attention-GRN tutorial, every cell is read with the same gene set: `<cls>` then
    all of `genes`, unexpressed ones with value 0 (bins computed over all of the cell's vocabulary genes,
    with the tokenizer's seeded tie-breaking, so expressed genes get the bins `embed` would give them),
    `<cls>` valued `tokenizer.cls_value`. The chosen layer's attention probabilities (eager attention,
    float32; later layers are not run) of each cell are normalised per head, then averaged over heads and
    cells. With normalization="rank" (the tutorial's): within each row (query gene) the scores become ranks
    / M (M = number of tokens, `<cls>` included), then within each column ranks of those / M; ties share
    their average rank (ranking attention probabilities orders them as the tutorial's raw q.k scores,
    softmax being monotonic). normalization="none" averages the probabilities themselves.

    The result is NOT symmetric: `scores.loc[a, b]` is how strongly gene `a` (query, row) attends to gene
    `b` (key, column); the tutorial reads a column (every gene's attention to a regulator).

    Args:
        adata: cells x genes (raw counts or normalised values; in memory or backed, read `chunk_size`
            rows at a time, never densified as a whole).
        model, tokenizer: an scGPT model without batch labels (or folder / Hub id) and its tokenizer.
        genes: genes to score (e.g. highly variable ones); default every vocabulary gene of `adata`.
        layer: transformer layer (Python indexing, -1 = last).
        cells: which cells to average: None (all), boolean mask, integer positions or obs names.
        normalization: "rank" or "none" (see above).
        batch_size: cells per forward pass (memory ~ batch_size x heads x (len(genes)+1)^2 floats).
        max_length: largest allowed len(genes) + 1 (default: the model's `max_seq_len`).
        missing: genes not in both `adata` and the vocabulary raise ("error") or are left out ("drop",
            listed in `attrs["missing_genes"]`).
        seed: seed of the bins' tie-breaking.
        expression_layer, use_raw, gene_column: read `adata.layers[...]` / `adata.raw`, genes from a var column.
        device: torch device (default CUDA when available); the model is moved there.
        chunk_size: rows of `adata` read at a time.

    Returns:
        DataFrame (len(genes) x len(genes), float64; index = query genes, columns = key genes, both in the
        order of `genes`), `<cls>` left out. `attrs`: `n_cells`, `layer` (non-negative index),
        `normalization`, `missing_genes`.
    """
    if normalization not in ("rank", "none"):
        raise ValueError(f"normalization must be 'rank' or 'none', got {normalization!r}.")
    if int(batch_size) < 1 or int(chunk_size) < 1:
        raise ValueError("batch_size and chunk_size must be at least 1.")
    backbone, tokenizer, _ = load_model(model, tokenizer)
    n_layers = len(backbone.encoder.layers)
    if not -n_layers <= int(layer) < n_layers:
        raise ValueError(f"layer must be in [{-n_layers}, {n_layers}), the model has {n_layers} layers; got {layer}.")
    layer = int(layer) % n_layers
    source = select_matrix(adata, expression_layer, use_raw, gene_column)
    limit = int(backbone.config.max_seq_len if max_length is None else max_length)
    scored = _ScoredGenes.build(source.gene_names, tokenizer, genes, missing, limit)
    rows = _cell_rows(adata, cells)

    m = len(scored.names) + 1
    total = torch.zeros((m, m), dtype=torch.float64)
    with (
        _layer_attention(backbone, layer, scored.token_ids, pick_device(device)) as attention,
        torch.inference_mode(),
    ):
        values = _selected_cell_values(source, rows, chunk_size, scored, tokenizer, seed)
        for batch in _batches(values, int(batch_size)):
            for cell in attention(batch):  # (heads, M, M), one cell at a time to bound memory
                scores = _rank_normalise(cell) if normalization == "rank" else cell.double()
                total.add_(scores.mean(0).cpu())

    mean = (total / len(rows)).numpy()[1:, 1:]
    names = scored.names
    scores = pd.DataFrame(mean, index=pd.Index(names, name="query_gene"), columns=pd.Index(names, name="key_gene"))
    scores.attrs.update(
        {"n_cells": int(len(rows)), "layer": layer, "normalization": normalization, "missing_genes": scored.dropped}
    )
    return scores


@dataclass(frozen=True)
class _ScoredGenes:
    """The genes scored and how a cell's matrix columns become their tokens (`<cls>`, then the genes)."""

    names: list[str]
    dropped: list[str]  # asked for but not in both the data and the vocabulary (missing="drop")
    token_ids: np.ndarray  # <cls>, then the genes' vocabulary ids
    vocab_ids: np.ndarray  # column -> vocabulary id (-1: unknown or repeated name)
    position: np.ndarray  # column -> position after <cls> (-1: not scored)

    @classmethod
    def build(
        cls, var_names: list[str], tokenizer: ScGPTTokenizer, genes: Sequence[str] | None, missing: MissingPolicy,
        limit: int,
    ) -> _ScoredGenes:
        vocab_ids = tokenizer.match_genes(var_names).ids
        columns = {name: j for j, name in enumerate(var_names) if vocab_ids[j] >= 0}
        if genes is None:
            genes = [var_names[j] for j in np.flatnonzero(vocab_ids >= 0)]
        names, cols, dropped = _resolve_genes(genes, columns, missing, "both adata and the model's vocabulary")
        if len(names) + 1 > limit:
            raise ValueError(
                f"{len(names)} genes make {len(names) + 1} tokens per cell (with <cls>), more than max_length={limit}. "
                "Pass fewer genes (e.g. genes=adata.var_names[adata.var.highly_variable]) or a larger max_length."
            )
        position = np.full(len(var_names), -1, dtype=np.int64)
        position[cols] = np.arange(len(names))
        token_ids = np.concatenate(([tokenizer.cls_token_id], vocab_ids[cols])).astype(np.int64)
        return cls(names, list(dropped), token_ids, vocab_ids, position)


def _cell_rows(adata: AnnData, cells: Any) -> np.ndarray:
    """Sorted unique row positions of `cells` (None, boolean mask, integer positions or obs names)."""
    n = adata.n_obs
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"A boolean cells mask must have one entry per cell ({n}), got shape {arr.shape}.")
        rows = np.flatnonzero(arr)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise ValueError(f"cells holds positions outside 0..{n - 1}.")
        rows = np.unique(np.where(arr < 0, arr + n, arr))
    else:
        names = arr.astype(str)
        pos = adata.obs_names.get_indexer(names)
        if (pos < 0).any():
            raise ValueError(f"cells names not in adata.obs_names: {names[pos < 0][:10].tolist()}.")
        rows = np.unique(pos)
    if rows.size == 0:
        raise ValueError("cells selects no cell.")
    return rows


class _StopForward(Exception):
    """Raised by the capture hook once the chosen layer has run: later layers are not needed."""


@contextlib.contextmanager
def _layer_attention(
    backbone: ScGPTModel, layer: int, token_ids: np.ndarray, device: torch.device
) -> Iterator[Callable[[np.ndarray], torch.Tensor]]:
    """A function (values of a batch of cells, all with the tokens `token_ids`) -> that layer's attention
    probabilities (float32, cells x heads x M x M), running the backbone on `device` in eval mode with eager
    attention and stopping after `layer`. The model's mode and attention implementation are restored on exit;
    it stays on `device`."""
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output[1])
        raise _StopForward

    def attention(values: np.ndarray) -> torch.Tensor:
        captured.clear()
        batch, m = values.shape
        try:
            backbone(
                input_ids=ids.expand(batch, m),
                values=torch.from_numpy(values).to(device),
                attention_mask=torch.ones((batch, m), dtype=torch.long, device=device),
            )
        except _StopForward:
            pass
        if not captured or captured[0] is None:
            raise RuntimeError("The chosen layer returned no attention probabilities; eager attention is required.")
        return captured[0].float()

    previous_attn = backbone.config._attn_implementation
    backbone.to(device)
    if previous_attn != "eager":
        backbone.set_attn_implementation("eager")
    handle = backbone.encoder.layers[layer].register_forward_hook(capture)
    ids = torch.from_numpy(token_ids).to(device)
    try:
        with eval_mode(backbone):
            yield attention
    finally:
        handle.remove()
        if previous_attn != "eager":
            backbone.set_attn_implementation(previous_attn)


def _selected_cell_values(
    source: ExpressionInput, rows: np.ndarray, chunk_size: int, scored: _ScoredGenes, tokenizer: ScGPTTokenizer,
    seed: int,
) -> Iterator[np.ndarray]:
    """The token values of the cells at `rows` (sorted), reading `chunk_size` rows at a time and skipping chunks
    that hold none of them; every block read is checked for NaN, infinite and negative values."""
    matrix = source.matrix
    if sp.issparse(matrix) and matrix.format != "csr":
        matrix = matrix.tocsr()  # once, not per chunk
    n = source.n_cells
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        if not ((rows >= start) & (rows < stop)).any():
            continue
        for first, block in row_blocks(matrix, start, stop):
            check_values(block, first, source.gene_names)
            for r in rows[(rows >= first) & (rows < first + block.shape[0])] - first:
                yield _cell_values(block, int(r), scored, tokenizer, seed)


def _cell_values(
    block: sp.csr_matrix, r: int, scored: _ScoredGenes, tokenizer: ScGPTTokenizer, seed: int
) -> np.ndarray:
    """One cell's token values: `cls_value`, then the bins of the scored genes (0 where not expressed)."""
    vocab_ids, position = scored.vocab_ids, scored.position
    lo, hi = block.indptr[r], block.indptr[r + 1]
    cols, vals = block.indices[lo:hi], block.data[lo:hi]
    keep = (vocab_ids[cols] >= 0) & (vals != 0)
    cols, vals = cols[keep], vals[keep].astype(np.float32)
    out = np.zeros(len(scored.token_ids), dtype=np.float32)
    out[0] = tokenizer.cls_value
    if cols.size:
        _, bins = encode_cell(
            vocab_ids[cols], vals, seed=seed, strategy=None, max_length=cols.size + 1,
            n_bins=tokenizer.n_bins, do_binning=tokenizer.do_binning,
        )
        pos = position[cols]
        chosen = pos >= 0
        out[1 + pos[chosen]] = bins[chosen]
    return out


def _batches(items: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """`items` stacked `size` at a time (the last batch may be smaller)."""
    pending: list[np.ndarray] = []
    for item in items:
        pending.append(item)
        if len(pending) == size:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


def _rank_normalise(probs: torch.Tensor) -> torch.Tensor:
    """The GRN tutorial's normalisation of one cell's (heads, M, M) attention: ranks within each row / M,
    then ranks of those within each column / M."""
    m = probs.shape[-1]
    rows = _average_ranks(probs) / m
    return (_average_ranks(rows.transpose(-1, -2)) / m).transpose(-1, -2)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks along the last dimension, ties sharing their average rank (scipy's rankdata "average" - 1)."""
    ordered, order = x.sort(dim=-1, stable=True)
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(order)
    first = torch.ones_like(order, dtype=torch.bool)  # first of a run of equal values
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    last = torch.ones_like(first)  # last of a run
    last[..., :-1] = first[..., 1:]
    start = torch.where(first, pos, 0).cummax(dim=-1).values
    end = torch.where(last, pos, n).flip(-1).cummin(dim=-1).values.flip(-1)
    ranks = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return ranks.scatter_(-1, order, (start + end).to(torch.float32) / 2)
