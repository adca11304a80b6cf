"""How long an evaluation takes, before it runs: the main job's reserve for it.

`bytelift convert` trains for whatever its budget leaves after the evaluation, so the evaluation's time has
to be known up front. It is the sum over sections of (items × seconds per item), seconds measured once on a
reference machine for SmolLM2-135M and its byte model, scaled by how much slower this machine's CPU is
(`cpu_probe_seconds`, a fixed matrix-multiply workload timed in a few seconds), with a margin. A run on a
GPU keeps the reference's figures (the probe times the CPU): the reserve errs long there, which costs
training minutes, never the budget.
"""

from __future__ import annotations

import time

import torch

from bytelift.char_skills import CharSkillGenerator
from bytelift.evaluation.runner import EvalConfig

# Seconds per item of each evaluation section for SmolLM2-135M and its byte model (both models scored, 2 CPU
# cores), from `bytelift eval`'s report (its "Seconds" line divided by its "Items" line) on the machine where
# `cpu_probe_seconds()` took REFERENCE_PROBE_SECONDS; benchmarks/README.md, "Evaluation time".
REFERENCE_SECONDS_PER_ITEM = {
    "heldout": 9.55,  # per document of 1024 bytes (scored three ways: predicted patches, tokens, decoding)
    "lambada": 0.695,
    "hellaswag": 1.912,  # per item: 4 endings, each scored with its context
    "characters": 0.986,  # per item (generation of a short answer)
    "loops": 6.33,  # per prompt (128 greedy bytes from each model)
}
# Loading both models, writing the report and the plots, the samples: minutes, at the reference speed.
REFERENCE_FIXED_MINUTES = 0.3
REFERENCE_PROBE_SECONDS = 0.87
# The estimate is scaled by the probe's slowdown, but not below this: a probe that ran fast must not shrink
# the reserve past what the reference machine's figures plus noise would allow.
MIN_SLOWDOWN = 0.6
# Margin on the estimate: the probe's spread between runs (0.82 to 0.92 s on the reference machine).
SAFETY = 1.05
# The probe: PROBE_REPEATS products of (PROBE_ROWS × d) by (d × 4d) float32 matrices, d the width of
# SmolLM2-135M: the shape of the evaluation's dominant work (the models' linear layers), run on all threads.
PROBE_ROWS, PROBE_WIDTH, PROBE_REPEATS = 2048, 576, 24
# The probe is timed this many times and the fastest kept: a busy moment makes one run slow, never fast
# (REFERENCE_PROBE_SECONDS: the median of such readings).
PROBE_TRIALS = 5


def cpu_probe_seconds() -> float:
    """Seconds this machine's CPU takes for the probe workload (the fastest of PROBE_TRIALS)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PROBE_ROWS, PROBE_WIDTH, generator=gen)
    b = torch.randn(PROBE_WIDTH, 4 * PROBE_WIDTH, generator=gen)
    torch.mm(a, b)  # warm-up: thread pool and allocator
    best = float("inf")
    for _ in range(PROBE_TRIALS):
        start = time.perf_counter()
        for _ in range(PROBE_REPEATS):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def section_items(cfg: EvalConfig) -> dict[str, int]:
    """Items of each section the evaluation runs (0: skipped), as `runner.evaluate` counts them."""
    return {
        "heldout": cfg.heldout_docs,
        "lambada": cfg.lambada,
        "hellaswag": cfg.hellaswag,
        "characters": cfg.cute_per_task * len(CharSkillGenerator.TASKS) + cfg.basic_skills,
        "loops": len(cfg.loop_prompts) if cfg.loop_bytes > 0 else 0,
    }


def estimated_eval_minutes(cfg: EvalConfig, slowdown: float = 1.0) -> float:
    """Minutes the evaluation of `cfg` (with loading and samples) takes on a machine `slowdown` times slower
    than the reference one (values below MIN_SLOWDOWN count as MIN_SLOWDOWN), with the SAFETY margin."""
    seconds = sum(REFERENCE_SECONDS_PER_ITEM[name] * n for name, n in section_items(cfg).items())
    return (seconds / 60 + REFERENCE_FIXED_MINUTES) * max(slowdown, MIN_SLOWDOWN) * SAFETY


def machine_slowdown() -> float:
    """How many times slower than the reference this machine's CPU runs the probe (1 on a GPU run, see the
    module docstring)."""
    if torch.cuda.is_available():
        return 1.0
    return cpu_probe_seconds() / REFERENCE_PROBE_SECONDS
