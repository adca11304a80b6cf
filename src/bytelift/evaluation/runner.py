"""`bytelift eval`: every figure for the byteified model and its source, side by side, on the same bytes.

    results = evaluate(byte_model, source_model, EvalConfig(data=["corpus/"]))
    write_report(results, "report/")          # report.json, report.md, PNG plots

Sections (each optional through its item count):
- held-out text: bits per byte (see `scoring` for why the joint, not the folded, likelihood is the
  headline) and their ratio; the predictor's boundary precision/recall/F1 against the source tokenizer and
  mean bytes per patch vs bytes per token, on the same bytes; the same bytes scored as generation
  segments them (the head's flags at the model's decoding threshold): bits per byte and bytes per patch;
- LAMBADA: bits per byte of the last word and greedy last-word accuracy;
- HellaSwag: acc_norm (log-likelihood per byte of each ending);
- character suite: `basic_skills_string_operations` and CUTE-style tasks, greedy exact match;
- loops: greedy continuations of the sample prompts by both models, each checked for a loop (`find_loop`:
  an 8-byte string 3 times within 64 bytes), and how many prompts loop for each model (the byteified model
  should loop on no more of them than its source).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bytelift.corpus_reading import corpus_options
from bytelift.evaluation import tasks as T
from bytelift.evaluation.scoring import (
    LOOP_REPEATS,
    LOOP_SPAN,
    LOOP_WINDOW,
    ByteScorer,
    Scored,
    SourceScorer,
    bits_per_byte,
    find_loop,
    first_line_match,
)
from bytelift.objectives import precision_recall_f1
from bytelift.tokenization import BOS_ID, BYTE_OFFSET


@dataclass
class EvalConfig:
    """Item counts and inputs. Defaults finish in about 9 minutes on 2 CPU cores for SmolLM2 + its
    byteified model (`bytelift eval` prints each section's time)."""

    data: list[str] = field(default_factory=list)  # held-out text: corpus paths (their held-out split)
    heldout_fraction: float = 0.01  # must match the training run's split
    # how the corpus is read: as in training (TrainConfig's fields of the same names), so the split matches
    text_field: str = "text"
    text_suffixes: list[str] = field(default_factory=lambda: [".txt"])
    encoding_errors: str = "strict"
    heldout_docs: int = 16
    heldout_bytes: int = 1024  # each held-out document is cut to this many bytes
    # Also score the held-out bytes as decoding segments them (the head's flags; ~1 min for SmolLM2).
    heldout_decoding: bool = True
    # 200 items each: enough to tell a model at 90% of its source's accuracy from one at 70% (binomial
    # standard error ≈ 0.03 at accuracy 0.4); ~1.5 and ~4.5 min for SmolLM2 + its byte model on 2 cores
    lambada: int = 200
    hellaswag: int = 200
    cute_per_task: int = 4  # × 14 tasks
    cute_shots: int = T.DEFAULT_SHOTS
    basic_skills: int = 20
    loop_prompts: tuple[str, ...] = T.SAMPLE_PROMPTS  # continued greedily by both models, checked for loops
    loop_bytes: int = 128  # new bytes per continuation (the source: its first this many bytes); 0 skips
    seed: int = 0
    batch_positions: int = 8192

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pair(byte_value: Any, source_value: Any) -> dict[str, Any]:
    return {"byteified": byte_value, "source": source_value}


def source_segmentation(tokenizer, text: str) -> tuple[bytes, np.ndarray] | None:
    """The bytes the source tokenizer reads for `text` and its token ends there: (bytes, (n,) bool).
    None when the tokenisation contains special tokens (their bytes are not text)."""
    ids = tokenizer.source_tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        return None
    byte_ids, lengths = tokenizer.source_bytes_and_patches(ids)
    if (byte_ids < BYTE_OFFSET).any():
        return None
    ends = np.zeros(len(byte_ids), dtype=bool)
    ends[np.cumsum(lengths) - 1] = True
    return bytes((byte_ids - BYTE_OFFSET).astype(np.uint8).tolist()), ends


def boundary_agreement(predicted: list[np.ndarray], gold: list[np.ndarray]) -> dict[str, float]:
    """Precision/recall/F1 of predicted patch ends against source token ends, per-byte accuracy of the
    end/not-end decision (the figure Bolmo reports for its predictor), and bytes per patch/token.

    Each pair of (n,) bool arrays covers one text; its last byte ends both a patch and a token by
    definition (the predictor cannot decide it; `ByteScorer.score` appends filler so that it decides all the
    others whatever its lookahead), so it is left out of P/R/F1 and counted as one patch and one token."""
    tp = n_pred = n_gold = agree = 0
    patches = tokens = n_bytes = 0
    for p, g in zip(predicted, gold):
        p, g = p[:-1].astype(bool), g[:-1].astype(bool)
        tp += int((p & g).sum())
        agree += int((p == g).sum())
        n_pred += int(p.sum())
        n_gold += int(g.sum())
        patches += int(p.sum()) + 1
        tokens += int(g.sum()) + 1
        n_bytes += len(p) + 1
    scores = {k.removeprefix("boundary_"): v for k, v in precision_recall_f1(tp, n_pred, n_gold).items()}
    decided = n_bytes - len(predicted)
    return {**scores, "accuracy": agree / max(decided, 1),
            "bytes_per_patch": n_bytes / max(patches, 1), "bytes_per_token": n_bytes / max(tokens, 1)}


def choice_accuracy(scored: list[list[Scored]], gold: list[int]) -> dict[str, float]:
    """acc (highest log-likelihood) and acc_norm (highest log-likelihood per byte)."""
    acc = np.mean([int(np.argmax([s.logprob for s in row])) == g for row, g in zip(scored, gold)])
    norm = np.mean([int(np.argmax([s.logprob / s.n_bytes for s in row])) == g for row, g in zip(scored, gold)])
    return {"acc": float(acc), "acc_norm": float(norm)}


def default_heldout_data(cache: Path | None = None) -> list[str]:
    """The default corpus (built once into the bytelift cache): what `bytelift convert` trains on."""
    from bytelift.corpus import build_default_corpus
    from bytelift.sources import cache_dir

    return [str(build_default_corpus((cache or cache_dir()) / "corpus"))]


def evaluate(
    model,
    source_model,
    cfg: EvalConfig | None = None,
    log: Callable[[str], None] = print,
    heldout: list[str] | None = None,
) -> dict[str, Any]:
    """Run every section with item count > 0 on both models; returns the results dict of the report.
    `heldout`: the held-out documents when the caller has read them already (`heldout_documents(cfg)`,
    e.g. to refuse a corpus without held-out text before loading any model); read here otherwise."""
    cfg = cfg or EvalConfig()
    byte = ByteScorer(model, batch_positions=cfg.batch_positions)
    source = SourceScorer.for_byte_model(source_model, model, batch_positions=cfg.batch_positions)
    tok = model.tokenizer
    results: dict[str, Any] = {"config": cfg.to_dict(), "seconds": {}, "items": {}}
    sections = [
        ("heldout", cfg.heldout_docs), ("lambada", cfg.lambada), ("hellaswag", cfg.hellaswag),
        ("characters", cfg.cute_per_task + cfg.basic_skills),
        ("loops", len(cfg.loop_prompts) if cfg.loop_bytes > 0 else 0),
    ]
    bar = tqdm([s for s, n in sections if n > 0], desc="evaluating", unit="section")
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        run = functools.partial(_eval_heldout, texts=heldout) if name == "heldout" else SECTIONS[name]
        results[name] = run(byte, source, tok, cfg, results["items"])
        results["seconds"][name] = round(time.perf_counter() - start, 1)
        log(f"{name}: {summary_line(name, results[name])} ({results['seconds'][name]} s)")
    return results


def heldout_documents(cfg: EvalConfig) -> list[str]:
    """The held-out documents the held-out section scores (`cfg.data`'s held-out split, or the default
    corpus's), each cut to `cfg.heldout_bytes`; empty when the corpus holds none."""
    return T.heldout_texts(cfg.data or default_heldout_data(), cfg.heldout_docs, cfg.heldout_bytes,
                           **corpus_options(cfg))


def _eval_heldout(
    byte: ByteScorer, source: SourceScorer, tok, cfg: EvalConfig, items: dict, texts: list[str] | None = None
) -> dict[str, Any]:
    texts = heldout_documents(cfg) if texts is None else texts
    if not texts:
        raise ValueError(f"no held-out documents in {cfg.data or 'the default corpus'} "
                         f"(held-out fraction {cfg.heldout_fraction})")
    segmented = [s for s in (source_segmentation(tok, t) for t in texts) if s is not None]
    pairs = [(b"", data) for data, _ in segmented]
    items["heldout"] = len(pairs)
    b, s = byte.score(pairs), source.score(pairs)
    bpb_b, bpb_s = bits_per_byte(b), bits_per_byte(s)
    out = {
        "bits_per_byte": _pair(bpb_b, bpb_s),
        "bits_per_byte_folded": _pair(bits_per_byte(b, folded=True), bpb_s),
        "bits_per_byte_ratio": bpb_b / bpb_s if bpb_s else float("nan"),
        "bytes": sum(x.n_bytes for x in b),
        "boundaries": boundary_agreement([x.boundaries for x in b], [ends for _, ends in segmented]),
    }
    # Where the bits go (the source's token ends as boundaries): the teacher's states vs the model's own,
    # and with the source prior the prior alone and the decoder alone.
    parts = byte.score_parts(segmented, source.model, tok.special_to_source.get(BOS_ID))
    n = parts.pop("bytes")
    out["bits_per_byte_parts"] = {k: -v / math.log(2) / max(n, 1) for k, v in parts.items()}
    if cfg.heldout_decoding:
        # The same bytes scored as generation segments them: patches closed by the head, not the predictor.
        d = byte.score_decoding([cont for _, cont in pairs])
        agreement = boundary_agreement([x.boundaries for x in d], [ends[: x.n_bytes] for x, (_, ends) in zip(d, segmented)])
        out["decoding"] = {
            "bits_per_byte": bits_per_byte(d),
            "bytes_per_patch": agreement["bytes_per_patch"],
            "boundary_f1": agreement["f1"],
            "boundary_bias": float(byte.model.config.decode_boundary_bias),
        }
    return out


def _eval_lambada(byte: ByteScorer, source: SourceScorer, tok, cfg: EvalConfig, items: dict) -> dict[str, Any]:
    pairs = T.lambada_items(cfg.lambada)
    items["lambada"] = len(pairs)
    b, s = byte.score(pairs), source.score(pairs)
    return {
        "bits_per_byte": _pair(bits_per_byte(b), bits_per_byte(s)),
        "accuracy": _pair(float(np.mean([x.greedy for x in b])), float(np.mean([x.greedy for x in s]))),
    }


def _eval_hellaswag(byte: ByteScorer, source: SourceScorer, tok, cfg: EvalConfig, items: dict) -> dict[str, Any]:
    docs = T.hellaswag_items(cfg.hellaswag)
    items["hellaswag"] = len(docs)
    pairs = [(d.context, c) for d in docs for c in d.choices]
    out = {}
    for name, scorer in (("byteified", byte), ("source", source)):
        flat = scorer.score(pairs)
        rows, k = [], 0
        for d in docs:
            rows.append(flat[k : k + len(d.choices)])
            k += len(d.choices)
        out[name] = choice_accuracy(rows, [d.gold for d in docs])
    return {"acc_norm": _pair(out["byteified"]["acc_norm"], out["source"]["acc_norm"]),
            "acc": _pair(out["byteified"]["acc"], out["source"]["acc"])}


def _eval_characters(byte: ByteScorer, source: SourceScorer, tok, cfg: EvalConfig, items: dict) -> dict[str, Any]:
    suite = []
    if cfg.cute_per_task > 0:
        suite += T.cute_items(cfg.cute_per_task, shots=cfg.cute_shots, seed=cfg.seed)
    if cfg.basic_skills > 0:
        suite += T.basic_skills_items(cfg.basic_skills)
    items["characters"] = len(suite)
    prompts = [it.prompt for it in suite]
    # " answer" then a newline: enough bytes to see that the answer line is complete.
    budget = [len(it.answer.encode()) + 2 for it in suite]
    correct: dict[str, dict[str, list[bool]]] = {}
    examples: dict[str, list] = {}
    for name, scorer in (("byteified", byte), ("source", source)):
        outputs = scorer.generate(prompts, budget)
        for it, (text, stopped) in zip(suite, outputs):
            correct.setdefault(it.task, {}).setdefault(name, []).append(first_line_match(text, it.answer, stopped))
            if len(examples.setdefault(f"{it.task}/{name}", [])) < 2:
                examples[f"{it.task}/{name}"].append({"prompt_tail": it.prompt[-80:], "answer": it.answer,
                                                      "output": text.partition("\n")[0]})
    per_task = {t: {m: float(np.mean(v)) for m, v in d.items()} for t, d in correct.items()}
    mean = {m: float(np.mean([per_task[t][m] for t in per_task])) for m in ("byteified", "source")}
    return {"tasks": per_task, "mean": mean, "examples": examples}


def _eval_loops(byte: ByteScorer, source: SourceScorer, tok, cfg: EvalConfig, items: dict) -> dict[str, Any]:
    """Greedy continuations of `loop_prompts`, past newlines, and the loop `find_loop` sees in each. The
    source generates `loop_bytes` tokens and is judged, like the byteified model, on at most `loop_bytes`
    bytes (either may stop earlier at end of sequence)."""
    prompts = list(cfg.loop_prompts)
    items["loops"] = len(prompts)
    samples: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    looping = {}
    for name, scorer in (("byteified", byte), ("source", source)):
        outputs = scorer.generate(prompts, [cfg.loop_bytes] * len(prompts), stop_at_newline=False)
        for sample, (text, _) in zip(samples, outputs):
            # The decoded text (invalid bytes read as U+FFFD by both tokenizers, so valid UTF-8): its first
            # loop_bytes bytes, less a character the cut would split, so the report's text is what was judged.
            text = text.encode()[: cfg.loop_bytes].decode("utf-8", "ignore")
            loop = find_loop(text.encode())
            sample[name] = {"text": text, "loop": None if loop is None else loop.string.decode("utf-8", "replace")}
        looping[name] = sum(sample[name]["loop"] is not None for sample in samples)
    return {
        "prompts_looping": _pair(looping["byteified"], looping["source"]),
        "prompts": len(prompts),
        "criterion": {"span": LOOP_SPAN, "repeats": LOOP_REPEATS, "window": LOOP_WINDOW, "new_bytes": cfg.loop_bytes},
        "samples": samples,
    }


# Section name -> its runner (byte scorer, source scorer, byte tokenizer, config, item counts) -> results.
SECTIONS = {
    "heldout": _eval_heldout, "lambada": _eval_lambada, "hellaswag": _eval_hellaswag, "characters": _eval_characters,
    "loops": _eval_loops,
}


def summary_line(section: str, r: dict[str, Any]) -> str:
    """One line per section for the console."""
    if section == "heldout":
        bnd = r["boundaries"]
        return (f"bits/byte {r['bits_per_byte']['byteified']:.3f} vs source {r['bits_per_byte']['source']:.3f} "
                f"(ratio {r['bits_per_byte_ratio']:.3f}); boundary F1 {bnd['f1']:.3f}, "
                f"{bnd['bytes_per_patch']:.2f} bytes/patch vs {bnd['bytes_per_token']:.2f} bytes/token"
                + (f"; decoding: bits/byte {r['decoding']['bits_per_byte']:.3f}, "
                   f"{r['decoding']['bytes_per_patch']:.2f} bytes/patch" if "decoding" in r else ""))
    if section == "lambada":
        return (f"accuracy {r['accuracy']['byteified']:.3f} vs {r['accuracy']['source']:.3f}, bits/byte "
                f"{r['bits_per_byte']['byteified']:.3f} vs {r['bits_per_byte']['source']:.3f}")
    if section == "hellaswag":
        return f"acc_norm {r['acc_norm']['byteified']:.3f} vs {r['acc_norm']['source']:.3f}"
    if section == "loops":
        n = r["prompts"]
        return (f"greedy samples that loop: {r['prompts_looping']['byteified']}/{n} "
                f"vs source {r['prompts_looping']['source']}/{n}")
    return f"exact match (mean over tasks) {r['mean']['byteified']:.3f} vs {r['mean']['source']:.3f}"


def load_pair(model_path: str, source: str | None = None, device: str | None = None):
    """The byteified model folder and its source (given, or the one recorded in the model's config)."""
    from bytelift.modeling import ByteliftForCausalLM, check_model_folder
    from bytelift.sources import load_source

    check_model_folder(model_path)
    model = ByteliftForCausalLM.from_pretrained(model_path)
    name = source or model.config.source_name_or_path
    if not name:
        raise ValueError(f"{model_path} does not record its source model: pass --source")
    source_model, _ = load_source(name)
    if device:
        model.to(device)
        source_model.to(device)
    return model.eval(), source_model.eval(), name


def training_logs(model_path: str | Path) -> dict[str, Path]:
    """The training logs next to a model: `log.jsonl` in the folder and in its `stage*/` subfolders."""
    root = Path(model_path)
    found = {}
    for path in [root / "log.jsonl", *sorted(root.glob("stage*/log.jsonl"))]:
        if path.is_file():
            found[path.parent.name if path.parent != root else "training"] = path
    return found


def torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
