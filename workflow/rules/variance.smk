# Gradient variance at fixed checkpoints: K independent rollout batches on the same prompts,
# every probed estimator's gradient on each, total variance and friends. (The Adam-moment proxy
# over training comes from each run's metrics.jsonl and needs no rule of its own.)
#
# One job per probed run covers all the experiment's probe steps in one process (one start-up per
# run, not per checkpoint). The steps differ between experiments, and a rule's outputs cannot
# depend on a wildcard, so each experiment that probes gets its own rule: variance_probe for the
# main comparison, variance_probe_ABLATION for an ablation.


for _exp in (e for e in EXPERIMENTS.values() if e.variance["activate"]):

    rule:
        """Variance probes of the experiment's probed variants (--variants JSON) at every probed
        checkpoint of one run, in one process. Each step's Parquet is written atomically and
        flagged `update`, so Snakemake keeps the finished ones when it reruns the job, and the
        probe keeps a step whose file already holds the same checkpoint's probes: a killed job
        resumes at the first missing step."""
        name:
            variance_rule_name(_exp)
        input:
            done=f"results/{_exp.name}/{{variant}}/seed{{seed}}/done.json",
        output:
            probes=update(variance_outputs(_exp)),
        log:
            f"results/{_exp.name}/{{variant}}/seed{{seed}}/logs/variance.log",
        benchmark:
            f"results/{_exp.name}/{{variant}}/seed{{seed}}/benchmark/variance.tsv"
        conda:
            TORCH_ENV
        threads: TOY_MODEL_THREADS
        params:
            torch_env=torch_env,
            run_dir=run_dir_of_input,
            steps=variance_step_flags,
            flags=lambda wildcards, _exp=_exp: variance_flags(_exp),
        shell:
            "{params.torch_env} python -m vopd.variance --run-dir {params.run_dir:q}"
            " {params.steps} {params.flags} > {log:q} 2>&1"
