"""Adding an estimator is one catalog entry (pg) or one function plus one entry (exact), proved.
Two throwaway estimators are registered with ``vopd.catalog.register`` (and removed in the
fixture's teardown), with no other edit anywhere, and each appears in the registry, the trainer's
config validation, one in-process training run, the IS correction, the exact and Monte-Carlo
variance probes (CLI too), the cost profiler's in-process measurement and the report tables:

- ``half_vopd`` (pg): A = r + ½ KL, a constant-per-position baseline −½ KL, so unbiased;
- ``half_full_opd`` (exact): loss ½ Σ w KL(p‖q) written naively here, gradient ½ ∇KL, so its
  bias against ∇KL is ‖½ ∇KL‖² = ¼ of the signal.
"""

from __future__ import annotations

import shutil

import opd_reference as ref
import pandas as pd
import pytest
import torch
import yaml

from vopd import catalog, report
from vopd.config import TrainConfig
from vopd.estimators import ESTIMATOR_OPTIONS, ESTIMATORS
from vopd.io import read_jsonl
from vopd.is_correction import step_weights
from vopd.profile import measure_one
from vopd.trainer import train
from vopd.variance_math import exact_probes, position_variance

pytestmark = pytest.mark.integration
D = torch.float64
PG, EXACT = "half_vopd", "half_full_opd"


def half_full_opd(student_BTV, teacher_BTV, tokens_BT, mask_BT, *, normalize="token_mean", **_):
    """½ Σ_t w_t KL(p‖q)_t with token-mean weights, by plain log_softmax (a throwaway: it holds
    [B,T,V] log-probs, which the suite's own estimators never do)."""
    if normalize != "token_mean":
        raise ValueError(f"normalize={normalize!r}: this throwaway has token_mean only")
    acc = torch.promote_types(student_BTV.dtype, torch.float32)
    m = mask_BT.to(device=student_BTV.device, dtype=acc)
    w = m / m.sum().clamp_min(1e-12)
    lp, lq = student_BTV.to(acc).log_softmax(-1), teacher_BTV.detach().to(acc).log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return 0.5 * (w * kl).sum(), {"kl_mean": float((w * kl.detach()).sum())}


SPECS = (
    catalog.EstimatorSpec(
        name=PG, family="pg", label="½-vOPD", order=25,
        gradient="−Σ w_t sg[r_t + ½ KL_t] ∇log p(y_t)", expectation="reverse_kl",
        baseline="−½ KL_t", source="tests (throwaway)", stats=("kl",),
        advantage=lambda r, s, o: r + 0.5 * s["kl"],
    ),
    catalog.EstimatorSpec(
        name=EXACT, family="exact", label="½ full OPD", order=45,
        gradient="½ Σ w_t ∇KL_t", expectation="biased", source="tests (throwaway)",
        fn=half_full_opd,
    ),
)  # fmt: skip


@pytest.fixture
def throwaway():
    """Register both throwaways; afterwards nothing of them is left anywhere."""
    for spec in SPECS:
        catalog.register(spec)
    yield
    for spec in SPECS:
        catalog.unregister(spec.name)
    for name in (PG, EXACT):
        assert name not in catalog.names() and name not in ESTIMATORS
        assert name not in ESTIMATOR_OPTIONS
        with pytest.raises(ValueError, match=f"estimator='{name}': expected one of"):
            TrainConfig(student="s", teacher="t", prompts="p", estimator=name)


def _logits(B=2, T=3, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (1.5 * torch.randn(B, T, V, generator=g, dtype=D)).requires_grad_(True)
    t = 1.5 * torch.randn(B, T, V, generator=g, dtype=D)
    return s, t, torch.randint(0, V, (B, T), generator=g)


def test_registry_and_config(throwaway):
    """Both appear in ESTIMATORS / ESTIMATOR_OPTIONS in catalog order, compute the gradient
    their definition says (checked against plain autograd), and validate as a trainer config."""
    names = list(ESTIMATORS)
    assert names.index(PG) == names.index("vopd") + 1
    assert names.index(EXACT) == names.index("full_opd") + 1
    assert ESTIMATOR_OPTIONS[PG] == ESTIMATOR_OPTIONS[EXACT] == {"normalize"}
    assert PG in catalog.sampled() and PG in catalog.unbiased()
    assert EXACT not in catalog.sampled() and EXACT not in catalog.unbiased()
    s, t, y = _logits()
    mask = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 2.0]])
    w = ref.weights(mask)
    lp_y = s.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    r = (t.log_softmax(-1).gather(-1, y[..., None])[..., 0] - lp_y).detach()
    adv = r + 0.5 * ref.reverse_kl(s, t).detach()
    loss, metrics = ESTIMATORS[PG](s, t, y, mask)
    torch.testing.assert_close(ref.grad(loss, s), ref.grad(-(w * adv * lp_y).sum(), s))
    assert metrics["baseline_mean"] == pytest.approx(
        float(-0.5 * (mask * ref.reverse_kl(s, t).detach()).sum() / mask.sum()), rel=1e-12
    )
    loss, _ = ESTIMATORS[EXACT](s, t, y, mask)
    target = ref.expectation_target("reverse_kl", s, t, mask)
    torch.testing.assert_close(ref.grad(loss, s), 0.5 * target)
    for name in (PG, EXACT):
        cfg = TrainConfig(student="s", teacher="t", prompts="p", estimator=name)
        assert cfg.estimator_options() == {"normalize": "token_mean"}
        with pytest.raises(ValueError, match=f"clamp=10.0 has no effect with estimator '{name}'"):
            TrainConfig(student="s", teacher="t", prompts="p", estimator=name, clamp=10.0)
        assert catalog.parse_variant(f"{name}_seq", {"estimator": name}).estimator == name


def test_is_correction_weights_the_pg_one_only(throwaway):
    train_lp, sampler_lp, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.ones(1, 1)
    w = step_weights(PG, True, train_lp, sampler_lp, mask)
    assert w.tolist() == pytest.approx([torch.e**0.5])
    assert step_weights(EXACT, True, train_lp, sampler_lp, mask) is None


def _enumerated_variance(s_V, t_V):
    """Var_y of half_vopd's logit gradient −(r(y) + ½KL)(e_y − p), y ~ p, by listing every y."""
    p = s_V.softmax(-1)
    r = t_V.log_softmax(-1) - s_V.log_softmax(-1)
    kl = float(ref.reverse_kl(s_V, t_V))
    V = s_V.shape[0]
    g_YV = torch.stack([-(r[y] + 0.5 * kl) * (torch.eye(V, dtype=D)[y] - p) for y in range(V)])
    mean_V = (p[:, None] * g_YV).sum(0)
    return float((p * ((g_YV - mean_V) ** 2).sum(-1)).sum())


def test_exact_variance_probe_reports_both(throwaway):
    """The exact probe reports the pg throwaway with its enumerated variance, no bias (a
    per-position constant baseline) and the removable/irreducible split of an unbiased pg
    estimator; the exact throwaway with no variance and a bias of ¼ of the signal."""
    g = torch.Generator().manual_seed(3)
    s, t = (
        2.0 * torch.randn(16, 7, generator=g, dtype=D),
        2.0 * torch.randn(16, 7, generator=g, dtype=D),
    )
    w = torch.rand(16, generator=g, dtype=D)
    pv = position_variance(s, t, {PG: catalog.Variant(PG, PG)})
    enum = torch.tensor([_enumerated_variance(s[n], t[n]) for n in range(16)], dtype=D)
    torch.testing.assert_close(pv[PG], enum, rtol=1e-9, atol=1e-13)
    out = exact_probes(s, t, w, ["sample_opd", PG, "full_opd", EXACT])
    assert set(out) == {"sample_opd", PG, "full_opd", EXACT}
    mean = float(w @ enum / w.sum())
    assert out[PG]["exact_position_variance"] == pytest.approx(mean, rel=1e-9)
    signal = out[PG]["exact_position_signal"]
    assert out[PG]["exact_position_bias_sqnorm"] == pytest.approx(0.0, abs=1e-12 * signal)
    assert out[PG]["irreducible_variance"] == pytest.approx(
        out["sample_opd"]["irreducible_variance"], rel=1e-12
    )
    assert out[PG]["removable_variance"] == pytest.approx(
        mean - out[PG]["irreducible_variance"], rel=1e-9
    )
    assert out[EXACT]["exact_position_variance"] == 0.0
    assert out[EXACT]["exact_position_bias_sqnorm"] == pytest.approx(0.25 * signal, rel=1e-9)
    assert "removable_variance" not in out[EXACT]


def test_profiler_measures_both_and_the_cost_table_has_their_rows(throwaway):
    rows = [measure_one(name, 27, 4, 2, repeats=1, threads=1) for name in ("sample_opd", PG, EXACT)]
    for row, name in zip(rows, ("sample_opd", PG, EXACT), strict=True):
        assert row["status"] == "ok" and row["estimator"] == name and row["step_s"] > 0
    agg, md = report.cost_table(pd.DataFrame(rows))
    assert set(agg["estimator"]) == {"sample_opd", PG, EXACT}
    assert f"| {PG} |" in md and f"| {EXACT} |" in md
    assert md.index("| sample_opd |") < md.index(f"| {PG} |") < md.index(f"| {EXACT} |")


def test_report_tables_have_a_row_for_each(throwaway):
    """Accuracy and training tables from a small synthetic runs frame: one row per throwaway,
    in catalog order, with its paired difference to the reference estimator."""
    rows = []
    for i, est in enumerate(("sample_opd", EXACT, PG, "vopd")):
        for seed in (0, 1):
            rows.append(
                (est, est, seed, 10, "eval", "toy_test", 4, "avg@4", 0.4 + 0.1 * i + 0.01 * seed)
            )
            for step in (1, 2):
                kl = 1.0 / step + i
                rows.append((est, est, seed, step, "train", "", 0, "estimator/kl_mean", kl))
    cols = ["variant", "estimator", "seed", "step", "source", "benchmark", "n", "metric", "value"]
    runs = pd.DataFrame(rows, columns=cols).assign(experiment="exp", variant_options="")
    csv, md = report.accuracy_table(runs, None)
    order = list(dict.fromkeys(csv["estimator"]))
    assert order == ["sample_opd", "vopd", PG, EXACT]
    mean = csv[(csv["estimator"] == PG) & (csv["metric"] == "avg@4")]["mean"]
    assert mean.tolist() == pytest.approx([0.605])
    delta = csv[(csv["estimator"] == EXACT) & (csv["metric"] == "delta_vs_sample_opd")]
    assert delta["mean"].tolist() == pytest.approx([0.1])
    assert f"| {PG} |" in md and f"| {EXACT} |" in md
    training, tmd = report.training_table(runs, window=1)
    assert {PG, EXACT} <= set(training["estimator"]) and f"| {PG} |" in tmd


@pytest.mark.parametrize("name", [PG, EXACT])
def test_one_training_run_in_process(throwaway, run_config, tmp_path, name):
    """vopd.train.train runs the throwaway from a YAML config: one step, its checkpoint, done.json
    naming it, a finite loss, and the pg one's advantage metrics (None for the exact one)."""
    from vopd.config import load_config

    cfg = load_config(run_config(estimator=name, max_steps=1, save_every=1, prompts_per_step=4))
    out = tmp_path / "run"
    done = train(cfg, out, progress=False)
    assert done["estimator"] == name and done["steps"] == 1 and done["checkpoints"] == [0, 1]
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert torch.isfinite(torch.tensor(row["train/loss"])) and row["train/grad_norm"] > 0
    if name == PG:
        assert row["estimator/adv_std"] > 0 and "estimator/baseline_mean" in row
    else:
        assert row["estimator/adv_mean"] is None


def test_variance_cli_probes_both(throwaway, tmp_path, tiny_models, tiny_world):
    """``python -m vopd.variance`` (in process) on a run of the pg throwaway: both throwaways get
    Monte-Carlo and exact probes next to the built-in ones."""
    from vopd.variance import main

    run = tmp_path / "results" / "exp" / PG / "seed0"
    shutil.copytree(tiny_models["student"], run / "checkpoints" / "step0")
    cfg = {
        "student": str(tiny_models["student"]),
        "teacher": str(tiny_models["teacher"]),
        "prompts": str(tiny_world / "prompts" / "train.parquet"),
        "estimator": PG,
        "prompts_per_step": 4,
        "max_new_tokens": 5,
        "seed": 0,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = run / "variance" / "step0.parquet"
    names = f"sample_opd,{PG},full_opd,{EXACT}"
    main(
        ["--run-dir", str(run), "--step", "0", "--out", str(out), "--k", "2", "--estimators", names]
    )
    df = pd.read_parquet(out)
    v = {(r.estimator, r.probe): r.value for r in df.itertuples()}
    for name in (PG, EXACT):
        assert v[(name, "total_variance")] > 0
        assert (name, "exact_position_bias_sqnorm") in v
    assert v[(PG, "exact_position_variance")] > 0 and (PG, "removable_variance") in v
    assert v[(EXACT, "exact_position_variance")] == 0.0
    assert v[(EXACT, "exact_position_bias_sqnorm")] == pytest.approx(
        0.25 * v[(EXACT, "exact_position_signal")], rel=1e-6
    )
