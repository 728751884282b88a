"""Student/teacher vocabulary check: one token set, logit rows sliced to the shared vocabulary.

    plan = shared_vocab(student_tok, teacher_tok, logit_rows(student), logit_rows(teacher))
    s_BTV, t_BTV = slice_logits(s_BTV, plan.rows), slice_logits(t_BTV, plan.rows)

On-policy distillation scores the student's sampled token ids under the teacher, so the two
tokenizers must give every token string the same id. The *model* row counts may still differ:
checkpoints pad their embedding matrices past the tokenizer (inside the Qwen2.5 family the 0.5B,
1.5B and 3B models have 151,936 logit rows and the 7B has 152,064, with one 151,665-token
tokenizer; docs/estimators.md, what peers do; TRL issue #2215). Those padding rows are ids no
text maps to.

What this module decides:

- **Same tokenizer** = the same token -> id map over the whole vocabulary, added and special tokens
  included (``get_vocab()``). Anything else is a ``ValueError`` naming the tokens only one side has
  and the tokens whose ids differ. Differences that do not change what an id means (which token is
  EOS/pad/BOS, e.g. a base model's ``<|endoftext|>`` vs its instruct sibling's ``<|im_end|>``; a
  different chat template) are returned as notes.
- **Shared vocabulary** = the first ``min(student_rows, teacher_rows)`` logit rows. Both models must
  cover every tokenizer id; the rows above the smaller count are padding of the larger model and
  are sliced off, so both softmaxes are taken over the same ids (the teacher renormalised over them;
  the dropped rows are untrained padding, whose mass is negligible).
- When the *student* has the extra rows, the policy being trained is the student's softmax over the
  shared rows, so the sampler must never emit an id at or above ``rows``:
  ``SharedVocab.sampler_limit`` is that bound (None when the student has no extra rows); the vLLM
  backend turns it into ``allowed_token_ids``.

Deviation from the official code: holi-lab/vOPD uses one model family of equal row counts and has
no check at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

_SHOW = 5  # how many offending tokens an error message names
_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class SharedVocab:
    """What the trainer needs to put student and teacher logits on one vocabulary."""

    rows: int
    """Logit rows both models are sliced to (the smaller row count, or the tokenizer size)."""
    tokenizer_size: int
    """Largest tokenizer id + 1 (added and special tokens included)."""
    student_rows: int | None = None
    teacher_rows: int | None = None
    notes: tuple[str, ...] = ()
    """Differences that were accepted (padding rows, special-token roles), for the run log."""

    @property
    def sampler_limit(self) -> int | None:
        """Ids ≥ this must not be sampled (the student has rows outside the shared vocabulary)."""
        if self.student_rows is not None and self.student_rows > self.rows:
            return self.rows
        return None


# ---------------------------------------------------------------------------------------------
# Tokenizers


def compare_tokenizers(student_tok, teacher_tok) -> list[str]:
    """Raise ``ValueError`` unless both tokenizers map the same tokens to the same ids; return
    notes on harmless differences (special-token roles)."""
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        only_s = sorted(set(vs) - set(vt), key=vs.get)
        only_t = sorted(set(vt) - set(vs), key=vt.get)
        moved = sorted((k for k in set(vs) & set(vt) if vs[k] != vt[k]), key=vs.get)
        parts = []
        if only_s:
            parts.append(f"{len(only_s)} token(s) only in the student, e.g. {_show(only_s, vs)}")
        if only_t:
            parts.append(f"{len(only_t)} token(s) only in the teacher, e.g. {_show(only_t, vt)}")
        if moved:
            shown = ", ".join(f"{k!r}: student {vs[k]} vs teacher {vt[k]}" for k in moved[:_SHOW])
            parts.append(f"{len(moved)} token(s) with different ids, e.g. {shown}")
        raise ValueError(
            f"student and teacher vocabularies differ (student {len(vs)} tokens, teacher "
            f"{len(vt)}): " + "; ".join(parts) + ". On-policy distillation scores the student's "
            "token ids under the teacher, so both must use one tokenizer (pick a teacher from the "
            "student's family)."
        )
    notes = []
    for role in _ROLES:
        a, b = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if a != b:
            notes.append(f"{role} differs: student {a!r}, teacher {b!r} (same ids; accepted)")
    return notes


def _show(tokens: list[str], vocab: dict[str, int]) -> str:
    return "[" + ", ".join(f"{t!r} (id {vocab[t]})" for t in tokens[:_SHOW]) + "]"


def tokenizer_size(tok) -> int:
    """Largest id the tokenizer can produce + 1 (added and special tokens included)."""
    return max(tok.get_vocab().values()) + 1


# ---------------------------------------------------------------------------------------------
# Logit rows


def logit_rows(model) -> int:
    """Number of logit rows a causal LM produces (its output embedding's first dimension); works
    through PEFT wrappers, whose ``get_output_embeddings`` is the base model's."""
    return int(model.get_output_embeddings().weight.shape[0])


def shared_vocab(
    student_tok, teacher_tok, student_rows: int | None = None, teacher_rows: int | None = None
) -> SharedVocab:
    """Check the tokenizers (``compare_tokenizers``) and the row counts; return the plan.

    Without row counts the shared vocabulary is the tokenizer itself."""
    notes = compare_tokenizers(student_tok, teacher_tok)
    size = tokenizer_size(student_tok)
    if student_rows is None or teacher_rows is None:
        return SharedVocab(size, size, student_rows, teacher_rows, tuple(notes))
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < size:
            raise ValueError(
                f"the {who} model has {rows} logit rows but its tokenizer has ids up to "
                f"{size - 1}: expected at least {size} rows (wrong tokenizer for this model?)"
            )
    rows = min(student_rows, teacher_rows)
    if student_rows != teacher_rows:
        bigger = "student" if student_rows > teacher_rows else "teacher"
        notes.append(
            f"logit rows differ (student {student_rows}, teacher {teacher_rows}; tokenizer "
            f"{size}): both are sliced to the shared {rows}; the {bigger}'s rows {rows}.."
            f"{max(student_rows, teacher_rows) - 1} are padding no token maps to"
        )
    return SharedVocab(rows, size, student_rows, teacher_rows, tuple(notes))


def slice_logits(logits_BTV: Tensor, rows: int) -> Tensor:
    """The first ``rows`` vocabulary entries (a view; gradients flow to the kept rows only).

    log-softmax over the slice renormalises over the shared ids: log p̃(v) = z_v − lse(z[:rows])."""
    V = logits_BTV.shape[-1]
    if rows > V:
        raise ValueError(f"cannot slice {V} logit rows to {rows}: expected rows <= {V}")
    return logits_BTV if rows == V else logits_BTV[..., :rows]
