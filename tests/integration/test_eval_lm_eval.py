"""lm-eval cross-check: our greedy accuracy on the toy benchmark vs lm-evaluation-harness (its
``hf`` backend, its own regex filter + exact_match) on the same model. Every disagreement must be
one of the named grader differences documented in docs/evaluation.md (G1-G4)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from eval_toy import cached_toy

import vopd.eval
from vopd.eval import generate, grade
from vopd.eval.graders import extract_boxed, math_equal

pytestmark = pytest.mark.integration
TASKS = Path(vopd.eval.__file__).parent / "lm_eval_tasks"
LIMIT = 12


def _lm_eval_filter_and_match(text: str, gold: str) -> tuple[str, bool]:
    """lm-eval's own code, configured exactly as in vopd_toy_test.yaml."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    cfg = yaml.safe_load((TASKS / "vopd_toy_test.yaml").read_text())
    regex = cfg["filter_list"][0]["filter"][0]
    filt = RegexFilter(regex_pattern=regex["regex_pattern"], group_select=regex["group_select"])
    (extracted,) = next(iter(filt.apply([[text]], [{}])))
    return extracted, exact_match_hf_evaluate([extracted], [gold])["exact_match"] == 1.0


def explain(text: str, gold: str, ours_correct: bool, lm_correct: bool) -> str | None:
    """The named grader difference behind a disagreement (None: they agree, or unexplained)."""
    if ours_correct == lm_correct:
        return None
    ours, (lm, _) = extract_boxed(text), _lm_eval_filter_and_match(text, gold)
    if ours != lm:
        if ours is not None and ("{" in ours or "}" in ours):
            return "G1 nested braces"
        if ours is None and lm != "[invalid]":
            return "G3 unclosed last box"
        if lm == "[invalid]" and ours is not None:
            return "G4 brace-less box"
        return None
    if ours_correct and not lm_correct and math_equal(gold, ours) and ours != gold:
        return "G2 string vs math equality"
    return None


@pytest.mark.parametrize(
    ("text", "gold", "difference"),
    [
        ("12+35=47;\\boxed{47}", "47", None),  # both right
        ("\\boxed{46}", "47", None),  # both wrong
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "G1 nested braces"),
        ("\\boxed{087}", "87", "G2 string vs math equality"),
        ("\\boxed{0.5}", "\\frac{1}{2}", "G2 string vs math equality"),
        ("\\boxed{3} or \\boxed{4", "3", "G3 unclosed last box"),
        ("\\boxed 7", "7", "G4 brace-less box"),
    ],
)
def test_named_grader_differences(text, gold, difference):
    ours_correct = (e := extract_boxed(text)) is not None and math_equal(gold, e)
    _, lm_correct = _lm_eval_filter_and_match(text, gold)
    assert (ours_correct != lm_correct) == (difference is not None)
    assert explain(text, gold, ours_correct, lm_correct) == difference


def test_task_yamls_are_indexed_without_downloading():
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=str(TASKS), include_defaults=False).all_tasks)
    assert {"vopd_toy_test", "vopd_toy_hard", "vopd_toy_mcq", "vopd_math500"} <= names


def test_math500_task_utils():
    spec = importlib.util.spec_from_file_location("vopd_lm_eval_utils", TASKS / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"solution": "so $\\boxed{\\frac{14}{3}}$", "answer": "\\frac{14}{3}"}
    assert utils.process_results(doc, ["... \\boxed{\\frac{14}{3}}"]) == {
        "boxed_exact_match": 1,
        "math_verify": 1,
    }
    # not boxed: the whole-completion math-verify still finds it, the boxed match does not
    assert utils.process_results(doc, ["The answer is $\\frac{28}{6}$."]) == {
        "boxed_exact_match": 0,
        "math_verify": 1,
    }
    assert utils.process_results(doc, ["\\boxed{5}"]) == {"boxed_exact_match": 0, "math_verify": 0}


def test_greedy_accuracy_matches_lm_eval(request, tmp_path):
    model, bench = cached_toy(request)
    root = bench.parents[3]  # the folder holding resources/toy/benchmarks/toy_test.parquet
    ours = tmp_path / "ours"
    generate.main(
        [
            "--model",
            str(model),
            "--benchmark",
            str(bench),
            "--out",
            str(ours / "samples.parquet"),
            "--n",
            "1",
            "--temperature",
            "0",
            "--max-new-tokens",
            "64",
            "--batch-size",
            "1",
            "--limit",
            str(LIMIT),
        ]
    )
    grade.main(
        [
            "--samples",
            str(ours / "samples.parquet"),
            "--benchmark",
            str(bench),
            "--out-dir",
            str(ours),
        ]
    )
    summary = json.loads((ours / "summary.json").read_text())

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "ds_cache"),
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model},dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        "vopd_toy_test",
        "--include_path",
        str(TASKS),
        "--batch_size",
        "1",
        "--limit",
        str(LIMIT),
        "--log_samples",
        "--output_path",
        str(tmp_path / "lm"),
    ]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "lm" / "*" / "results_*.json"))
    (samples_file,) = glob.glob(str(tmp_path / "lm" / "*" / "samples_vopd_toy_test_*.jsonl"))
    lm_acc = json.loads(Path(results_file).read_text())["results"]["vopd_toy_test"][
        "exact_match,last_boxed"
    ]
    records = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    lm = {rec["doc"]["id"]: rec for rec in records}

    samples = pd.read_parquet(ours / "samples.parquet").set_index("problem_id")
    grades = pd.read_parquet(ours / "grades.parquet").set_index("problem_id")
    gold = pd.read_parquet(bench).set_index("id")["answer"]
    assert set(lm) == set(samples.index) and len(lm) == LIMIT
    explained = 0
    for pid, rec in lm.items():
        # the same model and greedy decoding: the very same completion text
        assert rec["resps"][0][0] == samples.loc[pid, "text"], pid
        ours_ok, lm_ok = bool(grades.loc[pid, "correct"]), rec["exact_match"] == 1.0
        if ours_ok != lm_ok:
            reason = explain(samples.loc[pid, "text"], gold[pid], ours_ok, lm_ok)
            assert reason is not None, f"unexplained disagreement on {pid}"
            explained += 1 if ours_ok else -1
    assert summary["avg@1"] - lm_acc == pytest.approx(explained / LIMIT)
    assert 0 < summary["avg@1"] < 1
