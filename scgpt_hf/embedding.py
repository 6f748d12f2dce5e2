"""Inference over AnnData: zero-shot cell embeddings (``embed``) and cell-type annotation (``annotate``).

``embed`` computes what the original ``scgpt.tasks.embed_data`` computes; ``annotate`` runs a fine-tuned
``ScGPTForCellClassification`` the same way and writes labels into ``obs``.

What is computed matches the original zero-shot path: each cell becomes ``<cls>`` (value
``config.pad_value``, as the original's embedding path does) followed by its expressed vocabulary genes
with per-cell binned values, cut to ``max_length`` tokens by seeded random sampling; the cell embedding is
the model's ``cell_embedding`` (``<cls>`` output for ``cell_emb_style="cls"``), L2-normalised, float32.

How it differs from the original, on purpose:

* reproducible: tie-breaking in binning and gene sampling come from ``seed`` and each cell's content
  (see ``ScGPTTokenizer``), so a cell's embedding does not depend on its batch, chunk or row position;
* fast: cells of a chunk are sorted by token count and each batch is padded only to its own longest cell,
  so little compute goes to padding; the pretraining decoders are never run;
* frugal: the expression matrix is read ``chunk_size`` rows at a time and never densified as a whole, and
  backed AnnData (``anndata.read_h5ad(path, backed="r")``) is streamed from disk;
* robust: a cell with no expressed vocabulary gene gets a NaN row and a warning instead of a crash.

Results written (scverse conventions; ``key`` is ``key_added``, default ``"X_scGPT"``):

* ``adata.obsm[key]``: (n_obs, hidden_size) float32, L2-normalised; NaN rows for cells with no gene;
* ``adata.obs[key + "_n_genes"]``: int, each cell's number of expressed vocabulary genes before
  truncation (0 means the row of ``obsm[key]`` is NaN);
* ``adata.uns[key + "_params"]``: dict describing how the embedding was made (see ``embed``).

For a backed AnnData these live in memory on the object (anndata allows it); persist them with
``adata.write_h5ad(new_path)``, which streams the backed matrix, or open the file with ``backed="r+"`` and
call ``adata.write()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .anndata_input import ExpressionInput, batch_codes, row_blocks, select_matrix
from .anndata_output import (
    DEFAULT_KEY,
    DEFAULT_LABEL_KEY,
    check_annotation_key,
    check_embedding_key,
    write_annotation,
    write_embedding,
)
from .constants import SOMA_OPTIONS
from .inference import (
    DEFAULT_MAX_TOKENS, autocast_dtype, eval_mode, load_model, pick_device, precision_name,
    run_expressed_cells,
)
from .modeling_scgpt import ScGPTForCellClassification, ScGPTPreTrainedModel
from .tokenization_scgpt import GeneMatch, ScGPTTokenizer, quiet_tokenizer_warnings

if TYPE_CHECKING:  # the atlas package imports this module
    from .atlas import SourceOptions

logger = logging.getLogger(__name__)

__all__ = ["annotate", "embed", "encode_block", "DEFAULT_KEY"]

#: Cells read, tokenised and length-sorted at a time by `embed` and `annotate` on an AnnData.
DEFAULT_CHUNK_SIZE = 8192


# ----------------------------------------------------------------------------------------------
# Run options and runtime


@dataclass(frozen=True)
class _RunOptions:
    """The arguments `embed` and `annotate` share (see `embed`)."""

    batch_size: int
    max_length: int
    seed: int
    layer: str | None
    use_raw: bool
    gene_column: str | None
    device: str | torch.device | None
    precision: str
    chunk_size: int
    max_tokens: int | None | str
    num_threads: int | None
    progress: bool

    def check(self, adata: Any, max_seq_len: int) -> None:
        """Refuse what cannot run, before anything is read; warn about cells longer than training ever saw."""
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
        for arg, low in (("batch_size", 1), ("max_length", 2), ("chunk_size", 1)):
            if int(getattr(self, arg)) < low:
                raise ValueError(f"{arg} must be at least {low}, got {getattr(self, arg)}.")
        if self.max_length > max_seq_len:
            warnings.warn(
                f"max_length={self.max_length} exceeds the model's max_seq_len={max_seq_len}; cells that long "
                "were never seen in training.",
                stacklevel=4,
            )

    def token_budget(self, device: torch.device) -> int | None:
        """Padded tokens per forward pass on `device` ("auto": `inference.DEFAULT_MAX_TOKENS`)."""
        if self.max_tokens == "auto":
            return DEFAULT_MAX_TOKENS.get(device.type)
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be positive, 'auto' or None, got {self.max_tokens}.")
        return self.max_tokens


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def _cpu_threads(num_threads: int | None) -> Iterator[int]:
    """Use `num_threads` intra-op threads (default: torch's, capped at the CPUs this process may use)."""
    previous = torch.get_num_threads()
    wanted = num_threads if num_threads is not None else min(previous, _available_cpus())
    if wanted != previous:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# The run: tokenise chunk by chunk, run the model on length-grouped batches


def encode_block(
    tokenizer: ScGPTTokenizer, block: Any, gene_ids: np.ndarray, *, max_length: int, seed: int, cls_value: float
) -> dict[str, Any]:
    """A block of cells tokenised as `embed` and `annotate` read them (random truncation to `max_length`, no
    padding, each cell's ``n_genes`` and ``n_expressed``); the atlas store uses it too, so both give the same
    tokens for the same cell."""
    return tokenizer.encode_with_ids(
        block, gene_ids, max_length=max_length, truncation="random", padding=False, return_tensors=None, seed=seed,
        cls_value=cls_value, return_n_genes=True,
    )


def _tokenized_chunks(
    tokenizer: ScGPTTokenizer, source: ExpressionInput, match: GeneMatch, options: _RunOptions, cls_value: float
) -> Iterator[tuple[int, list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]]:
    """(first row, input_ids, values, n_genes, n_expressed) of each `chunk_size` rows, read in bounded blocks."""
    matrix = source.matrix
    if sp.issparse(matrix) and matrix.format != "csr":
        matrix = matrix.tocsr()  # once, not per chunk: this copies but never densifies
    for start in range(0, source.n_cells, options.chunk_size):
        ids: list[np.ndarray] = []
        values: list[np.ndarray] = []
        n_genes, n_expressed = [], []
        for _, block in row_blocks(matrix, start, min(source.n_cells, start + options.chunk_size)):
            enc = encode_block(tokenizer, block, match.ids, max_length=options.max_length, seed=options.seed,
                               cls_value=cls_value)
            ids.extend(enc["input_ids"])
            values.extend(enc["values"])
            n_genes.append(enc["n_genes"])
            n_expressed.append(enc["n_expressed"])
        yield start, ids, values, np.concatenate(n_genes), np.concatenate(n_expressed)


def _run_cells(
    adata: AnnData,
    model: ScGPTPreTrainedModel,
    tokenizer: ScGPTTokenizer,
    predict: Callable[[Any], torch.Tensor],
    width: int,
    *,
    cls_value: float,
    batch_ids: np.ndarray | None,
    options: _RunOptions,
    desc: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Tokenise `adata` chunk by chunk, run `model` on length-grouped batches, collect `predict(output)`.

    Returns (per-cell results, NaN rows for cells with no vocabulary gene; per-cell gene counts; run facts).
    The tokenizer's per-chunk reports are quiet: the coverage warning is said once, as soon as it shows (names
    are the usual cause, so the first chunk tells), and the caller reports the cells without a gene.
    """
    options.check(adata, model.config.max_seq_len)
    source = select_matrix(adata, options.layer, options.use_raw, options.gene_column)
    match = tokenizer.match_genes(source.gene_names)
    target = pick_device(options.device)
    dtype = autocast_dtype(target, options.precision)
    max_tokens = options.token_budget(target)
    column_hint = None if options.gene_column is not None else tokenizer._suggest_gene_column(source.var)
    out = np.full((adata.n_obs, width), np.nan, dtype=np.float32)
    n_genes = np.zeros(adata.n_obs, dtype=np.int64)
    n_expressed = np.zeros(adata.n_obs, dtype=np.int64)
    coverage_warned = False
    model.to(target)
    started = time.perf_counter()
    bar = tqdm(total=adata.n_obs, desc=desc, unit="cell", disable=not options.progress)
    try:
        with eval_mode(model), _cpu_threads(options.num_threads), quiet_tokenizer_warnings():
            for start, ids, values, genes, expressed in _tokenized_chunks(tokenizer, source, match, options, cls_value):
                stop = start + len(ids)
                n_genes[start:stop], n_expressed[start:stop] = genes, expressed
                warning = match.coverage_warning(n_genes[:stop], n_expressed[:stop], column_hint)
                if warning and not coverage_warned:
                    warnings.warn(warning, stacklevel=3)
                    coverage_warned = True
                out[start:stop] = run_expressed_cells(
                    model, ids, values, genes, width=width, predict=predict, batch_size=options.batch_size,
                    max_tokens=max_tokens, pad_id=model.config.pad_token_id, pad_value=float(model.config.pad_value),
                    device=target, dtype=dtype, batch_ids=None if batch_ids is None else batch_ids[start:stop],
                )
                bar.update(len(genes))
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    logger.info("Ran %d cells in %.1f s (%.2f cells/s) on %s.", adata.n_obs, elapsed,
                adata.n_obs / max(elapsed, 1e-9), target)
    facts = {
        "max_length": int(options.max_length),
        "seed": int(options.seed),
        "cls_value": float(cls_value),
        "n_bins": int(tokenizer.n_bins),
        "matrix": source.where,
        "gene_column": options.gene_column if options.gene_column is not None else "var_names",
        "n_genes_matched": int(match.n_matched),
        "n_genes_total": int(match.n_total),
        "vocabulary_coverage": float(n_genes.sum() / max(1, n_expressed.sum())),
        "n_cells_empty": int((n_genes == 0).sum()),
        "device": str(target),
        "precision": precision_name(dtype),
    }
    return out, n_genes, facts


def _batch_codes(adata: AnnData, config: Any, batch_key: str | None, as_ids: bool) -> np.ndarray | None:
    """Each cell's batch id for a model with this config (see `anndata_input.batch_codes`)."""
    return batch_codes(
        adata, batch_key, needs_batch_labels=config.needs_batch_labels, num_batch_labels=config.num_batch_labels,
        batch2id=config.batch2id, as_ids=as_ids,
    )


def _path_options(source_options: SourceOptions | None, layer: str | None, use_raw: bool, gene_column: str | None
                  ) -> SourceOptions:
    from .atlas import SourceOptions

    return SourceOptions.combine(source_options, layer=layer, use_raw=use_raw, gene_column=gene_column)


def _input_paths(inputs: Any) -> list[str | os.PathLike]:
    """`embed`'s inputs given as paths: one path or URI, or a list of them."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    if not isinstance(specs, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in specs):
        raise TypeError(f"adata must be an AnnData, a path or a list of paths, got {type(inputs).__name__}.")
    if not specs:
        raise ValueError("No input given: pass an AnnData, or .h5ad files, AnnData .zarr stores or TileDB-SOMA "
                         "experiments.")
    return list(specs)


def _open_h5ad(specs: list[str | os.PathLike], options: SourceOptions) -> AnnData:
    """The one .h5ad file `specs` names, opened backed (read-only): what `embed` can return with results on it.
    Anything else needs an embedding store, whose results do not fit on one AnnData."""
    import anndata

    path = Path(specs[0]).expanduser() if len(specs) == 1 else None
    soma = options.given(SOMA_OPTIONS)
    if path is not None and "://" not in str(specs[0]) and not path.exists():
        raise FileNotFoundError(f"input {specs[0]} does not exist.")
    if path is None or soma or not path.is_file():
        what = f"{len(specs)} inputs" if path is None else (f"source options {soma}" if soma else f"{specs[0]}")
        raise ValueError(f"{what}: give output='cells.zarr' to embed into an embedding store; without one, embed "
                         "takes an AnnData or a single .h5ad file.")
    try:
        return anndata.read_h5ad(path, backed="r")
    except OSError as err:
        raise ValueError(f"cannot read {path} as .h5ad ({err}); for AnnData .zarr stores and TileDB-SOMA "
                         "experiments give output='cells.zarr'.") from None


def _warn_empty(n_empty: int, n_obs: int, where: str, n_genes_key: str) -> None:
    if n_empty:
        warnings.warn(
            f"{n_empty} of {n_obs} cells express no gene of the model's vocabulary; their {where} are NaN "
            f"(obs[{n_genes_key!r}] == 0). Drop them before downstream analysis, e.g. adata[adata.obs[...] > 0].",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# Public API


def embed(
    adata: AnnData | str | os.PathLike | Sequence[str | os.PathLike],
    model: ScGPTPreTrainedModel | str | os.PathLike,
    tokenizer: ScGPTTokenizer | str | os.PathLike | None = None,
    *,
    output: str | os.PathLike | None = None,
    source_options: SourceOptions | None = None,
    overwrite: bool = False,
    batch_size: int = 64,
    max_length: int = 1200,
    key_added: str = DEFAULT_KEY,
    seed: int = 0,
    layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    chunk_size: int | None = None,
    max_tokens: int | None | str = "auto",
    num_threads: int | None = None,
    progress: bool = True,
    batch_key: str | None = None,
    batch_as_ids: bool = False,
) -> AnnData | Path:
    """Embed every cell of `adata` with an scGPT model (zero-shot) and store the result on `adata`, or, for
    inputs given as paths, into the embedding store `output`.

    Args:
        adata: cells x genes with raw counts or normalised/log1p values (binning is rank-based per cell),
            in memory (dense or sparse) or backed (`anndata.read_h5ad(path, backed="r")`, streamed). Or
            inputs on disk: one path or a list of .h5ad files, AnnData .zarr stores and TileDB-SOMA
            experiments (folders or URIs), read backed in chunks. With `output` they go into an embedding
            store (see below); without it, a single .h5ad file is opened backed (read-only) and embedded
            like an AnnData (close it with ``result.file.close()`` when done).
        model: an `ScGPTModel`, a model with an scGPT backbone (e.g. `ScGPTForPreTraining` or a fine-tuned
            `ScGPTForBatchIntegration`: its `base_model_prefix` backbone is used), or a local folder / Hub
            id (loaded with `from_pretrained`).
        tokenizer: `ScGPTTokenizer` or folder / Hub id; default: the one saved with the model.
        output: the embedding store (a ``.zarr`` folder, `scgpt_hf.atlas.store`) for path inputs: written
            chunk by chunk, shared by the processes of a ``torchrun`` launch, continued by the same call
            after a kill, a finished one returned at once; a store started with other settings is refused.
        source_options: for path inputs, TileDB-SOMA's measurement, X layer, var column and obs filter
            (`scgpt_hf.atlas.SourceOptions`); `layer`/`use_raw`/`gene_column` may be given there or below.
        overwrite: start `output` over if it holds another run's store.
        batch_size: cells per forward pass.
        max_length: tokens per cell including `<cls>`; longer cells keep a seeded random subset of genes.
        key_added: where results go: `obsm[key_added]`, `obs[key_added + "_n_genes"]`,
            `uns[key_added + "_params"]`.
        seed: seed of the per-cell tie-breaking and gene sampling (results never depend on batching).
        layer, use_raw: read `adata.layers[layer]` or `adata.raw.X` instead of `adata.X`.
        gene_column: `var` column with gene symbols (default: `var_names`).
        device: torch device; default CUDA when available, else CPU. The model is moved there.
        precision: "auto" (bf16 autocast on GPUs that support bf16, fp16 autocast on older GPUs, fp32 on
            CPU), "fp32", "bf16" or "fp16" (autocast).
        chunk_size: cells read, tokenised and length-sorted at a time (bounds host memory; the host waits
            for the GPU once per chunk); default 8192, and for a store its default of 4096 (its unit of work
            and of resumption).
        max_tokens: cap on padded tokens per forward pass (`batch_size` still caps cells). "auto": 4096 on
            CPU, where small batches stay in cache and avoid page-faulting large fresh buffers (measured
            ~2x faster than 64 x 1200 tokens), 65,536 on GPU (bounds activation memory). None: no cap.
        num_threads: CPU threads for torch during the call (default: torch's, capped at usable CPUs).
        progress: show a tqdm progress bar.
        batch_key: for models with batch embeddings or domain-specific batch norm (e.g. a fine-tuned
            `ScGPTForBatchIntegration`, whose cell embeddings are the integrated representation): the obs
            column of each cell's batch, as names of the model's `config.batch2id` (whatever the column's
            dtype: "0" is a name, never id 0), or as the integer ids it was trained with when the model has
            no names. A batch the model was not trained on is an error.
        batch_as_ids: `obs[batch_key]` holds the integer ids the model was trained with, although the model
            names its batches.

    Returns:
        For an `output` store, its path (``anndata.read_zarr(path)`` gives obs and obsm; with millions of
        cells open ``zarr.open_group(path, mode="r")["obsm"][key_added]`` and read the rows you need). Otherwise
        `adata` (or the AnnData opened from the path) itself, with `obsm[key_added]` (n_obs x hidden_size
        float32, L2-normalised, NaN rows for cells with no expressed vocabulary gene), `obs[key_added +
        "_n_genes"]` and
        `uns[key_added + "_params"]`: `model` (name or path), `max_length`, `seed`, `cls_value`, `n_bins`,
        `cell_emb_style`, `matrix` ("X", "layers/<name>" or "raw.X"), `gene_column`, `n_genes_matched`,
        `n_genes_total`, `vocabulary_coverage` (share of the cells' non-zero entries on vocabulary genes;
        below `tokenization_scgpt.MIN_COVERAGE` a warning names the likely cause), `n_cells_empty`, `device`,
        `precision`, `batch_key`, `batch_as_ids`, `scgpt_hf_version`.
    """
    check_embedding_key(key_added)
    if not isinstance(adata, AnnData):
        inputs, options = _input_paths(adata), _path_options(source_options, layer, use_raw, gene_column)
        if output is None:
            if overwrite:
                raise ValueError("overwrite is for an embedding store (output=...); embedding a file without one "
                                 "writes nothing.")
            adata = _open_h5ad(inputs, options)
            layer, use_raw, gene_column = options.layer, options.use_raw, options.gene_column
        elif Path(output).suffix != ".zarr":
            raise ValueError(f"output must be a .zarr folder (an embedding store), got {output}.")
        elif batch_key is not None or batch_as_ids:
            raise ValueError("batch_key and batch_as_ids are not for an embedding store, which takes models without "
                             "batch labels: embed each file's AnnData with batch_key instead.")
        else:
            from .atlas import embed_to_store

            with _cpu_threads(num_threads):
                embed_to_store(inputs, output, model, tokenizer, options=options, key_added=key_added,
                               batch_size=batch_size, max_length=max_length, seed=seed, device=device,
                               precision=precision, max_tokens=max_tokens, progress=progress, overwrite=overwrite,
                               **({} if chunk_size is None else {"chunk_size": chunk_size}))
            return Path(output)
    elif output is not None or source_options is not None or overwrite:
        raise ValueError("output, source_options and overwrite are for inputs given as paths (an embedding store); "
                         "an AnnData gets its results on itself: save it with adata.write_h5ad(path).")
    backbone, tokenizer, name = load_model(model, tokenizer)
    config = backbone.config
    out, n_genes, facts = _run_cells(
        adata, backbone, tokenizer, lambda result: result.cell_embedding, config.hidden_size,
        cls_value=float(config.pad_value),  # the original's embedding path puts pad_value at <cls>
        batch_ids=_batch_codes(adata, config, batch_key, batch_as_ids),
        options=_RunOptions(batch_size, max_length, seed, layer, use_raw, gene_column, device, precision,
                            DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size, max_tokens, num_threads,
                            progress),
        desc="Embedding cells",
    )
    _warn_empty(facts["n_cells_empty"], adata.n_obs, f"rows of obsm[{key_added!r}]", f"{key_added}_n_genes")
    about = {"model": name or type(backbone).__name__, "cell_emb_style": str(config.cell_emb_style)}
    write_embedding(adata, key_added, out, n_genes, _params(about, batch_key, batch_as_ids, facts))
    return adata


def annotate(
    adata: AnnData,
    model: ScGPTForCellClassification | str | os.PathLike,
    tokenizer: ScGPTTokenizer | str | os.PathLike | None = None,
    *,
    key_added: str = DEFAULT_LABEL_KEY,
    batch_size: int = 64,
    max_length: int = 1200,
    seed: int = 0,
    layer: str | None = None,
    use_raw: bool = False,
    gene_column: str | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_tokens: int | None | str = "auto",
    num_threads: int | None = None,
    progress: bool = True,
    batch_key: str | None = None,
    batch_as_ids: bool = False,
) -> AnnData:
    """Predict cell types with a fine-tuned `ScGPTForCellClassification` and store them on `adata`.

    Cells are prepared as in fine-tuning (`<cls>` value = the tokenizer's `cls_value`), streamed and
    length-grouped as in `embed` (same arguments, `batch_key` and `batch_as_ids` included).

    Returns:
        `adata` itself, with `obs[key_added]` (categorical label from `config.id2label`; missing for cells
        with no vocabulary gene), `obs[key_added + "_probability"]` (probability of that label),
        `obsm[key_added + "_probabilities"]` (n_obs x num_labels, columns in `config.id2label` order),
        `uns[key_added + "_params"]` (how it was computed, as in `embed`, plus `labels`).
    """
    check_annotation_key(key_added)
    classifier, tokenizer, name = load_model(model, tokenizer, ScGPTForCellClassification)
    config = classifier.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    probs, n_genes, facts = _run_cells(
        adata, classifier, tokenizer, lambda result: torch.softmax(result.logits.float(), dim=-1), config.num_labels,
        cls_value=float(tokenizer.cls_value),
        batch_ids=_batch_codes(adata, config, batch_key, batch_as_ids),
        options=_RunOptions(batch_size, max_length, seed, layer, use_raw, gene_column, device, precision,
                            chunk_size, max_tokens, num_threads, progress),
        desc="Annotating cells",
    )
    done = n_genes > 0
    _warn_empty(facts["n_cells_empty"], adata.n_obs, f"labels in obs[{key_added!r}]", f"{key_added}_n_genes")
    best = np.where(done, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1)
    probability = np.where(done, probs[np.arange(len(best)), np.maximum(best, 0)], np.nan)
    about = {"model": name or type(classifier).__name__, "labels": labels}
    write_annotation(adata, key_added, labels=labels, codes=best, probability=probability, probabilities=probs,
                     n_genes=n_genes, params=_params(about, batch_key, batch_as_ids, facts))
    return adata


def _params(about: dict[str, Any], batch_key: str | None, batch_as_ids: bool, facts: dict[str, Any]) -> dict[str, Any]:
    """``uns[key + "_params"]``: what ran (`about`), the batch column, how it ran (`facts`), the library version."""
    from . import __version__

    return {**about, "batch_key": batch_key, "batch_as_ids": bool(batch_as_ids), **facts,
            "scgpt_hf_version": str(__version__)}
