"""Export scGPT models to validated, optimised ONNX graphs, and run them with ONNX Runtime.

Pipeline of :func:`export_onnx`, one function per step (every step is reported in ``export_report.json``
beside the model):

1. Load the model for the task (``embedding``: `ScGPTModel`; ``expression``: `ScGPTForPreTraining`), its
   tokenizer and gene vocabulary.
2. Export it with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with dynamic batch and
   sequence axes, attention through SDPA. The legacy TorchScript exporter is not used: it hard-codes the
   sequence length in attention reshapes.
3. Optimise, then set the precision. Fusion with onnxscript's ``optimize_for_ort``: SDPA ->
   ``MultiHeadAttention`` and Add+LayerNorm -> ``SkipLayerNormalization``. This is not optional on CPU:
   unfused, ONNX Runtime materialises each attention matrix and is slower than PyTorch (see REFERENCE.md
   section 8). In fp32 and int8 (CPU) graphs the fused attention then takes the padding mask as
   ``key_padding_mask`` (batch, sequence) instead of a (batch, 1, L, L) bias per layer; fp16 (CUDA) graphs
   keep the bias (see `_use_key_padding_mask`). Precision: ``fp32``; ``fp16`` (weights and compute in half,
   float32 inputs/outputs, meant for CUDA hosts); ``int8`` (``onnxruntime.quantization.quantize_dynamic``:
   dynamic uint8 activations, int8 weights per output channel in 7 bits, for CPU hosts; see `_to_int8`).
4. Validate: PyTorch (fp32) against ONNX Runtime on real cells (scirpy's wu2020 through the tokenizer when
   its genes match the vocabulary, else synthetic cells) at several (batch, length) shapes with padding;
   compare only non-padded positions. fp32 must agree within ``1e-4`` (max abs); fp16 / int8 cell
   embeddings need cosine >= 0.999 / 0.99 (bounds in `selfcheck`). A failing export raises
   :class:`ExportValidationError` and writes nothing.
5. Write ``metadata_props`` (config, vocabulary hash, package version, opset, task, precision, input/output
   contract, the preprocessing contract (n_bins, pad/cls values and ids, max length) and the sha256 of
   ``selfcheck.npz``: a few real cells and PyTorch's outputs for them, written beside the graph), the report,
   the config and the tokenizer.

The output folder is written beside the target and renamed into place (`scgpt_hf.atomic`): an existing
folder is replaced only with ``overwrite=True``, and a failure or a kill leaves it as it was.

:class:`OnnxScGPT` loads an exported graph with clear errors for missing, truncated or corrupted files, runs
the self-check (the stored cells must come out within the precision's bound on this host) and checks what it
is fed (names, dtypes, shapes, id ranges, cells without a real token) before ONNX Runtime sees it.

New heads register a :class:`TaskSpec` with :func:`register_task`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scgpt_hf import padding
from scgpt_hf.atomic import atomic_output, check_writable
from scgpt_hf.configuration_scgpt import ScGPTConfig
from scgpt_hf.inference import eval_mode
from scgpt_hf.constants import DEFAULT_VALIDATION_SHAPES, EXPORT_PRECISIONS, EXPORT_TASKS
from scgpt_hf.modeling_scgpt import (
    ScGPTForBatchIntegration,
    ScGPTForCellClassification,
    ScGPTForMultiOmicIntegration,
    ScGPTForPerturbationPrediction,
    ScGPTForPreTraining,
    ScGPTModel,
    ScGPTPreTrainedModel,
)

from . import selfcheck
from .selfcheck import PER_CELL_OUTPUTS, SelfCheckError

logger = logging.getLogger(__name__)

__all__ = [
    "ExportReport",
    "ExportValidationError",
    "OnnxInputError",
    "OnnxModelError",
    "OnnxScGPT",
    "PRECISIONS",
    "SelfCheckError",
    "TASKS",
    "TaskSpec",
    "export_onnx",
    "preprocessing_contract",
    "read_onnx_metadata",
    "register_task",
    "vocab_sha256",
]

MODEL_FILE = "model.onnx"
REPORT_FILE = "export_report.json"
METADATA_PREFIX = "scgpt_hf."
PRECISIONS = EXPORT_PRECISIONS
# The self-check batch: four real cells cut to these token counts (mixed, so padding is exercised). At
# whole-human size it runs in ~0.15 s, and int8 weights that saturate on AVX2 score cosine 0.92 on it
# (0.9996 once they do not), as on whole cells: short cells show it as well as long ones.
SELF_CHECK_LENGTHS = (32, 24, 16, 8)


class ExportValidationError(RuntimeError):
    """ONNX Runtime disagreed with PyTorch beyond the precision's bound; ``report`` holds the figures."""

    def __init__(self, message: str, report: ExportReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class OnnxModelError(ValueError):
    """An ONNX file is missing, truncated, corrupted or not an scgpt-hf export."""


class OnnxInputError(ValueError):
    """Inputs fed to :class:`OnnxScGPT` have the wrong names, dtypes, shapes or values."""


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class TaskSpec:
    """What one export task exports.

    Args:
        name: CLI/API task name.
        description: one line for help texts.
        load: loads the model for this task from a local folder or Hub id.
        adapt: turns a model object given by the user into the one to export (or raises with the fix).
        outputs: candidate output fields, in graph order; those the model returns as None are dropped.
        extra_inputs: config -> names of inputs beyond input_ids / values / attention_mask.
    """

    name: str
    description: str
    load: Callable[[str], nn.Module]
    adapt: Callable[[nn.Module], nn.Module]
    outputs: tuple[str, ...]
    extra_inputs: Callable[[ScGPTConfig], tuple[str, ...]] = lambda config: _batch_label_inputs(config)


def _batch_label_inputs(config: ScGPTConfig) -> tuple[str, ...]:
    needs = config.use_batch_labels or config.domain_spec_batchnorm == "dsbn"
    return ("batch_labels",) if needs else ()


def _adapt_backbone(model: nn.Module) -> nn.Module:
    if isinstance(model, ScGPTModel):
        return model
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(model, ScGPTPreTrainedModel) and isinstance(base, ScGPTModel):
        return base
    raise TypeError(
        f"task 'embedding' exports an ScGPTModel backbone; got {type(model).__name__}. Pass an ScGPTModel, a "
        "model with an scGPT backbone (e.g. ScGPTForPreTraining) or a model folder / Hub id."
    )


def _expect(model_class: type[ScGPTPreTrainedModel], task: str) -> Callable[[nn.Module], nn.Module]:
    """`adapt` for tasks that export a head as is: accept that head class only."""

    def adapt(model: nn.Module) -> nn.Module:
        if isinstance(model, model_class):
            return model
        raise TypeError(
            f"task {task!r} exports {model_class.__name__}; got {type(model).__name__}. Load it with "
            f"{model_class.__name__}.from_pretrained(...) or pass the model folder / Hub id."
        )

    return adapt


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> None:
    """Make a task exportable (`export_onnx(task=spec.name)` and the CLI's --task); heads call this as they land."""
    TASKS[spec.name] = spec


def _head_task(name: str, model_class: type[ScGPTPreTrainedModel], description: str, outputs: tuple[str, ...],
               extra_inputs: Callable[[ScGPTConfig], tuple[str, ...]] = _batch_label_inputs) -> TaskSpec:
    """A task that exports one head class as it is: loaded with that class, and only that class accepted."""
    return TaskSpec(name=name, description=description, load=model_class.from_pretrained,
                    adapt=_expect(model_class, name), outputs=outputs, extra_inputs=extra_inputs)


register_task(TaskSpec(
    name="embedding",
    description=EXPORT_TASKS["embedding"],
    load=ScGPTModel.from_pretrained,
    adapt=_adapt_backbone,
    outputs=("cell_embedding", "last_hidden_state"),
))
register_task(_head_task(
    "expression", ScGPTForPreTraining,
    EXPORT_TASKS["expression"],
    ("expression", "zero_probs", "mvc_expression", "mvc_zero_probs", "cell_embedding"),
))
register_task(_head_task(
    "annotation", ScGPTForCellClassification,
    EXPORT_TASKS["annotation"],
    ("logits", "cell_embedding"),
))
register_task(_head_task(
    "integration", ScGPTForBatchIntegration,
    EXPORT_TASKS["integration"],
    ("cell_embedding", "batch_logits"),
))
register_task(_head_task(
    "perturbation", ScGPTForPerturbationPrediction,
    EXPORT_TASKS["perturbation"],
    ("expression", "zero_probs"),
    extra_inputs=lambda config: ("perturbation_flags",),
))
register_task(_head_task(
    "multiomic", ScGPTForMultiOmicIntegration,
    EXPORT_TASKS["multiomic"],
    ("cell_embedding", "expression", "batch_logits"),
    extra_inputs=lambda config: _batch_label_inputs(config) + ("modality_ids",),
))
# Inputs with one integer per token, besides input_ids and attention_mask.
PER_TOKEN_INPUTS = ("perturbation_flags", "modality_ids")


class _ExportWrapper(nn.Module):
    """Positional inputs and a tuple of named outputs, the form the ONNX exporter needs."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(getattr(out, name) for name in self.output_names)


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class ExportReport:
    """Everything an export did and measured; written as ``export_report.json`` beside the model."""

    task: str
    precision: str
    opset: int
    model_path: str
    source: str
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    fusion_rewrites: dict[str, int] = field(default_factory=dict)
    fused_ops: dict[str, int] = field(default_factory=dict)
    attention_inputs: dict[str, int] = field(default_factory=dict)
    ort_session_ops: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    passed: bool | None = None
    file_size: int = 0
    sha256: str = ""
    vocab_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, default=_json_default)

    def summary(self) -> str:
        """A few human-readable lines: what was fused and how validation went."""
        lines = [f"scGPT {self.task} -> {self.model_path} ({self.precision}, opset {self.opset}, "
                 f"{self.file_size / 2**20:.1f} MiB)"]
        lines.append("  inputs:  " + ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in self.inputs))
        lines.append("  outputs: " + ", ".join(f"{o['name']} {o['shape']}" for o in self.outputs))
        if self.fusion_rewrites:
            lines.append("  rewrites (onnxscript optimize_for_ort, then key_padding_mask): "
                         + ", ".join(f"{k} x{v}" for k, v in self.fusion_rewrites.items() if v))
        if self.fused_ops:
            lines.append("  fused ops in the saved graph: " + ", ".join(f"{k} x{v}" for k, v in self.fused_ops.items()))
        if self.attention_inputs:
            lines.append("  attention inputs: " + ", ".join(f"MultiHeadAttention({k}) x{v}"
                                                        for k, v in self.attention_inputs.items()))
        if self.ort_session_ops:
            lines.append("  further fused by ONNX Runtime at load: "
                         + ", ".join(f"{k} x{v}" for k, v in self.ort_session_ops.items()))
        val = self.validation
        if val.get("skipped"):
            lines.append("  validation: skipped")
        elif val:
            lines.append(f"  validation on {val.get('data')} ({val.get('criterion')}):")
            for case in val.get("cases", []):
                figures = ", ".join(
                    f"{name} max|d|={o['max_abs_diff']:.2e}" + (f" cos>={o['min_cosine']:.6f}" if "min_cosine" in o else "")
                    for name, o in case["outputs"].items()
                )
                lines.append(f"    batch {case['batch']} x len {case['length']} (padded tokens {case['padded_tokens']}): "
                             f"{figures} -> {'ok' if case['passed'] else 'FAIL'}")
            lines.append(f"  validation {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# Helpers


def vocab_sha256(vocab: Mapping[str, int]) -> str:
    """sha256 of the vocabulary sorted by token: ``json.dumps(sorted(vocab.items()))`` compact, UTF-8.

    A server computes the same from its tokenizer's vocabulary to check it feeds the ids the graph expects.
    """
    items = sorted((str(k), int(v)) for k, v in vocab.items())
    payload = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    from scgpt_hf import __version__

    out = {"scgpt_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(Exception):
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    return out


@contextlib.contextmanager
def _sdpa_attention(model: ScGPTPreTrainedModel) -> Iterator[None]:
    """Export with SDPA attention (what the fusion pass turns into MultiHeadAttention), then restore."""
    previous = model.config._attn_implementation
    if previous != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if previous != "sdpa" and previous is not None:
            model.set_attn_implementation(previous)


# Loggers of the exporter and the fusion passes, whose progress lines and hints the export silences.
EXPORTER_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "root")


@contextlib.contextmanager
def _log_level(level: int, *names: str) -> Iterator[None]:
    """Hold the named loggers at `level` for the block, then restore their own levels."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines and known-harmless warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _log_level(logging.ERROR,
                                                                                           *EXPORTER_LOGGERS):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the block's wall time under `step` (for the report's ``timings_s``) when it completes."""
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


def _session_options() -> Any:
    """ONNX Runtime session options that log errors only."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return so


# ----------------------------------------------------------------------------------------------
# Export: load -> export the graph -> optimise and set precision -> validate -> write metadata and report


def export_onnx(
    model_or_path: nn.Module | str | os.PathLike, output_dir: str | os.PathLike, *, task: str = "embedding",
    opset: int = 18, precision: str = "fp32", validate: bool = True, optimize: bool = True, tokenizer: Any = None,
    vocab: Mapping[str, int] | None = None, validation_cells: list[tuple[np.ndarray, np.ndarray]] | None = None,
    validation_shapes: Sequence[tuple[int, int | None]] = DEFAULT_VALIDATION_SHAPES,
    providers: Sequence[str] | None = None, seed: int = 0, overwrite: bool = False, verbose: bool = True,
) -> ExportReport:
    """Export an scGPT model to ``output_dir/model.onnx`` (dynamic batch and sequence), optimise and validate it.

    The folder is built beside ``output_dir`` and renamed into place once validated: a failure (or a kill)
    leaves an existing ``output_dir`` as it was, and one is replaced only with ``overwrite=True``.

    Args:
        model_or_path: a model object or a local folder / Hub id (loaded with the task's model class).
        output_dir: folder for ``model.onnx``, ``selfcheck.npz``, ``export_report.json``, ``config.json`` and the
            tokenizer files; checked for writability before any work.
        task: one of `TASKS` ("embedding", "expression", and heads registered later).
        opset: ONNX opset of the exported graph (>= 18; the dynamo exporter's floor).
        precision: "fp32", "fp16" (for CUDA hosts) or "int8" (dynamic quantisation, for CPU hosts).
        validate: compare with PyTorch on real cells; raise `ExportValidationError` if out of bounds.
        optimize: fuse attention and layer norms (leave on: unfused graphs are slow on CPU).
        tokenizer: `ScGPTTokenizer` for real validation cells and the preprocessing contract
            (default: the one saved with the model).
        vocab: gene vocabulary (token -> id) for the metadata hash when no tokenizer is available.
        validation_cells: (input_ids, values) per cell to validate and self-check on instead of wu2020 /
            synthetic cells.
        validation_shapes: (batch size, max tokens or None for the cells' own lengths) per validation case.
        providers: ONNX Runtime execution providers for validation (default CPU).
        seed: seed for the choice of validation cells and tokenizer tie-breaking.
        overwrite: replace an existing ``output_dir``.
        verbose: print what was fused and the validation figures.

    Returns:
        The `ExportReport` (also written to ``output_dir/export_report.json``).
    """
    spec = _task_spec(task, precision, opset)
    output_dir = check_writable(output_dir, overwrite=overwrite, what="ONNX export folder")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # 1. load
    model, source = _load_model(spec, model_or_path)
    config: ScGPTConfig = model.config
    tokenizer, vocab = _tokenizer_and_vocab(model, source, tokenizer, vocab)
    # 2. export the graph
    input_names = ("input_ids", "values", "attention_mask") + tuple(spec.extra_inputs(config))
    ir_model, output_names = _export_graph(model, spec.outputs, input_names, opset, timings)
    # 3. optimise and set the precision
    with _timed(timings, "fusion"):
        proto, rewrites = _optimise(ir_model, optimize, precision)
    _rename_dynamic_dims(proto, {n for n in output_names if n not in PER_CELL_OUTPUTS})
    with _timed(timings, "precision"):
        proto = _apply_precision(proto, precision)
    # 4. (cells to validate on, and PyTorch's outputs for the self-check) and 5. (metadata and report)
    cells, data = _check_cells(tokenizer, config, validation_cells, validation_shapes, seed)
    check_feed = _self_check_batch(cells, config, input_names[3:])
    check_outputs = _torch_outputs(model, check_feed, input_names, output_names)
    inputs, outputs = _io_contract(proto)
    report = ExportReport(task=task, precision=precision, opset=int(opset), model_path=str(output_dir / MODEL_FILE),
                          source=source or type(model_or_path).__name__, inputs=inputs, outputs=outputs,
                          fusion_rewrites=rewrites, vocab_sha256=vocab_sha256(vocab), versions=_versions())
    _stamp(proto, report, config, len(vocab), preprocessing_contract(config, tokenizer, task))
    with atomic_output(output_dir, overwrite=overwrite, directory=True, what="ONNX export folder") as staging:
        path = _save_with_self_check(proto, staging, check_feed, check_outputs)
        _count_ops(report, proto, path)
        if validate:
            with _timed(timings, "validation"):
                report.validation = _validate(model, path, config, input_names, output_names, precision, cells,
                                              data, validation_shapes, providers)
            report.passed = bool(report.validation["passed"])
        else:
            report.validation = {"skipped": True}
        _seal(report, path, timings, start)
        if verbose:
            print(report.summary())
        if report.passed is False:
            raise _validation_error(report, data, output_dir)
        _write_beside(staging, report, config, tokenizer)
    return report


# ----------------------------------------------------------------------------------------------
# Step 1: load the model, its tokenizer and vocabulary


def _task_spec(task: str, precision: str, opset: int) -> TaskSpec:
    """The task's spec, refusing an unknown task or precision and an opset the exporter cannot emit."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {list(PRECISIONS)}.")
    if int(opset) < 18:
        raise ValueError(f"opset {opset} is too old: torch's dynamo exporter emits opset 18 or newer.")
    return TASKS[task]


def _load_model(spec: TaskSpec, model_or_path: nn.Module | str | os.PathLike) -> tuple[nn.Module, str | None]:
    """The module the task exports, and the local folder or Hub id it came from (None when unknown)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        source = str(model_or_path)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # loading a backbone from a pretraining checkpoint lists the heads
        try:
            model = spec.load(source)
        finally:
            hf_logging.set_verbosity(verbosity)
    elif isinstance(model_or_path, nn.Module):
        model = spec.adapt(model_or_path)
        name = getattr(model, "name_or_path", "") or getattr(model_or_path, "name_or_path", "")
        source = name if name and Path(name).is_dir() else None
    else:
        raise TypeError(f"model_or_path must be a model or a folder / Hub id, got {type(model_or_path).__name__}.")
    model = spec.adapt(model)
    if model.config.domain_spec_batchnorm == "dsbn":
        raise NotImplementedError(
            "Models with domain-specific batch norm (dsbn) pick a BatchNorm per batch label with data-dependent "
            "Python control flow, which has no static ONNX graph; export is not supported for them yet."
        )
    return model, source


def _tokenizer_and_vocab(model: nn.Module, source: str | None, tokenizer: Any,
                         vocab: Mapping[str, int] | None) -> tuple[Any, dict]:
    """The tokenizer (None if there is none) and the gene vocabulary, which must belong to the model.

    The vocabulary's hash goes into the metadata so that a server can check its tokenizer; the tokenizer
    gives real validation cells and the preprocessing contract.
    """
    vocab = _load_vocab(model, source, tokenizer, vocab)
    if tokenizer is None:
        tokenizer = _load_tokenizer(source, vocab, model.config)
        if vocab is None and tokenizer is not None:
            vocab = dict(tokenizer.get_vocab())
    if vocab is None:
        raise ValueError(
            "No gene vocabulary found: the ONNX metadata records its hash so servers can check their tokenizer. "
            "Pass tokenizer=ScGPTTokenizer(...) or vocab={gene: id}, or export from a folder that holds vocab.json."
        )
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"The vocabulary has {len(vocab)} entries but the model embeds {model.config.vocab_size} "
                         "tokens: it does not belong to this model.")
    return tokenizer, vocab


def _load_vocab(model: nn.Module, source: str | None, tokenizer: Any, vocab: Mapping[str, int] | None) -> dict | None:
    """The vocabulary given, else the tokenizer's, else vocab.json in the model's folder; None when there is none."""
    if vocab is not None:
        return dict(vocab)
    if tokenizer is not None:
        return dict(tokenizer.get_vocab())
    for candidate in (source, getattr(model, "name_or_path", None)):
        if candidate and (Path(candidate) / "vocab.json").is_file():
            with open(Path(candidate) / "vocab.json") as f:
                return json.load(f)
    return None


def _load_tokenizer(source: str | None, vocab: Mapping[str, int] | None, config: ScGPTConfig) -> Any:
    """The tokenizer saved with the model, or one built from `vocab`; None when neither exists."""
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    if source is not None and (Path(source) / "vocab.json").is_file():
        return ScGPTTokenizer.from_pretrained(source)
    if source is not None and not Path(source).exists():
        with contextlib.suppress(Exception):  # Hub id without a tokenizer: validate on synthetic cells
            return ScGPTTokenizer.from_pretrained(source)
    if vocab is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "vocab.json"
            path.write_text(json.dumps(dict(vocab)))
            return ScGPTTokenizer(vocab_file=str(path), n_bins=config.n_bins, pad_value=config.pad_value,
                                  max_length=config.max_seq_len)
    return None


# ----------------------------------------------------------------------------------------------
# Step 2: export the graph


def _export_graph(model: nn.Module, candidates: Sequence[str], input_names: Sequence[str], opset: int,
                  timings: dict[str, float]) -> tuple[Any, tuple[str, ...]]:
    """Trace the model with torch's dynamo exporter, attention through SDPA, batch and sequence axes dynamic.

    Returns the ONNX IR model and its output names: those of `candidates` that this model computes.
    """
    args = _example_inputs(model.config, input_names)
    with eval_mode(model), _sdpa_attention(model), torch.no_grad():
        probe = model(**dict(zip(input_names, args)), return_dict=True)
        output_names = tuple(n for n in candidates if getattr(probe, n, None) is not None)
        wrapper = _ExportWrapper(model, input_names, output_names).eval()
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = tuple({0: batch} if n == "batch_labels" else {0: batch, 1: seq} for n in input_names)
        with _timed(timings, "torch_export"), _quiet():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=int(opset), input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes={"inputs": dynamic},
                optimize=True, verbose=False, external_data=False,
            )
    return program.model, output_names


def _example_inputs(config: ScGPTConfig, input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Two short cells to trace with, the second padded (gene ids clamped into a small vocabulary)."""
    example = {
        "input_ids": torch.tensor([[config.cls_token_id] + [1, 2, 3, 4, 5, 6, 7],
                                   [config.cls_token_id] + [8, 9, 10, 11, 12] + [config.pad_token_id] * 2]),
        "values": torch.tensor([[config.pad_value, 1, 5, 9, 2, 3, 4, 1],
                                [config.pad_value, 2, 2, 7, 1, 1, config.pad_value, config.pad_value]]),
        "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2]),
        "batch_labels": torch.tensor([0, min(1, (config.num_batch_labels or 1) - 1)]),
    }
    example["input_ids"] = example["input_ids"].clamp(max=config.vocab_size - 1)
    for name in PER_TOKEN_INPUTS:
        if name in input_names:
            example[name] = torch.from_numpy(_token_ids_for(name, example["attention_mask"].numpy(), config))
    return tuple(example[n] for n in input_names)


def _token_ids_for(name: str, mask: np.ndarray, config: ScGPTConfig) -> np.ndarray:
    """Example per-token ids (tracing, validation): perturbation flags on every third gene, modalities in turn."""
    positions = np.broadcast_to(np.arange(mask.shape[1]), mask.shape)
    if name == "perturbation_flags":
        ids, pad = (positions % 3 == 1).astype(np.int64), config.pert_pad_id
    else:
        pad = config.modality_pad_id
        real = np.array([m for m in range(config.modality_vocab_size) if m != pad], dtype=np.int64)
        ids = real[positions % len(real)]
    return np.where(mask == 1, ids, pad).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Step 3: optimise and set the precision


def _optimise(ir_model: Any, optimize: bool, precision: str) -> tuple[Any, dict[str, int]]:
    """Fuse attention and layer norms for ONNX Runtime; returns the graph as a ModelProto and the rewrite counts.

    CPU graphs (fp32, int8) then feed fused attention the 2-D padding mask (`_use_key_padding_mask`).
    """
    import onnx_ir as ir

    rewrites: dict[str, int] = {}
    if optimize:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        with _quiet():
            ir_model, rewrites = optimize_for_ort(ir_model)
        rewrites = {k: int(v) for k, v in rewrites.items() if v}
        if precision != "fp16":
            rewrites["key_padding_mask"] = _use_key_padding_mask(ir_model)
    return ir.serde.serialize_model(ir_model), rewrites


# Inputs of com.microsoft MultiHeadAttention, in order.
MHA_INPUTS = ("query", "key", "value", "bias", "key_padding_mask", "attention_bias", "past_key", "past_value")


def _graph_inputs_feeding(value: Any) -> set[str]:
    """Names of the graph inputs whose data (not only their shape) flows into `value`."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            found.add(v.name)
        node = v.producer()
        if node is not None and node.op_type != "Shape":
            stack.extend(node.inputs)
    return found


def _use_key_padding_mask(ir_model: Any) -> int:
    """Feed fused attention the 2-D padding mask (``key_padding_mask``) instead of a (batch, 1, L, L) float bias.

    The fusion hands MultiHeadAttention the additive bias that `create_bidirectional_mask` builds from
    ``attention_mask``, expanded per layer: batch x L x L floats per layer (0.37 GB each at batch 64 x 1,200
    tokens), which ONNX Runtime materialises and copies into every attention call. Exported graphs take no
    generative mask, so that bias is key padding only (0 at real keys, a large negative value at padded keys,
    the same for every query); a bias fed
    by no graph input but ``attention_mask`` is swapped for ``Cast(attention_mask, int32)``, which
    MultiHeadAttention applies itself. Validation then checks the values against PyTorch on padded batches.

    CPU graphs only: on CUDA a 2-D key padding mask sends MultiHeadAttention to its unfused kernel, while the
    bias still gets the memory-efficient one when the length is a multiple of 8 (fp16; Triton pads to 64).
    Returns the count of nodes changed.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    padding, bias = MHA_INPUTS.index("key_padding_mask"), MHA_INPUTS.index("attention_bias")
    graph = ir_model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    attention = [node for node in graph
                 if node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft" and len(node.inputs) > bias
                 and node.inputs[padding] is None and node.inputs[bias] is not None
                 and _graph_inputs_feeding(node.inputs[bias]) == {"attention_mask"}]
    if mask is None or not attention:
        return 0
    cast = ir.node("Cast", [mask], {"to": ir.DataType.INT32}, name="key_padding_mask")
    cast.outputs[0].name = "key_padding_mask"
    graph.insert_before(graph.node(0), cast)
    for node in attention:
        node.replace_input_with(padding, cast.outputs[0])
        node.replace_input_with(bias, None)
    RemoveUnusedNodesPass()(ir_model)
    return len(attention)


def _rename_dynamic_dims(model: Any, per_token: set[str]) -> None:
    """Name the dynamic axes 'batch' and 'sequence' on every graph input and output."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if axis == 0:
                dim.dim_param = "batch"
            elif axis == 1 and (vi.name in per_token or vi.name in {"input_ids", "values", "attention_mask"}):
                dim.dim_param = "sequence"


def _apply_precision(proto: Any, precision: str) -> Any:
    """The graph in `precision`: fp32 as it is, fp16 for CUDA hosts, int8 (dynamic quantisation) for CPU hosts."""
    import onnx

    if precision == "fp16":
        return _to_fp16(proto)
    if precision == "int8":
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            _save(proto, fp32_path)
            _to_int8(fp32_path, int8_path)
            return onnx.load(str(int8_path))
    return proto


def _to_fp16(model: Any) -> Any:
    """Weights and compute in half, inputs and outputs kept float32 so clients feed the same arrays."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        return convert_float_to_float16(model, keep_io_types=True)


def _to_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation whose integer products are exact on every x86-64 CPU.

    ONNX Runtime multiplies uint8 activations by int8 weights. On AVX2 and AVX-512 CPUs without VNNI its
    kernel (VPMADDUBSW) adds pairs of products into 16 bits and saturates: 2 x 255 x 127 overflows, and at
    whole-human width the cell embeddings fell to cosine 0.94 while the same graph scored 0.9996 on a VNNI
    CPU. Weights in 7 bits (``reduce_range``: [-64, 63], so a pair sums to at most 2 x 255 x 64 = 32,640)
    never saturate, so every x86 kernel (AVX2, AVX-512, VNNI, AMX) computes the same exact integer products
    and one graph holds its bound everywhere; one scale per output channel (``per_channel``) wins back the
    lost bit. Activations stay full-range uint8 (ONNX Runtime's dynamic quantisation); MatMuls whose both
    operands are activations (attention is fused and stays float) are left float.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a pre-processing hint that does not apply here
    with _log_level(logging.ERROR, "root"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         extra_options={"MatMulConstBOnly": True})


# ----------------------------------------------------------------------------------------------
# Step 4: validate against PyTorch


def _check_cells(tokenizer: Any, config: ScGPTConfig, cells: list | None, shapes: Sequence[tuple[int, int | None]],
                 seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Cells to validate and self-check on, and what they are: given, wu2020 via the tokenizer, or synthetic.

    Enough for twice the largest validation batch (so batches mix lengths) and for the self-check.
    """
    if cells is not None:
        return cells, "given cells"
    n_needed = max(16, 2 * max(b for b, _ in shapes), len(SELF_CHECK_LENGTHS))
    real = _real_cells(tokenizer, config, n_needed, seed)
    if real is not None:
        return real, "scirpy wu2020 cells via ScGPTTokenizer"
    return _synthetic_cells(config, n_needed, seed), "synthetic cells"


def _real_cells(tokenizer: Any, config: ScGPTConfig, n_cells: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Cells of scirpy's wu2020 through the tokenizer, or None when unavailable or no gene matches."""
    if tokenizer is None:
        return None
    try:
        import anndata
        import importlib.util

        spec = importlib.util.find_spec("scirpy")
        if spec is None or not spec.submodule_search_locations:
            return None
        files = (Path(p) / "tests/data/wu2020_200_v0_11.h5ad" for p in spec.submodule_search_locations)
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = anndata.read_h5ad(path)
        rows = np.random.default_rng(seed).permutation(adata.n_obs)[:n_cells]
        # a small vocabulary matching few genes is fine for validation
        with _log_level(logging.ERROR, type(tokenizer).__module__):
            enc = tokenizer(adata[np.sort(rows)], padding=False, return_tensors=None, seed=seed,
                            max_length=config.max_seq_len, cls_value=config.pad_value)
    except (ValueError, OSError, ImportError) as err:  # no gene matches, unreadable file ...
        logger.info("real validation cells unavailable (%s); using synthetic cells", err)
        return None
    cells = [(np.asarray(i, dtype=np.int64), np.asarray(v, dtype=np.float32))
             for i, v in zip(enc["input_ids"], enc["values"]) if len(i) >= 2]
    return cells or None


def _synthetic_cells(config: ScGPTConfig, n_cells: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random cells (<cls> first, distinct non-special genes, values in the expression bins) when no real ones fit."""
    rng = np.random.default_rng(seed)
    specials = {config.pad_token_id, config.cls_token_id, config.eoc_token_id}
    genes = np.array([i for i in range(config.vocab_size) if i not in specials], dtype=np.int64)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(2, max(3, min(config.max_seq_len, len(genes) + 1))))
        ids = np.concatenate([[config.cls_token_id], rng.choice(genes, size=n - 1, replace=False)])
        vals = np.concatenate([[config.pad_value], rng.integers(1, config.n_bins, size=n - 1)]).astype(np.float32)
        cells.append((ids.astype(np.int64), vals))
    return cells


def graph_feed(cells: Sequence[tuple[np.ndarray, np.ndarray]], pad_token_id: int, pad_value: float,
               max_length: int | None = None) -> dict[str, np.ndarray]:
    """(input_ids, values) cells as a graph feed, right-padded by `scgpt_hf.padding` (cut to `max_length` tokens,
    `<cls>` kept)."""
    cells = [(i[:max_length], v[:max_length]) if max_length else (i, v) for i, v in cells]
    ids, values, mask = padding.pad_cells(cells, pad_token_id, pad_value)
    return {"input_ids": ids, "values": values, "attention_mask": mask}


def _with_extra_inputs(feed: dict[str, np.ndarray], extra_inputs: Sequence[str],
                       config: ScGPTConfig) -> dict[str, np.ndarray]:
    """Add example values for the inputs beyond input_ids / values / attention_mask: batch ids in turn, per-token ids."""
    if "batch_labels" in extra_inputs:
        feed["batch_labels"] = (np.arange(len(feed["input_ids"])) % config.num_batch_labels).astype(np.int64)
    feed.update({name: _token_ids_for(name, feed["attention_mask"], config) for name in extra_inputs
                 if name in PER_TOKEN_INPUTS})
    return feed


def _validation_batches(cells: list, config: ScGPTConfig, shapes: Sequence[tuple[int, int | None]],
                        extra_inputs: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One padded batch per (batch size, max length); cells of mixed lengths so padding is exercised."""
    order = sorted(range(len(cells)), key=lambda k: len(cells[k][0]))
    batches = []
    for n, (batch, max_len) in enumerate(shapes):
        # spread picks over the length range (shortest to longest) so each batch mixes lengths
        picks = [order[int(round(x))] for x in np.linspace(0, len(order) - 1, batch)] if batch > 1 else \
            [order[(len(order) // 2 + n) % len(order)]]
        feed = graph_feed([cells[k] for k in picks], config.pad_token_id, config.pad_value, max_len)
        batches.append(_with_extra_inputs(feed, extra_inputs, config))
    return batches


def _self_check_batch(cells: list, config: ScGPTConfig, extra_inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The self-check's padded batch: the longest cells cut to `SELF_CHECK_LENGTHS` tokens."""
    longest = sorted(cells, key=lambda c: -len(c[0]))[: len(SELF_CHECK_LENGTHS)]
    cut = [(ids[:n], vals[:n]) for (ids, vals), n in zip(longest, SELF_CHECK_LENGTHS)]
    return _with_extra_inputs(graph_feed(cut, config.pad_token_id, config.pad_value), extra_inputs, config)


def _torch_outputs(model: nn.Module, feed: Mapping[str, np.ndarray], input_names: Sequence[str],
                   output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """PyTorch's outputs (eval mode, fp32) for a padded batch."""
    with eval_mode(model), torch.no_grad():
        out = model(**{n: torch.from_numpy(feed[n]) for n in input_names}, return_dict=True)
    return {n: getattr(out, n).float().numpy() for n in output_names}


def _validate(model: nn.Module, path: Path, config: ScGPTConfig, input_names: Sequence[str],
              output_names: Sequence[str], precision: str, cells: list, data: str,
              shapes: Sequence[tuple[int, int | None]], providers: Sequence[str] | None) -> dict[str, Any]:
    """PyTorch (fp32, eval) vs ONNX Runtime on padded batches of real (or synthetic) cells."""
    import onnxruntime as ort

    batches = _validation_batches(cells, config, shapes, input_names[3:])
    session = ort.InferenceSession(str(path), _session_options(), providers=list(providers or ["CPUExecutionProvider"]))
    cases = []
    for feed in batches:
        ref = _torch_outputs(model, feed, input_names, output_names)
        got = dict(zip(output_names, session.run(list(output_names), {n: feed[n] for n in input_names})))
        try:
            figures = {n: selfcheck.compare(n, ref[n], got[n], feed["attention_mask"]) for n in output_names}
        except ValueError as err:  # a shape that differs: the graph is wrong, not imprecise
            raise ExportValidationError(f"{err}; the exported graph is broken, please report it.") from None
        cases.append({"batch": int(feed["input_ids"].shape[0]), "length": int(feed["input_ids"].shape[1]),
                      "padded_tokens": int((feed["attention_mask"] == 0).sum()), "outputs": figures,
                      "passed": selfcheck.within_bound(precision, figures)})
    return {"data": data, "criterion": selfcheck.criterion(precision), "providers": session.get_providers(),
            "cases": cases, "passed": all(c["passed"] for c in cases)}


def _validation_error(report: ExportReport, data: str, output_dir: Path) -> ExportValidationError:
    """The refusal of a graph outside its precision's bound: the first failing case's worst figure and the way out."""
    precision = report.precision
    failed = next(c for c in report.validation["cases"] if not c["passed"])
    return ExportValidationError(
        f"ONNX Runtime disagrees with PyTorch beyond the {precision} bound on {data}: "
        f"{selfcheck.worst(precision, failed['outputs'])} at batch {failed['batch']} x len "
        f"{failed['length']} ({report.validation['criterion']}); nothing was written to {output_dir}. "
        + ("Export in fp32 instead." if precision != "fp32" else
           "This is a bug: please report it with the figures of export_report (ExportValidationError.report)."),
        report,
    )


# ----------------------------------------------------------------------------------------------
# Step 5: write metadata, the self-check and the report


def preprocessing_contract(config: ScGPTConfig, tokenizer: Any, task: str) -> dict[str, Any]:
    """What a client must feed: how cells are tokenised and padded for this graph."""
    return {
        "n_bins": int(config.n_bins),
        "pad_value": float(config.pad_value),
        # The zero-shot embedding path (scgpt_hf.embedding.embed, the original embed_data) puts pad_value at
        # <cls>; pretraining-style inputs use the tokenizer's cls_value (0 in the original tokenizer).
        "cls_value": float(config.pad_value) if task == "embedding" else float(getattr(tokenizer, "cls_value", 0.0)),
        "mask_value": float(config.mask_value),
        "pad_token_id": int(config.pad_token_id),
        "cls_token_id": int(config.cls_token_id),
        "eoc_token_id": int(config.eoc_token_id),
        "max_length": int(getattr(tokenizer, "max_length", config.max_seq_len) or config.max_seq_len),
        "vocab_size": int(config.vocab_size),
        "input_emb_style": config.input_emb_style,
        "binning": "per-cell quantile bins 1..n_bins-1 of non-zero values (ScGPTTokenizer, do_binning=True)",
        "layout": "<cls> first, then expressed genes; padding at the end with pad_token_id / pad_value and "
                  "attention_mask 0",
    }



def _io_contract(proto: Any) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs (name, dtype, axes; outputs also per cell or per token) for metadata and report."""
    import onnx

    def describe(value_info: Any) -> dict[str, Any]:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name
        return {"name": value_info.name, "dtype": dtype, "shape": _dim_names(value_info)}

    inputs = [describe(vi) for vi in proto.graph.input]
    outputs = [{**describe(vi), "per": "cell" if vi.name in PER_CELL_OUTPUTS else "token"}
               for vi in proto.graph.output]
    return inputs, outputs


def _dim_names(value_info: Any) -> list:
    """Each axis by name where dynamic, else by size."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _stamp(proto: Any, report: ExportReport, config: ScGPTConfig, vocab_size: int,
           contract: Mapping[str, Any]) -> None:
    """Record in the graph what a server needs to feed and check it: task, precision, config, vocabulary hash,
    input/output and preprocessing contracts (the self-check's sha256 is added once its file is written)."""
    from scgpt_hf import __version__

    _set_metadata(proto, {
        METADATA_PREFIX + "task": report.task,
        METADATA_PREFIX + "precision": report.precision,
        METADATA_PREFIX + "opset": str(report.opset),
        METADATA_PREFIX + "version": __version__,
        METADATA_PREFIX + "config": config.to_json_string(use_diff=False),
        METADATA_PREFIX + "vocab_sha256": report.vocab_sha256,
        METADATA_PREFIX + "vocab_size": str(vocab_size),
        METADATA_PREFIX + "preprocessing": json.dumps(contract),
        METADATA_PREFIX + "inputs": json.dumps(report.inputs),
        METADATA_PREFIX + "outputs": json.dumps(report.outputs),
    })
    proto.producer_name = "scgpt-hf"
    proto.producer_version = __version__
    proto.doc_string = f"scGPT {report.task} graph ({report.precision}) exported by scgpt-hf {__version__}"


def _set_metadata(model: Any, entries: Mapping[str, str]) -> None:
    """Set (or replace) metadata_props entries of an onnx.ModelProto."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value


def _save_with_self_check(proto: Any, staging: Path, inputs: Mapping[str, np.ndarray],
                          outputs: Mapping[str, np.ndarray]) -> Path:
    """Write the self-check cells and PyTorch's outputs, record their sha256 in the graph, and save the graph."""
    _set_metadata(proto, {selfcheck.METADATA_KEY: selfcheck.save(staging / selfcheck.FILE, inputs, outputs)})
    path = staging / MODEL_FILE
    _save(proto, path)
    return path


def _save(model: Any, path: Path) -> None:
    """Save a graph, its weights in a ``.data`` file beside it past protobuf's 2 GiB limit."""
    import onnx

    if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GiB limit
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def _count_ops(report: ExportReport, proto: Any, path: Path) -> None:
    """Report the saved graph's ops: all of them, the fused ones, attention's inputs and what ONNX Runtime adds."""
    counts = Counter(node.op_type for node in proto.graph.node)
    contrib = {node.op_type for node in proto.graph.node if node.domain == "com.microsoft"}
    report.op_counts = dict(sorted(counts.items()))
    report.fused_ops = {op: n for op, n in sorted(counts.items()) if op in contrib}
    report.attention_inputs = _attention_inputs(proto)
    with contextlib.suppress(Exception):
        report.ort_session_ops = _ort_session_ops(path, counts)


def _attention_inputs(model: Any) -> dict[str, int]:
    """MultiHeadAttention nodes of an onnx.ModelProto counted by the inputs they are fed."""
    counts = Counter(", ".join(name for name, value in zip(MHA_INPUTS, node.input) if value)
                     for node in model.graph.node if node.op_type == "MultiHeadAttention")
    return dict(sorted(counts.items()))


def _ort_session_ops(path: Path, saved_counts: Mapping[str, int]) -> dict[str, int]:
    """Ops ONNX Runtime adds when it optimises the graph at load (e.g. DynamicQuantizeMatMul, FusedMatMul)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = _session_options()
        so.optimized_model_filepath = str(Path(tmp) / "ort_optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
    counts = Counter(n.op_type for n in optimized.graph.node if n.domain == "com.microsoft")
    return {op: n for op, n in sorted(counts.items()) if op not in saved_counts}


def _seal(report: ExportReport, path: Path, timings: Mapping[str, float], start: float) -> None:
    """Record the saved graph's size and sha256 (which loading checks) and the steps' timings."""
    report.file_size = path.stat().st_size
    report.sha256 = selfcheck.sha256(path)
    report.timings_s = {k: round(v, 3) for k, v in {**timings, "total": time.perf_counter() - start}.items()}


def _write_beside(staging: Path, report: ExportReport, config: ScGPTConfig, tokenizer: Any) -> None:
    """Write the report, the config and the tokenizer beside the graph, so the folder serves on its own."""
    (staging / REPORT_FILE).write_text(report.to_json() + "\n")
    config.save_pretrained(staging)
    if tokenizer is not None:
        with contextlib.suppress(Exception):
            tokenizer.save_pretrained(staging)


# ----------------------------------------------------------------------------------------------
# Loading and running


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``scgpt_hf.*`` metadata of an exported graph, JSON values decoded (no weights are read)."""
    import onnx

    path = _resolve_model_path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types
        raise _corrupt_error(path, err) from err
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            key = prop.key[len(METADATA_PREFIX):]
            try:
                out[key] = json.loads(prop.value) if key in {"config", "preprocessing", "inputs", "outputs"} else prop.value
            except json.JSONDecodeError:
                out[key] = prop.value
    return out


def _resolve_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            raise OnnxModelError(f"{path} holds no {MODEL_FILE}; export one with "
                                 f"`scgpt-hf export onnx MODEL {path}`.")
        return candidate
    if not path.is_file():
        raise OnnxModelError(f"{path} does not exist; export a model with `scgpt-hf export onnx MODEL OUTPUT_DIR`.")
    return path


def _corrupt_error(path: Path, err: BaseException) -> OnnxModelError:
    size = path.stat().st_size if path.exists() else 0
    expected = ""
    report = path.parent / REPORT_FILE
    if report.is_file():
        with contextlib.suppress(Exception):
            info = json.loads(report.read_text())
            if Path(info.get("model_path", "")).name == path.name and info.get("file_size"):
                expected = f" (the export wrote {info['file_size']} bytes)"
    return OnnxModelError(
        f"{path} ({size} bytes{expected}) is not a readable ONNX model: the file looks truncated or corrupted "
        f"({type(err).__name__}: {str(err).strip()[:300]}). Copy or download it again, or re-export it with "
        "`scgpt-hf export onnx MODEL OUTPUT_DIR`."
    )


_NP_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


class OnnxScGPT:
    """An exported scGPT graph in an ONNX Runtime session, with checked inputs and named outputs.

    Loading checks the file (missing, truncated, corrupted, not an scgpt-hf export; and, when
    ``export_report.json`` lies beside it, that its size and sha256 match what the export wrote), then runs the
    self-check: the cells stored in ``selfcheck.npz`` must come out within the precision's bound of PyTorch's
    outputs on this host, or loading raises `SelfCheckError`. Calls check input names, dtypes, shapes, id
    ranges and that every cell has a real token, and say how to fix them, instead of ONNX Runtime's terse
    errors.

    Args:
        path: ``model.onnx`` or the folder holding it.
        providers: execution providers (default CPU; e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]).
        intra_op_num_threads: CPU threads for ONNX Runtime (default: its own choice).
        session_options: a prepared `onnxruntime.SessionOptions` (overrides intra_op_num_threads).
        verify_checksum: compare the file with the sha256 in ``export_report.json`` when present.
        self_check: "raise" (refuse a host that computes the graph outside its bound) or "warn" (load anyway
            with a warning). The figures are in ``self_check_result``.
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 intra_op_num_threads: int | None = None, session_options: Any = None,
                 verify_checksum: bool = True, self_check: str = "raise") -> None:
        import onnxruntime as ort

        if self_check not in selfcheck.ON_FAILURE:
            raise ValueError(f"self_check must be one of {selfcheck.ON_FAILURE}, got {self_check!r}.")
        self.path = _resolve_model_path(path)
        if verify_checksum:
            self._verify_against_report()
        so = session_options
        if so is None:
            so = _session_options()
            if intra_op_num_threads:
                so.intra_op_num_threads = int(intra_op_num_threads)
        try:
            self.session = ort.InferenceSession(str(self.path), so,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # noqa: BLE001 - ORT raises InvalidProtobuf, Fail, InvalidGraph ...
            if "InvalidProtobuf" in type(err).__name__ or "protobuf" in str(err).lower() \
                    or "INVALID_PROTOBUF" in str(err) or "Load model" in str(err):
                raise _corrupt_error(self.path, err) from err
            raise OnnxModelError(f"ONNX Runtime cannot load {self.path}: {err}. If the file was copied, it may be "
                                 "incomplete; re-export it with `scgpt-hf export onnx MODEL OUTPUT_DIR`.") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_PREFIX + "task" not in meta:
            raise OnnxModelError(f"{self.path} is an ONNX model but not an scgpt-hf export (no {METADATA_PREFIX}* "
                                 "metadata); export it with `scgpt-hf export onnx`.")
        self.metadata: dict[str, Any] = {}
        for key, value in meta.items():
            if key.startswith(METADATA_PREFIX):
                short = key[len(METADATA_PREFIX):]
                self.metadata[short] = json.loads(value) if short in {"config", "preprocessing", "inputs", "outputs"} else value
        self.task: str = self.metadata["task"]
        self.precision: str = self.metadata.get("precision", "fp32")
        self.config: dict = self.metadata.get("config", {})
        self.preprocessing: dict = self.metadata.get("preprocessing", {})
        self.vocab_sha256: str = self.metadata.get("vocab_sha256", "")
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names: list[str] = list(self._inputs)
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        t0 = time.perf_counter()
        self.self_check_result: dict[str, Any] = selfcheck.run(self.session, self.path.parent, on_failure=self_check)
        self.self_check_result["seconds"] = time.perf_counter() - t0

    def _verify_against_report(self) -> None:
        report = self.path.parent / REPORT_FILE
        if not report.is_file():
            return
        try:
            info = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if Path(info.get("model_path", "")).name != self.path.name or not info.get("sha256"):
            return
        size = self.path.stat().st_size
        if info.get("file_size") and size != info["file_size"]:
            raise OnnxModelError(
                f"{self.path} is {size} bytes but the export wrote {info['file_size']} (per {report.name}): the file "
                "is truncated or was overwritten. Copy it again or re-export with `scgpt-hf export onnx`.")
        if selfcheck.sha256(self.path) != info["sha256"]:
            raise OnnxModelError(
                f"{self.path} does not match the sha256 recorded in {report.name}: the file is corrupted or was "
                "modified after export. Copy it again or re-export with `scgpt-hf export onnx` "
                "(or pass verify_checksum=False if you changed it on purpose).")

    def check_vocab(self, vocab: Mapping[str, int]) -> None:
        """Raise if `vocab` (e.g. `tokenizer.get_vocab()`) is not the vocabulary the graph was exported with."""
        got = vocab_sha256(vocab)
        if self.vocab_sha256 and got != self.vocab_sha256:
            raise OnnxInputError(
                f"The tokenizer's vocabulary (sha256 {got[:12]}..., {len(vocab)} tokens) is not the one this graph "
                f"was exported with (sha256 {self.vocab_sha256[:12]}..., {self.metadata.get('vocab_size')} tokens); "
                "use the tokenizer saved beside the ONNX model.")

    def _prepare(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if v is not None}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            hint = " (one integer batch id per cell, shape (batch,))" if "batch_labels" in missing else ""
            raise OnnxInputError(f"Missing input(s) {missing}{hint}; this graph takes {self.input_names}.")
        extra = [n for n in feeds if n not in self._inputs]
        if extra:
            raise OnnxInputError(f"Unexpected input(s) {extra}; this graph takes only {self.input_names}.")
        out: dict[str, np.ndarray] = {}
        for name in self.input_names:
            value = feeds[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            want = _NP_DTYPES.get(self._inputs[name].type)
            if want is not None and value.dtype != want:
                raise OnnxInputError(
                    f"Input {name!r} must be {np.dtype(want).name}, got {value.dtype.name}; convert it with "
                    f"np.asarray({name}, dtype=np.{np.dtype(want).name}) (or tokenizer(..., return_tensors='np')).")
            out[name] = value
        ids = out["input_ids"]
        if ids.ndim != 2:
            raise OnnxInputError(f"input_ids must be 2-D (batch, sequence), got shape {ids.shape}; for one cell use "
                                 "input_ids[None, :].")
        for name in ("values", "attention_mask", *PER_TOKEN_INPUTS):
            if name in out and out[name].shape != ids.shape:
                raise OnnxInputError(f"{name} must have the shape of input_ids {ids.shape}, got {out[name].shape}.")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise OnnxInputError(f"Empty batch: input_ids has shape {ids.shape}; feed at least one cell with <cls>.")
        vocab_size = int(self.config.get("vocab_size", 0))
        if vocab_size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise OnnxInputError(f"input_ids must lie in [0, {vocab_size}) (the vocabulary size); got values from "
                                 f"{ids.min()} to {ids.max()}. Tokenise with the tokenizer saved beside the model.")
        mask = out.get("attention_mask")
        if mask is not None and not np.isin(mask, (0, 1)).all():
            raise OnnxInputError("attention_mask must hold only 0 (padding) and 1 (real token).")
        if mask is not None and not mask.any(axis=1).all():
            empty = np.flatnonzero(~mask.any(axis=1))
            raise OnnxInputError(
                f"Cell(s) {empty[:10].tolist()} have no unmasked token (attention_mask all 0), so they have no "
                "embedding; every cell needs at least its <cls> token with mask 1. Drop those rows.")
        if "batch_labels" in out:
            labels = out["batch_labels"]
            if labels.shape != (ids.shape[0],):
                raise OnnxInputError(f"batch_labels must have shape ({ids.shape[0]},), got {labels.shape}.")
            n = int(self.config.get("num_batch_labels") or 0)
            if n and labels.size and (labels.min() < 0 or labels.max() >= n):
                raise OnnxInputError(f"batch_labels must lie in [0, {n}); got {labels.min()}..{labels.max()}.")
        return out

    def __call__(self, encoding: Mapping[str, Any] | None = None, /, **inputs: Any) -> dict[str, np.ndarray]:
        """Run the graph on a tokenizer output (`BatchEncoding` / dict) or keyword arrays; returns {output: array}."""
        # A tokenizer output may carry extra keys (e.g. n_genes); keyword inputs are taken strictly.
        feeds = {k: v for k, v in (encoding or {}).items() if k in self._inputs or k == "batch_labels"}
        feeds.update(inputs)
        prepared = self._prepare(feeds)
        results = self.session.run(self.output_names, prepared)
        return dict(zip(self.output_names, results))

    def __repr__(self) -> str:
        return (f"OnnxScGPT({str(self.path)!r}, task={self.task!r}, precision={self.precision!r}, "
                f"inputs={self.input_names}, outputs={self.output_names}, providers={self.session.get_providers()})")
