"""Downstream LoRA + classification head on a clinical outcome task (mortality, los, pmv, diagnoses, procedures).

Stacks base + clinical (domain) adapter + a new task adapter, all active in every forward pass. With no data
arguments it trains on the synthetic demo version of the task, using the demo DAPT adapter when one exists.
Outputs (in --out): task_adapter/, head/, domain_adapter/ (if trained), predictions_{val,test}.npz,
summary.json, metrics.jsonl, loss.png, checkpoint/ (for --resume).

predictions_*.npz holds ids (str [n]), y_true (class index [n], or multi-hot [n, L]), probs (float32 [n, K]:
softmax, or per-label sigmoid for multi-label), labels (class / code names) and kind; read with numpy.load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minilora import from_pretrained
from minilora.classify import Classifier, class_weights, classification_loss_sum, predict
from minilora.cli import (
    TASK_RUN_OUTPUTS, InputError, add_lora_args, add_optimisation_args, add_run_args, check_out_folder, lora_settings,
    parse_with_config, positive_float, positive_int, remove_outputs, resolve_recipe_precision, run_cli,
    warn_beyond_positions, write_json_atomic,
)
from minilora.data.synthetic import TASKS, write_task_csvs
from minilora.data.tasks import (
    EncodedSplit, bucketed_batches, collate_classification, data_source, load_named_task, load_task_files,
    print_report,
)
from minilora.data.tasks import fingerprint as task_fingerprint
from minilora.loading import absolute_if_path, adapter_fingerprint, weights_fingerprint
from minilora.lora import (
    add_adapter, load_adapter, restore_adapter, save_adapter, set_trainable, trainable_parameters,
)
from minilora.metrics import UndefinedMetricError, task_auroc
from minilora.train import (
    TrainConfig, Trainer, init_distributed, is_main, on_main, peak_memory_mb, plot_curves, world,
)

# Demo cohort sizes: enough that each split holds a few dozen positives of the rarer outcomes (about 8% of admissions
# die; PMV's cohort is the ventilated quarter), so that picking the best epoch on validation is not noise.
DEMO_PATIENTS = {"mortality": 1200, "los": 1200, "pmv": 3600, "diagnoses": 1200, "procedures": 1200}
DEMO_EPOCHS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file of settings (flag names); command-line flags override it (a "
                   "switch it sets is turned off by its opposite: --no-X for --X, --X for --no-X)")
    p.add_argument("--task", default="mortality",
                   help=f"one of {', '.join(TASKS)}, or a name for a custom task given by --train/--val/--test "
                   "(default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the van Aken / BEEP CSVs, or one tools/mimic4_tasks.py built from MIMIC-IV "
                        "(default: the synthetic demo task)")
    p.add_argument("--train", default=None, help="custom task: training CSV/JSONL")
    p.add_argument("--val", default=None, help="custom task: validation CSV/JSONL")
    p.add_argument("--test", default=None, help="custom task: test CSV/JSONL")
    p.add_argument("--text-col", default="text", help="custom task: text column / JSON field (default text)")
    p.add_argument("--label-col", default="label", help="custom task: label column / JSON field (default label)")
    p.add_argument("--id-col", default="id", help="custom task: id column (default id)")
    p.add_argument("--multilabel", action="store_true", help="custom task: labels are --label-sep separated codes")
    p.add_argument("--label-sep", default=",", help="separator of multi-label codes (default ,)")
    p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf, llama2.c .bin or smollm2-135m (default: %(default)s, "
                   "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--domain-adapter", default=None,
                   help="clinical LoRA from train_dapt.py (<out>/adapter); demo default: runs/dapt/adapter if present")
    p.add_argument("--no-domain-adapter", action="store_true", help="do not use a clinical adapter")
    p.add_argument("--domain-trainable", action="store_true", help="train the clinical adapter too")
    p.add_argument("--no-task-adapter", action="store_true", help="head only (the paper's LLaMA* baseline)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<task>)")
    g = p.add_argument_group("task LoRA and head")
    add_lora_args(g, r=8, alpha=16)
    g.add_argument("--pooling", default=None, choices=["last", "mean"],
                   help="last non-pad token (the paper; default) or mean over tokens (demo default: a 135M model "
                   "reading 128 tokens for a few hundred steps learns the outcomes from the mean, not the last token)")
    g.add_argument("--max-seq-len", type=positive_int, default=None, help="tokens per note (default 512, demo 128)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate of the adapters (and of the head); default 3e-4, demo 5e-4")
    g.add_argument("--head-lr", type=positive_float, default=None,
                   help="peak learning rate of the classification head (default: --lr; demo 5e-3); a freshly "
                   "initialised head often wants a larger one than the adapters")
    g.add_argument("--epochs", type=positive_float, default=None,
                   help=f"passes over the training split (default 10 as the paper; demo {DEMO_EPOCHS})")
    add_optimisation_args(g)
    add_run_args(p, g, save_every=50)
    return p


def setting_name(args: argparse.Namespace, domain: str | None) -> str:
    """The paper's name for this configuration (eval.py groups and compares by it)."""
    task = "" if args.no_task_adapter else "LoRA"
    if not domain:
        return task or "head-only"
    clinical = f"Clinical LoRA ({'trainable' if args.domain_trainable else 'frozen'})"
    return f"{clinical} + {task}" if task else clinical


def load_data(args: argparse.Namespace, out: Path):
    """The task's splits and what they are (custom, mimic, mimic-iv, demo): custom files, a van Aken folder (or
    one tools/mimic4_tasks.py built), or the synthetic demo (written once under runs/)."""
    if args.train or args.val or args.test:
        if not (args.train and args.val and args.test):
            raise InputError("a custom task needs all of --train, --val and --test")
        files = {"train": Path(args.train), "val": Path(args.val), "test": Path(args.test)}
        kind = "multilabel" if args.multilabel else None
        data = load_task_files(files, args.task, kind or "multiclass", args.text_col, args.label_col, args.id_col,
                               args.label_sep)
        if kind is None and data.num_labels == 2:
            data.kind = "binary"
        return data, "custom"
    if args.task not in TASKS:
        raise InputError(f"--task {args.task!r}: expected one of {', '.join(TASKS)} (or give --train/--val/--test)")
    if args.data_dir:
        return load_named_task(args.task, args.data_dir), data_source(args.data_dir)
    demo_dir = out.parent / "demo-data" / "tasks"
    # The files are written once; a stamp of how they were drawn rewrites them when the demo cohort changes.
    stamp, drawn = demo_dir / f".{args.task}.cohort", f"patients={DEMO_PATIENTS[args.task]} seed={args.seed}\n"

    def write_if_stale() -> None:  # rank 0 decides and writes; every rank joins (one deciding alone could hang)
        fresh = stamp.is_file() and stamp.read_text() == drawn and (demo_dir / TASKS[args.task].file("train")).is_file()
        if not fresh:
            write_task_csvs(demo_dir, args.task, DEMO_PATIENTS[args.task], seed=args.seed)
            stamp.write_text(drawn)

    on_main(write_if_stale)
    return load_named_task(args.task, demo_dir), "demo"


def main(argv: list[str] | None = None) -> int:
    args = parse_with_config(build_parser(), argv)
    t_start = time.perf_counter()
    device = init_distributed(args.device)
    precision_note = resolve_recipe_precision(args, device)
    torch.manual_seed(args.seed)
    out = Path(args.out or f"runs/{args.task}")
    check_out_folder(out, TASK_RUN_OUTPUTS, args.resume, args.overwrite)
    demo = not (args.data_dir or args.train)
    data, source = load_data(args, out)
    if is_main():
        print_report(data)
        if precision_note:
            print(precision_note, file=sys.stderr)
    # Demo defaults: short notes, a few epochs over ~800 training notes and a faster head fit each task in under 10
    # minutes on 2 CPU cores (the slow test checks it); real data gets the paper's settings.
    max_len = args.max_seq_len or (128 if demo else 512)
    epochs = args.epochs or (DEMO_EPOCHS if demo else 10)
    args.lr = args.lr if args.lr is not None else (5e-4 if demo else 3e-4)
    args.head_lr = args.head_lr if args.head_lr is not None else (5e-3 if demo else None)
    args.pooling = args.pooling or ("mean" if demo else "last")

    domain = None if args.no_domain_adapter else args.domain_adapter
    if domain is None and demo and not args.no_domain_adapter and Path("runs/dapt/adapter").is_dir():
        domain = "runs/dapt/adapter"
    base_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    lm, tok = from_pretrained(args.model, dtype=base_dtype, device=device)
    if tok is None:
        raise InputError(f"{args.model}: no tokenizer found beside the model")
    if is_main():
        warn_beyond_positions(max_len, lm.config)
    fingerprints = {"model": weights_fingerprint(lm)}  # eval.py checks that it rebuilds the same model
    if args.domain_trainable and not domain:
        raise InputError("--domain-trainable: no domain adapter to train (give --domain-adapter DIR)")
    if domain:
        dapt_run = Path(domain).parent  # train_dapt.py writes adapter/ at each best validation, summary.json at the end
        if is_main() and (dapt_run / "checkpoint").is_dir() and not (dapt_run / "summary.json").is_file():
            print(f"warning: {domain}: its DAPT run has not finished (a checkpoint and no summary.json in {dapt_run}): "
                  f"this is its best adapter so far; finish it with train_dapt.py --resume --out {dapt_run}",
                  file=sys.stderr)
        load_adapter(lm, domain, "domain", trainable=args.domain_trainable)
        domain_print = adapter_fingerprint(domain)
        if not args.domain_trainable:  # the run keeps no copy of a frozen domain adapter
            fingerprints["domain_adapter"] = domain_print
    targets = "all-linear" if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    if not args.no_task_adapter:
        add_adapter(lm, "task", r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets)
    else:
        for p in lm.parameters():
            p.requires_grad_(False)
        if domain:
            set_trainable(lm, "domain", args.domain_trainable)
    multilabel = data.kind == "multilabel"
    model = Classifier(lm, data.num_labels, multilabel, args.pooling)
    n_train, pct = trainable_parameters(model)

    encoded = {s: EncodedSplit(data.splits[s], tok, max_len, workers=args.workers) for s in data.splits}
    if args.overwrite and is_main():  # the inputs have loaded: nothing of the earlier run goes for a typo
        remove_outputs(out, TASK_RUN_OUTPUTS)
    train_ds = encoded["train"]
    weights = None if multilabel else class_weights(torch.as_tensor(data.splits["train"].targets), data.num_labels)
    weights = weights.to(device) if weights is not None else None
    batches_per_epoch = len(bucketed_batches(train_ds.lengths, args.batch_size, args.seed, 0))
    steps_per_epoch = max(1, batches_per_epoch // args.grad_accum)
    cfg = TrainConfig(
        lr=args.lr, lr_overrides={} if args.head_lr is None else {"head.": args.head_lr},
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
        epochs=epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm, precision=args.precision, grad_checkpointing=args.grad_checkpointing,
        eval_every=steps_per_epoch, save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
    )

    def loss_fn(m, batch):
        logits = m(batch["input_ids"], batch["attention_mask"])
        return classification_loss_sum(logits, batch["labels"], multilabel, weights)

    def auroc(split: str, probs: np.ndarray) -> float:
        try:
            return task_auroc(data.splits[split].targets, probs, data.kind)
        except UndefinedMetricError as e:
            if is_main():
                print(f"warning: {split} AUROC is undefined ({e})", file=sys.stderr)
            return float("nan")

    last_val: dict[str, np.ndarray] = {}

    def evaluate(m) -> dict[str, float]:
        last_val["probs"] = predict(m, encoded["val"], tok.pad_id, args.batch_size, device, args.precision,
                                    shard=True)  # under torchrun each rank scores its share
        return {"val_auroc": auroc("val", last_val["probs"])}

    def write_predictions(split: str, probs: np.ndarray) -> None:
        tmp = out / f".predictions_{split}.tmp{os.getpid()}.npz"
        np.savez(tmp, ids=np.array(data.splits[split].ids), y_true=data.splits[split].targets,
                 probs=probs.astype(np.float32), labels=np.array(data.labels), kind=np.array(data.kind))
        os.replace(tmp, out / f"predictions_{split}.npz")

    def on_best(m, metrics) -> None:
        if not args.no_task_adapter:
            save_adapter(lm, "task", out / "task_adapter", base_model_name=str(args.model))
        if domain and args.domain_trainable:
            save_adapter(lm, "domain", out / "domain_adapter", base_model_name=str(args.model))
        m.save_head(out / "head", data.labels, {"task": data.name, "kind": data.kind})
        write_predictions("val", last_val["probs"])

    trainer = Trainer(model, cfg, train_ds, lambda b: collate_classification(b, tok.pad_id), loss_fn, out,
                      evaluate=evaluate, on_best=on_best, metric="val_auroc", higher_is_better=True,
                      batches=lambda epoch: bucketed_batches(train_ds.lengths, args.batch_size, args.seed, epoch),
                      device=device, identity={
                          "task": data.name, "model": fingerprints["model"], "data": task_fingerprint(data),
                          "max_seq_len": max_len, "pooling": args.pooling,
                          "domain_adapter": domain_print if domain else None,
                          "domain_trainable": args.domain_trainable,
                          "task_adapter": None if args.no_task_adapter else lora_settings(args)})
    state = trainer.fit(resume=args.resume)
    if not is_main():
        return 0
    best = restore_best(model, out, task=not args.no_task_adapter, domain=bool(domain and args.domain_trainable))
    test_probs = predict(best, encoded["test"], tok.pad_id, args.batch_size, device, args.precision,
                         progress=not args.no_progress)
    write_predictions("test", test_probs)
    plot_curves(out / "metrics.jsonl", out / "loss.png", val_key="val_auroc")
    summary = {
        "task": data.name, "kind": data.kind, "setting": setting_name(args, domain), "data": source,
        "val_auroc": state.best, "test_auroc": finite_or_none(auroc("test", test_probs)),
        "best_step": state.best_step, "best_epoch": (state.best_step or 0) // steps_per_epoch,
        "trainable_params": n_train, "trainable_percent": pct,
        "train_tokens": state.tokens, "tokens_per_s": state.tokens / max(state.train_s, 1e-9),
        "peak_mem_mb": peak_memory_mb(device), "wall_s": time.perf_counter() - t_start, "world_size": world()[1],
        "labels": data.labels, "data_report": data.report,
        # paths absolute: eval.py --run rebuilds the model from them, from whatever folder it runs in
        "config": {**vars(args), "max_seq_len": max_len, "epochs": epochs, "model": absolute_if_path(args.model),
                   "domain_adapter": absolute_if_path(domain)},
        "fingerprints": fingerprints,
    }
    write_json_atomic(out / "summary.json", summary)
    shown = {k: "undefined" if summary[k] is None else f"{summary[k]:.4f}" for k in ("val_auroc", "test_auroc")}
    print(f"{data.name}: val AUROC {shown['val_auroc']}, test AUROC {shown['test_auroc']} "
          f"({summary['setting']}); outputs in {out}")
    return 0


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: an undefined metric is written as null."""
    return x if np.isfinite(x) else None


def restore_best(model: Classifier, out: Path, task: bool, domain: bool) -> Classifier:
    """Put the best epoch's head and the adapters this run trained (``task``, ``domain``) back into ``model``."""
    for folder, name, trained in (("task_adapter", "task", task), ("domain_adapter", "domain", domain)):
        if trained:
            restore_adapter(model.lm, out / folder, name)
    _, weight = Classifier.read_head(out / "head")
    with torch.no_grad():
        model.head.weight.copy_(weight)
    return model


if __name__ == "__main__":
    run_cli(main)
