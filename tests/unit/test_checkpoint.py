"""Checkpoints as untrusted input: the resume state loads with weights_only (a crafted pickle
never runs), RNG states round-trip in that form, a damaged newest checkpoint falls back to the
previous resume state naming the file, and a full disk says so."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from vopd import checkpoint as ckpt


@pytest.fixture(scope="module")
def model(toy_tokenizer):
    return tiny_llama(toy_tokenizer, 0, hidden=16, layers=1)


def _state(step: int) -> dict:
    return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": step}}


def _save(run: Path, step: int, model, tokenizer) -> Path:
    return ckpt.save_checkpoint(run, step, model, tokenizer, state=_state(step))


class _Payload:
    """Unpickling this calls Path.touch(marker): code execution, if the loader allows it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path, model, toy_tokenizer):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    d = _save(tmp_path, 2, model, toy_tokenizer)
    expected = (torch.rand(3), random.random(), np.random.normal(), np.random.rand(2))
    state = ckpt.load_state(d)  # weights_only=True inside
    assert state["step"] == 2 and state["scheduler"] == {"last_epoch": 2}
    ckpt.set_rng_state(state["rng"])
    again = (torch.rand(3), random.random(), np.random.normal(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1:3] == again[1:3]
    assert np.array_equal(expected[3], again[3])


def test_a_crafted_pickle_does_not_run_and_is_refused_clearly(tmp_path, model, toy_tokenizer):
    d = _save(tmp_path, 2, model, toy_tokenizer)
    marker = tmp_path / "pwned"
    torch.save({**ckpt.load_state(d), "extra": _Payload(marker)}, d / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt: refused to load"):
        ckpt.load_state(d)
    assert not marker.exists()
    # the run directory has no other resume state: resuming stops, naming the file
    with pytest.raises(ckpt.CheckpointError, match=r"step2/trainer_state\.pt.*Delete"):
        ckpt.latest_resumable(tmp_path)
    assert not marker.exists()


def test_the_previous_resume_state_is_kept_and_older_ones_pruned(tmp_path, model, toy_tokenizer):
    for step in (0, 2, 4, 6):
        _save(tmp_path, step, model, toy_tokenizer)
    with_state = [s for s, d in ckpt.list_checkpoints(tmp_path).items()
                  if (d / ckpt.STATE_FILE).exists()]  # fmt: skip
    assert with_state == [4, 6]
    assert (ckpt.step_dir(tmp_path, 0) / "model.safetensors").exists()  # weights stay


@pytest.mark.parametrize("damaged", [ckpt.STATE_FILE, "model.safetensors"])
def test_a_truncated_newest_checkpoint_falls_back_naming_the_file(
    tmp_path, model, toy_tokenizer, capsys, damaged
):
    for step in (0, 2, 4):
        _save(tmp_path, step, model, toy_tokenizer)
    path = ckpt.step_dir(tmp_path, 4) / damaged
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert ckpt.latest_resumable(tmp_path) == ckpt.step_dir(tmp_path, 2)
    assert str(path) in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.check_checkpoint(ckpt.step_dir(tmp_path, 4))


def test_a_full_disk_says_no_space_left_naming_the_file():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError, match="no space left on device writing /dev/full"):
        ckpt.save_state({"x": torch.zeros(100_000)}, "/dev/full")


def test_read_jsonl_names_the_file_and_line_of_a_malformed_line(tmp_path):
    from vopd.io import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n{"ste')
    with pytest.raises(ValueError, match=rf"{path}: line 2: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"ste')  # a torn last line (a killed write) is dropped
    assert read_jsonl(path) == [{"step": 1}]


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    import errno

    from vopd import io

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=r"No space left on device \(writing .*summary\.json\)"):
        io.write_json(tmp_path / "summary.json", {"a": 1})
    assert not list(tmp_path.iterdir())  # no temporary file left behind
