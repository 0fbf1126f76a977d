"""Read llama-architecture GGUF files (llama.cpp) into Hugging Face LlamaForCausalLM form.

Tensors are dequantized to float32 and renamed to HF parameter names; llama.cpp's interleaved
RoPE row order of ``attn_q``/``attn_k`` is undone (see :func:`interleaved_to_rotate_half`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from .llama2c import interleaved_to_rotate_half

SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
)

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"
_MISSING = object()


def _f32(value: Any) -> float:
    """The shortest decimal that round-trips a stored float32 (``1e-05``, not ``9.99999974e-06``)."""
    return float(str(np.float32(value)))


def _hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None if it is not a llama weight."""
    stem = gguf_name.removesuffix(".weight")
    if stem != gguf_name and stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.weight"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.weight"
    return None


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> ``[out, in]`` shape implied by ``cfg``."""
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    layer = {
        "input_layernorm": (d,), "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q), "post_attention_layernorm": (d,),
        "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
    }  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{m}.weight": s for m, s in layer.items()})
    return shapes


def _dequantize(t: ReaderTensor) -> np.ndarray:
    """Tensor ``t`` as a writable float32 array in ``[out, in]`` order."""
    w = dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
    return np.require(w, np.float32, ["C", "W"])


def _llama3_rope_scaling(path: Path, factors: np.ndarray, cfg: dict[str, Any], orig_ctx: int) -> dict[str, Any]:
    """Recover HF's llama3 ``rope_scaling`` from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores only the per-frequency factors; they are matched against the Llama 3.x
    constants (low_freq_factor 1, high_freq_factor 4) that its converter defaults to.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig_ctx,
    }
    hd, low, high = cfg["head_dim"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi * cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    smooth = np.clip((orig_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise ValueError(
            f"{path}: tensor {_ROPE_FREQS} does not match llama3 RoPE scaling"
            f" (low_freq_factor 1, high_freq_factor 4, original context {orig_ctx})"
        )
    return scaling


def _config(path: Path, reader: GGUFReader, metadata: dict[str, Any]) -> dict[str, Any]:
    """HF LlamaConfig keys from the ``llama.*`` metadata and the tensor list."""

    def get(key: str, default: Any = _MISSING) -> Any:
        if key in metadata:
            return metadata[key]
        if default is _MISSING:
            raise ValueError(f"{path}: GGUF key {key!r} is missing, required for a llama config")
        return default

    hidden, n_heads = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("llama.vocab_size", len(tokens) if tokens is not None else _MISSING)
    cfg: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("llama.feed_forward_length")),
        "num_hidden_layers": int(get("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("llama.attention.head_count_kv", n_heads)),
        "rms_norm_eps": _f32(get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("llama.context_length")),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "head_dim": int(get("llama.attention.key_length", hidden // n_heads)),
        "rope_scaling": None,
        "bos_token_id": get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", None),
    }
    rope_dims = int(get("llama.rope.dimension_count", cfg["head_dim"]))
    if rope_dims != cfg["head_dim"]:
        raise ValueError(
            f"{path}: llama.rope.dimension_count={rope_dims}, expected head_dim={cfg['head_dim']} (no partial RoPE)"
        )

    scaling_type = get("llama.rope.scaling.type", "none")
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": _f32(get("llama.rope.scaling.factor"))}
    elif scaling_type != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type={scaling_type!r}, expected 'none' or 'linear'")
    if rope_freqs is not None:
        if cfg["rope_scaling"] is not None:
            raise ValueError(f"{path}: tensor {_ROPE_FREQS} and llama.rope.scaling.type={scaling_type!r} conflict")
        orig_ctx = int(get("llama.rope.scaling.original_context_length", 8192))
        cfg["rope_scaling"] = _llama3_rope_scaling(path, _dequantize(rope_freqs), cfg, orig_ctx)
    return cfg


def _check_tensors(path: Path, reader: GGUFReader, cfg: dict[str, Any]) -> None:
    """Fail before dequantizing anything if a tensor is unknown, missing, misshaped or of an unsupported type."""
    expected = _expected_shapes(cfg)
    seen = set()
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue
        name = _hf_name(t.name)
        if name not in expected:
            n_layers = cfg["num_hidden_layers"]
            raise ValueError(f"{path}: tensor {t.name!r} is not a weight of a {n_layers}-layer llama model")
        if t.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise ValueError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, expected one of {supported}")
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != expected[name]:
            want = list(expected[name])
            raise ValueError(f"{path}: tensor {t.name!r} has shape {list(shape)}, expected {want} for {name}")
        seen.add(name)
    if missing := sorted(expected.keys() - seen):
        raise ValueError(f"{path}: {len(missing)} llama tensors are missing, e.g. {missing[0]}")


def _tensors(reader: GGUFReader, cfg: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` one at a time, Q/K rows in rotate-half order."""
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        w = torch.from_numpy(_dequantize(t))
        if name.endswith("q_proj.weight"):
            w = interleaved_to_rotate_half(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = interleaved_to_rotate_half(w, cfg["num_key_value_heads"])
        yield name, w


def read_gguf(
    path: str | PathLike[str],
) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Read a ``llama`` GGUF file into ``(hf_config, tensors, metadata)``.

    ``tensors`` is a one-shot generator of ``(hf_name, tensor)``: each float32 ``[out, in]`` tensor
    is dequantized only when reached and owns its memory, so loading holds the float32 model plus
    one tensor's dequantization buffers (and the memory-mapped file), never a second full copy.
    Names, shapes and types are all checked up front, before this returns.
    ``lm_head.weight`` is yielded only for untied models.  ``metadata`` holds every GGUF
    key/value as read (``general.name``, ``general.architecture``, ``general.file_type``, the
    ``llama.*`` hyper-parameters and the ``tokenizer.ggml.*`` vocabulary).
    """
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r}, expected 'llama'")
    cfg = _config(path, reader, metadata)
    _check_tensors(path, reader, cfg)
    return cfg, _tensors(reader, cfg), metadata
