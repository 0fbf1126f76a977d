"""What the fused CPU kernels (kernels/cpu.c) buy: each op, and a whole LoRA training step, with and without.

In one process, alternating ``MINILORA_CPU_KERNELS=auto`` (the C kernels) and ``off`` (minilora's PyTorch code)
round by round, so both sides see the same machine state:
  ops    forward+backward of RMSNorm (frozen weight; alone and with the residual add in front), RoPE (alone and
         the packed q|k|v split), SwiGLU (separate and packed gate|up), the causal attention (on AMX tiles where
         the CPU has them, else the GEMM attention's softmax kernels; alone and from the packed q|k|v with RoPE),
         the LM head + cross-entropy and the LoRA linear of q and v on the packed q|k|v projection (its rank-side
         products on AMX tiles where the CPU has them), at the shapes of the training benchmark (SmolLM2-135M,
         8 x 256 tokens)
  step   one bf16-autocast LoRA training step (r=16 on q_proj, v_proj, AdamW) of SmolLM2-135M: the real GGUF
         weights when installed, else random weights of its shape
``--dtype fp32``: the kernels with fp32 twins (RMSNorm, RoPE, SwiGLU) and an fp32 training step (no autocast), as
minilora trains on CPUs without native bf16.
Prints a table (median ms, speedup, largest relative difference between the two paths) and can write JSON.
Usage: ``PYTHONPATH=. python tools/bench_cpu_kernels.py [--rounds 3] [--no-step] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import cpu as cpu_kernels  # noqa: E402
from minilora import losses, ops  # noqa: E402
from minilora.runtime import tune_malloc  # noqa: E402

BF = torch.bfloat16
PATHS = {"fused": "auto", "torch": "off"}  # label -> MINILORA_CPU_KERNELS


def _set_path(label: str) -> None:
    os.environ["MINILORA_CPU_KERNELS"] = PATHS[label]


# the ops whose kernels have fp32 twins (kernels.cpu.FP32_KERNELS)
FP32_OPS = ("rms_norm", "residual add + rms_norm", "rope (q)", "q/k/v split + rope (packed)", "swiglu",
            "swiglu (packed gate/up)")


def op_cases(tokens: int, seq: int, hidden: int, inter: int, heads: int, kv: int, vocab: int,
             dtype: torch.dtype = BF) -> dict:
    """{name: (function of leaves -> output, leaves, output gradient or None for a scalar)} at these shapes; for
    fp32 only FP32_OPS."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    B, D = tokens // seq, hidden // heads
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.outer(torch.arange(seq).float(), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    w = rand(hidden, scale=0.1) + 1
    qkv_w = rand((heads + 2 * kv) * D, hidden, scale=hidden**-0.5)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(rand(vocab, hidden, scale=0.05))
    labels = torch.randint(0, vocab, (B, seq), generator=g)
    cases = {
        "rms_norm": (lambda x: ops.rms_norm(x, w, 1e-5), [rand(tokens, hidden)], rand(tokens, hidden)),
        "residual add + rms_norm": (lambda x, a: ops.add_rms_norm(x, a, w, 1e-5)[1],
                                    [rand(tokens, hidden), rand(tokens, hidden)], rand(tokens, hidden)),
        "rope (q)": (lambda x: ops.rope(x, cos, sin), [rand(B, seq, heads, D)], rand(B, heads, seq, D)),
        "q/k/v split + rope (packed)": (lambda x: sum(t.float().sum() for t in ops.qkv_rope(x, cos, sin, heads, kv)),
                               [rand(B, seq, (heads + 2 * kv) * D)], None),
        "swiglu": (ops.swiglu, [rand(tokens, inter, scale=2), rand(tokens, inter)], rand(tokens, inter)),
        "swiglu (packed gate/up)": (ops.swiglu_packed, [rand(tokens, 2 * inter, scale=2)], rand(tokens, inter)),
        "attention": (lambda q, k, v: ops.attention(q, k, v, None),
                      [rand(B, heads, seq, D), rand(B, kv, seq, D), rand(B, kv, seq, D)], rand(B, heads, seq, D)),
        "q/k/v + rope + attention (packed)": (lambda x: ops.qkv_attention(x, cos, sin, heads, kv, None),
                                              [rand(B, seq, (heads + 2 * kv) * D)], rand(B, heads, seq, D)),
        "lm_head + cross-entropy": (lambda h: losses.lm_loss_sum(h, head, labels)[0],
                                    [rand(B, seq, hidden)], None),
        "LoRA q, v (packed q/k/v projection)": (
            lambda x, aq, bq, av, bv: kernels.lora_linear(x, qkv_w, [aq, av], [bq, bv], [2.0, 2.0],
                                                          b_rows=[(0, heads * D), ((heads + kv) * D, kv * D)]),
            [rand(tokens, hidden), rand(16, hidden, scale=hidden**-0.5), rand(heads * D, 16, scale=0.1),
             rand(16, hidden, scale=hidden**-0.5), rand(kv * D, 16, scale=0.1)], rand(tokens, (heads + 2 * kv) * D)),
    }
    return cases if dtype == BF else {name: cases[name] for name in FP32_OPS}


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def bench_ops(cases: dict, rounds: int, reps: int) -> list[dict]:
    os.environ["MINILORA_ATTENTION"] = "matmul"  # the training attention on the CPU (as bench_train's step)
    rows = []
    for name, (fn, inputs, grad) in cases.items():
        times: dict[str, list[float]] = {k: [] for k in PATHS}
        results = {}
        for _ in range(rounds):
            for label in PATHS:
                _set_path(label)
                leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

                def step() -> torch.Tensor:
                    for t in leaves:
                        t.grad = None
                    out = fn(*leaves)
                    out.backward(grad)
                    return out

                times[label].append(_time(step, reps))
                out = step().detach().float()
                results[label] = [out] + [t.grad.float() for t in leaves]
        diff = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                   for a, b in zip(results["fused"], results["torch"]))
        f, t = statistics.median(times["fused"]), statistics.median(times["torch"])
        rows.append({"op": name, "fused_ms": f, "torch_ms": t, "speedup": t / f, "rel_diff": diff})
    return rows


def bench_step(rounds: int, steps: int, batch: int, seq: int, dtype: torch.dtype = BF) -> dict:
    from minilora import from_pretrained
    from minilora.loading import smollm2_path
    from minilora.lora import add_adapter
    from minilora.model import LlamaConfig, Transformer

    try:
        model, _ = from_pretrained(str(smollm2_path()), dtype="bf16" if dtype == BF else "fp32")
        source = "SmolLM2-135M-Instruct GGUF"
    except FileNotFoundError:
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        torch.manual_seed(0)
        model, source = Transformer(cfg).to(dtype), "random weights, SmolLM2-135M shape"
    add_adapter(model, "task", r=16, alpha=32, targets=("q_proj", "v_proj"))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        with torch.autocast("cpu", dtype=BF, enabled=dtype == BF):
            total, count = losses.lm_loss_sum(model.hidden_states(ids), model.lm_head, ids)
        loss = total / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times: dict[str, list[float]] = {k: [] for k in PATHS}
    for _ in range(rounds):
        for label in PATHS:
            _set_path(label)
            step()  # warm-up after the switch
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - t0)
    f, t = statistics.median(times["fused"]), statistics.median(times["torch"])
    return {"model": source, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "seq": seq,
            "fused_s": f, "torch_s": t, "speedup": t / f,
            "fused_s_all": times["fused"], "torch_s_all": times["torch"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two paths (default 3)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per op per round (default 5)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per path per round (default 2)")
    p.add_argument("--dims", type=int, nargs=7, default=[2048, 256, 576, 1536, 9, 3, 49152],
                   metavar=("TOKENS", "SEQ", "HIDDEN", "INTER", "HEADS", "KV", "VOCAB"),
                   help="op shapes (default SmolLM2-135M at 8 x 256 tokens)")
    p.add_argument("--no-step", action="store_true", help="time the ops only")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 (default: every kernel, a bf16-autocast step) or fp32 (the kernels with fp32 twins, "
                        "an fp32 step)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = p.parse_args(argv)
    dtype = BF if args.dtype == "bf16" else torch.float32
    saved = {k: os.environ.get(k) for k in ("MINILORA_CPU_KERNELS", "MINILORA_ATTENTION")}
    try:
        os.environ["MINILORA_CPU_KERNELS"] = "on"
        lib = cpu_kernels.library()  # fail here, with the compiler's reason, rather than time PyTorch twice
        result: dict = {"command": " ".join([sys.executable] + sys.argv), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "dims": args.dims, "dtype": args.dtype,
                        "simd": {"avx512bf16": bool(lib.simd_avx512bf16()),
                                 "amx_attention_lora": bool(lib.amx_available())},
                        "malloc": tune_malloc(),  # as the recipes run; both paths alike
                        "ops": bench_ops(op_cases(*args.dims, dtype=dtype), args.rounds, args.reps)}
        if not args.no_step:
            tokens, seq = args.dims[:2]
            result["step"] = bench_step(args.rounds, args.steps, tokens // seq, seq, dtype)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    simd = ", ".join(k for k, on in result["simd"].items() if on) or "plain C"
    lines = [f"fused {args.dtype} CPU kernels (kernels/cpu.c: {simd}) against minilora's PyTorch path, "
             f"{torch.get_num_threads()} threads, medians over alternating rounds", "",
             "| forward+backward | fused ms | PyTorch ms | speedup | rel. difference |", "|---|---|---|---|---|"]
    for r in result["ops"]:
        lines.append(f"| {r['op']} | {r['fused_ms']:.2f} | {r['torch_ms']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['rel_diff']:.1e} |")
    if "step" in result:
        s = result["step"]
        lines.append(f"| {s['dtype']} training step ({s['model']}, {s['batch']} x {s['seq']}, LoRA q,v) "
                     f"| {s['fused_s'] * 1e3:.0f} "
                     f"| {s['torch_s'] * 1e3:.0f} | {s['speedup']:.2f}x | - |")
    result["table_markdown"] = "\n".join(lines)
    print(result["table_markdown"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
