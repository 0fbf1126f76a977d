"""Benchmark the fused stacked-LoRA linear against a bare GEMM, a PEFT-style layer and an unsloth-style layer.

Layers (two adapters, r = 16 + 8 by default, everything in one dtype, adapters trainable for fwd+bwd):
  bare         y = x W^T                                             (the floor: cuBLAS / oneDNN)
  peft         y = base(x); y = y + B_i(A_i(x)) * s_i per adapter    (separate linears, [M, N] temporaries)
  addmm        kernels.reference: y = x W^T; y.addmm_(x A^T, B^T)    (unsloth-style, adapters concatenated)
  ours         kernels.lora_linear as training runs it (on CUDA MINILORA_LORA_MATMUL=auto: per shape the faster
               of the fused Triton kernel and the addmm path, timed on first use; on CPU the addmm path)
  fused        kernels.lora_linear with MINILORA_LORA_MATMUL=fused: the fused Triton kernel always
  fused-bare   the fused kernel with no adapter, forward only: Triton's GEMM against cuBLAS's
               (these two on CUDA, and on CPU under TRITON_INTERPRET=1 for the tests)
GPU targets (checked on every shape): fused fwd <= 1.08x bare, >= 1.25x faster than peft; fwd+bwd >= 1.2x faster.

``--sweep`` (CUDA; CPU under TRITON_INTERPRET=1 for the tests) times the fused kernel's forward with the adapters
at each candidate config (the autotuner's, ``SWEEP_EXTRA`` and what fits the device's shared memory), for W
K-contiguous (the forward's ``weight.t()``) and N-contiguous (the backward's ``weight``), against cuBLAS's bare
GEMM and cuBLAS + ``addmm_`` in the same layout: which config, if any, brings the fused GEMM to cuBLAS's speed
(default M 2048, K = N = 4096; ``--sweep-only`` skips the other sections).

``--rowwise`` (opt-in; ``--rowwise-only`` skips the LoRA layers) also times RMSNorm (weight frozen as in LoRA
training, and trained: ``rms_norm+dw``; with the residual add before it fused in: ``add_rms_norm``), SwiGLU (on a
packed gate|up projection: ``swiglu_packed``, where ``triton-halves`` is the kernel on the two halves, whose
gradients autograd joins with a ``cat``), the frozen LM head's linear + cross-entropy (``lm_loss``,
vocabulary 32,000: the two GEMMs with the Triton cross-entropy rows between them, or PyTorch's ops) and RoPE on a
packed q|k|v projection (``qkv_rope``, heads of 128; width = the packed row), forward and forward+backward, at
``--rowwise-dims`` (default
LLaMA-7B: 8*512 tokens, hidden 4096, intermediate 11008): ``triton`` (kernels.rowwise, CUDA only) against
``torch`` (minilora.ops' autograd functions as they run: on a bf16 CPU tensor that is kernels/cpu.c, unless
MINILORA_CPU_KERNELS=off; tools/bench_cpu_kernels.py compares those two) and ``ref`` (the plain compositions
ops.*_ref). GB/s counts the minimum traffic (each input read once, each output written once).
On CUDA every time (LoRA layers and row-wise ops) is GPU time per call: events around each call, L2 flushed before
it, calls queued behind a sleep kernel so that the host's launch and Python overhead does not count (a call that
waits for the GPU itself, as lm_loss's check of its targets does, shows its launch gaps and prints a warning).
On CPU it is wall time per call.
Usage: ``PYTHONPATH=. python tools/bench_kernels.py [--device cuda] [--rowwise] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from minilora import losses, ops  # noqa: E402
from minilora.cli import write_json_atomic  # noqa: E402

try:
    from kernels import rowwise  # noqa: E402
except ImportError:
    rowwise = None

GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N) of LLaMA-7B: attention, up/gate, down
GPU_TOKENS = [2048, 8192]
CPU_SHAPES = [(1024, 1024), (1024, 2816)]
CPU_TOKENS = [512]
TARGETS = {"fwd_vs_bare_max": 1.08, "fwd_speedup_vs_peft_min": 1.25, "fwdbwd_speedup_vs_peft_min": 1.2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROWWISE_GPU_DIMS = (8 * 512, 4096, 11008)  # (tokens, hidden, intermediate) of LLaMA-7B
ROWWISE_CPU_DIMS = (512, 1024, 2816)
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H200: 60 MB)
LM_VOCAB = 32000  # the LM head + cross-entropy row: LLaMA's vocabulary
ROPE_HEAD_DIM = 128  # the RoPE row: LLaMA's head size
# --sweep's configs beyond the autotuner's (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages): deeper K tiles
# (longer contiguous runs of a K-contiguous W), more stages, other launch groupings
SWEEP_EXTRA = [(128, 256, 128, 8, 8, 2), (128, 128, 128, 8, 8, 3), (256, 128, 128, 8, 8, 2),
               (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 5), (128, 256, 64, 4, 8, 3),
               (128, 256, 64, 16, 8, 3), (64, 256, 64, 8, 4, 4)]
SWEEP_SHAPE = (2048, 4096, 4096)  # (M, K, N): LLaMA-7B's attention projections at 8 x 256 tokens


def make_layers(k: int, n: int, ranks: list[int], dtype: torch.dtype, device: torch.device
                ) -> tuple[dict[str, Callable[[Tensor], Tensor]], list[Tensor]]:
    """The layer variants as functions of x, sharing one frozen W and one set of trainable adapters."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype)
    a = [(torch.randn(r, k, generator=gen) * k ** -0.5).to(device, dtype).requires_grad_() for r in ranks]
    b = [(torch.randn(n, r, generator=gen) * r ** -0.5).to(device, dtype).requires_grad_() for r in ranks]
    s = [2.0 for _ in ranks]

    def peft(x: Tensor) -> Tensor:
        y = F.linear(x, w)
        for ai, bi, si in zip(a, b, s):
            y = y + F.linear(F.linear(x, ai), bi) * si
        return y

    layers = {
        "bare": lambda x: F.linear(x, w),
        "peft": peft,
        "addmm": lambda x: reference.lora_linear(x, w, a, b, s),
        "ours": lambda x: kernels.lora_linear(x, w, a, b, s),
    }
    if kernels.triton_impl is not None and (device.type == "cuda" or kernels.triton_impl.INTERPRET):
        def fused(x: Tensor) -> Tensor:  # under TRITON_INTERPRET=1 on CPU too (for the tests)
            with _env("MINILORA_LORA_MATMUL", "fused"):
                return kernels.triton_impl.lora_linear(x, w, a, b, s)

        layers["fused"] = fused
        layers["fused-bare"] = lambda x: kernels.triton_impl.fused_matmul(x, w.t(), None, None)
    return layers, a + b


def timer(warmup: int, iters: int) -> Callable[[Callable[[], object]], float]:
    """Median wall milliseconds of a call on the CPU (perf_counter); warmup calls first. GPU: ``gpu_timer``."""
    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return measure


def sleep_cycles(host_ms_per_call: float, iters: int) -> int:
    """GPU clock cycles to sleep while ``iters`` calls are queued: 1.5x their host time at 2 GHz (at least 25 ms,
    at most 2 s), so that the GPU starts on the first call only once all are queued."""
    return int(min(4e9, max(5e7, 1.5 * iters * host_ms_per_call * 2e6)))


def gpu_timer(device: torch.device, warmup: int, iters: int) -> Callable[[Callable[[], object]], float]:
    """Median GPU milliseconds of a call: CUDA events around each call, a memset over L2_FLUSH_BYTES before each,
    and all calls queued behind a sleep kernel (as long as the warm-up calls' host time says queuing takes) so the
    CPU's launch overhead stays out of the events."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)

    def measure(fn: Callable[[], object]) -> float:
        host = []
        for _ in range(max(warmup, 1)):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)  # launching only (unless fn waits for the GPU)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        torch.cuda.synchronize(device)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(sleep_cycles(min(host), iters))
        slept = torch.cuda.Event()
        slept.record()
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        if slept.query():
            print("warning: the GPU caught up with the CPU while the calls were queued; times may include launch gaps",
                  file=sys.stderr)
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    return measure


@contextlib.contextmanager
def _env(name: str, value: str):
    """``name=value`` in the environment for the calls inside, the previous value afterwards. For the kernel
    switches (MINILORA_KERNELS, MINILORA_LORA_MATMUL), read when an op dispatches: backward passes only use what
    the forward saved."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


def _lm_loss(kernels_mode: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """minilora's chunked LM head + cross-entropy (summed) under ``MINILORA_KERNELS=kernels_mode``: ``torch`` is
    its PyTorch path between the two GEMMs of each chunk, ``triton`` its Triton cross-entropy rows."""
    def fn(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
        with _env("MINILORA_KERNELS", kernels_mode):
            return losses.LinearCrossEntropy.apply(h, w, y, h.dtype)
    return fn


def _lm_loss_ref(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy((h @ w.T).float(), y, reduction="sum")


def _qkv_rope_torch(qkv: Tensor, cos: Tensor, sin: Tensor, H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """minilora.ops.qkv_rope without Triton (on a bf16 CPU tensor: kernels/cpu.c)."""
    with _env("MINILORA_KERNELS", "torch"):
        return ops.qkv_rope(qkv, cos, sin, H, Hkv)


def rowwise_impls(device: torch.device) -> dict[str, dict[str, Callable[..., Tensor]]]:
    """{op: {impl: fn}}: RMSNorm, SwiGLU and the LM head's linear + cross-entropy as the kernels.rowwise Triton
    functions (CUDA only), minilora's PyTorch autograd functions and the plain reference compositions."""
    eps = 1e-5

    def add_rms_norm_torch(x: Tensor, a: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:  # ops.add_rms_norm, no Triton
        return ops.add_rms_norm_untriton(x, a, w, eps, ops._RMSNorm.apply)

    def add_rms_norm_ref(x: Tensor, a: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        h = x + a
        return h, ops.rms_norm_ref(h, w, eps)

    impls = {
        "rms_norm": {"torch": lambda x, w: ops._RMSNorm.apply(x, w, eps),
                     "ref": lambda x, w: ops.rms_norm_ref(x, w, eps)},
        "add_rms_norm": {"torch": add_rms_norm_torch, "ref": add_rms_norm_ref},
        "swiglu": {"torch": ops._SwiGLU.apply, "ref": ops.swiglu_ref},
        "swiglu_packed": {"torch": lambda t: ops._SwiGLU.apply(t, None),
                          "ref": lambda t: ops.swiglu_ref(*t.chunk(2, dim=-1))},
        "lm_loss": {"torch": _lm_loss("torch"), "ref": _lm_loss_ref},
        "qkv_rope": {"torch": _qkv_rope_torch, "ref": ops.qkv_rope_ref},
    }
    if rowwise is not None and (device.type == "cuda" or rowwise.INTERPRET):
        impls["rms_norm"]["triton"] = lambda x, w: rowwise.rms_norm(x, w, eps)
        impls["add_rms_norm"]["triton"] = lambda x, a, w: rowwise.add_rms_norm(x, a, w, eps)
        impls["swiglu"]["triton"] = rowwise.swiglu
        impls["swiglu_packed"]["triton"] = rowwise.swiglu_packed
        # before the packed kernel: SwiGLU on the two halves, whose gradients autograd joins with a cat
        impls["swiglu_packed"]["triton-halves"] = lambda t: rowwise.swiglu(*t.chunk(2, dim=-1))
        impls["lm_loss"]["triton"] = _lm_loss("triton")
        impls["qkv_rope"]["triton"] = rowwise.qkv_rope
    return impls


def bench_rowwise(tokens: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device,
                  measure: Callable[[Callable[[], object]], float]) -> list[dict]:
    """Forward and forward+backward times of every RMSNorm and SwiGLU implementation, errors against ``torch``."""
    gen = torch.Generator().manual_seed(2)

    def rand(*shape: int, scale: float = 1.0, offset: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale + offset).to(device, dtype)

    size = torch.empty(0, dtype=dtype).element_size()
    x, gx, w = rand(tokens, hidden), rand(tokens, hidden), rand(hidden, scale=0.1, offset=1.0)
    gate, up, gh = rand(tokens, inter, scale=2.0), rand(tokens, inter), rand(tokens, inter)
    head, targets = rand(LM_VOCAB, hidden, scale=hidden ** -0.5), torch.randint(0, LM_VOCAB, (tokens,), generator=gen)
    logits_bytes = tokens * LM_VOCAB * size
    seq = min(tokens, 512)  # RoPE on a packed q|k|v of LLaMA-7B's layout: heads of 128, as many k/v as q heads
    heads, n_seq = max(1, hidden // ROPE_HEAD_DIM), max(1, tokens // seq)
    qkv = rand(n_seq, seq, 3 * heads * ROPE_HEAD_DIM)
    inv = 1.0 / 10000 ** (torch.arange(0, ROPE_HEAD_DIM, 2, dtype=torch.float32) / ROPE_HEAD_DIM)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv).repeat(1, 2)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    gqkv = tuple(rand(n_seq, heads, seq, ROPE_HEAD_DIM) for _ in range(3))
    qkv_bytes = qkv.numel() * size
    cases = {  # op -> (impl group, inputs, which inputs are trained, output gradient, minimum bytes fwd / fwd+bwd)
        "rms_norm": ("rms_norm", (x, w), (True, False), gx, (2 * tokens * hidden * size, 5 * tokens * hidden * size)),
        "rms_norm+dw": ("rms_norm", (x, w), (True, True), gx, (2 * tokens * hidden * size, 5 * tokens * hidden * size)),
        # the residual add fused in: h = x + a and norm(h), gradients for both (the residual stream's and the norm's)
        "add_rms_norm": ("add_rms_norm", (x, gx, w), (True, True, False), (gx, x),
                         (4 * tokens * hidden * size, 8 * tokens * hidden * size)),
        "swiglu": ("swiglu", (gate, up), (True, True), gh, (3 * tokens * inter * size, 8 * tokens * inter * size)),
        # a packed gate|up projection's output [tokens, 2 * inter], whose gradient is one tensor too
        "swiglu_packed": ("swiglu_packed", (torch.cat([gate, up], dim=-1),), (True,), gh,
                          (3 * tokens * inter * size, 8 * tokens * inter * size)),
        # two GEMMs and the rows between them; "GB/s" counts the logits written and read once each way
        "lm_loss": ("lm_loss", (x, head, targets.to(device)), (True, False, False), torch.ones((), device=device),
                    (2 * logits_bytes, 4 * logits_bytes)),
        "qkv_rope": ("qkv_rope", (qkv, cos, sin), (True, False, False), gqkv, (2 * qkv_bytes, 4 * qkv_bytes)),
    }
    impls = rowwise_impls(device)
    rows = []
    for op, (group, inputs, trained, grad, (bytes_fwd, bytes_fwdbwd)) in cases.items():
        leaves = [t.detach().clone().requires_grad_(flag) if t.is_floating_point() else t
                  for t, flag in zip(inputs, trained)]
        want = None
        for impl, fn0 in impls[group].items():
            fn = (lambda *a, fn0=fn0: fn0(*a, heads, heads)) if op == "qkv_rope" else fn0

            def forward() -> None:
                with torch.no_grad():
                    fn(*inputs)

            def forward_backward() -> None:
                for t in leaves:
                    t.grad = None
                out = fn(*leaves)
                torch.autograd.backward(out if isinstance(out, tuple) else (out,),
                                        grad if isinstance(grad, tuple) else (grad,))

            forward_backward()
            out = fn(*inputs)
            flat = torch.cat([o.float().reshape(-1) for o in out]) if isinstance(out, tuple) else out.float()
            got = [flat] + [t.grad.float() for t in leaves if t.requires_grad]
            if want is None:
                want = got  # the first implementation, "torch"
            err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want))
            fwd_ms, fwdbwd_ms = measure(forward), measure(forward_backward)
            width = LM_VOCAB if op == "lm_loss" else inputs[0].shape[-1]
            rows.append({"op": op, "impl": impl, "tokens": tokens, "width": width,
                         "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
                         "fwd_gbps": bytes_fwd / fwd_ms / 1e6, "fwdbwd_gbps": bytes_fwdbwd / fwdbwd_ms / 1e6,
                         "max_rel_err_vs_torch": err})
            del got
    return rows


def rowwise_table(rows: list[dict]) -> str:
    """Markdown table of the row-wise ops: times, effective bandwidth and speedup over ``torch``."""
    torch_row = {r["op"]: r for r in rows if r["impl"] == "torch"}
    lines = ["| op | tokens | width | impl | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | fwd x faster than torch "
             "| fwd+bwd x faster than torch | rel err vs torch |", "|" + "---|" * 11]
    for r in rows:
        t = torch_row[r["op"]]
        lines.append(f"| {r['op']} | {r['tokens']} | {r['width']} | {r['impl']} | {r['fwd_ms']:.4f} "
                     f"| {r['fwdbwd_ms']:.4f} | {r['fwd_gbps']:.0f} | {r['fwdbwd_gbps']:.0f} "
                     f"| {t['fwd_ms'] / r['fwd_ms']:.2f} | {t['fwdbwd_ms'] / r['fwdbwd_ms']:.2f} "
                     f"| {r['max_rel_err_vs_torch']:.1e} |")
    return "\n".join(lines)


def rowwise_speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{op: {fwd, fwdbwd}}: how many times faster ``triton`` is than ``torch`` (empty without triton)."""
    by = {(r["op"], r["impl"]): r for r in rows}
    return {op: {k: by[(op, "torch")][f"{k}_ms"] / by[(op, "triton")][f"{k}_ms"] for k in ("fwd", "fwdbwd")}
            for op, impl in by if impl == "triton"}


def bench_shape(m: int, k: int, n: int, ranks: list[int], dtype: torch.dtype, device: torch.device,
                measure: Callable[[Callable[[], object]], float]) -> list[dict]:
    """Forward and forward+backward times of every layer at one (M, K, N)."""
    layers, params = make_layers(k, n, ranks, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    gy = torch.randn(m, n, generator=gen).to(device, dtype)
    x_train = x.clone().requires_grad_()
    with torch.no_grad():
        want = layers["addmm"](x).float()
    rows = []
    for name, layer in layers.items():
        def forward() -> None:
            with torch.no_grad():
                layer(x)

        def forward_backward() -> None:
            for t in (x_train, *params):
                t.grad = None
            layer(x_train).backward(gy)

        with torch.no_grad():
            got = layer(x).float()
        err = None if name.endswith("bare") else ((got - want).abs().max() / want.abs().max()).item()
        rows.append({"m": m, "k": k, "n": n, "impl": name, "fwd_ms": measure(forward),
                     "fwdbwd_ms": None if name == "fused-bare" else measure(forward_backward),
                     "max_rel_err_vs_addmm": err})
        del got
    return rows


def sweep_configs(device: torch.device, itemsize: int, block_r: int) -> list[tuple]:
    """The sweep's configs that fit the device (under the interpreter: the interpreter's and the default one)."""
    lora = kernels.triton_impl
    if lora.INTERPRET:
        return [lora.INTERPRET_CONFIG, lora.DEFAULT_CONFIG]
    candidates = list(dict.fromkeys(lora.TUNED_CONFIGS + SWEEP_EXTRA))
    return lora.prune_configs(candidates, itemsize, block_r, lora._smem_limit(device.index or 0))


def bench_sweep(m: int, k: int, n: int, ranks: list[int], dtype: torch.dtype, device: torch.device,
                measure: Callable[[Callable[[], object]], float], rows: list[dict],
                on_row: Callable[[], None] = lambda: None) -> list[dict]:
    """Forward times of the fused kernel at each config, both W layouts, against cuBLAS (bare, + addmm_),
    appended to ``rows`` (``on_row`` after each, so that a run cut short keeps them)."""
    lora = kernels.triton_impl
    gen = torch.Generator().manual_seed(0)
    r = sum(ranks)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    s = (torch.randn(m, r, generator=gen) * 0.1).to(device, dtype)  # the shrink x A^T, scaled
    l = (torch.randn(r, n, generator=gen) * r ** -0.5).to(device, dtype)  # B^T
    for layout, w in (("K-contiguous", weight.t()), ("N-contiguous", weight.t().contiguous())):
        want = (x.double() @ w.double() + s.double() @ l.double()).float()
        bare_ms = measure(lambda: torch.mm(x, w))
        addmm_ms = measure(lambda: lora._cublas_matmul(x, w, s, l))
        for cfg in sweep_configs(device, x.element_size(), lora.rank_block(r)):
            row = {"m": m, "k": k, "n": n, "r": r, "w_layout": layout, "config": list(cfg), "cublas_ms": bare_ms,
                   "cublas_addmm_ms": addmm_ms}
            try:
                got = lora.fused_matmul(x, w, s, l, config=cfg).float()
                row["max_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
                row["ms"] = measure(lambda c=cfg: lora.fused_matmul(x, w, s, l, config=c))
                row.update(vs_cublas=row["ms"] / bare_ms, vs_cublas_addmm=row["ms"] / addmm_ms)
            except Exception as exc:  # noqa: BLE001 (a config the compiler rejects is a result too)
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            on_row()
    return rows


def sweep_table(rows: list[dict]) -> str:
    """Per shape and W layout, the configs fastest first, against cuBLAS."""
    lines = ["| M | K | N | W | config (BM, BN, BK, group, warps, stages) | fused fwd ms | / cuBLAS | "
             "/ cuBLAS + addmm_ | rel err |", "|" + "---|" * 9]
    key = lambda r: (r["m"], r["k"], r["n"], r["w_layout"], r.get("ms", float("inf")))  # noqa: E731
    for r in sorted(rows, key=key):
        cfg = "x".join(map(str, r["config"][:3])) + " g{} w{} s{}".format(*r["config"][3:])
        if "error" in r:
            lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['w_layout']} | {cfg} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['w_layout']} | {cfg} | {r['ms']:.4f} "
                     f"| {r['vs_cublas']:.3f} | {r['vs_cublas_addmm']:.3f} | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    """Per shape: ours against bare and peft, with pass/fail for each GPU target."""
    out = []
    for key in sorted({(r["m"], r["k"], r["n"]) for r in rows}):
        by = {r["impl"]: r for r in rows if (r["m"], r["k"], r["n"]) == key}
        ours, bare, peft = by["ours"], by["bare"], by["peft"]
        fwd_vs_bare = ours["fwd_ms"] / bare["fwd_ms"]
        fwd_speedup = peft["fwd_ms"] / ours["fwd_ms"]
        fwdbwd_speedup = peft["fwdbwd_ms"] / ours["fwdbwd_ms"]
        out.append({
            "m": key[0], "k": key[1], "n": key[2],
            "fwd_vs_bare": fwd_vs_bare, "fwd_speedup_vs_peft": fwd_speedup, "fwdbwd_speedup_vs_peft": fwdbwd_speedup,
            "pass_fwd_vs_bare": fwd_vs_bare <= TARGETS["fwd_vs_bare_max"],
            "pass_fwd_vs_peft": fwd_speedup >= TARGETS["fwd_speedup_vs_peft_min"],
            "pass_fwdbwd_vs_peft": fwdbwd_speedup >= TARGETS["fwdbwd_speedup_vs_peft_min"],
        })
    return out


def table(rows: list[dict], targets: list[dict]) -> str:
    """Markdown tables: times, speedup over peft and cost over bare; then the targets."""
    by_shape = {(r["m"], r["k"], r["n"], r["impl"]): r for r in rows}
    lines = ["| M | K | N | impl | fwd ms | fwd+bwd ms | fwd x faster than peft | fwd+bwd x faster than peft "
             "| fwd / bare | rel err vs addmm |", "|" + "---|" * 10]
    for r in rows:
        peft, bare = by_shape[(r["m"], r["k"], r["n"], "peft")], by_shape[(r["m"], r["k"], r["n"], "bare")]
        err = "-" if r["max_rel_err_vs_addmm"] is None else f"{r['max_rel_err_vs_addmm']:.1e}"
        fb = r["fwdbwd_ms"]
        fb_ms, fb_x = ("-", "-") if fb is None else (f"{fb:.3f}", f"{peft['fwdbwd_ms'] / fb:.2f}")
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['fwd_ms']:.3f} | {fb_ms} "
                     f"| {peft['fwd_ms'] / r['fwd_ms']:.2f} | {fb_x} "
                     f"| {r['fwd_ms'] / bare['fwd_ms']:.3f} | {err} |")
    lines += ["", f"Targets for ours (GPU): fwd/bare <= {TARGETS['fwd_vs_bare_max']}, fwd >= "
              f"{TARGETS['fwd_speedup_vs_peft_min']}x and fwd+bwd >= {TARGETS['fwdbwd_speedup_vs_peft_min']}x "
              "faster than peft", "", "| M | K | N | fwd / bare | fwd vs peft | fwd+bwd vs peft |",
              "|---|---|---|---|---|---|"]
    mark = {True: "PASS", False: "FAIL"}
    for t in targets:
        lines.append(f"| {t['m']} | {t['k']} | {t['n']} | {t['fwd_vs_bare']:.3f} {mark[t['pass_fwd_vs_bare']]} "
                     f"| {t['fwd_speedup_vs_peft']:.2f}x {mark[t['pass_fwd_vs_peft']]} "
                     f"| {t['fwdbwd_speedup_vs_peft']:.2f}x {mark[t['pass_fwdbwd_vs_peft']]} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, nargs="+", help="M values (default: 2048 8192 on GPU, 512 on CPU)")
    p.add_argument("--shapes", nargs="+", help="KxN shapes (default: LLaMA-7B's on GPU, 1024x1024 1024x2816 on CPU)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 8], help="adapter ranks (default 16 8)")
    p.add_argument("--warmup", type=int, default=None, help="warmup calls per timing (default 10 GPU, 5 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per timing (default 50 GPU, 20 CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", type=Path, help="write all numbers, device and versions here")
    p.add_argument("--rowwise", action="store_true",
                   help="also time RMSNorm and SwiGLU: kernels.rowwise (Triton, CUDA) against minilora.ops' functions")
    p.add_argument("--rowwise-only", action="store_true", help="--rowwise without the LoRA layers")
    p.add_argument("--rowwise-dims", type=int, nargs=3, metavar=("TOKENS", "HIDDEN", "INTERMEDIATE"),
                   help="row-wise op sizes (default: 4096 4096 11008 on GPU, 512 1024 2816 on CPU)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the fused kernel's forward at every candidate config, both W layouts, against "
                        "cuBLAS (M 2048, K = N = 4096, or the first --tokens and --shapes)")
    p.add_argument("--sweep-only", action="store_true", help="--sweep without the other sections")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else (
        GPU_SHAPES if gpu else CPU_SHAPES)
    tokens = args.tokens or (GPU_TOKENS if gpu else CPU_TOKENS)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 5)
    iters = args.iters or (50 if gpu else 20)
    # GPU: kernel times (gpu_timer), without the host's launch and Python overhead, which timer() would count
    measure = gpu_timer(device, warmup, iters) if gpu else timer(warmup, iters)
    dtype = DTYPES[args.dtype]
    rows: list[dict] = []
    rowwise_rows: list[dict] | None = None
    sweep_rows: list[dict] | None = None
    if (args.sweep or args.sweep_only) and (kernels.triton_impl is None or not (gpu or kernels.triton_impl.INTERPRET)):
        print("bench_kernels.py: --sweep needs the Triton kernels on CUDA (or TRITON_INTERPRET=1)", file=sys.stderr)
        raise SystemExit(2)
    lora_section = not (args.rowwise_only or args.sweep_only)

    def summarize(complete: bool) -> dict:
        targets = check_targets(rows)
        result = {
            "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            "triton": None if kernels.triton_impl is None else kernels.triton_impl.triton.__version__,
            "ours_backend": kernels.backend_for(torch.empty(0, device=device)),
            "dtype": args.dtype, "ranks": args.ranks, "targets": TARGETS,
            "rows": rows, "checks": targets,
            "lora_matmul_choices": kernels.triton_impl.choices() if gpu and kernels.triton_impl is not None else [],
            "all_targets_pass": all(t[f] for t in targets for f in ("pass_fwd_vs_bare", "pass_fwd_vs_peft",
                                                                    "pass_fwdbwd_vs_peft")),
            "complete": complete,
        }
        result["table_markdown"] = (
            f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {args.dtype}, ranks "
            f"{args.ranks}, ours = {result['ours_backend']}{'' if gpu else ' (targets are for the GPU)'}"
            f"{'' if complete else ' (interrupted: the shapes done so far)'}\n\n{table(rows, targets)}")
        if not lora_section:
            result["all_targets_pass"] = None
            result["table_markdown"] = f"{result['device']}, torch {result['torch']}, triton {result['triton']}"
        if rowwise_rows is not None:
            result["rowwise_rows"] = rowwise_rows
            result["rowwise_speedups"] = rowwise_speedups(rowwise_rows)
            timing = "GPU time per call, L2 flushed" if gpu else "wall time per call"
            result["table_markdown"] += (f"\n\nRMSNorm, SwiGLU, RoPE (qkv_rope) and the LM head + cross-entropy "
                                         f"(lm_loss, vocabulary {LM_VOCAB}; width = vocabulary) ({args.dtype}, "
                                         f"{timing}): kernels.rowwise (triton) vs minilora's PyTorch functions "
                                         f"(torch) and the plain compositions (ref)\n\n"
                                         f"{rowwise_table(rowwise_rows)}")
        if sweep_rows is not None:
            result["sweep_rows"] = sweep_rows
            result["table_markdown"] += (f"\n\nThe fused kernel's forward ({args.dtype}, rank {sum(args.ranks)}) at "
                                         "each config against cuBLAS in the same W layout, fastest first\n\n"
                                         f"{sweep_table(sweep_rows)}")
        if args.json:  # after every shape too: a run stopped by a timeout keeps what it measured
            write_json_atomic(args.json, result)
        return result

    for k, n in (shapes if lora_section else []):
        for m in tokens:
            rows += bench_shape(m, k, n, args.ranks, dtype, device, measure)
            print(f"done M={m} K={k} N={n}", file=sys.stderr, flush=True)
            summarize(complete=False)
    if args.rowwise or args.rowwise_only:
        t, h, i = args.rowwise_dims or (ROWWISE_GPU_DIMS if gpu else ROWWISE_CPU_DIMS)
        rowwise_rows = bench_rowwise(t, h, i, dtype, device, measure)
        print(f"done row-wise ops T={t} H={h} I={i}", file=sys.stderr, flush=True)
    if args.sweep or args.sweep_only:
        m = args.tokens[0] if args.tokens else SWEEP_SHAPE[0]
        k, n = shapes[0] if args.shapes else SWEEP_SHAPE[1:]
        sweep_rows = []
        bench_sweep(m, k, n, args.ranks, dtype, device, measure, sweep_rows, on_row=lambda: summarize(complete=False))
        print(f"done sweep M={m} K={k} N={n}", file=sys.stderr, flush=True)
    result = summarize(complete=True)
    print(result["table_markdown"])
    return result


if __name__ == "__main__":
    main()
