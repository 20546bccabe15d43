"""One chunk of the weighted loss in one Triton kernel: per row, the cross-entropy, whether the
target's logit is the largest, and the gradient coef · (softmax − onehot) written over the logits.

mtp._fused_linear_ce computes a chunk of logits with cuBLAS, hands them to this kernel and feeds
what it writes to the two gradient matmuls. torch.compile of the same arithmetic (mtp._ce_chunk)
reads every logit three times (the max, the sum of exponentials, the gradient). Here one program
walks one row twice (docs/design.md §4):

  pass 1: the running max m and the sum s of exp(x − m) together, rescaling s whenever m grows
          (the "online softmax" of Milakov & Gimelshein 2018, as FlashAttention and Liger-Kernel's
          cross-entropy use it), so one read gives log-sum-exp = m + log s;
  pass 2: (exp(x − lse) − [column = target]) · coef, written in the logits' place -- one
          chunk-sized buffer fewer alive than a separate gradient.

On an H200 (`python -m tools.bench --ce_chunk`) a chunk of 1024 bf16 rows takes 217 µs at vocab
128k against torch.compile's 574 µs, 53 against 137 at 32k: 2.6× faster, 3.6 TB/s counting two
reads and a write. The configuration is the fastest of a sweep of 151 (steps of 4096-16384
columns, 4-16 warps, 1-3 pipeline stages, persistent grids of 1-8 programs per SM or one program per
row); none was faster by more than 1% (docs/benchmarks.md). CUDA only (Triton comes with
PyTorch's CUDA wheels); elsewhere mtp uses _ce_chunk. tests/test_ce_kernel.py checks it against
float64 in Triton's interpreter on a CPU.
"""
import torch
import triton
import triton.language as tl

BLOCK = 8192  # columns per step of a row walk (8 warps: 32 fp32 values per thread)
NUM_WARPS = 8


@triton.jit
def _ce_row(x_ptr, stride, y_ptr, coef_ptr, ce_ptr, correct_ptr, V,
            NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    y = tl.load(y_ptr + row)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    x_y = tl.load(base + y).to(tl.float32)
    tl.store(ce_ptr + row, lse - x_y)
    tl.store(correct_ptr + row, x_y == m)
    if NEED_GRAD:
        c = tl.load(coef_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)) * c
            tl.store(base + cols, g.to(x_ptr.dtype.element_ty), mask=cols < V)


def applies(logits_dtype, acc, out_dtype, need_grad: bool) -> bool:
    """Whether ce_chunk computes what mtp._ce_chunk would: fp32 statistics, and a gradient in the
    logits' own dtype (it is written over them). logits_dtype None: the dtype a CUDA matmul of
    out_dtype operands gives (autocast's where it is on)."""
    if logits_dtype is None:
        logits_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else out_dtype
    return acc == torch.float32 and (logits_dtype == out_dtype or not need_grad)


def ce_chunk(logits: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, need_grad: bool,
             block: int = BLOCK, num_warps: int = NUM_WARPS):
    """logits [R, V] (rows of contiguous columns; overwritten by the gradient when need_grad),
    y [R] target ids, coef [R] (read only when need_grad) -> (ce [R] fp32, correct [R] bool, the
    gradient [R, V] in the logits' dtype -- the logits' own buffer -- or None)."""
    R, V = logits.shape
    assert logits.stride(1) == 1, "the kernel walks rows of contiguous columns"
    ce = torch.empty(R, device=logits.device, dtype=torch.float32)
    correct = torch.empty(R, device=logits.device, dtype=torch.bool)
    if R:
        _ce_row[(R,)](logits, logits.stride(0), y, coef, ce, correct, V, NEED_GRAD=need_grad, BLOCK=block,
                      num_warps=num_warps)
    return ce, correct, logits if need_grad else None
