"""Command-line plumbing shared by the recipes: TOML config files under flags, and clean exits on bad input."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minilora.runtime import PRECISIONS

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input (file, field, value): reported in one line, exit code 2."""


def _number(kind: type, test: Callable[[float], bool], expect: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text}")
        return value

    parse.__name__ = expect  # argparse names the type in some messages
    return parse


# argparse types for flags whose zero or negative values would run but do something else than asked
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
open_fraction = _number(float, lambda v: 0 < v < 1, "a fraction in (0, 1)")
unit_interval = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE.toml`` replace the defaults and explicit flags override both.

    The TOML file holds flat ``key = value`` pairs named like the flags (``max_seq_len`` or ``max-seq-len``);
    tables are flattened, so ``[lora] r = 16`` also sets ``r``. Every switch gets its opposite flag (not listed in
    --help), so that one a config sets can be turned off: ``--no-grad-checkpointing``, ``--packing``.
    """
    add_switch_opposites(parser)
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        parser.exit(EXIT_BAD_INPUT, f"error: {path}: config file not found\n")
    except IsADirectoryError:
        parser.exit(EXIT_BAD_INPUT, f"error: {path}: is a folder, expected a TOML config file\n")
    except UnicodeDecodeError as e:
        parser.exit(EXIT_BAD_INPUT, f"error: {path}: not UTF-8 text (byte {e.start}), expected a TOML file\n")
    except tomllib.TOMLDecodeError as e:
        parser.exit(EXIT_BAD_INPUT, f"error: {path}: invalid TOML ({e})\n")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    actions = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in flat.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            parser.exit(EXIT_BAD_INPUT, f"error: {path}: unknown setting {key!r}\n")
        try:
            defaults[dest] = _config_value(actions[dest], value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            parser.exit(EXIT_BAD_INPUT, f"error: {path}: setting {key!r}: {e}\n")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def add_switch_opposites(parser: argparse.ArgumentParser) -> None:
    """For each ``store_true`` switch ``--X`` (``--no-X``), a hidden ``--no-X`` (``--X``) that sets it false, unless
    that flag exists (``--domain-adapter DIR`` beside ``--no-domain-adapter``). Idempotent."""
    for action in list(parser._actions):
        if not isinstance(action, argparse._StoreTrueAction):
            continue
        for flag in action.option_strings:
            if not flag.startswith("--"):
                continue
            name = flag[2:]
            opposite = "--" + (name[3:] if name.startswith("no-") else f"no-{name}")
            if opposite not in parser._option_string_actions:
                parser.add_argument(opposite, dest=action.dest, action="store_false", default=argparse.SUPPRESS,
                                    help=argparse.SUPPRESS)


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A TOML value checked and converted as its flag's value would be (argparse applies ``type`` and ``choices``
    to command-line strings, not to defaults): switches take booleans, list flags lists (or one value), the others
    one value."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    values = value if many and isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, (list, dict)):
            raise TypeError(f"expected {'a list of values' if many else 'one value'}, got {v!r}")
        if isinstance(v, bool) and action.type is not None:
            raise TypeError(f"expected a number or a string, got {str(v).lower()}")
        if isinstance(v, float) and action.type is int:
            raise TypeError(f"expected an integer, got {v!r}")
        if action.type is not None:
            v = action.type(v if isinstance(v, str) else str(v))
        elif not isinstance(v, str):
            raise TypeError(f"expected a string, got {v!r}")
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {v!r}")
        out.append(v)
    return out if many else out[0]


_OS_HINTS = {
    errno.EEXIST: "a file stands where a folder is needed",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
    errno.ENOENT: "no such file or folder, or it cannot be created there",
}


def os_error_line(e: OSError) -> str:
    """An OSError in one line naming its path; the recipes' own FileNotFoundErrors are already such lines."""
    if e.errno is None or not e.filename:
        return str(e)
    hint = _OS_HINTS.get(e.errno, e.strerror)
    other = f" -> {e.filename2}" if e.filename2 else ""
    return f"{e.filename}{other}: {hint}" + (f" ({e.strerror})" if hint != e.strerror else "")


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a recipe's ``main``: bad input (missing files, invalid values, a file format whose optional package is not
    installed) prints one line and exits with code 2.

    Under torchrun the process group is torn down before exit on every path: a rank that leaves with a live gloo
    group can abort in its destructor ("terminate called without an active exception") and fail the launch.
    glibc's allocator is tuned first (``minilora.runtime.tune_malloc``; MINILORA_MALLOC=default leaves it)."""
    from minilora.formats import MissingPackage
    from minilora.runtime import tune_malloc
    from minilora.train import NonFiniteLoss, PeerStopped, shutdown_distributed

    try:
        tune_malloc()
        code = main()
    except PeerStopped:  # rank 0 failed in work this rank waited for and reports it; torchrun stops this rank
        _rank_grace()       # once rank 0 has exited
        code = EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        _report(f"error: {e}")
        code = 1
    except OSError as e:  # a path that cannot be read or created: an output folder that is a file, /proc, ...
        _report(f"error: {os_error_line(e)}")
        code = EXIT_BAD_INPUT
    except (InputError, ValueError, KeyError, MissingPackage) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        _report(f"error: {msg}")
        code = EXIT_BAD_INPUT
    except RuntimeError as e:
        if not _peer_gone(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _report(f"error: another process of the run stopped ({first})")
        code = 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint and returns 130 itself)
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        shutdown_distributed()
    sys.exit(code or 0)


RANK_ERROR_GRACE_S = 5.0


def _report(line: str) -> None:
    """Print an error line. Under torchrun the ranks mostly fail alike (the same files and flags): rank 0 prints at
    once, another rank after a grace period, by which time torchrun has stopped it if rank 0 failed too; so an error
    shows once, and one that only another rank met still shows, with its rank."""
    rank = _rank_grace()
    if rank:
        line = line.replace("error: ", f"error (rank {rank}): ", 1)
    print(line, file=sys.stderr, flush=True)


def _rank_grace() -> int:
    """This process's torchrun rank; a non-zero rank of a multi-process run first waits RANK_ERROR_GRACE_S."""
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and rank:
        import time

        time.sleep(RANK_ERROR_GRACE_S)
    return rank


def _peer_gone(e: BaseException) -> bool:
    """Whether a collective failed because another rank's process ended (its connection closed); other
    distributed errors (this rank's own NCCL failure, a port in use) keep their traceback."""
    text = str(e)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


PRECISION_HELP = ("auto (default): bf16 autocast and bf16 frozen weights where bf16 matmuls are native (CUDA since "
                  "Ampere; CPUs with AVX512-BF16 or AMX), fp32 elsewhere, where emulated bf16 is slower; or bf16, fp32")


def add_lora_args(g: argparse._ArgumentGroup, *, r: int, alpha: float) -> None:
    """The LoRA flags of both training recipes (their defaults differ: r and alpha)."""
    g.add_argument("--r", type=positive_int, default=r, help="LoRA rank (default %(default)s)")
    g.add_argument("--alpha", type=positive_float, default=alpha, help="LoRA alpha; the update is scaled by alpha / r "
                   "(default %(default)g)")
    g.add_argument("--dropout", type=fraction, default=0.0, help="LoRA dropout on the adapters' input "
                   "(default %(default)g)")
    g.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module names, or all-linear (default %(default)s)")


def lora_settings(args: argparse.Namespace) -> str:
    """The LoRA flags of a run as one string (what a resume must share)."""
    return f"r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} targets={args.targets}"


def add_optimisation_args(g: argparse._ArgumentGroup, *, demo_max_steps: int | None = None) -> None:
    """The optimisation flags both training recipes share, after their own --lr and --epochs (AdamW over the
    trainable parameters; the HF Trainer's defaults)."""
    demo = f"; demo {demo_max_steps}" if demo_max_steps else ""
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help=f"stop after this many optimizer steps (default: the epochs decide{demo})")
    g.add_argument("--batch-size", type=positive_int, default=8,
                   help="global micro-batch in sequences, split over torchrun ranks (default %(default)s)")
    g.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (default %(default)s)")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning-rate decay after the warm-up (default %(default)s)")
    g.add_argument("--warmup-ratio", type=fraction, default=0.0,
                   help="fraction of the steps with a linear warm-up (default %(default)g)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay (default %(default)g)")
    g.add_argument("--max-grad-norm", type=positive_float, default=1.0,
                   help="gradient clipping by global norm (default %(default)g)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, more time)")


def add_run_args(p: argparse.ArgumentParser, g: argparse._ArgumentGroup, *, save_every: int) -> None:
    """Checkpointing, seed, resume, tokenizer workers, device and progress flags of both training recipes."""
    g.add_argument("--save-every", type=nonneg_int, default=save_every,
                   help="optimizer steps between resumable checkpoints (default %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: initialisation of the adapters (and of train_task.py's head), data order, "
                   "dropout, train_dapt.py's validation split and the demo data (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly (with the same "
                   "data and settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out: its outputs and "
                   "checkpoint are removed once this run's inputs have loaded (without --resume or --overwrite an "
                   "--out holding a run is refused)")
    p.add_argument("--workers", type=nonneg_int, default=2, help="tokenizer worker processes (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun "
                   "each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


LOG_OUTPUTS = ("checkpoint", "metrics.jsonl", "loss.png", "base_eval.json")  # written before a run has results
# What a train_task.py run folder holds besides its checkpoint (tfidf_baseline.py writes the same kind of folder)
TASK_RUN_OUTPUTS = ("task_adapter", "domain_adapter", "head", "predictions_val.npz", "predictions_test.npz",
                    "summary.json", "metrics.jsonl", "loss.png",
                    "eval_*.json", "predictions_*.npz", "predictions_*.csv")  # eval.py --run's files in the run


def present_outputs(out: Path, outputs: tuple[str, ...]) -> list[Path]:
    """The paths in ``out`` of ``outputs``: names, or glob patterns (``eval_*.json``), each path once."""
    found: dict[Path, None] = {}
    for name in outputs:
        paths = sorted(out.glob(name)) if any(c in name for c in "*?[") else [out / name]
        found.update((path, None) for path in paths if path.exists() or path.is_symlink())
    return list(found)


def check_out_folder(out: Path, outputs: tuple[str, ...], resume: bool, overwrite: bool,
                     resumable: bool = True) -> None:
    """A run that neither resumes nor overwrites refuses an ``out`` holding an earlier run (any of ``outputs`` or a
    checkpoint): a rerun by mistake would replace a finished run, or its checkpoint at the first save."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: choose one (continue the run in --out, or replace it)")
    found = [path.name for path in present_outputs(out, ("checkpoint", *outputs))]
    if found and not (resume or overwrite):
        how = ("pass --resume to continue it, --overwrite to replace it" if resumable
               else "pass --overwrite to replace it")
        raise InputError(f"{out}: holds an earlier run ({', '.join(found)}); {how}, or choose another --out")
    results = [name for name in found if name not in LOG_OUTPUTS]  # what a run stopped before its first save lacks
    if resume and results and not (out / "checkpoint" / "state.pt").is_file():
        raise InputError(f"{out}: --resume, but it holds a run without a checkpoint ({', '.join(results)}), which "
                         "a fresh start would replace; pass --overwrite for that, or choose another --out")


def remove_outputs(out: Path, outputs: tuple[str, ...]) -> None:
    """Remove an earlier run's ``outputs`` and checkpoint from ``out`` (files or folders; --overwrite), saying so."""
    import shutil

    removed = []
    for path in present_outputs(out, ("checkpoint", *outputs)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    if removed:
        print(f"overwrite: removed the earlier run's {', '.join(removed)} from {out}", file=sys.stderr)


def warn_beyond_positions(max_len: int, model_config) -> None:
    """One warning line when sequences would run past the positions the model was trained for (RoPE extrapolates
    poorly: the base perplexity of a 512-position model rose from 348 to 429 at 2,048 tokens)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and max_len > limit:
        print(f"warning: --max-seq-len {max_len} exceeds the model's {limit} positions (max_position_embeddings); "
              "sequences past them are outside what it was trained on", file=sys.stderr)


def resolve_recipe_precision(args: argparse.Namespace, device) -> str:
    """Resolve the recipes' ``--precision`` for ``device`` in place; returns a note to print once the inputs have
    loaded (so a bad input still fails in one line) when ``auto`` fell back to fp32, else ``""``."""
    from minilora.runtime import resolve_precision

    requested, args.precision = args.precision, resolve_precision(args.precision, device)
    if requested == "auto" and args.precision == "fp32":
        return f"precision: fp32 (auto: no native bf16 matmul on {device}; --precision bf16 forces bf16)"
    return ""
