"""Triton python-backend model `scgpt_labels`: classifier logits -> cell-type label and probabilities.

Copied into ``<repository>/scgpt_labels/1/model.py`` beside ``labels.json`` (class names in logit
order); numpy only.  Input ``logits`` FP32 [batch, n_classes]; outputs ``label`` BYTES [batch, 1],
``probability`` FP32 [batch, 1] (of that label) and ``probabilities`` FP32 [batch, n_classes]
(softmax).  Used by the ``scgpt_annotate`` ensemble.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel:
    """Softmax and argmax over a classifier's logits."""

    def initialize(self, args: dict) -> None:
        with open(os.path.join(_HERE, "labels.json"), encoding="utf-8") as f:
            self.labels = np.array([str(x).encode("utf-8") for x in json.load(f)], dtype=np.object_)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float64)
                if logits.ndim != 2 or logits.shape[1] != self.labels.size:
                    raise ValueError(f"logits must be [batch, {self.labels.size}], got {list(logits.shape)}")
                z = np.exp(logits - logits.max(axis=1, keepdims=True))
                probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
                best = probs.argmax(axis=1)
                tensors = [
                    pb_utils.Tensor("label", self.labels[best].reshape(-1, 1)),
                    pb_utils.Tensor("probability", probs[np.arange(len(best)), best].reshape(-1, 1)),
                    pb_utils.Tensor("probabilities", probs),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as err:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"scgpt_labels: {err}")))
        return responses
