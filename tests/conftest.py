"""Shared fixtures: the original scGPT (via tests/reference.py) and real bundled data.

If ``scgpt`` is not installed, tests that need it are skipped with a reason,
unless ``SCGPT_HF_REQUIRE_REFERENCE=1`` (set by ``.ci/run``) turns that into a
failure, so CI never silently skips parity tests.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The local Hub must be configured before anything imports huggingface_hub (it reads its settings then).
import hub_server  # noqa: E402

hub_server.start_session_hub()

import reference  # noqa: E402


def _missing(reason: str) -> None:
    if os.environ.get("SCGPT_HF_REQUIRE_REFERENCE") == "1":
        pytest.fail(f"{reason} (SCGPT_HF_REQUIRE_REFERENCE=1 forbids skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def original_scgpt() -> types.ModuleType:
    """The original ``scgpt`` 0.2.4 package, importable thanks to the stand-ins."""
    try:
        return reference.import_original()
    except ModuleNotFoundError as exc:
        _missing(f"original scGPT not installed: {exc}")
        raise  # unreachable


def _read(path_fn):  # type: ignore[no-untyped-def]
    import anndata

    try:
        path = path_fn()
    except FileNotFoundError as exc:
        _missing(str(exc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old-format and FutureWarnings of bundled files
        return anndata.read_h5ad(path)


@pytest.fixture(scope="session")
def wu2020_adata():  # type: ignore[no-untyped-def]
    """Wu et al. 2020 (scirpy): 200 T cells x 30,727 genes, raw counts (CSR).

    Shared by the whole session: call ``.copy()`` before modifying it.
    """
    return _read(reference.wu2020_path)


@pytest.fixture(scope="session")
def pbmc68k_adata():  # type: ignore[no-untyped-def]
    """scanpy's pbmc68k_reduced: 700 cells x 765 genes, scaled values (not counts).

    Shared by the whole session: call ``.copy()`` before modifying it.
    """
    return _read(reference.pbmc68k_path)
