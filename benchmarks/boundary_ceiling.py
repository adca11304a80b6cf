"""How well can any boundary predictor that reads k bytes ahead find the source's token ends?

A byte-level BPE tokenizer splits text into pretokens (its regex) and merges within each pretoken, so a
token end inside a pretoken is a function of the whole pretoken. A predictor deciding byte t from the bytes
up to t + k sees only the pretoken's prefix w[:i+1+k]; the best it can do is the vote of the pretokens that
share that prefix, weighted by how often they occur. This script estimates that vote from the training
corpus's pretoken counts and scores it on the held-out documents against the tokenizer's token ends, for
several k: a ceiling for the learned predictor at each lookahead (the model's own figure is the report's
"boundary agreement").

Optimistic in two ways, both reported: a pretoken's last byte is counted as decided (the next byte starts a
new pretoken, which k >= 1 sees), and a prefix no training pretoken shares (a rare word) is counted right.

    python benchmarks/boundary_ceiling.py [--lookahead 1,2,3,4] [--data FILES] [--source NAME]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import time

import numpy as np

from bytelift.corpus_reading import read_corpus
from bytelift.evaluation.runner import default_heldout_data
from bytelift.evaluation.tasks import heldout_texts
from bytelift.objectives import precision_recall_f1
from bytelift.sources import DEFAULT_SOURCE, load_source_tokenizer

# Pretokens longer than this are rare (long identifiers, runs of spaces); their tail bytes are not scored.
MAX_PRETOKEN_BYTES = 48
# Sorts after every character of a byte-level alphabet: `prefix + SENTINEL` bounds the prefix's range.
SENTINEL = "\U0010ffff"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookahead", default="1,2,3,4", help="comma-separated k")
    parser.add_argument("--data", nargs="+", default=None, help="corpus (default: the built-in one)")
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--heldout-docs", type=int, default=40)
    parser.add_argument("--heldout-bytes", type=int, default=1024)
    args = parser.parse_args()
    start = time.perf_counter()
    tok = load_source_tokenizer(args.source)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        raise SystemExit(f"{args.source}: needs a fast tokenizer with a pre-tokenizer")
    data = args.data or default_heldout_data()

    def pieces(text: str) -> list[str]:
        return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]

    def token_ends(piece: str) -> np.ndarray:
        ends, pos = np.zeros(MAX_PRETOKEN_BYTES, dtype=bool), 0
        for token in backend.model.tokenize(piece):
            pos += len(token.value)
            if pos <= MAX_PRETOKEN_BYTES:
                ends[pos - 1] = True
        return ends

    counts = collections.Counter(p for text in read_corpus(data).train for p in pieces(text))
    words = sorted(counts)
    weight = np.array([counts[w] for w in words], dtype=np.float64)
    ends = np.stack([token_ends(w) for w in words])
    length = np.array([len(w) for w in words])
    held = [p for text in heldout_texts(data, args.heldout_docs, args.heldout_bytes, 0.01) for p in pieces(text)]
    print(f"{len(words):,} distinct training pretokens ({int(weight.sum()):,} in all); "
          f"{len(held):,} held-out pretokens, {sum(map(len, held)):,} bytes")
    print("| lookahead k | F1 | precision | recall | per-byte accuracy | inside pretokens: F1 | unseen prefixes |")
    print("|---|---|---|---|---|---|---|")
    for k in (int(x) for x in args.lookahead.split(",")):
        tp = n_pred = n_gold = agree = decided = unseen = 0
        tp_in = pred_in = gold_in = 0
        for w in held:
            gold = token_ends(w)
            n = min(len(w), MAX_PRETOKEN_BYTES)
            for i in range(n - 1):  # the last byte ends the pretoken and a token: counted below
                seen = w[: i + 1 + k]
                if len(seen) == len(w):  # the whole pretoken is visible: its merges are known
                    p = bool(gold[i])
                else:
                    lo, hi = bisect.bisect_left(words, seen), bisect.bisect_left(words, seen + SENTINEL)
                    longer = length[lo:hi] > len(seen)
                    if not longer.any():
                        p, unseen = bool(gold[i]), unseen + 1
                    else:
                        wt = weight[lo:hi][longer]
                        p = bool((wt * ends[lo:hi][longer][:, i]).sum() > 0.5 * wt.sum())
                g = bool(gold[i])
                tp_in += p and g
                pred_in += p
                gold_in += g
                agree += p == g
                decided += 1
            tp, n_pred, n_gold = tp + 1, n_pred + 1, n_gold + 1  # the pretoken's last byte
            agree, decided = agree + 1, decided + 1
        tp, n_pred, n_gold = tp + tp_in, n_pred + pred_in, n_gold + gold_in
        all_ = precision_recall_f1(tp, n_pred, n_gold)
        inside = precision_recall_f1(tp_in, pred_in, gold_in)
        print(f"| {k} | {all_['boundary_f1']:.4f} | {all_['boundary_precision']:.4f} | {all_['boundary_recall']:.4f} "
              f"| {agree / decided:.4f} | {inside['boundary_f1']:.4f} | {unseen / max(decided, 1):.3f} |", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
