"""Generation: cached decoding against the full forward, batching invariance, stopping, sampling, streaming."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import TextStreamer

from transformers.cache_utils import DynamicSlidingWindowLayer

import bytelift.calibration as calibration
import bytelift.decoding as decoding
from bytelift.decoding import DecodingSession, GrowingKVLayer
from bytelift.streaming import ByteTextStreamer
from bytelift.modeling import ByteliftForCausalLM
from bytelift.tokenization import BYTE_OFFSET, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID
from tests.tiny_models import tiny_source

# Cached (recurrent, one byte at a time) vs full-forward (parallel) logits: float32, different summation
# orders; measured max |diff| ≈ 6e-6 on these models (logits of std ≈ 2).
CACHED_ATOL = 5e-5

MIXED_PROMPTS = [
    "The quick brown fox",
    "def f(x):\n    return x",
    "中文文本测试",
    "مرحبا بالعالم",
    "emoji 🙂👍",
    b"bad \xff\xfe byte",
    "a",
    "a long prompt that goes on and on, " * 6,
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tokenizer, arch="llama", context=256, seed=0):
    source = tiny_source(arch, tokenizer, seed=seed, context=context)
    model = ByteliftForCausalLM.from_source(source, tokenizer, local_heads=4).eval()
    with torch.no_grad():  # a sharper head: greedy choices far from ties, varied outputs
        # The source prior's zero-initialised decoder head gets random weights, so that decoding checks
        # both the decoder's logits and the prior added to them.
        generator = torch.Generator().manual_seed(seed)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
        # Norm weights away from their initial ones: decoding folds them into the matrices after them.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and not name.startswith("global_model."):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def model():
    from tests.tiny_tokenizers import make_bytelevel_tokenizer

    torch.set_num_threads(1)
    return _model(make_bytelevel_tokenizer())


def _teacher_force(model, prompts, continuations, global_sync):
    """Drive a DecodingSession with given continuations (lists of fused ids, the first being the last
    prompt byte); return per row the list of step logits and the full-forward inputs."""
    batch = model.tokenizer(prompts, padding=True, return_tensors="pt")
    session = DecodingSession(model, batch["input_ids"], batch["attention_mask"], batch["expanded_ids"],
                              global_sync=global_sync)
    B = len(prompts)
    got = [[] for _ in range(B)]
    with torch.inference_mode():
        logits = session.prefill()
        for r in range(B):
            got[r].append(logits[r])
        pointer = [0] * B
        while True:
            symbols = torch.tensor([c[min(p, len(c) - 1)] for c, p in zip(continuations, pointer)])
            for r in range(B):
                if bool(session.ready[r]) and not bool(session.finished[r]):
                    pointer[r] += 1
                    if pointer[r] == len(continuations[r]):
                        session.finished[r] = True
            if bool(session.finished.all()):
                break
            logits, ready = session.step(symbols)
            for r in torch.nonzero(ready).flatten().tolist():
                got[r].append(logits[r])
    return batch, session, got


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


# float32: the step's fused matrices round differently from the forward's separate ones (CACHED_ATOL);
# float64 shows the cached path computes the same function as the full forward, to rounding.
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("global_sync", [1.0, 1e-3])
def test_cached_decoding_matches_full_forward(model, model64, global_sync, precision):
    model, atol = (model, CACHED_ATOL) if precision == "float32" else (model64, 1e-11)
    prompts = ["Hello, world", "xy", "A longer prompt with several words in it"]
    gen = torch.Generator().manual_seed(1)
    continuations = []
    for r, p in enumerate(prompts):
        last = p.encode()[-1] + BYTE_OFFSET
        new = torch.randint(BYTE_OFFSET, BYTE_VOCAB_SIZE, (12 + 5 * r,), generator=gen)
        flags = torch.rand(len(new) + 1, generator=gen) < 0.35
        continuations.append(((torch.cat([torch.tensor([last]), new])) + BYTE_VOCAB_SIZE * flags.long()).tolist())
    batch, session, got = _teacher_force(model, prompts, continuations, global_sync)
    if global_sync == 1.0:  # parking ran the global model no more often than the slowest row needed
        assert session.global_steps <= max(sum(c >= BYTE_VOCAB_SIZE for c in cont) for cont in continuations)
    with torch.inference_mode():
        for r, (prompt, cont) in enumerate(zip(prompts, continuations)):
            valid = batch["attention_mask"][r].bool()
            prompt_ids = batch["input_ids"][r][valid]
            n = len(prompt_ids)
            cont_t = torch.tensor(cont)
            flags = cont_t >= BYTE_VOCAB_SIZE
            ids = torch.cat([prompt_ids, cont_t[1:] % BYTE_VOCAB_SIZE])[None]
            bm = torch.cat([session.prompt_boundaries[r][valid][:-1], flags])[None]
            full = model(ids, boundary_mask=bm).logits[0]
            # got[r][k] predicts byte n-1+k: the full logits at position n-2+k.
            assert len(got[r]) == len(cont)
            step = torch.stack(got[r])
            ref = full[n - 2 : n - 2 + len(cont)]
            assert step.dtype == ref.dtype == getattr(torch, precision)
            torch.testing.assert_close(step, ref, rtol=0, atol=atol)
            # The predictor's prompt boundaries are what the full forward would predict on the prompt.
            pred = model(prompt_ids[None]).boundary_mask[0]
            assert torch.equal(pred[:-1], session.prompt_boundaries[r][valid][:-1])


@pytest.mark.parametrize("global_sync", [1.0, 0.5, 1e-3])
def test_batched_greedy_equals_alone(model, global_sync):
    batch_out = model.generate(MIXED_PROMPTS, max_new_bytes=24, return_dict=True, eos=False, global_sync=global_sync)
    assert batch_out.new_ids.shape == (len(MIXED_PROMPTS), 24)
    for r, prompt in enumerate(MIXED_PROMPTS):
        alone = model.generate([prompt], max_new_bytes=24, return_dict=True, eos=False)
        assert torch.equal(alone.new_ids[0], batch_out.new_ids[r]), prompt
        assert torch.equal(alone.boundaries[0], batch_out.boundaries[r]), prompt
    # Not degenerate: outputs differ between prompts, use many byte values, and patches close sometimes.
    assert len({tuple(row.tolist()) for row in batch_out.new_ids}) == len(MIXED_PROMPTS)
    assert len(set(batch_out.new_ids.flatten().tolist())) > 40
    rate = batch_out.boundaries.float().mean()
    assert 0.05 < rate < 0.95
    # With parking each row still sees exactly its own patches; the global model ran fewer times than
    # the rows closed patches in total.
    assert batch_out.global_steps < int(batch_out.boundaries.sum())


def _with_lookahead(model, k):
    m = copy.deepcopy(model)
    m.config.boundary_lookahead = k
    m.boundary_predictor.lookahead = k
    return m


@pytest.mark.parametrize("global_sync", [1.0, 1e-3])
def test_lookahead_decoding_matches_full_forward(model, global_sync):
    """With k = 3 bytes of lookahead the last 3 prompt bytes are forced steps whose flags the session's
    head picks (all of a prompt shorter than that, bos included); every logit the session computes equals the
    full forward's over the same bytes and boundaries, and the predictor's prompt boundaries are its own."""
    k = 3
    m = _with_lookahead(model, k)
    prompts = ["Hello, world", "", "x", "A longer prompt with several words in it"]
    batch = m.tokenizer(prompts, padding=True, return_tensors="pt")
    session = DecodingSession(m, batch["input_ids"], batch["attention_mask"], batch["expanded_ids"],
                              global_sync=global_sync)
    B = len(prompts)
    gen = torch.Generator().manual_seed(2)
    free = []
    for r in range(B):
        n = 6 + 3 * r
        flags = (torch.rand(n, generator=gen) < 0.35).long()
        free.append((torch.randint(BYTE_OFFSET, BYTE_VOCAB_SIZE, (n,), generator=gen) + BYTE_VOCAB_SIZE * flags).tolist())
    got, pointer = [[] for _ in range(B)], [0] * B
    with torch.inference_mode():
        logits = session.prefill()
        for r in range(B):
            got[r].append(logits[r])
        symbols = session.forced_symbols(logits)
        while not bool(session.finished.all()):
            logits, ready = session.step(symbols)
            symbols = symbols.clone()
            for r in range(B):
                if bool(session.finished[r]):
                    continue
                if bool(session.ready[r]):  # computed logits this step (forced or free)
                    got[r].append(logits[r])
                if bool(ready[r]):  # asks for its next free symbol
                    if pointer[r] == len(free[r]):
                        session.finished[r] = True
                    else:
                        symbols[r] = free[r][pointer[r]]
                        pointer[r] += 1
        for r in range(B):
            valid = batch["attention_mask"][r].bool()
            prompt_ids = batch["input_ids"][r][valid]
            n, f = len(prompt_ids), min(k, len(prompt_ids))
            pb = session.prompt_boundaries[r][valid]
            assert bool(pb[0])  # bos
            cont = torch.tensor(free[r][: pointer[r]], dtype=torch.long)
            ids = torch.cat([prompt_ids, cont % BYTE_VOCAB_SIZE])[None]
            bm = torch.cat([pb, cont >= BYTE_VOCAB_SIZE])[None]
            full = m(ids, boundary_mask=bm).logits[0]
            start = n - f - 1  # position of the prefill logits (they predict the first forced byte)
            step = torch.stack(got[r][1:] if start < 0 else got[r])
            ref = full[max(start, 0):]
            assert step.shape == ref.shape, prompts[r]
            torch.testing.assert_close(step, ref, rtol=0, atol=CACHED_ATOL)
            pred = m(prompt_ids[None]).boundary_mask[0]
            assert torch.equal(pred[: n - f], pb[: n - f])


@pytest.mark.parametrize("global_sync", [1.0, 0.5])
def test_lookahead_batched_greedy_equals_alone(model, global_sync):
    m = _with_lookahead(model, 2)
    prompts = MIXED_PROMPTS + ["", "y"]
    out = m.generate(prompts, max_new_bytes=16, return_dict=True, eos=False, global_sync=global_sync,
                     max_patch_bytes=5)
    for r, prompt in enumerate(prompts):
        alone = m.generate([prompt], max_new_bytes=16, return_dict=True, eos=False, max_patch_bytes=5)
        assert torch.equal(alone.new_ids[0], out.new_ids[r]), prompt
        assert torch.equal(alone.boundaries[0], out.boundaries[r]), prompt
        assert torch.equal(alone.prompt_boundaries[0], out.prompt_boundaries[r][-alone.prompt_boundaries.shape[1]:])
    assert int(out.num_new_bytes.min()) == 16


def test_identical_prompts_identical_outputs(model):
    out = model.generate(["same prompt here"] * 8, max_new_bytes=32, return_dict=True, eos=False)
    assert all(torch.equal(out.new_ids[0], row) for row in out.new_ids)
    assert out.texts == [out.texts[0]] * 8


def test_padding_does_not_change_step_logits(model):
    # The same row decoded alone and next to a much longer prompt (left padding, masked KV slots).
    cont = [ord("d") + BYTE_OFFSET + BYTE_VOCAB_SIZE] + [ord(c) + BYTE_OFFSET for c in "efgh"]
    long_cont = [ord("g") + BYTE_OFFSET] + [ord(c) + BYTE_OFFSET + BYTE_VOCAB_SIZE for c in "ijkl"]
    _, _, alone = _teacher_force(model, ["abcd"], [cont], 1e-3)
    _, _, both = _teacher_force(model, ["abcd", "a much longer prompt, padding the other row " * 2 + "g"],
                                [cont, long_cont], 1e-3)
    torch.testing.assert_close(torch.stack(both[0]), torch.stack(alone[0]), rtol=0, atol=1e-5)


def test_first_global_step_with_an_empty_cache_serves_some_rows(model, monkeypatch):
    """The predictor closed no patch in any prompt, so the KV cache is still empty when the first row
    closes one (the other row has not): that step sizes the cache for every row, and both rows still
    get what they get alone."""
    monkeypatch.setattr(model, "predict_boundaries", lambda logp, mask, ids=None: torch.zeros_like(mask, dtype=torch.bool))
    fused = lambda text, flags: [ord(c) + BYTE_OFFSET + BYTE_VOCAB_SIZE * f for c, f in zip(text, flags)]
    conts = [fused("dxyzw", [1, 0, 1, 0, 1]), fused("hpqrs", [0, 0, 1, 1, 0])]
    prompts = ["abcd", "fgh"]
    _, session, both = _teacher_force(model, prompts, conts, 1e-3)
    assert session.cache.get_seq_length() > 0
    for r, (prompt, cont) in enumerate(zip(prompts, conts)):
        _, _, alone = _teacher_force(model, [prompt], [cont], 1e-3)
        torch.testing.assert_close(torch.stack(both[r]), torch.stack(alone[0]), rtol=0, atol=1e-5)


def test_empty_prompt_generates_from_bos(model):
    out = model.generate([""], max_new_bytes=10, return_dict=True, eos=False)
    assert out.sequences[0, 0].item() == 1 and out.num_new_bytes.item() == 10
    assert bool(out.prompt_boundaries[0, 0])  # bos closes its patch
    # Same as a batch that mixes it with a real prompt.
    mixed = model.generate(["", "some text"], max_new_bytes=10, return_dict=True, eos=False)
    assert torch.equal(mixed.new_ids[0], out.new_ids[0])


def test_prompt_longer_than_context(bytelevel_tokenizer):
    small = _model(bytelevel_tokenizer, context=8)
    with pytest.raises(ValueError, match="context"):
        small.generate(["a prompt with far more than eight patches in it, surely " * 4], max_new_bytes=4)


def test_context_fills_during_decoding(bytelevel_tokenizer):
    small = _model(bytelevel_tokenizer, context=8)
    out = small.generate(["ab"], max_new_bytes=200, return_dict=True, eos=False, boundary_bias=50.0)
    # Every byte closes a patch: the row stops when its patch count reaches the context.
    assert out.num_new_bytes.item() < 200
    assert int(out.prompt_boundaries.sum() + out.boundaries.sum()) <= 8 + 1


def test_max_new_bytes_exact(model):
    for n in (0, 1, 7):
        out = model.generate(["count me", "x"], max_new_bytes=n, return_dict=True, eos=False)
        assert out.num_new_bytes.tolist() == [n, n]
        assert out.sequences.shape[1] == out.new_ids.shape[1] + 9 and out.new_ids.shape[1] == n
    tensor_out = model.generate(model.tokenizer(["count me"], return_tensors="pt")["input_ids"], max_new_bytes=5)
    assert tensor_out.shape == (1, 9 + 5)


def test_stop_strings(model):
    full = model.generate(["stop test"], max_new_bytes=30, return_dict=True, eos=False)
    new = bytes(full.new_ids[0].tolist()[i] - BYTE_OFFSET for i in range(30))
    stop = new[10:13]  # a substring the model will produce
    first = new.find(stop)
    out = model.generate(["stop test", "other row"], max_new_bytes=30, return_dict=True, eos=False,
                         stop_strings=[stop, "never-generated"])
    assert out.num_new_bytes[0].item() == first + len(stop)
    assert bytes(out.new_ids[0, : first + len(stop)] - BYTE_OFFSET) == new[: first + len(stop)]
    alone = model.generate(["other row"], max_new_bytes=30, return_dict=True, eos=False, stop_strings=[stop])
    assert torch.equal(out.new_ids[1, : alone.num_new_bytes.item()], alone.new_ids[0])


@pytest.mark.parametrize("global_sync", [1.0, 1e-3])
def test_finished_rows_are_dropped_outputs_unchanged(model, monkeypatch, global_sync):
    prompts = ["stop test", "other row", "a third, longer prompt", "x"]
    free = model.generate(prompts, max_new_bytes=30, return_dict=True, eos=False)
    # Stop strings taken from the free outputs at different places: the rows finish at different steps.
    stops = [bytes(free.new_ids[r, a:b] - BYTE_OFFSET) for r, (a, b) in enumerate([(3, 5), (12, 15), (20, 22)])]
    kwargs = dict(max_new_bytes=30, return_dict=True, eos=False, stop_strings=stops, global_sync=global_sync)
    state: dict = {}
    sizes = []
    for _ in model._generate_steps(prompts, max_new_bytes=30, eos=False, stop_strings=stops,
                                   global_sync=global_sync, state=state):
        sizes.append(len(state["session"].rows))
    assert sizes[0] == len(prompts) and min(sizes) < sizes[0]  # rows did leave the computed batch
    assert sorted(sizes, reverse=True) == sizes
    dropped = model.generate(prompts, **kwargs)
    monkeypatch.setattr("bytelift.decoding.DROP_FINISHED_ROWS", False)
    kept = model.generate(prompts, **kwargs)
    assert torch.equal(dropped.new_ids, kept.new_ids) and torch.equal(dropped.boundaries, kept.boundaries)
    assert len(set(dropped.num_new_bytes.tolist())) > 2  # the rows did stop at different lengths
    for r, p in enumerate(prompts):
        alone = model.generate([p], **kwargs)
        n = alone.num_new_bytes.item()
        assert n == dropped.num_new_bytes[r].item()
        assert torch.equal(alone.new_ids[0], dropped.new_ids[r, :n]), p


def test_seeded_sampling_is_per_row(model):
    # Each row has its own generator seeded with the seed: a row samples the same alone or in a batch
    # (whatever the other rows and however long it waits for them), and identical prompts identically.
    kwargs = dict(max_new_bytes=24, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, return_dict=True,
                  eos=False, seed=7)
    prompts = ["first sampled prompt", "second", "and the third one, longer"]
    for global_sync in (1.0, 0.5, 1e-3):
        batch = model.generate(prompts, global_sync=global_sync, **kwargs)
        for r, p in enumerate(prompts):
            alone = model.generate([p], **kwargs)
            assert torch.equal(alone.new_ids[0], batch.new_ids[r]), (global_sync, p)
            assert torch.equal(alone.boundaries[0], batch.boundaries[r]), (global_sync, p)
    same = model.generate(["same prompt"] * 3, **kwargs)
    assert all(torch.equal(same.new_ids[0], row) for row in same.new_ids)
    assert len({tuple(row.tolist()) for row in batch.new_ids}) == len(prompts)


class _ForceEos:
    """A logits processor forcing EOS at a chosen step for row 0."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.at:
            scores = scores.clone()
            scores[0] = -float("inf")
            scores[0, EOS_ID] = 0.0
        return scores


def test_eos_stops_a_row(model):
    out = model.generate(["eos row", "free row"], max_new_bytes=12, return_dict=True,
                         logits_processor=[_ForceEos(4)], global_sync=1e-3)
    assert out.num_new_bytes.tolist() == [4, 12]
    assert out.new_ids[0, 3].item() == EOS_ID and (out.new_ids[0, 4:] == PAD_ID).all()
    # eos=False bans it: the same forcing cannot stop the row.
    banned = model.generate(["eos row"], max_new_bytes=12, return_dict=True, eos=False, logits_processor=[_ForceEos(4)])
    assert banned.num_new_bytes.item() == 12 and EOS_ID not in banned.new_ids[0].tolist()


def test_seeded_sampling_reproducible(model):
    kwargs = dict(max_new_bytes=24, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2,
                  return_dict=True, eos=False)
    a = model.generate(["sample", "two"], seed=3, **kwargs)
    b = model.generate(["sample", "two"], seed=3, **kwargs)
    c = model.generate(["sample", "two"], seed=4, **kwargs)
    greedy = model.generate(["sample", "two"], max_new_bytes=24, return_dict=True, eos=False)
    assert torch.equal(a.new_ids, b.new_ids)
    assert not torch.equal(a.new_ids, c.new_ids)
    assert not torch.equal(a.new_ids, greedy.new_ids)


def test_repetition_penalty_sees_byte_history(model):
    # A huge penalty forbids repeating any byte already present (prompt or new): all new bytes distinct.
    out = model.generate(["abc"], max_new_bytes=20, return_dict=True, eos=False, repetition_penalty=1e6)
    new = out.new_ids[0].tolist()
    assert len(set(new)) == len(new)
    assert not {ord(c) + BYTE_OFFSET for c in "abc"} & set(new)


def test_streaming(model):
    prompt = "stream: 中文 🙂"
    # Force multi-byte characters into the output so that splitting them would show.
    kwargs = dict(max_new_bytes=40, eos=False, logits_processor=[_Utf8Bias()])
    final = model.generate([prompt], return_dict=True, **kwargs)
    pieces = list(model.stream(prompt, **kwargs))
    assert "".join(pieces) == final.texts[0]
    new = bytes((final.new_ids[0] - BYTE_OFFSET).tolist())
    assert any(b >= 0xC0 for b in new)  # multi-byte lead bytes were generated
    cumulative = b""
    for piece in pieces:
        cumulative += piece.encode("utf-8")
        # Every piece boundary is a character boundary of the final text.
        assert final.texts[0].encode("utf-8").startswith(cumulative)

    got = []
    model.generate([prompt], streamer=ByteTextStreamer(on_text=got.append), **kwargs)
    assert "".join(got) == final.texts[0] and got == pieces

    # A transformers TextStreamer works with the byte tokenizer too.
    printed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    model.generate([prompt], streamer=Capture(model.tokenizer, skip_prompt=True, skip_special_tokens=True), **kwargs)
    assert "".join(printed) == final.texts[0]


class _Utf8Bias:
    """Pushes the choice towards valid multi-byte UTF-8: after a lead byte, continuation bytes."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        last = input_ids[:, -1] - BYTE_OFFSET
        need_cont = (last >= 0xC0) | ((last >= 0x80) & (input_ids[:, -2] - BYTE_OFFSET >= 0xE0))
        cont = torch.arange(0x80, 0xC0) + BYTE_OFFSET
        scores[need_cont[:, None] & torch.ones_like(scores, dtype=torch.bool).index_fill(1, cont, False)] -= 1e4
        lead = torch.tensor([0xE4, 0xF0]) + BYTE_OFFSET
        scores[~need_cont, lead[0]] += 3.0
        return scores


def test_greedy_ignores_global_rng(model):
    torch.manual_seed(0)
    a = model.generate(["rng"], max_new_bytes=8)
    torch.manual_seed(123)
    b = model.generate(["rng"], max_new_bytes=8)
    assert torch.equal(a, b)


def test_cli_generate(model, tmp_path, capsys, monkeypatch):
    import io

    from bytelift.cli import main

    model.save_pretrained(tmp_path / "m")
    expected = model.generate(["hello", "from stdin"], max_new_bytes=6, return_dict=True).texts
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert main(["generate", str(tmp_path / "m"), "hello", "-", "--max-new-bytes", "6", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed == f"=== 0 ===\n{expected[0]}\n=== 1 ===\n{expected[1]}\n"
    assert main(["generate", str(tmp_path / "m"), "hello", "--max-new-bytes", "6", "--stream", "--threads", "1"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"


def test_cli_generate_prompt_file(model, tmp_path, capsys):
    """--file: one prompt per line (CRLF or LF, blank lines skipped, an invalid UTF-8 byte kept), batched."""
    from bytelift.cli import main

    model.save_pretrained(tmp_path / "m")
    (tmp_path / "prompts.txt").write_bytes(b"first line\r\n\nbad \xff byte\nlast")
    prompts = ["first line", b"bad \xff byte", "last"]
    expected = model.generate(prompts, max_new_bytes=5, return_dict=True).texts
    args = ["generate", str(tmp_path / "m"), "--file", str(tmp_path / "prompts.txt"), "--max-new-bytes", "5",
            "--batch-size", "2", "--threads", "1"]
    assert main(args) == 0
    assert capsys.readouterr().out == "".join(f"=== {i} ===\n{t}\n" for i, t in enumerate(expected))


def test_cli_generate_stdin_keeps_invalid_bytes(model, tmp_path, capsys, monkeypatch):
    """A prompt on stdin with an invalid UTF-8 byte generates as the same bytes given to `generate`."""
    import io

    from bytelift.cli import main

    model.save_pretrained(tmp_path / "m")
    expected = model.generate([b"bad \xff byte"], max_new_bytes=5, return_dict=True).texts[0]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"bad \xff byte")))
    assert main(["generate", str(tmp_path / "m"), "--max-new-bytes", "5", "--threads", "1"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_max_patch_bytes(model):
    out = model.generate(["patch caps", "x"], max_new_bytes=30, return_dict=True, eos=False, boundary_bias=-1e9,
                         max_patch_bytes=3)
    # No natural boundary (bias), so every third byte of the running patch closes it.
    for r in range(2):
        flags = torch.cat([out.prompt_boundaries[r], out.boundaries[r]]).tolist()
        last = max(i for i, f in enumerate(out.prompt_boundaries[r].tolist()) if f)
        run = len(out.prompt_boundaries[r]) - 1 - last
        for f in flags[len(out.prompt_boundaries[r]):]:
            run += 1
            assert f == (run == 3)
            run = 0 if f else run


@pytest.mark.parametrize("arch,family", [("gpt2", "bytelevel"), ("gemma3", "sentencepiece"), ("qwen3", "bytelevel")])
def test_other_architectures_batched_equals_alone(arch, family, bytelevel_tokenizer, sentencepiece_tokenizer):
    # gpt2: learned absolute positions (explicit position_ids); gemma3: sliding-window layers (parking is
    # forced, so its windows over KV slots stay windows over patches); qwen3: q/k norms.
    tok = {"bytelevel": bytelevel_tokenizer, "sentencepiece": sentencepiece_tokenizer}[family]
    m = _model(tok, arch=arch)
    prompts = ["a longer first prompt, to pad the others " * 2, "mid length", "中文 🙂"]
    # Patches capped at 6 bytes: every row closes patches while decoding (at its own phase), whatever this
    # random model's head decides, so the global model runs with rows at different patch positions.
    kwargs = dict(max_new_bytes=20, return_dict=True, eos=False, max_patch_bytes=6)
    batch = m.generate(prompts, **kwargs)
    for r, p in enumerate(prompts):
        assert torch.equal(m.generate([p], **kwargs).new_ids[0], batch.new_ids[r]), (arch, p)
    assert 0 < int(batch.boundaries.sum()) < batch.boundaries.numel()


@pytest.mark.parametrize("global_sync", [1e-3, 0.5])
def test_global_step_computes_only_the_waiting_rows(model, monkeypatch, global_sync):
    """Without parking, a global step runs the transformer on the rows that closed a patch alone: over
    the decoding, computed rows = patches served, where a batch-wide step computes every row each time;
    and each row still equals itself alone."""
    computed = []
    forward = model.global_model.forward

    def counting(*args, **kwargs):
        computed.append(kwargs["inputs_embeds"].shape[:2])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.global_model, "forward", counting)
    monkeypatch.setattr(decoding, "DROP_FINISHED_ROWS", False)
    out = model.generate(MIXED_PROMPTS, max_new_bytes=24, return_dict=True, eos=False, global_sync=global_sync)
    B = len(MIXED_PROMPTS)
    prefill, decode = computed[0], computed[1:]
    assert prefill[0] == B and len(decode) == out.global_steps and all(n == 1 for _, n in decode)
    rows = sum(r for r, _ in decode)
    # Every computed row served one closed patch (the forced byte's or a new byte's): at most all of them.
    assert rows <= int(out.prompt_boundaries[:, -1].sum() + out.boundaries.sum())
    assert rows < B * len(decode)  # some steps left rows out
    monkeypatch.setattr(model.global_model, "forward", forward)
    for r, prompt in enumerate(MIXED_PROMPTS):
        alone = model.generate([prompt], max_new_bytes=24, return_dict=True, eos=False)
        assert torch.equal(alone.new_ids[0], out.new_ids[r]), prompt


def test_global_cache_layer_types(bytelevel_tokenizer, sentencepiece_tokenizer):
    """Full-attention layers append in place; sliding-window layers keep HF's windowed layer."""
    llama = _model(bytelevel_tokenizer).global_model.config
    assert all(type(layer) is GrowingKVLayer for layer in decoding._global_cache(llama).layers)
    gemma = _model(sentencepiece_tokenizer, arch="gemma3").global_model.config
    types = {type(layer) for layer in decoding._global_cache(gemma).layers}
    assert DynamicSlidingWindowLayer in types


def test_batched_greedy_equals_alone_across_cache_growth(model, monkeypatch):
    """KV buffers and the slot mask grown many times during one generation (one-slot spare, one-slot
    blocks): outputs unchanged, and each row equals itself alone."""
    monkeypatch.setattr(decoding, "SLOT_BLOCK", 1)
    monkeypatch.setattr(decoding, "KV_MIN_SPARE", 1)
    prompts = MIXED_PROMPTS[:4]
    kwargs = dict(max_new_bytes=24, return_dict=True, eos=False)
    batch = model.generate(prompts, **kwargs)
    assert batch.global_steps > 3
    for r, p in enumerate(prompts):
        assert torch.equal(model.generate([p], **kwargs).new_ids[0], batch.new_ids[r]), p


def test_forced_last_prompt_byte(model):
    # The rolled-back last prompt byte: the head alone decides whether it closes a patch, from the logits
    # of the full forward at the byte before it; a bos-only prompt's byte always closes its patch.
    prompts = ["Hello, world", "xy", "some more text", ""]
    batch = model.tokenizer(prompts, padding=True, return_tensors="pt")
    session = DecodingSession(model, batch["input_ids"], batch["attention_mask"], batch["expanded_ids"])
    with torch.inference_mode():
        symbols = session.forced_symbols(session.prefill())
        assert torch.equal(symbols % BYTE_VOCAB_SIZE, batch["input_ids"][:, -1])
        for r, p in enumerate(prompts[:-1]):
            ids = batch["input_ids"][r][batch["attention_mask"][r].bool()][None]
            logits = model(ids).logits[0, -2]
            last = int(ids[0, -1])
            assert bool(symbols[r] >= BYTE_VOCAB_SIZE) == bool(logits[last + BYTE_VOCAB_SIZE] > logits[last])
        assert symbols[-1] == 1 + BYTE_VOCAB_SIZE
        flips = session.forced_symbols(session.prefill(), boundary_bias=-1e9)
        assert (flips[:-1] < BYTE_VOCAB_SIZE).all()


# --- the decoding threshold: decoding_logprobs and calibrate_boundary_bias -------------------------------


def _bos_prompts(n):
    from bytelift.tokenization import BOS_ID

    return torch.full((n, 1), BOS_ID, dtype=torch.long)


def _right_padded(texts):
    rows = [torch.tensor(list(t.encode()), dtype=torch.long) + BYTE_OFFSET for t in texts]
    return pad_sequence(rows, batch_first=True, padding_value=PAD_ID)


@pytest.mark.parametrize("bias", [0.0, 0.7])
def test_decoding_logprobs_equal_full_forward_with_the_heads_boundaries(model, bias):
    # Teacher-forced decoding scores each byte with the folded distribution and closes patches with the
    # head's flag (+ bias): the full forward given those boundaries must give the same log-probs, and its
    # logits must take the same flag decisions (self-consistency of the causal segmentation).
    texts = ["The quick brown fox jumps", "def f(x):\n    return x", "ab"]
    conts = _right_padded(texts)
    d = calibration.decoding_logprobs(model, _bos_prompts(len(texts)), None, None, conts, boundary_bias=bias)
    for r, t in enumerate(texts):
        n = len(t.encode())
        assert int(d.scored[r]) == n and not d.flags[r, n:].any() and (d.logprobs[r, n:] == 0).all()
        ids = torch.cat([_bos_prompts(1)[0], conts[r, :n]])[None]
        bm = torch.cat([torch.tensor([True]), d.flags[r, :n]])[None]  # bos always closes its patch
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids, boundary_mask=bm).logits[0, :-1].float(), dim=-1)
        nxt = ids[0, 1:]
        plain, fused = logp.gather(1, nxt[:, None])[:, 0], logp.gather(1, (nxt + BYTE_VOCAB_SIZE)[:, None])[:, 0]
        torch.testing.assert_close(d.logprobs[r, :n], torch.logaddexp(plain, fused), rtol=0, atol=CACHED_ATOL)
        torch.testing.assert_close(d.logodds[r, :n], fused - plain, rtol=0, atol=CACHED_ATOL)
        assert torch.equal(d.flags[r, :n], fused - plain + bias > 0)
    assert d.flags.any() and not d.flags.all()  # the case is not degenerate
    # A row scores the same alone as in the batch.
    alone = calibration.decoding_logprobs(model, _bos_prompts(1), None, None, conts[2:, :2], boundary_bias=bias)
    torch.testing.assert_close(alone.logprobs[0], d.logprobs[2, :2], rtol=0, atol=CACHED_ATOL)


def test_decoding_logprobs_default_to_the_models_bias(model, monkeypatch):
    conts = _right_padded(["hello there"])
    monkeypatch.setattr(model.config, "decode_boundary_bias", 1e9)
    assert calibration.decoding_logprobs(model, _bos_prompts(1), None, None, conts).flags[0].all()
    monkeypatch.setattr(model.config, "decode_boundary_bias", -1e9)
    assert not calibration.decoding_logprobs(model, _bos_prompts(1), None, None, conts).flags[0].any()


def test_generate_uses_the_models_decoding_bias(model, monkeypatch):
    prompts = ["Hello", "def f("]
    for bias in (-1e9, 0.8, 1e9):
        monkeypatch.setattr(model.config, "decode_boundary_bias", bias)
        default = model.generate(prompts, max_new_bytes=12, return_dict=True)
        monkeypatch.setattr(model.config, "decode_boundary_bias", 0.0)
        given = model.generate(prompts, max_new_bytes=12, return_dict=True, boundary_bias=bias)
        assert torch.equal(default.boundaries, given.boundaries) and torch.equal(default.new_ids, given.new_ids)
        if abs(bias) > 1:  # every new byte closes a patch, or none does
            assert default.boundaries.all() if bias > 0 else not default.boundaries.any()


def test_calibrate_boundary_bias_matches_the_predictors_rate(model):
    texts = ["The history of the city begins in the year", "def fibonacci(n):\n    return n", "Once upon a time"]
    batches = [model.tokenizer(texts[:2], padding=True, return_tensors="pt"),
               model.tokenizer(texts[2:], padding=True, return_tensors="pt")]
    cal = calibration.calibrate_boundary_bias(model, batches, tolerance=0.05)
    # The target: the predictor's patch ends per decided byte (bos and each text's last byte excluded).
    ends = decided = 0
    for t in texts:
        enc = model.tokenizer([t], return_tensors="pt")
        with torch.inference_mode():
            bm = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "expanded_ids")}).boundary_mask[0]
        ends += int(bm[1:-1].sum())
        decided += len(bm) - 2
    assert cal.target_rate == pytest.approx(ends / decided)
    assert cal.positions == sum(len(t.encode()) for t in texts)
    assert cal.trials[0][0] == 0.0 and (cal.bias, cal.rate) in cal.trials
    # The reported rate is decoding's at the chosen bias, and it is the closest of the trials.
    conts = _right_padded(texts)
    d = calibration.decoding_logprobs(model, _bos_prompts(len(texts)), None, None, conts, boundary_bias=cal.bias)
    assert cal.rate == pytest.approx(float(d.flags.sum()) / cal.positions)
    assert abs(cal.rate - cal.target_rate) == min(abs(r - cal.target_rate) for _, r in cal.trials)
    # With 88 bytes the rate moves in steps of 1/88: within one step or so of the target, or within tolerance.
    assert abs(cal.rate - cal.target_rate) <= max(0.05 * cal.target_rate, 1.5 / cal.positions)
    # A head pushed towards "ends a patch" (+3 on every fused logit, as a bias): the search moves the bias
    # down to the same rate.
    push = torch.zeros(2 * BYTE_VOCAB_SIZE)
    push[BYTE_VOCAB_SIZE:] = 3.0
    model.lm_head.bias = torch.nn.Parameter(push)
    try:
        pushed = calibration.calibrate_boundary_bias(model, batches, tolerance=0.05)
    finally:
        model.lm_head.bias = None
    assert pushed.trials[0][1] > cal.trials[0][1]
    # Not exactly 3 lower: the flags steer the decoding (and the source prior's trie cursor) differently.
    assert pushed.bias < cal.bias - 0.5
    assert abs(pushed.rate - pushed.target_rate) <= max(0.05 * pushed.target_rate, 1.5 / pushed.positions)
    assert calibration.calibrate_boundary_bias(model, batches, max_bytes=40).positions == 40


def test_cli_calibrate(model, tmp_path, capsys):
    import json

    from bytelift.cli import main

    folder = tmp_path / "m"
    model.save_pretrained(folder)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox."}) + "\n" for i in range(40)))
    args = ["calibrate", str(folder), "--data", str(corpus), "--heldout-fraction", "0.2", "--docs", "4",
            "--threads", "1"]
    assert main(args + ["--dry-run"]) == 0
    assert "decode_boundary_bias +0.0000 ->" in capsys.readouterr().out
    assert json.loads((folder / "config.json").read_text()).get("decode_boundary_bias", 0.0) == 0.0
    assert main(args) == 0
    written = ByteliftForCausalLM.from_pretrained(folder).config.decode_boundary_bias
    assert f"-> {written:+.4f}" in capsys.readouterr().out
    assert main(["calibrate", str(folder), "--bias", "1.25"]) == 0
    reloaded = ByteliftForCausalLM.from_pretrained(folder)
    assert reloaded.config.decode_boundary_bias == 1.25
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)  # only the config changed
    assert main(["calibrate", str(tmp_path / "nowhere")]) == 2
