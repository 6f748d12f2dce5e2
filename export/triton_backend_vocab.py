"""Triton python-backend model `scgpt_vocab`: gene names -> vocabulary ids (-1 where unknown).

Copied into ``<repository>/scgpt_vocab/1/model.py`` beside ``cell_encoding.py``,
``triton_backend_common.py`` and ``vocab.json``; numpy only.  Input ``gene_names`` BYTES [n] (a dataset's
gene symbols, once per dataset), output ``gene_ids`` INT64 [n]: the ids ``ScGPTTokenizer.match_genes``
gives (a repeated name keeps its first occurrence; special tokens never match).  Clients send the ids, not
the names, with every batch.
"""

from __future__ import annotations

import importlib.util
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_SPEC = importlib.util.spec_from_file_location("scgpt_backend_common", os.path.join(_HERE, "triton_backend_common.py"))
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)


class TritonPythonModel:
    """Gene-name matching against the model's vocabulary."""

    def initialize(self, args: dict) -> None:
        self.enc = common.load_beside(_HERE, "cell_encoding")
        params = common.parameters(json.loads(args["model_config"]))
        with open(os.path.join(_HERE, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        self.specials = [params[k] for k in ("pad_token", "cls_token", "eoc_token")]

    def _match(self, request) -> dict:
        raw = common.input_array(request, "gene_names").reshape(-1)
        names = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]
        ids, _, _ = self.enc.match_gene_names(names, self.vocab, self.specials)
        return {"gene_ids": ids}

    def execute(self, requests: list) -> list:
        return common.answer_each("scgpt_vocab", requests, self._match)
