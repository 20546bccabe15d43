"""mtp.shuffle_weights, the random-weight control: per pool the same multiset of weights as its
source, on the same valid support, dealt to different tokens."""
import pytest
import torch

import mtp


def _rho1_case(seed=0, n=4, B=3, T=40, ratio=0.6, mode="hard"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):  # prompt, completion, padding
        lo = int(torch.randint(2, 8, (), generator=g))
        hi = int(torch.randint(T - 12, T, (), generator=g))
        mask[b, lo:hi] = 1
    valid = mtp.align_to_heads(mask, n)
    excess = torch.randn(n, B, T, generator=g)
    return mtp.rho1_weights(excess, valid, ratio, mode), valid, mask


def _per_head_sorted(w, valid):
    return [torch.sort(w[k][valid[k].bool()]).values for k in range(w.shape[0])]


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_same_histogram_per_head_different_assignment(mode):
    w, valid, _ = _rho1_case(mode=mode)
    s = mtp.shuffle_weights(w, valid, torch.Generator().manual_seed(1))
    assert s.shape == w.shape and s.dtype == w.dtype
    for a, b in zip(_per_head_sorted(w, valid), _per_head_sorted(s, valid)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same multiset, exactly
    assert (s[~valid.bool()] == 0).all()  # valid-only support
    for k in range(w.shape[0]):  # a different assignment in every head
        assert (s[k] != w[k]).sum() >= 10
    # the loss normaliser Σ m·w and (hard) the number of selected tokens per head are unchanged
    torch.testing.assert_close((s * valid).flatten(1).sum(1), (w * valid).flatten(1).sum(1))
    assert torch.equal((s != 0).flatten(1).sum(1), (w != 0).flatten(1).sum(1))


def test_deterministic_given_the_generator():
    w, valid, _ = _rho1_case(mode="soft")
    a = mtp.shuffle_weights(w, valid, torch.Generator().manual_seed(7))
    b = mtp.shuffle_weights(w, valid, torch.Generator().manual_seed(7))
    c = mtp.shuffle_weights(w, valid, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_micro_batches_are_one_pool():
    """A list of micro-batches is shuffled as one optimizer batch: weights move between them,
    and the multiset over the list is kept."""
    valid = [torch.ones(2, 2, 16), torch.ones(2, 3, 16)]
    valid[1][:, :, 12:] = 0
    w = [torch.full((2, 2, 16), 5.0), torch.full((2, 3, 16), 1.0) * valid[1]]
    s = mtp.shuffle_weights(w, valid, torch.Generator().manual_seed(0))
    assert [x.shape for x in s] == [x.shape for x in w]
    for k in range(2):
        before = torch.sort(torch.cat([x[k][v[k].bool()] for x, v in zip(w, valid)])).values
        after = torch.sort(torch.cat([x[k][v[k].bool()] for x, v in zip(s, valid)])).values
        assert torch.equal(before, after)
        assert (s[0][k] == 1.0).any() and (s[1][k] == 5.0).any()  # mixed across micro-batches
    assert (s[1][:, :, 12:] == 0).all()


def test_target_indexed_critic_weights():
    """[B, T] weights (the critic's, target indexing): one pool over the completion tokens of all
    micro-batches; after align_to_heads every head sees the tokens' multiset."""
    g = torch.Generator().manual_seed(3)
    masks = [torch.zeros(2, 24, dtype=torch.long), torch.zeros(2, 24, dtype=torch.long)]
    masks[0][:, 5:20] = 1
    masks[1][0, 6:24] = 1
    masks[1][1, 4:10] = 1
    adv = [torch.randn(2, 24, generator=g) for _ in masks]
    w = [torch.exp(a / 0.5).clamp(0.1, 5.0) * m for a, m in zip(adv, masks)]  # the critic's exp(A/β), clipped
    s = mtp.shuffle_weights(w, masks, torch.Generator().manual_seed(0))
    tokens = lambda ws: torch.sort(torch.cat([x[m.bool()] for x, m in zip(ws, masks)])).values  # noqa: E731
    assert torch.equal(tokens(w), tokens(s))
    assert all((x[~m.bool()] == 0).all() for x, m in zip(s, masks))
    assert sum(int((x != y).sum()) for x, y in zip(s, w)) >= 30
    n = 3
    for k in range(n):
        heads = torch.sort(torch.cat([mtp.align_to_heads(x, n)[k][mtp.align_to_heads(m, n)[k].bool()]
                                      for x, m in zip(s, masks)])).values
        assert torch.equal(heads, tokens(w))


def test_shape_errors():
    with pytest.raises(ValueError, match="same structure"):
        mtp.shuffle_weights(torch.ones(2, 3, 4), torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match=r"\[n, B, T\]"):
        mtp.shuffle_weights(torch.ones(4), torch.ones(4))
