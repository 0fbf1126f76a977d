"""Benchmark the fused stacked-LoRA linear against a bare GEMM, a PEFT-style layer and an unsloth-style layer.

Layers (two adapters, r = 16 + 8 by default, everything in one dtype, adapters trainable for fwd+bwd):
  bare         y = x W^T                                             (the floor: cuBLAS / oneDNN)
  peft         y = base(x); y = y + B_i(A_i(x)) * s_i per adapter    (separate linears, [M, N] temporaries)
  addmm        kernels.reference: y = x W^T; y.addmm_(x A^T, B^T)    (unsloth-style, adapters concatenated)
  ours         kernels.lora_linear (Triton on CUDA; on CPU it is the addmm path)
  ours-bare    kernels.lora_linear with no adapter (CUDA only: Triton's GEMM against cuBLAS's)
GPU targets (checked on every shape): fused fwd <= 1.08x bare, >= 1.25x faster than peft; fwd+bwd >= 1.2x faster.
Usage: ``PYTHONPATH=. python tools/bench_kernels.py [--device cuda] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
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

GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N) of LLaMA-7B: attention, up/gate, down
GPU_TOKENS = [2048, 8192]
CPU_SHAPES = [(1024, 1024), (1024, 2816)]
CPU_TOKENS = [512]
TARGETS = {"fwd_vs_bare_max": 1.08, "fwd_speedup_vs_peft_min": 1.25, "fwdbwd_speedup_vs_peft_min": 1.2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    if device.type == "cuda" and kernels.triton_impl is not None:
        layers["ours-bare"] = lambda x: kernels.lora_linear(x, w, [], [], [])
    return layers, a + b


def timer(device: torch.device, warmup: int, iters: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: CUDA events on a GPU, perf_counter on CPU; warmup calls first."""
    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return measure


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
                     "fwdbwd_ms": measure(forward_backward), "max_rel_err_vs_addmm": err})
        del got
    return rows


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
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} "
                     f"| {peft['fwd_ms'] / r['fwd_ms']:.2f} | {peft['fwdbwd_ms'] / r['fwdbwd_ms']:.2f} "
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
    measure = timer(device, args.warmup if args.warmup is not None else (10 if gpu else 5),
                    args.iters or (50 if gpu else 20))
    dtype = DTYPES[args.dtype]
    rows = []
    for k, n in shapes:
        for m in tokens:
            rows += bench_shape(m, k, n, args.ranks, dtype, device, measure)
            print(f"done M={m} K={k} N={n}", file=sys.stderr, flush=True)
    targets = check_targets(rows)
    result = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": None if kernels.triton_impl is None else kernels.triton_impl.triton.__version__,
        "ours_backend": kernels.backend_for(torch.empty(0, device=device)),
        "dtype": args.dtype, "ranks": args.ranks, "targets": TARGETS,
        "rows": rows, "checks": targets,
        "all_targets_pass": all(t[f] for t in targets for f in ("pass_fwd_vs_bare", "pass_fwd_vs_peft",
                                                                "pass_fwdbwd_vs_peft")),
    }
    result["table_markdown"] = (
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {args.dtype}, ranks {args.ranks}, "
        f"ours = {result['ours_backend']}{'' if gpu else ' (targets are for the GPU)'}\n\n{table(rows, targets)}")
    print(result["table_markdown"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
