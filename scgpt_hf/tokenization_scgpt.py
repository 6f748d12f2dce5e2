"""Tokenizer for scGPT: turns single-cell expression profiles into model inputs.

A cell is encoded as a set of tokens: ``<cls>`` followed by one token per expressed
gene of the vocabulary.  Each token carries a gene id (``input_ids``) and an
expression value (``values``).  With ``do_binning=True`` (the default) the values are
per-cell expression bins computed exactly like the original scGPT (``scgpt.preprocess``
``binning``/``_digitize``):

* zero values stay 0 (and the gene is left out unless ``include_zero_genes``);
* for the cell's non-zero values ``x`` (as float32, like the original embedding path):
  ``edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))``,
  ``left = np.digitize(x, edges)``, ``right = np.digitize(x, edges, right=True)``,
  ``bin = ceil(u * (right - left) + left)`` with ``u`` uniform in [0, 1).

So bins run from 1 to ``n_bins - 1``; a value that equals several edges (ties, which
are very common in count data) gets a random bin between ``right + 1`` and ``left``.

Reproducibility: the original draws ``u`` (and the genes kept when a cell is longer
than ``max_length``) from global RNGs, so a cell's tokens depend on everything
tokenised before it.  Here every random draw for a cell comes from
``np.random.default_rng([seed, h])`` where ``h`` is a BLAKE2b hash of that cell's
content (its expressed vocabulary gene ids and their float32 values, taken in gene-id
order).  The same cell with the same ``seed`` therefore gets the same tokens whatever
batch, chunk, row position or column order it arrives in; another ``seed`` gives
another tie-breaking.

Layout: `ScGPTTokenizer` is the vocabulary (gene names to ids, special tokens, saving and
loading) and transformers' contract (``__call__``, ``pad``, `BatchEncoding`); the matrix
(bounded row blocks, value checks, binning, truncation) is `cell_encoder.CellEncoder`'s.
`quiet_tokenizer_warnings` is the one switch for the tokenizer's per-call reports.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from .anndata_input import expression_input
from .cell_encoder import CellEncoder, EncodedCells
from .cell_encoding import TRUNCATION_STRATEGIES as _TRUNCATION_STRATEGIES
from .cell_encoding import bin_nonzero_values, cell_hash, match_gene_names
from .padding import pad_rows, padded_length

logger = logging.getLogger(__name__)
_QUIET = contextvars.ContextVar("scgpt_hf_quiet_tokenizer", default=False)


@contextlib.contextmanager
def quiet_tokenizer_warnings() -> Iterator[None]:
    """The one switch for the tokenizer's per-call reports (genes matched, repeated gene names, vocabulary
    coverage, cells without a vocabulary gene), for callers that tokenise in pieces and report the totals once
    themselves. Scoped to this thread (a context variable), so other threads keep theirs; the once-per-tokenizer
    note that values are not integers is not a per-call report and stays."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _report(level: int, message: str, *args: Any) -> None:
    """Log one of the tokenizer's per-call reports, unless inside `quiet_tokenizer_warnings`."""
    if not _QUIET.get():
        logger.log(level, message, *args)


VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# Below this fraction of the cells' expressed genes in the vocabulary, embeddings stop reflecting their cells
# reliably (measured with bench/vocab_coverage.py on wu2020; README: "Vocabulary coverage").
MIN_COVERAGE = 0.5


@dataclass
class GeneMatch:
    """Result of matching a dataset's gene names against the vocabulary.

    ``ids[j]`` is the vocabulary id of column ``j`` or -1 when the gene is unknown to
    the vocabulary or is a repeat of an earlier column with the same name (the first
    occurrence is used, later ones are left out).
    """

    ids: np.ndarray
    n_matched: int
    n_total: int
    unmatched: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Fraction of the given genes that are used."""
        return self.n_matched / self.n_total if self.n_total else 0.0

    def coverage_warning(
        self, n_genes: np.ndarray, n_expressed: np.ndarray, gene_column: str | None = None
    ) -> str | None:
        """The warning for cells whose expressed genes are too rarely in the vocabulary, else None.

        Coverage is the fraction of the cells' non-zero entries on vocabulary genes (`n_genes` over
        `n_expressed`, as `encode_with_ids(..., return_n_genes=True)` gives them): unmatched names that are
        never expressed cost nothing. Below `MIN_COVERAGE` the message gives the fraction and the likely
        cause; `gene_column` names a var column found to hold vocabulary symbols.
        """
        expressed = int(np.asarray(n_expressed).sum())
        coverage = float(np.asarray(n_genes).sum()) / expressed if expressed else 1.0
        if coverage >= MIN_COVERAGE:
            return None
        if gene_column is not None:
            fix = f"var[{gene_column!r}] holds symbols the vocabulary knows: pass gene_column={gene_column!r}."
        else:
            fix = (
                "Map them to the human gene symbols the vocabulary holds, or pass gene_column= naming a var column "
                "that holds such symbols."
            )
        return (
            f"Only {coverage:.1%} of the cells' expressed genes (non-zero entries) are in the model's vocabulary "
            f"({self.n_matched} of {self.n_total} gene names match): below {MIN_COVERAGE:.0%} an embedding no "
            f"longer reliably reflects its cell. The names left out look like {_describe_names(self.unmatched)}. "
            + fix
        )

    def __repr__(self) -> str:
        return (
            f"GeneMatch(n_matched={self.n_matched}, n_total={self.n_total}, "
            f"n_unmatched={len(self.unmatched)}, n_duplicates={len(self.duplicates)})"
        )


def load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """Read an scGPT ``vocab.json`` (a JSON object mapping gene symbol -> integer id)."""
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, dict):
        raise ValueError(
            f"{vocab_file} must hold a JSON object mapping gene symbols to integer ids "
            f"(the original scGPT vocab.json format), got a {type(vocab).__name__}."
        )
    bad = [k for k, v in vocab.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ValueError(
            f"{vocab_file}: ids must be non-negative integers; bad entries: "
            f"{ {k: vocab[k] for k in bad[:5]} }."
        )
    return vocab


def _describe_names(names: Sequence[str]) -> str:
    """Say what a list of gene names looks like (from up to 1,000 spread over it), for messages."""
    strs = [str(n) for n in list(names)[:: max(1, len(names) // 1000)]]
    if not strs:
        return "an empty list"
    kinds = [
        ("Ensembl gene IDs", lambda s: bool(_ENSEMBL_RE.match(s))),
        ("NCBI (Entrez) gene IDs or plain numbers (an integer index?)", lambda s: s.removeprefix("GeneID:").isdigit()),
        ("mouse-style or mixed-case symbols (the vocabulary is case-sensitive human symbols)",
         lambda s: s[:1].isupper() and s[1:] != s[1:].upper()),
    ]
    for kind, test in kinds:
        hits = [s for s in strs if test(s)]
        if len(hits) > len(strs) / 2:
            return f"{kind}, e.g. {hits[:5]}"
    return f"names the vocabulary does not know, e.g. {strs[:5]}"


def _check_max_length(max_length: int) -> int:
    if int(max_length) < 1:
        raise ValueError(f"max_length must be at least 1 (room for <cls>), got {max_length}.")
    return int(max_length)


def _to_numpy_1d(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rows(x: Any) -> list[np.ndarray]:
    """One numpy row per cell from a list of rows or a 2-D array / tensor."""
    if isinstance(x, (list, tuple)):
        return [_to_numpy_1d(r) for r in x]
    array = _to_numpy_1d(x)
    return list(array) if array.ndim == 2 else [array]


class ScGPTTokenizer(PreTrainedTokenizer):
    """scGPT gene tokenizer with the original per-cell expression binning.

    Call it on an AnnData (X, a layer or raw; genes from ``var_names`` or a ``var``
    column), a scipy sparse matrix or a dense 2-D array (with ``gene_names``).  It
    returns a :class:`~transformers.BatchEncoding` with ``input_ids`` (int64 gene ids,
    ``<cls>`` first), ``values`` (float32 bins; ``cls_value`` at ``<cls>``) and
    ``attention_mask`` (1 = real token, 0 = padding).

    Args:
        vocab_file: ``vocab.json`` in the original scGPT format (symbol -> id), which
            must contain the special tokens.
        pad_token, cls_token, eoc_token: special token names in the vocabulary.
        n_bins: number of value bins including the zero bin (51 in the released models,
            so non-zero genes get bins 1..50).
        pad_value: value at padded positions (-2 in the released models).
        cls_value: value at the ``<cls>`` position.  The original tokenizer uses 0; note
            that the original zero-shot embedding path (``scgpt.tasks.embed_data``)
            puts ``pad_value`` (-2) there.
        max_length: maximum number of tokens per cell, ``<cls>`` included (1200).
        truncation_strategy: ``"random"`` keeps ``<cls>`` and ``max_length - 1`` genes
            drawn at random (the original behaviour, made reproducible per cell);
            ``"highest"`` keeps the ``max_length - 1`` most highly expressed genes
            (ties broken by vocabulary id), deterministically.
        include_zero_genes: also emit the vocabulary genes with zero expression (bin 0).
        do_binning: bin values per cell; set False for input that is already binned.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "values", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        pad_token: str = "<pad>",
        cls_token: str = "<cls>",
        eoc_token: str = "<eoc>",
        n_bins: int = 51,
        pad_value: float = -2.0,
        cls_value: float = 0.0,
        max_length: int = 1200,
        truncation_strategy: str = "random",
        include_zero_genes: bool = False,
        do_binning: bool = True,
        **kwargs: Any,
    ) -> None:
        # from_pretrained hands special tokens back as AddedToken objects.
        pad_token, cls_token, eoc_token = str(pad_token), str(cls_token), str(eoc_token)
        vocab = load_vocab(vocab_file)
        missing = [t for t in (pad_token, cls_token, eoc_token) if t not in vocab]
        if missing:
            raise ValueError(
                f"The vocabulary {vocab_file} lacks the special token(s) {missing}. scGPT "
                f"vocabularies hold them as ordinary entries (the released ones end with "
                f"'<pad>', '<cls>', '<eoc>'). Add them to vocab.json with unused ids (e.g. "
                f"{max(vocab.values(), default=-1) + 1} onwards; the model's embedding must "
                f"have a row for each), or pass pad_token=/cls_token=/eoc_token= naming the "
                f"entries your vocabulary uses."
            )
        ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
        if len(np.unique(ids)) != len(ids):
            uniq, counts = np.unique(ids, return_counts=True)
            dup = uniq[counts > 1][:5].tolist()
            raise ValueError(f"The vocabulary {vocab_file} gives the same id to several genes (ids {dup}).")
        if int(n_bins) < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}.")
        _check_max_length(max_length)
        if truncation_strategy not in _TRUNCATION_STRATEGIES:
            raise ValueError(
                f"truncation_strategy must be one of {_TRUNCATION_STRATEGIES}, got {truncation_strategy!r}."
            )

        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.n_bins = int(n_bins)
        self.pad_value = float(pad_value)
        self.cls_value = float(cls_value)
        self.max_length = int(max_length)
        self.truncation_strategy = truncation_strategy
        self.include_zero_genes = bool(include_zero_genes)
        self.do_binning = bool(do_binning)
        self._warned_non_integer = False
        kwargs.setdefault("model_max_length", self.max_length)
        super().__init__(
            pad_token=pad_token,
            cls_token=cls_token,
            eoc_token=eoc_token,
            n_bins=self.n_bins,
            pad_value=self.pad_value,
            cls_value=self.cls_value,
            max_length=self.max_length,
            truncation_strategy=truncation_strategy,
            include_zero_genes=self.include_zero_genes,
            do_binning=self.do_binning,
            **kwargs,
        )

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary (special tokens included)."""
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        """The gene symbol -> id mapping (a copy)."""
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int | None:
        # No unknown token exists in scGPT: a gene not in the vocabulary has no id.
        return self.vocab.get(token)

    def _convert_id_to_token(self, index: int) -> str | None:
        return self.ids_to_tokens.get(int(index))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write ``vocab.json`` in the original scGPT format (symbol -> id, ordered by id)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory.")
        path = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        ordered = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(ordered, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return (path,)

    # ------------------------------------------------------------------ gene matching
    def match_genes(self, gene_names: Sequence[str] | np.ndarray) -> GeneMatch:
        """Map gene names to vocabulary ids (-1 where unknown) and report how many matched.

        Repeated names use their first column only (later ones get -1 and are listed in
        ``duplicates``).  Logs the count; raises ``ValueError`` if no gene matches.
        """
        names = ["" if n is None or (isinstance(n, float) and np.isnan(n)) else str(n) for n in gene_names]
        ids, unmatched, duplicates = match_gene_names(
            names, self.vocab, (self.pad_token, self.cls_token, self.eoc_token)
        )
        n_matched = int((ids >= 0).sum())
        match = GeneMatch(ids=ids, n_matched=n_matched, n_total=len(names), unmatched=unmatched, duplicates=duplicates)
        if n_matched == 0:
            example = [g for g in ("CD3E", "GAPDH", "MS4A1") if g in self.vocab] or list(self.vocab)[:3]
            raise ValueError(
                f"None of the {len(names)} gene names matches the vocabulary ({len(self.vocab)} entries). "
                f"The vocabulary expects gene symbols such as {example}; the given names look like "
                f"{_describe_names(names)}. Pass gene symbols (for AnnData, gene_column= names a var "
                f"column holding them) or map your IDs to symbols first."
            )
        _report(
            logging.INFO,
            "Matched %d of %d genes to the vocabulary (%d not in it, %d repeated names ignored).",
            n_matched, len(names), len(unmatched), len(duplicates),
        )
        if duplicates:
            _report(
                logging.WARNING,
                "%d gene names occur more than once (e.g. %s); only the first column of each is used. "
                "Aggregate repeated genes (e.g. sum their counts) beforehand if that is what you want.",
                len(duplicates), sorted(set(duplicates))[:5],
            )
        return match

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        data: Any,
        gene_names: Sequence[str] | None = None,
        *,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        max_length: int | None = None,
        truncation: bool | str = True,
        padding: bool | str = True,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        seed: int | None = 0,
        cls_value: float | None = None,
        return_n_genes: bool = False,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenise cells (rows) of an AnnData, sparse matrix, dense array or DataFrame.

        Args:
            data: AnnData (also a view or a backed row slice), scipy sparse matrix,
                dense 2-D numpy array or DataFrame, cells x genes, with raw counts or
                normalised/log1p values (binning is rank-based per cell).
            gene_names: one gene symbol per column; required for matrices, optional for
                AnnData (defaults to ``var_names``, or ``var[gene_column]``).
            layer / use_raw: take the matrix from ``adata.layers[layer]`` or ``adata.raw``
                instead of ``adata.X``; only that matrix is read.
            gene_column: ``var`` column holding gene symbols.
            max_length: tokens per cell including ``<cls>`` (default: the tokenizer's).
            truncation: True uses ``truncation_strategy``; "random" or "highest" choose
                it for this call; False keeps every gene.
            padding: True/"longest" pads to the longest cell, "max_length" to
                ``max_length``, False leaves cells unpadded.
            pad_to_multiple_of: round the padded length up to a multiple of this.
            return_tensors: "pt", "np" or None.  With None each key holds a list with
                one 1-D numpy array per cell (padded or not), so callers can group cells
                by length and later call :meth:`pad`.
            seed: seed for tie-breaking and random truncation, combined with a hash of
                each cell's content (see module docstring); None draws fresh entropy.
            cls_value: value at ``<cls>`` for this call (default: the tokenizer's).
            return_n_genes: add ``n_genes``: each cell's number of expressed vocabulary
                genes before truncation (0 for a cell encoded as just ``<cls>``), and
                ``n_expressed``: its number of non-zero entries, vocabulary genes or not.
                Whether asked or not, too low a share of expressed genes in the vocabulary
                (``GeneMatch.coverage_warning``) is logged as a warning with its likely cause.
        """
        if isinstance(data, (str, bytes)) or (
            isinstance(data, (list, tuple)) and data and isinstance(data[0], str)
        ):
            raise TypeError(
                "ScGPTTokenizer tokenises expression matrices, not text: pass an AnnData, a sparse "
                "matrix or an array of cells x genes (with gene_names)."
            )
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}.")
        source = expression_input(data, gene_names, layer=layer, use_raw=use_raw, gene_column=gene_column)
        hint = self._suggest_gene_column(source.var) if source.var is not None and gene_column is None else None
        try:
            match = self.match_genes(source.gene_names)
        except ValueError as err:
            if hint:
                raise ValueError(f"{err} var[{hint!r}] holds matching symbols: try gene_column={hint!r}.") from None
            raise
        encoded = self.encode_with_ids(
            source.matrix, match.ids, max_length=max_length, truncation=truncation, padding=padding,
            pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors, seed=seed, cls_value=cls_value,
            return_n_genes=True, gene_names=source.gene_names,
        )
        warning = match.coverage_warning(encoded["n_genes"], encoded["n_expressed"], hint)
        if warning:
            _report(logging.WARNING, warning)
        if not return_n_genes:
            del encoded["n_genes"], encoded["n_expressed"]
        return encoded

    def _suggest_gene_column(self, var: Any) -> str | None:
        for col in var.columns:
            values = var[col]
            if values.dtype.kind in "OSU" or str(values.dtype) in ("category", "string"):
                sample = values.astype(str).tolist()[:2000]
                if sum(s in self.vocab for s in sample) > 0.1 * len(sample):
                    return str(col)
        return None

    def encode_with_ids(
        self,
        matrix: Any,
        gene_ids: np.ndarray | Sequence[int],
        *,
        max_length: int | None = None,
        truncation: bool | str = True,
        padding: bool | str = True,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        seed: int | None = 0,
        cls_value: float | None = None,
        return_n_genes: bool = False,
        gene_names: Sequence[str] | None = None,
    ) -> BatchEncoding:
        """Tokenise a cells x genes matrix whose columns are already matched to vocabulary ids.

        ``gene_ids`` holds one id per column, -1 for columns to leave out (e.g.
        ``tokenizer.match_genes(names).ids``), so streaming callers match names once and
        then pass chunk after chunk.  ``matrix`` may be scipy sparse, dense numpy or a
        backed/on-disk matrix supporting row slices.  Other arguments as in ``__call__``.
        """
        encoder = self._cell_encoder(max_length=max_length, truncation=truncation, seed=seed, cls_value=cls_value)
        cells = encoder.encode(matrix, self._checked_gene_ids(gene_ids), gene_names)
        self._report_cells(cells)
        encoded: dict[str, Any] = {"input_ids": cells.input_ids, "values": cells.values}
        if return_n_genes:
            encoded["n_genes"], encoded["n_expressed"] = cells.n_genes, cells.n_expressed
        return self.pad(
            encoded,
            padding=padding,
            max_length=encoder.max_length if padding == "max_length" else None,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors=return_tensors,
        )

    def _cell_encoder(
        self,
        *,
        max_length: int | None = None,
        truncation: bool | str = True,
        seed: int | None = 0,
        cls_value: float | None = None,
    ) -> CellEncoder:
        """The `CellEncoder` this tokenizer's settings and these call options (as in ``__call__``) describe."""
        max_length = _check_max_length(self.max_length if max_length is None else max_length)
        if truncation is True:
            strategy: str | None = self.truncation_strategy
        elif truncation is False or truncation is None:
            strategy = None
        elif truncation in _TRUNCATION_STRATEGIES:
            strategy = truncation
        else:
            raise ValueError(f"truncation must be True, False, 'random' or 'highest', got {truncation!r}.")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        elif not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}.")
        return CellEncoder(
            cls_id=self.cls_token_id, cls_value=self.cls_value if cls_value is None else float(cls_value),
            n_bins=self.n_bins, max_length=max_length, strategy=strategy, seed=int(seed),
            include_zero_genes=self.include_zero_genes, do_binning=self.do_binning,
        )

    def _checked_gene_ids(self, gene_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """`gene_ids` as int64, refused when they repeat an id, match nothing or hold ids outside the vocabulary."""
        gene_ids = np.asarray(gene_ids, dtype=np.int64)
        used = gene_ids[gene_ids >= 0]
        if len(np.unique(used)) != len(used):
            raise ValueError(
                "gene_ids maps several columns to the same vocabulary id; use match_genes(), which keeps "
                "the first column of each repeated gene, or aggregate the columns first."
            )
        if used.size == 0:
            raise ValueError("No column has a vocabulary id (all gene_ids are -1).")
        unknown = ~np.isin(used, np.fromiter(self.ids_to_tokens, dtype=np.int64))
        if unknown.any():
            raise ValueError(f"gene_ids contains ids not in the vocabulary, e.g. {used[unknown][:5].tolist()}.")
        return gene_ids

    def _report_cells(self, cells: EncodedCells) -> None:
        """Note non-integer values once per tokenizer; report cells without a vocabulary gene (per call)."""
        if cells.non_integer and not self._warned_non_integer:
            self._warned_non_integer = True
            logger.warning(
                "Expression values are not integers (normalised or log1p data?). That is fine: "
                "binning is rank-based within each cell, so log-normalised input gets the same bins "
                "as raw counts (up to random tie-breaking). Scaled data (negative values) is invalid."
            )
        n_empty = int((cells.n_genes == 0).sum())
        if n_empty:
            _report(
                logging.WARNING,
                "%d of %d cells express no vocabulary gene; each is encoded as just <cls> (n_genes == 0). "
                "Filter such cells out (e.g. with return_n_genes=True) if their embeddings are meaningless to you.",
                n_empty, len(cells.n_genes),
            )

    # ------------------------------------------------------------------ padding
    def pad(
        self,
        encoded_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Pad cells to a common length: ``input_ids`` with the pad id, ``values`` with
        ``pad_value`` and ``attention_mask`` with 0 (transformers' ``pad``, on the right only).

        Accepts a BatchEncoding/dict whose keys hold one sequence per cell (lists, numpy
        arrays or tensors, e.g. the unpadded output of ``__call__``), a dict of 2-D
        padded arrays (their padding is stripped via ``attention_mask`` and redone), or
        a list of per-cell dicts (as a DataLoader ``collate_fn`` gets).  ``padding``:
        True/"longest", "max_length" (``max_length``, default the tokenizer's) or False.
        Keys that hold one scalar per cell (``n_genes``) are passed through.  With
        ``return_tensors=None`` each key holds one 1-D array per cell.  ``verbose`` and
        other transformers arguments change nothing: padding here has nothing to warn about.
        """
        if padding_side not in (None, "right"):
            raise ValueError("ScGPTTokenizer pads on the right only.")
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}.")
        if isinstance(encoded_inputs, Sequence) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {k: [ex[k] for ex in encoded_inputs] for k in encoded_inputs[0]}
        if "input_ids" not in encoded_inputs:
            raise ValueError(f"pad() needs 'input_ids'; got keys {list(encoded_inputs.keys())}.")
        first = encoded_inputs["input_ids"]
        single = len(first) > 0 and _to_numpy_1d(first[0]).ndim == 0  # one cell, not a batch
        cells = {k: ([v] if single else v) for k, v in encoded_inputs.items()}
        out = self._padded(self._unpadded(cells), padding, max_length, pad_to_multiple_of)
        if return_attention_mask is False:
            out.pop("attention_mask")
        for key, value in cells.items():  # per-cell scalars such as n_genes
            if key not in self.model_input_names:
                out[key] = np.asarray([_to_numpy_1d(x) for x in value]) if isinstance(value, (list, tuple)) \
                    else _to_numpy_1d(value)
        for key in [k for k in self.model_input_names if k in out]:
            if return_tensors is None:
                out[key] = list(out[key])  # one 1-D array per cell
            elif isinstance(out[key], list):
                out[key] = _stacked(out[key], key, return_tensors)
        if single:
            out = {k: v[0] for k, v in out.items()}
        return BatchEncoding(out, tensor_type=return_tensors)

    def _unpadded(self, cells: Mapping[str, Any]) -> dict[str, list[np.ndarray]]:
        """Each cell's input_ids (int64) and values (float32, if given) without padding (cut at the mask's sum)."""
        ids = _rows(cells["input_ids"])
        if "attention_mask" in cells:
            lengths = [int(m.sum()) for m in _rows(cells["attention_mask"])]  # strips earlier right padding
        else:
            lengths = [len(r) for r in ids]
        out = {"input_ids": [r[:n].astype(np.int64) for r, n in zip(ids, lengths)]}
        if "values" in cells:
            values = _rows(cells["values"])
            if [len(v) for v in values] != [len(r) for r in ids]:
                raise ValueError("'values' and 'input_ids' must have the same length for every cell.")
            out["values"] = [v[:n].astype(np.float32) for v, n in zip(values, lengths)]
        return out

    def _padded(
        self, cells: dict[str, list[np.ndarray]], padding: bool | str | PaddingStrategy, max_length: int | None,
        pad_to_multiple_of: int | None,
    ) -> dict[str, Any]:
        """`cells` with their attention masks, right-padded as `padding` says (PaddingStrategy), in input order."""
        try:
            strategy = PaddingStrategy.DO_NOT_PAD if padding is False or padding is None else (
                PaddingStrategy.LONGEST if padding is True else PaddingStrategy(padding))
        except ValueError:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}.") from None
        cells["attention_mask"] = [np.ones(len(r), dtype=np.int64) for r in cells["input_ids"]]
        cells = {k: cells[k] for k in self.model_input_names if k in cells}
        if strategy == PaddingStrategy.DO_NOT_PAD:
            return cells
        if strategy == PaddingStrategy.MAX_LENGTH:
            max_length = self.max_length if max_length is None else max_length
        else:
            max_length = None
        width = padded_length(max((len(r) for r in cells["input_ids"]), default=0), max_length, pad_to_multiple_of)
        fills = {"input_ids": (self.pad_token_id, np.int64), "values": (self.pad_value, np.float32),
                 "attention_mask": (0, np.int64)}
        return {k: pad_rows(rows, fills[k][0], width, fills[k][1]) for k, rows in cells.items()}


def _stacked(rows: list[np.ndarray], key: str, return_tensors: str) -> np.ndarray:
    """Unpadded cells of equal length as one 2-D array, for a tensor return type."""
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            f"Cannot make a {return_tensors!r} tensor from cells of different lengths; "
            "use padding=True/'longest' or 'max_length'."
        )
    dtype = np.float32 if key == "values" else np.int64
    return np.stack(rows).astype(dtype) if rows else np.zeros((0, 0), dtype=dtype)


__all__ = ["ScGPTTokenizer", "GeneMatch", "bin_nonzero_values", "cell_hash", "load_vocab", "quiet_tokenizer_warnings"]
