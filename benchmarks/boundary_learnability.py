"""What limits the learned boundary predictor: its form, its inputs, or its lookahead?

First, `--breakdown MODEL`: where a trained model's boundary errors fall on the report's held-out documents
(the last byte of a source pretoken, or inside one). Then two probes on the default corpus, each training
only a predictor (BCE against the source's token ends, the
same batches for every arm) and scoring held-out F1 at p > 0.5 along the way:

1. `--encoder MODEL`: predictors on the frozen encoder states of a trained byte model (e.g. a default job's
   `stage1/`): the model's own form (cos of two projections of h_t and h_{t+1}, from its trained weights)
   and MLPs over (h_t, h_{t+1}, h_t·h_{t+1}) — does a more expressive form find more in the same states?
2. `--lookahead 1,2,3`: a predictor on its own features — learned embeddings of the bytes t-7 .. t+k and the
   source embeddings of the longest-suffix ids at t .. t+k, through a 2-layer MLP — for each lookahead k:
   what the inputs allow at k bytes of lookahead, given thousands of windows instead of a job's hundreds.

    python benchmarks/boundary_learnability.py --breakdown <job>
    python benchmarks/boundary_learnability.py --encoder <job>/stage1 --steps 300
    python benchmarks/boundary_learnability.py --lookahead 1,2,3 --steps 1000 --batch 8
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytelift.corpus_reading import read_corpus
from bytelift.data import ByteCollator, ByteWindowDataset
from bytelift.evaluation.runner import default_heldout_data
from bytelift.modeling import ByteliftForCausalLM
from bytelift.objectives import decidable_positions, precision_recall_f1

WINDOW_TOKENS, BYTE_EXPANSION = 128, 6.0  # the default job's windows
EVAL_BATCHES, EVAL_BATCH = 64, 8  # every held-out window of the default corpus
BYTES_BEHIND, BYTE_DIM, SUBWORD_DIM, WIDTH = 8, 32, 128, 512  # probe 2's features and MLP
LOG_P_FLOOR = -20.0  # log p at the undecidable tail


def batches(dataset, n: int, size: int, collator, lookahead: int):
    it = iter(dataset)
    for _ in range(n):
        examples = list(itertools.islice(it, size))
        if not examples:
            return
        b = collator(examples)
        mask = b["attention_mask"].bool()
        yield b["input_ids"], b["expanded_ids"], mask, decidable_positions(mask, lookahead), b["boundary_labels"].bool()


def shifted(x: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, L, d) -> (B, L, d) whose row t holds x[t + offset] (zeros past either end)."""
    L = x.shape[1]
    padded = F.pad(x, (0, 0, max(-offset, 0), max(offset, 0)))
    start = max(offset, 0)
    return padded[:, start : start + L]


def as_logp(logits: torch.Tensor, lookahead: int) -> torch.Tensor:
    return F.pad(F.logsigmoid(logits), (0, lookahead), value=LOG_P_FLOOR)


class CosForm(nn.Module):
    """The model's own predictor form, started from its trained projections."""

    def __init__(self, trained):
        super().__init__()
        self.q, self.k = nn.Linear(*trained.q_proj.weight.shape[::-1], bias=False), nn.Linear(
            *trained.k_proj.weight.shape[::-1], bias=False)
        self.load_state_dict({"q.weight": trained.q_proj.weight, "k.weight": trained.k_proj.weight})

    def forward(self, h):
        cos = (F.normalize(self.q(h[:, :-1]), dim=-1) * F.normalize(self.k(h[:, 1:]), dim=-1)).sum(-1)
        return F.pad(torch.log1p(-cos.clamp(max=1 - 1e-3)) - math.log(2), (0, 1), value=LOG_P_FLOOR)


class StateMLP(nn.Module):
    def __init__(self, d: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * d, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, h):
        a, b = h[:, :-1], h[:, 1:]
        return as_logp(self.net(torch.cat([a, b, a * b], -1)).squeeze(-1), 1)


class FeaturePredictor(nn.Module):
    """Bytes t-7 .. t+k and longest-suffix source embeddings at t .. t+k -> MLP -> boundary logit."""

    def __init__(self, subword_table: torch.Tensor, lookahead: int, byte_vocab: int):
        super().__init__()
        self.lookahead, self.table = lookahead, subword_table
        self.byte = nn.Embedding(byte_vocab, BYTE_DIM)
        self.subword = nn.Linear(subword_table.shape[1], SUBWORD_DIM, bias=False)
        n_in = (BYTES_BEHIND + lookahead) * BYTE_DIM + (lookahead + 1) * SUBWORD_DIM
        self.net = nn.Sequential(nn.Linear(n_in, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 1))

    def forward(self, ids, expanded):
        e, s = self.byte(ids), self.subword(self.table[expanded])
        cols = [shifted(e, o) for o in range(-(BYTES_BEHIND - 1), self.lookahead + 1)]
        cols += [shifted(s, o) for o in range(self.lookahead + 1)]
        return F.logsigmoid(self.net(torch.cat(cols, -1)).squeeze(-1))


def f1_at_half(logp: torch.Tensor, gold: torch.Tensor) -> float:
    pred = logp > math.log(0.5)
    return precision_recall_f1((pred & gold).sum().item(), pred.sum().item(), gold.sum().item())["boundary_f1"]


def train_arm(name, predictor, inputs, train, held, steps, lr):
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.0)
    marks = sorted({25, 100, steps // 3, steps})
    start, curve = time.perf_counter(), []

    def evaluate():
        with torch.no_grad():
            lp = torch.cat([predictor(*inputs(b))[b[3]] for b in held])
        return f1_at_half(lp, torch.cat([b[4][b[3]] for b in held]))

    for step, b in enumerate(train, 1):
        lp = predictor(*inputs(b)).clamp(max=-1e-7)
        loss = -torch.where(b[4], lp, torch.log(-torch.expm1(lp)))[b[3]].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in marks:
            curve.append(f"{step}: {evaluate():.4f}")
    print(f"| {name} | {' · '.join(curve)} | {time.perf_counter() - start:.0f} |", flush=True)


def breakdown(folder: str) -> None:
    """Boundary errors of a trained model at pretoken ends and inside pretokens, on the report's documents."""
    import numpy as np

    from bytelift.evaluation.runner import EvalConfig, heldout_documents, source_segmentation
    from bytelift.evaluation.scoring import ByteScorer

    model = ByteliftForCausalLM.from_pretrained(folder).eval()
    pre = model.tokenizer.source_tokenizer.backend_tokenizer.pre_tokenizer
    segmented = [x for x in (source_segmentation(model.tokenizer, t) for t in heldout_documents(EvalConfig()))
                 if x is not None]
    scored = ByteScorer(model).score([(b"", data) for data, _ in segmented])
    counts = {"pretoken end": np.zeros(4, int), "inside a pretoken": np.zeros(4, int)}  # bytes, tp, fp, fn
    for (data, gold), s in zip(segmented, scored):
        pred = np.asarray(s.boundaries, bool)
        n = min(len(pred), len(gold))
        pred, gold = pred[:n], np.asarray(gold, bool)[:n]
        last = np.zeros(len(data), bool)  # byte-level pretokens: one character per byte
        last[np.cumsum([len(p) for p, _ in pre.pre_tokenize_str(data.decode("utf-8"))]) - 1] = True
        for name, where in (("pretoken end", last[:n]), ("inside a pretoken", ~last[:n])):
            p, g = pred[where], gold[where]
            counts[name] += [where.sum(), (p & g).sum(), (p & ~g).sum(), (~p & g).sum()]
    print("| where | bytes | true ends | false cuts | misses |\n|---|---|---|---|---|")
    for name, (n, tp, fp, fn) in counts.items():
        print(f"| {name} | {n:,} | {tp:,} | {fp:,} | {fn:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--breakdown", help="a byte model folder: where its boundary errors fall")
    parser.add_argument("--encoder", help="a byte model folder: probe 1 on its frozen encoder states")
    parser.add_argument("--lookahead", default="", help="comma-separated k: probe 2 at each")
    parser.add_argument("--model", default=None, help="byte model whose tokenizer and subword table probe 2 "
                        "uses (default: --encoder, else the source's byteified initialisation)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.breakdown:
        breakdown(args.breakdown)
        if not (args.encoder or args.lookahead):
            return
    folder = args.model or args.encoder
    model = (ByteliftForCausalLM.from_pretrained(folder) if folder else ByteliftForCausalLM.from_source()).eval()
    tok = model.tokenizer
    corpus = read_corpus(default_heldout_data())
    collator = ByteCollator.from_tokenizer(tok, pad_to_multiple_of=64)
    common = dict(window_tokens=WINDOW_TOKENS, byte_expansion_factor=BYTE_EXPANSION)
    print(f"| arm | held-out F1 at step | seconds |\n|---|---|---|")
    if args.encoder:
        train = list(batches(ByteWindowDataset(corpus.train, tok, seed=1, epochs=None, **common), args.steps,
                             args.batch, collator, 1))
        held = list(batches(ByteWindowDataset(corpus.heldout, tok, seed=0, epochs=1, shuffle=False, **common),
                            EVAL_BATCHES, EVAL_BATCH, collator, 1))
        with torch.no_grad():
            states = {id(b): model.encoder(b[0], b[1], mask=b[2])[0] for b in train + held}
        inputs = lambda b: (states[id(b)],)  # noqa: E731
        d = model.config.local_hidden_size
        train_arm("encoder states: cos form (trained start), lr 7e-3", CosForm(model.boundary_predictor), inputs,
                  train, held, args.steps, 7e-3)
        train_arm("encoder states: MLP 256", StateMLP(d, 256), inputs, train, held, args.steps, 1e-3)
    table = model.encoder.subword_embedding.weight.detach()
    for k in (int(x) for x in args.lookahead.split(",") if x):
        train = list(batches(ByteWindowDataset(corpus.train, tok, seed=1, epochs=None, **common), args.steps,
                             args.batch, collator, k))
        held = list(batches(ByteWindowDataset(corpus.heldout, tok, seed=0, epochs=1, shuffle=False, **common),
                            EVAL_BATCHES, EVAL_BATCH, collator, k))
        train_arm(f"own features, k = {k}", FeaturePredictor(table, k, model.config.byte_vocab_size),
                  lambda b: (b[0], b[1]), train, held, args.steps, 1e-3)


if __name__ == "__main__":
    main()
