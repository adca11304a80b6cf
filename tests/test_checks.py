"""bytelift.checks: prompts against the global model's context, argument types, one-line command errors
(the command-by-command table of hostile input is tests/test_cli.py)."""

from __future__ import annotations

import argparse

import pytest

from bytelift.checks import (
    ContextError,
    UsageError,
    check_number,
    fit_prompts,
    predicted_patch_ends,
    probability,
    run_command,
)
from bytelift.modeling import ByteliftForCausalLM
from tests.tiny_models import tiny_source

WORDS = "the quick brown fox jumps over lazy dog and cat while birds sing in trees near river bank".split()


@pytest.fixture(scope="module")
def model(bytelevel_tokenizer):
    source = tiny_source("qwen2", bytelevel_tokenizer, context=128)
    return ByteliftForCausalLM.from_source(source, bytelevel_tokenizer, local_heads=4, decoder_layers=1).eval()


def test_prompts_within_the_context_are_left_alone_untokenized(model, monkeypatch):
    short = "x" * 127  # 127 bytes + bos = 128 patches at most: fits whatever the segmentation
    monkeypatch.setattr(model.tokenizer, "source_tokenizer", _Refusing(model.tokenizer.source_tokenizer))
    assert fit_prompts(model, [short, "hi"], max_new_bytes=8) == [short, "hi"]


class _Refusing:
    """A tokenizer that must not be called (the byte count alone decides), but is there."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        raise AssertionError("a prompt shorter than the context was tokenized")


@pytest.mark.usefixtures("one_thread")
def test_a_long_prompt_is_refused_or_cut_from_the_left_to_fit(model):
    long = " ".join(WORDS[i % len(WORDS)] + str(i) for i in range(600))
    with pytest.raises(UsageError, match=r"prompt 1 is [\d,]+ bytes, .*context of 128 patches; .*--truncate to keep "
                                         r"its last 119 tokens"):
        fit_prompts(model, ["fine", long], max_new_bytes=8)
    fine, cut = fit_prompts(model, ["fine", long], max_new_bytes=8, truncate=True)
    assert fine == "fine" and long.endswith(cut) and len(cut) < len(long)
    # it fits by the model's own patches (an untrained predictor makes more of them than the source has
    # tokens), leaving room for the 8 new bytes
    assert int(predicted_patch_ends(model, cut.encode())[:-1].sum()) <= 128 - 8
    assert model.generate(cut, max_new_bytes=8, return_dict=True).num_new_bytes.item() == 8
    with pytest.raises(ContextError, match="patches but the global model's context holds 128"):
        model.generate(long[-2000:], max_new_bytes=1)  # refused by decoding, in one line: a UsageError


def test_numbers_and_argument_types_say_what_they_expect():
    check_number("batch_size", 3, 1)
    check_number("max_steps", None, 1, optional=True)
    for value in (0, -1, float("nan"), "8", True):
        with pytest.raises(UsageError, match=r"^batch_size must be a number ≥ 1, got"):
            check_number("batch_size", value, 1)
    with pytest.raises(UsageError, match=r"must be a number > 0 and < 1, got 1"):
        check_number("heldout_fraction", 1, 0, 1, low_open=True, high_open=True)
    assert probability("1") == 1.0
    for bad in ("0", "1.01", "x", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"expected a number > 0 and ≤ 1, got '{bad}'"):
            probability(bad)


def test_run_command_turns_usage_errors_into_one_line(capsys, monkeypatch):
    def refuse(args):
        raise UsageError("no model folder nope\n(details)")

    def missing(args):
        open("/nonexistent/file")

    assert run_command(refuse, None, "bytelift x") == 2
    assert capsys.readouterr().err == "bytelift x: no model folder nope (details)\n"
    assert run_command(missing, None, "bytelift x") == 2
    assert capsys.readouterr().err == "bytelift x: /nonexistent/file: No such file or directory\n"
    monkeypatch.setenv("BYTELIFT_TRACEBACK", "1")
    with pytest.raises(UsageError):
        run_command(refuse, None, "bytelift x")

    def bug(args):
        raise KeyError("a bug is not a usage error")

    with pytest.raises(KeyError):  # bugs keep their traceback
        run_command(bug, None, "bytelift x")
