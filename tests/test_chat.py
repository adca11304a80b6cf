"""Chatting with a byte model: stopping at the end of turn, the text-generation pipeline, the `bytelift chat` REPL."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import LogitsProcessor, pipeline

from bytelift.chat import STOPPED_NOTE, USER_PROMPT, chat_repl
from bytelift.modeling import ByteliftForCausalLM
from bytelift.streaming import MarkerFilter
from bytelift.tokenization import BYTE_OFFSET, EOS_ID
from tests.test_chat_template import EOS_TEMPLATE, TURN_TEMPLATE, chat_source
from tests.tiny_models import tiny_source

pytestmark = pytest.mark.usefixtures("one_thread")


class Script(LogitsProcessor):
    """Forces a batch-1 generation to emit `ids` (byte-side ids) in order, then whatever the model likes."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.calls = 0

    def __call__(self, input_ids, scores):
        if self.calls < len(self.ids):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.ids[self.calls]] = 0.0
            scores = forced
        self.calls += 1
        return scores


def text_ids(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode()]


def _chat_model(template: str, turn_token: bool) -> ByteliftForCausalLM:
    tok = chat_source(template, turn_token)
    return ByteliftForCausalLM.from_source(tiny_source("qwen2", tok), tok, local_heads=4).eval()


@pytest.fixture(scope="module")
def turn_model():
    """End of turn = <|end|>, a special token other than the eos: spelled as text, a stop string."""
    return _chat_model(TURN_TEMPLATE, turn_token=True)


@pytest.fixture(scope="module")
def eos_model():
    """End of turn = the source's eos: EOS_ID."""
    return _chat_model(EOS_TEMPLATE, turn_token=False)


CHAT = [{"role": "user", "content": "Hi there"}]


def test_generation_stops_at_a_text_end_of_turn(turn_model):
    batch = turn_model.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    out = turn_model.generate(**batch, max_new_bytes=40, logits_processor=[Script(text_ids("ab<|end|>cd"))],
                              return_dict=True)
    assert out.new_ids[0].tolist() == text_ids("ab<|end|>")  # stopped right after the marker
    assert out.texts == ["ab"]  # the marker is dropped from the text, as the source drops its special token
    more = turn_model.generate(**batch, max_new_bytes=40, logits_processor=[Script(text_ids("ab<|end|>cd"))],
                               return_dict=True, end_of_turn=False, eos=False)
    assert int(more.num_new_bytes[0]) == 40 and more.texts[0].startswith("abcd")
    streamed = turn_model.stream(batch["input_ids"], max_new_bytes=40,
                                 logits_processor=[Script(text_ids("ab<|end|>cd"))])
    assert "".join(streamed) == "ab"


def test_generation_stops_at_an_eos_end_of_turn(eos_model):
    batch = eos_model.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    out = eos_model.generate(**batch, max_new_bytes=40, logits_processor=[Script(text_ids("ab") + [EOS_ID])],
                             return_dict=True)
    assert out.new_ids[0].tolist() == text_ids("ab") + [EOS_ID] and out.texts == ["ab"]


def test_marker_filter_withholds_a_possible_marker():
    f = MarkerFilter("<|end|>")
    pieces = [f.feed(p) for p in ["he", "llo<", "|en", "d|> x <", "|e"]]
    assert pieces == ["he", "llo", "", " x ", ""] and f.flush() == "<|e"
    assert MarkerFilter(None).feed("<|end|>") == "<|end|>"


def test_pipeline_returns_text_for_a_chat(turn_model):
    pipe = pipeline("text-generation", model=turn_model, tokenizer=turn_model.tokenizer)
    out = pipe(CHAT, max_new_tokens=40, logits_processor=[Script(text_ids("Hello!<|end|>"))])
    assert out[0]["generated_text"] == [*CHAT, {"role": "assistant", "content": "Hello!"}]
    plain = pipe("Once upon", max_new_tokens=8, do_sample=False)
    assert isinstance(plain[0]["generated_text"], str) and plain[0]["generated_text"].startswith("Once upon")


def _replay(lines):
    """A `read` function that returns scripted lines (an exception instance is raised), then EOF."""
    lines = list(lines)

    def read(prompt):
        assert prompt == USER_PROMPT
        if not lines:
            raise EOFError
        item = lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_repl_keeps_history_and_streams(turn_model, monkeypatch):
    prompts, written = [], []
    generate = turn_model.generate

    def spy(**kwargs):
        prompts.append(turn_model.tokenizer.decode(kwargs["input_ids"][0]))
        kwargs["logits_processor"] = [Script(text_ids(f"Answer {len(prompts)}<|end|>"))]
        return generate(**kwargs)

    monkeypatch.setattr(turn_model, "generate", spy)
    messages = chat_repl(turn_model, system="Be kind.", read=_replay(["first", KeyboardInterrupt(), " ", "second"]),
                         write=written.append, max_new_bytes=40)
    assert messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "Answer 1"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "Answer 2"},
    ]
    assert "[assistant] Answer 1<|end|>\n[user] second<|end|>\n[assistant] " in prompts[1]  # history re-read
    assert "".join(written) == "Answer 1\n\nAnswer 2\n\n"  # Ctrl-C at the prompt: a new line, nothing else


def test_repl_ctrl_c_stops_the_answer(eos_model):
    """SIGINT while an answer streams stops that answer; the chat goes on; the handler is restored after."""
    written = []

    def write(text):
        written.append(text)
        if len(written) == 3:  # a few characters into the first answer
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    messages = chat_repl(eos_model, read=_replay(["tell me a long story", "again"]), write=write,
                         max_new_bytes=400, eos=False)
    assert signal.getsignal(signal.SIGINT) is before
    first, second = messages[1]["content"], messages[3]["content"]
    assert 0 < len(first.encode()) < 40  # stopped within a few bytes of the signal
    assert len(second.encode()) > 300  # the next answer ran to its budget (EOS banned)
    assert "".join(written).startswith(first + STOPPED_NOTE + "\n")



# Seconds the `bytelift chat` child may take to show its prompt (10 s measured on 2 busy cores; far more when
# other jobs starve a niced test run of CPU).
CHILD_START_TIMEOUT = 600


def _read_until(fd: int, seen: bytearray, done, timeout: float) -> None:
    """Read the terminal into `seen` until `done(new bytes since the call)` holds (fail after `timeout` s)."""
    import select
    import time

    start, end = len(seen), time.monotonic() + timeout
    while not done(bytes(seen[start:])):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"timed out after {timeout} s; the terminal shows {bytes(seen)!r}")
        try:
            seen += os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            raise AssertionError(f"the terminal closed: {bytes(seen)!r}") from None


def test_cli_chat_in_a_terminal(eos_model, tmp_path):
    """`bytelift chat` as a person uses it: a pseudo-terminal, Ctrl-C (the terminal's ^C, a SIGINT) stops the
    streaming answer, the prompt comes back, Ctrl-D quits with status 0. (This model's greedy answer to
    "hello" runs ~1,500 bytes before an EOS: the ^C arrives long before it ends.)"""
    import pty
    import sys

    eos_model.save_pretrained(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pseudo-terminal is its controlling terminal
        os.execv(sys.executable, [sys.executable, "-m", "bytelift.cli", "chat", str(tmp_path), "--threads", "1"])
    prompt, seen, status = USER_PROMPT.encode(), bytearray(), None
    try:
        # The child imports torch and transformers and loads the model: seconds, minutes on a starved CPU.
        _read_until(fd, seen, lambda new: prompt in new, timeout=CHILD_START_TIMEOUT)
        os.write(fd, b"hello\r")
        _read_until(fd, seen, lambda new: len(new.partition(b"hello\r\n")[2]) >= 8, timeout=30)  # answer streams
        os.write(fd, b"\x03")
        _read_until(fd, seen, lambda new: STOPPED_NOTE.encode() + b"\r\n" + prompt in new, timeout=30)
        os.write(fd, b"\x04")
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
