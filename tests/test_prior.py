"""The source prior: the vocabulary trie, the trie marginal's invariants, the model's prior path."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import bytelift.modeling as modeling
from bytelift.losses import dense_distillation_loss
from bytelift.modeling import ByteliftForCausalLM, fused_labels, pool_patches
from bytelift.prior import NO_NODE, ROOT, TokenTrie, prior_logprobs, token_cumsums
from bytelift.tokenization import BOS_ID, BYTE_OFFSET, BYTE_VOCAB_SIZE
from tests.tiny_models import tiny_source

V = BYTE_VOCAB_SIZE


def _random_vocab(seed: int, size: int = 300, alphabet: int = 6) -> list[list[int] | None]:
    """Random spellings over a small alphabet (many shared prefixes, some duplicates and specials)."""
    rng = random.Random(seed)
    out: list[list[int] | None] = []
    for i in range(size):
        if i % 37 == 5:
            out.append(None)  # no spelling
        elif i % 53 == 7:
            out.append([rng.randrange(4)])  # a special id alone (eos, bos, ...)
        else:
            out.append([BYTE_OFFSET + rng.randrange(alphabet) for _ in range(rng.randint(1, 6))])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_trie_nodes_are_the_prefixes_of_the_vocabulary(seed):
    vocab = _random_vocab(seed)
    trie = TokenTrie(vocab, num_rows=len(vocab) + 3)
    spelled = {i: tuple(s) for i, s in enumerate(vocab) if s}
    prefixes = {s[:d] for s in spelled.values() for d in range(len(s) + 1)}
    assert trie.num_nodes == len(prefixes)
    assert sorted(trie.order.tolist()) == sorted(spelled)
    # Walk every prefix from the root with `child`; check its range and exact count by brute force.
    for prefix in prefixes:
        node = torch.tensor([ROOT])
        for c in prefix:
            node = trie.child(node, torch.tensor([c]))
        n = int(node)
        assert n != NO_NODE
        members = {int(i) for i in trie.order[trie.lo[n] : trie.hi[n]]}
        assert members == {i for i, s in spelled.items() if s[: len(prefix)] == prefix}
        exact = {int(i) for i in trie.order[trie.lo[n] : trie.lo[n] + trie.exact[n]]}
        assert exact == {i for i, s in spelled.items() if s == prefix}
        kids = {int(trie.symbol[k]) for k in range(trie.first_child[n], trie.first_child[n] + trie.num_children[n])}
        assert kids == {s[len(prefix)] for s in spelled.values() if len(s) > len(prefix) and s[: len(prefix)] == prefix}
    # A symbol sequence that no spelling starts with is off the trie.
    assert int(trie.child(torch.tensor([ROOT]), torch.tensor([BYTE_OFFSET + 200]))) == NO_NODE
    assert int(trie.child(torch.tensor([NO_NODE]), torch.tensor([BYTE_OFFSET]))) == NO_NODE


@pytest.mark.parametrize("seed", [0, 1])
def test_trie_marginal_sums_to_one_and_telescopes_to_token_probabilities(seed):
    vocab = _random_vocab(seed)
    rows = len(vocab) + 3
    trie = TokenTrie(vocab, num_rows=rows)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, rows, generator=gen, dtype=torch.float64) * 3
    cumsums = token_cumsums(trie, logits)
    p = torch.softmax(logits.float(), -1).double()
    spelled = {i: tuple(s) for i, s in enumerate(vocab) if s}
    total = p[:, sorted(spelled)].sum(-1)  # the prior conditions on tokens that have a spelling
    # Every node with children: the 2·V_b probabilities sum to 1 (no floor).
    nodes = torch.tensor([n for n in range(trie.num_nodes) if trie.num_children[n] > 0])
    for r in range(2):
        lp, has = prior_logprobs(trie, cumsums, torch.full_like(nodes, r), nodes, floor=1e-300)
        assert has.all()
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(nodes), dtype=torch.float64), rtol=0, atol=1e-9)
    # Along each spelling: the product of the factors at its symbols, the last one with the end flag, is the
    # mass of the tokens spelled that way (duplicates add up), over the spelled mass.
    for i, s in list(spelled.items())[:80]:
        node = torch.tensor([ROOT, ROOT])
        logp = torch.zeros(2, dtype=torch.float64)
        for k, c in enumerate(s):
            lp, _ = prior_logprobs(trie, cumsums, torch.arange(2), node, floor=1e-300)
            last = k == len(s) - 1
            logp = logp + lp[:, c + V * last]
            node = trie.advance(node, torch.tensor([c, c]), torch.tensor([last, last]))
        same = [j for j, t in spelled.items() if t == s]
        torch.testing.assert_close(logp.exp(), p[:, same].sum(-1) / total, rtol=1e-6, atol=1e-12)
        assert (node == ROOT).all()


def test_prefix_nodes_equal_a_walk_and_the_decoding_cursor():
    vocab = _random_vocab(3)
    trie = TokenTrie(vocab)
    gen = torch.Generator().manual_seed(0)
    B, L = 3, 40
    ids = BYTE_OFFSET + torch.randint(0, 6, (B, L), generator=gen)
    boundary = torch.rand(B, L, generator=gen) < 0.3
    boundary[:, 0] = True
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[2, :5] = False  # left padding
    boundary[2, :5] = False
    boundary[2, 5] = True
    nodes = trie.prefix_nodes(ids, boundary, mask)
    # Reference: the decoding cursor, advanced byte by byte (a boundary byte resets it to the root); before
    # a row's first boundary there is no patch yet.
    for b in range(B):
        cursor = torch.tensor([NO_NODE])
        for t in range(L):
            if not mask[b, t]:
                assert nodes[b, t] == NO_NODE
                continue
            cursor = trie.advance(cursor, ids[b, t : t + 1], boundary[b, t : t + 1])
            assert int(nodes[b, t]) == int(cursor), (b, t)
    assert (nodes >= 0).float().mean() > 0.5  # not degenerate: most prefixes are on the trie


def _true_boundaries(byte_tok, source_tok, text):
    sids = source_tok(text)["input_ids"]
    data, lengths = byte_tok.source_bytes_and_patches(sids)
    ids = torch.tensor(np.concatenate([[BOS_ID], data]))[None]
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    boundary[0, 0] = True
    boundary[0, np.cumsum(lengths)] = True
    return sids, ids, boundary


def test_prior_path_with_teacher_states_and_true_boundaries_is_the_source(bytelevel_tokenizer):
    """The prior of the teacher's own next-token logits, on the source's token boundaries, gives every text
    exactly the source's likelihood (the byte-level vocabulary spells each token uniquely)."""
    tok = bytelevel_tokenizer
    model = ByteliftForCausalLM.from_source(tiny_source("qwen2", tok, extra_rows=0), tok, local_heads=4).eval()
    model.config.prior_floor = 1e-12
    teacher = tiny_source("qwen2", tok, extra_rows=0)
    start = model.tokenizer.special_to_source[BOS_ID]
    for text in ("the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1"):
        sids, ids, boundary = _true_boundaries(model.tokenizer, tok, text)
        with torch.no_grad():
            t_logits = teacher(input_ids=torch.tensor([[start] + sids])).logits.double()
            log_prior, has = model.source_prior(t_logits, ids, boundary, torch.ones_like(boundary))
            source_ll = torch.log_softmax(t_logits[0, :-1], -1).gather(-1, torch.tensor(sids)[:, None]).sum()
        target = fused_labels(ids, boundary, V)[0, :-1]
        byte_ll = log_prior[0, :-1].gather(-1, target[:, None]).sum()
        assert has[0, :-1].all()
        torch.testing.assert_close(byte_ll, source_ll, rtol=1e-6, atol=1e-6)


def test_model_output_starts_as_its_own_prior(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    model = ByteliftForCausalLM.from_source(tiny_source("llama", tok), tok, local_heads=4).eval()
    batch = model.tokenizer(["hello world", "a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert (model.lm_head.weight == 0).all()
    torch.testing.assert_close(out.logits, out.prior_logprobs.float(), rtol=0, atol=0)
    # Where the prior speaks it is a distribution; elsewhere it adds nothing.
    spoken = out.prior_logprobs.abs().sum(-1) > 0
    assert spoken[batch["attention_mask"].bool()].float().mean() > 0.5
    torch.testing.assert_close(out.prior_logprobs[spoken].exp().sum(-1), torch.ones(int(spoken.sum()),
                               dtype=torch.float64), rtol=0, atol=1e-9)


def test_prior_off_keeps_the_decoder_alone(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    model = ByteliftForCausalLM.from_source(tiny_source("llama", tok), tok, local_heads=4, source_prior=False,
                                            token_exact_init=False)
    assert model.prior_head is None and not model.config.source_prior
    assert model.lm_head.weight.abs().sum() > 0
    out = model(**model.tokenizer(["hello"], return_tensors="pt"))
    assert out.prior_logprobs is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_token_exact_init_pools_the_carried_subword_embedding(arch, bytelevel_tokenizer, sentencepiece_tokenizer,
                                                               monkeypatch):
    """With the residual scale at 0 the pooled patch at a token's end is exactly the carried subword
    embedding e normalised to the source's mean RMS c: c·e/rms(e) (the encoder norm keeps the direction)."""
    tok = bytelevel_tokenizer if arch == "qwen2" else sentencepiece_tokenizer
    monkeypatch.setattr(modeling, "TOKEN_EXACT_RESIDUAL_SCALE", 0.0)
    source = tiny_source(arch, tok)
    emb = source.get_input_embeddings().weight.detach().clone()[: len(tok)]
    model = ByteliftForCausalLM.from_source(source, tok, local_heads=4).eval()
    c = float(emb.pow(2).mean(-1).sqrt().mean())
    sids, ids, boundary = _true_boundaries(model.tokenizer, tok, "the quick brown fox jumps over the lazy dog")
    mask = torch.ones_like(boundary)
    expanded = model.expand(ids, mask)
    with torch.no_grad():
        h, _ = model.encoder(ids, expanded, mask=mask)
        patches, patch_mask, ends = pool_patches(h, boundary)
        pooled = model.pooling_projection(patches)[0, 1:]  # patch 0 is bos
    carried = expanded[0, ends[0, 1:]]
    e = emb[carried]
    eps = model.config.local_post_norm_eps
    torch.testing.assert_close(pooled, c * e / (e.pow(2).mean(-1, keepdim=True) + eps).sqrt(), rtol=1e-4, atol=1e-5)
    # At a token's last byte the longest suffix is most often the token itself.
    assert (carried == torch.tensor(sids)).float().mean() > 0.5


def test_dense_distillation_loss():
    gen = torch.Generator().manual_seed(0)
    target = torch.log_softmax(torch.randn(2, 5, 2 * V, generator=gen), -1)
    scored = torch.ones(2, 5, dtype=torch.bool)
    assert float(dense_distillation_loss(target, target, scored)) == pytest.approx(0.0, abs=1e-6)
    other = torch.log_softmax(torch.randn(2, 5, 2 * V, generator=gen), -1)
    kl = (target.exp() * (target - other)).sum(-1)
    assert float(dense_distillation_loss(other, target, scored)) == pytest.approx(float(kl.mean()), rel=1e-5)
    scored[1] = False
    assert float(dense_distillation_loss(other, target, scored)) == pytest.approx(float(kl[0].mean()), rel=1e-5)


def _close_by_scan(trie, ids, predicted, mask, back_to_token):
    """Reference: one left-to-right scan per row, going back to the last whole token of the patch."""
    out = (predicted & mask).clone()
    for b in range(ids.shape[0]):
        t, cursor, whole = 0, torch.tensor([NO_NODE]), -1
        while t < ids.shape[1]:
            if not mask[b, t]:
                t += 1
                continue
            end = bool(out[b, t])
            node = trie.advance(cursor, ids[b, t : t + 1], torch.tensor([end]))
            if not end and int(node) != NO_NODE and int(trie.exact[int(node)]) > 0:
                whole = t
            if not end and t + 1 < ids.shape[1] and int(node) != NO_NODE and \
                    int(trie.child(node, ids[b, t + 1 : t + 2])) == NO_NODE:
                cut = whole if back_to_token and whole >= 0 else t
                out[b, cut] = True
                t, cursor, whole = cut + 1, torch.tensor([ROOT]), -1
                continue
            cursor = node
            if end:
                whole = -1
            t += 1
    return out


@pytest.mark.parametrize("back_to_token", [False, True])
def test_close_boundaries_equals_a_left_to_right_scan(back_to_token):
    """The rounds of `close_boundaries` give what one left-to-right scan gives: where the patch so far,
    followed by the next byte, is a prefix of no token, the patch ends (at that byte, or at its last whole
    token with `back_to_token`)."""
    vocab = _random_vocab(4, alphabet=4)
    trie = TokenTrie(vocab)
    gen = torch.Generator().manual_seed(1)
    B, L = 4, 60
    ids = BYTE_OFFSET + torch.randint(0, 5, (B, L), generator=gen)  # symbol 4 is in no spelling
    predicted = torch.rand(B, L, generator=gen) < 0.1
    predicted[:, 0] = True
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[3, :7] = False
    predicted[3, :7] = False
    predicted[3, 7] = True
    closed = trie.close_boundaries(ids, predicted, mask, max_rounds=64, back_to_token=back_to_token)
    assert not (predicted & mask & ~closed).any()  # a superset of the predictor's boundaries
    assert torch.equal(closed, _close_by_scan(trie, ids, predicted, mask, back_to_token))
    assert int(closed.sum()) > int((predicted & mask).sum())  # the rule fired
    if back_to_token:  # it moved some cut back from where the plain rule puts it
        assert not torch.equal(closed, trie.close_boundaries(ids, predicted, mask, max_rounds=64))


def test_model_boundaries_with_trie_closure(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    model = ByteliftForCausalLM.from_source(tiny_source("llama", tok), tok, local_heads=4).eval()
    assert model.config.boundary_trie_closure
    batch = model.tokenizer(["the quick brown fox, naturally", "zzzz qqqq"], padding=True, return_tensors="pt")
    with torch.no_grad():
        closed = model(**batch).boundary_mask
        model.config.boundary_trie_closure = False
        plain = model(**batch).boundary_mask
    assert not (plain & ~closed).any() and (closed & ~plain).any()
    expected = model.token_trie.close_boundaries(batch["input_ids"], plain, batch["attention_mask"].bool(), 16,
                                                 back_to_token=True)
    assert torch.equal(closed, expected)
