# Helpers, config validation and target lists. Functions only (no rules: `snakemake --lint`
# wants rules and functions in separate files). Every rule parameter that is more than a
# wildcard comes from a named function here; rules hold no lambdas.

import math
import os
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# ---- validation -----------------------------------------------------------------------------
# JSON schema first (unknown keys, wrong types, unknown estimators; schema defaults are filled
# in), then the cross-field checks a schema cannot express. Both run while the Snakefile is
# parsed, i.e. before any job starts.

validate(config, schema="../schemas/config.schema.yaml")

TOY_BENCHMARKS = ("toy_test", "toy_hard")  # what `python -m vopd.toy world` writes
TABLES = ("accuracy", "training", "variance", "cost")
AGGREGATES = ("runs", "references", "variance", "profile")


def config_error(key, value, expected):
    """Stop before any job runs, naming the config key, its value and what was expected."""
    raise ValueError(f"config key {key!r} = {value!r}: expected {expected}")


def check_finite(value, key):
    """NaN and inf pass every schema range check (a comparison with NaN is False): reject them
    anywhere in the config (e.g. eval.sampling.temperature: .nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        config_error(key, value, "a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")


def check_config(cfg):
    check_finite(cfg, "")
    train, ev = cfg["train"], cfg["eval"]
    steps = train["steps"]

    def check_steps(key, values):
        for s in values:
            if s > steps or (s % train["save_every"] != 0 and s != steps):
                config_error(
                    key,
                    s,
                    f"a checkpoint step: 0, a multiple of train.save_every="
                    f"{train['save_every']}, or train.steps={steps}",
                )

    if cfg["scale"] == "hub" and "models" not in cfg:
        config_error("models", None, "a mapping with student and teacher when scale is hub")
    if cfg["scale"] == "toy":
        for name in ev["benchmarks"]:
            if name not in TOY_BENCHMARKS:
                config_error(f"eval.benchmarks.{name}", name, f"one of {TOY_BENCHMARKS}")
    elif train["prompts"] is None:
        config_error("train.prompts", None, "a prompt set name (e.g. dapo14k) when scale is hub")
    check_steps("eval.steps", ev["steps"])
    for name, bench in ev["benchmarks"].items():
        if "backend" in bench.get("sampling", {}):
            config_error(
                f"eval.benchmarks.{name}.sampling.backend",
                bench["sampling"]["backend"],
                "no per-benchmark backend: one generate job samples every benchmark with one "
                "model load, so set eval.sampling.backend",
            )
    if cfg["variance"]["activate"]:
        for key in ("runs", "steps", "k"):
            if key not in cfg["variance"]:
                config_error(f"variance.{key}", None, "a value when variance.activate is true")
        check_steps("variance.steps", cfg["variance"]["steps"])
        for name in cfg["variance"]["runs"]:
            if name not in cfg["estimators"]:
                config_error(
                    "variance.runs", name, f"one of the estimators {list(cfg['estimators'])}"
                )
    ref = cfg["report"]["reference_estimator"]
    if ref not in cfg["estimators"]:
        config_error("report.reference_estimator", ref, f"one of {list(cfg['estimators'])}")


check_config(config)

EXPERIMENT = config["experiment"]
ESTIMATORS = list(config["estimators"])
SEEDS = list(config["seeds"])
BENCHMARKS = list(config["eval"]["benchmarks"])
EVAL_STEPS = sorted(config["eval"]["steps"])
REFERENCES = list(config["eval"]["references"])
VARIANCE = config["variance"]
PROFILE = config["profile"]
PROFILE_MODES = list(PROFILE.get("modes", {"loss": {}}))  # `snakemake profile` works when off
PROFILE.setdefault("modes", {"loss": {"args": {}}})
PROFILE.setdefault("args", {})
TOY = config["toy"]["dir"]
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
    """{'lr': 1e-5, 'top_k': None} -> 'lr=1e-05 top_k=null' (the trainer's override syntax)."""
    parts = []
    for key, value in sorted(mapping.items()):
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        parts.append(shlex.quote(f"{key}={text}"))
    return " ".join(parts)


# ---- toy world ------------------------------------------------------------------------------


def toy_dir(wildcards, output):
    return os.path.dirname(output.world)


def toy_world_flags(wildcards):
    return cli_flags(config["toy"].get("world", {}))


def toy_sft_flags(wildcards):
    return cli_flags(config["toy"].get("sft", {}))


def toy_world_dir(wildcards, input):
    return os.path.dirname(input.world)


def toy_models_dir(wildcards, output):
    return os.path.dirname(output.summary)


# ---- models, prompts, benchmarks ------------------------------------------------------------


def student_model():
    if config["scale"] == "toy":
        return f"{TOY}/models/student"
    return config["models"]["student"]


def teacher_model():
    if config["scale"] == "toy":
        return f"{TOY}/models/teacher"
    return config["models"]["teacher"]


def model_inputs(wildcards):
    """At scale toy the models are built by toy_sft; hub models are not files of this workflow."""
    if config["scale"] == "toy":
        return {"models": f"{TOY}/models/sft_summary.json"}
    return {}


def prompts_file():
    if config["scale"] == "toy":
        return f"{TOY}/prompts/train.parquet"
    return f"resources/benchmarks/{config['train']['prompts']}.parquet"


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
# Names of the trainer's config keys that the workflow sets (python -m vopd.train key=value).
TRAIN_KEYS = {
    "estimator": "estimator",
    "seed": "seed",
    "student": "student",
    "teacher": "teacher",
    "prompts": "prompts",
    "steps": "max_steps",
    "save_every": "save_every",
}


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


def train_overrides(wildcards):
    """key=value overrides of one run: global < estimator overrides < estimator options < the
    workflow's own keys (estimator, seed, models, prompts, steps)."""
    train = config["train"]
    options = dict(config["estimators"][wildcards.estimator])
    merged = {**train.get("overrides", {}), **options.pop("overrides", {}), **options}
    merged.update(
        {
            TRAIN_KEYS["estimator"]: wildcards.estimator,
            TRAIN_KEYS["seed"]: int(wildcards.seed),
            TRAIN_KEYS["student"]: student_model(),
            TRAIN_KEYS["teacher"]: teacher_model(),
            TRAIN_KEYS["prompts"]: prompts_file(),
            TRAIN_KEYS["steps"]: train["steps"],
            TRAIN_KEYS["save_every"]: train["save_every"],
        }
    )
    return key_values(merged)


# ---- evaluation -----------------------------------------------------------------------------


def sampling(benchmark):
    """Eval sampling settings: the eval.sampling defaults, then the benchmark's own."""
    merged = {"seed": 0, **config["eval"]["sampling"]}
    merged.update(config["eval"]["benchmarks"][benchmark].get("sampling", {}))
    return merged


def benchmark_files(wildcards):
    """Every benchmark file, in BENCHMARKS order (the order of the generate rules' outputs)."""
    return [benchmark_path(b) for b in BENCHMARKS]


def eval_sampling_flags(seed_offset):
    """Flags of one generate job over every benchmark: a setting all benchmarks share is a
    plain flag, one that differs is `--set NAME.KEY=VALUE` for the benchmarks that have it."""
    own = {b: sampling(b) for b in BENCHMARKS}
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
    flags = cli_flags({**config["eval"]["args"], **shared})
    return " ".join([flags, *(f"--set {shlex.quote(item)}" for item in overrides)]).strip()


def run_sampling_flags(wildcards):
    """Each training seed samples its evaluation with its own (deterministic) seed."""
    return eval_sampling_flags(int(wildcards.seed))


def reference_sampling_flags(wildcards):
    return eval_sampling_flags(0)


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


def variance_flags(wildcards):
    flags = {"k": VARIANCE["k"], "estimators": VARIANCE.get("estimators", ESTIMATORS)}
    return cli_flags({**flags, **VARIANCE.get("args", {})})


def profile_flags(wildcards):
    sweep = PROFILE["modes"][wildcards.mode]
    flags = {
        "mode": wildcards.mode,
        "vocab": sweep.get("vocab"),
        "seq_len": sweep.get("seq_len"),
        "batch": sweep.get("batch"),
        "estimators": PROFILE.get("estimators", ESTIMATORS),
    }
    return cli_flags({**flags, **PROFILE["args"], **sweep["args"]})


def profile_files(experiment):
    return expand(
        "results/{experiment}/profile/{mode}.parquet",
        experiment=experiment,
        mode=PROFILE_MODES,
    )


# ---- file lists -----------------------------------------------------------------------------


def run_path(name, **wildcards):
    """A file of every configured run: run_path('done.json') -> results/EXP/EST/seedS/done.json."""
    return expand(
        f"results/{{experiment}}/{{estimator}}/seed{{seed}}/{name}",
        experiment=EXPERIMENT,
        estimator=ESTIMATORS,
        seed=SEEDS,
        **wildcards,
    )


def eval_summaries():
    return run_path(
        "eval/{benchmark}/step{step}/summary.json", benchmark=BENCHMARKS, step=EVAL_STEPS
    )


def reference_summaries():
    return expand(
        "results/{experiment}/reference/{model}/eval/{benchmark}/summary.json",
        experiment=EXPERIMENT,
        model=REFERENCES,
        benchmark=BENCHMARKS,
    )


def variance_probes():
    if not VARIANCE["activate"]:
        return []
    return expand(
        "results/{experiment}/{estimator}/seed{seed}/variance/step{step}.parquet",
        experiment=EXPERIMENT,
        estimator=VARIANCE["runs"],
        seed=SEEDS,
        step=VARIANCE["steps"],
    )


def aggregate_inputs(wildcards):
    """What each aggregate table is built from (the run's done.json marks it complete)."""
    if wildcards.kind == "runs":
        return run_path("done.json") + eval_summaries()
    if wildcards.kind == "references":
        return reference_summaries()
    if wildcards.kind == "variance":
        return run_path("done.json") + variance_probes()
    return profile_files(wildcards.experiment)


def results_dir(wildcards):
    return f"results/{wildcards.experiment}"


def aggregate_filters(wildcards):
    """Restrict aggregation to the configured runs (stale run dirs of older configs are ignored)."""
    flags = {"estimators": ",".join(ESTIMATORS), "seeds": ",".join(map(str, SEEDS))}
    if wildcards.kind in ("runs", "references"):
        flags["benchmarks"] = ",".join(BENCHMARKS)
    if wildcards.kind == "runs":
        flags["eval_steps"] = ",".join(map(str, EVAL_STEPS))
    if wildcards.kind == "variance":
        probed = VARIANCE["runs"] if VARIANCE["activate"] else []
        flags["variance_runs"] = ",".join(probed)  # "" = no run was probed
        if VARIANCE["activate"]:
            flags["variance_steps"] = ",".join(map(str, VARIANCE["steps"]))
    if wildcards.kind == "references":
        flags = {"benchmarks": flags["benchmarks"]}
    if wildcards.kind == "profile":
        flags = {}
    return cli_flags(flags)


def table_inputs(wildcards):
    base = f"results/{wildcards.experiment}"
    if wildcards.table == "accuracy":
        return table_inputs_accuracy(wildcards)
    if wildcards.table == "training":
        return [f"{base}/runs.parquet"]
    if wildcards.table == "variance":
        return [f"{base}/variance.parquet"]
    return [f"{base}/profile.parquet"]


def table_inputs_accuracy(wildcards):
    base = f"results/{wildcards.experiment}"
    return [f"{base}/runs.parquet"] + ([f"{base}/references.parquet"] if REFERENCES else [])


def report_flags(wildcards):
    rep = config["report"]
    return cli_flags(
        {
            "metric": rep["metric"],
            "smooth": rep["smooth"],
            "reference_estimator": rep["reference_estimator"],
        }
    )


def active_tables():
    tables = ["accuracy", "training", "variance"]
    if PROFILE["activate"]:
        tables.append("cost")
    return tables


def active_figures():
    figures = ["accuracy", "training_curves", "variance_ratio"]
    if PROFILE["activate"]:
        figures.append("cost")
    return figures


def table_files(experiment=EXPERIMENT):
    return expand(
        "results/{experiment}/tables/{table}.{ext}",
        experiment=experiment,
        table=active_tables(),
        ext=("md", "csv"),
    )


def figure_files(experiment=EXPERIMENT):
    return expand(
        "results/{experiment}/figures/{figure}.{ext}",
        experiment=experiment,
        figure=active_figures(),
        ext=("png", "pdf"),
    )


def summary_inputs(wildcards):
    return table_files(wildcards.experiment) + figure_files(wildcards.experiment)
