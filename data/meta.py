"""
meta.json of a prepared folder (written by data/prepare.py, read by data/loader.py): reading
and checking it. Every problem is a one-line ValueError that names the file and the field,
e.g. "data/cache/x/meta.json: splits.train.shards[1] is 3, expected a file name".
"""

import json
import os

from cli import read_text
from data.shards import MAX_VOCAB, read_shard_header
from data.tokenizer import TOKENIZER_CLASSES

META_NAME = "meta.json"
META_FORMAT_VERSION = 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def read_meta_json(meta_path: str):
    """The parsed JSON of meta_path (any JSON value); ValueError naming the file if unreadable."""
    try:
        text = read_text(meta_path)              # not UTF-8: a ValueError naming the first bad byte
    except OSError as e:
        raise ValueError(f"{meta_path} cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def validate_meta(meta, meta_path: str) -> dict:
    """Check the fields the loader relies on; return meta. Extra fields are allowed."""
    hint = "prepare the data again"

    def bad(field, problem):
        raise ValueError(f"{meta_path}: {field} {problem}; {hint}")

    def need(container, key, field):
        if key not in container:
            raise ValueError(f"{meta_path} has no {field!r} field; {hint}")
        return container[key]

    def count(container, key, field, required=True):
        if not required and key not in container:
            return
        value = need(container, key, field)
        if not _is_int(value) or value < 0:
            bad(field, f"is {value!r}, expected a non-negative integer")

    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds {_type_name(meta)}, expected a JSON object; {hint}")
    if "format_version" in meta and meta["format_version"] != META_FORMAT_VERSION:
        bad("format_version", f"is {meta['format_version']!r}; this code reads version {META_FORMAT_VERSION}")
    tokenizer = need(meta, "tokenizer", "tokenizer")
    if not isinstance(tokenizer, str) or not tokenizer:
        bad("tokenizer", f"is {tokenizer!r}, expected a tokenizer name")
    vocab_size = need(meta, "vocab_size", "vocab_size")
    if not _is_int(vocab_size) or not 0 < vocab_size <= MAX_VOCAB:
        bad("vocab_size", f"is {vocab_size!r}, expected an integer in 1..{MAX_VOCAB} (uint16 shards)")
    eot_id = need(meta, "eot_id", "eot_id")
    if not _is_int(eot_id) or not 0 <= eot_id < vocab_size:
        bad("eot_id", f"is {eot_id!r}, expected an integer in [0, vocab_size={vocab_size})")
    # the ids of a tokenizer this code knows: data of another vocabulary under its name would
    # pass every other check and stop training at the embedding ("index out of range")
    known = TOKENIZER_CLASSES.get(tokenizer)
    if known and vocab_size != known.vocab_size:
        bad("vocab_size", f"is {vocab_size}, but tokenizer {tokenizer!r} has {known.vocab_size} ids")
    if known and eot_id != known.eot_id:
        bad("eot_id", f"is {eot_id}, but tokenizer {tokenizer!r} has end-of-text id {known.eot_id}")
    if "source" in meta and not isinstance(meta["source"], str):
        bad("source", f"is {_type_name(meta['source'])}, expected a string")
    splits = need(meta, "splits", "splits")
    if not isinstance(splits, dict):
        bad("splits", f"is {_type_name(splits)}, expected an object of splits (train, val)")
    if not splits:
        bad("splits", "is empty, expected an object of splits (train, val)")
    for split, info in splits.items():
        field = f"splits.{split}"
        if not isinstance(info, dict):
            bad(field, f"is {_type_name(info)}, expected an object with tokens, bytes and shards")
        count(info, "tokens", f"{field}.tokens")
        count(info, "bytes", f"{field}.bytes")
        count(info, "documents", f"{field}.documents", required=False)
        shards = need(info, "shards", f"{field}.shards")
        if not isinstance(shards, list):
            bad(f"{field}.shards", f"is {_type_name(shards)}, expected a list of shard file names")
        for i, name in enumerate(shards):
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                bad(f"{field}.shards[{i}]", f"is {name!r}, expected a file name inside the folder")
    return meta


def load_meta(data_dir: str) -> dict:
    """data_dir's meta.json, parsed and validated (validate_meta)."""
    meta_path = os.path.join(data_dir, META_NAME)
    return validate_meta(read_meta_json(meta_path), meta_path)


def check_shard(data_dir: str, meta: dict, split: str, index: int) -> int:
    """Check shard `index` of `split` against meta (exists, valid header, same vocab); return its token count."""
    meta_path = os.path.join(data_dir, META_NAME)
    name = meta["splits"][split]["shards"][index]
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise ValueError(f"{meta_path}: splits.{split}.shards[{index}] names {name}, which is not a file in "
                         f"{data_dir}; prepare the data again")
    header = read_shard_header(path)
    if header["vocab_size"] != meta["vocab_size"]:
        raise ValueError(f"{meta_path}: vocab_size is {meta['vocab_size']}, but shard {path} declares vocab "
                         f"{header['vocab_size']}; prepare the data again")
    return header["num_tokens"]


def check_split_tokens(data_dir: str, meta: dict, split: str, held: int):
    expected = meta["splits"][split]["tokens"]
    if held != expected:
        raise ValueError(f"{os.path.join(data_dir, META_NAME)}: splits.{split}.tokens is {expected}, but its "
                         f"shards hold {held} tokens; prepare the data again")


def check_shards(data_dir: str, meta: dict):
    """Every shard named in meta is a valid shard of meta's vocab, and the token counts agree."""
    for split, info in meta["splits"].items():
        held = sum(check_shard(data_dir, meta, split, i) for i in range(len(info["shards"])))
        check_split_tokens(data_dir, meta, split, held)
