"""The small and paper training configs load through TrainConfig (unknown keys, wrong types and
out-of-range values would fail) and carry the official settings, written out here by hand from
docs/method.md §2 (holi-lab/vOPD configs/training/default.yaml, accelerate.yaml, TRL
v1.2.0 defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vopd.config import TrainConfig, load_config
from vopd.config.__main__ import main
from vopd.lora import LORA_TARGETS

CONFIGS = Path(__file__).resolve().parents[2] / "config" / "train"

OFFICIAL = {
    "student": "Qwen/Qwen3-1.7B-Base",
    "teacher": "Qwen/Qwen3-1.7B",
    "prompts": "resources/benchmarks/dapo14k.parquet",  # guanning-ai/dapo14k via vopd.data
    "prompt_column": "prompt",
    "chat_template": False,
    "finetune": "lora",
    "lora_r": 64,
    "lora_alpha": 128.0,
    "lora_dropout": 0.05,
    "dtype": "bfloat16",
    "gradient_checkpointing": True,
    "optimizer": "adamw",
    "lr": 1e-5,
    "lr_schedule": "cosine",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "prompts_per_step": 256,
    "samples_per_prompt": 1,
    "max_steps": -1,
    "temperature": 1.0,
    "top_p": 1.0,
    "sampling_top_k": -1,
    "max_new_tokens": 2048,
    "rollout_backend": "vllm",
    "vllm_gpu_memory_utilization": 0.6,
    "is_correction": True,
    "is_cap": 3.0,
    "normalize": "token_mean",
    "top_k": 100,
    "save_every": 20,
    "seed": 42,
}


def test_paper_config_is_the_official_setting():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert {k: getattr(cfg, k) for k in OFFICIAL} == OFFICIAL
    assert set(cfg.lora_targets.split(",")) == set(LORA_TARGETS)
    # one epoch: |dataset| // 256 steps (about 54 for ~14k prompts)
    from vopd.trainer import num_steps

    assert num_steps(cfg, 14_000) == 54


def test_paper_4b_pair_is_a_documented_override():
    text = (CONFIGS / "paper.yaml").read_text()
    assert "student=Qwen/Qwen3-4B-Base teacher=Qwen/Qwen3-4B" in text
    cfg = load_config(
        CONFIGS / "paper.yaml", ["student=Qwen/Qwen3-4B-Base", "teacher=Qwen/Qwen3-4B"]
    )
    assert (cfg.student, cfg.teacher, cfg.finetune, cfg.lr) == (
        "Qwen/Qwen3-4B-Base",
        "Qwen/Qwen3-4B",
        "lora",
        1e-5,
    )


def test_small_config_is_one_gpu_with_a_real_pair():
    cfg = load_config(CONFIGS / "small.yaml")
    assert (cfg.student, cfg.teacher) == ("Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-1.7B")
    assert (cfg.rollout_backend, cfg.finetune, cfg.dtype) == ("vllm", "lora", "bfloat16")
    assert 0 < cfg.vllm_gpu_memory_utilization < 0.6  # room for the trainer on the same GPU
    same = {k: v for k, v in OFFICIAL.items() if k not in ("student", "teacher")}
    differs = {k for k, v in same.items() if getattr(cfg, k) != v}
    assert differs == {"prompts_per_step", "max_steps", "vllm_gpu_memory_utilization"}


@pytest.mark.parametrize("name", ["small", "paper"])
def test_every_key_is_spelled_out_and_resolves(name, capsys):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert set(raw) <= set(TrainConfig.__dataclass_fields__)
    main(["resolve", "--config", str(CONFIGS / f"{name}.yaml")])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert TrainConfig.from_dict(resolved) == load_config(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune=qlora", r"finetune='qlora': expected one of \['full', 'lora'\]"),
        ("lora_r=0", r"lora_r=0: expected a value in \[1, inf\]"),
        ("lora_dropout=1.0", r"lora_dropout=1.0: expected a value in \[0, 1\)"),
        ("vllm_gpu_memory_utilization=1.5", r"vllm_gpu_memory_utilization=1.5: expected"),
        ("is_cap=0", r"is_cap=0.0: expected a value in \(0, inf\]"),
        ("lora_targets=' , '", r"lora_targets=' , ': expected module names"),
    ],
)
def test_bad_scale_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "paper.yaml", [override])
