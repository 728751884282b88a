"""python -m vopd.aggregate on synthetic run directories, checked against hand-written values.

pytest tests/unit/test_aggregate.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vopd import results
from vopd.aggregate import main

REPO = Path(__file__).resolve().parents[2]


def write_run(root: Path, est: str, seed: int, records: list, done: bool = True) -> Path:
    run = root / est / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (run / "done.json").write_text("{}\n")
    return run


def write_summary(path: Path, summary: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def exp(tmp_path) -> Path:
    """2 estimators x 2 seeds, 3 steps each; one eval per run; a sample_opd probe file."""
    root = tmp_path / "results" / "exp"
    for est, base in (("sample_opd", 1.0), ("vopd", 2.0)):
        for seed in (0, 1):
            records = [
                {
                    "step": s,
                    "train/loss": base + s + seed / 10,
                    "estimator/kl_mean": base * s,
                    "estimator/adam_proxy": base,
                }
                for s in (1, 2, 3)
            ]
            run = write_run(root, est, seed, records)
            summary = {
                "benchmark": "toy_test",
                "n": 4,
                "avg@4": base / 4 + seed / 100,
                "pass@4": 0.5,
                "format_ok": True,  # booleans are not metrics
                "ci95": {"avg@4": [0.1, 0.3]},
            }
            write_summary(run / "eval" / "toy_test" / "step3", summary)
    for seed in (0, 1):
        (root / "sample_opd" / f"seed{seed}" / "variance").mkdir()
        probe_file(seed).to_parquet(
            root / "sample_opd" / f"seed{seed}" / "variance" / "step3.parquet"
        )
    write_summary(root / "reference" / "teacher" / "eval" / "toy_test", {"avg@4": 0.9, "n": 4})
    (root / "profile").mkdir()
    pd.DataFrame(
        {
            "estimator": ["sample_opd", "vopd"],
            "vocab_size": [27, 27],
            "seq_len": [8, 8],
            "batch": [1, 1],
            "step_s": [0.5, 0.6],
            "peak_mem_bytes": [1000, 1100],
            "device": ["cpu", "cpu"],
            "mode": ["loss", "loss"],
        }
    ).to_parquet(root / "profile" / "profile.parquet")
    return root


def probe_file(seed: int) -> pd.DataFrame:
    """A variance/step3.parquet as python -m vopd.variance writes it (results.SCHEMAS["probe"])."""
    return pd.DataFrame(
        {
            "experiment": ["exp", "exp"],
            "variant": ["sample_opd", "vopd"],
            "estimator": ["sample_opd", "vopd"],
            "seed": [seed, seed],
            "step": [3, 3],
            "probe": ["total_variance", "total_variance"],
            "value": [4.0, 3.0],
        }
    )


def cell(df, **where):
    sel = df
    for key, value in where.items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, (where, sel)
    return sel["value"].iloc[0]


# ---- runs.parquet -----------------------------------------------------------------------------


def test_runs_contract_and_values(exp):
    main(["--results-dir", str(exp), "--experiment", "exp"])
    runs = pd.read_parquet(exp / "runs.parquet")
    assert list(runs.columns) == [
        "experiment",
        "variant",
        "estimator",
        "seed",
        "step",
        "source",
        "benchmark",
        "n",
        "metric",
        "value",
        "variant_options",
    ]
    assert list(runs.columns) == results.RUNS_COLUMNS
    results.validate(runs, "runs", "runs.parquet")  # exactly the declared dtypes
    # no --variants and no config.yaml in the run: each directory is its own estimator
    assert (runs["variant"] == runs["estimator"]).all() and set(runs["variant_options"]) == {""}
    assert runs["seed"].dtype == "int64" and runs["step"].dtype == "int64"
    assert runs["value"].dtype == "float64"
    assert set(runs["experiment"]) == {"exp"}
    # training curves: 2 estimators x 2 seeds x 3 steps x 3 keys
    train = runs[runs["source"] == "train"]
    assert len(train) == 36
    assert set(train["benchmark"]) == {""} and set(train["n"]) == {0}
    assert cell(train, estimator="vopd", seed=1, step=2, metric="train/loss") == 4.1
    assert cell(train, estimator="vopd", seed=0, step=3, metric="estimator/kl_mean") == 6.0
    # evaluation: every numeric summary field, CIs flattened, booleans and strings dropped
    ev = runs[runs["source"] == "eval"]
    assert set(ev["benchmark"]) == {"toy_test"} and set(ev["n"]) == {4}
    assert set(ev["metric"]) == {"n", "avg@4", "pass@4", "avg@4_ci95_lo", "avg@4_ci95_hi"}
    assert cell(ev, estimator="vopd", seed=1, step=3, metric="avg@4") == pytest.approx(0.51)
    assert cell(ev, estimator="sample_opd", seed=0, step=3, metric="avg@4_ci95_hi") == 0.3


def test_resumed_run_last_record_of_a_step_wins_and_torn_line_dropped(tmp_path):
    root = tmp_path / "exp"
    records = [
        {"step": 1, "train/loss": 9.0},
        {"step": 2, "train/loss": 8.0},
        {"step": 2, "train/loss": 7.0},
    ]
    run = write_run(root, "vopd", 0, records)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/loss": 6')  # killed mid-write
    main(["--results-dir", str(root), "--experiment", "exp", "--what", "runs"])
    runs = pd.read_parquet(root / "runs.parquet")
    assert runs["step"].tolist() == [1, 2]
    assert cell(runs, step=2, metric="train/loss") == 7.0


def test_old_unnamespaced_metrics_jsonl_is_refused(tmp_path):
    root = tmp_path / "exp"
    write_run(root, "vopd", 0, [{"step": 1, "loss": 9.0}])  # a run of an older release
    with pytest.raises(SystemExit, match=r"metrics\.jsonl, line 1: key 'loss' is not namespaced"):
        main(["--results-dir", str(root), "--experiment", "exp", "--what", "runs"])


def test_incomplete_runs_skipped_without_filters_and_rejected_with_them(exp, capsys):
    write_run(exp, "full_opd", 0, [{"step": 1, "train/loss": 1.0}], done=False)
    main(["--results-dir", str(exp), "--experiment", "exp", "--what", "runs"])
    assert "full_opd" not in set(pd.read_parquet(exp / "runs.parquet")["estimator"])
    assert "skipping incomplete run" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"full_opd/seed0/done\.json is missing"):
        args = ["--results-dir", str(exp), "--experiment", "exp", "--what", "runs"]
        main([*args, "--variants", '{"full_opd": {"estimator": "full_opd"}}', "--seeds", "0"])


def test_filters_select_runs_and_require_every_expected_eval(exp):
    args = ["--results-dir", str(exp), "--experiment", "exp", "--what", "runs"]
    main([*args, "--estimators", "vopd", "--seeds", "1", "--benchmarks", "toy_test"])
    runs = pd.read_parquet(exp / "runs.parquet")
    assert set(zip(runs["estimator"], runs["seed"], strict=True)) == {("vopd", 1)}
    with pytest.raises(SystemExit, match=r"toy_test/step9/summary\.json is missing"):
        main([*args, "--benchmarks", "toy_test", "--eval-steps", "9"])


def test_no_runs_is_an_error(tmp_path):
    (tmp_path / "exp").mkdir()
    with pytest.raises(SystemExit, match="no complete runs"):
        main(["--results-dir", str(tmp_path / "exp"), "--experiment", "exp", "--what", "runs"])


def test_variants_named_by_the_workflow_and_read_from_the_run_config(exp):
    # two variants of vopd_topk; one run's resolved config.yaml names its estimator
    for name, k in (("vopd_topk_k4", 4), ("vopd_topk_k16", 16)):
        records = [{"step": 1, "train/loss": float(k), "estimator/adam_proxy": 1.0}]
        run = write_run(exp, name, 0, records)
        (run / "config.yaml").write_text(f"estimator: vopd_topk\ntop_k: {k}\nlr: 0.001\n")
    args = ["--results-dir", str(exp), "--experiment", "exp", "--what", "runs", "--seeds", "0"]
    declared = {
        "vopd_topk_k16": {"estimator": "vopd_topk", "options": {"top_k": 16, "lr": 0.001}},
        "vopd": {"estimator": "vopd", "options": {}},
    }
    main([*args, "--variants", json.dumps(declared), "--benchmarks", ""])
    runs = pd.read_parquet(exp / "runs.parquet")
    k16 = runs[runs["variant"] == "vopd_topk_k16"].iloc[0]
    assert (k16["estimator"], k16["variant_options"]) == ("vopd_topk", "lr=0.001, top_k=16")
    assert set(runs["variant"]) == {"vopd_topk_k16", "vopd"}
    # without --variants: the estimator and its non-default options from config.yaml
    main(args[:-2])
    runs = pd.read_parquet(exp / "runs.parquet")
    k4 = runs[runs["variant"] == "vopd_topk_k4"].iloc[0]
    assert (k4["estimator"], k4["variant_options"]) == ("vopd_topk", "top_k=4")
    # a run directory trained with another estimator than the config declares: refused
    wrong = {"vopd_topk_k4": {"estimator": "topk_opd", "options": {"top_k": 4}}}
    with pytest.raises(SystemExit, match="trained with estimator 'vopd_topk'"):
        main([*args, "--variants", json.dumps(wrong)])


# ---- variance, profile, references ------------------------------------------------------------


def test_variance_adam_proxy_from_training_and_probes_from_files(exp):
    main(["--results-dir", str(exp), "--experiment", "exp", "--what", "variance"])
    var = pd.read_parquet(exp / "variance.parquet")
    assert list(var.columns) == [
        "experiment", "variant", "estimator", "seed", "step", "probe", "value",
        "run_variant", "run_estimator", "source", "variant_options",
    ]  # fmt: skip
    results.validate(var, "variance", "variance.parquet")
    train = var[var["source"] == "train"]
    assert len(train) == 12  # 2 estimators x 2 seeds x 3 steps
    assert cell(train, estimator="vopd", seed=0, step=2, probe="adam_proxy") == 2.0
    probes = var[var["source"] == "probe"]
    assert len(probes) == 4  # 2 probed estimators x 2 seeds, at step 3
    assert set(probes["run_estimator"]) == {"sample_opd"}
    assert cell(probes, estimator="vopd", seed=1, step=3, probe="total_variance") == 3.0


def test_variance_probe_files_validated_on_read_and_missing_probe(exp):
    probe_dir = exp / "vopd" / "seed0" / "variance"
    probe_dir.mkdir()
    base = ["--results-dir", str(exp), "--experiment", "exp", "--what", "variance"]
    # an untrusted file: a wrong column, a wrong dtype, an unknown probe; each named
    wide = pd.DataFrame({"estimator": ["vopd"], "total_variance": [2.5]})
    bad = {
        r"column\(s\) \['experiment', 'variant', 'seed', 'step', 'probe', 'value'\] missing": wide,
        r"column 'value' has dtype \w+, expected float64": probe_file(0).astype({"value": str}),
        r"column 'probe' has \['cos_to_full'\]": probe_file(0).assign(probe="cos_to_full"),
    }
    for match, frame in bad.items():
        frame.to_parquet(probe_dir / "step3.parquet")
        with pytest.raises(SystemExit, match=r"vopd/seed0/variance/step3\.parquet: " + match):
            main(base)
    probe_file(0).to_parquet(probe_dir / "step3.parquet")
    main(base)
    probes = pd.read_parquet(exp / "variance.parquet").query("source == 'probe'")
    assert cell(probes, run_estimator="vopd", seed=0, variant="vopd", probe="total_variance") == 3
    # probed runs named by the workflow: every probe step must exist
    with pytest.raises(SystemExit, match=r"vopd/seed1/variance/step3\.parquet is missing"):
        main([*base, "--variance-runs", "vopd", "--variance-steps", "3"])
    main([*base, "--variance-runs", "", "--variance-steps", "3"])  # nothing probed
    assert set(pd.read_parquet(exp / "variance.parquet")["source"]) == {"train"}


def test_profile_contract_and_missing_column(exp):
    main(["--results-dir", str(exp), "--experiment", "exp", "--what", "profile"])
    prof = pd.read_parquet(exp / "profile.parquet")
    assert list(prof.columns) == [
        "estimator",
        "vocab_size",
        "seq_len",
        "batch",
        "step_s",
        "peak_mem_bytes",
        "device",
        "mode",
    ]
    assert prof["peak_mem_bytes"].tolist() == [1000.0, 1100.0]
    pd.read_parquet(exp / "profile" / "profile.parquet").drop(columns=["device"]).to_parquet(
        exp / "profile" / "profile.parquet"
    )
    with pytest.raises(SystemExit, match=r"\['device'\] are missing"):
        main(["--results-dir", str(exp), "--experiment", "exp", "--what", "profile"])


def test_references(exp):
    main(["--results-dir", str(exp), "--experiment", "exp", "--what", "references"])
    refs = pd.read_parquet(exp / "references.parquet")
    assert list(refs.columns) == [
        "experiment", "model", "benchmark", "n", "metric", "value", "variant", "estimator"
    ]  # fmt: skip
    results.validate(refs, "references", "references.parquet")
    assert set(refs["variant"]) == {"reference:teacher"} and set(refs["estimator"]) == {"none"}
    assert cell(refs, model="teacher", benchmark="toy_test", metric="avg@4") == 0.9


# ---- reads files only -------------------------------------------------------------------------


def test_aggregate_and_report_never_import_torch():
    code = "import sys, vopd.aggregate, vopd.report, vopd.figures; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
