"""What every scGPT python-backend model shares; the repository builder copies it beside each ``model.py``.

numpy and Triton's ``triton_python_backend_utils`` only, like the models themselves:

* loading the other files the builder copied beside a model (`load_beside`): run as modules of their own,
  never registered in ``sys.modules``, so a model imports nothing but numpy by name;
* the config's parameters as strings (`parameters`);
* one answer per request, a bad request getting its own error and the server serving on (`RequestError`,
  `answer_each`, `read_each`, `error`);
* the encoders' request checks (`encoder_cells`), the same for the ONNX Runtime and the PyTorch encoder:
  shapes, ids in the vocabulary, a mask of 0s and 1s marking each cell's tokens first, finite values, at
  least one token per cell, batch ids of the model's batches.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils


class RequestError(ValueError):
    """A request the model cannot answer; its message goes back to the client."""


def load_beside(folder: str, name: str) -> Any:
    """Run ``name``.py from `folder` (a model's version folder) as a module and return it."""
    spec = importlib.util.spec_from_file_location(f"scgpt_{name}", os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameters(model_config: dict) -> dict[str, str]:
    """The ``parameters`` of a model's config (the JSON Triton hands ``initialize``), as strings."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def input_array(request: Any, name: str) -> np.ndarray:
    """A request's input tensor as numpy; a missing one is a request error."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"the request has no {name} input")
    return tensor.as_numpy()


def error(model: str, err: Exception) -> Any:
    """An error answer: a request error's own message, anything else as an internal error."""
    what = str(err) if isinstance(err, RequestError) else f"internal error {type(err).__name__}: {err}"
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{model}: {what}"))


def answer_each(model: str, requests: list, answer: Callable[[Any], dict[str, np.ndarray]]) -> list:
    """One response per request from ``answer(request)`` ({output name: array}), or its error."""
    responses = []
    for request in requests:
        try:
            outputs = answer(request)
        except Exception as err:  # noqa: BLE001 - never take the server down with one request
            responses.append(error(model, err))
            continue
        tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
        responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
    return responses


def read_each(model: str, requests: list, read: Callable[[Any], Any]) -> tuple[list, list[tuple[int, Any]]]:
    """Read every request of a dynamic batch: (responses, the bad ones' errors already in place; [(position,
    what ``read(request)`` gave)] of the good ones, for the model to run together)."""
    responses: list = [None] * len(requests)
    good: list[tuple[int, Any]] = []
    for k, request in enumerate(requests):
        try:
            good.append((k, read(request)))
        except Exception as err:  # noqa: BLE001
            responses[k] = error(model, err)
    return responses, good


class Cells(NamedTuple):
    """One encoder request's cells without their padding, and the width the request came with."""

    ids: list  # int64 token ids per cell
    values: list  # float32 values per cell
    batch_labels: np.ndarray | None  # one batch id per cell, for batch-label models
    width: int


def encoder_cells(request: Any, vocab_size: int, num_batch_labels: int) -> Cells:
    """Check one encoder request on the host and take its cells out of their padding."""
    ids, values, mask = (input_array(request, name) for name in ("input_ids", "values", "attention_mask"))
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise RequestError(f"input_ids must be [batch, sequence] with sequence >= 1, got {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise RequestError("the request holds no cell")
    for name, array in (("values", values), ("attention_mask", mask)):
        if array.shape != ids.shape:
            raise RequestError(f"{name} {list(array.shape)} must have the shape of input_ids {list(ids.shape)}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise RequestError(f"input_ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    if not np.isin(mask, (0, 1)).all():
        raise RequestError("attention_mask must hold only 0 and 1")
    lengths = mask.sum(axis=1)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise RequestError(f"cell(s) {empty[:10].tolist()} have no unmasked token (attention_mask all 0), and a "
                           "cell that has no token has nothing to encode: send at least its <cls> token with mask 1")
    if (mask != (np.arange(ids.shape[1]) < lengths[:, None])).any():
        raise RequestError("attention_mask must mark each cell's tokens first and its padding last (1s, then 0s)")
    if not np.isfinite(values[mask == 1]).all():
        raise RequestError("values contain NaN or infinity")
    labels = _batch_labels(request, ids.shape[0], num_batch_labels) if num_batch_labels else None
    return Cells([ids[i, :n] for i, n in enumerate(lengths)], [values[i, :n] for i, n in enumerate(lengths)], labels,
                 int(ids.shape[1]))


def _batch_labels(request: Any, n_cells: int, num_batch_labels: int) -> np.ndarray:
    labels = input_array(request, "batch_labels").reshape(-1)
    if labels.shape != (n_cells,):
        raise RequestError(f"batch_labels must hold one batch id per cell ({n_cells}), got {labels.size}")
    if labels.min() < 0 or labels.max() >= num_batch_labels:
        raise RequestError(
            f"batch_labels must lie in [0, {num_batch_labels}), the batches the model was trained on (names in "
            f"the ensemble's batch2id parameter); got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)
