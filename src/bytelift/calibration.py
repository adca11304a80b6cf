"""The decoding threshold: calibrating it, and scoring text the way decoding segments it.

While generating, the head decides whether each new byte closes its patch (log-odds of "byte + end" vs
"byte" above -`decode_boundary_bias`). `decoding_logprobs` runs a `DecodingSession` teacher-forced on given
bytes with the head's own flags (an exact likelihood of the bytes as decoding segments them);
`calibrate_boundary_bias` picks the bias at which decoding closes patches as often as the predictor does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from bytelift.decoding import DEFAULT_GLOBAL_SYNC, DecodingSession
from bytelift.tokenization import BOS_ID, BYTE_VOCAB_SIZE, PAD_ID, fuse


@dataclass
class BoundaryCalibration:
    """Result of `calibrate_boundary_bias`. Rates are patch ends per byte."""

    bias: float  # the decode_boundary_bias chosen (the tried value whose rate came closest to the target)
    target_rate: float  # the predictor's rate on the same bytes
    rate: float  # decoding's rate at `bias`
    trials: list[tuple[float, float]]  # (bias, decoding rate) in the order tried; the first is bias 0
    positions: int  # bytes decoded per trial


# Calibration stops once decoding's patch rate is within this relative distance of the predictor's.
CALIBRATION_TOLERANCE = 0.03
CALIBRATION_MAX_TRIALS = 8
# Bytes decoded per trial (the rate's sampling error at ~1000 patches is ~3%).
CALIBRATION_BYTES = 8192


@torch.inference_mode()
def calibrate_boundary_bias(
    model,
    batches,
    max_bytes: int = CALIBRATION_BYTES,
    tolerance: float = CALIBRATION_TOLERANCE,
    max_trials: int = CALIBRATION_MAX_TRIALS,
    batch_size: int = 16,
) -> BoundaryCalibration:
    """The shift of the head's end-of-patch log-odds that makes decoding close patches as often as the
    predictor does on the same text.

    While decoding, the head decides each byte's flag from the byte history and its own earlier flags; in
    training it was fitted to the non-causal predictor's boundaries with the predictor's boundaries as
    context, so decoding need not close patches at the trained rate, and a teacher-forced forward does not
    tell its rate (the decoder's context there holds the predictor's boundaries, each read with its
    lookahead). Measured on 8 KB of held-out text, SmolLM2 after the 30-minute `bytelift convert`: the predictor
    4.83 bytes/patch, decoding at bias 0 5.20; a stage 2 with merged patches: 7.36 and 7.14. So the rate
    is measured where it matters, by teacher-forced *decoding* (`decoding_logprobs`: the text's bytes, the
    head's own flags), and the bias is searched: each trial proposes the threshold that would pass exactly
    the target share of that trial's log-odds, kept inside the bracket of earlier trials (the rate grows
    with the bias), until the rate is within `tolerance`.

    Args:
        batches: iterable of dicts with input_ids (B, L), attention_mask (B, L) (bos first, either padding
            side), e.g. collated training windows or tokenized held-out documents; read until `max_bytes`.
    """
    from bytelift.objectives import decidable_positions  # objectives imports modeling, which imports us

    device = next(model.parameters()).device
    rows, patch_ends, decided, total = [], 0, 0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device).bool()
        expanded = batch.get("expanded_ids")
        out = model(input_ids=ids, attention_mask=mask, expanded_ids=None if expanded is None else expanded.to(device))
        # The predictor's rate over the bytes whose boundary it decides (its lookahead read; bos excluded).
        decidable = decidable_positions(mask, model.config.boundary_lookahead)
        patch_ends += int((out.boundary_mask & decidable).sum())
        decided += int(decidable.sum())
        for r in range(ids.shape[0]):
            row = ids[r][mask[r]][1:]  # without bos: decoding starts from bos, as generate() with no prompt
            rows.append(row[: max_bytes - total])
            total += len(rows[-1])
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    rows = [r for r in rows if len(r)]
    if not rows or decided == 0:
        raise ValueError("no text to calibrate on: the batches hold no byte whose boundary is decided")
    target = patch_ends / decided

    def trial(bias: float) -> torch.Tensor:
        """(n,) the head's log-odds of every byte, decoding with `bias`."""
        scores = []
        for start in range(0, len(rows), batch_size):
            group = rows[start : start + batch_size]
            conts = pad_sequence(group, batch_first=True, padding_value=PAD_ID)
            bos = torch.full((len(group), 1), BOS_ID, dtype=torch.long, device=device)
            d = decoding_logprobs(model, bos, None, None, conts, boundary_bias=bias)
            scores += [d.logodds[r, : int(d.scored[r])] for r in range(len(group))]
        return torch.cat(scores).float().cpu()

    lo, hi = -math.inf, math.inf  # the rate is below the target at lo, above it at hi
    bias, trials, best = 0.0, [], None
    for _ in range(max_trials):
        scores = trial(bias)
        rate = float((scores + bias > 0).float().mean())
        trials.append((bias, rate))
        if best is None or abs(rate - target) < abs(best[1] - target):
            best = (bias, rate)
        if abs(rate - target) <= tolerance * target:
            break
        if rate < target:
            lo = bias
        else:
            hi = bias
        proposal = _threshold_passing(scores, round(target * len(scores)))
        if not lo < proposal < hi:  # outside the bracket: bisect it (or step out of a one-sided one)
            proposal = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else bias + (1.0 if rate < target else -1.0)
        bias = proposal
    return BoundaryCalibration(bias=best[0], target_rate=target, rate=best[1], trials=trials, positions=total)


def _threshold_passing(scores: torch.Tensor, k: int) -> float:
    """The bias b for which exactly k of `scores` (n,) satisfy score + b > 0 (midway between neighbours)."""
    top = scores.sort(descending=True).values
    if k <= 0:
        return -float(top[0]) - 1.0
    if k >= len(top):
        return -float(top[-1]) + 1.0
    return -float(top[k - 1] + top[k]) / 2


@dataclass
class DecodedText:
    """Result of `decoding_logprobs`; (B, T) tensors, zero / False past each row's `scored` bytes."""

    logprobs: torch.Tensor  # float32 natural log-prob of each byte (folded over the flag)
    logodds: torch.Tensor  # float32 head's log-odds of "this byte ends a patch" (before the bias)
    flags: torch.Tensor  # bool, the byte closed a patch (logodds + bias > 0)
    scored: torch.Tensor  # (B,) long, bytes scored per row (fewer than given only if the context filled)


@torch.inference_mode()
def decoding_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    expanded_ids: torch.Tensor | None,
    continuations: torch.Tensor,
    boundary_bias: float | None = None,
    global_sync: float = DEFAULT_GLOBAL_SYNC,
) -> DecodedText:
    """Teacher-forced decoding: the log-probability of given continuations under the model *as it
    generates*: each byte from the folded distribution, each patch closed by the head's flag (with the
    bias), not by the predictor's lookahead. The flag is a function of the byte history, so this is an
    exact likelihood of the bytes, and what generation sees.

    Args:
        input_ids, attention_mask, expanded_ids: (B, L) left-padded prompts, as `generate`.
        continuations: (B, T) byte-side ids to score after each prompt, right-padded with PAD_ID.
        boundary_bias: None = the model's `decode_boundary_bias`.
    """
    if boundary_bias is None:
        boundary_bias = model.config.decode_boundary_bias
    session = DecodingSession(model, input_ids, attention_mask, expanded_ids, global_sync=global_sync)
    B, T = continuations.shape
    device = input_ids.device
    lengths = (continuations != PAD_ID).sum(dim=1)
    logp = torch.zeros(B, T + 1, device=device)  # last column: sink for rows that did not step
    logodds = torch.zeros(B, T + 1, device=device)
    pos = torch.zeros(B, dtype=torch.long, device=device)
    symbols = session.forced_symbols(session.prefill(), boundary_bias)
    session.finished |= lengths == 0
    padded = torch.cat([continuations, continuations.new_full((B, 1), PAD_ID)], dim=1)
    while not bool(session.finished.all()):
        logits, ready = session.step(symbols)
        byte = padded.gather(1, pos[:, None])[:, 0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        plain = lp.gather(1, byte[:, None])[:, 0]
        fused = lp.gather(1, (byte + BYTE_VOCAB_SIZE)[:, None])[:, 0]
        col = torch.where(ready, pos, T)[:, None]
        logp.scatter_(1, col, torch.logaddexp(plain, fused)[:, None])
        logodds.scatter_(1, col, (fused - plain)[:, None])
        pos += ready.long()
        session.finished |= ready & (pos >= lengths)
        symbols = fuse(byte, fused - plain + boundary_bias > 0)
    scored = torch.arange(T, device=device)[None] < pos[:, None]
    logodds = logodds[:, :T] * scored
    return DecodedText(logprobs=logp[:, :T], logodds=logodds, flags=(logodds + boundary_bias > 0) & scored,
                       scored=pos)


