"""Training data for `transformers.Trainer`: tokenised cells from AnnData, a collator that pads and masks,
and a sampler that keeps each batch within one domain (batch) for domain-specific batch norm.

The perturbation dataset lives in `scgpt_hf.perturbation` (`PerturbationDataset`); it trains with the
same collator (`ScGPTDataCollator.from_config`).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from .anndata_input import select_matrix
from .cell_encoding import encode_cell
from .configuration_scgpt import ScGPTConfig
from .padding import pad_rows
from .tokenization_scgpt import ScGPTTokenizer, quiet_tokenizer_warnings

logger = logging.getLogger(__name__)

# Per-token inputs that `ScGPTTokenizer.pad` pads itself.
_TOKENIZER_INPUTS = ("input_ids", "values", "attention_mask")


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
        self.input_ids, self.values = self._encode(tokenizer, adata, seed, **tokenizer_kwargs)
        self.label2id = self.batch2id = None
        self._labels = self._batches = None
        for key in (label_key, batch_key):
            if key is not None and key not in adata.obs:
                raise ValueError(f"obs has no column {key!r}; available: {list(adata.obs.columns)}.")
        if label_key is not None:
            self._labels, self.label2id = _codes(adata.obs[label_key], label_key, label2id, "label")
        if batch_key is not None:
            self._batches, self.batch2id = _codes(adata.obs[batch_key], batch_key, batch2id, "batch")

    def _encode(
        self, tokenizer: ScGPTTokenizer, adata: Any, seed: int, **tokenizer_kwargs: Any
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each cell's unpadded (input_ids, values)."""
        encoded = tokenizer(adata, padding=False, seed=seed, **tokenizer_kwargs)
        return encoded["input_ids"], encoded["values"]

    @property
    def batch_labels(self) -> np.ndarray | None:
        """Each cell's batch id (None without `batch_key`); `DomainGroupedSampler` groups cells by it."""
        return self._batches

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[index], "values": self.values[index]}
        if self._labels is not None:
            item["labels"] = int(self._labels[index])
        if self._batches is not None:
            item["batch_labels"] = int(self._batches[index])
        return item


class MultiOmicCellDataset(CellDataset):
    """Tokenised multi-omic cells (RNA, ATAC peaks, proteins, ...) for `ScGPTForMultiOmicIntegration`.

    Features of every modality are columns of one AnnData and tokens of one vocabulary (the original
    prefixes protein names, e.g. "p_CD4", so they do not collide with genes); `var[modality_key]` names each
    feature's modality. As in the original multi-omic tutorial, values are binned per cell *within each
    modality* (RNA bins rank a cell's genes, protein bins its proteins), then the modalities are
    concatenated behind `<cls>` and, past `max_length`, a seeded subset of the joint tokens is kept. Items
    add `modality_ids` (ids of `config.modality_vocab`; `<cls>` gets the vocabulary's "<cls>" entry) to
    `CellDataset`'s; the collator pads them with `config.modality_pad_id` (`ScGPTDataCollator.from_config`).

    Args:
        tokenizer: its vocabulary must hold the features of every modality.
        adata: cells x features (raw counts or normalised values of each modality; zeros are left out).
        config: the model's config; its `modality_vocab` gives the ids.
        modality_key: var column naming each feature's modality.
        modality_vocab: the data pipeline's own modality vocabulary, if it has one; it must equal the
            model's (different ids would silently mean different modalities).
        **kwargs: `CellDataset`'s (label_key, batch_key, label2id, batch2id, seed) and layer, use_raw,
            gene_column, max_length (tokens per cell, `<cls>` included; default the tokenizer's).
    """

    def __init__(
        self,
        tokenizer: ScGPTTokenizer,
        adata: Any,
        config: ScGPTConfig,
        *,
        modality_key: str = "modality",
        modality_vocab: Mapping[str, int] | None = None,
        **kwargs: Any,
    ):
        known = config.checked_modality_vocab(modality_vocab)
        if "<cls>" not in known:
            raise ValueError(f"The model's modality vocabulary {known} has no '<cls>' entry for the <cls> token.")
        self.modality_key, self.modality_vocab = modality_key, dict(known)
        super().__init__(tokenizer, adata, **kwargs)

    def _encode(
        self,
        tokenizer: ScGPTTokenizer,
        adata: Any,
        seed: int,
        *,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        max_length: int | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        source = select_matrix(adata, layer, use_raw, gene_column)
        matrix, names, var = source.matrix, source.gene_names, source.var
        key, known = self.modality_key, self.modality_vocab
        if key not in var:
            raise ValueError(f"var has no column {key!r} naming each feature's modality; columns: {list(var.columns)}.")
        if var[key].isna().any():
            raise ValueError(f"{int(var[key].isna().sum())} features have no modality in var[{key!r}]; fill them.")
        modality = var[key].astype(str).to_numpy()
        unknown = sorted(set(modality) - set(known))
        if unknown:
            raise ValueError(
                f"var[{key!r}] has modalities {unknown} that are not in the model's modality vocabulary {known}; "
                "rename them to the model's names or drop those features."
            )
        gene_ids = tokenizer.match_genes(names).ids
        modality_of_id: dict[int, int] = {tokenizer.cls_token_id: known["<cls>"]}
        parts = []
        for name in sorted(set(modality), key=known.get):
            ids = np.where(modality == name, gene_ids, -1)
            if not (ids >= 0).any():
                raise ValueError(
                    f"No {name} feature of adata is in the tokenizer's vocabulary; add them to the vocabulary "
                    f"(e.g. {names[int(np.flatnonzero(modality == name)[0])]!r}) or drop the modality."
                )
            modality_of_id.update(dict.fromkeys(ids[ids >= 0].tolist(), known[name]))
            # Binned within the modality; joint truncation below. A cell may lack one modality (e.g. no
            # protein counts): only cells without any feature are reported, once, below.
            with quiet_tokenizer_warnings():
                parts.append(tokenizer.encode_with_ids(matrix, ids, truncation=False, padding=False, seed=seed))
        max_length = tokenizer.max_length if max_length is None else int(max_length)
        all_ids, all_values, self._modalities = [], [], []
        for cell in range(matrix.shape[0]):
            ids = np.concatenate([part["input_ids"][cell][1:] for part in parts])
            values = np.concatenate([part["values"][cell][1:] for part in parts])
            ids, values = encode_cell(
                ids, values, seed=seed, strategy=tokenizer.truncation_strategy, max_length=max_length,
                n_bins=tokenizer.n_bins, do_binning=False,
            )
            ids = np.concatenate(([tokenizer.cls_token_id], ids))
            all_ids.append(ids)
            all_values.append(np.concatenate((parts[0]["values"][cell][:1], values)))
            self._modalities.append(np.array([modality_of_id[i] for i in ids.tolist()], dtype=np.int64))
        n_empty = sum(len(ids) == 1 for ids in all_ids)
        if n_empty:
            logger.warning(
                "%d of %d cells have no feature of the vocabulary in any modality; each is just <cls>. Filter "
                "them out before training.", n_empty, len(all_ids),
            )
        return all_ids, all_values

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["modality_ids"] = self._modalities[index]
        return item


@dataclass
class ScGPTDataCollator:
    """Pads per-cell features (from `ScGPTTokenizer(..., padding=False)` or this package's datasets) into a
    batch of tensors.

    With `mask_ratio > 0` it also masks that fraction of each cell's gene values (never `<cls>` nor
    padding; at least one gene per cell with genes) to `mask_value` and returns the true values as
    `labels`: the masked-expression objective of pretraining and batch integration. A sequence of
    ratios draws one of them per batch (the original's generative pretraining cycles 0.25, 0.5, 0.75). With
    `generative=True` the chosen genes are also returned as `generative_mask`, so the model predicts them
    from the known genes only (generative pretraining; needs `config.use_generative_flag`).

    Besides `input_ids`, `values` and `attention_mask`, a feature may carry per-token inputs, named with
    their padding value in `token_pad_values` (`perturbation_flags`, `modality_ids`, and for perturbation
    the per-token `labels`), and per-cell scalars (cell-type `labels`, `batch_labels`), which pass through
    as tensors. `from_config` fills `token_pad_values` and `mask_value` for a model.

    With `max_length`, a cell with more tokens keeps a random subset of `max_length` of them (seeded, in
    their original order), always including `<cls>` and the perturbed genes (`perturbation_flags == 1`).
    The original perturbation fine-tuning trains on a random subset of genes when a cell has more than
    `max_seq_len`, but draws one subset per batch with no regard to the perturbed genes, so a perturbed
    gene can be left out and its perturbation becomes invisible to the model for that step; keeping them,
    and drawing per cell, is a deliberate difference.

    Args:
        tokenizer: pads with its pad id and pad value.
        mask_ratio: fraction of gene values to mask per cell, or several fractions to draw from per batch
            (the original uses 0.25/0.5/0.75 in pretraining and 0.4 in integration fine-tuning).
        mask_value: value put at masked positions (the model's `config.mask_value`).
        generative: mark the masked genes as genes to generate (`generative_mask`).
        seed: seeds the masking and subsampling generator, for reproducible runs.
        token_pad_values: per-token inputs other than input_ids/values/attention_mask -> their pad value.
        max_length: tokens kept per cell (None keeps all).
    """

    tokenizer: ScGPTTokenizer
    mask_ratio: float | Sequence[float] = 0.0
    mask_value: float = -1.0
    generative: bool = False
    seed: int | None = None
    token_pad_values: Mapping[str, float] = field(default_factory=dict)
    max_length: int | None = None

    @classmethod
    def from_config(cls, tokenizer: ScGPTTokenizer, config: ScGPTConfig, **kwargs: Any) -> ScGPTDataCollator:
        """A collator for a model: its `mask_value`, and pad values for the per-token inputs it takes
        (`perturbation_flags` and per-token `labels` for perturbation, `modality_ids` for multi-omic)."""
        pads: dict[str, float] = {}
        if config.use_perturbation_flags:
            pads.update(perturbation_flags=config.pert_pad_id, labels=config.pad_value)
        if config.use_modality_embeddings:
            if config.modality_pad_id is None:
                raise ValueError(
                    "config.modality_pad_id is not set, so modality_ids cannot be padded; give the modality "
                    "vocabulary a '<pad>' entry or set config.modality_pad_id."
                )
            pads["modality_ids"] = config.modality_pad_id
        kwargs.setdefault("mask_value", config.mask_value)
        return cls(tokenizer, token_pad_values={**pads, **kwargs.pop("token_pad_values", {})}, **kwargs)

    def __post_init__(self) -> None:
        ratios = [self.mask_ratio] if isinstance(self.mask_ratio, numbers.Real) else list(self.mask_ratio)
        if not ratios or not all(0.0 <= float(r) < 1.0 for r in ratios):
            raise ValueError(
                f"mask_ratio must be a fraction in [0, 1) or a non-empty list of them, got {self.mask_ratio}."
            )
        if len(ratios) > 1 and min(ratios) == 0:
            raise ValueError(f"A list of mask ratios cannot include 0 (batches without masked genes): {ratios}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1 token, got {self.max_length}.")
        self._ratios = [float(r) for r in ratios]
        self._masks = self._ratios[0] > 0
        if self.generative and not self._masks:
            raise ValueError("generative=True marks the masked genes for generation: set mask_ratio > 0.")
        if self._masks and "labels" in self.token_pad_values:
            raise ValueError(
                "Per-token 'labels' (e.g. perturbation targets) and masking both define the labels; use "
                "mask_ratio=0 for perturbation."
            )
        self._generator = torch.Generator()
        self._worker_seed: int | None = None
        if self.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(self.seed)

    def _rng(self) -> torch.Generator:
        """The masking/subsampling generator, reseeded once per DataLoader worker.

        Each worker holds a copy of the collator whose generator is in the same state, so without this every
        worker would mask its batches identically. The worker's seed (distinct per worker and per epoch,
        derived from the main process's torch seed) is combined with `seed`, so runs stay reproducible.
        """
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            # Hash the pair: a sum would give rank 0's worker 1 and rank 1's worker 0 (seed + rank) one stream.
            mixed = np.random.SeedSequence([self.seed or 0, info.seed]).generate_state(1, dtype=np.uint64)[0]
            self._generator.manual_seed(int(mixed) % 2**63)
        return self._generator

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self._masks and "labels" in features[0]:
            raise ValueError(
                "Features carry 'labels' but masking writes the true expression into 'labels'; use mask_ratio=0 "
                "for classification, or drop the labels for the masked-expression objective."
            )
        per_token = [k for k in (*_TOKENIZER_INPUTS, *self.token_pad_values) if k in features[0]]
        for f in features:
            for key in per_token:
                if len(f[key]) != len(f["input_ids"]):
                    raise ValueError(
                        f"Feature {key!r} has {len(f[key])} entries for a cell of {len(f['input_ids'])} tokens; "
                        "per-token inputs need one entry per token."
                    )
        if self.max_length is not None:
            features = [self._subsample(f, per_token) for f in features]
        batch = dict(
            self.tokenizer.pad(
                [{k: f[k] for k in _TOKENIZER_INPUTS if k in f} for f in features], padding="longest",
                return_tensors="pt",
            )
        )
        width = batch["input_ids"].shape[1]
        for key in per_token:
            if key not in _TOKENIZER_INPUTS:
                rows = [np.asarray(f[key]) for f in features]
                dtype = np.int64 if rows[0].dtype.kind in "iub" else np.float32
                batch[key] = torch.from_numpy(pad_rows(rows, self.token_pad_values[key], width, dtype))
        for key in [k for k in features[0] if k not in per_token]:
            column = [f[key] for f in features]
            if np.ndim(column[0]) != 0:
                raise ValueError(
                    f"Feature {key!r} holds a sequence, not one value per cell; if it is a per-token input, "
                    "name its padding value in token_pad_values (ScGPTDataCollator.from_config does so for the "
                    "model's inputs)."
                )
            array = np.asarray(column)
            # Ids as int64 whatever the source (e.g. int8 categorical codes): losses and embeddings need long.
            dtype = torch.long if array.dtype.kind in "biu" else torch.float32 if array.dtype.kind == "f" else None
            batch[key] = torch.as_tensor(array, dtype=dtype)
        if self._masks:
            batch["values"], batch["labels"], chosen = self._mask(batch)
            if self.generative:
                batch["generative_mask"] = chosen
        return batch

    def _subsample(self, feature: Mapping[str, Any], per_token: Sequence[str]) -> Mapping[str, Any]:
        """A random subset of `max_length` tokens (in order), always with `<cls>` and the perturbed genes."""
        ids = np.asarray(feature["input_ids"])
        if len(ids) <= self.max_length:
            return feature
        required = ids == self.tokenizer.cls_token_id
        if "perturbation_flags" in feature:
            required |= np.asarray(feature["perturbation_flags"]) == 1
        if required.sum() > self.max_length:
            raise ValueError(
                f"A cell has {int(required.sum())} tokens that must be kept (<cls> and perturbed genes), more than "
                f"max_length={self.max_length}; raise max_length."
            )
        optional = np.flatnonzero(~required)
        order = torch.randperm(len(optional), generator=self._rng()).numpy()
        keep = np.sort(np.concatenate([np.flatnonzero(required), optional[order[: self.max_length - required.sum()]]]))
        return {k: (np.asarray(v)[keep] if k in per_token else v) for k, v in feature.items()}

    def _mask(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (masked values, true values, the chosen positions)."""
        labels = batch["values"].clone()
        values = labels.clone()
        maskable = batch["attention_mask"].bool() & (batch["input_ids"] != self.tokenizer.cls_token_id)
        chosen = torch.zeros_like(maskable)
        ratio = self._ratios[0]
        if len(self._ratios) > 1:  # one draw per batch; a single ratio draws nothing, so its masks stay as they were
            ratio = self._ratios[int(torch.randint(len(self._ratios), (1,), generator=self._rng()))]
        for row in range(values.shape[0]):
            positions = maskable[row].nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            n_mask = max(1, int(positions.numel() * ratio))
            chosen[row, positions[torch.randperm(positions.numel(), generator=self._rng())[:n_mask]]] = True
        values[chosen] = self.mask_value
        return values, labels, chosen


class DomainGroupedSampler(torch.utils.data.Sampler[int]):
    """Yields cell indices so that every consecutive `batch_size` of them comes from one domain (batch).

    Domain-specific batch norm (`config.domain_spec_batchnorm == "dsbn"`) normalises a minibatch with one
    domain's statistics, and the original trains it on single-domain minibatches (its
    `per_seq_batch_sample`). Each epoch shuffles the cells within each domain, cuts them into groups of
    `batch_size`, and shuffles the groups, seeded by `seed` and the epoch (`set_epoch`, which `Trainer`
    calls). A domain's last, short group is filled up with other cells of the same domain drawn at random
    (or dropped with `drop_last`), so groups never straddle domains.

    Distributed: `num_replicas` processes each get every `num_replicas`-th group, the group count first
    padded to a multiple of it with repeated groups (like `DistributedSampler`); by default from
    `torch.distributed` when it is initialised. Under `transformers.Trainer` use `DomainGroupedTrainer`,
    which leaves that to accelerate: it hands whole batches to the processes, so the sampler must not
    split them again.

    Args:
        domains: each cell's domain (e.g. `CellDataset.batch_labels`).
        batch_size: cells per batch (per device).
        seed: shuffling seed, the same on every process.
        drop_last: drop each domain's short last group instead of filling it.
        num_replicas, rank: processes sharing the data and this one's index.
    """

    def __init__(
        self,
        domains: Sequence[Any] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (
            torch.distributed.get_world_size() if distributed else 1
        )
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must lie in [0, {self.num_replicas}), got {self.rank}.")
        import pandas as pd

        missing = pd.isna(pd.Series(np.asarray(domains, dtype=object)))
        if missing.any():
            raise ValueError(
                f"{int(missing.sum())} cells have no domain (NaN/None); every cell needs one, or it would never be "
                "sampled: drop those cells or give them a domain."
            )
        codes, names = pd.factorize(pd.Series(np.asarray(domains, dtype=object)), sort=True)
        self._members = [np.flatnonzero(codes == d) for d in range(len(names))]
        self.batch_size, self.seed, self.drop_last, self.epoch = int(batch_size), int(seed), drop_last, 0
        if drop_last:
            short = {str(name): len(m) for name, m in zip(names, self._members) if len(m) < self.batch_size}
            if short:
                logger.warning(
                    "drop_last=True: %d domains have fewer than batch_size=%d cells and are never sampled: %s.",
                    len(short), self.batch_size, short,
                )
        n_groups = sum(
            len(m) // self.batch_size if drop_last else math.ceil(len(m) / self.batch_size) for m in self._members
        )
        if n_groups == 0:
            raise ValueError(
                f"No domain has {self.batch_size} cells, so drop_last=True leaves nothing; lower batch_size."
            )
        self._groups_per_replica = math.ceil(n_groups / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch (the same order on every process)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._groups_per_replica * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = []
        for members in self._members:
            members = rng.permutation(members)
            short = len(members) % self.batch_size
            if short and self.drop_last:
                members = members[:-short]
            elif short:
                members = np.concatenate([members, rng.choice(members, self.batch_size - short)])
            groups.extend(members.reshape(-1, self.batch_size))
        groups = [groups[i] for i in rng.permutation(len(groups))]
        total = self._groups_per_replica * self.num_replicas
        groups += groups[: total - len(groups)]
        for group in groups[self.rank :: self.num_replicas]:
            yield from group.tolist()


def _domains_of(dataset: Any) -> np.ndarray:
    domains = getattr(dataset, "batch_labels", None)
    if domains is None:
        if "batch_labels" not in dataset[0]:
            raise ValueError(
                "DomainGroupedTrainer groups cells by batch_labels, but the training dataset has none; build it "
                "with batch_key=... (CellDataset, MultiOmicCellDataset)."
            )
        domains = [dataset[i]["batch_labels"] for i in range(len(dataset))]
    return np.asarray(domains)


class DomainGroupedTrainer(Trainer):
    """`transformers.Trainer` whose training batches each hold cells of one domain (`DomainGroupedSampler`),
    for models with domain-specific batch norm. Use it like `Trainer`; the training dataset must give
    `batch_labels` (e.g. `CellDataset(..., batch_key="batch")`). Shuffling follows `args.data_seed` (else
    `args.seed`) and the epoch; on several processes accelerate deals whole batches out, so each process's
    batches stay single-domain."""

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return DomainGroupedSampler(
            _domains_of(dataset), self.args.train_batch_size, seed=seed, drop_last=self.args.dataloader_drop_last,
            num_replicas=1, rank=0,
        )
