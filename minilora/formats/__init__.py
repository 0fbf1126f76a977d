"""Readers that turn other checkpoint formats into Hugging Face LlamaForCausalLM form.

Each reader returns an HF ``config.json``-style dict plus float32 tensors named like
``LlamaForCausalLM.state_dict()``, with Q/K rows in HF's rotate-half RoPE order.

The ``gguf`` package is imported only when a GGUF file is read, so that ``import minilora`` (and everything that
loads Hugging Face folders or llama2.c files) works where it is not installed, e.g. a GPU image without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike
from typing import Any

import torch

from .llama2c import interleaved_to_rotate_half, read_llama2c


class MissingPackage(ImportError):
    """An optional package that this input needs is not installed (the recipes print it in one line)."""


def import_gguf(purpose: str):
    """The ``gguf`` package, or a MissingPackage error that says what needed it and how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise MissingPackage(f"{purpose} needs the 'gguf' package, which is not installed: "
                             "pip install 'gguf>=0.10'") from e
    return gguf


def read_gguf(path: str | PathLike[str]) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    """``minilora.formats.gguf.read_gguf``: a llama GGUF file as ``(hf_config, tensors, metadata)``."""
    import_gguf(f"reading {path}")
    from .gguf import read_gguf as _read_gguf

    return _read_gguf(path)


__all__ = ["MissingPackage", "import_gguf", "interleaved_to_rotate_half", "read_gguf", "read_llama2c"]
