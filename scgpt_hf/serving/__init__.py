"""Serving scGPT with Triton Inference Server.

* :mod:`.server`: :class:`TritonServer`, a local server launcher (``scgpt-hf serve MODEL|REPOSITORY_DIR``).
* :mod:`.client`: :class:`TritonClient`, which embeds and annotates AnnData through a server.

Names load on first use, so that `scgpt-hf`'s start (which registers ``serve``) imports no numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TritonClient": "client",
    "TritonServerError": "client",
    "TritonUnavailableError": "client",
    "TritonServer": "server",
    "add_parser": "server",
    "find_server_env": "server",
    "free_port": "server",
    "is_repository": "server",
    "python_paths": "server",
    "run_serve": "server",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
