"""On-policy distillation gradient estimators: the math of vOPD (arXiv 2605.07865) and its rivals.

Every estimator maps

    loss, metrics = fn(student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, **options)

where position t of the logits already predicts ``tokens_BT[:, t]``. With p the student, q the
teacher (both full-vocabulary softmax), y_t the sampled token, sg = detach:

    r_t  = log q(y_t) − log p(y_t)                       (per-token reward; E_y[r_t] = −KL_t)
    KL_t = Σ_v p(v) [log p(v) − log q(v)]                (docs/method.md §1)

Which estimators exist, their family, options and advantages live in :mod:`vopd.catalog`
(``ESTIMATORS`` below is a live view of it). The paper's (docs/method.md), ours and the peers'
(docs/estimators.md):

| name            | d loss / d student logits                                                  |
| sample_opd      | −Σ_t w_t sg[r_t] ∇log p(y_t)                                               |
| vopd            | −Σ_t w_t sg[r_t + KL_t] ∇log p(y_t)                                        |
| vopd_topk       | same, KL over the student's top-k ids, both renormalised there             |
| full_opd        | +Σ_t w_t ∇KL_t                                                             |
| topk_opd        | +Σ_t w_t ∇KL(p̃‖q̃) on the student's top-k ids (ids detached)              |
| opt_baseline    | −Σ_t w_t sg[r_t − b*_t] ∇log p(y_t), b*_t the variance-optimal baseline    |
| k1_loss         | +Σ_t w_t ∇log p(y_t)                      (expectation 0)                  |
| k2_loss         | −Σ_t w_t sg[r_t] ∇log p(y_t)              (= sample_opd, sample by sample) |
| k3_loss         | +Σ_t w_t (1 − q(y_t)/p(y_t)) ∇log p(y_t)  (expectation ∇ forward KL)       |
| forward_kl_topk | +Σ_t w_t (p − q̃), q̃ the teacher renormalised on its top-k ids            |
| const_adv       | −Σ_t w_t c ∇log p(y_t)                    (expectation 0; no teacher)      |

w_t are the normalisation weights: ``token_mean`` (default) w_t = m_t / Σm, the official TRL
"dapo" global token mean; ``seq_mean`` w_t = m_t / (n_b · B'), the mean of per-sequence token
means over the B' sequences that have any token (the official Full-OPD micro-batch mean).

The loss *value* of every estimator is an estimate of the weighted reverse KL (Σ w·(−r) for the
policy-gradient ones, Σ w·KL for the exact ones), so values are comparable across estimators;
the gradient is built with ``value + (surrogate − sg[surrogate])``.

Memory: no [B,T,V] tensor beyond the inputs and the student's gradient is ever alive. Every
full-vocabulary quantity is computed in row chunks with no grad; the two differentiable blocks
(selective log-softmax and full reverse KL) are autograd functions whose backward writes the
analytic gradient chunk by chunk. Work is done in float32 (float64 for float64
inputs) whatever the input dtype.
"""

from __future__ import annotations

import copy
import functools
import importlib
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from vopd import catalog
from vopd.catalog import DEFAULT_TOP_K, NORMALIZE  # noqa: F401  (re-exported)

# Chunk sizes (elements of one [rows, V] work buffer). On CPU a chunk's few buffers stay in the
# L2/L3 cache, so every op after the first re-reads them from cache, not from DRAM; on a GPU the
# chunks are larger so that kernel launches are amortised. Either way no [B,T,V] temporary exists.
_CHUNK_ELEMENTS = 1 << 24  # GPU: 64 MiB of float32 per buffer
_CPU_CHUNK_ELEMENTS = 1 << 19  # CPU: 2 MiB of float32 per buffer (3 rows at V = 151,936)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types and float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(V: int, chunk_rows: int | None, device: torch.device | None = None) -> int:
    if chunk_rows is None:
        cpu = device is None or torch.device(device).type == "cpu"
        return max(1, (_CPU_CHUNK_ELEMENTS if cpu else _CHUNK_ELEMENTS) // V)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: expected a positive row count or None")
    return chunk_rows


class _Chunks:
    """Row chunks of [N, V] tensors with reusable work buffers: one allocation per call (and
    worker), not per chunk (with glibc's mmap threshold low, a fresh buffer per chunk costs its
    page faults).

    ``map(body)`` runs ``body(sl, work)`` for every chunk ``sl``; ``work.acc(i, x_rV)`` is
    ``x_rV`` itself when it already has the accumulation dtype, else its cast into work buffer
    i; ``work.buf(i, r)`` is work buffer i's first r rows. Chunks are independent row ranges, so
    on CPU with T > 1 torch threads, T Python workers take chunks from one queue and run each
    with one torch thread (ops release the GIL): no fork/join of the thread pool per op, and a
    worker the OS deschedules on a busy machine holds up only its own chunk."""

    def __init__(self, N: int, V: int, chunk_rows: int | None, like: Tensor, acc: torch.dtype):
        self.N, self.V, self.acc_dtype, self.device = N, V, acc, like.device
        self.rows = max(1, min(N, _chunk_rows(V, chunk_rows, like.device)))
        self._bufs: dict[int, Tensor] = {}

    def __iter__(self):
        for a in range(0, self.N, self.rows):
            yield slice(a, min(a + self.rows, self.N))

    def buf(self, i: int, r: int) -> Tensor:
        if i not in self._bufs:
            self._bufs[i] = torch.empty(self.rows, self.V, dtype=self.acc_dtype, device=self.device)
        return self._bufs[i][:r]

    def acc(self, i: int, x_rV: Tensor) -> Tensor:
        return x_rV if x_rV.dtype == self.acc_dtype else self.buf(i, x_rV.shape[0]).copy_(x_rV)

    def map(self, body) -> None:
        slices = list(self)
        workers = min(len(slices), torch.get_num_threads()) if self.device.type == "cpu" else 1
        if workers <= 1:
            for sl in slices:
                body(sl, self)
            return
        queue, lock = iter(slices), threading.Lock()

        def work() -> None:
            own = copy.copy(self)
            own._bufs = {}
            with torch.no_grad():  # grad mode is per thread: the callers run without grad
                while True:
                    with lock:
                        sl = next(queue, None)
                    if sl is None:
                        return
                    body(sl, own)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # new threads start with the global count: one each
        try:
            with ThreadPoolExecutor(workers) as pool:
                for job in [pool.submit(work) for _ in range(workers)]:
                    job.result()
        finally:
            torch.set_num_threads(threads)


def _lse_(x_rV: Tensor, work_rV: Tensor, *, softmax: bool) -> Tensor:
    """log Σ_v exp(x_v) per row with one fused (log-)softmax kernel written into ``work_rV``:
    softmax p = exp(x − lse) gives lse = max x − log max p, log-softmax gives lse = max x − max
    log p (both exact up to rounding: max p ≥ 1/V, no reliance on any one entry's size)."""
    max_x = x_rV.amax(-1)
    if softmax:
        torch.softmax(x_rV, -1, out=work_rV)
        return max_x - work_rV.amax(-1).log_()
    torch.log_softmax(x_rV, -1, out=work_rV)
    return max_x - work_rV.amax(-1)


# ---------------------------------------------------------------------------------------------
# Row statistics: one no-grad pass over the vocabulary, chunked.


@torch.no_grad()
def row_stats(
    student_NV: Tensor,
    teacher_NV: Tensor,
    tokens_N: Tensor,
    *,
    kl: bool = False,
    opt_baseline: bool = False,
    entropy: bool = False,
    chunk_rows: int | None = None,
) -> dict[str, Tensor]:
    """Per-row statistics (in ``acc_dtype``) of flattened logits [N, V] s (student), t (teacher):
    ``lse_p``, ``lse_q``, ``logp_y``, ``logq_y``, and on request ``kl``, ``entropy``, ``b_opt``.

    One exponential per model and row (a fused softmax kernel per model and chunk): with
    p = softmax(s) and d = s − t,
        KL_t = Σ_v p (log p − log q) = ⟨p, d⟩ − lse_p + lse_q,
        H_t  = −Σ_v p log p         = lse_p − ⟨p, s⟩.
    b*_t = Σ_v p w_v r(v) / Σ_v p w_v with w_v = ‖e_v − p‖² = 1 − 2p(v) + Σ_u p(u)², the constant
    that minimises E_y‖(r(y) − b) ∇_z log p(y)‖² in logit space (beyond the paper). With
    P2 = Σ p², Σ p w r = −(1 + P2)·KL − 2 Σ p² r and Σ p w = 1 − P2. When p is one-hot that
    denominator is 0 and every ∇_z log p(y) vanishes; −KL_t is used there.
    """
    N, V = student_NV.shape
    acc = acc_dtype(student_NV.dtype)
    names = ["lse_p", "lse_q", "logp_y", "logq_y"]
    names += [k for k, on in (("kl", kl or opt_baseline), ("entropy", entropy)) if on]
    names += ["b_opt"] if opt_baseline else []
    out = {k: student_NV.new_empty(N, dtype=acc) for k in names}
    need_p = "kl" in out or entropy

    def body(sl: slice, w: _Chunks) -> None:
        s, t, y = w.acc(0, student_NV[sl]), w.acc(1, teacher_NV[sl]), tokens_N[sl, None]
        r = s.shape[0]
        p, work = w.buf(2, r), w.buf(3, r)  # p: softmax (or log-softmax) of s
        lse_q = _lse_(t, work, softmax=False)
        out["lse_q"][sl] = lse_q
        out["logq_y"][sl] = t.gather(-1, y)[:, 0] - lse_q
        lse_p = _lse_(s, p, softmax=need_p)
        out["lse_p"][sl] = lse_p
        out["logp_y"][sl] = s.gather(-1, y)[:, 0] - lse_p
        if entropy:
            out["entropy"][sl] = lse_p - torch.mul(p, s, out=work).sum(-1)
        if "kl" not in out:
            return
        pd = torch.sub(s, t, out=work).mul_(p)  # p·d
        kl_rows = pd.sum(-1) - lse_p + lse_q
        out["kl"][sl] = kl_rows
        if opt_baseline:
            sum_p2_d = pd.mul_(p).sum(-1)  # Σ p² d
            sum_p2 = torch.mul(p, p, out=work).sum(-1)
            sum_p2_r = sum_p2 * (lse_p - lse_q) - sum_p2_d  # Σ p² r, r = −d − lse_q + lse_p
            num, den = -(1.0 + sum_p2) * kl_rows - 2.0 * sum_p2_r, 1.0 - sum_p2
            out["b_opt"][sl] = torch.where(den > 1e-12, num / den.clamp_min(1e-12), -kl_rows)

    _Chunks(N, V, chunk_rows, student_NV, acc).map(body)
    return out


@torch.no_grad()
def topk_ids(student_NV: Tensor, k: int, *, chunk_rows: int | None = None) -> Tensor:
    """The student's top-k vocabulary ids per row, [N, K] (no grad: the support is detached)."""
    N, V = student_NV.shape
    ids = torch.empty(N, k, dtype=torch.long, device=student_NV.device)

    def body(sl: slice, _) -> None:
        ids[sl] = student_NV[sl].topk(k, dim=-1, sorted=False).indices

    _Chunks(N, V, chunk_rows, student_NV, student_NV.dtype).map(body)
    return ids


# ---------------------------------------------------------------------------------------------
# Differentiable building blocks.


def _write_grad(chunks: _Chunks, grad_NV: Tensor, sl: slice, r: int) -> Tensor:
    """Where chunk ``sl``'s gradient is computed: straight into ``grad_NV`` when it has the
    accumulation dtype, else into work buffer 4 (copied, cast, by ``_flush``)."""
    return grad_NV[sl] if grad_NV.dtype == chunks.acc_dtype else chunks.buf(4, r)


def _flush(grad_NV: Tensor, sl: slice, g_rV: Tensor) -> None:
    if g_rV.data_ptr() != grad_NV[sl].data_ptr():
        grad_NV[sl].copy_(g_rV)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log p(y_n) = z_n[y_n] − lse(z_n); backward writes g_n (e_{y_n} − softmax(z_n)) by chunks:
    one fused softmax kernel per chunk, scaled in place, the token's entry added."""

    @staticmethod
    def forward(ctx, logits_NV, tokens_N, lse_N, chunk_rows):
        ctx.save_for_backward(logits_NV, tokens_N, lse_N)
        ctx.chunk_rows = chunk_rows
        return logits_NV.gather(-1, tokens_N[:, None])[:, 0].to(lse_N.dtype) - lse_N

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, tokens_N, lse_N = ctx.saved_tensors
        N, V = logits_NV.shape
        grad_NV = torch.empty_like(logits_NV)
        skip = grad_NV.device.type == "cpu"  # skipping all-zero chunks needs a host sync

        def body(sl: slice, w: _Chunks) -> None:
            g = grad_N[sl, None].to(lse_N.dtype)
            if skip and not g.any():  # masked rows only: gradient 0
                grad_NV[sl].zero_()
                return
            out = _write_grad(w, grad_NV, sl, g.shape[0])
            torch.softmax(w.acc(0, logits_NV[sl]), -1, out=out).mul_(-g)
            out.scatter_add_(-1, tokens_N[sl, None], g)
            _flush(grad_NV, sl, out)

        _Chunks(N, V, ctx.chunk_rows, logits_NV, lse_N.dtype).map(body)
        return grad_NV, None, None, None


class _ReverseKL(torch.autograd.Function):
    """KL_n = Σ_v p (log p − log q); backward writes g_n p (log p − log q − KL_n) by chunks, with
    log p − log q = (s − t) − lse_p + lse_q from the forward's row statistics:
    g p (d − c) with d = s − t and c = lse_p − lse_q + KL_n, one fused softmax per chunk."""

    @staticmethod
    def forward(ctx, student_NV, teacher_NV, chunk_rows):
        dummy_N = torch.zeros(student_NV.shape[0], dtype=torch.long, device=student_NV.device)
        st = row_stats(student_NV, teacher_NV, dummy_N, kl=True, chunk_rows=chunk_rows)
        ctx.save_for_backward(student_NV, teacher_NV, st["kl"], st["lse_p"], st["lse_q"])
        ctx.chunk_rows = chunk_rows
        return st["kl"]

    @staticmethod
    def backward(ctx, grad_N):
        student_NV, teacher_NV, kl_N, lse_p, lse_q = ctx.saved_tensors
        N, V = student_NV.shape
        g_N = grad_N.to(kl_N.dtype)
        neg_gc_N = -(lse_p - lse_q + kl_N) * g_N
        grad_NV = torch.empty_like(student_NV)

        def body(sl: slice, w: _Chunks) -> None:
            s, t = w.acc(0, student_NV[sl]), w.acc(1, teacher_NV[sl])
            out = _write_grad(w, grad_NV, sl, s.shape[0])
            torch.softmax(s, -1, out=out)  # p
            d = torch.sub(s, t, out=w.buf(2, s.shape[0]))
            torch.addcmul(neg_gc_N[sl, None], d, g_N[sl, None], out=d)  # g (d − c)
            _flush(grad_NV, sl, out.mul_(d))

        _Chunks(N, V, ctx.chunk_rows, student_NV, kl_N.dtype).map(body)
        return grad_NV, None, None


def token_logprobs(
    logits_BTV: Tensor, tokens_BT: Tensor, *, chunk_rows: int | None = None
) -> Tensor:
    """Selective log-softmax log p(y_t), [B, T] in acc_dtype, differentiable, no [B,T,V] saved."""
    B, T, V = logits_BTV.shape
    logits_NV, tokens_N = logits_BTV.reshape(B * T, V), tokens_BT.reshape(B * T)
    lse_N = _lse(logits_NV, chunk_rows)
    return _SelectiveLogSoftmax.apply(logits_NV, tokens_N, lse_N, chunk_rows).view(B, T)


@torch.no_grad()
def _lse(logits_NV: Tensor, chunk_rows: int | None) -> Tensor:
    N, V = logits_NV.shape
    acc = acc_dtype(logits_NV.dtype)
    lse_N = logits_NV.new_empty(N, dtype=acc)

    def body(sl: slice, w: _Chunks) -> None:
        x = w.acc(0, logits_NV[sl])
        lse_N[sl] = _lse_(x, w.buf(1, x.shape[0]), softmax=False)

    _Chunks(N, V, chunk_rows, logits_NV, acc).map(body)
    return lse_N


def reverse_kl_full(
    student_BTV: Tensor, teacher_BTV: Tensor, *, chunk_rows: int | None = None
) -> Tensor:
    """KL_t = Σ_v p(v)(log p(v) − log q(v)) over the whole vocabulary, [B, T] in acc_dtype,
    differentiable in the student only (the teacher is a constant)."""
    B, T, V = student_BTV.shape
    kl_N = _ReverseKL.apply(
        student_BTV.reshape(B * T, V), teacher_BTV.detach().reshape(B * T, V), chunk_rows
    )
    return kl_N.view(B, T)


class _Gather(torch.autograd.Function):
    """x[..., ids] along the last dim; backward scatters into one zero gradient in place
    (autograd's own gather backward makes a zeros tensor and an out-of-place scatter_add
    result: two logits-sized tensors)."""

    @staticmethod
    def forward(ctx, x, ids):
        ctx.save_for_backward(ids)
        ctx.like = (x.shape, x.dtype, x.device)
        return x.gather(-1, ids)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        shape, dtype, device = ctx.like
        return torch.zeros(shape, dtype=dtype, device=device).scatter_add_(
            -1, ids, grad.to(dtype)
        ), None


def reverse_kl_topk(
    student_BTV: Tensor,
    teacher_BTV: Tensor,
    k: int,
    *,
    ids_BTK: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """KL(p̃‖q̃) on S = the student's top-k ids (detached), p̃ = p/Σ_S p, q̃ = q/Σ_S q, acc_dtype
    [B, T], differentiable in the student. The tail mass is dropped, as in the official
    ``_topk_log_softmax`` path (opd_trainer.py:45-48, 164-171); renormalising full-vocabulary
    log-probs on S equals a log-softmax of the raw logits on S, so no full lse is taken."""
    B, T, V = student_BTV.shape
    if ids_BTK is None:
        ids_BTK = topk_ids(student_BTV.reshape(B * T, V), k, chunk_rows=chunk_rows).view(B, T, k)
    acc = acc_dtype(student_BTV.dtype)
    logp_BTK = torch.log_softmax(_Gather.apply(student_BTV, ids_BTK).to(acc), -1)
    logq_BTK = torch.log_softmax(teacher_BTV.detach().gather(-1, ids_BTK).to(acc), -1)
    return (logp_BTK.exp() * (logp_BTK - logq_BTK)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Input checks and normalisation.


def _check(
    student: Tensor, teacher: Tensor, tokens: Tensor, mask: Tensor, normalize: str
) -> Tensor:
    """Validate shapes and options; return the mask in acc_dtype on the logits' device."""
    if student.dim() != 3:
        raise ValueError(f"student_logits_BTV has shape {tuple(student.shape)}: expected [B, T, V]")
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"student vocabulary size {student.shape[-1]} != teacher vocabulary size "
            f"{teacher.shape[-1]}: slice both logits to the shared vocabulary first"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits_BTV has shape {tuple(teacher.shape)}: expected "
            f"{tuple(student.shape)} like the student's"
        )
    if tuple(tokens.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"tokens_BT has shape {tuple(tokens.shape)}: expected {tuple(student.shape[:2])}"
        )
    if tuple(mask.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"mask_BT has shape {tuple(mask.shape)}: expected {tuple(student.shape[:2])}"
        )
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZE}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens_BT has dtype {tokens.dtype}: expected an integer dtype")
    m = mask.to(device=student.device, dtype=acc_dtype(student.dtype))
    if not torch.isfinite(m).all() or (m < 0).any():
        raise ValueError("mask_BT has negative or non-finite entries: expected weights >= 0")
    live = tokens[m > 0]
    V = student.shape[-1]
    if live.numel() and (live.min() < 0 or live.max() >= V):
        raise ValueError(
            f"tokens_BT has ids in [{int(live.min())}, {int(live.max())}] on masked-in "
            f"positions: expected ids in [0, {V})"
        )
    return m


def _weights(m_BT: Tensor, normalize: str) -> Tensor:
    """w_t with Σ_t w_t x_t the chosen mean; an all-zero mask gives all-zero weights (loss 0)."""
    if normalize == "token_mean":
        return m_BT / m_BT.sum().clamp_min(1e-12)
    n_B = m_BT.sum(-1, keepdim=True)
    live = (n_B > 0).sum().clamp_min(1)
    return m_BT / (n_B.clamp_min(1e-12) * live)


def _options(spec: catalog.EstimatorSpec, options: dict, V: int) -> dict:
    """The options ``spec`` reads (defaults filled in), validated. Options that only other
    estimators read are range-checked and ignored, so one options dict can serve every
    estimator; unknown names are an error."""
    for key, value in options.items():
        if key not in catalog.OPTIONS and key not in catalog.RUNTIME_OPTIONS:
            raise ValueError(
                f"unknown estimator option {key!r}: expected one of {sorted(catalog.OPTIONS)}"
            )
        if key in catalog.OPTIONS and key not in spec.reads:
            catalog.OPTIONS[key].check(value)
    out = spec.defaults() | {k: v for k, v in options.items() if k in spec.reads}
    for key in spec.reads:  # normalize first: its error comes before a default top_k's
        out[key] = catalog.OPTIONS[key].check(out[key], vocab_size=V)
    return out


def _flat(x_BTV: Tensor) -> Tensor:
    return x_BTV.reshape(-1, x_BTV.shape[-1])


def _wmean_std(x_BT: Tensor, m_BT: Tensor) -> tuple[float, float]:
    n = m_BT.sum().clamp_min(1e-12)
    mean = (x_BT * m_BT).sum() / n
    return float(mean), float((((x_BT - mean) ** 2) * m_BT).sum().div(n).sqrt())


# ---------------------------------------------------------------------------------------------
# Policy-gradient estimators: one sampled token per position, a detached advantage.


@torch.no_grad()
def advantage_stats(
    spec: catalog.EstimatorSpec,
    student_NV: Tensor,
    teacher_NV: Tensor,
    tokens_N: Tensor,
    options: dict,
    *,
    chunk_rows: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The row statistics of :func:`row_stats` (``lse_p``, ``logp_y``, ...) and the per-row
    statistics ``spec.advantage`` asks for (``kl``, ``b_opt``, ``kl_topk``), from one chunked
    no-grad pass (plus a top-k gather for ``kl_topk``). Shared by the estimator and the exact
    variance probe (:mod:`vopd.variance_math`), so the advantage is defined once."""
    st = row_stats(
        student_NV,
        teacher_NV,
        tokens_N,
        kl="kl" in spec.stats,
        opt_baseline="b_opt" in spec.stats,
        chunk_rows=chunk_rows,
    )
    extra: dict[str, Tensor] = {}
    if "kl" in spec.stats:
        extra["kl"] = st["kl"]
    if "b_opt" in spec.stats:
        extra["b_opt"] = st["b_opt"]
    if "kl_topk" in spec.stats:
        k = options["top_k"]
        ids_NK = topk_ids(student_NV, k, chunk_rows=chunk_rows)
        extra["kl_topk"] = reverse_kl_topk(
            student_NV[None], teacher_NV[None], k, ids_BTK=ids_NK[None]
        )[0]
        acc = st["lse_p"].dtype
        extra["student_mass"] = (
            torch.logsumexp(student_NV.gather(-1, ids_NK).to(acc), -1) - st["lse_p"]
        ).exp()
        extra["teacher_mass"] = (
            torch.logsumexp(teacher_NV.gather(-1, ids_NK).to(acc), -1) - st["lse_q"]
        ).exp()
    return st, extra


def _pg(spec: catalog.EstimatorSpec, student, teacher, tokens, mask, *, chunk_rows=None, **opts):
    """Every policy-gradient estimator: A_t = spec.advantage(r_t, stats_t, options), loss
    gradient −Σ w_t sg[A_t] ∇log p(y_t); the loss *value* is Σ w_t (−r_t), the single-sample
    estimate of the weighted reverse KL, so values compare across estimators."""
    B, T, V = student.shape
    m_BT = _check(student, teacher, tokens, mask, opts.get("normalize", "token_mean"))
    options = _options(spec, opts, V)
    w_BT = _weights(m_BT, options["normalize"])
    y_N = tokens.reshape(-1).masked_fill(m_BT.reshape(-1) <= 0, 0).long()  # pads may hold any id
    st, extra = advantage_stats(
        spec, _flat(student), _flat(teacher), y_N, options, chunk_rows=chunk_rows
    )
    r_BT = (st["logq_y"] - st["logp_y"]).view(B, T)
    stats_BT = {k: v.view(B, T) for k, v in extra.items()}
    adv_BT = spec.advantage(r_BT, stats_BT, options)
    metrics = {"reward_mean": _wmean_std(r_BT, m_BT)[0]}
    if "kl" in st:
        metrics["kl_mean"] = _wmean_std(st["kl"].view(B, T), m_BT)[0]
    if "kl_topk" in stats_BT:
        metrics["kl_topk_mean"] = _wmean_std(stats_BT["kl_topk"], m_BT)[0]
        metrics["student_mass"] = _wmean_std(stats_BT["student_mass"], m_BT)[0]
        metrics["teacher_mass"] = _wmean_std(stats_BT["teacher_mass"], m_BT)[0]
    metrics["adv_mean"], metrics["adv_std"] = _wmean_std(adv_BT, m_BT)
    if spec.baseline is not None:
        metrics["baseline_mean"] = _wmean_std(r_BT - adv_BT, m_BT)[0]
    logp_BT = _SelectiveLogSoftmax.apply(_flat(student), y_N, st["lse_p"], chunk_rows).view(B, T)
    surrogate = -(w_BT * adv_BT.detach() * logp_BT).sum()  # sg[A]: the advantage is a constant
    value = (w_BT * -r_BT).sum()  # single-sample estimate of the weighted reverse KL
    # surrogate − sg[surrogate] is exactly 0 in value (no cancellation when |surrogate| ≫ value)
    return value + (surrogate - surrogate.detach()), metrics


# ---------------------------------------------------------------------------------------------
# Exact (Rao–Blackwellised) estimators: differentiate a divergence itself.


def full_opd(
    student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, *, chunk_rows=None, **options
):
    """Full-vocabulary reverse-KL OPD (official ``gkd_rkl``, docs/method.md): loss Σ_t w_t KL_t,
    gradient by the chunked analytic backward. The official run scales this by GA = 64 relative
    to the PG methods (docs/method.md, "normalisation"); here every estimator shares one
    normalisation."""
    norm = options.get("normalize", "token_mean")
    m_BT = _check(student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, norm)
    opts = _options(catalog.get("full_opd"), options, student_logits_BTV.shape[-1])
    kl_BT = reverse_kl_full(student_logits_BTV, teacher_logits_BTV, chunk_rows=chunk_rows)
    return (_weights(m_BT, opts["normalize"]) * kl_BT).sum(), {
        "kl_mean": _wmean_std(kl_BT.detach(), m_BT)[0]
    }


def topk_opd(
    student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, *, chunk_rows=None, **options
):
    """Top-k OPD (``_topk_opd_single_step_loss``): loss Σ_t w_t KL(p̃‖q̃)_t on the student's top-k
    ids (detached), both renormalised, tail dropped. Biased for k < V; equals ``full_opd`` at
    k = V. The official code has no config for it, so ``top_k`` defaults to the vOPD-top-k 100."""
    norm = options.get("normalize", "token_mean")
    m_BT = _check(student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, norm)
    opts = _options(catalog.get("topk_opd"), options, student_logits_BTV.shape[-1])
    kl_BT = reverse_kl_topk(
        student_logits_BTV, teacher_logits_BTV, opts["top_k"], chunk_rows=chunk_rows
    )
    loss = (_weights(m_BT, opts["normalize"]) * kl_BT).sum()
    return loss, {"kl_topk_mean": _wmean_std(kl_BT.detach(), m_BT)[0]}


class _WeightedLogSoftmax(torch.autograd.Function):
    """Σ_k c_nk log p(v_nk) for ids v [N, K] and constant weights c [N, K]; backward writes
    g_n (Σ_k c_nk e_{v_nk} − (Σ_k c_nk) softmax(z_n)) chunk by chunk (no [N, V] saved)."""

    @staticmethod
    def forward(ctx, logits_NV, ids_NK, c_NK, lse_N, chunk_rows):
        ctx.save_for_backward(logits_NV, ids_NK, c_NK, lse_N)
        ctx.chunk_rows = chunk_rows
        logp_NK = logits_NV.gather(-1, ids_NK).to(lse_N.dtype) - lse_N[:, None]
        return (c_NK * logp_NK).sum(-1)

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, ids_NK, c_NK, lse_N = ctx.saved_tensors
        N, V = logits_NV.shape
        grad_NV = torch.empty_like(logits_NV)

        def body(sl: slice, w: _Chunks) -> None:  # as _SelectiveLogSoftmax: one fused softmax
            c = c_NK[sl] * grad_N[sl, None].to(lse_N.dtype)
            out = _write_grad(w, grad_NV, sl, c.shape[0])
            torch.softmax(w.acc(0, logits_NV[sl]), -1, out=out).mul_(-c.sum(-1, keepdim=True))
            out.scatter_add_(-1, ids_NK[sl], c)
            _flush(grad_NV, sl, out)

        _Chunks(N, V, ctx.chunk_rows, logits_NV, lse_N.dtype).map(body)
        return grad_NV, None, None, None, None


def forward_kl_topk(
    student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, *, chunk_rows=None, **options
):
    """Teacher top-k forward KL (verl's on-policy distillation ``forward_kl_topk``): loss
    Σ_t w_t Σ_{v∈S_t} q̃(v) (log q̃(v) − log p(v)), S_t the teacher's top-k ids (detached),
    q̃ = q renormalised on S_t, p the student's full-vocabulary softmax. Gradient w.r.t. the
    student logits: Σ_t w_t (p − q̃) (q̃ zero outside S_t). Its expectation is not ∇ reverse KL
    at any k (at k = V it is ∇ forward KL(q‖p)). The loss *value* reported is Σ_t w_t KL_t, the
    weighted reverse KL from the same pass, as for the other estimators; the forward KL itself
    is the metric ``forward_kl_topk_mean``."""
    B, T, V = student_logits_BTV.shape
    norm = options.get("normalize", "token_mean")
    m_BT = _check(student_logits_BTV, teacher_logits_BTV, tokens_BT, mask_BT, norm)
    opts = _options(catalog.get("forward_kl_topk"), options, V)
    w_BT = _weights(m_BT, opts["normalize"])
    s_NV, t_NV = _flat(student_logits_BTV), _flat(teacher_logits_BTV).detach()
    dummy_N = torch.zeros(B * T, dtype=torch.long, device=s_NV.device)
    st = row_stats(s_NV.detach(), t_NV, dummy_N, kl=True, chunk_rows=chunk_rows)
    with torch.no_grad():
        ids_NK = topk_ids(t_NV, opts["top_k"], chunk_rows=chunk_rows)
        logq_NK = torch.log_softmax(t_NV.gather(-1, ids_NK).to(st["lse_p"].dtype), -1)
        q_NK = logq_NK.exp()
        neg_entropy_N = (q_NK * logq_NK).sum(-1)
        teacher_mass_N = (
            torch.logsumexp(t_NV.gather(-1, ids_NK).to(q_NK.dtype), -1) - st["lse_q"]
        ).exp()
    cross_N = _WeightedLogSoftmax.apply(s_NV, ids_NK, q_NK, st["lse_p"], chunk_rows)
    fkl_BT = (neg_entropy_N - cross_N).view(B, T)
    surrogate = (w_BT * fkl_BT).sum()
    value = (w_BT * st["kl"].view(B, T)).sum()
    metrics = {
        "kl_mean": _wmean_std(st["kl"].view(B, T), m_BT)[0],
        "forward_kl_topk_mean": _wmean_std(fkl_BT.detach(), m_BT)[0],
        "teacher_mass": _wmean_std(teacher_mass_N.view(B, T), m_BT)[0],
    }
    # surrogate − sg[surrogate] is exactly 0 in value (no cancellation when |surrogate| ≫ value)
    return value + (surrogate - surrogate.detach()), metrics


# ---------------------------------------------------------------------------------------------
# The registry: a live view of vopd.catalog (an estimator registered there appears here).


def estimator_fn(name: str):
    """The function of estimator ``name``: a pg one is built from its catalog advantage, an
    exact one is the catalog's ``fn`` (imported lazily when given as ``"module:attr"``)."""
    spec = catalog.get(name)
    if spec.family == "pg":
        fn = functools.partial(_pg, spec)
        functools.update_wrapper(fn, _pg)
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = f"{spec.label}: {spec.gradient} (vopd.catalog; source: {spec.source})."
        return fn
    if isinstance(spec.fn, str):
        module, attr = spec.fn.split(":")
        return getattr(importlib.import_module(module), attr)
    return spec.fn


class _Registry(Mapping):
    """``ESTIMATORS[name]`` → ``loss, metrics = fn(student, teacher, tokens, mask, **options)``;
    iterates in catalog display order."""

    def __getitem__(self, name):
        if name not in catalog.names():
            raise KeyError(name)
        return estimator_fn(name)

    def __iter__(self):
        return iter(catalog.names())

    def __len__(self):
        return len(catalog.names())


class _Options(Mapping):
    """``ESTIMATOR_OPTIONS[name]``: the set of options the estimator reads (``normalize`` too)."""

    def __getitem__(self, name):
        if name not in catalog.names():
            raise KeyError(name)
        return set(catalog.get(name).reads)

    def __iter__(self):
        return iter(catalog.names())

    def __len__(self):
        return len(catalog.names())


ESTIMATORS: Mapping = _Registry()
ESTIMATOR_OPTIONS: Mapping = _Options()

sample_opd = estimator_fn("sample_opd")
vopd = estimator_fn("vopd")
vopd_topk = estimator_fn("vopd_topk")
opt_baseline = estimator_fn("opt_baseline")
k1_loss = estimator_fn("k1_loss")
k2_loss = estimator_fn("k2_loss")
k3_loss = estimator_fn("k3_loss")
const_adv = estimator_fn("const_adv")
