"""Client of an scGPT Triton repository: sends an AnnData's counts to the ``scgpt_embed`` /
``scgpt_annotate`` ensembles over gRPC or HTTP, concurrently, with timeouts and retries on transient
errors, and writes the answers into ``obsm`` / ``obs`` like :func:`scgpt_hf.embed`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)


DEFAULT_KEY = "X_scGPT"
_TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
                   "StatusCode.ABORTED"}
_TRANSIENT_HTTP = {"408", "429", "502", "503", "504"}


class TritonServerError(RuntimeError):
    """The server answered a request with an error; the message is the server's."""


class TritonUnavailableError(TritonServerError):
    """The server could not be reached (or kept failing transiently) after the retries."""


@dataclass
class _Chunk:
    rows: np.ndarray  # positions in adata
    gene_ids: np.ndarray  # [cells, n] int64, -1 padded
    counts: np.ndarray  # [cells, n] float32


def _served_batches(model_config: dict[str, Any]) -> SimpleNamespace:
    """A served model's batch settings, in the form `scgpt_hf.embed`'s batch mapping reads, so obs batch names
    and ids map, and fail, exactly as in ``embed(..., batch_key=)``."""
    params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
    return SimpleNamespace(
        needs_batch_labels=any(i["name"] == "batch_labels" for i in model_config.get("input", [])),
        num_batch_labels=int(params.get("num_batch_labels") or 0) or None,
        batch2id=json.loads(params["batch2id"]) if params.get("batch2id") else None,
    )


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
        embed_model: str = "scgpt_embed",
        annotate_model: str = "scgpt_annotate",
        vocab_model: str = "scgpt_vocab",
        labels_model: str = "scgpt_labels",
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
        m = self._module
        tensors = []
        for name, array in inputs.items():
            dtype = "BYTES" if array.dtype.kind in "OSU" else {
                np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
                np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16"}[array.dtype]
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
            ids = self.infer(self.vocab_model, {"gene_names": array}, ["gene_ids"])["gene_ids"]
            self._gene_cache[key] = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._gene_cache[key]

    # -------------------------------------------------------------- AnnData
    @staticmethod
    def _matrix(adata: Any, layer: str | None, use_raw: bool, gene_column: str | None) -> tuple[Any, list[str]]:
        if layer is not None and use_raw:
            raise ValueError("Give either layer= or use_raw=True, not both.")
        if use_raw:
            if adata.raw is None:
                raise ValueError("use_raw=True but this AnnData has no .raw.")
            matrix, var = adata.raw.X, adata.raw.var
        elif layer is not None:
            matrix, var = adata.layers[layer], adata.var
        else:
            matrix, var = adata.X, adata.var
        names = var.index.astype(str).tolist() if gene_column is None else var[gene_column].astype(str).tolist()
        return matrix, names

    def _chunks(self, matrix: Any, ids: np.ndarray, batch_size: int) -> tuple[list[_Chunk], np.ndarray]:
        """Requests of up to batch_size cells (sparse rows, matched genes only, column order) and n_genes."""
        n_obs = matrix.shape[0]
        used_cols = np.flatnonzero(ids >= 0)
        if used_cols.size == 0:
            raise ValueError("None of the dataset's genes is in the model's vocabulary (scgpt_vocab matched none).")
        col_ids = ids[used_cols]
        chunks: list[_Chunk] = []
        n_genes = np.zeros(n_obs, dtype=np.int64)
        step = 4096
        pending_rows: list[int] = []
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def flush() -> None:
            width = max(1, max(len(g) for g, _ in pending))
            g = np.full((len(pending), width), -1, dtype=np.int64)
            c = np.zeros((len(pending), width), dtype=np.float32)
            for i, (gi, ci) in enumerate(pending):
                g[i, : len(gi)], c[i, : len(ci)] = gi, ci
            chunks.append(_Chunk(np.array(pending_rows, dtype=np.int64), g, c))
            pending_rows.clear()
            pending.clear()

        for start in range(0, n_obs, step):
            block = matrix[start : start + step]
            block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            block = block[:, used_cols]
            block.sort_indices()
            if block.data.size and (block.data < 0).any():
                raise ValueError("Expression values must be non-negative (raw counts or normalised/log1p values).")
            for r in range(block.shape[0]):
                lo, hi = block.indptr[r], block.indptr[r + 1]
                vals = block.data[lo:hi]
                keep = vals != 0
                cols = block.indices[lo:hi][keep]
                if cols.size == 0:
                    continue  # no expressed vocabulary gene: NaN row, like scgpt_hf.embed
                n_genes[start + r] = cols.size
                pending_rows.append(start + r)
                pending.append((col_ids[cols], vals[keep].astype(np.float32)))
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
        return chunks, n_genes

    def _run(self, model: str, chunks: list[_Chunk], batch_ids: np.ndarray | None, outputs: Sequence[str],
             concurrency: int, progress: bool) -> Iterator[tuple[_Chunk, dict[str, np.ndarray]]]:
        def one(chunk: _Chunk) -> tuple[_Chunk, dict[str, np.ndarray]]:
            inputs = {"gene_ids": chunk.gene_ids, "counts": chunk.counts}
            if batch_ids is not None:
                inputs["batch_labels"] = batch_ids[chunk.rows].astype(np.int64).reshape(-1, 1)
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
        from ..embedding import _batch_ids

        return _batch_ids(adata, _served_batches(self.model_config(model)), batch_key, as_ids)

    def _prepare(self, adata: Any, model: str, batch_size: int | None, layer: str | None, use_raw: bool,
                 gene_column: str | None, batch_key: str | None, batch_as_ids: bool
                 ) -> tuple[list[_Chunk], np.ndarray, np.ndarray, np.ndarray | None]:
        batch_ids = self.batch_ids(adata, model, batch_key, batch_as_ids)
        matrix, names = self._matrix(adata, layer, use_raw, gene_column)
        limit = self.max_batch_size(model)
        batch_size = int(batch_size or limit or 16)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if limit and batch_size > limit:
            raise ValueError(f"batch_size={batch_size} exceeds {model}'s max_batch_size={limit}.")
        ids = self.gene_ids(names)
        chunks, n_genes = self._chunks(matrix, ids, batch_size)
        return chunks, n_genes, ids, batch_ids

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
        from ..embedding import _check_storable

        _check_storable(key_added, DEFAULT_KEY, obsm=[key_added], obs=[f"{key_added}_n_genes"])
        chunks, n_genes, ids, batches = self._prepare(adata, self.embed_model, batch_size, layer, use_raw,
                                                      gene_column, batch_key, batch_as_ids)
        out: np.ndarray | None = None
        for chunk, res in self._run(self.embed_model, chunks, batches, ["cell_embedding", "n_genes"], concurrency,
                                    progress):
            emb = res["cell_embedding"].astype(np.float32)
            if out is None:
                out = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
            out[chunk.rows] = emb
        if out is None:
            raise ValueError("No cell expresses a gene of the model's vocabulary.")
        if normalize:
            done = n_genes > 0
            out[done] /= np.linalg.norm(out[done], axis=1, keepdims=True)
        adata.obsm[key_added] = out
        adata.obs[f"{key_added}_n_genes"] = n_genes
        adata.uns[f"{key_added}_params"] = {
            "server": self.url, "protocol": self.protocol, "model": self.embed_model, "normalized": bool(normalize),
            "batch_key": batch_key, "batch_as_ids": bool(batch_as_ids),
            "n_genes_matched": int((ids >= 0).sum()), "n_genes_total": int(ids.size),
            "n_cells_empty": int((n_genes == 0).sum()),
        }
        return adata

    def labels(self) -> list[str]:
        """The served classifier's class names in output order (the columns of ``probabilities``); cached.

        The repository keeps them inside ``scgpt_labels``, so they are asked of it with one-hot logits: row i
        of the identity is labelled with class i."""
        if self._labels is None:
            outputs = self.model_config(self.annotate_model).get("output", [])
            n = int(next(o for o in outputs if o["name"] == "probabilities")["dims"][0])
            step = self.max_batch_size(self.labels_model) or n
            names: list[str] = []
            for start in range(0, n, step):
                one_hot = np.eye(n, dtype=np.float32)[start:start + step]
                names += [_text(x) for x in self.infer(self.labels_model, {"logits": one_hot}, ["label"])["label"]
                          .reshape(-1)]
            self._labels = names
        return self._labels

    def annotate(
        self,
        adata: Any,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        key_added: str = "scGPT_label",
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
        import pandas as pd

        from .. import __version__
        from ..embedding import _check_storable

        _check_storable(key_added, "scGPT_label", obsm=[f"{key_added}_probabilities"],
                        obs=[key_added, f"{key_added}_probability", f"{key_added}_n_genes"])
        if embedding_key is not None:
            _check_storable(embedding_key, DEFAULT_KEY, obsm=[embedding_key], obs=[f"{embedding_key}_n_genes"])
        chunks, n_genes, ids, batches = self._prepare(adata, self.annotate_model, batch_size, layer, use_raw,
                                                      gene_column, batch_key, batch_as_ids)
        labels = self.labels()
        code_of = {name: i for i, name in enumerate(labels)}
        codes = np.full(adata.n_obs, -1, dtype=np.int64)
        prob = np.full(adata.n_obs, np.nan, dtype=np.float32)
        probs = np.full((adata.n_obs, len(labels)), np.nan, dtype=np.float32)
        emb: np.ndarray | None = None
        wanted = ["label", "probability", "probabilities", "cell_embedding"]
        for chunk, res in self._run(self.annotate_model, chunks, batches, wanted, concurrency, progress):
            if emb is None:
                emb = np.full((adata.n_obs, res["cell_embedding"].shape[1]), np.nan, dtype=np.float32)
            codes[chunk.rows] = [code_of[_text(x)] for x in res["label"].reshape(-1)]
            prob[chunk.rows] = res["probability"].reshape(-1)
            probs[chunk.rows] = res["probabilities"]
            emb[chunk.rows] = res["cell_embedding"]
        if emb is None:
            raise ValueError("No cell expresses a gene of the model's vocabulary.")
        adata.obs[key_added] = pd.Categorical.from_codes(codes, categories=labels)
        adata.obs[f"{key_added}_probability"] = prob
        adata.obs[f"{key_added}_n_genes"] = n_genes
        adata.obsm[f"{key_added}_probabilities"] = probs
        adata.uns[f"{key_added}_params"] = {
            "server": self.url, "protocol": self.protocol, "model": self.annotate_model, "labels": labels,
            "batch_key": batch_key, "batch_as_ids": bool(batch_as_ids),
            "n_genes_matched": int((ids >= 0).sum()), "n_genes_total": int(ids.size),
            "n_cells_empty": int((n_genes == 0).sum()), "scgpt_hf_version": str(__version__),
        }
        if embedding_key is not None:
            done = n_genes > 0
            emb[done] /= np.linalg.norm(emb[done], axis=1, keepdims=True)
            adata.obsm[embedding_key] = emb
            adata.obs[f"{embedding_key}_n_genes"] = n_genes
        return adata

    def close(self) -> None:
        """Close this thread's connection."""
        client = getattr(self._local, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
