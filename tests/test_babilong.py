"""BABILong: construction, official + label-ranking scores, streaming evaluation, CLI."""
import json
import math
import os
import re

import pytest
import torch
from conftest import SHARED_DATA

from eval.babilong import (AUSTEN_BOOKS, PROMPT_RESERVE, build_babilong, compare_answers, evaluate, format_prompt,
                           finetune, labels_in_question, length_tokenizer, length_tokens, load_babilong_hf, load_books,
                           main, plot_heatmap, sentence_splitter, split_sentences, training_example)
from helpers import RiggedByteModel, needs_data, save_tiny_checkpoint


@pytest.fixture(scope="module")
def gpt2():
    return length_tokenizer(SHARED_DATA)


def _collapse(text):
    return re.sub(r"\s+", " ", text)


def test_length_labels():
    assert [length_tokens(x) for x in ("0k", "1k", "128k", "1M")] == [0, 1000, 128000, 1_000_000]
    for bad in ("4", "k4", "4g", ""):
        with pytest.raises(ValueError, match="bad BABILong length"):
            length_tokens(bad)
    # past 100M tokens building a sample exhausted memory without a word (9999999999k hung)
    assert length_tokens("100M") == 100_000_000
    with pytest.raises(ValueError, match=r"^BABILong length '9999999999k' is past the 100M tokens allowed$"):
        length_tokens("9999999999k")


def test_sentence_splitter_keeps_titles(monkeypatch):
    """The regex splitter (the one used without nltk), chosen explicitly so the test passes
    whether nltk is installed or not."""
    import eval.babilong as babilong
    monkeypatch.setattr(babilong, "_nltk_punkt", lambda: (None, "regex"))
    assert split_sentences('Mr. Darcy bowed.  "Indeed!" said\nshe. Was it so? yes.') == \
        ['Mr. Darcy bowed.', '"Indeed!" said she.', 'Was it so? yes.']


@needs_data
@pytest.mark.parametrize("task,length", [("qa1", "1k"), ("qa2", "4k"), ("qa5", "2k")])
def test_construction_length_and_fact_order(gpt2, task, length):
    samples = build_babilong(task, length, 3, data_dir=SHARED_DATA, gpt2=gpt2)
    assert len(samples) == 3
    for sample in samples:
        budget = length_tokens(length) - PROMPT_RESERVE
        assert sample["n_tokens"] == budget
        assert abs(len(gpt2.encode(sample["input"])) - budget) <= 3     # re-tokenised text
        position = 0                                                   # facts present, in order
        for fact in sample["facts"]:
            found = sample["input"].find(fact, position)
            assert found >= 0, fact
            position = found + len(fact)
        assert set(sample["books"]) <= set(AUSTEN_BOOKS["test"])
    # a different sample draws different background
    assert samples[0]["input"][:200] != samples[1]["input"][:200]


@needs_data
def test_zero_k_is_the_facts_alone_and_construction_is_deterministic(gpt2):
    first = build_babilong("qa1", "0k", 2, data_dir=SHARED_DATA, gpt2=gpt2)
    assert first[0]["input"] == "John travelled to the hallway. Mary journeyed to the bathroom."   # qa1 test story 1
    assert first[0]["target"] == "hallway"
    assert build_babilong("qa3", "1k", 2, data_dir=SHARED_DATA, gpt2=gpt2) == \
        build_babilong("qa3", "1k", 2, data_dir=SHARED_DATA, gpt2=gpt2)


@needs_data
def test_train_and_test_books_are_disjoint(gpt2):
    for background in ("austen", "builtin"):
        train = dict(load_books(background, "train", SHARED_DATA))
        test = dict(load_books(background, "test", SHARED_DATA))
        assert train and test and not set(train) & set(test)
    train_books = [_collapse(t) for _, t in load_books("austen", "train", SHARED_DATA)]
    test_books = [_collapse(t) for _, t in load_books("austen", "test", SHARED_DATA)]
    sample = build_babilong("qa1", "1k", 1, split="train", data_dir=SHARED_DATA, gpt2=gpt2)[0]
    assert set(sample["books"]) <= set(AUSTEN_BOOKS["train"])
    background = max(split_sentences(sample["input"])[1:-1], key=len)[:60]
    assert any(background in book for book in train_books)
    assert not any(background in book for book in test_books)


def test_compare_answers_documented_rule():
    labels = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
    q = "Where is Mary?"
    assert compare_answers("bathroom", "The most recent location of Mary is bathroom.", q, labels)
    assert compare_answers("bathroom", "Bathroom", q, labels)                       # case-insensitive
    assert not compare_answers("bathroom", "bathroom or kitchen", q, labels)        # two labels
    assert compare_answers("bathroom", "bathroom. Then the kitchen.", q, labels)    # first sentence only
    assert not compare_answers("bathroom", "<example> bathroom", q, labels)          # a new example starts
    assert not compare_answers("bathroom", "I do not know", q, labels)
    # labels named in the question never count
    q3 = "Where was the apple before the kitchen?"
    assert compare_answers("bathroom", "Before the kitchen the apple was in the bathroom.", q3, labels)
    qa5 = ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"]
    assert compare_answers("Fred", "Fred gave it to Jeff", "Who gave the football to Jeff?", qa5)
    assert not compare_answers("Fred", "Jeff", "Who gave the football to Jeff?", qa5)


def test_official_prompt_template():
    bare = format_prompt(" A. B. ", "Where is Mary?", "qa1")
    assert bare == "<context>\nA. B.\n</context>\n\nQuestion: Where is Mary?"
    full = format_prompt("A.", "Where is Mary?", "qa1", instruction=True, examples=True, post_prompt=True)
    assert full.startswith("I will give you context") and "<example>" in full
    assert full.endswith("</context>\n\nQuestion: Where is Mary?")


def _samples():
    facts = ["Mary went to the kitchen.", "John moved to the office."]
    return [{"task": "qa1", "input": " ".join(facts), "question": "Where is Mary?", "target": "kitchen"},
            {"task": "qa1", "input": " ".join(facts), "question": "Where is John?", "target": "office"}]


def test_both_scores_follow_a_rigged_model():
    from data.tokenizer import get_tokenizer
    result = evaluate(RiggedByteModel(": kitchen."), get_tokenizer("bytes"), _samples(), streaming=True, segment_len=16)
    first, second = result["records"]
    assert first["label_ranking_prediction"] == second["label_ranking_prediction"] == "kitchen"
    assert first["output"] == " kitchen."
    assert (first["official_correct"], second["official_correct"]) == (True, False)
    assert result["official"] == result["label_ranking"] == 0.5


def _tiny_transformer(seed=0):
    from model import build_model
    torch.manual_seed(seed)
    return build_model({"arch": "transformer", "vocab_size": 257, "d_model": 32, "n_layer": 2, "n_head": 2})


def test_streaming_matches_one_call():
    from data.tokenizer import get_tokenizer
    model, tok = _tiny_transformer(), get_tokenizer("bytes")
    kwargs = dict(streaming=True, max_new_tokens=6)
    streamed = evaluate(model, tok, _samples(), segment_len=13, **kwargs)
    whole = evaluate(model, tok, _samples(), segment_len=10**6, **kwargs)
    for a, b in zip(streamed["records"], whole["records"]):
        assert a["output"] == b["output"]
        for label, value in a["label_logprobs"].items():
            assert value == pytest.approx(b["label_logprobs"][label], abs=1e-4)
    assert "streamed" in streamed["context_handling"]


def test_attention_models_truncate_or_skip_beyond_max_len():
    from data.tokenizer import get_tokenizer
    model, tok = _tiny_transformer(), get_tokenizer("bytes")
    with pytest.raises(ValueError, match="max_len"):
        evaluate(model, tok, _samples())
    truncated = evaluate(model, tok, _samples(), max_len=40, max_new_tokens=4)
    assert truncated["n_truncated"] == 2 and "truncated" in truncated["context_handling"]
    skipped = evaluate(model, tok, _samples(), max_len=40, overflow="skip", max_new_tokens=4)
    assert skipped["n_skipped"] == 2 and skipped["official"] is None
    fits = evaluate(model, tok, _samples(), max_len=4096, max_new_tokens=4)
    assert fits["n_truncated"] == fits["n_skipped"] == 0


def test_heatmap_written(tmp_path):
    results = {"official": {"qa1": {"0k": 0.5, "1k": 0.25}, "qa2": {"0k": 1.0, "1k": None}},
               "label_ranking": {"qa1": {"0k": 0.75, "1k": 0.5}, "qa2": {"0k": 0.5, "1k": 0.0}}}
    path = plot_heatmap(results, str(tmp_path / "heat.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_hub_loader_fails_clearly_offline(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="RMT-team/babilong.*use --source local"):
        load_babilong_hf("qa1", "0k", limit=2)
    with pytest.raises(ValueError, match="unknown bAbI task"):
        load_babilong_hf("qa9x", "0k")


def test_hub_loader_reads_no_row_past_the_limit(monkeypatch):
    """A 1M row is ~4 MB: the loader pulled row limit + 1 from the stream before stopping."""
    datasets = pytest.importorskip("datasets")
    import eval.babilong as bl
    pulled = []

    def rows(*args, **kwargs):
        for i in range(10):
            pulled.append(i)
            yield {"input": f"context {i}", "question": "Where is Mary?", "target": "kitchen"}
    monkeypatch.setattr(datasets, "load_dataset", rows)
    monkeypatch.setattr(bl, "check_hub", lambda streaming=False: None)
    assert [s["input"] for s in load_babilong_hf("qa1", "1M", limit=3)] == ["context 0", "context 1", "context 2"]
    assert pulled == [0, 1, 2]
    assert len(load_babilong_hf("qa1", "1M")) == 10

def test_training_example_puts_loss_on_the_answer_only():
    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("bytes")
    sample = {"task": "qa1", "input": "Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"}
    ids, targets = training_example(tok, sample)
    answer = tok.encode(" kitchen") + [tok.eot_id]
    assert ids[-len(answer):] == answer and len(ids) == len(targets)
    assert [t for t in targets if t != -1] == answer
    # targets[t] is the token after ids[t]
    assert all(targets[i] == ids[i + 1] for i in range(len(ids) - 1) if targets[i] != -1)
    short_ids, short_targets = training_example(tok, sample, max_len=20)
    assert len(short_ids) == 20 and [t for t in short_targets if t != -1] == answer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("babilong_ckpt"))


@needs_data
def test_finetune_cli_runs_two_steps(tiny_checkpoint, tmp_path, monkeypatch):
    from checkpoint import load_model
    monkeypatch.setenv("NL_DATA_DIR", SHARED_DATA)
    out = str(tmp_path / "ft")
    main(["finetune", "--checkpoint", tiny_checkpoint, "--tasks", "qa1,qa2", "--lengths", "1k,0k", "--steps", "2",
          "--batch-size", "2", "--out", out, "--device", "cpu"])
    before, _ = load_model(tiny_checkpoint)
    after, cfg = load_model(out)
    assert cfg.train.out_dir == out
    with open(os.path.join(out, "finetune_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [entry["length"] for entry in log] == ["0k", "1k"]          # curriculum: shortest first
    assert all(entry["answer_tokens"] > 0 and entry["loss"] > 0 for entry in log)
    changed = any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert changed


@needs_data
def test_eval_and_niah_score_at_the_precision_the_run_trained_in(tiny_checkpoint, tmp_path, monkeypatch):
    """The fine-tune computes as train.py trained (train.dtype), but eval.babilong and eval.niah
    scored in bf16 on CUDA whatever the config: a float32 run's scores were bf16's. Both CLIs
    (and eval.run's sections) now pass the checkpoint's train.dtype to the scorer."""
    import shutil

    import eval.babilong as bl
    import eval.niah as niah
    run = shutil.copytree(tiny_checkpoint, str(tmp_path / "run"))
    path = os.path.join(run, "checkpoints", "step_000000", "config.yaml")
    with open(path) as f:
        text = f.read()
    assert "dtype: auto" in text
    with open(path, "w") as f:
        f.write(text.replace("dtype: auto", "dtype: float32"))
    monkeypatch.setenv("NL_DATA_DIR", SHARED_DATA)
    seen = []

    def scorer(*args, dtype="auto", **kwargs):
        seen.append(dtype)
        raise KeyboardInterrupt                 # the dtype is all this test needs
    monkeypatch.setattr(bl, "evaluate", scorer)
    monkeypatch.setattr(niah, "evaluate_niah", scorer)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["eval", "--checkpoint", run, "--tasks", "qa1", "--lengths", "0k", "--samples", "1",
              "--out", str(tmp_path / "bl"), "--device", "cpu"])
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        niah.main(["--checkpoint", run, "--tasks", "1", "--lengths", "512", "--samples", "1", "--max-new-tokens", "4",
                   "--device", "cpu", "--out", str(tmp_path / "niah")])
    assert seen == ["float32", "float32"]


def test_finetune_on_a_babi_file_without_questions_is_an_error(tiny_checkpoint, tmp_path, capsys):
    """Its endless passes used to spin (10**9 empty rounds) instead of yielding a question."""
    data_dir = tmp_path / "data"
    (data_dir / "babi" / "en").mkdir(parents=True)
    (data_dir / "babi" / "en" / "qa1_single-supporting-fact_train.txt").write_text("1 Mary went to the office.\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--checkpoint", tiny_checkpoint, "--tasks", "qa1", "--lengths", "0k", "--steps", "1",
              "--babi", "file", "--background", "builtin", "--data-dir", str(data_dir), "--out", str(tmp_path / "ft"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "qa1_single-supporting-fact_train.txt holds no questions" in capsys.readouterr().err


@needs_data
def test_eval_cli_writes_json_and_heatmap(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NL_DATA_DIR", SHARED_DATA)
    out = str(tmp_path / "eval")
    main(["eval", "--checkpoint", tiny_checkpoint, "--tasks", "qa1,qa4", "--lengths", "0k,1k", "--samples", "2",
          "--out", out, "--device", "cpu", "--max-new-tokens", "3"])
    with open(os.path.join(out, "babilong.json")) as f:
        results = json.load(f)
    assert set(results["official"]) == {"qa1", "qa4"} and set(results["official"]["qa1"]) == {"0k", "1k"}
    assert all(0 <= v <= 1 for cells in results["label_ranking"].values() for v in cells.values())
    assert results["counts"]["qa1"]["1k"]["n_truncated"] == 2             # 1k GPT-2 tokens > 256 bytes
    assert results["sentence_splitter"] == sentence_splitter()
    assert "not named in the question" in results["scores"]["label_ranking"]
    assert "truncated" in results["context_handling"]
    assert os.path.getsize(os.path.join(out, "babilong_heatmap.png")) > 1000
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", tiny_checkpoint, "--lengths", "3x", "--out", out])
    assert exit_info.value.code == 2 and "error: bad BABILong length" in capsys.readouterr().err


def _tree(path):
    """{relative path: (size, mtime)} of every file under path."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = (os.path.getsize(full), os.path.getmtime(full))
    return out


def test_finetune_refuses_an_out_that_holds_checkpoints(tmp_path, capsys):
    """--out the pretraining run (or its checkpoints/ root, or a checkpoint) would have its
    checkpoints replaced or pruned: refused in one line before anything is loaded or written."""
    base = save_tiny_checkpoint(tmp_path / "base")
    before = _tree(base)
    for out in (base, os.path.join(base, "checkpoints"), os.path.join(base, "checkpoints", "step_000000")):
        with pytest.raises(SystemExit) as exit_info:
            main(["finetune", "--checkpoint", base, "--tasks", "qa1", "--lengths", "0k", "--steps", "2",
                  "--out", out, "--device", "cpu"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: --out {out} already holds checkpoints; choose another folder\n"
    assert _tree(base) == before
    with pytest.raises(ValueError, match="already holds checkpoints"):            # the library function too
        finetune(None, None, None, ["qa1"], ["0k"], 2, base)
    # --max-len 1 kept no answer target: every step's loss was 0/0, skipped as "non-finite"
    with pytest.raises(ValueError, match=r"^--max-len must be >= 2 to keep an answer token to train on, got 1$"):
        finetune(None, None, None, ["qa1"], ["0k"], 2, str(tmp_path / "new"), max_len=1)
    assert _tree(base) == before


@pytest.mark.parametrize("argv, message", [
    (["eval", "--max-len", "0"], "argument --max-len: must be >= 1, got 0"),
    (["eval", "--max-len", "-5"], "argument --max-len: must be >= 1, got -5"),
    (["eval", "--segment-len", "0"], "argument --segment-len: must be >= 1"),
    (["eval", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (["eval", "--samples", "0"], "argument --samples: must be >= 1"),
    (["finetune", "--steps", "2", "--max-len", "0"], "argument --max-len: must be >= 1, got 0"),
    (["finetune", "--steps", "2", "--lr", "-1"], "argument --lr: must be > 0"),
    (["finetune", "--steps", "2", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["finetune", "--steps", "-3"], "argument --steps: must be >= 1"),
])
def test_cli_bad_numbers_name_their_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_cli_checks_out_before_loading(tmp_path, monkeypatch, capsys):
    """A bad --out is found before the checkpoint is loaded (not after a long eval)."""
    import eval.babilong as babilong
    import eval.common
    for module in (babilong, eval.common):          # finetune loads here, eval through load_for_generation
        monkeypatch.setattr(module, "load_checkpoint", lambda *a: pytest.fail("loaded before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for argv, message in ((["eval", "--out", str(a_file)], "is a file, not a folder"),
                          (["finetune", "--steps", "2", "--out", str(a_file)], "is a file, not a folder"),
                          (["finetune", "--steps", "2", "--out", str(a_file / "ft")], "is not a folder"),
                          (["build", "--out", str(tmp_path)], "is a folder; give a file name"),
                          (["build", "--out", str(a_file / "b.jsonl")], "is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ([] if argv[0] == "build" else ["--checkpoint", "ckpt"]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: --out ") and message in err
    assert a_file.read_text() == "keep me"


def test_build_replaces_out_only_when_it_succeeds(tmp_path, monkeypatch, capsys):
    import eval.babilong as babilong
    monkeypatch.setattr(babilong, "length_tokenizer", lambda data_dir: None)

    def build(task, length, n, **kw):
        if length == "1k":
            raise ValueError("only 0 qa1 questions of the bAbI test data fit in 1k; asked for 1")
        return [{"task": task, "length": length}] * n
    monkeypatch.setattr(babilong, "build_babilong", build)
    out = tmp_path / "samples.jsonl"
    out.write_text("earlier samples\n")
    with pytest.raises(SystemExit):
        main(["build", "--tasks", "qa1", "--lengths", "0k,1k", "--samples", "1", "--out", str(out)])
    assert "error: only 0 qa1" in capsys.readouterr().err
    assert out.read_text() == "earlier samples\n" and os.listdir(tmp_path) == ["samples.jsonl"]
    new = tmp_path / "new" / "s.jsonl"                      # its folder is made
    main(["build", "--tasks", "qa1,qa2", "--lengths", "0k", "--samples", "2", "--out", str(new)])
    assert [json.loads(line)["task"] for line in new.read_text().splitlines()] == ["qa1", "qa1", "qa2", "qa2"]
    assert os.listdir(new.parent) == ["s.jsonl"]


def _state_numel(state):
    if torch.is_tensor(state):
        return state.numel()
    if isinstance(state, dict):
        return sum(_state_numel(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_numel(v) for v in state)
    return 0


def test_recurrent_models_stream_with_flat_state():
    """Titans-LMM: any length is streamed (no max_len needed), streaming equals one call,
    and the carried state does not grow with the length (flat memory to 1M tokens)."""
    from data.tokenizer import get_tokenizer
    from eval.common import is_recurrent
    from model import build_model
    torch.manual_seed(0)
    model = build_model({"arch": "titans", "vocab_size": 257, "d_model": 32, "n_layer": 2, "n_head": 2,
                         "titans": {"variant": "lmm", "chunk_size": 4}}).eval()
    tok = get_tokenizer("bytes")
    assert is_recurrent(model)
    streamed = evaluate(model, tok, _samples(), segment_len=7, max_new_tokens=3)
    whole = evaluate(model, tok, _samples(), segment_len=10**6, max_new_tokens=3)
    assert "streamed" in streamed["context_handling"]
    for a, b in zip(streamed["records"], whole["records"]):
        assert a["output"] == b["output"]
        for label, value in a["label_logprobs"].items():
            assert value == pytest.approx(b["label_logprobs"][label], abs=1e-4)
    sizes = []
    with torch.no_grad():
        for length in (40, 400):
            _, _, state = model(torch.randint(0, 257, (1, length)))
            sizes.append(_state_numel(state))
    assert sizes[0] == sizes[1]


# -----------------------------------------------------------------------------
# scores by hand, the official rule inside evaluate, construction details

def test_label_logprobs_are_those_of_space_label_after_the_prompt():
    """label_ranking scores log p(" " + label | prompt + "\\nAnswer:"), summed over its tokens.
    RiggedByteModel(": kitchen.") puts logit 10 on one byte after each of its bytes, 0 on the
    other 256: hi = 10 - log(e^10 + 256) for that byte, lo = -log(e^10 + 256) for another,
    u = -log 257 after a byte it does not know. Kills scoring the label without its space."""
    import math
    from data.tokenizer import get_tokenizer
    result = evaluate(RiggedByteModel(": kitchen."), get_tokenizer("bytes"), _samples()[:1], streaming=True,
                      segment_len=16, max_new_tokens=3)
    hi, lo, u = 10 - math.log(math.exp(10) + 256), -math.log(math.exp(10) + 256), -math.log(257)
    scores = result["records"][0]["label_logprobs"]
    assert scores["kitchen"] == pytest.approx(8 * hi, abs=1e-4)                    # ' ' k i t c h e n
    # ' '|':' hi, 'o'|' ' lo, 'f'|'o' 'f'|'f' 'i'|'f' u, 'c'|'i' lo, 'e'|'c' lo
    assert scores["office"] == pytest.approx(hi + 3 * lo + 3 * u, abs=1e-4)


def test_official_score_in_evaluate_ignores_labels_named_in_the_question():
    """evaluate passes the sample's question to compare_answers: a qa3 answer naming the
    question's location ('kitchen') and the target ('garden') is correct. Kills scoring the
    output without the question (both labels would count)."""
    from data.tokenizer import get_tokenizer
    sample = {"task": "qa3", "input": "Mary took the apple. Mary went to the garden. Mary went to the kitchen.",
              "question": "Where was the apple before the kitchen?", "target": "garden"}
    result = evaluate(RiggedByteModel(": kitchengarden"), get_tokenizer("bytes"), [sample], streaming=True,
                      segment_len=64, max_new_tokens=14)
    record = result["records"][0]
    assert record["output"] == " kitchengarden" and record["official_correct"] and result["official"] == 1.0


def test_label_ranking_leaves_out_labels_named_in_the_question():
    """metrics.py: "mentions in questions are never targets", so label ranking ranks only the
    labels the question does not name (labels_in_question, compare_answers' rule). A rigged
    model that likes 'kitchen' best, then 'garden', on a qa3 question naming the kitchen:
    ranked 'garden', right (the official score finds only the named label: wrong). Kills
    ranking over every task label."""
    from data.tokenizer import get_tokenizer
    sample = {"task": "qa3", "input": "Mary took the apple. Mary went to the garden. Mary went to the kitchen.",
              "question": "Where was the apple before the kitchen?", "target": "garden"}
    result = evaluate(RiggedByteModel(": kitchen.garden"), get_tokenizer("bytes"), [sample], streaming=True,
                      segment_len=64, max_new_tokens=10)
    record = result["records"][0]
    assert record["output"] == " kitchen." and not record["official_correct"]
    assert record["label_ranking_prediction"] == "garden" and result["label_ranking"] == 1.0
    assert set(record["label_logprobs"]) == {"bathroom", "bedroom", "garden", "hallway", "office"}
    qa5 = ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"]
    assert labels_in_question("Who gave the football to Jeff?", qa5) == {"football", "jeff"}


@needs_data
def test_the_sentence_splitter_is_recorded(gpt2, tmp_path, monkeypatch, capsys):
    """Punkt (nltk installed) and the regex splitter cut the background differently, so each
    built sample (None at 0k: no background), the build output and babilong.json (the eval
    CLI test) name the splitter. Kills leaving it unrecorded."""
    import eval.babilong as babilong

    class FakePunkt:
        def tokenize(self, text):
            return re.split(r"(?<=[.!?]) ", text)
    monkeypatch.setattr(babilong, "_nltk_punkt", lambda: (FakePunkt(), "nltk-punkt 9.9"))
    assert sentence_splitter() == "nltk-punkt 9.9"
    zero_k, one_k = (build_babilong("qa1", length, 1, background="builtin", data_dir=SHARED_DATA, gpt2=gpt2)[0]
                     for length in ("0k", "1k"))
    assert (zero_k["splitter"], one_k["splitter"]) == (None, "nltk-punkt 9.9")
    monkeypatch.setattr(babilong, "_nltk_punkt", lambda: (None, "regex"))
    out = tmp_path / "s.jsonl"
    main(["build", "--tasks", "qa1", "--lengths", "1k", "--samples", "1", "--background", "builtin",
          "--data-dir", SHARED_DATA, "--out", str(out)])
    assert capsys.readouterr().out == f"wrote 1 samples to {out} (background sentences split by regex)\n"
    assert json.loads(out.read_text())["splitter"] == "regex"


def test_compare_answers_cuts_where_a_new_context_starts():
    """BABILong's preprocess_output also cuts at '<context>' (the model starting a new sample).
    Kills dropping '<context>' from the markers."""
    labels = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
    assert not compare_answers("kitchen", "<context> kitchen", "Where is Mary?", labels)
    assert compare_answers("kitchen", "kitchen <context> office", "Where is Mary?", labels)


def test_mean_over_tasks_averages_the_scored_tasks_of_each_length_and_says_how_many():
    """The leaderboard row: per length, the mean over tasks with a score; a cell with nothing
    scored (None, every input skipped) is left out, not counted as 0, and not silently:
    n_tasks_in_mean counts the tasks in each mean, and a note names the lengths whose mean
    leaves tasks out. Kills dividing by the number of tasks, and a 1k mean of one task read
    as the mean over qa1-qa2."""
    from eval.babilong import _summarise
    counts = {"n": 2, "n_scored": 2, "n_truncated": 0, "n_skipped": 0, "mean_input_tokens": 10.0,
              "peak_memory_mb": None, "seconds": 0.1}
    per_cell = {("qa1", "0k"): {"official": 0.5, "label_ranking": 1.0, **counts},
                ("qa2", "0k"): {"official": 0.0, "label_ranking": 0.5, **counts},
                ("qa1", "1k"): {"official": 1.0, "label_ranking": 0.25, **counts},
                ("qa2", "1k"): {"official": None, "label_ranking": None, **counts}}
    table = _summarise(per_cell)
    assert table["mean_over_tasks"] == {"official": {"0k": 0.25, "1k": 1.0}, "label_ranking": {"0k": 0.75, "1k": 0.25}}
    assert table["official"] == {"qa1": {"0k": 0.5, "1k": 1.0}, "qa2": {"0k": 0.0, "1k": None}}
    assert table["n_tasks_in_mean"] == {"official": {"0k": 2, "1k": 1}, "label_ranking": {"0k": 2, "1k": 1}}
    assert table["notes"] == ["mean_over_tasks averages only the tasks with a scored sample (the others had every "
                              "input skipped): official 1k: 1 of 2; label_ranking 1k: 1 of 2"]
    complete = _summarise({key: r for key, r in per_cell.items() if key[1] == "0k"})
    assert complete["n_tasks_in_mean"]["official"] == {"0k": 2} and complete["notes"] == []


def test_label_ranking_compares_with_the_target_ignoring_case_and_spaces():
    """The ranked label (TASK_LABELS, lower case) against a target written 'Garden ': right,
    as compare_answers would judge it. Kills a case-sensitive comparison."""
    from data.tokenizer import get_tokenizer
    from eval.babilong import same_answer
    sample = {"task": "qa3", "input": "Mary took the apple. Mary went to the garden. Mary went to the kitchen.",
              "question": "Where was the apple before the kitchen?", "target": "Garden "}
    result = evaluate(RiggedByteModel(": kitchen.garden"), get_tokenizer("bytes"), [sample], streaming=True,
                      segment_len=64, max_new_tokens=10)
    record = result["records"][0]
    assert record["label_ranking_prediction"] == "garden" and record["label_ranking_correct"]
    assert result["label_ranking"] == 1.0
    assert not same_answer(None, "garden") and not same_answer("kitchen", "Garden")


def test_hide_facts_can_follow_the_last_background_sentence():
    """Each fact goes to one of len(background) + 1 gaps, the last one after all the background
    (NoiseInjectionDataset), facts in order. A stub rng that always draws the last gap puts
    every fact at the end. Kills drawing among len(background) gaps only."""
    from eval.babilong import hide_facts

    class LastGap:
        def randrange(self, n):
            return n - 1

    ids, gaps = hide_facts([[10], [11, 12]], [[1, 2], [3]], LastGap())
    assert gaps == [2, 2] and ids == [1, 2, 3, 10, 11, 12]


def test_make_sample_keeps_at_most_budget_over_8_minus_1_facts():
    """create_tasks.py passes max_n_facts = message_length // 8, message_length = length - 300,
    and get_dataset_df keeps a question when slc.shape[0] <= max_n_facts, its slice holding
    the facts and the question's row: at most 1k: 700 // 8 - 1 = 86 facts. Kills another cap
    (e.g. // 4) and counting the facts alone (87 kept)."""
    import random

    from data.tokenizer import get_tokenizer
    from eval.babilong import make_sample
    tok = get_tokenizer("bytes")                      # a stand-in for GPT-2: 3 tokens per fact

    class Sampler:
        used_books = set()

        def sample(self, n_tokens):                   # one background piece of n_tokens
            return [tok.encode("x" * n_tokens)]

    def item(n_facts):
        return {"question": "Where is Mary?", "answer": "garden", "facts": ["a."] * n_facts}
    assert make_sample(item(87), "qa1", "1k", tok, Sampler(), random.Random(0), "test") is None
    kept = make_sample(item(86), "qa1", "1k", tok, Sampler(), random.Random(0), "test")
    assert kept is not None and kept["n_tokens"] == 700


@pytest.mark.parametrize("command", [["build"], ["eval", "--checkpoint", "ckpt"],
                                     ["finetune", "--steps", "1", "--checkpoint", "ckpt"]])
def test_cli_data_dir_that_is_no_folder_is_named(command, tmp_path, capsys):
    """--data-dir /typo: one line naming it (not "needs the offline data folder: pass
    --data-dir", nor silently falling back to $NL_DATA_DIR where a command needs no file)."""
    out = tmp_path / ("b.jsonl" if command == ["build"] else "out")
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--data-dir", str(tmp_path / "typo"), "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --data-dir {tmp_path / 'typo'} is not a folder\n"
    assert os.listdir(tmp_path) == []


def test_check_enough_questions_counts_what_build_babilong_keeps(gpt2):
    """qa3's 1k cell: 137 of the 1000 test questions have too many facts (the 10th is the
    first); the check, from the facts alone, allows what build_babilong builds and names the
    shortfall as it would."""
    from eval.babilong import _babi_questions, check_enough_questions
    questions = _babi_questions("qa3", 10, "test", "file", 0, SHARED_DATA)
    kept = build_babilong("qa3", "1k", 10, data_dir=SHARED_DATA, gpt2=gpt2)
    assert [s["facts"] for s in kept] == [q["facts"] for q in questions[:9] + questions[10:11]]
    check_enough_questions("qa3", "1k", 863, data_dir=SHARED_DATA, gpt2=gpt2)
    with pytest.raises(ValueError) as e:
        check_enough_questions("qa3", "1k", 864, data_dir=SHARED_DATA, gpt2=gpt2)
    assert str(e.value) == "only 863 qa3 questions of the bAbI test data fit in 1k; asked for 864"


def test_cli_eval_checks_every_cell_has_its_samples_before_loading(tmp_path, monkeypatch, capsys):
    """Audit: a --samples beyond what a cell's bAbI data holds failed after the cells before it
    were scored; now before the checkpoint loads."""
    import eval.common
    monkeypatch.setattr(eval.common, "load_checkpoint", lambda *a: pytest.fail("loaded before the cells were checked"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", "ckpt", "--tasks", "qa1", "--lengths", "0k", "--samples", "1001",
              "--data-dir", SHARED_DATA, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: only 1000 qa1 questions of the bAbI test data fit in 0k; asked for 1001\n"


@needs_data
def test_finetune_skips_a_step_whose_gradient_is_not_finite(tmp_path):
    """A long BABILong example can overflow a recurrent model's backward (a 20-step quickstart
    HOPE gave inf / NaN gradients at 1k-2k): its step was applied anyway, through the clip's
    NaN factor, and the saved checkpoint held NaN weights. Such a step is skipped and logged,
    as train.py skips one."""
    from checkpoint import load_model
    model, cfg = load_model(save_tiny_checkpoint(tmp_path / "base"))
    from data.tokenizer import get_tokenizer
    calls = []

    def poison_second_step(grad):                  # the embedding's gradient of step 2 only
        calls.append(1)
        return torch.full_like(grad, float("nan")) if len(calls) == 2 else grad
    model.embed.weight.register_hook(poison_second_step)
    out = str(tmp_path / "ft")
    finetune(model, cfg, get_tokenizer("bytes"), ["qa1"], ["0k"], 3, out, batch_size=1, background="builtin",
             data_dir=SHARED_DATA, device="cpu")
    after, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in after.parameters())
    with open(os.path.join(out, "finetune_log.jsonl")) as f:      # strict JSON: no NaN or Infinity
        log = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the log")) for line in f]
    assert [entry["skipped"] for entry in log] == [False, True, False]
    # null for the skipped step's norm, as train.py's metrics.jsonl writes non-finite values
    assert log[1]["grad_norm"] is None and all(math.isfinite(log[i]["grad_norm"]) for i in (0, 2))


@needs_data
def test_finetune_log_softmax_reads_only_the_answer_rows(tmp_path, monkeypatch):
    """The loss took the log-softmax of every position ([T, vocab] in fp32, with its gradient)
    to keep only the answer's few: the cross-entropy now sees just the answer rows."""
    from checkpoint import load_model
    from data.tokenizer import get_tokenizer
    import eval.babilong as bl
    model, cfg = load_model(save_tiny_checkpoint(tmp_path / "base"))
    seen, real = [], bl.F.cross_entropy

    def recording(input, target, **kwargs):
        seen.append((input.shape[0], int((target != -1).sum())))
        return real(input, target, **kwargs)
    monkeypatch.setattr(bl.F, "cross_entropy", recording)
    tok = get_tokenizer("bytes")
    finetune(model, cfg, tok, ["qa1"], ["0k"], 1, str(tmp_path / "ft"), batch_size=2, background="builtin",
             data_dir=SHARED_DATA, device="cpu")
    assert len(seen) == 2 and all(rows == answer for rows, answer in seen)
    with open(tmp_path / "ft" / "finetune_log.jsonl") as f:
        entry = json.loads(f.readline())
    assert entry["answer_tokens"] == sum(rows for rows, _ in seen)

class _WordTokens:
    """A stand-in for GPT-2 in construction tests: one token per space-separated word."""

    def encode_batch(self, texts):
        return [text.split() for text in texts]


def test_background_sentences_have_at_least_10_tokens_and_are_whole():
    """SentenceSampler(min_sentence_len=10) keeps a sentence of 10 tokens and leaves out one
    of 9; only the last piece is cut (to hit the budget). A book of 9-, 10- and 11-word
    sentences: every piece but the last is a whole 10- or 11-token sentence. Kills dropping
    the length filter and dropping sentences of exactly 10 tokens."""
    import random

    from eval.babilong import BackgroundSampler
    sentences = ["Nine" + " w" * 7 + " end.", "Ten" + " w" * 8 + " end.", "Eleven" + " w" * 9 + " end."]
    book = " ".join(sentences * 200)
    pieces = BackgroundSampler([("book", book)], _WordTokens(), random.Random(0)).sample(300)
    assert sum(map(len, pieces)) == 300
    assert {len(p) for p in pieces[:-1]} == {10, 11}
    assert {" ".join(p) for p in pieces[:-1]} <= set(sentences)


def test_books_without_a_long_enough_sentence_are_an_error_not_a_hang():
    """A damaged background (no sentence of 10 tokens) made BackgroundSampler.sample loop
    forever; an empty Austen file failed with "empty range for randrange()"."""
    import random

    from eval.babilong import BackgroundSampler
    short = " ".join(["Too short to keep."] * 2000)
    with pytest.raises(ValueError, match=r"^no background sentence of at least 10 GPT-2 tokens in 100 random "
                                         r"windows of the books a, b$"):
        BackgroundSampler([("a", short), ("b", short)], _WordTokens(), random.Random(0)).sample(50)


def test_an_empty_austen_novel_is_named(tmp_path):
    (tmp_path / "austen").mkdir()
    for name in AUSTEN_BOOKS["test"]:
        (tmp_path / "austen" / f"{name}.txt").write_text("Some text." if name != "sensesensibility" else "\n")
    with pytest.raises(ValueError, match=rf"^Austen novel {tmp_path}/austen/sensesensibility.txt is empty$"):
        load_books("austen", "test", str(tmp_path))

def test_background_window_leaves_out_its_cut_first_and_last_sentences():
    """SentenceSampler with shuffle: a window from a random character offset, split into
    sentences, its first and last (cut) sentences dropped: every sentence returned is a whole
    sentence of the book. Kills keeping either cut end."""
    import random

    from eval.babilong import window_sentences
    sentences = [f"Sentence number {i} ends here." for i in range(2000)]
    whole = set(sentences)
    for seed in range(5):
        _, got = window_sentences([("book", " ".join(sentences))], random.Random(seed), 100)
        assert got and set(got) <= whole


def test_length_order_is_by_tokens_not_by_name():
    """The curriculum goes shortest first and the tables list lengths in token order: '16k'
    after '2k', '1M' last. Kills sorting the labels as strings."""
    from eval.babilong import _length_order
    assert _length_order(["16k", "2k", "1M", "128k", "0k", "1k"]) == ["0k", "1k", "2k", "16k", "128k", "1M"]


def test_generated_test_questions_are_not_the_fine_tuning_ones():
    """--babi generated: the test split comes from other seeds than the training stories
    (training_questions, which fine-tuning reads), so a fine-tuned model is not scored on
    stories it was trained on. Kills giving both splits the same seed."""
    from eval.babilong import _babi_questions, training_questions
    test = _babi_questions("qa2", 10, "test", "generated", 0, None)
    training = training_questions("qa2", "generated", None, 0)
    first_pass = [next(training) for _ in range(250)]          # the first 50 stories
    key = (lambda q: (tuple(q["facts"]), q["question"]))
    assert {key(q) for q in test if len(q["facts"]) >= 6}
    assert not {key(q) for q in test} & {key(q) for q in first_pass}



def test_no_fine_tuning_seed_gives_the_generated_test_questions_of_another_seed():
    """The test split used seed + 10**6 and fine-tuning round r of seed s used s * 100003 + r:
    `finetune --seed 10` trained on exactly the stories `eval --babi generated --seed 30`
    scored (all 50 questions). The splits now draw from disjoint streams."""
    from eval.babilong import _babi_questions, training_questions
    key = (lambda q: (tuple(q["facts"]), q["question"]))
    test = {key(q) for q in _babi_questions("qa2", 10, "test", "generated", 30, None)}
    training = training_questions("qa2", "generated", None, 10)
    assert not test & {key(next(training)) for _ in range(250)}
    train_split = {key(q) for q in _babi_questions("qa2", 10, "train", "generated", 10**6, None)}
    assert not {key(q) for q in _babi_questions("qa2", 10, "test", "generated", 0, None)} & train_split

@needs_data
def test_zero_k_n_tokens_counts_gpt2_tokens_of_the_facts(gpt2):
    """At 0k the context is the facts alone and n_tokens is its GPT-2 token count, as at any
    other length. Kills counting characters."""
    sample = build_babilong("qa1", "0k", 1, data_dir=SHARED_DATA, gpt2=gpt2)[0]
    assert sample["n_tokens"] == len(gpt2.encode(sample["input"])) < len(sample["input"])


def test_compare_answers_keeps_the_official_question_marker_as_it_is():
    """metrics.py lower-cases the output and then splits it on 'Question', which can no longer
    match: an output that goes on with 'Question: ...' is scored on all of its first sentence.
    Kept so the score stays the official one; kills 'fixing' the marker to 'question'."""
    labels = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
    assert not compare_answers("kitchen", "kitchen Question: where is the office", "Where is Mary?", labels)
    assert compare_answers("kitchen", "kitchen <example> where is the office", "Where is Mary?", labels)


def test_eval_cli_builds_local_samples_from_the_split_it_is_given(monkeypatch):
    """eval --split train scores samples of the bAbI train file in train books. Kills the
    eval command building from the test split whatever --split says."""
    import argparse

    import eval.babilong as bl
    seen = {}
    monkeypatch.setattr(bl, "build_babilong", lambda *a, **kw: seen.update(kw) or [])
    args = argparse.Namespace(source="local", samples=3, split="train", background="builtin", babi="generated",
                              seed=5, data_dir=None)
    bl._get_samples(args, "qa1", "1k", gpt2="gpt2")
    assert seen == {"split": "train", "background": "builtin", "babi": "generated", "seed": 5, "data_dir": None,
                    "gpt2": "gpt2"}


def test_prompt_parts_and_budget_are_the_official_ones():
    """Official prompts.py, character for character where the score depends on it: the parts
    joined by blank lines (TASK_TEMPLATE + '\\n\\n' + USER_TEMPLATE), qa2's instruction without a
    space after 'a question.', the curly quotes of qa1's post prompt; greedy generation of 20
    new tokens (run_model_on_babilong.py). Kills single newlines, 'fixed' texts, another budget."""
    import inspect

    from eval.babilong import OFFICIAL_MAX_NEW_TOKENS, TASK_PROMPTS
    qa1 = TASK_PROMPTS["qa1"]
    assert format_prompt(" A. ", "Where is Mary?", "qa1", instruction=True, examples=True, post_prompt=True) == \
        "\n\n".join([qa1["instruction"], qa1["examples"], qa1["post_prompt"], "<context>\nA.\n</context>",
                     "Question: Where is Mary?"])
    assert "hidden in some random text and a question.You need to answer" in TASK_PROMPTS["qa2"]["instruction"]
    assert "The most recent location of \u2019person\u2019 is \u2019location\u2019." in qa1["post_prompt"]
    assert OFFICIAL_MAX_NEW_TOKENS == inspect.signature(evaluate).parameters["max_new_tokens"].default == 20


def test_attention_models_keep_room_for_the_answer_in_max_len():
    """evaluate reads at most max_len tokens, prompt and answer together: a long prompt is cut
    to its last max_len - max(max_new_tokens, the longest ranked label) tokens. A recording
    stub shows what the model read first. Kills evaluate not passing max_new_tokens to
    fit_prompt, and ranking " bathroom" (9 byte tokens) after a prompt that left room for 4."""
    from data.tokenizer import get_tokenizer
    from helpers import RiggedByteModel

    class Recording(RiggedByteModel):
        def forward(self, idx, targets=None, state=None):
            self.calls.append(idx.shape[1])
            return super().forward(idx, targets, state)
    model = Recording("kitchen.")
    model.calls = []
    result = evaluate(model, get_tokenizer("bytes"), _samples()[:1], max_len=40, max_new_tokens=12)
    assert result["n_truncated"] == 1 and model.calls[0] == 40 - 12
    model.calls = []
    result = evaluate(model, get_tokenizer("bytes"), _samples()[:1], max_len=40, max_new_tokens=4)
    assert result["n_truncated"] == 1 and model.calls[0] == 40 - len(" bathroom")


def test_skipped_samples_are_left_out_of_the_accuracies():
    """overflow='skip': the accuracies are over the scored samples; a skipped one counts
    neither right nor wrong (result n_skipped). Kills dividing by every sample."""
    from data.tokenizer import get_tokenizer
    from helpers import RiggedByteModel
    short = {"task": "qa1", "input": "Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"}
    long = {**short, "input": "John went to the garden. " * 10 + short["input"]}
    result = evaluate(RiggedByteModel(": kitchen."), get_tokenizer("bytes"), [short, long], max_len=100,
                      max_new_tokens=10, overflow="skip")
    assert (result["n_scored"], result["n_skipped"]) == (1, 1)
    assert result["official"] == result["label_ranking"] == 1.0


@pytest.mark.parametrize("flags, named", [(["--babi", "file"], "--babi applies"),
                                          (["--split", "test"], "--split applies"),
                                          (["--background", "austen"], "--background applies"),
                                          (["--seed", "0"], "--seed applies"),
                                          (["--data-dir", SHARED_DATA], "--data-dir applies"),
                                          (["--seed", "1", "--babi", "generated"], "--babi, --seed apply")])
def test_eval_from_the_hub_refuses_the_flags_of_local_construction(tmp_path, capsys, flags, named):
    """--source hf read the Hub's samples and silently ignored --split, --background, --babi,
    --seed (and --data-dir): they now default to None and a given one is an error, before the
    checkpoint (here missing) is looked at. Even a flag given at its local default."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(tmp_path / "none"), "--source", "hf", "--tasks", "qa1", "--lengths", "0k",
              "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {named} to --source local only\n"


def test_eval_source_flags_refuse_only_what_was_given(tmp_path, capsys):
    """--source hf alone passes the flag check (the error is the missing checkpoint); --source
    local gets the construction defaults; --revision is the Hub's flag, refused locally."""
    import argparse

    from eval.babilong import _check_source_flags
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "none"), "--source", "hf", "--tasks", "qa1", "--lengths", "0k",
              "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith("error: checkpoint ")
    local = argparse.Namespace(source="local", revision=None, split=None, background=None, babi=None, seed=None,
                               data_dir=None)
    _check_source_flags(local, ["0k"])
    assert (local.split, local.background, local.babi, local.seed) == ("test", "austen", "file", 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(tmp_path / "none"), "--revision", "main", "--tasks", "qa1", "--lengths",
              "0k", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --revision applies to --source hf and hf-1k only\n"


def test_hub_lengths_are_the_hub_config_names(tmp_path, capsys):
    """'1K', '01k' and '1000k' read as 1000 tokens but are no config of the Hub datasets (the
    Hub answered with its own error after the checkpoint had loaded); 256k is not in the
    1k-samples set. Refused in one line naming the accepted labels; local construction
    still reads any of them."""
    from eval.babilong import HF_LENGTHS, parse_list
    for label in ("1K", "01k", "1000k", "3k"):
        with pytest.raises(ValueError, match=rf"^RMT-team/babilong has no length '{label}'; its lengths are "
                                             r"0k, 1k, 2k, 4k, 8k, 16k, 32k, 64k, 128k, 256k, 512k, 1M, 10M$"):
            load_babilong_hf("qa1", label)
        assert parse_list(label, "lengths") == [label]
    assert "256k" not in HF_LENGTHS["RMT-team/babilong-1k-samples"]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(tmp_path / "none"), "--source", "hf-1k", "--tasks", "qa1", "--lengths",
              "0k,256k", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: RMT-team/babilong-1k-samples has no length '256k'; its lengths are "
                                       "0k, 1k, 2k, 4k, 8k, 16k, 32k, 64k, 128k\n")


def test_finetune_needs_a_step_per_length(tiny_checkpoint, tmp_path):
    """--steps 2 with three --lengths trained 0k and 1k and never 2k, without a word
    (curriculum_stage gives each length steps * 1/3 of a step)."""
    from eval.common import load_checkpoint
    model, cfg, tokenizer, _ = load_checkpoint(tiny_checkpoint, "cpu")
    with pytest.raises(ValueError, match=r"^--steps 2 is fewer than the 3 --lengths: each length needs a step$"):
        finetune(model, cfg, tokenizer, ["qa1"], ["0k", "1k", "2k"], 2, str(tmp_path / "ft"), background="builtin",
                 device="cpu")
    assert not (tmp_path / "ft").exists()


@needs_data
def test_finetune_computes_under_the_training_precision(tiny_checkpoint, tmp_path, monkeypatch):
    """The fine-tune ran in fp32 while evaluate (and train.py on CUDA) compute under bf16
    autocast. Each forward now runs inside bf16_autocast(device, cfg.train.dtype), which is
    bf16 autocast on CUDA (unless the config trained in float32) and nothing on CPU."""
    import contextlib
    import warnings

    import eval.babilong as bl
    from eval.common import bf16_autocast, load_checkpoint
    from data.tokenizer import get_tokenizer
    model, cfg, _, _ = load_checkpoint(tiny_checkpoint, "cpu")
    calls, inside = [], []

    @contextlib.contextmanager
    def entered():
        inside.append(True)
        yield
        inside.append(False)

    def recording(device, dtype):
        calls.append((torch.device(device).type, dtype))
        return entered()
    monkeypatch.setattr(bl, "bf16_autocast", recording)
    forward = model.forward
    in_forward = []
    monkeypatch.setattr(model, "forward",
                        lambda *a, **kw: in_forward.append(inside[-1:] == [True]) or forward(*a, **kw))
    finetune(model, cfg, get_tokenizer("bytes"), ["qa1"], ["0k"], 1, str(tmp_path / "ft"), batch_size=2,
             background="builtin", device="cpu", log_every=0)
    assert in_forward == [True, True] and ("cpu", cfg.train.dtype) in calls
    # what the context is: autocast only on CUDA, as training computes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # torch warns that this machine may have no CUDA
        cuda = bf16_autocast("cuda", "auto")
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.bfloat16
    assert not isinstance(bf16_autocast(torch.device("cpu"), "auto"), torch.autocast)
    assert not isinstance(bf16_autocast("cuda", "float32"), torch.autocast)
