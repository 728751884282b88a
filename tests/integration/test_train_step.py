"""One OPD step with each estimator on tiny models, logit alignment against unpadded forwards,
and the hf rollout backend against teacher forcing."""

from __future__ import annotations

import pytest
import torch

from vopd.batch import completion_logits, make_batch
from vopd.config import TrainConfig
from vopd.estimators import ESTIMATORS
from vopd.rollout import SamplingParams
from vopd.rollout.hf import HFBackend
from vopd.trainer import build_optimizer, load_models, load_prompts, train_step

pytestmark = pytest.mark.integration
LORA = {"finetune": "lora", "lora_r": 4, "lora_alpha": 8}


def _cfg(tiny_models, tiny_world, **kw) -> TrainConfig:
    base = {
        "student": str(tiny_models["student"]),
        "teacher": str(tiny_models["teacher"]),
        "prompts": str(tiny_world / "prompts" / "train.parquet"),
        "top_k": 4,
        "prompts_per_step": 8,
        "max_new_tokens": 12,
        "lr": 1e-3,
    }
    return TrainConfig.from_dict({**base, **kw})


def _rollouts(student, tokenizer, prompts, n=1, seed=0, max_new_tokens=12):
    backend = HFBackend(student, tokenizer, batch_size=5)
    return backend.generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, n=n, seed=seed, logprobs=True)
    )


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_one_step_of_each_estimator(tiny_models, tiny_world, estimator):
    cfg = _cfg(tiny_models, tiny_world, estimator=estimator)
    student, teacher, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
    optimizer, _ = build_optimizer(cfg, student, total_steps=1)
    rollouts = _rollouts(student, tok, load_prompts(cfg)[:8])
    batch = make_batch(rollouts, tok.pad_token_id, "cpu")
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = train_step(cfg, student, teacher, batch, V, sync=lambda: None)
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    assert torch.isfinite(torch.tensor(m["loss"]))
    assert m["kl_mean"] > 0 and m["entropy"] > 0
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, s0[k])]
    assert changed, "no student parameter changed"
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())


def test_completion_logits_align_with_unpadded_forwards(tiny_models, tiny_world):
    """Position t of the batched, padded logits equals the logits that predict completion token
    t in a forward of that sequence alone (no padding, default positions)."""
    cfg = _cfg(tiny_models, tiny_world)
    student, _, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
    prompts = ["1+2=", "12+35+40=", "99*9-1="]  # different prompt lengths
    rollouts = _rollouts(student, tok, prompts, n=2, seed=3)
    assert len({len(c) for c in rollouts.completion_ids}) > 1 or any(rollouts.truncated)
    batch = make_batch(rollouts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits_BTV = completion_logits(student, batch, V)
        for b, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True)):
            alone = student(input_ids=torch.tensor([p + c])).logits[0]
            ref_TV = alone[len(p) - 1 : len(p) + len(c) - 1]
            torch.testing.assert_close(logits_BTV[b, : len(c)], ref_TV, atol=1e-5, rtol=1e-5)
            assert batch.mask_BT[b].sum() == len(c)
            assert batch.tokens_BT[b, : len(c)].tolist() == c


def test_hf_sampler_logprobs_equal_teacher_forced_logprobs(tiny_models, tiny_world):
    cfg = _cfg(tiny_models, tiny_world)
    student, _, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
    rollouts = _rollouts(student, tok, load_prompts(cfg)[:6], n=2, seed=1)
    batch = make_batch(rollouts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logp_BTV = completion_logits(student, batch, V).log_softmax(-1)
    logp_BT = logp_BTV.gather(-1, batch.tokens_BT[..., None])[..., 0]
    for b, lp in enumerate(rollouts.sampler_logprobs):
        torch.testing.assert_close(logp_BT[b, : len(lp)], torch.tensor(lp), atol=1e-4, rtol=1e-4)


def test_hf_backend_contract(tiny_models, toy_tokenizer):
    from vopd.models import load_model

    model = load_model(str(tiny_models["student"]))
    # a hub-style generation_config must not leak into sampling: top_k=1 would make it greedy
    model.generation_config.top_k = 1
    model.generation_config.do_sample = False
    backend = HFBackend(model, toy_tokenizer, batch_size=3)
    sp = SamplingParams(max_new_tokens=6, n=3, seed=5)
    r = backend.generate(["1+1=", "2+2="], sp)
    assert r.prompt_index == [0, 0, 0, 1, 1, 1]
    assert len(r) == 6 and r.sampler_logprobs is None
    assert len(set(map(tuple, r.completion_ids))) > 2, "samples look greedy: top_k leaked"
    assert model.generation_config.top_k == 1  # restored
    again = backend.generate(["1+1=", "2+2="], sp)
    assert again.completion_ids == r.completion_ids  # seeded
    torch.manual_seed(0)
    before = torch.get_rng_state()
    backend.generate(["1+1="], sp)
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is untouched
    eos = toy_tokenizer.eos_token_id
    for ids, trunc, text in zip(r.completion_ids, r.truncated, r.texts, strict=True):
        assert (ids[-1] == eos) != trunc  # EOS kept at the end, or truncated at the cap
        assert eos not in ids[:-1]
        assert trunc == (len(ids) == 6 and ids[-1] != eos)
        assert "<eos>" not in text
    greedy = backend.generate(["1+1="] * 2, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert greedy.completion_ids[0] == greedy.completion_ids[1]


def test_micro_batches_give_the_same_gradient(tiny_models, tiny_world):
    """token_mean and seq_mean over the whole batch, whatever the micro-batch size."""
    for normalize in ("token_mean", "seq_mean"):
        grads = []
        for micro in (0, 3):
            cfg = _cfg(tiny_models, tiny_world, micro_batch_size=micro, normalize=normalize)
            student, teacher, tok, V = load_models(cfg, cfg.student, torch.device("cpu"))
            rollouts = _rollouts(student, tok, load_prompts(cfg)[:8], seed=2)
            batch = make_batch(rollouts, tok.pad_token_id, "cpu")
            m = train_step(cfg, student, teacher, batch, V, sync=lambda: None)
            grads.append((m["loss"], torch.cat([p.grad.flatten() for p in student.parameters()])))
        assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "estimator,kw",
    [(name, {}) for name in sorted(ESTIMATORS)]
    + [
        ("vopd", {"normalize": "seq_mean", "micro_batch_size": 3, "is_correction": True}),
        ("vopd", {**LORA, "gradient_checkpointing": True}),
        ("full_opd", {"dtype": "bfloat16"}),  # autocast: the head computes in bf16 either way
    ],
)
def test_loss_from_hidden_gives_the_same_step(tiny_models, tiny_world, estimator, kw):
    """loss_from_hidden (no [B,T,V] logits anywhere) = the logits path: the loss, the
    diagnostics, the estimator's metrics and every parameter gradient of one step."""
    cfg = _cfg(tiny_models, tiny_world, estimator=estimator, **kw)
    student, _, tok, _ = load_models(cfg, cfg.student, torch.device("cpu"))
    batch = make_batch(_rollouts(student, tok, load_prompts(cfg)[:8], seed=2), tok.pad_token_id,
                       "cpu")  # fmt: skip
    steps = []
    for hidden in (False, True):
        cfg = _cfg(tiny_models, tiny_world, estimator=estimator, loss_from_hidden=hidden, **kw)
        student, teacher, _, V = load_models(cfg, cfg.student, torch.device("cpu"))
        m = train_step(cfg, student, teacher, batch, V, sync=lambda: None)
        assert all(p.grad is None for p in teacher.parameters())
        steps.append((m, {n: p.grad for n, p in student.named_parameters()}))
    (m_off, g_off), (m_on, g_on) = steps
    # float32: the same math in another order; bf16: logits rounded to 8 bits by both paths,
    # the hidden-state gradient once more after its chunk's scale (vopd.estimators.hidden).
    rel, atol = (3e-2, 3e-3) if kw.get("dtype") == "bfloat16" else (1e-5, 1e-6)
    for key in m_off:
        if not key.startswith("time_"):
            assert m_on[key] == pytest.approx(m_off[key], rel=rel, abs=atol), key
    assert set(g_on) == set(g_off)
    for name, g in g_off.items():
        if g is None:
            assert g_on[name] is None, name
            continue
        scale = float(g.abs().max())
        torch.testing.assert_close(g_on[name], g, rtol=10 * rel, atol=atol * scale, msg=name)
