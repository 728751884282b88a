"""Checkpoints of an OPD run: model + tokenizer (``save_pretrained``) and the resume state.

    RUN_DIR/checkpoints/step{N}/   config.json, model.safetensors, tokenizer files,
                                   trainer_state.pt   (optimizer, scheduler, RNG states, step,
                                                       data position; the newest checkpoint only)
                                   trainer_state.json (the same minus tensors, for people)

A checkpoint directory appears under its final name only once it is complete (written to a hidden
temporary directory, then renamed), so ``latest_checkpoint`` never picks a torn one. The resume
state is large (Adam keeps two moments per parameter), so older checkpoints keep the weights
(for evaluation and variance probes) and drop ``trainer_state.pt`` once a newer one exists.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vopd.io import write_json

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


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that holds a resume state, or None. Leftovers of a checkpoint that
    was being written when the job died (hidden ``.step{N}.tmp-*`` directories) are removed."""
    root = Path(run_dir) / "checkpoints"
    for tmp in root.glob(".step*.tmp-*") if root.is_dir() else ():
        shutil.rmtree(tmp, ignore_errors=True)
    for _, d in reversed(list_checkpoints(run_dir).items()):
        if (d / STATE_FILE).exists():
            return d
    return None


# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, *, state: dict | None = None
) -> Path:
    """Write ``step{step}/`` atomically: weights + tokenizer, and ``state`` (optimizer, scheduler,
    data position, ...; RNG states are added here) when given. Older resume states are pruned."""
    final = step_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            full = {**state, "step": step, "rng": rng_state()}
            torch.save(full, tmp / STATE_FILE)
            readable = {k: v for k, v in full.items() if k not in ("optimizer", "scheduler", "rng")}
            write_json(tmp / "trainer_state.json", readable)
    if state is not None:
        for s, d in list_checkpoints(run_dir).items():
            if s != step:
                with contextlib.suppress(FileNotFoundError):
                    (d / STATE_FILE).unlink()
    return final


def load_state(ckpt: str | Path) -> dict:
    """The resume state of a checkpoint (our own file, so not restricted to weights)."""
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
