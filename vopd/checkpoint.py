"""Checkpoints of an OPD run: model + tokenizer (``save_pretrained``) and the resume state.

    RUN_DIR/checkpoints/step{N}/   config.json, model.safetensors, tokenizer files,
                                   trainer_state.pt   (optimizer, scheduler, RNG states, step,
                                                       data position; the two newest only)
                                   trainer_state.json (the same minus tensors, for people)

A checkpoint directory appears under its final name only once it is complete (written to a hidden
temporary directory, then renamed), so ``latest_resumable`` never picks a torn one. The resume
state is large (Adam keeps two moments per parameter), so older checkpoints keep the weights
(for evaluation and variance probes) and drop ``trainer_state.pt`` once two newer ones exist: the
previous resume state is the fallback when the newest checkpoint is damaged on disk (a truncated
``trainer_state.pt`` or ``*.safetensors``), which ``latest_resumable`` detects and reports.

A run directory is untrusted input: ``trainer_state.pt`` holds tensors and plain Python values
only (RNG states as tensors and tuples) and is loaded with ``torch.load(weights_only=True)``, so
a crafted file cannot run code; anything else in it is refused with an error naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vopd import results
from vopd.io import read_jsonl, write_json

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step(\d+)$")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``path``; move it onto ``path`` when the block
    succeeds (an existing ``path`` is replaced), delete it when the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step{step}"


def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Complete checkpoints of a run, by step."""
    root = Path(run_dir) / "checkpoints"
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                found[int(m.group(1))] = d
    return dict(sorted(found.items()))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, corrupt, or not a vopd file)."""


def latest_resumable(run_dir: str | Path, *, metrics: str | Path | None = None) -> Path | None:
    """The newest complete checkpoint that holds a resume state, or None if none holds one.

    Leftovers of a checkpoint that was being written when the job died (hidden
    ``.step{N}.tmp-*`` directories) are removed. A checkpoint whose ``trainer_state.pt`` or
    weights (``*.safetensors``) cannot be read is reported on stderr, naming the file, and the
    previous resume state is used instead; if no resume state is readable, a
    :class:`CheckpointError` names every damaged file and says what to delete.

    With ``metrics`` (the run's metrics.jsonl), a checkpoint past the steps that file covers
    (:func:`metrics_coverage`; e.g. the file was cut) is skipped for an earlier one, so the
    resumed curve has no gap; if every resume state is past it, a CheckpointError says so."""
    root = Path(run_dir) / "checkpoints"
    for tmp in root.glob(".step*.tmp-*") if root.is_dir() else ():
        shutil.rmtree(tmp, ignore_errors=True)
    covered = None if metrics is None else metrics_coverage(metrics)
    damaged, past = [], []
    for step, d in reversed(list_checkpoints(run_dir).items()):
        if not (d / STATE_FILE).exists():
            continue
        if covered is not None and step > covered:
            past.append(step)
            print(
                f"checkpoint: {d} is past the last step {covered} that {metrics} holds "
                "contiguously (the file was cut or edited); trying an earlier resume state",
                file=sys.stderr,
            )
            continue
        try:
            check_checkpoint(d)
        except CheckpointError as e:
            damaged.append(str(e))
            print(f"checkpoint: {e}; trying the previous resume state", file=sys.stderr)
            continue
        return d
    if damaged:
        raise CheckpointError(
            "no readable resume state: "
            + "; ".join(damaged)
            + f". Delete {root} (the run restarts from step 0) or the whole run directory"
        )
    if past:
        raise CheckpointError(
            f"{metrics} holds steps 1..{covered} contiguously, but the run's resume states are "
            f"at steps {sorted(past)}: resuming would leave steps {covered + 1}..{min(past)} "
            f"missing from the training curve. Delete {Path(run_dir)} to start the run over"
        )
    return None


def metrics_coverage(path: str | Path) -> int:
    """The number k such that the first k rows of a run's metrics.jsonl are steps 1..k in order
    (0 if the file is missing). A torn last line (a killed write) does not count; a malformed
    line elsewhere is a ValueError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return 0
    k = 0
    for row in read_jsonl(path):
        if not isinstance(row, dict) or row.get("step") != k + 1:
            break
        k += 1
    return k


def metrics_rows(path: str | Path, step: int) -> list[dict]:
    """Rows 1..``step`` of a run's metrics.jsonl (what a resume from ``step`` keeps); a
    ValueError naming the file if they are not exactly steps 1..step, or if a row is not a
    record of the results contract (``vopd.results.check_metrics_record``: a metrics.jsonl of
    an older release, with un-namespaced keys, is refused, not translated)."""
    rows = read_jsonl(path) if Path(path).exists() else []
    rows = rows[:step]
    for i, row in enumerate(rows, 1):  # an old run directory: un-namespaced keys
        results.check_metrics_record(row, f"{path}, line {i}")
    found = [r.get("step") if isinstance(r, dict) else None for r in rows]
    if found != list(range(1, step + 1)):
        raise ValueError(
            f"{path}: expected steps 1..{step} to resume from the step-{step} checkpoint, found "
            f"{len(rows)} row(s) with steps {found[:5]}{'...' if len(found) > 5 else ''}: the "
            "file was cut or edited; delete the run directory to start over"
        )
    return rows


def check_checkpoint(ckpt: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file if the resume state or a weights file of
    ``ckpt`` cannot be read (e.g. truncated on disk); return quietly otherwise."""
    from safetensors import safe_open

    load_state(ckpt, mmap=True)  # mapped, not read: a truncated zip fails on its directory
    for weights in sorted(Path(ckpt).glob("*.safetensors")):
        try:  # the header must cover the whole file: a truncated one fails here
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise CheckpointError(f"{weights}: unreadable weights file ({e})") from None


# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every global RNG state, as tensors and plain Python values (``weights_only``-loadable):
    numpy's MT19937 key array is stored as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["bit_generator"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _no_space(e: BaseException) -> bool:
    text = str(e)
    return getattr(e, "errno", None) == errno.ENOSPC or any(
        s in text for s in ("No space left on device", "code: 28", "StorageFull")
    )


def save_state(obj: dict, path: str | Path) -> None:
    """``torch.save`` through a Python file object, fsynced: a full disk is an
    ``OSError(ENOSPC)`` naming ``path`` (written to a path, torch reports
    "enforce fail at inline_container.cc" instead)."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if _no_space(e):
            raise OSError(errno.ENOSPC, f"no space left on device writing {path}") from None
        raise


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, *, state: dict | None = None
) -> Path:
    """Write ``step{step}/`` atomically: weights + tokenizer, and ``state`` (optimizer, scheduler,
    data position, ...; RNG states are added here) when given. Older resume states are pruned."""
    final = step_dir(run_dir, step)
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if state is not None:
                full = {**state, "step": step, "rng": rng_state()}
                save_state(full, tmp / STATE_FILE)
                skip = ("optimizer", "scheduler", "rng")
                write_json(
                    tmp / "trainer_state.json", {k: v for k, v in full.items() if k not in skip}
                )
    except Exception as e:
        if _no_space(e):  # safetensors and tokenizers report it in their own words
            raise OSError(
                errno.ENOSPC, f"no space left on device writing checkpoint {final}: {e}"
            ) from None
        raise
    if state is not None:  # keep the previous resume state as the fallback; prune older ones
        older = [
            s
            for s, d in list_checkpoints(run_dir).items()
            if s < step and (d / STATE_FILE).exists()
        ]
        for s in older[:-1]:
            with contextlib.suppress(FileNotFoundError):
                (step_dir(run_dir, s) / STATE_FILE).unlink()
    return final


def load_state(ckpt: str | Path, *, mmap: bool = False) -> dict:
    """The resume state of a checkpoint, loaded with ``torch.load(weights_only=True)``: tensors
    and plain Python values only, so a crafted file cannot run code. A file that is not such a
    state (a pickle with other objects, a truncated or corrupt file) is a
    :class:`CheckpointError` naming it."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no resume state (file missing)") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain values "
            f"(torch.load weights_only=True: {first}); a vopd resume state never does, so the "
            "file was not written by vopd.train or was tampered with"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).split(". ")[0]  # torch appends a paragraph of advice
        raise CheckpointError(
            f"{path}: unreadable resume state, truncated or corrupt ({reason})"
        ) from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= set(state):
        raise CheckpointError(
            f"{path}: not a vopd resume state (expected a mapping with optimizer, scheduler, "
            "rng and step)"
        )
    return state
