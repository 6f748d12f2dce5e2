"""ONNX export and Triton model-repository building for scGPT models (installed as `scgpt_hf.export`)."""

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

__all__ = [
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
]
