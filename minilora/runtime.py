"""Process-wide runtime settings that the recipes apply before they start work.

``tune_malloc``: a training step frees and re-allocates the same large tensors (activations, gradients, logits
chunks) every step. glibc serves blocks above its mmap threshold (128 KiB, rising to at most 32 MiB as blocks are freed) with fresh
``mmap`` calls and hands the top of its heap back to the kernel once more than 128 KiB is free, so each step pays
for hundreds of thousands of page faults, each zeroing a 4 KiB page: on a 2-core CPU that is about 15% of a bf16
SmolLM2 training step (tools/bench_train.py). Raising both thresholds keeps freed memory in the heap for the next
step; the process's peak RSS does not change (its resident set stays at the peak it reached instead of falling).

``MINILORA_MALLOC``: ``tuned`` (default) or ``default`` (leave glibc as it is). A no-op on a C library without
``mallopt`` (macOS, musl is accepted but ignores it).

``resolve_precision``: the recipes' ``--precision auto`` (their default) is bf16 autocast where bf16 matmuls run
natively and fp32 elsewhere. Without native support oneDNN emulates bf16, which is slower than fp32, not faster:
on a 2-core AVX-512 Xeon without AVX512-BF16, a 2048^3 GEMM runs at 35 GFLOP/s in bf16 against 167 in fp32.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MALLOC_MODES = ("tuned", "default")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
# Blocks above the mmap threshold still come from mmap. 1 GiB is tried first (glibc 2.36 takes it); a glibc that
# caps the threshold at HEAP_MAX_SIZE / 2 gets 32 MiB, which keeps all but the LM head's logits chunks in the heap.
MMAP_THRESHOLDS = (2**30, 32 * 2**20)
TRIM_THRESHOLD = 2**30

_state: dict[str, str] = {}


def tune_malloc() -> str:
    """Keep freed memory in glibc's heap (see the module docstring); returns what was done, for reports:
    ``"tuned"``, ``"default"`` (MINILORA_MALLOC=default) or ``"unavailable: <why>"``. Idempotent."""
    mode = os.environ.get("MINILORA_MALLOC", "tuned")
    if mode not in MALLOC_MODES:
        raise ValueError(f"MINILORA_MALLOC={mode!r}: expected one of {MALLOC_MODES}")
    if mode == "default":
        _state["malloc"] = "default"
        return "default"
    if _state.get("malloc") == "tuned":
        return "tuned"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differs or does nothing
    except (OSError, AttributeError, TypeError) as e:
        _state["malloc"] = f"unavailable: no glibc mallopt ({e})"
        return _state["malloc"]
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = any(mallopt(_M_MMAP_THRESHOLD, t) == 1 for t in MMAP_THRESHOLDS) and \
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state["malloc"] = "tuned" if ok else "unavailable: mallopt refused the thresholds"
    return _state["malloc"]


def malloc_state() -> str:
    """What ``tune_malloc`` did in this process (``"untouched"`` if it was not called)."""
    return _state.get("malloc", "untouched")


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA GPU with bf16 (Ampere or later), or an x86 CPU with
    AVX512-BF16 or AMX. Other CPUs (most laptops, ARM builds of torch) count as not."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the keyword
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_precision(precision: str, device) -> str:
    """``bf16`` or ``fp32``: ``auto`` becomes bf16 where ``native_bf16(device)``, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"
