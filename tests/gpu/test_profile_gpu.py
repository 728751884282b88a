"""The cost profiler on CUDA (marker ``gpu``; skipped without CUDA): synchronised timing,
``max_memory_allocated`` peaks, and the memory ordering the estimator core promises at the Qwen3
vocabulary: vOPD within 10% of sample OPD, far below the naive two-log-softmax reference."""

from __future__ import annotations

import pytest
import torch

from vopd.profile import NAIVE, measure_isolated

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _row(estimator, mode="loss", **kw):
    spec = {"estimator": estimator, "vocab_size": 151_936, "seq_len": 1024, "batch": 2,
            "device": "cuda", "mode": mode, "repeats": 2, **kw}  # fmt: skip
    row = measure_isolated(spec)
    assert row["status"] == "ok", row
    return row


def test_loss_memory_ordering_on_cuda():
    r = {e: _row(e) for e in ("sample_opd", "vopd", "full_opd", NAIVE)}
    assert all(x["device"] == "cuda" and x["step_s"] > 0 for x in r.values())
    assert r["vopd"]["peak_mem_bytes"] <= 1.10 * r["sample_opd"]["peak_mem_bytes"]
    assert r["vopd"]["above_inputs_bytes"] <= 0.5 * r[NAIVE]["above_inputs_bytes"]
    assert r[NAIVE]["peak_mem_bytes"] > r["full_opd"]["peak_mem_bytes"]


def test_train_step_on_cuda_counts_one_forward_per_model():
    row = _row("vopd", mode="train_step", seq_len=64, batch=8)
    assert row["student_forwards_per_step"] == row["teacher_forwards_per_step"] == 1.0
