"""ByteliftForCausalLM: a byte-level causal LM around the transformer of any HF decoder (the Bolmo method).

Shapes: B batch, L bytes, P patches, d_l local width, d_g global (source) width, V_b byte-side vocabulary.

    input_ids (B,L) ──ByteEmb──┐
    expanded_ids (B,L) ─SubwordEmb─┴─+─> LocalEncoder (mLSTM blocks, RMSNorm) ─> h (B,L,d_l)
    h ─> BoundaryPredictor ─> log p (B,L) ─> boundary (B,L)   [or boundaries given: teacher forcing]
    h, boundary ─> pool (last byte of each patch) ─> Linear ─> patches (B,P,d_g) ─> global model ─> g (B,P,d_g)
    g, h, boundary ─> depool: RMSNorm(g[patch that ended at or before t]) + Linear(h_t) ─> LocalDecoder
    ─> RMSNorm ─> LM head ─> logits (B,L,2·V_b); id k+V_b = "byte/special k, and it ends a patch"
    [source prior on: logits += log prior (B,L,2·V_b), the trie marginal of prior_head(g) (`bytelift.prior`)]
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import ModelOutput

from bytelift.checks import ContextError
from bytelift.configuration import ByteliftConfig, unknown_options
from bytelift.generation import ByteliftGenerationMixin
from bytelift.mlstm import LocalStack, MLSTMLayer
from bytelift.prior import TokenTrie, add_prior, prior_logprobs, token_cumsums
from bytelift.tokenization import BYTE_OFFSET, BYTE_VOCAB_SIZE, IGNORE_INDEX, ByteTokenizer

# log p written where the predictor cannot decide (no lookahead byte, padding): finite so that losses
# masked with `torch.where` never see inf·0, and far below log(threshold).
UNDECIDED_LOGPROB = -1e5
# `from_source` defaults: the source-prior output path and the token-exact encoder initialisation (the
# model starts near its source's likelihood instead of having to learn to spell; see the README's A/B).
DEFAULT_SOURCE_PRIOR = True
DEFAULT_TOKEN_EXACT_INIT = True
DEFAULT_BOUNDARY_TRIE_CLOSURE = True
# Rounds of `TokenTrie.close_boundaries`: each round splits every patch at its first forced boundary, so a
# patch that merged k source tokens needs k − 1 rounds; the predictor seldom merges more than a few.
TRIE_CLOSURE_MAX_ROUNDS = 16
# Token-exact initialisation: the encoder's byte embeddings and its blocks' output projections start at this
# fraction of their built values: small, so the pooled patch is nearly the carried subword embedding, yet
# non-zero, so encoder states stay distinct and every weight gets gradient from the first step.
TOKEN_EXACT_RESIDUAL_SCALE = 0.1


@dataclass
class ByteliftOutput(ModelOutput):
    """Outputs of `ByteliftForCausalLM.forward`.

    loss: mean cross-entropy of the fused next-byte labels (when `labels` were given).
    logits: (B, L, 2·V_b) fused next-symbol logits; position t predicts byte t+1 and whether it ends a patch.
    boundary_logprobs: (B, L) log p_t that byte t ends a patch (predictor; UNDECIDED_LOGPROB where undecidable).
    boundary_mask: (B, L) bool, the boundaries actually used (given or predicted).
    patch_mask: (B, P) bool, valid patches (rows have different patch counts).
    encoder_hidden_states: (B, L, d_l) encoder output h.
    global_hidden_states: (B, P, d_g) global model output per patch.
    prior_logprobs: (B, L, 2·V_b) the source prior added to the decoder's logits (source_prior on; 0 where
        it has nothing to say), so `logits - prior_logprobs` are the decoder's own.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    boundary_logprobs: torch.Tensor | None = None
    boundary_mask: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    global_hidden_states: torch.Tensor | None = None
    prior_logprobs: torch.Tensor | None = None


def fold_fused_logprobs(
    logits: torch.Tensor, byte_vocab_size: int = BYTE_VOCAB_SIZE, bytes_only: bool = True
) -> torch.Tensor:
    """Fold fused logits into next-symbol log-probabilities, marginalising the end-of-patch flag.

    p(symbol k) = p(k plain) + p(k fused), computed in float32 under one softmax over all 2·V_b outputs, so
    the result is a proper (sub-)distribution: with `bytes_only` the 256 byte log-probs exclude the mass on
    special ids (eos, ...), which is what scoring a string needs.

    Args:
        logits: (..., 2·V_b) fused logits.
        byte_vocab_size: V_b.
        bytes_only: return (..., 256) byte log-probs (index = byte value) instead of (..., V_b).
    Returns:
        (..., 256) or (..., V_b) float32 log-probabilities.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    folded = torch.logaddexp(logp[..., :byte_vocab_size], logp[..., byte_vocab_size : 2 * byte_vocab_size])
    return folded[..., BYTE_OFFSET:] if bytes_only else folded


def fused_labels(labels: torch.Tensor, boundary_mask: torch.Tensor, byte_vocab_size: int) -> torch.Tensor:
    """Next-symbol targets with the end-of-patch flag fused in.

    Args:
        labels: (B, L) byte-side ids of the sequence itself (unshifted, HF convention), IGNORE_INDEX where ignored.
        boundary_mask: (B, L) bool, byte t ends a patch.
    Returns:
        (B, L) targets: position t holds id(byte t+1) + V_b·[byte t+1 ends a patch]; the last position and
        positions whose next label is ignored hold IGNORE_INDEX.
    """
    nxt = labels[:, 1:]
    target = torch.where(nxt == IGNORE_INDEX, nxt, nxt + byte_vocab_size * boundary_mask[:, 1:].long())
    return F.pad(target, (0, 1), value=IGNORE_INDEX)


def pool_patches(h: torch.Tensor, boundary_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the encoder state at the last byte of every patch.

    Args:
        h: (B, L, d) encoder states.
        boundary_mask: (B, L) bool, byte t ends a patch.
    Returns:
        patches (B, P, d) with P = the largest patch count in the batch, right-padded per row;
        patch_mask (B, P) bool, valid patches;
        patch_positions (B, P) long, byte position of each patch's last byte (L-1 on padding patches).
    """
    B, L, _ = h.shape
    counts = boundary_mask.sum(dim=1)
    P = int(counts.max()) if B > 0 else 0
    pos = torch.arange(L, device=h.device).expand(B, L)
    # Boundary positions sort first, in order; the rest after them (they become right padding).
    key = torch.where(boundary_mask, pos, pos + L)
    order = key.argsort(dim=1)[:, :P]
    patch_mask = torch.arange(P, device=h.device)[None, :] < counts[:, None]
    patch_positions = torch.where(patch_mask, order, torch.full_like(order, L - 1))
    patches = h.gather(1, patch_positions[..., None].expand(B, P, h.shape[-1]))
    return patches, patch_mask, patch_positions


def depool_index(boundary_mask: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Index of the latest patch that ended at or before each byte.

    Byte t reads global output j(t) = (#boundaries at positions ≤ t) − 1, clipped to [0, P−1]: the byte that
    closes patch j already sees global output j (which consumed that patch) and predicts the first byte of
    patch j+1. Bytes before the first boundary (left padding) read patch 0; they are masked anyway.

    Args:
        boundary_mask: (B, L) bool.
    Returns:
        (B, L) long indices into the patch axis.
    """
    return (boundary_mask.long().cumsum(dim=1) - 1).clamp(min=0, max=max(num_patches - 1, 0))


class _NoTokenEmbedding(nn.Module):
    """Stands in for the global model's token embedding: the global model only ever gets `inputs_embeds`."""

    def forward(self, input_ids):  # pragma: no cover - a guard
        raise RuntimeError("the bytelift global model takes patch embeddings (inputs_embeds), not token ids")


class LocalEncoder(nn.Module):
    """Byte + subword embeddings, mLSTM blocks, final RMSNorm."""

    def __init__(self, config: ByteliftConfig):
        super().__init__()
        d_l, d_g = config.local_hidden_size, config.global_hidden_size
        self.byte_embedding = nn.Embedding(config.byte_vocab_size, d_l)
        # The subword table is a copy of the source embedding (d_g wide); a projection adapts it to a narrower
        # local width when d_l < d_g.
        self.subword_embedding = nn.Embedding(config.subword_vocab_size, d_g)
        self.subword_projection = nn.Linear(d_g, d_l, bias=False) if d_l != d_g else None
        self.layers = _local_stack(config, config.encoder_layers)
        self.norm = nn.RMSNorm(d_l, eps=config.local_post_norm_eps)

    def embed(self, input_ids: torch.Tensor, expanded_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) byte ids, (B, L) subword ids -> (B, L, d_l)."""
        sub = self.subword_embedding(expanded_ids)
        if self.subword_projection is not None:
            sub = self.subword_projection(sub)
        return self.byte_embedding(input_ids) + sub

    def forward(self, input_ids, expanded_ids, mask=None, states=None):
        """(B, L) ids, (B, L) subword ids, (B, L) bool valid -> h (B, L, d_l), new mLSTM states."""
        x, states = self.layers(self.embed(input_ids, expanded_ids), states=states, mask=mask)
        return self.norm(x), states


class BoundaryPredictor(nn.Module):
    """Non-causal boundary predictor with k = `boundary_lookahead` bytes of lookahead:
    p_t = (1 − cos(W_q h_t, W_k h_{t+k})) / 2. The encoder is causal, so h_{t+k} summarises the bytes up to
    t + k: the decision at t reads k bytes past it (the reference: k = 1)."""

    def __init__(self, config: ByteliftConfig):
        super().__init__()
        d = config.local_hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.cos_eps = config.boundary_cos_eps
        self.lookahead = config.boundary_lookahead

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Boundary log-probabilities.

        Args:
            h: (B, L, d_l) encoder output.
            mask: (B, L) bool, valid bytes.
        Returns:
            (B, L) float32 log p_t. The first valid byte of each row (bos) gets log 1 = 0; bytes without k
            valid bytes after them (the last k of a row, right padding) and padding get UNDECIDED_LOGPROB.
        """
        k, L = self.lookahead, h.shape[1]
        if L > k:
            q = F.normalize(self.q_proj(h[:, :-k]).float(), dim=-1)
            key = F.normalize(self.k_proj(h[:, k:]).float(), dim=-1)
            cos = (q * key).sum(-1).clamp(max=1 - self.cos_eps)
            logp = F.pad(torch.log1p(-cos) - math.log(2.0), (0, k), value=UNDECIDED_LOGPROB)
        else:
            logp = h.new_full(mask.shape, UNDECIDED_LOGPROB, dtype=torch.float32)
        decidable = mask & lookahead_valid(mask, k)
        logp = torch.where(decidable, logp, torch.full_like(logp, UNDECIDED_LOGPROB))
        first = _first_valid(mask)
        is_first = torch.arange(mask.shape[1], device=mask.device)[None, :] == first[:, None]
        return torch.where(is_first & mask, torch.zeros_like(logp), logp)


def lookahead_valid(mask: torch.Tensor, lookahead: int) -> torch.Tensor:
    """(B, L) valid -> (B, L) bool: byte t + lookahead is valid (a row's valid bytes are contiguous, so then
    every byte between is too)."""
    if mask.shape[1] <= lookahead:
        return torch.zeros_like(mask)
    return F.pad(mask[:, lookahead:], (0, lookahead), value=False)


class LocalDecoder(nn.Module):
    """Depooling (global output of the current patch + projected encoder state) and mLSTM blocks."""

    def __init__(self, config: ByteliftConfig):
        super().__init__()
        d_l, d_g = config.local_hidden_size, config.global_hidden_size
        self.global_norm = nn.RMSNorm(d_g, eps=config.local_post_norm_eps)
        self.global_projection = nn.Linear(d_g, d_l, bias=False) if d_l != d_g else None
        self.in_projection = nn.Linear(d_l, d_l, bias=True)
        self.layers = _local_stack(config, config.decoder_layers)

    def depool(self, h: torch.Tensor, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """h (B, L, d_l), g (B, P, d_g), index (B, L) -> decoder input z (B, L, d_l)."""
        g = self.global_norm(g)
        if self.global_projection is not None:
            g = self.global_projection(g)
        gathered = g.gather(1, index[..., None].expand(*index.shape, g.shape[-1]))
        return gathered + self.in_projection(h)

    def forward(self, z, mask=None, states=None):
        return self.layers(z, states=states, mask=mask)


def _local_stack(config: ByteliftConfig, num_layers: int) -> LocalStack:
    return LocalStack(
        num_blocks=num_layers,
        d_model=config.local_hidden_size,
        num_heads=config.local_heads,
        ffn_hidden=config.local_ffn_size,
        norm_eps=config.local_norm_eps,
        gate_soft_cap=config.mlstm_gate_soft_cap,
        igate_bias_init=config.mlstm_igate_bias_init,
        chunk_size=config.mlstm_chunk_size,
    )


def _first_valid(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) index of the first True (0 for an all-False row)."""
    return mask.long().argmax(dim=1)


def _accepts_inputs_embeds(module: nn.Module) -> bool:
    return "inputs_embeds" in inspect.signature(module.forward).parameters


class ByteliftPreTrainedModel(PreTrainedModel):
    config_class = ByteliftConfig
    base_model_prefix = "bytelift"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Local modules keep PyTorch's default initialisation (as the reference); the Bolmo-specific parts
        # (embeddings, pooling projection, predictor) are set by `from_source`. The mLSTM gate biases need
        # values of their own. `hf_init` functions skip tensors already loaded from a checkpoint.
        if isinstance(module, MLSTMLayer):
            hf_init.constant_(module.igate_proj.bias, module.igate_bias_init)
            if module.fgate_bias_init is not None:
                lo, hi = module.fgate_bias_init
                hf_init.copy_(module.fgate_proj.bias, torch.linspace(lo, hi, module.num_heads))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            module.reset_parameters()

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers marks a custom-code module without parameters of its own as initialised without
        # calling `_init_weights`; an MLSTMLayer owns no direct parameters but must set its gate biases
        # after its Linear children were reset (children are visited first).
        if isinstance(module, MLSTMLayer) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)


class ByteliftForCausalLM(ByteliftGenerationMixin, ByteliftPreTrainedModel):
    """A byte-level causal LM whose global model is the transformer of a source HF causal LM."""

    def __init__(self, config: ByteliftConfig, global_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.encoder = LocalEncoder(config)
        self.boundary_predictor = BoundaryPredictor(config)
        self.pooling_projection = nn.Linear(config.local_hidden_size, config.global_hidden_size, bias=True)
        if global_model is None:
            global_model = AutoModel.from_config(config.source_config)
        if not _accepts_inputs_embeds(global_model):
            raise TypeError(
                f"{type(global_model).__name__} does not accept `inputs_embeds`; bytelift needs a decoder that can "
                "be fed embeddings directly"
            )
        if global_model.get_input_embeddings() is not None:
            global_model.set_input_embeddings(_NoTokenEmbedding())
        self.global_model = global_model
        # transformers ≥ 5.2x renamed `past_key_values` to `cache`; older decoders still take the old name.
        params = inspect.signature(global_model.forward).parameters
        self._cache_argument = "cache" if "cache" in params else "past_key_values"
        self.decoder = LocalDecoder(config)
        self.norm = nn.RMSNorm(config.local_hidden_size, eps=config.local_norm_eps)
        self.lm_head = nn.Linear(config.local_hidden_size, config.fused_vocab_size, bias=False)
        # The source's own LM head, for the source prior (`bytelift.prior`).
        self.prior_head = (
            nn.Linear(config.global_hidden_size, config.prior_vocab_rows, bias=config.prior_head_bias)
            if config.source_prior else None
        )
        self.tokenizer: ByteTokenizer | None = None
        self._token_trie: TokenTrie | None = None
        self.post_init()

    # --- HF plumbing -----------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.byte_embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def attach_tokenizer(self, tokenizer: ByteTokenizer) -> None:
        """The byte tokenizer provides the longest-suffix expansion when `expanded_ids` are not given, and the
        source vocabulary's spellings for the source prior."""
        self.tokenizer = tokenizer
        self._token_trie = None

    @property
    def token_trie(self) -> TokenTrie:
        """The source vocabulary's trie (`bytelift.prior.TokenTrie`), built from the attached tokenizer once."""
        if self._token_trie is None:
            if self.tokenizer is None:
                raise ValueError("the source prior needs the byte tokenizer attached (model.attach_tokenizer(...))")
            self._token_trie = TokenTrie.from_byte_tokenizer(self.tokenizer, num_rows=self.config.prior_vocab_rows)
        return self._token_trie

    # --- the source prior ---------------------------------------------------------------------------------

    def prior_token_logits(self, g: torch.Tensor) -> torch.Tensor:
        """(..., d_g) global outputs -> (..., prior_vocab_rows) the source's next-token logits, as the source
        computes them from its last hidden state (its LM head, then its final soft-cap if it has one)."""
        head = self.prior_head
        logits = F.linear(g.to(head.weight.dtype), head.weight, head.bias).float()
        cap = self.config.prior_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def source_prior(
        self, token_logits: torch.Tensor, input_ids: torch.Tensor, boundary_mask: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The source prior at every byte: the trie marginal of the next-token distribution at the latest
        patch that ended at or before the byte, given the bytes emitted in the current patch since.

        Args:
            token_logits: (B, P, V) next-token logits per patch (`prior_token_logits` of the global outputs,
                or a teacher's logits at the same positions).
            input_ids: (B, L); boundary_mask: (B, L) bool, byte t ends a patch; mask: (B, L) valid.
        Returns:
            log_prior (B, L, 2·V_b) float64 log-probabilities to add to the decoder's fused logits (0 where the
            current patch prefix is no prefix of a source token, and on padding); has_prior (B, L) bool.
        """
        B, L = input_ids.shape
        P = token_logits.shape[1]
        trie = self.token_trie
        cumsums = token_cumsums(trie, token_logits).flatten(0, 1)  # (B·P, T+1)
        nodes = trie.prefix_nodes(input_ids, boundary_mask, mask)
        rows = torch.arange(B, device=input_ids.device)[:, None] * P + depool_index(boundary_mask, P)
        log_prior, has_prior = prior_logprobs(trie, cumsums, rows.flatten(), nodes.flatten(), self.config.prior_floor)
        return log_prior.view(B, L, -1), has_prior.view(B, L)

    # --- pieces (also used by training and generation) ------------------------------------------------

    def expand(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) byte ids -> (B, L) longest-suffix subword ids, via the attached tokenizer."""
        if self.tokenizer is None:
            raise ValueError(
                "expanded_ids were not given and no tokenizer is attached; pass expanded_ids or call "
                "model.attach_tokenizer(ByteTokenizer.from_source(source_tokenizer))"
            )
        expanded = self.tokenizer.expander.expand_batch(input_ids.cpu().numpy(), attention_mask.cpu().numpy())
        return torch.as_tensor(expanded, device=input_ids.device)

    def predict_boundaries(
        self, boundary_logprobs: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) log p, (B, L) valid -> (B, L) bool: byte t ends a patch iff p_t > threshold; with
        `config.boundary_trie_closure` (and `input_ids` given) also wherever the source vocabulary forces it
        (`TokenTrie.close_boundaries`: the patch followed by the next byte is a prefix of no token; the patch
        then ends at its last whole token, which the source prior can end)."""
        boundary = (boundary_logprobs > math.log(self.config.boundary_threshold)) & mask
        if self.config.boundary_trie_closure and input_ids is not None:
            boundary = self.token_trie.close_boundaries(input_ids, boundary, mask, TRIE_CLOSURE_MAX_ROUNDS,
                                                        back_to_token=True)
        return boundary

    def run_global(
        self,
        patches: torch.Tensor,
        attention_mask: torch.Tensor,
        cache=None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
    ):
        """Project pooled encoder states and run the global model.

        Args:
            patches: (B, P, d_l) pooled encoder states.
            attention_mask: (B, P) bool/int valid patches without a cache; with a cache, (B, past + P) over
                the cached and the new positions (HF convention).
            cache: the global model's KV cache (an HF `Cache`), or None.
            position_ids: (B, P) patch positions (needed when rows hold different numbers of valid patches
                in the cache); HF derives them from the cache length when None.
        Returns:
            (g (B, P, d_g) in the local dtype, the global model's output object, whose cache is updated).
        """
        max_patches = self.config.max_patches
        total = attention_mask.shape[1]
        if max_patches is not None and total > max_patches:
            raise ContextError(
                f"{total} patches exceed the global model's context of {max_patches} positions; "
                "shorten the input"
            )
        embeds = self.pooling_projection(patches)
        global_dtype = next(self.global_model.parameters()).dtype
        kwargs = {}
        if cache is not None:
            kwargs[self._cache_argument] = cache
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.global_model(
            inputs_embeds=embeds.to(global_dtype), attention_mask=attention_mask.long(), use_cache=use_cache, **kwargs
        )
        return out.last_hidden_state.to(patches.dtype), out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d_l) decoder output -> (B, L, 2·V_b) fused logits."""
        return self.lm_head(self.norm(x))

    # --- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        expanded_ids: torch.Tensor | None = None,
        boundary_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> ByteliftOutput:
        """Full forward pass over whole byte sequences.

        Args:
            input_ids: (B, L) byte-side ids (specials + 256 bytes; fused ids are not inputs).
            attention_mask: (B, L) 1 for real bytes, 0 for padding (left or right).
            expanded_ids: (B, L) longest-suffix source ids; computed with the attached tokenizer if absent.
            boundary_mask: (B, L) bool, byte t ends a patch (teacher forcing); predicted (p > threshold) if absent.
            labels: (B, L) byte-side ids (usually input_ids), IGNORE_INDEX to ignore; the loss uses fused labels
                derived from the boundaries actually used.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask = attention_mask.bool()
        if expanded_ids is None:
            expanded_ids = self.expand(input_ids, mask)
        if input_ids.max() >= self.config.byte_vocab_size or input_ids.min() < 0:
            raise ValueError(f"input_ids must lie in [0, {self.config.byte_vocab_size}); un-fuse them first")

        h, _ = self.encoder(input_ids, expanded_ids, mask=mask)
        boundary_logprobs = self.boundary_predictor(h, mask)
        if boundary_mask is None:
            boundary_mask = self.predict_boundaries(boundary_logprobs, mask, input_ids)
        else:
            boundary_mask = boundary_mask.bool() & mask

        patches, patch_mask, _ = pool_patches(h, boundary_mask)
        if patches.shape[1] > 0:
            g, _ = self.run_global(patches, patch_mask)
        else:  # an all-empty batch: nothing to run
            g = h.new_zeros(h.shape[0], 1, self.config.global_hidden_size)
        z = self.decoder.depool(h, g, depool_index(boundary_mask, g.shape[1]))
        x, _ = self.decoder(z, mask=mask)
        logits = self.head(x)
        log_prior = None
        if self.config.source_prior and patches.shape[1] > 0:
            log_prior, _ = self.source_prior(self.prior_token_logits(g), input_ids, boundary_mask, mask)
            logits = add_prior(logits, log_prior)

        loss = None
        if labels is not None:
            labels = labels.masked_fill(~mask, IGNORE_INDEX)
            target = fused_labels(labels, boundary_mask, self.config.byte_vocab_size)
            loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
        return ByteliftOutput(
            loss=loss,
            logits=logits,
            boundary_logprobs=boundary_logprobs,
            boundary_mask=boundary_mask,
            patch_mask=patch_mask,
            encoder_hidden_states=h,
            global_hidden_states=g,
            prior_logprobs=log_prior,
        )

    # --- building from a source model, saving and loading ------------------------------------------------

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike | PreTrainedModel = "smollm2-135m",
        tokenizer=None,
        seed: int = 0,
        **config_overrides,
    ) -> "ByteliftForCausalLM":
        """Byteify a source causal LM with Bolmo's initialisation.

        Args:
            source: a loaded HF causal LM, a packaged source name (`bytelift.sources.PACKAGED_SOURCES`), an HF
                folder or a `.gguf` file.
            tokenizer: the source tokenizer (required with a loaded model unless it can be loaded from
                `source.name_or_path`); byte-level BPE or SentencePiece with byte fallback.
            seed: seeds the random parts of the initialisation (byte embedding, pooling statistics).
            config_overrides: ByteliftConfig fields (local_hidden_size, decoder_layers, ...); `source_prior` and
                `token_exact_init` default to DEFAULT_SOURCE_PRIOR / DEFAULT_TOKEN_EXACT_INIT.
        The returned model has its ByteTokenizer attached (`model.tokenizer`).
        """
        from bytelift.sources import load_source

        unknown = unknown_options(config_overrides)
        if unknown:
            raise ValueError(f"unknown model options {unknown}: not ByteliftConfig fields")
        if not isinstance(source, PreTrainedModel):
            name = str(source)
            source, loaded_tokenizer = load_source(name)
            tokenizer = tokenizer or loaded_tokenizer
            config_overrides.setdefault("source_name_or_path", name)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source.name_or_path)
        byte_tokenizer = tokenizer if isinstance(tokenizer, ByteTokenizer) else ByteTokenizer.from_source(tokenizer)
        source_tokenizer = byte_tokenizer.source_tokenizer
        num_tokens = len(source_tokenizer)

        embedding = source.get_input_embeddings()
        if embedding is None or num_tokens > embedding.num_embeddings:
            rows = None if embedding is None else embedding.num_embeddings
            raise ValueError(
                f"the source tokenizer has {num_tokens} tokens but the model's input embedding has {rows} rows: "
                "tokenizer and model do not belong together"
            )
        with torch.no_grad():
            # The embedding module's *output*: some families scale their embeddings inside it (Gemma).
            token_embeddings = torch.cat(
                [embedding(ids).float() for ids in torch.arange(num_tokens, device=embedding.weight.device).split(8192)]
            )

        config_overrides.setdefault("source_prior", DEFAULT_SOURCE_PRIOR)
        config_overrides.setdefault("token_exact_init", DEFAULT_TOKEN_EXACT_INIT)
        config_overrides.setdefault("boundary_trie_closure", DEFAULT_BOUNDARY_TRIE_CLOSURE)
        source_head = source.get_output_embeddings()
        if config_overrides["source_prior"]:
            if source_head is None or not hasattr(source_head, "weight"):
                raise ValueError(
                    f"{type(source).__name__} has no LM head to keep for the source prior; pass source_prior=False"
                )
            config_overrides.setdefault("prior_vocab_rows", source_head.weight.shape[0])
            config_overrides.setdefault("prior_head_bias", getattr(source_head, "bias", None) is not None)
            config_overrides.setdefault("prior_logit_softcap", getattr(source.config, "final_logit_softcapping", None))
        config = ByteliftConfig(
            source_config=source.config.to_dict(), subword_vocab_size=num_tokens + 1, **config_overrides
        )
        global_model = source.base_model
        for module in global_model.modules():  # already trained: post_init must not re-initialise it
            module._is_hf_initialized = True
        # The local modules' default initialisation draws from the global RNG: fork it so that `seed`
        # alone decides the whole conversion, and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config, global_model=global_model)
        model.attach_tokenizer(byte_tokenizer)
        model.initialize_from_source(token_embeddings, seed=seed)
        if model.prior_head is not None:
            with torch.no_grad():
                model.prior_head.weight.copy_(source_head.weight)
                if model.prior_head.bias is not None:
                    model.prior_head.bias.copy_(source_head.bias)
        return model

    @torch.no_grad()
    def initialize_from_source(self, token_embeddings: torch.Tensor, seed: int = 0) -> None:
        """Bolmo initialisation of the local parts.

        Args:
            token_embeddings: (V_s, d_g) the source embedding module's output for every source token id.
        Steps: byte embedding rows ~ N(μ, σ²) per dimension of the source embeddings; subword embedding =
        the source embeddings (the "no subword" row zero); predictor W_q = W_k = I; pooling projection rescaled
        so that pooled patch embeddings have the source embeddings' per-dimension mean and std. (The reference
        rescales input columns, which standardises only approximately; we standardise each output dimension.)

        With `config.token_exact_init` the pooled patch instead reproduces the source embedding e of the
        longest-suffix token carried at its last byte — at a token's last byte most often that token itself —
        so the global model starts on (nearly) its own inputs: the byte embeddings and the encoder blocks'
        output projections are scaled by TOKEN_EXACT_RESIDUAL_SCALE (the block is then nearly the identity),
        the encoder norm's weight is the mean RMS c of the source embeddings (its output is c·e/rms(e)), and
        the pooling projection is the identity with zero bias (the first d_l dimensions when d_l < d_g).
        With `config.source_prior` the decoder's LM head starts at zero, so the output starts as the prior.
        """
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        d_l, d_g = cfg.local_hidden_size, cfg.global_hidden_size
        mu, sigma = token_embeddings.mean(0), token_embeddings.std(0)
        enc = self.encoder

        if enc.subword_projection is not None:  # narrower local width: start by keeping the first d_l dims
            enc.subword_projection.weight.copy_(torch.eye(d_l, d_g))
        if self.decoder.global_projection is not None:
            self.decoder.global_projection.weight.copy_(torch.eye(d_l, d_g))
        byte_rows = torch.randn(cfg.byte_vocab_size, d_l, generator=gen) * sigma[:d_l] + mu[:d_l]
        enc.byte_embedding.weight.copy_(byte_rows)
        enc.subword_embedding.weight.zero_()
        enc.subword_embedding.weight[: token_embeddings.shape[0]].copy_(token_embeddings)
        self.boundary_predictor.q_proj.weight.copy_(torch.eye(d_l))
        self.boundary_predictor.k_proj.weight.copy_(torch.eye(d_l))
        if cfg.source_prior:
            self.lm_head.weight.zero_()
        if cfg.token_exact_init:
            scale = TOKEN_EXACT_RESIDUAL_SCALE
            enc.byte_embedding.weight.mul_(scale)
            for block in enc.layers.blocks:
                block.mlstm.out_proj.weight.mul_(scale)
                block.ffn.down_proj.weight.mul_(scale)
            enc.norm.weight.fill_(float(token_embeddings.pow(2).mean(-1).sqrt().mean()))
            self.pooling_projection.weight.copy_(torch.eye(d_g, d_l))
            self.pooling_projection.bias.zero_()
            return

        # Statistics of pooled outputs on random bytes, each position taken as its own patch.
        cols = 256
        rows = max(1, cfg.pooling_init_samples // cols)
        device = enc.byte_embedding.weight.device
        ids = torch.randint(BYTE_OFFSET, cfg.byte_vocab_size, (rows, cols), generator=gen).to(device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        expanded = self.expand(ids, mask) if self.tokenizer is not None else torch.full_like(ids, cfg.no_subword_id)
        h, _ = enc(ids, expanded, mask=mask)
        out = self.pooling_projection(h).flatten(0, 1).float()
        scale = sigma.to(out.device) / out.std(0).clamp_min(1e-6)
        proj = self.pooling_projection
        proj.weight.mul_(scale[:, None].to(proj.weight.dtype))
        proj.bias.copy_((scale * (proj.bias.float() - out.mean(0)) + mu.to(out.device)).to(proj.bias.dtype))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors only), config, and the byte tokenizer beside them."""
        kwargs["safe_serialization"] = True
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved bytelift model (and its byte tokenizer, when the folder has one)."""
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            check_model_folder(path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            model.attach_tokenizer(ByteTokenizer.from_pretrained(path))
        return model


def check_model_folder(path: str | os.PathLike) -> None:
    """Raise a clear error unless `path` holds a bytelift config and intact safetensors weights."""
    import json

    if not os.path.exists(path):
        raise FileNotFoundError(f"no model folder {path}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a file, not a model folder")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_file} is not valid JSON ({err}); the model folder is corrupt") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != ByteliftConfig.model_type:
        raise ValueError(
            f"{path} holds a {model_type!r} model, not a bytelift model; byteify it first with "
            "ByteliftForCausalLM.from_source(...) or `bytelift convert`"
        )
    weights = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if not weights:
        raise FileNotFoundError(f"{path} has no .safetensors weights (bytelift never reads pickled weights)")
    for name in weights:
        check_safetensors_file(os.path.join(path, name))


def check_safetensors_file(file: str | os.PathLike) -> None:
    """Raise ValueError unless `file` is a whole safetensors file (its header parses and describes exactly the
    file's size): a cheap check of a checkpoint that reads no tensor."""
    import json
    import struct

    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a valid safetensors file ({err}); the checkpoint is corrupt") from err
    if 8 + header_len + end != size:
        raise ValueError(
            f"{file} is truncated or corrupt: its header describes {8 + header_len + end} bytes but the file "
            f"has {size}"
        )


COMPONENTS = {
    "embeddings": ("encoder.byte_embedding", "encoder.subword_embedding", "encoder.subword_projection"),
    "encoder": ("encoder.layers", "encoder.norm", "pooling_projection"),
    "predictor": ("boundary_predictor",),
    "global": ("global_model",),
    "decoder": ("decoder",),
    "head": ("norm", "lm_head"),
    "prior": ("prior_head",),
}


def count_parameters(model: ByteliftForCausalLM) -> dict[str, int]:
    """Parameter counts by component (embeddings, encoder incl. pooling projection, predictor, global,
    decoder incl. depooling, head) and their total."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        for component, prefixes in COMPONENTS.items():
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                counts[component] += param.numel()
                break
        else:
            raise AssertionError(f"parameter {name} belongs to no component")
    counts["total"] = sum(counts.values())
    return counts


def format_parameter_counts(counts: dict[str, int]) -> str:
    """One line: 'embeddings 28.3M | encoder 4.1M | ... | total 163.2M'."""
    return " | ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
