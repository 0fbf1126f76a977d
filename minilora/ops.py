"""Lean autograd functions for the decoder's non-GEMM work: RMSNorm, RoPE, SwiGLU and causal GQA attention.

Each computes the same values as the plain PyTorch composition at the end of this file
(``rms_norm_ref``, ``rope_ref``, ``swiglu_ref``, ``attention_ref``) but saves less for backward and makes fewer
passes over memory, which is what limits these ops on a CPU:

- ``rms_norm`` saves its input (alive anyway: the residual stream) and one fp32 scalar per row, not fp32 copies.
- ``rope`` rotates q or k straight into the head-major ``[B, H, T, D]`` layout attention wants (no ``cat``, no
  separate transpose copy), and its backward is the inverse rotation.
- ``swiglu`` saves gate and up (needed anyway) instead of also the activated gate, which it recomputes.
- ``attention``, causal and bf16 on a CPU with AMX (``T % 32 == 0``, ``D % 64 == 0``): ``kernels/cpu.c``'s tile
  kernels (``_AMXAttention``; ``_AMXQKVAttention`` takes the packed q|k|v projection and applies RoPE itself):
  fp32 scores, nothing of size ``[T, T]`` saved, the key blocks above the diagonal skipped, in training and in
  inference and for long sequences too. At SmolLM2's shapes on 2 cores, forward + backward take 3.4 ms a layer
  against 7.1 for the GEMMs below when measured alone, 5.8 against 8.5 inside a training step (whose inputs come
  from memory rather than cache). Elsewhere, CPU training of short sequences runs grouped-query attention as
  batched GEMMs on ``[G*T, T]`` score tiles shared by the ``G`` query heads of a K/V head (no K/V repeat), saving
  the probabilities, with a backward of four GEMMs and one fused softmax-backward pass (PyTorch's CPU
  flash-attention backward is several times slower at these sizes); the rest (GPU, long sequences, inference,
  padding masks) calls SDPA.

For bf16 tensors on the CPU the elementwise parts run in ``kernels/cpu.c`` instead (one pass each way, fp32 math,
one rounding; ``MINILORA_CPU_KERNELS=off`` keeps the PyTorch code below): RMSNorm with a frozen weight, RoPE,
SwiGLU, the causal softmax of the GEMM attention and the AMX attention; the first four for fp32 tensors too.
On CUDA, RMSNorm (with the residual add before it), SwiGLU and the packed q|k|v RoPE use ``kernels.rowwise``
(Triton).

``MINILORA_ATTENTION=sdpa|matmul|auto`` (default ``auto``) forces the attention implementation (``matmul``: the
CPU training attention, AMX where it can run; ``sdpa`` also turns the AMX kernels off).
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu as cpu_kernels

# Saved probabilities cost B*H*T*T*2 bytes per layer; beyond this length SDPA (which saves none) is used.
MATMUL_ATTENTION_MAX_T = 512
# Query rows per block of the causal GEMM attention (``query_blocks``). A layer's forward + backward at SmolLM2's
# heads (9 of D = 64, 3 K/V), 2,048 tokens, 2 cores (AVX512-BF16 without AMX), glibc malloc tuned as the recipes
# run, one block -> blocks of 64 (medians of 40, alternating): bf16 16 x 128 tokens 8.1 -> 8.6 ms, 8 x 256 13.3 ->
# 12.1, 4 x 512 27.8 -> 22.3; fp32 22.4 -> 18.9, 35.8 -> 24.6, 69.0 -> 40.9. Blocks of 32 or 128 were no better.
ATTENTION_BLOCK = 64
# The AMX attention's backward keeps G*T*T*4 bytes per thread (probabilities and score gradients of one K/V head's
# G query heads, as row pairs); beyond this (G=3: T=3344; G=1: T=5792) SDPA or the GEMM attention is used.
AMX_MAX_SCRATCH = 2**27


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit inputs, else the input's own (fp32, or fp64 in gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------- RMSNorm
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        ctx.fused = (not ctx.needs_input_grad[1] and weight.shape == x.shape[-1:]
                     and cpu_kernels.enabled(x, weight, fp32=True))
        if ctx.fused:  # one pass each way in kernels/cpu.c (bf16 or fp32 on CPU, frozen weight)
            _, out, rstd = cpu_kernels.rms_norm_fwd(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return out
        acc, D = _acc(x.dtype), x.shape[-1]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)  # one pass, fp32 accumulation
        rstd = torch.rsqrt(norm.square_().div_(D).add_(eps))
        xf = x.to(acc)
        n = (xf * rstd if xf is x else xf.mul_(rstd)).to(x.dtype)
        out = n.mul_(weight) if weight.dtype == n.dtype and n is not x else weight * n
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        # with xhat = x * rstd and gw = g * weight:  dx = rstd * gw - (rstd^3 / D) * sum(gw * x) * x
        x, weight, rstd = ctx.saved_tensors
        if ctx.fused:
            return cpu_kernels.rms_norm_bwd(g, x, weight, rstd) if ctx.needs_input_grad[0] else None, None, None
        acc, D = rstd.dtype, x.shape[-1]
        gw = g * weight
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * (x.to(acc) * rstd).to(x.dtype)).reshape(-1, D).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            # the per-row correction sum(gw * x), accumulated in fp32 inside vecdot, rounded once to x.dtype
            dot = torch.linalg.vecdot(gw, x.to(gw.dtype), dim=-1).unsqueeze(-1).to(acc)
            beta = rstd.pow(3).mul_(dot).div_(-D)
            xf = x.to(acc)
            dx = (xf * beta if xf is x else xf.mul_(beta)).addcmul_(gw.to(acc), rstd).to(x.dtype)
        return dx, dw, None


def _triton_rowwise(x: Tensor):
    """``kernels.rowwise`` (Triton RMSNorm / SwiGLU) when it should run on ``x``, else None (the PyTorch functions).

    ``kernels.backend_for`` decides (``MINILORA_KERNELS=auto|triton|torch``): Triton for CUDA tensors, and for CPU
    tensors only under ``TRITON_INTERPRET=1`` (tests). CPU tensors otherwise never import triton.
    """
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    import kernels

    if kernels.backend_for(x) != "triton":
        return None
    from kernels import rowwise

    return rowwise if x.is_cuda or rowwise.INTERPRET else None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / rms(x))``, the normalisation in fp32 and cast back to ``x.dtype`` before the weight (as HF).

    Triton kernels (``kernels.rowwise``) on CUDA when ``weight.dtype == x.dtype``; otherwise ``_RMSNorm``.
    """
    triton_ops = _triton_rowwise(x)
    if triton_ops is not None and triton_ops.rms_norm_supported(x, weight):
        return triton_ops.rms_norm(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class _AddRMSNorm(torch.autograd.Function):
    """(h = x + a, rms_norm(h)) in one pass of kernels/cpu.c; backward adds the gradient that reaches h along the
    residual stream inside the RMSNorm backward pass, instead of in a separate add."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        h, out, rstd = cpu_kernels.rms_norm_fwd(x, weight, eps, residual=a)
        ctx.save_for_backward(h, weight, rstd)
        return h, out

    @staticmethod
    def backward(ctx, gh: Tensor | None, gout: Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        if gout is None:
            return gh, gh, None, None
        dh = cpu_kernels.rms_norm_bwd(gout, h, weight, rstd, residual=gh)
        return dh, dh, None, None


def add_rms_norm(x: Tensor, a: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(h, rms_norm(h, weight, eps))`` with ``h = x + a`` (``x`` when ``a`` is None): a pre-norm block's residual
    add and the norm after it, fused in one pass each way on CUDA (Triton, equal dtypes) and on the CPU for bf16
    with a frozen weight (else the two ops)."""
    if a is None:
        return x, rms_norm(x, weight, eps)
    triton_ops = _triton_rowwise(x)
    if triton_ops is not None and triton_ops.add_rms_norm_supported(x, a, weight):
        return triton_ops.add_rms_norm(x, a, weight, eps)
    return add_rms_norm_untriton(x, a, weight, eps, rms_norm)


def add_rms_norm_untriton(x: Tensor, a: Tensor, weight: Tensor, eps: float, norm=rms_norm) -> tuple[Tensor, Tensor]:
    """``add_rms_norm`` without its Triton kernel: kernels/cpu.c's one pass each way where it runs (bf16 or fp32 on
    the CPU, a frozen weight), else the add and ``norm`` (``rms_norm``; the benchmark passes ``_RMSNorm.apply``)."""
    if (not weight.requires_grad and x.shape == a.shape and weight.shape == x.shape[-1:]
            and cpu_kernels.enabled(x, a, weight, fp32=True)):
        return _AddRMSNorm.apply(x, a, weight, eps)
    h = x + a
    return h, norm(h, weight, eps)


# ---------------------------------------------------------------- RoPE
def _rotate_into(out: Tensor, x: Tensor, c: Tensor, s: Tensor, sign: float) -> Tensor:
    """``out = x * c + sign * rotate_half(x) * s`` with c, s the first halves of the (duplicated) tables."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s, value=sign)
    return out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, H, D = x.shape
        out = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device)
        ctx.fused = x.stride(-1) == 1 and cos.shape == sin.shape == (T, D) and cpu_kernels.enabled(x, fp32=True)
        if ctx.fused:
            cpu_kernels.rope_into(out.transpose(1, 2), x, cos, sin, 1.0)
            ctx.save_for_backward(cos, sin)
            return out
        c, s = cos[:, None, : D // 2].to(x.dtype), sin[:, None, : D // 2].to(x.dtype)
        _rotate_into(out.transpose(1, 2), x, c, s, 1.0)
        ctx.save_for_backward(c, s)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        c, s = ctx.saved_tensors
        B, H, T, D = g.shape
        dx = torch.empty(B, T, H, D, dtype=g.dtype, device=g.device)
        if ctx.fused:  # c, s: the fp32 tables; the kernel rounds them as the forward did
            g = g if g.stride(-1) == 1 else g.contiguous()
            return cpu_kernels.rope_into(dx, g.transpose(1, 2), c, s, -1.0), None, None
        _rotate_into(dx, g.transpose(1, 2), c, s, -1.0)
        return dx, None, None


class _QKVRoPE(torch.autograd.Function):
    """A packed q|k|v projection [B, T, (H + 2 Hkv) D] into attention's layouts in one go: q and k rotated into
    ``[B, H, T, D]`` / ``[B, Hkv, T, D]``, v copied into a contiguous ``[B, Hkv, T, D]`` (a strided v would be copied
    by each of the two GEMMs that read it). Backward writes the three gradients into one packed gradient, which the
    packed projection's backward takes as it is (separate outputs would be concatenated)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = qkv.shape
        D = qkv.shape[-1] // (H + 2 * Hkv)
        ctx.dims = (H, Hkv, D)
        q, k = (torch.empty(B, n, T, D, dtype=qkv.dtype) for n in (H, Hkv))
        cpu_kernels.rope_into(q.transpose(1, 2), qkv[..., : H * D].view(B, T, H, D), cos, sin, 1.0)
        cpu_kernels.rope_into(k.transpose(1, 2), qkv[..., H * D : (H + Hkv) * D].view(B, T, Hkv, D), cos, sin, 1.0)
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2).contiguous()
        ctx.save_for_backward(cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, gq: Tensor | None, gk: Tensor | None, gv: Tensor | None):
        cos, sin = ctx.saved_tensors
        H, Hkv, D = ctx.dims
        g = next(t for t in (gq, gk, gv) if t is not None)
        B, T = g.shape[0], g.shape[2]
        d = torch.empty(B, T, (H + 2 * Hkv) * D, dtype=g.dtype)
        parts = d.split((H * D, Hkv * D, Hkv * D), dim=-1)
        for grad, part, n, rotate in ((gq, parts[0], H, True), (gk, parts[1], Hkv, True), (gv, parts[2], Hkv, False)):
            out = part.view(B, T, n, D)
            if grad is None:
                out.zero_()
            elif rotate:  # the inverse rotation
                grad = grad if grad.stride(-1) == 1 else grad.contiguous()
                cpu_kernels.rope_into(out, grad.transpose(1, 2), cos, sin, -1.0)
            else:
                out.copy_(grad.transpose(1, 2))
        return d, None, None, None, None


def _qkv_views(qkv: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, H, T, D], k and v [B, Hkv, T, D]: strided views of a packed q|k|v tensor [B, T, (H + 2 Hkv) D]."""
    B, T, N = qkv.shape
    D = N // (H + 2 * Hkv)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
            v.view(B, T, Hkv, D).transpose(1, 2))


class _AMXQKVAttention(torch.autograd.Function):
    """``_AMXAttention`` straight from the packed q|k|v projection: the kernels rotate q and k (RoPE) as they
    load them and write the packed gradient, with dq and dk rotated back. No rotated copies of q and k, no
    contiguous v, no packing of three gradients: ``_QKVRoPE``'s two passes are gone."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> Tensor:
        ctx.dims, ctx.scale = (H, Hkv), (qkv.shape[-1] // (H + 2 * Hkv)) ** -0.5
        o, lse = cpu_kernels.attention_fwd(*_qkv_views(qkv, H, Hkv), ctx.scale, cos, sin)
        ctx.save_for_backward(qkv, cos, sin, lse)
        return o

    @staticmethod
    def backward(ctx, g: Tensor):
        qkv, cos, sin, lse = ctx.saved_tensors
        H, Hkv = ctx.dims
        d = torch.empty(qkv.shape, dtype=qkv.dtype)
        cpu_kernels.attention_bwd(*_qkv_views(qkv, H, Hkv), lse, g.to(qkv.dtype), ctx.scale, cos, sin,
                                  out=_qkv_views(d, H, Hkv))
        return d, None, None, None, None


def qkv_attention(qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int, mask: Tensor | None,
                  bias: Tensor | None = None) -> Tensor:
    """``attention(*qkv_rope(qkv, cos, sin, H, Hkv), mask, bias)``, in one AMX Function where it can run
    (``_AMXQKVAttention``, or its forward alone without autograd; conditions as ``_amx``)."""
    B, T, N = qkv.shape
    D = N // (H + 2 * Hkv)
    views = _qkv_views(qkv, H, Hkv)
    if qkv.stride(-1) == 1 and cos.shape == sin.shape == (T, D) and _amx(*views, mask):
        if _needs_grad(qkv):
            return _AMXQKVAttention.apply(qkv, cos, sin, H, Hkv)
        return cpu_kernels.attention_fwd(*views, D**-0.5, cos, sin)[0]
    return attention(*qkv_rope(qkv, cos, sin, H, Hkv), mask, bias)


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rope(q) [B, H, T, D], rope(k) [B, Hkv, T, D], v [B, Hkv, T, D]) from a packed q|k|v projection
    [B, T, (H + 2 Hkv) D]: ``kernels.rowwise.qkv_rope`` (Triton) on CUDA, ``_QKVRoPE`` (kernels/cpu.c) for bf16
    and fp32 on the CPU, else a split and ``rope``. The CPU's are head-major (the GEMM attention batches per head),
    Triton's token-major (SDPA's output then reaches o_proj without a copy)."""
    B, T, N = qkv.shape
    D = N // (H + 2 * Hkv)
    triton_ops = _triton_rowwise(qkv)
    if triton_ops is not None and triton_ops.qkv_rope_supported(qkv, cos, sin, H, Hkv):
        return triton_ops.qkv_rope(qkv, cos, sin, H, Hkv)
    if qkv.stride(-1) == 1 and cos.shape == sin.shape == (T, D) and cpu_kernels.enabled(qkv, fp32=True):
        return _QKVRoPE.apply(qkv, cos, sin, H, Hkv)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    return (rope(q.view(B, T, H, D), cos, sin), rope(k.view(B, T, Hkv, D), cos, sin),
            v.view(B, T, Hkv, D).transpose(1, 2))


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` [B, T, H, D] (HF rotate-half) returned as a contiguous ``[B, H, T, D]``.

    ``cos``/``sin`` are [T, D] tables whose two halves are equal (``cat(freqs, freqs)``), in any float dtype;
    they are rounded to ``x.dtype`` first, as HF does.
    """
    return _RoPE.apply(x, cos, sin)


# ---------------------------------------------------------------- SwiGLU
class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``; ``up`` None: ``gate`` is one packed ``[..., 2F]`` tensor (gate half, then up half),
    the output of a packed gate/up projection, whose gradient then comes back as one tensor too (no ``cat``)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor | None) -> Tensor:
        ctx.packed = up is None
        if ctx.packed:
            gate, up = gate.chunk(2, dim=-1)
        ctx.save_for_backward(gate, up)
        ctx.fused = gate.shape == up.shape and gate.shape[-1] > 0 and cpu_kernels.enabled(gate, up, fp32=True)
        if ctx.fused:
            return cpu_kernels.swiglu_fwd(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate, up = ctx.saved_tensors
        if ctx.fused and ctx.packed:
            return cpu_kernels.swiglu_bwd(g, gate, up, packed=True), None
        if ctx.packed:  # both halves written into one packed gradient (no cat)
            d = torch.empty(g.shape[:-1] + (2 * g.shape[-1],), dtype=torch.result_type(g, gate), device=g.device)
            dgate, dup = d.chunk(2, dim=-1)
            torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=dgate)
            torch.mul(F.silu(gate), g, out=dup)
            return d, None
        need_gate, need_up = ctx.needs_input_grad
        if ctx.fused:
            dgate, dup = cpu_kernels.swiglu_bwd(g, gate, up)
        else:
            dgate = torch.ops.aten.silu_backward(g * up, gate) if need_gate else None
            dup = F.silu(gate).mul_(g) if need_up else None
        return dgate if need_gate else None, dup if need_up else None


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``: Triton kernels (``kernels.rowwise``) on CUDA for equal dtypes, else ``_SwiGLU``."""
    triton_ops = _triton_rowwise(gate)
    if triton_ops is not None and triton_ops.swiglu_supported(gate, up):
        return triton_ops.swiglu(gate, up)
    return _SwiGLU.apply(gate, up)


def swiglu_packed(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``gate_up = cat(gate, up)`` along the last dim (a packed gate/up projection)."""
    triton_ops = _triton_rowwise(gate_up)
    if triton_ops is not None and triton_ops.swiglu_packed_supported(gate_up):
        return triton_ops.swiglu_packed(gate_up)
    return _SwiGLU.apply(gate_up, None)


# ---------------------------------------------------------------- attention
def _attention_mode() -> str:
    mode = os.environ.get("MINILORA_ATTENTION", "auto")
    if mode not in ("auto", "sdpa", "matmul"):
        raise ValueError(f"MINILORA_ATTENTION={mode!r}: expected auto, sdpa or matmul")
    return mode


def _backend(device: torch.device, T: int, train: bool) -> str:
    mode = _attention_mode()
    if mode != "auto":
        return mode
    return "matmul" if train and device.type == "cpu" and T <= MATMUL_ATTENTION_MAX_T else "sdpa"


def attention_backend(q: Tensor) -> str:
    """``"matmul"`` or ``"sdpa"`` for queries ``q`` [B, H, T, D] under MINILORA_ATTENTION."""
    return _backend(q.device, q.shape[2], torch.is_grad_enabled() and q.requires_grad)


def layer_bias(T: int, mask: Tensor | None, device: torch.device) -> Tensor | None:
    """``causal_bias`` built once for all layers of a forward when the GEMM attention may run there, else None."""
    return causal_bias(T, mask, device) if _backend(device, T, torch.is_grad_enabled()) == "matmul" else None


def query_blocks(T: int) -> list[tuple[int, int]]:
    """Row blocks [t0, t1) of the causal GEMM attention's queries, about ATTENTION_BLOCK each: block [t0, t1) is
    multiplied with keys 0..t1-1 only, which skips most of the [T, T] scores above the diagonal (half of them as
    the blocks shrink) in all six GEMMs of forward and backward."""
    n = max(1, round(T / ATTENTION_BLOCK))
    ends = [T * j // n for j in range(n + 1)]
    return list(zip(ends[:-1], ends[1:]))


_LAST_MASK: list = [None]  # (weak reference to the mask, its version, _within_causal's answer)


def _within_causal(mask: Tensor) -> bool:
    """Whether a boolean [..., T, T] mask lets no query see a later key (the model's key-padding masks). Every layer
    of a forward gets the same mask: the answer for the last mask seen is kept while it is unchanged."""
    last = _LAST_MASK[0]
    if last is not None and last[0]() is mask and last[1] == mask._version:
        return last[2]
    T = mask.shape[-1]
    within = not bool((mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).triu_(1)).any())
    _LAST_MASK[0] = (weakref.ref(mask), mask._version, within)
    return within


def _probs(q: Tensor, k: Tensor, bias: Tensor, G: int) -> Tensor:
    """Softmax probabilities [B, Hkv, G*h, L] in q's dtype, for q [B, Hkv, G*h, D] (already scaled) against keys
    k [B, Hkv, L, D], and ``bias`` [h, L] or [B, 1, 1, h, L].

    The scores stay in q's dtype: adding a 0 / -inf bias is exact, and the softmax accumulates in fp32 internally.
    Mixed-dtype elementwise ops are avoided on purpose: on CPU they take a slow, unvectorised path.
    """
    B, Hkv, Gh, _ = q.shape
    L = k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)).view(B, Hkv, G, Gh // G, L)
    return torch.softmax(s.add_(bias.to(s.dtype)), dim=-1).view(B, Hkv, Gh, L)


class _MatmulAttention(torch.autograd.Function):
    """GQA attention as GEMMs, by query blocks (``query_blocks``; ``blocks`` [(0, T)] for a mask that lets queries
    see later keys). ``bias`` None: plain causal in bf16 or fp32 on the CPU, whose softmax (and its backward) then
    runs in kernels/cpu.c with the 1/sqrt(D) scale inside, so no pass over q or k applies it.

    A block's queries are the G heads' rows t0..t1-1 of one K/V head, stacked ([B, Hkv, G*h, D]: a copy, kept for
    backward, unless one block), so that each GEMM is one batched product per K/V head. dK and dV add up the
    blocks' products. The output is written token-major (a [B, H, T, D] view of [B, T, H, D]), so that o_proj
    reads it without a copy; dQ too when there are several blocks (the RoPE backward reads either layout).
    (Looping over a few sequences at a time, to keep the score tiles in cache, measured slower: 6% a step for one
    sequence at a time, 1.6% for two.)
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, blocks: list[tuple[int, int]]) -> Tensor:
        Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
        ctx.scale, ctx.fused, ctx.blocks = q.shape[-1] ** -0.5, bias is None, blocks
        out = _token_major(q)
        qbs, ps = [], []
        for t0, t1 in blocks:
            qb = _query_rows(q, Hkv, t0, t1)
            if ctx.fused:
                p = cpu_kernels.causal_softmax_(torch.matmul(qb, k[:, :, :t1].transpose(-1, -2)), ctx.scale, t0)
            else:
                p = _probs(qb * ctx.scale, k[:, :, :t1], bias[..., t0:t1, :t1], G)
            _put_rows(out, torch.matmul(p, v[:, :, :t1]), Hkv, t0, t1)
            qbs.append(qb)
            ps.append(p)
        ctx.save_for_backward(k, v, *qbs, *ps)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        k, v, *saved = ctx.saved_tensors
        n = len(ctx.blocks)
        qbs, ps = saved[:n], saved[n:]
        g = g.to(k.dtype)
        Hkv = k.shape[1]
        if not ctx.fused:  # _softmax_backward_data gives dS / scale: the scale goes on the smaller operands
            k = k * ctx.scale
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq = _token_major(g) if n > 1 else None
        for (t0, t1), qb, p in zip(ctx.blocks, qbs, ps):
            gb = _query_rows(g, Hkv, t0, t1)
            dv[:, :, :t1] += torch.matmul(p.transpose(-1, -2), gb)
            dp = torch.matmul(gb, v[:, :, :t1].transpose(-1, -2))
            if ctx.fused:  # the gradient of the unscaled scores
                ds = cpu_kernels.causal_softmax_backward_(dp, p, ctx.scale, t0)
            else:  # p * (dp - rowsum(p * dp)), fused; = dS / scale
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
                qb = qb * ctx.scale
            dqb = torch.matmul(ds, k[:, :, :t1])
            if dq is None:
                dq = dqb.view(g.shape)
            else:
                _put_rows(dq, dqb, Hkv, t0, t1)
            dk[:, :, :t1] += torch.matmul(ds.transpose(-1, -2), qb)
        return dq, dk, dv, None, None


def _query_rows(x: Tensor, Hkv: int, t0: int, t1: int) -> Tensor:
    """Rows t0..t1-1 of x [B, H, T, D], grouped per K/V head: [B, Hkv, G*(t1-t0), D] (a view when t0..t1 is all T
    and x is contiguous)."""
    B, H, T, D = x.shape
    return x.unflatten(1, (Hkv, H // Hkv))[:, :, :, t0:t1].reshape(B, Hkv, (H // Hkv) * (t1 - t0), D)


def _token_major(x: Tensor) -> Tensor:
    """An empty [B, H, T, D] like x, laid out as [B, T, H, D]."""
    B, H, T, D = x.shape
    return x.new_empty(B, T, H, D).transpose(1, 2)


def _put_rows(out: Tensor, rows: Tensor, Hkv: int, t0: int, t1: int) -> None:
    """Writes a block's [B, Hkv, G*(t1-t0), D] rows into out [B, H, T, D] (``_query_rows``'s inverse)."""
    B, H, T, D = out.shape
    out.unflatten(1, (Hkv, H // Hkv))[:, :, :, t0:t1] = rows.view(B, Hkv, H // Hkv, t1 - t0, D)


class _AMXAttention(torch.autograd.Function):
    """Causal GQA attention in kernels/cpu.c on AMX tiles (bf16 CPU training): saves one fp32 log-sum-exp per
    query instead of the probabilities, skips the key blocks above the diagonal and recomputes the probabilities
    in backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx.scale = q.shape[-1] ** -0.5
        o, lse = cpu_kernels.attention_fwd(q, k, v, ctx.scale)
        ctx.save_for_backward(q, k, v, lse)
        return o

    @staticmethod
    def backward(ctx, g: Tensor):
        q, k, v, lse = ctx.saved_tensors
        return cpu_kernels.attention_bwd(q, k, v, lse, g.to(q.dtype), ctx.scale)


def causal_bias(T: int, mask: Tensor | None, device: torch.device) -> Tensor:
    """Additive fp32 attention bias: ``[T, T]`` causal, or ``[B, 1, 1, T, T]`` from a boolean ``[B, 1, T, T]`` mask."""
    if mask is None:
        return torch.full((T, T), float("-inf"), device=device).triu_(1)
    return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))[:, :, None]


def _amx(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the AMX kernels take this attention: causal (no mask), q and k of one length, bf16 on a CPU with
    AMX (``cpu_kernels.amx_attention_supported``), MINILORA_ATTENTION not ``sdpa``, and a backward whose per-thread
    buffers (G T^2 4 bytes) stay within AMX_MAX_SCRATCH. Unlike the GEMM attention they save nothing of size
    [T, T], so they serve sequences beyond MATMUL_ATTENTION_MAX_T too, and inference."""
    if mask is not None or q.shape[2] != k.shape[2] or _attention_mode() == "sdpa":
        return False
    G, T = q.shape[1] // max(k.shape[1], 1), q.shape[2]
    return G * T * T * 4 <= AMX_MAX_SCRATCH and cpu_kernels.amx_attention_supported(q, k, v)


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """Causal grouped-query attention: q [B, H, T, D], k and v [B, Hkv, T, D] -> [B, H, T, D].

    ``mask`` (bool [B, 1, T, T], True = may attend) replaces the causal mask when given; ``bias`` is
    ``causal_bias(T, mask)``, which callers compute once for all layers (else it is built here when needed).
    """
    if _amx(q, k, v, mask):
        if _needs_grad(q, k, v):
            return _AMXAttention.apply(q, k, v)
        return cpu_kernels.attention_fwd(q, k, v, q.shape[-1] ** -0.5)[0]
    if attention_backend(q) == "matmul":
        T = q.shape[2]
        blocks = query_blocks(T) if mask is None or _within_causal(mask) else [(0, T)]
        if mask is None and T == k.shape[2] and cpu_kernels.enabled(q, k, v, fp32=True):
            return _MatmulAttention.apply(q, k, v, None, blocks)
        if bias is None:
            bias = causal_bias(T, mask, q.device)
        return _MatmulAttention.apply(q, k, v, bias, blocks)
    if k.shape[1] != q.shape[1] and (mask is not None or q.device.type != "cpu"):
        # GQA inside SDPA is used on CPU only: with a mask, or on some CUDA/torch versions, it would pick the slow
        # math backend. Elsewhere K/V are repeated per query head (views + one copy), as before.
        B, Hkv, T, D = k.shape
        rep = q.shape[1] // Hkv
        k = k[:, :, None].expand(B, Hkv, rep, T, D).reshape(B, Hkv * rep, T, D)
        v = v[:, :, None].expand(B, Hkv, rep, T, D).reshape(B, Hkv * rep, T, D)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------- references (plain PyTorch compositions)
def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x = x.transpose(1, 2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qkv_rope_ref(qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv_rope`` as the plain composition: split the packed projection, ``rope_ref`` q and k, v as a view."""
    B, T, N = qkv.shape
    D = N // (H + 2 * Hkv)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    return (rope_ref(q.reshape(B, T, H, D), cos, sin), rope_ref(k.reshape(B, T, Hkv, D), cos, sin),
            v.reshape(B, T, Hkv, D).transpose(1, 2))


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Explicit softmax attention with K/V repeated per query head, as HF's eager path."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    T = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
