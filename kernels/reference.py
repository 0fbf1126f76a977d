"""Stacked-LoRA linear in plain PyTorch: the shared autograd Function, the CPU production path, and test oracles.

All adapters form one rank-R problem (A = cat A_i [R, K], B = cat s_i B_i [N, R], S = dropout(X) A^T [M, R]):

    forward   Y  = X W^T + S B^T
    backward  T  = G B;  dX = G W + dropout'(T A);  dB_i = s_i G^T S_i;  dA_i = T_i^T dropout(X)

``LoRALinearFunction`` holds that structure once; a backend (``TorchOps`` here, ``TritonOps`` in
``kernels/lora_linear.py``) supplies the dropout state and the fused ``X W + D(S L)`` matmul. Only rank-sized
tensors ([M, R], [N, R], [R, K]) and the dropout state are saved; no [M, N] temporary besides Y and dX exists.

Dtype policy (both backends): everything is computed in the *compute dtype*, which is the autocast dtype when
autocast is enabled for x's device and x's dtype otherwise; weight and adapters are cast to it (a frozen bf16
weight costs no copy under bf16 autocast), products accumulate in fp32 inside the matmuls, and the output has the
compute dtype. The adapters are cast inside the autograd Function and their gradients returned in their own
dtype, so fp32 master adapters get fp32 ``.grad``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol, Union

import torch
from torch import Tensor

from kernels import cpu as cpu_kernels

DropoutState = Union[Tensor, int]  # a bool keep-mask (this backend) or a Philox seed (Triton)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LoRAOps(Protocol):
    """What a backend supplies to ``LoRALinearFunction``; everything else is plain torch matmuls."""

    def new_dropout(self, x: Tensor, p: float) -> DropoutState:
        """Draw a dropout state for the [M, K] input ``x`` at rate ``p``."""

    def dropped(self, x: Tensor, state: DropoutState, p: float) -> Tensor:
        """Materialise ``dropout(x)`` (keep / (1 - p), else 0) for the given state."""

    def fused_matmul(self, x: Tensor, w: Tensor, s: Tensor | None, l: Tensor | None,
                     state: DropoutState | None = None, p: float = 0.0) -> Tensor:
        """``x @ w + D(s @ l)`` with D the dropout of ``state`` on the output's [M, N] positions (identity if None)."""


_RANK_STRIDE = 0x9E3779B1  # not a multiple of the prime 2**31 - 1: every rank gets its own offset


def draw_seed() -> int:
    """A dropout seed: one draw from torch's global CPU generator, offset by this process's distributed rank.

    ``torch.manual_seed`` reproduces it and no device syncs. Every rank draws the same number, so all ranks' RNG
    states stay equal (a resume restores one saved state on all of them), yet each rank drops its own inputs.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (seed + rank * _RANK_STRIDE) % (2**31 - 1)


def dropout_mask(shape: Sequence[int], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A bool keep-mask (keep iff U >= p) with U from a generator seeded by ``draw_seed()``."""
    gen = torch.Generator(device=device).manual_seed(draw_seed())
    return torch.rand(tuple(shape), device=device, generator=gen) >= p


class TorchOps:
    """The PyTorch backend: addmm-based (oneDNN/MKL on CPU, cuBLAS on CUDA, i.e. unsloth-style on a GPU)."""

    def new_dropout(self, x: Tensor, p: float) -> Tensor:
        return dropout_mask(x.shape, p, x.device)

    def dropped(self, x: Tensor, state: Tensor, p: float) -> Tensor:
        return x * state * (1.0 / (1.0 - p))

    def fused_matmul(self, x: Tensor, w: Tensor, s: Tensor | None, l: Tensor | None,
                     state: Tensor | None = None, p: float = 0.0) -> Tensor:
        if state is None:  # fp32 on the CPU: oneDNN or MKL (kernels.cpu.fp32_linear)
            y = cpu_kernels.fp32_linear(x, w.t()) if x.device.type == "cpu" else x @ w
            return y if s is None else y.addmm_(s, l)
        out = s @ l  # dX's masked LoRA term first, then the base product added in place: no [M, N] temporary
        return out.mul_(state).mul_(1.0 / (1.0 - p)).addmm_(x, w)


class LoRALinearFunction(torch.autograd.Function):
    """``Y = X W^T + S B^T`` over 2-D compute-dtype x and W with the rank-sized backward; W never gets a grad.

    The adapters come in their own dtype (fp32 masters, say) and are cast, stacked and scaled here, outside
    autograd, and their gradients go back in their own dtype: no cast, ``cat`` or pad nodes per layer and step.
    ``rows``: per adapter, the (offset, count) of the output rows its B covers (B is [count, r]), or None when every
    B covers all N rows (a packed q/k/v projection gives each module's adapters their own rows).
    """

    @staticmethod
    def forward(ctx, ops: LoRAOps, scaling: tuple[float, ...], dropout_p: float,
                rows: tuple[tuple[int, int], ...] | None, x: Tensor, weight: Tensor, *adapters: Tensor) -> Tensor:
        n = len(scaling)
        lora_a, lora_b = adapters[:n], adapters[n:]
        grads = ctx.needs_input_grad[6:]
        ctx.ops, ctx.scaling, ctx.dropout_p, ctx.rows = ops, scaling, dropout_p, rows
        ctx.ranks = [a.shape[0] for a in lora_a]
        ctx.dtypes = [t.dtype for t in adapters]
        ctx.a_grad, ctx.b_grad = grads[:n], grads[n:]
        if n == 0:
            ctx.state = None
            ctx.save_for_backward(weight)
            return ops.fused_matmul(x, weight.t(), None, None)
        a = _stacked_a(lora_a, x.dtype)  # [R, K]
        b = _stacked_b(lora_b, scaling, rows, weight.shape[0], x.dtype)  # [N, R]
        ctx.state = ops.new_dropout(x, dropout_p) if dropout_p > 0 else None
        # CPUs with AMX: the rank-side products in one pass over each block of rows (kernels/cpu.c), not 2 GEMMs
        ctx.amx = type(ops) is TorchOps and ctx.state is None and cpu_kernels.amx_lora_supported(x, a, b)
        if ctx.amx:
            y = x @ weight.t()
            s = cpu_kernels.lora_fwd(x, a, b, y)
        else:
            xd = x if ctx.state is None else ops.dropped(x, ctx.state, dropout_p)
            s = xd @ a.t()  # [M, R]
            del xd
            y = ops.fused_matmul(x, weight.t(), s, b.t())
        ctx.save_for_backward(weight, a, b, x if any(ctx.a_grad) else None, s if any(ctx.b_grad) else None)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        ops, scaling, p, state = ctx.ops, ctx.scaling, ctx.dropout_p, ctx.state
        need_x = ctx.needs_input_grad[4]
        if not scaling:
            (weight,) = ctx.saved_tensors
            return None, None, None, None, (g @ weight if need_x else None), None
        weight, a, b, x, s = ctx.saved_tensors
        if ctx.amx:
            return (None, None, None, None, *_amx_backward(ctx, g, weight if need_x else None, a, b, x, s))
        t = g @ b if need_x or any(ctx.a_grad) else None  # [M, R]
        dx = ops.fused_matmul(g, weight, t, a, state, p) if need_x else None
        spans = _spans(ctx.ranks)
        da = _per_adapter(ctx.a_grad, spans, lambda cols: _columns(t, cols).t() @ (
            x if state is None else ops.dropped(x, state, p)), dim=0)
        db = _per_adapter(ctx.b_grad, spans, lambda cols: g.t() @ _columns(s, cols), dim=1)
        return (None, None, None, None, dx, None, *_adapter_grads(ctx, da, db))


def _stacked_a(lora_a: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``cat(A_i)`` [R, K] in ``dtype``: one copy that casts as it goes (a lone A already in ``dtype``: itself)."""
    if len(lora_a) == 1 and lora_a[0].dtype == dtype:
        return lora_a[0]
    out = torch.empty(sum(ai.shape[0] for ai in lora_a), lora_a[0].shape[1], dtype=dtype, device=lora_a[0].device)
    return torch.cat(lora_a, out=out)


def _stacked_b(lora_b: Sequence[Tensor], scaling: Sequence[float], rows: Sequence[tuple[int, int]] | None,
               n_out: int, dtype: torch.dtype) -> Tensor:
    """``cat(s_i B_i)`` [N, R] in ``dtype``, each B_i placed at its ``rows`` (zeros elsewhere) when given: one
    scale-cast-and-place op per adapter (the product taken in B_i's dtype, rounded once into ``dtype``)."""
    r = sum(bi.shape[1] for bi in lora_b)
    b = lora_b[0].new_empty(n_out, r, dtype=dtype) if rows is None else lora_b[0].new_zeros(n_out, r, dtype=dtype)
    spans, places = _spans([bi.shape[1] for bi in lora_b]), rows or [(0, n_out)] * len(lora_b)
    for (lo, hi), (off, count), bi, si in zip(spans, places, lora_b, scaling):
        torch.mul(bi, si, out=b[off:off + count, lo:hi])
    return b


def _adapter_grads(ctx, da: Sequence[Tensor | None], db: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The adapters' gradients in their own dtypes: dA_i as they are, dB_i ([N, r_i], not yet scaled) scaled by
    s_i and cut to the rows its B covers, each in one op that casts as it writes."""
    n = len(da)
    out_b = []
    for i, (d, si, dt) in enumerate(zip(db, ctx.scaling, ctx.dtypes[n:])):
        if d is not None:
            off, count = ctx.rows[i] if ctx.rows is not None else (0, d.shape[0])
            d = torch.mul(d[off:off + count], si, out=d.new_empty(count, d.shape[1], dtype=dt))
        out_b.append(d)
    return [None if d is None else d.to(dt) for d, dt in zip(da, ctx.dtypes[:n])] + out_b


def _amx_backward(ctx, g: Tensor, weight: Tensor | None, a: Tensor, b: Tensor, x: Tensor | None,
                  s: Tensor | None) -> list[Tensor | None]:
    """(dx, None, *dA_i, *dB_i) of ``LoRALinearFunction`` through ``kernels.cpu.lora_bwd``: the frozen product
    G W by oneDNN, the rank-side products (fp32 sums, rounded once, into the adapters' dtypes) by the AMX kernel."""
    dx = g @ weight if weight is not None else None
    da, dbt = cpu_kernels.lora_bwd(g, x, s, a, b, dx)
    spans = _spans(ctx.ranks)
    das = [da[lo:hi] if want else None for (lo, hi), want in zip(spans, ctx.a_grad)]
    dbs = [dbt[lo:hi].t() if want else None for (lo, hi), want in zip(spans, ctx.b_grad)]
    return [dx, None, *_adapter_grads(ctx, das, dbs)]


def _spans(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Column ranges [start, end) of each adapter inside the concatenated rank dimension."""
    ends = list(itertools.accumulate(ranks))
    return [(e - r, e) for r, e in zip(ranks, ends)]


def _columns(t: Tensor, cols: list[tuple[int, int]]) -> Tensor:
    """The columns of ``t`` in the given spans, without a copy when they are all of them."""
    if len(cols) == 1:
        return t[:, cols[0][0]:cols[0][1]]
    return torch.cat([t[:, lo:hi] for lo, hi in cols], dim=1)


def _per_adapter(needed: Sequence[bool], spans: list[tuple[int, int]],
                 product: Callable[[list[tuple[int, int]]], Tensor], dim: int) -> list[Tensor | None]:
    """One matmul over the trainable adapters' columns, split back per adapter (None where frozen)."""
    cols = [span for span, want in zip(spans, needed) if want]
    if not cols:
        return [None] * len(needed)
    parts = iter(product(_merge(cols)).split([hi - lo for lo, hi in cols], dim=dim))
    return [next(parts) if want else None for want in needed]


def _merge(cols: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent spans merged, so that all-trainable adapters read the saved tensor as one slice."""
    merged = [cols[0]]
    for lo, hi in cols[1:]:
        if lo == merged[-1][1]:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is enabled for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def check_inputs(x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                 scaling: Sequence[float], dropout_p: float, b_rows: Sequence[tuple[int, int]] | None = None) -> None:
    """Raise a ValueError naming the argument whose shape, dtype, device or flag does not fit."""
    where = "kernels.lora_linear"
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be [N, K], got shape {tuple(weight.shape)}")
    n_out, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{where}: x must be [..., {k}] to match weight [N={n_out}, K={k}], got {tuple(x.shape)}")
    if weight.requires_grad:
        raise ValueError(f"{where}: weight must be frozen (requires_grad=False); only adapters are trained")
    if not (len(lora_a) == len(lora_b) == len(scaling)):
        raise ValueError(f"{where}: need one lora_a, lora_b and scaling per adapter, "
                         f"got {len(lora_a)}, {len(lora_b)}, {len(scaling)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{where}: dropout_p must be in [0, 1), got {dropout_p}")
    for name, t in [("x", x), ("weight", weight), *[(f"lora_a[{i}]", a) for i, a in enumerate(lora_a)],
                    *[(f"lora_b[{i}]", b) for i, b in enumerate(lora_b)]]:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{where}: {name} has dtype {t.dtype}, expected one of {SUPPORTED_DTYPES}")
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}")
    if b_rows is not None and len(b_rows) != len(lora_b):
        raise ValueError(f"{where}: need one (offset, rows) per adapter in b_rows, got {len(b_rows)}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dim() != 2 or a.shape[1] != k or a.shape[0] == 0:
            raise ValueError(f"{where}: lora_a[{i}] must be [r, {k}] with r > 0, got {tuple(a.shape)}")
        off, count = (0, n_out) if b_rows is None else b_rows[i]
        if not 0 <= off <= off + count <= n_out:
            raise ValueError(f"{where}: b_rows[{i}] = {b_rows[i]} is not a row range of [0, {n_out})")
        if b.dim() != 2 or tuple(b.shape) != (count, a.shape[0]):
            raise ValueError(f"{where}: lora_b[{i}] must be [{count}, {a.shape[0]}], got {tuple(b.shape)}")


def apply_lora_linear(ops: LoRAOps, x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                      scaling: Sequence[float], dropout_p: float = 0.0, training: bool = False,
                      b_rows: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """Validate, cast x and W to the compute dtype, flatten leading dims and run ``LoRALinearFunction`` with
    ``ops`` (which casts the adapters itself)."""
    check_inputs(x, weight, lora_a, lora_b, scaling, dropout_p, b_rows)
    dtype = compute_dtype(x)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.to(dtype).reshape(-1, k)
    p = float(dropout_p) if training else 0.0
    rows = None if b_rows is None else tuple((int(o), int(c)) for o, c in b_rows)
    y = LoRALinearFunction.apply(ops, tuple(float(s) for s in scaling), p, rows, x2, weight.to(dtype),
                                 *lora_a, *lora_b)
    return y.reshape(*lead, weight.shape[0])


def lora_linear(x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                scaling: Sequence[float], dropout_p: float = 0.0, training: bool = False,
                b_rows: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """``x @ W^T + sum_i s_i (dropout(x) @ A_i^T) @ B_i^T`` with PyTorch matmuls (the CPU production path)."""
    return apply_lora_linear(TorchOps(), x, weight, lora_a, lora_b, scaling, dropout_p, training, b_rows)


def naive_lora_linear(x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                      scaling: Sequence[float], keep: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """The literal formula under plain autograd (test oracle); ``keep`` is a bool mask of x's shape, or None."""
    xd = x if keep is None else x * keep / (1.0 - dropout_p)
    y = x @ weight.t()
    for a, b, s in zip(lora_a, lora_b, scaling):
        y = y + s * ((xd @ a.t()) @ b.t())
    return y
