"""Scoring and greedy generation with one interface for the byteified model and its source.

Every evaluation figure comes from two primitives applied to both models on the same strings:
- `score(pairs)`: the log-likelihood of each continuation given its context, with the number of bytes it
  covers and whether greedy decoding would have produced it;
- `generate(prompts, max_new_bytes)`: greedy continuations, for exact-match tasks and the looping check
  (`find_loop`).

How the two models' likelihoods are made comparable. The source scores one segmentation of the text (its
canonical tokenisation): log p(x, tokens) ≤ log p(x). The byte model likewise scores the pair (bytes,
patches) with the patches its predictor chooses: at byte t the head predicts the fused symbol (x_{t+1},
M_{t+1}), so log p(x, M) = Σ_t log p_head(x_{t+1}, M_{t+1} | x_≤t, M_≤t) ≤ log p(x). Both are proper
likelihoods and lower bounds of the marginal, so their bits per byte compare fairly.
The reference instead *folds* the flag at every byte (p(x_{t+1}) = p(plain) + p(fused)) while the
decoder's context at t already holds M_t, which the non-causal predictor derived from x_{t+1}: that
conditions each byte on one bit of its own future (spec §3.3, "not an exact marginal") and flatters the
figure. We report the folded figure too (`logprob_folded`), but the headline is the joint. The last
byte's flag is never read by a later byte, so there folding is exact and we fold.
With k = `boundary_lookahead` > 1 the predictor cannot decide the flags of a text's last k bytes; as the
reference's evaluator does, we append k − 1 newlines (`LOOKAHEAD_FILLER`, not scored) so that it decides all
but the last scored byte's, which is folded as above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from bytelift.calibration import decoding_logprobs
from bytelift.modeling import ByteliftForCausalLM
from bytelift.objectives import oracle_logits
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID

# Sequences are grouped into batches of at most this many positions (batch × longest row), which bounds
# activation memory (the byte model's (B, L, 520) logits dominate) while keeping matmuls large.
DEFAULT_BATCH_POSITIONS = 8192
# Contexts are cut from the left to fit this many bytes (long LAMBADA/held-out texts; both models see
# the same bytes).
DEFAULT_MAX_BYTES = 4096
# Appended (boundary_lookahead − 1 times, not scored) after a scored text so that the predictor decides the
# flags of all but its last byte; a newline, as the reference's evaluator: it starts a new pretoken in the
# common tokenizers, so the byte before it usually ends a token, as at the end of a sentence or line.
LOOKAHEAD_FILLER = b"\n"
# Rows decoded together by `score_decoding` (a decoding step costs about as much for 1 row as for a few).
DEFAULT_DECODING_BATCH = 16
# The looping check (`find_loop`): a text loops when some LOOP_SPAN-byte string occurs LOOP_REPEATS times
# within LOOP_WINDOW bytes. 8 bytes is longer than most words with their space, so a common word recurring is
# not a repeat; twice can be a parallel phrase or a quotation, three times is a pattern; 64 bytes keeps the
# copies close together, as a decoder stuck in a cycle writes them, not a refrain across paragraphs.
LOOP_SPAN = 8
LOOP_REPEATS = 3
LOOP_WINDOW = 64


@dataclass
class Scored:
    """The continuation's log-likelihood (nats) under the model, and its size."""

    logprob: float  # joint (with the model's own segmentation; see the module docstring)
    logprob_folded: float  # byte model: the reference's folded figure; source: equal to logprob
    n_bytes: int
    greedy: bool  # every unit of the continuation was the model's argmax
    # byte model: (n_bytes,) bool, continuation byte t ends a predicted patch (the last byte: undecided, False)
    boundaries: np.ndarray | None = None


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped (longest first) so that len(group) × longest ≤ budget (at least one per group)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)


def _clipped(pairs: Sequence[tuple[str | bytes, str | bytes]], max_bytes: int) -> list[tuple[bytes, bytes]]:
    """(context, continuation) as bytes, the context cut from the left so that both fit in max_bytes."""
    out = []
    for ctx, cont in pairs:
        ctx, cont = _as_bytes(ctx), _as_bytes(cont)
        if not cont:
            raise ValueError("an empty continuation has no likelihood to score")
        out.append((ctx[max(0, len(ctx) + len(cont) - max_bytes):], cont))
    return out


def first_line_match(generated: str, answer: str, stopped: bool) -> bool:
    """Greedy exact match: the first generated line, stripped, equals the answer, and the line is known to
    be complete (a newline followed, or generation stopped at end of sequence)."""
    line, newline, _ = generated.partition("\n")
    return line.strip() == answer.strip() and (bool(newline) or stopped)


class Loop(NamedTuple):
    """A repeated string found by `find_loop` and the offsets of the occurrences it counted."""

    string: bytes
    starts: tuple[int, ...]


def find_loop(data: bytes, span: int = LOOP_SPAN, repeats: int = LOOP_REPEATS,
              window: int = LOOP_WINDOW) -> Loop | None:
    """The first loop in `data`: a `span`-byte string that occurs `repeats` times, no two occurrences
    overlapping, all inside `window` bytes (from the first one's start to the last one's end); None if
    there is none.

    Occurrences must not overlap so that a repeat means the whole string written again: a run of one byte
    loops once it holds `repeats` × `span` bytes (24 spaces at the defaults), a text of period p ≤ `span`
    once it holds `repeats` full copies of the string, and shorter runs do not count. Code can trip it
    without looping: short lines that begin alike (a newline and the same indent of 7 or more spaces, or
    the same indent and first word) repeat those 8 bytes, so three of them within `window` bytes count.
    "First" is the loop completed earliest: the smallest end of its last occurrence. For that last
    occurrence the earlier ones are taken as late as possible (each the latest at least `span` bytes before
    the next), which spreads them least, so no loop ending there is missed. O(len(data) × window)."""
    if span < 1 or repeats < 1:
        raise ValueError(f"span and repeats must be positive, got span={span}, repeats={repeats}")
    data = bytes(data)
    seen: dict[bytes, list[int]] = {}  # string -> its start offsets so far, increasing
    for last in range(len(data) - span + 1):
        string = data[last : last + span]
        starts = seen.setdefault(string, [])
        starts.append(last)
        chain = [last]
        for k in range(len(starts) - 2, -1, -1):
            start = starts[k]
            if len(chain) == repeats or last + span - start > window:
                break
            if start <= chain[-1] - span:
                chain.append(start)
        if len(chain) == repeats:
            return Loop(string, tuple(reversed(chain)))
    return None


def _joint_logprobs(logits: torch.Tensor, ids: torch.Tensor, boundary: torch.Tensor, filler: int = 0):
    """Per-position log-probabilities of the next byte with its end-of-patch flag.

    Args:
        logits: (b, L, 2·V_b) fused logits; ids: (b, L) byte ids, left-padded (every text ends at L-1);
        boundary: (b, L) bool, the patch ends the model used; filler: bytes appended after each scored text.
    Returns:
        logp (b, L-1, 2·V_b) log-softmax (position t predicts ids[:, t+1]); joint (b, L-1): the fused or
        plain id as the boundaries say, except the last scored byte, whose flag is undecidable and never
        read by a scored byte (folded there); folded (b, L-1): plain + fused.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nxt = ids[:, 1:]
    plain = logp.gather(-1, nxt[..., None])[..., 0]
    fused = logp.gather(-1, (nxt + BYTE_VOCAB_SIZE)[..., None])[..., 0]
    folded = torch.logaddexp(plain, fused)
    joint = torch.where(boundary[:, 1:].bool(), fused, plain)
    joint[:, -1 - filler] = folded[:, -1 - filler]
    return logp, joint, folded


def token_end_boundaries(ends: Sequence[np.ndarray], mask: torch.Tensor) -> torch.Tensor:
    """The source's token ends as patch boundaries of a left-padded batch of bos + text rows.

    Args:
        ends: per row, (n,) bool token ends of its text (`runner.source_segmentation`).
        mask: (b, L) valid bytes of the encoded rows (every text ends at L-1).
    Returns:
        (b, L) bool: each row's ends right-aligned, and its bos a boundary.
    """
    L = mask.shape[1]
    boundary = torch.zeros_like(mask, dtype=torch.bool)
    for row, e in enumerate(ends):  # per text, not per byte
        boundary[row, L - len(e) :] = torch.as_tensor(e, device=mask.device)
        boundary[row, L - len(e) - 1] = True  # bos
    return boundary


class ByteScorer:
    """`score` / `generate` for a ByteliftForCausalLM (its attached tokenizer does the byte ids)."""

    name = "byteified"

    def __init__(self, model: ByteliftForCausalLM, batch_positions: int = DEFAULT_BATCH_POSITIONS,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if model.tokenizer is None:
            raise ValueError("the byte model has no tokenizer attached (load it with from_pretrained)")
        self.model, self.tokenizer = model.eval(), model.tokenizer
        self.batch_positions, self.max_bytes = batch_positions, max_bytes
        self.device = next(model.parameters()).device

    def _encode(self, texts: Sequence[bytes]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "expanded_ids")}

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str | bytes, str | bytes]]) -> list[Scored]:
        """Log-likelihood of each continuation given its context (bos + context + continuation)."""
        items = [(ctx + cont, len(cont)) for ctx, cont in _clipped(pairs, self.max_bytes)]
        results: list[Scored | None] = [None] * len(items)
        filler = self.model.config.boundary_lookahead - 1  # see the module docstring
        for group in _batches([len(t) + 1 + filler for t, _ in items], self.batch_positions):
            batch = self._encode([items[i][0] + LOOKAHEAD_FILLER * filler for i in group])
            out = self.model(**batch)
            ids = batch["input_ids"]  # (b, L), left-padded: every text ends at position L-1
            logp, joint, folded = _joint_logprobs(out.logits, ids, out.boundary_mask, filler)
            end = joint.shape[1] - filler  # joint[:, end-n:end] predicts the n continuation bytes
            nxt = ids[:, 1:]
            # The byte the model would pick: argmax of the folded 256 byte probabilities.
            byte_logp = torch.logaddexp(logp[..., BYTE_OFFSET:BYTE_VOCAB_SIZE], logp[..., BYTE_VOCAB_SIZE + BYTE_OFFSET:])
            hit = (byte_logp.argmax(-1) + BYTE_OFFSET) == nxt
            predicted = out.boundary_mask[:, 1:].cpu().numpy()  # aligned with joint: byte t+1 at t
            for row, i in enumerate(group):
                n = items[i][1]
                span = slice(end - n, end)
                results[i] = Scored(
                    logprob=float(joint[row, span].sum()), logprob_folded=float(folded[row, span].sum()),
                    n_bytes=n, greedy=bool(hit[row, span].all()), boundaries=predicted[row, span].copy(),
                )
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def score_parts(
        self, segmented: Sequence[tuple[bytes, np.ndarray]], source_model=None, start_id: int | None = None
    ) -> dict[str, float]:
        """Where the bits go: total log-likelihood (nats) of texts (after bos) with the source's token ends
        as patch boundaries, fed (a) the teacher's final states as patch outputs (`source_model` given, its
        tokens from the byte tokenizer's source tokenizer, `start_id` first) and (b) the model's own global
        states; with the source prior on, (b) also for the prior alone and the decoder alone.

        Args:
            segmented: (bytes, (n,) bool token ends) per text (`runner.source_segmentation`).
        Returns:
            {"bytes": n, "own_states": ll, ["teacher_states": ll], ["own_states_prior_only": ll,
            "own_states_decoder_only": ll]}, each ll a sum over every text byte (the last one's flag folded).
        """
        totals: dict[str, float] = {"bytes": 0.0}
        src_tok = self.tokenizer.source_tokenizer
        for group in _batches([len(data) + 1 for data, _ in segmented], self.batch_positions):
            batch = self._encode([segmented[i][0] for i in group])
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            B = ids.shape[0]
            boundary = token_end_boundaries([segmented[i][1] for i in group], mask)
            # A position scores only if it and its next byte are real (not bos's left padding).
            scored = mask[:, :-1] & mask[:, 1:]
            parts = {}
            out = self.model(**batch, boundary_mask=boundary)
            parts["own_states"] = out.logits
            if out.prior_logprobs is not None:
                parts["own_states_prior_only"] = out.prior_logprobs
                parts["own_states_decoder_only"] = out.logits - out.prior_logprobs.to(out.logits.dtype)
            if source_model is not None:
                rows = [([] if start_id is None else [int(start_id)]) + src_tok.encode(
                    segmented[i][0].decode("utf-8", "surrogateescape"), add_special_tokens=False) for i in group]
                t_ids = pad_sequence([torch.tensor(r) for r in rows], batch_first=True).to(self.device)
                t_mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
                captured = {}
                base = source_model.base_model
                hook = base.register_forward_hook(lambda mod, a, o: captured.__setitem__("h", o.last_hidden_state))
                try:
                    t_logits = source_model(input_ids=t_ids, attention_mask=t_mask.to(self.device)).logits
                finally:
                    hook.remove()
                h = out.encoder_hidden_states  # the encoder does not depend on the patch outputs
                parts["teacher_states"] = oracle_logits(self.model, h, boundary, mask, ids, captured["h"], t_logits)[0]
            for key, logits in parts.items():
                _, joint, _ = _joint_logprobs(logits, ids, boundary)
                totals[key] = totals.get(key, 0.0) + float(joint[scored].sum())
            totals["bytes"] += float(mask.sum() - B)
        return totals

    def score_decoding(self, texts: Sequence[str | bytes], batch_size: int = DEFAULT_DECODING_BATCH) -> list[Scored]:
        """Log-likelihood of each text after bos under the model as it generates: patches closed by the
        head's flag at the model's decoding threshold (`calibration.decoding_logprobs`). `boundaries` marks
        the bytes that closed a patch; `greedy` is not computed (False)."""
        data = [_as_bytes(t)[: self.max_bytes] for t in texts]
        results: list[Scored | None] = [None] * len(data)
        order = sorted(range(len(data)), key=lambda i: -len(data[i]))  # similar lengths decode together
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            prompts = self._encode([b""] * len(group))  # bos alone
            conts = self._encode([data[i] for i in group])
            # The byte tokenizer left-pads and starts each row with bos: drop bos, pad on the right.
            rows = [ids[valid.bool()][1:] for ids, valid in zip(conts["input_ids"], conts["attention_mask"])]
            right = pad_sequence(rows, batch_first=True, padding_value=PAD_ID)
            d = decoding_logprobs(self.model, prompts["input_ids"], prompts["attention_mask"],
                                  prompts["expanded_ids"], right)
            for row, i in enumerate(group):
                k = int(d.scored[row])
                total = float(d.logprobs[row, :k].sum())
                results[i] = Scored(logprob=total, logprob_folded=total, n_bytes=k, greedy=False,
                                    boundaries=d.flags[row, :k].cpu().numpy())
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_bytes: Sequence[int],
                 stop_at_newline: bool = True) -> list[tuple[str, bool]]:
        """Greedy continuations (stopping at a newline unless told not to); returns (text, stopped_by_eos)
        per prompt."""
        out: list[tuple[str, bool] | None] = [None] * len(prompts)
        lengths = [len(_as_bytes(p)) + m for p, m in zip(prompts, max_new_bytes)]
        for group in _batches(lengths, self.batch_positions):
            batch = self._encode([_as_bytes(prompts[i])[-self.max_bytes:] for i in group])
            res = self.model.generate(
                **batch, max_new_bytes=max(max_new_bytes[i] for i in group),
                stop_strings=["\n"] if stop_at_newline else None, return_dict=True,
            )
            for row, i in enumerate(group):
                n = int(res.num_new_bytes[row])
                ids = res.new_ids[row, :n]
                out[i] = (self.tokenizer.decode(ids.tolist(), skip_special_tokens=True), bool((ids == EOS_ID).any()))
        return out  # type: ignore[return-value]


class SourceScorer:
    """`score` / `generate` for the source causal LM and its tokenizer.

    Sequences start with the token the byte model's bos maps to (what the stage-1 teacher saw); context and
    continuation are tokenised separately (context tokens, then continuation tokens), as evaluation
    harnesses do, so a continuation's tokens are exactly its own bytes."""

    name = "source"

    def __init__(self, model, tokenizer, start_id: int | None, batch_positions: int = DEFAULT_BATCH_POSITIONS,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.start = [] if start_id is None else [int(start_id)]
        self.batch_positions, self.max_bytes = batch_positions, max_bytes
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def for_byte_model(cls, source_model, byte_model: ByteliftForCausalLM, **kwargs) -> SourceScorer:
        tok = byte_model.tokenizer
        return cls(source_model, tok.source_tokenizer, tok.special_to_source.get(BOS_ID), **kwargs)

    def _ids(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False) if text else []

    def _padded(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for k, r in enumerate(rows):
            sl = slice(L - len(r), L) if left else slice(0, len(r))
            ids[k, sl] = torch.tensor(r, dtype=torch.long)
            mask[k, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str | bytes, str | bytes]]) -> list[Scored]:
        items = []
        for ctx, cont in _clipped(pairs, self.max_bytes):
            c = self._ids(cont)
            items.append((self.start + self._ids(ctx) + c, len(c), len(cont)))
        results: list[Scored | None] = [None] * len(items)
        for group in _batches([len(t) for t, _, _ in items], self.batch_positions):
            ids, mask = self._padded([items[i][0] for i in group], left=False)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt = ids[:, 1:]
            lp = logp.gather(-1, tgt[..., None])[..., 0]
            hit = logp.argmax(-1) == tgt
            for row, i in enumerate(group):
                tokens, n_tok, n_bytes = items[i]
                span = slice(len(tokens) - 1 - n_tok, len(tokens) - 1)
                value = float(lp[row, span].sum())
                results[i] = Scored(value, value, n_bytes, bool(hit[row, span].all()))
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_bytes: Sequence[int],
                 stop_at_newline: bool = True) -> list[tuple[str, bool]]:
        """Greedy continuations, at most as many tokens as bytes asked for (a token holds ≥ 1 byte),
        stopping after the token that makes a newline unless told not to; (text, stopped_by_eos) per
        prompt."""
        encoded = [self.start + self._ids(_as_bytes(p)[-self.max_bytes:]) for p in prompts]
        out: list[tuple[str, bool] | None] = [None] * len(prompts)
        eos = self.tokenizer.eos_token_id
        for group in _batches([len(e) + m for e, m in zip(encoded, max_new_bytes)], self.batch_positions):
            ids, mask = self._padded([encoded[i] for i in group], left=True)
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(max_new_bytes[i] for i in group),
                pad_token_id=self.pad_id, eos_token_id=eos,
                stop_strings=["\n"] if stop_at_newline else None, tokenizer=self.tokenizer,
            )
            for row, i in enumerate(group):
                new = gen[row, ids.shape[1]:].tolist()
                stopped = eos is not None and eos in new
                if stopped:
                    new = new[: new.index(eos)]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                out[i] = (text, stopped)
        return out  # type: ignore[return-value]


def bits_per_byte(scored: Sequence[Scored], folded: bool = False) -> float:
    """−Σ log2 p / Σ bytes over the scored continuations."""
    n = sum(s.n_bytes for s in scored)
    total = sum(s.logprob_folded if folded else s.logprob for s in scored)
    return -total / math.log(2) / max(n, 1)
