# Distillation: one run per variant x seed, in results/{experiment}/{variant}/seed{seed}/. The
# declared output is done.json, which the trainer writes last; checkpoints
# (RUN_DIR/checkpoints/step{N}/) are deliberately NOT outputs, so Snakemake never deletes them: a
# killed run is rerun into the same RUN_DIR and the trainer resumes from its last checkpoint.


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
