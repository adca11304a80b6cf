"""Generation speed: the byteified SmolLM2 against the source's own HF `generate`, same prompts, same run.

Source: the packaged SmolLM2-135M-Instruct (`bytelift.sources.load_source`, converted once into the bytelift
cache). Byteified: `ByteliftForCausalLM.from_source` (untrained: fine for speed). Greedy decoding, EOS off.

Prompts: the first ~`--prompt-bytes` bytes of the docstrings of 16 standard-library modules (English prose,
some code). Source bytes/token N = prompt bytes / source tokens over all prompts.

Boundary rate: an untrained model closes patches at a random rate, so it is set for the benchmark.
`--boundaries fixed` (default): the head's boundary decisions are switched off (`boundary_bias=-1e9`) and
`max_patch_bytes=cap` closes a new patch every `cap` bytes exactly. N is not an integer (4.23 for SmolLM2 on
these prompts), so caps floor(N) and ceil(N) are both measured and the decode rate at N interpolated: a
byte costs its local steps plus 1/(patch length) of a global step, t(N) = a + b/N, which two caps determine
exactly (rows "interp."; `--bytes-per-patch K` measures cap K alone). Rows stay in step, so batching
policies coincide. `--boundaries calibrated`: the fused-vs-plain log-odds get a bias b = −(1 − 1/N)
quantile of those log-odds over the prompts (one teacher-forced forward), new patches capped at 3·N bytes:
patch lengths vary per row as with a trained model, and all three batching policies are measured. The
untrained head's log-odds sit near the threshold, so the rate this gives is unstable (runs got 3.1 to 1.0
bytes/patch); the table shows it. The prompt's boundaries come from the (untrained) predictor in both modes.

Figures (after one warm-up prompt pass per model, each configuration runs `--repeats` times, alternating
with the other model; its fastest prefill and fastest prefill + decode are kept, since interference on a
shared machine only slows a run down, and decode time is their difference):
- prefill bytes/s: prompt bytes over the time of the prompt pass (source: one forward over the prompt tokens;
  byteified: `generate(max_new_bytes=0)`: encoder + predictor + global + decoder over the prompt);
- decode bytes/s: new bytes over (generate time − prefill time); source: new tokens × N;
- byteified batching policies (`global_sync`): 1.0 parks rows that closed a patch until all have; 1e-3 runs
  the global model whenever any row closed a patch (masked KV slots, no parking); 0.5 (the default) in
  between. The JSON's batch>1 figures are the default policy's.
`--dtype` sets both models' weights and activations (float32 default).

Measured (2-core CPU, otherwise idle, `--threads 1`, defaults: fixed boundaries at N = 4.226, 3 repeats,
float32): decode ratio byteified/source 0.75 at batch 1 (34.3 vs 45.6 B/s), 0.71 at batch 4, 0.89 at
batch 16 (228.7 vs 256.9 B/s); byteified batch 16 = 6.7× batch 1; prefill ratio at batch 1 1.16. A second
run (`--batches 1,16 --repeats 2`): 0.69, 0.85, 6.1. Within one run the byteified rates at caps 4 and 5
still wander (at batch 1: 32.0 and 42.7 B/s in the first run, 33.0 and 32.4 in the second).
In bfloat16 (`--dtype bfloat16`, one run each, before the repeats existed) both models lose at batch 16 on
this AVX2 CPU without bf16 arithmetic (source 113 vs 216 B/s in float32), so float32 is the CPU setting.
Both batch sizes are bound by the weights: per byte the byteified model reads ~153 MB of fp32 weights (local
53 MB + global 424 MB / 4.23 bytes per patch) where the source reads ~127 MB (538 MB / 4.23 bytes per token),
and does ~38 M vs ~32 M multiply-adds per row, so ratios near 0.83 are what equal efficiency gives (the
reference reports ≈0.83 on a GPU). Parity at the source's rate needs local weights per byte below the LM
head's share (N · local ≤ head: 4.23 × 13.4 M > 28.3 M params for SmolLM2). More speed needs fewer weight
bytes per byte: longer patches (`--batches 1,16 --repeats 2 --bytes-per-patch 8` gave 1.09 at batch 1 and
1.25 at batch 16, batch 16 = 7.3× batch 1) or a narrower local model (`--local-width 288`, 3.4 M local
parameters per byte).
A later run, after the local stacks' decoding step lost its module calls and per-step cache checks
(`LocalBlock.step`): default width 0.69 / 0.81 / 6.8 (byteified 34.3 B/s at batch 1 as before; the source ran
at 49.4 B/s that time); `--local-width 288`: 0.88 at batch 1 (46.0 vs 52.1 B/s), 1.19 at batch 16 (311.5 vs
262.3 B/s), batch 16 = 6.8× batch 1.
`--model` on the 30-minute `bytelift convert` model (its own boundaries: 4.43 bytes/patch at batch 1, 4.33
at batch 16): batch 1 0.90 (44.8 vs 49.6 B/s; a second run, `--batches 1`: 0.82, 36.5 vs 44.5); batch 16
with the global step on every row (before `computing_rows`): 0.66 (default policy; 181.4 / 168.2 / 64.7
B/s for sync 1.0 / 0.5 / 1e-3). With the
global step on the waiting rows only, `--batches 4,16 --repeats 2`, new and old code back to back: batch 16
234.6 vs 199.3 B/s at the default policy (ratio 0.79 vs 0.72), 109.3 vs 72.0 without parking; batch 4
62.8 vs 50.3 and 60.2 vs 40.4 (parking, unchanged: 67.9 vs 70.5). A stage 2 trained with merged patches
(`--bytes-per-patch 8`, 54 and 216 steps) closed almost no patch in *greedy* generation (one per 270
bytes at batch 1): greedy text of these undertrained models falls into loops and runs of spaces, where
the flag seldom fires, so those figures (2.0-2.1 at batch 1) measure a model that barely runs its
global model. `--sample` (both models sample at temperature 0.8, seeded) gives text whose patches look
like the training text's. With it, `--model DIR --sample --threads 1 --batches 1,16 --repeats 2`, two
stage 2s trained 216 steps from the 30-minute job's stage 1, each at its calibrated decoding threshold
(README: held-out bits/byte as decoding segments the text 2.980 plain, 2.826 merged):
- plain: batch 1 0.77 (32.9 vs 42.7 B/s, 4.91 bytes/patch), batch 16 0.68 (161.2 vs 235.5 B/s; parking
  137.4, no parking 109.4), batch 16 = 4.9x batch 1;
- merged to 8 bytes: batch 1 0.94 (44.1 vs 47.1 B/s, 6.92 bytes/patch), batch 16 0.67 (179.9 vs 267.6;
  parking 132.4, no parking 146.1), batch 16 = 4.1x batch 1.
Batch 16 gains little from longer patches when their lengths vary this much: 67 global steps served
16 x 270 bytes (fixed 8-byte patches need 34), and each reads all 424 MB of global weights (~150 ms
with ~8 rows on one core), while rows waiting for it idle.
After the leaner decoding step (no no-op casts in the mLSTM step, norm weights folded into the matrices
after them, the decoder's input projection and the head as one matmul each; a decoding step without
global steps, one prompt, best of 5 alternating runs per version: 8.85 -> 8.29 ms per byte), two runs
each (`--threads 1 --batches 1,16 --repeats 2`): fixed boundaries at the source's rate 0.79 and 0.75 at
batch 1 (37.7 vs 47.7, 36.9 vs 49.3 B/s), 0.83 and 0.80 at batch 16, batch 16 = 6.3x and 5.9x batch 1;
the merged stage 2 above (`--model DIR --sample`): 1.16 and 1.11 at batch 1 (50.4 vs 43.6, 45.7 vs
41.2 B/s), 1.00 and 0.83 at batch 16 (249.3 vs 249.3, 188.9 vs 228.1), batch 16 = 4.9x and 4.1x batch 1.
Not landed, measured: storing the global linears transposed (the lead of an earlier stop) makes a bare
global decoding step at batch 1 only 2% faster (57.9 vs 59.3 ms, best of 36) and 20% slower at batch 4
(122.4 vs 102.4 ms); `torch.compile` of the local stack's step or of the mLSTM cell was slower than eager
on this CPU (5.67 vs 5.28 ms for the 4 decoder blocks, best of 5; the cell alone: 11.6 vs 10.7 ms per byte,
one run each).

The last line printed is one JSON object. Besides the issue's figures it holds `equal_cost_ratio`, the decode
ratio both models would show if they multiplied their weights at the same speed (`equal_cost_ratio()`:
weights read per byte, from the models' linear layers and the patch rate), and `source_batch16_vs_batch1`,
the source's own batch scaling in the same run: the yardsticks for the decode ratios and for
`batch16_vs_batch1`. A run of each after they were added (`--threads 1 --batches 1,16 --repeats 2`):
fixed boundaries at N = 4.226: decode ratio 0.768 at batch 1 (32.2 vs 42.0 B/s), 0.832 at batch 16
(229.0 vs 275.2), equal-cost ratio 0.812; batch 16 = 7.1x batch 1, the source's own 6.6x. The merged stage 2
above (`--model DIR --sample`; 6.92 bytes/patch at batch 1, 7.77 at batch 16): 1.142 at batch 1 (47.5 vs
41.6 B/s; equal-cost ratio 1.083), 0.741 at batch 16 (193.4 vs 261.1, equal-cost ratio 1.149; parking
150.5, no parking 141.9), batch 16 = 4.1x batch 1 (source 6.3x). At batch 16 that model's global steps (67,
~8 rows each, ~190 ms) take over half the decode time: on this CPU a product of 8 or 16 rows by a weight
matrix costs 2-3x a product of one row (one thread, a 1536 x 576 weight as HF's linear multiplies it: 0.41 ms
for 1 row, 0.96 for 8, 1.26 for 16), so a global step costs nearly as much for 8 rows as for 16, and rows
that wait for it idle.
Usage: python benchmarks/generate.py [--new-tokens 64] [--threads 1] [--repeats 3] [--dtype float32]
       [--boundaries fixed|calibrated] [--bytes-per-patch K] [--local-width D] [--model DIR] [--sample]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time

import torch

# New patches are capped at this many times the source's bytes/token (`max_patch_bytes`): an untrained model
# can otherwise leave a row without boundaries for its whole output.
PATCH_CAP_FACTOR = 3
# Boundary bias that switches the head's boundary decisions off (fixed-length patches).
NEVER = -1e9
# `--sample`: both models sample at this temperature (no top-k / top-p), seeded.
TEMPERATURE = 0.8
SEED = 0

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


def bench_source(model, tok, texts, new_tokens, sample=False):
    """-> (prefill seconds, prefill + decode seconds) of one run."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        # The prompt pass as `generate` runs it: logits of the last position only.
        t_pre, _ = timed(lambda: model(**batch, logits_to_keep=1))
        torch.manual_seed(SEED)
        sampling = dict(do_sample=True, temperature=TEMPERATURE, top_k=0) if sample else dict(do_sample=False)
        t_gen, _ = timed(lambda: model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                pad_token_id=tok.pad_token_id, **sampling))
    return t_pre, t_gen


def bench_byte(model, texts, new_bytes, bias, cap, sync, sample=False):
    """-> (prefill seconds, prefill + decode seconds, boundary rate of the new bytes, global steps) of one run.
    bias None: the model's own decode_boundary_bias."""
    kwargs = dict(boundary_bias=bias, max_patch_bytes=cap, eos=False, global_sync=sync)
    if sample:
        kwargs.update(do_sample=True, temperature=TEMPERATURE, seed=SEED)
    with torch.inference_mode():
        t_pre, _ = timed(lambda: model.generate(texts, max_new_bytes=0, **kwargs))
        t_gen, out = timed(lambda: model.generate(texts, max_new_bytes=new_bytes, return_dict=True, **kwargs))
    assert int(out.num_new_bytes.min()) == new_bytes
    rate = float(out.boundaries.float().mean())
    return t_pre, t_gen, rate, out.global_steps


def at_rate(by_cap: dict[int, tuple[float, float]], rate: float | None) -> float:
    """Decode bytes/s at `rate` bytes per patch from runs at integer caps {cap: (prefill, decode B/s)}.

    Time per byte is local work per byte plus one global step per patch: t(N) = a + b/N, exact in 1/N, so
    the two measured caps around N determine it. One cap (or no rate): that run's figure.
    """
    if len(by_cap) == 1 or rate is None:
        return next(iter(by_cap.values()))[1]
    (lo, (_, d_lo)), (hi, (_, d_hi)) = sorted(by_cap.items())
    t_lo, t_hi = 1 / d_lo, 1 / d_hi
    t = t_lo + (t_hi - t_lo) * (1 / rate - 1 / lo) / (1 / hi - 1 / lo)
    return 1 / t


def matmul_params(*modules) -> int:
    """Weights of the linear layers in `modules` (None skipped): what one decoding step of them reads."""
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for mod in modules if mod is not None for m in mod.modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)))


def equal_cost_ratio(model, source, bytes_per_token: float, bytes_per_patch: float) -> float:
    """The decode ratio byteified/source if both read their weights at the same speed (each decoding step
    reads every weight it multiplies once, batch 1; at batch 16 multiply-adds per row scale the same way).

    Per byte the byteified model runs its local step (encoder stack, decoder input projection and stack,
    head) and 1/bytes_per_patch of a global step (pooling projection, transformer, global projection, the
    source prior's LM head when the model has one); the source runs 1/bytes_per_token of its step (transformer and LM head).
    """
    local = matmul_params(model.encoder.layers, model.decoder.in_projection, model.decoder.layers, model.lm_head)
    per_patch = matmul_params(model.pooling_projection, model.global_model, model.decoder.global_projection,
                              model.prior_head)  # the source prior's LM head runs once per global step
    return (matmul_params(source) / bytes_per_token) / (local + per_patch / bytes_per_patch)


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
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, fastest kept")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="weights and activations of both models")
    parser.add_argument("--boundaries", choices=["fixed", "calibrated"], default="fixed",
                        help="fixed: a new patch every floor(N) / ceil(N) bytes, interpolated at N; calibrated: biased head decisions "
                             "(varied patch lengths) and all three batching policies")
    parser.add_argument("--bytes-per-patch", type=int, default=None,
                        help="fixed mode: close a patch every this many bytes instead of at N (what a "
                             "stage-2 model trained with BPE-style merges reaches; finds the break-even point)")
    parser.add_argument("--local-width", type=int, default=None,
                        help="local_hidden_size of the byteified model (default: the source width, as the "
                             "reference); narrower local models read fewer weight bytes per byte")
    parser.add_argument("--model", default=None,
                        help="a trained bytelift model folder: its own boundaries (at its calibrated "
                             "decode_boundary_bias), compared with its source")
    parser.add_argument("--sample", action="store_true",
                        help=f"both models sample (temperature {TEMPERATURE}, seeded) instead of greedy decoding: "
                             "a trained model's patches then follow ordinary text, not greedy loops")
    parser.add_argument("--no-prior", action="store_true",
                        help="convert without the source-prior output path (the decoder alone; by default the "
                             "model adds the source's LM head and trie marginal at every global step and byte)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bytelift.decoding import DEFAULT_GLOBAL_SYNC
    from bytelift.modeling import ByteliftForCausalLM
    from bytelift.sources import load_source

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = ByteliftForCausalLM.from_pretrained(args.model).to(dtype).eval()
        source, tok = load_source(model.config.source_name_or_path)
    else:
        source, tok = load_source("smollm2-135m")
        overrides = {} if args.local_width is None else {"local_hidden_size": args.local_width}
        if args.no_prior:
            overrides["source_prior"] = False
        model = ByteliftForCausalLM.from_source("smollm2-135m", **overrides).to(dtype).eval()  # own copy of the transformer
    source = source.to(dtype).eval()
    texts = prompts(args.prompt_bytes)
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    bpt = n_bytes / n_tokens
    new_bytes = round(args.new_tokens * bpt)
    if args.model:  # the trained model places its boundaries itself, at its calibrated threshold
        caps, bias, rate = [None], None, None
    elif args.boundaries == "fixed":
        # The head never closes a patch; the cap closes one every `cap` bytes. At the source's own rate N
        # (not an integer), caps floor(N) and ceil(N) are both measured and interpolated (see the docstring).
        caps = [args.bytes_per_patch] if args.bytes_per_patch else sorted({math.floor(bpt), math.ceil(bpt)})
        bias, rate = NEVER, args.bytes_per_patch or bpt
    else:
        caps, bias, rate = [PATCH_CAP_FACTOR * round(bpt)], calibrate_bias(model, texts, bpt), None
    shown_bias = model.config.decode_boundary_bias if bias is None else bias
    print(f"{args.dtype} | threads {torch.get_num_threads()} | source bytes/token {bpt:.3f} | {args.new_tokens} new "
          f"tokens = {new_bytes} new bytes | boundary bias {shown_bias:+.2f}, patches capped at {caps} bytes | "
          f"{'sampling' if args.sample else 'greedy'}")

    rows, figures = [], {}
    for b in [int(x) for x in args.batches.split(",")]:
        batch = (texts * ((b + len(texts) - 1) // len(texts)))[:b]
        pb = sum(len(t.encode()) for t in batch)
        # Fixed boundaries keep all rows in step: the policies coincide, so only the default runs.
        syncs = [1.0] if b == 1 else [DEFAULT_GLOBAL_SYNC] if args.boundaries == "fixed" and not args.model else [
            1.0, DEFAULT_GLOBAL_SYNC, 1e-3]
        default_sync = 1.0 if b == 1 else DEFAULT_GLOBAL_SYNC
        # Repeats alternate the models, and each configuration keeps its fastest prefill and its fastest
        # prefill + decode (interference on a shared machine only ever slows a run down); decode time is
        # their difference. One warm-up prompt pass per model first.
        src_t, byte_t, info = [math.inf, math.inf], {}, {}
        bench_source(source, tok, batch, 1, args.sample)
        bench_byte(model, batch, 1, bias, caps[0], syncs[0], args.sample)
        for r in range(args.repeats):
            src_t = [min(a, t) for a, t in zip(src_t, bench_source(source, tok, batch, args.new_tokens, args.sample))]
            for sync in syncs:
                for cap in caps:
                    t_pre, t_gen, got, steps = bench_byte(model, batch, new_bytes, bias, cap, sync, args.sample)
                    old = byte_t.get((sync, cap), [math.inf, math.inf])
                    byte_t[sync, cap] = [min(old[0], t_pre), min(old[1], t_gen)]
                    info[sync, cap] = (got, steps)
            print(f"  measured: batch {b}, repeat {r + 1}/{args.repeats}", flush=True)
        src_pre, src_dec = pb / src_t[0], b * args.new_tokens * bpt / max(src_t[1] - src_t[0], 1e-9)
        rows.append((b, "source HF generate", "", src_pre, src_dec, f"{bpt:.2f}", ""))
        for sync in syncs:
            by_cap = {}
            for cap in caps:
                (t_pre, t_gen), (got, steps) = byte_t[sync, cap], info[sync, cap]
                by_cap[cap] = (pb / t_pre, b * new_bytes / max(t_gen - t_pre, 1e-9))
                rows.append((b, "byteified", sync, *by_cap[cap], f"{1 / max(got, 1e-9):.2f}", steps))
            pre, dec = by_cap[caps[0]][0], at_rate(by_cap, rate)
            if len(caps) > 1:
                rows.append((b, "byteified (interp.)", sync, pre, dec, f"{rate:.2f}", ""))
            if sync == default_sync:
                figures[b] = dict(src_pre=src_pre, src_dec=src_dec, pre=pre, dec=dec,
                                  bpp=1 / max(info[sync, caps[-1]][0], 1e-9))
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
            result["source_batch16_vs_batch1"] = f16["src_dec"] / figures[1]["src_dec"]
        if args.boundaries == "calibrated" or args.model:
            result["b16_decode_by_sync"] = figures.get("sync16")
    measured = {f"b{b}": round(f["bpp"], 3) for b, f in figures.items() if isinstance(b, int)}
    # The ratio equal weight-reading speed would give: at the fixed rate, or at each batch's measured one.
    if rate:
        result["equal_cost_ratio"] = equal_cost_ratio(model, source, bpt, rate)
    else:
        result.update({f"equal_cost_ratio_{key}": equal_cost_ratio(model, source, bpt, bpp)
                       for key, bpp in measured.items()})
    result.update(bytes_per_token=bpt, bytes_per_patch=rate or measured, model=args.model or "untrained",
                  boundary_bias=shown_bias, sample=args.sample, threads=torch.get_num_threads(), dtype=args.dtype,
                  local_width=model.config.local_hidden_size, source_prior=bool(model.config.source_prior),
                  repeats=args.repeats)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
