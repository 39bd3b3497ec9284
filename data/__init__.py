"""Data: tokenizers, uint16 token shards, corpus preparation and a resumable loader.

See docs/DATA.md. The names below are the public interface; each lives in a submodule
(data.tokenizer, data.shards, data.meta, data.prepare, data.loader).
"""

import importlib

_PUBLIC = {
    "get_tokenizer": "data.tokenizer",
    "write_shard": "data.shards",
    "read_shard": "data.shards",
    "load_meta": "data.meta",
    "prepare": "data.prepare",
    "ensure_prepared": "data.prepare",
    "TokenDataset": "data.loader",
    "BatchSampler": "data.loader",
    "iter_eval_batches": "data.loader",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    # imported on first use: `python -m data.prepare` must not find data.prepare already
    # imported by the package, and `import data` should not pull in torch or tiktoken
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
