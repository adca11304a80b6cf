"""Byte ids, the source vocabulary as bytes, longest-suffix expansion, and the ``ByteTokenizer``.

Id layout (DESIGN §1.1). The byte side has ``BYTE_VOCAB_SIZE`` = 260 ids::

    0 <pad>   1 <bos>   2 <eos>   3 <filler>   4..259  byte b has id b + 4

and the output side doubles it (``FUSED_VOCAB_SIZE`` = 520): id ``k + 260`` means "symbol k, and it ends a
patch". Unlike the reference (which sets EOS == BOS == 1) EOS keeps its own id; it separates documents.

Expanded ids (DESIGN §1.2). Next to each byte the model embeds ``s_t``, the source-vocabulary id of the
**longest source token whose byte string is a suffix of bytes[..t]** (it may cross the real token boundaries,
never a special id). :class:`SuffixExpander` computes them with a vectorised walk of the reversed-byte trie
(no per-byte Python loop); :class:`ByteTokenizer` returns them as ``expanded_ids`` next to ``input_ids``.

Supported sources: byte-level BPE (GPT-2 byte-to-unicode alphabet: GPT-2, Llama 3, SmolLM2, Qwen, OLMo,
Pythia) and SentencePiece-style vocabularies with byte fallback (Llama 2, Mistral, Gemma: ``▁`` is a space,
``<0xNN>`` is byte NN). Anything else (WordPiece, a character vocabulary with an unknown token, ...) cannot
be mapped to exact bytes and is refused with a ``ValueError``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from transformers.tokenization_python import PythonBackend
from transformers.tokenization_utils_base import BatchEncoding, TruncationStrategy
from transformers.utils import PaddingStrategy, TensorType

from bytelift.chat_template import ChatTemplateMixin

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "FILLER_ID",
    "NUM_SPECIAL_IDS",
    "BYTE_OFFSET",
    "BYTE_VOCAB_SIZE",
    "FUSED_VOCAB_SIZE",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SOURCE_TOKENIZER_SUBFOLDER",
    "fuse",
    "unfuse",
    "is_fused",
    "text_to_bytes",
    "bytes_to_ids",
    "ids_to_bytes",
    "gpt2_byte_to_unicode",
    "SourceVocabulary",
    "source_vocabulary",
    "source_token_bytes",
    "missing_single_bytes",
    "SuffixExpander",
    "ByteTokenizer",
    "register_with_auto",
]

# --------------------------------------------------------------------------------------------------------
# Id layout
# --------------------------------------------------------------------------------------------------------

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
FILLER_ID = 3  # placeholder while decoding (rows parked at a patch boundary); never a training target
NUM_SPECIAL_IDS = 4
BYTE_OFFSET = 4  # byte b <-> id b + BYTE_OFFSET
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256  # V_b = 260
FUSED_VOCAB_SIZE = 2 * BYTE_VOCAB_SIZE  # 520: id k + V_b = "symbol k, and it ends a patch"
IGNORE_INDEX = -100  # label of positions no loss is computed on (the torch / transformers convention)

#: Token strings of the special ids, in id order.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<filler>")
#: Appended to a token string to name its fused ("ends a patch") variant, e.g. ``"a▸"``.
FUSED_TOKEN_SUFFIX = "▸"
#: Where ``ByteTokenizer.save_pretrained`` puts the wrapped source tokenizer.
SOURCE_TOKENIZER_SUBFOLDER = "source_tokenizer"

# Dense child tables of the reversed trie take at most this many bytes (the rest uses sorted edge keys).
DEFAULT_DENSE_TABLE_BYTES = 16 * 2**20
# `SuffixExpander.expand_last` walks the trie in plain Python when it has at most this many positions to
# expand (decoding at small batch sizes): the array walk pays several array operations per trie depth,
# which a single position cannot amortise. SmolLM2, one position, one thread, array vs plain walk: after
# English text 136 vs 35 us, after 90 spaces (81 trie depths) 1713 vs 407 us.
SCALAR_WALK_MAX_POSITIONS = 4


def fuse(ids, ends_patch):
    """Symbol ids (< V_b) -> output ids: ``ids + V_b`` where ``ends_patch`` is true.

    Works on ints/bools, numpy arrays and torch tensors: ``ids`` of any shape, ``ends_patch`` broadcastable to
    it; the result has the broadcast shape. Tensors are not range
    checked (that would synchronise a GPU); ints and arrays are.
    """
    if isinstance(ids, torch.Tensor):
        ends = torch.as_tensor(ends_patch, device=ids.device)
        if ends.dtype not in (torch.bool, ids.dtype):
            ends = ends.to(ids.dtype)
        return torch.add(ids, ends, alpha=BYTE_VOCAB_SIZE)  # one operation for bool flags (every decoded byte)
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        if not 0 <= ids < BYTE_VOCAB_SIZE:
            raise ValueError(f"fuse: id {ids} is not a symbol id in [0, {BYTE_VOCAB_SIZE})")
        return int(ids) + BYTE_VOCAB_SIZE * bool(ends_patch)
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() >= BYTE_VOCAB_SIZE):
        raise ValueError(f"fuse: ids must lie in [0, {BYTE_VOCAB_SIZE})")
    return arr + BYTE_VOCAB_SIZE * np.asarray(ends_patch, dtype=arr.dtype)


def unfuse(ids):
    """Output ids (< 2·V_b) -> symbol ids (< V_b): drops the end-of-patch flag. Ints, numpy, torch (any shape;
    the result has the input's shape)."""
    if isinstance(ids, torch.Tensor):
        return torch.where(ids >= BYTE_VOCAB_SIZE, ids - BYTE_VOCAB_SIZE, ids)
    if isinstance(ids, (int, np.integer)):
        return int(ids) - BYTE_VOCAB_SIZE if ids >= BYTE_VOCAB_SIZE else int(ids)
    arr = np.asarray(ids)
    return np.where(arr >= BYTE_VOCAB_SIZE, arr - BYTE_VOCAB_SIZE, arr)


def is_fused(ids):
    """True where an output id carries the end-of-patch flag. Ints, numpy, torch (any shape -> same shape)."""
    if isinstance(ids, torch.Tensor):
        return ids >= BYTE_VOCAB_SIZE
    if isinstance(ids, (int, np.integer)):
        return bool(ids >= BYTE_VOCAB_SIZE)
    return np.asarray(ids) >= BYTE_VOCAB_SIZE


def text_to_bytes(text: str | bytes | bytearray | memoryview) -> bytes:
    """The bytes bytelift encodes for ``text``.

    ``str`` is encoded as UTF-8 with Python's ``surrogateescape`` convention: the lone surrogates
    U+DC80..U+DCFF stand for the raw bytes 0x80..0xFF (so text obtained with
    ``raw.decode("utf-8", "surrogateescape")`` gives back exactly ``raw``). Any other lone surrogate cannot
    be encoded faithfully and raises ``ValueError``. Bytes-like input is taken as is (NUL and invalid UTF-8
    included).
    """
    if isinstance(text, str):
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as err:
            bad = text[err.start]
            raise ValueError(
                f"text contains the lone surrogate U+{ord(bad):04X} at index {err.start}; only U+DC80..U+DCFF "
                "(surrogate-escaped raw bytes) can be encoded. Pass bytes instead, or clean the text first, "
                "e.g. text.encode('utf-8', 'replace')."
            ) from None
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def bytes_to_ids(data: str | bytes) -> np.ndarray:
    """Text or bytes -> (n,) int64 byte-side ids (``byte + BYTE_OFFSET``); no special ids added."""
    return np.frombuffer(text_to_bytes(data), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def ids_to_bytes(ids) -> bytes:
    """(n,) byte-side or output ids -> the bytes they carry (fused ids un-fused, special ids dropped)."""
    arr = _check_ids(_to_numpy(ids), "ids").reshape(-1)
    arr = unfuse(arr)
    return (arr[arr >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()


def _to_numpy(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy()
    return np.asarray(ids)


def _check_ids(arr: np.ndarray, what: str, limit: int = FUSED_VOCAB_SIZE) -> np.ndarray:
    """Validate an id array (integer dtype, values in [0, limit)); returns it as int64."""
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{what} must be integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= limit):
        raise ValueError(f"{what} must lie in [0, {limit}); got values in [{arr.min()}, {arr.max()}]")
    return arr


# --------------------------------------------------------------------------------------------------------
# Source vocabulary -> bytes
# --------------------------------------------------------------------------------------------------------


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the 68 others are given the
    characters U+0100, U+0101, ... in byte order (so space 0x20 is 'Ġ' and newline 0x0A is 'Ċ').
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_char = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_char)
            next_char += 1
    return table


_BYTE_TO_UNICODE = gpt2_byte_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}
# str.translate tables between latin-1-decoded byte strings and GPT-2 characters (C speed, no loop per byte).
_LATIN1_TO_GPT2 = {b: c for b, c in _BYTE_TO_UNICODE.items()}
_GPT2_TO_LATIN1 = {ord(c): b for b, c in _BYTE_TO_UNICODE.items()}
_GPT2_ALPHABET = frozenset(_UNICODE_TO_BYTE)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_MARKER = "\u2581"  # SentencePiece's '▁'


@dataclass(frozen=True)
class SourceVocabulary:
    """A source tokenizer's vocabulary as exact byte strings.

    Attributes:
        family: ``"byte_level"`` or ``"sentencepiece"``.
        token_bytes: for every source id (``len(tokenizer)`` of them, added tokens included) its bytes;
            ``None`` for special tokens (handled through ids) and for pieces that map to no bytes.
        special_ids: source ids of special tokens (bos/eos/pad/unk, chat markers, ...).
        special_contents: source id -> text of each special token.
        fallback_ids: SentencePiece ``<0xNN>`` byte pieces (losing ties against an ordinary piece with the
            same bytes, e.g. ``<0x20>`` vs ``▁``).
        unmappable_ids: ordinary ids whose string is not a valid piece of the family (bytes ``None``).
        bos_id, eos_id, pad_id: the source's bos/eos/pad ids (``None`` where it has none).
        tokenizer_class: class name of the tokenizer, for messages.
    """

    family: str
    token_bytes: tuple[bytes | None, ...]
    special_ids: frozenset[int] = frozenset()
    special_contents: Mapping[int, str] = field(default_factory=dict)
    fallback_ids: frozenset[int] = frozenset()
    unmappable_ids: frozenset[int] = frozenset()
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    tokenizer_class: str = ""

    @property
    def size(self) -> int:
        """Number of source ids (== ``len(tokenizer)``)."""
        return len(self.token_bytes)

    @property
    def missing_single_bytes(self) -> list[int]:
        """Byte values (0..255) that no source token spells on its own."""
        return missing_single_bytes(self.token_bytes)


def missing_single_bytes(token_bytes: Iterable[bytes | None]) -> list[int]:
    """Byte values (0..255) with no single-byte token among ``token_bytes`` (sorted)."""
    present = {b[0] for b in token_bytes if b is not None and len(b) == 1}
    return [b for b in range(256) if b not in present]


def _components(node: Any, keys: tuple[str, ...]) -> list[dict]:
    """Flatten a tokenizers component (a JSON dict, possibly a Sequence of them) into a list of dicts."""
    if not isinstance(node, dict):
        return []
    for key in keys:
        if isinstance(node.get(key), list):
            return [leaf for child in node[key] for leaf in _components(child, keys)]
    return [node]


def _component_spec(component) -> Any:
    """A tokenizers component (decoder, pre-tokenizer, normalizer) as its JSON dict (None if absent)."""
    return None if component is None else json.loads(component.__getstate__())


def _backend_spec(backend) -> dict:
    """The parts of a ``tokenizers.Tokenizer`` that decide its family, in tokenizer.json form.

    Reads the components one by one rather than ``backend.to_str()``, which would also serialise (and make
    us parse) every merge of the vocabulary.
    """
    model = backend.model
    model_type = type(model).__name__
    byte_fallback = getattr(model, "byte_fallback", None)
    if byte_fallback is None and model_type == "Unigram":  # not exposed as an attribute
        byte_fallback = json.loads(model.__getstate__()).get("byte_fallback", False)
    return {
        "model": {"type": model_type, "byte_fallback": bool(byte_fallback)},
        "decoder": _component_spec(backend.decoder),
        "pre_tokenizer": _component_spec(backend.pre_tokenizer),
        "normalizer": _component_spec(backend.normalizer),
    }


def _detect_family(spec: dict, name: str) -> str:
    """``"byte_level"`` or ``"sentencepiece"`` from a tokenizer.json-style dict; ``ValueError`` otherwise."""
    model = spec.get("model") or {}
    model_type = model.get("type")
    decoders = _components(spec.get("decoder"), ("decoders",))
    pre_tokenizers = _components(spec.get("pre_tokenizer"), ("pretokenizers",))
    normalizers = _components(spec.get("normalizer"), ("normalizers",))
    kinds = {c.get("type") for c in decoders + pre_tokenizers}

    if model_type == "BPE" and "ByteLevel" in kinds and not model.get("byte_fallback"):
        return "byte_level"
    if model_type in ("BPE", "Unigram") and model.get("byte_fallback"):

        def marks_space(c: dict) -> bool:
            if c.get("type") == "Metaspace":
                return c.get("replacement", _SPACE_MARKER) == _SPACE_MARKER
            if c.get("type") == "Replace":
                pattern = c.get("pattern") or {}
                return {pattern.get("String"), c.get("content")} == {_SPACE_MARKER, " "}
            return False

        if any(marks_space(c) for c in decoders + pre_tokenizers + normalizers):
            return "sentencepiece"
        raise ValueError(
            f"{name}: a {model_type} vocabulary with byte fallback, but no '▁' space convention "
            "(Metaspace or Replace('▁', ' ')) was found in its decoder/pre-tokenizer/normalizer, so its "
            "pieces cannot be mapped to exact bytes."
        )
    why = {
        "WordPiece": "WordPiece pieces ('##' continuations, an [UNK] token) are not byte strings",
        "WordLevel": "a word-level vocabulary cannot spell arbitrary bytes",
        "BPE": "a BPE vocabulary without the byte-level alphabet or byte fallback maps unseen characters to "
        "an unknown token",
        "Unigram": "a Unigram vocabulary without byte fallback maps unseen characters to an unknown token",
    }.get(model_type, f"unrecognised tokenizer model {model_type!r}")
    raise ValueError(
        f"{name} is not supported: {why}. bytelift needs byte-level BPE (GPT-2 alphabet: GPT-2, Llama 3, "
        "SmolLM2, Qwen, OLMo, Pythia) or SentencePiece-style BPE/Unigram with byte_fallback (Llama 2, "
        "Mistral, Gemma)."
    )


def source_vocabulary(tokenizer) -> SourceVocabulary:
    """Analyse a source tokenizer: its family and the exact bytes of every id.

    Args:
        tokenizer: a fast ``transformers`` tokenizer (with ``backend_tokenizer``) or a ``tokenizers.Tokenizer``.

    Special tokens get ``None`` bytes (they are mapped through ids). Non-special *added* tokens are ordinary
    text that the source matches atomically: their bytes are their UTF-8 content.

    Raises:
        ValueError: the tokenizer is neither byte-level BPE nor SentencePiece-style with byte fallback, or
            it has no ``tokenizers`` backend.
    """
    name = type(tokenizer).__name__
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "id_to_token"):
        backend = tokenizer  # a raw tokenizers.Tokenizer
    if backend is None:
        raise ValueError(
            f"{name} is not supported: bytelift reads the vocabulary through a `tokenizers` backend "
            "(`tokenizer.backend_tokenizer`); load the source with a fast tokenizer (AutoTokenizer does in "
            "transformers 5)."
        )
    family = _detect_family(_backend_spec(backend), name)

    size = len(tokenizer) if backend is not tokenizer else backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    special_ids = {i for i, tok in added.items() if tok.special}
    special_ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None)
    special_ids = {i for i in special_ids if 0 <= i < size}

    token_bytes: list[bytes | None] = [None] * size
    fallback_ids: set[int] = set()
    unmappable: set[int] = set()
    for piece, i in backend.get_vocab(with_added_tokens=True).items():  # one pass over the vocabulary
        if not 0 <= i < size or i in special_ids:
            continue
        if i in added:  # non-special added token: literal text
            data = piece.encode("utf-8")
        elif family == "byte_level":
            if not _GPT2_ALPHABET.issuperset(piece):
                unmappable.add(i)
                continue
            data = piece.translate(_GPT2_TO_LATIN1).encode("latin-1")
        else:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                data = bytes([int(match.group(1), 16)])
                fallback_ids.add(i)
            else:
                data = piece.replace(_SPACE_MARKER, " ").encode("utf-8")
        token_bytes[i] = data or None

    def attr_id(attr: str) -> int | None:
        value = getattr(tokenizer, attr, None) if backend is not tokenizer else None
        return int(value) if isinstance(value, (int, np.integer)) and 0 <= value < size else None

    return SourceVocabulary(
        family=family,
        token_bytes=tuple(token_bytes),
        special_ids=frozenset(special_ids),
        special_contents={i: str(backend.id_to_token(i)) for i in special_ids},
        fallback_ids=frozenset(fallback_ids),
        unmappable_ids=frozenset(unmappable),
        bos_id=attr_id("bos_token_id"),
        eos_id=attr_id("eos_token_id"),
        pad_id=attr_id("pad_token_id"),
        tokenizer_class=name,
    )


def source_token_bytes(tokenizer) -> list[bytes | None]:
    """The exact byte string of every source id (``len(tokenizer)`` entries; specials ``None``).

    See :func:`source_vocabulary` for the rules and the errors raised.
    """
    return list(source_vocabulary(tokenizer).token_bytes)


# --------------------------------------------------------------------------------------------------------
# Longest-suffix expansion
# --------------------------------------------------------------------------------------------------------


class SuffixExpander:
    """Longest-suffix source ids ("expanded ids") for byte-id sequences.

    For every position t of a byte-side id sequence, ``expand`` returns the source id of the longest source
    token whose byte string is a suffix of bytes[..t]. The match may cross real token boundaries but never a
    special id (pad/bos/eos/filler stop it). Where no token matches, the id is :attr:`no_subword_id`
    (= the source vocabulary size: the subword embedding has one extra, zero-initialised row). Special ids
    themselves map through :attr:`special_to_source`. Fused ids are un-fused first.

    Ties (several source ids with the same bytes, e.g. SentencePiece's ``▁`` and ``<0x20>``): an ordinary
    piece beats a byte-fallback piece, then the lowest id wins.

    Algorithm: a reversed-byte trie (a node = a suffix of some token; its child by byte c = c prepended),
    walked backwards from all positions at once, one depth per numpy step. At depth ℓ only the positions
    whose last ℓ bytes are still a node stay alive; positions die fast (≈4 live depths per byte on code),
    so the cost is O(n · mean live depth) vectorised operations, plus nothing per token. Child lookup is a
    dense (node, byte) table for the shallow, busy levels and a binary search in the sorted (node, byte)
    edge keys of deeper levels — exact, so there are no hash collisions to guard against. Each position
    keeps the deepest node it reached; ``node_best[node]`` (the longest token on that node's path) is its
    answer.

    Args:
        token_bytes: the bytes of each source id (``None`` = no bytes: specials, unused ids).
        special_to_source: byte-side special id -> source id (or ``no_subword_id``); missing entries map to
            ``no_subword_id``. See :meth:`default_special_to_source`.
        fallback_ids: ids that lose ties against ordinary pieces with the same bytes.
        dense_table_bytes: memory budget of the dense child tables.
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        *,
        special_to_source: Mapping[int, int] | None = None,
        fallback_ids: Iterable[int] = (),
        dense_table_bytes: int = DEFAULT_DENSE_TABLE_BYTES,
    ):
        self.source_vocab_size = len(token_bytes)
        #: Id for "no source token ends here" (the extra, zero-initialised subword-embedding row).
        self.no_subword_id = self.source_vocab_size
        #: Rows the subword embedding needs: the source vocabulary plus the no-subword row.
        self.subword_vocab_size = self.source_vocab_size + 1
        mapping = {sid: self.no_subword_id for sid in range(NUM_SPECIAL_IDS)}
        for sid, src in (special_to_source or {}).items():
            sid, src = int(sid), int(src)
            if not 0 <= sid < NUM_SPECIAL_IDS or not 0 <= src <= self.no_subword_id:
                raise ValueError(f"special_to_source: bad entry {sid} -> {src}")
            mapping[sid] = src
        #: Byte-side special id (PAD_ID, BOS_ID, EOS_ID, FILLER_ID) -> the source id used as its expanded id.
        self.special_to_source: dict[int, int] = mapping
        self._special_lut = np.array([mapping[i] for i in range(NUM_SPECIAL_IDS)], dtype=np.int64)
        #: Byte values (0..255) without a single-byte token (such a byte alone expands to no_subword_id).
        self.missing_single_bytes = missing_single_bytes(token_bytes)
        self._build(token_bytes, frozenset(fallback_ids), dense_table_bytes)

    # ---- construction ---------------------------------------------------------------------------------

    @staticmethod
    def default_special_to_source(vocab: SourceVocabulary) -> dict[int, int]:
        """The default special mapping (byte-side id -> source id).

        - BOS and EOS -> the source's bos id if it has one, else its eos id (both mark a document
          boundary; the reference maps its byte-side BOS to the source's document token);
        - PAD -> ``no_subword_id``: a padding position is masked anyway, and sources often alias pad to eos
          (SmolLM2), which would make padding look like a document boundary;
        - FILLER -> ``no_subword_id``.
        """
        none = vocab.size
        doc = vocab.bos_id if vocab.bos_id is not None else vocab.eos_id
        doc = none if doc is None else doc
        return {PAD_ID: none, BOS_ID: doc, EOS_ID: doc, FILLER_ID: none}

    @classmethod
    def from_vocabulary(
        cls, vocab: SourceVocabulary, special_to_source: Mapping[int, int] | None = None, **kwargs
    ) -> SuffixExpander:
        """Build from a :class:`SourceVocabulary`; ``special_to_source`` entries override the defaults."""
        mapping = cls.default_special_to_source(vocab)
        mapping.update({int(k): int(v) for k, v in (special_to_source or {}).items()})
        return cls(vocab.token_bytes, special_to_source=mapping, fallback_ids=vocab.fallback_ids, **kwargs)

    @classmethod
    def from_tokenizer(cls, tokenizer, special_to_source: Mapping[int, int] | None = None, **kwargs) -> SuffixExpander:
        """Build from a source tokenizer (see :func:`source_vocabulary`)."""
        return cls.from_vocabulary(source_vocabulary(tokenizer), special_to_source, **kwargs)

    def _build(self, token_bytes: Sequence[bytes | None], fallback_ids: frozenset[int], budget: int) -> None:
        V = BYTE_VOCAB_SIZE
        # 1. One id per distinct byte string: ordinary pieces before byte-fallback pieces, then lowest id.
        best: dict[bytes, int] = {}
        for i, b in enumerate(token_bytes):
            if not b:
                continue
            j = best.get(b)
            if j is None or (j in fallback_ids and i not in fallback_ids):
                best[b] = i
        # Longest strings first, so the tokens still present at depth d are a prefix of the arrays.
        strings = sorted(best, key=len, reverse=True)
        token_ids = np.array([best[b] for b in strings], dtype=np.int64)
        lengths = np.array([len(b) for b in strings], dtype=np.int64)
        L = self.max_token_len = int(lengths[0]) if len(strings) else 0
        # All strings back to back; the byte `depth` places from the end of string i is flat[ends[i] - depth].
        flat = np.frombuffer(b"".join(strings), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        ends = np.cumsum(lengths)
        alive_at = [int((lengths >= d).sum()) for d in range(L + 2)]  # strings of length >= d

        # 2. Trie nodes = distinct token suffixes, numbered breadth-first and, within a depth, by
        #    (parent, byte): np.unique of the keys parent·V + byte gives exactly that order, so each depth's
        #    edge keys come out sorted (what the binary search needs).
        parents, labels = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
        depth_start = [0, 1]
        node_token = [np.full(1, -1, np.int64)]
        node = np.zeros(alive_at[1], dtype=np.int64)  # current node of each string still present
        for depth in range(1, L + 1):
            count = alive_at[depth]
            keys = node[:count] * V + flat[ends[:count] - depth]
            uniq, inverse = np.unique(keys, return_inverse=True)
            node = depth_start[depth] + inverse.reshape(-1)
            parents.append(uniq // V)
            labels.append(uniq % V)
            tokens_here = np.full(len(uniq), -1, np.int64)
            ending = slice(alive_at[depth + 1], count)  # strings of length exactly `depth` end here
            tokens_here[node[ending] - depth_start[depth]] = token_ids[ending]  # distinct strings: no clash
            node_token.append(tokens_here)
            depth_start.append(depth_start[depth] + len(uniq))
        parent_arr, label_arr = np.concatenate(parents), np.concatenate(labels)
        node_token_arr = np.concatenate(node_token)
        n_nodes = len(parent_arr)
        if n_nodes * V >= 2**31:
            raise ValueError(f"vocabulary too large for int32 trie keys ({n_nodes} nodes)")
        self._depth_start = np.asarray(depth_start, dtype=np.int64)
        self.num_trie_nodes = n_nodes

        # 3. node_best[n]: the longest token on the root->n path (no_subword_id if none).
        node_best = np.full(n_nodes, self.no_subword_id, dtype=np.int64)
        for depth in range(1, L + 1):
            sl = slice(depth_start[depth], depth_start[depth + 1])
            node_best[sl] = np.where(node_token_arr[sl] >= 0, node_token_arr[sl], node_best[parent_arr[sl]])
        self._node_best = node_best

        # 4. Child lookup. Dense rows for every node of depth < dense_depth (within the memory budget; the
        #    root row always), then per-depth sorted edge keys (parent·V_b + byte) for binary search.
        rows_ok = [d for d in range(1, L + 1) if depth_start[d] * V * 4 <= budget]
        self._dense_depth = max(rows_ok, default=1)  # transitions into depths 1..dense_depth are dense
        n_dense = depth_start[self._dense_depth]
        dense = np.full(n_dense * V, -1, dtype=np.int32)
        children = np.arange(1, depth_start[self._dense_depth + 1] if L else 1)
        dense[parent_arr[children] * V + label_arr[children]] = children
        self._dense = dense
        self._edge_keys: dict[int, np.ndarray] = {}
        for depth in range(self._dense_depth + 1, L + 1):
            sl = slice(depth_start[depth], depth_start[depth + 1])
            self._edge_keys[depth] = parent_arr[sl] * V + label_arr[sl]

    # ---- the walk -------------------------------------------------------------------------------------

    def _walk(self, seq: np.ndarray, first: int, count: int, starts: np.ndarray | None = None) -> np.ndarray:
        """Deepest-token lookup for a set of positions of ``seq``.

        Args:
            seq: (N,) int64 un-fused byte-side ids; ``seq[0]`` must be a special id (a sentinel that stops
                every walk before it runs off the front).
            first, count: positions ``first .. first+count-1`` (used when ``starts`` is None).
            starts: (m,) explicit positions instead.

        Returns:
            (m,) int64: ``node_best`` of the deepest node each position reached (``no_subword_id`` if none);
            special positions are not mapped here.
        """
        V = BYTE_VOCAB_SIZE
        m = count if starts is None else len(starts)
        origin = np.arange(first, first + m) if starts is None else starts
        # Depth 1, all positions: the root's dense row is dense[0:V], indexed by the byte id itself.
        child = self._dense[seq[origin]]
        slots = np.flatnonzero(child >= 0)
        node = child[slots]
        deepest = np.zeros(m, dtype=np.int64)  # 0 = the root = "no token"
        deepest[slots] = node
        for depth in range(2, self.max_token_len + 1):
            if slots.size == 0:
                break
            if starts is None:  # contiguous positions: the byte to read is slot + first - (depth - 1)
                prev = seq[slots + (first - depth + 1)]
            else:
                prev = seq[origin[slots] - (depth - 1)]
            if depth <= self._dense_depth:
                child = self._dense[node * V + prev]
                keep = np.flatnonzero(child >= 0)
                node = child[keep].astype(np.int64)
            else:
                edge_keys = self._edge_keys[depth]
                keys = node * V + prev
                j = np.searchsorted(edge_keys, keys)
                np.minimum(j, len(edge_keys) - 1, out=j)
                keep = np.flatnonzero(edge_keys[j] == keys)
                node = j[keep] + self._depth_start[depth]
            slots = slots[keep]
            deepest[slots] = node
        return self._node_best[deepest]

    def _walk_one(self, seq: list[int], pos: int) -> int:
        """`_walk` and `_map_specials` for the one position ``pos`` of ``seq`` (un-fused ids as a list,
        ``seq[0]`` a special id: the sentinel), in plain Python: the expanded id."""
        if seq[pos] < BYTE_OFFSET:
            return int(self._special_lut[seq[pos]])
        node = deepest = 0  # the root
        for depth in range(1, self.max_token_len + 1):
            key = node * BYTE_VOCAB_SIZE + seq[pos - depth + 1]  # the sentinel at seq[0] has no edge
            if depth <= self._dense_depth:
                node = int(self._dense[key])
                if node < 0:
                    break
            else:
                edge_keys = self._edge_keys[depth]
                j = int(np.searchsorted(edge_keys, key))
                if j == len(edge_keys) or edge_keys[j] != key:
                    break
                node = j + int(self._depth_start[depth])
            deepest = node
        return int(self._node_best[deepest])

    def _prepare(self, arr: np.ndarray, what: str = "byte_ids") -> np.ndarray:
        """Validate (ids in [0, 2·V_b)) and un-fuse; returns int64."""
        arr = _check_ids(arr, what)
        return np.where(arr >= BYTE_VOCAB_SIZE, arr - BYTE_VOCAB_SIZE, arr)

    def _map_specials(self, out: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """(n,) walk results, (n,) ids -> the results with special positions set from special_to_source."""
        special = np.flatnonzero(seq < BYTE_OFFSET)
        if special.size:
            out[special] = self._special_lut[seq[special]]
        return out

    @staticmethod
    def _like_input(out: np.ndarray, original):
        if isinstance(original, torch.Tensor):
            return torch.from_numpy(out).to(original.device)
        return out

    # ---- public API -----------------------------------------------------------------------------------

    def expand(self, byte_ids) -> np.ndarray | torch.Tensor:
        """Expanded ids of a whole sequence.

        Args:
            byte_ids: (n,) byte-side or fused ids (list, numpy or torch); a (B, n) input is passed on to
                :meth:`expand_batch`.

        Returns:
            (n,) int64 source ids — a numpy array, or a tensor on the input's device for tensor input.
        """
        arr = _to_numpy(byte_ids)
        if arr.ndim == 2:
            return self.expand_batch(byte_ids)
        if arr.ndim != 1:
            raise ValueError(f"expand: expected a 1-D (or 2-D) id sequence, got shape {arr.shape}")
        seq = np.concatenate([[PAD_ID], self._prepare(arr)])  # leading sentinel
        out = self._walk(seq, 1, len(arr))
        return self._like_input(self._map_specials(out, seq[1:]), byte_ids)

    def expand_batch(self, byte_ids, attention_mask=None) -> np.ndarray | torch.Tensor:
        """Expanded ids of a padded batch; each row equals ``expand(row)``.

        Args:
            byte_ids: (B, T) byte-side or fused ids, any padding side.
            attention_mask: optional (B, T); positions where it is 0 are padding: they get
                ``special_to_source[PAD_ID]`` and stop walks like a pad id would, whatever id they hold.

        Returns:
            (B, T) int64 source ids (numpy, or a tensor on the input's device for tensor input).
        """
        arr = _to_numpy(byte_ids)
        if arr.ndim != 2:
            raise ValueError(f"expand_batch: expected shape (B, T), got {arr.shape}")
        seq2 = self._prepare(arr)
        if attention_mask is not None:
            mask = _to_numpy(attention_mask)
            if mask.shape != arr.shape:
                raise ValueError(f"attention_mask shape {mask.shape} != byte_ids shape {arr.shape}")
            seq2 = np.where(mask.astype(bool), seq2, PAD_ID)
        B, T = seq2.shape
        # One flat walk: a sentinel column in front of every row stops walks at the row start.
        flat = np.concatenate([np.full((B, 1), PAD_ID, dtype=np.int64), seq2], axis=1).reshape(-1)
        out = self._walk(flat, 0, flat.size)
        out = self._map_specials(out, flat).reshape(B, T + 1)[:, 1:]
        return self._like_input(np.ascontiguousarray(out), byte_ids)

    def expand_many(self, sequences: Sequence) -> list[np.ndarray]:
        """Expanded ids of ragged sequences (one walk for all): a list of (n_i,) int64 arrays."""
        arrays = [self._prepare(_to_numpy(s).reshape(-1)) for s in sequences]
        if not arrays:
            return []
        lengths = np.array([len(a) for a in arrays])
        parts = []
        for a in arrays:  # per sequence, not per byte: a sentinel before each one
            parts.append(np.array([PAD_ID], dtype=np.int64))
            parts.append(a)
        flat = np.concatenate(parts)
        out = self._map_specials(self._walk(flat, 0, flat.size), flat)
        bounds = np.cumsum(lengths + 1)
        return [out[end - n : end] for end, n in zip(bounds, lengths)]

    def expand_last(self, byte_ids, k: int = 1) -> np.ndarray | torch.Tensor:
        """Expanded ids of the last ``k`` positions only (for decoding): the last k columns of ``expand``.

        Touches only the last ``k + max_token_len - 1`` ids of each row.

        Args:
            byte_ids: (n,) or (B, n) byte-side or fused ids.
            k: how many trailing positions (clipped to n).

        Returns:
            (min(k, n),) or (B, min(k, n)) int64 source ids (numpy, or a tensor for tensor input).
        """
        arr = _to_numpy(byte_ids)
        if arr.ndim not in (1, 2):
            raise ValueError(f"expand_last: expected shape (n,) or (B, n), got {arr.shape}")
        if k < 0:
            raise ValueError(f"expand_last: k must be >= 0, got {k}")
        n = arr.shape[-1]
        k = min(k, n)
        context = max(self.max_token_len - 1, 0)
        window = self._prepare(arr[..., max(0, n - k - context) :])
        rows = window.shape[0] if arr.ndim == 2 else 1
        if rows * k <= SCALAR_WALK_MAX_POSITIONS:
            seqs = [[PAD_ID] + row for row in window.reshape(rows, -1).tolist()]
            out = np.array([[self._walk_one(seq, p) for p in range(len(seq) - k, len(seq))] for seq in seqs],
                           dtype=np.int64).reshape(rows, k)
            return self._like_input(out if arr.ndim == 2 else out[0], byte_ids)
        if arr.ndim == 1:
            seq = np.concatenate([[PAD_ID], window])
            out = self._walk(seq, len(seq) - k, k)
            out = self._map_specials(out, seq[len(seq) - k :])
        else:
            B, W = window.shape
            flat = np.concatenate([np.full((B, 1), PAD_ID, dtype=np.int64), window], axis=1).reshape(-1)
            starts = ((np.arange(B) * (W + 1) + (W + 1 - k))[:, None] + np.arange(k)[None, :]).reshape(-1)
            out = self._map_specials(self._walk(flat, 0, 0, starts=starts), flat[starts]).reshape(B, k)
        return self._like_input(out, byte_ids)

    def __repr__(self) -> str:
        return (
            f"SuffixExpander(source_vocab_size={self.source_vocab_size}, max_token_len={self.max_token_len}, "
            f"trie_nodes={self.num_trie_nodes}, dense_depth={self._dense_depth})"
        )


# --------------------------------------------------------------------------------------------------------
# Source token ids -> bytes (training data)
# --------------------------------------------------------------------------------------------------------


class _SourceByteTable:
    """Flat table of every source id's byte-side ids, for vectorised concatenation."""

    def __init__(self, vocab: SourceVocabulary):
        special_byte_id: dict[int, int] = {}
        # pad first so that eos/bos win where a source aliases them (SmolLM2: pad == eos).
        for src, byte_id in ((vocab.pad_id, PAD_ID), (vocab.bos_id, BOS_ID), (vocab.eos_id, EOS_ID)):
            if src is not None:
                special_byte_id[src] = byte_id
        #: source special id -> byte-side special id (other specials are spelled as their text).
        self.special_byte_id = special_byte_id
        pieces: list[bytes] = []
        for i, b in enumerate(vocab.token_bytes):
            if i in special_byte_id:
                b = b"\x00"  # placeholder, replaced by the special id below
            elif b is None and i in vocab.special_ids:  # e.g. chat markers: their text, as a byte model sees it
                b = text_to_bytes(vocab.special_contents.get(i, ""))
            pieces.append(b or b"")
        self.lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        self.offsets = np.cumsum(self.lengths) - self.lengths
        self.flat = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        for src, byte_id in special_byte_id.items():
            self.flat[self.offsets[src]] = byte_id

    def __call__(self, source_ids) -> tuple[np.ndarray, np.ndarray]:
        ids = _check_ids(_to_numpy(source_ids).reshape(-1), "source_token_ids", limit=len(self.lengths))
        lengths = self.lengths[ids]
        if ids.size and lengths.min() == 0:
            bad = ids[lengths == 0][:5].tolist()
            raise ValueError(f"source ids {bad} have no bytes (unused or unmappable vocabulary entries)")
        total = int(lengths.sum())
        # Gather index of output byte j: start of its token + (j - output start of its token).
        out_start = np.cumsum(lengths) - lengths
        index = np.repeat(self.offsets[ids] - out_start, lengths) + np.arange(total)
        return self.flat[index], lengths


# --------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------


def _id_to_token_table() -> list[str]:
    plain = list(SPECIAL_TOKENS) + [_BYTE_TO_UNICODE[b] for b in range(256)]
    return plain + [t + FUSED_TOKEN_SUFFIX for t in plain]


class ByteTokenizer(ChatTemplateMixin, PythonBackend):
    """Bytes in, bytes out: the tokenizer of a byteified model.

    Vocabulary: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<filler>``=3, then the 256 bytes (token strings in
    GPT-2's byte-to-unicode alphabet, e.g. ``"Ġ"`` for a space), then the same 260 symbols fused with
    "ends a patch" (token string + ``"▸"``), so ``len(tokenizer) == FUSED_VOCAB_SIZE``; model inputs use
    the first ``BYTE_VOCAB_SIZE`` ids.

    Calling it on a ``str`` (UTF-8; see :func:`text_to_bytes` for lone surrogates), on raw ``bytes`` (invalid
    UTF-8 and NUL included) or on a list of either gives one id per byte — special-looking text such as
    ``"<bos>"`` is encoded as its bytes, never as a special id — and, when a source tokenizer is wrapped,
    ``expanded_ids`` (the longest-suffix source ids, see :class:`SuffixExpander`; padded with
    ``no_subword_id``). ``add_special_tokens=True`` prepends ``<bos>``. Padding is on the left by default.
    ``apply_chat_template`` renders the source tokenizer's chat template (``bytelift.chat_template``).

    Args:
        source_tokenizer: the source model's (fast) tokenizer; ``None`` for a bytes-only tokenizer (no
            expanded ids).
        special_to_source: overrides of :meth:`SuffixExpander.default_special_to_source` (byte-side special
            id -> source id).
    """

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask", "expanded_ids"]
    padding_side = "left"

    def __init__(self, source_tokenizer=None, special_to_source: Mapping | None = None, **kwargs):
        for attr, expected in zip(("pad_token", "bos_token", "eos_token"), SPECIAL_TOKENS):
            value = kwargs.setdefault(attr, expected)
            if value is None or str(value) != expected:
                raise ValueError(f"ByteTokenizer has a fixed id layout: {attr} must be {expected!r}, got {value!r}")
        for attr in ("unk_token", "sep_token", "cls_token", "mask_token"):
            if kwargs.get(attr) is not None:
                raise ValueError(f"ByteTokenizer has a fixed id layout and no {attr}")
        named = kwargs.get("model_specific_special_tokens") or {}
        if "filler_token" not in named:
            kwargs.setdefault("filler_token", SPECIAL_TOKENS[FILLER_ID])
        saved_source_size = kwargs.pop("source_vocab_size", None)
        kwargs.pop("special_to_source", None)

        self._id_to_token = _id_to_token_table()
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        self._added_tokens_decoder = {
            i: AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
            for i, t in enumerate(SPECIAL_TOKENS)
        }
        self.source_tokenizer = source_tokenizer
        self.source_vocab: SourceVocabulary | None = None
        self.expander: SuffixExpander | None = None
        self._source_bytes: _SourceByteTable | None = None
        super().__init__(**kwargs)

        if source_tokenizer is not None:
            self.source_vocab = source_vocabulary(source_tokenizer)
            if saved_source_size is not None and int(saved_source_size) != self.source_vocab.size:
                raise ValueError(
                    f"the saved ByteTokenizer wrapped a source tokenizer of {saved_source_size} tokens, but the "
                    f"one given has {self.source_vocab.size}"
                )
            overrides = {int(k): int(v) for k, v in (special_to_source or {}).items()}
            self.expander = SuffixExpander.from_vocabulary(self.source_vocab, overrides)
            self._source_bytes = _SourceByteTable(self.source_vocab)
            # Saved in tokenizer_config.json: the effective mapping, so a reload is identical.
            self.init_kwargs["special_to_source"] = {str(k): v for k, v in self.expander.special_to_source.items()}
            self.init_kwargs["source_vocab_size"] = self.source_vocab.size
        elif saved_source_size is not None:
            raise ValueError(
                f"this ByteTokenizer was saved with a source tokenizer of {saved_source_size} tokens, but none was "
                f"found (expected in the {SOURCE_TOKENIZER_SUBFOLDER}/ subfolder)"
            )

    @classmethod
    def from_source(cls, source_tokenizer, special_to_source: Mapping | None = None, **kwargs) -> ByteTokenizer:
        """Wrap a source tokenizer (byte-level BPE or SentencePiece with byte fallback)."""
        return cls(source_tokenizer=source_tokenizer, special_to_source=special_to_source, **kwargs)

    # ---- properties -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return FUSED_VOCAB_SIZE

    def __len__(self) -> int:
        return FUSED_VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    @property
    def no_subword_id(self) -> int | None:
        """Expanded id where no source token ends (= source vocab size); None without a source."""
        return None if self.expander is None else self.expander.no_subword_id

    @property
    def subword_vocab_size(self) -> int | None:
        """Rows of the subword embedding: source vocab + 1 (the no-subword row); None without a source."""
        return None if self.expander is None else self.expander.subword_vocab_size

    @property
    def special_to_source(self) -> dict[int, int] | None:
        """Byte-side special id -> source id used as its expanded id (see SuffixExpander)."""
        return None if self.expander is None else dict(self.expander.special_to_source)

    # ---- encoding -------------------------------------------------------------------------------------

    def tokenize(self, text, **kwargs) -> list[str]:
        """One token string per byte (GPT-2 alphabet); special-looking text is not split out."""
        return list(text_to_bytes(text).decode("latin-1").translate(_LATIN1_TO_GPT2))

    def _tokenize(self, text, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < FUSED_VOCAB_SIZE:
            raise ValueError(f"id {index} is outside the byte vocabulary [0, {FUSED_VOCAB_SIZE})")
        return self._id_to_token[index]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        return [BOS_ID] + list(token_ids_0) + list(token_ids_1 or [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return (unfuse(np.asarray(token_ids_0, dtype=np.int64)) < BYTE_OFFSET).astype(int).tolist()
        return [1] + [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def _encode_plus(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | TensorType | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool = False,
        **kwargs,
    ) -> BatchEncoding:
        """Encode str/bytes (or a list of them); the entry point of ``__call__`` and ``encode``."""
        unsupported = {
            "text_pair": text_pair is not None,
            "is_split_into_words": is_split_into_words,
            "stride / return_overflowing_tokens": bool(stride) or return_overflowing_tokens,
            "return_offsets_mapping": return_offsets_mapping,
            "return_token_type_ids": bool(return_token_type_ids),
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise ValueError(f"ByteTokenizer does not support {names}; encode single str/bytes sequences")
        batched = isinstance(text, (list, tuple))
        items = list(text) if batched else [text]
        for item in items:
            if not isinstance(item, (str, bytes, bytearray, memoryview)):
                raise TypeError(
                    f"ByteTokenizer encodes str or bytes (or a list of them), got {type(item).__name__}; "
                    "for byte ids use SuffixExpander or tokenizer.pad"
                )
        truncate = truncation_strategy != TruncationStrategy.DO_NOT_TRUNCATE and max_length is not None
        if truncate and max_length < int(add_special_tokens):
            raise ValueError(f"max_length={max_length} leaves no room for <bos>")
        rows = []
        for item in items:  # per sequence (the per-byte work is vectorised)
            ids = bytes_to_ids(item)
            if truncate:
                room = max_length - int(add_special_tokens)
                if len(ids) > room:
                    ids = ids[:room] if self.truncation_side == "right" else ids[len(ids) - room :]
            if add_special_tokens:
                ids = np.concatenate([[BOS_ID], ids])
            rows.append(ids)
        expanded = self.expander.expand_many(rows) if self.expander is not None else None
        lengths = [len(r) for r in rows]

        # Padding target.
        target = None
        if padding_strategy == PaddingStrategy.LONGEST:
            target = max(lengths, default=0)
        elif padding_strategy == PaddingStrategy.MAX_LENGTH:
            target = max_length if max_length is not None else max(lengths, default=0)
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target is not None and max(lengths, default=0) > target:
            raise ValueError(f"a sequence of {max(lengths)} ids is longer than max_length={target}; truncate it")
        if target is None and return_tensors is not None and len(set(lengths)) > 1:
            raise ValueError("sequences of different lengths: pass padding=True to get tensors")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        want_mask = return_attention_mask if return_attention_mask is not None else True
        columns: dict[str, list[np.ndarray]] = {"input_ids": rows}
        fills = {"input_ids": PAD_ID}
        if want_mask:
            columns["attention_mask"] = [np.ones(n, dtype=np.int64) for n in lengths]
            fills["attention_mask"] = 0
        if expanded is not None:
            columns["expanded_ids"] = expanded
            fills["expanded_ids"] = self.expander.no_subword_id
        if return_special_tokens_mask:
            columns["special_tokens_mask"] = [(r < BYTE_OFFSET).astype(np.int64) for r in rows]
            fills["special_tokens_mask"] = 1

        data: dict[str, Any] = {}
        for key, values in columns.items():
            if target is not None or return_tensors is not None:
                width = target if target is not None else (lengths[0] if lengths else 0)
                mat = np.full((len(values), width), fills[key], dtype=np.int64)
                for r, v in enumerate(values):
                    if len(v):
                        if side == "left":
                            mat[r, width - len(v) :] = v
                        else:
                            mat[r, : len(v)] = v
                values = list(mat) if return_tensors is None else mat
            data[key] = values

        if return_tensors is None:
            data = {k: [np.asarray(v).tolist() for v in vals] for k, vals in data.items()}
            if not batched:
                data = {k: v[0] for k, v in data.items()}
        else:
            kind = TensorType(return_tensors)
            if kind == TensorType.PYTORCH:
                data = {k: torch.from_numpy(v) for k, v in data.items()}
            elif kind != TensorType.NUMPY:
                raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or 'np')")
        if return_length:
            data["length"] = lengths if batched or return_tensors is not None else lengths[0]
        return BatchEncoding(data)

    def _pad(
        self,
        encoded_inputs,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """``tokenizer.pad`` per row: the base class pads ids/mask; expanded ids are padded with no_subword_id."""
        expanded = encoded_inputs.pop("expanded_ids", None)
        out = super()._pad(
            encoded_inputs,
            max_length=max_length,
            padding_strategy=padding_strategy,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        if expanded is not None:
            expanded = list(expanded)
            missing = len(out["input_ids"]) - len(expanded)
            if missing < 0:
                raise ValueError("expanded_ids is longer than input_ids")
            fill = [self.no_subword_id if self.no_subword_id is not None else 0] * missing
            out["expanded_ids"] = fill + expanded if (padding_side or self.padding_side) == "left" else expanded + fill
        return out

    # ---- decoding -------------------------------------------------------------------------------------

    def bytes_of(self, ids) -> bytes:
        """(n,) ids -> the bytes they carry (fused ids un-fused; special ids dropped)."""
        return ids_to_bytes(ids)

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str = "replace",
        **kwargs,
    ) -> str:
        """Ids -> text: fused ids un-fused, pad/filler always dropped, bos/eos shown unless skipped, bytes
        decoded as UTF-8 with ``errors`` (default ``"replace"``). Skipping special tokens also drops the chat
        template's end-of-turn marker where it is spelled as text (``end_of_turn_stop``), as the source drops
        that special token."""
        ids = unfuse(_check_ids(np.asarray(token_ids).reshape(-1), "token_ids"))
        visible = ids >= BYTE_OFFSET
        if not skip_special_tokens:
            visible |= (ids == BOS_ID) | (ids == EOS_ID)
        ids = ids[visible]
        marks = np.flatnonzero(ids < BYTE_OFFSET)
        parts, start = [], 0
        for pos in [*marks.tolist(), len(ids)]:  # per visible special, not per byte
            parts.append((ids[start:pos] - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors))
            if pos < len(ids):
                parts.append(SPECIAL_TOKENS[ids[pos]])
            start = pos + 1
        text = "".join(parts)
        marker = self.end_of_turn_stop if skip_special_tokens else None
        return text.replace(marker, "") if marker else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        parts, buf = [], bytearray()
        for token in tokens:
            if len(token) > 1 and token.endswith(FUSED_TOKEN_SUFFIX):
                token = token[: -len(FUSED_TOKEN_SUFFIX)]
            if token in SPECIAL_TOKENS:
                parts.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                if token in (SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID]):
                    parts.append(token)
            else:
                buf.extend(_UNICODE_TO_BYTE[c] for c in token)
        parts.append(buf.decode("utf-8", "replace"))
        return "".join(parts)

    # ---- training data --------------------------------------------------------------------------------

    def source_bytes_and_patches(self, source_token_ids) -> tuple[np.ndarray, np.ndarray]:
        """Source token ids -> (byte ids, patch lengths): the bytes of each token, concatenated.

        The source's eos/bos/pad ids become one EOS_ID/BOS_ID/PAD_ID (eos wins over an aliased pad); other
        special tokens (chat markers, ...) are spelled as their text; ordinary tokens as their bytes. Teacher
        and student thus see the same bytes, source normalisation (SentencePiece's leading '▁') included.

        Args:
            source_token_ids: (m,) source ids.

        Returns:
            byte_ids: (sum(patch_lengths),) int64 byte-side ids; patch_lengths: (m,) int64, all >= 1.
        """
        if self._source_bytes is None:
            raise ValueError("source_bytes_and_patches needs a source tokenizer (ByteTokenizer.from_source)")
        return self._source_bytes(source_token_ids)

    # ---- saving / loading -----------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the byte vocabulary is fixed by this module

    def save_pretrained(self, save_directory, *args, **kwargs) -> tuple[str, ...]:
        """Save ``tokenizer_config.json`` and the wrapped source tokenizer (in ``source_tokenizer/``)."""
        files: tuple[str, ...] = ()
        if self.source_tokenizer is not None:
            source_dir = os.path.join(save_directory, SOURCE_TOKENIZER_SUBFOLDER)
            files = tuple(self.source_tokenizer.save_pretrained(source_dir))
        return tuple(super().save_pretrained(save_directory, *args, **kwargs)) + files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs) -> ByteTokenizer:
        """Load a saved ByteTokenizer, with its source tokenizer from the ``source_tokenizer/`` subfolder."""
        if kwargs.get("source_tokenizer") is None:
            kwargs["source_tokenizer"] = _load_saved_source(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)


def _load_saved_source(path, kwargs: dict):
    from transformers import AutoTokenizer

    subfolder = kwargs.get("subfolder") or ""
    sub = f"{subfolder}/{SOURCE_TOKENIZER_SUBFOLDER}" if subfolder else SOURCE_TOKENIZER_SUBFOLDER
    if os.path.isdir(path):
        local = os.path.join(path, sub)
        return AutoTokenizer.from_pretrained(local) if os.path.isdir(local) else None
    hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision")
    hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
    try:
        return AutoTokenizer.from_pretrained(path, subfolder=sub, **hub_kwargs)
    except (OSError, ValueError):
        return None  # __init__ raises if the config says a source was saved


def register_with_auto(config_class=None) -> None:
    """Make ``AutoTokenizer`` resolve ``"tokenizer_class": "ByteTokenizer"`` (and ``config_class``, if given).

    Called on import (by name only); ``bytelift`` calls ``AutoTokenizer.register(ByteliftConfig, ...)`` too.
    """
    from transformers import AutoTokenizer
    from transformers.models.auto import tokenization_auto

    if config_class is not None:
        AutoTokenizer.register(config_class, tokenizer_class=ByteTokenizer, exist_ok=True)
    else:
        # What AutoTokenizer.register does for the class name, without tying it to a model config.
        tokenization_auto.REGISTERED_TOKENIZER_CLASSES[ByteTokenizer.__name__] = ByteTokenizer


register_with_auto()
