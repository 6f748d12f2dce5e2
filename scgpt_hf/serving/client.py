"""Client of an scGPT Triton repository: sends an AnnData's counts to the ``scgpt_embed`` /
``scgpt_annotate`` ensembles over gRPC or HTTP, concurrently, with timeouts and retries on transient
errors, and writes the answers into ``obsm`` / ``obs`` like :func:`scgpt_hf.embed`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..anndata_input import ExpressionInput, batch_codes, check_numeric, check_values, row_blocks, select_matrix
from ..anndata_output import (
    DEFAULT_KEY,
    DEFAULT_LABEL_KEY,
    check_annotation_key,
    check_embedding_key,
    write_annotation,
    write_embedding,
)
from ..padding import pad_rows
from .contract import (
    ANNOTATE_MODEL,
    BATCH_LABELS,
    CELL_EMBEDDING,
    COUNTS,
    EMBED_MODEL,
    GENE_IDS,
    GENE_NAMES,
    LABEL,
    LABELS_MODEL,
    LOGITS,
    N_GENES,
    PROBABILITIES,
    PROBABILITY,
    VOCAB_MODEL,
    ServedBatches,
)

logger = logging.getLogger(__name__)


_TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
                   "StatusCode.ABORTED"}
_TRANSIENT_HTTP = {"408", "429", "502", "503", "504"}
_ANNOTATE_OUTPUTS = [LABEL.name, PROBABILITY.name, PROBABILITIES.name, CELL_EMBEDDING.name]


class TritonServerError(RuntimeError):
    """The server answered a request with an error; the message is the server's."""


class TritonUnavailableError(TritonServerError):
    """The server could not be reached (or kept failing transiently) after the retries."""


@dataclass
class _Chunk:
    """One request's cells: their rows in the AnnData, and their matched genes' ids and counts, -1 / 0 padded."""

    rows: np.ndarray
    gene_ids: np.ndarray  # [cells, n] int64
    counts: np.ndarray  # [cells, n] float32


def _status(err: Exception) -> str:
    status = getattr(err, "status", None)
    return str(status() if callable(status) else status or "")


def _message(err: Exception) -> str:
    msg = getattr(err, "message", None)
    return str(msg() if callable(msg) else msg or err)


def _text(value: Any) -> str:
    """A BYTES tensor element as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonClient:
    """Client of an scGPT Triton repository (``scgpt_embed``, ``scgpt_annotate``, ``scgpt_vocab``).

    Args:
        url: ``host:port`` of the server's gRPC (default 8001) or HTTP (default 8000) endpoint.
        protocol: "grpc" or "http".
        timeout: seconds per request (network and server time together).
        retries: further tries of a request after a transient error (unreachable server, timeouts,
            overload: gRPC UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, HTTP 408/429/502/503/504).
        backoff: seconds before the first retry, doubling each time.
        embed_model, annotate_model, vocab_model, labels_model: model names in the repository.

    Errors the server answers (bad input, a failing model) raise :class:`TritonServerError` with the
    server's message at once; they are never retried.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        embed_model: str = EMBED_MODEL,
        annotate_model: str = ANNOTATE_MODEL,
        vocab_model: str = VOCAB_MODEL,
        labels_model: str = LABELS_MODEL,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}.")
        self.url = url.removeprefix("http://").removeprefix("grpc://")
        self.protocol = protocol
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.embed_model = embed_model
        self.annotate_model = annotate_model
        self.vocab_model = vocab_model
        self.labels_model = labels_model
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._local = threading.local()
        self._gene_cache: dict[str, np.ndarray] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._labels: list[str] | None = None

    # -------------------------------------------------------------- plumbing
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url)
            else:
                client = self._module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout)
            self._local.client = client
        return client

    def _transient(self, err: Exception) -> bool:
        status = _status(err)
        if status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP:
            return True
        msg = _message(err).lower()
        return isinstance(err, (ConnectionError, TimeoutError, OSError)) or any(
            s in msg for s in ("connection refused", "failed to connect", "timed out", "deadline exceeded",
                               "connection reset", "unavailable", "broken pipe"))

    def _call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a tritonclient method with retries on transient errors; server errors raise at once."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._client(), fn_name)(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - tritonclient, gevent and socket errors
                if not self._transient(err):
                    raise TritonServerError(_message(err)) from err
                if attempt == self.retries:
                    raise TritonUnavailableError(
                        f"{self.protocol} {self.url}: {_message(err)} (after {self.retries + 1} tries)") from err
                logger.warning("Triton %s (%s); retrying in %.1f s", _message(err), _status(err), delay)
                self._local.client = None  # reconnect
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One inference request: numpy inputs by name -> numpy outputs by name (with retries)."""
        from tritonclient.utils import np_to_triton_dtype

        m = self._module
        tensors = []
        for name, array in inputs.items():
            dtype = "BYTES" if array.dtype.kind == "U" else np_to_triton_dtype(array.dtype)
            if dtype is None:
                raise ValueError(f"{name}: numpy dtype {array.dtype} has no Triton data type.")
            t = m.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            tensors.append(t)
        requested = [m.InferRequestedOutput(n) for n in outputs]
        kwargs: dict[str, Any] = {"outputs": requested}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        result = self._call("infer", model, tensors, **kwargs)
        return {n: result.as_numpy(n) for n in outputs}

    def is_ready(self) -> bool:
        """True when the server is live and ready."""
        try:
            return bool(self._call("is_server_ready"))
        except TritonServerError:
            return False

    def model_config(self, model: str) -> dict[str, Any]:
        """The model's configuration as the server has it, as a dict (HTTP's JSON form; cached)."""
        if model not in self._configs:
            cfg = self._call("get_model_config", model)
            if self.protocol == "grpc":
                from google.protobuf.json_format import MessageToDict

                cfg = MessageToDict(cfg.config, preserving_proto_field_name=True)
            self._configs[model] = cfg
        return self._configs[model]

    def max_batch_size(self, model: str) -> int:
        """The model's max_batch_size from its configuration (cached)."""
        return int(self.model_config(model).get("max_batch_size", 0))

    def statistics(self, model: str = "") -> dict[str, Any]:
        """Inference statistics as a dict (the server's JSON / protobuf, normalised to dicts)."""
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(self._call("get_inference_statistics", model), preserving_proto_field_name=True)
        return self._call("get_inference_statistics", model)

    # -------------------------------------------------------------- genes
    def gene_ids(self, gene_names: Sequence[str]) -> np.ndarray:
        """Vocabulary ids of gene names (-1 where unknown), as the server's vocabulary has them; cached."""
        names = [str(n) for n in gene_names]
        key = hashlib.sha256("\x00".join(names).encode("utf-8")).hexdigest()
        if key not in self._gene_cache:
            array = np.array([n.encode("utf-8") for n in names], dtype=np.object_)
            ids = self.infer(self.vocab_model, {GENE_NAMES.name: array}, [GENE_IDS.name])[GENE_IDS.name]
            self._gene_cache[key] = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._gene_cache[key]

    # -------------------------------------------------------------- AnnData
    def _requests(self, source: ExpressionInput, ids: np.ndarray, batch_size: int) -> tuple[list[_Chunk], np.ndarray]:
        """The cells as requests of up to batch_size cells (their non-zero vocabulary genes, in column order),
        and each cell's n_genes; a cell without any is not sent (NaN row, like scgpt_hf.embed)."""
        used_cols = np.flatnonzero(ids >= 0)
        if used_cols.size == 0:
            raise ValueError("None of the dataset's genes is in the model's vocabulary (scgpt_vocab matched none).")
        check_numeric(source.matrix)
        n_genes = np.zeros(source.n_cells, dtype=np.int64)
        rows: list[int] = []
        cells: list[tuple[np.ndarray, np.ndarray]] = []
        for start, block in row_blocks(source.matrix):
            check_values(block, start, source.gene_names)
            block = block[:, used_cols]
            block.sort_indices()
            for r in range(block.shape[0]):
                values = block.data[block.indptr[r] : block.indptr[r + 1]]
                expressed = values != 0
                cols = block.indices[block.indptr[r] : block.indptr[r + 1]][expressed]
                if cols.size:
                    n_genes[start + r] = cols.size
                    rows.append(start + r)
                    cells.append((ids[used_cols[cols]], values[expressed].astype(np.float32)))
        chunks = [
            _Chunk(np.asarray(rows[i : i + batch_size], dtype=np.int64),
                   pad_rows([g for g, _ in cells[i : i + batch_size]], -1, dtype=np.int64),
                   pad_rows([c for _, c in cells[i : i + batch_size]], 0.0, dtype=np.float32))
            for i in range(0, len(cells), batch_size)
        ]
        return chunks, n_genes

    def _run(self, model: str, chunks: list[_Chunk], batch_ids: np.ndarray | None, outputs: Sequence[str],
             concurrency: int, progress: bool) -> Iterator[tuple[_Chunk, dict[str, np.ndarray]]]:
        """Send the requests, `concurrency` at a time; yields (request, answer) as they come back."""
        def one(chunk: _Chunk) -> tuple[_Chunk, dict[str, np.ndarray]]:
            inputs = {GENE_IDS.name: chunk.gene_ids, COUNTS.name: chunk.counts}
            if batch_ids is not None:
                inputs[BATCH_LABELS.name] = batch_ids[chunk.rows].astype(np.int64).reshape(-1, 1)
            return chunk, self.infer(model, inputs, outputs)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(c.rows) for c in chunks), desc=f"{model}", unit="cell")
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
                futures = [pool.submit(one, c) for c in chunks]
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        chunk, out = fut.result()
                        if bar is not None:
                            bar.update(len(chunk.rows))
                        yield chunk, out
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            if bar is not None:
                bar.close()

    def batch_ids(self, adata: Any, model: str, batch_key: str | None, as_ids: bool = False) -> np.ndarray | None:
        """Each cell's batch id for `model` from ``obs[batch_key]`` (names through the served model's batch2id;
        integer ids where it has none, or with `as_ids`), or None for a model without batch labels; raises
        ValueError, naming unknown batches, as :func:`scgpt_hf.embed` does, before anything is sent."""
        served = ServedBatches.from_model_config(self.model_config(model))
        return batch_codes(adata, batch_key, needs_batch_labels=served.needs_batch_labels,
                           num_batch_labels=served.num_batch_labels, batch2id=served.batch2id, as_ids=as_ids)

    def _prepare(self, adata: Any, model: str, batch_size: int | None, layer: str | None, use_raw: bool,
                 gene_column: str | None, batch_key: str | None, batch_as_ids: bool
                 ) -> tuple[list[_Chunk], np.ndarray, dict[str, Any], np.ndarray | None]:
        """Everything checked before the first request: (requests, n_genes, the run's parameters, batch ids)."""
        batch_ids = self.batch_ids(adata, model, batch_key, batch_as_ids)
        source = select_matrix(adata, layer, use_raw, gene_column)
        limit = self.max_batch_size(model)
        batch_size = int(batch_size or limit or 16)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if limit and batch_size > limit:
            raise ValueError(f"batch_size={batch_size} exceeds {model}'s max_batch_size={limit}.")
        ids = self.gene_ids(source.gene_names)
        chunks, n_genes = self._requests(source, ids, batch_size)
        params = {"server": self.url, "protocol": self.protocol, "model": model, "batch_key": batch_key,
                  "batch_as_ids": bool(batch_as_ids), "n_genes_matched": int((ids >= 0).sum()),
                  "n_genes_total": int(ids.size), "n_cells_empty": int((n_genes == 0).sum())}
        return chunks, n_genes, params, batch_ids

    def embed(
        self,
        adata: Any,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        key_added: str = DEFAULT_KEY,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        normalize: bool = True,
        progress: bool = False,
        batch_key: str | None = None,
        batch_as_ids: bool = False,
    ) -> Any:
        """Embed every cell of `adata` on the server; writes ``obsm[key_added]`` and ``obs[key_added + "_n_genes"]``.

        Cells with no expressed vocabulary gene are not sent and get NaN rows (n_genes 0), as in
        :func:`scgpt_hf.embed`; the others get the model's cell embedding, L2-normalised unless
        ``normalize=False``.  ``batch_size``: cells per request (default and maximum: the model's
        max_batch_size); ``concurrency``: requests in flight.  ``batch_key``: for models served with batch
        labels (e.g. a fine-tuned ``ScGPTForBatchIntegration``), the obs column of each cell's batch, as
        names of the model's batch2id (integer ids only where it has none, or with ``batch_as_ids=True``), as in
        :func:`scgpt_hf.embed`.
        """
        check_embedding_key(key_added)
        chunks, n_genes, params, batches = self._prepare(adata, self.embed_model, batch_size, layer, use_raw,
                                                         gene_column, batch_key, batch_as_ids)
        out: np.ndarray | None = None
        for chunk, res in self._run(self.embed_model, chunks, batches, [CELL_EMBEDDING.name, N_GENES.name],
                                    concurrency, progress):
            emb = res[CELL_EMBEDDING.name].astype(np.float32)
            if out is None:
                out = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
            out[chunk.rows] = emb
        if out is None:
            raise ValueError("No cell expresses a gene of the model's vocabulary.")
        write_embedding(adata, key_added, out, n_genes, {**params, "normalized": bool(normalize)}, normalize=normalize)
        return adata

    def labels(self) -> list[str]:
        """The served classifier's class names in output order (the columns of ``probabilities``); cached.

        The repository keeps them inside ``scgpt_labels``, so they are asked of it with one-hot logits: row i
        of the identity is labelled with class i."""
        if self._labels is None:
            outputs = self.model_config(self.annotate_model).get("output", [])
            n = int(next(o for o in outputs if o["name"] == PROBABILITIES.name)["dims"][0])
            step = self.max_batch_size(self.labels_model) or n
            names: list[str] = []
            for start in range(0, n, step):
                one_hot = np.eye(n, dtype=np.float32)[start:start + step]
                answer = self.infer(self.labels_model, {LOGITS.name: one_hot}, [LABEL.name])[LABEL.name]
                names += [_text(x) for x in answer.reshape(-1)]
            self._labels = names
        return self._labels

    def annotate(
        self,
        adata: Any,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        key_added: str = DEFAULT_LABEL_KEY,
        embedding_key: str | None = None,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        progress: bool = False,
        batch_key: str | None = None,
        batch_as_ids: bool = False,
    ) -> Any:
        """Predict cell types on the server (``scgpt_annotate``); ``batch_key``, ``batch_as_ids`` as in :meth:`embed`.

        Writes what :func:`scgpt_hf.annotate` writes: ``obs[key_added]`` (categorical over every class, in
        :meth:`labels` order; missing for cells with no vocabulary gene), ``obs[key_added + "_probability"]``,
        ``obs[key_added + "_n_genes"]``, ``obsm[key_added + "_probabilities"]`` (n_obs x n_classes, NaN rows
        for empty cells) and ``uns[key_added + "_params"]`` (server, model, labels, gene counts); with
        ``embedding_key``, also ``obsm[embedding_key]`` (L2-normalised cell embeddings, which the ensemble
        returns too) and ``obs[embedding_key + "_n_genes"]``.
        """
        from .. import __version__

        check_annotation_key(key_added)
        if embedding_key is not None:
            check_embedding_key(embedding_key)
        chunks, n_genes, params, batches = self._prepare(adata, self.annotate_model, batch_size, layer, use_raw,
                                                         gene_column, batch_key, batch_as_ids)
        labels = self.labels()
        answers = self._annotations(adata.n_obs, labels, self._run(self.annotate_model, chunks, batches,
                                                                  _ANNOTATE_OUTPUTS, concurrency, progress))
        params = {**params, "labels": labels, "scgpt_hf_version": str(__version__)}
        write_annotation(adata, key_added, labels=labels, codes=answers["codes"],
                         probability=answers[PROBABILITY.name], probabilities=answers[PROBABILITIES.name],
                         n_genes=n_genes, params=params)
        if embedding_key is not None:
            write_embedding(adata, embedding_key, answers[CELL_EMBEDDING.name], n_genes)
        return adata

    @staticmethod
    def _annotations(n_obs: int, labels: list[str], answers: Iterator[tuple[_Chunk, dict[str, np.ndarray]]]
                     ) -> dict[str, np.ndarray]:
        """The annotate ensemble's answers gathered per cell (label codes, probabilities, embeddings); cells
        never sent keep code -1 and NaN."""
        code_of = {name: i for i, name in enumerate(labels)}
        out = {"codes": np.full(n_obs, -1, dtype=np.int64),
               PROBABILITY.name: np.full(n_obs, np.nan, dtype=np.float32),
               PROBABILITIES.name: np.full((n_obs, len(labels)), np.nan, dtype=np.float32)}
        for chunk, res in answers:
            if CELL_EMBEDDING.name not in out:
                width = res[CELL_EMBEDDING.name].shape[1]
                out[CELL_EMBEDDING.name] = np.full((n_obs, width), np.nan, dtype=np.float32)
            out["codes"][chunk.rows] = [code_of[_text(x)] for x in res[LABEL.name].reshape(-1)]
            out[PROBABILITY.name][chunk.rows] = res[PROBABILITY.name].reshape(-1)
            out[PROBABILITIES.name][chunk.rows] = res[PROBABILITIES.name]
            out[CELL_EMBEDDING.name][chunk.rows] = res[CELL_EMBEDDING.name]
        if CELL_EMBEDDING.name not in out:
            raise ValueError("No cell expresses a gene of the model's vocabulary.")
        return out

    def close(self) -> None:
        """Close this thread's connection."""
        client = getattr(self._local, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

