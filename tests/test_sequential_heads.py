"""Meta's sequential heads: the heads run forward *and backward* one at a time inside
the loss's forward (mtp.MTPModel._sequential_loss). Same loss, same gradients as the all-heads
path, in float64 -- with fixed (critic) coefficients, Rho-1's per-head coefficient function,
selected rows only, gradient accumulation over micro-batches, a scaled backward, checkpointing."""
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import mtp
import train_critic
from support import memory


def _models(make=tiny_llama, n=3, **kw):
    """Two identical models: the all-heads path and the sequential one."""
    a = mtp.MTPModel(make(dtype=torch.float64, **kw), n, sequential_heads=False)
    b = mtp.MTPModel(make(dtype=torch.float64, **kw), n, sequential_heads=True)
    with torch.no_grad():  # heads that differ, so that a mix-up of heads would show
        for pa, pb in zip(a.extra_heads.parameters(), b.extra_heads.parameters()):
            pb.copy_(pa.add_(0.05 * torch.randn_like(pa)))
    return a, b


def _batch(B=3, T=12, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[:, :3] = 0  # a prompt
    mask[0, 9:] = 0  # padding
    return x, mask, mtp.align_to_heads(x, n), mtp.align_to_heads(mask, n)


def _assert_same(out_a, out_b, params_a, params_b):
    torch.testing.assert_close(out_b[0], out_a[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_b[1], out_a[1], rtol=1e-12, atol=1e-12)  # per-pair CE
    assert torch.equal(out_b[2], out_a[2])  # argmax correct
    torch.testing.assert_close(out_b[3], out_a[3], rtol=0, atol=0)  # coefficients
    for (name, pa), pb in zip(params_a, params_b):
        ga, gb = pa.grad, pb.grad
        if ga is None or gb is None:
            assert (ga is None or ga.abs().max() == 0) and (gb is None or gb.abs().max() == 0), name
        else:
            torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("make", [tiny_llama, lambda **kw: tiny_llama(tie=True, **kw), tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "loss-rows"])
def test_critic_coefficients_two_micro_batches(make, rows):
    """Critic weights (fixed per token: exp(A/β) of GAE advantages, whitened over the step's two
    micro-batches), gradients accumulated over both, backward scaled by 2 (as under torchrun)."""
    a, b = _models(make)
    batches = [_batch(seed=s) for s in (1, 2)]
    lam = mtp.head_lambdas(3, 0.8).double()
    adv, ws = [], []
    for x, mask, _, _ in batches:
        values = torch.sigmoid(torch.randn(x.shape, generator=torch.Generator().manual_seed(int(x.sum())),
                                           dtype=torch.float64))
        adv.append(train_critic.gae(train_critic.critic_deltas(values, mask, torch.ones(x.shape[0])), mask, 0.95))
    mean, std = train_critic.masked_mean_std(adv, [m for _, m, _, _ in batches])
    ws = [mtp.align_to_heads(train_critic.critic_weights((A - mean) / std, m, 1.0, 0.1, 5.0), 3)
          for A, (_, m, _, _) in zip(adv, batches)]
    denom = sum((w * v).flatten(1).sum(1) for w, (_, _, _, v) in zip(ws, batches))
    for model in (a, b):
        for w, (x, mask, targets, valid) in zip(ws, batches):
            coef = mtp.loss_coefficients(w, valid, denom, lam)
            r = mtp.head_rows(mask, 3) if rows else None
            out = model(x, targets, coef=coef, chunk_size=5, rows=r)
            (out[0] * 2).backward()
        model.last_out = out
    _assert_same(a.last_out, b.last_out, list(a.named_parameters()), list(b.parameters()))


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("skip", [False, True], ids=["all-pairs", "kept-pairs-only"])
def test_rho1_per_head_coefficients(mode, skip):
    """Rho-1: the sequential path asks for each head's coefficients with that head's CE alone
    (coef_fn(ce_k, head=k)); the all-heads path gets them all at once. Same selection, loss and
    gradients, also when the loss skips the dropped pairs (per-head kept counts)."""
    a, b = _models()
    lam = mtp.head_lambdas(3).double()
    batches = [_batch(seed=s) for s in (3, 4)]
    n_valid = sum(v.flatten(1).sum(1) for *_, v in batches)
    denom = (mtp.selected_count(n_valid, 0.6) if mode == "hard" else n_valid).double()
    calls = []
    for model in (a, b):
        for x, mask, targets, valid in batches:
            ref_ce = torch.rand(valid.shape, generator=torch.Generator().manual_seed(int(x.sum())),
                                dtype=torch.float64) * 5

            def coef_fn(ce, head=None, ref_ce=ref_ce, valid=valid):
                calls.append(head)
                ks = slice(None) if head is None else slice(head, head + 1)
                w = mtp.rho1_weights(ce - ref_ce[ks], valid[ks], 0.6, mode, 2.0).double()
                return mtp.loss_coefficients(w, valid[ks], denom[ks], lam[ks])

            kept = None
            if skip and mode == "hard":
                kept = mtp.selected_count(valid.flatten(1).sum(1), 0.6).tolist()
            out = model(x, targets, coef_fn=coef_fn, chunk_size=4, rows=mtp.head_rows(mask, 3), n_nonzero=kept)
            out[0].backward()
        model.last_out = out
    assert calls == [None, None, 0, 1, 2, 0, 1, 2]
    _assert_same(a.last_out, b.last_out, list(a.named_parameters()), list(b.parameters()))


def test_with_activation_checkpointing_and_autograd_grad():
    """Checkpointed trunk (and heads), and torch.autograd.grad instead of .backward()."""
    a, b = _models(layers=4)
    x, mask, targets, valid = _batch(seed=5)
    w = torch.rand(valid.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coef = mtp.loss_coefficients(w, valid, (w * valid).flatten(1).sum(1), mtp.head_lambdas(3).double())
    grads = []
    for model in (a, b):
        model.train()
        memory.enable_grad_checkpointing(model, heads=model is b)
        loss, *_ = model(x, targets, coef=coef)
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    for ga, gb in zip(*grads):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)


def test_one_head_at_a_time():
    """What the sequential path is for: the head blocks' saved activations are never alive
    together -- at most one head's during the loss's forward, none after it."""
    _, model = _models(n=4)
    x, mask, targets, valid = _batch(n=4, seed=6)
    coef = mtp.loss_coefficients(valid.double(), valid, valid.flatten(1).sum(1).double(), mtp.head_lambdas(4).double())
    heads = [model._last_block, *model.extra_heads]
    alive, most = set(), [0]

    def pack(t):  # a saved tensor: count it under the head whose forward is running
        if running:
            alive.add(running[-1])
            most[0] = max(most[0], len(alive))
        return t

    running = []

    def leave(module, args, output):
        running.pop()

    for k, h in enumerate(heads):
        h.register_forward_pre_hook(lambda m, a, k=k: running.append(k))  # None: same input
        h.register_forward_hook(leave)
    # a head's activations die with its backward: forget it once its parameters have gradients
    orig = torch.autograd.grad

    def grad(outputs, inputs, **kw):
        out = orig(outputs, inputs, **kw)
        alive.clear()
        return out

    torch.autograd.grad = grad
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, *_ = model(x, targets, coef=coef)
    finally:
        torch.autograd.grad = orig
    assert most[0] == 1
    loss.backward()
    assert all(p.grad is not None for p in model.extra_heads.parameters())
