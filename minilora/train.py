"""The training engine shared by ``train_dapt.py`` and ``train_task.py``.

AdamW over the trainable parameters only; linear warm-up then linear / cosine decay; gradient accumulation;
clipping; bf16 autocast; gradient checkpointing; periodic evaluation with the best result kept; metrics as JSONL
and a live progress bar; a loss-curve PNG; SIGINT/SIGTERM save and exit; ``resume`` continues exactly
(optimizer, scheduler, RNG and data position); a non-finite loss stops with the last good checkpoint intact.

Data parallelism (``torchrun``): every rank runs the same loop on its slice of each global micro-batch, and the
gradients of the trainable parameters (LoRA and heads: small) are summed with one all-reduce per optimizer step
and divided by the global number of loss terms, so N processes match one process with the same global batch.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minilora import graphs, optim

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


# Settings of TrainConfig a resume must share with the run that saved the checkpoint. The others may change: the
# run's length (epochs, max_steps: a resume may train on, and says so, since the schedule then stretches),
# precision, checkpointing, the evaluation and saving intervals
RESUME_SETTINGS = ("lr", "lr_overrides", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "warmup_ratio",
                   "batch_size", "grad_accum", "max_grad_norm", "seed")
RESUME_LENGTH = ("epochs", "max_steps")


def _plain(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples as lists), so that saved and current values compare equal."""
    return json.loads(json.dumps(obj, default=str))


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the paper's DAPT setup, HF-Trainer AdamW defaults)."""

    lr: float = 3e-4
    # parameter-name prefix -> peak learning rate (e.g. {"head.": 1e-3}); the rest use ``lr``
    lr_overrides: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8  # global micro-batch (split over ranks)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "bf16"  # bf16 autocast, or fp32
    grad_checkpointing: bool = False
    cuda_graph: bool = False  # replay the decoder's forward and backward as CUDA graphs (minilora.graphs)
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end)
    save_every: int = 50  # optimizer steps between resumable checkpoints
    log_every: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: expected linear, cosine or constant")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r}: expected bf16 or fp32")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        self.betas = tuple(self.betas)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed
    tokens: int = 0  # input tokens processed (all ranks)
    train_s: float = 0.0
    best: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class NonFiniteLoss(RuntimeError):
    """Raised when the loss becomes NaN or infinite."""


# ---- distributed helpers ----

def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


DIST_TIMEOUT_MIN = 180.0  # collectives' timeout (MINILORA_DIST_TIMEOUT_MIN): rank 0 may tokenize a corpus meanwhile


def init_distributed(device: str | None = None) -> torch.device:
    """This process's device, after initialising the process group under torchrun (nccl on CUDA, gloo on CPU).

    ``device`` (the recipes' --device): ``cpu`` or ``cuda``; None: cuda when available. Under torchrun a rank on
    CUDA always takes ``cuda:LOCAL_RANK`` (an explicit index is an error there). The group's timeout is
    MINILORA_DIST_TIMEOUT_MIN minutes (default 180): the other ranks wait in a barrier while rank 0 tokenizes the
    notes, which can outlast NCCL's default 10 minutes on a large corpus.
    """
    try:
        want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise ValueError(f"--device {device}: expected cpu or cuda") from None
    if want.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu or cuda")
    if want.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available to this process")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if want.index is not None:
            raise ValueError(f"--device {device}: under torchrun pass --device cuda; each rank uses cuda:LOCAL_RANK")
        if not dist.is_initialized():
            minutes = float(os.environ.get("MINILORA_DIST_TIMEOUT_MIN", DIST_TIMEOUT_MIN))
            timeout = datetime.timedelta(minutes=minutes)
            if want.type == "cuda":
                torch.cuda.set_device(local)
                dist.init_process_group("nccl", timeout=timeout)
            else:
                dist.init_process_group("gloo", timeout=timeout)
        return torch.device("cuda", local) if want.type == "cuda" else torch.device("cpu")
    if want.type == "cuda":
        return want if want.index is not None else torch.device("cuda", torch.cuda.current_device())
    return want


GLOO_DRAIN_S = 0.2  # seconds for gloo's worker thread to drop the last collective's tensors (shutdown_distributed)


def shutdown_distributed() -> None:
    """Destroy the process group if one is live (no collective: safe after another rank failed), then release the GIL
    for a moment. gloo's worker thread drops the last collective's tensors after the caller has its result, and
    dropping a tensor that has a Python object takes the GIL: if the interpreter is finalizing by then, the thread
    is ended inside a destructor and the process aborts ("terminate called without an active exception"; seen in
    about a third of 2-rank CPU runs on a 2-core Xeon). The pause lets the thread finish first."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(GLOO_DRAIN_S)


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be for a collective: NCCL takes CUDA tensors only, so a CPU tensor goes to
    this rank's GPU under ``nccl``; gloo takes it where it is."""
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over ranks, on ``t``'s device (``t`` itself, reduced in place, where the
    backend takes its device; the callers' loss and token counts are CPU tensors, which NCCL does not)."""
    if world()[1] > 1:
        moved = t.to(collective_device(dist.get_backend(), t.device))  # t itself where it already is
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)
    return t


class PeerStopped(Exception):
    """Rank 0 failed in work the other ranks waited for (``on_main``); it reports the error, they leave quietly."""


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 while the other ranks wait (they get None): a barrier that also carries whether it
    failed, so that on an error rank 0 reports it and the others raise ``PeerStopped`` instead of failing in a
    collective whose peer has gone (gloo: 'Connection closed by peer', a traceback per rank)."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = e
    if world()[1] > 1 and float(all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64))[0]):
        if error is None:
            raise PeerStopped()
    if error is not None:
        raise error
    return result


def share_rng_of_rank0() -> None:
    """Give every rank rank 0's CPU generator state (dropout seeds come from it: ``kernels.reference.draw_seed``).
    After a step in which a rank had no rows, and so drew no seeds, the ranks' states differ; a resume restores rank
    0's on all of them, so the uninterrupted run must continue from the same states to be matched exactly."""
    if world()[1] > 1:
        state = torch.get_rng_state()
        moved = state.to(collective_device(dist.get_backend(), state.device))
        dist.broadcast(moved, src=0)
        torch.set_rng_state(moved.cpu())


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


# ---- schedule and batching ----

def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at an optimizer step: linear warm-up, then the chosen decay to zero."""
    warm = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global micro-batches of indices for one epoch: a seeded permutation cut into full batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n - batch_size + 1, batch_size)] or [order.tolist()]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def param_groups(named: list[tuple[str, nn.Parameter]], lr: float, overrides: dict[str, float]) -> list[dict]:
    """AdamW groups: one per ``overrides`` prefix that matches something (first match wins), then the rest."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in named:
        key = next((pre for pre in overrides if name.startswith(pre)), "")
        groups.setdefault(key, []).append(p)
    unused = [pre for pre in overrides if pre not in groups]
    if unused:
        raise ValueError(f"lr_overrides: no trainable parameter name starts with {unused}")
    return [{"params": ps, "lr": overrides.get(key, lr)} for key, ps in groups.items()]


class Trainer:
    """Runs the optimisation loop for a model whose trainable parameters are those with ``requires_grad``.

    ``loss_fn(model, batch)`` returns (summed loss, number of loss terms) so that normalisation is global.
    ``evaluate(model)`` returns a metrics dict holding ``metric``; ``on_best(model, metrics)`` saves outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        dataset: Sequence,
        collate: Callable[[list], Batch],
        loss_fn: LossFn,
        out_dir: str | Path,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        on_best: Callable[[nn.Module, dict[str, float]], None] | None = None,
        metric: str = "val_loss",
        higher_is_better: bool = False,
        batches: Callable[[int], list[list[int]]] | None = None,
        device: torch.device | str = "cpu",
        identity: dict[str, Any] | None = None,
    ):
        """``identity``: what else a resume must share with the run that saved the checkpoint (JSON values: the data's
        fingerprint, the model, the adapter's settings); it is saved with the checkpoint and compared on resume,
        with the optimisation settings of ``cfg`` (``RESUME_SETTINGS``)."""
        self.model, self.cfg, self.dataset, self.collate, self.loss_fn = model, cfg, dataset, collate, loss_fn
        self.identity = _plain(identity or {})
        self.out_dir = Path(out_dir)
        self.evaluate, self.on_best = evaluate, on_best
        self.metric, self.higher = metric, higher_is_better
        self.device = torch.device(device)
        self.batches = batches or (lambda epoch: shuffled_batches(len(dataset), cfg.batch_size, cfg.seed, epoch))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError("the model has no trainable parameters (add an adapter or a head first)")
        # minilora.optim: torch's fused AdamW kernel (the HF Trainer's default "adamw_torch_fused"; the same update)
        # without torch.optim, whose Optimizer class imports torch._dynamo (1.4 s, about 150 MB)
        self.optimizer = optim.AdamW(
            param_groups(named, cfg.lr, cfg.lr_overrides),
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        )
        steps_per_epoch = max(1, len(self.batches(0)) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.scheduler = optim.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.state = TrainState()
        self.ckpt_path = self.out_dir / "checkpoint" / "state.pt"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._stop_signal: int | None = None
        if hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(cfg.grad_checkpointing)
        self.graphs = graphs.enable(model, self.device) if cfg.cuda_graph else None

    # ---- checkpointing ----

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly: trainable weights, optimizer, scheduler, RNG, data position."""
        if not is_main():
            return
        _atomic_torch_save(
            {
                "trainable": self.trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": asdict(self.state),
                "rng": {
                    "torch": torch.get_rng_state(),
                    # this device's generator only: a resume may see fewer GPUs (and the dropout seeds come
                    # from the CPU generator above, offset by the rank: kernels.reference.draw_seed)
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
                "config": asdict(self.cfg),
                "identity": self.identity,
                "world_size": world()[1],
            },
            self.ckpt_path,
        )

    def resume_differences(self, ck: dict) -> list[str]:
        """How this run differs from the one that saved ``ck``: ``"name old -> new"`` for each setting of
        ``RESUME_SETTINGS`` and each identity entry (checkpoints without them: nothing to compare)."""
        diffs = []
        saved, now = ck.get("config"), _plain(asdict(self.cfg))
        if isinstance(saved, dict):
            saved = _plain(saved)
            diffs += [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_SETTINGS if k in saved and saved[k] != now[k]]
        saved_id = ck.get("identity")
        if isinstance(saved_id, dict):
            diffs += [f"{k} {saved_id.get(k)!r} -> {self.identity.get(k)!r}"
                      for k in sorted(set(saved_id) | set(self.identity)) if saved_id.get(k) != self.identity.get(k)]
        return diffs

    def load_checkpoint(self) -> bool:
        """Restore from ``checkpoint/state.pt`` if present; returns whether a checkpoint was found."""
        if not self.ckpt_path.is_file():
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"{self.ckpt_path}: cannot read checkpoint ({e})") from None
        keys = ("trainable", "optimizer", "scheduler", "state", "rng")
        if not isinstance(ck, dict) or any(k not in ck for k in keys):
            raise ValueError(f"{self.ckpt_path}: not a minilora checkpoint (expected a dict with {', '.join(keys)})")
        diffs = self.resume_differences(ck)
        if diffs:
            raise ValueError(f"{self.ckpt_path}: saved by a run with other settings ({'; '.join(diffs)}); resume "
                             "with the same ones, or start again with --overwrite")
        self._check_world_size(ck.get("world_size"))
        saved = _plain(ck.get("config") or {})
        longer = [f"{k} {saved[k]!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_LENGTH
                  if k in saved and saved[k] != getattr(self.cfg, k)]
        done = int((ck.get("state") or {}).get("step", 0))
        if done > self.total_steps:
            raise ValueError(f"{self.ckpt_path}: has trained {done} steps, more than this run's {self.total_steps} "
                             f"({'; '.join(longer)}); resume with at least as many")
        if longer and is_main():
            print(f"resume: {'; '.join(longer)}: the learning-rate schedule now runs over {self.total_steps} steps",
                  file=sys.stderr)
        named = dict(self.model.named_parameters())
        missing = [n for n in ck["trainable"] if n not in named]
        if missing or len(ck["trainable"]) != len(self.params):
            raise ValueError(f"{self.ckpt_path}: trainable parameters differ from this model's (different settings?)")
        for n, t in ck["trainable"].items():
            if tuple(t.shape) != tuple(named[n].shape):
                raise ValueError(f"{self.ckpt_path}: {n} has shape {tuple(t.shape)}, this run's "
                                 f"{tuple(named[n].shape)} (other --r, targets or labels than the run that saved it?)")
        with torch.no_grad():
            for n, t in ck["trainable"].items():
                named[n].copy_(t)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.state = TrainState(**ck["state"])
        torch.set_rng_state(ck["rng"]["torch"])
        cuda_rng = ck["rng"]["cuda"]
        if isinstance(cuda_rng, (list, tuple)):  # older checkpoints: one state per visible GPU
            cuda_rng = cuda_rng[0] if cuda_rng else None
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        self._write_metrics(self.state.history, mode="w")  # drops lines written after the checkpoint
        return True

    def _check_world_size(self, saved: int | None) -> None:
        """A resume with another number of processes: refused when LoRA dropout is on (each rank draws its own masks,
        so the masks would change); otherwise a notice (the same gradients, summed in another order)."""
        size = world()[1]
        if saved is None or saved == size:
            return
        from minilora.lora import lora_layers

        if any(spec.dropout > 0 and not spec.merged for _, layer in lora_layers(self.model)
               for spec in layer.specs.values()):
            raise ValueError(f"{self.ckpt_path}: saved by a run of {saved} process(es), this one has {size}; with LoRA "
                             "dropout each rank draws its own masks, so the run would not continue as it began: "
                             f"resume with {saved} (torchrun --nproc_per_node {saved}), or start again with "
                             "--overwrite")
        if is_main():
            print(f"resume: saved by {saved} process(es), continuing with {size}: the same global batches, their "
                  "gradients summed in another order (equal up to rounding)", file=sys.stderr)

    def _write_metrics(self, rows: list[dict], mode: str = "a") -> None:
        if not is_main():
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, mode) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def log(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        self._write_metrics([row])

    # ---- the loop ----

    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def autocast(self):
        """bf16 autocast on this device when precision is bf16 (a no-op context otherwise); without its weight
        cache under CUDA graphs (which ``make_graphed_callables`` requires; the frozen weights are bf16 already)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16",
                              cache_enabled=not self.cfg.cuda_graph)

    def _micro_batch(self, indices: list[int]) -> tuple[Batch | None, int]:
        """This rank's share of a global micro-batch, on the device, and its number of tokens (counted before the
        copy, so that the host never waits for the device); (None, 0) when it has no rows (a last batch smaller
        than the number of ranks): the rank then adds nothing but still joins the step's collectives."""
        rank, size = world()
        mine = indices[rank::size]
        if not mine:
            return None, 0
        batch = self.collate([self.dataset[i] for i in mine])
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, tokens

    def run_eval(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.evaluate(self.model)
        self.model.train()
        value = metrics.get(self.metric)
        finite = value is not None and math.isfinite(value)
        improved = finite and (self.state.best is None or (value > self.state.best if self.higher else value < self.state.best))
        if improved or self.state.best_step is None:  # an undefined metric still keeps the first result
            self.state.best, self.state.best_step = (value if finite else None), self.state.step
            if self.on_best is not None and is_main():
                self.on_best(self.model, metrics)
        self.log({"step": self.state.step, **metrics, "best": self.state.best})
        return metrics

    def _last_good(self) -> str:
        if self.ckpt_path.is_file():
            return (f"The last good checkpoint is {self.ckpt_path} (resume with --resume, perhaps with a lower "
                    "learning rate)")
        return "No checkpoint had been written yet; lower the learning rate (or LoRA alpha) and start again"

    def fit(self, resume: bool = False) -> TrainState:
        """Train to ``total_steps``; returns the final state. Exits the process (code 130/143) on SIGINT/SIGTERM."""
        if not (resume and self.load_checkpoint()):
            if resume and is_main():
                print(f"resume: no checkpoint at {self.ckpt_path}; training from the start", file=sys.stderr)
            if is_main() and self.metrics_path.exists():
                self.metrics_path.unlink()
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.state

    def _loop(self) -> None:
        cfg, st = self.cfg, self.state
        self.model.train()
        bar = None
        if cfg.progress and is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=st.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        epoch_batches = self.batches(st.epoch)
        while st.step < self.total_steps:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            # the step's sums stay on the device until its end: one wait for the device per step, not per micro-batch
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, number of loss terms
            tokens = 0
            rows_short = False  # a micro-batch with fewer rows than ranks: some rank draws no dropout seeds
            for _ in range(cfg.grad_accum):
                if st.batch_in_epoch >= len(epoch_batches):
                    st.epoch += 1
                    st.batch_in_epoch = 0
                    epoch_batches = self.batches(st.epoch)
                rows_short |= len(epoch_batches[st.batch_in_epoch]) < world()[1]
                batch, n_tokens = self._micro_batch(epoch_batches[st.batch_in_epoch])
                st.batch_in_epoch += 1
                if batch is None:
                    continue
                with self.autocast():
                    loss, n = self.loss_fn(self.model, batch)
                loss.backward()
                sums[0] += loss.detach()
                sums[1] += n
                tokens += n_tokens
            # the stop flag travels with the step's sums, so that every rank stops after the same step
            stopping = float(self._stop_signal is not None)
            stats = all_reduce_sum(torch.cat([sums.cpu(), torch.tensor([float(tokens), stopping], dtype=torch.float64)]))
            mean_loss = float(stats[0] / stats[1])
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"loss became {mean_loss} at step {st.step + 1}; stopped. {self._last_good()}")
            self._reduce_gradients(float(stats[1]))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            if not math.isfinite(grad_norm):  # caught before the optimizer turns the weights into NaN
                raise NonFiniteLoss(
                    f"gradient norm became {grad_norm} at step {st.step + 1} (loss {mean_loss:.4g}); stopped. "
                    f"{self._last_good()}"
                )
            if rows_short:
                share_rng_of_rank0()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            st.step += 1
            st.tokens += int(stats[2])
            st.train_s += time.perf_counter() - t0
            tok_s = st.tokens / max(st.train_s, 1e-9)
            if st.step % cfg.log_every == 0 or st.step == self.total_steps:
                self.log({"step": st.step, "epoch": st.epoch + 1, "loss": mean_loss, "lr": lr,  # 1-based, as best_epoch
                          "grad_norm": grad_norm, "tokens": st.tokens, "tokens_per_s": tok_s})
            if bar is not None:  # the figures of the step the counter then shows
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                bar.update(1)
            if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < self.total_steps:
                self.run_eval()
            if stats[3] > 0 or (world()[1] == 1 and self._stop_signal is not None):
                self.save_checkpoint()
                barrier()  # the other ranks leave only once rank 0 has saved (torchrun ends the group on an exit)
                if bar is not None:
                    bar.close()
                signum = self._stop_signal or signal.SIGTERM  # a rank stopped by another rank's signal
                if is_main():
                    got = f"{signal.Signals(signum).name} received" if self._stop_signal else "another rank was stopped"
                    print(f"\n{got}: checkpoint saved at step {st.step} in {self.ckpt_path}; continue with --resume",
                          file=sys.stderr)
                sys.exit(128 + signum)
            if cfg.save_every and st.step % cfg.save_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if not self._evaluated_at(st.step):  # a run resumed from its final checkpoint has nothing left to do
            self.run_eval()
            self.save_checkpoint()

    def _evaluated_at(self, step: int) -> bool:
        """Whether the history holds an evaluation at ``step`` (the same on every rank: all keep the history)."""
        return self.evaluate is not None and any(
            row.get("step") == step and self.metric in row for row in reversed(self.state.history))

    def _reduce_gradients(self, total_count: float) -> None:
        """Sum gradients over ranks (one flat all-reduce) and divide by the global number of loss terms."""
        if world()[1] > 1:  # the same flat layout on every rank, also on one that had no rows this step
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        if world()[1] > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        for g in grads:
            g.div_(total_count)


def plot_curves(metrics_path: str | Path, out_png: str | Path, val_key: str = "val_loss") -> Path | None:
    """Training loss (and validation ``val_key``) against optimizer steps, as a PNG; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r[val_key]) for r in rows if val_key in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label=val_key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
