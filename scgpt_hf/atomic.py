"""Write outputs so that a failure or a kill at any moment never leaves a half-written target.

Every command that writes a user's file or folder (converted checkpoints, ``embed`` outputs, ONNX and
Triton exports, pretraining folders) goes through :func:`atomic_output`: the output is built in a
sibling staging path (same directory, so the final rename never crosses a file system), checked by the
caller, and only then moved into place. A file is replaced with ``os.replace``; a folder that already
exists is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` call where Linux offers it,
so the target path always holds either the complete old output or the complete new one. Where the
exchange is unavailable, the old folder is first renamed to a recorded backup and restored by the next
run (:func:`recover`) if a kill falls between the two renames.

Existing outputs are replaced only when the caller passes ``overwrite=True`` (the CLI's ``--overwrite``),
and :func:`check_writable` lets commands refuse an unwritable location before any compute.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OutputExistsError", "OutputNotWritableError", "atomic_output", "check_writable", "recover"]

_STAGING_PREFIX = ".scgpt-tmp-"
_BACKUP_PREFIX = ".scgpt-old-"
_RENAME_EXCHANGE = 2  # linux/fs.h


class OutputExistsError(FileExistsError):
    """The output already exists and the caller did not ask to overwrite it."""


class OutputNotWritableError(PermissionError):
    """The output cannot be written (its directory is missing, read-only, or the target is read-only)."""


def _sibling(target: Path, prefix: str) -> Path:
    return target.with_name(f"{prefix}{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def check_writable(target: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse, before any compute, an output that exists (unless ``overwrite``) or cannot be written.

    Returns the target as an absolute ``Path``. Also restores a backup left by an earlier run that was killed
    between the two renames of a folder replacement (see :func:`recover`).
    """
    target = Path(target).expanduser().absolute()
    recover(target)
    parent = target.parent
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"{what} {target} already exists: pass --overwrite (overwrite=True) to replace it, or choose "
                "another path."
            )
        if not os.access(target, os.W_OK) or (target.is_dir() and not os.access(target, os.X_OK)):
            raise OutputNotWritableError(f"{what} {target} is not writable: fix its permissions or choose another path.")
    if not parent.is_dir():
        raise OutputNotWritableError(
            f"the directory {parent} for {what} {target.name} does not exist: create it first or choose another path."
        )
    probe = _sibling(target, _STAGING_PREFIX)  # os.access says yes to root everywhere: try a real write
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise OutputNotWritableError(
            f"cannot write {what} into {parent} ({err.strerror or err}): choose a writable location."
        ) from None
    return target


def _libc_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush the staged output's data before it becomes visible, so a power loss cannot expose empty files."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with contextlib.suppress(OSError), open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            _fsync_dir(d)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(target: str | os.PathLike) -> None:
    """Restore ``target`` from a backup left by a run killed mid-replacement; drop stale staging paths.

    Only paths this module created next to ``target`` (``.scgpt-tmp-NAME.*`` / ``.scgpt-old-NAME.*``) are
    touched, and only those of processes that are no longer running.
    """
    target = Path(target).expanduser().absolute()
    parent = target.parent
    if not parent.is_dir():
        return
    for prefix in (_BACKUP_PREFIX, _STAGING_PREFIX):
        for leftover in parent.glob(f"{prefix}{target.name}.*"):
            pid = leftover.name[len(prefix) + len(target.name) + 1:].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            if prefix == _BACKUP_PREFIX and not (target.exists() or target.is_symlink()):
                os.replace(leftover, target)  # killed between the two renames: the old output comes back
            else:
                _remove(leftover)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(staging: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return
    if staging.is_dir() != target.is_dir():
        kind = "folder" if target.is_dir() else "file"
        raise OutputExistsError(f"{target} is a {kind}; the new output is not: remove it or choose another path.")
    if not staging.is_dir():
        os.replace(staging, target)  # atomic for files
        return
    if _libc_exchange(staging, target):
        _remove(staging)  # now holds the old output
        return
    backup = _sibling(target, _BACKUP_PREFIX)
    os.rename(target, backup)
    os.rename(staging, target)
    _remove(backup)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, overwrite: bool = False, directory: bool = False,
                  what: str = "output") -> Iterator[Path]:
    """Yield a staging path beside ``target``; move it into place only if the block finishes without error.

    ``directory=True`` creates the staging path as an empty folder (for model and export folders); otherwise
    the block creates the staging file itself. On an exception the staging path is removed and ``target`` is
    untouched. Validate the staged output inside the block: whatever leaves it normally is published.
    """
    target = check_writable(target, overwrite=overwrite, what=what)
    staging = _sibling(target, _STAGING_PREFIX)
    if directory:
        staging.mkdir()
    try:
        yield staging
        if not (staging.exists() or staging.is_symlink()):
            raise FileNotFoundError(f"nothing was written to the staging path {staging} for {target}")
        _fsync_tree(staging)
        # check again: another process may have created the target while this one computed
        if not overwrite and (target.exists() or target.is_symlink()):
            raise OutputExistsError(f"{what} {target} appeared while this run was writing: not replacing it.")
        _commit(staging, target)
        _fsync_dir(target.parent)
    finally:
        _remove(staging)
