"""Tests of bytelift.corpus_reading: formats, the held-out split (by document and by blocks), mixing
weights, invalid UTF-8, and the errors that name the file."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from bytelift.corpus_reading import (
    HELDOUT_BLOCK_BYTES,
    MAX_HELDOUT_SHARE,
    MIN_HELDOUT_BYTES,
    CorpusError,
    heldout_blocks,
    is_heldout,
    load_corpus,
    read_corpus,
    split_document,
)

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def _prose(n_bytes: int, seed: int = 0) -> str:
    """Paragraphs of numbered lines, about n_bytes long (every line differs, so every block does)."""
    rng = np.random.default_rng(seed)
    lines, size, i = [], 0, 0
    while size < n_bytes:
        line = f"{i}: " + " ".join(WORDS[k] for k in rng.integers(len(WORDS), size=int(rng.integers(3, 14))))
        lines.append(line + ("\n\n" if i % 5 == 4 else "\n"))
        size += len(lines[-1])
        i += 1
    return "".join(lines)


def _write_corpus(root) -> set[str]:
    """A mixed corpus; returns the documents that must be read (txt_mode="document", bad.txt skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("First document.\nSecond line.", encoding="utf-8")
    (root / "sub" / "b.txt").write_text("Para one.\n\n  \nPara two.\n", encoding="utf-8")
    (root / "sub" / "bad.txt").write_bytes(b"not \xff\xfe utf-8")  # invalid UTF-8 at byte 4
    (root / "sub" / "empty.txt").write_text(" \n\t", encoding="utf-8")  # empty: skipped, counted
    (root / "sub" / "ignored.md").write_text("not a corpus suffix", encoding="utf-8")
    records = [{"text": "json doc one", "id": 1}, {"text": "", "id": 2}, {"text": None, "id": 3},
               {"text": "json doc two", "id": 4}]
    (root / "sub" / "deeper" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pq.write_table(pa.table({"text": ["parquet doc", "  ", "parquet doc 2"]}), root / "d.parquet")
    return {"First document.\nSecond line.", "Para one.\n\n  \nPara two.\n", "json doc one", "json doc two",
            "parquet doc", "parquet doc 2"}


# ---------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_mixed_formats_invalid_utf8_skips_and_counts(tmp_path, streaming):
    expected = _write_corpus(tmp_path)
    # strict (the default) refuses the corpus, naming the file and the byte offset
    with pytest.raises(CorpusError, match=r"bad\.txt is not UTF-8 at byte 4 .*--errors replace"):
        corpus, _ = load_corpus(tmp_path, split=None, streaming=streaming)
        list(corpus)
    corpus, stats = load_corpus(tmp_path, split=None, streaming=streaming, encoding_errors="skip")
    assert sorted(row["text"] for row in corpus) == sorted(expected)
    assert stats.files == 6 and stats.skipped_undecodable == 1  # .md left out
    assert stats.skipped_empty == 4  # empty.txt, "" and null in jsonl, "  " in parquet
    assert stats.documents == len(expected)
    assert streaming == (type(corpus).__name__ == "IterableDataset")
    corpus, stats = load_corpus(tmp_path, split=None, streaming=streaming, encoding_errors="replace")
    assert "not \ufffd\ufffd utf-8" in [row["text"] for row in corpus] and stats.replaced_undecodable == 1


def test_paragraphs_fields_nested_fields_and_json_arrays(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_corpus(tmp_path)
    corpus, _ = load_corpus(tmp_path / "sub" / "b.txt", txt_mode="paragraph", split=None)
    assert list(corpus["text"]) == ["Para one.", "Para two."]
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "custom field", "text": 3}) + "\n")
    pq.write_table(pa.table({"body": ["pq body"]}), tmp_path / "f.parquet")
    corpus, _ = load_corpus([tmp_path / "e.jsonl", tmp_path / "f.parquet"], text_field="body", split=None)
    assert list(corpus["text"]) == ["custom field", "pq body"]
    # records of different shapes; a text that is no string is counted, not read
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": 3}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    corpus, stats = load_corpus(tmp_path / "g.jsonl", split=None)
    assert list(corpus["text"]) == ["ok"] and stats.skipped_non_text == 1
    with pytest.raises(CorpusError, match="e.jsonl"):  # its "text" field is never a string
        load_corpus([tmp_path / "a.txt", tmp_path / "e.jsonl"], split=None)
    # nested fields: a dotted path, list items by index, in JSON and in a Parquet struct column
    records = [{"meta": {"body": "nested one"}, "turns": [{"text": "turn zero"}]},
               {"meta": {"body": "nested two"}, "turns": [{"text": "turn one"}]}]
    (tmp_path / "n.json").write_text(json.dumps(records))  # one JSON array
    assert list(load_corpus(tmp_path / "n.json", text_field="meta.body", split=None)[0]["text"]) == [
        "nested one", "nested two"]
    assert list(load_corpus(tmp_path / "n.json", text_field="turns.0.text", split=None)[0]["text"]) == [
        "turn zero", "turn one"]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "n.parquet")
    assert list(load_corpus(tmp_path / "n.parquet", text_field="meta.body", split=None)[0]["text"]) == [
        "nested one", "nested two"]
    with pytest.raises(CorpusError, match=r"n.json record 0 has no field 'meta.title' \(its fields: \['meta', 'turns'\]\)"):
        load_corpus(tmp_path / "n.json", text_field="meta.title", split=None)
    with pytest.raises(CorpusError, match=r"n.parquet has no column 'body'"):
        load_corpus(tmp_path / "n.parquet", text_field="body.x", split=None)


def test_compressed_saved_datasets_and_chosen_suffixes(tmp_path):
    import datasets

    docs = ["gzip text", "gzip json", "zstd json", "saved one", "saved two", "markdown", "rst", "code"]
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": docs[1]}).encode()))
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps({"text": docs[2]}).encode()))
    datasets.Dataset.from_dict({"text": docs[3:4]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[4:5]})}).save_to_disk(str(tmp_path / "d" / "dict"))
    for name, doc in zip(("e.md", "f.rst", "g.py"), docs[5:]):
        (tmp_path / name).write_text(doc)
    corpus = read_corpus(tmp_path, heldout_fraction=0.0)
    assert sorted(corpus.documents) == sorted(docs[:5])  # a saved dataset inside the folder is one entry
    assert corpus.stats.sources[0].ignored == {".md": 1, ".rst": 1, ".py": 1}
    assert any("left out: " in line and "--text-suffixes" in line for line in corpus.stats.report_lines())
    corpus = read_corpus(tmp_path, heldout_fraction=0.0, text_suffixes=["txt", ".MD", ".rst", ".py"])
    assert sorted(corpus.documents) == sorted(docs)
    assert read_corpus(tmp_path / "saved", heldout_fraction=0.0).documents == docs[3:4]  # given directly
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match=r"cannot read .*bad\.txt\.gz"):
        read_corpus(tmp_path / "bad.txt.gz")


def test_errors_name_the_file_and_say_what_to_do(tmp_path):
    with pytest.raises(CorpusError, match="corpus path does not exist: .*missing_dir"):
        load_corpus(tmp_path / "missing_dir")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"\xff\xff")
    (bad / "y.txt").write_text("   ")
    good = tmp_path / "good.txt"
    good.write_text("fine")
    for streaming in (False, True):
        with pytest.raises(CorpusError, match=r"bad.*no usable text"):
            load_corpus([good, bad], split=None, streaming=streaming, encoding_errors="skip")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing to read")
    with pytest.raises(CorpusError, match=r"empty_dir holds no corpus file .*found: \.md \(1\).*--text-suffixes"):
        load_corpus(empty, split=None)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(CorpusError, match=r"unsupported corpus file .*notes\.md.*--text-suffixes \.md"):
        load_corpus(tmp_path / "notes.md")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"nofield.jsonl line 1 has no field 'text'.*--text-field"):
        load_corpus(tmp_path / "nofield.jsonl", split=None)
    (tmp_path / "broken.jsonl").write_text(json.dumps({"text": "a"}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"broken.jsonl line 2 is not valid JSON"):
        load_corpus(tmp_path / "broken.jsonl", split=None)
    first = json.dumps({"text": "a"}).encode() + b"\n"
    (tmp_path / "latin1.jsonl").write_bytes(first + b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=rf"latin1.jsonl line 2 is not UTF-8 at byte {len(first) + 13} "):
        load_corpus(tmp_path / "latin1.jsonl", split=None)
    with pytest.raises(CorpusError, match="held-out fraction"):
        read_corpus(good, heldout_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------
# The held-out split
# ---------------------------------------------------------------------------------------------------------


def test_split_by_document_is_disjoint_and_order_independent(tmp_path):
    docs = [f"document number {i}: " + " ".join(WORDS[: i % 10 + 1]) for i in range(400)]
    forward, backward = tmp_path / "fwd", tmp_path / "bwd"
    forward.mkdir()
    backward.mkdir()
    (forward / "all.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    for i, d in enumerate(reversed(docs)):  # other order, other files, other format
        (backward / f"{i:04d}.txt").write_text(d)
    splits = {}
    for name, root in (("fwd", forward), ("bwd", backward)):
        train, _ = load_corpus(root, split="train", heldout_fraction=0.25)
        held, stats = load_corpus(root, split="heldout", heldout_fraction=0.25)
        splits[name] = (set(train["text"]), set(held["text"]))
        assert stats.other_split == len(train) and stats.sources[0].split == "documents"
    (train_f, held_f), (train_b, held_b) = splits["fwd"], splits["bwd"]
    assert train_f.isdisjoint(held_f) and train_f | held_f == set(docs)
    assert (train_f, held_f) == (train_b, held_b)
    assert 0.15 < len(held_f) / len(docs) < 0.35
    assert held_f == {d for d in docs if is_heldout(d, 0.25)}


@pytest.mark.parametrize("n_bytes", [3_000, 50_000, 300_000])
def test_a_single_file_is_split_by_blocks(tmp_path, n_bytes):
    """One text file (one document): a per-document hash would hold out nothing 99 % of the time at 1 %;
    by blocks, evenly spaced held-out blocks, stable, and the two sides together are the whole text."""
    text = _prose(n_bytes)
    (tmp_path / "book.txt").write_text(text)
    corpus = read_corpus(tmp_path / "book.txt", heldout_fraction=0.01)
    source = corpus.stats.sources[0]
    assert source.split == "blocks" and source.documents == 1
    assert corpus.heldout and all(len(b.encode()) <= HELDOUT_BLOCK_BYTES for b in corpus.heldout)
    assert all(b in text for b in corpus.heldout) and all(t in text for t in corpus.train)
    # the two sides cover the text exactly once, held-out blocks between training stretches
    pieces = sorted(corpus.train + corpus.heldout, key=text.index)
    assert "".join(pieces) == text
    share = source.heldout_bytes / source.bytes
    blocks = len(split_document(text, HELDOUT_BLOCK_BYTES))
    assert len(corpus.heldout) == len(heldout_blocks(blocks, 0.01))
    if n_bytes >= MIN_HELDOUT_BYTES / MAX_HELDOUT_SHARE:
        assert source.heldout_bytes >= MIN_HELDOUT_BYTES * 0.9  # the evaluation's 16 documents of ~1 KB
    assert share <= MAX_HELDOUT_SHARE + 1 / blocks
    # stable: the same text under another name, read again, splits the same way
    (tmp_path / "copy.txt").write_text(text)
    again = read_corpus(tmp_path / "copy.txt", heldout_fraction=0.01)
    assert again.heldout == corpus.heldout and again.stats.sources[0].heldout_digest == source.heldout_digest
    # the streaming reader agrees with the in-memory one
    for split, expected in (("train", corpus.train), ("heldout", corpus.heldout)):
        stream, _ = load_corpus(tmp_path / "book.txt", split=split, streaming=True)
        assert [row["text"] for row in stream] == expected


def test_block_counts_and_the_switch_to_documents(tmp_path):
    assert heldout_blocks(1, 0.01) == [] and heldout_blocks(5, 0.01) == [2]  # one block while one is left
    assert len(heldout_blocks(300, 0.01)) == 16  # at least MIN_HELDOUT_BYTES' worth (16 blocks of 1 KB)
    assert len(heldout_blocks(50, 0.01)) == 5  # at most MAX_HELDOUT_SHARE
    assert len(heldout_blocks(100_000, 0.01)) == 1000  # large sources: the fraction itself
    spacing = np.diff(heldout_blocks(1000, 0.05))
    assert spacing.min() >= 19 and spacing.max() <= 21  # evenly spaced
    # a few files: blocks (small ones whole); many documents: by document, as the default corpus
    few = tmp_path / "few"
    few.mkdir()
    for i in range(20):
        (few / f"{i:02d}.txt").write_text(f"file {i}\n" + _prose(600, seed=i))
    corpus = read_corpus(few, heldout_fraction=0.01)
    assert corpus.stats.sources[0].split == "blocks" and len(corpus.heldout) == 2
    many = tmp_path / "many.jsonl"
    many.write_text("\n".join(json.dumps({"text": f"doc {i} " + _prose(100, seed=i)}) for i in range(1600)))
    assert read_corpus(many, heldout_fraction=0.01).stats.sources[0].split == "documents"
    assert read_corpus(many, heldout_fraction=0.005).stats.sources[0].split == "blocks"


# ---------------------------------------------------------------------------------------------------------
# Mixing weights and the report
# ---------------------------------------------------------------------------------------------------------


def test_weights_set_each_sources_share_of_the_training_bytes(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps({"text": f"big {i} " + _prose(400, seed=i)}) for i in range(300)))
    small = tmp_path / "small.txt"
    small.write_text(_prose(30_000, seed=7))
    plain = read_corpus([big, small], heldout_fraction=0.1)
    assert plain.train_index is None
    natural = plain.stats.sources[1].train_bytes / sum(s.train_bytes for s in plain.stats.sources)
    assert natural < 0.3
    corpus = read_corpus([big, small], heldout_fraction=0.1, weights=[1, 3])
    sizes = np.array([len(t.encode()) for t in corpus.train])
    n_big = plain.stats.sources[0].train_documents
    picked = sizes[corpus.train_index]
    from_small = picked[corpus.train_index >= n_big].sum() / picked.sum()
    assert abs(from_small - 0.75) < 0.05, from_small  # 3 / (1 + 3) of the training bytes
    assert abs(picked.sum() - sizes.sum()) / sizes.sum() < 0.05  # the mixture keeps the corpus's size
    s_big, s_small = corpus.stats.sources
    assert s_small.repeats > 1 > s_big.repeats and abs(s_small.train_share - 0.75) < 0.05
    assert corpus.heldout == plain.heldout  # the held-out side is never reweighted
    lines = corpus.stats.report_lines()
    assert lines[0].startswith("corpus: 2 sources, 2 files") and "weight 3: 75% of the training bytes" in lines[2]
    assert "held out by document" in lines[1] and "held out by blocks" in lines[2]
    train, _ = load_corpus([big, small], heldout_fraction=0.1, weights=[1, 3])
    assert len(train) == len(corpus.train_index)
    with pytest.raises(CorpusError, match=r"2 corpus path\(s\) but 1 weight"):
        read_corpus([big, small], weights=[1])
    with pytest.raises(CorpusError, match="positive"):
        read_corpus([big, small], weights=[1, 0])
    with pytest.raises(CorpusError, match="in-memory"):
        load_corpus([big, small], weights=[1, 2], streaming=True)
