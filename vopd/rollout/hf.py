"""Rollouts with transformers ``generate``: the CPU (and fallback GPU) backend of the protocol in
:mod:`vopd.rollout`.

    backend = HFBackend(model, tokenizer, batch_size=64)
    rollouts = backend.generate(["12+35+40="], SamplingParams(temperature=1.0, max_new_tokens=40))

Choices that matter for on-policy distillation:

- Sampling is exactly what ``SamplingParams`` asks for. The model's own ``generation_config``
  (hub files often set ``top_k=20``, ``min_p``, a repetition penalty, ...) and transformers' global
  default ``top_k=50`` are kept out: ``top_k=-1`` really means "off". Only the model's EOS/BOS/pad
  ids are taken from it.
- Prompts are left-padded, so every completion starts at the same column; the position ids
  generate derives from the attention mask equal those of the trainer's teacher-forced forward.
- EOS is kept at the end of a completion (it is a sampled action that the loss must see); a
  completion that hits ``max_new_tokens`` without EOS is flagged ``truncated``.
- ``seed`` makes a call reproducible without touching the caller's RNG (``fork_rng``).
- ``logprobs=True`` keeps log-softmax of the *processed* scores (after temperature / top-k /
  top-p): the log-probability of each sampled token under the distribution it was drawn from.
- A small Llama on CPU (the toy models) is sampled by :mod:`vopd.rollout.lean`, a decode loop
  that computes exactly what ``generate`` computes (the same tokens and scores, bit for bit) in
  about half the CPU time; every other model uses ``generate``.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from vopd.rollout import Rollouts, SamplingParams, lean


class HFBackend:
    """In-process sampler over a transformers causal LM; batches of ``batch_size`` sequences."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, device=None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: cannot pad batches")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else model.device

    def sync_weights(self, model) -> None:
        """The in-process model *is* the policy: nothing to copy. A different object is adopted."""
        self.model = model

    # -----------------------------------------------------------------------------------------

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        own = getattr(self.model, "generation_config", None)
        eos = getattr(own, "eos_token_id", None)
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
        greedy = sampling.temperature == 0
        return GenerationConfig(
            bos_token_id=getattr(own, "bos_token_id", None),
            eos_token_id=eos,
            pad_token_id=pad,
            do_sample=not greedy,
            # greedy: leave the sampling knobs unset (transformers warns about unused ones)
            temperature=None if greedy else sampling.temperature,
            top_k=None if greedy else max(sampling.top_k, 0),  # 0 switches top-k off
            top_p=None if greedy else sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            num_beams=1,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=sampling.logprobs,
        )

    def _eos_ids(self, config: GenerationConfig) -> set[int]:
        eos = config.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams) -> Rollouts:
        """``sampling.n`` completions per prompt, prompt-major (see :class:`Rollouts`)."""
        config = self._generation_config(sampling)
        eos_ids = self._eos_ids(config)
        encoded = self.tokenizer(list(prompts))["input_ids"]
        order = [i for i in range(len(prompts)) for _ in range(sampling.n)]
        out = Rollouts([], [], [], [], [], [] if sampling.logprobs else None)
        was_training = self.model.training
        own_config = self.model.generation_config
        self.model.eval()
        # A clean config: the model's generation_config.json must not change the sampler.
        self.model.generation_config = GenerationConfig(**config.to_dict())
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(order), self.batch_size):
                    self._generate_batch(
                        [encoded[i] for i in order[start : start + self.batch_size]],
                        config,
                        eos_ids,
                        out,
                    )
        finally:
            self.model.generation_config = own_config
            self.model.train(was_training)
        out.prompt_index = order
        return out

    def _generate_batch(self, ids: list[list[int]], config, eos_ids: set[int], out: Rollouts):
        P = max(len(x) for x in ids)
        input_BP = torch.full((len(ids), P), config.pad_token_id, dtype=torch.long)
        attn_BP = torch.zeros((len(ids), P), dtype=torch.long)
        for b, x in enumerate(ids):  # left padding
            input_BP[b, P - len(x) :] = torch.tensor(x)
            attn_BP[b, P - len(x) :] = 1
        input_BP, attn_BP = input_BP.to(self.device), attn_BP.to(self.device)
        lean_out = None
        if lean.supported(self.model, config):  # the same tokens in less CPU time
            lean_out = lean.lean_generate(self.model, input_BP, attn_BP, config)
        if lean_out is not None:
            sequences, scores = lean_out
        else:  # not a lean model, or its cache was not what the lean loop reads
            res = self.model.generate(
                input_ids=input_BP, attention_mask=attn_BP, generation_config=config
            )
            sequences, scores = res.sequences, res.scores
        completion_BT = sequences[:, P:].cpu()
        logprob_BT = None
        if config.output_scores and completion_BT.shape[1]:
            scores_BTV = torch.stack(scores, 1).float().log_softmax(-1).cpu()
            logprob_BT = scores_BTV.gather(-1, completion_BT[..., None])[..., 0]
        for b, x in enumerate(ids):
            row = completion_BT[b].tolist()
            stop = next((t + 1 for t, tok in enumerate(row) if tok in eos_ids), None)
            comp = row if stop is None else row[:stop]
            out.prompt_ids.append(list(x))
            out.completion_ids.append(comp)
            out.texts.append(self.tokenizer.decode(comp, skip_special_tokens=True))
            out.truncated.append(stop is None)
            if out.sampler_logprobs is not None:
                out.sampler_logprobs.append(
                    logprob_BT[b, : len(comp)].tolist() if logprob_BT is not None else []
                )
