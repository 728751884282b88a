"""The run configuration of ``python -m vopd.train``: one frozen dataclass, the single source of
defaults.

    cfg = load_config("config/train/toy.yaml", ["estimator=vopd_topk", "seed=1"])
    python -m vopd.config resolve --config config/train/toy.yaml --out run/config.yaml [k=v ...]

(the command line is ``vopd/config/__main__.py``; this module is the library)

Defaults reproduce the official code where it has a setting (holi-lab/vOPD
``configs/training/default.yaml`` + TRL v1.2.0 defaults, read in docs/method.md §2):
lr 1e-5 cosine, no warm-up, no weight decay, AdamW (0.9, 0.999, 1e-8), grad-norm clip 1.0,
256 prompts x 1 rollout per step, one epoch, T = 1.0 / top_p 1 / top-k off, 2048 completion
tokens, checkpoints every 20 steps, seed 42, ``kl_top_k: 100``. Loading rejects unknown keys
(naming the key and the nearest known one), values of the wrong type or out of range, and NaN or
infinite values of every float key (range checks alone are False for NaN).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from vopd import catalog
from vopd.catalog import NORMALIZE

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adam")
BACKENDS = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
FINETUNE = ("full", "lora")


@dataclass(frozen=True)
class TrainConfig:
    # --- models and data ----------------------------------------------------------------------
    student: str
    """Student: a save_pretrained directory or a hub id. It is the policy being trained."""
    teacher: str
    """Teacher: a save_pretrained directory or a hub id, frozen, same tokenizer as the student."""
    prompts: str
    """Parquet file of training prompts (already formatted model inputs)."""
    prompt_column: str = "prompt"
    """Column of ``prompts`` that holds the model input text."""

    # --- estimator (vopd.estimators) ----------------------------------------------------------
    estimator: str = "vopd"
    """An estimator of vopd.catalog (vopd.estimators.ESTIMATORS)."""
    top_k: int = 100
    """Top-k support of vopd_topk / topk_opd (official vopd-topk.yaml kl_top_k: 100); must be
    below the vocabulary size. Ignored by the other estimators, so one config can serve all."""
    reward_clip_lambda: float | None = None
    """sample_opd only: floor the reward at ln λ/(1 − λ) (official commit c77a078); None = off."""
    detach_reward: bool = True
    """sample_opd only: False reproduces the released undetached advantage (implicit +1)."""
    clamp: float | None = None
    """k3_loss only: clamp the k3 value to [−c, c] (verl low_var_kl uses 10); None = off."""
    advantage: float = -1.0
    """const_adv only: the constant advantage c (the null baseline; −1 by default)."""
    normalize: str = "token_mean"
    """token_mean: mean over all completion tokens of the step's rollout batch (official TRL
    "dapo"); seq_mean: mean of per-sequence token means."""
    loss_from_hidden: bool = False
    """Compute the loss from both models' last hidden states and head weights, chunk by chunk
    (vopd.estimators.hidden.hidden_loss): same loss and gradients, no [B, T, V] logits (on in
    small/paper; the toy keeps logits, faster at V = 31). Needs bias-free, unscaled heads
    (Qwen3, Llama)."""

    # --- rollouts -----------------------------------------------------------------------------
    prompts_per_step: int = 256
    """Prompts per optimizer step (official: 1 per device x GA 64 x 4 processes)."""
    samples_per_prompt: int = 1
    """Rollouts per prompt (official num_generations: 1)."""
    temperature: float = 1.0
    """Rollout sampling temperature (official 1.0: unbiased on-policy samples)."""
    top_p: float = 1.0
    """Rollout nucleus sampling (official 1.0 = off)."""
    sampling_top_k: int = -1
    """Rollout top-k sampling (official -1 = off). Not the estimator's ``top_k``."""
    max_new_tokens: int = 2048
    """Completion length cap (official max_completion_length); truncated rollouts are kept."""
    rollout_backend: str = "hf"
    """Rollout engine: hf (transformers generate) or vllm."""
    rollout_batch_size: int = 64
    """Sequences per generate call of the hf backend."""

    # --- optimisation -------------------------------------------------------------------------
    optimizer: str = "adamw"
    """adamw or adam (official: AdamW, weight decay 0)."""
    lr: float = 1e-5
    """Peak learning rate (official 1e-5)."""
    lr_schedule: str = "cosine"
    """constant, cosine (to 0 at max_steps; official) or linear (to 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps (official 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay (official 0)."""
    adam_beta1: float = 0.9
    """Adam β1 (HF default)."""
    adam_beta2: float = 0.999
    """Adam β2 (HF default)."""
    adam_eps: float = 1e-8
    """Adam ε (HF default)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (official HF default 1.0)."""
    max_steps: int = -1
    """Optimizer steps; -1 = one epoch over the prompts (official num_train_epochs: 1)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward (gradient accumulation); 0 = the whole rollout batch.
    The loss stays the exact mean over the whole batch either way."""

    # --- scale-out: policy, vLLM, IS correction (vopd.policy, vopd.rollout.vllm) -----------
    finetune: str = "full"
    """full (every weight trains) or lora (PEFT adapters on the frozen base; official)."""
    lora_r: int = 64
    """LoRA rank (official 64)."""
    lora_alpha: float = 128.0
    """LoRA α; the adapter's update is scaled by α/r (official 128)."""
    lora_dropout: float = 0.05
    """LoRA dropout recorded in the adapter (official 0.05); zeroed in training like every
    dropout (TRL disable_dropout)."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated module names that get adapters (official: all seven projections)."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in backward (official: on)."""
    chat_template: bool = False
    """Wrap each prompt in the student tokenizer's chat template, thinking off (official: off)."""
    vllm_gpu_memory_utilization: float = 0.6
    """Fraction of the GPU the colocated vLLM engine may take (official 0.6). Not used on the
    vLLM CPU backend, where a fraction would be of the machine's RAM: see vllm_kv_cache_gib."""
    vllm_kv_cache_gib: float | None = None
    """The vLLM engine's KV cache in GiB, instead of a fraction; null: the fraction on a GPU,
    1 GiB on the vLLM CPU backend (vopd.rollout.vllm.engine_settings)."""
    is_correction: bool = False
    """Multiply each sequence's policy-gradient loss by exp(Σ_t log p_train − log p_sampler),
    zeroed above ``is_cap`` (TRL's vLLM default: on); exact estimators are not weighted."""
    is_cap: float = 3.0
    """IS weights above this are set to 0 (TRL vllm_importance_sampling_cap 3)."""

    # --- run ----------------------------------------------------------------------------------
    seed: int = 42
    """Seed of initialisation-free randomness: prompt order and rollout sampling (official 42)."""
    save_every: int = 20
    """Checkpoint every N steps (and at the end); step0 is the initial student (official 20)."""
    dtype: str = "float32"
    """Weights and compute dtype of both models: float32, bfloat16 or float16."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda if available)."""

    def __post_init__(self):
        _check_types(self)
        _choice("estimator", self.estimator, tuple(catalog.names()))
        _choice("normalize", self.normalize, NORMALIZE)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("rollout_backend", self.rollout_backend, BACKENDS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("finetune", self.finetune, FINETUNE)
        for name in ("student", "teacher", "prompts", "prompt_column"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a non-empty string")
        _range("top_k", self.top_k, lo=1)
        _range("prompts_per_step", self.prompts_per_step, lo=1)
        _range("samples_per_prompt", self.samples_per_prompt, lo=1)
        _range("max_new_tokens", self.max_new_tokens, lo=1)
        _range("rollout_batch_size", self.rollout_batch_size, lo=1)
        _range("warmup_steps", self.warmup_steps, lo=0)
        _range("micro_batch_size", self.micro_batch_size, lo=0)
        _range("save_every", self.save_every, lo=1)
        _range("seed", self.seed, lo=0)
        _range("lr", self.lr, lo=0, lo_open=True)
        _range("weight_decay", self.weight_decay, lo=0)
        _range("adam_beta1", self.adam_beta1, lo=0, hi=1, hi_open=True)
        _range("adam_beta2", self.adam_beta2, lo=0, hi=1, hi_open=True)
        _range("adam_eps", self.adam_eps, lo=0, lo_open=True)
        _range("max_grad_norm", self.max_grad_norm, lo=0, lo_open=True)
        _range("lora_r", self.lora_r, lo=1)
        _range("lora_alpha", self.lora_alpha, lo=0, lo_open=True)
        _range("lora_dropout", self.lora_dropout, lo=0, hi=1, hi_open=True)
        _range("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, lo=0, hi=1,
               lo_open=True)  # fmt: skip
        if self.vllm_kv_cache_gib is not None:
            _range("vllm_kv_cache_gib", self.vllm_kv_cache_gib, lo=0, lo_open=True)
        _range("is_cap", self.is_cap, lo=0, lo_open=True)
        if not any(t.strip() for t in self.lora_targets.split(",")):
            raise ValueError(
                f"lora_targets={self.lora_targets!r}: expected module names, e.g. q_proj"
            )
        _range("temperature", self.temperature, lo=0, lo_open=True)  # OPD samples: T > 0
        _range("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        if self.sampling_top_k == 0 or self.sampling_top_k < -1:
            raise ValueError(f"sampling_top_k={self.sampling_top_k}: expected -1 (off) or >= 1")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: expected -1 (one epoch) or >= 1")
        if self.reward_clip_lambda is not None:
            _range("reward_clip_lambda", self.reward_clip_lambda, lo=0, hi=1, lo_open=True,
                   hi_open=True)  # fmt: skip
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        # Every estimator option is range-checked once, by its catalog declaration.
        for name, option in catalog.OPTIONS.items():
            option.check(getattr(self, name))
        # An option the chosen estimator does not read would silently do nothing: reject it.
        # (top_k is exempt: one config serves both top-k estimators and the others.)
        reads = catalog.get(self.estimator).reads
        for name in catalog.OPTIONS:
            default = _FIELDS[name].default
            if name != "top_k" and getattr(self, name) != default and name not in reads:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} has no effect with estimator "
                    f"{self.estimator!r} (it reads {sorted(reads)})"
                )

    def estimator_options(self) -> dict:
        """Exactly the options the chosen estimator reads (its vopd.catalog entry)."""
        return {k: getattr(self, k) for k in sorted(catalog.get(self.estimator).reads)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a mapping of key: value, got {type(raw).__name__}")
        for key in raw:
            if key not in _FIELDS:
                near = _OFFICIAL_NAMES.get(key) or next(
                    iter(difflib.get_close_matches(str(key), list(_FIELDS), n=1)), None
                )
                hint = f" (did you mean {near!r}?)" if near else ""
                raise ValueError(
                    f"unknown config key {key!r}{hint}: expected one of {list(_FIELDS)}"
                )
        missing = [k for k, f in _FIELDS.items() if _required(f) and k not in raw]
        if missing:
            raise ValueError(f"missing required config key(s) {missing}")
        return cls(**raw)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Names the official configs / TRL use for our keys: suggested when someone types them.
_OFFICIAL_NAMES = {
    "learning_rate": "lr",
    "kl_top_k": "top_k",
    "opd_top_k": "top_k",
    "num_generations": "samples_per_prompt",
    "max_completion_length": "max_new_tokens",
    "lr_scheduler_type": "lr_schedule",
    "distill_mode": "estimator",
    "seed_everything": "seed",
    "save_steps": "save_every",
}


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# ---------------------------------------------------------------------------------------------
# Checks.


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {list(allowed)}")


def _range(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{name}={value!r}: expected a value in {left}{lo_s}, {hi_s}{right}")


def _check_types(cfg: TrainConfig) -> None:
    """Coerce YAML/CLI values to the annotated types (int -> float, '1e-5' -> 1e-5) and reject
    anything else, naming the key; a float key must be finite (``.nan``, ``inf`` and ``1e999``
    are rejected here, before any range check, which NaN would pass)."""
    hints = typing.get_type_hints(TrainConfig)
    for name in _FIELDS:
        value, hint = getattr(cfg, name), hints[name]
        allowed = typing.get_args(hint) or (hint,)
        if value is None and type(None) in allowed:
            continue
        base = next(t for t in allowed if t is not type(None))
        ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
        if not ok and base is float and not isinstance(value, bool):
            try:
                value, ok = float(value), True  # YAML 1.1 reads 1e-5 as a string
            except (TypeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(
                f"{name}={getattr(cfg, name)!r}: expected {base.__name__}"
                + (" or null" if type(None) in allowed else "")
            )
        if base is float and not math.isfinite(value):
            raise ValueError(
                f"{name}={getattr(cfg, name)!r}: expected a value in (-inf, inf), a finite number"
            )
        object.__setattr__(cfg, name, value)


# ---------------------------------------------------------------------------------------------
# Loading.


def parse_overrides(overrides: list[str]) -> dict:
    """``["lr=1e-4", "reward_clip_lambda=null"]`` -> {"lr": "1e-4" as float later, ...}: values
    are read as YAML scalars."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file (may be None) updated by ``key=value`` overrides, validated."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(path)!r}: expected a mapping of key: value")
    return TrainConfig.from_dict({**raw, **parse_overrides(overrides or [])})


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
