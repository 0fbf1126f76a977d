"""RMSNorm (with or without the residual add before it), SwiGLU and RoPE in Triton, forward and backward, and
cross-entropy rows (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Both ops are memory-bound: each kernel reads its inputs once, computes in fp32 registers and writes its outputs
once in the input dtype. ``minilora.ops.rms_norm`` / ``minilora.ops.swiglu`` dispatch here for CUDA tensors
(``MINILORA_KERNELS``, as ``kernels.backend_for``) when ``rms_norm_supported`` / ``swiglu_supported`` hold, and to
their PyTorch autograd functions otherwise. Inputs of any leading shape are seen as 2-D ``[rows, last dim]``
views with a unit-stride last dim (copied to contiguous only when they are not), so row strides are free.

RMSNorm over the last dim D (1 <= D <= ``MAX_RMS_NORM_D``), the semantics of ``minilora.ops.rms_norm_ref`` for
``weight.dtype == x.dtype``:

    forward   rstd = rsqrt(mean(x^2) + eps) in fp32;  y = w * (x * rstd).to(x.dtype)
              one program per row, the whole row in registers (BLOCK_D = next power of two >= D);
              saves x (alive anyway: the residual stream) and rstd (fp32, one per row)
    backward  gw = g * w;  dx = rstd * gw - (rstd^3 / D) * sum(gw * x) * x
              dw = sum over rows of g * (x * rstd).to(x.dtype), only when w requires grad: P programs (about two
              per SM) each loop over rows pid, pid + P, ..., accumulate an fp32 partial [D] in registers and
              write it to a [P, D] buffer that one torch ``sum(0)`` reduces. Without dw: one program per row.
    with the residual add before it (``add_rms_norm``: h = x + a, then the norm of h, as a pre-norm block does):
              the forward also reads a and writes h (rounded to x's dtype, as a separate add); the backward adds
              the gradient that reaches h along the residual stream into dh in the same pass (one rounding, and no
              separate add of two [rows, D] gradients)

SwiGLU, elementwise over ``[rows, N]`` (a flat 1-D range when every tensor is contiguous):

    forward   h = silu(gate) * up                                    saves gate and up only
    backward  dgate = g * up * sig * (1 + gate * (1 - sig)),  dup = g * silu(gate),  sig = sigmoid(gate)
    packed    gate and up the two halves of one [rows, 2N] gate|up projection (``swiglu_packed``): dgate and dup
              are written into the halves of one packed gradient, which the projection's backward takes as it is

RoPE on a packed q|k|v projection ``[B, T, (H + 2 Hkv) D]`` (as ``minilora.ops._QKVRoPE`` on the CPU):

    forward   q [B, H, T, D] and k [B, Hkv, T, D] rotated (rotate-half, tables rounded to the input dtype as HF),
              v [B, Hkv, T, D] copied: a program per token and block of heads reads its part of the row once
    backward  the inverse rotation of dq and dk and the copy of dv into one packed gradient (the packed
              projection's backward takes it as it is), with the same grid

Cross-entropy rows, for the chunked LM head of ``minilora.losses`` (the linear + cross-entropy fusion: the logits
GEMMs stay cuBLAS's, the rows between them take one kernel):

    loss[row] = logsumexp(logits[row]) - logits[row, y]      in fp32, from logits in their own dtype
              y = -100 (ignored): loss 0 and a zero gradient row, so that no host step has to drop those rows
    with grad: logits[row] <- softmax(logits[row]) - onehot(y), in place, in the logits dtype
              one program per row, looping over V in CE_BLOCK columns: a first pass keeps a running max and sum
              per lane, a second writes the gradient (two reads and one write of the row; no fp32 copy)

The backward functions are once-differentiable (no double backward through the kernels).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RMS_NORM_D = 8192  # a whole row lives in registers (LLaMA: 576..8192); wider rows go to PyTorch
DW_PROGRAMS_PER_SM = 2  # RMSNorm weight-gradient programs per SM (each holds a [BLOCK_D] fp32 accumulator)
INTERPRET_DW_PROGRAMS = 3  # under the interpreter: few programs, so that each loops over several rows
SWIGLU_BLOCK = 1024  # elements per SwiGLU program
SWIGLU_WARPS = 4
QKV_ROPE_ELEMENTS = 2048  # elements per RoPE program (LLaMA-7B: 16 heads of 128)
QKV_ROPE_WARPS = 4
CE_BLOCK = 2048  # logits columns per step of a cross-entropy row's loop
CE_WARPS = 8


def rms_norm_block(d: int) -> int:
    """BLOCK_D for rows of width d: the next power of two (a whole row per program)."""
    return triton.next_power_of_2(d)


def rms_norm_warps(block_d: int) -> int:
    """Warps per RMSNorm program: 4 below 2048 columns, 8 below 8192, else 16 (at most 16 values per thread)."""
    return 4 if block_d < 2048 else 8 if block_d < 8192 else 16


# ---------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, D, eps, A, H, stride_a, HAS_RESIDUAL: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Y[row] = W * (X[row] * rstd).to(X dtype), RSTD[row] = rsqrt(mean(X[row]^2) + eps); Y is [rows, D].
    HAS_RESIDUAL: the row normalised is H[row] = (X[row] + A[row]).to(X dtype), which is stored too ([rows, D])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the residual add, rounded to the stream's dtype as a separate add would be
        h = (x + tl.load(A + row * stride_a + cols, mask=inside, other=0.0).to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(H + row * D + cols, h, mask=inside)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    n = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)  # rounded to x's dtype before the weight, as HF
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, (w * n).to(Y.dtype.element_ty), mask=inside)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(X, W, G, RSTD, DX, DW, M, D, stride_x, stride_g, P, GH, stride_gh,
                         HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Rows pid, pid + P, ... < M: DX[row] (if HAS_DX) and the fp32 partial DW[pid] = sum g * xhat (if HAS_DW).
    HAS_RESIDUAL: GH[row], the gradient that reaches X along the residual stream, is added to DX[row] before its
    one rounding."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_ptrs = X + first * stride_x + cols  # advanced by P rows per step (pointers are 64-bit, rows * D may not be)
    g_ptrs = G + first * stride_g + cols
    dx_ptrs = DX + first * D + cols
    gh_ptrs = GH + first * stride_gh + cols
    rstd_ptr = RSTD + first
    for _ in range(pid, M, P):
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        if HAS_DX:
            gw = g * w
            c = tl.sum(gw * x, axis=0) * (rstd * rstd * rstd / D)
            dx = gw * rstd - x * c
            if HAS_RESIDUAL:
                dx += tl.load(gh_ptrs, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=inside)
        if HAS_DW:
            dw += g * (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        x_ptrs += P * stride_x
        g_ptrs += P * stride_g
        dx_ptrs += P * D
        gh_ptrs += P * stride_gh
        rstd_ptr += P
    if HAS_DW:
        tl.store(DW + first * D + cols, dw, mask=inside)


@triton.jit
def _swiglu_block(N, n_blocks, BLOCK: tl.constexpr):
    """(row, cols, inside) of this program's BLOCK columns of one row: the SwiGLU kernels' grid layout."""
    pid = tl.program_id(0)
    row = (pid // n_blocks).to(tl.int64)
    cols = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < N


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, H, N, n_blocks, stride_gate, stride_up, BLOCK: tl.constexpr):
    """H[row, cols] = silu(GATE) * UP for the program's BLOCK columns of one row; H is [rows, N]."""
    row, cols, inside = _swiglu_block(N, n_blocks, BLOCK)
    a = tl.load(GATE + row * stride_gate + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(UP + row * stride_up + cols, mask=inside, other=0.0).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(H + row * N + cols, h.to(H.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_bwd_kernel(G, GATE, UP, DGATE, DUP, N, n_blocks, stride_g, stride_gate, stride_up, stride_dgate,
                       stride_dup, HAS_DGATE: tl.constexpr, HAS_DUP: tl.constexpr, BLOCK: tl.constexpr):
    """DGATE = G * UP * sig * (1 + GATE * (1 - sig)), DUP = G * silu(GATE); both [rows, N] with their own row
    strides (the two halves of one packed gate|up gradient, for one)."""
    row, cols, inside = _swiglu_block(N, n_blocks, BLOCK)
    g = tl.load(G + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(GATE + row * stride_gate + cols, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    if HAS_DGATE:
        b = tl.load(UP + row * stride_up + cols, mask=inside, other=0.0).to(tl.float32)
        dgate = g * b * sig * (1.0 + a * (1.0 - sig))
        tl.store(DGATE + row * stride_dgate + cols, dgate.to(DGATE.dtype.element_ty), mask=inside)
    if HAS_DUP:
        tl.store(DUP + row * stride_dup + cols, (g * a * sig).to(DUP.dtype.element_ty), mask=inside)


@triton.jit
def _qkv_rope_kernel(PACKED, Q, K, V, COS, SIN, T, H, HKV, stride_pb, stride_pt,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                     BACKWARD: tl.constexpr, D: tl.constexpr, BLOCK_NH: tl.constexpr):
    """One token (b, t) and BLOCK_NH of its packed head slots (H of q, HKV of k, HKV of v): forward, PACKED[b, t]
    -> rotated Q[b, :, t], K[b, :, t] and V[b, :, t]; backward, the inverse rotation of Q and K and the copy of V
    -> PACKED[b, t]. Rows of D elements, unit stride."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_NH + tl.arange(0, BLOCK_NH)[:, None]
    cols = tl.arange(0, D)[None, :]
    swap = (cols + D // 2) % D  # the partner element of the rotate-half pair
    is_q = heads < H
    is_k = (heads >= H) & (heads < H + HKV)
    is_v = (heads >= H + HKV) & (heads < H + 2 * HKV)
    packed = PACKED + b * stride_pb + t * stride_pt + heads * D
    q = Q + b * stride_qb + heads * stride_qh + t * stride_qt
    k = K + b * stride_kb + (heads - H) * stride_kh + t * stride_kt
    v = V + b * stride_vb + (heads - H - HKV) * stride_vh + t * stride_vt
    if BACKWARD:
        x = (tl.load(q + cols, mask=is_q, other=0.0) + tl.load(k + cols, mask=is_k, other=0.0)
             + tl.load(v + cols, mask=is_v, other=0.0)).to(tl.float32)
        xs = (tl.load(q + swap, mask=is_q, other=0.0) + tl.load(k + swap, mask=is_k, other=0.0)).to(tl.float32)
        sign = -1.0
    else:
        inside = heads < H + 2 * HKV
        x = tl.load(packed + cols, mask=inside, other=0.0).to(tl.float32)
        xs = tl.load(packed + swap, mask=is_q | is_k, other=0.0).to(tl.float32)
        sign = 1.0
    # the tables rounded to the data's dtype first, as HF's rope does
    c = tl.load(COS + t * D + cols).to(PACKED.dtype.element_ty).to(tl.float32)
    s = tl.load(SIN + t * D + cols).to(PACKED.dtype.element_ty).to(tl.float32)
    rot = tl.where(cols < D // 2, -xs, xs)  # rotate_half(x) = [-x2, x1]
    y = tl.where(is_v, x, x * c + sign * rot * s).to(PACKED.dtype.element_ty)
    if BACKWARD:
        tl.store(packed + cols, y, mask=heads < H + 2 * HKV)
    else:
        tl.store(q + cols, y, mask=is_q)
        tl.store(k + cols, y, mask=is_k)
        tl.store(v + cols, y, mask=is_v)


@triton.jit
def _ce_rows_kernel(LOGITS, Y, LOSS, V, stride_l, IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """LOSS[row] = logsumexp(LOGITS[row]) - LOGITS[row, Y[row]] (fp32); if WRITE_GRAD, LOGITS[row] becomes
    softmax - onehot(Y[row]) in place. A row whose target is IGNORE gets loss 0 and a zero gradient; any other
    target outside [0, V) a NaN loss (and no read outside the row)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    y = tl.load(Y + row)
    keep = y != IGNORE
    in_vocab = (y >= 0) & (y < V)
    cols = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), -1e30, tl.float32)  # per-lane running max (finite: masked lanes then add exp(-inf) = 0)
    s = tl.zeros((BLOCK,), dtype=tl.float32)  # per-lane running sum of exp(x - m)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - top), axis=0)
    target = tl.load(base + y, mask=in_vocab, other=0.0).to(tl.float32)
    loss = tl.where(in_vocab, top + tl.log(total) - target, float("nan"))
    tl.store(LOSS + row, tl.where(keep, loss, 0.0))
    if WRITE_GRAD:
        inv = tl.where(keep, 1.0 / total, 0.0)  # an ignored row's gradient: zeros
        one = tl.where(keep, 1.0, 0.0)
        for start in range(0, V, BLOCK):
            idx = start + cols
            inside = idx < V
            x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp(x - top) * inv
            p = tl.where(idx == y, p - one, p)
            tl.store(base + idx, p.to(LOGITS.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------- host side
def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not INTERPRET:
            raise ValueError(f"kernels.rowwise (Triton): tensors must be on CUDA (got {t.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU")


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, last dim]`` with a unit-stride last dim: a view when possible, else a contiguous copy."""
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _elementwise_layout(*tensors: Tensor) -> tuple[list[Tensor], int, int, list[int]]:
    """(tensors, rows, N, row strides) for an elementwise kernel: one flat row if all are contiguous."""
    if all(t.is_contiguous() for t in tensors):
        return list(tensors), 1, tensors[0].numel(), [0] * len(tensors)
    rows = [_rows(t) for t in tensors]
    return rows, rows[0].shape[0], rows[0].shape[1], [t.stride(0) for t in rows]


def rms_norm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether ``rms_norm`` takes these inputs (else use ``minilora.ops``' PyTorch function)."""
    return (x.dim() >= 1 and weight.dim() == 1 and x.dtype in DTYPES and weight.dtype == x.dtype
            and weight.device == x.device and 1 <= x.shape[-1] <= MAX_RMS_NORM_D and weight.shape[0] == x.shape[-1])


def swiglu_supported(gate: Tensor, up: Tensor) -> bool:
    """Whether ``swiglu`` takes these inputs (else use ``minilora.ops``' PyTorch function)."""
    return (gate.dim() >= 1 and gate.shape == up.shape and gate.dtype in DTYPES and up.dtype == gate.dtype
            and up.device == gate.device)


def add_rms_norm_supported(x: Tensor, a: Tensor, weight: Tensor) -> bool:
    """Whether ``add_rms_norm`` takes these inputs (else the add and ``rms_norm`` apart)."""
    return (rms_norm_supported(x, weight) and a.shape == x.shape and a.dtype == x.dtype and a.device == x.device)


def rms_norm_forward(x2: Tensor, weight: Tensor, eps: float, a2: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(y [rows, D], rstd [rows] fp32, h) for a 2-D x2 with a unit-stride last dim; h is the row normalised:
    ``x2 + a2`` (a new [rows, D] tensor) when a residual ``a2`` of x2's shape is given, else x2 itself."""
    m, d = x2.shape
    y = torch.empty((m, d), device=x2.device, dtype=x2.dtype)
    rstd = torch.empty(m, device=x2.device, dtype=torch.float32)
    h = x2 if a2 is None else torch.empty((m, d), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y, rstd, h
    block = rms_norm_block(d)
    with _device_ctx(x2):
        _rms_norm_fwd_kernel[(m,)](x2, weight, y, rstd, x2.stride(0), d, float(eps),
                                   x2 if a2 is None else a2, h, 0 if a2 is None else a2.stride(0),
                                   HAS_RESIDUAL=a2 is not None, BLOCK_D=block, num_warps=rms_norm_warps(block))
    return y, rstd, h


def rms_norm_backward(g2: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor, need_dx: bool, need_dw: bool,
                      gh2: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """(dx [rows, D] or None, dw [D] or None) from the output gradient g2 and the saved x2, weight, rstd; ``gh2``
    (with ``need_dx``): a gradient of x2 from elsewhere (the residual stream), added into dx."""
    m, d = x2.shape
    dx = torch.empty((m, d), device=x2.device, dtype=x2.dtype) if need_dx else None
    if m == 0 or not (need_dx or need_dw):
        return dx, (torch.zeros_like(weight) if need_dw else None)
    if not need_dw:
        programs = m
    elif x2.is_cuda and not INTERPRET:
        programs = min(m, DW_PROGRAMS_PER_SM * _sm_count(x2.device.index or 0))
    else:
        programs = min(m, INTERPRET_DW_PROGRAMS)
    partial = torch.empty((programs, d), device=x2.device, dtype=torch.float32) if need_dw else None
    residual = need_dx and gh2 is not None
    block = rms_norm_block(d)
    with _device_ctx(x2):
        _rms_norm_bwd_kernel[(programs,)](
            x2, weight, g2, rstd, x2 if dx is None else dx, rstd if partial is None else partial,
            m, d, x2.stride(0), g2.stride(0), programs, gh2 if residual else g2, gh2.stride(0) if residual else 0,
            HAS_DX=need_dx, HAS_DW=need_dw, HAS_RESIDUAL=residual, BLOCK_D=block, num_warps=rms_norm_warps(block))
    dw = None
    if need_dw:
        dw = (partial[0] if programs == 1 else partial.sum(0)).to(weight.dtype)
    return dx, dw


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` as a new contiguous tensor of gate's shape."""
    (a, b), m, n, (sa, sb) = _elementwise_layout(gate, up)
    h = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if h.numel() == 0:
        return h
    n_blocks = triton.cdiv(n, SWIGLU_BLOCK)
    with _device_ctx(gate):
        _swiglu_fwd_kernel[(m * n_blocks,)](a, b, h, n, n_blocks, sa, sb, BLOCK=SWIGLU_BLOCK, num_warps=SWIGLU_WARPS)
    return h


def swiglu_backward(g: Tensor, gate: Tensor, up: Tensor, need_dgate: bool, need_dup: bool
                    ) -> tuple[Tensor | None, Tensor | None]:
    """(dgate or None, dup or None), new contiguous tensors of gate's shape."""
    dgate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype) if need_dgate else None
    dup = torch.empty(gate.shape, device=gate.device, dtype=up.dtype) if need_dup else None
    _swiglu_backward_into(g, gate, up, dgate, dup)
    return dgate, dup


def _swiglu_backward_into(g: Tensor, gate: Tensor, up: Tensor, dgate: Tensor | None, dup: Tensor | None) -> None:
    """Write the SwiGLU gradients into ``dgate`` and ``dup`` (either None): tensors of gate's shape with unit-stride
    rows, contiguous or the halves of one packed gradient."""
    if gate.numel() == 0 or (dgate is None and dup is None):
        return
    # a missing output's slot gets the other one, which the kernel then does not write
    outs = (dgate if dgate is not None else dup, dup if dup is not None else dgate)
    (gg, a, b, od, ou), m, n, strides = _elementwise_layout(g, gate, up, *outs)
    n_blocks = triton.cdiv(n, SWIGLU_BLOCK)
    with _device_ctx(gate):
        _swiglu_bwd_kernel[(m * n_blocks,)](
            gg, a, b, od, ou, n, n_blocks, *strides,
            HAS_DGATE=dgate is not None, HAS_DUP=dup is not None, BLOCK=SWIGLU_BLOCK, num_warps=SWIGLU_WARPS)


def qkv_rope_supported(qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> bool:
    """Whether ``qkv_rope`` takes these: a packed [B, T, (H + 2 Hkv) D] projection with a unit-stride last dim, D a
    power of two (8..256), and [T, D] tables (else ``minilora.ops``' PyTorch path)."""
    if qkv.dim() != 3 or qkv.dtype not in DTYPES or qkv.stride(-1) != 1 or H < 1 or Hkv < 1:
        return False
    B, T, N = qkv.shape
    D = N // (H + 2 * Hkv)
    return (D * (H + 2 * Hkv) == N and 8 <= D <= 256 and D & (D - 1) == 0 and T > 0 and B > 0
            and cos.shape == sin.shape == (T, D) and cos.device == sin.device == qkv.device)


def qkv_rope_heads(slots: int, d: int) -> int:
    """Packed head slots per RoPE program: about QKV_ROPE_ELEMENTS elements (a power of two, at most all slots)."""
    return min(triton.next_power_of_2(slots), max(1, QKV_ROPE_ELEMENTS // d))


def _qkv_rope_launch(packed: Tensor, parts: tuple[Tensor, Tensor, Tensor], cos: Tensor, sin: Tensor, H: int,
                     Hkv: int, backward: bool) -> None:
    B, T, N = packed.shape
    D = N // (H + 2 * Hkv)
    q, k, v = parts
    block = qkv_rope_heads(H + 2 * Hkv, D)
    with _device_ctx(packed):
        _qkv_rope_kernel[(B * T, triton.cdiv(H + 2 * Hkv, block))](
            packed, q, k, v, cos.float().contiguous(), sin.float().contiguous(), T, H, Hkv,
            packed.stride(0), packed.stride(1), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            BACKWARD=backward, D=D, BLOCK_NH=block, num_warps=QKV_ROPE_WARPS)


class QKVRoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, N = qkv.shape
        D = N // (H + 2 * Hkv)
        # token-major: [B, T, n, D] memory seen as [B, n, T, D] (see ``qkv_rope``)
        parts = tuple(torch.empty(B, T, n, D, dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
                      for n in (H, Hkv, Hkv))
        _qkv_rope_launch(qkv, parts, cos, sin, H, Hkv, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.dims = (H, Hkv)
        return parts

    @staticmethod
    @once_differentiable
    def backward(ctx, gq: Tensor | None, gk: Tensor | None, gv: Tensor | None):
        cos, sin = ctx.saved_tensors
        H, Hkv = ctx.dims
        g = next(t for t in (gq, gk, gv) if t is not None)
        B, _, T, D = g.shape
        parts = tuple(torch.zeros(B, n, T, D, dtype=g.dtype, device=g.device) if x is None
                      else x if x.stride(-1) == 1 else x.contiguous() for x, n in ((gq, H), (gk, Hkv), (gv, Hkv)))
        d = torch.empty(B, T, (H + 2 * Hkv) * D, dtype=g.dtype, device=g.device)
        _qkv_rope_launch(d, parts, cos, sin, H, Hkv, backward=True)
        return d, None, None, None, None


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rope(q) [B, H, T, D], rope(k) [B, Hkv, T, D], v [B, Hkv, T, D]) from a packed q|k|v projection (see
    ``qkv_rope_supported``); differentiable in ``qkv``.

    Each output is token-major, ``[B, T, n, D]`` memory seen as ``[B, n, T, D]``: SDPA's cuDNN backend returns its
    output in q's layout and copies the output's gradient into that layout, so a token-major q gives o_proj its
    ``[B, T, H D]`` input as a view and takes o_proj's input gradient as it is (a head-major q costs a copy each
    way per layer). The flash and memory-efficient backends work token-major anyway."""
    if not qkv_rope_supported(qkv, cos, sin, H, Hkv):
        raise ValueError(f"kernels.rowwise.qkv_rope: unsupported qkv {qkv.dtype} {tuple(qkv.shape)} (strides "
                         f"{qkv.stride()}) with H={H}, Hkv={Hkv}, tables {tuple(cos.shape)}")
    _check_device(qkv)
    return QKVRoPEFunction.apply(qkv, cos, sin, H, Hkv)


def cross_entropy_supported(logits: Tensor, y: Tensor) -> bool:
    """Whether ``cross_entropy_rows_`` takes these: 2-D logits with a unit-stride last dim, targets [rows] alike."""
    return (logits.dim() == 2 and logits.dtype in DTYPES and logits.stride(1) == 1 and y.dim() == 1
            and y.shape[0] == logits.shape[0] and y.device == logits.device and logits.shape[1] > 0)


CE_IGNORE = -100  # a target that takes no part in the loss (PyTorch's and HF's ignore_index)


def cross_entropy_rows_(logits: Tensor, y: Tensor, grad: bool) -> Tensor:
    """Per-row fp32 loss of logits [R, V] against y [R]; with ``grad`` the rows become ``softmax - onehot`` in place
    (the contract of ``kernels.cpu.cross_entropy_rows_`` for y in [0, V)). Rows whose target is ``CE_IGNORE`` get
    loss 0 and a zero gradient; other targets outside [0, V) a NaN loss, which needs no check on the host."""
    if not cross_entropy_supported(logits, y):
        raise ValueError(f"kernels.rowwise.cross_entropy_rows_: unsupported logits {logits.dtype} "
                         f"{tuple(logits.shape)} (strides {logits.stride()}) with targets {tuple(y.shape)}")
    _check_device(logits)
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    if logits.shape[0]:
        with _device_ctx(logits):
            _ce_rows_kernel[(logits.shape[0],)](logits, y.to(torch.int64).contiguous(), loss, logits.shape[1],
                                                logits.stride(0), IGNORE=CE_IGNORE, WRITE_GRAD=grad, BLOCK=CE_BLOCK,
                                                num_warps=CE_WARPS)
    return loss


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = _rows(x)
        y, rstd, _ = rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(_rows(g.to(x2.dtype)), x2, weight, rstd,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dx is None else dx.view(ctx.x_shape)), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    """(h = x + a, rms_norm(h)) in one kernel. The backward adds the gradient that reaches h along the residual
    stream inside the RMSNorm backward kernel (one pass and one rounding, no separate add) and hands the sum to
    both x and a."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        y, rstd, h = rms_norm_forward(_rows(x), weight, eps, _rows(a))
        ctx.save_for_backward(h, weight, rstd)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)  # an unused h (the final norm's) then costs no zero gradient
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, gh: Tensor | None, gy: Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        need_x, need_a, need_w = ctx.needs_input_grad[:3]
        dh, dw = gh, None
        if gy is not None:
            dh, dw = rms_norm_backward(_rows(gy.to(h.dtype)), h, weight, rstd, need_x or need_a, need_w,
                                       None if gh is None else _rows(gh.to(h.dtype)))
            dh = None if dh is None else dh.view(ctx.x_shape)
        return dh if need_x else None, dh if need_a else None, dw, None


class SwiGLUPackedFunction(torch.autograd.Function):
    """``silu(gate) * up`` of a packed ``[..., 2F]`` gate|up projection. The backward writes dgate and dup into the
    two halves of one packed gradient, which the packed projection's backward takes as it is (two separate
    gradients would be joined by a ``cat``: another pass and another [..., 2F] tensor at the peak)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        return swiglu_forward(*gate_up.chunk(2, dim=-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        (gate_up,) = ctx.saved_tensors
        d = torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype)
        _swiglu_backward_into(g.to(gate_up.dtype), *gate_up.chunk(2, dim=-1), *d.chunk(2, dim=-1))
        return d


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(g.to(gate.dtype), gate, up, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim (see ``rms_norm_supported``)."""
    if not rms_norm_supported(x, weight):
        raise ValueError(f"kernels.rowwise.rms_norm: unsupported x {x.dtype} {tuple(x.shape)} {x.device} with "
                         f"weight {weight.dtype} {tuple(weight.shape)} {weight.device}")
    _check_device(x)
    return RMSNormFunction.apply(x, weight.contiguous(), eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (see ``swiglu_supported``)."""
    if not swiglu_supported(gate, up):
        raise ValueError(f"kernels.rowwise.swiglu: unsupported gate {gate.dtype} {tuple(gate.shape)} {gate.device} "
                         f"with up {up.dtype} {tuple(up.shape)} {up.device}")
    _check_device(gate)
    return SwiGLUFunction.apply(gate, up)


def add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(h, rms_norm(h))`` with ``h = x + a`` in one pass (see ``add_rms_norm_supported``)."""
    if not add_rms_norm_supported(x, a, weight):
        raise ValueError(f"kernels.rowwise.add_rms_norm: unsupported x {x.dtype} {tuple(x.shape)} {x.device}, a "
                         f"{a.dtype} {tuple(a.shape)} {a.device}, weight {weight.dtype} {tuple(weight.shape)}")
    _check_device(x, a)
    return AddRMSNormFunction.apply(x, a, weight.contiguous(), eps)


def swiglu_packed_supported(gate_up: Tensor) -> bool:
    """Whether ``swiglu_packed`` takes this: a float tensor whose last dim splits into two equal halves."""
    return gate_up.dim() >= 1 and gate_up.dtype in DTYPES and gate_up.shape[-1] % 2 == 0


def swiglu_packed(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``gate_up = cat(gate, up)`` along the last dim, with one packed gradient."""
    if not swiglu_packed_supported(gate_up):
        raise ValueError(f"kernels.rowwise.swiglu_packed: unsupported gate_up {gate_up.dtype} "
                         f"{tuple(gate_up.shape)} (the last dim must be even)")
    _check_device(gate_up)
    return SwiGLUPackedFunction.apply(gate_up)
