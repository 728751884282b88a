"""Task YAMLs for ``lm-eval run --include_path vopd/eval/lm_eval_tasks`` (a package only so that
``utils.py`` ships in wheels)."""
