"""Run-directory I/O: atomic writes, JSONL metrics, and the environment a run ran in.

Every file a later stage reads is written to a temporary name in the same folder and renamed
into place (``os.replace`` is atomic on POSIX), so a killed job never leaves a file that looks
complete. JSONL appends are flushed and fsynced line by line; a torn last line is dropped on read.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "vopd",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "pandas",
    "pyarrow",
    "snakemake",
    "math-verify",
    "vllm",
    "lm-eval",
    "numpy",
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write (e.g. no space left) names no file
            raise OSError(e.errno, f"{e.strerror or e} (writing {path})") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write a probe file into it: an OSError that names the
    folder (read-only, a file in the way, no space), before any long work starts. (Permission
    bits alone do not tell: root writes into read-only directories.)"""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        error = OSError(f"cannot write into {folder}: {e.strerror or e}")
        error.errno = e.errno
        raise error from None


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | Path, df) -> None:
    """Write a pandas DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line, flushed and fsynced; a failed write names ``path``."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, f"{e.strerror or e} (writing {path})") from None
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file, skipping a torn (partially written) last line. A malformed line
    elsewhere is a ValueError naming the file and the line number."""
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(
                f"{path}: line {i + 1}: invalid JSON ({e.msg}, column {e.colno})"
            ) from None
    return rows


def git_sha(cwd: str | Path | None = None) -> dict:
    """The git commit of the checkout and whether it has uncommitted changes (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent

    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def environment() -> dict:
    """Package versions, Python, platform, device and git state, for ``env.json``."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git": git_sha(),
        "argv": sys.argv,
    }
    try:
        import torch

        env["device"] = {
            "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(),
        }
    except ImportError:
        env["device"] = None
    return env
