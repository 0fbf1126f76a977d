"""Sequence classification on top of the LM: pooled final hidden state -> bias-free linear head (as the paper).

Single-label tasks train with class-weighted cross-entropy (weights N / (K * count_k)); multi-label tasks with
BCE-with-logits. Pooling is the last non-pad token of each right-padded sequence (the paper), or the mean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minilora.files import read_json_object, read_safetensors
from minilora.model import Transformer

if TYPE_CHECKING:
    import numpy as np

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str = "last") -> torch.Tensor:
    """[B, D] from hidden [B, T, D]: the last non-pad position (right padding) or the masked mean."""
    if attention_mask is None:
        return hidden[:, -1] if mode == "last" else hidden.mean(1)
    if mode == "last":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class Classifier(nn.Module):
    """A (LoRA-adapted) LLaMA with a classification head; ``forward`` returns fp32 logits [B, num_labels]."""

    def __init__(self, lm: Transformer, num_labels: int, multilabel: bool = False, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling {pooling!r}: expected 'last' or 'mean'")
        self.lm, self.num_labels, self.multilabel, self.pooling = lm, num_labels, multilabel, pooling
        self.head = nn.Linear(lm.config.hidden_size, num_labels, bias=False)  # drawn on the CPU, as LoRA's A
        nn.init.normal_(self.head.weight, std=lm.config.hidden_size**-0.5)
        self.head.to(lm.lm_head.weight.device)

    def set_gradient_checkpointing(self, enabled: bool = True, every: int = 1) -> None:
        self.lm.set_gradient_checkpointing(enabled, every)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = pool(self.lm.hidden_states(input_ids, attention_mask), attention_mask, self.pooling)
        return F.linear(h.float(), self.head.weight.float())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid per label for multi-label tasks, softmax over classes otherwise."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)

    def save_head(self, directory: str | Path, labels: list[str], extra: dict | None = None) -> None:
        """Write the head weights and its label vocabulary (atomically)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{HEAD_WEIGHTS}.tmp{os.getpid()}"
        save_file({"weight": self.head.weight.detach().float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, d / HEAD_WEIGHTS)
        cfg = {"num_labels": self.num_labels, "multilabel": self.multilabel, "pooling": self.pooling,
               "labels": labels, **(extra or {})}
        tmp = d / f".{HEAD_CONFIG}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, d / HEAD_CONFIG)

    @staticmethod
    def read_head(directory: str | Path) -> tuple[dict, torch.Tensor]:
        """(head config, weight) from a folder written by ``save_head``."""
        d = Path(directory)
        for name in (HEAD_CONFIG, HEAD_WEIGHTS):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: missing (expected a trained task run's head)")
        weights = read_safetensors(d / HEAD_WEIGHTS)
        if "weight" not in weights:
            raise ValueError(f"{d / HEAD_WEIGHTS}: no tensor 'weight' (expected a classification head)")
        return read_json_object(d / HEAD_CONFIG), weights["weight"]


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The paper's class weights N / (K * count_k); classes absent from training get weight 0."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    w = labels.numel() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w)).float()


def classification_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, normaliser) so that sum / normaliser is the usual mean loss.

    Single-label: weighted cross-entropy, normaliser = sum of the target classes' weights (PyTorch's weighted
    mean). Multi-label: BCE-with-logits summed over labels and samples, normaliser = samples x labels.
    """
    if multilabel:
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum")
        return loss, torch.tensor(float(targets.numel()), device=logits.device)
    loss = F.cross_entropy(logits, targets, weight=weights, reduction="sum")
    norm = weights[targets].sum() if weights is not None else torch.tensor(float(targets.numel()))
    return loss, norm.to(logits.device)


@torch.no_grad()
def predict(model: Classifier, dataset, pad_id: int, batch_size: int = 16, device: torch.device | str = "cpu",
            precision: str = "bf16", progress: bool = False, shard: bool = False) -> np.ndarray:
    """Probabilities [n, num_labels] (fp32, in dataset order) from length-sorted batches.

    ``shard``: under torchrun every rank must call it; each scores every world-size-th batch and all get the whole
    array (the same batches as one process, so the same numbers). Otherwise this process scores every row.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from minilora.data.tasks import collate_classification, eval_batches
    from minilora.train import all_reduce_sum, world

    device = torch.device(device)
    model.eval()
    out = np.zeros((len(dataset), model.num_labels), dtype=np.float32)
    batches = eval_batches(dataset.lengths, batch_size)
    rank, size = world() if shard else (0, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for idx in tqdm(batches[rank::size], desc="predict", unit="batch", disable=not progress, leave=False):
            b = collate_classification([dataset[i] for i in idx], pad_id)
            logits = model(b["input_ids"].to(device), b["attention_mask"].to(device))
            out[idx] = model.probabilities(logits.float()).cpu().numpy()
    if size > 1:  # each row was scored by one rank and is zero on the others: the sum is the whole array
        out = all_reduce_sum(torch.from_numpy(out)).numpy()
    return out


def load_classifier(run_dir: str | Path, device: torch.device | str | None = None):
    """(Classifier, tokenizer, summary) rebuilt from a ``train_task.py`` run folder: base model, adapters, head."""
    from minilora.loading import adapter_fingerprint, from_pretrained, resolve_device, weights_fingerprint
    from minilora.lora import load_adapter

    run = Path(run_dir)
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: missing (expected a train_task.py run folder)")
    summary = read_json_object(summary_path)
    cfg = summary.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"{summary_path}: no 'config' object with the run's 'model' (expected a train_task.py run)")
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if cfg.get("precision", "bf16") == "bf16" else torch.float32
    for key in ("model", "domain_adapter"):  # runs before 20261202 recorded the paths as given
        path = cfg.get(key)
        if (path and not Path(path).expanduser().is_absolute() and not Path(path).exists()
                and ("/" in path or key != "model")):
            raise FileNotFoundError(f"{path}: not found from {Path.cwd()}; {summary_path} records this {key} path "
                                    "relative to the folder the run was trained in: run eval.py from there")
    lm, tok = from_pretrained(cfg["model"], dtype=dtype, device=device)
    # a run records what it was trained on (since 20261202): a path that now holds other weights is refused
    expected = summary.get("fingerprints") if isinstance(summary.get("fingerprints"), dict) else {}
    if "model" in expected and weights_fingerprint(lm) != expected["model"]:
        raise ValueError(f"{cfg['model']}: not the base model {run} was trained on (its weights differ from the "
                         f"fingerprint in {summary_path}); put that model back at this path")
    # the adapters the run used: its trained domain adapter (--domain-trainable) or the frozen one it was given,
    # and its task adapter unless --no-task-adapter
    if cfg.get("domain_adapter"):
        trained = cfg.get("domain_trainable", (run / "domain_adapter").is_dir())
        domain = run / "domain_adapter" if trained else Path(cfg["domain_adapter"])
        if not trained and "domain_adapter" in expected and (domain / "adapter_model.safetensors").is_file() and \
                adapter_fingerprint(domain) != expected["domain_adapter"]:
            raise ValueError(f"{domain}: not the domain adapter {run} was trained with (changed since: its weights "
                             f"differ from the fingerprint in {summary_path})")
        load_adapter(lm, domain, "domain")
    if not cfg.get("no_task_adapter", not (run / "task_adapter").is_dir()):
        load_adapter(lm, run / "task_adapter", "task")
    head_cfg, weight = Classifier.read_head(run / "head")
    model = Classifier(lm, head_cfg["num_labels"], head_cfg["multilabel"], head_cfg["pooling"])
    with torch.no_grad():
        model.head.weight.copy_(weight)
    return model.eval(), tok, summary
