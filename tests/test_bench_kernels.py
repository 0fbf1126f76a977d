"""The kernel benchmark runs end to end at a tiny CPU size and writes sane numbers (no timing assertion)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py")
bench_kernels = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_kernels)


@pytest.mark.bench
def test_bench_kernels_small_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    result = bench_kernels.main(["--device", "cpu", "--tokens", "33", "--shapes", "64x96", "--ranks", "8", "4",
                                 "--warmup", "1", "--iters", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {r["impl"] for r in result["rows"]} == {"bare", "peft", "addmm", "ours"}
    for row in result["rows"]:
        assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and math.isfinite(row["fwd_ms"])
        assert row["max_rel_err_vs_addmm"] is None or row["max_rel_err_vs_addmm"] < 0.05
    assert len(result["checks"]) == 1 and result["device"].startswith("cpu")
    assert "| ours |" in capsys.readouterr().out


@pytest.mark.bench
def test_bench_kernels_rowwise_triton_interpreted(tmp_path: Path) -> None:
    """--rowwise-only with the Triton kernels under the interpreter (fp32, tiny sizes): every op has a triton row
    that agrees with minilora's PyTorch functions, the LM head + cross-entropy, the packed RoPE, the residual add +
    RMSNorm and the packed SwiGLU included."""
    pytest.importorskip("triton")
    conftest._skip_broken_interpreter()  # triton < 3.7 with a newer numpy cannot interpret
    ROOT = conftest.ROOT
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--device", "cpu",
                           "--rowwise-only", "--rowwise-dims", "8", "32", "48", "--dtype", "fp32", "--warmup", "1",
                           "--iters", "2", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rowwise_rows"]
    impls = {(r["op"], r["impl"]): r for r in rows}
    ops = ("rms_norm", "rms_norm+dw", "add_rms_norm", "swiglu", "swiglu_packed", "lm_loss", "qkv_rope")
    assert {op for op, _ in impls} == set(ops)
    for op in ops:
        assert impls[(op, "triton")]["max_rel_err_vs_torch"] < 1e-4, op
        assert impls[(op, "ref")]["max_rel_err_vs_torch"] < 1e-4, op
    assert impls[("swiglu_packed", "triton-halves")]["max_rel_err_vs_torch"] < 1e-4
    assert impls[("lm_loss", "triton")]["width"] == bench_kernels.LM_VOCAB


@pytest.mark.bench
def test_bench_kernels_lora_triton_interpreted(tmp_path: Path) -> None:
    """The LoRA section with the Triton kernels under the interpreter (fp32, tiny): the fused rows (the kernel
    always, and its bare GEMM, forward only) agree with the addmm path and the table prints them."""
    pytest.importorskip("triton")
    conftest._skip_broken_interpreter()
    ROOT = conftest.ROOT
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--device", "cpu",
                           "--tokens", "33", "--shapes", "40x72", "--ranks", "8", "4", "--dtype", "fp32",
                           "--warmup", "1", "--iters", "2", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bare", "peft", "addmm", "ours", "fused", "fused-bare"}
    assert rows["fused"]["max_rel_err_vs_addmm"] < 1e-5 and rows["fused"]["fwdbwd_ms"] > 0
    assert rows["fused-bare"]["fwdbwd_ms"] is None and rows["fused-bare"]["fwd_ms"] > 0
    assert "| 33 | 40 | 72 | fused-bare |" in proc.stdout


def test_bench_kernels_config_sweep_triton_interpreted(tmp_path: Path) -> None:
    """--sweep-only under the interpreter (fp32, tiny): every config in both W layouts computes x W + S L (against
    float64) and is timed against cuBLAS's stand-ins; the LoRA targets are not judged."""
    pytest.importorskip("triton")
    conftest._skip_broken_interpreter()
    ROOT = conftest.ROOT
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--device", "cpu", "--sweep-only",
                           "--tokens", "33", "--shapes", "40x72", "--ranks", "8", "4", "--dtype", "fp32",
                           "--warmup", "1", "--iters", "2", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["all_targets_pass"] is None and data["complete"]
    rows = data["sweep_rows"]
    from kernels.lora_linear import DEFAULT_CONFIG, INTERPRET_CONFIG  # the interpreter's sweep

    assert sorted((r["w_layout"], tuple(r["config"])) for r in rows) == sorted(
        (layout, cfg) for layout in ("K-contiguous", "N-contiguous") for cfg in (INTERPRET_CONFIG, DEFAULT_CONFIG))
    for r in rows:
        assert "error" not in r and (r["m"], r["k"], r["n"], r["r"]) == (33, 40, 72, 12)
        assert r["max_rel_err"] < 1e-5 and r["ms"] > 0 and r["vs_cublas"] == pytest.approx(r["ms"] / r["cublas_ms"])
    assert "| 33 | 40 | 72 | K-contiguous | 32x32x32 g4 w4 s1 |" in proc.stdout


def test_sweep_needs_the_triton_kernels(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(conftest.ROOT / "tools" / "bench_kernels.py"), "--device", "cpu",
                           "--sweep-only"], env={**env, "PYTHONPATH": str(conftest.ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--sweep needs the Triton kernels on CUDA" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpu_timer_sleeps_long_enough_to_queue_every_call() -> None:
    """The sleep before the queued calls covers 1.5x their host time at 2 GHz, within [25 ms, 2 s]."""
    assert bench_kernels.sleep_cycles(0.2, 50) == 50_000_000  # 15 ms of launching: the 25 ms floor
    assert bench_kernels.sleep_cycles(1.0, 50) == 150_000_000  # 50 ms of launching -> 75 ms asleep
    assert bench_kernels.sleep_cycles(200.0, 50) == 4_000_000_000  # capped at 2 s


def test_json_is_written_after_every_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped during its second shape (gpu_check's step timeout) leaves the first shape's rows in --json,
    marked incomplete; a finished run is marked complete."""
    out = tmp_path / "bench.json"
    real = bench_kernels.bench_shape
    calls = []

    def stopped_on_second_shape(*args, **kwargs):
        calls.append(args[:3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_kernels, "bench_shape", stopped_on_second_shape)
    argv = ["--device", "cpu", "--tokens", "9", "--shapes", "16x24", "32x16", "--ranks", "4", "--warmup", "0",
            "--iters", "1", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(argv)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and "interrupted" in partial["table_markdown"]
    assert {(r["m"], r["k"], r["n"]) for r in partial["rows"]} == {(9, 16, 24)} and len(partial["checks"]) == 1
    monkeypatch.setattr(bench_kernels, "bench_shape", real)
    done = bench_kernels.main(argv)
    assert json.loads(out.read_text())["complete"] is True and len(done["checks"]) == 2
    assert not out.with_name(out.name + ".tmp").exists()
