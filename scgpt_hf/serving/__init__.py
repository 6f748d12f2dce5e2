"""Serving scGPT with Triton Inference Server.

* :mod:`.server`: :class:`TritonServer`, a local server launcher (``scgpt-hf serve MODEL|REPOSITORY_DIR``).
* :mod:`.client`: :class:`TritonClient`, which embeds and annotates AnnData through a server.

Names load on first use, so that `scgpt-hf`'s start (which registers ``serve``) imports no numpy.
"""

from __future__ import annotations

from ..lazy_imports import lazy_exports

_EXPORTS = {
    "client": ["TritonClient", "TritonServerError", "TritonUnavailableError"],
    "server": [
        "TritonServer", "add_parser", "find_server_env", "free_port", "is_repository", "python_paths", "run_serve",
    ],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
