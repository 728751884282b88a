"""Toy SFT pieces: completion-only labels, the teacher-forced exact-match metric against real
greedy decoding (on a tiny model overfit to a few problems), and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from vopd.toy.sft import encode_examples, exact_match_rate, greedy_accuracy, run_sft
from vopd.toy.world import solve

pytestmark = pytest.mark.integration

MEMORISED = ["12+35+40=", "99+1+2=", "50+50+50=", "7+8+9="]
UNSEEN = ["31+41+59=", "26+53+58="]


def test_labels_are_the_completion_at_its_own_positions(toy_tokenizer):
    problems = ["12+35+40=", "1+2="]
    input_BL, labels_BL = encode_examples(toy_tokenizer, problems)
    for b, p in enumerate(problems):
        completion = solve(p)[0]
        labelled = labels_BL[b][labels_BL[b] != -100].tolist()
        assert toy_tokenizer.decode(labelled) == completion + "<eos>"
        start = 1 + len(p)  # <bos> + problem
        assert input_BL[b, start : start + len(labelled)].tolist() == labelled
        assert (labels_BL[b, :start] == -100).all()


@pytest.fixture(scope="module")
def overfit(toy_tokenizer):
    model = tiny_llama(toy_tokenizer, seed=0, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    input_BL, labels_BL = encode_examples(toy_tokenizer, MEMORISED)
    for _ in range(300):
        logits = model(input_ids=input_BL).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels_BL[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_exact_match_equals_greedy_reproducing_the_solution(overfit, toy_tokenizer):
    from vopd.rollout import SamplingParams
    from vopd.rollout.hf import HFBackend

    problems = MEMORISED + UNSEEN
    out = HFBackend(overfit, toy_tokenizer).generate(
        problems, SamplingParams(temperature=0.0, max_new_tokens=40)
    )
    rows = zip(problems, out.texts, out.truncated, strict=True)
    reproduced = [text == solve(p)[0] and not trunc for p, text, trunc in rows]
    assert reproduced[: len(MEMORISED)] == [True] * len(MEMORISED)  # memorised
    for p, hit in zip(problems, reproduced, strict=True):
        assert exact_match_rate(overfit, toy_tokenizer, [p]) == float(hit), p
    answers = [solve(p)[1] for p in MEMORISED]
    assert greedy_accuracy(overfit, toy_tokenizer, MEMORISED, answers) == 1.0


def test_sft_bad_input(tmp_path, tiny_world):
    with pytest.raises(ValueError, match=r"world\.json does not exist"):
        run_sft(tmp_path / "nowhere", tmp_path / "out", steps=1)
    with pytest.raises(ValueError, match=r"student_em=0\.9, teacher_em=0\.5"):
        run_sft(tiny_world, tmp_path / "out", student_em=0.9, teacher_em=0.5)
    with pytest.raises(ValueError, match=r"never reached student_em=0\.55 in 2 steps"):
        run_sft(tiny_world, tmp_path / "out", steps=2, eval_every=1, batch_size=4, progress=False)
    assert not (tmp_path / "out" / "sft_summary.json").exists()
