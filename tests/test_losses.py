"""The fused chunked LM-head cross-entropy against full-logits F.cross_entropy (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minilora import losses


def _case(seed: int, B=3, T=17, D=24, V=50, dtype=torch.float32, sharp: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = losses.IGNORE_INDEX
    hidden = torch.randn(B, T, D, generator=g)
    if sharp != 1.0:  # make the next-token logits peak on the label: confident predictions, p(label) near 1
        nxt = labels[:, 1:].clamp(min=0)
        hidden[:, :-1] += sharp * head.weight.detach().float()[nxt]
    return hidden.to(dtype), head, labels


def _fused_and_reference(hidden, head, labels, autocast: bool = False) -> dict:
    """{"fused" | "ref": (loss, dL/dhidden, dL/dW or None)}: ``lm_loss_sum`` and the full-logits formula, each on a
    fresh leaf copy of ``hidden`` (under bf16 autocast when ``autocast``)."""
    out = {}
    for name, fn in [("fused", lambda h: losses.lm_loss_sum(h, head, labels)[0]),
                     ("ref", lambda h: losses.lm_loss_reference(h, head, labels))]:
        h = hidden.clone().requires_grad_(True)
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h)
        loss.backward()
        out[name] = (loss.detach().float(), h.grad,
                     head.weight.grad.clone() if head.weight.requires_grad else None)
    return out


@pytest.mark.parametrize("chunk", [2**24, 64 * 50, 50])  # one chunk; several; a row per chunk
@pytest.mark.parametrize("head_trainable", [False, True])
@pytest.mark.parametrize("sharp", [1.0, 25.0])
@pytest.mark.parametrize("gemm", ["onednn", "blas"])  # the fp32 logits GEMM (kernels.cpu.fp32_linear)
def test_fp32_matches_reference(monkeypatch, chunk, head_trainable, sharp, gemm):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setenv("MINILORA_FP32_LINEAR", gemm)
    hidden, head, labels = _case(0, sharp=sharp)
    head.weight.requires_grad_(head_trainable)
    out = _fused_and_reference(hidden, head, labels)
    torch.testing.assert_close(out["fused"][0], out["ref"][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["fused"][1], out["ref"][1], rtol=1e-5, atol=1e-6)
    if head_trainable:
        torch.testing.assert_close(out["fused"][2], out["ref"][2], rtol=1e-5, atol=1e-5)
    if sharp > 1:  # the case where softmax - onehot cancels: still accurate
        assert out["ref"][0] / (labels[:, 1:] >= 0).sum() < 0.05


def test_count_and_ignored_positions():
    hidden, head, labels = _case(1)
    loss, count = losses.lm_loss_sum(hidden, head, labels)
    assert count.item() == (labels[:, 1:] != losses.IGNORE_INDEX).sum().item()
    all_ignored = torch.full_like(labels, losses.IGNORE_INDEX)
    h = hidden.clone().requires_grad_(True)
    loss, count = losses.lm_loss_sum(h, head, all_ignored)
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0 and h.grad.abs().sum() == 0


@pytest.mark.parametrize("sharp", [1.0, 25.0])
@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])  # kernels/cpu.c's cross-entropy, or the PyTorch one
def test_bf16_autocast_close_to_reference_on_the_same_bf16_logits(monkeypatch, sharp, cpu_kernels):
    """Oracle: the bf16 logits (as any bf16 LM head gives them), then fp32 softmax - onehot and an fp32 GEMM.

    What is left is the rounding of (p - onehot) and of the product to bf16 (measured 0.3-0.5%), also where the prediction
    is confident and p - onehot nearly cancels (sharp=25)."""
    monkeypatch.setenv("MINILORA_CPU_KERNELS", cpu_kernels)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 64 * 50)
    hidden, head, labels = _case(2, sharp=sharp)
    wb = head.weight.detach().to(torch.bfloat16)
    hb = hidden.to(torch.bfloat16)
    keep = labels[:, 1:] != losses.IGNORE_INDEX
    logits = (hb[:, :-1] @ wb.T).float()[keep]
    y = labels[:, 1:][keep]
    ref_loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    gl = torch.softmax(logits, -1)
    gl[torch.arange(len(y)), y] -= 1.0
    ref_grad = torch.zeros(hidden.shape)
    ref_grad[:, :-1][keep] = gl @ wb.float()

    head_b = nn.Linear(24, 50, bias=False).to(torch.bfloat16)
    head_b.weight.data.copy_(wb)
    head_b.weight.requires_grad_(False)
    h = hb.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = losses.lm_loss_sum(h, head_b, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-3)
    err = ((h.grad.float() - ref_grad).norm() / ref_grad.norm()).item()
    assert err < 0.015


@pytest.mark.parametrize("head_trainable", [False, True])
@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])
def test_autocast_over_fp32_weights(monkeypatch, head_trainable, cpu_kernels):
    """fp32 hidden states and head under bf16 autocast (fp32 master weights, as Trainer(bf16=True) trains): the
    chunk's GEMMs run in bf16 while the gradients come back in fp32, the parameters' dtype. Oracle: the full-logits
    formula under the same autocast, to bf16's precision."""
    monkeypatch.setenv("MINILORA_CPU_KERNELS", cpu_kernels)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 64 * 50)
    hidden, head, labels = _case(3)
    head.weight.requires_grad_(head_trainable)
    out = _fused_and_reference(hidden, head, labels, autocast=True)
    assert out["fused"][1].dtype == torch.float32 and (not head_trainable or out["fused"][2].dtype == torch.float32)
    assert out["fused"][0].item() == pytest.approx(out["ref"][0].item(), rel=1e-3)
    for a, b in zip(out["fused"][1:], out["ref"][1:]):
        if b is not None:
            assert ((a - b).norm() / b.norm()).item() < 0.02
