"""``python -m vopd.train`` end to end on tiny models: run-directory contract, kill-and-resume
equals an uninterrupted run, and every bad input fails before training starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import save_model, tiny_llama
from safetensors.torch import load_file

from vopd import catalog, results
from vopd.config import load_config
from vopd.io import read_jsonl
from vopd.train import main
from vopd.trainer import train, train_runs

pytestmark = pytest.mark.integration

METRIC_KEYS = {  # namespaced (vopd.results)
    "step",
    "train/loss",
    "estimator/reward_mean",
    "estimator/kl_mean",
    "estimator/adv_mean",
    "estimator/adv_std",
    "train/grad_norm",
    "train/lr",
    "train/response_len",
    "estimator/entropy",
    "estimator/adam_proxy",
    "perf/time_rollout_s",
    "perf/time_teacher_s",
    "perf/time_update_s",
    "perf/step_s",
    "perf/tokens_per_s",
}
TIMING = {k for k in METRIC_KEYS if k.startswith("perf/")}


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step{step}" / "model.safetensors")


def _numbers(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")
    ]


def _assert_same_run(a: Path, b: Path, steps: int) -> None:
    assert _numbers(a) == _numbers(b)  # exactly: every loss, KL, grad norm, Adam proxy
    assert len(_numbers(a)) == steps
    wa, wb = _weights(a, steps), _weights(b, steps)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_directory_contract(run_config, tmp_path, capsys):
    run = tmp_path / "run"
    main(
        ["--config", str(run_config(max_steps=3, save_every=2)), "--out", str(run), "--no-progress"]
    )
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["steps"] == 3 and final["checkpoints"] == [0, 2, 3]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) >= METRIC_KEYS
        results.check_metrics_record(r, "metrics.jsonl")  # every key namespaced
        assert r["perf/step_s"] >= r["perf/time_rollout_s"] + r["perf/time_teacher_s"]
    assert load_config(run / "config.yaml").max_steps == 3
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] and "git" in env
    for step in (0, 2, 3):
        d = run / "checkpoints" / f"step{step}"
        assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
    assert (run / "checkpoints" / "step3" / "trainer_state.pt").exists()
    assert (run / "checkpoints" / "step2" / "trainer_state.pt").exists()  # the fallback
    assert not (run / "checkpoints" / "step0" / "trainer_state.pt").exists()  # pruned
    # step0 is the initial student, bit for bit
    init = load_file(Path(load_config(run / "config.yaml").student) / "model.safetensors")
    assert all(torch.equal(init[k], _weights(run, 0)[k]) for k in init)
    assert not all(torch.equal(init[k], _weights(run, 3)[k]) for k in init)
    # a finished run is not redone
    mtime = (run / "metrics.jsonl").stat().st_mtime
    assert train(load_config(run / "config.yaml"), run, progress=False)["steps"] == 3
    assert (run / "metrics.jsonl").stat().st_mtime == mtime


@pytest.mark.parametrize("stop_after", [2, 3])  # on a checkpoint, and one step past it
def test_resume_equals_uninterrupted(run_config, tmp_path, stop_after):
    cfg = load_config(run_config(max_steps=5, save_every=2, estimator="sample_opd"))
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg, full, progress=False)
    train(cfg, cut, progress=False, stop_after=stop_after)
    assert not (cut / "done.json").exists()
    assert len(read_jsonl(cut / "metrics.jsonl")) == stop_after
    train(cfg, cut, progress=False)
    _assert_same_run(full, cut, 5)
    assert read_jsonl(cut / "resumes.jsonl")[0]["from_step"] == 2


def test_sigkill_and_rerun_equals_uninterrupted(run_config, tmp_path):
    """A real kill -9 of the CLI mid-run, then the same command again."""
    config = run_config(max_steps=60, save_every=10, prompts_per_step=16, max_new_tokens=16)
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(load_config(config), full, progress=False)
    cmd = [sys.executable, "-m", "vopd.train", "--config", str(config), "--out", str(killed)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= 12:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "done.json").exists()
    done_before = len(read_jsonl(metrics))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 60
    _assert_same_run(full, killed, 60)
    assert read_jsonl(killed / "resumes.jsonl")[0]["from_step"] <= done_before


def _cli(*args: str) -> list[dict]:
    """``python -m vopd.train ARGS`` in a fresh process; its done.json lines."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "vopd.train", "--no-progress", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.strip().splitlines()]


def _untimed(done: dict) -> dict:
    return {k: v for k, v in done.items() if k not in ("out", "time_s_this_process", "mean_step_s")}


def test_several_seeds_in_one_process_equal_separate_processes(run_config, tmp_path):
    """`--seeds 0,1` trains both runs in one process exactly as two processes with seed=0 and
    seed=1 do; killed runs resume and a finished one is skipped."""
    config = str(run_config(max_steps=4, save_every=2, estimator="sample_opd"))
    alone = [tmp_path / f"alone{s}" for s in (0, 1)]
    for seed, out in enumerate(alone):
        _cli("--config", config, "--out", str(out), f"seed={seed}")
    grouped = [tmp_path / f"grouped{s}" for s in (0, 1)]
    dones = _cli("--config", config, "--seeds", "0,1", *(f"--out={d}" for d in grouped))
    assert [d["seed"] for d in dones] == [0, 1]
    for a, b in zip(alone, grouped, strict=True):
        _assert_same_run(a, b, 4)
        assert load_config(a / "config.yaml") == load_config(b / "config.yaml")
        assert _untimed(json.loads((a / "done.json").read_text())) == _untimed(
            json.loads((b / "done.json").read_text())
        )
    assert _numbers(grouped[0]) != _numbers(grouped[1])  # the seeds differ
    # A killed grouped job: both runs cut after step 3 (checkpoint at 2), the first then finished
    # alone; the same grouped command skips it and resumes the second.
    cut = [tmp_path / f"cut{s}" for s in (0, 1)]
    cfgs = [load_config(config, [f"seed={s}"]) for s in (0, 1)]
    assert train_runs(list(zip(cfgs, cut, strict=True)), progress=False, stop_after=3) == [{}, {}]
    train(cfgs[0], cut[0], progress=False)
    mtime = (cut[0] / "metrics.jsonl").stat().st_mtime
    _cli("--config", config, "--seeds", "0,1", "--out", str(cut[0]), "--out", str(cut[1]))
    assert (cut[0] / "metrics.jsonl").stat().st_mtime == mtime
    for a, b in zip(alone, cut, strict=True):
        _assert_same_run(a, b, 4)
        assert read_jsonl(b / "resumes.jsonl")[0]["from_step"] == 2


def test_several_runs_need_one_seed_per_out(run_config, tmp_path):
    config = str(run_config())
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for args in (
        ["--out", a, "--out", b],
        ["--seeds", "0,1", "--out", a],
        ["--seeds", "0,1", "--out", a, "--out", b, "seed=3"],
        ["--seeds", "0,0", "--out", a, "--out", b],
    ):
        with pytest.raises(SystemExit):
            main(["--config", config, *args])
    with pytest.raises(SystemExit, match="not distinct"):
        main(["--config", config, "--seeds", "0,1", "--out", a, "--out", a])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message, nothing trained, nothing written.


def _fails(run_config, tmp_path, match, **overrides):
    run = tmp_path / "bad"
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(run_config(**overrides)), "--out", str(run), "--no-progress"])
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert not (run / "config.yaml").exists()


def test_unknown_estimator(run_config, tmp_path):
    _fails(run_config, tmp_path, "estimator='vopd_fast': expected one of", estimator="vopd_fast")


def test_unknown_key(run_config, tmp_path):
    _fails(run_config, tmp_path, "unknown config key 'kl_top_k'", kl_top_k=4)


def test_out_of_range(run_config, tmp_path):
    _fails(run_config, tmp_path, r"lr=-0.1: expected a value in \(0", lr=-0.1)


def test_missing_model_path(run_config, tmp_path):
    missing = str(tmp_path / "models" / "studnet")
    _fails(run_config, tmp_path, f"model path '{missing}' does not exist", student=missing)


@pytest.mark.parametrize("estimator", [s.name for s in catalog.specs() if s.top_k])
def test_top_k_at_or_above_the_toy_vocabulary(run_config, tmp_path, estimator):
    _fails(run_config, tmp_path, "top_k=31 >= vocabulary size 31", estimator=estimator, top_k=31)
    _fails(run_config, tmp_path, "top_k=100 >= vocabulary size 31", estimator=estimator, top_k=100)


def test_empty_prompt_set(run_config, tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(empty)
    _fails(run_config, tmp_path, "holds no non-empty prompts", prompts=str(empty))
    _fails(run_config, tmp_path, "has no column 'question'", prompt_column="question")


def test_vocabulary_mismatch(run_config, tmp_path, tiny_models, toy_tokenizer):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(toy_tokenizer.backend_tokenizer.to_str())
    vocab = core.get_vocab()
    vocab["A"], vocab["B"] = vocab.pop("x"), vocab.pop("b")  # two characters renamed
    data = json.loads(core.to_str())
    data["model"]["vocab"] = vocab
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    teacher = save_model(tiny_llama(other, 1), other, tmp_path / "other_teacher")
    _fails(run_config, tmp_path, "student and teacher vocabularies differ", teacher=str(teacher))


def test_config_change_on_rerun_is_refused(run_config, tmp_path):
    run = tmp_path / "run"
    main(["--config", str(run_config(max_steps=1)), "--out", str(run), "--no-progress"])
    (run / "done.json").unlink()
    with pytest.raises(SystemExit, match="holds a run with a different config"):
        main(["--config", str(run_config(max_steps=1, lr=2e-3)), "--out", str(run)])


def test_nan_loss_stops_the_run_naming_step_and_estimator(run_config, tmp_path, tiny_models):
    from vopd.models import load_model, load_tokenizer

    teacher = load_model(str(tiny_models["teacher"]))
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))
    bad = save_model(teacher, load_tokenizer(str(tiny_models["teacher"])), tmp_path / "nan_t")
    run = tmp_path / "nan"
    config = run_config(teacher=str(bad), estimator="vopd_topk")
    with pytest.raises(SystemExit, match=r"step 1, estimator 'vopd_topk': non-finite loss"):
        main(["--config", str(config), "--out", str(run), "--no-progress"])
    assert not (run / "done.json").exists() and not (run / "metrics.jsonl").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"] == str(bad)


def test_nan_lr_fails_before_anything_is_written(run_config, tmp_path):
    _fails(run_config, tmp_path, "lr=nan: expected a value in .*a finite number", lr=float("nan"))
    _fails(run_config, tmp_path, "max_grad_norm=inf: expected a value in .*a finite number",
           max_grad_norm=float("inf"))  # fmt: skip


def test_a_run_that_never_checkpointed_does_not_pin_its_config(run_config, tmp_path):
    """A directory whose run failed before step 0 was saved holds nothing to protect: a rerun
    with a corrected config is not refused as 'a different config'."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**load_config(run_config()).to_dict(),
                                                     "lr": 0.5}))  # fmt: skip
    main(["--config", str(run_config(max_steps=1)), "--out", str(run), "--no-progress"])
    assert load_config(run / "config.yaml").lr == 1e-3 and (run / "done.json").exists()


def test_an_unwritable_out_is_a_clear_error(run_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match=rf"error: .*{blocker}"):
        main(["--config", str(run_config()), "--out", str(blocker / "run"), "--no-progress"])


# ---------------------------------------------------------------------------------------------
# The run directory: one writer, a damaged newest checkpoint, a cut metrics.jsonl.


def _cut_run(run_config, tmp_path, steps=6):
    cfg = load_config(run_config(max_steps=steps, save_every=2))
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg, full, progress=False)
    train(cfg, cut, progress=False, stop_after=4)  # checkpoints 0, 2, 4; states at 2 and 4
    return cfg, full, cut


def test_a_second_trainer_refuses_a_live_run_and_a_killed_ones_lock_does_not_block(
    run_config, tmp_path
):
    config = run_config(max_steps=400, save_every=5)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vopd.train", "--config", str(config), "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if (run / "metrics.jsonl").exists() and len(read_jsonl(run / "metrics.jsonl")) >= 2:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second one started"
        second = subprocess.run([*cmd, "lr=2e-3"], env=env, capture_output=True, text=True)
        assert second.returncode != 0
        assert f"is in use by vopd.train (pid {first.pid} on host" in second.stderr
        assert first.poll() is None  # the live run goes on, untouched
    finally:
        first.kill()
        first.wait()
    # the kernel released the killed run's lock: the same command resumes
    resumed = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "resumes.jsonl").exists():
        time.sleep(0.05)
    resumed.kill()
    err = resumed.communicate()[1].decode()
    assert (run / "resumes.jsonl").exists(), err
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no mixed or repeated steps


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_a_truncated_newest_checkpoint_resumes_from_the_previous(
    run_config, tmp_path, capsys, damaged
):
    cfg, full, cut = _cut_run(run_config, tmp_path)
    path = cut / "checkpoints" / "step4" / damaged
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    train(cfg, cut, progress=False)
    assert str(path) in capsys.readouterr().err
    assert read_jsonl(cut / "resumes.jsonl")[0]["from_step"] == 2
    _assert_same_run(full, cut, 6)


def test_a_cut_metrics_file_resumes_from_a_covered_checkpoint_or_refuses(run_config, tmp_path):
    cfg, full, cut = _cut_run(run_config, tmp_path)
    metrics = cut / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # cut in line 4
    train(cfg, cut, progress=False)  # steps 1..3 survive: resume from step 2, not 4
    assert read_jsonl(cut / "resumes.jsonl")[0]["from_step"] == 2
    _assert_same_run(full, cut, 6)
    # cut before the oldest kept resume state: refused, nothing finished
    other = tmp_path / "other"
    train(cfg, other, progress=False, stop_after=4)
    (other / "metrics.jsonl").write_text(lines[0] + lines[1][:10])
    with pytest.raises(ValueError, match=r"metrics\.jsonl holds steps 1\.\.1 contiguously"):
        train(cfg, other, progress=False)
    assert not (other / "done.json").exists()


def test_an_old_unnamespaced_metrics_file_is_refused_on_resume(run_config, tmp_path):
    """A run directory of a release before the results contract (metrics.jsonl keys such as
    ``loss``): the resume stops naming the file, the line and the key; nothing is rewritten."""
    cfg, _, cut = _cut_run(run_config, tmp_path)
    metrics = cut / "metrics.jsonl"
    old = [{"step": r["step"], **{k.split("/", 1)[1]: v for k, v in r.items() if k != "step"}}
           for r in read_jsonl(metrics)]  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in old))
    before = metrics.read_bytes()
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: key '\w+' is not namespaced"):
        train(cfg, cut, progress=False)
    assert metrics.read_bytes() == before and not (cut / "done.json").exists()
