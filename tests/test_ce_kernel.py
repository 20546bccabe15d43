"""gpu_kernels/cross_entropy.py, the loss chunk's Triton kernel, against float64 references: on a
CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no CUDA), on a GPU
compiled. requirements.txt installs Triton on Linux; where it is missing (macOS) they are skipped.
`python -m tools.bench --ce_chunk` prints the kernel's errors and speed on a GPU."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

import mtp
from support import memory


@pytest.fixture
def kernel(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it on machines without CUDA
        pytest.skip("a CUDA machine: `python -m tools.bench --ce_chunk` checks the kernel there")
    import triton.runtime.interpreter as interpreter
    if hasattr(interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns its scalars (1-element arrays) into ints with int(array),
        # which NumPy >= 2.4 refuses: the loop bounds of the kernel are such scalars
        patch = interpreter._patch_lang_tensor

        def with_index(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        monkeypatch.setattr(interpreter, "_patch_lang_tensor", with_index)
    from gpu_kernels import cross_entropy
    return cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,block", [(1, 64), (97, 64), (300, 64), (300, None)],
                         ids=["V1", "V97", "V300-ragged-steps", "V300-one-step"])
def test_kernel_equals_float64_cross_entropy(kernel, dtype, V, block):
    """CE, correctness and d(Σ coef·CE)/d logits against F.cross_entropy's in float64 (autograd), the
    gradient written over the logits; a tie at the top counts as right; no gradient: logits kept."""
    g = torch.Generator().manual_seed(V)
    R = 6
    x = (torch.randn(R, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (R,), generator=g)
    x[0, y[0]] = x[0, (y[0] + 1) % V] = x[0].max() + 1  # row 0: the target ties another column at the top
    coef = torch.rand(R, generator=g)
    ref = x.double().requires_grad_()
    ref_ce = F.cross_entropy(ref, y, reduction="none")
    (ref_ce * coef.double()).sum().backward()

    kw = {} if block is None else {"block": block}
    buf = x.clone()
    ce, correct, grad = kernel.ce_chunk(buf, y, coef, True, **kw)
    assert grad.data_ptr() == buf.data_ptr() and grad.dtype == dtype
    torch.testing.assert_close(ce.double(), ref_ce.detach(), rtol=1e-6, atol=1e-6)
    # bf16: the float64 gradient within one ulp (2^-7 of it; the interpreter truncates, a GPU rounds)
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref.grad, rtol=2 ** -7 if bf16 else 1e-6, atol=1e-30 if bf16 else 1e-6)
    assert torch.equal(correct, x.double().gather(1, y[:, None]).squeeze(1) == x.double().amax(1)) and correct[0]

    buf = x.clone()
    ce2, correct2, none = kernel.ce_chunk(buf, y, coef, False, **kw)
    assert none is None and torch.equal(buf, x) and torch.equal(ce2, ce) and torch.equal(correct2, correct)


def _loss_through_the_kernel_against_float64(kernel, monkeypatch, sequential, device, dtype, vocab=97):
    """The weighted 3-head loss and every gradient with each chunk of logits through the kernel
    against the specification, mtp.weighted_mtp_loss, on a float64 copy of the model on the CPU;
    chunks of 7 rows, the last one ragged. -> the largest relative error of a gradient."""
    from test_mtp import _random_problem
    used = []

    class Counting:
        applies = staticmethod(kernel.applies)

        @staticmethod
        def ce_chunk(*a):
            used.append(a[0].shape)
            return kernel.ce_chunk(*a)
    monkeypatch.setattr(mtp, "_ce_kernel", Counting)
    model = mtp.MTPModel(tiny_llama(vocab=vocab), 3, sequential_heads=sequential)
    model64 = copy.deepcopy(model).double()
    model.to(device, dtype)
    x, targets, coef, (w, valid, lambdas) = _random_problem(model)
    loss, ce, correct, _ = model(x.to(device), targets.to(device), coef=coef.float().to(device), chunk_size=7)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert used and all(rows <= 7 for rows, _ in used)

    hiddens, _ = model64.hidden_states(x, use_cache=False)
    naive = mtp.weighted_mtp_loss(hiddens, model64.lm_head_weight, targets, w, valid, lambdas)
    naive_grads = torch.autograd.grad(naive, list(model64.parameters()), allow_unused=True)
    torch.testing.assert_close(loss.double().cpu(), naive, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)
    logits = hiddens @ model64.lm_head_weight.t()
    ref_ce = F.cross_entropy(logits.flatten(0, 2), targets.reshape(-1), reduction="none").view_as(ce)
    torch.testing.assert_close(ce.double().cpu(), ref_ce, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    if dtype == torch.float32:
        assert torch.equal(correct.cpu(), logits.gather(-1, targets[..., None]).squeeze(-1) == logits.amax(-1))
    return max(((g.double().cpu() - ng).norm() / ng.norm()).item()
               for g, ng in zip(grads, naive_grads) if ng is not None and ng.norm() > 0)


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential-heads", "all-heads"])
def test_the_model_loss_through_the_kernel_equals_naive_float64(kernel, monkeypatch, sequential):
    """On the CPU, through the dispatch a CUDA tensor takes (mtp._ce_chunk_gpu): to fp32's precision."""
    monkeypatch.setattr(mtp, "_ce_chunk", mtp._ce_chunk_gpu)  # what _fused_linear_ce runs on CUDA
    assert _loss_through_the_kernel_against_float64(kernel, monkeypatch, sequential, "cpu", torch.float32) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential-heads", "all-heads"])
def test_on_cuda_the_model_loss_through_the_compiled_kernel_equals_naive_float64(monkeypatch, sequential, dtype):
    """The same on a GPU, compiled by Triton, at vocab 20,000 (three steps of a row walk): fp32 to
    its precision; bf16 to a bf16 model's (the same model on the CPU in bf16: ~2% in a gradient)."""
    from gpu_kernels import cross_entropy
    err = _loss_through_the_kernel_against_float64(cross_entropy, monkeypatch, sequential, "cuda", dtype, 20000)
    assert err < (1e-4 if dtype == torch.float32 else 5e-2)


def test_the_memory_model_counts_one_logits_buffer_where_the_kernel_writes_over_it(monkeypatch):
    """On CUDA the loss's chunk is the logits and their gradient (torch.compile), or the logits alone
    where the kernel writes the gradient over them: a bf16 model's estimate drops by one chunk of
    bf16 logits (chunk × vocab × 2 bytes), and fp32 hidden states under autocast keep both."""
    model = mtp.MTPModel(tiny_llama(vocab=500, dtype=torch.bfloat16), 2)
    tokens, chunk = 64, 16

    def buffers(kernel, amp=False):
        monkeypatch.setattr(mtp, "_ce_kernel", kernel)
        return memory.loss_buffers(model, torch.bfloat16, tokens, chunk, compiled_chunk=True, amp=amp)
    assert buffers(False) - buffers(object()) == chunk * 500 * 2
    model.float()
    assert buffers(False, amp=True) == buffers(object(), amp=True)


def test_where_the_kernel_runs_the_default_chunk_has_twice_the_rows_in_the_same_bytes(monkeypatch):
    """mtp.default_chunk_size doubles the rows where the gradient is written over the logits: the
    memory model's chunk term is then what torch.compile's logits + gradient of half the rows
    took (vocab 131,072: 1024 rows a chunk, 2048 in place)."""
    V = 1 << 17
    model = mtp.MTPModel(tiny_llama(vocab=V, hidden=8, dtype=torch.bfloat16), 2)
    assert (mtp.default_chunk_size(V), mtp.default_chunk_size(V, in_place=True)) == (1024, 2048)

    def buffers(kernel, chunk=0):
        monkeypatch.setattr(mtp, "_ce_kernel", kernel)
        return memory.loss_buffers(model, torch.bfloat16, 4096, chunk, compiled_chunk=True)
    assert buffers(False) == buffers(object()) == buffers(object(), 1024) + 1024 * V * 2
    # the rule the loss's chunk size and its dispatch share: fp32 statistics, the gradient in the logits' dtype
    applies = pytest.importorskip("gpu_kernels.cross_entropy").applies
    assert applies(None, torch.float32, torch.bfloat16, True) and not applies(None, torch.bfloat16, torch.bfloat16, True)
    assert not applies(torch.bfloat16, torch.float32, torch.float32, True)  # fp32 hidden states, bf16 logits (autocast)
    assert applies(torch.bfloat16, torch.float32, torch.float32, False)  # no gradient: nothing written
