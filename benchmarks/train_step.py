"""Stage-1 training step vs a plain fine-tuning step of the source model, on the same text.

Both sides: forward + backward + AdamW step on windows of the same source tokens (the byte side reads
the bytes of exactly those tokens). Each side runs in its own process so that its peak memory (max RSS,
or peak CUDA memory on a GPU) is its own. Figures: seconds per step, microseconds per byte, peak memory.
Last line: one JSON object.

    python benchmarks/train_step.py [--source smollm2-135m] [--window-tokens 256] [--batch-size 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def corpus(n_docs: int = 64) -> list[str]:
    """Real prose and code: Python standard-library modules (present on every machine)."""
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f.read_text(errors="replace") for f in files[:n_docs]]


def batches(tokenizer, window_tokens: int, batch_size: int, steps: int):
    from bytelift.data import ByteCollator, ByteWindowDataset

    ds = ByteWindowDataset(corpus(), tokenizer, window_tokens=window_tokens, seed=0, shuffle=False)
    collate = ByteCollator.from_tokenizer(tokenizer)
    it = iter(ds)
    return [collate([next(it) for _ in range(batch_size)]) for _ in range(steps + 1)]


def run_side(side: str, args) -> dict:
    import torch

    from bytelift.training import TrainConfig, build_objective, parameter_groups

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(stage=1, source=args.source, data=["-"])
    objective, tok = build_objective(cfg)
    data = batches(tok, args.window_tokens, args.batch_size, args.steps)
    if side == "stage1":
        module = objective
        opt = torch.optim.AdamW(parameter_groups(objective, cfg), lr=cfg.lr)

        def step(batch):
            return objective(batch)["loss"]
    else:
        source = objective._teacher_lm[0]
        source.get_decoder().set_input_embeddings(objective.teacher_embedding)  # a whole source LM again
        source.requires_grad_(True)
        module = source
        opt = torch.optim.AdamW(source.parameters(), lr=cfg.lr)

        def step(batch):
            ids = batch["token_ids"]
            return source(input_ids=ids, attention_mask=batch["token_mask"].long(), labels=ids).loss

    module.train()
    times, n_bytes = [], 0
    for i, batch in enumerate(data):
        t = time.perf_counter()
        loss = step(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
            n_bytes += int(batch["attention_mask"].sum())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds_per_step": sum(times) / len(times), "us_per_byte": 1e6 * sum(times) / n_bytes, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=("stage1", "finetune"))
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    results = {}
    for side in ("finetune", "stage1"):
        cmd = [sys.executable, __file__, "--side", side] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "side"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = results["stage1"]["us_per_byte"] / results["finetune"]["us_per_byte"]
    print(f"{'':24}{'s/step':>10}{'us/byte':>10}{'peak MB':>10}")
    for side, r in results.items():
        print(f"{side:24}{r['seconds_per_step']:10.2f}{r['us_per_byte']:10.1f}{r['peak_mb']:10.0f}")
    print(f"stage-1 / fine-tune time per byte: {ratio:.2f}  (target <= 1.5)")
    print(json.dumps({
        "stage1_vs_finetune_time_per_byte": round(ratio, 3),
        "stage1_us_per_byte": round(results["stage1"]["us_per_byte"], 2),
        "finetune_us_per_byte": round(results["finetune"]["us_per_byte"], 2),
        "stage1_peak_mb": round(results["stage1"]["peak_mb"]),
        "finetune_peak_mb": round(results["finetune"]["peak_mb"]),
        "window_tokens": args.window_tokens,
        "batch_size": args.batch_size,
    }))


if __name__ == "__main__":
    main()
