"""The chat-template option on tokenizers built in code (no hub)."""

from __future__ import annotations

import pytest

from vopd.chat import chat_prompt
from vopd.toy.tokenizer import build_tokenizer

TEMPLATE = (  # a Qwen3-like template in miniature: thinking switch, generation prompt
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


def test_user_turn_with_thinking_off_and_no_double_bos():
    tok = build_tokenizer()  # adds <bos> itself when encoding
    tok.chat_template = TEMPLATE
    text = chat_prompt(tok, "12+35=")
    assert text == "<|user|>12+35=<|assistant|><think></think>"  # the template's <bos> dropped
    assert chat_prompt(tok, "1+1=", enable_thinking=True) == "<|user|>1+1=<|assistant|>"


def test_no_template_is_an_error():
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt(build_tokenizer(), "1+1=")
