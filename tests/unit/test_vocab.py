"""Student/teacher vocabulary check with tokenizers and models built in code (no hub).

Cases: equal tokenizers; equal tokenizers over padded logit rows (the Qwen2.5 0.5B-vs-7B
situation in miniature); tokenizers that really differ (an extra token, a moved id), each named in
the error; harmless special-token role differences reported as notes.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vopd.estimators import ESTIMATORS
from vopd.vocab import (
    compare_tokenizers,
    logit_rows,
    shared_vocab,
    slice_logits,
    tokenizer_size,
)

BASE = ["<pad>", "<eos>", "<unk>", "<im_end>", *"0123456789+=;abc"]  # 20 tokens, ids 0..19


def make_tok(tokens=BASE, *, eos="<eos>", added=()):
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eos, pad_token="<pad>", unk_token="<unk>"
    )
    if added:
        tok.add_tokens(list(added), special_tokens=True)
    return tok


def tiny_lm(rows: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rows,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).double().eval()


# ---------------------------------------------------------------------------------------------
# Equal


def test_equal_tokenizers_share_everything():
    s, t = make_tok(), make_tok()
    plan = shared_vocab(s, t, 20, 20)
    assert (plan.rows, plan.tokenizer_size, plan.sampler_limit, plan.notes) == (20, 20, None, ())


def test_equal_with_added_special_tokens():
    s, t = make_tok(added=["<think>"]), make_tok(added=["<think>"])
    assert tokenizer_size(s) == 21  # the added token gets id 20
    assert shared_vocab(s, t).rows == 21


# ---------------------------------------------------------------------------------------------
# Padded rows (same tokenizer, different model row counts)


def test_padded_teacher_rows_are_sliced_off():
    s, t = make_tok(), make_tok()
    plan = shared_vocab(s, t, student_rows=24, teacher_rows=32)
    assert plan.rows == 24 and plan.sampler_limit is None  # the sampler can emit all 24 ids
    assert any("24..31" in n and "teacher" in n for n in plan.notes)


def test_padded_student_rows_limit_the_sampler():
    plan = shared_vocab(make_tok(), make_tok(), student_rows=32, teacher_rows=24)
    assert plan.rows == 24 and plan.sampler_limit == 24


def test_rows_below_the_tokenizer_are_rejected():
    with pytest.raises(ValueError, match=r"teacher model has 16 logit rows.*at least 20"):
        shared_vocab(make_tok(), make_tok(), student_rows=24, teacher_rows=16)


def test_sliced_logits_of_real_models_feed_the_estimators():
    student, teacher = tiny_lm(24, seed=0), tiny_lm(32, seed=1)
    plan = shared_vocab(make_tok(), make_tok(), logit_rows(student), logit_rows(teacher))
    assert (logit_rows(student), logit_rows(teacher), plan.rows) == (24, 32, 24)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        s_BTV, t_BTV = student(ids).logits, teacher(ids).logits
    with pytest.raises(ValueError, match="24 != teacher vocabulary size 32"):
        ESTIMATORS["vopd"](s_BTV, t_BTV, ids, torch.ones(1, 6))
    s_sl, t_sl = slice_logits(s_BTV, plan.rows), slice_logits(t_BTV, plan.rows)
    assert s_sl.shape[-1] == t_sl.shape[-1] == 24 and s_sl.data_ptr() == s_BTV.data_ptr()
    loss, _ = ESTIMATORS["full_opd"](s_sl, t_sl, ids, torch.ones(1, 6))
    # Independent value: mean_t Σ_v p(v)(log p(v) − log q̃(v)), q̃ the teacher renormalised on 0..23
    lp = s_BTV.log_softmax(-1)
    zt = t_BTV[..., :24]
    lq = zt - torch.logsumexp(zt, -1, keepdim=True)
    expected = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)


def test_slice_cannot_grow():
    with pytest.raises(ValueError, match="cannot slice 8 logit rows to 9"):
        slice_logits(torch.zeros(1, 1, 8), 9)


# ---------------------------------------------------------------------------------------------
# Really different tokenizers


def test_extra_token_is_named():
    s, t = make_tok(), make_tok(added=["<think>"])
    with pytest.raises(
        ValueError, match=r"1 token\(s\) only in the teacher, e.g. \['<think>' \(id 20\)\]"
    ):
        compare_tokenizers(s, t)


def test_moved_id_is_named():
    swapped = [*BASE[:10], BASE[11], BASE[10], *BASE[12:]]  # '6' and '7' trade ids
    with pytest.raises(
        ValueError, match=r"2 token\(s\) with different ids.*'6': student 10 vs teacher 11"
    ):
        shared_vocab(make_tok(), make_tok(swapped), 20, 20)


def test_different_token_sets_are_named_on_both_sides():
    other = [*BASE[:-1], "d"]  # 'c' replaced by 'd' at id 19
    with pytest.raises(ValueError) as e:
        compare_tokenizers(make_tok(), make_tok(other))
    msg = str(e.value)
    assert "only in the student, e.g. ['c' (id 19)]" in msg
    assert "only in the teacher, e.g. ['d' (id 19)]" in msg


# ---------------------------------------------------------------------------------------------
# Harmless differences


def test_special_token_roles_are_notes_not_errors():
    # a base model ends with <eos>, its instruct sibling with <im_end>: same ids, other role
    plan = shared_vocab(make_tok(eos="<eos>"), make_tok(eos="<im_end>"), 20, 20)
    assert plan.rows == 20
    assert plan.notes == (
        "eos_token differs: student '<eos>', teacher '<im_end>' (same ids; accepted)",
    )
