"""LoRA: a linear layer with a frozen base weight and any number of named adapters, all applied in one fused op.

Every adapter that is added and not merged takes part in every forward pass (base + domain + task), through
``kernels.lora_linear``: one concatenated rank-R problem, Triton on CUDA and an exact PyTorch path on CPU.
Adapters save and load in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from minilora import graphs
from minilora.files import read_json_object, read_safetensors

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterSpec:
    """One adapter's settings in one layer."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    merged: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """``y = x W^T + sum_i s_i dropout(x) A_i^T B_i^T`` over the unmerged adapters; W is frozen.

    While training, each adapter drops its own input at its own rate, as PEFT's layers do: the adapters of one
    rate share a mask and run fused with the base GEMM (those of the last adapter's rate, usually the trainable
    one); each further rate adds its adapters' terms on its own mask.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linear layers (LLaMA has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}

    def add(self, name: str, spec: AdapterSpec, trainable: bool) -> None:
        """Add adapter ``name``: A Kaiming-uniform as nn.Linear (and PEFT), B zero, so the output is unchanged.

        A is drawn on the CPU (torch's global CPU generator) and then moved, so a seed gives the same adapter on
        every device: a CUDA run starts where the CPU run does."""
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists")
        a = torch.empty(spec.r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        a = a.to(self.weight.device)
        b = torch.zeros(self.out_features, spec.r, device=self.weight.device, dtype=torch.float32)
        self.lora_A[name] = nn.Parameter(a, requires_grad=trainable)
        self.lora_B[name] = nn.Parameter(b, requires_grad=trainable)
        self.specs[name] = spec

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` [N, K] in fp32, for merging."""
        return self.specs[name].scaling * (self.lora_B[name].float() @ self.lora_A[name].float())

    def active(self) -> list[str]:
        return [n for n, s in self.specs.items() if not s.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.active()
        p = self.specs[names[-1]].dropout if names and self.training else 0.0
        fused = [n for n in names if not self.training or self.specs[n].dropout == p]
        y = kernels.lora_linear(
            x, self.weight, [self.lora_A[n] for n in fused], [self.lora_B[n] for n in fused],
            [self.specs[n].scaling for n in fused], dropout_p=p, training=self.training,
        )
        dtype = kernels.reference.compute_dtype(x)  # as the fused call computes (autocast's, else x's)
        for rate in dict.fromkeys(self.specs[n].dropout for n in names if n not in fused):
            xd = x if rate == 0 else x * kernels.reference.dropout_mask(x.shape, rate, x.device) / (1.0 - rate)
            xd = xd.to(dtype)
            for n in (n for n in names if self.specs[n].dropout == rate):
                a, b = self.lora_A[n].to(dtype), self.lora_B[n].to(dtype)
                y = y + (self.specs[n].scaling * F.linear(F.linear(xd, a), b)).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={s.r}, alpha={s.alpha}{', merged' if s.merged else ''})" for n, s in self.specs.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ads}]"


# ---------------------------------------------------------------- packed projections
# Linears that read the same input (q/k/v, gate/up) keep their own modules, names and adapters, but their frozen
# weights can live as row blocks of one tensor; ``linear_group`` then runs them as one wider GEMM (and one GEMM in
# backward, where separate layers need one per layer plus the sum of their input gradients).

def packed_weight(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``[sum N_i, K]`` view whose row blocks are ``weights``, if they lie back to back in one storage."""
    w0 = weights[0]
    if w0.dim() != 2:
        return None
    K, ptr, offset = w0.shape[1], w0.untyped_storage().data_ptr(), w0.storage_offset()
    for w in weights:
        if (w.dim() != 2 or w.shape[1] != K or not w.is_contiguous() or w.dtype != w0.dtype
                or w.device != w0.device or w.untyped_storage().data_ptr() != ptr or w.storage_offset() != offset):
            return None
        offset += w.numel()
    return w0.detach().as_strided((sum(w.shape[0] for w in weights), K), (K, 1))


@torch.no_grad()
def pack_linears(modules: Sequence[nn.Module]) -> None:
    """Move the weights of ``modules`` (nn.Linear or LoRALinear) into row blocks of one new tensor, in place of
    their ``.data`` (the Parameter objects, values and flags stay), unless they are packed already."""
    weights = [m.weight for m in modules]
    if packed_weight(weights) is not None:
        return
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
        return
    w0 = weights[0]
    if w0.is_meta:  # no values to copy; and torch.cat of meta tensors imports torch._dynamo (Embedding in model.py)
        packed = torch.empty((sum(w.shape[0] for w in weights), w0.shape[1]), dtype=w0.dtype, device=w0.device)
    else:
        packed = torch.cat([w.detach() for w in weights])
    offset = 0
    for w in weights:
        w.data = packed[offset:offset + w.shape[0]]
        offset += w.shape[0]


def linear_group(x: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor | None:
    """``cat([m(x) for m in modules], -1)`` as one fused LoRA linear over the packed weight, or None when the
    modules do not allow it (weights not packed or trainable, biases, other module types, or LoRA dropout while
    training: separate layers draw separate masks). Each adapter's B covers its module's rows of the packed output
    (``b_rows``), so the stacked-LoRA product gives every module exactly its own adapters' terms; with no adapter
    at all it is one plain linear."""
    weights = [m.weight for m in modules]
    if any(w.requires_grad for w in weights):
        return None
    weight = packed_weight(weights)
    if weight is None:
        return None
    lora_a, lora_b, scaling, rows = [], [], [], []
    offset = 0
    for m, w in zip(modules, weights):
        n = w.shape[0]
        if isinstance(m, LoRALinear):
            for name in m.active():
                spec = m.specs[name]
                if m.training and spec.dropout > 0:
                    return None
                lora_a.append(m.lora_A[name])
                lora_b.append(m.lora_B[name])
                scaling.append(spec.scaling)
                rows.append((offset, n))
        elif type(m) is not nn.Linear or m.bias is not None:
            return None
        offset += n
    if not lora_a:
        return F.linear(x, weight)
    return kernels.lora_linear(x, weight, lora_a, lora_b, scaling, b_rows=rows)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            yield name, mod


def _target_names(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[str]:
    """Full module names to adapt: suffix matches of ``targets``, or every block linear for ``all-linear``."""
    wanted = LINEAR_NAMES if targets == "all-linear" else (targets,) if isinstance(targets, str) else tuple(targets)
    names = [
        n for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoRALinear)) and n.rsplit(".", 1)[-1] in wanted and n != "lm_head"
    ]
    if not names:
        raise ValueError(f"no linear layer matches targets {list(wanted)}; expected names among {list(LINEAR_NAMES)}")
    return names


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    mod = getattr(parent, child)
    if not isinstance(mod, LoRALinear):
        mod = LoRALinear(mod).train(mod.training)  # a model in eval mode stays there (no dropout at inference)
        setattr(parent, child, mod)
    return mod


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not a LoRA parameter (as PEFT does); adapters keep their flags."""
    for name, p in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            p.requires_grad_(False)


def add_adapter(
    model: nn.Module,
    name: str,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: str | tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    trainable: bool = True,
    use_rslora: bool = False,
) -> list[str]:
    """Add adapter ``name`` to the target linears (freezing the base model); returns the adapted module names."""
    if r <= 0 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"adapter {name!r}: need r > 0, alpha > 0 and 0 <= dropout < 1, got r={r}, alpha={alpha}, dropout={dropout}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"adapter name {name!r} must be an identifier (letters, digits, underscore)")
    names = _target_names(model, targets)
    for n in names:
        _wrap(model, n).add(name, AdapterSpec(r, float(alpha), dropout, use_rslora), trainable)
    freeze_base(model)
    graphs.invalidate(model)
    return names


def adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(a for _, layer in lora_layers(model) for a in layer.specs))


def _layers_with(model: nn.Module, name: str) -> list[tuple[str, LoRALinear]]:
    layers = [(n, m) for n, m in lora_layers(model) if name in m.specs]
    if not layers:
        raise KeyError(f"no adapter named {name!r}; the model has {adapter_names(model) or 'none'}")
    return layers


def set_trainable(model: nn.Module, name: str, flag: bool) -> None:
    """Make adapter ``name`` trainable or frozen."""
    for _, layer in _layers_with(model, name):
        layer.lora_A[name].requires_grad_(flag)
        layer.lora_B[name].requires_grad_(flag)
    graphs.invalidate(model)


def trainable_parameters(model: nn.Module) -> tuple[int, float]:
    """(number of trainable parameters, their percentage of all parameters), as the paper reports."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, 100.0 * train / max(total, 1)


@torch.no_grad()
def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (W += s B A); it then no longer runs separately."""
    for lname, layer in _layers_with(model, name):
        if layer.specs[name].merged:
            raise ValueError(f"adapter {name!r} is already merged in {lname}")
        layer.weight.add_(layer.delta_weight(name).to(layer.weight.dtype))
        layer.specs[name].merged = True
    graphs.invalidate(model)


@torch.no_grad()
def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Undo ``merge_adapter`` (W -= s B A); exact up to the rounding of the base weight's dtype."""
    for lname, layer in _layers_with(model, name):
        if not layer.specs[name].merged:
            raise ValueError(f"adapter {name!r} is not merged in {lname}")
        layer.weight.sub_(layer.delta_weight(name).to(layer.weight.dtype))
        layer.specs[name].merged = False
    graphs.invalidate(model)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, name: str, directory: str | Path, base_model_name: str | None = None) -> Path:
    """Write adapter ``name`` in PEFT's format (keys ``base_model.model.<module>.lora_A.weight``), atomically."""
    from safetensors.torch import save_file

    from minilora.loading import absolute_if_path

    layers = _layers_with(model, name)
    if any(layer.specs[name].merged for _, layer in layers):
        raise ValueError(f"adapter {name!r} is merged; unmerge it before saving")
    specs = [layer.specs[name] for _, layer in layers]
    first = specs[0]
    tensors = {}
    for lname, layer in layers:
        tensors[f"{PEFT_PREFIX}{lname}.lora_A.weight"] = layer.lora_A[name].detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{lname}.lora_B.weight"] = layer.lora_B[name].detach().float().contiguous().cpu()
    rank_pattern = {ln: s.r for (ln, _), s in zip(layers, specs) if s.r != first.r}
    alpha_pattern = {ln: s.alpha for (ln, _), s in zip(layers, specs) if s.alpha != first.alpha}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout, "use_rslora": first.use_rslora,
        "target_modules": sorted({ln.rsplit(".", 1)[-1] for ln, _ in layers}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": absolute_if_path(base_model_name),
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _module_from_key(key: str, path: Path) -> tuple[str, str]:
    """(module name, 'lora_A' or 'lora_B') from a PEFT key, with or without the adapter-name segment."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
    if not m:
        raise ValueError(f"{path}: unexpected tensor {key!r}; expected '<module>.lora_A.weight' / '.lora_B.weight'")
    return m.group(1), m.group(2)


def _pattern_value(pattern: dict, module: str, default, source: Path | str = "adapter_config.json"):
    """The value of the first key of a PEFT ``alpha_pattern``/``rank_pattern`` that matches ``module`` (its name
    in the base model), by PEFT's own rule (``peft.utils.other.get_pattern_key``): the key is a regular expression
    matching the whole name or a dotted suffix of it; ``default`` if none does."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise ValueError(f"{source}: pattern key {key!r} is not a regular expression ({e})") from None
    return default


def _read_adapter(model: nn.Module, directory: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], Path]:
    """(config, {module: {lora_A, lora_B}}, weights path) of a PEFT LoRA folder, checked against ``model``."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not w_path.is_file() and cfg_path.is_file() and (d / "adapter_model.bin").is_file():
        raise ValueError(f"{d / 'adapter_model.bin'}: PEFT's older pickle format is not read; save the adapter again "
                         "as safetensors (PeftModel.save_pretrained(dir, safe_serialization=True))")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (expected a PEFT adapter folder)")
    cfg = read_json_object(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; expected 'LORA'")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported; expected {ok!r}")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={cfg['bias']!r} is not supported; expected 'none'")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing required key {key!r}")
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise ValueError(f"{cfg_path}: {key} is {cfg[key]!r}, expected a number > 0")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{cfg_path}: {key} is {type(cfg[key]).__name__}, expected an object")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_safetensors(w_path).items():
        module, ab = _module_from_key(key, w_path)
        pairs.setdefault(module, {})[ab] = t
    modules = dict(model.named_modules())
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{w_path}: module {module!r} has only {list(ab)}; expected lora_A and lora_B")
        if module not in modules or not isinstance(modules[module], (nn.Linear, LoRALinear)):
            raise ValueError(f"{w_path}: adapter targets {module!r}, which is not a linear layer of this model")
        a, b = ab["lora_A"], ab["lora_B"]
        base = modules[module]
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{w_path}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"[{base.out_features} x {base.in_features}] layer"
            )
    return cfg, pairs, w_path


def load_adapter(model: nn.Module, directory: str | Path, name: str, trainable: bool = False) -> list[str]:
    """Load a PEFT LoRA adapter from ``directory`` into ``model`` as adapter ``name``; returns the module names."""
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists in the model; choose another name")
    cfg, pairs, _ = _read_adapter(model, directory)
    for module, ab in pairs.items():
        r = ab["lora_A"].shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"], Path(directory) / CONFIG_NAME)
        spec = AdapterSpec(r, float(alpha), float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora")))
        layer = _wrap(model, module)
        layer.add(name, spec, trainable)
        with torch.no_grad():
            layer.lora_A[name].copy_(ab["lora_A"])
            layer.lora_B[name].copy_(ab["lora_B"])
    freeze_base(model)
    graphs.invalidate(model)
    return sorted(pairs)


@torch.no_grad()
def restore_adapter(model: nn.Module, directory: str | Path, name: str) -> None:
    """Copy saved weights into the existing adapter ``name`` (same modules and ranks), e.g. a run's best epoch."""
    _, pairs, w_path = _read_adapter(model, directory)
    layers = dict(_layers_with(model, name))
    if set(layers) != set(pairs):
        raise ValueError(f"{w_path}: adapts other modules than adapter {name!r} of this model")
    for module, ab in pairs.items():
        if layers[module].lora_A[name].shape != ab["lora_A"].shape:
            raise ValueError(f"{w_path}: {module}: rank {ab['lora_A'].shape[0]} differs from adapter {name!r}'s")
        layers[module].lora_A[name].copy_(ab["lora_A"])
        layers[module].lora_B[name].copy_(ab["lora_B"])
