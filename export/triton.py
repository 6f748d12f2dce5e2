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

Wire format of ``scgpt_embed`` / ``scgpt_annotate`` / ``scgpt_tokenizer`` (cells are the batch
dimension; a request pads its cells to its own widest cell):

* ``gene_ids`` INT64 [batch, n]: vocabulary ids of a cell's measured genes in column order, -1 for
  an unused slot (padding, unknown gene); ``scgpt_vocab`` maps a dataset's gene names to ids once.
* ``counts``   FP32  [batch, n]: expression values (raw counts or normalised/log1p).

The tokenizer model loads ``cell_encoding.py``, the same file `ScGPTTokenizer` imports, copied
beside its ``model.py``: one implementation, numpy only (runs in a stock Triton container's Python).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANNOTATE_MODEL",
    "EMBED_MODEL",
    "ENCODER_MODEL",
    "LABELS_MODEL",
    "TOKENIZER_MODEL",
    "VOCAB_MODEL",
    "TritonExportReport",
    "add_parser",
    "export_triton",
    "parse_model_config",
    "check_torch_settings",
    "validate_repository",
    "write_torch_repository",
]

VOCAB_MODEL = "scgpt_vocab"
TOKENIZER_MODEL = "scgpt_tokenizer"
ENCODER_MODEL = "scgpt_encoder"
EMBED_MODEL = "scgpt_embed"
LABELS_MODEL = "scgpt_labels"
ANNOTATE_MODEL = "scgpt_annotate"
DEVICES = ("cpu", "gpu")
REPORT_FILE = "triton_report.json"
_HERE = Path(__file__).resolve().parent
_TEMPLATES = {
    "tokenizer": _HERE / "triton_backend_tokenizer.py",
    "vocab": _HERE / "triton_backend_vocab.py",
    "encoder": _HERE / "triton_backend_encoder.py",
    "labels": _HERE / "triton_backend_labels.py",
    "torch": _HERE / "triton_backend_torch.py",
}
_DEFAULTS = {  # device -> (max batch size, precision, pad_to_multiple_of, queue delay in microseconds)
    "cpu": (16, "fp32", 8, 2000),
    "gpu": (64, "fp16", 64, 1000),
}
ANNOTATION_TASK = "annotation"


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
# config.pbtxt writing


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: Sequence[int], *, ragged: bool = False, optional: bool = False,
            reshape: Sequence[int] | None = None) -> str:
    extra = "\n    allow_ragged_batch: true" if ragged else ""
    extra += "\n    optional: true" if optional else ""
    extra += f"\n    reshape: {{ shape: {_dims(reshape)} }}" if reshape is not None else ""
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {_dims(dims)}{extra}\n  }}'


def _io(kind: str, tensors: Sequence[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _parameters(params: dict[str, Any]) -> str:
    return "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(str(v))} }}\n}}\n' for k, v in params.items()
    )


def _dynamic_batching(preferred: Sequence[int], delay_us: int) -> str:
    return (
        "dynamic_batching {\n"
        f"  preferred_batch_size: {_dims(preferred)}\n"
        f"  max_queue_delay_microseconds: {int(delay_us)}\n"
        "}\n"
    )


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {int(count)}\n    kind: {kind}\n  }}\n]\n"


def _header(name: str, comment: str, *, backend: str | None = None, platform: str | None = None,
            max_batch_size: int) -> str:
    lines = [f"# {line}" if line else "#" for line in comment.strip().splitlines()]
    out = "\n".join(lines) + f'\nname: "{name}"\n'
    if platform:
        out += f'platform: "{platform}"\n'
    if backend:
        out += f'backend: "{backend}"\n'
    return out + f"max_batch_size: {int(max_batch_size)}\n"


def _ensemble_step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = "".join(f'      input_map {{\n        key: "{k}"\n        value: "{v}"\n      }}\n' for k, v in inputs.items())
    maps += "".join(f'      output_map {{\n        key: "{k}"\n        value: "{v}"\n      }}\n' for k, v in outputs.items())
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps}    }}'


def _ensemble(steps: Sequence[str]) -> str:
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def parse_model_config(text: str) -> Any:
    """Parse config.pbtxt text with Triton's own ``ModelConfig`` protobuf (tritonclient's model_config_pb2)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def validate_repository(repository: str | os.PathLike) -> dict[str, Any]:
    """Parse every ``*/config.pbtxt`` of a repository with Triton's ModelConfig; check names and ensemble wiring.

    Returns {model name: parsed ModelConfig}; raises ValueError naming the file and the problem.
    """
    repository = Path(repository)
    configs: dict[str, Any] = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        try:
            cfg = parse_model_config(path.read_text())
        except Exception as err:  # noqa: BLE001 - text_format.ParseError and friends
            raise ValueError(f"{path} does not parse as a Triton ModelConfig: {err}") from err
        if cfg.name != path.parent.name:
            raise ValueError(f"{path}: name {cfg.name!r} differs from its folder {path.parent.name!r}")
        if not any(p.is_dir() and p.name.isdigit() for p in path.parent.iterdir()):
            raise ValueError(f"{path.parent} has no version folder (e.g. 1/)")
        configs[cfg.name] = cfg
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
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
    return configs


# ----------------------------------------------------------------------------------------------
# Building


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


def _batch_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Config parameters naming a batch-label model's batches, for clients mapping batch names to ids."""
    batch2id = config.get("batch2id") or {}
    params: dict[str, Any] = {"num_batch_labels": int(config["num_batch_labels"])}
    if batch2id:
        params["batch2id"] = json.dumps(dict(sorted(batch2id.items(), key=lambda kv: kv[1])), ensure_ascii=False)
    return params


def _preferred(max_batch_size: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64, 128, 256) if s <= max_batch_size]
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sizes[-3:]


def _labels_from_config(config: dict[str, Any]) -> list[str]:
    id2label = config.get("id2label") or {}
    n = int(config.get("num_labels") or len(id2label))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def _tokenizer_settings(tokenizer: Any, contract: dict[str, Any], *, max_length: int | None,
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


def _write_tokenizer_models(repo: Path, tok: dict[str, Any], vocab: dict[str, int], *, max_batch_size: int,
                            preferred: list[int], delay: int, tokenizer_instances: int) -> None:
    """scgpt_vocab and scgpt_tokenizer: python backend, numpy only, the library's own cell_encoding.py."""
    from scgpt_hf import cell_encoding

    vocab_json = json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), indent=0, ensure_ascii=False) + "\n"
    for model_name, template in ((VOCAB_MODEL, "vocab"), (TOKENIZER_MODEL, "tokenizer")):
        version = repo / model_name / "1"
        version.mkdir(parents=True)
        shutil.copy2(_TEMPLATES[template], version / "model.py")
        shutil.copy2(Path(cell_encoding.__file__), version / "cell_encoding.py")
        (version / "vocab.json").write_text(vocab_json, encoding="utf-8")
    specials = {k: tok[k] for k in ("pad_token", "cls_token", "eoc_token")}
    (repo / VOCAB_MODEL / "config.pbtxt").write_text(
        _header(VOCAB_MODEL, (
            "Gene names -> vocabulary ids (-1: not in the vocabulary, repeated, or a special token).\n"
            "Clients call it once per dataset and then send ids with each batch of cells.\n"
            "Python backend, numpy only: 1/model.py with 1/cell_encoding.py and 1/vocab.json."
        ), backend="python", max_batch_size=0)
        + _io("input", [_tensor("gene_names", "TYPE_STRING", [-1])])
        + _io("output", [_tensor("gene_ids", "TYPE_INT64", [-1])])
        + _instances(1, "KIND_CPU") + _parameters(specials)
    )
    (repo / TOKENIZER_MODEL / "config.pbtxt").write_text(
        _header(TOKENIZER_MODEL, (
            "Counts of cells -> scGPT model inputs, exactly as ScGPTTokenizer.encode_with_ids.\n"
            "gene_ids [batch, n]: vocabulary ids in column order, -1 = unused slot; counts [batch, n]: values.\n"
            "Each cell: <cls> (cls_value), then its expressed genes with per-cell quantile bins (tie-breaking\n"
            "seeded by `seed` and the cell's content), cut to max_length tokens; padded to the request's\n"
            "longest cell, rounded up to pad_to_multiple_of. Python backend, numpy only (1/cell_encoding.py)."
        ), backend="python", max_batch_size=max_batch_size)
        + _io("input", [_tensor("gene_ids", "TYPE_INT64", [-1], ragged=True),
                        _tensor("counts", "TYPE_FP32", [-1], ragged=True)])
        + _io("output", [_tensor("input_ids", "TYPE_INT64", [-1]), _tensor("values", "TYPE_FP32", [-1]),
                         _tensor("attention_mask", "TYPE_INT64", [-1]), _tensor("n_genes", "TYPE_INT64", [1])])
        + _dynamic_batching(preferred, delay) + _instances(tokenizer_instances, "KIND_CPU") + _parameters(tok)
    )


def _write_ensembles(repo: Path, *, hidden: int, labels: list[str] | None, batch_params: dict[str, Any],
                     max_batch_size: int, preferred: list[int], delay: int, tokenizer_instances: int
                     ) -> tuple[list[str], dict[str, str]]:
    """scgpt_embed (and, for a classification head, scgpt_labels and scgpt_annotate) around scgpt_encoder;
    returns (every model of the repository, {ensemble: what it chains})."""
    batch_in = [_tensor("batch_labels", "TYPE_INT64", [1])] if batch_params else []
    wire_in = [_tensor("gene_ids", "TYPE_INT64", [-1]), _tensor("counts", "TYPE_FP32", [-1]), *batch_in]
    tok_step = _ensemble_step(TOKENIZER_MODEL, {"gene_ids": "gene_ids", "counts": "counts"},
                              {"input_ids": "_input_ids", "values": "_values", "attention_mask": "_attention_mask",
                               "n_genes": "n_genes"})
    enc_in = {"input_ids": "_input_ids", "values": "_values", "attention_mask": "_attention_mask"}
    wire_names = "gene_ids, counts"
    batch_note = ""
    if batch_params:  # straight to the encoder: the tokenizer does not need it
        enc_in["batch_labels"] = "batch_labels"
        wire_names += ", batch_labels"
        batch_note = ("\nbatch_labels [cells, 1]: each cell's batch id; the batch2id parameter names the model's "
                      f"{batch_params['num_batch_labels']} batches.")
    ensembles = {EMBED_MODEL: f"{TOKENIZER_MODEL} -> {ENCODER_MODEL}: {wire_names} -> cell_embedding, n_genes"}
    (repo / EMBED_MODEL / "1").mkdir(parents=True)
    (repo / EMBED_MODEL / "1" / ".gitkeep").write_text("")
    (repo / EMBED_MODEL / "config.pbtxt").write_text(
        _header(EMBED_MODEL, (
            "Counts in, cell embeddings out: scgpt_tokenizer then scgpt_encoder.\n"
            "cell_embedding is the model's raw cell embedding (clients L2-normalise it, as scgpt_hf.embed does);\n"
            "n_genes: each cell's expressed vocabulary genes before truncation." + batch_note
        ), platform="ensemble", max_batch_size=max_batch_size)
        + _io("input", wire_in)
        + _io("output", [_tensor("cell_embedding", "TYPE_FP32", [hidden]), _tensor("n_genes", "TYPE_INT64", [1])])
        + _ensemble([tok_step, _ensemble_step(ENCODER_MODEL, enc_in, {"cell_embedding": "cell_embedding"})])
        + _parameters(batch_params)
    )
    models = [VOCAB_MODEL, TOKENIZER_MODEL, ENCODER_MODEL, EMBED_MODEL]
    if labels is not None:
        n = len(labels)
        version = repo / LABELS_MODEL / "1"
        version.mkdir(parents=True)
        shutil.copy2(_TEMPLATES["labels"], version / "model.py")
        (version / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (repo / LABELS_MODEL / "config.pbtxt").write_text(
            _header(LABELS_MODEL, "Classifier logits -> label (argmax), its probability and all probabilities "
                    "(softmax).\nPython backend, numpy only; class names in 1/labels.json.",
                    backend="python", max_batch_size=max_batch_size)
            + _io("input", [_tensor("logits", "TYPE_FP32", [n])])
            + _io("output", [_tensor("label", "TYPE_STRING", [1]), _tensor("probability", "TYPE_FP32", [1]),
                             _tensor("probabilities", "TYPE_FP32", [n])])
            + _dynamic_batching(preferred, delay) + _instances(tokenizer_instances, "KIND_CPU")
        )
        (repo / ANNOTATE_MODEL / "1").mkdir(parents=True)
        (repo / ANNOTATE_MODEL / "1" / ".gitkeep").write_text("")
        (repo / ANNOTATE_MODEL / "config.pbtxt").write_text(
            _header(ANNOTATE_MODEL, "Counts in, cell types out: scgpt_tokenizer, scgpt_encoder, scgpt_labels."
                    + batch_note, platform="ensemble", max_batch_size=max_batch_size)
            + _io("input", wire_in)
            + _io("output", [_tensor("label", "TYPE_STRING", [1]), _tensor("probability", "TYPE_FP32", [1]),
                             _tensor("probabilities", "TYPE_FP32", [n]), _tensor("cell_embedding", "TYPE_FP32", [hidden]),
                             _tensor("n_genes", "TYPE_INT64", [1])])
            + _ensemble([
                tok_step,
                _ensemble_step(ENCODER_MODEL, enc_in, {"logits": "_logits", "cell_embedding": "cell_embedding"}),
                _ensemble_step(LABELS_MODEL, {"logits": "_logits"},
                               {"label": "label", "probability": "probability", "probabilities": "probabilities"}),
            ])
            + _parameters(batch_params)
        )
        models += [LABELS_MODEL, ANNOTATE_MODEL]
        ensembles[ANNOTATE_MODEL] = (f"{TOKENIZER_MODEL} -> {ENCODER_MODEL} -> {LABELS_MODEL}: {wire_names} -> "
                                     "label, probability, probabilities, cell_embedding, n_genes")
    return models, ensembles


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
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    from . import selfcheck
    from .onnx_export import PRECISIONS, export_onnx, read_onnx_metadata

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    default_batch, default_precision, default_multiple, default_delay = _DEFAULTS[device]
    max_batch_size = int(max_batch_size or default_batch)
    precision = precision or default_precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if device == "gpu" and precision == "int8":
        raise ValueError("int8 (dynamic quantisation) is for CPU hosts; use fp16 on gpu.")
    if max_batch_size < 1 or int(instances) < 1 or int(tokenizer_instances) < 1:
        raise ValueError("max_batch_size, instances and tokenizer_instances must be at least 1.")
    if tensorrt and device != "gpu":
        raise ValueError("tensorrt applies to --device gpu only.")
    pad_multiple = int(pad_to_multiple_of or default_multiple)
    delay = int(default_delay if max_queue_delay_microseconds is None else max_queue_delay_microseconds)
    preferred = sorted({int(s) for s in (preferred_batch_sizes or _preferred(max_batch_size))})
    if any(s < 1 or s > max_batch_size for s in preferred):
        raise ValueError(f"preferred batch sizes {preferred} must lie in 1..max_batch_size={max_batch_size}.")

    target = check_writable(repository_dir, overwrite=overwrite, what="Triton model repository")
    classifier = False
    if onnx_dir is None:  # refuse before any work
        source_config = _source_config(model_or_path)
        _check_servable(source_config)
        classifier = _is_classifier(model_or_path, source_config)

    with atomic_output(target, overwrite=overwrite, directory=True, what="Triton model repository") as repo:
        # 1. ONNX graph (export, or reuse one).
        task = ANNOTATION_TASK if classifier else "embedding"
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(onnx_dir) if onnx_dir is not None else Path(tmp) / "onnx"  # export_onnx makes it
            if onnx_dir is None:
                export_onnx(model_or_path, src, task=task, precision=precision, validate=validate,
                            tokenizer=tokenizer, seed=seed, verbose=verbose)
            meta = read_onnx_metadata(src / "model.onnx")
            task = meta.get("task", task)
            if tokenizer is None:
                for candidate in (src, model_or_path if isinstance(model_or_path, (str, os.PathLike)) else None):
                    if candidate is not None and Path(candidate, "vocab.json").is_file():
                        tokenizer = ScGPTTokenizer.from_pretrained(os.fspath(candidate))
                        break
                else:
                    if isinstance(model_or_path, (str, os.PathLike)):
                        tokenizer = ScGPTTokenizer.from_pretrained(os.fspath(model_or_path))
                    else:
                        raise ValueError("No tokenizer found beside the model; pass tokenizer=ScGPTTokenizer(...).")
            if tokenizer.include_zero_genes:
                raise NotImplementedError("The server tokenizer takes sparse counts: include_zero_genes is not supported.")
            encoder_dir = repo / ENCODER_MODEL / "1"
            encoder_dir.mkdir(parents=True)
            shutil.copy2(src / "model.onnx", encoder_dir / "model.onnx")
            for companion in ("model.onnx.data", selfcheck.FILE):  # the graph's external weights, its self-check
                if (src / companion).exists():
                    shutil.copy2(src / companion, encoder_dir / companion)
            export_report: dict[str, Any] = {}
            if (src / "export_report.json").is_file():
                export_report = json.loads((src / "export_report.json").read_text())
                export_report.pop("model_path", None)  # a temporary path
                export_report.pop("timings_s", None)
                (repo / "export_report.json").write_text(json.dumps(export_report, indent=2) + "\n")

        config = meta.get("config", {})
        contract = meta.get("preprocessing", {})
        outputs_meta = {o["name"]: o for o in meta.get("outputs", [])}
        hidden = int(config.get("hidden_size") or config.get("d_model"))
        vocab = tokenizer.get_vocab()
        if len(vocab) != int(contract.get("vocab_size", len(vocab))):
            raise ValueError("The tokenizer's vocabulary does not belong to the exported model.")
        extra_inputs = [i["name"] for i in meta.get("inputs", []) if i["name"] not in ("input_ids", "values", "attention_mask")]
        unsupported = [name for name in extra_inputs if name != "batch_labels"]
        if unsupported:
            raise NotImplementedError(
                f"Models that take {unsupported} (per-token inputs the server tokenizer does not produce) are not "
                "served; run their ONNX graph with scgpt_hf.export.onnx_export.OnnxScGPT instead."
            )
        batch_params = _batch_parameters(config) if "batch_labels" in extra_inputs else {}
        tok = _tokenizer_settings(tokenizer, contract, max_length=max_length, truncation=truncation, seed=seed,
                                  pad_to_multiple_of=pad_multiple)
        labels = _labels_from_config(config) if "logits" in outputs_meta else None

        _write_tokenizer_models(repo, tok, vocab, max_batch_size=max_batch_size, preferred=preferred, delay=delay,
                                tokenizer_instances=tokenizer_instances)

        # 3. encoder: the same ONNX file, native onnxruntime backend (gpu) or python backend + ONNX Runtime (cpu).
        enc_outputs: dict[str, list[int]] = {}
        for name, info in outputs_meta.items():
            shape = list(info.get("shape", []))[1:]
            enc_outputs[name] = [-1 if not isinstance(d, int) else int(d) for d in shape]
        if not enc_outputs:
            enc_outputs = {"cell_embedding": [hidden]}
        enc_out = [_tensor(n, "TYPE_FP32", dims) for n, dims in enc_outputs.items()]
        enc_params = {"pad_token_id": int(contract.get("pad_token_id", tokenizer.pad_token_id)),
                      "pad_value": tok["pad_value"], "vocab_size": int(contract.get("vocab_size", len(vocab)))}
        ragged = device == "cpu"  # the python backend pads ragged batches itself; the native backend cannot
        enc_in_tensors = [_tensor("input_ids", "TYPE_INT64", [-1], ragged=ragged),
                          _tensor("values", "TYPE_FP32", [-1], ragged=ragged),
                          _tensor("attention_mask", "TYPE_INT64", [-1], ragged=ragged)]
        if batch_params:  # one id per cell: [cells, 1] on the wire, [cells] as the ONNX graph takes it
            enc_in_tensors.append(_tensor("batch_labels", "TYPE_INT64", [1], reshape=[]))
            enc_params["num_batch_labels"] = batch_params["num_batch_labels"]
        if device == "gpu":
            accel = ""
            if tensorrt:
                accel = (
                    "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
                    '      name : "tensorrt"\n'
                    '      parameters { key: "precision_mode" value: "FP16" }\n'
                    '      parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
                    '      parameters { key: "trt_engine_cache_enable" value: "1" }\n'
                    '      parameters { key: "trt_engine_cache_path" value: "/tmp/scgpt_trt_cache" }\n'
                    "    } ]\n  }\n}\n"
                )
            encoder_cfg = (
                _header(ENCODER_MODEL, (
                    f"scGPT {task} graph ({precision}) on Triton's native onnxruntime backend, on the GPU.\n"
                    "The native backend batches requests of equal shape only: the tokenizer rounds lengths up to\n"
                    f"multiples of {pad_multiple} so requests in one length bucket share a batch."
                ), platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=max_batch_size)
                + 'default_model_filename: "model.onnx"\n'
                + _io("input", enc_in_tensors)
                + _io("output", enc_out)
                + _dynamic_batching(preferred, delay) + _instances(instances, "KIND_GPU") + accel
            )
        else:
            shutil.copy2(_TEMPLATES["encoder"], encoder_dir / "model.py")
            shutil.copy2(Path(selfcheck.__file__), encoder_dir / "selfcheck.py")
            enc_params["self_check"] = "raise"  # "warn": load even where this host computes outside the bound
            enc_params["intra_op_num_threads"] = int(intra_op_num_threads)
            enc_params["onnx_file"] = "model.onnx"
            encoder_cfg = (
                _header(ENCODER_MODEL, (
                    f"scGPT {task} graph ({precision}) run by ONNX Runtime in a python-backend model (CPU servers;\n"
                    "GPU repositories use the native onnxruntime backend on the same file). Inputs allow ragged\n"
                    "batches: 1/model.py pads the requests of a dynamic batch to a common length and splits the\n"
                    "results. Needs numpy and onnxruntime in the server's Python."
                ), backend="python", max_batch_size=max_batch_size)
                + _io("input", enc_in_tensors)
                + _io("output", enc_out)
                + _dynamic_batching(preferred, delay) + _instances(instances, "KIND_CPU")
            )
        (repo / ENCODER_MODEL / "config.pbtxt").write_text(encoder_cfg + _parameters(enc_params))

        models, ensembles = _write_ensembles(repo, hidden=hidden, labels=labels, batch_params=batch_params,
                                             max_batch_size=max_batch_size, preferred=preferred, delay=delay,
                                             tokenizer_instances=tokenizer_instances)

        report = TritonExportReport(
            repository=target.name, device=device, precision=precision, task=task, max_batch_size=max_batch_size,
            instances=int(instances), preferred_batch_sizes=preferred, max_queue_delay_microseconds=delay,
            pad_to_multiple_of=pad_multiple, tensorrt=bool(tensorrt), models=models, ensembles=ensembles,
            tokenizer={k: v for k, v in tok.items()}, encoder_outputs=enc_outputs, labels=labels,
            onnx_sha256=selfcheck.sha256(encoder_dir / "model.onnx"),
            onnx_validation_passed=export_report.get("passed") if export_report else None,
        )
        (repo / "README.md").write_text(_model_card(report, config, export_report, batch_params), encoding="utf-8")
        report.files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) + [REPORT_FILE]
        report.files.sort()
        (repo / REPORT_FILE).write_text(report.to_json() + "\n")
        try:
            validate_repository(repo)
        except ImportError:  # tritonclient not installed: the configs are checked by the tests instead
            pass
    return report


TORCH_DEVICES = ("cpu", "cuda")
#: Attention implementations the PyTorch encoder can be served with, and where each runs.
TORCH_ATTENTION = {"sdpa": ("cpu", "cuda"), "eager": ("cpu", "cuda"), "flex_attention": ("cpu", "cuda"),
                   "flash_attention_2": ("cuda",)}
# The library files the PyTorch encoder imports, copied beside its model.py.
_TORCH_FILES = ("configuration_scgpt.py", "modeling_scgpt.py", "inference.py")


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
    from transformers import AutoConfig

    import scgpt_hf
    from scgpt_hf.atomic import atomic_output
    from scgpt_hf.inference import DEFAULT_MAX_TOKENS
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    from .onnx_export import _preprocessing_contract

    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json: not a saved scGPT model folder.")
    kind = check_torch_settings(device, precision, attn_implementation)
    if gpu_memory_fraction is not None and not 0 < gpu_memory_fraction <= 1:
        raise ValueError(f"gpu_memory_fraction must lie in (0, 1], got {gpu_memory_fraction}.")
    default_batch, _, pad_multiple, default_delay = _DEFAULTS["gpu" if kind == "cuda" else "cpu"]
    max_batch_size = int(max_batch_size or default_batch)
    if max_batch_size < 1 or int(instances) < 1 or int(tokenizer_instances) < 1:
        raise ValueError("max_batch_size, instances and tokenizer_instances must be at least 1.")
    delay = int(default_delay if max_queue_delay_microseconds is None else max_queue_delay_microseconds)
    preferred = sorted({int(s) for s in (preferred_batch_sizes or _preferred(max_batch_size))})
    if any(s < 1 or s > max_batch_size for s in preferred):
        raise ValueError(f"preferred batch sizes {preferred} must lie in 1..max_batch_size={max_batch_size}.")
    max_tokens = DEFAULT_MAX_TOKENS[kind] if max_tokens is None else int(max_tokens)

    config = AutoConfig.from_pretrained(model_dir)
    _check_servable(config)
    task = ANNOTATION_TASK if "ScGPTForCellClassification" in (config.architectures or []) else "embedding"
    tokenizer = ScGPTTokenizer.from_pretrained(model_dir)
    if tokenizer.include_zero_genes:
        raise NotImplementedError("The server tokenizer takes sparse counts: include_zero_genes is not supported.")
    vocab = tokenizer.get_vocab()
    if len(vocab) != config.vocab_size:
        raise ValueError("The tokenizer's vocabulary does not belong to the model.")
    contract = _preprocessing_contract(config, tokenizer, task)
    tok = _tokenizer_settings(tokenizer, contract, max_length=max_length, truncation=None, seed=seed,
                              pad_to_multiple_of=pad_multiple)
    hidden = int(config.hidden_size)
    labels = _labels_from_config(config.to_dict()) if task == ANNOTATION_TASK else None
    batch_params = _batch_parameters(config.to_dict()) if config.needs_batch_labels else {}

    # built beside the target and moved into place whole: a kill never leaves a half repository
    with atomic_output(repository_dir, directory=True, what="Triton model repository") as repo:
        _write_tokenizer_models(repo, tok, vocab, max_batch_size=max_batch_size, preferred=preferred, delay=delay,
                                tokenizer_instances=tokenizer_instances)
        version = repo / ENCODER_MODEL / "1"
        version.mkdir(parents=True)
        shutil.copy2(_TEMPLATES["torch"], version / "model.py")
        for name in _TORCH_FILES:
            shutil.copy2(Path(scgpt_hf.__file__).parent / name, version / name)
        enc_in = [_tensor("input_ids", "TYPE_INT64", [-1], ragged=True), _tensor("values", "TYPE_FP32", [-1], ragged=True),
                  _tensor("attention_mask", "TYPE_INT64", [-1], ragged=True)]
        enc_params: dict[str, Any] = {
            "model_dir": str(model_dir), "task": task, "device": device, "precision": precision,
            "attn_implementation": attn_implementation, "max_tokens": max_tokens,
            "pad_token_id": int(config.pad_token_id), "pad_value": float(config.pad_value),
            "vocab_size": int(config.vocab_size),
        }
        if batch_params:
            enc_in.append(_tensor("batch_labels", "TYPE_INT64", [1], reshape=[]))
            enc_params["num_batch_labels"] = batch_params["num_batch_labels"]
        if gpu_memory_fraction is not None:
            enc_params["gpu_memory_fraction"] = float(gpu_memory_fraction)
        outputs = ([_tensor("logits", "TYPE_FP32", [len(labels)])] if labels is not None else []) + \
            [_tensor("cell_embedding", "TYPE_FP32", [hidden])]
        (repo / ENCODER_MODEL / "config.pbtxt").write_text(
            _header(ENCODER_MODEL, (
                f"scGPT {task} model run by PyTorch on {device} ({precision} precision, {attn_implementation} attention)\n"
                "in a python-backend model: 1/model.py with the library's own modeling and inference files. Inputs\n"
                "allow ragged batches: the cells of a dynamic batch are regrouped by length, at most max_tokens\n"
                "tokens per forward. Needs torch and transformers in the server's Python."
            ), backend="python", max_batch_size=max_batch_size)
            + _io("input", enc_in) + _io("output", outputs)
            + _dynamic_batching(preferred, delay) + _instances(instances, "KIND_CPU") + _parameters(enc_params)
        )
        models, ensembles = _write_ensembles(repo, hidden=hidden, labels=labels, batch_params=batch_params,
                                             max_batch_size=max_batch_size, preferred=preferred, delay=delay,
                                             tokenizer_instances=tokenizer_instances)
        report = {"engine": "torch", "model_dir": str(model_dir), "device": device, "precision": precision,
                  "attn_implementation": attn_implementation, "task": task, "max_batch_size": max_batch_size,
                  "instances": int(instances), "tokenizer_instances": int(tokenizer_instances),
                  "preferred_batch_sizes": preferred, "max_queue_delay_microseconds": delay, "max_tokens": max_tokens,
                  "gpu_memory_fraction": gpu_memory_fraction, "models": models, "ensembles": ensembles,
                  "tokenizer": tok, "labels": labels}
        (repo / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        try:
            validate_repository(repo)
        except ImportError:  # tritonclient not installed
            pass
    return report


def _model_card(report: TritonExportReport, config: dict[str, Any], export_report: dict[str, Any],
                batch_params: dict[str, Any]) -> str:
    tok = report.tokenizer
    size = (f"{config.get('hidden_size')} hidden, {config.get('num_hidden_layers')} layers, "
            f"{config.get('num_attention_heads')} heads, vocabulary {config.get('vocab_size')}")
    validation = export_report.get("validation", {}) if export_report else {}
    val_line = (f"ONNX validated against PyTorch on {validation.get('data')} ({validation.get('criterion')}): "
                f"{'passed' if export_report.get('passed') else 'FAILED'}." if validation and not validation.get("skipped")
                else "ONNX validation: skipped or not recorded.")
    if report.device == "cpu":
        val_line += (" At load the encoder runs the graph on the export's cells (`scgpt_encoder/1/selfcheck.npz`) and "
                     "does not load on a host that computes them outside that bound (parameter `self_check`: `raise`, "
                     "or `warn` to load with a warning).")
    ensembles = "\n".join(f"| `{k}` | {v} |" for k, v in report.ensembles.items())
    serve_cpu = "scgpt-hf serve REPOSITORY_DIR        # local CPU server (bash scripts/setup_triton_server.sh once)"
    annotate = ""
    if report.labels is not None:
        annotate = (
            f"\n`scgpt_annotate` answers `label` (BYTES), `probability` and `probabilities` over "
            f"{len(report.labels)} classes ({', '.join(report.labels[:8])}{', ...' if len(report.labels) > 8 else ''}), "
            "plus `cell_embedding` and `n_genes`.\n"
        )
    batch_row = batch_error = ""
    embed_call = "client.embed(adata, batch_size=32, concurrency=4)"
    if batch_params:
        n_batches = batch_params["num_batch_labels"]
        names = list(json.loads(batch_params.get("batch2id", "{}")))
        named = (f"the ensembles' `batch2id` parameter maps the model's batch names ({', '.join(names[:6])}"
                 f"{', ...' if len(names) > 6 else ''}) to ids" if names else "the model has no batch names")
        batch_row = (f"| `batch_labels` | INT64 | [cells, 1] | each cell's batch id in 0..{n_batches - 1}, the batches "
                     f"the model was fine-tuned on; {named} |\n")
        if report.device == "cpu":
            batch_error = f", batch ids outside [0, {n_batches})"
        else:
            batch_row += ("\nThe native onnxruntime backend does not range-check `batch_labels`: send them through "
                          "`TritonClient`, which maps and checks them.\n")
        embed_call = 'client.embed(adata, batch_key="batch", batch_size=32)  # obs["batch"]: names or ids'
    return f"""# scGPT Triton model repository

scGPT ({report.task}, {size}) for Triton Inference Server, built by `scgpt-hf export triton`
for **{report.device}** ({report.precision}). {val_line}

| model | what |
|---|---|
| `scgpt_vocab` | python, numpy only: gene names (BYTES) -> vocabulary ids, -1 where unknown; once per dataset |
| `scgpt_tokenizer` | python, numpy only: counts -> `input_ids`, `values`, `attention_mask` (exactly `ScGPTTokenizer`) |
| `scgpt_encoder` | the ONNX graph ({'native onnxruntime backend, KIND_GPU' if report.device == 'gpu' else 'python backend running ONNX Runtime, KIND_CPU'}); dynamic batching, preferred sizes {report.preferred_batch_sizes}, queue delay {report.max_queue_delay_microseconds} us, {report.instances} instance(s) |
{ensembles}

## Wire format

Cells are the batch dimension (at most {report.max_batch_size} per request); a request pads its cells to its widest cell.

| input | type | shape | meaning |
|---|---|---|---|
| `gene_ids` | INT64 | [cells, n] | vocabulary ids of the cell's measured genes, in the dataset's column order; -1 = unused slot (padding, unknown gene) |
| `counts` | FP32 | [cells, n] | expression values: raw counts or normalised/log1p (binning is rank-based per cell); 0 = not expressed |
{batch_row}
`scgpt_embed` answers `cell_embedding` FP32 [cells, {config.get('hidden_size')}] (raw; L2-normalise it as
`scgpt_hf.embed` does) and `n_genes` INT64 [cells, 1] (expressed vocabulary genes before truncation).
{annotate}
Tokenizer settings: {tok['n_bins']} bins, `<cls>` value {tok['cls_value']}, pad value {tok['pad_value']},
max length {tok['max_length']} tokens (truncation: {tok['truncation']}), seed {tok['seed']} (per-cell tie-breaking is seeded
by the seed and the cell's content, so a cell gets the same answer in any batch), lengths rounded up to multiples
of {tok['pad_to_multiple_of']}.

Errors come back per request and the server keeps serving: wrong dtype or rank (rejected by Triton), `gene_ids` and
`counts` of different shapes, ids outside the vocabulary, a gene twice in a cell, negative or non-finite
counts, a cell with no expressed vocabulary gene{batch_error}, more than {report.max_batch_size} cells.

## Serve and query

```bash
{serve_cpu}
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
