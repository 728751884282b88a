"""Shared fixtures: tiny random Llama models built from configs (never downloaded), a small toy
world, and run-config files for ``python -m vopd.train``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from vopd.toy.tokenizer import build_tokenizer
from vopd.toy.world import WorldSpec, write_world


def tiny_llama(tokenizer, seed: int, *, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A random LlamaForCausalLM over the toy vocabulary (~20k parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, toy_tokenizer) -> dict[str, Path]:
    """``{"student": dir, "teacher": dir}``: two differently seeded tiny models, saved with
    save_pretrained like hub models."""
    root = tmp_path_factory.mktemp("models")
    return {
        role: save_model(tiny_llama(toy_tokenizer, seed), toy_tokenizer, root / role)
        for role, seed in (("student", 0), ("teacher", 1))
    }


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, WorldSpec(seed=0, n_train=96, n_val=16, n_test=32, n_hard=16, n_mcq=16))
    return root


@pytest.fixture
def run_config(tmp_path, tiny_models, tiny_world):
    """``run_config(**overrides) -> path`` of a YAML run config over the tiny models."""

    def make(**overrides) -> Path:
        cfg = {
            "student": str(tiny_models["student"]),
            "teacher": str(tiny_models["teacher"]),
            "prompts": str(tiny_world / "prompts" / "train.parquet"),
            "estimator": "vopd",
            "top_k": 4,
            "prompts_per_step": 8,
            "max_new_tokens": 8,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "max_steps": 3,
            "save_every": 2,
            "seed": 0,
            **overrides,
        }
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make
