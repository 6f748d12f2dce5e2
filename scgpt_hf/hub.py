"""Publish scGPT models on the Hugging Face Hub: model, tokenizer, remote code, model card and ONNX artefacts.

`push(model_dir, repo_id)` (CLI: ``scgpt-hf push MODEL_DIR ORG/NAME``) uploads a folder written by
``model.save_pretrained`` + ``tokenizer.save_pretrained`` as one commit:

- weights as safetensors only (a folder holding pickle files is refused); sharded weights are kept sharded and
  stale shards of an earlier push are deleted;
- the configuration, modeling and tokenizer code (plus what they import relatively), with a complete
  ``auto_map`` in ``config.json`` and ``tokenizer_config.json``, so ``AutoModel.from_pretrained(id,
  trust_remote_code=True)`` works where scgpt_hf is not installed (the uploaded files import only torch,
  transformers, numpy and scipy: checked before upload);
- ``README.md`` rendered from the templates in ``model_cards/`` with the model's config, tokenizer settings and the
  metrics recorded in ``MODEL_DIR/metrics.json`` (format below), validated by the Hub;
- with ``with_onnx=True``, ``MODEL_DIR/onnx/`` (from ``scgpt-hf export onnx``) into an ``onnx/`` folder.

Pushing an unchanged folder again makes no commit. `model.push_to_hub` / `tokenizer.push_to_hub` work too: call
:func:`register_remote_code` first so that they include the code files (and :func:`add_auto_map` on
``model.config`` so that every Auto class, not only the model's own, resolves remotely); :func:`push_card` then adds
the card.

``metrics.json`` (all keys optional)::

    {
      "base_model": "org/scgpt-human",                  # the model this one was fine-tuned from
      "model_name": "scGPT cell-type annotation (PBMC)",
      "datasets": ["org/pbmc-annotated"],               # Hub dataset ids, for the card metadata
      "license": "mit",
      "training": {"data": "...", "procedure": "...", "hyperparameters": {"epochs": 10, "lr": 1e-4}},
      "evaluations": [{
        "task": {"type": "cell-type-annotation", "name": "Cell-type annotation"},
        "dataset": {"name": "PBMC 10k", "type": "org/pbmc-annotated", "split": "test", "n_cells": 2000},
        "metrics": [{"type": "accuracy", "name": "Accuracy", "value": 0.91},
                    {"type": "f1", "name": "Macro F1", "value": 0.87, "args": {"average": "macro"}}]
      }]
    }

Only numbers found there (and in ``onnx/export_report.json``) are reported; without evaluations the card says so and
has no ``model-index``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:  # imported where used: `scgpt-hf push --help` loads no torch
    from .configuration_scgpt import ScGPTConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ONNX_DIR = "onnx"
ONNX_REPORT = "export_report.json"
DEFAULT_LICENSE = "mit"
CARD_TAGS = ("single-cell", "scRNA-seq", "scgpt", "biology", "transcriptomics", "scgpt-hf")
# Files that are (or may be) pickles: never uploaded, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# Top-level files of a saved model that are published (besides weights, code and the card).
_TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_PUBLISHED_FILES = ("config.json", "generation_config.json", METRICS_FILE, *_TOKENIZER_FILES)
# Python modules that uploaded code may import (besides the standard library and each other).
ALLOWED_REMOTE_IMPORTS = frozenset({"torch", "transformers", "numpy", "scipy"})


class HubPushError(RuntimeError):
    """A push failed; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Remote code


def _package_classes() -> dict[str, type]:
    """Auto class name -> scgpt_hf class, from what scgpt_hf registered with transformers' Auto classes (which
    importing the configuration module has done: see `scgpt_hf.lazy_imports`)."""
    from transformers.models.auto import modeling_auto

    from .configuration_scgpt import ScGPTConfig

    found: dict[str, type] = {}
    for name in sorted(n for n in dir(modeling_auto) if n.startswith("AutoModel")):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None)
        extra = getattr(mapping, "_extra_content", None)
        if isinstance(extra, dict) and ScGPTConfig in extra:
            cls = extra[ScGPTConfig]
            if cls.__module__.startswith(__package__ + "."):
                found[name] = cls
    return found


def _qualname(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def auto_map() -> dict[str, dict[str, Any]]:
    """The ``auto_map`` entries for ``config.json`` ("config") and ``tokenizer_config.json`` ("tokenizer")."""
    from .configuration_scgpt import ScGPTConfig
    from .tokenization_scgpt import ScGPTTokenizer

    config_map: dict[str, Any] = {"AutoConfig": _qualname(ScGPTConfig)}
    config_map.update({name: _qualname(cls) for name, cls in _package_classes().items()})
    return {"config": config_map, "tokenizer": {"AutoTokenizer": [_qualname(ScGPTTokenizer), None]}}


def register_remote_code() -> None:
    """Make ``save_pretrained`` / ``push_to_hub`` write the code files and ``auto_map`` (idempotent).

    Uses transformers' ``register_for_auto_class`` for the config, every registered model class and the tokenizer.
    """
    from .configuration_scgpt import ScGPTConfig
    from .tokenization_scgpt import ScGPTTokenizer

    ScGPTConfig.register_for_auto_class("AutoConfig")
    for name, cls in _package_classes().items():
        if cls.__dict__.get("_auto_class") is None:
            cls.register_for_auto_class(name)
    ScGPTTokenizer.register_for_auto_class("AutoTokenizer")


def add_auto_map(config: ScGPTConfig) -> ScGPTConfig:
    """Give ``config`` the complete ``auto_map`` (every registered Auto class), so a later ``save_pretrained`` /
    ``push_to_hub`` lets ``AutoModel`` and the head's Auto class load it as remote code; returns ``config``."""
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **auto_map()["config"]}
    return config


def remote_code_files() -> list[Path]:
    """Source files uploaded as remote code: the config, model and tokenizer modules and their relative imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from .configuration_scgpt import ScGPTConfig
    from .tokenization_scgpt import ScGPTTokenizer

    modules = {ScGPTConfig.__module__, ScGPTTokenizer.__module__, *(c.__module__ for c in _package_classes().values())}
    files: dict[str, Path] = {}
    for module in sorted(modules):
        path = Path(sys.modules[module].__file__)
        for f in [path, *map(Path, get_relative_import_files(str(path)))]:
            files.setdefault(f.name, f)
    return [files[k] for k in sorted(files)]


def check_remote_code(files: Sequence[str | os.PathLike]) -> None:
    """Raise HubPushError if an uploaded code file imports more than torch, transformers, numpy, scipy,
    the standard library and the other uploaded files (imports inside ``try`` blocks are not counted)."""
    from transformers.dynamic_module_utils import get_imports

    local = {Path(f).stem for f in files}
    for f in files:
        extra = sorted(
            m for m in get_imports(str(f))
            if m not in ALLOWED_REMOTE_IMPORTS and m not in sys.stdlib_module_names and m not in local
        )
        if extra:
            raise HubPushError(
                f"{Path(f).name} imports {extra} at module level; Hub remote code may only import "
                f"{sorted(ALLOWED_REMOTE_IMPORTS)}, the standard library and the other uploaded files "
                f"({sorted(local)}). Move the import inside the function that needs it or a try/except block."
            )


# ----------------------------------------------------------------------------------------------------------------
# Model cards


@dataclass(frozen=True)
class CardTemplate:
    """A model-card template in ``model_cards/`` for one kind of head."""

    file: str
    description: str
    pipeline_tag: str | None = None


CARD_TEMPLATES: dict[str, CardTemplate] = {
    "pretrained": CardTemplate("pretrained.md.j2", "the scGPT encoder", "feature-extraction"),
    "annotation": CardTemplate("annotation.md.j2", "the scGPT encoder with a cell-type classification head",
                               "tabular-classification"),
    "integration": CardTemplate("integration.md.j2", "the scGPT encoder fine-tuned for batch integration",
                                "feature-extraction"),
    "perturbation": CardTemplate("perturbation.md.j2", "the scGPT encoder with a perturbation-response decoder",
                                 "tabular-regression"),
}
# config.architectures[0] -> template name. Heads register theirs with `register_card_template`.
ARCHITECTURE_TEMPLATES: dict[str, str] = {
    "ScGPTModel": "pretrained",
    "ScGPTForPreTraining": "pretrained",
    "ScGPTForCellClassification": "annotation",
    "ScGPTForBatchIntegration": "integration",
    "ScGPTForPerturbationPrediction": "perturbation",
    "ScGPTForMultiOmicIntegration": "integration",
}
# What the card says an architecture is (else the template's description).
ARCHITECTURE_DESCRIPTIONS: dict[str, str] = {
    "ScGPTForPreTraining": "the scGPT encoder with its pretraining decoders (masked expression, MVC)",
}
# Auto class used in a card's "how to use" for an architecture without its own Auto class registration.
ARCHITECTURE_AUTO_CLASS: dict[str, str] = {"ScGPTForBatchIntegration": "AutoModel"}
# Heads no Auto class fits: the card loads the head class itself from the repository's code.
HEAD_CLASS_LOADED: set[str] = {"ScGPTForPerturbationPrediction", "ScGPTForMultiOmicIntegration"}


def register_card_template(architecture: str, template: str, *, file: str | None = None,
                           description: str | None = None, pipeline_tag: str | None = None,
                           auto_class: str | None = None) -> None:
    """Use card template ``template`` for models whose ``config.architectures[0]`` is ``architecture``.

    A new template needs ``file`` (in ``model_cards/``, usually extending ``base.md.j2``) and ``description``.
    ``auto_class`` picks the Auto class shown in "how to use" when the architecture has no registered one.
    """
    if template not in CARD_TEMPLATES:
        if file is None or description is None:
            raise ValueError(f"New card template {template!r} needs file= and description=.")
        CARD_TEMPLATES[template] = CardTemplate(file, description, pipeline_tag)
    ARCHITECTURE_TEMPLATES[architecture] = template
    if auto_class is not None:
        ARCHITECTURE_AUTO_CLASS[architecture] = auto_class


def card_template_dir() -> Path:
    """Folder of the card templates: ``scgpt_hf/model_cards`` when installed, else the repository's ``model_cards``."""
    for candidate in (Path(__file__).parent / "model_cards", Path(__file__).resolve().parent.parent / "model_cards"):
        if (candidate / "base.md.j2").is_file():
            return candidate
    raise FileNotFoundError("The model card templates (model_cards/base.md.j2) are missing from this installation.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def _read_json_if_present(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def load_metrics(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``MODEL_DIR/metrics.json`` (see the module docstring), or {} when there is none."""
    return _read_json_if_present(Path(model_dir) / METRICS_FILE)


def render_card(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,  # noqa: A002 - the card field's name
    datasets: Sequence[str] | None = None,
    with_onnx: bool = False,
    template: str | None = None,
) -> ModelCard:
    """Render the model card of a saved model folder from its config, tokenizer settings and metrics.

    ``metrics`` defaults to ``MODEL_DIR/metrics.json``; ``base_model``, ``license`` and ``datasets`` override
    what it records. ``template`` overrides the template chosen from ``config.architectures``.
    """
    from .configuration_scgpt import ScGPTConfig

    model_dir = Path(model_dir)
    config = ScGPTConfig.from_pretrained(model_dir)
    metrics = dict(load_metrics(model_dir) if metrics is None else metrics)
    tokenizer = _tokenizer_facts(model_dir, config)
    architecture = (config.architectures or ["ScGPTModel"])[0]
    template = template or metrics.get("card_template") or ARCHITECTURE_TEMPLATES.get(architecture, "pretrained")
    if template not in CARD_TEMPLATES:
        raise ValueError(f"Unknown card template {template!r}; known: {sorted(CARD_TEMPLATES)}.")
    spec = CARD_TEMPLATES[template]
    base_model = base_model or metrics.get("base_model")
    evaluations = _evaluations(metrics)
    model_name = metrics.get("model_name") or repo_id.split("/")[-1]
    weights = _weights_facts(model_dir)
    card_data = _card_data(
        metrics, evaluations, spec, model_name=model_name, base_model=base_model,
        license=license or metrics.get("license") or DEFAULT_LICENSE,
        datasets=list(datasets if datasets is not None else metrics.get("datasets") or []),
    )
    return _render_template(spec.file, {
        "card_data": card_data.to_yaml(), "model_name": model_name, "repo_id": repo_id, "architecture": architecture,
        "head_description": ARCHITECTURE_DESCRIPTIONS.get(architecture, spec.description), "config": config,
        "base_model": base_model, "hub_url": constants.ENDPOINT, "auto_class": _example_auto_class(architecture),
        **weights, **tokenizer,
        "needs_batch_labels": config.needs_batch_labels,
        "labels": [config.id2label[i] for i in sorted(config.id2label)] if template == "annotation" else [],
        "training": {"data": None, "procedure": None, "hyperparameters": None, **(metrics.get("training") or {})},
        "evaluations": evaluations,
        "onnx": _onnx_summary(model_dir / ONNX_DIR / ONNX_REPORT) if with_onnx else None,
        "example_perturbation": metrics.get("example_perturbation") or [],
    })


def _tokenizer_facts(model_dir: Path, config: ScGPTConfig) -> dict[str, Any]:
    """What the card says about the tokenizer, from its saved files (the config's values where they are silent)."""
    tok = _read_json_if_present(model_dir / "tokenizer_config.json")
    vocab = _read_json_if_present(model_dir / "vocab.json")
    special = [
        {"name": str(tok.get(f"{k}_token", default)), "id": getattr(config, f"{k}_token_id")}
        for k, default in (("pad", "<pad>"), ("cls", "<cls>"), ("eoc", "<eoc>"))
    ]
    vocab_size = len(vocab) if vocab else config.vocab_size
    truncation = tok.get("truncation_strategy", "random")
    return {
        "vocab_size": vocab_size, "n_genes": vocab_size - len(special), "special_tokens": special,
        "n_bins": int(tok.get("n_bins", config.n_bins)),
        "cls_token_id": config.cls_token_id, "pad_token_id": config.pad_token_id,
        "cls_value": float(tok.get("cls_value", 0.0)),
        "max_length": int(tok.get("max_length", config.max_seq_len)),
        "include_zero_genes": bool(tok.get("include_zero_genes", False)),
        "truncation_text": "at random (seeded per cell)" if truncation == "random" else "by highest expression",
    }


def _evaluations(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The recorded evaluations, normalised for the template; raise ValueError on malformed entries."""
    out = []
    for i, ev in enumerate(metrics.get("evaluations") or []):
        task, dataset, values = ev.get("task") or {}, ev.get("dataset") or {}, ev.get("metrics") or []
        where = f"{METRICS_FILE} evaluations[{i}]"
        if not task.get("type") or not dataset.get("name") or not dataset.get("type"):
            raise ValueError(f"{where} needs task.type, dataset.name and dataset.type.")
        if not values:
            raise ValueError(f"{where} has no metrics.")
        rows = []
        for m in values:
            if "type" not in m or "value" not in m or isinstance(m["value"], bool) or not isinstance(
                m["value"], (int, float)
            ):
                raise ValueError(f"{where}: each metric needs a type and a numeric value, got {m!r}.")
            rows.append({**m, "name": m.get("name") or m["type"], "value_text": _format_number(m["value"])})
        out.append({
            "task_type": task["type"], "task_name": task.get("name") or task["type"],
            "dataset_name": dataset["name"], "dataset_type": dataset["type"], "dataset_split": dataset.get("split"),
            "dataset_config": dataset.get("config"), "dataset_revision": dataset.get("revision"),
            "n_cells": _format_number(dataset["n_cells"]) if dataset.get("n_cells") is not None else None,
            "metrics": rows,
        })
    return out


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _weights_facts(model_dir: Path) -> dict[str, Any]:
    """The parameter count (from the safetensors headers) and whether the weights are sharded."""
    weights = _weight_files(model_dir)
    n_params = _safetensors_parameters(weights) if weights else None
    return {
        "n_params_text": f"{n_params / 1e6:.2f} M ({n_params:,})" if n_params else "not recorded",
        "sharded": len(weights) > 1,
    }


def _weight_files(model_dir: Path) -> list[Path]:
    """A saved model's safetensors files: the shards its index names (all present), else model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if not shards or missing:
            raise HubPushError(f"{index} names shards that are not in {model_dir}: {missing or 'none listed'}.")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def _safetensors_parameters(paths: Sequence[Path]) -> int:
    """Number of parameters stored in safetensors files, read from their headers only."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _example_auto_class(architecture: str) -> str | None:
    """The Auto class the card's "how to use" loads the model with; None where it loads the head class itself."""
    if architecture in HEAD_CLASS_LOADED:
        return None
    classes = {_qualname(c).split(".")[1]: name for name, c in _package_classes().items()}
    auto_class = ARCHITECTURE_AUTO_CLASS.get(architecture) or classes.get(architecture, "AutoModel")
    if auto_class == "AutoModelForPreTraining":
        return "AutoModel"  # the card's example embeds cells; the backbone loads from any checkpoint
    return auto_class


def _card_data(
    metrics: Mapping[str, Any], evaluations: list[dict[str, Any]], spec: CardTemplate, *, model_name: str,
    base_model: str | None, license: str, datasets: list[str],  # noqa: A002
) -> ModelCardData:
    """The card's YAML metadata; ``model-index`` only when evaluations were recorded."""
    eval_results = [
        EvalResult(
            task_type=ev["task_type"], task_name=ev["task_name"], dataset_type=ev["dataset_type"],
            dataset_name=ev["dataset_name"], dataset_split=ev["dataset_split"], dataset_config=ev["dataset_config"],
            dataset_revision=ev["dataset_revision"], metric_type=m["type"], metric_name=m["name"],
            metric_value=m["value"], metric_args=m.get("args"), metric_config=m.get("config"),
        )
        for ev in evaluations for m in ev["metrics"]
    ]
    return ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(CARD_TAGS) + [t for t in metrics.get("tags", []) if t not in CARD_TAGS],
        pipeline_tag=spec.pipeline_tag,
        base_model=base_model,
        datasets=datasets or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def _onnx_summary(report_path: Path) -> dict[str, Any] | None:
    """What the card reports of an ONNX export and its validation, from its report (None without one)."""
    if not report_path.is_file():
        return None
    report = _read_json(report_path)
    validation = report.get("validation") or {}
    cases = []
    for case in validation.get("cases", []):
        for name, o in (case.get("outputs") or {}).items():
            cases.append({
                "batch": case.get("batch"), "length": case.get("length") or "own",
                "padded_tokens": case.get("padded_tokens"), "output": name,
                "max_abs_diff": f"{o['max_abs_diff']:.2e}" if "max_abs_diff" in o else "",
                "min_cosine": f"{o['min_cosine']:.6f}" if "min_cosine" in o else "",
            })
    return {
        "file": Path(report.get("model_path") or "model.onnx").name, "task": report.get("task"),
        "precision": report.get("precision"), "opset": report.get("opset"), "passed": report.get("passed"),
        "data": validation.get("data"), "cases": cases,
    }


def _render_template(file: str, context: Mapping[str, Any]) -> ModelCard:
    """Render ``model_cards/FILE``; a value the template uses but ``context`` lacks is an error, not a blank."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(card_template_dir())), trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )
    try:
        text = env.get_template(file).render(**context)
    except jinja2.UndefinedError as exc:
        raise ValueError(f"Card template {file} uses a value this model does not record: {exc}") from exc
    return ModelCard(text)


# ----------------------------------------------------------------------------------------------------------------
# Staging and pushing


def stage(model_dir: str | os.PathLike, out_dir: str | os.PathLike, repo_id: str, *, with_onnx: bool = False,
          card: ModelCard | str | None = None, base_model: str | None = None, license: str | None = None,  # noqa: A002
          ) -> list[str]:
    """Write into ``out_dir`` exactly what `push` uploads; returns the repository paths.

    Checks the folder (config, safetensors weights, tokenizer, no pickles, valid ONNX export when asked),
    adds the remote-code files and a complete ``auto_map``, renders the card unless ``card`` is given.
    """
    src, out = Path(model_dir), Path(out_dir)
    config, weights = _check_model_folder(src, with_onnx)
    out.mkdir(parents=True, exist_ok=True)
    _copy_model_files(src, out, weights)
    _add_remote_code(src, out, config)
    if with_onnx:
        _copy_onnx(src / ONNX_DIR, out / ONNX_DIR)
    if card is None:
        card = render_card(src, repo_id, base_model=base_model, license=license, with_onnx=with_onnx)
    elif not isinstance(card, ModelCard):
        card = ModelCard(Path(card).read_text(encoding="utf-8") if Path(str(card)).is_file() else str(card))
    (out / "README.md").write_text(str(card), encoding="utf-8")
    return sorted(str(p.relative_to(out)).replace(os.sep, "/") for p in out.rglob("*") if p.is_file())


def _check_model_folder(src: Path, with_onnx: bool) -> tuple[dict[str, Any], list[Path]]:
    """A saved scGPT model with safetensors weights, its tokenizer and no pickles: (its config, its weight files)."""
    from .configuration_scgpt import ScGPTConfig

    if not (src / "config.json").is_file():
        raise HubPushError(f"{src} is not a saved scGPT model: it has no config.json (use model.save_pretrained).")
    config = _read_json(src / "config.json")
    if config.get("model_type") != ScGPTConfig.model_type:
        raise HubPushError(f"{src}/config.json is model_type {config.get('model_type')!r}, not 'scgpt'.")
    onnx_src = src / ONNX_DIR
    scanned = [p for p in src.iterdir() if p.is_file()] + (
        [p for p in onnx_src.rglob("*") if p.is_file()] if with_onnx and onnx_src.is_dir() else []
    )
    pickles = sorted(str(p.relative_to(src)) for p in scanned if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise HubPushError(
            f"{src} holds pickle-based files {pickles}: only safetensors weights are published and nothing is "
            "unpickled. Save weights with model.save_pretrained(dir) (safetensors) and remove or move these files."
        )
    weights = _weight_files(src)
    if not weights:
        raise HubPushError(f"{src} has no model.safetensors (or model.safetensors.index.json with its shards).")
    missing_tok = [f for f in ("vocab.json", "tokenizer_config.json") if not (src / f).is_file()]
    if missing_tok:
        raise HubPushError(
            f"{src} lacks the tokenizer files {missing_tok}; a model on the Hub needs its tokenizer: "
            "run tokenizer.save_pretrained(MODEL_DIR) first."
        )
    return config, weights


def _copy_model_files(src: Path, out: Path, weights: Sequence[Path]) -> None:
    """The weights (with their shard index) and the published config, metrics and tokenizer files."""
    names = {f.name for f in weights}
    if (src / "model.safetensors.index.json").is_file():
        names.add("model.safetensors.index.json")
    names.update(f for f in _PUBLISHED_FILES if (src / f).is_file())
    for name in sorted(names):
        shutil.copyfile(src / name, out / name)


def _add_remote_code(src: Path, out: Path, config: Mapping[str, Any]) -> None:
    """The code files (checked to import only what the Hub's users have) and a complete ``auto_map``."""
    code = remote_code_files()
    check_remote_code(code)
    for f in code:
        shutil.copyfile(f, out / f.name)
    maps = auto_map()
    _write_json(out / "config.json", {**config, "auto_map": maps["config"]})
    tok_config = _read_json(src / "tokenizer_config.json")
    _write_json(out / "tokenizer_config.json", {**tok_config, "auto_map": maps["tokenizer"]})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_onnx(onnx_src: Path, onnx_out: Path) -> None:
    """The ONNX export (graphs, report, external data), unless it has no graph or failed its validation;
    graphs set aside as ``*.failed.onnx`` stay behind."""
    files = sorted(p for p in onnx_src.rglob("*") if p.is_file() and not p.name.endswith(".failed.onnx")) \
        if onnx_src.is_dir() else []
    if not any(p.suffix == ".onnx" for p in files):
        raise HubPushError(f"--with-onnx: {onnx_src} holds no .onnx graph; run `scgpt-hf export onnx` into it.")
    report = onnx_src / ONNX_REPORT
    if report.is_file() and _read_json(report).get("passed") is False:
        raise HubPushError(f"{report} says the ONNX export failed validation; it is not published.")
    for p in files:
        dest = onnx_out / p.relative_to(onnx_src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)


def _explain(err: Exception, repo_id: str, revision: str | None, action: str) -> str:
    """A clear message for a failed Hub call."""
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(err, RevisionNotFoundError):
        return f"Could not {action} {where}: the revision does not exist ({err})."
    if isinstance(err, RepositoryNotFoundError):
        return (f"Could not {action} {where}: the repository does not exist or your token cannot see it "
                f"(private repositories need a token with access).")
    if isinstance(err, RemoteEntryNotFoundError):
        return f"Could not {action} {where}: a file is missing on the Hub ({err})."
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return (f"Could not {action} {where}: the Hub at {constants.ENDPOINT} rejected the token (401 Unauthorized). "
                "Pass a valid write token (token=... / --token), set HF_TOKEN, or run `hf auth login`.")
    if status == 403:
        return (f"Could not {action} {where}: the token is not allowed to write there (403 Forbidden). Use a token "
                "with write access to the namespace.")
    return f"Could not {action} {where}: {err}"


def push(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    with_onnx: bool = False,
    token: str | None = None,
    commit_message: str = "Upload scGPT model with scgpt-hf",
    card: ModelCard | str | None = None,
    base_model: str | None = None,
    license: str | None = None,  # noqa: A002
) -> CommitInfo:
    """Upload a saved model folder (weights, tokenizer, code, card, optional ONNX) to ``repo_id`` as one commit.

    Creates the repository (``private`` applies to a new one) and the branch ``revision`` when missing. Returns the
    commit; when nothing changed no commit is made and the current head is returned. Raises HubPushError.
    """
    if "/" not in repo_id:
        raise HubPushError(f"repo_id must be ORG/NAME, got {repo_id!r}.")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="scgpt-hf-push-") as staging:
        try:
            files = stage(model_dir, staging, repo_id, with_onnx=with_onnx, card=card, base_model=base_model,
                          license=license)
        except (ValueError, OSError) as exc:
            raise HubPushError(f"Cannot push {model_dir}: {exc}") from exc
        delete_patterns = ["*.safetensors", "model.safetensors.index.json", "*.py"]
        if with_onnx:
            delete_patterns.append(f"{ONNX_DIR}/*")
        step = "create"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != constants.DEFAULT_REVISION:
                step = "create the branch for"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "push to"
            info = api.upload_folder(
                repo_id=repo_id, folder_path=staging, revision=revision, commit_message=commit_message,
                delete_patterns=delete_patterns,
            )
        except HfHubHTTPError as exc:
            raise HubPushError(_explain(exc, repo_id, revision, step)) from exc
    logger.info("Pushed %d files to %s: %s", len(files), repo_id, info.commit_url)
    return info


def push_card(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    with_onnx: bool = False,
    base_model: str | None = None,
    commit_message: str = "Update model card",
) -> CommitInfo:
    """Render the card of a saved model folder and push only ``README.md`` (e.g. after ``model.push_to_hub``)."""
    card = render_card(model_dir, repo_id, base_model=base_model, with_onnx=with_onnx)
    try:
        return card.push_to_hub(repo_id, token=token, revision=revision, commit_message=commit_message)
    except HfHubHTTPError as exc:
        raise HubPushError(_explain(exc, repo_id, revision, "push the card to")) from exc


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``push`` on the main CLI's subparsers; the handler is ``func`` and returns the exit code."""
    p = subparsers.add_parser(
        "push", help="push a saved model (weights, tokenizer, code, card, ONNX) to the Hugging Face Hub",
        description=(
            "Upload MODEL_DIR (model.save_pretrained + tokenizer.save_pretrained; metrics.json optional) to the Hub "
            "repository ORG/NAME as one commit, with its remote code and a model card rendered from its config and "
            "recorded metrics. Pushing unchanged files makes no commit."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="saved model folder")
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub repository id")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private (new repositories)")
    p.add_argument("--with-onnx", action="store_true", help=f"also upload MODEL_DIR/{ONNX_DIR}/ (scgpt-hf export onnx)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--commit-message", default="Upload scGPT model with scgpt-hf")
    p.add_argument("--base-model", metavar="ORG/NAME", help="model this one was fine-tuned from (else metrics.json)")
    p.add_argument("--license", help=f"license id for the card (else metrics.json, else {DEFAULT_LICENSE})")
    p.add_argument("--card-only", action="store_true", help="print the rendered card; no upload")
    p.set_defaults(func=run_push)
    return p


def run_push(args: argparse.Namespace) -> int:
    """Handler of ``scgpt-hf push``: returns 0; a failure raises, for the CLI to print as one line (exit code 2)."""
    from .cli import CommandError

    if args.card_only:
        print(render_card(args.model_dir, args.repo_id, base_model=args.base_model, license=args.license,
                          with_onnx=args.with_onnx))
        return 0
    try:
        info = push(args.model_dir, args.repo_id, revision=args.revision, private=args.private,
                    with_onnx=args.with_onnx, token=args.token, commit_message=args.commit_message,
                    base_model=args.base_model, license=args.license)
    except HubPushError as exc:
        raise CommandError(str(exc)) from exc
    print(f"{args.repo_id}@{info.oid}: {info.commit_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m scgpt_hf.hub push MODEL_DIR ORG/NAME ...`` (the same as ``scgpt-hf push``)."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
