"""The paper's hyper-parameter search for a downstream task: train_task.py over a grid of LoRA rank, alpha and
dropout, the best by validation AUROC.

    PYTHONPATH=. python tools/hparam_search.py --out runs/search-mortality -- --task mortality --data-dir DATA ...

Everything after ``--`` goes to every train_task.py run (not --out, --r, --alpha, --dropout, --resume or --overwrite,
which this tool sets). The default grid is the paper's: r in {2, 4, 8, 16}, alpha in {4, 8, 16, 32}, dropout in
{0, 0.1, 0.2} (48 runs); --r, --alpha and --dropout take comma-separated lists.

Layout of --out:
  trials/r<R>-alpha<A>-dropout<D>/   one train_task.py run per grid point (with its checkpoint, so an interrupted
                                     search resumes: finished trials are kept, an unfinished one continues)
  search.json, search.md             every trial's validation and test AUROC, the grid and the train_task arguments
  summary.json, task_adapter/, head/, predictions_{val,test}.npz, ...
                                     a copy of the selected trial's outputs, so that --out is itself a run folder:
                                     eval.py reports it (trials/ lies too deep for its search) and scores new files
                                     with it (--run)

The selection uses validation AUROC only (ties: the first in grid order); the test AUROC of the selected trial is
the search's result. Only ids, counts and metrics are printed, never note text.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minilora.cli import TASK_RUN_OUTPUTS, InputError, run_cli, write_json_atomic  # noqa: E402
from minilora.files import read_json_object  # noqa: E402

PAPER_GRID = {"r": "2,4,8,16", "alpha": "4,8,16,32", "dropout": "0,0.1,0.2"}
SET_HERE = ("--out", "--r", "--alpha", "--dropout", "--resume", "--overwrite")
# the selected trial's outputs copied into --out (checkpoint/ stays in the trial); summary.json last
COPIED = ("task_adapter", "domain_adapter", "head", "predictions_val.npz", "predictions_test.npz", "metrics.jsonl",
          "loss.png")


def parse_grid(name: str, value: str, kind: type) -> list:
    try:
        values = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--{name} {value!r}: expected comma-separated {kind.__name__} values") from None
    if not values or len(set(values)) != len(values):
        raise InputError(f"--{name} {value!r}: expected distinct comma-separated values")
    if name == "r" and min(values) < 1 or name == "alpha" and min(values) <= 0:
        raise InputError(f"--{name} {value!r}: expected positive values")
    if name == "dropout" and not all(0 <= v < 1 for v in values):
        raise InputError(f"--dropout {value!r}: expected values in [0, 1)")
    return values


def trial_name(r: int, alpha: float, dropout: float) -> str:
    return f"r{r}-alpha{alpha:g}-dropout{dropout:g}"


def check_passthrough(args: list[str]) -> None:
    """Parse the train_task.py arguments with its own parser (abbreviations included): they must leave what the
    search sets at its defaults, and train a task adapter."""
    from train_task import build_parser  # ROOT is on sys.path

    parser = build_parser()
    parser.prog, parser.usage = "train_task.py (the arguments after --)", "see train_task.py --help"
    given, defaults = parser.parse_args(args), parser.parse_args([])
    for flag in SET_HERE:
        dest = flag[2:]
        if getattr(given, dest) != getattr(defaults, dest):
            raise InputError(f"{flag} after --: the search sets it for each trial (give --out and the grid before --)")
    if given.no_task_adapter:
        raise InputError("--no-task-adapter: a head-only run has no LoRA hyper-parameters to search")


STOPPED = (130, 143)  # train_task.py's exit codes after SIGINT / SIGTERM (it saved its checkpoint)


def run_trial(train_args: list[str], trial: Path, r: int, alpha: float, dropout: float) -> int:
    """Run one trial and return its exit code. SIGINT and SIGTERM sent to this process go on to the trial, which
    saves its checkpoint and stops (the search then stops too): no trial is left training on its own."""
    cmd = [sys.executable, str(ROOT / "train_task.py"), *train_args, "--out", str(trial), "--r", str(r),
           "--alpha", f"{alpha:g}", "--dropout", f"{dropout:g}"]
    if (trial / "checkpoint").is_dir():
        cmd.append("--resume")
    elif trial.exists():  # what an unfinished trial left before its first checkpoint: the search's own folder
        cmd.append("--overwrite")
    proc = subprocess.Popen(cmd, cwd=os.getcwd())
    # a closed terminal's SIGHUP stops the trial as SIGTERM does (which saves its checkpoint)
    stop = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
    forward = {sig: signal.signal(sig, lambda signum, _frame: proc.send_signal(stop[signum])) for sig in stop}
    try:
        return proc.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


def finished(trial: Path) -> dict | None:
    """The trial's summary.json when train_task.py finished it, else None."""
    try:
        summary = read_json_object(trial / "summary.json")
    except (OSError, ValueError):
        return None
    ok = "val_auroc" in summary and isinstance(summary["val_auroc"], (int, float, type(None)))
    return summary if ok else None


def defined(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def copy_selected(trial: Path, out: Path, summary: dict) -> None:
    """Make ``out`` a run folder holding the selected trial's outputs. summary.json goes first out and last in, so
    that a folder with a summary.json is never a half-copied run."""
    (out / "summary.json").unlink(missing_ok=True)
    for name in COPIED:
        src, dst = trial / name, out / name
        tmp = out / f".{name}.tmp{os.getpid()}"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, tmp)
        elif src.is_file():
            shutil.copy2(src, tmp)
        else:
            continue
        os.replace(tmp, dst)
    write_json_atomic(out / "summary.json", summary)


def write_markdown(path: Path, search: dict) -> None:
    best = search["best"]
    lines = [f"# Hyper-parameter search: {search['task']} ({search['setting']})", "",
             f"train_task.py arguments: `{' '.join(search['train_task_args'])}`", "",
             f"Selected on validation AUROC: r={best['r']}, alpha={best['alpha']:g}, dropout={best['dropout']:g} "
             f"(`{best['dir']}`): val AUROC {best['val_auroc']:.4f}, test AUROC "
             f"{'undefined' if best['test_auroc'] is None else format(best['test_auroc'], '.4f')}", "",
             "| r | alpha | dropout | val AUROC | test AUROC | best epoch | trial |", "|---|---|---|---|---|---|---|"]
    for t in sorted(search["trials"], key=lambda t: -(t["val_auroc"] if defined(t["val_auroc"]) else -1)):
        cells = [("-" if not defined(t[k]) else f"{t[k]:.4f}") for k in ("val_auroc", "test_auroc")]
        if "failed" in t:
            cells = [f"failed (exit {t['failed']})", "-"]
        lines.append(f"| {t['r']} | {t['alpha']:g} | {t['dropout']:g} | {cells[0]} | {cells[1]} | "
                     f"{'-' if t['best_epoch'] is None else t['best_epoch']} | `{t['dir']}` |")
    lines += ["", "The test AUROC of the trials other than the selected one is shown for reference only: choosing by "
              "it would overstate the result."]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --out DIR [--r R,...] [--alpha A,...] [--dropout D,...] -- "
                                      "TRAIN_TASK_ARGS...")
    p.add_argument("--out", type=Path, required=True, help="search folder (see the layout above)")
    p.add_argument("--r", default=PAPER_GRID["r"], help="LoRA ranks (default %(default)s)")
    p.add_argument("--alpha", default=PAPER_GRID["alpha"], help="LoRA alphas (default %(default)s)")
    p.add_argument("--dropout", default=PAPER_GRID["dropout"], help="LoRA dropouts (default %(default)s)")
    args = p.parse_args(ours)
    check_passthrough(train_args)
    grid = list(itertools.product(parse_grid("r", args.r, int), parse_grid("alpha", args.alpha, float),
                                  parse_grid("dropout", args.dropout, float)))
    out: Path = args.out
    record = out / "search.json"
    if record.is_file():
        earlier = read_json_object(record).get("train_task_args")
        started = [t for t in (out / "trials").glob("*")
                   if (t / "summary.json").exists() or (t / "checkpoint").exists()]
        if earlier != train_args and started:  # with no trial trained yet (a typo in the arguments) it starts afresh
            raise InputError(f"{record}: an earlier search here ran train_task.py with other arguments "
                             f"({' '.join(earlier or [])!r}); use another --out")
    elif any((out / name).exists() for name in ("checkpoint", "adapter", *TASK_RUN_OUTPUTS)):
        raise InputError(f"{out}: holds a run that is not a search (no search.json); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"train_task_args": train_args, "complete": False})  # the arguments, for a resume

    trials = []
    for i, (r, alpha, dropout) in enumerate(grid, 1):
        trial = out / "trials" / trial_name(r, alpha, dropout)
        summary = finished(trial)
        if summary is None:
            print(f"[{i}/{len(grid)}] r={r} alpha={alpha:g} dropout={dropout:g}: training in {trial}", file=sys.stderr)
            code = run_trial(train_args, trial, r, alpha, dropout)
            if code == 2:
                raise InputError(f"{trial}: train_task.py rejected its input (its message is above); finished trials "
                                 f"are kept")
            if code in STOPPED or code < 0:  # stopped by a signal: the search stops too, to resume later
                print(f"stopped: {trial}: train_task.py exited with code {code}; rerun the same command to resume",
                      file=sys.stderr)
                return code if code > 0 else 128 - code
            if code != 0 or (summary := finished(trial)) is None:  # e.g. a diverging grid point: the others go on
                print(f"[{i}/{len(grid)}] r={r} alpha={alpha:g} dropout={dropout:g}: FAILED (train_task.py exited "
                      f"with code {code}; its message is above)", file=sys.stderr)
                trials.append({"r": r, "alpha": alpha, "dropout": dropout, "dir": str(trial), "val_auroc": None,
                               "test_auroc": None, "best_epoch": None, "failed": code, "summary": {}})
                continue
        trials.append({"r": r, "alpha": alpha, "dropout": dropout, "dir": str(trial),
                       "val_auroc": summary.get("val_auroc"), "test_auroc": summary.get("test_auroc"),
                       "best_epoch": summary.get("best_epoch"), "summary": summary})
        shown = f"{summary['val_auroc']:.4f}" if defined(summary.get("val_auroc")) else "undefined"
        print(f"[{i}/{len(grid)}] r={r} alpha={alpha:g} dropout={dropout:g}: val AUROC {shown}", file=sys.stderr)

    failed = [t for t in trials if "failed" in t]
    scored = [t for t in trials if defined(t["val_auroc"])]
    if not scored:
        if failed:
            print(f"error: all {len(failed)} trials that could be scored failed (messages above); rerun the same "
                  "command to retry them", file=sys.stderr)
            return 1
        raise InputError(f"{out}: no trial has a defined validation AUROC (one class in the validation split?)")
    best = max(scored, key=lambda t: t["val_auroc"])  # max keeps the first of equals: grid order breaks ties
    summary = {**best["summary"], "search": {"grid": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout},
                                             "trials": len(trials), "selected": best["dir"]}}
    copy_selected(Path(best["dir"]), out, summary)
    search = {"task": summary.get("task"), "setting": summary.get("setting"), "train_task_args": train_args,
              "grid": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout}, "selection": "val_auroc",
              "trials": [{k: v for k, v in t.items() if k != "summary"} for t in trials],
              "best": {k: v for k, v in best.items() if k != "summary"}, "complete": not failed}
    write_json_atomic(record, search)
    write_markdown(out / "search.md", search)
    test = "undefined" if best["test_auroc"] is None else f"{best['test_auroc']:.4f}"
    print(f"selected r={best['r']} alpha={best['alpha']:g} dropout={best['dropout']:g} on validation AUROC "
          f"{best['val_auroc']:.4f}; its test AUROC {test}. {out} holds its outputs (eval.py reads it); "
          f"{out / 'search.md'} lists all {len(trials)} trials")
    if failed:
        print(f"warning: {len(failed)} of {len(trials)} trials failed and were left out of the selection (search.md "
              "lists them); rerun the same command to retry them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
