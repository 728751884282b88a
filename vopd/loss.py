"""The OPD loss on one rollout batch: one no-grad teacher forward and one student forward per
micro-batch, the estimator on the completion positions only, backward.

:func:`train_step` is the seam every scale shares (toy CPU, LoRA on GPUs, torchrun ranks): the
summed loss is the estimator's loss on the whole *global* rollout batch (``normalize``:
token_mean over all completion tokens, or seq_mean over sequences), whatever the micro-batch size
and the number of processes (:mod:`vopd.distributed`). The no-grad diagnostics ``kl_mean``,
``entropy`` and ``reward_mean`` are computed from the same logits with one definition for every
estimator (``vopd.estimators.row_stats``: chunked, no [B,T,V] log-softmax is materialised).
"""

from __future__ import annotations

import time

import torch

from vopd import distributed as dist
from vopd import is_correction, policy
from vopd.batch import RolloutBatch, completion_hidden, completion_logits
from vopd.config import TrainConfig
from vopd.estimators import ESTIMATORS, hidden_loss, row_stats
from vopd.estimators.hidden import hidden_row_stats, merge_metrics


def estimator_loss(
    estimator: str,
    options: dict,
    student_out,
    teacher_out,
    tokens_BT,
    weights_BT,
    *,
    from_hidden: bool = False,
):
    """The one place a loss is assembled (the trainer, the variance probe and the profiler call
    it): ``ESTIMATORS[estimator]`` on the completion positions, or ``hidden_loss`` on the
    (hidden_BTH, head_VH) pairs when ``from_hidden``, with the loss weights m' as the mask.

    The run's normalisation (``token_mean`` over the whole global batch, or ``seq_mean``) and the
    optional IS weight are already in m' (vopd.distributed.loss_weights), because only there can
    they span micro-batches and ranks; the estimator is therefore called with
    ``normalize="token_mean"`` on m', which with the scale of vopd.distributed.loss_scale gives
    exactly the configured mean. (An estimator's own ``seq_mean`` is for callers that pass a
    whole batch at once, e.g. ``ESTIMATORS[name](..., normalize="seq_mean")`` in user code.)"""
    options = {**options, "normalize": "token_mean"}
    if from_hidden:
        (s_hidden, s_head), (t_hidden, t_head) = student_out, teacher_out
        return hidden_loss(
            estimator, s_hidden, s_head, t_hidden, t_head, tokens_BT, weights_BT, **options
        )
    return ESTIMATORS[estimator](student_out, teacher_out, tokens_BT, weights_BT, **options)


def compute_loss(cfg: TrainConfig, student, teacher_logits_BTV, batch: RolloutBatch, V: int):
    """The estimator's loss on one (micro-)batch and its metrics, the no-grad diagnostics (KL,
    entropy, reward, log p(y)) from the same logits, and the loss weights m' it used as its mask
    (vopd.distributed.loss_weights: the normalisation times the optional IS weight).

    With ``cfg.loss_from_hidden`` the teacher comes as its (hidden_BTH, head_VH) pair
    (``completion_hidden``), the student's forward stops at its last hidden states, and the
    diagnostics and the loss are computed chunk by chunk from them (vopd.estimators.hidden): no
    [B,T,V]."""
    B, T = batch.tokens_BT.shape
    y_N = batch.tokens_BT.reshape(-1).masked_fill(batch.mask_BT.reshape(-1) == 0, 0)
    with policy.autocast(cfg, batch.tokens_BT.device):
        student_out = (completion_hidden if cfg.loss_from_hidden else completion_logits)(
            student, batch, V
        )
    if cfg.loss_from_hidden:  # the same row statistics, from hidden states (masked rows: 0)
        (s_hidden, s_head), (t_hidden, t_head) = student_out, teacher_logits_BTV
        st = hidden_row_stats(s_hidden.detach(), s_head.detach(), t_hidden, t_head,
                              batch.tokens_BT, batch.mask_BT, kl=True, entropy=True)  # fmt: skip
    else:
        st = row_stats(
            student_out.detach().reshape(-1, V),
            teacher_logits_BTV.reshape(-1, V),
            y_N,
            kl=True,
            entropy=True,
        )
    logp_BT = st["logp_y"].view(B, T)
    w_B = is_correction.step_weights(
        cfg.estimator, cfg.is_correction, logp_BT, batch.sampler_logp_BT, batch.mask_BT,
        cap=cfg.is_cap,
    )  # fmt: skip
    weights_BT = dist.loss_weights(batch.mask_BT, cfg.normalize, w_B)
    loss, metrics = estimator_loss(
        cfg.estimator, cfg.estimator_options(), student_out, teacher_logits_BTV,
        batch.tokens_BT, weights_BT, from_hidden=cfg.loss_from_hidden,
    )  # fmt: skip
    m_N = batch.mask_BT.reshape(-1).to(st["kl"].dtype)
    sums = {
        "kl_mean": float((st["kl"] * m_N).sum()),
        "entropy": float((st["entropy"] * m_N).sum()),
        "reward_mean": float(((st["logq_y"] - st["logp_y"]) * m_N).sum()),
    }
    return loss, metrics, sums, weights_BT, logp_BT


def train_step(cfg: TrainConfig, student, teacher, batch: RolloutBatch, V: int, sync) -> dict:
    """Forward/backward over micro-batches (and ranks); the summed loss is the estimator's loss on
    the whole global batch: each micro-batch's token-mean loss is scaled by Σm'/D, with D the
    token count (token_mean) or non-empty sequence count (seq_mean) summed over all ranks
    (vopd.distributed). Gradients are summed over ranks once, at the end."""
    B = batch.tokens_BT.shape[0]
    micro = cfg.micro_batch_size or B
    device = batch.tokens_BT.device
    denom = dist.global_sum(dist.local_denominator(batch.mask_BT, cfg.normalize), device)
    n_tok = max(dist.global_sum(float(batch.mask_BT.sum()), device), 1.0)
    out = {"loss": 0.0, "time_teacher_s": 0.0, "time_update_s": 0.0}
    sums = {"kl_mean": 0.0, "entropy": 0.0, "reward_mean": 0.0}
    parts, logp_parts = [], []
    for a in range(0, B, micro):
        mb = batch.rows(slice(a, a + micro))
        t0 = time.perf_counter()
        with torch.no_grad():  # the teacher's logits, or its (hidden, head) pair
            teacher_out = (completion_hidden if cfg.loss_from_hidden else completion_logits)(
                teacher, mb, V
            )
        sync()
        t1 = time.perf_counter()
        loss, metrics, mb_sums, weights_BT, logp_BT = compute_loss(cfg, student, teacher_out, mb, V)
        scale = dist.loss_scale(weights_BT, denom)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss.detach())}")
        (loss * scale).backward()
        sync()
        out["time_teacher_s"] += t1 - t0
        out["time_update_s"] += time.perf_counter() - t1
        out["loss"] += float(loss.detach()) * float(scale)
        for k, v in mb_sums.items():
            sums[k] += v
        parts.append((float(mb.mask_BT.sum()), metrics))
        logp_parts.append(logp_BT)
    dist.all_reduce_grads(student.parameters())
    out["loss"] = dist.global_sum(out["loss"], device)
    local = merge_metrics(parts)  # the estimator's own (adv_mean, adv_std, ...)
    if batch.sampler_logp_BT is not None:  # the train/inference mismatch (vopd.is_correction)
        local |= is_correction.mismatch_metrics(
            torch.cat(logp_parts), batch.sampler_logp_BT, batch.mask_BT, cap=cfg.is_cap
        )
    out.update(dist.reduce_metrics(local, float(batch.mask_BT.sum()), device))
    # kl_mean / entropy / reward_mean: one definition for every estimator, over all ranks
    out.update({k: dist.global_sum(v, device) / n_tok for k, v in sums.items()})
    return out
