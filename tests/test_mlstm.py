"""The mLSTM cell forms, the layer and the local block (src/bytelift/mlstm.py).

The reference point is ``naive_mlstm`` below: the spec's recurrence (spec §2.2 step 3) written out
scalar by scalar, independent of the module's code. All forms must agree with it and with each other.
"""

import math

import pytest
import torch

from bytelift.mlstm import (
    PARALLEL_MAX_LEN,
    LocalBlock,
    LocalStack,
    MLSTMLayer,
    MLSTMState,
    default_ffn_hidden,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_step,
)

F64_TOL, F32_TOL = 1e-10, 1e-4


def chunkwise(chunk_size):
    return lambda *a, **kw: mlstm_chunkwise(*a, chunk_size=chunk_size, **kw)


# every sequence form; the chunk sizes divide or do not divide the test lengths
FORMS = {
    "parallel": mlstm_parallel,
    "chunkwise16": chunkwise(16),
    "chunkwise64": chunkwise(64),
    "chunkwise100": chunkwise(100),
    "recurrent": mlstm_recurrent,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def random_inputs(B=2, H=3, S=50, d_qk=5, d_v=6, dtype=torch.float64, seed=0, grad=False):
    """q, k (B,H,S,d_qk), v (B,H,S,d_v), i, f (B,H,S) with gates spread over the soft-capped range."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, B, H, S, d_qk, generator=g, dtype=dtype)
    v = torch.randn(B, H, S, d_v, generator=g, dtype=dtype)
    i = 4.0 * torch.randn(B, H, S, generator=g, dtype=dtype) - 1.0  # some writes dominate, some vanish
    f = 3.0 * torch.randn(B, H, S, generator=g, dtype=dtype) + 2.0  # mostly remembering, some forgetting
    return [t.requires_grad_(grad) for t in (q, k, v, i, f)]


def random_state(B=2, H=3, d_qk=5, d_v=6, dtype=torch.float64, seed=1) -> MLSTMState:
    g = torch.Generator().manual_seed(seed)
    return MLSTMState(
        torch.randn(B, H, d_qk, d_v, generator=g, dtype=dtype),
        torch.randn(B, H, d_qk, generator=g, dtype=dtype),
        torch.randn(B, H, generator=g, dtype=dtype),
    )


def naive_mlstm(q, k, v, i, f, state=None):
    """The spec's recurrence, one (batch, head, step) at a time, float64. Returns h and (C, n, m)."""
    B, H, S, d_qk = q.shape
    q, k, v, i, f = (t.detach().double() for t in (q, k, v, i, f))
    h = torch.zeros(B, H, S, v.shape[-1], dtype=torch.float64)
    f64 = {"dtype": torch.float64}
    C_out = torch.zeros(B, H, d_qk, v.shape[-1], **f64)
    n_out, m_out = torch.zeros(B, H, d_qk, **f64), torch.zeros(B, H, **f64)
    for b in range(B):
        for hd in range(H):
            if state is None:
                C, n, m = torch.zeros(d_qk, v.shape[-1], **f64), torch.zeros(d_qk, **f64), 0.0
            else:
                C, n, m = state.C[b, hd].double(), state.n[b, hd].double(), float(state.m[b, hd])
            for t in range(S):
                log_f = -math.log1p(math.exp(-float(f[b, hd, t])))
                m_new = max(log_f + m, float(i[b, hd, t]))
                fg, ig = math.exp(log_f + m - m_new), math.exp(float(i[b, hd, t]) - m_new)
                C = fg * C + ig * torch.outer(k[b, hd, t], v[b, hd, t])
                n = fg * n + ig * k[b, hd, t]
                qs = q[b, hd, t] / math.sqrt(d_qk)
                h[b, hd, t] = (qs @ C) / (max(abs(float(qs @ n)), math.exp(-m_new)) + 1e-6)
                m = m_new
            C_out[b, hd], n_out[b, hd], m_out[b, hd] = C, n, m
    return h, (C_out, n_out, m_out)


# ------------------------------------------------------------------------------------------------
# the cell: forms agree


@pytest.mark.parametrize("S", [1, 7, 64, 300])
def test_forms_match_naive_recurrence_float64(S):
    inputs = random_inputs(S=S, seed=S)
    state = random_state()
    h_ref, (C_ref, n_ref, m_ref) = naive_mlstm(*inputs, state=state)
    for name, form in FORMS.items():
        h, st = form(*inputs, state=state)
        assert h.dtype == torch.float64 and st.C.dtype == torch.float64
        assert rel_err(h, h_ref) < F64_TOL, name
        assert rel_err(st.C, C_ref) < F64_TOL and rel_err(st.n, n_ref) < F64_TOL, name
        assert rel_err(st.m, m_ref) < F64_TOL, name


@pytest.mark.parametrize("S", [1, 7, 64, 300])
def test_forms_agree_float32(S):
    inputs = random_inputs(S=S, seed=S)
    h_ref, st_ref = mlstm_recurrent(*inputs)  # float64
    for name, form in FORMS.items():
        h, st = form(*(t.float() for t in inputs))
        assert h.dtype == torch.float32 and st.C.dtype == torch.float32
        assert rel_err(h.double(), h_ref) < F32_TOL, name
        assert rel_err(st.C.double(), st_ref.C) < F32_TOL, name


def test_forms_agree_at_4096_float32():
    # long enough that cumulative log-forget sums reach ~-1e3, where a float32 cumsum would be off
    inputs = random_inputs(B=1, H=1, S=4096, d_qk=4, d_v=4, seed=3)
    h_ref, st_ref = mlstm_recurrent(*inputs)
    x32 = [t.float() for t in inputs]
    for name, form in [("parallel", mlstm_parallel), ("chunkwise64", chunkwise(64)), ("chunkwise100", chunkwise(100))]:
        h, st = form(*x32)
        assert rel_err(h.double(), h_ref) < F32_TOL, name
        assert rel_err(st.C.double(), st_ref.C) < F32_TOL and rel_err(st.m.double(), st_ref.m) < F32_TOL, name


def test_chunkwise_any_length_and_chunk_size():
    # lengths around chunk multiples; chunk larger than the sequence; chunk of 1
    for S, L in [(63, 64), (65, 64), (129, 64), (5, 64), (37, 1), (37, 7)]:
        inputs = random_inputs(B=1, H=2, S=S, seed=S + L)
        h_ref, st_ref = mlstm_parallel(*inputs)
        h, st = mlstm_chunkwise(*inputs, chunk_size=L)
        assert h.shape == h_ref.shape
        assert rel_err(h, h_ref) < F64_TOL and rel_err(st.C, st_ref.C) < F64_TOL, (S, L)


# ------------------------------------------------------------------------------------------------
# the cell: state hand-over


@pytest.mark.parametrize("prefill", ["parallel", "chunkwise16", "chunkwise64", "recurrent"])
def test_prefill_then_steps_equals_one_call(prefill):
    n, m_steps = 37, 9
    inputs = random_inputs(S=n + m_steps, seed=11)
    h_full, st_full = mlstm_parallel(*inputs)
    h_pre, state = FORMS[prefill](*(t[:, :, :n] for t in inputs))
    hs = [h_pre]
    for t in range(n, n + m_steps):
        h, state = mlstm_step(*(x[:, :, t] for x in inputs), state)
        hs.append(h[:, :, None])
    assert rel_err(torch.cat(hs, dim=2), h_full) < F64_TOL
    assert rel_err(state.C, st_full.C) < F64_TOL and rel_err(state.m, st_full.m) < F64_TOL


@pytest.mark.parametrize("form", ["parallel", "chunkwise16", "chunkwise100", "recurrent"])
def test_two_calls_equal_one_call(form):
    inputs = random_inputs(S=90, seed=12)
    state0 = random_state()
    h_full, st_full = FORMS[form](*inputs, state=state0)
    h1, st1 = FORMS[form](*(t[:, :, :41] for t in inputs), state=state0)
    h2, st2 = FORMS[form](*(t[:, :, 41:] for t in inputs), state=st1)
    assert rel_err(torch.cat([h1, h2], dim=2), h_full) < F64_TOL
    assert rel_err(st2.C, st_full.C) < F64_TOL and rel_err(st2.n, st_full.n) < F64_TOL
    assert rel_err(st2.m, st_full.m) < F64_TOL


def test_step_with_no_state_starts_from_zero():
    q, k, v, i, f = random_inputs(S=1, seed=13)
    h0, st0 = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0])
    zeros = MLSTMState.zeros(2, 3, 5, 6, dtype=torch.float64)
    h1, st1 = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], zeros)
    assert torch.equal(h0, h1) and torch.equal(st0.C, st1.C)
    assert not torch.equal(st0.C, zeros.C)


# ------------------------------------------------------------------------------------------------
# the cell: resets and masks


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("p", [1, 16, 23])  # inside a chunk, on a chunk boundary (16), off it
def test_reset_equals_fresh_start(form, p):
    S = 40
    inputs = random_inputs(S=S, seed=p)
    reset = torch.zeros(2, S, dtype=torch.bool)
    reset[:, p] = True
    state0 = random_state()
    h, st = FORMS[form](*inputs, state=state0, reset=reset)
    h_prefix, _ = FORMS[form](*(t[:, :, :p] for t in inputs), state=state0)
    h_fresh, st_fresh = FORMS[form](*(t[:, :, p:] for t in inputs))
    assert rel_err(h[:, :, :p], h_prefix) < F64_TOL  # before the reset: unaffected
    assert rel_err(h[:, :, p:], h_fresh) < F64_TOL  # after: as if started afresh (m too, so eps matches)
    assert rel_err(st.C, st_fresh.C) < F64_TOL and rel_err(st.m, st_fresh.m) < F64_TOL


def test_reset_per_row_and_several_resets():
    S = 70
    inputs = random_inputs(S=S, seed=21)
    reset = torch.zeros(2, S, dtype=torch.bool)
    reset[0, [5, 33, 34, 69]] = True  # row 1 never resets
    h_ref, st_ref = mlstm_recurrent(*inputs, reset=reset)
    for name in ("parallel", "chunkwise16", "chunkwise64"):
        h, st = FORMS[name](*inputs, reset=reset)
        assert rel_err(h, h_ref) < F64_TOL and rel_err(st.C, st_ref.C) < F64_TOL, name
    h_row1, _ = mlstm_chunkwise(*(t[1:] for t in inputs))
    assert rel_err(h_ref[1:], h_row1) < F64_TOL


def test_step_mask_keeps_state_bit_exactly():
    q, k, v, i, f = random_inputs(S=1, seed=22)
    state = random_state()
    mask = torch.tensor([True, False])
    h, new = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], state, mask=mask)
    for old_t, new_t in zip(state, new):
        assert torch.equal(new_t[1], old_t[1])  # parked row: untouched
        assert not torch.equal(new_t[0], old_t[0])  # active row: moved on
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("form", ["parallel", "chunkwise16", "chunkwise64", "recurrent"])
def test_masked_positions_are_skipped(form):
    """Masked positions leave the state exactly alone: the result equals running without them."""
    S = 45
    inputs = random_inputs(S=S, seed=23)
    mask = torch.rand(2, S, generator=torch.Generator().manual_seed(0)) > 0.35
    mask[1] = False  # a row that is entirely padding
    state0 = random_state()
    h, st = FORMS[form](*inputs, state=state0, mask=mask)
    assert torch.isfinite(h).all()
    keep = mask[0]
    h_dense, st_dense = FORMS[form](*(t[:1, :, keep] for t in inputs), state=MLSTMState(*(s[:1] for s in state0)))
    assert rel_err(h[:1, :, keep], h_dense) < F64_TOL
    assert rel_err(st.C[:1], st_dense.C) < F64_TOL and rel_err(st.m[:1], st_dense.m) < F64_TOL
    for old_t, new_t in zip(state0, st):  # the all-padding row carries its state through exactly
        assert torch.equal(new_t[1], old_t[1])


def test_left_padding_with_mask_and_reset():
    """Left-padded prompt: mask the pads and reset at the first real position == the row alone."""
    S, pad = 30, 7
    inputs = random_inputs(B=1, S=S, seed=24)
    mask = torch.ones(1, S, dtype=torch.bool)
    mask[:, :pad] = False
    reset = torch.zeros(1, S, dtype=torch.bool)
    reset[:, pad] = True
    h_alone, st_alone = mlstm_recurrent(*(t[:, :, pad:] for t in inputs))
    stale = random_state(B=1)  # whatever the row held before must not leak in
    for name in ("parallel", "chunkwise16", "recurrent"):
        h, st = FORMS[name](*inputs, state=stale, mask=mask, reset=reset)
        assert rel_err(h[:, :, pad:], h_alone) < F64_TOL, name
        assert rel_err(st.C, st_alone.C) < F64_TOL and rel_err(st.m, st_alone.m) < F64_TOL, name


# ------------------------------------------------------------------------------------------------
# the cell: gradients, extremes, dtypes


def grads_of(form, inputs, state=None, **kw):
    for t in inputs:
        t.grad = None
    h, st = form(*inputs, state=state, **kw)
    g = torch.Generator().manual_seed(5)
    loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    loss = loss + (st.C * torch.randn(st.C.shape, generator=g, dtype=h.dtype)).sum()  # through the state too
    loss.backward()
    return [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("S,kw", [(100, {}), (1, {}), (70, {"reset": True, "mask": True})])
def test_gradients_agree_across_forms(S, kw):
    inputs = random_inputs(S=S, seed=31, grad=True)
    g = torch.Generator().manual_seed(7)
    extra = {}
    if kw.get("reset"):
        extra["reset"] = torch.rand(2, S, generator=g) > 0.9
    if kw.get("mask"):
        extra["mask"] = torch.rand(2, S, generator=g) > 0.2
    state = random_state()
    ref = grads_of(mlstm_parallel, inputs, state, **extra)
    for name in ("chunkwise16", "chunkwise64", "recurrent"):
        for got, want, label in zip(grads_of(FORMS[name], inputs, state, **extra), ref, "qkvif"):
            assert rel_err(got, want) < F64_TOL, (name, label)
    assert all(g.abs().sum() > 0 for g in ref)


@pytest.mark.parametrize("chunks_per_group", [1, 3])
def test_chunkwise_split_into_groups(monkeypatch, chunks_per_group):
    """The chunkwise core works through groups of chunks (sized by BLOCK_BYTES); the result, state and
    gradients must not depend on the grouping, also with resets and masks crossing group borders."""
    import bytelift.mlstm as mlstm_module

    S, L = 150, 16  # 10 chunks: groups of 1 or 3 (+ a shorter last group)
    inputs = random_inputs(S=S, seed=33, grad=True)
    g = torch.Generator().manual_seed(8)
    extra = {"reset": torch.rand(2, S, generator=g) > 0.95, "mask": torch.rand(2, S, generator=g) > 0.1}
    state = random_state()
    h_ref, st_ref = mlstm_parallel(*inputs, state=state, **extra)
    grads_ref = grads_of(mlstm_parallel, inputs, state, **extra)
    monkeypatch.setattr(mlstm_module, "BLOCK_BYTES", chunks_per_group * 2 * 3 * L * L * 8)  # B·H·L²·float64
    h, st = mlstm_chunkwise(*inputs, state=state, chunk_size=L, **extra)
    assert rel_err(h, h_ref) < F64_TOL and rel_err(st.C, st_ref.C) < F64_TOL and rel_err(st.m, st_ref.m) < F64_TOL
    for got, want, label in zip(grads_of(chunkwise(L), inputs, state, **extra), grads_ref, "qkvif"):
        assert rel_err(got, want) < F64_TOL, label


def test_gradcheck_chunkwise_small():
    """Hand-written backward of the chunkwise form vs finite differences (stabiliser held fixed: the
    stabiliser only enters through the 1e-6 eps, far below the finite-difference tolerance)."""
    inputs = random_inputs(B=1, H=1, S=11, d_qk=3, d_v=2, seed=32)
    inputs[3] = 0.25 * inputs[3] - 3.0  # input gates < 0, so m <= 0: the eps term (m's only effect) is < 1e-6
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda *a: mlstm_chunkwise(*a, chunk_size=4)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["parallel", "chunkwise16", "recurrent", "step"])
@pytest.mark.parametrize("case", ["big_gates", "zeros"])
def test_no_nan_or_inf(form, case):
    S = 33 if form != "step" else 1
    inputs = random_inputs(S=S, seed=41, dtype=torch.float32)
    if case == "big_gates":  # ±1e4 gate pre-activations, alternating by position, raw (not soft-capped)
        sign = torch.where(torch.arange(S) % 3 == 0, 1.0, -1.0)
        inputs[3] = (1e4 * sign).expand(2, 3, S).clone()
        inputs[4] = (-1e4 * sign).expand(2, 3, S).clone()
    else:
        inputs = [torch.zeros_like(t) for t in inputs]
    inputs = [t.requires_grad_() for t in inputs]
    if form == "step":
        h, st = mlstm_step(*(t[:, :, 0] for t in inputs))
    else:
        h, st = FORMS[form](*inputs)
    (h.sum() + st.C.sum() + st.n.sum()).backward()
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in st)
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    if case == "zeros":  # k = v = 0: nothing is ever written
        assert torch.equal(h, torch.zeros_like(h)) and torch.equal(st.C, torch.zeros_like(st.C))


@pytest.mark.parametrize("form", ["parallel", "chunkwise16", "recurrent"])
def test_bfloat16_inputs_float32_state(form):
    inputs = [t.bfloat16() for t in random_inputs(S=40, seed=42, dtype=torch.float32)]
    h32, st32 = FORMS[form](*(t.float() for t in inputs))  # the same (bf16-rounded) values in float32
    h, st = FORMS[form](*inputs)
    assert h.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in st)
    assert rel_err(h.float(), h32) < 1e-2  # only h's final rounding: the recurrence ran in float32
    assert rel_err(st.C, st32.C) < F32_TOL
    # a float32 state handed to a bf16 call stays float32
    h2, st2 = mlstm_step(*(t[:, :, 0].bfloat16() for t in inputs), st)
    assert h2.dtype == torch.bfloat16 and st2.C.dtype == torch.float32


def test_empty_sequence_returns_state_unchanged():
    inputs = random_inputs(S=0)
    state = random_state()
    for name, form in FORMS.items():
        h, st = form(*inputs, state=state)
        assert h.shape == (2, 3, 0, 6), name
        assert torch.equal(st.C, state.C) and torch.equal(st.m, state.m), name


# ------------------------------------------------------------------------------------------------
# the layer


def test_layer_parameters_and_init():
    layer = MLSTMLayer(64, num_heads=4)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": (32, 64),
        "k_proj.weight": (32, 64),
        "v_proj.weight": (64, 64),
        "ogate_proj.weight": (64, 64),
        "igate_proj.weight": (4, 64),
        "igate_proj.bias": (4,),
        "fgate_proj.weight": (4, 64),
        "fgate_proj.bias": (4,),
        "head_norm.weight": (64,),
        "out_proj.weight": (64, 64),
    }
    assert torch.equal(layer.igate_proj.bias, torch.full((4,), -10.0))
    assert layer.fgate_proj.bias.abs().max() <= 1 / math.sqrt(64)  # PyTorch's default, as the reference
    assert torch.equal(layer.head_norm.weight, torch.ones(64))
    linspace = MLSTMLayer(64, num_heads=4, fgate_bias_init=(3.0, 6.0))
    assert torch.allclose(linspace.fgate_proj.bias, torch.tensor([3.0, 4.0, 5.0, 6.0]))
    with pytest.raises(ValueError):
        MLSTMLayer(64, num_heads=5)
    with pytest.raises(ValueError):
        MLSTMLayer(64, num_heads=4, backend="cuda-magic")


def test_head_norm_is_a_per_head_layer_norm():
    layer = MLSTMLayer(64, num_heads=4)
    with torch.no_grad():
        layer.head_norm.weight.copy_(torch.linspace(0.5, 2.0, 64))
    h = torch.randn(2, 5, 4, 16) * 3 + 1  # (B, S, H, d_head), nonzero mean per head
    y = layer.head_norm(h)
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    expected = ((h - mean) / torch.sqrt(var + 1e-6)).reshape(2, 5, 64) * layer.head_norm.weight
    assert torch.allclose(y, expected, atol=1e-5)


def small_layer(**kw):
    torch.manual_seed(0)
    layer = MLSTMLayer(32, num_heads=4, igate_bias_init=0.0, **kw).double()  # gates open: the cell matters
    return layer


def test_layer_backends_agree_and_decoding_matches():
    x = torch.randn(2, 150, 32, dtype=torch.float64)
    outs = {}
    # "triton" without CUDA (or without mlstm_kernels) falls back to the native chunkwise form
    backends = ("auto", "parallel", "chunkwise", "recurrent") + (() if torch.cuda.is_available() else ("triton",))
    for backend in backends:
        layer = small_layer(backend=backend, chunk_size=16)
        outs[backend] = layer(x)
    y_ref, st_ref = outs["recurrent"]
    for backend, (y, st) in outs.items():
        assert rel_err(y, y_ref) < F64_TOL and rel_err(st.C, st_ref.C) < F64_TOL, backend
    short = x[:, : PARALLEL_MAX_LEN - 3]  # "auto" takes the parallel form here
    assert rel_err(small_layer()(short)[0], small_layer(backend="recurrent")(short)[0]) < F64_TOL
    # prefill 140 positions, then decode 10 one at a time (auto picks the step form for S == 1)
    layer = small_layer()
    y_pre, state = layer(x[:, :140])
    ys = [y_pre]
    for t in range(140, 150):
        y, state = layer(x[:, t : t + 1], state)
        ys.append(y)
    assert rel_err(torch.cat(ys, dim=1), y_ref) < F64_TOL
    assert rel_err(state.C, st_ref.C) < F64_TOL


def test_layer_gate_soft_cap():
    layer = small_layer()
    with torch.no_grad():
        layer.igate_proj.bias.fill_(1e6)  # uncapped this would write with weight e^1e6
        layer.fgate_proj.bias.fill_(-1e6)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    y, st = layer(x)
    assert torch.isfinite(y).all()
    assert st.m.max() <= 15.0 + 1e-9  # m is a running max of capped log gates


def test_layer_padding_mask_row_independence():
    """A right-padded row gives the same outputs on its real positions as the row alone."""
    layer = small_layer()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    y, st = layer(x, mask=mask)
    y_alone, st_alone = layer(x[1:, :12])
    assert rel_err(y[1:, :12], y_alone) < F64_TOL
    assert rel_err(st.C[1:], st_alone.C) < F64_TOL


def test_layer_bfloat16():
    layer = MLSTMLayer(32, num_heads=4).to(torch.bfloat16)
    y, st = layer(torch.randn(2, 70, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and st.C.dtype == torch.float32 and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------------
# the block and the stack


def test_local_block_structure_and_grads():
    block = LocalBlock(64, num_heads=4, ffn_hidden=96)
    assert block.ffn.gate_proj.weight.shape == (96, 64) and block.ffn.down_proj.weight.shape == (64, 96)
    assert isinstance(block.mlstm_norm, torch.nn.RMSNorm) and block.mlstm_norm.eps == 1e-6
    assert default_ffn_hidden(2048) == 2816 and default_ffn_hidden(576) % 64 == 0
    x = torch.randn(2, 80, 64, requires_grad=True)
    y, st = block(x)
    assert y.shape == x.shape and st.C.shape == (2, 4, 8, 16)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_local_block_residual_structure():
    """With the mLSTM output projection and the FFN down projection zeroed the block is the identity."""
    block = LocalBlock(32, num_heads=4)
    with torch.no_grad():
        block.mlstm.out_proj.weight.zero_()
        block.ffn.down_proj.weight.zero_()
    x = torch.randn(2, 10, 32)
    assert torch.equal(block(x)[0], x)


def test_local_block_and_stack_state_handover():
    torch.manual_seed(0)
    stack = LocalStack(2, 32, num_heads=4, igate_bias_init=0.0, chunk_size=16).double()
    x = torch.randn(2, 90, 32, dtype=torch.float64)
    y_full, states_full = stack(x)
    assert len(states_full) == 2
    y1, states = stack(x[:, :50])
    y2, states = stack(x[:, 50:85], states)
    ys = [y1, y2]
    for t in range(85, 90):
        y, states = stack(x[:, t : t + 1], states)
        ys.append(y)
    assert rel_err(torch.cat(ys, dim=1), y_full) < F64_TOL
    for st, st_full in zip(states, states_full):
        assert rel_err(st.C, st_full.C) < F64_TOL
    # single block too
    block = stack.blocks[0]
    yb, sb = block(x[:, :50])
    yb2, sb2 = block(x[:, 50:], sb)
    assert rel_err(torch.cat([yb, yb2], dim=1), block(x)[0]) < F64_TOL


# ------------------------------------------------------------------------------------------------
# the fused inference path (decoding: one position, no autograd)


def _block_step(block, x, state, mask, fused):
    """One LocalBlock step through the fused inference path (no_grad) or the plain one (autograd on)."""
    with torch.no_grad() if fused else torch.enable_grad():
        y, st = block(x, state, mask=mask)
    return y.detach(), MLSTMState(*(t.detach() for t in st))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_decoding_equals_unfused(dtype):
    torch.manual_seed(0)
    block = LocalBlock(64, num_heads=4, ffn_hidden=96, igate_bias_init=0.0).to(dtype)
    with torch.no_grad():  # the head norm's weight is folded into the output projection: not all ones
        block.mlstm.head_norm.weight.copy_(0.5 + torch.rand(64))
    x = torch.randn(3, 1, 64, dtype=dtype)
    state = MLSTMState(*(torch.randn(*shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                         for shape in ((3, 4, 8, 16), (3, 4, 8), (3, 4))))
    mask = torch.tensor([[True], [False], [True]])
    # float rounding only; in bfloat16 one matmul over the concatenated weights rounds its outputs like the
    # separate ones, but the states are float32 and the bf16 outputs are 2^-8-relative: a few ulps
    tol = {torch.float64: F64_TOL, torch.float32: F32_TOL / 10, torch.bfloat16: 3e-2}[dtype]
    for m in (mask, None):
        y0, st0 = _block_step(block, x, state, m, fused=False)
        y1, st1 = _block_step(block, x, state, m, fused=True)
        torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
        for a, b in zip(st1, st0):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    _, st_masked = _block_step(block, x, state, mask, fused=True)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(st_masked, state))  # a parked row keeps its state
    with torch.inference_mode():  # the same under inference_mode (the decoding loop's context)
        y2, _ = block(x, state, mask=mask)
    torch.testing.assert_close(y2, _block_step(block, x, state, mask, fused=False)[0], rtol=tol, atol=tol)


def test_stack_steps_with_gathered_weights_equal_one_call():
    """Decoding as the generation loop runs it (weights gathered once, then one `step` per position, with
    a parked row and a reset) equals the whole sequence in one call, in float64."""
    torch.manual_seed(0)
    stack = LocalStack(3, 32, num_heads=4, igate_bias_init=0.0).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9] = False  # row 1 parks at position 9
    reset = torch.zeros(2, 12, dtype=torch.bool)
    reset[0, 10] = True  # row 0 starts a new sequence at 10
    with torch.no_grad():
        y_full, states_full = stack(x, mask=mask, reset=reset)
        weights = stack.decode_weights()
        _, states = stack(x[:, :8], mask=mask[:, :8])
        ys = []
        for t in range(8, 12):
            y, states = stack.step(x[:, t], states, mask=mask[:, t], reset=reset[:, t], weights=weights)
            ys.append(y)
    steps = torch.stack(ys, dim=1)
    assert rel_err(steps[0], y_full[0, 8:]) < F64_TOL
    assert rel_err(steps[1, [0, 2, 3]], y_full[1, [8, 10, 11]]) < F64_TOL  # a parked position's output is unused
    for st, st_full in zip(states, states_full):
        assert rel_err(st.C, st_full.C) < F64_TOL and rel_err(st.m, st_full.m) < F64_TOL


def test_fused_weights_follow_weight_changes():
    torch.manual_seed(0)
    block = LocalBlock(32, num_heads=4, ffn_hidden=64, igate_bias_init=0.0)
    keys = set(block.state_dict())
    x = torch.randn(2, 1, 32)
    _block_step(block, x, None, None, fused=True)  # builds the caches
    assert set(block.state_dict()) == keys  # a cache, not parameters or buffers
    with torch.no_grad():  # in place: the version counters move
        block.mlstm.fgate_proj.bias.add_(1.0)
        block.ffn.up_proj.weight.mul_(2.0)
        block.mlstm.head_norm.weight.mul_(torch.rand(32) + 0.5)  # folded into the output projection
    torch.testing.assert_close(_block_step(block, x, None, None, fused=True)[0],
                               _block_step(block, x, None, None, fused=False)[0])
    block.mlstm.k_proj.weight = torch.nn.Parameter(torch.randn(16, 32))  # replaced
    block.load_state_dict({k: v + 0.01 for k, v in block.state_dict().items()})  # loaded (copy_)
    torch.testing.assert_close(_block_step(block, x, None, None, fused=True)[0],
                               _block_step(block, x, None, None, fused=False)[0])
    block.mlstm.gate_soft_cap = 5.0  # a constant folded into the fused weights changed
    torch.testing.assert_close(_block_step(block, x, None, None, fused=True)[0],
                               _block_step(block, x, None, None, fused=False)[0])
    block.double()  # converted (new storages)
    y1 = _block_step(block, x.double(), None, None, fused=True)[0]
    assert y1.dtype == torch.float64
    torch.testing.assert_close(y1, _block_step(block, x.double(), None, None, fused=False)[0])


def test_fused_weight_layout():
    """CPU float32: a transposed contiguous copy (the fast one-row layout); half precision: a view of the
    (out, in) concatenation (PyTorch's fast half-precision CPU kernels need that layout)."""
    for dtype, transposed_copy in ((torch.float32, True), (torch.bfloat16, False), (torch.float16, False)):
        block = LocalBlock(32, num_heads=4, ffn_hidden=64).to(dtype)
        _block_step(block, torch.randn(2, 1, 32, dtype=dtype), None, None, fused=True)
        weight_t, bias = block.mlstm.fused_in.weight_t, block.mlstm.fused_in.bias
        assert weight_t.shape == (32, 16 + 16 + 32 + 32 + 2 * 4) and bias.shape == (weight_t.shape[1],)
        assert weight_t.is_contiguous() == transposed_copy, dtype
        assert weight_t.t().is_contiguous() != transposed_copy, dtype


def test_fused_path_only_without_autograd():
    """With autograd on (training) the plain projections run, so gradients reach every parameter."""
    block = LocalBlock(32, num_heads=4, ffn_hidden=64)
    y, _ = block(torch.randn(2, 1, 32))
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


# ------------------------------------------------------------------------------------------------
# optional: comparisons with mlstm_kernels (NXAI Community License), only when installed


def test_matches_mlstm_kernels_native_chunkwise():
    mk = pytest.importorskip("mlstm_kernels.torch")
    q, k, v, i, f = random_inputs(B=1, H=2, S=128, d_qk=8, d_v=8, seed=51, dtype=torch.float32)
    state = random_state(B=1, H=2, d_qk=8, d_v=8, dtype=torch.float32)
    kernel = mk.get_mlstm_kernel("chunkwise--native_autograd")
    h_theirs, (C, n, m) = kernel(q, k, v, i, f, c_initial=state.C, n_initial=state.n, m_initial=state.m[..., None],
                                 return_last_states=True, chunk_size=64)
    h, st = mlstm_chunkwise(q, k, v, i, f, state=state)
    assert rel_err(h, h_theirs) < F32_TOL
    assert rel_err(st.C, C) < F32_TOL and rel_err(st.m, m.reshape(1, 2)) < F32_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton backend needs CUDA")
def test_triton_backend_matches_native():
    pytest.importorskip("mlstm_kernels.torch.chunkwise.triton_xl_chunk")
    torch.manual_seed(0)
    layer = MLSTMLayer(64, num_heads=4, igate_bias_init=0.0).cuda()
    x = torch.randn(2, 256, 64, device="cuda")
    y_native, st_native = layer(x)
    layer.backend = "triton"
    y, st = layer(x)
    assert rel_err(y, y_native) < 1e-3 and rel_err(st.C, st_native.C) < 1e-3

