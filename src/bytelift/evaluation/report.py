"""The evaluation report: `report.json` (everything), `report.md` (the comparison table and the greedy
samples of the looping check) and PNG plots (per-task bars; training curves when the model folder holds
training logs)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Training-log keys plotted as curves (one panel each), when present.
CURVE_KEYS = ("loss", "boundary_loss", "encoder_loss", "distill_loss", "ce_loss", "boundary_f1", "eval_bits_per_byte", "eval_boundary_f1")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def headline_rows(results: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, byteified, source) rows of the comparison table, in reading order."""
    rows: list[tuple[str, Any, Any]] = []
    if "heldout" in results:
        h = results["heldout"]
        rows.append(("held-out bits/byte (lower is better)", h["bits_per_byte"]["byteified"], h["bits_per_byte"]["source"]))
        rows.append(("  folded, reference method (see note)", h["bits_per_byte_folded"]["byteified"], "–"))
        rows.append(("  ratio byteified / source", h["bits_per_byte_ratio"], "–"))
        labels = {
            "teacher_states": "  with the source's tokens as patches, teacher's states",
            "own_states": "  with the source's tokens as patches, own states",
            "own_states_prior_only": "    the source prior alone",
            "own_states_decoder_only": "    the decoder alone",
        }
        for key, label in labels.items():
            if key in h.get("bits_per_byte_parts", {}):
                rows.append((label, h["bits_per_byte_parts"][key], h["bits_per_byte"]["source"]))
        b = h["boundaries"]
        rows.append(("boundary precision / recall / F1 vs source tokens",
                     f"{b['precision']:.3f} / {b['recall']:.3f} / {b['f1']:.3f}", "–"))
        if "accuracy" in b:  # reports written before it was measured lack it
            rows.append(("  per-byte boundary accuracy", f"{b['accuracy']:.4f}", "–"))
        rows.append(("bytes per patch (byteified) / per token (source)", b["bytes_per_patch"], b["bytes_per_token"]))
        if "decoding" in h:
            d = h["decoding"]
            rows.append(("held-out bits/byte as generation segments it (head's flags)", d["bits_per_byte"],
                         h["bits_per_byte"]["source"]))
            rows.append(("  bytes per patch while decoding / boundary bias", d["bytes_per_patch"],
                         f"bias {d['boundary_bias']:+.3f}"))
    if "lambada" in results:
        r = results["lambada"]
        rows.append(("LAMBADA greedy last-word accuracy", r["accuracy"]["byteified"], r["accuracy"]["source"]))
        rows.append(("LAMBADA last-word bits/byte", r["bits_per_byte"]["byteified"], r["bits_per_byte"]["source"]))
    if "hellaswag" in results:
        r = results["hellaswag"]
        rows.append(("HellaSwag acc_norm", r["acc_norm"]["byteified"], r["acc_norm"]["source"]))
    if "characters" in results:
        r = results["characters"]
        rows.append(("character suite, mean exact match", r["mean"]["byteified"], r["mean"]["source"]))
        for task, v in sorted(r["tasks"].items()):
            rows.append((f"  {task}", v["byteified"], v["source"]))
    if "loops" in results:
        r, c = results["loops"], results["loops"]["criterion"]
        n = r["prompts"]
        rows.append((f"greedy samples that loop ({c['span']}-byte string ×{c['repeats']} within {c['window']} B)",
                     f"{r['prompts_looping']['byteified']}/{n}", f"{r['prompts_looping']['source']}/{n}"))
    return rows


def sample_lines(results: dict[str, Any]) -> list[str]:
    """The loops section's greedy samples as markdown: each prompt, both continuations, the repeated
    string where one loops (empty without that section)."""
    if "loops" not in results:
        return []
    r = results["loops"]
    lines = ["", f"## Greedy samples ({r['criterion']['new_bytes']} new bytes)", ""]
    for sample in r["samples"]:
        lines.append(f"**{sample['prompt']!r}**")
        lines.append("")
        for name in ("byteified", "source"):
            s = sample[name]
            loop = f" — loops on {s['loop']!r}" if s["loop"] is not None else ""
            lines.append(f"- {name}: {s['text']!r}{loop}")
        lines.append("")
    return lines[:-1]


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = [f"# bytelift evaluation: {meta.get('model', 'model')} vs {meta.get('source', 'source')}", ""]
    lines += ["| metric | byteified | source |", "|---|---|---|"]
    lines += [f"| {m} | {_fmt(b)} | {_fmt(s)} |" for m, b, s in headline_rows(results)]
    items = results.get("items", {})
    seconds = results.get("seconds", {})
    lines += ["", "Items: " + ", ".join(f"{k} {v}" for k, v in items.items()),
              "Seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()), "",
              "Bits per byte: both models score one segmentation of the same bytes (the source its tokens, the "
              "byteified model its predicted patches, fused flags included), a lower bound of each model's "
              "likelihood. The folded figure marginalises the end-of-patch flag at every byte as the reference "
              "does, which conditions each byte on one bit of its own future, so it is optimistic."]
    lines += sample_lines(results)
    return "\n".join(lines) + "\n"


def _plot_tasks(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, b, s = [], [], []
    for key, label, metric in (("lambada", "LAMBADA acc", "accuracy"), ("hellaswag", "HellaSwag acc_norm", "acc_norm")):
        if key in results:
            names.append(label)
            b.append(results[key][metric]["byteified"])
            s.append(results[key][metric]["source"])
    if "characters" in results:
        for task, v in sorted(results["characters"]["tasks"].items()):
            names.append(task)
            b.append(v["byteified"])
            s.append(v["source"])
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) + 2), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], s, width=0.4, label="source")
    ax.bar([i + 0.2 for i in x], b, width=0.4, label="byteified")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("accuracy / exact match")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("byteified vs source, per task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
    return rows


def _plot_curves(logs: dict[str, Path], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: read_log(p) for name, p in logs.items()}
    keys = [k for k in CURVE_KEYS if any(k in r for rows in series.values() for r in rows)]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in series.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], folder: str | os.PathLike, logs: dict[str, Path] | None = None) -> dict[str, Path]:
    """Write report.json, report.md, tasks.png and (with logs) training_curves.png into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"json": folder / "report.json", "markdown": folder / "report.md", "tasks_plot": folder / "tasks.png"}
    tmp = written["json"].with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, written["json"])
    written["markdown"].write_text(markdown(results))
    _plot_tasks(results, written["tasks_plot"])
    if logs and _plot_curves(logs, folder / "training_curves.png"):
        written["curves_plot"] = folder / "training_curves.png"
    return written
