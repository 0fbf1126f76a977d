"""The kernel benchmark runs end to end at a tiny CPU size and writes sane numbers (no timing assertion)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

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
