"""Triton python-backend model `scgpt_labels`: classifier logits -> cell-type label and probabilities.

Copied into ``<repository>/scgpt_labels/1/model.py`` beside ``labels.json`` (class names in logit
order) and ``triton_backend_common.py``; numpy only.  Input ``logits`` FP32 [batch, n_classes]; outputs
``label`` BYTES [batch, 1], ``probability`` FP32 [batch, 1] (of that label) and ``probabilities`` FP32
[batch, n_classes] (softmax).  Used by the ``scgpt_annotate`` ensemble.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_SPEC = importlib.util.spec_from_file_location("scgpt_backend_common", os.path.join(_HERE, "triton_backend_common.py"))
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)


class TritonPythonModel:
    """Softmax and argmax over a classifier's logits."""

    def initialize(self, args: dict) -> None:
        with open(os.path.join(_HERE, "labels.json"), encoding="utf-8") as f:
            self.labels = np.array([str(x).encode("utf-8") for x in json.load(f)], dtype=np.object_)

    def _label(self, request) -> dict:
        logits = common.input_array(request, "logits").astype(np.float64)
        if logits.ndim != 2 or logits.shape[1] != self.labels.size:
            raise common.RequestError(f"logits must be [batch, {self.labels.size}], got {list(logits.shape)}")
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
        best = probs.argmax(axis=1)
        return {"label": self.labels[best].reshape(-1, 1),
                "probability": probs[np.arange(len(best)), best].reshape(-1, 1),
                "probabilities": probs}

    def execute(self, requests: list) -> list:
        return common.answer_each("scgpt_labels", requests, self._label)
