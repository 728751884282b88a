"""The lean sampling loop (vopd.rollout.lean) against transformers ``generate``: the same tokens
and the same processed scores, bit for bit, under every sampler the toy runs use."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from vopd.rollout import SamplingParams, lean
from vopd.rollout.hf import HFBackend

PROMPTS = ["12+35+40=", "7+8=", "99+1+2+3=", "1=", "50+89+51="]


def toy_size(tokenizer, seed: int) -> LlamaForCausalLM:
    """A random model of the toy teacher's shape (hidden 128, 3 layers, 4 heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def batch(tokenizer, prompts):
    ids = tokenizer(prompts)["input_ids"]
    P = max(map(len, ids))
    input_BP = torch.full((len(ids), P), tokenizer.pad_token_id, dtype=torch.long)
    attn_BP = torch.zeros((len(ids), P), dtype=torch.long)
    for b, x in enumerate(ids):  # left padding, as the hf backend pads
        input_BP[b, P - len(x) :] = torch.tensor(x)
        attn_BP[b, P - len(x) :] = 1
    return input_BP, attn_BP


SAMPLERS = {
    "rollout T=1": {"do_sample": True, "temperature": None, "top_k": None, "top_p": None},
    "eval T=0.6": {"do_sample": True, "temperature": 0.6, "top_k": None, "top_p": 1.0},
    "T=0.6 top-k 20 top-p 0.95": {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    },
    "greedy": {"do_sample": False, "temperature": None, "top_k": None, "top_p": None},
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("eos", ["<eos>", "5"], ids=["eos", "frequent-eos"])
def test_same_tokens_and_scores_as_generate(toy_tokenizer, sampler, eos):
    model = toy_size(toy_tokenizer, seed=0)
    eos_id = toy_tokenizer.convert_tokens_to_ids(eos)  # "5": most rows stop early, unevenly
    config = GenerationConfig(
        **SAMPLERS[sampler],
        eos_token_id=eos_id,
        pad_token_id=toy_tokenizer.pad_token_id,
        bos_token_id=toy_tokenizer.bos_token_id,
        max_new_tokens=24,
        num_beams=1,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert lean.supported(model, config)
    input_BP, attn_BP = batch(toy_tokenizer, PROMPTS * 4)
    model.generation_config = GenerationConfig(**config.to_dict())
    for seed in (0, 1):
        torch.manual_seed(seed)
        ref = model.generate(input_ids=input_BP, attention_mask=attn_BP, generation_config=config)
        torch.manual_seed(seed)
        out = lean.lean_generate(model, input_BP, attn_BP, config)
        assert out is not None, "the lean loop fell back: this transformers' cache is unknown"
        seq, scores = out
        assert torch.equal(seq, ref.sequences), (sampler, seed)
        assert len(scores) == len(ref.scores)
        for a, b in zip(scores, ref.scores, strict=True):
            assert torch.equal(a, b)


def test_the_hf_backend_is_unchanged_by_the_lean_loop(toy_tokenizer, monkeypatch):
    """Rollouts (texts, tokens, truncation, sampler log-probs) with the lean loop and with
    generate (VOPD_LEAN_GENERATE=0) are identical."""
    model = tiny_llama(toy_tokenizer, seed=3)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("VOPD_LEAN_GENERATE", flag)
        backend = HFBackend(model, toy_tokenizer, batch_size=7)
        params = SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=11, logprobs=True)
        runs[flag] = backend.generate(PROMPTS, params)
    a, b = runs["1"], runs["0"]
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.truncated == b.truncated and a.sampler_logprobs == b.sampler_logprobs


def test_only_where_it_is_exact(toy_tokenizer, monkeypatch):
    model = toy_size(toy_tokenizer, seed=0)
    config = GenerationConfig(do_sample=True, max_new_tokens=4, num_beams=1)
    assert lean.supported(model, config)
    assert not lean.supported(model.train(), config)  # dropout would differ
    model.eval()
    assert not lean.supported(model, GenerationConfig(repetition_penalty=1.2, max_new_tokens=4))
    assert not lean.supported(model.to(torch.bfloat16), config)
    model.to(torch.float32)
    monkeypatch.setenv("VOPD_LEAN_GENERATE", "0")
    assert not lean.supported(model, config)
    monkeypatch.delenv("VOPD_LEAN_GENERATE")
    gqa = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(toy_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    ).eval()
    assert not lean.supported(gqa, config)


def test_an_unknown_cache_api_falls_back_to_generate(toy_tokenizer, monkeypatch):
    """A forward that does not fill the cache the lean loop passes (what transformers 5.19 did
    with ``cache=``: it takes ``past_key_values``) gives None before anything is sampled, and the
    hf backend then samples with ``generate``: the same rollouts, never a wrongly read cache."""
    model = toy_size(toy_tokenizer, seed=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=5, logprobs=True)
    monkeypatch.setenv("VOPD_LEAN_GENERATE", "0")
    ref = HFBackend(model, toy_tokenizer).generate(PROMPTS, params)
    monkeypatch.delenv("VOPD_LEAN_GENERATE")
    monkeypatch.setattr(lean, "cache_kwarg", lambda model: "unknown_cache_argument")
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=4,
        num_beams=1,
        eos_token_id=toy_tokenizer.eos_token_id,
        pad_token_id=toy_tokenizer.pad_token_id,
    )
    input_BP, attn_BP = batch(toy_tokenizer, PROMPTS)
    assert lean.lean_generate(model, input_BP, attn_BP, config) is None
    got = HFBackend(model, toy_tokenizer).generate(PROMPTS, params)
    assert got.completion_ids == ref.completion_ids and got.texts == ref.texts
    assert got.truncated == ref.truncated and got.sampler_logprobs == ref.sampler_logprobs


def test_a_forward_without_a_known_cache_argument_is_not_supported(toy_tokenizer, monkeypatch):
    model = toy_size(toy_tokenizer, seed=0)
    config = GenerationConfig(do_sample=True, max_new_tokens=4, num_beams=1)
    assert lean.cache_kwarg(model) in lean.CACHE_KWARGS
    monkeypatch.setattr(lean, "CACHE_KWARGS", ("no_such_argument",))
    assert not lean.supported(model, config)
