"""``python -m vopd.variance`` end to end on a tiny run directory (tiny random Llama student and
teacher over the toy vocabulary, the toy world's prompts)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from vopd import catalog
from vopd.estimators import ESTIMATORS
from vopd.variance import main
from vopd.variance_probe import COLUMNS

pytestmark = pytest.mark.integration


@pytest.fixture
def run_dir(tmp_path, tiny_models, tiny_world):
    """A run directory as ``python -m vopd.train`` leaves it: resolved config, step0 checkpoint,
    metrics.jsonl with the Adam proxy."""
    run = tmp_path / "results" / "exp" / "sample_opd" / "seed3"
    shutil.copytree(tiny_models["student"], run / "checkpoints" / "step0")
    shutil.copytree(tiny_models["student"], run / "checkpoints" / "step2")
    cfg = {
        "student": str(tiny_models["student"]),
        "teacher": str(tiny_models["teacher"]),
        "prompts": str(tiny_world / "prompts" / "train.parquet"),
        "estimator": "sample_opd",
        "top_k": 4,
        "prompts_per_step": 6,
        "max_new_tokens": 6,
        "seed": 3,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": s, "train/loss": 0.1, "estimator/adam_proxy": 0.5 * s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_variance_cli_writes_the_results_contract(run_dir, capsys):
    out = run_dir / "variance" / "step2.parquet"
    main(["--run-dir", str(run_dir), "--step", "2", "--out", str(out), "--k", "3"])
    df = pd.read_parquet(out)
    # the results contract (README): variance.parquet carries the variant and its estimator
    assert list(df.columns) == COLUMNS
    assert COLUMNS == ["experiment", "variant", "estimator", "seed", "step", "probe", "value"]
    assert set(df.experiment) == {"exp"} and set(df.seed) == {3} and set(df.step) == {2}
    assert set(df.estimator) == set(ESTIMATORS) == set(catalog.names())
    assert (df.variant == df.estimator).all()  # bare names: each its own variant
    v = {(r.estimator, r.probe): r.value for r in df.itertuples()}
    for e in ESTIMATORS:
        for probe in ("total_variance", "mean_grad_norm", "variance_ratio_to_sample_opd",
                      "cosine_to_full_opd", "exact_position_variance", "k"):  # fmt: skip
            assert (e, probe) in v, (e, probe)
        assert v[(e, "total_variance")] > 0
    for e in catalog.names():  # the removable/irreducible split: unbiased pg estimators only
        split = catalog.get(e).sampled and catalog.get(e).unbiased
        assert ((e, "removable_variance") in v) == split, e
        assert ((e, "irreducible_variance") in v) == split, e
        assert (e, "exact_position_bias_sqnorm") in v, e
        if not catalog.get(e).sampled:
            assert v[(e, "exact_position_variance")] == 0.0
    assert v[("sample_opd", "variance_ratio_to_sample_opd")] == pytest.approx(1.0)
    assert v[("full_opd", "cosine_to_full_opd")] == pytest.approx(1.0)
    assert v[("opt_baseline", "removed_fraction")] == pytest.approx(1.0, abs=1e-6)
    assert v[("sample_opd", "adam_proxy")] == pytest.approx(1.0)  # metrics.jsonl at step 2
    assert v[("vopd", "exact_position_variance")] < v[("sample_opd", "exact_position_variance")]
    assert df.value.notna().all()
    text = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(text[-1])
    assert summary["k"] == 3 and summary["prompts"] == 6 and summary["common_random_numbers"]
    assert any(line.startswith("vopd ") for line in text)


def test_same_seed_same_numbers_and_estimators_subset(run_dir):
    outs = []
    for i in range(2):
        out = run_dir / "variance" / f"a{i}.parquet"
        main(["--run-dir", str(run_dir), "--step", "0", "--out", str(out), "--k", "2",
              "--estimators", "sample_opd", "vopd", "--no-exact"])  # fmt: skip
        outs.append(pd.read_parquet(out))
    pd.testing.assert_frame_equal(outs[0], outs[1])
    assert set(outs[0].estimator) == {"sample_opd", "vopd"}
    assert "cosine_to_full_opd" not in set(outs[0].probe)  # no full_opd to compare with


def test_several_steps_in_one_process_and_a_rerun_keeps_what_is_done(run_dir, capsys):
    """--step/--out pairs: the same rows as one call per step; a rerun keeps the finished
    Parquet files (same checkpoint, same settings) and probes only what is missing; other
    settings probe again."""
    fast = ["--k", "2", "--estimators", "sample_opd,vopd", "--no-exact"]
    single = run_dir / "single" / "step2.parquet"
    main(["--run-dir", str(run_dir), "--step", "2", "--out", str(single), *fast])
    outs = [run_dir / "variance" / f"step{s}.parquet" for s in (0, 2)]
    pairs = ["--step", "0", "--out", str(outs[0]), "--step", "2", "--out", str(outs[1])]
    main(["--run-dir", str(run_dir), *pairs, *fast])
    pd.testing.assert_frame_equal(pd.read_parquet(outs[1]), pd.read_parquet(single))
    assert set(pd.read_parquet(outs[0]).step) == {0}
    capsys.readouterr()

    outs[1].unlink()  # as if killed after step 0
    kept = outs[0].stat().st_mtime_ns
    main(["--run-dir", str(run_dir), *pairs, *fast])
    err = capsys.readouterr().err
    assert "step 0:" in err and "kept" in err and "step 2:" not in err
    assert outs[0].stat().st_mtime_ns == kept
    pd.testing.assert_frame_equal(pd.read_parquet(outs[1]), pd.read_parquet(single))

    main(["--run-dir", str(run_dir), *pairs, "--k", "3", *fast[2:]])  # other settings
    assert "kept" not in capsys.readouterr().err
    assert set(pd.read_parquet(outs[0]).query("probe == 'k'").value) == {3.0}


def test_steps_and_outs_pair_up(run_dir):
    with pytest.raises(SystemExit, match="2 --step and 1 --out"):
        main(["--run-dir", str(run_dir), "--step", "0", "--step", "2", "--out", "x.parquet"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--step", "7"], "no checkpoint"),
        (["--estimators", "nope"], "unknown estimator"),
        (["--k", "1"], "k >= 2"),
        (["--prompts", "0"], "prompts >= 1"),
        (["--top-k", "0"], "top_k"),
    ],
)
def test_bad_input_fails_before_work(run_dir, args, message):
    base = {"--step": "0", "--out": str(run_dir / "x.parquet")}
    argv = ["--run-dir", str(run_dir)]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    with pytest.raises(SystemExit, match=message):
        main(argv + args)
    assert not (run_dir / "x.parquet").exists()


def test_missing_run_config(tmp_path):
    with pytest.raises(SystemExit, match=r"config\.yaml does not exist"):
        main(["--run-dir", str(tmp_path), "--step", "0", "--out", str(tmp_path / "o.parquet")])


def test_lora_checkpoint_probes_only_the_adapter(tmp_path, tiny_models, tiny_world, capsys):
    """A LoRA run's checkpoint is an adapter on cfg.student: the probe differentiates the adapter
    (as the trainer trains it), not the frozen base."""
    from vopd import checkpoint as ckpt
    from vopd import policy
    from vopd.config import TrainConfig
    from vopd.models import load_model, load_tokenizer

    run = tmp_path / "results" / "lora_exp" / "vopd" / "seed0"
    raw = {
        "student": str(tiny_models["student"]),
        "teacher": str(tiny_models["teacher"]),
        "prompts": str(tiny_world / "prompts" / "train.parquet"),
        "finetune": "lora",
        "lora_r": 2,
        "lora_alpha": 4.0,
        "lora_targets": "q_proj,v_proj",
        "top_k": 4,
        "prompts_per_step": 4,
        "max_new_tokens": 5,
        "seed": 0,
    }
    cfg = TrainConfig.from_dict(raw)
    model = policy.prepare_student(cfg, load_model(cfg.student))
    ckpt.save_checkpoint(run, 0, model, load_tokenizer(cfg.student))
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    out = run / "variance" / "step0.parquet"
    main(["--run-dir", str(run), "--step", "0", "--out", str(out), "--k", "2",
          "--estimators", "sample_opd,vopd,full_opd", "--no-exact"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["params"] == n_lora < n_all
    df = pd.read_parquet(out)
    assert set(df.experiment) == {"lora_exp"}
    tv = df[df.probe == "total_variance"].set_index("estimator").value
    assert (tv > 0).all() and set(tv.index) == {"sample_opd", "vopd", "full_opd"}
