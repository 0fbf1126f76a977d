"""AdamW and the learning-rate schedule of the training engine, without ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` the first time a parameter group is added (its methods are
wrapped to keep the compiler out): 1.4 s and about 150 MB of resident memory in every training run, for a few
small LoRA tensors. ``AdamW`` here runs the same fused kernel as ``torch.optim.AdamW(fused=True)``
(``torch._fused_adamw_``, CPU and CUDA: one kernel over all the tensors of a device and dtype) on the same state,
so the updates are identical to the bit, and its ``state_dict`` has torch's layout: checkpoints written by either
load into the other. ``LambdaLR`` sets each group's lr to its initial lr times ``f(step)``, as
``torch.optim.lr_scheduler.LambdaLR`` does, with a compatible ``state_dict``.

Parameters must be floating point, on the CPU or a CUDA device (where the fused kernel runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

_HYPER = ("lr", "betas", "eps", "weight_decay")


class AdamW:
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) over ``params``: tensors, or dicts with ``params`` and
    any of lr, betas, eps, weight_decay. No amsgrad, maximize or gradient scaling (the trainer uses none)."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        groups = list(params)
        if not groups:
            raise ValueError("AdamW: no parameters to optimize")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for g in groups:
            group = {**defaults, **g, "params": list(g["params"])}
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("AdamW: a parameter appears in more than one group")
                seen.add(id(p))
            self.param_groups.append(group)
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        bad = [p for p in self._params() if not (p.is_floating_point() and p.device.type in ("cpu", "cuda"))]
        if bad:
            raise ValueError(f"AdamW: parameters must be floating point on cpu or cuda, not {bad[0].dtype} on "
                             f"{bad[0].device}")

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            # torch groups the tensors by device and dtype and runs one fused kernel per group: so do we
            buckets: dict[tuple, list[list[Tensor]]] = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                s = self.state.get(p)
                if not s:
                    s = self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                b = buckets.setdefault((p.device, p.dtype), [[], [], [], [], []])
                for lst, t in zip(b, (p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"])):
                    lst.append(t)
            beta1, beta2 = g["betas"]
            for ps, grads, m, v, steps in buckets.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(ps, grads, m, v, [], steps, lr=float(g["lr"]), beta1=float(beta1),
                                    beta2=float(beta2), weight_decay=float(g["weight_decay"]), eps=float(g["eps"]),
                                    amsgrad=False, maximize=False)

    # ---- state, in torch.optim's layout ----

    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for g in self.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved.update(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                         fused=True, decoupled_weight_decay=True)
            saved["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(saved)
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` of this class or of ``torch.optim.AdamW`` for the same parameter groups."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state: its parameter groups differ from this model's")
        by_index: dict[int, Tensor] = {}
        for g, sg in zip(self.param_groups, saved_groups):
            for k in (*_HYPER, "initial_lr"):
                if k in sg:
                    g[k] = tuple(sg[k]) if k == "betas" else sg[k]
            by_index.update(zip(sg["params"], g["params"]))
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {
                "step": torch.as_tensor(s["step"], dtype=torch.float32).to(p.device).reshape(()).clone(),
                "exp_avg": s["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
            }


class LambdaLR:
    """Each group's lr = its initial lr x ``f(step)``, set at construction (step 0) and by each ``step()``."""

    def __init__(self, optimizer: AdamW, f: Callable[[int], float]):
        self.optimizer, self.f = optimizer, f
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.f(self.last_epoch)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        # torch's keys, so that torch.optim.lr_scheduler.LambdaLR loads it too
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch, "_step_count": self.last_epoch + 1,
                "_is_initial": False, "_get_lr_called_within_step": False, "_last_lr": list(self._last_lr),
                "lr_lambdas": [None] * len(self.base_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` of this class or of ``torch.optim.lr_scheduler.LambdaLR``. Each group's lr is set
        from this scheduler's ``f`` at the loaded step (the same value when ``f`` is the saved run's; the new
        schedule's when a resumed run is longer, rather than the old schedule's last value)."""
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.f(self.last_epoch)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
