"""The evaluation's time estimate (the main job's reserve): items × reference seconds, scaled by the CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest

import bytelift.evaluation.timing as timing
from bytelift.convert import ConvertConfig, eval_reserve
from bytelift.evaluation.runner import EvalConfig


def test_estimate_is_linear_in_items_and_in_slowdown():
    cfg = EvalConfig()
    base = timing.estimated_eval_minutes(cfg)
    fixed = timing.estimated_eval_minutes(EvalConfig(heldout_docs=0, lambada=0, hellaswag=0, cute_per_task=0,
                                                     basic_skills=0, loop_bytes=0))
    # Nothing to score: loading and samples.
    assert fixed == pytest.approx(timing.REFERENCE_FIXED_MINUTES * timing.SAFETY)
    more = timing.estimated_eval_minutes(dataclasses.replace(cfg, hellaswag=cfg.hellaswag + 100))
    assert more - base == pytest.approx(100 * timing.REFERENCE_SECONDS_PER_ITEM["hellaswag"] / 60 * timing.SAFETY)
    assert timing.estimated_eval_minutes(cfg, slowdown=1.5) == pytest.approx(1.5 * base)
    assert timing.estimated_eval_minutes(cfg, slowdown=0.8) == pytest.approx(0.8 * base)
    # A probe that ran very fast shrinks the reserve only so far.
    assert timing.estimated_eval_minutes(cfg, slowdown=0.1) == pytest.approx(timing.MIN_SLOWDOWN * base)


def test_default_items_fit_the_default_budget():
    """The defaults leave more than half of the 30 minutes to training on the reference machine."""
    assert 5 < timing.estimated_eval_minutes(EvalConfig()) < 15


def test_probe_times_its_workload(monkeypatch):
    seconds = timing.cpu_probe_seconds()
    assert math.isfinite(seconds) and seconds > 0
    monkeypatch.setattr(timing, "PROBE_REPEATS", 0)  # the same probe with nothing inside the timed loop
    assert timing.cpu_probe_seconds() < seconds / 20
    monkeypatch.setattr(timing, "cpu_probe_seconds", lambda: 2 * timing.REFERENCE_PROBE_SECONDS)
    assert timing.machine_slowdown() == pytest.approx(2.0) or timing.torch.cuda.is_available()


def test_reserve_uses_the_given_minutes_or_the_estimate(monkeypatch, tmp_path):
    lines = []
    assert eval_reserve(ConvertConfig(output=str(tmp_path), eval_minutes=4.0), lines.append) == 4.0
    assert lines == []  # no probe when the reserve is given
    monkeypatch.setattr(timing, "machine_slowdown", lambda: 2.0)
    cfg = ConvertConfig(output=str(tmp_path), eval=EvalConfig(hellaswag=50))
    assert eval_reserve(cfg, lines.append) == pytest.approx(2 * timing.estimated_eval_minutes(cfg.eval))
    assert len(lines) == 1 and "2.00×" in lines[0]


def test_reserve_refuses_a_negative_value(tmp_path):
    with pytest.raises(ValueError, match="eval_minutes"):
        ConvertConfig(output=str(tmp_path), eval_minutes=-1.0)
