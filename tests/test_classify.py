"""The classifier's pooling against transformers: last non-pad token as LlamaForSequenceClassification picks it,
and the masked mean of LlamaModel's final hidden states, with right padding."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, save_tiny_hf
from minilora import from_pretrained
from minilora.classify import Classifier


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    save_tiny_hf(d, seed=3)
    ours, _ = from_pretrained(d, dtype="fp32")
    cfg = transformers.LlamaConfig.from_pretrained(d)
    cfg.num_labels, cfg.pad_token_id = 3, 0
    theirs = transformers.LlamaForSequenceClassification.from_pretrained(d, config=cfg).eval()
    return ours, theirs


def batch(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows of lengths 9, 4 and 1 (token 0 is the pad and never appears in the text)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 101, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate((9, 4, 1)):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, pad), mask


def classifier(ours, theirs, pooling: str) -> Classifier:
    """Our classifier over ``ours`` with the transformers model's score weights as its head."""
    clf = Classifier(ours, 3, pooling=pooling).eval()
    with torch.no_grad():
        clf.head.weight.copy_(theirs.score.weight)
    return clf


@torch.no_grad()
def test_last_token_pooling_matches_llama_for_sequence_classification(models):
    ours, theirs = models
    clf, (ids, mask) = classifier(ours, theirs, "last"), batch()
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(clf(ids, mask), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_mean_pooling_is_the_masked_mean_of_the_final_hidden_states(models):
    ours, theirs = models
    clf, (ids, mask) = classifier(ours, theirs, "mean"), batch()
    h = theirs.model(input_ids=ids, attention_mask=mask).last_hidden_state
    means = torch.stack([h[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(clf(ids, mask), means @ theirs.score.weight.T, rtol=1e-4, atol=1e-5)
    for i in range(3):  # padding changes nothing: each row alone, unpadded, gives the same logits
        n = int(mask[i].sum())
        torch.testing.assert_close(clf(ids[i : i + 1, :n], mask[i : i + 1, :n]), clf(ids, mask)[i : i + 1],
                                   rtol=1e-4, atol=1e-5)


_LOAD_AND_CLASSIFY = """
import sys
import torch
from minilora import from_pretrained
from minilora.classify import Classifier
from minilora.lora import add_adapter
model, tok = from_pretrained(sys.argv[1], dtype=torch.bfloat16, device="cpu")
add_adapter(model, "domain", r=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "down_proj"), trainable=False)
add_adapter(model, "task", r=4, alpha=8)
clf = Classifier(model, 3).eval()
ids = torch.randint(0, model.config.vocab_size, (2, 40))
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    assert clf(ids, torch.ones_like(ids)).shape == (2, 3) and model(ids).shape[-1] == model.config.vocab_size
print(sorted({"triton", "torch._dynamo"} & set(sys.modules)))
"""


def test_loading_and_inference_on_the_cpu_import_neither_triton_nor_dynamo(tiny_lm):
    """Importing torch._dynamo (which imports triton) costs about 150 MB of resident memory and half a second: a
    sixth of SmolLM2's classification peak. Loading builds the model on the meta device, where ``normal_`` and
    ``cat`` would import it; kernels imports its Triton implementation only for CUDA tensors."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINILORA_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_CLASSIFY, str(tiny_lm)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
