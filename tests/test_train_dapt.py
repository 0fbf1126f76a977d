"""train_dapt.py end to end on a tiny random LLaMA: learning, exact resume after kill -9, SIGTERM, torchrun, errors."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT
from minilora.data.synthetic import write_dapt_corpus

FAST = ["--max-seq-len", "64", "--batch-size", "8", "--precision", "fp32", "--no-progress", "--workers", "1"]


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    return write_dapt_corpus(tmp_path_factory.mktemp("notes") / "notes.jsonl", 60, seed=5)


def dapt(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train_dapt.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_dapt failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def adapter_tensors(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dapt_learns_and_writes_all_outputs(tiny_lm, notes, tmp_path):
    out = tmp_path / "run"
    dapt("--model", str(tiny_lm), "--notes", str(notes), "--out", str(out), "--max-steps", "40", "--lr", "5e-3",
         "--eval-every", "20", "--cache-dir", str(tmp_path / "cache"), *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_ppl"] < summary["base_val_ppl"]
    for key in ("train_tokens", "tokens_per_s", "peak_mem_mb", "wall_s"):
        assert summary[key] > 0, key
    assert summary["config"]["r"] == 16 and summary["config"]["targets"] == "q_proj,v_proj"
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "checkpoint" / "state.pt").is_file()


def test_no_packing_and_toml_config(tiny_lm, notes, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('max_steps = 3\nr = 4\n[optim]\nlr = 1e-3\n')
    out = tmp_path / "run"
    dapt("--config", str(cfg), "--model", str(tiny_lm), "--notes", str(notes), "--out", str(out), "--r", "8",
         "--no-packing", "--cache-dir", str(tmp_path / "cache"), *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["r"] == 8 and summary["config"]["lr"] == 1e-3 and summary["config"]["max_steps"] == 3
    assert summary["train_sequences"] + summary["val_sequences"] == 60  # one sequence per note
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    proc = dapt("--config", str(bad), check=False)
    assert proc.returncode == 2 and "unknown setting 'learning_rate'" in proc.stderr


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_precision_auto_is_bf16_only_on_a_cpu_with_native_bf16(tiny_lm, notes, tmp_path):
    """No --precision: bf16 autocast where the CPU multiplies bf16 natively (AVX512-BF16 or AMX, read from the
    kernel's CPU flags), else fp32, which an emulated bf16 would only slow down, with a note saying so."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    want = "bf16" if flags & {"avx512_bf16", "amx_bf16", "amx_tile"} else "fp32"
    out = tmp_path / "run"
    proc = dapt("--model", str(tiny_lm), "--notes", str(notes), "--out", str(out), "--max-steps", "1",
                "--cache-dir", str(tmp_path / "cache"), *[a for a in FAST if a not in ("--precision", "fp32")])
    assert json.loads((out / "summary.json").read_text())["config"]["precision"] == want
    assert ("precision: fp32 (auto: no native bf16 matmul on cpu" in proc.stderr) == (want == "fp32")


def test_training_on_the_cpu_imports_neither_triton_nor_dynamo(tiny_lm, notes, tmp_path):
    """torch.optim's Optimizer imports torch._dynamo (and triton with it) when its first parameter group is added:
    1.4 s and about 150 MB of resident memory. minilora.optim avoids it; a run and its resume import neither."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINILORA_KERNELS")}
    out = tmp_path / "run"
    for steps, extra in (("2", []), ("3", ["--resume"])):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train_dapt.py"), "--model",
                               str(tiny_lm), "--notes", str(notes), "--out", str(out), "--max-steps", steps,
                               "--cache-dir", str(tmp_path / "cache"), *FAST, *extra],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert {"minilora.optim", "minilora.train"} <= imported and not {"torch._dynamo", "triton"} & imported
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        path = run / "metrics.jsonl"
        if path.is_file() and any(json.loads(l).get("step", 0) >= step for l in path.read_text().splitlines() if l):
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_kill9_then_resume_is_bit_identical(tiny_lm, notes, tmp_path):
    common = ["--model", str(tiny_lm), "--notes", str(notes), "--max-steps", "24", "--save-every", "4",
              "--eval-every", "8", "--lr", "2e-3", "--cache-dir", str(tmp_path / "cache"), "--dropout", "0.1",
              *FAST, "--batch-size", "16", "--max-seq-len", "128"]
    dapt(*common, "--out", str(tmp_path / "full"))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_dapt.py"), *common, "--out", str(run)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = max(r["step"] for r in metrics(run))
    assert done < 24, "the run finished before it could be killed"
    dapt(*common, "--out", str(run), "--resume")
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(run)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [r.get("loss") for r in metrics(run)] == [r.get("loss") for r in metrics(tmp_path / "full")]


def test_sigterm_saves_checkpoint_and_resume_finishes(tiny_lm, notes, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train_dapt.py"), "--model", str(tiny_lm), "--notes", str(notes), "--out",
            str(run), "--max-steps", "400", "--save-every", "1000", "--cache-dir", str(tmp_path / "cache"), *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received: checkpoint saved" in err and "--resume" in err
    step = max(r["step"] for r in metrics(run))
    assert 3 <= step < 400 and (run / "checkpoint" / "state.pt").is_file()
    dapt(*args[2:], "--resume", "--max-steps", str(step + 2))
    assert max(r["step"] for r in metrics(run)) == step + 2


def test_torchrun_two_ranks_match_one_process(tiny_lm, notes, tmp_path):
    common = ["--model", str(tiny_lm), "--notes", str(notes), "--max-steps", "6", "--lr", "3e-3",
              "--cache-dir", str(tmp_path / "cache"), *FAST]
    # One thread in every process: BLAS may pick other kernels (and summation orders) for another thread count,
    # or on a loaded machine, which moves Adam's update of near-zero gradient elements by a fraction of the lr.
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    dapt(*common, "--out", str(tmp_path / "one"), env=one_thread)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_dapt.py"), *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **one_thread})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert one["train_tokens"] == two["train_tokens"]
    assert abs(one["val_ppl"] - two["val_ppl"]) <= 1e-4 * one["val_ppl"]


def test_a_resume_with_another_number_of_processes_is_refused_with_dropout(tiny_lm, notes, tmp_path):
    """Before: a 2-rank run with LoRA dropout resumed in 1 process without a word and drew other masks (adapters 0.5
    apart from the uninterrupted run); without dropout it continues, with a notice."""
    common = ["--model", str(tiny_lm), "--notes", str(notes), "--lr", "3e-3", "--cache-dir", str(tmp_path / "cache"),
              *FAST]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for dropout in ("0.1", "0"):
        out = tmp_path / f"d{dropout}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_dapt.py"), *common, "--dropout", dropout, "--max-steps", "2", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=one_thread)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = dapt(*common, "--dropout", dropout, "--max-steps", "3", "--out", str(out), "--resume", check=False)
        if dropout == "0.1":
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert proc.stderr.strip().splitlines()[-1] == (
                f"error: {out / 'checkpoint' / 'state.pt'}: saved by a run of 2 process(es), this one has 1; with "
                "LoRA dropout each rank draws its own masks, so the run would not continue as it began: resume with "
                "2 (torchrun --nproc_per_node 2), or start again with --overwrite")
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "resume: saved by 2 process(es), continuing with 1" in proc.stderr
            assert max(r["step"] for r in metrics(out)) == 3


def test_bad_input_under_torchrun_is_one_line(tiny_lm, tmp_path):
    """Before: a bad notes file (read by rank 0 while the others waited) printed its one line and then rank 1's gloo
    traceback ('Connection closed by peer'); an error that every rank meets (a missing model) was printed by each."""
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"text": "x"}\n{"text": \n')
    for model, message in ((tiny_lm, "line 2: not valid JSON"), (tmp_path / "nowhere", "nowhere: no such file")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_dapt.py"), "--model", str(model), "--notes", str(bad), "--max-steps", "2",
               "--out", str(tmp_path / "run"), *FAST]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert "[rank1]" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]


def test_a_first_demo_run_under_torchrun_keeps_the_ranks_together(tiny_lm, tmp_path):
    """Before: each rank decided for itself whether to join the collective around writing the demo corpus; a rank
    that saw rank 0's half-written file skipped it, and the ranks stayed one collective apart until the timeout (2
    of 3 first runs hung). Now rank 0 decides inside the collective, and the corpus is written whole, then renamed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_dapt.py"), "--model", str(tiny_lm), "--out", str(tmp_path / "runs" / "dapt"),
           "--max-steps", "1", *FAST, "--eval-max-seqs", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILORA_DIST_TIMEOUT_MIN": "1"}  # a desync fails in a minute
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "demo-data" / "dapt_notes.jsonl").is_file()
    assert not list((tmp_path / "runs" / "demo-data").glob(".*.tmp*"))


def test_non_finite_loss_stops_with_last_good_checkpoint(tiny_lm, notes, tmp_path):
    # alpha 1e38 scales the LoRA gradients past the fp32 range: caught before the optimizer corrupts the weights
    run = tmp_path / "run"
    proc = dapt("--model", str(tiny_lm), "--notes", str(notes), "--out", str(run), "--max-steps", "200",
                "--alpha", "1e38", "--save-every", "1", "--cache-dir", str(tmp_path / "c"), *FAST, check=False)
    assert proc.returncode == 1
    assert "gradient norm became inf at step 1" in proc.stderr or "gradient norm became nan at step 1" in proc.stderr
    assert "No checkpoint had been written yet" in proc.stderr and not (run / "checkpoint" / "state.pt").exists()


def test_trainer_stops_on_non_finite_loss(tmp_path):
    """The loss check itself, in-process: a loss that turns NaN at step 3 stops with the step-2 checkpoint."""
    import torch

    from minilora.train import NonFiniteLoss, TrainConfig, Trainer

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        x = batch["input_ids"]
        loss = m(x).pow(2).sum()
        return (loss * float("nan") if len(calls) == 3 else loss), x.shape[0]

    cfg = TrainConfig(lr=1e-2, max_steps=10, batch_size=2, precision="fp32", progress=False, save_every=1)
    tr = Trainer(net, cfg, [torch.randn(3) for _ in range(8)], lambda xs: {"input_ids": torch.stack(xs)}, loss_fn,
                 tmp_path)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3; stopped. The last good checkpoint is"):
        tr.fit()
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["state"]["step"] == 2


# ---- bad notes: one clear line each, exit code 2 ----

@pytest.mark.parametrize("case", ["empty", "corrupt-gz", "missing-column", "non-utf8"])
def test_bad_notes_files(tiny_lm, tmp_path, case):
    if case == "empty":
        f = tmp_path / "notes.txt"
        f.write_text("")
        want = "empty file"
    elif case == "corrupt-gz":
        f = tmp_path / "discharge.csv.gz"
        f.write_bytes(gzip.compress(b"note_id,text\n1,hello there\n")[:20])
        want = "discharge.csv.gz"
    elif case == "missing-column":
        f = tmp_path / "discharge.csv"
        f.write_text("note_id,body\n1,some note\n")
        want = "text"
    else:
        f = tmp_path / "notes.txt"
        f.write_bytes(b"a fine note\nbad \xff\xfe bytes here\n")
        want = "line 2"
    proc = dapt("--model", str(tiny_lm), "--notes", str(f), "--out", str(tmp_path / "run"),
                "--cache-dir", str(tmp_path / "c"), *FAST, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error:") and str(f.name) in err[-1] and want in err[-1], err[-1]
    assert "Traceback" not in proc.stderr


def test_empty_notes_are_skipped_and_counted(tiny_lm, notes, tmp_path):
    rows = [json.loads(l) for l in notes.read_text().splitlines()]
    rows[3]["text"] = "   "
    rows[7]["text"] = "[** **]\n"
    f = tmp_path / "notes.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = dapt("--model", str(tiny_lm), "--notes", str(f), "--out", str(out), "--max-steps", "1",
                "--cache-dir", str(tmp_path / "c"), *FAST)
    stats = json.loads((out / "summary.json").read_text())["notes"]
    assert stats["empty"] == 2 and stats["notes"] == 58
    assert "empty" in proc.stderr
