"""Right-padding of cells (variable-length rows of gene ids and values) into rectangular arrays.

The one implementation of padding for the tokenizer, the data collator, the inference loop, the ONNX
feeds and the Triton client and tokenizer model. numpy only, and no imports from the package, so the
Triton tokenizer model loads this very file beside its ``model.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["pad_cells", "pad_rows", "padded_length"]


def padded_length(longest: int, length: int | None = None, pad_to_multiple_of: int | None = None) -> int:
    """The padded width: ``length`` when given, else ``longest``, rounded up to a multiple of ``pad_to_multiple_of``.

    A cell longer than that width is an error, never cut here (truncation is the tokenizer's choice).
    """
    target = int(longest if length is None else length)
    if pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if longest > target:
        raise ValueError(
            f"A cell has {longest} tokens, more than the padding length {target}; tokenise with "
            "truncation=True and a max_length <= the padding length."
        )
    return target


def pad_rows(rows: Sequence[np.ndarray], fill: float, width: int | None = None, dtype: np.dtype | type | None = None
             ) -> np.ndarray:
    """Rows of different lengths as one (n, width) array, each row left-aligned and the rest set to ``fill``."""
    if width is None:
        width = max((len(r) for r in rows), default=0)
    if dtype is None:
        dtype = np.asarray(rows[0]).dtype if len(rows) else np.float32
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def pad_cells(
    cells: Sequence[tuple[np.ndarray, np.ndarray]],
    pad_id: int,
    pad_value: float,
    pad_to_multiple_of: int | None = None,
    length: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad (input_ids, values) cells to one width: (input_ids int64, values float32, attention_mask int64).

    The width is ``length`` when given, else the longest cell, rounded up to a multiple of ``pad_to_multiple_of``.
    """
    lengths = [len(ids) for ids, _ in cells]
    width = padded_length(max(lengths, default=0), length, pad_to_multiple_of)
    ids = pad_rows([i for i, _ in cells], pad_id, width, np.int64)
    values = pad_rows([v for _, v in cells], pad_value, width, np.float32)
    mask = (np.arange(width)[None, :] < np.asarray(lengths, dtype=np.int64)[:, None]).astype(np.int64)
    return ids, values, mask
