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
allow ragged batches).  Each request is checked on the host as the PyTorch encoder checks it
(``triton_backend_common.encoder_cells``: ids in the vocabulary, a mask of 0s and 1s marking each cell's
tokens first, finite values, at least one token per cell, and for models with batch embeddings one
``batch_labels`` id per cell among the ``num_batch_labels`` batches, which ONNX Runtime would not reject);
the cells of the good ones are padded to the widest request with the library's ``padding.py`` (pad id, pad
value, mask 0), run as one batch, and split again.  Padding never changes a cell's outputs at its real
positions.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_HERE = os.path.dirname(os.path.abspath(__file__))
_SPEC = importlib.util.spec_from_file_location("scgpt_backend_common", os.path.join(_HERE, "triton_backend_common.py"))
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)


class TritonPythonModel:
    """ONNX Runtime session over model.onnx, batching requests of different lengths."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = common.parameters(config)
        self.pad_id = int(params["pad_token_id"])
        self.pad_value = float(params["pad_value"])
        self.vocab_size = int(params["vocab_size"])
        self.num_batch_labels = int(params.get("num_batch_labels", "0"))
        self.padding = common.load_beside(_HERE, "padding")
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
        selfcheck = common.load_beside(_HERE, "selfcheck")
        selfcheck.run(self.session, os.path.dirname(path), on_failure=params.get("self_check", "raise"))
        self.outputs = [o["name"] for o in config["output"]]
        # per-token outputs are [batch, sequence, ...]: cut back to each request's own length
        self.per_token = {o["name"] for o in config["output"] if len(o["dims"]) >= 1 and int(o["dims"][0]) == -1}

    def _cells(self, request):
        return common.encoder_cells(request, self.vocab_size, self.num_batch_labels)

    def _feed(self, good: list) -> dict[str, np.ndarray]:
        """The good requests' cells as one batch, padded to the widest request."""
        cells = [cell for _, c in good for cell in zip(c.ids, c.values)]
        width = max(c.width for _, c in good)
        ids, values, mask = self.padding.pad_cells(cells, self.pad_id, self.pad_value, length=width)
        feed = {"input_ids": ids, "values": values, "attention_mask": mask}
        if self.num_batch_labels:
            feed["batch_labels"] = np.concatenate([c.batch_labels for _, c in good])
        return feed

    def _wanted(self, requests: list, good: list) -> list[str]:
        """The outputs any good request asked for, in config order (all of them if none was named)."""
        wanted = set()
        for k, _ in good:
            try:
                wanted.update(requests[k].requested_output_names())
            except Exception:  # noqa: BLE001 - older python backends: compute everything
                wanted.update(self.outputs)
        return [n for n in self.outputs if n in wanted] or list(self.outputs)

    def execute(self, requests: list) -> list:
        responses, good = common.read_each(self.name, requests, self._cells)
        if not good:
            return responses
        try:
            names = self._wanted(requests, good)
            results = dict(zip(names, self.session.run(names, self._feed(good))))
            row = 0
            for k, cells in good:
                rows = slice(row, row + len(cells.ids))
                row = rows.stop
                parts = {name: results[name][rows][:, : cells.width] if name in self.per_token else results[name][rows]
                         for name in names}
                responses[k] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(part)) for name, part in parts.items()])
        except Exception as err:  # noqa: BLE001
            for k, _ in good:
                responses[k] = common.error(self.name, err)
        return responses
