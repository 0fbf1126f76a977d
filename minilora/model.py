"""A self-contained LLaMA-family decoder: RMSNorm, RoPE (HF rotate-half), GQA attention, SwiGLU.

Module and parameter names follow Hugging Face's LlamaForCausalLM (``model.layers.0.self_attn.q_proj``...)
so that checkpoints load by name and LoRA adapter files interoperate with PEFT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora import graphs, ops
from minilora.lora import linear_group, pack_linears

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LLAMA_ARCHS = {"LlamaForCausalLM", "LlamaModel", "LLaMAForCausalLM"}


@dataclass
class LlamaConfig:
    """Hyper-parameters of a LLaMA-family model, with Hugging Face ``config.json`` names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face config dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if (archs and not set(archs) & _LLAMA_ARCHS) or (model_type not in (None, "llama")):
            got = ",".join(archs) if archs else model_type
            raise ValueError(f"{source}: unsupported architecture {got!r}; expected LlamaForCausalLM (model_type 'llama')")
        missing = [k for k in _REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {', '.join(missing)}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias are not supported (LLaMA has bias-free linears)")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # the MLP is SwiGLU: SiLU(gate) * up
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (LLaMA's MLP uses 'silu')")
        d = dict(d)
        d.setdefault("rms_norm_eps", 1e-6)  # transformers' LlamaConfig default
        rope = d.pop("rope_parameters", None) or {}
        scaling = d.get("rope_scaling") or None
        if rope:
            d.setdefault("rope_theta", rope.get("rope_theta"))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] not in ("llama3", "linear"):
                raise ValueError(f"{source}: rope_scaling type {scaling['rope_type']!r} is not supported (llama3, linear)")
        d["rope_scaling"] = scaling
        if d.get("rope_theta") is None:
            d.pop("rope_theta", None)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            d["eos_token_id"] = eos[0] if eos else None
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        _check_values(kwargs, source)
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` form (4.x key names, which 5.x also reads)."""
        d = asdict(self)
        d.pop("extra")
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu")
        return d


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")
_ROPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",)}


def _check_values(kwargs: dict[str, Any], source: str) -> None:
    """Types and ranges of a config's values, named by key (they would otherwise fail at the first forward)."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key in _POSITIVE_INTS:
        v = kwargs.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{source}: {key} must be a positive integer, got {v!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        v = kwargs.get(key)
        if v is not None and (not number(v) or v <= 0):
            raise ValueError(f"{source}: {key} must be a positive number, got {v!r}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = kwargs.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"{source}: {key} must be an integer or null, got {v!r}")
    scaling = kwargs.get("rope_scaling")
    if scaling:
        kind = scaling["rope_type"]
        for key in _ROPE_KEYS[kind]:
            if not number(scaling.get(key)) or scaling[key] <= 0:
                raise ValueError(f"{source}: rope_scaling ({kind}) needs a positive number {key!r}, "
                                 f"got {scaling.get(key)!r}")
        if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ValueError(f"{source}: rope_scaling (llama3) needs high_freq_factor > low_freq_factor, got "
                             f"{scaling['high_freq_factor']!r} and {scaling['low_freq_factor']!r}")


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 and cast back (as LLaMA / HF)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + a, norm(x + a))``, the residual add fused in (``ops.add_rms_norm``); ``a`` None: ``(x, norm(x))``."""
        return ops.add_rms_norm(x, a, self.weight, self.eps)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] in fp32, with LLaMA-3 frequency-dependent scaling if configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc and sc["rope_type"] == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif sc and sc["rope_type"] == "linear":
        inv_freq = inv_freq / sc["factor"]
    return inv_freq.float()


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads and RoPE (``minilora.ops.attention``: GEMMs or SDPA)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = linear_group(x, (self.q_proj, self.k_proj, self.v_proj))  # one GEMM when the weights are packed
        if qkv is None:
            q = ops.rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)  # [B, H, T, D]
            k = ops.rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin)  # [B, Hkv, T, D]
            v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            out = ops.attention(q, k, v, mask, bias)
        else:
            out = ops.qkv_attention(qkv, cos, sin, self.n_heads, self.n_kv, mask, bias)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear_group(x, (self.gate_proj, self.up_proj))  # one GEMM when the weights are packed
        if gate_up is None:
            return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(ops.swiglu_packed(gate_up))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block; ``checkpoint=True`` recomputes its activations in backward.

    It takes and returns the residual stream as a pair ``(x, pending)`` whose sum is the stream: the MLP output is
    not added here but by the next block's (or the final) norm, which fuses that add with its own pass.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)
        self.checkpoint = False

    def _forward(self, x: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, n = self.input_layernorm.add_forward(x, pending)
        h, n = self.post_attention_layernorm.add_forward(h, self.self_attn(n, cos, sin, mask, bias))
        return h, self.mlp(n)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                bias: torch.Tensor | None = None, pending: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, m)`` with ``h + m`` the block's output, for the input stream ``x + pending``."""
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, pending, cos, sin, mask, bias, use_reentrant=False)
        return self._forward(x, pending, cos, sin, mask, bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` that leaves a weight on the meta device undrawn. The loader builds the model there, and
    ``normal_`` of a meta tensor runs a Python reference that imports ``torch._dynamo`` and with it triton: about
    150 MB of resident memory and a second of start-up, for values that loading overwrites anyway."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Decoder(nn.Module):
    """Embedding, the stack of blocks and the final norm (HF's ``LlamaModel``)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """A LLaMA-family causal LM. ``model(ids)`` gives logits; ``model.hidden_states(ids)`` the final-norm states."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pack_projections()

    def pack_projections(self) -> None:
        """Store each block's q/k/v and gate/up weights as row blocks of one tensor (``lora.pack_linears``), so
        that they run as one GEMM each. Done at construction and again after every ``.to()`` / ``to_empty()``
        (which re-allocate each parameter on its own); names, values and adapters are unaffected."""
        for block in self.model.layers:
            attn, mlp = block.self_attn, block.mlp
            pack_linears((attn.q_proj, attn.k_proj, attn.v_proj))
            pack_linears((mlp.gate_proj, mlp.up_proj))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pack_projections()
        graphs.invalidate(self)  # a CUDA graph reads the weights where they were
        return self

    def rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [T, head_dim] in fp32 for positions 0..T-1 (cached per length and device)."""
        key = (T, str(device))
        if key not in self._rope_cache:
            inv_freq = rope_inv_freq(self.config).to(device)
            freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = {key: (emb.cos(), emb.sin())}
        return self._rope_cache[key]

    def set_gradient_checkpointing(self, enabled: bool = True, every: int = 1) -> None:
        """Checkpoint every ``every``-th block (1: all blocks) when ``enabled``."""
        for i, block in enumerate(self.model.layers):
            block.checkpoint = enabled and i % every == 0

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D]; ``attention_mask`` [B, T] (1 = token, 0 = right padding).
        In training with decoder graphs enabled (``minilora.graphs``) an unmasked batch may replay a CUDA graph."""
        decoder_graphs = graphs.of(self)
        if decoder_graphs is not None and attention_mask is None and self.training and torch.is_grad_enabled():
            h = decoder_graphs(input_ids)
            if h is not None:
                return h
        return self.eager_hidden_states(input_ids, attention_mask)

    def eager_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """``hidden_states`` run op by op."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(T, input_ids.device)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]  # [B, 1, T, T]
            # A fully padded query row would give NaN; let it see itself (its output is ignored).
            mask = mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        bias = ops.layer_bias(T, mask, x.device)
        pending = None
        for block in self.model.layers:
            x, pending = block(x, cos, sin, mask, bias, pending)
        return self.model.norm.add_forward(x, pending)[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    def num_parameters(self) -> int:
        """Distinct parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())
