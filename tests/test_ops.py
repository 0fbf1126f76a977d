"""minilora.ops: the lean autograd functions against plain PyTorch compositions and numerical gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minilora import ops
from minilora.model import LlamaConfig, Transformer


def _grads(f, inputs, g):
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = f(*xs)
    out.backward(g)
    return out.detach(), [x.grad for x in xs if x.requires_grad]


def _rope_tables(T: int, D: int, dtype=torch.float64):
    cfg = LlamaConfig(vocab_size=8, hidden_size=D * 2, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=D, rope_theta=500.0)
    cos, sin = Transformer(cfg).rope(T, torch.device("cpu"))
    return cos.to(dtype), sin.to(dtype)


def test_gradcheck_fp64():
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(3, 5, 8, dtype=d, requires_grad=True)
    w = torch.randn(8, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w))
    cos, sin = _rope_tables(5, 6)
    xr = torch.randn(2, 5, 3, 6, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.rope(x, cos, sin), (xr,))
    g, u = torch.randn(4, 7, dtype=d, requires_grad=True), torch.randn(4, 7, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (g, u))
    q = torch.randn(2, 4, 5, 6, dtype=d, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 6, dtype=d, requires_grad=True) for _ in range(2))
    mask = _padding_mask([5, 3], 5)
    # one query block, and the causal blocks (uneven too), with the causal bias and with a key-padding mask's
    for blocks in ([(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)]):
        for bias in (ops.causal_bias(5, None, q.device), ops.causal_bias(5, mask, q.device)):
            assert torch.autograd.gradcheck(lambda q, k, v: ops._MatmulAttention.apply(q, k, v, bias, blocks),
                                            (q, k, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])  # bf16: kernels/cpu.c, or the PyTorch formulas
def test_rms_norm_rope_swiglu_match_reference(monkeypatch, dtype, tol, cpu_kernels):
    monkeypatch.setenv("MINILORA_CPU_KERNELS", cpu_kernels)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 16, dtype=dtype) * 3
    for w_grad in (False, True):
        w = (torch.rand(16) + 0.5).to(dtype).requires_grad_(w_grad)
        g = torch.randn(2, 7, 16, dtype=dtype)
        ins = [x.requires_grad_(True), w]
        o1, g1 = _grads(lambda x, w: ops.rms_norm(x, w, 1e-6), ins, g)
        o2, g2 = _grads(lambda x, w: ops.rms_norm_ref(x, w, 1e-6), ins, g)
        torch.testing.assert_close(o1, o2, atol=tol, rtol=tol)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol)
    cos, sin = _rope_tables(7, 8, torch.float32)
    xr = torch.randn(2, 7, 3, 8, dtype=dtype, requires_grad=True)
    gr = torch.randn(2, 3, 7, 8, dtype=dtype)
    o1, g1 = _grads(lambda x: ops.rope(x, cos, sin), [xr], gr)
    o2, g2 = _grads(lambda x: ops.rope_ref(x, cos, sin), [xr], gr)
    assert o1.is_contiguous() and o1.shape == (2, 3, 7, 8)
    torch.testing.assert_close(o1, o2, atol=tol, rtol=tol)
    torch.testing.assert_close(g1[0], g2[0], atol=tol, rtol=tol)
    ga, up = (torch.randn(5, 9, dtype=dtype, requires_grad=True) for _ in range(2))
    gs = torch.randn(5, 9, dtype=dtype)
    o1, g1 = _grads(ops.swiglu, [ga, up], gs)
    o2, g2 = _grads(ops.swiglu_ref, [ga, up], gs)
    torch.testing.assert_close(o1, o2, atol=tol, rtol=tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_rms_norm_mixed_weight_dtype():
    """fp16/bf16 activations with an fp32 weight (a model loaded in fp32 under autocast): HF's promotion rules."""
    torch.manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 4, 16, dtype=dtype)
        w = (torch.rand(16) + 0.5).requires_grad_(True)
        g = torch.randn(3, 4, 16)
        o1, g1 = _grads(lambda x, w: ops.rms_norm(x, w, 1e-6), [x.requires_grad_(True), w], g)
        o2, g2 = _grads(lambda x, w: ops.rms_norm_ref(x, w, 1e-6), [x, w], g)
        assert o1.dtype == o2.dtype == torch.float32
        torch.testing.assert_close(o1, o2)
        for a, b in zip(g1, g2):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def _padding_mask(lengths, T):
    keep = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    m = torch.ones(T, T, dtype=torch.bool).tril()[None] & keep[:, None, :]
    return (m | torch.eye(T, dtype=torch.bool))[:, None]


@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("masking", ["causal", "padded", "non-causal"])
@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
@pytest.mark.parametrize("block", [64, 4])  # the GEMM attention's query blocks: 1, or 3 of 3-4 rows
def test_attention_matches_explicit_softmax(monkeypatch, heads, kv, masking, backend, block):
    monkeypatch.setenv("MINILORA_ATTENTION", backend)
    monkeypatch.setattr(ops, "ATTENTION_BLOCK", block)
    torch.manual_seed(2)
    B, T, D = 3, 11, 8
    q = torch.randn(B, heads, T, D, requires_grad=True)
    k, v = (torch.randn(B, kv, T, D, requires_grad=True) for _ in range(2))
    mask = {"causal": None, "padded": _padding_mask([11, 6, 1], T),
            # a mask that lets queries see later keys: the GEMM attention takes it as one block
            "non-causal": (torch.arange(T)[None, None, None, :] < torch.tensor([11, 6, 1])[:, None, None, None])
            .expand(B, 1, T, T)}[masking]
    g = torch.randn(B, heads, T, D)
    o1, g1 = _grads(lambda q, k, v: ops.attention(q, k, v, mask), [q, k, v], g)
    o2, g2 = _grads(lambda q, k, v: ops.attention_ref(q, k, v, mask), [q, k, v], g)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_within_causal_answers_each_mask_and_each_change():
    """The GEMM attention takes a mask by query blocks only if no query sees a later key; the answer is kept for
    the mask all layers share, and a mask changed in place is checked again."""
    mask = _padding_mask([6, 4], 6)
    assert ops._within_causal(mask) and ops._within_causal(mask)
    mask[1, 0, 2, 3] = True  # query 2 sees key 3
    assert not ops._within_causal(mask)
    assert ops._within_causal(_padding_mask([6, 4], 6))
    assert not ops._within_causal(torch.ones(2, 1, 6, 6, dtype=torch.bool))


@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])
def test_attention_bf16_matmul_close_to_sdpa(monkeypatch, cpu_kernels):
    monkeypatch.setenv("MINILORA_CPU_KERNELS", cpu_kernels)
    torch.manual_seed(3)
    B, H, Hkv, T, D = 2, 6, 2, 64, 32
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    ref32, gref = _grads(lambda q, k, v: ops.attention_ref(q, k, v, None), [t.float() for t in (q, k, v)], g.float())
    monkeypatch.setenv("MINILORA_ATTENTION", "matmul")
    o, gs = _grads(lambda q, k, v: ops.attention(q, k, v, None), [q, k, v], g)
    assert o.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in gs)
    # bf16 inputs, fp32 softmax: errors of bf16 rounding (about 2**-8 relative), not of a wrong formula
    assert (o.float() - ref32).abs().max() < 0.05
    for a, b in zip(gs, gref):
        assert (a.float() - b).abs().max() / b.abs().max() < 0.03


def test_attention_backend_choice(monkeypatch):
    monkeypatch.delenv("MINILORA_ATTENTION", raising=False)
    q = torch.zeros(1, 2, 16, 8)
    assert ops.attention_backend(q) == "sdpa"  # no grad: inference uses SDPA
    assert ops.attention_backend(q.requires_grad_()) == "matmul"
    assert ops.attention_backend(torch.zeros(1, 2, ops.MATMUL_ATTENTION_MAX_T + 1, 8, requires_grad=True)) == "sdpa"
    with torch.no_grad():
        assert ops.attention_backend(q) == "sdpa"
    monkeypatch.setenv("MINILORA_ATTENTION", "flash")
    with pytest.raises(ValueError, match="MINILORA_ATTENTION='flash'"):
        ops.attention_backend(q)


def test_model_training_step_same_with_either_attention(monkeypatch):
    """A whole model's loss and LoRA-free input gradients agree between the GEMM attention and SDPA."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(4)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    grads = {}
    for backend in ("matmul", "sdpa"):
        monkeypatch.setenv("MINILORA_ATTENTION", backend)
        model.zero_grad()
        loss = F.cross_entropy(model(ids, mask)[mask.bool()], ids[mask.bool()])
        loss.backward()
        grads[backend] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert grads["matmul"][0] == pytest.approx(grads["sdpa"][0], abs=1e-5)
    for a, b in zip(grads["matmul"][1], grads["sdpa"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
