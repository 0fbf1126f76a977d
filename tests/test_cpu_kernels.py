"""kernels/cpu.c (fused bf16 CPU kernels) against fp64 formulas, through minilora.ops / losses and directly.

Every kernel computes in fp32 and rounds once to bf16, so the oracle is the fp64 formula on the same bf16 inputs,
rounded to bf16: outputs must agree to about one bf16 ulp (2**-8 relative), gradients to a small relative norm.
The fp32 twins (RMSNorm, RoPE, SwiGLU) must agree with the fp64 formulas to fp32 precision.
"""

from __future__ import annotations

import subprocess
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu
from minilora import losses, ops

BF = torch.bfloat16


@pytest.fixture(params=["default", "plain-c"])
def fused(request, monkeypatch):
    """The kernels as built here; and, where that build is the AVX-512 BF16 one, the plain C version of the same
    file (built without AVX-512 BF16), so that both versions pass every test."""
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "auto")
    if request.param == "plain-c":
        if "avx512_bf16" not in cpu._cpu_fingerprint().split():
            pytest.skip("the default build is the plain C one here")
        monkeypatch.setattr(cpu, "_state", {})
        monkeypatch.setattr(cpu, "_FLAG_SETS", [cpu._FLAG_SETS[0] + ["-mno-avx512bf16"]])
    if cpu.library() is None:
        pytest.skip(f"fused CPU kernels unavailable here: {cpu._state.get('error')}")
    if request.param == "plain-c":
        assert cpu.library().simd_avx512bf16() == 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ulps(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |a - ref| in units of ref's bf16 spacing (2**-7 relative at worst)."""
    spacing = torch.ldexp(torch.ones_like(ref.double()), torch.frexp(ref.double().abs().clamp_min(1e-30))[1] - 8)
    return ((a.double() - ref.double()).abs() / spacing).max().item()


def _grads(fn, inputs, g):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    out.backward(g)
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("D", [576, 40, 7])  # vector width multiples and a scalar tail
def test_rms_norm(fused, D):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, D) * 4).to(BF)
    w = (torch.rand(D) + 0.5).to(BF)
    g = torch.randn(3, 5, D).to(BF)
    out, (dx,) = _grads(lambda x: ops.rms_norm(x, w, 1e-5), [x], g)
    # HF's order: normalise in fp32, round to bf16, multiply by the bf16 weight, round
    xd = x.double().requires_grad_(True)
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = (n.to(BF).double() * w.double()).to(BF)
    assert out.dtype == BF and _ulps(out, ref) <= 1.0
    (n * w.double()).backward(g.double())
    assert _rel(dx, xd.grad) < 4e-3


@pytest.mark.parametrize("D", [576, 7])
def test_add_rms_norm(fused, D):
    """h = x + a rounded once, rms_norm(h) from the rounded h; both inputs get gh + d rms_norm / dh."""
    torch.manual_seed(7)
    x, a = (torch.randn(4, 3, D) * 2).to(BF), torch.randn(4, 3, D).to(BF)
    w = (torch.rand(D) + 0.5).to(BF)
    gh, gout = torch.randn(4, 3, D).to(BF), torch.randn(4, 3, D).to(BF)
    xs, as_ = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    h, out = ops.add_rms_norm(xs, as_, w, 1e-5)
    torch.autograd.backward([h, out], [gh, gout])
    assert torch.equal(h, (x.double() + a.double()).to(BF))
    hd = h.detach().double().requires_grad_(True)
    n = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _ulps(out, (n.to(BF).double() * w.double()).to(BF)) <= 1.0
    (n * w.double()).backward(gout.double())
    ref = hd.grad + gh.double()
    assert torch.equal(xs.grad, as_.grad) and _rel(xs.grad, ref) < 4e-3
    h2, out2 = ops.add_rms_norm(x, None, w, 1e-5)
    assert h2 is x and torch.equal(out2, ops.rms_norm(x, w, 1e-5))


def test_rms_norm_trainable_weight_uses_the_pytorch_path(fused):
    x = torch.randn(4, 16).to(BF).requires_grad_(True)
    w = torch.ones(16, dtype=BF, requires_grad=True)
    ops.rms_norm(x, w, 1e-5).sum().backward()
    assert w.grad is not None and x.grad is not None


@pytest.mark.parametrize("n", [2048 * 3 + 5, 33])
def test_swiglu(fused, n):
    torch.manual_seed(1)
    gate, up, g = ((torch.randn(n) * 3).to(BF) for _ in range(3))
    out, (dgate, dup) = _grads(ops.swiglu, [gate, up], g)
    gd, ud = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    ref = F.silu(gd) * ud
    ref.backward(g.double())
    assert _ulps(out, ref.detach().to(BF)) <= 1.0
    assert _rel(dgate, gd.grad) < 4e-3 and _rel(dup, ud.grad) < 4e-3


@pytest.mark.parametrize("kernels_mode", ["auto", "off"])
@pytest.mark.parametrize("F_", [40, 7])
def test_swiglu_packed(monkeypatch, kernels_mode, F_):
    """swiglu_packed(cat(gate, up)) against the fp64 formula, and equal to swiglu on the separate halves."""
    monkeypatch.setenv("MINILORA_CPU_KERNELS", kernels_mode)
    torch.manual_seed(3)
    gate_up = (torch.randn(3, 5, 2 * F_) * 3).to(BF)
    g = torch.randn(3, 5, F_).to(BF)
    out, (dgu,) = _grads(ops.swiglu_packed, [gate_up], g)
    assert dgu.shape == gate_up.shape and dgu.is_contiguous()
    gud = gate_up.double().requires_grad_(True)
    ref = F.silu(gud[..., :F_]) * gud[..., F_:]
    ref.backward(g.double())
    assert _ulps(out, ref.detach().to(BF)) <= (1.0 if kernels_mode == "auto" else 2.0)
    assert _rel(dgu, gud.grad) < 4e-3
    out2, (dgate, dup) = _grads(ops.swiglu, list(gate_up.chunk(2, dim=-1)), g)
    assert torch.equal(out, out2) and torch.equal(dgu, torch.cat((dgate, dup), dim=-1))


def test_qkv_rope_matches_split_and_rope(fused):
    """The packed q|k|v split + RoPE equals split + ops.rope (values and the packed gradient), v contiguous."""
    torch.manual_seed(8)
    B, T, H, Hkv, D = 2, 7, 6, 2, 16
    inv = 1.0 / (500.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.outer(torch.arange(T).float(), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D).to(BF)
    grads = [torch.randn(B, n, T, D).to(BF) for n in (H, Hkv, Hkv)]
    x1, x2 = qkv.clone().requires_grad_(True), qkv.clone().requires_grad_(True)
    fused_out = ops.qkv_rope(x1, cos, sin, H, Hkv)
    q, k, v = x2.split((H * D, Hkv * D, Hkv * D), dim=-1)
    ref = (ops.rope(q.view(B, T, H, D), cos, sin), ops.rope(k.view(B, T, Hkv, D), cos, sin),
           v.view(B, T, Hkv, D).transpose(1, 2))
    for a, b in zip(fused_out, ref):
        assert torch.equal(a, b) and a.is_contiguous()
    torch.autograd.backward(fused_out, grads)
    torch.autograd.backward(ref, grads)
    assert torch.equal(x1.grad, x2.grad)
    x3 = qkv.clone().requires_grad_(True)  # a q|k|v output of which only q is used
    ops.qkv_rope(x3, cos, sin, H, Hkv)[0].backward(grads[0])
    assert torch.equal(x3.grad[..., : H * D], x1.grad[..., : H * D]) and not x3.grad[..., H * D :].any()


def test_rope(fused):
    torch.manual_seed(2)
    B, T, H, D = 2, 9, 3, 64
    inv = 1.0 / (500.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.outer(torch.arange(T).float(), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    x = torch.randn(B, T, H, D).to(BF)
    g = torch.randn(B, H, T, D).to(BF)
    out, (dx,) = _grads(lambda x: ops.rope(x, cos, sin), [x], g)
    assert out.shape == (B, H, T, D) and out.is_contiguous()
    xd = x.double().requires_grad_(True)
    ref = ops.rope_ref(xd, cos.to(BF).double(), sin.to(BF).double())  # the tables rounded to bf16, as HF
    ref.backward(g.double())
    assert _ulps(out, ref.detach().to(BF)) <= 1.0
    assert _rel(dx, xd.grad) < 4e-3


FP32_OPS = ["rms_norm", "add_rms_norm", "swiglu", "swiglu_packed", "rope", "qkv_rope"]


@pytest.mark.parametrize("op", FP32_OPS)
def test_fp32_kernels_match_fp64(fused, monkeypatch, op):
    """The fp32 twins of RMSNorm (with and without the residual add), SwiGLU (separate and packed halves) and
    RoPE (alone and from a packed q|k|v) ran, and agree with the fp64 formulas to fp32 precision, values and
    gradients."""
    ran = []
    real = cpu._kernel
    monkeypatch.setattr(cpu, "_kernel", lambda name, t: ran.append((name, t.dtype)) or real(name, t))
    torch.manual_seed(11)
    B, T, H, Hkv, D = 2, 9, 4, 2, 64
    inv = 1.0 / (500.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.outer(torch.arange(T).float(), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    w = torch.rand(40) + 0.5

    def norm(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    fns = {  # op: (minilora's function, its fp64 formula, input shapes)
        "rms_norm": (lambda x: ops.rms_norm(x, w, 1e-5), norm, [(3, 5, 40)]),
        "add_rms_norm": (lambda x, a: torch.cat(ops.add_rms_norm(x, a, w, 1e-5), -1),
                         lambda x, a: torch.cat((x + a, norm(x + a)), -1), [(3, 5, 40), (3, 5, 40)]),
        "swiglu": (ops.swiglu, lambda a, u: F.silu(a) * u, [(6, 37), (6, 37)]),
        "swiglu_packed": (ops.swiglu_packed, lambda gu: F.silu(gu[..., :37]) * gu[..., 37:], [(6, 74)]),
        "rope": (lambda x: ops.rope(x, cos, sin), lambda x: ops.rope_ref(x, cos.double(), sin.double()),
                 [(B, T, H, D)]),
        "qkv_rope": (lambda x: torch.cat([t.flatten() for t in ops.qkv_rope(x, cos, sin, H, Hkv)]),
                     lambda x: torch.cat([t.flatten() for t in ops.qkv_rope_ref(x, cos.double(), sin.double(), H,
                                                                                  Hkv)]),
                     [(B, T, (H + 2 * Hkv) * D)]),
    }
    fn, formula, shapes = fns[op]
    inputs = [torch.randn(s) * 3 for s in shapes]
    out = fn(*[x.clone().requires_grad_(True) for x in inputs])
    g = torch.randn(out.shape)
    out, grads = _grads(fn, inputs, g)
    ref, ref_grads = _grads(formula, [x.double() for x in inputs], g.double())
    assert out.dtype == torch.float32 and _rel(out, ref) < 1e-6
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.float32 and _rel(a, b) < 1e-6
    assert ran and all(dtype == torch.float32 for _, dtype in ran), ran


@pytest.mark.parametrize("T,heads,kv", [(37, 6, 2), (1, 2, 2), (64, 4, 1)])
@pytest.mark.parametrize("block", [64, 16])  # query blocks of the GEMM attention: one, or 2-4
def test_causal_attention(fused, monkeypatch, T, heads, kv, block):
    """bf16 scores, probabilities and products round at several places either way: the fused softmax must be
    as close to the fp64 oracle as the PyTorch path (bias add + softmax) is."""
    monkeypatch.setenv("MINILORA_ATTENTION", "matmul")
    monkeypatch.setattr(ops, "ATTENTION_BLOCK", block)
    torch.manual_seed(3)
    B, D = 2, 32
    q = (torch.randn(B, heads, T, D) * 2).to(BF)
    k, v = ((torch.randn(B, kv, T, D) * 2).to(BF) for _ in range(2))
    g = torch.randn(B, heads, T, D).to(BF)
    ref, rgrads = _grads(lambda q, k, v: ops.attention_ref(q, k, v, None), [t.double() for t in (q, k, v)],
                         g.double())
    errors = {}
    for m in ("auto", "off"):
        monkeypatch.setenv("MINILORA_CPU_KERNELS", m)
        out, grads = _grads(lambda q, k, v: ops.attention(q, k, v, None), [q, k, v], g)
        assert out.dtype == BF and all(t.dtype == BF for t in grads)
        errors[m] = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, rgrads)]
    for fused_err, torch_err in zip(errors["auto"], errors["off"]):
        assert fused_err < 1.25 * torch_err + 1e-3 and fused_err < 2e-2


def _amx_expected(fused_param: str) -> bool:
    """Whether this build should run the AMX attention: the AVX-512 BF16 build on a CPU with AMX (Linux)."""
    flags = cpu._cpu_fingerprint().split()
    return fused_param == "default" and "amx_bf16" in flags and "avx512_bf16" in flags and sys.platform == "linux"


@pytest.mark.parametrize("B,H,Hkv,T,D", [(2, 6, 2, 64, 64), (1, 4, 4, 32, 128), (2, 9, 3, 96, 64)])
def test_amx_attention(fused, request, monkeypatch, B, H, Hkv, T, D):
    """Causal GQA attention on AMX tiles (fp32 scores, probabilities recomputed in backward) against the fp64
    formula, with q and the output gradient in the strided [B, T, H, D] layouts the model passes; at least as
    close as the GEMM path. In the plain C build the same call takes the GEMM path."""
    monkeypatch.setenv("MINILORA_ATTENTION", "matmul")
    torch.manual_seed(11)
    q = (torch.randn(B, T, H, D) * 2).to(BF).transpose(1, 2)
    k, v = ((torch.randn(B, Hkv, T, D) * 2).to(BF) for _ in range(2))
    g = torch.randn(B, T, H, D).to(BF).transpose(1, 2)
    ref, rgrads = _grads(lambda q, k, v: ops.attention_ref(q, k, v, None), [t.double() for t in (q, k, v)],
                         g.double())
    amx = _amx_expected(request.node.callspec.params["fused"])
    assert cpu.amx_attention_supported(q, k, v) == amx
    calls = []
    real_fwd = cpu.attention_fwd
    monkeypatch.setattr(cpu, "attention_fwd", lambda *a: calls.append(1) or real_fwd(*a))
    errors = {}
    for m in ("auto", "off"):
        monkeypatch.setenv("MINILORA_CPU_KERNELS", m)
        qs = q.detach().clone().requires_grad_(True)
        q_in = qs.transpose(1, 2).contiguous().transpose(1, 2)  # strided like the model's q
        ks, vs = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = ops.attention(q_in, ks, vs, None)
        out.backward(g)
        assert out.dtype == BF and all(t.grad.dtype == BF for t in (qs, ks, vs))
        errors[m] = [_rel(out, ref)] + [_rel(a, b) for a, b in zip((qs.grad, ks.grad, vs.grad), rgrads)]
    assert len(calls) == int(amx)
    for amx_err, torch_err in zip(errors["auto"], errors["off"]):
        assert amx_err < 1.25 * torch_err + 1e-3 and amx_err < 2e-2


@pytest.mark.parametrize("B,H,Hkv,T,D", [(2, 9, 3, 64, 64), (1, 2, 2, 32, 128)])
def test_amx_qkv_attention(fused, request, monkeypatch, B, H, Hkv, T, D):
    """The packed q|k|v projection into attention with RoPE inside the AMX kernels (forward rotates q and k,
    backward writes the packed gradient with dq and dk rotated back) against the fp64 formula: at least as close
    as RoPE then attention through the PyTorch path."""
    monkeypatch.setenv("MINILORA_ATTENTION", "matmul")
    torch.manual_seed(13)
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D) * 2).to(BF)
    g = torch.randn(B, H, T, D).to(BF)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    emb = torch.outer(torch.arange(T, dtype=torch.float64), inv).repeat(1, 2)
    cos, sin = emb.cos().float(), emb.sin().float()

    def formula(x):  # fp64, with the tables rounded to bf16 as every implementation does
        q, k, v = x.split((H * D, Hkv * D, Hkv * D), dim=-1)
        c, s_ = cos.to(BF).double(), sin.to(BF).double()
        q = ops.rope_ref(q.reshape(B, T, H, D), c, s_)
        k = ops.rope_ref(k.reshape(B, T, Hkv, D), c, s_)
        return ops.attention_ref(q, k, v.reshape(B, T, Hkv, D).transpose(1, 2), None)

    ref, (rgrad,) = _grads(formula, [qkv.double()], g.double())
    calls = []
    real_fwd = cpu.attention_fwd
    monkeypatch.setattr(cpu, "attention_fwd", lambda *a, **k: calls.append(a[4] is not None) or real_fwd(*a, **k))
    errors = {}
    for m in ("auto", "off"):
        monkeypatch.setenv("MINILORA_CPU_KERNELS", m)
        out, (grad,) = _grads(lambda x: ops.qkv_attention(x, cos, sin, H, Hkv, None), [qkv], g)
        assert out.dtype == grad.dtype == BF and grad.shape == qkv.shape
        with torch.no_grad():  # inference: the same forward without autograd
            assert torch.equal(ops.qkv_attention(qkv, cos, sin, H, Hkv, None), out)
        errors[m] = [_rel(out, ref), _rel(grad, rgrad)] + [
            _rel(a, b) for a, b in zip(grad.split((H * D, Hkv * D, Hkv * D), -1), rgrad.split((H * D, Hkv * D,
                                                                                                  Hkv * D), -1))]
    assert calls == ([True, True] if _amx_expected(request.node.callspec.params["fused"]) else [])
    for amx_err, torch_err in zip(errors["auto"], errors["off"]):
        assert amx_err < 1.25 * torch_err + 1e-3 and amx_err < 2e-2


def test_amx_attention_inference_long_sequences_and_opt_out(fused, request, monkeypatch):
    """Without autograd the AMX forward runs alone (same values as in training); sequences beyond the GEMM
    attention's limit train through the AMX kernels too; MINILORA_ATTENTION=sdpa, and a backward whose per-thread
    buffers would pass AMX_MAX_SCRATCH, keep them out."""
    if not _amx_expected(request.node.callspec.params["fused"]):
        pytest.skip("no AMX attention in this build or on this CPU")
    monkeypatch.delenv("MINILORA_ATTENTION", raising=False)
    calls = []
    real_fwd = cpu.attention_fwd
    monkeypatch.setattr(cpu, "attention_fwd", lambda *a, **k: calls.append(1) or real_fwd(*a, **k))
    torch.manual_seed(14)
    B, H, Hkv, D = 1, 4, 2, 64
    T = ops.MATMUL_ATTENTION_MAX_T + 64
    q = torch.randn(B, H, T, D).to(BF)
    k, v = torch.randn(B, Hkv, T, D).to(BF), torch.randn(B, Hkv, T, D).to(BF)
    g = torch.randn(B, H, T, D).to(BF)
    ref, rgrads = _grads(lambda q, k, v: ops.attention_ref(q, k, v, None), [t.double() for t in (q, k, v)],
                         g.double())
    out, grads = _grads(lambda q, k, v: ops.attention(q, k, v, None), [q, k, v], g)
    assert calls == [1] and _rel(out, ref) < 1e-2
    for a, b in zip(grads, rgrads):
        assert _rel(a, b) < 1e-2
    with torch.no_grad():
        assert torch.equal(ops.attention(q, k, v, None), out)
    assert calls == [1, 1]
    monkeypatch.setenv("MINILORA_ATTENTION", "sdpa")
    with torch.no_grad():
        ops.attention(q, k, v, None)
    monkeypatch.delenv("MINILORA_ATTENTION")
    monkeypatch.setattr(ops, "AMX_MAX_SCRATCH", (H // Hkv) * T * T * 4 - 1)
    with torch.no_grad():
        ops.attention(q, k, v, None)
    assert calls == [1, 1]


def test_amx_attention_sharp_scores_and_unsupported_shapes(fused, request):
    """Scores spread over +-80 after scaling: finite, and the gradients still match the fp64 formula; shapes the
    kernel does not take (T % 32, D % 64, a different key length) are declined, so callers use the GEMM path."""
    if not _amx_expected(request.node.callspec.params["fused"]):
        pytest.skip("no AMX attention in this build or on this CPU")
    torch.manual_seed(12)
    B, H, Hkv, T, D = 1, 4, 2, 64, 64
    q = (torch.randn(B, H, T, D) * 12).to(BF)
    k, v = (torch.randn(B, Hkv, T, D) * 12).to(BF), torch.randn(B, Hkv, T, D).to(BF)
    g = torch.randn(B, H, T, D).to(BF)
    scale = D**-0.5
    o, lse = cpu.attention_fwd(q, k, v, scale)
    dq, dk, dv = cpu.attention_bwd(q, k, v, lse, g, scale)
    ref, rgrads = _grads(lambda q, k, v: ops.attention_ref(q, k, v, None), [t.double() for t in (q, k, v)],
                         g.double())
    assert all(torch.isfinite(t.float()).all() for t in (o, lse, dq, dk, dv))
    s = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), rtol=1e-4, atol=1e-3)
    assert _rel(o, ref) < 1e-2
    for a, b in zip((dq, dk, dv), rgrads):
        assert _rel(a, b) < 3e-2
    z = lambda *shape: torch.zeros(*shape, dtype=BF)  # noqa: E731
    assert cpu.amx_attention_supported(z(1, 2, 64, 64), z(1, 1, 64, 64), z(1, 1, 64, 64))
    assert not cpu.amx_attention_supported(z(1, 2, 48, 64), z(1, 1, 48, 64), z(1, 1, 48, 64))
    assert not cpu.amx_attention_supported(z(1, 2, 64, 32), z(1, 1, 64, 32), z(1, 1, 64, 32))
    assert not cpu.amx_attention_supported(z(1, 3, 64, 64), z(1, 2, 64, 64), z(1, 2, 64, 64))
    assert not cpu.amx_attention_supported(z(1, 2, 64, 64), z(1, 1, 32, 64), z(1, 1, 32, 64))
    assert not cpu.amx_attention_supported(z(1, 2, 64, 64).float(), z(1, 1, 64, 64), z(1, 1, 64, 64))


@pytest.mark.parametrize("M,K,N,ranks", [(333, 96, 160, (8, 40)), (64, 32, 64, (16,))])
def test_amx_lora_linear(fused, request, monkeypatch, M, K, N, ranks):
    """The stacked-LoRA linear with its rank-side products on AMX (kernels.cpu.lora_fwd / lora_bwd) against the
    fp64 formula: output, dX and the gradients of a trainable and a frozen adapter, under bf16 autocast with fp32
    master adapters, x strided and M not a multiple of the 32-row blocks; at least as close as the PyTorch path
    (MINILORA_CPU_KERNELS=off). In the plain C build the same call takes the PyTorch path."""
    import kernels

    torch.manual_seed(5)
    xw = torch.randn(M, K + 32)
    weight = (torch.randn(N, K) / K**0.5).to(BF)
    lora_a = [torch.randn(r, K) / K**0.5 for r in ranks]
    lora_b = [torch.randn(N, r) * 0.3 for r in ranks]
    scaling = [2.0, 0.5][:len(ranks)]
    g = torch.randn(M, N).to(BF)

    def formula(x, w, a_s, b_s):
        return x @ w.t() + sum(s * (x @ a.t()) @ b.t() for a, b, s in zip(a_s, b_s, scaling))

    xd = xw[:, :K].to(BF).double().requires_grad_(True)
    a64 = [a.to(BF).double().requires_grad_(True) for a in lora_a]
    b64 = [b.to(BF).double().requires_grad_(True) for b in lora_b]
    ref = formula(xd, weight.double(), a64, b64)
    ref.backward(g.double())
    amx = _amx_expected(request.node.callspec.params["fused"])
    calls = []
    for name in ("lora_fwd", "lora_bwd"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    errors = {}
    for m in ("auto", "off"):
        monkeypatch.setenv("MINILORA_CPU_KERNELS", m)
        x = xw.to(BF)[:, :K].requires_grad_(True)  # a strided [M, K] view
        x.retain_grad()
        a_s = [a.clone().requires_grad_(True) for a in lora_a]
        b_s = [b.clone().requires_grad_(i == 0) for i, b in enumerate(lora_b)]  # the last adapter frozen
        if len(ranks) == 1:
            b_s[0].requires_grad_(True)
        with torch.autocast("cpu", dtype=BF):
            y = kernels.lora_linear(x, weight, a_s, b_s, scaling)
        y.backward(g)
        assert y.dtype == BF and x.grad.dtype == BF and all(a.grad.dtype == torch.float32 for a in a_s)
        assert all(b.grad is None for b in b_s[1:])
        errors[m] = ([_rel(y, ref), _rel(x.grad, xd.grad)] + [_rel(a.grad, r.grad) for a, r in zip(a_s, a64)]
                     + [_rel(b_s[0].grad, b64[0].grad)])
    assert calls == (["lora_fwd", "lora_bwd"] if amx else [])
    for amx_err, torch_err in zip(errors["auto"], errors["off"]):
        assert amx_err < 1.25 * torch_err + 1e-3 and amx_err < 2e-2


def test_amx_lora_direct_and_unsupported(fused, request, monkeypatch):
    """lora_fwd / lora_bwd called directly: s and y against the fp64 formula (one rounding each), the optional
    outputs (no dX, no dA, no dB) and the shapes the kernels refuse (then the PyTorch products run)."""
    if not _amx_expected(request.node.callspec.params["fused"]):
        pytest.skip("no AMX here: lora_fwd / lora_bwd are never called")
    torch.manual_seed(8)
    M, K, N, R = 70, 64, 96, 24
    x, a, b = (torch.randn(M, K)).to(BF), (torch.randn(R, K) / 8).to(BF), (torch.randn(N, R) / 5).to(BF)
    y0 = torch.randn(M, N).to(BF)
    y = y0.clone()
    s = cpu.lora_fwd(x, a, b, y)
    assert _ulps(s, (x.double() @ a.double().t()).to(BF)) <= 1.0
    assert _ulps(y, (y0.double() + s.double() @ b.double().t()).to(BF)) <= 1.0
    g, dx0 = torch.randn(M, N).to(BF), torch.randn(M, K).to(BF)
    dx = dx0.clone()
    da, dbt = cpu.lora_bwd(g, x, s, a, b, dx)
    t = (g.double() @ b.double()).to(BF).double()
    assert _ulps(dx, (dx0.double() + t @ a.double()).to(BF)) <= 1.0
    assert _rel(da, t.t() @ x.double()) < 1e-5 and _rel(dbt, s.double().t() @ g.double()) < 1e-5
    assert cpu.lora_bwd(g, None, s, a, b, None)[0] is None and torch.equal(cpu.lora_bwd(g, None, s, a, b, None)[1], dbt)
    assert torch.equal(cpu.lora_bwd(g, x, None, a, b, None)[0], da) and cpu.lora_bwd(g, x, None, a, b, None)[1] is None
    assert cpu.amx_lora_supported(x, a, b)
    assert not cpu.amx_lora_supported(x[:, :48], a[:, :48], b)  # K % 32
    assert not cpu.amx_lora_supported(x, a, b[:40])  # N % 32
    assert not cpu.amx_lora_supported(x.float(), a, b)
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "off")
    assert not cpu.amx_lora_supported(x, a, b)


@pytest.mark.parametrize("dtype,tol", [(BF, 2**-8), (torch.float32, 1e-6)])
@pytest.mark.parametrize("first", [0, 1, 37])
def test_causal_softmax_rows_direct(fused, first, dtype, tol):
    """Sharp rows (scores spread over +-80 after scaling): no overflow, zeros after each row's query position,
    rows sum to 1; the queries first..T-1 (a query block of the GEMM attention), in 2 stacked runs (2 heads).
    bf16, and the fp32 twin (fp32 training on CPUs without native bf16)."""
    torch.manual_seed(4)
    T = 50
    s = (torch.randn(3, 2 * (T - first), T) * 300).to(dtype)
    p = cpu.causal_softmax_(s.clone(), 0.25, first)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[first:].repeat(2, 1)  # row r: query first + r % (T - first)
    ref = torch.softmax((s.double() * 0.25).masked_fill(~mask, float("-inf")), -1)
    assert p.dtype == dtype and torch.isfinite(p.float()).all()
    assert (p.float()[:, ~mask] == 0).all()
    assert (p.double() - ref).abs().max() < tol
    # backward: scale * p * (dp - rowsum(p * dp)), zeros after the query position
    dp = torch.randn(s.shape).to(dtype)
    ds = cpu.causal_softmax_backward_(dp.clone(), p, 0.25, first)
    pd = p.double()
    ref_ds = 0.25 * pd * (dp.double() - (pd * dp.double()).sum(-1, keepdim=True))
    assert ds.dtype == dtype and (ds.float()[:, ~mask] == 0).all()
    assert _rel(ds, ref_ds) < (2**-7 if dtype == BF else 1e-6)


@pytest.mark.parametrize("sharp", [1.0, 25.0])
def test_cross_entropy(fused, sharp):
    torch.manual_seed(5)
    D, V, n = 24, 300, 70
    w = (torch.randn(V, D) * 0.3).to(BF)
    y = torch.randint(0, V, (n,))
    h = torch.randn(n, D)
    h += sharp * w.float()[y]
    h = h.to(BF)
    head = torch.nn.Linear(D, V, bias=False).to(BF).requires_grad_(False)
    head.weight.data.copy_(w)
    labels = torch.cat([torch.zeros(1, dtype=torch.long), y])[None]  # position t predicts labels[t + 1]
    hidden = torch.cat([h, torch.zeros(1, D, dtype=BF)])[None].requires_grad_(True)
    loss, count = losses.lm_loss_sum(hidden, head, labels)
    loss.backward()
    logits = h.double() @ w.double().T  # oracle: the same bf16 logits (as any bf16 LM head), fp64 softmax
    logits = logits.to(BF).double().requires_grad_(True)
    ref = F.cross_entropy(logits, y, reduction="sum")
    ref.backward()
    assert count.item() == n and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-4)
    assert _rel(hidden.grad[0, :n], logits.grad @ w.double()) < 1e-2


def test_lm_head_transpose_cache_follows_the_weight(fused):
    """The cached contiguous W^T is remade when the weight changes in place, and is per weight tensor."""
    torch.manual_seed(6)
    D, V = 16, 50
    hidden = torch.randn(1, 9, D).to(BF)
    labels = torch.randint(0, V, (1, 9))

    def check(head):
        loss, _ = losses.lm_loss_sum(hidden, head, labels)
        logits = hidden[0, :-1].double() @ head.weight.double().T
        ref = F.cross_entropy(logits, labels[0, 1:], reduction="sum")
        assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
        return loss.item()

    head = torch.nn.Linear(D, V, bias=False).to(BF).requires_grad_(False)
    first = check(head)
    with torch.no_grad():
        head.weight.mul_(-2.0)  # in place: same tensor and address, new version
    assert check(head) != first
    other = torch.nn.Linear(D, V, bias=False).to(BF).requires_grad_(False)
    check(other)
    check(head)


def test_cross_entropy_rejects_out_of_range_targets(fused):
    head = torch.nn.Linear(4, 10, bias=False).to(BF).requires_grad_(False)
    with pytest.raises(ValueError, match=r"target token ids must lie in \[0, 10\)"):
        losses.lm_loss_sum(torch.zeros(1, 3, 4, dtype=BF), head, torch.tensor([[0, 3, 10]]))


def test_off_and_dtypes_choose_the_path(monkeypatch):
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "off")
    assert cpu.library() is None and not cpu.enabled(torch.zeros(2, dtype=BF))
    assert not cpu.enabled(torch.zeros(2), fp32=True)
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "auto")
    assert not cpu.enabled(torch.zeros(2))  # fp32: only the kernels that have fp32 twins
    assert not cpu.enabled(torch.zeros(2), torch.zeros(2, dtype=BF), fp32=True)  # mixed dtypes: never
    assert not cpu.enabled(torch.zeros(2, dtype=torch.float64), fp32=True)
    assert cpu.enabled(torch.zeros(2), fp32=True) == (cpu.library() is not None)
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="MINILORA_CPU_KERNELS='sometimes'"):
        cpu.mode()


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setenv("MINILORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable .*no C compiler"):
        assert cpu.library() is None
    x = torch.randn(4, 8).to(BF)
    w = torch.ones(8, dtype=BF)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5))
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "on")
    with pytest.raises(RuntimeError, match="MINILORA_CPU_KERNELS=on, but the CPU kernels are unavailable"):
        cpu.library()


def test_build_is_cached_per_source(monkeypatch, tmp_path):
    """A fresh cache directory gets one library; a second process reuses it without compiling."""
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    code = ("import warnings; warnings.simplefilter('error'); from kernels import cpu; "
            "assert cpu.library() is not None; print(cpu._state['path'])")
    env = {**os.environ, "MINILORA_CACHE_DIR": str(tmp_path), "MINILORA_CPU_KERNELS": "on"}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    built = sorted(tmp_path.glob("*.so"))
    assert len(built) == 1 and first.stdout.strip() == str(built[0])
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.strip() == str(built[0]) and built[0].stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".so"]  # no temp files left behind


# head_dim 16 and 33 tokens (GEMM attention); head_dim 64 and 64 tokens (the AMX attention where there is AMX);
# fp32 (no autocast: the fp32 kernels)
@pytest.mark.parametrize("hidden,heads,kv,seq,dtype", [(64, 4, 2, 33, BF), (128, 2, 1, 64, BF),
                                                       (64, 4, 2, 33, torch.float32)])
def test_training_step_matches_pytorch_path(monkeypatch, hidden, heads, kv, seq, dtype):
    """A whole LoRA step (loss and adapter gradients) with the fused kernels and without: bf16 autocast (tolerances
    of bf16's roundings) and fp32."""
    from minilora.lora import add_adapter
    from minilora.model import LlamaConfig, Transformer

    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    torch.manual_seed(6)
    model = Transformer(cfg).to(dtype)
    add_adapter(model, "task", r=4, alpha=8, targets="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(0, 96, (2, seq))
    out = {}
    for m in ("off", "auto"):
        monkeypatch.setenv("MINILORA_CPU_KERNELS", m)
        monkeypatch.setenv("MINILORA_ATTENTION", "matmul")
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF, enabled=dtype == BF):
            total, count = losses.lm_loss_sum(model.hidden_states(ids), model.lm_head, ids)
        (total / count).backward()
        out[m] = ((total / count).item(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    if cpu.library() is None:
        pytest.skip("fused CPU kernels unavailable: only the PyTorch path ran")
    tol = (2e-3, 3e-2) if dtype == BF else (1e-6, 1e-4)
    assert out["auto"][0] == pytest.approx(out["off"][0], rel=tol[0])
    for a, b in zip(out["auto"][1], out["off"][1]):
        assert _rel(a, b) < tol[1]


@pytest.mark.parametrize("flags", [2, 3])  # the fallbacks for compilers without an OpenMP runtime
def test_builds_and_agrees_without_openmp(monkeypatch, tmp_path, flags):
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "_FLAG_SETS", cpu._FLAG_SETS[flags:flags + 1])
    monkeypatch.setenv("MINILORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MINILORA_CPU_KERNELS", "on")
    assert "-fopenmp" not in cpu._FLAG_SETS[0]
    torch.manual_seed(7)
    gate, up = ((torch.randn(1000) * 3).to(BF) for _ in range(2))
    ref = (F.silu(gate.double()) * up.double()).to(BF)
    assert _ulps(ops.swiglu(gate, up), ref) <= 1.0
    # SwiGLU's AVX-512 BF16 version is compiled in exactly where the flags target such a CPU (-march=native here),
    # and agrees with the fp64 formula like the plain C one, forward and backward, packed halves included
    native = "-march=native" in cpu._FLAG_SETS[0] and "avx512_bf16" in cpu._cpu_fingerprint().split()
    assert cpu.library().simd_avx512bf16() == int(native)
    gate_up, g = (torch.randn(5, 2 * 37) * 3).to(BF), torch.randn(5, 37).to(BF)
    out, (dgu,) = _grads(ops.swiglu_packed, [gate_up], g)
    gud = gate_up.double().requires_grad_(True)
    (F.silu(gud[:, :37]) * gud[:, 37:]).backward(g.double())
    assert _ulps(out, (F.silu(gud[:, :37]) * gud[:, 37:]).detach().to(BF)) <= 1.0
    assert _rel(dgu, gud.grad) < 4e-3
    assert len(list(tmp_path.glob("*.so"))) == 1


@pytest.mark.bench
def test_bench_cpu_kernels_tool_small(fused, tmp_path):
    """tools/bench_cpu_kernels.py end to end at tiny shapes (no timing assertion): both paths ran and agree."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_cpu_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_kernels", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "b.json"
    result = tool.main(["--rounds", "1", "--reps", "1", "--dims", "64", "16", "32", "48", "4", "2", "100",
                        "--no-step", "--json", str(out)])
    assert [r["op"] for r in result["ops"]] == list(tool.op_cases(64, 16, 32, 48, 4, 2, 100))
    for r in result["ops"]:
        assert r["fused_ms"] > 0 and r["torch_ms"] > 0 and r["rel_diff"] < 2e-2
    assert json.loads(out.read_text())["table_markdown"] == result["table_markdown"]


@pytest.mark.parametrize("mode,amd,backend", [("auto", True, "onednn"), ("auto", False, "blas"),
                                              ("onednn", False, "onednn"), ("blas", True, "blas")])
def test_fp32_linear_matches_the_matmul_by_the_machines_library(monkeypatch, mode, amd, backend):
    """``fp32_linear`` (the fp32 CPU frozen-weight GEMM) equals ``x @ W^T`` by either library, and the library is a
    fixed choice (oneDNN on AMD CPUs by default), never one timed at run time: a resumed run must repeat the
    uninterrupted one bit for bit, and the two libraries round differently."""
    monkeypatch.setenv("MINILORA_FP32_LINEAR", mode)
    monkeypatch.setitem(cpu._state, "amd", amd)
    if not cpu._onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    assert cpu.fp32_linear_backend() == backend
    calls = []
    real = cpu._onednn_linear
    monkeypatch.setattr(cpu, "_onednn_linear", lambda x, w: calls.append(1) or real(x, w))
    torch.manual_seed(7)
    w = torch.randn(96, 64)
    outs = []
    for x in (torch.randn(37, 64), torch.randn(2, 19, 64)):
        outs.append(cpu.fp32_linear(x, w))
        torch.testing.assert_close(outs[-1], x @ w.t(), rtol=1e-5, atol=1e-5)
        assert torch.equal(cpu.fp32_linear(x, w), outs[-1])  # the same library again: the same bits
    assert len(calls) == (4 if backend == "onednn" else 0)


def test_fp32_linear_draws_nothing_from_the_global_generator(monkeypatch):
    """The first call checks the oneDNN op on fixed numbers: a draw from torch's generator there would shift the
    dropout masks of a training run by when that first call came (a resumed run would differ from a whole one)."""
    monkeypatch.setattr(cpu, "_state", {k: v for k, v in cpu._state.items() if k != "onednn_linear"})
    before = torch.random.get_rng_state()
    cpu.fp32_linear(torch.ones(4, 8), torch.ones(3, 8))
    assert "onednn_linear" in cpu._state and torch.equal(torch.random.get_rng_state(), before)


def test_fp32_linear_leaves_other_dtypes_and_layouts_to_the_matmul(monkeypatch):
    monkeypatch.setenv("MINILORA_FP32_LINEAR", "onednn")
    monkeypatch.setattr(cpu, "_onednn_linear", lambda x, w: pytest.fail("oneDNN called"))
    for dtype in (BF, torch.float64):
        x, w = torch.randn(5, 8).to(dtype), torch.randn(3, 8).to(dtype)
        assert torch.equal(cpu.fp32_linear(x, w), x @ w.t())
    w = torch.randn(8, 3).t()  # not contiguous
    x = torch.randn(5, 8)
    assert torch.equal(cpu.fp32_linear(x, w), x @ w.t())
    monkeypatch.setenv("MINILORA_FP32_LINEAR", "fast")
    with pytest.raises(ValueError, match="MINILORA_FP32_LINEAR='fast'"):
        cpu.fp32_linear(x, torch.randn(3, 8))
