"""Decoder CUDA graphs (minilora.graphs) without a GPU.

- The decoder's forward and backward on the GPU's code path (Triton kernels under ``TRITON_INTERPRET=1``, SDPA)
  never read a tensor's value on the host, which would make the host wait for the GPU and fails a capture. The
  aten ops are recorded; the same recorder sees the attention-mask check and LoRA dropout's seed draw, which is
  why padded batches run eagerly and dropout is refused.
- Which calls a graph takes (a shape's second call captures, other shapes, masks, eval and no-grad run eagerly;
  ``.to()`` and a changed set of adapters drop the graph; a failed capture warns and stays eager), and gradient
  accumulation over replays, with a stand-in for ``torch.cuda.make_graphed_callables`` that returns, as PyTorch's
  does, its output and the parameters' gradients in static buffers.
- The refusals, the Trainer's and train_dapt.py's errors.
tests/test_recipes_cuda.py trains with real graphs on a GPU (tools/gpu_check.sh).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_interpreter_child
from minilora import graphs, lora
from minilora.lora import add_adapter
from minilora.model import LlamaConfig, Transformer
from minilora.train import TrainConfig, Trainer

IN_INTERPRETER_CHILD = os.environ.get("MINILORA_TEST_INTERPRETER") == "1"
try:
    import triton  # noqa: F401
except ImportError:
    triton = None

# aten ops that read a value on the host (item, bool, int, float of a tensor) or whose output shape depends on the
# data (a boolean index): each waits for the GPU. ``Tensor.tolist`` does not dispatch an op and is not seen.
HOST_READS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.masked_select", "aten._unique2"}


def tiny(dropout: float = 0.0, seed: int = 0, layers: int = 2) -> Transformer:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(cfg)
    add_adapter(model, "task", r=4, alpha=8, dropout=dropout, targets=("q_proj", "v_proj"))
    for layer in model.model.layers:  # B nonzero, so that every adapter gets a gradient through the other's path
        torch.nn.init.normal_(layer.self_attn.q_proj.lora_B["task"], std=0.1)
        torch.nn.init.normal_(layer.self_attn.v_proj.lora_B["task"], std=0.1)
    return model.train()


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops in HOST_READS, and ``aten.index`` with a boolean index."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in HOST_READS or (name == "aten.index" and any(
                t is not None and t.dtype == torch.bool for t in args[1])):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def host_reads(model: Transformer, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
    model.eager_hidden_states(ids, mask).sum().backward()  # first calls (the Triton kernels compile) apart
    with HostReads() as rec:
        model.eager_hidden_states(ids, mask).square().sum().backward()
    return rec.seen


@pytest.mark.skipif(not IN_INTERPRETER_CHILD, reason="runs in the interpreter child (test_graphs_interpreter)")
def test_interp_decoder_never_reads_the_device_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import backend_for
    from minilora import ops

    monkeypatch.setenv("MINILORA_ATTENTION", "sdpa")  # the GPU's attention

    model, ids = tiny(), torch.randint(0, 64, (2, 8))
    assert backend_for(ids.float()) == "triton" and ops._triton_rowwise(ids.float()) is not None  # the GPU path
    assert host_reads(model, ids) == []
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[1, 5:] = 0
    assert "aten._local_scalar_dense" in host_reads(model, ids, padded)  # the recorder sees the mask check
    assert "aten._local_scalar_dense" in host_reads(tiny(dropout=0.1), ids)  # ... and dropout's seed draw


# ops that launch no kernel: views, metadata, allocation
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "slice", "split", "split_with_sizes", "chunk", "unbind",
             "detach", "as_strided", "expand", "permute", "reshape", "alias", "select", "unsqueeze", "squeeze",
             "empty", "empty_strided", "new_empty", "new_empty_strided", "set_", "_reshape_alias", "view_as",
             "lift_fresh", "is_same_size"}
# measured: 30 = 14 GEMMs, 8 Triton kernels, 2 SDPA, 6 small ops (adapter stacking and dB scaling); 38 before the
# residual add went into the RMSNorm kernels, SwiGLU got a packed gradient and the adapters one op each to stack,
# 31 before the RoPE kernel wrote q, k, v token-major (SDPA's output then reaches o_proj without a copy)
KERNELS_PER_LAYER = 30


class Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that launch kernels and the Triton launches (the interpreter's own ops left out)."""

    def __init__(self):
        super().__init__()
        self.count, self.inside = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not self.inside and func.overloadpacket.__name__ not in NO_KERNEL
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        real = self.real = InterpretedFunction.run

        def run(fn, *args, **kwargs):
            self.count += 1
            self.inside = True
            try:
                return real(fn, *args, **kwargs)
            finally:
                self.inside = False

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self.real
        return super().__exit__(*exc)


@pytest.mark.skipif(not IN_INTERPRETER_CHILD, reason="runs in the interpreter child (test_graphs_interpreter)")
def test_interp_decoder_kernels_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of kernels per decoder layer in a training forward + backward on the GPU's code path (LoRA on q, v;
    the LoRA GEMMs as cuBLAS + addmm_): an eager step on the H200 waited on its host, about 59 us per launch, so
    an op added per layer is a cost to notice. A layer counted as the difference between 2 layers and 1."""
    monkeypatch.setenv("MINILORA_ATTENTION", "sdpa")
    monkeypatch.setenv("MINILORA_LORA_MATMUL", "cublas")
    counts = {}
    for layers in (1, 2):
        model, ids = tiny(layers=layers), torch.randint(0, 64, (2, 8))
        model.eager_hidden_states(ids).sum().backward()
        model.zero_grad(set_to_none=True)
        with Launches() as rec:
            model.eager_hidden_states(ids).square().sum().backward()
        counts[layers] = rec.count
    per_layer = counts[2] - counts[1]
    print(f"kernels per decoder layer: {per_layer:g} (1 layer: {counts[1]}, 2: {counts[2]})")
    assert per_layer <= KERNELS_PER_LAYER, counts


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the child's parent")
@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_graphs_interpreter() -> None:
    run_interpreter_child(Path(__file__), "test_interp_")


class FakeMake:
    """``make_graphed_callables`` as PyTorch's behaves, without a GPU: it returns an autograd function of the input
    and the module's parameters whose output, and the parameters' gradients its backward hands back, are static
    buffers that every call reuses (the graph's). Its arguments are recorded."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.fail = fail

    def __call__(self, module, sample_args, allow_unused_input=False):
        self.calls.append((module, sample_args, allow_unused_input))
        if self.fail is not None:
            raise self.fail
        params = tuple(module.parameters())
        static = [torch.zeros_like(p) for p in params]
        static_out = []

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, ids, *ps):
                with torch.enable_grad():
                    ctx.out = module(ids)
                if not static_out:
                    static_out.append(torch.empty_like(ctx.out))
                return static_out[0].copy_(ctx.out.detach()).detach()

            @staticmethod
            def backward(ctx, g):
                grads = torch.autograd.grad(ctx.out, params, g, allow_unused=True)
                for buf, grad in zip(static, grads):
                    buf.copy_(grad if grad is not None else torch.zeros_like(buf))
                return (None, *(buf.detach() for buf in static))

        return lambda ids: Graphed.apply(ids, *params)


def loss_and_grads(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.lm_head(model.hidden_states(ids)).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_graphs_capture_a_shape_on_its_second_call_and_replay_only_it() -> None:
    model, eager = tiny(), tiny()
    make = FakeMake()
    g = graphs.DecoderGraphs(model, make)
    model.__dict__["_graphs"] = g  # enable() without its CUDA check
    ids = torch.randint(0, 64, (2, 8))
    want = loss_and_grads(eager, ids)
    for call in range(3):
        got = loss_and_grads(model, ids)
        torch.testing.assert_close(got, want)
        assert len(make.calls) == (0 if call == 0 else 1)
    module, sample, unused = make.calls[0]
    assert isinstance(module, graphs._Decoder) and unused
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert list(module.trainable) == adapters and all(a is b for a, b in zip(module.trainable, adapters))
    assert not any(name.startswith("lm.") for name, _ in module.named_parameters())  # the model is not a child
    assert torch.equal(sample[0], ids) and sample[0] is not ids
    assert g.keep[0] is model.rope(8, ids.device)[0]  # the RoPE tables the graph reads stay alive
    assert g.status() == {"captured": True, "shape": [2, 8], "replays": 2, "error": None}

    other = torch.randint(0, 64, (3, 8))
    for _ in range(2):  # another shape, twice: eager, no second graph
        loss_and_grads(model, other)
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[0, 6:] = 0
    model.hidden_states(ids, padded)
    with torch.no_grad():
        model.hidden_states(ids)
    model.eval()
    model.hidden_states(ids)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast state is another key
        model.hidden_states(ids)
    assert len(make.calls) == 1 and g.replays == 2

    model.to(torch.float32)  # .to() re-packs the weights the graph read: dropped, captured again when seen twice
    assert g.status()["captured"] is False and g.keep == ()
    loss_and_grads(model, ids)
    loss_and_grads(model, ids)
    assert len(make.calls) == 2 and g.status()["replays"] == 3

    # a changed set of adapters drops the graph too; the new one differentiates the new trainable set
    for change in (lambda: lora.add_adapter(model, "domain", r=2, alpha=4, targets=("q_proj",)),
                   lambda: lora.set_trainable(model, "domain", False),
                   lambda: lora.merge_adapter(model, "domain"), lambda: lora.unmerge_adapter(model, "domain")):
        change()
        assert not g.status()["captured"]
        loss_and_grads(model, ids)
        loss_and_grads(model, ids)  # captured again
        assert g.status()["captured"]
    assert len(make.calls) == 6
    assert [p for p in make.calls[-1][0].trainable] == [p for p in model.model.parameters() if p.requires_grad]
    assert len(make.calls[2][0].trainable) == 12 and len(make.calls[3][0].trainable) == 8  # + domain on q, then frozen


def test_graphed_gradients_accumulate_over_micro_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two micro-batches through the graph give .grad = the sum of their gradients, as eagerly: without enable()'s
    hooks the first micro-batch's .grad is the graph's static buffer, which the second replay overwrites."""
    monkeypatch.setattr(graphs, "settings_refusal", lambda *a: None)  # enable() on the CPU
    ids = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    eager = tiny()
    eager.zero_grad(set_to_none=True)
    for x in ids[1:]:
        eager.hidden_states(x).square().mean().backward()
    want = [p.grad.clone() for p in eager.parameters() if p.requires_grad]
    for hooks in (True, False):
        model = tiny()
        g = graphs.enable(model, "cuda", FakeMake())
        for x in ids[:2]:  # the first shape's second call captures
            model.hidden_states(x)
        assert model.__dict__["_graphs"] is g and len(g.hooks) == 8  # A and B of q and v in 2 layers
        if not hooks:
            for _, handle in g.hooks.values():
                handle.remove()
        model.zero_grad(set_to_none=True)
        for x in ids[1:]:
            model.hidden_states(x).square().mean().backward()
        assert g.replays == 3
        got = [p.grad for p in model.parameters() if p.requires_grad]
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))
        assert same == hooks


def test_failed_capture_warns_once_and_stays_eager(capsys: pytest.CaptureFixture) -> None:
    model = tiny()
    g = graphs.DecoderGraphs(model, FakeMake(fail=RuntimeError("operation not permitted when stream is capturing")))
    model.__dict__["_graphs"] = g
    ids = torch.randint(0, 64, (2, 8))
    want = loss_and_grads(tiny(), ids)
    for _ in range(3):
        torch.testing.assert_close(loss_and_grads(model, ids), want)
    err = capsys.readouterr().err
    assert err.count("warning: CUDA graph capture failed") == 1 and "stream is capturing" in err
    assert g.status() == {"captured": False, "shape": None, "replays": 0,
                          "error": "RuntimeError: operation not permitted when stream is capturing"}
    assert len(g.make.calls) == 1


def test_refusals() -> None:
    model = tiny()
    assert "CUDA device" in graphs.refusal(model, "cpu")
    assert graphs.refusal(model, "cuda") is None
    assert "dropout 0" in graphs.refusal(tiny(dropout=0.1), "cuda")
    model.set_gradient_checkpointing(True)
    assert "checkpointing" in graphs.refusal(model, "cuda")
    assert "Transformer" in graphs.refusal(torch.nn.Linear(2, 2), "cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        graphs.enable(tiny(), "cpu")
    assert "_graphs" not in tiny().__dict__


def test_trainer_refuses_graphs_on_the_cpu(tmp_path: Path) -> None:
    data = [{"input_ids": torch.arange(8)}]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Trainer(tiny(), TrainConfig(cuda_graph=True, progress=False), data, lambda b: b[0], lambda m, b: None,
                tmp_path)


def test_train_dapt_cuda_graph_on_the_cpu_is_a_one_line_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "train_dapt.py"), "--cuda-graph", "--device", "cpu",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --cuda-graph: CUDA graphs need a CUDA device, got cpu"
    assert not (tmp_path / "run").exists()  # refused before any work
