"""The recipes on a GPU (tools/gpu_check.sh's recipes-cuda step), on a tiny random LLaMA.

- In fp32 without dropout, ``train_dapt.py`` and ``train_task.py`` with ``--device cuda`` (Triton kernels, SDPA,
  cuBLAS) agree with the same runs on the CPU: base perplexity, every step's loss, the adapters, the predictions.
  ``eval.py --run --test --device cuda`` scores a run's model to the predictions it saved.
- With ``--cuda-graph`` (the decoder's forward and backward replayed as CUDA graphs) DAPT matches an eager run.
- In bf16 with LoRA dropout (Philox seeds), DAPT learns and a run stopped at a checkpoint resumes to the same
  adapter as a run that did not stop.

Skipped without CUDA. ``MINILORA_TEST_RECIPE_DEVICE=cpu`` runs them with the CPU in the GPU's place (the CPU
against itself), which checks the tests themselves where there is no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from minilora.data.synthetic import TASKS, write_dapt_corpus, write_task_csvs

DEVICE = os.environ.get("MINILORA_TEST_RECIPE_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (tools/gpu_check.sh runs these)")
ENV = {"MINILORA_TRITON_AUTOTUNE": "0"}  # one Triton config per kernel: compiles stay short
DAPT = ["--max-seq-len", "64", "--batch-size", "8", "--no-progress", "--workers", "1", "--eval-every", "100"]
TASK = ["--max-seq-len", "48", "--batch-size", "16", "--no-progress", "--workers", "1", "--epochs", "1", "--r", "4",
        "--alpha", "8"]


def run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, **ENV})
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_close_tensors(a: dict, b: dict, rel: float) -> None:
    """Each tensor within ``rel`` of its counterpart in relative Frobenius norm (Adam moves an element whose
    gradient is at rounding level by a whole step either way, so elementwise bounds would test the noise)."""
    assert a.keys() == b.keys() and a
    for k in a:
        x, y = a[k].float(), b[k].float()
        assert (x - y).norm().item() <= rel * max(x.norm().item(), 1e-12), k


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    return write_dapt_corpus(tmp_path_factory.mktemp("notes") / "notes.jsonl", 60, seed=5)


def test_dapt_on_the_gpu_matches_the_cpu_in_fp32(tiny_lm, notes, tmp_path):
    common = ["--model", str(tiny_lm), "--notes", str(notes), "--max-steps", "8", "--lr", "3e-3", "--dropout", "0",
              "--precision", "fp32", "--cache-dir", str(tmp_path / "cache"), *DAPT]
    run("train_dapt.py", *common, "--device", "cpu", "--out", str(tmp_path / "cpu"))
    run("train_dapt.py", *common, "--device", DEVICE, "--out", str(tmp_path / "gpu"))
    cpu, gpu = summary(tmp_path / "cpu"), summary(tmp_path / "gpu")
    assert gpu["base_val_ppl"] == pytest.approx(cpu["base_val_ppl"], rel=1e-4)
    assert gpu["val_ppl"] == pytest.approx(cpu["val_ppl"], rel=1e-3) and gpu["val_ppl"] < gpu["base_val_ppl"]
    assert gpu["train_tokens"] == cpu["train_tokens"] and gpu["peak_mem_mb"] > 0
    assert losses(tmp_path / "gpu") == pytest.approx(losses(tmp_path / "cpu"), rel=1e-3)
    assert_close_tensors(load_file(str(tmp_path / "cpu" / "adapter" / "adapter_model.safetensors")),
                         load_file(str(tmp_path / "gpu" / "adapter" / "adapter_model.safetensors")), 1e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_dapt_with_cuda_graphs_matches_eager_in_fp32(tiny_lm, notes, tmp_path):
    """--cuda-graph: the decoder's forward and backward replayed as CUDA graphs give an eager run's losses and
    adapter, with two micro-batches a step (the graph's static gradient buffers must not become .grad); the graph
    is captured at the second of the 16 micro-batches and replays the other 15."""
    common = ["--model", str(tiny_lm), "--notes", str(notes), "--max-steps", "8", "--lr", "3e-3", "--dropout", "0",
              "--precision", "fp32", "--device", DEVICE, "--grad-accum", "2", "--cache-dir", str(tmp_path / "cache"),
              *DAPT]
    run("train_dapt.py", *common, "--out", str(tmp_path / "eager"))
    run("train_dapt.py", *common, "--cuda-graph", "--out", str(tmp_path / "graph"))
    status = summary(tmp_path / "graph")["cuda_graph"]
    assert status["captured"] and status["error"] is None and status["replays"] == 15, status
    assert summary(tmp_path / "eager")["cuda_graph"] is None
    assert losses(tmp_path / "graph") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    assert_close_tensors(load_file(str(tmp_path / "eager" / "adapter" / "adapter_model.safetensors")),
                         load_file(str(tmp_path / "graph" / "adapter" / "adapter_model.safetensors")), 1e-3)


def test_dapt_in_bf16_with_dropout_learns_and_resumes(tiny_lm, notes, tmp_path):
    # a constant learning rate: the first half of a run, stopped by --max-steps 6, has the full run's schedule
    common = ["--model", str(tiny_lm), "--notes", str(notes), "--lr", "5e-3", "--dropout", "0.1", "--precision",
              "bf16", "--device", DEVICE, "--schedule", "constant", "--warmup-ratio", "0", "--save-every", "6",
              "--cache-dir", str(tmp_path / "cache"), *DAPT]
    run("train_dapt.py", *common, "--max-steps", "12", "--out", str(tmp_path / "full"))
    full = summary(tmp_path / "full")
    assert full["val_ppl"] < full["base_val_ppl"]
    run("train_dapt.py", *common, "--max-steps", "6", "--out", str(tmp_path / "split"))
    run("train_dapt.py", *common, "--max-steps", "12", "--out", str(tmp_path / "split"), "--resume")
    # the same seeds and data order after the checkpoint; on a GPU only the reduction order may differ
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), rel=1e-2)
    assert_close_tensors(load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors")),
                         load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors")), 2e-2)


def test_task_on_the_gpu_matches_the_cpu_in_fp32_and_eval_scores_it(tiny_lm, tmp_path):
    data = tmp_path / "tasks"
    write_task_csvs(data, "mortality", 160, seed=3)
    common = ["--task", "mortality", "--data-dir", str(data), "--model", str(tiny_lm), "--dropout", "0",
              "--precision", "fp32", *TASK]
    run("train_task.py", *common, "--device", "cpu", "--out", str(tmp_path / "cpu"))
    run("train_task.py", *common, "--device", DEVICE, "--out", str(tmp_path / "gpu"))
    cpu, gpu = (np.load(tmp_path / d / "predictions_test.npz") for d in ("cpu", "gpu"))
    assert list(gpu["ids"]) == list(cpu["ids"]) and np.array_equal(gpu["y_true"], cpu["y_true"])
    assert np.abs(gpu["probs"] - cpu["probs"]).max() <= 1e-3
    assert summary(tmp_path / "gpu")["test_auroc"] == pytest.approx(summary(tmp_path / "cpu")["test_auroc"], abs=0.02)
    # the saved model (base + task adapter + head) reloaded by eval.py on the GPU gives the run's own predictions
    test_csv = next(data.glob("*_test.csv"))
    run("eval.py", "--run", str(tmp_path / "gpu"), "--test", str(test_csv), "--label-col",
        TASKS["mortality"].label_column, "--device", DEVICE, "--precision", "fp32", "--max-seq-len", "48",
        "--no-progress")
    again = np.load(tmp_path / "gpu" / f"predictions_{test_csv.stem}.npz")
    assert np.abs(again["probs"] - gpu["probs"]).max() <= 1e-4
