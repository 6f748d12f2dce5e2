"""Triton python-backend model `scgpt_vocab`: gene names -> vocabulary ids (-1 where unknown).

Copied into ``<repository>/scgpt_vocab/1/model.py`` beside ``cell_encoding.py`` and ``vocab.json``;
numpy only.  Input ``gene_names`` BYTES [n] (a dataset's gene symbols, once per dataset), output
``gene_ids`` INT64 [n]: the ids ``ScGPTTokenizer.match_genes`` gives (a repeated name keeps its first
occurrence; special tokens never match).  Clients send the ids, not the names, with every batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cell_encoding():
    path = os.path.join(_HERE, "cell_encoding.py")
    spec = importlib.util.spec_from_file_location("scgpt_cell_encoding", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    """Gene-name matching against the model's vocabulary."""

    def initialize(self, args: dict) -> None:
        self.enc = _load_cell_encoding()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        with open(os.path.join(_HERE, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        self.specials = [params[k] for k in ("pad_token", "cls_token", "eoc_token")]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "gene_names").as_numpy().reshape(-1)
                names = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]
                ids, _, _ = self.enc.match_gene_names(names, self.vocab, self.specials)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("gene_ids", ids)]))
            except Exception as err:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"scgpt_vocab: {type(err).__name__}: {err}")))
        return responses
