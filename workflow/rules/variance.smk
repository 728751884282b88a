# Gradient variance at fixed checkpoints: K independent rollout batches on the same prompts,
# every probed estimator's gradient on each, total variance and friends. (The Adam-moment proxy
# over training comes from each run's metrics.jsonl and needs no rule of its own.)


rule variance_probe:
    """Variance probes of the configured variants at one checkpoint of one run (--variants JSON)."""
    input:
        done="results/{experiment}/{variant}/seed{seed}/done.json",
    output:
        probes="results/{experiment}/{variant}/seed{seed}/variance/step{step}.parquet",
    log:
        "results/{experiment}/{variant}/seed{seed}/logs/variance_step{step}.log",
    benchmark:
        "results/{experiment}/{variant}/seed{seed}/benchmark/variance_step{step}.tsv"
    conda:
        TORCH_ENV
    threads: TOY_MODEL_THREADS
    params:
        torch_env=torch_env,
        run_dir=run_dir_of_input,
        flags=variance_flags,
    shell:
        "{params.torch_env} python -m vopd.variance --run-dir {params.run_dir:q}"
        " --step {wildcards.step:q} --out {output.probes:q} {params.flags} > {log:q} 2>&1"
