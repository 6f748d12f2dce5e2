"""ONNX export and Triton model-repository building for scGPT models (installed as `scgpt_hf.export`).

Names load on first use, so that `scgpt-hf`'s start (which registers ``export``) imports no torch.
"""

from typing import TYPE_CHECKING

from scgpt_hf.lazy_imports import lazy_exports

_EXPORTS = {
    "onnx_export": [
        "PRECISIONS",
        "TASKS",
        "ExportReport",
        "ExportValidationError",
        "OnnxInputError",
        "OnnxModelError",
        "OnnxScGPT",
        "SelfCheckError",
        "TaskSpec",
        "export_onnx",
        "read_onnx_metadata",
        "register_task",
        "vocab_sha256",
    ],
}
__all__ = _EXPORTS["onnx_export"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .onnx_export import (
        PRECISIONS,
        TASKS,
        ExportReport,
        ExportValidationError,
        OnnxInputError,
        OnnxModelError,
        OnnxScGPT,
        SelfCheckError,
        TaskSpec,
        export_onnx,
        read_onnx_metadata,
        register_task,
        vocab_sha256,
    )
