"""generate -> grade on a tiny SFT'd model: files, schema, metrics checked against arithmetic,
re-grading, resuming a killed generation, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from eval_toy import cached_toy, true_sum

from vopd.eval import generate, grade

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def toy(request):
    return cached_toy(request)


def _gen(model, bench, out, *extra):
    generate.main(
        [
            "--model",
            str(model),
            "--benchmark",
            str(bench),
            "--out",
            str(out),
            "--max-new-tokens",
            "32",
            "--batch-size",
            "16",
            *extra,
        ]
    )


def test_several_benchmarks_in_one_call_equal_one_call_each(toy, tmp_path, capsys):
    # one model load for two benchmarks, each with its own limit and seed (--set): the samples
    # equal two single-benchmark calls with those settings
    model, bench = toy
    other = tmp_path / "other.parquet"
    pd.read_parquet(bench).iloc[::-1].to_parquet(other, index=False)  # another problem order
    a, b = tmp_path / "both" / "a.parquet", tmp_path / "both" / "b.parquet"
    both = ["--benchmark", str(bench), str(other), "--out", str(a), str(b)]
    settings = ["--max-new-tokens", "32", "--n", "2", "--limit", "6", "--seed", "1"]
    generate.main(
        ["--model", str(model), *both, *settings, "--set", "other.limit=4", "--set", "other.seed=9"]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["num_problems"] for x in lines] == [6, 4]
    _gen(model, bench, tmp_path / "a1.parquet", "--n", "2", "--limit", "6", "--seed", "1")
    _gen(model, other, tmp_path / "b1.parquet", "--n", "2", "--limit", "4", "--seed", "9")
    for both, single in ((a, "a1"), (b, "b1")):
        pd.testing.assert_frame_equal(
            pd.read_parquet(both), pd.read_parquet(tmp_path / f"{single}.parquet")
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "nope.limit=3"], "NAME one of"),
        (["--set", "toy_test.backend=3"], "KEY one of"),
        (["--set", "toy_test.limit=x"], "is not a number"),
        (["--out", "a.parquet", "b.parquet"], "one samples.parquet per benchmark"),
    ],
)
def test_bad_per_benchmark_settings(toy, tmp_path, extra, message):
    model, bench = toy
    with pytest.raises(SystemExit, match=message):
        _gen(model, bench, tmp_path / "x.parquet", *extra)


def _independent_correct(text: str, problem: str) -> bool:
    found = re.findall(r"\\boxed\{(-?\d+)\}", text)
    return bool(found) and int(found[-1]) == true_sum(problem)


def test_generate_then_grade(toy, tmp_path, capsys):
    model, bench = toy
    out = tmp_path / "eval" / "samples.parquet"
    _gen(model, bench, out, "--n", "4", "--limit", "12", "--chunk-size", "5", "--seed", "3")
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["samples"] == 48 and line["n"] == 4 and line["tokens"] > 0

    table = pq.read_table(out)
    assert table.column_names == [
        "problem_id",
        "sample_idx",
        "text",
        "num_tokens",
        "truncated",
        "prompt",
    ]
    meta = json.loads(table.schema.metadata[b"vopd"])
    assert meta["sampling"] == {
        "temperature": 0.6,
        "n": 4,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 32,
        "seed": 3,
    }
    samples = table.to_pandas()
    assert sorted(samples.groupby("problem_id").size().unique()) == [4]
    assert set(samples["sample_idx"]) == {0, 1, 2, 3}
    assert not (out.parent / f".{out.name}.parts").exists()  # cleaned up after success

    grade.main(["--samples", str(out), "--benchmark", str(bench), "--out-dir", str(out.parent)])
    grades = pd.read_parquet(out.parent / "grades.parquet")
    summary = json.loads((out.parent / "summary.json").read_text())
    assert list(grades.columns) == [
        "problem_id",
        "sample_idx",
        "extracted",
        "correct",
        "timed_out",
        "grader_error",
        "flagged",
        "format_ok",
    ]

    # every grade against plain arithmetic on the completion
    merged = grades.merge(samples, on=["problem_id", "sample_idx"])
    expected = [
        _independent_correct(t, p) for t, p in zip(merged["text"], merged["prompt"], strict=True)
    ]
    assert list(merged["correct"]) == expected
    assert 0 < merged["correct"].mean() < 1  # the SFT'd model is decent, not perfect

    c = merged.groupby("problem_id")["correct"].sum()
    assert (
        summary["n"] == 4 and summary["num_problems"] == 12 and summary["benchmark"] == "toy_test"
    )
    assert summary["avg@4"] == pytest.approx(merged["correct"].mean())
    for k in range(1, 5):
        ref = sum(1 - comb(4 - ci, k) / comb(4, k) for ci in c) / len(c)
        assert summary[f"pass@{k}"] == pytest.approx(ref)
    maj = []
    for _, g in merged.sort_values("sample_idx").groupby("problem_id"):
        answers = [e for e in g["extracted"] if e is not None]
        top = max(answers, key=lambda a: (answers.count(a), -answers.index(a))) if answers else None
        maj.append(top is not None and int(top) == true_sum(g["prompt"].iloc[0]))
    assert summary["maj@4"] == pytest.approx(sum(maj) / len(maj))
    assert summary["format_rate"] == pytest.approx(merged["format_ok"].mean())
    assert summary["truncation_rate"] == pytest.approx(merged["truncated"].mean())
    assert set(summary["ci95"]) >= {"avg@4", "pass@4", "maj@4", "format_rate"}
    assert summary["sampling"]["temperature"] == 0.6

    # grading is re-runnable: same grades, same metrics
    again = tmp_path / "regrade"
    grade.main(["--samples", str(out), "--benchmark", str(bench), "--out-dir", str(again)])
    assert pd.read_parquet(again / "grades.parquet").equals(grades)
    summary2 = json.loads((again / "summary.json").read_text())
    assert {k: v for k, v in summary2.items() if k != "timing"} == {
        k: v for k, v in summary.items() if k != "timing"
    }


def test_killed_generation_resumes(toy, tmp_path):
    model, bench = toy
    args = [
        "--model",
        str(model),
        "--benchmark",
        str(bench),
        "--n",
        "2",
        "--limit",
        "8",
        "--chunk-size",
        "2",
        "--max-new-tokens",
        "32",
        "--seed",
        "5",
    ]
    ref = tmp_path / "ref" / "samples.parquet"
    generate.main([*args, "--out", str(ref)])

    out = tmp_path / "run" / "samples.parquet"
    parts = out.parent / f".{out.name}.parts"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vopd.eval.generate", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (parts / "chunk00000.parquet").exists():
        assert proc.poll() is None and time.time() < deadline, "generation ended before chunk 0"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (parts / "chunk00003.parquet").exists():
        pytest.skip("the run finished before it could be killed")
    assert not out.exists()  # nothing that looks complete

    first = pd.read_parquet(parts / "chunk00000.parquet")
    first["text"] = "REUSED " + first["text"]  # mark the saved chunk to see it reused
    first.to_parquet(parts / "chunk00000.parquet", index=False)
    generate.main([*args, "--out", str(out)])
    resumed, clean = pd.read_parquet(out), pd.read_parquet(ref)
    reused = resumed["text"].str.startswith("REUSED ")
    assert reused.sum() == len(first)  # chunk 0 was not regenerated
    resumed.loc[reused, "text"] = resumed.loc[reused, "text"].str.removeprefix("REUSED ")
    pd.testing.assert_frame_equal(resumed, clean)  # per-chunk seeds: identical to a clean run


def test_resume_never_reuses_chunks_of_other_weights_at_the_same_path(toy, tmp_path, monkeypatch):
    """Chunks saved for one model are discarded when other weights are saved at the same path
    (a regression: the resume fingerprint covered the model path, not its weights)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model, bench = toy
    same_path = tmp_path / "model"
    shutil.copytree(model, same_path)
    out = tmp_path / "eval" / "samples.parquet"
    parts = out.parent / f".{out.name}.parts"
    args = ["--n", "2", "--limit", "4", "--chunk-size", "2", "--seed", "5"]

    def killed(*a, **k):  # dies after every chunk was saved, before the final file
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "write_samples", killed)
    with pytest.raises(KeyboardInterrupt):
        _gen(same_path, bench, out, *args)
    monkeypatch.undo()
    chunk = parts / "chunk00000.parquet"
    first = pd.read_parquet(chunk)
    first["text"] = "REUSED " + first["text"]
    first.to_parquet(chunk, index=False)

    other = AutoModelForCausalLM.from_pretrained(same_path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    other.save_pretrained(same_path)  # same path, same config, other weights
    _gen(same_path, bench, out, *args)
    assert not pd.read_parquet(out)["text"].str.startswith("REUSED ").any()


def test_generate_bad_input_fails_before_loading_a_model(toy, tmp_path):
    model, bench = toy
    out = str(tmp_path / "s.parquet")
    with pytest.raises(SystemExit, match="does not exist"):
        _gen(tmp_path / "no_model", bench, out)
    with pytest.raises(SystemExit, match="unknown benchmark 'toy_tset'"):
        _gen(model, "toy_tset", out)
    with pytest.raises(SystemExit, match="--limit 0"):
        _gen(model, bench, out, "--limit", "0")
    with pytest.raises(SystemExit, match=r"top_p=1\.5"):
        _gen(model, bench, out, "--top-p", "1.5")
    with pytest.raises(SystemExit, match="not a PEFT adapter"):
        _gen(model, bench, out, "--lora", str(tmp_path))


def test_grade_bad_input(toy, tmp_path):
    _, bench = toy
    s = tmp_path / "s.parquet"
    base = {"sample_idx": 0, "text": "\\boxed{1}", "num_tokens": 3, "truncated": False}
    pd.DataFrame([{"problem_id": "not-a-problem", **base}]).to_parquet(s)
    with pytest.raises(SystemExit, match="not in benchmark"):
        grade.main(["--samples", str(s), "--benchmark", str(bench), "--out-dir", str(tmp_path)])
    ids = pd.read_parquet(bench)["id"][:2]
    rows = [
        {**base, "problem_id": ids[0]},
        {**base, "problem_id": ids[0], "sample_idx": 1},
        {**base, "problem_id": ids[1]},
    ]
    pd.DataFrame(rows).to_parquet(s)
    with pytest.raises(SystemExit, match="different sample counts"):
        grade.main(["--samples", str(s), "--benchmark", str(bench), "--out-dir", str(tmp_path)])
    pd.DataFrame([{"problem_id": ids[0]}]).to_parquet(s)
    with pytest.raises(SystemExit, match="missing column"):
        grade.main(["--samples", str(s), "--benchmark", str(bench), "--out-dir", str(tmp_path)])
    assert not Path(tmp_path / "summary.json").exists()


def test_lora_adapter_with_the_hf_backend(toy, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from vopd.lora import apply_lora, save_adapter

    model_dir, bench = toy
    peft_model = apply_lora(
        AutoModelForCausalLM.from_pretrained(model_dir),
        r=8,
        alpha=16,
        base_name_or_path=str(model_dir),
    )
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT starts B at 0 (a no-op adapter): make it change the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter = save_adapter(peft_model, tmp_path / "adapter")
    common = ["--n", "1", "--temperature", "0", "--limit", "8"]
    _gen(model_dir, bench, tmp_path / "base.parquet", *common)
    _gen(model_dir, bench, tmp_path / "lora.parquet", *common, "--lora", str(adapter))
    _gen(adapter, bench, tmp_path / "adapter.parquet", *common)  # an adapter dir as --model
    base, lora, unfolded = (
        pd.read_parquet(tmp_path / f"{k}.parquet") for k in ("base", "lora", "adapter")
    )
    pd.testing.assert_frame_equal(lora, unfolded)
    assert (lora["text"] != base["text"]).any()  # the adapter is applied
    meta = json.loads(pq.read_schema(tmp_path / "lora.parquet").metadata[b"vopd"])
    assert meta["lora"] == str(adapter) and meta["base"] == str(model_dir)


def test_grade_refuses_samples_covering_fewer_problems_than_generated(toy, tmp_path):
    """Issue 14: a samples file covering 8 of 16 problems was graded into a summary that looked
    complete; its metadata holds the count that was generated."""
    _, bench = toy
    ids = list(pd.read_parquet(bench)["id"])[:16]
    rows = [
        {"problem_id": pid, "sample_idx": 0, "text": "\\boxed{1}", "num_tokens": 3,
         "truncated": False, "prompt": "p"}
        for pid in ids[:8]
    ]  # fmt: skip
    s = tmp_path / "s.parquet"
    generate.write_samples(rows, s, {"num_problems": 16})
    with pytest.raises(SystemExit, match="cover 8 problems but their metadata says 16"):
        grade.main(["--samples", str(s), "--benchmark", str(bench), "--out-dir", str(tmp_path)])
    assert not (tmp_path / "summary.json").exists()
    generate.write_samples(rows, s, {"num_problems": 8})  # complete: graded
    grade.main(["--samples", str(s), "--benchmark", str(bench), "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())["num_problems"] == 8


def test_an_unwritable_out_fails_before_any_work(toy, tmp_path):
    """A read-only or blocked output directory is a one-line error, not an OSError traceback
    after the sampling or grading."""
    model, bench = toy
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(SystemExit, match=rf"error: cannot write into {blocker / 'eval'}"):
        _gen(model, bench, blocker / "eval" / "samples.parquet")
    s = tmp_path / "s.parquet"
    rows = [{"problem_id": "x", "sample_idx": 0, "text": "", "num_tokens": 0,
             "truncated": False, "prompt": "p"}]  # fmt: skip
    generate.write_samples(rows, s, {})
    with pytest.raises(SystemExit, match=rf"error: cannot write into {blocker}"):
        grade.main(["--samples", str(s), "--benchmark", str(bench), "--out-dir", str(blocker)])
