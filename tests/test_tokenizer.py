"""Tokenizers: byte-level BPE against HF ``tokenizers``/``transformers`` oracles, the SentencePiece wrapper, loading."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from conftest import smollm2_gguf
from minilora.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    read_gguf_tokenizer_fields,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (only on developer and CI machines)")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Pt c/o SOB, BP 120/80, HR 88bpm, SpO2 94% on 2L NC. Hx of CHF, DM2; r/o MI.",
    "Admitted 2023-07-04, discharged 07/09/2023 at 14:30. Bill $12,345.67 (3.5% up), 1e-5 mol/L.",
    "café naïve µg ≥ 5 mg/dL ≤ 10, 中文医学, Ωmega, emoji 🩺💊👩🏽‍⚕️ and ＡＢＣ full width",
    "area 5 m², ½ tab q.i.d., x³ and ٣ Arabic-Indic digit",
    "runs   of    spaces\n\nnew\r\nlines\tand\t\ttabs   \n  \n",
    "  leading and trailing  ",
    "don't, I'LL we've it's 'quoted' DON'T",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "",
    " ",
    "\n",
]
CORPUS = [
    "The patient is a 67-year-old male with a history of hypertension and diabetes mellitus type 2.",
    "He complains of shortness of breath (SOB) and chest pain; BP 145/92, HR 101, SpO2 91% on room air.",
    "Assessment: rule out myocardial infarction. Plan: EKG, troponin q6h, aspirin 325 mg PO once.",
    "Le patient a une température de 38,5 °C; la pression artérielle est élevée.",
    "The wound was irrigated, débrided and closed with 3-0 nylon sutures.\n\tFollow up in 2 weeks.",
] * 20


def _notes(n: int) -> list[str]:
    """The first ``n`` non-empty MTSamples transcriptions."""
    with gzip.open(SHARED / "mtsamples" / "mtsamples.jsonl.gz", "rt", encoding="utf-8") as f:
        notes = (json.loads(line)["transcription"] for line in f)
        return [t for _, t in zip(range(n), (t for t in notes if t))]


@pytest.fixture(scope="module")
def smollm2_reader():
    """The SmolLM2 GGUF opened once for the module (parsing it takes about two seconds)."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2(smollm2_reader) -> tuple[BPETokenizer, object]:
    """Our tokenizer from the SmolLM2 GGUF and a transformers oracle loaded from the same file.

    transformers' GGUF conversion drops the Digits(individual_digits) step of the ``smollm`` pre-tokenizer
    (it differs from the real model on e.g. "m²"), so the oracle gets SmolLM2's own tokenizer.json pre-tokenizer.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    path = smollm2_gguf()
    oracle = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    oracle.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return BPETokenizer.from_gguf(smollm2_reader), oracle


def test_smollm2_matches_transformers(smollm2):
    ours, oracle = smollm2
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special=False) == text


def test_long_pretokens_match_transformers_and_the_plain_merge_loop(smollm2, monkeypatch):
    """Pre-tokens past LONG_PRETOKEN characters (a pasted base64 blob, a run of one letter) merge through a heap:
    the same ids as transformers and as the plain quadratic loop, without its seconds per 8,000 letters."""
    import random
    import string

    from minilora import tokenizer as tokenizer_module

    ours, oracle = smollm2
    rng = random.Random(0)
    blobs = ["".join(rng.choice(string.ascii_letters + "+/") for _ in range(n)) for n in (49, 300, 3000)]
    texts = [f"Attachment: {b}== end" for b in blobs] + ["a" * 2001, "ab" * 700 + "a", "x" + "-" * 500]
    for text in texts:
        assert ours.encode(text) == oracle.encode(text, add_special_tokens=False), text[:40]
    heap = [ours._bpe(b) for b in blobs]
    monkeypatch.setattr(tokenizer_module, "LONG_PRETOKEN", 10**9)
    assert [ours._bpe(b) for b in blobs] == heap


def test_smollm2_specials_and_metadata(smollm2):
    tok, _ = smollm2
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", bos=True, eos=True)
    assert ids[:2] == [1, 1] and ids[-2:] == [2, 2]
    assert tok.decode(ids) == "user\nHi"
    assert tok.id_to_token(1) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == 2
    assert tok.token_to_id("no such token") is None
    with pytest.raises(IndexError):
        tok.id_to_token(49152)


@needs_shared
def test_smollm2_mtsamples(smollm2):
    ours, oracle = smollm2
    notes = _notes(300)
    batch = ours.encode_batch(notes, workers=2)
    assert batch == [e.ids for e in oracle.backend_tokenizer.encode_batch(notes, add_special_tokens=False)]
    assert batch == [ours.encode(t) for t in notes]
    assert [ours.decode(ids) for ids in batch] == notes


def test_read_gguf_tokenizer_fields(smollm2_reader):
    fields = read_gguf_tokenizer_fields(smollm2_reader)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert len(fields["tokenizer.ggml.merges"]) == 48900 and fields["tokenizer.ggml.merges"][0] == "Ġ t"
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == 49152
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2


def _train(pre: str, nfc: bool = False, ignore_merges: bool = False):
    """A small ByteLevel BPE trained with HF ``tokenizers`` on clinical text, in one of three pre-tokenizer styles."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    from minilora.tokenizer import LLAMA3_PATTERN

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = {
        "gpt2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama3": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    }[pre]
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["c/o"])  # a non-special added token: matched literally, kept by decode
    return tok


@pytest.mark.parametrize(
    "pre, nfc, ignore_merges", [("gpt2", False, False), ("smollm", True, False), ("llama3", False, True)]
)
def test_tokenizer_json_matches_tokenizers(tmp_path, pre, nfc, ignore_merges):
    oracle = _train(pre, nfc, ignore_merges)
    oracle.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": None})
    )
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, BPETokenizer)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (oracle.get_vocab_size(), 1, 2, 2)
    for text in [*TEXTS, *CORPUS[:5]]:
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special=False) == (text if not nfc else oracle.decode(ids, False))
        assert ours.decode(ids) == oracle.decode(ids)
    assert ours.encode("<|im_start|>x", bos=True, eos=True)[:2] == [1, 1]
    assert ours.encode_batch(TEXTS, eos=True, workers=2) == [ours.encode(t, eos=True) for t in TEXTS]


def _write_gguf(path: Path, oracle, pre: str) -> None:
    """A tokenizer-only GGUF holding the vocabulary and merges of a trained ``tokenizers`` BPE."""
    gguf = pytest.importorskip("gguf")
    model = json.loads(oracle.to_str())["model"]
    vocab = oracle.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_token_types([3 if t in SPECIALS else 4 if t == "c/o" else 1 for t in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre, gguf_pre", [("gpt2", "gpt2"), ("smollm", "smollm"), ("llama3", "llama-bpe")])
def test_gguf_matches_tokenizers(tmp_path, pre, gguf_pre):
    oracle = _train(pre, ignore_merges=gguf_pre == "llama-bpe")
    _write_gguf(tmp_path / "tok.gguf", oracle, gguf_pre)
    ours = load_tokenizer(tmp_path / "tok.gguf")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    for text in [*TEXTS, *CORPUS[:5]]:
        assert ours.encode(text) == oracle.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text), skip_special=False) == text


@needs_shared
@pytest.mark.parametrize("name, vocab", [("llama2-tokenizer/tokenizer.model", 32000), ("tinyllamas/tok512.model", 512)])
def test_sentencepiece(name, vocab):
    tok = load_tokenizer(SHARED / name)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (vocab, 1, 2, 2)
    texts = ["Once upon a time, there was a little girl.", "Pt c/o SOB, BP 120/80 at 2023-07-04.", "a b\n\nc"]
    if vocab == 32000:  # tok512 collapses runs of spaces (remove_extra_whitespaces)
        texts += ["café µg ≥ 5, 中文 🩺", "  leading and  trailing  "]
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and tok.encode(text) == ids[1:-1]
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=False) == f"<s> {text}</s>"  # the dummy-prefix space shows after <s>
    assert tok.encode_batch(texts, bos=True, workers=2) == [tok.encode(t, bos=True) for t in texts]
    assert tok.id_to_token(1) == "<s>" and tok.token_to_id("<s>") == 1 and tok.token_to_id("no such piece") is None


@needs_shared
def test_load_tokenizer_dispatch(tmp_path):
    shutil.copy(SHARED / "llama2-tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)  # unusable tokenizer.json, .model beside it
    _train("gpt2").save(str(tmp_path / "tokenizer.json"))
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), BPETokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.model"), SentencePieceTokenizer)


def test_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*tokenizer.json or tokenizer.model"):
        load_tokenizer(empty)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt.*expected"):
        load_tokenizer(tmp_path / "vocab.txt")

    oracle = _train("gpt2")
    _write_gguf(tmp_path / "odd.gguf", oracle, "no-such-pre")
    with pytest.raises(ValueError, match=r"odd\.gguf.*'no-such-pre'"):
        load_tokenizer(tmp_path / "odd.gguf")
    spec = json.loads(oracle.to_str())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "meta.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"meta\.json.*ByteLevel"):
        load_tokenizer(tmp_path / "meta.json")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match=r"bad\.gguf"):
        load_tokenizer(tmp_path / "bad.gguf")

    no_bos = BPETokenizer(["a", "b", "ab"], [("a", "b")], ["[ab]+"], {})
    assert no_bos.encode("abba") == [2, 1, 0] and no_bos.pad_id is None
    with pytest.raises(ValueError, match="no BOS"):
        no_bos.encode("ab", bos=True)
