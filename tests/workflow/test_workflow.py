"""The Snakemake workflow: format, lint, config validation, dry runs, the smoke run, and the
kill-and-resume check.

    pytest -m workflow tests/workflow/test_workflow.py            # lint, dry runs, smoke run
    pytest -m slow tests/workflow/test_workflow.py -k resume      # kill + resume (two smoke runs)

The smoke run and the resume check run in a copy of the checkout (tracked and untracked,
non-ignored files), as a fresh clone would, with that copy first on PYTHONPATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vopd.experiments import toy_vocab_size

REPO = Path(__file__).resolve().parents[2]
SMOKE = ".test/config/config.yaml"
V = toy_vocab_size()  # the toy vocabulary, computed from its tokenizer
# The smoke budget (<= 300 s on an idle 2-core machine) is measured and printed, not asserted:
# wall clock on a shared machine is noise, and timed assertions make flaky tests. Set
# VOPD_SMOKE_BUDGET_S to turn the budget into a hard check on a machine you control.
SMOKE_BUDGET_S = os.environ.get("VOPD_SMOKE_BUDGET_S")

pytestmark = pytest.mark.workflow


def snakemake(*args, cwd=REPO, timeout=1800, check=True, env=None):  # a hang guard, not a target
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def checkout_copy(dest: Path) -> Path:
    """Copy what a clone would hold (tracked + untracked non-ignored files) into dest."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def env_for(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ---- static checks ----------------------------------------------------------------------------


def test_snakefmt_check():
    proc = subprocess.run(
        ["snakefmt", "--check", "workflow", "Snakefile"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_docs_results_are_not_ignored_but_results_are():
    """The README's figure lives in docs/results/; an unanchored `results/` ignore rule hid it
    (a regression: the main figure was a broken image)."""

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert not ignored("docs/results/accuracy.png") and not ignored("docs/results/accuracy.md")
    assert ignored("results/toy/report.md")


def test_schema_lists_no_estimator_and_takes_the_name_pattern_of_the_catalog():
    """Which estimators and options exist is the catalog's (checked while the config is
    parsed); the schema only holds the name pattern, the same as the catalog's."""
    from vopd import catalog

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["$defs"]["name"]["pattern"] == catalog.NAME_PATTERN

    def enums(node):
        if isinstance(node, dict):
            yield from ([node["enum"]] if "enum" in node else [])
            for value in node.values():
                yield from enums(value)
        elif isinstance(node, list):
            for value in node:
                yield from enums(value)

    assert not [e for e in enums(schema) if set(e) & set(catalog.names())]
    for path in [*(REPO / "workflow").rglob("*.smk"), REPO / "workflow/Snakefile"]:
        code = path.read_text()
        assert not [n for n in catalog.names() if f'"{n}"' in code], path


# ---- dry runs ---------------------------------------------------------------------------------


GROUPED = "train_seeds0_1_2"  # the default config's training rule: seeds 0-2 in one job


@pytest.mark.parametrize(
    "configfile, train",
    [
        (None, GROUPED),
        (SMOKE, "train"),  # one seed
        ("config/small.yaml", "train"),  # scale hub: a job per seed
        ("config/paper.yaml", "train"),
    ],
)
def test_dry_run(configfile, train):
    jobs = planned_jobs(*(["--configfile", configfile] if configfile else []))
    assert {train, "generate", "grade", "variance_probe", "cost_profile", "summary"} <= jobs


@pytest.mark.parametrize(
    "configfile, per_job, expected",
    [
        (None, None, {GROUPED: 6}),  # 6 variants, every seed in one process (scale toy)
        (None, 1, {"train": 18}),
        (None, 2, {"train_seeds0_1": 6, "train": 6}),  # seeds 0-1 together, seed 2 alone
        ("config/small.yaml", None, {"train": 8}),  # scale hub: one job per seed
        ("config/paper.yaml", None, {"train": 5}),
    ],
)
def test_training_jobs_group_seeds_per_variant(tmp_path, configfile, per_job, expected):
    cfg = yaml.safe_load((REPO / (configfile or "config/config.yaml")).read_text())
    if per_job is not None:
        cfg["train"]["seeds_per_job"] = per_job
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    counts = job_counts("--configfile", str(path))
    assert {r: n for r, n in counts.items() if r.startswith("train")} == expected


def test_a_grouped_job_trains_each_seed_into_its_run_directory():
    out = snakemake("-n", "-p", "--forceall", "results/toy/vopd/seed1/done.json").stdout
    runs = " ".join(f"--out results/toy/vopd/seed{s}" for s in (0, 1, 2))
    assert f"vopd.train --config config/train/toy.yaml --seeds 0,1,2 {runs} estimator=vopd" in out
    assert "seed=" not in out.split("vopd.train", 1)[1].split("\n", 1)[0]
    assert "results/toy/vopd/logs/train-seeds0-1-2.log" in out


def test_paper_dry_run_through_the_slurm_profile():
    """The cluster command of the README: no --cores (a remote executor has none), so no rule
    may read workflow.cores at parse time."""
    jobs = planned_jobs("--configfile", "config/paper.yaml", "--workflow-profile", "profiles/slurm")
    assert {"train", "generate", "cost_profile"} <= jobs


def test_configfile_replaces_the_default_config():
    """--configfile must not be merged into config/config.yaml (toy estimators in the paper)."""
    out = snakemake("-n", "-p", "--configfile", "config/paper.yaml").stdout
    assert "results/paper_1p7b/opt_baseline" not in out  # a toy-only estimator
    assert "results/paper_1p7b/vopd_topk/seed42/done.json" in out


def job_counts(*args) -> dict[str, int]:
    """Rule name -> jobs, from a dry run's "Job stats" table (as if nothing had been built yet)."""
    lines = snakemake(*args, "-n", "--forceall", "--quiet", "rules").stdout.splitlines()
    start = lines.index("Job stats:") + 3
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("total"))
    return {line.split()[0]: int(line.split()[1]) for line in lines[start:end]}


def planned_jobs(*args) -> set[str]:
    """The rule names of a dry run's "Job stats" table (as if nothing had been built yet)."""
    return set(job_counts(*args))


def test_named_targets_build_only_what_they_need():
    assert planned_jobs("profile") == {
        "cost_profile",
        "aggregate",
        "table",
        "figure_cost",
        "profile",
    }
    assert planned_jobs("results/toy/tables/cost.md") == {"cost_profile", "aggregate", "table"}
    variance = planned_jobs("variance")
    assert {GROUPED, "variance_probe"} <= variance and "generate" not in variance
    assert "summary" in planned_jobs()


def bad_config(tmp_path, edit) -> Path:
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["estimators"].update(vopd_fast={}),
            "estimators.vopd_fast: unknown estimator 'vopd_fast'",
        ),
        (
            lambda c: c["estimators"].update(v={"estimator": "vopd_fats"}),
            "estimators.v: unknown estimator 'vopd_fats'",
        ),
        (lambda c: c["train"].update(stepz=3), "'stepz' was unexpected"),
        (lambda c: c.update(seeds="0,1"), "'0,1' is not of type 'array'"),
        (
            lambda c: c["estimators"].update(vopd={"top_k": 4}),
            "estimators.vopd: option top_k=4 has no effect with estimator 'vopd'",
        ),
        (
            lambda c: c["estimators"].update(vopd_topk={"top_k": 0}),
            "estimators.vopd_topk: top_k=0: expected an integer",
        ),
        (
            lambda c: c["estimators"].update(vopd_topk={"top_k": V}),
            f"config key 'estimators.vopd_topk.top_k' = {V}: expected an integer in [1, {V - 1}]",
        ),
        (
            lambda c: c["ablations"]["topk"]["estimators"].update(
                k64={"estimator": "topk_opd", "top_k": 64}
            ),
            "config key 'ablations.topk.estimators.k64.top_k' = 64",
        ),
        (
            lambda c: c["estimators"].update(v={"estimator": "vopd", "overrides": {"lrr": 1}}),
            "config key 'estimators.v.overrides.lrr' = 1: expected a key of the trainer config",
        ),
        (
            lambda c: c["train"].update(overrides={"lr": "fast"}),
            "config key 'train.overrides.lr': lr='fast': expected float",
        ),
        (
            lambda c: c["estimators"].update(
                v={"estimator": "vopd", "overrides": {"lr": float("nan")}}
            ),
            "config key 'estimators.v.overrides.lr' = nan: expected a finite number",
        ),
        (
            lambda c: c["ablations"]["lr"]["estimators"].update(
                v={"estimator": "vopd", "overrides": {"max_grad_norm": float("inf")}}
            ),
            "config key 'ablations.lr.estimators.v.overrides.max_grad_norm' = inf",
        ),
        (
            lambda c: c["train"].update(overrides={"max_steps": 3}),
            "config key 'train.overrides.max_steps' = 3: expected no override",
        ),
        (
            lambda c: c["estimators"].update(v={"estimator": "vopd", "overrides": {"top_k": 8}}),
            "estimators.v.overrides.top_k: estimator options go next to estimator:",
        ),
        (lambda c: c["eval"].update(steps=[71]), "config key 'eval.steps' = 71"),
        (lambda c: c["eval"]["benchmarks"].update(math500={}), "'eval.benchmarks.math500'"),
        (
            lambda c: c["eval"]["benchmarks"]["toy_hard"].update(sampling={"backend": "vllm"}),
            "'eval.benchmarks.toy_hard.sampling.backend'",
        ),
        (
            lambda c: c["eval"]["sampling"].update(temperature=float("nan")),
            "config key 'eval.sampling.temperature' = nan: expected a finite number",
        ),
        (
            lambda c: c["eval"]["benchmarks"]["toy_test"].update(
                sampling={"temperature": float("inf")}
            ),
            "config key 'eval.benchmarks.toy_test.sampling.temperature' = inf",
        ),
        (
            lambda c: c["ablations"]["clip"].update(variance={"runs": ["nope"]}),
            "config key 'ablations.clip.variance.runs' = 'nope'",
        ),
        (
            lambda c: c["ablations"]["clip"].update(eval={"benchmarks": {"math500": {}}}),
            "config key 'ablations.clip.eval.benchmarks.math500'",
        ),
    ],
    ids=[
        "estimator",
        "variant-estimator",
        "key",
        "type",
        "option",
        "range",
        "top_k=V",
        "ablation-top_k",
        "override-key",
        "override-type",
        "override-nan",
        "ablation-override-inf",
        "override-workflow-key",
        "option-in-overrides",
        "step",
        "toy-benchmark",
        "backend",
        "nan",
        "inf",
        "ablation-variance-run",
        "ablation-benchmark",
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, edit, message):
    proc = snakemake("-n", "--configfile", str(bad_config(tmp_path, edit)), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Building DAG of jobs" not in proc.stdout + proc.stderr


def hub_config(tmp_path, edit) -> Path:
    cfg = yaml.safe_load((REPO / "config/small.yaml").read_text())
    edit(cfg)
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "edit",
    [
        lambda c, bad: c["train"].update(prompts=bad),
        lambda c, bad: c.update(experiment=bad),
        lambda c, bad: c["eval"]["benchmarks"].update({bad: {}}),
        lambda c, bad: c["eval"].update(args={bad: 1}),
        lambda c, bad: c["train"].update(overrides={bad: 1}),
    ],
    ids=["train.prompts", "experiment", "benchmark", "flag", "override"],
)
@pytest.mark.parametrize("kind", ["shell", "traversal"])
def test_names_with_shell_syntax_or_paths_fail_at_parse_time(tmp_path, edit, kind):
    """Names that become paths, wildcards or flags are validated by the schema (a regression: a
    `train.prompts` of ``x`touch /tmp/pwned` `` reached the prepare_benchmark shell command, and
    ``../../../../../tmp/x`` wrote its log outside the repository)."""
    marker = tmp_path / "pwned"
    bad = f"x`touch {marker}`" if kind == "shell" else "../../../../../tmp/x"
    proc = snakemake("-n", "--configfile", str(hub_config(tmp_path, lambda c: edit(c, bad))),
                     check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "does not match" in out, out
    assert "Building DAG of jobs" not in out
    assert not marker.exists()


def shell_commands(*args) -> list[list[str]]:
    """The shell commands of a dry run (-p), each split into words as the shell would."""
    out = snakemake(*args, "-n", "-p", "--forceall").stdout
    prefix = "Shell command: "
    return [
        shlex.split(line[len(prefix) :]) for line in out.splitlines() if line.startswith(prefix)
    ]


def test_paths_with_spaces_and_quotes_reach_the_commands_as_one_word(tmp_path):
    """Every value that reaches a `shell:` command is quoted: a training config and benchmark
    files whose paths hold spaces and quotes arrive as single arguments."""
    folder = tmp_path / "my dir"
    folder.mkdir()
    train_config = folder / "train config.yaml"
    shutil.copy(REPO / "config/train/small.yaml", train_config)
    files = [str(folder / "part 1.jsonl"), str(tmp_path / "it's.jsonl")]

    def edit(c):
        c["train"]["config"] = str(train_config)
        c["eval"]["benchmarks"]["math500"]["path"] = files

    commands = shell_commands("--configfile", str(hub_config(tmp_path, edit)))
    train = [c for c in commands if "vopd.train" in c]
    assert train and all(c[c.index("--config") + 1] == str(train_config) for c in train)
    prepare = next(c for c in commands if "prepare" in c and "math500" in c)
    start = prepare.index("--path") + 1
    assert prepare[start : start + 2] == files and prepare[start + 2] == "--out"


def test_train_overrides_may_be_left_out(tmp_path):
    """The schema default of train.overrides applies (no KeyError)."""
    path = bad_config(tmp_path, lambda c: c["train"].pop("overrides"))
    assert GROUPED in planned_jobs("--configfile", str(path))


# ---- variants and ablations --------------------------------------------------------------------


def planned_outputs(*args) -> list[str]:
    """Every output file of a dry run (as if nothing had been built yet)."""
    out = snakemake(*args, "-n", "--forceall").stdout.splitlines()
    files = []
    for line in out:
        if line.strip().startswith("output:"):
            files += [f.strip() for f in line.split(":", 1)[1].split(",")]
    return files


def test_a_run_with_the_same_resolved_config_is_reused_not_retrained():
    out = snakemake("ablation_clip", "-n", "-p", "--forceall").stdout
    # the clip ablation's vopd is the main vopd (same config and seed): copied
    assert "copy-run results/toy/vopd/seed1 results/toy_ablation_clip/vopd/seed1" in out
    assert "--out results/toy_ablation_clip/vopd/seed1 " not in out  # not trained again
    assert "--out results/toy_ablation_clip/vopd_noclip/seed1 " in out


def test_a_variant_with_a_reused_seed_trains_its_other_seeds_one_job_each(tmp_path):
    """The clip ablation on seeds 0-3: its vopd is the main vopd on seeds 0-2 (copied by
    reuse_run) and trains seed 3 alone; its own variants train seeds 0-3 in one job."""
    path = bad_config(tmp_path, lambda c: c["ablations"]["clip"].update(seeds=[0, 1, 2, 3]))
    out = snakemake("ablation_clip", "-n", "-p", "--forceall", "--configfile", str(path)).stdout
    assert "copy-run results/toy/vopd/seed2 results/toy_ablation_clip/vopd/seed2" in out
    assert "--out results/toy_ablation_clip/vopd/seed3 estimator=vopd" in out
    runs = " ".join(f"--out results/toy_ablation_clip/vopd_noclip/seed{s}" for s in range(4))
    assert f"--seeds 0,1,2,3 {runs} " in out
    counts = job_counts("ablation_clip", "--configfile", str(path))
    assert {r: n for r, n in counts.items() if r.startswith(("train", "reuse"))} == {
        "train_clip_seeds0_1_2_3": 3,  # the three *_noclip variants
        "train": 3,  # seed 3 of sample_opd, vopd, full_opd
        "reuse_run": 9,  # their seeds 0-2
        GROUPED: 3,  # the main runs copied
    }


def test_two_variants_of_one_estimator_are_two_run_directories(tmp_path):
    def edit(c):
        c["estimators"] = {
            "vopd_topk_k4": {"estimator": "vopd_topk", "top_k": 4},
            "vopd_topk_k16": {"estimator": "vopd_topk", "top_k": 16},
            "sample_opd": {},
        }
        c["variance"]["runs"] = ["sample_opd"]

    out = snakemake("-n", "-p", "--configfile", str(bad_config(tmp_path, edit))).stdout
    for k in (4, 16):
        run = f"results/toy/vopd_topk_k{k}/seed0"
        assert f"{run}/done.json" in out
        assert f"--out {run} --out " in out and f"top_k={k}" in out
        assert f"--seeds 0,1,2 --out {run} --out {run[:-1]}1 " in out
    assert '"vopd_topk_k16": {"estimator": "vopd_topk", "top_k": 16}' in out  # probed as such


ABLATIONS = yaml.safe_load((REPO / "config/config.yaml").read_text())["ablations"]
SHARED = ("resources/toy/",)  # the toy world and SFT models every experiment reuses


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_target_plans_only_its_own_jobs(name):
    """Its runs, evaluations, tables, figures and report; the shared toy world and SFT models;
    and the main comparison's runs that it reuses (same resolved trainer config and seed:
    trained once, copied by reuse_run), nothing else."""
    decl = ABLATIONS[name]
    files = planned_outputs(f"ablation_{name}")
    own = f"results/toy_ablation_{name}/"
    reused = {f for f in files if f.startswith("results/toy/") and f.endswith("/done.json")}
    for f in reused:  # only main runs of the same estimator definition, trained once
        variant = f.split("/")[2]
        assert variant in yaml.safe_load((REPO / "config/config.yaml").read_text())["estimators"]
    allowed = (own, *SHARED)
    assert files and all(f.startswith(allowed) or f in reused for f in files), [
        f for f in files if not f.startswith(allowed) and f not in reused
    ]
    runs = {f.split("/")[2] for f in files if f.startswith(own) and f.endswith("/done.json")}
    assert runs == set(decl["estimators"])
    seeds = {f.split("/")[3] for f in files if f.startswith(own) and f.endswith("/done.json")}
    assert len(seeds) >= 3
    assert f"{own}report.md" in files and f"{own}tables/accuracy.md" in files
    assert f"{own}figures/accuracy.png" in files
    if "sweep" in decl:
        assert f"{own}tables/sweep.md" in files and f"{own}figures/sweep.png" in files
    assert not any("/profile/" in f for f in files)  # ablations never profile


def test_ablations_target_builds_every_ablation_and_the_default_none():
    jobs = planned_outputs("ablations")
    assert {f.split("/")[1] for f in jobs if f.startswith("results/")} == {
        "toy",  # the reused main runs (training only)
        *(f"toy_ablation_{n}" for n in ABLATIONS),
    }
    main_files = [f for f in jobs if f.startswith("results/toy/")]
    assert main_files and all(f.endswith("/done.json") for f in main_files)
    default = planned_outputs()
    assert not any("_ablation_" in f for f in default)


# ---- the smoke run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = checkout_copy(tmp_path_factory.mktemp("clone"))
    start = time.perf_counter()
    snakemake("--cores", "all", "--configfile", SMOKE, cwd=root, env=env_for(root))
    return root, time.perf_counter() - start


def test_smoke_run_produces_the_results_contract(smoke):
    root, seconds = smoke
    print(f"smoke run: {seconds:.0f} s")
    exp = root / "results" / "smoke"
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
    cfg = yaml.safe_load((root / SMOKE).read_text())
    assert set(runs["variant"]) == set(cfg["estimators"])
    # a second variant of one estimator, with its own option, ran end to end
    k8 = runs[runs["variant"] == "topk_opd_k8"]
    assert set(k8["estimator"]) == {"topk_opd"} and set(k8["variant_options"]) == {"top_k=8"}
    assert "top_k: 8" in (exp / "topk_opd_k8" / "seed0" / "config.yaml").read_text()
    assert set(runs["source"]) == {"train", "eval"}
    assert set(runs.loc[runs["source"] == "eval", "benchmark"]) >= {"toy_test"}
    assert set(runs.loc[runs["source"] == "eval", "n"]) == {cfg["eval"]["sampling"]["n"]}
    var = pd.read_parquet(exp / "variance.parquet")
    assert {"total_variance", "adam_proxy"} <= set(var["probe"])
    assert list(var.columns[:7]) == [
        "experiment", "variant", "estimator", "seed", "step", "probe", "value"
    ]  # fmt: skip
    assert "topk_opd_k8" in set(var["variant"])  # probed as a variant
    prof = pd.read_parquet(exp / "profile.parquet")
    assert list(prof.columns[:7]) == [
        "estimator",
        "vocab_size",
        "seq_len",
        "batch",
        "step_s",
        "peak_mem_bytes",
        "device",
    ]
    for name in ("accuracy", "training", "variance", "cost"):
        assert (exp / "tables" / f"{name}.md").is_file()
    assert (exp / "figures" / "accuracy.png").is_file()
    assert "## Accuracy" in (exp / "report.md").read_text()
    print(f"smoke run wall clock: {seconds:.0f} s (budget 300 s on an idle 2-core machine)")
    if SMOKE_BUDGET_S is not None:
        budget = float(SMOKE_BUDGET_S)
        assert seconds <= budget, f"smoke run took {seconds:.0f} s > {budget:.0f} s"


def test_smoke_ablation_target_builds_its_report_and_joins_the_main_one(smoke):
    """`ablation_clip` of the smoke config builds only that ablation (the toy world and models
    are reused); the next default run adds its section to the main report.md."""
    root, _ = smoke
    env = env_for(root)
    dry = snakemake("ablation_clip", "-n", "--configfile", SMOKE, cwd=root, env=env).stdout
    # nothing of the main comparison is rebuilt: its runs are only read (rule reuse_run)
    assert "toy_sft" not in dry and "output: results/smoke/" not in dry
    snakemake("ablation_clip", "--cores", "all", "--configfile", SMOKE, cwd=root, env=env)
    abl = root / "results" / "smoke_ablation_clip"
    runs = pd.read_parquet(abl / "runs.parquet")
    assert set(runs["variant"]) == {"vopd", "vopd_noclip"}
    noclip = runs[runs["variant"] == "vopd_noclip"]
    assert set(noclip["variant_options"]) == {"max_grad_norm=1000000000.0"}
    assert "max_grad_norm: 1000000000.0" in (abl / "vopd_noclip/seed0/config.yaml").read_text()
    assert (abl / "report.md").is_file() and (abl / "figures" / "accuracy.png").is_file()
    snakemake("--cores", "all", "--configfile", SMOKE, cwd=root, env=env)
    assert "### Ablation `clip`" in (root / "results" / "smoke" / "report.md").read_text()


def test_snakemake_report_has_a_caption_per_figure(smoke):
    root, _ = smoke
    snakemake("--configfile", SMOKE, "--report", "report.html", cwd=root, env=env_for(root))
    html = (root / "report.html").read_text()
    # one caption per figure, rendered from workflow/report/*.rst
    for caption in ("Held-out accuracy", "Training curves", "Gradient variance", "Cost of each"):
        assert caption in html, caption


def test_rerun_has_nothing_to_do(smoke):
    root, _ = smoke
    out = snakemake("-n", "--configfile", SMOKE, cwd=root, env=env_for(root)).stdout
    assert "Nothing to be done" in out


# ---- kill and resume --------------------------------------------------------------------------


def wait_for(path_glob: str, root: Path, timeout: float) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"{path_glob} did not appear within {timeout} s")


TIMING = ("step_s", "time_", "tokens_per_s", "_s")  # differs between any two runs


def deterministic(df: pd.DataFrame, column: str) -> pd.DataFrame:
    keep = ~df[column].astype(str).str.contains("|".join(TIMING))
    return df[keep].reset_index(drop=True)


def opt_in(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with -m slow")


@pytest.mark.slow
def test_kill_during_distillation_then_resume_equals_uninterrupted(tmp_path, request):
    """Interrupt Snakemake (SIGINT to its process group, as Ctrl-C does) while a distillation
    job runs, after its first checkpoint; rerun the same command: the job resumes from the
    checkpoint and runs.parquet and every table equal an uninterrupted run's (timings aside).
    Two smoke runs in separate copies, with 8 steps, a checkpoint every 4 and seeds 0-1 in one
    training job per variant: the kill lands in seed 1 after seed 0 finished."""
    opt_in(request)
    cfg = yaml.safe_load((REPO / SMOKE).read_text())
    cfg["train"].update(steps=8, save_every=4)
    cfg["seeds"] = [0, 1]
    cfg["eval"]["steps"] = [8]
    cfg["variance"]["steps"] = [8]
    results, killed_run = {}, None
    for name in ("uninterrupted", "killed"):
        root = checkout_copy(tmp_path / name)
        (root / "resume.yaml").write_text(yaml.safe_dump(cfg))
        env = env_for(root)
        cmd = [sys.executable, "-m", "snakemake", "--cores", "all", "--configfile", "resume.yaml"]
        if name == "killed":
            proc = subprocess.Popen(
                cmd,
                cwd=root,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            ckpt = wait_for("results/smoke/*/seed1/checkpoints/step4", root, timeout=600)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
            killed_run = ckpt.parent.parent
            assert not (killed_run / "done.json").exists(), "killed too late: the run finished"
            assert (killed_run / "checkpoints" / "step4").is_dir()  # Snakemake kept it
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=1200)
        results[name] = root / "results" / "smoke"
    # vopd.train appends a line to resumes.jsonl each time it resumes from a checkpoint
    assert (killed_run / "resumes.jsonl").is_file(), "the rerun did not resume"
    assert (killed_run.parent / "logs" / "train-seeds0-1.log").is_file()  # one job, both seeds
    pd.testing.assert_frame_equal(
        deterministic(pd.read_parquet(results["killed"] / "runs.parquet"), "metric"),
        deterministic(pd.read_parquet(results["uninterrupted"] / "runs.parquet"), "metric"),
        check_exact=True,
    )
    for table in sorted((results["uninterrupted"] / "tables").glob("*.csv")):
        if table.name == "cost.csv":
            continue  # a profile of timings
        killed = pd.read_csv(results["killed"] / "tables" / table.name)
        column = "metric" if "metric" in killed.columns else "probe"
        pd.testing.assert_frame_equal(
            deterministic(killed, column), deterministic(pd.read_csv(table), column)
        )
