"""The entry points on vLLM, each in its own process with its own engine (as a user runs them):

1. ``python -m vopd.train`` with vLLM rollouts, a LoRA student and the IS correction on, for
   every estimator in ``vopd.estimators.ESTIMATORS``: two steps (the second samples from the
   adapter after one update), finite losses, the train/inference mismatch logged and near zero
   in float32, an adapter-only checkpoint, and a clean exit (no traceback);
2. ``python -m vopd.eval.generate --backend vllm``: greedy completions identical to
   ``--backend hf``; sampled completions in the same samples schema, graded by the same
   ``vopd.eval.grade``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from vopd.estimators import ESTIMATORS

REPO = Path(__file__).resolve().parents[2]
TOY_CONFIG = REPO / "config" / "train" / "toy.yaml"
# float32 engine vs float32 trainer on the same weights (measured: KL ~1e-14, max |Δ| ~5e-7)
MISMATCH_KL_TOL, LOGP_ABSDIFF_TOL, IS_WEIGHT_TOL = 1e-8, 1e-4, 1e-3


def assert_clean(res, what: str) -> None:
    assert res.returncode == 0, f"{what} failed:\n{res.stderr[-6000:]}"
    assert "Traceback" not in res.stderr, f"{what} succeeded but printed:\n{res.stderr[-6000:]}"


@pytest.fixture(scope="module")
def opd_runs(python_many, vllm_models, tiny_world, tmp_path_factory) -> dict:
    """``{estimator: (CompletedProcess, run dir)}``: two steps of every estimator, two runs at a
    time (each its own process and engine)."""
    root = tmp_path_factory.mktemp("opd")
    common = [
        f"student={vllm_models['student']}",
        f"teacher={vllm_models['teacher']}",
        f"prompts={tiny_world / 'prompts' / 'train.parquet'}",
        "rollout_backend=vllm",
        "finetune=lora",
        "lora_r=8",
        "lora_alpha=16",
        "is_correction=true",
        "top_k=4",
        "prompts_per_step=8",
        "max_new_tokens=16",
        "max_steps=2",
        "save_every=2",
        "lr=1e-3",
        "vllm_kv_cache_gib=0.25",
    ]
    jobs = {
        name: ["-m", "vopd.train", "--config", str(TOY_CONFIG), "--out", str(root / name),
               "--no-progress", *common, f"estimator={name}"]
        for name in sorted(ESTIMATORS)
    }  # fmt: skip
    return {name: (res, root / name) for name, res in python_many(jobs).items()}


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_opd_steps_with_vllm_rollouts_lora_and_is_correction(estimator, opd_runs):
    res, out = opd_runs[estimator]
    assert_clean(res, f"vopd.train with {estimator}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]), r
        assert 0.0 <= r["estimator/mismatch_kl"] < MISMATCH_KL_TOL, r
        assert r["estimator/logp_absdiff_max"] < LOGP_ABSDIFF_TOL, r
        assert abs(r["estimator/is_weight_mean"] - 1.0) < IS_WEIGHT_TOL, r
        assert r["estimator/is_zeroed_frac"] == 0.0, r
    assert rows[1]["train/grad_norm"] > 0  # the adapter really trained between the two rollouts
    step = out / "checkpoints" / "step2"
    assert (step / "adapter_config.json").is_file()
    assert not (step / "model.safetensors").exists()
    assert (out / "done.json").is_file()


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_runs(python_many, vllm_models, tiny_world, tmp_path_factory):
    """samples.parquet (+ grades) of the student on toy_test: greedy with hf and with vllm,
    sampled (n = 2, T = 0.6) with each (two processes at a time)."""
    root = tmp_path_factory.mktemp("eval")
    bench = tiny_world / "benchmarks" / "toy_test.parquet"
    common = ["--model", str(vllm_models["student"]), "--benchmark", str(bench), "--limit", "16",
              "--max-new-tokens", "24"]  # fmt: skip
    modes = {"greedy": ["--temperature", "0", "--n", "1"],
             "sampled": ["--temperature", "0.6", "--n", "2"]}  # fmt: skip
    out = {(b, m): root / f"{b}-{m}" / "samples.parquet" for b in ("hf", "vllm") for m in modes}
    generated = python_many({
        (b, m): ["-m", "vopd.eval.generate", *common, *modes[m], "--backend", b, "--out", str(o)]
        for (b, m), o in out.items()
    })  # fmt: skip
    for (b, m), res in generated.items():
        assert_clean(res, f"generate --backend {b} ({m})")
    graded = python_many({
        key: ["-m", "vopd.eval.grade", "--samples", str(o), "--benchmark", str(bench),
              "--out-dir", str(o.parent)]
        for key, o in out.items()
    })  # fmt: skip
    for (b, m), res in graded.items():
        assert_clean(res, f"grade of {b} ({m})")
    return out


def test_generate_greedy_vllm_equals_hf(eval_runs):
    hf = pd.read_parquet(eval_runs["hf", "greedy"])
    vl = pd.read_parquet(eval_runs["vllm", "greedy"])
    assert len(hf) == len(vl) == 16
    assert hf["text"].tolist() == vl["text"].tolist()
    assert hf["num_tokens"].tolist() == vl["num_tokens"].tolist()
    assert hf["truncated"].tolist() == vl["truncated"].tolist()


def test_generate_sampled_vllm_has_the_hf_schema_and_is_graded(eval_runs):
    hf, vl = eval_runs["hf", "sampled"], eval_runs["vllm", "sampled"]
    assert pq.read_schema(vl).remove_metadata() == pq.read_schema(hf).remove_metadata()
    meta = json.loads(pq.read_schema(vl).metadata[b"vopd"])
    assert meta["backend"] == "vllm" and meta["sampling"]["n"] == 2
    samples = pd.read_parquet(vl)
    assert sorted(samples.groupby("problem_id").size().unique()) == [2]
    assert samples["sample_idx"].isin([0, 1]).all()
    g_hf, g_vl = (pq.read_schema(p.parent / "grades.parquet") for p in (hf, vl))
    assert g_vl.remove_metadata() == g_hf.remove_metadata()
    s_hf, s_vl = (json.loads((p.parent / "summary.json").read_text()) for p in (hf, vl))
    assert set(s_vl) == set(s_hf)
    assert len(pd.read_parquet(vl.parent / "grades.parquet")) == len(samples)
