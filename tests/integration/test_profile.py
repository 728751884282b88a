"""``python -m vopd.profile`` on a tiny sweep: every variant in a fresh process, both modes, the
results contract, a failing variant recorded instead of ending the sweep."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vopd.profile import main, measure_isolated, measure_one, measure_train_step

pytestmark = pytest.mark.integration

CONTRACT = ["estimator", "vocab_size", "seq_len", "batch", "step_s", "peak_mem_bytes", "device"]


def test_loss_sweep_writes_contract_and_table(tmp_path, capsys):
    out = tmp_path / "profile.parquet"
    main(["--out", str(out), "--vocab", "27", "20000", "--seq-len", "64", "--batch", "2",
          "--estimators", "sample_opd", "--naive", "--repeats", "1", "--threads", "1",
          "--device", "cpu"])  # fmt: skip
    df = pd.read_parquet(out)
    assert set(CONTRACT) <= set(df.columns)
    assert len(df) == 2 * 2 and set(df.status) == {"ok"}
    assert set(df.estimator) == {"sample_opd", "naive_vopd"}
    assert (df.step_s > 0).all() and (df.peak_mem_bytes > df.base_bytes).all()
    assert (df.device == "cpu").all() and (df["mode"] == "loss").all()
    big = df[df.vocab_size == 20000].set_index("estimator")
    tensor = 2 * 64 * 20000 * 4  # one [B, T, V] float32 tensor: 10 MB
    # the naive reference holds two full log-softmax tensors (+ exp) beyond the gradient
    above = big["above_inputs_bytes"]
    assert above["naive_vopd"] - above["sample_opd"] > 1.5 * tensor
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["profile"][0]["estimator"] == "sample_opd"
    assert any(line.startswith("loss       naive_vopd") and " 20000 " in line for line in lines)


def test_train_step_counts_one_forward_per_model(tmp_path):
    out = tmp_path / "train_step.parquet"
    main(["--mode", "train_step", "--out", str(out), "--vocab", "27", "--seq-len", "4",
          "--batch", "2", "--estimators", "vopd", "topk_opd", "--top-k", "4", "--repeats", "1",
          "--threads", "1", "--device", "cpu"])  # fmt: skip
    df = pd.read_parquet(out)
    assert set(CONTRACT) <= set(df.columns) and set(df.status) == {"ok"}
    assert (df.student_forwards_per_step == 1.0).all()  # claim C5: no extra model call
    assert (df.teacher_forwards_per_step == 1.0).all()
    parts = df[["student_fwd_s", "teacher_fwd_s", "loss_s", "backward_s", "optim_s"]]
    assert (parts > 0).all().all()
    assert df.set_index("estimator").top_k.to_dict() == pytest.approx(
        {"vopd": float("nan"), "topk_opd": 4.0}, nan_ok=True
    )
    assert (df.params > 0).all()


def test_in_process_measurements():
    r = measure_one("vopd_topk", 50, 4, 2, top_k=100, repeats=1)
    assert r["top_k"] == 50 and r["status"] == "ok" and r["inner_steps"] >= 1
    t = measure_train_step("sample_opd", 27, 3, 2, repeats=1, prompt_len=2)
    assert t["student_forwards_per_step"] == t["teacher_forwards_per_step"] == 1.0


def test_child_peak_is_its_own_not_the_forking_parents():
    # pytest holds far more memory than a tiny variant needs; ru_maxrss would report pytest's
    # peak after fork + exec. The child's peak must be its own: base + a few MB.
    hog = bytearray(600 * 2**20)  # make sure the parent is big
    row = measure_isolated({"estimator": "sample_opd", "vocab_size": 27, "seq_len": 4,
                            "batch": 1, "repeats": 1, "threads": 1})  # fmt: skip
    del hog
    assert row["status"] == "ok"
    assert row["peak_mem_bytes"] - row["base_bytes"] < 64 * 2**20, row


def test_failed_variant_is_recorded_not_raised():
    row = measure_isolated({"estimator": "vopd", "vocab_size": 10, "seq_len": 2, "batch": 1,
                            "dtype": "no_such_dtype"})  # fmt: skip
    assert row["status"].startswith("failed") and row["estimator"] == "vopd"
    assert "step_s" not in row


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--estimators", "nope"], "unknown estimator"),
        (["--vocab", "1"], "expected integers >= 2"),
        (["--seq-len", "x"], "expected integers"),
        (["--mode", "train_step", "--model-config", "/no/such/dir"], "no config.json"),
    ],
)
def test_bad_input(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["--device", "cpu", *argv])


def test_both_paths_from_hidden_states(tmp_path):
    """--path logits hidden with --hidden-size: the loss from materialised logits and from
    hidden states (vopd.estimators.hidden), plus the floors; train_step runs either path, one
    forward each."""
    out = tmp_path / "paths.parquet"
    main(["--out", str(out), "--vocab", "3000", "--seq-len", "16", "--batch", "2", "--floor",
          "--estimators", "vopd", "--path", "logits", "hidden", "--hidden-size", "8",
          "--repeats", "1", "--threads", "1", "--device", "cpu"])  # fmt: skip
    df = pd.read_parquet(out)
    assert set(df.status) == {"ok"}
    assert sorted(zip(df.estimator, df.path, strict=True)) == [
        ("floor", "logits"), ("floor_prealloc", "logits"), ("vopd", "hidden"), ("vopd", "logits")
    ]  # fmt: skip
    assert set(df[df.estimator == "vopd"].hidden_size) == {8}
    out = tmp_path / "train.parquet"
    main(["--mode", "train_step", "--out", str(out), "--vocab", "27", "--seq-len", "4",
          "--batch", "2", "--estimators", "vopd", "--path", "hidden", "--repeats", "1",
          "--threads", "1", "--device", "cpu"])  # fmt: skip
    row = pd.read_parquet(out).iloc[0]
    assert row.status == "ok" and row.path == "hidden"
    assert row.student_forwards_per_step == row.teacher_forwards_per_step == 1.0


def test_hidden_mode_measures_both_paths(tmp_path):
    """--mode hidden: every estimator on both paths from the same hidden states and heads
    (--hidden-size defaults to the toy model's 128), rows marked mode hidden; no naive row."""
    out = tmp_path / "hidden.parquet"
    main(["--mode", "hidden", "--out", str(out), "--vocab", "300", "--seq-len", "8", "--batch",
          "2", "--estimators", "sample_opd", "vopd", "--naive", "--repeats", "1", "--threads",
          "1", "--device", "cpu"])  # fmt: skip
    df = pd.read_parquet(out)
    assert set(df.status) == {"ok"} and (df["mode"] == "hidden").all()
    assert sorted(zip(df.estimator, df.path, strict=True)) == [
        ("sample_opd", "hidden"), ("sample_opd", "logits"), ("vopd", "hidden"), ("vopd", "logits")
    ]  # fmt: skip
    assert set(df.hidden_size) == {128} and set(CONTRACT) <= set(df.columns)
