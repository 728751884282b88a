"""Answer extraction and checking: last ``\\boxed{}`` + math-verify for math, JSON/letter for MCQ.

Pure functions, plus :func:`grade_math`, which runs :func:`math_equal` for many pairs in worker
processes under a hard per-sample timeout (:mod:`vopd.eval.timeout_pool`), so a pathological
answer can never hang grading: it counts as wrong and is flagged ``timed_out``.

Mirrors holi-lab/vOPD ``src/evaluate_math.py`` / ``src/evaluate_mcq.py`` (reference-semantics §3
"Grading"), with these deliberate differences (all documented in docs/evaluation.md):

- math: gold and prediction that are equal as strings up to LaTeX spacing (``\\left``, ``\\,``,
  ``\\dfrac``...) count as equal before math-verify runs. The official code returns False when
  math-verify parses nothing (e.g. Minerva's gold ``np.arcsin(10/13)`` against itself).
- math: a plain scientific-notation number ``4.5e33`` is read as ``4.5\\times 10^{33}`` on both
  sides (math-verify reads ``e`` as Euler's number; Minerva golds use this notation).
- math: an escaped ``\\$`` is not a math delimiter (``\\$32,\\!348`` is still wrapped in ``$..$``).
- math: ``\\boxed 5`` (no braces) and ``\\fbox{}`` are accepted; escaped braces ``\\{ \\}`` do not
  count when matching braces; an empty ``\\boxed{}`` is no answer.
- MCQ: the cascade is JSON object -> JSON-like ``"answer": X`` -> explicit letter phrasings ->
  the text of exactly one option; the official GPQA lower-case alias remapping is not copied.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence

# ---------------------------------------------------------------------------------------------
# \boxed{} extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escaped ``\\{``/``\\}`` skipped)."""
    depth = 0
    i = open_idx
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (``\{``, ``\}``, ``\\``)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (brace-matched) in ``text``; None if there is none,
    if the last one is unclosed (a truncated answer), or if it is empty."""
    matches = list(_BOXED.finditer(text or ""))
    if not matches:
        return None
    end = matches[-1].end()
    rest = text[end:]
    stripped = rest.lstrip(" ")
    if stripped.startswith("{"):
        start = end + (len(rest) - len(stripped))
        close = _match_braces(text, start)
        if close is None:
            return None
        content = text[start + 1 : close].strip()
    else:  # ``\boxed 5``: the next token, up to whitespace or ``$``
        m = re.match(r"\s+([^\s$]+)", rest)
        content = m.group(1).strip() if m else ""
    return content or None


# ---------------------------------------------------------------------------------------------
# Math equivalence (runs inside the worker processes of grade_math)

_SPACING = re.compile(r"\\left\b|\\right\b|\\[!,;: ]|\\displaystyle\b|\s+|\$")
_INT = re.compile(r"^\s*[-+]?\d+\s*$")
_SCI = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*[eE]\s*([-+]?\d+)\s*$")


def normalize_string(answer: str) -> str:
    """Whitespace- and spacing-command-free form, for the cheap string-equality check."""
    s = _SPACING.sub("", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


def _latex(answer: str) -> str:
    m = _SCI.match(answer)
    if m:
        answer = f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}"
    # official: wrap in $...$ so math-verify's LaTeX extractor picks it up (an escaped ``\$``
    # is a dollar sign, not a delimiter; the official check wraps only when no ``$`` at all)
    return answer if re.search(r"(?<!\\)\$", answer) else f"${answer}$"


def quick_equal(gold: str, pred: str) -> bool | None:
    """The verdict when it needs no parser: equal strings up to LaTeX spacing, or two plain
    integers (compared as integers, as math-verify would); None otherwise."""
    if normalize_string(gold) == normalize_string(pred):
        return True
    if _INT.match(gold) and _INT.match(pred):
        return int(gold) == int(pred)
    return None


def math_equal(gold: str, pred: str, string_match: bool = True) -> bool:
    """True if ``pred`` equals ``gold`` as a string up to LaTeX spacing (unless
    ``string_match=False``), or math-verify says so.

    math-verify is called with its own (signal-based) timeouts OFF: the caller bounds the time
    (``grade_math`` runs this in a :class:`~vopd.eval.timeout_pool.TimeoutPool`).
    """
    if not gold or not pred:
        return False
    if string_match and quick_equal(gold, pred) is not None:
        return quick_equal(gold, pred)
    from math_verify import parse, verify

    g = parse(_latex(gold), fallback_mode="no_fallback", parsing_timeout=None)
    p = parse(_latex(pred), fallback_mode="no_fallback", parsing_timeout=None)
    if not g or not p:
        return False
    # argument order matters: math-verify's verify is not symmetric (gold first)
    return bool(verify(g, p, timeout_seconds=None))


def _quiet_math_verify() -> None:
    # "Timeout is disabled" warnings are expected: the pool enforces the timeout
    logging.getLogger("math_verify").setLevel(logging.ERROR)


_quiet_math_verify()


# ---------------------------------------------------------------------------------------------
# Batched, time-bounded math grading


def grade_math(
    pairs: Sequence[tuple[str, str | None]],
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    string_match: bool = True,
) -> list[tuple[bool, bool]]:
    """``(correct, timed_out)`` for each ``(gold, pred)``; ``pred=None`` (no answer) is wrong.

    Identical pairs are checked once. ``timeout_s`` bounds one check (official: 5 s); a check
    that exceeds it is wrong and flagged. Workers default to min(4, CPU count).
    ``string_match=False`` asks math-verify alone (a diagnostic used by the gold check).
    """
    from vopd.eval.timeout_pool import TimeoutPool

    unique = sorted({(g, p) for g, p in pairs if p is not None})
    verdict: dict[tuple[str, str], tuple[bool, bool]] = {}
    # equal strings and plain integers need no worker
    todo = []
    for g, p in unique:
        quick = quick_equal(g, p) if string_match else None
        if quick is not None:
            verdict[(g, p)] = (quick, False)
        else:
            todo.append((g, p))
    if progress:
        progress(len(unique) - len(todo))
    if todo:
        n_workers = workers or min(4, os.cpu_count() or 1)
        n_workers = max(1, min(n_workers, len(todo)))
        # warm-up: math-verify's first call imports sympy and builds its LaTeX parser (~1 s)
        warmup = ("\\frac{1}{2}", "0.5")
        with TimeoutPool(
            math_equal, workers=n_workers, soft_timeout_s=timeout_s, warmup=warmup
        ) as pool:
            outcomes = pool.map([(g, p, string_match) for g, p in todo], progress=progress)
        for pair, out in zip(todo, outcomes, strict=True):
            verdict[pair] = (bool(out.value) if not out.timed_out else False, out.timed_out)
    return [verdict[(g, p)] if p is not None else (False, False) for g, p in pairs]


# ---------------------------------------------------------------------------------------------
# Multiple choice

ANSWER_KEYS = ("answer", "choice")
_JSON_OBJECT = re.compile(r"\{[^{}]{0,2000}\}", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LETTER_VALUE = re.compile(r"[\(\[\{]?\s*([A-Za-z])\s*[\)\]\}\.]?")
_JSONISH = (
    re.compile(  # a quoted key with an unquoted or quoted letter: {"answer": B}, 'answer': 'b'
        r"""["'](?:answer|choice)["']\s*[:=]\s*(?:["']\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*["']"""
        r"""|[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=\s*[,}\n]))""",
        re.I,
    )
)
# explicit phrasings, in priority order; the last match of the first pattern that matches wins
_LETTER_PATTERNS = [
    re.compile(r"<answer>\s*[\(\[]?\s*([A-Z])\s*[\)\]]?\s*</answer>"),
    re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?([A-Z])\)?\s*\}?\s*\}"),
    re.compile(
        r"(?i:\b(?:final\s+answer|correct\s+answer|correct\s+option|answer)\b)"
        r"(?i:\s*(?:is|was)?\s*[:=]?\s*(?:option\s*)?)[\*\s]*[\(\[]?\s*([A-Z])\b(?![\-'])"
    ),
    re.compile(r"(?i:\b(?:option|choice))\s+\(?([A-Z])\b"),
    re.compile(r"(?m)^\s*[\*]*[\(\[]?\s*([A-Z])\s*[\)\]\.:]?[\*]*\s*$"),
    re.compile(r"[\(\[]\s*([A-Z])\s*[\)\]]\s*\.?\s*$"),
]


def letters(num_choices: int) -> str:
    if not 2 <= num_choices <= 26:
        raise ValueError(f"num_choices={num_choices}: expected 2..26")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_choices]


def _letter(value, valid: str) -> str | None:
    m = _LETTER_VALUE.fullmatch(str(value).strip())
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    return None


def _window(text: str, edge: int = 4096) -> str:
    # official answer_window: the first and last 4096 characters of a long completion
    return text if len(text) <= 2 * edge else text[:edge] + "\n...\n" + text[-edge:]


def _option_key(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9.+\-/%^]+", " ", text.lower())).strip()


def extract_choice(
    text: str, num_choices: int = 4, choices: Sequence[str] | None = None
) -> str | None:
    """The chosen letter (``"A"``...), or None. Cascade: JSON object with key answer/choice (last
    one wins) -> JSON-like ``answer: X`` -> explicit phrasings (``<answer>X</answer>``,
    ``\\boxed{X}``, ``the answer is (X)``, ``option X``, a line that is just ``X``) -> the text of
    exactly one option appearing in the completion's tail."""
    if choices is not None:
        num_choices = len(choices)
    valid = letters(num_choices)
    body = _window(_THINK.sub("", text or "").strip())

    found = None
    for m in _JSON_OBJECT.finditer(body):
        try:
            obj = json.loads(m.group(0))
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if str(key).lower() in ANSWER_KEYS and _letter(value, valid):
                    found = _letter(value, valid)
    if found:
        return found

    for pattern in [_JSONISH, *_LETTER_PATTERNS]:
        for m in reversed(list(pattern.finditer(body))):
            letter = (m.group(1) or m.group(2)) if pattern is _JSONISH else m.group(1)
            if letter.upper() in valid and (pattern is _JSONISH or letter.isupper()):
                return letter.upper()

    if choices:
        tail = _option_key(body[-2000:])
        hits = [
            valid[i]
            for i, c in enumerate(choices)
            if len(_option_key(str(c))) >= 4 and _option_key(str(c)) in tail
        ]
        if len(hits) == 1:
            return hits[0]
    return None


# ---------------------------------------------------------------------------------------------
# The ideal completion for a gold answer (the gold-against-gold check)


def gold_completion(kind: str, answer: str) -> str:
    """A completion that states ``answer`` in the format the grader expects."""
    if kind == "math":
        return f"The final answer is $\\boxed{{{answer}}}$."
    if kind == "mcq":
        return json.dumps({"answer": answer})
    raise ValueError(f"kind={kind!r}: expected 'math' or 'mcq'")
