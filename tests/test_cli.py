"""Hostile input for every `bytelift` command: each refused in one line on stderr, with its message and exit
code, no traceback, and nothing left behind where the command refused (tiny models only)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from bytelift.cli import main
from bytelift.modeling import ByteliftForCausalLM
from tests.tiny_models import tiny_source

WORDS = "the quick brown fox jumps over lazy dog and cat while birds sing in trees near river bank".split()
CONTEXT = 256  # the tiny source's context: its byte model's global model holds 256 patches


@pytest.fixture(scope="module")
def files(tmp_path_factory, bytelevel_tokenizer):
    """The inputs of the table: a tiny source and its byte model, corpora good and bad, folders of every
    kind (keys are the table's placeholders)."""
    root = tmp_path_factory.mktemp("cli")
    source = tiny_source("qwen2", bytelevel_tokenizer, context=CONTEXT)
    source.save_pretrained(root / "source")
    bytelevel_tokenizer.save_pretrained(root / "source")
    model = ByteliftForCausalLM.from_source(str(root / "source"), local_heads=4, decoder_layers=1)
    model.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    (root / "small.txt").write_text("a few words only\n" * 20)
    (root / "empty.txt").write_text("")
    (root / "bad.txt").write_bytes(b"good \xff\xfe bad")
    (root / "notes.md").write_text("markdown")
    (root / "x.gguf").write_text("not a GGUF file")
    (root / "empty_dir").mkdir()
    (root / "md_dir").mkdir()
    (root / "md_dir" / "a.md").write_text("markdown")
    (root / "busy").mkdir()
    (root / "busy" / "mine.txt").write_text("a user's file")
    trained = root / "trained"  # a finished training run
    (trained / "checkpoint-3").mkdir(parents=True)
    (trained / "checkpoint-3" / "checkpoint_complete.json").write_text("{}")
    (trained / "config.json").write_text("{}")
    conversion = root / "conversion"  # a conversion interrupted in stage 1
    conversion.mkdir()
    (conversion / "convert_state.json").write_text(json.dumps({"done": {"corpus": True}, "minutes": {"corpus": 0}}))
    (root / "corrupt_conversion").mkdir()
    (root / "corrupt_conversion" / "convert_state.json").write_text('{"done": ')  # a state cut mid-write
    half = root / "half_model"  # a save interrupted while writing the weights
    shutil.copytree(root / "model", half)
    weights = half / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    paths = {k: str(root / k) for k in ("source", "model", "corpus.jsonl", "small.txt", "empty.txt", "bad.txt",
                                        "notes.md", "empty_dir", "md_dir", "busy", "trained", "conversion",
                                        "corrupt_conversion", "half_model")}
    return {"tmp": str(root), **{k.replace(".", "_"): v for k, v in paths.items()},
            "long": " ".join(rng.choice(WORDS) for _ in range(2000))}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `bytelift ARGV` run in this process (argparse exits through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


PROGRESS_BAR = re.compile(r"\d+%\|")  # "Loading weights: 100%|███| 68/68" (a model loaded before the refusal)
TRAIN = "train --source {source} --data {corpus_jsonl} --output {tmp}/out --max-steps 2 --window-tokens 16"
CONVERT = "convert --source {source} --data {corpus_jsonl} --output {tmp}/out --stage1-steps 1 --stage2-steps 1"

# (command line, expected message (regex, searched in the one stderr line), paths that must not exist after)
CASES = {
    # --- generate
    "generate/no-model": ("generate", r"^bytelift generate: give a MODEL folder \(or --source NAME\)$", []),
    "generate/missing-model": ("generate {tmp}/nope hi", r"^bytelift generate: no model folder \S+/nope$", []),
    "generate/source-not-byte-model": ("generate {source} hi", r"holds a 'qwen2' model, not a bytelift model", []),
    "generate/folder-without-config": ("generate {empty_dir} hi", r"empty_dir is not a model folder: it has no config.json", []),
    "generate/file-as-model": ("generate {empty_txt} hi", r"empty.txt is a file, not a model folder", []),
    "generate/half-written-weights": ("generate {half_model} hi", r"model.safetensors is truncated or corrupt", []),
    "generate/negative-bytes": ("generate {model} hi --max-new-bytes -5",
                                r"argument --max-new-bytes: expected an integer ≥ 0, got '-5'", []),
    "generate/zero-batch": ("generate {model} hi --batch-size 0", r"argument --batch-size: expected an integer ≥ 1, got '0'", []),
    "generate/top-p": ("generate {model} hi --top-p 1.5", r"argument --top-p: expected a number > 0 and ≤ 1, got '1.5'", []),
    "generate/nan-temperature": ("generate {model} hi --temperature nan", r"argument --temperature: expected a number > 0, got 'nan'", []),
    "generate/missing-prompt-file": ("generate {model} --file {tmp}/none.txt", r"no prompt file \S+none.txt$", []),
    "generate/prompt-file-is-folder": ("generate {model} --file {empty_dir}", r"prompt file \S+empty_dir is a folder, not a file", []),
    "generate/prompt-over-context": ("generate {model} {long}",
                                     r"prompt 0 is [\d,]+ bytes, about [\d,]+ patches \(its source tokens\), more than the "
                                     r"global model's context of 256 patches; shorten it, or pass --truncate to keep its last 127 tokens$", []),
    "generate/unknown-source": ("generate --source {tmp}/nope hi", r"no source model \S+nope: not a packaged name", []),
    # --- tokenize, info
    "tokenize/unknown-source": ("tokenize x --source {tmp}/nope", r"^bytelift tokenize: no source model", []),
    "info/folder-without-config": ("info --source {empty_dir}", r"empty_dir is not a Hugging Face model folder \(no config.json\)", []),
    "info/byte-model-as-source": ("info --source {model}", r"model is a bytelift model already; give the source model", []),
    "info/missing-gguf": ("info --source {tmp}/m.gguf", r"no GGUF file \S+m.gguf", []),
    "info/not-gguf": ("info --source {tmp}/x.gguf", r"x.gguf is not a GGUF file", []),
    # --- train
    "train/missing-data": (TRAIN.replace("{corpus_jsonl}", "{tmp}/missing.txt"), r"corpus path does not exist: \S+missing.txt", ["out"]),
    "train/empty-file": (TRAIN.replace("{corpus_jsonl}", "{empty_txt}"), r"corpus path \S+empty.txt has no usable text", ["out"]),
    "train/invalid-utf8": (TRAIN.replace("{corpus_jsonl}", "{bad_txt}"),
                           r"bad.txt is not UTF-8 at byte 5 \(invalid start byte\); --errors replace reads it with U\+FFFD", ["out"]),
    "train/unsupported-file": (TRAIN.replace("{corpus_jsonl}", "{notes_md}"),
                               r"unsupported corpus file \S+notes.md: expected one of .*--text-suffixes .md reads it", ["out"]),
    "train/folder-without-corpus": (TRAIN.replace("{corpus_jsonl}", "{md_dir}"), r"md_dir holds no corpus file .*found: .md \(1\)", ["out"]),
    "train/wrong-text-field": (TRAIN + " --text-field body", r"corpus.jsonl line 1 has no field 'body'", ["out"]),
    "train/negative-steps": (TRAIN + " --max-steps -1", r"argument --max-steps: expected an integer ≥ 1, got '-1'", ["out"]),
    "train/bad-errors-choice": (TRAIN + " --errors bogus", r"argument --errors: invalid choice: 'bogus'", ["out"]),
    "train/stage2-without-init": ("train --stage 2 --data {corpus_jsonl} --output {tmp}/out",
                                  r"stage 2 starts from a stage-1 model: pass --init-from", ["out"]),
    "train/stage2-missing-init": ("train --stage 2 --init-from {tmp}/nope --data {corpus_jsonl} --output {tmp}/out",
                                  r"no model folder \S+nope", ["out"]),
    "train/unknown-option": (TRAIN + " --set nonsense=1", r"unknown training option\(s\) \['nonsense'\]", ["out"]),
    "train/option-out-of-range": (TRAIN + " --set heldout_fraction=2", r"heldout_fraction must be a number ≥ 0 and < 1, got 2", ["out"]),
    "train/model-option-out-of-range": (TRAIN.split() + ["--set", "model={{local_heads: 7}}"],
                                        r"local_hidden_size=64 must be divisible by 2·local_heads=14", ["out"]),
    "train/unknown-model-option": (TRAIN.split() + ["--set", "model={{heads: 4}}"],
                                   r"unknown model option\(s\) \['heads'\]: the options are ByteliftConfig's fields", ["out"]),
    "train/set-without-value": (TRAIN + " --set foo", r"--set expects KEY=VALUE, got 'foo'", ["out"]),
    "train/unknown-source": (TRAIN.replace("{source}", "{tmp}/nope"), r"no source model", ["out"]),
    "train/too-little-text": (TRAIN.replace("{corpus_jsonl}", "{small_txt}"),
                              r"too little training text: 340 bytes, about \d+ tokens of the source tokenizer; this run needs "
                              r"at least 512 tokens \(about [\d,.]+ \w+\): 8 batches of 4 windows of 16 tokens", ["out"]),
    "train/output-is-file": (TRAIN.replace("{tmp}/out", "{empty_txt}"), r"output folder \S+empty.txt is a file, not a folder", []),
    "train/finished-run-without-resume": (TRAIN.replace("{tmp}/out", "{trained}"),
                                          r"trained holds a training run \(checkpoint-3, config.json\): continue it with --resume", []),
    "train/missing-config-file": (TRAIN + " --config {tmp}/none.yaml", r"no config file \S+none.yaml", ["out"]),
    "train/weights-per-path": (TRAIN + " --weights 1 2", r"1 corpus path\(s\) but 2 weight\(s\)", ["out"]),
    "train/negative-weight": (TRAIN + " --weights -1", r"argument --weights: expected a number > 0, got '-1'", ["out"]),
    # --- convert
    "convert/missing-data": (CONVERT.replace("{corpus_jsonl}", "{tmp}/x.txt"), r"^bytelift convert: corpus path does not exist: \S+x.txt$", ["out"]),
    "convert/invalid-utf8": (CONVERT.replace("{corpus_jsonl}", "{bad_txt}"), r"bad.txt is not UTF-8 at byte 5", ["out"]),
    "convert/zero-budget": (CONVERT + " --budget-minutes 0", r"argument --budget-minutes: expected a number > 0, got '0'", ["out"]),
    "convert/no-heldout": (CONVERT + " --heldout-fraction 0", r"argument --heldout-fraction: expected a number > 0 and < 1", ["out"]),
    "convert/unknown-source": (CONVERT.replace("{source}", "{tmp}/nope"), r"no source model", ["out"]),
    "convert/stage1-from-not-model": (CONVERT + " --stage1-from {empty_dir}", r"empty_dir is not a model folder", ["out"]),
    "convert/earlier-conversion": (CONVERT.replace("{tmp}/out", "{conversion}"),
                                   r"conversion holds an earlier conversion: continue it with --resume or choose another --output", []),
    "convert/folder-of-other-files": (CONVERT.replace("{tmp}/out", "{busy}"),
                                      r"busy is not empty and holds no conversion \(convert_state.json\)", []),
    "convert/corrupt-state": (CONVERT.replace("{tmp}/out", "{corrupt_conversion}") + " --resume",
                              r"corrupt_conversion/convert_state.json is corrupt", []),
    "convert/too-little-text": (CONVERT.replace("{corpus_jsonl}", "{small_txt}"), r"too little training text", ["out"]),
    "convert/job-owned-stage-option": (CONVERT + " --stage2-set output=x", r"stage2_train cannot set \['output'\]", ["out"]),
    "convert/unknown-stage-option": (CONVERT + " --stage1-set nope=1", r"unknown training option\(s\) \['nope'\] in stage1_train", ["out"]),
    "convert/stage1-share": (CONVERT + " --stage1-share 1", r"argument --stage1-share: expected a number > 0 and < 1", ["out"]),
    "convert/bytes-per-patch": (CONVERT + " --bytes-per-patch 0.5", r"expected a number ≥ 1, got '0.5'", ["out"]),
    # --- eval
    "eval/missing-model": ("eval {tmp}/nope", r"^bytelift eval: no model folder", []),
    "eval/source-not-byte-model": ("eval {source}", r"holds a 'qwen2' model, not a bytelift model", []),
    "eval/heldout-fraction": ("eval {model} --heldout-fraction 1.5", r"argument --heldout-fraction: expected a number > 0 and < 1", []),
    "eval/negative-count": ("eval {model} --lambada -1", r"argument --lambada: expected an integer ≥ 0, got '-1'", []),
    "eval/missing-data": ("eval {model} --data {tmp}/x.txt --report {tmp}/report", r"corpus path does not exist", ["report"]),
    "eval/invalid-utf8": ("eval {model} --data {bad_txt} --report {tmp}/report", r"bad.txt is not UTF-8 at byte 5", ["report"]),
    "eval/report-is-file": ("eval {model} --report {empty_txt}", r"report folder \S+empty.txt is a file", []),
    "eval/no-such-device": ("eval {model} --device cuda:7 --report {tmp}/report", r"CUDA is not available|device", ["report"]),
    # --- calibrate
    "calibrate/missing-model": ("calibrate {tmp}/nope", r"^bytelift calibrate: no model folder", []),
    "calibrate/zero-docs": ("calibrate {model} --docs 0", r"argument --docs: expected an integer ≥ 1", []),
    "calibrate/nan-bias": ("calibrate {model} --bias nan", r"argument --bias: expected a number, got 'nan'", []),
    "calibrate/invalid-utf8": ("calibrate {model} --data {bad_txt}", r"bad.txt is not UTF-8 at byte 5", []),
    "calibrate/empty-data": ("calibrate {model} --data {empty_txt}", r"has no usable text", []),
    # --- show
    "show/missing-model": ("show {tmp}/nope text", r"^bytelift show: no model folder", []),
    "show/empty-text": (["show", "{model}", ""], r"the text is empty", []),
    "show/html-in-missing-folder": ("show {model} hi --html {tmp}/nowhere/x.html",
                                    r"cannot write HTML file \S+x.html: the folder \S+nowhere does not exist", ["nowhere"]),
    "show/zero-width": ("show {model} hi --width 0", r"argument --width: expected an integer ≥ 1", []),
    "show/text-over-context": ("show {model} {long}", r"global model's context is 256 patches; shorten the text", []),
    # --- the command itself
    "bytelift/unknown-command": ("nosuchcommand", r"^bytelift: argument COMMAND: invalid choice: 'nosuchcommand'", []),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_in_one_line(case, files, capsys):
    line, pattern, absent = CASES[case]
    argv = [arg.format(**files) for arg in (line.split() if isinstance(line, str) else line)]
    config_before = (files["model"] + "/config.json", open(files["model"] + "/config.json").read())
    states = {k: open(f"{files[k]}/convert_state.json").read() for k in ("conversion", "corrupt_conversion")}
    code, err = run(argv, capsys)
    assert code == 2, (code, err)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert "Traceback" not in err and len(lines) == 1, err
    line = lines[0]
    assert re.search(pattern, line), line
    if ": argument " in line:  # argparse's errors end with where to look
        assert line.endswith(f"(see {line.split(':')[0]} --help)")
    for name in absent:  # refused before anything was written
        assert not os.path.exists(os.path.join(files["tmp"], name)), name
    # what a refused command found stays as it was
    assert open(config_before[0]).read() == config_before[1]
    assert {k: open(f"{files[k]}/convert_state.json").read() for k in states} == states
    assert sorted(p.name for p in Path(files["busy"]).iterdir()) == ["mine.txt"]


def test_generate_truncates_a_long_prompt_from_the_left(files, capsys, one_thread):
    code = main(["generate", files["model"], files["long"], "--truncate", "--max-new-bytes", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() != "", err[-2000:]


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import bytelift.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bytelift.cli, "_cmd_info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "bytelift info: interrupted"
