"""Training data for `transformers.Trainer`: tokenised cells from AnnData, and a collator that pads and masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .tokenization_scgpt import ScGPTTokenizer


def _codes(column: Any, key: str, mapping: Mapping[str, int] | None, what: str) -> tuple[np.ndarray, dict[str, int]]:
    """Map an obs column to integer ids, with clear errors for missing or unknown entries."""
    import pandas as pd

    series = pd.Series(column)
    missing = int(series.isna().sum())
    if missing:
        raise ValueError(
            f"{missing} cells have no {what} in obs[{key!r}]; drop them (adata[adata.obs[{key!r}].notna()]) "
            "or fill them before training."
        )
    names = series.astype(str)
    if mapping is None:
        mapping = {name: i for i, name in enumerate(sorted(names.unique()))}
    unknown = sorted(set(names) - set(mapping))
    if unknown:
        raise ValueError(
            f"obs[{key!r}] has {what}s the model was not trained on: {unknown[:5]}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + f"; the model knows {sorted(mapping)[:10]}. Drop those cells or fine-tune a model that includes them."
        )
    return names.map(mapping).to_numpy(dtype=np.int64), dict(mapping)


class CellDataset(torch.utils.data.Dataset):
    """Tokenised cells of an AnnData, one dict per cell, for `Trainer` with `ScGPTDataCollator`.

    Args:
        tokenizer: tokenises the cells (unpadded; the collator pads each batch to its longest cell).
        adata: the cells; `tokenizer_kwargs` choose the matrix and gene names (layer, use_raw, gene_column).
        label_key: obs column of cell types; becomes `labels` (ids by `label2id`, or sorted names).
        batch_key: obs column of batches; becomes `batch_labels` (ids by `batch2id`, or sorted names).
        label2id, batch2id: fixed mappings (e.g. a fine-tuned model's `config.label2id`); a value
            outside them is an error naming it.
        seed: tokenisation seed (binning ties, truncation).
    """

    def __init__(
        self,
        tokenizer: ScGPTTokenizer,
        adata: Any,
        *,
        label_key: str | None = None,
        batch_key: str | None = None,
        label2id: Mapping[str, int] | None = None,
        batch2id: Mapping[str, int] | None = None,
        seed: int = 0,
        **tokenizer_kwargs: Any,
    ):
        encoded = tokenizer(adata, padding=False, seed=seed, **tokenizer_kwargs)
        self.input_ids, self.values = encoded["input_ids"], encoded["values"]
        self.label2id = self.batch2id = None
        self._labels = self._batches = None
        for key in (label_key, batch_key):
            if key is not None and key not in adata.obs:
                raise ValueError(f"obs has no column {key!r}; available: {list(adata.obs.columns)}.")
        if label_key is not None:
            self._labels, self.label2id = _codes(adata.obs[label_key], label_key, label2id, "label")
        if batch_key is not None:
            self._batches, self.batch2id = _codes(adata.obs[batch_key], batch_key, batch2id, "batch")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[index], "values": self.values[index]}
        if self._labels is not None:
            item["labels"] = int(self._labels[index])
        if self._batches is not None:
            item["batch_labels"] = int(self._batches[index])
        return item


@dataclass
class ScGPTDataCollator:
    """Pads per-cell features (from `ScGPTTokenizer(..., padding=False)`) into a batch of tensors.

    With `mask_ratio > 0` it also masks that fraction of each cell's gene values (never `<cls>` nor
    padding; at least one gene per cell with genes) to `mask_value` and returns the true values as
    `labels`: the masked-expression objective of pretraining and batch integration. A sequence of
    ratios draws one of them per batch (the original's generative pretraining cycles 0.25, 0.5, 0.75). With
    `generative=True` the chosen genes are also returned as `generative_mask`, so the model predicts them
    from the known genes only (generative pretraining; needs `config.use_generative_flag`). Otherwise
    per-cell `labels` (cell-type ids) and `batch_labels` in the features pass through as tensors.

    Args:
        tokenizer: pads with its pad id and pad value.
        mask_ratio: fraction of gene values to mask per cell, or several fractions to draw from per batch
            (the original uses 0.25/0.5/0.75 in pretraining and 0.4 in integration fine-tuning).
        mask_value: value put at masked positions (the model's `config.mask_value`).
        generative: mark the masked genes as genes to generate (`generative_mask`).
        seed: seeds the masking generator, for reproducible runs.
    """

    tokenizer: ScGPTTokenizer
    mask_ratio: float | Sequence[float] = 0.0
    mask_value: float = -1.0
    generative: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        ratios = [self.mask_ratio] if isinstance(self.mask_ratio, (int, float)) else list(self.mask_ratio)
        if not ratios or not all(0.0 <= float(r) < 1.0 for r in ratios):
            raise ValueError(
                f"mask_ratio must be a fraction in [0, 1) or a non-empty list of them, got {self.mask_ratio}."
            )
        if len(ratios) > 1 and min(ratios) == 0:
            raise ValueError(f"A list of mask ratios cannot include 0 (batches without masked genes): {ratios}.")
        self._ratios = [float(r) for r in ratios]
        self._masks = self._ratios[0] > 0
        if self.generative and not self._masks:
            raise ValueError("generative=True marks the masked genes for generation: set mask_ratio > 0.")
        self._generator = torch.Generator()
        if self.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(self.seed)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self._masks and "labels" in features[0]:
            raise ValueError(
                "Features carry 'labels' but masking writes the true expression into 'labels'; use mask_ratio=0 "
                "for classification, or drop the labels for the masked-expression objective."
            )
        per_cell = {k: [f[k] for f in features] for k in ("labels", "batch_labels") if k in features[0]}
        tokens = [{k: v for k, v in f.items() if k not in per_cell} for f in features]
        batch = dict(self.tokenizer.pad(tokens, padding="longest", return_tensors="pt"))
        for key, column in per_cell.items():
            batch[key] = torch.as_tensor(column, dtype=torch.long)
        if self._masks:
            batch["values"], batch["labels"], chosen = self._mask(batch)
            if self.generative:
                batch["generative_mask"] = chosen
        return batch

    def _mask(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (masked values, true values, the chosen positions)."""
        labels = batch["values"].clone()
        values = labels.clone()
        maskable = batch["attention_mask"].bool() & (batch["input_ids"] != self.tokenizer.cls_token_id)
        chosen = torch.zeros_like(maskable)
        ratio = self._ratios[int(torch.randint(len(self._ratios), (1,), generator=self._generator))]
        for row in range(values.shape[0]):
            positions = maskable[row].nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            n_mask = max(1, int(positions.numel() * ratio))
            chosen[row, positions[torch.randperm(positions.numel(), generator=self._generator)[:n_mask]]] = True
        values[chosen] = self.mask_value
        return values, labels, chosen
