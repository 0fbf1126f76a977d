"""Compile every Triton kernel and autotune config ahead of time for sm_80 (A100) and sm_90 (H100/H200).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the real NVIDIA
backend, so dot shapes, layouts and shared-memory overruns that only the GPU compiler rejects fail here. The
compiles run in a child process (never under TRITON_INTERPRET, in parallel); each case is then its own test.
Run ``PYTHONPATH=. python tests/test_kernels_compile.py OUT.json`` to produce the results by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from kernels import rowwise  # noqa: E402
from kernels.lora_linear import (  # noqa: E402
    DEFAULT_CONFIG, DROPOUT_BLOCK, SMEM_PER_BLOCK, TUNED_CONFIGS, prune_configs, smem_estimate,
)

TARGETS = (80, 90)
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
RANK_BLOCK = 32  # LLaMA runs here: two adapters r = 16 + 8 -> R = 24 -> one 32-wide rank tile
# Strides that are 1 (and so specialised as constexpr by Triton's JIT) in each call of the fused kernel.
UNIT_STRIDES = {
    "fwd": ("stride_xk", "stride_wk", "stride_sr", "stride_lr", "stride_on"),        # X, W^T, S, B^T, Y
    "bwd": ("stride_xk", "stride_wn", "stride_sr", "stride_ln", "stride_on"),        # G, W, T, A, dX
    "strided-x": ("stride_xm", "stride_wk", "stride_sr", "stride_lr", "stride_on"),  # x a transposed view
}
STRIDES = ("stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_sm", "stride_sr",
           "stride_lr", "stride_ln", "stride_om", "stride_on")
ROW_WIDTHS = (576, 4096, 8192)  # kernels.rowwise RMSNorm: SmolLM2's and LLaMA-7B's hidden sizes, and the largest
# kernels.rowwise variants: (HAS_DGATE, HAS_DUP) of the SwiGLU backward, and below
# (HAS_DX, HAS_DW, HAS_RESIDUAL) of the RMSNorm backward, HAS_RESIDUAL of its forward (the fused residual add)
ROWWISE_VARIANTS = {"rms_norm_fwd": {"y": False, "residual": True},
                    "rms_norm_bwd": {"dx-dw": (True, True, False), "dx": (True, False, False),
                                     "dx-residual": (True, False, True), "dx-dw-residual": (True, True, True)},
                    "swiglu_bwd": {"both": (True, True), "dup": (False, True)},
                    "ce_rows": {"grad": True, "loss": False},  # WRITE_GRAD of the cross-entropy rows
                    "qkv_rope": {"fwd": False, "bwd": True}}  # BACKWARD of the packed q|k|v RoPE
QKV_ROPE_HEAD_DIMS = (64, 128)  # SmolLM2's, LLaMA's


@dataclass(frozen=True)
class Case:
    """One compile: kernel, target, input dtype, call layout, (BM, BN, BK, GROUP_M, warps, stages), variant;
    ``width``: the row width of a kernels.rowwise RMSNorm case (its BLOCK_D and warps)."""

    kernel: str
    target: int
    dtype: str
    layout: str = "fwd"
    config: tuple[int, ...] = DEFAULT_CONFIG
    variant: str = "lora"
    width: int = 0

    @property
    def id(self) -> str:
        if self.kernel == "dropout":
            return f"dropout-sm{self.target}-{self.dtype}"
        if self.kernel.startswith("rms_norm"):
            return f"{self.kernel}-sm{self.target}-{self.dtype}-d{self.width}-{self.variant}"
        if self.kernel == "qkv_rope":
            return f"{self.kernel}-sm{self.target}-{self.dtype}-d{self.width}-{self.variant}"
        if self.kernel.startswith("swiglu") or self.kernel == "ce_rows":
            return f"{self.kernel}-sm{self.target}-{self.dtype}-{self.variant}"
        return f"fused-sm{self.target}-{self.dtype}-{self.layout}-{self.variant}-{'x'.join(map(str, self.config))}"


def cases() -> list[Case]:
    """Every tuned config that survives pruning per (target, dtype), both call layouts, plus code-path variants."""
    out = []
    for target in TARGETS:
        for dtype, size in ITEMSIZE.items():
            kept = prune_configs(TUNED_CONFIGS, size, RANK_BLOCK, SMEM_PER_BLOCK[target], ieee_fp32=size == 4)
            out += [Case("fused", target, dtype, layout, c) for layout in ("fwd", "bwd") for c in kept]
            out.append(Case("dropout", target, dtype))
        out += [Case("fused", target, "bf16", layout, DEFAULT_CONFIG, variant) for layout, variant in
                [("bwd", "dropout"), ("fwd", "nolora"), ("fwd", "rank64"), ("strided-x", "lora")]]
        fp32_config = prune_configs(TUNED_CONFIGS, 4, RANK_BLOCK, SMEM_PER_BLOCK[target])[0]
        out.append(Case("fused", target, "fp32", "fwd", fp32_config, "tf32"))
        # ranks above 32 (48 + 40, say) take 64-wide rank blocks: in fp32 they can set the shared memory
        out += [Case("fused", target, "fp32", "fwd", c, "rank64")
                for c in prune_configs(TUNED_CONFIGS, 4, 64, SMEM_PER_BLOCK[target], ieee_fp32=True)]
        for dtype in ITEMSIZE:  # kernels.rowwise: RMSNorm per row width, SwiGLU (width-independent)
            for width in ROW_WIDTHS:  # the fused residual add at LLaMA-7B's width only (it adds no block shape)
                out += [Case(kernel, target, dtype, variant=v, width=width)
                        for kernel in ("rms_norm_fwd", "rms_norm_bwd") for v in ROWWISE_VARIANTS[kernel]
                        if width == 4096 or "residual" not in v]
            out.append(Case("swiglu_fwd", target, dtype, variant="h"))
            out += [Case("swiglu_bwd", target, dtype, variant=v) for v in ROWWISE_VARIANTS["swiglu_bwd"]]
            out += [Case("ce_rows", target, dtype, variant=v) for v in ROWWISE_VARIANTS["ce_rows"]]
            out += [Case("qkv_rope", target, dtype, variant=v, width=d) for v in ROWWISE_VARIANTS["qkv_rope"]
                    for d in QKV_ROPE_HEAD_DIMS]
    return out


def _fused_source(case: Case) -> tuple[ASTSource, dict]:
    from kernels.lora_linear import _fused_lora_matmul_kernel
    fn = _fused_lora_matmul_kernel.fn
    ptr = "*" + case.dtype
    sig = {name: ptr for name in ("X", "W", "S", "L", "OUT")}
    sig.update(seed="i32", p="fp32", scale="fp32", M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32")
    consts: dict = {}
    for name in STRIDES:
        unit = name in UNIT_STRIDES[case.layout]
        sig[name] = "constexpr" if unit else "i32"
        if unit:
            consts[name] = 1
    bm, bn, bk, gm, warps, stages = case.config
    consts.update(HAS_LORA=case.variant != "nolora", DROPOUT=case.variant == "dropout",
                  BLOCK_R=64 if case.variant == "rank64" else RANK_BLOCK, UPCAST=False,
                  PRECISION="tf32" if case.variant == "tf32" else "ieee",
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm)
    sig.update({name: "constexpr" for name in consts})
    # What the JIT sees at LLaMA shapes: 16-byte aligned pointers, N, K and the leading strides divisible by 16.
    aligned = ["X", "W", "S", "L", "OUT", "N", "K"] + [s for s in ("stride_xm", "stride_xk", "stride_wk",
                                                                    "stride_wn", "stride_om") if s not in consts]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), {"num_warps": warps, "num_stages": stages}


def _dropout_source(case: Case) -> tuple[ASTSource, dict]:
    from kernels.lora_linear import _dropout_kernel
    ptr = "*" + case.dtype
    sig = {"X": ptr, "OUT": ptr, "seed": "i32", "p": "fp32", "scale": "fp32", "M": "i32", "K": "i32",
           "stride_xm": "i32", "stride_xk": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"stride_xk": 1, "BLOCK_M": DROPOUT_BLOCK[0], "BLOCK_K": DROPOUT_BLOCK[1]}
    return ASTSource(fn=_dropout_kernel, signature=sig, constexprs=consts), {"num_warps": 4}


def _rowwise_source(case: Case) -> tuple[ASTSource, dict]:
    """A kernels.rowwise kernel as the JIT sees it at LLaMA shapes: aligned pointers, widths and row strides % 16."""
    fn = getattr(rowwise, f"_{case.kernel}_kernel")
    ptr, f32 = "*" + case.dtype, "*fp32"
    if case.kernel == "rms_norm_fwd":
        sig = {"X": ptr, "W": ptr, "Y": ptr, "RSTD": f32, "stride_x": "i32", "D": "i32", "eps": "fp32", "A": ptr,
               "H": ptr, "stride_a": "i32"}
        consts = {"HAS_RESIDUAL": ROWWISE_VARIANTS["rms_norm_fwd"][case.variant],
                  "BLOCK_D": rowwise.rms_norm_block(case.width)}
        aligned = ["X", "W", "Y", "RSTD", "stride_x", "D", "A", "H", "stride_a"]
    elif case.kernel == "rms_norm_bwd":
        sig = {"X": ptr, "W": ptr, "G": ptr, "RSTD": f32, "DX": ptr, "DW": f32, "M": "i32", "D": "i32",
               "stride_x": "i32", "stride_g": "i32", "P": "i32", "GH": ptr, "stride_gh": "i32"}
        has_dx, has_dw, residual = ROWWISE_VARIANTS["rms_norm_bwd"][case.variant]
        consts = {"HAS_DX": has_dx, "HAS_DW": has_dw, "HAS_RESIDUAL": residual,
                  "BLOCK_D": rowwise.rms_norm_block(case.width)}
        aligned = ["X", "W", "G", "RSTD", "DX", "DW", "D", "stride_x", "stride_g", "GH", "stride_gh"]
    elif case.kernel == "swiglu_fwd":
        sig = {"GATE": ptr, "UP": ptr, "H": ptr, "N": "i32", "n_blocks": "i32", "stride_gate": "i32",
               "stride_up": "i32"}
        consts = {"BLOCK": rowwise.SWIGLU_BLOCK}
        aligned = ["GATE", "UP", "H", "N", "stride_gate", "stride_up"]
    elif case.kernel == "qkv_rope":
        strides = [f"stride_{x}{y}" for x in "qkv" for y in "bht"]
        sig = {"PACKED": ptr, "Q": ptr, "K": ptr, "V": ptr, "COS": f32, "SIN": f32, "T": "i32", "H": "i32",
               "HKV": "i32", "stride_pb": "i32", "stride_pt": "i32", **{name: "i32" for name in strides}}
        consts = {"BACKWARD": ROWWISE_VARIANTS["qkv_rope"][case.variant], "D": case.width,
                  "BLOCK_NH": rowwise.qkv_rope_heads(96, case.width)}  # LLaMA-7B: 32 + 2 x 32 head slots
        aligned = ["PACKED", "Q", "K", "V", "COS", "SIN", "stride_pb", "stride_pt"] + strides
    elif case.kernel == "ce_rows":
        sig = {"LOGITS": ptr, "Y": "*i64", "LOSS": f32, "V": "i32", "stride_l": "i32"}
        consts = {"IGNORE": rowwise.CE_IGNORE, "WRITE_GRAD": ROWWISE_VARIANTS["ce_rows"][case.variant],
                  "BLOCK": rowwise.CE_BLOCK}
        aligned = ["LOGITS", "Y", "LOSS", "V", "stride_l"]  # LLaMA's 32,000 and SmolLM2's 49,152 are % 16
    else:
        sig = {"G": ptr, "GATE": ptr, "UP": ptr, "DGATE": ptr, "DUP": ptr, "N": "i32", "n_blocks": "i32",
               "stride_g": "i32", "stride_gate": "i32", "stride_up": "i32", "stride_dgate": "i32", "stride_dup": "i32"}
        has_dgate, has_dup = ROWWISE_VARIANTS["swiglu_bwd"][case.variant]
        consts = {"HAS_DGATE": has_dgate, "HAS_DUP": has_dup, "BLOCK": rowwise.SWIGLU_BLOCK}
        aligned = ["G", "GATE", "UP", "DGATE", "DUP", "N", "stride_g", "stride_gate", "stride_up", "stride_dgate",
                   "stride_dup"]
    sig.update({name: "constexpr" for name in consts})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    warps = (rowwise.rms_norm_warps(consts["BLOCK_D"]) if case.kernel.startswith("rms_norm")
             else rowwise.CE_WARPS if case.kernel == "ce_rows"
             else rowwise.QKV_ROPE_WARPS if case.kernel == "qkv_rope" else rowwise.SWIGLU_WARPS)
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), {"num_warps": warps}


def _source(case: Case) -> tuple[ASTSource, dict]:
    if case.kernel == "dropout":
        return _dropout_source(case)
    return _fused_source(case) if case.kernel == "fused" else _rowwise_source(case)


def compile_case(case: Case) -> dict:
    """Compile one case; return shared-memory bytes, which MMA instructions the PTX holds, or the error."""
    import triton
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    try:
        src, options = _source(case)
        compiled = triton.compile(src, target=GPUTarget("cuda", case.target, 32), options=options)
    except Exception as exc:  # reported per case by the test
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    out = {"error": None, "shared": compiled.metadata.shared, "wgmma": "wgmma" in ptx,
           "mma_sync": "mma.sync" in ptx}
    if "wgmma" in ptx:
        out["wgmma_serialized"] = _ptxas_serializes_wgmma(ptx, case.target)
    return {**out, "seconds": round(time.perf_counter() - start, 2)}


def _ptxas_serializes_wgmma(ptx: str, target: int) -> str | None:
    """ptxas's warning when it serializes wgmma instructions (C7515: the pipelined tensor-core GEMM of Hopper runs one
    MMA at a time, e.g. when a dot's accumulator is defined outside the pipelined loop), or None. triton.compile
    runs ptxas too but keeps its log only on failure, so run it again on the PTX with the same tool."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(target).path, "-v", f"--gpu-name=sm_{target}a", str(src), "-o",
                               str(Path(d) / "k.cubin")], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    hits = [line.strip() for line in log.splitlines() if "C7515" in line or "serialized" in line]
    return hits[0][:400] if hits else None


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Compile all cases in one child process without TRITON_INTERPRET (the interpreter cannot compile)."""
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, f"AOT compile run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_compiles_for_target(results: dict[str, dict], case: Case) -> None:
    res = results[case.id]
    assert res["error"] is None, res["error"]
    limit = SMEM_PER_BLOCK[case.target]
    assert res["shared"] <= limit, f"{case.id}: {res['shared']} B shared memory > {limit} B on sm_{case.target}"
    if case.kernel == "fused":  # the autotuner prunes by this estimate, and MINILORA_TRITON_AUTOTUNE=0 trusts it
        estimate = smem_estimate(case.config, ITEMSIZE[case.dtype], 64 if case.variant == "rank64" else RANK_BLOCK,
                                 ieee_fp32=case.dtype == "fp32" and case.variant != "tf32")
        assert res["shared"] <= estimate, f"{case.id}: {res['shared']} B shared memory > estimate {estimate} B"
    uses_mma = case.kernel == "fused" and (ITEMSIZE[case.dtype] == 2 or case.variant == "tf32")
    if uses_mma and case.target == 90:
        assert res["wgmma"], f"{case.id}: no wgmma in the sm_90 PTX (the main GEMM fell off Hopper's tensor cores)"
        if case.variant != "dropout":  # with dropout the masked LoRA dot precedes the K-loop (kernels/lora_linear.py)
            assert res["wgmma_serialized"] is None, f"{case.id}: {res['wgmma_serialized']}"
    if uses_mma and case.target == 80:
        assert res["mma_sync"], f"{case.id}: no mma.sync in the sm_80 PTX"


def test_configs_fit_a100_and_hopper_in_16_bit() -> None:
    """Every tuned config is a candidate on both GPUs for bf16/fp16 (fp32 prunes to what fits)."""
    for target in TARGETS:
        assert prune_configs(TUNED_CONFIGS, 2, RANK_BLOCK, SMEM_PER_BLOCK[target]) == TUNED_CONFIGS


def test_rowwise_widths_cover_what_dispatch_accepts() -> None:
    """The widest RMSNorm row that kernels.rowwise accepts (BLOCK_D, warps) is among the compiled widths."""
    assert rowwise.rms_norm_block(rowwise.MAX_RMS_NORM_D) <= max(rowwise.rms_norm_block(w) for w in ROW_WIDTHS)


def main(out_path: str) -> None:
    """Compile every case in parallel and write {case id: result} as JSON."""
    all_cases = cases()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        res = dict(zip((c.id for c in all_cases), pool.map(compile_case, all_cases)))
    Path(out_path).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
