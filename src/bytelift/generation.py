"""Byte-level generation, the public API: `generate` and `stream` (DESIGN §3, spec §5.4). The decoding itself
(prefill, cached per-byte steps, batching rows at different patch positions) is `bytelift.decoding`; the
decoding threshold's calibration is in `bytelift.calibration`, the text streamers in `bytelift.streaming`.

Shapes: B batch, L prompt bytes (left-padded), V_b = 260 byte-side ids, 2·V_b = 520 fused outputs
(id k + V_b = "symbol k, and it ends a patch").

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
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from bytelift.decoding import DEFAULT_GLOBAL_SYNC, DecodingSession
from bytelift.streaming import MarkerFilter
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE, EOS_ID, FILLER_ID, PAD_ID, fuse

# Default number of new bytes (≈ 16 source tokens of English).
DEFAULT_MAX_NEW_BYTES = 64
# Special ids that generation never emits (EOS is governed by `eos`).
NEVER_GENERATED = (PAD_ID, BOS_ID, FILLER_ID)


@dataclass
class GenerateOutput:
    """Result of `generate(..., return_dict=True)`.

    sequences: (B, L + T) the prompt as given (left-padded) followed by the new byte ids (un-fused;
        eos included when it stopped the row), right-padded with PAD_ID; T = the longest row's new bytes.
    new_ids: (B, T) the new byte ids alone, right-padded with PAD_ID.
    num_new_bytes: (B,) new ids per row (the forced prompt bytes are prompt, not new).
    boundaries: (B, T) bool, new byte t closed a patch.
    prompt_boundaries: (B, L) bool, the prompt's boundaries (predictor; the last `boundary_lookahead` bytes'
        by the head).
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
        B = input_ids.shape[0]
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
            if max_patch_bytes is not None:
                if max_patch_bytes < 1:
                    raise ValueError(f"max_patch_bytes must be >= 1, got {max_patch_bytes}")
                session.count_patch_bytes = True

            while True:
                logits, ready = session.step(symbols)
                byte, flag = choose_symbols(logits, banned, processors, history, do_sample, generators, boundary_bias,
                                            ready)
                if max_patch_bytes is not None:  # a patch reaching max_patch_bytes closes at its last byte
                    flag |= session.open_patch_bytes() + 1 >= max_patch_bytes
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