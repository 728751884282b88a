"""python -m vopd.report: statistics, tables and figures on synthetic aggregated results,
checked against hand-computed values.

    pytest tests/unit/test_report.py
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import pytest

from vopd import report
from vopd import results as contract
from vopd.report import bootstrap_ci, exact_bootstrap, seed_stats
from vopd.report.__main__ import main


def args(**kw):
    base = {"metric": "avg", "smooth": 2, "reference_estimator": "sample_opd"}
    return argparse.Namespace(**{**base, **kw})


# ---- statistics -------------------------------------------------------------------------------


def test_exact_bootstrap_two_values():
    # resamples of (1, 3): (1,1) p 1/4, (1,3)/(3,1) p 1/2, (3,3) p 1/4
    means, probs = exact_bootstrap([1.0, 3.0])
    assert means.tolist() == [1.0, 2.0, 3.0]
    assert probs.tolist() == pytest.approx([0.25, 0.5, 0.25])
    assert bootstrap_ci([1.0, 3.0]) == (1.0, 3.0)


def test_exact_bootstrap_three_values_by_hand():
    # 27 equally likely resamples of (0, 1, 2); their sums 0..6 occur 1, 3, 6, 7, 6, 3, 1 times.
    means, probs = exact_bootstrap([0.0, 1.0, 2.0])
    by_sum = {}
    for m, p in zip(means, probs, strict=True):
        by_sum[round(3 * m)] = by_sum.get(round(3 * m), 0.0) + p
    assert [by_sum[s] * 27 for s in range(7)] == pytest.approx([1, 3, 6, 7, 6, 3, 1])
    # 95%: P(sum=0) = 1/27 >= 2.5%, P(sum<=5) = 26/27 < 97.5%
    assert bootstrap_ci([0.0, 1.0, 2.0]) == (0.0, 2.0)
    # 50%: cumulative 1/27, 4/27, 10/27 >= .25 at sum 2; 17/27 < .75 <= 23/27 at sum 4
    lo, hi = bootstrap_ci([0.0, 1.0, 2.0], level=0.5)
    assert (lo, hi) == pytest.approx((2 / 3, 4 / 3))


def test_monte_carlo_bootstrap_above_eight_seeds_is_seeded_and_sane():
    values = [float(i) for i in range(12)]
    lo, hi = bootstrap_ci(values)
    assert bootstrap_ci(values) == (lo, hi)  # reproducible
    # the CI of the mean (5.5, sd 3.61, se 1.04) is about 5.5 ± 2.04
    assert 3.0 < lo < 5.5 < hi < 8.0


def test_seed_stats_by_hand():
    s = seed_stats([0.6, 0.7, 0.8])
    assert s["n_seeds"] == 3
    assert s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.1)  # sample std (ddof 1)
    assert (s["ci_lo"], s["ci_hi"]) == pytest.approx((0.6, 0.8))
    one = seed_stats([0.5])
    assert math.isnan(one["std"]) and (one["ci_lo"], one["ci_hi"]) == (0.5, 0.5)
    assert report.fmt_stats(one) == "0.500"


# ---- tables -----------------------------------------------------------------------------------


def runs_frame() -> pd.DataFrame:
    """sample_opd and vopd, seeds 0 and 1, two benchmarks at step 10, plus training rows."""
    acc = {  # (estimator, seed) -> (toy_test, toy_hard)
        ("sample_opd", 0): (0.50, 0.30),
        ("sample_opd", 1): (0.60, 0.40),
        ("vopd", 0): (0.70, 0.30),
        ("vopd", 1): (0.70, 0.50),
    }
    rows = []
    for (est, seed), (test, hard) in acc.items():
        for bench, value in (("toy_test", test), ("toy_hard", hard)):
            rows.append((est, seed, 10, bench, "avg@4", value))
            rows.append((est, seed, 10, bench, "pass@4", 1.0))
            rows.append((est, seed, 5, bench, "avg@4", 0.0))  # an earlier step: not the table's
        for step in (1, 2, 3):
            rows.append((est, seed, step, "train", "kl_mean", 10.0 * step + seed))
            rows.append((est, seed, step, "train", "grad_norm", float(step == 2) + seed))
    df = pd.DataFrame(rows, columns=["estimator", "seed", "step", "benchmark", "metric", "value"])
    return contract_runs(df.assign(experiment="exp", variant=df["estimator"], variant_options=""))


def contract_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written as (benchmark "train", un-namespaced metric) for brevity, as runs.parquet
    holds them (vopd.results): source train / eval, no benchmark and n = 0 for training rows,
    n = 4 for the avg@4 evaluations, namespaced training metrics."""
    train = df["benchmark"] == "train"
    df = df.assign(
        source=train.map({True: "train", False: "eval"}),
        benchmark=df["benchmark"].where(~train, ""),
        n=(~train).astype("int64") * 4,
        metric=[
            contract.metric_name(m) if t else m for m, t in zip(df["metric"], train, strict=True)
        ],
    )
    return contract.validate(df[contract.RUNS_COLUMNS], "runs", "test frame")


def test_accuracy_table_by_hand():
    refs = pd.DataFrame(
        {
            "experiment": "exp",
            "model": ["teacher", "teacher"],
            "benchmark": ["toy_test", "toy_hard"],
            "metric": ["avg@4", "avg@4"],
            "value": [0.9, 0.8],
        }
    )
    csv, md = report.accuracy_table(runs_frame(), refs)

    def row(est, bench, metric="avg@4"):
        sel = csv[(csv["variant"] == est) & (csv["benchmark"] == bench)]
        sel = sel[sel["metric"] == metric] if metric else sel
        assert len(sel) == 1
        return sel.iloc[0]

    assert row("sample_opd", "toy_test")["mean"] == pytest.approx(0.55)
    assert row("sample_opd", "toy_test")["std"] == pytest.approx(math.sqrt(0.005))
    assert row("sample_opd", "toy_test")["step"] == 10
    # average over benchmarks per seed: sample_opd (0.40, 0.50), vopd (0.50, 0.60)
    avg = csv[(csv["benchmark"] == "average") & (csv["metric"] != "delta_vs_sample_opd")]
    assert avg.set_index("variant")["mean"].to_dict() == pytest.approx(
        {"sample_opd": 0.45, "vopd": 0.55}
    )
    # paired by seed: vopd - sample_opd = (0.10, 0.10): mean 0.1, std 0
    delta = row("vopd", "average", "delta_vs_sample_opd")
    assert delta["mean"] == pytest.approx(0.1) and delta["std"] == pytest.approx(0.0)
    assert row("reference:teacher", "toy_hard")["mean"] == 0.8
    assert "| vopd | vOPD | 0.400 ± 0.141 [0.300, 0.500] | 0.700 ± 0.000 [0.700, 0.700] |" in md
    assert "(2/2 seeds > 0)" in md
    assert "*teacher* |  | 0.800 | 0.900 | 0.850 |" in md  # toy_hard, toy_test, mean
    assert row("reference:teacher", "toy_hard")["estimator"] == "none"


def variants_frame() -> pd.DataFrame:
    """Two variants of vopd_topk (k = 16 and k = 4: displayed by k) and sample_opd."""
    rows = []
    for var, est, opts, base in (
        ("sample_opd", "sample_opd", "", 0.4),
        ("vopd_topk_k16", "vopd_topk", "top_k=16", 0.6),
        ("vopd_topk_k4", "vopd_topk", "top_k=4", 0.5),
    ):
        for seed in (0, 1):
            rows.append((var, est, opts, seed, 10, "toy_test", "avg@4", base + seed / 10))
            rows.append((var, est, opts, seed, 1, "train", "kl_mean", base))
    cols = ["variant", "estimator", "variant_options", "seed", "step", "benchmark", "metric"]
    return contract_runs(pd.DataFrame(rows, columns=[*cols, "value"]).assign(experiment="exp"))


def test_variants_are_rows_of_their_own_in_catalog_then_option_order():
    csv, md = report.accuracy_table(variants_frame(), None)
    assert list(dict.fromkeys(csv["variant"])) == ["sample_opd", "vopd_topk_k4", "vopd_topk_k16"]
    k16 = csv[(csv["variant"] == "vopd_topk_k16") & (csv["metric"] == "avg@4")].iloc[0]
    assert (k16["estimator"], k16["variant_options"]) == ("vopd_topk", "top_k=16")
    assert k16["mean"] == pytest.approx(0.65)
    assert "| vopd_topk_k16 | vOPD top-k (top_k=16) | 0.650 ±" in md
    sweep, smd = report.sweep_table(variants_frame(), None, "top_k")
    assert set(sweep["top_k"].dropna()) == {"4", "16"}
    assert "| estimator | top_k = 4 | top_k = 16 |" in smd
    assert "| vOPD top-k | 0.550 ±" in smd
    assert "sample OPD (sets no top_k)" in smd
    training, _ = report.training_table(variants_frame(), window=1)
    assert set(training["variant"]) == {"sample_opd", "vopd_topk_k4", "vopd_topk_k16"}


def test_older_files_without_variant_columns_read_as_one_variant_per_estimator():
    runs = report.with_variants(runs_frame().drop(columns=["variant", "variant_options"]))
    assert (runs["variant"] == runs["estimator"]).all() and set(runs["variant_options"]) == {""}


def test_headline_metric_needs_the_n_of_its_rows():
    ev = runs_frame().query("source == 'eval'")
    assert report.headline_metric(ev, "avg") == "avg@4"
    with pytest.raises(ValueError, match=r"no avg@8 metric"):
        report.headline_metric(ev.assign(n=8), "avg")


def test_cli_rejects_a_file_that_breaks_the_contract(tmp_path):
    root = tmp_path / "exp"
    root.mkdir()
    bad = {
        "runs": ("training", runs_frame().drop(columns=["source"]), r"\['source'\] missing"),
        "variance": ("variance", variance_frame().astype({"seed": float}), "'seed' has dtype"),
    }
    for kind, (table, frame, match) in bad.items():
        frame.to_parquet(root / f"{kind}.parquet")
        with pytest.raises(SystemExit, match=rf"{kind}\.parquet: column.*{match}"):
            main(["--results-dir", str(root), "--what", "tables", "--only", table])


def test_training_table_final_window_max_and_mean():
    csv, _ = report.training_table(runs_frame(), window=2)
    kl = csv[(csv["variant"] == "vopd") & (csv["metric"] == "kl_mean")].iloc[0]
    # last 2 steps: seed 0 (20, 30) -> 25, seed 1 (21, 31) -> 26
    assert kl["mean"] == pytest.approx(25.5) and kl["statistic"] == "final"
    gmax = csv[(csv["metric"] == "grad_norm") & (csv["statistic"] == "max")]
    assert gmax.set_index("variant")["mean"].to_dict() == pytest.approx(
        {"sample_opd": 1.5, "vopd": 1.5}
    )


def variance_frame() -> pd.DataFrame:
    rows = []
    for seed, (tv_ref, tv_vopd) in enumerate(((4.0, 2.0), (5.0, 4.0))):
        for est, tv in (("sample_opd", tv_ref), ("vopd", tv_vopd)):
            rows.append((est, seed, 10, "total_variance", tv, "sample_opd", "probe"))
            rows.append((est, seed, 10, "cosine_to_full_opd", 0.5, "sample_opd", "probe"))
        for step in (1, 2):
            rows.append(("sample_opd", seed, step, "adam_proxy", 2.0 * step, "sample_opd", "train"))
            rows.append(("vopd", seed, step, "adam_proxy", 1.0 * step, "vopd", "train"))
    cols = ["estimator", "seed", "step", "probe", "value", "run_estimator", "source"]
    df = pd.DataFrame(rows, columns=cols)
    df = df.assign(experiment="exp", variant=df["estimator"], run_variant=df["run_estimator"])
    df = df.assign(variant_options="")
    return contract.validate(df[contract.VARIANCE_COLUMNS], "variance", "test frame")


def test_variance_table_ratios_by_hand():
    csv, md = report.variance_table(variance_frame())
    tv = csv[(csv["estimator"] == "vopd") & (csv["probe"] == "total_variance_ratio")].iloc[0]
    # per seed 2/4 = 0.5 and 4/5 = 0.8
    assert tv["mean"] == pytest.approx(0.65) and tv["step"] == 10
    assert tv["std"] == pytest.approx(math.sqrt(0.045))
    adam = csv[(csv["estimator"] == "vopd") & (csv["probe"] == "adam_proxy_ratio")].iloc[0]
    assert adam["mean"] == pytest.approx(0.5)  # (1 + 2) / (2 + 4) in both seeds
    cos = csv[(csv["estimator"] == "vopd") & (csv["probe"] == "cosine_to_full_opd")].iloc[0]
    assert cos["mean"] == 0.5
    assert "total_variance ratio @ step 10" in md


def profile_frame() -> pd.DataFrame:
    nan = float("nan")
    return pd.DataFrame(
        {
            "estimator": ["sample_opd", "sample_opd", "full_opd", "vopd", "full_opd"],
            "vocab_size": [1000] * 5,
            "seq_len": [64] * 5,
            "batch": [2] * 5,
            "step_s": [0.20, 0.10, 0.30, 0.12, nan],  # two repeats of sample_opd: best is 0.10
            "peak_mem_bytes": [2**20, 2**20, 3 * 2**20, 1.5 * 2**20, nan],
            "device": ["cpu"] * 5,
            "status": ["ok"] * 4 + ["failed: out of memory"],  # a failed variant is left out
        }
    )


def test_cost_table_best_time_and_ratios():
    csv, md = report.cost_table(profile_frame())
    got = csv.set_index("estimator")
    assert got.loc["sample_opd", "step_s"] == 0.10
    assert got.loc["full_opd", "time_ratio"] == pytest.approx(3.0)
    assert got.loc["vopd", "mem_ratio"] == pytest.approx(1.5)
    assert "| full_opd | 0.300 s (3.000x), 3 MiB (3.000x) |" in md


def test_cost_table_shows_both_paths():
    """Rows of ``python -m vopd.profile --mode hidden`` (path logits / hidden) next to rows of
    mode loss without the columns: three tables, and the hidden path's ratios to the logits
    path of the same estimator and configuration."""
    old = profile_frame()
    hidden = pd.DataFrame(
        {
            "estimator": ["sample_opd", "vopd"] * 2,
            "vocab_size": [1000] * 4,
            "seq_len": [64] * 4,
            "batch": [2] * 4,
            "step_s": [0.10, 0.20, 0.12, 0.30],
            "peak_mem_bytes": [4 * 2**20, 6 * 2**20, 2 * 2**20, 3 * 2**20],
            "above_inputs_bytes": [2 * 2**20, 4 * 2**20, 2**19, 2**19],
            "device": ["cpu"] * 4,
            "mode": ["hidden"] * 4,
            "path": ["logits", "logits", "hidden", "hidden"],
            "hidden_size": [16] * 4,
            "status": ["ok"] * 4,
        }
    )
    csv, md = report.cost_table(pd.concat([old, hidden], ignore_index=True))
    assert md.count("**device = cpu") == 3
    assert "mode = hidden, path = hidden, hidden_size = 16" in md
    assert "mode = loss, path = logits, hidden_size = 0" in md
    got = csv[csv["path"] == "hidden"].set_index("estimator")
    assert got.loc["vopd", "time_vs_logits"] == pytest.approx(1.5)
    assert got.loc["vopd", "mem_vs_logits"] == pytest.approx(0.125)
    assert got.loc["vopd", "time_ratio"] == pytest.approx(2.5)  # vs sample_opd, hidden path
    assert csv[csv["path"] == "logits"]["time_vs_logits"].isna().all()
    assert "vs logits path 1.500x time, 0.125x memory above inputs" in md
    old_rows = csv[csv["mode"] == "loss"].set_index("estimator")
    assert old_rows.loc["full_opd", "time_ratio"] == pytest.approx(3.0)  # as without the rest


# ---- CLI: files on disk -----------------------------------------------------------------------


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "exp"
    root.mkdir()
    runs_frame().to_parquet(root / "runs.parquet")
    variance_frame().to_parquet(root / "variance.parquet")
    profile_frame().to_parquet(root / "profile.parquet")
    return root


def test_cli_writes_tables_figures_and_report(results):
    out = main(["--results-dir", str(results), "--smooth", "2"])
    for name in set(report.TABLES) - {"sweep"}:  # sweep: only with --sweep
        assert (results / "tables" / f"{name}.csv").stat().st_size > 0
        assert (results / "tables" / f"{name}.md").read_text().startswith(f"# {name}")
    assert not (results / "tables" / "sweep.md").exists()
    for name in set(report.FIGURES) - {"sweep"}:
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 1000
    text = (results / "report.md").read_text()
    assert "![accuracy](figures/accuracy.png)" in text
    assert "**C6 (vOPD >= sample OPD)**: vopd − sample_opd = 0.100 ± 0.000" in text
    assert "total variance vopd / sample_opd = step 10: 0.650" in text
    assert "report.md" in out["written"]


def test_cli_reruns_are_byte_identical(results):
    main(["--results-dir", str(results), "--what", "tables"])
    main(["--results-dir", str(results), "--what", "figures", "--only", "cost"])
    first = {p: p.read_bytes() for p in (results / "tables").iterdir()}
    pdf = (results / "figures" / "cost.pdf").read_bytes()
    main(["--results-dir", str(results), "--what", "tables"])
    main(["--results-dir", str(results), "--what", "figures", "--only", "cost"])
    assert {p: p.read_bytes() for p in (results / "tables").iterdir()} == first
    assert (results / "figures" / "cost.pdf").read_bytes() == pdf


def test_cli_bad_input(results, tmp_path):
    with pytest.raises(SystemExit, match="--only nope"):
        main(["--results-dir", str(results), "--only", "nope"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--results-dir", str(tmp_path / "missing")])
    (results / "profile.parquet").unlink()
    with pytest.raises(SystemExit, match=r"profile\.parquet is missing"):
        main(["--results-dir", str(results), "--what", "tables", "--only", "cost"])


def test_cli_ablation_sweep_and_the_main_report_section(tmp_path):
    abl = tmp_path / "exp_ablation_topk"
    abl.mkdir()
    variants_frame().to_parquet(abl / "runs.parquet")
    desc = "Top-k as k grows."
    main(["--results-dir", str(abl), "--sweep", "top_k", "--description", desc])
    for ext in ("png", "pdf"):
        assert (abl / "figures" / f"sweep.{ext}").stat().st_size > 1000
    assert "top_k = 16" in (abl / "tables" / "sweep.md").read_text()
    assert "> Top-k as k grows." in (abl / "report.md").read_text()
    main_dir = tmp_path / "exp"
    main_dir.mkdir()
    runs_frame().to_parquet(main_dir / "runs.parquet")
    missing = tmp_path / "exp_ablation_clip"  # declared, not built: named, never required
    main(["--results-dir", str(main_dir), "--what", "summary", "--ablations", f"{abl},{missing}"])
    text = (main_dir / "report.md").read_text()
    assert "### Ablation `topk`" in text and "Top-k as k grows." in text
    assert "](../exp_ablation_topk/figures/sweep.png)" in text
    assert "`clip` (`snakemake --cores all ablation_clip`)" in text
