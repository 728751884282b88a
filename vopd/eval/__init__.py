"""Evaluation: generate samples (``vopd.eval.generate``), grade them offline (``vopd.eval.grade``).

``graders`` (answer extraction + math-verify) and ``metrics`` (avg@n, pass@k, maj@n, bootstrap
CIs) are pure; ``timeout_pool`` bounds every math check in time; ``lm_eval_tasks/`` holds task
YAMLs for the lm-evaluation-harness cross-check (``lm-eval run --include_path ...``).
"""
