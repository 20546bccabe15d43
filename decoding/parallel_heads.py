"""
parallel_heads.py — the last block and the extra heads, run as one batched block when decoding.

    ph = parallel_heads.ParallelHeads(model)       # where parallel_heads.supported(model)
    h = ph(x, cos, sin, mask, keys, values, at, attention)   # [n, B, T, D], every head's block output

Why: every MTP head (Gloeckle et al. 2024, Fig. 1) is a copy of the last block applied to the
same input, the trunk's output. A speculative forward runs n such blocks where plain decoding
runs one. At batch 1 a block costs its ~35 small kernels, not its arithmetic, so n blocks run one
after another cost n blocks. Stacked -- weights [n, ...], one batched matmul per projection, one
attention call over the n layers' caches -- they cost about one. The arithmetic is the blocks'
own (Llama's RMSNorm, RoPE, GQA attention, SwiGLU), tested against the Hugging Face blocks
(tests/test_parallel_heads.py); q/k/v and gate/up are each fused into one matmul.

Llama-family blocks only (`supported`); others take the blocks one by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BLOCKS = ("LlamaDecoderLayer",)  # q/k/v/o, gate/up/down, two RMSNorms, RoPE, no q/k norms


def supported(model) -> bool:
    """Can `ParallelHeads` run this MTP model's last block and heads? (Llama-family, SiLU, no
    biases, no sliding window.)"""
    blocks = [model._last_block, *getattr(model, "extra_heads", [])]
    cfg = model.config
    if len(blocks) < 2 or type(blocks[0]).__name__ not in _BLOCKS:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "sliding_window", None):
        return False
    lin = [m for b in blocks for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                       b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)]
    return all(m.bias is None for m in lin)


class ParallelHeads:
    """The stacked weights of blocks [last, head 1, ..., head n-1] (copies: decoding never
    trains), and their forward over one shared input."""

    @torch.no_grad()
    def __init__(self, model):
        blocks = [model._last_block, *model.extra_heads]
        att = blocks[0].self_attn
        self.n = len(blocks)
        self.hd = att.head_dim
        self.n_q, self.n_kv = att.q_proj.out_features, att.k_proj.out_features
        self.scaling = att.scaling
        self.eps = blocks[0].input_layernorm.variance_epsilon
        self.layers = [b.self_attn.layer_idx for b in blocks]  # their slots in the cache
        self.ln1 = torch.stack([b.input_layernorm.weight for b in blocks])[:, None, :]  # [n, 1, D]
        self.ln2 = torch.stack([b.post_attention_layernorm.weight for b in blocks])[:, None, :]
        self.w_qkv = torch.stack([torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight,
                                             b.self_attn.v_proj.weight]) for b in blocks])  # [n, Nq+2Nkv, D]
        self.w_o = torch.stack([b.self_attn.o_proj.weight for b in blocks])
        self.w_gu = torch.stack([torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]) for b in blocks])
        self.w_d = torch.stack([b.mlp.down_proj.weight for b in blocks])
        self.ffn = blocks[0].mlp.gate_proj.out_features

    def _norm(self, x, w):  # LlamaRMSNorm, in its order of operations
        x32 = x.to(torch.float32)
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def __call__(self, x, cos, sin, mask, keys, values, at, attention):
        """x [B, T, D] (the trunk's output), cos/sin [B, T, hd] (the model's rotary embedding),
        mask [B, 1, T, S] additive; keys/values [n, B, Hkv, S, hd] the n layers' caches, written
        at slots `at` [B, T]; attention(module, q, k, v, mask, scaling=) -> [B', T, H, hd]
        (sampling._slot_attention). -> every block's output [n, B, T, D] (before the final norm)."""
        n, (B, T, D) = self.n, x.shape
        rows = x.reshape(1, B * T, D)
        h = self._norm(rows, self.ln1)  # [n, BT, D]
        qkv = torch.bmm(h, self.w_qkv.transpose(1, 2))
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], -1)
        q, k, v = (t.reshape(n, B, T, -1, self.hd).transpose(2, 3) for t in (q, k, v))  # [n, B, H, T, hd]
        c, s = cos[:, None], sin[:, None]  # [B, 1, T, hd]
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        idx = at[None, :, None, :, None].expand(n, B, k.shape[2], T, self.hd)
        keys.scatter_(3, idx, k)
        values.scatter_(3, idx, v)
        S = keys.shape[3]
        out = attention(None, q.reshape(n * B, -1, T, self.hd), keys.view(n * B, -1, S, self.hd),
                        values.view(n * B, -1, S, self.hd), mask.repeat(n, 1, 1, 1), scaling=self.scaling)[0]
        r = rows + torch.bmm(out.reshape(n, B * T, self.n_q), self.w_o.transpose(1, 2))  # [n, BT, D]
        gu = torch.bmm(self._norm(r, self.ln2), self.w_gu.transpose(1, 2))
        g, u = gu.split([self.ffn, self.ffn], -1)
        r = r + torch.bmm(F.silu(g) * u, self.w_d.transpose(1, 2))
        return r.view(n, B, T, D)


def _rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), dim=-1)
