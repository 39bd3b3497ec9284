"""eval/common.py: device names, eval mode restored, the CLIs' exit on bad input (one-line
errors for bad flags in every eval CLI, output paths checked up front, no fine-tune into a
folder of checkpoints), and the
long-input helpers the evals share (which prompt tokens a model reads, prefill in segments,
continuation log-likelihoods and greedy generation from a carried state)."""
import os

import pytest
import torch

from eval.common import (bf16_autocast, check_checkpoint_out, check_long_inputs, context_handling, context_limit,
                         continuation_logprobs, eval_mode, exit_on_error, expand_state, first_line, fit_prompt,
                         format_accuracy, greedy_generate, is_recurrent, load_checkpoint, mean_over_scored,
                         model_device, prefill, require_data_dir, state_bytes)
from model import state_tensors


def test_first_line_of_an_error_or_its_type():
    """The reason in the one-line Hub errors of eval.babilong and eval.perplexity."""
    assert first_line(ConnectionError("Couldn't reach the Hub\nTraceback ...")) == "Couldn't reach the Hub"
    assert first_line(TimeoutError()) == "TimeoutError"


def test_format_accuracy_is_a_five_wide_percent_or_na():
    assert [format_accuracy(v) for v in (None, 0.0, 0.5, 1.0)] == ["  n/a", "  0.0", " 50.0", "100.0"]


def test_resolve_device():
    from cli import resolve_device
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("mps", "cuda:x", "cudax"):
        with pytest.raises(ValueError, match="argument --device: must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="argument --device: cuda:0 is not available on this machine"):
            resolve_device("cuda:0")


def test_eval_mode_restores_the_mode_even_after_an_error():
    model = torch.nn.Dropout(0.5)
    for was_training in (True, False):
        model.train(was_training)
        with pytest.raises(RuntimeError):
            with eval_mode(model):
                assert not model.training
                raise RuntimeError("inside")
        assert model.training == was_training


def test_model_kind_and_device():
    class Config:
        arch = "titans"
    model = torch.nn.Linear(2, 2)
    assert model_device(model) == torch.device("cpu") and model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert not is_recurrent(model) and context_limit(model, 256) == 256     # attention: its context
    model.config = Config()
    assert is_recurrent(model) and context_limit(model, 256) is None        # recurrent: streams


def test_a_reader_that_stops_early_ends_an_eval_cli_quietly(monkeypatch, capsys):
    """`python -m eval.reproduce nl_table2 | head` ended with "error: [Errno 32] Broken pipe"
    and status 2, as if the input were bad: it now ends quietly with status 1, as sample.py.
    stdout here is a pipe whose reader is already gone (the test's own, not fd 1)."""
    import sys
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as broken:
        monkeypatch.setattr(sys, "stdout", broken)
        with pytest.raises(SystemExit) as exit_info:
            with exit_on_error():
                print("| table |", flush=True)
        monkeypatch.undo()
    assert exit_info.value.code == 1 and capsys.readouterr().err == ""


def test_exit_on_error_only_for_the_named_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_error(FileNotFoundError, ValueError):
            raise ValueError("--samples must be >= 1")
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --samples must be >= 1\n"
    with pytest.raises(KeyError):
        with exit_on_error(FileNotFoundError, ValueError):
            raise KeyError("a bug is not bad input")
    with pytest.raises(SystemExit):
        with exit_on_error(ValueError):
            raise ValueError("first line\n  second line\n")
    assert capsys.readouterr().err == "error: first line second line\n"
    for bad in (MemoryError("cannot allocate"), ImportError("no module named lm_eval"), OSError("disk full")):
        with pytest.raises(SystemExit):
            with exit_on_error():                   # the default: BAD_INPUT
                raise bad
        assert capsys.readouterr().err == f"error: {bad}\n"
    with pytest.raises(RuntimeError):
        with exit_on_error():
            raise RuntimeError("a bug is not bad input")


# -----------------------------------------------------------------------------
# every eval CLI: a bad flag is one line "error: argument --x: ..." naming it, exit 2, no usage
# text (nothing loaded, nothing written); cli.py's parser and flag types: tests/test_cli_inputs.py
CLI_FLAG_ERRORS = [
    ("eval.perplexity", ["--checkpoint", "c", "--limit", "0"], "argument --limit: must be >= 1"),
    ("eval.perplexity", ["--checkpoint", "c", "--batch-size", "x"], "argument --batch-size: expected an integer"),
    ("eval.niah", ["--checkpoint", "c", "--out", "o", "--max-len", "0"], "argument --max-len: must be >= 1"),
    ("eval.niah", ["--checkpoint", "c", "--out", "o", "--depths", "x"],
     "argument --depths: expected numbers in [0, 1]"),
    ("eval.niah", ["--checkpoint", "c"], "the following arguments are required: --out"),
    ("eval.babilong", ["eval", "--checkpoint", "c", "--out", "o", "--max-len", "-5"],
     "argument --max-len: must be >= 1"),
    ("eval.babilong", ["finetune", "--checkpoint", "c", "--out", "o", "--steps", "0"],
     "argument --steps: must be >= 1"),
    ("eval.babilong", ["build", "--out", "o", "--samples", "0"], "argument --samples: must be >= 1"),
    ("eval.babilong", ["bogus"], "argument command: invalid choice: 'bogus'"),
    ("eval.continual", ["domains", "--checkpoint", "c", "--out", "o", "--seq-len", "0"],
     "argument --seq-len: must be >= 1"),
    ("eval.continual", ["intents", "--checkpoint", "c", "--out", "o", "--icl-shots", "-1"],
     "argument --icl-shots: must be >= 1"),
    ("eval.run", ["--checkpoint", "c", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
    ("eval.reproduce", ["nl_table2", "--nproc", "0"], "argument --nproc: must be >= 1"),
    ("eval.reproduce", ["zeroshot", "--checkpoint", "c", "--out", "o", "--limit", "0"],
     "argument --limit: must be >= 1"),
    ("eval.mini_repro", ["--jobs", "x"], "argument --jobs: expected an integer >= 1, got 'x'"),
    ("eval.mini_repro", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("eval.mini_repro", ["--domain-steps", "-1"], "argument --domain-steps: must be >= 0, got -1"),
]


@pytest.mark.parametrize("module, argv, message", CLI_FLAG_ERRORS)
def test_every_eval_cli_reports_a_bad_flag_in_one_line(module, argv, message, capsys, tmp_path, monkeypatch):
    import importlib
    monkeypatch.chdir(tmp_path)                      # nothing may be written; if it were, not into the repo
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "usage" not in err
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# an output folder for checkpoints, checked before the long run

def test_check_checkpoint_out_refuses_folders_that_hold_checkpoints(tmp_path):
    from checkpoint import holds_checkpoints
    from helpers import save_tiny_checkpoint
    base = save_tiny_checkpoint(tmp_path / "base")
    step = os.path.join(base, "checkpoints", "step_000000")
    for out in (base, os.path.join(base, "checkpoints"), step):
        assert holds_checkpoints(out)
        with pytest.raises(ValueError, match=f"^--out {out} already holds checkpoints; choose another folder$"):
            check_checkpoint_out(out, base)
    (tmp_path / "empty").mkdir()
    for out in (str(tmp_path / "empty"), str(tmp_path / "new"), os.path.join(base, "babilong_ft")):
        assert check_checkpoint_out(out, base) == out                          # a subfolder of the run is fine
    assert not holds_checkpoints(str(tmp_path / "empty"))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        check_checkpoint_out(str(other), str(other))                           # the --checkpoint folder itself
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_checkpoint_out(os.path.join(step, "trainer_state.pt"), base)


def test_load_checkpoint_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        load_checkpoint(str(tmp_path / "none"), "cpu")
    with pytest.raises(FileNotFoundError, match="^checkpoint '' not found$"):     # an empty one shown as such
        load_checkpoint("", "cpu")


def test_require_data_dir_names_what_needs_it(tmp_path, monkeypatch):
    """One message for every eval that reads shared/data: no folder at all (neither
    --data-dir nor a default; it names the ../shared/data it looked for, so a user knows to
    set $NL_DATA_DIR, and reads right for a plural: it said "the bAbI files needs"), or a
    copy without the sub-folder an eval reads."""
    import eval.common
    from eval.babilong import load_books
    from eval.continual import clinc_tasks, domain_text
    monkeypatch.setattr(eval.common, "REPO", str(tmp_path / "repo"))      # no ../shared/data beside it
    monkeypatch.delenv("NL_DATA_DIR", raising=False)
    monkeypatch.delenv("NL_SHARED_DATA", raising=False)
    tried = (f"--data-dir not given, $NL_DATA_DIR and $NL_SHARED_DATA unset, and {tmp_path / 'shared' / 'data'} "
             "is not a folder")
    for call, what in [(lambda: load_books("austen", "test"), "the Austen background"),
                       (lambda: domain_text("shakespeare"), "the Shakespeare domain"),
                       (clinc_tasks, "CLINC150"), (lambda: require_data_dir(None, "the bAbI files"), "the bAbI files")]:
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert str(error.value) == (f"no offline data folder for {what} ({tried}): pass --data-dir or set "
                                    "$NL_DATA_DIR to a copy of shared/data")
    assert require_data_dir(str(tmp_path), "x") == str(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        domain_text("babi", data_dir=str(tmp_path))
    assert str(error.value) == f"{tmp_path / 'babi'} not found (a copy of shared/data has babi/)"
    (tmp_path / "babi").mkdir()
    assert require_data_dir(str(tmp_path), "x", "babi") == str(tmp_path / "babi")


def test_a_data_dir_variable_naming_no_folder_is_an_error_not_skipped(tmp_path, monkeypatch):
    """$NL_DATA_DIR (else $NL_SHARED_DATA) set to a path that is not a folder is a ValueError
    naming the variable and the path, not a silent fall back to the next candidate (which
    scored ../shared/data under a mistyped $NL_DATA_DIR). Empty means unset."""
    import eval.common
    from eval.common import default_data_dir
    typo = str(tmp_path / "typo_dir")
    monkeypatch.setattr(eval.common, "REPO", str(tmp_path / "repo"))      # no ../shared/data beside it
    monkeypatch.setenv("NL_DATA_DIR", typo)
    monkeypatch.setenv("NL_SHARED_DATA", str(tmp_path))
    with pytest.raises(ValueError) as error:
        default_data_dir()
    assert str(error.value) == f"$NL_DATA_DIR={typo} is not a folder: set it to a copy of shared/data, or unset it"
    with pytest.raises(ValueError, match=r"^\$NL_DATA_DIR="):              # as the evals that read it see it
        require_data_dir(None, "CLINC150", "clinc150")
    assert require_data_dir(str(tmp_path), "x") == str(tmp_path)         # --data-dir wins: the variable is unread
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("NL_DATA_DIR", str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match="a_file is not a folder"):
        default_data_dir()
    monkeypatch.setenv("NL_DATA_DIR", "")
    assert default_data_dir() == str(tmp_path)
    monkeypatch.setenv("NL_SHARED_DATA", typo)
    with pytest.raises(ValueError, match=r"^\$NL_SHARED_DATA="):
        default_data_dir()
    monkeypatch.delenv("NL_SHARED_DATA")
    assert default_data_dir() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_dir() == str(tmp_path / "shared" / "data")


def test_a_data_dir_variable_naming_no_folder_stops_the_clis_and_training(tmp_path, monkeypatch, capsys):
    """The mistyped $NL_DATA_DIR of eval.perplexity (it scored ../shared/data and exited 0),
    eval.run and train.py's during-training evals: one line "error: ..." naming it, exit
    status 2, before the checkpoint loads or step 1 runs."""
    import eval.run as run
    import train as train_mod
    from eval import perplexity as ppl
    typo = str(tmp_path / "typo_dir")
    monkeypatch.setenv("NL_DATA_DIR", typo)
    message = f"$NL_DATA_DIR={typo} is not a folder"
    for main, argv in ((ppl.main, ["--tasks", "lambada", "--limit", "2"]),
                       (run.main, ["--suite", "quick", "--out", str(tmp_path / "eval")])):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(tmp_path / "no_checkpoint"), *argv])  # "not found" if it got that far
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert train_mod.main(["--model.n_layer=1", "--model.d_model=16", "--model.n_head=1", "--data.tokenizer=bytes",
                           f"--train.out_dir={tmp_path / 'train'}", "--train.eval_every=1",
                           "--logging.wandb=disabled", "--eval.during_training=[perplexity]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: eval.during_training ['perplexity']: {message}") and err.count("\n") == 1, err
    assert not os.listdir(tmp_path)


def test_fit_prompt_truncates_or_skips_only_attention_models():
    ids = list(range(10))
    assert fit_prompt(ids, True, 4, 2, "skip") == (ids, False)                # streaming reads it all
    assert fit_prompt(ids, False, 12, 2, "skip") == (ids, False)              # fits, with its answer
    # a prompt of max_len tokens leaves no room for the answer: the model would read past its
    # context (it was kept whole, while one token more was cut to max_len - max_new_tokens)
    assert fit_prompt(ids, False, 10, 2, "truncate") == ([2, 3, 4, 5, 6, 7, 8, 9], True)
    assert fit_prompt(ids, False, 11, 2, "skip") == (None, False)
    assert fit_prompt(ids, False, 6, 2, "truncate") == ([6, 7, 8, 9], True)   # room for 2 answer tokens
    assert fit_prompt(ids, False, 2, 5, "truncate") == ([9], True)            # at least one token
    assert fit_prompt(ids, False, 6, 2, "skip") == (None, False)


def test_fit_prompt_keeps_room_for_the_longest_ranked_candidate():
    """A candidate ranked by its log-likelihood after the prompt is read after it too: an
    attention model keeps room for the longest candidate where it is longer than
    max_new_tokens (a UUID is 37 byte tokens, the CLI's --max-new-tokens may be 4). Kills
    reserving max_new_tokens alone, which reads prompt + candidate past max_len."""
    ids = list(range(10))
    assert fit_prompt(ids, False, 8, 2, "truncate", [[1], [1, 2, 3, 4, 5]]) == ([7, 8, 9], True)
    assert fit_prompt(ids, False, 8, 2, "truncate", [[1]]) == ([4, 5, 6, 7, 8, 9], True)   # max_new_tokens rules
    assert fit_prompt(ids, False, 15, 2, "skip", [[1] * 6]) == (None, False)
    assert fit_prompt(ids, False, 16, 2, "skip", [[1] * 6]) == (ids, False)
    assert fit_prompt(ids, True, 4, 2, "skip", [[1] * 6]) == (ids, False)                  # streaming reads it all


def test_check_long_inputs_and_mean_over_scored():
    model = torch.nn.Linear(2, 2)
    assert check_long_inputs(model, "truncate", None, 8) is False
    assert check_long_inputs(model, "skip", True, None) is True
    with pytest.raises(ValueError, match="needs max_len"):
        check_long_inputs(model, "truncate", None, None)
    with pytest.raises(ValueError, match="overflow"):
        check_long_inputs(model, "drop", True, 8)
    assert check_long_inputs(model, "truncate", None, 8, 7) is False
    with pytest.raises(ValueError, match="max_len=8 tokens has no room for a prompt before max_new_tokens=8"):
        check_long_inputs(model, "truncate", None, 8, 8)       # every prompt would be one token
    assert check_long_inputs(model, "truncate", True, 8, 20) is True     # streaming: no limit
    assert mean_over_scored([{"ok": True}, {"ok": False}, {"ok": True}, {"ok": True}], "ok") == 0.75
    assert mean_over_scored([], "ok") is None


def test_context_handling_says_what_fit_prompt_does():
    ids = list(range(10))
    assert context_handling(True, None, 64, "skip", 2) == \
        "streamed: whole input in segments of 64 tokens with the state carried"
    kept = len(fit_prompt(ids, False, 6, 2, "truncate")[0])
    assert context_handling(False, 6, 64, "truncate", 2) == \
        f"attention: inputs over {kept} tokens (max_len 6, less room for 2 answer tokens, or for a longer ranked " \
        f"candidate) truncated to their last {kept}"
    assert context_handling(False, 6, 64, "skip", 2) == \
        "attention: inputs over 4 tokens (max_len 6, less room for 2 answer tokens, or for a longer ranked candidate) " \
        "skipped"


def test_bf16_autocast_only_on_cuda():
    with bf16_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    if torch.cuda.is_available():
        with bf16_autocast("cuda", "auto"):
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")
        with bf16_autocast("cuda", "float32"):
            assert not torch.is_autocast_enabled("cuda")


def test_prefill_and_continuation_logprobs_equal_one_forward_pass():
    """Prefix fed in segments (11 tokens, segments of 4), then continuations of 1-4 tokens scored
    from the carried state: the same log-likelihoods as one pass over prefix + continuation."""
    from model import build_model
    torch.manual_seed(0)
    model = build_model({"arch": "transformer", "vocab_size": 257, "d_model": 32, "n_layer": 2, "n_head": 2}).eval()
    prefix = torch.randint(0, 257, (11,)).tolist()
    continuations = [[5, 77, 200], [9], [1, 2, 3, 4], [200, 5]]
    with torch.no_grad():
        last, state = prefill(model, prefix, 4, "cpu")
        expected = []
        for continuation in continuations:
            logits, _, _ = model(torch.tensor([prefix + continuation]))
            logprobs = torch.log_softmax(logits[0].float(), -1)
            expected.append(sum(logprobs[len(prefix) - 1 + i, t].item() for i, t in enumerate(continuation)))
        assert torch.allclose(last, logits[0, len(prefix) - 1].float(), atol=1e-5)
        assert continuation_logprobs(model, last, state, continuations, "cpu") == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="empty input"):
        prefill(model, [], 4, "cpu")
    with pytest.raises(ValueError, match="at least one token"):
        continuation_logprobs(model, last, state, [[1], []], "cpu")
    assert continuation_logprobs(model, last, state, [], "cpu") == []     # a BABILong question naming every label


def test_expand_state_is_views_of_every_batch_dim():
    state = {"pos": 3, "layers": [{"k": torch.randn(1, 2, 5)}, (torch.ones(1), torch.tensor(2.0))]}
    wide = expand_state(state, 4)
    assert wide["pos"] == 3 and wide["layers"][0]["k"].shape == (4, 2, 5) and wide["layers"][1][0].shape == (4,)
    assert wide["layers"][0]["k"].data_ptr() == state["layers"][0]["k"].data_ptr()     # no copy
    assert torch.equal(wide["layers"][0]["k"][3], state["layers"][0]["k"][0]) and wide["layers"][1][1].dim() == 0
    assert state_bytes(state) == 10 * 4 + 4 + 4


@pytest.mark.parametrize("arch, variant", [("transformer", None), ("titans", "mac"), ("hope", None)])
def test_grouped_continuation_scores_match_one_by_one_and_leave_the_state(arch, variant):
    """The batched scorer: continuations of mixed lengths in groups of 1, 3 and all (and of one,
    forced by a state budget of one byte) give the scores each gets alone on the prefix's
    state, which stays as it was. Kills a padding mask that counts pad tokens, a group that
    scores another row's targets, and an expansion that writes into the prefix's state."""
    from model import build_model
    cfg = {"arch": arch, "vocab_size": 61, "d_model": 16, "n_layer": 2, "n_head": 2}
    if variant:
        cfg["titans"] = {"variant": variant}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    continuations = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 1, 6, 2, 5, 1, 4)]
    with torch.no_grad():
        last, state = prefill(model, torch.randint(0, 61, (37,), generator=g).tolist(), 16, "cpu")
        before = [t.clone() for t in state_tensors(state)]
        alone = [continuation_logprobs(model, last, state, [c], "cpu")[0] for c in continuations]
        for kw in ({"batch_size": 1}, {"batch_size": 3}, {}, {"state_budget": 1}):
            assert continuation_logprobs(model, last, state, continuations, "cpu", **kw) == \
                pytest.approx(alone, abs=1e-5), kw
        assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(state), strict=True))


def test_greedy_generate_stops_after_max_new_tokens_or_when_told():
    from data.tokenizer import get_tokenizer
    from helpers import RiggedByteModel
    model, tok = RiggedByteModel("abcd.ef"), get_tokenizer("bytes")
    with torch.no_grad():
        last, state = prefill(model, tok.encode("xa"), 1, "cpu")
        assert greedy_generate(model, tok, last, state, 6, "cpu") == "bcd.ef"
        assert greedy_generate(model, tok, last, state, 3, "cpu") == "bcd"
        assert greedy_generate(model, tok, last, state, 6, "cpu", stop=lambda text: "." in text) == "bcd."


# -----------------------------------------------------------------------------
# continuation log-likelihoods and generation against hand-set stub models

class _BigramTableModel(torch.nn.Module):
    """Stateless stub: the logits after token a are log P[a] for a hand-written table P, so
    log p(b | ... a) = log P[a][b] whatever came before."""

    def __init__(self, table):
        super().__init__()
        self.log_table = torch.tensor(table, dtype=torch.float32).log()

    def forward(self, idx, targets=None, state=None):
        return self.log_table[idx], None, {"pos": (state or {"pos": 0})["pos"] + idx.shape[1]}


def test_continuation_logprobs_of_one_two_and_three_tokens_by_hand():
    """log p(continuation | prefix) is the sum over every continuation token, for 1, 2 and 3
    tokens (the first from the prefix's last logits, the rest from one call on the state),
    scored together; kills scoring a 2-token continuation by its first token."""
    import math
    P = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]
    model = _BigramTableModel(P)
    with torch.no_grad():
        last, state = prefill(model, [2, 1, 0], 2, "cpu")
        cases = {(1,): math.log(0.25), (1, 2): math.log(0.25) + math.log(0.3),
                 (2, 2, 0): math.log(0.25) + math.log(0.6) + math.log(0.2), (0, 0): 2 * math.log(0.5)}
        scores = continuation_logprobs(model, last, state, [list(c) for c in cases], "cpu")
        assert scores == pytest.approx(list(cases.values()), abs=1e-6)


def test_greedy_generate_stops_at_end_of_text_and_leaves_it_out():
    """Greedy decoding ends when the argmax is the end-of-text token, which is not part of the
    text. Kills dropping the `token == tokenizer.eot_id: break` (generation would go on past it)."""
    from data.tokenizer import get_tokenizer
    from helpers import RiggedByteModel
    tok = get_tokenizer("bytes")
    model = RiggedByteModel("abc" + chr(tok.eot_id))      # after 'c' the argmax is token 256
    with torch.no_grad():
        last, state = prefill(model, tok.encode("xa"), 1, "cpu")
        assert greedy_generate(model, tok, last, state, 6, "cpu") == "bc"


def test_greedy_generate_leaves_out_an_end_of_text_its_tokenizer_would_print():
    """With a tokenizer whose decode renders end-of-text (GPT-2 decodes 50256 to
    "<|endoftext|>"; the bytes tokenizer drops it, so the test above cannot tell), the
    generated text holds no end-of-text, and `stop` never sees it. Kills appending the token
    before the end-of-text check."""
    from data.tokenizer import get_tokenizer
    from helpers import RiggedByteModel

    class PrintsEot:
        eot_id, vocab_size = 256, 257
        _bytes = get_tokenizer("bytes")

        def decode(self, ids):
            return "".join("<eot>" if i == self.eot_id else self._bytes.decode([i]) for i in ids)

    tok, seen = PrintsEot(), []
    model = RiggedByteModel("abc" + chr(256))
    with torch.no_grad():
        last, state = prefill(model, [ord("x"), ord("a")], 1, "cpu")
        assert greedy_generate(model, tok, last, state, 6, "cpu", stop=lambda text: seen.append(text) or False) == "bc"
    assert seen == ["b", "bc"]


@pytest.mark.parametrize("arch,recurrent", [("titans", True), ("hope", True), ("hope_attention", False),
                                            ("transformer", False)])
def test_which_archs_stream_and_which_read_their_context(arch, recurrent):
    """Titans and HOPE carry a constant-size state and stream any length (babilong / niah read
    the whole input); HOPE-attention and the Transformer keep a KV cache and read at most
    max_len tokens. Kills HOPE being truncated to its training context."""
    class Config:
        pass
    model = torch.nn.Linear(2, 2)
    model.config = Config()
    model.config.arch = arch
    assert is_recurrent(model) is recurrent
    assert context_limit(model, 256) == (None if recurrent else 256)


def test_long_stream_note_where_the_memories_amplify_rounding():
    """Results of a Titans or HOPE model streamed over 1024+ tokens with settings outside the
    measured stable region (ModelConfig.long_context_risk) carry a note; the stabilised ones,
    shorter inputs, attention models and models without a config carry none. The evals hand
    it on: eval.babilong.evaluate and eval.niah.evaluate_niah per cell, _summarise (and so
    babilong.json and eval.run) once."""
    from eval import babilong as bl
    from eval import niah
    from eval.common import long_stream_note, notes_of
    from model import build_model
    small = {"vocab_size": 256, "n_layer": 1, "n_head": 2, "d_model": 16}
    hope = build_model({**small, "arch": "hope"})                      # max_grad_norm 3 (default)
    note = long_stream_note(hope, 1024)
    assert note.startswith("inputs of up to 1024 tokens with model.hope.max_grad_norm=3.0: HOPE's memories") and \
        note.endswith("can change with the dtype, --segment-len or model.kernels")
    assert long_stream_note(hope, 1023) is None
    assert long_stream_note(build_model({**small, "arch": "hope", "hope": {"max_grad_norm": 1.0}}), 4096) is None
    mag = {**small, "arch": "titans", "titans": {"variant": "mag"}}
    assert long_stream_note(build_model(mag), 4096) is not None
    assert long_stream_note(build_model({**mag, "titans": {"variant": "mag", "step_budget": 0.5,
                                                           "max_grad_norm": 1.0}}), 4096) is None
    assert long_stream_note(build_model({**small, "arch": "hope_attention"}), 4096) is None
    assert long_stream_note(torch.nn.Linear(1, 1), 4096) is None
    assert notes_of([{"note": "a"}, {"note": None}, {"note": "a"}, {}]) == ["a"]

    from data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    sample = {"task": "qa1", "length": "1k", "input": "Mary went to the kitchen. " * 40,
              "question": "Where is Mary?", "target": "kitchen"}
    cell = bl.evaluate(hope, tok, [sample], max_new_tokens=1, segment_len=512)
    assert cell["note"].startswith("inputs of up to ") and bl._summarise({("qa1", "1k"): cell})["notes"] == [cell["note"]]
    assert bl.evaluate(hope, tok, [{**sample, "input": "Mary went to the kitchen."}], max_new_tokens=1)["note"] is None
    needle = {"task": "niah_single_1", "length": 1024, "depth": 0.0, "key": "k", "value": "7",
              "input": "x" * 1100, "answer_prefix": " The number is"}
    assert niah.evaluate_niah(hope, tok, [needle], max_new_tokens=1, segment_len=512)["note"] is not None


def test_the_note_names_the_longest_input_read():
    """eval.babilong.evaluate and eval.niah.evaluate_niah note the longest input they read
    (eval.common.longest_input_note): the most n_input_tokens of the scored records, in any
    order, and none when nothing was read; an input skipped as too long for max_len does not
    count. Kills a note from the first or last record's length, or from a skipped one."""
    from data.tokenizer import ByteTokenizer
    from eval import niah
    from eval.common import longest_input_note
    from model import build_model
    hope = build_model({"vocab_size": 256, "n_layer": 1, "n_head": 2, "d_model": 16, "arch": "hope"})
    records = [{"n_input_tokens": 1100}, {"n_input_tokens": 2000}, {"n_input_tokens": 1500}]
    assert longest_input_note(hope, records).startswith("inputs of up to 2000 tokens with ")
    assert longest_input_note(hope, []) is None
    tok = ByteTokenizer()
    needle = {"task": "niah_single_1", "length": 1024, "depth": 0.0, "key": "k", "value": "7",
              "answer_prefix": " The number is"}
    long, read = {**needle, "input": "x" * 1100}, {**needle, "input": "x" * 1030}
    n_read = len(tok.encode(read["input"] + read["answer_prefix"]))
    # room for the answer: the ranked " 7", two tokens
    r = niah.evaluate_niah(hope, tok, [long, read], max_len=n_read + 2, max_new_tokens=1, segment_len=512,
                           overflow="skip", streaming=False)
    assert r["n_skipped"] == 1 and r["note"].startswith(f"inputs of up to {n_read} tokens with ")


def test_an_activation_checkpointed_run_is_evaluated_and_fine_tuned_with_it(tmp_path):
    """load_checkpoint applies distributed.activation_checkpointing when the checkpoint's run
    trained with it (the BABILong fine-tune and the continual arms backpropagate through
    sequences as long as training's: without it a paper-size model's fine-tune needs several
    times the memory): the blocks recompute, and the loss, its gradients and a streamed
    no-grad forward equal the model's without it."""
    import torch
    from checkpoint import save_checkpoint
    from config import Config, DataConfig, DistributedConfig, ModelConfig, TrainConfig
    from eval.common import load_checkpoint
    from model import build_model
    paths = {}
    for ac in (False, True):
        cfg = Config(model=ModelConfig(arch="hope", vocab_size=257, d_model=32, n_layer=2, n_head=2),
                     data=DataConfig(tokenizer="bytes"), train=TrainConfig(seq_len=64),
                     distributed=DistributedConfig(activation_checkpointing=ac))
        torch.manual_seed(0)
        model = build_model(cfg.model)
        paths[ac] = str(tmp_path / f"ac{ac}")
        save_checkpoint(os.path.join(paths[ac], "checkpoints"), 0, model, torch.optim.AdamW(model.parameters()),
                        {"step": 0}, cfg)
    plain, checkpointed = (load_checkpoint(paths[ac], "cpu")[0] for ac in (False, True))
    assert checkpointed.blocks[0].forward.__name__ == "checkpointed_forward"
    assert plain.blocks[0].forward.__name__ != "checkpointed_forward"
    x = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (plain, checkpointed):
        m.train()
        _, loss, _ = m(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        plain.eval(), checkpointed.eval()
        ys = [torch.cat([m(x[:, :20])[0], m(x[:, 20:], state=m(x[:, :20])[2])[0]], 1) for m in (plain, checkpointed)]
    torch.testing.assert_close(ys[0], ys[1])
