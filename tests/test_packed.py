"""Packed projections: q/k/v and gate/up weights as row blocks of one tensor, run as one GEMM each.

The oracle is the same model with every weight in its own storage (the separate-layer path), and transformers
for the forward pass of a packed model loaded from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_interpreter_child, save_tiny_hf
from minilora import from_pretrained
from minilora.lora import add_adapter, linear_group, merge_adapter, packed_weight

PACKED = [("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))]


def _groups(model):
    for block in model.model.layers:
        for parent, names in PACKED:
            yield [getattr(getattr(block, parent), n) for n in names]


def _unpack(model):
    with torch.no_grad():
        for mods in _groups(model):
            for m in mods:
                m.weight.data = m.weight.data.clone()


def _is_packed(model) -> bool:
    return all(packed_weight([m.weight for m in mods]) is not None for mods in _groups(model))


@pytest.fixture()
def tiny(tmp_path):
    return save_tiny_hf(tmp_path / "base"), tmp_path / "base"


def test_loaded_model_is_packed_and_matches_transformers(tiny):
    hf, path = tiny
    model, _ = from_pretrained(path)
    assert _is_packed(model)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_packing_survives_dtype_and_device_moves(tiny):
    model, _ = from_pretrained(tiny[1])
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    model.to(torch.bfloat16)
    assert _is_packed(model) and q.dtype == torch.bfloat16  # the same Parameter object, re-packed
    assert model.model.layers[0].self_attn.q_proj.weight is q
    torch.testing.assert_close(q.detach().float(), before, rtol=1e-2, atol=1e-2)
    _unpack(model)
    assert not _is_packed(model)
    model.float()
    assert _is_packed(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_separate_layers_with_stacked_adapters(tiny, dtype):
    """Frozen domain + trainable task adapters on q, v, gate (k and up plain): same loss and adapter gradients."""
    torch.manual_seed(0)
    results = []
    for packed in (True, False):
        model, _ = from_pretrained(tiny[1], dtype="bf16" if dtype == torch.bfloat16 else "fp32")
        if not packed:
            _unpack(model)
        add_adapter(model, "domain", r=4, alpha=8, trainable=False, targets=("q_proj", "v_proj", "gate_proj"))
        add_adapter(model, "task", r=2, alpha=4, trainable=True, targets=("q_proj", "v_proj", "gate_proj"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.train()
        assert _is_packed(model) == packed
        ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(n.endswith(".task") for n in grads)
        assert all(p.grad is None for n, p in model.named_parameters() if n.endswith(".domain"))
        results.append((loss.detach(), grads))
    (lp, gp), (ls, gs) = results
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lp, ls, **tol)
    assert gp.keys() == gs.keys()
    for n in gp:
        torch.testing.assert_close(gp[n], gs[n], **tol, msg=n)


def test_linear_group_falls_back_where_it_must(tiny):
    model, _ = from_pretrained(tiny[1])
    attn = model.model.layers[0].self_attn
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(3, 48)
    add_adapter(model, "task", r=2, alpha=4, dropout=0.1, targets=("q_proj",))
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    model.train()
    assert linear_group(x, mods) is None  # separate layers draw separate dropout masks
    model.eval()
    out = linear_group(x, mods)
    torch.testing.assert_close(out, torch.cat([m(x) for m in mods], dim=-1), rtol=1e-5, atol=1e-6)
    attn.k_proj.weight.requires_grad_(True)  # full fine-tuning of a base weight: not a frozen packed GEMM
    assert linear_group(x, mods) is None
    attn.k_proj.weight.requires_grad_(False)
    _unpack(model)
    assert linear_group(x, mods) is None


def test_merge_into_packed_weight_touches_only_its_block(tiny):
    model, _ = from_pretrained(tiny[1])
    add_adapter(model, "task", r=2, alpha=4, targets=("v_proj",))
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.v_proj.lora_B["task"].normal_()
    q, k, v = (m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    x = torch.randn(4, 48)
    with torch.no_grad():
        before = torch.cat([m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
        merge_adapter(model, "task")
        after = linear_group(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    assert _is_packed(model)
    assert torch.equal(attn.q_proj.weight, q) and torch.equal(attn.k_proj.weight, k)
    assert not torch.equal(attn.v_proj.weight, v)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_packed_under_the_triton_kernels() -> None:
    """The same tests with ``kernels.lora_linear`` in Triton (the GPU path), under the interpreter."""
    pytest.importorskip("triton")
    run_interpreter_child(Path(__file__), "not triton")
