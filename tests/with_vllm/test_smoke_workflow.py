"""The pipeline through vLLM: ``snakemake --cores all --configfile .test/config/vllm.yaml`` in a
copy of the checkout (what a fresh clone holds), with this interpreter's environment first on
PATH, as an activated vLLM virtualenv would have it: training with vLLM rollouts into LoRA
adapters, evaluation with the vLLM backend, then the tables and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = ".test/config/vllm.yaml"


def checkout_copy(dest: Path) -> Path:
    """Tracked + untracked non-ignored files of this checkout, copied into dest."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


@pytest.fixture(scope="module")
def smoke_vllm(tmp_path_factory, child_env_factory):
    root = checkout_copy(tmp_path_factory.mktemp("clone-vllm"))
    env = child_env_factory(root)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "all", "--configfile", CONFIG],
        cwd=root, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    logs = "\n".join(
        f"--- {p.relative_to(root)}\n{p.read_text()[-3000:]}"
        for p in sorted((root / "results").rglob("logs/*.log"))
    ) if (root / "results").is_dir() else ""  # fmt: skip
    assert proc.returncode == 0, f"{proc.stderr[-6000:]}\n{logs[-20000:]}"
    print(f"vLLM smoke run: {seconds:.0f} s")
    return root


def test_vllm_smoke_run_trains_evaluates_and_reports(smoke_vllm):
    root = smoke_vllm
    cfg = yaml.safe_load((root / CONFIG).read_text())
    exp = root / "results" / cfg["experiment"]
    runs = pd.read_parquet(exp / "runs.parquet")
    assert set(runs["estimator"]) == set(cfg["estimators"])
    assert set(runs["source"]) == {"train", "eval"} and "toy_test" in set(runs["benchmark"])
    for name in ("accuracy", "training", "variance"):
        assert (exp / "tables" / f"{name}.md").is_file()
    assert "## Accuracy" in (exp / "report.md").read_text()
    for est in cfg["estimators"]:
        run = exp / est / "seed0"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == cfg["train"]["steps"]
        assert all(r["estimator/mismatch_kl"] < 1e-8 for r in rows), est  # fp32 vLLM = trainer
        assert (run / "checkpoints" / "step4" / "adapter_config.json").is_file()
        samples = run / "eval" / "toy_test" / "step4" / "samples.parquet"
        meta = json.loads(pq.read_schema(samples).metadata[b"vopd"])
        assert meta["backend"] == "vllm" and meta["lora"], meta
        for log in (run / "logs").glob("*.log"):  # successful jobs print no traceback
            assert "Traceback" not in log.read_text(), log
