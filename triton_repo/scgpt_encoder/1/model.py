"""Triton python-backend model serving an exported scGPT ONNX graph with ONNX Runtime (CPU servers).

Copied into ``<repository>/<model>/1/model.py`` beside ``model.onnx``.  GPU repositories use Triton's
native onnxruntime backend on the same file instead; inputs and outputs are the same.  Needs numpy
and onnxruntime in the server's Python (``pip install onnxruntime`` in the container, or a packed
environment named by ``EXECUTION_ENV_PATH``).

Loading runs the export's self-check (``selfcheck.py`` and ``selfcheck.npz`` beside this file, the
module the library uses): the graph must compute the stored cells within its precision's bound of
PyTorch's outputs on this host, or the model does not load (``self_check`` parameter "raise"; "warn"
loads it with a warning in the server log).

Dynamic batching hands ``execute`` several requests whose sequence lengths may differ (the inputs
allow ragged batches): they are padded to the longest (pad id, pad value, mask 0), run as one batch,
and split again.  Padding never changes a cell's outputs at its real positions; a cell without an
unmasked token is refused.  Models with batch embeddings also take ``batch_labels`` (one id per cell),
checked against the ``num_batch_labels`` parameter: ONNX Runtime would not reject an id the graph never
reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUTS = ("input_ids", "values", "attention_mask")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_selfcheck():
    """Import the selfcheck.py that lies beside this file (one implementation with the library)."""
    spec = importlib.util.spec_from_file_location("scgpt_selfcheck", os.path.join(_HERE, "selfcheck.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class RequestError(ValueError):
    """A request the model cannot answer; its message goes back to the client."""


class TritonPythonModel:
    """ONNX Runtime session over model.onnx, batching requests of different lengths."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.pad_id = int(params["pad_token_id"])
        self.pad_value = float(params["pad_value"])
        self.vocab_size = int(params["vocab_size"])
        self.num_batch_labels = int(params.get("num_batch_labels", "0"))
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        threads = int(params.get("intra_op_num_threads", "0"))
        if threads > 0:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # No spin-waiting: the server shares its cores with the tokenizer stubs and other instances.
        so.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        _load_selfcheck().run(self.session, os.path.dirname(path), on_failure=params.get("self_check", "raise"))
        graph_inputs = [i.name for i in self.session.get_inputs()]
        self.extra_inputs = [n for n in graph_inputs if n not in INPUTS]
        self.outputs = [o["name"] for o in config["output"]]
        # per-token outputs are [batch, sequence, ...]: cut back to each request's own length
        self.per_token = {o["name"] for o in config["output"] if len(o["dims"]) >= 1 and int(o["dims"][0]) == -1}

    def _read(self, request) -> dict[str, np.ndarray]:
        arrays = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in INPUTS}
        for n in self.extra_inputs:
            arrays[n] = pb_utils.get_input_tensor_by_name(request, n).as_numpy().reshape(-1)
        ids = arrays["input_ids"]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RequestError(f"input_ids must be [batch, sequence] with sequence >= 1, got {list(ids.shape)}")
        for n in ("values", "attention_mask"):
            if arrays[n].shape != ids.shape:
                raise RequestError(f"{n} {list(arrays[n].shape)} must have the shape of input_ids {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise RequestError(f"input_ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        if not np.isin(arrays["attention_mask"], (0, 1)).all():
            raise RequestError("attention_mask must hold only 0 and 1")
        empty = np.flatnonzero(~arrays["attention_mask"].astype(bool).any(axis=1))
        if empty.size:
            raise RequestError(f"cell(s) {empty[:10].tolist()} have no unmasked token (attention_mask all 0): every "
                               "cell needs at least its <cls> token with mask 1")
        if "batch_labels" in arrays:
            labels = arrays["batch_labels"]
            if labels.shape != (ids.shape[0],):
                raise RequestError(f"batch_labels must hold one batch id per cell ({ids.shape[0]}), got {labels.size}")
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_batch_labels):
                raise RequestError(
                    f"batch_labels must lie in [0, {self.num_batch_labels}), the batches the model was trained on "
                    f"(names in the ensemble's batch2id parameter); got {labels.min()}..{labels.max()}")
        return arrays

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, dict[str, np.ndarray]]] = []
        for k, request in enumerate(requests):
            try:
                good.append((k, self._read(request)))
            except RequestError as err:
                responses[k] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {err}"))
            except Exception as err:  # noqa: BLE001
                responses[k] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {type(err).__name__}: {err}"))
        if good:
            try:
                width = max(a["input_ids"].shape[1] for _, a in good)
                total = sum(a["input_ids"].shape[0] for _, a in good)
                feed = {
                    "input_ids": np.full((total, width), self.pad_id, dtype=np.int64),
                    "values": np.full((total, width), self.pad_value, dtype=np.float32),
                    "attention_mask": np.zeros((total, width), dtype=np.int64),
                }
                row = 0
                for _, a in good:
                    b, n = a["input_ids"].shape
                    for name in INPUTS:
                        feed[name][row : row + b, :n] = a[name]
                    row += b
                for name in self.extra_inputs:
                    feed[name] = np.concatenate([a[name] for _, a in good]).astype(np.int64)
                wanted = set()
                for k, _ in good:
                    try:
                        wanted.update(requests[k].requested_output_names())
                    except Exception:  # noqa: BLE001 - older python backends: compute everything
                        wanted.update(self.outputs)
                names = [n for n in self.outputs if n in wanted] or list(self.outputs)
                results = dict(zip(names, self.session.run(names, feed)))
                row = 0
                for k, a in good:
                    b, n = a["input_ids"].shape
                    tensors = []
                    for name in names:
                        part = results[name][row : row + b]
                        if name in self.per_token:
                            part = part[:, :n]
                        tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part)))
                    responses[k] = pb_utils.InferenceResponse(output_tensors=tensors)
                    row += b
            except Exception as err:  # noqa: BLE001
                for k, _ in good:
                    responses[k] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {type(err).__name__}: {err}"))
        return responses
