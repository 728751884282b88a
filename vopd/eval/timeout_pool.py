"""A worker-process pool with a hard per-task timeout: no single task can hang the caller.

Why not ``math_verify``'s own timeout: math-verify 0.9 times out with ``signal.alarm`` (whole
seconds, main thread only), and a signal handler only runs between Python bytecodes, so a
comparison stuck inside a C routine (a huge integer power in gmpy, a regex) is never interrupted.

Two layers here:

1. **soft**: each worker arms ``setitimer(ITIMER_REAL, soft_timeout_s)`` around one task; the
   handler raises :class:`SoftTimeout` (a ``BaseException``, so library ``except Exception``
   clauses do not swallow it). The worker survives and takes the next task.
2. **hard**: the parent waits on the workers' pipes with a deadline of ``hard_timeout_s`` per
   task; a worker past it is SIGKILLed and replaced. Nothing a task does can block the parent.

Either way the task's result is ``Outcome(value=None, timed_out=True)``. Workers are plain
``python -c`` subprocesses (not multiprocessing: they never re-import the caller's ``__main__``,
inherit no threads or locks, and see the caller's ``sys.path``). A replacement after a kill costs
one interpreter start-up (about a second with sympy), which is not charged to any task.

Usage::

    with TimeoutPool(fn, workers=2, soft_timeout_s=5.0) as pool:
        outcomes = pool.map([(a1, b1), (a2, b2), ...])   # fn(*args) per task, order kept
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

# ---------------------------------------------------------------------------------------------
# Results


class SoftTimeout(BaseException):
    """Raised inside a worker when its task exceeds the soft time budget."""


@dataclass(frozen=True)
class Outcome:
    value: Any = None
    timed_out: bool = False
    error: str | None = None  # repr of an exception the task raised (the task counts as failed)


# ---------------------------------------------------------------------------------------------
# Worker side (a fresh ``python -c`` process; see _Worker)


def _on_alarm(signum, frame):
    raise SoftTimeout()


def _resolve(ref: str) -> Callable:
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(read_fd: int, write_fd: int, ref: str, soft_timeout_s: float, warmup) -> None:
    """Serve tasks from the parent until it sends None or closes the pipe."""
    conn_in, conn_out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fn = _resolve(ref)
    if warmup is not None:  # lazy imports and caches, before any task's clock starts
        with contextlib.suppress(Exception):
            fn(*warmup)
    conn_out.send(("ready", None))
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tid, args = msg
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            try:
                out = Outcome(value=fn(*args))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SoftTimeout:
            out = Outcome(timed_out=True)
        except Exception as e:
            out = Outcome(error=f"{type(e).__name__}: {e}"[:500])
        try:
            conn_out.send((tid, out))
        except (BrokenPipeError, OSError):
            return


# ---------------------------------------------------------------------------------------------
# Parent side


class _Worker:
    """One ``python -c`` child talking over two pipes. A plain subprocess (not multiprocessing):
    the child never re-imports the caller's ``__main__`` and inherits no threads or locks."""

    def __init__(self, ref: str, soft_timeout_s: float, warmup: tuple | None):
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        code = (
            "import ast, sys; from vopd.eval.timeout_pool import _worker_main; "
            "_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), "
            "ast.literal_eval(sys.argv[5]))"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                str(p2c_r),
                str(c2p_w),
                ref,
                repr(soft_timeout_s),
                repr(warmup),
            ],
            pass_fds=(p2c_r, c2p_w),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        os.close(p2c_r)
        os.close(c2p_w)
        self.send_conn = Connection(p2c_w, readable=False)
        self.conn = Connection(c2p_r, writable=False)
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            self.proc.kill()
        self.proc.wait(timeout=5)
        self.send_conn.close()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.send_conn.send(None)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.send_conn.close()
        self.conn.close()


class TimeoutPool:
    """Run ``fn(*args)`` for many ``args`` in ``workers`` processes, each task bounded in time.

    ``fn`` must be importable by name (a module-level function). ``hard_timeout_s`` defaults to
    ``2 * soft_timeout_s + 1``: the slack covers a slow soft-timeout unwind. A worker's start-up
    (interpreter + imports, about a second with sympy, + one untimed ``fn(*warmup)``) is not
    charged to any task.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        workers: int = 2,
        soft_timeout_s: float = 5.0,
        hard_timeout_s: float | None = None,
        startup_timeout_s: float = 120.0,
        warmup: tuple | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers={workers}: expected >= 1")
        if soft_timeout_s <= 0:
            raise ValueError(f"soft_timeout_s={soft_timeout_s}: expected > 0")
        self.ref = f"{fn.__module__}:{fn.__qualname__}"
        if "<" in self.ref:
            raise ValueError(f"{self.ref}: the task function must be importable by name")
        self.workers = workers
        self.soft_timeout_s = float(soft_timeout_s)
        self.hard_timeout_s = float(hard_timeout_s or 2 * soft_timeout_s + 1)
        self.startup_timeout_s = startup_timeout_s
        self.warmup = warmup  # literal args for one untimed call at start-up (imports, caches)
        self._pool: list[_Worker] = []
        self.num_killed = 0

    def __enter__(self) -> TimeoutPool:
        self._pool = [
            _Worker(self.ref, self.soft_timeout_s, self.warmup) for _ in range(self.workers)
        ]
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._pool:
            w.stop()
        self._pool = []

    def _await_ready(self, w: _Worker) -> None:
        """Block until a (re)started worker has imported ``fn``; fail loudly if it cannot."""
        if w.ready:
            return
        if not w.conn.poll(self.startup_timeout_s):
            w.kill()
            raise RuntimeError(
                f"grading worker for {self.ref} did not start within {self.startup_timeout_s:.0f} s"
            )
        try:
            w.conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(
                f"grading worker for {self.ref} exited during start-up (exit code "
                f"{w.proc.wait()}); see its traceback above"
            ) from e
        w.ready = True

    def map(self, tasks: Sequence[tuple], progress: Callable[[int], None] | None = None):
        """Return one :class:`Outcome` per task, in task order. ``progress(k)`` is called with
        the number of tasks finished since the last call."""
        if not self._pool:
            raise RuntimeError("TimeoutPool.map outside its `with` block")
        results: list[Outcome | None] = [None] * len(tasks)
        todo = collections.deque(range(len(tasks)))
        busy: dict[Connection, _Worker] = {}
        idle = list(self._pool)

        while todo or busy:
            while todo and idle:
                w = idle.pop()
                self._await_ready(w)
                tid = todo.popleft()
                w.task, w.deadline = tid, time.monotonic() + self.hard_timeout_s
                w.send_conn.send((tid, tasks[tid]))
                busy[w.conn] = w
            next_deadline = min(w.deadline for w in busy.values())
            ready = wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic()))
            done = 0
            for conn in ready:
                w = busy.pop(conn)
                try:
                    tid, out = conn.recv()
                except (EOFError, OSError):  # the worker died (e.g. killed for memory)
                    tid, out = w.task, Outcome(error="grading worker process died")
                    w = self._replace(w)
                results[tid] = out
                w.task = None
                idle.append(w)
                done += 1
            now = time.monotonic()
            for conn, w in list(busy.items()):
                if w.deadline <= now:  # hard timeout: the task ignored the soft alarm
                    busy.pop(conn)
                    results[w.task] = Outcome(timed_out=True)
                    self.num_killed += 1
                    idle.append(self._replace(w))
                    done += 1
            if progress and done:
                progress(done)
        return results

    def _replace(self, dead: _Worker) -> _Worker:
        dead.kill()
        fresh = _Worker(self.ref, self.soft_timeout_s, self.warmup)
        self._pool[self._pool.index(dead)] = fresh
        return fresh
