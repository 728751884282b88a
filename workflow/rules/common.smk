# Helpers, config validation and target lists. Functions only (no rules: `snakemake --lint`
# wants rules and functions in separate files). Every rule parameter that is more than a
# wildcard comes from a named function here; rules hold no lambdas.

import json
import math
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO_ROOT = os.path.dirname(
    os.path.dirname(workflow.current_basedir.get_path_or_uri(secret_free=True))
)

# ---- validation -----------------------------------------------------------------------------
# JSON schema first (unknown keys, wrong types, name patterns; schema defaults are filled in),
# then vopd.experiments (torch-free): the variants through the estimator catalog (unknown
# estimator, an option it does not read, an option out of range), the cross-field checks a
# schema cannot express, and every run's resolved trainer config built as
# vopd.config.TrainConfig. All of it runs while the Snakefile is parsed, before any job starts.

sys.path.insert(0, REPO_ROOT)  # this checkout's vopd package, whatever is installed
from vopd import experiments  # noqa: E402 (torch-free: the catalog and the trainer's config)
from vopd import results  # noqa: E402 (torch-free: the results contract)

validate(config, schema="../schemas/config.schema.yaml")

TOY_BENCHMARKS = experiments.TOY_BENCHMARKS
TABLES = results.TABLES  # the results contract (vopd/results.py)
AGGREGATES = results.AGGREGATES
TOY = config["toy"]["dir"]


def student_model():
    if config["scale"] == "toy":
        return f"{TOY}/models/student"
    return config["models"]["student"]


def teacher_model():
    if config["scale"] == "toy":
        return f"{TOY}/models/teacher"
    return config["models"]["teacher"]


def check_finite(value, key):
    """NaN and inf pass every schema range check (a comparison with NaN is False): reject them
    anywhere in the config (e.g. eval.sampling.temperature: .nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {key!r} = {value!r}: expected a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")


check_finite(config, "")


def prompts_file():
    if config["scale"] == "toy":
        return f"{TOY}/prompts/train.parquet"
    return f"resources/benchmarks/{config['train']['prompts']}.parquet"


def run_paths():
    """The student, teacher and prompts paths the train rule passes (none where the config
    lacks them: vopd.experiments.resolve then names the missing key)."""
    if config["scale"] == "hub" and "models" not in config:
        return {}
    return {"student": student_model(), "teacher": teacher_model(), "prompts": prompts_file()}


try:
    EXPERIMENTS = experiments.resolve(
        config,
        vocab_size=experiments.toy_vocab_size() if config["scale"] == "toy" else None,
        **run_paths(),
    )
except ValueError as err:
    raise WorkflowError(f"invalid config: {err}") from None

EXPERIMENT = config["experiment"]
MAIN = EXPERIMENTS[EXPERIMENT]
ABLATIONS = {e.ablation: e for e in EXPERIMENTS.values() if e.ablation is not None}
VARIANTS = experiments.all_variant_names(EXPERIMENTS)
BENCHMARKS = MAIN.benchmarks  # every experiment evaluates the same set (settings may differ)
PROFILE = config["profile"]
PROFILE_MODES = list(PROFILE.get("modes", {"loss": {}}))  # `snakemake profile` works when off
PROFILE.setdefault("modes", {"loss": {"args": {}}})
PROFILE.setdefault("args", {})


def exp_of(wildcards):
    """The Experiment of a job's {experiment} wildcard."""
    return EXPERIMENTS[wildcards.experiment]


# ---- threads -------------------------------------------------------------------------------
# Measured on 2 idle cores (torch 2.13 CPU wheel): a toy OPD run of 60 steps took 27.1 s with 1
# thread and 35.6 s with 2, and two 1-thread runs side by side took 26.8 s for both (twice the
# throughput). The 0.5M-parameter toy model cannot use a second thread; two processes that each
# spin 2 threads on 2 cores are what made jobs 5-10x slower. So toy-model jobs (distillation,
# generation, variance probes) declare 1 thread and run side by side, one per core. Toy SFT
# (batch 128) gains from 2 threads (80 steps: 27 s vs 38 s) and declares 2, which also pins its
# numerics: the same toy models on every machine. The cost profile declares every core, so no job
# runs beside its timings. At hub scale every torch job declares every core: one at a time on a
# local GPU machine; profiles/slurm turns threads into cpus-per-task.
# Torch jobs use the CPU stack at scale toy and the GPU stack at scale hub.
try:
    ALL_CORES = workflow.cores
except WorkflowError:  # a remote executor (slurm) runs without --cores: set-threads decides
    ALL_CORES = 1
HUB = config["scale"] == "hub"
TOY_MODEL_THREADS = ALL_CORES if HUB else 1
SFT_THREADS = 2
TORCH_ENV = "../envs/vopd-gpu.yaml" if HUB else "../envs/vopd-cpu.yaml"


# ---- command-line helpers -------------------------------------------------------------------


def torch_env(wildcards, threads):
    """Environment of a torch job: its threads, and OpenMP threads that sleep while they wait.
    With the default spin-waiting, a 2-thread job on a busy 2-core machine ran a toy training
    step 3-10x slower than with 1 thread (measured here); passive waiting kept 2 threads as fast
    as 1 under load, so a job can use every core without that risk."""
    return f"OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE"


def cli_flags(mapping):
    """{'top_p': 0.9, 'fast': True, 'vocab': [1, 2]} -> '--top-p 0.9 --fast --vocab 1,2'
    (the vopd CLIs take lists comma-separated). Every flag and value is shell-quoted: the
    result goes into a `shell:` command unquoted, as several words."""
    parts = []
    for key, value in sorted(mapping.items()):  # sorted: reordering YAML keys changes nothing
        flag = shlex.quote(f"--{key.replace('_', '-')}")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} {shlex.quote(','.join(map(str, value)))}")
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def key_values(mapping):
    """{'lr': 1e-5, 'top_k': None} -> 'lr=1e-05 top_k=null' (the trainer's override syntax;
    vopd.experiments.override_items, the text the config check validated)."""
    return " ".join(shlex.quote(item) for item in experiments.override_items(mapping))


# ---- toy world ------------------------------------------------------------------------------


def toy_dir(wildcards, output):
    return os.path.dirname(output.world)


def toy_world_flags(wildcards):
    return cli_flags(config["toy"].get("world", {}))


def toy_sft_flags(wildcards):
    """SFT flags of `python -m vopd.toy models`, and --rebuild when toy.rebuild is true (else
    the shipped models are used when the world and SFT settings are theirs)."""
    flags = {**config["toy"].get("sft", {}), "rebuild": config["toy"].get("rebuild", False)}
    return cli_flags(flags)


def toy_world_dir(wildcards, input):
    return os.path.dirname(input.world)


def toy_models_dir(wildcards, output):
    return os.path.dirname(output.summary)


# ---- models, prompts, benchmarks ------------------------------------------------------------


def model_inputs(wildcards):
    """At scale toy the models are built by toy_sft; hub models are not files of this workflow."""
    if config["scale"] == "toy":
        return {"models": f"{TOY}/models/sft_summary.json"}
    return {}


def benchmark_path(name):
    if config["scale"] == "toy":
        return f"{TOY}/benchmarks/{name}.parquet"
    return f"resources/benchmarks/{name}.parquet"


def benchmark_file(wildcards):
    return benchmark_path(wildcards.benchmark)


def prepare_flags(wildcards):
    """`--path` for a benchmark (or the training prompt set) read from local files: one path, a
    directory, or a list of paths (each shell-quoted)."""
    if wildcards.benchmark == config["train"]["prompts"]:
        path = config["train"]["prompts_path"]
    else:
        path = config["eval"]["benchmarks"].get(wildcards.benchmark, {}).get("path")
    if path is None:
        return ""
    paths = path if isinstance(path, list) else [path]
    return "--path " + " ".join(shlex.quote(str(p)) for p in paths)


# ---- training -------------------------------------------------------------------------------


def train_inputs(wildcards):
    return {
        "config": config["train"]["config"],
        "prompts": prompts_file(),
        **model_inputs(wildcards),
    }


def train_launcher(wildcards, resources):
    """`python -m`, or torchrun with one process per GPU when a profile sets the train rule's
    `nproc` resource above 1 (profiles/slurm: the paper's 4 processes)."""
    if resources.nproc > 1:
        return f"torchrun --standalone --nproc-per-node {resources.nproc} -m"
    return "python -m"


def run_dir(wildcards, output):
    return os.path.dirname(output.done)


def run_dir_of_input(wildcards, input):
    return os.path.dirname(input.done)


NOT_REUSED = "results/.not-reused"  # never built: the reuse_run rule does not apply


def reused_run_done(wildcards):
    """done.json of the earlier run with the same resolved trainer config, if any (else a file
    no rule makes, so Snakemake falls back to the train rule)."""
    source = exp_of(wildcards).reused.get((wildcards.variant, int(wildcards.seed)))
    return f"{source}/done.json" if source else NOT_REUSED


def seeds_per_job():
    """train.seeds_per_job, or its default: every seed in one job at scale toy, 1 at hub."""
    n = config["train"]["seeds_per_job"]
    if n is None:
        return 1 if HUB else max(len(e.seeds) for e in EXPERIMENTS.values())
    return n


def seed_groups(exp):
    """The experiment's seeds in training jobs of seeds_per_job seeds (the last may be short).
    A group of one seed is the per-seed `train` rule's; larger ones get a rule each (train.smk)."""
    n = seeds_per_job()
    return [exp.seeds[i : i + n] for i in range(0, len(exp.seeds), n)]


def grouped_variants(exp, seeds):
    """The experiment's variants that train every seed of ``seeds`` (none copied by reuse_run):
    the grouped rule's {variant} values. A variant with a reused seed keeps one job per seed."""
    return [v for v in exp.variants if not any((v, s) in exp.reused for s in seeds)]


def train_group_rule_name(exp, seeds):
    """train_seeds0_1_2 for the main comparison, train_ABLATION_seeds0_1_2 for an ablation."""
    ablation = (
        ""
        if exp.ablation is None
        else "".join(c if c.isalnum() else "_" for c in exp.ablation) + "_"
    )
    return f"train_{ablation}seeds" + "_".join(map(str, seeds))


def train_group_tag(seeds):
    """The grouped job's log and benchmark name: train-seeds0-1-2."""
    return "train-seeds" + "-".join(map(str, seeds))


def run_dirs_flags(wildcards, output):
    """`--seeds S0,S1 --out DIR0 --out DIR1` of a grouped training job (its outputs' dirs)."""
    dirs = [os.path.dirname(p) for p in output]
    seeds = [int(os.path.basename(d)[len("seed") :]) for d in dirs]
    outs = " ".join(f"--out {shlex.quote(d)}" for d in dirs)
    return f"--seeds {','.join(map(str, seeds))} {outs}"


def group_overrides(exp, seeds):
    """The key=value overrides a grouped job's runs share: each run's (train_overrides) less its
    seed, which --seeds sets. They differ in the seed only (vopd.experiments.run_overrides)."""

    def function(wildcards):
        per_seed = []
        for seed in seeds:
            merged = experiments.run_overrides(
                exp,
                wildcards.variant,
                seed,
                student=student_model(),
                teacher=teacher_model(),
                prompts=prompts_file(),
            )
            merged.pop(experiments.TRAIN_KEYS["seed"])
            per_seed.append(merged)
        if any(m != per_seed[0] for m in per_seed):
            raise WorkflowError(f"{exp.name}/{wildcards.variant}: runs differ beyond the seed")
        return key_values(per_seed[0])

    return function


def train_overrides(wildcards):
    """key=value overrides of one run (vopd.experiments.run_overrides: train.overrides < the
    variant's overrides < its estimator and options < the workflow's own keys), the same text
    that was validated as a TrainConfig when the config was parsed."""
    merged = experiments.run_overrides(
        exp_of(wildcards),
        wildcards.variant,
        int(wildcards.seed),
        student=student_model(),
        teacher=teacher_model(),
        prompts=prompts_file(),
    )
    return key_values(merged)


# ---- evaluation -----------------------------------------------------------------------------


def sampling(exp, benchmark):
    """Eval sampling settings of one experiment: eval.sampling, then the benchmark's own."""
    merged = {"seed": 0, **exp.eval["sampling"]}
    merged.update((exp.eval["benchmarks"][benchmark] or {}).get("sampling", {}))
    return merged


def benchmark_files(wildcards):
    """Every benchmark file, in BENCHMARKS order (the order of the generate rules' outputs)."""
    return [benchmark_path(b) for b in BENCHMARKS]


def eval_sampling_flags(exp, seed_offset):
    """Flags of one generate job over every benchmark: a setting all benchmarks share is a
    plain flag, one that differs is `--set NAME.KEY=VALUE` for the benchmarks that have it."""
    own = {b: sampling(exp, b) for b in BENCHMARKS}
    for settings in own.values():
        settings["seed"] += seed_offset
    first, *rest = own.values()
    shared = {k: v for k, v in first.items() if all(k in o and o[k] == v for o in rest)}
    overrides = [
        f"{b}.{k}={v}"
        for b, settings in own.items()
        for k, v in sorted(settings.items())
        if k not in shared
    ]
    flags = cli_flags({**exp.eval["args"], **shared})
    return " ".join([flags, *(f"--set {shlex.quote(item)}" for item in overrides)]).strip()


def run_sampling_flags(wildcards):
    """Each training seed samples its evaluation with its own (deterministic) seed."""
    return eval_sampling_flags(exp_of(wildcards), int(wildcards.seed))


def reference_sampling_flags(wildcards):
    return eval_sampling_flags(exp_of(wildcards), 0)


def checkpoint_flags(wildcards, input):
    """--model of a run checkpoint; with LoRA the checkpoint is an adapter on the student."""
    ckpt = os.path.join(os.path.dirname(input.done), "checkpoints", f"step{wildcards.step}")
    if config["eval"]["lora"] and int(wildcards.step) > 0:
        return cli_flags({"model": student_model(), "lora": ckpt})
    return cli_flags({"model": ckpt})


def reference_flags(wildcards):
    model = student_model() if wildcards.model == "student" else teacher_model()
    return cli_flags({"model": model})


def grade_dir(wildcards, output):
    return os.path.dirname(output.summary)


# ---- variance and cost ----------------------------------------------------------------------


def variance_rule_name(exp):
    """variance_probe for the main comparison, variance_probe_ABLATION for an ablation."""
    if exp.ablation is None:
        return "variance_probe"
    return "variance_probe_" + "".join(c if c.isalnum() else "_" for c in exp.ablation)


def variance_outputs(exp):
    """One run's probe Parquet files, one per probed step ({variant} and {seed} wildcards)."""
    return [
        f"results/{exp.name}/{{variant}}/seed{{seed}}/variance/step{step}.parquet"
        for step in exp.variance["steps"]
    ]


def variance_step_flags(wildcards, output):
    """`--step S --out PATH` for every probed step of one run (one process for all of them)."""
    steps = [int(os.path.basename(p)[len("step") : -len(".parquet")]) for p in output.probes]
    return " ".join(f"--step {s} --out {shlex.quote(p)}" for s, p in zip(steps, output.probes))


def variance_flags(exp):
    """--k, the probed variants as --variants JSON (estimator and options of each), extras."""
    flags = cli_flags({"k": exp.variance["k"], **exp.variance.get("args", {})})
    variants = json.dumps(exp.probe_variants(), sort_keys=True)
    return f"{flags} --variants {shlex.quote(variants)}"


def profile_estimators():
    """The estimators to profile: profile.estimators, or those of the main variants (a cost
    does not depend on the variant, except top_k, which the profiler sets)."""
    names = PROFILE.get("estimators") or [v.estimator for v in MAIN.variants.values()]
    return list(dict.fromkeys(names))


def profile_flags(wildcards):
    sweep = PROFILE["modes"][wildcards.mode]
    flags = {
        "mode": wildcards.mode,
        "vocab": sweep.get("vocab"),
        "seq_len": sweep.get("seq_len"),
        "batch": sweep.get("batch"),
        "estimators": profile_estimators(),
    }
    return cli_flags({**flags, **PROFILE["args"], **sweep["args"]})


def profile_files(experiment):
    if experiment != EXPERIMENT:
        return []  # ablations never profile
    return expand(
        "results/{experiment}/profile/{mode}.parquet",
        experiment=experiment,
        mode=PROFILE_MODES,
    )


# ---- file lists -----------------------------------------------------------------------------


def run_path(name, experiment=EXPERIMENT, **wildcards):
    """A file of every run of an experiment: run_path('done.json') ->
    results/EXP/VARIANT/seedS/done.json."""
    exp = EXPERIMENTS[experiment]
    return expand(
        f"results/{{experiment}}/{{variant}}/seed{{seed}}/{name}",
        experiment=experiment,
        variant=list(exp.variants),
        seed=exp.seeds,
        **wildcards,
    )


def eval_summaries(experiment=EXPERIMENT):
    exp = EXPERIMENTS[experiment]
    return run_path(
        "eval/{benchmark}/step{step}/summary.json",
        experiment,
        benchmark=exp.benchmarks,
        step=exp.eval_steps,
    )


def reference_summaries(experiment=EXPERIMENT):
    return expand(
        "results/{experiment}/reference/{model}/eval/{benchmark}/summary.json",
        experiment=experiment,
        model=EXPERIMENTS[experiment].eval["references"],
        benchmark=BENCHMARKS,
    )


def variance_probes(experiment=EXPERIMENT):
    exp = EXPERIMENTS[experiment]
    if not exp.variance["activate"]:
        return []
    return expand(
        "results/{experiment}/{variant}/seed{seed}/variance/step{step}.parquet",
        experiment=experiment,
        variant=exp.variance["runs"],
        seed=exp.seeds,
        step=exp.variance["steps"],
    )


def aggregate_inputs(wildcards):
    """What each aggregate table is built from (the run's done.json marks it complete)."""
    exp = wildcards.experiment
    if wildcards.kind == "runs":
        return run_path("done.json", exp) + eval_summaries(exp)
    if wildcards.kind == "references":
        return reference_summaries(exp)
    if wildcards.kind == "variance":
        return run_path("done.json", exp) + variance_probes(exp)
    return profile_files(exp)


def results_dir(wildcards):
    return shlex.quote(f"results/{wildcards.experiment}")


def aggregate_filters(wildcards):
    """Restrict aggregation to the configured runs (stale run dirs of older configs are
    ignored); --variants names each variant's estimator and options (the Parquet columns)."""
    exp = exp_of(wildcards)
    flags = {"seeds": ",".join(map(str, exp.seeds))}
    if wildcards.kind in ("runs", "references"):
        flags["benchmarks"] = ",".join(exp.benchmarks)
    if wildcards.kind == "runs":
        flags["eval_steps"] = ",".join(map(str, exp.eval_steps))
    if wildcards.kind == "variance":
        flags["variance_runs"] = ",".join(exp.variance_runs())  # "" = no run was probed
        if exp.variance["activate"]:
            flags["variance_steps"] = ",".join(map(str, exp.variance["steps"]))
    if wildcards.kind == "references":
        return cli_flags({"benchmarks": flags["benchmarks"]})
    if wildcards.kind == "profile":
        return ""
    variants = json.dumps(exp.variant_table(), sort_keys=True)
    return f"{cli_flags(flags)} --variants {shlex.quote(variants)}"


def table_inputs(wildcards):
    base = f"results/{wildcards.experiment}"
    if wildcards.table in ("accuracy", "sweep"):
        return table_inputs_accuracy(wildcards)
    if wildcards.table == "training":
        return [f"{base}/runs.parquet"]
    if wildcards.table == "variance":
        return [f"{base}/variance.parquet"]
    return [f"{base}/profile.parquet"]


def table_inputs_accuracy(wildcards):
    base = f"results/{wildcards.experiment}"
    refs = exp_of(wildcards).eval["references"]
    return [f"{base}/runs.parquet"] + ([f"{base}/references.parquet"] if refs else [])


def report_flags(wildcards):
    exp = exp_of(wildcards)
    rep = exp.report
    flags = {
        "metric": rep["metric"],
        "smooth": rep["smooth"],
        "reference_estimator": rep["reference_estimator"],
        "sweep": exp.sweep,
    }
    return cli_flags(flags)


def summary_flags(wildcards):
    """report_flags, the ablation's description, and (main experiment) every declared
    ablation's results folder: report.md gets a section for each one built so far."""
    exp = exp_of(wildcards)
    flags = report_flags(wildcards)
    if exp.description:
        flags += f" --description {shlex.quote(exp.description)}"
    if exp.ablation is None and ABLATIONS:
        folders = ",".join(f"results/{a.name}" for a in ABLATIONS.values())
        flags += f" --ablations {shlex.quote(folders)}"
    return flags


def active_tables(experiment=EXPERIMENT):
    exp = EXPERIMENTS[experiment]
    tables = ["accuracy", "training", "variance"]
    if exp.profile["activate"]:
        tables.append("cost")
    if exp.sweep is not None:
        tables.append("sweep")
    return tables


def active_figures(experiment=EXPERIMENT):
    exp = EXPERIMENTS[experiment]
    figures = ["accuracy", "training_curves", "variance_ratio"]
    if exp.profile["activate"]:
        figures.append("cost")
    if exp.sweep is not None:
        figures.append("sweep")
    return figures


def table_files(experiment=EXPERIMENT):
    return expand(
        "results/{experiment}/tables/{table}.{ext}",
        experiment=experiment,
        table=active_tables(experiment),
        ext=("md", "csv"),
    )


def figure_files(experiment=EXPERIMENT):
    return expand(
        "results/{experiment}/figures/{figure}.{ext}",
        experiment=experiment,
        figure=active_figures(experiment),
        ext=("png", "pdf"),
    )


def built_ablation_reports():
    """report.md of every declared ablation that exists already: the main report embeds them
    (and is rebuilt by the next run after an ablation is built), never requires them."""
    return [
        f"results/{a.name}/report.md"
        for a in ABLATIONS.values()
        if os.path.exists(f"results/{a.name}/report.md")
    ]


def summary_inputs(wildcards):
    files = table_files(wildcards.experiment) + figure_files(wildcards.experiment)
    if wildcards.experiment == EXPERIMENT:
        files += built_ablation_reports()
    return files


def ablation_targets(name):
    """What `snakemake ablation_NAME` builds: the ablation's report.md (and so its runs,
    evaluations, tables and figures)."""
    return [f"results/{ABLATIONS[name].name}/report.md"]
