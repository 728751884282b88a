"""Two gloo processes give the same gradient as one process on the same batch.

Five sequences of different prompt and completion lengths are split unevenly (3 + 2) across two
CPU ranks, and each rank accumulates over micro-batches of 2 (so rank 0 runs 2 + 1). The global
denominator (token count or non-empty sequence count) is summed over ranks, every micro-batch
loss is scaled by Σm'/D (``vopd.distributed``), and gradients are summed once per step. The
reference is one process on the whole batch: the estimator with its own normalisation, or, with
per-sequence IS weights, the policy-gradient formula written out in float64 autograd.
Everything runs in float64, so agreement is to ~1e-12.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.integration

V = 19
PROMPTS = [3, 5, 2, 4, 6]  # prompt lengths
COMPLETIONS = [4, 1, 6, 3, 5]  # completion lengths: the token counts differ per sequence
IS_LOGP_SHIFT = [0.02, -0.05, 0.01, 0.3, -0.1]  # per-sequence sampler perturbation (IS cases)
CASES = [  # (estimator, normalize, IS weights)
    ("vopd", "token_mean", False),
    ("vopd", "seq_mean", False),
    ("sample_opd", "token_mean", False),
    ("full_opd", "token_mean", False),
    ("vopd", "token_mean", True),
    ("vopd", "seq_mean", True),
]


def build(seed: int = 0):
    """Student, teacher (float64 tiny Llamas) and the padded batch: ids_BL, attn_BL, mask_BT."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    student = LlamaForCausalLM(cfg).double()
    teacher = LlamaForCausalLM(cfg).double().eval()
    L = max(p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True))
    ids = torch.zeros(len(PROMPTS), L, dtype=torch.long)
    attn = torch.zeros(len(PROMPTS), L, dtype=torch.long)
    comp = torch.zeros(len(PROMPTS), L, dtype=torch.float64)
    for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        ids[b, : p + c] = torch.randint(1, V, (p + c,))
        attn[b, : p + c] = 1
        comp[b, p : p + c] = 1.0
    return student, teacher, ids, attn, comp[:, 1:]  # position t predicts ids[:, t + 1]


def logits(model, ids, attn):
    return model(input_ids=ids, attention_mask=attn).logits[:, :-1]


def is_weights(student, ids, attn, mask, rows):
    """IS weights from a synthetic sampler: log p_sampler = log p_train − shift_b per token."""
    from vopd.estimators import token_logprobs
    from vopd.is_correction import sequence_is_weights

    with torch.no_grad():
        lp = token_logprobs(logits(student, ids, attn), ids[:, 1:])
    shift = torch.tensor([IS_LOGP_SHIFT[i] for i in rows], dtype=torch.float64)
    return sequence_is_weights(lp, lp - shift[:, None], mask)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from vopd import distributed as D
    from vopd.estimators import ESTIMATORS

    info, device = D.init("cpu")
    assert (info.rank, info.world_size, device.type) == (rank, world, "cpu")
    student, teacher, ids, attn, mask = build()
    start, stop = D.shard_bounds(len(PROMPTS), rank, world)
    out = {}
    for name, normalize, use_is in CASES:
        student.zero_grad(set_to_none=True)
        micro = [(a, min(a + 2, stop)) for a in range(start, stop, 2)]
        denom = D.global_sum(sum(D.local_denominator(mask[a:b], normalize) for a, b in micro))
        for a, b in micro:
            w_B = (
                is_weights(student, ids[a:b], attn[a:b], mask[a:b], range(a, b)) if use_is else None
            )
            weights = D.loss_weights(mask[a:b], normalize, w_B)
            with torch.no_grad():
                t = logits(teacher, ids[a:b], attn[a:b])
            loss, _ = ESTIMATORS[name](
                logits(student, ids[a:b], attn[a:b]), t, ids[a:b, 1:], weights
            )
            (loss * D.loss_scale(weights, denom)).backward()
        D.all_reduce_grads(student.parameters())
        out[(name, normalize, use_is)] = {k: p.grad.clone() for k, p in student.named_parameters()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    D.shutdown()


def reference(name: str, normalize: str, use_is: bool) -> dict[str, torch.Tensor]:
    """One process, the whole batch."""
    from vopd.estimators import ESTIMATORS

    student, teacher, ids, attn, mask = build()
    s = logits(student, ids, attn)
    with torch.no_grad():
        t = logits(teacher, ids, attn)
    y = ids[:, 1:]
    if not use_is:
        loss, _ = ESTIMATORS[name](s, t, y, mask, normalize=normalize)
    else:  # −Σ_b w_b Σ_t c_bt sg[r_t + KL_t] log p(y_t), written out (vopd only)
        assert name == "vopd"
        w_B = is_weights(student, ids, attn, mask, range(len(PROMPTS)))
        lp, lq = s.log_softmax(-1), t.log_softmax(-1)
        lp_y = lp.gather(-1, y[..., None])[..., 0]
        adv = (lq.gather(-1, y[..., None])[..., 0] - lp_y + (lp.exp() * (lp - lq)).sum(-1)).detach()
        n_B = mask.sum(-1)
        c = mask / mask.sum() if normalize == "token_mean" else mask / n_B[:, None] / len(n_B)
        loss = -(w_B[:, None] * c * adv * lp_y).sum()
    loss.backward()
    return {k: p.grad.clone() for k, p in student.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_shards_are_uneven():
    from vopd.distributed import shard_bounds

    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    # token counts per rank differ (3 sequences vs 2): a per-rank mean would be wrong
    assert sum(COMPLETIONS[:3]) != sum(COMPLETIONS[3:])


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_processes_equal_one(two_rank_grads, case):
    ref = reference(*case)
    g0, g1 = two_rank_grads[0][case], two_rank_grads[1][case]
    for k, r in ref.items():
        assert torch.equal(g0[k], g1[k]), k  # every rank ends with the same summed gradient
        assert torch.allclose(g0[k], r, rtol=1e-9, atol=1e-13), (k, float((g0[k] - r).abs().max()))
    assert max(float(r.abs().max()) for r in ref.values()) > 1e-4  # a real, non-zero gradient


def test_a_per_rank_mean_would_differ(two_rank_grads):
    """Sanity check of the test itself: averaging per-rank token means (what a naive DDP loop does)
    gives a different gradient for this uneven split."""
    from vopd.estimators import ESTIMATORS

    student, teacher, ids, attn, mask = build()
    for a, b in [(0, 3), (3, 5)]:
        with torch.no_grad():
            t = logits(teacher, ids[a:b], attn[a:b])
        loss, _ = ESTIMATORS["vopd"](
            logits(student, ids[a:b], attn[a:b]), t, ids[a:b, 1:], mask[a:b]
        )
        (loss / 2).backward()
    ref = two_rank_grads[0][("vopd", "token_mean", False)]
    diff = max(float((p.grad - ref[k]).abs().max()) for k, p in student.named_parameters())
    assert diff > 1e-6
