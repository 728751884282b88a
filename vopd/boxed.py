"""The answer of a math completion: the content of its last brace-matched ``\\boxed{...}``
(the official ``extract_boxed_answer``, docs/method.md §2). A leaf module: the benchmark
loaders (vopd.formats, for gold solutions) and the graders (vopd.eval.graders) both use it.
"""

from __future__ import annotations

import re

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
