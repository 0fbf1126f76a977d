"""Reading the small files that runs and adapters are made of, with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object: invalid JSON, other text encodings and other JSON values are ValueErrors."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}), expected JSON") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, expected an object")
    return value


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a corrupt or truncated one is a ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
