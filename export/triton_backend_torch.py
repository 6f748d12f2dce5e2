"""Triton python-backend model running an scGPT model in PyTorch, on a GPU or the CPU (``scgpt-hf serve MODEL``).

Copied into ``<repository>/scgpt_encoder/1/model.py`` beside ``configuration_scgpt.py``,
``modeling_scgpt.py``, ``inference.py`` and ``padding.py`` (the library's own files, imported flat as Hub
remote code is) and ``triton_backend_common.py``, so the server's Python needs torch and transformers but not
scgpt_hf.  Inputs and outputs are those of the ONNX encoder: the same tokenizer model and ensembles sit in
front of it and ``TritonClient`` talks to both.

Each ``execute`` receives the requests of one dynamic batch.  Their values are checked on the host as the
ONNX Runtime encoder checks them (``triton_backend_common.encoder_cells``: ids in the vocabulary, masks of 0
and 1 that mark a prefix of real tokens, finite values, batch ids of the model's batches), the
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
import triton_backend_common as common  # noqa: E402 - the backends' shared helper, copied beside this file

MODEL_CLASSES = {"embedding": "ScGPTModel", "annotation": "ScGPTForCellClassification"}


class TritonPythonModel:
    """An scGPT model in PyTorch on `device`, autocast to `precision`, batching cells by length."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = common.parameters(config)
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

    def _cells(self, request) -> common.Cells:
        return common.encoder_cells(request, self.vocab_size, self.num_batch_labels)

    def _predict(self, output) -> torch.Tensor:
        return torch.cat([getattr(output, name) for name in self.outputs], dim=1)

    def execute(self, requests: list) -> list:
        responses, good = common.read_each(self.name, requests, self._cells)
        if not good:
            return responses
        ids = [cell for _, cells in good for cell in cells.ids]
        vals = [cell for _, cells in good for cell in cells.values]
        labels = np.concatenate([cells.batch_labels for _, cells in good]) if self.num_batch_labels else None
        try:
            results = inference.run_cells(
                self.model, ids, vals, predict=self._predict, batch_size=self.batch_size, max_tokens=self.max_tokens,
                pad_id=self.pad_id, pad_value=self.pad_value, device=self.device, dtype=self.dtype, batch_ids=labels)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            message = (f"out of GPU memory running {len(ids)} cells ({sum(map(len, ids))} tokens) "
                       f"with a budget of {self.max_tokens} tokens per forward; send fewer or shorter cells per "
                       "request, or serve with a smaller --max-tokens")
            oom = common.RequestError(message)
            return [r if r is not None else common.error(self.name, oom) for r in responses]
        except Exception as err:  # noqa: BLE001
            return [r if r is not None else common.error(self.name, err) for r in responses]
        widths = [int(self.model.config.num_labels if name == "logits" else self.model.config.hidden_size)
                  for name in self.outputs]
        row = 0
        for k, cells in good:
            part = results[row : row + len(cells.ids)]
            row += len(cells.ids)
            tensors, col = [], 0
            for name, width in zip(self.outputs, widths):
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part[:, col : col + width])))
                col += width
            responses[k] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
