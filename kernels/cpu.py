"""Fused bf16 CPU kernels (``kernels/cpu.c``), built on first use with the system C compiler, called via ctypes.

They replace the chains of PyTorch elementwise ops around the GEMMs of a bf16 training step on CPU (RMSNorm,
SwiGLU, RoPE, the causal softmax of the GEMM attention, the LM-head cross-entropy), each of which is one pass
over memory with fp32 math and one rounding, where PyTorch makes several passes with a rounding after each; and,
on CPUs with AMX, the whole causal attention forward and backward (``attention_fwd``, ``attention_bwd``) and the
rank-side products of a LoRA linear (``lora_fwd``, ``lora_bwd``). RMSNorm, SwiGLU, RoPE and the causal softmax
also have fp32 twins (``FP32_KERNELS``), for fp32 training on CPUs without native bf16. ``minilora.ops``,
``minilora.losses`` and ``kernels.reference`` call them for bf16 (and those four for fp32) CPU tensors and keep
their PyTorch path for everything else (fp64, CUDA, LoRA dropout, or no compiler). ``fp32_linear`` (no C) runs
the fp32 frozen-weight GEMMs by oneDNN or by PyTorch's BLAS (``fp32_linear_backend``).

``MINILORA_CPU_KERNELS``: ``auto`` (default: use them when they build, else warn once and use PyTorch), ``on``
(fail when they cannot be built), ``off`` (PyTorch only). The shared library is cached in
``$MINILORA_CACHE_DIR`` (default ``~/.cache/minilora``), keyed by the source, the compiler and the CPU's flags,
so it is rebuilt after any change and never reused on a different CPU. ``$CC`` picks the compiler (default cc).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu.c")
MODES = ("auto", "on", "off")
_FLAG_SETS = (  # tried in order; the first that compiles wins
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"],
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"],
    # no OpenMP runtime (e.g. Apple clang): single-threaded, still vectorised where the compiler takes omp simd
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rms_norm_fwd": [_P, _P, _P, _P, _P, _P, _I64, _I64, _F, _I],
    "rms_norm_bwd": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I],
    "swiglu_fwd": [_P, _P, _P, _I64, _I64, _I64, _I],
    "swiglu_bwd": [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I],
    "rope": [_P, _P, _P, _P] + [_I64] * 10 + [_F, _I],
    "causal_softmax_fwd": [_P, _I64, _I64, _I64, _F, _I],
    "causal_softmax_bwd": [_P, _P, _I64, _I64, _I64, _F, _I],
    "cross_entropy_rows": [_P, _P, _P, _I64, _I64, _I, _I],
    "attn_amx_fwd": [_P] * 8 + [_I64] * 5 + [_F, _I],
    "attn_amx_bwd": [_P] * 11 + [_I64] * 5 + [_F, _I],
    "lora_amx_fwd": [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I],
    "lora_amx_bwd": [_P, _I64, _P, _I64, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I],
    "simd_avx512bf16": [],
    "amx_available": [],
}
# kernels with an fp32 twin ``NAME_f32`` (same arguments; float for bf16 pointers), for fp32 training
FP32_KERNELS = ("rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rope", "causal_softmax_fwd",
                "causal_softmax_bwd")
_SIGNATURES.update({f"{name}_f32": _SIGNATURES[name] for name in FP32_KERNELS})
# softmax / cross-entropy: nonzero when a row buffer's malloc failed; attention: 1 without AMX, 2 when a buffer's
# malloc failed; simd_avx512bf16 / amx_available: 1 for the intrinsics build / when the AMX attention can run
_RETURNS = {"causal_softmax_fwd": _I, "causal_softmax_fwd_f32": _I, "cross_entropy_rows": _I, "attn_amx_fwd": _I,
            "attn_amx_bwd": _I, "lora_amx_fwd": _I, "lora_amx_bwd": _I, "simd_avx512bf16": _I, "amx_available": _I}

_lock = threading.Lock()
_state: dict = {}  # "lib" (CDLL or None), "error" (str), "path"


def mode() -> str:
    m = os.environ.get("MINILORA_CPU_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"MINILORA_CPU_KERNELS={m!r}: expected one of {MODES}")
    return m


def cache_dir() -> Path:
    env = os.environ.get("MINILORA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minilora"


def _cpuinfo_line(*prefixes: str) -> str | None:
    """The first line of /proc/cpuinfo that starts with one of ``prefixes``, or None (no such line or file)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(prefixes)),
                    None)
    except OSError:
        return None


def _cpu_fingerprint() -> str:
    return _cpuinfo_line("flags", "Features") or platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or None


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found on PATH)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    src = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(),
                                         _cpu_fingerprint().encode()])).hexdigest()[:16]
        out = cache_dir() / f"minilora_cpu_{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp], capture_output=True,
                               text=True)
            if r.returncode == 0:
                os.replace(tmp, out)  # atomic: concurrent builders (torchrun ranks) each rename a whole file
                return out
            errors.append(f"{' '.join(flags)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiling kernels/cpu.c failed: " + "; ".join(errors))


def library():
    """The loaded kernel library, or None (PyTorch path) when MINILORA_CPU_KERNELS=off or the build failed."""
    m = mode()
    if m == "off":
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    path = _build()
                    lib = ctypes.CDLL(str(path))
                    for name, argtypes in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = argtypes, _RETURNS.get(name)
                    _state.update(lib=lib, path=path, error=None)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state.update(lib=None, path=None, error=str(e))
                    if m == "auto":
                        warnings.warn(f"minilora: fused CPU kernels unavailable ({e}); using the slower PyTorch "
                                      "path (MINILORA_CPU_KERNELS=off silences this)", RuntimeWarning, stacklevel=3)
    if _state["lib"] is None and m == "on":
        raise RuntimeError(f"MINILORA_CPU_KERNELS=on, but the CPU kernels are unavailable: {_state['error']}")
    return _state["lib"]


def enabled(*tensors: Tensor, fp32: bool = False) -> bool:
    """True when the kernels should run on these tensors: all bf16 on the CPU (or, with ``fp32`` for the kernels
    of FP32_KERNELS, all fp32 there), and the library is available."""
    dtypes = (torch.bfloat16, torch.float32) if fp32 else (torch.bfloat16,)
    if tensors[0].dtype not in dtypes or not all(t.device.type == "cpu" and t.dtype == tensors[0].dtype
                                                 for t in tensors):
        return False
    return library() is not None


def _kernel(name: str, t: Tensor):
    """The library's ``name`` for t's dtype: the bf16 kernel, or its fp32 twin (FP32_KERNELS)."""
    return getattr(library(), name if t.dtype == torch.bfloat16 else f"{name}_f32")


def _nt() -> int:
    return torch.get_num_threads()


def _c(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------- wrappers (bf16 CPU tensors, fp32 too for
# FP32_KERNELS; see cpu.c)
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(h, rms_norm(h), rstd [rows] fp32) with h = x + residual (x itself when residual is None), all bf16 (or all
    fp32) [..., D], weight [D]."""
    x, weight = _c(x), _c(weight)
    residual = None if residual is None else _c(residual)
    h = x if residual is None else torch.empty_like(x)
    out = torch.empty_like(x)
    D = x.shape[-1]
    rstd = torch.empty(x.numel() // D, dtype=torch.float32)
    _kernel("rms_norm_fwd", x)(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                               None if residual is None else h.data_ptr(), out.data_ptr(), rstd.data_ptr(),
                               rstd.numel(), D, eps, _nt())
    return h, out, rstd


def rms_norm_bwd(g: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, residual: Tensor | None = None) -> Tensor:
    """dL/dx of rms_norm(x) for its output's gradient g, plus ``residual`` (a gradient reaching x directly)."""
    g, x = _c(g.to(x.dtype)), _c(x)
    residual = None if residual is None else _c(residual.to(x.dtype))
    dx = torch.empty_like(x)
    _kernel("rms_norm_bwd", x)(g.data_ptr(), x.data_ptr(), _c(weight).data_ptr(), rstd.data_ptr(),
                               None if residual is None else residual.data_ptr(), dx.data_ptr(), rstd.numel(),
                               x.shape[-1], _nt())
    return dx


def _row_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    """a, b [..., F] as [rows, F] views with a unit last stride and one common row stride (copies if not)."""
    F = a.shape[-1]
    a2, b2 = a.reshape(-1, F), b.reshape(-1, F)
    if not (a2.stride(-1) == 1 and b2.stride(-1) == 1 and a2.stride(0) == b2.stride(0)):
        a2, b2 = a2.contiguous(), b2.contiguous()
    return a2, b2, a2.stride(0) if a2.shape[0] > 1 else F


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, contiguous, for gate and up [..., F]: separate tensors or the halves of one packed tensor."""
    g2, u2, ld = _row_pair(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype)
    _kernel("swiglu_fwd", gate)(g2.data_ptr(), u2.data_ptr(), out.data_ptr(), g2.shape[0], g2.shape[1], ld, _nt())
    return out


def swiglu_bwd(g: Tensor, gate: Tensor, up: Tensor, packed: bool = False) -> tuple[Tensor, Tensor] | Tensor:
    """(dgate, dup) as new contiguous tensors; with ``packed`` one [..., 2F] tensor holding dgate then dup."""
    g2 = _c(g.to(gate.dtype)).reshape(-1, g.shape[-1])
    a2, u2, ld_in = _row_pair(gate, up)
    rows, F = a2.shape
    if packed:
        d = torch.empty(*gate.shape[:-1], 2 * F, dtype=gate.dtype)
        dg, du, ld_out = d[..., :F], d[..., F:], 2 * F
    else:
        dg, du, ld_out = torch.empty(gate.shape, dtype=gate.dtype), torch.empty(up.shape, dtype=up.dtype), F
    _kernel("swiglu_bwd", gate)(g2.data_ptr(), a2.data_ptr(), u2.data_ptr(), dg.data_ptr(), du.data_ptr(), rows,
                                F, ld_in, ld_out, _nt())
    return d if packed else (dg, du)


def rope_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """``out = x * c + sign * rotate_half(x) * s`` for x, out viewed as [B, T, H, D] (any strides, last dim 1).

    ``cos``/``sin`` [T, D] in fp32 (for bf16 x rounded to bf16 inside, as the PyTorch path does).
    """
    B, T, H, D = x.shape
    assert x.stride(-1) == 1 and out.stride(-1) == 1 and out.shape == x.shape
    cos, sin = _c(cos.float()), _c(sin.float())
    _kernel("rope", x)(x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, T, H, D,
                       x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), sign, _nt())
    return out


def causal_softmax_(s: Tensor, scale: float, first: int = 0) -> Tensor:
    """In place: ``softmax(scale * s)`` over keys 0..t for each row of s [..., n (L - first), L]: n stacked runs of
    the queries t = first..L-1 against keys 0..L-1 (first = 0: all L queries), zeros after t."""
    assert s.is_contiguous() and 0 <= first < s.shape[-1] and s.shape[-2] % (s.shape[-1] - first) == 0
    L = s.shape[-1]
    if _kernel("causal_softmax_fwd", s)(s.data_ptr(), s.numel() // L, L, first, scale, _nt()):
        raise MemoryError(f"kernels/cpu.c causal_softmax_fwd: no memory for a {L}-float row buffer")
    return s


def causal_softmax_backward_(dp: Tensor, p: Tensor, scale: float, first: int = 0) -> Tensor:
    """In place on dp: the gradient of the unscaled scores, ``scale * p * (dp - rowsum(p * dp))`` (rows as
    ``causal_softmax_``'s)."""
    assert dp.is_contiguous() and p.is_contiguous() and dp.shape == p.shape
    assert 0 <= first < p.shape[-1] and p.shape[-2] % (p.shape[-1] - first) == 0
    L = p.shape[-1]
    assert p.dtype == dp.dtype
    _kernel("causal_softmax_bwd", p)(p.data_ptr(), dp.data_ptr(), p.numel() // L, L, first, scale, _nt())
    return dp


def cross_entropy_rows_(logits: Tensor, y: Tensor, grad: bool) -> Tensor:
    """Per-row fp32 loss of logits [R, V] against y [R]; with ``grad`` the rows become ``softmax - onehot``."""
    assert logits.is_contiguous() and logits.dim() == 2
    y = _c(y.to(torch.int64))
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    if library().cross_entropy_rows(logits.data_ptr(), y.data_ptr(), loss.data_ptr(), logits.shape[0],
                                    logits.shape[1], int(grad), _nt()):
        raise MemoryError(f"kernels/cpu.c cross_entropy_rows: no memory for a {logits.shape[1]}-float row buffer")
    return loss


def _amx() -> bool:
    if "amx" not in _state:
        _state["amx"] = bool(library().amx_available())
    return _state["amx"]


def amx_lora_supported(x: Tensor, a: Tensor, b: Tensor) -> bool:
    """True when ``lora_fwd``/``lora_bwd`` take these operands: bf16 CPU tensors x [M, K] (unit stride over K),
    the stacked adapters a [R, K] and b [N, R], K and N multiples of 32, and the library built with AMX and the OS
    granting it."""
    if not (x.dim() == 2 and a.dim() == 2 and b.dim() == 2 and x.shape[1] == a.shape[1] and b.shape[1] == a.shape[0]
            and x.shape[1] % 32 == 0 and b.shape[0] % 32 == 0 and x.shape[0] > 0 and x.stride(1) == 1):
        return False
    return enabled(x, a, b) and _amx()


def lora_fwd(x: Tensor, a: Tensor, b: Tensor, y: Tensor) -> Tensor:
    """The rank-side forward of a LoRA linear on AMX: returns s = bf16(x a^T) [M, R] and adds s b^T to y [M, N]
    (the frozen product x W^T, unit stride over N) in place, with one rounding."""
    (M, K), (N, R) = x.shape, b.shape
    a, b = _c(a), _c(b)
    assert y.shape == (M, N) and y.stride(1) == 1 and y.dtype == x.dtype
    s = torch.empty(M, R, dtype=x.dtype)
    rc = library().lora_amx_fwd(x.data_ptr(), x.stride(0), a.data_ptr(), b.data_ptr(), s.data_ptr(), y.data_ptr(),
                                y.stride(0), M, K, N, R, _nt())
    _check(rc, "lora_amx_fwd", f"K={K}, N={N}, R={R}")
    return s


def lora_bwd(g: Tensor, x: Tensor | None, s: Tensor | None, a: Tensor, b: Tensor, dx: Tensor | None,
             ) -> tuple[Tensor | None, Tensor | None]:
    """The rank-side backward of ``lora_fwd`` for g = dL/dy [M, N]: adds t a to dx [M, K] in place (t = bf16(g b),
    when dx is given) and returns (da = t^T x [R, K] when x is given, dB^T = s^T g [R, N] when s is given), fp32."""
    (M, N), (R, K) = g.shape, a.shape
    g = g if g.stride(-1) == 1 else g.contiguous()
    a, b = _c(a), _c(b)
    s = None if s is None else _c(s)
    assert dx is None or (dx.shape == (M, K) and dx.stride(1) == 1)
    assert x is None or (x.shape == (M, K) and x.stride(1) == 1)
    da = torch.empty(R, K, dtype=torch.float32) if x is not None else None
    dbt = torch.empty(R, N, dtype=torch.float32) if s is not None else None
    rc = library().lora_amx_bwd(g.data_ptr(), g.stride(0), _ptr(x), 0 if x is None else x.stride(0), _ptr(s),
                                a.data_ptr(), b.data_ptr(), _ptr(dx), 0 if dx is None else dx.stride(0), _ptr(da),
                                _ptr(dbt), M, K, N, R, _nt())
    _check(rc, "lora_amx_bwd", f"K={K}, N={N}, R={R}")
    return da, dbt


def amx_attention_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when ``attention_fwd``/``attention_bwd`` take these causal-attention inputs: bf16 CPU tensors
    [B, H, T, D] and [B, Hkv, T, D] with unit stride over D, the library built with AMX and the OS granting it,
    ``T % 32 == 0``, ``D % 64 == 0`` and whole K/V head groups."""
    B, H, T, D = q.shape
    if not (k.shape == v.shape and k.dim() == 4 and k.shape[0] == B and k.shape[2:] == (T, D) and
            H % k.shape[1] == 0 and T % 32 == 0 and D % 64 == 0 and T > 0 and
            all(t.stride(-1) == 1 for t in (q, k, v))):
        return False
    return enabled(q, k, v) and _amx()


def _check(rc: int, name: str, what: str) -> None:
    if rc == 1:
        raise RuntimeError(f"kernels/cpu.c {name}: AMX unavailable")
    if rc:
        raise MemoryError(f"kernels/cpu.c {name}: no memory for the per-thread buffers ({what})")


def _layout(*ts: Tensor) -> Tensor:
    """The (batch, head, position) strides of [B, heads, T, D] tensors, as the int64 array the kernels read."""
    return torch.tensor([[t.stride(0), t.stride(1), t.stride(2)] for t in ts], dtype=torch.int64)


def _rope_tables(cos: Tensor | None, sin: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if cos is None else (_c(cos.float()), _c(sin.float()))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, cos: Tensor | None = None,
                  sin: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal GQA attention on AMX tiles: (o [B, H, T, D], a view of a contiguous [B, T, H, D] tensor, so that
    ``o.transpose(1, 2).reshape(B, T, H * D)`` needs no copy; lse [B, H, T] fp32, the log-sum-exp of each row's
    scaled scores). q [B, H, T, D], k and v [B, Hkv, T, D], any strides with a unit last one. With ``cos``/``sin``
    ([T, D] RoPE tables) q and k are rotated on the way in, as ``rope_into`` would."""
    B, H, T, D = q.shape
    if not scale > 0:
        raise ValueError(f"attention_fwd: scale must be > 0 (the kernel takes row maxima of the raw scores), got {scale}")
    o = torch.empty(B, T, H, D, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, T, dtype=torch.float32)
    cos, sin = _rope_tables(cos, sin)
    lay = _layout(q, k, v, o)
    rc = library().attn_amx_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                                lay.data_ptr(), _ptr(cos), _ptr(sin), B, H, k.shape[1], T, D, scale, _nt())
    _check(rc, "attn_amx_fwd", f"T={T}, D={D}")
    return o, lse


def attention_bwd(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, g: Tensor, scale: float,
                  cos: Tensor | None = None, sin: Tensor | None = None,
                  out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``attention_fwd`` for the output gradient g [B, H, T, D] (any strides, unit last one); the
    probabilities are recomputed from q, k and lse (the output itself is not needed). With ``cos``/``sin`` the
    gradients are those of the unrotated q and k. ``out``: tensors to write them into (views of one packed
    gradient, say), else new ones."""
    B, H, T, D = q.shape
    if g.stride(-1) != 1:
        g = g.contiguous()
    if out is None:
        out = tuple(torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
    dq, dk, dv = out
    cos, sin = _rope_tables(cos, sin)
    lay = _layout(q, k, v, g, dq, dk, dv)
    rc = library().attn_amx_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), lse.data_ptr(), dq.data_ptr(),
                                dk.data_ptr(), dv.data_ptr(), lay.data_ptr(), _ptr(cos), _ptr(sin), B, H, k.shape[1],
                                T, D, scale, _nt())
    _check(rc, "attn_amx_bwd", f"T={T}, D={D}")
    return dq, dk, dv


# ---------------------------------------------------------------- fp32 frozen-weight GEMMs: oneDNN or BLAS
# On a 2-core AVX2 AMD EPYC, PyTorch's fp32 ``x @ W^T`` (MKL) ran SmolLM2's shapes at 90-132 GFLOP/s and oneDNN's
# matmul (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU fusions use) at 124-152; the LM head's
# 341 x 576 -> 49,152 chunks 76-81 against 119-129. The choice is fixed per machine, never timed at run time: the
# two round differently, and a resumed run must compute what the uninterrupted one did, bit for bit.
FP32_LINEAR_MODES = ("auto", "onednn", "blas")


def fp32_linear_mode() -> str:
    m = os.environ.get("MINILORA_FP32_LINEAR", "auto")
    if m not in FP32_LINEAR_MODES:
        raise ValueError(f"MINILORA_FP32_LINEAR={m!r}: expected one of {FP32_LINEAR_MODES}")
    return m


def _onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _onednn_available() -> bool:
    if "onednn_linear" not in _state:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if ok:
            try:  # no torch.randn: drawing from the global generator would shift a training run's random stream
                x, w = torch.arange(24.0).view(3, 8) / 24, torch.arange(40.0).view(5, 8).cos()
                ok = torch.allclose(_onednn_linear(x, w), x @ w.t(), atol=1e-5)
            except RuntimeError:
                ok = False
        _state["onednn_linear"] = ok
    return _state["onednn_linear"]


def _amd_cpu() -> bool:
    if "amd" not in _state:
        _state["amd"] = "AuthenticAMD" in (_cpuinfo_line("vendor_id") or "")
    return _state["amd"]


def fp32_linear_backend() -> str:
    """Which library ``fp32_linear`` uses on this machine: ``"onednn"`` or ``"blas"``. ``MINILORA_FP32_LINEAR``:
    ``auto`` (default: oneDNN on AMD CPUs, where MKL's fp32 GEMMs were measured slower, PyTorch's BLAS elsewhere),
    ``onednn`` or ``blas``; ``blas`` wherever this torch lacks the oneDNN op."""
    mode = fp32_linear_mode()
    if mode == "blas" or not _onednn_available():
        return "blas"
    return "onednn" if mode == "onednn" or _amd_cpu() else "blas"


def fp32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight^T`` for fp32 CPU tensors x [..., K] and a contiguous weight [N, K], by the library of
    ``fp32_linear_backend``; anything else (other dtypes or devices, a strided weight) is ``x @ weight.t()``. No
    autograd: the callers are autograd Functions, or run without gradients."""
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and weight.is_contiguous() and x.shape[-1] > 0 and fp32_linear_backend() == "onednn"):
        return _onednn_linear(x, weight)
    return x @ weight.t()
