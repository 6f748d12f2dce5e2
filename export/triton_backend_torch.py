"""Triton python-backend model running an scGPT model in PyTorch, on a GPU or the CPU (``scgpt-hf serve MODEL``).

Copied into ``<repository>/scgpt_encoder/1/model.py`` beside ``configuration_scgpt.py``,
``modeling_scgpt.py`` and ``inference.py`` (the library's own files, imported flat as Hub remote code is),
so the server's Python needs torch and transformers but not scgpt_hf.  Inputs and outputs are those of the
ONNX encoder: the same tokenizer model and ensembles sit in front of it and ``TritonClient`` talks to both.

Each ``execute`` receives the requests of one dynamic batch.  Their values are checked on the host (ids in
the vocabulary, masks of 0 and 1 that mark a prefix of real tokens, batch ids of the model's batches), the
cells are taken out of their requests' padding and run in length-grouped batches under a token budget
(``scgpt_hf.inference.run_cells``: no host-device synchronisation until the results are read), and the
results are split back per request.  A dynamic batch too large for the GPU's memory gets an error answer
naming the limit, and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# torch and transformers may come from the environment that started the server (TritonServer python_path),
# after this Python's own site-packages, whose numpy<2 the stub needs.
sys.path.extend(p for p in os.environ.get("SCGPT_HF_PYTHON_PATH", "").split(os.pathsep) if p)
import torch  # noqa: E402
import inference  # noqa: E402 - the library's inference.py, copied beside this file
import modeling_scgpt  # noqa: E402 - the library's modeling_scgpt.py, copied beside this file

INPUTS = ("input_ids", "values", "attention_mask")
MODEL_CLASSES = {"embedding": "ScGPTModel", "annotation": "ScGPTForCellClassification"}


class RequestError(ValueError):
    """A request the model cannot answer; its message goes back to the client."""


class TritonPythonModel:
    """An scGPT model in PyTorch on `device`, autocast to `precision`, batching cells by length."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.pad_id = int(params["pad_token_id"])
        self.pad_value = float(params["pad_value"])
        self.vocab_size = int(params["vocab_size"])
        self.num_batch_labels = int(params.get("num_batch_labels", "0"))
        self.batch_size = int(config["max_batch_size"])
        self.max_tokens = int(params["max_tokens"]) or None
        self.device = torch.device(params["device"])
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"{self.name}: device {self.device} was asked for but torch sees no CUDA GPU")
            fraction = float(params.get("gpu_memory_fraction", "0") or 0)
            if fraction:
                torch.cuda.set_per_process_memory_fraction(fraction, self.device)
        self.dtype = inference.autocast_dtype(self.device, params["precision"])
        model_class = getattr(modeling_scgpt, MODEL_CLASSES[params["task"]])
        self.model = model_class.from_pretrained(
            params["model_dir"], attn_implementation=params["attn_implementation"], dtype=torch.float32
        ).to(self.device).eval()
        self.outputs = [o["name"] for o in config["output"]]

    def _cells(self, request) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]:
        """One request's cells without their padding, after checking every value on the host."""
        arrays = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in INPUTS}
        ids, values, mask = arrays["input_ids"], arrays["values"], arrays["attention_mask"]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RequestError(f"input_ids must be [batch, sequence] with sequence >= 1, got {list(ids.shape)}")
        for name in ("values", "attention_mask"):
            if arrays[name].shape != ids.shape:
                raise RequestError(f"{name} {list(arrays[name].shape)} must have the shape of input_ids "
                                   f"{list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise RequestError(f"input_ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        if not np.isin(mask, (0, 1)).all():
            raise RequestError("attention_mask must hold only 0 and 1")
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise RequestError(f"cell {int(np.argmin(lengths))} has no token (attention_mask all 0)")
        if (mask != (np.arange(ids.shape[1]) < lengths[:, None])).any():
            raise RequestError("attention_mask must mark each cell's tokens first and its padding last (1s, then 0s)")
        if not np.isfinite(values[mask == 1]).all():
            raise RequestError("values contain NaN or infinity")
        labels = None
        if self.num_batch_labels:
            labels = pb_utils.get_input_tensor_by_name(request, "batch_labels").as_numpy().reshape(-1)
            if labels.shape != (ids.shape[0],):
                raise RequestError(f"batch_labels must hold one batch id per cell ({ids.shape[0]}), got {labels.size}")
            if labels.min() < 0 or labels.max() >= self.num_batch_labels:
                raise RequestError(
                    f"batch_labels must lie in [0, {self.num_batch_labels}), the batches the model was trained on "
                    f"(names in the ensemble's batch2id parameter); got {labels.min()}..{labels.max()}")
            labels = labels.astype(np.int64)
        return ([ids[i, :n] for i, n in enumerate(lengths)], [values[i, :n] for i, n in enumerate(lengths)], labels)

    def _predict(self, output) -> torch.Tensor:
        return torch.cat([getattr(output, name) for name in self.outputs], dim=1)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, tuple]] = []
        for k, request in enumerate(requests):
            try:
                good.append((k, self._cells(request)))
            except RequestError as err:
                responses[k] = self._error(f"{self.name}: {err}")
            except Exception as err:  # noqa: BLE001 - never take the server down with one request
                responses[k] = self._error(f"{self.name}: {type(err).__name__}: {err}")
        if not good:
            return responses
        ids = [cell for _, (i, _, _) in good for cell in i]
        vals = [cell for _, (_, v, _) in good for cell in v]
        labels = np.concatenate([lab for _, (_, _, lab) in good]) if self.num_batch_labels else None
        try:
            results = inference.run_cells(
                self.model, ids, vals, predict=self._predict, batch_size=self.batch_size, max_tokens=self.max_tokens,
                pad_id=self.pad_id, pad_value=self.pad_value, device=self.device, dtype=self.dtype, batch_ids=labels)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            message = (f"{self.name}: out of GPU memory running {len(ids)} cells ({sum(map(len, ids))} tokens) "
                       f"with a budget of {self.max_tokens} tokens per forward; send fewer or shorter cells per "
                       "request, or serve with a smaller --max-tokens")
            return [r if r is not None else self._error(message) for r in responses]
        except Exception as err:  # noqa: BLE001
            return [r if r is not None else self._error(f"{self.name}: {type(err).__name__}: {err}") for r in responses]
        widths = [int(self.model.config.num_labels if name == "logits" else self.model.config.hidden_size)
                  for name in self.outputs]
        row = 0
        for k, (cell_ids, _, _) in good:
            part = results[row : row + len(cell_ids)]
            row += len(cell_ids)
            tensors, col = [], 0
            for name, width in zip(self.outputs, widths):
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part[:, col : col + width])))
                col += width
            responses[k] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    @staticmethod
    def _error(message: str):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
