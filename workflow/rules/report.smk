# Aggregation (tidy Parquet per results contract) and the report: tables (CSV + Markdown),
# figures (PNG + PDF, with captions for `snakemake --report`), and results/EXP/report.md.
# These rules read files only (no torch) and run on the submitting machine.


rule aggregate:
    """runs / references / variance / profile .parquet of one experiment."""
    input:
        aggregate_inputs,
    output:
        parquet="results/{experiment}/{kind}.parquet",
    log:
        "results/{experiment}/logs/aggregate_{kind}.log",
    benchmark:
        "results/{experiment}/benchmark/aggregate_{kind}.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        filters=aggregate_filters,
    shell:
        "python -m vopd.aggregate --results-dir {params.results_dir:q}"
        " --experiment {wildcards.experiment:q} --what {wildcards.kind:q} {params.filters}"
        " > {log:q} 2>&1"


rule table:
    """One comparison table, as CSV (machine-readable) and Markdown."""
    input:
        table_inputs,
    output:
        csv=report(
            "results/{experiment}/tables/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
        ),
        md="results/{experiment}/tables/{table}.md",
    log:
        "results/{experiment}/logs/table_{table}.log",
    benchmark:
        "results/{experiment}/benchmark/table_{table}.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=report_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir:q} --what tables"
        " --only {wildcards.table:q} {params.flags} > {log:q} 2>&1"


rule figure_accuracy:
    input:
        table_inputs_accuracy,
    output:
        png=report(
            "results/{experiment}/figures/accuracy.png",
            caption="../report/accuracy.rst",
            category="Figures",
        ),
        pdf="results/{experiment}/figures/accuracy.pdf",
    log:
        "results/{experiment}/logs/figure_accuracy.log",
    benchmark:
        "results/{experiment}/benchmark/figure_accuracy.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=report_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir:q} --what figures"
        " --only accuracy {params.flags} > {log:q} 2>&1"


rule figure_training_curves:
    input:
        "results/{experiment}/runs.parquet",
    output:
        png=report(
            "results/{experiment}/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
        ),
        pdf="results/{experiment}/figures/training_curves.pdf",
    log:
        "results/{experiment}/logs/figure_training_curves.log",
    benchmark:
        "results/{experiment}/benchmark/figure_training_curves.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=report_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir:q} --what figures"
        " --only training_curves {params.flags} > {log:q} 2>&1"


rule figure_variance_ratio:
    input:
        "results/{experiment}/variance.parquet",
    output:
        png=report(
            "results/{experiment}/figures/variance_ratio.png",
            caption="../report/variance_ratio.rst",
            category="Figures",
        ),
        pdf="results/{experiment}/figures/variance_ratio.pdf",
    log:
        "results/{experiment}/logs/figure_variance_ratio.log",
    benchmark:
        "results/{experiment}/benchmark/figure_variance_ratio.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=report_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir:q} --what figures"
        " --only variance_ratio {params.flags} > {log:q} 2>&1"


rule figure_cost:
    input:
        "results/{experiment}/profile.parquet",
    output:
        png=report(
            "results/{experiment}/figures/cost.png",
            caption="../report/cost.rst",
            category="Figures",
        ),
        pdf="results/{experiment}/figures/cost.pdf",
    log:
        "results/{experiment}/logs/figure_cost.log",
    benchmark:
        "results/{experiment}/benchmark/figure_cost.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=report_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir:q} --what figures"
        " --only cost {params.flags} > {log:q} 2>&1"


rule figure_sweep:
    """An ablation's accuracy against the option or override it sweeps (its `sweep:`)."""
    input:
        table_inputs_accuracy,
    output:
        png=report(
            "results/{experiment}/figures/sweep.png",
            caption="../report/sweep.rst",
            category="Figures",
        ),
        pdf="results/{experiment}/figures/sweep.pdf",
    log:
        "results/{experiment}/logs/figure_sweep.log",
    benchmark:
        "results/{experiment}/benchmark/figure_sweep.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=report_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir} --what figures"
        " --only sweep {params.flags} > {log} 2>&1"


rule summary:
    """results/EXP/report.md: the tables, the figures and what they say about the paper's claims
    (the main report also embeds every ablation built so far)."""
    input:
        summary_inputs,
    output:
        md="results/{experiment}/report.md",
    log:
        "results/{experiment}/logs/summary.log",
    benchmark:
        "results/{experiment}/benchmark/summary.tsv"
    conda:
        "../envs/vopd-cpu.yaml"
    params:
        results_dir=results_dir,
        flags=summary_flags,
    shell:
        "python -m vopd.report --results-dir {params.results_dir:q} --what summary"
        " {params.flags} > {log:q} 2>&1"
