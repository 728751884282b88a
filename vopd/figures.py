"""The report's figures (PNG + PDF), drawn from the aggregated Parquet files.

    python -m vopd.report --results-dir results/toy --what figures [--only accuracy]

Every figure draws one mark or line per *variant* (an estimator with its options and trainer
overrides), labelled with the estimator's catalog label and the options, in catalog order.

- ``accuracy``: the headline metric per variant, one panel per benchmark; bar = mean over
  seeds, error bar = 95% bootstrap CI of that mean, dots = seeds, dotted / dashed = the student
  before OPD / the teacher.
- ``training_curves``: KL to the teacher, gradient norm, response length and entropy against the
  step; line = mean over seeds of a rolling mean, band = ± one std over seeds.
- ``variance_ratio``: probe total variance / the reference estimator's at the same checkpoint
  (left) and the Adam proxy of each run / the reference run's with the same seed (right).
- ``cost``: best step time and peak memory against the vocabulary size (log-log), per estimator.
- ``sweep`` (an ablation with ``--sweep KEY``): the headline accuracy against KEY, one line per
  estimator, one panel per benchmark and the mean; variants that do not set KEY as horizontal
  lines.

Files are written atomically; PDFs carry no creation date, so reruns give identical files.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vopd import catalog, results
from vopd.io import atomic_path
from vopd.report import (
    REFERENCE_LABEL,
    _value_key,
    cost_summary,
    estimator_order,
    load,
    own_cost,
    parse_options,
    per_seed_accuracy,
    probe_ratios,
    reference_cost_estimator,
    seed_stats,
    variant_info,
    variant_label,
    variant_order,
)

# metrics.jsonl names (vopd.results); panels are titled with the key without its namespace
CURVE_METRICS = ("estimator/kl_mean", "train/grad_norm", "train/response_len", "estimator/entropy")


def color(estimator: str):
    palette = plt.get_cmap("tab20").colors
    names = catalog.names()
    if estimator in names:
        return palette[names.index(estimator) % len(palette)]
    return palette[sum(map(ord, estimator)) % len(palette)]


def variant_colors(names, info: dict) -> dict:
    """One colour per variant: its estimator's when every estimator has one variant (the
    same colours in every figure), else one palette entry per variant in display order."""
    ests = [info.get(n, (n, ""))[0] for n in names]
    if len(set(ests)) == len(ests):
        return {n: color(e) for n, e in zip(names, ests, strict=True)}
    palette = plt.get_cmap("tab20").colors
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def save(fig, results_dir: Path, name: str) -> None:
    for ext in ("png", "pdf"):
        with atomic_path(results_dir / "figures" / f"{name}.{ext}") as tmp:
            meta = {"CreationDate": None} if ext == "pdf" else {}
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=meta)
    plt.close(fig)


def _band(ax, steps, mean, std, rgb, label):
    ax.plot(steps, mean, color=rgb, label=label, lw=1.5)
    ax.fill_between(steps, mean - std, mean + std, color=rgb, alpha=0.2, lw=0)


# ---- figures --------------------------------------------------------------------------------


def accuracy(results_dir: Path, args):
    runs = load(results_dir, "runs")
    info = variant_info(runs)
    wide, metrics, steps = per_seed_accuracy(runs, args.metric)
    refs = load(results_dir, "references", required=False)
    benches = list(metrics)
    ests = variant_order(wide.index.get_level_values(0).unique(), info)
    colors = variant_colors(ests, info)
    fig, axes = plt.subplots(
        1, len(benches), figsize=(1.2 + 1.1 * len(ests) * len(benches), 3.6), squeeze=False
    )
    for ax, bench in zip(axes[0], benches, strict=True):
        for i, est in enumerate(ests):
            vals = wide.loc[est, bench].dropna().to_numpy()
            s = seed_stats(vals)
            ax.bar(i, s["mean"], color=colors[est], alpha=0.75)
            ax.errorbar(
                i,
                s["mean"],
                yerr=[[s["mean"] - s["ci_lo"]], [s["ci_hi"] - s["mean"]]],
                color="black",
                capsize=3,
                lw=1,
            )
            jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else [0.0]
            ax.scatter(i + np.asarray(jitter), vals, color="black", s=8, zorder=3)
        if refs is not None and not refs.empty:
            for model, style in (("student", ":"), ("teacher", "--")):
                sel = refs[
                    (refs["model"] == model)
                    & (refs["benchmark"] == bench)
                    & (refs["metric"] == metrics[bench])
                ]
                if len(sel):
                    ax.axhline(
                        float(sel["value"].iloc[0]),
                        color="gray",
                        ls=style,
                        lw=1,
                        label=REFERENCE_LABEL.get(model, model),
                    )
                    ax.legend(fontsize=7, loc="lower right")
        labels = [variant_label(e, info) for e in ests]
        ax.set_xticks(range(len(ests)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{bench} (step {steps[bench]})", fontsize=9)
        ax.set_ylabel(metrics[bench])
    fig.tight_layout()
    save(fig, results_dir, "accuracy")


def training_curves(results_dir: Path, args):
    runs = load(results_dir, "runs")
    info = variant_info(runs)
    tr = runs[runs["source"] == "train"]
    order = variant_order(tr["variant"].unique(), info)
    colors = variant_colors(order, info)
    metrics = [m for m in CURVE_METRICS if m in set(tr["metric"])] or sorted(set(tr["metric"]))[:4]
    if not metrics:
        raise ValueError("runs.parquet has no training rows (source 'train')")
    ncols = 2 if len(metrics) > 1 else 1
    nrows = int(np.ceil(len(metrics) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        sel = tr[tr["metric"] == metric]
        for est in [v for v in order if v in set(sel["variant"])]:
            wide = sel[sel["variant"] == est].pivot(index="step", columns="seed", values="value")
            smooth = wide.rolling(args.smooth, min_periods=1).mean()
            std = (
                smooth.std(axis=1, ddof=1).fillna(0.0)
                if smooth.shape[1] > 1
                else 0.0 * smooth.iloc[:, 0]
            )
            _band(ax, smooth.index, smooth.mean(axis=1), std, colors[est], variant_label(est, info))
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(results.split_metric(metric)[1])
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, results_dir, "training_curves")


def variance_ratio(results_dir: Path, args):
    var = load(results_dir, "variance")
    info = variant_info(var)
    ref = args.reference_estimator
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.6))
    ratios = probe_ratios(var, ref)
    tv = ratios[ratios["probe"] == "total_variance"]
    if tv.empty:
        tv = ratios  # whatever variance-type probe there is
    order = variant_order(set(var["variant"]), info)
    colors = variant_colors(order, info)
    for est in [v for v in order if v in set(tv["variant"])]:
        g = tv[tv["variant"] == est]
        probe = g["probe"].iloc[0]
        stats = g.groupby("step")["ratio"].agg(["mean", "std"]).fillna(0.0)
        left.errorbar(
            stats.index,
            stats["mean"],
            yerr=stats["std"],
            color=colors[est],
            marker="o",
            capsize=3,
            label=variant_label(est, info) + ("" if probe == "total_variance" else f" {probe}"),
        )
    left.axhline(1.0, color="gray", lw=0.8, ls="--")
    left.set_xlabel("checkpoint step")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel(f"total variance / {ref}")
    left.set_title("probes at fixed checkpoints", fontsize=9)
    if not tv.empty:
        left.legend(fontsize=7)
    train = var[(var["source"] == "train") & (var["probe"] == "adam_proxy")]
    if not train.empty and ref in set(train["variant"]):
        wide = train.pivot_table(index="step", columns=["variant", "seed"], values="value")
        smooth = wide.rolling(args.smooth, min_periods=1).mean()
        for est in [v for v in order if v in set(train["variant"])]:
            seeds = [s for s in smooth[est].columns if s in smooth[ref].columns]
            ratio = smooth[est][seeds] / smooth[ref][seeds]
            std = (
                ratio.std(axis=1, ddof=1).fillna(0.0) if len(seeds) > 1 else 0.0 * ratio.iloc[:, 0]
            )
            _band(
                right, ratio.index, ratio.mean(axis=1), std, colors[est], variant_label(est, info)
            )
        right.axhline(1.0, color="gray", lw=0.8, ls="--")
        right.set_yscale("log")
        right.legend(fontsize=7)
    right.set_xlabel("training step")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel(f"Adam proxy / {ref} (same seed)")
    right.set_title("Adam-moment proxy during training", fontsize=9)
    fig.tight_layout()
    save(fig, results_dir, "variance_ratio")


def cost(results_dir: Path, args):
    ref = reference_cost_estimator(results_dir, args.reference_estimator)
    agg, _ = cost_summary(load(results_dir, "profile"), ref)
    agg = own_cost(agg)  # the estimator's own cost; train_step and the hidden path: the table
    agg = agg[agg["seq_len"] == agg["seq_len"].max()]
    agg = agg[agg["batch"] == agg["batch"].min()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.6))
    for est in estimator_order(agg["estimator"].unique()):
        g = agg[agg["estimator"] == est].groupby("vocab_size")[["step_s", "peak_mem_bytes"]].min()
        lab = catalog.label(est)
        left.plot(g.index, g["step_s"], marker="o", color=color(est), label=lab)
        right.plot(g.index, g["peak_mem_bytes"] / 2**20, marker="o", color=color(est), label=lab)
    device = ", ".join(sorted(map(str, agg["device"].unique())))
    for ax, ylabel in ((left, "time of loss + backward (s)"), (right, "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.set_title(f"T = {agg['seq_len'].max()}, B = {agg['batch'].min()}, {device}", fontsize=9)
    left.legend(fontsize=7)
    fig.tight_layout()
    save(fig, results_dir, "cost")


def sweep(results_dir: Path, args):
    key = getattr(args, "sweep", None)
    if not key:
        raise ValueError("--only sweep needs --sweep KEY (the option the variants sweep)")
    runs = load(results_dir, "runs")
    info = variant_info(runs)
    wide, metrics, steps = per_seed_accuracy(runs, args.metric)
    refs = load(results_dir, "references", required=False)
    cols = [*metrics, "average"] if len(metrics) > 1 else list(metrics)
    variants = variant_order(wide.index.get_level_values(0).unique(), info)
    lines, flat = {}, []
    for var in variants:
        est, opts = info.get(var, (var, ""))
        value = parse_options(opts).get(key)
        if value is None:
            flat.append(var)
        else:
            lines.setdefault(est, []).append((_value_key(value)[1], var))
    swept = [parse_options(info[v][1])[key] for pts in lines.values() for _, v in pts]
    numeric = all(_value_key(value)[0] == 0 for value in swept)
    fig, axes = plt.subplots(1, len(cols), figsize=(0.6 + 3.6 * len(cols), 3.4), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        for est in estimator_order(lines):
            pts = sorted(lines[est])
            stats = [seed_stats(wide.loc[v, col].dropna()) for _, v in pts]
            x = [p[0] for p in pts] if numeric else list(range(len(pts)))
            mean = np.array([s["mean"] for s in stats])
            err = [mean - [s["ci_lo"] for s in stats], [s["ci_hi"] for s in stats] - mean]
            style = {"marker": "o", "capsize": 3, "color": color(est)}
            ax.errorbar(x, mean, yerr=err, label=catalog.label(est), **style)
        for var in flat:
            s = seed_stats(wide.loc[var, col].dropna())
            rgb = color(info.get(var, (var, ""))[0])
            ax.axhline(s["mean"], color=rgb, ls="--", lw=1, label=variant_label(var, info))
        if refs is not None and not refs.empty and col in metrics:
            for model, style in (("student", ":"), ("teacher", "-.")):
                ok = (refs["model"] == model) & (refs["benchmark"] == col)
                sel = refs[ok & (refs["metric"] == metrics[col])]
                if len(sel):
                    label = REFERENCE_LABEL.get(model, model)
                    value = float(sel["value"].iloc[0])
                    ax.axhline(value, color="gray", ls=style, lw=1, label=label)
        if numeric:
            xs = sorted({p[0] for pts in lines.values() for p in pts})
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
                ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(key)
        ax.set_ylabel(metrics.get(col, f"{args.metric}@n, mean over benchmarks"))
        step = steps.get(col, max(steps.values()))
        ax.set_title(f"{col} (step {step})", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, results_dir, "sweep")


DRAW = {
    "accuracy": accuracy,
    "training_curves": training_curves,
    "variance_ratio": variance_ratio,
    "cost": cost,
    "sweep": sweep,
}


def draw(results_dir: Path, name: str, args) -> None:
    DRAW[name](results_dir, args)
