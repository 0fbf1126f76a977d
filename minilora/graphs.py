"""The decoder's training forward and backward replayed as CUDA graphs (``train_dapt.py --cuda-graph``).

At small batches a GPU step of minilora waits on its host (Python and kernel launches): at LLaMA-7B shapes,
8 x 256 tokens, an H200 was busy 12.3 ms of the 17.6 ms step. A CUDA graph launches all the recorded kernels of
the decoder's forward with one call, and those of its backward with another. ``torch.cuda.make_graphed_callables``
records them, after warm-up iterations on a side stream in which Triton tunes its kernels and the LoRA GEMMs are
chosen, and returns an autograd function that replays them. The LM head's loss, gradient clipping, the optimizer
and evaluation stay eager.

What a graph needs, and how it is met here:
- fixed shapes: one graph, for the first input shape seen twice (so a one-off shape never costs a capture); other
  shapes run eagerly;
- no host synchronisation inside: the decoder has none without an attention mask (tests/test_graphs.py records
  the aten ops of a forward and backward on the Triton path to check); a batch with padding runs eagerly;
- the same memory and adapters at every replay: tensors the graph reads that are neither inputs nor parameters
  (the RoPE tables) are kept alive here; moving the model (``.to()``, which re-packs its weights) and adding,
  merging, unmerging, freezing or unfreezing adapters (``minilora.lora``) drop the graph;
- no random draws: LoRA dropout draws a seed on the host per call, which a graph would replay, so ``enable``
  refuses dropout; gradient checkpointing saves the RNG state, which a capture cannot read, so it is refused too;
- no autocast weight cache (PyTorch's rule for ``make_graphed_callables``): the Trainer turns it off;
- gradients that outlive the next replay: the graphed backward returns each parameter's gradient in the graph's
  static buffer, which autograd then makes the parameter's ``.grad`` when it had none, so the next micro-batch's
  replay overwrites it and gradient accumulation adds that micro-batch twice (pytorch/pytorch#181723). A hook on
  each parameter the graph differentiates hands autograd a copy instead (one adapter-sized copy per step).
A capture that fails leaves the run eager, with one warning and the reason in ``status()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


def settings_refusal(device: torch.device | str, dropout: float, checkpointing: bool) -> str | None:
    """Why decoder graphs cannot run with these settings, or None when they can."""
    if torch.device(device).type != "cuda":
        return f"CUDA graphs need a CUDA device, got {device}"
    if dropout > 0:
        return f"CUDA graphs need LoRA dropout 0 (its mask is drawn on the host per call), got {dropout}"
    if checkpointing:
        return "CUDA graphs and gradient checkpointing do not go together (checkpointing saves the RNG state)"
    return None


def refusal(model: nn.Module, device: torch.device | str) -> str | None:
    """Why ``model`` cannot train with decoder graphs on ``device``, or None when it can."""
    from minilora.lora import lora_layers

    if not hasattr(model, "eager_hidden_states"):
        return f"CUDA graphs serve minilora's Transformer, got {type(model).__name__}"
    dropout = max((layer.specs[a].dropout for _, layer in lora_layers(model) for a in layer.active()), default=0.0)
    checkpointing = any(getattr(block, "checkpoint", False) for block in model.model.layers)
    return settings_refusal(device, dropout, checkpointing)


def enable(model: nn.Module, device: torch.device | str,
           make: Callable | None = None) -> "DecoderGraphs":
    """Route ``model.hidden_states`` in training through decoder graphs; raises ValueError where it cannot."""
    why = refusal(model, device)
    if why is not None:
        raise ValueError(why)
    graphs = DecoderGraphs(model, make)
    model.__dict__["_graphs"] = graphs  # a plain attribute: not a submodule, not in state_dict or .to()
    return graphs


def of(model: nn.Module) -> "DecoderGraphs | None":
    """The decoder graphs ``enable`` gave ``model``, or None."""
    return model.__dict__.get("_graphs")


def invalidate(model: nn.Module) -> None:
    """Drop ``model``'s graph, if any: its weights moved (``.to()``) or its adapters were added, merged, unmerged,
    frozen or unfrozen (``minilora.lora``), so a replay would run the old ones. A shape seen twice captures anew."""
    graphs = of(model)
    if graphs is not None:
        graphs.drop()


class _Decoder(nn.Module):
    """``model.hidden_states(ids)`` as a module whose parameters are the decoder's trainable ones (the adapters):
    ``make_graphed_callables`` differentiates a module's parameters. ``model`` is held, not registered."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.trainable = nn.ParameterList([p for p in model.model.parameters() if p.requires_grad])
        self.__dict__["lm"] = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.eager_hidden_states(ids)


class DecoderGraphs:
    """The graph of one input shape (see the module doc); ``__call__`` gives its hidden states or None (eager)."""

    def __init__(self, model: nn.Module, make: Callable | None = None):
        self.model = model
        self.make = make  # torch.cuda.make_graphed_callables when None (tests pass a stand-in)
        self.seen: dict[tuple, int] = {}
        self.key: tuple | None = None
        self.graphed: Callable | None = None
        self.keep: tuple = ()
        self.error: str | None = None
        self.replays = 0
        self.hooks: dict[int, tuple] = {}  # id(parameter) -> (it, its gradient-copy hook): see the module doc

    @staticmethod
    def _key(ids: torch.Tensor) -> tuple:
        dev = ids.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return tuple(ids.shape), str(ids.device), ids.dtype, cast

    def __call__(self, ids: torch.Tensor) -> torch.Tensor | None:
        key = self._key(ids)
        if self.graphed is None and self.error is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] >= 2:
                self._capture(ids, key)
        if self.graphed is None or key != self.key:
            return None
        self.replays += 1
        return self.graphed(ids)

    def _capture(self, ids: torch.Tensor, key: tuple) -> None:
        make = self.make or torch.cuda.make_graphed_callables
        self.keep = self.model.rope(ids.shape[1], ids.device)  # read by the graph, never an input: kept alive
        module = _Decoder(self.model)
        for p in module.trainable:
            if id(p) not in self.hooks:
                self.hooks[id(p)] = (p, p.register_hook(torch.Tensor.clone))  # p held: its id stays its own
        try:
            self.graphed = make(module, (ids.clone(),), allow_unused_input=True)
            self.key = key
            if ids.is_cuda:  # the warm-up ran on a side stream, whose cached blocks the main stream cannot reuse
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 (any capture failure: the run goes on eagerly)
            self.graphed, self.keep = None, ()
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"warning: CUDA graph capture failed ({self.error}); training continues without graphs",
                  file=sys.stderr)

    def drop(self) -> None:
        """Forget the graph (the weights it reads have moved, or the adapters changed); the next shape seen twice
        is captured again."""
        self.graphed, self.key, self.keep, self.seen = None, None, (), {}

    def status(self) -> dict:
        """For summaries: whether a graph runs, for which input shape, how often it replayed, or why not."""
        return {"captured": self.graphed is not None, "shape": list(self.key[0]) if self.key else None,
                "replays": self.replays, "error": self.error}
