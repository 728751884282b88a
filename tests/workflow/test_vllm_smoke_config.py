"""The vLLM smoke config (.test/config/vllm.yaml) is valid and plans the vLLM pipeline, checked
by a dry run in the main environment (no vLLM needed), so a change of the workflow's schema
breaks it here and not only in the vLLM environment (tests/with_vllm runs it for real)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.workflow


def test_vllm_smoke_config_plans_vllm_training_and_evaluation():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--configfile",
         ".test/config/vllm.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "rollout_backend=vllm" in out and "finetune=lora" in out
    assert "--backend vllm" in out and "--lora " in out
    assert "results/smoke_vllm/report.md" in out
