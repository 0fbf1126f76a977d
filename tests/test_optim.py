"""minilora.optim against torch.optim as the oracle: the same fused AdamW updates to the bit, the same schedule,
and optimizer/scheduler states that load both ways (checkpoints of earlier versions, written by torch.optim)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from minilora import optim


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU (tools/gpu_check.sh)"))]


def _params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes_dtypes = [((16, 8), torch.float32), ((8, 16), torch.float32), ((3,), torch.float32),
                     ((4, 4), torch.bfloat16), ((5, 2), torch.float32)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, d)) for s, d in shapes_dtypes]


def _groups(ps: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 5e-2, "weight_decay": 0.0}]


def _warm_then_cosine(step: int) -> float:
    return (step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 3) / 5)))


def _run(opt, sched, ps: list[torch.nn.Parameter], steps: range) -> list[float]:
    lrs = []
    for k in steps:
        g = torch.Generator().manual_seed(100 + k)
        for i, p in enumerate(ps):
            # the last parameter gets no gradient on odd steps: it must be left alone, its state not advanced
            p.grad = None if (i == len(ps) - 1 and k % 2) else torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return lrs


def _torch(ps):
    opt = torch.optim.AdamW(_groups(ps), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _warm_then_cosine)


def _ours(ps):
    opt = optim.AdamW(_groups(ps), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    return opt, optim.LambdaLR(opt, _warm_then_cosine)


def _assert_same(ps, qs):
    for p, q in zip(ps, qs):
        assert p.dtype == q.dtype and torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_updates_and_schedule_equal_torch_fused_adamw_to_the_bit(device):
    ps, qs = _params(device=device), _params(device=device)
    lr_torch = _run(*_torch(ps), ps, range(9))
    lr_ours = _run(*_ours(qs), qs, range(9))
    assert lr_ours == lr_torch and lr_ours[0] == pytest.approx(1e-2 / 3)
    _assert_same(ps, qs)
    assert not torch.equal(qs[0], _params(device=device)[0])  # they did move


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_state_saved_by_one_resumes_in_the_other_exactly(direction, device):
    """A checkpoint written by torch.optim (every minilora run before this module) resumes here, and back; the
    Trainer saves and loads its states through the CPU (torch.save, map_location="cpu")."""
    ref = _params(device=device)
    _run(*_torch(ref), ref, range(8))
    first, second = (_torch, _ours) if direction == "torch->ours" else (_ours, _torch)
    ps = _params(device=device)
    opt, sched = first(ps)
    _run(opt, sched, ps, range(4))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=False)
    saved_opt, saved_sched = saved["opt"], saved["sched"]
    saved_params = [p.detach().clone() for p in ps]
    qs = _params(seed=7, device=device)  # a fresh process: other initial values, overwritten from the checkpoint
    with torch.no_grad():
        for q, p in zip(qs, saved_params):
            q.copy_(p)
    opt2, sched2 = second(qs)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.get_last_lr() == sched.get_last_lr()
    _run(opt2, sched2, qs, range(4, 8))
    _assert_same(ref, qs)


def test_other_parameter_groups_are_refused_when_loading():
    ps = _params()
    opt, _ = _ours(ps)
    other = torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:]}], fused=True)
    with pytest.raises(ValueError, match="parameter groups differ"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="more than one group"):
        optim.AdamW([{"params": ps[:2]}, {"params": ps[1:]}])
    with pytest.raises(ValueError, match="floating point on cpu or cuda, not torch.int64 on cpu"):
        optim.AdamW([torch.zeros(2, dtype=torch.long)])


def test_zero_grad_keeps_or_drops_the_gradients():
    ps = _params()
    opt, _ = _ours(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
