"""tools/gpu_check.sh on a machine without a GPU: the steps asked for run (a CUDA step fails and is recorded, the
next one runs regardless), a spent budget skips steps, and summary.json / summary.md say so."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, gpu_image_env

SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(out: Path, only: str, budget: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "GPU_CHECK_ONLY": only, "GPU_CHECK_BUDGET": str(budget)}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=env)
    return proc, time.monotonic() - t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how a CUDA step fails where there is no GPU")
def test_steps_run_and_failures_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc, _ = _run(out, "versions train-bench", 200)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["versions", "train-bench"]  # only the steps asked for, in the script's order
    assert steps["versions"]["status"] == "ok" and steps["versions"]["exit"] == 0
    assert steps["train-bench"]["status"] == "failed" and steps["train-bench"]["exit"] not in (0, None)
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["gpu"] is None
    md = (out / "summary.md").read_text()
    assert "| versions | ok | 0 |" in md and "| train-bench | failed |" in md
    log = (out / "steps.log").read_text()
    assert "=== train-bench: exit" in log and "bench_train.py --device cuda" in log


def test_spent_budget_skips_steps(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc, wall = _run(out, "versions kernel-tests", 20)  # 20 s less the 15 s reserve: under the 30 s a step needs
    assert proc.returncode == 0, proc.stderr
    assert wall < 15, wall  # nothing ran
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [(s["name"], s["status"], s["exit"]) for s in steps] == [
        ("versions", "skipped (budget spent)", None), ("kernel-tests", "skipped (budget spent)", None)]
    assert "| kernel-tests | skipped (budget spent) | - | 0 |" in (out / "summary.md").read_text()


_GPU_PATH_IMPORTS = """
import runpy, sys
for tool in ("tools/bench_train.py", "tools/bench_kernels.py"):
    runpy.run_path(tool, run_name="imported")
import kernels, kernels.lora_linear, kernels.rowwise, minilora.ops, minilora.losses, minilora.train, minilora.classify
import transformers, peft  # bench_train's other side
try:
    import gguf
except ImportError as e:
    print("hidden:", e)
"""


def test_gpu_check_needs_only_the_gpu_images_packages(tmp_path: Path) -> None:
    """The GPU machine has no package index and lacks packages this machine has (gguf, for one, which
    ``import minilora`` once needed): with all those hidden, the kernel tests collect and gpu_check's tools and the
    modules they run import."""
    env = gpu_image_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _GPU_PATH_IMPORTS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hidden: No module named 'gguf' (gguf is not on the GPU image)" in proc.stdout  # the hiding works
    tests = sorted(set(re.findall(r"tests/test_\w+\.py", (ROOT / "tools" / "gpu_check.sh").read_text())))  # its steps
    assert "tests/test_kernels.py" in tests and "tests/test_optim.py" in tests
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " tests collected" in proc.stdout
