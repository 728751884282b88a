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


def test_the_smoke_configs_share_one_buildable_toy_world(tmp_path):
    """Both smoke configs write resources/toy_smoke, so their world and SFT flags must be the
    same (else each run would rebuild the other's), and that world must be buildable: a dry run
    plans the world job without running it, so a split too large for its problem space would
    only fail at run time."""
    import yaml

    from vopd.toy.__main__ import main as toy_main

    smoke, vllm = (
        yaml.safe_load((REPO / ".test" / "config" / name).read_text())["toy"]
        for name in ("config.yaml", "vllm.yaml")
    )
    assert smoke == vllm
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in smoke["world"].items()]
    toy_main(["world", "--out", str(tmp_path / "world"), *flags])
    assert (tmp_path / "world" / "benchmarks" / "toy_mcq.parquet").is_file()
