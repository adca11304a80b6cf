"""`bytelift lm-eval`: a byte model and its source through lm-evaluation-harness, side by side.

    bytelift lm-eval --export-tasks tasks/                       # offline tasks (harness_tasks)
    bytelift lm-eval runs/job --tasks bytelift_arc_easy,bytelift_piqa --include-path tasks/ --source

The byte model runs as the harness model `bytelift` (`bytelift.evaluation.harness`), its source as the
harness's own `hf` model (the source loaded offline by `bytelift.sources.load_source`: the one the byte
model's config records, or `--source-model NAME`). Both get the same tasks, limit and few-shot settings; the table
(`lm_eval.md`, `lm_eval.json` in the output folder) has per task and metric the harness's value (± its
standard error) for each model and their ratio, byteified / source. lm_eval is imported only here and in
`harness`, so the rest of bytelift works without the `eval` extra.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Bootstrap draws for the standard errors of perplexity-like metrics (the harness's default of 100,000
# takes minutes per task on a laptop CPU; 1,000 give the error to about 5 %).
DEFAULT_BOOTSTRAP_ITERS = 1000
REPORT_NAME = "lm_eval"
MODELS = ("byteified", "source")
# Table values from this size on are written with 4 significant digits instead of 4 decimals.
LARGE_VALUE = 1000
EXTRA_HINT = 'bytelift lm-eval needs lm-evaluation-harness: pip install "bytelift[eval]"'


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bytelift lm-eval` options (the CLI registers the subcommand and calls `command`)."""
    p.add_argument("model", nargs="?", help="a bytelift model folder")
    p.add_argument("--tasks", help="comma-separated harness task names (exported ones: bytelift_*, or the tag "
                                   "bytelift; with a hub, any of the harness's own)")
    p.add_argument("--source", action="store_true",
                   help="also run the source (the one the model's config records) through the harness's hf model")
    p.add_argument("--source-model", dest="source_model", metavar="NAME",
                   help="with --source: this source instead (packaged name, HF folder, .gguf file)")
    p.add_argument("--limit", type=float, help="first N docs of each task (below 1: that fraction)")
    p.add_argument("--include-path", dest="include_path", help="folder of extra task YAMLs (e.g. --export-tasks')")
    p.add_argument("--output", help="folder for lm_eval.md / lm_eval.json (default MODEL/lm-eval)")
    p.add_argument("--num-fewshot", dest="num_fewshot", type=int,
                   help="few-shot examples (the exported tasks hold theirs in their contexts and ignore it)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16,
                   help="rows per batch: byte model generation, source scoring and generation (default 16)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--bootstrap-iters", dest="bootstrap_iters", type=int, default=DEFAULT_BOOTSTRAP_ITERS,
                   help=f"bootstrap draws for perplexity standard errors (default {DEFAULT_BOOTSTRAP_ITERS})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--export-tasks", dest="export_tasks", metavar="DIR",
                   help="write the offline tasks (YAML + jsonl) into DIR and exit")
    p.add_argument("--export-limit", dest="export_limit", type=int,
                   help="with --export-tasks: the first N docs of each task only")


def command(args: argparse.Namespace, prog: str = "bytelift lm-eval") -> int:
    """Run `bytelift lm-eval` from parsed arguments; errors are one line on stderr and exit status 2."""
    try:
        if args.export_tasks:
            from bytelift.evaluation.harness_tasks import export_tasks

            names = export_tasks(args.export_tasks, limit=args.export_limit)
            print(f"wrote {len(names)} tasks to {args.export_tasks}: {', '.join(names)}\n"
                  f"run them with --include-path {args.export_tasks} --tasks {','.join(names[:2])},... (or --tasks bytelift)")
            return 0
        if not args.model or not args.tasks:
            raise ValueError("give a MODEL folder and --tasks (or --export-tasks DIR)")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.limit is not None and args.limit <= 0:
            raise ValueError(f"--limit must be positive, got {args.limit:g}")
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        result = run_side_by_side(
            args.model, [t.strip() for t in args.tasks.split(",") if t.strip()],
            source=(args.source_model or True) if args.source else None, limit=limit,
            include_path=args.include_path, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
            device=args.device, bootstrap_iters=args.bootstrap_iters,
            output=args.output,
        )
    except ImportError as err:
        print(f"{prog}: {EXTRA_HINT} ({err})", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print("wrote " + ", ".join(result["written"]))
    return 0


def check_tasks(tasks: list[str], include_path: str | None):
    """The harness's TaskManager for these tasks; a ValueError names any task it does not know."""
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a folder")

    def missing(manager) -> list[str]:
        return [t for t in tasks if not manager.match_tasks([t]) and not Path(t).is_file()]

    if include_path:  # indexing the harness's own ~15,000 tasks takes seconds: skip it when not needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not missing(manager):
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = missing(manager)
    if unknown:
        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=3)})
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        offline = ("" if include_path else
                   "; bytelift's offline tasks: `bytelift lm-eval --export-tasks DIR`, then --include-path DIR")
        raise ValueError(f"unknown task(s) {', '.join(unknown)}{hint}{offline}")
    return manager


def _source_lm(model, name: str | None, batch_size: int, device: str):
    """The harness's hf model around the byte model's source, loaded offline by bytelift."""
    from lm_eval.models.huggingface import HFLM

    from bytelift.sources import load_source

    name = name or model.config.source_name_or_path
    if not name:
        raise ValueError("the model does not record its source: pass --source-model NAME")
    source, tokenizer = load_source(name)
    return HFLM(pretrained=source.to(device).eval(), tokenizer=tokenizer, batch_size=batch_size, device=device), name


def table_rows(results: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per (task, metric) of the first model's harness results: each model's value and standard
    error, the ratio byteified / source (None without a source or when the source's value is 0)."""
    first = results[MODELS[0]]
    rows = []
    for task in sorted(first["results"]):
        for key, value in first["results"][task].items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            row: dict[str, Any] = {"task": task, "metric": metric if filt == "none" else key,
                                   "n": first.get("n-samples", {}).get(task, {}).get("effective"),
                                   "higher_is_better": first.get("higher_is_better", {}).get(task, {}).get(metric)}
            for name in MODELS:
                res = results.get(name, {}).get("results", {}).get(task, {})
                stderr = res.get(f"{metric}_stderr,{filt}")
                row[name] = res.get(key)
                row[f"{name}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
            src = row.get("source")
            row["ratio"] = row[MODELS[0]] / src if isinstance(src, (int, float)) and src else None
            rows.append(row)
    return rows


def _cell(value, stderr) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= LARGE_VALUE:  # perplexities of weak models
        return f"{value:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The side-by-side table with a line on what was run."""
    lines = [f"# lm-evaluation-harness: {meta['model']} vs its source {meta.get('source') or '(not run)'}", ""]
    lines += [f"lm_eval {meta['lm_eval_version']}, limit {meta['limit']}; wall / CPU seconds: "
              + ", ".join(f"{k} {meta['seconds'][k]} / {meta['cpu_seconds'][k]}" for k in meta["seconds"]), "",
              "| task | metric | n | byteified | source | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "" if r["higher_is_better"] is None else (" ↑" if r["higher_is_better"] else " ↓")
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['task']} | {r['metric']}{arrow} | {r['n']} | {_cell(r['byteified'], r['byteified_stderr'])} "
                     f"| {_cell(r['source'], r['source_stderr'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_side_by_side(model_path: str, tasks: list[str], source: bool | str | None = None, limit: int | float | None = None,
                     include_path: str | None = None, output: str | None = None, num_fewshot: int | None = None,
                     batch_size: int = 16, device: str | None = None,
                     bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS) -> dict[str, Any]:
    """Evaluate the byte model (and with `source` its source) on `tasks`; write and return the table.

    Everything that can fail fast (model folder, task names, loading both models) is checked before the
    first task runs. Returns {"meta", "rows", "byteified", "source", "markdown", "written"}."""
    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable
    except ImportError as err:
        raise ImportError(EXTRA_HINT) from err
    import torch

    from bytelift.evaluation.harness import ByteliftLM
    from bytelift.modeling import check_model_folder

    check_model_folder(model_path)
    manager = check_tasks(tasks, include_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lms = {"byteified": ByteliftLM(model_path, batch_size=batch_size, device=device)}
    source_name = None
    if source:
        lms["source"], source_name = _source_lm(lms["byteified"].model, None if source is True else source,
                                                batch_size, device)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    for name, lm in lms.items():
        start, cpu = time.perf_counter(), time.process_time()
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False)
        seconds[name] = round(time.perf_counter() - start, 1)
        cpu_seconds[name] = round(time.process_time() - cpu, 1)  # all threads: what the run cost on a shared machine
        results[name] = {k: out.get(k) for k in ("results", "n-samples", "higher_is_better", "versions", "config", "configs")}
    meta = {"model": model_path, "source": source_name, "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
            "include_path": include_path, "lm_eval_version": lm_eval.__version__, "device": device,
            "seconds": seconds, "cpu_seconds": cpu_seconds}
    rows = table_rows(results)
    md = markdown_table(rows, meta)
    folder = Path(output or os.path.join(model_path, "lm-eval"))
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows, **results}
    written = [folder / f"{REPORT_NAME}.json", folder / f"{REPORT_NAME}.md"]
    _write_atomically(written[0], json.dumps(payload, indent=2, default=handle_non_serializable))
    _write_atomically(written[1], md)
    return {"meta": meta, "rows": rows, **results, "markdown": md, "written": [str(p) for p in written]}
