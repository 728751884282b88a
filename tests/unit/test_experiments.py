"""vopd.experiments: the workflow config's experiments (main comparison + ablations), their
inheritance, each run's resolved trainer overrides and the parse-time checks (torch-free).

    pytest tests/unit/test_experiments.py
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vopd import experiments
from vopd.config import load_config
from vopd.experiments import __main__ as experiments_cli

REPO = Path(__file__).resolve().parents[2]
PATHS = {"student": "s", "teacher": "t", "prompts": "p.parquet"}


def config(**edits) -> dict:
    """config/config.yaml with the schema defaults the workflow fills in."""
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["train"]["config"] = str(REPO / cfg["train"]["config"])
    cfg["eval"].setdefault("lora", False)
    cfg["eval"].setdefault("args", {})
    for key, value in edits.items():
        cfg[key] = value
    return cfg


def resolve(cfg, vocab_size=31):  # the toy tokenizer's
    return experiments.resolve(cfg, vocab_size=vocab_size, **PATHS)


def test_toy_vocab_size_is_computed_from_the_tokenizer():
    from vopd.toy.tokenizer import ALPHABET, SPECIALS, build_tokenizer

    assert experiments.toy_vocab_size() == len(SPECIALS) + len(ALPHABET) == len(build_tokenizer())


def test_main_and_declared_ablations_with_inheritance():
    exps = resolve(config())
    main = exps["toy"]
    assert list(exps) == ["toy", *(f"toy_ablation_{n}" for n in config()["ablations"])]
    topk = exps["toy_ablation_topk"]
    assert topk.ablation == "topk" and topk.sweep == "top_k"
    assert topk.variants["vopd_topk_k16"].options == {"top_k": 16}
    assert topk.seeds == main.seeds and topk.train["steps"] == main.train["steps"]
    assert topk.eval["benchmarks"] == main.eval["benchmarks"]  # inherited
    assert topk.variance["activate"] and topk.variance["k"] == main.variance["k"]
    assert topk.variance["steps"] == [0, 70]  # its own
    assert not exps["toy_ablation_clip"].variance["activate"]  # no probes unless declared
    assert not any(e.profile["activate"] for e in exps.values() if e.ablation)
    assert exps["toy_ablation_lr"].report["reference_estimator"] == "sample_opd_lr5e-4"
    assert exps["toy_ablation_lr"].report["metric"] == main.report["metric"]  # merged


def test_ablation_merges_overrides_and_eval_settings():
    cfg = config()
    cfg["train"]["overrides"] = {"warmup_steps": 2}
    cfg["ablations"]["clip"].update(
        train={"steps": 35, "overrides": {"weight_decay": 0.1}},
        eval={"steps": [35], "sampling": {"n": 2}, "benchmarks": {"toy_test": {}}},
        seeds=[5, 6, 7],
    )
    clip = resolve(cfg)["toy_ablation_clip"]
    assert clip.train["steps"] == 35 and clip.train["save_every"] == 35
    assert clip.train["overrides"] == {"warmup_steps": 2, "weight_decay": 0.1}
    assert clip.eval["sampling"]["n"] == 2 and clip.eval["sampling"]["temperature"] == 0.6
    assert clip.eval["benchmarks"]["toy_test"] == {} and "toy_hard" in clip.eval["benchmarks"]
    run = experiments.run_overrides(clip, "vopd_noclip", 6, **PATHS)
    assert run["max_grad_norm"] == 1e9 and run["seed"] == 6 and run["max_steps"] == 35
    assert run["warmup_steps"] == 2 and run["weight_decay"] == 0.1


def test_run_overrides_are_the_validated_text_and_build_the_trainer_config():
    exps = resolve(config())
    exp = exps["toy_ablation_lr"]
    run = experiments.run_overrides(exp, "vopd_lr1e-3", 2, **PATHS)
    items = experiments.override_items(run)
    assert "lr=0.001" in items and "estimator=vopd" in items and "seed=2" in items
    cfg = load_config(exp.train["config"], items)  # what python -m vopd.train gets
    assert (cfg.estimator, cfg.lr, cfg.seed, cfg.max_steps) == ("vopd", 0.001, 2, 70)
    reward = exps["toy_ablation_reward"]
    run = experiments.run_overrides(reward, "sample_opd_undetached", 0, **PATHS)
    assert "detach_reward=false" in experiments.override_items(run)
    assert experiments.describe_options({"top_k": 16, "lr": 1e-3}) == "lr=0.001, top_k=16"


def test_probe_and_aggregate_tables_of_variants():
    topk = resolve(config())["toy_ablation_topk"]
    probed = topk.probe_variants()
    assert probed["vopd_topk_k8"] == {"estimator": "vopd_topk", "top_k": 8}
    assert probed["sample_opd"] == {"estimator": "sample_opd"}  # a bare name, not trained
    table = resolve(config())["toy_ablation_lr"].variant_table()
    assert table["full_opd_lr1e-3"] == {"estimator": "full_opd", "options": {"lr": 0.001}}


def bad(edit):
    cfg = config()
    edit(cfg)
    return cfg


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["estimators"].update(x={"estimator": "nope"}), "estimators.x: unknown"),
        (lambda c: c["estimators"].update(vopd={"clamp": 1.0}), "estimators.vopd: option clamp"),
        (
            lambda c: c["estimators"].update(vopd_topk={"top_k": 31}),
            "'estimators.vopd_topk.top_k' = 31: expected an integer in [1, 30]",
        ),
        (
            lambda c: (
                c["train"].update(overrides={"top_k": 31}),
                c["estimators"].update(vopd_topk={}),
            ),
            "'train.overrides.top_k' = 31",  # the resolved config's top_k, from train.overrides
        ),
        (
            lambda c: c["estimators"].update(x={"estimator": "vopd", "overrides": {"nope": 1}}),
            "'estimators.x.overrides.nope' = 1: expected a key of the trainer config",
        ),
        (
            lambda c: c["ablations"]["clip"]["estimators"].update(
                x={"estimator": "vopd", "overrides": {"lr": math.nan}}
            ),
            "'ablations.clip.estimators.x.overrides.lr': lr='nan': expected a value in "
            "(-inf, inf), a finite number",
        ),
        (
            lambda c: c["ablations"]["clip"].update(train={"overrides": {"seed": 3}}),
            "'ablations.clip.train.overrides.seed' = 3: expected no override",
        ),
        (
            lambda c: c["ablations"]["clip"].update(sweep="lr"),
            "'ablations.clip.sweep' = 'lr': expected an option or override",
        ),
        (
            lambda c: c["ablations"]["clip"].update(eval={"steps": [20]}),
            "'ablations.clip.eval.steps' = 20",
        ),
        (
            lambda c: c["report"].update(reference_estimator="nope"),
            "'report.reference_estimator' = 'nope'",
        ),
        (
            lambda c: c["ablations"]["topk"]["variance"].update(estimators=["nope"]),
            "'ablations.topk.variance.estimators' = 'nope'",
        ),
    ],
    ids=[
        "estimator",
        "unread-option",
        "top_k=V",
        "global-top_k",
        "override-key",
        "nan",
        "workflow-key",
        "sweep",
        "ablation-step",
        "reference",
        "probe-name",
    ],
)
def test_bad_configs_name_the_key(edit, message):
    with pytest.raises(ValueError) as err:
        resolve(bad(edit))
    assert message in str(err.value)


def test_without_a_known_vocabulary_top_k_is_not_bounded_and_train_overrides_default():
    cfg = config()
    del cfg["train"]["overrides"]
    cfg["estimators"]["vopd_topk"] = {"top_k": 100}  # scale hub: V unknown at parse time
    exps = resolve(cfg, vocab_size=None)
    assert exps["toy"].train["overrides"] == {}


def test_parse_time_module_never_imports_torch():
    code = "import sys, vopd.experiments as e; e.toy_vocab_size(); sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_config_fixture_is_not_mutated_by_resolve():
    cfg = config()
    before = copy.deepcopy(cfg)
    resolve(cfg)
    assert cfg == before


def test_runs_with_the_same_resolved_config_are_reused_main_first():
    exps = resolve(config())
    assert exps["toy"].reused == {}
    clip = exps["toy_ablation_clip"]
    assert clip.reused[("vopd", 2)] == "results/toy/vopd/seed2"
    assert ("vopd_noclip", 2) not in clip.reused
    # lr 5e-4 is the toy default: the same resolved config as the main run, another name
    assert exps["toy_ablation_lr"].reused[("full_opd_lr5e-4", 0)] == "results/toy/full_opd/seed0"
    assert exps["toy_ablation_topk"].reused[("vopd_topk_k4", 1)] == "results/toy/vopd_topk/seed1"
    assert ("vopd_topk_k8", 1) not in exps["toy_ablation_topk"].reused


def test_copy_run_copies_training_artefacts_and_writes_done_last(tmp_path):
    src = tmp_path / "a" / "vopd" / "seed0"
    (src / "checkpoints" / "step2").mkdir(parents=True)
    (src / "checkpoints" / "step2" / "model.safetensors").write_bytes(b"w")
    for name in ("config.yaml", "metrics.jsonl", "env.json", "done.json"):
        (src / name).write_text(name)
    (src / "eval" / "toy_test").mkdir(parents=True)  # the source experiment's: not copied
    dst = tmp_path / "b" / "vopd" / "seed0"
    experiments_cli.main(["copy-run", str(src), str(dst)])
    assert (dst / "checkpoints" / "step2" / "model.safetensors").read_bytes() == b"w"
    assert (dst / "config.yaml").read_text() == "config.yaml" and (dst / "done.json").is_file()
    assert not (dst / "eval").exists()
    assert str(src) in (dst / "reused_from.json").read_text()
    (src / "done.json").unlink()
    with pytest.raises(SystemExit, match="not a complete run"):
        experiments_cli.main(["copy-run", str(src), str(tmp_path / "c")])
