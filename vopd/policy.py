"""The trained policy at scale: LoRA or full fine-tuning, precision, activation checkpointing, and
the rollout engine that samples it. The trainer (``vopd.train``) calls these four functions;
the CPU toy path (full fine-tuning, float32, hf backend) goes through them unchanged.

Precision (official: bf16 + LoRA, docs/method.md §2):

- **LoRA**: the frozen base in ``dtype`` (bf16 at scale), the adapter in float32 (PEFT's
  ``autocast_adapter_dtype``), so Adam updates float32 numbers.
- **Full fine-tuning** with ``dtype`` bf16/fp16: the student's weights stay float32 (the master
  copy Adam updates) and its forward runs under ``torch.autocast`` in ``dtype``; a bf16 weight
  could not hold a 1e-5-scale update (bf16 has 8 bits of mantissa). The teacher is loaded in
  ``dtype`` directly (it is never updated).

Dropout is off in both cases (TRL ``disable_dropout``; ``vopd.lora.set_dropout`` also zeroes the
functional attention dropout), so the policy the trainer differentiates is the one that samples.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vopd import lora
from vopd.rollout import RolloutBackend, get_backend
from vopd.vocab import logit_rows


def student_dtype(cfg) -> str:
    """The dtype to load the student's weights in (float32 master weights for full FT)."""
    return "float32" if cfg.finetune == "full" else cfg.dtype


def autocast(cfg, device: torch.device):
    """The context the student's forward runs in: autocast to ``cfg.dtype`` when the weights are
    a float32 master copy of a lower-precision run, else nothing."""
    if cfg.finetune == "full" and cfg.dtype != "float32":
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def prepare_student(cfg, model, *, adapter: str | Path | None = None):
    """LoRA (a new adapter, or the trainable ``adapter`` checkpoint when resuming) or full
    fine-tuning; dropout off; activation checkpointing when asked. Returns the trained module."""
    if cfg.finetune == "lora":
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        else:  # A's random init is a function of the seed (B starts at 0), caller's RNG kept
            cuda = list(range(torch.cuda.device_count()))
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(cfg.seed)
                model = lora.apply_lora(
                    model,
                    r=cfg.lora_r,
                    alpha=cfg.lora_alpha,
                    dropout=cfg.lora_dropout,
                    targets=lora_targets(cfg),
                    base_name_or_path=cfg.student,
                )
    lora.set_dropout(model, 0.0)  # official TRL disable_dropout=True
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing needs no input gradients (the embeddings may be frozen);
        # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def lora_targets(cfg) -> tuple[str, ...]:
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def make_backend(cfg, student, tokenizer, V: int) -> RolloutBackend:
    """The rollout engine of ``cfg.rollout_backend``: hf samples the in-process student itself;
    vllm runs a colocated engine on the student's base weights and is synced every step. When
    the student has logit rows beyond the shared vocabulary ``V``, vLLM may not sample them.
    Without CUDA the engine runs on vLLM's CPU backend with its CPU defaults (float32 follows
    ``cfg.dtype``, eager mode, a fixed-size KV cache: ``vopd.rollout.vllm.engine_settings``)."""
    if cfg.rollout_backend == "hf":
        if logit_rows(student) > V:
            raise ValueError(
                f"the student has {logit_rows(student)} logit rows but only {V} are shared with "
                "the teacher: the hf backend cannot keep sampling inside the shared vocabulary; "
                "use rollout_backend=vllm (it restricts the sampler) or a teacher with as many rows"
            )
        return get_backend(
            "hf", model=student, tokenizer=tokenizer, batch_size=cfg.rollout_batch_size
        )
    return get_backend(
        "vllm",
        model=cfg.student,
        tokenizer=tokenizer,
        dtype=cfg.dtype,
        colocate=True,
        # a fraction of the GPU; on the vLLM CPU backend (no CUDA) the engine's own CPU default
        # (a KV cache of vllm_kv_cache_gib, 1 GiB when unset) leaves the RAM to the trainer
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization
        if torch.cuda.is_available()
        else None,
        kv_cache_gib=cfg.vllm_kv_cache_gib,
        enable_lora=cfg.finetune == "lora",
        max_lora_rank=cfg.lora_r,
        seed=cfg.seed,
        sampler_limit=V if logit_rows(student) > V else None,
    )
