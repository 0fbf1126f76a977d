"""Trainer pieces tested in-process: per-prefix learning rates, where collectives put their tensors."""

from __future__ import annotations

import datetime
import json
import re

import pytest
import torch
from torch import nn

from minilora import train
from minilora.train import TrainConfig, Trainer, collective_device, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.body(x))


def test_param_groups_route_by_prefix():
    net = Net()
    groups = param_groups(list(net.named_parameters()), 1e-4, {"head.": 5e-3})
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[5e-3] == {id(net.head.weight)}
    assert by_lr[1e-4] == {id(net.body.weight), id(net.body.bias)}
    with pytest.raises(ValueError, match="no trainable parameter name starts with \\['tail.'\\]"):
        param_groups(list(net.named_parameters()), 1e-4, {"tail.": 1.0})


def test_trainer_schedules_each_group_from_its_own_peak(tmp_path):
    torch.manual_seed(0)
    net = Net()
    data = [torch.randn(4) for _ in range(8)]

    def loss_fn(m, batch):
        return m(batch).pow(2).sum(), batch.shape[0]

    cfg = TrainConfig(lr=1e-3, lr_overrides={"head.": 1e-2}, epochs=2, batch_size=4, precision="fp32",
                      progress=False, warmup_steps=2, save_every=0)
    tr = Trainer(net, cfg, data, torch.stack, loss_fn, tmp_path)
    head0 = net.head.weight.detach().clone()
    # the first of two warm-up steps runs each group at half its own peak, the second at the peak
    assert sorted(g["lr"] for g in tr.optimizer.param_groups) == pytest.approx([0.5e-3, 0.5e-2])
    tr.scheduler.step()
    assert sorted(g["lr"] for g in tr.optimizer.param_groups) == pytest.approx([1e-3, 1e-2])
    assert torch.equal(head0, net.head.weight)


def test_collectives_take_cpu_tensors_to_the_gpu_under_nccl(monkeypatch):
    """NCCL reduces CUDA tensors only: the trainer's CPU loss/token counts go to this rank's GPU under nccl and stay
    where they are under gloo (the gloo path runs for real in test_train_dapt's torchrun test)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device("nccl", torch.device("cpu")) == torch.device("cuda", 3)
    assert collective_device("nccl", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert collective_device("gloo", torch.device("cpu")) == torch.device("cpu")

    seen = []

    def fake_all_reduce(t, op=None):  # two ranks holding the same values
        seen.append(t)
        t.mul_(2)

    monkeypatch.setattr(train, "world", lambda: (0, 2))
    monkeypatch.setattr(train.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(train.dist, "all_reduce", fake_all_reduce)
    t = torch.tensor([1.5, 4.0], dtype=torch.float64)
    assert train.all_reduce_sum(t) is t and t.tolist() == [3.0, 8.0] and seen == [t]
    monkeypatch.setattr(train, "collective_device", lambda backend, device: torch.device("cpu", 0) if backend == "nccl"
                        else device)  # another "device": the sum is reduced there, then copied back into t
    monkeypatch.setattr(train.dist, "get_backend", lambda: "nccl")
    t = torch.tensor([1.5, 4.0], dtype=torch.float64)
    assert train.all_reduce_sum(t) is t and t.tolist() == [3.0, 8.0] and seen[-1] is not t


def test_init_distributed_under_torchrun(monkeypatch):
    """Under torchrun --device picks the kind only (each rank on cuda:LOCAL_RANK), the group gets the long timeout,
    and bad devices are one-line errors."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("MINILORA_DIST_TIMEOUT_MIN", raising=False)
    monkeypatch.setattr(train.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    assert train.init_distributed("cpu") == torch.device("cpu")
    assert calls == [("gloo", datetime.timedelta(minutes=180))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setenv("MINILORA_DIST_TIMEOUT_MIN", "5")
    assert train.init_distributed("cuda") == torch.device("cuda", 1)
    assert train.init_distributed(None) == torch.device("cuda", 1)  # cuda when available
    assert calls[1:] == [("set_device", 1), ("nccl", datetime.timedelta(minutes=5))] * 2
    with pytest.raises(ValueError, match="under torchrun pass --device cuda; each rank uses cuda:LOCAL_RANK"):
        train.init_distributed("cuda:3")
    for bad in ("tpu", "mps"):
        with pytest.raises(ValueError, match=f"--device {bad}: expected cpu or cuda"):
            train.init_distributed(bad)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is available"):
        train.init_distributed("cuda")


def test_a_stop_signal_on_another_rank_stops_this_one_after_the_same_step(monkeypatch, tmp_path, capsys):
    """Rank 0 of two, whose peer got SIGTERM during step 3: the flag comes back in step 3's sums, so rank 0 saves
    the step-3 checkpoint, waits at the barrier and exits as the peer does."""
    monkeypatch.setattr(train, "world", lambda: (0, 2))
    monkeypatch.setattr(train.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(train.dist, "barrier", lambda: barriers.append(1))
    sums, barriers = [], []

    def two_ranks(t, op=None):
        if t.dtype == torch.float64 and t.numel() == 4:  # the step's sums: the peer's equal share, and at step 3 its flag
            sums.append(1)
            t.mul_(2)
            t[3] += float(len(sums) == 3)
        else:  # gradients
            t.mul_(2)

    monkeypatch.setattr(train.dist, "all_reduce", two_ranks)
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    cfg = TrainConfig(lr=1e-2, max_steps=10, batch_size=4, precision="fp32", progress=False, save_every=0)
    tr = Trainer(net, cfg, [torch.randn(3) for _ in range(16)], lambda xs: {"input_ids": torch.stack(xs)},
                 lambda m, b: (m(b["input_ids"]).pow(2).sum(), b["input_ids"].shape[0]), tmp_path)
    with pytest.raises(SystemExit) as stop:
        tr.fit()
    assert stop.value.code == 128 + 15 and len(sums) == 3 and barriers == [1]
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["state"]["step"] == 3
    assert "another rank was stopped: checkpoint saved at step 3" in capsys.readouterr().err


def test_a_step_reads_its_sums_back_once_whatever_the_accumulation(tmp_path):
    """The loss and count of each micro-batch are added up where they are (on a GPU, the device) and read back once
    per step: the host reads of a step do not grow with the micro-batches (each would make the host wait for the
    GPU before it could queue the next micro-batch). The loss functions return device counts, as lm_loss_sum does
    on CUDA."""
    reads = {}
    for accum in (1, 4):
        torch.manual_seed(0)
        net = nn.Linear(3, 1)
        cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=2, grad_accum=accum, precision="fp32", progress=False,
                          save_every=0)
        tr = Trainer(net, cfg, [torch.randn(3) for _ in range(16)], lambda xs: {"input_ids": torch.stack(xs)},
                     lambda m, b: (m(b["input_ids"]).pow(2).sum(), torch.tensor(float(b["input_ids"].shape[0]))),
                     tmp_path / str(accum))

        class Reads(torch.utils._python_dispatch.TorchDispatchMode):
            seen = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Reads.seen += func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "nonzero")
                return func(*args, **(kwargs or {}))

        with Reads():
            state = tr.fit()
        assert state.step == 2 and state.tokens == 2 * accum * 2 * 3
        reads[accum] = Reads.seen
    assert reads[4] == reads[1], reads


def test_resuming_a_finished_run_neither_evaluates_nor_logs_again(tmp_path):
    """A run killed after its final checkpoint (before its outputs were written) is resumed to write them: the final
    evaluation is in the checkpoint's history, so the resume does not repeat it (a full validation pass on a large
    model) or add a second line for it to metrics.jsonl."""
    calls = []

    def make() -> Trainer:
        torch.manual_seed(0)
        net = nn.Linear(3, 1)
        cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=2, precision="fp32", progress=False, save_every=0)
        return Trainer(net, cfg, [torch.randn(3) for _ in range(8)], lambda xs: {"input_ids": torch.stack(xs)},
                       lambda m, b: (m(b["input_ids"]).pow(2).sum(), b["input_ids"].shape[0]), tmp_path,
                       evaluate=lambda m: calls.append(1) or {"val_loss": 1.0 / len(calls)})

    first = make().fit()
    assert len(calls) == 1 and first.step == 3
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert lines.count('"val_loss"') == 1
    again = make().fit(resume=True)
    assert len(calls) == 1 and again.step == 3 and again.best == first.best
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_logged_epochs_count_from_one_and_the_bar_shows_each_steps_own_figures(tmp_path, capsys):
    """Before: metrics.jsonl counted epochs from 0 (summary's best_epoch and search.md from 1), and the progress bar
    drew step k+1's loss and lr beside the counter k (set_postfix refreshed before the update)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=2, precision="fp32", progress=True, save_every=0,
                      schedule="linear")
    data = [torch.randn(3) for _ in range(6)]  # 3 steps an epoch
    Trainer(net, cfg, data, lambda xs: {"input_ids": torch.stack(xs)},
            lambda m, b: (m(b["input_ids"]).pow(2).sum(), b["input_ids"].shape[0]), tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    drawn = re.findall(r"(\d)/6 .*?lr=([0-9.e+-]+)", capsys.readouterr().err.replace("\r", "\n"))
    lr_of = {r["step"]: r["lr"] for r in rows}
    assert drawn and all(float(lr) == pytest.approx(lr_of[int(k)], rel=1e-2) for k, lr in drawn if int(k)), drawn
