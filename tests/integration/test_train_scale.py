"""The trainer with the scale-out options on CPU (hf backend, tiny models): LoRA runs save and
resume adapters only; full fine-tuning in bf16 keeps float32 master weights; the IS correction
and mismatch metrics; padded teacher rows; the chat-template option's error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from vopd.batch import make_batch
from vopd.config import TrainConfig
from vopd.io import read_jsonl
from vopd.lora import adapter_base, load_for_eval
from vopd.rollout import SamplingParams
from vopd.rollout.hf import HFBackend
from vopd.train import main
from vopd.trainer import load_models, load_prompts, train, train_step

pytestmark = pytest.mark.integration

TIMING = {"perf/time_rollout_s", "perf/time_teacher_s", "perf/time_update_s", "perf/step_s",
          "perf/tokens_per_s"}  # fmt: skip
LORA = {"finetune": "lora", "lora_r": 4, "lora_alpha": 8}


def _numbers(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")
    ]


def test_lora_run_saves_adapters_and_resumes_exactly(run_config, tmp_path, tiny_models):
    cfg_path = run_config(**LORA, max_steps=3, save_every=1)
    full = tmp_path / "full"
    main(["--config", str(cfg_path), "--out", str(full), "--no-progress"])
    for step in range(4):  # step0 (the untrained adapter) .. step3
        d = full / "checkpoints" / f"step{step}"
        assert (d / "adapter_config.json").is_file() and not (d / "model.safetensors").exists()
        keys = load_file(d / "adapter_model.safetensors")
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    assert adapter_base(full / "checkpoints" / "step3") == str(tiny_models["student"])
    # the trained policy differs from the base; the base file itself is untouched
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    base = LlamaForCausalLM.from_pretrained(tiny_models["student"]).eval()
    trained = load_for_eval(full / "checkpoints" / "step3")
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, trained(ids).logits)

    from vopd.config import load_config

    killed = tmp_path / "killed"
    train(load_config(cfg_path), killed, progress=False, stop_after=1)
    assert not (killed / "done.json").exists()
    main(["--config", str(cfg_path), "--out", str(killed), "--no-progress"])  # resumes at 1
    assert json.loads((killed / "resumes.jsonl").read_text())["from_step"] == 1
    assert _numbers(killed) == _numbers(full)  # exactly the uninterrupted run
    a = load_file(full / "checkpoints" / "step3" / "adapter_model.safetensors")
    b = load_file(killed / "checkpoints" / "step3" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cfg(tiny_models, tiny_world, **kw) -> TrainConfig:
    base = {
        "student": str(tiny_models["student"]),
        "teacher": str(tiny_models["teacher"]),
        "prompts": str(tiny_world / "prompts" / "train.parquet"),
        "prompts_per_step": 8,
        "max_new_tokens": 10,
    }
    return TrainConfig.from_dict({**base, **kw})


def _batch(cfg, student, tok, logprobs=False):
    backend = HFBackend(student, tok, batch_size=8)
    sp = SamplingParams(max_new_tokens=10, seed=0, logprobs=logprobs)
    return make_batch(backend.generate(load_prompts(cfg)[:8], sp), tok.pad_token_id, "cpu")


def test_full_finetuning_in_bf16_keeps_float32_master_weights(tiny_models, tiny_world):
    cfg = _cfg(tiny_models, tiny_world, dtype="bfloat16", gradient_checkpointing=True)
    student, teacher, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # the master copy
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    flag = getattr(type(student), "is_activation_checkpointing", None)
    assert student.is_activation_checkpointing if flag else student.is_gradient_checkpointing
    m = train_step(cfg, student, teacher, _batch(cfg, student, tok), V, sync=lambda: None)
    assert torch.isfinite(torch.tensor(m["loss"])) and m["kl_mean"] > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_lora_with_activation_checkpointing_in_bf16(tiny_models, tiny_world):
    cfg = _cfg(tiny_models, tiny_world, **LORA, dtype="bfloat16", gradient_checkpointing=True)
    student, teacher, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}  # adapter: float32
    frozen = {p.dtype for p in student.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the base: bf16, as the official run
    train_step(cfg, student, teacher, _batch(cfg, student, tok), V, sync=lambda: None)
    grads = [p.grad for n, p in trainable.items() if "lora_B" in n]
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)


def test_exact_sampler_has_no_mismatch_and_unit_is_weights(tiny_models, tiny_world):
    """The in-process hf sampler draws from the trained policy itself: log p_train equals the
    sampler's log-probs (to float32 rounding), so every IS weight is 1 and the loss equals the
    uncorrected one."""
    out = {}
    for corr in (False, True):
        cfg = _cfg(tiny_models, tiny_world, is_correction=corr)
        student, teacher, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
        batch = _batch(cfg, student, tok, logprobs=True)
        out[corr] = train_step(cfg, student, teacher, batch, V, sync=lambda: None)
    m = out[True]
    assert abs(m["logp_diff_mean"]) < 1e-5 and m["logp_absdiff_max"] < 1e-4
    assert m["mismatch_kl"] < 1e-8 and m["is_zeroed_frac"] == 0.0
    assert m["is_weight_min"] == pytest.approx(1.0, abs=1e-3) == m["is_weight_max"]
    assert m["loss"] == pytest.approx(out[False]["loss"], rel=1e-3)


def _padded(tok, path: Path) -> Path:
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok) + 5,  # 5 padding rows no token maps to
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return save_model(LlamaForCausalLM(cfg), tok, path)


def test_padded_teacher_rows_are_sliced(run_config, tmp_path, toy_tokenizer):
    teacher = _padded(toy_tokenizer, tmp_path / "padded_teacher")
    run = tmp_path / "run"
    main(["--config", str(run_config(teacher=str(teacher), max_steps=1)), "--out", str(run)])
    row = read_jsonl(run / "metrics.jsonl")[0]
    assert torch.isfinite(torch.tensor([row["train/loss"], row["estimator/kl_mean"]])).all()


def test_padded_student_rows_need_a_restricted_sampler(run_config, tmp_path, toy_tokenizer):
    student = _padded(toy_tokenizer, tmp_path / "padded_student")
    with pytest.raises(SystemExit, match="36 logit rows but only 31 are shared"):
        main(["--config", str(run_config(student=str(student))), "--out", str(tmp_path / "r")])


def test_chat_template_needs_a_template(run_config, tmp_path):
    with pytest.raises(SystemExit, match="has no chat template"):
        main(["--config", str(run_config(chat_template=True)), "--out", str(tmp_path / "r")])
