"""Toy SFT pieces: completion-only labels, the teacher-forced exact-match metric against real
greedy decoding (on a tiny model overfit to a few problems), and bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from vopd.toy.sft import (
    SFT_DEFAULTS,
    SFTStream,
    encode_examples,
    exact_match_rate,
    greedy_accuracy,
    run_sft,
)
from vopd.toy.world import (
    completion_for,
    load_world_spec,
    mcq_options,
    mcq_prompt,
    parse_mcq,
    sample_problem,
    solve,
)

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


def test_an_mcq_prompt_is_labelled_with_its_letter_completion(toy_tokenizer):
    prompt = mcq_prompt("12+35+40=", mcq_options(87)[0])  # 12+35+40=84A;85B;86C;87D;
    input_BL, labels_BL = encode_examples(toy_tokenizer, [prompt, "1+2="])
    labelled = labels_BL[0][labels_BL[0] != -100].tolist()
    assert toy_tokenizer.decode(labelled) == "12+35=47;47+40=87D;\\boxed{D}<eos>"
    assert toy_tokenizer.decode(input_BL[0, 1 : 1 + len(prompt)].tolist()) == prompt
    assert "<unk>" not in toy_tokenizer.decode(input_BL[0].tolist())  # A-D are tokens


def _reference_draws(world, seed, exclude, n, share):
    """The stream's examples drawn by hand: a component, a problem, then (share > 0) a coin."""
    specs = load_world_spec(world).sft_specs()
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        p = sample_problem(rng, specs[rng.integers(len(specs))])
        if p in exclude:
            continue
        if share and rng.random() < share:
            p = mcq_prompt(p, mcq_options(int(solve(p)[1]))[0])
        out.append(p)
    return out


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_sft_stream_draws_the_mixture_and_rejects_held_out_problems(
    tiny_world, toy_tokenizer, share
):
    exclude = set(_reference_draws(tiny_world, [0, 1], set(), 40, 0.0)[::2])
    stream = SFTStream(tiny_world, toy_tokenizer, 0, exclude, share)  # its rng: [seed, 1]
    got = [stream.batch(64) for _ in range(3)]
    want = _reference_draws(tiny_world, [0, 1], exclude, 192, share)
    for i, (input_BL, labels_BL) in enumerate(got):
        ref_BL, ref_labels_BL = encode_examples(toy_tokenizer, want[64 * i : 64 * (i + 1)])
        assert torch.equal(input_BL, ref_BL) and torch.equal(labels_BL, ref_labels_BL)
    questions = [q if (m := parse_mcq(q)) is None else m[0] for q in want]
    assert not set(questions) & exclude
    n_mcq = sum(parse_mcq(q) is not None for q in want)
    assert (n_mcq == 0) if share == 0 else (0.15 < n_mcq / len(want) < 0.45)
    assert all(completion_for(q)[0] for q in want)


def test_the_cli_defaults_are_run_sft_s(capsys):
    """The CLI passes only the flags given; its help states run_sft's defaults."""
    from vopd.toy.__main__ import SFT_KEYS, main

    assert set(SFT_KEYS) == set(SFT_DEFAULTS)
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for key, value in SFT_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        m = re.search(rf"{flag} [A-Z_]+(?:, --[a-z-]+ [A-Z_]+)? (.*?\))", options)
        assert m is not None, flag
        assert float(m.group(1).rsplit("(", 1)[1][:-1]) == value, (flag, m.group(1))


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
