"""Read llama2.c legacy ``.bin`` checkpoints into Hugging Face LlamaForCausalLM form.

Layout (little-endian): 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len`` (a negative vocab means an untied classifier ``wcls`` is stored at the end), then
float32 arrays, each stacked over layers in PyTorch ``[out, in]`` layout: token embedding,
rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two legacy RoPE tables (skipped), wcls.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
HEADER_BYTES = 4 * len(HEADER_FIELDS)


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K projection rows from interleaved RoPE (Meta, llama2.c, GGUF) to HF rotate-half.

    Within each head, interleaved RoPE rotates row pairs ``(2j, 2j+1)``; rotate-half rotates
    ``(j, j + head_dim/2)``.  Row ``2j + r`` of a head moves to row ``r * head_dim/2 + j``, which is
    the permutation of HF's ``convert_llama_weights_to_hf`` and the inverse of llama.cpp's
    ``convert_hf_to_gguf`` permute.  ``n_heads`` is the KV head count for ``k_proj``.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _take(f: BinaryIO, shape: tuple[int, ...]) -> torch.Tensor:
    """Read the next little-endian float32 array of ``shape`` from ``f`` into its own tensor."""
    data = np.fromfile(f, dtype="<f4", count=math.prod(shape))
    return torch.from_numpy(data.astype(np.float32, copy=False).reshape(shape))


def _read_header(path: Path, raw: bytes) -> dict[str, int]:
    """Parse and sanity-check the 7-int32 header."""
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: file is {len(raw)} bytes, expected at least the {HEADER_BYTES}-byte llama2.c header")
    header = dict(zip(HEADER_FIELDS, (int(v) for v in np.frombuffer(raw, dtype="<i4", count=len(HEADER_FIELDS)))))
    for field, value in header.items():
        if field != "vocab_size" and value <= 0:
            raise ValueError(f"{path}: header field {field}={value}, expected a positive integer")
    if header["vocab_size"] == 0:
        raise ValueError(f"{path}: header field vocab_size=0, expected a non-zero integer")
    dim, n_heads, n_kv_heads = header["dim"], header["n_heads"], header["n_kv_heads"]
    if dim % n_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path}: header dim={dim} must split into n_heads={n_heads} heads of even size")
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: header n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    return header


def read_llama2c(path: str | PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a llama2.c ``.bin`` file into ``(hf_config, state_dict)`` with HF parameter names.

    Every tensor is float32 with its own storage; ``q_proj``/``k_proj`` rows are permuted to the
    rotate-half convention; ``lm_head.weight`` is present only when the file stores a separate
    classifier (negative vocab_size in the header).
    """
    path = Path(path)
    with path.open("rb") as f:
        header = _read_header(path, f.read(HEADER_BYTES))
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header.values()
        tied, vocab = vocab > 0, abs(vocab)
        head_dim = dim // n_heads
        kv_dim = head_dim * n_kv_heads
        per_layer = {  # llama2.c name -> (HF module, shape in one layer), in file order
            "rms_att": ("input_layernorm", (dim,)),
            "wq": ("self_attn.q_proj", (dim, dim)),
            "wk": ("self_attn.k_proj", (kv_dim, dim)),
            "wv": ("self_attn.v_proj", (kv_dim, dim)),
            "wo": ("self_attn.o_proj", (dim, dim)),
            "rms_ffn": ("post_attention_layernorm", (dim,)),
            "w1": ("mlp.gate_proj", (hidden, dim)),
            "w2": ("mlp.down_proj", (dim, hidden)),
            "w3": ("mlp.up_proj", (hidden, dim)),
        }
        rope_tables = 2 * seq_len * (head_dim // 2)
        n_floats = (1 if tied else 2) * vocab * dim + dim + rope_tables
        n_floats += n_layers * sum(math.prod(shape) for _, shape in per_layer.values())
        expected, actual = HEADER_BYTES + 4 * n_floats, path.stat().st_size
        if actual != expected:
            raise ValueError(f"{path}: file is {actual} bytes, but its llama2.c header implies {expected} bytes")

        state = {"model.embed_tokens.weight": _take(f, (vocab, dim))}
        for key, (module, shape) in per_layer.items():
            for i in range(n_layers):
                w = _take(f, shape)
                if key in ("wq", "wk"):
                    w = interleaved_to_rotate_half(w, n_heads if key == "wq" else n_kv_heads)
                state[f"model.layers.{i}.{module}.weight"] = w
        state["model.norm.weight"] = _take(f, (dim,))
        f.seek(4 * rope_tables, 1)
        if not tied:
            state["lm_head.weight"] = _take(f, (vocab, dim))

    config = {
        "vocab_size": vocab,
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": seq_len,
        "tie_word_embeddings": tied,
        "head_dim": head_dim,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return config, state
