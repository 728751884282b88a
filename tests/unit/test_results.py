"""The results contract (vopd/results.py): names, schemas, validation on read, and the
writers that must produce exactly the declared columns and dtypes.

pytest tests/unit/test_results.py
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from vopd import checkpoint, results, variance_math


def test_run_dir_and_aggregate_paths():
    assert str(results.run_dir("toy", "vopd_topk_k16", 2)) == "results/toy/vopd_topk_k16/seed2"
    assert results.aggregate_path("results/toy", "runs").name == "runs.parquet"
    with pytest.raises(ValueError, match="unknown aggregate 'nope'"):
        results.aggregate_path("results/toy", "nope")


def test_metric_namespaces():
    assert results.metric_name("loss") == "train/loss"
    assert results.metric_name("grad_norm") == "train/grad_norm"
    assert results.metric_name("kl_mean") == "estimator/kl_mean"
    assert results.metric_name("adam_proxy") == "estimator/adam_proxy"
    assert results.metric_name("time_rollout_s") == "perf/time_rollout_s"
    assert results.metric_name("step_s") == "perf/step_s"
    row = results.namespaced(3, {"loss": 1.0, "time_teacher_s": 0.1, "adv_mean": None})
    assert row == {"step": 3, "train/loss": 1.0, "perf/time_teacher_s": 0.1,
                   "estimator/adv_mean": None}  # fmt: skip
    assert results.check_metrics_record(row, "x") is row
    assert results.split_metric("estimator/kl_mean") == ("estimator", "kl_mean")
    for bad in ("kl_mean", "other/kl_mean", "train/"):
        with pytest.raises(ValueError, match="is not namespaced"):
            results.split_metric(bad)


def test_an_old_metrics_jsonl_is_refused_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: key 'loss' is not namespaced"):
        checkpoint.metrics_rows(path, 2)
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2)))
    assert [r["step"] for r in checkpoint.metrics_rows(path, 2)] == [1, 2]


def test_probe_kinds():
    assert results.is_variance_probe("total_variance")
    assert results.is_variance_probe("adam_proxy")
    assert not results.is_variance_probe("variance_ratio_to_sample_opd")
    assert not results.is_variance_probe("adam_v_sum")
    with pytest.raises(ValueError, match="unknown probe 'cos'"):
        results.probe_kind("cos")
    # the reference estimators the probe names carry are the probe's own
    for name in (f"variance_ratio_to_{variance_math.REF_VARIANCE}",
                 f"cosine_to_{variance_math.REF_MEAN}_debiased",
                 f"bias_ratio_vs_{variance_math.REF_MEAN}"):  # fmt: skip
        assert name in results.PROBES


def test_eval_metric():
    assert results.eval_metric("avg", 4) == "avg@4"
    with pytest.raises(ValueError, match="unknown metric family"):
        results.eval_metric("best", 4)


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment": ["toy"],
            "model": ["teacher"],
            "benchmark": ["toy_test"],
            "n": [4],
            "metric": ["avg@4"],
            "value": [0.9],
            "variant": ["reference:teacher"],
            "estimator": ["none"],
        }
    )


def test_validate_names_file_column_and_expectation(tmp_path):
    results.validate(frame(), "references", "f")
    with pytest.raises(ValueError, match=r"f: column\(s\) \['n'\] missing"):
        results.validate(frame().drop(columns=["n"]), "references", "f")
    with pytest.raises(ValueError, match=r"f: unexpected column\(s\) \['x'\]"):
        results.validate(frame().assign(x=1), "references", "f")
    with pytest.raises(ValueError, match="f: column 'n' has dtype float64, expected int64"):
        results.validate(frame().astype({"n": float}), "references", "f")
    path = tmp_path / "references.parquet"
    frame().astype({"value": str}).to_parquet(path)
    with pytest.raises(ValueError, match=rf"{path}: column 'value' has dtype \w+, expected float"):
        results.read(path, "references")
    path.write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        results.read(path, "references")


def test_benchmark_writers_use_the_declared_schema(tmp_path):
    from vopd.data import write_benchmark
    from vopd.toy.world import BENCHMARK_SCHEMA

    assert BENCHMARK_SCHEMA.equals(results.benchmark_arrow_schema())
    row = {"id": "a", "problem": "1+1", "prompt": "1+1=", "answer": "2", "choices": None,
           "kind": "math", "source": "test"}  # fmt: skip
    write_benchmark([row], tmp_path / "b.parquet")
    schema = pq.read_schema(tmp_path / "b.parquet")
    assert schema.names == list(results.BENCHMARK_COLUMNS)
    assert schema.equals(results.benchmark_arrow_schema(), check_metadata=False)
    results.validate(pd.read_parquet(tmp_path / "b.parquet"), "benchmark", "b.parquet")
