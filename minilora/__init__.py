"""minilora: parameter-efficient clinical adaptation of LLaMA-family models (arXiv 2307.03042)."""

from minilora.loading import from_pretrained
from minilora.model import LlamaConfig, Transformer

__all__ = ["LlamaConfig", "Transformer", "from_pretrained"]
