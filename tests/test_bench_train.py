"""The training benchmark runs end to end at --quick size and writes positive numbers for both sides.

No timing assertion: this only checks that both libraries train, classify and are measured (opt-in: -m bench).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, smollm2_gguf

SCRIPT = ROOT / "tools" / "bench_train.py"


def test_help() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--steps", "--rounds", "--batch", "--seq", "--modes", "--targets", "--quick", "--json", "--device",
                 "--shape", "--layers"):
        assert flag in out.stdout


def test_bad_modes_rejected() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--modes", "fp8"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--modes" in out.stderr


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.bench
def test_bench_train_quick(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    smollm2_gguf()
    out = tmp_path / "bench_train.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--modes", "bf16", "--targets", "qv", "--hf-bf16", "bf16w",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "bench_train.py" in data["command"] and "--quick" in data["command"]
    assert data["versions"]["torch"] and data["versions"]["transformers"] and data["machine"]["cpu_count"]
    assert not data["errors"]
    assert _positive(data["gemm"]["bf16_gflops"]) and _positive(data["gemm"]["fp32_gflops"])
    rows = {(r["kind"], r["side"]): r for r in data["rows"]}
    assert set(rows) == {("train", "minilora"), ("train", "hf"), ("cls", "minilora"), ("cls", "hf")}
    for row in rows.values():
        assert _positive(row["tok_s"]) and _positive(row["peak_mb"]) and _positive(row["mfu"]), row
    for side in ("minilora", "hf"):
        losses = rows[("train", side)]["loss_first_last"]
        assert all(math.isfinite(x) for x in losses)
    (train,) = [c for c in data["comparisons"] if c["kind"] == "train"]
    assert _positive(train["speedup"]) and _positive(train["memory_ratio"]) and train["same_trainable_params"]
    assert [c["name"] for c in data["checks"]] and all(isinstance(c["pass"], bool) for c in data["checks"])
    assert "| minilora |" in proc.stdout and "tokens/s" in data["table_markdown"]
