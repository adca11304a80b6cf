"""Stage-1 and stage-2 losses (DESIGN §2; reference spec §3.2, §6.4).

Alignment used throughout (B batch, L bytes, P patches, N source tokens, V_s source vocabulary):
the byte sequence is [bos] + bytes(t_0 .. t_{N-2}), so patch 0 is bos and patch j ≥ 1 is token t_{j-1};
the teacher reads [doc] + t_0 .. t_{N-2}, so teacher position j sees exactly the content of patches
0..j and predicts t_j, which the student spells out as patch j+1. Hence "patch j ↔ teacher position j".

Normalisation: byte losses are averaged over valid bytes, patch losses over valid patches (the reference
divides patch losses by a byte count; we do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bytelift.tokenization import BYTE_OFFSET, BYTE_VOCAB_SIZE, IGNORE_INDEX

# Log-probabilities are kept at most this far below 0 before log(1 - p): p = 1 exactly would give -inf.
LOG_P_CLIP = -1e-3
# Reference loss weights and distillation temperature.
BOUNDARY_WEIGHT = 4.0
ENCODER_WEIGHT = 4.0
# Floor of the teacher RMS that divides the relative encoder loss (no division by ~0 at an all-zero state).
ENCODER_RMS_FLOOR = 1e-3
DISTILL_WEIGHT = 1.0
CE_WEIGHT = 1.0
# Dense per-byte distillation (stage 1; not in the reference): KL from the teacher's trie marginal at every
# byte, weighted like the token-level distillation term.
DENSE_DISTILL_WEIGHT = 1.0
DISTILL_TEMPERATURE = 5.0
# Bytes a whitespace-initial continuation starts with (the reference's Ġ, Ċ, ĉ: space, newline, tab).
WHITESPACE_BYTES = (0x20, 0x0A, 0x09)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` (same shape, bool); 0 when nothing is valid (keeps the graph)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def boundary_loss(boundary_logprobs: torch.Tensor, boundary_labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the predictor against the true patch ends.

    Args:
        boundary_logprobs: (B, L) log p_t that byte t ends a patch.
        boundary_labels: (B, L) bool, byte t ends a source token.
        mask: (B, L) bool, positions to score: valid bytes that have a lookahead byte and are not bos
            (bos is a boundary by construction, the last byte is undecidable).
    Returns:
        scalar, mean over the scored bytes.
    """
    logp = boundary_logprobs.float().clamp(max=LOG_P_CLIP)
    nll = -torch.where(boundary_labels.bool(), logp, log1mexp(logp))
    return masked_mean(nll, mask)


def byte_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the fused head. logits (B, L, 2·V_b), targets (B, L) with IGNORE_INDEX; mean over
    scored bytes."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def encoder_loss(
    student: torch.Tensor, teacher: torch.Tensor, patch_mask: torch.Tensor, relative: bool = False
) -> torch.Tensor:
    """RMS distance ‖a − b‖₂ / √d (not squared, as the reference) between hidden states, per patch.

    With `relative`, each patch's distance is divided by the teacher state's own RMS there (floored at
    ENCODER_RMS_FLOOR), so the term reads the same on sources whose hidden states differ in scale (Gemma's
    are ~10x SmolLM2's) instead of drowning the other terms on the larger ones.

    Args:
        student: (B, P, d) global hidden state after layer k fed the pooled patches.
        teacher: (B, P, d) the same layer's state fed the source token embeddings (aligned positions).
        patch_mask: (B, P) bool valid patches.
        relative: divide by the teacher's per-patch RMS.
    """
    diff = student.float() - teacher.float()
    dist = diff.pow(2).mean(-1).clamp_min(1e-12).sqrt()
    if relative:
        dist = dist / teacher.float().pow(2).mean(-1).sqrt().clamp_min(ENCODER_RMS_FLOOR)
    return masked_mean(dist, patch_mask)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the fused head and the log-probability of each target.

    Returns (logp (B, L, 2·V_b) float32, lp (B, L) = logp at the target, 0 where ignored)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = targets.clamp_min(0)
    lp = logp.gather(-1, safe[..., None])[..., 0]
    return logp, torch.where(targets == IGNORE_INDEX, torch.zeros_like(lp), lp)


def student_token_logprobs(lp: torch.Tensor, patch_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """ŷ_j: the student's log-probability of spelling token t_j completely (inner bytes plain, last byte
    fused with the end-of-patch flag), summed from the per-position target log-probs.

    Args:
        lp: (B, L) log-prob of the fused target at each position (position t predicts byte t+1).
        patch_ids: (B, L) patch index of each byte (0 = bos), −1 on padding.
        num_tokens: N; the result has N columns (token j is patch j+1).
    Returns:
        (B, N) float32; columns whose token has no bytes in the window stay 0.
    """
    B, L = lp.shape
    # Position t's target is byte t+1, which belongs to patch patch_ids[t+1] = token patch_ids[t+1] − 1.
    token_of_target = F.pad(patch_ids[:, 1:], (0, 1), value=-1) - 1
    valid = token_of_target >= 0
    index = torch.where(valid, token_of_target, torch.full_like(token_of_target, num_tokens))
    out = lp.new_zeros(B, num_tokens + 1)
    out.scatter_add_(1, index, torch.where(valid, lp, torch.zeros_like(lp)))
    return out[:, :num_tokens]


def student_whitespace_logprobs(logp: torch.Tensor, byte_vocab_size: int = BYTE_VOCAB_SIZE) -> torch.Tensor:
    """(B, L, 2·V_b) log-probs -> (B, L) log-prob that the next byte is whitespace (flag marginalised:
    a lone-whitespace token is a whitespace-initial token too)."""
    ids = torch.tensor([BYTE_OFFSET + b for b in WHITESPACE_BYTES], device=logp.device)
    ids = torch.cat([ids, ids + byte_vocab_size])
    return torch.logsumexp(logp.index_select(-1, ids), dim=-1)


def teacher_logprobs(
    teacher_logits: torch.Tensor, token_ids: torch.Tensor, whitespace_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probabilities of the actual tokens and of a whitespace-initial next token.

    Args:
        teacher_logits: (B, N, V_s); position j predicts t_j.
        token_ids: (B, N) the tokens t_j.
        whitespace_tokens: (V_s,) bool, tokens whose bytes start with whitespace.
    Returns:
        (y (B, N), ws (B, N)) float32.
    """
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    y = logp.gather(-1, token_ids.clamp_min(0)[..., None])[..., 0]
    ws = torch.logsumexp(logp.masked_fill(~whitespace_tokens, float("-inf")), dim=-1)
    return y, ws


def binary_kl(y: torch.Tensor, y_hat: torch.Tensor, temperature: float = DISTILL_TEMPERATURE) -> torch.Tensor:
    """KL(Bernoulli(exp(y/τ)) ‖ Bernoulli(exp(ŷ/τ))) elementwise, for log-probabilities y, ŷ ≤ 0.

    Tempering by τ moves tiny probabilities of long tokens into a range where the binary KL has gradient.
    """
    log_p = (y.float() / temperature).clamp(max=-1e-6)
    log_q = (y_hat.float() / temperature).clamp(max=-1e-6)
    log_1mp, log_1mq = log1mexp(log_p), log1mexp(log_q)
    return log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)


def distillation_loss(
    logp: torch.Tensor,
    lp: torch.Tensor,
    patch_ids: torch.Tensor,
    patch_ends: torch.Tensor,
    patch_mask: torch.Tensor,
    teacher_y: torch.Tensor,
    teacher_ws: torch.Tensor,
    teacher_mask: torch.Tensor,
    temperature: float = DISTILL_TEMPERATURE,
    debias: bool = True,
) -> torch.Tensor:
    """Token-level distillation of the byte decoder (stage 1, oracle patches).

    For token t_j: ŷ_j = Σ over its bytes of the fused log-probs; y_j = teacher log p(t_j). With `debias`
    both add the log-probability that the *next* token starts with whitespace (student: at the last byte
    of t_j; teacher: at position j+1), which removes the bias of comparing a byte-prefix probability
    with a token probability. Loss = binary KL with temperature τ, mean over scored tokens.

    Args:
        logp: (B, L, 2·V_b) student log-probs; lp: (B, L) log-prob of each fused target.
        patch_ids: (B, L) patch index per byte (−1 on padding).
        patch_ends: (B, P) byte position of each patch's last byte; patch_mask: (B, P) valid patches
            (patch j ≥ 1 is token j−1; a patch cut by the byte cap is not valid).
        teacher_y, teacher_ws: (B, N) from `teacher_logprobs`; teacher_mask: (B, N) valid teacher positions.
    Token j is scored when its patch j+1 is complete and the teacher predicted it (and, with debias, the
    teacher also has position j+1).
    """
    B, N = teacher_y.shape
    y_hat = student_token_logprobs(lp, patch_ids, N)
    y = teacher_y

    def per_token(x: torch.Tensor, fill) -> torch.Tensor:
        """(B, P) patch-indexed -> (B, N) token-indexed (token j = patch j+1)."""
        x = x[:, 1 : N + 1]
        return F.pad(x, (0, N - x.shape[1]), value=fill)

    scored = per_token(patch_mask, False) & teacher_mask
    if debias:
        ws_student = student_whitespace_logprobs(logp)  # (B, L)
        ends = per_token(patch_ends, 0).clamp(min=0, max=logp.shape[1] - 1)
        y_hat = y_hat + ws_student.gather(1, ends)
        y = y + F.pad(teacher_ws[:, 1:], (0, 1))
        scored = scored & F.pad(teacher_mask[:, 1:], (0, 1), value=False)
    return masked_mean(binary_kl(y, y_hat, temperature), scored)


def dense_distillation_loss(
    logp: torch.Tensor, target_logp: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """KL(target ‖ student) over the 2·V_b fused outputs at every scored byte, mean over those bytes.

    Args:
        logp: (B, L, 2·V_b) student log-probs; target_logp: (B, L, 2·V_b) the teacher's trie marginal
            (`bytelift.prior`), log-probs; scored: (B, L) bool (valid, with a next byte, the prior defined).
    """
    target = target_logp.float()
    kl = (target.exp() * (target - logp.float())).sum(-1)
    return masked_mean(kl, scored)


@dataclass
class LossWeights:
    """Weights of the loss terms (reference values)."""

    boundary: float = BOUNDARY_WEIGHT
    encoder: float = ENCODER_WEIGHT
    encoder_relative: bool = False  # divide the encoder loss by the teacher's RMS (see encoder_loss)
    distill: float = DISTILL_WEIGHT
    ce: float = CE_WEIGHT
    dense_distill: float = DENSE_DISTILL_WEIGHT
