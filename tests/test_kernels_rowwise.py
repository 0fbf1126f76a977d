"""kernels.rowwise (Triton RMSNorm and SwiGLU) against ops.rms_norm_ref / ops.swiglu_ref under autograd.

The ``test_rowwise_*`` tests call ``minilora.ops.rms_norm`` / ``ops.swiglu`` and run twice: in this process, where
CPU tensors take the PyTorch functions, and in a child pytest with ``TRITON_INTERPRET=1 MINILORA_KERNELS=triton``
(``test_interpreter_suite``), where the same calls run the Triton kernels on CPU (a child process because triton
reads TRITON_INTERPRET when kernels are defined). The interpreter's bf16 is broken, so it is tested in fp32 and
fp16; ``test_cuda_*`` run the compiled kernels on a GPU (bf16 included) and skip elsewhere.
Errors are max |got - want| / max(max |want|, 1), against the same function in float64 and in the input dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_interpreter_child

from minilora import ops
from minilora.model import LlamaConfig, Transformer

try:
    from kernels import rowwise
except ImportError:
    rowwise = None

ROOT = Path(__file__).resolve().parents[1]
IN_INTERPRETER_CHILD = os.environ.get("MINILORA_TEST_INTERPRETER") == "1"
HAS_CUDA_TRITON = torch.cuda.is_available() and rowwise is not None and not rowwise.INTERPRET
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16]
EPS = 1e-6


def _ids(shape: tuple) -> str:
    lead, d = shape
    return "x".join(map(str, (*lead, d)))


def run(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor | None]:
    """[output, grad of each input] of ``fn`` on fresh leaves (grad None for inputs without requires_grad)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def run_on(fn, inputs: list[torch.Tensor], grad: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """``run`` on copies of the inputs and the gradient converted to ``dtype`` (float64: the truth)."""
    return run(fn, [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs], grad.to(dtype))


def assert_close(got: list, want: list, dtype: torch.dtype, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        name = "out" if i == 0 else f"grad{i - 1}"
        assert (a is None) == (b is None), f"{what}: {name} is {'None' if a is None else 'set'}, expected otherwise"
        if a is None:
            continue
        assert a.shape == b.shape, f"{what}: {name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1.0)
        assert err <= TOL[dtype], f"{what}: {name} error {err:.2e} > {TOL[dtype]:.0e}"


def check_against_reference(fn, ref, inputs: list[torch.Tensor], grad: torch.Tensor, what: str) -> list:
    """``fn`` vs ``ref`` in float64 and in the inputs' dtype; the outputs keep the dtype of the inputs."""
    dtype = inputs[0].dtype
    got = run(fn, inputs, grad)
    assert got[0].dtype == dtype and all(g is None or g.dtype == dtype for g in got[1:])
    assert_close(got, run_on(ref, inputs, grad, torch.float64), dtype, f"{what} vs float64")
    assert_close(got, run(ref, inputs, grad), dtype, f"{what} vs {dtype} reference")
    return got


def rms_inputs(lead: tuple, d: int, dtype: torch.dtype, w_grad: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g).to(dtype).requires_grad_()
    w = (torch.rand(d, generator=g) + 0.5).to(dtype).requires_grad_(w_grad)
    return x, w, torch.randn(*lead, d, generator=g).to(dtype)


def swiglu_inputs(lead: tuple, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*lead, n, generator=g) * 3).to(dtype).requires_grad_()
    up = torch.randn(*lead, n, generator=g).to(dtype).requires_grad_()
    return gate, up, torch.randn(*lead, n, generator=g).to(dtype)


def rms_norm(x, w):
    return ops.rms_norm(x, w, EPS)


def rms_norm_ref(x, w):
    return ops.rms_norm_ref(x, w, EPS)


# (leading shape, row width): LLaMA widths, widths not a power of two, one column, no leading dims (a single row),
# more rows than the interpreter's three weight-gradient programs
RMS_SHAPES = [((3,), 576), ((2, 3), 100), ((5,), 1), ((), 100), ((2,), 4096), ((1,), 8192), ((4, 9), 64)]
SWIGLU_SHAPES = [((3,), 576), ((2, 3), 100), ((5,), 1), ((), 100), ((2,), 1100), ((1,), 11008)]


def test_rowwise_dispatch() -> None:
    """The child really runs Triton; this process uses PyTorch for CPU tensors."""
    assert (ops._triton_rowwise(torch.ones(1)) is not None) == IN_INTERPRETER_CHILD


@pytest.mark.parametrize("w_grad", [True, False], ids=["w-grad", "w-frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=_ids)
def test_rowwise_rms_norm_matches_reference(shape: tuple, dtype: torch.dtype, w_grad: bool) -> None:
    x, w, g = rms_inputs(*shape, dtype, w_grad)
    got = check_against_reference(rms_norm, rms_norm_ref, [x, w], g, "rms_norm")
    assert (got[2] is None) == (not w_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_rowwise_rms_norm_layouts(dtype: torch.dtype) -> None:
    # x a transposed view (last dim not contiguous), a column slice (row stride > D), frozen x with trained w
    x, w, g = rms_inputs((40,), 6, dtype)
    xt = x.detach().t().contiguous().requires_grad_()  # [6, 40]; the functions see its [40, 6] transpose
    check_against_reference(lambda x, w: rms_norm(x.t(), w), lambda x, w: rms_norm_ref(x.t(), w), [xt, w], g,
                            "transposed x")
    x, w, g = rms_inputs((7,), 100, dtype)
    check_against_reference(lambda x, w: rms_norm(x[:, 10:60], w[:50]), lambda x, w: rms_norm_ref(x[:, 10:60], w[:50]),
                            [x, w], g[:, :50], "sliced x")
    check_against_reference(rms_norm, rms_norm_ref, [x.detach(), w], g, "frozen x")
    # y.sum().backward() hands over a stride-0 gradient
    x, w, _ = rms_inputs((2, 3), 100, dtype)
    got = run(lambda x, w: rms_norm(x, w).sum(), [x, w], torch.tensor(1.0, dtype=dtype))
    want = run_on(lambda x, w: rms_norm_ref(x, w).sum(), [x, w], torch.tensor(1.0), torch.float64)
    assert_close(got[1:], want[1:], dtype, "stride-0 gradient")


def test_rowwise_rms_norm_empty_and_fallbacks() -> None:
    x, w, g = rms_inputs((0, 3), 64, torch.float32)
    y, dx, dw = run(rms_norm, [x, w], g)
    assert y.shape == dx.shape == (0, 3, 64) and torch.equal(dw, torch.zeros(64))
    # weight in another dtype than x, and float64: PyTorch's function (the kernels need weight.dtype == x.dtype)
    x, w, g = rms_inputs((3,), 100, torch.float16)
    if rowwise is not None:
        assert not rowwise.rms_norm_supported(x, w.float())
        assert not rowwise.rms_norm_supported(x.double(), w.double())
    # (x frozen: ops._RMSNorm's dx for mixed dtypes is a separate matter)
    got = run(rms_norm, [x.detach(), w.detach().float().requires_grad_()], g)
    want = run(rms_norm_ref, [x.detach(), w.detach().float().requires_grad_()], g)
    assert got[0].dtype == torch.float32
    assert_close(got, want, torch.float16, "fp16 x, fp32 weight")
    x, w, g = rms_inputs((3,), 100, torch.float64)
    assert_close(run(rms_norm, [x, w], g), run(rms_norm_ref, [x, w], g), torch.float32, "float64")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=_ids)
def test_rowwise_swiglu_matches_reference(shape: tuple, dtype: torch.dtype) -> None:
    gate, up, g = swiglu_inputs(*shape, dtype)
    check_against_reference(ops.swiglu, ops.swiglu_ref, [gate, up], g, "swiglu")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_rowwise_swiglu_layouts_and_partial_grads(dtype: torch.dtype) -> None:
    gate, up, g = swiglu_inputs((5, 3), 200, dtype)
    check_against_reference(ops.swiglu, ops.swiglu_ref, [gate.detach(), up], g, "frozen gate")
    check_against_reference(ops.swiglu, ops.swiglu_ref, [gate, up.detach()], g, "frozen up")
    # gate and up as the two halves of one fused projection: row-strided views
    both = torch.cat([gate.detach(), up.detach()], dim=-1).requires_grad_()
    check_against_reference(lambda t: ops.swiglu(*t.chunk(2, dim=-1)), lambda t: ops.swiglu_ref(*t.chunk(2, dim=-1)),
                            [both], g, "chunked gate/up")
    # transposed (last dim not contiguous) inputs and a stride-0 gradient
    got = run(lambda a, b: ops.swiglu(a.transpose(0, 1), b.transpose(0, 1)).sum(), [gate, up],
              torch.tensor(1.0, dtype=dtype))
    want = run_on(lambda a, b: ops.swiglu_ref(a.transpose(0, 1), b.transpose(0, 1)).sum(), [gate, up],
                  torch.tensor(1.0), torch.float64)
    assert_close(got[1:], want[1:], dtype, "transposed inputs, stride-0 gradient")
    empty = run(ops.swiglu, [gate[:0], up[:0]], g[:0])
    assert all(t.shape == (0, 3, 200) for t in empty)


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the aten ops dispatched inside ``with RecordOps() as seen``."""

    def __enter__(self):
        super().__enter__()
        self.seen = []
        return self.seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def add_rms_norm_both(x, a, w):
    """Both outputs of ``ops.add_rms_norm`` as one tensor, so that one gradient reaches h and norm(h) each."""
    return torch.cat(ops.add_rms_norm(x, a, w, EPS), dim=-1)


def add_rms_norm_both_ref(x, a, w):
    h = x + a
    return torch.cat([h, rms_norm_ref(h, w)], dim=-1)


@pytest.mark.parametrize("w_grad", [True, False], ids=["w-grad", "w-frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [((3,), 576), ((2, 3), 100), ((5,), 1), ((4, 9), 64), ((2,), 4096)], ids=_ids)
def test_rowwise_add_rms_norm_matches_reference(shape: tuple, dtype: torch.dtype, w_grad: bool) -> None:
    """The residual add and the norm in one kernel each way: the gradient reaching h along the residual stream and
    the norm's own add up in x's and a's gradients; without one for h (the final norm) the norm's alone."""
    x, w, g = rms_inputs(*shape, dtype, w_grad)
    a = rms_inputs(*shape, dtype, seed=1)[0]
    gh = rms_inputs(*shape, dtype, seed=2)[2]
    got = check_against_reference(add_rms_norm_both, add_rms_norm_both_ref, [x, a, w], torch.cat([gh, g], -1),
                                  "add_rms_norm")
    assert (got[3] is None) == (not w_grad)
    check_against_reference(lambda x, a, w: ops.add_rms_norm(x, a, w, EPS)[1],
                            lambda x, a, w: rms_norm_ref(x + a, w), [x, a, w], g, "add_rms_norm, no gradient for h")
    check_against_reference(add_rms_norm_both, add_rms_norm_both_ref, [x.detach(), a, w], torch.cat([gh, g], -1),
                            "add_rms_norm, frozen x")
    if IN_INTERPRETER_CHILD:  # the kernel adds the two gradients of h itself: autograd has nothing to add
        h, y = ops.add_rms_norm(x, a, w, EPS)
        with RecordOps() as seen:
            torch.autograd.backward([h, y], [gh, g])
        assert not {"add", "add_"} & set(seen), seen


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_rowwise_add_rms_norm_layouts_and_fallbacks(dtype: torch.dtype) -> None:
    x, w, g = rms_inputs((7,), 100, dtype)
    a = rms_inputs((7,), 100, dtype, seed=1)[0]
    gh = rms_inputs((7,), 100, dtype, seed=2)[2]
    # column slices (row strides > D) for x and a
    check_against_reference(lambda x, a, w: add_rms_norm_both(x[:, 10:60], a[:, 30:80], w[:50]),
                            lambda x, a, w: add_rms_norm_both_ref(x[:, 10:60], a[:, 30:80], w[:50]), [x, a, w],
                            torch.cat([gh[:, :50], g[:, :50]], -1), "sliced x and a")
    # a in another dtype than x: the add and the norm apart, with PyTorch's promotion
    got = run(add_rms_norm_both, [x, a.detach().double().requires_grad_(), w.detach()], torch.cat([gh, g], -1).double())
    assert got[0].dtype == torch.float64 and got[2].dtype == torch.float64
    if rowwise is not None:
        assert not rowwise.add_rms_norm_supported(x, a.double(), w)
        assert rowwise.add_rms_norm_supported(x, a, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [((3,), 576), ((2, 3), 100), ((5,), 1), ((1,), 11008)], ids=_ids)
def test_rowwise_swiglu_packed_matches_reference(shape: tuple, dtype: torch.dtype) -> None:
    """A packed gate|up projection's SwiGLU: its gradient comes back as one tensor, made without a ``cat``."""
    gate, up, g = swiglu_inputs(*shape, dtype)
    both = torch.cat([gate.detach(), up.detach()], dim=-1).requires_grad_()
    check_against_reference(ops.swiglu_packed, lambda t: ops.swiglu_ref(*t.chunk(2, dim=-1)), [both], g,
                            "swiglu_packed")
    out = ops.swiglu_packed(both.detach().clone().requires_grad_())
    with RecordOps() as seen:
        out.backward(g)
    assert "cat" not in seen, f"the packed gradient went through a cat: {seen}"


def test_rowwise_model_same_as_pytorch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model's loss and gradients agree between the dispatched ops and the PyTorch functions."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(5)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 64, (2, 9))
    results = []
    for backend in (None, "torch"):
        if backend:
            monkeypatch.setenv("MINILORA_KERNELS", backend)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _rope_tables(T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _qkv_flat(fn, H: int, Hkv: int):
    """``fn(qkv, cos, sin, H, Hkv)`` -> (q, k, v) as one flat tensor, for ``check_against_reference``."""
    def run(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in fn(qkv, cos, sin, H, Hkv)])
    return run


# (B, T, H, Hkv, D): GQA and MHA, head dims 8..128, packed head counts not a power of two, and 40 slots of 128
# (three programs of 16 per token, the last one partial)
QKV_ROPE_DIMS = [(2, 5, 4, 2, 16), (1, 3, 6, 6, 8), (2, 4, 9, 3, 64), (1, 2, 4, 1, 128), (1, 2, 24, 8, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("dims", QKV_ROPE_DIMS, ids=lambda d: "b{}t{}h{}kv{}d{}".format(*d))
def test_rowwise_qkv_rope_matches_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, dims: tuple) -> None:
    """``ops.qkv_rope`` on a packed q|k|v projection (Triton in the interpreter child and on CUDA) against split +
    ``rope_ref`` in float64 and in the input dtype, outputs and the packed gradient; and each path's layout."""
    B, T, H, Hkv, D = dims
    g = torch.Generator().manual_seed(D + H)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype).requires_grad_()
    cos, sin = _rope_tables(T, D)
    calls = []
    if rowwise is not None:
        real = rowwise.qkv_rope
        monkeypatch.setattr(rowwise, "qkv_rope", lambda *a: calls.append(1) or real(*a))
    grad = torch.randn(B * T * (H + 2 * Hkv) * D, generator=g).to(dtype)
    check_against_reference(_qkv_flat(ops.qkv_rope, H, Hkv), _qkv_flat(ops.qkv_rope_ref, H, Hkv),
                            [qkv, cos, sin], grad, f"qkv_rope {dims}")
    assert bool(calls) == IN_INTERPRETER_CHILD
    q, k, v = ops.qkv_rope(qkv.detach(), cos, sin, H, Hkv)
    assert q.shape == (B, H, T, D) and k.shape == v.shape == (B, Hkv, T, D)
    if calls:  # Triton: token-major ([B, T, n, D] memory), the layout SDPA's cuDNN backend keeps for its output
        assert all(t.transpose(1, 2).is_contiguous() for t in (q, k, v))
    else:  # PyTorch / kernels/cpu.c: head-major, as the CPU GEMM attention batches its products per head
        assert q.is_contiguous() and k.is_contiguous()


triton_here = pytest.mark.skipif(not (IN_INTERPRETER_CHILD or HAS_CUDA_TRITON),
                                 reason="the Triton kernel runs in the interpreter child (test_interpreter_suite) "
                                        "or on CUDA")


@triton_here
@pytest.mark.parametrize("dims", [(8, 256, 32, 32, 128), (4, 256, 9, 3, 64)], ids=["llama7b", "smollm2"])
def test_rowwise_attention_output_reaches_o_proj_as_a_view(monkeypatch: pytest.MonkeyPatch, dims: tuple) -> None:
    """Causal SDPA on ``qkv_rope``'s outputs returns ``[B, H, T, D]`` whose ``[B, T, H D]`` form (o_proj's input)
    needs no copy: SDPA allocates its output in q's layout (cuDNN, and the CPU's flash attention in the interpreter
    child; flash and memory-efficient work token-major anyway), and a head-major q made the decoder copy it (and
    cuDNN the output's gradient) in every layer. bf16 on CUDA, fp32 in the interpreter (bf16 is broken there)."""
    monkeypatch.setenv("MINILORA_ATTENTION", "sdpa")
    B, T, H, Hkv, D = dims if HAS_CUDA_TRITON else (1, 32, *dims[2:])
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA_TRITON else ("cpu", torch.float32)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=device, dtype=dtype, requires_grad=True)
    cos, sin = (t.to(device) for t in _rope_tables(T, D))
    out = ops.attention(*ops.qkv_rope(qkv, cos, sin, H, Hkv), None)
    assert out.shape == (B, H, T, D) and out.transpose(1, 2).is_contiguous(), out.stride()
    out.transpose(1, 2).reshape(B, T, H * D).float().square().sum().backward()
    assert qkv.grad is not None and bool(qkv.grad.isfinite().all())


@triton_here
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("V", [1, 100, 2048, 5000])
def test_rowwise_cross_entropy_rows_match_formula(dtype: torch.dtype, V: int) -> None:
    """Per-row loss = logsumexp - target logit, and with ``grad`` the rows become softmax - onehot in place:
    against float64 formulas, for vocabularies below, at and across the kernel's column block, rows with a stride,
    targets at both ends, an ignored row (loss and gradient 0), and logits large enough that an unshifted exp would
    overflow."""
    check_cross_entropy_rows(dtype, V, "cuda" if HAS_CUDA_TRITON else "cpu")


def check_cross_entropy_rows(dtype: torch.dtype, V: int, device: str) -> None:
    g = torch.Generator().manual_seed(V)
    R = 5
    wide = (torch.randn(R, V + 7, generator=g) * 4).to(dtype)
    wide[0, : V // 2] += 60.0  # exp(60+) overflows fp32 unless shifted by the row max
    y = torch.randint(0, V, (R,), generator=g)
    y[1], y[2] = 0, V - 1
    want_loss = torch.logsumexp(wide[:, :V].double(), -1) - wide[:, :V].double().gather(1, y[:, None]).squeeze(1)
    want_grad = torch.softmax(wide[:, :V].double(), -1) - F.one_hot(y, V).double()
    y[3] = rowwise.CE_IGNORE  # an ignored row: loss 0, gradient 0
    want_loss[3], want_grad[3] = 0.0, 0.0
    for grad in (False, True):
        buf = wide.clone().to(device)
        logits = buf[:, :V]  # row stride V + 7
        loss = rowwise.cross_entropy_rows_(logits, y.to(device), grad=grad)
        assert loss.dtype == torch.float32 and loss.shape == (R,)
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=1e-5, atol=1e-4)
        if grad:
            err = (logits.cpu().double() - want_grad).abs().max().item()
            assert err <= TOL[dtype], err
        else:
            assert torch.equal(logits.cpu(), wide[:, :V])  # untouched without grad
        assert torch.equal(buf[:, V:].cpu(), wide[:, V:])  # the stride's padding is never written


@triton_here
def test_rowwise_lm_loss_targets_outside_the_vocabulary_give_nan() -> None:
    """The Triton rows index the logits with the targets, unchecked: a check would make the host wait for the GPU.
    The kernel reads no logit for a target outside the vocabulary and gives its row a NaN loss (which the Trainer
    stops on); the other rows keep their values. (kernels/cpu.c's rows check first: tests/test_cpu_kernels.py.)"""
    from minilora import losses

    head = torch.nn.Linear(8, 10, bias=False).requires_grad_(False)
    device = "cuda" if HAS_CUDA_TRITON else "cpu"
    head = head.to(device)
    hidden = torch.randn(1, 4, 8, device=device, requires_grad=True)
    for bad in (10, -5, 2**40):
        labels = torch.tensor([[0, 3, bad, 1]], device=device)
        total, _ = losses.lm_loss_sum(hidden, head, labels)
        assert torch.isnan(total).item()
        logits = (hidden.detach()[0, :3] @ head.weight.T).float().contiguous()
        rows = rowwise.cross_entropy_rows_(logits, labels[0, 1:], grad=False)
        assert torch.isnan(rows[1]).item() and torch.isfinite(rows[[0, 2]]).all().item()


@triton_here
def test_rowwise_lm_loss_waits_for_no_device_value() -> None:
    """On the Triton path ``lm_loss_sum`` reads nothing back to the host, ignored labels included (no boolean index
    whose size the host would need): the ops that would wait for a GPU are recorded, forward and backward."""
    from minilora import losses

    device = "cuda" if HAS_CUDA_TRITON else "cpu"
    head = torch.nn.Linear(8, 10, bias=False).requires_grad_(False).to(device)
    hidden = torch.randn(2, 5, 8, device=device, requires_grad=True)
    labels = torch.tensor([[0, 3, 9, 1, 4], [2, losses.IGNORE_INDEX, 5, 5, losses.IGNORE_INDEX]], device=device)
    with RecordOps() as seen:
        total, count = losses.lm_loss_sum(hidden, head, labels)
        total.backward()
    reads = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "item"} & set(seen)
    assert not reads, f"host reads: {reads} in {seen}"
    assert count.item() == 2 * 4 - 2 and count.device == hidden.device  # the shifted targets: 2 ignored
    want = losses.lm_loss_reference(hidden.detach().double(), head.double(), labels)
    assert total.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_rowwise_lm_loss_matches_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                           trainable_head: bool) -> None:
    """``lm_loss_sum`` (chunked LM head + cross-entropy) equals the full-logits formula, loss and gradients; with a
    frozen head the rows between its GEMMs take the Triton kernel where it runs (the interpreter child, CUDA), and
    with a trainable one the PyTorch path."""
    from minilora import losses

    V, D = 300, 24
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", V * 4)  # 4-row chunks: the last one partial
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(D, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    head.weight.requires_grad_(trainable_head)
    hidden = torch.randn(2, 9, D, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[0, 3] = losses.IGNORE_INDEX
    calls = []
    if rowwise is not None:
        real = rowwise.cross_entropy_rows_
        monkeypatch.setattr(rowwise, "cross_entropy_rows_", lambda *a, **k: calls.append(1) or real(*a, **k))
    total, count = losses.lm_loss_sum(hidden, head, labels)
    total.backward()
    got = [total.detach(), hidden.grad] + ([head.weight.grad] if trainable_head else [])
    assert count.item() == 2 * 8 - 1
    assert bool(calls) == (IN_INTERPRETER_CHILD and not trainable_head)
    h64 = hidden.detach().double().requires_grad_()
    head64 = torch.nn.Linear(D, V, bias=False).double()
    with torch.no_grad():
        head64.weight.copy_(head.weight.double())
    head64.weight.requires_grad_(trainable_head)
    want_total = losses.lm_loss_reference(h64, head64, labels)
    want_total.backward()
    want = [want_total.detach(), h64.grad] + ([head64.weight.grad] if trainable_head else [])
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1.0)
        assert err <= TOL[dtype] * 4, f"{name}: {err:.2e}"


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the child's parent")
@pytest.mark.skipif(rowwise is None, reason="triton is not installed")
def test_interpreter_suite() -> None:
    """Run every ``test_rowwise_*`` test in a child with the Triton kernels under the interpreter."""
    run_interpreter_child(Path(__file__), "test_rowwise_")


# ---------------------------------------------------------------- compiled kernels on a GPU
CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CUDA_RMS_SHAPES = [((8, 512), 4096), ((3,), 576), ((2, 5), 8192), ((7,), 100), ((1000,), 2048), ((), 1)]
CUDA_SWIGLU_SHAPES = [((8, 512), 11008), ((3,), 576), ((7,), 100), ((2, 33), 1536)]
cuda_only = pytest.mark.skipif(not HAS_CUDA_TRITON, reason="needs CUDA and triton (not interpreted)")


def _on_cuda(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors]


@cuda_only
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("dims", [(2, 512, 32, 32, 128), (4, 256, 9, 3, 64), (1, 33, 32, 8, 128)],
                         ids=["llama7b", "smollm2", "gqa-odd-t"])
def test_cuda_qkv_rope(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, dims: tuple) -> None:
    """The compiled RoPE at LLaMA-7B and SmolLM2 shapes, bf16 included, against split + rope_ref."""
    B, T, H, Hkv, D = dims
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype).cuda().requires_grad_()
    cos, sin = (t.cuda() for t in _rope_tables(T, D))
    grad = torch.randn(qkv.numel(), generator=g).to(dtype).cuda()
    check_against_reference(_qkv_flat(ops.qkv_rope, H, Hkv), _qkv_flat(ops.qkv_rope_ref, H, Hkv),
                            [qkv, cos, sin], grad, f"cuda qkv_rope {dims}")


@cuda_only
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("V", [32000, 49152, 128256])
def test_cuda_cross_entropy_rows(dtype: torch.dtype, V: int) -> None:
    """The compiled kernel at LLaMA-2, SmolLM2 and LLaMA-3 vocabularies, bf16 included."""
    check_cross_entropy_rows(dtype, V, "cuda")


@cuda_only
@pytest.mark.parametrize("w_grad", [True, False], ids=["w-grad", "w-frozen"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_RMS_SHAPES, ids=_ids)
def test_cuda_rms_norm_matches_reference(monkeypatch: pytest.MonkeyPatch, shape: tuple, dtype: torch.dtype,
                                         w_grad: bool) -> None:
    monkeypatch.setenv("MINILORA_KERNELS", "auto")
    x, w, g = _on_cuda(*rms_inputs(*shape, dtype, w_grad))
    assert ops._triton_rowwise(x) is rowwise and rowwise.rms_norm_supported(x, w)
    got = check_against_reference(rms_norm, rms_norm_ref, [x, w], g, "cuda rms_norm")
    assert (got[2] is None) == (not w_grad)


@cuda_only
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SWIGLU_SHAPES, ids=_ids)
def test_cuda_swiglu_matches_reference(monkeypatch: pytest.MonkeyPatch, shape: tuple, dtype: torch.dtype) -> None:
    monkeypatch.setenv("MINILORA_KERNELS", "auto")
    gate, up, g = _on_cuda(*swiglu_inputs(*shape, dtype))
    assert ops._triton_rowwise(gate) is rowwise
    check_against_reference(ops.swiglu, ops.swiglu_ref, [gate, up], g, "cuda swiglu")
    both = torch.cat([gate.detach(), up.detach()], dim=-1).requires_grad_()
    check_against_reference(lambda t: ops.swiglu(*t.chunk(2, dim=-1)), lambda t: ops.swiglu_ref(*t.chunk(2, dim=-1)),
                            [both], g, "cuda chunked gate/up")
    check_against_reference(ops.swiglu_packed, lambda t: ops.swiglu_ref(*t.chunk(2, dim=-1)), [both], g,
                            "cuda packed gate/up")


@cuda_only
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [((8, 512), 4096), ((7,), 100), ((2, 5), 8192)], ids=_ids)
def test_cuda_add_rms_norm_matches_reference(monkeypatch: pytest.MonkeyPatch, shape: tuple, dtype: torch.dtype
                                             ) -> None:
    monkeypatch.setenv("MINILORA_KERNELS", "auto")
    x, w, g = _on_cuda(*rms_inputs(*shape, dtype))
    a, gh = _on_cuda(rms_inputs(*shape, dtype, seed=1)[0], rms_inputs(*shape, dtype, seed=2)[2])
    assert ops._triton_rowwise(x) is rowwise and rowwise.add_rms_norm_supported(x, a, w)
    check_against_reference(add_rms_norm_both, add_rms_norm_both_ref, [x, a, w], torch.cat([gh, g], -1),
                            "cuda add_rms_norm")
    check_against_reference(lambda x, a, w: ops.add_rms_norm(x, a, w, EPS)[1],
                            lambda x, a, w: rms_norm_ref(x + a, w), [x, a, w], g, "cuda add_rms_norm, no grad for h")


@cuda_only
def test_cuda_bf16_layouts_and_frozen_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINILORA_KERNELS", "auto")
    dtype = torch.bfloat16
    x, w, g = _on_cuda(*rms_inputs((300,), 1000, dtype))
    check_against_reference(lambda x, w: rms_norm(x[:, 100:676], w[:576]),
                            lambda x, w: rms_norm_ref(x[:, 100:676], w[:576]), [x, w], g[:, :576], "sliced x")
    check_against_reference(rms_norm, rms_norm_ref, [x.detach(), w], g, "frozen x")
    gate, up, g = _on_cuda(*swiglu_inputs((64,), 300, dtype))
    check_against_reference(ops.swiglu, ops.swiglu_ref, [gate.detach(), up], g, "frozen gate")
    check_against_reference(ops.swiglu, ops.swiglu_ref, [gate, up.detach()], g, "frozen up")
