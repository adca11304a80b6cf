"""Evaluation: scoring against closed-form values, boundary and choice metrics, task items, reports."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from bytelift.corpus import EVALUATED_TASKS, PROSE_TASKS, prose_passages, stdlib_sources
from bytelift.evaluation import tasks as T
from bytelift.evaluation.report import headline_rows, markdown, write_report
from bytelift.evaluation.runner import (
    EvalConfig,
    boundary_agreement,
    choice_accuracy,
    evaluate,
    source_segmentation,
)
from bytelift.evaluation.scoring import (
    ByteScorer,
    Loop,
    Scored,
    SourceScorer,
    bits_per_byte,
    find_loop,
    first_line_match,
)
from bytelift.modeling import ByteliftForCausalLM
from bytelift.tokenization import BYTE_OFFSET, BYTE_VOCAB_SIZE, EOS_ID
from tests.tiny_models import tiny_source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(bytelevel_tokenizer):
    source = tiny_source("llama", bytelevel_tokenizer, context=2048)
    model = ByteliftForCausalLM.from_source(copy.deepcopy(source), bytelevel_tokenizer, local_heads=4).eval()
    return model, source


# --- scoring against closed-form values ------------------------------------------------------------------


def test_byte_bits_per_byte_of_uniform_head(pair):
    model, _ = pair
    model = copy.deepcopy(model)
    model.config.source_prior = False  # the decoder alone
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: uniform over the 2·V_b fused outputs
    texts = ["hello world", "a", "héllo ☃"]
    scored = ByteScorer(model).score([("", t) for t in texts])
    for t, s in zip(texts, scored):
        n = len(t.encode())
        # Joint: every byte but the last pays log(2·V_b); the last is folded (plain + fused): log(V_b).
        expected = -((n - 1) * math.log(2 * BYTE_VOCAB_SIZE) + math.log(BYTE_VOCAB_SIZE))
        assert s.n_bytes == n
        assert s.logprob == pytest.approx(expected, rel=1e-5)
        assert s.logprob_folded == pytest.approx(-n * math.log(BYTE_VOCAB_SIZE), rel=1e-5)
        assert s.boundaries.shape == (n,)
    bpb = bits_per_byte(scored)
    total = sum(len(t.encode()) for t in texts)
    assert bpb == pytest.approx(-sum(s.logprob for s in scored) / math.log(2) / total)


def test_score_decoding(pair, monkeypatch):
    model, _ = pair
    texts = ["hello world", "a", "héllo ☃", b"bad \xff byte"]
    lengths = [len(t.encode()) if isinstance(t, str) else len(t) for t in texts]
    scorer = ByteScorer(copy.deepcopy(model))
    scorer.model.config.source_prior = False  # the decoder alone
    with torch.no_grad():
        scorer.model.lm_head.weight.zero_()  # uniform head: every byte has folded probability 2 / (2·V_b)
    for s, n in zip(scorer.score_decoding(texts), lengths):
        assert s.n_bytes == n and s.boundaries.shape == (n,)
        assert s.logprob == pytest.approx(-n * math.log(BYTE_VOCAB_SIZE), rel=1e-5)
    # Rows decode the same in any batch; the model's decoding bias sets the boundaries.
    scorer = ByteScorer(model)
    together, alone = scorer.score_decoding(texts), scorer.score_decoding(texts, batch_size=1)
    for a, b in zip(together, alone):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert np.array_equal(a.boundaries, b.boundaries)
    monkeypatch.setattr(model.config, "decode_boundary_bias", 1e9)
    assert all(s.boundaries.all() for s in scorer.score_decoding(texts))


def test_byte_score_of_continuation_only_counts_its_bytes(pair):
    model, _ = pair
    scorer = ByteScorer(model)
    whole = scorer.score([("", "The cat sat")])[0]
    split = scorer.score([("The cat", " sat")])[0]
    assert split.n_bytes == 4
    assert split.logprob > whole.logprob  # fewer bytes scored, each with log-prob < 0
    # Batching does not change a row's score (left padding is masked).
    batched = scorer.score([("The cat", " sat"), ("A much longer context than the other one", " x")])[0]
    assert batched.logprob == pytest.approx(split.logprob, abs=1e-3)


@pytest.mark.parametrize("lookahead", [1, 3])
def test_byte_score_with_lookahead_reads_the_predictors_flags(pair, lookahead):
    """The joint log-likelihood of a continuation reads the flags the predictor decides with newline filler
    after the text (lookahead − 1 of them, not scored) and folds the last byte's; the batch does not matter."""
    model, _ = pair
    model = copy.deepcopy(model)
    model.config.boundary_lookahead = lookahead
    model.boundary_predictor.lookahead = lookahead
    ctx, cont = b"The cat", b" sat on it"
    scorer = ByteScorer(model)
    got = scorer.score([(ctx, cont)])[0]
    with torch.no_grad():
        batch = model.tokenizer([ctx + cont + b"\n" * (lookahead - 1)], return_tensors="pt")
        out = model(**batch)
        ids, bm = batch["input_ids"][0], out.boundary_mask[0]
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        first = 1 + len(ctx)  # position of the first continuation byte (after bos)
        expected = 0.0
        for t in range(first, first + len(cont)):
            plain, fused = logp[t - 1, ids[t]], logp[t - 1, ids[t] + BYTE_VOCAB_SIZE]
            last = t == first + len(cont) - 1
            expected += float(torch.logaddexp(plain, fused) if last else (fused if bm[t] else plain))
    assert got.logprob == pytest.approx(expected, abs=1e-4)
    assert got.boundaries.tolist() == bm[first : first + len(cont)].tolist()
    # Filler lets the predictor decide every byte but the last: with lookahead 3 too, some patch ends inside.
    assert got.boundaries[:-1].any()
    batched = scorer.score([(ctx, cont), (b"A much longer context than the other one", b" x")])[0]
    assert batched.logprob == pytest.approx(got.logprob, abs=1e-3)


def test_source_bits_per_byte_of_uniform_head(pair, bytelevel_tokenizer):
    model, source = pair
    source = copy.deepcopy(source)
    with torch.no_grad():
        source.lm_head.weight.zero_()
    V = source.config.vocab_size
    scorer = SourceScorer.for_byte_model(source, model)
    text = "the quick brown fox"
    s = scorer.score([("", text)])[0]
    n_tok = len(bytelevel_tokenizer.encode(text, add_special_tokens=False))
    assert s.n_bytes == len(text)
    assert s.logprob == pytest.approx(-n_tok * math.log(V), rel=1e-5)
    ctx = scorer.score([("the quick", " brown fox")])[0]
    assert ctx.n_bytes == len(" brown fox")


def test_greedy_flags_follow_the_argmax(pair):
    model, source = pair
    model = copy.deepcopy(model)
    model.config.source_prior = False  # the decoder alone
    with torch.no_grad():  # the head always prefers byte 'a' (plain): greedy on "aaa", not on "aab"
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(2 * BYTE_VOCAB_SIZE))
        model.lm_head.bias[ord("a") + 4] = 5.0
    s = ByteScorer(model).score([("x", "aaa"), ("x", "aab")])
    assert s[0].greedy and not s[1].greedy


def test_score_parts_where_the_bits_go(pair, bytelevel_tokenizer):
    """With a zero decoder head the output is the prior: fed the teacher's states on the source's tokens it
    scores each text as the source does (up to the prior's floor and the spelled-mass renormalisation);
    the parts add up (prior alone + decoder alone = own states, since a zero head is uniform)."""
    model, source = pair
    model = copy.deepcopy(model)
    model.config.prior_floor = 1e-9
    with torch.no_grad():
        model.lm_head.weight.zero_()
    texts = ["the quick brown fox jumps", "hello there, general kenobi"]
    segmented = [source_segmentation(model.tokenizer, t) for t in texts]
    parts = ByteScorer(model).score_parts(segmented, source, model.tokenizer.special_to_source[1])
    assert parts["bytes"] == sum(len(t) for t in texts)
    src = SourceScorer.for_byte_model(source, model).score([("", t) for t in texts])
    # The source's mass on its 3 padded embedding rows (no spelling) is renormalised away by the prior.
    assert parts["teacher_states"] >= sum(s.logprob for s in src) - 1e-3
    assert parts["teacher_states"] == pytest.approx(sum(s.logprob for s in src), rel=0.05)
    assert parts["own_states"] == pytest.approx(parts["own_states_prior_only"], rel=1e-6)
    # The decoder alone (zero head) is uniform over the 2·V_b outputs; the last byte is folded.
    n_texts = len(texts)
    uniform = -(parts["bytes"] - n_texts) * math.log(2 * BYTE_VOCAB_SIZE) - n_texts * math.log(BYTE_VOCAB_SIZE)
    assert parts["own_states_decoder_only"] == pytest.approx(uniform, rel=1e-6)


def test_first_line_match():
    assert first_line_match(" dog\nmore", "dog", stopped=False)
    assert first_line_match(" dog", "dog", stopped=True)
    assert not first_line_match(" dog", "dog", stopped=False)  # the line may go on
    assert not first_line_match(" dogs\n", "dog", stopped=False)
    assert not first_line_match("\ndog\n", "dog", stopped=False)


# --- the looping check -----------------------------------------------------------------------------------

# 62 distinct bytes: no string of 2 or more bytes occurs twice in any slice of it, nor across a join with
# UNIT (whose bytes are not in it).
FILLER = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
UNIT = b"~!@#$%^&"  # 8 bytes


def fill(n: int, start: int = 0) -> bytes:
    return FILLER[start : start + n]


def test_find_loop_at_the_thresholds():
    # Three copies spread over exactly 64 bytes (first start to last end): a loop; one byte more: none.
    at = fill(5) + UNIT + fill(20, 5) + UNIT + fill(20, 25) + UNIT + fill(5, 45)
    assert find_loop(at) == Loop(UNIT, (5, 33, 61))
    wide = fill(5) + UNIT + fill(20, 5) + UNIT + fill(21, 25) + UNIT + fill(5, 46)
    assert find_loop(wide) is None
    assert find_loop(UNIT + fill(3) + UNIT) is None  # twice is not a loop
    assert find_loop(UNIT * 2 + fill(41) + UNIT) is None  # the third copy ends 65 bytes after the first starts
    assert find_loop(UNIT * 3) == Loop(UNIT, (0, 8, 16))
    # A 7-byte string three times is no 8-byte repeat unless the same byte follows it each time.
    seven = UNIT[:7]
    assert find_loop(seven + b"a" + seven + b"b" + seven + b"c") is None
    assert find_loop(seven + b"a" + seven + b"a" + seven + b"a") == Loop(seven + b"a", (0, 8, 16))
    # Back to back, a 7-byte string repeats 8-byte strings with period 7; copies may not overlap, so the
    # first loop needs starts 0, 14, 28 (36 bytes).
    assert find_loop(seven * 6) == Loop((seven * 2)[:8], (0, 14, 28))
    assert find_loop((seven * 6)[:35]) is None
    # Runs of one byte loop once they hold three non-overlapping copies: 24 bytes, not 10.
    assert find_loop(b"x:" + b" " * 40) == Loop(b" " * 8, (2, 10, 18))
    assert find_loop(b" " * 23) is None and find_loop(b" " * 24) is not None
    assert find_loop(b"def f(x):\n        return x\n") is None  # one indented line
    assert find_loop(b"") is None and find_loop(b"short") is None
    # The loop completed first is the one reported.
    assert find_loop(fill(3) + b"B" * 30 + b"A" * 24).string == b"B" * 8
    assert find_loop(b"AB" * 12 + b"C" * 30) == Loop(b"ABABABAB", (0, 8, 16))
    with pytest.raises(ValueError):
        find_loop(b"aaaa", span=0)


def _loop_ends_brute_force(data: bytes, span: int, repeats: int, window: int) -> list[int]:
    """Every end (last occurrence's end) of a loop, by trying all sets of occurrences."""
    ends = []
    for string in {data[i : i + span] for i in range(len(data) - span + 1)}:
        starts = [i for i in range(len(data) - span + 1) if data[i : i + span] == string]
        for chosen in itertools.combinations(starts, repeats):
            apart = all(b - a >= span for a, b in zip(chosen, chosen[1:]))
            if apart and chosen[-1] + span - chosen[0] <= window:
                ends.append(chosen[-1] + span)
    return ends


def test_find_loop_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        span, repeats = rng.choice([(1, 2), (2, 3), (3, 3), (2, 4)])
        window = rng.randint(span * repeats - 1, 16)
        data = bytes(rng.choice(b"ab" if rng.random() < 0.5 else b"abc") for _ in range(rng.randint(0, 24)))
        loop = find_loop(data, span=span, repeats=repeats, window=window)
        ends = _loop_ends_brute_force(data, span, repeats, window)
        if not ends:
            assert loop is None, (data, span, repeats, window)
            continue
        assert loop is not None, (data, span, repeats, window)
        starts = loop.starts
        assert len(starts) == repeats and all(data[i : i + span] == loop.string for i in starts)
        assert all(b - a >= span for a, b in zip(starts, starts[1:]))
        assert starts[-1] + span - starts[0] <= window
        assert starts[-1] + span == min(ends)  # the loop completed first


def _forced(model, token: int, vocab: int):
    """A copy of `model` whose head always prefers `token` (zero weights, a bias on it)."""
    model = copy.deepcopy(model)
    if isinstance(model, ByteliftForCausalLM):
        model.config.source_prior = False  # the head alone decides
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(vocab))
        model.lm_head.bias[token] = 5.0
    return model


def test_loops_section(pair, bytelevel_tokenizer):
    model, source = pair
    only_loops = dict(heldout_docs=0, lambada=0, hellaswag=0, cute_per_task=0, basic_skills=0,
                      loop_prompts=("Hello", "def f(x):\n"), loop_bytes=24)
    newline = bytelevel_tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    # The source writes newlines only (generation goes past them: 24 bytes, a loop); the byte model ends
    # at once (no text, no loop); then the byte model writes "aaa…" (a loop).
    looping_source = _forced(source, newline[0], source.config.vocab_size)
    silent = _forced(model, EOS_ID, 2 * BYTE_VOCAB_SIZE)
    r = evaluate(silent, looping_source, EvalConfig(**only_loops), log=lambda s: None)
    assert set(r) == {"config", "seconds", "items", "loops"} and r["items"] == {"loops": 2}
    loops = r["loops"]
    assert loops["prompts_looping"] == {"byteified": 0, "source": 2} and loops["prompts"] == 2
    assert [s["prompt"] for s in loops["samples"]] == ["Hello", "def f(x):\n"]
    for s in loops["samples"]:
        assert s["byteified"] == {"text": "", "loop": None}
        assert s["source"] == {"text": "\n" * 24, "loop": "\n" * 8}
    assert ("greedy samples that loop (8-byte string ×3 within 64 B)", "0/2", "2/2") in headline_rows(r)
    md = markdown(r)
    assert "| greedy samples that loop (8-byte string ×3 within 64 B) | 0/2 | 2/2 |" in md
    assert "## Greedy samples (24 new bytes)" in md and "**'def f(x):\\n'**" in md
    assert md.count("- source: " + repr("\n" * 24) + " — loops on " + repr("\n" * 8)) == 2

    repeating = _forced(model, ord("a") + BYTE_OFFSET, 2 * BYTE_VOCAB_SIZE)
    r = evaluate(repeating, source, EvalConfig(**only_loops), log=lambda s: None)
    assert r["loops"]["prompts_looping"]["byteified"] == 2
    assert all(s["byteified"] == {"text": "a" * 24, "loop": "a" * 8} for s in r["loops"]["samples"])
    # The untouched random source: its count is the number of its samples find_loop flags, each judged on
    # at most 24 bytes.
    texts = [s["source"]["text"].encode() for s in r["loops"]["samples"]]
    assert all(len(t) <= 24 for t in texts)
    assert r["loops"]["prompts_looping"]["source"] == sum(find_loop(t) is not None for t in texts)

    # A count of 0 skips the section: no results, no row, no samples.
    for skip in (dict(loop_bytes=0), dict(loop_prompts=())):
        r = evaluate(repeating, source, EvalConfig(**{**only_loops, **skip}), log=lambda s: None)
        assert "loops" not in r and r["items"] == {}
        assert not headline_rows(r) and "Greedy samples" not in markdown(r)


# --- metrics ----------------------------------------------------------------------------------------------


def test_boundary_agreement_hand_values():
    pred = [np.array([1, 0, 1, 1, 0, 0], bool), np.array([0, 1, 1], bool)]
    gold = [np.array([1, 0, 0, 1, 0, 1], bool), np.array([0, 1, 0], bool)]
    # Decidable: first 5 and first 2 positions. pred ends {0,2,3} + {1}; gold ends {0,3} + {1}; tp = 3.
    r = boundary_agreement(pred, gold)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 3)
    assert r["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert r["accuracy"] == pytest.approx(6 / 7)  # one disagreement (position 2 of the first text) in 7
    assert r["bytes_per_patch"] == pytest.approx(9 / (4 + 2))  # + the last byte of each text
    assert r["bytes_per_token"] == pytest.approx(9 / (3 + 2))


def test_choice_accuracy_hand_values():
    def s(lp, n):
        return Scored(lp, lp, n, False)

    rows = [[s(-4.0, 2), s(-5.0, 10)], [s(-1.0, 1), s(-3.0, 30)]]
    r = choice_accuracy(rows, gold=[1, 0])
    assert r["acc"] == pytest.approx(0.5)  # row 0 picks 0 (wrong), row 1 picks 0 (right)
    assert r["acc_norm"] == pytest.approx(0.5)  # per byte: row 0 picks 1 (right), row 1 picks 1 (wrong)


def test_source_segmentation_matches_tokenizer(pair, bytelevel_tokenizer):
    model, _ = pair
    text = "hello there, general kenobi"
    data, ends = source_segmentation(model.tokenizer, text)
    assert data == text.encode()
    pieces = [bytelevel_tokenizer.decode([i]) for i in bytelevel_tokenizer.encode(text, add_special_tokens=False)]
    assert np.flatnonzero(ends).tolist() == (np.cumsum([len(p.encode()) for p in pieces]) - 1).tolist()


# --- task items -------------------------------------------------------------------------------------------


def test_cute_items_deterministic_answerable_and_unseen():
    from bytelift.char_skills import CharSkillGenerator

    a, b = T.cute_items(3, seed=0), T.cute_items(3, seed=0)
    assert a == b and a != T.cute_items(3, seed=1)
    assert {it.task for it in a} == set(CharSkillGenerator.TASKS)
    train_words = set(CharSkillGenerator().training_words())
    for it in a:
        assert it.prompt.count("\n\n") == T.DEFAULT_SHOTS
        quoted = it.prompt.split("'")[1::2]
        assert not any(w in train_words for q in quoted for w in q.split()), it.prompt
        question = it.prompt.split("\n\n")[-1]
        word = question.split("'")[1] if "'" in question else None
        if it.task == "unspell":
            assert it.answer == question.removeprefix("Which word is spelled ").removesuffix("?").replace(" ", "")
        if it.task == "spell":
            assert it.answer == " ".join(word)
        if it.task == "reverse":
            assert it.answer == word[::-1]
        if it.task == "contains_char":
            letter = question.split("'")[3]
            assert it.answer == ("yes" if letter in word else "no")


def test_benchmark_items_load():
    lam = T.lambada_items(5)
    assert len(lam) == 5 and all(c.startswith(" ") and ctx for ctx, c in lam)
    hs = T.hellaswag_items(4)
    assert len(hs) == 4 and all(len(h.choices) == 4 and 0 <= h.gold < 4 for h in hs)
    bs = T.basic_skills_items(3)
    assert len(bs) == 3 and all(b.answer and b.prompt.count("\n\n") == 5 for b in bs)


def test_default_corpus_excludes_evaluated_tasks():
    assert not {t for t, _ in PROSE_TASKS} & set(EVALUATED_TASKS)
    first = [p for _, p in zip(range(50), prose_passages())]
    assert len(first) == 50 and len(set(first)) == 50
    code = list(stdlib_sources(max_bytes=50_000))
    assert code and all("def " in c or "import" in c or "class " in c for c in code)


# --- the whole evaluation and its report ---------------------------------------------------------------------


def test_evaluate_and_report(pair, tmp_path):
    model, source = pair
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps."}) + "\n" for i in range(60)))
    cfg = EvalConfig(data=[str(corpus)], heldout_fraction=0.3, heldout_docs=3, lambada=2, hellaswag=2,
                     cute_per_task=1, basic_skills=1, loop_bytes=16)
    r = evaluate(model, source, cfg, log=lambda s: None)
    assert r["items"] == {"heldout": 3, "lambada": 2, "hellaswag": 2, "characters": 15, "loops": 4}
    assert [s["prompt"] for s in r["loops"]["samples"]] == list(T.SAMPLE_PROMPTS)
    assert r["heldout"]["bits_per_byte"]["byteified"] > 0
    assert 0 <= r["heldout"]["boundaries"]["f1"] <= 1
    dec = r["heldout"]["decoding"]
    assert dec["bits_per_byte"] > 0 and dec["bytes_per_patch"] >= 1 and dec["boundary_bias"] == 0.0
    assert len(r["characters"]["tasks"]) == 15  # 14 CUTE-style tasks + string_operations
    log = tmp_path / "stage1" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": i, "loss": 10 - i, "boundary_f1": i / 10}) + "\n" for i in range(5)))
    written = write_report(r, tmp_path / "report", {"stage1": log})
    saved = json.loads(written["json"].read_text())
    assert saved["heldout"]["bits_per_byte"] == r["heldout"]["bits_per_byte"]
    md = written["markdown"].read_text()
    assert "| HellaSwag acc_norm |" in md and "| held-out bits/byte" in md and "as generation segments it" in md
    assert "| greedy samples that loop (8-byte string ×3 within 64 B) |" in md and "## Greedy samples" in md
    for key in ("tasks_plot", "curves_plot"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown(r) == md
