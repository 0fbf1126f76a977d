"""Training sequences from a ``TokenCache``: packed fixed-length blocks or the paper's truncated notes.

Items are dicts of int64 tensors ``input_ids`` and ``labels``. Labels equal the inputs (the loss shifts them by
one, Hugging Face style) with -100 where there is no target (padding, added by ``collate``). Indexing reads only
the tokens of one item from the memmap and is a pure function of the index, so a run resumes at an exact data
position from (epoch, permutation seed, index) with ``epoch_order``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from minilora.data.notes import TokenCache

IGNORE_INDEX = -100


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(n)`` used in ``epoch``: a pure function of (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _item(ids: np.ndarray) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (a separate copy) for a slice of tokens."""
    input_ids = torch.from_numpy(ids.astype(np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


class PackedDataset(Dataset):
    """One split's documents back to back, cut into ``max_seq_len``-token blocks (GPT-style packing).

    Document boundaries: attention crosses them inside a block, as in standard GPT pretraining; each document
    ends with EOS (``add_eos`` in the cache), which marks the boundary for the model. Train and validation are
    separate streams, so no validation token ever enters a training block. The last partial block is dropped
    for ``"train"`` and kept (shorter; ``collate`` pads it) for ``"val"`` so every validation token is scored.
    """

    def __init__(self, cache: TokenCache, split: str = "train", max_seq_len: int = 128):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.cache, self.split, self.max_seq_len = cache, split, max_seq_len
        self.docs = cache.doc_indices(split)
        self.starts = cache.offsets[self.docs]  # where each stream document begins in the memmap
        self.cum = np.zeros(len(self.docs) + 1, dtype=np.int64)  # stream position of each document
        np.cumsum(cache.offsets[self.docs + 1] - self.starts, out=self.cum[1:])
        total = int(self.cum[-1])
        self.length = total // max_seq_len if split == "train" else -(-total // max_seq_len)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"block {i} out of range [0, {self.length})")
        begin = i * self.max_seq_len
        end = min(begin + self.max_seq_len, int(self.cum[-1]))
        parts, pos = [], begin
        d = int(np.searchsorted(self.cum, begin, side="right")) - 1
        while pos < end:
            take = min(end, int(self.cum[d + 1])) - pos
            start = int(self.starts[d]) + pos - int(self.cum[d])
            parts.append(self.cache.tokens[start : start + take])
            pos += take
            d += 1
        return _item(np.concatenate(parts))


class TruncatedDataset(Dataset):
    """The paper's ``--no-packing`` mode: one item per note of the split, its first ``max_seq_len`` tokens
    (variable length; ``collate`` pads)."""

    def __init__(self, cache: TokenCache, split: str = "train", max_seq_len: int = 128):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.cache, self.split, self.max_seq_len = cache, split, max_seq_len
        self.docs = cache.doc_indices(split)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self.docs):
            raise IndexError(f"note {i} out of range [0, {len(self.docs)})")
        start = int(self.cache.offsets[self.docs[i]])
        end = min(int(self.cache.offsets[self.docs[i] + 1]), start + self.max_seq_len)
        return _item(self.cache.tokens[start:end])


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100; ``attention_mask`` 1 on tokens.

    A batch of rows of one length (packed blocks) gets no ``attention_mask``: the model then needs no check of it,
    which on a GPU would make the host wait, and a CUDA graph can take the batch (``minilora.graphs``)."""
    if not batch:
        raise ValueError("collate needs a non-empty batch")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.int64)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
    if all(len(item["input_ids"]) == width for item in batch):
        return {"input_ids": input_ids, "labels": labels}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
