"""Loading student and teacher: any causal LM by local directory or hub id, via the Auto classes.

The toy models (``python -m vopd.toy sft``) are saved with ``save_pretrained`` and load through
exactly this path, like hub models. The student/teacher vocabulary check lives in
:mod:`vopd.vocab`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name"


def resolve_model_path(name_or_path: str, *, marker: str | None = "config.json") -> str:
    """An existing local directory (holding ``marker``, if given), or something shaped like a hub
    id ("org/name"); anything else (a missing directory such as ``resources/toy/models/student``)
    is a ValueError."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists():
        if not path.is_dir() or (marker and not (path / marker).exists()):
            raise ValueError(
                f"model path {str(name_or_path)!r} exists but is not a save_pretrained directory "
                f"(no {marker})"
            )
        return str(path)
    if _HUB_ID.match(str(name_or_path)) and not str(name_or_path).startswith((".", "~")):
        return str(name_or_path)
    raise ValueError(
        f"model path {str(name_or_path)!r} does not exist (and is not a hub id like 'org/name')"
    )


def load_tokenizer(name_or_path: str):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, marker=None))
    if tokenizer.pad_token_id is None:  # many base-model tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, dtype: str = "float32", device: str | torch.device = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` on ``device``, dropout off."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=DTYPES[dtype]
    )
    return model.to(device)
