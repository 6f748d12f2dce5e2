"""Serving scGPT with Triton Inference Server.

* :mod:`.server`: :class:`TritonServer`, a local server launcher (``scgpt-hf serve MODEL|REPOSITORY_DIR``).
* :mod:`.client`: :class:`TritonClient`, which embeds and annotates AnnData through a server.
"""

from .client import TritonClient, TritonServerError, TritonUnavailableError
from .server import TritonServer, add_parser, find_server_env, free_port, is_repository, python_paths

__all__ = [
    "TritonClient",
    "TritonServer",
    "TritonServerError",
    "TritonUnavailableError",
    "add_parser",
    "find_server_env",
    "free_port",
    "is_repository",
    "python_paths",
]
