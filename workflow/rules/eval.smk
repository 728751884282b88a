# Evaluation: sample n completions per problem from a checkpoint (or a reference model), then
# grade them offline. Grading is its own rule so it can be rerun without regenerating.


rule generate:
    """Samples of one run's checkpoint at one step on every benchmark: the model loads once
    (one process start, one vLLM engine start) per checkpoint."""
    input:
        done="results/{experiment}/{variant}/seed{seed}/done.json",
        benchmarks=benchmark_files,
    output:
        samples=expand(
            "results/{{experiment}}/{{variant}}/seed{{seed}}/eval/{benchmark}/step{{step}}/samples.parquet",
            benchmark=BENCHMARKS,
        ),
    log:
        "results/{experiment}/{variant}/seed{seed}/logs/generate_step{step}.log",
    benchmark:
        "results/{experiment}/{variant}/seed{seed}/benchmark/generate_step{step}.tsv"
    conda:
        TORCH_ENV
    threads: TOY_MODEL_THREADS
    params:
        torch_env=torch_env,
        model=checkpoint_flags,
        sampling=run_sampling_flags,
    shell:
        "{params.torch_env} python -m vopd.eval.generate {params.model}"
        " --benchmark {input.benchmarks:q} --out {output.samples:q} {params.sampling}"
        " > {log:q} 2>&1"


rule grade:
    """Per-sample grades and the summary (avg@n, pass@k, maj@n, CIs) of one evaluation."""
    input:
        samples="results/{experiment}/{variant}/seed{seed}/eval/{benchmark}/step{step}/samples.parquet",
        benchmark=benchmark_file,
    output:
        grades="results/{experiment}/{variant}/seed{seed}/eval/{benchmark}/step{step}/grades.parquet",
        summary="results/{experiment}/{variant}/seed{seed}/eval/{benchmark}/step{step}/summary.json",
    log:
        "results/{experiment}/{variant}/seed{seed}/logs/grade_{benchmark}_step{step}.log",
    benchmark:
        "results/{experiment}/{variant}/seed{seed}/benchmark/grade_{benchmark}_step{step}.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        out_dir=grade_dir,
    shell:
        "python -m vopd.eval.grade --samples {input.samples:q} --benchmark {input.benchmark:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule generate_reference:
    """Samples of a model that was not distilled (the student before distillation, or the
    teacher) on every benchmark."""
    input:
        unpack(model_inputs),
        benchmarks=benchmark_files,
    output:
        samples=expand(
            "results/{{experiment}}/reference/{{model}}/eval/{benchmark}/samples.parquet",
            benchmark=BENCHMARKS,
        ),
    log:
        "results/{experiment}/reference/{model}/logs/generate.log",
    benchmark:
        "results/{experiment}/reference/{model}/benchmark/generate.tsv"
    conda:
        TORCH_ENV
    threads: TOY_MODEL_THREADS
    params:
        torch_env=torch_env,
        model=reference_flags,
        sampling=reference_sampling_flags,
    shell:
        "{params.torch_env} python -m vopd.eval.generate {params.model}"
        " --benchmark {input.benchmarks:q} --out {output.samples:q} {params.sampling}"
        " > {log:q} 2>&1"


rule grade_reference:
    input:
        samples="results/{experiment}/reference/{model}/eval/{benchmark}/samples.parquet",
        benchmark=benchmark_file,
    output:
        grades="results/{experiment}/reference/{model}/eval/{benchmark}/grades.parquet",
        summary="results/{experiment}/reference/{model}/eval/{benchmark}/summary.json",
    log:
        "results/{experiment}/reference/{model}/logs/grade_{benchmark}.log",
    benchmark:
        "results/{experiment}/reference/{model}/benchmark/grade_{benchmark}.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        out_dir=grade_dir,
    shell:
        "python -m vopd.eval.grade --samples {input.samples:q} --benchmark {input.benchmark:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
