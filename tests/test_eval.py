"""eval.py end to end on synthetic run folders: metrics against scikit-learn, report files, --test, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

skm = pytest.importorskip("sklearn.metrics")

N_BOOT = "60"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_eval_module():
    """eval.py imported under another name (``eval`` is a builtin), for its pure functions and in-process main."""
    spec = importlib.util.spec_from_file_location("eval_recipe", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = load_eval_module()


def synthetic_predictions(kind: str, n: int, k: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets and probabilities that carry ``signal`` about them (random but learnable)."""
    rng = np.random.default_rng(seed)
    if kind == "multilabel":
        prevalence = rng.uniform(0.03, 0.5, k)
        y = (rng.random((n, k)) < prevalence).astype(np.uint8)
        y[:, 0] = 0  # a label never present and one always present: AUROC skips both
        y[:, 1] = 1
        logits = signal * (y - 0.5) + rng.normal(size=(n, k)) - 1.0
        return y, (1 / (1 + np.exp(-logits))).astype(np.float32)
    y = rng.choice(k, n, p=[0.7, 0.3] if k == 2 else None).astype(np.int64)
    logits = signal * np.eye(k)[y] + rng.normal(size=(n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs.astype(np.float32)


def write_predictions(path: Path, kind: str, y: np.ndarray, probs: np.ndarray, labels: list[str]) -> None:
    np.savez(path, ids=np.array([f"h{i}" for i in range(len(y))]), y_true=y, probs=probs,
             labels=np.array(labels), kind=np.array(kind))


def write_run(folder: Path, task: str, kind: str, setting: str, data: str = "demo", k: int = 2, signal: float = 1.5,
              n: int = 300, seed: int = 0) -> dict:
    """A train_task.py-like run folder with val and test predictions; returns its arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = [f"C{j:02d}" for j in range(k)] if kind == "multilabel" else [str(j) for j in range(k)]
    arrays = {}
    for split, split_seed in (("val", seed + 100), ("test", seed)):
        y, p = synthetic_predictions(kind, n, k, signal, split_seed)
        write_predictions(folder / f"predictions_{split}.npz", kind, y, p, labels)
        arrays[split] = (y, p)
    summary = {"task": task, "kind": kind, "setting": setting, "data": data, "val_auroc": 0.5, "test_auroc": None,
               "trainable_params": 12345, "trainable_percent": 0.1, "tokens_per_s": 1.0, "wall_s": 1.0,
               "best_epoch": 1, "labels": labels,
               "config": {"model": "smollm2-135m", "max_seq_len": 64, "batch_size": 8, "precision": "fp32"}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return arrays


def oracle_auroc(kind: str, y: np.ndarray, p: np.ndarray) -> float:
    """The paper's AUROC conventions, by scikit-learn."""
    if kind == "binary":
        return skm.roc_auc_score(y, p[:, 1])
    if kind == "multiclass":
        return skm.roc_auc_score(y, p, multi_class="ovo", average="macro")
    keep = (y.sum(0) > 0) & (y.sum(0) < len(y))
    return skm.roc_auc_score(y[:, keep], p[:, keep], average="macro")


def oracle_auprc_f1(kind: str, y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    if kind == "binary":
        return skm.average_precision_score(y, p[:, 1]), skm.f1_score(y, p.argmax(1), average="macro")
    if kind == "multiclass":
        ap = [skm.average_precision_score(y == c, p[:, c]) for c in np.unique(y)]
        return float(np.mean(ap)), skm.f1_score(y, p.argmax(1), average="macro")
    keep = (y.sum(0) > 0) & (y.sum(0) < len(y))
    return (skm.average_precision_score(y[:, keep], p[:, keep], average="macro"),
            skm.f1_score(y[:, keep], p[:, keep] >= 0.5, average="macro", zero_division=0))


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def run_in_process(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of eval.py's main under run_cli, in this process (bad-input paths, fast)."""
    from minilora.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: ev.main(list(argv)))
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """runs/: LoRA on mortality, LOS (4 classes), diagnoses (30 labels); head-only on mortality; a DAPT run."""
    runs = tmp_path_factory.mktemp("runs")
    arrays = {
        ("LoRA", "mortality"): ("binary", write_run(runs / "lora" / "mortality", "mortality", "binary", "LoRA")),
        ("LoRA", "los"): ("multiclass", write_run(runs / "lora" / "los", "los", "multiclass", "LoRA", k=4, seed=1)),
        ("LoRA", "diagnoses"): ("multilabel", write_run(runs / "lora" / "diag", "diagnoses", "multilabel", "LoRA",
                                                        k=30, seed=2)),
        ("head-only", "mortality"): ("binary", write_run(runs / "head_only_mor", "mortality", "binary", "head-only",
                                                         signal=4.0, seed=3)),
    }
    (runs / "dapt").mkdir()
    (runs / "dapt" / "summary.json").write_text(json.dumps({"val_ppl": 3.0, "config": {}}))
    out = runs / "report"
    proc = run_eval("--runs-dir", str(runs), "--out", str(out), "--n-boot", N_BOOT, "--seed", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return {"runs": runs, "arrays": arrays, "out": out, "proc": proc,
            "report": json.loads((out / "report.json").read_text())}


def test_a_report_into_a_used_folder_keeps_only_its_own_plots(demo, tmp_path):
    """Before: the plots of runs an earlier report held stayed beside the new report.md, as if they were in it."""
    import shutil

    out = tmp_path / "report"
    shutil.copytree(demo["out"], out)
    (out / "notes.png").write_bytes(b"mine")  # not a report plot: kept
    proc = run_eval(str(demo["runs"] / "lora" / "mortality"), "--out", str(out), "--n-boot", N_BOOT, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["notes.png", "roc_mortality_lora.png"]
    assert "1 ROC plots in" in proc.stdout


def test_a_run_reached_by_two_paths_is_one_run(demo, tmp_path):
    """Before: a symlink to a run folder made it 'two runs of task ...' and the report was refused."""
    link = tmp_path / "link"
    link.symlink_to(demo["runs"] / "lora" / "mortality")
    proc = run_eval(str(demo["runs"] / "lora" / "mortality"), str(link), "--out", str(tmp_path / "r"), "--n-boot",
                    N_BOOT, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "r" / "report.json").read_text())["runs"]) == 1


def test_metrics_equal_sklearn(demo):
    rows = {(r["setting"], r["task"]): r for r in demo["report"]["runs"]}
    assert set(rows) == set(demo["arrays"])
    for key, (kind, arrays) in demo["arrays"].items():
        r = rows[key]
        y, p = arrays["test"]
        assert r["kind"] == kind and r["n_test"] == len(y) and r["n_boot"] == int(N_BOOT)
        assert r["auroc"] == pytest.approx(oracle_auroc(kind, y, p), abs=1e-12), key
        assert r["val_auroc"] == pytest.approx(oracle_auroc(kind, *arrays["val"]), abs=1e-12), key
        auprc, f1 = oracle_auprc_f1(kind, y, p)
        assert r["auprc"] == pytest.approx(auprc, abs=1e-12) and r["f1"] == pytest.approx(f1, abs=1e-12), key
        assert r["ci_low"] < r["auroc"] < r["ci_high"], key
        assert r["auroc"] > 0.6, key  # the predictions carry signal
        assert r["trainable_params"] == 12345
    assert rows[("LoRA", "diagnoses")]["labels_scored"] == 28  # the constant labels are skipped
    assert rows[("LoRA", "los")]["column"] == "LOS" and rows[("LoRA", "diagnoses")]["column"] == "DIAG"


def test_macro_per_setting_and_top_level(demo):
    rep = demo["report"]
    by_setting = {g["setting"]: g for g in rep["settings"]}
    lora = [r["auroc"] for r in rep["runs"] if r["setting"] == "LoRA"]
    assert by_setting["LoRA"]["n_tasks"] == 3 and by_setting["LoRA"]["macro_auroc"] == pytest.approx(np.mean(lora))
    head = by_setting["head-only"]
    assert head["n_tasks"] == 1 and head["macro_auroc"] > by_setting["LoRA"]["macro_auroc"]
    # the top level is the setting covering the most tasks, not the single strong one
    assert rep["best_setting"] == {"setting": "LoRA", "data": "demo", "n_tasks": 3}
    assert rep["macro_auroc"] == by_setting["LoRA"]["macro_auroc"]
    assert all(g["paper_macro_auroc"] is None for g in rep["settings"])  # demo data: no comparison
    assert rep["skipped"] == [str(demo["runs"] / "dapt")]
    assert "skipping" in demo["proc"].stderr and "not a task run" in demo["proc"].stderr


def test_report_md_and_roc_pngs(demo):
    import matplotlib.image

    out, rep = demo["out"], demo["report"]
    md = (out / "report.md").read_text()
    assert "| setting | data | MOR | LOS | DIAG | macro |" in md
    lora = next(g for g in rep["settings"] if g["setting"] == "LoRA")
    mor = next(r for r in rep["runs"] if (r["setting"], r["task"]) == ("LoRA", "mortality"))
    assert f"| LoRA | demo | {100 * mor['auroc']:.2f} |" in md
    assert f"| {100 * lora['macro_auroc']:.2f} (3 tasks) |" in md
    assert "NOT comparable" in md and "## Paper results (reference)" in md and "73.21" in md  # the paper's best row
    assert "paper %" not in md  # no column beside demo numbers
    assert "## AUROC % by setting" in demo["proc"].stdout  # the tables are printed
    names = {r["roc_png"] for r in rep["runs"]}
    assert names == {"roc_mortality_lora.png", "roc_los_lora.png", "roc_diagnoses_lora.png",
                     "roc_mortality_head-only.png"}
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert matplotlib.image.imread(out / name)[..., :3].std() > 0.05, name  # not a blank canvas
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_mimic_runs_show_the_paper_numbers(tmp_path):
    setting = "Clinical LoRA (trainable) + LoRA"
    write_run(tmp_path / "mor", "mortality", "binary", setting, data="mimic")
    write_run(tmp_path / "los", "los", "multiclass", setting, data="mimic", k=4, seed=1)
    out = tmp_path / "report"
    proc = run_eval(str(tmp_path / "mor"), str(tmp_path / "los"), "--out", str(out), "--n-boot", "20",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "report.json").read_text())
    paper = {r["task"]: r["paper_auroc"] for r in rep["runs"]}
    assert paper == {"mortality": pytest.approx(0.7736), "los": pytest.approx(0.6632)}
    assert rep["settings"][0]["paper_macro_auroc"] == pytest.approx((0.7736 + 0.6632) / 2)
    md = (out / "report.md").read_text()
    assert "paper %" in md and "| paper: LLaMA + Clinical LoRA (trainable) + Downstream LoRA | MIMIC-III |" in md
    assert "| 77.36 |" in md and "NOT comparable" not in md


def test_a_pipe_in_a_task_or_setting_name_stays_in_its_markdown_cell(tmp_path):
    """Before: a "|" in a custom task's name, a setting or a run folder split its cell into two and shifted the rest
    of the row in report.md."""
    write_run(tmp_path / "runs" / "a|b", "icd|chapter", "binary", "LoRA | r8", n=60)
    out = tmp_path / "report"
    assert ev.main(["--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--n-boot", "20", "--no-progress"]) == 0
    md = (out / "report.md").read_text()
    for table in re.findall(r"(?:^\|.*\n)+", md, flags=re.M):  # every row of a table has its header's cells
        cells = {len(re.split(r"(?<!\\)\|", line)) for line in table.splitlines() if not line.startswith("|---")}
        assert len(cells) == 1, table
    assert "| LoRA \\| r8 | icd\\|chapter | demo |" in md and "runs/a\\|b`" in md, md


def test_roc_curves_of_many_classes_differ_in_colour_or_line_style(tmp_path, monkeypatch):
    """Before: matplotlib's 10 colours repeated, so class 0 and class 10 of a 12-class task drew alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    y, p = synthetic_predictions("multiclass", 600, 12, 2.0, 0)
    row = {"kind": "multiclass", "ci_low": 0.6, "ci_high": 0.7, "column": None, "task": "t", "setting": "LoRA",
           "data": "demo", "auroc": 0.65}
    ev.plot_roc({"y_true": y, "probs": p, "labels": [str(k) for k in range(12)]}, row, tmp_path / "roc.png")
    lines = [line for line in figures[0].axes[0].get_lines() if line.get_label() != "chance"]
    assert len(lines) == 12
    assert len({(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in lines}) == 12
    monkeypatch.undo()
    plt.close(figures[0])


def test_undefined_test_auroc_is_reported_and_left_out_of_the_macro(tmp_path, capsys):
    write_run(tmp_path / "runs" / "mor", "mortality", "binary", "LoRA", n=80)
    y, p = write_run(tmp_path / "runs" / "pmv", "pmv", "binary", "LoRA", n=40, seed=4)["test"]
    write_predictions(tmp_path / "runs" / "pmv" / "predictions_test.npz", "binary", np.zeros_like(y), p, ["0", "1"])
    out = tmp_path / "report"
    assert ev.main(["--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--n-boot", "20", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pmv" in err and "test AUROC undefined" in err and "left out of the macro" in err
    rep = json.loads((out / "report.json").read_text())
    runs = {r["task"]: r for r in rep["runs"]}
    assert runs["pmv"]["auroc"] is None and runs["pmv"]["ci_low"] is None and runs["pmv"]["roc_png"] is None
    assert rep["settings"][0]["undefined_tasks"] == ["pmv"] and rep["settings"][0]["tasks"] == ["mortality"]
    assert rep["macro_auroc"] == runs["mortality"]["auroc"]
    assert "undefined (one class in test)" in (out / "report.md").read_text()


def test_setting_names_match_paper_rows():
    expected = {
        "LoRA": "LLaMA + LoRA",
        "head-only": "LLaMA* (head only)",
        "Clinical LoRA (frozen) + LoRA": "LLaMA + Clinical LoRA (frozen) + Downstream LoRA",
        "Clinical LoRA (trainable) + LoRA": "LLaMA + Clinical LoRA (trainable) + Downstream LoRA",
        "Clinical LoRA (trainable)": "LLaMA + Clinical LoRA (trainable)",
        "LLaMA + LoRA": "LLaMA + LoRA",
        "PMC-LLaMA + LoRA": "PMC-LLaMA + LoRA",
        "my own setting": None,
    }
    assert {s: ev.paper_row(s) for s in expected} == expected


def test_embedded_paper_table_equals_the_notes():
    notes = ROOT.parent / "shared" / "docs" / "paper-notes.md"
    if not notes.is_file():
        pytest.skip(f"{notes} is absent (../shared is only on developer and CI machines)")
    section = notes.read_text().split("## Headline results")[1].split("\n\n")[0]
    table = {}
    for line in [line for line in section.splitlines() if line.startswith("|")][2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = [float(c) for c in cells[1:]]
    expected = {row: list(values.values()) for row, values in ev.PAPER_AUROC.items()}
    assert {ev.paper_row(row) or row: values for row, values in table.items()} == expected


def test_missing_predictions_and_no_runs_exit_2(tmp_path):
    write_run(tmp_path / "runs" / "mor", "mortality", "binary", "LoRA")
    (tmp_path / "runs" / "mor" / "predictions_test.npz").unlink()
    proc = run_eval("--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(tmp_path / "runs" / "mor") in proc.stderr and "missing predictions_test.npz" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_eval("--runs-dir", str(tmp_path / "empty"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no task runs found in {tmp_path / 'empty'}" in proc.stderr and "train_task.py" in proc.stderr


def test_dapt_only_folder_is_skipped_then_exit_2(tmp_path, capsys):
    (tmp_path / "dapt").mkdir()
    (tmp_path / "dapt" / "summary.json").write_text(json.dumps({"val_ppl": 3.0}))
    code, err = run_in_process(capsys, "--runs-dir", str(tmp_path))
    assert code == 2
    assert f"skipping {tmp_path / 'dapt'}: not a task run" in err
    assert "no task runs found" in err and "skipped 1 non-task run" in err


def test_two_runs_of_one_task_and_setting_exit_2(tmp_path, capsys):
    write_run(tmp_path / "a" / "mor", "mortality", "binary", "LoRA", n=50)
    write_run(tmp_path / "b" / "mor", "mortality", "binary", "LoRA", n=50)
    code, err = run_in_process(capsys, "--runs-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--n-boot", "5")
    assert code == 2 and "two runs of task 'mortality' with setting 'LoRA'" in err
    assert str(tmp_path / "a" / "mor") in err and str(tmp_path / "b" / "mor") in err


@pytest.mark.parametrize("damage, message", [
    ("garbage", "cannot read it as a numpy .npz"),
    ("truncated", "cannot read it as a numpy .npz"),
    ("no_probs", "no array 'probs'"),
    ("short_probs", "expected ids [n], y_true [n] or [n, L]"),
    ("labels", "labels has shape (3,) but probs has 2 columns"),
    ("kind", "kind is 'multiclass' but summary.json says 'binary'"),
    ("class_index", "y_true holds class 2 but probs has 2 columns"),
    ("not_softmax", "binary probs rows must be softmax probabilities summing to 1"),
])
def test_bad_predictions_exit_2(tmp_path, capsys, damage, message):
    run = tmp_path / "mor"
    y, p = write_run(run, "mortality", "binary", "LoRA", n=50)["test"]
    path = run / "predictions_test.npz"
    if damage == "garbage":
        path.write_bytes(b"not an npz" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "no_probs":
        np.savez(path, ids=np.array(["a"] * 50), y_true=y, labels=np.array(["0", "1"]), kind=np.array("binary"))
    elif damage == "short_probs":
        write_predictions(path, "binary", y, p[:-1], ["0", "1"])
    elif damage == "labels":
        write_predictions(path, "binary", y, p, ["0", "1", "2"])
    elif damage == "kind":
        write_predictions(path, "multiclass", y, p, ["0", "1"])
    elif damage == "class_index":
        write_predictions(path, "binary", np.where(y == 1, 2, 0), p, ["0", "1"])
    else:
        write_predictions(path, "binary", y, p * 2, ["0", "1"])
    code, err = run_in_process(capsys, str(run), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and message in err and str(path) in err, err


# ------------------------------------------------------------------------- --run RUN_DIR --test FILE
def test_score_a_new_file_with_a_trained_run(tiny_lm, tmp_path, capsys):
    import torch

    from minilora import from_pretrained
    from minilora.classify import Classifier
    from minilora.data.notes import clean_note
    from minilora.data.synthetic import generate_patients, render_note
    from minilora.lora import add_adapter, lora_layers, save_adapter

    torch.manual_seed(0)
    lm, tok = from_pretrained(tiny_lm, dtype="fp32")
    add_adapter(lm, "task", r=4, alpha=8)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for _, layer in lora_layers(lm):
            layer.lora_B["task"].normal_(std=0.2)
    model = Classifier(lm, 2).eval()
    run = tmp_path / "run"
    save_adapter(lm, "task", run / "task_adapter")
    model.save_head(run / "head", labels=["0", "1"])
    max_len = 48
    (run / "summary.json").write_text(json.dumps({
        "task": "mortality", "kind": "binary", "setting": "LoRA", "data": "custom", "labels": ["0", "1"],
        "config": {"model": str(tiny_lm), "max_seq_len": max_len, "batch_size": 4, "precision": "fp32"}}))

    texts = [render_note(p, random.Random(i), "admission") for i, p in enumerate(generate_patients(16, seed=7))]
    labels = [str(i % 2) for i in range(16)]
    test = tmp_path / "new_notes.csv"
    with open(test, "w", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)
        w.writerow(["id", "text", "label"])
        w.writerows([[f"a{i}", t, lab] for i, (t, lab) in enumerate(zip(texts, labels))])
        w.writerow(["x1", texts[0], "7"])  # a label the run never saw: counted, left out
        w.writerow(["x3", texts[1], "on lasix, for the chf"])  # text in the label column: counted, not printed
        w.writerow(["x2", "  [** **] ", "1"])  # empty after cleaning: counted, skipped
    proc = run_eval("--run", str(run), "--test", str(test), "--n-boot", "30", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "2 rows left out" in proc.stderr and "1 rows with empty text skipped" in proc.stderr
    assert "(7, 1 longer values not shown)" in proc.stderr and "lasix" not in proc.stderr
    assert "AUROC" in proc.stdout and "95% CI" in proc.stdout

    with np.load(run / "predictions_new_notes.npz") as npz:
        assert npz["ids"].tolist() == [f"a{i}" for i in range(16)] and str(npz["kind"]) == "binary"
        y, probs = npz["y_true"], npz["probs"]
    assert y.tolist() == [int(lab) for lab in labels]
    with torch.no_grad():  # oracle: each note alone, unpadded, through the in-memory model
        expected = np.stack([torch.softmax(model(torch.tensor([tok.encode(clean_note(t), bos=tok.add_bos)[:max_len]])),
                                           -1)[0].numpy() for t in texts])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    result = json.loads((run / "eval_new_notes.json").read_text())
    assert result["auroc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert result["ci_low"] <= result["auroc"] <= result["ci_high"]
    assert result["counts"] == {"rows": 16, "empty_text": 1, "unknown_labels": 2}

    no_label = tmp_path / "no_label.csv"
    no_label.write_text('"id","text"\n"1","chest pain"\n')
    code, err = run_in_process(capsys, "--run", str(run), "--test", str(no_label))
    assert code == 2 and err.count("\n") == 1 and "missing column 'label'" in err and str(no_label) in err
    code, err = run_in_process(capsys, "--run", str(run), "--test", str(tmp_path / "test.csv.gz"))
    assert code == 2 and "would overwrite train_task.py's predictions_test.npz" in err and "--out" in err

    # --predict: the same notes without labels (JSONL, one with empty text) -> CSV and npz, no metrics
    cohort = tmp_path / "cohort.jsonl"
    cohort.write_text("".join(json.dumps({"id": f"u{i}", "text": t}) + "\n" for i, t in enumerate(texts))
                      + json.dumps({"id": "e", "text": " [** **] "}) + "\n")
    proc = run_eval("--run", str(run), "--predict", str(cohort), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "16 notes of cohort.jsonl scored" in proc.stdout and "1 rows with empty text skipped" in proc.stderr
    with open(run / "predictions_cohort.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "prob_0", "prob_1"] and [r[0] for r in rows[1:]] == [f"u{i}" for i in range(16)]
    np.testing.assert_allclose(np.array([[float(x) for x in r[1:]] for r in rows[1:]]), expected, atol=1e-5)
    with np.load(run / "predictions_cohort.npz") as npz:
        assert "y_true" not in npz.files and npz["ids"].tolist() == [f"u{i}" for i in range(16)]
        np.testing.assert_allclose(npz["probs"], expected, atol=1e-5)
    assert not (run / "eval_cohort.json").exists()
    code, err = run_in_process(capsys, "--run", str(run), "--predict", str(cohort), "--text-col", "note")
    assert code == 2 and err.count("\n") == 1 and "no field 'note'" in err and str(cohort) in err
    code, err = run_in_process(capsys, "--run", str(run), "--test", str(test), "--predict", str(cohort))
    assert code == 2 and "not both" in err
    code, err = run_in_process(capsys, "--predict", str(cohort))
    assert code == 2 and "--run goes with --test or --predict" in err


def test_test_files_default_to_the_tasks_label_column(tmp_path):
    """--test without --label-col reads van Aken's column of the run's task (short_codes for DIAG) when the file has
    it, else ``label`` (re-uploads, custom tasks)."""
    van_aken = tmp_path / "DIA_GROUPS_3_DIGITS_adm_test.csv"
    van_aken.write_text('"id","text","short_codes"\n"1","chest pain","401,250"\n')
    two_col = tmp_path / "diag.jsonl"
    two_col.write_text('{"text": "chest pain", "label": "401,250"}\n')
    assert ev.default_label_col(van_aken, "diagnoses") == "short_codes"
    assert ev.default_label_col(van_aken, "DIAG") == "short_codes"
    assert ev.default_label_col(two_col, "diagnoses") == "label"
    assert ev.default_label_col(van_aken, "my-custom-task") == "label"
