"""Perturbation prediction over AnnData: ``PerturbationDataset`` to fine-tune, ``predict_perturbation`` to predict.

Given control cells and the genes to perturb, a fine-tuned ``ScGPTForPerturbationPrediction`` predicts each
cell's expression after the perturbation. As in the original (``TransformerGenerator.pred_perturb`` with
``include_zero_gene="all"``), every gene of the dataset is a token, expressed or not, in the dataset's gene
order and without ``<cls>``; values are the cells' expression as given (the original fine-tunes on
log1p-normalised values, not bins); the perturbed genes carry flag 1, all others flag 0. Training and
prediction build these inputs with the same code (``_GeneTokens``, ``_expression_rows``).

Subset the AnnData to the genes the model was fine-tuned on (the original works on the ~5,000 genes of
its GEARS datasets): attention cost grows with the square of the number of genes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .anndata_input import row_blocks, select_matrix
from .inference import eval_mode
from .modeling_scgpt import ScGPTForPerturbationPrediction
from .tokenization_scgpt import ScGPTTokenizer

logger = logging.getLogger(__name__)

__all__ = ["PerturbationDataset", "predict_perturbation"]

_UNKNOWN_GENES = ("drop", "pad")
# Rows densified (over the token genes) at a time when a dataset reads the whole matrix.
_ROWS_PER_READ = 1024


def _parse_perturbed(perturbed_genes: str | Sequence[str], control_label: str = "ctrl") -> list[str]:
    """A gene, a GEARS condition ("KLF1+ctrl", "A+B") or a list of genes -> list of gene names."""
    if isinstance(perturbed_genes, str):
        names = [g.strip() for g in perturbed_genes.split("+")]
    else:
        names = [str(g) for g in perturbed_genes]
    return list(dict.fromkeys(g for g in names if g and g != control_label))


def _vocabulary(model: ScGPTForPerturbationPrediction, tokenizer: Any) -> dict[str, int]:
    """The model's gene vocabulary: from `tokenizer`, else the tokenizer saved with the model; sized like its
    gene embedding."""
    if tokenizer is None:
        source = getattr(model, "name_or_path", "") or ""
        if not source or not os.path.isdir(source):
            raise ValueError(
                "predict_perturbation needs the gene vocabulary: pass tokenizer= (an ScGPTTokenizer or a "
                "gene -> id mapping), or load the model from a folder that holds its tokenizer."
            )
        tokenizer = ScGPTTokenizer.from_pretrained(source)
    vocab = _as_vocab(tokenizer)
    if len(vocab) != model.config.vocab_size:
        raise ValueError(
            f"The vocabulary has {len(vocab)} tokens but the model's gene embedding has {model.config.vocab_size} "
            "rows: pass the tokenizer the model was trained with."
        )
    return vocab


def _as_vocab(tokenizer: Any) -> dict[str, int]:
    """Gene -> id of an ScGPTTokenizer or of a mapping given directly."""
    if isinstance(tokenizer, ScGPTTokenizer):
        return tokenizer.get_vocab()
    if isinstance(tokenizer, Mapping):
        return dict(tokenizer)
    raise TypeError(f"tokenizer must be an ScGPTTokenizer or a gene -> id mapping, got {type(tokenizer).__name__}.")


@dataclass(frozen=True)
class _GeneTokens:
    """adata's genes as perturbation-model tokens: the columns used (first occurrence of each name; genes
    outside the vocabulary dropped or fed as ``<pad>``), their vocabulary ids, and perturbation flags."""

    vocab: Mapping[str, int]
    columns: np.ndarray
    input_ids: np.ndarray
    position: Mapping[str, int]  # gene name -> token position

    @classmethod
    def build(cls, genes: Sequence[str], vocab: Mapping[str, int], unknown_genes: str) -> _GeneTokens:
        if unknown_genes not in _UNKNOWN_GENES:
            raise ValueError(f"unknown_genes must be one of {_UNKNOWN_GENES}, got {unknown_genes!r}.")
        first: dict[str, int] = {}
        for j, g in enumerate(genes):
            first.setdefault(g, j)
        in_vocab = np.array([g in vocab for g in genes], dtype=bool)
        keep = np.zeros(len(genes), dtype=bool)
        keep[list(first.values())] = True
        unknown = keep & ~in_vocab
        if unknown_genes == "drop":
            keep &= in_vocab
        columns = np.flatnonzero(keep)
        if not len(columns):
            raise ValueError("None of adata's genes is in the model's vocabulary; nothing to predict.")
        if unknown.any() and unknown_genes == "drop":
            logger.warning(
                "%d of %d genes are not in the vocabulary and are left out, e.g. %s.",
                int(unknown.sum()), len(genes), [genes[j] for j in np.flatnonzero(unknown)[:5]],
            )
        ids = np.array([vocab.get(genes[j], vocab["<pad>"]) for j in columns], dtype=np.int64)
        return cls(vocab, columns, ids, {genes[j]: k for k, j in enumerate(columns)})

    def check(self, genes_of: Mapping[str, Sequence[str]], condition_key: str | None = None) -> None:
        """Raise if a perturbed gene cannot carry a flag; ``genes_of`` maps each condition to its genes."""
        problems = (
            (lambda g: g not in self.vocab,
             f"not in the model's gene vocabulary ({len(self.vocab)} tokens), so the model has never seen them",
             "check the symbols (e.g. case, aliases) or pick genes it knows"),
            (lambda g: g not in self.position,
             "not among adata's genes; the perturbation flag sits on the gene's token",
             "add these genes to the AnnData (zero expression is fine)"),
        )
        for missing_from, what, fix in problems:
            missing = list(dict.fromkeys(g for genes in genes_of.values() for g in genes if missing_from(g)))
            if missing:
                if condition_key is not None:
                    conditions = [c for c, genes in genes_of.items() if set(genes) & set(missing)]
                    fix += (
                        f", or drop the cells of condition(s) {conditions}: "
                        f"adata[~adata.obs[{condition_key!r}].isin({conditions!r})]"
                    )
                raise ValueError(f"Perturbed gene(s) {missing} are {what}; {fix}.")

    def flags(self, perturbed: Sequence[str]) -> np.ndarray:
        """1 at the perturbed genes' tokens, 0 elsewhere (genes checked with ``check``)."""
        flags = np.zeros(len(self.columns), dtype=np.int64)
        flags[[self.position[g] for g in perturbed]] = 1
        return flags


def _expression_rows(matrix: Any, columns: np.ndarray, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, dense float32 block of ``step`` rows x ``columns``), validated; read in bounded blocks
    (`row_blocks`), never the whole matrix densified. Warns once if the values look like raw counts."""
    warned = False
    for first, rows in row_blocks(matrix):
        rows = rows[:, columns]  # the model's genes first, so only they are ever densified
        for offset in range(0, rows.shape[0], step):
            start = first + offset
            block = np.asarray(rows[offset : offset + step].toarray(), dtype=np.float32)
            stop = start + len(block) - 1
            if not np.isfinite(block).all():
                raise ValueError(
                    f"adata's expression has NaN or infinite values in cells {start}..{stop}; fix or drop them."
                )
            if block.size and block.min() < 0:
                raise ValueError(
                    f"adata's expression has negative values (min {block.min():.3g}) in cells {start}..{stop}: "
                    "scaled data? The model takes non-negative log1p-normalised expression (normalize_total, then "
                    "log1p)."
                )
            if not warned and block.size and block.max() > 30 and np.all(block == np.round(block)):
                logger.warning(
                    "The expression looks like raw counts; the original perturbation model is fine-tuned on "
                    "log1p-normalised values (scanpy: normalize_total then log1p)."
                )
                warned = True
            yield start, block


class PerturbationDataset(torch.utils.data.Dataset):
    """Perturb-seq cells paired with control cells, for fine-tuning ``ScGPTForPerturbationPrediction`` with
    ``transformers.Trainer`` and ``ScGPTDataCollator.from_config(tokenizer, model.config)``.

    As GEARS (and so the original scGPT tutorial) pairs them, each perturbed cell gets one control cell drawn
    at random (seeded, with replacement) once; the control's expression is the input ``values``, the
    perturbed cell's the ``labels``, and ``perturbation_flags`` mark the condition's genes. Control cells
    are included as themselves (input = target, no flag), as GEARS does, unless ``include_controls=False``.
    Items: ``input_ids`` (the tokens of ``predict_perturbation``: adata's vocabulary genes in dataset order,
    no ``<cls>``), ``values``, ``perturbation_flags``, ``labels``. ``conditions`` and ``pairs`` (control
    row, perturbed row) say where each item came from.

    Args:
        adata: cells of the screen with log1p-normalised expression in ``X`` (or ``layers[layer]``); may be
            sparse (kept sparse, read row by row).
        tokenizer: the model's tokenizer (or a gene -> id mapping).
        condition_key: obs column with GEARS-style conditions ("ctrl", "KLF1+ctrl", "CBL+CNN1").
        control_label: the condition of control cells, also the placeholder in "KLF1+ctrl".
        layer, gene_column, unknown_genes: as in ``predict_perturbation``.
        include_controls: also train on control cells as identity pairs.
        seed: seeds the pairing.
    """

    def __init__(
        self,
        adata: AnnData,
        tokenizer: ScGPTTokenizer | Mapping[str, int],
        *,
        condition_key: str = "condition",
        control_label: str = "ctrl",
        layer: str | None = None,
        gene_column: str | None = None,
        unknown_genes: str = "drop",
        include_controls: bool = True,
        seed: int = 0,
    ):
        vocab = _as_vocab(tokenizer)
        if condition_key not in adata.obs:
            raise ValueError(f"obs has no column {condition_key!r}; available: {list(adata.obs.columns)}.")
        conditions = pd.Series(adata.obs[condition_key])
        if conditions.isna().any():
            raise ValueError(
                f"{int(conditions.isna().sum())} cells have no condition in obs[{condition_key!r}]; drop them "
                f"(adata[adata.obs[{condition_key!r}].notna()]) or fill them before training."
            )
        conditions = conditions.astype(str).to_numpy()
        is_control = conditions == control_label
        if not is_control.any():
            raise ValueError(
                f"No control cells: no cell has condition {control_label!r} in obs[{condition_key!r}] (found e.g. "
                f"{sorted(set(conditions))[:5]}); pass control_label= naming the control condition."
            )
        source = select_matrix(adata, layer, gene_column=gene_column)
        self.tokens = _GeneTokens.build(source.gene_names, vocab, unknown_genes)
        genes_of = {c: _parse_perturbed(c, control_label) for c in dict.fromkeys(conditions)}
        self.tokens.check(genes_of, condition_key)
        self._flags = {c: self.tokens.flags(g) for c, g in genes_of.items()}

        controls = np.flatnonzero(is_control)
        perturbed = np.flatnonzero(~is_control)
        drawn = controls[np.random.default_rng(seed).integers(len(controls), size=len(perturbed))]
        pairs = [np.stack([drawn, perturbed], 1)]
        if include_controls:
            pairs.insert(0, np.stack([controls, controls], 1))
        self.pairs = np.concatenate(pairs)
        self.conditions = conditions[self.pairs[:, 1]]
        self._expression = sp.vstack(
            [sp.csr_matrix(b) for _, b in _expression_rows(source.matrix, self.tokens.columns, _ROWS_PER_READ)],
            format="csr",
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        control, perturbed = self.pairs[index]
        return {
            "input_ids": self.tokens.input_ids,
            "values": self._expression[control].toarray().ravel(),
            "perturbation_flags": self._flags[self.conditions[index]],
            "labels": self._expression[perturbed].toarray().ravel(),
        }


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
    control_label: str = "ctrl",
) -> np.ndarray:
    """Predict post-perturbation expression for the cells of ``adata``.

    Args:
        adata: control (unperturbed) cells; expression in ``X`` or ``layers[layer]``, on the scale the model
            was fine-tuned on (log1p-normalised in the original).
        model: a fine-tuned ``ScGPTForPerturbationPrediction``.
        perturbed_genes: the genes to perturb together: a list of names, one name, or a GEARS condition
            such as ``"KLF1+ctrl"`` or ``"CBL+CNN1"`` (`control_label` is ignored). An empty list predicts
            the unperturbed state.
        tokenizer: the model's ``ScGPTTokenizer`` or a gene -> id mapping; by default the tokenizer saved
            with the model (``model.name_or_path``).
        layer: read expression from ``adata.layers[layer]`` instead of ``X``.
        gene_column: ``adata.var`` column holding gene symbols (default: ``var_names``).
        batch_size: cells per forward pass.
        unknown_genes: genes of ``adata`` missing from the vocabulary are left out of the input and get NaN
            predictions ("drop", default), or are fed as ``<pad>`` tokens like the original does ("pad").
        control_label: the control placeholder in conditions (as in `PerturbationDataset`), so a
            training condition can be passed as it is.

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
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    vocab = _vocabulary(model, tokenizer)
    source = select_matrix(adata, layer, gene_column=gene_column)
    tokens = _GeneTokens.build(source.gene_names, vocab, unknown_genes)
    perturbed = _parse_perturbed(perturbed_genes, control_label)
    tokens.check({str(perturbed_genes): perturbed})

    ids = torch.from_numpy(tokens.input_ids).to(model.device)
    flags = torch.from_numpy(tokens.flags(perturbed)).to(model.device)

    result = np.full((adata.n_obs, len(source.gene_names)), np.nan, dtype=np.float32)
    with eval_mode(model):
        for start, values in _expression_rows(source.matrix, tokens.columns, batch_size):
            result[start : start + len(values), tokens.columns] = _predict(model, ids, flags, values)
    return result


def _predict(
    model: ScGPTForPerturbationPrediction, ids: torch.Tensor, flags: torch.Tensor, values: np.ndarray
) -> np.ndarray:
    """The predicted expression (float32) of a batch of cells: one row of token `ids` and perturbation `flags`
    (on the model's device) for every cell, and the cells' `values`."""
    n = len(values)
    with torch.no_grad():
        out = model(
            ids.expand(n, -1),
            torch.from_numpy(values).to(model.device),
            attention_mask=torch.ones(n, len(ids), dtype=torch.long, device=model.device),
            perturbation_flags=flags.expand(n, -1),
            return_dict=True,
        )
    return out.expression.float().cpu().numpy()
