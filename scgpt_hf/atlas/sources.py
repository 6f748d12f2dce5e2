"""Cells from many places behind one interface: .h5ad files and AnnData zarr stores read backed, and
TileDB-SOMA experiments (local folders or URIs, through the optional ``tiledbsoma``).

A :class:`CellSource` knows how many cells it holds, their ids, one gene name per column, and reads any
range of its rows as bounded CSR blocks, so a run over millions of cells holds one block at a time.

* AnnData sources (``.h5ad`` files, ``.zarr`` stores) choose their matrix with
  :func:`scgpt_hf.anndata_input.select_matrix` (X, a layer or ``raw``; gene names from ``var_names`` or a
  ``var`` column) over the stored groups and read rows with :func:`~scgpt_hf.anndata_input.row_blocks`;
  ``obs`` is never loaded, only the slices of its index that are asked for. Cell ids are ``obs_names``.
* SOMA sources read one measurement's X layer (Census defaults: measurement ``RNA``, layer ``raw``, gene
  symbols in var column ``feature_name``) for the cells an optional obs filter selects (passed to SOMA's
  query, e.g. ``"tissue_general == 'blood'"``). Cell ids are the ``obs_id`` column that
  ``tiledbsoma.io.from_anndata`` writes, or ``soma_joinid`` where there is none (as in the Census).

Names that do not exist (measurement, layer, gene column, filter columns) are errors listing what does. A
source that cannot be read in the middle of a run (deleted, truncated, corrupt) raises `SourceError`
naming the source and the rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..anndata_input import SPARSE_BLOCK_ROWS, check_numeric, row_blocks, select_matrix
from ..constants import SOMA_OPTIONS

__all__ = ["CellSource", "SourceError", "SourceOptions", "open_source", "open_sources"]


class SourceError(OSError):
    """A source could not be read (gone, changed or corrupt) during a run."""


#: What a SOMA source reads unless told otherwise: the CELLxGENE Census layout.
SOMA_DEFAULTS = {"measurement": "RNA", "x_layer": "raw", "var_column": "feature_name"}
#: Selected cells between two entries of a SOMA source's index of soma_joinids (see `SomaSource`).
SOMA_INDEX_STEP = 2048
_ANNDATA_OPTIONS = ("layer", "use_raw", "gene_column")


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Which matrix and gene names to read: `layer`/`use_raw`/`gene_column` for AnnData sources,
    `measurement`/`x_layer`/`var_column` (None: `SOMA_DEFAULTS`) and `obs_filter` for TileDB-SOMA experiments.
    Options of a kind no input is of are an error (they would be ignored)."""

    layer: str | None = None
    use_raw: bool = False
    gene_column: str | None = None
    measurement: str | None = None
    x_layer: str | None = None
    var_column: str | None = None
    obs_filter: str | None = None

    @classmethod
    def combine(cls, options: SourceOptions | None, *, layer: str | None = None, use_raw: bool = False,
                gene_column: str | None = None) -> SourceOptions:
        """`options` (None: the defaults) with a call's own AnnData keywords, so that a function taking both
        never lets one silently override the other: a keyword given and set differently in `options` is an
        error naming both values."""
        options = options or cls()
        given = {name: value for name, value in (("layer", layer), ("use_raw", use_raw), ("gene_column", gene_column))
                 if value not in (None, False)}
        for name, value in given.items():
            if getattr(options, name) not in (None, False, value):
                raise ValueError(f"{name}={value!r} contradicts source_options.{name}={getattr(options, name)!r}: "
                                 "give it in one place only.")
        return dataclasses.replace(options, **given)

    def soma(self, name: str) -> str:
        """The SOMA setting `name`, or its Census default."""
        return getattr(self, name) or SOMA_DEFAULTS[name]

    def given(self, names: Sequence[str]) -> list[str]:
        return [name for name in names if getattr(self, name) not in (None, False)]


class CellSource:
    """Cells x genes, read in row ranges. Subclasses set `name`, `kind`, `n_cells`, `gene_names`, `where`
    (which matrix), `var` (a frame of gene annotations, for suggesting a gene column) and implement
    `_ids` and `_blocks`."""

    name: str
    kind: str
    n_cells: int
    gene_names: list[str]
    where: str
    var: Any = None

    def ids(self, start: int, stop: int) -> np.ndarray:
        """The ids of cells start:stop (strings)."""
        with self._reading(start, stop, "ids"):
            return np.asarray([str(v) for v in self._ids(start, stop)], dtype=object)

    def blocks(self, start: int, stop: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first row, CSR block) over rows start:stop, each block of bounded size."""
        with self._reading(start, stop, "expression"):
            yield from self._blocks(start, stop)

    def describe(self) -> dict[str, Any]:
        """What identifies this source's cells for a store's settings check (JSON-able)."""
        genes = hashlib.sha256("\n".join(self.gene_names).encode()).hexdigest()
        return {"source": self.name, "kind": self.kind, "n_cells": int(self.n_cells), "matrix": self.where,
                "n_genes": len(self.gene_names), "genes_sha256": genes}

    @contextlib.contextmanager
    def _reading(self, start: int, stop: int, what: str) -> Iterator[None]:
        try:
            yield
        except (ValueError, TypeError, SourceError):
            raise  # bad values, named by the checks themselves
        except Exception as err:  # noqa: BLE001 - h5py, zarr and tiledbsoma raise many kinds
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise SourceError(
                f"{self.name}: cannot read the {what} of cells {start}-{stop - 1} ({type(err).__name__}: {message}); "
                "the source was removed, changed or is corrupt. Finished chunks are kept: restore the source and "
                "rerun the same command to continue."
            ) from err

    def _ids(self, start: int, stop: int) -> Sequence[Any]:
        raise NotImplementedError

    def _blocks(self, start: int, stop: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the open file or experiment."""

    def __enter__(self) -> CellSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# AnnData: .h5ad and zarr, backed


def _stored_matrix(elem: Any) -> Any:
    """A stored AnnData matrix left on disk: anndata's backed sparse dataset, or the dense array itself."""
    from anndata.io import sparse_dataset

    encoding = elem.attrs.get("encoding-type")
    if encoding in ("csr_matrix", "csc_matrix"):
        return sparse_dataset(elem, should_cache_indptr=False)  # 8 bytes a cell: read by slice instead
    if encoding is None and not hasattr(elem, "shape"):
        raise ValueError(f"{elem.name} has no anndata encoding (a file from anndata < 0.8): read it with "
                         "anndata.read_h5ad and write it again with write_h5ad/write_zarr.")
    return elem


class _StoredLayers(Mapping):
    """``layers`` of a stored AnnData, each opened on access."""

    def __init__(self, group: Any):
        self._group = group

    def __getitem__(self, name: str) -> Any:
        if self._group is None or name not in self._group:
            raise KeyError(name)
        return _stored_matrix(self._group[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._group.keys() if self._group is not None else ())

    def __len__(self) -> int:
        return len(list(iter(self)))


class _StoredAnnData:
    """The parts of an AnnData that `select_matrix` reads (X, layers, raw, var) over an open .h5ad or zarr
    group; matrices stay on disk and obs is not read."""

    def __init__(self, group: Any):
        from anndata.io import read_elem

        def stored(key: str) -> Any:  # anndata writes an absent element as one of encoding "null" to zarr
            return group[key] if key in group and group[key].attrs.get("encoding-type") != "null" else None

        self.var = read_elem(group["var"])
        self.X = None if stored("X") is None else _stored_matrix(group["X"])
        self.layers = _StoredLayers(stored("layers"))
        self.raw = None if stored("raw") is None else _StoredAnnData(group["raw"])


def _check_chunks(path: Path, matrix: Any, index: Any) -> None:
    """Refuse a zarr store whose sparse matrix or obs index lacks chunk files: zarr reads a missing chunk as
    fill values, which would be embedded as if they were the cells' data."""
    group = getattr(matrix, "group", None)  # a backed sparse matrix; a dense one may leave zero chunks unwritten
    arrays = [group[k] for k in ("data", "indices", "indptr")] if group is not None else []
    for array in [*arrays, index]:
        missing = array.nchunks - array.nchunks_initialized
        if missing:
            raise SourceError(f"{path}: {array.path} lacks {missing} of its {array.nchunks} chunks (files deleted "
                              "or a copy cut short); they would read as fill values. Restore the store or write it "
                              "again with anndata.")


def _open_old_h5ad(path: Path) -> Any:
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-format notice
        return anndata.read_h5ad(path, backed="r")


def _file_state(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced, truncated or rewritten, or a folder removed (None: gone)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino,) if path.is_dir() else (st.st_ino, st.st_size, st.st_mtime_ns)


class AnnDataSource(CellSource):
    """An .h5ad file or AnnData zarr store, read backed."""

    def __init__(self, path: Path, kind: str, options: SourceOptions):
        import h5py
        import zarr

        self.name, self.kind, self._path, self._state = str(path), kind, path, _file_state(path)
        self._file = h5py.File(path, "r") if kind == "h5ad" else zarr.open_group(str(path), mode="r")
        try:
            if "obs" not in self._file or "var" not in self._file:
                raise ValueError(f"not an AnnData {kind} (no obs/var): write it with anndata.")
            if "encoding-type" in self._file.attrs:
                stored, obs = _StoredAnnData(self._file), self._file["obs"]
                self._index = obs[obs.attrs.get("_index", "_index")]
            else:  # written by anndata < 0.8: anndata reads it backed (its obs into memory; such files are small)
                self._file.close()
                self._file = stored = _open_old_h5ad(path)
                self._index = stored.obs_names
            chosen = select_matrix(stored, options.layer, options.use_raw, options.gene_column)
            check_numeric(chosen.matrix)
            if kind == "zarr":
                _check_chunks(path, chosen.matrix, self._index)
            if self._index.shape[0] != chosen.n_cells:
                raise ValueError(f"obs has {self._index.shape[0]} cells but {chosen.where} has {chosen.n_cells} rows.")
        except ValueError as err:
            self.close()
            raise ValueError(f"{path}: {err}") from None
        except Exception:
            self.close()
            raise
        self.matrix, self.gene_names, self.where, self.var = chosen.matrix, chosen.gene_names, chosen.where, chosen.var
        self.n_cells = chosen.n_cells

    def _ids(self, start: int, stop: int) -> Sequence[Any]:
        import h5py

        index = self._index
        if isinstance(index, h5py.Dataset) and h5py.check_string_dtype(index.dtype) is not None:
            index = index.asstr()
        return index[start:stop]

    def _blocks(self, start: int, stop: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        for first, block in row_blocks(self.matrix, start, stop):
            # zarr reads a chunk file that is gone as zeros, and HDF5 reads a truncated file's missing bytes as
            # zeros: a block counts only if the source is still the one opened.
            if _file_state(self._path) != self._state:
                raise FileNotFoundError(f"{self._path} was removed or changed since the run opened it")
            self._check_chunks_read(first, block)
            yield first, block

    def _check_chunks_read(self, first: int, block: sp.csr_matrix) -> None:
        """The chunk files of a local zarr store's sparse matrix that `block` (rows from `first`) was read from
        still exist: zarr reads a chunk file removed after opening as fill values."""
        group = getattr(self.matrix, "group", None)
        if self.kind != "zarr" or group is None or not hasattr(group.store, "root"):
            return
        begin = int(group["indptr"][first])
        spans = {"indptr": (first, first + block.shape[0] + 1), "data": (begin, begin + block.nnz),
                 "indices": (begin, begin + block.nnz)}
        for name, (lo, hi) in spans.items():
            array = group[name]
            size = array.chunks[0]
            for k in range(lo // size, -(-hi // size)):
                if not (Path(array.store.root) / array.path / array.metadata.encode_chunk_key((k,))).is_file():
                    raise FileNotFoundError(f"{array.path} chunk {k} is gone")

    def close(self) -> None:
        handle = getattr(self._file, "file", self._file)  # a backed AnnData's file, an h5py file, a zarr group
        if hasattr(handle, "close"):
            handle.close()


# ----------------------------------------------------------------------------------------------
# TileDB-SOMA


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class SomaSource(CellSource):
    """One measurement of a TileDB-SOMA experiment, the cells an obs filter selects. Only every
    `SOMA_INDEX_STEP`-th selected soma_joinid is kept, and a row range's are re-read from obs, so memory does not
    grow with the cells."""

    kind = "soma"

    def __init__(self, uri: str, options: SourceOptions):
        try:
            import tiledbsoma
        except ImportError:
            raise ImportError(
                f"{uri} is a TileDB-SOMA experiment, which needs tiledbsoma: pip install 'scgpt-hf[soma]'."
            ) from None
        self.name, self.options = uri, options
        self._exp = tiledbsoma.Experiment.open(uri)
        try:
            self._open(tiledbsoma)
        except Exception:
            self.close()
            raise

    def _open(self, tiledbsoma: Any) -> None:
        o = self.options
        measurement, x_layer, var_column = o.soma("measurement"), o.soma("x_layer"), o.soma("var_column")
        measurements = list(self._exp.ms.keys())
        if measurement not in measurements:
            raise ValueError(f"{self.name} has no measurement {measurement!r}; it has {measurements} "
                             "(--measurement).")
        ms = self._exp.ms[measurement]
        layers = list(ms.X.keys())
        if x_layer not in layers:
            raise ValueError(f"{self.name}: measurement {measurement!r} has no X layer {x_layer!r}; it has "
                             f"{layers} (--x-layer).")
        columns = [c for c in ms.var.schema.names if c != "soma_joinid"]
        if var_column not in columns:
            raise ValueError(f"{self.name}: var of measurement {measurement!r} has no column {var_column!r}; "
                             f"it has {columns} (--var-column).")
        var = ms.var.read(column_names=["soma_joinid", var_column]).concat().to_pandas()
        self.gene_names = var[var_column].astype(str).tolist()
        self.var = var.drop(columns="soma_joinid")
        self._column = np.full(int(var["soma_joinid"].max()) + 1 if len(var) else 0, -1, dtype=np.int64)
        self._column[var["soma_joinid"].to_numpy()] = np.arange(len(var))
        self._x = ms.X[x_layer]
        self.where = f"ms/{measurement}/X/{x_layer}"
        obs_columns = self._exp.obs.schema.names
        self._id_column = "obs_id" if "obs_id" in obs_columns else "soma_joinid"
        if self._exp.obs.index_column_names[0] != "soma_joinid":
            raise ValueError(f"{self.name}: obs is indexed by {list(self._exp.obs.index_column_names)}, not "
                             "soma_joinid (as tiledbsoma.io and the Census write it), so its cells cannot be read "
                             "in soma_joinid ranges: write the experiment again with tiledbsoma.io.")
        self._step = SOMA_INDEX_STEP
        try:
            self._index, self.n_cells = self._index_selection()
        except tiledbsoma.SOMAError as err:
            raise ValueError(f"{self.name}: obs filter {o.obs_filter!r} failed ({_first_line(err)}); obs columns: "
                             f"{obs_columns}.") from None
        if not self.n_cells:
            raise ValueError(f"{self.name}: obs filter {o.obs_filter!r} selects no cell; check the values "
                             f"(obs columns: {obs_columns}).")

    def _selected(self, columns: Sequence[str], span: slice = slice(None)) -> Any:
        """An iterator of Arrow tables: `columns` of the cells the obs filter selects with soma_joinids in `span`
        (both ends included), in ascending soma_joinid order."""
        return self._exp.obs.read(coords=(span,), column_names=list(dict.fromkeys(columns)),
                                  value_filter=self.options.obs_filter, result_order="row-major")

    def _index_selection(self) -> tuple[np.ndarray, int]:
        """The soma_joinids of every `_step`-th (`SOMA_INDEX_STEP`) selected cell and of the last, and the number of
        selected cells, in one pass over obs: holding all of them (8 bytes a cell, 264 MB for the Census)
        would make memory grow with the cells."""
        index, n, last = [], 0, None
        for table in self._selected(["soma_joinid"]):
            joinids = table.column("soma_joinid").to_numpy()
            index.append(joinids[-n % self._step :: self._step])
            n, last = n + len(joinids), joinids[-1:] if len(joinids) else last
        if n and (n - 1) % self._step:
            index.append(last)
        return np.concatenate([*index, np.empty(0, np.int64)]), n

    def _rows(self, start: int, stop: int, columns: Sequence[str]) -> Any:
        """`columns` and soma_joinid (an Arrow table) of selected cells start:stop, re-read from obs between the
        index entries around them; another count than at opening means obs changed under the run."""
        first, last = start // self._step, min(-(-(stop - 1) // self._step), len(self._index) - 1)
        low, high = first * self._step, min(last * self._step, self.n_cells - 1)
        span = slice(int(self._index[first]), int(self._index[last]))
        try:
            table = self._selected(["soma_joinid", *columns], span).concat()
            joinids = table.column("soma_joinid")
            same = len(table) == high - low + 1 and (joinids[0].as_py(), joinids[-1].as_py()) == (span.start, span.stop)
            found = f"selects {len(table)} cells"
        except ValueError as err:  # tiledbsoma: the span is outside obs's domain, which shrank
            same, found = False, f"fails ({_first_line(err)})"
        if not same:
            raise SourceError(f"{self.name}: obs changed since the run opened it: between soma_joinids {span.start} "
                              f"and {span.stop} the obs filter {found}, not {high - low + 1}. Finished chunks are "
                              "kept: restore the experiment, or embed the changed one into a new store.")
        return table.slice(start - low, stop - start)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gene_column": self.options.soma("var_column"),
                "obs_filter": self.options.obs_filter or ""}

    def _ids(self, start: int, stop: int) -> Sequence[Any]:
        return self._rows(start, stop, [self._id_column]).column(self._id_column).to_pandas().to_numpy()

    def _blocks(self, start: int, stop: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        for first in range(start, stop, SPARSE_BLOCK_ROWS):
            joinids = self._rows(first, min(stop, first + SPARSE_BLOCK_ROWS), []).column("soma_joinid").to_numpy()
            table = self._x.read(coords=(joinids,)).tables().concat()
            rows = np.searchsorted(joinids, table.column("soma_dim_0").to_numpy())
            cols = self._column[table.column("soma_dim_1").to_numpy()]
            values = table.column("soma_data").to_numpy()
            yield first, sp.csr_matrix((values, (rows, cols)), shape=(len(joinids), len(self.gene_names)))

    def close(self) -> None:
        self._exp.close()


# ----------------------------------------------------------------------------------------------
# Opening


def _kind(spec: str) -> str:
    """'h5ad', 'zarr' or 'soma' for a path or URI; an error naming what was found otherwise."""
    if "://" in spec:
        return "soma"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input {spec} does not exist.")
    if path.is_file():
        import h5py

        if h5py.is_hdf5(path):
            return "h5ad"
        raise ValueError(f"input {spec} is a file but not HDF5: give an .h5ad file, an AnnData .zarr store or a "
                         "TileDB-SOMA experiment.")
    if (path / ".zgroup").is_file() or (path / "zarr.json").is_file():
        return "zarr"
    if (path / "__tiledb_group.tdb").exists() or (path / "__group").is_dir():
        return "soma"
    raise ValueError(f"input folder {spec} is neither an AnnData zarr store nor a TileDB-SOMA experiment.")


def open_source(spec: str | os.PathLike, options: SourceOptions | None = None) -> CellSource:
    """Open an .h5ad file, an AnnData zarr store or a TileDB-SOMA experiment (path or URI) for reading."""
    options = options or SourceOptions()
    spec = os.fspath(spec)
    kind = _kind(spec)
    if kind == "soma":
        return SomaSource(spec if "://" in spec else str(Path(spec).expanduser().absolute()), options)
    return AnnDataSource(Path(spec).expanduser().absolute(), kind, options)


def open_sources(specs: Sequence[str | os.PathLike], options: SourceOptions | None = None) -> list[CellSource]:
    """Open every input (see `open_source`); an obs filter without a SOMA input is an error, since only SOMA's
    query applies it."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise ValueError("No input given: pass .h5ad files, AnnData .zarr stores or TileDB-SOMA experiments.")
    options = options or SourceOptions()
    seen: dict[str, str] = {}
    for spec in specs:
        text = os.fspath(spec)
        where = text if "://" in text else str(Path(text).expanduser().resolve())
        if where in seen:
            raise ValueError(f"input {text} is given twice (also as {seen[where]}): its cells would be embedded "
                             "twice under the same ids. Give each input once.")
        seen[where] = text
    sources: list[CellSource] = []
    try:
        for spec in specs:
            sources.append(open_source(spec, options))
    except BaseException:
        for source in sources:
            source.close()
        raise
    kinds = {s.kind == "soma" for s in sources}
    for is_soma, names, what in ((True, SOMA_OPTIONS, "TileDB-SOMA"), (False, _ANNDATA_OPTIONS, "AnnData (.h5ad, .zarr)")):
        unused = options.given(names) if is_soma not in kinds else []
        if unused:
            for source in sources:
                source.close()
            flags = ", ".join(f"{n} (--{n.replace('_', '-')})" for n in unused)
            raise ValueError(f"{flags}: for {what} inputs only, and no input is one.")
    return sources
