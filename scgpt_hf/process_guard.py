"""Run a server as the child of a guard that dies with its parent and removes the server's temporary folders.

``python -I process_guard.py PARENT_PID FOLDER ... -- COMMAND ...`` (run by path, standard library only, so it starts
in milliseconds and without scgpt_hf's imports). Linux sends the guard SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), whatever killed the parent, SIGKILL included; COMMAND gets the same tie to the guard. When
asked to stop (SIGTERM, SIGINT, SIGHUP) or when its parent dies, the guard sends COMMAND SIGTERM, SIGKILLs its
process group after ``GRACE_S`` seconds if it lingers (its children, e.g. Triton's python backend stubs, share
it), then removes the FOLDERs; it does the same when COMMAND exits by itself, and exits with COMMAND's exit code.
`scgpt_hf.serving.TritonServer` starts tritonserver this way, so that no server or temporary folder outlives
``scgpt-hf serve``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
GRACE_S = 15.0  # tritonserver drains in --exit-timeout-secs (5 s) and then unloads its models
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send this process `sig` when the thread that started it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(parent: int, folders: list[str], command: list[str]) -> int:
    """Run `command` until it exits or the guard is told to stop; remove `folders`; return its exit code."""
    stop_at: list[float] = []
    child: subprocess.Popen | None = None

    def request_stop(signum: int, frame: object) -> None:
        if not stop_at:
            stop_at.append(time.monotonic())
            if child is not None:
                child.send_signal(signal.SIGTERM)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, request_stop)
    _die_with_parent(signal.SIGTERM)
    code = 1
    try:
        if os.getppid() != parent:  # the parent died before the tie above was made
            return code
        child = subprocess.Popen(command, start_new_session=True, preexec_fn=lambda: _die_with_parent(signal.SIGTERM))
        if stop_at:  # a stop request arrived while the child was being started
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop_at and time.monotonic() - stop_at[0] > GRACE_S:
                    _kill_group(child.pid)
        deadline = time.monotonic() + GRACE_S  # what the command started (its process group) goes with it
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill_group(child.pid)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    """``PARENT_PID FOLDER ... -- COMMAND ...``"""
    split = argv.index("--")
    return run(int(argv[0]), argv[1:split], argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
