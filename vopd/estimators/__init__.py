"""On-policy distillation gradient estimators: the math (``core``) and the same estimators
computed from hidden states and head weights without [B,T,V] logits (``hidden``).

    loss, metrics = ESTIMATORS[name](student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT,
                                     **options)
    loss, metrics = hidden_loss(name, student_hidden_BTH, student_head_VH, teacher_hidden_BTH,
                                teacher_head_VH, tokens_BT, mask_BT, **options)

What each estimator is (family, advantage, options) lives in :mod:`vopd.catalog`;
docs/estimators.md has the table.
"""

from vopd.estimators.core import (
    DEFAULT_TOP_K,
    ESTIMATOR_OPTIONS,
    ESTIMATORS,
    NORMALIZE,
    acc_dtype,
    advantage_stats,
    const_adv,
    estimator_fn,
    forward_kl_topk,
    full_opd,
    k1_loss,
    k2_loss,
    k3_loss,
    opt_baseline,
    reverse_kl_full,
    reverse_kl_topk,
    row_stats,
    sample_opd,
    token_logprobs,
    topk_ids,
    topk_opd,
    vopd,
    vopd_topk,
)
from vopd.estimators.hidden import causal_lm_head, check_head, hidden_loss, hidden_row_stats

__all__ = [
    "DEFAULT_TOP_K",
    "ESTIMATORS",
    "ESTIMATOR_OPTIONS",
    "NORMALIZE",
    "acc_dtype",
    "advantage_stats",
    "causal_lm_head",
    "check_head",
    "const_adv",
    "estimator_fn",
    "forward_kl_topk",
    "full_opd",
    "hidden_loss",
    "hidden_row_stats",
    "k1_loss",
    "k2_loss",
    "k3_loss",
    "opt_baseline",
    "reverse_kl_full",
    "reverse_kl_topk",
    "row_stats",
    "sample_opd",
    "token_logprobs",
    "topk_ids",
    "topk_opd",
    "vopd",
    "vopd_topk",
]
