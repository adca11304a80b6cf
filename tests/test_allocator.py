"""The allocator tuning of `bytelift`'s commands: freed large blocks are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bytelift import allocator

# Allocate, touch and free a 64 MiB block this many times, counting the process's minor page faults.
PROBE = """
import resource, sys
import torch
from bytelift.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
torch.ones(16 * 2**20)  # warm: the first block's pages are faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)  # 64 MiB of float32, touched, then freed
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_BLOCK = 64 * 2**20 // 4096


def _probe(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_blocks():
    tuned, faults = _probe("tune")
    plain_flag, plain_faults = _probe("plain")
    assert tuned == "True" and plain_flag == "False"
    assert plain_faults >= 9 * PAGES_PER_BLOCK  # glibc maps each of the 10 blocks afresh: its pages fault in
    # tuned: the heap grows by a block or two (an aligned block may not fit the freed one), then reuses them
    assert faults <= 3 * PAGES_PER_BLOCK


def test_the_user_keeps_the_allocator_when_asked(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT_ENV, "1")
    assert allocator.tune_allocator() is False
    monkeypatch.delenv(allocator.OPT_OUT_ENV)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")  # glibc's own setting wins
    assert allocator.tune_allocator() is False
