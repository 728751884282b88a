# Models and data: the toy world and its SFT'd teacher and student (scale toy), or benchmark
# files prepared from the registry / local paths (scale hub).


rule toy_world:
    """Character tokenizer, training prompts and held-out benchmarks of the arithmetic world."""
    output:
        world=f"{TOY}/world.json",
        prompts=f"{TOY}/prompts/train.parquet",
        benchmarks=expand(f"{TOY}/benchmarks/{{name}}.parquet", name=TOY_BENCHMARKS),
        tokenizer=directory(f"{TOY}/tokenizer"),
    log:
        f"{TOY}/logs/world.log",
    benchmark:
        f"{TOY}/benchmark/world.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        out=toy_dir,
        flags=toy_world_flags,
    shell:
        "python -m vopd.toy world --out {params.out:q} {params.flags} > {log:q} 2>&1"


rule toy_sft:
    """The teacher and the student: the shipped ones (vopd/toy/shipped, hashes and greedy accuracy
    verified) when the world and SFT settings are theirs and toy.rebuild is false; otherwise SFT
    the teacher until it is good and keep an earlier, weaker checkpoint as the student."""
    input:
        world=f"{TOY}/world.json",
        prompts=f"{TOY}/prompts/train.parquet",
        benchmarks=expand(f"{TOY}/benchmarks/{{name}}.parquet", name=TOY_BENCHMARKS),
    output:
        summary=f"{TOY}/models/sft_summary.json",
        teacher=directory(f"{TOY}/models/teacher"),
        student=directory(f"{TOY}/models/student"),
    log:
        f"{TOY}/logs/sft.log",
    benchmark:
        f"{TOY}/benchmark/sft.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    threads: SFT_THREADS
    params:
        torch_env=torch_env,
        world=toy_world_dir,
        out=toy_models_dir,
        flags=toy_sft_flags,
    shell:
        "{params.torch_env} python -m vopd.toy models --world {params.world:q}"
        " --out {params.out:q} {params.flags} > {log:q} 2>&1"


rule prepare_benchmark:
    """A benchmark (or the training prompt set) normalised to the benchmark Parquet schema."""
    output:
        parquet="resources/benchmarks/{benchmark}.parquet",
    log:
        "resources/benchmarks/logs/{benchmark}.log",
    benchmark:
        "resources/benchmarks/benchmark/{benchmark}.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        flags=prepare_flags,
    shell:
        "python -m vopd.data prepare --benchmark {wildcards.benchmark:q} {params.flags}"
        " --out {output.parquet:q} > {log:q} 2>&1"
