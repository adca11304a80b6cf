"""Generation speed: the byteified SmolLM2 against the source's own HF `generate`, same prompts, same run.

Source: the packaged SmolLM2-135M-Instruct (`bytelift.sources.load_source`, converted once into the bytelift
cache). Byteified: `ByteliftForCausalLM.from_source` (untrained: fine for speed). Greedy decoding, EOS off.

Prompts: the first ~`--prompt-bytes` bytes of the docstrings of 16 standard-library modules (English prose,
some code). Source bytes/token N = prompt bytes / source tokens over all prompts.

Boundary rate: an untrained model closes patches at a random rate, so it is set for the benchmark.
`--boundaries fixed` (default): the head's boundary decisions are switched off (`boundary_bias=-1e9`) and
`max_patch_bytes=round(N)` closes a new patch every round(N) bytes exactly (4 for SmolLM2 on these prompts:
slightly *more* global steps than the source has tokens). Rows stay in step, so batching policies coincide.
`--boundaries calibrated`: the fused-vs-plain log-odds get a bias b = −(1 − 1/N) quantile of those log-odds
over the prompts (one teacher-forced forward), new patches capped at 3·N bytes: patch lengths vary per row as
with a trained model, and all three batching policies are measured. The untrained head's log-odds sit near
the threshold, so the rate this gives is unstable (runs got 3.1 to 1.0 bytes/patch); the table shows it.
The prompt's boundaries come from the (untrained) predictor in both modes.

Figures:
- prefill bytes/s: prompt bytes over the time of the prompt pass (source: one forward over the prompt tokens;
  byteified: `generate(max_new_bytes=0)`: encoder + predictor + global + decoder over the prompt);
- decode bytes/s: new bytes over (generate time − prefill time); source: new tokens × N;
- byteified batching policies (`global_sync`): 1.0 parks rows that closed a patch until all have; 1e-3 runs
  the global model whenever any row closed a patch (masked KV slots, no parking); 0.5 (the default) in
  between. The JSON's batch>1 figures are the default policy's.

Measured (2 shared, busy CPU cores, `--threads 1 --batches 1,16`, fixed boundaries; 3 runs each, alternating
with the code before the fused decoding path): decode ratio batch 1 0.64 / 0.71 / 0.82 (before: 0.66 / 0.65 /
0.63), batch 16 0.81 / 0.89 / 0.95 (before: 0.81 / 0.85 / 0.80); the source's own rate varied 30-45 B/s at
batch 1 between runs. Timed per section (two alternating runs each), encoder + decoder steps per byte at
batch 1 fell from 15.5-18.8 ms to 11.6-13.1 ms; at batch 16 they did not change (compute-bound).
Both batch sizes are bound by the weights: per byte the byteified model reads ~162 MB of fp32 weights (local
56 MB + global 424 MB / 4 bytes per patch) where the source reads ~127 MB (538 MB / 4.23 bytes per token), and
does ~40 M vs ~32 M multiply-adds per row, so ratios near 0.8 are what equal efficiency gives; more needs
smaller weights or longer patches.

The last line printed is one JSON object.
Usage: python benchmarks/generate.py [--new-tokens 64] [--threads 1] [--boundaries fixed|calibrated]
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import torch

# New patches are capped at this many times the source's bytes/token (`max_patch_bytes`): an untrained model
# can otherwise leave a row without boundaries for its whole output.
PATCH_CAP_FACTOR = 3
# Boundary bias that switches the head's boundary decisions off (fixed-length patches).
NEVER = -1e9

PROMPT_MODULES = [
    "textwrap", "json", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess",
    "logging", "unittest", "datetime", "decimal", "fractions", "heapq", "bisect", "string",
]


def prompts(n_bytes: int) -> list[str]:
    out = []
    for name in PROMPT_MODULES:
        doc = " ".join((importlib.import_module(name).__doc__ or name).split())
        data = doc.encode()[:n_bytes]
        out.append(data.decode("utf-8", "ignore"))
    return out


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def bench_source(model, tok, texts, new_tokens, repeats=1):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        # The prompt pass as `generate` runs it: logits of the last position only.
        model(**batch, logits_to_keep=1)  # warm-up
        t_pre = min(timed(lambda: model(**batch, logits_to_keep=1))[0] for _ in range(repeats))
        t_gen, _ = timed(lambda: model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False, pad_token_id=tok.pad_token_id))
    return t_pre, max(t_gen - t_pre, 1e-9)


def bench_byte(model, texts, new_bytes, bias, cap, sync, repeats=1):
    kwargs = dict(boundary_bias=bias, max_patch_bytes=cap, eos=False, global_sync=sync)
    with torch.inference_mode():
        model.generate(texts, max_new_bytes=0, **kwargs)  # warm-up
        t_pre = min(timed(lambda: model.generate(texts, max_new_bytes=0, **kwargs))[0] for _ in range(repeats))
        t_gen, out = timed(lambda: model.generate(texts, max_new_bytes=new_bytes, return_dict=True, **kwargs))
    assert int(out.num_new_bytes.min()) == new_bytes
    rate = float(out.boundaries.float().mean())
    return t_pre, max(t_gen - t_pre, 1e-9), rate, out.global_steps


def calibrate_bias(model, texts, bytes_per_patch):
    """Bias on the boundary log-odds so that ~1/bytes_per_patch of the bytes close a patch: from one
    teacher-forced forward over the prompts (predicted boundaries), the log-odds of "the next byte closes
    a patch" at every position; b = −(1 − 1/N) quantile."""
    from bytelift.tokenization import BYTE_VOCAB_SIZE

    batch = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits.float()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nxt = ids[:, 1:]
    plain = logits[:, :-1].gather(2, nxt[..., None])[..., 0]
    fused = logits[:, :-1].gather(2, (nxt + BYTE_VOCAB_SIZE)[..., None])[..., 0]
    logodds = (fused - plain)[mask[:, :-1] & mask[:, 1:]]
    return -float(torch.quantile(logodds, 1.0 - 1.0 / bytes_per_patch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-bytes", type=int, default=300)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--boundaries", choices=["fixed", "calibrated"], default="fixed",
                        help="fixed: a new patch every round(N) bytes; calibrated: biased head decisions "
                             "(varied patch lengths) and all three batching policies")
    parser.add_argument("--bytes-per-patch", type=int, default=None,
                        help="fixed mode: close a patch every this many bytes instead of round(N) (what a "
                             "stage-2 model trained with BPE-style merges reaches; finds the break-even point)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bytelift.generation import DEFAULT_GLOBAL_SYNC
    from bytelift.modeling import ByteliftForCausalLM
    from bytelift.sources import load_source

    source, tok = load_source("smollm2-135m")
    source.eval()
    model = ByteliftForCausalLM.from_source("smollm2-135m").eval()  # its own copy of the transformer
    texts = prompts(args.prompt_bytes)
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    bpt = n_bytes / n_tokens
    new_bytes = round(args.new_tokens * bpt)
    if args.boundaries == "fixed":
        # The head never closes a patch; the cap closes one every round(N) (or --bytes-per-patch) bytes.
        cap, bias = args.bytes_per_patch or round(bpt), NEVER
    else:
        cap, bias = PATCH_CAP_FACTOR * round(bpt), calibrate_bias(model, texts, bpt)
    print(f"threads {torch.get_num_threads()} | source bytes/token {bpt:.2f} | {args.new_tokens} new tokens "
          f"= {new_bytes} new bytes | boundary bias {bias:+.2f}, patches capped at {cap} bytes")

    rows, figures = [], {}
    for b in [int(x) for x in args.batches.split(",")]:
        batch = (texts * ((b + len(texts) - 1) // len(texts)))[:b]
        pb = sum(len(t.encode()) for t in batch)
        t_pre, t_dec = bench_source(source, tok, batch, args.new_tokens)
        src_pre, src_dec = pb / t_pre, b * args.new_tokens * bpt / t_dec
        rows.append((b, "source HF generate", "", src_pre, src_dec, "", ""))
        print(f"  measured: batch {b} source", flush=True)
        # Fixed boundaries keep all rows in step: the policies coincide, so only the default runs.
        syncs = [1.0] if b == 1 else [DEFAULT_GLOBAL_SYNC] if args.boundaries == "fixed" else [
            1.0, DEFAULT_GLOBAL_SYNC, 1e-3]
        for sync in syncs:
            bt_pre, bt_dec, rate, steps = bench_byte(model, batch, new_bytes, bias, cap, sync)
            pre, dec = pb / bt_pre, b * new_bytes / bt_dec
            rows.append((b, "byteified", sync, pre, dec, f"{1 / max(rate, 1e-9):.2f}", steps))
            print(f"  measured: batch {b} byteified sync {sync}: decode {dec:.1f} B/s", flush=True)
            if sync == (1.0 if b == 1 else DEFAULT_GLOBAL_SYNC):
                figures[b] = dict(src_pre=src_pre, src_dec=src_dec, pre=pre, dec=dec)
            figures.setdefault(f"sync{b}", {})[sync] = dec

    print(f"{'batch':>5} {'model':<20} {'sync':>6} {'prefill B/s':>12} {'decode B/s':>11} {'B/patch':>8} "
          f"{'glob.steps':>10}")
    for b, name, sync, pre, dec, bpp, steps in rows:
        print(f"{b:>5} {name:<20} {sync!s:>6} {pre:>12.0f} {dec:>11.1f} {bpp:>8} {steps!s:>10}")
    result = {}
    if 1 in figures:
        f1 = figures[1]
        result.update(decode_ratio_b1=f1["dec"] / f1["src_dec"], prefill_ratio_b1=f1["pre"] / f1["src_pre"],
                      decode_bytes_s_b1=f1["dec"], source_decode_bytes_s_b1=f1["src_dec"])
    if 16 in figures:
        f16 = figures[16]
        result.update(decode_ratio_b16=f16["dec"] / f16["src_dec"], decode_bytes_s_b16=f16["dec"],
                      source_decode_bytes_s_b16=f16["src_dec"])
        if 1 in figures:
            result["batch16_vs_batch1"] = f16["dec"] / figures[1]["dec"]
        if args.boundaries == "calibrated":
            result["b16_decode_by_sync"] = figures.get("sync16")
    result.update(bytes_per_token=bpt, bytes_per_patch=cap if args.boundaries == "fixed" else None,
                  boundary_bias=bias, threads=torch.get_num_threads())
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
