"""Character-understanding documents (CUTE-style skills): synthetic spelling, insertion, deletion,
substitution, "does the word contain x" and reversal text over English words, mixed into stage-2 training
(`ByteWindowDataset(char_skills=...)`), with a stable split of the words so evaluation uses words the
training generator never does."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bytelift.corpus_reading import is_heldout


WORDFREQ_ENGLISH = "large_en.msgpack.gz"
WORD_SPLIT_SALT = b"bytelift-words"
_WORD_PATTERN = re.compile(r"[a-z]{3,12}")  # plain lowercase English words: unambiguous spelling tasks


def load_english_words(limit: int = 20_000) -> list[str]:
    """The ``limit`` most frequent plain lowercase English words (3–12 letters) from wordfreq's data.

    Reads ``wordfreq/data/large_en.msgpack.gz`` directly (gzip + msgpack: a header, then bins of words by
    frequency, most frequent first); wordfreq itself is not imported (its dependencies may be missing).
    """
    import msgpack

    spec = importlib.util.find_spec("wordfreq")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the wordfreq package is not installed (pip install wordfreq==3.1.1 --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "data" / WORDFREQ_ENGLISH
    with gzip.open(path, "rb") as f:
        bins = msgpack.unpackb(f.read(), raw=False)
    words: list[str] = []
    seen: set[str] = set()
    for bin_words in bins[1:]:  # bins[0] is the format header
        for word in bin_words:
            if _WORD_PATTERN.fullmatch(word) and word not in seen:
                seen.add(word)
                words.append(word)
                if len(words) >= limit:
                    return words
    return words


def _is_eval_word(word: str, fraction: float) -> bool:
    return is_heldout(word, fraction, salt=WORD_SPLIT_SALT)


@dataclass(frozen=True)
class CharSkillExample:
    """One question/answer pair; ``text`` = prompt + " " + answer."""

    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _swapped(items, i: int, j: int) -> list:
    """A copy of `items` (a string's letters or a sentence's words) with positions i and j exchanged."""
    out = list(items)
    out[i], out[j] = out[j], out[i]
    return out


class CharSkillGenerator:
    """Synthetic character-understanding examples (spelling, reversal, edits, containment), CUTE-style.

    Words come from wordfreq's English list, split by a stable hash into a training half (used here) and an
    evaluation half (:meth:`evaluation_words`; :meth:`for_evaluation` gives a generator drawing from it, for
    the CUTE-style evaluation suite), so evaluation never sees a word seen in training. Everything is deterministic given the seed.

    Tasks (``TASKS``): ``spell``, ``unspell`` (inverse spelling), ``reverse``, ``insert_char`` (after every
    occurrence of a letter), ``delete_char`` (every occurrence), ``substitute_char`` (every occurrence),
    ``swap_char`` (first occurrences of two letters), ``contains_char``; word level on short sentences of
    training words: ``reverse_words``, ``insert_word``, ``delete_word``, ``substitute_word``, ``swap_words``,
    ``contains_word``.

    Args:
        words: the word list (default :func:`load_english_words`).
        eval_fraction: share of words held out for evaluation.
        examples_per_document: examples joined (blank line between) into one document.
    """

    TASKS = (
        "spell", "unspell", "reverse", "insert_char", "delete_char", "substitute_char", "swap_char",
        "contains_char", "reverse_words", "insert_word", "delete_word", "substitute_word", "swap_words",
        "contains_word",
    )
    ALPHABET = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, words: Sequence[str] | None = None, *, eval_fraction: float = 0.5,
                 examples_per_document: int = 4):
        words = list(dict.fromkeys(load_english_words() if words is None else words))
        self._train = [w for w in words if not _is_eval_word(w, eval_fraction)]
        self._eval = [w for w in words if _is_eval_word(w, eval_fraction)]
        if len(self._train) < 2:
            raise ValueError("CharSkillGenerator: fewer than 2 training words")
        self.examples_per_document = examples_per_document
        self._pool = self._train  # the words examples are drawn from

    def for_evaluation(self) -> CharSkillGenerator:
        """A copy that draws its words from the evaluation half (for the CUTE-style evaluation suite)."""
        import copy

        other = copy.copy(self)
        if len(self._eval) < 2:
            raise ValueError("CharSkillGenerator: fewer than 2 evaluation words")
        other._pool = self._eval
        return other

    def training_words(self) -> list[str]:
        return list(self._train)

    def evaluation_words(self) -> list[str]:
        """Words never used by this generator (the evaluation half of the split)."""
        return list(self._eval)

    # ---- one example per task -------------------------------------------------------------------------

    def _letter(self, rng: np.random.Generator, exclude: str = "") -> str:
        choices = [c for c in self.ALPHABET if c not in exclude]
        return choices[rng.integers(len(choices))]

    def _sentence(self, rng: np.random.Generator) -> list[str]:
        n = int(rng.integers(3, 8))
        return [self._pool[i] for i in rng.integers(len(self._pool), size=n)]

    def make_example(self, task: str, rng: np.random.Generator) -> CharSkillExample:
        """One example of ``task`` with words/letters drawn from ``rng``."""
        word = self._pool[rng.integers(len(self._pool))]
        letters = sorted(set(word))
        present = letters[rng.integers(len(letters))]
        if task == "spell":
            return CharSkillExample(task, f"Spell '{word}':", " ".join(word))
        if task == "unspell":
            return CharSkillExample(task, f"Which word is spelled {' '.join(word)}?", word)
        if task == "reverse":
            return CharSkillExample(task, f"Reverse the letters of '{word}':", word[::-1])
        if task == "insert_char":
            new = self._letter(rng)
            return CharSkillExample(task, f"Add '{new}' after every '{present}' in '{word}':",
                                    word.replace(present, present + new))
        if task == "delete_char":
            return CharSkillExample(task, f"Delete every '{present}' from '{word}':", word.replace(present, ""))
        if task == "substitute_char":
            new = self._letter(rng, exclude=present)
            return CharSkillExample(task, f"Replace every '{present}' in '{word}' with '{new}':",
                                    word.replace(present, new))
        if task == "swap_char":
            if len(letters) < 2:
                return self.make_example("reverse", rng)
            i, j = sorted(rng.choice(len(word), size=2, replace=False).tolist())
            while word[i] == word[j]:  # swapping equal letters would be a no-op: pick distinct letters
                i, j = sorted(rng.choice(len(word), size=2, replace=False).tolist())
            return CharSkillExample(task, f"Swap the {_ordinal(i + 1)} and {_ordinal(j + 1)} letters of '{word}':",
                                    "".join(_swapped(word, i, j)))
        if task == "contains_char":
            letter = present if rng.random() < 0.5 else self._letter(rng, exclude=word)
            return CharSkillExample(task, f"Does '{word}' contain the letter '{letter}'?",
                                    "yes" if letter in word else "no")
        sentence = self._sentence(rng)
        text = " ".join(sentence)
        k = int(rng.integers(len(sentence)))
        if task == "reverse_words":
            return CharSkillExample(task, f"Reverse the order of the words in '{text}':", " ".join(sentence[::-1]))
        if task == "insert_word":
            new = self._pool[rng.integers(len(self._pool))]
            out = sentence[: k + 1] + [new] + sentence[k + 1 :]
            return CharSkillExample(task, f"Insert '{new}' after the {_ordinal(k + 1)} word of '{text}':",
                                    " ".join(out))
        if task == "delete_word":
            return CharSkillExample(task, f"Delete the {_ordinal(k + 1)} word of '{text}':",
                                    " ".join(sentence[:k] + sentence[k + 1 :]))
        if task == "substitute_word":
            new = self._pool[rng.integers(len(self._pool))]
            return CharSkillExample(task, f"Replace the {_ordinal(k + 1)} word of '{text}' with '{new}':",
                                    " ".join(sentence[:k] + [new] + sentence[k + 1 :]))
        if task == "swap_words":
            i, j = sorted(rng.choice(len(sentence), size=2, replace=False).tolist())
            return CharSkillExample(task, f"Swap the {_ordinal(i + 1)} and {_ordinal(j + 1)} words of '{text}':",
                                    " ".join(_swapped(sentence, i, j)))
        if task == "contains_word":
            probe = sentence[k] if rng.random() < 0.5 else self._pool[rng.integers(len(self._pool))]
            return CharSkillExample(task, f"Does '{text}' contain the word '{probe}'?",
                                    "yes" if probe in sentence else "no")
        raise ValueError(f"unknown character-skill task {task!r}; expected one of {self.TASKS}")

    # ---- streams --------------------------------------------------------------------------------------

    def examples(self, seed: int | Sequence[int] = 0) -> Iterator[CharSkillExample]:
        """An endless, seeded stream of examples (tasks drawn uniformly)."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.make_example(self.TASKS[rng.integers(len(self.TASKS))], rng)

    def documents(self, seed: int | Sequence[int] = 0) -> Iterator[str]:
        """An endless, seeded stream of documents of ``examples_per_document`` examples each."""
        stream = self.examples(seed)
        while True:
            yield "\n\n".join(e.text for e in itertools.islice(stream, self.examples_per_document))
