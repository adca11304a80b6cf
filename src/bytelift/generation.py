"""Byte-level generation: prefill, cached decoding, batching (DESIGN §3, spec §5.4). The decoding threshold's
calibration is in `bytelift.calibration`, the text streamers in `bytelift.streaming`.

Shapes: B batch, L prompt bytes (left-padded), S global KV slots, d_l local width, d_g global width,
V_b = 260 byte-side ids, 2·V_b = 520 fused outputs (id k + V_b = "symbol k, and it ends a patch").

Prefill (one encoder pass). The predictor needs one byte of lookahead, so the last prompt byte's
boundary is undecidable: it is rolled back and the first decoding step is *forced* to emit it, the LM
head choosing only whether it closes a patch. The model input is therefore prompt[:-1]; but the encoder
is causal, so one pass over the *whole* prompt gives exactly the states of prompt[:-1] at positions
0..L-2, the lookahead h_{L-1} the predictor needs for position L-2, *and* the encoder step of the forced
byte (h_{L-1} and the mLSTM state after it). The reference runs the encoder twice; we reuse that pass.

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

Sampling. The head's 520 fused logits are folded into the 260-way next-symbol distribution
p(k) = p(k plain) + p(k fused); the logits processors (temperature, top-k, top-p, repetition penalty,
user processors) see these folded log-probs and the real, un-fused byte history, and pick the byte.
The end-of-patch flag is then the head's conditional decision p(fused | byte) > 1/2 (log-odds > 0, plus
`boundary_bias`, by default the model's calibrated `decode_boundary_bias`, see `calibrate_boundary_bias`),
deterministic like the predictor's threshold during prefill: a boundary is a segmentation decision, not
content, so temperature does not randomise it. Pad, bos and filler can never
be generated; eos only with `eos=True`. A row also stops at the end-of-turn marker of the source's chat template
(`bytelift.chat_template`; by default) and where `stopping_criteria` (transformers StoppingCriteria) say so.
With a `seed`, each row samples from its own generator seeded with the seed itself (not seed + row) and
drawn from only when the row emits a byte: a row's samples depend on the seed and its own history alone,
so a prompt samples the same alone or in any batch, and identical prompts sample identically.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from bytelift.checks import ContextError
from bytelift.mlstm import FusedLinear, MLSTMState
from bytelift.prior import NO_NODE, add_prior, prior_logprobs, token_cumsums
from bytelift.streaming import MarkerFilter
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE, EOS_ID, FILLER_ID, PAD_ID, fuse

# Batching policy: the global model runs once at least this fraction of the unfinished rows closed a patch
# (see the module docstring). Measured with benchmarks/generate.py, decode bytes/s for 1.0 (park) / 0.5 /
# 1e-3 (no parking): an untrained SmolLM2 conversion with a biased head (patch lengths varying widely
# between rows), 2 busy CPU cores, batch 16: 52 / 74 / 54 (the global step then computed every row).
# SmolLM2 after the 30-minute `bytelift convert` (its own boundaries, 4.3-4.4 bytes/patch), one thread,
# global step on the waiting rows only: batch 4: 67.9 / 62.8 / 60.2, batch 16: 242.5 / 234.6 / 109.3
# (with every row computed, same run: 70.5 / 50.3 / 40.4 and 192.9 / 199.3 / 72.0). 0.5 stays within a
# few percent of parking when rows close patches alike, and avoids its 30% loss when they do not.
DEFAULT_GLOBAL_SYNC = 0.5
# Default number of new bytes (≈ 16 source tokens of English).
DEFAULT_MAX_NEW_BYTES = 64
# Global KV-slot capacity grows in blocks of this many slots (the mask buffer is reallocated rarely).
SLOT_BLOCK = 256
# GrowingKVLayer's spare capacity after a growth: a quarter of the slots in use, at least this many. A
# quarter keeps the slack small next to the cache (a large batch's KV cache can take gigabytes) while
# growths stay geometric: each slot is copied a bounded number of times over a generation.
KV_MIN_SPARE = 64
# Special ids that generation never emits (EOS is governed by `eos`).
NEVER_GENERATED = (PAD_ID, BOS_ID, FILLER_ID)
# Finished rows leave the computed batch (mLSTM states, KV cache, bookkeeping) at the next step, so they
# stop costing compute; their outputs are unaffected (rows are independent). Off only in tests.
DROP_FINISHED_ROWS = True


@dataclass
class GenerateOutput:
    """Result of `generate(..., return_dict=True)`.

    sequences: (B, L + T) the prompt as given (left-padded) followed by the new byte ids (un-fused;
        eos included when it stopped the row), right-padded with PAD_ID; T = the longest row's new bytes.
    new_ids: (B, T) the new byte ids alone, right-padded with PAD_ID.
    num_new_bytes: (B,) new ids per row (the forced last prompt byte is prompt, not new).
    boundaries: (B, T) bool, new byte t closed a patch.
    prompt_boundaries: (B, L) bool, the prompt's boundaries (predictor; the last byte's by the head).
    texts: the new bytes of each row decoded as UTF-8 (invalid bytes replaced, specials dropped).
    global_steps: how many times the global model ran while decoding (prefill excluded).
    """

    sequences: torch.Tensor
    new_ids: torch.Tensor
    num_new_bytes: torch.Tensor
    boundaries: torch.Tensor
    prompt_boundaries: torch.Tensor
    texts: list[str]
    global_steps: int


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
        self._first = True
        self.use_prior = bool(model.config.source_prior)
        self.trie = model.token_trie if self.use_prior else None
        self.prior_cumsums: torch.Tensor | None = None  # (A, T+1) float64
        self.prior_node = torch.full((B,), NO_NODE, dtype=torch.long, device=self.device)

    # --- prefill ---------------------------------------------------------------------------------------

    def prefill(self) -> torch.Tensor:
        """Encoder + predictor over the prompt, global model over its patches, decoder over prompt[:-1].

        Returns:
            (B, 2·V_b) logits at the last model-input position (they predict the last prompt byte).
        """
        model, ids, mask = self.model, self.input_ids, self.mask
        B, L = ids.shape
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
        boundary = model.predict_boundaries(logp, mask, ids)[:, : L - 1]  # position L-1 is undecided
        self.prompt_boundaries = torch.cat([boundary, torch.zeros_like(mask[:, :1])], dim=1)
        self.h_last = h[:, -1]  # the encoder output of the forced byte, already computed
        # Rows whose prompt is only bos: their one byte is the forced byte and always ends a patch.
        self.bos_only = mask.sum(dim=1) == 1
        width = max(self.expander.max_token_len, 1)
        prompt = np.where(mask.cpu().numpy(), ids.cpu().numpy(), PAD_ID)[:, -width:]
        self.history = np.full((B, width), PAD_ID, dtype=np.int64)
        self.history[:, width - prompt.shape[1] :] = prompt

        counts = boundary.sum(dim=1)  # (B,) prompt patches (excluding the forced byte's)
        P = int(counts.max()) if L > 1 else 0
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
        patches, _, _ = _pool_left(h[:, : L - 1], boundary, P)
        offset = P - counts  # (B,)
        slots = torch.arange(P, device=self.device)[None, :]
        valid = slots >= offset[:, None]
        self.kv_mask[:, :P] = valid.long()
        position_ids = (slots - offset[:, None]).clamp(min=0)
        g = self._run_global(patches, position_ids)  # (B, P, d_g)

        # Decoder over prompt[:-1]: byte t reads the row's latest patch that ended at or before t.
        index = (boundary.long().cumsum(dim=1) - 1 + offset[:, None]).clamp(0, P - 1)
        z = dec.depool(h[:, : L - 1], g, index)
        x, self.dec_states = dec(z, mask=mask[:, : L - 1])
        self.g_last = self._depool_global(g[:, -1])  # every row's latest prompt patch sits in slot P-1
        if self.use_prior:
            self.prior_cumsums = self._prior_cumsums(g[:, -1])
            self.prior_node = self.trie.prefix_nodes(ids[:, : L - 1], boundary, mask[:, : L - 1])[:, -1]
        return self._with_prior(self._head(x[:, -1]))

    def forced_symbols(self, logits: torch.Tensor, boundary_bias: float = 0.0) -> torch.Tensor:
        """The first step's symbols: the last prompt byte, fused iff the head says it closes a patch.

        Args:
            logits: (B, 2·V_b) from `prefill`.
        Returns:
            (B,) fused ids; a bos-only prompt's byte always closes its patch.
        """
        last = self.input_ids[:, -1]
        logodds = logits.gather(1, (last + BYTE_VOCAB_SIZE)[:, None])[:, 0] - logits.gather(1, last[:, None])[:, 0]
        flag = (logodds.float() + boundary_bias > 0) | self.bos_only
        self.prompt_boundaries[:, -1] = flag
        return fuse(last, flag)

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
        flag = symbols >= BYTE_VOCAB_SIZE
        byte = symbols.remainder(BYTE_VOCAB_SIZE)
        if self._first:  # the prefill pass already ran the encoder over the forced byte
            self._first = False
        else:
            h = self._encoder_step(byte, fresh, all_fresh)
            self.h_last = h if all_fresh else torch.where(fresh[:, None], h, self.h_last)
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
        if everyone:
            self.ready = ready
            return logits, ready
        self.ready = torch.zeros_like(self.ready).index_copy_(0, rows, ready)
        return logits.new_zeros(B, logits.shape[1]).index_copy_(0, rows, logits), self.ready

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


# ---------------------------------------------------------------------------------------------------
# choosing the next symbol


def build_logits_processors(
    do_sample: bool,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    logits_processor: Sequence | None = None,
) -> LogitsProcessorList:
    """transformers processors applied to the folded (B, V_b) next-symbol log-probs."""
    procs = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    procs.extend(logits_processor or [])
    if do_sample:
        if temperature is not None and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k > 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def choose_symbols(
    logits: torch.Tensor,
    banned: torch.Tensor,
    processors: LogitsProcessorList,
    history: torch.Tensor | None,
    do_sample: bool,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    boundary_bias: float = 0.0,
    ready: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next byte from the folded distribution, then its end-of-patch flag.

    Args:
        logits: (B, 2·V_b) fused logits.
        banned: (V_b,) float, -inf for ids that may not be generated, 0 elsewhere.
        history: (B, T) un-fused ids so far (prompt + new), for the processors; None without processors.
        generator: for sampling: one generator for the batch (None: the global RNG), or one per row; a
            row's generator is drawn from only when the row is `ready`, so its samples do not depend on
            how long it waited for other rows.
        ready: (B,) bool, the rows whose choice is used (needed with per-row generators; default all).
    Returns:
        byte (B,) long un-fused ids, flag (B,) bool (the byte closes a patch). With per-row generators,
        rows that are not ready get the argmax (unused by the caller).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    plain, fused = logp[:, :BYTE_VOCAB_SIZE], logp[:, BYTE_VOCAB_SIZE:]
    scores = torch.logaddexp(plain, fused) + banned
    if len(processors):
        # Again after the processors: a user processor cannot resurrect a banned id.
        scores = processors(history, scores) + banned
    if do_sample and isinstance(generator, Sequence):
        probs = torch.softmax(scores, dim=-1)
        byte = scores.argmax(dim=-1)
        rows = range(len(byte)) if ready is None else ready.nonzero()[:, 0].tolist()
        for r in rows:
            byte[r] = torch.multinomial(probs[r], 1, generator=generator[r])[0]
    elif do_sample:
        byte = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
    else:
        byte = scores.argmax(dim=-1)
    logodds = (fused - plain).gather(1, byte[:, None])[:, 0]
    return byte, logodds + boundary_bias > 0


# ---------------------------------------------------------------------------------------------------
# the public API


class ByteliftGenerationMixin:
    """Adds `generate` and `stream` to ByteliftForCausalLM."""

    def _prepare_prompts(self, input_ids, attention_mask, expanded_ids):
        """str / bytes / list of them / (B, L) tensor -> (input_ids, attention_mask, expanded_ids) tensors."""
        if isinstance(input_ids, (str, bytes, bytearray)) or (
            isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (str, bytes, bytearray))
        ):
            if self.tokenizer is None:
                raise ValueError("text prompts need the byte tokenizer attached")
            batch = self.tokenizer(input_ids if isinstance(input_ids, (list, tuple)) else [input_ids],
                                   padding=True, padding_side="left", return_tensors="pt")
            device = self.encoder.byte_embedding.weight.device
            return (batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["expanded_ids"].to(device))
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor, str, bytes or a list of them, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
            expanded_ids = None if expanded_ids is None else expanded_ids.reshape(1, -1)
        if attention_mask is not None and not attention_mask.bool()[:, -1].all():
            raise ValueError("generate needs left-padded prompts (padding_side='left')")
        return input_ids, attention_mask, expanded_ids

    def _generate_steps(
        self,
        input_ids,
        attention_mask=None,
        expanded_ids=None,
        max_new_bytes: int = DEFAULT_MAX_NEW_BYTES,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings: str | bytes | Sequence[str | bytes] | None = None,
        eos: bool = True,
        seed: int | None = None,
        logits_processor: Sequence | None = None,
        boundary_bias: float | None = None,
        max_patch_bytes: int | None = None,
        global_sync: float = DEFAULT_GLOBAL_SYNC,
        stopping_criteria: Sequence | None = None,
        end_of_turn: bool = True,
        state: dict | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The decoding loop as a generator: yields (emitted (B,) bool, byte (B,) long) after each step;
        the final buffers are left in `state` (a dict the caller passes)."""
        if max_new_bytes < 0:
            raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
        if boundary_bias is None:
            boundary_bias = self.config.decode_boundary_bias
        input_ids, attention_mask, expanded_ids = self._prepare_prompts(input_ids, attention_mask, expanded_ids)
        B, L = input_ids.shape
        device = input_ids.device
        session = DecodingSession(self, input_ids, attention_mask, expanded_ids, global_sync=global_sync)
        state = {} if state is None else state
        state["session"] = session
        out = torch.full((B, max_new_bytes + 1), PAD_ID, dtype=torch.long, device=device)  # last col: sink
        flags = torch.zeros(B, max_new_bytes + 1, dtype=torch.bool, device=device)
        counts = torch.zeros(B, dtype=torch.long, device=device)
        state.update(out=out, flags=flags, counts=counts, input_ids=input_ids, attention_mask=session.mask)

        with torch.inference_mode():
            logits = session.prefill()
            symbols = session.forced_symbols(logits, boundary_bias)
            if max_new_bytes == 0:
                return
            banned = torch.zeros(BYTE_VOCAB_SIZE, device=device)
            banned[list(NEVER_GENERATED) + ([] if eos else [EOS_ID])] = -math.inf
            processors = build_logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty,
                                                 logits_processor)
            # One generator per row, each seeded with `seed` itself (not seed + row): a row's samples then
            # depend only on the seed and its own history, so a row samples the same alone or in any batch,
            # and identical prompts in a batch get identical samples.
            generators = None
            if do_sample and seed is not None:
                generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(B)]
            marker = self.tokenizer.end_of_turn_stop if end_of_turn and self.tokenizer is not None else None
            state["end_of_turn"] = marker
            stops = _stop_sequences(stop_strings, device) + _stop_sequences(marker, device)
            criteria = StoppingCriteriaList(stopping_criteria or [])
            tail_len = max((len(s) for s in stops), default=0)
            tail = None
            if tail_len:
                prompt_tail = torch.where(session.mask, input_ids, PAD_ID)[:, -tail_len:]
                tail = torch.cat([torch.full((B, tail_len - prompt_tail.shape[1]), PAD_ID, device=device,
                                             dtype=torch.long), prompt_tail], dim=1)
            # The processors' view of each row: its un-fused ids so far, right-aligned (left-padded with
            # PAD_ID, which they never see as a candidate: it is banned), as an HF (B, T) id tensor.
            history = None
            if len(processors) or len(criteria):
                history = torch.cat([torch.full((B, max_new_bytes), PAD_ID, dtype=torch.long, device=device),
                                     torch.where(session.mask, input_ids, PAD_ID)], dim=1)
            sink = torch.full((B,), max_new_bytes, dtype=torch.long, device=device)
            patch_len = None
            if max_patch_bytes is not None:
                if max_patch_bytes < 1:
                    raise ValueError(f"max_patch_bytes must be >= 1, got {max_patch_bytes}")
                # Bytes of each row's open patch, the forced byte included: after its last prompt boundary.
                pb = session.prompt_boundaries
                last = torch.where(pb, torch.arange(L, device=device), -1).max(dim=1).values
                patch_len = (L - 1 - last).long()

            while True:
                logits, ready = session.step(symbols)
                byte, flag = choose_symbols(logits, banned, processors, history, do_sample, generators, boundary_bias,
                                            ready)
                if patch_len is not None:  # a patch reaching max_patch_bytes closes at its last byte
                    flag |= patch_len + 1 >= max_patch_bytes
                    patch_len = torch.where(ready, torch.where(flag, 0, patch_len + 1), patch_len)
                col = torch.where(ready, counts, sink)[:, None]
                out.scatter_(1, col, byte[:, None])
                flags.scatter_(1, col, flag[:, None])
                counts += ready.long()
                done = counts >= max_new_bytes
                if eos:
                    done |= byte == EOS_ID
                if history is not None:
                    history = torch.where(ready[:, None], torch.cat([history[:, 1:], byte[:, None]], dim=1), history)
                if tail is not None:
                    tail = torch.where(ready[:, None], torch.cat([tail[:, 1:], byte[:, None]], dim=1), tail)
                    for stop in stops:  # per stop string, vectorised over rows
                        done |= (tail[:, tail_len - len(stop) :] == stop).all(dim=1)
                if len(criteria):
                    done |= criteria(history, logits)
                session.finished |= ready & done
                symbols = fuse(byte, flag)
                yield ready, byte
                if bool(session.finished.all()):
                    return

    @torch.inference_mode()
    def generate(
        self,
        input_ids=None,
        attention_mask: torch.Tensor | None = None,
        expanded_ids: torch.Tensor | None = None,
        max_new_bytes: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings: str | bytes | Sequence[str | bytes] | None = None,
        eos: bool = True,
        seed: int | None = None,
        streamer: BaseStreamer | None = None,
        logits_processor: Sequence | None = None,
        boundary_bias: float | None = None,
        max_patch_bytes: int | None = None,
        global_sync: float = DEFAULT_GLOBAL_SYNC,
        stopping_criteria: Sequence | None = None,
        end_of_turn: bool = True,
        return_dict: bool = False,
        max_new_tokens: int | None = None,
        pad_token_id: int | None = None,
    ):
        """Generate bytes after each prompt (greedy by default).

        Args:
            input_ids: (B, L) left-padded byte-side ids with bos first (a ByteTokenizer batch), or a str /
                bytes / list of them (tokenized with the attached tokenizer).
            attention_mask: (B, L) 1 = real byte; expanded_ids: (B, L) longest-suffix ids (computed if absent).
            max_new_bytes: exact cap on new bytes per row (`max_new_tokens` is an alias); the last prompt
                byte, re-emitted by the forced first step, is prompt, not new.
            do_sample, temperature, top_k, top_p, repetition_penalty, logits_processor: the byte choice
                (see the module docstring: processors act on folded 260-way log-probs and byte history).
            stop_strings: a row stops once its text (prompt tail included) ends with one of these, which
                must end in a new byte; the stop string is kept in the output.
            eos: stop a row at EOS (plain or fused); False bans EOS.
            seed: seeds private torch.Generators for sampling (reproducible, leaves the global RNG alone):
                one per row, each seeded with `seed`, drawn from only when the row emits a byte. So a row's
                sample depends on the seed and its prompt alone, not on the other rows: a prompt samples the
                same alone or in any batch, and identical prompts in a batch sample identically.
            streamer: `put`/`end` streamer (batch 1), e.g. `ByteTextStreamer` or `transformers.TextStreamer(
                model.tokenizer)`; gets the prompt first, then each new byte id.
            boundary_bias: added to the log-odds of "this byte closes a patch"; None = the model's
                calibrated `config.decode_boundary_bias` (0 = the head's own decision, p > 1/2).
            max_patch_bytes: a new byte that makes its patch this long closes it (the reference caps
                patches at 128 bytes while decoding); None = no cap.
            global_sync: batching policy in (0, 1]; see the module docstring (1.0 = park rows, as the
                reference; tiny = never park). Outputs do not depend on it, only speed.
            stopping_criteria: `transformers` StoppingCriteria, called after every step with the (B, T) un-fused
                ids so far and the (B, 2·V_b) fused logits; a row stops where they return True.
            end_of_turn: stop a row at the end-of-turn marker of the source's chat template
                (`ByteTokenizer.end_of_turn`): EOS where the marker is the source's eos, else its text (a stop
                string, dropped from `texts` like a special token). The marker is a special token of the source
                that ordinary text does not contain, so this holds for any prompt.
            return_dict: return a `GenerateOutput` instead of the (B, L + T) `sequences` tensor.
            pad_token_id: accepted for `transformers` pipelines (which pass the tokenizer's); must be PAD_ID.
        """
        if pad_token_id is not None and pad_token_id != PAD_ID:
            raise ValueError(f"pad_token_id must be the byte vocabulary's pad id {PAD_ID}, got {pad_token_id}")
        if max_new_tokens is not None:
            if max_new_bytes is not None and max_new_bytes != max_new_tokens:
                raise ValueError("pass max_new_bytes or max_new_tokens, not both")
            max_new_bytes = max_new_tokens
        max_new_bytes = DEFAULT_MAX_NEW_BYTES if max_new_bytes is None else max_new_bytes
        state: dict = {}
        steps = self._generate_steps(
            input_ids, attention_mask, expanded_ids, max_new_bytes=max_new_bytes, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            stop_strings=stop_strings, eos=eos, seed=seed, logits_processor=logits_processor,
            boundary_bias=boundary_bias, max_patch_bytes=max_patch_bytes, global_sync=global_sync,
            stopping_criteria=stopping_criteria, end_of_turn=end_of_turn, state=state,
        )
        first = True
        for ready, byte in steps:
            if streamer is not None:
                if first:
                    _check_streamable(state["input_ids"])
                    streamer.put(state["input_ids"][state["attention_mask"]].cpu())
                    first = False
                if bool(ready[0]):
                    streamer.put(byte[:1].cpu())
        if streamer is not None:
            if first:  # nothing generated: the prompt still goes first
                _check_streamable(state["input_ids"])
                streamer.put(state["input_ids"][state["attention_mask"]].cpu())
            streamer.end()
        return self._finish(state, return_dict)

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Generate after one prompt and yield the new text piece by piece, each piece ending at a UTF-8
        character boundary (invalid bytes become U+FFFD). Keyword arguments as `generate`."""
        kwargs.pop("streamer", None)
        kwargs.pop("return_dict", None)
        if "max_new_tokens" in kwargs:
            kwargs.setdefault("max_new_bytes", kwargs.pop("max_new_tokens"))
        state: dict = {}
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = None  # drops the end-of-turn marker's text (`MarkerFilter`)
        with torch.inference_mode():
            steps = self._generate_steps(prompt, state=state, **kwargs)
            for ready, byte in steps:
                if state["input_ids"].shape[0] != 1:
                    raise ValueError("stream() takes one prompt")
                if hold is None:  # the marker is known once decoding started
                    hold = MarkerFilter(state.get("end_of_turn"))
                b = int(byte[0])
                if bool(ready[0]) and b >= BYTE_OFFSET:
                    text = hold.feed(decoder.decode(bytes([b - BYTE_OFFSET])))
                    if text:
                        yield text
        text = decoder.decode(b"", final=True)
        if hold is not None:
            text = hold.feed(text) + hold.flush()
        if text:
            yield text

    def _finish(self, state: dict, return_dict: bool):
        session: DecodingSession = state["session"]
        counts, out, flags = state["counts"], state["out"], state["flags"]
        T = int(counts.max()) if counts.numel() else 0
        new_ids, boundaries = out[:, :T], flags[:, :T]
        sequences = torch.cat([state["input_ids"], new_ids], dim=1)
        if not return_dict:
            return sequences
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True)
                 for row, n in zip(new_ids.cpu().numpy(), counts.tolist())] if self.tokenizer is not None else []
        return GenerateOutput(
            sequences=sequences,
            new_ids=new_ids,
            num_new_bytes=counts,
            boundaries=boundaries,
            prompt_boundaries=session.prompt_boundaries,
            texts=texts,
            global_steps=session.global_steps,
        )


def _check_streamable(input_ids: torch.Tensor) -> None:
    if input_ids.shape[0] != 1:
        raise ValueError("streaming supports one prompt at a time (batch size 1)")


def _stop_sequences(stop_strings, device) -> list[torch.Tensor]:
    """str / bytes / list of them -> list of (m,) byte-id tensors."""
    if stop_strings is None:
        return []
    if isinstance(stop_strings, (str, bytes, bytearray)):
        stop_strings = [stop_strings]
    stops = []
    for s in stop_strings:
        data = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        if not data:
            raise ValueError("empty stop string")
        stops.append(torch.tensor(list(data), dtype=torch.long, device=device) + BYTE_OFFSET)
    return stops
