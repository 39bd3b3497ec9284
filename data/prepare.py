"""
Corpus preparation: documents -> tokens (+ eot after each document) -> uint16 shards.

    python -m data.prepare --source builtin --tokenizer gpt2 --out data/cache/builtin-gpt2
    python -m data.prepare --source files:'corpus/*.txt' --tokenizer bytes --out data/cache/mine
    python -m data.prepare --source hf:json --data-files 'dump/*.jsonl' --out data/cache/dump
    python -m data.prepare --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --streaming \
        --out data/cache/fineweb-edu-10BT

Output folder: train_000000.bin, ..., val_000000.bin, ... (format in data/shards.py) and
meta.json (tokenizer, source, and per split: tokens, documents, UTF-8 bytes of the text
for bits-per-byte, shard names). The folder is built under <out>.tmp-<pid> and renamed
into place at the end, so an interrupted run never leaves a folder that looks prepared.
An existing <out> is replaced only when it is a cache of the same source (see
_check_out_dir); any other non-empty folder is refused before anything is written.
"""

import contextlib
import functools
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
from collections import deque

import numpy as np

from cli import (OneLineArgumentParser, check_output_dir, hub_unreachable, int_at_least, non_negative_int, one_line,
                 open_fraction, output_dir_problem, read_text, seed_int)
from data.builtin import iter_builtin_documents
from data.meta import META_FORMAT_VERSION, META_NAME, check_shards, load_meta, read_meta_json
from data.shards import MAX_VOCAB, SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES, MAX_SHARD_TOKENS, write_shard
from data.tokenizer import TOKENIZER_NAMES, get_tokenizer

DOCS_PER_TASK = 64  # documents a pool worker encodes per task (amortises pickling)
DEFAULT_VAL_FRACTION = 0.01  # = config.py's data.val_fraction (the trainer's recipe); KJV: ~30K bytes of validation


# ----------------------------------------------------------------------------------------
# sources


def _expand_glob(pattern: str, what: str) -> list[str]:
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    paths = sorted(p for p in matches if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"{what} {pattern!r} matches " + ("only folders" if matches else "no files"))
    return paths


def _check_local_file_types(paths: list[str]):
    """Before any file is read: an unsupported file late in the glob would otherwise stop the
    run only after every file before it was tokenized."""
    unsupported = [p for p in paths if not p.endswith((".txt", ".jsonl"))]
    if unsupported:
        raise ValueError(f"unsupported file {unsupported[0]}"
                         + (f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else "")
                         + ": files: sources take .txt (one document) or .jsonl (one per line)")


def _iter_local_files(paths: list[str], text_field: str):
    for path in paths:
        if path.endswith(".txt"):
            yield read_text(path, hint="convert it to UTF-8 or leave it out of the glob")
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:  # bytes, so an undecodable line can be named
                for line_number, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}:{line_number} is not UTF-8 (byte 0x{raw[e.start]:02x}); "
                                         "convert the file to UTF-8 or leave it out of the glob") from None
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_number} is not valid JSON: {e.msg}") from None
                    yield _text_of_row(row, text_field, f"{path}:{line_number}")


def _text_of_row(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        columns = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where} has no field {text_field!r} (has: {columns}); set --text-field")
    text = row[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where} field {text_field!r} is {type(text).__name__}, expected a string")
    try:  # a JSON escape like "\ud800" decodes to a lone surrogate, which no tokenizer can encode
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} field {text_field!r} is not valid Unicode (lone surrogate "
                         f"U+{ord(text[e.start]):04X} at character {e.start}); fix the row or leave it out") from None
    return text


def _iter_hf_rows(dataset, text_field: str, what: str):
    """The rows' texts; a streamed dataset reads its files only here, so a bad file fails here."""
    rows = iter(dataset)
    with _HeldErrorLogs() as held:
        for index in itertools.count():
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:
                raise _hf_error(what, e, held) from None
            yield _text_of_row(row, text_field, f"{what} row {index}")


class _HeldErrorLogs(logging.Filter):
    """Within `with`: the ERROR records of the datasets library are kept in .messages instead
    of printed, so that a failed load is one line (open_source puts them in its message); a
    load that succeeds prints them as before."""

    def __init__(self):
        super().__init__()
        self.messages = []
        self.handlers = logging.getLogger("datasets").handlers  # its child loggers propagate there

    def filter(self, record):
        if record.levelno < logging.ERROR:
            return True
        self.messages.append(record.getMessage())
        return False

    def __enter__(self):
        for handler in self.handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, exc_type, *_):
        for handler in self.handlers:
            handler.removeFilter(self)
        if exc_type is None:
            for message in self.messages:
                print(message, file=sys.stderr)


def _hf_error(what: str, error: Exception, held: _HeldErrorLogs) -> ValueError:
    """One line for a failed HF load: the hub raises many types. A failing builder logs what is
    wrong ("Failed to load JSON from file 'x' ... in row 2") and raises an error that says only
    that an error occurred: its logged message is the reason then."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    if held.messages:
        reason = one_line(held.messages[-1])
    elif isinstance(error, StopIteration):  # the json builder reads a first row to infer the columns
        reason = "found no rows (StopIteration: are the data files empty?)"
    else:
        reason = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return ValueError(f"could not load {what}: {reason}")


def open_source(source: str, data_files=None, text_field="text", split="train", streaming=False, quiet=False):
    """Return (iterator of document strings, number of documents or None when unknown)."""
    if source == "builtin":
        return iter_builtin_documents(), None
    if source.startswith("files:"):
        paths = _expand_glob(source[len("files:"):], "files: glob")
        _check_local_file_types(paths)
        return _iter_local_files(paths, text_field), None
    if source.startswith("hf:"):
        name, _, config = source[len("hf:"):].partition(":")
        if not name:
            raise ValueError(f"source {source!r} names no dataset; use hf:<dataset>[:<config>]")
        if name in ("json", "text", "csv", "parquet") and not data_files:
            raise ValueError(f"source hf:{name} reads local files: pass --data-files GLOB")
        files = _expand_glob(data_files, "--data-files glob") if data_files else None
        what = f"HF dataset {name!r} (config {config or None!r}, split {split!r})"
        # local files need no network, nor does a local folder of data files (load_dataset
        # reads a folder before it asks the Hub): offline, the check would refuse it
        local = files or os.path.isdir(name)
        unreachable = None if local else hub_unreachable(streaming)
        if unreachable:
            raise ValueError(f"could not load {what}: {unreachable}")
        import datasets  # lazy: heavy, and absent on the GPU machines

        if quiet:
            datasets.disable_progress_bars()

        held = _HeldErrorLogs()
        try:
            with held:
                dataset = datasets.load_dataset(name, config or None, split=split, data_files=files,
                                                streaming=streaming)
        except Exception as e:
            raise _hf_error(what, e, held) from None
        total = None if streaming else len(dataset)
        return _iter_hf_rows(dataset, text_field, what), total
    # train.py's data.dataset may also name a prepared folder: a mistyped one lands here
    where = (f": {source} is a folder without meta.json, not one data.prepare made" if os.path.isdir(source) else
             f": there is no folder {source}" if os.sep in source or source.startswith(".") else "")
    raise ValueError(f"unknown source {source!r}{where}; valid: builtin, files:<glob>, hf:<dataset>[:<config>], "
                     "or (data.dataset) a folder data.prepare made")


# ----------------------------------------------------------------------------------------
# tokenization (in a process pool)

_worker_tokenizer = None


def _init_worker(tokenizer_name: str, bpe_dir):
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(tokenizer_name, bpe_dir)


def _init_pool_worker(tokenizer_name: str, bpe_dir):
    # Ctrl-C signals the whole process group: the parent stops the pool and prints one line;
    # a worker's own KeyboardInterrupt would print its traceback as well. SIGTERM takes its
    # default again: a forked worker inherits train.py's handler (train.raise_terminated), and
    # the pool stops its workers with SIGTERM when it closes, which printed their tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tokenizer_name, bpe_dir)


def _encode_documents(texts: list[str]) -> list[tuple[np.ndarray, int]]:
    """Each document -> (uint16 tokens followed by eot, UTF-8 byte count of its text)."""
    tok = _worker_tokenizer
    out = []
    for text in texts:
        ids = tok.encode_array(text)        # an array: a list of ids cost 8-36 bytes each
        tokens = np.empty(len(ids) + 1, dtype=np.uint16)
        tokens[:-1] = ids
        tokens[-1] = tok.eot_id
        out.append((tokens, len(text.encode("utf-8"))))
    return out


def _encoded_stream(documents, tokenizer_name: str, bpe_dir, num_workers: int):
    """Yield (tokens, n_bytes) per document, in order. With workers, at most 2*workers
    tasks are in flight: Pool.imap would read a streaming source to its end into memory."""
    chunks = iter(lambda: list(itertools.islice(documents, DOCS_PER_TASK)), [])
    if num_workers <= 1:
        _init_worker(tokenizer_name, bpe_dir)
        for chunk in chunks:
            yield from _encode_documents(chunk)
        return
    with multiprocessing.get_context().Pool(num_workers, _init_pool_worker, (tokenizer_name, bpe_dir)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_documents, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ----------------------------------------------------------------------------------------
# writing


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    """Per-document split: a hash of (seed, document index) mapped to [0, 1). Independent
    of worker count, shard size and streaming, so the split is reproducible."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


class _SplitWriter:
    """Appends documents to a split and cuts it into shards of shard_tokens tokens."""

    def __init__(self, out_dir: str, split: str, shard_tokens: int, vocab_size: int):
        self.out_dir, self.split, self.shard_tokens, self.vocab_size = out_dir, split, shard_tokens, vocab_size
        self.pending, self.pending_tokens = [], 0
        self.tokens = self.documents = self.bytes = 0
        self.shards = []

    def add(self, tokens: np.ndarray, n_bytes: int):
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.tokens += len(tokens)
        self.documents += 1
        self.bytes += n_bytes
        if self.pending_tokens >= self.shard_tokens:
            # one concatenation, then every whole shard in it: cutting a shard at a time re-copied
            # the rest each time, quadratic in a document many shards long; the rest is copied
            # so the joined array is freed
            joined = np.concatenate(self.pending)
            whole = len(joined) - len(joined) % self.shard_tokens
            for start in range(0, whole, self.shard_tokens):
                self._write(joined[start: start + self.shard_tokens])
            rest = joined[whole:].copy()
            self.pending, self.pending_tokens = [rest], len(rest)

    def close(self):
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray):
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(os.path.join(self.out_dir, name), tokens, self.vocab_size)
        self.shards.append(name)

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


_SHARD_FILE = re.compile(r"(train|val)_\d+\.bin")
REFUSE_HINT = "choose another data.data_dir (or --out) or delete it"


def _check_out_dir(out_dir: str, source: str, data_files=None):
    """Raise a one-line ValueError unless out_dir may be (re)built by preparing `source`:
    it is absent, empty, or this source's cache, i.e. its meta.json records the same source
    (and data files) and it holds nothing but meta.json and shards. A cache of the same
    source is derived data (a tokenizer or val_fraction change rebuilds it); a folder of
    another source, or one that is not ours, is someone's data: never replaced."""
    if not os.path.exists(out_dir):
        problem = output_dir_problem(out_dir)  # e.g. under a file: the build folder could not be made
        if problem:
            raise ValueError(f"output {out_dir} {problem}")
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"output {out_dir} exists and is not a directory: refusing to overwrite it; {REFUSE_HINT}")
    entries = os.listdir(out_dir)
    if not entries:
        return

    def refuse(what):
        return ValueError(f"{out_dir} {what}: refusing to overwrite it; {REFUSE_HINT}")

    meta_path = os.path.join(out_dir, META_NAME)
    if not os.path.isfile(meta_path):
        raise refuse(f"exists, is not empty and holds no {META_NAME}")
    try:
        meta = read_meta_json(meta_path)
    except ValueError as e:
        reason = str(e)[len(meta_path):].strip()  # "is not valid JSON (...)": out_dir is named already
        raise refuse(f"holds a {META_NAME} that data.prepare did not write (it {reason})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("source"), str):
        raise refuse(f"holds a {META_NAME} with no 'source' field, not one data.prepare wrote")
    if meta["source"] != source:
        raise refuse(f"already holds data prepared from {meta['source']!r} (this run prepares {source!r})")
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    if recipe.get("data_files") != data_files:
        raise refuse(f"already holds data prepared from {source!r} with data files {recipe.get('data_files')!r} "
                     f"(this run reads {data_files!r})")
    unknown = sorted(e for e in entries if e != META_NAME and not _SHARD_FILE.fullmatch(e))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise refuse(f"holds files data.prepare did not write ({shown})")


def _target(out_dir: str) -> str:
    """The path to check as the output folder: the target of a dangling symlink (the folder is
    made there, the link kept), else out_dir itself."""
    return os.path.realpath(out_dir) if os.path.islink(out_dir) and not os.path.exists(out_dir) else out_dir


def _progress(total, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="tokenizing", disable=quiet or not sys.stderr.isatty())


def _taking_turns(prepare_fn):
    """Run a preparation of out_dir under _out_dir_lock(out_dir), so that every caller of
    prepare(), not only ensure_prepared and the CLI, takes turns with other preparers."""
    @functools.wraps(prepare_fn)
    def locked(source, out_dir, *args, **kwargs):
        with _out_dir_lock(out_dir):
            return prepare_fn(source, out_dir, *args, **kwargs)
    return locked


@_taking_turns
def prepare(source: str, out_dir: str, tokenizer: str = "gpt2", val_fraction: float = DEFAULT_VAL_FRACTION,
            shard_tokens: int = 100_000_000, num_workers: int = 0, text_field: str = "text", split: str = "train",
            streaming: bool = False, max_docs=None, seed: int = 0, data_files=None, bpe_dir=None,
            quiet: bool = False) -> dict:
    """Tokenize a source into train/val shards under out_dir; return the meta dict. Holds
    out_dir's lock (_out_dir_lock) throughout."""
    if tokenizer not in TOKENIZER_NAMES:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:     # a header's int32 count (data/shards.py)
        raise ValueError(f"shard_tokens must lie in 1..{MAX_SHARD_TOKENS}, got {shard_tokens}")
    if max_docs is not None and max_docs < 2:
        raise ValueError(f"max_docs must be at least 2 (one train and one val document), got {max_docs}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = all cores), got {num_workers}")
    num_workers = num_workers or os.cpu_count() or 1
    out_dir = os.path.normpath(out_dir)
    _check_out_dir(_target(out_dir), source, data_files)  # before anything is read, written or deleted
    tok = get_tokenizer(tokenizer, bpe_dir)  # fail fast on missing BPE files, before reading data
    if tok.vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab of {tok.vocab_size} does not fit uint16 shards")
    documents, total = open_source(source, data_files, text_field, split, streaming, quiet)
    if max_docs is not None:
        documents = itertools.islice(documents, max_docs)
        total = max_docs if total is None else min(total, max_docs)

    skipped_empty = 0

    def nonempty(docs):
        nonlocal skipped_empty
        for text in docs:
            if text:
                yield text
            else:  # an empty document would add a lone eot and nothing to learn
                skipped_empty += 1

    # absolute: for out_dir "." (or "..") the sibling "..tmp-<pid>" would land inside out_dir;
    # resolved: for an out_dir that is a symlink, the folder is built and swapped beside its
    # target, so that the link stays a link to the rebuilt data
    real_dir = os.path.realpath(out_dir)
    tmp_dir = f"{real_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        os.makedirs(tmp_dir)
    except OSError as e:  # e.g. under /proc: name the output, not the temporary folder
        raise ValueError(f"output {out_dir} cannot be created: {e.strerror or e}") from None
    try:
        writers = {name: _SplitWriter(tmp_dir, name, shard_tokens, tok.vocab_size) for name in ("train", "val")}
        # The latest train document is held back one step: if no document hashed to val,
        # the last one becomes the val split, so any corpus of >= 2 documents has both.
        held_train = None
        num_documents = 0
        with _progress(total, quiet) as bar:
            for tokens, n_bytes in _encoded_stream(nonempty(documents), tokenizer, bpe_dir, num_workers):
                if is_val_document(num_documents, seed, val_fraction):
                    writers["val"].add(tokens, n_bytes)
                else:
                    if held_train is not None:
                        writers["train"].add(*held_train)
                    held_train = (tokens, n_bytes)
                num_documents += 1
                bar.update(1)
        if num_documents < 2:
            raise ValueError(f"source {source!r} gave {num_documents} non-empty document(s); need at least 2 for "
                             "train and val (each .txt file, .jsonl line or hf: row is one document: split a "
                             "single file into several)")
        if held_train is None:
            raise ValueError(f"all {num_documents} documents fell into val: lower val_fraction ({val_fraction})")
        writers["val" if writers["val"].documents == 0 else "train"].add(*held_train)
        for writer in writers.values():
            writer.close()
        meta = {
            "format_version": META_FORMAT_VERSION,
            "shard_format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_bytes": HEADER_BYTES,
                             "dtype": "uint16"},
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "source": source,
            "recipe": _recipe(source, tok.name, data_files, text_field, split, max_docs, val_fraction, seed),
            "shard_tokens": shard_tokens,
            "skipped_empty_documents": skipped_empty,
            "splits": {name: writer.summary() for name, writer in writers.items()},
        }
        with open(os.path.join(tmp_dir, META_NAME), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _check_out_dir(_target(out_dir), source, data_files)  # again: out_dir may have changed while we tokenized
        _swap_into_place(tmp_dir, real_dir)  # "." cannot be renamed
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def _swap_into_place(tmp_dir: str, out_dir: str):
    """Rename the finished tmp_dir to out_dir; an old prepared out_dir (one _check_out_dir
    allows to replace) is moved aside first (a directory cannot be renamed over a non-empty
    one) and deleted after."""
    old_dir = None
    if os.path.exists(out_dir):
        old_dir = f"{out_dir}.old-{os.getpid()}"
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _recipe(source, tokenizer, data_files, text_field, split, max_docs, val_fraction, seed) -> dict:
    return {"source": source, "tokenizer": tokenizer, "data_files": data_files, "text_field": text_field,
            "split": split, "max_docs": max_docs, "val_fraction": val_fraction, "seed": seed}


def ensure_prepared(source: str, out_dir: str, tokenizer: str = "gpt2", **kwargs) -> dict:
    """Return out_dir's meta when it was prepared from the same recipe (source, tokenizer,
    split choice, ...) and its meta.json and shards are intact; otherwise prepare it. A folder
    of the same source is rebuilt in place; one of another source, or not data.prepare's,
    is refused with a ValueError before anything is deleted (_check_out_dir). Preparers of one
    out_dir take turns (_out_dir_lock): a second one waits for the first, then reuses its folder."""
    recipe = _recipe(source, tokenizer, kwargs.get("data_files"), kwargs.get("text_field", "text"),
                     kwargs.get("split", "train"), kwargs.get("max_docs"),
                     kwargs.get("val_fraction", DEFAULT_VAL_FRACTION), kwargs.get("seed", 0))
    with _out_dir_lock(out_dir):
        if os.path.isfile(os.path.join(out_dir, META_NAME)):
            try:
                meta = load_meta(out_dir)
                if meta.get("format_version") == META_FORMAT_VERSION and meta.get("recipe") == recipe:
                    check_shards(out_dir, meta)
                    return meta
            except (ValueError, OSError):
                pass  # damaged: prepare() rebuilds it when it is this source's folder, refuses otherwise
        return prepare(source, out_dir, tokenizer, **kwargs)


_HELD_LOCKS = set()   # (lock path, thread id) that _out_dir_lock holds in this process


@contextlib.contextmanager
def _out_dir_lock(out_dir: str):
    """Hold an exclusive flock on <out_dir>.lock (beside the resolved folder) while preparing it:
    two preparers at once (two runs sharing data/cache/...) would otherwise race on the
    check-then-rename swap. The holder removes the file when done; a waiter that then finds it
    locked a removed file locks the new one. Without fcntl, or where the lock file cannot be
    made or locked (a filesystem without flock), it proceeds unlocked. Reentrant in a thread:
    ensure_prepared and the CLI hold it across their checks and prepare() takes it again."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = f"{os.path.realpath(out_dir)}.lock"
    held = (path, threading.get_ident())
    if held in _HELD_LOCKS:
        yield
        return
    lock = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError:
        pass  # open() fails below; prepare() names the problem
    while True:
        try:
            lock = open(path, "a")
        except OSError:
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break
        except FileNotFoundError:  # removed by the holder we waited for: lock the new one
            pass
        except OSError:  # e.g. a filesystem without flock
            lock.close()
            lock = None
            break
        except BaseException:
            lock.close()
            raise
        lock.close()
        lock = None
    _HELD_LOCKS.add(held)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(held)
        if lock is not None:
            try:
                os.remove(path)  # while still held: a waiter rechecks the path after locking
            except OSError:
                pass
            lock.close()


# ----------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--source", required=True, help="builtin | files:<glob> | hf:<dataset>[:<config>]")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/cache/builtin-gpt2")
    parser.add_argument("--tokenizer", default="gpt2", choices=TOKENIZER_NAMES)
    parser.add_argument("--val-fraction", type=open_fraction, default=DEFAULT_VAL_FRACTION,
                        help="share of documents in the val split")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="tokenizer processes (0 = all cores)")
    parser.add_argument("--shard-tokens", type=int_at_least(1, below=MAX_SHARD_TOKENS + 1), default=100_000_000, help="tokens per shard file")
    parser.add_argument("--streaming", action="store_true", help="stream the HF dataset instead of downloading it")
    parser.add_argument("--max-docs", type=int_at_least(2), default=None,
                        help="stop after this many documents (at least 2: one train and one val document)")
    parser.add_argument("--data-files", default=None, help="glob of local files for hf:json / hf:text / ...")
    parser.add_argument("--text-field", default=None, help="field holding the text in jsonl / HF rows (default: text)")
    parser.add_argument("--split", default=None, help="HF split to read (default: train)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the per-document val split")
    parser.add_argument("--bpe-dir", default=None, help="folder with GPT-2 vocab.bpe and encoder.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("argument --out: is empty; give a folder")
    if not args.source.startswith("hf:"):   # they would do nothing: say so rather than ignore them
        for flag, given in (("--streaming", args.streaming), ("--data-files", args.data_files is not None),
                            ("--split", args.split is not None)):
            if given:
                parser.error(f"argument {flag}: applies to hf: sources only, not to {args.source!r}")
    if args.source == "builtin" and args.text_field is not None:
        parser.error(f"argument --text-field: applies to files: and hf: sources only, not to {args.source!r}")
    try:
        check_output_dir(_target(args.out))  # up front, naming --out (not the temporary build folder)
        with _out_dir_lock(args.out):
            meta = prepare(args.source, args.out, args.tokenizer, val_fraction=args.val_fraction,
                           shard_tokens=args.shard_tokens, num_workers=args.workers,
                           text_field="text" if args.text_field is None else args.text_field,
                           split="train" if args.split is None else args.split, streaming=args.streaming,
                           max_docs=args.max_docs, seed=args.seed, data_files=args.data_files,
                           bpe_dir=args.bpe_dir, quiet=args.quiet)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(2)
    if not args.quiet:
        for name, info in meta["splits"].items():
            print(f"{name}: {info['tokens']:,} tokens, {info['documents']:,} documents, {info['bytes']:,} bytes, "
                  f"{len(info['shards'])} shard(s)")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
