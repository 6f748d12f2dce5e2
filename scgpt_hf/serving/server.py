"""Local Triton server: the launcher behind `scgpt-hf serve MODEL|REPOSITORY_DIR`.

:class:`TritonServer` starts the Triton server shipped in the ``nvidia-pytriton`` wheel (a real
Triton 2.51, python backend, CPU capable) on a model repository written by
``scgpt-hf export triton``, with the environment it needs; :meth:`TritonServer.for_model` serves a
model folder or Hub id with a PyTorch encoder on a GPU (or the CPU) behind the same tokenizer model
and ensembles.  The server gets its own virtual environment (numpy<2: the python backend stub corrupts
numpy 2 arrays): ``bash scripts/setup_triton_server.sh`` makes ``.venv-triton``; a PyTorch encoder
borrows torch and transformers from the environment that starts the server.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..constants import INFERENCE_PRECISIONS

logger = logging.getLogger(__name__)


#: Environment variable listing the folders a PyTorch encoder's stub appends to sys.path (TritonServer python_path).
PYTHON_PATH_VAR = "SCGPT_HF_PYTHON_PATH"
#: Environment variable naming the server's virtual environment (see find_server_env).
SERVER_ENV_VAR = "SCGPT_HF_TRITON_ENV"


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

    Looked for in this order: `server_env` (``--server-env``), ``$SCGPT_HF_TRITON_ENV``, ``.venv-triton`` in the
    current working directory (where ``bash scripts/setup_triton_server.sh`` makes it when run from a checkout's
    root), then the running interpreter's own environment; where scgpt_hf itself is installed does not matter.
    A folder named by the argument or the variable that holds no Triton server is an error, never skipped.
    Raises FileNotFoundError saying how to make one.
    """
    for given, what in ((server_env, "--server-env"), (os.environ.get(SERVER_ENV_VAR), f"${SERVER_ENV_VAR}")):
        if given:
            if not _has_server(Path(given)):
                raise FileNotFoundError(
                    f"{what} {given} holds no Triton server (no lib/python3*/site-packages/pytriton/tritonserver): "
                    "make it with `bash scripts/setup_triton_server.sh DIR` (nvidia-pytriton==0.7.0, numpy<2)."
                )
            return Path(given)
    for found in (Path.cwd() / ".venv-triton", Path(sys.prefix)):
        if _has_server(found):
            return found
    raise FileNotFoundError(
        "No Triton server environment found: run `bash scripts/setup_triton_server.sh` (makes .venv-triton with "
        f"nvidia-pytriton==0.7.0 and numpy<2) in this folder, or point ${SERVER_ENV_VAR} / --server-env at such a "
        "virtualenv."
    )


def _has_server(env: Path) -> bool:
    return any(env.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))


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
        guard = [str(self.env / "bin" / "python"), "-I", str(Path(__file__).parent.parent / "process_guard.py"),
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
        **options: Any,
    ) -> TritonServer:
        """A server (not started) whose encoder runs `model` (a folder or Hub id) in PyTorch on `device`.

        Writes a repository with :func:`scgpt_hf.export.triton.write_torch_repository` into a temporary
        folder the server removes when it stops; the stubs import this environment's torch and transformers
        (:func:`python_paths`) after the server environment's numpy<2.  Before anything is written, checks
        that the ports are free and that the server's Python can run the model there: torch imports, CUDA is
        visible for ``device="cuda"``, the attention implementation runs on that device.  `device` defaults
        to "cuda" when this process sees a GPU, else "cpu".  Other `options` go to :class:`TritonServer` where
        it takes them (server_env, host, ports, log settings, python_path) and to `write_torch_repository`
        otherwise (max_batch_size, instances, tokenizer_instances, max_tokens, max_queue_delay_microseconds,
        gpu_memory_fraction, ...).
        """
        from scgpt_hf.export.triton import check_torch_settings, write_torch_repository

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_torch_settings(device, precision, attn_implementation)
        takes = set(inspect.signature(cls.__init__).parameters) - {"self", "repository"}
        server_args = {name: options.pop(name) for name in list(options) if name in takes}
        server_args.setdefault("python_path", python_paths())
        owned = tempfile.TemporaryDirectory(prefix="scgpt_torch_repo_")
        try:
            server = cls(Path(owned.name) / "repository", **server_args)
            server._owned = owned
            server.check_ports()
            server._check_runtime(device, attn_implementation)
            write_torch_repository(_model_folder(model), server.repository, device=device, precision=precision,
                                   attn_implementation=attn_implementation, **options)
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
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default=None,
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
    p.add_argument("--server-env", default=None, help="virtualenv with nvidia-pytriton (default: $SCGPT_HF_TRITON_ENV, "
                   "else .venv-triton in the current folder, else this Python's environment)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(func=run_serve)
    return p


_MODEL_ONLY = ("device", "precision", "attn_implementation", "max_batch_size", "instances", "tokenizer_instances",
               "max_tokens", "queue_delay_us", "gpu_memory_fraction")


def run_serve(args: argparse.Namespace) -> int:
    """Handler of `scgpt-hf serve`: runs until Ctrl-C / SIGTERM / SIGHUP (the terminal closed), then stops the
    server; a failure raises, for the CLI to print as one line."""
    from ..cli import CommandError

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
            options = {name: getattr(args, name) for name in _MODEL_ONLY if getattr(args, name) is not None}
            if "queue_delay_us" in options:
                options["max_queue_delay_microseconds"] = options.pop("queue_delay_us")
            server = TritonServer.for_model(args.model, **options, **server_args)
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
    from ..cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(argv if argv[:1] == ["serve"] else ["serve", *argv])


if __name__ == "__main__":
    sys.exit(main())
