"""Convert an original scGPT checkpoint folder (`best_model.pt`, `args.json`, `vocab.json`) to this package.

Unlike the original loader (which renames keys and loads with strict=False, silently dropping whatever does
not fit), every source key is either mapped or reported as deliberately left out, with the reason; a key
that is not understood, or a shape that does not fit, stops the conversion with an error naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_output, check_writable
from .configuration_scgpt import ScGPTConfig
from .modeling_scgpt import (
    ScGPTForBatchIntegration,
    ScGPTForCellClassification,
    ScGPTForMultiOmicIntegration,
    ScGPTForPerturbationPrediction,
    ScGPTForPreTraining,
)
from .tokenization_scgpt import ScGPTTokenizer

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")

# (source pattern, target) applied after attention keys are normalised; first match wins.
_KEY_RULES: list[tuple[str, str]] = [
    (r"^encoder\.embedding\.weight$", "scgpt.embeddings.gene_embeddings.weight"),
    (r"^encoder\.enc_norm\.(weight|bias)$", r"scgpt.embeddings.gene_norm.\1"),
    (r"^value_encoder\.(linear1|linear2|norm)\.(weight|bias)$", r"scgpt.embeddings.value_encoder.\1.\2"),
    (r"^value_encoder\.embedding\.weight$", "scgpt.embeddings.value_encoder.embedding.weight"),
    (r"^value_encoder\.enc_norm\.(weight|bias)$", r"scgpt.embeddings.value_encoder.norm.\1"),
    (r"^dsbn\.bns\.(\d+)\.(\w+)$", r"scgpt.embeddings.dsbn.bns.\1.\2"),
    (r"^bn\.(\w+)$", r"scgpt.embeddings.bn.\1"),
    (r"^flag_encoder\.weight$", "scgpt.embeddings.flag_embeddings.weight"),
    (r"^pert_encoder\.weight$", "scgpt.embeddings.perturbation_embeddings.weight"),
    (r"^mod_encoder\.embedding\.weight$", "modality_encoder.embedding.weight"),
    (r"^mod_encoder\.enc_norm\.(weight|bias)$", r"modality_encoder.norm.\1"),
    (r"^batch_encoder\.embedding\.weight$", "scgpt.batch_encoder.embedding.weight"),
    (r"^batch_encoder\.enc_norm\.(weight|bias)$", r"scgpt.batch_encoder.norm.\1"),
    (
        r"^transformer_encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$",
        r"scgpt.encoder.layers.\1.self_attn.qkv_proj.\2",
    ),
    (
        r"^transformer_encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$",
        r"scgpt.encoder.layers.\1.self_attn.out_proj.\2",
    ),
    (
        r"^transformer_encoder\.layers\.(\d+)\.(linear1|linear2|norm1|norm2)\.(weight|bias)$",
        r"scgpt.encoder.layers.\1.\2.\3",
    ),
    (r"^decoder\.(fc|zero_logit)\.([024])\.(weight|bias)$", r"expression_decoder.\1.\2.\3"),
    (
        r"^decoder\.(coeff_decoder|bias_decoder)\.(fc|zero_logit)\.([024])\.(weight|bias)$",
        r"expression_decoder.\1.\2.\3.\4",
    ),
    (r"^mvc_decoder\.(gene2query|W|W_zero_logit|fc1|fc2)\.(weight|bias)$", r"mvc_decoder.\1.\2"),
    (r"^mvc_decoder\.hidden_activation\.weight$", "mvc_decoder.hidden_activation.weight"),
    (r"^cls_decoder\._decoder\.(\d+)\.(weight|bias)$", r"classifier.layers.\1.\2"),
    (r"^cls_decoder\.out_layer\.(weight|bias)$", r"classifier.out_layer.\1"),
    (r"^grad_reverse_discriminator\._decoder\.(\d+)\.(weight|bias)$", r"discriminator.layers.\1.\2"),
    (r"^grad_reverse_discriminator\.out_layer\.(weight|bias)$", r"discriminator.out_layer.\1"),
]

_EXPRESSION_HEADS = r"^(decoder|mvc_decoder)\."
_CLASSIFIER = r"^cls_decoder\."
_DISCRIMINATOR = r"^grad_reverse_discriminator\."
_MVC = r"^mvc_decoder\."
_UNUSED_PERTURBATION_ZERO_LOGIT = r"^decoder\.bias_decoder\.zero_logit\."

# task -> (model class, {source pattern: why the task's model has no place for it})
TASKS: dict[str, tuple[type, dict[str, str]]] = {
    "pretraining": (
        ScGPTForPreTraining,
        {
            _CLASSIFIER: "cell-type classifier of the original training script; the pretraining model has none "
            "(convert a fine-tuned annotation checkpoint with task='annotation')",
            _DISCRIMINATOR: "adversarial batch discriminator, used only by batch integration (task='integration')",
        },
    ),
    "annotation": (
        ScGPTForCellClassification,
        {
            _EXPRESSION_HEADS: "expression decoders; the annotation model predicts cell types only "
            "(task='pretraining' keeps them)",
            _DISCRIMINATOR: "adversarial batch discriminator, used only by batch integration (task='integration')",
        },
    ),
    "integration": (
        ScGPTForBatchIntegration,
        {_CLASSIFIER: "cell-type classifier; the integration model has none (task='annotation' keeps it)"},
    ),
    "perturbation": (
        ScGPTForPerturbationPrediction,
        {
            _CLASSIFIER: "cell-type classifier the original perturbation generator builds but never uses to "
            "predict perturbations",
            _MVC: "MVC decoder; the perturbation generator's predictions come from its affine decoder only",
            _DISCRIMINATOR: "adversarial batch discriminator, used only by batch integration",
        },
    ),
    "multiomic": (
        ScGPTForMultiOmicIntegration,
        {_CLASSIFIER: "cell-type classifier; the multi-omic integration model has none (task='annotation' keeps it)"},
    ),
}


@dataclass
class ConversionReport:
    """What a conversion did: each source key's fate and where each config value came from."""

    mapped: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    config_sources: dict[str, str] = field(default_factory=dict)
    output_dir: str = ""
    task: str = ""
    task_source: str = ""

    def __str__(self) -> str:
        lines = [f"Converted {len(self.mapped)} tensors into {self.output_dir}",
                 f"Task: {self.task} ({self.task_source})"]
        lines += [f"  config {name} = {source}" for name, source in self.config_sources.items()]
        if self.left_out:
            lines.append(f"Left out {len(self.left_out)} tensors on purpose:")
            lines += [f"  {key}: {reason}" for key, reason in self.left_out.items()]
        else:
            lines.append("No tensor was left out.")
        return "\n".join(lines)



def convert_original_checkpoint(
    original_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    nheads: int | None = None,
    pre_norm: bool | None = None,
    cell_emb_style: str | None = None,
    pad_value: float | None = None,
    mask_value: float | None = None,
    n_bins: int | None = None,
    max_seq_len: int | None = None,
    task: str | None = None,
    labels: list[str] | None = None,
    pert_pad_id: int | None = None,
    modality_vocab: Mapping[str, int] | str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> ConversionReport:
    """Convert an original scGPT folder into a `from_pretrained`-ready folder (safetensors, config, tokenizer).

    `task` picks the model: "pretraining" (`ScGPTForPreTraining`, for released foundation checkpoints),
    "annotation" (`ScGPTForCellClassification`, for fine-tuned annotation checkpoints; `labels` names
    the classes in output order), "integration" (`ScGPTForBatchIntegration`), "perturbation"
    (`ScGPTForPerturbationPrediction`, for the original `TransformerGenerator`) or "multiomic"
    (`ScGPTForMultiOmicIntegration`, for the original `MultiOmicTransformerModel`; `modality_vocab`, a
    mapping or a JSON file, names the modality ids); None reads it from the weights (`infer_task`). Keyword
    options override what args.json says for settings the weights cannot reveal.

    The folder is written beside `output_dir`, loaded back and compared with the converted weights, then moved
    into place (`scgpt_hf.atomic`): a failure or a kill never leaves a partial or mixed folder. An existing
    `output_dir` is replaced only with `overwrite=True`, and is checked for writability before anything is read.
    """
    original_dir = Path(original_dir)
    output_dir = check_writable(output_dir, overwrite=overwrite, what="output folder")
    args, vocab, state = _read_original_folder(original_dir)
    if isinstance(modality_vocab, (str, os.PathLike)):
        modality_vocab = _read_json(Path(modality_vocab), "the modality vocabulary")
    task, task_source = _choose_task(state, task)
    overrides = dict(
        pert_pad_id=pert_pad_id,
        modality_vocab=modality_vocab,
        num_attention_heads=nheads,
        pre_norm=pre_norm,
        cell_emb_style=cell_emb_style,
        pad_value=pad_value,
        mask_value=mask_value,
        n_bins=n_bins,
        max_seq_len=max_seq_len,
    )
    config, sources = _infer_config(state, args, vocab, overrides)
    converted, mapped, left_out = convert_state_dict(state, task)
    if task == "annotation":
        _name_classes(config, sources, labels)
    model = TASKS[task][0](config)
    _load_converted(model, converted, mapped)
    tokenizer = _make_tokenizer(original_dir / "vocab.json", args, config, sources)
    with atomic_output(output_dir, overwrite=overwrite, directory=True, what="output folder") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        check_saved_folder(staging, model, tokenizer)
    report = ConversionReport(mapped=mapped, left_out=left_out, config_sources=sources, output_dir=str(output_dir),
                              task=task, task_source=task_source)
    if verbose:
        print(report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Reading the original folder


def _read_original_folder(original_dir: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """args.json, the checked vocab.json and the checked weights of an original checkpoint folder."""
    args = _read_json(original_dir / "args.json", "the training arguments (args.json)")
    vocab = _read_json(original_dir / "vocab.json", "the gene vocabulary (vocab.json)")
    check_vocab(vocab, _pad_token(args))
    return args, vocab, load_original_state_dict(original_dir / "best_model.pt")


def _pad_token(args: Mapping) -> str:
    return args.get("pad_token", "<pad>")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an original scGPT checkpoint folder holds {what}.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it should hold {what}; restore it from the "
                         "original checkpoint folder.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), got {type(data).__name__}.")
    return data


def check_vocab(vocab: Mapping[str, int], pad_token: str = "<pad>") -> None:
    """A usable gene vocabulary has the special tokens and distinct ids 0..n-1."""
    missing = [t for t in dict.fromkeys((pad_token, *SPECIAL_TOKENS)) if t not in vocab]
    if missing:
        raise ValueError(
            f"The vocabulary lacks the special tokens {missing}. Released scGPT vocabularies end with "
            "<pad>, <cls>, <eoc>; add the missing ones with ids after the last gene."
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("Vocabulary ids must be the distinct integers 0..len(vocab)-1.")


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read `best_model.pt` safely (`weights_only=True`) and check it is a plain state dict of usable weights:
    floating point (integer batch-norm counters aside) and finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an original scGPT checkpoint folder holds best_model.pt.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise _load_error(path, err) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (a mapping of names to tensors).")
    nested = [k for k in ("state_dict", "model_state_dict", "model") if isinstance(state.get(k), Mapping)]
    if nested:
        raise ValueError(
            f"{path} is a training checkpoint with the weights under {nested[0]!r}; save "
            f"checkpoint[{nested[0]!r}] on its own with torch.save and convert that."
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path} is not a state dict: entries {not_tensors[:5]} are not tensors.")
    _check_weights(state, path)
    return dict(state)


def _load_error(path: Path, err: BaseException) -> BaseException:
    """Our one-sentence error for a file torch.load refused: torch's own text (advice to load with
    weights_only=False, terminal colour codes) is not for our users. An OSError other than truncation stays."""
    if _truncated(path, err):
        return ValueError(
            f"{path} is truncated ({path.stat().st_size:,} bytes, and the end of the file is missing): the "
            "download or copy stopped early; download or copy it again."
        )
    if isinstance(err, OSError):
        return err
    if "Unsupported global" in str(err):
        return ValueError(
            f"{path} holds pickled Python objects, not a plain state dict of tensors, and is not loaded "
            "(unpickling can run code): save the weights with torch.save(model.state_dict(), path), not the "
            "whole model object."
        )
    return ValueError(
        f"{path} is not a PyTorch checkpoint (damaged or another format): give the best_model.pt saved by "
        "the original scGPT (torch.save of the model's state_dict()), or download or copy it again."
    )


def _truncated(path: Path, err: BaseException) -> bool:
    """Whether torch.load failed because the file ends early: a zip archive (torch.save's format) without its
    closing index, or a legacy pickle that stops mid-stream."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        return not zipfile.is_zipfile(path)
    return isinstance(err, EOFError) or "truncated" in str(err)


def _check_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse, naming them, tensors that would convert into wrong numbers: integer or boolean weights (loading
    casts them to floats that mean nothing) and NaN or infinite values (every embedding would be NaN)."""
    integer = [f"{k} ({v.dtype})" for k, v in state.items()
               if not v.is_floating_point() and not k.endswith("num_batches_tracked")]
    if integer:
        raise ValueError(
            f"{path}: {_listed(integer)} are not floating point; scGPT weights are floats, so the file was not "
            "saved from the model's state_dict() (or was altered): convert the checkpoint the model was trained into."
        )
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise ValueError(
            f"{path}: {_listed(non_finite)} hold NaN or infinite values, which make every output NaN (training "
            "diverged, or the file is damaged): convert a checkpoint saved before that."
        )


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


# ----------------------------------------------------------------------------------------------------------------
# Choosing the task


def _choose_task(state: Mapping[str, torch.Tensor], task: str | None) -> tuple[str, str]:
    """The task asked for, or the one the weights show: (task, where it came from)."""
    if task is None:
        task, evidence = infer_task(state)
        task_source = f"inferred from the weights: {evidence}; --task / task= overrides"
    else:
        task_source = "task option"
    if task == "perturbation" and "pert_encoder.weight" not in state:
        raise ValueError(
            "task='perturbation' needs a perturbation generator checkpoint (pert_encoder.*); to start perturbation "
            "fine-tuning from a foundation checkpoint, convert it with task='pretraining' and load the folder with "
            "ScGPTForPerturbationPrediction.from_pretrained (the flag embedding and decoder start fresh)."
        )
    return task, task_source


def infer_task(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """The task an original checkpoint was trained for, read from its heads: (task, the evidence).

    A perturbation encoder means a perturbation model, a modality encoder a multi-omic one, a cell-type
    classifier with more than one class an annotation model (every original model builds a one-class
    classifier, untrained in foundation checkpoints), a batch discriminator, batch encoder or domain-specific
    batch norm an integration model; otherwise a pretraining (foundation) model. A classifier together with a
    batch discriminator fits two tasks: that is an error asking for the task.
    """
    classes = state["cls_decoder.out_layer.weight"].shape[0] if "cls_decoder.out_layer.weight" in state else 0
    batch = [what for what, pattern in (("batch discriminator", _DISCRIMINATOR), ("batch encoder", r"^batch_encoder\."),
                                        ("domain-specific batch norm", r"^dsbn\."))
             if any(re.match(pattern, k) for k in state)]
    if "pert_encoder.weight" in state:
        return "perturbation", "perturbation encoder pert_encoder"
    if "mod_encoder.embedding.weight" in state:
        return "multiomic", "modality encoder mod_encoder"
    if classes > 1:
        if "batch discriminator" in batch:
            raise ValueError(
                f"The checkpoint has a {classes}-class cell-type classifier and a batch discriminator, so it may be "
                "an annotation or an integration model: pass --task annotation (keeps the classifier) or --task "
                "integration (keeps the discriminator); Python: task=..."
            )
        return "annotation", f"{classes}-class cell-type classifier cls_decoder"
    if batch:
        return "integration", " and ".join(batch)
    return "pretraining", "no fine-tuned head"


# ----------------------------------------------------------------------------------------------------------------
# The config: architecture from the weights, the rest from args.json and converter options

_REQUIRED_KEYS = ("encoder.embedding.weight", "transformer_encoder.layers.0.linear1.weight")
# Settings the weights cannot show, read from args.json under the same name, with the original's defaults.
_ARG_DEFAULTS: dict[str, object] = {
    "dropout": 0.2, "pad_value": -2, "mask_value": -1, "n_bins": 51, "max_seq_len": 1200, "pre_norm": False,
    "cell_emb_style": "cls",
}
# Converter options overriding what args.json says: setting -> (CLI option or None, Python keyword).
_OPTIONS: dict[str, tuple[str | None, str]] = {
    "num_attention_heads": ("--nheads", "nheads"),
    "pre_norm": ("--pre-norm", "pre_norm"),
    "cell_emb_style": ("--cell-emb-style", "cell_emb_style"),
    "pad_value": ("--pad-value", "pad_value"),
    "mask_value": ("--mask-value", "mask_value"),
    "n_bins": ("--n-bins", "n_bins"),
    "max_seq_len": ("--max-seq-len", "max_seq_len"),
    "pert_pad_id": (None, "pert_pad_id"),
}
# The type each args.json setting must have, and how to say it.
_ARG_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "num_attention_heads": ((int,), "an integer"),
    "n_bins": ((int,), "an integer"),
    "max_seq_len": ((int,), "an integer"),
    "pert_pad_id": ((int,), "an integer"),
    "pad_value": ((int, float), "a number"),
    "mask_value": ((int, float), "a number"),
    "dropout": ((int, float), "a number"),
    "pre_norm": ((bool,), "true or false"),
    "perturbation_decoder_adaptive_bias": ((bool,), "true or false"),
    "cell_emb_style": ((str,), "a string"),
    "perturbation_decoder_activation": ((str, type(None)), "a string or null"),
}


@dataclass
class _Settings:
    """Config values as they are found, each with where it came from (for the report and for errors)."""

    args: Mapping
    overrides: Mapping
    values: dict = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def record(self, name: str, value: object, source: str) -> None:
        self.values[name], self.sources[name] = value, source

    def from_weights(self, name: str, value: object) -> None:
        self.record(name, value, f"{value!r} (weights)")

    def from_args(self, name: str, arg_names: tuple[str, ...], default: object) -> None:
        """The first of `arg_names` in args.json (type-checked), else `default`; a converter option wins."""
        for arg in arg_names:
            if arg in self.args:
                _check_arg_type(name, arg, self.args[arg])
                self.record(name, self.args[arg], f"{self.args[arg]!r} (args.json {arg})")
                break
        else:
            self.record(name, default, f"{default!r} (default)")
        if self.overrides.get(name) is not None:
            self.record(name, self.overrides[name], f"{self.overrides[name]!r} (converter option)")


def _infer_config(
    state: Mapping[str, torch.Tensor], args: Mapping, vocab: Mapping[str, int], overrides: Mapping
) -> tuple[ScGPTConfig, dict[str, str]]:
    """Architecture from the weights; what weights cannot show from args.json, then converter flags."""
    _check_required_keys(state)
    found = _Settings(args, overrides)
    _architecture_from_weights(found, state)
    _batches_from_weights(found, state)
    _heads_from_weights(found, state)
    _perturbation_settings(found, state)
    _modality_settings(found, state, overrides.get("modality_vocab"))
    _settings_from_args(found)
    _check_files_agree(found.values, args, vocab)
    found.values.update(pad_token_id=vocab[_pad_token(args)], cls_token_id=vocab["<cls>"], eoc_token_id=vocab["<eoc>"])
    try:
        config = ScGPTConfig(**found.values)
    except ValueError as err:
        raise _settings_error(err, found.sources) from None
    return config, found.sources


def _check_required_keys(state: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        hint = (" Its keys start with 'module.' (saved from a DistributedDataParallel wrapper): save "
                "model.module.state_dict() instead." if all(k.startswith("module.") for k in state) else
                " Convert the best_model.pt of an original scGPT model (a TransformerModel's state_dict()).")
        raise ValueError(f"best_model.pt lacks {', '.join(missing)}, which every scGPT model has." + hint)


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    """The numbers captured by `pattern`'s group 1 across the keys (layers, batch norms, linear layers)."""
    return {int(m.group(1)) for k in state if (m := re.match(pattern, k))}


def _architecture_from_weights(found: _Settings, state: Mapping[str, torch.Tensor]) -> None:
    """Sizes of the embeddings and the transformer, and how expression values are embedded."""
    emb = state["encoder.embedding.weight"]
    found.from_weights("vocab_size", emb.shape[0])
    found.from_weights("hidden_size", emb.shape[1])
    found.from_weights("num_hidden_layers", len(_indices(state, r"transformer_encoder\.layers\.(\d+)\.")))
    found.from_weights("intermediate_size", state["transformer_encoder.layers.0.linear1.weight"].shape[0])
    found.from_weights(
        "explicit_zero_prob",
        "decoder.zero_logit.0.weight" in state or "decoder.coeff_decoder.zero_logit.0.weight" in state,
    )
    found.from_weights("use_generative_flag", "flag_encoder.weight" in state)
    if "value_encoder.linear1.weight" in state:
        found.from_weights("input_emb_style", "continuous")
    elif "value_encoder.embedding.weight" in state:
        found.from_weights("input_emb_style", "category")
        found.from_weights("n_input_bins", state["value_encoder.embedding.weight"].shape[0])
    else:
        found.from_weights("input_emb_style", "scaling")


def _batches_from_weights(found: _Settings, state: Mapping[str, torch.Tensor]) -> None:
    """Batch embedding and batch norm, and the number of batches they were trained on."""
    dsbn = _indices(state, r"dsbn\.bns\.(\d+)\.")
    batch_rows = state["batch_encoder.embedding.weight"].shape[0] if "batch_encoder.embedding.weight" in state else None
    found.from_weights("use_batch_labels", batch_rows is not None)
    norm = "dsbn" if dsbn else ("batchnorm" if "bn.running_mean" in state else False)
    found.from_weights("domain_spec_batchnorm", norm)
    if dsbn or batch_rows:
        if dsbn and batch_rows and len(dsbn) != batch_rows:
            raise ValueError(f"dsbn has {len(dsbn)} domains but batch_encoder has {batch_rows} batches.")
        found.from_weights("num_batch_labels", batch_rows or len(dsbn))


def _heads_from_weights(found: _Settings, state: Mapping[str, torch.Tensor]) -> None:
    """The MVC decoder, the cell-type classifier and the batch discriminator, as far as the weights have them."""
    found.from_weights("do_mvc", "mvc_decoder.gene2query.weight" in state)
    if found.values["do_mvc"]:
        if "mvc_decoder.W.weight" in state:
            style = "inner product"
        elif state["mvc_decoder.gene2query.weight"].shape[0] == 64:
            style = "concat query"
        else:
            style = "sum query"
        found.from_weights("mvc_decoder_style", style)
    if "cls_decoder.out_layer.weight" in state:
        linears = {i for i in _indices(state, r"cls_decoder\._decoder\.(\d+)\.weight$")
                   if state[f"cls_decoder._decoder.{i}.weight"].dim() == 2}
        found.from_weights("nlayers_cls", len(linears) + 1)
        found.from_weights("num_labels", state["cls_decoder.out_layer.weight"].shape[0])
    if "grad_reverse_discriminator.out_layer.weight" in state:
        found.from_weights("do_dab", True)
        if "num_batch_labels" not in found.values:
            found.from_weights("num_batch_labels", state["grad_reverse_discriminator.out_layer.weight"].shape[0])


def _perturbation_settings(found: _Settings, state: Mapping[str, torch.Tensor]) -> None:
    """A perturbation generator's flag embedding and affine decoder settings."""
    if "pert_encoder.weight" not in state:
        return
    found.from_weights("use_perturbation_flags", True)
    found.from_args("pert_pad_id", ("pert_pad_id",), _zero_row(state["pert_encoder.weight"], default=2))
    found.from_args("perturbation_decoder_activation", ("decoder_activation",), None)
    found.from_args("perturbation_decoder_adaptive_bias", ("decoder_adaptive_bias",), False)


def _modality_settings(found: _Settings, state: Mapping[str, torch.Tensor], modality_vocab: Mapping | None) -> None:
    """A multi-omic model's modality embedding, its vocabulary (converter option) and its padding id."""
    if "mod_encoder.embedding.weight" not in state:
        if modality_vocab is not None:
            raise ValueError("modality_vocab was given but the checkpoint has no modality embedding (mod_encoder.*).")
        return
    rows = state["mod_encoder.embedding.weight"].shape[0]
    found.from_weights("use_modality_embeddings", True)
    found.from_weights("modality_vocab_size", rows)
    if modality_vocab is not None:
        if len(modality_vocab) != rows:
            raise ValueError(
                f"The modality vocabulary given has {len(modality_vocab)} entries "
                f"({sorted(modality_vocab, key=modality_vocab.get)}) but mod_encoder has {rows} rows: "
                "it is not the modality vocabulary these weights were trained with."
            )
        found.record("modality_vocab", dict(modality_vocab), "converter option")
    else:
        found.sources["modality_vocab"] = "None (not given: pass modality_vocab to name the modality ids)"
    pad = (modality_vocab or {}).get(_pad_token(found.args))
    if pad is None:
        pad = _zero_row(state["mod_encoder.embedding.weight"], default=None)
    found.record("modality_pad_id", pad, f"{pad!r} (modality vocabulary, or the all-zero row of the weights)")


def _zero_row(weight: torch.Tensor, default):
    """The padding row of a trained embedding is all zeros (it never receives gradients); None if unclear."""
    rows = [i for i in range(weight.shape[0]) if not weight[i].any()]
    return rows[0] if len(rows) == 1 else default


def _settings_from_args(found: _Settings) -> None:
    """The attention heads (which the weights cannot show and which have no safe default) and the settings of
    `_ARG_DEFAULTS`."""
    found.from_args("num_attention_heads", ("nheads", "nhead"), None)
    if found.values["num_attention_heads"] is None:
        raise ValueError(
            "The number of attention heads cannot be read from the weights and args.json has no 'nheads'; "
            "pass it (CLI: --nheads, Python: nheads=...)."
        )
    for name, default in _ARG_DEFAULTS.items():
        found.from_args(name, (name,), default)


def _check_arg_type(name: str, arg: str, value: object) -> None:
    """args.json values of the wrong type (a quoted number, say) would fail deep inside the model."""
    types, what = _ARG_TYPES[name]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        override = f" or override it ({_override_hint(name)})" if name in _OPTIONS else ""
        raise ValueError(
            f"args.json {arg} is {value!r} ({type(value).__name__}); it must be {what}: correct args.json{override}."
        )


def _check_files_agree(values: Mapping, args: Mapping, vocab: Mapping[str, int]) -> None:
    """args.json sizes and the vocabulary must agree with the weights: a disagreement means mismatched files."""
    for arg, name in (("embsize", "hidden_size"), ("nlayers", "num_hidden_layers"), ("d_hid", "intermediate_size")):
        if arg in args and args[arg] != values[name]:
            raise ValueError(
                f"args.json says {arg}={args[arg]} but the weights have {name}={values[name]}: "
                "the args.json does not belong to this best_model.pt."
            )
    if len(vocab) != values["vocab_size"]:
        raise ValueError(
            f"vocab.json has {len(vocab)} tokens but the gene embedding has {values['vocab_size']} rows: "
            "the vocabulary does not belong to these weights."
        )


def _settings_error(err: ValueError, sources: Mapping[str, str]) -> ValueError:
    """A settings check's error, with where the settings it names came from and how to change them."""
    named = [name for name in sources if name in str(err)]
    hints = [_override_hint(name) for name in named if name in _OPTIONS]
    return ValueError(
        f"The settings make no valid model: {str(err).rstrip('.')}"
        + (f" ({'; '.join(f'{name} = {sources[name]}' for name in named)})" if named else "")
        + ". Correct args.json or override the setting" + (f" ({'; '.join(hints)})." if hints else ".")
    )


def _override_hint(name: str) -> str:
    flag, keyword = _OPTIONS[name]
    return (f"CLI: {flag}, " if flag else "") + f"Python: {keyword}=..."


def _name_classes(config: ScGPTConfig, sources: dict[str, str], labels: list[str] | None) -> None:
    """An annotation model needs a trained classifier; `labels` names its classes in output order."""
    if "num_labels" not in sources:
        raise ValueError("task='annotation' needs a checkpoint with a cell-type classifier (cls_decoder.*).")
    if config.num_labels <= 1:
        raise ValueError(
            f"task='annotation' needs a trained cell-type classifier, but cls_decoder has {config.num_labels} "
            "class: the untrained placeholder every original model carries (a foundation checkpoint). Convert "
            "it with task='pretraining' and fine-tune a classifier with "
            "ScGPTForCellClassification.from_pretrained(folder, num_labels=N, train_new_weights=True)."
        )
    if labels is None:
        sources["id2label"] = "LABEL_0.. (no labels option: pass the class names in training order)"
        return
    if len(labels) != config.num_labels:
        raise ValueError(f"{len(labels)} labels given but the classifier has {config.num_labels} outputs.")
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    sources["id2label"] = "labels option"


# ----------------------------------------------------------------------------------------------------------------
# The weights


def convert_state_dict(
    state: Mapping[str, torch.Tensor], task: str = "pretraining"
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Rename original keys to ours for `task`'s model.

    Returns (new state dict, mapped source->target, left-out source->reason).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {sorted(TASKS)}.")
    not_for_task = TASKS[task][1]
    converted, mapped, left_out, unknown = {}, {}, {}, []
    for key, tensor in state.items():
        reason = next((why for pattern, why in not_for_task.items() if re.match(pattern, key)), None)
        if reason is not None:
            left_out[key] = reason
            continue
        target = _map_key(_normalise_attention_key(key))
        if target is None:
            unknown.append(key)
        else:
            converted[target], mapped[key] = tensor, target
    if unknown:
        raise ValueError(
            f"The checkpoint has keys this converter does not understand: {unknown[:10]}"
            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            + ". It may come from a modified scGPT; nothing was written."
        )
    return converted, mapped, left_out


def _normalise_attention_key(key: str) -> str:
    """Released (`Wqkv`), compat-wrapper (`_impl.Wqkv`) and PyTorch (`in_proj_`) layouts -> PyTorch names."""
    key = key.replace(".self_attn._impl.", ".self_attn.")
    return re.sub(r"\.self_attn\.Wqkv\.(weight|bias)$", r".self_attn.in_proj_\1", key)


def _map_key(key: str) -> str | None:
    for pattern, target in _KEY_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    return None


def _load_converted(model: torch.nn.Module, converted: Mapping[str, torch.Tensor], mapped: Mapping[str, str]) -> None:
    """Load the converted weights strictly, first naming (by its source key) any that has no place or shape."""
    expected = model.state_dict()
    source_of = {target: source for source, target in mapped.items()}
    for key, tensor in converted.items():
        if key not in expected:
            raise ValueError(f"Checkpoint key {source_of[key]!r} has no place in a model with the inferred config.")
        if expected[key].shape != tensor.shape:
            raise ValueError(
                f"Checkpoint key {source_of[key]!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[key].shape)} for {key!r} under the inferred config."
            )
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"The checkpoint lacks weights the model needs: {missing[:10]}.")
    model.load_state_dict(converted, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _make_tokenizer(
    vocab_file: Path, args: Mapping, config: ScGPTConfig, sources: Mapping[str, str]
) -> ScGPTTokenizer:
    """The tokenizer the model was trained with; a setting it refuses is named with where it came from."""
    try:
        return ScGPTTokenizer(
            vocab_file=str(vocab_file),
            pad_token=_pad_token(args),
            n_bins=config.n_bins,
            pad_value=config.pad_value,
            max_length=config.max_seq_len,
        )
    except ValueError as err:
        raise _settings_error(err, sources) from None


def check_saved_folder(folder: str | os.PathLike, model: torch.nn.Module, tokenizer: ScGPTTokenizer) -> None:
    """Raise unless `folder` loads back as `model` (every weight equal) with `tokenizer`'s vocabulary: the check
    a written model folder passes before it replaces anything (`convert_original_checkpoint`, `pretrain`)."""
    loaded = type(model).from_pretrained(folder).state_dict()
    expected = model.state_dict()
    differ = sorted(k for k in expected if k not in loaded or not torch.equal(loaded[k], expected[k].cpu()))
    if differ or set(loaded) != set(expected):
        raise RuntimeError(f"The written folder does not load back as the model (differs at "
                           f"{_listed(differ or sorted(set(loaded) ^ set(expected)))}); nothing was replaced.")
    if ScGPTTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
        raise RuntimeError("The written tokenizer does not load back with its vocabulary; nothing was replaced.")
