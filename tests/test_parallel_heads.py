"""parallel_heads: the last block and the extra heads as one batched block equal the Hugging Face
blocks run one by one; decoding through it still equals plain greedy decoding and accepts what
the cache-free reference accepts."""
import pytest
import torch
from conftest import tiny_gpt2
from test_eval import TOK, mtp_model
from test_speculative import SPARSE, random_prompts, reference_tree_forwards

import mtp
from decoding import parallel_heads, sampling, speculative

pytestmark = pytest.mark.usefixtures("one_thread")


def test_equals_the_blocks_one_by_one():
    """Blocks [last, heads...] on one input with a causal mask over S slots, T tokens written at
    slots 3..3+T-1 of an otherwise empty cache: every block's output and its keys/values equal
    the HF block's (GQA, RoPE at positions 3.., float64)."""
    model = mtp_model(31, 4, 0.3)
    assert parallel_heads.supported(model)
    ph = parallel_heads.ParallelHeads(model)
    B, T, S, D = 2, 5, 12, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(3, 3 + T).expand(B, T)
    cos, sin = model.base.model.rotary_emb(x, pos)
    slots = torch.arange(S)
    visible = (slots[None, :] <= pos[0, :, None]) & (slots[None, :] >= 3)  # [T, S]: the block, causally
    neg = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    mask = torch.where(visible, torch.zeros((), dtype=torch.float64), neg).expand(B, 1, T, S)
    hkv, hd = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    keys, values = torch.zeros(4, B, hkv, S, hd, dtype=torch.float64), torch.zeros(4, B, hkv, S, hd, dtype=torch.float64)
    out = ph(x, cos, sin, mask, keys, values, 3 + torch.arange(T).expand(B, T), sampling._slot_attention)
    blocks = [model._last_block, *model.extra_heads]
    causal = torch.where(torch.ones(T, T, dtype=torch.bool).tril(), torch.zeros((), dtype=torch.float64), neg)
    for i, block in enumerate(blocks):
        cache = sampling._RecordingCache()
        with sampling._SlotAttention(model.config):
            ref = block(x, attention_mask=causal.expand(B, 1, T, T), position_ids=pos, position_embeddings=(cos, sin),
                        use_cache=True, **{sampling._cache_kwarg(block): cache})
        ref = ref[0] if isinstance(ref, tuple) else ref
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        li = block.self_attn.layer_idx
        torch.testing.assert_close(keys[i, :, :, 3:3 + T], cache.keys[li], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(values[i, :, :, 3:3 + T], cache.values[li], rtol=1e-12, atol=1e-12)
        assert keys[i, :, :, :3].abs().sum() == 0 and keys[i, :, :, 3 + T:].abs().sum() == 0


@pytest.mark.parametrize("tree,batch_size", [(None, 1), (None, 3), ((2, 2, 1), 2), (SPARSE, 1)])
def test_decoding_through_it_equals_plain_greedy_and_the_reference(tree, batch_size):
    vocab, max_new = 11, 30
    model = mtp_model(vocab, 4, 0.3)
    prompts = random_prompts(vocab, 5, seed=4)
    spec, st = speculative.decode_rows(model, TOK, prompts, max_new, [], set(), batch_size=batch_size, tree=tree,
                                    parallel_heads=True)
    plain, _ = speculative.decode_rows(model, TOK, prompts, max_new, [], set(), speculative=False, batch_size=batch_size)
    assert spec == plain
    nodes = speculative.draft_tree(tree if tree is not None else (1, 1, 1))["nodes"]
    for i, p in enumerate(prompts):
        forwards, tokens, _ = reference_tree_forwards(model, p, max_new, nodes)
        assert tokens == plain[i] and st["forwards"][i] == forwards, i  # the heads' caches are right


def test_other_blocks_are_not_supported():
    assert not parallel_heads.supported(mtp.MTPModel(tiny_gpt2(), 3))
    assert not parallel_heads.supported(mtp_model(11, 1, 0.0))  # no extra heads
