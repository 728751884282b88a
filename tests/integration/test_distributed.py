"""Two gloo processes give the same gradient as one process on the same batch, through the
trainer's own step (``vopd.train.train_step``), and a 2-process ``torchrun`` run works end to end.

Five rollouts of different prompt and completion lengths are split unevenly (3 + 2) across two
CPU ranks, and each rank accumulates over micro-batches of 2 (rank 0 runs 2 + 1). The reference
is one process on the whole batch, computed without the trainer's normalisation code: the
estimator called on all five sequences with its own normalisation, or, with per-sequence IS
weights, the policy-gradient formula written out with autograd. Models run in float64, so the
gradients agree to ~1e-12 (checked at 1e-9); a per-rank mean (what a naive DDP loop computes)
is also shown to differ, so the test can fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from vopd.batch import completion_logits, make_batch
from vopd.config import TrainConfig
from vopd.estimators import ESTIMATORS
from vopd.rollout import Rollouts

pytestmark = pytest.mark.integration

V = 19
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14], [15, 16, 17, 18, 1, 2]]
COMPLETIONS = [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13], [14, 15, 16], [17, 18, 2, 3, 4]]
IS_SHIFT = [0.02, -0.05, 0.01, 0.3, -0.1]  # log p_train − log p_sampler per token, per sequence
CASES = [  # (estimator, normalize, IS correction)
    ("vopd", "token_mean", False),
    ("vopd", "seq_mean", False),
    ("sample_opd", "token_mean", False),
    ("full_opd", "seq_mean", False),
    ("vopd", "token_mean", True),
    ("vopd", "seq_mean", True),
    ("full_opd", "token_mean", True),  # the exact estimators are never IS-weighted
]


def models():
    """Student and teacher: float64 tiny Llamas (the same on every rank: seeded)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).double().train(), LlamaForCausalLM(cfg).double().eval()


def rollouts(student, rows) -> Rollouts:
    """The rollouts ``rows`` with sampler log-probs = teacher-forced log p − IS_SHIFT[b]."""
    batch = make_batch(
        Rollouts(list(rows), [PROMPTS[i] for i in rows], [COMPLETIONS[i] for i in rows], [], []),
        0,
        "cpu",
    )
    with torch.no_grad():
        lp = completion_logits(student, batch, V).log_softmax(-1)
    lp_BT = lp.gather(-1, batch.tokens_BT[..., None])[..., 0]
    sampler = [(lp_BT[j, : len(COMPLETIONS[i])] - IS_SHIFT[i]).tolist() for j, i in enumerate(rows)]
    return Rollouts(
        list(rows),
        [PROMPTS[i] for i in rows],
        [COMPLETIONS[i] for i in rows],
        [""] * len(rows),
        [False] * len(rows),
        sampler,
    )


def config(estimator, normalize, is_corr, micro=0) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "student": "unused",
            "teacher": "unused",
            "prompts": "unused",
            "estimator": estimator,
            "normalize": normalize,
            "is_correction": is_corr,
            "micro_batch_size": micro,
        }
    )


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
    from vopd.trainer import train_step

    info, device = D.init("cpu")
    assert (info.rank, info.world_size, device.type) == (rank, world, "cpu")
    student, teacher = models()
    start, stop = D.shard_bounds(len(PROMPTS), rank, world)
    batch = make_batch(rollouts(student, range(start, stop)), 0, "cpu")
    out = {}
    for case in CASES:
        student.zero_grad(set_to_none=True)
        m = train_step(config(*case, micro=2), student, teacher, batch, V, sync=lambda: None)
        grads = {k: p.grad.clone() for k, p in student.named_parameters()}
        out[case] = (grads, m)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    D.shutdown()


def reference(estimator: str, normalize: str, is_corr: bool):
    """One process, all five sequences, no trainer code: (gradients, loss value)."""
    student, teacher = models()
    batch = make_batch(rollouts(student, range(len(PROMPTS))), 0, "cpu")
    s = completion_logits(student, batch, V)
    with torch.no_grad():
        t = completion_logits(teacher, batch, V)
    y, mask = batch.tokens_BT, batch.mask_BT.double()
    if not is_corr or estimator != "vopd":
        loss, _ = ESTIMATORS[estimator](s, t, y, mask, normalize=normalize)
    else:  # −Σ_b w_b Σ_t c_bt sg[r_t + KL_t] ∇log p(y_t), w_b = exp(Σ_t shift_b) (shift < ln 3)
        w_B = torch.tensor(
            [len(c) * d for c, d in zip(COMPLETIONS, IS_SHIFT, strict=True)], dtype=torch.float64
        ).exp()
        lp, lq = s.log_softmax(-1), t.log_softmax(-1)
        lp_y, lq_y = lp.gather(-1, y[..., None])[..., 0], lq.gather(-1, y[..., None])[..., 0]
        adv = (lq_y - lp_y + (lp.exp() * (lp - lq)).sum(-1)).detach()
        n_B = mask.sum(-1, keepdim=True)
        c = mask / mask.sum() if normalize == "token_mean" else mask / n_B / len(n_B)
        surrogate = -(w_B[:, None] * c * adv * lp_y).sum()
        loss = (w_B[:, None] * c * (lp_y - lq_y)).sum().detach() + surrogate - surrogate.detach()
    loss.backward()
    return {k: p.grad.clone() for k, p in student.named_parameters()}, float(loss.detach())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_the_split_is_uneven():
    from vopd.distributed import shard_bounds

    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert sum(map(len, COMPLETIONS[:3])) != sum(map(len, COMPLETIONS[3:]))  # 11 vs 8 tokens


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_processes_equal_one(two_ranks, case):
    ref, ref_loss = reference(*case)
    (g0, m0), (g1, m1) = two_ranks[0][case], two_ranks[1][case]
    for k, r in ref.items():
        assert torch.equal(g0[k], g1[k]), k  # every rank holds the same summed gradient
        assert torch.allclose(g0[k], r, rtol=1e-9, atol=1e-13), (k, float((g0[k] - r).abs().max()))
    assert max(float(r.abs().max()) for r in ref.values()) > 1e-4  # a real, non-zero gradient
    assert m0["loss"] == pytest.approx(ref_loss, rel=1e-9)
    same = [k for k in m0 if not k.startswith("time_")]  # timings are each rank's own
    assert {k: m0[k] for k in same} == {k: m1[k] for k in same}  # metrics reduced over ranks
    if case[2]:  # the mismatch metrics see the synthetic sampler: d_t = IS_SHIFT[b] per token
        n = sum(map(len, COMPLETIONS))
        expected = sum(len(c) * d for c, d in zip(COMPLETIONS, IS_SHIFT, strict=True)) / n
        assert m0["logp_diff_mean"] == pytest.approx(expected, rel=1e-6)
        assert m0["logp_absdiff_max"] == pytest.approx(0.3, rel=1e-6)


def test_a_per_rank_mean_would_differ(two_ranks):
    """What a naive DDP loop computes (the mean of per-rank token means) is not the global token
    mean for this split, so the equality above is not automatic."""
    student, teacher = models()
    for rows in (range(0, 3), range(3, 5)):
        batch = make_batch(rollouts(student, rows), 0, "cpu")
        with torch.no_grad():
            t = completion_logits(teacher, batch, V)
        s = completion_logits(student, batch, V)
        loss, _ = ESTIMATORS["vopd"](s, t, batch.tokens_BT, batch.mask_BT)
        (loss / 2).backward()
    ref = two_ranks[0][("vopd", "token_mean", False)][0]
    assert max(float((p.grad - ref[k]).abs().max()) for k, p in student.named_parameters()) > 1e-6


# ---------------------------------------------------------------------------------------------
# End to end: torchrun, 2 CPU processes, LoRA, the hf backend, the IS correction on.


def test_torchrun_two_processes_lora(run_config, tmp_path):
    cfg_path = run_config(
        finetune="lora", lora_r=4, lora_alpha=8, is_correction=True, max_steps=2, save_every=1
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*launcher, "-m", "vopd.train", "--config", str(cfg_path), "--out", str(out)]
    cmd.append("--no-progress")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    finals = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(finals) == 1 and finals[0]["steps"] == 2  # rank 0 alone prints
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one row per step, not one per rank
    assert rows[0]["train/num_tokens"] > 0 and rows[0]["estimator/is_weight_mean"] > 0
    step2 = out / "checkpoints" / "step2"
    assert (step2 / "adapter_config.json").is_file() and not (step2 / "model.safetensors").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["finetune"] == "lora"
