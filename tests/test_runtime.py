"""minilora.runtime: the recipes' allocator setting removes the page faults of re-allocated tensors, and
``--precision auto`` picks bf16 only where bf16 matmuls are native."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora import runtime
from minilora.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# 48 MiB is above glibc's largest dynamic mmap threshold (32 MiB): without tuning, every allocation is a fresh
# mmap whose pages fault in when written; with tuning, the freed block is reused from the heap.
_PROBE = """
import json, resource, torch
from minilora.runtime import tune_malloc
state = tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # the heap settles (up to ~5 fresh blocks while torch's first calls allocate too)
    torch.empty(12 * 2**20).fill_(1.0)
rounds = []
for _ in range(3):  # three measurements: the first sometimes still sees the heap settle (2 blocks' worth, tuned)
    before = faults()
    for _ in range(16):
        torch.empty(12 * 2**20).fill_(1.0)  # 48 MiB, written, freed
    rounds.append(faults() - before)
print(json.dumps({"state": state, "faults": min(rounds), "rounds": rounds}))
"""


def _probe(mode: str) -> dict:
    env = {**os.environ, "MINILORA_MALLOC": mode, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tuned_malloc_reuses_freed_blocks_without_page_faults():
    default, tuned = _probe("default"), _probe("tuned")
    if tuned["state"].startswith("unavailable"):
        pytest.skip(f"no glibc here: {tuned['state']}")
    assert default["state"] == "default" and tuned["state"] == "tuned"
    pages = 16 * 48 * 2**20 // 4096  # what 16 fresh 48 MiB mappings fault in at 4 KiB pages
    # the fewest faults of three rounds: untuned, even that round faults in most pages; tuned, it faults in few
    assert default["faults"] > 0.5 * pages, default  # the problem is real on this glibc...
    assert tuned["faults"] < 0.1 * pages, tuned  # ...and tuning removes it


def test_malloc_mode_is_validated(monkeypatch):
    monkeypatch.setenv("MINILORA_MALLOC", "fast")
    with pytest.raises(ValueError, match="MINILORA_MALLOC='fast'"):
        runtime.tune_malloc()
    monkeypatch.setenv("MINILORA_MALLOC", "default")
    assert runtime.tune_malloc() == "default" and runtime.malloc_state() == "default"


def test_run_cli_tunes_malloc_before_main(monkeypatch):
    monkeypatch.setenv("MINILORA_MALLOC", "tuned")
    seen = []
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: seen.append(runtime.malloc_state()))
    assert e.value.code == 0
    assert seen[0] == "tuned" or seen[0].startswith("unavailable")


def test_auto_precision_is_bf16_only_where_bf16_matmuls_are_native(monkeypatch):
    for avx512_bf16, amx, want in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runtime.resolve_precision("auto", "cpu") == want
    # CUDA: native bf16 only (a pre-Ampere GPU emulates it); a torch without the keyword answers natively
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert runtime.resolve_precision("bf16", "cpu") == "bf16" and runtime.resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp32"):
        runtime.resolve_precision("fp16", "cpu")
