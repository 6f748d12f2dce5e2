"""Perturbation prediction over AnnData: ``predict_perturbation``.

Given control cells and the genes to perturb, a fine-tuned ``ScGPTForPerturbationPrediction`` predicts each
cell's expression after the perturbation. As in the original (``TransformerGenerator.pred_perturb`` with
``include_zero_gene="all"``), every gene of the dataset is a token, expressed or not, in the dataset's gene
order and without ``<cls>``; values are the cells' expression as given (the original fine-tunes on
log1p-normalised values, not bins); the perturbed genes carry flag 1, all others flag 0.

Subset the AnnData to the genes the model was fine-tuned on (the original works on the ~5,000 genes of
its GEARS datasets): attention cost grows with the square of the number of genes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from .modeling_scgpt import ScGPTForPerturbationPrediction
from .tokenization_scgpt import ScGPTTokenizer

logger = logging.getLogger(__name__)

__all__ = ["predict_perturbation"]

_UNKNOWN_GENES = ("drop", "pad")


def _parse_perturbed(perturbed_genes: str | Sequence[str]) -> list[str]:
    """A gene, a GEARS condition ("KLF1+ctrl", "A+B") or a list of genes -> list of gene names."""
    if isinstance(perturbed_genes, str):
        names = [g.strip() for g in perturbed_genes.split("+")]
    else:
        names = [str(g) for g in perturbed_genes]
    return list(dict.fromkeys(g for g in names if g and g != "ctrl"))


def _vocabulary(model: ScGPTForPerturbationPrediction, tokenizer: Any) -> dict[str, int]:
    if tokenizer is None:
        source = getattr(model, "name_or_path", "") or ""
        if not source or not os.path.isdir(source):
            raise ValueError(
                "predict_perturbation needs the gene vocabulary: pass tokenizer= (an ScGPTTokenizer or a "
                "gene -> id mapping), or load the model from a folder that holds its tokenizer."
            )
        tokenizer = ScGPTTokenizer.from_pretrained(source)
    if isinstance(tokenizer, ScGPTTokenizer):
        return tokenizer.get_vocab()
    if isinstance(tokenizer, Mapping):
        return dict(tokenizer)
    raise TypeError(f"tokenizer must be an ScGPTTokenizer or a gene -> id mapping, got {type(tokenizer).__name__}.")


def predict_perturbation(
    adata: AnnData,
    model: ScGPTForPerturbationPrediction,
    perturbed_genes: str | Sequence[str],
    tokenizer: ScGPTTokenizer | Mapping[str, int] | None = None,
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    batch_size: int = 16,
    unknown_genes: str = "drop",
) -> np.ndarray:
    """Predict post-perturbation expression for the cells of ``adata``.

    Args:
        adata: control (unperturbed) cells; expression in ``X`` or ``layers[layer]``, on the scale the model
            was fine-tuned on (log1p-normalised in the original).
        model: a fine-tuned ``ScGPTForPerturbationPrediction``.
        perturbed_genes: the genes to perturb together: a list of names, one name, or a GEARS condition
            such as ``"KLF1+ctrl"`` or ``"CBL+CNN1"`` ("ctrl" is ignored). An empty list predicts the
            unperturbed state.
        tokenizer: the model's ``ScGPTTokenizer`` or a gene -> id mapping; by default the tokenizer saved
            with the model (``model.name_or_path``).
        layer: read expression from ``adata.layers[layer]`` instead of ``X``.
        gene_column: ``adata.var`` column holding gene symbols (default: ``var_names``).
        batch_size: cells per forward pass.
        unknown_genes: genes of ``adata`` missing from the vocabulary are left out of the input and get NaN
            predictions ("drop", default), or are fed as ``<pad>`` tokens like the original does ("pad").

    Runs on the model's device, in eval mode (the model's mode is restored afterwards).

    Returns:
        (n_obs, n_vars) float32 array of predicted expression, columns in ``adata``'s gene order.

    Raises:
        ValueError: a perturbed gene is not in the vocabulary or not among ``adata``'s genes (the error
            names them), or the inputs are malformed.
    """
    if not isinstance(model, ScGPTForPerturbationPrediction):
        raise TypeError(
            f"model must be an ScGPTForPerturbationPrediction, got {type(model).__name__}; load a fine-tuned "
            "perturbation model with ScGPTForPerturbationPrediction.from_pretrained(...)."
        )
    if unknown_genes not in _UNKNOWN_GENES:
        raise ValueError(f"unknown_genes must be one of {_UNKNOWN_GENES}, got {unknown_genes!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    vocab = _vocabulary(model, tokenizer)
    pad_token = "<pad>"
    if len(vocab) != model.config.vocab_size:
        raise ValueError(
            f"The vocabulary has {len(vocab)} tokens but the model's gene embedding has {model.config.vocab_size} "
            "rows: pass the tokenizer the model was trained with."
        )

    if gene_column is not None:
        if gene_column not in adata.var:
            raise ValueError(f"adata.var has no column {gene_column!r}; columns: {list(adata.var.columns)}.")
        genes = [str(g) for g in adata.var[gene_column]]
    else:
        genes = [str(g) for g in adata.var_names]
    position = {}
    for j, g in enumerate(genes):
        position.setdefault(g, j)

    perturbed = _parse_perturbed(perturbed_genes)
    not_in_vocab = [g for g in perturbed if g not in vocab]
    if not_in_vocab:
        raise ValueError(
            f"Perturbed gene(s) {not_in_vocab} are not in the model's gene vocabulary ({len(vocab)} tokens), so "
            "the model has never seen them; check the symbols (e.g. case, aliases) or pick genes it knows."
        )
    not_in_data = [g for g in perturbed if g not in position]
    if not_in_data:
        raise ValueError(
            f"Perturbed gene(s) {not_in_data} are not among adata's genes; the perturbation flag sits on the "
            "gene's token, so add these genes to the AnnData (zero expression is fine)."
        )

    in_vocab = np.array([g in vocab for g in genes])
    first = np.zeros(len(genes), dtype=bool)
    first[sorted(position.values())] = True
    keep = first & (in_vocab | (unknown_genes == "pad"))
    columns = np.flatnonzero(keep)
    if not len(columns):
        raise ValueError("None of adata's genes is in the model's vocabulary; nothing to predict.")
    n_unknown = int((~in_vocab & first).sum())
    if n_unknown and unknown_genes == "drop":
        logger.warning(
            "%d of %d genes are not in the vocabulary and are left out (NaN in the result), e.g. %s.",
            n_unknown, len(genes), [g for g, v in zip(genes, in_vocab) if not v][:5],
        )
    ids = torch.tensor([vocab.get(genes[j], vocab[pad_token]) for j in columns], dtype=torch.long)
    flags = torch.zeros(len(columns), dtype=torch.long)
    column_of = {genes[j]: k for k, j in enumerate(columns)}
    for g in perturbed:
        flags[column_of[g]] = 1

    matrix = adata.layers[layer] if layer is not None else adata.X
    if matrix is None:
        raise ValueError("adata has no expression matrix (X is None); pass layer=... .")
    device = model.device
    was_training = model.training
    model.eval()
    result = np.full((adata.n_obs, len(genes)), np.nan, dtype=np.float32)
    warned = False
    try:
        for start in range(0, adata.n_obs, batch_size):
            stop = min(start + batch_size, adata.n_obs)
            block = matrix[start:stop]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            block = np.asarray(block[:, columns], dtype=np.float32)
            if not np.isfinite(block).all():
                raise ValueError(f"adata's expression has NaN or infinite values in cells {start}..{stop - 1}.")
            if not warned and block.size and block.max() > 30 and np.all(block == np.round(block)):
                logger.warning(
                    "The expression looks like raw counts; the original perturbation model is fine-tuned on "
                    "log1p-normalised values (scanpy: normalize_total then log1p)."
                )
                warned = True
            n = stop - start
            with torch.no_grad():
                out = model(
                    ids.unsqueeze(0).expand(n, -1).to(device),
                    torch.from_numpy(block).to(device),
                    attention_mask=torch.ones(n, len(columns), dtype=torch.long, device=device),
                    perturbation_flags=flags.unsqueeze(0).expand(n, -1).to(device),
                    return_dict=True,
                )
            result[start:stop, columns] = out.expression.float().cpu().numpy()
    finally:
        model.train(was_training)
    return result
