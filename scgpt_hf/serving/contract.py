"""The serving contract of an scGPT Triton repository: model names, tensors and parameters.

Written once here and read by both sides: the repository builder (`scgpt_hf.export.triton`) writes every
``config.pbtxt`` from these names, types and parameter keys, and `TritonClient` builds its requests and
reads a served model's batches with the same ones. Standard library only, so a client or the CLI loads it
without numpy or torch.

Cells are the batch dimension of every batched model; a request pads its cells to its own widest cell.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "ANNOTATE_MODEL",
    "EMBED_MODEL",
    "ENCODER_MODEL",
    "LABELS_MODEL",
    "TOKENIZER_MODEL",
    "VOCAB_MODEL",
    "ServedBatches",
    "Tensor",
]

# Models: gene names -> ids (once per dataset); counts -> model inputs; the model; logits -> labels; and the
# two ensembles clients call.
VOCAB_MODEL = "scgpt_vocab"
TOKENIZER_MODEL = "scgpt_tokenizer"
ENCODER_MODEL = "scgpt_encoder"
LABELS_MODEL = "scgpt_labels"
EMBED_MODEL = "scgpt_embed"
ANNOTATE_MODEL = "scgpt_annotate"


@dataclass(frozen=True)
class Tensor:
    """One tensor of the contract: its name, Triton data type (``TYPE_`` left off) and dims per cell (-1: any)."""

    name: str
    data_type: str
    dims: tuple[int, ...] = (-1,)

    def sized(self, *dims: int) -> Tensor:
        """The same tensor with a model's own dims (a cell embedding's width, a classifier's classes)."""
        return replace(self, dims=tuple(int(d) for d in dims))


GENE_NAMES = Tensor("gene_names", "STRING")  # scgpt_vocab's input: a dataset's gene names
GENE_IDS = Tensor("gene_ids", "INT64")  # vocabulary ids of a cell's genes in column order, -1 = unused slot
COUNTS = Tensor("counts", "FP32")  # their expression values
BATCH_LABELS = Tensor("batch_labels", "INT64", (1,))  # each cell's batch id, for batch-label models
INPUT_IDS = Tensor("input_ids", "INT64")
VALUES = Tensor("values", "FP32")
ATTENTION_MASK = Tensor("attention_mask", "INT64")
N_GENES = Tensor("n_genes", "INT64", (1,))  # expressed vocabulary genes before truncation
CELL_EMBEDDING = Tensor("cell_embedding", "FP32")  # sized to the model's hidden size
LOGITS = Tensor("logits", "FP32")  # sized to the classes
LABEL = Tensor("label", "STRING", (1,))
PROBABILITY = Tensor("probability", "FP32", (1,))
PROBABILITIES = Tensor("probabilities", "FP32")  # sized to the classes

#: What clients send the ensembles (and batch-label models BATCH_LABELS too).
WIRE_INPUTS = (GENE_IDS, COUNTS)
#: What the tokenizer gives the encoder.
MODEL_INPUTS = (INPUT_IDS, VALUES, ATTENTION_MASK)
#: What scgpt_labels makes of logits.
LABEL_OUTPUTS = (LABEL, PROBABILITY, PROBABILITIES)

# Parameter keys of the encoder and the ensembles that name a batch-label model's batches.
NUM_BATCH_LABELS = "num_batch_labels"
BATCH2ID = "batch2id"


@dataclass(frozen=True)
class ServedBatches:
    """A served model's batches: whether it takes `batch_labels`, how many batches, and their names."""

    needs_batch_labels: bool = False
    num_batch_labels: int | None = None
    batch2id: dict[str, int] | None = None

    def parameters(self) -> dict[str, str]:
        """The config parameters that publish these batches (none for a model without batch labels)."""
        if not self.needs_batch_labels:
            return {}
        params = {NUM_BATCH_LABELS: str(int(self.num_batch_labels or 0))}
        if self.batch2id:
            by_id = dict(sorted(self.batch2id.items(), key=lambda kv: kv[1]))
            params[BATCH2ID] = json.dumps(by_id, ensure_ascii=False)
        return params

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> ServedBatches:
        """Read them from a model's configuration as the server answers it (the JSON form of ModelConfig)."""
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        return cls(
            needs_batch_labels=any(i["name"] == BATCH_LABELS.name for i in model_config.get("input", [])),
            num_batch_labels=int(params.get(NUM_BATCH_LABELS) or 0) or None,
            batch2id=json.loads(params[BATCH2ID]) if params.get(BATCH2ID) else None,
        )
