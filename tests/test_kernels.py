"""kernels.lora_linear against the literal formula (fp64 autograd) and against the PyTorch reference.

Every ``test_fused_*`` test runs twice: in this process against whatever ``kernels.lora_linear`` dispatches to
(the PyTorch path on CPU, Triton on CUDA), and in a child pytest with ``TRITON_INTERPRET=1 MINILORA_KERNELS=triton``
(``test_triton_interpreter_suite``), where the same tests exercise the Triton kernels on CPU. A child process is
the reliable way to get the interpreter: triton reads TRITON_INTERPRET when kernels are defined, and other tests
may have imported triton first. ``test_cuda_*`` compare Triton with the reference on a GPU and skip elsewhere.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_interpreter_child

import kernels
from kernels import reference

ROOT = Path(__file__).resolve().parents[1]
IN_INTERPRETER_CHILD = os.environ.get("MINILORA_TEST_INTERPRETER") == "1"
HAS_CUDA_TRITON = torch.cuda.is_available() and kernels.triton_impl is not None and not kernels.triton_impl.INTERPRET
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # max error / max |truth|


def make_case(m: int, k: int, n: int, ranks: tuple[int, ...], dtype: torch.dtype = torch.float32,
              lead: tuple[int, ...] = (), transposed: bool = False, trainable: tuple[bool, ...] | None = None,
              device: str = "cpu", seed: int = 0) -> dict:
    """Random layer inputs of unit-scale outputs; ``x`` is a view of the leaf ``x_leaf`` when ``transposed``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    trainable = trainable or (True,) * len(ranks)
    x_leaf = rand(*lead, k, m).requires_grad_() if transposed else rand(*lead, m, k).requires_grad_()
    return dict(
        x_leaf=x_leaf,
        x=x_leaf.transpose(-1, -2) if transposed else x_leaf,
        weight=rand(n, k, scale=k ** -0.5),
        lora_a=[rand(r, k, scale=k ** -0.5).requires_grad_(t) for r, t in zip(ranks, trainable)],
        lora_b=[rand(n, r, scale=r ** -0.5).requires_grad_(t) for r, t in zip(ranks, trainable)],
        scaling=[0.5 + i for i in range(len(ranks))],
        grad=rand(*lead, m, n),
    )


def run(fn, case: dict, **kwargs) -> list[torch.Tensor | None]:
    """Output and grads [y, dx, dA_0.., dB_0..] of ``fn`` on ``case`` (grads reset afterwards)."""
    leaves = [case["x_leaf"], *case["lora_a"], *case["lora_b"]]
    y = fn(case["x"], case["weight"], case["lora_a"], case["lora_b"], case["scaling"], **kwargs)
    y.backward(case["grad"].to(y.dtype))
    out = [y.detach()] + [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return out


def fp64_truth(case: dict, keep: torch.Tensor | None = None, p: float = 0.0) -> list[torch.Tensor | None]:
    """The literal formula in float64 under autograd on copies of the case's tensors."""
    c64 = dict(case)
    c64["x_leaf"] = case["x_leaf"].detach().double().requires_grad_(case["x_leaf"].requires_grad)
    c64["x"] = c64["x_leaf"].transpose(-1, -2) if case["x"] is not case["x_leaf"] else c64["x_leaf"]
    for key in ("lora_a", "lora_b"):
        c64[key] = [t.detach().double().requires_grad_(t.requires_grad) for t in case[key]]
    c64["weight"] = case["weight"].double()
    return run(lambda *a: reference.naive_lora_linear(*a, keep=keep, dropout_p=p), c64)


def assert_close(got: list, want: list, dtype: torch.dtype, what: str) -> None:
    n = (len(got) - 2) // 2
    names = ["y", "dx"] + [f"dA{i}" for i in range(n)] + [f"dB{i}" for i in range(n)]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), f"{what}: {name} is {a is None and 'None' or 'set'}, expected otherwise"
        if a is None:
            continue
        assert a.shape == b.shape, f"{what}: {name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)
        assert err <= TOL[dtype], f"{what}: {name} relative error {err:.2e} > {TOL[dtype]:.0e}"


def keep_mask(x2d: torch.Tensor, p: float, rng_seed: int) -> torch.Tensor:
    """The keep-mask ``kernels.lora_linear`` draws for x2d right after ``torch.manual_seed(rng_seed)``."""
    torch.manual_seed(rng_seed)
    if kernels.backend_for(x2d) == "triton":
        return kernels.triton_impl.dropout_mask(reference.draw_seed(), tuple(x2d.shape), p, x2d.device)
    return reference.dropout_mask(x2d.shape, p, x2d.device)


# (m, k, n, ranks, lead dims, transposed x, trainable flags): edges of the interpreter's 32-blocks, M = 1,
# ranks below 16, not powers of two and above the 64-wide rank chunk, no adapter, frozen adapters.
SHAPES = [
    (1, 40, 72, (8,), (), False, None),
    (7, 72, 130, (16, 8), (), False, None),
    (65, 130, 40, (3, 5), (), False, None),
    (65, 72, 72, (), (), False, None),
    (7, 130, 130, (48, 40), (), False, None),
    (3, 40, 72, (16, 8), (2,), False, None),
    (33, 72, 40, (3, 5), (), True, None),
    (7, 40, 130, (16, 8), (), False, (False, True)),
    (65, 40, 72, (8, 3, 5), (), False, (True, False, True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"m{s[0]}k{s[1]}n{s[2]}r{'-'.join(map(str, s[3])) or 0}"
                         f"{'-lead' if s[4] else ''}{'-T' if s[5] else ''}{'-frozen' if s[6] else ''}")
def test_fused_matches_reference_and_formula(shape: tuple, dtype: torch.dtype) -> None:
    m, k, n, ranks, lead, transposed, trainable = shape
    case = make_case(m, k, n, ranks, dtype, lead=lead, transposed=transposed, trainable=trainable)
    got = run(kernels.lora_linear, case)
    assert got[0].dtype == dtype and got[0].shape == (*lead, m, n)
    assert_close(got, fp64_truth(case), dtype, "vs fp64 formula")
    assert_close(got, run(reference.lora_linear, case), dtype, "vs reference")
    for i, flag in enumerate(trainable or (True,) * len(ranks)):
        for grad in (got[2 + i], got[2 + len(ranks) + i]):
            assert (grad is None) == (not flag) and (grad is None or grad.abs().sum() > 0)


@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_fp32_cpu_base_gemm_either_way_matches_formula(monkeypatch: pytest.MonkeyPatch, gemm: str) -> None:
    """fp32 on the CPU the frozen base product runs through kernels.cpu.fp32_linear: oneDNN or BLAS, the same
    result (forward and every gradient) against the fp64 formula."""
    monkeypatch.setenv("MINILORA_FP32_LINEAR", gemm)
    for m, k, n, ranks, lead, transposed, trainable in SHAPES:
        case = make_case(m, k, n, ranks, torch.float32, lead=lead, transposed=transposed, trainable=trainable)
        assert_close(run(kernels.lora_linear, case), fp64_truth(case), torch.float32, f"{gemm} vs fp64 formula")


def test_fused_dispatches_as_configured() -> None:
    """The child really runs Triton (MINILORA_KERNELS=triton); this process uses PyTorch for CPU tensors."""
    assert kernels.backend_for(torch.ones(1)) == ("triton" if IN_INTERPRETER_CHILD else "torch")


def test_fused_autocast_bf16_close_to_fp32() -> None:
    case = make_case(7, 72, 40, (16, 8), torch.float32, trainable=(True, False))
    case["weight"] = case["weight"].bfloat16()  # frozen bf16 base weight, fp32 master adapters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(kernels.lora_linear, case)
    assert got[0].dtype == torch.bfloat16
    assert got[1].dtype == got[2].dtype == got[4].dtype == torch.float32 and got[3] is None and got[5] is None
    assert_close(got, fp64_truth(case), torch.bfloat16, "bf16 autocast vs fp64")


def test_fused_no_input_grad_still_trains_adapters() -> None:
    case = make_case(7, 40, 72, (8,))
    case["x_leaf"].requires_grad_(False)
    got = run(kernels.lora_linear, case)
    assert got[1] is None
    assert_close(got, fp64_truth(case), torch.float32, "x without grad")


def test_fused_stride_zero_output_grad() -> None:
    """``y.sum().backward()`` hands the layer an expanded (stride-0) gradient."""
    case = make_case(7, 40, 72, (16, 8))
    case["grad"] = torch.ones(1).expand(7, 72)
    assert_close(run(kernels.lora_linear, case), fp64_truth(case), torch.float32, "stride-0 grad")


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_fused_dropout_statistics(p: float) -> None:
    """Identity probe (W = 0, A = B = I): y = dropout(1) exactly, so its values show the mask and the scale."""
    m, k = 64, 96
    eye = torch.eye(k)
    x = torch.ones(m, k)
    ys = [kernels.lora_linear(x, torch.zeros(k, k), [eye], [eye], [1.0], dropout_p=p, training=True) for _ in range(2)]
    for y in ys:
        keep = y != 0
        assert torch.allclose(y[keep], torch.full_like(y[keep], 1 / (1 - p)))
        sigma = math.sqrt(p * (1 - p) / y.numel())
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
        assert abs(y.mean().item() - 1.0) < 5 * sigma / (1 - p)
    assert not torch.equal(ys[0], ys[1]), "each call must draw a fresh mask"
    y_eval = kernels.lora_linear(x, torch.zeros(k, k), [eye], [eye], [1.0], dropout_p=p, training=False)
    assert torch.equal(y_eval, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_dropout_grads_match_formula_with_same_mask(dtype: torch.dtype) -> None:
    p, rng_seed = 0.3, 1234
    case = make_case(33, 72, 40, (16, 8), dtype, trainable=(True, False))
    torch.manual_seed(rng_seed)
    got = run(kernels.lora_linear, case, dropout_p=p, training=True)
    keep = keep_mask(case["x"], p, rng_seed)
    assert 0.6 < keep.float().mean().item() < 0.8
    assert_close(got, fp64_truth(case, keep=keep, p=p), dtype, "dropout vs fp64 formula with the same mask")


def test_fused_dropout_masks_differ_per_rank_and_keep_the_rngs_in_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank starts from the same seed (and a resume restores rank 0's RNG state on all of
    them): each rank must still drop its own inputs, while the global RNG advances alike on every rank."""
    x = torch.ones(64, 96)
    eye = torch.eye(96)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    outs, states = {}, {}
    for rank in (0, 1, 2, 0):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        torch.manual_seed(7)
        y = kernels.lora_linear(x, torch.zeros(96, 96), [eye], [eye], [1.0], dropout_p=0.5, training=True)
        assert outs.setdefault(rank, y) is y or torch.equal(outs[rank], y), f"rank {rank}: not reproducible"
        states[rank] = torch.get_rng_state()
    for a, b in ((0, 1), (0, 2), (1, 2)):
        agree = ((outs[a] != 0) == (outs[b] != 0)).float().mean().item()
        assert 0.4 < agree < 0.6, f"ranks {a} and {b}: masks agree on {agree:.0%} of inputs (independent: ~50%)"
    assert all(torch.equal(states[0], s) for s in states.values()), "ranks' global RNG states diverged"


def _seed_on_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(3)
    torch.save((reference.draw_seed(), torch.get_rng_state()), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_dropout_seed_follows_a_real_process_groups_rank(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_seed_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "seed")), nprocs=2)
    (s0, state0), (s1, state1) = (torch.load(tmp_path / f"seed.{r}") for r in (0, 1))
    torch.manual_seed(3)
    assert s0 == reference.draw_seed(), "rank 0 must draw what a single process draws"
    assert s1 != s0 and torch.equal(state0, state1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fused_b_rows_match_zero_padded_b(dtype: torch.dtype) -> None:
    """``b_rows``: adapters whose B covers only some output rows (the modules of a packed projection) give the
    output and gradients of the same adapters with B zero-padded to all rows, and dB only for their own rows."""
    case = make_case(37, 64, 96, (8, 4, 8), torch.float32, trainable=(True, False, True))
    rows = [(0, 64), (64, 16), (80, 16)]
    case["lora_b"] = [b[off:off + count].detach().clone().requires_grad_(b.requires_grad)
                      for b, (off, count) in zip(case["lora_b"], rows)]
    padded = dict(case, lora_b=[torch.nn.functional.pad(b.detach(), (0, 0, off, 96 - off - count))
                                .requires_grad_(b.requires_grad) for b, (off, count) in zip(case["lora_b"], rows)])
    if dtype == torch.bfloat16:
        for c in (case, padded):
            c["weight"] = case["weight"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = run(kernels.lora_linear, case, b_rows=rows)
        want = run(kernels.lora_linear, padded)
    for i, (off, count) in enumerate(rows):  # the padded Bs' gradients at the adapters' own rows
        if want[5 + i] is not None:
            want[5 + i] = want[5 + i][off:off + count]
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=TOL[dtype], atol=TOL[dtype])
    assert_close(got[:5] + [got[5], None, got[7]], fp64_truth(padded)[:5] + [want[5], None, want[7]], dtype, "b_rows")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16-autocast"])
def test_fused_lora_model_step_matches_pytorch(monkeypatch: pytest.MonkeyPatch, autocast: bool) -> None:
    """One LoRA training step of a tiny LLaMA through the dispatched kernels equals the PyTorch path: a frozen domain
    adapter on every linear and a trainable task adapter on q, v (packed with k: ``b_rows``) and down_proj; the
    loss, the task adapter's gradients and dL/d(embedding). In the interpreter child that dispatch is Triton (the
    stacked LoRA linear, RMSNorm, SwiGLU, the packed RoPE and the LM head's cross-entropy rows): the GPU's code path
    end to end, on a CPU; in fp32, and under fp16 autocast as GPU training runs in bf16 (the interpreter's bf16 is
    broken), where the two paths round differently and agree to fp16's precision."""
    from minilora.lora import add_adapter
    from minilora.losses import lm_loss_sum
    from minilora.model import LlamaConfig, Transformer

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    add_adapter(model, "domain", r=4, alpha=8, targets="all-linear", trainable=False)
    add_adapter(model, "task", r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():  # B starts at zero: make both adapters change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    model.model.embed_tokens.weight.requires_grad_(True)  # dL/dx reaches the embedding through every layer
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    calls = []
    if kernels.triton_impl is not None:
        real = kernels.triton_impl.lora_linear
        monkeypatch.setattr(kernels.triton_impl, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for backend in (None, "torch"):
        if backend:
            monkeypatch.setenv("MINILORA_KERNELS", backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            total, count = lm_loss_sum(model.hidden_states(ids), model.lm_head, ids)
        (total / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append(((total / count).item(), grads))
    assert bool(calls) == IN_INTERPRETER_CHILD  # the child ran Triton; the parent only PyTorch
    (loss_k, grads_k), (loss_t, grads_t) = results
    assert loss_k == pytest.approx(loss_t, rel=2e-3 if autocast else 1e-5)
    assert grads_k.keys() == grads_t.keys() and len(grads_k) == 2 * 3 * 2 + 1  # task A, B x 3 modules x 2 layers
    assert not any("domain" in n for n in grads_k)
    for name in grads_k:
        assert grads_t[name].abs().sum() > 0, name
        if autocast:  # relative to the tensor's largest gradient
            err = (grads_k[name] - grads_t[name]).abs().max() / grads_t[name].abs().max()
            assert err <= 2e-2, (name, err.item())
        else:
            torch.testing.assert_close(grads_k[name], grads_t[name], atol=1e-5, rtol=1e-4, msg=name)


def test_weight_must_be_frozen() -> None:
    case = make_case(3, 40, 72, (8,))
    with pytest.raises(ValueError, match="weight must be frozen"):
        kernels.lora_linear(case["x"], case["weight"].requires_grad_(), case["lora_a"], case["lora_b"], [1.0])


def test_invalid_b_rows_raise() -> None:
    args = dict(x=torch.randn(3, 40), weight=torch.randn(72, 40), lora_a=[torch.randn(8, 40)],
                lora_b=[torch.randn(30, 8)], scaling=[1.0])
    with pytest.raises(ValueError, match=r"b_rows\[0\] = \(50, 30\) is not a row range"):
        kernels.lora_linear(**args, b_rows=[(50, 30)])
    with pytest.raises(ValueError, match=r"lora_b\[0\] must be \[20, 8\]"):
        kernels.lora_linear(**args, b_rows=[(0, 20)])
    with pytest.raises(ValueError, match="one \\(offset, rows\\) per adapter"):
        kernels.lora_linear(**args, b_rows=[(0, 30), (30, 10)])


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(3, 41)), r"x must be \[\.\.\., 40\]"),
    (dict(lora_a=[torch.randn(8, 41)]), r"lora_a\[0\] must be \[r, 40\]"),
    (dict(lora_b=[torch.randn(72, 7)]), r"lora_b\[0\] must be \[72, 8\]"),
    (dict(scaling=[1.0, 2.0]), "one lora_a, lora_b and scaling per adapter"),
    (dict(x=torch.randn(3, 40, dtype=torch.float64)), "x has dtype torch.float64"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
])
def test_invalid_inputs_raise(change: dict, message: str) -> None:
    args = dict(x=torch.randn(3, 40), weight=torch.randn(72, 40), lora_a=[torch.randn(8, 40)],
                lora_b=[torch.randn(72, 8)], scaling=[1.0])
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kernels.lora_linear(**args)


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 4)
    monkeypatch.setenv("MINILORA_KERNELS", "torch")
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv("MINILORA_KERNELS", "auto")
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv("MINILORA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MINILORA_KERNELS"):
        kernels.backend_for(x)


def test_fused_matmul_modes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """MINILORA_LORA_MATMUL=cublas (GEMM + addmm_) gives what the fused kernel gives, forward and backward, and a
    layer with no adapter never launches the fused kernel (in the child: the interpreted Triton kernel)."""
    case = make_case(65, 72, 130, (16, 8), torch.float32)
    monkeypatch.setenv("MINILORA_LORA_MATMUL", "fused")
    fused = run(kernels.lora_linear, case)
    monkeypatch.setenv("MINILORA_LORA_MATMUL", "cublas")
    assert_close(run(kernels.lora_linear, case), fused, torch.float32, "cublas mode vs fused mode")
    if kernels.backend_for(case["x"]) == "triton":
        monkeypatch.setenv("MINILORA_LORA_MATMUL", "auto")
        impl = kernels.triton_impl

        def no_kernel(*args, **kwargs):
            raise AssertionError("a linear without adapters launched the fused kernel")

        monkeypatch.setattr(impl, "fused_matmul", no_kernel)
        bare = make_case(33, 72, 40, (), torch.float32)
        assert_close(run(kernels.lora_linear, bare), fp64_truth(bare), torch.float32, "no adapter vs fp64")


@pytest.mark.skipif(kernels.triton_impl is None, reason="triton is not installed")
def test_matmul_choice_times_once_and_prefers_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    impl = kernels.triton_impl
    monkeypatch.setattr(impl, "_CHOICES", {})
    calls = []

    def bench(ms: dict):
        def timed(call):
            calls.append(call())
            return [ms[calls[-1]], 0.0, 0.0]
        return timed

    cands = {"fused": lambda: "fused", "cublas": lambda: "cublas"}
    assert impl.choose(("a",), cands, bench({"fused": 1.0, "cublas": 0.97})) == "cublas"  # > 2% faster
    assert impl.choose(("b",), cands, bench({"fused": 1.0, "cublas": 0.99})) == "fused"  # within the margin
    assert impl.choose(("c",), cands, bench({"fused": 0.5, "cublas": 1.0})) == "fused"
    assert len(calls) == 6
    assert impl.choose(("a",), cands, bench({"fused": 0.1, "cublas": 9.0})) == "cublas"  # cached: not timed again
    assert len(calls) == 6
    x, w, s = torch.empty(300, 64), torch.empty(96, 64).t(), torch.empty(300, 16)
    key = impl._choice_key(x, w, s)
    assert key == ("cpu", "float32", 512, 96, 64, 16, "row", "col")
    impl._CHOICES[key] = {"choice": "fused", "ms": {"fused": 0.25, "cublas": 0.5}}
    assert impl.choices()[-1] == {"device": "cpu", "dtype": "float32", "m_bucket": 512, "n": 96, "k": 64, "r": 16,
                                  "x_layout": "row", "w_layout": "col", "choice": "fused", "fused_ms": 0.25,
                                  "cublas_ms": 0.5}


@pytest.mark.skipif(kernels.triton_impl is None, reason="triton is not installed")
def test_autotuner_times_without_a_flush_buffer() -> None:
    """The fused kernel's autotuner benchmarks with ``event_bench`` (see test_cuda_auto_choice_... on a GPU)."""
    impl = kernels.triton_impl
    assert impl._fused_lora_matmul_kernel.do_bench is impl.event_bench
    # a config tuned for one variant is not reused for another (registers and shared memory differ)
    assert {"HAS_LORA", "DROPOUT", "BLOCK_R"} <= set(impl._fused_lora_matmul_kernel.keys)


@pytest.mark.skipif(kernels.triton_impl is None, reason="triton is not installed")
def test_matmul_mode_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINILORA_LORA_MATMUL", "cutlass")
    with pytest.raises(ValueError, match="MINILORA_LORA_MATMUL='cutlass': expected one of"):
        kernels.triton_impl.matmul_mode()


@pytest.mark.skipif(kernels.triton_impl is None or kernels.triton_impl.INTERPRET, reason="needs compiled triton")
def test_autotune_prunes_to_device_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    impl = kernels.triton_impl
    configs = impl._fused_lora_matmul_kernel.configs
    monkeypatch.setattr(impl, "_smem_limit", lambda index: 101376)  # an RTX 30/40-class GPU
    monkeypatch.setattr(impl, "AUTOTUNE", True)
    x = torch.empty(1, dtype=torch.bfloat16)
    kept = impl._prune_for_device(configs, {"X": x}, BLOCK_R=32, PRECISION="ieee")
    assert 0 < len(kept) < len(configs)
    assert all(c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2 <= 101376
               for c in kept)
    # fp32 with IEEE dots on an H200, rank block 64: 128x256x32 needs 3 x 384 x 64 x 4 = 288 KiB (it failed there
    # with MINILORA_TRITON_AUTOTUNE=0), so it is pruned; the 16-bit estimate would have kept it
    monkeypatch.setattr(impl, "_smem_limit", lambda index: 232448)
    x32 = torch.empty(1, dtype=torch.float32)
    kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
            for c in impl._prune_for_device(configs, {"X": x32}, BLOCK_R=64, PRECISION="ieee")}
    assert kept and (128, 256, 32) not in kept
    monkeypatch.setattr(impl, "AUTOTUNE", False)
    assert len(impl._prune_for_device(configs, {"X": x}, BLOCK_R=32, PRECISION="ieee")) == 1


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the child's parent")
@pytest.mark.skipif(kernels.triton_impl is None, reason="triton is not installed")
def test_triton_interpreter_suite() -> None:
    """Run every ``test_fused_*`` test in a child with the Triton kernels under the interpreter."""
    run_interpreter_child(Path(__file__), "fused")


CUDA_SHAPES = [
    (1, 4096, 4096, (16, 8), (), False),
    (7, 130, 72, (3, 5), (), False),
    (65, 40, 130, (), (), False),
    (300, 1000, 3000, (48, 40), (), False),
    (257, 4096, 1100, (16, 8), (2,), True),
    (2048, 4096, 4096, (16, 8), (), False),
]


@pytest.mark.skipif(not HAS_CUDA_TRITON, reason="needs CUDA and triton (not interpreted)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"m{s[0]}k{s[1]}n{s[2]}r{'-'.join(map(str, s[3])) or 0}"
                         f"{'-lead' if s[4] else ''}{'-T' if s[5] else ''}")
def test_cuda_triton_matches_reference(shape: tuple, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINILORA_LORA_MATMUL", "fused")  # the kernel itself, not what auto would pick
    m, k, n, ranks, lead, transposed = shape
    case = make_case(m, k, n, ranks, dtype, lead=lead, transposed=transposed, device="cuda")
    got = run(kernels.triton_impl.lora_linear, case)
    assert_close(got, fp64_truth(case), dtype, "triton vs fp64 formula")
    assert_close(got, run(reference.lora_linear, case), dtype, "triton vs cuBLAS reference")


@pytest.mark.skipif(not HAS_CUDA_TRITON, reason="needs CUDA and triton (not interpreted)")
def test_cuda_dropout_and_autocast() -> None:
    p, rng_seed = 0.2, 77
    case = make_case(300, 1000, 520, (16, 8), torch.float32, trainable=(True, False), device="cuda")
    case["weight"] = case["weight"].bfloat16()
    torch.manual_seed(rng_seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(kernels.triton_impl.lora_linear, case, dropout_p=p, training=True)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    keep = keep_mask(case["x"], p, rng_seed)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert_close(got, fp64_truth(case, keep=keep, p=p), torch.bfloat16, "cuda dropout + autocast vs fp64")


@pytest.mark.skipif(not HAS_CUDA_TRITON, reason="needs CUDA and triton (not interpreted)")
def test_cuda_auto_choice_is_correct_and_adds_no_peak_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` times the fused kernel against cuBLAS on the first call of a shape (and the autotuner its configs):
    the result matches the reference either way, both choices (forward and dX) are recorded, and that first call
    peaks no higher than a later one plus 32 MB (triton.testing.do_bench would add its 256 MB flush buffer)."""
    impl = kernels.triton_impl
    monkeypatch.setenv("MINILORA_LORA_MATMUL", "auto")
    monkeypatch.setattr(impl, "_CHOICES", {})
    case = make_case(1536, 2048, 3072, (16,), torch.bfloat16, device="cuda", seed=5)

    def peak_mb() -> tuple[list, float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run(impl.lora_linear, case)
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20

    first, first_mb = peak_mb()
    again, again_mb = peak_mb()
    assert_close(first, run(reference.lora_linear, case), torch.bfloat16, "auto vs cuBLAS reference")
    assert_close(again, first, torch.bfloat16, "second call vs first")
    picked = impl.choices()
    assert len(picked) == 2 and all(c["fused_ms"] > 0 and c["cublas_ms"] > 0 for c in picked), picked
    assert first_mb <= again_mb + 32, f"first call peaked {first_mb:.0f} MB, later ones {again_mb:.0f} MB"


def test_importing_the_triton_submodule_keeps_the_dispatch_function():
    """``kernels.lora_linear`` is both the dispatch function and the Triton submodule's name, and the submodule is
    imported lazily: whichever code imports it first, the package attribute must stay the function."""
    pytest.importorskip("triton")
    code = ("import sys, kernels; f = kernels.lora_linear; assert 'triton' not in sys.modules\n"
            "from kernels.lora_linear import DEFAULT_CONFIG\n"
            "import kernels.lora_linear; m = sys.modules['kernels.lora_linear']\n"
            "assert kernels.lora_linear is f and m.__name__ == 'kernels.lora_linear' and kernels.triton_impl is m\n"
            "from kernels import lora_linear, triton_impl\n"
            "assert lora_linear is f and triton_impl is m and 'triton' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
