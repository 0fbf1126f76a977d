"""Clinical LoRA: domain-adaptive pretraining (causal LM) of a LoRA adapter on clinical notes.

With no arguments it runs the embedded demo: SmolLM2-135M on a synthetic clinical corpus, in minutes on a CPU.
Outputs (in --out): adapter/ (PEFT format), summary.json, metrics.jsonl, loss.png, checkpoint/ (for --resume).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from minilora import from_pretrained, graphs
from minilora.cli import (
    InputError, add_lora_args, add_optimisation_args, add_run_args, check_out_folder, lora_settings, nonneg_int,
    open_fraction, parse_with_config, positive_float, positive_int, remove_outputs, resolve_recipe_precision, run_cli,
    warn_beyond_positions, write_json_atomic,
)
from minilora.data.notes import build_token_cache
from minilora.data.packing import PackedDataset, TruncatedDataset, collate
from minilora.data.synthetic import write_dapt_corpus
from minilora.loading import weights_fingerprint
from minilora.losses import lm_loss_sum
from minilora.lora import add_adapter, save_adapter, trainable_parameters
from minilora.train import (
    TrainConfig, Trainer, all_reduce_sum, barrier, init_distributed, is_main, on_main, peak_memory_mb, plot_curves,
    world,
)

ADAPTER = "domain"
DEMO_NOTES = 600
DEMO_EVAL_SEQS = 48
DEMO_MAX_STEPS = 40


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file of settings (flag names); command-line flags override it (a "
                   "switch it sets is turned off by its opposite: --no-X for --X, --X for --no-X)")
    p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf, llama2.c .bin or smollm2-135m (default: %(default)s, "
                   "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--notes", nargs="+", default=None,
                   help="notes files/folders: MIMIC-IV-Note csv(.gz), CSV, JSONL(.gz), .txt or a folder of .txt "
                        "(default: the synthetic demo corpus)")
    p.add_argument("--text-field", default=None, help="text column / JSON field (default: text)")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace"],
                   help="non-UTF-8 bytes: stop with an error naming the line (strict, the default) or replace and "
                   "count them")
    p.add_argument("--out", default="runs/dapt", help="output folder (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="token cache folder (default: <out>/../cache)")
    p.add_argument("--val-fraction", type=open_fraction, default=0.1,
                   help="fraction of the notes held out for validation (by note; default %(default)g)")
    p.add_argument("--max-seq-len", type=positive_int, default=None, help="tokens per sequence (default 128, demo 256)")
    p.add_argument("--no-packing", action="store_true",
                   help="the paper's mode: only the first max-seq-len tokens of each note (default: pack notes)")
    add_lora_args(p.add_argument_group("LoRA (defaults: the paper's best clinical adapter)"), r=16, alpha=32)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=positive_float, default=3e-4, help="peak learning rate (default %(default)g)")
    g.add_argument("--epochs", type=positive_float, default=1.0,
                   help="passes over the training notes (default %(default)g)")
    add_optimisation_args(g, demo_max_steps=DEMO_MAX_STEPS)
    g.add_argument("--cuda-graph", action="store_true",
                   help="GPU: replay the decoder's training forward and backward as CUDA graphs, which removes the "
                        "host's per-kernel overhead at small batches (needs --dropout 0, no --grad-checkpointing; "
                        "batches with padding run without)")
    g.add_argument("--eval-every", type=nonneg_int, default=0, help="steps between validations (0: at the end only)")
    g.add_argument("--eval-max-seqs", type=positive_int, default=None,
                   help=f"cap on validation sequences (default: all; demo {DEMO_EVAL_SEQS})")
    add_run_args(p, g, save_every=25)
    return p


# What a run leaves in --out besides its checkpoint: an --out holding any of them takes --resume or --overwrite
RUN_OUTPUTS = ("adapter", "summary.json", "metrics.jsonl", "loss.png", "base_eval.json")


def perplexity_evaluator(dataset, batch_size: int, pad_id: int, device: torch.device, limit: int | None):
    """Validation loss and perplexity (exp of the mean token loss) over a fixed set of sequences, sharded by rank."""
    n = len(dataset) if limit is None else min(limit, len(dataset))

    def evaluate(model) -> dict[str, float]:
        rank, size = world()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # read back once, after the last batch
        for i in range(rank * batch_size, n, batch_size * size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, n))], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            h = model.hidden_states(batch["input_ids"], batch.get("attention_mask"))
            loss, count = lm_loss_sum(h, model.lm_head, batch["labels"])
            total += torch.stack([loss.double(), count.double()])
        total = all_reduce_sum(total.cpu())
        mean = float(total[0] / max(total[1], 1.0))
        return {"val_loss": mean, "val_ppl": math.exp(mean), "val_tokens": int(total[1])}

    return evaluate


def main(argv: list[str] | None = None) -> int:
    args = parse_with_config(build_parser(), argv)
    t_start = time.perf_counter()
    device = init_distributed(args.device)
    precision_note = resolve_recipe_precision(args, device)
    why = args.cuda_graph and graphs.settings_refusal(device, args.dropout, args.grad_checkpointing)
    if why:  # before the model loads and the notes are tokenized
        raise InputError(f"--cuda-graph: {why}")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    check_out_folder(out, RUN_OUTPUTS, args.resume, args.overwrite)
    demo = args.notes is None
    max_len = args.max_seq_len or (256 if demo else 128)
    if demo:
        notes = [out.parent / "demo-data" / "dapt_notes.jsonl"]
        # every rank joins (the check is rank 0's: a rank deciding for itself could skip a collective and hang)
        on_main(lambda: notes[0].is_file() or write_dapt_corpus(notes[0], DEMO_NOTES, seed=args.seed))
        if args.max_steps is None:
            args.max_steps = DEMO_MAX_STEPS
        if args.eval_max_seqs is None:
            args.eval_max_seqs = DEMO_EVAL_SEQS
    else:
        notes = [Path(n) for n in args.notes]
    base_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tok = from_pretrained(args.model, dtype=base_dtype, device=device)
    if tok is None:
        raise InputError(f"{args.model}: no tokenizer found beside the model")
    if is_main():
        warn_beyond_positions(max_len, model.config)
    base_fingerprint = weights_fingerprint(model)  # a resume must continue on the same weights
    cache_dir = Path(args.cache_dir) if args.cache_dir else out.parent / "cache"
    def token_cache():
        return build_token_cache(notes, tok, cache_dir, text_field=args.text_field, val_fraction=args.val_fraction,
                                 seed=args.seed, workers=args.workers, encoding_errors=args.encoding_errors,
                                 progress=not args.no_progress and is_main())

    cache = on_main(token_cache)  # rank 0 tokenizes (and reports bad input); the other ranks then read its cache
    if not is_main():
        cache = token_cache()
    barrier()
    if is_main():
        st = cache.stats
        print(f"notes: {st['notes']:,} used, {st['empty']:,} empty skipped; {st['num_tokens']:,} tokens "
              f"({st['val_docs']:,} notes / {st['val_tokens']:,} tokens held out for validation)", file=sys.stderr)
        if precision_note:
            print(precision_note, file=sys.stderr)
    ds_cls = TruncatedDataset if args.no_packing else PackedDataset
    train_ds, val_ds = ds_cls(cache, "train", max_len), ds_cls(cache, "val", max_len)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise InputError(f"{notes[0]}: too little text for a train/validation split "
                         f"({len(train_ds)} train / {len(val_ds)} validation sequences of {max_len} tokens)")
    targets = "all-linear" if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    add_adapter(model, ADAPTER, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets)
    if args.overwrite and is_main():  # the inputs have loaded: nothing of the earlier run goes for a typo
        remove_outputs(out, RUN_OUTPUTS)
    n_train, pct = trainable_parameters(model)

    cfg = TrainConfig(
        lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm, precision=args.precision, grad_checkpointing=args.grad_checkpointing,
        cuda_graph=args.cuda_graph, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
    )
    evaluate = perplexity_evaluator(val_ds, args.batch_size, tok.pad_id, device, args.eval_max_seqs)

    def loss_fn(m, batch):
        h = m.hidden_states(batch["input_ids"], batch.get("attention_mask"))
        return lm_loss_sum(h, m.lm_head, batch["labels"])

    def on_best(m, metrics):
        save_adapter(m, ADAPTER, out / "adapter", base_model_name=str(args.model))

    identity = {"model": base_fingerprint, "notes": cache.path.name, "val_fraction": args.val_fraction,
                "max_seq_len": max_len, "packing": not args.no_packing, "eval_max_seqs": args.eval_max_seqs,
                "adapter": lora_settings(args)}
    trainer = Trainer(model, cfg, train_ds, lambda b: collate(b, tok.pad_id), loss_fn, out, evaluate=evaluate,
                      on_best=on_best, metric="val_ppl", device=device, identity=identity)
    base_path = out / "base_eval.json"
    if args.resume and base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        trainer.model.eval()
        with torch.no_grad(), trainer.autocast():
            base = evaluate(model)
        if is_main():
            write_json_atomic(base_path, base)
    state = trainer.fit(resume=args.resume)
    if not is_main():
        return 0
    plot_curves(out / "metrics.jsonl", out / "loss.png", val_key="val_loss")
    summary = {
        "base_val_ppl": base["val_ppl"],
        "val_ppl": state.best,
        "best_step": state.best_step,
        "train_tokens": state.tokens,
        "tokens_per_s": state.tokens / max(state.train_s, 1e-9),
        "peak_mem_mb": peak_memory_mb(device),  # rank 0's
        "wall_s": time.perf_counter() - t_start,
        "world_size": world()[1],
        "cuda_graph": trainer.graphs.status() if trainer.graphs is not None else None,
        "trainable_params": n_train,
        "trainable_percent": pct,
        "train_sequences": len(train_ds),
        "val_sequences": len(val_ds),
        "notes": cache.stats,
        "config": {**vars(args), "max_seq_len": max_len, "notes": [str(n) for n in notes]},
    }
    write_json_atomic(out / "summary.json", summary)
    print(f"base val ppl {summary['base_val_ppl']:.3f} -> adapted {summary['val_ppl']:.3f}; "
          f"{summary['tokens_per_s']:,.0f} tokens/s; adapter in {out / 'adapter'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
