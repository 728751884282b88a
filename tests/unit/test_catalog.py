"""The estimator catalog (vopd.catalog): option ranges and their messages, variant parsing errors
naming the key, EstimatorSpec validation, registration, and the catalog's own consistency."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from vopd import catalog
from vopd.catalog import OPTIONS, EstimatorSpec, Option, Variant, parse_variant, parse_variants

# ---------------------------------------------------------------------------------------------
# Option.check: every kind, its range and its message.

GOOD = [
    ("top_k", 1, None),
    ("top_k", 10**6, None),
    ("top_k", 6, 6),  # k = V: the full-vocabulary estimator
    ("reward_clip_lambda", 0.5, None),
    ("reward_clip_lambda", None, None),  # off
    ("reward_clip_lambda", 1e-9, None),
    ("detach_reward", True, None),
    ("detach_reward", False, None),
    ("clamp", None, None),
    ("clamp", 10, None),  # an int is a valid float option
    ("clamp", 1e-9, None),
    ("advantage", -1.0, None),
    ("advantage", 0, None),
    ("advantage", 1e6, None),
    ("normalize", "token_mean", None),
    ("normalize", "seq_mean", None),
]


@pytest.mark.parametrize("name,value,vocab", GOOD)
def test_option_check_returns_a_valid_value_unchanged(name, value, vocab):
    assert OPTIONS[name].check(value, vocab_size=vocab) == value


BAD = [
    ("top_k", 0, None, r"top_k=0: expected an integer in \[1, inf\)$"),
    ("top_k", -3, None, r"top_k=-3: expected an integer in \[1, inf\)$"),
    ("top_k", True, None, r"top_k=True: expected an integer"),  # bool is not an int here
    ("top_k", 2.0, None, r"top_k=2\.0: expected an integer"),
    ("top_k", math.nan, None, r"top_k=nan: expected an integer"),
    ("top_k", None, None, r"top_k=None: expected an integer in \[1, inf\)$"),
    ("top_k", "4", None, r"top_k='4': expected an integer"),
    ("top_k", 7, 6, r"top_k=7: expected an integer in \[1, V=6\]$"),
    ("top_k", 0, 6, r"top_k=0: expected an integer in \[1, V=6\]$"),
    ("reward_clip_lambda", 0, None, r"expected a value in \(0, 1\) or null \(off\)$"),
    ("reward_clip_lambda", 1.0, None, r"reward_clip_lambda=1\.0: expected a value in \(0, 1\)"),
    ("reward_clip_lambda", math.nan, None, r"reward_clip_lambda=nan: expected a value in"),
    ("reward_clip_lambda", math.inf, None, r"reward_clip_lambda=inf: expected a value in"),
    ("reward_clip_lambda", True, None, r"reward_clip_lambda=True: expected a value in"),
    ("reward_clip_lambda", "0.5", None, r"reward_clip_lambda='0\.5': expected a value in"),
    ("detach_reward", 0, None, r"detach_reward=0: expected true or false$"),
    ("detach_reward", 1, None, r"detach_reward=1: expected true or false$"),
    ("detach_reward", "false", None, r"detach_reward='false': expected true or false$"),
    ("detach_reward", None, None, r"detach_reward=None: expected true or false$"),
    ("clamp", 0, None, r"clamp=0: expected a value in \(0, inf\) or null \(off\)$"),
    ("clamp", -10.0, None, r"clamp=-10\.0: expected a value in \(0, inf\)"),
    ("clamp", math.nan, None, r"clamp=nan: expected a value in \(0, inf\)"),
    ("clamp", math.inf, None, r"clamp=inf: expected a value in \(0, inf\)"),
    ("clamp", False, None, r"clamp=False: expected a value in \(0, inf\)"),
    ("advantage", math.nan, None, r"advantage=nan: expected a value in \(-inf, inf\)$"),
    ("advantage", -math.inf, None, r"advantage=-inf: expected a value in \(-inf, inf\)$"),
    ("advantage", None, None, r"advantage=None: expected a value in \(-inf, inf\)$"),
    ("advantage", True, None, r"advantage=True: expected a value"),
    ("normalize", "sum", None, r"normalize='sum': expected one of \['token_mean', 'seq_mean'\]$"),
    ("normalize", None, None, r"normalize=None: expected one of"),
]


@pytest.mark.parametrize("name,value,vocab,message", BAD, ids=lambda x: repr(x)[:24])
def test_option_check_rejects_naming_the_option_the_value_and_the_range(
    name, value, vocab, message
):
    with pytest.raises(ValueError, match=message):
        OPTIONS[name].check(value, vocab_size=vocab)


def test_every_option_default_passes_its_own_check_and_is_documented():
    for name, option in OPTIONS.items():
        assert option.name == name and option.doc
        assert option.check(option.default) == option.default
        assert option.kind in ("int", "float", "bool", "choice")


def test_expected_formats_closed_and_open_bounds():
    assert Option("x", "float", 0.5, "d", lo=0, hi=1).expected() == "a value in [0, 1]"
    assert Option("x", "int", 1, "d", lo=1, hi=8, hi_open=True).expected() == (
        "an integer in [1, 8)"
    )
    closed = Option("x", "float", 0.0, "d", lo=0, hi=1)
    assert closed.check(0) == 0 and closed.check(1) == 1
    with pytest.raises(ValueError, match=r"x=1\.5: expected a value in \[0, 1\]"):
        closed.check(1.5)


# ---------------------------------------------------------------------------------------------
# check_options and variants: errors name the key.


def test_check_options_unknown_unread_and_out_of_range():
    assert catalog.check_options("vopd_topk", {"top_k": 4}, vocab_size=27) == {"top_k": 4}
    with pytest.raises(ValueError, match=r"unknown estimator option 'topk': expected one of \["):
        catalog.check_options("vopd_topk", {"topk": 4})
    with pytest.raises(
        ValueError, match=r"option top_k=4 has no effect with estimator 'vopd' \(it reads \['norm"
    ):
        catalog.check_options("vopd", {"top_k": 4})
    with pytest.raises(ValueError, match=r"clamp=0: expected"):
        catalog.check_options("k3_loss", {"clamp": 0})
    with pytest.raises(ValueError, match=r"unknown estimator 'nope': expected one of \["):
        catalog.check_options("nope", {})


def test_parse_variant_of_a_bare_name_and_of_a_named_estimator():
    assert parse_variant("vopd", None) == Variant("vopd", "vopd")
    assert parse_variant("vopd", {}) == Variant("vopd", "vopd")
    v = parse_variant(
        "vopd_topk_k16", {"estimator": "vopd_topk", "top_k": 16, "overrides": {"lr": 1e-3}}
    )
    assert v == Variant("vopd_topk_k16", "vopd_topk", {"top_k": 16}, {"lr": 1e-3})
    assert v.describe() == "vopd_topk (top_k=16, lr=0.001)"
    assert v.train_overrides() == {"lr": 1e-3, "estimator": "vopd_topk", "top_k": 16}
    assert parse_variant("k3c", {"estimator": "k3_loss", "clamp": 10}).options == {"clamp": 10}
    null = parse_variant("null", {"estimator": "const_adv", "advantage": -2.0})
    assert null.describe() == "const_adv (advantage=-2.0)"
    assert Variant("vopd", "vopd").describe() == "vopd"


def test_variant_unbiased_follows_the_estimator_and_the_options_that_bias_it():
    assert Variant("v", "vopd").unbiased and Variant("s", "sample_opd").unbiased
    assert Variant("u", "sample_opd", {"detach_reward": False}).unbiased  # a constant baseline
    assert Variant("n", "sample_opd", {"reward_clip_lambda": None}).unbiased  # off
    assert not Variant("c", "sample_opd", {"reward_clip_lambda": 0.5}).unbiased
    assert not Variant("k", "topk_opd", {"top_k": 4}).unbiased
    assert not Variant("k3", "k3_loss", {"clamp": 10.0}).unbiased
    assert {n for n, o in OPTIONS.items() if o.biases} == {"reward_clip_lambda", "clamp"}


VARIANT_ERRORS = [
    ({"vopd2": {}}, r"^estimators\.vopd2: unknown estimator 'vopd2': expected one of \[.*\] "
     r"\(or set estimator: for a variant\)$"),
    ({"x": {"estimator": "nope"}}, r"^estimators\.x: unknown estimator 'nope': expected one of "
     r"\[[^]]*\]$"),  # no hint: estimator: was set
    ({"x": {"estimator": ["vopd"]}}, r"^estimators\.x: unknown estimator \['vopd'\]"),
    ({"x": 3}, r"^estimators\.x=3: expected a mapping"),
    ({"x": ["vopd"]}, r"^estimators\.x=\['vopd'\]: expected a mapping"),
    ({"v": {"estimator": "vopd", "top_k": 4}}, r"^estimators\.v: option top_k=4 has no effect "
     r"with estimator 'vopd' \(it reads \['normalize'\]\)$"),
    ({"vt": {"estimator": "vopd_topk", "topk": 4}}, r"^estimators\.vt: unknown estimator option "
     r"'topk'"),
    ({"vt": {"estimator": "vopd_topk", "top_k": 28}}, r"^estimators\.vt: top_k=28: expected an "
     r"integer in \[1, V=27\]$"),
    ({"vt": {"estimator": "vopd_topk", "top_k": 0}}, r"^estimators\.vt: top_k=0: expected"),
    ({"k3": {"estimator": "k3_loss", "clamp": math.nan}}, r"^estimators\.k3: clamp=nan: expected"),
    ({"c": {"estimator": "const_adv", "advantage": math.inf}}, r"^estimators\.c: advantage=inf"),
    ({"s": {"estimator": "sample_opd", "reward_clip_lambda": 1.0}}, r"^estimators\.s: "
     r"reward_clip_lambda=1\.0: expected a value in \(0, 1\)"),
    ({"s": {"estimator": "sample_opd", "overrides": {"reward_clip_lambda": 0.5}}},
     r"^estimators\.s\.overrides\.reward_clip_lambda: estimator options go next to estimator:"),
    ({"s": {"estimator": "sample_opd", "overrides": {"top_k": 4}}},
     r"^estimators\.s\.overrides\.top_k: estimator options go next to estimator:"),
    ({"s": {"estimator": "sample_opd", "overrides": {"estimator": "vopd"}}},
     r"^estimators\.s\.overrides\.estimator: estimator options go next"),
    ({"vopd": {"overrides": [1]}}, r"^estimators\.vopd\.overrides=\[1\]: expected a mapping"),
    ({"bad name": {}}, r"^estimators: variant name 'bad name': expected to match"),
    ({"x/y": {"estimator": "vopd"}}, r"^estimators: variant name 'x/y': expected to match"),
    ({}, r"^estimators=\{\}: expected a non-empty mapping"),
    (["vopd"], r"^estimators=\['vopd'\]: expected a non-empty mapping"),
]  # fmt: skip


@pytest.mark.parametrize("raw,message", VARIANT_ERRORS, ids=lambda x: repr(x)[:40])
def test_parse_variants_errors_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(raw, vocab_size=27)


def test_parse_variants_key_and_vocabulary():
    """``key`` names where the mapping came from; without a vocabulary top_k is only >= 1."""
    with pytest.raises(ValueError, match=r"^--variants\.v: option top_k"):
        parse_variants({"v": {"estimator": "vopd", "top_k": 4}}, key="--variants")
    big = parse_variants({"vt": {"estimator": "vopd_topk", "top_k": 1000}})
    assert big["vt"].options == {"top_k": 1000}
    both = parse_variants({"vopd": {}, "vt": {"estimator": "vopd_topk", "top_k": 4}})
    assert list(both) == ["vopd", "vt"] and both["vt"].estimator == "vopd_topk"


# ---------------------------------------------------------------------------------------------
# EstimatorSpec validation and registration.


def _spec(**kw):
    base = {
        "name": "tmp_est",
        "family": "pg",
        "label": "tmp",
        "gradient": "g",
        "expectation": "reverse_kl",
        "source": "test",
        "advantage": lambda r, s, o: r,
    }
    return EstimatorSpec(**{**base, **kw})


SPEC_ERRORS = [
    ({"name": "1abc"}, r"estimator name '1abc': expected to match"),
    ({"name": "a b"}, r"estimator name 'a b': expected to match"),
    ({"family": "mc"}, r"tmp_est: family='mc': expected one of \('pg', 'exact'\)"),
    ({"expectation": "unbiased"}, r"tmp_est: expectation='unbiased': expected one of"),
    ({"options": ("topk",)}, r"tmp_est: option 'topk': expected one of \["),
    ({"options": ("normalize", "top_k", "chunk_rows")}, r"option 'chunk_rows'"),
    ({"stats": ("entropy",)}, r"tmp_est: stat 'entropy': expected one of \('kl', 'b_opt'"),
    ({"advantage": None}, r"tmp_est: a pg estimator needs an advantage function"),
    ({"family": "exact", "advantage": None}, r"tmp_est: an exact estimator needs its function"),
    ({"stats": ("kl_topk",)}, r"tmp_est: stat kl_topk needs the top_k option"),
]


@pytest.mark.parametrize("kw,message", SPEC_ERRORS, ids=lambda x: repr(x)[:30])
def test_estimator_spec_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        _spec(**kw)


def test_spec_properties():
    s = _spec(options=("top_k",), stats=("kl_topk",))
    assert s.reads == ("normalize", "top_k") and s.top_k and s.sampled and s.unbiased
    assert s.defaults() == {"normalize": "token_mean", "top_k": catalog.DEFAULT_TOP_K}
    e = _spec(family="exact", fn="vopd.estimators:full_opd", expectation="biased")
    assert not e.sampled and not e.unbiased and not e.top_k and e.reads == ("normalize",)


@pytest.fixture
def tmp_spec():
    spec = _spec(order=25)
    catalog.register(spec)
    yield spec
    catalog.unregister(spec.name)
    assert spec.name not in catalog.names()


def test_register_and_unregister(tmp_spec):
    """A registered spec appears in names() at its display order, in sampled()/unbiased(), and
    get/label/order_key see it; a second registration needs replace=True; unregister of an
    unknown name is a no-op."""
    names = catalog.names()
    assert names.index("tmp_est") == names.index("vopd") + 1  # order 25: after vopd (20)
    assert "tmp_est" in catalog.sampled() and "tmp_est" in catalog.unbiased()
    assert catalog.get("tmp_est") is tmp_spec and catalog.label("tmp_est") == "tmp"
    with pytest.raises(ValueError, match="estimator 'tmp_est' is already registered"):
        catalog.register(_spec())
    other = _spec(label="tmp2", order=25)
    assert catalog.register(other, replace=True) is other and catalog.label("tmp_est") == "tmp2"
    catalog.unregister("never_registered")


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown estimator 'vopd2': expected one of \['sample"):
        catalog.get("vopd2")
    assert catalog.label("vopd2") == "vopd2"
    assert catalog.order_key("zzz") > catalog.order_key(catalog.names()[-1])
    assert catalog.order_key("aaa") < catalog.order_key("zzz")  # unknown: alphabetical, last


# ---------------------------------------------------------------------------------------------
# The catalog's own consistency.


def test_catalog_queries_agree_with_the_specs():
    specs = catalog.specs()
    assert [s.name for s in specs] == catalog.names()
    assert len(set(catalog.names())) == len(specs)
    keys = [catalog.order_key(n) for n in catalog.names()]
    assert keys == sorted(keys)
    assert catalog.sampled() == [s.name for s in specs if s.family == "pg"]
    assert catalog.unbiased() == [s.name for s in specs if s.expectation == "reverse_kl"]
    for s in specs:
        assert s.label and s.gradient and s.source
        assert set(s.reads) <= set(OPTIONS)
        for opt, value in s.defaults().items():
            assert OPTIONS[opt].check(value) == value
        if s.family == "exact":
            assert s.fn is not None and s.advantage is None and not s.stats


def test_the_catalog_never_imports_torch():
    """The workflow reads the catalog while Snakemake parses the config: no torch import."""
    code = "import sys, vopd.catalog; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
