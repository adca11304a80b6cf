"""Each loss against a value computed by hand on a toy batch."""

from __future__ import annotations

import math

import pytest
import torch

from bytelift.losses import (
    IGNORE_INDEX,
    binary_kl,
    boundary_loss,
    byte_ce_loss,
    distillation_loss,
    encoder_loss,
    log1mexp,
    student_token_logprobs,
    student_whitespace_logprobs,
    target_logprobs,
    teacher_logprobs,
)
from bytelift.tokenization import BYTE_OFFSET, BYTE_VOCAB_SIZE

V2 = 2 * BYTE_VOCAB_SIZE


def test_log1mexp_is_stable_and_exact():
    import mpmath

    mpmath.mp.dps = 50  # 1 − e^−50 must not round to 1
    values = [-1e-8, -1e-3, -0.5, -0.7, -5.0, -50.0]
    x = torch.tensor(values, dtype=torch.float64)
    expected = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in values], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-9, atol=0)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-30]))).all()


def test_boundary_loss_by_hand():
    p = torch.tensor([[0.9, 0.2, 0.6, 0.5]])
    labels = torch.tensor([[True, False, True, True]])
    mask = torch.tensor([[True, True, True, False]])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3
    assert math.isclose(boundary_loss(p.log(), labels, mask).item(), expected, rel_tol=1e-5)
    # p = 1 (log p = 0) with label 0 stays finite thanks to the clip.
    assert torch.isfinite(boundary_loss(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)))


def test_encoder_loss_by_hand():
    student = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    expected = (math.sqrt((9 + 16) / 2) + math.sqrt(4 / 2)) / 2
    assert math.isclose(encoder_loss(student, teacher, mask).item(), expected, rel_tol=1e-6)


def test_relative_encoder_loss_by_hand_and_scale_free():
    student = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [1.0, 3.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = (math.sqrt((9 + 4) / 2) / math.sqrt(4 / 2) + math.sqrt(4 / 2) / math.sqrt(10 / 2)) / 2
    assert math.isclose(encoder_loss(student, teacher, mask, relative=True).item(), expected, rel_tol=1e-6)
    # A source whose hidden states are 10x larger gives the same relative loss (and 10x the plain one).
    for scale in (0.1, 10.0):
        assert math.isclose(encoder_loss(scale * student, scale * teacher, mask, relative=True).item(), expected,
                            rel_tol=1e-5)
        assert math.isclose(encoder_loss(scale * student, scale * teacher, mask).item(),
                            scale * encoder_loss(student, teacher, mask).item(), rel_tol=1e-5)
    # An all-zero teacher state divides by the floor, not by zero.
    assert torch.isfinite(encoder_loss(student, torch.zeros_like(teacher), mask, relative=True))


def test_byte_ce_by_hand():
    logits = torch.zeros(1, 2, V2)
    logits[0, 0, 7] = 2.0
    targets = torch.tensor([[7, IGNORE_INDEX]])
    expected = -(2.0 - math.log(math.exp(2.0) + V2 - 1))
    assert math.isclose(byte_ce_loss(logits, targets).item(), expected, rel_tol=1e-6)


def test_binary_kl_by_hand():
    y, y_hat = torch.tensor([-1.0, -10.0]), torch.tensor([-2.0, -10.0])
    tau = 5.0
    p, q = math.exp(-1.0 / tau), math.exp(-2.0 / tau)
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    kl = binary_kl(y, y_hat, tau)
    assert math.isclose(kl[0].item(), expected, rel_tol=1e-5)
    assert abs(kl[1].item()) < 1e-7  # identical distributions
    assert (binary_kl(torch.randn(100).abs().neg(), torch.randn(100).abs().neg()) >= -1e-7).all()


def test_student_token_logprobs_sum_bytes_of_each_token():
    # bytes: [bos, a, b, c, d]; patches: bos | "ab" | "cd"; token 0 = "ab", token 1 = "cd".
    patch_ids = torch.tensor([[0, 1, 1, 2, 2, -1]])
    lp = torch.tensor([[-0.1, -0.2, -0.3, -0.4, -9.0, -9.0]])
    y_hat = student_token_logprobs(lp, patch_ids, num_tokens=3)
    # position t predicts byte t+1: "ab" from positions 0,1; "cd" from positions 2,3; nothing for token 2.
    torch.testing.assert_close(y_hat, torch.tensor([[-0.3, -0.7, 0.0]]))


def test_teacher_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]]))
    tokens = torch.tensor([[1, 2]])
    ws = torch.tensor([True, False, True])
    y, w = teacher_logprobs(logits, tokens, ws)
    torch.testing.assert_close(y.exp(), torch.tensor([[0.3, 0.8]]))
    torch.testing.assert_close(w.exp(), torch.tensor([[0.7, 0.9]]))


def test_student_whitespace_marginalises_the_flag():
    logits = torch.full((1, 1, V2), -30.0)
    space = BYTE_OFFSET + 0x20
    logits[0, 0, space] = 0.0
    logits[0, 0, space + BYTE_VOCAB_SIZE] = 0.0
    logits[0, 0, BYTE_OFFSET + ord("a")] = 0.0
    logp = torch.log_softmax(logits, -1)
    assert math.isclose(student_whitespace_logprobs(logp).exp().item(), 2 / 3, rel_tol=1e-4)


def test_distillation_loss_by_hand():
    # Window: bos | "ab" | "cd"  (tokens t0 = "ab", t1 = "cd", teacher has N = 3 positions).
    a, b, c, d = (BYTE_OFFSET + ord(x) for x in "abcd")
    L = 5
    logits = torch.randn(1, L, V2, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[a, b + BYTE_VOCAB_SIZE, c, d + BYTE_VOCAB_SIZE, IGNORE_INDEX]])
    logp, lp = target_logprobs(logits, targets)
    patch_ids = torch.tensor([[0, 1, 1, 2, 2]])
    patch_ends = torch.tensor([[0, 2, 4]])
    patch_mask = torch.ones(1, 3, dtype=torch.bool)
    teacher_y = torch.tensor([[-1.0, -2.0, -3.0]])
    teacher_ws = torch.tensor([[-0.5, -0.6, -0.7]])
    teacher_mask = torch.ones(1, 3, dtype=torch.bool)
    loss = distillation_loss(logp, lp, patch_ids, patch_ends, patch_mask, teacher_y, teacher_ws, teacher_mask)

    ws = student_whitespace_logprobs(logp)[0]
    y_hat0 = lp[0, 0] + lp[0, 1] + ws[2]  # "ab" then whitespace after its last byte (position 2)
    y_hat1 = lp[0, 2] + lp[0, 3] + ws[4]
    y0, y1 = -1.0 + -0.6, -2.0 + -0.7  # teacher: token prob + p(next token starts with whitespace)
    # token 2 has no patch in the window: not scored.
    expected = (binary_kl(torch.tensor(y0), y_hat0) + binary_kl(torch.tensor(y1), y_hat1)) / 2
    torch.testing.assert_close(loss, expected)

    # Without debiasing the token probabilities are compared directly.
    plain = distillation_loss(
        logp, lp, patch_ids, patch_ends, patch_mask, teacher_y, teacher_ws, teacher_mask, debias=False
    )
    expected_plain = (binary_kl(torch.tensor(-1.0), lp[0, 0] + lp[0, 1]) + binary_kl(torch.tensor(-2.0), lp[0, 2] + lp[0, 3])) / 2
    torch.testing.assert_close(plain, expected_plain)

    # Gradients reach the logits of every scored byte.
    logits.requires_grad_(True)
    logp, lp = target_logprobs(logits, targets)
    distillation_loss(logp, lp, patch_ids, patch_ends, patch_mask, teacher_y, teacher_ws, teacher_mask).backward()
    assert (logits.grad[0, :4].abs().sum(-1) > 0).all()


def test_best_f1_threshold_is_the_best_cut():
    from bytelift.objectives import best_f1_threshold

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 50
        p = torch.rand(n, generator=gen).clamp(1e-4, 1 - 1e-4)
        p[:10] = p[10:20]  # ties
        gold = torch.rand(n, generator=gen) < p  # informative but noisy labels
        threshold, f1 = best_f1_threshold(p.log(), gold)

        def f1_at(t: float) -> float:
            pred = p > t
            tp = int((pred & gold).sum())
            return 2 * tp / (int(pred.sum()) + int(gold.sum()))

        assert f1 == pytest.approx(f1_at(threshold))
        assert f1 >= max(f1_at(float(t)) for t in torch.cat([p, torch.tensor([0.0])])) - 1e-12
