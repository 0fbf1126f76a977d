"""Run-time tokenizers: a SentencePiece wrapper and an exact byte-level BPE for ``tokenizer.json`` and GGUF files.

``load_tokenizer`` picks the implementation from a path. Hugging Face ``tokenizers``/``transformers`` are only
test oracles; nothing here imports them.
"""

from __future__ import annotations

import heapq
import json
import math
import multiprocessing
import sys
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex
import sentencepiece

if TYPE_CHECKING:
    import gguf

# GPT-2 / HF ByteLevel pre-tokenizer regex (the trailing ``\s+`` catches whitespace before a non-space).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# llama.cpp ``tokenizer.ggml.pre`` -> (regexes applied in sequence, ignore_merges).
GGUF_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((GPT2_PATTERN,), False),
    "gpt2": ((GPT2_PATTERN,), False),
    "smollm": ((r"\p{N}", GPT2_PATTERN), False),
    "llama-bpe": ((LLAMA3_PATTERN,), True),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types matched literally in the text
WORD_CACHE_SIZE = 200_000


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = [""] * 256, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}


class Tokenizer(ABC):
    """Common interface: ids for text and back, special-token ids, vocabulary look-ups."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool = False  # whether the model expects documents to start with BOS (LLaMA-1/2: yes; GPT-2 BPE: no)

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Ids for ``text`` without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text for ``ids``; special tokens are dropped when ``skip_special``."""

    @abstractmethod
    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (IndexError when out of range)."""

    @abstractmethod
    def token_to_id(self, s: str) -> int | None:
        """The id of vocabulary entry ``s``, or None."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids for ``text``, optionally framed by BOS and EOS."""
        return self._frame(self._encode_plain(text), bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, workers: int = 1
    ) -> list[list[int]]:
        """``encode`` over many texts; ``workers > 1`` spreads ordered chunks over a process pool."""
        self._frame([], bos, eos)  # fail early on a missing BOS/EOS
        if workers <= 1 or len(texts) < 2:
            return [self.encode(t, bos, eos) for t in texts]
        size = math.ceil(len(texts) / (workers * 4))
        chunks = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
        # fork starts fast and needs no ``__main__`` guard; workers only run Python code, so it is safe on Linux
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker, initargs=(self, bos, eos)) as pool:
            parts = pool.map(_encode_chunk, chunks)
        return [ids for part in parts for ids in part]

    def _frame(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """Prepend BOS / append EOS as asked; ValueError when the tokenizer has no such token."""
        for wanted, tid, name in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if wanted and tid is None:
                raise ValueError(f"{type(self).__name__} has no {name} token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


_worker: tuple[Tokenizer, bool, bool] | None = None


def _init_worker(tok: Tokenizer, bos: bool, eos: bool) -> None:
    """Pool initializer: keep the tokenizer (and its word cache) for the worker's lifetime."""
    global _worker
    _worker = (tok, bos, eos)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    """Pool task: encode one chunk with the worker's tokenizer."""
    assert _worker is not None
    tok, bos, eos = _worker
    return [tok.encode(t, bos, eos) for t in texts]


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model`` (LLaMA-1/2, llama2.c) through the ``sentencepiece`` package."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model") from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = _id_or_none(self.sp.bos_id()), _id_or_none(self.sp.eos_id())
        self.add_bos = self.bos_id is not None
        pad = _id_or_none(self.sp.pad_id())
        self.pad_id = pad if pad is not None else self.eos_id

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, workers: int = 1
    ) -> list[list[int]]:
        """``encode`` over many texts with sentencepiece's own (deterministic) threads."""
        self._frame([], bos, eos)
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=max(workers, 1))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """sentencepiece decoding; with ``skip_special=False`` control pieces (``<s>``) appear as text."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.decode(ids)
        out, run = [], []
        for i in [*ids, None]:
            if i is not None and not self.sp.is_control(i):
                run.append(i)
                continue
            if run:
                text = self.sp.decode(run)
                if out and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text  # sentencepiece drops one leading space, right only at the output's start
                out.append(text)
                run = []
            if i is not None:
                out.append(self.sp.id_to_piece(i))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return self.sp.id_to_piece(i)

    def token_to_id(self, s: str) -> int | None:
        i = self.sp.piece_to_id(s)
        return i if self.sp.id_to_piece(i) == s else None


def _id_or_none(i: int) -> int | None:
    """sentencepiece reports a missing special token as -1."""
    return i if i >= 0 else None


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2, SmolLM, LLaMA-3 style) with literal special tokens and a per-word cache."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[tuple[str, str]],
        patterns: Sequence[str],
        special: dict[str, bool],
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        ignore_merges: bool = False,
        nfc: bool = False,
        add_bos: bool = False,
    ):
        """``tokens[i]`` is the byte-level string of id i; ``patterns`` split text in sequence (matches and gaps
        both kept); ``special`` maps literal tokens to whether decode may skip them."""
        self.tokens = list(tokens)
        self.vocab: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self.vocab.setdefault(t, i)
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.patterns = [regex.compile(p) for p in patterns]
        self.literals = {t: self.vocab[t] for t in special}
        self.skippable = {self.vocab[t] for t, skip in special.items() if skip}
        alternatives = "|".join(regex.escape(t) for t in sorted(special, key=len, reverse=True))
        self.literal_re = regex.compile(f"({alternatives})") if special else None
        self.vocab_size = len(self.tokens)
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.ignore_merges, self.nfc = ignore_merges, nfc
        self.add_bos = add_bos and bos_id is not None
        self.token_bytes = [_token_bytes(t) for t in self.tokens]
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> BPETokenizer:
        """A Hugging Face ``tokenizer.json`` (model BPE, ByteLevel); BOS/EOS/PAD come from a ``tokenizer_config.json``
        beside it when there is one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON file") from e
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type is {model.get('type')!r}, expected 'BPE' (byte-level)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
            if model.get(key):
                raise ValueError(f"{path}: BPE option {key}={model[key]!r} is not supported")
        patterns = _json_pre_tokenizer(spec.get("pre_tokenizer"), path)
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise ValueError(f"{path}: normalizer {normalizer!r} is not supported (expected none or NFC)")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{path}: decoder must be ByteLevel for a byte-level BPE")

        vocab: dict[str, int] = dict(model["vocab"])
        special: dict[str, bool] = {}
        for added in spec.get("added_tokens") or []:
            if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
                raise ValueError(f"{path}: added token {added['content']!r} uses lstrip/rstrip/single_word")
            vocab[added["content"]] = added["id"]
            special[added["content"]] = bool(added.get("special"))
        tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        if len(set(vocab.values())) != len(tokens):
            raise ValueError(f"{path}: token ids are not contiguous from 0 to {len(tokens) - 1}")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]

        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        named = {k: _config_token(config.get(f"{k}_token"), vocab) for k in ("bos", "eos", "pad")}
        return cls(
            tokens,
            merges,
            patterns,
            special,
            bos_id=named["bos"],
            eos_id=named["eos"],
            pad_id=named["pad"],
            unk_id=vocab.get(model["unk_token"]) if model.get("unk_token") else None,
            ignore_merges=bool(model.get("ignore_merges")),
            nfc=normalizer == "NFC",
            add_bos=bool(config.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | gguf.GGUFReader) -> BPETokenizer:
        """The ``tokenizer.ggml.*`` metadata of a GGUF file (a path or an open ``gguf.GGUFReader``)."""
        if isinstance(path_or_reader, (str, Path)):
            source = str(path_or_reader)
            if not Path(source).is_file():
                raise FileNotFoundError(f"GGUF file not found: {source}")
            from minilora.formats import import_gguf

            try:
                reader = import_gguf(f"reading {source}").GGUFReader(source)
            except ValueError as e:
                raise ValueError(f"{source}: not a readable GGUF file") from e
        else:
            reader = path_or_reader
            source = str(getattr(reader.data, "filename", None) or "GGUF reader")
        return cls.from_gguf_fields(read_gguf_tokenizer_fields(reader), source)

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any], source: str) -> BPETokenizer:
        """From already-read ``tokenizer.*`` GGUF metadata (so a model loader need not parse the file twice)."""
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}, expected 'gpt2' (byte-level BPE)")
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"{source}: unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
            )
        patterns, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        special = {t: k == GGUF_CONTROL for t, k in zip(tokens, types) if k in (GGUF_CONTROL, GGUF_USER_DEFINED)}
        return cls(
            tokens,
            [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])],
            patterns,
            special,
            bos_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_id=fields.get("tokenizer.ggml.eos_token_id"),
            pad_id=fields.get("tokenizer.ggml.padding_token_id"),
            unk_id=fields.get("tokenizer.ggml.unknown_token_id"),
            ignore_merges=ignore_merges,
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    def _encode_plain(self, text: str) -> list[int]:
        if self.literal_re is None:
            return self._encode_ordinary(text, [])
        out: list[int] = []
        for k, part in enumerate(self.literal_re.split(text)):
            if k % 2:
                out.append(self.literals[part])
            elif part:
                self._encode_ordinary(part, out)
        return out

    def _encode_ordinary(self, text: str, out: list[int]) -> list[int]:
        """Append the ids of text free of literal tokens to ``out``."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        cache = self.cache
        for word in self._pre_tokenize(text):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= WORD_CACHE_SIZE:
                    cache.clear()
                ids = cache[word] = self._bpe(word.encode("utf-8").decode("latin-1").translate(BYTE_TO_UNICODE))
            out.extend(ids)
        return out

    def _pre_tokenize(self, text: str) -> list[str]:
        """Split with each pattern in turn, keeping both matches and the text between them."""
        pieces = [text]
        for pattern in self.patterns:
            split: list[str] = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    start, end = m.span()
                    if start > pos:
                        split.append(piece[pos:start])
                    if end > start:
                        split.append(m.group())
                    pos = end
                if pos < len(piece):
                    split.append(piece[pos:])
            pieces = split
        return pieces

    def _bpe(self, word: str) -> list[int]:
        """Merge the byte-level characters of one pre-token by rank, lowest first, and map them to ids."""
        vocab = self.vocab
        if self.ignore_merges and word in vocab:
            return [vocab[word]]
        parts = list(word)
        ranks = self.ranks
        if len(parts) > LONG_PRETOKEN:
            parts = _merge_by_heap(parts, ranks)
        else:
            while len(parts) > 1:
                best, best_rank = None, math.inf
                for pair in zip(parts, parts[1:]):
                    rank = ranks.get(pair, math.inf)
                    if rank < best_rank:
                        best, best_rank = pair, rank
                if best is None:
                    break
                first, second = best
                merged, i = [], 0
                while i < len(parts):
                    if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
        ids = [vocab.get(p, self.unk_id) for p in parts]
        return [i for i in ids if i is not None]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Bytes of each token joined and read as UTF-8 (invalid sequences become U+FFFD)."""
        skip = self.skippable if skip_special else ()
        data = b"".join(self.token_bytes[i] for i in map(int, ids) if i not in skip)
        return data.decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return self.tokens[i]

    def token_to_id(self, s: str) -> int | None:
        return self.vocab.get(s)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the word cache (sent to pool workers)."""
        return {**self.__dict__, "cache": {}}


def _token_bytes(token: str) -> bytes:
    """Bytes of a token as HF's ByteLevel decoder sees them: mapped back when every character is a byte
    character, else the token's own UTF-8 (added tokens such as ``<|im_start|>``)."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _json_pre_tokenizer(spec: dict | None, path: Path) -> list[str]:
    """Regexes for a tokenizer.json pre-tokenizer (ByteLevel, Digits, Split Isolated, Sequence of them)."""
    if spec is None:
        raise ValueError(f"{path}: no pre_tokenizer; expected ByteLevel (byte-level BPE)")
    steps = spec["pretokenizers"] if spec["type"] == "Sequence" else [spec]
    if not any(s["type"] == "ByteLevel" for s in steps):
        raise ValueError(f"{path}: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported")
    patterns = []
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported")
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]
            patterns.append(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        else:
            what = " ".join(filter(None, (kind, step.get("behavior"))))
            raise ValueError(f"{path}: pre_tokenizer step {what} is not supported")
    return patterns


def _config_token(value: str | dict | None, vocab: dict[str, int]) -> int | None:
    """Id of a ``tokenizer_config.json`` special token given as a string or an AddedToken dict."""
    content = value.get("content") if isinstance(value, dict) else value
    return vocab.get(content) if content else None


def _gguf_value(field: gguf.ReaderField) -> Any:
    """Python value of a GGUF ``ReaderField``: str, int, float, bool, or a list of them."""
    from gguf import GGUFValueType  # the caller holds a reader, so the package is there

    string, array = GGUFValueType.STRING, GGUFValueType.ARRAY
    parts = [field.parts[i] for i in field.data]
    if field.types[0] == array and field.types[-1] == string:
        return [bytes(p).decode("utf-8") for p in parts]
    if field.types[0] == array:
        return [v for p in parts for v in p.tolist()]
    if field.types[0] == string:
        return bytes(parts[0]).decode("utf-8")
    return parts[0].tolist()[0]


def read_gguf_tokenizer_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All ``tokenizer.*`` metadata of an open ``gguf.GGUFReader`` as Python values, keyed by GGUF name."""
    return {name: _gguf_value(f) for name, f in reader.fields.items() if name.startswith("tokenizer.")}


LONG_PRETOKEN = 48  # characters: past this, one pre-token's merges go through a heap (the scan below is quadratic)


def _merge_by_heap(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """The byte-level BPE merges of one pre-token in O(n log n): the same result as merging the lowest-ranked
    pair everywhere, left to right, until none is left (a pair's parts come from lower-ranked merges, so pairs
    made by a merge always rank after it). A linked list of symbols and a heap of (rank, position); an entry whose
    pair has changed since it was pushed is skipped."""
    n = len(parts)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := ranks.get((parts[i], parts[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        if parts[i] is None or j >= n or ranks.get((parts[i], parts[j])) != r:
            continue  # stale: i was merged into its left neighbour, or its pair changed
        parts[i], parts[j] = parts[i] + parts[j], None
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
            if (r2 := ranks.get((parts[i], parts[nxt[i]]))) is not None:
                heapq.heappush(heap, (r2, i))
        if prv[i] >= 0 and (r2 := ranks.get((parts[prv[i]], parts[i]))) is not None:
            heapq.heappush(heap, (r2, prv[i]))
    return [p for p in parts if p is not None]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a directory (``tokenizer.json`` preferred, else ``tokenizer.model``), a ``.json``,
    a SentencePiece ``.model`` or a ``.gguf`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    if path.is_dir():
        json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
        if json_file.is_file():
            try:
                return BPETokenizer.from_tokenizer_json(json_file)
            except ValueError:
                if not model_file.is_file():  # e.g. LLaMA-2 folders ship an SPM-style tokenizer.json too
                    raise
        if model_file.is_file():
            return SentencePieceTokenizer(model_file)
        raise ValueError(f"{path}: directory has no tokenizer.json or tokenizer.model")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return BPETokenizer.from_gguf(path)
    if suffix == ".json":
        return BPETokenizer.from_tokenizer_json(path)
    if suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"{path}: unsupported tokenizer file; expected a directory, tokenizer.json, .model or .gguf")
