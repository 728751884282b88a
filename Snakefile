# The workflow lives in workflow/Snakefile (the Snakemake catalog layout); this file lets
# `snakemake` run from the repository root.
include: "workflow/Snakefile"


# An included file cannot set the default target, so the root names it: workflow/Snakefile's `all`.
rule default:
    default_target: True
    input:
        rules.all.input,
