"""Tables, figures and ``report.md`` from an experiment's aggregated Parquet files.

    python -m vopd.report --results-dir results/toy [--what tables|figures|summary|all]
        [--only accuracy,cost] [--metric avg] [--smooth 5] [--reference-estimator sample_opd]
        [--sweep top_k] [--description TEXT] [--ablations results/toy_ablation_topk,...]

Reads ``runs.parquet``, ``references.parquet``, ``variance.parquet`` and ``profile.parquet``
(``python -m vopd.aggregate``; files only, never torch) and writes, atomically:

- ``tables/{accuracy,training,variance,cost}.{csv,md}``: one row per variant (an estimator with
  its options and trainer overrides; the CSVs carry ``variant``, ``estimator`` and
  ``variant_options``, the Markdown the variant and its estimator's label with the options),
  in catalog order of the estimator, then by option value; mean ± sample std over training
  seeds and a 95% bootstrap CI of the mean over seeds. Accuracy is the headline
  metric (``avg@n`` by default, the real n) of each benchmark at the last evaluated step, their
  mean over benchmarks, and the seed-paired difference to the reference estimator (the runs of
  one seed share the student's initial weights and the prompt order, so pairing removes that
  noise). Variance: probe ratios to the reference estimator at the same checkpoint, and the
  Adam-proxy ratio over training (ratio of the training means, per seed). Cost: time and peak
  memory per estimator and (V, T), with ratios to the reference estimator (cost does not depend
  on the variant: ``variant`` = ``estimator`` there). With ``--sweep KEY`` (an ablation that
  sweeps an option or override), ``tables/sweep`` has the headline accuracy per estimator at each
  value of KEY.
- ``figures/*.{png,pdf}`` (see :mod:`vopd.figures`) and ``report.md``, which embeds the tables
  and figures and states what they say about the paper's claims C4, C6-C9 (docs/method.md §3);
  with ``--ablations DIR,...`` (the main experiment), a section for each ablation built so far
  (its description, headline table and figure, and a link to its own report).

The bootstrap is exact for up to 8 seeds: every resample is enumerated with its multinomial
probability (no random numbers, so the tables are reproducible to the last digit); above that a
seeded Monte Carlo bootstrap (10,000 resamples). Both use the same percentile rule: the bound at
level q is the smallest resampled mean whose cumulative probability reaches q.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

# torch-free: the estimators' display order and labels; the results contract (schemas,
# metric names, probe kinds)
from vopd import catalog, results
from vopd.io import write_text

TABLES = results.TABLES
# How the reference rows (models evaluated without OPD) are labelled in tables and figures.
REFERENCE_LABEL = {"student": "student (before OPD)", "teacher": "teacher"}
FIGURES = results.FIGURES
# metrics.jsonl names (vopd.results); tables show the key without its namespace
TRAINING_METRICS = (
    "estimator/kl_mean",
    "estimator/reward_mean",
    "estimator/entropy",
    "train/response_len",
    "train/grad_norm",
    "perf/step_s",
)
# The probes the Markdown variance table shows (variance.csv has all of them): ratios to the
# reference estimator, then raw values (names of python -m vopd.variance).
MD_RATIO_PROBES = ("total_variance", "exact_position_variance")
MD_RAW_PROBES = ("cosine_to_full_opd_debiased", "bias_ratio_vs_full_opd")
EXACT_MAX_N = 8
LEVEL = 0.95


# ---- statistics over seeds ------------------------------------------------------------------


def exact_bootstrap(values) -> tuple[np.ndarray, np.ndarray]:
    """The exact bootstrap distribution of the mean: every multiset of n draws with replacement,
    its mean and its probability n! / (prod_i c_i!) / n^n. Returns (means, probs), sorted."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    means, probs = [], []
    for combo in itertools.combinations_with_replacement(range(n), n):
        counts = Counter(combo)
        log_p = math.lgamma(n + 1) - sum(math.lgamma(c + 1) for c in counts.values())
        probs.append(math.exp(log_p - n * math.log(n)))
        means.append(sum(x[i] * c for i, c in counts.items()) / n)
    order = np.argsort(means, kind="stable")
    return np.asarray(means)[order], np.asarray(probs)[order]


def bootstrap_ci(values, level: float = LEVEL, n_boot: int = 10_000, seed: int = 0):
    """(lo, hi) percentile bootstrap CI of the mean (exact for n <= 8, else seeded Monte Carlo)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap_ci: no values")
    alpha = (1.0 - level) / 2.0
    if len(x) <= EXACT_MAX_N:
        means, probs = exact_bootstrap(x)
    else:
        idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
        means = np.sort(x[idx].mean(axis=1))
        probs = np.full(n_boot, 1.0 / n_boot)
    cdf = np.cumsum(probs)
    eps = 1e-12  # cumulative sums of exact probabilities may round just below the level

    def bound(q: float) -> float:
        return float(means[np.searchsorted(cdf, q - eps, side="left")])

    return bound(alpha), bound(1.0 - alpha)


def seed_stats(values) -> dict:
    """n, mean, sample std (ddof 1; NaN for one seed) and the bootstrap CI of the mean."""
    x = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(x)
    std = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
    return {"n_seeds": len(x), "mean": float(x.mean()), "std": std, "ci_lo": lo, "ci_hi": hi}


def fmt_num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if abs(x) < 1e-12 * (1 + abs(x)):  # float noise of an exact zero (e.g. a std of equal values)
        x = 0.0
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:.3f}"
    return f"{x:.3g}"


def fmt_mib(nbytes: float) -> str:
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.3g}"


def fmt_stats(s: dict) -> str:
    """'0.712 ± 0.031 [0.680, 0.740]' (one seed: the value alone)."""
    if s["n_seeds"] == 1:
        return fmt_num(s["mean"])
    return (
        f"{fmt_num(s['mean'])} ± {fmt_num(s['std'])} [{fmt_num(s['ci_lo'])}, {fmt_num(s['ci_hi'])}]"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def estimator_order(names) -> list[str]:
    """Catalog display order (vopd.catalog); names it does not know come last, sorted."""
    return sorted(set(names), key=catalog.order_key)


# ---- variants -------------------------------------------------------------------------------
# A variant is a named estimator with options and trainer overrides (vopd.catalog.Variant); the
# aggregated files carry ``variant``, ``estimator`` and ``variant_options`` ("k=v, k=v").


def with_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Files without variant columns (older aggregates): every estimator is its own variant."""
    if df is None:
        return df
    if "variant" not in df.columns and "estimator" in df.columns:
        df = df.assign(variant=df["estimator"])
    if "variant_options" not in df.columns:
        df = df.assign(variant_options="")
    if "run_estimator" in df.columns and "run_variant" not in df.columns:
        df = df.assign(run_variant=df["run_estimator"])
    df["variant_options"] = df["variant_options"].fillna("").astype(str)
    return df


def variant_info(*frames) -> dict[str, tuple[str, str]]:
    """``{variant: (estimator, variant_options)}`` of every variant in the frames."""
    info = {}
    for df in frames:
        if df is None or df.empty or "variant" not in df.columns:
            continue
        for r in df[["variant", "estimator", "variant_options"]].drop_duplicates().itertuples():
            info.setdefault(str(r.variant), (str(r.estimator), str(r.variant_options)))
    return info


def parse_options(text: str) -> dict[str, str]:
    """``'lr=0.001, top_k=4'`` -> ``{'lr': '0.001', 'top_k': '4'}``."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(", "))):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def _value_key(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def variant_order(names, info: dict) -> list[str]:
    """Display order: the estimator's catalog order, then the options (numerically where
    they are numbers: k = 1, 2, 4, ...), then the name."""

    def key(name):
        est, opts = info.get(name, (name, ""))
        parsed = sorted((k, _value_key(v)) for k, v in parse_options(opts).items())
        return (catalog.order_key(est), parsed, _natural(name))

    return sorted(set(names), key=key)


def variant_label(name: str, info: dict) -> str:
    """The estimator's catalog label and the variant's options: ``vOPD top-k (top_k=4)``."""
    est, opts = info.get(name, (name, ""))
    return catalog.label(est) + (f" ({opts})" if opts else "")


def variant_columns(name: str, info: dict) -> dict:
    """The variant columns of a table CSV row."""
    est, opts = info.get(name, (name, ""))
    return {"variant": name, "estimator": est, "variant_options": opts}


# ---- accuracy -------------------------------------------------------------------------------


def headline_metric(rows: pd.DataFrame, family: str) -> str:
    """The metric ``{family}@n`` of evaluation rows, n = the largest of their ``n`` column
    (the samples per problem; pass@k: k = n)."""
    n = int(rows["n"].max())
    metric = results.eval_metric(family, n)
    if metric not in set(rows["metric"]):
        raise ValueError(f"no {metric} metric among {sorted(set(rows['metric']))}")
    return metric


def per_seed_accuracy(runs: pd.DataFrame, family: str):
    """(wide, metrics, steps): wide = (variant, seed) x benchmark of the headline metric at
    each benchmark's last evaluated step, plus an ``average`` column (mean over benchmarks)."""
    runs = with_variants(runs)
    ev = runs[runs["source"] == "eval"]
    if ev.empty:
        raise ValueError("runs.parquet has no evaluation rows (source 'eval')")
    parts, metrics, steps = [], {}, {}
    for bench in sorted(ev["benchmark"].unique()):
        rows = ev[ev["benchmark"] == bench]
        metrics[bench] = headline_metric(rows, family)
        steps[bench] = int(rows["step"].max())
        sel = rows[(rows["metric"] == metrics[bench]) & (rows["step"] == steps[bench])]
        parts.append(sel.set_index(["variant", "seed"])["value"].rename(bench))
    wide = pd.concat(parts, axis=1)
    wide["average"] = wide[list(metrics)].mean(axis=1, skipna=False)
    return wide, metrics, steps


def paired_delta(wide: pd.DataFrame, a: str, b: str, column: str = "average"):
    """Per-seed ``a - b`` of ``column`` over the seeds both variants have (None if none)."""
    if a not in wide.index.get_level_values(0) or b not in wide.index.get_level_values(0):
        return None
    diff = (wide.loc[a, column] - wide.loc[b, column]).dropna()
    return diff if len(diff) else None


def accuracy_table(runs, references, family="avg", reference_estimator="sample_opd"):
    runs = with_variants(runs)
    info = variant_info(runs)
    wide, metrics, steps = per_seed_accuracy(runs, family)
    benches = list(metrics)
    columns = [*benches, "average"] if len(benches) > 1 else benches
    variants = variant_order(wide.index.get_level_values(0).unique(), info)
    csv_rows, md_rows = [], []
    for var in variants:
        cells = [var, variant_label(var, info)]
        for col in columns:
            s = seed_stats(wide.loc[var, col].dropna())
            metric = metrics.get(col, f"{family}@n mean over benchmarks")
            csv_rows.append(
                {
                    **variant_columns(var, info),
                    "benchmark": col,
                    "metric": metric,
                    "step": steps.get(col, max(steps.values())),
                    **s,
                }
            )
            cells.append(fmt_stats(s))
        delta = paired_delta(wide, var, reference_estimator, columns[-1])
        if var != reference_estimator and delta is not None:
            s = seed_stats(delta)
            csv_rows.append(
                {
                    **variant_columns(var, info),
                    "benchmark": columns[-1],
                    "metric": f"delta_vs_{reference_estimator}",
                    "step": steps.get(columns[-1], max(steps.values())),
                    **s,
                }
            )
            cells.append(f"{fmt_stats(s)} ({int((delta > 0).sum())}/{len(delta)} seeds > 0)")
        else:
            cells.append("—")
        md_rows.append(cells)
    if references is not None and not references.empty:
        for model in sorted(references["model"].unique()):
            cells, vals = [f"*{REFERENCE_LABEL.get(model, model)}*", ""], []
            for bench in benches:
                sel = references[
                    (references["model"] == model)
                    & (references["benchmark"] == bench)
                    & (references["metric"] == metrics[bench])
                ]
                value = float(sel["value"].iloc[0]) if len(sel) else float("nan")
                vals.append(value)
                csv_rows.append(
                    {
                        "variant": f"reference:{model}",
                        "estimator": "none",
                        "variant_options": "",
                        "benchmark": bench,
                        "metric": metrics[bench],
                        "step": 0,
                        "n_seeds": 1,
                        "mean": value,
                        "std": float("nan"),
                        "ci_lo": value,
                        "ci_hi": value,
                    }
                )
                cells.append(fmt_num(value))
            if len(benches) > 1:
                cells.append(fmt_num(float(np.mean(vals))))
            md_rows.append([*cells, "—"])
    header = [
        "variant",
        "estimator (options)",
        *[f"{c} {metrics[c]}" if c in metrics else c for c in columns],
        f"Δ {columns[-1]} vs {reference_estimator} (paired by seed)",
    ]
    note = (
        f"Step {max(steps.values())}; mean ± std over seeds [95% bootstrap CI of the mean]; "
        f"{family}@n = the benchmark's headline metric with its n samples per problem.\n"
    )
    return pd.DataFrame(csv_rows), markdown_table(header, md_rows) + "\n" + note


def sweep_table(runs, references, sweep: str, family="avg"):
    """An ablation's headline accuracy (mean over benchmarks) per estimator at each value of
    the option or override ``sweep``; variants that do not set it are rows of their own."""
    runs = with_variants(runs)
    info = variant_info(runs)
    wide, metrics, steps = per_seed_accuracy(runs, family)
    col = "average" if len(metrics) > 1 else next(iter(metrics))
    points, anchors = {}, []
    for var in variant_order(wide.index.get_level_values(0).unique(), info):
        est, opts = info.get(var, (var, ""))
        value = parse_options(opts).get(sweep)
        if value is None:
            anchors.append(var)
        else:
            points.setdefault(est, {})[value] = var
    values = sorted({v for p in points.values() for v in p}, key=_value_key)
    metric = metrics.get(col, f"{family}@n mean over benchmarks")
    csv_rows, md_rows = [], []
    for est in estimator_order(points):
        cells = [catalog.label(est)]
        for value in values:
            var = points[est].get(value)
            if var is None:
                cells.append("—")
                continue
            s = seed_stats(wide.loc[var, col].dropna())
            base = {**variant_columns(var, info), sweep: value, "benchmark": col}
            csv_rows.append({**base, "metric": metric, **s})
            cells.append(fmt_stats(s))
        md_rows.append(cells)
    for var in anchors:
        s = seed_stats(wide.loc[var, col].dropna())
        base = {**variant_columns(var, info), sweep: None, "benchmark": col}
        csv_rows.append({**base, "metric": metric, **s})
        label = f"{variant_label(var, info)} (sets no {sweep})"
        md_rows.append([label, *[fmt_stats(s)] * len(values)])
    header = ["estimator", *[f"{sweep} = {v}" for v in values]]
    what = "mean over benchmarks" if col == "average" else col
    note = (
        f"{family}@n ({what}) at step {max(steps.values())} against {sweep}; mean ± std over "
        "seeds [95% bootstrap CI]. Every variant's own row is in accuracy.md.\n"
    )
    return pd.DataFrame(csv_rows), markdown_table(header, md_rows) + "\n" + note


# ---- training -------------------------------------------------------------------------------


def training_table(runs, window: int = 5):
    """Final-window means (last ``window`` logged steps) of the training metrics per seed, the
    largest gradient norm over training, and the mean step time over training."""
    runs = with_variants(runs)
    info = variant_info(runs)
    tr = runs[runs["source"] == "train"]
    if tr.empty:
        raise ValueError("runs.parquet has no training rows (source 'train')")
    metrics = [m for m in TRAINING_METRICS if m in set(tr["metric"])]
    specs = [(m, "final") for m in metrics if m != "perf/step_s"]
    if "train/grad_norm" in metrics:
        specs.append(("train/grad_norm", "max"))
    if "perf/step_s" in metrics:
        specs.append(("perf/step_s", "mean"))
    csv_rows, md_rows = [], []
    for var in variant_order(tr["variant"].unique(), info):
        cells = [var, variant_label(var, info)]
        for metric, stat in specs:
            per_seed = []
            for _, g in tr[(tr["variant"] == var) & (tr["metric"] == metric)].groupby("seed"):
                g = g.sort_values("step")
                if stat == "final":
                    per_seed.append(g["value"].iloc[-window:].mean())
                elif stat == "max":
                    per_seed.append(g["value"].max())
                else:
                    per_seed.append(g["value"].mean())
            s = seed_stats(per_seed)
            key = results.split_metric(metric)[1]  # the table's name: kl_mean
            csv_rows.append({**variant_columns(var, info), "metric": key, "statistic": stat, **s})
            cells.append(fmt_stats(s))
        md_rows.append(cells)
    header = [
        "variant",
        "estimator (options)",
        *[f"{results.split_metric(m)[1]} ({st})" for m, st in specs],
    ]
    note = (
        f"final = mean of the last {window} logged steps; max / mean over all steps; "
        "mean ± std over seeds [95% bootstrap CI].\n"
    )
    return pd.DataFrame(csv_rows), markdown_table(header, md_rows) + "\n" + note


# ---- variance -------------------------------------------------------------------------------


is_variance_probe = results.is_variance_probe  # by the probe's declared kind


def probe_ratios(var: pd.DataFrame, reference_estimator: str) -> pd.DataFrame:
    """Probe rows of variance-type probes divided by the reference variant's value at the
    same checkpoint (run_variant, seed, step, probe)."""
    var = with_variants(var)
    probes = var[(var["source"] == "probe") & var["probe"].map(is_variance_probe)]
    keys = ["run_variant", "seed", "step", "probe"]
    ref = probes[probes["variant"] == reference_estimator].set_index(keys)["value"]
    out = probes.join(ref.rename("ref"), on=keys)
    return out.assign(ratio=out["value"] / out["ref"]).dropna(subset=["ratio"])


def adam_ratios(var: pd.DataFrame, reference_estimator: str) -> pd.DataFrame:
    """Per (variant, seed): mean Adam proxy over training / the reference run's (same seed)."""
    var = with_variants(var)
    train = var[(var["source"] == "train") & (var["probe"] == "adam_proxy")]
    means = train.groupby(["variant", "seed"])["value"].mean()
    if reference_estimator not in means.index.get_level_values(0):
        return pd.DataFrame(columns=["variant", "seed", "ratio"])
    ref = means.loc[reference_estimator]
    rows = [
        {"variant": e, "seed": s, "ratio": v / ref[s]}
        for (e, s), v in means.items()
        if s in ref.index
    ]
    return pd.DataFrame(rows)


def variance_table(var, reference_estimator="sample_opd"):
    var = with_variants(var)
    if var.empty:
        raise ValueError("variance.parquet is empty: no probes and no adam_* training metrics")
    info = variant_info(var)
    ratios = probe_ratios(var, reference_estimator)
    adam = adam_ratios(var, reference_estimator)
    others = var[(var["source"] == "probe") & ~var["probe"].map(is_variance_probe)]
    csv_rows, header_cols = [], []
    cells_by_row: dict[tuple[str, str], dict[str, str]] = {}
    multi_run = ratios["run_variant"].nunique() > 1

    def row_key(v, run_v):
        return (v, f"{v} @ {run_v} checkpoints" if multi_run else v)

    shown_ratio = [p for p in MD_RATIO_PROBES if p in set(ratios["probe"])] or sorted(
        set(ratios["probe"])
    )
    last_probe_step = ratios["step"].max() if not ratios.empty else None
    for (run_v, probe, step, v), g in ratios.groupby(["run_variant", "probe", "step", "variant"]):
        s = seed_stats(g["ratio"])
        base = {**variant_columns(v, info), "run_variant": run_v}
        csv_rows.append({**base, "probe": f"{probe}_ratio", "step": step} | s)
        # Markdown: the headline probe at every step, the other shown ones at the last step.
        if probe in shown_ratio and (probe == shown_ratio[0] or step == last_probe_step):
            col = f"{probe} ratio @ step {step}"
            header_cols.append(col)
            cells_by_row.setdefault(row_key(v, run_v), {})[col] = fmt_stats(s)
    last = others["step"].max() if not others.empty else None
    for (run_v, probe, v), g in others[others["step"] == last].groupby(
        ["run_variant", "probe", "variant"]
    ):
        s = seed_stats(g["value"])
        csv_rows.append(
            {**variant_columns(v, info), "run_variant": run_v, "probe": probe, "step": last} | s
        )
        if probe in MD_RAW_PROBES:
            col = f"{probe} @ step {last}"
            header_cols.append(col)
            cells_by_row.setdefault(row_key(v, run_v), {})[col] = fmt_stats(s)
    for v, g in adam.groupby("variant"):
        s = seed_stats(g["ratio"])
        base = {**variant_columns(v, info), "run_variant": v}
        csv_rows.append({**base, "probe": "adam_proxy_ratio", "step": -1} | s)
        col = "Adam proxy ratio (own run, training mean)"
        header_cols.append(col)
        cells_by_row.setdefault((v, v), {})[col] = fmt_stats(s)

    def column_order(col: str):
        if col.startswith("Adam proxy"):
            return (2, 0, 0)
        name, _, step = col.partition(" @ step ")
        if name.endswith(" ratio"):
            return (0, shown_ratio.index(name[: -len(" ratio")]), int(step))
        return (1, MD_RAW_PROBES.index(name), 0)

    header_cols = sorted(dict.fromkeys(header_cols), key=column_order)
    order = variant_order({v for v, _ in cells_by_row}, info)
    rows = [
        [
            shown,
            variant_label(v, info),
            *[cells_by_row[(v, shown)].get(c, "—") for c in header_cols],
        ]
        for v in order
        for (vv, shown) in sorted(cells_by_row)
        if vv == v
    ]
    note = (
        f"Ratios to {reference_estimator} (below 1 = less variance). Probes: the same "
        "checkpoint for every variant; Adam proxy: sum(v_hat - m_hat^2) of each variant's "
        "own run, ratio of training means paired by seed (step -1 in the CSV). "
        "Mean ± std over seeds [95% bootstrap CI]. Every probe is in variance.csv.\n"
    )
    header = ["variant", "estimator (options)", *header_cols]
    return pd.DataFrame(csv_rows), markdown_table(header, rows) + "\n" + note


# ---- cost -----------------------------------------------------------------------------------


# Settings that make two profile rows different measurements (python -m vopd.profile's extras),
# with the value a row without the column had: the loss on materialised logits.
PROFILE_SETTINGS = {
    "mode": "loss",
    "dtype": "float32",
    "path": "logits",
    "hidden_size": 0,
    "head_grad": False,
}


def cost_summary(prof: pd.DataFrame, reference_estimator="sample_opd") -> pd.DataFrame:
    """Best (min) time and largest peak memory per configuration, with ratios to the reference
    estimator in the same (device, extra settings, V, T, batch). Rows of the hidden-state path
    (``path`` = hidden, ``vopd.estimators.hidden``) also get ``time_vs_logits`` = t_hidden /
    t_logits and ``mem_vs_logits`` = (peak above the inputs)_hidden / (…)_logits against the
    same estimator on the logits path of the same configuration (NaN where there is none)."""
    if "status" in prof.columns:  # variants that failed (e.g. out of memory) have no numbers
        prof = prof[prof["status"].fillna("ok") == "ok"]
    prof = prof[np.isfinite(prof["step_s"]) & np.isfinite(prof["peak_mem_bytes"])]
    extra = [c for c in PROFILE_SETTINGS if c in prof.columns]
    prof = prof.assign(**{c: prof[c].fillna(PROFILE_SETTINGS[c]) for c in extra})
    if "hidden_size" in extra:
        prof = prof.assign(hidden_size=prof["hidden_size"].astype(int))
    keys = ["device", *extra, "vocab_size", "seq_len", "batch"]
    above = "above_inputs_bytes" if "above_inputs_bytes" in prof.columns else "peak_mem_bytes"
    agg = prof.groupby([*keys, "estimator"], as_index=False).agg(
        step_s=("step_s", "min"),
        peak_mem_bytes=("peak_mem_bytes", "max"),
        _above=(above, "max"),
    )
    ref = agg[agg["estimator"] == reference_estimator].set_index(keys)
    agg = agg.join(ref[["step_s", "peak_mem_bytes"]].add_suffix("_ref"), on=keys)
    agg["time_ratio"] = agg["step_s"] / agg["step_s_ref"]
    agg["mem_ratio"] = agg["peak_mem_bytes"] / agg["peak_mem_bytes_ref"]
    agg = agg.drop(columns=["step_s_ref", "peak_mem_bytes_ref"])
    if "path" in extra and (agg["path"] == "hidden").any():
        same = [k for k in keys if k != "path"] + ["estimator"]
        logits = agg[agg["path"] == "logits"].set_index(same)[["step_s", "_above"]]
        agg = agg.join(logits.add_suffix("_logits"), on=same)
        hidden = agg["path"] == "hidden"
        agg["time_vs_logits"] = (agg["step_s"] / agg["step_s_logits"]).where(hidden)
        agg["mem_vs_logits"] = (agg["_above"] / agg["_above_logits"]).where(hidden)
        agg = agg.drop(columns=["step_s_logits", "_above_logits"])
    return agg.drop(columns=["_above"]), keys


def own_cost(agg: pd.DataFrame) -> pd.DataFrame:
    """The estimator's own cost (mode loss on random logits) where the profile has it: the
    rows of claim C9 and the cost figure; train_step and the hidden path are in the table."""
    if "mode" in agg.columns and (agg["mode"] == "loss").any():
        agg = agg[agg["mode"] == "loss"]
    if "hidden_size" in agg.columns and (agg["hidden_size"] == 0).any():
        agg = agg[agg["hidden_size"] == 0]
    return agg


def cost_table(prof, reference_estimator="sample_opd"):
    """Cost per estimator (no variants: ``variant`` = ``estimator`` in the CSV)."""
    agg, keys = cost_summary(prof, reference_estimator)
    group_keys = keys[:-3]
    md = []
    for group, g in agg.groupby(group_keys):
        group = group if isinstance(group, tuple) else (group,)
        title = ", ".join(f"{k} = {v}" for k, v in zip(group_keys, group, strict=True))
        configs = sorted({(r.vocab_size, r.seq_len, r.batch) for r in g.itertuples()})
        header = ["estimator", *[f"V={v}, T={t}, B={b}" for v, t, b in configs]]
        rows = []
        for est in estimator_order(g["estimator"].unique()):
            cells = [est]
            for v, t, b in configs:
                r = g[
                    (g["estimator"] == est)
                    & (g["vocab_size"] == v)
                    & (g["seq_len"] == t)
                    & (g["batch"] == b)
                ]
                if r.empty:
                    cells.append("—")
                    continue
                r = r.iloc[0]
                cell = (
                    f"{fmt_num(r.step_s)} s ({fmt_num(r.time_ratio)}x), "
                    f"{fmt_mib(r.peak_mem_bytes)} MiB ({fmt_num(r.mem_ratio)}x)"
                )
                if np.isfinite(getattr(r, "time_vs_logits", np.nan)):
                    cell += (
                        f"; vs logits path {fmt_num(r.time_vs_logits)}x time, "
                        f"{fmt_num(r.mem_vs_logits)}x memory above inputs"
                    )
                cells.append(cell)
            rows.append(cells)
        md.append(f"**{title}**\n\n" + markdown_table(header, rows))
    note = (
        f"Best time of the repeats and peak memory; (Nx) = ratio to {reference_estimator} "
        "in the same configuration."
    )
    if "time_vs_logits" in agg.columns:
        note += (
            " path = hidden: the loss from [B, T, H] hidden states and [V, H] heads without "
            "[B, T, V] logits (vopd.estimators.hidden, the trainer's loss_from_hidden); "
            "path = logits: the same inputs with both models' logits materialised; vs logits "
            "path = the same estimator and configuration on the logits path (time; peak memory "
            "above the inputs, weights included in the inputs)."
        )
    note += "\n"
    csv = agg.copy()
    csv.insert(0, "variant", csv["estimator"])
    return csv, "\n".join(md) + "\n" + note


# ---- I/O ------------------------------------------------------------------------------------


def load(results_dir: Path, name: str, required: bool = True):
    """An aggregated Parquet file (runs and variance with their variant columns)."""
    path = results_dir / f"{name}.parquet"
    if not path.is_file():
        if required:
            raise ValueError(f"{path} is missing: run python -m vopd.aggregate first")
        return None
    df = results.read(path, name)  # untrusted: columns and dtypes checked
    return with_variants(df) if name in ("runs", "variance") else df


def reference_cost_estimator(results_dir: Path, ref: str) -> str:
    """The estimator of the reference variant (cost is per estimator)."""
    runs = load(results_dir, "runs", required=False)
    info = variant_info(runs) if runs is not None else {}
    return info.get(ref, (ref, ""))[0]


def build_table(results_dir: Path, name: str, args) -> tuple[pd.DataFrame, str]:
    ref = args.reference_estimator
    if name == "accuracy":
        refs = load(results_dir, "references", required=False)
        return accuracy_table(load(results_dir, "runs"), refs, args.metric, ref)
    if name == "sweep":
        if not getattr(args, "sweep", None):
            raise ValueError("--only sweep needs --sweep KEY (the option the variants sweep)")
        refs = load(results_dir, "references", required=False)
        return sweep_table(load(results_dir, "runs"), refs, args.sweep, args.metric)
    if name == "training":
        return training_table(load(results_dir, "runs"), args.smooth)
    if name == "variance":
        return variance_table(load(results_dir, "variance"), ref)
    return cost_table(load(results_dir, "profile"), reference_cost_estimator(results_dir, ref))


def write_table(results_dir: Path, name: str, df: pd.DataFrame, md: str) -> None:
    out = results_dir / "tables"
    write_text(out / f"{name}.csv", df.to_csv(index=False, float_format="%.10g"))
    write_text(out / f"{name}.md", f"# {name}\n\n{md}")


# ---- report.md ------------------------------------------------------------------------------


def claims(results_dir: Path, args) -> list[str]:
    """One line per checkable paper claim (docs/method.md §3), with the numbers behind it."""
    ref, lines = args.reference_estimator, []
    runs = load(results_dir, "runs", required=False)
    if runs is not None and (runs["source"] == "eval").any():
        wide, _, _ = per_seed_accuracy(runs, args.metric)
        for claim, a, b in (
            ("C6 (vOPD >= sample OPD)", "vopd", "sample_opd"),
            ("C7 (vOPD ~ full OPD)", "vopd", "full_opd"),
            ("C8 (vOPD top-k ~ vOPD)", "vopd_topk", "vopd"),
        ):
            delta = paired_delta(wide, a, b)
            if delta is None:
                continue
            s = seed_stats(delta)
            if s["n_seeds"] < 2:
                sign = "one seed: no CI"
            else:
                sign = "the CI " + ("contains 0" if s["ci_lo"] <= 0 <= s["ci_hi"] else "excludes 0")
            lines.append(
                f"- **{claim}**: {a} − {b} = {fmt_stats(s)} in mean {args.metric}@n "
                f"over benchmarks, paired over {s['n_seeds']} seeds "
                f"({int((delta > 0).sum())} positive); {sign}."
            )
    var = load(results_dir, "variance", required=False)
    if var is not None and not var.empty:
        ratios = probe_ratios(var, ref)
        for est in ("vopd", "opt_baseline", "full_opd"):
            g = ratios[(ratios["variant"] == est) & (ratios["probe"] == "total_variance")]
            if len(g):
                per_step = ", ".join(
                    f"step {s}: {fmt_stats(seed_stats(x['ratio']))}" for s, x in g.groupby("step")
                )
                lines.append(f"- **C4 (variance)**: total variance {est} / {ref} = {per_step}.")
        adam = adam_ratios(var, ref)
        g = adam[adam["variant"] == "vopd"]
        if len(g):
            lines.append(
                f"- **C4 (Adam proxy)**: vopd / {ref} over training = "
                f"{fmt_stats(seed_stats(g['ratio']))}."
            )
    prof = load(results_dir, "profile", required=False)
    if prof is not None and not prof.empty:
        agg, _ = cost_summary(prof, reference_cost_estimator(results_dir, ref))
        agg = own_cost(agg)
        top = agg[agg["vocab_size"] == agg["vocab_size"].max()]
        top = top[top["seq_len"] == top["seq_len"].max()]
        parts = [
            f"{r.estimator} {fmt_num(r.time_ratio)}x time, {fmt_num(r.mem_ratio)}x memory"
            for r in top.sort_values("estimator").itertuples()
        ]
        lines.append(
            f"- **C9 (cost)** at V = {top['vocab_size'].max()}, T = "
            f"{top['seq_len'].max()} vs {ref}: " + "; ".join(parts) + "."
        )
    return lines


SECTIONS = (  # (title, table, figure) of report.md, in order
    ("Accuracy", "accuracy", "accuracy"),
    ("Accuracy against the swept setting", "sweep", "sweep"),
    ("Training", "training", "training_curves"),
    ("Gradient variance", "variance", "variance_ratio"),
    ("Cost", "cost", "cost"),
)


def _table_body(md_path: Path) -> str:
    return md_path.read_text().split("\n", 2)[-1]


def ablation_section(report_dir: Path, folder: Path) -> list[str]:
    """The main report's section of one built ablation: its description, its headline table
    (the sweep table when it sweeps a setting, else accuracy) and figure, and the variance
    table when it probed; paths relative to the main report."""
    rel = Path("..") / folder.name
    name = folder.name.split("_ablation_", 1)[-1]
    out = [f"### Ablation `{name}`\n"]
    quoted = [ln for ln in (folder / "report.md").read_text().splitlines() if ln.startswith("> ")]
    if quoted:
        out.append(quoted[0][2:] + "\n")  # the ablation's description
    out.append(
        f"Runs in `{folder}/`; its own report: [{rel}/report.md]({rel}/report.md) "
        f"(`snakemake --cores all ablation_{name}`).\n"
    )
    for table, figure in (("sweep", "sweep"), ("accuracy", "accuracy")):
        md = folder / "tables" / f"{table}.md"
        if md.is_file():
            if (folder / "figures" / f"{figure}.png").is_file():
                out.append(f"![{name} {figure}]({rel}/figures/{figure}.png)\n")
            out.append(_table_body(md))
            break
    if table == "sweep":
        acc = folder / "tables" / "accuracy.md"
        if acc.is_file():
            out.append(_table_body(acc))
    var = folder / "tables" / "variance.md"
    runs_probed = folder / "variance.parquet"
    if var.is_file() and runs_probed.is_file():
        probed = results.read(runs_probed, "variance")
        if (probed["source"] == "probe").any():
            out.append(_table_body(var))
    return out


def write_summary(results_dir: Path, args) -> None:
    exp = results_dir.name
    out = [
        f"# vopd results: {exp}\n",
        f"Generated by `python -m vopd.report --results-dir {results_dir}` from the Parquet "
        "files of this folder (`runs.parquet`, `variance.parquet`, `profile.parquet`). "
        "Tables: `tables/*.csv` (machine-readable) and `tables/*.md`; figures: "
        "`figures/*.png` / `.pdf`. Every row is a *variant*: an estimator with its options "
        "and trainer overrides.\n",
    ]
    description = getattr(args, "description", None)
    if description:
        out.append("> " + " ".join(description.split()) + "\n")  # one line: read back below
    runs = load(results_dir, "runs", required=False)
    if runs is not None:
        tr = runs[runs["source"] == "train"]
        benches = sorted(set(runs.loc[runs["source"] == "eval", "benchmark"]))
        out.append(
            f"Runs: {tr['variant'].nunique()} variants of {tr['estimator'].nunique()} "
            f"estimators x {tr['seed'].nunique()} seeds, "
            f"{int(tr['step'].max()) if len(tr) else 0} steps; benchmarks: "
            f"{', '.join(benches) or 'none'}.\n"
        )
    lines = claims(results_dir, args)
    if lines:
        out += [
            "## What the numbers say about the paper's claims\n",
            *lines,
            "\nWith few seeds the bootstrap CIs are coarse; read the per-seed signs too.\n",
        ]
    for title, table, figure in SECTIONS:
        md_path = results_dir / "tables" / f"{table}.md"
        png = results_dir / "figures" / f"{figure}.png"
        if not md_path.is_file() and not png.is_file():
            continue
        out.append(f"## {title}\n")
        if png.is_file():
            out.append(f"![{figure}](figures/{figure}.png)\n")
        if md_path.is_file():
            out.append(_table_body(md_path))
    ablations = [Path(p) for p in (getattr(args, "ablations", None) or "").split(",") if p]
    built = [a for a in ablations if (a / "report.md").is_file()]
    if ablations:
        out.append("## Ablations\n")
        missing = [a.name.split("_ablation_", 1)[-1] for a in ablations if a not in built]
        if missing:
            out.append(
                "Not built yet: "
                + ", ".join(f"`{m}` (`snakemake --cores all ablation_{m}`)" for m in missing)
                + "; rerun `snakemake --cores all` after building one to add its section here.\n"
            )
        for folder in built:
            out += ablation_section(results_dir, folder)
    write_text(results_dir / "report.md", "\n".join(out))
