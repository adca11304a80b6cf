"""What a training run or a conversion checks before it spends time or writes anything.

    corpus = read_training_corpus(["book.txt"], options, weights=None)    # every file read and split
    tokenizer = check_model_input(stage=1, source="smollm2-135m", init_from=None)
    checked = check_corpus(corpus, tokenizer, window_tokens=128, batch_size=4)
    print("\\n".join(checked.lines))        # documents and bytes per source, the split, tokens

Everything the user's input can make fail, fails here, as a ``UsageError`` with one line saying how to fix
it, cheapest first: the output folder (``check_train_output``; a conversion checks its own in
``bytelift.convert``); the corpus (every path and file read, the held-out split made:
``corpus_reading.read_corpus``); the source model (its config, its weights' headers and its tokenizer:
``sources.check_source``) or the stage-1 model folder, and model overrides; whether the corpus holds enough
training and held-out text for the run.

Enough text (token counts estimated from the bytes at the source tokenizer's rate on a sample):
- training: ``MIN_TRAIN_BATCHES`` batches of distinct windows. With fewer, every step sees a large share
  of the whole corpus and the run learns it by heart whatever its budget; more text than one pass needs
  is never required (runs repeat their text), and a run of fixed steps is told how often it will read it;
- held-out: one window (the training run's evaluation reads windows of held-out text; the conversion's
  evaluation scores held-out documents).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bytelift.checks import UsageError, folder_is_empty, model_folder, output_folder, usage_errors
from bytelift.corpus_reading import CorpusStats, SplitCorpus, format_bytes, read_corpus

# Training text must hold at least this many batches of distinct windows (module docstring).
MIN_TRAIN_BATCHES = 8
# Bytes of training text tokenized to measure the source tokenizer's bytes per token (a fast tokenizer
# reads ~2.6 MB/s on one core: ~0.1 s).
TOKEN_SAMPLE_BYTES = 256 * 1024


@dataclass
class CorpusCheck:
    """A corpus as checked: its reading stats (per source), token estimates and the lines to print."""

    stats: CorpusStats
    bytes_per_token: float
    train_tokens: int
    heldout_tokens: int
    lines: list[str]


def check_model_input(stage: int, source: str | None, init_from: str | None):
    """The source tokenizer of a run: stage 1 checks its source model (``sources.check_source``), stage 2
    its stage-1 model folder (and the source tokenizer saved with it). Raises UsageError."""
    if stage == 1:
        from bytelift.sources import check_source

        return check_source(source)
    if not init_from:
        raise UsageError("stage 2 starts from a stage-1 model: pass --init-from (init_from)")
    model_folder(init_from)
    from bytelift.tokenization import ByteTokenizer

    try:
        tokenizer = ByteTokenizer.from_pretrained(init_from).source_tokenizer
    except Exception as err:
        raise UsageError(f"cannot load the byte tokenizer of {init_from}: {' '.join(str(err).split())}") from err
    if tokenizer is None:
        raise UsageError(f"{init_from} has no source tokenizer (source_tokenizer/): it cannot cut training windows")
    return tokenizer


def check_model_overrides(source: str, tokenizer, overrides: dict[str, Any]) -> None:
    """ByteliftConfig overrides of a stage-1 run (``model``): known fields with values the source allows
    (e.g. heads that divide the local width), checked on the source's config without building the model."""
    if not overrides:
        return
    from bytelift.configuration import ByteliftConfig, unknown_options
    from bytelift.sources import load_source_config

    unknown = unknown_options(overrides)
    if unknown:
        raise UsageError(f"unknown model option(s) {unknown}: the options are ByteliftConfig's fields")
    with usage_errors():
        ByteliftConfig(source_config=load_source_config(source).to_dict(), subword_vocab_size=len(tokenizer) + 1,
                       **overrides)


def _bytes_per_token(texts: Sequence[str], tokenizer) -> float:
    """UTF-8 bytes per source token over a sample of ``texts`` spread over the corpus."""
    if not texts:
        return 4.0
    sample, size = [], 0
    for i in np.linspace(0, len(texts) - 1, min(len(texts), 256)).round().astype(int):
        text = texts[int(i)][: TOKEN_SAMPLE_BYTES // 8]  # a few characters' share of the sample each
        sample.append(text)
        size += len(text.encode("utf-8", "surrogatepass"))
        if size >= TOKEN_SAMPLE_BYTES:
            break
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"])
    return size / max(tokens, 1)


def read_training_corpus(data: Sequence[str], options: dict[str, Any], weights: Sequence[float] | None) -> SplitCorpus:
    """The corpus read and split as the run will read it (``corpus_reading.read_corpus``): first of the
    checks, as every file's problems are the user's and cost no model loading. Raises UsageError."""
    if not data:
        raise UsageError("no training data: pass at least one file or folder (--data)")
    return read_corpus(list(data), weights=weights, **options)


def check_corpus(
    corpus: SplitCorpus,
    tokenizer,
    *,
    window_tokens: int,
    batch_size: int,
    steps: dict[str, int] | None = None,
    need_heldout: bool = True,
    heldout_hint: str = "raise --heldout-fraction",
) -> CorpusCheck:
    """Check that a corpus (``read_training_corpus``) holds enough text for the run (module docstring).

    Args:
        tokenizer: the source tokenizer (token counts are estimated at its bytes per token on a sample).
        steps: {"stage 1": steps, ...} of a run of fixed steps: the lines say how often each reads the text.
        need_heldout: the run evaluates on held-out text (it must hold one window).
    Raises:
        UsageError: too little text, saying how much is needed.
    """
    stats = corpus.stats
    rate = _bytes_per_token(corpus.train, tokenizer)
    train_bytes = sum(s.train_bytes for s in stats.sources)
    heldout_bytes = sum(s.heldout_bytes for s in stats.sources)
    train_tokens, heldout_tokens = int(train_bytes / rate), int(heldout_bytes / rate)
    need = MIN_TRAIN_BATCHES * batch_size * window_tokens
    if train_tokens < need:
        raise UsageError(
            f"too little training text: {format_bytes(train_bytes)}, about {train_tokens:,} tokens of the source "
            f"tokenizer; this run needs at least {need:,} tokens (about {format_bytes(need * rate)}): "
            f"{MIN_TRAIN_BATCHES} batches of {batch_size} windows of {window_tokens} tokens. Give more text, or lower "
            "--batch-size or --window-tokens"
        )
    if need_heldout and heldout_tokens < window_tokens:
        raise UsageError(
            f"too little held-out text: {format_bytes(heldout_bytes)}, about {heldout_tokens:,} tokens; the "
            f"evaluation needs at least one window of {window_tokens} tokens (about {format_bytes(window_tokens * rate)}). "
            f"Give more text, or {heldout_hint}"
        )
    windows = train_tokens // window_tokens
    lines = stats.report_lines() + [
        f"  training text ≈ {train_tokens:,} tokens ({rate:.2f} bytes/token): {windows:,} windows of {window_tokens} "
        f"tokens; held-out ≈ {heldout_tokens:,} tokens"
    ]
    for name, n in (steps or {}).items():
        reads = n * batch_size
        lines.append(f"  {name}: {n:,} steps read {reads:,} windows, the training text {reads / max(windows, 1):.1f} times")
    return CorpusCheck(stats, rate, train_tokens, heldout_tokens, lines)


def check_train_output(output: str | os.PathLike, resume: bool) -> Path:
    """The output folder of ``bytelift train``: a folder (or creatable), and not holding an earlier run
    unless resuming (a resumed run that never saved a checkpoint starts afresh)."""
    path = output_folder(output)
    if resume or folder_is_empty(path):
        return path
    held = [p.name for p in sorted(path.iterdir())
            if p.name.startswith("checkpoint-") or p.name in ("config.json", "train_metrics.json")]
    if held:
        raise UsageError(
            f"{path} holds a training run ({', '.join(held[:3])}): continue it with --resume, or choose another --output"
        )
    return path


def check_training_run(cfg, log=print) -> CorpusCheck | None:
    """Everything ``training.train`` checks before it writes anything: the output folder, the source or
    stage-1 model, the corpus and its split (its report logged per source, with the text it holds for the
    run). ``cfg`` is a ``TrainConfig``. A streamed corpus is too large to read up front: only its paths and
    first documents are checked (None is returned)."""
    from bytelift.corpus_reading import corpus_options, load_corpus

    check_train_output(cfg.output, cfg.resume)
    if cfg.streaming:
        if not cfg.data:
            raise UsageError("no training data: pass at least one file or folder (--data)")
        load_corpus(cfg.data, split=None, streaming=True, **corpus_options(cfg))
        corpus = None
    else:
        corpus = read_training_corpus(cfg.data, corpus_options(cfg), cfg.data_weights)
    tokenizer = check_model_input(cfg.stage, cfg.source, cfg.init_from)
    if cfg.stage == 1:
        check_model_overrides(cfg.source, tokenizer, cfg.model)
    if corpus is None:
        return None
    checked = check_corpus(
        corpus, tokenizer, window_tokens=cfg.window_tokens, batch_size=cfg.batch_size * cfg.grad_accum,
        steps={f"stage {cfg.stage}": cfg.max_steps} if cfg.max_steps else None, need_heldout=cfg.heldout_fraction > 0,
        heldout_hint="raise heldout_fraction, or set heldout_fraction=0 to train without evaluation",
    )
    for line in checked.lines:
        log(line)
    return checked
