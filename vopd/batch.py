"""Teacher-forcing batches built from rollouts, and logits on completion positions only.

Shared by the trainer (:mod:`vopd.train`) and anything that re-scores rollouts (variance
probes, profilers): the same layout and alignment everywhere.

Layout: prompts left-padded, completions right-padded, so every completion starts at column P
and one ``logits_to_keep=T`` forward gives [B, T, V] logits whose position t predicts completion
token t. Position ids are ``cumsum(attention_mask) − 1``, what ``generate`` uses under left
padding, so re-scored log-probs equal the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vopd.estimators.hidden import causal_lm_head, decoder_hidden
from vopd.is_correction import sampler_logprobs_tensor
from vopd.rollout import Rollouts


@dataclass
class RolloutBatch:
    """Teacher-forcing inputs for a batch of rollouts: prompts left-padded, completions
    right-padded, so every completion starts at column P. ``input_ids_BL`` is prompt +
    completion minus its last column (L = P + T − 1); the last T positions' logits predict
    ``tokens_BT``."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    tokens_BT: torch.Tensor
    mask_BT: torch.Tensor
    sampler_logp_BT: torch.Tensor | None = None  # the sampler's log p(y_t), when it returned it

    def rows(self, sl: slice) -> RolloutBatch:
        return RolloutBatch(
            *(None if (x := getattr(self, f)) is None else x[sl] for f in self.__dataclass_fields__)
        )


def make_batch(rollouts: Rollouts, pad_id: int, device) -> RolloutBatch:
    B = len(rollouts)
    P = max(len(p) for p in rollouts.prompt_ids)
    T = max(len(c) for c in rollouts.completion_ids)
    ids_BS = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn_BS = torch.zeros((B, P + T), dtype=torch.long)
    for b, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)):
        ids_BS[b, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attn_BS[b, P - len(p) : P + len(c)] = 1
    pos_BS = (attn_BS.cumsum(-1) - 1).clamp_min(0)  # what generate uses under left padding
    sampler_BT = None
    if rollouts.sampler_logprobs is not None:
        lengths = [len(c) for c in rollouts.completion_ids]
        sampler_BT = sampler_logprobs_tensor(rollouts.sampler_logprobs, lengths, T).to(device)
    return RolloutBatch(
        ids_BS[:, :-1].to(device),
        attn_BS[:, :-1].to(device),
        pos_BS[:, :-1].to(device),
        ids_BS[:, P:].to(device),
        attn_BS[:, P:].to(device),
        sampler_BT,
    )


def completion_logits(model, batch: RolloutBatch, V: int) -> torch.Tensor:
    """[B, T, V] logits where position t predicts ``batch.tokens_BT[:, t]``; ``logits_to_keep``
    projects only the last T hidden states (prompt positions never reach the LM head)."""
    out = model(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        logits_to_keep=batch.tokens_BT.shape[1],
        use_cache=False,
    )
    return out.logits[..., :V]  # padded logit rows beyond the shared vocabulary are dropped


def completion_hidden(model, batch: RolloutBatch, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logits`` without the head: the [B, T, H] last hidden states whose projection
    predicts ``batch.tokens_BT[:, t]`` and the [V, H] head weight sliced to the shared vocabulary,
    for ``vopd.estimators.hidden.hidden_loss`` (logits = hidden @ head.T, never materialised). Under
    autocast both come in the autocast dtype, the dtype the head would compute the logits in."""
    hidden_BLH = decoder_hidden(
        model,
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
    )
    hidden_BTH = hidden_BLH[:, -batch.tokens_BT.shape[1] :]
    head_VH = causal_lm_head(model, V)  # padded head rows beyond the shared vocabulary dropped
    device = hidden_BTH.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden_BTH, head_VH = hidden_BTH.to(dtype), head_VH.to(dtype)
    return hidden_BTH, head_VH
