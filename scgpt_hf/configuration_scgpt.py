"""Configuration of scGPT models: every architecture option of the original `TransformerModel`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from transformers import PretrainedConfig

INPUT_EMB_STYLES = ("continuous", "category", "scaling")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
MVC_DECODER_STYLES = ("inner product", "concat query", "sum query")
BATCH_NORM_STYLES = (False, "dsbn", "batchnorm")


class _Derived:
    """A config attribute computed from other attributes unless set explicitly to something else.

    Only a value that differs from the derived one is stored, so the attribute follows its sources when
    they change later, as `from_pretrained(path, n_bins=101)` and `from_dict(d, modality_vocab=...)` do
    (they set kwargs after `__init__`). Saved configs hold the derived values too (`to_dict` writes them
    for readers of config.json); loading one stores nothing explicit, since those values match.
    """

    def __init__(self, derive: Callable[[ScGPTConfig], Any]):
        self.derive = derive

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, config: ScGPTConfig | None, owner: type | None = None) -> Any:
        if config is None:
            return self
        explicit = config._explicit.get(self.name)
        return explicit if explicit is not None else self.derive(config)

    def __set__(self, config: ScGPTConfig, value: Any) -> None:
        config.__dict__.setdefault("_explicit", {})
        if value is None or value == self.derive(config):
            config._explicit.pop(self.name, None)
        else:
            config._explicit[self.name] = value


class _NameToId:
    """A name -> id mapping attribute whose names are kept as strings, as JSON keys are, however it is set
    (constructor, `from_pretrained` kwargs, later assignment), so lookups by `str(name)` work and a saved and
    reloaded mapping is equal. Anything but a mapping is stored as given, for `_validate` to reject."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, config: ScGPTConfig | None, owner: type | None = None) -> Any:
        return self if config is None else config.__dict__.get(self.name)

    def __set__(self, config: ScGPTConfig, value: Any) -> None:
        if isinstance(value, Mapping):
            value = {str(name): int(i) for name, i in value.items()}
        config.__dict__[self.name] = value


class ScGPTConfig(PretrainedConfig):
    """Architecture of an scGPT model.

    Defaults describe the released whole-human checkpoint (`scGPT_human`). Attribute names follow
    transformers (`hidden_size`, `num_hidden_layers`, ...); the original's names (`d_model`, `nhead`,
    `d_hid`, `nlayers`, `embsize`) are accepted as aliases.

    Args:
        vocab_size: Number of gene tokens, special tokens included.
        hidden_size: Width of the gene, value and cell embeddings (`d_model`).
        num_hidden_layers: Transformer layers (`nlayers`).
        num_attention_heads: Attention heads per layer (`nhead`).
        intermediate_size: Width of each layer's feed-forward block (`d_hid`).
        dropout: One dropout rate used everywhere, as in the original.
        layer_norm_eps: Epsilon of the transformer layers' LayerNorms.
        pad_token_id, cls_token_id, eoc_token_id: Ids of `<pad>`, `<cls>`, `<eoc>`.
        pad_value: Expression value at padded positions.
        mask_value: Expression value of masked positions in pretraining.
        n_bins: Number of expression bins (bin 0 is "not expressed").
        max_seq_len: Longest cell (genes plus `<cls>`) the model was trained on.
        input_emb_style: "continuous" (MLP on the value), "category" (embedding per bin) or
            "scaling" (gene embedding times value).
        n_input_bins: Rows of the "category" value embedding (default, and re-derived when n_bins changes:
            n_bins + 2, i.e. bins, pad, mask).
        max_value: Values are clamped to at most this before the continuous value encoder.
        cell_emb_style: "cls" (output at `<cls>`), "avg-pool" or "w-pool" (value-weighted sum).
        pre_norm: Use the original's pre-norm layers instead of post-norm.
        explicit_zero_prob: Add heads predicting the probability that a gene is not expressed.
        use_batch_labels: Concatenate a batch embedding to the decoders' input.
        num_batch_labels: Number of batches (needed with batch labels, batch norm or the discriminator);
            defaults to the size of `batch2id`.
        batch2id: Batch name -> id of the batches a model was fine-tuned on (like `label2id` for cell
            types), e.g. `CellDataset(...).batch2id`; `embed` / `annotate(..., batch_key=...)` map obs batch
            names through it and name unknown batches. Ids must be 0..num_batch_labels-1.
        domain_spec_batchnorm: False, "dsbn" (one BatchNorm per batch) or "batchnorm".
        do_mvc: Whether the pretraining head has the MVC (gene expression from cell embedding) decoder.
        mvc_decoder_style: "inner product", "concat query" or "sum query".
        use_generative_flag: The model carries the generative-pretraining flag embedding.
        nlayers_cls: Layers of the classification decoder.
        do_dab: Batch integration trains an adversarial batch discriminator (needs num_batch_labels).
        ecs_threshold: Elastic cell similarity target in batch integration (0 turns ECS off).
        ecs_weight, dab_weight: Weights of the ECS and discriminator losses (the original's 10 and 1).
        use_perturbation_flags: Add the perturbation-flag embedding of the original perturbation generator
            (`TransformerGenerator`): one vector per token for "not perturbed" (0), "perturbed" (1) or
            padding (2), summed with the gene and value embeddings. `ScGPTForPerturbationPrediction`
            turns it on.
        pert_pad_id: Flag id of padded positions; its embedding row is zero and never trained (the
            original's default 2; some of its tutorials use 0, which freezes "not perturbed" instead).
        perturbation_decoder_activation: Name of a `torch.nn` activation (e.g. "ReLU") applied to the
            coefficient and the bias of the affine perturbation decoder (the original's
            `decoder_activation`; None = none).
        perturbation_decoder_adaptive_bias: Scale the affine decoder's bias by each cell's mean non-zero
            input value (the original's `decoder_adaptive_bias`).
        use_modality_embeddings: Multi-omic models (`ScGPTForMultiOmicIntegration`): embed each token's
            modality (e.g. RNA, ATAC peak, protein) and add it to the batch embedding at the decoders'
            input, as the original `MultiOmicTransformerModel` (`use_mod`).
        modality_vocab_size: Rows of the modality embedding (the original's `ntokens_mod`: modalities
            plus its special tokens); defaults to the size of `modality_vocab`.
        modality_vocab: Modality name -> id (e.g. {"RNA": 0, "ATAC": 1, "protein": 2, "<pad>": 3,
            "<cls>": 4, "<eoc>": 5}); optional, but needed to turn names into ids and to check a dataset's
            modality vocabulary against the model's.
        modality_pad_id: Modality id of padded positions (embedding row kept at zero); defaults to
            `modality_vocab["<pad>"]` when the vocabulary has one.
    """

    model_type = "scgpt"
    attribute_map = {
        "d_model": "hidden_size",
        "embsize": "hidden_size",
        "nhead": "num_attention_heads",
        "d_hid": "intermediate_size",
        "nlayers": "num_hidden_layers",
    }

    # transformers makes subclasses dataclasses, whose generated __eq__ would compare the base fields only
    # (configs differing in every scGPT setting would be equal); compare all attributes, as transformers does.
    __eq__ = PretrainedConfig.__eq__

    # Values that follow other attributes unless set explicitly (see `_Derived`).
    batch2id = _NameToId()
    n_input_bins = _Derived(lambda config: config.n_bins + 2)
    num_batch_labels = _Derived(lambda config: len(config.batch2id) if config.batch2id else None)
    modality_vocab_size = _Derived(lambda config: len(config.modality_vocab) if config.modality_vocab else None)
    modality_pad_id = _Derived(lambda config: (config.modality_vocab or {}).get("<pad>"))

    def __init__(
        self,
        vocab_size: int = 60697,
        hidden_size: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        intermediate_size: int = 512,
        dropout: float = 0.2,
        layer_norm_eps: float = 1e-5,
        pad_token_id: int = 60694,
        cls_token_id: int = 60695,
        eoc_token_id: int = 60696,
        pad_value: float = -2.0,
        mask_value: float = -1.0,
        n_bins: int = 51,
        max_seq_len: int = 1200,
        input_emb_style: str = "continuous",
        n_input_bins: int | None = None,
        max_value: float = 512.0,
        cell_emb_style: str = "cls",
        pre_norm: bool = False,
        explicit_zero_prob: bool = False,
        use_batch_labels: bool = False,
        num_batch_labels: int | None = None,
        batch2id: Mapping[str, int] | None = None,
        domain_spec_batchnorm: bool | str = False,
        do_mvc: bool = True,
        mvc_decoder_style: str = "inner product",
        use_generative_flag: bool = False,
        nlayers_cls: int = 3,
        do_dab: bool = False,
        ecs_threshold: float = 0.3,
        ecs_weight: float = 10.0,
        dab_weight: float = 1.0,
        initializer_range: float = 0.02,
        use_perturbation_flags: bool = False,
        pert_pad_id: int = 2,
        perturbation_decoder_activation: str | None = None,
        perturbation_decoder_adaptive_bias: bool = False,
        use_modality_embeddings: bool = False,
        modality_vocab_size: int | None = None,
        modality_vocab: dict[str, int] | None = None,
        modality_pad_id: int | None = None,
        **kwargs,
    ):
        self._explicit = {}  # values of `_Derived` attributes set to something other than their default
        # Attributes are set topic by topic; a `_Derived` one after the attributes it follows.
        # The transformer.
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.dropout, self.layer_norm_eps, self.initializer_range = dropout, layer_norm_eps, initializer_range
        # Tokens and expression values.
        self.cls_token_id, self.eoc_token_id, self.max_seq_len = cls_token_id, eoc_token_id, max_seq_len
        self.pad_value, self.mask_value, self.max_value = float(pad_value), float(mask_value), float(max_value)
        self.input_emb_style, self.n_bins, self.n_input_bins = input_emb_style, n_bins, n_input_bins
        # Cell embedding and the pretraining, classification and integration heads.
        self.cell_emb_style, self.pre_norm, self.explicit_zero_prob = cell_emb_style, pre_norm, explicit_zero_prob
        self.do_mvc, self.mvc_decoder_style, self.use_generative_flag = do_mvc, mvc_decoder_style, use_generative_flag
        self.nlayers_cls, self.do_dab, self.dab_weight = nlayers_cls, do_dab, dab_weight
        self.ecs_threshold, self.ecs_weight = ecs_threshold, ecs_weight
        # Batches.
        self.use_batch_labels, self.batch2id, self.num_batch_labels = use_batch_labels, batch2id, num_batch_labels
        self.domain_spec_batchnorm = "dsbn" if domain_spec_batchnorm is True else domain_spec_batchnorm
        # Perturbation flags and decoder.
        self.use_perturbation_flags, self.pert_pad_id = bool(use_perturbation_flags), int(pert_pad_id)
        self.perturbation_decoder_activation = perturbation_decoder_activation
        self.perturbation_decoder_adaptive_bias = bool(perturbation_decoder_adaptive_bias)
        # Modalities.
        self.use_modality_embeddings = bool(use_modality_embeddings)
        self.modality_vocab = dict(modality_vocab) if modality_vocab is not None else None
        self.modality_vocab_size, self.modality_pad_id = modality_vocab_size, modality_pad_id
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self._validate()

    @property
    def needs_batch_labels(self) -> bool:
        """Whether the forward pass reads batch labels (batch embedding or per-batch norm)."""
        return bool(self.use_batch_labels) or self.domain_spec_batchnorm == "dsbn"

    def checked_modality_vocab(self, given: Mapping[str, int] | None = None) -> dict[str, int]:
        """The model's modality vocabulary (name -> id); `given`, e.g. a data pipeline's, must equal it,
        since a different one would silently mean different modalities."""
        if not self.use_modality_embeddings or self.modality_vocab is None:
            raise ValueError(
                "This config has no modality vocabulary (config.use_modality_embeddings / config.modality_vocab): "
                "use a multi-omic model with modality embeddings, or set config.modality_vocab "
                "(converter: modality_vocab=...)."
            )
        if given is not None and dict(given) != self.modality_vocab:
            raise ValueError(
                f"The data's modality vocabulary {dict(given)} differs from the model's {self.modality_vocab}; "
                "encode modalities with the vocabulary the model was trained with (config.modality_vocab)."
            )
        return dict(self.modality_vocab)

    def _validate(self) -> None:
        """Raise on settings that contradict each other; run after `__init__` and after `from_dict` kwargs."""
        _check_choice("input_emb_style", self.input_emb_style, INPUT_EMB_STYLES)
        _check_choice("cell_emb_style", self.cell_emb_style, CELL_EMB_STYLES)
        _check_choice("mvc_decoder_style", self.mvc_decoder_style, MVC_DECODER_STYLES)
        _check_choice("domain_spec_batchnorm", self.domain_spec_batchnorm, BATCH_NORM_STYLES)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        _check_mapping("batch2id", self.batch2id, "num_batch_labels", self.num_batch_labels)
        if (self.use_batch_labels or self.do_dab or self.domain_spec_batchnorm == "dsbn") and not self.num_batch_labels:
            raise ValueError(
                "num_batch_labels is required with batch labels, the batch discriminator or domain-specific "
                "batch norm: pass the number of batches in the training data, or batch2id (batch name -> id)."
            )
        if self.pert_pad_id not in (0, 1, 2):
            raise ValueError(
                f"pert_pad_id must be one of the 3 perturbation flags 0, 1, 2; got {self.pert_pad_id!r}."
            )
        _check_mapping("modality_vocab", self.modality_vocab, "modality_vocab_size", self.modality_vocab_size)
        size, pad_id = self.modality_vocab_size, self.modality_pad_id
        if self.use_modality_embeddings and not size:
            raise ValueError(
                "use_modality_embeddings needs modality_vocab_size (or modality_vocab): the number of modality ids."
            )
        if pad_id is not None and size is not None and not 0 <= pad_id < size:
            raise ValueError(f"modality_pad_id={pad_id} is outside the modality vocabulary [0, {size}).")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> ScGPTConfig | tuple[ScGPTConfig, dict[str, Any]]:
        """As `PretrainedConfig.from_dict`, which sets `kwargs` after `__init__`, then checks the result."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result)._validate()
        return result

    def to_dict(self) -> dict[str, Any]:
        """As `PretrainedConfig.to_dict`, with every `_Derived` value written under its own name."""
        output = super().to_dict()
        del output["_explicit"]
        output.update(
            {name: getattr(self, name) for name, value in vars(ScGPTConfig).items() if isinstance(value, _Derived)}
        )
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Any:
        """Checks the settings first (attributes may have been changed since construction), so a folder that
        would not load is never written."""
        self._validate()
        return super().save_pretrained(save_directory, **kwargs)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}.")


def _check_mapping(name: str, mapping: Mapping[str, int] | None, size_name: str, size: int | None) -> None:
    """A name -> id mapping (batches, modalities) must number its names 0..n-1 and have `size` entries."""
    if mapping is None:
        return
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"{name} must be a non-empty mapping of names to ids; got {mapping!r}.")
    ids = sorted(mapping.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{name} ids must be the distinct integers 0..{len(ids) - 1}; got {dict(mapping)}.")
    if size != len(mapping):
        raise ValueError(
            f"{name} has {len(mapping)} entries ({sorted(mapping, key=mapping.get)}) but {size_name} is {size}: "
            f"{name} does not belong to this model (leave {size_name} unset to take it from {name})."
        )
