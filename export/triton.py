"""Build a Triton Inference Server model repository for an scGPT model (`scgpt-hf export triton`).

Layout written by :func:`export_triton` (``R`` = the repository folder)::

    R/README.md                 model card: models, wire format, how to serve and query
    R/export_report.json        the ONNX export report (fusion, precision, validation vs PyTorch)
    R/triton_report.json        what this builder did: settings, models, files, ONNX sha256
    R/scgpt_vocab/              python backend: gene names -> vocabulary ids (once per dataset)
    R/scgpt_tokenizer/          python backend: counts of cells -> input_ids / values / attention_mask
    R/scgpt_encoder/            the ONNX graph: native onnxruntime backend (gpu) or python backend (cpu)
    R/scgpt_embed/              ensemble: tokenizer -> encoder; counts in, cell_embedding out
    R/scgpt_labels/ (head)      python backend: logits -> label, probability, probabilities
    R/scgpt_annotate/ (head)    ensemble: tokenizer -> encoder -> labels

Names, tensors and parameter keys are the serving contract (`scgpt_hf.serving.contract`), which the client
reads too. Each ``config.pbtxt`` is a Triton ``ModelConfig`` message (tritonclient's ``model_config_pb2``)
built by one small function per model and rendered with protobuf's text format.

Python-backend models run files copied beside their ``model.py``: the library's own ``cell_encoding.py``
and ``padding.py`` (numpy only, so the tokenizer runs in a stock Triton container's Python),
``selfcheck.py``, and ``triton_backend_common.py`` (request errors, parameters and the encoder's request
checks, shared by every backend).

:func:`write_torch_repository` (behind ``scgpt-hf serve MODEL``) writes the same models and wire format
with a PyTorch ``scgpt_encoder`` instead: a python-backend model that runs the model folder on a GPU
(bf16/fp16 autocast, SDPA) or the CPU with the library's own modeling and inference files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scgpt_hf
from scgpt_hf.serving import contract as wire
from scgpt_hf.serving.contract import (
    ANNOTATE_MODEL,
    EMBED_MODEL,
    ENCODER_MODEL,
    LABELS_MODEL,
    TOKENIZER_MODEL,
    VOCAB_MODEL,
    ServedBatches,
)

__all__ = [
    "Batching",
    "TritonExportReport",
    "add_parser",
    "annotate_config",
    "check_torch_settings",
    "embed_config",
    "export_triton",
    "labels_config",
    "onnx_encoder_config",
    "parse_model_config",
    "render_model_config",
    "tokenizer_config",
    "torch_encoder_config",
    "validate_repository",
    "vocab_config",
    "write_torch_repository",
]

DEVICES = ("cpu", "gpu")
REPORT_FILE = "triton_report.json"
ANNOTATION_TASK = "annotation"
_WHAT = "Triton model repository"
_HERE = Path(__file__).resolve().parent
_LIBRARY = Path(scgpt_hf.__file__).resolve().parent  # the modules python backends run copies of
_BACKENDS = {name: _HERE / f"triton_backend_{name}.py" for name in ("vocab", "tokenizer", "encoder", "labels", "torch")}
_COMMON = _HERE / "triton_backend_common.py"  # copied beside every backend's model.py
_DEFAULTS = {  # device -> (max batch size, precision, pad_to_multiple_of, queue delay in microseconds)
    "cpu": (16, "fp32", 8, 2000),
    "gpu": (64, "fp16", 64, 1000),
}
_TENSORRT = {"precision_mode": "FP16", "max_workspace_size_bytes": "4294967296", "trt_engine_cache_enable": "1",
             "trt_engine_cache_path": "/tmp/scgpt_trt_cache"}


@dataclass
class TritonExportReport:
    """What :func:`export_triton` built; written as ``triton_report.json`` in the repository."""

    repository: str
    device: str
    precision: str
    task: str
    max_batch_size: int
    instances: int
    preferred_batch_sizes: list[int]
    max_queue_delay_microseconds: int
    pad_to_multiple_of: int
    tensorrt: bool
    models: list[str]
    ensembles: dict[str, str]
    tokenizer: dict[str, Any]
    encoder_outputs: dict[str, list[int]]
    labels: list[str] | None
    onnx_sha256: str
    onnx_validation_passed: bool | None
    files: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The report as indented JSON (stable key order: the committed triton_repo diffs cleanly)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def summary(self) -> str:
        """A few human-readable lines."""
        return (
            f"Triton repository {self.repository} ({self.device}, {self.precision}, max batch {self.max_batch_size}, "
            f"{self.instances} instance(s)): models {', '.join(self.models)}; "
            + "; ".join(f"{k}: {v}" for k, v in self.ensembles.items())
        )


# ----------------------------------------------------------------------------------------------
# Configs as data: ModelConfig messages, one builder per model


def _pb2() -> Any:
    """Triton's ModelConfig protobuf module (tritonclient's), or an error naming the package to install."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise ImportError(
            f"Building Triton configs needs tritonclient's ModelConfig protobuf ({err}): pip install "
            "'tritonclient[grpc]' (in scgpt-hf's export and serve extras)."
        ) from err
    return model_config_pb2


@dataclass(frozen=True)
class Batching:
    """How a repository's batched models batch and replicate: cells per request and per batch, the dynamic
    batcher's preferred sizes and queue delay, and instances of the encoder and of the CPU models."""

    max_batch_size: int
    preferred: tuple[int, ...]
    delay_us: int
    instances: int = 1
    tokenizer_instances: int = 1


def _batching(device: str, max_batch_size: int | None, instances: int, tokenizer_instances: int,
              preferred_batch_sizes: Sequence[int] | None, max_queue_delay_microseconds: int | None) -> Batching:
    """The batching settings, the device's defaults filled in; raises ValueError for impossible ones."""
    default_batch, _, _, default_delay = _DEFAULTS[device]
    max_batch_size = int(max_batch_size or default_batch)
    if max_batch_size < 1 or int(instances) < 1 or int(tokenizer_instances) < 1:
        raise ValueError("max_batch_size, instances and tokenizer_instances must be at least 1.")
    if preferred_batch_sizes:
        preferred = sorted({int(s) for s in preferred_batch_sizes})
    else:  # the three largest of 4, 8, 16, ... up to max_batch_size
        preferred = [s for s in (4, 8, 16, 32, 64, 128, 256) if s < max_batch_size][-2:] + [max_batch_size]
    if any(s < 1 or s > max_batch_size for s in preferred):
        raise ValueError(f"preferred batch sizes {preferred} must lie in 1..max_batch_size={max_batch_size}.")
    delay = int(default_delay if max_queue_delay_microseconds is None else max_queue_delay_microseconds)
    return Batching(max_batch_size, tuple(preferred), delay, int(instances), int(tokenizer_instances))


def _model(name: str, max_batch_size: int, *, backend: str = "", platform: str = "") -> Any:
    return _pb2().ModelConfig(name=name, backend=backend, platform=platform, max_batch_size=int(max_batch_size))


def _add_inputs(config: Any, tensors: Sequence[wire.Tensor], *, ragged: bool = False) -> None:
    pb2 = _pb2()
    for t in tensors:
        config.input.add(name=t.name, data_type=pb2.DataType.Value(f"TYPE_{t.data_type}"), dims=list(t.dims),
                         allow_ragged_batch=ragged)


def _add_outputs(config: Any, tensors: Sequence[wire.Tensor]) -> None:
    pb2 = _pb2()
    for t in tensors:
        config.output.add(name=t.name, data_type=pb2.DataType.Value(f"TYPE_{t.data_type}"), dims=list(t.dims))


def _add_batch_labels(config: Any, reshape: bool) -> None:
    """One batch id per cell: [cells, 1] on the wire; reshaped to the graph's [cells] for an encoder."""
    _add_inputs(config, [wire.BATCH_LABELS])
    if reshape:
        config.input[-1].reshape.SetInParent()  # an empty shape: [1] -> []


def _batched(config: Any, batching: Batching, instances: int, kind: str = "KIND_CPU") -> None:
    """Dynamic batching with the preferred sizes and queue delay, and `instances` instances of `kind`."""
    config.dynamic_batching.preferred_batch_size[:] = list(batching.preferred)
    config.dynamic_batching.max_queue_delay_microseconds = int(batching.delay_us)
    config.instance_group.add(count=int(instances), kind=_pb2().ModelInstanceGroup.Kind.Value(kind))


def _set_parameters(config: Any, params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def _step(config: Any, model: str, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """An ensemble step: `model`'s inputs from the ensemble's tensors, its outputs into ensemble tensors."""
    step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    step.input_map.update(inputs)
    step.output_map.update(outputs)


def render_model_config(config: Any, comment: str = "") -> str:
    """A ModelConfig as config.pbtxt text: `comment` as ``#`` lines, then the message in protobuf's text format."""
    from google.protobuf import text_format

    lines = [f"# {line}".rstrip() for line in comment.strip().splitlines()]
    return "".join(f"{line}\n" for line in lines) + text_format.MessageToString(config, use_short_repeated_primitives=True)


def parse_model_config(text: str) -> Any:
    """Parse config.pbtxt text with Triton's own ``ModelConfig`` protobuf (tritonclient's model_config_pb2)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb2().ModelConfig())


def vocab_config(specials: Mapping[str, str]) -> Any:
    """scgpt_vocab: gene names -> vocabulary ids (no batching: one call per dataset)."""
    config = _model(VOCAB_MODEL, 0, backend="python")
    _add_inputs(config, [wire.GENE_NAMES])
    _add_outputs(config, [wire.GENE_IDS])
    config.instance_group.add(count=1, kind=_pb2().ModelInstanceGroup.KIND_CPU)
    _set_parameters(config, specials)
    return config


def tokenizer_config(settings: Mapping[str, Any], batching: Batching) -> Any:
    """scgpt_tokenizer: counts of cells -> model inputs, with its settings as parameters."""
    config = _model(TOKENIZER_MODEL, batching.max_batch_size, backend="python")
    _add_inputs(config, wire.WIRE_INPUTS, ragged=True)
    _add_outputs(config, [*wire.MODEL_INPUTS, wire.N_GENES])
    _batched(config, batching, batching.tokenizer_instances)
    _set_parameters(config, settings)
    return config


def onnx_encoder_config(outputs: Mapping[str, Sequence[int]], batching: Batching, params: Mapping[str, Any], *,
                        device: str, batch_labels: bool, tensorrt: bool = False) -> Any:
    """scgpt_encoder on an ONNX graph: Triton's native onnxruntime backend on the GPU (equal shapes batch
    together, so inputs are not ragged), or the python backend running ONNX Runtime on the CPU."""
    if device == "gpu":
        config = _model(ENCODER_MODEL, batching.max_batch_size, backend="onnxruntime", platform="onnxruntime_onnx")
        config.default_model_filename = "model.onnx"
    else:
        config = _model(ENCODER_MODEL, batching.max_batch_size, backend="python")
    _encoder_io(config, outputs, ragged=device == "cpu", batch_labels=batch_labels)
    _batched(config, batching, batching.instances, "KIND_GPU" if device == "gpu" else "KIND_CPU")
    if tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update(_TENSORRT)
    _set_parameters(config, params)
    return config


def torch_encoder_config(outputs: Mapping[str, Sequence[int]], batching: Batching, params: Mapping[str, Any], *,
                         batch_labels: bool) -> Any:
    """scgpt_encoder running the PyTorch model in a python-backend model (it picks its device itself)."""
    config = _model(ENCODER_MODEL, batching.max_batch_size, backend="python")
    _encoder_io(config, outputs, ragged=True, batch_labels=batch_labels)
    _batched(config, batching, batching.instances)
    _set_parameters(config, params)
    return config


def _encoder_io(config: Any, outputs: Mapping[str, Sequence[int]], *, ragged: bool, batch_labels: bool) -> None:
    _add_inputs(config, wire.MODEL_INPUTS, ragged=ragged)
    if batch_labels:
        _add_batch_labels(config, reshape=True)
    _add_outputs(config, [wire.Tensor(name, "FP32", tuple(dims)) for name, dims in outputs.items()])


def labels_config(n_classes: int, batching: Batching) -> Any:
    """scgpt_labels: classifier logits -> label, its probability and all probabilities."""
    config = _model(LABELS_MODEL, batching.max_batch_size, backend="python")
    _add_inputs(config, [wire.LOGITS.sized(n_classes)])
    _add_outputs(config, [wire.LABEL, wire.PROBABILITY, wire.PROBABILITIES.sized(n_classes)])
    _batched(config, batching, batching.tokenizer_instances)
    return config


def _ensemble(name: str, max_batch_size: int, batches: ServedBatches, outputs: Sequence[wire.Tensor]) -> Any:
    """An ensemble taking the wire inputs (batch_labels too for a batch-label model), starting with the tokenizer
    step; returns it with the encoder step's input map, for the caller to add the encoder's step."""
    config = _model(name, max_batch_size, platform="ensemble")
    _add_inputs(config, wire.WIRE_INPUTS)
    if batches.needs_batch_labels:
        _add_batch_labels(config, reshape=False)
    _add_outputs(config, outputs)
    tokenized = {t.name: f"_{t.name}" for t in wire.MODEL_INPUTS}
    _step(config, TOKENIZER_MODEL, {t.name: t.name for t in wire.WIRE_INPUTS},
          {**tokenized, wire.N_GENES.name: wire.N_GENES.name})
    _set_parameters(config, batches.parameters())
    return config


def _encoder_inputs(batches: ServedBatches) -> dict[str, str]:
    """The encoder step's inputs: the tokenizer's outputs, and batch_labels straight from the request."""
    inputs = {t.name: f"_{t.name}" for t in wire.MODEL_INPUTS}
    if batches.needs_batch_labels:  # the tokenizer does not need it
        inputs[wire.BATCH_LABELS.name] = wire.BATCH_LABELS.name
    return inputs


def embed_config(hidden: int, batches: ServedBatches, max_batch_size: int) -> Any:
    """scgpt_embed: scgpt_tokenizer -> scgpt_encoder; counts in, cell_embedding and n_genes out."""
    config = _ensemble(EMBED_MODEL, max_batch_size, batches, [wire.CELL_EMBEDDING.sized(hidden), wire.N_GENES])
    embedding = wire.CELL_EMBEDDING.name
    _step(config, ENCODER_MODEL, _encoder_inputs(batches), {embedding: embedding})
    return config


def annotate_config(hidden: int, n_classes: int, batches: ServedBatches, max_batch_size: int) -> Any:
    """scgpt_annotate: scgpt_tokenizer -> scgpt_encoder -> scgpt_labels; counts in, labels out."""
    outputs = [wire.LABEL, wire.PROBABILITY, wire.PROBABILITIES.sized(n_classes), wire.CELL_EMBEDDING.sized(hidden),
               wire.N_GENES]
    config = _ensemble(ANNOTATE_MODEL, max_batch_size, batches, outputs)
    embedding, logits = wire.CELL_EMBEDDING.name, wire.LOGITS.name
    _step(config, ENCODER_MODEL, _encoder_inputs(batches), {logits: f"_{logits}", embedding: embedding})
    _step(config, LABELS_MODEL, {logits: f"_{logits}"}, {t.name: t.name for t in wire.LABEL_OUTPUTS})
    return config


def validate_repository(repository: str | os.PathLike) -> dict[str, Any]:
    """Parse every ``*/config.pbtxt`` of a repository with Triton's ModelConfig; check names and ensemble wiring.

    Returns {model name: parsed ModelConfig}; raises ValueError naming the file and the problem.
    """
    repository = Path(repository)
    configs: dict[str, Any] = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        try:
            cfg = parse_model_config(path.read_text())
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - text_format.ParseError and friends
            raise ValueError(f"{path} does not parse as a Triton ModelConfig: {err}") from err
        if cfg.name != path.parent.name:
            raise ValueError(f"{path}: name {cfg.name!r} differs from its folder {path.parent.name!r}")
        if not any(p.is_dir() and p.name.isdigit() for p in path.parent.iterdir()):
            raise ValueError(f"{path.parent} has no version folder (e.g. 1/)")
        configs[cfg.name] = cfg
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            _check_ensemble(name, cfg, configs)
    return configs


def _check_ensemble(name: str, cfg: Any, configs: Mapping[str, Any]) -> None:
    """Every step's model exists, its inputs come from the ensemble or an earlier step, every output is made."""
    produced = {i.name for i in cfg.input}
    for step in cfg.ensemble_scheduling.step:
        target = configs.get(step.model_name)
        if target is None:
            raise ValueError(f"ensemble {name} calls {step.model_name}, which the repository lacks")
        inputs = {i.name for i in target.input}
        outputs = {o.name for o in target.output}
        for key, value in step.input_map.items():
            if key not in inputs or value not in produced:
                raise ValueError(f"ensemble {name}: step {step.model_name} input {key} <- {value} is not wired")
        for key, value in step.output_map.items():
            if key not in outputs:
                raise ValueError(f"ensemble {name}: {step.model_name} has no output {key}")
            produced.add(value)
    missing = [o.name for o in cfg.output if o.name not in produced]
    if missing:
        raise ValueError(f"ensemble {name}: outputs {missing} are produced by no step")


# ----------------------------------------------------------------------------------------------
# What a repository serves, whichever engine runs the encoder


@dataclass
class _Served:
    """The model a repository serves: its task and sizes, vocabulary, tokenizer settings, classes and batches."""

    task: str
    hidden: int
    vocab: dict[str, int]
    tokenizer: dict[str, Any]  # the tokenizer model's parameters
    labels: list[str] | None
    batches: ServedBatches
    outputs: dict[str, list[int]]  # the encoder's outputs and their dims per cell
    pad_token_id: int
    pad_value: float
    vocab_size: int
    model_config: dict[str, Any]

    def encoder_parameters(self) -> dict[str, Any]:
        """The parameters every encoder reads (padding, vocabulary size, number of batches)."""
        params: dict[str, Any] = {"pad_token_id": self.pad_token_id, "pad_value": self.pad_value,
                                  "vocab_size": self.vocab_size}
        if self.batches.needs_batch_labels:
            params[wire.NUM_BATCH_LABELS] = self.batches.num_batch_labels
        return params


def _check_servable(config: Any) -> None:
    """Refuse models the repository cannot serve faithfully, before any export work."""
    if getattr(config, "domain_spec_batchnorm", None) == "dsbn":
        raise NotImplementedError(
            "Models with domain-specific batch norm (config.domain_spec_batchnorm='dsbn') cannot be served: they "
            "pick a BatchNorm per batch with data-dependent control flow, which has no static ONNX graph (`export "
            "onnx` refuses them too). Embed them in Python with scgpt_hf.embed(adata, model, batch_key=...), or "
            "fine-tune with batch embeddings instead (use_batch_labels=True, domain_spec_batchnorm False or "
            "'batchnorm'): such models are served with a batch_labels input."
        )


def _check_sparse_tokenizer(tokenizer: Any) -> None:
    if tokenizer.include_zero_genes:
        raise NotImplementedError("The server tokenizer takes sparse counts: include_zero_genes is not supported.")


def _served_batches(config: Mapping[str, Any]) -> ServedBatches:
    """A batch-label model's batches, from its config, as the repository publishes them."""
    return ServedBatches(True, int(config["num_batch_labels"]), dict(config.get("batch2id") or {}) or None)


def _labels_from_config(config: Mapping[str, Any]) -> list[str]:
    id2label = config.get("id2label") or {}
    n = int(config.get("num_labels") or len(id2label))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def _tokenizer_settings(tokenizer: Any, contract: Mapping[str, Any], *, max_length: int | None,
                        truncation: str | None, seed: int, pad_to_multiple_of: int) -> dict[str, Any]:
    """The server tokenizer's parameters: the model's preprocessing contract, then the tokenizer's own."""
    tok = {
        "n_bins": int(contract.get("n_bins", tokenizer.n_bins)),
        "pad_value": float(contract.get("pad_value", tokenizer.pad_value)),
        "cls_value": float(contract.get("cls_value", tokenizer.cls_value)),
        "max_length": int(max_length or contract.get("max_length") or tokenizer.max_length),
        "truncation": truncation or tokenizer.truncation_strategy,
        "seed": int(seed),
        "pad_to_multiple_of": int(pad_to_multiple_of),
        "do_binning": "true" if tokenizer.do_binning else "false",
        "pad_token": str(tokenizer.pad_token),
        "cls_token": str(tokenizer.cls_token),
        "eoc_token": str(tokenizer.eoc_token),
        "max_genes_per_cell": 100000,
    }
    if tok["truncation"] not in ("random", "highest", "none"):
        raise ValueError(f"truncation must be random, highest or none, got {tok['truncation']!r}.")
    return tok


# ----------------------------------------------------------------------------------------------
# Writing the models every repository has


def _write_model(repo: Path, config: Any, comment: str, files: Mapping[str, Path | str] | None = None) -> None:
    """A model folder: config.pbtxt and version folder 1/ with `files` (name -> a file to copy, or text)."""
    version = repo / config.name / "1"
    version.mkdir(parents=True, exist_ok=True)  # the ONNX encoder's holds its graph already
    (repo / config.name / "config.pbtxt").write_text(render_model_config(config, comment), encoding="utf-8")
    for name, source in (files or {}).items():
        if isinstance(source, Path):
            shutil.copy2(source, version / name)
        else:
            (version / name).write_text(source, encoding="utf-8")


def _backend_files(backend: str, *library: str) -> dict[str, Path]:
    """A python-backend model's files: its model.py, the shared helper, and the named library modules."""
    return {"model.py": _BACKENDS[backend], _COMMON.name: _COMMON, **{name: _LIBRARY / name for name in library}}


def _write_tokenizer_models(repo: Path, served: _Served, batching: Batching) -> None:
    """scgpt_vocab and scgpt_tokenizer: python backend, numpy only, the library's own cell encoding and padding."""
    vocab_json = json.dumps(dict(sorted(served.vocab.items(), key=lambda kv: kv[1])), indent=0, ensure_ascii=False)
    specials = {k: served.tokenizer[k] for k in ("pad_token", "cls_token", "eoc_token")}
    _write_model(repo, vocab_config(specials), (
        "Gene names -> vocabulary ids (-1: not in the vocabulary, repeated, or a special token).\n"
        "Clients call it once per dataset and then send ids with each batch of cells.\n"
        "Python backend, numpy only: 1/model.py with 1/cell_encoding.py and 1/vocab.json."
    ), {**_backend_files("vocab", "cell_encoding.py"), "vocab.json": vocab_json + "\n"})
    _write_model(repo, tokenizer_config(served.tokenizer, batching), (
        "Counts of cells -> scGPT model inputs, exactly as ScGPTTokenizer.encode_with_ids.\n"
        "gene_ids [batch, n]: vocabulary ids in column order, -1 = unused slot; counts [batch, n]: values.\n"
        "Each cell: <cls> (cls_value), then its expressed genes with per-cell quantile bins (tie-breaking\n"
        "seeded by `seed` and the cell's content), cut to max_length tokens; padded to the request's\n"
        "longest cell, rounded up to pad_to_multiple_of. Python backend, numpy only (1/cell_encoding.py,\n"
        "1/padding.py)."
    ), {**_backend_files("tokenizer", "cell_encoding.py", "padding.py"), "vocab.json": vocab_json + "\n"})


def _write_ensembles(repo: Path, served: _Served, batching: Batching) -> tuple[list[str], dict[str, str]]:
    """scgpt_embed (and, for a classification head, scgpt_labels and scgpt_annotate) around scgpt_encoder;
    returns (every model of the repository, {ensemble: what it chains})."""
    wire_names = ", ".join(t.name for t in wire.WIRE_INPUTS)
    batch_note = ""
    if served.batches.needs_batch_labels:
        wire_names += f", {wire.BATCH_LABELS.name}"
        batch_note = ("\nbatch_labels [cells, 1]: each cell's batch id; the batch2id parameter names the model's "
                      f"{served.batches.num_batch_labels} batches.")
    _write_model(repo, embed_config(served.hidden, served.batches, batching.max_batch_size), (
        "Counts in, cell embeddings out: scgpt_tokenizer then scgpt_encoder.\n"
        "cell_embedding is the model's raw cell embedding (clients L2-normalise it, as scgpt_hf.embed does);\n"
        "n_genes: each cell's expressed vocabulary genes before truncation." + batch_note
    ), {".gitkeep": ""})
    models = [VOCAB_MODEL, TOKENIZER_MODEL, ENCODER_MODEL, EMBED_MODEL]
    ensembles = {EMBED_MODEL: f"{TOKENIZER_MODEL} -> {ENCODER_MODEL}: {wire_names} -> cell_embedding, n_genes"}
    if served.labels is None:
        return models, ensembles
    n = len(served.labels)
    labels_json = json.dumps(served.labels, indent=1, ensure_ascii=False) + "\n"
    _write_model(repo, labels_config(n, batching), (
        "Classifier logits -> label (argmax), its probability and all probabilities (softmax).\n"
        "Python backend, numpy only; class names in 1/labels.json."
    ), {**_backend_files("labels"), "labels.json": labels_json})
    _write_model(repo, annotate_config(served.hidden, n, served.batches, batching.max_batch_size),
                 "Counts in, cell types out: scgpt_tokenizer, scgpt_encoder, scgpt_labels." + batch_note,
                 {".gitkeep": ""})
    ensembles[ANNOTATE_MODEL] = (f"{TOKENIZER_MODEL} -> {ENCODER_MODEL} -> {LABELS_MODEL}: {wire_names} -> "
                                 "label, probability, probabilities, cell_embedding, n_genes")
    return models + [LABELS_MODEL, ANNOTATE_MODEL], ensembles


def _write_served_models(repo: Path, served: _Served, batching: Batching) -> tuple[list[str], dict[str, str]]:
    """Every model but the encoder, which is the engine's own; returns the models and ensembles."""
    _write_tokenizer_models(repo, served, batching)
    return _write_ensembles(repo, served, batching)


def _finish(repo: Path, report_json: str) -> None:
    """Write the report and check the whole repository (inside the atomic build: a failure writes nothing)."""
    (repo / REPORT_FILE).write_text(report_json + "\n")
    validate_repository(repo)


# ----------------------------------------------------------------------------------------------
# The ONNX repository: `scgpt-hf export triton`


def export_triton(
    model_or_path: Any,
    repository_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    max_batch_size: int | None = None,
    instances: int = 1,
    precision: str | None = None,
    tensorrt: bool = False,
    tokenizer: Any = None,
    onnx_dir: str | os.PathLike | None = None,
    seed: int = 0,
    max_length: int | None = None,
    truncation: str | None = None,
    pad_to_multiple_of: int | None = None,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int | None = None,
    tokenizer_instances: int = 1,
    intra_op_num_threads: int = 0,
    validate: bool = True,
    overwrite: bool = False,
    verbose: bool = False,
) -> TritonExportReport:
    """Export an scGPT model to ONNX and write a complete Triton model repository around it.

    Args:
        model_or_path: model object, local folder or Hub id.  A cell-classification model
            (``ScGPTForCellClassification``) also gets ``scgpt_labels`` and the ``scgpt_annotate`` ensemble.
        repository_dir: output folder, built beside and renamed into place once checked (a failure or a kill
            leaves an existing one as it was); checked for writability before any work.
        device: "gpu" (native onnxruntime backend, KIND_GPU, fp16 by default) or "cpu" (python backend
            running ONNX Runtime on the same file, fp32 by default).
        max_batch_size: cells per request and per encoder batch (default 64 gpu, 16 cpu).
        instances: encoder instances (instance_group count).
        precision: ONNX precision, "fp32", "fp16" or "int8" (default fp16 on gpu, fp32 on cpu).
        tensorrt: add the TensorRT execution accelerator (FP16) to the gpu encoder.
        tokenizer: `ScGPTTokenizer` (default: the one saved with the model).
        onnx_dir: reuse a folder written by `export_onnx` (model.onnx, export_report.json) instead of exporting.
        seed, max_length, truncation: the server tokenizer's settings (default: seed 0, the tokenizer's
            max_length and truncation strategy); cls value, bins and padding come from the ONNX contract.
        pad_to_multiple_of: round each request's token length up to this (default 64 gpu, 8 cpu): requests of
            one length bucket can share a batch on the native backend, which batches equal shapes only.
        preferred_batch_sizes, max_queue_delay_microseconds: dynamic batching of the encoder.
        tokenizer_instances: instances of the tokenizer and vocab models (CPU).
        intra_op_num_threads: ONNX Runtime threads per cpu encoder instance (0: ONNX Runtime decides).
        validate: validate the ONNX export against PyTorch.
        overwrite: replace an existing repository folder (refused otherwise).
        verbose: print the ONNX export summary.
    """
    from scgpt_hf.atomic import atomic_output, check_writable

    precision = _onnx_settings(device, precision, tensorrt)
    batching = _batching(device, max_batch_size, instances, tokenizer_instances, preferred_batch_sizes,
                         max_queue_delay_microseconds)
    pad_multiple = int(pad_to_multiple_of or _DEFAULTS[device][2])
    target = check_writable(repository_dir, overwrite=overwrite, what=_WHAT)
    task = "embedding" if onnx_dir is not None else _servable_task(model_or_path)  # refuse before any work

    with atomic_output(target, overwrite=overwrite, directory=True, what=_WHAT) as repo:
        meta, tokenizer, export_report = _onnx_graph(
            model_or_path, onnx_dir, repo, task=task, precision=precision, validate=validate, tokenizer=tokenizer,
            seed=seed, verbose=verbose)
        served = _served_from_onnx(meta, tokenizer, task, max_length=max_length, truncation=truncation, seed=seed,
                                   pad_to_multiple_of=pad_multiple)
        models, ensembles = _write_served_models(repo, served, batching)
        _write_onnx_encoder(repo, served, batching, device=device, precision=precision, tensorrt=tensorrt,
                            intra_op_num_threads=intra_op_num_threads)
        report = TritonExportReport(
            repository=target.name, device=device, precision=precision, task=served.task,
            max_batch_size=batching.max_batch_size, instances=batching.instances,
            preferred_batch_sizes=list(batching.preferred), max_queue_delay_microseconds=batching.delay_us,
            pad_to_multiple_of=pad_multiple, tensorrt=bool(tensorrt), models=models, ensembles=ensembles,
            tokenizer=dict(served.tokenizer), encoder_outputs=served.outputs, labels=served.labels,
            onnx_sha256="", onnx_validation_passed=export_report.get("passed") if export_report else None,
        )
        _finish_onnx(repo, report, served, export_report)
    return report


def _onnx_settings(device: str, precision: str | None, tensorrt: bool) -> str:
    """The ONNX precision for `device` (its default when None); raises ValueError for impossible settings."""
    from .onnx_export import PRECISIONS

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    precision = precision or _DEFAULTS[device][1]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if device == "gpu" and precision == "int8":
        raise ValueError("int8 (dynamic quantisation) is for CPU hosts; use fp16 on gpu.")
    if tensorrt and device != "gpu":
        raise ValueError("tensorrt applies to --device gpu only.")
    return precision


def _servable_task(model_or_path: Any) -> str:
    """The task to export the model for, from its config alone; refuses a model the repository cannot serve."""
    config = _source_config(model_or_path)
    _check_servable(config)
    return ANNOTATION_TASK if _is_classifier(model_or_path, config) else "embedding"


def _source_config(model_or_path: Any) -> Any:
    """The model's config: the object's, or a folder's / Hub id's config.json (no weights are loaded)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoConfig

        import scgpt_hf  # noqa: F401 - registers the config class

        return AutoConfig.from_pretrained(os.fspath(model_or_path))
    return getattr(model_or_path, "config", None)


def _is_classifier(model_or_path: Any, config: Any) -> bool:
    from scgpt_hf.modeling_scgpt import ScGPTForCellClassification

    if isinstance(model_or_path, (str, os.PathLike)):
        return "ScGPTForCellClassification" in (getattr(config, "architectures", None) or [])
    return isinstance(model_or_path, ScGPTForCellClassification)


def _onnx_graph(model_or_path: Any, onnx_dir: str | os.PathLike | None, repo: Path, *, task: str, precision: str,
                validate: bool, tokenizer: Any, seed: int, verbose: bool) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Export the graph (or take `onnx_dir`'s) into scgpt_encoder/1/; returns (its metadata, the tokenizer the
    server reproduces, the export report)."""
    from .onnx_export import export_onnx, read_onnx_metadata

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(onnx_dir) if onnx_dir is not None else Path(tmp) / "onnx"  # export_onnx makes it
        if onnx_dir is None:
            export_onnx(model_or_path, src, task=task, precision=precision, validate=validate, tokenizer=tokenizer,
                        seed=seed, verbose=verbose)
        meta = read_onnx_metadata(src / "model.onnx")
        tokenizer = _server_tokenizer(tokenizer, src, model_or_path)
        return meta, tokenizer, _copy_graph(src, repo)


def _server_tokenizer(tokenizer: Any, src: Path, model_or_path: Any) -> Any:
    """The tokenizer the server's tokenizer model reproduces: the one given, else the one saved beside the
    graph or the model."""
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    if tokenizer is None:
        local = isinstance(model_or_path, (str, os.PathLike))
        beside = [c for c in (src, model_or_path if local else None) if c is not None and Path(c, "vocab.json").is_file()]
        if beside or local:
            tokenizer = ScGPTTokenizer.from_pretrained(os.fspath(beside[0] if beside else model_or_path))
        else:
            raise ValueError("No tokenizer found beside the model; pass tokenizer=ScGPTTokenizer(...).")
    _check_sparse_tokenizer(tokenizer)
    return tokenizer


def _copy_graph(src: Path, repo: Path) -> dict[str, Any]:
    """The graph, its external weights and its self-check into scgpt_encoder/1/, the export report into the
    repository; returns the export report (empty when there is none)."""
    from . import selfcheck

    encoder_dir = repo / ENCODER_MODEL / "1"
    encoder_dir.mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.data", selfcheck.FILE):
        if (src / name).exists():
            shutil.copy2(src / name, encoder_dir / name)
    if not (src / "export_report.json").is_file():
        return {}
    export_report = json.loads((src / "export_report.json").read_text())
    export_report.pop("model_path", None)  # a temporary path
    export_report.pop("timings_s", None)
    (repo / "export_report.json").write_text(json.dumps(export_report, indent=2) + "\n")
    return export_report


def _served_from_onnx(meta: Mapping[str, Any], tokenizer: Any, task: str, *, max_length: int | None,
                      truncation: str | None, seed: int, pad_to_multiple_of: int) -> _Served:
    """What the exported graph serves, from its metadata (config, preprocessing contract, inputs, outputs)."""
    config = meta.get("config", {})
    contract = meta.get("preprocessing", {})
    hidden = int(config.get("hidden_size") or config.get("d_model"))
    vocab = tokenizer.get_vocab()
    if len(vocab) != int(contract.get("vocab_size", len(vocab))):
        raise ValueError("The tokenizer's vocabulary does not belong to the exported model.")
    model_inputs = {t.name for t in wire.MODEL_INPUTS}
    extra_inputs = [i["name"] for i in meta.get("inputs", []) if i["name"] not in model_inputs]
    unsupported = [name for name in extra_inputs if name != wire.BATCH_LABELS.name]
    if unsupported:
        raise NotImplementedError(
            f"Models that take {unsupported} (per-token inputs the server tokenizer does not produce) are not "
            "served; run their ONNX graph with scgpt_hf.export.onnx_export.OnnxScGPT instead."
        )
    outputs = {o["name"]: [d if isinstance(d, int) else -1 for d in list(o.get("shape", []))[1:]]
               for o in meta.get("outputs", [])}
    tok = _tokenizer_settings(tokenizer, contract, max_length=max_length, truncation=truncation, seed=seed,
                              pad_to_multiple_of=pad_to_multiple_of)
    return _Served(
        task=meta.get("task", task), hidden=hidden, vocab=vocab, tokenizer=tok,
        labels=_labels_from_config(config) if wire.LOGITS.name in outputs else None,
        batches=_served_batches(config) if wire.BATCH_LABELS.name in extra_inputs else ServedBatches(),
        outputs=outputs or {wire.CELL_EMBEDDING.name: [hidden]},
        pad_token_id=int(contract.get("pad_token_id", tokenizer.pad_token_id)), pad_value=tok["pad_value"],
        vocab_size=int(contract.get("vocab_size", len(vocab))), model_config=config,
    )


def _write_onnx_encoder(repo: Path, served: _Served, batching: Batching, *, device: str, precision: str,
                        tensorrt: bool, intra_op_num_threads: int) -> None:
    """scgpt_encoder on the graph already in scgpt_encoder/1/: the native onnxruntime backend (gpu), or the
    python backend with ONNX Runtime, the load-time self-check and the request checks (cpu)."""
    from . import selfcheck

    params = served.encoder_parameters()
    if device == "gpu":
        comment = (f"scGPT {served.task} graph ({precision}) on Triton's native onnxruntime backend, on the GPU.\n"
                   "The native backend batches requests of equal shape only: the tokenizer rounds lengths up to\n"
                   f"multiples of {served.tokenizer['pad_to_multiple_of']} so requests in one length bucket share "
                   "a batch.")
        files: dict[str, Path] = {}
    else:
        # self_check "warn": load even where this host computes outside the bound
        params.update(self_check="raise", intra_op_num_threads=int(intra_op_num_threads), onnx_file="model.onnx")
        comment = (f"scGPT {served.task} graph ({precision}) run by ONNX Runtime in a python-backend model (CPU "
                   "servers;\nGPU repositories use the native onnxruntime backend on the same file). Inputs allow "
                   "ragged\nbatches: 1/model.py pads the requests of a dynamic batch to a common length and splits "
                   "the\nresults. Needs numpy and onnxruntime in the server's Python.")
        files = {**_backend_files("encoder", "padding.py"), "selfcheck.py": Path(selfcheck.__file__)}
    config = onnx_encoder_config(served.outputs, batching, params, device=device, tensorrt=tensorrt,
                                 batch_labels=served.batches.needs_batch_labels)
    _write_model(repo, config, comment, files)


def _finish_onnx(repo: Path, report: TritonExportReport, served: _Served, export_report: Mapping[str, Any]) -> None:
    """The graph's hash, the model card and the file list into the report, then the report and the final check."""
    from . import selfcheck

    report.onnx_sha256 = selfcheck.sha256(repo / ENCODER_MODEL / "1" / "model.onnx")
    (repo / "README.md").write_text(_model_card(report, served, export_report), encoding="utf-8")
    report.files = sorted([str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()] + [REPORT_FILE])
    _finish(repo, report.to_json())


# ----------------------------------------------------------------------------------------------
# The PyTorch repository: `scgpt-hf serve MODEL`


TORCH_DEVICES = ("cpu", "cuda")
#: Attention implementations the PyTorch encoder can be served with, and where each runs.
TORCH_ATTENTION = {"sdpa": ("cpu", "cuda"), "eager": ("cpu", "cuda"), "flex_attention": ("cpu", "cuda"),
                   "flash_attention_2": ("cuda",)}
# The library files the PyTorch encoder imports, copied beside its model.py.
_TORCH_FILES = ("configuration_scgpt.py", "modeling_scgpt.py", "inference.py", "padding.py")


def write_torch_repository(
    model_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    *,
    device: str = "cuda",
    precision: str = "auto",
    attn_implementation: str = "sdpa",
    max_batch_size: int | None = None,
    instances: int = 1,
    tokenizer_instances: int = 1,
    max_tokens: int | None = None,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int | None = None,
    gpu_memory_fraction: float | None = None,
    seed: int = 0,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Write a Triton model repository whose encoder runs the PyTorch model (``scgpt-hf serve MODEL``).

    Same models, wire format and ensembles as :func:`export_triton` (``scgpt_vocab``, ``scgpt_tokenizer``,
    ``scgpt_embed``, and for classification models ``scgpt_labels`` / ``scgpt_annotate``); ``scgpt_encoder``
    is a python-backend model that loads the model from `model_dir` (not copied) with `attn_implementation`
    and runs it on `device` ("cuda[:N]" or "cpu") with `precision` autocast ("auto": bf16 on GPUs that
    support it, fp16 on older ones, fp32 on CPU), cells batched by length under `max_tokens` per forward
    (default :data:`scgpt_hf.inference.DEFAULT_MAX_TOKENS`).  `gpu_memory_fraction` caps each encoder
    instance's share of the GPU's memory (for several instances or servers on one GPU).  The server's
    Python needs torch and transformers (``TritonServer(python_path=...)`` can lend them).  The folder is
    built beside `repository_dir` and moved into place whole; an existing one is refused.  Returns the
    report written as ``triton_report.json``.
    """
    from scgpt_hf.atomic import atomic_output
    from scgpt_hf.inference import DEFAULT_MAX_TOKENS

    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json: not a saved scGPT model folder.")
    kind = check_torch_settings(device, precision, attn_implementation)
    if gpu_memory_fraction is not None and not 0 < gpu_memory_fraction <= 1:
        raise ValueError(f"gpu_memory_fraction must lie in (0, 1], got {gpu_memory_fraction}.")
    defaults = "gpu" if kind == "cuda" else "cpu"
    batching = _batching(defaults, max_batch_size, instances, tokenizer_instances, preferred_batch_sizes,
                         max_queue_delay_microseconds)
    max_tokens = DEFAULT_MAX_TOKENS[kind] if max_tokens is None else int(max_tokens)
    served = _served_from_model(model_dir, max_length=max_length, seed=seed,
                                pad_to_multiple_of=_DEFAULTS[defaults][2])
    params: dict[str, Any] = {"model_dir": str(model_dir), "task": served.task, "device": device,
                              "precision": precision, "attn_implementation": attn_implementation,
                              "max_tokens": max_tokens}
    if gpu_memory_fraction is not None:
        params["gpu_memory_fraction"] = float(gpu_memory_fraction)

    # built beside the target and moved into place whole: a kill never leaves a half repository
    with atomic_output(repository_dir, directory=True, what=_WHAT) as repo:
        models, ensembles = _write_served_models(repo, served, batching)
        _write_torch_encoder(repo, served, batching, params)
        report = {"engine": "torch", "model_dir": str(model_dir), "device": device, "precision": precision,
                  "attn_implementation": attn_implementation, "task": served.task,
                  "max_batch_size": batching.max_batch_size, "instances": batching.instances,
                  "tokenizer_instances": batching.tokenizer_instances, "preferred_batch_sizes": list(batching.preferred),
                  "max_queue_delay_microseconds": batching.delay_us, "max_tokens": max_tokens,
                  "gpu_memory_fraction": gpu_memory_fraction, "models": models, "ensembles": ensembles,
                  "tokenizer": served.tokenizer, "labels": served.labels}
        _finish(repo, json.dumps(report, indent=2, sort_keys=True))
    return report


def check_torch_settings(device: str, precision: str, attn_implementation: str) -> str:
    """Raise ValueError for settings a PyTorch encoder cannot run with; returns the device kind ("cpu"/"cuda")."""
    from scgpt_hf.inference import PRECISIONS

    kind = device.split(":")[0]
    if kind not in TORCH_DEVICES or (":" in device and not device.split(":")[1].isdigit()):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if kind not in TORCH_ATTENTION.get(attn_implementation, ()):
        runs = [a for a, where in TORCH_ATTENTION.items() if kind in where]
        raise ValueError(f"attn_implementation={attn_implementation!r} cannot run on {kind}; choose one of {runs}.")
    return kind


def _served_from_model(model_dir: Path, *, max_length: int | None, seed: int, pad_to_multiple_of: int) -> _Served:
    """What a saved model folder serves, from its config.json and tokenizer (no weights are loaded)."""
    from transformers import AutoConfig

    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    from .onnx_export import preprocessing_contract

    config = AutoConfig.from_pretrained(model_dir)
    _check_servable(config)
    task = ANNOTATION_TASK if "ScGPTForCellClassification" in (config.architectures or []) else "embedding"
    tokenizer = ScGPTTokenizer.from_pretrained(model_dir)
    _check_sparse_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    if len(vocab) != config.vocab_size:
        raise ValueError("The tokenizer's vocabulary does not belong to the model.")
    tok = _tokenizer_settings(tokenizer, preprocessing_contract(config, tokenizer, task), max_length=max_length,
                              truncation=None, seed=seed, pad_to_multiple_of=pad_to_multiple_of)
    hidden = int(config.hidden_size)
    labels = _labels_from_config(config.to_dict()) if task == ANNOTATION_TASK else None
    outputs = {wire.LOGITS.name: [len(labels)]} if labels is not None else {}
    return _Served(
        task=task, hidden=hidden, vocab=vocab, tokenizer=tok, labels=labels,
        batches=_served_batches(config.to_dict()) if config.needs_batch_labels else ServedBatches(),
        outputs={**outputs, wire.CELL_EMBEDDING.name: [hidden]}, pad_token_id=int(config.pad_token_id),
        pad_value=float(config.pad_value), vocab_size=int(config.vocab_size), model_config=config.to_dict(),
    )


def _write_torch_encoder(repo: Path, served: _Served, batching: Batching, params: Mapping[str, Any]) -> None:
    """scgpt_encoder: the torch backend beside the library's own modeling and inference files."""
    comment = (f"scGPT {served.task} model run by PyTorch on {params['device']} ({params['precision']} precision, "
               f"{params['attn_implementation']} attention)\nin a python-backend model: 1/model.py with the "
               "library's own modeling and inference files. Inputs\nallow ragged batches: the cells of a dynamic "
               "batch are regrouped by length, at most max_tokens\ntokens per forward. Needs torch and "
               "transformers in the server's Python.")
    config = torch_encoder_config(served.outputs, batching, {**served.encoder_parameters(), **params},
                                  batch_labels=served.batches.needs_batch_labels)
    _write_model(repo, config, comment, _backend_files("torch", *_TORCH_FILES))


# ----------------------------------------------------------------------------------------------
# The model card (README.md of an exported repository)


def _model_card(report: TritonExportReport, served: _Served, export_report: Mapping[str, Any]) -> str:
    """README.md of an exported repository: what it is, its models, the wire format, how to serve and query it."""
    return "\n".join([
        _card_header(report, served.model_config, export_report),
        _card_models(report),
        _card_wire_format(report, served),
        _card_serve(served.batches),
    ])


def _card_header(report: TritonExportReport, config: Mapping[str, Any], export_report: Mapping[str, Any]) -> str:
    size = (f"{config.get('hidden_size')} hidden, {config.get('num_hidden_layers')} layers, "
            f"{config.get('num_attention_heads')} heads, vocabulary {config.get('vocab_size')}")
    validation = export_report.get("validation", {}) if export_report else {}
    if validation and not validation.get("skipped"):
        checked = (f"ONNX validated against PyTorch on {validation.get('data')} ({validation.get('criterion')}): "
                   f"{'passed' if export_report.get('passed') else 'FAILED'}.")
    else:
        checked = "ONNX validation: skipped or not recorded."
    if report.device == "cpu":
        checked += (" At load the encoder runs the graph on the export's cells (`scgpt_encoder/1/selfcheck.npz`) "
                    "and does not load on a host that computes them outside that bound (parameter `self_check`: "
                    "`raise`, or `warn` to load with a warning).")
    return (f"# scGPT Triton model repository\n\nscGPT ({report.task}, {size}) for Triton Inference Server, built "
            f"by `scgpt-hf export triton`\nfor **{report.device}** ({report.precision}). {checked}\n")


def _card_models(report: TritonExportReport) -> str:
    engine = ("native onnxruntime backend, KIND_GPU" if report.device == "gpu"
              else "python backend running ONNX Runtime, KIND_CPU")
    rows = [
        "| model | what |",
        "|---|---|",
        "| `scgpt_vocab` | python, numpy only: gene names (BYTES) -> vocabulary ids, -1 where unknown; once per "
        "dataset |",
        "| `scgpt_tokenizer` | python, numpy only: counts -> `input_ids`, `values`, `attention_mask` (exactly "
        "`ScGPTTokenizer`) |",
        f"| `scgpt_encoder` | the ONNX graph ({engine}); dynamic batching, preferred sizes "
        f"{report.preferred_batch_sizes}, queue delay {report.max_queue_delay_microseconds} us, {report.instances} "
        "instance(s) |",
        *(f"| `{k}` | {v} |" for k, v in report.ensembles.items()),
    ]
    return "\n".join(rows) + "\n"


def _card_wire_format(report: TritonExportReport, served: _Served) -> str:
    tok, batches = report.tokenizer, served.batches
    batch_row = batch_error = annotate = ""
    if batches.needs_batch_labels:
        names = sorted(batches.batch2id or {}, key=(batches.batch2id or {}).get)
        named = (f"the ensembles' `batch2id` parameter maps the model's batch names ({', '.join(names[:6])}"
                 f"{', ...' if len(names) > 6 else ''}) to ids" if names else "the model has no batch names")
        batch_row = (f"| `batch_labels` | INT64 | [cells, 1] | each cell's batch id in 0..{batches.num_batch_labels - 1}, "
                     f"the batches the model was fine-tuned on; {named} |\n")
        if report.device == "cpu":
            batch_error = f", batch ids outside [0, {batches.num_batch_labels})"
        else:
            batch_row += ("\nThe native onnxruntime backend does not range-check `batch_labels`: send them through "
                          "`TritonClient`, which maps and checks them.\n")
    if report.labels is not None:
        shown = ", ".join(report.labels[:8]) + (", ..." if len(report.labels) > 8 else "")
        annotate = (f"\n`scgpt_annotate` answers `label` (BYTES), `probability` and `probabilities` over "
                    f"{len(report.labels)} classes ({shown}), plus `cell_embedding` and `n_genes`.\n")
    return f"""## Wire format

Cells are the batch dimension (at most {report.max_batch_size} per request); a request pads its cells to its widest cell.

| input | type | shape | meaning |
|---|---|---|---|
| `gene_ids` | INT64 | [cells, n] | vocabulary ids of the cell's measured genes, in the dataset's column order; -1 = unused slot (padding, unknown gene) |
| `counts` | FP32 | [cells, n] | expression values: raw counts or normalised/log1p (binning is rank-based per cell); 0 = not expressed |
{batch_row}
`scgpt_embed` answers `cell_embedding` FP32 [cells, {served.hidden}] (raw; L2-normalise it as
`scgpt_hf.embed` does) and `n_genes` INT64 [cells, 1] (expressed vocabulary genes before truncation).
{annotate}
Tokenizer settings: {tok['n_bins']} bins, `<cls>` value {tok['cls_value']}, pad value {tok['pad_value']},
max length {tok['max_length']} tokens (truncation: {tok['truncation']}), seed {tok['seed']} (per-cell tie-breaking is seeded
by the seed and the cell's content, so a cell gets the same answer in any batch), lengths rounded up to multiples
of {tok['pad_to_multiple_of']}.

Errors come back per request and the server keeps serving: wrong dtype or rank (rejected by Triton), `gene_ids` and
`counts` of different shapes, ids outside the vocabulary, a gene twice in a cell, negative or non-finite
counts, a cell with no expressed vocabulary gene{batch_error}, more than {report.max_batch_size} cells.
"""


def _card_serve(batches: ServedBatches) -> str:
    embed_call = "client.embed(adata, batch_size=32, concurrency=4)"
    if batches.needs_batch_labels:
        embed_call = 'client.embed(adata, batch_key="batch", batch_size=32)  # obs["batch"]: names or ids'
    return f"""## Serve and query

```bash
scgpt-hf serve REPOSITORY_DIR        # local CPU server (bash scripts/setup_triton_server.sh once)
# GPU: docker run --gpus=1 --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/REPOSITORY_DIR:/models \\
#      nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models
```

```python
from scgpt_hf.serving import TritonClient
client = TritonClient("127.0.0.1:8001", protocol="grpc")
{embed_call}   # -> adata.obsm["X_scGPT"], obs["X_scGPT_n_genes"]
```

`export_report.json`: the ONNX export (fusion, precision, validation figures). `triton_report.json`: this
repository's settings and files.
"""


# ----------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `triton` on the `export` command's subparsers (`scgpt-hf export triton MODEL REPOSITORY_DIR`)."""
    p = subparsers.add_parser(
        "triton",
        help="write a Triton model repository (tokenizer, encoder, embed/annotate ensembles)",
        description=(
            "Export MODEL to ONNX and write a complete Triton model repository: scgpt_vocab and scgpt_tokenizer "
            "(python backend, numpy only), scgpt_encoder (native onnxruntime backend on gpu, python backend + "
            "ONNX Runtime on cpu), the scgpt_embed ensemble and, for classification models, scgpt_annotate."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="local model folder or Hub id")
    p.add_argument("repository", metavar="REPOSITORY_DIR", help="output folder for the model repository")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="gpu: onnxruntime backend, KIND_GPU; cpu: "
                   "python backend with ONNX Runtime (default: cpu)")
    p.add_argument("--max-batch-size", type=int, default=None, help="cells per request/batch (default 64 gpu, 16 cpu)")
    p.add_argument("--instances", type=int, default=1, help="encoder instances (default 1)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="ONNX precision (default fp16 on gpu, fp32 on cpu)")
    p.add_argument("--tensorrt", action="store_true", help="add the TensorRT accelerator (FP16) on gpu")
    p.add_argument("--onnx-dir", default=None, help="reuse an `scgpt-hf export onnx` folder instead of exporting")
    p.add_argument("--seed", type=int, default=0, help="server tokenizer seed (default 0)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per cell incl. <cls> (default: tokenizer's)")
    p.add_argument("--pad-to-multiple-of", type=int, default=None, help="length bucket (default 64 gpu, 8 cpu)")
    p.add_argument("--queue-delay-us", type=int, default=None, help="dynamic batching queue delay in microseconds")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip ONNX vs PyTorch validation")
    p.add_argument("--overwrite", action="store_true", help="replace REPOSITORY_DIR if it exists (default: refuse)")
    p.set_defaults(func=run_export_triton)
    return p


def run_export_triton(args: argparse.Namespace) -> int:
    """Handler of `scgpt-hf export triton`: returns 0; a failure raises, for the CLI to print as one line (exit
    code 2), a failed ONNX validation or a model the repository cannot serve as its `CommandError`."""
    from scgpt_hf.cli import CommandError, model_argument

    from .onnx_export import ExportValidationError

    with model_argument(args.model):
        try:
            report = export_triton(
                args.model, args.repository, device=args.device, max_batch_size=args.max_batch_size,
                instances=args.instances, precision=args.precision, tensorrt=args.tensorrt, onnx_dir=args.onnx_dir,
                seed=args.seed, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of,
                max_queue_delay_microseconds=args.queue_delay_us, validate=args.validate, overwrite=args.overwrite,
            )
        except (ExportValidationError, NotImplementedError) as err:
            raise CommandError(str(err)) from None
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: `python -m scgpt_hf.export.triton MODEL REPOSITORY_DIR ...` (the same as
    `scgpt-hf export triton`)."""
    from scgpt_hf.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["export", "triton", *(argv[1:] if argv[:1] == ["triton"] else argv)])


if __name__ == "__main__":
    sys.exit(main())
