"""A bytelift model inside EleutherAI's lm-evaluation-harness (`lm_eval`, the `eval` extra).

Importing this module registers the model `bytelift` with the harness:

    import bytelift.evaluation.harness
    lm_eval.simple_evaluate(model="bytelift", model_args={"pretrained": "runs/job"}, tasks=[...])

and `python -m bytelift.evaluation.harness ARGS` is the harness's own command line with it registered
(`... run --model bytelift --model_args pretrained=runs/job --tasks hellaswag`). The harness's `hf` model
cannot score a byte model: its logits are 520 fused byte/boundary outputs, not a token vocabulary.

The three request types, on the model's bytes (UTF-8 of the harness's strings):
- `loglikelihood`: `ByteScorer.score`, the likelihood `bytelift eval` reports (the joint of the bytes and
  the predictor's patch ends, bos first, the context cut from the left to `max_length` bytes); is_greedy:
  every continuation byte was the argmax of the folded byte distribution. Batched by positions
  (`batch_positions`), longest first.
- `loglikelihood_rolling`: the harness's rolling windows (`lm_eval.utils.get_rolling_token_windows`) over
  bytes, each window scored as above: a text of fewer than `max_length` bytes is one window, the held-out
  bits per byte of `bytelift eval`.
- `generate_until`: `model.generate`, batched by `batch_size` rows (requests grouped by their generation
  arguments, as the harness's own models do); `max_gen_toks` counts bytes; `until` stops a row and cuts
  the text at the first stop string (the model's stop test also sees the prompt's tail, so a stop string
  that begins inside the prompt stops too); greedy unless `do_sample`, then temperature / top_k / top_p /
  repetition_penalty; the patch decisions use the decoding threshold (`decode_boundary_bias`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

# Importing lm_eval.models registers the harness's own models (`hf`, ...) first: `get_model` imports it
# only while the registry is empty, so registering `bytelift` before it would hide them.
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from bytelift.evaluation.scoring import (
    DEFAULT_BATCH_POSITIONS,
    DEFAULT_DECODING_BATCH,
    DEFAULT_MAX_BYTES,
    ByteScorer,
)
from bytelift.modeling import ByteliftForCausalLM, check_model_folder

MODEL_NAME = "bytelift"
# The harness's own default for `max_gen_toks`, read as bytes.
DEFAULT_MAX_GEN_BYTES = 256
# Generation arguments `generate_until` passes on to `model.generate` (after `normalize_gen_kwargs` has
# taken `until` and `max_gen_toks`); any other one is refused rather than silently ignored.
GENERATION_ARGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
# Rolling windows: a placeholder for the harness's prefix token (bos), which the scorer adds itself.
_PREFIX = -1


def _utf8(text: str) -> bytes:
    """The harness's strings as the model's bytes (lone surrogates from undecodable bytes map back)."""
    return text.encode("utf-8", "surrogateescape")


def _torch_dtype(dtype) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)")
    return value


def rolling_windows(data: bytes, max_bytes: int) -> list[tuple[bytes, bytes]]:
    """(context, continuation) pairs that score every byte of `data` once, as the harness's rolling windows
    of `max_bytes` - 1 predicted bytes after one byte of context (the first window after bos alone), so
    that context + continuation fit in `max_bytes`."""
    if max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2, got {max_bytes}")
    windows = get_rolling_token_windows(token_list=list(data), prefix_token=_PREFIX, max_seq_len=max_bytes - 1,
                                        context_len=1)
    out = []
    for context, continuation in map(make_disjoint_window, windows):
        out.append((bytes(b for b in context if b != _PREFIX), bytes(continuation)))
    return out


@register_model(MODEL_NAME)
class ByteliftLM(LM):
    """lm_eval model for a saved bytelift model (`pretrained`: its folder, or a loaded model).

    Args (all can come from the harness's `--model_args`):
        pretrained: a bytelift model folder (`bytelift convert --output`), or a ByteliftForCausalLM.
        batch_size: rows generated together (`generate_until`); "auto" or None: DEFAULT_DECODING_BATCH.
        batch_positions: scoring batches hold at most this many positions (rows × longest row).
        device: torch device (default: cuda when available, else cpu); dtype: float32 (default: as
            saved), bfloat16, float16.
        decode_boundary_bias: the decoding threshold for generation (default: the model's calibrated one).
        max_length: bytes a scored or generated sequence may hold (contexts are cut from the left).
        max_gen_toks: new bytes when a request gives no `max_gen_toks`.
        seed: seeds sampling (each row its own generator; see `generate`); None: torch's global RNG.
        max_batch_size: accepted because the harness passes it to every model; unused.
    """

    def __init__(self, pretrained: str | os.PathLike | ByteliftForCausalLM, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str | None = None,
                 decode_boundary_bias: float | None = None, max_length: int = DEFAULT_MAX_BYTES,
                 batch_positions: int = DEFAULT_BATCH_POSITIONS, max_gen_toks: int = DEFAULT_MAX_GEN_BYTES,
                 seed: int | None = None):
        super().__init__()
        if batch_size in (None, "auto"):
            batch_size = DEFAULT_DECODING_BATCH
        self.batch_size = int(batch_size)
        self.max_length, self.max_gen_toks, self.seed = int(max_length), int(max_gen_toks), seed
        if self.batch_size < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"batch_size and max_gen_toks must be positive and max_length at least 2, got "
                             f"{self.batch_size}, {self.max_gen_toks}, {self.max_length}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(pretrained, ByteliftForCausalLM):
            model = pretrained
        else:
            check_model_folder(pretrained)
            model = ByteliftForCausalLM.from_pretrained(pretrained, dtype=_torch_dtype(dtype) or "auto")
        if model.tokenizer is None:
            raise ValueError(f"{pretrained} has no byte tokenizer (tokenizer_config.json)")
        self.model = model.to(device).eval()
        if decode_boundary_bias is not None:
            self.model.config.decode_boundary_bias = float(decode_boundary_bias)
        self.scorer = ByteScorer(self.model, batch_positions=int(batch_positions), max_bytes=self.max_length)
        self._device = torch.device(device)

    def get_model_info(self) -> dict:
        """What the harness records about the model in its results."""
        return {"model_dtype": str(next(self.model.parameters()).dtype),
                "decode_boundary_bias": float(self.model.config.decode_boundary_bias),
                "source": self.model.config.source_name_or_path}

    def _score(self, pairs: Sequence[tuple[bytes, bytes]], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) per pair, longest first in batches of one forward pass each (so the
        progress bar moves per batch); an empty continuation has log-likelihood 0."""
        lengths = [min(len(c) + len(x), self.max_length) + 1 for c, x in pairs]
        order = sorted((i for i, (_, x) in enumerate(pairs) if x), key=lambda i: -lengths[i])
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm)
        bar.update(len(pairs) - len(order))
        start = 0
        while start < len(order):
            group = order[start : start + max(1, self.scorer.batch_positions // lengths[order[start]])]
            for i, s in zip(group, self.scorer.score([pairs[i] for i in group])):
                out[i] = (s.logprob, s.greedy)
            bar.update(len(group))
            start += len(group)
        bar.close()
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [req.args[:2] for req in requests]
        results = self._score([(_utf8(c), _utf8(x)) for c, x in args], "bytelift loglikelihood", disable_tqdm)
        for a, r in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", a, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        owner, pairs = [], []
        for i, req in enumerate(requests):
            for pair in rolling_windows(_utf8(req.args[0]), self.max_length):
                owner.append(i)
                pairs.append(pair)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(pairs, "bytelift loglikelihood_rolling", disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """The harness's generation arguments -> (until, max new bytes, `generate` keyword arguments)."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = [u for u in kwargs.pop("until") if u]
        max_new = int(kwargs.pop("max_gen_toks"))
        unknown = sorted(set(kwargs) - set(GENERATION_ARGS))
        if unknown:
            raise ValueError(f"generation argument(s) {', '.join(unknown)} are not supported by the bytelift model "
                             f"(supported: until, max_gen_toks, {', '.join(GENERATION_ARGS)})")
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_new} bytes) must be below max_length ({self.max_length} bytes)")
        if not kwargs.get("do_sample"):
            kwargs = {"do_sample": False}  # greedy: the sampling arguments do not apply
        elif kwargs.get("temperature") == 0.0:
            raise ValueError("do_sample=True needs a temperature above 0")
        kwargs.setdefault("seed", self.seed)
        return until, max_new, kwargs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args[:2] for req in requests]
        for _, gen_kwargs in args:  # refuse bad arguments before any row is generated
            self._generation_kwargs(gen_kwargs)
        collator = Collator(args, sort_fn=lambda a: (-len(_utf8(a[0])), a[0]), group_by="gen_kwargs",
                            group_fn=lambda a: a[1])
        texts = []
        bar = tqdm(total=len(args), desc="bytelift generate_until", disable=disable_tqdm)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            until, max_new, kwargs = self._generation_kwargs(all_kwargs[0])
            keep = self.max_length - max_new
            prompts = [_utf8(c)[-keep:] for c in contexts]
            with torch.inference_mode():
                out = self.model.generate(prompts, max_new_bytes=max_new, stop_strings=until or None,
                                          return_dict=True, **kwargs)
            for context, gen_kwargs, text in zip(contexts, all_kwargs, out.texts):
                text = postprocess_generated_text(text, until, None)
                texts.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(texts)


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
