"""Fused stacked-LoRA linear in Triton (CUDA; CPU only under ``TRITON_INTERPRET=1``).

One kernel computes ``OUT = X W + D(S L)`` (LoRAFusion design): the ordinary K-loop over X and W fills an fp32
accumulator and the rank-sized product ``S L`` (rank padded to a power of two >= 16 with masked loads) is added to
it before the store, so no [M, N] LoRA temporary ever reaches memory. With dropout the masked ``S L`` goes first
(one accumulator for both terms); without, it goes last, because on Hopper a dot ahead of the K-loop makes ptxas
serialize the loop's wgmma instructions (warning C7515; tests/test_kernels_compile.py checks). It serves

    forward  Y  = X W^T + S B^T               (S = dropout(X) A^T [M, R], L = B^T)
    dX          = G W   + dropout'(T A)       (T = G B [M, R], L = A; the mask is regenerated from the seed)

The shrink ``S = X A^T``, ``T = G B`` and the weight gradients are rank-sized and go to cuBLAS: each is one
memory-bound pass over X (or G) with ~2% of the base GEMM's flops, so a second Triton kernel would buy little and
add a second thing to tune.
Which GEMM runs (``MINILORA_LORA_MATMUL=auto|fused|cublas``, read per call): a linear with no active adapter is
a plain GEMM and goes to cuBLAS. A dropout-free LoRA product runs the fused kernel or cuBLAS's ``X W`` followed by
an in-place ``addmm_(S, L)`` (one extra read and write of the [M, N] output, no temporary): ``auto`` (default) times
both once per shape key on the device and keeps the faster, preferring the fused kernel within ``PREFER_FUSED``
(as ``torch.backends.cudnn.benchmark`` does for convolutions; ``choices()`` lists what it picked). With dropout,
and always under the interpreter, the fused kernel runs.
All timing here (the choice and the autotuner's) uses CUDA events without triton.testing.do_bench's 256 MB
L2-flush buffer, which would otherwise land in the first training step's peak memory.
Dropout keeps a Philox seed, never a mask or a copy of X: the element (m, k) is kept iff
``tl.rand(seed, m * K + k) >= p``; dropout(X) is materialised transiently (shrink, dA) by ``_dropout_kernel``.

Inputs may have any strides (passed to the kernels); fp32/fp16/bf16 with fp32 accumulation; fp32 dots use TF32
exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's matmuls do. The autotuner is keyed on
(M bucket, N, K, layout, variant: LoRA, dropout, rank block); ``MINILORA_TRITON_AUTOTUNE=0`` skips tuning (one
config) to keep test compiles short.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference import TorchOps, apply_lora_linear, draw_seed

Cfg = tuple[int, int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("MINILORA_TRITON_AUTOTUNE", "1") != "0"

# Autotune space. Large tiles with 8 warps feed Hopper's wgmma; the 4-warp and 32-deep-K tiles suit Ampere and
# small M. Configs whose shared memory would not fit the device are pruned before tuning (``prune_configs``);
# tests/test_kernels_compile.py compiles every config for sm_80 and sm_90.
TUNED_CONFIGS = [
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (128, 256, 32, 8, 8, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
]
DEFAULT_CONFIG = (128, 128, 64, 8, 8, 4)  # the only one with MINILORA_TRITON_AUTOTUNE=0 (fast GPU tests), if it fits
INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1)  # small blocks so that awkward test shapes cross block edges
MAX_BLOCK_R = 64  # rank chunk per dot; ranks above it loop
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # opt-in bytes per block by compute capability
DROPOUT_BLOCK = (32, 128)
MATMUL_MODES = ("auto", "fused", "cublas")
PREFER_FUSED = 0.02  # auto keeps the fused kernel unless cuBLAS + addmm_ is more than 2% faster
BENCH_WARMUP, BENCH_REPS = 2, 10  # calls per candidate when timing (each call of a 7B-shape GEMM is ~0.1-1 ms)


def _config(c: Cfg) -> triton.Config:
    """A Cfg tuple as a triton.Config."""
    bm, bn, bk, gm, warps, stages = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=warps, num_stages=stages)


def active_configs() -> list[Cfg]:
    """The configs the autotuner starts from in this process (a single one when interpreting)."""
    return [INTERPRET_CONFIG] if INTERPRET else TUNED_CONFIGS


def smem_estimate(c: Cfg, itemsize: int, block_r: int, ieee_fp32: bool = False) -> int:
    """Shared-memory bytes a config needs, as Triton 3.6 and 3.9 allocate them on sm_80 and sm_90 (checked against
    compiled kernels by tests/test_kernels_compile.py). Tensor-core dots (16-bit, tf32): the pipelined X/W stages, or
    the rank tiles if larger. fp32 with IEEE dots: stages - 1 buffers, and the rank loop is pipelined too, so a rank
    block wider than BLOCK_K sets the buffer size (128x256x32 at rank block 64 needs 288 KiB, over an H200's 227)."""
    bm, bn, bk, _, _, stages = c
    if ieee_fp32:
        return max(stages - 1, 1) * (bm + bn) * max(bk, block_r) * itemsize
    return max(stages * (bm + bn) * bk, (bm + bn) * block_r) * itemsize


def prune_configs(configs: list[Cfg], itemsize: int, block_r: int, smem_limit: int,
                  ieee_fp32: bool = False) -> list[Cfg]:
    """The configs that fit ``smem_limit`` (at least the smallest one, so tuning never runs out of candidates)."""
    fits = [c for c in configs if smem_estimate(c, itemsize, block_r, ieee_fp32) <= smem_limit]
    return fits or [min(configs, key=lambda c: smem_estimate(c, itemsize, block_r, ieee_fp32))]


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    """Opt-in shared memory per block of a CUDA device, in bytes."""
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SMEM_PER_BLOCK.get(props.major * 10 + props.minor, 101376)


def _prune_for_device(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuner hook: drop configs too big for X's device (and keep one when autotuning is off)."""
    by_tuple = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["GROUP_M"],
                 c.num_warps, c.num_stages): c for c in configs}
    x = named_args["X"]
    kept = prune_configs(list(by_tuple), x.element_size(), kwargs["BLOCK_R"], _smem_limit(x.device.index or 0),
                         ieee_fp32=x.element_size() == 4 and kwargs["PRECISION"] == "ieee")
    if not AUTOTUNE:  # one config, no benchmarking: the default where it fits this device
        kept = [DEFAULT_CONFIG] if DEFAULT_CONFIG in kept else kept[:1]
    return [by_tuple[c] for c in kept]


def event_bench(call: Callable[[], object], quantiles: Sequence[float] = (0.5, 0.2, 0.8),
                warmup: int = BENCH_WARMUP, reps: int = BENCH_REPS) -> list[float]:
    """Milliseconds of ``call`` on the current CUDA stream at ``quantiles`` (CUDA events around each of ``reps``
    calls after ``warmup`` untimed ones). The autotuner's ``do_bench``: unlike triton.testing.do_bench it
    allocates no L2-flush buffer, so tuning inside a training step adds nothing to the step's peak memory."""
    for _ in range(warmup):
        call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``; UPCAST computes in fp32 (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _lora_dot(S, L, rows, offs_n, in_m, in_n, R, stride_sm, stride_sr, stride_lr, stride_ln, acc,
              BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + S[rows, :R] @ L[:R, offs_n]``, BLOCK_R ranks at a time."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        s = tl.load(S + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=in_m[:, None] & (offs_r[None, :] < R), other=0.0)
        lo = tl.load(L + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                     mask=(offs_r[:, None] < R) & in_n[None, :], other=0.0)
        acc = _dot(s, lo, acc, UPCAST, PRECISION)
    return acc


# Keyed on the variant too: HAS_LORA, DROPOUT and BLOCK_R change the registers and shared memory a config needs.
# seed is not specialised (a fresh value each step would otherwise recompile when it happens to be 1 or % 16 == 0).
@triton.autotune(configs=[_config(c) for c in active_configs()],
                 key=["M_BUCKET", "N", "K", "stride_wk", "HAS_LORA", "DROPOUT", "BLOCK_R"],
                 prune_configs_by={"early_config_prune": _prune_for_device}, do_bench=event_bench)
@triton.jit(do_not_specialize=["seed"])
def _fused_lora_matmul_kernel(
    X, W, S, L, OUT, seed, p, scale,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr, stride_lr, stride_ln, stride_om, stride_on,
    HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[M, N] = X[M, K] @ W[K, N] + D(S[M, R] @ L[R, N]); M_BUCKET only keys the autotuner."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # grouped launch order: GROUP_M row blocks share W tiles in L2
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)  # M * K may pass 2**31 elements
    in_m = offs_m < M
    in_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA and DROPOUT:  # the masked LoRA term first, so that one accumulator holds both terms
        acc = _lora_dot(S, L, rows, offs_n, in_m, in_n, R, stride_sm, stride_sr, stride_lr, stride_ln, acc,
                        BLOCK_R, UPCAST, PRECISION)
        keep = tl.rand(seed, rows[:, None] * N + offs_n[None, :]) >= p
        acc = tl.where(keep, acc * scale, 0.0)

    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=in_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & in_n[None, :], other=0.0)
        acc = _dot(x, w, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_LORA and not DROPOUT:  # after the K-loop: a dot before it makes ptxas serialize the loop's wgmma (sm_90)
        acc = _lora_dot(S, L, rows, offs_n, in_m, in_n, R, stride_sm, stride_sr, stride_lr, stride_ln, acc,
                        BLOCK_R, UPCAST, PRECISION)

    out_ptrs = OUT + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(X, OUT, seed, p, scale, M, K, stride_xm, stride_xk,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[M, K] (contiguous) = X * keep / (1 - p), keep = rand(seed, m * K + k) >= p, as in the fused kernel."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=inside, other=0.0)
    keep = tl.rand(seed, rows[:, None] * K + offs_k[None, :]) >= p
    out = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(OUT + rows[:, None] * K + offs_k[None, :], out.to(OUT.dtype.element_ty), mask=inside)


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not INTERPRET:
            raise ValueError(f"kernels.lora_linear (Triton): tensors must be on CUDA (got {t.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU")


def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only when torch's matmuls use it too; 16-bit dots ignore the setting."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def rank_block(r: int) -> int:
    """BLOCK_R for a stacked rank r: a power of two >= 16, at most MAX_BLOCK_R (wider ranks loop)."""
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(r)))


def _m_bucket(m: int) -> int:
    """Autotune key for M: a power of two in [16, 16384], so varying batch lengths reuse tuned configs."""
    return min(max(triton.next_power_of_2(m), 16), 16384)


def fused_matmul(x: Tensor, w: Tensor, s: Tensor | None, l: Tensor | None,
                 seed: int | None = None, p: float = 0.0, config: Cfg | None = None) -> Tensor:
    """``x @ w + D(s @ l)`` for 2-D x [M, K], w [K, N], s [M, R], l [R, N] (any strides), D the seed's dropout.
    ``config`` runs that (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) instead of the autotuner's pick (for
    ``tools/bench_kernels.py --sweep``)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"fused_matmul: need x [M, K] and w [K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    (m, k), n = x.shape, w.shape[1]
    has_lora = s is not None
    if has_lora and (l is None or s.dim() != 2 or l.dim() != 2 or s.shape[0] != m or l.shape != (s.shape[1], n)):
        raise ValueError(f"fused_matmul: need s [{m}, R] and l [R, {n}], got "
                         f"{None if s is None else tuple(s.shape)} and {None if l is None else tuple(l.shape)}")
    if seed is not None and not has_lora:
        raise ValueError("fused_matmul: dropout applies to the LoRA term, but s and l are None")
    for name, t in (("w", w), ("s", s), ("l", l)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"fused_matmul: {name} has dtype {t.dtype}, expected x's {x.dtype}")
    _check_device(x, w)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    r = s.shape[1] if has_lora else 0
    s, l = (s, l) if has_lora else (x, w)  # never read when HAS_LORA is False
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    kernel, forced = _fused_lora_matmul_kernel, {}
    if config is not None:  # the jitted function under the autotuner, with the config's meta-parameters
        kernel, forced = _fused_lora_matmul_kernel.fn, _config(config).all_kwargs()
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](
            x, w, s, l, out, seed or 0, p, 1.0 / (1.0 - p),
            m, n, k, r, _m_bucket(m),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
            l.stride(0), l.stride(1), out.stride(0), out.stride(1),
            HAS_LORA=has_lora, DROPOUT=seed is not None, BLOCK_R=rank_block(r),
            UPCAST=INTERPRET and x.dtype == torch.bfloat16, PRECISION=_dot_precision(x.dtype), **forced,
        )
    return out


def dropout(x: Tensor, seed: int, p: float) -> Tensor:
    """``dropout(x)`` for a 2-D x (any strides) with the seed's mask, as a new contiguous tensor."""
    if x.dim() != 2:
        raise ValueError(f"dropout: need a 2-D x, got shape {tuple(x.shape)}")
    _check_device(x)
    m, k = x.shape
    out = torch.empty((m, k), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    bm, bk = DROPOUT_BLOCK
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dropout_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
            x, out, seed, p, 1.0 / (1.0 - p), m, k, x.stride(0), x.stride(1), BLOCK_M=bm, BLOCK_K=bk)
    return out


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str) -> Tensor:
    """The bool keep-mask that ``seed`` stands for (for tests and debugging; the kernels never store it)."""
    return dropout(torch.ones(shape, device=device, dtype=torch.float32), seed, p) != 0


def matmul_mode() -> str:
    """``MINILORA_LORA_MATMUL`` (default ``auto``), validated."""
    mode = os.environ.get("MINILORA_LORA_MATMUL", "auto")
    if mode not in MATMUL_MODES:
        raise ValueError(f"MINILORA_LORA_MATMUL={mode!r}: expected one of {MATMUL_MODES}")
    return mode


_CHOICES: dict[tuple, dict] = {}  # shape key -> {"choice": "fused" | "cublas", "ms": {candidate: median ms}}


def _choice_key(x: Tensor, w: Tensor, s: Tensor) -> tuple:
    """What the faster candidate can depend on: device, dtype, M bucket, N, K, R and both operands' layouts."""
    return (str(x.device), str(x.dtype).removeprefix("torch."), _m_bucket(x.shape[0]), w.shape[1], x.shape[1],
            s.shape[1], "row" if x.stride(1) == 1 else "col", "row" if w.stride(1) == 1 else "col")


def choose(key: tuple, candidates: dict[str, Callable[[], object]],
           bench: Callable[[Callable[[], object]], Sequence[float]] = event_bench) -> str:
    """The cached choice for ``key``, timing ``candidates`` ("fused", "cublas") with ``bench`` the first time."""
    if key not in _CHOICES:
        ms = {name: float(bench(call)[0]) for name, call in candidates.items()}
        fused = ms["fused"] <= ms["cublas"] * (1.0 + PREFER_FUSED)
        _CHOICES[key] = {"choice": "fused" if fused else "cublas", "ms": ms}
    return _CHOICES[key]["choice"]


def choices() -> list[dict]:
    """What ``auto`` picked in this process, one row per shape key (for benchmark reports)."""
    names = ("device", "dtype", "m_bucket", "n", "k", "r", "x_layout", "w_layout")
    return [{**dict(zip(names, key)), "choice": c["choice"], **{f"{n}_ms": round(v, 4) for n, v in c["ms"].items()}}
            for key, c in _CHOICES.items()]


def _cublas_matmul(x: Tensor, w: Tensor, s: Tensor | None, l: Tensor | None) -> Tensor:
    """``x @ w (+ s @ l)`` with cuBLAS: the GEMM, then the rank-sized product added in place."""
    return TorchOps().fused_matmul(x, w, s, l)


class TritonOps:
    """The Triton backend for ``LoRALinearFunction``: seed-based dropout and the fused matmul kernel (or cuBLAS
    where that is faster, see the module doc)."""

    def new_dropout(self, x: Tensor, p: float) -> int:
        return draw_seed()

    def dropped(self, x: Tensor, state: int, p: float) -> Tensor:
        return dropout(x, state, p)

    def fused_matmul(self, x: Tensor, w: Tensor, s: Tensor | None, l: Tensor | None,
                     state: int | None = None, p: float = 0.0) -> Tensor:
        mode = matmul_mode()
        if s is None or (state is None and mode == "cublas"):
            return _cublas_matmul(x, w, s, l)
        if state is None and mode == "auto" and x.is_cuda and not INTERPRET:
            pick = choose(_choice_key(x, w, s), {"fused": lambda: fused_matmul(x, w, s, l),
                                                  "cublas": lambda: _cublas_matmul(x, w, s, l)})
            if pick == "cublas":
                return _cublas_matmul(x, w, s, l)
        return fused_matmul(x, w, s, l, state, p)


def lora_linear(x: Tensor, weight: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], scaling: list[float],
                dropout_p: float = 0.0, training: bool = False,
                b_rows: list[tuple[int, int]] | None = None) -> Tensor:
    """``x @ W^T + sum_i s_i (dropout(x) @ A_i^T) @ B_i^T`` with the fused Triton kernels (see the module doc)."""
    _check_device(x)
    return apply_lora_linear(TritonOps(), x, weight, lora_a, lora_b, scaling, dropout_p, training, b_rows)
