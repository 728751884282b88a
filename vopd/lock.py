"""An exclusive lock on a run directory, so two processes never write one run at once.

    with run_lock("results/toy/vopd/seed0", "vopd.train"):
        ...  # a second trainer on the same directory raises RunDirInUse, naming this process

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``, which holds the holder's pid, host and start
time (for the error message only: the kernel's lock is the truth). The kernel releases a flock
when its process dies, however it dies, so a lock left by a killed run never blocks the rerun
that resumes it. On release the file is removed (and the directory too, if this lock created it
and nothing else was written into it: a run that fails its checks leaves nothing behind).
flock works on local file systems and on NFS (Linux emulates it with NFS byte-range locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirInUse(OSError):
    """Another live process holds the run directory's lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    what, pid, host = info.get("what", "a process"), info.get("pid"), info.get("host")
    return f"{what} (pid {pid} on host {host}, since {since})"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str = "vopd.train") -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` for the block (created if missing); raise
    :class:`RunDirInUse` naming the holder if a live process holds it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUse(
                f"run directory {run_dir} is in use by {_holder(path)}: wait for it to finish or "
                f"stop it, then rerun (a killed run's lock is released automatically)"
            ) from None
        # the holder before us may have removed the file after we opened it: lock the live one
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked: a waiter re-checks the inode (above)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: the run wrote nothing
