"""S-NIAH (RULER niah_single_1/2/3): sample construction, scoring, CLI."""
import json
import os
import re

import pytest
from conftest import SHARED_DATA

from eval.niah import (NOISE_SENTENCES, RULER_TOKENS_TO_GENERATE, build_niah, evaluate_niah, main, parse_length,
                       parse_task)
from helpers import RiggedByteModel, needs_data, save_tiny_checkpoint

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def gpt2():
    from eval.babilong import length_tokenizer
    return length_tokenizer(SHARED_DATA)


def test_names_and_lengths():
    assert parse_task("2") == parse_task("s-niah-2") == parse_task("niah_single_2") == "niah_single_2"
    assert parse_length("4k") == 4096 and parse_length("3000") == 3000
    for bad in ("niah_single_4", "mk"):
        with pytest.raises(ValueError, match="unknown S-NIAH task"):
            parse_task(bad)
    with pytest.raises(ValueError, match="bad S-NIAH length"):
        parse_length("4M")
    with pytest.raises(ValueError, match=r"^S-NIAH length '9999999999k' is past the 100,000,000 tokens allowed$"):
        parse_length("9999999999k")


@needs_data
@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3"])
def test_needle_and_answer_at_the_requested_depth(gpt2, task):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples = build_niah(task, "2k", 5, depths=depths, data_dir=SHARED_DATA, gpt2=gpt2)
    assert samples == build_niah(task, "2k", 5, depths=depths, data_dir=SHARED_DATA, gpt2=gpt2)
    for sample, depth in zip(samples, depths):
        text = sample["input"]
        assert text.count(sample["needle"]) == 1 and sample["value"] in sample["needle"]
        assert sample["key"] in sample["needle"] and text.endswith(f"for {sample['key']} mentioned in the provided text?")
        if task == "niah_single_3":
            assert UUID.match(sample["value"])
        else:
            assert re.fullmatch(r"\d{7}", sample["value"])
        # the haystack is the text between the first and last line of the template
        start, end = text.index("\n") + 1, text.rindex("\n")
        assert sample["depth"] == depth
        assert abs((text.index(sample["needle"]) - start) / (end - start) - depth) < 0.05
        n_tokens = len(gpt2.encode(text + sample["answer_prefix"]))
        assert 2048 - RULER_TOKENS_TO_GENERATE - 150 <= n_tokens <= 2048 - RULER_TOKENS_TO_GENERATE
        haystack = text[start:end].replace(sample["needle"], "")
        if task == "niah_single_1":
            assert set(s for s in re.split(r"(?<=\.)\s+", haystack.strip()) if s) <= set(NOISE_SENTENCES)
        else:
            assert "The grass is green." not in haystack


def test_scores_follow_a_rigged_model():
    from data.tokenizer import get_tokenizer
    base = {"task": "niah_single_1", "length": 100, "depth": 0.5, "key": "calm-anchor",
            "input": "Some text. One of the special magic numbers for calm-anchor is: 8142. More text.",
            "answer_prefix": " The special magic numbers for calm-anchor mentioned in the provided text are"}
    samples = [{**base, "value": "8142", "distractors": ["5555", "9090"]},
               {**base, "value": "5555", "distractors": ["8142", "9090"]}]
    result = evaluate_niah(RiggedByteModel("e 8142."), get_tokenizer("bytes"), samples, streaming=True, segment_len=32)
    first, second = result["records"]
    assert first["output"] == " 8142" and first["correct"] and first["ranking_correct"]
    assert not second["correct"] and not second["ranking_correct"]
    assert result["accuracy"] == result["ranking_accuracy"] == 0.5


@needs_data
def test_cli_writes_accuracy_json(tmp_path, monkeypatch, capsys):
    save_tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("NL_DATA_DIR", SHARED_DATA)
    out = str(tmp_path / "niah")
    main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", "1,3", "--lengths", "512,1k", "--samples", "2",
          "--depths", "0,1", "--max-new-tokens", "4", "--device", "cpu", "--out", out])
    with open(os.path.join(out, "niah.json")) as f:
        results = json.load(f)
    assert set(results["accuracy"]) == {"niah_single_1", "niah_single_3"}
    assert set(results["accuracy"]["niah_single_1"]) == {"512", "1k"}     # the labels, as eval.run keys them
    assert 0 <= results["ranking_accuracy"]["niah_single_3"]["1k"] <= 1
    assert set(results["by_depth"]["niah_single_1"]["512"]) == {"0.0", "1.0"}
    from eval.babilong import sentence_splitter
    assert results["sentence_splitter"] == sentence_splitter()        # niah_single_3's essay was cut by it
    assert results["counts"]["niah_single_1"]["512"]["n_truncated"] == 2     # 512 GPT-2 tokens > 256 bytes
    assert results["context_handling"] == \
        "attention: inputs over 252 tokens (max_len 256, less room for 4 answer tokens, or for a longer ranked " \
        "candidate) truncated to their last 252"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "ckpt"), "--depths", "1.5", "--out", out])
    assert exit_info.value.code == 2 and "error: argument --depths: expected numbers in [0, 1], got '1.5'" in \
        capsys.readouterr().err
    # an attention model of context 256 has no room for a prompt before 256 answer tokens
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "ckpt"), "--max-new-tokens", "256", "--device", "cpu",
              "--out", str(tmp_path / "no_room")])
    assert exit_info.value.code == 2 and "pass --max-new-tokens below 256 (e.g. 32) or a larger --max-len" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max-len", "0"], "argument --max-len: must be >= 1, got 0"),       # not "use seq_len"
    (["--max-len", "-5"], "argument --max-len: must be >= 1, got -5"),     # not 1-token prompts
    (["--depths", "x"], "argument --depths: expected numbers in [0, 1], got 'x'"),
    (["--depths", "0,nan"], "argument --depths: expected numbers in [0, 1], got 'nan'"),
    (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["--distractors", "-1"], "argument --distractors: must be >= 1, got -1"),
    (["--distractors", "0"], "argument --distractors: must be >= 1, got 0"),
    (["--segment-len", "0"], "argument --segment-len: must be >= 1, got 0"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: expected an integer >= 1, got 'x'"),
])
def test_cli_bad_flags_are_one_line_errors_naming_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert os.listdir(tmp_path) == []


def test_cli_checks_out_before_loading(tmp_path, monkeypatch, capsys):
    import eval.common
    monkeypatch.setattr(eval.common, "load_checkpoint", lambda *a: pytest.fail("loaded before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "sub", "a_file is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", "ckpt", "--lengths", "1k", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: --out {out}") and message in err
    assert a_file.read_text() == "keep me"


# -----------------------------------------------------------------------------
# needle placement, RULER's match, ranking, per-depth accuracy

@needs_data
def test_needle_goes_at_the_first_boundary_that_reaches_the_depth(gpt2):
    """Depth 0 puts the needle before the whole haystack, depth 1 after it, and depth d at the
    first sentence boundary where the GPT-2 tokens before it reach d x the haystack's tokens;
    depth_actual is that fraction. Kills `cumulative >= target` -> `>` (depth 0 after the first
    sentence), a default gap of len(haystack) - 1 (depth 1 before the last sentence), and a
    depth_actual that just repeats the requested depth."""
    samples = build_niah("niah_single_1", 600, 3, depths=[0.0, 1.0, 0.5], gpt2=gpt2)
    for sample in samples:
        text = sample["input"]
        context = text[text.index("\n") + 1:text.rindex("\n")]
        before, after = context.split(sample["needle"])
        n_before = [len(gpt2.encode(" " + s)) for s in re.split(r"(?<=\.)\s+", before.strip()) if s]
        n_after = [len(gpt2.encode(" " + s)) for s in re.split(r"(?<=\.)\s+", after.strip()) if s]
        total = sum(n_before) + sum(n_after)
        assert total > 300 and sample["depth_actual"] == pytest.approx(sum(n_before) / total)
        if sample["depth"] == 0.0:
            assert before == "" and sample["depth_actual"] == 0.0
        elif sample["depth"] == 1.0:
            assert after == "" and sample["depth_actual"] == 1.0
        else:
            assert sum(n_before) >= 0.5 * total > sum(n_before[:-1])


def test_string_match_is_case_insensitive():
    """RULER string_match_all lower-cases the reference and the prediction. Kills a
    case-sensitive match."""
    from eval.niah import string_match
    assert string_match("9f1C-AB", "the value is 9F1c-ab.")
    assert not string_match("9f1c-ab", "the value is 9f1c-a b")


def _next_byte_logits(rules):
    """A stateless byte stub: after byte a the logits are rules[a] (a dict {next char: logit},
    0 for every other of the 257 tokens)."""
    import torch

    class NextByteLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.zeros(257, 257)
            for a, nexts in rules.items():
                for b, logit in nexts.items():
                    self.table[ord(a), ord(b)] = logit

        def forward(self, idx, targets=None, state=None):
            return self.table[idx], None, {"pos": (state or {"pos": 0})["pos"] + idx.shape[1]}
    return NextByteLogits()


def test_ranking_scores_space_value_after_the_answer_prefix():
    """ranking_correct compares log p(" " + value | prompt + answer prefix) with the same for
    each distractor. The stub prefers ' ' after the prefix's last 'e', then '8' after ' ', so
    " 8142" beats " 9142"; without the space '9' (logit 5 after 'e') would beat '8' (0).
    Kills scoring the candidates without their leading space."""
    from data.tokenizer import get_tokenizer
    model = _next_byte_logits({"e": {" ": 10, "9": 5}, " ": {"8": 10}, "8": {"1": 10}, "9": {"1": 10},
                              "1": {"4": 10}, "4": {"2": 10}})
    sample = {"task": "niah_single_1", "length": 100, "depth": 0.5, "key": "calm-anchor", "value": "8142",
              "distractors": ["9142"], "input": "One of the special magic numbers for calm-anchor is: 8142.",
              "answer_prefix": " The special magic numbers for calm-anchor mentioned in the provided text are"}
    result = evaluate_niah(model, get_tokenizer("bytes"), [sample], streaming=True, max_new_tokens=8)
    record = result["records"][0]
    assert record["output"] == " 8142" and record["correct"] and record["ranking_correct"]


def test_by_depth_is_greedy_accuracy_per_depth_over_scored_samples():
    """niah.json's by_depth: per needle depth (sorted), the mean greedy accuracy of the scored
    samples (skipped ones left out). Kills averaging ranking_correct instead of correct."""
    from eval.niah import _by_depth
    records = [{"depth": 1.0, "correct": True, "ranking_correct": False},
               {"depth": 0.0, "correct": True, "ranking_correct": False},
               {"depth": 0.0, "correct": False, "ranking_correct": False},
               {"depth": 0.5, "skipped": True}]
    by_depth = _by_depth(records)
    assert by_depth == {"0.0": 0.5, "1.0": 1.0} and list(by_depth) == ["0.0", "1.0"]


def test_cli_checks_every_length_and_data_dir_before_scoring(tmp_path, monkeypatch, capsys):
    """A length too short for the template fails before any cell is scored (not after the
    cells listed before it) or built (its samples are built just before it is scored), and a
    --data-dir that is no folder is named even for the pass-key task, which reads no data file."""
    import eval.niah as niah
    save_tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("NL_DATA_DIR", SHARED_DATA)
    monkeypatch.setattr(niah, "evaluate_niah", lambda *a, **k: pytest.fail("scored a cell before checking them all"))
    monkeypatch.setattr(niah, "build_niah", lambda *a, **k: pytest.fail("built a cell before checking them all"))
    for extra, message in ((["--lengths", "512,200"], "length 200 is too short for the S-NIAH template"),
                           (["--data-dir", str(tmp_path / "none")], f"--data-dir {tmp_path / 'none'} is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", "1", "--lengths", "512", *extra,
                  "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


@needs_data
def test_cli_builds_each_cell_just_before_scoring_it_with_build_niahs_samples(tmp_path, monkeypatch, gpt2):
    """eval.niah's CLI builds a cell's samples just before it scores that cell (one cell's
    samples in memory at a time: hundreds of MB at 1M tokens), and they are build_niah's for
    the same arguments, cells in task then length order. Kills building every cell up front."""
    import eval.niah as niah
    save_tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("NL_DATA_DIR", SHARED_DATA)
    events, real_build, real_evaluate = [], niah.build_niah, niah.evaluate_niah
    monkeypatch.setattr(niah, "build_niah", lambda *a, **k: events.append(("build", a[:2])) or real_build(*a, **k))
    monkeypatch.setattr(niah, "evaluate_niah", lambda m, t, samples, **k: events.append(("score", samples))
                        or real_evaluate(m, t, samples, **k))
    main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", "1,3", "--lengths", "300,400", "--samples", "2",
          "--distractors", "2", "--seed", "5", "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "o")])
    cells = [("niah_single_1", 300), ("niah_single_1", 400), ("niah_single_3", 300), ("niah_single_3", 400)]
    assert [e[0] for e in events] == ["build", "score"] * len(cells)
    assert [e[1] for e in events[::2]] == cells
    for (task, length), (_, scored) in zip(cells, events[1::2]):
        assert scored == real_build(task, length, 2, seed=5, n_distractors=2, data_dir=SHARED_DATA, gpt2=gpt2)


@needs_data
def test_distractors_change_no_key_value_or_haystack(gpt2):
    """The distractors come from a stream of their own per sample: --distractors 1 and 4 give
    the same keys, values and prompts, and the first distractor of each sample is the same.
    Kills drawing them from the samples' stream (sample 1 on had another key and haystack)."""
    one, four = (build_niah("niah_single_3", 400, 3, n_distractors=n, data_dir=SHARED_DATA, gpt2=gpt2)
                 for n in (1, 4))
    assert [{**s, "distractors": None} for s in one] == [{**s, "distractors": None} for s in four]
    assert [s["distractors"] for s in one] == [s["distractors"][:1] for s in four]
    assert all(len(set(s["distractors"] + [s["value"]])) == 5 for s in four)


def _sample(value, distractors, text="One of the special magic numbers for calm-anchor is: 8142."):
    return {"task": "niah_single_1", "length": 100, "depth": 0.5, "key": "calm-anchor", "value": value,
            "distractors": distractors, "input": text,
            "answer_prefix": " The special magic numbers for calm-anchor mentioned in the provided text are"}


def test_ranking_needs_the_value_to_beat_every_distractor():
    """ranking_accuracy counts a sample only when the value's log-likelihood is above every
    distractor's: a model that cannot tell them apart (uniform logits: every 4-digit value
    ties) scores 0, not 100% (the value is candidate 0, which an argmax picks on a tie)."""
    from data.tokenizer import get_tokenizer
    result = evaluate_niah(_next_byte_logits({}), get_tokenizer("bytes"), [_sample("8142", ["5555", "9090"])],
                           streaming=True, max_new_tokens=2)
    assert not result["records"][0]["ranking_correct"] and result["ranking_accuracy"] == 0.0


def test_attention_model_skips_prompts_over_its_context_and_counts_them():
    """overflow='skip': a prompt with no room for the answer within max_len is not scored;
    n, n_scored and n_skipped say so and the accuracies are over the scored samples only.
    Kills a skipped count of 0."""
    from data.tokenizer import get_tokenizer
    short = {**_sample("8142", ["5555"], text="8142."), "answer_prefix": " are"}
    result = evaluate_niah(_next_byte_logits({}), get_tokenizer("bytes"), [_sample("8142", ["5555"]), short],
                           max_len=16, max_new_tokens=4, overflow="skip")
    assert (result["n"], result["n_scored"], result["n_skipped"], result["n_truncated"]) == (2, 1, 1, 0)
    assert result["records"][0]["skipped"] and result["accuracy"] == 0.0


def test_attention_model_reads_prompt_and_each_ranked_uuid_within_max_len():
    """An attention model reads the truncated prompt and then each candidate after it: with a
    UUID (37 byte tokens) longer than max_new_tokens, the prompt keeps room for the UUID, so no
    token is read past max_len (the stub's state counts the positions read). Kills cutting the
    prompt to max_len - max_new_tokens alone (it read 96 positions of 64)."""
    import torch

    from data.tokenizer import get_tokenizer
    positions = []

    class Positions(torch.nn.Module):
        def forward(self, idx, targets=None, state=None):
            positions.append((state or {"pos": 0})["pos"] + idx.shape[1])
            return torch.zeros(*idx.shape, 257), None, {"pos": positions[-1]}
    value = "0b6c1c9e-2f7e-4b5e-9a3f-1c2d3e4f5a6b"
    sample = {**_sample(value, [value[::-1]], text="x" * 300), "task": "niah_single_3"}
    result = evaluate_niah(Positions(), get_tokenizer("bytes"), [sample], max_len=64, max_new_tokens=4)
    assert result["n_truncated"] == 1 and max(positions) == 64 - 1       # the last UUID byte is predicted, not read


def test_noise_haystack_fills_its_budget_exactly_when_sentences_allow():
    """The noise haystack takes RULER's sentences in turn, from the first again after the last,
    while they fit, up to and including the token budget: a budget of exactly three sentences
    gets three. Kills stopping short of a sentence that would end exactly on the budget, or
    not starting the sentences over."""
    import random

    from eval.niah import NOISE_SENTENCES, _haystack_sentences

    class WordTokens:                   # one token per space-separated word, a GPT-2 stand-in
        def encode(self, text):
            return text.split()
    lengths = [len(s.split()) for s in NOISE_SENTENCES[:3]]
    haystack = _haystack_sentences("noise", None, random.Random(0), WordTokens(), sum(lengths))
    assert haystack == list(zip(NOISE_SENTENCES[:3], lengths))
    # past the last sentence it starts again from the first, and one token short of a whole
    # sentence leaves it out
    lengths = [len(s.split()) for s in NOISE_SENTENCES + NOISE_SENTENCES[:2]]
    haystack = _haystack_sentences("noise", None, random.Random(0), WordTokens(),
                                   sum(lengths) + len(NOISE_SENTENCES[2].split()) - 1)
    assert haystack == list(zip(NOISE_SENTENCES + NOISE_SENTENCES[:2], lengths))
    assert _haystack_sentences("noise", None, random.Random(0), WordTokens(), lengths[0] - 1) == []


def test_prompt_answer_prefix_and_needle_are_rulers():
    """RULER's niah template, answer prefix and needle (scripts/data/synthetic/constants.py),
    word for word: the score depends on them. Kills an edit of any of them."""
    from eval.niah import NIAH_ANSWER_PREFIX, NIAH_NEEDLE, NIAH_TEMPLATE
    assert NIAH_TEMPLATE.format(type_needle_v="numbers", context="C", query="calm-anchor") == (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\nC\n"
        "What are all the special magic numbers for calm-anchor mentioned in the provided text?")
    assert NIAH_ANSWER_PREFIX.format(type_needle_v="uuids", query="k") == \
        " The special magic uuids for k mentioned in the provided text are"
    assert NIAH_NEEDLE.format(type_needle_v="numbers", key="k", value="1234567") == \
        "One of the special magic numbers for k is: 1234567."


def test_essay_books_without_whole_sentences_are_an_error_not_an_endless_loop(monkeypatch):
    """A book window keeps its whole sentences only (its cut first and last are dropped), so
    books of one or two sentences (damaged files) give none, ever: the essay haystack refuses
    them after MAX_EMPTY_WINDOWS tries, naming the books. Kills retrying for ever (the stub
    fails the test where the loop would have hung)."""
    import random

    import eval.niah as niah
    calls = []
    real_window_sentences = niah.window_sentences

    def counted(*args):
        calls.append(1)
        if len(calls) > 2 * niah.MAX_EMPTY_WINDOWS:
            pytest.fail("still drawing windows: an endless loop")
        return real_window_sentences(*args)
    monkeypatch.setattr(niah, "window_sentences", counted)
    books = (("tiny", "Chapter one. It is a truth."), ("short", "Nothing here."))
    with pytest.raises(ValueError, match=r"^the essay haystack's books \(tiny, short\) gave no whole sentence in 1000 "
                                         r"random windows: too little text \(damaged files\?\)$"):
        niah._haystack_sentences("essay", books, random.Random(0), None, 500)
    assert len(calls) == niah.MAX_EMPTY_WINDOWS


@needs_data
@pytest.mark.parametrize("task, length", [("niah_single_2", 1024), ("niah_single_3", 300)])
def test_essay_prompts_fill_their_length_to_within_a_few_tokens_and_never_past_it(gpt2, task, length):
    """An essay haystack ends with the words of its next sentence that fit, and its first
    sentence (no space before it in the prompt) is counted the longer way: every prompt is
    within a few GPT-2 tokens of length - 128, never over. Kills stopping at the last whole
    sentence (seed 1's niah_single_2 at 1k was 661 tokens of 896) and counting the first
    sentence with its space (niah_single_3 at 300: a prompt of 173 > 172)."""
    samples = build_niah(task, length, 10, seed=1, data_dir=SHARED_DATA, gpt2=gpt2)
    room = length - RULER_TOKENS_TO_GENERATE
    n_tokens = [len(gpt2.encode(s["input"] + s["answer_prefix"])) for s in samples]
    assert all(room - 6 <= n <= room for n in n_tokens), n_tokens
