"""Upstream benchmark formats -> rows of the benchmark schema (see :mod:`vopd.data`).

Fields are found by name, the first present of a candidate list (e.g. ``problem`` or
``question``), unless a field map says where (``{"problem": "Q", "answer": "gold"}``; keys:
problem, answer, solution, id, choices). Golds: MATH-500 takes the last ``\\boxed{}`` of
``solution`` (official); other math benchmarks take ``answer`` and fall back to the last
``\\boxed{}`` of a solution field; numbers are cleaned (``27.0`` -> ``"27"``). MCQ choices come
from a ``choices``/``options`` list or dict (SciKnowEval's ``{"text", "label"}``), columns A-D,
the upstream GPQA layout (``Correct Answer`` + ``Incorrect Answer 1..3``, shuffled with a seed
taken from the question text, so reproducible), or ``A. ...`` lines inside the question
(fingertap/GPQA-Diamond). MCQ golds may be a letter, a 0-based index (official
``answer_index_base = 0``), or the text of the right choice.

Prompts (official holi-lab/vOPD, docs/method.md §2; no chat template): math
``MATH_PROMPT``; MCQ ``"{problem}\\n\\n" + MCQ_INSTRUCTION`` (official
``src/evaluate_mcq.py::build_prompt``), where an MCQ ``problem`` is the question followed by its
lettered choices.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

MATH_PROMPT = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
MCQ_INSTRUCTION = (  # official src/evaluate_mcq.py::build_prompt
    'Return only one JSON object with the key "answer". '
    'The value must be exactly one choice letter, for example: {"answer": "C"}.'
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ---------------------------------------------------------------------------------------------
# Finding fields

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt", "input")
# fmt: off
ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer", "gt", "ground_truth",
               "target", "label")
SOLUTION_KEYS = ("solution", "Solution", "gt_cot", "reasoning")
ID_KEYS = ("id", "unique_id", "idx", "ID", "problem_idx", "question_id", "qid")
MCQ_GOLD_KEYS = ("answerKey", "answer", "Answer", "label", "correct_answer", "gold", "target",
                 "answer_index")
CHOICE_KEYS = ("choices", "options", "Choices", "Options")
FIELD_KEYS = ("problem", "answer", "solution", "id", "choices")
# fmt: on


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN
        return False
    return not (isinstance(value, str) and not value.strip())


def _field(row: dict, key: str, candidates, fields: dict, where: str, required=True):
    """The value of ``fields[key]`` (if mapped) or of the first present candidate column."""
    if key in fields:
        if not _present(row.get(fields[key])):
            raise ValueError(
                f"{where}: mapped field {key}={fields[key]!r} is missing or empty; "
                f"fields present: {sorted(row)}"
            )
        return row[fields[key]]
    for c in candidates:
        value = row.get(c)
        if _present(value) and not isinstance(value, dict):
            if key == "problem" and not isinstance(value, str):
                continue  # e.g. a chat-format `prompt` list: not the problem text
            return value
    if required:
        empty = [c for c in candidates if c in row and not _present(row[c])]
        if empty:
            raise ValueError(
                f"{where}: the {key} field {empty[0]!r} is empty (looked for "
                f"{', '.join(candidates)}); give it a value or pass --field {key}=COLUMN"
            )
        raise ValueError(
            f"{where}: no {key} field (looked for {', '.join(candidates)}); fields "
            f"present: {sorted(row)}; pass --field {key}=COLUMN"
        )
    return None


def _unwrap_rl_layout(row: dict) -> dict:
    """verl/TRL RL parquet rows (``prompt`` = chat messages, ``reward_model.ground_truth``) as
    plain problem/answer fields, unless the row has them already."""
    row = dict(row)
    prompt = row.get("prompt")
    if "problem" not in row and isinstance(prompt, (list, tuple)) and prompt:
        user = [m for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        if user and isinstance(user[-1].get("content"), str):
            row["problem"] = user[-1]["content"]
    reward = row.get("reward_model")
    if "answer" not in row and isinstance(reward, dict) and _present(reward.get("ground_truth")):
        row["answer"] = reward["ground_truth"]
    return row


def answer_string(value) -> str:
    """Gold as a clean string: 27.0 -> "27", ["2"] -> "2", "$5$" -> "5"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_string(v) for v in value)
    s = str(value).strip()
    if len(s) > 2 and s.startswith("$") and s.endswith("$") and s.count("$") == 2:
        s = s[1:-1].strip()
    return s


def _boxed_gold(solution) -> str | None:
    from vopd.boxed import extract_boxed

    return extract_boxed(str(solution)) if _present(solution) else None


# ---------------------------------------------------------------------------------------------
# Math rows


def _math_row(row: dict, spec, fields: dict, where: str) -> dict:
    problem = str(_field(row, "problem", PROBLEM_KEYS, fields, where))
    solution = _field(row, "solution", SOLUTION_KEYS, fields, where, required=False)
    gold = _boxed_gold(solution) if spec.gold_from_solution else None
    if gold is None:
        ans = _field(row, "answer", ANSWER_KEYS, fields, where, required=solution is None)
        gold = answer_string(ans) if ans is not None else _boxed_gold(solution)
    if not gold:
        raise ValueError(f"{where}: no gold answer (empty answer and no \\boxed{{}} in solution)")
    prompt = MATH_PROMPT.format(problem=problem)
    return {"problem": problem, "prompt": prompt, "answer": gold, "choices": None}


# ---------------------------------------------------------------------------------------------
# Multiple-choice rows

_EMBEDDED = re.compile(r"(?m)^[ \t]*\(?([A-Z])[\.\)][ \t]+(.+?)[ \t]*$")
_INLINE = re.compile(r"\(([A-Z])\)\s*(.+?)(?=\s*\([A-Z]\)|\s*$)", re.S)  # "(A) x (B) y"
_LABEL_PREFIX = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+")


def _choices(row: dict, question: str, fields: dict, where: str):
    """(choices, embedded_in_question, gold_letter_or_None)."""
    raw = _field(row, "choices", CHOICE_KEYS, fields, where, required=False)
    if raw is None:
        raw = next((row[k] for k in CHOICE_KEYS if isinstance(row.get(k), dict)), None)
    if isinstance(raw, dict) and "text" in raw:  # SciKnowEval, ARC: {"text": [..], "label": [..]}
        labels = list(raw.get("label") or LETTERS[: len(raw["text"])])
        order = sorted(range(len(labels)), key=lambda i: str(labels[i]))
        return [str(raw["text"][i]) for i in order], False, None
    if isinstance(raw, dict):  # {"A": "...", "B": "..."}
        return [str(raw[k]) for k in sorted(raw)], False, None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if isinstance(raw, (list, tuple)) and raw:
        texts = [str(c) for c in raw]
        if all(
            _LABEL_PREFIX.match(t) and _LABEL_PREFIX.match(t).group(1) == LETTERS[i]
            for i, t in enumerate(texts)
        ):
            texts = [_LABEL_PREFIX.sub("", t, count=1) for t in texts]
        return texts, False, None
    if "Correct Answer" in row and "Incorrect Answer 1" in row:  # upstream GPQA layout
        options = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        options = [str(o).strip() for o in options]
        seed = int(hashlib.sha256(question.encode()).hexdigest()[:16], 16)
        perm = list(range(4))
        random.Random(seed).shuffle(perm)
        return [options[i] for i in perm], False, LETTERS[perm.index(0)]
    letters_cols = [k for k in LETTERS if _present(row.get(k))]
    if len(letters_cols) >= 2 and letters_cols == list(LETTERS[: len(letters_cols)]):
        return [str(row[k]) for k in letters_cols], False, None
    for found in (_EMBEDDED.findall(question), _INLINE.findall(question)):
        texts = []
        for letter, text in found:  # keep the run A, B, C, ... (the choices block)
            if letter == LETTERS[len(texts)]:
                texts.append(text.strip())
            elif letter == "A":
                texts = [text.strip()]
        if len(texts) >= 2:
            return texts, True, None
    # none found: the question must carry its options in some other layout; a letter gold
    # still grades (choices unknown: letters A-D, or up to the gold's letter)
    return None, True, None


def _gold_letter(value, choices: list[str] | None, where: str) -> str:
    if choices is None:  # options not found: only a letter gold can be read
        m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]\.]?", str(value).strip())
        if not m:
            raise ValueError(
                f"{where}: no choices found (looked for {', '.join(CHOICE_KEYS)}, columns A-D, "
                f"GPQA columns, 'A. ...' lines or '(A) ...' in the question) and the gold "
                f"{value!r} is not a letter; pass --field choices=COLUMN"
            )
        return m.group(1).upper()
    n = len(choices)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value).is_integer()
    ):
        idx = int(value)  # official answer_index_base = 0
    else:
        s = str(value).strip()
        m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]\.]?", s)
        if m and m.group(1).upper() in LETTERS[:n]:
            return m.group(1).upper()
        if s.isdigit():
            idx = int(s)
        elif s in choices:
            return LETTERS[choices.index(s)]
        else:
            raise ValueError(
                f"{where}: gold {value!r} is not a letter in A-{LETTERS[n - 1]}, a "
                f"0-based index, or the text of a choice"
            )
    if not 0 <= idx < n:
        raise ValueError(f"{where}: gold index {idx} is out of range for {n} choices")
    return LETTERS[idx]


def _mcq_row(row: dict, spec, fields: dict, where: str) -> dict:
    question = str(_field(row, "problem", PROBLEM_KEYS, fields, where)).strip()
    choices, embedded, gold = _choices(row, question, fields, where)
    if gold is None:
        value = _field(row, "answer", MCQ_GOLD_KEYS, fields, where)
        gold = _gold_letter(value, choices, where)
    problem = (
        question
        if embedded
        else question + "\n\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    )  # an embedded block (or options in an unknown layout) stays as written
    prompt = f"{problem}\n\n{MCQ_INSTRUCTION}"
    return {"problem": problem, "prompt": prompt, "answer": gold, "choices": choices}


# ---------------------------------------------------------------------------------------------
# Layouts that identify their benchmark: a file in one of them is that benchmark's only


def _sciknoweval(row: dict) -> bool:
    choices = row.get("choices")
    return isinstance(choices, dict) and "text" in choices and "answerKey" in row


def _gpqa_upstream(row: dict) -> bool:
    return "Correct Answer" in row and "Incorrect Answer 1" in row


# layout -> (test, description, the benchmark whose layout it is)
LAYOUTS = {
    "sciknoweval": (
        _sciknoweval,
        "SciKnowEval layout (choices {text, label} + answerKey)",
        "chemistry",
    ),
    "gpqa_upstream": (
        _gpqa_upstream,
        "upstream GPQA layout (Correct Answer + Incorrect Answer 1..3)",
        "gpqa_diamond",
    ),
}


def check_layout(rows: list[dict], spec, source: str = "", *, required: bool = True) -> None:
    """Refuse rows whose layout belongs to another benchmark (a SciKnowEval file given as
    ``--benchmark gpqa_diamond``), or (``required``) that lack the layout ``spec.layout``
    requires."""
    where = f" from {source}" if source else ""
    for i, row in enumerate(rows):
        for test, desc, owner in LAYOUTS.values():
            if owner != spec.name and test(row):
                raise ValueError(
                    f"{spec.name} row {i}{where} has the {desc} of benchmark {owner!r}, not "
                    f"{spec.name!r}: check --benchmark and --path"
                )
        layout = getattr(spec, "layout", None)
        if required and layout and not LAYOUTS[layout][0](row):
            raise ValueError(
                f"{spec.name} row {i}{where} does not have the {LAYOUTS[layout][1]} of "
                f"{spec.name!r}; fields present: {sorted(row)}: check --benchmark and --path"
            )


# ---------------------------------------------------------------------------------------------
# Whole benchmarks


def normalize(
    rows: list[dict],
    spec,
    *,
    fields: dict | None = None,
    source: str = "",
    limit: int | None = None,
) -> list[dict]:
    """Benchmark-schema rows from raw rows (see the module docstring)."""
    fields = dict(fields or {})
    unknown = set(fields) - set(FIELD_KEYS)
    if unknown:
        raise ValueError(
            f"unknown --field key(s) {sorted(unknown)}: expected {', '.join(FIELD_KEYS)}"
        )
    if spec.keep is not None:
        rows = [r for r in rows if spec.keep(r)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"benchmark {spec.name!r} from {source or 'its source'} has no rows")
    check_layout(rows, spec, source, required=not fields)  # a field map: the user's layout
    out, seen = [], set()
    for i, row in enumerate(rows):
        row = _unwrap_rl_layout(row)
        where = f"{spec.name} row {i}"
        rid = _field(row, "id", ID_KEYS, fields, where, required=False)
        rid = answer_string(rid) if rid is not None else str(i)
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        body = (_math_row if spec.kind == "math" else _mcq_row)(row, spec, fields, where)
        out.append({"id": rid, **body, "kind": spec.kind, "source": source})
    return out
