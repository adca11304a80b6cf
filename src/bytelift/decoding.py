"""Cached, batched byte-level decoding: `DecodingSession` runs the prefill and then one byte per step for a
batch (DESIGN §3, spec §5.4); `bytelift.generation` chooses the bytes and drives it.

Shapes: B batch, L prompt bytes (left-padded), S global KV slots, d_l local width, d_g global width,
V_b = 260 byte-side ids, 2·V_b = 520 fused outputs (id k + V_b = "symbol k, and it ends a patch").

Prefill (one encoder pass). The predictor reads k = `boundary_lookahead` bytes ahead, so the boundaries
of the last k prompt bytes are undecidable: they are rolled back and the first k decoding steps of a row
are *forced* to emit them, the LM head choosing only whether each closes a patch (the session picks those
flags itself; a row reports itself ready to its caller once its forced bytes are consumed). The model
input is therefore prompt[:-k]; but the encoder is causal, so one pass over the *whole* prompt gives
exactly the states of prompt[:-k], the lookahead states the predictor needs, *and* the encoder steps of the
forced bytes (their outputs, kept for the forced steps, and the mLSTM state after the last one). The
reference runs the encoder twice; we reuse that pass.

Decoding, per byte: one encoder step and one decoder step (recurrent mLSTM, S = 1), and a global step
(one new KV slot) when a patch closed. Boundaries while decoding come from the head's fused ids.
The local side of a step calls no modules: the mLSTM blocks, the decoder's input projection and the head
multiply by matrices gathered once per session (`FusedLinear`: concatenated, in the layout a one-row
product reads fastest, with constant factors and the norm weights in front of them folded in), so module
hooks on them do not run while decoding. At batch 1 a step's cost is its weights plus a few hundred
operator dispatches, each as dear as a small kernel, so the step avoids every operation it can.

Batching (rows at different patch positions). Every global step appends one KV slot; the slot is marked
valid in the global attention mask only for rows that closed a patch, and each row gets explicit
`position_ids` = its own count of valid patches. So every row attends to exactly its own patches at
exactly its own positions, whatever the other rows do: a row's output equals the row alone (up to float
rounding of batched matmuls). The transformer runs on the waiting rows alone (`computing_rows`: their
inputs, their KV rows; the slot holds zeros for the others), so a step costs what its closed patches
cost. *When* the global model runs is a policy, `global_sync`: the fraction of unfinished rows that must
be waiting (closed a patch) before it runs. 1.0 parks rows that closed a patch until every row has (the
reference's scheme: the fewest global steps, but a round lasts as long as the longest patch of the
batch); a tiny value runs it whenever any row closed a patch (no parking, a global step nearly every
byte); 0.5 (the default) in between. Measurements are in DEFAULT_GLOBAL_SYNC's comment. All three are
identical at batch 1.
Prompt patches are left-padded in the global prefill (as the reference), so with parking the cache has
no holes after the prefill; that keeps sliding-window sources exact (their windows count KV slots), and
for them `global_sync` is forced to 1.0.
A row that finished (eos, stop string, length, full context) leaves the computed batch at the next
step: its mLSTM states, KV-cache rows and bookkeeping are dropped, so it stops costing compute.
The global KV cache appends each new slot in place (`GrowingKVLayer`), where HF's default layer copies
the whole cache at every step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bytelift.checks import ContextError
from bytelift.mlstm import FusedLinear, MLSTMState
from bytelift.prior import NO_NODE, add_prior, prior_logprobs, token_cumsums
from bytelift.tokenization import BYTE_VOCAB_SIZE, PAD_ID, fuse

# Batching policy: the global model runs once at least this fraction of the unfinished rows closed a patch
# (see the module docstring). Measured with benchmarks/generate.py, decode bytes/s for 1.0 (park) / 0.5 /
# 1e-3 (no parking): an untrained SmolLM2 conversion with a biased head (patch lengths varying widely
# between rows), 2 busy CPU cores, batch 16: 52 / 74 / 54 (the global step then computed every row).
# SmolLM2 after the 30-minute `bytelift convert` (its own boundaries, 4.3-4.4 bytes/patch), one thread,
# global step on the waiting rows only: batch 4: 67.9 / 62.8 / 60.2, batch 16: 242.5 / 234.6 / 109.3
# (with every row computed, same run: 70.5 / 50.3 / 40.4 and 192.9 / 199.3 / 72.0). 0.5 stays within a
# few percent of parking when rows close patches alike, and avoids its 30% loss when they do not.
DEFAULT_GLOBAL_SYNC = 0.5
# Global KV-slot capacity grows in blocks of this many slots (the mask buffer is reallocated rarely).
SLOT_BLOCK = 256
# GrowingKVLayer's spare capacity after a growth: a quarter of the slots in use, at least this many. A
# quarter keeps the slack small next to the cache (a large batch's KV cache can take gigabytes) while
# growths stay geometric: each slot is copied a bounded number of times over a generation.
KV_MIN_SPARE = 64
# Finished rows leave the computed batch (mLSTM states, KV cache, bookkeeping) at the next step, so they
# stop costing compute; their outputs are unaffected (rows are independent). Off only in tests.
DROP_FINISHED_ROWS = True


class GrowingKVLayer(DynamicLayer):
    """A full-attention KV-cache layer that appends in place: keys and values live in buffers with spare
    capacity (see KV_MIN_SPARE), and `keys` / `values` are views of their filled part.

    HF's DynamicLayer concatenates the whole cache with the new slot at every step, so each step copies
    every layer's cache: O(slots) bytes per step, quadratic over a generation. Measured on SmolLM2,
    batch 16, ~100 slots, one CPU thread, two profiled runs each: `torch.cat` took 42 / 14 ms of a
    238 / 213 ms global step; with this layer 1 ms of 212 / 191 ms. Here a step writes only its new slot.
    Shapes (B, H_kv, S, d_head) as DynamicLayer; only growth and `batch_select_indices` copy.
    """

    # Rows (R,) of the batch that the current forward computes; None: all of them. Set by `computing_rows`.
    step_rows: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._filled = 0
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states (R, H_kv, S, d_k), value_states (R, H_kv, S, d_v) -> all keys and values so far of
        those R rows: every row (R = B), or the rows `step_rows` when set (see `computing_rows`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._filled, self._filled + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._key_buffer = self._grown(self._key_buffer, key_states, end)
            self._value_buffer = self._grown(self._value_buffer, value_states, end)
        rows = self.step_rows
        if rows is None:
            self._key_buffer[..., start:end, :] = key_states
            self._value_buffer[..., start:end, :] = value_states
        else:
            # The other rows' entries in these slots are never attended to (masked), but they must be
            # finite: a masked score's zero weight times a NaN value would still be NaN.
            self._key_buffer[..., start:end, :] = 0
            self._value_buffer[..., start:end, :] = 0
            self._key_buffer[rows, :, start:end] = key_states
            self._value_buffer[rows, :, start:end] = value_states
        self._filled = end
        self._expose()
        if rows is None:
            return self.keys, self.values
        return self._key_buffer[rows, :, :end], self._value_buffer[rows, :, :end]

    def _grown(self, buffer: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        """A buffer of needed + max(KV_MIN_SPARE, needed // 4) slots holding the filled part of `buffer`."""
        capacity = needed + max(KV_MIN_SPARE, needed // 4)
        rows = new.shape[0] if buffer is None else buffer.shape[0]  # `new` may hold only the step's rows
        grown = new.new_empty(rows, *new.shape[1:-2], capacity, new.shape[-1])
        if buffer is not None and self._filled:
            grown[..., : self._filled, :] = buffer[..., : self._filled, :]
        return grown

    def _expose(self) -> None:
        self.keys = self._key_buffer[..., : self._filled, :]
        self.values = self._value_buffer[..., : self._filled, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (B',) (repeats allowed)."""
        if self.is_initialized and self._key_buffer is not None:
            indices = indices.to(self._key_buffer.device)
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self._expose()

    reorder_cache = batch_select_indices  # the buffers, not only the exposed views, follow a reordering

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self._key_buffer is not None:
            self.batch_select_indices(torch.arange(self._key_buffer.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("bytelift's decoding never crops its KV cache")


def _global_cache(config) -> DynamicCache:
    """The global model's KV cache: HF's per-layer types from the config (sliding windows included), with
    every plain full-attention layer appending in place (GrowingKVLayer)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingKVLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _appends_in_place(cache: DynamicCache) -> bool:
    """Every layer of the cache is a GrowingKVLayer (so a forward may compute some rows only)."""
    return all(isinstance(layer, GrowingKVLayer) for layer in cache.layers)


@contextmanager
def computing_rows(cache: DynamicCache, rows: torch.Tensor):
    """Within the block, a forward through the cache's model computes only the batch rows `rows` (R,):
    its inputs hold those R rows, its new KV slots are written to those rows (zeros elsewhere), and each
    layer returns those rows' keys and values. Needs every layer to be a GrowingKVLayer."""
    if not _appends_in_place(cache):
        raise TypeError("computing_rows needs a cache of GrowingKVLayer layers")
    layers = cache.layers
    for layer in layers:
        layer.step_rows = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.step_rows = None


def _uses_sliding_window(config) -> bool:
    """True when some layer of the global model attends within a window of KV slots."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return any("sliding" in str(t) for t in types)
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


class DecodingSession:
    """Cached decoding state of a batch: mLSTM states, the global KV cache and per-row bookkeeping.

    Protocol: `logits = prefill()` gives the (B, 2·V_b) logits that predict the last prompt byte; then
    `logits, ready = step(symbols)` repeatedly, where `symbols` (B,) are fused ids for the rows that were
    `ready` after the previous call (the first call: the last prompt byte, fused or not). `ready` (B,) bool
    marks the rows whose returned logits are valid (a row that closed a patch may wait for the global
    model; finished rows never become ready). Set rows in `finished` to stop them.

    Internally only the unfinished rows are computed: `rows` (A,) are their indices into the batch, and
    the states, the KV cache, `h_last`, `g_last`, `n_patches`, `waiting`, `history`, `kv_mask` and the
    source prior's `prior_cumsums` / `prior_node` hold those A rows (see `_drop_finished`); `ready` and
    `finished` always cover all B rows.

    Source prior (model.config.source_prior): per row the cumulative next-token probabilities of its latest
    global output (`prior_cumsums`, refreshed at each of its global steps) and a trie cursor (`prior_node`,
    the node of the bytes emitted in its current patch, advanced per byte for all rows at once); the head's
    logits get the prior's log-probabilities added, as in the full forward.
    """

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        expanded_ids: torch.Tensor | None = None,
        global_sync: float = DEFAULT_GLOBAL_SYNC,
    ):
        """input_ids (B, L) left-padded byte-side ids (bos first); attention_mask (B, L); expanded_ids (B, L)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if model.tokenizer is None or model.tokenizer.expander is None:
            raise ValueError("generation needs the byte tokenizer attached (model.attach_tokenizer(...)) for the "
                             "longest-suffix ids of new bytes")
        if not 0.0 < global_sync <= 1.0:
            raise ValueError(f"global_sync must be in (0, 1], got {global_sync}")
        self.model = model
        self.device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask = attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0 or not mask[:, -1].all() or not mask.any(dim=1).all():
            raise ValueError("every prompt needs at least one byte (bos) and the batch must be left-padded")
        if int(input_ids.max()) >= BYTE_VOCAB_SIZE or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids must lie in [0, {BYTE_VOCAB_SIZE}); un-fuse them first")
        self.lookahead = model.config.boundary_lookahead
        self.input_ids, self.mask = input_ids, mask
        self.expanded_ids = model.expand(input_ids, mask) if expanded_ids is None else expanded_ids
        self.expander = model.tokenizer.expander
        gcfg = model.global_model.config
        self.global_sync = 1.0 if _uses_sliding_window(gcfg) else global_sync
        self.max_patches = model.config.max_patches
        B = input_ids.shape[0]
        self.finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.ready = torch.ones(B, dtype=torch.bool, device=self.device)
        self.waiting = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.rows = torch.arange(B, device=self.device)
        self.global_steps = 0
        self.boundary_bias = 0.0  # for the flags of forced prompt bytes (`forced_symbols` sets it)
        self._first_step = True
        self._forcing = True  # some row still has forced prompt bytes to consume (steps skip the work after)
        # Keep `open_patch` (bytes of each row's open patch) up to date at every step; generation asks for it
        # when it caps patch lengths, other callers leave the step its few operations lighter.
        self.count_patch_bytes = False
        self.use_prior = bool(model.config.source_prior)
        self.trie = model.token_trie if self.use_prior else None
        self.prior_cumsums: torch.Tensor | None = None  # (A, T+1) float64
        self.prior_node = torch.full((B,), NO_NODE, dtype=torch.long, device=self.device)

    # --- prefill ---------------------------------------------------------------------------------------

    def prefill(self) -> torch.Tensor:
        """Encoder + predictor over the prompt, global model over its patches, decoder over prompt[:-k].

        Returns:
            (B, 2·V_b) logits at the last model-input position (they predict the first forced byte).
        """
        model, ids, mask = self.model, self.input_ids, self.mask
        B, L = ids.shape
        k = self.lookahead
        n = max(L - k, 0)  # model-input length
        enc, dec = model.encoder, model.decoder
        # The local stacks' decoding matrices, gathered once for the whole run (see LocalBlock.step), and
        # the decoder's input projection and the head in the layout a one-row product reads fastest (see
        # FusedLinear); the head's norm weight is folded into its matrix.
        self.enc_weights, self.dec_weights = enc.layers.decode_weights(), dec.layers.decode_weights()
        self.in_w, self.in_b = FusedLinear().get((dec.in_projection,))
        self.head_w, self.head_b = FusedLinear().get((model.lm_head,), in_scale=model.norm.weight)
        # One pass over the whole prompt (see the module docstring): h (B, L, d_l), states after byte L-1.
        h, self.enc_states = enc(ids, self.expanded_ids, mask=mask)
        logp = model.boundary_predictor(h, mask)
        boundary = model.predict_boundaries(logp, mask, ids)[:, :n]  # the last k are undecided
        self.prompt_boundaries = torch.cat([boundary, torch.zeros_like(mask[:, n:])], dim=1)
        # The forced bytes: prompt columns n..L-1, their encoder outputs already computed. A row with at
        # most k bytes has padding there: its forced bytes start at its first byte (`forced_next`).
        short = k - (L - n)  # a prompt batch shorter than k: its forced columns start with padding
        self.forced_ids = F.pad(ids[:, n:], (short, 0), value=PAD_ID)
        self.forced_h = F.pad(h[:, n:], (0, 0, short, 0))
        self.forced_next = (k - mask[:, n:].sum(dim=1)).long()  # (B,) next forced column (k: none left)
        self.forced_pending = torch.zeros(B, dtype=torch.long, device=self.device)  # its chosen symbol
        self.h_last = h[:, -1]
        width = max(self.expander.max_token_len, 1)
        prompt = np.where(mask.cpu().numpy(), ids.cpu().numpy(), PAD_ID)[:, -width:]
        self.history = np.full((B, width), PAD_ID, dtype=np.int64)
        self.history[:, width - prompt.shape[1] :] = prompt

        counts = boundary.sum(dim=1)  # (B,) prompt patches (excluding the forced bytes')
        # Bytes of each row's open patch in the model input (after its last boundary there).
        last = torch.where(boundary, torch.arange(n, device=self.device), -1).amax(dim=1) if n else counts - 1
        self.open_patch = torch.where(counts > 0, n - 1 - last, 0).long()
        P = int(counts.max()) if n else 0
        if self.max_patches is not None and P > self.max_patches:
            raise ContextError(
                f"the prompt has {P} patches but the global model's context holds {self.max_patches}; "
                "shorten the prompt"
            )
        self.n_patches = counts.clone()
        capacity = P + SLOT_BLOCK
        self.kv_mask = torch.zeros(B, capacity, dtype=torch.long, device=self.device)
        self.num_slots = P
        self.cache = _global_cache(model.global_model.config)
        # A global step can compute only the rows it serves (`computing_rows`) when every layer appends in
        # place; sliding-window layers (HF's) cannot, and there `global_sync` is 1.0 anyway.
        self.rows_computable = _appends_in_place(self.cache)
        if P == 0:  # nothing to run: every prompt is bos alone; no global output yet (zero) until a patch
            self.g_last = self._depool_global(h.new_zeros(B, model.config.global_hidden_size))
            self.dec_states = None
            if self.use_prior:
                self.prior_cumsums = self._prior_cumsums(h.new_zeros(B, model.config.global_hidden_size))
            return h.new_zeros(B, 2 * BYTE_VOCAB_SIZE)

        # Left-pad the patch axis: slot s of row r holds its patch s - offset_r (the reference does the
        # same), so that with parking the cache has no holes after these slots.
        patches, _, _ = _pool_left(h[:, :n], boundary, P)
        offset = P - counts  # (B,)
        slots = torch.arange(P, device=self.device)[None, :]
        valid = slots >= offset[:, None]
        self.kv_mask[:, :P] = valid.long()
        position_ids = (slots - offset[:, None]).clamp(min=0)
        g = self._run_global(patches, position_ids)  # (B, P, d_g)

        # Decoder over prompt[:-k]: byte t reads the row's latest patch that ended at or before t.
        index = (boundary.long().cumsum(dim=1) - 1 + offset[:, None]).clamp(0, P - 1)
        z = dec.depool(h[:, :n], g, index)
        x, self.dec_states = dec(z, mask=mask[:, :n])
        self.g_last = self._depool_global(g[:, -1])  # every row's latest prompt patch sits in slot P-1
        if self.use_prior:
            self.prior_cumsums = self._prior_cumsums(g[:, -1])
            self.prior_node = self.trie.prefix_nodes(ids[:, :n], boundary, mask[:, :n])[:, -1]
        return self._with_prior(self._head(x[:, -1]))

    def forced_symbols(self, logits: torch.Tensor, boundary_bias: float = 0.0) -> torch.Tensor:
        """The first step's symbols: each row's first forced prompt byte, fused iff the head says it closes a
        patch. The first `step` consumes whatever symbols its caller passes (a teacher-forcing caller may
        choose the flags); the session picks the later forced bytes' flags itself, as here, with this
        `boundary_bias`.

        Args:
            logits: (B, 2·V_b) from `prefill`.
        Returns:
            (B,) fused ids; a row's first byte (bos, when the whole prompt is forced) always closes its patch.
        """
        self.boundary_bias = boundary_bias
        self._choose_forced(logits, torch.ones_like(self.ready))
        return self.forced_pending.clone()

    def _choose_forced(self, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """For `rows` (A,) bool, whose next byte is a forced prompt byte: its symbol, the flag from `logits`
        (A, 2·V_b) as the head says (with the session's boundary bias), kept in `forced_pending`."""
        col = self.forced_next.clamp(max=self.lookahead - 1)
        byte = self.forced_ids.gather(1, col[:, None])[:, 0]
        logodds = logits.gather(1, (byte + BYTE_VOCAB_SIZE)[:, None])[:, 0] - logits.gather(1, byte[:, None])[:, 0]
        column = col + self.input_ids.shape[1] - self.lookahead  # in the prompt (< 0: padding before it)
        # A forced byte at a row's first column is its bos, which always starts (and with k = 1 ends) a patch.
        first = self.mask[self.rows].long().argmax(dim=1) == column
        flag = (logodds.float() + self.boundary_bias > 0) | first
        symbol = fuse(byte, flag)
        self.forced_pending = torch.where(rows, symbol, self.forced_pending)
        b, c = self.rows[rows], column[rows]
        self.prompt_boundaries[b, c] = flag[rows]

    def open_patch_bytes(self) -> torch.Tensor:
        """(B,) bytes of each row's open patch consumed so far (prompt bytes included; 0 for dropped rows)."""
        return torch.zeros_like(self.ready, dtype=torch.long).index_copy_(0, self.rows, self.open_patch)

    # --- one decoding step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume one symbol per ready row; run the global model if the policy says so; decoder step.

        Args:
            symbols: (B,) fused ids (read only for rows that were ready and are not finished).
        Returns:
            logits (B, 2·V_b) (valid for `ready` rows; zeros for finished rows), ready (B,) bool.
        """
        model = self.model
        B = self.ready.shape[0]
        if DROP_FINISHED_ROWS:
            self._drop_finished()
        rows = self.rows
        everyone = rows.shape[0] == B  # no row dropped: batch-sized tensors need no gather / scatter
        if rows.shape[0] == 0:  # every row finished
            self.ready = torch.zeros_like(self.ready)
            return self.h_last.new_zeros(B, 2 * BYTE_VOCAB_SIZE), self.ready
        if not everyone:
            symbols = symbols[rows]
        fresh = self.ready[rows] & ~self.finished[rows]  # (A,)
        # All rows active (always at batch 1) is the common case: no mask then, so the mLSTM steps skip
        # their masking work (a mask of all True computes exactly the same).
        all_fresh = bool(fresh.all())
        forced = None
        if self._forcing:
            forced = fresh & (self.forced_next < self.lookahead)  # consuming a forced prompt byte
            if not bool(forced.any()):
                forced = None
        if forced is not None:  # the prefill pass already ran the encoder over those bytes
            if not self._first_step:  # the caller gives the first step's symbols (e.g. `forced_symbols`)
                symbols = torch.where(forced, self.forced_pending, symbols)
            col = self.forced_next.clamp(max=self.lookahead - 1)
            h = self.forced_h.gather(1, col[:, None, None].expand(-1, 1, self.forced_h.shape[-1]))[:, 0]
            self.h_last = torch.where(forced[:, None], h, self.h_last)
            self.forced_next = self.forced_next + forced.long()
        self._first_step = False
        flag = symbols >= BYTE_VOCAB_SIZE
        byte = symbols.remainder(BYTE_VOCAB_SIZE)
        if forced is None:
            h = self._encoder_step(byte, fresh, all_fresh)
            self.h_last = h if all_fresh else torch.where(fresh[:, None], h, self.h_last)
        elif not bool(forced.all()):
            encode = fresh & ~forced
            h = self._encoder_step(byte, encode)
            self.h_last = torch.where(encode[:, None], h, self.h_last)
        if self.count_patch_bytes:
            self.open_patch = torch.where(fresh, torch.where(flag, 0, self.open_patch + 1), self.open_patch)
        if self.use_prior:
            advanced = self.trie.advance(self.prior_node, byte, flag)
            self.prior_node = advanced if all_fresh else torch.where(fresh, advanced, self.prior_node)
        self.waiting |= fresh & flag
        ready = fresh & ~flag
        if self._global_due():
            ready |= self._global_step()
        z = torch.addmm(self.g_last, self.h_last, self.in_w)  # g_last carries the projection's bias
        mask = None if bool(ready.all()) else ready
        x, self.dec_states = model.decoder.layers.step(z, self.dec_states, mask=mask, weights=self.dec_weights)
        logits = self._with_prior(self._head(x))  # (A, 2·V_b)
        # Rows whose next byte is still a forced prompt byte: the session picks its flag now and the row
        # is not ready for its caller (its next step consumes the forced symbol whatever the caller passes).
        external = ready
        if self._forcing:
            left = self.forced_next < self.lookahead
            self._forcing = bool(left.any())
            forcing = ready & left
            if bool(forcing.any()):
                self._choose_forced(logits, forcing)
                external = ready & ~forcing
        if everyone:
            self.ready = ready
            return logits, external
        self.ready = torch.zeros_like(self.ready).index_copy_(0, rows, ready)
        return (logits.new_zeros(B, logits.shape[1]).index_copy_(0, rows, logits),
                torch.zeros_like(self.ready).index_copy_(0, rows, external))

    def _drop_finished(self) -> None:
        """Remove finished rows from the computed batch: every per-row state keeps the unfinished rows.

        A row's computation never reads another row (the global model's attention is masked per row,
        positions are per row), so the remaining rows' outputs do not change. Costs one copy of the KV
        cache, at most once per finished row.
        """
        keep = ~self.finished[self.rows]  # (A,)
        if bool(keep.all()) or not hasattr(self.cache, "batch_select_indices"):
            return
        idx = keep.nonzero()[:, 0]  # (A',) positions among the current rows
        self.rows = self.rows[idx]

        def select(states: list[MLSTMState] | None) -> list[MLSTMState] | None:
            return None if states is None else [MLSTMState(*(t[idx] for t in st)) for st in states]

        self.enc_states, self.dec_states = select(self.enc_states), select(self.dec_states)
        self.h_last, self.g_last = self.h_last[idx], self.g_last[idx]
        self.forced_ids, self.forced_h = self.forced_ids[idx], self.forced_h[idx]
        self.forced_next, self.forced_pending = self.forced_next[idx], self.forced_pending[idx]
        self.open_patch = self.open_patch[idx]
        self.n_patches, self.waiting, self.kv_mask = self.n_patches[idx], self.waiting[idx], self.kv_mask[idx]
        self.history = self.history[idx.cpu().numpy()]
        if self.use_prior:
            self.prior_cumsums, self.prior_node = self.prior_cumsums[idx], self.prior_node[idx]
        self.cache.batch_select_indices(idx)

    def _encoder_step(self, byte: torch.Tensor, fresh: torch.Tensor, all_fresh: bool = False) -> torch.Tensor:
        """(A,) new bytes, (A,) rows that consume one -> (A, d_l) encoder outputs (garbage for other rows).

        The longest-suffix id of the new byte needs only the row's last max-token-length bytes: `history`
        (A, W) is that window, shifted by one for the rows that consume a byte. `all_fresh`: every row does.
        """
        byte_np = byte.cpu().numpy()
        shifted = np.concatenate([self.history[:, 1:], byte_np[:, None]], axis=1)
        self.history = shifted if all_fresh else np.where(fresh.cpu().numpy()[:, None], shifted, self.history)
        expanded = torch.from_numpy(self.expander.expand_last(self.history, 1)).to(self.device)
        enc = self.model.encoder
        x = enc.embed(byte[:, None], expanded)[:, 0]  # (A, d_l)
        y, self.enc_states = enc.layers.step(x, self.enc_states, mask=None if all_fresh else fresh,
                                             weights=self.enc_weights)
        return F.rms_norm(y, y.shape[-1:], enc.norm.weight, enc.norm.eps)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """`model.head` for decoding: (A, d_l) -> (A, 2·V_b), its norm weight inside `head_w`."""
        x = F.rms_norm(x, x.shape[-1:], None, self.model.norm.eps)
        return torch.mm(x, self.head_w) if self.head_b is None else torch.addmm(self.head_b, x, self.head_w)

    def _prior_cumsums(self, g: torch.Tensor) -> torch.Tensor:
        """(R, d_g) global outputs -> (R, T+1) cumulative next-token probabilities in the trie's order."""
        return token_cumsums(self.trie, self.model.prior_token_logits(g))

    def _with_prior(self, logits: torch.Tensor) -> torch.Tensor:
        """(A, 2·V_b) decoder logits -> plus the source prior of each row (unchanged without the prior)."""
        if not self.use_prior:
            return logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        log_prior, _ = prior_logprobs(self.trie, self.prior_cumsums, rows, self.prior_node,
                                      self.model.config.prior_floor)
        return add_prior(logits, log_prior)

    def _global_due(self) -> bool:
        """The `global_sync` policy: enough unfinished rows wait for the global model."""
        waiting = int(self.waiting.sum())
        if waiting == 0:
            return False
        unfinished = int((~self.finished).sum())  # over all B rows: dropped rows are finished
        return waiting >= math.ceil(self.global_sync * unfinished - 1e-9)

    def _global_step(self) -> torch.Tensor:
        """Append one KV slot, valid for the waiting rows, computed for them alone (`computing_rows`) when
        some rows do not wait; returns the rows served (A,)."""
        served = self.waiting
        self.waiting = torch.zeros_like(self.waiting)
        if self.max_patches is not None:  # a row whose context is full stops instead
            full = served & (self.n_patches >= self.max_patches)  # (A,)
            if bool(full.any()):
                self.finished[self.rows[full]] = True
                served = served & ~full
                if not bool(served.any()):
                    return served
        if self.num_slots == self.kv_mask.shape[1]:
            self.kv_mask = torch.cat([self.kv_mask, torch.zeros_like(self.kv_mask[:, :SLOT_BLOCK])], dim=1)
        self.kv_mask[:, self.num_slots] = served.long()
        self.num_slots += 1
        # The first slot of a still empty cache (no prompt had a patch) sizes the buffers: every row.
        if bool(served.all()) or not self.rows_computable or self.num_slots == 1:
            g = self._run_global(self.h_last[:, None], self.n_patches[:, None])[:, 0]
            self.g_last = torch.where(served[:, None], self._depool_global(g), self.g_last)
            if self.use_prior:
                self.prior_cumsums = torch.where(served[:, None], self._prior_cumsums(g), self.prior_cumsums)
        else:  # the other rows would be computed for nothing
            idx = served.nonzero()[:, 0]  # (R,)
            g = self._run_global(self.h_last[idx, None], self.n_patches[idx, None], rows=idx)[:, 0]
            self.g_last = self.g_last.index_copy(0, idx, self._depool_global(g))
            if self.use_prior:
                self.prior_cumsums = self.prior_cumsums.index_copy(0, idx, self._prior_cumsums(g))
        self.n_patches = self.n_patches + served.long()
        self.global_steps += 1
        return served

    def _run_global(self, patches: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(R, P, d_l) pooled states, (R, P) positions -> (R, P, d_g) global outputs; appends P KV slots.

        R = A (every computed row), or the rows `rows` (R,) alone (through `computing_rows`).
        Not `model.run_global`: its context check counts KV slots, which exceed a row's patch count when
        rows idle (invalid slots); here each row's own patch count is checked instead.
        """
        model = self.model
        embeds = model.pooling_projection(patches)
        dtype = next(model.global_model.parameters()).dtype
        kv_mask = self.kv_mask[:, : self.num_slots]
        with nullcontext() if rows is None else computing_rows(self.cache, rows):
            out = model.global_model(
                inputs_embeds=embeds.to(dtype),
                attention_mask=kv_mask if rows is None else kv_mask[rows],
                position_ids=position_ids,
                use_cache=True,
                **{model._cache_argument: self.cache},
            )
        return out.last_hidden_state.to(patches.dtype)

    def _depool_global(self, g: torch.Tensor) -> torch.Tensor:
        """(B, d_g) global outputs -> (B, d_l) their contribution to the decoder input, plus the decoder's
        input-projection bias (so that a step adds the projected encoder state in one addmm)."""
        dec = self.model.decoder
        g = dec.global_norm(g)
        g = dec.global_projection(g) if dec.global_projection is not None else g
        return g if self.in_b is None else g + self.in_b


def _pool_left(h: torch.Tensor, boundary: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder states at patch ends, left-padded per row.

    Args:
        h: (B, L, d) encoder states; boundary: (B, L) bool; P: the largest patch count of a row.
    Returns:
        patches (B, P, d) (row r's j-th patch at slot P - count_r + j; padding slots repeat position 0),
        valid (B, P) bool, positions (B, P) long byte positions.
    """
    B, L, d = h.shape
    pos = torch.arange(L, device=h.device).expand(B, L)
    # Non-boundary positions sort first (they become left padding), boundary positions last, in order.
    key = torch.where(boundary, pos + L, pos)
    order = key.argsort(dim=1)[:, L - P :]
    valid = boundary.gather(1, order)
    positions = torch.where(valid, order, torch.zeros_like(order))
    return h.gather(1, positions[..., None].expand(B, P, d)), valid, positions