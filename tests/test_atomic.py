"""scgpt_hf.atomic: a kill at any moment leaves the previous output byte for byte, never a half-written one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scgpt_hf import atomic
from scgpt_hf.atomic import OutputExistsError, OutputNotWritableError, atomic_output, check_writable

# A child that replaces a folder of 20 files, announcing each step on stdout and pausing between files,
# so the parent can kill it before, during and after the write. EXCHANGE=0 forces the two-rename fallback.
WRITER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[3])  # the module alone: no package import
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    target, exchange = sys.argv[1], sys.argv[2] == "1"
    if not exchange:
        atomic._libc_exchange = lambda a, b: False
    print("start", flush=True)
    with atomic.atomic_output(target, overwrite=True, directory=True) as tmp:
        for i in range(20):
            (tmp / f"part{i}.bin").write_bytes(bytes([i % 256]) * 100_000)
            print(f"file {i}", flush=True)
            time.sleep(0.02)
        print("staged", flush=True)
        if not exchange:
            real_rename = atomic.os.rename
            def slow_rename(a, b):
                real_rename(a, b)
                print("renamed", flush=True)
                time.sleep(0.5)   # the window between the two renames of the fallback
            atomic.os.rename = slow_rename
    print("done", flush=True)
""")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_output(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    (folder / "config.json").write_text('{"old": true}')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return _snapshot(folder)


def _kill_at(target: Path, marker: str, exchange: bool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "1" if exchange else "0", atomic.__file__],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == marker:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
@pytest.mark.parametrize("marker", ["start", "file 7", "staged", "renamed", "done"])
def test_kill_leaves_old_output_or_new_one_whole(tmp_path: Path, exchange: bool, marker: str) -> None:
    if marker == "renamed" and exchange:
        pytest.skip("the exchange is one system call: there is no window between renames")
    target = tmp_path / "model"
    old = _old_output(target)
    _kill_at(target, marker, exchange)
    atomic.recover(target)  # what the next run does first (check_writable calls it)
    got = _snapshot(target)
    new = {f"part{i}.bin": bytes([i % 256]) * 100_000 for i in range(20)}
    assert got == (new if marker == "done" else old), f"killed at {marker!r}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    assert leftovers == [], leftovers


def test_completed_replacement_and_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "out.h5ad"
    target.write_bytes(b"old")
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]


def test_error_inside_block_keeps_old_output(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    old = _old_output(target)
    with pytest.raises(ValueError, match="validation failed"), \
            atomic_output(target, overwrite=True, directory=True) as tmp:
        (tmp / "config.json").write_text("{}")
        raise ValueError("validation failed")
    assert _snapshot(target) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out.h5ad"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_writable(target)
    assert target.read_bytes() == b"old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_location_refused_before_compute(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputNotWritableError, match="writable"):
            check_writable(ro / "out.h5ad")
    finally:
        ro.chmod(0o700)


def test_unwritable_file_system_refused_even_for_root() -> None:
    """/proc takes no new files, whoever asks: the check tries a real write instead of trusting os.access."""
    with pytest.raises(OutputNotWritableError, match="cannot write output into /proc"):
        check_writable("/proc/scgpt-out.h5ad")


def test_missing_parent_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputNotWritableError, match="does not exist"):
        check_writable(tmp_path / "nope" / "out.h5ad")


def test_file_cannot_replace_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    old = _old_output(target)
    with pytest.raises(OutputExistsError, match="is a folder"), atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"x")
    assert _snapshot(target) == old


def test_live_writer_staging_is_not_removed(tmp_path: Path) -> None:
    """recover() leaves the staging path of a process that is still running alone."""
    target = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        staging = tmp_path / f".scgpt-tmp-model.{proc.pid}.abcdef12"
        staging.mkdir()
        atomic.recover(target)
        assert staging.exists()
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.05)
    atomic.recover(target)
    assert not staging.exists()
