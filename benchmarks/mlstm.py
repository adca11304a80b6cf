"""CPU throughput of the mLSTM cell (forward + backward) and of the whole LocalBlock.

Shapes: float32, batch 4, d_model 576 (SmolLM2), 16 heads -> d_qk = 18, d_v = 36 per head; lengths
512 / 2048 / 4096; 2 threads. Compared, on the same inputs in the same run:

- bytelift's chunkwise form (``mlstm_chunkwise``);
- bytelift's plain recurrent loop (``mlstm_recurrent``), timed on the first LOOP_STEPS steps and scaled
  to the full length (its cost per step does not depend on the position);
- mlstm_kernels' pure-PyTorch chunkwise kernels ``chunkwise--native_autograd`` and
  ``chunkwise--native_custbw`` (they take the same (B, NH, S, DH) tensors and the same gate
  pre-activations: log input gate i, forget pre-activation f to which they apply logsigmoid, q scaled
  by 1/sqrt(d_qk), eps 1e-6), when the package is installed (``pip install mlstm_kernels einops``).
  mlstm_kernels is licensed under the NXAI Community License (not Apache/MIT); it is only used here,
  for comparison, never by bytelift itself.

Run:  .venv/bin/python benchmarks/mlstm.py            (about 2-3 minutes on 2 cores)
The last line printed is one JSON object with the ratios and the per-length numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bytelift.mlstm import DEFAULT_CHUNK_SIZE, LocalBlock, mlstm_chunkwise, mlstm_recurrent

BATCH, D_MODEL, HEADS = 4, 576, 16
D_QK, D_V = D_MODEL // 2 // HEADS, D_MODEL // HEADS  # 18, 36
LENGTHS = (512, 2048, 4096)
LOOP_STEPS = 128  # the recurrent loop is timed on this many steps and scaled
THEIR_CHUNK_SIZE = 64  # mlstm_kernels' own default (and the reference's HF setting)
THREADS = 2


def make_inputs(seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """Random cell inputs q, k (B,H,S,d_qk), v (B,H,S,d_v), i, f (B,H,S) that require grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, HEADS, seq_len, D_QK)] * 2 + [(BATCH, HEADS, seq_len, D_V)] + [(BATCH, HEADS, seq_len)] * 2
    q, k, v, i, f = (torch.randn(s, generator=g) for s in shapes)
    # gate pre-activations in the soft-capped range the layer produces; forget gates mostly open
    i, f = 3.0 * i - 2.0, 2.0 * f + 3.0
    return [t.requires_grad_() for t in (q, k, v, i, f)]


def time_fwd_bwd(fns: dict, inputs: dict, repeats: int) -> tuple[dict, dict]:
    """Median and minimum seconds of fn(*inputs[name]) -> h, then h.backward(random), per name in fns.

    The functions take turns (one warm-up round, then ``repeats`` rounds), so a slow stretch of a
    shared machine hits all of them alike instead of whichever happened to run at the time.
    """
    grads = {name: torch.randn_like(fn(*inputs[name]).detach()) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            for t in inputs[name]:
                t.grad = None
            start = time.perf_counter()
            fn(*inputs[name]).backward(grads[name])
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(ts[1:]) for name, ts in times.items()},
            {name: min(ts[1:]) for name, ts in times.items()})


def mlstm_kernels_fns(chunk_size: int) -> dict:
    """name -> fn(q,k,v,i,f) -> h for the two pure-PyTorch mlstm_kernels chunkwise kernels, or {}."""
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
    except ImportError:
        return {}
    fns = {}
    for name in ("chunkwise--native_autograd", "chunkwise--native_custbw"):
        kernel = get_mlstm_kernel(name)
        fns[name] = lambda q, k, v, i, f, _kernel=kernel: _kernel(q, k, v, i, f, chunk_size=chunk_size)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytelift's chunk size")
    parser.add_argument("--their-chunk-size", type=int, default=THEIR_CHUNK_SIZE, help="mlstm_kernels' chunk size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, f, chunk_size=args.chunk_size)[0]  # noqa: E731
    loop = lambda q, k, v, i, f: mlstm_recurrent(q, k, v, i, f)[0]  # noqa: E731
    theirs = mlstm_kernels_fns(args.their_chunk_size)
    block = LocalBlock(D_MODEL, num_heads=HEADS)
    if not theirs:
        print("mlstm_kernels not installed: its columns are null (pip install mlstm_kernels einops)")

    rows = []
    for S in args.lengths:
        steps = min(S, LOOP_STEPS)
        cell_inputs = make_inputs(S)
        fns = {"chunkwise": ours, "loop": loop, **theirs, "local_block": lambda x: block(x)[0]}
        inputs = {name: cell_inputs for name in fns}
        inputs["loop"] = [t.detach()[:, :, :steps].clone().requires_grad_() for t in cell_inputs]
        inputs["local_block"] = [torch.randn(BATCH, S, D_MODEL, requires_grad=True)]
        median, best = time_fwd_bwd(fns, inputs, args.repeats)
        row, row_best = {"seq_len": S}, {}
        for name in fns:
            tokens = BATCH * (steps if name == "loop" else S)
            row[name], row_best[name] = tokens / median[name], tokens / best[name]
        row["best_of_repeats"] = row_best
        with torch.no_grad():  # sanity check: the same function as mlstm_kernels computes
            h_ours = ours(*cell_inputs)
            diffs = [(fn(*cell_inputs) - h_ours).abs().max().item() for fn in theirs.values()]
        row["max_abs_diff_vs_mlstm_kernels"] = max(diffs) if diffs else None
        row["max_rel_diff_vs_mlstm_kernels"] = max(diffs) / h_ours.abs().max().item() if diffs else None
        rows.append(row)

    names = ["chunkwise", "loop", *theirs, "local_block"]
    print(f"\nmLSTM cell fwd+bwd, tokens/s (B={BATCH}, H={HEADS}, d_qk={D_QK}, d_v={D_V}, float32, "
          f"{args.threads} threads; chunk {args.chunk_size}, mlstm_kernels chunk {args.their_chunk_size}; "
          f"loop timed on {LOOP_STEPS} steps and scaled; medians of {args.repeats} interleaved repeats)")
    print(f"{'S':>6} " + " ".join(f"{n:>28}" for n in names) + f" {'max|diff|':>10} {'rel':>8}")
    for row in rows:
        diff, rel = row["max_abs_diff_vs_mlstm_kernels"], row["max_rel_diff_vs_mlstm_kernels"]
        print(f"{row['seq_len']:>6} " + " ".join(f"{row[n]:>28,.0f}" for n in names)
              + (f" {'n/a':>10} {'n/a':>8}" if diff is None else f" {diff:>10.1e} {rel:>8.1e}"))

    def ratio(row: dict) -> float | None:
        best = max((row[n] for n in theirs), default=None)
        return None if best is None else row["chunkwise"] / best

    ratios = [ratio(r) for r in rows]
    ratios_best = [ratio(r["best_of_repeats"]) for r in rows]
    at_4096 = [r for r in rows if r["seq_len"] == 4096]
    result = {
        "vs_mlstm_kernels": None if not theirs else min(ratios),  # medians, worst length
        "vs_loop_4096": at_4096[0]["chunkwise"] / at_4096[0]["loop"] if at_4096 else None,
        # the same from the fastest repeat of each: less sensitive to other work on a shared machine
        "vs_mlstm_kernels_best_of": None if not theirs else min(ratios_best),
        "vs_loop_4096_best_of": (at_4096[0]["best_of_repeats"]["chunkwise"] / at_4096[0]["best_of_repeats"]["loop"]
                                 if at_4096 else None),
        "threads": args.threads,
        "chunk_size": args.chunk_size,
        "their_chunk_size": args.their_chunk_size,
        "per_length": [{**r, "vs_mlstm_kernels": q} for r, q in zip(rows, ratios)],
    }
    for n in names:
        print(f"  {n}: " + ", ".join(f"{r['seq_len']}: {r[n]:,.0f}" for r in rows))
    print(json.dumps(result, default=lambda v: round(v, 4) if isinstance(v, float) else v))


if __name__ == "__main__":
    main()
