"""LoRA through PEFT on a tiny real Llama: only the adapter trains, and only the adapter is saved.

Independent facts checked: the adapter's parameter count equals Σ r·(d_in + d_out) over the
seven projection types; B starts at 0, so the first step's gradient w.r.t. every A is exactly 0
(dL/dA = (α/r)·Bᵀ·(...) = 0) and only the B's move, while after the second step every A and B
has moved and no base weight ever has; the adapter file holds exactly the A/B matrices.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from vopd.estimators import ESTIMATORS
from vopd.lora import (
    LORA_TARGETS,
    adapter_base,
    apply_lora,
    count_parameters,
    is_adapter_dir,
    is_lora,
    load_for_eval,
    save_adapter,
    trainable_parameters,
)

H, KV, FF, LAYERS, V = 16, 8, 32, 2, 24  # hidden, k/v width (1 kv head of 8), MLP, layers, vocab


def tiny_lm(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attention_dropout=0.1,  # a dropout module for disable_dropout to switch off
    )
    return LlamaForCausalLM(cfg)


def lora_params_per_layer(r: int) -> int:
    """Σ r·(d_in + d_out) over q, k, v, o, gate, up, down of one decoder layer."""
    shapes = [(H, H), (H, KV), (H, KV), (H, H), (H, FF), (H, FF), (FF, H)]
    return sum(r * (i + o) for i, o in shapes)


def opd_step(student, teacher, opt, tokens_BL, completion: int) -> None:
    """One vOPD step on fixed sequences: the last ``completion`` tokens are the completion."""
    logits = student(tokens_BL).logits[:, -completion - 1 : -1]
    with torch.no_grad():
        t_logits = teacher(tokens_BL).logits[:, -completion - 1 : -1]
    y = tokens_BL[:, -completion:]
    loss, _ = ESTIMATORS["vopd"](logits, t_logits, y, torch.ones_like(y, dtype=torch.float32))
    opt.zero_grad()
    loss.backward()
    opt.step()


# ---------------------------------------------------------------------------------------------


def test_official_defaults_build_the_official_adapter():
    model = apply_lora(tiny_lm(0))
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (64, 128, 0.05)
    assert set(cfg.target_modules) == set(LORA_TARGETS) and cfg.bias == "none"
    assert count_parameters(model)["params_trainable"] == LAYERS * lora_params_per_layer(64)
    # disable_dropout (TRL default): the 0.05 is recorded but every dropout module is off
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert all(
        layer.self_attn.attention_dropout == 0.0 for layer in model.base_model.model.model.layers
    )


def test_unknown_target_module_is_rejected():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] not found in LlamaForCausalLM"):
        apply_lora(tiny_lm(0), targets=("q_proj", "qkv_proj"))


def test_lora_step_trains_only_the_adapter(tmp_path):
    base_dir = tmp_path / "base"
    tiny_lm(0).save_pretrained(base_dir)
    student = apply_lora(
        LlamaForCausalLM.from_pretrained(base_dir), r=4, alpha=8, base_name_or_path=str(base_dir)
    )
    teacher = tiny_lm(1).eval()
    assert is_lora(student) and not is_lora(teacher)
    named = dict(student.named_parameters())
    base0 = {k: p.detach().clone() for k, p in named.items() if not p.requires_grad}
    lora0 = {k: p.detach().clone() for k, p in named.items() if p.requires_grad}
    teacher0 = [p.detach().clone() for p in teacher.parameters()]
    assert len(lora0) == 2 * len(LORA_TARGETS) * LAYERS
    assert all("lora_A" in k or "lora_B" in k for k in lora0)
    assert all(float(lora0[k].abs().max()) == 0.0 for k in lora0 if "lora_B" in k)

    opt = torch.optim.Adam(trainable_parameters(student), lr=1e-2)
    torch.manual_seed(2)
    tokens = torch.randint(0, V, (3, 10))

    opd_step(student, teacher, opt, tokens, completion=6)
    moved = {k: not torch.equal(named[k], lora0[k]) for k in lora0}
    assert all(moved[k] for k in lora0 if "lora_B" in k)
    assert not any(moved[k] for k in lora0 if "lora_A" in k)  # ∂L/∂A = 0 while B = 0

    opd_step(student, teacher, opt, tokens, completion=6)
    assert all(not torch.equal(named[k], lora0[k]) for k in lora0)
    assert all(torch.equal(named[k], base0[k]) for k in base0)
    assert all(torch.equal(p, p0) for p, p0 in zip(teacher.parameters(), teacher0, strict=True))

    # The checkpoint holds the adapter and nothing else.
    ckpt = save_adapter(student, tmp_path / "step2")
    assert is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert len(weights) == len(lora0)
    assert all(("lora_A" in k or "lora_B" in k) and "base_layer" not in k for k in weights)
    assert sum(w.numel() for w in weights.values()) == LAYERS * lora_params_per_layer(4)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert adapter_base(ckpt) == str(base_dir)

    # Loading it for evaluation (base from the adapter config, adapter merged) gives the policy.
    evaluated = load_for_eval(ckpt)
    assert not is_lora(evaluated)
    student.eval()
    with torch.no_grad():
        expected, got = student(tokens).logits, evaluated(tokens).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_full_finetuning_has_every_weight_trainable():
    model = tiny_lm(0)
    counts = count_parameters(model)
    assert counts["params_trainable"] == counts["params_total"] > 0
    with pytest.raises(ValueError, match="not a PEFT model"):
        save_adapter(model, "unused")
