"""Answer extraction and checking: last ``\\boxed{}`` + math-verify for math, JSON/letter for MCQ.

Pure functions, plus :func:`grade_math` and :func:`grade_mcq`, which run :func:`math_equal` /
:func:`extract_choice` for many samples in worker processes under a hard per-sample timeout
(:mod:`vopd.eval.timeout_pool`), so a pathological answer can never hang or crash grading: it
counts as wrong and is flagged (``timed_out``, or the ``error`` it raised).

Mirrors holi-lab/vOPD ``src/evaluate_math.py`` / ``src/evaluate_mcq.py`` (docs/method.md §2
"Grading"), with these deliberate differences (all documented in docs/evaluation.md):

- math: gold and prediction that are equal as strings up to LaTeX spacing (``\\left``, ``\\,``,
  ``\\dfrac``...) count as equal before math-verify runs. The official code returns False when
  math-verify parses nothing (e.g. Minerva's gold ``np.arcsin(10/13)`` against itself).
- math: a plain scientific-notation number ``4.5e33`` is read as ``4.5\\times 10^{33}`` on both
  sides (math-verify reads ``e`` as Euler's number; Minerva golds use this notation).
- math: an escaped ``\\$`` is not a math delimiter (``\\$32,\\!348`` is still wrapped in ``$..$``).
- math: ``\\boxed 5`` (no braces) and ``\\fbox{}`` are accepted; escaped braces ``\\{ \\}`` do not
  count when matching braces; an empty ``\\boxed{}`` is no answer.
- MCQ: the cascade is JSON object -> JSON-like ``"answer": X`` -> explicit letter phrasings
  (wider than the official ones: ``the correct answer is therefore B``, ``B is the correct
  answer``, ``I would choose B``, ``$\\text{B}$``) -> the text of exactly one option stated as the
  answer (``C. 2.8``, a last line ``2.8``; short numeric options included) or, 4+ characters,
  in the tail. Two letters asserted together (``B or C``) are no answer. The official GPQA
  lower-case alias remapping is not copied.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from vopd.boxed import extract_boxed

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
        try:
            return int(gold) == int(pred)
        except ValueError:  # Python's int-string limit (sys.get_int_max_str_digits, 4300)
            digits = max(len(gold.strip()), len(pred.strip()))
            raise ValueError(
                f"an integer of {digits} digits is beyond Python's int-string limit "
                f"({sys.get_int_max_str_digits()} digits)"
            ) from None
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


class Verdict(NamedTuple):
    """One sample's grade: ``timed_out`` (the check ran over its time) and ``error`` (the check
    raised, e.g. an integer beyond Python's 4300-digit string limit) both mean wrong and
    flagged; neither ever stops the grading of the other samples."""

    correct: bool
    timed_out: bool = False
    error: str | None = None

    @property
    def flagged(self) -> bool:
        return self.timed_out or self.error is not None


def _needs_parser(gold: str, pred: str) -> bool:
    """Whether checking (gold, pred) may call math-verify (then the workers warm it up first).
    Only decides the warm-up; the verdict itself is always computed in a worker."""
    try:
        return not (
            normalize_string(gold) == normalize_string(pred)
            or (_INT.match(gold) and _INT.match(pred))
        )
    except Exception:
        return True


def _pool_workers(workers: int | None, tasks: int) -> int:
    return max(1, min(workers or min(4, os.cpu_count() or 1), tasks))


def grade_math(
    pairs: Sequence[tuple[str, str | None]],
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    string_match: bool = True,
) -> list[Verdict]:
    """A :class:`Verdict` for each ``(gold, pred)``; ``pred=None`` (no answer) is wrong.

    Every comparison, the cheap string and integer ones included, runs in a worker process of
    a :class:`~vopd.eval.timeout_pool.TimeoutPool` (a 5000-digit integer makes ``int()`` raise;
    a huge power makes sympy run for minutes): a check that exceeds ``timeout_s`` (official: 5 s)
    is wrong and ``timed_out``, one that raises is wrong with its ``error``, and the others are
    unaffected. Identical pairs are checked once. Workers default to min(4, CPU count).
    ``string_match=False`` asks math-verify alone (a diagnostic used by the gold check).
    """
    from vopd.eval.timeout_pool import TimeoutPool

    todo = sorted({(g, p) for g, p in pairs if p is not None})
    verdict: dict[tuple[str, str], Verdict] = {}
    if todo:
        # warm-up: math-verify's first call imports sympy and builds its LaTeX parser (~1 s);
        # workers that only compare equal strings and integers skip it
        parser = not string_match or any(_needs_parser(g, p) for g, p in todo)
        warmup = ("\\frac{1}{2}", "0.5") if parser else None
        with TimeoutPool(
            math_equal,
            workers=_pool_workers(workers, len(todo)),
            soft_timeout_s=timeout_s,
            warmup=warmup,
        ) as pool:
            outcomes = pool.map([(g, p, string_match) for g, p in todo], progress=progress)
        for pair, out in zip(todo, outcomes, strict=True):
            ok = bool(out.value) and not out.timed_out and out.error is None
            verdict[pair] = Verdict(ok, out.timed_out, out.error)
    return [verdict[(g, p)] if p is not None else Verdict(False) for g, p in pairs]


def grade_mcq(
    items: Sequence[tuple[str, int, list[str] | None]],
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str | None, bool, str | None]]:
    """``(letter or None, timed_out, error)`` for each ``(text, num_choices, choices)``: the
    :func:`extract_choice` of every sample runs in a worker under ``timeout_s``, like the math
    checks, so a pathological completion (a regex that backtracks for minutes) or an error is
    that sample's alone (no letter, flagged). Identical items are extracted once."""
    from vopd.eval.timeout_pool import TimeoutPool

    key = [(text, n, tuple(ch) if ch is not None else None) for text, n, ch in items]
    todo = sorted(set(key), key=lambda k: (k[0], k[1], k[2] or ()))
    found: dict[tuple, tuple[str | None, bool, str | None]] = {}
    if todo:
        with TimeoutPool(
            extract_choice, workers=_pool_workers(workers, len(todo)), soft_timeout_s=timeout_s
        ) as pool:
            tasks = [(text, n, list(ch) if ch is not None else None) for text, n, ch in todo]
            outcomes = pool.map(tasks, progress=progress)
        for k, out in zip(todo, outcomes, strict=True):
            letter = None if out.timed_out or out.error else out.value
            found[k] = (letter, out.timed_out, out.error)
    return [found[k] for k in key]


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
# A capital letter, perhaps wrapped: (B), [B], **B**, $B$, $\text{B}$, \textbf{B}, \(B\).
_OPEN = r"(?:\*{1,2}|\$|\\\(|\\(?:text|textbf|mathrm|mathbf)\{|[\(\[])"
_CLOSE = r"(?:\*{1,2}|\$|\\\)|\}|[\)\]])"
_L = rf"(?:{_OPEN}\s*)*([A-Z])(?:\s*{_CLOSE})*"
_END = r"(?![A-Za-z0-9'’\-])"  # not the start of a word or name: "A-ring", "B's", "Ab"
_FILLER = r"(?:therefore|thus|hence|then|clearly|definitely|indeed|likely|probably|most\s+likely)"
_ANSWER_NOUN = (
    r"(?:final\s+answer|correct\s+answer|correct\s+option|correct\s+choice|right\s+answer|"
    r"best\s+answer|answer|choice)"
)
_COPULA = r"(?:is|was|would\s+be|should\s+be|must\s+be|will\s+be)"
# explicit phrasings, in priority order; the last match of the first pattern that matches wins
_LETTER_PATTERNS = [
    re.compile(r"<answer>\s*[\(\[]?\s*([A-Z])\s*[\)\]]?\s*</answer>"),
    re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?([A-Z])\)?\s*\}?\s*\}"),
    # the answer is (therefore) B / Answer: $B$ / The correct answer is $\text{B}$
    re.compile(
        rf"(?i:\b{_ANSWER_NOUN}\b\s*(?:{_COPULA})?(?:\s*,?\s*{_FILLER}\s*,?)?\s*[:=]?\s*"
        rf"(?:option\s*|choice\s*|letter\s*)?)\s*{_L}{_END}"
    ),
    # B is the correct answer / (B) is the answer / option B would be the best choice; the
    # letter starts a clause ("Vitamin C is the right choice" names no option)
    re.compile(
        r"(?im:(?:^|[.,:;!?]|\b(?:so|thus|hence|therefore|then|and|that|think|believe|"
        r"conclude|say)\b)[ \t]*,?[ \t]*)"
        rf"(?i:(?:option|choice)\s+)?{_L}\s+(?i:{_COPULA}|seems\s+to\s+be|"
        rf"appears\s+to\s+be)\s+(?i:the\s+)?(?i:(?:correct|right|best|final|most\s+"
        rf"(?:likely|plausible|reasonable))\s+)?(?i:answer|option|choice)\b"
    ),
    # I would choose B / I select (C) / going with D
    re.compile(
        rf"(?i:\b(?:choose|chose|select|selected|pick|picked|go\s+with|going\s+with|opt\s+for)"
        rf"\s+(?:option\s+|choice\s+|answer\s+)?)\s*{_L}{_END}"
    ),
    re.compile(rf"(?i:\b(?:option|choice))\s+{_L}{_END}"),
    re.compile(r"(?m)^\s*[\*]*[\(\[]?\s*([A-Z])\s*[\)\]\.:]?[\*]*\s*$"),
    re.compile(r"[\(\[]\s*([A-Z])\s*[\)\]]\s*\.?\s*$"),
]
_LETTER_FIRST = _LETTER_PATTERNS[3]
# "B or C", "B, C", "B/C", "B and C": two letters asserted at once
_AND_ANOTHER = re.compile(rf"^\s*(?:,|/|&|\bor\b|\band\b|\bnor\b)\s*(?i:option\s+)?{_L}{_END}")
_ANOTHER_AND = re.compile(rf"{_L}\s*(?:,|/|&|\bor\b|\band\b|\bnor\b)\s*(?i:option\s+)?$")
# "A" as the article: "choose A different route" (a capital letter then a lower-case word)
_ARTICLE = re.compile(
    r"^\s+(?!(?:because|since|as|is|and|or|which|here|for|with|in|over|rather|instead|then|"
    r"too|now|only|again|based|given)\b)[a-z]"
)
# "C. 2.8" on a line of its own: a letter followed by (what should be) its option's text
_LETTER_TEXT_LINE = re.compile(r"(?m)^[ \t]*[\*]*\(?([A-Z])[\.\):][ \t]+(.+?)[ \t]*$")
_ANSWER_VALUE = re.compile(
    rf"(?im)\b{_ANSWER_NOUN}\b\s*(?:{_COPULA})?(?:\s*,?\s*{_FILLER}\s*,?)?\s*[:=]?\s*(.+?)\s*$"
)


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


def _value_key(text: str) -> str:
    """An answer value or an option text, comparable: LaTeX wrappers, ``$``, ``**`` and a final
    period removed, then :func:`_option_key`."""
    s = re.sub(r"\\(?:boxed|text|textbf|mathrm|mathbf|left|right)\b", " ", str(text))
    s = s.replace("$", " ").replace("**", " ").strip().rstrip(".").strip()
    return _option_key(s)


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return bool(a)
    try:  # 2.80 == 2.8
        return float(a) == float(b)
    except ValueError:
        return False


def _ambiguous(pattern: re.Pattern, body: str, m: re.Match, letter: str, valid: str) -> bool:
    """Another valid letter asserted in the same breath: "B or C", "(A) and (D)", "B/C"."""
    if pattern is _LETTER_FIRST:
        other = _ANOTHER_AND.search(body[: m.start(1)].rstrip("([ *$"))
    else:
        other = _AND_ANOTHER.match(body[m.end() :])
    return bool(other) and other.group(1) in valid and other.group(1) != letter


def _article(body: str, m: re.Match) -> bool:
    """True if the matched ``A`` reads as the English article (unwrapped, then a word)."""
    return m.group(1) == "A" and m.end() == m.end(1) and bool(_ARTICLE.match(body[m.end() :]))


def _by_option_text(body: str, choices: Sequence[str], valid: str) -> str | bool | None:
    """The letter whose option text the completion states as its answer, None if none, or
    False if the evidence conflicts (stop: no answer). In order: lines "C. 2.8" (exactly one
    letter so written, and its own text), then the last ``\\boxed{}``, the last "answer is ..."
    and the last line, each equal to exactly one option's text (numbers compared as numbers),
    then an option text of 4+ characters appearing in the tail as whole words, with no other
    option's text there."""
    keys = [_value_key(c) for c in choices]
    lines = [(m.group(1), m.group(2)) for m in _LETTER_TEXT_LINE.finditer(body)]
    if {x for x, _ in lines} and len({x for x, _ in lines}) == 1:  # not an echo of the options
        letter, rest = lines[-1]
        if letter in valid and _same_value(_value_key(rest), keys[valid.index(letter)]):
            return letter
        if letter in valid:
            return False  # "C. 3.1" but option C is something else: letter and text disagree
    values = [extract_boxed(body)]
    values += [m.group(1) for m in _ANSWER_VALUE.finditer(body)][-1:]
    values += [line for line in body.splitlines() if line.strip()][-1:]
    for value in filter(None, values):
        v = _value_key(value)
        hits = {valid[i] for i, k in enumerate(keys) if _same_value(v, k)}
        if len(hits) == 1:
            return hits.pop()
    tail = _option_key(body[-2000:])
    seen = {valid[i] for i, k in enumerate(keys) if k and _contains(tail, k)}
    # any option named counts against uniqueness; only one of 4+ characters can win
    if len(seen) == 1 and len(keys[valid.index(next(iter(seen)))]) >= 4:
        return seen.pop()
    return None


def _contains(text: str, key: str) -> bool:
    """``key`` in ``text`` as whole tokens: "2.8" is not in "12.8", "2.80" or "-2.8"."""
    return re.search(rf"(?<![a-z0-9.+\-]){re.escape(key)}(?![a-z0-9]|\.\d)", text) is not None


def extract_choice(
    text: str, num_choices: int = 4, choices: Sequence[str] | None = None
) -> str | None:
    """The chosen letter (``"A"``...), or None. Cascade: JSON object with key answer/choice (last
    one wins) -> JSON-like ``answer: X`` -> explicit phrasings, in priority order (the last
    match of the first that matches): ``<answer>X</answer>``, ``\\boxed{X}``, ``the (correct)
    answer is (therefore) X`` / ``Answer: $X$`` / ``$\\text{X}$``, ``X is the correct answer``,
    ``I would choose X``, ``option X``, a line that is just ``X``, a trailing ``(X)`` -> the
    text of exactly one option stated as the answer (``C. 2.8``, ``\\boxed{2.8}``, a last line
    ``2.8``) or, for options of 4+ characters, appearing in the tail.

    Never a guess: two letters asserted together (``B or C``), a letter whose written option text
    is another option's, or an option text that matches two options give None."""
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

    for m in reversed(list(_JSONISH.finditer(body))):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter
    for pattern in _LETTER_PATTERNS:
        for m in reversed(list(pattern.finditer(body))):
            letter = m.group(1)
            if letter not in valid or _article(body, m):
                continue
            return None if _ambiguous(pattern, body, m, letter, valid) else letter

    if choices:
        found = _by_option_text(body, [str(c) for c in choices], valid)
        return found or None
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
