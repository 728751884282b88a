"""process_results for the lm-eval task ``vopd_math500`` (loaded by lm-eval from this folder).

Deliberately independent of vopd.eval.graders, so the cross-check compares two implementations:
``boxed_exact_match`` compares the last ``\\boxed{}`` content with the gold string, and
``math_verify`` runs math-verify on the whole completion (as lm-eval's minerva_math does).
"""

from __future__ import annotations


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces counted; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i].strip()
        i += 1
    return None


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    from math_verify import parse, verify

    completion = results[0]
    gold = last_boxed(doc.get("solution") or "") or doc["answer"]
    boxed = last_boxed(completion)
    exact = int(boxed is not None and boxed == gold.strip())
    match = int(bool(verify(parse(f"${gold}$"), parse(completion))))
    return {"boxed_exact_match": exact, "math_verify": match}
