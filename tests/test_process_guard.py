"""scgpt_hf.process_guard: a server started through it never outlives its parent, and its folders go with it.

The "server" here is `sleep`, the parent a real Python process: quick, and the same mechanism
`scgpt-hf serve` uses for tritonserver (tests/test_triton.py checks that with a real server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scgpt_hf import process_guard

# A parent that starts `sleep` through the guard, prints the guard's pid and waits to be signalled.
PARENT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    for sig in (signal.SIGHUP, signal.SIGTERM):  # dies of them, even under `nohup` (which ignores SIGHUP)
        signal.signal(sig, signal.SIG_DFL)
    guard, folder = sys.argv[1], sys.argv[2]
    proc = subprocess.Popen([sys.executable, "-I", guard, str(os.getpid()), folder, "--", "sleep", "600"],
                            start_new_session=True)
    print(proc.pid, flush=True)
    if sys.argv[3] == "wait":
        proc.wait()
        print("guard exited", proc.returncode, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_until(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int, int, Path]:
    folder = tmp_path / "server_tmp"
    (folder / "backends").mkdir(parents=True)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, process_guard.__file__, str(folder), mode],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    guard = int(parent.stdout.readline())
    assert _wait_until(lambda: bool(_children(guard)), 10), "the guard started no server"
    (server,) = _children(guard)
    return parent, guard, server, folder


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
def test_server_and_folders_go_when_the_parent_dies(tmp_path, sig):
    parent, guard, server, folder = _start(tmp_path, "sleep")
    try:
        parent.send_signal(sig)
        parent.wait(timeout=10)
        assert _wait_until(lambda: not _alive(guard) and not _alive(server)), "the server outlived its parent"
        assert not folder.exists(), "the server's folder outlived it"
    finally:
        for pid in (server, guard):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.kill()


def test_stop_request_and_server_exit_end_the_guard_with_the_servers_code(tmp_path):
    parent, guard, server, folder = _start(tmp_path, "wait")
    try:
        os.kill(guard, signal.SIGTERM)  # what TritonServer.stop sends
        assert parent.stdout is not None
        assert parent.stdout.readline().split() == ["guard", "exited", str(128 + signal.SIGTERM)]  # sleep's death
        assert not _alive(server) and not folder.exists()
    finally:
        parent.kill()
        parent.wait()
