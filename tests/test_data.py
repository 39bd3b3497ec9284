"""Shards, corpus preparation (files / HF local loaders / built-in) and the loader."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.builtin import iter_builtin_documents, old_and_new_testaments, train_and_validation_chapters
from data.loader import BatchSampler, TokenDataset, iter_eval_batches
from data.prepare import ensure_prepared, is_val_document, prepare
from data.prepare import main as prepare_main
from data.shards import HEADER_BYTES, read_shard, write_shard
from data.tokenizer import get_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [
    "In the beginning was the shard.",
    "Второй документ: unicode ✓ and emoji 🚀.",
    "third\n\nwith blank lines\n",
    "short",
    "A somewhat longer fifth document " * 5,
    "sixth: 東京",
    "seventh <|endoftext|> literal",
    "eighth and last.",
]


# ----------------------------------------------------------------------------------------
# shards


def test_shard_roundtrip(tmp_path):
    path = str(tmp_path / "s.bin")
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    write_shard(path, tokens, vocab_size=65536)
    back = read_shard(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16 and not back.flags.writeable
    np.testing.assert_array_equal(back, tokens)
    assert os.path.getsize(path) == HEADER_BYTES + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:4]) == [20251231, 1, 5, 65536] and not header[4:].any()
    assert os.listdir(tmp_path) == ["s.bin"]  # no tmp file left behind
    write_shard(path, [], vocab_size=257)
    assert len(read_shard(path)) == 0


def _corrupt_header(path, index, value):
    header = np.fromfile(path, dtype="<i4", count=256)
    header[index] = value
    with open(path, "r+b") as f:
        f.write(header.tobytes())


def test_shard_errors(tmp_path):
    path = str(tmp_path / "s.bin")
    write_shard(path, np.arange(100), vocab_size=257)
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 2 * 60)
    with pytest.raises(ValueError, match=r"is truncated: header says 100 tokens, file holds 60"):
        read_shard(path)

    write_shard(path, np.arange(10), vocab_size=257)
    _corrupt_header(path, 0, 12345)
    with pytest.raises(ValueError, match="magic 12345, expected 20251231"):
        read_shard(path)

    write_shard(path, np.arange(10), vocab_size=257)
    _corrupt_header(path, 1, 2)
    with pytest.raises(ValueError, match="format version 2"):
        read_shard(path)

    write_shard(path, np.arange(10), vocab_size=257)
    _corrupt_header(path, 3, 100277)
    with pytest.raises(ValueError, match="vocab 100277"):
        read_shard(path)

    with open(path, "wb") as f:
        f.write(b"tiny")
    with pytest.raises(ValueError, match="smaller than its 1024-byte header"):
        read_shard(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_shard(str(tmp_path / "missing.bin"))

    with pytest.raises(ValueError, match="vocab of 100277 does not fit uint16 shards"):
        write_shard(path, [1, 2], vocab_size=100277)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 257\)"):
        write_shard(path, [1, 257], vocab_size=257)


# ----------------------------------------------------------------------------------------
# prepare


def _split_tokens(out_dir, split):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    shards = [read_shard(os.path.join(out_dir, name)) for name in meta["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, np.uint16)


def _decoded_documents(out_dir, split, tok):
    """Split the token stream at eot and decode each document."""
    tokens = _split_tokens(out_dir, split).tolist()
    assert tokens and tokens[-1] == tok.eot_id  # every document ends with eot
    docs, current = [], []
    for t in tokens:
        if t == tok.eot_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    return docs


def _check_prepared(out_dir, meta, documents, tok, val_fraction=0.25, seed=0):
    """meta counts and bytes agree with the documents; decoding the shards gives them back."""
    expected = {"train": [], "val": []}
    for index, doc in enumerate(documents):
        expected["val" if is_val_document(index, seed, val_fraction) else "train"].append(doc)
    if not expected["val"]:  # prepare moves the last document to val
        expected["val"].append(expected["train"].pop())
    assert meta["tokenizer"] == tok.name and meta["vocab_size"] == tok.vocab_size and meta["eot_id"] == tok.eot_id
    for split, docs in expected.items():
        info = meta["splits"][split]
        assert info["documents"] == len(docs) > 0
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert info["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs) == len(_split_tokens(out_dir, split))
        assert _decoded_documents(out_dir, split, tok) == docs


def test_split_writer_cuts_a_long_document_in_one_pass(tmp_path, monkeypatch):
    """Review: a document many shards long was cut one shard at a time, each cut re-copying
    all the rest: quadratic in the document's length. Now one concatenation an add;
    the shards hold the same tokens, the last one the partial rest."""
    from data.prepare import _SplitWriter
    real, calls = np.concatenate, []
    monkeypatch.setattr(np, "concatenate", lambda arrays, *args, **kwargs: calls.append(1) or real(arrays, *args,
                                                                                                   **kwargs))
    documents = [np.arange(3, dtype=np.uint16), np.arange(100, 195, dtype=np.uint16)]
    writer = _SplitWriter(str(tmp_path), "train", 10, 257)
    for tokens in documents:
        writer.add(tokens, len(tokens))
    writer.close()
    assert len(calls) == 2          # the long add's and close's; one per cut: 9 + 1
    shards = [read_shard(str(tmp_path / name)) for name in writer.shards]
    assert [len(shard) for shard in shards] == [10] * 9 + [8]
    assert np.array_equal(real(shards), real(documents))


def test_prepare_from_txt_and_jsonl_files(tmp_path):
    tok = get_tokenizer("bytes")
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(DOCS):
        (txt_dir / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (txt_dir / "empty.txt").write_text("")  # skipped, counted
    out = str(tmp_path / "out_txt")
    # tiny shards so the train split spans several files
    meta = prepare(f"files:{txt_dir}/*.txt", out, "bytes", val_fraction=0.25, shard_tokens=64, num_workers=1,
                   quiet=True)
    _check_prepared(out, meta, DOCS, tok)  # sorted glob: doc00..doc07, then empty.txt
    assert meta["skipped_empty_documents"] == 1
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert all(len(read_shard(os.path.join(out, n))) == 64 for n in meta["splits"]["train"]["shards"][:-1])
    assert sorted(os.listdir(tmp_path)) == ["out_txt", "txt"]  # the tmp build folder is gone

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)) + "\n", encoding="utf-8")
    out = str(tmp_path / "out_jsonl")
    meta = prepare(f"files:{jsonl}", out, "bytes", val_fraction=0.25, num_workers=2, text_field="body", quiet=True)
    _check_prepared(out, meta, DOCS, tok)

    with pytest.raises(ValueError, match="has no field 'text'"):
        prepare(f"files:{jsonl}", str(tmp_path / "bad"), "bytes", num_workers=1, quiet=True)
    assert not os.path.exists(tmp_path / "bad")  # a failed prepare leaves nothing that looks prepared
    with pytest.raises(FileNotFoundError, match="matches no files"):
        prepare(f"files:{tmp_path}/*.nothing", str(tmp_path / "bad"), "bytes", quiet=True)


def test_prepare_from_hf_json_loader(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    for part in range(2):
        rows = DOCS[part * 4:(part + 1) * 4]
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows),
                                                    encoding="utf-8")
    out = str(tmp_path / "out")
    meta = prepare("hf:json", out, "bytes", val_fraction=0.25, num_workers=1, data_files=str(tmp_path / "part*.jsonl"),
                   quiet=True)
    _check_prepared(out, meta, DOCS, get_tokenizer("bytes"))
    assert meta["recipe"]["data_files"] == str(tmp_path / "part*.jsonl")
    with pytest.raises(ValueError, match="pass --data-files"):
        prepare("hf:json", str(tmp_path / "bad"), "bytes", quiet=True)


def test_prepare_hf_json_names_a_bad_data_file_in_one_line(tmp_path, monkeypatch, capfd):
    """Audit: a data file that is not JSON Lines gave two lines: datasets' log "Failed to load
    JSON from file '<file>' ..." and "error: ... DatasetGenerationError: An error occurred while
    generating the dataset", which names nothing. Now one line with the file and row, also
    when streaming (where the file is read only while tokenizing)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    for streaming in (False, True):
        with pytest.raises(ValueError) as excinfo:
            prepare("hf:json", str(tmp_path / "out"), "bytes", num_workers=1, data_files=str(bad),
                    streaming=streaming, quiet=True)
        message = _one_line(excinfo)
        assert message.startswith(f"could not load HF dataset 'json' (config None, split 'train'): Failed to load "
                                  f"JSON from file '{bad}'") and message.endswith("in row 2"), message
        assert "Failed to load" not in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


def test_testaments_split_the_builtin_chapters_at_matthew_1():
    old, new = old_and_new_testaments()
    assert (len(old), len(new)) == (929, 260) and old + new == list(iter_builtin_documents())
    assert old[-1].startswith("Malachi 4\n\n") and new[0].startswith("Matthew 1\n\n")


def test_train_and_validation_chapters_are_the_prepared_builtin_splits(tmp_path):
    """eval.continual's builtin domain holds out the chapters that data.prepare puts in the
    built-in corpus's val split with the trainer's default recipe (val_fraction 0.01, seed 0),
    and trains on the rest. Kills the old New Testament hold-out (in every default training
    run) and an index that drifts from prepare()'s numbering of documents."""
    out = str(tmp_path / "kjv")
    prepare("builtin", out, "bytes", num_workers=1, quiet=True)       # the default recipe
    train, val = train_and_validation_chapters()
    tok = get_tokenizer("bytes")
    assert _decoded_documents(out, "val", tok) == val and _decoded_documents(out, "train", tok) == train
    assert [c.split("\n")[0] for c in val] == ["Exodus 24", "1 Chronicles 16", "Psalms 78", "Isaiah 10",
                                                "Matthew 7", "Ephesians 5", "Hebrews 5", "Revelation 19"]
    assert not set(train) & set(val) and len(train) + len(val) == 1189
    # another fraction: prepare's rule on the same index (a larger fraction keeps these 8 in val)
    train_2, val_2 = train_and_validation_chapters(0.02)
    chapters = list(iter_builtin_documents())
    assert val_2 == [c for i, c in enumerate(chapters) if is_val_document(i, 0, 0.02)] and set(val) <= set(val_2)


def test_prepare_builtin_gpt2_and_ensure_prepared(tmp_path):
    tok = get_tokenizer("gpt2")
    documents = []
    for doc in iter_builtin_documents():
        documents.append(doc)
        if len(documents) == 6:
            break
    assert documents[0].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.\n")
    out = str(tmp_path / "kjv")
    meta = prepare("builtin", out, "gpt2", val_fraction=0.25, max_docs=6, num_workers=1, quiet=True)
    _check_prepared(out, meta, documents, tok)

    # same recipe: reused untouched; another recipe of the same source: rebuilt in place
    mtime = os.path.getmtime(os.path.join(out, "meta.json"))
    assert ensure_prepared("builtin", out, "gpt2", val_fraction=0.25, max_docs=6, num_workers=1, quiet=True) == meta
    assert os.path.getmtime(os.path.join(out, "meta.json")) == mtime
    rebuilt = ensure_prepared("builtin", out, "bytes", val_fraction=0.25, max_docs=6, num_workers=1, quiet=True)
    assert rebuilt["tokenizer"] == "bytes" and TokenDataset(out).vocab_size == 257


def test_prepare_refuses_foreign_directory_and_bad_args(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prepare("builtin", str(tmp_path), "bytes", max_docs=2, quiet=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    # a mistyped prepared folder (train.py's data.dataset) says what is there
    with pytest.raises(ValueError, match=rf"^unknown source '{tmp_path}/nope': there is no folder {tmp_path}/nope; "
                                         r"valid: builtin, .*, or \(data.dataset\) a folder data.prepare made$"):
        prepare(str(tmp_path / "nope"), str(tmp_path / "y"), "bytes", quiet=True)
    with pytest.raises(ValueError, match=rf"^unknown source '{tmp_path}': {tmp_path} is a folder without "
                                         r"meta.json, not one data.prepare made; valid"):
        prepare(str(tmp_path), str(tmp_path / "y"), "bytes", quiet=True)
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        prepare("nope", str(tmp_path / "x"), "bytes", quiet=True)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare("builtin", str(tmp_path / "x"), "bytes", val_fraction=1.5, quiet=True)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare("builtin", str(tmp_path / "x"), "llama", quiet=True)


def test_prepare_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "data.prepare", "--source", f"files:{tmp_path}/*.txt",
                             "--out", str(tmp_path / "out"), "--tokenizer", "bytes"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: files: glob '{tmp_path}/*.txt' matches no files"


def _snapshot(folder):
    """{relative path: bytes} of every file under folder (what a refusal must leave alone)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _txt_corpus(folder, docs=DOCS):
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return f"files:{folder}/*.txt"


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_prepare_refuses_a_folder_of_another_source(tmp_path):
    """Audit: pointing the trainer (dataset builtin) or the CLI at a folder prepared from
    files:... deleted its shards and rebuilt it as builtin. Now: one-line refusal, nothing touched."""
    source = _txt_corpus(tmp_path / "corpus")
    out = str(tmp_path / "mine")
    prepare(source, out, "bytes", val_fraction=0.25, num_workers=1, quiet=True)
    before = _snapshot(out)
    for call in (lambda: ensure_prepared("builtin", out, "bytes", max_docs=4, num_workers=1, quiet=True),
                 lambda: ensure_prepared("builtin", out, "gpt2", max_docs=4, num_workers=1, quiet=True),
                 lambda: prepare("builtin", out, "bytes", max_docs=4, num_workers=1, quiet=True)):
        with pytest.raises(ValueError) as excinfo:
            call()
        message = _one_line(excinfo)
        assert message == (f"{out} already holds data prepared from {source!r} (this run prepares 'builtin'): "
                           "refusing to overwrite it; choose another data.data_dir (or --out) or delete it")
        assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["corpus", "mine"]  # no .tmp- / .old- folder left

    # hf:<loader> reads --data-files: other files are another corpus, refused before loading anything
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["source"] = meta["recipe"]["source"] = "hf:json"
    meta["recipe"]["data_files"] = "a/*.jsonl"
    (tmp_path / "mine" / "meta.json").write_text(json.dumps(meta))
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"from 'hf:json' with data files 'a/\*\.jsonl' \(this run reads "
                                         r"'b/\*\.jsonl'\): refusing to overwrite it"):
        prepare("hf:json", out, "bytes", data_files="b/*.jsonl", quiet=True)
    assert _snapshot(out) == before


def test_trainer_refuses_a_data_dir_of_another_source(tmp_path, capsys):
    """The audited command: train.py <config> --data.data_dir=<folder prepared from files:...>."""
    import train

    source = _txt_corpus(tmp_path / "corpus")
    out = str(tmp_path / "mine")
    prepare(source, out, "gpt2", val_fraction=0.25, num_workers=1, quiet=True)
    before = _snapshot(out)
    rc = train.main([os.path.join(REPO_ROOT, "configs", "transformer_tiny.yaml"), f"--data.data_dir={out}",
                     f"--train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"error: {out} already holds data prepared from {source!r}")
    assert _snapshot(out) == before


def test_same_source_recipe_change_rebuilds_in_place(tmp_path):
    source = _txt_corpus(tmp_path / "corpus")
    out = str(tmp_path / "mine")
    first = ensure_prepared(source, out, "bytes", val_fraction=0.25, num_workers=1, quiet=True)
    rebuilt = ensure_prepared(source, out, "bytes", val_fraction=0.5, num_workers=1, quiet=True)
    assert first["recipe"]["val_fraction"] == 0.25 and rebuilt["recipe"]["val_fraction"] == 0.5
    _check_prepared(out, rebuilt, DOCS, get_tokenizer("bytes"), val_fraction=0.5)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "mine"]

    # a damaged meta.json (same recipe) or shard of this source's folder: rebuilt, not a crash
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["splits"] = "x"
    (tmp_path / "mine" / "meta.json").write_text(json.dumps(meta))
    assert ensure_prepared(source, out, "bytes", val_fraction=0.5, num_workers=1, quiet=True) == rebuilt
    with open(os.path.join(out, rebuilt["splits"]["train"]["shards"][0]), "r+b") as f:
        f.truncate(HEADER_BYTES + 2)
    assert ensure_prepared(source, out, "bytes", val_fraction=0.5, num_workers=1, quiet=True) == rebuilt
    assert TokenDataset(out).num_tokens("train") == rebuilt["splits"]["train"]["tokens"]


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "meta.json").write_text("{not json"),
     r"holds a meta\.json that data\.prepare did not write \(it is not valid JSON \(Expecting .* column 2\)\)"),
    (lambda d: (d / "meta.json").write_text('{"tokenizer": "bytes"}'),
     r"holds a meta\.json with no 'source' field, not one data\.prepare wrote"),
    (lambda d: (d / "notes.md").write_text("mine"), r"holds files data\.prepare did not write \(notes\.md\)"),
    (lambda d: (d / "meta.json").unlink(), r"exists, is not empty and holds no meta\.json"),
], ids=["meta-not-json", "meta-without-source", "extra-file", "no-meta"])
def test_prepare_refuses_a_folder_that_is_not_ours(tmp_path, damage, reason):
    """Even a folder of the same source is replaced only when it holds nothing but our meta and shards."""
    source = _txt_corpus(tmp_path / "corpus")
    out = tmp_path / "mine"
    prepare(source, str(out), "bytes", val_fraction=0.25, num_workers=1, quiet=True)
    damage(out)
    before = _snapshot(out)
    for call in (lambda: ensure_prepared(source, str(out), "gpt2", val_fraction=0.25, num_workers=1, quiet=True),
                 lambda: prepare(source, str(out), "bytes", val_fraction=0.25, num_workers=1, quiet=True)):
        with pytest.raises(ValueError, match=f"^{re.escape(str(out))} {reason}: refusing to overwrite it; "
                                             r"choose another data\.data_dir \(or --out\) or delete it$") as excinfo:
            call()
        _one_line(excinfo)
        assert _snapshot(out) == before


def test_prepare_names_a_file_that_is_not_utf8(tmp_path):
    source = _txt_corpus(tmp_path / "corpus", DOCS[:3])
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError) as excinfo:
        prepare(source, str(tmp_path / "out"), "bytes", num_workers=1, quiet=True)
    assert _one_line(excinfo) == (f"{tmp_path / 'corpus' / 'latin1.txt'} is not UTF-8 text (byte 0xe9 at offset 3); "
                                  "convert it to UTF-8 or leave it out of the glob")
    assert sorted(os.listdir(tmp_path)) == ["corpus"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError) as excinfo:
        prepare(f"files:{jsonl}", str(tmp_path / "out"), "bytes", num_workers=1, quiet=True)
    assert _one_line(excinfo).startswith(f"{jsonl}:2 is not UTF-8 (byte 0xff)")
    assert not os.path.exists(tmp_path / "out")


def test_prepare_refuses_an_unsupported_file_before_reading_any(tmp_path):
    """Audit: a glob matching a .md after the .txt files tokenized all of them first, then
    stopped. Now the file types are checked when the glob is expanded: the bad .txt sorted
    before the .md is never read."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"\xff not UTF-8, never read")
    (corpus / "z.md").write_text("readme")
    with pytest.raises(ValueError) as excinfo:
        prepare(f"files:{corpus}/*", str(tmp_path / "out"), "bytes", num_workers=1, quiet=True)
    assert _one_line(excinfo) == (f"unsupported file {corpus / 'z.md'}: files: sources take .txt (one document) "
                                  "or .jsonl (one per line)")


def test_prepare_names_the_row_of_a_lone_surrogate(tmp_path):
    """Audit: a JSON escape "\\ud800" (a lone surrogate) stopped preparation with Python's
    "'utf-8' codec can't encode character" naming no file. Now: the file and line."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n{"text": "third"}\n')
    for workers in (1, 2):
        with pytest.raises(ValueError) as excinfo:
            prepare(f"files:{jsonl}", str(tmp_path / "out"), "bytes", num_workers=workers, quiet=True)
        assert _one_line(excinfo) == (f"{jsonl}:2 field 'text' is not valid Unicode (lone surrogate U+D800 at "
                                      "character 4); fix the row or leave it out")
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


def test_prepare_out_under_a_file_or_the_current_folder(tmp_path, monkeypatch):
    """Audit: --out under a file failed with "[Errno 20] Not a directory: '<out>.tmp-<pid>'";
    --out . (an empty current folder) built "..tmp-<pid>" inside it, then refused it as "not
    empty" after tokenizing everything. Now: a one-line error up front, and "." is prepared."""
    source = _txt_corpus(tmp_path / "corpus", DOCS[:3])
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(ValueError) as excinfo:
        prepare(source, str(tmp_path / "afile" / "sub"), "bytes", num_workers=1, quiet=True)
    assert _one_line(excinfo) == (f"output {tmp_path / 'afile' / 'sub'} cannot be created: {tmp_path / 'afile'} "
                                  "is not a folder")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    meta = prepare(source, ".", "bytes", val_fraction=0.25, num_workers=1, quiet=True)
    assert sorted(os.listdir(here)) == ["meta.json", "train_000000.bin", "val_000000.bin"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3
    assert sorted(os.listdir(tmp_path)) == ["afile", "corpus", "here"]


def test_prepare_pool_workers_leave_ctrl_c_to_the_parent():
    """Audit: Ctrl-C (SIGINT to the whole process group) printed the pool workers' tracebacks
    ("Process ForkPoolWorker-2: Traceback ...") besides "error: interrupted". Now the workers
    ignore SIGINT: a worker signalled keeps running and the parent alone reports."""
    import multiprocessing
    import signal
    import time

    from data.prepare import _encode_documents, _init_pool_worker
    with multiprocessing.get_context().Pool(1, _init_pool_worker, ("bytes", None)) as pool:
        pid = pool.apply(os.getpid)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert pool.apply(os.getpid) == pid
        assert pool.apply(_encode_documents, (["ab"],))[0][1] == 2


def test_prepare_pool_workers_end_quietly_under_train_pys_sigterm_handler():
    """Final review: forked workers inherited train.py's SIGTERM handler (raise Terminated), and
    the pool stops its workers with SIGTERM as it closes: "Process ForkPoolWorker-2:
    Traceback ... raise Terminated" on stderr of a successful run, in ~1 of 3. The workers take
    SIGTERM's default again."""
    import multiprocessing
    import signal

    import train
    from data.prepare import _init_pool_worker
    previous = signal.signal(signal.SIGTERM, train.raise_terminated)
    try:
        with multiprocessing.get_context("fork").Pool(1, _init_pool_worker, ("bytes", None)) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_single_document_is_refused_with_the_way_out(tmp_path):
    """One .txt file is one document, too few for a train and a val split: the error said
    only "need at least 2", and a researcher with one corpus file was stuck."""
    (tmp_path / "corpus.txt").write_text("In the beginning. " * 50)
    with pytest.raises(ValueError, match=r"gave 1 non-empty document\(s\); need at least 2 for train and val "
                                         r"\(each \.txt file, .* split a single file into several\)"):
        prepare(f"files:{tmp_path}/*.txt", str(tmp_path / "out"), "bytes", num_workers=1, quiet=True)


@pytest.mark.parametrize("flag, value, message", [
    ("--max-docs", "-5", "must be >= 2, got -5"),
    ("--max-docs", "1", "must be >= 2, got 1"),
    ("--workers", "-1", "must be >= 0, got -1"),
    ("--shard-tokens", "0", "must be >= 1, got 0"),
    ("--shard-tokens", "2147483648", "must be < 2147483648, got 2147483648"),      # a header's int32 count
    ("--val-fraction", "1.5", "must lie in (0, 1), got 1.5"),
    ("--val-fraction", "nan", "expected a finite number, got 'nan'"),
    ("--workers", "two", "expected an integer >= 0, got 'two'"),
])
def test_prepare_cli_rejects_bad_numbers_naming_the_flag(tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        prepare_main(["--source", "builtin", "--out", str(out), "--tokenizer", "bytes", flag, value])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == f"error: argument {flag}: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("source", ["builtin", "files:corpus/*.txt"])
@pytest.mark.parametrize("flags", [["--streaming"], ["--data-files", "x/*.jsonl"], ["--split", "validation"],
                                   ["--split", "train"]])
def test_prepare_cli_refuses_hf_only_flags_for_other_sources(tmp_path, capsys, source, flags):
    """Audit: --streaming, --data-files and --split did nothing for builtin / files: sources
    (docs/DATA.md: refused with them; `--split train`, the default's value, was let through)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        prepare_main(["--source", source, "--out", str(out), "--tokenizer", "bytes", *flags])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == (f"error: argument {flags[0]}: applies to hf: sources only, "
                                       f"not to {source!r}\n")
    assert not out.exists()


def test_prepare_cli_refuses_text_field_for_builtin(tmp_path, capsys):
    """Review: --text-field with --source builtin was accepted and written into the recipe, whose
    trainer counterpart for builtin has the default: the folder was then rebuilt. Now refused
    like the hf:-only flags; files: sources still take it."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        prepare_main(["--source", "builtin", "--out", str(out), "--tokenizer", "bytes", "--text-field", "body"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == ("error: argument --text-field: applies to files: and hf: sources only, "
                                       "not to 'builtin'\n")
    assert not out.exists()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS[:4]), encoding="utf-8")
    prepare_main(["--source", f"files:{jsonl}", "--out", str(out), "--tokenizer", "bytes", "--text-field", "body",
                  "--val-fraction", "0.25", "--workers", "1", "--quiet"])
    assert json.load(open(out / "meta.json"))["recipe"]["text_field"] == "body"


def test_prepare_cli_names_out_when_it_cannot_be_made(tmp_path, capsys):
    """Review: --out /proc/foo failed naming the temporary folder ('/proc/foo.tmp-<pid>'), and
    --out under a file was "output ...", not the flag. Now both name the --out path."""
    (tmp_path / "afile").write_text("keep me")
    bad = tmp_path / "afile" / "sub"
    with pytest.raises(SystemExit) as excinfo:
        prepare_main(["--source", "builtin", "--out", str(bad), "--tokenizer", "bytes", "--quiet"])
    assert excinfo.value.code == 2
    assert capsys.readouterr().err == f"error: --out {bad} cannot be created: {tmp_path / 'afile'} is not a folder\n"
    if os.path.isdir("/proc/self"):  # Linux: nothing can be made in /proc, whoever runs the test
        out = f"/proc/prepare-test-{os.getpid()}"
        with pytest.raises(SystemExit) as excinfo:
            prepare_main(["--source", "builtin", "--out", out, "--tokenizer", "bytes", "--max-docs", "2",
                          "--workers", "1", "--quiet"])
        err = capsys.readouterr().err
        assert err.startswith(("error: --out /proc/prepare-test-", f"error: output {out} cannot be created")), err
        assert ".tmp-" not in err and err.count("\n") == 1


def test_prepare_files_glob_of_folders_only_says_so(tmp_path):
    (tmp_path / "a.txt").mkdir()  # a folder named like a document
    with pytest.raises(FileNotFoundError) as excinfo:
        prepare(f"files:{tmp_path}/*.txt", str(tmp_path / "out"), "bytes", quiet=True)
    assert _one_line(excinfo) == f"files: glob '{tmp_path}/*.txt' matches only folders"
    with pytest.raises(FileNotFoundError, match="matches no files$"):
        prepare(f"files:{tmp_path}/*.md", str(tmp_path / "out"), "bytes", quiet=True)


def test_prepare_hf_row_error_names_the_dataset(tmp_path, monkeypatch):
    """Review: a row without the text field was "row 0 has no field 'body'": which dataset?"""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    with pytest.raises(ValueError) as excinfo:
        prepare("hf:json", str(tmp_path / "out"), "bytes", num_workers=1, data_files=str(rows), text_field="body",
                quiet=True)
    assert _one_line(excinfo) == ("HF dataset 'json' (config None, split 'train') row 0 has no field 'body' "
                                  "(has: ['text']); set --text-field")
    assert not (tmp_path / "out").exists()


def test_prepare_hf_local_folder_needs_no_hub(tmp_path, monkeypatch):
    """Review: hf:<local folder> (load_dataset reads a folder of data files before it asks the
    Hub) was refused offline as "huggingface.co cannot be reached ...; set HF_HUB_OFFLINE=1":
    the Hub check ran for every hf: source without --data-files. A Hub name is still checked."""
    datasets = pytest.importorskip("datasets")
    import data.prepare as prepare_module
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(prepare_module, "hub_unreachable", lambda streaming=False: "huggingface.co cannot be reached")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part0.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    for streaming in (False, True):
        out = str(tmp_path / f"out{streaming}")
        meta = prepare(f"hf:{folder}", out, "bytes", val_fraction=0.25, num_workers=1, streaming=streaming, quiet=True)
        _check_prepared(out, meta, DOCS, get_tokenizer("bytes"))
    with pytest.raises(ValueError, match=r"^could not load HF dataset 'someone/corpus' .*: huggingface.co cannot"):
        prepare("hf:someone/corpus", str(tmp_path / "hub"), "bytes", num_workers=1, quiet=True)


def test_prepare_hf_data_files_without_rows_say_so(tmp_path, monkeypatch):
    """Review: empty --data-files were "could not load HF dataset 'json' (...): StopIteration:"
    (the json builder's first-row read finds none), which does not say what is wrong."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    (tmp_path / "empty.jsonl").write_text("")
    for streaming in (False, True):
        with pytest.raises(ValueError) as excinfo:
            prepare("hf:json", str(tmp_path / "out"), "bytes", num_workers=1, data_files=str(tmp_path / "empty.jsonl"),
                    streaming=streaming, quiet=True)
        assert _one_line(excinfo) == ("could not load HF dataset 'json' (config None, split 'train'): found no rows "
                                      "(StopIteration: are the data files empty?)")


def test_prepare_rebuilds_through_a_symlinked_out_dir(tmp_path):
    """Review: a rebuild through a symlinked --out (a data/cache entry pointing at a big disk)
    renamed the link aside (left as <link>.old-<pid>) and put a real folder in its place. Now
    the folder is built and swapped beside the link's target; the link stays."""
    source = _txt_corpus(tmp_path / "corpus", DOCS[:4])
    real = tmp_path / "big" / "real"
    real.parent.mkdir()
    prepare(source, str(real), "bytes", val_fraction=0.25, num_workers=1, quiet=True)
    link = tmp_path / "lnk"
    link.symlink_to(real)
    for call in (lambda: ensure_prepared(source, str(link), "bytes", val_fraction=0.5, num_workers=1, quiet=True),
                 lambda: prepare_main(["--source", source, "--out", str(link), "--tokenizer", "bytes",
                                       "--val-fraction", "0.4", "--workers", "1", "--quiet"])):
        call()  # another recipe of the same source: rebuilt
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert sorted(os.listdir(tmp_path)) == ["big", "corpus", "lnk"]  # no .old-* / .tmp-* / .lock left
        assert sorted(os.listdir(tmp_path / "big")) == ["real"]
    assert json.load(open(real / "meta.json"))["recipe"]["val_fraction"] == 0.4
    assert TokenDataset(str(link)).vocab_size == 257
    dangling = tmp_path / "dangling"  # a link to a folder not made yet: made there
    dangling.symlink_to(tmp_path / "big" / "new")
    prepare_main(["--source", source, "--out", str(dangling), "--tokenizer", "bytes", "--workers", "1", "--quiet"])
    assert dangling.is_symlink() and sorted(os.listdir(tmp_path / "big")) == ["new", "real"]


@pytest.mark.parametrize("entry", ["ensure_prepared", "prepare"])
def test_concurrent_preparers_of_one_folder_take_turns(tmp_path, monkeypatch, entry):
    """Review: two runs preparing one folder at once (sharing data/cache/...): the loser failed
    with "[Errno 39] Directory not empty: '<out>.tmp-<pid>' -> '<out>'" or left <out>.old-<pid>.
    Now the second waits for the first (a lock beside the folder): ensure_prepared then reuses
    its result, and prepare() called directly (a script of its own) rebuilds it after it."""
    import threading
    import time

    import data.prepare as prepare_module

    source = _txt_corpus(tmp_path / "corpus", DOCS[:4])
    out = str(tmp_path / "shared")
    real_replace, real_prepare = os.replace, prepare_module.prepare
    calls = []

    def slow_replace(a, b):  # widens the window between the reuse check and the swap
        time.sleep(0.5)
        return real_replace(a, b)

    def counting_prepare(*args, **kwargs):
        calls.append(args)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(os, "replace", slow_replace)
    monkeypatch.setattr(prepare_module, "prepare", counting_prepare)
    start = threading.Barrier(2)
    results, errors = [], []

    def run():
        start.wait()
        try:
            results.append(getattr(prepare_module, entry)(source, out, "bytes", val_fraction=0.25, num_workers=1,
                                                          quiet=True))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(calls) == (1 if entry == "ensure_prepared" else 2) and len(results) == 2
    assert results[0]["splits"] == results[1]["splits"]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "shared"]  # no .tmp- / .old- / .lock left

# ----------------------------------------------------------------------------------------
# loader


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    """A synthetic prepared folder: train split in 3 uneven shards, val in one."""
    out = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 257, size=n) for n in (300, 40, 500)]
    val = rng.integers(0, 257, size=203)
    splits = {}
    for name, shards in (("train", train), ("val", [val])):
        names = [f"{name}_{i:06d}.bin" for i in range(len(shards))]
        for file_name, tokens in zip(names, shards):
            write_shard(str(out / file_name), tokens, 257)
        splits[name] = {"tokens": int(sum(len(s) for s in shards)), "documents": 1, "bytes": 1, "shards": names}
    meta = {"format_version": 1, "tokenizer": "bytes", "vocab_size": 257, "eot_id": 256, "source": "synthetic",
            "splits": splits}
    (out / "meta.json").write_text(json.dumps(meta))
    return str(out)


def test_sampler_batches_are_deterministic_and_shifted(token_dir):
    dataset = TokenDataset(token_dir)
    a = BatchSampler(dataset, "train", batch_size=8, seq_len=50, seed=3)
    b = BatchSampler(dataset, "train", batch_size=8, seq_len=50, seed=3)
    other = BatchSampler(dataset, "train", batch_size=8, seq_len=50, seed=4)
    shard_seen = set()
    for _ in range(4):
        (xa, ya), (xb, yb), (xo, _) = a.next_batch(), b.next_batch(), other.next_batch()
        assert xa.shape == ya.shape == (8, 50) and xa.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xo)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        shard_seen.update(s for s, _ in a.global_window_starts(a.step - 1))
    # windows stay inside one shard: the 40-token shard is too short for seq_len 50
    assert shard_seen <= {0, 2} and a.num_windows == (300 - 50) + (500 - 50)
    # every row is a real window of the data
    flat = [np.asarray(s) for s in dataset.shards["train"]]
    row = np.concatenate([xa[0].numpy(), ya[0, -1:].numpy()])
    assert any(np.array_equal(f[o:o + 51], row) for f in flat for o in range(len(f) - 50))


def test_sampler_resume_exact(token_dir):
    dataset = TokenDataset(token_dir)
    sampler = BatchSampler(dataset, "train", batch_size=4, seq_len=32, seed=7)
    for _ in range(5):
        sampler.next_batch()
    state = sampler.state_dict()
    assert state["step"] == 5 and state["seed"] == 7
    expected = [sampler.next_batch() for _ in range(3)]
    resumed = BatchSampler(dataset, "train", batch_size=4, seq_len=32, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)
    wrong = BatchSampler(dataset, "train", batch_size=8, seq_len=32, seed=7)
    with pytest.raises(ValueError, match="batch_size=4"):
        wrong.load_state_dict(state)


def test_permute_is_a_seeded_bijection():
    from data.loader import permute
    key = np.random.SeedSequence([0, 1]).generate_state(4, np.uint64)
    other = np.random.SeedSequence([0, 2]).generate_state(4, np.uint64)
    for n in (1, 2, 3, 17, 64, 1000, 4097):
        order = permute(np.arange(n), n, key)
        assert sorted(order.tolist()) == list(range(n))
        assert np.array_equal(permute(np.arange(n)[::-1], n, key), order[::-1])   # elementwise, any batch
    assert not np.array_equal(permute(np.arange(1000), 1000, key), permute(np.arange(1000), 1000, other))
    assert not np.array_equal(permute(np.arange(1000), 1000, key), np.arange(1000))


def test_shuffled_sampling_reads_every_window_once_per_epoch(token_dir):
    """data.sampling=shuffled: the non-overlapping windows (starts seq_len apart, inside one
    shard) each once per epoch, batches crossing an epoch boundary included, another order
    the next epoch; ranks slice the same global batch and a resume continues it exactly.
    Kills sampling with replacement (a repeat inside an epoch) and an order that ignores the
    epoch."""
    dataset = TokenDataset(token_dir)
    sampler = BatchSampler(dataset, "train", batch_size=4, seq_len=50, seed=3, sampling="shuffled")
    windows = [(s, o) for s, n in ((0, 300), (2, 500)) for o in range(0, n - 50, 50)]   # the 40-token shard has none
    assert sampler.num_windows == len(windows) == 5 + 9
    starts = [w for step in range(7) for w in sampler.global_window_starts(step)]      # 28 rows: 2 epochs
    first, second = starts[:14], starts[14:]
    assert sorted(first) == sorted(second) == sorted(windows) and first != second
    x, y = sampler.next_batch()
    flat = [np.asarray(s) for s in dataset.shards["train"]]
    (s, o), row = first[0], np.concatenate([x[0].numpy(), y[0, -1:].numpy()])
    assert np.array_equal(flat[s][o:o + 51], row)
    state = sampler.state_dict()
    assert state["sampling"] == "shuffled"
    resumed = BatchSampler(dataset, "train", batch_size=4, seq_len=50, seed=0, sampling="shuffled")
    resumed.load_state_dict(state)
    ranks = [BatchSampler(dataset, "train", batch_size=4, seq_len=50, seed=3, rank=r, world_size=2,
                          sampling="shuffled") for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(4):
        x, y = sampler.next_batch()
        assert torch.equal(resumed.next_batch()[0], x)
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), x)
    with pytest.raises(ValueError, match="data position was saved with data.sampling=shuffled, this sampler has "
                                         "data.sampling=random"):
        BatchSampler(dataset, "train", batch_size=4, seq_len=50, seed=3).load_state_dict(state)
    old = {k: v for k, v in BatchSampler(dataset, "train", 4, 50, seed=3).state_dict().items() if k != "sampling"}
    BatchSampler(dataset, "train", 4, 50, seed=3).load_state_dict(old)      # saved before `sampling` existed
    with pytest.raises(ValueError, match="sampling must be one of random, shuffled"):
        BatchSampler(dataset, "train", 4, 50, seed=3, sampling="epoch")


def test_ranks_slice_the_same_global_batch(token_dir):
    dataset = TokenDataset(token_dir)
    single = BatchSampler(dataset, "train", batch_size=6, seq_len=16, seed=1)
    ranks = [BatchSampler(dataset, "train", batch_size=6, seq_len=16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0][0].shape == (3, 16)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="not divisible by world_size 4"):
        BatchSampler(dataset, "train", batch_size=6, seq_len=16, seed=1, rank=0, world_size=4)


def test_eval_batches_cover_split_once(token_dir):
    dataset = TokenDataset(token_dir)
    tokens = dataset.tokens("train", 0, dataset.num_tokens("train"))  # crosses shard boundaries
    batches = list(iter_eval_batches(dataset, "train", batch_size=4, seq_len=32))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    # every token after the first is a target exactly once, in order
    assert torch.equal(ys, torch.from_numpy(tokens[1:].astype(np.int64)))
    assert torch.equal(xs, torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert all(x.shape[1] == 32 for x, _ in batches[:-1]) and batches[-1][0].shape == (1, (840 - 1) % 32)
    assert len(list(iter_eval_batches(dataset, "train", 4, 32, max_batches=2))) == 2


def test_loader_errors(tmp_path, token_dir):
    with pytest.raises(FileNotFoundError, match=r"no prepared data in .*: run python -m data.prepare"):
        TokenDataset(str(tmp_path / "nothing"))
    # the model's own recipe, quoted: pasted into a shell (zsh refuses an unmatched glob) the
    # command gets the glob and a folder with a space as one argument each
    missing = str(tmp_path / "no data")
    with pytest.raises(FileNotFoundError) as excinfo:
        TokenDataset(missing, "bytes", "files:a/*.txt")
    command = shlex.split(_one_line(excinfo).split(": run ", 1)[1])
    assert command == ["python", "-m", "data.prepare", "--source", "files:a/*.txt", "--tokenizer", "bytes",
                       "--out", missing]
    with pytest.raises(ValueError, match=r"prepared with tokenizer 'bytes', but data.tokenizer='gpt2'"):
        TokenDataset(token_dir, tokenizer="gpt2")
    assert TokenDataset(token_dir, tokenizer="bytes").tokenizer_name == "bytes"
    dataset = TokenDataset(token_dir)
    with pytest.raises(ValueError, match=r"split 'val' .* has 203 tokens, fewer than seq_len \+ 1 = 301"):
        BatchSampler(dataset, "val", batch_size=2, seq_len=300, seed=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        list(iter_eval_batches(dataset, "val", 2, 300))
    with pytest.raises(ValueError, match="split 'test' not in"):
        dataset.num_tokens("test")


def _copy_prepared(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst), json.loads((dst / "meta.json").read_text())


def _without(meta, *path):
    *parents, key = path
    for p in parents:
        meta = meta[p]
    del meta[key]


def _set(meta, *path_and_value):
    *parents, key, value = path_and_value
    for p in parents:
        meta = meta[p]
    meta[key] = value


@pytest.mark.parametrize("edit, message", [
    (lambda m: _without(m, "tokenizer"), r"has no 'tokenizer' field"),
    (lambda m: _without(m, "splits"), r"has no 'splits' field"),
    (lambda m: _set(m, "splits", "x"), r": splits is a string, expected an object of splits"),
    (lambda m: _set(m, "splits", {}), r": splits is empty"),
    (lambda m: _set(m, "tokenizer", 7), r": tokenizer is 7, expected a tokenizer name"),
    (lambda m: _set(m, "vocab_size", "257"), r": vocab_size is '257', expected an integer in 1\.\.65536"),
    (lambda m: _set(m, "eot_id", 300), r": eot_id is 300, expected an integer in \[0, vocab_size=257\)"),
    (lambda m: _set(m, "format_version", 2), r": format_version is 2; this code reads version 1"),
    (lambda m: _set(m, "splits", "val", [1]), r": splits\.val is a list, expected an object"),
    (lambda m: _set(m, "splits", "val", "tokens", -1), r": splits\.val\.tokens is -1, expected a non-negative"),
    (lambda m: _without(m, "splits", "val", "bytes"), r" has no 'splits\.val\.bytes' field"),
    (lambda m: _set(m, "splits", "val", "shards", "val_000000.bin"), r": splits\.val\.shards is a string, "
                                                                     r"expected a list of shard file names"),
    (lambda m: _set(m, "splits", "val", "shards", [None]),
     r": splits\.val\.shards\[0\] is None, expected a file name"),
    (lambda m: _set(m, "splits", "val", "shards", ["../val_000000.bin"]), r": splits\.val\.shards\[0\] is "
                                                                          r"'\.\./val_000000\.bin', expected a file"),
    (lambda m: m["splits"]["train"]["shards"].append("train_000009.bin"),
     r": splits\.train\.shards\[3\] names train_000009\.bin, which is not a file in"),
    # a tokenizer this code does not know: vocab_size is checked against the shards only
    (lambda m: m.update(tokenizer="custom", vocab_size=300),
     r": vocab_size is 300, but shard .*train_000000\.bin declares vocab 257"),
    # audit: data of another vocabulary under a known name trained into an embedding IndexError
    (lambda m: _set(m, "vocab_size", 50257), r": vocab_size is 50257, but tokenizer 'bytes' has 257 ids"),
    (lambda m: _set(m, "eot_id", 5), r": eot_id is 5, but tokenizer 'bytes' has end-of-text id 256"),
    (lambda m: _set(m, "splits", "val", "tokens", 5), r": splits\.val\.tokens is 5, but its shards hold 203 tokens"),
    # boundaries: meta claiming more tokens than the shards hold (bits per byte scales by it),
    # an eot_id equal to vocab_size (one past the last id) for a tokenizer this code does not
    # know, a boolean count (JSON true is not a number of bytes)
    (lambda m: _set(m, "splits", "val", "tokens", 300), r": splits\.val\.tokens is 300, but its shards hold 203"),
    (lambda m: m.update(tokenizer="custom", eot_id=257), r": eot_id is 257, expected an integer in \[0, vocab_size=257\)"),
    (lambda m: _set(m, "splits", "val", "bytes", True), r": splits\.val\.bytes is True, expected a non-negative integer"),
], ids=["no-tokenizer", "no-splits", "splits-string", "splits-empty", "tokenizer-int", "vocab-string", "eot-range",
        "format-version", "split-list", "tokens-negative", "no-bytes", "shards-string", "shard-none", "shard-path",
        "shard-missing", "vocab-mismatch", "vocab-of-another-tokenizer", "eot-of-another-tokenizer",
        "tokens-mismatch", "tokens-more-than-held", "eot-equals-vocab", "bytes-boolean"])
def test_loader_rejects_malformed_meta_in_one_line(tmp_path, token_dir, edit, message):
    data_dir, meta = _copy_prepared(token_dir, tmp_path / "d")
    edit(meta)
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as excinfo:
        TokenDataset(data_dir)
    text = _one_line(excinfo)
    assert text.startswith(os.path.join(data_dir, "meta.json")) and text.endswith("; prepare the data again"), text
    assert re.search(message, text), text


@pytest.mark.parametrize("content, message", [
    (b"{not json", r"meta\.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1"),
    (b"[1, 2]", r"meta\.json holds a list, expected a JSON object; prepare the data again"),
    (b'{"tokenizer": "\xff"}', r"meta\.json is not UTF-8 text \(byte 0xff at offset 15\)"),
], ids=["not-json", "not-object", "not-utf8"])
def test_loader_rejects_unparsable_meta(tmp_path, token_dir, content, message):
    data_dir, _ = _copy_prepared(token_dir, tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as excinfo:
        TokenDataset(data_dir)
    assert _one_line(excinfo).startswith(os.path.join(data_dir, "meta.json"))


def test_prepare_cli_default_split_is_the_trainers():
    """A folder prepared by hand with `python -m data.prepare` defaults (README) has the recipe
    train.py asks for, so the trainer reuses it instead of re-preparing it in place."""
    from config import DataConfig
    from data import prepare as prepare_mod
    assert prepare_mod.DEFAULT_VAL_FRACTION == DataConfig().val_fraction


# ----------------------------------------------------------------------------------------
# the sampler's stream, against data whose every window is known; resuming another stream


def _windows_dir(root, train_shards, seq_len):
    """A prepared folder whose train shards hold distinct ascending token ids, so that a row's
    first token names its window: -> (data_dir, {first token: the window's seq_len + 1 tokens})."""
    splits, windows, next_id = {}, {}, 0
    for name, sizes in (("train", train_shards), ("val", [seq_len + 1])):
        names = []
        for i, size in enumerate(sizes):
            tokens = np.arange(next_id, next_id + size)
            next_id += size
            names.append(f"{name}_{i:06d}.bin")
            write_shard(str(root / names[-1]), tokens, 257)
            if name == "train":
                windows.update({int(tokens[o]): tokens[o:o + seq_len + 1] for o in range(size - seq_len)})
        splits[name] = {"tokens": int(sum(sizes)), "documents": 1, "bytes": 1, "shards": names}
    meta = {"format_version": 1, "tokenizer": "bytes", "vocab_size": 257, "eot_id": 256, "source": "synthetic",
            "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root), windows


def test_sampler_draws_every_window_uniformly_and_anew_each_step(tmp_path):
    """Shards of exactly seq_len + 1 tokens (1 window), of 5 (none), of seq_len + 4 (4): over
    300 steps of 10 rows every one of the 5 windows comes up about 600 times, each row is the
    window its first token names, and no two steps draw the same batch. Kills: the same batch
    at every step (the step left out of the seed), a shard's last window never drawn, a shard
    of exactly seq_len + 1 tokens left out, rows cut from the wrong offset."""
    data_dir, windows = _windows_dir(tmp_path, [9, 5, 12], seq_len=8)
    assert len(windows) == 5
    sampler = BatchSampler(TokenDataset(data_dir), "train", batch_size=10, seq_len=8, seed=0)
    counts, batches = dict.fromkeys(windows, 0), set()
    for _ in range(300):
        x, y = sampler.next_batch()
        batches.add(tuple(x[:, 0].tolist()))
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            window = windows[int(row_x[0])]
            assert np.array_equal(row_x, window[:-1]) and np.array_equal(row_y, window[1:])
            counts[int(row_x[0])] += 1
    assert all(500 < n < 700 for n in counts.values()), counts
    assert len(batches) == 300


def test_sampler_refuses_a_position_from_another_stream(tmp_path, token_dir):
    """A saved data position resumes only a sampler of the same stream: another seq_len, or
    other data (another window count), is a one-line error naming the key. Kills: those checks
    left out (a resume that silently reads other batches)."""
    state = BatchSampler(TokenDataset(token_dir), "train", batch_size=4, seq_len=8, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"saved with train.seq_len=8, this sampler has train.seq_len=16"):
        BatchSampler(TokenDataset(token_dir), "train", batch_size=4, seq_len=16, seed=0).load_state_dict(state)
    other, _ = _windows_dir(tmp_path, [40, 60], seq_len=8)
    with pytest.raises(ValueError, match=r"saved with num_windows=\d+, this sampler has num_windows=84"):
        BatchSampler(TokenDataset(other), "train", batch_size=4, seq_len=8, seed=0).load_state_dict(state)


def test_sampler_refuses_a_position_on_shards_cut_elsewhere(tmp_path):
    """Review: one corpus and recipe prepared again with another --shard-tokens can keep the
    window count (here 32 + 32 + 12 = 37 + 37 + 2 windows of 9 tokens) while every window index
    names another (shard, offset): the resume checks passed and the stream silently changed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    saved_dir, _ = _windows_dir(tmp_path / "a", [40, 40, 20], seq_len=8)
    other_dir, _ = _windows_dir(tmp_path / "b", [45, 45, 10], seq_len=8)
    saved = BatchSampler(TokenDataset(saved_dir), "train", batch_size=4, seq_len=8, seed=0)
    saved.next_batch()
    other = BatchSampler(TokenDataset(other_dir), "train", batch_size=4, seq_len=8, seed=0)
    assert saved.num_windows == other.num_windows == 76
    with pytest.raises(ValueError, match=r"^data position was saved on train shards of other lengths \(shard 0: "
                                         r"40 tokens then, 45 tokens now; .*\): the batch stream would differ$"):
        other.load_state_dict(saved.state_dict())
    again = BatchSampler(TokenDataset(saved_dir), "train", batch_size=4, seq_len=8, seed=0)
    again.load_state_dict(json.loads(json.dumps(saved.state_dict())))     # the same shards resume
    assert torch.equal(again.next_batch()[0], saved.next_batch()[0])


def test_loader_names_a_shard_with_ids_outside_its_vocab(tmp_path, token_dir):
    """Audit: a damaged shard holding an id >= vocab_size (header and meta intact) stopped
    training with a torch "IndexError: index out of range in self" traceback (a device-side
    assert on CUDA). Now the batch that reads it is a one-line error naming shard and token."""
    data_dir, _ = _copy_prepared(token_dir, tmp_path / "d")
    for name, position in (("train_000000.bin", None), ("val_000000.bin", 50)):
        tokens = np.memmap(os.path.join(data_dir, name), dtype="<u2", mode="r+", offset=HEADER_BYTES)
        tokens[slice(None) if position is None else position] = 300
        tokens.flush()
    dataset = TokenDataset(data_dir)
    sampler = BatchSampler(dataset, "train", batch_size=4, seq_len=8, seed=0)
    with pytest.raises(ValueError) as excinfo:
        for _ in range(20):
            sampler.next_batch()
    assert re.fullmatch(rf"shard {re.escape(data_dir)}/train_000000\.bin holds token id 300 at token \d+, "
                        r"outside its vocab of 257; prepare the data again", _one_line(excinfo))
    with pytest.raises(ValueError) as excinfo:
        list(iter_eval_batches(dataset, "val", 2, 16))
    assert _one_line(excinfo) == (f"shard {data_dir}/val_000000.bin holds token id 300 at token 50, outside its "
                                  "vocab of 257; prepare the data again")


def test_shard_with_trailing_bytes_or_a_negative_count_is_refused(tmp_path):
    """A shard longer than its header says, or with a negative token count, is a one-line
    error. Kills: the trailing-bytes check left out (extra bytes read as tokens of nothing)."""
    path = str(tmp_path / "s.bin")
    write_shard(path, np.arange(10), vocab_size=257)
    with open(path, "ab") as f:
        f.write(b"\0\0\0")
    with pytest.raises(ValueError, match=r"has 3 trailing bytes after its 10 tokens"):
        read_shard(path)
    write_shard(path, np.arange(10), vocab_size=257)
    _corrupt_header(path, 2, -1)
    with pytest.raises(ValueError, match=r"negative token count -1"):
        read_shard(path)


def test_an_id_equal_to_the_vocab_size_is_outside_it(tmp_path, token_dir):
    """Token id 257 in a vocab of 257 (one past the last id, the off-by-one a damaged shard
    is most likely to hold) is named by both the training batch and the eval slice that read
    it. Kills `>= vocab_size` -> `> vocab_size` in BatchSampler.next_batch and
    TokenDataset.check_ids (id 300 alone does not)."""
    data_dir, _ = _copy_prepared(token_dir, tmp_path / "d")
    for name in ("train_000000.bin", "train_000001.bin", "train_000002.bin", "val_000000.bin"):
        tokens = np.memmap(os.path.join(data_dir, name), dtype="<u2", mode="r+", offset=HEADER_BYTES)
        tokens[:] = 257
        tokens.flush()
    dataset = TokenDataset(data_dir)
    with pytest.raises(ValueError, match=r"holds token id 257 at token \d+, outside its vocab of 257"):
        BatchSampler(dataset, "train", batch_size=2, seq_len=8, seed=0).next_batch()
    with pytest.raises(ValueError, match=r"val_000000\.bin holds token id 257 at token 0, outside its vocab of 257"):
        next(iter_eval_batches(dataset, "val", 2, 16))


def test_eval_batches_score_a_tail_of_one_target(tmp_path):
    """A split of 2 * 8 + 2 tokens in windows of 8: two full rows, then a tail of 2 tokens
    (one target) that comes as a [1, 1] batch, so every token after the first is a target once.
    Kills the tail kept only from 2 targets up (`> 2` for `>= 2`)."""
    data_dir, _ = _windows_dir(tmp_path, [18], seq_len=8)
    dataset = TokenDataset(data_dir)
    tokens = torch.from_numpy(dataset.tokens("train", 0, 18).astype(np.int64))
    batches = list(iter_eval_batches(dataset, "train", batch_size=4, seq_len=8))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 8), (1, 1)]
    assert torch.equal(torch.cat([y.flatten() for _, y in batches]), tokens[1:])
    assert torch.equal(batches[-1][0], tokens[16:17][None]) and torch.equal(batches[-1][1], tokens[17:18][None])


def test_global_window_starts_names_the_rows_of_that_steps_batch(token_dir):
    """global_window_starts(s) is the batch of step s whatever step the sampler is at: the
    rows next_batch returns at step s start where it says. Kills drawing from the sampler's
    current step instead of the `step` asked for."""
    dataset = TokenDataset(token_dir)
    sampler = BatchSampler(dataset, "train", batch_size=4, seq_len=16, seed=2)
    planned = [sampler.global_window_starts(s) for s in range(3)]
    for s in range(3):
        x, y = sampler.next_batch()
        for (shard, offset), row, target in zip(planned[s], x, y):
            window = np.asarray(dataset.shards["train"][shard][offset:offset + 17]).astype(np.int64)
            assert torch.equal(row, torch.from_numpy(window[:-1])) and torch.equal(target, torch.from_numpy(window[1:]))
    assert sampler.global_window_starts(0) == planned[0]


def test_the_val_split_depends_on_the_seed_and_holds_its_fraction():
    """is_val_document over 4000 documents: about val_fraction of them (0.25 +- 0.03) are val,
    for each seed, and seeds 0 and 1 pick different documents (prepare's --seed re-draws the
    split). Kills the seed left out of the hash."""
    picks = {seed: [i for i in range(4000) if is_val_document(i, seed, 0.25)] for seed in (0, 1)}
    assert all(0.22 < len(p) / 4000 < 0.28 for p in picks.values()), {k: len(v) for k, v in picks.items()}
    overlap = len(set(picks[0]) & set(picks[1])) / len(picks[0])
    assert overlap < 0.4, overlap                         # independent draws share ~25 %


def test_shard_vocab_bounds_are_inclusive_of_65536_and_exclusive_of_0(tmp_path):
    """uint16 shards hold ids 0..65535, so a vocab of 65536 is written and read back, 65537 is
    refused by write_shard, and a header declaring vocab 0 is refused by read_shard. Kills the
    limits off by one (`> MAX_VOCAB + 1`, `0 <= vocab_size`)."""
    path = str(tmp_path / "s.bin")
    write_shard(path, [0, 65535], vocab_size=65536)
    assert read_shard(path).tolist() == [0, 65535]
    with pytest.raises(ValueError, match="vocab of 65537 does not fit uint16 shards"):
        write_shard(path, [1, 2], vocab_size=65537)
    write_shard(path, [1, 2], vocab_size=257)
    _corrupt_header(path, 3, 0)
    with pytest.raises(ValueError, match=r"declares vocab 0, outside 1\.\.65536"):
        read_shard(path)


def test_write_shard_refuses_more_tokens_than_its_header_can_count(tmp_path):
    """The header counts tokens in an int32: a shard of 2**31 tokens (--shard-tokens 3e9) was
    an OverflowError from numpy after the whole range scan, hours into a preparation. Now a
    one-line ValueError before any scan (the zero-stride array costs no memory)."""
    from data.shards import MAX_SHARD_TOKENS
    assert MAX_SHARD_TOKENS == 2**31 - 1
    with pytest.raises(ValueError, match=r"a shard holds at most 2147483647 tokens \(its header's int32 count\), "
                                         r"got 2147483648: use a smaller --shard-tokens"):
        write_shard(str(tmp_path / "s.bin"), np.broadcast_to(np.uint16(0), (2**31,)), vocab_size=257)
    assert os.listdir(tmp_path) == []


def test_eval_batches_refuse_a_max_batches_below_one(token_dir):
    """max_batches=-1 silently dropped the last batch (a list slice), 0 scored nothing, and
    seq_len=0 was a ZeroDivisionError. Kills the checks left out."""
    dataset = TokenDataset(token_dir)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"max_batches must be positive \(or None for the whole split\), "
                                             rf"got {bad}"):
            list(iter_eval_batches(dataset, "train", 4, 32, max_batches=bad))
    with pytest.raises(ValueError, match=r"batch_size and seq_len must be positive, got 4 and 0"):
        list(iter_eval_batches(dataset, "train", 4, 0))     # was a ZeroDivisionError
    assert len(list(iter_eval_batches(dataset, "train", 4, 32, max_batches=10**6))) == 8   # more than there are


OPEN_FILES_CHILD = """
import resource, sys
soft, hard = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard if hard > 0 else resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from data.loader import BatchSampler, TokenDataset
try:
    dataset = TokenDataset(sys.argv[1])
except ValueError as e:
    print("error:", e)
    sys.exit(0)
BatchSampler(dataset, "train", 8, 16, seed=0).next_batch()
open(sys.argv[1] + "/meta.json").close()              # a file opened after the dataset
print("soft limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_a_dataset_of_more_shards_than_the_open_file_limit_opens(tmp_path):
    """Each shard's memmap keeps a file descriptor open: 100 shards under a soft limit of 64
    open files was "OSError: [Errno 24] Too many open files" (at the defaults: 1,000 shards of
    100M tokens under 1,024). TokenDataset now raises the soft limit as the hard one allows,
    and names the shard count and `ulimit -Hn` when the hard one is too low. Kills the limit
    left alone."""
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 400:
        pytest.skip(f"hard open-file limit {hard} is too low for this test")
    names = [f"train_{i:06d}.bin" for i in range(100)]
    for name in names + ["val_000000.bin"]:
        write_shard(str(tmp_path / name), np.arange(20), 257)
    meta = {"format_version": 1, "tokenizer": "bytes", "vocab_size": 257, "eot_id": 256, "source": "synthetic",
            "splits": {"train": {"tokens": 2000, "bytes": 1, "shards": names},
                       "val": {"tokens": 20, "bytes": 1, "shards": ["val_000000.bin"]}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    def child(soft, hard):
        result = subprocess.run([sys.executable, "-c", OPEN_FILES_CHILD, str(tmp_path), str(soft), str(hard)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip().splitlines()[-1]

    assert child(64, 400) == "soft limit 400"                  # the hard limit: 101 shards + 256 fit
    assert child(64, 64) == (f"error: {tmp_path} has 101 shards, each kept open, but this process may open at "
                             "most 64 files (ulimit -Hn): raise the limit, or prepare the data again with a "
                             "larger --shard-tokens")
