"""Meta's released MTP format (facebook/multi-token-prediction) loads into MTPModel with the
logits of every head equal to an independent plain-PyTorch forward of Meta's architecture.

The checkpoint is random but has the exact format: `consolidated.pth` keys `tok_embeddings`,
`layers.{i}.attention.{wq,wk,wv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}`,
`layers.{i}.{attention_norm,ffn_norm}`, `extra_heads.{j}.*` (same block layout), `norm`,
`output`; `params.json` with dim, n_layers (counting the extra heads), n_heads, n_kv_heads,
vocab_size, multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, n_future_tokens.
The reference forward below follows Meta's llama/model.py conventions: complex rotary
embeddings on *interleaved* pairs, RMSNorm, SwiGLU, grouped-query attention, and the MTP
forward (trunk = layers[:-1]; heads = [layers[-1]] + extra_heads on the trunk output; shared
norm and output)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from support import model_io


def ffn_dim(dim, multiple_of, ffn_dim_multiplier=None):  # Meta's FeedForward sizing
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def write_meta_checkpoint(path, n_future, seed=0):
    params = {"dim": 64, "n_layers": 4 + n_future - 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 101,
              "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_seq_len": 128, "n_future_tokens": n_future}
    g = torch.Generator().manual_seed(seed)
    d, hd = params["dim"], params["dim"] // params["n_heads"]
    kv = params["n_kv_heads"] * hd
    f = ffn_dim(d, params["multiple_of"])
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731

    def block(prefix):
        return {prefix + "attention.wq.weight": r(d, d), prefix + "attention.wk.weight": r(kv, d),
                prefix + "attention.wv.weight": r(kv, d), prefix + "attention.wo.weight": r(d, d),
                prefix + "feed_forward.w1.weight": r(f, d), prefix + "feed_forward.w2.weight": r(d, f),
                prefix + "feed_forward.w3.weight": r(f, d),
                prefix + "attention_norm.weight": 1 + r(d), prefix + "ffn_norm.weight": 1 + r(d)}

    sd = {"tok_embeddings.weight": r(params["vocab_size"], d), "norm.weight": 1 + r(d),
          "output.weight": r(params["vocab_size"], d)}
    for i in range(params["n_layers"] - n_future + 1):
        sd |= block(f"layers.{i}.")
    for j in range(n_future - 1):
        sd |= block(f"extra_heads.{j}.")
    torch.save(sd, path / "consolidated.pth")
    (path / "params.json").write_text(json.dumps(params))
    return sd, params


def meta_forward(sd, p, tokens):
    """Logits of every head, [n_future, B, T, V], computed the way Meta's code does."""
    B, T = tokens.shape
    hd, nh, nkv, eps = p["dim"] // p["n_heads"], p["n_heads"], p["n_kv_heads"], p["norm_eps"]
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # x: [B, T, heads, hd]; pairs (0,1), (2,3), ... are complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def block(pre, h):
        x = rms(h, sd[pre + "attention_norm.weight"])
        q = (x @ sd[pre + "attention.wq.weight"].t()).view(B, T, nh, hd)
        k = (x @ sd[pre + "attention.wk.weight"].t()).view(B, T, nkv, hd)
        v = (x @ sd[pre + "attention.wv.weight"].t()).view(B, T, nkv, hd)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(hd)
        scores = scores + torch.full((T, T), float("-inf")).triu(1)
        att = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)
        h = h + att @ sd[pre + "attention.wo.weight"].t()
        x = rms(h, sd[pre + "ffn_norm.weight"])
        ff = F.silu(x @ sd[pre + "feed_forward.w1.weight"].t()) * (x @ sd[pre + "feed_forward.w3.weight"].t())
        return h + ff @ sd[pre + "feed_forward.w2.weight"].t()

    n_layers = p["n_layers"] - p["n_future_tokens"] + 1
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(n_layers - 1):
        h = block(f"layers.{i}.", h)
    heads = [f"layers.{n_layers - 1}."] + [f"extra_heads.{j}." for j in range(p["n_future_tokens"] - 1)]
    return torch.stack([rms(block(pre, h), sd["norm.weight"]) @ sd["output.weight"].t() for pre in heads])


@pytest.mark.parametrize("n_future", [1, 4])
def test_meta_checkpoint_logits_match_every_head(tmp_path, n_future):
    sd, params = write_meta_checkpoint(tmp_path, n_future)
    assert model_io.is_meta_checkpoint(str(tmp_path))
    model, tok = model_io.load_meta_checkpoint(str(tmp_path))
    assert model.n_heads == n_future and tok is None
    tokens = torch.randint(0, 101, (2, 17))
    expected = meta_forward(sd, params, tokens)
    with torch.no_grad():
        hiddens, _ = model.hidden_states(tokens, use_cache=False)
        got = hiddens @ model.lm_head_weight.t()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the heads really differ (a mapping that used one block for all heads would fail)
    if n_future > 1:
        assert (expected[1] - expected[0]).abs().max() > 1e-2


def test_meta_checkpoint_with_unknown_keys_is_an_error(tmp_path):
    sd, _ = write_meta_checkpoint(tmp_path, 2)
    sd["layers.0.attention.bogus.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "consolidated.pth")
    with pytest.raises(ValueError, match="unexpected key 'layers.0.attention.bogus.weight'"):
        model_io.load_meta_checkpoint(str(tmp_path))
