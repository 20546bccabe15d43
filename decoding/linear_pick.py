"""`F.linear` through whichever cuBLAS path is fastest for the shape, timed once (issue 14).

At batch 1 a speculative verify forward multiplies every weight matrix by a block of 4-61 rows,
and cuBLAS's heuristics are poor at these shapes in fp32. Measured on an H200 (SmolLM2-135M's
matrices, per call inside a CUDA graph; `python bench.py --linear`):

    576 -> 192,   8 rows:  cuBLAS 54.0 us   cuBLASLt 4.9 us   one GEMV per row (bmm) 3.7 us
    576 -> 576,   4 rows:  cuBLAS  9.7 us   cuBLASLt 3.9 us
    1536 -> 576, 61 rows:  cuBLAS 12.2 us   cuBLASLt 19.3 us

(one row: cuBLAS's GEMV, 2.7-3.4 us, is what plain decoding uses and is left alone). Neither
library is right everywhere, so each (rows, in, out, dtype) shape times the candidates on its
first call -- outside a CUDA graph capture, e.g. the decoder's warm-up -- and keeps the fastest.
Every candidate computes the same fp32 sums (no TF32), in its own order of summation.

    from decoding import linear_pick
    with linear_pick.patched(model, row_counts={8}):   # every nn.Linear of model, for 8-row inputs
        ...

On CPU, for one row, or for a shape first met during a capture: plain `F.linear`.
"""
import contextlib

import torch
import torch.nn.functional as F

MAX_ROWS = 256  # a choice: the decoders' blocks measured reach 128 rows (batch 8, 16-token block)
_picked: dict = {}  # (rows, in, out, dtype, device) -> the fastest candidate's name


def _with_blas(name):
    def run(x, w):
        old = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(name)
        try:
            return F.linear(x, w)
        finally:
            torch.backends.cuda.preferred_blas_library(old)
    return run


def _row_gemv(x, w):  # one GEMV per row: a batched matmul whose weight is broadcast (stride 0)
    return torch.bmm(w[None].expand(x.shape[0], *w.shape), x[:, :, None])[..., 0]


CANDIDATES = {"cublas": _with_blas("cublas"), "cublaslt": _with_blas("cublaslt"), "gemv": _row_gemv}


def _time(fn, x, w, reps=20) -> float:
    """ms per call, replayed as a CUDA graph: the decoder replays its forwards as graphs, and
    timed eagerly these kernels (2-100 us) would measure Python's launch cost instead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(x, w)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def pick(x2: torch.Tensor, w: torch.Tensor) -> str:
    """The fastest candidate for x2 [M, K] @ w[N, K].T, timed on the first call of the shape."""
    key = (x2.shape[0], w.shape[1], w.shape[0], w.dtype, w.device)
    if key not in _picked:
        if torch.cuda.is_current_stream_capturing():
            return "default"
        names = [n for n in CANDIDATES if n != "gemv" or x2.shape[0] <= 8]
        _picked[key] = min(names, key=lambda n: _time(CANDIDATES[n], x2, w))
    return _picked[key]


def eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return x.is_cuda and 1 < rows <= MAX_ROWS and x.dtype == weight.dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, row_counts=None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the candidate `pick` found fastest for the shape. row_counts:
    pick only for these numbers of rows (a decoder's step), F.linear for the rest (its prefills:
    a new prompt length would be a new shape to time, inside the decoder's timed run)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not eligible(x, weight) or (row_counts is not None and rows not in row_counts):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    name = pick(x2, weight)
    y = F.linear(x2, weight) if name == "default" else CANDIDATES[name](x2, weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def patched(model: torch.nn.Module, row_counts=None):
    """Every nn.Linear of `model` computes through `linear` (with `row_counts`) inside the block,
    and as before after it."""
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in mods:
        m.forward = (lambda mod: lambda x: linear(x, mod.weight, mod.bias, row_counts))(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward
