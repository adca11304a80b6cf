"""HellaSwag acc_norm of byteified models with their predicted patches and with the source's token ends as
patches: how much of the gap to the source the boundaries cost.

For each item the four (context + ending) texts are scored twice: as `bytelift eval` does (`ByteScorer.score`,
the predictor's boundaries) and with the source tokenizer's token ends of the whole text as the boundaries
(the joint log-likelihood of the ending's bytes with those flags, its last byte folded).

    python benchmarks/hellaswag_boundaries.py N MODEL_DIR [MODEL_DIR ...]
"""

import sys
import time

import numpy as np
import torch

from bytelift.evaluation import tasks as T
from bytelift.evaluation.runner import choice_accuracy, source_segmentation
from bytelift.evaluation.scoring import ByteScorer, Scored, _joint_logprobs, token_end_boundaries
from bytelift.modeling import ByteliftForCausalLM


def main() -> None:
    n_items = int(sys.argv[1])
    docs = T.hellaswag_items(n_items)
    for path in sys.argv[2:]:
        t0 = time.time()
        model = ByteliftForCausalLM.from_pretrained(path).eval()
        tok = model.tokenizer
        scorer = ByteScorer(model)
        rows_true, rows_pred = [], []
        with torch.inference_mode():
            for d in docs:
                segs = [source_segmentation(tok, d.context + c) for c in d.choices]
                batch = tok([s[0] for s in segs], padding=True, return_tensors="pt")
                ids, mask = batch["input_ids"], batch["attention_mask"].bool()
                boundary = token_end_boundaries([ends for _, ends in segs], mask)
                out = model(**batch, boundary_mask=boundary)
                _, joint, _ = _joint_logprobs(out.logits, ids, boundary)
                row = []
                for r, c in enumerate(d.choices):
                    n = len(c.encode())
                    row.append(Scored(logprob=float(joint[r, -n:].sum()), logprob_folded=0.0, n_bytes=n, greedy=False,
                                      boundaries=np.zeros(n, bool)))
                rows_true.append(row)
                rows_pred.append(scorer.score([(d.context, c) for c in d.choices]))
        gold = [d.gold for d in docs]
        print(path, "source tokens:", choice_accuracy(rows_true, gold), "predicted:", choice_accuracy(rows_pred, gold),
              f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
