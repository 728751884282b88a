"""The experiments of one workflow config: the main comparison and its declared ablations,
resolved and validated before any job runs.

    from vopd import experiments
    exps = experiments.resolve(config, vocab_size=experiments.toy_vocab_size())
    exps["toy"].variants["vopd_topk"].options                   # {'top_k': 4}
    exps["toy_ablation_topk"].seeds                             # [0, 1, 2]
    experiments.run_overrides(exps["toy"], "vopd", 0, student=..., teacher=..., prompts=...)

``workflow/rules/common.smk`` calls :func:`resolve` while Snakemake parses the config (this
module imports only :mod:`vopd.catalog` and :mod:`vopd.config`, no torch), after the JSON
schema. Every error names the config key, its value and what was expected:

- the variants of ``estimators:`` (and of each ablation) through
  :func:`vopd.catalog.parse_variants`: unknown estimator, an option that estimator does not
  read, an option out of range;
- the cross-field checks a schema cannot express (evaluated and probed steps are checkpoint
  steps, variance runs and the reference are variants of the experiment, ...);
- every run's **resolved trainer config** (``train.config`` + ``train.overrides`` + the
  variant's overrides and options + the workflow's own keys, exactly the ``key=value`` text the
  train rule passes) built as :class:`vopd.config.TrainConfig`: an unknown key, a wrong type, a
  NaN or infinite value, ``top_k`` >= the vocabulary size V (when V is known: the toy world's,
  :func:`toy_vocab_size`; the trainer rejects k >= V) all stop ``snakemake -n``.

An ablation ``ablations.NAME`` is an experiment of its own, ``{experiment}_ablation_{NAME}``:
its runs live in ``results/{experiment}_ablation_{NAME}/{variant}/seed{seed}/`` and it has its
own Parquet files, tables, figures and ``report.md``. It declares its ``estimators`` (variants)
and inherits everything else from the main config unless it overrides it: ``seeds``;
``train.steps``, ``train.save_every`` (``train.overrides`` merged over the main ones);
``eval.steps``, ``eval.references``, ``eval.sampling`` and ``eval.args`` (merged), and
``eval.benchmarks`` (the main config's names; a given entry replaces that benchmark's settings);
``report`` (merged). Its ``variance`` probes run only if it declares ``variance:`` (merged over
the main config's ``k``, ``steps`` and ``args``); it never profiles cost (the estimators' cost
does not depend on the ablated settings).

A run whose resolved trainer config equals an earlier one's (the main comparison's first, then
the ablations' in declaration order; e.g. the clip ablation's ``vopd`` is the main ``vopd``) is
not trained again: the workflow copies its training artefacts (:func:`copy_run`) and evaluates
the copy with the experiment's own settings.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from vopd import catalog, data, results
from vopd.config import TrainConfig, parse_overrides

TOY_BENCHMARKS = tuple(data.TOY_BENCHMARKS)  # what `python -m vopd.toy world` writes
ABLATION_INFIX = "_ablation_"
# The trainer keys the workflow sets itself (python -m vopd.train key=value), by the name of the
# config value they come from: they cannot be overridden.
TRAIN_KEYS = {
    "estimator": "estimator",
    "seed": "seed",
    "student": "student",
    "teacher": "teacher",
    "prompts": "prompts",
    "steps": "max_steps",
    "save_every": "save_every",
}
_SET_BY = {  # where a user sets what the workflow passes as that trainer key
    "estimator": "estimators (a variant's estimator:)",
    "seed": "seeds",
    "student": "models.student (scale hub) or the toy world",
    "teacher": "models.teacher (scale hub) or the toy world",
    "prompts": "train.prompts",
    "max_steps": "train.steps",
    "save_every": "train.save_every",
}
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def config_error(key: str, value, expected: str):
    """Stop before any job runs, naming the config key, its value and what was expected."""
    raise ValueError(f"config key {key!r} = {value!r}: expected {expected}")


def toy_vocab_size() -> int:
    """V of the toy world, computed from its tokenizer (specials + alphabet), never hardcoded."""
    from vopd.toy.tokenizer import ALPHABET, SPECIALS  # tokenizers/transformers, not torch

    return len(SPECIALS) + len(ALPHABET)


def override_text(value) -> str:
    """A value as the trainer's ``key=value`` syntax reads it back (YAML): None -> null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def override_items(mapping: Mapping) -> list[str]:
    """``{'lr': 1e-5, 'top_k': None}`` -> ``['lr=1e-05', 'top_k=null']``, sorted by key."""
    return [f"{k}={override_text(v)}" for k, v in sorted(mapping.items())]


def describe_options(mapping: Mapping) -> str:
    """``{'top_k': 4, 'lr': 0.001}`` -> ``'lr=0.001, top_k=4'`` (the ``variant_options``
    column; empty for a bare estimator)."""
    return ", ".join(f"{k}={override_text(v)}" for k, v in sorted(mapping.items()))


# ---------------------------------------------------------------------------------------------
# Experiments.


@dataclass(frozen=True)
class Experiment:
    """One experiment: everything its rules need, already merged and validated."""

    name: str  # results/{name}/
    ablation: str | None  # the ablation's name; None for the main comparison
    key: str  # where it is declared in the config ("" or "ablations.NAME.")
    description: str
    variants: dict[str, catalog.Variant]
    seeds: list[int]
    train: dict
    eval: dict
    variance: dict
    profile: dict
    report: dict
    sweep: str | None = None  # the option or override the ablation sweeps (its figure's x axis)
    origins: dict = field(default_factory=dict, compare=False)  # variant -> config key
    # (variant, seed) -> the run directory of an earlier run with the same resolved trainer
    # config (the main comparison first, then the ablations in order): copied, not retrained
    reused: dict = field(default_factory=dict, compare=False)

    @property
    def benchmarks(self) -> list[str]:
        return list(self.eval["benchmarks"])

    @property
    def eval_steps(self) -> list[int]:
        return sorted(self.eval["steps"])

    def variance_runs(self) -> list[str]:
        return list(self.variance["runs"]) if self.variance["activate"] else []

    def probe_variants(self) -> dict[str, dict]:
        """The variance probe's subjects as ``--variants`` JSON entries: ``variance.estimators``
        (variants of the experiment or bare catalog names), default every variant."""
        names = self.variance.get("estimators") or list(self.variants)
        out = {}
        for name in names:
            v = self.variants.get(name) or catalog.Variant(name, name, {})
            out[name] = {"estimator": v.estimator, **v.options}
        return out

    def variant_table(self) -> dict[str, dict]:
        """``{variant: {estimator, options}}`` (the aggregate's ``--variants`` JSON): options are
        the variant's estimator options and trainer overrides."""
        return {
            n: {"estimator": v.estimator, "options": {**v.options, **v.overrides}}
            for n, v in self.variants.items()
        }


def _merge(base: Mapping, top: Mapping, deep: tuple[str, ...] = ()) -> dict:
    """``{**base, **top}``, with the keys in ``deep`` merged one level further."""
    out = {**base, **top}
    for k in deep:
        if k in base or k in top:
            out[k] = {**(base.get(k) or {}), **(top.get(k) or {})}
    return out


def _check_steps(key: str, values, train: dict) -> None:
    steps = train["steps"]
    for s in values:
        if s > steps or (s % train["save_every"] != 0 and s != steps):
            config_error(
                key,
                s,
                f"a checkpoint step: 0, a multiple of train.save_every={train['save_every']}, "
                f"or train.steps={steps}",
            )


def _check_experiment(exp: Experiment, cfg: Mapping) -> None:
    """The cross-field checks of one experiment (keys prefixed with ``exp.key``)."""
    k, ev, var = exp.key, exp.eval, exp.variance
    _check_steps(f"{k}eval.steps", ev["steps"], exp.train)
    for name, bench in ev["benchmarks"].items():
        if cfg["scale"] == "toy" and name not in TOY_BENCHMARKS:
            config_error(f"{k}eval.benchmarks.{name}", name, f"one of {TOY_BENCHMARKS}")
        if "backend" in (bench or {}).get("sampling", {}):
            config_error(
                f"{k}eval.benchmarks.{name}.sampling.backend",
                bench["sampling"]["backend"],
                "no per-benchmark backend: one generate job samples every benchmark with one "
                "model load, so set eval.sampling.backend",
            )
    if var["activate"]:
        for key in ("runs", "steps", "k"):
            if key not in var:
                config_error(f"{k}variance.{key}", None, "a value when variance.activate is true")
        _check_steps(f"{k}variance.steps", var["steps"], exp.train)
        for name in var["runs"]:
            if name not in exp.variants:
                config_error(f"{k}variance.runs", name, f"one of the variants {list(exp.variants)}")
        for name in var.get("estimators") or []:
            if name not in exp.variants and name not in catalog.names():
                config_error(
                    f"{k}variance.estimators",
                    name,
                    f"a variant of this experiment {list(exp.variants)} or an estimator "
                    f"{catalog.names()}",
                )
    probed = set(exp.probe_variants()) if var["activate"] else set()
    ref = exp.report["reference_estimator"]
    if ref not in exp.variants and ref not in probed:
        config_error(
            f"{k}report.reference_estimator",
            ref,
            f"one of the variants {list(exp.variants)}" + (" or a probed name" if probed else ""),
        )
    if exp.sweep is not None:
        swept = [n for n, v in exp.variants.items() if exp.sweep in {**v.options, **v.overrides}]
        if len(swept) < 2:
            config_error(
                f"{k}sweep", exp.sweep, "an option or override that >= 2 of its variants set"
            )
    for name in exp.profile.get("estimators") or []:
        if name not in catalog.names():
            config_error(f"{k}profile.estimators", name, f"one of {catalog.names()}")


def _main_experiment(cfg: Mapping) -> Experiment:
    variants = catalog.parse_variants(cfg["estimators"])
    return Experiment(
        name=cfg["experiment"],
        ablation=None,
        key="",
        description="",
        variants=variants,
        seeds=list(cfg["seeds"]),
        train=dict(cfg["train"]),
        eval=dict(cfg["eval"]),
        variance=dict(cfg["variance"]),
        profile=dict(cfg["profile"]),
        report=dict(cfg["report"]),
        origins={n: f"estimators.{n}" for n in variants},
    )


def _ablation(main: Experiment, name: str, raw: Mapping) -> Experiment:
    key = f"ablations.{name}."
    variants = catalog.parse_variants(raw["estimators"], key=f"{key}estimators")
    ev = _merge(main.eval, raw.get("eval", {}), deep=("sampling", "args"))
    benches = dict(main.eval["benchmarks"])
    for bench, settings in (raw.get("eval", {}).get("benchmarks") or {}).items():
        if bench not in benches:
            config_error(
                f"{key}eval.benchmarks.{bench}",
                bench,
                f"one of the main config's benchmarks {list(benches)} (one generate job samples "
                "all of them; an ablation can change their settings, not the set)",
            )
        benches[bench] = settings or {}
    ev["benchmarks"] = benches
    if "variance" in raw:
        variance = {
            **{k: v for k, v in main.variance.items() if k in ("k", "steps", "args")},
            "activate": True,
            **raw["variance"],
        }
    else:
        variance = {"activate": False}
    return Experiment(
        name=f"{main.name}{ABLATION_INFIX}{name}",
        ablation=name,
        key=key,
        description=raw.get("description", ""),
        variants=variants,
        seeds=list(raw.get("seeds", main.seeds)),
        train=_merge(main.train, raw.get("train", {}), deep=("overrides",)),
        eval=ev,
        variance=variance,
        profile={"activate": False},
        report=_merge(main.report, raw.get("report", {})),
        sweep=raw.get("sweep"),
        origins={n: f"{key}estimators.{n}" for n in variants},
    )


def resolve(
    cfg: Mapping,
    *,
    vocab_size: int | None = None,
    student: str = "student",
    teacher: str = "teacher",
    prompts: str = "prompts",
) -> dict[str, Experiment]:
    """Every experiment of a schema-validated config (defaults filled in): the main one first,
    then ``{experiment}_ablation_{name}`` per declared ablation; each checked, and every run's
    resolved trainer config built (``student``, ``teacher``, ``prompts``: the paths the train
    rule passes). Raises ``ValueError`` naming the key."""
    if cfg["scale"] == "hub" and "models" not in cfg:
        config_error("models", None, "a mapping with student and teacher when scale is hub")
    if cfg["scale"] != "toy" and cfg["train"].get("prompts") is None:
        config_error("train.prompts", None, "a prompt set name (e.g. dapo14k) when scale is hub")
    cfg = {**cfg, "train": {"overrides": {}, **cfg["train"]}}  # the schema default, if unset
    # top_k against the vocabulary is checked on each run's resolved config below (the trainer
    # rejects k >= V, where the catalog allows k = V), so the variants are parsed without V.
    main = _main_experiment(cfg)
    out = {main.name: main}
    for name, raw in (cfg.get("ablations") or {}).items():
        exp = _ablation(main, name, raw)
        out[exp.name] = exp
    raw_train = _read_train_config(cfg["train"]["config"])
    trained: dict[str, str] = {}  # resolved trainer config -> the run directory that trains it
    for exp in out.values():
        _check_experiment(exp, cfg)
        runs = check_runs(
            exp, raw_train, vocab_size=vocab_size, student=student, teacher=teacher, prompts=prompts
        )
        for (variant, seed), resolved in runs.items():
            key = json.dumps(resolved, sort_keys=True)
            run_dir = run_path(exp.name, variant, seed)
            if key in trained:
                exp.reused[(variant, seed)] = trained[key]
            else:
                trained[key] = run_dir
    return out


def run_path(experiment: str, variant: str, seed: int) -> str:
    """The run directory ``results/{experiment}/{variant}/seed{seed}``."""
    return f"results/{experiment}/{variant}/seed{seed}"


# ---------------------------------------------------------------------------------------------
# Runs: the trainer config of each (variant, seed), resolved and validated.


def run_overrides(
    exp: Experiment, variant: str, seed: int, *, student: str, teacher: str, prompts: str
) -> dict:
    """The ``key: value`` overrides of one run, as the train rule passes them: train.overrides <
    the variant's overrides < its estimator and options < the workflow's own keys."""
    merged = {**exp.train["overrides"], **exp.variants[variant].train_overrides()}
    merged.update(
        {
            TRAIN_KEYS["estimator"]: exp.variants[variant].estimator,
            TRAIN_KEYS["seed"]: int(seed),
            TRAIN_KEYS["student"]: student,
            TRAIN_KEYS["teacher"]: teacher,
            TRAIN_KEYS["prompts"]: prompts,
            TRAIN_KEYS["steps"]: exp.train["steps"],
            TRAIN_KEYS["save_every"]: exp.train["save_every"],
        }
    )
    return merged


def _read_train_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        config_error("train.config", path, "an existing training config YAML file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config key 'train.config' = {path!r}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        config_error("train.config", path, "a YAML file with a mapping of trainer key: value")
    return raw


def _origins(exp: Experiment, variant: str) -> dict[str, str]:
    """Trainer key -> the config key it was set by, for error messages."""
    v = exp.variants[variant]
    where = exp.origins.get(variant, f"estimators.{variant}")
    out = {k: f"train.config ({exp.train['config']}) key {k}" for k in _TRAIN_FIELDS}
    top = "train.overrides" if exp.ablation is None else f"{exp.key}train.overrides"
    for k in exp.train["overrides"]:
        out[k] = f"{top}.{k}"
    out.update({k: f"{where}.overrides.{k}" for k in v.overrides})
    out.update({k: f"{where}.{k}" for k in v.options})
    out["estimator"] = where
    out.update(max_steps=f"{exp.key}train.steps", save_every=f"{exp.key}train.save_every")
    out["seed"] = f"{exp.key}seeds"
    return out


def check_runs(
    exp: Experiment,
    raw_train: dict,
    *,
    vocab_size: int | None,
    student: str,
    teacher: str,
    prompts: str,
) -> dict:
    """Build the trainer config of every run of ``exp``, from the same ``key=value`` text the
    train rule passes; raise ``ValueError`` naming the config key that makes one invalid.
    Returns ``{(variant, seed): resolved trainer config as a dict}``."""
    resolved = {}
    top = "train.overrides" if exp.ablation is None else f"{exp.key}train.overrides"
    sources = [(top, exp.train["overrides"])]
    sources += [(f"{exp.origins[n]}.overrides", v.overrides) for n, v in exp.variants.items()]
    for where, mapping in sources:
        for k, value in mapping.items():
            if k in _SET_BY:
                expected = f"no override: the workflow sets {k} from {_SET_BY[k]}"
                config_error(f"{where}.{k}", value, expected)
            if k not in _TRAIN_FIELDS:
                near = difflib.get_close_matches(str(k), sorted(_TRAIN_FIELDS), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                expected = f"a key of the trainer config vopd.config.TrainConfig{hint}"
                config_error(f"{where}.{k}", value, expected)
    for name in exp.variants:
        origins = _origins(exp, name)
        for seed in exp.seeds:
            items = override_items(
                run_overrides(exp, name, seed, student=student, teacher=teacher, prompts=prompts)
            )
            run = f"run {exp.name}/{name}/seed{seed}"
            try:
                cfg = TrainConfig.from_dict({**raw_train, **parse_overrides(items)})
            except ValueError as err:
                m = re.match(r"^(\w+)=", str(err))
                where = origins.get(m.group(1)) if m else None
                prefix = f"config key {where!r}: " if where else ""
                raise ValueError(f"{prefix}{err} ({run}, its resolved trainer config)") from None
            for f in _TRAIN_FIELDS:
                value = getattr(cfg, f)
                if isinstance(value, float) and not math.isfinite(value):
                    config_error(origins[f], value, f"a finite number ({run})")
            spec = catalog.get(cfg.estimator)
            if spec.top_k and vocab_size is not None and cfg.top_k >= vocab_size:
                config_error(
                    origins["top_k"],
                    cfg.top_k,
                    f"an integer in [1, {vocab_size - 1}]: below the vocabulary size V = "
                    f"{vocab_size} (the trainer rejects top_k >= V; {run})",
                )
            resolved[(name, seed)] = cfg.to_dict()
    return resolved


def all_variant_names(exps: Mapping[str, Experiment]) -> list[str]:
    """Every variant name of every experiment (the ``{variant}`` wildcard's values)."""
    return sorted({v for e in exps.values() for v in e.variants})


# ---------------------------------------------------------------------------------------------
# Reused runs: ``python -m vopd.experiments copy-run SRC DST``.

# What a run directory holds that belongs to the training itself (its evaluations, probes, logs
# and benchmarks belong to the experiment that ran them, and are made again for the copy).
RUN_FILES = results.TRAINING_FILES
RUN_DIRS = results.TRAINING_DIRS


def copy_run(src: str | Path, dst: str | Path) -> Path:
    """Copy a complete run's training artefacts (config, metrics, environment, checkpoints) to
    ``dst``, then ``reused_from.json`` and ``done.json`` last: ``dst`` is complete only once
    everything else is there, as the trainer does it."""
    src, dst = Path(src), Path(dst)
    if not (src / "done.json").is_file():
        raise ValueError(f"{src} is not a complete run: {src / 'done.json'} is missing")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "done.json").unlink(missing_ok=True)
    for name in RUN_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for name in RUN_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
    (dst / "reused_from.json").write_text(json.dumps({"source": str(src)}) + "\n")
    shutil.copy2(src / "done.json", dst / "done.json.tmp")
    (dst / "done.json.tmp").replace(dst / "done.json")
    return dst
