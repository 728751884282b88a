"""The parts of the vLLM backend that run without a GPU: argument checks before vLLM is imported,
the log-prob extraction from vLLM's output layout, the LoRA rank rounding and the stop ids."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

from vopd.rollout import get_backend
from vopd.rollout.vllm import _sampled_logprobs, _stop_ids, _vllm_rank
from vopd.toy.tokenizer import build_tokenizer


@dataclass
class Logprob:  # the fields of vllm.logprobs.Logprob that the backend reads
    logprob: float
    rank: int | None = None


def test_sampled_token_logprobs_are_picked_per_position():
    # logprobs=0: each position maps the sampled id (and possibly others) to its Logprob
    layout = [{5: Logprob(-0.5, 1)}, {7: Logprob(-2.0, 3), 2: Logprob(-0.1, 1)}]
    assert _sampled_logprobs(layout, [5, 7]) == [-0.5, -2.0]
    with pytest.raises(RuntimeError, match="1 log-prob entries for 2 tokens"):
        _sampled_logprobs(layout[:1], [5, 7])
    with pytest.raises(RuntimeError, match="None log-prob entries"):
        _sampled_logprobs(None, [5])


def test_lora_rank_rounds_up_to_a_vllm_choice():
    assert [_vllm_rank(r) for r in (1, 4, 8, 33, 64, 300)] == [1, 8, 8, 64, 64, 320]
    with pytest.raises(ValueError, match="exceeds"):
        _vllm_rank(1024)


def test_stop_ids_join_tokenizer_and_generation_config(tmp_path):
    from transformers import GenerationConfig

    tok = build_tokenizer()
    assert _stop_ids(tok, str(tmp_path)) == {tok.eos_token_id}  # no generation_config.json
    GenerationConfig(eos_token_id=[tok.eos_token_id, 9]).save_pretrained(tmp_path)
    assert _stop_ids(tok, str(tmp_path)) == {tok.eos_token_id, 9}


def test_bad_arguments_fail_before_vllm_is_needed(tmp_path):
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=1.5: expected a fraction"):
        get_backend("vllm", model="org/name", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="is not a PEFT adapter directory"):
        get_backend("vllm", model="org/name", lora=str(tmp_path))


_SPEC = importlib.util.find_spec("vllm")


@pytest.mark.skipif(_SPEC is not None and _SPEC.origin is not None, reason="vLLM is installed")
def test_missing_vllm_names_the_extra():
    with pytest.raises(ImportError, match=r"vopd\[gpu\]"):
        get_backend("vllm", model="org/name")


def test_engine_settings_fill_in_cpu_defaults_and_keep_gpu_ones():
    from vopd.rollout.vllm import CPU_KV_CACHE_GIB, GPU_MEMORY_UTILIZATION, engine_settings

    gib = 2**30
    assert engine_settings("cpu") == {
        "dtype": "float32",  # not vLLM's auto downcast of a float32 checkpoint
        "enforce_eager": True,
        "kv_cache_memory_bytes": int(CPU_KV_CACHE_GIB * gib),  # a size, not a RAM fraction
    }
    assert engine_settings("cuda") == {
        "dtype": "auto",
        "enforce_eager": False,
        "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
    }
    # what the caller sets wins, on either platform
    assert engine_settings("cpu", dtype="bfloat16", enforce_eager=False) == {
        "dtype": "bfloat16",
        "enforce_eager": False,
        "kv_cache_memory_bytes": int(CPU_KV_CACHE_GIB * gib),
    }
    assert engine_settings("cpu", gpu_memory_utilization=0.1)["gpu_memory_utilization"] == 0.1
    assert "kv_cache_memory_bytes" not in engine_settings("cpu", gpu_memory_utilization=0.1)
    both = engine_settings("cuda", gpu_memory_utilization=0.5, kv_cache_gib=2)
    assert both["kv_cache_memory_bytes"] == 2 * gib and "gpu_memory_utilization" not in both


def test_kv_cache_size_is_checked_before_vllm_is_needed():
    with pytest.raises(ValueError, match=r"kv_cache_gib=0: expected a positive size"):
        get_backend("vllm", model="org/name", kv_cache_gib=0)
