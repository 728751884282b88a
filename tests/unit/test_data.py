"""Benchmark registry: every fixture (upstream formats) normalises, grades gold-vs-gold, and bad
input fails with a clear error."""

import json
from pathlib import Path

import pandas as pd
import pytest

from vopd import data
from vopd.data import __main__ as data_cli
from vopd.eval import grade as grade_cli
from vopd.eval.grade import gold_samples, grade, math_verify_self_check

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"

# (registry name, fixture file, expected number of rows, expected gold answers)
CASES = [
    (
        "math500",
        "math500.jsonl",
        7,
        [
            r"\left( 3, \frac{\pi}{2} \right)",
            "p - q",
            r"\frac{14}{3}",
            r"\text{Evelyn}",
            r"\frac{11}{2}",
            "2,3",
            r"\$32,\!356.44",
        ],
    ),
    ("minerva", "minerva.jsonl", 5, ["1.6", "4.5e33", "np.arcsin(10/13)", "0.022", "4"]),
    ("minerva", "minerva_solution_only.jsonl", 2, ["0.49", "1"]),
    ("amc23", "amc23.jsonl", 3, ["27", "36", "45"]),  # floats 27.0 -> "27"
    ("aime24", "aime24.parquet", 2, ["204", "321"]),
    ("aime25", "aime25.parquet", 2, ["70", "588"]),  # int answers
    ("gpqa_diamond", "gpqa_diamond.jsonl", 3, ["C", "D", "D"]),
    ("gpqa_diamond", "gpqa_diamond_upstream.csv", 2, None),  # shuffled: checked below
    ("chemistry", "chemistry.jsonl", 4, ["A", "B", "A", "B"]),  # the "filling" row is dropped
    ("dapo14k", "dapo14k.parquet", 3, ["34", "36", "30"]),
]


def _prepare(name, fixture, **kw):
    return pd.DataFrame(data.prepare(name, path=str(FIXTURES / fixture), **kw))


# ---------------------------------------------------------------------------------------------
# Normalisation of the upstream formats


@pytest.mark.parametrize(("name", "fixture", "rows", "golds"), CASES)
def test_fixture_normalises_to_the_schema(name, fixture, rows, golds, tmp_path):
    df = _prepare(name, fixture)
    assert list(df.columns) == list(data.COLUMNS)
    assert len(df) == rows
    if golds is not None:
        assert list(df["answer"]) == golds
    kind = data.REGISTRY[name].kind
    assert set(df["kind"]) == {kind}
    for problem, prompt in zip(df["problem"], df["prompt"], strict=True):
        if kind == "math":  # the official prompt, no chat template
            assert prompt == (
                problem + "\n\nPlease reason step by step, and put your final answer within "
                "\\boxed{}."
            )
        else:
            assert prompt.startswith(problem) and prompt.endswith('for example: {"answer": "C"}.')
            assert "\nA. " in problem or "\nA) " in problem
    # round trip through Parquet keeps everything, including the choices lists
    out = tmp_path / "b.parquet"
    data.write_benchmark(df.to_dict(orient="records"), out)
    back = data.load_benchmark(str(out))
    assert list(back["id"]) == list(df["id"]) and list(back["answer"]) == list(df["answer"])


def test_math500_gold_is_the_last_boxed_of_the_solution():
    rows = [{"problem": "p", "solution": r"$\boxed{1}$ no, $\boxed{\frac{1}{2}}$", "answer": "x"}]
    (row,) = data.normalize(rows, data.REGISTRY["math500"])
    assert row["answer"] == r"\frac{1}{2}"
    # other math benchmarks prefer the answer field
    (row,) = data.normalize(rows, data.REGISTRY["minerva"])
    assert row["answer"] == "x"


def test_mcq_choices_and_ids():
    df = _prepare("chemistry", "chemistry.jsonl")
    assert df["choices"][0][0] == "O=Cc1ccccc1[N+](=O)[O-]"
    assert len(df["choices"][2]) == 2  # the two-choice row
    assert df["problem"][0].endswith("D. O=C=Nc1ccccc1[N+](=O)[O-]")
    df = _prepare("gpqa_diamond", "gpqa_diamond.jsonl")
    assert df["choices"][0] == ["10^-9 eV", "10^-8 eV", "10^-4 eV", "10^-11 eV"]
    assert df["choices"][2][0] == "-1.4"  # "A) ..." lines
    assert list(df["id"]) == ["0", "1", "2"]  # no id field: the row number


def test_gpqa_upstream_layout_is_shuffled_reproducibly():
    a = _prepare("gpqa_diamond", "gpqa_diamond_upstream.csv")
    b = _prepare("gpqa_diamond", "gpqa_diamond_upstream.csv")
    assert a.equals(b)
    correct = ["10^-4 eV", "1"]  # the "Correct Answer" column
    for choices, gold, text in zip(a["choices"], a["answer"], correct, strict=True):
        assert choices["ABCD".index(gold)] == text


@pytest.mark.parametrize(
    ("value", "expected"), [("B", "B"), ("(c)", "C"), (2, "C"), ("0", "A"), ("water", "B")]
)
def test_mcq_gold_forms(value, expected):
    rows = [{"question": "q?", "choices": ["salt", "water", "gold"], "answer": value}]
    (row,) = data.normalize(rows, data.REGISTRY["gpqa_diamond"])
    assert row["answer"] == expected


def test_field_mapping(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"Q": "1+1=?", "gold": 2, "uid": "a1"}) + "\n")
    rows = data.prepare(
        "amc23", path=str(path), fields={"problem": "Q", "answer": "gold", "id": "uid"}
    )
    assert rows[0]["id"] == "a1" and rows[0]["answer"] == "2" and rows[0]["problem"] == "1+1=?"


# ---------------------------------------------------------------------------------------------
# Gold against gold: every gold answer verifies against itself


def test_gold_against_gold_on_every_fixture():
    frames = []
    for name, fixture, _, _ in CASES:
        df = _prepare(name, fixture)
        df["id"] = fixture + ":" + df["id"]
        frames.append(df)
    bench = pd.concat(frames, ignore_index=True)
    grades = grade(gold_samples(bench), bench, timeout_s=5.0)
    assert grades["correct"].all(), grades[~grades["correct"]]
    assert grades["format_ok"].all() and not grades["timed_out"].any()


def test_math_verify_alone_on_the_fixture_golds():
    # a diagnostic: which golds need the string match (math-verify cannot parse them)
    frames = [_prepare(n, f) for n, f, _, _ in CASES if data.REGISTRY[n].kind == "math"]
    bench = pd.concat(frames, ignore_index=True)
    bench["id"] = [str(i) for i in range(len(bench))]
    report = math_verify_self_check(bench, timeout_s=5.0, workers=2)
    failed = set(bench.set_index("id").loc[report["string_match_only"], "answer"])
    assert failed == {"np.arcsin(10/13)"}
    assert report["verified"] == report["math_golds"] - 1


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_benchmark_name():
    with pytest.raises(ValueError, match=r"unknown benchmark 'math5000'.*math500"):
        data.prepare("math5000", path=str(FIXTURES / "math500.jsonl"))
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        data.load_benchmark("nope")


def test_missing_field_names_it(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "solution_text": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: no answer field .*--field answer=COLUMN"):
        data.prepare("amc23", path=str(path))
    with pytest.raises(ValueError, match=r"mapped field answer='gold' is missing"):
        data.prepare("amc23", path=str(path), fields={"answer": "gold"})
    with pytest.raises(ValueError, match="unknown --field key"):
        data.prepare("amc23", path=str(path), fields={"gold": "x"})


def test_empty_benchmark(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"'aime24' from .* has no rows"):
        data.prepare("aime24", path=str(path))
    # a chemistry file without MCQ rows is empty after the subset filter
    path.write_text(json.dumps({"question": "q", "answer": "x", "type": "filling"}) + "\n")
    with pytest.raises(ValueError, match=r"'chemistry' .* has no rows"):
        data.prepare("chemistry", path=str(path))
    with pytest.raises(ValueError, match="is empty"):
        data.validate(pd.DataFrame(columns=list(data.COLUMNS)), "x")


def test_bad_mcq_gold_and_missing_choices():
    spec = data.REGISTRY["gpqa_diamond"]
    with pytest.raises(ValueError, match="gold index 7 is out of range for 3 choices"):
        data.normalize([{"question": "q", "choices": ["a", "b", "c"], "answer": 7}], spec)
    with pytest.raises(ValueError, match=r"no choices found .* is not a letter"):
        data.normalize([{"question": "q without options", "answer": 0}], spec)


def test_mcq_choice_layouts_inside_the_question():
    spec = data.REGISTRY["gpqa_diamond"]
    rows = [
        {"question": "Which? (A) 1 eV (B) 2 eV (C) 3 eV (D) 4 eV", "answer": "B"},
        {"question": "Options are in a figure.", "answer": "E"},
    ]
    inline, unknown = data.normalize(rows, spec)
    assert inline["choices"] == ["1 eV", "2 eV", "3 eV", "4 eV"] and inline["answer"] == "B"
    assert inline["problem"] == rows[0]["question"]  # kept as written
    # options in an unknown layout: the letter gold still grades, with letters up to E
    assert unknown["choices"] is None and unknown["answer"] == "E"
    bench = pd.DataFrame([{**unknown, "id": "u"}])
    samples = pd.DataFrame(
        [
            {"problem_id": "u", "sample_idx": i, "text": t, "num_tokens": 1, "truncated": False}
            for i, t in enumerate(['{"answer": "E"}', "F"])
        ]
    )
    assert list(grade(samples, bench)["correct"]) == [True, False]


def test_duplicate_ids_and_missing_files(tmp_path):
    rows = [{"problem": "a", "answer": "1", "id": 3}, {"problem": "b", "answer": "2", "id": 3}]
    with pytest.raises(ValueError, match="duplicate id '3'"):
        data.normalize(rows, data.REGISTRY["aime24"])
    with pytest.raises(ValueError, match="does not exist"):
        data.read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"does not exist; create it with: python -m vopd\.data"):
        data.load_benchmark("aime25", root=tmp_path)
    with pytest.raises(ValueError, match=r"python -m vopd\.toy world"):
        data.load_benchmark("toy_test", root=tmp_path)


def test_gated_benchmark_without_token_fails_before_any_download(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached login either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"gated .* No Hugging Face token is set"):
        data.prepare("gpqa_diamond")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_prepare_and_errors(tmp_path, capsys):
    out = tmp_path / "amc23.parquet"
    data_cli.main(
        [
            "prepare",
            "--benchmark",
            "amc23",
            "--path",
            str(FIXTURES / "amc23.jsonl"),
            "--out",
            str(out),
        ]
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["rows"] == 3 and line["benchmark"] == "amc23"
    assert len(data.load_benchmark(str(out))) == 3
    # an already-normalised Parquet passes through unchanged
    again = tmp_path / "again.parquet"
    data_cli.main(["prepare", "--benchmark", "amc23", "--path", str(out), "--out", str(again)])
    assert data.load_benchmark(str(again)).equals(data.load_benchmark(str(out)))
    with pytest.raises(SystemExit, match="unknown benchmark"):
        data_cli.main(["prepare", "--benchmark", "mmlu", "--path", str(out), "--out", str(again)])
    with pytest.raises(SystemExit, match="KEY=COLUMN"):
        data_cli.main(["prepare", "--benchmark", "amc23", "--field", "oops", "--out", str(again)])


def test_gold_check_cli(tmp_path, capsys):
    bench = tmp_path / "minerva.parquet"
    data_cli.main(
        [
            "prepare",
            "--benchmark",
            "minerva",
            "--path",
            str(FIXTURES / "minerva.jsonl"),
            "--out",
            str(bench),
        ]
    )
    grade_cli.main(["--gold-check", "--benchmark", str(bench), "--out-dir", str(tmp_path / "ok")])
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["avg@1"] == 1.0 and summary["n"] == 1 and summary["num_problems"] == 5
    assert summary["gold_check"]["string_match_only"] == ["2"]  # np.arcsin(10/13)
    # a gold the grader cannot read back (an unbalanced brace) fails the check
    rows = data.load_benchmark(str(bench)).to_dict(orient="records")
    rows[0]["answer"] = "\\frac{1}{2"
    data.write_benchmark(rows, bench)
    with pytest.raises(SystemExit) as exc:
        grade_cli.main(["--gold-check", "--benchmark", str(bench), "--out-dir", str(tmp_path)])
    assert exc.value.code == 1
    assert "gold-check FAILED: 0" in capsys.readouterr().err


def test_rl_parquet_layout_unwraps():
    # verl-style rows: chat-format prompt, reward_model.ground_truth
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": "1+1?"}],
            "reward_model": {"style": "rule", "ground_truth": "2"},
        }
    ]
    (row,) = data.normalize(rows, data.REGISTRY["dapo14k"])
    assert row["problem"] == "1+1?" and row["answer"] == "2"


# ---------------------------------------------------------------------------------------------
# Files of another benchmark, several files, malformed files (regressions)


@pytest.mark.parametrize(
    ("name", "fixture", "message"),
    [
        ("gpqa_diamond", "chemistry.jsonl", "SciKnowEval layout .* of benchmark 'chemistry'"),
        ("gpqa", "chemistry.jsonl", "SciKnowEval layout .* of benchmark 'chemistry'"),
        ("math500", "chemistry.jsonl", "not 'math500'"),
        ("chemistry", "gpqa_diamond_upstream.csv", "upstream GPQA layout .* 'gpqa_diamond'"),
        ("chemistry", "gpqa_diamond.jsonl", "does not have the SciKnowEval layout"),
    ],
)
def test_a_file_of_another_benchmark_is_refused(name, fixture, message):
    with pytest.raises(ValueError, match=message):
        _prepare(name, fixture)


def test_a_normalised_file_of_another_benchmark_is_refused(tmp_path):
    chem = tmp_path / "chemistry.parquet"
    data.write_benchmark(data.prepare("chemistry", path=str(FIXTURES / "chemistry.jsonl")), chem)
    with pytest.raises(ValueError, match=r"normalised benchmark of \['chemistry'\]"):
        data.prepare("gpqa_diamond", path=str(chem))
    with pytest.raises(ValueError, match=r"of kind \['mcq'\], but 'amc23' is math"):
        data.prepare("amc23", path=str(chem))
    with pytest.raises(SystemExit, match="SciKnowEval layout"):
        chem = str(FIXTURES / "chemistry.jsonl")
        data_cli.main(["prepare", "--benchmark", "gpqa", "--path", chem,
                       "--out", str(tmp_path / "g.parquet")])  # fmt: skip
    assert not (tmp_path / "g.parquet").exists()


def test_path_takes_several_files_or_a_directory(tmp_path, capsys):
    """SciKnowEval chemistry L3 ships as several files: --path takes them all, or their folder."""
    lines = (FIXTURES / "chemistry.jsonl").read_text().splitlines(keepends=True)
    folder = tmp_path / "SciKnowEval" / "Chemistry" / "L3"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(lines[:2]))
    (folder / "sub" / "b.jsonl").write_text("".join(lines[2:]))
    (folder / "README.md").write_text("not a benchmark file")
    whole = data.prepare("chemistry", path=str(FIXTURES / "chemistry.jsonl"))
    strip = [{k: v for k, v in r.items() if k != "source"} for r in whole]
    for path in (str(folder), [str(folder / "a.jsonl"), str(folder / "sub" / "b.jsonl")]):
        rows = data.prepare("chemistry", path=path)
        assert [{k: v for k, v in r.items() if k != "source"} for r in rows] == strip
    out = tmp_path / "chem.parquet"
    files = [str(folder / "a.jsonl"), str(folder / "sub" / "b.jsonl")]
    data_cli.main(["prepare", "--benchmark", "chemistry", "--path", *files, "--out", str(out)])
    assert len(data.load_benchmark(str(out))) == len(whole)
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no benchmark file"):
        data.prepare("chemistry", path=str(folder / "empty"))


def test_json_errors_name_the_file_and_the_line(tmp_path):
    jsonl = tmp_path / "b.jsonl"
    good = json.dumps({"problem": "1+1", "answer": "2"})
    jsonl.write_text(f"{good}\n{good}\n{{bad json\n{good}\n")
    with pytest.raises(ValueError, match=rf"{jsonl}: line 3: invalid JSON"):
        data.read_rows(jsonl)
    doc = tmp_path / "b.json"
    doc.write_text('[\n  {"problem": "1+1",\n   "answer": "2"},\n  {"problem": oops}\n]\n')
    with pytest.raises(ValueError, match=rf"{doc}: invalid JSON at line 4, column 15"):
        data.read_rows(doc)


def test_an_empty_answer_field_is_named_as_empty(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"problem": "2+2?", "answer": " "}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: the answer field 'answer' is empty"):
        data.prepare("amc23", path=str(path))


def test_an_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "amc23.parquet"
    with pytest.raises(SystemExit, match=rf"error: cannot write {out}"):
        data_cli.main(["prepare", "--benchmark", "amc23", "--path", str(FIXTURES / "amc23.jsonl"),
                   "--out", str(out)])  # fmt: skip
