"""Every estimator straight from hidden states and head weights: no [B,T,V] logits of either model.

    from vopd.estimators import hidden_loss

    loss, metrics = hidden_loss("vopd", student_hidden_BTH, student_head_VH,
                                teacher_hidden_BTH, teacher_head_VH, tokens_BT, mask_BT)
    loss.backward()  # gradients reach student_hidden_BTH (and student_head_VH if it requires grad)

equals ``ESTIMATORS[name](student_hidden_BTH @ student_head_VH.T, teacher_hidden_BTH @
teacher_head_VH.T, tokens_BT, mask_BT, **options)`` in loss, metrics and gradients, for every
estimator of the registry, without ever holding a [B,T,V] tensor.

Why it is exact. Once the normalisation weights w_t are fixed (token_mean or seq_mean over the
whole batch, ``vopd.estimators``), every estimator's loss is a weighted sum of per-position terms,

    L = Σ_t w_t ℓ_t(z_t, u_t, y_t),      z_t = W_S h_t (student logits), u_t = W_T g_t (teacher),

so it splits over row chunks c with W_c = Σ_{t∈c} w_t:

    L = Σ_c W_c · E_name(z_c, u_c, y_c, mask = w_c, normalize = token_mean),

because the estimator's token mean over the chunk's weights is Σ_{t∈c} (w_t / W_c) ℓ_t. With
δ_t = ∂L/∂z_t the chunk's logit gradient (the estimator's own analytic backward on the chunk),

    ∂L/∂h_t = δ_t W_S,      ∂L/∂W_S = Σ_t δ_tᵀ h_t,      ∂L/∂(teacher) = 0.

How. Rows with zero weight are dropped. The forward walks chunks of ``chunk_rows`` live rows: the
chunk's logits of both models (one matmul each), the estimator and its backward on them, δ_c W_S
into the hidden-state gradient and δ_cᵀ h_c into the head gradient (accumulated in float32 for
half-precision heads); the chunk's logits are then freed. So each logits chunk is computed once,
and ``backward`` only scales the stored gradients by the incoming one. Peak memory above the
inputs: a few [chunk_rows, V] tensors, the [B, T, H] hidden-state gradient and, when the head
trains, its [V, H] gradient (which the logits path needs as well).

Metrics are the estimator's (weighted means over positions), merged over chunks with the mask's
weights as ``vopd.loss`` merges micro-batches (``x_std`` pooled with ``x_mean``). Under seq_mean
a chunk never mixes sequences whose weights differ, so every chunk's metrics weight its positions
exactly as the whole-batch call does.

Heads: logits must be ``hidden @ head.T`` (Qwen3, Llama, Mistral: a bias-free ``lm_head``, no
soft-cap or scaling). :func:`causal_lm_head` extracts the head of a ``transformers`` causal LM,
sliced to the shared vocabulary, and rejects heads with a bias or a logit soft-cap / scale;
:func:`check_head` compares the model's own logits with ``hidden @ head.T`` on a few tokens.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

# Elements of one [rows, V] logits chunk when ``chunk_rows`` is not given: 64 MiB of float32 on
# CPU (110 rows at V = 151,936), 256 MiB on a GPU (large enough for full-speed matmuls).
_CPU_CHUNK_ELEMENTS = 1 << 24
_GPU_CHUNK_ELEMENTS = 1 << 26

# transformers config attributes that put something other than ``hidden @ W.T`` between the last
# hidden state and the logits (Gemma 2/3 soft-cap, Cohere and Granite scales, muP multipliers).
UNSUPPORTED_HEAD_CONFIG = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier_scale",
    "mup_width_multiplier",
    "scale_width",
)
_NEUTRAL = (None, 1, 1.0, False)


def hidden_loss(
    name: str,
    student_hidden_BTH: Tensor,
    student_head_VH: Tensor,
    teacher_hidden_BTH: Tensor,
    teacher_head_VH: Tensor,
    tokens_BT: Tensor,
    mask_BT: Tensor,
    *,
    normalize: str = "token_mean",
    chunk_rows: int | None = None,
    **options,
) -> tuple[Tensor, dict[str, float]]:
    """``ESTIMATORS[name]`` on the logits z = h W_Sᵀ, u = g W_Tᵀ, computed ``chunk_rows`` rows at
    a time (see the module docstring for the chunk decomposition and its gradient).

    ``normalize`` and the estimator's options (``top_k``, ``reward_clip_lambda``,
    ``detach_reward``, ...) mean what they mean for the logits; ``chunk_rows`` is the number of
    positions per logits chunk (default: 64 MiB of float32 logits on CPU, 256 MiB on GPU).
    Gradients flow to ``student_hidden_BTH`` and, when it requires grad, to ``student_head_VH``;
    none to the teacher. Bad input raises the logits path's ``ValueError`` (shapes, vocabulary
    sizes, token ids, ``normalize``, ``top_k``, unknown options) before the chunks run."""
    from vopd.estimators import core as E

    if name not in E.ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}: expected one of {list(E.ESTIMATORS)}")
    fn = E.ESTIMATORS[name]
    _check_hidden(student_hidden_BTH, student_head_VH, teacher_hidden_BTH, teacher_head_VH)
    B, T, _ = student_hidden_BTH.shape
    V = student_head_VH.shape[0]
    # The logits path's own checks (tokens, mask, normalize), on a stand-in of the logits' shape,
    # dtype and device that holds no memory (a stride-0 view of one element).
    stand_in = student_hidden_BTH.new_empty(()).expand(B, T, V)
    m_BT = E._check(stand_in, stand_in, tokens_BT, mask_BT, normalize)
    w_N = E._weights(m_BT, normalize).reshape(-1)
    m_N = m_BT.reshape(-1)
    live_L = (m_N > 0).nonzero()[:, 0]
    rows = _rows(V, chunk_rows, student_hidden_BTH.device)

    h_NH = student_hidden_BTH.reshape(B * T, -1)
    g_NH = teacher_hidden_BTH.detach().reshape(B * T, -1)
    y_N = tokens_BT.reshape(-1).to(device=h_NH.device, dtype=torch.long)
    W_S, W_T = student_head_VH, teacher_head_VH.detach()
    need_h = torch.is_grad_enabled() and student_hidden_BTH.requires_grad
    need_w = torch.is_grad_enabled() and student_head_VH.requires_grad
    grad_h_NH = torch.zeros_like(h_NH) if need_h else None
    grad_w_VH = (
        torch.zeros(W_S.shape, dtype=E.acc_dtype(W_S.dtype), device=W_S.device) if need_w else None
    )

    # The logits are h @ W.T in the inputs' dtypes: an enclosing autocast is not applied (cast
    # the hidden states and head to the dtype the model's head computes in, as completion_hidden).
    def no_autocast():
        return torch.autocast(h_NH.device.type, enabled=False)

    def chunk(idx_r: Tensor, weights_r: Tensor, *, backward: bool):
        """The estimator on rows ``idx_r`` with mask ``weights_r`` (token_mean) and, with
        ``backward``, its logit gradient δ_r (else None)."""
        h_rH = h_NH.index_select(0, idx_r).detach()
        with torch.no_grad(), no_autocast():
            z_rV = h_rH @ W_S.detach().T
            u_rV = g_NH.index_select(0, idx_r) @ W_T.T
        z_rV.requires_grad_(backward)
        with torch.enable_grad(), no_autocast():
            loss, metrics = fn(
                z_rV[None],
                u_rV[None],
                y_N.index_select(0, idx_r)[None],
                weights_r[None],
                normalize="token_mean",
                **options,
            )
            delta_rV = None
            if backward and loss.requires_grad:
                (delta_rV,) = torch.autograd.grad(loss, z_rV)
        return loss.detach(), metrics, delta_rV, h_rH

    # A dry call on one position with weight 0 validates the options (top_k range, unknown names)
    # before any long work, and gives the metrics of an empty mask.
    row0 = torch.zeros(1, dtype=torch.long, device=h_NH.device)
    empty_loss, empty_metrics, _, _ = chunk(row0, m_N[:1] * 0, backward=False)
    if live_L.numel() == 0:  # nothing counts: loss 0, zero gradients
        return (
            _attach(empty_loss, student_hidden_BTH, student_head_VH, grad_h_NH, grad_w_VH),
            empty_metrics,
        )

    total = torch.zeros((), dtype=m_BT.dtype, device=m_BT.device)
    parts: list[tuple[float, dict]] = []
    # Under seq_mean w_t = m_t / (n_b B'): a chunk may span sequences of equal n_b only.
    key_N = m_BT.sum(-1, keepdim=True).expand(B, T).reshape(-1) if normalize == "seq_mean" else None
    for a, b in _chunk_plan(None if key_N is None else key_N[live_L], live_L.numel(), rows):
        idx_r = live_L[a:b]
        w_r = w_N.index_select(0, idx_r)
        share = w_r.sum()  # W_c
        loss, metrics, delta_rV, h_rH = chunk(idx_r, w_r, backward=need_h or need_w)
        total = total + share * loss
        parts.append((float(m_N.index_select(0, idx_r).sum()), metrics))
        if delta_rV is None:
            continue
        scale = float(share)
        with no_autocast():
            if need_h:
                grad_h_NH.index_copy_(0, idx_r, (delta_rV @ W_S.detach()).mul_(scale))
            if need_w:
                _add_head_grad(grad_w_VH, delta_rV, h_rH, scale)
        del delta_rV
    metrics = merge_metrics(parts)
    return _attach(total, student_hidden_BTH, student_head_VH, grad_h_NH, grad_w_VH), metrics


@torch.no_grad()
def hidden_row_stats(
    student_hidden_BTH: Tensor,
    student_head_VH: Tensor,
    teacher_hidden_BTH: Tensor,
    teacher_head_VH: Tensor,
    tokens_BT: Tensor,
    mask_BT: Tensor | None = None,
    *,
    chunk_rows: int | None = None,
    **kinds,
) -> dict[str, Tensor]:
    """``vopd.estimators.row_stats`` (``kinds``: kl, entropy, opt_baseline) of the logits
    h W_Sᵀ and g W_Tᵀ, [B·T] each, computed ``chunk_rows`` positions at a time without grad.
    Positions where ``mask_BT`` is 0 are skipped (their statistics read 0); pad ids are fine."""
    from vopd.estimators import core as E

    _check_hidden(student_hidden_BTH, student_head_VH, teacher_hidden_BTH, teacher_head_VH)
    B, T, _ = student_hidden_BTH.shape
    h_NH = student_hidden_BTH.reshape(B * T, -1)
    g_NH = teacher_hidden_BTH.reshape(B * T, -1)
    live_mask = torch.ones(B * T, dtype=torch.bool, device=h_NH.device)
    if mask_BT is not None:
        live_mask = mask_BT.reshape(-1).to(h_NH.device) > 0
    y_N = tokens_BT.reshape(-1).to(h_NH.device).long().masked_fill(~live_mask, 0)
    live_L = live_mask.nonzero()[:, 0]
    acc = E.acc_dtype(student_hidden_BTH.dtype)
    rows = _rows(student_head_VH.shape[0], chunk_rows, h_NH.device)
    out: dict[str, Tensor] = {}
    for a in range(0, live_L.numel(), rows):
        idx_r = live_L[a : a + rows]
        z_rV = h_NH.index_select(0, idx_r) @ student_head_VH.T
        u_rV = g_NH.index_select(0, idx_r) @ teacher_head_VH.T
        st = E.row_stats(z_rV, u_rV, y_N.index_select(0, idx_r), **kinds)
        for key, x_r in st.items():
            if key not in out:
                out[key] = torch.zeros(B * T, dtype=acc, device=h_NH.device)
            out[key].index_copy_(0, idx_r, x_r)
        del z_rV, u_rV
    if not out:  # nothing live: the names row_stats returns, all zero
        empty = h_NH.new_zeros(1, student_head_VH.shape[0])
        zero = torch.zeros(1, dtype=torch.long, device=h_NH.device)
        out = {k: torch.zeros(B * T, dtype=acc, device=h_NH.device)
               for k in E.row_stats(empty, empty, zero, **kinds)}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Pieces.


def _rows(V: int, chunk_rows: int | None, device: torch.device) -> int:
    if chunk_rows is None:
        budget = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS
        return max(1, budget // V)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows!r}: expected a positive row count or None")
    return chunk_rows


def _chunk_plan(key_L: Tensor | None, L: int, rows: int) -> list[tuple[int, int]]:
    """Chunks [a, b) of the L live rows, at most ``rows`` long, that never cross a change of
    ``key_L`` (None: no constraint). With the key n_b under seq_mean, w_t / m_t is one number
    inside a chunk, so the estimator's weights there are proportional to the mask's and its
    metrics weight positions as the whole-batch call does."""
    cuts = [] if key_L is None else ((key_L[1:] != key_L[:-1]).nonzero()[:, 0] + 1).tolist()
    bounds = [0, *cuts, L]
    return [
        (s, min(s + rows, hi)) for lo, hi in itertools.pairwise(bounds) for s in range(lo, hi, rows)
    ]


def _add_head_grad(grad_VH: Tensor, delta_rV: Tensor, h_rH: Tensor, scale: float) -> None:
    """grad_VH += scale · δᵀ h, accumulated in grad_VH's dtype (float32 for half heads)."""
    if delta_rV.dtype == grad_VH.dtype:
        grad_VH.addmm_(delta_rV.T, h_rH, alpha=scale)
        return
    if grad_VH.is_cuda:  # cuBLAS: half inputs, float32 accumulation and output, no casts
        try:
            torch.addmm(grad_VH, delta_rV.T, h_rH, alpha=scale, out_dtype=grad_VH.dtype,
                        out=grad_VH)  # fmt: skip
            return
        except (RuntimeError, TypeError):
            pass
    grad_VH.addmm_(delta_rV.T.to(grad_VH.dtype), h_rH.to(grad_VH.dtype), alpha=scale)


class _Precomputed(torch.autograd.Function):
    """The loss, with gradients computed in the forward: backward scales them by the incoming
    gradient (in place, so the [V, H] head gradient is never copied); one backward only."""

    @staticmethod
    def forward(ctx, loss, hidden_BTH, head_VH, grad_hidden_BTH, grad_head_VH):
        ctx.grads = [grad_hidden_BTH, grad_head_VH]
        ctx.dtypes = (hidden_BTH.dtype, head_VH.dtype)
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "hidden_loss: backward ran twice through one result; its gradients were "
                "computed in the forward and are handed out once (call hidden_loss again)"
            )
        out = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes, strict=True):
            if grad is not None:
                if float(grad_loss) != 1.0:
                    grad.mul_(grad_loss.to(grad.dtype))
                grad = grad.to(dtype)
            out.append(grad)
        ctx.grads = None
        return None, *out, None, None


def _attach(loss, hidden_BTH, head_VH, grad_h_NH, grad_w_VH) -> Tensor:
    if grad_h_NH is None and grad_w_VH is None:
        return loss
    grad_h = None if grad_h_NH is None else grad_h_NH.view(hidden_BTH.shape)
    return _Precomputed.apply(loss, hidden_BTH, head_VH, grad_h, grad_w_VH)


def merge_metrics(parts: list[tuple[float, dict]]) -> dict:
    """Weighted means of per-part metrics (weights: the parts' mask sums); ``x_std`` is pooled
    with ``x_mean``: std² = Σ w (std_c² + (mean_c − mean)²) / Σ w, the same pooled variance as
    ``vopd.loss``'s Σ w (std_c² + mean_c²) / Σ w − mean² without its cancellation (a constant
    x of 0.7 gave std 7e-9 instead of 0 in float64)."""
    total = sum(w for w, _ in parts) or 1.0
    merged = {}
    for key in parts[0][1]:
        mean_key = key[:-4] + "_mean"
        if key.endswith("_std") and mean_key in parts[0][1]:
            mean = sum(w * m[mean_key] for w, m in parts) / total
            var = sum(w * (m[key] ** 2 + (m[mean_key] - mean) ** 2) for w, m in parts) / total
            merged[key] = math.sqrt(var)
        else:
            merged[key] = sum(w * m[key] for w, m in parts) / total
    return merged


def _check_hidden(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor) -> None:
    """Shapes and dtypes of the hidden states and heads; the message names what was expected."""
    for who, h, w in (("student", h_s, w_s), ("teacher", h_t, w_t)):
        if h.dim() != 3:
            raise ValueError(
                f"{who}_hidden_BTH has shape {tuple(h.shape)}: expected [B, T, H] (the last "
                "hidden states of the positions that predict tokens_BT)"
            )
        if w.dim() != 2:
            raise ValueError(f"{who}_head_VH has shape {tuple(w.shape)}: expected [V, H]")
        if w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{who}_head_VH has shape {tuple(w.shape)}: expected [V, {h.shape[-1]}] "
                f"(hidden size H = {h.shape[-1]} of {who}_hidden_BTH)"
            )
        if w.dtype != h.dtype:
            raise ValueError(
                f"{who}_hidden_BTH is {h.dtype} but {who}_head_VH is {w.dtype}: expected one "
                "dtype (the dtype the model's head computes its logits in)"
            )
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(
            f"student vocabulary size {w_s.shape[0]} != teacher vocabulary size {w_t.shape[0]}: "
            "slice both heads to the shared vocabulary first (causal_lm_head(model, rows))"
        )
    if h_t.shape[:2] != h_s.shape[:2]:
        raise ValueError(
            f"teacher_hidden_BTH has shape {tuple(h_t.shape)}: expected "
            f"{(*h_s.shape[:2], h_t.shape[-1])} (the student's B, T)"
        )


# ---------------------------------------------------------------------------------------------
# transformers causal LMs: the head, and a check that logits really are hidden @ head.T.


def causal_lm_head(model, rows: int | None = None) -> Tensor:
    """The [V, H] weight of a causal LM's output head, its first ``rows`` rows (the shared
    vocabulary, as ``vopd.vocab.slice_logits`` slices logits; a view, gradients reach it).

    Raises ``ValueError`` for heads whose logits are not ``hidden @ weight.T``: a bias, or a
    config with a logit soft-cap / scale (``UNSUPPORTED_HEAD_CONFIG``). Works through PEFT
    wrappers (``get_output_embeddings`` is the base model's)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"output head {type(head).__name__} has no [V, H] weight: the hidden-state loss "
            "needs logits = hidden @ weight.T (use loss_from_hidden: false)"
        )
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            f"output head {type(head).__name__} has a bias: the hidden-state loss supports "
            "bias-free heads (Qwen3, Llama); use loss_from_hidden: false for this model"
        )
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in UNSUPPORTED_HEAD_CONFIG:
            value = getattr(cfg, key, None) if cfg is not None else None
            if value not in _NEUTRAL:
                raise ValueError(
                    f"model config sets {key}={value!r}: its logits are not hidden @ head.T "
                    "(a soft-cap or scale); use loss_from_hidden: false for this model"
                )
    if rows is not None:
        if rows > weight.shape[0]:
            raise ValueError(f"cannot slice {weight.shape[0]} head rows to {rows}")
        weight = weight[:rows]
    return weight


def decoder_hidden(model, **inputs) -> Tensor:
    """Last hidden states [B, L, H] (after the final norm) from the model's decoder stack alone:
    the causal LM's forward without its head (``get_decoder``; through PEFT wrappers too)."""
    out = model.get_decoder()(**inputs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def check_head(model, input_ids: Tensor, *, rtol: float = 1e-3, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` unless the model's logits equal ``decoder_hidden @ head.T`` on
    ``input_ids`` (a few tokens): catches any head transform the config check cannot name."""
    head = causal_lm_head(model)
    logits = model(input_ids=input_ids, use_cache=False).logits
    hidden = decoder_hidden(model, input_ids=input_ids)
    ours = hidden.to(head.dtype) @ head.T
    ref = logits[..., : head.shape[0]].to(ours.dtype)
    scale = float(ref.abs().max()) or 1.0
    gap = float((ours - ref).abs().max())
    if gap > atol * scale + rtol * scale:
        raise ValueError(
            f"{type(model).__name__}: logits differ from last hidden state @ head.T by {gap:.3g} "
            f"(logit scale {scale:.3g}): its head is not a plain projection; use "
            "loss_from_hidden: false for this model"
        )
