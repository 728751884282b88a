"""Rollout backends: one protocol, several engines (transformers ``generate``; vLLM on GPU or CPU).

The trainer (``vopd.train``) and the evaluator (``vopd.eval.generate``) see only this protocol.
Backends are imported lazily by :func:`get_backend`, so CPU installs never import vLLM.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Official training rollouts: T = 1.0, top_p = 1.0, top_k off, 2048 tokens
    (docs/method.md §2); official evaluation: T = 0.6, n = 8, 4096 tokens (math top_p 1.0;
    MCQ top_p 0.95, top_k 20)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): off
    max_new_tokens: int = 2048
    n: int = 1  # samples per prompt
    seed: int | None = None
    logprobs: bool = False  # keep the sampler's log-probs of the sampled tokens

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature={self.temperature}: expected a finite value >= 0 (0 = greedy)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}, n={self.n}: expected >= 1")


@dataclass
class Rollouts:
    """``n`` completions per prompt, flattened prompt-major: sequence i answers prompt
    ``prompt_index[i]``. Token ids exclude padding; the completion ends with EOS when the model
    stopped (EOS is kept: it is a sampled action) and ``truncated`` is True when it hit the cap."""

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    sampler_logprobs: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts: ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from ``model``'s current weights (a no-op for in-process hf)."""
        ...


_BACKENDS = {"hf": "vopd.rollout.hf:HFBackend", "vllm": "vopd.rollout.vllm:VLLMBackend"}


def get_backend(name: str, **kwargs) -> RolloutBackend:
    """Build a backend by name (``hf`` or ``vllm``); the module is imported only now."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}: expected one of {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
