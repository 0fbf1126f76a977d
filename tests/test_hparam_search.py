"""tools/hparam_search.py on a tiny random LLaMA: every grid point trained, the best chosen on validation AUROC, the
search folder a run folder that eval.py reads, a rerun resumes, and bad arguments exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from minilora.data.synthetic import write_task_csvs
from minilora.metrics import task_auroc

FAST = ["--max-seq-len", "48", "--batch-size", "16", "--precision", "fp32", "--no-progress", "--workers", "1",
        "--epochs", "1"]


def search(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "hparam_search.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def done(tiny_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    write_task_csvs(d / "data", "los", 160, seed=3)
    train = ["--task", "los", "--data-dir", str(d / "data"), "--model", str(tiny_lm), *FAST]
    out = d / "out"
    proc = search("--out", str(out), "--r", "2,4", "--alpha", "8", "--dropout", "0,0.1", "--", *train)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "train": train, "proc": proc}


def test_every_grid_point_is_a_trial_and_the_best_is_chosen_on_validation(done):
    out = done["out"]
    search_json = json.loads((out / "search.json").read_text())
    names = sorted(p.name for p in (out / "trials").iterdir())
    assert names == ["r2-alpha8-dropout0", "r2-alpha8-dropout0.1", "r4-alpha8-dropout0", "r4-alpha8-dropout0.1"]
    val = {}
    for t in search_json["trials"]:  # each trial's numbers are its own run's, recomputed from its predictions
        trial = Path(t["dir"])
        summary = json.loads((trial / "summary.json").read_text())
        assert (summary["config"]["r"], summary["config"]["alpha"], summary["config"]["dropout"]) == (
            t["r"], t["alpha"], t["dropout"])
        with np.load(trial / "predictions_val.npz") as npz:
            val[trial.name] = task_auroc(npz["y_true"], npz["probs"], "multiclass")
        assert t["val_auroc"] == pytest.approx(val[trial.name], abs=1e-12) == summary["val_auroc"]
    best = max(val, key=val.get)
    assert Path(search_json["best"]["dir"]).name == best
    selected = json.loads((out / "summary.json").read_text())
    assert selected["search"]["selected"] == search_json["best"]["dir"] and selected["search"]["trials"] == 4
    assert selected["val_auroc"] == pytest.approx(val[best], abs=1e-12)
    for name in ("predictions_test.npz", "head/head.safetensors", "task_adapter/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (out / "trials" / best / name).read_bytes(), name
    assert not (out / "checkpoint").exists()
    assert "selected r=" in done["proc"].stdout and "test AUROC" in done["proc"].stdout
    md = (out / "search.md").read_text()
    assert md.count("| 2 |") + md.count("| 4 |") == 4 and "Selected on validation AUROC" in md


def test_eval_reads_the_search_folder_as_one_run(done, tmp_path):
    out = done["out"]
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--runs-dir", str(out.parent), "--out",
                           str(tmp_path / "report"), "--n-boot", "20", "--no-progress"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [Path(r["run_dir"]) for r in report["runs"]] == [out]  # the trials lie too deep to be reports of their own
    test = json.loads((out / "summary.json").read_text())["test_auroc"]
    assert report["runs"][0]["auroc"] == pytest.approx(test, abs=1e-12)


def test_a_rerun_reuses_finished_trials_and_other_arguments_are_refused(done):
    out = done["out"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/summary.json")}
    proc = search("--out", str(out), "--r", "2,4", "--alpha", "8", "--dropout", "0,0.1", "--", *done["train"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training in" not in proc.stderr and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a trial interrupted after its checkpoint (here: its summary.json gone) is resumed, not restarted
    trial = out / "trials" / "r4-alpha8-dropout0.1"
    before = json.loads((trial / "summary.json").read_text())
    metrics = (trial / "metrics.jsonl").read_text()  # a fresh start would log new timings
    (trial / "summary.json").unlink()
    proc = search("--out", str(out), "--r", "2,4", "--alpha", "8", "--dropout", "0,0.1", "--", *done["train"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("training in") == 1 and f"training in {trial}" in proc.stderr
    after = json.loads((trial / "summary.json").read_text())
    assert after["val_auroc"] == before["val_auroc"] and after["best_step"] == before["best_step"]
    assert (trial / "metrics.jsonl").read_text() == metrics
    proc = search("--out", str(out), "--", *done["train"], "--lr", "1e-3")
    assert proc.returncode == 2 and "an earlier search here ran train_task.py with other arguments" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--r", "2,x"], "--r '2,x': expected comma-separated int values"),
    (["--dropout", "0,1.5"], "--dropout '0,1.5': expected values in [0, 1)"),
    (["--", "--task", "mortality", "--dr", "0.1"], "--dropout after --: the search sets it"),
    (["--", "--task", "mortality", "--no-task-adapter"], "--no-task-adapter: a head-only run has no LoRA"),
])
def test_bad_arguments_exit_2_before_training(tmp_path, args, message):
    proc = search("--out", str(tmp_path / "s"), *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "s" / "trials").exists()


def _hparam_search_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hparam_search", ROOT / "tools" / "hparam_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_trial_is_listed_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    """Before: one diverging grid point (NaN loss, exit 1) stopped the search, and the advice to rerun hit the same
    trial again each time, so the other trials never ran."""
    hs = _hparam_search_module()

    def fake_trial(train_args, trial, r, alpha, dropout):  # r=4 diverges; the others finish with AUROC 0.5 + r/100
        if r == 4:
            return 1
        trial.mkdir(parents=True, exist_ok=True)
        (trial / "summary.json").write_text(json.dumps({"task": "mortality", "setting": "LoRA",
                                                        "val_auroc": 0.5 + r / 100, "test_auroc": 0.6}))
        return 0

    monkeypatch.setattr(hs, "run_trial", fake_trial)
    out = tmp_path / "s"
    assert hs.main(["--out", str(out), "--r", "2,4,8", "--alpha", "8", "--dropout", "0", "--", "--task",
                    "mortality"]) == 0
    err = capsys.readouterr().err
    assert "r=4 alpha=8 dropout=0: FAILED (train_task.py exited with code 1" in err
    assert "warning: 1 of 3 trials failed and were left out of the selection" in err
    record = json.loads((out / "search.json").read_text())
    assert Path(record["best"]["dir"]).name == "r8-alpha8-dropout0" and record["complete"] is False
    assert [t.get("failed") for t in record["trials"]] == [None, 1, None]
    assert "| 4 | 8 | 0 | failed (exit 1) | - | - |" in (out / "search.md").read_text()


def test_an_out_holding_another_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    proc = search("--out", str(tmp_path / "run"), "--", "--task", "mortality")
    assert proc.returncode == 2 and "holds a run that is not a search (no search.json)" in proc.stderr
    assert not (tmp_path / "run" / "search.json").exists()


def test_sigterm_stops_the_running_trial_too(tiny_lm, tmp_path):
    """Before: SIGTERM ended the search, and its train_task.py child trained on alone in the trial folder."""
    import signal
    import time

    write_task_csvs(tmp_path / "data", "mortality", 160, seed=3)
    out = tmp_path / "s"
    train = ["--task", "mortality", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_lm), *FAST[:-2],
             "--epochs", "500", "--save-every", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "hparam_search.py"), "--out", str(out), "--r", "2",
                             "--alpha", "8", "--dropout", "0", "--", *train], stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ckpt = out / "trials" / "r2-alpha8-dropout0" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 120 s"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received: checkpoint saved" in err and "stopped:" in err
    assert not [pid for pid in _pids() if str(out).encode() in _cmdline(pid)], "a trial is still running"


def _pids() -> list[str]:
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: str) -> bytes:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""
