"""Results into AnnData: where `embed`/`annotate` and the Triton client write cell embeddings and labels.

One place for the keys (scverse conventions; ``key`` is the caller's ``key_added``):

* an embedding: ``obsm[key]`` (n_obs x width float32, L2-normalised, NaN rows for cells with no
  vocabulary gene), ``obs[key + "_n_genes"]`` and ``uns[key + "_params"]``;
* an annotation: ``obs[key]`` (categorical over every class), ``obs[key + "_probability"]``,
  ``obs[key + "_n_genes"]``, ``obsm[key + "_probabilities"]`` and ``uns[key + "_params"]``.

The keys are checked before any compute (`check_embedding_key`, `check_annotation_key`), so a key an
.h5ad file cannot hold fails at once rather than after the run, or on writing the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_KEY",
    "DEFAULT_LABEL_KEY",
    "check_annotation_key",
    "check_embedding_key",
    "check_storable",
    "normalize_rows",
    "write_annotation",
    "write_embedding",
]

DEFAULT_KEY = "X_scGPT"
DEFAULT_LABEL_KEY = "scGPT_label"


def check_storable(key_added: Any, default: str, obsm: Sequence[str], obs: Sequence[str]) -> None:
    """Refuse a `key_added` whose keys (these `obsm` and `obs` keys and ``uns[key_added + "_params"]``) an .h5ad
    file cannot hold: they would fail to write, or come back under other names or not at all. `default` is the
    key suggested when the caller's cannot be repaired."""
    if not isinstance(key_added, str):
        raise ValueError(f"key_added={key_added!r} is not a string, which an .h5ad file cannot hold: choose a string.")
    slots = [("obsm", key) for key in obsm] + [("obs", key) for key in obs] + [("uns", f"{key_added}_params")]
    for slot, key in slots:
        if "/" in key:
            why = "'/' separates groups in HDF5"
        elif "\x00" in key:
            why = "HDF5 names hold no NUL byte"
        elif key in ("", "."):
            why = "HDF5 reads it as the group itself"
        elif slot == "obs" and key == "_index":
            why = "anndata keeps the cell names there"
        else:
            continue
        suggestion = key_added.replace("/", "_").replace("\x00", "").strip(".")
        raise ValueError(
            f"key_added={key_added!r} would write {slot}[{key!r}], which an .h5ad file cannot hold ({why}): "
            f"choose another key, e.g. {suggestion if suggestion not in ('', '_index') else default!r}."
        )


def check_embedding_key(key_added: Any) -> None:
    """Refuse, before any compute, an embedding key that `write_embedding` could not store in an .h5ad."""
    check_storable(key_added, DEFAULT_KEY, obsm=[key_added], obs=[f"{key_added}_n_genes"])


def check_annotation_key(key_added: Any) -> None:
    """Refuse, before any compute, a label key that `write_annotation` could not store in an .h5ad."""
    check_storable(
        key_added,
        DEFAULT_LABEL_KEY,
        obsm=[f"{key_added}_probabilities"],
        obs=[key_added, f"{key_added}_probability", f"{key_added}_n_genes"],
    )


def write_embedding(
    adata: Any,
    key_added: str,
    embedding: np.ndarray,
    n_genes: np.ndarray,
    params: Mapping[str, Any] | None = None,
    *,
    normalize: bool = True,
) -> None:
    """Store cell embeddings: ``obsm[key_added]``, ``obs[key_added + "_n_genes"]`` and, given `params`,
    ``uns[key_added + "_params"]``.

    `embedding` holds one row per cell (NaN rows where ``n_genes == 0``); with `normalize` the other rows are
    L2-normalised in place first.
    """
    if normalize:
        normalize_rows(embedding, n_genes)
    adata.obsm[key_added] = embedding
    adata.obs[f"{key_added}_n_genes"] = n_genes
    if params is not None:
        adata.uns[f"{key_added}_params"] = dict(params)


def normalize_rows(embedding: np.ndarray, n_genes: np.ndarray) -> np.ndarray:
    """L2-normalise, in place, the rows of cells with a vocabulary gene (``n_genes > 0``); the others stay NaN."""
    done = np.asarray(n_genes) > 0
    embedding[done] /= np.linalg.norm(embedding[done], axis=1, keepdims=True)
    return embedding


def write_annotation(
    adata: Any,
    key_added: str,
    *,
    labels: Sequence[str],
    codes: np.ndarray,
    probability: np.ndarray,
    probabilities: np.ndarray,
    n_genes: np.ndarray,
    params: Mapping[str, Any],
) -> None:
    """Store predicted cell types: ``obs[key_added]`` (categorical over every one of `labels`; `codes` index
    them, -1 for a cell without a label), ``obs[key_added + "_probability"]`` (that label's probability),
    ``obs[key_added + "_n_genes"]``, ``obsm[key_added + "_probabilities"]`` (one column per label) and
    ``uns[key_added + "_params"]``."""
    import pandas as pd

    adata.obs[key_added] = pd.Categorical.from_codes(codes, categories=list(labels))
    adata.obs[f"{key_added}_probability"] = probability
    adata.obs[f"{key_added}_n_genes"] = n_genes
    adata.obsm[f"{key_added}_probabilities"] = probabilities
    adata.uns[f"{key_added}_params"] = dict(params)
