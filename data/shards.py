"""
Token shards: a 1 KiB header of 256 little-endian int32, then the tokens as uint16.

    header[0] = SHARD_MAGIC, header[1] = SHARD_VERSION, header[2] = token count,
    header[3] = vocab size, header[4:] = 0

uint16 halves disk and page-cache use against int32 and fits every vocabulary up to
65536 ids (GPT-2: 50257, bytes: 257). Readers get a read-only np.memmap, so a 100M-token
shard costs nothing until it is sampled.
"""

import os

import numpy as np

from cli import write_atomic

SHARD_MAGIC = 20251231
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 1 << 16  # uint16 holds ids 0..65535
MAX_SHARD_TOKENS = (1 << 31) - 1  # the header's int32 token count


def write_shard(path: str, tokens, vocab_size: int) -> None:
    """Write tokens (ints in [0, vocab_size)) to path atomically: tmp file, fsync, rename."""
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab of {vocab_size} does not fit uint16 shards (at most {MAX_VOCAB})")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size > MAX_SHARD_TOKENS:   # before the range scan: numpy's OverflowError came after it
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens (its header's int32 count), "
                         f"got {tokens.size}: use a smaller --shard-tokens")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{low}, {high}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2], header[3] = SHARD_MAGIC, SHARD_VERSION, tokens.size, vocab_size
    def write(tmp_path):
        with open(tmp_path, "wb") as f:
            f.write(header.tobytes())
            # the array's own buffer: .tobytes() would copy a 100M-token shard (200 MB) first
            f.write(memoryview(np.ascontiguousarray(tokens, dtype="<u2")))
    write_atomic(path, write)


def read_shard_header(path: str) -> dict:
    """Validate a shard's header and size; return {'num_tokens', 'vocab_size'}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist")
    file_size = os.path.getsize(path)
    if file_size < HEADER_BYTES:
        raise ValueError(f"shard {path} is {file_size} bytes, smaller than its {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not a token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path} has format version {header[1]}, this code reads version {SHARD_VERSION}")
    num_tokens, vocab_size = int(header[2]), int(header[3])
    if num_tokens < 0:
        raise ValueError(f"shard {path} has a negative token count {num_tokens}")
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"shard {path} declares vocab {vocab_size}, outside 1..{MAX_VOCAB} for uint16 shards")
    held = (file_size - HEADER_BYTES) // 2
    if held < num_tokens:
        raise ValueError(f"shard {path} is truncated: header says {num_tokens} tokens, file holds {held}")
    if file_size != HEADER_BYTES + 2 * num_tokens:
        raise ValueError(
            f"shard {path} has {file_size - HEADER_BYTES - 2 * num_tokens} trailing bytes after its "
            f"{num_tokens} tokens"
        )
    return {"num_tokens": num_tokens, "vocab_size": vocab_size}


def read_shard(path: str) -> np.ndarray:
    """The shard's tokens as a read-only uint16 np.memmap (validated first)."""
    info = read_shard_header(path)
    if info["num_tokens"] == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap cannot map zero bytes
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(info["num_tokens"],))
