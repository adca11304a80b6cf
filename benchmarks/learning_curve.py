"""Learning curve: held-out bits-per-byte ratio (byte model / source) against training minutes.

Reads finished `bytelift convert` runs made with `--snapshot-minutes` (the model kept at those training
minutes, stage 1 and stage 2 on one clock), and scores, for each run: its start (`from_source` with the run's
model options, minute 0), every snapshot, and the final model (minute = both stages' training time). Each
point is the held-out section of `bytelift eval` (the same 16 documents, predicted boundaries, side by side
with the source), so the last point equals the run's own report.

    python benchmarks/learning_curve.py runs/job runs/job-noprior --names "prior,no prior" --output curve/
    python benchmarks/learning_curve.py runs/job-90 --names "prior, 90 min" --add curve/learning_curve.json \
        --output curve90/           # a new run next to the curves scored before, without scoring them again

Writes curve/learning_curve.png, .md (one table) and .json; prints the table and, last, the JSON.
Snapshots are taken before the run's final calibration (boundary threshold, decoding bias) and, in stage 1,
before the stage-1 learning-rate decay finishes: a point is the model as it stood at that minute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bytelift.convert import STATE_FILE
from bytelift.evaluation.runner import EvalConfig, evaluate
from bytelift.modeling import ByteliftForCausalLM
from bytelift.sources import load_source
from bytelift.training_callbacks import SNAPSHOT_DIR

# Only the held-out section: the curve's y axis (the other sections take minutes per point).
HELDOUT_ONLY = EvalConfig(lambada=0, hellaswag=0, cute_per_task=0, basic_skills=0, loop_bytes=0,
                          heldout_decoding=False)


def run_points(run: Path) -> list[tuple[float, Path | None]]:
    """(training minute, model folder) for one convert run; folder None is its start (built from the source)."""
    state = json.loads((run / STATE_FILE).read_text())
    done = state["done"]
    if "final" not in done:
        raise ValueError(f"{run} is not a finished conversion (no 'final' step in {STATE_FILE})")
    points: list[tuple[float, Path | None]] = [(0.0, None)]
    for stage in ("stage1", "stage2"):
        for snap in sorted((run / stage / SNAPSHOT_DIR).glob("minute-*")):
            if (snap / "snapshot.json").is_file():
                points.append((json.loads((snap / "snapshot.json").read_text())["minute"], snap))
    total = sum(float(done[s].get("train_runtime", 0.0)) for s in ("stage1", "stage2") if isinstance(done.get(s), dict))
    points.append((total / 60, run))
    return sorted(points, key=lambda p: p[0])


def start_model(run: Path) -> ByteliftForCausalLM:
    """The run's step 0: `from_source` with the run's source, seed and model options."""
    cfg = json.loads((run / "convert_config.json").read_text())
    return ByteliftForCausalLM.from_source(cfg["source"], seed=cfg.get("seed", 0), **cfg.get("model", {}))


def score(model: ByteliftForCausalLM, source_model) -> dict[str, float]:
    r = evaluate(model.eval(), source_model, HELDOUT_ONLY, log=lambda _: None)["heldout"]
    return {"bits_per_byte": r["bits_per_byte"]["byteified"], "source_bits_per_byte": r["bits_per_byte"]["source"],
            "ratio": r["bits_per_byte_ratio"], "boundary_f1": r["boundaries"]["f1"]}


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([p["minute"] for p in pts], [p["ratio"] for p in pts], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="source")
    ax.set_yscale("log")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("held-out bits/byte, byte model / source")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="finished convert output folders")
    p.add_argument("--add", type=Path, action="append", default=[],
                   help="a learning_curve.json of an earlier run of this script: its curves join the table and plot")
    p.add_argument("--names", help="comma-separated curve names (default: the folder names)")
    p.add_argument("--output", type=Path, default=Path("learning_curve"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    if len(names) != len(args.runs):
        p.error(f"{len(names)} names for {len(args.runs)} runs")
    if not args.runs and not args.add:
        p.error("give at least one run folder or --add")
    curves: dict[str, list[dict]] = {}
    for path in args.add:  # scored before on the same held-out documents
        earlier = json.loads(path.read_text())
        if clash := set(earlier) & (set(curves) | set(names)):
            p.error(f"curve name(s) {sorted(clash)} of {path} are taken: rename with --names")
        curves.update(earlier)
    plan = {name: run_points(run) for name, run in zip(names, args.runs)}  # every run checked before scoring
    sources: dict[str, object] = {}
    for (name, points), run in zip(plan.items(), args.runs):
        curves[name] = []
        for minute, folder in points:
            model = start_model(run) if folder is None else ByteliftForCausalLM.from_pretrained(folder)
            src = model.config.source_name_or_path
            if src not in sources:
                sources[src] = load_source(src)[0].eval()
            with torch.no_grad():
                row = {"minute": round(minute, 2), **score(model, sources[src])}
            curves[name].append(row)
            print(f"{name} minute {row['minute']:6.2f}: ratio {row['ratio']:.3f} (bits/byte {row['bits_per_byte']:.3f},"
                  f" F1 {row['boundary_f1']:.3f})", file=sys.stderr, flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    lines = ["| run | training minutes | held-out bits/byte | source | ratio | boundary F1 |", "|---|---|---|---|---|---|"]
    for name, pts in curves.items():
        lines += [f"| {name} | {p['minute']:.1f} | {p['bits_per_byte']:.3f} | {p['source_bits_per_byte']:.3f} | "
                  f"{p['ratio']:.3f} | {p['boundary_f1']:.3f} |" for p in pts]
    table = "\n".join(lines)
    (args.output / "learning_curve.md").write_text(table + "\n")
    (args.output / "learning_curve.json").write_text(json.dumps(curves, indent=1))
    plot(curves, args.output / "learning_curve.png")
    print(table)
    print(json.dumps(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
