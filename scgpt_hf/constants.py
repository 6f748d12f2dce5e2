"""Names the command line shows before it imports anything heavy, so that ``scgpt-hf --help`` stays fast.

The modules that implement them use the same names; tests/test_imports.py checks that they agree.
"""

from __future__ import annotations

# `convert_original_checkpoint(task=...)`; the model each task builds is in `convert.TASKS`.
CONVERT_TASKS = ("pretraining", "annotation", "integration", "perturbation", "multiomic")

# `export_onnx(task=...)` and `scgpt-hf export onnx --task`: each task and what its graph returns.
EXPORT_TASKS = {
    "embedding": "backbone: cell_embedding (batch, hidden) and last_hidden_state (batch, seq, hidden)",
    "expression": "pretraining head: expression (+ zero_probs, mvc_expression, mvc_zero_probs) and cell_embedding",
    "annotation": "cell-type classification: logits (batch, num_labels) and cell_embedding (batch, hidden)",
    "integration": "batch integration: cell_embedding (the integrated representation) and batch_logits",
    "perturbation": "perturbation prediction: expression (batch, seq) after perturbing the flagged genes",
    "multiomic": "multi-omic integration: cell_embedding, expression and batch_logits over modality tokens",
}
# ONNX precisions (`export_onnx(precision=...)`) and the default validation cases as (batch, length or None).
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_VALIDATION_SHAPES: tuple[tuple[int, int | None], ...] = ((1, None), (4, None), (8, 48))
# `inference.PRECISIONS` (`embed(precision=...)`, `scgpt-hf embed/serve --precision`): autocast, "auto" by device.
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What `scgpt_hf.atlas.SourceOptions` reads from TileDB-SOMA inputs only (`--measurement`, ... on the command line).
SOMA_OPTIONS = ("measurement", "x_layer", "var_column", "obs_filter")
