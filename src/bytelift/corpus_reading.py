"""Reading corpora: the files users have -> documents, split into training and held-out text.

    corpus = read_corpus(["book.txt", "notes/", "web.jsonl.zst"], weights=[1, 1, 2], text_suffixes=(".txt", ".md"))
    corpus.train, corpus.heldout          # lists of documents
    print("\\n".join(corpus.stats.report_lines()))   # documents and bytes per source, how each was split

Each path given is one **source** (one line of the report, one mixing weight):
- plain text: ``.txt`` (other suffixes through ``text_suffixes``: ``.md``, ``.rst``, ``.py``, ...), a file per
  document (or a paragraph per document with ``txt_mode="paragraph"``);
- JSON: ``.jsonl`` (a record per line) or ``.json`` (a record per line, or one array of records); the text is
  the record's ``text_field``, a dotted path into nested records (``meta.body``; list items by index:
  ``turns.0.text``). Read with the standard library's ``json``, line by line: an error names the line, invalid
  UTF-8 is found at its byte offset, and records need not share one schema (``datasets``' JSON builder infers
  one schema for all of them and names no line);
- Parquet (``.parquet``): a column or a dotted path into a struct column, read with ``datasets``;
- a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict: every split in name order);
- text and JSON files compressed with gzip (``.gz``) or Zstandard (``.zst``, needs the ``zstandard`` package);
- a folder: every file above in it, recursively, in sorted order (files with other suffixes are counted
  and reported, not read).

The held-out split is stable: it depends only on the text and the options, never on the order of reading,
file names or the process.
- A source with many documents (``heldout_fraction`` × documents ≥ ``MIN_HELDOUT_DOCUMENTS``) is split by
  document: a stable hash of each document's text (``is_heldout``).
- A source with fewer (one book, a few files), where a per-document hash would most often hold out nothing,
  is split by blocks: its documents are cut at line breaks into blocks of at most ``HELDOUT_BLOCK_BYTES`` and
  evenly spaced blocks are held out (``heldout_fraction`` of them, at least ``MIN_HELDOUT_BYTES``' worth, at
  most ``MAX_HELDOUT_SHARE``, at least one block while another is left). Each held-out block is a document of
  the held-out side; the training side keeps the text between them, each contiguous stretch one document.

Mixing weights set each source's share of the training *bytes* (``apply_weights``); the held-out side is
never reweighted. Errors a user can fix are ``CorpusError`` (a ``UsageError``: one line, exit code 2 in the
command line), each naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from bytelift.checks import UsageError

if TYPE_CHECKING:  # imported where used: the command line reads this module's options before any corpus
    import datasets

DEFAULT_HELDOUT_FRACTION = 0.01
HELDOUT_SALT = b"bytelift-heldout"  # blake2b personalisation (≤ 16 bytes): a different salt = a different split
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst")
# Per-document split only where it is expected to hold out at least this many documents: the evaluation
# scores 16 held-out documents by default (EvalConfig.heldout_docs). With fewer, P(no held-out document) =
# (1 - fraction)^n is large: 37 % for 100 documents at 1 %.
MIN_HELDOUT_DOCUMENTS = 16
# Blocks of a source split by blocks: the evaluation scores the first 1 KB of each held-out document
# (EvalConfig.heldout_bytes), so a block of that size is scored whole.
HELDOUT_BLOCK_BYTES = 1024
# At least the evaluation's default 16 held-out documents of 1 KB each, where the source is large enough.
MIN_HELDOUT_BYTES = 16 * 1024
# A small source keeps at least 90 % of its blocks for training (so a 160 KB book holds out 16 KB, a 50 KB
# one 5 KB).
MAX_HELDOUT_SHARE = 0.1
ENCODING_ERRORS = ("strict", "replace", "skip")
TXT_MODES = ("document", "paragraph")
# Seeds the choice of documents of a source weighted below its natural share (a fixed, stable subset).
WEIGHT_SEED = 0
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # blank lines (maybe with spaces) end a paragraph
_HASH_SCALE = float(2**64)
_MISSING = object()


class CorpusError(UsageError):
    """A corpus that cannot be read as given (missing path, unknown format, invalid UTF-8, no text, ...)."""


# ========================================================================================================
# Where the documents are
# ========================================================================================================


def normalize_suffixes(suffixes: Sequence[str]) -> tuple[str, ...]:
    """'.md', 'md', '.MD' -> '.md' (the form file names are matched against)."""
    out = []
    for s in suffixes:
        s = s.strip().lower()
        if not s or s == ".":
            raise CorpusError(f"empty text suffix in {list(suffixes)}")
        out.append(s if s.startswith(".") else "." + s)
    return tuple(out)


def file_kind(path: Path, text_suffixes: Sequence[str] = TEXT_SUFFIXES) -> str | None:
    """'json', 'parquet', 'text', or None for a file that is no corpus file (matched on its name)."""
    name = path.name.lower()
    base = next((name[: -len(c)] for c in COMPRESSION_SUFFIXES if name.endswith(c)), name)
    if base.endswith(JSON_SUFFIXES):
        return "json"
    if base.endswith(PARQUET_SUFFIXES):
        return "parquet" if base == name else None  # parquet compresses inside the file
    if base.endswith(tuple(text_suffixes)):
        return "text"
    return None


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


@dataclass
class Source:
    """One given path: its corpus files (path, kind) in reading order and the files left out by suffix."""

    given: str
    entries: list[tuple[Path, str]]
    ignored: Counter = field(default_factory=Counter)


def _suffix_of(path: Path) -> str:
    return "".join(path.suffixes[-2:]).lower() or "(none)"


def find_sources(
    paths: str | os.PathLike | Sequence[str | os.PathLike], text_suffixes: Sequence[str] = TEXT_SUFFIXES
) -> list[Source]:
    """Resolve each given file or folder into its corpus files (folders recursively, sorted; a saved
    ``datasets`` folder is one entry of kind 'saved').

    Raises:
        CorpusError: a path does not exist or cannot be listed, a file has an unsupported suffix, a folder
            holds no corpus file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CorpusError("no corpus paths given")
    text_suffixes = normalize_suffixes(text_suffixes)
    known = ", ".join(JSON_SUFFIXES + PARQUET_SUFFIXES + tuple(text_suffixes))
    sources = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CorpusError(f"corpus path does not exist: {path}")
        source = Source(str(raw), [])
        if path.is_dir():
            if is_saved_dataset(path):
                source.entries.append((path, "saved"))
            else:
                _walk(path, text_suffixes, source)
            if not source.entries:
                left = ", ".join(f"{s} ({n})" for s, n in source.ignored.most_common(5)) or "no files"
                raise CorpusError(
                    f"corpus folder {path} holds no corpus file (read: {known}, compressed .gz/.zst too; found: "
                    f"{left}); --text-suffixes reads other suffixes as plain text"
                )
        else:
            kind = file_kind(path, text_suffixes)
            if kind is None:
                raise CorpusError(
                    f"unsupported corpus file {path}: expected one of {known} (or .gz/.zst of them); "
                    f"--text-suffixes {path.suffix or path.name} reads it as plain text"
                )
            source.entries.append((path, kind))
        sources.append(source)
    return sources


def _walk(root: Path, text_suffixes: tuple[str, ...], source: Source) -> None:
    try:
        children = sorted(root.iterdir())
    except OSError as err:
        raise CorpusError(f"cannot list corpus folder {root}: {err.strerror or err}") from err
    for child in children:
        if child.is_dir():
            if is_saved_dataset(child):
                source.entries.append((child, "saved"))
            else:
                _walk(child, text_suffixes, source)
        elif child.is_file():
            kind = file_kind(child, text_suffixes)
            if kind is None:
                source.ignored[_suffix_of(child)] += 1
            else:
                source.entries.append((child, kind))


# ========================================================================================================
# Reading one file: raw documents
# ========================================================================================================


@dataclass
class SourceStats:
    """One source as read: documents and bytes, and how it was split (``split``: 'documents', 'blocks' or
    'none'), the sides' sizes and, with mixing weights, its weight and share of the training bytes."""

    path: str
    files: int = 0
    documents: int = 0
    bytes: int = 0
    split: str = "none"
    train_documents: int = 0
    train_bytes: int = 0
    heldout_documents: int = 0
    heldout_bytes: int = 0
    heldout_digest: str = ""  # blake2b of the held-out text: the same split gives the same digest
    weight: float | None = None
    train_share: float | None = None  # share of the training bytes after weighting
    repeats: float | None = None  # times its training text is read per pass over the mixture
    ignored: dict[str, int] = field(default_factory=dict)  # files left out, by suffix


@dataclass
class CorpusStats:
    """What reading a corpus kept and skipped; log ``as_dict()``, print ``report_lines()``.

    Counters are updated while documents are read: complete after ``load_corpus(streaming=False)``; for a
    streaming corpus they cover what this process has iterated so far.
    """

    files: int = 0
    documents: int = 0  # kept, on the requested side of the held-out split
    other_split: int = 0  # usable documents that belong to the other side of the split
    skipped_empty: int = 0  # empty or whitespace-only documents (or a null text field)
    skipped_undecodable: int = 0  # files (JSON: lines) that are not valid UTF-8, left out (encoding_errors="skip")
    replaced_undecodable: int = 0  # files (JSON: lines) read with U+FFFD for invalid UTF-8 (encoding_errors="replace")
    skipped_non_text: int = 0  # a text field that is not a string
    per_file_documents: dict[str, int] = field(default_factory=dict)
    sources: list[SourceStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        out = asdict(self)
        out.pop("per_file_documents")
        out.pop("sources")
        return out

    def report_lines(self) -> list[str]:
        """Documents and bytes per source, and how each was split (printed before training starts)."""
        total = sum(s.bytes for s in self.sources)
        docs = sum(s.documents for s in self.sources)
        lines = [f"corpus: {_plural(len(self.sources), 'source')}, {_plural(self.files, 'file')}, "
                 f"{_plural(docs, 'document')}, {format_bytes(total)}"]
        for s in self.sources:
            line = f"  {s.path}: {_plural(s.files, 'file')}, {_plural(s.documents, 'document')}, {format_bytes(s.bytes)}"
            if s.split == "documents":
                line += (f"; held out by document: {_plural(s.heldout_documents, 'document')}, "
                         f"{format_bytes(s.heldout_bytes)}")
            elif s.split == "blocks":
                line += (f"; held out by blocks (too few documents to hold out whole ones): "
                         f"{_plural(s.heldout_documents, 'block')}, {format_bytes(s.heldout_bytes)}")
            line += f"; training {format_bytes(s.train_bytes)}"
            if s.weight is not None:
                line += f"; weight {s.weight:g}: {100 * s.train_share:.0f}% of the training bytes (read ×{s.repeats:.2f})"
            lines.append(line)
            if s.ignored:
                left = ", ".join(f"{k} ({v})" for k, v in sorted(s.ignored.items(), key=lambda kv: -kv[1]))
                lines.append(f"    left out: {left} (--text-suffixes reads such files as plain text)")
        skipped = {k: v for k, v in (("empty", self.skipped_empty), ("not text", self.skipped_non_text),
                                     ("not UTF-8, skipped", self.skipped_undecodable),
                                     ("not UTF-8, read with U+FFFD", self.replaced_undecodable)) if v}
        if skipped:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))
        return lines


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_bytes(n: float) -> str:
    """1,234 bytes / 56.7 KB / 8.9 MB."""
    if n < 10_000:
        return f"{int(n):,} bytes"
    if n < 10_000_000:
        return f"{n / 1e3:.1f} KB"
    return f"{n / 1e6:.1f} MB"


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed for .gz and .zst."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise CorpusError(f"{path}: reading .zst files needs the zstandard package "
                                  "(pip install zstandard, or pip install 'bytelift[zstd]')") from None
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return open(path, "rb")
    except OSError as err:
        raise CorpusError(f"cannot read {path}: {err.strerror or err}") from err


def _read_all(path: Path) -> bytes:
    with _open(path) as f:
        try:
            return f.read()
        except (OSError, EOFError, ValueError) as err:  # gzip.BadGzipFile, zstandard.ZstdError, truncated files
            raise CorpusError(f"cannot read {path}: {err}") from err


def _decode(data: bytes, where: str, errors: str, stats: CorpusStats, offset: int = 0) -> str | None:
    """UTF-8 text of ``data``; invalid UTF-8 per ``errors`` (None: left out)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if errors == "replace":
            stats.replaced_undecodable += 1
            return data.decode("utf-8", "replace")
        if errors == "skip":
            stats.skipped_undecodable += 1
            return None
        raise CorpusError(
            f"{where} is not UTF-8 at byte {offset + err.start} ({err.reason}); --errors replace reads it with "
            "U+FFFD, --errors skip leaves it out"
        ) from None


def _field_path(text_field: str) -> tuple[str, ...]:
    parts = tuple(text_field.split("."))
    if not text_field or any(not p for p in parts):
        raise CorpusError(f"invalid text field {text_field!r}: give a field name or a dotted path (meta.body)")
    return parts


def field_value(record: Any, path: tuple[str, ...]) -> Any:
    """The value at a dotted path in nested dicts and lists (list items by index); ``_MISSING`` when absent."""
    value = record
    for key in path:
        if isinstance(value, dict):
            if key not in value:
                return _MISSING
            value = value[key]
        elif isinstance(value, (list, tuple)) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
    return value


def _missing_field(where: str, record: Any, text_field: str) -> CorpusError:
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    return CorpusError(f"{where} has no field {text_field!r} (its fields: {fields}); --text-field names another")


def _json_records(path: Path, errors: str, stats: CorpusStats) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON Lines file, or of a JSON file holding one array of records."""
    with _open(path) as f:
        try:
            head = f.peek(64)[:64] if hasattr(f, "peek") else b""
        except (OSError, EOFError, ValueError) as err:
            raise CorpusError(f"cannot read {path}: {err}") from err
        if head.lstrip()[:1] == b"[":  # one array of records
            text = _decode(_read_all(path), str(path), errors, stats)
            if text is None:
                return
            try:
                records = json.loads(text)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
            for i, record in enumerate(records):
                yield f"{path} record {i}", record
            return
        offset = 0
        try:
            for lineno, raw in enumerate(f, 1):
                where = f"{path} line {lineno}"
                line = _decode(raw, where, errors, stats, offset)
                offset += len(raw)
                if line is None or not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); "
                                      "JSON Lines files hold one record per line") from None
        except (OSError, EOFError) as err:
            raise CorpusError(f"cannot read {path}: {err}") from err


def _table_rows(path: Path, kind: str, top: str) -> Iterator[tuple[str, Any]]:
    """(where, value of the top-level column) of a Parquet file or a saved ``datasets`` folder."""
    import datasets

    try:
        if kind == "parquet":
            tables = [(str(path), datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True))]
        else:
            loaded = datasets.load_from_disk(str(path))
            splits = sorted(loaded) if isinstance(loaded, datasets.DatasetDict) else [None]
            tables = [(f"{path}" + (f" (split {s})" if s else ""), loaded[s] if s else loaded) for s in splits]
        for where, table in tables:
            columns = list(table.column_names or [])
            if top not in columns:
                raise CorpusError(f"{where} has no column {top!r} (its columns: {columns}); --text-field names another")
            for i, row in enumerate(table.select_columns([top])):
                yield f"{where} row {i}", row[top]
    except CorpusError:
        raise
    except Exception as err:  # pyarrow / datasets errors do not say which file
        raise CorpusError(f"could not read {path}: {type(err).__name__}: {err}") from err


def _raw_documents(path: Path, kind: str, text_field: str, txt_mode: str, errors: str,
                   stats: CorpusStats) -> Iterator[Any]:
    """Raw documents of one corpus entry (strings, or whatever the text field holds)."""
    if kind == "text":
        text = _decode(_read_all(path), str(path), errors, stats)
        if text is None:
            return
        if txt_mode == "paragraph":
            yield from (p.strip("\r\n") for p in _PARAGRAPH_BREAK.split(text))
        else:
            yield text
        return
    fields = _field_path(text_field)
    if kind == "json":
        rows = ((where, record, field_value(record, fields)) for where, record in _json_records(path, errors, stats))
    else:
        rows = ((where, value, field_value(value, fields[1:])) for where, value in _table_rows(path, kind, fields[0]))
    for where, record, value in rows:
        if value is _MISSING:
            raise _missing_field(where, record, text_field)
        yield value


def _source_documents(source: Source, *, text_field: str, txt_mode: str, encoding_errors: str,
                      stats: CorpusStats) -> Iterator[str]:
    """The usable documents of a source, in order (empty and non-text ones counted and left out)."""
    for path, kind in source.entries:
        stats.files += 1
        kept = 0
        for doc in _raw_documents(path, kind, text_field, txt_mode, encoding_errors, stats):
            if doc is None:
                stats.skipped_empty += 1
            elif not isinstance(doc, str):
                stats.skipped_non_text += 1
            elif not doc.strip():
                stats.skipped_empty += 1
            else:
                kept += 1
                yield doc
        stats.per_file_documents[str(path)] = kept


# ========================================================================================================
# The held-out split
# ========================================================================================================


def is_heldout(text: str, fraction: float, salt: bytes = HELDOUT_SALT) -> bool:
    """Stable per-document split: blake2b(text) mapped to [0, 1) < ``fraction``.

    Depends only on the text (not on order, file, shard or process), so a document — and every exact
    duplicate of it — is always on the same side.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=salt).digest()
    return int.from_bytes(digest, "little") / _HASH_SCALE < fraction


def split_mode(documents: int, fraction: float) -> str:
    """How a source of this many documents is split: 'none', 'documents' or 'blocks' (module docstring)."""
    if fraction <= 0.0:
        return "none"
    return "documents" if documents * fraction >= MIN_HELDOUT_DOCUMENTS else "blocks"


def split_document(text: str, max_bytes: int | None) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes, at line breaks; ``"".join`` gives it back.

    A document within the limit (or ``max_bytes`` 0/None) is one piece. Otherwise the pieces are balanced:
    each cut goes to the line end (just after a ``"\\n"``) nearest to an equal share of the bytes left,
    among the line ends within the limit; only where no line end is within the limit (a line longer than
    ``max_bytes``) is the line cut, at the last UTF-8 character boundary within the limit. The work is per
    piece (a numpy search over the line ends), not per byte or per line.
    """
    if not max_bytes or len(text) * 4 <= max_bytes:  # UTF-8 needs at most 4 bytes per character
        return [text]
    data = text.encode("utf-8", "surrogatepass")  # surrogatepass: lone surrogates (from JSON) round-trip
    total = len(data)
    if total <= max_bytes:
        return [text]
    raw = np.frombuffer(data, dtype=np.uint8)
    line_ends = np.flatnonzero(raw == 0x0A) + 1  # byte offsets just after each "\n"
    cuts, start = [0], 0
    while total - start > max_bytes:
        left = total - start
        target = start + -(-left // -(-left // max_bytes))  # ceil(left / number of pieces still needed)
        limit = start + max_bytes
        i = int(np.searchsorted(line_ends, target, side="right"))  # line_ends[:i] <= target < line_ends[i:]
        below = int(line_ends[i - 1]) if i > 0 and line_ends[i - 1] > start else None
        above = int(line_ends[i]) if i < len(line_ends) and line_ends[i] <= limit else None
        if below is not None and (above is None or target - below <= above - target):
            cut = below
        elif above is not None:
            cut = above
        else:  # no line end within the limit: cut the line at a character boundary
            cut = limit
            while raw[cut] & 0xC0 == 0x80:  # a continuation byte: at most 3 steps back
                cut -= 1
            while cut < total and (cut <= start or raw[cut] & 0xC0 == 0x80):  # max_bytes < a character: take it
                cut += 1
        cuts.append(cut)
        start = cut
    cuts.append(total)
    return [data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(cuts, cuts[1:])]


def heldout_blocks(n_blocks: int, fraction: float, block_bytes: int = HELDOUT_BLOCK_BYTES,
                   min_bytes: int = MIN_HELDOUT_BYTES, max_share: float = MAX_HELDOUT_SHARE) -> list[int]:
    """Indices of the held-out blocks among ``n_blocks``: evenly spaced, ``fraction`` of them but at least
    ``min_bytes`` worth, at most ``max_share`` of them, at least one while another is left for training."""
    if fraction <= 0.0 or n_blocks < 2:
        return []
    want = max(math.ceil(fraction * n_blocks), math.ceil(min_bytes / block_bytes))
    k = max(1, min(want, int(max_share * n_blocks)))
    return sorted({int((i + 0.5) * n_blocks / k) for i in range(k)})


def split_by_blocks(docs: Sequence[str], fraction: float, block_bytes: int = HELDOUT_BLOCK_BYTES) -> tuple[list[str], list[str]]:
    """(training documents, held-out blocks) of a source split by blocks (module docstring)."""
    blocks = [(d, piece) for d, doc in enumerate(docs) for piece in split_document(doc, block_bytes)]
    held = set(heldout_blocks(len(blocks), fraction, block_bytes))
    train, heldout, run, run_doc = [], [], [], -1

    def flush():
        text = "".join(run)
        if text.strip():
            train.append(text)
        run.clear()

    for i, (d, piece) in enumerate(blocks):
        if i in held:
            flush()
            if piece.strip():
                heldout.append(piece)
            continue
        if d != run_doc:
            flush()
            run_doc = d
        run.append(piece)
    flush()
    return train, heldout


def split_source(docs: Sequence[str], fraction: float) -> tuple[str, list[str], list[str]]:
    """(mode, training documents, held-out documents) of one source's documents."""
    mode = split_mode(len(docs), fraction)
    if mode == "none":
        return mode, list(docs), []
    if mode == "blocks":
        return (mode, *split_by_blocks(docs, fraction))
    train, heldout = [], []
    for doc in docs:
        (heldout if is_heldout(doc, fraction) else train).append(doc)
    return mode, train, heldout


def _digest(texts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=8, person=HELDOUT_SALT)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


# ========================================================================================================
# Mixing weights
# ========================================================================================================


def apply_weights(train_bytes: Sequence[Sequence[int]], weights: Sequence[float]) -> tuple[np.ndarray, list[float]]:
    """Indices into the concatenated training documents of the sources so that source i holds the share
    weights[i] / sum(weights) of the training bytes, the mixture keeping the corpus's size.

    Source i is read r_i = share_i × total / bytes_i times: floor(r_i) times whole, plus a fixed seeded
    subset of its documents holding the remaining fraction of its bytes. Returns (indices, r per source).
    """
    total = sum(sum(b) for b in train_bytes)
    wsum = float(sum(weights))
    out, repeats, start = [], [], 0
    for i, (sizes, w) in enumerate(zip(train_bytes, weights)):
        sizes = np.asarray(sizes, dtype=np.int64)
        own = int(sizes.sum())
        r = (w / wsum) * total / max(own, 1)
        whole = int(r)
        ids = np.arange(start, start + len(sizes))
        out += [ids] * whole
        order = np.random.default_rng([WEIGHT_SEED, i]).permutation(len(sizes))
        take = int(np.searchsorted(np.cumsum(sizes[order]), (r - whole) * own, side="left"))
        out.append(ids[np.sort(order[:take])])
        repeats.append(r)
        start += len(sizes)
    return (np.concatenate(out) if out else np.zeros(0, dtype=np.int64)), repeats


def check_weights(weights: Sequence[float] | None, n_sources: int) -> None:
    if weights is None:
        return
    if len(weights) != n_sources:
        raise CorpusError(f"{n_sources} corpus path(s) but {len(weights)} weight(s): give one weight per --data path")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise CorpusError(f"mixing weights must be positive numbers, got {list(weights)}")


# ========================================================================================================
# Whole corpora
# ========================================================================================================


@dataclass
class SplitCorpus:
    """A corpus read into memory: its documents, the training side (``train_index`` orders and repeats
    ``train`` by the mixing weights) and the held-out side, with the stats of the reading."""

    documents: list[str]
    train: list[str]
    train_index: np.ndarray | None
    heldout: list[str]
    stats: CorpusStats


def _check_options(txt_mode: str, heldout_fraction: float, encoding_errors: str) -> None:
    if txt_mode not in TXT_MODES:
        raise CorpusError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise CorpusError(f"the held-out fraction must be in [0, 1), got {heldout_fraction}")
    if encoding_errors not in ENCODING_ERRORS:
        raise CorpusError(f"encoding errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")


def _no_text(source: Source, text_field: str) -> CorpusError:
    return CorpusError(
        f"corpus path {source.given} has no usable text (every document is empty, not UTF-8, or lacks the "
        f"field {text_field!r}; {_plural(len(source.entries), 'file')} read)"
    )


def read_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    txt_mode: str = "document",
    text_suffixes: Sequence[str] = TEXT_SUFFIXES,
    encoding_errors: str = "strict",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    weights: Sequence[float] | None = None,
) -> SplitCorpus:
    """Read every source into memory and split it (module docstring); ``stats.sources`` reports each.

    Raises:
        CorpusError: see ``find_sources``; invalid UTF-8 (``encoding_errors="strict"``), malformed JSON, a
            record without ``text_field``, a source without usable text, bad options or weights.
    """
    _check_options(txt_mode, heldout_fraction, encoding_errors)
    sources = find_sources(paths, text_suffixes)
    check_weights(weights, len(sources))
    stats = CorpusStats()
    documents, train, heldout, train_sizes = [], [], [], []
    for source in sources:
        files_before = stats.files
        docs = list(_source_documents(source, text_field=text_field, txt_mode=txt_mode,
                                      encoding_errors=encoding_errors, stats=stats))
        if not docs:
            raise _no_text(source, text_field)
        mode, tr, held = split_source(docs, heldout_fraction)
        sizes = [utf8_len(t) for t in tr]
        stats.sources.append(SourceStats(
            path=source.given, files=stats.files - files_before, documents=len(docs),
            bytes=sum(utf8_len(d) for d in docs), split=mode, train_documents=len(tr), train_bytes=sum(sizes),
            heldout_documents=len(held), heldout_bytes=sum(utf8_len(h) for h in held),
            heldout_digest=_digest(held) if held else "", ignored=dict(source.ignored),
        ))
        documents += docs
        train += tr
        heldout += held
        train_sizes.append(sizes)
    index = None
    if weights is not None:
        index, repeats = apply_weights(train_sizes, weights)
        total = sum(s.train_bytes * r for s, r in zip(stats.sources, repeats)) or 1
        for s, w, r in zip(stats.sources, weights, repeats):
            s.weight, s.repeats, s.train_share = float(w), r, s.train_bytes * r / total
    return SplitCorpus(documents, train, index, heldout, stats)


def load_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str | None = "train",
    streaming: bool = False,
    weights: Sequence[float] | None = None,
    **options: Any,
) -> tuple[datasets.Dataset | datasets.IterableDataset, CorpusStats]:
    """One side of a corpus as a ``datasets`` corpus with one ``"text"`` column.

    Args:
        paths, weights, options (text_field, txt_mode, text_suffixes, encoding_errors, heldout_fraction): as
            ``read_corpus``.
        split: ``"train"`` (weighted), ``"heldout"`` or ``None`` (every document, unsplit and unweighted).
        streaming: an ``IterableDataset`` read lazily (sources split by document stream file by file; a source
            split by blocks has few documents and is read whole) instead of an in-memory ``Dataset``.

    Returns:
        (corpus, stats). Every given path is checked up front (also when streaming: its documents are read
        until the split mode is known).
    """
    import datasets

    if split not in ("train", "heldout", None):
        raise CorpusError(f"split must be 'train', 'heldout' or None, got {split!r}")
    if not streaming:
        corpus = read_corpus(paths, weights=weights if split == "train" else None, **options)
        stats = corpus.stats
        texts = {"train": corpus.train, "heldout": corpus.heldout, None: corpus.documents}[split]
        stats.documents = len(texts)
        stats.other_split = len({"train": corpus.heldout, "heldout": corpus.train, None: []}[split])
        ds = datasets.Dataset.from_dict({"text": texts})
        if split == "train" and corpus.train_index is not None:
            ds = ds.select(corpus.train_index)
        return ds, stats
    if weights is not None and split == "train":
        raise CorpusError("mixing weights need the in-memory corpus (streaming=False)")
    return _streaming_corpus(paths, split=split, **options)


def _streaming_corpus(paths, *, split: str | None, text_field: str = "text", txt_mode: str = "document",
                      text_suffixes: Sequence[str] = TEXT_SUFFIXES, encoding_errors: str = "strict",
                      heldout_fraction: float = DEFAULT_HELDOUT_FRACTION):
    import datasets

    _check_options(txt_mode, heldout_fraction, encoding_errors)
    sources = find_sources(paths, text_suffixes)
    stats = CorpusStats()
    read = dict(text_field=text_field, txt_mode=txt_mode, encoding_errors=encoding_errors)
    # Up to this many documents decide a source's split mode (module docstring); reading stops there.
    enough = math.ceil(MIN_HELDOUT_DOCUMENTS / heldout_fraction) if heldout_fraction > 0 else 1
    units: list[dict[str, Any]] = []
    for source in sources:
        count = sum(1 for _ in zip(range(enough), _source_documents(source, stats=CorpusStats(), **read)))
        if count == 0:
            raise _no_text(source, text_field)
        mode = split_mode(count, heldout_fraction)
        if mode == "blocks":  # read whole, split together
            units.append({"given": source.given, "entries": [(str(p), k) for p, k in source.entries], "mode": mode})
        else:  # file by file (one shard each)
            units += [{"given": source.given, "entries": [(str(p), k)], "mode": mode} for p, k in source.entries]

    def generate(units: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
        for unit in units:
            src = Source(unit["given"], [(Path(p), k) for p, k in unit["entries"]])
            docs: Iterator[str] = _source_documents(src, stats=stats, **read)
            if split is not None and unit["mode"] == "blocks":
                _, train, held = split_source(list(docs), heldout_fraction)
                docs, other = (iter(train), held) if split == "train" else (iter(held), train)
                stats.other_split += len(other)
            for doc in docs:
                if split is not None and unit["mode"] != "blocks" and is_heldout(doc, heldout_fraction) != (
                        split == "heldout"):  # mode "none": is_heldout is always False
                    stats.other_split += 1
                    continue
                stats.documents += 1
                yield {"text": doc}

    return datasets.IterableDataset.from_generator(generate, gen_kwargs={"units": units}), stats


def corpus_options(cfg: Any) -> dict[str, Any]:
    """The reading options of a run config (TrainConfig, ConvertConfig, EvalConfig) as keyword arguments
    of ``read_corpus``/``load_corpus``: one place that keeps training and evaluation reading the same split."""
    return dict(text_field=cfg.text_field, text_suffixes=tuple(cfg.text_suffixes), encoding_errors=cfg.encoding_errors,
                heldout_fraction=cfg.heldout_fraction)
