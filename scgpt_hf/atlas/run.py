"""Embedding many sources into one store, in one process or many (``torchrun``), resumable.

The cells of all inputs, in order, are cut into chunks of ``chunk_size`` cells (a chunk may span two
inputs); chunk ``k`` holds cells ``k * chunk_size`` onwards and is one zarr chunk of every array of the
store. The chunks not finished yet are dealt round-robin over the processes (``torch.distributed`` rank and
world size, from ``torchrun``'s ``RANK``/``WORLD_SIZE``; gloo on CPU, NCCL on GPUs), and each process
reads, tokenises, embeds and writes its own chunks. A cell's tokens depend only on the cell and the seed
(see ``ScGPTTokenizer``) and a chunk is the same cells whichever process runs it, so the store is the one a
single process writes. The first process checks the store (lock, settings) and, once every chunk is
written, records the run's parameters, which marks the store finished (`scgpt_hf.atlas.store`).

Progress: a bar per process, and on the first one a line with the cells written by all processes, the
rate since this run began (cells/s) and the time left.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..anndata_output import DEFAULT_KEY, check_embedding_key, normalize_rows
from ..embedding import encode_block
from ..inference import (
    DEFAULT_MAX_TOKENS, autocast_dtype, load_model, pick_device, precision_name, run_expressed_cells,
)
from ..tokenization_scgpt import quiet_tokenizer_warnings
from .sources import CellSource, SourceOptions, open_sources
from .store import EmbeddingStore, SettingsMismatchError, StoreBusyError

logger = logging.getLogger(__name__)

__all__ = ["embed_to_store", "weights_sha256"]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes and bytes, by name): the same weights give the
    same hash wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Processes


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size): from an initialised process group, else from torchrun's variables (a group is set
    up for the call and torn down after it), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world < 2:
        yield 0, 1
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def _share(value: Any, rank: int, world: int) -> Any:
    """The first process's `value` on every process."""
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


_ERRORS = {cls.__name__: cls for cls in (StoreBusyError, SettingsMismatchError, ValueError, OSError)}


# ----------------------------------------------------------------------------------------------
# One run


@dataclass
class _Run:
    """What every chunk needs: the inputs, their gene matches, the model and the tokenisation settings."""

    sources: list[CellSource]
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype | None
    chunk_size: int
    max_length: int
    seed: int
    batch_size: int
    max_tokens: int | None

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [s.n_cells for s in self.sources])
        self.n_cells = int(self.offsets[-1])
        self.n_chunks = -(-self.n_cells // self.chunk_size)
        with quiet_tokenizer_warnings():
            self.matches = [self._match(s) for s in self.sources]
        self.coverage = np.zeros((len(self.sources), 2), dtype=np.int64)  # per input: vocabulary, expressed genes
        self.coverage_warned = False

    def _match(self, source: CellSource) -> Any:
        try:
            return self.tokenizer.match_genes(source.gene_names)
        except ValueError as err:
            raise ValueError(f"{source.name}: {err}") from None

    def _note_coverage(self, i: int, n_genes: np.ndarray, n_expressed: np.ndarray) -> None:
        """Warn once per run, as `scgpt_hf.embed` does, as soon as input `i`'s expressed genes so far are too
        rarely in the vocabulary (names are the usual cause, so the first chunk tells)."""
        self.coverage[i] += (int(n_genes.sum()), int(n_expressed.sum()))
        match, genes, expressed = self.matches[i], self.coverage[i, :1], self.coverage[i, 1:]
        if self.coverage_warned or match.coverage_warning(genes, expressed) is None:
            return
        var = self.sources[i].var
        hint = None if var is None else self.tokenizer._suggest_gene_column(var)
        warnings.warn(f"{self.sources[i].name}: {match.coverage_warning(genes, expressed, hint)}", stacklevel=2)
        self.coverage_warned = True

    def pieces(self, chunk: int) -> Iterator[tuple[int, int, int]]:
        """(input, first row, stop row) of the inputs that chunk `chunk` spans."""
        start, stop = chunk * self.chunk_size, min(self.n_cells, (chunk + 1) * self.chunk_size)
        for i, source in enumerate(self.sources):
            lo, hi = max(start, int(self.offsets[i])), min(stop, int(self.offsets[i + 1]))
            if lo < hi:
                yield i, lo - int(self.offsets[i]), hi - int(self.offsets[i])

    def embed_chunk(self, chunk: int) -> dict[str, Any]:
        """Read, tokenise and embed chunk `chunk`: its ids, input codes, embeddings, gene counts and totals."""
        ids, codes, tokens, values, n_genes, n_expressed = [], [], [], [], [], []
        for i, first, stop in self.pieces(chunk):
            source = self.sources[i]
            ids.append(source.ids(first, stop))
            codes.append(np.full(stop - first, i, dtype=np.int64))
            for _, block in source.blocks(first, stop):
                with quiet_tokenizer_warnings():
                    enc = encode_block(self.tokenizer, block, self.matches[i].ids, max_length=self.max_length,
                                       seed=self.seed, cls_value=float(self.model.config.pad_value))
                tokens.extend(enc["input_ids"])
                values.extend(enc["values"])
                n_genes.append(enc["n_genes"])
                n_expressed.append(enc["n_expressed"])
                self._note_coverage(i, enc["n_genes"], enc["n_expressed"])
        genes, expressed = np.concatenate(n_genes), np.concatenate(n_expressed)
        embedding = run_expressed_cells(
            self.model, tokens, values, genes, width=self.model.config.hidden_size,
            predict=lambda result: result.cell_embedding, batch_size=self.batch_size, max_tokens=self.max_tokens,
            pad_id=self.model.config.pad_token_id, pad_value=float(self.model.config.pad_value), device=self.device,
            dtype=self.dtype,
        )
        normalize_rows(embedding, genes)
        counts = {"cells": len(genes), "n_genes": int(genes.sum()), "n_expressed": int(expressed.sum()),
                  "empty": int((genes == 0).sum())}
        return {"start": chunk * self.chunk_size, "ids": np.concatenate(ids), "sources": np.concatenate(codes),
                "embedding": embedding, "n_genes": genes, "counts": counts}

    def settings(self, key: str, model_name: str) -> dict[str, Any]:
        """What makes a store's embeddings what they are: a rerun must match it to continue the store."""
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        tok = self.tokenizer
        return {
            "key": key,
            "model": model_name or type(self.model).__name__,
            "weights_sha256": weights_sha256(self.model),
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "cell_emb_style": str(self.model.config.cell_emb_style),
            "vocab_sha256": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
            "n_bins": int(tok.n_bins),
            "max_length": int(self.max_length),
            "cls_value": float(self.model.config.pad_value),
            "truncation": "random",
            "seed": int(self.seed),
            "precision": precision_name(self.dtype),
            "chunk_size": int(self.chunk_size),
            "n_cells": self.n_cells,
            "sources": {str(i): {**s.describe(), "n_genes_matched": int(m.n_matched)}
                        for i, (s, m) in enumerate(zip(self.sources, self.matches))},
        }


class _Progress:
    """A bar for this process's cells; on the first process, after its first chunk and then at most every
    `interval` seconds, a line with all processes' progress. Counting their chunks lists the progress folder,
    one marker per chunk: doing it per chunk would cost time quadratic in an atlas's chunks."""

    interval = 10.0

    def __init__(self, run: _Run, store: EmbeddingStore, mine: Sequence[int], rank: int, world: int, show: bool):
        from tqdm.auto import tqdm

        self.run, self.store, self.world, self.reports = run, store, world, show and rank == 0
        cells = sum(min(run.n_cells, (k + 1) * run.chunk_size) - k * run.chunk_size for k in mine)
        self.bar = tqdm(total=cells, desc=f"Embedding (process {rank})", unit="cell", position=rank,
                        disable=not show)
        self.started = self.next_line = time.perf_counter()
        self.done_before = self._cells_done() if self.reports else 0

    def _cells_done(self) -> int:
        return min(self.run.n_cells, self.store.n_finished() * self.run.chunk_size)

    def chunk_done(self, cells: int) -> None:
        self.bar.update(cells)
        now = time.perf_counter()
        if not self.reports or now < self.next_line:
            return
        self.next_line = now + self.interval
        done = self._cells_done()
        rate = (done - self.done_before) / max(now - self.started, 1e-9)
        eta = datetime.timedelta(seconds=round((self.run.n_cells - done) / rate)) if rate > 0 else "unknown"
        self.bar.write(f"{done:,} of {self.run.n_cells:,} cells ({done / self.run.n_cells:.1%}) written, "
                       f"{rate:.1f} cells/s over {self.world} process(es), ETA {eta}")

    def close(self) -> None:
        self.bar.close()


def _plan(store: EmbeddingStore, run: _Run, settings: dict[str, Any], rank: int, world: int, overwrite: bool
          ) -> list[int] | None:
    """The chunks still to do ([] for none left, None for a store finished before this run), decided by the
    first process, which takes the store (lock, settings check) first; its refusal is every process's. Every
    process then holds the store's lock shared."""
    plan: dict[str, Any] | None = None
    if rank == 0:
        try:
            store.claim()
            try:
                fresh = store.start(settings, n_cells=run.n_cells, width=run.model.config.hidden_size,
                                    chunk_size=run.chunk_size, sources=[s.name for s in run.sources],
                                    overwrite=overwrite)
            except BaseException:
                store.release()
                raise
            if fresh:
                store.share()  # before the others take it shared too
                finished = store.finished_chunks()
                plan = {"todo": [k for k in range(run.n_chunks) if k not in finished]}
            else:
                store.release()
                plan = {"todo": None}
        except (ValueError, OSError) as err:
            _share({"error": (type(err).__name__, str(err))}, rank, world)
            raise
    plan = _share(plan, rank, world)
    if "error" in plan:
        raise _ERRORS.get(plan["error"][0], RuntimeError)(plan["error"][1])
    if rank != 0 and plan["todo"] is not None:
        store.share()
    return plan["todo"]


def _finish(store: EmbeddingStore, run: _Run, settings: dict[str, Any]) -> dict[str, Any]:
    """On the first process, once every chunk is written: the run's parameters and summary, into the store."""
    from .. import __version__

    done = store.finished_chunks()
    missing = [k for k in range(run.n_chunks) if k not in done]
    if missing:
        raise RuntimeError(f"chunks {missing[:10]} of {store.path} have no marker after every process ended.")
    totals = {name: sum(c[name] for c in done.values()) for name in ("cells", "n_genes", "n_expressed", "empty")}
    params = {
        **settings,
        "n_cells_empty": totals["empty"],
        "vocabulary_coverage": totals["n_genes"] / max(1, totals["n_expressed"]),
        "device": str(run.device),
        "scgpt_hf_version": str(__version__),
    }
    store.finish(params)
    return params


def embed_to_store(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    model: Any,
    tokenizer: Any = None,
    *,
    options: SourceOptions | None = None,
    key_added: str = DEFAULT_KEY,
    batch_size: int = 64,
    max_length: int = 1200,
    seed: int = 0,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    precision: str = "auto",
    max_tokens: int | None | str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Embed every cell of `inputs` (.h5ad files, AnnData .zarr stores, TileDB-SOMA experiments) into the
    embedding store `output` (a ``.zarr`` folder, see `scgpt_hf.atlas.store`); returns the store's parameters.

    Under ``torchrun`` (or any initialised process group) every process takes its share of the chunks. A
    killed run, rerun with the same arguments, continues from its finished chunks; a finished one returns at
    once; a store started with other settings (model, weights, tokenizer, seed, inputs, chunk size,
    precision) is refused, naming them, unless `overwrite` starts it over. Another run writing the store at
    the same time makes this one refuse.

    Args are those of `scgpt_hf.embed` (`model`, `tokenizer`, `key_added`, `batch_size`, `max_length`,
    `seed`, `device`, `precision`, `max_tokens`, `progress`), plus `options` (which matrix and gene names;
    SOMA measurement, X layer, var column and obs filter) and `chunk_size` (cells per chunk: the unit of
    work, of resumption and of the store's chunks).
    """
    check_embedding_key(key_added)
    _check_apart(inputs, output)
    if int(chunk_size) < 1 or int(batch_size) < 1 or int(max_length) < 2:
        raise ValueError(f"chunk_size and batch_size must be positive and max_length at least 2, got {chunk_size}, "
                         f"{batch_size}, {max_length}.")
    _cap_malloc_arenas()
    target = _process_device(pick_device(device))
    with _process_group(target) as (rank, world):
        return _embed_all(inputs, EmbeddingStore(output, key_added), model, tokenizer, target, rank, world,
                          options=options, batch_size=batch_size, max_length=max_length, seed=seed,
                          chunk_size=chunk_size, precision=precision, max_tokens=max_tokens, progress=progress,
                          overwrite=overwrite)


def _process_device(target: torch.device) -> torch.device:
    """This process's GPU under a launcher (`torchrun`, `accelerate launch`): the one of its local rank, or the
    only one it sees (launchers that bind one GPU to each process, which cannot be told from several processes
    sharing one GPU: both are accepted); more processes than several visible GPUs is an error."""
    if target.type != "cuda" or target.index is not None or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return target
    local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise ValueError(f"process of local rank {local_rank} sees only {visible} GPUs: start at most one process per GPU "
                     f"(--nproc_per_node {visible}), or give each process its own GPU (CUDA_VISIBLE_DEVICES).")


def _check_apart(inputs: Any, output: str | os.PathLike) -> None:
    """Refuse an output that is an input, lies inside one or holds one: the store (and --overwrite) would
    replace or write into the input before it is read."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    out = Path(output).expanduser().resolve()
    for spec in specs:
        if "://" in os.fspath(spec):
            continue
        source = Path(spec).expanduser().resolve()
        if out == source or source in out.parents or out in source.parents:
            raise ValueError(f"output {output} is an input or lies inside one, or holds one ({spec}): the store "
                             "would replace or change the input before it is read. Choose an output apart from "
                             "the inputs.")


def _embed_all(inputs: Any, store: EmbeddingStore, model: Any, tokenizer: Any, target: torch.device, rank: int,
               world: int, *, options: SourceOptions | None, batch_size: int, max_length: int, seed: int,
               chunk_size: int, precision: str, max_tokens: int | None | str, progress: bool, overwrite: bool
               ) -> dict[str, Any]:
    backbone, tokenizer, name = load_model(model, tokenizer)
    if backbone.config.needs_batch_labels:
        raise ValueError("This model takes batch labels, which embedding stores do not carry yet: embed each file "
                         "with scgpt_hf.embed(..., batch_key=...).")
    if max_tokens == "auto":
        max_tokens = DEFAULT_MAX_TOKENS.get(target.type)
    sources = open_sources(inputs, options)
    try:
        run = _Run(sources, backbone.to(target).eval(), tokenizer, target, autocast_dtype(target, precision),
                   int(chunk_size), int(max_length), int(seed), int(batch_size), max_tokens)
        settings = run.settings(store.key, name) if rank == 0 else {}
        todo = _plan(store, run, settings, rank, world, overwrite)
        if todo is None:
            return _share(store.params() if rank == 0 else None, rank, world)
        try:
            _embed_chunks(run, store, todo[rank::world], rank, world, progress)
            _barrier(world)
            params = _share(_finish(store, run, settings) if rank == 0 else None, rank, world)
        finally:
            store.release()
    finally:
        for source in sources:
            source.close()
    if params["n_cells_empty"]:
        warnings.warn(f"{params['n_cells_empty']} of {run.n_cells} cells express no gene of the model's vocabulary; "
                      f"their rows of obsm[{store.key!r}] are NaN (obs[{store.key + '_n_genes'!r}] == 0).", stacklevel=3)
    return params


def _embed_chunks(run: _Run, store: EmbeddingStore, mine: Sequence[int], rank: int, world: int, show: bool) -> None:
    bar = _Progress(run, store, mine, rank, world, show)
    try:
        for chunk in mine:
            result = run.embed_chunk(chunk)
            store.write_chunk(chunk, result["start"], result["ids"], result["sources"], result["embedding"],
                              result["n_genes"], result["counts"])
            bar.chunk_done(result["counts"]["cells"])
    finally:
        bar.close()
    logger.info("Process %d of %d wrote %d chunks into %s.", rank, world, len(mine), store.path)


_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def _cap_malloc_arenas() -> None:
    """At most 2 glibc malloc arenas for the rest of the process, as ``MALLOC_ARENA_MAX=2`` would (nothing
    where libc is not glibc). Each thread that allocates (TileDB's and Arrow's readers, torch's) otherwise gets
    an arena of its own, up to 8 per core, and every arena keeps what it once held: a run's resident memory
    then crept up with the cells it had read (TileDB-SOMA, 20,000 -> 200,000 cells: +20.8% peak RSS;
    capped: +0.4%, and lower; bench/atlas_embed.py)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass
