"""Fused stacked-LoRA linear: ``lora_linear`` dispatches to Triton on CUDA and to PyTorch on CPU.

``MINILORA_KERNELS=triton`` forces the Triton kernels (on CPU tensors only together with ``TRITON_INTERPRET=1``,
set before triton is imported), ``MINILORA_KERNELS=torch`` forces the PyTorch path, ``auto`` (default) picks by
device. Without triton (e.g. macOS) only the PyTorch path exists. The dtype policy is in ``kernels/reference.py``.

The Triton implementation (the submodule ``kernels.lora_linear``, also ``kernels.triton_impl``) is imported on first
use: importing triton costs about 80 MB of resident memory, which a run on the CPU never needs.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Sequence

from torch import Tensor

from kernels import reference

BACKENDS = ("auto", "triton", "torch")
_UNLOADED = object()
_triton_impl: types.ModuleType | None | object = _UNLOADED


def _triton() -> types.ModuleType | None:
    """The Triton implementation, imported on the first call; None when triton cannot be imported."""
    global _triton_impl
    if _triton_impl is _UNLOADED:
        try:
            _triton_impl = importlib.import_module("kernels.lora_linear")
        except ImportError:
            _triton_impl = None
    return _triton_impl


class _Package(types.ModuleType):
    """The package's module type. Importing a submodule sets the package's attribute of that name, so the first
    import of ``kernels.lora_linear`` (here or anywhere) would replace the dispatch function ``lora_linear`` with the
    module; this keeps the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "lora_linear" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> object:
    if name == "triton_impl":
        return _triton()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_for(x: Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation ``lora_linear`` uses for ``x`` under MINILORA_KERNELS."""
    mode = os.environ.get("MINILORA_KERNELS", "auto")
    if mode not in BACKENDS:
        raise ValueError(f"MINILORA_KERNELS={mode!r}: expected one of {BACKENDS}")
    if mode == "triton" and _triton() is None:
        raise RuntimeError("MINILORA_KERNELS=triton, but triton cannot be imported")
    if mode == "auto":
        return "triton" if x.is_cuda and _triton() is not None else "torch"
    return mode


def lora_linear(x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                scaling: Sequence[float], dropout_p: float = 0.0, training: bool = False,
                b_rows: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """``x @ W^T + sum_i s_i (dropout(x) @ A_i^T) @ B_i^T`` for x [..., K], W [N, K] frozen, A_i [r_i, K], B_i [N, r_i].

    ``b_rows``: per adapter, (offset, count) when its B covers only output rows [offset, offset + count) (B_i is
    then [count, r_i], zero elsewhere): the adapters of one module inside a packed projection.
    Differentiable in x and in each adapter tensor that requires grad (others get no grad and cost nothing);
    dropout on the LoRA input applies only when ``training``. Output dtype: autocast's if enabled, else x's.
    """
    impl = _triton() if backend_for(x) == "triton" else reference
    return impl.lora_linear(x, weight, lora_a, lora_b, scaling, dropout_p, training, b_rows)


__all__ = ["lora_linear", "backend_for", "reference", "triton_impl"]
