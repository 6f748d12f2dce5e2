"""Pretraining scGPT from scratch on many .h5ad files, streamed from disk (`scgpt-hf pretrain`).

Pieces:

* :func:`build_vocab` makes a vocabulary from the genes of the files (for users without one), and
  :func:`make_tokenizer` turns it into an :class:`~scgpt_hf.ScGPTTokenizer`;
* :class:`StreamingCellDataset` streams tokenised cells from backed h5ad files, chunk by chunk;
* :func:`pretrain` trains :class:`~scgpt_hf.ScGPTForPreTraining` (masked expression or generative, + MVC)
  on it with ``transformers.Trainer`` and saves model, tokenizer and ``training_metrics.json`` in one folder.

Why an ``IterableDataset``: a map-style dataset needs random access to any cell, i.e. one row read per cell
from a backed file (slow on HDF5, and CSR rows scattered across the file) or an index of the whole corpus
held in memory. Streaming contiguous chunks keeps reads sequential and memory bounded by ``chunk_size``
rows plus a ``shuffle_buffer`` of tokenised cells, whatever the corpus size. Randomness comes from
shuffling the order of the (file, chunk) units every epoch and a seeded shuffle buffer.

Multi-GPU / multi-process. The dataset shards itself: the (file, chunk) units of an epoch are dealt out
round-robin over ``num_processes x num_workers`` shards (process rank and world size from
``torch.distributed`` when initialised, else the ``RANK``/``WORLD_SIZE`` variables that ``torchrun`` and
``accelerate launch`` set; DataLoader workers from ``torch.utils.data.get_worker_info``), so every process
reads and tokenises only its share of the files. ``Trainer`` would otherwise (a) with its default
``dispatch_batches`` for iterable datasets read everything on rank 0 and concatenate per-rank batches,
which breaks with per-batch padding, or (b) with ``dispatch_batches=False`` wrap the dataset in accelerate's
``IterableDatasetShard``, which keeps every ``num_processes``-th batch of an already sharded stream and so
would drop data. :func:`pretrain` therefore sets ``dispatch_batches=False``, makes that wrapper a
pass-through (as ``Trainer`` itself does for its rank-aware batch samplers) and gives the dataset the
Trainer's own rank and world size. On a machine without CUDA it also sets ``use_cpu`` and the ``gloo``
backend: without them accelerate sets up no distributed training under ``torchrun`` and every process would
train a model of its own on its share and write the output folder. With ``epochs=None`` (what
:func:`pretrain` uses) the stream repeats forever, reshuffled each pass, so ranks never run out at
different times; training length is ``max_steps`` (or ``num_epochs`` converted into steps from the cell
counts in the files' metadata). To use the dataset with a plain ``Trainer`` on several processes, pass
``shard_by_process=False`` and ``TrainingArguments(accelerator_config={"dispatch_batches": False})``: each
process then reads every chunk and accelerate keeps its share of the batches.

Run on several GPUs (or CPU processes) with no change::

    torchrun --nproc_per_node 4 -m scgpt_hf.cli pretrain OUT a.h5ad b.h5ad ...
    accelerate launch -m scgpt_hf.cli pretrain OUT a.h5ad b.h5ad ...   # every GPU of the machine

(``--batch-size`` is per device. accelerate launch starts one process on a machine without GPUs unless given
``--multi_gpu --num_processes N``.) ``training_metrics.json`` records per process what it read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atlas.sources import CellSource, SourceOptions, open_source, open_sources
from .atomic import atomic_output, check_writable
from .configuration_scgpt import ScGPTConfig
from .convert import check_saved_folder
from .data import ScGPTDataCollator
from .tokenization_scgpt import ScGPTTokenizer, quiet_tokenizer_warnings

logger = logging.getLogger(__name__)

__all__ = ["StreamingCellDataset", "build_vocab", "checkpoint_dir", "make_tokenizer", "pretrain", "METRICS_FILE"]

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
METRICS_FILE = "training_metrics.json"


# ----------------------------------------------------------------------------------------------
# Files and vocabulary


def _check_files(files: Sequence[str | os.PathLike]) -> list[Path | str]:
    """The inputs as paths (URIs of TileDB-SOMA experiments as they are); a missing one is an error."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [f if isinstance(f, str) and "://" in f else Path(f) for f in files]
    if not paths:
        raise ValueError(
            "No training inputs given: pass one or more .h5ad files, AnnData .zarr stores or SOMA experiments."
        )
    for p in paths:
        if isinstance(p, Path) and not p.exists():
            raise FileNotFoundError(f"training file {p} does not exist.")
    return paths


def _input_genes(paths: Sequence[Path | str], options: SourceOptions) -> list[tuple[list[str], int]]:
    """(gene names, number of cells) of each input; options that no input can use are an error."""
    sources = open_sources(paths, options)
    try:
        return [(source.gene_names, source.n_cells) for source in sources]
    finally:
        for source in sources:
            source.close()


def build_vocab(
    files: Sequence[str | os.PathLike],
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
    source_options: SourceOptions | None = None,
) -> dict[str, int]:
    """A vocabulary over the genes of `files`: every gene name in first-seen order, then ``<pad>``, ``<cls>``,
    ``<eoc>`` (the layout of the released ``vocab.json``). Only gene names are read (backed)."""
    vocab: dict[str, int] = {}
    options = SourceOptions.combine(source_options, layer=layer, use_raw=use_raw, gene_column=gene_column)
    for names, _ in _input_genes(_check_files(files), options):
        for name in names:
            if name and name not in SPECIAL_TOKENS and name not in vocab:
                vocab[name] = len(vocab)
    if not vocab:
        raise ValueError("The files have no gene names to build a vocabulary from.")
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab


def make_tokenizer(
    vocab: Mapping[str, int] | str | os.PathLike | ScGPTTokenizer, *, max_length: int | None = None, **kwargs: Any
) -> ScGPTTokenizer:
    """An `ScGPTTokenizer` from a vocab dict, a ``vocab.json`` file, a tokenizer folder / Hub id or a tokenizer."""
    if isinstance(vocab, ScGPTTokenizer):
        tokenizer = vocab
    elif isinstance(vocab, Mapping):
        folder = tempfile.mkdtemp(prefix="scgpt_vocab_")
        path = Path(folder) / "vocab.json"
        path.write_text(json.dumps(dict(vocab)))
        tokenizer = ScGPTTokenizer(str(path), **kwargs)
    else:
        path = Path(vocab)
        if path.is_file():
            tokenizer = ScGPTTokenizer(str(path), **kwargs)
        elif path.is_dir() and not (path / "vocab.json").is_file():
            raise FileNotFoundError(f"{path} has no vocab.json (expected a vocab file or a tokenizer folder).")
        else:
            tokenizer = ScGPTTokenizer.from_pretrained(os.fspath(vocab), **kwargs)
    if max_length is not None:
        tokenizer.max_length = int(max_length)
        tokenizer.init_kwargs["max_length"] = int(max_length)  # saved with save_pretrained
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Streaming dataset


@dataclass(frozen=True)
class _Unit:
    file: int
    start: int
    stop: int


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingCellDataset(torch.utils.data.IterableDataset):
    """Tokenised cells streamed from backed .h5ad files, AnnData zarr stores or TileDB-SOMA experiments (the
    sources of `scgpt_hf.atlas`), for `Trainer` with `ScGPTDataCollator`.

    Each file is opened backed (`scgpt_hf.atlas.open_source`); its gene names are matched against
    the tokenizer's vocabulary once (at construction) and its rows are read ``chunk_size`` at a time, so at
    most ``chunk_size`` rows of expression plus ``shuffle_buffer`` tokenised cells are in memory per
    DataLoader worker. Yields ``{"input_ids", "values"}`` per cell (unpadded, ``<cls>`` first), exactly what
    ``tokenizer(cells, padding=False, seed=seed, max_length=max_length)`` gives for those cells. Cells with
    no vocabulary gene are skipped (counted in ``n_skipped_empty`` of the iterating process).

    Args:
        files: .h5ad files, .zarr stores, SOMA experiments (raw counts or normalised/log1p values; not scaled data).
        tokenizer: the vocabulary and binning.
        max_length: tokens per cell, ``<cls>`` included (default: the tokenizer's); longer cells keep a
            seeded random subset of genes.
        layer, use_raw, gene_column: which matrix and gene names to read (same for every file).
        chunk_size: rows read from a file at a time; also the unit of shuffling and sharding.
        shuffle: shuffle the order of (file, chunk) units every epoch and cells within a buffer.
        shuffle_buffer: cells held for the within-buffer shuffle.
        seed: seeds shuffling (with the epoch) and tokenisation (as in `ScGPTTokenizer`).
        epochs: passes over the data; None repeats forever (each pass reshuffled).
        shard_by_process: split units over processes (rank / world size, see module docstring).
        process_index, num_processes: override the detected rank and world size.
        return_index: also yield ``file`` and ``row`` of each cell (for inspection; not a model input).
        source_options: for TileDB-SOMA inputs, the measurement, X layer, var column and obs filter
            (`scgpt_hf.atlas.SourceOptions`; a layer/use_raw/gene_column set there that the arguments above
            contradict is an error).

    What the iterating process has read is kept in ``first_pass_units`` (the units of the first pass, in
    reading order; later passes are the same units reshuffled), ``passes`` (passes started) and
    ``cells_read`` (rows read), so a run can show how the data was split (see `read_summary`) in memory
    that does not grow with the length of the run.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        tokenizer: ScGPTTokenizer,
        *,
        max_length: int | None = None,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        chunk_size: int = 1024,
        shuffle: bool = True,
        shuffle_buffer: int = 4096,
        seed: int = 0,
        epochs: int | None = 1,
        shard_by_process: bool = True,
        process_index: int | None = None,
        num_processes: int | None = None,
        return_index: bool = False,
        source_options: SourceOptions | None = None,
    ):
        super().__init__()
        if chunk_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"chunk_size and shuffle_buffer must be positive, got {chunk_size}, {shuffle_buffer}.")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be a positive integer or None (forever), got {epochs}.")
        self.files = _check_files(files)
        self.tokenizer = tokenizer
        self.max_length = tokenizer.max_length if max_length is None else int(max_length)
        self.chunk_size, self.shuffle, self.shuffle_buffer = int(chunk_size), bool(shuffle), int(shuffle_buffer)
        self.seed, self.epochs = int(seed), epochs
        self.shard_by_process = shard_by_process
        self.process_index, self.num_processes = process_index, num_processes
        self.return_index = return_index
        self.n_skipped_empty = 0
        self.first_pass_units: list[_Unit] = []
        self.passes = 0
        self.cells_read = 0
        self.gene_ids: list[np.ndarray] = []
        self.n_cells: list[int] = []
        self.options = SourceOptions.combine(source_options, layer=layer, use_raw=use_raw, gene_column=gene_column)
        for path, (names, n_obs) in zip(self.files, _input_genes(self.files, self.options)):
            try:
                with quiet_tokenizer_warnings():  # the per-file coverage is logged below instead
                    match = tokenizer.match_genes(names)
            except ValueError as err:
                raise ValueError(
                    f"{path}: no gene matches the vocabulary ({err}) Pass gene_column= / --gene-column naming a "
                    "var column with gene symbols, or leave this file out."
                ) from None
            logger.info("%s: %d cells, %d of %d genes in the vocabulary.", path, n_obs, match.n_matched, len(names))
            self.gene_ids.append(match.ids)
            self.n_cells.append(n_obs)

    @property
    def total_cells(self) -> int:
        """Cells in all files (from metadata; cells without vocabulary genes included)."""
        return int(sum(self.n_cells))

    def _shard(self) -> tuple[int, int]:
        """(this shard, number of shards) over processes x DataLoader workers."""
        if self.shard_by_process:
            rank, world = _distributed_rank()
            rank = rank if self.process_index is None else self.process_index
            world = world if self.num_processes is None else self.num_processes
        else:
            rank, world = 0, 1
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * n_workers + worker, world * n_workers

    def _units(self, n_shards: int) -> list[_Unit]:
        # Enough units for every shard to get some, even for small corpora.
        rows = max(1, min(self.chunk_size, self.total_cells // max(1, n_shards)))
        units = [
            _Unit(f, s, min(n, s + rows)) for f, n in enumerate(self.n_cells) for s in range(0, n, rows)
        ]
        if len(units) < n_shards:
            raise ValueError(
                f"{self.total_cells} cells cannot feed {n_shards} data shards (processes x DataLoader workers); "
                "use fewer workers or processes."
            )
        return units

    def _read(self, handle: CellSource, unit: _Unit) -> Iterator[tuple[int, Any]]:
        """Rows of `unit` as in-memory CSR blocks (never more than `chunk_size` rows), with their first row."""
        return handle.blocks(unit.start, unit.stop)

    def read_summary(self) -> dict[str, Any]:
        """What this process has read: rows (``cells``), passes started (``passes``) and the first pass's
        units as ``[file index, first row, stop row]`` in reading order (``first_pass_units``). Per process:
        DataLoader workers read in copies of the dataset."""
        return {
            "cells": self.cells_read,
            "passes": self.passes,
            "first_pass_units": [[u.file, u.start, u.stop] for u in self.first_pass_units],
        }

    def _cells(self, units: Sequence[_Unit], epoch: int) -> Iterator[dict[str, Any]]:
        handles: dict[int, CellSource] = {}
        try:
            for unit in units:
                if unit.file not in handles:
                    handles[unit.file] = open_source(self.files[unit.file], self.options)
                self.passes = max(self.passes, epoch + 1)
                if epoch == 0:
                    self.first_pass_units.append(unit)
                for first, block in self._read(handles[unit.file], unit):
                    self.cells_read += block.shape[0]
                    try:
                        with quiet_tokenizer_warnings():  # empty cells are skipped and counted here
                            enc = self.tokenizer.encode_with_ids(
                                block, self.gene_ids[unit.file], max_length=self.max_length, padding=False,
                                seed=self.seed, return_n_genes=True,
                            )
                    except ValueError as err:
                        raise ValueError(f"{self.files[unit.file]}: {err}") from None
                    for i, n_genes in enumerate(enc["n_genes"]):
                        if n_genes == 0:
                            self.n_skipped_empty += 1
                            continue
                        item = {"input_ids": enc["input_ids"][i], "values": enc["values"][i]}
                        if self.return_index:
                            item["file"], item["row"] = unit.file, first + i
                        yield item
        finally:
            for handle in handles.values():
                handle.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, n_shards = self._shard()
        units = self._units(n_shards)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = np.arange(len(units))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
            mine = [units[i] for i in order[shard::n_shards]]
            cells = self._cells(mine, epoch)
            if not self.shuffle:
                yield from cells
            else:
                rng = np.random.default_rng([self.seed, epoch, shard, 1])
                buffer: list[dict[str, Any]] = []
                for item in cells:
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    j = int(rng.integers(len(buffer)))
                    buffer[j], item = item, buffer[j]
                    yield item
                for j in rng.permutation(len(buffer)):
                    yield buffer[j]
            epoch += 1


# ----------------------------------------------------------------------------------------------
# Trainer


def pretrain(
    files: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    tokenizer: ScGPTTokenizer | str | os.PathLike | Mapping[str, int] | None = None,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    dropout: float = 0.1,
    config_overrides: Mapping[str, Any] | None = None,
    max_length: int = 1200,
    mask_ratio: float | Sequence[float] = 0.4,
    generative: bool = False,
    max_steps: int | None = None,
    num_epochs: float | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    seed: int = 0,
    layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
    chunk_size: int = 1024,
    shuffle_buffer: int = 4096,
    num_workers: int = 0,
    logging_steps: int = 10,
    training_args: Mapping[str, Any] | None = None,
    resume_from_checkpoint: bool | str | os.PathLike | None = None,
    overwrite: bool = False,
    source_options: SourceOptions | None = None,
) -> Path:
    """Pretrain `ScGPTForPreTraining` from scratch on `files` with `transformers.Trainer`; returns the folder.

    The model learns masked expression (MSE on the masked genes' binned values, mask ``config.mask_value``)
    and the MVC/GEPC objective from the cell embedding, on cells streamed from the backed files (see
    `StreamingCellDataset`). With `generative`, the masked genes are instead genes to generate: they carry
    a flag embedding instead of a value and attend only to the known genes and themselves (the original's
    generative pretraining; the model gets ``config.use_generative_flag``). Written to `output_dir`:
    ``config.json`` + ``model.safetensors`` (``from_pretrained``-ready, also as `ScGPTModel` for `embed`),
    the tokenizer (``vocab.json`` and its config, ``max_length`` set to `max_length`) and
    ``training_metrics.json`` (losses, steps, cells, time, settings, and what each process read): nothing
    that ``scgpt-hf push`` refuses (no pickles). The folder is written beside `output_dir`, loaded back and
    only then moved into place (`scgpt_hf.atomic`), so a failure or a kill never leaves a partial one; an
    existing `output_dir` is replaced only with `overwrite`, and is checked before any data is read.
    Trainer checkpoints (``training_args={"save_strategy": "steps", "save_steps": N}``) go to
    `checkpoint_dir(output_dir)`, beside it, where `resume_from_checkpoint` (True: the latest) finds them.

    Under ``torchrun`` / ``accelerate launch`` each process trains on its own share of the (file, chunk)
    units (see the module docstring); only the main process writes `output_dir`. On machines without CUDA
    the processes train together over ``gloo``.

    Args:
        files: .h5ad files, AnnData .zarr stores or TileDB-SOMA experiments (raw counts or normalised/log1p
            values; SOMA settings in `source_options`).
        output_dir: folder to write.
        tokenizer: an `ScGPTTokenizer`, a tokenizer folder / Hub id, a ``vocab.json`` path or a vocab dict;
            None builds the vocabulary from the genes of `files` (`build_vocab`).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size (default 2 x hidden_size),
            dropout: model size; `config_overrides` sets any other `ScGPTConfig` field.
        max_length: tokens per cell, ``<cls>`` included.
        mask_ratio: fraction of each cell's genes masked, or several fractions, one drawn per batch (the
            original's generative pretraining draws from 0.25, 0.5, 0.75).
        generative: masked genes become genes to generate (see above).
        max_steps: optimizer steps; or `num_epochs`, converted to steps from the files' cell counts
            (``ceil(cells x epochs / (batch_size x processes x accumulation))``). One of them is required.
        batch_size: cells per device per step.
        learning_rate, warmup_ratio, weight_decay: AdamW with linear decay.
        seed: model initialisation, data order, masking (offset by the process rank, so processes mask
            differently) and tokenisation.
        layer, use_raw, gene_column: matrix and gene names to read from every file.
        chunk_size, shuffle_buffer: see `StreamingCellDataset`.
        num_workers: DataLoader worker processes (each streams its own share of the chunks; what they read
            is then not in the metrics).
        logging_steps: log the loss every this many steps.
        training_args: more `TrainingArguments` (override the ones above; e.g. ``bf16``,
            ``gradient_accumulation_steps``, ``save_steps``).
        resume_from_checkpoint: continue from this checkpoint folder, or with True from the latest in
            `checkpoint_dir(output_dir)`.
        overwrite: replace an existing `output_dir`.
        source_options: for TileDB-SOMA inputs, the measurement, X layer, var column and obs filter
            (`scgpt_hf.atlas.SourceOptions`; a layer/use_raw/gene_column set there that the arguments above
            contradict is an error).
    """
    paths = _check_files(files)
    output_dir = Path(output_dir).expanduser().absolute()
    if _distributed_rank()[0] == 0:  # the process that will write it; before any data is read
        check_writable(output_dir, overwrite=overwrite, what="output folder")
    mask_ratio = _mask_ratio(mask_ratio)
    if tokenizer is None:
        tokenizer = build_vocab(paths, layer=layer, use_raw=use_raw, gene_column=gene_column,
                                source_options=source_options)
    tokenizer = make_tokenizer(tokenizer, max_length=max_length)

    extra = dict(training_args or {})
    args = _training_arguments(
        output_dir, extra, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        logging_steps=logging_steps, seed=seed, num_workers=num_workers,
    )
    # The Trainer's rank and world size, so the data shards match the processes that train.
    dataset = StreamingCellDataset(
        paths, tokenizer, max_length=max_length, layer=layer, use_raw=use_raw, gene_column=gene_column,
        chunk_size=chunk_size, shuffle_buffer=shuffle_buffer, seed=seed, epochs=None,
        process_index=args.process_index, num_processes=args.world_size, source_options=source_options,
    )
    _set_schedule(args, extra, dataset.total_cells, max_steps, num_epochs, warmup_ratio)

    config = _model_config(
        tokenizer, max_length, generative, config_overrides, hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 2 * hidden_size, dropout=dropout,
    )
    model, trainer = _model_and_trainer(config, args, dataset, tokenizer, mask_ratio, generative, seed)
    resumed_from = _resume_point(resume_from_checkpoint, args.output_dir)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resumed_from)
    elapsed = time.perf_counter() - started

    read = _gather_reads(dataset, args)
    if trainer.is_world_process_zero():
        metrics = _metrics(
            trainer, model, result, dataset, read, resumed_from=resumed_from, mask_ratio=mask_ratio,
            generative=generative, max_length=max_length, seed=seed, train_runtime_s=round(elapsed, 2),
        )
        _publish(output_dir, overwrite, model, tokenizer, metrics)
    # No process returns before the folder is complete (a caller may read it right away on any rank).
    trainer.accelerator.wait_for_everyone()
    return output_dir


def _mask_ratio(mask_ratio: float | Sequence[float]) -> float | list[float]:
    """One fraction, or several to draw from per batch; each above 0 (the loss is on the masked genes)."""
    ratios = [float(mask_ratio)] if isinstance(mask_ratio, numbers.Real) else [float(r) for r in mask_ratio]
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"mask_ratio must be above 0 (the loss is on masked genes), got {mask_ratio}.")
    return ratios if len(ratios) > 1 else ratios[0]


def _training_arguments(
    output_dir: Path, extra: Mapping[str, Any], *, batch_size: int, learning_rate: float, weight_decay: float,
    logging_steps: int, seed: int, num_workers: int,
) -> Any:
    """`TrainingArguments` from `pretrain`'s settings, overridden by the user's `extra` ones; refuses a launch of
    several processes that the Trainer would not join into one distributed job."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(checkpoint_dir(output_dir)),
        max_steps=1,  # set by _set_schedule, once the world size is known
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=0,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
        accelerator_config={"dispatch_batches": False},
    )
    args = TrainingArguments(**{**settings, **_cpu_launch_args(extra), **extra})  # training_args override
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if args.world_size != launched:
        raise ValueError(
            f"WORLD_SIZE={launched} makes this one of {launched} processes, but the Trainer set up distributed "
            f"training for {args.world_size}, so each process would train alone. Launch with torchrun or "
            "accelerate launch; on devices other than CUDA GPUs and CPUs pass training_args={'ddp_backend': ...}."
        )
    return args


def _cpu_launch_args(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Settings that make a multi-process launch on a machine without CUDA train as one DDP job.

    Without ``use_cpu`` accelerate (1.15) sees no accelerator under ``torchrun``, sets up no distributed
    training and every process trains its own model, alone, on its share of the data and writes
    `output_dir`. ``gloo`` is PyTorch's CPU backend (accelerate would take ``mpi`` where available, which
    ``torchrun`` does not set up). Nothing changes with CUDA, one process, or settings given by the user."""
    if "use_cpu" in extra or torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where `pretrain` keeps Trainer checkpoints for `output_dir`: beside it (``OUTPUT_DIR.checkpoints``), since
    the model folder itself appears only when training is over."""
    output_dir = Path(output_dir).expanduser().absolute()
    return output_dir.with_name(f"{output_dir.name}.checkpoints")


def _set_schedule(
    args: Any, extra: Mapping[str, Any], total_cells: int, max_steps: int | None, num_epochs: float | None,
    warmup_ratio: float,
) -> None:
    """Training length in optimizer steps (`max_steps`, or `num_epochs` over the files' cells) and warmup."""
    if max_steps is None:
        if num_epochs is None:
            raise ValueError("Give max_steps or num_epochs (the stream has no end of its own).")
        max_steps = max(1, math.ceil(total_cells * float(num_epochs) / _cells_per_step(args)))
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}.")
    args.max_steps = int(max_steps)
    if "warmup_steps" not in extra:
        args.warmup_steps = int(round(warmup_ratio * args.max_steps))


def _cells_per_step(args: Any) -> int:
    return int(args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps)


def _model_config(
    tokenizer: ScGPTTokenizer, max_length: int, generative: bool, overrides: Mapping[str, Any] | None, **size: Any
) -> ScGPTConfig:
    """The new model's config: its size, the tokenizer's special tokens and binning, then `overrides`."""
    values = {
        "vocab_size": len(tokenizer),
        **size,
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "eoc_token_id": tokenizer.convert_tokens_to_ids("<eoc>"),
        "pad_value": tokenizer.pad_value,
        "n_bins": tokenizer.n_bins,
        "max_seq_len": max_length,
        **(overrides or {}),
    }
    if generative:
        values["use_generative_flag"] = True  # the flag embedding marks the genes to generate
    return ScGPTConfig(**values)


def _model_and_trainer(
    config: ScGPTConfig, args: Any, dataset: StreamingCellDataset, tokenizer: ScGPTTokenizer,
    mask_ratio: float | list[float], generative: bool, seed: int,
) -> tuple[Any, Any]:
    """A freshly initialised (seeded) model and the Trainer that pretrains it on `dataset`."""
    from transformers import set_seed

    from .modeling_scgpt import ScGPTForPreTraining

    set_seed(seed)
    model = ScGPTForPreTraining(config)
    collator = ScGPTDataCollator(
        tokenizer, mask_ratio=mask_ratio, mask_value=config.mask_value,
        generative=generative, seed=seed + args.process_index,
    )
    made_checkpoint_dir = not os.path.isdir(args.output_dir)
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collator)
    if made_checkpoint_dir and args.save_strategy == "no":
        with contextlib.suppress(OSError):
            os.rmdir(args.output_dir)  # the Trainer makes it whether or not checkpoints are saved
    return model, trainer


def _trainer_class() -> type:
    from accelerate.data_loader import IterableDatasetShard
    from transformers import Trainer

    class _StreamingTrainer(Trainer):
        """Trainer whose train loader leaves sharding to `StreamingCellDataset` (see module docstring)."""

        def get_train_dataloader(self):  # type: ignore[no-untyped-def]
            loader = super().get_train_dataloader()
            wrapped = getattr(loader, "dataset", None)
            if isinstance(wrapped, IterableDatasetShard) and isinstance(wrapped.dataset, StreamingCellDataset):
                if wrapped.dataset.shard_by_process:
                    wrapped.num_processes, wrapped.process_index = 1, 0
            return loader

    return _StreamingTrainer


def _resume_point(resume: bool | str | os.PathLike | None, checkpoints: str) -> str | None:
    """The checkpoint folder to resume from (True: the latest in `checkpoints`), or None."""
    if not resume:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        latest = get_last_checkpoint(checkpoints) if os.path.isdir(checkpoints) else None
        if latest is None:
            raise FileNotFoundError(
                f"No checkpoint to resume from in {checkpoints}: checkpoints are saved there during a run with "
                "--save-steps N (Python: training_args={'save_strategy': 'steps', 'save_steps': N}); start without "
                "--resume."
            )
        return latest
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"Checkpoint folder {resume} does not exist; give a checkpoint-N folder of "
                                f"{checkpoints}, or True for the latest.")
    return os.fspath(resume)


def _gather_reads(dataset: StreamingCellDataset, args: Any) -> list[dict[str, Any]] | None:
    """Every process's `read_summary`, in rank order; None with DataLoader workers, which read in their own
    copies of the dataset that are not seen here. Every process takes part in the gather."""
    from accelerate.utils import gather_object

    return gather_object([dataset.read_summary()]) if args.dataloader_num_workers == 0 else None


def _metrics(
    trainer: Any, model: Any, result: Any, dataset: StreamingCellDataset, read: list[dict[str, Any]] | None,
    resumed_from: str | None, **run: Any,
) -> dict[str, Any]:
    """The content of ``training_metrics.json``: losses, steps, cells, settings (`run`), what each process read
    and the model's size."""
    args, state = trainer.args, trainer.state
    losses = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e]
    n_last = max(1, len(losses) // 10)
    per_step = _cells_per_step(args)
    config = model.config
    return {
        # Mean of the last tenth of the logged losses (the run's mean loss when none was logged).
        "final_loss": float(np.mean([l for _, l in losses[-n_last:]])) if losses else float(result.training_loss),
        "first_loss": float(losses[0][1]) if losses else None,
        "train_loss": float(result.training_loss),
        "loss_history": [{"step": s, "loss": float(l)} for s, l in losses],
        "max_steps": args.max_steps,
        "global_step": int(state.global_step),
        "resumed_from": resumed_from,
        "cells_seen": int(state.global_step * per_step),
        "cells_in_files": dataset.total_cells,
        "epochs_seen": state.global_step * per_step / max(1, dataset.total_cells),
        "files": [str(p) for p in dataset.files],
        "batch_size_per_device": args.per_device_train_batch_size,
        "world_size": args.world_size,
        # Per process (rank order): rows read, passes started and the first pass's (file, chunk) units
        # as [index in "files", first row, stop row]; None with DataLoader workers.
        "data_read_by_process": read,
        "learning_rate": args.learning_rate,
        **run,  # mask_ratio, generative, max_length, seed, train_runtime_s
        "model": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "vocab_size": config.vocab_size,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        },
    }


def _publish(
    output_dir: Path, overwrite: bool, model: Any, tokenizer: ScGPTTokenizer, metrics: Mapping[str, Any]
) -> None:
    """Write model, tokenizer and metrics beside `output_dir`, load them back, then move the folder into place."""
    with atomic_output(output_dir, overwrite=overwrite, directory=True, what="output folder") as staging:
        # model.save_pretrained, not trainer.save_model: that adds training_args.bin, a pickle push refuses.
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        check_saved_folder(staging, model, tokenizer)
