"""Tests of bytelift.data: windows, document pieces, collation, BPE merges, character-skill data (corpus
reading: tests/test_corpus_reading.py)."""

from __future__ import annotations

import itertools
import json
import pickle
import re

import numpy as np
import pytest
import torch

from bytelift.char_skills import CharSkillGenerator
from bytelift.corpus_reading import is_heldout, load_corpus, split_document
from bytelift.data import (
    IGNORE_INDEX,
    ByteCollator,
    ByteWindowDataset,
    bpe_merge_patches,
    mix_documents,
    patch_boundaries,
)
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, ByteTokenizer, gpt2_byte_to_unicode
from tests.tiny_tokenizers import SAMPLE_TEXTS

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def _documents(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of varied length and script (each ends with its index, so all differ)."""
    rng = np.random.default_rng(seed)
    samples = list(SAMPLE_TEXTS.values())
    docs = []
    for i in range(n):
        words = " ".join(WORDS[j] for j in rng.integers(len(WORDS), size=int(rng.integers(3, 40))))
        docs.append(f"{samples[i % len(samples)][: int(rng.integers(5, 80))]} {words} #{i}")
    return docs


DOCS = _documents(60)
_BYTE_TOKENIZERS: dict[str, ByteTokenizer] = {}


@pytest.fixture(params=["bytelevel", "sentencepiece"])
def byte_tok(request) -> ByteTokenizer:
    if request.param not in _BYTE_TOKENIZERS:
        source = request.getfixturevalue(f"{request.param}_tokenizer")
        _BYTE_TOKENIZERS[request.param] = ByteTokenizer.from_source(source)
    return _BYTE_TOKENIZERS[request.param]


def _token_bytes_reference(tok: ByteTokenizer, token_id: int) -> list[int]:
    """Byte-side ids of one source token, derived here from the token string (independently of data.py)."""
    src = tok.source_tokenizer
    if token_id == src.eos_token_id:
        return [EOS_ID]
    piece = src.convert_ids_to_tokens(int(token_id))
    if tok.source_vocab.family == "byte_level":
        table = {c: b for b, c in gpt2_byte_to_unicode().items()}
        data = bytes(table[c] for c in piece)
    elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
        data = bytes([int(piece[3:5], 16)])
    else:
        data = piece.replace("\u2581", " ").encode()
    return [b + BYTE_OFFSET for b in data]


def _tokens(tok: ByteTokenizer, text: str) -> list[int]:
    return tok.source_tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------


def _dataset(tok, docs=DOCS, **kwargs) -> ByteWindowDataset:
    kwargs.setdefault("window_tokens", 24)
    kwargs.setdefault("byte_expansion_factor", 100)
    kwargs.setdefault("document_piece_bytes", 0)  # whole documents, unless a test cuts them
    return ByteWindowDataset(docs, tok, **kwargs)


def test_windows_bytes_patches_teacher_alignment(byte_tok):
    tok, N = byte_tok, 24
    sep = tok.source_tokenizer.eos_token_id
    examples = list(_dataset(tok, shuffle=False))
    assert len(examples) > 10
    for k, ex in enumerate(examples):
        ids, lengths, tokens = ex["input_ids"], ex["patch_lengths"], ex["token_ids"]
        P = len(lengths)
        assert ids[0] == BOS_ID and lengths[0] == 1
        assert int(lengths.sum()) == len(ids) and len(tokens) == P
        assert tokens[0] != sep  # a window never starts with the document separator
        assert k == len(examples) - 1 or P == N  # only the last window may be short
        ends = np.cumsum(lengths.numpy())
        for j in range(1, P):  # patch j spells token j - 1, byte for byte
            assert ids[ends[j - 1] : ends[j]].tolist() == _token_bytes_reference(tok, tokens[j - 1])
        assert torch.equal(ex["expanded_ids"], torch.as_tensor(tok.expander.expand(ids.numpy())))
    # The windows' tokens are the documents' tokens, in order, with the separator between documents.
    stream = np.concatenate([ex["token_ids"].numpy() for ex in examples])
    expected = np.concatenate([np.array(_tokens(tok, d) + [sep]) for d in DOCS])
    assert np.array_equal(stream[stream != sep], expected[expected != sep])
    assert (stream == sep).sum() >= len(DOCS) - len(examples)  # only separators at window starts are dropped
    # Decoding the documents back: byte-level BPE is lossless, SentencePiece adds its leading space.
    text = (examples[0]["input_ids"][1:11].numpy() - BYTE_OFFSET).astype(np.uint8).tobytes()
    prefix = b"" if tok.source_vocab.family == "byte_level" else b" "
    assert text == (prefix + DOCS[0].encode())[:10]


def test_byte_cap_truncates_whole_patches(byte_tok):
    capped_ds = _dataset(byte_tok, shuffle=False, byte_expansion_factor=1.5)
    capped = list(capped_ds)
    full = list(_dataset(byte_tok, shuffle=False))
    cap = int(24 * 1.5)
    assert len(capped) == len(full)
    n_cut = 0
    for c, f in zip(capped, full):
        P = len(c["patch_lengths"])
        assert len(c["input_ids"]) <= cap and int(c["patch_lengths"].sum()) == len(c["input_ids"])
        assert len(c["token_ids"]) == P and len(c["expanded_ids"]) == len(c["input_ids"])
        assert torch.equal(c["input_ids"], f["input_ids"][: len(c["input_ids"])])
        assert torch.equal(c["patch_lengths"], f["patch_lengths"][:P])
        assert torch.equal(c["token_ids"], f["token_ids"][:P])
        assert torch.equal(c["expanded_ids"], f["expanded_ids"][: len(c["input_ids"])])  # prefix-only walk
        if P < len(f["patch_lengths"]):
            n_cut += 1
            assert len(c["input_ids"]) + f["patch_lengths"][P] > cap  # the next whole patch would not fit
    assert n_cut > 0
    stats = capped_ds.window_stats
    assert stats["truncated"] == n_cut and stats["windows"] == len(capped)
    assert stats["bytes"] == sum(len(c["input_ids"]) for c in capped)


def test_determinism_seed_and_sharding(byte_tok, tmp_path):
    def run(**kw):
        return [ex["token_ids"].tolist() for ex in _dataset(byte_tok, **kw)]

    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert a == b and a != c
    ds = _dataset(byte_tok, seed=3)
    assert [e["token_ids"].tolist() for e in ds] == [e["token_ids"].tolist() for e in ds] == a  # fresh passes
    # Two ranks: disjoint documents covering the corpus; each rank's windows hold exactly its documents.
    sep = byte_tok.source_tokenizer.eos_token_id
    shards = [_dataset(byte_tok, seed=3, rank=r, world_size=2, window_shuffle_buffer=0) for r in range(2)]
    docs = [list(s.documents(0)) for s in shards]
    assert set(docs[0]).isdisjoint(docs[1]) and sorted(docs[0] + docs[1]) == sorted(DOCS)
    assert abs(len(docs[0]) - len(docs[1])) <= 1
    for shard, shard_docs in zip(shards, docs):
        stream = np.concatenate([ex["token_ids"].numpy() for ex in shard])
        expected = np.concatenate([_tokens(byte_tok, d) for d in shard_docs])
        assert np.array_equal(stream[stream != sep], expected)
    # The same through an in-memory and a streaming `datasets` corpus.
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    for streaming in (False, True):
        corpus, _ = load_corpus(tmp_path, split=None, streaming=streaming)
        x = [e["token_ids"].tolist() for e in _dataset(byte_tok, corpus, seed=5)]
        y = [e["token_ids"].tolist() for e in _dataset(byte_tok, corpus, seed=5)]
        assert x == y and len(x) > 5
        read = [d for d in _dataset(byte_tok, corpus, seed=5).documents(0)]
        assert sorted(read) == sorted(DOCS) and read != DOCS  # shuffled, complete


def test_resume_continues_exactly(byte_tok, tmp_path, monkeypatch):
    kwargs = dict(seed=7, epochs=2, window_shuffle_buffer=8, convert_batch=5, tokenize_batch=4, rank=1,
                  world_size=2)
    reference = [ex["token_ids"].tolist() for ex in _dataset(byte_tok, **kwargs)]
    per_epoch = len(list(_dataset(byte_tok, **{**kwargs, "epochs": 1})))
    assert reference[:per_epoch] != reference[per_epoch:]  # epochs are shuffled differently
    tokenized: list[str] = []
    original = ByteWindowDataset._tokenize
    monkeypatch.setattr(ByteWindowDataset, "_tokenize",
                        lambda self, texts: tokenized.extend(texts) or original(self, texts))
    for stop in (3, 7, per_epoch, per_epoch + 2):
        first = _dataset(byte_tok, **kwargs)
        head = [ex["token_ids"].tolist() for ex in itertools.islice(iter(first), stop)]
        state = first.state_dict()
        assert (state["epoch"], state["consumed"]) == ((0, stop) if stop <= per_epoch else (1, stop - per_epoch))
        torch.save(state, tmp_path / "state.pt")
        minimal = {"epoch": state["epoch"], "consumed": state["consumed"]}  # replayed (re-tokenised)
        for saved in (torch.load(tmp_path / "state.pt", weights_only=True), minimal):
            resumed = _dataset(byte_tok, **kwargs)
            resumed.load_state_dict(saved)
            resumed = pickle.loads(pickle.dumps(resumed))  # DataLoader workers (spawn) receive a pickled copy
            tokenized.clear()
            tail = [ex["token_ids"].tolist() for ex in resumed]
            assert head + tail == reference, (stop, sorted(saved))
            if "documents_read" in saved and saved["epoch"] == 0:  # full state: read documents are not re-tokenised
                rank_docs = len(DOCS) // 2
                assert 0 < saved["documents_read"] <= rank_docs and (stop > 3 or saved["documents_read"] < rank_docs)
                assert len(tokenized) == (rank_docs - saved["documents_read"]) + rank_docs  # rest of epoch 0 + epoch 1
            assert len(list(resumed)) == len(reference)  # the loaded position is used once, then fresh passes
    with pytest.raises(ValueError, match="seed"):
        _dataset(byte_tok, seed=8).load_state_dict(state)


def test_dataloader_and_char_skill_mixing(byte_tok, monkeypatch):
    gen = CharSkillGenerator(WORDS + ["zulu", "yankee", "xray", "whiskey", "victor", "uniform"])
    ds = _dataset(byte_tok, seed=1, char_skills=gen, char_rate=0.5)
    docs = list(ds.documents(0))
    n_char = sum(d not in DOCS for d in docs)
    assert 0.3 < n_char / len(docs) < 0.7 and [d for d in docs if d in DOCS] != []
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ByteCollator.from_tokenizer(byte_tok))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["token_ids"].shape == batch["patch_mask"].shape
    # Several DataLoader workers would interleave one stream ambiguously: refused with a clear error.
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: type("Info", (), {"num_workers": 2})())
    with pytest.raises(ValueError, match="num_workers"):
        next(iter(ds))


# ---------------------------------------------------------------------------------------------------------
# Long documents cut into pieces before the document shuffle
# ---------------------------------------------------------------------------------------------------------


def _long_document(i: int, lines: int, seed: int = 0) -> str:
    """A multi-line document (code-like lines of varied length, some in other scripts), distinct per i."""
    rng = np.random.default_rng([seed, i])
    samples = list(SAMPLE_TEXTS.values())
    out = []
    for j in range(lines):
        words = " ".join(WORDS[k] for k in rng.integers(len(WORDS), size=int(rng.integers(0, 12))))
        extra = samples[j % len(samples)][: int(rng.integers(0, 30))].replace("\n", " ") if j % 3 == 0 else ""
        out.append(f"{'    ' * int(rng.integers(3))}line_{i}_{j} = {words!r} {extra}".rstrip())
    return "\n".join(out) + ("\n" if i % 2 else "")


def _byte_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def test_split_document_hand_examples():
    assert split_document("aaa\nbb\ncccc\n", 6) == ["aaa\n", "bb\n", "cccc\n"]
    assert split_document("aaa\nbb\ncccc\n", 12) == ["aaa\nbb\ncccc\n"]  # within the limit: whole
    assert split_document("aaa\nbb\ncccc\n", 0) == split_document("aaa\nbb\ncccc\n", None) == ["aaa\nbb\ncccc\n"]
    assert split_document("ab\n" * 4, 6) == ["ab\nab\n", "ab\nab\n"]  # at line ends
    assert split_document("a\n" * 7, 12) == ["a\n" * 3, "a\n" * 4]  # balanced: not 12 bytes + a 2-byte rest
    assert split_document("é" * 5, 3) == ["é"] * 5  # a line over the limit: cut between characters
    assert split_document("x\n" + "y" * 10 + "\nz", 4) == ["x\n", "yyyy", "yyyy", "yy\nz"]


@pytest.mark.parametrize("max_bytes", [7, 40, 100, 333])
def test_split_document_limit_line_breaks_and_round_trip(max_bytes):
    docs = [_long_document(i, 40) for i in range(6)] + list(SAMPLE_TEXTS.values())
    docs += ["x" * 500, "no newline at all " * 30, "\n\n\n" * 60, "a\ud800b\n" * 90, "🚀" * 100 + "\n" + "é" * 77]
    cut_lines = 0
    for doc in docs:
        pieces = split_document(doc, max_bytes)
        assert "".join(pieces) == doc and all(pieces)
        assert (len(pieces) == 1) == (_byte_len(doc) <= max_bytes)
        assert all(_byte_len(p) <= max_bytes for p in pieces)
        lines = [_byte_len(line) for line in doc.split("\n")]  # without their "\n"
        ends = np.cumsum([n + 1 for n in lines])  # byte offset after each line's "\n" (the last: one past)
        for cut in np.cumsum([_byte_len(p) for p in pieces])[:-1]:
            if cut in ends:
                continue  # at a line end
            k = int(np.searchsorted(ends, cut))  # the cut is inside line k: only a line over the limit
            assert lines[k] + 1 > max_bytes, (doc[:40], max_bytes, cut)
            cut_lines += 1
    assert cut_lines > 0


def _doc_of_window(ds: ByteWindowDataset, docs: list[str], monkeypatch) -> np.ndarray:
    """(windows,) index of the document most of each window's tokens come from (tokens tagged by document)."""
    owner = {}
    for i, doc in enumerate(docs):
        for piece in split_document(doc, ds.document_piece_bytes):
            owner.setdefault(piece, i + 1)
    shift = 1 << 24
    original = ByteWindowDataset._tokenize
    monkeypatch.setattr(ByteWindowDataset, "_tokenize",
                        lambda self, texts: [ids + shift * owner[t] for ids, t in zip(original(self, texts), texts)])
    out = []
    for w in ds.token_windows(0):
        tags = w[w != ds.separator_id] // shift - 1
        out.append(int(np.bincount(tags).argmax()))
    monkeypatch.setattr(ByteWindowDataset, "_tokenize", original)
    return np.array(out)


@pytest.mark.parametrize("kind", ["list", "dataset", "streaming"])
def test_pieces_spread_a_long_document_over_the_epoch(byte_tok, tmp_path, monkeypatch, kind):
    long_doc = _long_document(0, 50)  # 3 KB: about a fifth of the corpus's windows
    docs = [long_doc] + DOCS
    if kind == "list":
        corpus = docs
    else:
        (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
        corpus, _ = load_corpus(tmp_path, split=None, streaming=kind == "streaming")
    runs, stretch = {}, {}
    for piece_bytes in (0, 256):
        ds = _dataset(byte_tok, corpus, seed=2, window_shuffle_buffer=8, document_piece_bytes=piece_bytes)
        owner = _doc_of_window(ds, docs, monkeypatch)
        is_long = owner == 0
        assert 0.1 < is_long.mean() < 0.5
        runs[piece_bytes] = max(len(list(g)) for v, g in itertools.groupby(is_long) if v)
        stretch[piece_bytes] = max(is_long[i : i + 40].sum() for i in range(len(owner) - 39))
    # Whole: the long document fills a long stretch of consecutive windows (a run of 69-83 windows); in
    # pieces it is mixed in (runs of 6-7, at most 23 of any 40 consecutive windows).
    assert runs[0] >= 40 and stretch[0] == 40
    assert runs[256] <= runs[0] // 4 and stretch[256] <= 30, (runs, stretch)


@pytest.mark.parametrize("kind", ["list", "dataset", "streaming"])
def test_resume_with_pieces_continues_exactly(byte_tok, tmp_path, kind):
    docs = DOCS[:30] + [_long_document(i, 30) for i in range(6)]
    if kind == "list":
        corpus = docs
    else:
        (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
        corpus, _ = load_corpus(tmp_path, split=None, streaming=kind == "streaming")
    kwargs = dict(seed=7, epochs=2, window_shuffle_buffer=8, convert_batch=5, tokenize_batch=4, rank=1,
                  world_size=2, document_piece_bytes=150)
    reference_ds = _dataset(byte_tok, corpus, **kwargs)
    units = list(reference_ds.documents(0))
    assert len(units) > len(docs) // 2 + 10  # this rank's share of the pieces
    assert sorted(units + list(_dataset(byte_tok, corpus, **{**kwargs, "rank": 0}).documents(0))) == sorted(
        p for d in docs for p in split_document(d, 150))  # every piece once, over the two ranks
    reference = [ex["token_ids"].tolist() for ex in reference_ds]
    per_epoch = len(list(_dataset(byte_tok, corpus, **{**kwargs, "epochs": 1})))
    for stop in (4, per_epoch - 1, per_epoch + 3):
        first = _dataset(byte_tok, corpus, **kwargs)
        head = [ex["token_ids"].tolist() for ex in itertools.islice(iter(first), stop)]
        state = first.state_dict()
        torch.save(state, tmp_path / "state.pt")
        for saved in (torch.load(tmp_path / "state.pt", weights_only=True),
                      {"epoch": state["epoch"], "consumed": state["consumed"]}):
            resumed = _dataset(byte_tok, corpus, **kwargs)
            resumed.load_state_dict(saved)
            if kind != "streaming":  # (load_corpus's streaming generator is a local function: not picklable)
                resumed = pickle.loads(pickle.dumps(resumed))
            assert head + [ex["token_ids"].tolist() for ex in resumed] == reference, (stop, sorted(saved))
    # The count of documents read depends on the piece size: a state of another size is refused.
    legacy = {k: v for k, v in state.items() if k != "document_piece_bytes"}  # counted whole documents
    for other in ({**state, "document_piece_bytes": 0}, legacy):
        with pytest.raises(ValueError, match="document_piece_bytes"):
            _dataset(byte_tok, corpus, **kwargs).load_state_dict(other)


def test_pieces_leave_the_heldout_split_whole(byte_tok, tmp_path):
    from bytelift.training import TrainConfig, _datasets

    docs = [_long_document(i, 20 + i % 7) for i in range(40)] + DOCS[:20]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = TrainConfig(data=[str(tmp_path)], heldout_fraction=0.3, window_tokens=24, document_piece_bytes=120)
    train, evals, _ = _datasets(cfg, byte_tok, 0, 1)
    held = [d for d in docs if is_heldout(d, 0.3)]
    kept = [d for d in docs if not is_heldout(d, 0.3)]
    assert any(_byte_len(d) > 120 for d in held) and any(_byte_len(d) > 120 for d in kept)
    # Training reads the pieces of the training documents only (the split is by whole document).
    assert sorted(train.documents(0)) == sorted(p for d in kept for p in split_document(d, 120))
    assert train.document_piece_bytes == 120
    # The held-out set is read whole, in order: its windows do not depend on the option.
    assert evals.document_piece_bytes == 0 and list(evals.documents(0)) == held
    whole = ByteWindowDataset(evals.corpus, byte_tok, window_tokens=24, epochs=1, shuffle=False, document_piece_bytes=0)
    assert [e["token_ids"].tolist() for e in evals] == [e["token_ids"].tolist() for e in whole]
    # By default the pieces are a few windows long.
    assert TrainConfig().document_piece_bytes is None
    assert _dataset(byte_tok, document_piece_bytes=None, window_tokens=128).document_piece_bytes == 2048


# ---------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------


def test_collator_hand_built_batch():
    t = torch.tensor
    examples = [
        {"input_ids": t([BOS_ID, 10, 11, 12]), "patch_lengths": t([1, 2, 1]), "expanded_ids": t([90, 5, 6, 7]),
         "token_ids": t([40, 41, 42])},
        {"input_ids": t([BOS_ID, 20]), "patch_lengths": t([1, 1]), "expanded_ids": t([90, 8]),
         "token_ids": t([43, 44])},
    ]
    batch = ByteCollator(99, token_pad_id=3, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 0, 0, 0, 0], [1, 20, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 2 + [0] * 6]
    assert batch["labels"].tolist() == [[1, 10, 11, 12] + [IGNORE_INDEX] * 4, [1, 20] + [IGNORE_INDEX] * 6]
    assert batch["expanded_ids"].tolist() == [[90, 5, 6, 7] + [99] * 4, [90, 8] + [99] * 6]
    F, T = False, True
    assert batch["boundary_labels"].tolist() == [[T, F, T, T, F, F, F, F], [T, T, F, F, F, F, F, F]]
    assert batch["patch_ids"].tolist() == [[0, 1, 1, 2, -1, -1, -1, -1], [0, 1, -1, -1, -1, -1, -1, -1]]
    assert batch["patch_lengths"].tolist() == [[1, 2, 1], [1, 1, 0]]
    assert batch["patch_mask"].tolist() == [[T, T, T], [T, T, F]]
    assert batch["token_ids"].tolist() == [[40, 41, 42], [43, 44, 3]]
    assert batch["token_mask"].tolist() == [[T, T, T], [T, T, F]]
    with pytest.raises(ValueError, match="sum"):
        ByteCollator(99)([{**examples[0], "patch_lengths": t([1, 2])}])


def test_collator_real_ragged_batch(byte_tok):
    examples = list(_dataset(byte_tok, shuffle=False))
    batch = ByteCollator.from_tokenizer(byte_tok)([examples[0], examples[-1], examples[1]])  # last is short
    valid = batch["attention_mask"].bool()
    assert valid.sum().item() == sum(len(e["input_ids"]) for e in (examples[0], examples[-1], examples[1]))
    assert torch.equal(batch["boundary_labels"].sum(1), batch["patch_mask"].sum(1))
    assert not batch["boundary_labels"][~valid].any() and (batch["input_ids"][~valid] == PAD_ID).all()
    assert (batch["expanded_ids"][~valid] == byte_tok.no_subword_id).all()
    assert torch.equal(batch["patch_ids"] >= 0, valid)
    # patch_ids jump exactly after each boundary
    nxt = batch["patch_ids"][:, 1:] - batch["patch_ids"][:, :-1]
    assert torch.equal((nxt == 1) & valid[:, 1:], batch["boundary_labels"][:, :-1] & valid[:, 1:])
    assert torch.equal(batch["token_mask"], batch["patch_mask"])
    from bytelift.modeling import IGNORE_INDEX as MODEL_IGNORE_INDEX

    assert IGNORE_INDEX == MODEL_IGNORE_INDEX


# ---------------------------------------------------------------------------------------------------------
# BPE merges
# ---------------------------------------------------------------------------------------------------------


def test_bpe_merges_hand_examples():
    # tokens: BOS a b a b c -> (a, b) is the most frequent pair; 2 merges reach 6 bytes / 4 patches
    result = bpe_merge_patches(torch.tensor([[1, 1, 1, 1, 1, 1]]), torch.tensor([[0, 5, 6, 5, 6, 7]]), 1.5)
    assert result.patch_lengths.tolist() == [[1, 2, 2, 1]] and result.ratio == 1.5
    # (x, x) runs merge without overlap, left to right; only as many as needed
    result = bpe_merge_patches(torch.tensor([[1, 1, 1, 1, 0]]), torch.tensor([[0, 9, 9, 9, 0]]), 4 / 3)
    assert result.patch_lengths.tolist() == [[1, 2, 1]]
    result = bpe_merge_patches(torch.tensor([[1, 1, 1, 1, 1]]), torch.tensor([[0, 9, 9, 9, 9]]), 5 / 3)
    assert result.patch_lengths.tolist() == [[1, 2, 2]]
    # Rows merge independently in one batch (each to its own budget); an empty row stays empty.
    lengths = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    tokens = torch.tensor([[0, 5, 6, 5, 6, 7], [0, 9, 9, 9, 0, 0], [0, 0, 0, 0, 0, 0]])
    result = bpe_merge_patches(lengths, tokens, 1.5)
    assert result.patch_lengths.tolist() == [[1, 2, 2, 1], [1, 3, 0, 0], [0, 0, 0, 0]]


def test_bpe_merges_reach_ratio_on_real_batch(byte_tok):
    examples = list(_dataset(byte_tok, window_tokens=64, shuffle=False))[:4]
    batch = ByteCollator.from_tokenizer(byte_tok)(examples)
    base = batch["patch_lengths"].sum(1).double() / batch["patch_mask"].sum(1)
    target = float(base.max()) * 1.6
    result = bpe_merge_patches(batch["patch_lengths"], batch["token_ids"], target, seed=0)
    assert (result.ratios >= target - 1e-9).all() and result.ratio >= target - 1e-9  # RATIO_EPS tolerance
    assert torch.equal(result.patch_lengths.sum(1), batch["patch_lengths"].sum(1))  # bytes preserved
    assert (result.patch_lengths[:, 0] == 1).all()  # BOS stays alone
    L = batch["input_ids"].shape[1]
    merged, original = patch_boundaries(result.patch_lengths, L), batch["boundary_labels"]
    assert not (merged & ~original).any()  # merged boundaries are a subset of token boundaries
    assert (merged.sum(1) < original.sum(1)).all()
    again = bpe_merge_patches(batch["patch_lengths"], batch["token_ids"], target, seed=0)
    assert torch.equal(again.patch_lengths, result.patch_lengths)


# ---------------------------------------------------------------------------------------------------------
# Character-skill data
# ---------------------------------------------------------------------------------------------------------


def _check_answer(ex) -> None:
    quoted = re.findall(r"'([^']*)'", ex.prompt)
    task, ans = ex.task, ex.answer
    if task == "spell":
        assert ans == " ".join(quoted[0])
    elif task == "unspell":
        assert ans == ex.prompt.removeprefix("Which word is spelled ").removesuffix("?").replace(" ", "")
    elif task == "reverse":
        assert ans == quoted[0][::-1]
    elif task == "insert_char":
        new, old, word = quoted
        assert ans == "".join(c + new if c == old else c for c in word) and old in word
    elif task == "delete_char":
        old, word = quoted
        assert ans == "".join(c for c in word if c != old) and len(ans) < len(word)
    elif task == "substitute_char":
        old, word, new = quoted
        assert ans == "".join(new if c == old else c for c in word) and ans != word
    elif task == "swap_char":
        i, j = (int(x) - 1 for x in re.findall(r"(\d+)(?:st|nd|rd|th)", ex.prompt))
        word = quoted[0]
        assert sorted(ans) == sorted(word) and ans[i] == word[j] and ans[j] == word[i] and ans != word
    elif task == "contains_char":
        word, letter = quoted
        assert ans == ("yes" if letter in word else "no")
    elif task == "reverse_words":
        assert ans.split() == quoted[0].split()[::-1]
    elif task == "contains_word":
        text, word = quoted
        assert ans == ("yes" if word in text.split() else "no")
    else:
        ordinals = [int(x) - 1 for x in re.findall(r"(\d+)(?:st|nd|rd|th)", ex.prompt)]
        if task == "insert_word":
            new, text = quoted
            words, k = text.split(), ordinals[0]
            assert ans.split() == words[: k + 1] + [new] + words[k + 1 :]
        elif task == "delete_word":
            words, k = quoted[0].split(), ordinals[0]
            assert ans.split() == words[:k] + words[k + 1 :]
        elif task == "substitute_word":
            (text, new), k = quoted, ordinals[0]
            assert ans.split() == text.split()[:k] + [new] + text.split()[k + 1 :]
        else:
            assert task == "swap_words"
            words, (i, j) = quoted[0].split(), ordinals
            assert ans.split() == words[:i] + [words[j]] + words[i + 1 : j] + [words[i]] + words[j + 1 :]


def test_char_skills_answers_split_and_determinism():
    gen = CharSkillGenerator()
    train, evaluation = set(gen.training_words()), set(gen.evaluation_words())
    assert train.isdisjoint(evaluation) and len(train) > 1000 and len(evaluation) > 1000
    # The split depends on the word only: a reordered list splits the same way.
    reordered = CharSkillGenerator(sorted(train | evaluation, reverse=True))
    assert set(reordered.evaluation_words()) == evaluation
    examples = list(itertools.islice(gen.examples(seed=11), 600))
    assert {e.task for e in examples} == set(CharSkillGenerator.TASKS)
    for ex in examples:
        _check_answer(ex)
        quoted_words = set(re.findall(r"[a-z]+", " ".join(re.findall(r"'([^']*)'", ex.prompt))))
        used = quoted_words | ({ex.answer} if ex.task == "unspell" else set())
        assert used and used.isdisjoint(evaluation) and used & train  # only training words are used
    again = list(itertools.islice(gen.examples(seed=11), 600))
    assert again == examples and list(itertools.islice(gen.examples(seed=12), 50)) != examples[:50]
    doc = next(gen.documents(seed=1))
    assert doc.count("\n\n") == gen.examples_per_document - 1


def test_mix_documents_rate_and_order():
    corpus = [f"doc{i}" for i in range(2000)]
    extra = (f"extra{i}" for i in itertools.count())
    mixed = list(mix_documents(corpus, extra, 0.2, seed=0))
    assert [d for d in mixed if d.startswith("doc")] == corpus  # corpus order kept, nothing lost
    assert 0.17 < sum(d.startswith("extra") for d in mixed) / len(mixed) < 0.23
    assert mixed == list(mix_documents(corpus, (f"extra{i}" for i in itertools.count()), 0.2, seed=0))
    assert list(mix_documents(corpus, iter(()), 0.0)) == corpus


# ---------------------------------------------------------------------------------------------------------
# The batch contract, end to end: a collated batch drives the model (teacher forcing) and the teacher
# ---------------------------------------------------------------------------------------------------------


def test_batch_drives_model_and_teacher(bytelevel_tokenizer):
    from bytelift.modeling import ByteliftForCausalLM
    from tests.tiny_models import tiny_source

    model = ByteliftForCausalLM.from_source(tiny_source("qwen2", bytelevel_tokenizer), bytelevel_tokenizer,
                                            local_heads=4).eval()
    source = tiny_source("qwen2", bytelevel_tokenizer)  # the teacher (from_source took over the first copy)
    tok = ByteTokenizer.from_source(bytelevel_tokenizer)
    examples = list(_dataset(tok, window_tokens=16, shuffle=False))
    batch = ByteCollator.from_tokenizer(tok)([examples[0], examples[-1]])  # ragged
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    expanded_ids=batch["expanded_ids"], boundary_mask=batch["boundary_labels"],
                    labels=batch["labels"])
        # Teacher: [eos] + token_ids[:-1]; position j <-> patch j.
        eos = torch.full_like(batch["token_ids"][:, :1], bytelevel_tokenizer.eos_token_id)
        teacher = source(input_ids=torch.cat([eos, batch["token_ids"][:, :-1]], dim=1),
                         attention_mask=batch["token_mask"].long())
    assert torch.isfinite(out.loss)
    assert torch.equal(out.patch_mask, batch["patch_mask"])  # model patches == data patches, row by row
    assert out.global_hidden_states.shape[:2] == teacher.logits.shape[:2] == batch["token_ids"].shape


@pytest.mark.slow
def test_windows_with_smollm2(smollm2_tokenizer):
    """The real source: reference window size, byte cap, patch/token alignment, code and prose."""
    import sysconfig
    from pathlib import Path

    tok = ByteTokenizer.from_source(smollm2_tokenizer)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus, stats = load_corpus([stdlib / "json", stdlib / "email"], text_suffixes=(".py",), split=None)
    examples = list(itertools.islice(iter(ByteWindowDataset(corpus, tok, seed=0)), 4))
    for ex in examples:
        assert len(ex["token_ids"]) == len(ex["patch_lengths"]) == 4096
        assert int(ex["patch_lengths"].sum()) == len(ex["input_ids"]) <= 4096 * 6
        ends = np.cumsum(ex["patch_lengths"].numpy())
        for j in (1, 100, 4095):
            expected = _token_bytes_reference(tok, ex["token_ids"][j - 1])
            assert ex["input_ids"][ends[j - 1] : ends[j]].tolist() == expected
    batch = ByteCollator.from_tokenizer(tok, pad_to_multiple_of=64)(examples)
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["patch_mask"].all()
