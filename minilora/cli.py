"""Command-line plumbing shared by the recipes: TOML config files under flags, and clean exits on bad input."""

from __future__ import annotations

import argparse
import json
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


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE.toml`` replace the defaults and explicit flags override both.

    The TOML file holds flat ``key = value`` pairs named like the flags (``max_seq_len`` or ``max-seq-len``);
    tables are flattened, so ``[lora] r = 16`` also sets ``r``.
    """
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        parser.exit(EXIT_BAD_INPUT, f"error: {path}: config file not found\n")
    except tomllib.TOMLDecodeError as e:
        parser.exit(EXIT_BAD_INPUT, f"error: {path}: invalid TOML ({e})\n")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in flat.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            parser.exit(EXIT_BAD_INPUT, f"error: {path}: unknown setting {key!r}\n")
        defaults[dest] = value
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a recipe's ``main``: bad input (missing files, invalid values, a file format whose optional package is not
    installed) prints one line and exits with code 2.

    Under torchrun the process group is torn down before exit on every path: a rank that leaves with a live gloo
    group can abort in its destructor ("terminate called without an active exception") and fail the launch.
    glibc's allocator is tuned first (``minilora.runtime.tune_malloc``; MINILORA_MALLOC=default leaves it)."""
    from minilora.formats import MissingPackage
    from minilora.runtime import tune_malloc
    from minilora.train import NonFiniteLoss, shutdown_distributed

    try:
        tune_malloc()
        code = main()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except (InputError, FileNotFoundError, ValueError, KeyError, MissingPackage) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    finally:
        shutdown_distributed()
    sys.exit(code or 0)


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
    g.add_argument("--r", type=int, default=r, help="LoRA rank (default %(default)s)")
    g.add_argument("--alpha", type=float, default=alpha, help="LoRA alpha; the update is scaled by alpha / r "
                   "(default %(default)g)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapters' input "
                   "(default %(default)g)")
    g.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module names, or all-linear (default %(default)s)")


def add_optimisation_args(g: argparse._ArgumentGroup, *, demo_max_steps: int | None = None) -> None:
    """The optimisation flags both training recipes share, after their own --lr and --epochs (AdamW over the
    trainable parameters; the HF Trainer's defaults)."""
    demo = f"; demo {demo_max_steps}" if demo_max_steps else ""
    g.add_argument("--max-steps", type=int, default=None,
                   help=f"stop after this many optimizer steps (default: the epochs decide{demo})")
    g.add_argument("--batch-size", type=int, default=8,
                   help="global micro-batch in sequences, split over torchrun ranks (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default %(default)s)")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning-rate decay after the warm-up (default %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="fraction of the steps with a linear warm-up (default %(default)g)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)g)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping by global norm (default %(default)g)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, more time)")


def add_run_args(p: argparse.ArgumentParser, g: argparse._ArgumentGroup, *, save_every: int) -> None:
    """Checkpointing, seed, resume, tokenizer workers, device and progress flags of both training recipes."""
    g.add_argument("--save-every", type=int, default=save_every,
                   help="optimizer steps between resumable checkpoints (default %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: initialisation of the adapters (and head), data order, dropout and the "
                   "demo data (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly")
    p.add_argument("--workers", type=int, default=2, help="tokenizer worker processes (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun "
                   "each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_recipe_precision(args: argparse.Namespace, device) -> str:
    """Resolve the recipes' ``--precision`` for ``device`` in place; returns a note to print once the inputs have
    loaded (so a bad input still fails in one line) when ``auto`` fell back to fp32, else ``""``."""
    from minilora.runtime import resolve_precision

    requested, args.precision = args.precision, resolve_precision(args.precision, device)
    if requested == "auto" and args.precision == "fp32":
        return f"precision: fp32 (auto: no native bf16 matmul on {device}; --precision bf16 forces bf16)"
    return ""
