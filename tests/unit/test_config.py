"""TrainConfig: official defaults, the toy config, overrides, and every kind of bad value."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from vopd import catalog
from vopd.config import TrainConfig, dump_config, load_config, parse_overrides
from vopd.config.__main__ import main
from vopd.estimators import ESTIMATOR_OPTIONS, ESTIMATORS

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "config" / "train" / "toy.yaml"
REQUIRED = {"student": "s", "teacher": "t", "prompts": "p.parquet"}


def make(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**REQUIRED, **kw})


def test_defaults_are_the_official_settings():
    cfg = make()
    # holi-lab/vOPD configs/training/default.yaml + TRL v1.2.0 (docs/method.md §2)
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.weight_decay) == (1e-5, "cosine", 0, 0)
    assert (cfg.optimizer, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps) == (
        "adamw",
        0.9,
        0.999,
        1e-8,
    )
    assert cfg.max_grad_norm == 1.0
    assert (cfg.temperature, cfg.top_p, cfg.sampling_top_k) == (1.0, 1.0, -1)
    assert (cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens) == (256, 1, 2048)
    assert (cfg.max_steps, cfg.save_every, cfg.seed) == (-1, 20, 42)
    assert cfg.top_k == 100  # vopd-topk.yaml kl_top_k
    assert (cfg.normalize, cfg.detach_reward, cfg.reward_clip_lambda) == ("token_mean", True, None)


def test_every_field_is_documented():
    source = (ROOT / "vopd" / "config" / "__init__.py").read_text()
    for f in dataclasses.fields(TrainConfig):
        block = source.split(f"    {f.name}: ", 1)[1].split("\n", 2)
        assert block[1].strip().startswith('"""'), f"field {f.name} has no docstring"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make().lr = 1.0


def test_toy_config_resolves_and_fits_the_toy_vocabulary():
    cfg = load_config(TOY)
    assert cfg.top_k < 27  # the toy vocabulary; the official 100 would cover it all
    assert cfg.estimator in ESTIMATORS
    for name in ESTIMATORS:
        assert load_config(TOY, [f"estimator={name}"]).estimator == name


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_options_are_exactly_what_it_reads(name):
    assert set(make(estimator=name).estimator_options()) == ESTIMATOR_OPTIONS[name]


def test_overrides_are_yaml_scalars_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: s\nteacher: t\nprompts: p\nlr: 1e-5\n")  # YAML 1.1: a string
    cfg = load_config(path, ["lr=3e-4", "estimator=sample_opd", "reward_clip_lambda=0.5"])
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.reward_clip_lambda == 0.5
    assert load_config(path).lr == 1e-5
    assert parse_overrides(["reward_clip_lambda=null", "detach_reward=false"]) == {
        "reward_clip_lambda": None,
        "detach_reward": False,
    }


def test_int_is_accepted_for_float_fields():
    assert make(max_grad_norm=2).max_grad_norm == 2.0


def test_dump_and_load_round_trip(tmp_path):
    cfg = make(estimator="vopd_topk", top_k=4, lr=3e-4)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_resolve_cli(tmp_path, capsys):
    out = tmp_path / "resolved.yaml"
    main(["resolve", "--config", str(TOY), "--out", str(out), "seed=3"])
    cfg = load_config(out)
    assert cfg.seed == 3 and cfg == load_config(TOY, ["seed=3"])


# ---------------------------------------------------------------------------------------------
# Bad input: each a ValueError naming the key.


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'lr_shedule'.*mean 'lr_schedule'"):
        make(lr_shedule="cosine")
    # the official configs' names point at ours
    with pytest.raises(ValueError, match=r"unknown config key 'kl_top_k'.*did you mean 'top_k'"):
        make(kl_top_k=100)
    with pytest.raises(ValueError, match=r"'learning_rate'.*did you mean 'lr'"):
        make(learning_rate=1e-4)


def test_missing_required_keys():
    with pytest.raises(ValueError, match=r"missing required config key\(s\) \['teacher'"):
        TrainConfig.from_dict({"student": "s"})


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("estimator", "vopd2", "estimator='vopd2': expected one of"),
        ("normalize", "sum", "normalize='sum'"),
        ("lr", 0.0, r"lr=0.0: expected a value in \(0"),
        ("lr", -1e-5, "lr=-1e-05"),
        ("lr", "fast", "lr='fast': expected float"),
        ("top_k", 0, "top_k=0"),
        ("top_k", 4.5, "top_k=4.5: expected int"),
        ("prompts_per_step", 0, "prompts_per_step=0"),
        ("prompts_per_step", True, "prompts_per_step=True: expected int"),
        ("samples_per_prompt", 0, "samples_per_prompt=0"),
        ("temperature", 0.0, "temperature=0.0"),
        ("top_p", 1.5, "top_p=1.5"),
        ("sampling_top_k", 0, "sampling_top_k=0"),
        ("adam_beta2", 1.0, "adam_beta2=1.0"),
        ("adam_eps", 0, "adam_eps=0"),
        ("max_grad_norm", 0, "max_grad_norm=0"),
        ("max_steps", 0, "max_steps=0"),
        ("save_every", 0, "save_every=0"),
        ("warmup_steps", -1, "warmup_steps=-1"),
        ("micro_batch_size", -2, "micro_batch_size=-2"),
        ("weight_decay", -0.1, "weight_decay=-0.1"),
        ("seed", -1, "seed=-1"),
        ("dtype", "fp8", "dtype='fp8'"),
        ("device", "tpu", "device='tpu'"),
        ("lr_schedule", "step", "lr_schedule='step'"),
        ("rollout_backend", "sglang", "rollout_backend='sglang'"),
        ("detach_reward", "yes", "detach_reward='yes': expected bool"),
        ("student", "", "student=''"),
        ("student", 3, "student=3: expected str"),
    ],
)
def test_bad_values_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        make(**{key: value})


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0, -0.5])
def test_reward_clip_lambda_range(lam):
    with pytest.raises(ValueError, match="reward_clip_lambda"):
        make(estimator="sample_opd", reward_clip_lambda=lam)


# A valid non-default value of every estimator option (top_k: see the shared-config test).
NON_DEFAULT = {"reward_clip_lambda": 0.5, "detach_reward": False, "clamp": 10.0, "advantage": 2.0}


def test_every_estimator_option_is_a_config_field():
    """Each catalog option is a TrainConfig field with the catalog's default."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(NON_DEFAULT) == set(catalog.OPTIONS) - {"normalize", "top_k"}
    for name, option in catalog.OPTIONS.items():
        assert name in fields, name
        if name != "top_k":  # the config's top_k default is the catalog's DEFAULT_TOP_K too
            assert fields[name].default == option.default, name
    assert fields["top_k"].default == catalog.DEFAULT_TOP_K


IGNORED = [
    (e, key, value)
    for key, value in NON_DEFAULT.items()
    for e in catalog.names()
    if key not in catalog.get(e).reads
]


@pytest.mark.parametrize(("estimator", "key", "value"), IGNORED)
def test_options_the_estimator_ignores_are_rejected(estimator, key, value):
    with pytest.raises(ValueError, match=f"{key}=.*no effect with estimator '{estimator}'"):
        make(estimator=estimator, **{key: value})


READ = [
    (e, k, v) for k, v in NON_DEFAULT.items() for e in catalog.names() if k in catalog.get(e).reads
]


@pytest.mark.parametrize(("estimator", "key", "value"), READ)
def test_options_the_estimator_reads_reach_it(estimator, key, value):
    assert make(estimator=estimator, **{key: value}).estimator_options()[key] == value


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("clamp", 0.0, r"clamp=0\.0: expected a value in \(0, inf\)"),
        ("clamp", -1.0, r"clamp=-1\.0"),
        ("clamp", float("nan"), r"clamp=nan"),
        ("advantage", float("nan"), r"advantage=nan: expected a value in \(-inf, inf\)"),
        ("advantage", float("inf"), r"advantage=inf"),
    ],
)
def test_new_estimator_options_are_range_checked(key, value, match):
    """Range-checked by the catalog whatever the estimator (even one that does not read it)."""
    for estimator in catalog.names():
        with pytest.raises(ValueError, match=match):
            make(estimator=estimator, **{key: value})


def test_top_k_may_sit_in_a_shared_config():
    assert make(estimator="sample_opd", top_k=4).estimator_options() == {
        "detach_reward": True,
        "normalize": "token_mean",
        "reward_clip_lambda": None,
    }


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="override 'lr': expected key=value"):
        parse_overrides(["lr"])


FLOAT_KEYS = [
    name
    for name, hint in typing.get_type_hints(TrainConfig).items()
    if float in (typing.get_args(hint) or (hint,))
]


@pytest.mark.parametrize("value", [".nan", "inf", "-.inf", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_nan_and_inf_are_rejected_for_every_float_key(key, value):
    """Range checks are False for NaN, so NaN used to pass (a regression: lr=.nan poisoned the run
    directory, lr=inf died at step 2 in the sampler)."""
    with pytest.raises(
        ValueError, match=rf"^{key}=.*: expected a value in \(-inf, inf\), a finite number"
    ):
        load_config(TOY, [f"{key}={value}", "estimator=sample_opd"])


def test_every_float_key_is_covered():
    assert {"lr", "max_grad_norm", "temperature", "top_p", "reward_clip_lambda"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_rollout_sampler_rejects_a_non_finite_temperature(value):
    from vopd.rollout import SamplingParams

    with pytest.raises(ValueError, match=r"temperature=(nan|inf): expected a finite value"):
        SamplingParams(temperature=value)
