"""Training data: text corpora -> fixed windows of source tokens -> byte-level training examples.

Pipeline (DESIGN §2 "Data", reference spec §6.1)::

    files, folders, saved datasets ──bytelift.corpus_reading.load_corpus──> documents (HF Dataset or IterableDataset)
        ──(optional) mix_documents with `bytelift.char_skills` documents──>
        ──ByteWindowDataset: cut long documents into pieces of a few windows, shuffle by seed,
          shard by (rank, world_size), tokenise in batches,
          concatenate with the source eos between documents, cut windows of N tokens──>
        example dicts ──ByteCollator──> padded batches (+ boundary labels, patch ids, label masks)

Example layout (one window of N source tokens t_0..t_{N-1}; reference: add_bos + skip_last)::

    input_ids     = [BOS] + bytes(t_0) + ... + bytes(t_{N-2})      byte-side ids, length L
    patch_lengths = [1, len(t_0), ..., len(t_{N-2})]               P = N patches, sum == L
    token_ids     = [t_0, ..., t_{N-1}]                            P tokens (teacher)

Patch 0 is BOS; patch j (j ≥ 1) spells token t_{j-1}. The teacher reads ``[eos] + token_ids[:-1]`` (P
positions): teacher position j ↔ student patch j, and teacher position j predicts t_j, which student patch
j + 1 spells. When the bytes exceed the cap (N × ``byte_expansion_factor``) the window is cut after the
last whole patch that fits and ``token_ids`` is cut to the same P, so ``len(token_ids) == P`` always.

Decisions (documented because the reference differs or is silent):

- Document separator = the source's **eos** id (the token the source model saw between documents during
  pretraining). It becomes the byte-side ``EOS_ID`` (the reference uses BOS == EOS; we keep them apart).
- A window never *starts* with the separator: a leading eos is dropped (the reference strips leading eos
  tokens too) because it would duplicate the BOS patch. Windows may start mid-document (fixed-size packing,
  as in the reference); we do not drop the leading partial document — that would waste up to a window of
  text per document boundary.
- The reference's ``skip_boundary_before_eos`` (the token before an eos joins the eos patch) is not applied:
  patches are exactly the source tokens, so patch j ↔ token j − 1 holds everywhere.
- The last window of an epoch (shorter than N) is kept unless ``drop_last``: the collator pads anyway.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch

# Corpus reading lives in bytelift.corpus_reading; these names stay importable from here for older callers.
from bytelift.corpus_reading import CorpusStats, is_heldout, load_corpus, split_document
from bytelift.tokenization import BOS_ID, IGNORE_INDEX, PAD_ID, ByteTokenizer

if TYPE_CHECKING:  # a type hint only: data needs no character-skill text otherwise
    from bytelift.char_skills import CharSkillGenerator

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_WINDOW_TOKENS",
    "DEFAULT_BYTE_EXPANSION_FACTOR",
    "CorpusStats",
    "load_corpus",
    "is_heldout",
    "split_document",
    "windows_to_examples",
    "ByteWindowDataset",
    "ByteCollator",
    "patch_boundaries",
    "patch_ids_from_lengths",
    "BpeMergeResult",
    "bpe_merge_patches",
    "mix_documents",
]

DEFAULT_WINDOW_TOKENS = 4096  # reference SEQUENCE_LENGTH
DEFAULT_BYTE_EXPANSION_FACTOR = 6  # reference byte cap = 4096 × 6 = 24,576 bytes
RATIO_EPS = 1e-9
# Long training documents are cut into pieces of about this many windows before the document shuffle, so
# that the pieces of one long file (a 229 KB stdlib module is ~470 windows of 128 tokens) are spread over
# the epoch instead of filling every window for a long stretch of steps. Smaller pieces mix more evenly but
# add a separator and a cut context per piece; with a few windows per piece most windows still hold
# contiguous text, and the window shuffle buffer (64 windows) mixes a piece's windows with others.
DOCUMENT_PIECE_WINDOWS = 4
# Bytes per source token assumed to size pieces from windows (BPE tokenizers average ~4 on English prose
# and ~3 on code, where a piece then spans ~5 windows instead of 4).
PIECE_BYTES_PER_TOKEN = 4


# ========================================================================================================
# 1. Windows -> examples
# ========================================================================================================


def windows_to_examples(
    windows: Sequence[np.ndarray], tokenizer: ByteTokenizer, byte_cap: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Turn windows of source tokens into training examples (one vectorised pass for the whole list).

    Args:
        windows: each (n_i,) int64 source ids, n_i ≥ 2.
        tokenizer: a ``ByteTokenizer`` wrapping the source tokenizer.
        byte_cap: maximum ``len(input_ids)``; a longer window is cut after the last whole patch that fits.

    Returns:
        one dict per window (all int64 tensors):
        ``input_ids`` (L,), ``patch_lengths`` (P,), ``expanded_ids`` (L,), ``token_ids`` (P,); see the module
        docstring for the layout and the teacher alignment.
    """
    if not windows:
        return []
    if any(len(w) < 2 for w in windows):
        raise ValueError("windows_to_examples: every window needs at least 2 tokens")
    # All windows' tokens but the last (skip_last) in one call: bytes and per-token lengths.
    body = np.concatenate([np.asarray(w[:-1], dtype=np.int64) for w in windows])
    byte_ids, token_lengths = tokenizer.source_bytes_and_patches(body)
    tokens_per_window = np.array([len(w) - 1 for w in windows])
    token_splits = np.cumsum(tokens_per_window)[:-1]
    byte_splits = np.cumsum(token_lengths)[token_splits - 1] if len(windows) > 1 else np.array([], dtype=np.int64)
    inputs, lengths, tokens = [], [], []
    for w, b, n in zip(windows, np.split(byte_ids, byte_splits), np.split(token_lengths, token_splits)):
        patch_lengths = np.concatenate([[1], n])
        ids = np.concatenate([[BOS_ID], b])
        num_patches = len(patch_lengths)
        if byte_cap is not None and len(ids) > byte_cap:
            ends = np.cumsum(patch_lengths)
            num_patches = int(np.searchsorted(ends, byte_cap, side="right"))  # patches ending within the cap
            if num_patches < 1:
                raise ValueError(f"byte_cap={byte_cap} cannot hold even the BOS patch")
            patch_lengths = patch_lengths[:num_patches]
            ids = ids[: ends[num_patches - 1]]
        inputs.append(ids)
        lengths.append(patch_lengths)
        tokens.append(np.asarray(w[:num_patches], dtype=np.int64))
    expanded = tokenizer.expander.expand_many(inputs)
    return [
        {
            "input_ids": torch.from_numpy(np.ascontiguousarray(i, dtype=np.int64)),
            "patch_lengths": torch.from_numpy(np.ascontiguousarray(p, dtype=np.int64)),
            "expanded_ids": torch.from_numpy(np.ascontiguousarray(e, dtype=np.int64)),
            "token_ids": torch.from_numpy(t),
        }
        for i, p, e, t in zip(inputs, lengths, expanded, tokens)
    ]


@dataclass
class _PieceIndex:
    """An in-memory corpus as units for the document shuffle: a whole document, or a piece of a long one."""

    rows: np.ndarray  # (U,) int64: the corpus row of each unit
    piece: np.ndarray  # (U,) int64: -1 = the whole row, else the index of the unit's text in ``texts``
    texts: list[str]  # the pieces of the documents that were cut


def _split_batch(batch: dict[str, list], max_bytes: int) -> dict[str, list[str]]:
    """``datasets`` batched map: every document of the batch replaced by its pieces, in order."""
    return {"text": [piece for text in batch["text"] for piece in split_document(text, max_bytes)]}


class ByteWindowDataset(torch.utils.data.IterableDataset):
    """Deterministic, shardable, resumable stream of byte-level training examples.

    Order, for each epoch e (identical on every rank, then sharded):

    0. when shuffling, documents longer than ``document_piece_bytes`` are cut into pieces at line breaks
       (:func:`split_document`), and each piece is a document from here on: the pieces of a long file are
       spread over the epoch instead of filling every window for a long stretch of steps (documents of a
       callable corpus stay whole: it gives its own order);
    1. documents in an order fixed by ``(seed, e)``: a permutation for an in-memory corpus, a shard-order
       shuffle + buffer shuffle (``datasets``) for a streaming one, as given for a callable;
    2. optionally mixed with character-skill documents (``char_skills`` at ``char_rate``, seeded);
    3. document i goes to rank ``i % world_size`` (each rank tokenises only its own documents);
    4. per rank: tokenised in batches, concatenated with the source eos after each document, cut into
       windows of ``window_tokens`` (a leading eos is dropped), passed through a seeded shuffle buffer of
       ``window_shuffle_buffer`` windows, converted to examples (``windows_to_examples``).

    Resuming: ``state_dict()`` captures the position after the last yielded example (epoch, examples
    consumed, documents read, token carry-over, shuffle buffer, RNG); after ``load_state_dict`` the next
    ``__iter__`` continues exactly there, skipping the documents already read without tokenising them. A
    minimal ``{"epoch", "consumed"}`` (e.g. computed by the trainer from its step count) also works, by
    replaying. Without a loaded state every ``__iter__`` is a fresh pass from epoch 0. Use
    ``DataLoader(num_workers=0)`` to checkpoint the dataset state from the training process
    (``num_workers=1`` works, but then only the step count can be checkpointed); more workers are refused,
    their interleaving would make the position ambiguous — shard across processes with rank/world_size.

    Args:
        corpus: a ``datasets.Dataset`` / ``IterableDataset`` with a ``"text"`` column, a sequence of
            strings, or a callable ``epoch -> iterable of str``.
        tokenizer: a ``ByteTokenizer`` with a source tokenizer.
        window_tokens: N, source tokens per window (reference 4096).
        byte_expansion_factor: the byte cap is ``N × factor`` (reference 6).
        seed, rank, world_size: order and sharding.
        epochs: passes over the corpus; ``None`` = forever.
        shuffle: shuffle documents (and windows) by seed; ``False`` keeps the corpus order and the documents
            whole (evaluation windows do not depend on ``document_piece_bytes``).
        document_piece_bytes: documents longer than this (UTF-8 bytes) are cut into pieces before the
            document shuffle; ``None``: ``DOCUMENT_PIECE_WINDOWS`` windows' worth (``window_tokens ×
            DOCUMENT_PIECE_WINDOWS × PIECE_BYTES_PER_TOKEN``, 2 KB for 128-token windows); 0: whole documents.
        document_shuffle_buffer: buffer of the streaming-corpus shuffle.
        window_shuffle_buffer: windows held for shuffling (only token ids are held; 0 disables).
        tokenize_batch: documents per tokenizer call; convert_batch: windows per conversion call.
        char_skills, char_rate: optional character-skill documents mixed in (fraction of documents).
        drop_last: drop each epoch's final short window.

    Example::

        corpus, stats = load_corpus(["data/"], split="train", streaming=True)
        ds = ByteWindowDataset(corpus, byte_tokenizer, seed=1234, rank=rank, world_size=world_size, epochs=None)
        loader = DataLoader(ds, batch_size=8, collate_fn=ByteCollator.from_tokenizer(byte_tokenizer, 64))
        ...  # checkpoint: ds.state_dict(); resume: ds.load_state_dict(saved) before iterating
    """

    def __init__(
        self,
        corpus: datasets.Dataset | datasets.IterableDataset | Sequence[str] | Callable[[int], Iterable[str]],
        tokenizer: ByteTokenizer,
        *,
        window_tokens: int = DEFAULT_WINDOW_TOKENS,
        byte_expansion_factor: float = DEFAULT_BYTE_EXPANSION_FACTOR,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = 1,
        shuffle: bool = True,
        document_shuffle_buffer: int = 10_000,
        window_shuffle_buffer: int = 64,
        document_piece_bytes: int | None = None,
        tokenize_batch: int = 64,
        convert_batch: int = 16,
        char_skills: CharSkillGenerator | None = None,
        char_rate: float = 0.0,
        drop_last: bool = False,
    ):
        super().__init__()
        if tokenizer.expander is None or tokenizer.source_tokenizer is None:
            raise ValueError("ByteWindowDataset needs a ByteTokenizer with a source tokenizer (from_source)")
        if window_tokens < 2:
            raise ValueError(f"window_tokens must be ≥ 2, got {window_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if document_piece_bytes is None:
            document_piece_bytes = window_tokens * DOCUMENT_PIECE_WINDOWS * PIECE_BYTES_PER_TOKEN
        if document_piece_bytes < 0:
            raise ValueError(f"document_piece_bytes must be ≥ 0 (0: whole documents), got {document_piece_bytes}")
        eos = tokenizer.source_vocab.eos_id
        if eos is None:
            raise ValueError(
                f"the source tokenizer ({tokenizer.source_vocab.tokenizer_class}) has no eos token: it is the "
                "document separator of the training windows"
            )
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.separator_id = int(eos)
        self.window_tokens = int(window_tokens)
        self.byte_cap = int(window_tokens * byte_expansion_factor)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epochs = epochs
        self.shuffle = shuffle
        self.document_shuffle_buffer = document_shuffle_buffer
        self.window_shuffle_buffer = window_shuffle_buffer if shuffle else 0
        self.document_piece_bytes = int(document_piece_bytes) if shuffle else 0
        self._pieces: _PieceIndex | None = None  # an in-memory corpus's units, built on first use
        self.tokenize_batch = tokenize_batch
        self.convert_batch = convert_batch
        self.char_skills = char_skills
        self.char_rate = char_rate
        self.drop_last = drop_last
        self._separator = np.array([self.separator_id], dtype=np.int64)
        self._epoch = 0
        self._skip = 0  # examples to replay at the next __iter__ (minimal-state resume)
        self._stream: _WindowStream | None = None
        self._resume = False  # the next __iter__ starts at the loaded position (else at the beginning)
        #: Counters over the examples this process yielded (log them): windows, truncated (cut by the byte
        #: cap), tokens (patches), bytes.
        self.window_stats = {"windows": 0, "truncated": 0, "patches": 0, "bytes": 0}

    # ---- documents ------------------------------------------------------------------------------------

    def _piece_index(self) -> _PieceIndex:
        """The units of an in-memory corpus (built once: one pass over the documents, cutting the long ones)."""
        if self._pieces is None:
            corpus, rows, piece, texts = self.corpus, [], [], []
            chunk = 1024
            for start in range(0, len(corpus), chunk):
                batch = corpus[start : start + chunk]
                batch = batch["text"] if isinstance(corpus, datasets.Dataset) else batch
                for row, text in enumerate(batch, start):
                    parts = split_document(text, self.document_piece_bytes)
                    rows += [row] * len(parts)
                    if len(parts) == 1:
                        piece.append(-1)
                    else:
                        piece += range(len(texts), len(texts) + len(parts))
                        texts += parts
            self._pieces = _PieceIndex(np.array(rows, dtype=np.int64), np.array(piece, dtype=np.int64), texts)
        return self._pieces

    def _read_units(self, units: np.ndarray) -> list[str]:
        """The texts of units (indices into ``_piece_index``) of an in-memory corpus; whole rows are read
        from the corpus, pieces from the index."""
        index = self._piece_index()
        rows, piece = index.rows[units], index.piece[units]
        whole = rows[piece < 0]
        if isinstance(self.corpus, datasets.Dataset):
            read = iter(self.corpus[whole]["text"] if len(whole) else [])
        else:
            read = (self.corpus[int(r)] for r in whole)
        return [next(read) if p < 0 else index.texts[p] for p in piece.tolist()]

    def _global_documents(self, epoch: int) -> Iterator[str]:
        """All documents (units, when long ones are cut) of an epoch, in the seeded order shared by every
        rank (before sharding)."""
        corpus, rng = self.corpus, np.random.default_rng([self.seed, epoch])
        if isinstance(corpus, datasets.IterableDataset):
            if self.shuffle:
                if self.document_piece_bytes:  # pieces enter the shuffle buffer as documents of their own
                    corpus = corpus.select_columns(["text"]).map(
                        _split_batch, batched=True, fn_kwargs={"max_bytes": self.document_piece_bytes}
                    )
                corpus = corpus.shuffle(seed=self.seed, buffer_size=self.document_shuffle_buffer)
                corpus.set_epoch(epoch)
            docs: Iterable[str] = (row["text"] for row in corpus)
        elif callable(corpus):
            docs = corpus(epoch)
        elif self.document_piece_bytes:  # in memory, with long documents cut: a permutation of the units
            order = rng.permutation(len(self._piece_index().rows))
            chunk = 1024  # units read at once (one Arrow read for their whole rows)
            docs = itertools.chain.from_iterable(
                self._read_units(order[i : i + chunk]) for i in range(0, len(order), chunk)
            )
        elif isinstance(corpus, datasets.Dataset):
            order = rng.permutation(len(corpus)) if self.shuffle else np.arange(len(corpus))
            chunk = 1024  # rows fetched per Arrow read
            docs = itertools.chain.from_iterable(
                corpus[order[i : i + chunk]]["text"] for i in range(0, len(order), chunk)
            )
        else:
            order = rng.permutation(len(corpus)) if self.shuffle else range(len(corpus))
            docs = (corpus[i] for i in order)
        if self.char_skills is not None and self.char_rate > 0:
            char_docs = self.char_skills.documents(seed=self.seed * 1_000_003 + epoch)
            docs = mix_documents(docs, char_docs, self.char_rate, seed=[self.seed, epoch, 1])
        return iter(docs)

    def documents(self, epoch: int = 0) -> Iterator[str]:
        """This rank's documents (or pieces of documents) of ``epoch``, in order (every rank reads all,
        keeps every world_size-th)."""
        return itertools.islice(self._global_documents(epoch), self.rank, None, self.world_size)

    # ---- windows --------------------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer.source_tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in enc]

    def _new_stream(self, epoch: int, documents_read: int = 0) -> _WindowStream:
        return _WindowStream(
            epoch=epoch, documents_read=documents_read, rng=np.random.default_rng([self.seed, epoch, self.rank, 2])
        )

    def _next_raw_window(self, st: _WindowStream) -> np.ndarray | None:
        """Next window in packing order (before the shuffle buffer); None at the end of the epoch."""
        N, sep = self.window_tokens, self.separator_id
        while True:
            pending = st.pending
            while len(pending) and pending[0] == sep:  # per window, not per byte: at most a few steps
                pending = pending[1:]  # a window never starts with the separator (it would repeat BOS)
            if len(pending) >= N:
                st.pending = pending[N:]
                return pending[:N]
            if st.docs_done:
                st.pending = pending[:0]
                return pending if len(pending) >= 2 and not self.drop_last else None
            if st.docs is None:  # opened lazily: a restored, not yet iterated dataset stays picklable
                st.docs = itertools.islice(self.documents(st.epoch), st.documents_read, None)
            batch = list(itertools.islice(st.docs, self.tokenize_batch))
            if not batch:
                st.docs_done, st.pending = True, pending
                continue
            st.documents_read += len(batch)
            pieces = [pending]
            for ids in self._tokenize(batch):  # per document: its tokens, then the separator
                pieces += [ids, self._separator]
            st.pending = np.concatenate(pieces)

    def _next_window(self, st: _WindowStream) -> np.ndarray | None:
        """Next window in yield order (through the seeded shuffle buffer); None at the end of the epoch."""
        size = self.window_shuffle_buffer
        while not st.carry and not st.finished:
            w = self._next_raw_window(st)
            if w is None:  # end of the documents: flush the buffer in a seeded random order
                st.rng.shuffle(st.buffer)
                st.carry, st.buffer, st.finished = st.buffer, [], True
            elif size <= 1:
                return w
            elif len(st.buffer) < size:
                st.buffer.append(w)
            else:
                k = int(st.rng.integers(size))
                st.buffer[k], w = w, st.buffer[k]
                return w
        return st.carry.pop(0) if st.carry else None

    def token_windows(self, epoch: int = 0) -> Iterator[np.ndarray]:
        """This rank's windows of source ids for ``epoch`` in yield order: (≤ N,) int64 each."""
        st = self._new_stream(epoch)
        while (w := self._next_window(st)) is not None:
            yield w

    # ---- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position after the last example yielded, enough to resume without re-tokenising.

        Holds the epoch, examples consumed in it, documents (pieces) read, the token carry-over, the shuffle
        buffer, the RNG state (tensors and Python scalars: safe for ``torch.save``/``torch.load(weights_only=True)``)
        and the piece size that the count of documents read depends on.
        Reflects the process that iterates (the main process with ``num_workers=0``).
        """
        state: dict[str, Any] = {"epoch": self._epoch, "consumed": 0, "seed": self.seed, "rank": self.rank,
                                 "world_size": self.world_size}
        st = self._stream
        if st is None or st.epoch != self._epoch:
            return {**state, "consumed": self._skip}
        as_tensor = lambda w: torch.from_numpy(np.ascontiguousarray(w))  # noqa: E731
        return {
            **state,
            "consumed": st.consumed,
            "documents_read": st.documents_read,
            "document_piece_bytes": self.document_piece_bytes,
            "docs_done": st.docs_done,
            "finished": st.finished,
            "pending": as_tensor(st.pending),
            "buffer": [as_tensor(w) for w in st.buffer],
            "carry": [as_tensor(w) for w in st.in_flight + st.carry],
            "rng": st.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict()``).

        A full state resumes at once (documents already read are skipped without tokenising); a minimal
        ``{"epoch", "consumed"}`` replays the epoch's windows up to ``consumed`` (exact, but re-tokenises).
        """
        for key in ("seed", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]}, this dataset has {getattr(self, key)}")
        if "documents_read" in state and state.get("document_piece_bytes", 0) != self.document_piece_bytes:
            # documents_read counts pieces of that size (a state without the key counted whole documents)
            raise ValueError(
                f"state was saved with document_piece_bytes={state.get('document_piece_bytes', 0)}, this dataset "
                f"has {self.document_piece_bytes}"
            )
        self._epoch, self._skip, self._stream = int(state["epoch"]), int(state["consumed"]), None
        if "documents_read" in state:
            st = self._new_stream(self._epoch, int(state["documents_read"]))
            st.consumed, st.docs_done, st.finished = int(state["consumed"]), bool(state["docs_done"]), bool(
                state["finished"])
            st.pending = np.asarray(state["pending"], dtype=np.int64)
            st.buffer = [np.asarray(w, dtype=np.int64) for w in state["buffer"]]
            st.carry = [np.asarray(w, dtype=np.int64) for w in state["carry"]]
            st.rng.bit_generator.state = state["rng"]
            self._stream, self._skip = st, 0
        self._resume = True

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self._epoch, self._skip, self._stream, self._resume = int(epoch), 0, None, True

    # ---- iteration ------------------------------------------------------------------------------------

    def _count(self, example: dict[str, torch.Tensor], window: np.ndarray) -> None:
        stats = self.window_stats
        stats["windows"] += 1
        stats["truncated"] += len(example["token_ids"]) < len(window)
        stats["patches"] += len(example["patch_lengths"])
        stats["bytes"] += len(example["input_ids"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Examples of epochs 0, 1, ... (or from the position given to ``load_state_dict``/``set_epoch``).

        One iterator at a time: the position it reaches is what ``state_dict`` reports.
        """
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(
                "ByteWindowDataset supports DataLoader(num_workers=0 or 1) (exact resume needs one stream per "
                "rank; shard across processes with rank/world_size)"
            )
        if not self._resume:  # a fresh pass, as usual for an iterable dataset (evaluation loops re-iterate)
            self._epoch, self._skip, self._stream = 0, 0, None
        self._resume = False
        while self.epochs is None or self._epoch < self.epochs:
            if self._stream is None or self._stream.epoch != self._epoch:
                self._stream = self._new_stream(self._epoch)
                for _ in range(self._skip):  # minimal-state resume: replay without converting
                    self._stream.consumed += self._next_window(self._stream) is not None
                self._skip = 0
            st = self._stream
            while True:
                group = []
                while len(group) < self.convert_batch and (w := self._next_window(st)) is not None:
                    group.append(w)
                if not group:
                    break
                for i, example in enumerate(windows_to_examples(group, self.tokenizer, self.byte_cap)):
                    st.in_flight = group[i + 1 :]  # converted but not yet yielded: part of the state
                    st.consumed += 1
                    self._count(example, group[i])
                    yield example
                st.in_flight = []
            self._epoch, self._stream = self._epoch + 1, None


@dataclass
class _WindowStream:
    """Iteration state of one rank in one epoch (see ``ByteWindowDataset.state_dict``)."""

    epoch: int
    documents_read: int
    rng: np.random.Generator  # shuffle-buffer RNG
    docs: Iterator[str] | None = None  # this rank's documents not yet read (opened on first use)
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # tokens not in a window
    buffer: list[np.ndarray] = field(default_factory=list)  # window shuffle buffer
    carry: list[np.ndarray] = field(default_factory=list)  # windows released, in yield order
    in_flight: list[np.ndarray] = field(default_factory=list)  # converted, not yet yielded
    consumed: int = 0  # examples yielded in this epoch
    docs_done: bool = False
    finished: bool = False


# ========================================================================================================
# 2. Collation
# ========================================================================================================


def patch_boundaries(patch_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, P) patch lengths (0 = padding) -> (B, length) bool, True at the last byte of every patch."""
    B = patch_lengths.shape[0]
    ends = patch_lengths.long().cumsum(dim=1) - 1
    valid = patch_lengths > 0
    out = torch.zeros(B, length + 1, dtype=torch.bool, device=patch_lengths.device)
    # Padding patches write to a spare column that is cut off.
    out.scatter_(1, torch.where(valid, ends, torch.full_like(ends, length)), True)
    return out[:, :length]


def patch_ids_from_lengths(patch_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, P) patch lengths -> (B, length) long: index of the patch holding each byte, -1 past the patches."""
    ends = patch_boundaries(patch_lengths, length)
    ids = ends.long().cumsum(dim=1) - ends.long()  # boundaries strictly before t
    covered = torch.arange(length, device=patch_lengths.device)[None, :] < patch_lengths.sum(dim=1, keepdim=True)
    return torch.where(covered, ids, torch.full_like(ids, -1))


def _pad(seqs: list[torch.Tensor], value: int, length: int | None = None) -> torch.Tensor:
    out = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
    if length is not None and out.shape[1] < length:
        out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=value)
    return out


class ByteCollator:
    """Right-pad a list of examples (from :class:`ByteWindowDataset`) into a training batch.

    Batch (B rows, L = max bytes rounded up to ``pad_to_multiple_of``, P = max patches):

    - ``input_ids`` (B, L) long, PAD_ID on padding; ``attention_mask`` (B, L) long 1/0;
    - ``expanded_ids`` (B, L) long, ``no_subword_id`` on padding;
    - ``labels`` (B, L) long = input_ids, IGNORE_INDEX on padding (unshifted: the model shifts and fuses);
    - ``boundary_labels`` (B, L) bool: byte t ends a source token (BOS included; False on padding) — pass
      as the model's ``boundary_mask`` for teacher forcing and use as the boundary-loss target;
    - ``patch_ids`` (B, L) long: patch of each byte (0 = BOS), -1 on padding;
    - ``patch_lengths`` (B, P) long, 0 on padding; ``patch_mask`` (B, P) bool;
    - ``token_ids`` (B, P) long source ids (``token_pad_id`` on padding), ``token_mask`` (B, P) bool —
      the teacher reads ``[eos] + token_ids[:, :-1]``, teacher position j ↔ patch j.

    Args:
        no_subword_id: the expanded id of padding (``ByteTokenizer.no_subword_id``).
        token_pad_id: source id written on token padding (masked anyway).
        pad_to_multiple_of: round L up (e.g. 64 for the chunkwise mLSTM).
    """

    def __init__(self, no_subword_id: int, *, token_pad_id: int = 0, pad_to_multiple_of: int | None = None):
        self.no_subword_id = int(no_subword_id)
        self.token_pad_id = int(token_pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_tokenizer(cls, tokenizer: ByteTokenizer, pad_to_multiple_of: int | None = None) -> ByteCollator:
        vocab = tokenizer.source_vocab
        pad = next((i for i in (vocab.pad_id, vocab.eos_id) if i is not None), 0)
        return cls(tokenizer.no_subword_id, token_pad_id=pad, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ByteCollator: empty batch")
        inputs = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        L = max(len(x) for x in inputs)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        lengths = torch.tensor([len(x) for x in inputs])
        attention = torch.arange(L)[None, :] < lengths[:, None]
        input_ids = _pad(inputs, PAD_ID, L)
        patch_lengths = _pad([torch.as_tensor(e["patch_lengths"], dtype=torch.long) for e in examples], 0)
        if not torch.equal(patch_lengths.sum(dim=1), lengths):
            raise ValueError("ByteCollator: sum(patch_lengths) != len(input_ids) in some example")
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention.long(),
            "expanded_ids": _pad([torch.as_tensor(e["expanded_ids"], dtype=torch.long) for e in examples],
                                 self.no_subword_id, L),
            "labels": input_ids.masked_fill(~attention, IGNORE_INDEX),
            "boundary_labels": patch_boundaries(patch_lengths, L),
            "patch_ids": patch_ids_from_lengths(patch_lengths, L),
            "patch_lengths": patch_lengths,
            "patch_mask": patch_lengths > 0,
        }
        if all("token_ids" in e for e in examples):
            tokens = [torch.as_tensor(e["token_ids"], dtype=torch.long) for e in examples]
            counts = torch.tensor([len(t) for t in tokens])
            batch["token_ids"] = _pad(tokens, self.token_pad_id, patch_lengths.shape[1])
            batch["token_mask"] = torch.arange(batch["token_ids"].shape[1])[None, :] < counts[:, None]
        return batch


# ========================================================================================================
# 3. BPE-style boundary merges (stage 2, spec §8 "bpe")
# ========================================================================================================


@dataclass
class BpeMergeResult:
    """patch_lengths (B, P') long (0 = padding); ratios (B,) bytes per patch per row; ratio: whole batch."""

    patch_lengths: torch.Tensor
    ratios: torch.Tensor
    ratio: float


def _merge_row(symbols: np.ndarray, lengths: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """BPE over one row's patches (patch 0 = BOS stays alone): merged patch lengths (P',).

    Row by row on purpose: stepping all rows together in one flat array was measured 4× slower (every
    step then sorts every row's pairs until the slowest row is done).
    """
    total = int(lengths.sum())
    # ratio ≥ target ⇔ #patches ≤ total / target (the epsilon absorbs float error in e.g. target = 5/3)
    max_patches = int(np.floor(total / target + RATIO_EPS))
    syms, lens = symbols.copy(), lengths.copy()
    next_symbol = int(syms.max(initial=0)) + 1  # merged pairs become new symbols
    while len(lens) > max_patches and len(lens) > 2:
        a, b = syms[1:-1], syms[2:]  # pairs among patches 1..P-1 (never the BOS patch)
        keys = a * np.int64(next_symbol) + b  # unique per (a, b): both < next_symbol
        uniq, counts = np.unique(keys, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        key = uniq[best[rng.integers(len(best))]] if len(best) > 1 else uniq[best[0]]  # seeded tie-break
        pos = np.flatnonzero(keys == key) + 1  # left patch index of each occurrence
        if a[pos[0] - 1] == b[pos[0] - 1]:  # (x, x) pairs overlap in runs: keep every other, from the run start
            run_start = np.concatenate([[True], np.diff(pos) != 1])
            start_of = pos[np.maximum.accumulate(np.where(run_start, np.arange(len(pos)), 0))]
            pos = pos[(pos - start_of) % 2 == 0]
        pos = pos[: len(lens) - max_patches]  # stop as soon as the target is reached
        lens[pos] += lens[pos + 1]
        syms[pos] = next_symbol
        keep = np.ones(len(lens), dtype=bool)
        keep[pos + 1] = False
        syms, lens = syms[keep], lens[keep]
        next_symbol += 1
    return lens


def bpe_merge_patches(
    patch_lengths: torch.Tensor | np.ndarray,
    token_ids: torch.Tensor | np.ndarray,
    target_ratio: float,
    seed: int | Sequence[int] = 0,
) -> BpeMergeResult:
    """Merge adjacent patches BPE-style until each row has ≥ ``target_ratio`` bytes per patch.

    Per row: repeatedly take the most frequent adjacent (symbol, symbol) pair — symbols start as the
    source token ids, a merged pair becomes a new symbol — ties broken by a seeded RNG, and merge its
    non-overlapping occurrences left to right, stopping at the occurrence that reaches the ratio. The BOS
    patch (0) is never merged. Rows that cannot reach the ratio end with BOS + one patch. "Reached" allows
    a float tolerance of ``RATIO_EPS`` (so a target of 5/3 on 5 bytes gives 3 patches, not 2).
    Vectorised per merge step (numpy over a row's pairs); loops over rows and merge steps (≈0.1 s for a
    4096-token window going from ≈4 to 6 bytes per patch).

    Args:
        patch_lengths: (B, P) byte lengths, 0 on padding (a collated batch's ``patch_lengths``).
        token_ids: (B, P) source ids aligned with patches (``token_ids``: patch j ↔ token j − 1; only
            identities matter, so the one-position offset is harmless).
        target_ratio: bytes per patch to reach (e.g. 6.0).
        seed: tie-break seed (e.g. [seed, step]).

    Returns:
        :class:`BpeMergeResult`; sum of bytes per row is preserved. Turn the lengths into boundary labels
        with :func:`patch_boundaries`.
    """
    lengths = torch.as_tensor(patch_lengths).cpu().numpy().astype(np.int64)
    tokens = torch.as_tensor(token_ids).cpu().numpy().astype(np.int64)
    if lengths.shape != tokens.shape:
        raise ValueError(f"patch_lengths {lengths.shape} and token_ids {tokens.shape} must have the same shape")
    if target_ratio <= 0:
        raise ValueError(f"target_ratio must be positive, got {target_ratio}")
    rng = np.random.default_rng(seed)
    rows = []
    for row_lengths, row_tokens in zip(lengths, tokens):  # per row (see _merge_row)
        valid = row_lengths > 0
        rows.append(_merge_row(row_tokens[valid], row_lengths[valid], target_ratio, rng))
    merged = _pad([torch.from_numpy(r) for r in rows], 0)
    totals = merged.sum(dim=1).double()
    counts = (merged > 0).sum(dim=1).clamp(min=1)
    return BpeMergeResult(
        patch_lengths=merged, ratios=totals / counts, ratio=float(totals.sum() / counts.sum())
    )


def mix_documents(
    corpus: Iterable[str], extra: Iterable[str], rate: float, seed: int | Sequence[int] = 0
) -> Iterator[str]:
    """Interleave ``extra`` documents into ``corpus`` so that a fraction ``rate`` of the output comes from
    ``extra`` (each output slot drawn independently by a seeded RNG). Ends when ``corpus`` ends."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    rng = np.random.default_rng(seed)
    extra_iter = iter(extra)
    for doc in corpus:
        while rate > 0 and rng.random() < rate:
            yield next(extra_iter)
        yield doc
