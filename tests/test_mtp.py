"""The MTP model and the weighted loss against independent references: the base model itself,
a naive float64 loss that materialises every head's logits, and hand-computed examples."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama

import common
import mtp
from support import config, memory, model_io


@pytest.mark.parametrize("make", [tiny_llama, lambda **kw: tiny_llama(tie=True, **kw), tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
def test_one_head_is_the_base_model(make):
    base = make()
    x = torch.randint(0, 97, (2, 13))
    expected = base(x).logits
    model = mtp.MTPModel(base, 1)
    hiddens, _ = model.hidden_states(x)
    assert hiddens.shape[0] == 1
    torch.testing.assert_close(hiddens[0] @ model.lm_head_weight.t(), expected, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_four_heads_at_init(make):
    """Head 0 reproduces the base model; heads 1..3 are copies of the last block, so at init
    they produce the same hidden states as head 0 (they differ only once trained)."""
    base = make()
    x = torch.randint(0, 97, (2, 9))
    expected = base(x).logits
    model = mtp.MTPModel(base, 4)
    hiddens, _ = model.hidden_states(x, use_cache=False)
    assert hiddens.shape == (4, 2, 9, 32)
    torch.testing.assert_close(hiddens[0] @ model.lm_head_weight.t(), expected, rtol=0, atol=1e-5)
    for k in range(1, 4):
        torch.testing.assert_close(hiddens[k], hiddens[0], rtol=0, atol=1e-6)
    # parameter-matched: each extra head adds exactly one block
    n_block = sum(p.numel() for p in mtp.find_blocks(base)[1][-1].parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) + 3 * n_block


def test_extra_heads_are_independent_parameters():
    model = mtp.MTPModel(tiny_llama(), 3)
    with torch.no_grad():
        for p in model.extra_heads[0].parameters():
            p.add_(1.0)
    x = torch.randint(0, 97, (1, 7))
    h, _ = model.hidden_states(x, use_cache=False)
    assert not torch.allclose(h[1], h[0]) and torch.allclose(h[2], h[0], atol=1e-6)


def test_unwrappable_model_gets_a_clear_error():
    class NotStacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.base_model = torch.nn.Module()

    with pytest.raises(ValueError, match="one stack"):
        mtp.MTPModel(NotStacked(), 2)
    base = tiny_llama()
    base.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        mtp.MTPModel(base, 2)


def test_align_to_heads_hand_made():
    x = torch.tensor([[10, 11, 12, 13, 14]])
    got = mtp.align_to_heads(x, 3, fill=-1)
    # head k at position t predicts token t+k+1
    assert got[0].tolist() == [[11, 12, 13, 14, -1]]
    assert got[1].tolist() == [[12, 13, 14, -1, -1]]
    assert got[2].tolist() == [[13, 14, -1, -1, -1]]


def _random_problem(model, B=3, T=10, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, :2] = 0  # a prompt
    mask[0, 7:] = 0  # padding
    valid = mtp.align_to_heads(mask, n)
    w = torch.rand(n, B, T, generator=g, dtype=torch.float64) * 2
    denom = (w * valid).flatten(1).sum(1)
    coef = mtp.loss_coefficients(w, valid, denom, mtp.head_lambdas(n, 0.7).double())
    return x, mtp.align_to_heads(x, n), coef, (w, valid, mtp.head_lambdas(n, 0.7))


@pytest.mark.parametrize("make", [tiny_llama, lambda **kw: tiny_llama(tie=True, **kw), tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_loss_and_gradients_equal_naive_float64(make, chunk):
    model = mtp.MTPModel(make(dtype=torch.float64), 3)
    x, targets, coef, (w, valid, lambdas) = _random_problem(model)
    params = [p for p in model.parameters()]
    loss, ce, _, _ = model(x, targets, coef=coef, chunk_size=chunk)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    hiddens, _ = model.hidden_states(x, use_cache=False)
    # the specification (mtp.weighted_mtp_loss): every head's logits at once, from the raw weights
    naive = mtp.weighted_mtp_loss(hiddens, model.lm_head_weight, targets, w, valid, lambdas)
    naive_grads = torch.autograd.grad(naive, params, allow_unused=True)
    torch.testing.assert_close(loss, naive, rtol=1e-12, atol=1e-12)
    for g, ng in zip(grads, naive_grads):
        if ng is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, ng, rtol=1e-9, atol=1e-12)
    # the per-token CE that comes back is the real CE of each head's prediction
    logits = hiddens @ model.lm_head_weight.t()
    torch.testing.assert_close(ce, F.cross_entropy(logits.flatten(0, 2), targets.reshape(-1),
                                                   reduction="none").view_as(ce))


def test_scaling_all_weights_changes_nothing():
    """Σw normalisation: a weighting that is c on average is not a c-times learning rate."""
    model = mtp.MTPModel(tiny_llama(dtype=torch.float64), 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (2, 8), generator=g)
    valid = mtp.align_to_heads(torch.ones_like(x), 2)
    w = torch.rand(2, 2, 8, generator=g, dtype=torch.float64)
    lam = mtp.head_lambdas(2).double()

    def loss_and_grads(weights):
        coef = mtp.loss_coefficients(weights, valid, (weights * valid).flatten(1).sum(1), lam)
        loss, *_ = model(x, mtp.align_to_heads(x, 2), coef=coef)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    l1, g1 = loss_and_grads(w)
    l2, g2 = loss_and_grads(w * 13.7)
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_weight_belongs_to_the_target_token():
    """Put weight on one token j only: every head must then learn exactly its prediction of j,
    i.e. head k from position j-k-1 -- computed here directly from the logits."""
    n, j = 3, 5
    model = mtp.MTPModel(tiny_llama(dtype=torch.float64), n)
    with torch.no_grad():  # make the heads differ so a misalignment would show
        for p in model.extra_heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 97, (1, 8))
    w_token = torch.zeros(1, 8, dtype=torch.float64)
    w_token[0, j] = 1.0  # target-indexed: the weight of token j
    w = mtp.align_to_heads(w_token, n)
    valid = mtp.align_to_heads(torch.ones_like(x), n)
    coef = mtp.loss_coefficients(w, valid, (w * valid).flatten(1).sum(1), mtp.head_lambdas(n).double())
    loss, *_ = model(x, mtp.align_to_heads(x, n), coef=coef)

    hiddens, _ = model.hidden_states(x, use_cache=False)
    logits = hiddens @ model.lm_head_weight.t()  # [n, 1, T, V]
    expected = sum(F.cross_entropy(logits[k, 0, j - k - 1][None], x[0, j][None]) for k in range(n))
    torch.testing.assert_close(loss, expected)


def test_rho1_selection_hand_computed():
    # one head, one sequence; excess values and validity chosen by hand
    excess = torch.tensor([[[0.5, -1.0, 2.0, 0.1, 3.0, 9.0]]])
    valid = torch.tensor([[[1, 1, 1, 1, 1, 0]]])  # the 9.0 is padding: never selected
    # 5 valid, ρ=0.6 -> keep ceil(3.0) = 3: the values 3.0, 2.0, 0.5
    w = mtp.rho1_weights(excess, valid, 0.6)
    assert w.tolist() == [[[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]]
    # ρ=0.5 -> ceil(2.5) = 3 as well; ρ=0.4 -> 2
    assert mtp.rho1_weights(excess, valid, 0.4).tolist() == [[[0.0, 0.0, 1.0, 0.0, 1.0, 0.0]]]
    # ties are broken by position, so the count stays exact
    tied = mtp.rho1_weights(torch.zeros(1, 1, 4), torch.ones(1, 1, 4), 0.5)
    assert tied.tolist() == [[[1.0, 1.0, 0.0, 0.0]]]


def test_rho1_selects_per_head():
    excess = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]])
    w = mtp.rho1_weights(excess, torch.ones(2, 1, 3), 0.34)  # ceil(1.02) = 2 per head
    assert w.tolist() == [[[0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]]


def test_rho1_ratio_one_is_uniform_mtp():
    model = mtp.MTPModel(tiny_llama(dtype=torch.float64), 3)
    x, targets, _, _ = _random_problem(model)
    mask = torch.ones_like(x)
    mask[:, :3] = 0
    valid = mtp.align_to_heads(mask, 3)
    lam = mtp.head_lambdas(3).double()
    uniform = mtp.loss_coefficients(valid.double(), valid, valid.flatten(1).sum(1).double(), lam)
    l_uniform, *_ = model(x, targets, coef=uniform)

    def rho1_coef(ce):
        w = mtp.rho1_weights(ce - torch.randn_like(ce), valid, 1.0)
        return mtp.loss_coefficients(w.double(), valid, valid.flatten(1).sum(1).double(), lam)

    l_rho, *_ = model(x, targets, coef_fn=rho1_coef)
    torch.testing.assert_close(l_rho, l_uniform)


def test_rho1_soft_weights_have_mean_one_and_order():
    excess = torch.tensor([[[0.0, 1.0, 2.0, 5.0]]])
    valid = torch.tensor([[[1, 1, 1, 0]]])
    w = mtp.rho1_weights(excess, valid, 1.0, mode="soft", temperature=2.0)
    assert w[0, 0, 3] == 0
    torch.testing.assert_close(w[0, 0, :3].mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[0, 0, 1] / w[0, 0, 0], torch.tensor(0.5).exp())


def test_reference_token_ce_is_next_token_ce():
    ref = tiny_llama(seed=3)
    x = torch.randint(0, 97, (2, 9))
    got = mtp.reference_token_ce(mtp.MTPModel(ref, 1), x, chunk_size=4)
    logits = ref(x).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1), reduction="none")
    assert (got[:, 0] == 0).all()
    torch.testing.assert_close(got[:, 1:].reshape(-1), expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_mismatch_names_both_models():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    a, b = Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0})
    with pytest.raises(ValueError, match="policy 'org/policy'.*reference 'org/ref'"):
        model_io.check_same_tokenizer(a, b, "org/policy", "org/ref")
    model_io.check_same_tokenizer(a, Tok({"a": 0, "b": 1}), "x", "y")  # same vocab: fine


def test_consolidated_checkpoint_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM
    model = mtp.MTPModel(tiny_llama(tie=True), 3)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_io.save_consolidated(model, None, str(tmp_path))
    x = torch.randint(0, 97, (2, 6))
    expected, _ = model.hidden_states(x, use_cache=False)

    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM.from_pretrained(str(tmp_path))  # plain transformers: trunk + head 0
    torch.testing.assert_close(base(x).logits, expected[0] @ model.lm_head_weight.t())
    heads = mtp.MTPModel(base, 3)
    from safetensors.torch import load_file
    heads.load_state_dict(load_file(str(tmp_path / model_io.MTP_HEADS)), strict=False)
    got, _ = heads.hidden_states(x, use_cache=False)
    torch.testing.assert_close(got, expected)
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path)).config.tie_word_embeddings


def test_load_policy_keeps_the_trained_heads_of_a_wmtp_export(tmp_path):
    """Fine-tuning a WMTP export further (e.g. after a head warm-up) starts from its trained
    heads, not from fresh copies of the last block; a different n_heads is refused."""
    from conftest import char_tokenizer
    model = mtp.MTPModel(tiny_llama(vocab=99), 3)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_io.save_consolidated(model, char_tokenizer(tmp_path / "tok"), str(tmp_path / "ckpt"))
    loaded, _ = common.load_policy(str(tmp_path / "ckpt"), 3)
    x = torch.randint(0, 99, (2, 6))
    torch.testing.assert_close(loaded.hidden_states(x, use_cache=False)[0], model.hidden_states(x, use_cache=False)[0])
    with pytest.raises(config.ConfigError, match="'model.n_heads' is 2 but .* has n_heads=3"):
        common.load_policy(str(tmp_path / "ckpt"), 2)


def test_warmup_cosine():
    lr = [common.warmup_cosine(s, 2, 10, 0.1) for s in range(11)]
    assert lr[0] == 0.5 and lr[1] == 1.0 and lr[2] == 1.0
    assert abs(lr[10] - 0.1) < 1e-9 and all(a >= b for a, b in zip(lr[2:], lr[3:]))


def test_activation_checkpointing_keeps_gradients():
    """Recomputing block activations in the backward (extra heads included) changes no gradient."""
    def grads(ckpt):
        model = mtp.MTPModel(tiny_llama(dtype=torch.float64), 3).train()
        if ckpt:
            memory.enable_grad_checkpointing(model)
        x, targets, coef, _ = _random_problem(model)
        loss, *_ = model(x, targets, coef=coef)
        return torch.autograd.grad(loss, list(model.parameters()))

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_loss_on_rows_only_equals_full_loss():
    """Running the unembedding only on the pairs in the loss (loss_rows) changes nothing."""
    model = mtp.MTPModel(tiny_llama(dtype=torch.float64), 3)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 97, (2, 9), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    valid = mtp.align_to_heads(mask, 3)
    w = torch.rand(3, 2, 9, generator=g, dtype=torch.float64)
    coef = mtp.loss_coefficients(w, valid, (w * valid).flatten(1).sum(1), mtp.head_lambdas(3).double())
    targets = mtp.align_to_heads(x, 3)
    rows = mtp.loss_rows(mask, 3)
    assert len(rows) == int(valid.sum())
    full = model(x, targets, coef=coef)
    some = model(x, targets, coef=coef, rows=rows)
    torch.testing.assert_close(some[0], full[0])
    torch.testing.assert_close(some[1] * valid, full[1] * valid)
    g_full = torch.autograd.grad(full[0], list(model.parameters()))
    g_some = torch.autograd.grad(some[0], list(model.parameters()))
    for a, b in zip(g_full, g_some):
        torch.testing.assert_close(a, b)
    ref = mtp.MTPModel(tiny_llama(seed=2, dtype=torch.float64), 1)
    torch.testing.assert_close(mtp.reference_token_ce(ref, x, rows=mtp.loss_rows(mask, 1)) * mask,
                               mtp.reference_token_ce(ref, x) * mask)


def test_rho1_loss_on_selected_rows_only_equals_full_loss():
    """With the number of kept pairs known (n_nonzero), the loss skips the dropped ones: same
    loss, same gradients."""
    model = mtp.MTPModel(tiny_llama(dtype=torch.float64), 3)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 97, (2, 10), generator=g)
    mask = torch.ones_like(x)
    mask[:, :3] = 0
    valid = mtp.align_to_heads(mask, 3)
    lam = mtp.head_lambdas(3).double()
    n_valid = valid.flatten(1).sum(1)
    denom = mtp.selected_count(n_valid, 0.6).double()
    ref_ce = torch.rand(3, 2, 10, generator=g, dtype=torch.float64)

    def coef_fn(ce):
        return mtp.loss_coefficients(mtp.rho1_weights(ce - ref_ce, valid, 0.6).double(), valid, denom, lam)

    rows = mtp.loss_rows(mask, 3)
    full = model(x, mtp.align_to_heads(x, 3), coef_fn=coef_fn)
    some = model(x, mtp.align_to_heads(x, 3), coef_fn=coef_fn, rows=rows, n_nonzero=int(denom.sum()))
    torch.testing.assert_close(some[0], full[0])
    torch.testing.assert_close(some[1] * valid, full[1] * valid)  # logged CE still covers every valid pair
    for a, b in zip(torch.autograd.grad(full[0], list(model.parameters())),
                    torch.autograd.grad(some[0], list(model.parameters()))):
        torch.testing.assert_close(a, b)
