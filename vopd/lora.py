"""LoRA through PEFT (the official setting) or full fine-tuning; adapter-only checkpoints.

    model = apply_lora(model, r=64, alpha=128, dropout=0.05)     # official configs/training
    save_adapter(model, "RUN/checkpoints/step20")                # adapter_config.json + weights
    model = load_for_eval("RUN/checkpoints/step20")              # base from adapter_config.json

Official settings (holi-lab/vOPD ``configs/training/default.yaml``, docs/method.md §2):
r = 64, α = 128 (scale α/r = 2), dropout 0.05, on the seven projection types q, k, v, o, gate,
up, down; no bias; the frozen base in bf16. TRL's ``disable_dropout=True`` then sets every
dropout probability to 0 (``minillm_trainer.py:229-231``), so the 0.05 is recorded in the
adapter config but inactive: ``apply_lora(..., disable_dropout=True)`` (the default) does the
same. That also keeps the trained policy equal to the sampled one (dropout would make the
trainer's log-probs differ from the sampler's).

PEFT keeps the adapter weights in float32 over a bf16 base (``autocast_adapter_dtype``), so
Adam's moments are float32. ``save_adapter`` writes only the adapter (``save_embedding_layers``
off: no base weight is ever copied); the base model is named by ``base_model_name_or_path`` in
``adapter_config.json`` (the student's hub id or path as given in the run config).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 64, 128, 0.05  # official configs/training/default.yaml
ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# Building


def apply_lora(
    model: nn.Module,
    *,
    r: int = LORA_R,
    alpha: float = LORA_ALPHA,
    dropout: float = LORA_DROPOUT,
    targets: tuple[str, ...] | list[str] = LORA_TARGETS,
    disable_dropout: bool = True,
    base_name_or_path: str | None = None,
):
    """Wrap ``model`` in a PEFT LoRA model: only the adapter matrices are trainable.

    Every name in ``targets`` must match at least one module (a typo would otherwise silently
    train fewer matrices). ``base_name_or_path`` is recorded in the adapter config (default: the
    model's own ``name_or_path``)."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"lora_r={r!r}: expected a positive integer")
    if not alpha > 0:
        raise ValueError(f"lora_alpha={alpha!r}: expected a positive number")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout={dropout!r}: expected a value in [0, 1)")
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing or not targets:
        raise ValueError(
            f"LoRA target module(s) {missing or list(targets)} not found in "
            f"{type(model).__name__}: expected names among its linear layers, e.g. "
            f"{sorted(n for n in leaves if n.endswith('proj'))[:8]}"
        )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        base_model_name_or_path=base_name_or_path or getattr(model, "name_or_path", None) or None,
    )
    peft_model = get_peft_model(model, config)
    if disable_dropout:
        set_dropout(peft_model, 0.0)
    return peft_model


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout probability to ``p``: ``nn.Dropout`` modules (as TRL's
    ``disable_dropout_in_model``) and the functional attention dropout that transformers'
    attention modules read from a float ``attention_dropout`` attribute (TRL leaves that one to
    the config; Qwen3's is 0 already). Returns how many were changed."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            n += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            n += 1
    return n


def is_lora(model) -> bool:
    """True for a PEFT-wrapped model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    return {"params_total": total, "params_trainable": trainable}


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_adapter(model, path: str | Path) -> Path:
    """Write only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if not is_lora(model):
        raise ValueError(f"{type(model).__name__} is not a PEFT model: nothing to save as adapter")
    path = Path(path)
    model.save_pretrained(str(path), save_embedding_layers=False)
    return path


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter was trained on (``base_model_name_or_path``)."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def adapter_rank(path: str | Path) -> int:
    return int(json.loads((Path(path) / ADAPTER_CONFIG).read_text())["r"])


def load_for_eval(
    path: str | Path,
    *,
    base: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    merge: bool = True,
):
    """A model for evaluation from a checkpoint: a full ``save_pretrained`` directory as is, or a
    LoRA adapter on its base (``base`` overrides the one recorded in the adapter). ``merge``
    folds the adapter into the weights (W + (α/r)·B·A) for plain-transformers speed."""
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(dtypes)}")
    if not is_adapter_dir(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtypes[dtype])
        return model.to(device).eval()
    from peft import PeftModel

    base_model = AutoModelForCausalLM.from_pretrained(
        base or adapter_base(path), dtype=dtypes[dtype]
    )
    model = PeftModel.from_pretrained(base_model, str(path), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    return model.to(device).eval()
