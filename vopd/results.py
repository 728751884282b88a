"""The results contract: where every result lives, and what every results file holds.

One module states it; writers and readers both use it (the trainer, ``vopd.aggregate``,
``vopd.report``, ``vopd.figures``, ``vopd.data``, ``vopd.toy.world`` and the workflow). It is
torch-free. The prose version is docs/metrics.md §0 and the README's "results contract".

- **Paths.** A run is one variant and one seed: ``results/{experiment}/{variant}/seed{seed}/``
  (:func:`run_dir`), holding :data:`RUN_FILES`. The aggregated Parquet files of an experiment
  are ``results/{experiment}/{kind}.parquet``, ``kind`` in :data:`AGGREGATES`; its tables and
  figures are :data:`TABLES` and :data:`FIGURES`.
- **Schemas.** :data:`SCHEMAS` gives every Parquet file's columns and dtypes (runs, variance,
  references, profile, benchmark). :func:`validate` checks a frame against one and raises a
  ValueError naming the file, the column and what was expected: a file read back from a results
  directory is untrusted, so every reader goes through :func:`read`.
- **Metrics.** Every ``metrics.jsonl`` key but ``step`` is namespaced, ``{namespace}/{key}``
  with namespace ``train`` (the optimisation: loss, lr, gradient norm, lengths), ``estimator``
  (what the estimator and its inputs measure: KL, reward, advantages, the Adam-moment proxy) or
  ``perf`` (wall-clock: ``time_*_s``, ``step_s``, ``tokens_per_s``); :func:`namespaced` makes a
  trainer row, :func:`check_metrics_record` rejects an un-namespaced one (a run directory of a
  release before this contract: there is no silent mapping).
- **Sources and probe kinds.** ``runs.parquet`` rows have ``source`` ``train`` (a training
  curve point: ``benchmark`` empty, ``n`` 0) or ``eval`` (``benchmark`` and ``n``, the samples
  per problem of that evaluation); ``variance.parquet`` rows ``source`` ``probe`` or ``train``.
  Every probe name has a kind (:data:`PROBES`): ``variance`` probes are the ones that tables
  divide by the reference estimator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# ---- paths ----------------------------------------------------------------------------------

RESULTS = "results"
RUN_FILES = {
    "config.yaml": "the resolved trainer config (vopd.config.TrainConfig)",
    "env.json": "library versions and the machine",
    "metrics.jsonl": "one JSON object per optimizer step, keys namespaced (METRIC_NAMESPACES)",
    "resumes.jsonl": "one line per resume: from_step, time",
    "reused_from.json": "a run copied from another experiment's (vopd.experiments.copy_run)",
    "done.json": "written last: the run finished",
    "checkpoints/step{step}/": "weights (or a LoRA adapter); the newest holds the resume state",
    "eval/{benchmark}/step{step}/summary.json": "an evaluation's metrics (avg@n, pass@k, maj@n)",
    "variance/step{step}.parquet": "a variance probe (SCHEMAS['probe'])",
}
# What belongs to the training itself (evaluations, probes and logs belong to the experiment
# that made them): what a reused run copies.
TRAINING_FILES = ("config.yaml", "metrics.jsonl", "env.json", "resumes.jsonl")
TRAINING_DIRS = ("checkpoints",)
REFERENCE_SUMMARY = "reference/{model}/eval/{benchmark}/summary.json"
AGGREGATES = ("runs", "references", "variance", "profile")
TABLES = ("accuracy", "training", "variance", "cost", "sweep")
FIGURES = ("accuracy", "training_curves", "variance_ratio", "cost", "sweep")
NOT_RUNS = {"reference", "profile", "tables", "figures", "logs", "benchmark"}  # not variants


def run_dir(experiment: str, variant: str, seed: int, root: str | Path = RESULTS) -> Path:
    """``{root}/{experiment}/{variant}/seed{seed}``: one run's directory."""
    return Path(root) / experiment / variant / f"seed{int(seed)}"


def aggregate_path(results_dir: str | Path, kind: str) -> Path:
    """``{results_dir}/{kind}.parquet``, ``kind`` one of :data:`AGGREGATES`."""
    if kind not in AGGREGATES:
        raise ValueError(f"unknown aggregate {kind!r}: expected one of {AGGREGATES}")
    return Path(results_dir) / f"{kind}.parquet"


# ---- metrics.jsonl ----------------------------------------------------------------------------

METRIC_NAMESPACES = ("train", "estimator", "perf")
TRAIN_KEYS = frozenset({"loss", "grad_norm", "lr", "response_len", "truncated_frac", "num_tokens"})
PERF_KEYS = frozenset({"step_s", "tokens_per_s"})  # and every time_*_s


def namespace_of(key: str) -> str:
    """The namespace of a trainer metric key: ``train``, ``perf`` or ``estimator``."""
    if key in TRAIN_KEYS:
        return "train"
    if key in PERF_KEYS or (key.startswith("time_") and key.endswith("_s")):
        return "perf"
    return "estimator"


def metric_name(key: str) -> str:
    """``{namespace}/{key}``, the name of a trainer metric in metrics.jsonl and runs.parquet."""
    return f"{namespace_of(key)}/{key}"


def split_metric(name: str) -> tuple[str, str]:
    """``(namespace, key)`` of a namespaced metric name; a ValueError if it is not one."""
    namespace, sep, key = name.partition("/")
    if not sep or namespace not in METRIC_NAMESPACES or not key:
        raise ValueError(
            f"metric {name!r} is not namespaced: expected one of "
            f"{[f'{n}/...' for n in METRIC_NAMESPACES]}"
        )
    return namespace, key


def namespaced(step: int, metrics: dict) -> dict:
    """A metrics.jsonl record: ``step`` and every key of ``metrics`` as :func:`metric_name`."""
    return {"step": int(step), **{metric_name(k): v for k, v in metrics.items()}}


def check_metrics_record(record, where: str) -> dict:
    """Return ``record`` if it is a metrics.jsonl record of this contract (an integer ``step``,
    every other key namespaced); a ValueError naming ``where`` otherwise. An old run directory
    (un-namespaced keys such as ``loss``) is rejected, not translated."""
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError(f"{where}: expected a JSON object with an integer 'step', got {record!r}")
    for key in record:
        if key == "step":
            continue
        try:
            split_metric(key)
        except ValueError:
            raise ValueError(
                f"{where}: key {key!r} is not namespaced (expected train/..., estimator/... or "
                "perf/..., docs/metrics.md): a metrics.jsonl written before the results "
                "contract. Delete the run directory and rerun it"
            ) from None
    return record


# ---- probes -----------------------------------------------------------------------------------

PROBE_KINDS = ("variance", "ratio", "norm", "cosine", "bias", "fraction", "count", "adam")
PROBES = {  # every probe name of variance.parquet (docs/metrics.md §1) and its kind
    "total_variance": "variance",
    "total_variance_biased": "variance",
    "variance_ratio_to_sample_opd": "ratio",
    "mean_grad_norm": "norm",
    "mean_grad_sqnorm_debiased": "norm",
    "snr": "ratio",
    "cosine_to_full_opd": "cosine",
    "cosine_to_full_opd_debiased": "cosine",
    "mean_diff_sqnorm_to_full_opd": "bias",
    "bias_ratio_vs_full_opd": "bias",
    "exact_position_variance": "variance",
    "removable_variance": "variance",
    "irreducible_variance": "variance",
    "removed_fraction": "fraction",
    "exact_position_signal": "norm",
    "exact_position_bias_sqnorm": "bias",
    "k": "count",
    "num_positions": "count",
    # the trainer's Adam-moment proxy (vopd.gradstats, metrics.jsonl estimator/adam_*)
    "adam_proxy": "variance",
    "adam_proxy_relu": "variance",
    "adam_proxy_per_elem": "variance",
    "adam_v_sum": "adam",
    "adam_m2_sum": "adam",
    "adam_count": "count",
}
ADAM_PROBES = tuple(p for p in PROBES if p.startswith("adam_"))


def probe_kind(name: str) -> str:
    """The kind of a probe (:data:`PROBES`); a ValueError for an unknown probe."""
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}: expected one of {sorted(PROBES)}")
    return PROBES[name]


def is_variance_probe(name: str) -> bool:
    """Whether tables and figures divide this probe by the reference estimator's."""
    return probe_kind(name) == "variance"


# ---- evaluations ------------------------------------------------------------------------------

EVAL_FAMILIES = ("avg", "pass", "maj")


def eval_metric(family: str, n: int) -> str:
    """The summary.json key of a metric family at n samples: ``avg@4``."""
    if family not in EVAL_FAMILIES:
        raise ValueError(f"unknown metric family {family!r}: expected one of {EVAL_FAMILIES}")
    return f"{family}@{int(n)}"


# ---- Parquet schemas --------------------------------------------------------------------------

STR, INT, FLOAT, LIST = "string", "int64", "float64", "list<string>"


@dataclass(frozen=True)
class Schema:
    """A Parquet file's columns (in order) and dtypes; ``extra``: other columns allowed
    after them; ``values``: the allowed values of a column."""

    name: str
    columns: dict
    extra: bool = False
    values: tuple = ()

    @property
    def names(self) -> list[str]:
        return list(self.columns)


_VARIANT = {"variant": STR, "estimator": STR}
SCHEMAS = {
    "runs": Schema(
        "runs",
        {
            "experiment": STR,
            **_VARIANT,
            "seed": INT,
            "step": INT,
            "source": STR,
            "benchmark": STR,
            "n": INT,
            "metric": STR,
            "value": FLOAT,
            "variant_options": STR,
        },
        values=(("source", ("train", "eval")),),
    ),
    "variance": Schema(
        "variance",
        {
            "experiment": STR,
            **_VARIANT,
            "seed": INT,
            "step": INT,
            "probe": STR,
            "value": FLOAT,
            "run_variant": STR,
            "run_estimator": STR,
            "source": STR,
            "variant_options": STR,
        },
        values=(("source", ("probe", "train")), ("probe", tuple(PROBES))),
    ),
    "references": Schema(
        "references",
        {
            "experiment": STR,
            "model": STR,
            "benchmark": STR,
            "n": INT,
            "metric": STR,
            "value": FLOAT,
            **_VARIANT,
        },
    ),
    "profile": Schema(
        "profile",
        {
            "estimator": STR,
            "vocab_size": INT,
            "seq_len": INT,
            "batch": INT,
            "step_s": FLOAT,
            "peak_mem_bytes": FLOAT,
            "device": STR,
        },
        extra=True,
    ),
    "probe": Schema(  # variance/step{N}.parquet, what python -m vopd.variance writes
        "probe",
        {"experiment": STR, **_VARIANT, "seed": INT, "step": INT, "probe": STR, "value": FLOAT},
        values=(("probe", tuple(PROBES)),),
    ),
    "benchmark": Schema(  # one row per problem (docs/evaluation.md)
        "benchmark",
        {
            "id": STR,
            "problem": STR,
            "prompt": STR,
            "answer": STR,
            "choices": LIST,
            "kind": STR,
            "source": STR,
        },
    ),
}
RUNS_COLUMNS = SCHEMAS["runs"].names
VARIANCE_COLUMNS = SCHEMAS["variance"].names
REFERENCE_COLUMNS = SCHEMAS["references"].names
PROFILE_COLUMNS = SCHEMAS["profile"].names
PROBE_COLUMNS = SCHEMAS["probe"].names
BENCHMARK_COLUMNS = tuple(SCHEMAS["benchmark"].names)


def benchmark_arrow_schema():
    """The benchmark Parquet schema as a pyarrow schema (what vopd.data and the toy world
    write)."""
    import pyarrow as pa

    types = {STR: pa.string(), LIST: pa.list_(pa.string())}
    return pa.schema([(c, types[t]) for c, t in SCHEMAS["benchmark"].columns.items()])


def _dtype_ok(series: pd.Series, want: str) -> bool:
    if want == INT:
        return pd.api.types.is_integer_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if want == FLOAT:
        return pd.api.types.is_float_dtype(series)
    if want == STR:
        return (pd.api.types.is_string_dtype(series) or series.dtype == object) and bool(
            series.map(lambda v: isinstance(v, str)).all()
        )
    return series.dtype == object  # list<string>: checked by pyarrow on write


def validate(df: pd.DataFrame, kind: str, where: str | Path) -> pd.DataFrame:
    """``df`` if it has exactly the columns and dtypes of ``SCHEMAS[kind]`` (and allowed
    values); a ValueError naming ``where``, the column and what was expected otherwise."""
    schema = SCHEMAS[kind]
    expected = f"{kind} columns {schema.names}"
    missing = [c for c in schema.names if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: column(s) {missing} missing; expected {expected}")
    extra = [c for c in df.columns if c not in schema.columns]
    if extra and not schema.extra:
        raise ValueError(f"{where}: unexpected column(s) {extra}; expected exactly {expected}")
    for col, want in schema.columns.items():
        if not _dtype_ok(df[col], want):
            raise ValueError(
                f"{where}: column {col!r} has dtype {df[col].dtype}, expected {want} ({kind})"
            )
    for col, allowed in schema.values:
        bad = sorted(set(df[col]) - set(allowed))
        if bad:
            raise ValueError(f"{where}: column {col!r} has {bad[:5]}, expected one of {allowed}")
    return df


def read(path: str | Path, kind: str) -> pd.DataFrame:
    """Read a results Parquet file and :func:`validate` it as ``kind``."""
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    return validate(df, kind, path)
