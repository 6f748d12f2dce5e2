"""scGPT models: a cell is a set of (gene, binned expression) tokens read by a transformer encoder.

Numerically faithful to the original `scgpt` `TransformerModel` (see tests/test_parity.py); attention
runs through transformers' attention interface, so `attn_implementation="eager" | "sdpa" |
"flash_attention_2"` all work without flash-attn being required.

Inference can also run padding-free: the cells of a batch concatenated into one row of tokens (`cu_seq_lens_q`,
`max_length_q`, transformers' packed-sequence arguments), with attention kept within each cell
(`packed_attention_forward`); `ScGPTModel` and `ScGPTForCellClassification` take such input.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

try:  # relative when imported as part of scgpt_hf, flat when loaded as Hub remote code
    from .configuration_scgpt import ScGPTConfig
except ImportError:  # pragma: no cover
    from configuration_scgpt import ScGPTConfig


# ----------------------------------------------------------------------------------------------
# Outputs


@dataclass
class ScGPTModelOutput(ModelOutput):
    """Backbone output.

    Args:
        last_hidden_state: (batch, seq_len, hidden) transformer output per gene token.
        cell_embedding: (batch, hidden) cell embedding by `config.cell_emb_style` (not L2-normalised).
        gene_embeddings: (batch, seq_len, hidden) gene-encoder output (gene identity only, no value),
            read by the MVC decoder and by gene-network analyses.
        batch_embedding: (batch, hidden) batch-label embedding when `config.use_batch_labels`.
        hidden_states: input embeddings plus each layer's output, with `output_hidden_states=True`.
        attentions: each layer's attention probabilities, with `output_attentions=True` (eager only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    gene_embeddings: torch.FloatTensor | None = None
    batch_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ScGPTForPreTrainingOutput(ModelOutput):
    """Pretraining-head output.

    Args:
        loss: training loss when targets are given (see the heads).
        expression: (batch, seq_len) expression predicted from each token's hidden state.
        zero_probs: (batch, seq_len) probability of zero expression (`explicit_zero_prob`).
        mvc_expression: (batch, seq_len) expression predicted from the cell embedding (MVC/GEPC).
        mvc_zero_probs: (batch, seq_len) MVC zero probabilities (`explicit_zero_prob`).
        cell_embedding, last_hidden_state, hidden_states, attentions: as in `ScGPTModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    expression: torch.FloatTensor | None = None
    zero_probs: torch.FloatTensor | None = None
    mvc_expression: torch.FloatTensor | None = None
    mvc_zero_probs: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ScGPTForBatchIntegrationOutput(ScGPTForPreTrainingOutput):
    """Batch-integration output: the pretraining outputs plus `batch_logits` from the adversarial
    discriminator (`config.do_dab`) and the elastic cell similarity loss `ecs_loss` (with `labels` only)."""

    batch_logits: torch.FloatTensor | None = None
    ecs_loss: torch.FloatTensor | None = None


@dataclass
class ScGPTForPerturbationPredictionOutput(ScGPTForPreTrainingOutput):
    """Perturbation-prediction output, in the pretraining output's fields (there is no MVC decoder, so
    `mvc_expression` and `mvc_zero_probs` stay None).

    Args:
        loss: MSE between `expression` and `labels` over real (non-padded) positions, when labels are given.
        expression: (batch, seq_len) predicted post-perturbation expression, coefficient * input value + bias.
        zero_probs: (batch, seq_len) zero-expression probabilities from the coefficient decoder
            (`explicit_zero_prob`).
    """


@dataclass
class ScGPTForCellClassificationOutput(ModelOutput):
    """Cell-type classification output: `loss` (cross-entropy, with labels), `logits` (batch, num_labels)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Input embeddings


class ScGPTContinuousValueEncoder(nn.Module):
    """Expression value -> vector with a two-layer MLP (values clamped to `max_value` first)."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, config.hidden_size)
        self.linear2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.max_value = config.max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(F.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class ScGPTCategoryValueEncoder(nn.Module):
    """Expression bin -> vector with one embedding per bin; `pad_value` and `mask_value` are bins of their own."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        rows = config.n_input_bins
        for name in ("pad_value", "mask_value"):
            value = getattr(config, name)
            if value != int(value) or not 0 <= value < rows:
                raise ValueError(
                    f"input_emb_style='category' embeds bins 0..{rows - 1}, so {name} must be one of them "
                    f"(got {value}); the original uses pad_value=n_bins, mask_value=n_bins+1, n_input_bins=n_bins+2."
                )
        self.embedding = nn.Embedding(rows, config.hidden_size, padding_idx=int(config.pad_value))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(values.long()))


class ScGPTDomainBatchNorm(nn.Module):
    """One non-affine BatchNorm per batch (domain); each cell is normalised by its own batch's statistics.

    The original picks the domain of the first cell for the whole minibatch; grouping rows by their own
    label gives the same numbers when a minibatch holds one batch (as the original's sampler ensures) and
    the right ones otherwise.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(config.hidden_size, eps=6.1e-5, affine=False) for _ in range(config.num_batch_labels)
        )

    def forward(self, embeddings: torch.Tensor, batch_labels: torch.Tensor) -> torch.Tensor:
        """`batch_labels`: one per cell (batch,), or one per token (1, total_tokens) for packed cells."""
        if batch_labels.dim() == 2:  # packed: each token is normalised as a one-token cell of its batch
            return self(embeddings.transpose(0, 1), batch_labels[0]).transpose(0, 1)
        out = torch.empty_like(embeddings)
        for domain in torch.unique(batch_labels).tolist():
            rows = batch_labels == domain
            out[rows] = self.bns[domain](embeddings[rows].transpose(1, 2)).transpose(1, 2)
        return out


class ScGPTLabelEncoder(nn.Module):
    """Embedding plus LayerNorm, for batch labels and modality ids."""

    def __init__(self, num_embeddings: int, hidden_size: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, hidden_size, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(ids))


class ScGPTEmbeddings(nn.Module):
    """Gene-identity embedding combined with the expression-value embedding (no positions: cells are sets)."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.input_emb_style = config.input_emb_style
        self.gene_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.gene_norm = nn.LayerNorm(config.hidden_size)
        if config.input_emb_style == "continuous":
            self.value_encoder = ScGPTContinuousValueEncoder(config)
        elif config.input_emb_style == "category":
            self.value_encoder = ScGPTCategoryValueEncoder(config)
        if config.domain_spec_batchnorm == "dsbn":
            self.dsbn = ScGPTDomainBatchNorm(config)
        elif config.domain_spec_batchnorm == "batchnorm":
            self.bn = nn.BatchNorm1d(config.hidden_size, eps=6.1e-5)
        if config.use_generative_flag:
            # Marks genes whose expression is to be generated (generative pretraining).
            self.flag_embeddings = nn.Embedding(2, config.hidden_size)
        if config.use_perturbation_flags:
            # Perturbation generator: 0 = not perturbed, 1 = perturbed, pert_pad_id = padding.
            self.perturbation_embeddings = nn.Embedding(3, config.hidden_size, padding_idx=config.pert_pad_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        batch_labels: torch.Tensor | None,
        perturbation_flags: torch.Tensor | None = None,
        generative_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input embeddings, gene embeddings).

        Genes to generate (`generative_mask`) carry no value: their input is the gene embedding plus the
        generative flag embedding, as in the original's generative pretraining.
        """
        genes = self.gene_norm(self.gene_embeddings(input_ids))
        if self.input_emb_style == "scaling":
            embeddings = genes * values.unsqueeze(-1).to(genes.dtype)
        else:
            embeddings = genes + self.value_encoder(values.to(genes.dtype))
        if generative_mask is not None:
            flagged = genes + self.flag_embeddings.weight[1]
            embeddings = torch.where(generative_mask.unsqueeze(-1), flagged, embeddings)
        if perturbation_flags is not None:
            embeddings = embeddings + self.perturbation_embeddings(perturbation_flags)
        if hasattr(self, "dsbn"):
            embeddings = self.dsbn(embeddings, batch_labels)
        elif hasattr(self, "bn"):
            embeddings = self.bn(embeddings.transpose(1, 2)).transpose(1, 2)
        return embeddings, genes


# ----------------------------------------------------------------------------------------------
# Transformer encoder


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; returns (batch, seq, heads, head_dim) output and the probabilities."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    cu_seq_lens_q: torch.Tensor,
    max_length_q: int,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each cell of a packed row: query, key, value (1, heads, total_tokens, head_dim), cell k
    at tokens `cu_seq_lens_q[k]:cu_seq_lens_q[k + 1]`; returns (1, total_tokens, heads, head_dim), no probabilities.

    On an accelerator the cells go to SDPA as one nested jagged tensor (a single variable-length kernel, no
    host-device synchronisation); on the CPU, where nested SDPA is a slow reference path (bench/packed_attention.py),
    each cell gets its own SDPA call.
    """
    attend = _per_cell_attention if query.device.type == "cpu" else _nested_attention
    return attend(query, key, value, cu_seq_lens_q, max_length_q, scaling), None


def _per_cell_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int,
    scaling: float,
) -> torch.Tensor:
    """One SDPA call per cell (the offsets are read on the host: for the CPU)."""
    lengths = cu_seq_lens.diff().tolist()
    cells = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, scale=scaling) for q, k, v in cells], dim=2)
    return out.transpose(1, 2)


def _nested_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int,
    scaling: float,
) -> torch.Tensor:
    """All cells in one SDPA call on nested jagged tensors (a variable-length kernel on CUDA)."""
    # Nested tensors cannot be views of inference tensors, and nested SDPA wants each input in its own storage.
    with torch.inference_mode(False):
        q, k, v = (
            torch.nested.nested_tensor_from_jagged(
                t[0].transpose(0, 1).clone(memory_format=torch.contiguous_format),  # (total_tokens, heads, dim)
                offsets=cu_seq_lens,
                max_seqlen=max_length,
            ).transpose(1, 2)
            for t in (query, key, value)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling).transpose(1, 2).values()
    return out.unsqueeze(0)


class ScGPTSelfAttention(nn.Module):
    """Multi-head self-attention with packed [q; k; v] projection, as the original's `Wqkv` / `in_proj`."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout
        self.is_causal = False
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, seq, head_dim)
        attention_interface: Callable = (
            packed_attention_forward
            if kwargs.get("cu_seq_lens_q") is not None
            else ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.out_proj(attn_output.reshape(batch, seq_len, -1)), attn_weights


class ScGPTLayer(GradientCheckpointingLayer):
    """Transformer layer: attention and a ReLU feed-forward block, post-norm or the original's pre-norm.

    The original's pre-norm variant normalises the stream itself before each block (the residual is
    taken from the normalised input); it is reproduced as is so converted pre-norm checkpoints agree.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.self_attn = ScGPTSelfAttention(config)
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            x = self.norm1(hidden_states)
            attn, weights = self.self_attn(x, attention_mask, **kwargs)
            x = self.norm2(x + self.dropout1(attn))
            return x + self._feed_forward(x), weights
        attn, weights = self.self_attn(hidden_states, attention_mask, **kwargs)
        x = self.norm1(hidden_states + self.dropout1(attn))
        return self.norm2(x + self._feed_forward(x)), weights


class ScGPTEncoder(nn.Module):
    """The layer stack; each layer's output and attention probabilities are recorded on request by the
    backbone's `capture_outputs` (see `ScGPTPreTrainedModel._can_record_outputs`)."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(ScGPTLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


# ----------------------------------------------------------------------------------------------
# Base class and backbone


class ScGPTPreTrainedModel(PreTrainedModel):
    """Weight initialisation, loading and saving shared by every scGPT model."""

    config_class = ScGPTConfig
    config: ScGPTConfig
    base_model_prefix = "scgpt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScGPTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # `output_hidden_states` / `output_attentions`: the embeddings and each layer's output, each layer's
    # attention probabilities (eager attention only computes them).
    _can_record_outputs = {"hidden_states": ScGPTLayer, "attentions": OutputRecorder(ScGPTSelfAttention, index=1)}

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, train_new_weights: bool = False, **kwargs
    ) -> ScGPTPreTrainedModel | tuple[ScGPTPreTrainedModel, dict[str, Any]]:
        """`PreTrainedModel.from_pretrained` that refuses weights the folder lacks.

        Weights missing from the folder (a classifier absent from a pretraining checkpoint, say) would start
        random, and every answer read from them would be meaningless; loading raises, naming them, unless
        `train_new_weights=True` says they are about to be trained (fine-tuning a head on a pretrained
        backbone). They are then listed under `missing_keys` with `output_loading_info=True`.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        missing = set(info["missing_keys"])
        if missing and not train_new_weights:
            raise ValueError(
                f"{os.fspath(pretrained_model_name_or_path)} has no weights for "
                f"{', '.join(_missing_parts(model.state_dict(), missing))} of {cls.__name__}: they would start "
                "random, and everything read from them would be meaningless. To fine-tune them, load with "
                f"{cls.__name__}.from_pretrained(..., train_new_weights=True) and train (README: Heads and "
                "fine-tuning); to predict, load a folder fine-tuned for this task."
            )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ScGPTEmbeddings):
            # As the original: gene embeddings start uniform in [-0.1, 0.1].
            module.gene_embeddings.weight.uniform_(-0.1, 0.1)

    def encode_batch_labels(self, batches: Iterable[Any], *, as_ids: bool = False) -> torch.LongTensor:
        """Each cell's batch -> `batch_labels`, through `config.batch2id` when the model names its batches.

        A model with names takes names only, whatever their dtype: the strings "0", "1" that
        `anndata.concat(..., label=...)` writes are not ids 0, 1 (a number whose integer value is a name, as
        4.0 from a float column for the name "4", is that name). Integer ids are taken where the model has no
        names, or with `as_ids=True`. Raises, naming them, for batches the model was not trained on and for
        ids outside [0, num_batch_labels).
        """
        ids = batch_ids(batches, self.config.num_batch_labels, self.config.batch2id, as_ids=as_ids)
        return torch.tensor(ids, dtype=torch.long, device=self.device)


def _missing_parts(state: dict[str, Any], missing: set[str]) -> list[str]:
    """The largest modules (or single tensors) all of whose weights are in `missing`, for error messages."""
    parts = set()
    for key in missing:
        part = key
        while "." in part:
            parent = part.rsplit(".", 1)[0]
            if any(k.startswith(parent + ".") and k not in missing for k in state):
                break
            part = parent
        parts.add(part)
    return sorted(parts)


def batch_ids(
    batches: Iterable[Any],
    num_batch_labels: int | None,
    batch2id: Mapping[str, int] | None = None,
    *,
    as_ids: bool = False,
) -> list[int]:
    """`ScGPTPreTrainedModel.encode_batch_labels` from a model's batch settings alone (`config.num_batch_labels`,
    `config.batch2id`), e.g. those a served model publishes."""
    if not num_batch_labels:
        raise ValueError(
            "This model has no batches (config.num_batch_labels is unset), so it takes no batch labels."
        )
    batches = list(batches)
    known = batch2id or {}
    if known and not as_ids:
        names = [_batch_name(batch, known) for batch in batches]
        ids = [known.get(name) for name in names]
    else:
        names = [str(batch) for batch in batches]
        ids = [_as_batch_id(batch) for batch in batches]
    unknown = sorted({name for name, i in zip(names, ids) if i is None})
    if unknown:
        listed = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        if as_ids:
            raise ValueError(f"Batch labels {listed} are not integer ids (as_ids=True takes ids only).")
        if known:
            ids_hint = (
                " They look like integer ids: if they are the ids the model was trained with, say so with "
                "as_ids=True (embed / annotate: batch_as_ids=True)."
                if all(_as_batch_id(name) is not None for name in unknown) else ""
            )
            raise ValueError(
                f"Batches {listed} are not among the {len(known)} this model was trained on (config.batch2id: "
                f"{sorted(known, key=known.get)[:10]}): it has no batch embedding or batch norm for them. Pass the "
                f"training batch names, drop those cells, or fine-tune a model whose training data includes them."
                + ids_hint
            )
        raise ValueError(
            f"Batch labels {listed} are not integer ids, and this model has no config.batch2id to map batch "
            f"names: pass the ids 0..{num_batch_labels - 1} used in training, or set config.batch2id "
            "(e.g. to the training CellDataset's batch2id) and save the model."
        )
    _check_batch_ids(torch.tensor(ids, dtype=torch.long), num_batch_labels, batch2id)
    return ids


def _batch_name(value: Any, known: dict[str, int]) -> str:
    """`value` as a batch name: its string, or for a number the integer it equals when that is a name."""
    name = str(value)
    if name not in known and isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = _as_batch_id(value)
        if number is not None and str(number) in known:
            return str(number)
    return name


def _as_batch_id(value: Any) -> int | None:
    """An integer batch id from an int, an integral float or a numeric string; None for anything else."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _check_batch_ids(
    batch_labels: torch.Tensor, num_batch_labels: int, batch2id: Mapping[str, int] | None
) -> None:
    """Batch ids must index the model's batches; the one check for the forward pass, losses and `embed`."""
    if batch_labels.numel() and (batch_labels.min() < 0 or batch_labels.max() >= num_batch_labels):
        names = f"; config.batch2id names them: {sorted(batch2id, key=batch2id.get)[:10]}" if batch2id else ""
        raise ValueError(
            f"batch_labels must lie in [0, {num_batch_labels}) (config.num_batch_labels{names}); got values from "
            f"{int(batch_labels.min())} to {int(batch_labels.max())}: use the batch ids the model was trained with."
        )


def _without_padding(
    config: ScGPTConfig, input_ids: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked `input_ids` and `values`, every padded position set to the pad token and `config.pad_value`.

    Nothing a caller leaves in padding (NaN, the mask value, an unknown gene) reaches the computation, so a
    cell's outputs are the same whatever its padding holds; `torch.where` does it without device
    synchronisation. A cell whose attention_mask is all 0 has nothing to encode: an error, not a finite and
    meaningless embedding. That check reads the mask on the CPU only, where it costs no synchronisation; on
    an accelerator (and in an exported graph) such a cell comes out NaN instead (`ScGPTModel.forward`), and
    the data pipeline never makes one (every tokenised cell holds `<cls>`).
    """
    if input_ids.dim() != 2 or values.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and values must both be (batch, seq_len); got {tuple(input_ids.shape)} and "
            f"{tuple(values.shape)}."
        )
    if attention_mask is None:
        return input_ids, values
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}."
        )
    real = attention_mask.bool()
    if attention_mask.device.type == "cpu" and not torch.compiler.is_exporting():
        empty = ~real.any(1)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"cell {rows[0]} has no token (its attention_mask is all 0; {len(rows)} such cells in the batch): "
                "there is nothing to encode. Drop such cells, or give each at least its <cls> token (the "
                "tokenizer always does)."
            )
    return torch.where(real, input_ids, config.pad_token_id), torch.where(real, values, config.pad_value)


def _generative_attention_mask(
    attention_mask: torch.Tensor | None, generative_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, 1, L, L) bool mask (True = may attend) and the (batch, L) mask of known real tokens.

    Known genes attend to known genes; genes to generate attend to known genes and to themselves, so
    each is predicted from the known genes alone, independently of the others.
    """
    real = torch.ones_like(generative_mask) if attention_mask is None else attention_mask.bool()
    known = real & ~generative_mask
    length = generative_mask.shape[1]
    itself = torch.eye(length, dtype=torch.bool, device=generative_mask.device)
    allowed = known[:, None, None, :] | (itself[None, None] & generative_mask[:, None, :, None])
    return allowed, known.long()


class ScGPTModel(ScGPTPreTrainedModel):
    """The scGPT encoder: per-token hidden states and a cell embedding.

    Inputs come from `ScGPTTokenizer`: `input_ids` (gene ids, `<cls>` first), `values` (binned
    expression), `attention_mask` (1 for real tokens, 0 for padding).
    """

    # Loading the backbone alone from a head model's folder leaves the heads out on purpose.
    _keys_to_ignore_on_load_unexpected = [
        r"^(expression_decoder|mvc_decoder|classifier|discriminator|modality_encoder)\."
    ]

    def __init__(self, config: ScGPTConfig):
        super().__init__(config)
        self.embeddings = ScGPTEmbeddings(config)
        self.encoder = ScGPTEncoder(config)
        if config.use_batch_labels:
            self.batch_encoder = ScGPTLabelEncoder(config.num_batch_labels, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene_embeddings = value

    def _check_batch_labels(self, batch_labels: torch.Tensor | None, batch_size: int) -> None:
        if not self.config.needs_batch_labels:
            if batch_labels is not None:
                raise ValueError(
                    "batch_labels were given but this model has no batch embedding or domain-specific batch norm "
                    "(config.use_batch_labels and config.domain_spec_batchnorm are off); drop them."
                )
            return
        if batch_labels is None:
            raise ValueError(
                "This model needs batch_labels (one batch id per cell): pass "
                "batch_labels=model.encode_batch_labels(each cell's batch name or id)."
            )
        if batch_labels.shape != (batch_size,):
            raise ValueError(f"batch_labels must have shape ({batch_size},), got {tuple(batch_labels.shape)}.")
        # Value checks branch on data, which graph export cannot trace (OnnxScGPT checks ids itself), and reading
        # ids off an accelerator makes the host wait for it every forward: there `embed`, `annotate` and the
        # served encoder check the ids on the host before the transfer.
        if batch_labels.device.type == "cpu" and not torch.compiler.is_exporting():
            _check_batch_ids(batch_labels, self.config.num_batch_labels, self.config.batch2id)

    def _check_generative_mask(self, generative_mask: torch.Tensor | None, input_ids: torch.Tensor) -> None:
        if generative_mask is None:
            return
        if not self.config.use_generative_flag:
            raise ValueError(
                "generative_mask was given but this model has no generative flag embedding "
                "(config.use_generative_flag is off); released checkpoints converted with scgpt-hf carry it."
            )
        if generative_mask.shape != input_ids.shape or generative_mask.dtype != torch.bool:
            raise ValueError(
                f"generative_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                f"{generative_mask.dtype} {tuple(generative_mask.shape)}."
            )
        if self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                "Generative attention needs a full (query x key) mask, which "
                f"attn_implementation={self.config._attn_implementation!r} does not take; use 'sdpa' or 'eager'."
            )

    def _check_perturbation_flags(self, flags: torch.Tensor | None, input_ids: torch.Tensor) -> None:
        if not self.config.use_perturbation_flags:
            if flags is not None:
                raise ValueError(
                    "perturbation_flags were given but this model has no perturbation-flag embedding "
                    "(config.use_perturbation_flags is off); use ScGPTForPerturbationPrediction."
                )
            return
        if flags is None:
            raise ValueError(
                "This model needs perturbation_flags: (batch, seq_len) with 1 at perturbed genes, 0 elsewhere "
                f"and {self.config.pert_pad_id} (config.pert_pad_id) at padding."
            )
        if flags.shape != input_ids.shape:
            raise ValueError(
                f"perturbation_flags must match input_ids {tuple(input_ids.shape)}, got {tuple(flags.shape)}."
            )
        if flags.dtype.is_floating_point or flags.dtype == torch.bool:
            raise ValueError(f"perturbation_flags must be integer ids (0, 1, 2), got dtype {flags.dtype}.")
        if not torch.compiler.is_exporting() and flags.numel() and (flags.min() < 0 or flags.max() > 2):
            raise ValueError(
                f"perturbation_flags must be 0 (not perturbed), 1 (perturbed) or 2; got values from "
                f"{int(flags.min())} to {int(flags.max())}."
            )

    def _cell_embedding(
        self, hidden: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Pool token states into one vector per cell; padding never contributes.

        "avg-pool" and "w-pool" in the original also pool padded positions, so a cell's embedding there
        depends on its batch-mates; without padding both definitions agree.
        """
        style = self.config.cell_emb_style
        if style == "cls":
            return hidden[:, 0, :]
        keep = (
            torch.ones_like(values, dtype=hidden.dtype)
            if attention_mask is None
            else attention_mask.to(hidden.dtype)
        )
        if style == "avg-pool":
            return (hidden * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        weighted = (hidden * (values.to(hidden.dtype) * keep).unsqueeze(-1)).sum(1)
        return F.normalize(weighted, p=2, dim=1)

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_labels: torch.LongTensor | None = None,
        perturbation_flags: torch.LongTensor | None = None,
        generative_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> ScGPTModelOutput:
        """Encode cells (`output_hidden_states`, `output_attentions` and `return_dict` as in transformers).

        Args:
            input_ids: (batch, seq_len) gene token ids.
            values: (batch, seq_len) binned expression values.
            attention_mask: (batch, seq_len), 1 at real tokens and 0 at padding; what padded positions of the
                other inputs hold never reaches the computation. A cell without any real token is an error.
            batch_labels: (batch,) batch ids, for models with batch embeddings or batch norm.
            perturbation_flags: (batch, seq_len) 1 at perturbed genes, 0 elsewhere, `config.pert_pad_id`
                at padding; only for models with `config.use_perturbation_flags`.
            generative_mask: (batch, seq_len) True at genes whose expression is to be generated
                (generative pretraining, `config.use_generative_flag`): they attend to every known gene and
                to themselves only, known genes attend to known genes only, and pooling uses known genes.
        """
        input_ids, values = _without_padding(self.config, input_ids, values, attention_mask)
        if kwargs.get("cu_seq_lens_q") is not None:
            return self._packed_forward(input_ids, values, attention_mask, batch_labels, perturbation_flags,
                                        generative_mask, **kwargs)
        self._check_batch_labels(batch_labels, input_ids.shape[0])
        self._check_perturbation_flags(perturbation_flags, input_ids)
        self._check_generative_mask(generative_mask, input_ids)

        embeddings, gene_embeddings = self.embeddings(
            input_ids, values, batch_labels, perturbation_flags, generative_mask
        )
        pooled = attention_mask
        if generative_mask is None:
            # Skipping an all-ones mask means reading it: on an accelerator that would make the host wait for
            # the device, so there a mask is always applied (callers pass None for batches without padding).
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask,
                allow_is_bidirectional_skip=attention_mask is None or attention_mask.device.type == "cpu",
            )
        else:
            mask, pooled = _generative_attention_mask(attention_mask, generative_mask)
        hidden = self.encoder(embeddings, mask, **kwargs)
        if attention_mask is not None:  # a cell without tokens is NaN where it was not refused above
            hidden = torch.where(attention_mask.bool().any(1)[:, None, None], hidden, float("nan"))
        return ScGPTModelOutput(
            last_hidden_state=hidden,
            cell_embedding=self._cell_embedding(hidden, values, pooled),
            gene_embeddings=gene_embeddings,
            batch_embedding=self.batch_encoder(batch_labels) if self.config.use_batch_labels else None,
        )

    def _packed_forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        batch_labels: torch.Tensor | None,
        perturbation_flags: torch.Tensor | None,
        generative_mask: torch.Tensor | None,
        *,
        cu_seq_lens_q: torch.Tensor,
        max_length_q: int | None = None,
        **kwargs,
    ) -> ScGPTModelOutput:
        """Padding-free inference: `input_ids` / `values` (1, total_tokens) hold the cells one after another, cell
        k at tokens `cu_seq_lens_q[k]:cu_seq_lens_q[k + 1]` (each starting with `<cls>`), `max_length_q` the
        longest cell. Embeddings, feed-forward blocks and norms see real tokens only, attention stays within
        each cell; the cell embeddings (and batch embeddings) are one row per cell, the token states stay packed.
        Same numbers as the padded forward of the same cells (tests/test_packed_attention.py)."""
        if kwargs.get("output_attentions", self.config.output_attentions):
            raise ValueError(
                "Packed cells (cu_seq_lens_q) give no attention probabilities (their attention runs per cell "
                "without them): pass padded cells with attn_implementation='eager' for output_attentions."
            )
        cells = _check_packed_cells(self, input_ids, attention_mask, perturbation_flags, generative_mask,
                                    cu_seq_lens_q, max_length_q)
        self._check_batch_labels(batch_labels, cu_seq_lens_q.shape[0] - 1)
        token_labels = None if batch_labels is None else batch_labels[cells].unsqueeze(0)
        embeddings, gene_embeddings = self.embeddings(input_ids, values, token_labels)
        hidden = self.encoder(embeddings, None, cu_seq_lens_q=cu_seq_lens_q, max_length_q=max_length_q, **kwargs)
        return ScGPTModelOutput(
            last_hidden_state=hidden,
            cell_embedding=self._packed_cell_embedding(hidden[0], values[0], cu_seq_lens_q, cells),
            gene_embeddings=gene_embeddings,
            batch_embedding=self.batch_encoder(batch_labels) if self.config.use_batch_labels else None,
        )

    def _packed_cell_embedding(
        self, hidden: torch.Tensor, values: torch.Tensor, cu_seq_lens: torch.Tensor, cells: torch.Tensor
    ) -> torch.Tensor:
        """`_cell_embedding` for packed cells: (total_tokens, hidden) states -> (cells, hidden)."""
        style = self.config.cell_emb_style
        if style == "cls":
            return hidden[cu_seq_lens[:-1]]
        weights = torch.ones_like(values, dtype=hidden.dtype) if style == "avg-pool" else values.to(hidden.dtype)
        pooled = hidden.new_zeros(cu_seq_lens.shape[0] - 1, hidden.shape[1]).index_add_(
            0, cells, hidden * weights.unsqueeze(-1)
        )
        if style == "avg-pool":
            return pooled / cu_seq_lens.diff().unsqueeze(-1).to(hidden.dtype)
        return F.normalize(pooled, p=2, dim=1)


def _check_packed_cells(
    model: ScGPTModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    perturbation_flags: torch.Tensor | None,
    generative_mask: torch.Tensor | None,
    cu_seq_lens: torch.Tensor,
    max_length: int | None,
) -> torch.Tensor:
    """Refuses what packed cells cannot mean; returns each token's cell index (1-D, no host-device wait).

    The offsets' values are read on the CPU only, as `_without_padding` reads masks."""
    if model.training:
        raise ValueError("Packed cells (cu_seq_lens_q) are for inference; call model.eval() first.")
    if attention_mask is not None or perturbation_flags is not None or generative_mask is not None:
        raise ValueError(
            "Packed cells (cu_seq_lens_q) have no padding and take no attention_mask, perturbation_flags or "
            "generative_mask: pass padded cells for those."
        )
    total = input_ids.shape[1]
    if input_ids.shape[0] != 1 or cu_seq_lens.dim() != 1 or cu_seq_lens.shape[0] < 2 or max_length is None:
        raise ValueError(
            "Packed cells are one row: input_ids and values (1, total_tokens), cu_seq_lens_q (cells + 1,) the "
            f"offsets of the cells in it and max_length_q the longest cell; got input_ids {tuple(input_ids.shape)}, "
            f"cu_seq_lens_q {tuple(cu_seq_lens.shape)}, max_length_q {max_length}."
        )
    lengths = cu_seq_lens.diff()
    if cu_seq_lens.device.type == "cpu" and not torch.compiler.is_exporting():
        if cu_seq_lens[0] != 0 or cu_seq_lens[-1] != total or lengths.min() < 1 or lengths.max() != max_length:
            raise ValueError(
                f"cu_seq_lens_q must rise from 0 to the {total} tokens, each cell at least one token long, and "
                f"max_length_q be the longest cell; got {cu_seq_lens.tolist()[:10]}..., max_length_q {max_length}."
            )
    return torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=total
    )


# ----------------------------------------------------------------------------------------------
# Decoders shared by the heads


class ScGPTExpressionDecoder(nn.Module):
    """Per-token expression (and optional zero probability) from the hidden state, as the original `ExprDecoder`."""

    def __init__(self, config: ScGPTConfig, d_in: int):
        super().__init__()
        d = config.hidden_size
        self.fc = _leaky_mlp(d_in, d)
        if config.explicit_zero_prob:
            self.zero_logit = _leaky_mlp(d_in, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pred = self.fc(x).squeeze(-1)
        zero_probs = torch.sigmoid(self.zero_logit(x).squeeze(-1)) if hasattr(self, "zero_logit") else None
        return pred, zero_probs


def _leaky_mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))


class ScGPTMVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding (MVC/GEPC): each gene's query meets the cell vector.

    `d_in` is the width of the cell vector (2 * hidden with batch labels) and `gene_dim` that of the gene
    vectors (hidden, or 2 * hidden in the multi-omic model, which concatenates them too).
    """

    def __init__(self, config: ScGPTConfig, d_in: int, gene_dim: int | None = None):
        super().__init__()
        d = gene_dim or config.hidden_size
        self.style = config.mvc_decoder_style
        self.explicit_zero_prob = config.explicit_zero_prob
        if self.style == "inner product":
            self.gene2query = nn.Linear(d, d)
            self.W = nn.Linear(d, d_in, bias=False)
            if config.explicit_zero_prob:
                self.W_zero_logit = nn.Linear(d, d_in)
        else:
            query_dim = 64 if self.style == "concat query" else d
            self.gene2query = nn.Linear(d, query_dim)
            self.fc1 = nn.Linear(d_in + 64 if self.style == "concat query" else d, 64)
            self.hidden_activation = nn.PReLU()
            self.fc2 = nn.Linear(64, 1)

    def forward(
        self, cell_embedding: torch.Tensor, gene_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = torch.sigmoid(self.gene2query(gene_embeddings))  # (batch, seq, q)
        if self.style == "inner product":
            cell = cell_embedding.unsqueeze(2)
            pred = torch.bmm(self.W(query), cell).squeeze(2)
            if not self.explicit_zero_prob:
                return pred, None
            return pred, torch.sigmoid(torch.bmm(self.W_zero_logit(query), cell).squeeze(2))
        if self.explicit_zero_prob:
            raise NotImplementedError(
                f"explicit_zero_prob with mvc_decoder_style={self.style!r} is not supported (the original raises "
                "too); use mvc_decoder_style='inner product'."
            )
        if self.style == "concat query":
            cell = cell_embedding.unsqueeze(1).expand(-1, gene_embeddings.shape[1], -1)
            h = self.hidden_activation(self.fc1(torch.cat([cell, query], dim=2)))
        else:
            h = self.hidden_activation(self.fc1(cell_embedding.unsqueeze(1) + query))
        return self.fc2(h).squeeze(2), None


class ExpressionPrediction(NamedTuple):
    """What the expression decoders predict; the fields of the same names in `ScGPTForPreTrainingOutput`."""

    expression: torch.Tensor
    zero_probs: torch.Tensor | None
    mvc_expression: torch.Tensor | None
    mvc_zero_probs: torch.Tensor | None


def _decode_expression(
    head: ScGPTPreTrainedModel,
    out: ScGPTModelOutput,
    token_context: torch.Tensor | None = None,
    cell_context: torch.Tensor | None = None,
    gene_context: torch.Tensor | None = None,
) -> ExpressionPrediction:
    """The expression decoder's and, with `config.do_mvc`, the MVC decoder's predictions from the backbone's
    output; each decoder reads its input concatenated with its context (batch and/or modality embeddings)."""
    expression, zero_probs = head.expression_decoder(_with_context(out.last_hidden_state, token_context))
    mvc_expression = mvc_zero_probs = None
    if head.config.do_mvc:
        mvc_expression, mvc_zero_probs = head.mvc_decoder(
            _with_context(out.cell_embedding, cell_context), _with_context(out.gene_embeddings, gene_context)
        )
    return ExpressionPrediction(expression, zero_probs, mvc_expression, mvc_zero_probs)


def _with_context(x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return x if context is None else torch.cat([x, context], dim=-1)


def _batch_context(out: ScGPTModelOutput) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The batch embedding per token and per cell, the decoders' context in models with batch labels."""
    batch = out.batch_embedding
    if batch is None:
        return None, None
    return batch.unsqueeze(1).expand(-1, out.last_hidden_state.shape[1], -1), batch


# ----------------------------------------------------------------------------------------------
# Losses shared by the heads (the original's definitions)


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked positions only (whatever the other positions hold, NaN included)."""
    masked = masked.bool()
    error = torch.where(masked, pred - target, 0.0)
    return (error * error).sum() / masked.sum().clamp(min=1).to(pred.dtype)


def masked_zero_nll(zero_probs: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood that a masked gene is expressed (target > 0)."""
    masked = masked.to(zero_probs.dtype)
    expressed = (target > 0).to(zero_probs.dtype)
    # zero_probs is the probability of a NON-zero value in the original's Bernoulli (sampled values
    # are bernoulli * pred), so log p(expressed) uses it directly.
    log_probs = torch.distributions.Bernoulli(probs=zero_probs).log_prob(expressed) * masked
    return -log_probs.sum() / masked.sum().clamp(min=1)


def elastic_cell_similarity_loss(cell_embedding: torch.Tensor, threshold: float) -> torch.Tensor:
    """ECS: pushes cosine similarities of distinct cells away from `threshold` (positive pairs only)."""
    normed = F.normalize(cell_embedding, p=2, dim=1)
    cos = normed @ normed.t()
    cos = F.relu(cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0))
    return torch.mean(1 - (cos - threshold) ** 2)


def expression_losses(predicted: ExpressionPrediction, labels: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Masked expression MSE, plus MVC and zero-probability terms where the model predicts them."""
    loss = masked_mse_loss(predicted.expression, labels, masked)
    if predicted.zero_probs is not None:
        loss = loss + masked_zero_nll(predicted.zero_probs, labels, masked)
    if predicted.mvc_expression is not None:
        loss = loss + masked_mse_loss(predicted.mvc_expression, labels, masked)
    if predicted.mvc_zero_probs is not None:
        loss = loss + masked_zero_nll(predicted.mvc_zero_probs, labels, masked)
    return loss


def _scored_positions(
    config: ScGPTConfig, values: torch.Tensor, labels: torch.Tensor, generative_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Where the expression losses score: masked input values (`config.mask_value`) and genes to generate."""
    if labels.shape != values.shape:
        raise ValueError(f"labels must have the shape of values {tuple(values.shape)}, got {tuple(labels.shape)}.")
    scored = values == config.mask_value
    if generative_mask is not None:
        scored = scored | generative_mask
    if not scored.any():
        raise ValueError(
            f"No input value equals config.mask_value={config.mask_value}"
            + (" and no gene is marked for generation" if generative_mask is not None else "")
            + ", so there is nothing to score: mask values with ScGPTDataCollator(tokenizer, mask_ratio=...) "
            "(or, in generative pretraining, mark genes with generative=...) before computing the loss."
        )
    return scored


# ----------------------------------------------------------------------------------------------
# Heads: each holds the backbone (`scgpt`) and its own decoders


def _encode(
    head: ScGPTPreTrainedModel,
    input_ids: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, ScGPTModelOutput]:
    """A head's backbone pass: `values` with padding cleared (the heads' decoders and losses read them) and the
    backbone's output, always a `ScGPTModelOutput` (the head's `return_dict` applies to its own output)."""
    if kwargs.get("cu_seq_lens_q") is not None and not isinstance(head, ScGPTForCellClassification):
        raise ValueError(
            f"{type(head).__name__} decodes every token, which packed cells (cu_seq_lens_q) leave packed; pass "
            "padded cells. Packed input is for ScGPTModel and ScGPTForCellClassification (cell embeddings)."
        )
    input_ids, values = _without_padding(head.config, input_ids, values, attention_mask)
    return values, head.scgpt(input_ids, values, attention_mask=attention_mask, return_dict=True, **kwargs)


def _backbone_outputs(out: ScGPTModelOutput) -> dict[str, Any]:
    """The backbone fields every expression head passes on."""
    return {
        "cell_embedding": out.cell_embedding,
        "last_hidden_state": out.last_hidden_state,
        "hidden_states": out.hidden_states,
        "attentions": out.attentions,
    }


def _add_pretraining_modules(head: ScGPTPreTrainedModel, config: ScGPTConfig) -> None:
    """The backbone and the pretraining decoders (expression; MVC with `config.do_mvc`), whose inputs carry
    the batch embedding where the model has one."""
    if config.use_modality_embeddings:
        raise ValueError(
            f"{type(head).__name__} has no modality embeddings, but config.use_modality_embeddings is set: "
            "use ScGPTForMultiOmicIntegration (converter: task='multiomic')."
        )
    head.scgpt = ScGPTModel(config)
    width = 2 * config.hidden_size if config.use_batch_labels else config.hidden_size
    head.expression_decoder = ScGPTExpressionDecoder(config, d_in=width)
    if config.do_mvc:
        head.mvc_decoder = ScGPTMVCDecoder(config, d_in=width)


def _pretraining_fields(
    head: ScGPTPreTrainedModel,
    input_ids: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_labels: torch.Tensor | None,
    labels: torch.Tensor | None,
    generative_mask: torch.Tensor | None,
    **kwargs,
) -> dict[str, Any]:
    """The pretraining forward, shared with batch integration: encode, decode with the batch embedding as
    context and, with `labels`, the expression loss; returns the fields of `ScGPTForPreTrainingOutput`."""
    values, out = _encode(
        head, input_ids, values, attention_mask, batch_labels=batch_labels, generative_mask=generative_mask, **kwargs
    )
    predicted = _decode_expression(head, out, *_batch_context(out))
    loss = None
    if labels is not None:
        loss = expression_losses(predicted, labels, _scored_positions(head.config, values, labels, generative_mask))
    return {"loss": loss, **predicted._asdict(), **_backbone_outputs(out)}


class ScGPTForPreTraining(ScGPTPreTrainedModel):
    """Backbone plus the expression, MVC and zero-probability decoders of scGPT pretraining.

    Reproduces a released checkpoint's full forward: per-token expression from hidden states, and (with
    `config.do_mvc`) per-gene expression from the cell embedding alone. Given `labels` (the true
    expression values), the loss is the original's: MSE on the masked positions (`values ==
    config.mask_value`), plus the MVC and zero-probability terms where the model has those heads.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__(config)
        _add_pretraining_modules(self, config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_labels: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        generative_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> ScGPTForPreTrainingOutput:
        """`labels`: (batch, seq_len) true expression values; the scored positions are those whose input
        value is `config.mask_value` and, in generative pretraining, the genes of `generative_mask`."""
        return ScGPTForPreTrainingOutput(
            **_pretraining_fields(
                self, input_ids, values, attention_mask, batch_labels, labels, generative_mask, **kwargs
            )
        )

    @torch.no_grad()
    def generate_expression(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        generative_mask: torch.BoolTensor,
        attention_mask: torch.Tensor | None = None,
        batch_labels: torch.LongTensor | None = None,
        rounds: int = 1,
    ) -> torch.Tensor:
        """Predict the expression of the genes in `generative_mask` from the known genes, in `rounds`.

        Each round predicts every still-unknown gene; the most confident share of them (an equal part of
        what is left per round) is fixed and joins the known genes for the next round. Confidence is the
        zero-probability head's certainty (|p - 0.5|) with `explicit_zero_prob`, else the agreement of
        the token and MVC predictions; a gene predicted as not expressed (p < 0.5) is fixed at 0.
        Returns `values` with the generated genes filled in.
        """
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}.")
        if rounds > 1 and not (self.config.explicit_zero_prob or self.config.do_mvc):
            raise ValueError(
                "Generation in several rounds ranks genes by confidence, which needs explicit_zero_prob or the "
                "MVC decoder; this model has neither, so use rounds=1."
            )
        values = values.clone()
        unknown = generative_mask.clone()
        for round_index in range(rounds):
            out = self(
                input_ids, values, attention_mask=attention_mask, batch_labels=batch_labels, generative_mask=unknown
            )
            predicted = out.expression
            if out.zero_probs is not None:
                predicted = torch.where(out.zero_probs >= 0.5, predicted, torch.zeros_like(predicted))
                confidence = (out.zero_probs - 0.5).abs()
            elif out.mvc_expression is not None:
                confidence = -(out.expression - out.mvc_expression).abs()
            else:
                confidence = torch.zeros_like(predicted)
            rounds_left = rounds - round_index
            fix = torch.zeros_like(unknown)
            for row in range(unknown.shape[0]):
                candidates = unknown[row].nonzero().squeeze(1)
                if candidates.numel() == 0:
                    continue
                take = -(-candidates.numel() // rounds_left)  # ceil: the last round takes the rest
                order = confidence[row, candidates].argsort(descending=True)
                fix[row, candidates[order[:take]]] = True
            values[fix] = predicted[fix].to(values.dtype)
            unknown &= ~fix
        return values


# ----------------------------------------------------------------------------------------------
# Classification heads


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


class ScGPTClassifier(nn.Module):
    """MLP on the cell embedding: (Linear, activation, LayerNorm) x (num_layers - 1), then the output layer.

    The original's `ClsDecoder` (ReLU) and adversarial batch discriminator (LeakyReLU, behind gradient
    reversal) share this layout.
    """

    def __init__(
        self, hidden_size: int, num_outputs: int, num_layers: int, activation: type[nn.Module], reverse_gradient: bool
    ):
        super().__init__()
        self.reverse_gradient = reverse_gradient
        self.layers = nn.ModuleList()
        for _ in range(num_layers - 1):
            self.layers.extend([nn.Linear(hidden_size, hidden_size), activation(), nn.LayerNorm(hidden_size)])
        self.out_layer = nn.Linear(hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reverse_gradient:
            x = _GradientReversal.apply(x, 1.0)
        for layer in self.layers:
            x = layer(x)
        return self.out_layer(x)


class ScGPTForCellClassification(ScGPTPreTrainedModel):
    """Cell-type annotation: the original classification decoder on the cell embedding.

    Labels live in `config.id2label` / `config.label2id`; `num_labels` sets the output size.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__(config)
        self.scgpt = ScGPTModel(config)
        self.classifier = ScGPTClassifier(config.hidden_size, config.num_labels, config.nlayers_cls, nn.ReLU, False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_labels: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> ScGPTForCellClassificationOutput:
        """`labels`: (batch,) class ids in [0, num_labels); gives the cross-entropy `loss`."""
        _, out = _encode(self, input_ids, values, attention_mask, batch_labels=batch_labels, **kwargs)
        logits = self.classifier(out.cell_embedding)
        loss = None
        if labels is not None:
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_labels):
                raise ValueError(
                    f"labels must be class ids in [0, {self.config.num_labels}); got {int(labels.min())}.."
                    f"{int(labels.max())}. Map cell types to ids with config.label2id."
                )
            loss = F.cross_entropy(logits, labels)
        return ScGPTForCellClassificationOutput(
            loss=loss,
            logits=logits,
            cell_embedding=out.cell_embedding,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


# ----------------------------------------------------------------------------------------------
# Batch integration


class ScGPTForBatchIntegration(ScGPTPreTrainedModel):
    """Batch integration (scGPT's fine-tuning recipe): masked expression + MVC, elastic cell similarity,
    and an adversarial batch discriminator behind gradient reversal, with batch embeddings and
    domain-specific batch norm from the config. The cell embeddings are the integrated representation.

    loss = expression terms + `ecs_weight` * ECS (when `ecs_threshold` > 0) + `dab_weight` * batch CE.
    The backbone and decoders are those of `ScGPTForPreTraining`, under the same weight names.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__(config)
        _add_pretraining_modules(self, config)
        if config.do_dab:
            self.discriminator = _batch_discriminator(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_labels: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        generative_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> ScGPTForBatchIntegrationOutput:
        """`batch_labels`: (batch,) batch ids (see `encode_batch_labels`), read by the batch embedding / norm
        and, with `labels`, by the discriminator's loss; `labels`: true expression values, scored where the
        input value is `config.mask_value` (and at `generative_mask`, as in `ScGPTForPreTraining`). The ECS and
        discriminator loss terms are computed with `labels` only, so inference (e.g. `embed`) pays for neither."""
        fields = _pretraining_fields(
            self,
            input_ids,
            values,
            attention_mask,
            _backbone_batch_labels(self.config, batch_labels),
            labels,
            generative_mask,
            **kwargs,
        )
        fields.update(_integration_terms(self, fields["cell_embedding"], batch_labels, fields["loss"]))
        return ScGPTForBatchIntegrationOutput(**fields)


def _batch_discriminator(config: ScGPTConfig) -> ScGPTClassifier:
    """The adversarial batch classifier on the cell embedding (behind gradient reversal), `config.do_dab`."""
    return ScGPTClassifier(config.hidden_size, config.num_batch_labels, 3, nn.LeakyReLU, reverse_gradient=True)


def _backbone_batch_labels(config: ScGPTConfig, batch_labels: torch.Tensor | None) -> torch.Tensor | None:
    """The batch labels the backbone reads: a model whose only batch-aware part is the discriminator
    (`do_dab` without batch embedding or per-batch norm) uses them in its loss alone."""
    return None if config.do_dab and not config.needs_batch_labels else batch_labels


def _integration_terms(
    head: ScGPTPreTrainedModel,
    cell_embedding: torch.Tensor,
    batch_labels: torch.Tensor | None,
    loss: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """`batch_logits` from the discriminator; given the expression `loss` (training), `ecs_loss` and the
    loss with the ECS and discriminator terms added. ECS compares every pair of cells, so inference does not
    pay for it."""
    config = head.config
    batch_logits = head.discriminator(cell_embedding) if config.do_dab else None
    ecs_loss = None
    if loss is not None and config.ecs_threshold > 0:
        ecs_loss = elastic_cell_similarity_loss(cell_embedding, config.ecs_threshold)
        loss = loss + config.ecs_weight * ecs_loss
    if loss is not None and config.do_dab:
        if batch_labels is None:
            raise ValueError(
                "The adversarial batch discriminator needs batch_labels to compute the loss: pass "
                "batch_labels=model.encode_batch_labels(each cell's batch)."
            )
        _check_batch_ids(batch_labels, config.num_batch_labels, config.batch2id)
        loss = loss + config.dab_weight * F.cross_entropy(batch_logits, batch_labels)
    return {"loss": loss, "batch_logits": batch_logits, "ecs_loss": ecs_loss}


# ----------------------------------------------------------------------------------------------
# Perturbation prediction


class ScGPTAffineExpressionDecoder(nn.Module):
    """Expression as an affine function of the input value: coefficient * value + bias, with the coefficient
    and the bias each predicted per token by an expression decoder (the original's `AffineExprDecoder`)."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d = config.hidden_size
        self.coeff_decoder = ScGPTExpressionDecoder(config, d_in=d)
        self.bias_decoder = ScGPTExpressionDecoder(config, d_in=d)
        name = config.perturbation_decoder_activation
        self.activation = None
        if name is not None:
            activation = getattr(nn, name, None)
            if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
                raise ValueError(
                    f"perturbation_decoder_activation={name!r} is not a torch.nn activation (e.g. 'ReLU', 'Tanh')."
                )
            self.activation = activation()
        self.adaptive_bias = config.perturbation_decoder_adaptive_bias

    def forward(
        self, hidden: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        coeff, zero_probs = self.coeff_decoder(hidden)
        bias, _ = self.bias_decoder(hidden)
        if self.activation is not None:
            coeff, bias = self.activation(coeff), self.activation(bias)
        values = values.to(coeff.dtype)
        if self.adaptive_bias:
            # Mean of the cell's non-zero input values (padding excluded; the original counts padded
            # positions, which changes nothing when pad_value is 0).
            real = values if attention_mask is None else values * attention_mask.to(values.dtype)
            bias = bias * (real.sum(1, keepdim=True) / (real != 0).sum(1, keepdim=True))
        return coeff * values + bias, zero_probs


class ScGPTForPerturbationPrediction(ScGPTPreTrainedModel):
    """Predicts each gene's expression after perturbing some genes: the original perturbation generator
    (`scgpt.model.generation_model.TransformerGenerator`).

    Input embedding = gene + value + perturbation-flag embedding (`config.use_perturbation_flags`, on in this
    model's own copy of the config whatever the given one says, so a pretrained backbone loads into it with
    the flag embedding and the decoder freshly initialised). There is no `<cls>` token: a cell is all its
    genes (expressed or not) with their control (unperturbed) expression as values. The affine decoder
    predicts coefficient * value + bias per gene.

    With `labels` (the post-perturbation expression, same shape as `values`), the loss is the original
    fine-tuning loss: mean squared error over all real positions. `config.cell_emb_style` still gives
    `cell_embedding` (with "cls", the state of the first gene, as in the original).
    """

    def __init__(self, config: ScGPTConfig):
        if config.use_batch_labels or config.domain_spec_batchnorm or config.use_modality_embeddings:
            raise ValueError(
                "The perturbation generator has no batch labels, batch norm or modality embeddings; turn off "
                "use_batch_labels, domain_spec_batchnorm and use_modality_embeddings in the config."
            )
        if not config.use_perturbation_flags:
            config = copy.deepcopy(config)  # the caller's config stays as it was given
            config.use_perturbation_flags = True
        super().__init__(config)
        self.scgpt = ScGPTModel(config)
        self.expression_decoder = ScGPTAffineExpressionDecoder(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        perturbation_flags: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ScGPTForPerturbationPredictionOutput:
        """Args:
        input_ids: (batch, seq_len) gene ids (all genes of the cell, no `<cls>`).
        values: (batch, seq_len) control expression (the original uses log-normalised values, not bins).
        attention_mask: (batch, seq_len), 1 at real tokens, 0 at padding.
        perturbation_flags: (batch, seq_len) 1 at perturbed genes, 0 elsewhere, `config.pert_pad_id` at padding.
        labels: (batch, seq_len) post-perturbation expression, for the MSE loss.
        """
        values, out = _encode(self, input_ids, values, attention_mask, perturbation_flags=perturbation_flags, **kwargs)
        expression, zero_probs = self.expression_decoder(out.last_hidden_state, values, attention_mask)
        loss = None
        if labels is not None:
            if labels.shape != values.shape:
                raise ValueError(
                    f"labels (post-perturbation expression) must have the shape of values {tuple(values.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            loss = masked_mse_loss(expression, labels.to(expression.dtype), real)
        return ScGPTForPerturbationPredictionOutput(
            loss=loss, expression=expression, zero_probs=zero_probs, **_backbone_outputs(out)
        )


# ----------------------------------------------------------------------------------------------
# Multi-omic integration


class ScGPTForMultiOmicIntegration(ScGPTPreTrainedModel):
    """Integration over several modalities (RNA, ATAC peaks, proteins): the original
    `scgpt.model.multiomic_model.MultiOmicTransformerModel`.

    Features of all modalities share one token vocabulary; `modality_ids` (the original's `mod_types`)
    say which modality each token is, ids into `config.modality_vocab`. The modality embedding does not
    enter the transformer: the decoders read the hidden state concatenated with batch embedding +
    modality embedding (either alone when the other is off), and the MVC decoder reads the gene
    embedding concatenated likewise and the cell embedding concatenated with batch embedding + pooled
    modality embedding. With the batch discriminator and elastic cell similarity of the config, the loss
    is that of `ScGPTForBatchIntegration`; outputs are `ScGPTForBatchIntegrationOutput`.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__(config)
        self.scgpt = ScGPTModel(config)
        d = config.hidden_size
        widened = 2 * d if (config.use_batch_labels or config.use_modality_embeddings) else d
        if config.use_modality_embeddings:
            self.modality_encoder = ScGPTLabelEncoder(config.modality_vocab_size, d, config.modality_pad_id)
        self.expression_decoder = ScGPTExpressionDecoder(config, d_in=widened)
        if config.do_mvc:
            self.mvc_decoder = ScGPTMVCDecoder(config, d_in=widened, gene_dim=widened)
        if config.do_dab:
            self.discriminator = _batch_discriminator(config)
        self.post_init()

    def encode_modalities(self, names, modality_vocab: dict[str, int] | None = None) -> torch.LongTensor:
        """Modality names (one per token, or nested lists per cell) -> `modality_ids`.

        `modality_vocab`, when given (e.g. the data pipeline's), must equal the model's; a different one
        would silently mean different modalities.
        """
        known = self.config.checked_modality_vocab(modality_vocab)

        def lookup(name):
            if isinstance(name, (list, tuple)):
                return [lookup(n) for n in name]
            if name not in known:
                raise ValueError(f"Unknown modality {name!r}; the model knows {sorted(known, key=known.get)}.")
            return known[name]

        return torch.tensor(lookup(list(names)), dtype=torch.long, device=self.device)

    def _check_modality_ids(self, modality_ids: torch.Tensor | None, input_ids: torch.Tensor) -> None:
        config = self.config
        if not config.use_modality_embeddings:
            if modality_ids is not None:
                raise ValueError(
                    "modality_ids were given but this model has no modality embedding "
                    "(config.use_modality_embeddings is off); drop them."
                )
            return
        if modality_ids is None:
            raise ValueError("This multi-omic model needs modality_ids (batch, seq_len): each token's modality id.")
        if modality_ids.shape != input_ids.shape:
            raise ValueError(
                f"modality_ids must match input_ids {tuple(input_ids.shape)}, got {tuple(modality_ids.shape)}."
            )
        if torch.compiler.is_exporting() or not modality_ids.numel():
            return
        if modality_ids.min() < 0 or modality_ids.max() >= config.modality_vocab_size:
            raise ValueError(
                f"modality_ids range from {int(modality_ids.min())} to {int(modality_ids.max())} but the model's "
                f"modality vocabulary has {config.modality_vocab_size} entries"
                + (f" ({config.modality_vocab})" if config.modality_vocab else "")
                + ": the data's modality vocabulary does not match the model's; encode modalities with "
                "model.encode_modalities(...)."
            )

    def _decoder_context(
        self,
        out: ScGPTModelOutput,
        modality_ids: torch.Tensor | None,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Batch embedding + modality embedding (either alone when the other is off) per token, and per cell
        with the modality embeddings pooled as the cell embedding is (read by the MVC decoder only)."""
        per_token, per_cell = _batch_context(out)
        if not self.config.use_modality_embeddings:
            return per_token, per_cell
        modality = self.modality_encoder(modality_ids)
        per_token = modality if per_token is None else per_token + modality
        if self.config.do_mvc:
            if self.config.cell_emb_style == "w-pool":
                raise ValueError(
                    "The multi-omic MVC decoder pools modality embeddings into the cell vector, which the "
                    "original defines for cell_emb_style 'cls' and 'avg-pool' only."
                )
            pooled = self.scgpt._cell_embedding(modality, values, attention_mask)
            per_cell = pooled if per_cell is None else per_cell + pooled
        return per_token, per_cell

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_labels: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ScGPTForBatchIntegrationOutput:
        """`modality_ids`: (batch, seq_len) modality id per token; `labels`: true expression values, scored
        where the input value is `config.mask_value` (as in `ScGPTForPreTraining`)."""
        self._check_modality_ids(modality_ids, input_ids)
        values, out = _encode(
            self, input_ids, values, attention_mask, batch_labels=_backbone_batch_labels(self.config, batch_labels),
            **kwargs,
        )
        per_token, per_cell = self._decoder_context(out, modality_ids, values, attention_mask)
        predicted = _decode_expression(self, out, per_token, per_cell, gene_context=per_token)
        loss = None
        if labels is not None:
            loss = expression_losses(predicted, labels, _scored_positions(self.config, values, labels))
        return ScGPTForBatchIntegrationOutput(
            **predicted._asdict(),
            **_backbone_outputs(out),
            **_integration_terms(self, out.cell_embedding, batch_labels, loss),
        )
