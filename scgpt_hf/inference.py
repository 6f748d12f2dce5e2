"""Running an scGPT model over many cells: precision, length-grouped batches under a token budget, and a
device loop in which the host never waits for the accelerator until the results are read.

One implementation for :func:`scgpt_hf.embed` / :func:`scgpt_hf.annotate` and the Triton PyTorch encoder
(``scgpt-hf serve MODEL``), which loads this very file and ``padding.py`` beside its ``model.py``: they need numpy
and torch only.

Why the loop is shaped this way (GPU): every ``.item()``, ``bool(tensor)`` or ``.cpu()`` in the middle of the
work makes the host wait until the device has finished everything queued so far, so the device then idles
while the host prepares the next batch.  Here the value checks run on the host side (tokenizer, collator,
the server's request checks) before anything moves, batches are copied from pinned memory without waiting,
a batch without padding is sent without a mask (the model never has to look inside one to skip it), and
each batch's result stays on the device until :func:`run_cells` copies all of them back once.

:func:`load_model` and :func:`pick_device` resolve what the library's entry points (embed, annotate, gene
networks, perturbation, pretraining) are given; they import the models and tokenizer on first use, so the
served encoder, which never calls them, still needs numpy and torch only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

try:  # relative as part of scgpt_hf, flat in the served encoder (padding.py copied beside this file)
    from .padding import pad_cells
except ImportError:
    from padding import pad_cells

if TYPE_CHECKING:
    from .modeling_scgpt import ScGPTPreTrainedModel
    from .tokenization_scgpt import ScGPTTokenizer

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "eval_mode",
    "DEFAULT_PACKED",
    "PRECISIONS",
    "autocast_dtype",
    "length_groups",
    "load_model",
    "pick_device",
    "precision_name",
    "run_cells",
    "run_expressed_cells",
]

#: Precision choices: "auto" is bf16 autocast on CUDA GPUs that support bf16, fp16 autocast on older ones,
#: fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # also constants.INFERENCE_PRECISIONS, for the CLI
#: Default token budget per forward pass (padded length x cells).  CPU: small batches stay in cache and avoid
#: page-faulting large fresh buffers (measured ~2x faster than 64 x 1200 tokens).  CUDA: bounds activation
#: memory (~65k tokens of whole-human size take a few GB in bf16) while leaving 64 cells of 1,024 tokens in
#: one forward, enough to fill a large GPU.
DEFAULT_MAX_TOKENS = {"cpu": 4096, "cuda": 65536}
#: Whether :func:`run_cells` packs cells without padding by default (padding-free attention), per device type.
#: CPU: packed was never slower in bench/packed_attention.py (real wu2020 lengths, whole-human width): x1.06-1.25
#: cells per CPU-second for served batches of 8-64 cells under the 4,096-token budget, x1.43-1.58 without one,
#: x1.01 for embed's length-grouped chunks (2 % padding).  CUDA: padded until a GPU has measured packed
#: (bench/gpu/suite.py reports both).
DEFAULT_PACKED = {"cpu": True, "cuda": False}


def load_model(
    model: ScGPTPreTrainedModel | str | os.PathLike,
    tokenizer: ScGPTTokenizer | str | os.PathLike | None = None,
    model_class: type[ScGPTPreTrainedModel] | None = None,
) -> tuple[ScGPTPreTrainedModel, ScGPTTokenizer, str]:
    """(model of `model_class`, its tokenizer, the model's name or path) from instances, local folders or Hub ids.

    `model_class` defaults to `ScGPTModel`, for which a head model's backbone (under `base_model_prefix`) is
    taken. The tokenizer defaults to the one saved with the model, and must match the model's vocabulary.
    """
    from .modeling_scgpt import ScGPTModel, ScGPTPreTrainedModel
    from .tokenization_scgpt import ScGPTTokenizer

    model_class = ScGPTModel if model_class is None else model_class
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        model = model_class.from_pretrained(name)
    elif isinstance(model, ScGPTPreTrainedModel):
        name = str(getattr(model, "name_or_path", "") or model.config._name_or_path or "")
    else:
        raise TypeError(
            f"model must be an scGPT model instance or a path / Hub id, got {type(model).__name__}."
        )
    if model_class is ScGPTModel and not isinstance(model, ScGPTModel):
        model = getattr(model, model.base_model_prefix, None) or model
    if not isinstance(model, model_class):
        raise TypeError(f"Expected a {model_class.__name__} (or a folder / Hub id of one), got {type(model).__name__}.")
    if tokenizer is None:
        if not name:
            raise ValueError(
                "No tokenizer given and the model was not loaded from a folder or Hub id; pass "
                "tokenizer=ScGPTTokenizer.from_pretrained(...) (the vocabulary the model was trained with)."
            )
        tokenizer = ScGPTTokenizer.from_pretrained(name)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = ScGPTTokenizer.from_pretrained(os.fspath(tokenizer))
    if not isinstance(tokenizer, ScGPTTokenizer):
        raise TypeError(f"tokenizer must be an ScGPTTokenizer, got {type(tokenizer).__name__}.")
    config = model.config
    if len(tokenizer) > config.vocab_size or tokenizer.pad_token_id != config.pad_token_id:
        raise ValueError(
            f"Tokenizer and model disagree (tokenizer: {len(tokenizer)} tokens, pad id "
            f"{tokenizer.pad_token_id}; model: vocab_size {config.vocab_size}, pad id {config.pad_token_id}): "
            "use the tokenizer saved with the model."
        )
    return model, tokenizer, name


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch device; None picks CUDA when available, else the CPU. CUDA asked for without it is
    an error, before any model moves."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available here.")
    return device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (no dropout) for the block, its training flag restored afterwards, even on error:
    inference on a model the caller may be training must not leave it in the other mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32.

    Raises ValueError for an unknown precision, and for bf16 on a GPU without bf16 support (use fp16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if precision == "bf16" and not bf16:
            raise ValueError(f"{torch.cuda.get_device_name(device)} has no native bf16; use precision='fp16'.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """How results were computed, for reports: "fp32", "bf16-autocast" or "fp16-autocast"."""
    return "fp32" if dtype is None else {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}[dtype]


def length_groups(lengths: np.ndarray, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """Positions into `lengths` grouped into batches of similar length, longest batch first.

    A batch holds at most `batch_size` cells and, when `max_tokens` is set, at most that many tokens
    (its longest cell's length times its cells; always at least one cell).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    groups = []
    b = 0
    while b < len(order):
        width = int(lengths[order[b]])  # the longest cell of the batch comes first
        n = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(width, 1)))
        groups.append(order[b : b + n])
        b += n
    return groups


def _padded(ids: Sequence[np.ndarray], values: Sequence[np.ndarray], members: np.ndarray, pad_id: int,
            pad_value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(input_ids, values, attention_mask or None when no cell is padded) of the cells `members`."""
    pid, pval, pmask = pad_cells([(ids[m], values[m]) for m in members], pad_id, pad_value)
    return pid, pval, (None if pmask.all() else pmask)


def _packed(ids: Sequence[np.ndarray], values: Sequence[np.ndarray], members: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(input_ids (1, total), values (1, total), cell offsets, longest cell) of the cells `members`, one after
    another with no padding: the model's packed input (`cu_seq_lens_q`, `max_length_q`)."""
    lengths = np.array([len(ids[m]) for m in members], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    pid = np.concatenate([ids[m] for m in members]).astype(np.int64, copy=False)[None]
    pval = np.concatenate([values[m] for m in members]).astype(np.float32, copy=False)[None]
    return pid, pval, offsets, int(lengths.max())


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned memory: the copy is queued and the host moves on
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def run_cells(
    model: torch.nn.Module,
    ids: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    *,
    predict: Callable[[Any], torch.Tensor],
    batch_size: int,
    max_tokens: int | None,
    pad_id: int,
    pad_value: float,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_ids: np.ndarray | None = None,
    packed: bool | None = None,
) -> np.ndarray:
    """``predict(model(...))`` for each cell, as float32 rows in the order of `ids`.

    `ids` / `values`: each cell's token ids and values (``<cls>`` first, no padding), already checked on the
    host; `batch_ids`: each cell's batch id for batch-label models.  Cells run in length-grouped batches
    (:func:`length_groups`) under ``torch.inference_mode`` and, with `dtype`, autocast; the host waits for
    the device once, when it copies all results back.  `model` must already be on `device`, in eval mode.
    `packed`: each batch's cells go to the model one after another without padding (``cu_seq_lens_q``; an
    `ScGPTModel` or `ScGPTForCellClassification`), else right-padded; None takes :data:`DEFAULT_PACKED`.
    """
    if not len(ids):
        raise ValueError("No cells to run.")
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    groups = length_groups(lengths, batch_size, max_tokens)
    packed = DEFAULT_PACKED.get(device.type, False) if packed is None else packed
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    results: list[torch.Tensor] = []
    with torch.inference_mode(), autocast:
        for members in groups:
            if packed and lengths[members].min() < lengths[members].max():  # without padding both are the same
                pid, pval, offsets, longest = _packed(ids, values, members)
                layout = {"cu_seq_lens_q": _to_device(offsets, device), "max_length_q": longest}
            else:
                pid, pval, pmask = _padded(ids, values, members, pad_id, pad_value)
                layout = {"attention_mask": None if pmask is None else _to_device(pmask, device)}
            labels = None if batch_ids is None else _to_device(np.ascontiguousarray(batch_ids[members]), device)
            output = model(input_ids=_to_device(pid, device), values=_to_device(pval, device), batch_labels=labels,
                           **layout)
            results.append(predict(output).float())
        stacked = torch.cat(results).cpu().numpy()  # the one wait for the device
    out = np.empty_like(stacked)
    out[np.concatenate(groups)] = stacked
    return out


def run_expressed_cells(
    model: torch.nn.Module,
    ids: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    n_genes: np.ndarray,
    *,
    width: int,
    batch_ids: np.ndarray | None = None,
    **run: Any,
) -> np.ndarray:
    """`run_cells` over the cells with at least one vocabulary gene (``n_genes > 0``); the others, which hold
    nothing but ``<cls>`` and so carry no information, get NaN rows of `width` instead of an answer."""
    out = np.full((len(n_genes), width), np.nan, dtype=np.float32)
    rows = np.flatnonzero(np.asarray(n_genes) > 0)
    if rows.size:
        out[rows] = run_cells(model, [ids[r] for r in rows], [values[r] for r in rows],
                              batch_ids=None if batch_ids is None else batch_ids[rows], **run)
    return out
