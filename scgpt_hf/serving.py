"""Serving scGPT with Triton Inference Server: a local server launcher and a client for AnnData.

* :class:`TritonServer` starts the Triton server shipped in the ``nvidia-pytriton`` wheel (a real
  Triton 2.51, python backend, CPU capable) on a model repository written by
  ``scgpt-hf export triton``, with the environment it needs; :meth:`TritonServer.for_model` serves a
  model folder or Hub id with a PyTorch encoder on a GPU (or the CPU) behind the same tokenizer model
  and ensembles.  ``scgpt-hf serve MODEL|REPOSITORY_DIR`` is its command line.  The server gets its own
  virtual environment (numpy<2: the python backend stub corrupts numpy 2 arrays): ``bash
  scripts/setup_triton_server.sh`` makes ``.venv-triton``; a PyTorch encoder borrows torch and
  transformers from the environment that starts the server.
* :class:`TritonClient` sends an AnnData's counts to the ``scgpt_embed`` / ``scgpt_annotate``
  ensembles over gRPC or HTTP, concurrently, with timeouts and retries on transient errors, and
  writes the answers into ``obsm`` / ``obs`` like :func:`scgpt_hf.embed`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

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

DEFAULT_KEY = "X_scGPT"
#: Environment variable listing the folders a PyTorch encoder's stub appends to sys.path (TritonServer python_path).
PYTHON_PATH_VAR = "SCGPT_HF_PYTHON_PATH"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
                   "StatusCode.ABORTED"}
_TRANSIENT_HTTP = {"408", "429", "502", "503", "504"}


class TritonServerError(RuntimeError):
    """The server answered a request with an error; the message is the server's."""


class TritonUnavailableError(TritonServerError):
    """The server could not be reached (or kept failing transiently) after the retries."""


# ----------------------------------------------------------------------------------------------
# Local server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def python_paths() -> list[str]:
    """This interpreter's import folders beyond the standard library (site-packages, PYTHONPATH entries).

    A server whose stubs get these after their own site-packages runs the PyTorch encoder with this
    environment's torch and transformers while keeping its own numpy<2 (see :class:`TritonServer`).
    """
    stdlib = {os.path.realpath(p) for p in (sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")) if p}
    out: list[str] = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        path = os.path.realpath(entry)
        if any(path == lib or path.startswith(lib + os.sep) for lib in stdlib) and "-packages" not in path:
            continue  # the standard library and lib-dynload: the server's Python has its own
        if path not in out:
            out.append(path)
    return out


def find_server_env(server_env: str | os.PathLike | None = None) -> Path:
    """The virtual environment holding nvidia-pytriton (and numpy<2) for the server.

    Order: `server_env`, ``$SCGPT_HF_TRITON_ENV``, ``.venv-triton`` in the source tree, the current
    interpreter's environment.  Raises FileNotFoundError saying how to make one.
    """
    candidates = [server_env, os.environ.get("SCGPT_HF_TRITON_ENV"), _REPO_ROOT / ".venv-triton", sys.prefix]
    for cand in candidates:
        if not cand:
            continue
        env = Path(cand)
        if list(env.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver")):
            return env
    raise FileNotFoundError(
        "No Triton server environment found: run `bash scripts/setup_triton_server.sh` (makes .venv-triton with "
        "nvidia-pytriton==0.7.0 and numpy<2) or point SCGPT_HF_TRITON_ENV / --server-env at such a virtualenv."
    )


def _descendants(pid: int) -> list[int]:
    """Process ids of every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


class TritonServer:
    """A Triton server process on a model repository, bound to 127.0.0.1 (or `host`) on free ports.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.  The server runs from the
    nvidia-pytriton wheel in `server_env` (see :func:`find_server_env`) with its bin first on PATH and
    LD_LIBRARY_PATH starting with the interpreter's LIBDIR and the wheel's libraries, and a backend
    folder holding the python backend and the stub for the environment's Python version.  It runs under
    :mod:`scgpt_hf.process_guard`: when the thread that started it exits, or the process dies in any way
    (SIGKILL included), the server is stopped and its temporary folders are removed.

    Args:
        repository: model repository folder.
        server_env: virtualenv with nvidia-pytriton (default: :func:`find_server_env`).
        host: address the HTTP, gRPC and metrics endpoints bind to.
        http_port, grpc_port, metrics_port: ports (default: free ones).
        log_verbose: Triton's --log-verbose level.
        extra_args: more tritonserver flags.
        log_file: where server output goes (default: a new ``scgpt_tritonserver_*.log`` in the temporary
            directory, kept after the server stops; see :attr:`log_path`).
        python_path: folders a PyTorch encoder imports from after the server environment's own
            site-packages (whose numpy<2 the stubs need), e.g. :func:`python_paths` to lend this
            environment's torch and transformers; passed as ``$SCGPT_HF_PYTHON_PATH``.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        server_env: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        log_file: str | os.PathLike | None = None,
        python_path: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.env = find_server_env(server_env)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_verbose = int(log_verbose)
        self.extra_args = list(extra_args)
        self._log_file = Path(log_file) if log_file else None
        self.python_path = [str(p) for p in python_path]
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._owned: tempfile.TemporaryDirectory | None = None  # a repository built for this server
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log_handle: Any = None

    @property
    def http_url(self) -> str:
        """host:port of the HTTP endpoint."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    def environment(self) -> tuple[Path, dict[str, str]]:
        """(the server environment's site-packages, the environment the server and its stubs run with)."""
        site = next(self.env.glob("lib/python3*/site-packages"))
        env_python = self.env / "bin" / "python"
        libdir = subprocess.run(
            [str(env_python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip() or sysconfig.get_config_var("LIBDIR")
        env = dict(os.environ)
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)
        env["VIRTUAL_ENV"] = str(self.env)
        if self.python_path:  # the stubs ignore PYTHONPATH; models that need these append them to sys.path
            env[PYTHON_PATH_VAR] = os.pathsep.join(self.python_path)
        env["PATH"] = f"{self.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        libs = [libdir, str(site / "nvidia_pytriton.libs")]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env.setdefault("OMP_NUM_THREADS", "1")
        return site, env

    def _layout(self) -> tuple[Path, Path, dict[str, str], Path]:
        site, env = self.environment()
        py = site.parent.name.removeprefix("python")  # e.g. "3.11"
        root = site / "pytriton" / "tritonserver"
        stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.exists():
            raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {py} ({stub}).")
        assert self._tmp is not None
        backends = Path(self._tmp.name) / "backends"
        python_backend = backends / "python"
        python_backend.mkdir(parents=True)
        for item in (root / "backends" / "python").iterdir():
            if item.is_file():
                (python_backend / item.name).symlink_to(item)
        (python_backend / stub.name).symlink_to(stub)
        return root / "bin" / "tritonserver", backends, env, Path(self._tmp.name)

    def command(self) -> list[str]:
        """The tritonserver command line (after :meth:`start` has laid out the backend folder)."""
        return self._cmd

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Start the server and wait until it is ready (raises RuntimeError with the log tail if it is not)."""
        if self.process is not None:
            raise RuntimeError("server already started")
        if not is_repository(self.repository):
            raise FileNotFoundError(f"{self.repository} is not a Triton model repository (no */config.pbtxt); "
                                    "write one with `scgpt-hf export triton MODEL REPOSITORY_DIR`.")
        self.check_ports()
        self._tmp = tempfile.TemporaryDirectory(prefix="scgpt_triton_")
        server_id = f"scgpt-hf-{os.getpid()}-{os.urandom(4).hex()}"
        binary, backends, env, tmp = self._layout()
        self._cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=5",
            f"--log-verbose={self.log_verbose}", "--strict-readiness=true", f"--id={server_id}",
            *self.extra_args,
        ]
        if self._log_file is None:  # kept after the server stops, unlike the temporary folders
            handle, name = tempfile.mkstemp(prefix="scgpt_tritonserver_", suffix=".log")
            os.close(handle)
        self.log_path = self._log_file or Path(name)
        self._log_handle = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Through scgpt_hf.process_guard: the server dies with this process, however it ends (SIGKILL included),
        # and the guard removes the temporary folders after it.
        folders = [str(tmp)] + ([self._owned.name] if self._owned is not None else [])
        guard = [str(self.env / "bin" / "python"), "-I", str(Path(__file__).with_name("process_guard.py")),
                 str(os.getpid()), *folders, "--"]
        self.process = subprocess.Popen([*guard, *self._cmd], stdout=self._log_handle, stderr=subprocess.STDOUT,
                                        env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        base = f"http://{self.http_url}/v2"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while starting:\n{tail}")
            with contextlib.suppress(OSError, ValueError):
                # Ready, and this server (its --id): never another server that holds the port.
                with urllib.request.urlopen(base + "/health/ready", timeout=1) as resp:  # noqa: S310 - loopback
                    ready = resp.status == 200
                with urllib.request.urlopen(base, timeout=1) as resp:  # noqa: S310 - loopback
                    if ready and json.load(resp).get("name") == server_id:
                        return self
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{tail}")

    def check_ports(self) -> None:
        """Raise RuntimeError naming the first of the server's ports that something already holds."""
        for what, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            if _port_in_use(self.host, port):
                raise RuntimeError(
                    f"{self.host}:{port} (the {what} port) is already in use, perhaps by another server; choose "
                    f"another port (--http-port, --grpc-port, --metrics-port) or stop that server."
                )

    def log_tail(self, n_chars: int = 6000) -> str:
        """The end of the server's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n_chars:].decode("utf-8", "replace")

    def pids(self) -> list[int]:
        """The pids of the server's guard, the server and its children (python backend stubs)."""
        if self.process is None:
            return []
        return [self.process.pid, *_descendants(self.process.pid)]

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the server's guard (the server drains and exits in ~5 s, the guard removes the temporary
        folders), SIGKILL what lingers."""
        proc = self.process
        if proc is None:
            if self._owned is not None:
                self._owned.cleanup()
                self._owned = None
            return None
        family = self.pids()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in family[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in family[1:]:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._owned is not None:
            self._owned.cleanup()
            self._owned = None
        return proc.returncode

    @classmethod
    def for_model(
        cls,
        model: str | os.PathLike,
        *,
        device: str | None = None,
        precision: str = "auto",
        attn_implementation: str = "sdpa",
        max_batch_size: int | None = None,
        instances: int = 1,
        tokenizer_instances: int = 1,
        max_tokens: int | None = None,
        max_queue_delay_microseconds: int | None = None,
        gpu_memory_fraction: float | None = None,
        **server_args: Any,
    ) -> TritonServer:
        """A server (not started) whose encoder runs `model` (a folder or Hub id) in PyTorch on `device`.

        Writes a repository with :func:`scgpt_hf.export.triton.write_torch_repository` into a temporary
        folder the server removes when it stops; the stubs import this environment's torch and transformers
        (:func:`python_paths`) after the server environment's numpy<2.  Before anything is written, checks
        that the ports are free and that the server's Python can run the model there: torch imports, CUDA is
        visible for ``device="cuda"``, the attention implementation runs on that device.  `device` defaults
        to "cuda" when this process sees a GPU, else "cpu".  Other arguments: as `write_torch_repository`
        and :class:`TritonServer`.
        """
        from scgpt_hf.export.triton import check_torch_settings, write_torch_repository

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_torch_settings(device, precision, attn_implementation)
        server_args.setdefault("python_path", python_paths())
        owned = tempfile.TemporaryDirectory(prefix="scgpt_torch_repo_")
        try:
            server = cls(Path(owned.name) / "repository", **server_args)
            server._owned = owned
            server.check_ports()
            server._check_runtime(device, attn_implementation)
            write_torch_repository(
                _model_folder(model), Path(owned.name) / "repository", device=device, precision=precision,
                attn_implementation=attn_implementation, max_batch_size=max_batch_size, instances=instances,
                tokenizer_instances=tokenizer_instances, max_tokens=max_tokens,
                max_queue_delay_microseconds=max_queue_delay_microseconds, gpu_memory_fraction=gpu_memory_fraction,
            )
        except BaseException:
            owned.cleanup()
            raise
        return server

    def _check_runtime(self, device: str, attn_implementation: str) -> dict[str, Any]:
        """What the server's Python offers the PyTorch encoder; raises RuntimeError if it cannot run on `device`."""
        _, env = self.environment()
        found = subprocess.run([str(self.env / "bin" / "python"), "-c", _RUNTIME_PROBE], capture_output=True,
                               text=True, env=env, timeout=300)
        try:
            info = json.loads(found.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"The server's Python ({self.env}) failed to start:\n{found.stderr[-2000:]}") from None
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        problem = None
        if "error" in info:
            problem = (f"it cannot import torch and transformers ({info['error']}); run the server environment "
                       "beside an environment that has them (python_path) or install them into it")
        elif self.python_path and info["python"] != here:
            problem = (f"it is Python {info['python']} but lends this Python {here}'s torch; make the server "
                       f"environment with Python {here} (PYTHON=python{here} bash scripts/setup_triton_server.sh)")
        elif int(info["numpy"].split(".")[0]) >= 2:
            problem = (f"it has numpy {info['numpy']}, whose arrays the python backend stub corrupts; the server "
                       "environment needs numpy<2 ahead of any other (bash scripts/setup_triton_server.sh)")
        elif device.startswith("cuda") and not info["cuda"]:
            problem = (f"device {device!r} was asked for but its torch {info['torch']} sees no CUDA GPU "
                       f"(built for CUDA {info['cuda_version']}); serve with --device cpu or on a GPU host")
        elif device.startswith("cuda:") and int(device.split(":")[1]) >= len(info["gpus"]):
            problem = f"device {device!r} was asked for but it sees {len(info['gpus'])} GPU(s): {info['gpus']}"
        elif attn_implementation == "flash_attention_2" and not info["flash_attn"]:
            problem = "attn_implementation='flash_attention_2' needs the flash-attn package, which it lacks"
        if problem:
            raise RuntimeError(f"The server's Python ({self.env}) cannot run the PyTorch encoder: {problem}.")
        return info

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# What the server's Python offers a PyTorch encoder: one JSON line (run by TritonServer._check_runtime).
_RUNTIME_PROBE = r"""
import importlib.util, json, os, sys
sys.path.extend(p for p in os.environ.get("SCGPT_HF_PYTHON_PATH", "").split(os.pathsep) if p)  # as model.py does
info = {"python": "%d.%d" % sys.version_info[:2]}
try:
    import numpy, torch, transformers
    info.update(numpy=numpy.__version__, torch=torch.__version__, transformers=transformers.__version__,
                cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                flash_attn=importlib.util.find_spec("flash_attn") is not None)
except Exception as err:
    info["error"] = f"{type(err).__name__}: {err}"
print(json.dumps(info))
"""


def is_repository(path: str | os.PathLike) -> bool:
    """True for a Triton model repository (a folder with */config.pbtxt)."""
    return Path(path).is_dir() and any(Path(path).glob("*/config.pbtxt"))


def _model_folder(model: str | os.PathLike) -> Path:
    """A local folder for `model`: the folder itself, or the Hub snapshot of a model id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise FileNotFoundError(f"{model} is not a model folder (and not a Hub id).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model)))
    except Exception as err:  # noqa: BLE001 - the Hub's many error types
        raise FileNotFoundError(f"{model}: no such folder, and the Hub could not provide it ({err}).") from err


# ----------------------------------------------------------------------------------------------
# Client


@dataclass
class _Chunk:
    rows: np.ndarray  # positions in adata
    gene_ids: np.ndarray  # [cells, n] int64, -1 padded
    counts: np.ndarray  # [cells, n] float32


def _served_batches(model_config: dict[str, Any]) -> SimpleNamespace:
    """A served model's batch settings, in the form `scgpt_hf.embed`'s batch mapping reads, so obs batch names
    and ids map, and fail, exactly as in ``embed(..., batch_key=)``."""
    params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
    return SimpleNamespace(
        needs_batch_labels=any(i["name"] == "batch_labels" for i in model_config.get("input", [])),
        num_batch_labels=int(params.get("num_batch_labels") or 0) or None,
        batch2id=json.loads(params["batch2id"]) if params.get("batch2id") else None,
    )


def _status(err: Exception) -> str:
    status = getattr(err, "status", None)
    return str(status() if callable(status) else status or "")


def _message(err: Exception) -> str:
    msg = getattr(err, "message", None)
    return str(msg() if callable(msg) else msg or err)


def _text(value: Any) -> str:
    """A BYTES tensor element as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonClient:
    """Client of an scGPT Triton repository (``scgpt_embed``, ``scgpt_annotate``, ``scgpt_vocab``).

    Args:
        url: ``host:port`` of the server's gRPC (default 8001) or HTTP (default 8000) endpoint.
        protocol: "grpc" or "http".
        timeout: seconds per request (network and server time together).
        retries: further tries of a request after a transient error (unreachable server, timeouts,
            overload: gRPC UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, HTTP 408/429/502/503/504).
        backoff: seconds before the first retry, doubling each time.
        embed_model, annotate_model, vocab_model, labels_model: model names in the repository.

    Errors the server answers (bad input, a failing model) raise :class:`TritonServerError` with the
    server's message at once; they are never retried.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        embed_model: str = "scgpt_embed",
        annotate_model: str = "scgpt_annotate",
        vocab_model: str = "scgpt_vocab",
        labels_model: str = "scgpt_labels",
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}.")
        self.url = url.removeprefix("http://").removeprefix("grpc://")
        self.protocol = protocol
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.embed_model = embed_model
        self.annotate_model = annotate_model
        self.vocab_model = vocab_model
        self.labels_model = labels_model
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._local = threading.local()
        self._gene_cache: dict[str, np.ndarray] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._labels: list[str] | None = None

    # -------------------------------------------------------------- plumbing
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url)
            else:
                client = self._module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout)
            self._local.client = client
        return client

    def _transient(self, err: Exception) -> bool:
        status = _status(err)
        if status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP:
            return True
        msg = _message(err).lower()
        return isinstance(err, (ConnectionError, TimeoutError, OSError)) or any(
            s in msg for s in ("connection refused", "failed to connect", "timed out", "deadline exceeded",
                               "connection reset", "unavailable", "broken pipe"))

    def _call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a tritonclient method with retries on transient errors; server errors raise at once."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._client(), fn_name)(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - tritonclient, gevent and socket errors
                if not self._transient(err):
                    raise TritonServerError(_message(err)) from err
                if attempt == self.retries:
                    raise TritonUnavailableError(
                        f"{self.protocol} {self.url}: {_message(err)} (after {self.retries + 1} tries)") from err
                logger.warning("Triton %s (%s); retrying in %.1f s", _message(err), _status(err), delay)
                self._local.client = None  # reconnect
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One inference request: numpy inputs by name -> numpy outputs by name (with retries)."""
        m = self._module
        tensors = []
        for name, array in inputs.items():
            dtype = "BYTES" if array.dtype.kind in "OSU" else {
                np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
                np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16"}[array.dtype]
            t = m.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            tensors.append(t)
        requested = [m.InferRequestedOutput(n) for n in outputs]
        kwargs: dict[str, Any] = {"outputs": requested}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        result = self._call("infer", model, tensors, **kwargs)
        return {n: result.as_numpy(n) for n in outputs}

    def is_ready(self) -> bool:
        """True when the server is live and ready."""
        try:
            return bool(self._call("is_server_ready"))
        except TritonServerError:
            return False

    def model_config(self, model: str) -> dict[str, Any]:
        """The model's configuration as the server has it, as a dict (HTTP's JSON form; cached)."""
        if model not in self._configs:
            cfg = self._call("get_model_config", model)
            if self.protocol == "grpc":
                from google.protobuf.json_format import MessageToDict

                cfg = MessageToDict(cfg.config, preserving_proto_field_name=True)
            self._configs[model] = cfg
        return self._configs[model]

    def max_batch_size(self, model: str) -> int:
        """The model's max_batch_size from its configuration (cached)."""
        return int(self.model_config(model).get("max_batch_size", 0))

    def statistics(self, model: str = "") -> dict[str, Any]:
        """Inference statistics as a dict (the server's JSON / protobuf, normalised to dicts)."""
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(self._call("get_inference_statistics", model), preserving_proto_field_name=True)
        return self._call("get_inference_statistics", model)

    # -------------------------------------------------------------- genes
    def gene_ids(self, gene_names: Sequence[str]) -> np.ndarray:
        """Vocabulary ids of gene names (-1 where unknown), as the server's vocabulary has them; cached."""
        names = [str(n) for n in gene_names]
        key = hashlib.sha256("\x00".join(names).encode("utf-8")).hexdigest()
        if key not in self._gene_cache:
            array = np.array([n.encode("utf-8") for n in names], dtype=np.object_)
            ids = self.infer(self.vocab_model, {"gene_names": array}, ["gene_ids"])["gene_ids"]
            self._gene_cache[key] = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._gene_cache[key]

    # -------------------------------------------------------------- AnnData
    @staticmethod
    def _matrix(adata: Any, layer: str | None, use_raw: bool, gene_column: str | None) -> tuple[Any, list[str]]:
        if layer is not None and use_raw:
            raise ValueError("Give either layer= or use_raw=True, not both.")
        if use_raw:
            if adata.raw is None:
                raise ValueError("use_raw=True but this AnnData has no .raw.")
            matrix, var = adata.raw.X, adata.raw.var
        elif layer is not None:
            matrix, var = adata.layers[layer], adata.var
        else:
            matrix, var = adata.X, adata.var
        names = var.index.astype(str).tolist() if gene_column is None else var[gene_column].astype(str).tolist()
        return matrix, names

    def _chunks(self, matrix: Any, ids: np.ndarray, batch_size: int) -> tuple[list[_Chunk], np.ndarray]:
        """Requests of up to batch_size cells (sparse rows, matched genes only, column order) and n_genes."""
        n_obs = matrix.shape[0]
        used_cols = np.flatnonzero(ids >= 0)
        if used_cols.size == 0:
            raise ValueError("None of the dataset's genes is in the model's vocabulary (scgpt_vocab matched none).")
        col_ids = ids[used_cols]
        chunks: list[_Chunk] = []
        n_genes = np.zeros(n_obs, dtype=np.int64)
        step = 4096
        pending_rows: list[int] = []
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def flush() -> None:
            width = max(1, max(len(g) for g, _ in pending))
            g = np.full((len(pending), width), -1, dtype=np.int64)
            c = np.zeros((len(pending), width), dtype=np.float32)
            for i, (gi, ci) in enumerate(pending):
                g[i, : len(gi)], c[i, : len(ci)] = gi, ci
            chunks.append(_Chunk(np.array(pending_rows, dtype=np.int64), g, c))
            pending_rows.clear()
            pending.clear()

        for start in range(0, n_obs, step):
            block = matrix[start : start + step]
            block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            block = block[:, used_cols]
            block.sort_indices()
            if block.data.size and (block.data < 0).any():
                raise ValueError("Expression values must be non-negative (raw counts or normalised/log1p values).")
            for r in range(block.shape[0]):
                lo, hi = block.indptr[r], block.indptr[r + 1]
                vals = block.data[lo:hi]
                keep = vals != 0
                cols = block.indices[lo:hi][keep]
                if cols.size == 0:
                    continue  # no expressed vocabulary gene: NaN row, like scgpt_hf.embed
                n_genes[start + r] = cols.size
                pending_rows.append(start + r)
                pending.append((col_ids[cols], vals[keep].astype(np.float32)))
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
        return chunks, n_genes

    def _run(self, model: str, chunks: list[_Chunk], batch_ids: np.ndarray | None, outputs: Sequence[str],
             concurrency: int, progress: bool) -> Iterator[tuple[_Chunk, dict[str, np.ndarray]]]:
        def one(chunk: _Chunk) -> tuple[_Chunk, dict[str, np.ndarray]]:
            inputs = {"gene_ids": chunk.gene_ids, "counts": chunk.counts}
            if batch_ids is not None:
                inputs["batch_labels"] = batch_ids[chunk.rows].astype(np.int64).reshape(-1, 1)
            return chunk, self.infer(model, inputs, outputs)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(c.rows) for c in chunks), desc=f"{model}", unit="cell")
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
                futures = [pool.submit(one, c) for c in chunks]
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        chunk, out = fut.result()
                        if bar is not None:
                            bar.update(len(chunk.rows))
                        yield chunk, out
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            if bar is not None:
                bar.close()

    def batch_ids(self, adata: Any, model: str, batch_key: str | None, as_ids: bool = False) -> np.ndarray | None:
        """Each cell's batch id for `model` from ``obs[batch_key]`` (names through the served model's batch2id;
        integer ids where it has none, or with `as_ids`), or None for a model without batch labels; raises
        ValueError, naming unknown batches, as :func:`scgpt_hf.embed` does, before anything is sent."""
        from .embedding import _batch_ids

        return _batch_ids(adata, _served_batches(self.model_config(model)), batch_key, as_ids)

    def _prepare(self, adata: Any, model: str, batch_size: int | None, layer: str | None, use_raw: bool,
                 gene_column: str | None, batch_key: str | None, batch_as_ids: bool
                 ) -> tuple[list[_Chunk], np.ndarray, np.ndarray, np.ndarray | None]:
        batch_ids = self.batch_ids(adata, model, batch_key, batch_as_ids)
        matrix, names = self._matrix(adata, layer, use_raw, gene_column)
        limit = self.max_batch_size(model)
        batch_size = int(batch_size or limit or 16)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if limit and batch_size > limit:
            raise ValueError(f"batch_size={batch_size} exceeds {model}'s max_batch_size={limit}.")
        ids = self.gene_ids(names)
        chunks, n_genes = self._chunks(matrix, ids, batch_size)
        return chunks, n_genes, ids, batch_ids

    def embed(
        self,
        adata: Any,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        key_added: str = DEFAULT_KEY,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        normalize: bool = True,
        progress: bool = False,
        batch_key: str | None = None,
        batch_as_ids: bool = False,
    ) -> Any:
        """Embed every cell of `adata` on the server; writes ``obsm[key_added]`` and ``obs[key_added + "_n_genes"]``.

        Cells with no expressed vocabulary gene are not sent and get NaN rows (n_genes 0), as in
        :func:`scgpt_hf.embed`; the others get the model's cell embedding, L2-normalised unless
        ``normalize=False``.  ``batch_size``: cells per request (default and maximum: the model's
        max_batch_size); ``concurrency``: requests in flight.  ``batch_key``: for models served with batch
        labels (e.g. a fine-tuned ``ScGPTForBatchIntegration``), the obs column of each cell's batch, as
        names of the model's batch2id (integer ids only where it has none, or with ``batch_as_ids=True``), as in
        :func:`scgpt_hf.embed`.
        """
        from .embedding import _check_storable

        _check_storable(key_added, DEFAULT_KEY, obsm=[key_added], obs=[f"{key_added}_n_genes"])
        chunks, n_genes, ids, batches = self._prepare(adata, self.embed_model, batch_size, layer, use_raw,
                                                      gene_column, batch_key, batch_as_ids)
        out: np.ndarray | None = None
        for chunk, res in self._run(self.embed_model, chunks, batches, ["cell_embedding", "n_genes"], concurrency,
                                    progress):
            emb = res["cell_embedding"].astype(np.float32)
            if out is None:
                out = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
            out[chunk.rows] = emb
        if out is None:
            raise ValueError("No cell expresses a gene of the model's vocabulary.")
        if normalize:
            done = n_genes > 0
            out[done] /= np.linalg.norm(out[done], axis=1, keepdims=True)
        adata.obsm[key_added] = out
        adata.obs[f"{key_added}_n_genes"] = n_genes
        adata.uns[f"{key_added}_params"] = {
            "server": self.url, "protocol": self.protocol, "model": self.embed_model, "normalized": bool(normalize),
            "batch_key": batch_key, "batch_as_ids": bool(batch_as_ids),
            "n_genes_matched": int((ids >= 0).sum()), "n_genes_total": int(ids.size),
            "n_cells_empty": int((n_genes == 0).sum()),
        }
        return adata

    def labels(self) -> list[str]:
        """The served classifier's class names in output order (the columns of ``probabilities``); cached.

        The repository keeps them inside ``scgpt_labels``, so they are asked of it with one-hot logits: row i
        of the identity is labelled with class i."""
        if self._labels is None:
            outputs = self.model_config(self.annotate_model).get("output", [])
            n = int(next(o for o in outputs if o["name"] == "probabilities")["dims"][0])
            step = self.max_batch_size(self.labels_model) or n
            names: list[str] = []
            for start in range(0, n, step):
                one_hot = np.eye(n, dtype=np.float32)[start:start + step]
                names += [_text(x) for x in self.infer(self.labels_model, {"logits": one_hot}, ["label"])["label"]
                          .reshape(-1)]
            self._labels = names
        return self._labels

    def annotate(
        self,
        adata: Any,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        key_added: str = "scGPT_label",
        embedding_key: str | None = None,
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        progress: bool = False,
        batch_key: str | None = None,
        batch_as_ids: bool = False,
    ) -> Any:
        """Predict cell types on the server (``scgpt_annotate``); ``batch_key``, ``batch_as_ids`` as in :meth:`embed`.

        Writes what :func:`scgpt_hf.annotate` writes: ``obs[key_added]`` (categorical over every class, in
        :meth:`labels` order; missing for cells with no vocabulary gene), ``obs[key_added + "_probability"]``,
        ``obs[key_added + "_n_genes"]``, ``obsm[key_added + "_probabilities"]`` (n_obs x n_classes, NaN rows
        for empty cells) and ``uns[key_added + "_params"]`` (server, model, labels, gene counts); with
        ``embedding_key``, also ``obsm[embedding_key]`` (L2-normalised cell embeddings, which the ensemble
        returns too) and ``obs[embedding_key + "_n_genes"]``.
        """
        import pandas as pd

        from . import __version__
        from .embedding import _check_storable

        _check_storable(key_added, "scGPT_label", obsm=[f"{key_added}_probabilities"],
                        obs=[key_added, f"{key_added}_probability", f"{key_added}_n_genes"])
        if embedding_key is not None:
            _check_storable(embedding_key, DEFAULT_KEY, obsm=[embedding_key], obs=[f"{embedding_key}_n_genes"])
        chunks, n_genes, ids, batches = self._prepare(adata, self.annotate_model, batch_size, layer, use_raw,
                                                      gene_column, batch_key, batch_as_ids)
        labels = self.labels()
        code_of = {name: i for i, name in enumerate(labels)}
        codes = np.full(adata.n_obs, -1, dtype=np.int64)
        prob = np.full(adata.n_obs, np.nan, dtype=np.float32)
        probs = np.full((adata.n_obs, len(labels)), np.nan, dtype=np.float32)
        emb: np.ndarray | None = None
        wanted = ["label", "probability", "probabilities", "cell_embedding"]
        for chunk, res in self._run(self.annotate_model, chunks, batches, wanted, concurrency, progress):
            if emb is None:
                emb = np.full((adata.n_obs, res["cell_embedding"].shape[1]), np.nan, dtype=np.float32)
            codes[chunk.rows] = [code_of[_text(x)] for x in res["label"].reshape(-1)]
            prob[chunk.rows] = res["probability"].reshape(-1)
            probs[chunk.rows] = res["probabilities"]
            emb[chunk.rows] = res["cell_embedding"]
        if emb is None:
            raise ValueError("No cell expresses a gene of the model's vocabulary.")
        adata.obs[key_added] = pd.Categorical.from_codes(codes, categories=labels)
        adata.obs[f"{key_added}_probability"] = prob
        adata.obs[f"{key_added}_n_genes"] = n_genes
        adata.obsm[f"{key_added}_probabilities"] = probs
        adata.uns[f"{key_added}_params"] = {
            "server": self.url, "protocol": self.protocol, "model": self.annotate_model, "labels": labels,
            "batch_key": batch_key, "batch_as_ids": bool(batch_as_ids),
            "n_genes_matched": int((ids >= 0).sum()), "n_genes_total": int(ids.size),
            "n_cells_empty": int((n_genes == 0).sum()), "scgpt_hf_version": str(__version__),
        }
        if embedding_key is not None:
            done = n_genes > 0
            emb[done] /= np.linalg.norm(emb[done], axis=1, keepdims=True)
            adata.obsm[embedding_key] = emb
            adata.obs[f"{embedding_key}_n_genes"] = n_genes
        return adata

    def close(self) -> None:
        """Close this thread's connection."""
        client = getattr(self._local, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
            self._local.client = None


# ----------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the main CLI's subparsers (`scgpt-hf serve MODEL|REPOSITORY_DIR`)."""
    p = subparsers.add_parser(
        "serve",
        help="start a Triton server on a model (PyTorch encoder, GPU or CPU) or a model repository",
        description=(
            "Start the Triton server shipped in nvidia-pytriton and print its endpoints; Ctrl-C stops it. MODEL (a "
            "model folder or Hub id): the encoder runs the PyTorch model on --device (bf16/fp16 autocast on GPUs, "
            "SDPA), behind the same tokenizer model, ensembles and wire format as exported repositories. "
            "REPOSITORY_DIR (written by `scgpt-hf export triton`): served as exported (CPU). Make the server "
            "environment once with `bash scripts/setup_triton_server.sh`."
        ),
    )
    p.add_argument("model", metavar="MODEL|REPOSITORY_DIR", help="model folder or Hub id, or a model repository")
    p.add_argument("--device", default=None, help="MODEL only: cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="MODEL only: autocast precision (auto: bf16 on GPUs that support it, fp16 on older, fp32 on CPU)")
    p.add_argument("--attn-implementation", default=None,
                   help="MODEL only: sdpa (default), eager, flex_attention or flash_attention_2 (needs flash-attn)")
    p.add_argument("--max-batch-size", type=int, default=None, help="MODEL only: cells per request (default 64 cuda, 16 cpu)")
    p.add_argument("--instances", type=int, default=None, help="MODEL only: encoder instances (default 1)")
    p.add_argument("--tokenizer-instances", type=int, default=None,
                   help="MODEL only: tokenizer instances (default 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="MODEL only: tokens per forward pass (default 65536 cuda, 4096 cpu)")
    p.add_argument("--queue-delay-us", type=int, default=None, help="MODEL only: dynamic batching queue delay")
    p.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="MODEL only: cap on each encoder instance's share of the GPU's memory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--server-env", default=None, help="virtualenv with nvidia-pytriton (default: .venv-triton)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(func=run_serve)
    return p


_MODEL_ONLY = ("device", "precision", "attn_implementation", "max_batch_size", "instances", "tokenizer_instances",
               "max_tokens", "queue_delay_us", "gpu_memory_fraction")


def run_serve(args: argparse.Namespace) -> int:
    """Handler of `scgpt-hf serve`: runs until Ctrl-C / SIGTERM / SIGHUP (the terminal closed), then stops the
    server; a failure raises, for the CLI to print as one line."""
    from .cli import CommandError

    server: TritonServer | None = None
    server_args = dict(server_env=args.server_env, host=args.host, http_port=args.http_port,
                       grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=args.log_verbose)
    try:
        if is_repository(args.model):
            given = [f"--{k.replace('_', '-')}" for k in _MODEL_ONLY if getattr(args, k) is not None]
            if given:
                raise ValueError(
                    f"{args.model} is an exported repository, served as it was exported (CPU); {', '.join(given)} "
                    "apply to a MODEL folder or Hub id, whose PyTorch encoder runs on --device: serve the model "
                    "itself, or re-export the repository with other settings."
                )
            server = TritonServer(args.model, **server_args)
        else:
            server = TritonServer.for_model(
                args.model, device=args.device, precision=args.precision or "auto",
                attn_implementation=args.attn_implementation or "sdpa", max_batch_size=args.max_batch_size,
                instances=args.instances or 1, tokenizer_instances=args.tokenizer_instances or 1,
                max_tokens=args.max_tokens,
                max_queue_delay_microseconds=args.queue_delay_us, gpu_memory_fraction=args.gpu_memory_fraction,
                **server_args,
            )
        server.start()
    except (NotImplementedError, RuntimeError) as err:
        # A server that failed to start puts its log's tail in the message: the one line names the log instead.
        log = f"; its log, {server.log_path}, says why" if server is not None and server.log_path else ""
        raise CommandError(str(err).splitlines()[0].rstrip(":") + log) from err
    print(f"Triton ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.host}:{server.metrics_port}; "
          f"log {server.log_path}. Ctrl-C stops it.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and server.process is not None and server.process.poll() is None:
            stop.wait(0.5)
    finally:
        code = server.stop()
    if not stop.is_set():
        raise CommandError(f"tritonserver stopped by itself (exit code {code}); its log, {server.log_path}, says why.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: `python -m scgpt_hf.serving MODEL|REPOSITORY_DIR ...`, the same as `scgpt-hf serve`."""
    from .cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(argv if argv[:1] == ["serve"] else ["serve", *argv])


if __name__ == "__main__":
    sys.exit(main())
