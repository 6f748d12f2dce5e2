"""The embedding store: a zarr folder holding only what a run computed, readable with ``anndata.read_zarr``,
written chunk by chunk so that a run killed at any moment continues where it stopped.

Layout (AnnData's zarr format: ``anndata.read_zarr(path)`` gives obs and obsm, no X):

* ``obs``: index = the cells' ids, ``source`` (categorical: the input each cell came from; ids may repeat
  across inputs, (source, id) names a cell) and ``{key}_n_genes`` (expressed vocabulary genes, 0 = NaN row);
* ``obsm/{key}``: float32 cell embeddings, L2-normalised, NaN rows for cells with no vocabulary gene;
* ``uns/{key}_params``: the run's settings (model, weights hash, tokenizer settings, seed, sources, ...) and
  summary, written when the last chunk is done: its presence marks a finished store.

Every array is chunked by the run's chunks of cells, so each process writes whole zarr chunks of its own
(zarr writes each chunk file beside and renames it into place). Beside the store, while it is unfinished,
``PATH.progress/`` holds:

* ``settings.json``: the settings the store was started with; a rerun with others refuses, naming them;
* ``chunk-NNNNNNNN.json``: a marker per finished chunk (its cell counts), written atomically after the
  chunk's data, so a rerun recomputes exactly the chunks without one: no cell missing, none twice;
* ``lock``: the first process of a run takes it exclusively (a second run, or a straggler of a killed one,
  makes it refuse), then every process of the run holds it shared until it ends (``flock``: released by
  the kernel when a process dies, so a killed run never blocks the next).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output

__all__ = ["EmbeddingStore", "SettingsMismatchError", "StoreBusyError"]

_MARKER = "chunk-{:08d}.json"
_REMOVED = ".removed-"


class StoreBusyError(OSError):
    """Another run is writing into the store."""


class SettingsMismatchError(ValueError):
    """The store was started with other settings than this run's."""


def _plain(value: Any) -> Any:
    """`value` as JSON-like Python (numpy scalars and arrays read back from zarr become ints, floats, lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _write_json(path: Path, value: Any) -> None:
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    staging.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(staging, path)


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    stored, wanted = _plain(stored), _plain(wanted)
    return [f"{k}: {stored.get(k, '(none)')!r} in the store, {wanted.get(k, '(none)')!r} now"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


class EmbeddingStore:
    """An embedding store at `path` (``*.zarr``) for embeddings under `key`."""

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path).expanduser().absolute()
        self.key = key
        self.progress = self.path.with_name(f"{self.path.name}.progress")
        self._lock_fd: int | None = None
        self._root: Any = None

    @property
    def params_name(self) -> str:
        return f"{self.key}_params"

    # ------------------------------------------------------------------ locking

    def claim(self) -> None:
        """Take the store for this run (first process), or refuse when another run has it."""
        for stale in self.path.parent.glob(f".{self.progress.name}{_REMOVED}*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while it tidied up
        self.progress.mkdir(exist_ok=True)
        fd = os.open(self.progress / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = self.progress / "owner.json"
            who = owner.read_text().strip() if owner.is_file() else "unknown"
            raise StoreBusyError(
                f"{self.path} is being written by another run ({who}); two runs cannot write one store. Wait for "
                "it to end (or stop it), then rerun this command to continue or check the store."
            ) from None
        self._lock_fd = fd
        _write_json(self.progress / "owner.json", {"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def share(self) -> None:
        """Hold the lock shared, with the run's other processes (after `claim` on the first one)."""
        if self._lock_fd is None:
            self._lock_fd = os.open(self.progress / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusyError(f"{self.path} was taken by another run while this one started.") from None

    def release(self) -> None:
        """Let go of the lock (also what the kernel does when the process dies); a progress record that records
        nothing (made by `claim` for a store that was finished, or refused, or whose creation failed) goes too."""
        if self._lock_fd is not None:
            if self.progress.is_dir() and not self._started():
                self.tidy()
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ starting

    def _started(self) -> bool:
        """Whether a run started this store: its settings are recorded and the store was created (a run killed
        or failed between the two started nothing)."""
        return (self.progress / "settings.json").is_file() and self.path.exists()

    def start(self, settings: Mapping[str, Any], *, n_cells: int, width: int, chunk_size: int,
              sources: Sequence[str], overwrite: bool = False) -> bool:
        """Prepare the store for a run with `settings` (after `claim`); False when it is already finished
        with these settings (nothing to do).

        A new store is created beside and moved into place; an unfinished one is continued; one with other
        settings is refused, naming the differences, unless `overwrite` (then it starts over).
        """
        settings = _plain(settings)
        recorded = self.progress / "settings.json"
        if overwrite:
            self._clear_markers()
            recorded.unlink(missing_ok=True)
        elif self.path.exists() and not recorded.is_file():
            self._check(self.params(), settings)
            return False
        elif self._started():
            self._check(json.loads(recorded.read_text()), settings)
        if not self._started():
            _write_json(recorded, settings)
        if overwrite or not self.path.exists():
            self._clear_markers()
            self._create(n_cells, width, chunk_size, sources, overwrite)
        return True

    def params(self) -> dict[str, Any]:
        """The parameters of a finished store (``uns[key + "_params"]``); an error for anything else."""
        from anndata.io import read_elem

        try:
            return _plain(read_elem(self._open()["uns"][self.params_name]))
        except (KeyError, OSError, ValueError):
            raise ValueError(
                f"{self.path} exists but is not a finished embedding store under key {self.key!r} and has no "
                f"progress record ({self.progress.name}): choose another output, or pass --overwrite to start over."
            ) from None
        finally:
            self._root = None

    def _check(self, stored: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        differences = _differences({k: stored.get(k) for k in settings}, settings)
        if differences:
            raise SettingsMismatchError(
                f"{self.path} was started with other settings, and one store holds one kind of embedding: "
                + "; ".join(differences)
                + ". Rerun with the store's settings to continue it, choose another output, or pass --overwrite "
                "to start over."
            )

    def _create(self, n_cells: int, width: int, chunk_size: int, sources: Sequence[str], overwrite: bool) -> None:
        import pandas as pd
        import zarr
        from anndata.io import write_elem

        with atomic_output(self.path, overwrite=overwrite, directory=True, what="output store") as staging:
            root = zarr.open_group(str(staging), mode="w", zarr_format=2)
            root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            obs = pd.DataFrame(
                {"source": pd.Categorical.from_codes(np.zeros(0, dtype=np.int64), categories=list(sources)),
                 f"{self.key}_n_genes": np.zeros(0, dtype=np.int64)},
                index=pd.Index([], dtype=object),
            )
            write_elem(root, "obs", obs, dataset_kwargs={"chunks": (chunk_size,)})
            write_elem(root, "var", pd.DataFrame(index=pd.Index([], dtype=object)))
            write_elem(root, "obsm", {self.key: np.zeros((0, width), dtype=np.float32)},
                       dataset_kwargs={"chunks": (chunk_size, width)})
            write_elem(root, "uns", {})
            for name in ("obs/_index", "obs/source/codes", f"obs/{self.key}_n_genes", f"obsm/{self.key}"):
                array = root[name]
                array.resize((n_cells, *array.shape[1:]))

    # ------------------------------------------------------------------ chunks

    def _open(self) -> Any:
        import zarr

        if self._root is None:
            self._root = zarr.open_group(str(self.path), mode="r+")
        return self._root

    def _clear_markers(self) -> None:
        for marker in self.progress.glob("chunk-*.json"):
            marker.unlink()

    def finished_chunks(self) -> dict[int, dict[str, int]]:
        """{chunk: its cell counts} of the chunks already written."""
        done = {}
        for marker in self.progress.glob("chunk-*.json"):
            done[int(marker.stem.split("-")[1])] = json.loads(marker.read_text())
        return done

    def n_finished(self) -> int:
        """How many chunks are written (all processes), for progress reports."""
        return sum(1 for _ in self.progress.glob("chunk-*.json"))

    def write_chunk(self, chunk: int, start: int, ids: np.ndarray, sources: np.ndarray, embedding: np.ndarray,
                    n_genes: np.ndarray, counts: Mapping[str, int]) -> None:
        """Write the cells start:start+len(ids) of `chunk`, then its marker (with `counts`)."""
        root = self._open()
        rows = slice(start, start + len(ids))
        codes = root["obs/source/codes"]
        root["obs/_index"][rows] = ids
        codes[rows] = sources.astype(codes.dtype)
        root[f"obs/{self.key}_n_genes"][rows] = n_genes
        root[f"obsm/{self.key}"][rows] = embedding
        _write_json(self.progress / _MARKER.format(chunk), dict(counts))

    def finish(self, params: Mapping[str, Any]) -> None:
        """Record `params` in ``uns`` (marking the store finished) and remove the progress record."""
        from anndata.io import write_elem

        write_elem(self._open()["uns"], self.params_name, dict(params))  # replaces one a killed run left
        self.tidy()

    def tidy(self) -> None:
        """Remove the progress record of a finished store (renamed first, so a kill leaves nothing half)."""
        removed = self.path.with_name(f".{self.progress.name}{_REMOVED}{uuid.uuid4().hex[:8]}")
        os.replace(self.progress, removed)
        shutil.rmtree(removed, ignore_errors=True)
