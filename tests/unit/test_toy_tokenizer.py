"""The toy character tokenizer is a real transformers tokenizer that round-trips exactly."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vopd.toy.tokenizer import ALPHABET, build_tokenizer

TEXTS = [
    "12+35+40=",
    "12+35=47;47+40=87;\\boxed{87}",
    "58*2=116;37-116=-79;\\boxed{-79}",
    "0",
    "12+35+40=84A;85B;86C;87D;",  # the multiple-choice form
    "12+35=47;47+40=87D;\\boxed{D}",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_is_a_fast_tokenizer_with_special_tokens(toy_tokenizer):
    assert isinstance(toy_tokenizer, PreTrainedTokenizerFast)
    assert len(toy_tokenizer) == 31 == 4 + len(ALPHABET)
    ids = {toy_tokenizer.pad_token_id, toy_tokenizer.bos_token_id, toy_tokenizer.eos_token_id}
    assert len(ids) == 3 and toy_tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_per_character_and_round_trip(toy_tokenizer, text):
    ids = toy_tokenizer(text)["input_ids"]
    assert ids[0] == toy_tokenizer.bos_token_id
    assert len(ids) == 1 + len(text)
    assert toy_tokenizer.convert_ids_to_tokens(ids[1:]) == list(text)
    assert toy_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert toy_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_save_pretrained_and_autotokenizer_agree(toy_tokenizer, saved, text):
    assert saved(text)["input_ids"] == toy_tokenizer(text)["input_ids"]
    assert saved.decode(saved(text)["input_ids"], skip_special_tokens=True) == text
    assert saved.get_vocab() == toy_tokenizer.get_vocab()
    assert (saved.pad_token, saved.bos_token, saved.eos_token) == ("<pad>", "<bos>", "<eos>")


def test_eos_decodes_as_special_and_unknown_chars_map_to_unk(toy_tokenizer):
    ids = toy_tokenizer("1+1=")["input_ids"] + [toy_tokenizer.eos_token_id]
    assert toy_tokenizer.decode(ids) == "<bos>1+1=<eos>"
    assert toy_tokenizer("a")["input_ids"][1] == toy_tokenizer.unk_token_id
