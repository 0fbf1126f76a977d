"""LoRA adapters: both stacked adapters really act, gradients, merge/unmerge, and PEFT interop both ways."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import save_tiny_hf
from minilora import from_pretrained
from minilora.lora import (
    LoRALinear,
    add_adapter,
    adapter_names,
    load_adapter,
    lora_layers,
    merge_adapter,
    save_adapter,
    set_trainable,
    trainable_parameters,
    unmerge_adapter,
)


@pytest.fixture()
def tiny(tmp_path):
    save_tiny_hf(tmp_path / "base")
    return tmp_path / "base"


def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}" in n and ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_both_stacked_adapters_act_and_only_trainable_gets_gradients(tiny):
    model, _ = from_pretrained(tiny)
    add_adapter(model, "domain", r=8, alpha=16, trainable=False)
    add_adapter(model, "task", r=4, alpha=8, trainable=True, targets="all-linear")
    _randomise(model, "domain", 0)
    _randomise(model, "task", 1)
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        ref = model(ids)
        for name in ("domain", "task"):
            layer = model.model.layers[1].self_attn.v_proj
            old = layer.lora_B[name].clone()
            layer.lora_B[name].add_(0.05)
            assert (model(ids) - ref).abs().max() > 1e-4, f"changing the {name} adapter did not change the output"
            layer.lora_B[name].copy_(old)
        assert torch.equal(model(ids), ref)

    model.train()
    model(ids).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if ".task" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_adapter_output_matches_hand_formula(tiny):
    model, _ = from_pretrained(tiny)
    add_adapter(model, "domain", r=8, alpha=16, trainable=False)
    add_adapter(model, "task", r=4, alpha=12)
    _randomise(model, "domain", 0)
    _randomise(model, "task", 1)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features)
    want = x @ layer.weight.T
    want = want + 2.0 * (x @ layer.lora_A["domain"].T) @ layer.lora_B["domain"].T
    want = want + 3.0 * (x @ layer.lora_A["task"].T) @ layer.lora_B["task"].T
    assert (layer(x) - want).abs().max() < 1e-5


def test_trainable_parameters_and_set_trainable(tiny):
    model, _ = from_pretrained(tiny)
    total = sum(p.numel() for p in model.parameters())
    add_adapter(model, "domain", r=16, alpha=32)  # q_proj [48->48], v_proj [48->16], 2 layers
    expected = 2 * (16 * (48 + 48) + 16 * (48 + 16))
    count, pct = trainable_parameters(model)
    assert count == expected
    assert pct == pytest.approx(100 * expected / (total + expected))
    set_trainable(model, "domain", False)
    assert trainable_parameters(model)[0] == 0
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        set_trainable(model, "nope", True)


def test_merge_then_unmerge_restores_base(tiny):
    model, _ = from_pretrained(tiny)
    add_adapter(model, "task", r=8, alpha=16, targets="all-linear")
    _randomise(model, "task", 3)
    ids = torch.randint(0, 101, (2, 9))
    layer = model.model.layers[0].mlp.down_proj
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        before = model(ids)
        merge_adapter(model, "task")
        assert not torch.equal(layer.weight, w0)
        assert (model(ids) - before).abs().max() < 1e-4
        unmerge_adapter(model, "task")
    assert (layer.weight - w0).abs().max() <= 4 * torch.finfo(torch.float32).eps * w0.abs().max()
    with pytest.raises(ValueError, match="not merged"):
        unmerge_adapter(model, "task")


def test_save_load_roundtrip_and_errors(tiny, tmp_path):
    model, _ = from_pretrained(tiny)
    add_adapter(model, "domain", r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    _randomise(model, "domain", 4)
    save_adapter(model, "domain", tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    fresh, _ = from_pretrained(tiny)
    names = load_adapter(fresh, tmp_path / "ad", "domain")
    assert len(names) == 6 and adapter_names(fresh) == ["domain"]
    assert trainable_parameters(fresh)[0] == 0  # loaded frozen by default
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(fresh, tmp_path / "ad", "domain")
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        load_adapter(fresh, tmp_path, "x")
    save_tiny_hf(tmp_path / "wide", hidden_size=60, num_attention_heads=5, num_key_value_heads=5)
    other, _ = from_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(other, tmp_path / "ad", "domain")
    assert not any(isinstance(m, LoRALinear) for m in other.modules()), "a failed load must not half-modify the model"


def _peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_minilora_adapter_loads_in_peft(tiny, tmp_path, targets):
    peft = _peft()
    import transformers

    model, _ = from_pretrained(tiny)
    add_adapter(model, "task", r=8, alpha=32, targets=targets)
    _randomise(model, "task", 5)
    save_adapter(model, "task", tmp_path / "ad")
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        assert (model(ids) - pm(ids).logits).abs().max() <= 1e-4


def test_peft_adapter_loads_in_minilora(tiny, tmp_path):
    peft = _peft()
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                          rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "ad")
    model, _ = from_pretrained(tiny)
    load_adapter(model, tmp_path / "ad", "domain")
    assert model.model.layers[0].mlp.up_proj.specs["domain"].r == 2
    assert model.model.layers[0].self_attn.o_proj.specs["domain"].alpha == 3
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        assert (model(ids) - pm(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("alpha_pattern", [
    {"layers.1.mlp.*": 64},
    {"q_proj|v_proj": 64},
    {r"layers\.0\.self_attn\.q_proj": 64, "o_proj": 3},
    {"model.layers.1.self_attn.k_proj": 5, "k_proj": 7},  # the first matching key in the file wins
])
def test_peft_alpha_pattern_regexes_scale_as_in_peft(tiny, tmp_path, alpha_pattern):
    """Before: a key was matched as a name, a dotted suffix or a whole-name regex, so PEFT's regex keys
    ('q_proj|v_proj', 'layers.1.mlp.*') fell back to lora_alpha: logits 2.6 apart from PEFT's, with no word."""
    peft = _peft()
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", alpha_pattern=alpha_pattern,
                          init_lora_weights=False)
    peft.get_peft_model(hf, cfg).save_pretrained(tmp_path / "ad")
    # the oracle is PEFT reading the saved folder: PEFT writes the pattern's keys sorted, and the first match wins
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tiny), tmp_path / "ad").eval()
    model, _ = from_pretrained(tiny)
    load_adapter(model, tmp_path / "ad", "domain")
    theirs = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in pm.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    ours = {n: m.specs["domain"].scaling for n, m in lora_layers(model)}
    assert ours == theirs and len(set(ours.values())) > 1
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        assert (model(ids) - pm(ids).logits).abs().max() <= 1e-4


def test_a_pattern_key_that_is_not_a_regex_is_named(tiny, tmp_path):
    model, _ = from_pretrained(tiny)
    add_adapter(model, "task", r=2, alpha=4)
    save_adapter(model, "task", tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {"q_proj(": 8}
    cfg_path.write_text(json.dumps(cfg))
    fresh, _ = from_pretrained(tiny)
    with pytest.raises(ValueError, match=r"adapter_config.json: pattern key 'q_proj\(' is not a regular expression"):
        load_adapter(fresh, tmp_path / "ad", "domain")


def test_load_adapter_keeps_an_eval_model_in_eval_mode(tiny, tmp_path):
    """Before: the LoRA layers load_adapter made were in training mode in a model in eval mode, so an adapter saved
    with dropout dropped inputs at inference (two identical forwards 0.9 apart)."""
    model, _ = from_pretrained(tiny)
    add_adapter(model, "task", r=4, alpha=8, dropout=0.5)
    _randomise(model, "task", 3)
    save_adapter(model, "task", tmp_path / "ad")
    fresh, _ = from_pretrained(tiny)
    fresh.eval()
    load_adapter(fresh, tmp_path / "ad", "task")
    assert not any(m.training for m in fresh.modules())
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        assert torch.equal(fresh(ids), fresh(ids))
        assert torch.equal(fresh(ids), model.eval()(ids))


def test_each_adapter_drops_its_input_at_its_own_rate_as_in_peft(tiny):
    """Before: stacked adapters shared one mask at the largest rate, so a frozen domain adapter saved with dropout 0.3
    dropped the input of a task adapter set to dropout 0 (and one with 0 left the task's 0.3 on the domain's input).
    Now each rate draws its own mask; checked against the formula, with the masks the layer drew."""
    import kernels.reference as ref

    model, _ = from_pretrained(tiny)
    add_adapter(model, "domain", r=4, alpha=8, dropout=0.3)
    add_adapter(model, "task", r=2, alpha=4, dropout=0.0)
    _randomise(model, "domain", 1)
    _randomise(model, "task", 2)
    layer = model.model.layers[0].self_attn.q_proj
    layer.train()
    x = torch.randn(3, 5, layer.in_features)
    masks = []
    real = ref.dropout_mask

    def recording(shape, p, device="cpu"):
        masks.append((p, real(shape, p, device)))
        return masks[-1][1]

    ref.dropout_mask = recording
    try:
        y = layer(x)
    finally:
        ref.dropout_mask = real
    assert [p for p, _ in masks] == [0.3]  # the task adapter's rate (0) drew no mask
    keep = masks[0][1]
    a, b = layer.lora_A, layer.lora_B
    s = {n: layer.specs[n].scaling for n in ("domain", "task")}
    want = (x @ layer.weight.T + s["task"] * (x @ a["task"].T) @ b["task"].T
            + s["domain"] * ((x * keep / 0.7) @ a["domain"].T) @ b["domain"].T)
    assert (y - want).abs().max() <= 1e-5
    layer.eval()
    with torch.no_grad():
        plain = x @ layer.weight.T + sum(s[n] * (x @ a[n].T) @ b[n].T for n in s)
        assert (layer(x) - plain).abs().max() <= 1e-5


def test_an_adapter_in_peft_pickle_format_is_named_and_a_relative_base_path_saved_absolute(tiny, tmp_path,
                                                                                          monkeypatch):
    """Before: a folder with PEFT's adapter_model.bin was reported as 'adapter_model.safetensors: missing', and the
    model path given relative was saved as is, which PEFT then looked up relative to wherever it ran."""
    model, _ = from_pretrained(tiny)
    add_adapter(model, "task", r=2, alpha=4)
    monkeypatch.chdir(tiny.parent)
    save_adapter(model, "task", tmp_path / "ad", base_model_name=tiny.name)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    save_adapter(model, "task", tmp_path / "named", base_model_name="smollm2-135m")
    assert json.loads((tmp_path / "named" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "smollm2-135m"
    (tmp_path / "ad" / "adapter_model.safetensors").rename(tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin: PEFT's older pickle format is not read; save the "
                                         r"adapter again as safetensors"):
        load_adapter(model, tmp_path / "ad", "domain")


def test_adapters_of_two_rates_in_bf16_weights_without_autocast(tiny):
    """The extra rate's terms compute in the layer's dtype, as the fused call does (before: bf16 input and base
    weights with fp32 adapters, no autocast, failed in F.linear: 'BFloat16 != float')."""
    model, _ = from_pretrained(tiny, dtype="bf16")
    add_adapter(model, "domain", r=4, alpha=8, dropout=0.0, trainable=False)
    add_adapter(model, "task", r=2, alpha=4, dropout=0.2)
    _randomise(model, "domain", 1)
    layer = model.model.layers[0].self_attn.q_proj
    layer.train()
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A["task"].grad is not None and layer.lora_A["domain"].grad is None and x.grad is not None
