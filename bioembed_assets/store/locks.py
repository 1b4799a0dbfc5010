"""Inter-process locks on files (`flock`): one writer of a target at a time.

The kernel drops an `flock` when its holder dies, so a writer killed with `kill -9` never leaves a
lock behind, and a lock file's mere existence means nothing (lock files are never deleted: deleting
one while another process waits on it would let two writers in).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class LockTimeout(TimeoutError):
    """Another live process held the lock for longer than the caller would wait."""


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, *, timeout: float | None = None,
              on_wait: Callable[[str], None] | None = None, poll: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block.

    If another process holds it, `on_wait` is told once ("waiting for <what> ...") and the call
    waits, up to `timeout` seconds (None: as long as it takes), then raises `LockTimeout`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for {what}: another process holds {path}")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise LockTimeout(f"gave up waiting {timeout:.0f} s for {what}: another process "
                                          f"holds {path}") from None
                    time.sleep(poll)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
