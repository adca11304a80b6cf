"""Stage-1 and stage-2 training objectives: a model plus what it is trained against, returning losses.

Kept apart from the trainer (training.py) so that the same objective runs under any loop, and apart
from the model (modeling.py) so that inference never carries a teacher.

Batch keys (from `bytelift.data.ByteCollator`), B batch, L bytes, P patches, N source tokens:
    input_ids (B, L), attention_mask (B, L), expanded_ids (B, L), labels (B, L),
    boundary_labels (B, L) bool (byte t ends a source token), patch_ids (B, L) (−1 on padding),
    token_ids (B, P), token_mask (B, P) (P = N unless the byte cap cut the window).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bytelift.losses import (
    DISTILL_TEMPERATURE,
    IGNORE_INDEX,
    LossWeights,
    boundary_loss,
    dense_distillation_loss,
    distillation_loss,
    encoder_loss,
    masked_mean,
    target_logprobs,
    teacher_logprobs,
)
from bytelift.modeling import ByteliftForCausalLM, depool_index, fused_labels, lookahead_valid, pool_patches
from bytelift.prior import add_prior

# The encoder loss compares hidden states after this many global layers (reference: layer 4).
ENCODER_LOSS_LAYER = 4


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass early (only the first layers are needed)."""


def decoder_layers(global_model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an HF base model (`layers`, `h`, ...), found generically as
    the module list whose length is the config's layer count."""
    n = getattr(global_model.config, "num_hidden_layers", None)
    for child in global_model.children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return child
    raise TypeError(f"cannot find the transformer blocks of {type(global_model).__name__}")


def hidden_after_layer(
    module: nn.Module, layer: int, stop: bool, blocks: nn.ModuleList | None = None, **forward_kwargs
):
    """Run `module(**forward_kwargs)` and capture the hidden state after transformer block `layer`
    (1-based) of `blocks` (default: the module's own blocks).

    With `stop`, the forward pass ends right after that block (the later blocks are not computed).
    Returns (hidden (B, P, d), the module's output, or None when stopped).
    """
    blocks = decoder_layers(module) if blocks is None else blocks
    k = min(layer, len(blocks))
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = blocks[k - 1].register_forward_hook(hook)
    out = None
    try:
        out = module(**forward_kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"], out


def decidable_positions(mask: torch.Tensor, lookahead: int) -> torch.Tensor:
    """(B, L) valid -> (B, L) positions whose boundary is learnable: valid, with `lookahead` valid bytes after
    them (what the predictor reads, `config.boundary_lookahead`), and not the first byte of the row (bos is
    a boundary by construction)."""
    nxt = lookahead_valid(mask, lookahead)
    first = mask.long().argmax(dim=1)
    not_first = torch.arange(mask.shape[1], device=mask.device)[None, :] != first[:, None]
    return mask & nxt & not_first


def boundary_counts(pred: torch.Tensor, gold: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    """(true positives, predicted, gold) boundary counts of (B, L) bool tensors over `mask`."""
    pred, gold = pred & mask, gold & mask
    return int((pred & gold).sum()), int(pred.sum()), int(gold.sum())


def precision_recall_f1(tp: int, npred: int, ngold: int) -> dict[str, float]:
    precision = tp / npred if npred else 0.0
    recall = tp / ngold if ngold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"boundary_precision": precision, "boundary_recall": recall, "boundary_f1": f1}


def best_f1_threshold(logprobs: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """The boundary threshold that maximises F1 on given predictor outputs.

    Args:
        logprobs: (n,) the predictor's log p at decidable positions; gold: (n,) bool true patch ends.
    Returns:
        (threshold p in (0, 1): byte t ends a patch iff p_t > threshold, the F1 it gives). The threshold is
        the geometric midpoint between the last log p kept and the first one dropped.
    """
    if logprobs.numel() == 0 or not bool(gold.any()):
        return 0.5, 0.0
    lp, order = logprobs.double().sort(descending=True)
    tp = gold[order].double().cumsum(0)
    k = torch.arange(1, lp.numel() + 1, dtype=torch.float64)
    f1 = 2 * tp / (k + gold.sum())
    # Ties: a threshold can only fall between distinct values; keep the last index of each run of equals.
    distinct = torch.ones_like(lp, dtype=torch.bool)
    distinct[:-1] = lp[:-1] > lp[1:]
    f1 = torch.where(distinct, f1, torch.full_like(f1, -1.0))
    best = int(f1.argmax())
    nxt = float(lp[best + 1]) if best + 1 < lp.numel() else float(lp[best]) - 1.0
    threshold = math.exp(0.5 * (float(lp[best]) + nxt))
    return min(max(threshold, 1e-6), 1 - 1e-6), float(f1[best])


def boundary_metrics(pred: torch.Tensor, gold: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of predicted boundaries (B, L) bool against gold, over `mask`."""
    return precision_recall_f1(*boundary_counts(pred, gold, mask))


def oracle_logits(
    model: ByteliftForCausalLM,
    h: torch.Tensor,
    boundary: torch.Tensor,
    mask: torch.Tensor,
    input_ids: torch.Tensor,
    teacher_last: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The decoder fed the teacher's final hidden states as patch outputs ("oracle" patches, stage 1).

    Args:
        h: (B, L, d_l) encoder states; boundary: (B, L) bool, the true token ends; mask: (B, L) valid.
        teacher_last, teacher_logits: (B, N, d_g), (B, N, V) the teacher's last hidden states and logits, N ≥ P
            (teacher position j ↔ patch j, see `bytelift.losses`).
    Returns:
        (logits (B, L, 2·V_b) with the teacher's prior added when the model has the prior path,
        the decoder's own logits, the teacher's trie marginal (B, L, 2·V_b) log-probs or None, where it is
        defined (B, L) bool or None). The marginal is computed when the model has the prior path.
    """
    P = int(boundary.sum(dim=1).max())
    g = teacher_last[:, :P].to(h.dtype)
    z = model.decoder.depool(h, g, depool_index(boundary, P))
    x, _ = model.decoder(z, mask=mask)
    decoder_logits = model.head(x)
    if not model.config.source_prior:
        return decoder_logits, decoder_logits, None, None
    prior, has_prior = model.source_prior(teacher_logits[:, :P], input_ids, boundary, mask)
    return add_prior(decoder_logits, prior), decoder_logits, prior, has_prior


class Stage1Objective(nn.Module):
    """Subword-to-byte distillation with the global model frozen (DESIGN §2, stage 1).

    The teacher is the source causal LM itself, whose transformer *is* the student's global model
    (shared, frozen): it is run on its own token embeddings (kept here, since the byteified model dropped
    them) through its full causal-LM forward, so family-specific logit processing (soft-capping, scaling)
    is the source's own. Boundaries are the true token ends.
    """

    def __init__(
        self,
        model: ByteliftForCausalLM,
        teacher_lm: nn.Module,
        teacher_embedding: nn.Module,
        whitespace_tokens: torch.Tensor,
        teacher_start_id: int,
        weights: LossWeights | None = None,
        encoder_layer: int = ENCODER_LOSS_LAYER,
        temperature: float = DISTILL_TEMPERATURE,
    ):
        super().__init__()
        if teacher_lm.base_model is not model.global_model:
            raise ValueError("the teacher must share its transformer with the student's global model")
        self.model = model
        # The teacher's own parts are submodules (so .to() moves them) but are never trained; the rest of
        # the teacher is the global model. The causal LM itself is held outside the module tree, so its
        # transformer is not registered twice.
        self.teacher_embedding = teacher_embedding.requires_grad_(False)
        self.teacher_head = teacher_lm.get_output_embeddings().requires_grad_(False)
        self._teacher_lm = [teacher_lm]
        self.register_buffer("whitespace_tokens", whitespace_tokens.bool(), persistent=False)
        self.teacher_start_id = teacher_start_id
        self.weights = weights or LossWeights()
        self.encoder_layer = encoder_layer
        self.temperature = temperature
        model.global_model.requires_grad_(False)
        if model.prior_head is not None:  # the source's LM head belongs to the frozen global side
            model.prior_head.requires_grad_(False)

    @torch.no_grad()
    def teacher(self, token_ids: torch.Tensor, token_mask: torch.Tensor):
        """Teacher pass on [start] + tokens[:-1]: position j sees patches 0..j and predicts token j.

        Returns (hidden after the encoder-loss layer (B, N, d_g), last hidden (B, N, d_g), logits (B, N, V_s)).
        """
        teacher_lm, teacher_embedding = self._teacher_lm[0], self.teacher_embedding
        start = torch.full_like(token_ids[:, :1], self.teacher_start_id)
        inputs = torch.cat([start, token_ids[:, :-1]], dim=1)
        mask = torch.cat([torch.ones_like(token_mask[:, :1]), token_mask[:, :-1]], dim=1)
        gm = self.model.global_model
        embeds = teacher_embedding(inputs).to(next(gm.parameters()).dtype)
        captured = {}
        hook = gm.register_forward_hook(lambda mod, args, out: captured.__setitem__("last", out.last_hidden_state))
        try:
            h_k, out = hidden_after_layer(
                teacher_lm, self.encoder_layer, stop=False, blocks=decoder_layers(gm),
                inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False,
            )
        finally:
            hook.remove()
        return h_k, captured["last"], out.logits

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.model
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        boundary = batch["boundary_labels"].bool() & mask

        h, _ = m.encoder(ids, batch["expanded_ids"], mask=mask)
        boundary_logprobs = m.boundary_predictor(h, mask)
        patches, patch_mask, patch_ends = pool_patches(h, boundary)
        P = patches.shape[1]

        token_ids, token_mask = batch["token_ids"], batch["token_mask"].bool()
        t_k, t_last, t_logits = self.teacher(token_ids, token_mask)
        N = token_ids.shape[1]
        if P > N:
            raise ValueError(f"{P} patches but only {N} teacher positions: boundaries and tokens disagree")

        # Encoder loss: the first layers of the (frozen) global model on the student's patches; gradients
        # flow through the frozen blocks into the encoder.
        gm = m.global_model
        embeds = m.pooling_projection(patches).to(next(gm.parameters()).dtype)
        s_k, _ = hidden_after_layer(
            gm, self.encoder_layer, stop=True, inputs_embeds=embeds, attention_mask=patch_mask.long(), use_cache=False
        )
        enc = encoder_loss(s_k, t_k[:, :P], patch_mask & token_mask[:, :P], relative=self.weights.encoder_relative)

        # Oracle patches: the decoder reads the teacher's final hidden states in place of global outputs;
        # the teacher's trie marginal at every byte is the source prior of those patches (added to the
        # decoder's logits when the model has the prior path) and the dense distillation target.
        logits, decoder_logits, teacher_prior, has_prior = oracle_logits(m, h, boundary, mask, ids, t_last, t_logits)
        dense = self.weights.dense_distill > 0
        if dense and teacher_prior is None:
            teacher_prior, has_prior = m.source_prior(t_logits[:, :P], ids, boundary, mask)

        targets = fused_labels(batch["labels"].masked_fill(~mask, IGNORE_INDEX), boundary, m.config.byte_vocab_size)
        logp, lp = target_logprobs(logits, targets)
        scored_bytes = targets != IGNORE_INDEX
        ce = masked_mean(-lp, scored_bytes)
        y, ws = teacher_logprobs(t_logits, token_ids, self.whitespace_tokens)
        distill = distillation_loss(
            logp, lp, batch["patch_ids"], patch_ends, patch_mask, y, ws, token_mask, temperature=self.temperature
        )
        decidable = decidable_positions(mask, m.config.boundary_lookahead)
        bnd = boundary_loss(boundary_logprobs, boundary, decidable)

        w = self.weights
        loss = w.boundary * bnd + w.encoder * enc + w.distill * distill + w.ce * ce
        out = {"loss": loss, "boundary_loss": bnd, "encoder_loss": enc, "distill_loss": distill, "ce_loss": ce}
        if dense:
            out["dense_distill_loss"] = dense_distillation_loss(logp, teacher_prior, scored_bytes & has_prior)
            out["loss"] = loss + w.dense_distill * out["dense_distill_loss"]
        with torch.no_grad():
            if m.config.source_prior:  # where the bits go: the prior alone and the decoder alone
                _, lp_prior = target_logprobs(teacher_prior, targets)
                _, lp_decoder = target_logprobs(decoder_logits, targets)
                out["ce_prior_only"] = masked_mean(-lp_prior, scored_bytes)
                out["ce_decoder_only"] = masked_mean(-lp_decoder, scored_bytes)
            pred = m.predict_boundaries(boundary_logprobs, mask, ids)
            out.update({k: torch.tensor(v) for k, v in boundary_metrics(pred, boundary, decidable).items()})
            out["bytes"] = mask.sum()
        return out


class Stage2Objective(nn.Module):
    """End-to-end training (DESIGN §2, stage 2): boundaries from the predictor, CE on fused labels built
    from those boundaries, plus boundary BCE against the (possibly merged) source token ends."""

    def __init__(self, model: ByteliftForCausalLM, weights: LossWeights | None = None):
        super().__init__()
        self.model = model
        self.weights = weights or LossWeights()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.model
        mask = batch["attention_mask"].bool()
        out = m(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            expanded_ids=batch["expanded_ids"],
            labels=batch["labels"],
        )
        gold = batch["boundary_labels"].bool() & mask
        decidable = decidable_positions(mask, m.config.boundary_lookahead)
        bnd = boundary_loss(out.boundary_logprobs, gold, decidable)
        loss = self.weights.ce * out.loss + self.weights.boundary * bnd
        result = {"loss": loss, "ce_loss": out.loss, "boundary_loss": bnd}
        with torch.no_grad():
            result.update({k: torch.tensor(v) for k, v in boundary_metrics(out.boundary_mask, gold, decidable).items()})
            result["bytes"] = mask.sum()
            result["bytes_per_patch"] = mask.sum() / out.boundary_mask.sum().clamp_min(1)
            # The ratio of the boundary targets (after BPE-style merges, when enabled).
            result["target_bytes_per_patch"] = mask.sum() / gold.sum().clamp_min(1)
        return result
