"""Harness around the ORIGINAL scGPT (PyPI ``scgpt==0.2.4``) for parity tests.

The original package cannot be imported as-is on torch 2.13:

* ``torchtext`` (last release 0.18, built for torch 2.3) is missing or fails to
  load its C++ extension; scGPT only uses ``torchtext.vocab.Vocab`` and
  ``torchtext.vocab.vocab``.
* ``IPython`` (``scgpt.utils``) and ``datasets`` (``scgpt.scbank``) are heavy
  packages that scGPT imports at module level but never needs for modelling.
* ``flash_attn`` 1.x is the only way the original builds pre-norm layers and the
  only way its state dict carries the released ``self_attn.Wqkv.*`` names, but
  flash-attn needs CUDA and fp16/bf16.

This module registers small pure-Python stand-ins for those modules in
``sys.modules`` (real packages win for ``torchtext``, ``IPython`` and
``datasets`` when they import cleanly; ``flash_attn.flash_attention`` is always
the stand-in so that parity runs in fp32 on any device), then offers helpers to
build randomised original models, save them as released-style checkpoint folders
and run their forward pass.

Nothing here imports ``scgpt_hf``: this is the independent side of every parity
test.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import math
import re
import sys
import types
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FlashMHA",
    "StandInVocab",
    "import_original",
    "build_original_model",
    "randomize_parameters",
    "convert_attention_keys",
    "save_original_checkpoint",
    "make_vocab",
    "original_forward",
    "wu2020_path",
    "pbmc68k_path",
    "SPECIAL_TOKENS",
    "LAYOUTS",
]

#: Special tokens appended after the genes in released vocabularies, in order.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")

#: Attention key layouts understood by :func:`convert_attention_keys`.
LAYOUTS: tuple[str, ...] = ("released", "compat", "pytorch")


# ---------------------------------------------------------------------------
# torchtext stand-in
# ---------------------------------------------------------------------------


class _VocabTable:
    """Ordered token <-> index table; plays the C++ object behind torchtext's Vocab."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        self.default_index: int | None = None
        for token in tokens:
            self.append_token(token)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def lookup(self, token: str) -> int:
        index = self.stoi.get(token)
        if index is not None:
            return index
        if self.default_index is None:
            raise RuntimeError(
                f"Token {token} not found and default index is not set"
            )
        return self.default_index

    def insert_token(self, token: str, index: int) -> None:
        if token in self.stoi:
            raise RuntimeError(f"Token {token} already exists in the Vocab")
        if not 0 <= index <= len(self.itos):
            raise RuntimeError(
                f"Specified index {index} is out of bounds for vocab of size "
                f"{len(self.itos)}"
            )
        self.itos.insert(index, token)
        for i in range(index, len(self.itos)):
            self.stoi[self.itos[i]] = i

    def append_token(self, token: str) -> None:
        self.insert_token(token, len(self.itos))


class StandInVocab(nn.Module):
    """Pure-Python replacement for ``torchtext.vocab.Vocab`` (torchtext 0.18 API).

    Only what scGPT touches is provided: lookups (``vocab[token]``, ``token in
    vocab``, ``len(vocab)``, ``vocab(tokens)``), ``insert_token`` /
    ``append_token`` (indices stay consecutive, later tokens shift up),
    default-index handling and the ``.vocab`` attribute holding the underlying
    table that ``GeneVocab.__init__`` passes back into ``Vocab.__init__``.
    Like torchtext it is an ``nn.Module`` and an unknown token raises
    ``RuntimeError`` unless a default index is set.
    """

    def __init__(self, vocab: _VocabTable) -> None:
        super().__init__()
        if not isinstance(vocab, _VocabTable):
            raise TypeError("Vocab wraps the table built by torchtext.vocab.vocab()")
        self.vocab = vocab

    def forward(self, tokens: list[str]) -> list[int]:
        """Look up a list of tokens (``vocab(tokens)``)."""
        return self.lookup_indices(tokens)

    def __len__(self) -> int:
        return len(self.vocab)

    def __contains__(self, token: object) -> bool:
        return token in self.vocab

    def __getitem__(self, token: str) -> int:
        return self.vocab.lookup(token)

    def __prepare_scriptable__(self) -> "StandInVocab":
        return self

    def set_default_index(self, index: int | None) -> None:
        """Index returned for unknown tokens (``None`` makes them raise)."""
        self.vocab.default_index = index

    def get_default_index(self) -> int | None:
        """The index returned for unknown tokens, or ``None``."""
        return self.vocab.default_index

    def insert_token(self, token: str, index: int) -> None:
        """Insert ``token`` at ``index``, shifting later tokens by one."""
        self.vocab.insert_token(token, index)

    def append_token(self, token: str) -> None:
        """Add ``token`` at the end."""
        self.vocab.append_token(token)

    def lookup_token(self, index: int) -> str:
        """Token at ``index``."""
        if not 0 <= index < len(self.vocab):
            raise RuntimeError(f"Specified index {index} is out of bounds")
        return self.vocab.itos[index]

    def lookup_tokens(self, indices: list[int]) -> list[str]:
        """Tokens at ``indices``."""
        return [self.lookup_token(i) for i in indices]

    def lookup_indices(self, tokens: list[str]) -> list[int]:
        """Indices of ``tokens``."""
        return [self.vocab.lookup(t) for t in tokens]

    def get_stoi(self) -> dict[str, int]:
        """A copy of the token -> index mapping."""
        return dict(self.vocab.stoi)

    def get_itos(self) -> list[str]:
        """A copy of the index -> token list."""
        return list(self.vocab.itos)


def _torchtext_vocab_factory(
    ordered_dict: Mapping[str, int],
    min_freq: int = 1,
    specials: list[str] | None = None,
    special_first: bool = True,
) -> StandInVocab:
    """``torchtext.vocab.vocab``: keep tokens with count >= min_freq, in order."""
    specials = list(specials or [])
    tokens = [
        t for t, freq in ordered_dict.items() if freq >= min_freq and t not in specials
    ]
    tokens = specials + tokens if special_first else tokens + specials
    return StandInVocab(_VocabTable(tokens))


def _make_torchtext() -> dict[str, types.ModuleType]:
    root = types.ModuleType("torchtext")
    root.__doc__ = "scgpt-hf test stand-in for torchtext (vocab only)."
    root.__version__ = "0.18.0+standin"  # type: ignore[attr-defined]
    vocab_mod = types.ModuleType("torchtext.vocab")
    vocab_mod.Vocab = StandInVocab  # type: ignore[attr-defined]
    vocab_mod.vocab = _torchtext_vocab_factory  # type: ignore[attr-defined]
    root.vocab = vocab_mod  # type: ignore[attr-defined]
    return {"torchtext": root, "torchtext.vocab": vocab_mod}


# ---------------------------------------------------------------------------
# flash-attn 1.x stand-in
# ---------------------------------------------------------------------------


class _InnerAttention(nn.Module):
    """Placeholder for flash-attn's parameter-free ``FlashAttention`` core."""

    def __init__(self, attention_dropout: float = 0.0, softmax_scale: float | None = None):
        super().__init__()
        self.dropout_p = attention_dropout
        self.softmax_scale = softmax_scale


class FlashMHA(nn.Module):
    """Plain-PyTorch stand-in for ``flash_attn.flash_attention.FlashMHA`` (1.x).

    Same submodules and parameter names as the real class: ``Wqkv`` (one
    Linear producing packed ``[q; k; v]``, exactly the layout of
    ``nn.MultiheadAttention.in_proj_weight``), ``inner_attn`` (no parameters)
    and ``out_proj``. ``key_padding_mask`` follows flash-attn's convention:
    True = KEEP (the original's ``FlashTransformerEncoderLayer`` passes
    ``~src_key_padding_mask``). As in flash-attn, which unpads, attends and
    re-pads, the attention context at padded query positions is zero, so this
    module returns ``out_proj.bias`` there. Attention-probability dropout
    is applied only in training mode. Runs in any dtype on any device; unlike
    flash-attn it does not require head_dim % 8 == 0.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        batch_first: bool = True,
        attention_dropout: float = 0.0,
        causal: bool = False,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("FlashMHA only supports batch_first=True")
        if embed_dim % num_heads != 0:
            raise ValueError("embed_dim must be divisible by num_heads")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.causal = causal
        self.Wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.inner_attn = _InnerAttention(attention_dropout)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, None]:
        """Self-attention over ``x`` (batch, seq, embed); returns ``(out, None)``."""
        if need_weights:
            raise NotImplementedError("FlashMHA cannot return attention weights")
        bsz, seq_len, _ = x.shape
        qkv = self.Wqkv(x).view(bsz, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (b, h, s, d)

        allowed: Tensor | None = None
        keep: Tensor | None = None
        if key_padding_mask is not None:
            keep = key_padding_mask.to(device=x.device, dtype=torch.bool)
            allowed = keep[:, None, None, :]  # (b, 1, 1, s_k)
        if self.causal:
            tri = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
            allowed = tri if allowed is None else allowed & tri
        dropout_p = self.inner_attn.dropout_p if self.training else 0.0
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout_p,
            scale=self.inner_attn.softmax_scale,
        )
        context = context.transpose(1, 2).reshape(bsz, seq_len, self.embed_dim)
        if keep is not None:
            context = context * keep[:, :, None].to(context.dtype)
        return self.out_proj(context), None


def _make_flash_attn() -> dict[str, types.ModuleType]:
    modules: dict[str, types.ModuleType] = {}
    root = sys.modules.get("flash_attn")
    if root is None:
        root = types.ModuleType("flash_attn")
        root.__doc__ = "scgpt-hf test stand-in for flash-attn 1.x (FlashMHA only)."
        root.__path__ = []  # type: ignore[attr-defined]  # a package
        root.__version__ = "1.0.9+standin"  # type: ignore[attr-defined]
        # A spec lets importlib.util.find_spec (used by transformers' availability checks) see it
        # without raising; there is no flash_attn distribution, so transformers never picks it.
        root.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
        modules["flash_attn"] = root
    sub = types.ModuleType("flash_attn.flash_attention")
    sub.__spec__ = importlib.machinery.ModuleSpec("flash_attn.flash_attention", None)
    sub.FlashMHA = FlashMHA  # type: ignore[attr-defined]
    modules["flash_attn.flash_attention"] = sub
    return modules


# ---------------------------------------------------------------------------
# IPython / datasets stand-ins
# ---------------------------------------------------------------------------


def _make_ipython() -> dict[str, types.ModuleType]:
    mod = types.ModuleType("IPython")
    mod.__doc__ = "scgpt-hf test stand-in for IPython: never inside a notebook."
    mod.get_ipython = lambda: None  # type: ignore[attr-defined]
    return {"IPython": mod}


class _StandInDataset:
    """Placeholder for ``datasets.Dataset``; scGPT only needs it for scbank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("datasets is a stand-in here: scbank is unsupported")

    @classmethod
    def from_dict(cls, *args: Any, **kwargs: Any) -> "_StandInDataset":
        raise NotImplementedError("datasets is a stand-in here: scbank is unsupported")


def _stand_in_load_dataset(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("datasets is a stand-in here: scbank is unsupported")


def _make_datasets() -> dict[str, types.ModuleType]:
    mod = types.ModuleType("datasets")
    mod.__doc__ = "scgpt-hf test stand-in for Hugging Face datasets (scbank only)."
    mod.Dataset = _StandInDataset  # type: ignore[attr-defined]
    mod.load_dataset = _stand_in_load_dataset  # type: ignore[attr-defined]
    return {"datasets": mod}


def _real_import_works(name: str) -> bool:
    """Try importing a real package; on any failure remove its partial modules."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
        if name == "torchtext":
            importlib.import_module("torchtext.vocab")
        return True
    except Exception:  # noqa: BLE001 - e.g. torchtext's undefined-symbol OSError
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        return False


_STAND_INS_USED: list[str] = []
_ORIGINAL: types.ModuleType | None = None


def import_original() -> types.ModuleType:
    """Import and return the original ``scgpt`` package (idempotent).

    Registers the stand-ins first (once): ``flash_attn.flash_attention`` always,
    ``torchtext``, ``IPython`` and ``datasets`` only when the real package is
    absent or fails to import. The names used are recorded in
    ``scgpt.__standins__``. Raises ``ModuleNotFoundError`` when scgpt itself is
    not installed.
    """
    global _ORIGINAL
    if _ORIGINAL is not None:
        return _ORIGINAL
    if importlib.util.find_spec("scgpt") is None:
        raise ModuleNotFoundError(
            "the original scGPT is not installed: run scripts/setup_env.sh "
            "(pip install --no-deps scgpt==0.2.4)"
        )
    if "scgpt.model.model" in sys.modules:
        model_mod = sys.modules["scgpt.model.model"]
        if getattr(model_mod, "FlashMHA", None) is not FlashMHA:
            raise RuntimeError(
                "scgpt was imported before tests/reference.py registered its "
                "stand-ins; import it through import_original() only"
            )
    makers = {
        "torchtext": _make_torchtext,
        "IPython": _make_ipython,
        "datasets": _make_datasets,
    }
    for name, make in makers.items():
        if name in sys.modules or _real_import_works(name):
            continue
        modules = make()
        for module_name, module in modules.items():
            # A spec lets importlib.util.find_spec (transformers' availability checks) see the stand-in
            # without raising; with no distribution behind it, transformers treats it as absent.
            if getattr(module, "__spec__", None) is None:
                module.__spec__ = importlib.machinery.ModuleSpec(
                    module_name, None, is_package=hasattr(module, "__path__")
                )
        sys.modules.update(modules)
        _STAND_INS_USED.append(name)
    sys.modules.update(_make_flash_attn())
    _STAND_INS_USED.append("flash_attn.flash_attention")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scgpt = importlib.import_module("scgpt")
        importlib.import_module("scgpt.model.model")
        importlib.import_module("scgpt.preprocess")
        importlib.import_module("scgpt.tokenizer")
    if not getattr(scgpt.model.model, "flash_attn_available", False):
        raise RuntimeError("scgpt did not pick up the FlashMHA stand-in")
    if "datasets" in _STAND_INS_USED:
        # Only scbank's import needed it (its names are bound now); left in sys.modules it would look like
        # the real package to transformers' Trainer.
        for key in [k for k in sys.modules if k == "datasets" or k.startswith("datasets.")]:
            del sys.modules[key]
    scgpt.__standins__ = tuple(_STAND_INS_USED)  # type: ignore[attr-defined]
    _ORIGINAL = scgpt
    return scgpt


# ---------------------------------------------------------------------------
# Building and randomising original models
# ---------------------------------------------------------------------------

_NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def _canonical_key(key: str) -> str:
    """Released-layout name of a state-dict key (identity for non-attention keys)."""
    match = _ATTN_KEY.match(key)
    if match is None:
        return key
    return match["prefix"] + _CANONICAL[match["rest"]]


@torch.no_grad()
def randomize_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter and buffer of ``model`` reproducibly from ``seed``.

    Default initialisations leave many tensors at constants (LayerNorm 1/0,
    attention in-projection biases 0, BatchNorm running stats 0/1, PReLU 0.25),
    where a swapped or skipped weight would go unnoticed. Here every tensor gets
    distinct values at a scale that keeps activations O(1):

    * norm weights ~ U(0.5, 1.5), norm biases ~ N(0, 0.1^2);
    * BatchNorm ``running_mean`` ~ N(0, 0.2^2), ``running_var`` ~ U(0.5, 2),
      ``num_batches_tracked`` ~ randint(1, 1000);
    * PReLU weights ~ U(0.05, 0.5);
    * other matrices ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); other vectors ~ U(-0.1, 0.1).

    Each tensor draws from its own generator seeded by ``seed`` and the
    tensor's released-layout key name, so a flash model and a PyTorch model
    (``in_proj_weight`` vs ``Wqkv.weight``) get identical values, and the
    global RNG is untouched.
    """

    def generator(key: str) -> torch.Generator:
        mixed = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(_canonical_key(key).encode()))
        return torch.Generator().manual_seed(mixed % (2**63 - 1))

    def uniform(t: Tensor, key: str, low: float, high: float) -> None:
        draw = torch.rand(t.shape, generator=generator(key), dtype=torch.float64)
        t.copy_(draw * (high - low) + low)

    def normal(t: Tensor, key: str, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=generator(key), dtype=torch.float64) * std)

    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        is_norm = isinstance(module, _NORM_TYPES)
        for pname, param in module.named_parameters(recurse=False):
            key = prefix + pname
            if is_norm and pname == "weight":
                uniform(param, key, 0.5, 1.5)
            elif is_norm and pname == "bias":
                normal(param, key, 0.1)
            elif isinstance(module, nn.PReLU):
                uniform(param, key, 0.05, 0.5)
            elif param.dim() >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())
                uniform(param, key, -bound, bound)
            else:
                uniform(param, key, -0.1, 0.1)
        for bname, buf in module.named_buffers(recurse=False):
            key = prefix + bname
            if buf is None:
                continue
            if bname == "running_mean":
                normal(buf, key, 0.2)
            elif bname == "running_var":
                uniform(buf, key, 0.5, 2.0)
            elif bname == "num_batches_tracked":
                buf.fill_(int(torch.randint(1, 1000, (1,), generator=generator(key))))
            elif buf.is_floating_point():
                normal(buf, key, 0.1)
            else:
                raise ValueError(f"don't know how to randomise buffer {key!r}")
    return model


def build_original_model(*, flash: bool, seed: int, **kwargs: Any) -> nn.Module:
    """Build an original ``scgpt.model.TransformerModel`` with randomised weights, in eval mode.

    ``kwargs`` go to the original constructor (ntoken, d_model, nhead, d_hid,
    nlayers, vocab, ...); ``vocab`` may be a plain dict and defaults to
    ``make_vocab(ntoken - 3)``; ``dropout`` defaults to 0.2. ``flash=True``
    selects ``use_fast_transformer=True, fast_transformer_backend="flash"``
    backed by the :class:`FlashMHA` stand-in: the only original path that
    honours ``pre_norm`` and that names attention weights ``self_attn.Wqkv.*``
    like released checkpoints. ``flash=False`` gives PyTorch layers, which the
    original always builds post-norm (it ignores ``pre_norm`` there), so
    ``pre_norm=True`` with ``flash=False`` raises here. Every parameter and
    buffer is then redrawn by :func:`randomize_parameters`; the same ``seed``
    gives the same tensors in both modes. The global RNG is left as it was.
    """
    scgpt = import_original()
    for key in ("use_fast_transformer", "fast_transformer_backend"):
        if key in kwargs:
            raise TypeError(f"{key} is set by flash=...; do not pass it")
    if not flash and kwargs.get("pre_norm", False):
        raise ValueError(
            "the original builds PyTorch layers post-norm whatever pre_norm says; "
            "use flash=True for pre-norm"
        )
    if kwargs.get("vocab") is None:
        kwargs["vocab"] = make_vocab(int(kwargs["ntoken"]) - len(SPECIAL_TOKENS))
    kwargs.setdefault("dropout", 0.2)
    if flash:
        kwargs.update(use_fast_transformer=True, fast_transformer_backend="flash")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        # The original prints a line when it builds dsbn/bn, and PyTorch warns
        # that nested tensors are off for non-PyTorch layers.
        warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
        torch.manual_seed(seed)
        model = scgpt.model.TransformerModel(**kwargs)
    attn = model.transformer_encoder.layers[0].self_attn
    if isinstance(attn, FlashMHA) != flash:
        raise RuntimeError(f"asked flash={flash}, got a {type(attn).__name__} layer")
    randomize_parameters(model, seed)
    return model.eval()


# ---------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------

_ATTN_KEY = re.compile(
    r"^(?P<prefix>.*\.self_attn\.)(?:_impl\.)?"
    r"(?P<rest>Wqkv\.weight|Wqkv\.bias|in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$"
)
_CANONICAL = {
    "Wqkv.weight": "Wqkv.weight",
    "Wqkv.bias": "Wqkv.bias",
    "in_proj_weight": "Wqkv.weight",
    "in_proj_bias": "Wqkv.bias",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
}
_TO_LAYOUT = {
    "released": {"Wqkv.weight": "Wqkv.weight", "Wqkv.bias": "Wqkv.bias",
                 "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias"},
    "compat": {"Wqkv.weight": "_impl.Wqkv.weight", "Wqkv.bias": "_impl.Wqkv.bias",
               "out_proj.weight": "_impl.out_proj.weight", "out_proj.bias": "_impl.out_proj.bias"},
    "pytorch": {"Wqkv.weight": "in_proj_weight", "Wqkv.bias": "in_proj_bias",
                "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias"},
}


def convert_attention_keys(
    state_dict: Mapping[str, Tensor], layout: str
) -> "OrderedDict[str, Tensor]":
    """Rename attention keys of an original state dict to ``layout``; tensors are untouched.

    Accepts any of the three layouts as input: ``released``
    (``self_attn.Wqkv.*``, ``self_attn.out_proj.*``), ``compat``
    (``self_attn._impl.Wqkv.*``, ``self_attn._impl.out_proj.*``) and
    ``pytorch`` (``self_attn.in_proj_weight``/``in_proj_bias``,
    ``self_attn.out_proj.*``). Packed Wqkv and in_proj are both ``[q; k; v]``
    so this is a pure rename. Key order is preserved.
    """
    if layout not in _TO_LAYOUT:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        match = _ATTN_KEY.match(key)
        if match is not None:
            canonical = _CANONICAL[match["rest"]]
            key = match["prefix"] + _TO_LAYOUT[layout][canonical]
        if key in out:
            raise ValueError(f"two keys map to {key!r}")
        out[key] = value
    return out


_RELEASED_ARGS_DEFAULTS: dict[str, Any] = {
    # Shaped after the whole-human release (REFERENCE §2); structural keys are
    # overwritten from the model being saved.
    "data_source": "synthetic",
    "save_dir": "synthetic",
    "input_style": "binned",
    "output_style": "binned",
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "training_tasks": "both",
    "mask_ratio": [0.25, 0.5, 0.75],
    "mask_value": -1,
    "pad_value": -2,
    "pad_token": "<pad>",
    "MVC": True,
    "USE_GENERATIVE_TRAINING": True,
    "USE_CLS": False,
    "USE_CCE": False,
    "fast_transformer": True,
    "fp16": True,
    "embsize": 512,
    "nheads": 8,
    "d_hid": 512,
    "nlayers": 12,
    "n_layers_cls": 3,
    "dropout": 0.2,
}


def _structural_args(model: nn.Module) -> dict[str, Any]:
    layer = model.transformer_encoder.layers[0]
    attn = layer.self_attn
    args: dict[str, Any] = {
        "embsize": int(model.d_model),
        "nheads": int(attn.num_heads),
        "d_hid": int(layer.linear1.out_features),
        "nlayers": len(model.transformer_encoder.layers),
        # ClsDecoder holds nlayers_cls - 1 hidden Linear layers plus out_layer.
        "n_layers_cls": 1 + sum(isinstance(m, nn.Linear) for m in model.cls_decoder._decoder),
        "input_emb_style": model.input_emb_style,
        "MVC": hasattr(model, "mvc_decoder"),
    }
    if getattr(model, "norm_scheme", "post") == "pre":
        args["pre_norm"] = True
    if model.cell_emb_style != "cls":
        args["cell_emb_style"] = model.cell_emb_style
    if model.explicit_zero_prob:
        args["explicit_zero_prob"] = True
    return args


def save_original_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    args: dict[str, Any],
    vocab: dict[str, int],
    layout: str,
) -> Path:
    """Write a released-style folder: ``best_model.pt``, ``args.json``, ``vocab.json``.

    ``best_model.pt`` is a plain state dict (``torch.save``) with attention keys
    in ``layout`` (see :func:`convert_attention_keys`), whatever layer type the
    model has. ``args.json`` = released defaults (whole-human: n_bins 51,
    max_seq_len 1200, mask_value -1, pad_value -2, pad_token ``<pad>``, ...),
    then the structure read from the model (embsize, nheads, d_hid, nlayers,
    n_layers_cls, input_emb_style, MVC, and pre_norm / cell_emb_style /
    explicit_zero_prob only when non-default, like releases that omit them),
    then ``args``; a structural key in ``args`` that disagrees with the model
    raises. ``vocab`` must map tokens to 0..ntoken-1 and contain the pad token.
    Returns the folder.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    structural = _structural_args(model)
    for key, value in args.items():
        if key in structural and structural[key] != value:
            raise ValueError(f"args[{key!r}]={value!r} but the model has {structural[key]!r}")
    merged = {**_RELEASED_ARGS_DEFAULTS, **structural, **args}

    ntoken = model.encoder.embedding.num_embeddings
    if sorted(vocab.values()) != list(range(ntoken)):
        raise ValueError(f"vocab indices must be exactly 0..{ntoken - 1}")
    if merged["pad_token"] not in vocab:
        raise ValueError(f"pad token {merged['pad_token']!r} missing from vocab")
    if model.encoder.embedding.padding_idx != vocab[merged["pad_token"]]:
        raise ValueError("vocab pad index differs from the model's padding_idx")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = convert_attention_keys(
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, layout
    )
    torch.save(state, out / "best_model.pt")
    (out / "args.json").write_text(json.dumps(merged, indent=4) + "\n")
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, indent=2) + "\n")
    return out


def make_vocab(n_genes: int, gene_names: list[str] | None = None) -> dict[str, int]:
    """Vocabulary like a released ``vocab.json``: genes 0..n-1, then ``<pad>``, ``<cls>``, ``<eoc>``.

    Without ``gene_names`` the genes are ``GENE00000``, ``GENE00001``, ...
    """
    if gene_names is None:
        gene_names = [f"GENE{i:05d}" for i in range(n_genes)]
    gene_names = list(gene_names)
    if len(gene_names) != n_genes:
        raise ValueError(f"got {len(gene_names)} gene names for n_genes={n_genes}")
    if len(set(gene_names)) != n_genes:
        raise ValueError("gene names must be unique")
    clash = set(gene_names) & set(SPECIAL_TOKENS)
    if clash:
        raise ValueError(f"gene names clash with special tokens: {sorted(clash)}")
    tokens = gene_names + list(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def original_forward(
    model: nn.Module,
    input_ids: Tensor,
    values: Tensor,
    attention_mask_hf: Tensor | None,
    batch_labels: Tensor | None = None,
    *,
    fastpath: bool = False,
    **flags: Any,
) -> dict[str, Tensor]:
    """Run the original ``model.forward`` under ``torch.no_grad()``; returns its output dict.

    ``attention_mask_hf`` uses the Hugging Face convention (1 = real token,
    0 = padding; ``None`` = no padding) and becomes the original's
    ``src_key_padding_mask`` (True at padding). ``flags`` are the original's
    keywords (``CLS``, ``CCE``, ``MVC``, ``ECS``, ``do_sample``).

    PyTorch's MHA "fast path" is OFF by default here (``fastpath=False``):
    with gradients off it would route the PyTorch layers through fused kernels
    and nested tensors that write 0 at padded positions. Off, the PyTorch path
    is plain math (like the flash stand-in) and padded positions hold ordinary
    values. Either way, compare only non-padded positions. The global setting
    is restored on exit.
    """
    if attention_mask_hf is None:
        attention_mask_hf = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    if attention_mask_hf.shape != input_ids.shape:
        raise ValueError("attention_mask_hf must have the shape of input_ids")
    src_key_padding_mask = attention_mask_hf.to(input_ids.device) == 0
    with torch.no_grad(), _mha_fastpath(fastpath), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        return model(
            input_ids,
            values.float(),
            src_key_padding_mask=src_key_padding_mask,
            batch_labels=batch_labels,
            **flags,
        )


# ---------------------------------------------------------------------------
# Real data bundled with installed packages
# ---------------------------------------------------------------------------


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed, so its bundled {relative} is "
            f"unavailable: {install_hint} (scripts/setup_env.sh does this)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} not found inside the installed {package!r}")


def wu2020_path() -> Path:
    """Path of scirpy's bundled Wu et al. 2020 subset (200 T cells, raw counts, h5ad)."""
    return _package_file(
        "scirpy", "tests/data/wu2020_200_v0_11.h5ad", "pip install --no-deps scirpy==0.22.5"
    )


def pbmc68k_path() -> Path:
    """Path of scanpy's bundled ``pbmc68k_reduced`` (700 cells, 765 genes, scaled values)."""
    return _package_file(
        "scanpy", "datasets/10x_pbmc68k_reduced.h5ad", "pip install scanpy"
    )
