"""
ckpt_probe.py — does each activation-checkpointing mode do what it says, on this stack? For a stack
of Llama blocks (TinyLlama's shape by default), eager and compiled, in each mode (off, selective,
full): what a block keeps per token for its backward, how many matmuls the backward runs, the
time of a forward + backward, and dynamo's graph breaks.

    python -m tools.ckpt_probe                        # on the GPU: 2 blocks, 4 x 4096 tokens, bf16
    python -m tools.ckpt_probe --hidden=256 --inter=688 --heads=8 --batch=1 --seq=64   # a CPU look

What to expect when it works (docs/benchmarks.md has an H200's numbers): off keeps the most and
its backward runs 14 matmuls a block (the gradients of the block's 7); full keeps only the
block's input and recomputes the 7 (21 a block); selective keeps the matmul and attention outputs
and -- compiled -- runs off's 14, no more. A compiled selective block that keeps about what full
keeps, or runs more matmuls than off, has lost its policy (support/memory.py: checkpoint_block).
"Keeps" is read from CUDA's allocator, so on the CPU it is 0. An eager selective block counts 21 a
block, as full does: the profiler sees the matmuls that SAC's recomputation answers from its cache
(no kernel runs); compiled, the count is the graph's.
"""
from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass

import torch

import common
from support import config, memory


@dataclass
class ProbeConfig:
    hidden: int = 2048               # the blocks' shape (default: TinyLlama's, the 1.1B of tools/bench.py)
    inter: int = 5632                # MLP width
    heads: int = 32                  # attention heads
    kv_heads: int = 4                # key/value heads
    layers: int = 2                  # blocks in the stack
    batch: int = 4                   # sequences
    seq: int = 4096                  # tokens per sequence
    steps: int = 3                   # timed forward + backward passes (after 2 untimed)
    device: str = "auto"             # auto, cpu, cuda, cuda:N or mps


def build(cfg: ProbeConfig, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.inter,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq)
    torch.manual_seed(0)
    return LlamaForCausalLM(lc).to(device, dtype).train()


def one_pass(model, x, count_mm: bool):
    """Forward through the blocks and backward from a scalar -> (bytes alive after the forward
    that were not before it, aten matmuls in the backward or -1)."""
    cuda = x.device.type == "cuda"
    pos = torch.arange(x.shape[1], device=x.device)[None]
    pe = model.model.rotary_emb(x, pos)
    before = torch.cuda.memory_allocated() if cuda else 0
    h = x
    for block in model.model.layers:
        h = block(h, position_embeddings=pe, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
    kept = (torch.cuda.memory_allocated() - before) if cuda else 0
    loss = h.float().pow(2).mean()
    if not count_mm:
        loss.backward()
        return kept, -1
    with torch.profiler.profile() as prof:
        loss.backward()
    return kept, sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


def probe(cfg: ProbeConfig, mode: str, compiled: bool, device, dtype) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build(cfg, device, dtype)
    for block in model.model.layers:
        memory.checkpoint_block(block, mode)
        if compiled:
            block.compile()
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, device=device, dtype=dtype, requires_grad=True)
    for _ in range(2):
        one_pass(model, x, False)
    kept, mm = one_pass(model, x, True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        one_pass(model, x, False)
    sync()
    breaks = collections.Counter(torch._dynamo.utils.counters["graph_break"])
    return {"kib": kept / (cfg.batch * cfg.seq * cfg.layers) / 1024, "mm": mm,
            "ms": (time.perf_counter() - t0) / cfg.steps * 1e3, "breaks": breaks}


def main(argv: list[str]):
    cfg = config.parse_config(ProbeConfig, argv)
    device = common.pick_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {device}, {dtype}, "
          f"{cfg.layers} blocks, {cfg.batch} x {cfg.seq} tokens")
    print("| blocks | mode | keeps per token per block | backward matmuls | forward + backward | graph breaks |")
    print("|---|---|---:|---:|---:|---|")
    for compiled in (False, True):
        for mode in ("off", "selective", "full"):
            r = probe(cfg, mode, compiled, device, dtype)
            why = "; ".join(k.splitlines()[0][:80] for k in r["breaks"])
            print(f"| {'compiled' if compiled else 'eager'} | {mode} | {r['kib']:.1f} KiB | {r['mm']} | "
                  f"{r['ms']:.1f} ms | {sum(r['breaks'].values())}{' (' + why + ')' if why else ''} |", flush=True)


if __name__ == "__main__":
    config.run_main(main, sys.argv[1:])
