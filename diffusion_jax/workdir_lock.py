"""One ``train`` process per workdir: ``WORKDIR/train.lock``, an exclusive ``flock`` on the file,
which also names the host and pid of its holder.

Taken before anything is written, released on exit however the run ends (the kernel drops the
flock of a process that dies, so a lock is never stale). Taking it is one atomic step: two
processes starting together cannot both hold it, whatever the file holds at that moment (even
nothing yet). A lock file naming a live process of this host, or another host, that holds no
flock (a run of an earlier version, or a file system without flock between hosts) is taken as
held too. Multi-host runs take it on process 0 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

LOCK_NAME = "train.lock"


class WorkdirLocked(ValueError):
    """Another live process holds the workdir's lock."""


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: its pid exists on this host, or it is another host's."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    return True


def _refuse(workdir: str, path: str, holder: dict | None) -> WorkdirLocked:
    holder = holder or {}
    since = holder.get("since")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, int | float)
        else "just now"
    )
    return WorkdirLocked(
        f"{workdir} is in use by another train process (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {when}); wait for it, or use another --workdir. "
        f"If that process is gone, delete {path}."
    )


def _lock(path: str) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock, or None if another process holds
    it. Retries when the holder removed the file between our open and our flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``WORKDIR/train.lock`` for the block; WorkdirLocked (one line naming the holder) if
    another process holds it. ``enabled=False`` (processes other than 0) does nothing."""
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = _lock(path)
    if fd is None:
        raise _refuse(workdir, path, _read(path))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    try:
        before = _read(path)
        if before is not None and before.get("pid") != me["pid"] and _alive(before):
            raise _refuse(workdir, path, before)
        if before is not None:
            logging.warning("Taking over the lock %s left by %s (no such process).", path, before)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # while holding the flock: no one else can hold this file
    finally:
        os.close(fd)
