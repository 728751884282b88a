"""The toy world's character-level tokenizer: a real ``transformers`` fast tokenizer built in code.

One token per character of the toy alphabet (digits, ``+ - * = ;``, the letters of ``\\boxed{}``
and the option letters ``A B C D`` of the multiple-choice form) plus ``<pad>``, ``<bos>``,
``<eos>`` and ``<unk>``: 31 tokens. Encoding prepends
``<bos>`` (as Llama tokenizers do); decoding joins characters with no separator. Saved with
``save_pretrained`` and loaded back with ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# every character a problem, its options or a worked solution uses
ALPHABET = "0123456789+-*=;\\boxed{}ABCD"
MODEL_MAX_LENGTH = 128  # the toy model's max_position_embeddings


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The 31-token character tokenizer (ids: specials 0-3, then ``ALPHABET`` in order)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *ALPHABET])}
    if len(vocab) != len(SPECIALS) + len(ALPHABET):
        raise AssertionError("ALPHABET has a repeated character")
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one per char
    core.decoder = decoders.Fuse()  # join characters back without spaces
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",  # generation pads on the left; training builds its own tensors
    )
