# Cost: time and peak memory of each estimator over a sweep of vocabulary size and sequence
# length (each variant in a fresh process). Independent of training.


rule cost_profile:
    """Per-estimator step time and peak memory over the configured V x T sweep of one mode."""
    output:
        profile="results/{experiment}/profile/{mode}.parquet",
    log:
        "results/{experiment}/profile/logs/{mode}.log",
    benchmark:
        "results/{experiment}/profile/benchmark/{mode}.tsv"
    conda:
        TORCH_ENV
    threads: ALL_CORES
    params:
        torch_env=torch_env,
        flags=profile_flags,
    shell:
        "{params.torch_env} python -m vopd.profile --out {output.profile:q} {params.flags}"
        " > {log:q} 2>&1"
