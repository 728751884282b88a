"""The chat-template option of the training prompts (off by default, as in the official code).

Official prompts (holi-lab/vOPD ``src/util.py::format_prompt``, docs/method.md §2) are the
raw text ``"{problem}\\n\\nPlease reason step by step, and put your final answer within
\\\\boxed{}."`` with no chat template and thinking off; ``vopd.data`` writes exactly that into the
``prompt`` column. ``chat_prompt`` wraps such a prompt as one user turn of the student's chat
template with the assistant turn opened (``add_generation_prompt``) and, for templates that read
it (Qwen3), ``enable_thinking=False``.
"""

from __future__ import annotations


def chat_prompt(tokenizer, prompt: str, *, enable_thinking: bool = False) -> str:
    """``prompt`` as the user turn of ``tokenizer``'s chat template, ready for generation.

    The rollout backends tokenise prompts with the tokenizer's special tokens added, so a BOS the
    template already wrote is dropped when the tokenizer adds one itself (no double BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template=true but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
            "has no chat template: use a post-trained tokenizer or chat_template=false"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    bos = tokenizer.bos_token
    adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and adds_bos and text.startswith(bos):
        text = text[len(bos) :]
    return text
