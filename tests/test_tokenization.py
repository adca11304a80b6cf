"""Byte ids, source vocabulary -> bytes, longest-suffix expansion and the ByteTokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bytelift.tokenization import (
    BOS_ID,
    BYTE_OFFSET,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    FILLER_ID,
    FUSED_VOCAB_SIZE,
    PAD_ID,
    SOURCE_TOKENIZER_SUBFOLDER,
    ByteTokenizer,
    SuffixExpander,
    bytes_to_ids,
    fuse,
    ids_to_bytes,
    is_fused,
    missing_single_bytes,
    source_token_bytes,
    source_vocabulary,
    unfuse,
)
from tests.tiny_tokenizers import (
    CORPUS,
    SAMPLE_TEXTS,
    make_bytelevel_tokenizer,
    make_wordpiece_tokenizer,
)

INVALID_UTF8 = b"ok \xff\xfe bad \xc3( \xe2\x82 trunc \xf0\x9f\x98 \x00 nul \xed\xa0\x80 surrogate \x80\x80"


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def brute_force_expand(token_bytes, fallback_ids, special_to_source, byte_ids):
    """Reference: for each position try every suffix length against a dict of all token byte strings."""
    table: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes):  # ordinary pieces beat byte-fallback pieces, then the lowest id
        if b and (b not in table or (table[b] in fallback_ids and i not in fallback_ids)):
            table[b] = i
    none = len(token_bytes)
    longest = max(map(len, table))
    seq = [int(unfuse(int(x))) for x in byte_ids]
    out = []
    for t, x in enumerate(seq):
        if x < BYTE_OFFSET:
            out.append(special_to_source.get(x, none))
            continue
        best = none
        for length in range(1, min(longest, t + 1) + 1):
            window = seq[t - length + 1 : t + 1]
            if min(window) < BYTE_OFFSET:
                break  # a special id stops the match
            piece = bytes(v - BYTE_OFFSET for v in window)
            if piece in table:
                best = table[piece]
        out.append(best)
    return np.array(out, dtype=np.int64)


def noisy_sequences(rng, n_seqs=6, length=400):
    """Byte-id sequences built from corpus text with random bytes, special ids and fused ids mixed in."""
    corpus = np.frombuffer(CORPUS.encode(), np.uint8).astype(np.int64) + BYTE_OFFSET
    seqs = []
    for _ in range(n_seqs):
        start = rng.integers(0, len(corpus) - length)
        seq = corpus[start : start + length].copy()
        noise = rng.random(length)
        random_byte, special = noise < 0.05, (noise > 0.05) & (noise < 0.07)
        seq[random_byte] = rng.integers(BYTE_OFFSET, BYTE_VOCAB_SIZE, size=random_byte.sum())
        seq[special] = rng.integers(0, BYTE_OFFSET, size=special.sum())
        fused = rng.random(length) < 0.2
        seqs.append(np.where(fused, seq + BYTE_VOCAB_SIZE, seq))
    seqs.append(rng.integers(BYTE_OFFSET, BYTE_VOCAB_SIZE, size=length))  # uniform random bytes
    return seqs


def text_sequences():
    seqs = [np.concatenate([[BOS_ID], bytes_to_ids(t)]) for t in SAMPLE_TEXTS.values()]
    seqs.append(np.concatenate([[BOS_ID], bytes_to_ids(INVALID_UTF8)]))
    return seqs


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def source(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    return {"bytelevel": bytelevel_tokenizer, "sentencepiece": sentencepiece_tokenizer}[request.param]


@pytest.fixture(scope="module")
def byte_tok(bytelevel_tokenizer):
    return ByteTokenizer.from_source(bytelevel_tokenizer)


# ---------------------------------------------------------------------------------------------------------
# ids
# ---------------------------------------------------------------------------------------------------------


def test_id_layout_constants():
    assert (PAD_ID, BOS_ID, EOS_ID, FILLER_ID, BYTE_OFFSET) == (0, 1, 2, 3, 4)
    assert BYTE_VOCAB_SIZE == 260 and FUSED_VOCAB_SIZE == 520
    assert bytes_to_ids(b"\x00A\xff").tolist() == [4, 69, 259]


def test_fuse_unfuse_ints_numpy_torch():
    assert fuse(5, True) == 265 and fuse(5, False) == 5 and unfuse(265) == 5 and unfuse(259) == 259
    assert is_fused(260) and not is_fused(259)
    ids = np.array([0, 4, 259, 100])
    flags = np.array([True, False, True, True])
    fused = fuse(ids, flags)
    assert fused.tolist() == [260, 4, 519, 360]
    assert unfuse(fused).tolist() == ids.tolist() and is_fused(fused).tolist() == flags.tolist()
    t = torch.tensor([[0, 4], [259, 100]])
    tf = fuse(t, torch.tensor([[True, False], [True, True]]))
    assert tf.tolist() == [[260, 4], [519, 360]] and unfuse(tf).tolist() == t.tolist()
    assert is_fused(tf).tolist() == [[True, False], [True, True]]
    with pytest.raises(ValueError):
        fuse(260, True)  # already an output id
    with pytest.raises(ValueError):
        fuse(np.array([300]), np.array([False]))


# ---------------------------------------------------------------------------------------------------------
# source vocabulary -> bytes
# ---------------------------------------------------------------------------------------------------------


def _anchor_decode_check(tok, token_bytes, anchor_text):
    """tok.decode([anchor, i]) must equal anchor + the token's bytes for every non-special id with valid UTF-8."""
    anchor = tok.convert_tokens_to_ids(anchor_text)
    checked = 0
    for i, b in enumerate(token_bytes):
        if b is None:
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.decode([anchor, i]) == anchor_text.replace("▁", " ") + text, (i, b)
        checked += 1
    return checked


def test_bytelevel_token_bytes(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    vocab = source_vocabulary(tok)
    assert vocab.family == "byte_level" and vocab.size == len(tok)
    tb = source_token_bytes(tok)
    assert len(tb) == len(tok)
    assert all(tb[i] is None for i in tok.all_special_ids)
    assert vocab.missing_single_bytes == []  # the full GPT-2 alphabet
    assert tb[tok.convert_tokens_to_ids("Ġ")] == b" " and tb[tok.convert_tokens_to_ids("Ċ")] == b"\n"
    assert _anchor_decode_check(tok, tb, "a") > 500
    for text in [*SAMPLE_TEXTS.values(), CORPUS]:  # the concatenated token bytes are exactly the text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(tb[i] for i in ids) == text.encode()


def test_sentencepiece_token_bytes(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    vocab = source_vocabulary(tok)
    assert vocab.family == "sentencepiece" and vocab.size == len(tok)
    tb = list(vocab.token_bytes)
    assert [tb[tok.convert_tokens_to_ids(s)] for s in ("<unk>", "<s>", "</s>")] == [None] * 3
    for b in range(256):  # <0xNN> pieces are that single byte
        i = tok.convert_tokens_to_ids(f"<0x{b:02X}>")
        assert tb[i] == bytes([b]) and i in vocab.fallback_ids
    assert tb[tok.convert_tokens_to_ids("▁")] == b" "
    spaced = [p for p in tok.get_vocab() if p.startswith("▁") and len(p) > 2][:20]
    assert spaced and all(tb[tok.convert_tokens_to_ids(p)] == (" " + p[1:]).encode() for p in spaced)
    assert _anchor_decode_check(tok, tb, "a") > 300
    # Multi-byte characters through byte pieces decode like the tokenizer does.
    pieces = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "中".encode()]
    assert tok.decode(pieces) == "中" == b"".join(tb[i] for i in pieces).decode()
    for text in SAMPLE_TEXTS.values():  # Metaspace prepends one space (prepend_scheme "first")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(tb[i] for i in ids) == b" " + text.encode()
        assert any(i in vocab.fallback_ids for i in tok(SAMPLE_TEXTS["unseen"])["input_ids"])


def test_unsupported_tokenizers_are_refused():
    with pytest.raises(ValueError, match=r"TokenizersBackend.*WordPiece"):
        source_vocabulary(make_wordpiece_tokenizer())
    with pytest.raises(ValueError, match="WordPiece"):
        ByteTokenizer.from_source(make_wordpiece_tokenizer())

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    char_bpe = Tokenizer(models.BPE(unk_token="<unk>"))  # character BPE with an unknown token
    char_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    char_bpe.train_from_iterator([CORPUS], trainer)
    with pytest.raises(ValueError, match="unknown token"):
        source_vocabulary(char_bpe)

    model = models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>", byte_fallback=True)
    fallback_no_marker = Tokenizer(model)
    fallback_no_marker.decoder = decoders.ByteFallback()
    with pytest.raises(ValueError, match="space convention"):
        source_vocabulary(fallback_no_marker)

    class NoBackend:  # e.g. a slow, pure-Python tokenizer
        pass

    with pytest.raises(ValueError, match="NoBackend.*backend"):
        source_vocabulary(NoBackend())


def test_missing_single_bytes_get_no_subword_id():
    tok = make_bytelevel_tokenizer(full_alphabet=False)  # only bytes seen in the corpus, like SmolLM2
    vocab = source_vocabulary(tok)
    seen = set(CORPUS.encode())
    assert vocab.missing_single_bytes == [b for b in range(256) if b not in seen]
    assert missing_single_bytes(vocab.token_bytes) == vocab.missing_single_bytes
    expander = SuffixExpander.from_vocabulary(vocab)
    missing = vocab.missing_single_bytes
    assert expander.missing_single_bytes == missing
    assert len(missing) > 50 and 0xFF in missing
    ids = np.array([BOS_ID] + [m + BYTE_OFFSET for m in missing[:50]])
    out = expander.expand(ids)
    assert out[0] == tok.bos_token_id
    assert (out[1:] == expander.no_subword_id).all() and expander.no_subword_id == len(tok)

    # A byte without a token of its own can still end a longer token: the longest match wins.
    custom = SuffixExpander([b"a", b"bc", None, b"xyz"])
    got = custom.expand(bytes_to_ids(b"abcbcxyzyz"))
    none = custom.no_subword_id
    assert got.tolist() == [0, none, 1, none, 1, none, none, 3, none, none]


# ---------------------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense_table_bytes", [0, 300_000, 2**24], ids=["sparse", "mixed", "dense"])
def test_expand_matches_brute_force(source, dense_table_bytes):
    vocab = source_vocabulary(source)
    expander = SuffixExpander.from_vocabulary(vocab, dense_table_bytes=dense_table_bytes)
    # Child lookups through sorted edge keys from depth 2, from depth 3, or dense tables all the way.
    want_dense_depth = {0: 1, 300_000: 2, 2**24: expander.max_token_len}[dense_table_bytes]
    assert expander._dense_depth == want_dense_depth
    rng = np.random.default_rng(0)
    for seq in noisy_sequences(rng) + text_sequences():
        want = brute_force_expand(vocab.token_bytes, vocab.fallback_ids, expander.special_to_source, seq)
        np.testing.assert_array_equal(expander.expand(seq), want)
    # The matches really cross token boundaries: some ids are longer than the token that ends there.
    seq = bytes_to_ids(SAMPLE_TEXTS["english"])
    got_len = np.array([len(vocab.token_bytes[i]) for i in expander.expand(seq)])
    ids = source(SAMPLE_TEXTS["english"], add_special_tokens=False)["input_ids"]
    real_len = np.array([len(vocab.token_bytes[i]) for i in ids])
    if vocab.family == "byte_level":  # (SentencePiece's tokens carry a leading space the text lacks)
        ends = np.cumsum(real_len) - 1
        assert (got_len[ends] >= real_len).all() and (got_len[ends] > real_len).any()


def test_expand_specials_and_ties(sentencepiece_tokenizer):
    vocab = source_vocabulary(sentencepiece_tokenizer)
    expander = SuffixExpander.from_vocabulary(vocab)
    none = expander.no_subword_id
    bos = sentencepiece_tokenizer.bos_token_id
    assert expander.special_to_source == {PAD_ID: none, BOS_ID: bos, EOS_ID: bos, FILLER_ID: none}
    # ' ' is both '▁' and '<0x20>': the ordinary piece wins.
    assert expander.expand(bytes_to_ids(b" "))[0] == sentencepiece_tokenizer.convert_tokens_to_ids("▁")
    # A special id stops the match: 'e' after EOS is matched alone, not as part of 'the'.
    plain = expander.expand(bytes_to_ids(b"the"))
    cut = expander.expand(np.concatenate([bytes_to_ids(b"th"), [EOS_ID], bytes_to_ids(b"e")]))
    assert cut[2] == bos and cut[3] == expander.expand(bytes_to_ids(b"e"))[0] != plain[2]
    custom = SuffixExpander.from_vocabulary(vocab, special_to_source={EOS_ID: 2, FILLER_ID: 0})
    assert custom.expand(np.array([PAD_ID, BOS_ID, EOS_ID, FILLER_ID])).tolist() == [none, bos, 2, 0]
    for bad in ([600], [-1], np.array([1.5])):
        with pytest.raises(ValueError):
            expander.expand(bad)


def test_expand_last_equals_tail(source):
    expander = SuffixExpander.from_tokenizer(source)
    rng = np.random.default_rng(1)
    for seq in noisy_sequences(rng, n_seqs=2) + text_sequences()[:3]:
        full = expander.expand(seq)
        for k in (0, 1, 2, 5, expander.max_token_len, len(seq), len(seq) + 10):
            np.testing.assert_array_equal(expander.expand_last(seq, k), full[len(full) - min(k, len(seq)) :])
        # Incremental decoding: one byte at a time.
        steps = np.concatenate([expander.expand_last(seq[: t + 1], 1) for t in range(60)])
        np.testing.assert_array_equal(steps, full[:60])
    batch = np.stack([s[:200] for s in noisy_sequences(rng, n_seqs=3)])
    full = expander.expand_batch(batch)
    for k in (1, 3, 17):
        np.testing.assert_array_equal(expander.expand_last(batch, k), full[:, -k:])
    # The longest token needs exactly max_token_len bytes of context.
    vocab = source_vocabulary(source)
    longest = max((b for b in vocab.token_bytes if b), key=len)
    seq = np.concatenate([[BOS_ID], bytes_to_ids(longest)])
    assert vocab.token_bytes[expander.expand_last(seq, 1)[0]] == longest == vocab.token_bytes[expander.expand(seq)[-1]]
    assert vocab.token_bytes[expander.expand_last(seq[None, :], 1)[0, 0]] == longest


@pytest.mark.parametrize("dense_table_bytes", [0, 300_000, 2**24], ids=["sparse", "mixed", "dense"])
def test_expand_last_plain_python_walk_equals_the_array_walk(source, dense_table_bytes, monkeypatch):
    """Decoding's few positions take the plain-Python walk (SCALAR_WALK_MAX_POSITIONS); on every kind of
    child table it must give what the array walk gives, through specials and deep matches."""
    vocab = source_vocabulary(source)
    expander = SuffixExpander.from_vocabulary(vocab, dense_table_bytes=dense_table_bytes)
    longest = max((b for b in vocab.token_bytes if b), key=len)
    seqs = noisy_sequences(np.random.default_rng(2), n_seqs=2, length=120) + text_sequences()[:2] + [
        np.concatenate([[BOS_ID], bytes_to_ids(longest * 3)]),  # walks as deep as the trie goes
        np.concatenate([bytes_to_ids(b"ab"), [EOS_ID], bytes_to_ids(b" " * 40)]),  # a special stops a walk
    ]
    walked, walk_one = [], SuffixExpander._walk_one
    monkeypatch.setattr(SuffixExpander, "_walk_one", lambda self, seq, pos: walked.append(pos) or walk_one(self, seq, pos))
    for seq in seqs:
        full = expander.expand(seq)
        steps = [int(expander.expand_last(seq[: t + 1], 1)[0]) for t in range(len(seq))]
        assert steps == full.tolist()
        m = min(len(seq), 30)
        pair = np.stack([seq[-m:], seqs[0][-m:]])  # 2 rows x 2 positions: still the plain walk
        np.testing.assert_array_equal(expander.expand_last(pair, 2), expander.expand_batch(pair)[:, -2:])
    assert len(walked) == sum(len(seq) + 4 for seq in seqs)  # every one of those positions took it
    assert expander._dense_depth == {0: 1, 300_000: 2, 2**24: expander.max_token_len}[dense_table_bytes]


def test_batched_equals_per_row(source):
    expander = SuffixExpander.from_tokenizer(source)
    rows = [np.concatenate([[BOS_ID], bytes_to_ids(t)]) for t in ("hello world", "中文文本", "", "def f(x):")]
    rows.append(np.array([BOS_ID, *bytes_to_ids(INVALID_UTF8)]))
    width = max(map(len, rows))
    left = np.full((len(rows), width), PAD_ID)
    right = np.full((len(rows), width), PAD_ID)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        left[r, width - len(row) :] = row
        right[r, : len(row)] = row
        mask[r, width - len(row) :] = 1
    none = expander.no_subword_id
    out_left = expander.expand_batch(left)
    out_right = expander.expand(right)  # 2-D input dispatches to expand_batch
    for r, row in enumerate(rows):
        single = expander.expand(row)
        np.testing.assert_array_equal(out_left[r, width - len(row) :], single)
        np.testing.assert_array_equal(out_right[r, : len(row)], single)
        assert (out_left[r, : width - len(row)] == none).all()
    # Rows without bos or padding: a match never runs into the end of the previous row.
    corpus = bytes_to_ids(CORPUS)
    dense_rows = np.stack([corpus[i * 37 : i * 37 + 50] for i in range(20)])
    for got, row in zip(expander.expand_batch(dense_rows), dense_rows):
        np.testing.assert_array_equal(got, expander.expand(row))
    for got, row in zip(expander.expand_many(list(dense_rows)), dense_rows):
        np.testing.assert_array_equal(got, expander.expand(row))
    # Masked positions are padding whatever id they hold (here garbage bytes, not the pad id).
    garbage = np.where(mask == 1, left, 100)
    np.testing.assert_array_equal(expander.expand_batch(garbage, mask), out_left)
    for got, row in zip(expander.expand_many(rows), rows):
        np.testing.assert_array_equal(got, expander.expand(row))
    # Tensors in -> tensors out.
    t = expander.expand_batch(torch.from_numpy(left))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.tolist() == out_left.tolist()


# ---------------------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_call_single_and_batch(byte_tok):
    enc = byte_tok("abc")
    assert enc["input_ids"] == [BOS_ID, 101, 102, 103]
    assert enc["attention_mask"] == [1, 1, 1, 1]
    assert enc["expanded_ids"] == byte_tok.expander.expand(enc["input_ids"]).tolist()
    assert byte_tok("abc", add_special_tokens=False)["input_ids"] == [101, 102, 103]
    assert byte_tok.encode("é") == [BOS_ID, 0xC3 + 4, 0xA9 + 4]
    assert byte_tok("<bos>", add_special_tokens=False)["input_ids"] == bytes_to_ids("<bos>").tolist()

    batch = byte_tok(["a", b"\xff\x00"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[PAD_ID, BOS_ID, 101], [BOS_ID, 259, 4]]  # left padding
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    none = byte_tok.no_subword_id
    assert batch["expanded_ids"][0, 0] == none
    assert batch["expanded_ids"][0, 1:].tolist() == byte_tok("a")["expanded_ids"]
    right = byte_tok(["a", b"\xff\x00"], padding=True, padding_side="right", return_tensors="np")
    assert isinstance(right["input_ids"], np.ndarray)
    assert right["input_ids"].tolist() == [[BOS_ID, 101, PAD_ID], [BOS_ID, 259, 4]]
    assert right["expanded_ids"][0].tolist() == [*byte_tok("a")["expanded_ids"], none]

    ragged = byte_tok(["ab", "c"])  # no padding: lists of different lengths
    assert [len(r) for r in ragged["input_ids"]] == [3, 2] and len(ragged["expanded_ids"][0]) == 3
    with pytest.raises(ValueError, match="padding"):
        byte_tok(["ab", "c"], return_tensors="pt")
    multiple = byte_tok(["abcde"], padding="max_length", max_length=8, pad_to_multiple_of=4)
    assert multiple["input_ids"][0] == [PAD_ID] * 2 + [BOS_ID, 101, 102, 103, 104, 105]
    one = byte_tok("abc", return_tensors="pt")
    assert one["input_ids"].shape == one["expanded_ids"].shape == (1, 4)


def test_truncation(byte_tok):
    assert byte_tok("abcdef", max_length=4)["input_ids"] == [BOS_ID, 101, 102, 103]
    left = ByteTokenizer.from_source(byte_tok.source_tokenizer, truncation_side="left")
    enc = left("abcdef", max_length=4, truncation=True)
    assert enc["input_ids"] == [BOS_ID, 104, 105, 106]
    assert enc["expanded_ids"] == left.expander.expand(enc["input_ids"]).tolist()
    batch = byte_tok(["abcdef", "ab"], max_length=5, truncation=True, padding="max_length", return_tensors="pt")
    assert batch["input_ids"].tolist() == [[BOS_ID, 101, 102, 103, 104], [0, 0, BOS_ID, 101, 102]]
    with pytest.raises(ValueError, match="room"):
        byte_tok("abc", max_length=0, truncation=True)


def test_decode(byte_tok):
    text = SAMPLE_TEXTS["emoji"] + SAMPLE_TEXTS["cjk"]
    ids = byte_tok(text)["input_ids"]
    assert byte_tok.decode(ids) == "<bos>" + text
    assert byte_tok.decode(ids, skip_special_tokens=True) == text
    fused = fuse(np.array(ids), np.arange(len(ids)) % 3 == 0)
    assert byte_tok.decode(fused, skip_special_tokens=True) == text  # fused ids are un-fused
    with_markers = [FILLER_ID, BOS_ID, 101, PAD_ID, 102, EOS_ID, FILLER_ID + BYTE_VOCAB_SIZE, 103]
    assert byte_tok.decode(with_markers) == "<bos>ab<eos>c"  # pad and filler are always dropped
    assert byte_tok.decode(with_markers, skip_special_tokens=True) == "abc"
    bad = byte_tok(INVALID_UTF8, add_special_tokens=False)["input_ids"]
    assert byte_tok.decode(bad) == INVALID_UTF8.decode("utf-8", "replace")
    assert byte_tok.decode(bad, errors="surrogateescape").encode("utf-8", "surrogateescape") == INVALID_UTF8
    assert byte_tok.bytes_of(fuse(np.array(bad), True)) == INVALID_UTF8 == ids_to_bytes(bad)
    batch = byte_tok(["héllo", "wörld!"], padding=True, return_tensors="pt")
    assert byte_tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["héllo", "wörld!"]
    assert byte_tok.decode(batch["input_ids"]) == ["<bos>héllo", "<bos>wörld!"]
    tokens = byte_tok.convert_ids_to_tokens([BOS_ID, 101, 36, 101 + BYTE_VOCAB_SIZE, EOS_ID + BYTE_VOCAB_SIZE])
    assert tokens == ["<bos>", "a", "Ġ", "a▸", "<eos>▸"]
    assert byte_tok.convert_tokens_to_ids(tokens) == [BOS_ID, 101, 36, 361, 262]
    assert byte_tok.convert_tokens_to_string(byte_tok.tokenize("a é")) == "a é"
    assert len(byte_tok) == FUSED_VOCAB_SIZE == len(byte_tok.get_vocab())


def test_bad_inputs(byte_tok):
    none = byte_tok.no_subword_id
    empty = byte_tok("")
    assert empty["input_ids"] == [BOS_ID] and empty["expanded_ids"] == [byte_tok.special_to_source[BOS_ID]]
    assert byte_tok("", add_special_tokens=False)["input_ids"] == []
    batch = byte_tok(["", b"x"], padding=True, add_special_tokens=False, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[PAD_ID], [ord("x") + 4]]
    assert batch["attention_mask"].tolist() == [[0], [1]] and batch["expanded_ids"][0, 0] == none
    assert byte_tok([], padding=True)["input_ids"] == []
    # Lone surrogates: U+DC80..U+DCFF are surrogate-escaped raw bytes; any other one is refused.
    assert byte_tok("a\udcff", add_special_tokens=False)["input_ids"] == [101, 259]
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at index 1"):
        byte_tok("a\ud800b")
    # NUL and invalid UTF-8 are encoded faithfully.
    raw = b"\x00\x00" + INVALID_UTF8
    assert byte_tok.bytes_of(byte_tok(raw)["input_ids"]) == raw
    with pytest.raises(TypeError, match="str or bytes"):
        byte_tok(123)
    with pytest.raises(TypeError, match="str or bytes"):
        byte_tok(["ok", 5])
    with pytest.raises(ValueError, match="text_pair"):
        byte_tok("a", "b")
    # 10 MB in one go (numpy output to avoid 10 M Python ints).
    big = (CORPUS.encode() * (10_000_000 // len(CORPUS.encode()) + 1))[:10_000_000]
    enc = byte_tok(big, return_tensors="np")
    assert enc["input_ids"].shape == enc["expanded_ids"].shape == (1, 10_000_001)
    tail = byte_tok.expander.expand(enc["input_ids"][0, -600:])[-500:]
    np.testing.assert_array_equal(enc["expanded_ids"][0, -500:], tail)


def test_pad_collates_expanded_ids(byte_tok):
    features = [byte_tok(t) for t in ("a", "hello", b"\xff")]
    padded = byte_tok.pad(features, return_tensors="pt")
    direct = byte_tok(["a", "hello", b"\xff"], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "expanded_ids"):
        assert padded[key].tolist() == direct[key].tolist(), key
    right = byte_tok.pad(features, padding_side="right")
    assert right["expanded_ids"][0] == features[0]["expanded_ids"] + [byte_tok.no_subword_id] * 4


def test_source_bytes_and_patches(source):
    tok = ByteTokenizer.from_source(source)
    vocab = tok.source_vocab
    text = SAMPLE_TEXTS["code"] + SAMPLE_TEXTS["rtl"] + SAMPLE_TEXTS["unseen"]
    ids = source(text, add_special_tokens=False)["input_ids"]
    byte_ids, lengths = tok.source_bytes_and_patches(ids)
    prefix = b" " if vocab.family == "sentencepiece" else b""  # SentencePiece's leading '▁' shows
    assert ids_to_bytes(byte_ids) == prefix + text.encode()
    assert lengths.tolist() == [len(vocab.token_bytes[i]) for i in ids] and lengths.sum() == len(byte_ids)
    eos, bos = source.eos_token_id, source.bos_token_id
    byte_ids, lengths = tok.source_bytes_and_patches([bos, *ids[:3], eos])
    assert byte_ids[0] == BOS_ID and byte_ids[-1] == EOS_ID and lengths[0] == lengths[-1] == 1
    if source.pad_token_id is not None:
        assert tok.source_bytes_and_patches([source.pad_token_id])[0].tolist() == [PAD_ID]
    with pytest.raises(ValueError):
        tok.source_bytes_and_patches([len(source)])


def test_source_specials_without_byte_id():
    src = make_bytelevel_tokenizer()
    src.pad_token = src.eos_token  # a pad aliased to eos (as SmolLM2 does): it is a document end
    tok = ByteTokenizer.from_source(src)
    assert tok.source_bytes_and_patches([src.pad_token_id])[0].tolist() == [EOS_ID]
    src.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]})  # a chat marker: spelled as its text
    tok = ByteTokenizer.from_source(src)
    marker = src.convert_tokens_to_ids("<|im_start|>")
    byte_ids, lengths = tok.source_bytes_and_patches([marker, marker])
    assert ids_to_bytes(byte_ids) == b"<|im_start|>" * 2 and lengths.tolist() == [12, 12]
    assert tok.source_vocab.token_bytes[marker] is None and tok.expander.source_vocab_size == len(src)


def test_save_load_round_trip(tmp_path, sentencepiece_tokenizer):
    tok = ByteTokenizer.from_source(sentencepiece_tokenizer, special_to_source={EOS_ID: 2})
    tok.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / SOURCE_TOKENIZER_SUBFOLDER / "tokenizer.json")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ByteTokenizer" and config["source_vocab_size"] == len(sentencepiece_tokenizer)
    texts = ["hello wörld", b"\xff\x00", "中文 and emoji 🚀"]
    want = tok(texts, padding=True, return_tensors="pt")
    for loaded in (ByteTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, ByteTokenizer)
        assert loaded.special_to_source == tok.special_to_source and loaded.special_to_source[EOS_ID] == 2
        assert loaded.padding_side == "left" and loaded.filler_token_id == FILLER_ID
        assert len(loaded.source_tokenizer) == len(sentencepiece_tokenizer)
        got = loaded(texts, padding=True, return_tensors="pt")
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert loaded.decode(got["input_ids"][1], skip_special_tokens=True) == "\ufffd\x00"
    # Pickling (DataLoader workers) keeps everything.
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(texts, padding=True, return_tensors="pt")["expanded_ids"], want["expanded_ids"])
    # A bytes-only tokenizer round-trips too (no expanded ids).
    plain = ByteTokenizer()
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert isinstance(reloaded, ByteTokenizer) and reloaded.expander is None
    assert set(reloaded("ab").keys()) == {"input_ids", "attention_mask"}


def test_fixed_layout_is_enforced(bytelevel_tokenizer):
    with pytest.raises(ValueError, match="fixed id layout"):
        ByteTokenizer.from_source(bytelevel_tokenizer, bos_token="<s>")
    with pytest.raises(ValueError, match="source tokenizer of 5 tokens"):
        ByteTokenizer(source_tokenizer=bytelevel_tokenizer, source_vocab_size=5)


# ---------------------------------------------------------------------------------------------------------
# the packaged SmolLM2 tokenizer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_vocabulary(smollm2_tokenizer):
    vocab = source_vocabulary(smollm2_tokenizer)
    assert vocab.family == "byte_level" and vocab.size == 49152
    expected = [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
    assert vocab.missing_single_bytes == expected and len(expected) == 21
    expander = SuffixExpander.from_vocabulary(vocab)
    out = expander.expand(np.array([b + BYTE_OFFSET for b in expected]))
    assert (out == expander.no_subword_id).all() and expander.no_subword_id == 49152
    text = SAMPLE_TEXTS["code"] + SAMPLE_TEXTS["cjk"]
    seq = np.concatenate([[BOS_ID], bytes_to_ids(text), bytes_to_ids(INVALID_UTF8)])
    want = brute_force_expand(vocab.token_bytes, vocab.fallback_ids, expander.special_to_source, seq)
    np.testing.assert_array_equal(expander.expand(seq), want)
    tok = ByteTokenizer.from_source(smollm2_tokenizer)
    ids = smollm2_tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    byte_ids, lengths = tok.source_bytes_and_patches(ids)
    assert ids_to_bytes(byte_ids) == CORPUS.encode() and len(lengths) == len(ids)


def test_tiny_sentencepiece_tokenizer_is_the_same_in_every_process():
    """The fast suite's random models are seeded, so their tokenizers must not vary either: two fresh
    processes build the same vocabulary and merges (the trainer's alphabet cut used to break ties in a
    per-process hash order, so each run of the suite tested a different tokenizer)."""
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, '.'); "
            "from tests.tiny_tokenizers import make_sentencepiece_tokenizer; "
            "t = make_sentencepiece_tokenizer(); m = json.loads(t.backend_tokenizer.to_str())['model']; "
            "print(json.dumps([sorted(m['vocab'].items()), m['merges']]))")
    root = Path(__file__).resolve().parent.parent
    outs = [subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0]) > 1000
