"""The memory model (support/memory.py) with compiled blocks and its derived terms: a compiled copy of
a block keeps at most what an eager one keeps, and measuring it leaves dynamo's caches as they were;
the training and bench.py measure compiled when their blocks compile; the loss's chunk buffers
against what the chunked loss allocates; the peak at one of the backward's two ends. (A compiled
step's peak cannot be measured on the CPU: compiled code allocates outside the dispatcher, and the
CPU keeps no allocator statistics; test_checkpointing.py bounds an eager step's.)"""
import gc
import types

import pytest
import torch
from conftest import tiny_llama
from test_checkpointing import _cfg, _hand_model, _Peak
from torch._dynamo import convert_frame
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import common
import mtp
from support import memory
from tools import bench

pytestmark = pytest.mark.usefixtures("one_thread")

GiB = 2 ** 30


def _blocks_alive() -> int:
    gc.collect()
    return sum(type(o) is LlamaDecoderLayer for o in gc.get_objects())


@pytest.mark.parametrize("amp", [None, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=["fp32", "bf16-autocast"])
def test_a_compiled_block_keeps_at_most_what_an_eager_one_keeps(amp):
    """Tiny Llama (hidden 32, 4 heads of 8, 2 KV heads, MLP 64): per token, the compiled copy keeps
    no more than the eager one in off and selective, and less in off (inductor recomputes the
    element-wise work between the matmuls rather than saving it); full keeps the output alone either
    way. No compiled graph is left on any code object it compiled, and the copy is freed. (One
    compile of the block's forward per mode: 5-8 s with inductor's cache warm, about 25 s cold --
    most of it inductor's start-up; bf16 under autocast, a second such test, is marked slow.)"""
    model = mtp.MTPModel(tiny_llama(layers=5), 3, sequential_heads=True).train()
    eager = memory.measure_blocks(model, "cpu", amp_dtype=amp)
    before, alive = set(convert_frame.input_codes.seen_ids), _blocks_alive()
    compiled = memory.measure_blocks(model, "cpu", amp_dtype=amp, compile=True)
    assert "off" in compiled.compiled and compiled.how().startswith("compiled") and eager.how() == "eager"
    for mode in ("off", "selective"):
        assert compiled.per_token[mode] <= eager.per_token[mode], mode
    assert compiled.per_token["off"] < eager.per_token["off"]
    assert compiled.per_token["full"] == eager.per_token["full"] == 32 * 4
    assert compiled.input_per_token == eager.input_per_token == 32 * 4
    new = [c for ref in convert_frame.input_codes.seen if (c := ref()) is not None and id(c) not in before]
    assert not [c.co_name for c in new if _debug_get_cache_entry_list(c)]
    assert _blocks_alive() == alive


def test_the_training_and_the_bench_measure_compiled_when_their_blocks_compile(monkeypatch):
    """setup_checkpointing passes train.compile and the micro-batches per step (32 sequences of 2 per
    step: 16, so every gradient is alive with the activations); bench.py passes its own compile."""
    calls, real = [], memory.memory_model

    def spy(*args, **kwargs):
        calls.append(dict(zip(("chunk_size", "world", "amp", "compile", "micro_steps"), args[6:])) | kwargs)
        return real(*args[:6])
    monkeypatch.setattr(memory, "memory_model", spy)
    model = mtp.MTPModel(tiny_llama(layers=5), 3, sequential_heads=True).train()
    cpu = common.Dist(0, 1, torch.device("cpu"), None)
    memory.setup_checkpointing(model, _cfg(memory_budget_gb=100, compile=True), cpu, torch.float32, {}, lambda _: None)
    assert calls[-1]["compile"] is True and calls[-1]["micro_steps"] == 16
    args = types.SimpleNamespace(batch=2, seq=32, chunk=0, no_compile=False)
    bench.memory_model_of(model, args, torch.device("cpu"), torch.float32)
    assert calls[-1]["compile"] is True
    bench.memory_model_of(model, types.SimpleNamespace(**{**vars(args), "no_compile": True}), torch.device("cpu"),
                          torch.float32)
    assert calls[-1]["compile"] is False


@pytest.mark.parametrize("dtype, per_logit", [(torch.float32, 4), (torch.bfloat16, 6)])
def test_the_loss_chunk_buffers_are_what_the_eager_chunk_allocates(dtype, per_logit):
    """mtp._fused_linear_ce on the CPU (the eager chunk), 256 rows, vocab 500: what one more 100 rows
    of chunk cost at the peak is what loss_buffers counts per logit -- fp32: the logits alone (the
    upcast and the gradient's cast are no-ops, the rest works in place); bf16: the bf16 logits and
    their fp32 upcast, then the upcast and the gradient's bf16 cast, 6 bytes either way (the old
    count, 8, had all three alive at once) -- and the whole peak is within loss_buffers."""
    V, D, rows = 500, 64, 256
    model = mtp.MTPModel(tiny_llama(vocab=V, hidden=D, layers=2, dtype=dtype), 1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, D, generator=g).to(dtype)
    y = torch.randint(0, V, (rows,), generator=g)
    coef = torch.rand(rows, generator=g)
    W = model.lm_head_weight.detach()
    peak, counted = {}, {}
    for chunk in (100, 200):
        with _Peak([h, W, y, coef]) as p:
            mtp._fused_linear_ce(h, W, y, coef, chunk)
        peak[chunk], counted[chunk] = p.peak, memory.loss_buffers(model, dtype, rows, chunk)
        assert peak[chunk] <= counted[chunk]
    assert counted[200] - counted[100] == 100 * V * per_logit
    assert peak[200] - peak[100] == pytest.approx(100 * V * per_logit, rel=0.02)


def test_the_peak_is_at_one_end_of_the_backward(monkeypatch):
    """Hand numbers: 10 GiB of weights, 8 of gradients; the loss's gradients 1 GiB, one block's 0.5.
    The start of the trunk's backward: activations + 1.5 GiB of gradients; the end: all 8 + one
    block re-materialised (1 GiB). Under gradient accumulation (early_gradients None) every gradient
    counts at the start too."""
    monkeypatch.setattr(memory, "MARGIN_FRACTION", 0.0)
    monkeypatch.setattr(memory, "MARGIN_BYTES", 0.0)
    mem = _hand_model(early_gradients=GiB, block_gradient=GiB / 2)
    mem.static["gradients"] = 8 * GiB
    off, full = memory.CheckpointPlan(4), memory.CheckpointPlan(4, 4)
    assert mem.total(off) == mem.total(full) == (10 + 8 + 1) * GiB  # the end: gradients + one block
    mem.static["gradients"] = 2 * GiB
    assert mem.total(off) == (10 + 4 + 1 + 1.5) * GiB and mem.total(full) == (10 + 2 + 1) * GiB
    assert memory.pick_checkpointing(mem, 4, 13).cost == 4  # only all-full fits 13 GiB
    line = mem.describe(off)
    assert "gradients so far 1.50" in line.split(";")[0] and "all gradients 2.00" in line.split(";")[1]
    mem.early_gradients = None  # every gradient alive from the first activation on
    assert mem.total(off) == (10 + 4 + 1 + 2.5) * GiB
