"""Readers that turn other checkpoint formats into Hugging Face LlamaForCausalLM form.

Each reader returns an HF ``config.json``-style dict plus float32 tensors named like
``LlamaForCausalLM.state_dict()``, with Q/K rows in HF's rotate-half RoPE order.
"""

from .gguf import read_gguf
from .llama2c import interleaved_to_rotate_half, read_llama2c

__all__ = ["interleaved_to_rotate_half", "read_gguf", "read_llama2c"]
