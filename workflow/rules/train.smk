# Distillation: one run per variant x seed, in results/{experiment}/{variant}/seed{seed}/. The
# declared output is done.json, which the trainer writes last; checkpoints
# (RUN_DIR/checkpoints/step{N}/) are deliberately NOT outputs, so Snakemake never deletes them: a
# killed run is rerun into the same RUN_DIR and the trainer resumes from its last checkpoint.
#
# A training job trains train.seeds_per_job seeds of one variant in one process (default: every
# seed at scale toy, one at hub). A group of several seeds has a rule of its own per experiment
# and group (an experiment's seeds are its own, and a rule's outputs cannot depend on a
# wildcard): its outputs are every seed's done.json, its {variant} only the variants that train
# all of the group's seeds (a variant with a run copied by reuse_run keeps one job per seed).
# The trainer skips a finished seed and resumes a killed one, so a killed grouped job reruns as
# a whole. Rule order: reuse_run > a grouped rule > train.


for _exp in EXPERIMENTS.values():
    for _seeds in seed_groups(_exp):
        _variants = grouped_variants(_exp, _seeds)
        if len(_seeds) < 2 or not _variants:
            continue

        rule:
            """OPD of the student towards the teacher with one variant and several seeds, one
            after the other in one process (python -m vopd.train --seeds); each run exactly as
            its own job would train it."""
            name:
                train_group_rule_name(_exp, _seeds)
            input:
                unpack(train_inputs),
            output:
                [f"results/{_exp.name}/{{variant}}/seed{s}/done.json" for s in _seeds],
            log:
                f"results/{_exp.name}/{{variant}}/logs/{train_group_tag(_seeds)}.log",
            benchmark:
                f"results/{_exp.name}/{{variant}}/benchmark/{train_group_tag(_seeds)}.tsv"
            wildcard_constraints:
                variant="|".join(re.escape(v) for v in _variants),
            conda:
                TORCH_ENV
            threads: TOY_MODEL_THREADS
            resources:
                nproc=1,
            params:
                torch_env=torch_env,
                runs=run_dirs_flags,
                overrides=group_overrides(_exp, _seeds),
            shell:
                "{params.torch_env} python -m vopd.train --config {input.config:q}"
                " {params.runs} {params.overrides} > {log:q} 2>&1"

        workflow.ruleorder("reuse_run", train_group_rule_name(_exp, _seeds), "train")


rule train:
    """OPD of the student towards the teacher with one variant (an estimator, its options and
    trainer overrides) and one seed."""
    input:
        unpack(train_inputs),
    output:
        done="results/{experiment}/{variant}/seed{seed}/done.json",
    log:
        "results/{experiment}/{variant}/seed{seed}/logs/train.log",
    benchmark:
        "results/{experiment}/{variant}/seed{seed}/benchmark/train.tsv"
    conda:
        TORCH_ENV
    threads: TOY_MODEL_THREADS
    resources:
        nproc=1,
    params:
        torch_env=torch_env,
        launch=train_launcher,
        run_dir=run_dir,
        overrides=train_overrides,
    shell:
        "{params.torch_env} {params.launch} vopd.train --config {input.config:q}"
        " --out {params.run_dir:q} {params.overrides} > {log:q} 2>&1"


rule reuse_run:
    """A run whose resolved trainer config equals an earlier experiment's (the main comparison
    first): its training artefacts are copied, not trained again (vopd.experiments.copy_run);
    evaluations and probes are made for the copy. Other runs fall through to `train`."""
    input:
        done=reused_run_done,
    output:
        done="results/{experiment}/{variant}/seed{seed}/done.json",
    log:
        "results/{experiment}/{variant}/seed{seed}/logs/reuse.log",
    benchmark:
        "results/{experiment}/{variant}/seed{seed}/benchmark/reuse.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        src=run_dir_of_input,
        dst=run_dir,
    shell:
        "python -m vopd.experiments copy-run {params.src:q} {params.dst:q} > {log:q} 2>&1"


ruleorder: reuse_run > train
