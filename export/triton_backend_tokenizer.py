"""Triton python-backend model `scgpt_tokenizer`: raw counts of cells -> scGPT model inputs.

Copied by `scgpt_hf.export.triton` into ``<repository>/scgpt_tokenizer/1/model.py`` beside
``cell_encoding.py`` and ``padding.py`` (the very modules `ScGPTTokenizer` uses), ``triton_backend_common.py``
and ``vocab.json``.  Needs numpy only, so it runs in a stock Triton container's Python.

Wire format (cells are the batch dimension; each request is padded to its own longest cell):

* ``gene_ids``  INT64 [batch, n]: vocabulary ids of each cell's measured genes, in the order the
  tokens should come out (ScGPTTokenizer uses the dataset's column order); -1 marks an unused slot
  (padding, or a gene the vocabulary lacks).
* ``counts``    FP32  [batch, n]: the matching expression values (raw counts or normalised/log1p;
  binning is rank-based per cell); zeros are dropped like zero genes.

Outputs: ``input_ids`` INT64, ``values`` FP32, ``attention_mask`` INT64, all [batch, L] with
``<cls>`` first and right padding (L rounded up to ``pad_to_multiple_of``), and ``n_genes`` INT64
[batch, 1] (expressed vocabulary genes before truncation).  Identical to
``ScGPTTokenizer.encode_with_ids(..., seed=seed, cls_value=cls_value, max_length=max_length,
truncation=truncation, padding=True, pad_to_multiple_of=pad_to_multiple_of)`` for the same cells.

Errors (answered per request, the server keeps serving): shapes that differ or are not 2-D, ids the
vocabulary lacks or special tokens, a gene twice in one cell, negative / NaN / infinite values, and
a cell with no expressed vocabulary gene.
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
RequestError = common.RequestError


class TritonPythonModel:
    """scGPT tokenizer: per-cell binning, content-seeded tie-breaking, truncation and padding."""

    def initialize(self, args: dict) -> None:
        self.enc = common.load_beside(_HERE, "cell_encoding")
        self.padding = common.load_beside(_HERE, "padding")
        params = common.parameters(json.loads(args["model_config"]))
        self.n_bins = int(params["n_bins"])
        self.pad_value = float(params["pad_value"])
        self.cls_value = float(params["cls_value"])
        self.max_length = int(params["max_length"])
        self.seed = int(params["seed"])
        strategy = params.get("truncation", "random")
        self.strategy = None if strategy == "none" else strategy
        self.pad_multiple = int(params.get("pad_to_multiple_of", "1")) or 1
        self.do_binning = params.get("do_binning", "true").lower() == "true"
        self.max_genes_per_cell = int(params.get("max_genes_per_cell", "100000"))
        with open(os.path.join(_HERE, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        self.cls_id = int(vocab[params["cls_token"]])
        self.pad_id = int(vocab[params["pad_token"]])
        specials = {int(vocab[params[k]]) for k in ("pad_token", "cls_token", "eoc_token")}
        ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
        self.valid = np.zeros(int(ids.max()) + 1, dtype=bool)
        self.valid[ids] = True
        self.valid[sorted(specials)] = False

    def _encode(self, gene_ids: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        if gene_ids.ndim != 2 or counts.ndim != 2:
            raise RequestError(f"gene_ids and counts must be 2-D [cells, genes]; got shapes "
                               f"{list(gene_ids.shape)} and {list(counts.shape)}")
        if gene_ids.shape != counts.shape:
            raise RequestError(f"gene_ids {list(gene_ids.shape)} and counts {list(counts.shape)} must have "
                               "the same shape (one value per gene id; pad both with -1 / 0)")
        if gene_ids.shape[0] == 0:
            raise RequestError("the request holds no cell")
        if gene_ids.shape[1] > self.max_genes_per_cell:
            raise RequestError(f"{gene_ids.shape[1]} gene slots per cell exceed max_genes_per_cell="
                               f"{self.max_genes_per_cell}")
        if not np.isfinite(counts).all():
            raise RequestError("counts contain NaN or infinity")
        if (counts < 0).any():
            raise RequestError("counts must be non-negative (raw counts or normalised/log1p values, not "
                               "scaled data)")
        used = gene_ids[gene_ids >= 0]
        unknown = used[(used >= self.valid.size) | ~self.valid[np.minimum(used, self.valid.size - 1)]]
        if unknown.size:
            raise RequestError(f"{unknown.size} gene id(s) are not genes of the model's vocabulary, e.g. "
                               f"{np.unique(unknown)[:5].tolist()}; map gene names with the scgpt_vocab model "
                               "and send -1 for genes it does not know")
        cells = []
        for row in range(gene_ids.shape[0]):
            ids = gene_ids[row]
            present = ids[ids >= 0]
            if np.unique(present).size != present.size:
                raise RequestError(f"cell {row} lists a gene id more than once")
            tok_ids, tok_vals, n_genes = self.enc.encode_sparse_cell(
                ids, counts[row], cls_id=self.cls_id, cls_value=self.cls_value, seed=self.seed,
                strategy=self.strategy, max_length=self.max_length, n_bins=self.n_bins,
                do_binning=self.do_binning,
            )
            if n_genes == 0:
                raise RequestError(f"cell {row} expresses no gene of the model's vocabulary (all ids -1 or all "
                                   "counts 0); leave such cells out of the request")
            cells.append((tok_ids, tok_vals, n_genes))
        input_ids, values, mask = self.padding.pad_cells(
            [(i, v) for i, v, _ in cells], self.pad_id, self.pad_value, self.pad_multiple)
        n_genes = np.array([[n] for _, _, n in cells], dtype=np.int64)
        return [input_ids, values, mask, n_genes]

    def _tokenize(self, request) -> dict:
        gene_ids = common.input_array(request, "gene_ids").astype(np.int64, copy=False)
        counts = common.input_array(request, "counts").astype(np.float32, copy=False)
        return dict(zip(("input_ids", "values", "attention_mask", "n_genes"), self._encode(gene_ids, counts)))

    def execute(self, requests: list) -> list:
        return common.answer_each("scgpt_tokenizer", requests, self._tokenize)
