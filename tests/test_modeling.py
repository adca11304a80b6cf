"""The byteified model around tiny random sources of several architectures."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import bytelift
from bytelift.configuration import ByteliftConfig
from bytelift.modeling import (
    IGNORE_INDEX,
    UNDECIDED_LOGPROB,
    ByteliftForCausalLM,
    count_parameters,
    depool_index,
    fold_fused_logprobs,
    fused_labels,
    pool_patches,
)
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE, ByteTokenizer
from tests.tiny_models import ARCHITECTURES, tiny_source

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # code",
    "日本語のテキストと中文文本",
    "مرحبا بالعالم 🙂",
]
LOCAL = dict(local_heads=4)


@pytest.fixture
def tokenizers(bytelevel_tokenizer, sentencepiece_tokenizer):
    return {"bytelevel": bytelevel_tokenizer, "sentencepiece": sentencepiece_tokenizer}


def build(arch, tokenizer, **overrides):
    source = tiny_source(arch, tokenizer)
    model = ByteliftForCausalLM.from_source(source, tokenizer, **{**LOCAL, **overrides}).eval()
    return source, model


def batch_of(model, texts, **kwargs):
    return model.tokenizer(texts, padding=True, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_build_forward_backward_save_reload(arch, tokenizers, tmp_path):
    tok = tokenizers[ARCHITECTURES[arch]]
    _, model = build(arch, tok)
    batch = batch_of(model, TEXTS)
    B, L = batch["input_ids"].shape

    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (B, L, 2 * BYTE_VOCAB_SIZE)
    assert out.boundary_logprobs.shape == (B, L)
    assert torch.isfinite(out.loss)
    # Every row's first real byte (bos) ends a patch.
    first = batch["attention_mask"].argmax(1)
    assert out.boundary_mask[torch.arange(B), first].all()

    model.train()
    with torch.no_grad():  # the source prior's zero-initialised head passes no gradient to the decoder yet
        model.lm_head.weight.normal_(std=0.02)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name in ("encoder.byte_embedding.weight", "decoder.in_projection.weight", "lm_head.weight",
                 "pooling_projection.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.global_model.parameters())
    model.eval()

    # Move every weight off its initial value: a reload that re-initialises anything must show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, ByteliftForCausalLM)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), ByteTokenizer)
    with torch.no_grad():
        a = model(**batch).logits
        b = reloaded(**batch).logits  # expanded ids recomputed by the reloaded tokenizer
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_causality_with_given_boundaries(bytelevel_tokenizer):
    _, model = build("llama", bytelevel_tokenizer)
    with torch.no_grad():  # the source prior's zero-initialised head: the decoder would not show at all
        model.lm_head.weight.normal_(std=0.5)
    batch = batch_of(model, ["causality is checked byte by byte here"])
    ids = batch["input_ids"]
    L = ids.shape[1]
    gen = torch.Generator().manual_seed(0)
    boundaries = torch.rand(1, L, generator=gen) < 0.3
    boundaries[:, 0] = True
    with torch.no_grad():
        base = model(ids, boundary_mask=boundaries).logits
        for t in (3, 10, 20):
            for k in (1, 4):
                changed = ids.clone()
                changed[0, t + k] = BYTE_OFFSET + (int(changed[0, t + k]) - BYTE_OFFSET + 7) % 256
                logits = model(changed, boundary_mask=boundaries).logits
                torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
                assert not torch.equal(logits[:, t + k], base[:, t + k])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_row_equals_row_alone(side, bytelevel_tokenizer):
    _, model = build("qwen2", bytelevel_tokenizer)
    batch = batch_of(model, TEXTS, padding_side=side)
    with torch.no_grad():
        out = model(**batch)
        for r, text in enumerate(TEXTS):
            alone = batch_of(model, [text])
            single = model(**alone)
            valid = batch["attention_mask"][r].bool()
            torch.testing.assert_close(out.logits[r][valid], single.logits[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(out.boundary_mask[r][valid], single.boundary_mask[0])


def test_bolmo_initialisation(bytelevel_tokenizer):
    _, model = build("llama", bytelevel_tokenizer)
    # from_source takes over the source's transformer (its token embedding is dropped); compare with a
    # fresh source built from the same seed.
    emb = tiny_source("llama", bytelevel_tokenizer).get_input_embeddings().weight.detach()
    n = len(bytelevel_tokenizer)
    sub = model.encoder.subword_embedding.weight.detach()
    assert sub.shape[0] == n + 1
    torch.testing.assert_close(sub[:n], emb[:n])
    assert torch.equal(sub[n], torch.zeros_like(sub[n]))  # "no subword" row
    eye = torch.eye(model.config.local_hidden_size)
    assert torch.equal(model.boundary_predictor.q_proj.weight.detach(), eye)
    assert torch.equal(model.boundary_predictor.k_proj.weight.detach(), eye)
    for layer in model.encoder.layers.modules():
        if hasattr(layer, "igate_proj"):
            assert torch.all(layer.igate_proj.bias == model.config.mlstm_igate_bias_init)
    # Byte embedding rows follow the source embedding's per-dimension statistics.
    byte_rows = model.encoder.byte_embedding.weight.detach()
    mu, sigma = emb[:n].mean(0), emb[:n].std(0)
    assert (byte_rows.mean(0) - mu).abs().mean() < 0.5 * sigma.mean()
    # Pooled outputs on fresh random bytes match the source embedding statistics per dimension.
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(BYTE_OFFSET, BYTE_VOCAB_SIZE, (16, 256), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        h, _ = model.encoder(ids, model.expand(ids, mask), mask=mask)
        pooled = model.pooling_projection(h).flatten(0, 1)
    assert ((pooled.mean(0) - mu).abs() / sigma).mean() < 0.1
    assert ((pooled.std(0) / sigma) - 1).abs().mean() < 0.1


def test_gemma_embedding_scale_is_copied(sentencepiece_tokenizer):
    # Gemma scales embeddings inside its embedding module: the subword table must copy the module's output.
    _, model = build("gemma3", sentencepiece_tokenizer)
    n = len(sentencepiece_tokenizer)
    fresh = tiny_source("gemma3", sentencepiece_tokenizer)  # same seed: same weights as the consumed source
    with torch.no_grad():
        expected = fresh.get_input_embeddings()(torch.arange(n))
    torch.testing.assert_close(model.encoder.subword_embedding.weight[:n].detach(), expected)
    assert not torch.allclose(expected, fresh.get_input_embeddings().weight[:n])  # the scale is real


def test_conversion_is_determined_by_the_seed(bytelevel_tokenizer):
    _, a = build("llama", bytelevel_tokenizer, seed=3)
    _, b = build("llama", bytelevel_tokenizer, seed=3)
    _, c = build("llama", bytelevel_tokenizer, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.decoder.in_projection.weight, c.decoder.in_projection.weight)


def test_narrow_local_width(bytelevel_tokenizer):
    _, model = build("llama", bytelevel_tokenizer, local_hidden_size=32)
    batch = batch_of(model, TEXTS[:2])
    out = model(**batch, labels=batch["input_ids"])
    assert out.encoder_hidden_states.shape[-1] == 32
    assert out.global_hidden_states.shape[-1] == 64
    out.loss.backward()


def test_fused_labels_and_fold():
    labels = torch.tensor([[1, 10, 11, 12, IGNORE_INDEX]])
    boundary = torch.tensor([[True, False, True, True, False]])
    target = fused_labels(labels, boundary, BYTE_VOCAB_SIZE)
    assert target.tolist() == [[10, 11 + BYTE_VOCAB_SIZE, 12 + BYTE_VOCAB_SIZE, IGNORE_INDEX, IGNORE_INDEX]]

    logits = torch.randn(3, 2 * BYTE_VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits, -1)
    folded = fold_fused_logprobs(logits)
    assert folded.shape == (3, 256)
    byte = 65
    expected = p[:, BYTE_OFFSET + byte] + p[:, BYTE_VOCAB_SIZE + BYTE_OFFSET + byte]
    torch.testing.assert_close(folded[:, byte].exp(), expected)
    full = fold_fused_logprobs(logits, bytes_only=False)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(3))


def test_pool_and_depool_indices():
    h = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    boundary = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    patches, patch_mask, positions = pool_patches(h, boundary)
    assert positions[0].tolist() == [0, 2, 5] and patch_mask[0].tolist() == [True, True, True]
    assert positions[1, :1].tolist() == [1] and patch_mask[1].tolist() == [True, False, False]
    assert patches[0, :, 0].tolist() == [0.0, 2.0, 5.0]
    assert depool_index(boundary, 3).tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]]


def test_predictor_marks_bos_and_undecided(bytelevel_tokenizer):
    _, model = build("llama", bytelevel_tokenizer)
    batch = batch_of(model, ["ab", "abcdef"])  # left padded
    with torch.no_grad():
        out = model(**batch)
    lp = out.boundary_logprobs
    assert lp[0, 4].item() == 0.0 and lp[1, 0].item() == 0.0  # bos of each row
    assert (lp[:, -1] == UNDECIDED_LOGPROB).all()  # no lookahead for the last byte
    assert (lp[0, :4] == UNDECIDED_LOGPROB).all()  # padding
    assert not out.boundary_mask[:, -1].any()


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_predictor_reads_exactly_lookahead_bytes_ahead(bytelevel_tokenizer, lookahead):
    """p_t depends on bytes <= t + k and on byte t + k itself; the last k bytes are undecided."""
    from bytelift.objectives import decidable_positions

    _, model = build("llama", bytelevel_tokenizer, boundary_lookahead=lookahead)
    with torch.no_grad():
        for p in model.boundary_predictor.parameters():  # random projections: a p_t that reads a byte moves with it
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    text = "The quick brown fox jumps"
    batch = batch_of(model, [text])
    L = batch["input_ids"].shape[1]
    t = 6
    with torch.no_grad():
        base = model(**batch).boundary_logprobs[0]
        for pos, moves in ((t + lookahead, True), (t + lookahead + 1, False)):
            ids = batch["input_ids"].clone()
            ids[0, pos] = BYTE_OFFSET + ord("#")
            lp = model(input_ids=ids, attention_mask=batch["attention_mask"]).boundary_logprobs[0]
            assert bool(lp[t] != base[t]) == moves
            assert torch.equal(lp[:t], base[:t])  # bytes more than k before the change never move
    assert (base[L - lookahead :] == UNDECIDED_LOGPROB).all() and (base[1 : L - lookahead] != UNDECIDED_LOGPROB).all()
    decidable = decidable_positions(batch["attention_mask"].bool(), lookahead)[0]
    assert decidable.tolist() == [False] + [True] * (L - 1 - lookahead) + [False] * lookahead


@pytest.mark.parametrize("bad", [0, 9, 1.5, True])
def test_boundary_lookahead_is_validated(bytelevel_tokenizer, bad):
    with pytest.raises(ValueError, match="boundary_lookahead"):
        build("llama", bytelevel_tokenizer, boundary_lookahead=bad)


def test_parameter_counts(bytelevel_tokenizer):
    source, model = build("llama", bytelevel_tokenizer)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert set(counts) == {"embeddings", "encoder", "predictor", "global", "decoder", "head", "prior", "total"}
    assert counts["predictor"] == 2 * 64 * 64
    assert counts["head"] == 64 + 64 * 2 * BYTE_VOCAB_SIZE


def test_auto_classes_registered():
    assert AutoConfig.for_model("bytelift").__class__ is ByteliftConfig or isinstance(
        AutoConfig.for_model("bytelift"), ByteliftConfig
    )
    assert bytelift.ByteliftForCausalLM is ByteliftForCausalLM


def test_bad_sources(bytelevel_tokenizer, sentencepiece_tokenizer, tmp_path):
    # Tokenizer from another model: more tokens than embedding rows.
    small = tiny_source("llama", bytelevel_tokenizer, extra_rows=-50)
    with pytest.raises(ValueError, match="do not belong together"):
        ByteliftForCausalLM.from_source(small, bytelevel_tokenizer, **LOCAL)

    # A decoder that cannot take embeddings.
    class NoEmbeds(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    source = tiny_source("llama", bytelevel_tokenizer)
    source.model.forward = NoEmbeds().forward
    with pytest.raises(TypeError, match="inputs_embeds"):
        ByteliftForCausalLM.from_source(source, bytelevel_tokenizer, **LOCAL)

    # A misspelt model option is refused, not kept as a silent config attribute; by name, before any
    # source is loaded (the path does not exist).
    with pytest.raises(ValueError, match=r"unknown model options \['source_priors'\]"):
        ByteliftForCausalLM.from_source(str(tmp_path / "missing"), source_priors=False)


def test_too_many_patches(bytelevel_tokenizer):
    source = tiny_source("llama", bytelevel_tokenizer, context=16)
    model = ByteliftForCausalLM.from_source(source, bytelevel_tokenizer, **LOCAL)
    batch = batch_of(model, ["x" * 40])
    every = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    with pytest.raises(ValueError, match="context"):
        model(**batch, boundary_mask=every)


def test_bad_folders(bytelevel_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ByteliftForCausalLM.from_pretrained(tmp_path)
    source = tiny_source("llama", bytelevel_tokenizer)
    source.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a bytelift model"):
        ByteliftForCausalLM.from_pretrained(tmp_path / "plain")

    _, model = build("llama", bytelevel_tokenizer)
    model.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ByteliftForCausalLM.from_pretrained(tmp_path / "ok")
    weights.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ok")


def test_config_round_trip(tmp_path, bytelevel_tokenizer):
    _, model = build("gpt2", bytelevel_tokenizer, decoder_layers=2)
    model.config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "bytelift" and cfg["source_config"]["model_type"] == "gpt2"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ByteliftConfig)
    assert loaded.decoder_layers == 2 and loaded.global_hidden_size == 64
    assert loaded.no_subword_id == len(bytelevel_tokenizer)


@pytest.mark.slow
def test_packaged_smollm2_conversion():
    """Builds from the packaged SmolLM2; the untrained predictor's boundaries must already be plausible."""
    model = ByteliftForCausalLM.from_source("smollm2-135m").eval()
    counts = count_parameters(model)
    print("SmolLM2-135M byteified:", counts)
    assert counts["global"] > 100e6
    tok = model.tokenizer
    text = (
        "The history of the city begins in the early middle ages, when a small settlement grew around the "
        "river crossing. Merchants came from far away to trade wool, salt and wine, and by 1200 the town had "
        "its own council, a market charter and a stone bridge that still stands today."
    )
    src_ids = tok.source_tokenizer.encode(text, add_special_tokens=False)
    byte_ids, patch_lengths = tok.source_bytes_and_patches(src_ids)
    ids = torch.tensor([[BOS_ID, *byte_ids]])
    true_ends = torch.zeros_like(ids, dtype=torch.bool)
    true_ends[0, 0] = True
    true_ends[0, torch.tensor(patch_lengths).cumsum(0)] = True
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (1, ids.shape[1], 2 * BYTE_VOCAB_SIZE)
    decided = torch.ones_like(true_ends)
    decided[0, -1] = False  # the last byte has no lookahead
    pred, gold = out.boundary_mask[decided], true_ends[decided]
    tp = (pred & gold).sum().item()
    precision, recall = tp / max(pred.sum().item(), 1), tp / max(gold.sum().item(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    print(f"untrained predictor vs SmolLM2 tokens: precision {precision:.3f} recall {recall:.3f} F1 {f1:.3f}")
    rate, gold_rate = pred.float().mean().item(), gold.float().mean().item()
    assert 0 < rate < 0.95  # some boundaries, not all
    # Plausible = better than chance: a random cut at any rate has precision equal to the true token rate.
    assert precision > 1.5 * gold_rate
