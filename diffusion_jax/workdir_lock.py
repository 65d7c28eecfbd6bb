"""One ``train`` process per workdir: a lock file holding the host and pid of its holder.

Taken before anything is written, released on exit (however the run ends), and stale when its
process is gone (checked on the same host; a lock of another host is taken as held). Multi-host
runs take it on process 0 only.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``WORKDIR/train.lock`` for the block; WorkdirLocked (one line naming the holder) if
    a live process holds it. ``enabled=False`` (processes other than 0) does nothing."""
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _read(path)
            if holder is not None and _alive(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise WorkdirLocked(
                    f"{workdir} is in use by another train process (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {since}); wait for it, or use another --workdir. "
                    f"If that process is gone, delete {path}."
                ) from None
            logging.warning("Removing the stale lock %s (%s: no such process).", path, holder)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        if _read(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
