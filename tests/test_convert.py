"""`bytelift convert` end to end on a tiny random source and a tiny corpus; the real default run is slow."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from transformers import AutoModelForCausalLM

from bytelift.checks import UsageError
from bytelift.cli import main
from bytelift.convert import STATE_FILE, ConvertConfig, convert
from bytelift.evaluation.runner import EvalConfig
from bytelift.evaluation.tasks import SAMPLE_PROMPTS
from bytelift.evaluation.timing import section_items
from tests.tiny_models import tiny_source

WORDS = "the quick brown fox jumps over lazy dog and cat while birds sing in trees near river bank".split()
TINY_EVAL = EvalConfig(heldout_docs=3, lambada=2, hellaswag=2, cute_per_task=1, basic_skills=1)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory, bytelevel_tokenizer):
    root = tmp_path_factory.mktemp("convert")
    source = tiny_source("qwen2", bytelevel_tokenizer, context=1024)
    source.save_pretrained(root / "source")
    bytelevel_tokenizer.save_pretrained(root / "source")
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(80):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    cfg = ConvertConfig(
        source=str(root / "source"), data=[str(root / "corpus.jsonl")], output=str(root / "out"),
        stage1_steps=6, stage2_steps=5, window_tokens=32, heldout_fraction=0.1, eval=TINY_EVAL,
        model={"local_heads": 4}, samples=("Hello", "The"), sample_bytes=8, snapshot_minutes=(1e-4,),
        stage1_train={"logging_steps": 2}, stage2_train={"lr": 3e-4, "predictor_lr_scale": 2.0},
    )
    # A conversion interrupted before it started anything: --resume starts it afresh.
    (root / "out").mkdir()
    (root / "out" / STATE_FILE).write_text(json.dumps({"done": {}, "minutes": {}}))
    lines: list[str] = []
    result = convert(dataclasses.replace(cfg, resume=True), log=lines.append)
    return root, cfg, result, lines


def test_convert_end_to_end(tiny_job):
    root, cfg, result, lines = tiny_job
    out = root / "out"
    model = AutoModelForCausalLM.from_pretrained(out)  # the final model loads with the Auto class
    assert type(model).__name__ == "ByteliftForCausalLM"
    assert model.tokenizer is not None
    state = json.loads((out / STATE_FILE).read_text())
    assert set(state["done"]) == {"corpus", "stage1", "stage2", "final", "eval", "samples"}
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["items"]["lambada"] == 2 and "bits_per_byte_ratio" in report["heldout"]
    assert report["items"]["loops"] == len(SAMPLE_PROMPTS) == len(report["loops"]["samples"])
    # The reserve's cost model counts the items the evaluation scored (held-out: at most its documents).
    counted = section_items(TINY_EVAL)
    assert {k: v for k, v in report["items"].items() if k != "heldout"} == {k: v for k, v in counted.items() if k != "heldout"}
    assert 0 < report["items"]["heldout"] <= counted["heldout"]
    assert any(line.startswith("evaluation reserve: ") for line in lines)  # estimated: eval_minutes not given
    assert (out / "report" / "report.md").read_text().startswith("# bytelift evaluation")
    assert (out / "report" / "training_curves.png").is_file()  # stage1/ and stage2/ logs were found
    assert "**'Hello'**" in (out / "samples.md").read_text()
    assert any("| HellaSwag acc_norm |" in line for line in lines)
    # Before training: the corpus per source, its split, the text it holds for the run; the split recorded.
    first_stage = next(i for i, line in enumerate(lines) if line.startswith("stage 1"))
    report = "\n".join(lines[:first_stage])
    assert "corpus: 1 source, 1 file, 80 documents" in report and "held out by blocks" in report
    assert "stage 1: 6 steps read 24 windows" in report
    recorded = json.loads((out / "corpus.json").read_text())["sources"][0]
    assert recorded["split"] == "blocks" and recorded["heldout_documents"] >= 1 and recorded["heldout_digest"]
    # Stage 2 started from stage 1's weights, not from a fresh conversion.
    s2 = json.loads((out / "stage2" / "bytelift_train_config.json").read_text())
    assert s2["init_from"] == str(out / "stage1") and s2["stage"] == 2
    # The per-stage overrides reach their stage, over the job's own settings (it logs every 5 steps).
    s1 = json.loads((out / "stage1" / "bytelift_train_config.json").read_text())
    assert s1["logging_steps"] == 2 and s2["logging_steps"] == 5
    assert (s2["lr"], s2["predictor_lr_scale"], s2["global_lr"]) == (3e-4, 2.0, 1.5e-4)
    assert s1["predictor_lr_scale"] == 10.0
    # One clock for the snapshots: stage 2 counts on from stage 1's training time, so the mark that stage 1
    # passed at its first step is kept once, in stage 1.
    assert s2["snapshot_offset_minutes"] == pytest.approx(state["done"]["stage1"]["train_runtime"] / 60)
    assert [p.name for p in (out / "stage1" / "snapshots").iterdir()] == ["minute-0.0001"]
    assert not (out / "stage2" / "snapshots").exists()


def test_convert_refuses_to_overwrite_and_resumes(tiny_job):
    root, cfg, result, _ = tiny_job
    with pytest.raises(UsageError, match="holds an earlier conversion: continue it with --resume"):
        convert(cfg, log=lambda s: None)
    before = (root / "out" / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    again = convert(ConvertConfig(**{**cfg.__dict__, "resume": True}), log=lines.append)
    assert (root / "out" / "model.safetensors").stat().st_mtime_ns == before  # nothing retrained
    assert not any(line.startswith("stage 1") for line in lines)
    assert again["report"]["heldout"] == result["report"]["heldout"]


def test_convert_resumes_an_interrupted_stage(tiny_job, tmp_path):
    """A run whose stage 2 never finished: --resume keeps stage 1 and only trains stage 2."""
    root, cfg, _, _ = tiny_job
    import shutil

    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    state = json.loads((out / STATE_FILE).read_text())
    for step in ("stage2", "final", "eval", "samples"):
        state["done"].pop(step)
    (out / STATE_FILE).write_text(json.dumps(state))
    stage1_weights = (out / "stage1" / "model.safetensors").read_bytes()
    lines: list[str] = []
    convert(ConvertConfig(**{**cfg.__dict__, "output": str(out), "resume": True}), log=lines.append)
    assert (out / "stage1" / "model.safetensors").read_bytes() == stage1_weights
    assert any(line.startswith("stage 2") for line in lines)
    assert not any(line.startswith("stage 1") for line in lines)


def test_convert_stage2_from_a_given_stage1_with_merged_patches(tiny_job, tmp_path):
    """--stage1-from skips stage 1 (its budget goes to stage 2); --bytes-per-patch makes stage 2 train on
    merged patches: its logged boundary targets hold more bytes per patch than the plain run's."""
    root, cfg, _, _ = tiny_job
    stage1 = root / "out" / "stage1"
    out = tmp_path / "merged"
    lines: list[str] = []
    convert(ConvertConfig(**{**cfg.__dict__, "output": str(out), "model": {}, "stage1_from": str(stage1),
                             "target_bytes_per_patch": 12.0, "stage2_train": {}, "stage2_lr": 1e-4}),
            log=lines.append)
    assert not (out / "stage1").exists()
    state = json.loads((out / STATE_FILE).read_text())
    assert state["done"]["stage1"] == {"from": str(stage1)}
    s2 = json.loads((out / "stage2" / "bytelift_train_config.json").read_text())
    assert s2["init_from"] == str(stage1) and s2["target_bytes_per_patch"] == 12.0
    assert (s2["lr"], s2["global_lr"]) == (1e-4, 5e-5)  # the job's stage-2 rate, the global model's half of it

    def target_ratio(folder):
        rows = [json.loads(line) for line in (folder / "stage2" / "log.jsonl").read_text().splitlines()]
        return [r["target_bytes_per_patch"] for r in rows if "target_bytes_per_patch" in r]

    plain, merged = target_ratio(root / "out"), target_ratio(out)
    assert plain and merged and min(merged) > max(plain) + 1.0
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_convert_stage1_from_checks(tiny_job, tmp_path):
    root, cfg, _, _ = tiny_job
    with pytest.raises(UsageError, match="not a model folder"):
        convert(ConvertConfig(**{**cfg.__dict__, "output": str(tmp_path / "a"), "model": {},
                                 "stage1_from": str(tmp_path)}), log=lambda s: None)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(UsageError, match="stage-1 model"):  # overrides would be silently ignored
        convert(ConvertConfig(**{**cfg.__dict__, "output": str(tmp_path / "b"),
                                 "stage1_from": str(root / "out" / "stage1")}), log=lambda s: None)
    assert not (tmp_path / "b").exists()


def test_convert_failing_before_anything_resumable_leaves_nothing(tiny_job, tmp_path, monkeypatch):
    """A conversion that fails after its checks but before a training stage finished or saved a checkpoint
    removes the folder it created; one that found the folder already there leaves it."""
    import bytelift.training

    root, cfg, _, _ = tiny_job

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bytelift.training, "train", failing)
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="out of memory"):
        convert(dataclasses.replace(cfg, output=str(out)), log=lambda s: None)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(RuntimeError, match="out of memory"):
        convert(dataclasses.replace(cfg, output=str(out)), log=lambda s: None)
    assert (out / STATE_FILE).is_file()  # not created by this call: kept (and resumable as a fresh start)


@pytest.mark.parametrize("stage_train, error", [
    ({"output": "elsewhere"}, r"stage1_train cannot set \['output'\]: the conversion sets them itself"),
    ({"lrr": 1e-3}, r"unknown training option\(s\) \['lrr'\] in stage1_train"),
    ({"lr": 0}, r"lr must be a number > 0"),
])
def test_convert_refuses_bad_stage_options_before_running(stage_train, error, tmp_path):
    with pytest.raises(UsageError, match=error):
        ConvertConfig(output=str(tmp_path / "out"), stage1_train=stage_train)
    assert not (tmp_path / "out").exists()


def test_cli_convert_passes_the_stage2_options(monkeypatch, tmp_path):
    import bytelift.convert

    seen = {}
    monkeypatch.setattr(bytelift.convert, "convert", lambda cfg: seen.__setitem__("cfg", cfg))
    assert main(["convert", "--output", str(tmp_path), "--stage1-from", "s1", "--bytes-per-patch", "7.5"]) == 0
    assert seen["cfg"].stage1_from == "s1" and seen["cfg"].target_bytes_per_patch == 7.5
    assert main(["convert", "--output", str(tmp_path), "--snapshot-minutes", "5,12.5",
                 "--model-set", "source_prior=false", "--model-set", "local-heads=2"]) == 0
    assert seen["cfg"].snapshot_minutes == (5.0, 12.5) and seen["cfg"].model == {"source_prior": False, "local_heads": 2}
    assert main(["convert", "--output", str(tmp_path), "--stage1-share", "0.4", "--stage1-set", "lr=1e-3",
                 "--stage2-set", "global-lr=2e-5", "--stage2-set", "boundary_loss_weight=2"]) == 0
    assert seen["cfg"].stage1_share == 0.4 and seen["cfg"].stage1_train == {"lr": 1e-3}
    assert seen["cfg"].stage2_train == {"global_lr": 2e-5, "boundary_loss_weight": 2}
    with pytest.raises(SystemExit):  # a non-positive minute is a usage error
        main(["convert", "--snapshot-minutes", "0,5"])


def test_cli_eval_and_show(tiny_job, tmp_path, capsys, monkeypatch):
    import bytelift.evaluation.tasks as tasks

    root, cfg, _, _ = tiny_job
    out = root / "out"
    reads = []  # the held-out documents are read once: checked before the models load, then scored
    monkeypatch.setattr(tasks, "heldout_texts", lambda *a, _read=tasks.heldout_texts, **k: reads.append(a) or _read(*a, **k))
    rc = main(["eval", str(out), "--source", cfg.source, "--report", str(tmp_path / "r"), "--data", cfg.data[0],
               "--heldout-fraction", "0.1", "--heldout-docs", "2", "--lambada", "1", "--hellaswag", "1",
               "--cute-per-task", "0", "--basic-skills", "1", "--loop-bytes", "8"])
    assert rc == 0
    assert (tmp_path / "r" / "report.md").is_file() and len(reads) == 1
    assert "| LAMBADA greedy last-word accuracy |" in capsys.readouterr().out
    loops = json.loads((tmp_path / "r" / "report.json").read_text())["loops"]
    assert loops["criterion"]["new_bytes"] == 8
    assert all(len(s[name]["text"].encode()) <= 8 for s in loops["samples"] for name in ("byteified", "source"))
    rc = main(["show", str(out), "the quick brown fox", "--no-color", "--html", str(tmp_path / "v.html")])
    assert rc == 0 and "<html" in (tmp_path / "v.html").read_text().lower()
    assert main(["eval", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_default_convert_on_smollm2(tmp_path):
    """The real main job with its defaults (measured 26.8 and 29.5 minutes on two machines, 2 quiet CPU cores)."""
    result = convert(ConvertConfig(output=str(tmp_path / "smollm2")))
    assert result["minutes"] <= 31
    report = result["report"]
    # Measured: F1 0.974, ratio 1.012 (the conversion before training: ratio 2.04).
    assert report["heldout"]["boundaries"]["f1"] > 0.95
    assert report["heldout"]["bits_per_byte_ratio"] < 1.2
    assert report["lambada"]["accuracy"]["source"] > 0.2  # the source side is scored right
