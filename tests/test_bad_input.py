"""Bad input found by an audit of the CLIs (20261202): each case now stops with one line naming the file, setting or
flag and what was expected (exit 2 from the CLIs), before any work, and writes nothing half-way."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train_dapt
import train_task
from conftest import ROOT
from minilora.classify import Classifier
from minilora.cli import parse_with_config, run_cli
from minilora.data.tasks import TaskDataError, load_task_files
from minilora.lora import add_adapter, load_adapter, save_adapter
from minilora.model import LlamaConfig, Transformer
from minilora.train import TrainConfig, Trainer

SECRET = "ZQSECRET"


# ---- flags and TOML settings


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "argument --batch-size: expected an integer >= 1, got 0"),
    ("--grad-accum", "0", "argument --grad-accum: expected an integer >= 1, got 0"),
    ("--max-steps", "0", "argument --max-steps: expected an integer >= 1, got 0"),
    ("--max-seq-len", "-1", "argument --max-seq-len: expected an integer >= 1, got -1"),
    ("--lr", "-1", "argument --lr: expected a number > 0, got -1"),
    ("--head-lr", "0", "argument --head-lr: expected a number > 0, got 0"),
    ("--epochs", "0", "argument --epochs: expected a number > 0, got 0"),
    ("--warmup-ratio", "2", "argument --warmup-ratio: expected a fraction in [0, 1), got 2"),
    ("--weight-decay", "nan", "argument --weight-decay: expected a number >= 0, got nan"),
    ("--r", "x", "argument --r: expected an integer >= 1, got 'x'"),
])
def test_numeric_flags_refuse_values_that_would_run_but_not_as_asked(flag, value, message, capsys):
    """Before: --max-seq-len 0 fell back to the default, -1 cut the last token, --epochs 0 trained 10 epochs, --lr -1
    ascended the loss, --grad-accum 0 divided by zero."""
    with pytest.raises(SystemExit) as e:
        train_task.build_parser().parse_args([flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_refuses_a_negative_batch(capsys):
    """Before: --batch-size -1 wrote all-zero probabilities and reported AUROC 50."""
    import eval as eval_cli

    with pytest.raises(SystemExit) as e:
        eval_cli.build_parser().parse_args(["--batch-size", "-1"])
    assert e.value.code == 2 and "argument --batch-size: expected an integer >= 1, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("toml, message", [
    ("r = 1.5", "setting 'r': expected an integer >= 1, got '1.5'"),
    ("seed = 1.5", "setting 'seed': expected an integer, got 1.5"),
    ("r = 0", "setting 'r': expected an integer >= 1, got 0"),
    ('r = "sixteen"', "setting 'r': expected an integer >= 1, got 'sixteen'"),
    ("r = true", "setting 'r': expected a number or a string, got true"),
    ("max_seq_len = [32, 64]", "setting 'max_seq_len': expected one value, got [32, 64]"),
    ('no_packing = "false"', "setting 'no_packing': expected true or false, got 'false'"),
    ('precision = "fp16"', "setting 'precision': expected one of auto, bf16, fp32, got 'fp16'"),
    ("targets = 3", "setting 'targets': expected a string, got 3"),
    ("notes = [[1]]", "setting 'notes': expected a list of values, got [1]"),
])
def test_toml_settings_are_checked_like_their_flags(tmp_path, toml, message, capsys):
    """argparse applies a flag's type and choices to command-line strings only, not to defaults, so TOML values went
    through unchecked: 'false' counted as true, r = 1.5 crashed in torch.empty."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(SystemExit) as e:
        parse_with_config(train_dapt.build_parser(), ["--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {cfg}: {message}" in err and err.count("\n") == 1, err


def test_toml_settings_of_the_right_types_are_taken(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('notes = "a.jsonl"\nno_packing = true\nr = 4\nalpha = 8\nlr = 1e-3\n[optim]\nmax_steps = 3\n')
    args = parse_with_config(train_dapt.build_parser(), ["--config", str(cfg), "--r", "2"])
    assert (args.notes, args.no_packing, args.r, args.alpha, args.lr, args.max_steps) == (["a.jsonl"], True, 2, 8.0,
                                                                                         1e-3, 3)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a folder, expected a TOML config file"),
    (lambda p: p.write_bytes(b"r = 16 # caf\xe9\n"), "not UTF-8 text (byte 12), expected a TOML file"),
])
def test_a_config_that_is_not_a_toml_text_file(tmp_path, make, message, capsys):
    cfg = tmp_path / "c.toml"
    make(cfg)
    with pytest.raises(SystemExit) as e:
        parse_with_config(train_task.build_parser(), ["--config", str(cfg)])
    assert e.value.code == 2 and f"error: {cfg}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("where, message", [
    ("file", "a file stands where a folder is needed (File exists)"),
    ("file/run", "a file stands where a folder is needed (Not a directory)"),
])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, where, message, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: (tmp_path / where).mkdir(parents=True, exist_ok=True))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {tmp_path / where}: {message}\n", err


def test_recipe_out_on_a_file_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "train_task.py"), "--out", str(tmp_path / "file" / "run"),
                           "--max-steps", "1", "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ") and \
        "a file stands where a folder is needed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---- task files


def _task(tmp_path: Path, train: str, name: str = "t.csv", val: str | None = None) -> dict:
    path = tmp_path / name
    path.write_text(train)
    other = tmp_path / f"other_{name}"
    other.write_text(val if val is not None else train)
    return {"train": path, "val": other, "test": other}


@pytest.mark.parametrize("line, message", [
    ("42", "line 2 is a JSON number, expected an object"),
    (json.dumps(f"{SECRET} text label"), "line 2 is a JSON string, expected an object"),
    (json.dumps({"id": 3, "text": {"a": SECRET}, "label": 1}), "line 2: field 'text' is a JSON object"),
])
def test_jsonl_lines_that_are_not_rows(tmp_path, line, message):
    good = json.dumps({"id": 1, "text": f"{SECRET} fever", "label": 0})
    with pytest.raises(TaskDataError) as e:
        load_task_files(_task(tmp_path, f"{good}\n{line}\n", "t.jsonl"), "t", "binary")
    assert message in str(e.value) and SECRET not in str(e.value)


def test_a_folder_or_a_gz_name_on_plain_text(tmp_path):
    files = _task(tmp_path, "id,text,label\n1,a,0\n2,b,1\n")
    with pytest.raises(TaskDataError, match="is a folder, expected a CSV or JSONL file"):
        load_task_files({**files, "train": tmp_path}, "t", "binary")
    fake = tmp_path / "t2.csv.gz"
    fake.write_text("id,text,label\n1,a,0\n")
    with pytest.raises(TaskDataError) as e:
        load_task_files({**files, "train": fake}, "t", "binary")
    assert str(e.value) == f"{fake}: not a gzip file, though its name ends in .gz"  # no bytes of it quoted


def test_van_aken_files_named_gz_that_are_not(tmp_path):
    for split in ("train", "val", "test"):
        (tmp_path / f"MP_IN_adm_{split}.csv.gz").write_text("id,text,hospital_expire_flag\n1,a,0\n")
    from minilora.data.tasks import load_named_task

    with pytest.raises(TaskDataError, match="MP_IN_adm_train.csv.gz: not a gzip file"):
        load_named_task("mortality", tmp_path)


def test_labels_that_would_fail_only_after_training(tmp_path):
    """Before: a binary task with a third value, or a split whose labels training never saw, trained and then
    failed in the AUROC, leaving a run folder without summary.json; multi-label with no codes ended in a NaN loss."""
    rows = "id,text,label\n1,a,0\n2,b,1\n3,c,2\n"
    with pytest.raises(TaskDataError, match="'label' has 3 distinct values in training; the t task is binary"):
        load_task_files(_task(tmp_path, rows), "t", "binary")
    files = _task(tmp_path, "id,text,label\n1,a,0\n2,b,1\n", val="id,text,label\n5,e,yes\n6,f,no\n")
    with pytest.raises(TaskDataError, match=r"other_t.csv: no row with text and a label seen in training \(2 left"):
        load_task_files(files, "t", "binary")
    with pytest.raises(TaskDataError, match="'label' holds no label code in training"):
        load_task_files(_task(tmp_path, "id,text,label\n1,a,\n2,b,\n"), "t", "multilabel")


# ---- checkpoints, adapters, heads


class Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.body = nn.Linear(4, width)
        self.head = nn.Linear(width, 2, bias=False)

    def forward(self, x):
        return self.head(self.body(x))


def _trainer(tmp_path: Path, width: int, identity: dict | None = None, **settings) -> Trainer:
    cfg = TrainConfig(**{"lr": 1e-3, "epochs": 1, "batch_size": 2, "precision": "fp32", "progress": False,
                         "save_every": 0, **settings})
    return Trainer(Net(width), cfg, [torch.randn(4) for _ in range(4)], lambda rows: {"input_ids": torch.stack(rows)},
                   lambda m, b: (m(b["input_ids"]).pow(2).sum(), b["input_ids"].shape[0]), tmp_path,
                   identity=identity)


def test_resuming_with_other_data_or_settings_is_refused(tmp_path, capsys):
    """Before: --resume with other notes, --lr or --seed continued the saved optimizer and schedule on the new data,
    and summary.json recorded settings that had not trained the adapter."""
    _trainer(tmp_path, 4, {"notes": "abc", "max_seq_len": 128}, seed=1).save_checkpoint()
    with pytest.raises(ValueError) as e:
        _trainer(tmp_path, 4, {"notes": "def", "max_seq_len": 128}, lr=5e-2, seed=7).load_checkpoint()
    assert str(e.value) == (f"{tmp_path / 'checkpoint' / 'state.pt'}: saved by a run with other settings (lr 0.001 "
                            "-> 0.05; seed 1 -> 7; notes 'abc' -> 'def'); resume with the same ones, or start again "
                            "with --overwrite")
    # the same run resumes; a longer one too, saying that its schedule stretches; precision may change
    assert _trainer(tmp_path, 4, {"notes": "abc", "max_seq_len": 128}, seed=1).load_checkpoint()
    assert "resume:" not in capsys.readouterr().err
    assert _trainer(tmp_path, 4, {"notes": "abc", "max_seq_len": 128}, seed=1, max_steps=9,
                    precision="bf16").load_checkpoint()
    assert "resume: max_steps None -> 9: the learning-rate schedule now runs over 9 steps" in capsys.readouterr().err
    torch.save({k: v for k, v in torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False).items()
                if k not in ("identity", "config")}, tmp_path / "checkpoint" / "state.pt")
    assert _trainer(tmp_path, 4, {"other": 1}, lr=1.0).load_checkpoint()  # an older checkpoint: nothing to compare


@pytest.mark.parametrize("recipe, outputs", [("train_dapt.py", ["adapter", "summary.json"]),
                                             ("train_task.py", ["checkpoint/state.pt"])])
def test_a_rerun_into_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, recipe, outputs):
    """Before: a rerun without --resume replaced a finished run without a word (train_task removed its outputs even
    before a typo in the arguments stopped it), and a stopped run's checkpoint at the first save."""
    out = tmp_path / "run"
    for name in outputs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("earlier")
    stamps = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    for extra, message in (([], f"error: {out}: holds an earlier run ({', '.join(Path(n).parts[0] for n in outputs)}"
                                "); pass --resume to continue it, --overwrite to replace it, or choose another --out"),
                           (["--resume", "--overwrite"], "error: --resume and --overwrite: choose one"),
                           (["--overwrite", "--model", str(tmp_path / "missing.gguf")], "missing.gguf")):
        proc = subprocess.run([sys.executable, str(ROOT / recipe), "--out", str(out), "--no-progress", *extra],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert {p: p.read_text() for p in out.rglob("*") if p.is_file()} == stamps  # nothing of it touched


def test_overwrite_also_removes_what_eval_run_wrote_into_the_run(tmp_path, capsys):
    """Before: --overwrite left the replaced model's eval_<stem>.json and predictions_<stem>.npz/.csv (from eval.py
    --run RUN --test/--predict) beside the new model, as if they were its own."""
    from minilora.cli import TASK_RUN_OUTPUTS, InputError, check_out_folder, remove_outputs

    out = tmp_path / "run"
    names = ["summary.json", "predictions_test.npz", "eval_ext.json", "predictions_ext.npz", "predictions_unl.csv",
             "predictions_unl.npz"]
    for name in names + ["my_notes.txt"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("earlier")
    (out / "head").mkdir()
    with pytest.raises(InputError, match=r"holds an earlier run \(.*eval_ext.json.*predictions_unl.csv"):
        check_out_folder(out, TASK_RUN_OUTPUTS, resume=False, overwrite=False)
    remove_outputs(out, TASK_RUN_OUTPUTS)
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]
    err = capsys.readouterr().err
    assert all(name in err for name in names + ["head"]) and "my_notes" not in err


def test_resuming_with_other_shapes_or_a_foreign_file_names_the_checkpoint(tmp_path):
    """Before: --resume with another --r failed in copy_ with a size mismatch; a file that was not a checkpoint in
    a TypeError or a bare KeyError ('trainable')."""
    _trainer(tmp_path, 4).save_checkpoint()
    path = tmp_path / "checkpoint" / "state.pt"
    with pytest.raises(ValueError, match=r"state.pt: body.weight has shape \(4, 4\), this run's \(8, 4\)"):
        _trainer(tmp_path, 8).load_checkpoint()
    for foreign in ([1, 2], {"x": 1}):
        torch.save(foreign, path)
        with pytest.raises(ValueError, match="state.pt: not a minilora checkpoint"):
            _trainer(tmp_path, 4).load_checkpoint()


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "holds a JSON list, expected an object"),
    (lambda d: (d / "adapter_config.json").write_text(
        json.dumps({**json.loads((d / "adapter_config.json").read_text()), "lora_alpha": None})),
     "lora_alpha is None, expected a number > 0"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
     "adapter_model.safetensors: corrupt or truncated safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\xff" * 64),
     "adapter_model.safetensors: corrupt or truncated safetensors file"),
])
def test_a_damaged_adapter_folder_names_its_file(tmp_path, damage, message):
    model = _tiny_model()
    add_adapter(model, "domain", r=2, alpha=4)
    d = save_adapter(model, "domain", tmp_path / "adapter")
    damage(d)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_adapter(_tiny_model(), d, "domain")


def test_a_truncated_head_names_its_file(tmp_path):
    clf = Classifier(_tiny_model(), 2)
    clf.save_head(tmp_path / "head", ["0", "1"])
    weights = tmp_path / "head" / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="head.safetensors: corrupt or truncated safetensors file"):
        Classifier.read_head(tmp_path / "head")
    clf.save_head(tmp_path / "head", ["0", "1"])
    (tmp_path / "head" / "head_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="head_config.json: invalid JSON"):
        Classifier.read_head(tmp_path / "head")


def test_gzip_is_not_confused_here(tmp_path):  # the real .gz reader still works after the error handling moved
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("id,text,label\n1,a,0\n2,b,1\n")
    assert load_task_files({"train": path, "val": path, "test": path}, "t", "binary").splits["val"].ids == ["1", "2"]


def test_resume_without_a_checkpoint_says_so_and_starts_clean(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')  # an earlier run's, never checkpointed
    state = _trainer(tmp_path, 4).fit(resume=True)
    assert state.step == 2 and "resume: no checkpoint at" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "loss" in line] == [1, 2]


def test_a_header_less_file_whose_first_note_is_one_word_does_not_show_it(tmp_path):
    from minilora.data.notes import describe_fields

    with pytest.raises(TaskDataError) as e:
        load_task_files(_task(tmp_path, "p1,Unremarkable.,pos\np2,Stable,neg\n"), "t", "binary")
    assert "Unremarkable" not in str(e.value) and "3 fields, not shown" in str(e.value)
    assert describe_fields(["note_id", "hadm_id", "v1.2", "x-y"]) == "note_id, hadm_id, v1.2, x-y"
    # a CSV's first row of single words: shown only when it has a column asked for or a common column name
    with pytest.raises(TaskDataError) as e:
        load_task_files(_task(tmp_path, f"p1,{SECRET},pos\np2,Stable,neg\n"), "t", "binary")
    assert SECRET not in str(e.value) and "3 fields, not shown" in str(e.value)
    assert describe_fields(["p1", SECRET], expected=["text"]) == "2 fields, not shown: the first row does not look " \
        "like a header"
    assert describe_fields(["note_id", "body"], expected=["text"]) == "note_id, body"
    assert describe_fields(["ID", "note_text", "label"], expected=["text", "label"]) == "ID, note_text, label"
    # snake_case names are column names (MIMIC's tables, a hospital's export); a de-identified "___" note is not
    assert describe_fields(["icd_code", "icd_version", "long_title"], expected=["text"]) == \
        "icd_code, icd_version, long_title"
    assert describe_fields(["NOTE_BODY", "ENC"], expected=["text"]) == "NOTE_BODY, ENC"
    assert describe_fields(["p1", "___"], expected=["text"]).startswith("2 fields, not shown")


def test_a_json_control_character_message_reads_once(tmp_path):
    from minilora.data.notes import NotesError, iter_notes

    path = tmp_path / "n.jsonl"
    path.write_bytes(b'{"text": "a\x01b"}\n')
    with pytest.raises(NotesError) as e:
        list(iter_notes(path))
    assert "(Invalid control character at column 12)" in str(e.value)  # was "... at at column 12"


def test_a_search_whose_first_trial_never_started_can_be_rerun_with_other_arguments(tmp_path):
    """Before: search.json recorded the arguments before the first trial ran, so after a typo (a missing file) the
    corrected command was refused as 'an earlier search here ran train_task.py with other arguments'."""
    out = tmp_path / "s"

    def search(train: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "tools" / "hparam_search.py"), "--out", str(out), "--r", "2",
                               "--alpha", "4", "--dropout", "0", "--", "--task", "t", "--train", train, "--val",
                               train, "--test", train, "--max-steps", "1", "--no-progress"],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=300)

    first = search(str(tmp_path / "typo.csv"))
    assert first.returncode == 2 and "typo.csv: no such file" in first.stderr, first.stderr
    second = search(str(tmp_path / "other.csv"))
    assert second.returncode == 2 and "other.csv: no such file" in second.stderr, second.stderr
    assert "with other arguments" not in second.stderr


@pytest.mark.parametrize("rows", ["id,text,label\n1,a,0\n2,b,1\n3,c,nan\n",
                                  '{"id": 1, "text": "a", "label": 0}\n{"id": 2, "text": "b", "label": NaN}\n'])
def test_a_missing_label_written_out_is_not_a_class(tmp_path, rows):
    """Before: 'nan' (str of a float NaN, or JSON NaN) became a third class: multiclass ['0', '1', 'nan']."""
    name = "t.jsonl" if rows.startswith("{") else "t.csv"
    with pytest.raises(TaskDataError, match="has 'nan' as its 'label': a missing value, expected a class label"):
        load_task_files(_task(tmp_path, rows, name), "t", "multiclass")
    # multi-label: a missing list of codes is no codes (as an empty field), not a code 'nan'
    rows = rows.replace(",0\n", ",A\n").replace(",1\n", ",B\n").replace(": 0}", ': "A"}').replace(': 1}', ': "B"}')
    data = load_task_files(_task(tmp_path, rows, name), "t", "multilabel")
    assert "nan" not in data.labels and data.splits["train"].targets[-1].sum() == 0
    assert data.splits["train"].targets[0].tolist() == [1] + [0] * (len(data.labels) - 1)  # row 1: code A


@pytest.mark.parametrize("body, line", [
    (f'1,{SECRET} fever,"0\n2,{SECRET} cough,1\n3,{SECRET} rash,0\n', 2),   # a stray quote opens the label field
    (f'1,{SECRET} fever,0\n2,"{SECRET} cough,1\n3,{SECRET} rash,0\n', 3),   # ... or a note's text
])
def test_an_unclosed_quote_is_an_error_not_one_row_swallowing_the_rest(tmp_path, body, line):
    """Before: a lenient csv reader read from a stray double quote to the end of the file as one field, so the rows
    after it vanished silently into one label (or one note) and the run trained on what was left."""
    from minilora.data.notes import NotesError, iter_notes

    files = _task(tmp_path, "id,text,label\n" + body)
    with pytest.raises(TaskDataError) as e:
        load_task_files(files, "t", "multiclass")
    assert str(e.value) == (f"{files['train']}: line {line}: a quoted field is not closed before the end of the file "
                            "(a stray double quote?); expected every quote doubled inside quoted text")
    with pytest.raises(NotesError) as e:  # the DAPT notes reader: the same file as notes
        list(iter_notes(files["train"]))
    assert f"{files['train']}: line {line}: a quoted field is not closed" in str(e.value) and SECRET not in str(e.value)


def test_text_after_a_closing_quote_names_its_line(tmp_path):
    files = _task(tmp_path, f'id,text,label\n1,a,0\n2,"{SECRET} cough" x,1\n')
    with pytest.raises(TaskDataError) as e:
        load_task_files(files, "t", "binary")
    assert str(e.value) == f"""{files['train']}: line 3: malformed CSV (',' expected after '"')"""
    # quotes doubled inside quoted text, and quoted line breaks, stay fine
    files = _task(tmp_path, 'id,text,label\n1,"a ""quoted"" word, and\na second line",0\n2,b,1\n')
    data = load_task_files(files, "t", "binary")
    assert data.splits["train"].texts[0].startswith('a "quoted" word, and') and len(data.splits["train"].ids) == 2


def test_eval_does_not_list_label_values_when_the_label_column_is_likely_text(tmp_path, capsys):
    """A --label-col that points at a column of one-word notes: every value looks like a code, so before, the
    first five notes were printed as 'label values not among the run's labels'."""
    import argparse

    import eval as eval_cli

    args = argparse.Namespace(text_col="text", label_col="label", label_sep=",", id_col="id")
    path = tmp_path / "test.csv"
    path.write_text("id,text,label\n1,a,0\n" + "".join(f"{i},b,{SECRET}{i}\n" for i in range(2, 6)))
    split, counts = eval_cli.read_labelled(path, ["0", "1"], "binary", args)
    err = capsys.readouterr().err
    assert counts["unknown_labels"] == 4 and split.ids == ["1"] and SECRET not in err
    assert "4 rows left out: 'label' values not among the run's 2 labels (4 distinct values not shown: most rows " \
           "have none of them; is --label-col right?)" in err
    # a few unseen codes among known ones are still listed; a multi-label 'nan' is no codes, not an unseen code
    path.write_text("id,text,label\n1,a,0\n2,b,1\n3,c,7\n")
    eval_cli.read_labelled(path, ["0", "1"], "binary", args)
    assert "1 rows left out: 'label' values not among the run's 2 labels (7)" in capsys.readouterr().err
    path.write_text("id,text,label\n1,a,\"A,B\"\n2,b,nan\n")
    split, counts = eval_cli.read_labelled(path, ["A", "B"], "multilabel", args)
    assert counts["unknown_labels"] == 0 and split.targets.tolist() == [[1, 1], [0, 0]]


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(capsys):
    """Before: Ctrl-C while the model loaded or the test split was scored gave a KeyboardInterrupt traceback."""
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_label_column_of_text_is_refused_before_its_values_go_into_files(tmp_path):
    """Before: --label-col text --multilabel trained a head of 1,333 'codes' (note fragments), written into
    summary.json and head_config.json and drawn as the ROC plot's legend."""
    words = " ".join(["word"] * 30)
    rows = "".join(f'{i},"{SECRET} note {i}","{SECRET} a phrase {i}, {words} {i}"\n' for i in range(30))
    with pytest.raises(TaskDataError) as e:
        load_task_files(_task(tmp_path, "id,text,label\n" + rows), "t", "multilabel")
    assert "'label' looks like free text, not labels (60 distinct values in 30 rows, 30 over 100 characters); " \
           "expected class labels or codes (is --label-col right?)" in str(e.value) and SECRET not in str(e.value)
    rows = "".join(f"{i},note {i},{SECRET}{i}\n" for i in range(30))  # single-label: a value per row
    with pytest.raises(TaskDataError, match=r"looks like free text, not labels \(30 distinct values in 30 rows\)"):
        load_task_files(_task(tmp_path, "id,text,label\n" + rows), "t", "multiclass")
    rows = "".join(f"{i},note {i},class {i % 25}\n" for i in range(60))  # 25 classes in 60 rows: labels
    assert load_task_files(_task(tmp_path, "id,text,label\n" + rows), "t", "multiclass").num_labels == 25


def test_an_id_column_asked_for_must_exist_and_repeated_ids_are_reported(tmp_path, capsys):
    """Before: --id-col ID on a file with 'id' named every row <file>:<line> without a word; ids that repeat could
    not be joined back, unnoticed; a duplicated text column was read from its last copy."""
    import argparse

    import eval as eval_cli

    files = _task(tmp_path, "id,text,label\n1,a,0\n2,b,1\n")
    with pytest.raises(TaskDataError, match="missing column 'ID' \\(columns: id, text, label\\)"):
        load_task_files(files, "t", "binary", id_col="ID")
    path = tmp_path / "p.csv"
    path.write_text("id,text\nA,a\nA,b\nB,c\n")
    ids, _, _ = eval_cli.read_unlabelled(path, argparse.Namespace(text_col="text", id_col="id"))
    assert ids == ["A", "A", "B"] and f"warning: {path}: 1 rows repeat an id of an earlier row" in \
        capsys.readouterr().err
    path.write_text("id,text,text,label\n1,a,b,0\n")
    with pytest.raises(TaskDataError, match="column 'text' appears 2 times in the header; expected it once"):
        eval_cli.read_unlabelled(path, argparse.Namespace(text_col="text", id_col="id"))


def test_sequences_past_the_models_positions_are_warned_about(capsys):
    from minilora.cli import warn_beyond_positions

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      max_position_embeddings=512)
    warn_beyond_positions(512, cfg)
    assert capsys.readouterr().err == ""
    warn_beyond_positions(2048, cfg)
    assert capsys.readouterr().err == ("warning: --max-seq-len 2048 exceeds the model's 512 positions "
                                       "(max_position_embeddings); sequences past them are outside what it was "
                                       "trained on\n")


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_task_tools_give_one_line_errors(tmp_path):
    """Before: tfidf_baseline.py and mtsamples_task.py ran outside run_cli: a missing file, --max-features 0, an --out
    that is a file or a source that is not gzip gave tracebacks, and --min-count above every specialty wrote empty
    splits and exited 0."""
    from conftest import shared_path

    files = _task(tmp_path, "id,text,label\n1,a,0\n2,b,1\n")
    cases = [
        ("tfidf_baseline.py", ["--task", "t", "--train", str(files["train"]), "--val", str(files["val"]), "--test",
                               str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")], "none.csv: no such file"),
        ("tfidf_baseline.py", ["--task", "t", "--max-features", "0", "--out", "o"],
         "argument --max-features: expected an integer >= 1, got 0"),
        ("tfidf_baseline.py", ["--task", "t", "--out", "o"], "give --data-dir, or all of --train, --val and --test"),
        ("mtsamples_task.py", ["--source", str(files["train"])], "not a gzip file, though its name ends in .gz"),
    ]
    gz_named = tmp_path / "m.jsonl.gz"
    gz_named.write_text("{}\n")
    cases[-1][1][1] = str(gz_named)
    source = shared_path("mtsamples", "mtsamples.jsonl.gz")
    (tmp_path / "afile").write_text("x")
    cases += [("mtsamples_task.py", ["--source", str(source), "--out", str(tmp_path / "afile")], "afile"),
              ("mtsamples_task.py", ["--source", str(source), "--min-count", "100000", "--out", str(tmp_path / "m")],
               "0 specialties have at least --min-count 100000 notes; a task needs 2 or more")]
    run = tmp_path / "lora_run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    cases.append(("tfidf_baseline.py", ["--task", "t", "--train", str(files["train"]), "--val", str(files["val"]),
                                        "--test", str(files["test"]), "--out", str(run)],
                  "holds an earlier run (summary.json); pass --overwrite to replace it, or choose another --out"))
    for tool, args, message in cases:
        proc = _tool(tool, *args, cwd=tmp_path)
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("usage:", " "))]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (tool, args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_mtsamples_task_splits_by_text_and_keeps_an_earlier_task(tmp_path):
    """Before: MTSamples files most reports under two categories and the split was by note id, so 59% of the test
    rows had their text in train (under another label) and in the DAPT notes; a rerun replaced the files silently."""
    import csv

    from conftest import shared_path

    source = shared_path("mtsamples", "mtsamples.jsonl.gz")
    out = tmp_path / "mts"
    proc = _tool("mtsamples_task.py", "--source", str(source), "--max-per-class", "60", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    def norm(text: str) -> str:
        return " ".join(text.split())

    rows = {split: list(csv.DictReader(open(out / f"{split}.csv", newline="", encoding="utf-8")))
            for split in ("train", "val", "test")}
    texts = {split: {norm(r["text"]) for r in split_rows} for split, split_rows in rows.items()}
    assert all(texts[split] for split in texts)
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"] and not texts["val"] & texts["test"]
    dapt = [norm(json.loads(line)["text"]) for line in (out / "dapt_notes.jsonl").read_text().splitlines()]
    assert set(dapt) == texts["train"] and len(dapt) == len(set(dapt))
    pairs = [(norm(r["text"]), r["label"]) for split_rows in rows.values() for r in split_rows]
    assert len(pairs) == len(set(pairs))  # no row repeats a text with its label
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _tool("mtsamples_task.py", "--source", str(source), "--seed", "1", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "holds an earlier run (train.csv, val.csv, test.csv, dapt_notes.jsonl); pass " \
        "--overwrite to replace it" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tfidf_baseline_names_the_split_whose_auroc_is_undefined(tmp_path):
    """Before: a val split of one class stopped tfidf_baseline.py with sklearn-like words that named no split, and a
    test split of one class did too, after the model had fitted; now val (which selects C) is a one-line error naming
    it, and test is recorded as undefined, as train_task.py does."""
    rows = [f"{i},fever cough pain fever {'cough' if i % 2 else 'rash'},{i % 2}" for i in range(12)]
    one_class = [f"{i},fever cough pain rash,0" for i in range(4)]
    train = tmp_path / "train.csv"
    train.write_text("id,text,label\n" + "\n".join(rows) + "\n")
    both = tmp_path / "both.csv"
    both.write_text("id,text,label\n" + "\n".join(rows[:6]) + "\n")
    single = tmp_path / "single.csv"
    single.write_text("id,text,label\n" + "\n".join(one_class) + "\n")
    proc = _tool("tfidf_baseline.py", "--task", "t", "--train", str(train), "--val", str(single), "--test",
                 str(both), "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: t: the val split's AUROC is undefined ("), proc.stderr
    assert not (tmp_path / "a" / "summary.json").exists()
    proc = _tool("tfidf_baseline.py", "--task", "t", "--train", str(train), "--val", str(both), "--test",
                 str(single), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: test AUROC is undefined (" in proc.stderr and "test AUROC undefined" in proc.stdout
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["test_auroc"] is None and summary["val_auroc"] > 0.5


def test_eval_refuses_a_model_path_or_frozen_domain_adapter_that_changed_since_training(tiny_lm, tmp_path):
    """Before: eval.py rebuilt a run's model from the paths in its summary.json as they were now: another model at
    the same path scored AUROC 50.61 without a word, and a DAPT run redone into the frozen adapter's folder shifted
    the probabilities by up to 0.47."""
    import shutil

    from safetensors.torch import load_file, save_file

    from minilora import from_pretrained
    from minilora.classify import load_classifier
    from minilora.loading import adapter_fingerprint, weights_fingerprint

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_lm, model_dir)
    lm, _ = from_pretrained(model_dir, dtype="fp32")
    fingerprint = weights_fingerprint(lm)
    assert weights_fingerprint(from_pretrained(model_dir, dtype="bf16")[0]) == fingerprint  # either precision
    add_adapter(lm, "domain", r=2, alpha=4)
    domain = save_adapter(lm, "domain", tmp_path / "dapt" / "adapter")
    assert weights_fingerprint(lm) == fingerprint  # adapters are not part of it
    add_adapter(lm, "task", r=2, alpha=4)
    run = tmp_path / "run"
    save_adapter(lm, "task", run / "task_adapter")
    Classifier(lm, 2).save_head(run / "head", labels=["0", "1"])
    (run / "summary.json").write_text(json.dumps({
        "task": "mortality", "kind": "binary", "labels": ["0", "1"], "config": {
            "model": str(model_dir), "precision": "fp32", "domain_adapter": str(domain), "domain_trainable": False},
        "fingerprints": {"model": fingerprint, "domain_adapter": adapter_fingerprint(domain)}}))
    load_classifier(run, device="cpu")  # as trained: fine
    weights = next(model_dir.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=f"{model_dir}: not the base model {run} was trained on"):
        load_classifier(run, device="cpu")
    shutil.rmtree(model_dir)
    shutil.copytree(tiny_lm, model_dir)
    add_adapter(lm, "domain2", r=2, alpha=4)  # a redone DAPT run: other weights in the same folder
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.normal_()
    save_adapter(lm, "domain2", tmp_path / "dapt" / "adapter")
    with pytest.raises(ValueError, match=f"{domain}: not the domain adapter {run} was trained with"):
        load_classifier(run, device="cpu")


def test_notes_shared_between_train_and_test_are_reported(tmp_path, capsys):
    """Before: --val and --test given the training file trained and scored without a word."""
    from minilora.data.tasks import print_report

    files = _task(tmp_path, "id,text,label\n1,a,0\n2,b,1\n3,c,1\n", val="id,text,label\n7,c,1\n8,d,0\n")
    data = load_task_files({**files, "test": files["train"]}, "t", "binary")
    print_report(data)
    err = capsys.readouterr().err
    assert "warning: t val: 1 notes also in train" in err and "warning: t test: 3 notes also in train" in err
    print_report(load_task_files(_task(tmp_path, "id,text,label\n1,a,0\n2,b,1\n", val="id,text,label\n7,c,1\n8,d,0\n"),
                                 "t", "binary"))
    assert "warning" not in capsys.readouterr().err


def test_resume_into_a_finished_run_without_a_checkpoint_is_refused(tmp_path):
    """Before: --resume into a run folder without checkpoint/ (an hparam_search output) said 'no checkpoint' and
    trained afresh over the finished run."""
    from minilora.cli import InputError, check_out_folder

    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(InputError, match="--resume, but it holds a run without a checkpoint \\(summary.json\\)"):
        check_out_folder(tmp_path, ("summary.json", "metrics.jsonl"), resume=True, overwrite=False)
    (tmp_path / "summary.json").unlink()
    (tmp_path / "metrics.jsonl").write_text("")  # a run stopped before its first save: --resume starts it again
    check_out_folder(tmp_path, ("summary.json", "metrics.jsonl"), resume=True, overwrite=False)


def test_a_longer_resumed_run_follows_its_new_schedule_and_a_shorter_one_is_refused(tmp_path):
    """Before: a resume with a longer --max-steps took its first step at the old schedule's last lr (0 for a linear
    decay), and one with a shorter --max-steps than the steps done 'finished' with summary.json saying so."""
    from minilora.optim import AdamW, LambdaLR

    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdamW([{"params": [p]}], lr=1.0)
    sched = LambdaLR(opt, lambda s: 1 - s / 3)
    for _ in range(3):
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    longer = LambdaLR(opt, lambda s: 1 - s / 6)
    longer.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5 and longer.get_last_lr() == [0.5]

    trainer = _trainer(tmp_path, 4, max_steps=3)
    trainer.state.step = 3
    trainer.save_checkpoint()
    with pytest.raises(ValueError, match="has trained 3 steps, more than this run's 2 \\(max_steps 3 -> 2\\)"):
        _trainer(tmp_path, 4, max_steps=2).load_checkpoint()
    assert _trainer(tmp_path, 4, max_steps=6).load_checkpoint()


def test_the_weights_fingerprint_sees_edits_past_the_first_values():
    """Before: only each tensor's first 4,096 values counted: an edit past them kept the fingerprint."""
    from minilora.loading import FINGERPRINT_ELEMENTS, weights_fingerprint

    big = torch.nn.Linear(256, 256)
    before = weights_fingerprint(big)
    with torch.no_grad():
        big.weight.view(-1)[FINGERPRINT_ELEMENTS:].mul_(1.5)  # past the first values: the strided sample sees it
    assert weights_fingerprint(big) != before


def test_a_rows_id_without_an_id_column_is_its_first_line(tmp_path):
    from minilora.data.tasks import read_rows

    path = tmp_path / "n.csv"
    path.write_text('text,label\n"one\nnote on three lines\nhere",0\nsecond,1\n')
    assert [line for line, _ in read_rows(path, ["text"])] == [2, 5]
