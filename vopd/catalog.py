"""The estimator catalog: the single source of what an OPD gradient estimator *is*.

Every module that needs to know about estimators (the trainer's config, the loss, the IS
correction, the variance probes, the profiler, the workflow's schema checks, the report's order
and labels, the tests) reads it here; nothing else lists estimator names. This module never
imports torch, so the workflow can read it while Snakemake parses the config.

An estimator is one :class:`EstimatorSpec`:

- ``family``: ``"pg"`` — one sampled token y_t per position and a detached advantage A_t, loss
  gradient −Σ_t w_t A_t ∇log p(y_t); or ``"exact"`` — the gradient of a divergence summed over
  (part of) the vocabulary, no sampled token.
- ``advantage`` (pg only): A as a function of the per-token reward r = log q(y) − log p(y), the
  per-row statistics it asks for in ``stats`` and the options. It is written once and evaluated
  both at the sampled token (the estimator, :mod:`vopd.estimators`) and at every vocabulary id
  (the exact per-position variance probe, :mod:`vopd.variance_math`): no second copy.
- ``options``: the options it reads, each declared once in :data:`OPTIONS` with its range.
- ``expectation``: what E_y of its gradient is (``reverse_kl``, ``forward_kl``, ``zero``, or
  ``biased``); ``unbiased`` means "expected gradient = ∇ reverse KL", the target of OPD.

Adding an estimator is one catalog entry (a pg one needs nothing else: its function is built
from ``advantage``) or one function plus one entry (an exact one):

    register(EstimatorSpec(name="half_vopd", family="pg", label="½-vOPD",
                           advantage=lambda r, s, o: r + 0.5 * s["kl"], stats=("kl",), ...))

Variants (:class:`Variant`) are named estimators with options and trainer overrides, the keys of
a workflow config's ``estimators:`` mapping; :func:`parse_variants` validates them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

NORMALIZE = ("token_mean", "seq_mean")
DEFAULT_TOP_K = 100  # official configs/training/vopd-topk.yaml: kl_top_k: 100 (docs/method.md)
FAMILIES = ("pg", "exact")
EXPECTATIONS = ("reverse_kl", "forward_kl", "zero", "biased")
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]*$"  # estimator and variant names: paths and wildcards
ROW_STATS = ("kl", "b_opt", "kl_topk")  # per-row statistics an advantage may ask for


# ---------------------------------------------------------------------------------------------
# Options: declared once, with their ranges.


@dataclass(frozen=True)
class Option:
    """One estimator option: its type, default and range. ``check`` returns the value or raises
    ``ValueError`` naming the option, the value and what was expected."""

    name: str
    kind: str  # "int", "float", "bool", "choice"
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False
    choices: tuple = ()
    biases: bool = False  # a non-null value changes what the gradient's expectation is

    def expected(self) -> str:
        if self.kind == "bool":
            what = "true or false"
        elif self.kind == "choice":
            what = f"one of {list(self.choices)}"
        else:
            lo = "-inf" if self.lo is None else f"{self.lo:g}"
            hi = "inf" if self.hi is None else f"{self.hi:g}"
            br = ("(" if self.lo_open or self.lo is None else "[") + f"{lo}, {hi}"
            br += ")" if self.hi_open or self.hi is None else "]"
            what = f"{'an integer' if self.kind == 'int' else 'a value'} in {br}"
        return what + (" or null (off)" if self.nullable else "")

    def check(self, value: Any, *, vocab_size: int | None = None) -> Any:
        """Validate ``value``; ``top_k`` is also checked against ``vocab_size`` when given."""
        expected = self.expected()
        if self.name == "top_k" and vocab_size is not None:
            expected = f"an integer in [1, V={vocab_size}]"
        bad = ValueError(f"{self.name}={value!r}: expected {expected}")
        if value is None:
            if self.nullable:
                return None
            raise bad
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if self.kind == "int" and not isinstance(value, int):
            raise bad
        if not math.isfinite(value):
            raise bad
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise bad
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            raise bad
        if self.name == "top_k" and vocab_size is not None and value > vocab_size:
            raise ValueError(f"top_k={value!r}: expected an integer in [1, V={vocab_size}]")
        return value


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("normalize", "choice", "token_mean", choices=NORMALIZE,
               doc="token_mean: mean over all completion tokens of the batch (official TRL "
                   "'dapo'); seq_mean: mean of per-sequence token means"),
        Option("top_k", "int", DEFAULT_TOP_K, lo=1,
               doc="size of the student's top-k support (official kl_top_k: 100)"),
        Option("reward_clip_lambda", "float", None, lo=0, hi=1, lo_open=True, hi_open=True,
               nullable=True, biases=True,
               doc="floor the reward at ln λ/(1 − λ) (official commit c77a078); null = off"),
        Option("detach_reward", "bool", True,
               doc="false reproduces the released undetached advantage (an implicit +1)"),
        Option("clamp", "float", None, lo=0, lo_open=True, nullable=True, biases=True,
               doc="clamp the k3 value to [−c, c], zero gradient outside (verl low_var_kl: "
                   "10); null = off"),
        Option("advantage", "float", -1.0,
               doc="the constant advantage c of const_adv (the null baseline)"),
    )
}  # fmt: skip
# ``chunk_rows`` is an implementation knob of every estimator (rows per no-grad chunk), not an
# estimator option: it changes memory, never a result, so it is not part of a variant.
RUNTIME_OPTIONS = ("chunk_rows",)


def check_options(estimator: str, options: Mapping, *, vocab_size: int | None = None) -> dict:
    """Validate options for ``estimator``: each a known option that this estimator reads, each in
    range. Returns them as a dict. Raises ``ValueError`` naming the key and what was expected."""
    spec = get(estimator)
    out = {}
    for key, value in options.items():
        if key not in OPTIONS:
            raise ValueError(f"unknown estimator option {key!r}: expected one of {sorted(OPTIONS)}")
        if key not in spec.reads:
            raise ValueError(
                f"option {key}={value!r} has no effect with estimator {estimator!r} "
                f"(it reads {sorted(spec.reads)})"
            )
        out[key] = OPTIONS[key].check(value, vocab_size=vocab_size)
    return out


# ---------------------------------------------------------------------------------------------
# Estimators.


@dataclass(frozen=True)
class EstimatorSpec:
    """What one estimator is; see the module docstring. ``fn`` (exact family) is the function
    ``loss, metrics = fn(student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, **opts)``,
    or ``"module:attr"`` to import lazily; pg estimators are built from ``advantage``."""

    name: str
    family: str
    label: str
    gradient: str  # the gradient of the loss, in one line (docs, README table)
    expectation: str
    source: str  # where the estimator comes from
    options: tuple[str, ...] = ()  # besides ``normalize``, which every estimator reads
    advantage: Callable | None = None  # pg: A = advantage(r, stats, options)
    stats: tuple[str, ...] = ()  # row statistics ``advantage`` reads (ROW_STATS)
    baseline: str | None = None  # pg with A = r − b: the baseline b, in words
    fn: Callable | str | None = None
    order: int = 1000
    metrics: tuple[str, ...] = field(default=())  # estimator-specific metric names (docs)

    def __post_init__(self):
        if not re.match(NAME_PATTERN, self.name):
            raise ValueError(f"estimator name {self.name!r}: expected to match {NAME_PATTERN}")
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family={self.family!r}: expected one of {FAMILIES}")
        if self.expectation not in EXPECTATIONS:
            raise ValueError(
                f"{self.name}: expectation={self.expectation!r}: expected one of {EXPECTATIONS}"
            )
        for opt in self.options:
            if opt not in OPTIONS:
                raise ValueError(f"{self.name}: option {opt!r}: expected one of {sorted(OPTIONS)}")
        for st in self.stats:
            if st not in ROW_STATS:
                raise ValueError(f"{self.name}: stat {st!r}: expected one of {ROW_STATS}")
        if self.family == "pg" and self.advantage is None:
            raise ValueError(f"{self.name}: a pg estimator needs an advantage function")
        if self.family == "exact" and self.fn is None:
            raise ValueError(f"{self.name}: an exact estimator needs its function fn")
        if "kl_topk" in self.stats and "top_k" not in self.options:
            raise ValueError(f"{self.name}: stat kl_topk needs the top_k option")

    @property
    def reads(self) -> tuple[str, ...]:
        """Every option the estimator reads (``normalize`` first)."""
        return ("normalize", *self.options)

    @property
    def unbiased(self) -> bool:
        """E_y[gradient] = ∇ reverse KL(p‖q) per position: the OPD target."""
        return self.expectation == "reverse_kl"

    @property
    def sampled(self) -> bool:
        """Uses a sampled token (the IS correction and the sampling variance apply)."""
        return self.family == "pg"

    @property
    def top_k(self) -> bool:
        return "top_k" in self.options

    def defaults(self) -> dict:
        return {o: OPTIONS[o].default for o in self.reads}


def _reward_clip_floor(lam: float) -> float:
    return math.log(lam) / (1.0 - lam)  # official `math.log(λ)/(1−λ)` (docs/method.md §reward)


def _sample_opd_advantage(r, s, o):
    lam = o.get("reward_clip_lambda")
    if lam is not None:
        return r.clamp_min(_reward_clip_floor(lam))  # r̂ = max(sg[r], ln λ/(1−λ))
    if not o.get("detach_reward", True):
        return r - 1.0  # ∇(−exp(lp − sg[lp])·r) = −(r − 1)∇lp: the released undetached path
    return r


def _k3_advantage(r, s, o):
    """k3 = e^{−d} − 1 + d with d = −r; d k3 / d(log p(y)) = 1 − e^{r}, so A = e^{r} − 1. With
    ``clamp`` c the value is clamped to [−c, c] (k3 ≥ 0, so only above c), gradient 0 there."""
    a = r.exp() - 1.0
    c = o.get("clamp")
    if c is not None:
        a = a.masked_fill((a - r) > c, 0.0)  # k3 = (e^r − 1) − r
    return a


_SPECS: dict[str, EstimatorSpec] = {}


def register(spec: EstimatorSpec, *, replace: bool = False) -> EstimatorSpec:
    """Add an estimator to the catalog (every module sees it from then on)."""
    if spec.name in _SPECS and not replace:
        raise ValueError(f"estimator {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an estimator (tests register throwaway ones)."""
    _SPECS.pop(name, None)


def get(name: str) -> EstimatorSpec:
    """The spec of ``name``; ``ValueError`` naming the known estimators if there is none."""
    if name not in _SPECS:
        raise ValueError(f"unknown estimator {name!r}: expected one of {names()}")
    return _SPECS[name]


def names() -> list[str]:
    """Every registered estimator, in display order."""
    return sorted(_SPECS, key=lambda n: (_SPECS[n].order, n))


def specs() -> list[EstimatorSpec]:
    return [_SPECS[n] for n in names()]


def sampled() -> list[str]:
    """Estimators that use a sampled token (policy-gradient family)."""
    return [s.name for s in specs() if s.sampled]


def unbiased() -> list[str]:
    return [s.name for s in specs() if s.unbiased]


def order_key(name: str) -> tuple:
    """Sort key for display: catalog order, unknown names last (alphabetically)."""
    return (_SPECS[name].order, name) if name in _SPECS else (10**9, name)


def label(name: str) -> str:
    return _SPECS[name].label if name in _SPECS else name


# The paper's estimators (docs/method.md), ours, and the ones peers use (docs/estimators.md).
for _spec in (
    EstimatorSpec(
        name="sample_opd", family="pg", label="sample OPD", order=10,
        gradient="−Σ w_t sg[r_t] ∇log p(y_t)", expectation="reverse_kl", baseline="0",
        source="official distill_mode tml (TRL MiniLLM, Tinker-style on-policy KD)",
        options=("reward_clip_lambda", "detach_reward"), advantage=_sample_opd_advantage,
    ),
    EstimatorSpec(
        name="vopd", family="pg", label="vOPD", order=20,
        gradient="−Σ w_t sg[r_t + KL_t] ∇log p(y_t)", expectation="reverse_kl",
        baseline="−KL_t (the closed-form value)", source="the paper; official vopd.yaml",
        stats=("kl",), advantage=lambda r, s, o: r + s["kl"],
    ),
    EstimatorSpec(
        name="vopd_topk", family="pg", label="vOPD top-k", order=30,
        gradient="−Σ w_t sg[r_t + KL(p̃‖q̃)_t] ∇log p(y_t), student top-k, renormalised",
        expectation="reverse_kl", baseline="−KL(p̃‖q̃) on the student's top-k",
        source="the paper; official vopd-topk.yaml", options=("top_k",), stats=("kl_topk",),
        advantage=lambda r, s, o: r + s["kl_topk"],
        metrics=("kl_topk_mean", "student_mass", "teacher_mass"),
    ),
    EstimatorSpec(
        name="full_opd", family="exact", label="full OPD", order=40,
        gradient="Σ w_t ∇KL_t", expectation="reverse_kl",
        source="official distill_mode gkd_rkl", fn="vopd.estimators.core:full_opd",
    ),
    EstimatorSpec(
        name="topk_opd", family="exact", label="top-k OPD", order=50,
        gradient="Σ w_t ∇KL(p̃‖q̃)_t on the student's top-k ids", expectation="biased",
        source="official gkd_rkl + opd_top_k; Rethinking OPD (arXiv 2604.13016)",
        options=("top_k",), fn="vopd.estimators.core:topk_opd", metrics=("kl_topk_mean",),
    ),
    EstimatorSpec(
        name="opt_baseline", family="pg", label="optimal baseline", order=60,
        gradient="−Σ w_t sg[r_t − b*_t] ∇log p(y_t)", expectation="reverse_kl",
        baseline="b*_t, the variance-optimal per-position baseline",
        source="beyond the paper (this suite)", stats=("b_opt",),
        advantage=lambda r, s, o: r - s["b_opt"],
    ),
    EstimatorSpec(
        name="k1_loss", family="pg", label="k1 loss", order=70,
        gradient="Σ w_t ∇log p(y_t)  (loss Σ w_t d_t, d_t = log p(y_t) − log q(y_t))",
        expectation="zero", source="verl kl_loss_type k1 (Schulman's k1 as a loss)",
        advantage=lambda r, s, o: r * 0.0 - 1.0,
    ),
    EstimatorSpec(
        name="k2_loss", family="pg", label="k2 loss", order=80,
        gradient="Σ w_t d_t ∇log p(y_t)  (loss Σ w_t ½ d_t²)", expectation="reverse_kl",
        source="verl kl_loss_type k2 / mse", advantage=lambda r, s, o: r,
    ),
    EstimatorSpec(
        name="k3_loss", family="pg", label="k3 loss", order=90,
        gradient="Σ w_t (1 − q(y_t)/p(y_t)) ∇log p(y_t)  (loss Σ w_t (e^{−d_t} − 1 + d_t))",
        expectation="forward_kl", source="verl kl_loss_type k3 / low_var_kl (clamp 10)",
        options=("clamp",), advantage=_k3_advantage,
    ),
    EstimatorSpec(
        name="forward_kl_topk", family="exact", label="forward KL top-k (teacher)", order=100,
        gradient="Σ w_t (p − q̃), q̃ the teacher renormalised on its top-k",
        expectation="biased", source="verl on-policy distillation forward_kl_topk",
        options=("top_k",), fn="vopd.estimators.core:forward_kl_topk",
        metrics=("forward_kl_topk_mean", "teacher_mass"),
    ),
    EstimatorSpec(
        name="const_adv", family="pg", label="constant advantage", order=110,
        gradient="−Σ w_t c ∇log p(y_t), no teacher", expectation="zero",
        source="the null of 'Does OPD really distill?' (arXiv 2608.31046)",
        options=("advantage",), advantage=lambda r, s, o: r * 0.0 + o.get("advantage", -1.0),
    ),
):  # fmt: skip
    register(_spec)


# ---------------------------------------------------------------------------------------------
# Variants: the keys of a workflow config's ``estimators:`` mapping.


@dataclass(frozen=True)
class Variant:
    """A named estimator with options and trainer overrides. ``vopd: {}`` means vopd itself;
    ``vopd_topk_k16: {estimator: vopd_topk, top_k: 16}`` a top-k variant;
    ``sample_lr1e3: {estimator: sample_opd, overrides: {lr: 1.0e-3}}`` a trainer override."""

    name: str
    estimator: str
    options: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)

    @property
    def unbiased(self) -> bool:
        """Its estimator is unbiased and no option of the variant changes that (a reward floor,
        a clamp: ``Option.biases``)."""
        opts = self.options.items()
        changed = any(k in OPTIONS and OPTIONS[k].biases and v is not None for k, v in opts)
        return get(self.estimator).unbiased and not changed

    def train_overrides(self) -> dict:
        """``key: value`` for ``python -m vopd.train``: the estimator, its options, overrides."""
        return {**self.overrides, "estimator": self.estimator, **self.options}

    def describe(self) -> str:
        """The estimator and its options and overrides, e.g. ``vopd_topk (top_k=16)``."""
        extra = [f"{k}={v}" for k, v in {**self.options, **self.overrides}.items()]
        return self.estimator + (f" ({', '.join(extra)})" if extra else "")


def parse_variant(
    name: str, entry: Mapping | None, *, vocab_size: int | None = None, key: str = "estimators"
) -> Variant:
    """Validate one ``estimators:`` entry. Errors name ``key.name`` and what was expected."""
    where = f"{key}.{name}"
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise ValueError(f"{key}: variant name {name!r}: expected to match {NAME_PATTERN}")
    if entry is not None and not isinstance(entry, Mapping):
        raise ValueError(f"{where}={entry!r}: expected a mapping of estimator: and options")
    entry = dict(entry or {})
    named = "estimator" in entry  # the hint below is for a bare name only
    estimator = entry.pop("estimator", name)
    if not isinstance(estimator, str) or estimator not in _SPECS:
        hint = "" if named else " (or set estimator: for a variant)"
        raise ValueError(
            f"{where}: unknown estimator {estimator!r}: expected one of {names()}{hint}"
        )
    overrides = entry.pop("overrides", {}) or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}.overrides={overrides!r}: expected a mapping of trainer keys")
    for k in overrides:
        if k in OPTIONS or k == "estimator":
            raise ValueError(
                f"{where}.overrides.{k}: estimator options go next to estimator:, not in overrides"
            )
    try:
        options = check_options(estimator, entry, vocab_size=vocab_size)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return Variant(name, estimator, options, dict(overrides))


def parse_variants(
    raw: Mapping, *, vocab_size: int | None = None, key: str = "estimators"
) -> dict[str, Variant]:
    """Validate a whole ``estimators:`` mapping (names unique by construction)."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{key}={raw!r}: expected a non-empty mapping of variant: options")
    return {n: parse_variant(n, e, vocab_size=vocab_size, key=key) for n, e in raw.items()}
