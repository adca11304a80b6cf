"""Stage 1 and stage 2 on a tiny random source and a tiny corpus, through the real trainer."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from bytelift.modeling import ByteliftForCausalLM
from bytelift.training import TrainConfig, parameter_groups, train
from bytelift.training_callbacks import COMPLETE_MARKER, LOG_NAME, latest_complete_checkpoint
from tests.tiny_models import tiny_source

WORDS = "the quick brown fox jumps over lazy dog and cat while birds sing in trees near river bank".split()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, bytelevel_tokenizer):
    root = tmp_path_factory.mktemp("train")
    source = tiny_source("llama", bytelevel_tokenizer)
    source.save_pretrained(root / "source")
    bytelevel_tokenizer.save_pretrained(root / "source")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(60)))
    return root


def stage1_config(root, **overrides):
    values = dict(
        stage=1, source=str(root / "source"), data=[str(root / "corpus")], output=str(root / "s1"),
        window_tokens=32, batch_size=4, max_steps=24, logging_steps=4, save_steps=12, eval_steps=12,
        heldout_fraction=0.15, model={"local_heads": 4},
    )
    values.update(overrides)
    return TrainConfig(**values)


def read_log(folder):
    return [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]


def test_stage1_lowers_every_loss_and_learns_boundaries(tiny_run):
    # The plain RMS distance, so that "small" below is in the tiny source's own units (the relative form,
    # the default, is tested in test_losses).
    metrics = train(stage1_config(tiny_run, encoder_loss_relative=False))
    logs = [e for e in read_log(tiny_run / "s1") if "distill_loss" in e]
    first, last = logs[0], logs[-1]
    for key in ("boundary_loss", "ce_loss", "loss"):
        assert last[key] < first[key], key
    # The defaults start at the source: the output is the teacher's trie marginal (source prior, zero
    # decoder head) and the pooled patches are the source embeddings (token-exact initialisation), so the
    # distillation terms start near 0 and the encoder loss small; they stay there.
    assert first["distill_loss"] < 1e-3 and first["dense_distill_loss"] < 1e-2
    assert max(e["encoder_loss"] for e in logs) < 0.05
    assert max(e["distill_loss"] for e in logs) < 0.05 and max(e["dense_distill_loss"] for e in logs) < 0.05
    assert all(e["ce_decoder_only"] > e["ce_prior_only"] for e in logs)  # the decoder alone is far behind
    assert metrics["eval_boundary_f1"] >= 0.95
    # The boundary threshold was calibrated on the held-out windows (best F1, never worse than 1/2's) and
    # saved with the model.
    assert metrics["calibration_boundary_f1"] >= metrics["calibration_boundary_f1_before"]
    saved = json.loads((tiny_run / "s1" / "config.json").read_text())
    assert saved["boundary_threshold"] == pytest.approx(metrics["boundary_threshold"])
    assert metrics["corpus_documents"] > 0 and metrics["corpus_other_split"] > 0  # a held-out side exists
    # 40 small files at 15 %: too few for a per-document split; split by blocks, and recorded
    recorded = json.loads((tiny_run / "s1" / "corpus.json").read_text())["sources"]
    assert recorded[0]["split"] == "blocks" and recorded[0]["heldout_documents"] == metrics["corpus_other_split"]

    # Checkpoints are complete, rotated, and the output folder is a loadable byte model.
    ckpt = latest_complete_checkpoint(tiny_run / "s1")
    assert ckpt is not None and ckpt.endswith("checkpoint-24")
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "s1")
    assert isinstance(model, ByteliftForCausalLM)
    # The global model was frozen: it equals the source's transformer.
    source = AutoModelForCausalLM.from_pretrained(tiny_run / "source")
    torch.testing.assert_close(
        model.global_model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight
    )


def test_stage2_from_stage1_with_merges(tiny_run):
    if not (tiny_run / "s1" / "config.json").exists():
        train(stage1_config(tiny_run))
    cfg = TrainConfig(
        stage=2, init_from=str(tiny_run / "s1"), data=[str(tiny_run / "corpus")], output=str(tiny_run / "s2"),
        window_tokens=32, batch_size=2, max_steps=4, logging_steps=2, save_steps=4, eval_steps=4,
        heldout_fraction=0.15, target_bytes_per_patch=8.0, streaming=True,
    )
    metrics = train(cfg)
    logs = [e for e in read_log(tiny_run / "s2") if "ce_loss" in e]
    assert logs and all(k in logs[0] for k in ("ce_loss", "boundary_loss", "bytes_per_patch"))
    assert all(e["target_bytes_per_patch"] >= 7.5 for e in logs)  # merges reached (about) the target
    assert "eval_bits_per_byte" in metrics
    before = AutoModelForCausalLM.from_pretrained(tiny_run / "s1")
    after = AutoModelForCausalLM.from_pretrained(tiny_run / "s2")
    # The decoding threshold was calibrated and saved with the model (both stages).
    assert after.config.decode_boundary_bias == metrics["decode_boundary_bias"]
    assert metrics["decode_bytes_per_patch"] >= 1
    assert json.loads((tiny_run / "s1" / "train_metrics.json").read_text())["decode_boundary_bias"] == \
        before.config.decode_boundary_bias
    # Everything trains in stage 2, the global model included.
    assert not torch.equal(before.global_model.layers[0].mlp.up_proj.weight, after.global_model.layers[0].mlp.up_proj.weight)


def test_parameter_groups(tiny_run):
    from bytelift.training import build_objective

    cfg = TrainConfig(stage=2, init_from=str(tiny_run / "s1"), data=["x"], lr=1e-3)
    if not (tiny_run / "s1" / "config.json").exists():
        train(stage1_config(tiny_run))
    objective, _ = build_objective(cfg)
    groups = {g["name"]: g for g in parameter_groups(objective, cfg)}
    assert groups["global"]["lr"] == pytest.approx(5e-4) and groups["local"]["lr"] == pytest.approx(1e-3)
    assert groups["local_no_decay"]["weight_decay"] == 0.0 and groups["local"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed = {names[id(p)] for p in groups["local"]["params"]}
    assert not any("embedding" in n or "norm" in n for n in decayed)
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in objective.parameters() if p.requires_grad)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-9").mkdir()  # a save interrupted before its marker was written
    assert latest_complete_checkpoint(tmp_path).endswith("checkpoint-5")


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage=3)
    with pytest.raises(ValueError, match="no training data"):
        train(TrainConfig(stage=1, data=[], output=str(tmp_path)))
    with pytest.raises(ValueError, match="init_from"):
        from bytelift.training import build_objective

        build_objective(TrainConfig(stage=2, data=["x"]))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("stage: 2\nlr: 0.001\nwhat: 1\n")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_file(cfg_file)
    cfg_file.write_text("stage: 2\nlr: 0.001\n")
    cfg = TrainConfig.from_file(cfg_file, max_steps=7)
    assert cfg.stage == 2 and cfg.lr == 0.001 and cfg.global_lr == 0.0005 and cfg.max_steps == 7
    assert cfg.adam_beta2 == 0.95
    cfg_file.write_text("stage: 2\nlr: 2e-4\nseed: 3\ntext_field: 1e3x\n")  # PyYAML alone reads 2e-4 as a string
    cfg = TrainConfig.from_file(cfg_file)
    assert cfg.lr == 2e-4 and cfg.seed == 3 and cfg.text_field == "1e3x"


def test_wall_clock_schedule_follows_the_budget(monkeypatch):
    from transformers import TrainerControl

    from bytelift.training_callbacks import TimeBudget, wall_clock_schedule

    budget = TimeBudget(minutes=1.0)
    factor = wall_clock_schedule(budget, warmup_ratio=0.1)
    for spent, expected in ((3.0, 0.5), (6.0, 1.0), (33.0, 0.5), (60.0, 0.0), (90.0, 0.0)):
        monkeypatch.setattr("bytelift.training.time.time", lambda: budget.start + spent)
        budget.on_step_end(None, None, TrainerControl())
        assert factor(0) == pytest.approx(expected, abs=1e-9), spent
        assert budget.elapsed == pytest.approx(spent)


def test_run_sized_by_time_stops_and_saves(tiny_run, tmp_path):
    cfg = stage1_config(tiny_run, output=str(tmp_path / "timed"), max_steps=None, max_minutes=0.15,
                        save_steps=10**6, eval_steps=10**6, snapshot_minutes=[0.5, 0.03, 0.01],
                        snapshot_offset_minutes=0.02)
    metrics = train(cfg)
    logs = read_log(tmp_path / "timed")
    assert metrics["train_runtime"] < 0.15 * 60 + 30  # stopped by the clock (one step may run over)
    assert any(e.get("learning_rate", 0) > 0 for e in logs)
    final = ByteliftForCausalLM.from_pretrained(tmp_path / "timed")
    # Learning-curve snapshots: the mark inside the run (the clock starts at the 0.02 min offset), none for
    # the mark before the offset nor for the one after the run; each a loadable byte model of its step.
    snaps = tmp_path / "timed" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["minute-0.03"]
    info = json.loads((snaps / "minute-0.03" / "snapshot.json").read_text())
    assert info["minute"] >= 0.03 and info["step"] >= 1
    snap = ByteliftForCausalLM.from_pretrained(snaps / "minute-0.03")
    assert info["step"] < max(e["step"] for e in logs)  # saved mid-run: training went on after it
    assert not torch.equal(snap.encoder.byte_embedding.weight, final.encoder.byte_embedding.weight)
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_steps=None)


@pytest.mark.parametrize("mode", ["ddp", "ddp_timed", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_stay_in_sync(mode, tiny_run, tmp_path):
    import os
    import subprocess
    import sys

    import socket

    out = tmp_path / mode
    with socket.socket() as sock:  # a free port: fixed ones collide with other runs on the same machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # Sized by time: every rank must stop at the same step and follow the same LR (synchronised clocks).
    size = ["--set", "max_steps=null", "--set", "max_minutes=0.15"] if mode == "ddp_timed" else ["--max-steps", "3"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
        "-m", "bytelift.cli", "train", "--stage", "1", "--source", str(tiny_run / "source"),
        "--data", str(tiny_run / "corpus"), "--output", str(out), *size, "--batch-size", "2",
        "--window-tokens", "32", "--set", "model={local_heads: 4}", "--set", "save_steps=3", "--set", "eval_steps=3",
        "--set", f"fsdp={str(mode == 'fsdp').lower()}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["ranks_in_sync"] is True
    # The decoding threshold is calibrated on each rank's whole model; FSDP's shards cannot decode.
    assert ("decode_boundary_bias" in metrics) == (mode != "fsdp")
    if mode == "ddp_timed":
        assert metrics["train_runtime"] < 0.15 * 60 + 60
        return
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # The saved model is whole (not a shard) and its frozen global model is still the source's.
    trained = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(tiny_run / "source")
    torch.testing.assert_close(trained.global_model.layers[1].mlp.down_proj.weight, source.model.layers[1].mlp.down_proj.weight)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    """A run killed with SIGKILL after a checkpoint and resumed ends where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out):
        return [
            sys.executable, "-m", "bytelift.cli", "train", "--stage", "1", "--source", str(tiny_run / "source"),
            "--data", str(tiny_run / "corpus"), "--output", str(out), "--max-steps", "8", "--batch-size", "2",
            "--window-tokens", "32", "--set", "model={local_heads: 4}", "--set", "save_steps=4",
            "--set", "logging_steps=1", "--set", "heldout_fraction=0", "--resume",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(command(reference), check=True, capture_output=True, timeout=600, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / COMPLETE_MARKER).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()  # it really died before finishing
    subprocess.run(command(killed), check=True, capture_output=True, timeout=600, env=env)

    def losses(out):
        return {e["step"]: e["loss"] for e in read_log(out) if "distill_loss" in e}

    ref, res = losses(reference), losses(killed)
    assert set(range(5, 9)) <= set(res)  # the resumed run logged steps 5..8
    for step in range(5, 9):
        assert res[step] == pytest.approx(ref[step], rel=1e-3), step
