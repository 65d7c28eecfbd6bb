"""Files written for a person (samples, figures, metrics, prepared sets, imported runs): written
beside their final path and renamed into place, so that a kill or a full disk leaves the previous
file whole.

``atomic_path(path)`` gives the temporary name ``PATH.tmp-PID`` to write (a file or a folder)
and renames it to ``path`` when the block ends without an error; on an error it is removed, and
an OSError (ENOSPC, EROFS, ...) becomes one ``WriteError`` naming the file and the cause. Before
writing, the temporaries of ``path`` that a dead process left (``PATH.tmp-PID`` whose PID no
longer runs) are removed: the next run of the same command cleans up after a ``kill -9``.
Standard library only, so that every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from collections.abc import Iterator
from typing import IO

__all__ = ["WriteError", "atomic_path", "atomic_write", "remove_stale", "write_errors"]


class WriteError(OSError):
    """A file could not be written: its path and the cause in one line; the previous file, if
    any, is kept."""

    def __init__(self, path: str, cause: OSError):
        name = errno.errorcode.get(cause.errno or 0, "")
        reason = cause.strerror or " ".join(str(cause).split()) or type(cause).__name__
        super().__init__(
            cause.errno,
            f"cannot write {path}: {reason}{f' ({name})' if name else ''}; "
            "any previous version of it is kept.",
        )
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale(path: str, tags: tuple[str, ...] = ("tmp",)) -> list[str]:
    """Remove ``PATH.TAG-PID`` (files or folders) whose process ``PID`` is not running; returns
    what was removed. Temporaries of a live process (another run writing now) are left."""
    removed = []
    for tag in tags:
        for candidate in glob.glob(glob.escape(path) + f".{tag}-*"):
            pid = candidate.rpartition("-")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _remove(candidate)
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def write_errors(path: str) -> Iterator[None]:
    """An OSError raised in the block becomes a WriteError naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield ``PATH.tmp-PID`` to write; rename it to ``path`` when the block succeeds (replacing
    a file; a folder ``path`` is moved aside first and removed after). On any error or
    interruption the temporary is removed and ``path`` is left as it was; an OSError is raised
    as a WriteError naming ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with write_errors(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        remove_stale(path, ("tmp", "old"))
        _remove(tmp)
        try:
            yield tmp
            if os.path.isdir(tmp) and os.path.isdir(path):
                old = f"{path}.old-{os.getpid()}"
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except OSError:
                    os.rename(old, path)
                    raise
                _remove(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """``open(PATH.tmp-PID, mode)`` for the block, flushed to disk and renamed to ``path``
    (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
