"""``hidden_loss`` (estimators from hidden states and head weights) against the logits path.

The reference is the registry itself on materialised logits, ``ESTIMATORS[name](h @ W_S.T,
g @ W_T.T, ...)``, in float64: loss, metrics and the gradients w.r.t. the hidden states and the
head must agree to float64 rounding for every estimator of the registry and every option it
reads. A dispatch mode that sees every tensor the ops create checks that no [B,T,V] tensor exists.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vopd.estimators import ESTIMATOR_OPTIONS, ESTIMATORS, hidden_loss
from vopd.estimators.hidden import causal_lm_head, check_head, decoder_hidden

D = torch.float64
NAMES = list(ESTIMATORS)  # the registry, whatever it holds: nothing pinned here

# Values tried for each option an estimator reads (ESTIMATOR_OPTIONS): every option of the
# catalog but normalize (parametrised separately) must be here (test_every_option_is_tried).
OPTION_VALUES = {
    "top_k": [1, 3],
    "reward_clip_lambda": [None, 0.3],
    "detach_reward": [True, False],
    "clamp": [None, 0.5],  # k3's value clamped to [-0.5, 0.5]: bites on these logits
    "advantage": [-1.0, 0.7],  # const_adv's c
}


def option_cases(name):
    reads = sorted(set(ESTIMATOR_OPTIONS.get(name, ())) & set(OPTION_VALUES))
    for values in itertools.product(*(OPTION_VALUES[k] for k in reads)):
        opts = dict(zip(reads, values, strict=True))
        if opts.get("reward_clip_lambda") is not None and opts.get("detach_reward") is False:
            continue  # the clipped advantage is always detached: one case is enough
        yield opts


CASES = [(n, o) for n in NAMES for o in option_cases(n)]
MASKS = {
    "bool": torch.tensor([[True, True, True, False, False], [True, False, True, True, True]]),
    "weights": torch.tensor([[0.5, 2.0, 0.0, 1.0, 1.0], [1.0, 0.25, 1.0, 0.0, 3.0]], dtype=D),
    "empty_row": torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=D),
}


def fixture(seed, B=2, T=5, H=4, V=9, dtype=D, Vt=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=D)).to(dtype)

    h = rnd(B, T, H).requires_grad_(True)
    W = rnd(V, H, scale=0.8).requires_grad_(True)
    ht, Wt = rnd(B, T, H + 1), rnd(Vt or V, H + 1, scale=0.8)  # the teacher's H may differ
    y = torch.randint(0, V, (B, T), generator=g)
    return h, W, ht, Wt, y


def logits_path(name, h, W, ht, Wt, y, mask, **opts):
    loss, metrics = ESTIMATORS[name](h @ W.T, ht @ Wt.T, y, mask, **opts)
    return loss, metrics, torch.autograd.grad(loss, (h, W))


def hidden_path(name, h, W, ht, Wt, y, mask, **opts):
    loss, metrics = hidden_loss(name, h, W, ht, Wt, y, mask, **opts)
    return loss, metrics, torch.autograd.grad(loss, (h, W))


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    (la, ma, ga), (lb, mb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert set(ma) == set(mb)
    for k in ma:
        # a pooled std merged from per-chunk moments, sqrt(E[x²] − mean²), cancels digits when
        # |mean| ≫ std (k3's advantage e^r − 1 can be large): 1e-8 relative in float64
        rel = max(rtol, 1e-8) if k.endswith("_std") else rtol
        assert ma[k] == pytest.approx(mb[k], rel=rel, abs=atol), k
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Equal to the logits path, float64, every estimator and option.


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("normalize", ["token_mean", "seq_mean"])
def test_equals_logits_path_float64(name, opts, mask_kind, normalize):
    for seed, chunk_rows in ((0, 2), (1, 3), (2, None)):
        h, W, ht, Wt, y = fixture(seed)
        mask = MASKS[mask_kind]
        ref = logits_path(name, h, W, ht, Wt, y, mask, normalize=normalize, **opts)
        ours = hidden_path(
            name, h, W, ht, Wt, y, mask, normalize=normalize, chunk_rows=chunk_rows, **opts
        )
        assert ours[0].dtype == D
        assert_same(ours, ref)


def test_every_option_is_tried():
    """No estimator option runs only at its default in the float64 equality test."""
    read = set().union(*(ESTIMATOR_OPTIONS.get(n, ()) for n in NAMES)) - {"normalize"}
    assert read <= set(OPTION_VALUES), sorted(read - set(OPTION_VALUES))


@pytest.mark.parametrize("name", NAMES)
def test_chunking_invariance(name):
    h, W, ht, Wt, y = fixture(3, B=3, T=7)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    for normalize in ("token_mean", "seq_mean"):
        opts = {"normalize": normalize, "top_k": 3}
        full = hidden_path(name, h, W, ht, Wt, y, mask, chunk_rows=1000, **opts)
        for rows in (1, 2, 5):
            part = hidden_path(name, h, W, ht, Wt, y, mask, chunk_rows=rows, **opts)
            assert_same(part, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_empty_mask_gives_zero_loss_and_gradients(name):
    h, W, ht, Wt, y = fixture(4)
    mask = torch.zeros(2, 5)
    ref = logits_path(name, h, W, ht, Wt, y, mask, top_k=3)
    ours = hidden_path(name, h, W, ht, Wt, y, mask, top_k=3)
    assert ours[0].item() == 0 and all(g.abs().max() == 0 for g in ours[2])
    assert_same(ours, ref)


# Tolerances: float32 runs the same float32 math in another order (chunked matmuls, the head
# gradient summed over chunks): agreement to ~1e-5 of the gradient scale. bfloat16: logits are
# rounded to 8 mantissa bits by either path, the hidden-state gradient is rounded once more
# after its chunk scale is applied, and the head gradient is summed in float32 here (one bf16
# matmul on the logits path): agreement to ~2^-6 of the gradient scale.
DTYPE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_agrees_with_the_logits_path(name, dtype):
    h, W, ht, Wt, y = fixture(5, B=2, T=6, H=8, V=40, dtype=dtype)
    mask = torch.ones(2, 6)
    ref = logits_path(name, h, W, ht, Wt, y, mask, top_k=5)
    ours = hidden_path(name, h, W, ht, Wt, y, mask, top_k=5, chunk_rows=5)
    rtol, atol = DTYPE_TOL[dtype]
    assert ours[0].dtype == ref[0].dtype == torch.float32
    assert ours[2][0].dtype == ours[2][1].dtype == dtype
    torch.testing.assert_close(ours[0], ref[0], rtol=rtol, atol=atol)
    for x, r in zip(ours[2], ref[2], strict=True):
        scale = float(r.abs().max())
        torch.testing.assert_close(x.to(D), r.to(D), rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------
# Gradient plumbing.


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_reaches_the_teacher(name):
    h, W, ht, Wt, y = fixture(6)
    ht.requires_grad_(True)
    Wt.requires_grad_(True)
    loss, _ = hidden_loss(name, h, W, ht, Wt, y, MASKS["bool"], top_k=3)
    loss.backward()
    assert ht.grad is None and Wt.grad is None
    assert h.grad.abs().sum() > 0 and W.grad.abs().sum() > 0


def test_frozen_head_scaled_backward_and_no_grad_mode():
    h, W, ht, Wt, y = fixture(7)
    W.requires_grad_(False)
    ref = ESTIMATORS["vopd"](h @ W.T, ht @ Wt.T, y, MASKS["weights"])[0]
    (g_ref,) = torch.autograd.grad(3.5 * ref, h)
    loss, _ = hidden_loss("vopd", h, W, ht, Wt, y, MASKS["weights"])
    (3.5 * loss).backward()  # the trainer's (loss * scale).backward()
    torch.testing.assert_close(h.grad, g_ref, rtol=1e-10, atol=1e-12)
    assert W.grad is None
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with torch.no_grad():
        value, _ = hidden_loss("vopd", h, W, ht, Wt, y, MASKS["weights"])
    assert not value.requires_grad and value == pytest.approx(ref.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Memory: no [B,T,V] tensor of either model, forward or backward.


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) behind any tensor an op returns: what is
    allocated, not what a view spans (a stride-0 expand spans [B,T,V] and holds one element)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes() // t.element_size()
                self.largest = max(self.largest, size)
        return out


@pytest.mark.parametrize("name", NAMES)
def test_no_BTV_tensor_is_allocated(name):
    B, T, H, V, rows = 4, 16, 7, 1000, 8  # the teacher's hidden size is H + 1 = rows
    h, W, ht, Wt, y = fixture(8, B=B, T=T, H=H, V=V)
    mask = torch.ones(B, T)
    with _LargestTensor() as logits_mode:
        loss, _ = ESTIMATORS[name](h @ W.T, ht @ Wt.T, y, mask, top_k=3)
        loss.backward()
    assert logits_mode.largest >= B * T * V  # the mode sees the logits path's [B,T,V] tensors
    with _LargestTensor() as mode:
        loss, _ = hidden_loss(name, h, W, ht, Wt, y, mask, top_k=3, chunk_rows=rows)
        loss.backward()
    # A [rows, V] logits chunk or a [V, H] head (or its gradient), nothing larger.
    assert mode.largest <= rows * V < B * T * V // 4, mode.largest


# ---------------------------------------------------------------------------------------------
# Bad input: the logits path's errors, plus the hidden-state shapes.


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_matches_the_logits_path(name):
    h, W, ht, Wt, y = fixture(0)
    mask = MASKS["bool"]
    s, t = h @ W.T, ht @ Wt.T

    def both(match, hidden_args, logits_args, **opts):
        with pytest.raises(ValueError, match=match):
            ESTIMATORS[name](*logits_args, **opts)
        with pytest.raises(ValueError, match=match):
            hidden_loss(name, *hidden_args, **opts)

    both(r"unknown estimator option 'topk'", (h, W, ht, Wt, y, mask), (s, t, y, mask), topk=2)
    both(r"normalize='sum'.*expected one of", (h, W, ht, Wt, y, mask), (s, t, y, mask),
         normalize="sum")  # fmt: skip
    bad_y = torch.zeros(2, 4, dtype=torch.long)
    both(r"tokens_BT has shape \(2, 4\): expected \(2, 5\)", (h, W, ht, Wt, bad_y, mask),
         (s, t, bad_y, mask))  # fmt: skip
    both(r"mask_BT has shape \(3,\): expected \(2, 5\)", (h, W, ht, Wt, y, torch.ones(3)),
         (s, t, y, torch.ones(3)))  # fmt: skip
    y9 = y.masked_fill(mask, 9)
    both(r"tokens_BT has ids in \[9, 9\].*expected ids in \[0, 9\)", (h, W, ht, Wt, y9, mask),
         (s, t, y9, mask))  # fmt: skip
    Wt10 = torch.randn(10, Wt.shape[1], dtype=D)
    both(r"student vocabulary size 9 != teacher vocabulary size 10", (h, W, ht, Wt10, y, mask),
         (s, ht @ Wt10.T, y, mask))  # fmt: skip
    if "top_k" in ESTIMATOR_OPTIONS.get(name, ()):
        for k in (0, 10, 2.0):
            both(r"top_k=.*\[1, V=9\]", (h, W, ht, Wt, y, mask), (s, t, y, mask), top_k=k)
    if "reward_clip_lambda" in ESTIMATOR_OPTIONS.get(name, ()):
        both(r"reward_clip_lambda=.*\(0, 1\)", (h, W, ht, Wt, y, mask), (s, t, y, mask),
             reward_clip_lambda=1.5)  # fmt: skip


def test_bad_hidden_shapes_and_dtypes():
    h, W, ht, Wt, y = fixture(0)
    mask = MASKS["bool"]
    with pytest.raises(ValueError, match=r"student_hidden_BTH has shape \(10, 4\): expected"):
        hidden_loss("vopd", h.reshape(10, 4), W, ht, Wt, y, mask)
    with pytest.raises(ValueError, match=r"student_head_VH has shape \(9, 3\): expected \[V, 4\]"):
        hidden_loss("vopd", h, W[:, :3], ht, Wt, y, mask)
    with pytest.raises(ValueError, match=r"teacher_hidden_BTH has shape \(1, 5, 5\)"):
        hidden_loss("vopd", h, W, ht[:1], Wt, y, mask)
    with pytest.raises(ValueError, match=r"student_hidden_BTH is torch.float32 but"):
        hidden_loss("vopd", h.float(), W, ht, Wt, y, mask)
    with pytest.raises(ValueError, match=r"unknown estimator 'vopdd'"):
        hidden_loss("vopdd", h, W, ht, Wt, y, mask)
    with pytest.raises(ValueError, match=r"chunk_rows=0"):
        hidden_loss("vopd", h, W, ht, Wt, y, mask, chunk_rows=0)


# ---------------------------------------------------------------------------------------------
# transformers heads.


def _tiny_llama(V=37, H=16, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, **config)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_causal_lm_head_is_the_plain_projection():
    model = _tiny_llama()
    ids = torch.randint(0, 37, (2, 6))
    head = causal_lm_head(model, rows=30)
    assert head.shape == (30, 16) and head.data_ptr() == model.lm_head.weight.data_ptr()
    check_head(model, ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[..., :30]
        torch.testing.assert_close(decoder_hidden(model, input_ids=ids) @ head.T, logits)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_head_tied_or_not(tied):
    """Qwen3 (bias-free lm_head, tied to the embeddings in the 0.6B/1.7B checkpoints): the head
    passes both checks, and the loss from its hidden states equals the loss on its own logits,
    gradients into every parameter included (the tied embedding gets both contributions)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      tie_word_embeddings=tied)  # fmt: skip
    model = Qwen3ForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(2))
    head = causal_lm_head(model, rows=30)
    assert (head.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    check_head(model, ids)
    y, mask = ids[:, 1:].clamp(max=29), MASKS["bool"]
    with torch.no_grad():
        teacher = model(input_ids=ids[:, :-1]).logits[..., :30]
    grads = []
    for path in ("logits", "hidden"):
        model.zero_grad(set_to_none=True)
        if path == "logits":
            z = model(input_ids=ids[:, :-1]).logits[..., :30]
            loss, _ = ESTIMATORS["vopd"](z, teacher + 0.3, y, mask)
        else:
            h = decoder_hidden(model, input_ids=ids[:, :-1])
            with torch.no_grad():  # the teacher: the same model's logits shifted by 0.3
                g = torch.cat([decoder_hidden(model, input_ids=ids[:, :-1]),
                               torch.ones(2, 5, 1, dtype=D)], -1)  # fmt: skip
                W_t = torch.cat([head, torch.full((30, 1), 0.3, dtype=D)], -1)
            loss, _ = hidden_loss("vopd", h, causal_lm_head(model, 30), g, W_t, y, mask)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    for n, x in g0.items():
        torch.testing.assert_close(g1[n], x, rtol=1e-9, atol=1e-12, msg=n)


def test_unsupported_heads_are_rejected():
    model = _tiny_llama()
    model.lm_head = torch.nn.Linear(16, 37, bias=True)
    with pytest.raises(ValueError, match="has a bias"):
        causal_lm_head(model)
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        causal_lm_head(model)

    class Scaled(torch.nn.Linear):  # a head transform no config key names
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = _tiny_llama()
    scaled = Scaled(16, 37, bias=False)
    scaled.weight = model.lm_head.weight
    model.lm_head = scaled
    causal_lm_head(model)  # passes the static checks
    with pytest.raises(ValueError, match="not a plain projection"):
        check_head(model, torch.randint(0, 37, (1, 5)))


@pytest.mark.parametrize("name", NAMES)
def test_padded_head_rows_are_dropped(name):
    """Heads padded past the shared vocabulary V (student 40 rows, teacher 37, V = 30, as
    Qwen3 heads are padded past the tokenizer): hidden_loss on causal_lm_head(model, V) equals
    the estimator on the models' own logits sliced to V (vopd.batch.completion_logits), in
    float64; the padded head rows get exactly zero gradient on both paths."""
    V = 30
    student = _tiny_llama(V=40).double()
    teacher = _tiny_llama(V=37, H=24).double()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, V, (2, 6), generator=g)
    y, mask = ids[:, 1:], MASKS["weights"].to(D)
    grads = []
    for path in ("logits", "hidden"):
        student.zero_grad(set_to_none=True)
        if path == "logits":
            z = student(input_ids=ids[:, :-1]).logits[..., :V]
            with torch.no_grad():
                u = teacher(input_ids=ids[:, :-1]).logits[..., :V]
            loss, metrics = ESTIMATORS[name](z, u, y, mask, top_k=3)
        else:
            h = decoder_hidden(student, input_ids=ids[:, :-1])
            with torch.no_grad():
                ht = decoder_hidden(teacher, input_ids=ids[:, :-1])
            loss, metrics = hidden_loss(name, h, causal_lm_head(student, V), ht,
                                        causal_lm_head(teacher, V), y, mask, top_k=3,
                                        chunk_rows=4)  # fmt: skip
        loss.backward()
        grads.append((loss.detach(), metrics, {n: p.grad for n, p in student.named_parameters()}))
    (l0, m0, g0), (l1, m1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    assert set(m1) == set(m0)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-8, abs=1e-12), k
    for n, x in g0.items():
        torch.testing.assert_close(g1[n], x, rtol=1e-9, atol=1e-12, msg=n)
    head = g1["lm_head.weight"]
    assert head.shape == (40, 16) and head[V:].abs().max() == 0


def test_hidden_row_stats_equal_row_stats_on_logits():
    from vopd.estimators import row_stats
    from vopd.estimators.hidden import hidden_row_stats

    h, W, ht, Wt, y = fixture(9, B=3, T=4)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(9)) > 0.4
    kinds = {"kl": True, "entropy": True, "opt_baseline": True}
    ours = hidden_row_stats(h, W, ht, Wt, y, mask, chunk_rows=2, **kinds)
    ref = row_stats((h @ W.T).reshape(12, -1), (ht @ Wt.T).reshape(12, -1), y.reshape(-1), **kinds)
    assert set(ours) == set(ref)
    live = mask.reshape(-1)
    for key, x in ours.items():
        torch.testing.assert_close(x[live], ref[key][live], rtol=1e-12, atol=1e-12)
        assert (x[~live] == 0).all()


def test_an_enclosing_autocast_is_not_applied():
    """The logits are h @ W.T in the inputs' dtype (the caller casts, as completion_hidden)."""
    h, W, ht, Wt, y = fixture(10, dtype=torch.float32)
    ref = logits_path("vopd", h, W, ht, Wt, y, MASKS["bool"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = hidden_loss("vopd", h, W, ht, Wt, y, MASKS["bool"])
    ours = (loss, metrics, torch.autograd.grad(loss, (h, W)))
    assert ours[2][0].dtype == torch.float32
    assert_same(ours, ref, rtol=1e-5, atol=1e-6)
