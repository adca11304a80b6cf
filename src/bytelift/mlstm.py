"""The mLSTM cell and the local block of the byte-level encoder/decoder (DESIGN §1.3, §1.8, §1.9).

The cell, per head, with an exponential input gate and a sigmoid forget gate (spec §2.2 step 3):

    lf_t = logsigmoid(f_t)                          log forget gate
    m_t  = max(lf_t + m_{t-1}, i_t)                 stabiliser (running max of the log gates)
    C_t  = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_tᵀ          (d_qk, d_v)
    n_t  = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t               (d_qk,)
    h_t  = C_tᵀ q̂_t / (max(|n_tᵀ q̂_t|, exp(-m_t)) + 1e-6),   q̂_t = q_t / sqrt(d_qk)

with the initial state C = 0, n = 0, m = 0. The stabiliser cancels out of h except in the 1e-6 eps, so
every form below computes *the same* m (the running max of the recurrence above, including the
initial state's m) so that they agree to rounding, eps included.

Three forms of this one function (plus a plain loop used as the reference and benchmark baseline):

- ``mlstm_parallel``   quadratic in S; simplest; for short sequences.
- ``mlstm_chunkwise``  intra-chunk parallel, inter-chunk recurrent; linear in S; training and prefill.
- ``mlstm_step``       one time step; decoding.
- ``mlstm_recurrent``  a Python loop over ``mlstm_step``.

All take q, k (B, H, S, d_qk), v (B, H, S, d_v) and the gate pre-activations i, f (B, H, S) (already
soft-capped by the layer), optionally a state to continue from, a ``mask`` and a ``reset``:

- ``mask`` (B, S) bool, False = this position does not touch the state (neutral gates: log-forget 0,
  input gate -inf, so C, n, m are carried over exactly; bit-exactly in the step form). Its output is
  the carried state read out with that position's q, the same in every form, and meaningless to the
  caller. Used for padding and for parking rows during batched decoding.
- ``reset`` (B, S) bool, True = a new sequence starts here: the state before this position is
  replaced by the initial state (0, 0, 0), so the result is exactly that of a fresh call on the
  suffix. (The reference instead sets the forget pre-activation to -1e5 there, which matches a fresh
  start only up to the eps term; ours is exact.) A position that is both reset and masked leaves the
  initial state behind.

Recurrences run in float32 (float64 if the inputs are float64) whatever the activation dtype; the
state (``MLSTMState``) is always in that dtype and h is cast back to the input dtype.

Gradients: the stabiliser m is treated as a constant (it is computed without gradient) in every
form. It cancels out of h except in the 1e-6 eps, so this only drops the derivative of that eps term
(relative size about 1e-6·e^m/|n̂ᵀq̂|; the per-head LayerNorm after the cell removes h's scale anyway),
and it makes all forms differentiate the same function.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The reference kernels add this to the denominator of h (mlstm_kernels, all forms).
EPS = 1e-6
LOG2_E = math.log2(math.e)
# Chunk length of the chunkwise form. Measured on this project's 2-core CPU (benchmarks/mlstm.py shapes:
# B=4, H=16, d_qk=18, d_v=36, S=4096, fwd+bwd): 16 and 32 are within noise of each other, 64 is 15-25%
# slower, 128 ~1.8x slower (the (L, L) work per token grows with L). (The reference uses 64 in its HF
# code and 128 in training; the function computed is the same.)
DEFAULT_CHUNK_SIZE = 32
# MLSTMLayer(backend="auto") uses the parallel form up to this length and the chunkwise form above it:
# up to one chunk both do the same work and the parallel form has less overhead; at S=64 the chunkwise
# form is already ~1.2x faster (fwd+bwd, 1.6x forward only), at S=256 3.5x.
PARALLEL_MAX_LEN = 32
# The chunkwise form works through its chunks in groups whose (L, L) temporaries take about this many
# bytes (see _ChunkwiseCore): small enough to stay in cache, big enough to keep Python overhead low.
BLOCK_BYTES = 4 * 2**20
# ... and of at most this many chunks: the recurrence inside a group is one matmul with a (G+1, G)
# matrix of decays, whose cost grows with G² (at 16 it adds ~4% to the whole form).
MAX_GROUP_CHUNKS = 16
# Gate pre-activation soft cap, input-gate bias and head-norm eps of the reference (spec §2.2).
GATE_SOFT_CAP = 15.0
IGATE_BIAS_INIT = -10.0
NORM_EPS = 1e-6


class MLSTMState(NamedTuple):
    """Recurrent state of one mLSTM layer, always float32 (float64 for float64 inputs).

    C: (B, H, d_qk, d_v) matrix memory; n: (B, H, d_qk) normaliser; m: (B, H) log-space stabiliser.
    """

    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, heads: int, d_qk: int, d_v: int, device=None, dtype=torch.float32) -> MLSTMState:
        """The initial state C = 0, n = 0, m = 0."""
        return cls(
            torch.zeros(batch, heads, d_qk, d_v, device=device, dtype=dtype),
            torch.zeros(batch, heads, d_qk, device=device, dtype=dtype),
            torch.zeros(batch, heads, device=device, dtype=dtype),
        )


# ---------------------------------------------------------------------------------------------------
# helpers shared by the forms


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exactness tests); everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the operator call when ``t`` already has it (a decoding step makes dozens of
    these; each dispatch costs as much as a small kernel)."""
    return t if t.dtype == dtype else t.to(dtype)


def _state_or_zeros(state: MLSTMState | None, B: int, H: int, d_qk: int, d_v: int, device, dtype) -> MLSTMState:
    if state is None:
        return MLSTMState.zeros(B, H, d_qk, d_v, device=device, dtype=dtype)
    return MLSTMState(_as(state.C, dtype), _as(state.n, dtype), _as(state.m, dtype))


def _log_gates(
    i: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate pre-activations (B, H, S) or, for one step, (B, H) -> (log input gate, log forget gate), same
    shape, in ``dtype``.

    Masked positions (mask (B, S), or (B,) for one step, False) get the neutral gates: log-forget 0 (no
    decay) and log-input -inf (no write), so the state passes through them unchanged.
    """
    log_i = _as(i, dtype)
    log_f = F.logsigmoid(_as(f, dtype))
    if mask is not None:
        keep = mask[:, None]  # broadcasts over heads
        log_f = torch.where(keep, log_f, 0.0)
        log_i = torch.where(keep, log_i, -math.inf)
    return log_i, log_f


def _reset_log_i(log_i: torch.Tensor, log_f: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """Log input gates to use in the *stabiliser* maxima when resets are present, (B, H, S).

    A reset at p replaces the previous state by the initial one, whose m = 0 then decays by lf_p. In the
    maxima that defines m this acts like one more candidate ``lf_p + (decays after p)``, i.e. like an
    input gate max(i_p, lf_p) at p. (The writes still use i_p: the initial state has C = 0, n = 0.)
    """
    return torch.where(reset[:, None, :], torch.maximum(log_i, log_f), log_i)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """v (..., d_v) -> [v | 1] (..., d_v + 1).

    The normaliser n is the matrix memory of a value that is constantly 1, so one matmul against
    [v | 1] yields numerator and denominator of h together, and the state can be kept as one
    (d_qk, d_v + 1) tensor [C | n].
    """
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


# ---------------------------------------------------------------------------------------------------
# step and plain recurrent loop


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    eps: float = EPS,
    q_scale: float | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """One time step (decoding).

    q, k: (B, H, d_qk); v: (B, H, d_v); i, f: (B, H) gate pre-activations; state: MLSTMState or None
    (initial state); mask: (B,) bool, False = the row keeps its state bit-exactly; reset: (B,) bool,
    True = the row starts from the initial state; q_scale: the factor on q (default d_qk^-1/2; 1.0 when
    the caller's projection already applied it). Returns h (B, H, d_v) in q's dtype and the new state.
    """
    B, H, d_qk = q.shape
    d_v = v.shape[-1]
    in_dtype, dtype = q.dtype, _compute_dtype(q)
    C, n, m = _state_or_zeros(state, B, H, d_qk, d_v, q.device, dtype)
    if reset is not None:
        r = reset[:, None]
        C = torch.where(r[..., None, None], 0.0, C)
        n = torch.where(r[..., None], 0.0, n)
        m = torch.where(r, 0.0, m)
    q, k, v = _as(q, dtype), _as(k, dtype), _as(v, dtype)
    q_scale = d_qk**-0.5 if q_scale is None else q_scale
    if q_scale != 1.0:
        q = q * q_scale
    log_i, log_f = _log_gates(i, f, mask, dtype)  # (B, H); neutral where masked, so h reads the kept state

    # Decoding runs this once per byte and layer with tiny tensors, so the op count is the cost: fused
    # multiply-adds (addcmul), one batched matmul and one dot product instead of broadcasts and einsums,
    # no dtype casts that change nothing.
    carried = log_f + m  # (B, H): the old stabiliser after this step's forget gate
    m_new = torch.maximum(carried, log_i)
    if m_new.requires_grad:  # the stabiliser is a constant for autograd (it cancels in h)
        m_new = m_new.detach()
    decay = torch.exp(carried - m_new)  # (B, H)
    write = torch.exp(log_i - m_new)  # (B, H)
    kw = k * write[..., None]  # (B, H, d_qk)
    C_new = torch.addcmul(C * decay[..., None, None], kw[..., :, None], v[..., None, :])  # (B, H, d_qk, d_v)
    n_new = torch.addcmul(kw, n, decay[..., None])  # (B, H, d_qk)
    num = torch.matmul(q[..., None, :], C_new)[..., 0, :]  # (B, H, d_v)
    den = torch.linalg.vecdot(q, n_new)  # (B, H)
    h = num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps)[..., None]

    if mask is not None:  # the neutral gates already carry the state over; this makes it bit-exact
        keep = mask[:, None]
        C_new = torch.where(keep[..., None, None], C_new, C)
        n_new = torch.where(keep[..., None], n_new, n)
        m_new = torch.where(keep, m_new, m)
    return _as(h, in_dtype), MLSTMState(C_new, n_new, m_new)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """The plain loop over ``mlstm_step`` (reference and benchmark baseline; slow).

    q, k: (B, H, S, d_qk); v: (B, H, S, d_v); i, f: (B, H, S); mask, reset: (B, S) bool or None.
    Returns h (B, H, S, d_v) and the state after the last step.
    """
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_step(
            q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state,
            mask=None if mask is None else mask[:, t],
            reset=None if reset is None else reset[:, t],
            eps=eps,
        )
        hs.append(h)
    if not hs:  # S == 0: nothing to do, but still hand back a well-formed state
        B, H, _, d_qk = q.shape
        state = _state_or_zeros(state, B, H, d_qk, v.shape[-1], q.device, _compute_dtype(q))
        return v.new_zeros(v.shape), state
    return torch.stack(hs, dim=2), state


# ---------------------------------------------------------------------------------------------------
# parallel form


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """Quadratic form: all (t, s) pairs at once; O(S²) time and memory, for short sequences.

    q, k: (B, H, S, d_qk); v: (B, H, S, d_v); i, f: (B, H, S) gate pre-activations; state: MLSTMState
    or None; mask, reset: (B, S) bool or None (see the module docstring).
    Returns h (B, H, S, d_v) in q's dtype and the state after the last position.

    h_t = Σ_s D_ts (q̂_t·k_s) v_s / (max(|Σ_s D_ts (q̂_t·k_s)|, exp(-m_t)) + eps), with
    D_ts = exp(Σ_{u=s+1..t} lf_u + i_s - m_t) for s ≤ t, plus the incoming state decayed to t.
    """
    B, H, S, d_qk = q.shape
    d_v = v.shape[-1]
    in_dtype, dtype = q.dtype, _compute_dtype(q)
    state = _state_or_zeros(state, B, H, d_qk, d_v, q.device, dtype)
    if S == 0:
        return v.new_zeros(v.shape), state
    q, k, v1 = q.to(dtype) * d_qk**-0.5, k.to(dtype), _with_ones(v.to(dtype))
    log_i, log_f = _log_gates(i, f, mask, dtype)
    Cn0 = torch.cat([state.C, state.n[..., None]], dim=-1)  # (B, H, d_qk, d_v + 1)

    # Cumulative log-forget G_t = Σ_{u≤t} lf_u, in float64: over thousands of steps it reaches -1e3 and
    # beyond, where float32 differences G_t - G_s would carry absolute errors of ~1e-4.
    G = log_f.double().cumsum(-1)  # (B, H, S)
    log_decay = (G[..., :, None] - G[..., None, :]).to(dtype)  # (B, H, S, S): Σ_{u=s+1..t} lf_u
    log_init = (state.m.double()[..., None] + G).to(dtype)  # (B, H, S): the incoming m decayed to t
    valid = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_i_max = log_i
    if reset is not None:
        seg = reset.long().cumsum(-1)  # (B, S): index of the sequence each position belongs to
        valid = valid & (seg[:, None, :, None] == seg[:, None, None, :])  # (B, 1, S, S)
        log_init = torch.where(seg[:, None, :] == 0, log_init, -math.inf)  # only until the first reset
        log_i_max = _reset_log_i(log_i, log_f, reset)
    log_w = torch.where(valid, log_decay + log_i[..., None, :], -math.inf)  # (B, H, S, S)
    with torch.no_grad():
        log_w_max = log_w if reset is None else torch.where(valid, log_decay + log_i_max[..., None, :], -math.inf)
        m = torch.maximum(log_w_max.amax(-1), log_init)  # (B, H, S), the recurrence's m exactly

    D = torch.exp(log_w - m[..., None])  # (B, H, S, S)
    scores = (q @ k.transpose(-1, -2)) * D
    init_w = torch.exp(log_init - m)  # (B, H, S): weight of the incoming state at t
    num_den = scores @ v1 + init_w[..., None] * (q @ Cn0)  # (B, H, S, d_v + 1)
    # h = numerator / (max(|denominator|, exp(-m)) + eps): exp(-m) is the stabilised lower bound 1
    h = num_den[..., :d_v] / (torch.maximum(num_den[..., d_v].abs(), torch.exp(-m)) + eps)[..., None]

    # The state after the last position: the last row of the weights applied to k v1ᵀ.
    Cn = (k * D[..., -1, :, None]).transpose(-1, -2) @ v1 + init_w[..., -1, None, None] * Cn0
    return h.to(in_dtype), MLSTMState(Cn[..., :d_v].contiguous(), Cn[..., d_v].contiguous(), m[..., -1])


# ---------------------------------------------------------------------------------------------------
# chunkwise form


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = EPS,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise form: parallel inside chunks of ``chunk_size``, recurrent across chunks; any length S.

    q, k: (B, H, S, d_qk); v: (B, H, S, d_v); i, f: (B, H, S) gate pre-activations; state: MLSTMState
    or None; mask, reset: (B, S) bool or None (see the module docstring).
    Returns h (B, H, S, d_v) in q's dtype and the state after the last position.

    Split in two: everything per position and per chunk that is a scalar (cumulative log gates,
    stabilisers, the weights of keys and carried states) is computed here with plain autograd on
    (B, H, N, L) tensors; everything d-wide (states, outputs) happens in ``_ChunkwiseCore``, which has a
    hand-written backward. Work is O(S·L·d) with L = chunk_size; the recurrence across chunks costs a
    small matmul per group of chunks plus a Python loop over the S/L chunks on (B, H) stabilisers.
    """
    B, H, S, d_qk = q.shape
    d_v = v.shape[-1]
    in_dtype, dtype = q.dtype, _compute_dtype(q)
    state = _state_or_zeros(state, B, H, d_qk, d_v, q.device, dtype)
    if S == 0:
        return v.new_zeros(v.shape), state
    L = min(chunk_size, S)
    N = -(-S // L)  # number of chunks
    pad = N * L - S

    log_i, log_f = _log_gates(i, f, mask, dtype)
    log_i_max = None if reset is None else _reset_log_i(log_i, log_f, reset)
    if pad:  # pad the gates with neutral positions: they change neither the outputs nor the state
        log_f = F.pad(log_f, (0, pad), value=0.0)
        log_i = F.pad(log_i, (0, pad), value=-math.inf)
        if reset is not None:
            log_i_max = F.pad(log_i_max, (0, pad), value=-math.inf)
            reset = F.pad(reset, (0, pad), value=False)
    log_i, log_f = log_i.reshape(B, H, N, L), log_f.reshape(B, H, N, L)

    g = log_f.cumsum(-1)  # (B, H, N, L): log decay from the chunk start through position t
    g_last = g[..., -1]  # (B, H, N): log decay across the whole chunk
    x = log_i - g  # (B, H, N, L): log weight of key s, up to the reader's g_t (weight_ts = g_t + x_s)
    # log decay of the incoming state across each chunk; a reset in the chunk cuts it
    chunk_decay = g_last if reset is None else torch.where(reset.reshape(B, 1, N, L).any(-1), -math.inf, g_last)
    mask_bias = torch.zeros(L, L, dtype=dtype, device=q.device).masked_fill_(
        ~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), -math.inf
    )  # (L, L): 0 where key s is visible from t (s <= t), -inf elsewhere

    with torch.no_grad():
        if reset is None:
            # max_{s≤t} (g_t + x_s) = g_t + cummax(x)_t: O(L) instead of a max over the (L, L) matrix
            x_cummax = x.cummax(-1).values
            m_intra = g + x_cummax  # (B, H, N, L) stabiliser of the intra-chunk terms at t
            chunk_max = g_last + x_cummax[..., -1]  # (B, H, N) same, seen from the chunk end
            carries_in = None
        else:
            seg = reset.reshape(B, N, L).long().cumsum(-1)  # (B, N, L): 0 = still the incoming sequence
            same_seg = seg[:, None, :, :, None] == seg[:, None, :, None, :]  # (B, 1, N, L, L)
            mask_bias = torch.where(same_seg, mask_bias, -math.inf)
            x_max = log_i_max.reshape(B, H, N, L) - g
            m_intra = (g[..., :, None] + x_max[..., None, :] + mask_bias).amax(-1)
            in_last_seg = (seg == seg[..., -1:])[:, None]  # (B, 1, N, L): keys that reach the chunk end
            chunk_max = g_last + torch.where(in_last_seg, x_max, -math.inf).amax(-1)
            carries_in = (seg == 0)[:, None]  # (B, 1, N, L): rows that still see the incoming state

        # Stabiliser of the state entering (m_in) and leaving (m_out) each chunk: the recurrence
        # m' = max(decay + m, chunk_max), a loop over chunks on (B, H) tensors.
        m_c, m_in = state.m, []
        for decay_c, max_c in zip(chunk_decay.unbind(-1), chunk_max.unbind(-1)):
            m_in.append(m_c)
            m_c = torch.maximum(decay_c + m_c, max_c)
        m_in = torch.stack(m_in, dim=-1)  # (B, H, N)
        m_out = torch.cat([m_in[..., 1:], m_c[..., None]], dim=-1)  # (B, H, N)
        # log weight of the incoming state at t, up to g_t: its m, or -inf in rows after a reset
        c_in = m_in[..., None].expand(B, H, N, L)
        if carries_in is not None:
            c_in = torch.where(carries_in, c_in, -math.inf)
        m = torch.maximum(m_intra, g + c_in)  # (B, H, N, L), equal to the recurrence's m_t

    # weight of key s in the state its chunk hands on (only keys after the chunk's last reset reach it)
    x_state = x if reset is None else torch.where(in_last_seg, x, -math.inf)
    key_w = torch.exp(g_last[..., None] + x_state - m_out[..., None])  # (B, H, N, L)
    log_carry = chunk_decay + m_in - m_out  # (B, H, N) log weight of the incoming state in the outgoing
    Cn0 = torch.cat([state.C, state.n[..., None]], dim=-1)  # (B, H, d_qk, d_v + 1)
    h, Cn = _ChunkwiseCore.apply(q, k, v, g - m, x, c_in, m, key_w, log_carry, Cn0, mask_bias, eps)
    return h.to(in_dtype), MLSTMState(Cn[..., :d_v].contiguous(), Cn[..., d_v].contiguous(), m_c)


def _chunk_groups(N: int, bytes_per_chunk: int) -> list[tuple[int, int]]:
    """Consecutive chunk ranges [c0, c1) whose (L, L) temporaries take about BLOCK_BYTES each, and of at
    most MAX_GROUP_CHUNKS chunks."""
    step = min(max(1, BLOCK_BYTES // bytes_per_chunk), MAX_GROUP_CHUNKS)
    return [(c0, min(c0 + step, N)) for c0 in range(0, N, step)]


class _Workspace:
    """Named scratch buffers reused from one group of chunks to the next.

    Fresh memory is expensive: the first touch of every page the allocator gets from the OS costs a page
    fault (measured here at ~2 ms per MB, more than the arithmetic done on it). Buffers are allocated
    once, for the largest group, and smaller groups use a prefix.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.buffers = device, dtype, {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, device=self.device, dtype=self.dtype)
        return buf[:numel].view(shape)


def _gather(ws: _Workspace, name: str, t: torch.Tensor, c0: int, c1: int, L: int, ones: bool = False) -> torch.Tensor:
    """Chunks [c0, c1) of a (B, H, S, d) tensor (any strides and dtype) as one contiguous
    (B·H·G, L, d) batch in the workspace, zero-padded past S, with a column of ones appended when
    ``ones`` (G = c1 - c0)."""
    B, H, S, d = t.shape
    t0, t1 = c0 * L, min(c1 * L, S)
    out = ws(name, B, H, (c1 - c0) * L, d + ones)
    out[:, :, : t1 - t0, :d] = t[:, :, t0:t1]
    if t1 - t0 < (c1 - c0) * L:
        out[:, :, t1 - t0 :, :d] = 0.0
    if ones:
        out[..., d] = 1.0
    return out.view(-1, L, d + ones)


def _scatter(dst: torch.Tensor, src: torch.Tensor, c0: int, L: int) -> None:
    """Write the first d columns of a (B·H·G, L, ≥d) batch into the chunks starting at c0 of a
    (B, H, S, d) tensor (the part before S)."""
    B, H, S, d = dst.shape
    t0 = c0 * L
    rows = src.view(B, H, -1, src.shape[-1])[..., :d]
    dst[:, :, t0 : t0 + rows.shape[2]] = rows[:, :, : S - t0]


def _boundary_decays(log_carry: torch.Tensor) -> torch.Tensor:
    """Log carries a (b, G) of G consecutive chunks -> P (b, G + 1, G + 1), with
    P[r, p] = exp(a_p + ... + a_{r-1}) for p ≤ r and 0 for p > r: the weight with which the state at
    chunk boundary p survives in the state at boundary r (boundary r enters chunk r; boundary G leaves
    the last one). Each entry sums exactly its own terms (a masked cumulative sum rather than a
    difference of prefix sums), so a -inf carry (a reset) stays -inf without NaNs and no precision is
    lost over long runs of chunks.
    """
    b, G = log_carry.shape
    r = torch.arange(G + 1, device=log_carry.device)[:, None]
    terms = torch.where(torch.arange(G, device=log_carry.device) < r, log_carry[:, None, :], 0.0)  # a_u, u < r
    sums = F.pad(terms.flip(-1).cumsum(-1).flip(-1), (0, 1))  # (b, G + 1, G + 1): Σ_{p ≤ u < r} a_u
    return torch.where(torch.arange(G + 1, device=log_carry.device) <= r, sums.exp(), 0.0)


def _boundary_decays_backward(P: torch.Tensor, dP: torch.Tensor) -> torch.Tensor:
    """Gradient of the log carries (b, G) from that of P = _boundary_decays(log carries): a_u appears in
    every P[r, p] with p ≤ u < r, with derivative P[r, p]."""
    G = P.shape[-1] - 1
    below = (dP * P).cumsum(-1)[..., :G]  # [r, u]: Σ_{p ≤ u} dP[r, p] P[r, p]
    r = torch.arange(G + 1, device=P.device)[:, None]
    return torch.where(torch.arange(G, device=P.device) < r, below, 0.0).sum(-2)


class _Group(NamedTuple):
    """One group of chunks inside _ChunkwiseCore; (b, ·) tensors with b = B·H·(chunks in the group)."""

    q: torch.Tensor  # (b, L, d_qk) q̂
    k: torch.Tensor  # (b, L, d_qk)
    v1: torch.Tensor  # (b, L, d_v + 1)
    weights: torch.Tensor  # (b, L, L) intra-chunk weights exp(w_t + x_s), 0 where masked
    scores: torch.Tensor  # (b, L, L) weights · (q̂ kᵀ)
    inter_w: torch.Tensor  # (b, L) weight of the incoming state at t
    k_w: torch.Tensor  # (b, L, d_qk) k · key_w
    key_w: torch.Tensor  # (b, L)
    m: torch.Tensor  # (b, L)
    chunk_Cn: torch.Tensor  # (B·H, G, d_qk·(d_v + 1)) each chunk's own contribution to the state
    decays: torch.Tensor  # (B·H, G + 1, G + 1) _boundary_decays of the group
    Cn_in: torch.Tensor  # (b, d_qk, d_v + 1) state entering each chunk
    Cn_out: torch.Tensor  # (B, H, d_qk, d_v + 1) state leaving the group


class _ChunkwiseCore(torch.autograd.Function):
    """The d-wide part of the chunkwise form, with a hand-written backward.

    Inputs: q, k (B, H, S, d_qk), v (B, H, S, d_v) (any strides, any float dtype); and per chunk
    (N chunks of L, S ≤ N·L), in the compute dtype: w = g - m, x, c, m (B, H, N, L), key_w (B, H, N, L),
    log_carry (B, H, N), Cn0 (B, H, d_qk, d_v + 1), mask_bias (L, L) or (B, 1, N, L, L); eps a float.
    With q̂ = q/sqrt(d_qk) and v1 = [v | 1] it computes, for position t of chunk j,

        out_t = Σ_s exp(w_t + x_s + mask_bias_ts) (q̂_t·k_s) v1_s  +  exp(w_t + c_t) Cn_jᵀ q̂_t
        Cn_{j+1} = exp(log_carry_j) Cn_j + Σ_s key_w_s k_s v1_sᵀ,    Cn_0 = Cn0
        h_t = out_t[:d_v] / (max(|out_t[d_v]|, exp(-m_t)) + eps)

    and returns h (B, H, S, d_v) and the last state Cn_N. (n is the memory of the constant 1 column, so
    [C | n] evolve as one tensor and one matmul gives numerator and denominator.)

    Why by hand: autograd would keep and re-read a dozen (B, H, S, d)- and (…, L, L)-sized
    intermediates. Here the chunks are processed in groups whose temporaries live in one reused
    workspace that stays in cache; the (L, L) matrices and the states inside a group are recomputed in
    the backward from the group's entry state instead of being stored; and the gate gradients need no
    (L, L) work at all: d out_t/d w_t = out_t gives dw_t = <dout_t, out_t>, and dx_s = <v1_s, dv1_s>.
    The recurrence over a group's chunks is solved with one small matmul against the matrix of decays
    between chunk boundaries (_boundary_decays) instead of a loop of one op per chunk: on a shared
    machine every op that runs on both cores can stall on the slower one, and the loop was the bulk
    of the ops.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, x, c, m, key_w, log_carry, Cn0, mask_bias, eps):
        B, H, S, d_qk = q.shape
        d_v = v.shape[-1]
        N, L = w.shape[-2:]
        ws = _Workspace(q.device, w.dtype)
        groups = _chunk_groups(N, B * H * L * L * w.element_size())
        h = torch.empty(B, H, S, d_v, dtype=w.dtype, device=q.device)
        den = torch.empty_like(w)  # (B, H, N, L) denominators, for the backward
        Cn_groups = []  # the state entering each group
        Cn = Cn0
        for c0, c1 in groups:
            Cn_groups.append(Cn)
            g = _ChunkwiseCore._group(ws, q, k, v, w, x, c, m, key_w, log_carry, mask_bias, Cn, c0, c1)
            Cn = g.Cn_out
            out = torch.bmm(g.scores, g.v1, out=ws("out", *g.v1.shape))
            q_inter = torch.mul(g.q, g.inter_w[..., None], out=ws("q_inter", *g.q.shape))
            out.baddbmm_(q_inter, g.Cn_in)  # + the incoming state
            den_g = den[:, :, c0:c1]
            den_g.copy_(out[..., d_v].view(den_g.shape))
            inv = 1.0 / (torch.maximum(out[..., d_v].abs(), torch.exp(-g.m)) + eps)
            _scatter(h, out.mul_(inv[..., None]), c0, L)
        ctx.eps, ctx.groups = eps, groups
        ctx.save_for_backward(q, k, v, w, x, c, m, key_w, log_carry, mask_bias, torch.stack(Cn_groups, 2), h, den)
        return h, Cn

    @staticmethod
    def _group(ws, q, k, v, w, x, c, m, key_w, log_carry, mask_bias, Cn, c0, c1) -> _Group:
        """Everything the outputs of chunks [c0, c1) need, from the state Cn (B, H, d_qk, d_v + 1) that
        enters chunk c0. Tensors are (b, L, ·) with b = B·H·(c1 - c0)."""
        B, H, _, d_qk = q.shape
        L = w.shape[-1]
        G = c1 - c0
        q_g = _gather(ws, "q", q, c0, c1, L).mul_(d_qk**-0.5)
        k_g = _gather(ws, "k", k, c0, c1, L)
        v1 = _gather(ws, "v1", v, c0, c1, L, ones=True)
        w_g, x_g, c_g, m_g, key_w_g = (t[:, :, c0:c1].reshape(-1, L) for t in (w, x, c, m, key_w))
        b = q_g.shape[0]
        # Intra-chunk weights exp(w_t + x_s), masked. The mask's -inf goes in before the exponential, which
        # so never sees the (possibly huge) positive exponents above the diagonal. Computed as exp2 of
        # log2(e)-scaled exponents: torch.exp is 2x slower than exp2 on ordinary inputs and 5x slower on
        # -inf (half of every matrix), at least on the AVX2 CPU builds measured here.
        bias = mask_bias if mask_bias.dim() == 2 else mask_bias[:, :, c0:c1].expand(B, H, G, L, L).reshape(b, L, L)
        weights = torch.add((w_g * LOG2_E)[:, :, None], (x_g * LOG2_E)[:, None, :], out=ws("weights", b, L, L))
        weights.add_(bias).exp2_()
        scores = torch.bmm(q_g, k_g.transpose(1, 2), out=ws("scores", b, L, L)).mul_(weights)
        inter_w = torch.exp(w_g + c_g)
        # the chunks' own states, then the recurrence through the group
        k_w = torch.mul(k_g, key_w_g[..., None], out=ws("k_w", b, L, d_qk))
        chunk_Cn = torch.bmm(k_w.transpose(1, 2), v1, out=ws("chunk_Cn", b, d_qk, v1.shape[-1]))
        chunk_Cn = chunk_Cn.view(B * H, G, -1)
        # states at the chunk boundaries: the entry state and every chunk's contribution, decayed
        decays = _boundary_decays(log_carry[:, :, c0:c1].reshape(B * H, G))  # (B·H, G + 1, G + 1)
        entry = Cn.reshape(B * H, -1)
        Cn_in = torch.bmm(decays[:, :G, 1:], chunk_Cn, out=ws("Cn_in", B * H, G, chunk_Cn.shape[-1]))
        Cn_in.addcmul_(decays[:, :G, :1], entry[:, None, :])
        Cn_out = torch.bmm(decays[:, G:, 1:], chunk_Cn)[:, 0].addcmul_(decays[:, G:, 0], entry)
        return _Group(q_g, k_g, v1, weights, scores, inter_w, k_w, key_w_g, m_g, chunk_Cn, decays,
                      Cn_in.view(b, d_qk, -1), Cn_out.view(Cn.shape))

    @staticmethod
    def backward(ctx, dh, dCn_last):
        q, k, v, w, x, c, m, key_w, log_carry, mask_bias, Cn_groups, h, den = ctx.saved_tensors
        B, H, S, d_qk = q.shape
        d_v = v.shape[-1]
        N, L = w.shape[-2:]
        ws = _Workspace(q.device, w.dtype)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        dw, dx, dkey_w, dlog_carry = (torch.empty_like(t) for t in (w, x, key_w, log_carry))
        dCn = torch.zeros_like(Cn_groups[:, :, 0]) if dCn_last is None else dCn_last.clone()
        if dh is None:
            dh = torch.zeros_like(h)
        # <dh_t, h_t> for all positions at once (a batched dot product, no (B, H, S, d_v) temporary)
        dh_h = F.pad(torch.einsum("bhsd,bhsd->bhs", dh, h), (0, N * L - S)).view(B, H, N, L)
        for gi in reversed(range(len(ctx.groups))):
            c0, c1 = ctx.groups[gi]
            G = c1 - c0
            g = _ChunkwiseCore._group(ws, q, k, v, w, x, c, m, key_w, log_carry, mask_bias, Cn_groups[:, :, gi], c0, c1)
            b = g.q.shape[0]
            # through the normaliser: h = num·inv, inv = 1/(max(|den|, e^-m) + eps), num = out[:d_v]
            den_g = den[:, :, c0:c1].reshape(-1, L)
            floor = torch.exp(-g.m)
            inv = 1.0 / (torch.maximum(den_g.abs(), floor) + ctx.eps)
            dh_h_g = dh_h[:, :, c0:c1].reshape(-1, L)  # <dh, h> = <dh, num>·inv
            dden = torch.where(den_g.abs() >= floor, -dh_h_g * inv * torch.sign(den_g), 0.0)
            dout = ws("dout", b, L, d_v + 1)  # [dh·inv | dden], filled straight from dh
            t0, t1 = c0 * L, min(c1 * L, S)
            dout_rows = dout.view(B, H, G * L, d_v + 1)
            torch.mul(dh[:, :, t0:t1], inv.view(B, H, G * L, 1)[:, :, : t1 - t0], out=dout_rows[:, :, : t1 - t0, :d_v])
            dout_rows[:, :, t1 - t0 :, :d_v] = 0.0
            dout[..., d_v] = dden
            dw[:, :, c0:c1] = (dh_h_g + dden * den_g).view(B, H, G, L)  # <dout, out>
            # intra-chunk part
            dv1 = torch.bmm(g.scores.transpose(1, 2), dout, out=ws("dv1", b, L, d_v + 1))
            dx[:, :, c0:c1] = torch.mul(g.v1, dv1, out=ws("tmp", b, L, d_v + 1)).sum(-1).view(B, H, G, L)
            dqk = torch.bmm(dout, g.v1.transpose(1, 2), out=ws("dqk", b, L, L)).mul_(g.weights)  # d(q̂ kᵀ)
            dq_g = torch.bmm(dqk, g.k, out=ws("dq", b, L, d_qk))
            dq_g.baddbmm_(dout.mul_(g.inter_w[..., None]), g.Cn_in.transpose(1, 2))  # dout scaled from here on
            dk_g = torch.bmm(dqk.transpose(1, 2), g.q, out=ws("dk", b, L, d_qk))
            # incoming states: their gradient from this group's outputs, then the recurrence backwards
            dCn_in = torch.bmm(g.q.transpose(1, 2), dout, out=ws("dCn_in", b, d_qk, d_v + 1))
            # back through the boundary states: [Cn_in; Cn_out] = decays @ [entry; chunk_Cn]
            dCn_in, dCn_out = dCn_in.view(B * H, G, -1), dCn.reshape(B * H, -1)
            decays = g.decays
            dchunk = torch.bmm(decays[:, :G, 1:].transpose(1, 2), dCn_in, out=ws("dchunk", B * H, G, dCn_in.shape[-1]))
            dchunk.addcmul_(decays[:, G, 1:, None], dCn_out[:, None, :])
            dboundary = torch.cat([dCn_in, dCn_out[:, None]], dim=1)  # (B·H, G + 1, ·)
            boundary_src = torch.cat([Cn_groups[:, :, gi].reshape(B * H, 1, -1), g.chunk_Cn], dim=1)
            ddecays = torch.bmm(dboundary, boundary_src.transpose(1, 2))
            dlog_carry[:, :, c0:c1] = _boundary_decays_backward(decays, ddecays).view(B, H, G)
            dCn = torch.bmm(decays[:, None, :, 0], dboundary).view(dCn.shape)  # gradient of the entry state
            # the chunks' own states: chunk_Cn = (k·key_w)ᵀ v1
            dchunk = dchunk.view(b, d_qk, d_v + 1)
            dk_w = torch.bmm(g.v1, dchunk.transpose(1, 2), out=ws("dk_w", b, L, d_qk))
            dv1.baddbmm_(g.k_w, dchunk)
            dk_g.addcmul_(dk_w, g.key_w[..., None])
            dkey_w[:, :, c0:c1] = dk_w.mul_(g.k).sum(-1).view(B, H, G, L)
            _scatter(dq, dq_g.mul_(d_qk**-0.5), c0, L)
            _scatter(dk, dk_g, c0, L)
            _scatter(dv, dv1, c0, L)
        return dq, dk, dv, dw, dx, None, None, dkey_w, dlog_carry, dCn, None, None


# ---------------------------------------------------------------------------------------------------
# optional GPU kernels (mlstm_kernels' Triton chunkwise kernel), thin and never required


def _triton_available(x: torch.Tensor) -> bool:
    """True when x is on CUDA and the optional ``mlstm_kernels`` package (with Triton) is importable."""
    if not x.is_cuda:
        return False
    try:
        from mlstm_kernels.torch import get_available_mlstm_kernels
    except ImportError:
        return False
    return "chunkwise--triton_xl_chunk" in get_available_mlstm_kernels()


# Neutral gate pre-activations for the Triton kernel, which takes pre-activations only: in float32,
# logsigmoid(1e4) == 0 (no decay) and exp(-1e4 - m) == 0 (no write), so masked and padded positions pass
# the state through exactly, as -inf would, without risking inf - inf inside the kernel.
_TRITON_NEUTRAL_F, _TRITON_NEUTRAL_I = 1e4, -1e4


def mlstm_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, MLSTMState]:
    """mlstm_kernels' Triton chunkwise kernel (``chunkwise--triton_xl_chunk``), same function and shapes
    as ``mlstm_chunkwise`` (no ``reset``: use the native form for that). CUDA only.

    The kernel wants S to be a multiple of its chunk size, so the end is padded with neutral gates.
    """
    from mlstm_kernels.torch import get_mlstm_kernel

    B, H, S, d_qk = q.shape
    d_v = v.shape[-1]
    state = _state_or_zeros(state, B, H, d_qk, d_v, q.device, torch.float32)
    i, f = i.float(), f.float()
    if mask is not None:
        i = torch.where(mask[:, None, :], i, _TRITON_NEUTRAL_I)
        f = torch.where(mask[:, None, :], f, _TRITON_NEUTRAL_F)
    pad = -S % chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i = F.pad(i, (0, pad), value=_TRITON_NEUTRAL_I)
        f = F.pad(f, (0, pad), value=_TRITON_NEUTRAL_F)
    kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")
    h, (C, n, m) = kernel(
        q.float(), k.float(), v.float(), i, f,
        c_initial=state.C, n_initial=state.n, m_initial=state.m[..., None],
        return_last_states=True, chunk_size=chunk_size, eps=EPS,
    )
    return h[:, :, :S].to(q.dtype), MLSTMState(C.float(), n.float(), m.float().reshape(B, H))


# ---------------------------------------------------------------------------------------------------
# modules


class FusedLinear:
    """Inference-only concatenation of several ``nn.Linear`` along their outputs, as one (in, Σ out) matrix
    (`get`): one matmul instead of one per projection (decoding at batch 1 pays per kernel launch and per
    pass over the weights).

    Layout. On the CPU in float32 the weights are kept transposed, (in_features, Σ out_features) contiguous:
    a one-row product streams that layout faster than nn.Linear's (out, in) (measured on this project's
    CPU, one thread, cold caches: 1764×576 fp32 380 µs vs 570 µs; at 16 rows the two are within noise in
    whole decoding runs). Elsewhere the (out, in) layout is kept, as a view: in half precision the
    transposed one falls off PyTorch's fast CPU kernels (1764×576 fp16, one row: 2.1 ms vs 0.33 ms), and
    on other devices no measurement favours a second copy of the weights.

    ``scales`` (one number per linear, default all 1) multiplies each linear's weight and bias in the cache:
    constant factors on a projection's output (the mLSTM's 1/sqrt(head width) on q, the 1/cap inside the
    gates' soft cap) then cost nothing per step. Other scales than the cache's rebuild it. ``in_scale``
    (in_features,), a parameter, multiplies the inputs: an elementwise weight applied just before the
    projection (the mLSTM's head-norm weight) is folded into the matrix; it is tracked like the weights.

    Not a parameter or buffer (state dicts and checkpoints are untouched) but a cache, rebuilt whenever a
    source weight or bias changed: in place (its version counter moved) or replaced (its storage changed;
    the cache holds aliases of the storages it was built from, so a replaced one's address cannot be
    reused and mistaken for it). The result equals the separate projections up to float rounding.
    """

    def __init__(self):
        self._scales: tuple[float, ...] | None = None
        self._sources: tuple[torch.Tensor, ...] = ()  # aliases of the parameters the cache was built from
        self._versions: tuple[int, ...] = ()
        self.weight_t: torch.Tensor | None = None  # (in_features, Σ out_features), maybe a view of (out, in)
        self.bias: torch.Tensor | None = None  # (Σ out_features,) or None when no linear has a bias

    def get(
        self, linears: tuple[nn.Linear, ...], scales: tuple[float, ...] | None = None,
        in_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> weight_t (in_features, Σ out_features), bias (Σ out_features,) or None."""
        params = tuple(p for lin in linears for p in (lin.weight, lin.bias) if p is not None)
        if in_scale is not None:
            params += (in_scale,)
        if scales != self._scales or not self._fresh(params):
            # Built as a normal tensor even under inference_mode, so that later no_grad calls may use it.
            with torch.inference_mode(False), torch.no_grad():
                self._scales = scales
                scales = scales or (1.0,) * len(linears)
                weights = [lin.weight * s if s != 1.0 else lin.weight for lin, s in zip(linears, scales)]
                if in_scale is not None:
                    weights = [w * in_scale for w in weights]  # (out, in) * (in,): scales the inputs
                w0 = linears[0].weight
                if w0.device.type == "cpu" and w0.dtype == torch.float32:
                    self.weight_t = torch.cat(weights).t().contiguous()  # (in, Σ out)
                else:  # the (out, in) layout, as a view; a single linear needs no concatenated copy
                    self.weight_t = (weights[0] if len(weights) == 1 else torch.cat(weights)).t()
                has_bias = any(lin.bias is not None for lin in linears)
                self.bias = torch.cat([
                    lin.bias * s if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                    for lin, s in zip(linears, scales)
                ]) if has_bias else None
            self._sources = tuple(p.detach() for p in params)
            self._versions = tuple(p._version for p in params)
        return self.weight_t, self.bias

    def _fresh(self, params: tuple[torch.Tensor, ...]) -> bool:
        return len(params) == len(self._sources) and all(
            p.data_ptr() == src.data_ptr() and p._version == version and p.dtype == src.dtype
            for p, src, version in zip(params, self._sources, self._versions)
        )


def _decoding(x: torch.Tensor) -> bool:
    """x (B, S, d): one position without autograd, the case the fused inference paths serve."""
    return x.shape[1] == 1 and not torch.is_grad_enabled()


def _at_one_position(step, x: torch.Tensor, state, mask: torch.Tensor | None, reset: torch.Tensor | None):
    """A module's `forward` for one position through its `step`: x (B, 1, d), mask / reset (B, 1) or None
    -> step(x (B, d), state, mask (B,), reset (B,)) -> (y (B, 1, d), new state)."""
    y, state = step(x[:, 0], state, None if mask is None else mask[:, 0], None if reset is None else reset[:, 0])
    return y[:, None], state


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): smooth clamp to (-cap, cap), identity near 0."""
    return cap * torch.tanh(x / cap)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's features separately (mean subtracted, biased variance, float32
    reductions), with one learnable weight per (head, feature) and no bias, as the reference's
    ``MultiHeadLayerNorm``. (..., H, d_head) -> (..., H * d_head), e.g. (B, S, H, d_head) -> (B, S, H * d_head).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, d_head) -> (..., H * d_head)."""
        return self.normalize(x) * self.weight

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm without its weight (decoding folds the weight into the next matrix):
        (..., H, d_head) -> (..., H * d_head)."""
        y = F.layer_norm(_as(x, torch.float32), x.shape[-1:], eps=self.eps)
        return _as(y, x.dtype).flatten(-2)


BACKENDS = ("auto", "parallel", "chunkwise", "recurrent", "triton")


class MLSTMLayer(nn.Module):
    """The mLSTM layer of the local models (spec §2.2): projections, soft-capped gates, the cell, a
    per-head LayerNorm, the sigmoid output gate and the output projection.

    Parameters (d = d_model, H = num_heads, d_qk = qk_dim_factor·d, d_v = v_dim_factor·d):
    q_proj, k_proj: d -> d_qk; v_proj, ogate_proj: d -> d_v; igate_proj, fgate_proj: d -> H with bias;
    head_norm: weight (d_v,); out_proj: d_v -> d. Only the gates have biases.

    Init: PyTorch defaults, except the input-gate bias = ``igate_bias_init`` (-10, the reference's
    "disable input gate": the layer starts close to a no-op, so a pretrained residual stream is barely
    disturbed). The forget-gate bias keeps PyTorch's default init (uniform ±1/sqrt(d)), as the reference
    does; pass ``fgate_bias_init=(lo, hi)`` for an xLSTM-style linspace over heads (e.g. (3, 6): forget
    gates open, long memory from the start).

    ``backend``: "auto" (step for S == 1, parallel for S <= PARALLEL_MAX_LEN, chunkwise above),
    "parallel", "chunkwise", "recurrent" (the slow loop), or "triton" (mlstm_kernels' Triton chunkwise
    kernel when on CUDA with the package installed, else the native chunkwise form).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 16,
        qk_dim_factor: float = 0.5,
        v_dim_factor: float = 1.0,
        gate_soft_cap: float = GATE_SOFT_CAP,
        norm_eps: float = NORM_EPS,
        igate_bias_init: float = IGATE_BIAS_INIT,
        fgate_bias_init: tuple[float, float] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "auto",
    ):
        super().__init__()
        d_qk, d_v = int(d_model * qk_dim_factor), int(d_model * v_dim_factor)
        if d_qk % num_heads or d_v % num_heads:
            raise ValueError(f"q/k width {d_qk} and v width {d_v} must be divisible by num_heads={num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.num_heads, self.d_qk, self.d_v = d_model, num_heads, d_qk, d_v
        self.gate_soft_cap, self.chunk_size, self.backend = gate_soft_cap, chunk_size, backend
        self.igate_bias_init, self.fgate_bias_init = igate_bias_init, fgate_bias_init

        self.q_proj = nn.Linear(d_model, d_qk, bias=False)
        self.k_proj = nn.Linear(d_model, d_qk, bias=False)
        self.v_proj = nn.Linear(d_model, d_v, bias=False)
        self.ogate_proj = nn.Linear(d_model, d_v, bias=False)
        self.igate_proj = nn.Linear(d_model, num_heads, bias=True)
        self.fgate_proj = nn.Linear(d_model, num_heads, bias=True)
        self.head_norm = MultiHeadLayerNorm(num_heads, d_v // num_heads, eps=norm_eps)
        self.out_proj = nn.Linear(d_v, d_model, bias=False)
        self.fused_in = FusedLinear()  # decoding (`step`): q, k, v, o-gate, i-gate, f-gate as one matmul
        self.fused_out = FusedLinear()  # decoding: out_proj in the layout that reads fastest
        self.reset_gate_biases()

    @torch.no_grad()
    def reset_gate_biases(self) -> None:
        """Input-gate bias <- igate_bias_init; forget-gate bias <- linspace(fgate_bias_init) if given."""
        self.igate_proj.bias.fill_(self.igate_bias_init)
        if self.fgate_bias_init is not None:
            lo, hi = self.fgate_bias_init
            self.fgate_proj.bias.copy_(torch.linspace(lo, hi, self.num_heads))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, H * d) -> (B, H, S, d)."""
        B, S, _ = t.shape
        return t.view(B, S, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        state: MLSTMState | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MLSTMState]:
        """x: (B, S, d_model); state: MLSTMState or None (start from zero); mask, reset: (B, S) bool or
        None (mask False: position leaves the state untouched; reset True: a new sequence starts here).
        Returns y (B, S, d_model) and the state after the last position (float32).
        """
        B, S, _ = x.shape
        if self.backend == "auto" and _decoding(x):
            return _at_one_position(self.step, x, state, mask, reset)
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        i = soft_cap(self.igate_proj(x), self.gate_soft_cap).transpose(1, 2)  # (B, H, S)
        f = soft_cap(self.fgate_proj(x), self.gate_soft_cap).transpose(1, 2)

        backend = self.backend
        if backend == "triton" and (reset is not None or not _triton_available(x)):
            backend = "chunkwise"  # the Triton path is optional; the native form computes the same
        if backend == "auto":
            backend = "step" if S == 1 else "parallel" if S <= PARALLEL_MAX_LEN else "chunkwise"
        if backend == "step":
            h, state = mlstm_step(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], state,
                mask=None if mask is None else mask[:, 0], reset=None if reset is None else reset[:, 0],
            )
            h = h[:, :, None]
        elif backend == "parallel":
            h, state = mlstm_parallel(q, k, v, i, f, state, mask=mask, reset=reset)
        elif backend == "chunkwise":
            h, state = mlstm_chunkwise(q, k, v, i, f, state, mask=mask, reset=reset, chunk_size=self.chunk_size)
        elif backend == "recurrent":
            h, state = mlstm_recurrent(q, k, v, i, f, state, mask=mask, reset=reset)
        else:  # triton
            h, state = mlstm_chunkwise_triton(q, k, v, i, f, state, mask=mask)

        h = self.head_norm(h.transpose(1, 2))  # (B, S, d_v)
        y = self.out_proj(torch.sigmoid(self.ogate_proj(x)) * h)
        return y, state

    def decode_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The matrices `step` multiplies by: (in_w (d_model, 2·d_qk + 2·d_v + 2·H), in_b or None,
        out_w (d_v, d_model)). The six input projections are one matrix, with the cell's 1/sqrt(head width)
        on q and the 1/cap inside the gates' soft cap folded in; the head norm's weight is folded into the
        output projection (see FusedLinear)."""
        H, cap = self.num_heads, self.gate_soft_cap
        in_w, in_b = self.fused_in.get(
            (self.q_proj, self.k_proj, self.v_proj, self.ogate_proj, self.igate_proj, self.fgate_proj),
            scales=((self.d_qk // H) ** -0.5, 1.0, 1.0, 1.0, 1.0 / cap, 1.0 / cap),
        )
        return in_w, in_b, self.fused_out.get((self.out_proj,), in_scale=self.head_norm.weight)[0]

    def step(
        self,
        x: torch.Tensor,
        state: MLSTMState | None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        weights: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, MLSTMState]:
        """`forward` for one position without autograd (decoding): one matmul in, one out, no module calls
        (so no module hooks run).

        x: (B, d_model); state; mask, reset: (B,) bool or None; residual: (B, d_model) added to the output
        inside its matmul (the block's skip connection); weights: `decode_weights()`, gathered once per
        generate call by the caller (default: gathered here). Returns y (B, d_model), the new state.
        """
        B, H = x.shape[0], self.num_heads
        in_w, in_b, out_w = self.decode_weights() if weights is None else weights
        proj = torch.mm(x, in_w) if in_b is None else torch.addmm(in_b, x, in_w)  # (B, 2·d_qk + 2·d_v + 2·H)
        q, k, v, o, gates = proj.split((self.d_qk, self.d_qk, self.d_v, self.d_v, 2 * H), dim=-1)
        gates = torch.tanh(gates) * self.gate_soft_cap  # = soft_cap of the plain projections: i then f
        h, state = mlstm_step(
            q.view(B, H, -1), k.view(B, H, -1), v.view(B, H, -1), gates[:, :H], gates[:, H:], state,
            mask=mask, reset=reset, q_scale=1.0,
        )
        # The head norm without its weight, which out_w carries (decode_weights).
        h = self.head_norm.normalize(h) * torch.sigmoid(o)  # (B, d_v)
        return (torch.mm(h, out_w) if residual is None else torch.addmm(residual, h, out_w)), state


def default_ffn_hidden(d_model: int) -> int:
    """The reference's local FFN width ratio (2816 / 2048 = 1.375), rounded to a multiple of 64."""
    return max(64, int(round(1.375 * d_model / 64)) * 64)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases. (..., d_model) -> (..., d_model)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.fused_gate_up = FusedLinear()  # for `decode`
        self.fused_down = FusedLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_w (d_model, 2·hidden), down_w (hidden, d_model)): the matrices `decode` multiplies by."""
        return (self.fused_gate_up.get((self.gate_proj, self.up_proj))[0],
                self.fused_down.get((self.down_proj,))[0])

    def decode(
        self, x: torch.Tensor, residual: torch.Tensor | None = None,
        weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`forward` for inference (no autograd): gate and up projections as one matmul, ``residual`` added
        inside the down projection's matmul; the projections' module hooks do not run.
        x (B, d_model), residual (B, d_model) or None, weights: `decode_weights()` or None -> (B, d_model)."""
        gate_up_w, down_w = self.decode_weights() if weights is None else weights
        gate, up = torch.mm(x, gate_up_w).chunk(2, dim=-1)
        h = F.silu(gate) * up
        return torch.mm(h, down_w) if residual is None else torch.addmm(residual, h, down_w)


class LocalBlock(nn.Module):
    """One block of the local encoder/decoder (spec §2.1), pre-norm residual:

        y = x + mLSTM(RMSNorm(x));  out = y + SwiGLU(RMSNorm(y))

    Extra keyword arguments go to MLSTMLayer (qk_dim_factor, chunk_size, backend, ...).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 16,
        ffn_hidden: int | None = None,
        norm_eps: float = NORM_EPS,
        **mlstm_kwargs,
    ):
        super().__init__()
        self.mlstm_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlstm = MLSTMLayer(d_model, num_heads=num_heads, **mlstm_kwargs)
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = SwiGLU(d_model, ffn_hidden or default_ffn_hidden(d_model))

    def forward(
        self,
        x: torch.Tensor,
        state: MLSTMState | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MLSTMState]:
        """x: (B, S, d_model); state, mask, reset as in MLSTMLayer.forward. Returns (y, new_state)."""
        if self.mlstm.backend == "auto" and _decoding(x):
            return _at_one_position(self.step, x, state, mask, reset)
        h, state = self.mlstm(self.mlstm_norm(x), state, mask=mask, reset=reset)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), state

    def decode_weights(self) -> tuple:
        """Everything `step` reads from the parameters: (mLSTM norm weight, FFN norm weight, the mLSTM's
        decode_weights(), the FFN's decode_weights())."""
        return self.mlstm_norm.weight, self.ffn_norm.weight, self.mlstm.decode_weights(), self.ffn.decode_weights()

    def step(
        self, x: torch.Tensor, state: MLSTMState | None, mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None, weights: tuple | None = None,
    ) -> tuple[torch.Tensor, MLSTMState]:
        """`forward` for one position without autograd (decoding).

        A decoding step of a small block costs more in per-operation overhead than in arithmetic, so this
        path makes no module calls (no module hooks run), adds both skip connections inside the matmuls,
        and takes its matrices from ``weights`` (`decode_weights()`, which the decoding loop gathers once
        per generate call instead of checking every cache at every byte).
        x: (B, d_model); mask, reset: (B,) bool or None -> (B, d_model), state.
        """
        norm1, norm2, mlstm_w, ffn_w = self.decode_weights() if weights is None else weights
        d = x.shape[-1:]
        y = F.rms_norm(x, d, norm1, self.mlstm_norm.eps)
        x, state = self.mlstm.step(y, state, mask, reset, residual=x, weights=mlstm_w)
        return self.ffn.decode(F.rms_norm(x, d, norm2, self.ffn_norm.eps), residual=x, weights=ffn_w), state


class LocalStack(nn.Module):
    """``num_blocks`` LocalBlocks in sequence; states travel as a list, one MLSTMState per block."""

    def __init__(self, num_blocks: int, d_model: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(LocalBlock(d_model, **block_kwargs) for _ in range(num_blocks))

    def forward(
        self,
        x: torch.Tensor,
        states: list[MLSTMState] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[MLSTMState]]:
        """x: (B, S, d_model); states: list of per-block MLSTMState or None. Returns (y, new_states)."""
        if _decoding(x) and all(block.mlstm.backend == "auto" for block in self.blocks):
            return _at_one_position(self.step, x, states, mask, reset)
        states = states if states is not None else [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block(x, state, mask=mask, reset=reset)
            new_states.append(state)
        return x, new_states

    def decode_weights(self) -> list[tuple]:
        """Every block's `LocalBlock.decode_weights()`: gather once, pass to each `step` of a decoding run."""
        return [block.decode_weights() for block in self.blocks]

    def step(
        self, x: torch.Tensor, states: list[MLSTMState] | None = None, mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None, weights: list[tuple] | None = None,
    ) -> tuple[torch.Tensor, list[MLSTMState]]:
        """One position through every block without autograd (decoding; see LocalBlock.step).
        x: (B, d_model); states; mask, reset: (B,) bool or None; weights: `decode_weights()` or None
        -> y (B, d_model), new states."""
        states = states if states is not None else [None] * len(self.blocks)
        weights = self.decode_weights() if weights is None else weights
        new_states = []
        for block, state, w in zip(self.blocks, states, weights, strict=True):
            x, state = block.step(x, state, mask, reset, weights=w)
            new_states.append(state)
        return x, new_states
