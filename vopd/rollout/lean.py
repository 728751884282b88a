"""A lean sampling loop for small Llama models on CPU: the same tokens as transformers ``generate``
at about half its CPU time.

For the toy model (0.5M parameters, 3 layers) most of a ``generate`` step is Python: the generic
generation loop (input preparation, stopping criteria, output bookkeeping) and the module,
decorator and mask-building layers around each decoder forward. :func:`lean_generate` runs the
prefill through the model's own forward (a ``DynamicCache``, exactly as ``generate`` does) and
then decodes with the same tensor operations in the same order (``F.linear``, the RMSNorm and
rotary formulas of ``modeling_llama``, ``scaled_dot_product_attention`` over the cached keys with
the padding mask, the logits processors of transformers itself, ``softmax`` + ``multinomial`` or
``argmax``, finished rows padded): every token and every processed score equals ``generate``'s
bit for bit (``tests/unit/test_rollout_lean.py`` compares them, sampled and greedy, with
temperature, top-k and top-p, left padding, early EOS). Measured on the toy model, batch 64, one
thread: 2.5 ms of CPU per decode step instead of 4-5 ms.

Used by :class:`vopd.rollout.hf.HFBackend` only where it is exact by construction
(:func:`supported`: a plain float32 ``LlamaForCausalLM`` on CPU in eval mode, SDPA attention,
default RoPE, no biases, SiLU MLP, as many key/value heads as query heads); anything else
(another architecture or dtype, a PEFT wrapper, a GPU, ``VOPD_LEAN_GENERATE=0``) keeps
``generate``.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# the forward's KV-cache argument: ``cache`` in transformers 5.24, ``past_key_values`` in 5.19
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model) -> str | None:
    """The name under which the model's forward takes its KV cache (``cache`` in transformers
    5.24, ``past_key_values`` in 5.19), found in its signature; None when it takes neither."""
    params = inspect.signature(type(model).forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), None)


def supported(model, config: GenerationConfig) -> bool:
    """True where :func:`lean_generate` computes exactly what ``model.generate`` would."""
    if os.environ.get("VOPD_LEAN_GENERATE", "1") == "0":
        return False
    if type(model).__name__ != "LlamaForCausalLM" or model.training:
        return False
    if cache_kwarg(model) is None:  # a transformers whose cache API this loop does not know
        return False
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (
        model.device.type == "cpu"
        and model.dtype == torch.float32  # what the equality tests cover
        and getattr(c, "_attn_implementation", None) == "sdpa"
        and rope.get("rope_type", "default") == "default"
        and not c.attention_bias
        and not c.mlp_bias
        and c.hidden_act == "silu"
        and c.num_key_value_heads == c.num_attention_heads
        and head_dim * c.num_attention_heads == c.hidden_size
        and config.num_beams == 1
        and not config.output_logits
        # the only processors the hf backend's configs can ask for (see processors())
        and config.repetition_penalty in (None, 1.0)
        and config.min_p is None
        and (config.min_new_tokens in (None, 0))
    )


def processors(config: GenerationConfig) -> LogitsProcessorList:
    """The logits warpers ``generate`` builds for a sampling config, in its order
    (``GenerationMixin._get_logits_processor``): temperature, top-k, top-p."""
    out = LogitsProcessorList()
    if not config.do_sample:
        return out
    if config.temperature is not None and config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        out.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return out


def _rms(x, weight, eps):
    """LlamaRMSNorm.forward."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Weights:
    """The tensors of a LlamaForCausalLM that one decode step reads."""

    def __init__(self, model):
        c = model.config
        self.heads = c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.eps = c.rms_norm_eps
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        self.head = model.lm_head.weight
        self.inv_freq = model.model.rotary_emb.inv_freq
        self.rope_scale = model.model.rotary_emb.attention_scaling
        self.layers = [
            (
                layer.input_layernorm.weight,
                layer.self_attn.q_proj.weight,
                layer.self_attn.k_proj.weight,
                layer.self_attn.v_proj.weight,
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
                layer.mlp.down_proj.weight,
            )
            for layer in model.model.layers
        ]


def _decode(w: _Weights, tokens_B1, positions_B1, mask_B11S, keys, values):
    """One decoder forward of the new tokens over the cache (``keys``/``values`` per layer,
    extended in place as DynamicCache extends them); logits [B, V] of the last position."""
    B = tokens_B1.shape[0]
    H, D = w.heads, w.head_dim
    # LlamaRotaryEmbedding.forward
    freqs = positions_B1[..., None].float() * w.inv_freq.to(device=tokens_B1.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * w.rope_scale).to(w.embed.dtype)[:, None]
    sin = (emb.sin() * w.rope_scale).to(w.embed.dtype)[:, None]
    h = F.embedding(tokens_B1, w.embed)
    for i, (ln1, wq, wk, wv, wo, ln2, wg, wu, wd) in enumerate(w.layers):
        x = _rms(h, ln1, w.eps)
        q = F.linear(x, wq).view(B, 1, H, D).transpose(1, 2)
        k = F.linear(x, wk).view(B, 1, H, D).transpose(1, 2)
        v = F.linear(x, wv).view(B, 1, H, D).transpose(1, 2)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        keys[i] = torch.cat([keys[i], k], dim=-2)
        values[i] = torch.cat([values[i], v], dim=-2)
        o = F.scaled_dot_product_attention(
            q, keys[i], values[i], attn_mask=mask_B11S, dropout_p=0.0, scale=w.scaling
        )
        o = o.transpose(1, 2).contiguous().reshape(B, 1, -1).contiguous()
        h = h + F.linear(o, wo)
        x = _rms(h, ln2, w.eps)
        h = h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    h = _rms(h, w.norm, w.eps)
    return F.linear(h[:, -1:], w.head)[:, -1]


@torch.no_grad()
def lean_generate(model, input_BP, attn_BP, config: GenerationConfig):
    """(sequences [B, P + T], processed scores per step or None) as ``model.generate(input_ids,
    attention_mask, generation_config=config)`` returns them (``.sequences``, ``.scores``); None
    when the prefill did not fill the cache as this loop reads it (per layer ``keys``/``values``
    [B, heads, P, head_dim]): then nothing was sampled and the caller uses ``generate``."""
    B = input_BP.shape[0]
    eos = config.eos_token_id
    eos_T = torch.tensor(eos if isinstance(eos, list) else [eos], device=input_BP.device)
    pad = config.pad_token_id
    procs = processors(config)
    w = _Weights(model)
    # the prefill: the model's own forward, as generate runs it (positions from the mask)
    pos_BP = attn_BP.long().cumsum(-1) - 1
    pos_BP = pos_BP.masked_fill(attn_BP == 0, 1)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_BP,
        attention_mask=attn_BP,
        position_ids=pos_BP,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): cache},
    )
    layers = getattr(cache, "layers", None) or []
    keys = [getattr(layer, "keys", None) for layer in layers]
    values = [getattr(layer, "values", None) for layer in layers]
    want = (B, w.heads, input_BP.shape[1], w.head_dim)
    if len(keys) != len(w.layers) or any(
        not isinstance(t, torch.Tensor) or tuple(t.shape) != want for t in (*keys, *values)
    ):
        return None  # another cache layout: never decode on a cache read wrongly
    logits_BV = out.logits[:, -1].to(copy=True, dtype=torch.float32)
    del out
    mask_BS = attn_BP.bool()
    pos_B1 = pos_BP[:, -1:]
    seq_BL = input_BP
    unfinished_B = torch.ones(B, dtype=torch.long, device=input_BP.device)
    scores = [] if config.output_scores else None
    for t in range(config.max_new_tokens):
        scores_BV = procs(seq_BL, logits_BV)
        if scores is not None:
            scores.append(scores_BV)
        if config.do_sample:
            next_B = torch.multinomial(F.softmax(scores_BV, dim=-1), num_samples=1).squeeze(1)
        else:
            next_B = torch.argmax(scores_BV, dim=-1)
        next_B = next_B * unfinished_B + pad * (1 - unfinished_B)
        seq_BL = torch.cat([seq_BL, next_B[:, None]], dim=-1)
        unfinished_B = unfinished_B & ~torch.isin(next_B, eos_T)
        if t + 1 == config.max_new_tokens or unfinished_B.max() == 0:
            break
        mask_BS = torch.cat([mask_BS, mask_BS.new_ones(B, 1)], dim=-1)
        pos_B1 = pos_B1 + 1
        logits_BV = _decode(w, next_B[:, None], pos_B1, mask_BS[:, None, None, :], keys, values)
        logits_BV = logits_BV.to(copy=True, dtype=torch.float32)
    return seq_BL, scores
