"""Continual learning: metrics on hand-written matrices, CLINC/Banking task splits, the
generative classifier on rigged toy models, every arm on a tiny model, the domains protocol."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO, SHARED_DATA
from data.tokenizer import ByteTokenizer
from eval import continual as cl
from model import build_model, state_tensors

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "vocab_size": 257}


# -----------------------------------------------------------------------------
# metrics

def test_continual_metrics_on_hand_written_matrix():
    R = [[0.9, None, None],
         [0.6, 0.8, None],
         [0.5, 0.4, 0.7]]
    m = cl.continual_metrics(R, baseline=[0.1, 0.2, 0.3])
    assert m["ACC"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)
    assert m["BWT"] == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)
    # task 0: best earlier 0.9 -> 0.5 (0.4); task 1: 0.8 -> 0.4 (0.4)
    assert m["forgetting"] == pytest.approx(0.4)
    assert m["FWT"] is None                     # no R[j-1][j] in class-incremental matrices
    assert m["average_incremental_accuracy"] == pytest.approx((0.9 + 0.7 + (0.5 + 0.4 + 0.7) / 3) / 3)


def test_forgetting_uses_the_best_earlier_score_and_fwt_with_full_matrix():
    R = [[0.5, 0.2, 0.1],
         [0.9, 0.6, 0.3],
         [0.7, 0.5, 0.8]]
    m = cl.continual_metrics(R, baseline=[0.1, 0.1, 0.1])
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.6 - 0.5)) / 2)
    assert m["BWT"] == pytest.approx(((0.7 - 0.5) + (0.5 - 0.6)) / 2)
    assert m["FWT"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    single = cl.continual_metrics([[0.4]])
    assert single["ACC"] == 0.4 and single["BWT"] is None and single["forgetting"] is None


def test_metrics_reject_bad_matrices():
    with pytest.raises(ValueError, match="T x T"):
        cl.continual_metrics([[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"R\[1\]\[1\]"):
        cl.continual_metrics([[0.1, None], [0.2, None]])


def test_domain_metrics_on_hand_written_losses():
    L = [[1.0, 3.0], [2.0, 1.5]]
    m = cl.domain_metrics(L)
    assert m["final_mean_perplexity"] == pytest.approx((math.exp(2.0) + math.exp(1.5)) / 2)
    assert m["forgetting"] == [pytest.approx(math.exp(2.0) - math.exp(1.0))]
    assert m["relative_forgetting"] == [pytest.approx(math.exp(1.0) - 1)]
    assert m["BWT_loss"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# task splits

def test_clinc_is_10_domains_of_15_intents():
    tasks = cl.clinc_tasks(SHARED_DATA)
    assert len(tasks) == 10 and all(len(t["labels"]) == 15 for t in tasks)
    labels = [label for t in tasks for label in t["labels"]]
    assert len(set(labels)) == 150
    assert tasks[0]["name"] == "banking" and "freeze account" in tasks[0]["labels"]
    for t in tasks:
        assert len(t["train"]) == 15 * 100 and len(t["test"]) == 15 * 30
        assert {label for _, label in t["train"]} == set(t["labels"])


def test_banking_is_7_seeded_tasks_of_11_and_stable():
    tasks = cl.banking_tasks(SHARED_DATA)
    assert len(tasks) == 7 and all(len(t["labels"]) == 11 for t in tasks)
    assert len({label for t in tasks for label in t["labels"]}) == 77
    assert sum(len(t["train"]) for t in tasks) == 10003 and sum(len(t["test"]) for t in tasks) == 3080
    # the order is random.Random(0).shuffle of categories.json: stable across runs
    with open(os.path.join(SHARED_DATA, "banking77", "categories.json")) as f:
        order = json.load(f)
    random.Random(0).shuffle(order)
    assert tasks[0]["labels"] == [cl.label_name(c) for c in order[:11]]
    assert [t["labels"] for t in cl.banking_tasks(SHARED_DATA)] == [t["labels"] for t in tasks]
    assert [t["labels"] for t in cl.banking_tasks(SHARED_DATA, seed=1)] != [t["labels"] for t in tasks]
    # multi-line quoted texts were parsed as one example each
    assert all("text,category" not in text for t in tasks for text, _ in t["train"])


def test_shrink_tasks_sizes():
    small = cl.shrink_tasks(cl.clinc_tasks(SHARED_DATA), n_tasks=3, labels_per_task=2, train_per_label=4,
                            test_per_label=1)
    assert len(small) == 3 and all(len(t["labels"]) == 2 and len(t["train"]) == 8 and len(t["test"]) == 2
                                   for t in small)
    with pytest.raises(ValueError, match="train_per_label"):
        cl.shrink_tasks(small, train_per_label=0)
    with pytest.raises(ValueError, match="n_tasks .--tasks. is 4, but the dataset has 3 tasks"):
        cl.shrink_tasks(small, n_tasks=4)


# -----------------------------------------------------------------------------
# the classifier on rigged toy models

class CopyModel(nn.Module):
    """Rigged LM over bytes: the logit of token v is 3 x (how often v occurred so far),
    the state carrying the counts, so it prefers labels made of the query's letters."""

    def __init__(self, vocab=257):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None, state=None):
        counts = nn.functional.one_hot(idx, self.vocab).float().cumsum(1)
        if state is not None:
            counts = counts + state["counts"][:, None]
        logits = 3 * counts + self.dummy
        return logits, None, {"counts": counts[:, -1], "pos": idx.shape[1]}


def test_classifier_picks_the_label_the_rigged_model_prefers():
    model, tok = CopyModel(), ByteTokenizer()
    labels = ["xxx", "qqq", "zzz"]
    queries = ["zz zz", "qq q", "x"]
    assert cl.classify(model, tok, queries, labels) == ["zzz", "qqq", "xxx"]
    # from a carried state: the context already holds many q's, so q wins unless the query outweighs it
    _, state = cl.prefill(model, tok.encode("q" * 5), 16, torch.device("cpu"))
    assert cl.classify(model, tok, ["x", "xxxxxxxxxxxx"], labels, state=state) == ["qqq", "xxx"]
    assert cl.accuracy(model, tok, [("zz", "zzz"), ("x", "qqq")], labels) == 0.5


# -----------------------------------------------------------------------------
# each arm on a tiny model

@pytest.fixture(scope="module")
def tiny_tasks():
    return cl.shrink_tasks(cl.clinc_tasks(SHARED_DATA), n_tasks=2, labels_per_task=2, train_per_label=3,
                           test_per_label=2)


@pytest.mark.parametrize("arch,arms", [("transformer", cl.ARMS), ("hope_attention", ("in_context_memory",))])
def test_every_arm_runs_and_fills_the_lower_triangle(arch, arms, tiny_tasks):
    """All arms on a Transformer; the in-context-memory arm on a model with CMS fast weights."""
    torch.manual_seed(0)
    model, tok = build_model({**TINY, "arch": arch}), ByteTokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = cl.IntentSettings(steps_per_task=2, batch_size=2, lr=1e-3, stream_per_label=2, segment_len=64)
    results = cl.run_intents(model, tok, tiny_tasks, arms, settings, log=None)
    assert list(results["arms"]) == list(arms)
    for arm, r in results["arms"].items():
        R = r["R"]
        assert R[0][1] is None and all(0.0 <= v <= 1.0 for v in (R[0][0], R[1][0], R[1][1])), arm
        assert r["ACC"] == pytest.approx((R[1][0] + R[1][1]) / 2)
        assert r["BWT"] == pytest.approx(R[1][0] - R[0][0])
    if "sequential" in arms:
        assert "train_loss_last" in results["arms"]["sequential"] and "train_loss_last" in results["arms"]["joint"]
        assert results["arms"]["sequential"]["skipped_steps"] == results["arms"]["joint"]["skipped_steps"] == 0
    for k, v in model.state_dict().items():       # training arms work on a copy
        assert torch.equal(v, before[k]), k


def test_non_finite_fine_tuning_steps_are_skipped_and_counted(tiny_tasks):
    """Every second step's loss is NaN: those 2 of 4 steps are not applied and are counted
    (as train.py and eval.babilong's fine-tune); the other 2 still train, and no weight turns
    NaN. Kills stepping on a NaN gradient (clipping by a NaN norm makes every weight NaN)."""
    torch.manual_seed(0)
    model, tok = build_model({**TINY, "arch": "transformer"}), ByteTokenizer()
    before = [p.detach().clone() for p in model.parameters()]
    forward, calls = model.forward, []

    def every_second_loss_nan(*args, **kwargs):
        logits, loss, state = forward(*args, **kwargs)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) % 2 == 0 else loss, state
    model.forward = every_second_loss_nan
    settings = cl.IntentSettings(steps_per_task=4, batch_size=2, lr=1e-3)
    losses, skipped = cl.finetune_on(model, tok, tiny_tasks[0]["train"], 4, settings, "cpu", random.Random(0))
    assert skipped == 2 and len(losses) == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_sequential_finetuning_learns_the_task():
    """Enough steps on one tiny task: its accuracy beats chance (2 labels, 4 test examples)."""
    tasks = [{"name": "toy", "labels": ["yes", "no"],
              "train": [("sunny", "yes"), ("rainy", "no")] * 4,
              "test": [("sunny", "yes"), ("rainy", "no")] * 2}]
    torch.manual_seed(0)
    model, tok = build_model({**TINY, "arch": "transformer"}), ByteTokenizer()
    r = cl.run_arm("sequential", model, tok, tasks, cl.IntentSettings(steps_per_task=20, batch_size=4, lr=5e-3))
    assert r["R"][0][0] == 1.0 and r["train_loss_last"] < r["train_loss_first"]


def test_unknown_arm_is_an_error(tiny_tasks):
    with pytest.raises(ValueError, match="unknown arm"):
        cl.run_arm("ewc", CopyModel(), ByteTokenizer(), tiny_tasks, cl.IntentSettings())


# -----------------------------------------------------------------------------
# sequential-domain language modelling

def test_domains_protocol_shows_forgetting_on_tiny_texts():
    rng = random.Random(0)
    domains = [{"name": name, "train": "".join(rng.choice(alphabet) for _ in range(4000)),
                "eval": "".join(rng.choice(alphabet) for _ in range(600))}
               for name, alphabet in (("ab", "ab"), ("cd", "cd"))]
    torch.manual_seed(0)
    model = build_model({**TINY, "arch": "transformer"})
    settings = cl.DomainSettings(steps_per_domain=25, batch_size=4, seq_len=32, lr=5e-3, eval_tokens=256)
    r = cl.run_domains(model, ByteTokenizer(), domains, settings, log=None)
    L = r["loss"]
    assert len(L) == 2 and all(len(row) == 2 for row in L)
    assert L[0][0] < r["initial_loss"][0] - 2.0          # learned domain ab (ln 257 -> about ln 2)
    assert L[1][0] > L[0][0]                             # training on cd raised ab's loss
    assert r["BWT_loss"] > 0 and r["forgetting"][0] > 0
    assert r["perplexity"][1][1] == pytest.approx(math.exp(L[1][1]))
    assert r["skipped_steps"] == 0


@pytest.mark.parametrize("name", cl.DOMAINS)
def test_builtin_domains_have_disjoint_train_and_held_out_text(name):
    train, held = cl.domain_text(name, SHARED_DATA)
    assert len(train) > 10_000 and len(held) > 10_000
    assert held[:2000] not in train


def test_builtin_domain_holds_out_the_builtin_corpus_validation_chapters():
    """The builtin domain's held-out text is the built-in corpus's default validation split
    (data.prepare: is_val_document(index, 0, 0.01)), its train text every other chapter: a
    model trained on `dataset: builtin` never trained on it. Kills the old New Testament
    hold-out, which every default training run had trained on."""
    from data.builtin import iter_builtin_documents
    from data.prepare import DEFAULT_VAL_FRACTION, is_val_document
    chapters = list(iter_builtin_documents())
    expected = [c for i, c in enumerate(chapters) if is_val_document(i, 0, DEFAULT_VAL_FRACTION)]
    train, held = cl.domain_text("builtin")
    assert len(expected) == 8 and held == "\n".join(expected)
    assert train == "\n".join(c for c in chapters if c not in expected)
    assert not any(c in train for c in expected)
    assert "Matthew 1\n\n" in train                                     # the New Testament trains too


def test_builtin_overlap_note_names_a_checkpoint_trained_with_another_val_fraction():
    """A checkpoint trained on builtin with a smaller data.val_fraction trained on some of the
    held-out chapters: a note says how many; the default fraction, other data or no builtin
    domain: no note. Kills scoring training text silently."""
    from config import Config, DataConfig
    assert cl.builtin_overlap_note(Config(), ["builtin", "austen"]) is None
    assert cl.builtin_overlap_note(Config(data=DataConfig(val_fraction=0.001)), ["austen"]) is None
    assert cl.builtin_overlap_note(Config(data=DataConfig(dataset="files:x/*.txt", val_fraction=0.001)),
                                   ["builtin"]) is None
    note = cl.builtin_overlap_note(Config(data=DataConfig(val_fraction=0.001)), ["builtin"])
    assert note.startswith("the checkpoint trained on the built-in corpus with data.val_fraction=0.001, not 0.01: ")
    assert "of the builtin domain's 8 held-out chapters" in note and not note.split(": ")[1].startswith("0 ")
    assert ": 0 of the builtin domain's 8" in cl.builtin_overlap_note(Config(data=DataConfig(val_fraction=0.05)),
                                                                      ["builtin"])


def test_domains_cli_notes_a_checkpoint_trained_on_builtin_with_another_val_fraction(tmp_path, monkeypatch, capsys):
    """The CLI prints the overlap note as `note: ...` and records it in the results' notes;
    it still runs. Kills a note computed but never shown."""
    from config import Config, DataConfig
    cfg = Config(data=DataConfig(val_fraction=0.001, tokenizer="bytes"))
    monkeypatch.setattr(cl, "load_checkpoint", lambda *a: (build_model(TINY), cfg, ByteTokenizer(), "cpu"))
    out = tmp_path / "out"
    results = cl.main(["domains", "--domains", "builtin", "--checkpoint", "ckpt", "--out", str(out), "--steps", "0",
                       "--seq-len", "16", "--eval-tokens", "64", "--train-chars", "2000"])
    note = cl.builtin_overlap_note(cfg, ["builtin"])
    assert results["notes"] == [note] and f"note: {note}\n" in capsys.readouterr().out
    assert json.loads((out / "continual_domains.json").read_text())["notes"] == [note]
    assert results["held_out_tokens"] == [64]


def test_domains_record_held_out_tokens_and_note_a_short_held_out_text():
    """run_domains records the tokens scored per domain and a note for a held-out text
    shorter than eval_tokens (builtin with GPT-2: ~7.3K < 16,384)."""
    rng = random.Random(0)
    domains = [{"name": "long", "train": "ab" * 200, "eval": "".join(rng.choice("ab") for _ in range(300))},
               {"name": "short", "train": "cd" * 200, "eval": "cd" * 50}]
    model = build_model(TINY)
    r = cl.run_domains(model, ByteTokenizer(), domains, cl.DomainSettings(steps_per_domain=0, seq_len=16,
                                                                          eval_tokens=200), "cpu", log=None)
    assert r["held_out_tokens"] == [200, 99]
    assert r["notes"] == ["domain short: its held-out text has 99 tokens, fewer than eval_tokens=200: "
                          "all of them are scored"]
    # the checkpoint's config of another val_fraction on a builtin domain: its overlap note first
    from config import Config, DataConfig
    cfg = Config(data=DataConfig(val_fraction=0.05))
    domains[0]["name"] = "builtin"
    r = cl.run_domains(model, ByteTokenizer(), domains, cl.DomainSettings(steps_per_domain=0, seq_len=16,
                                                                          eval_tokens=200), "cpu", log=None, cfg=cfg)
    assert r["notes"][0] == cl.builtin_overlap_note(cfg, ["builtin", "short"]) and len(r["notes"]) == 2


def test_plots_are_written(tmp_path, tiny_tasks):
    results = {"arms": {"icl": {"R": [[0.5, None], [0.25, 1.0]], "tasks": ["a", "b"]}}}
    paths = cl.plot_intents(results, str(tmp_path))
    paths += cl.plot_domains({"domains": ["a", "b"], "perplexity": [[2.0, 9.0], [3.0, 2.5]]}, str(tmp_path))
    assert len(paths) == 3 and all(os.path.getsize(p) > 1000 for p in paths)


def test_cli_bad_arm_exits_2():
    r = subprocess.run([sys.executable, "-m", "eval.continual", "intents", "--checkpoint", "nowhere", "--arms", "ewc",
                        "--out", "x"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("arms, message", [
    ("seq", "names unknown arm(s) ['seq']; choose from sequential,icl,in_context_memory,joint"),
    (",", "names no arm; choose from sequential,icl,in_context_memory,joint"),
    ("icl,icl", "names 'icl' twice")])
def test_cli_bad_arms_are_said_in_argparse_form(arms, message, tmp_path, monkeypatch, capsys):
    """--arms is said as argparse says every other flag ("error: argument --arms: ...",
    docs/EVAL.md), before the data or the checkpoint is read; it was "error: --arms 'seq': ..."."""
    monkeypatch.setattr(cl, "intent_tasks", lambda *a: pytest.fail("read the data"))
    with pytest.raises(SystemExit) as exit_info:
        cl.main(["intents", "--checkpoint", "ckpt", "--arms", arms, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: argument --arms: {message}\n"


def test_cli_names_its_files_by_dataset(tmp_path, monkeypatch, capsys):
    """The intents CLI writes continual_<dataset>.json and continual_<dataset>_*.png (as
    eval.run does), so a clinc and a banking run into one --out keep both."""
    class Cfg:
        class model:
            arch = "hope"

        class train:
            seq_len = 64
    monkeypatch.setattr(cl, "intent_tasks", lambda dataset, data_dir: [])
    monkeypatch.setattr(cl, "shrink_tasks", lambda tasks, *a, **kw: tasks)
    monkeypatch.setattr(cl, "load_checkpoint", lambda path, device: (None, Cfg, None, "cpu"))
    monkeypatch.setattr(cl, "run_intents", lambda *a: {"arms": {"icl": {"R": [[0.5]], "tasks": ["a"]}}})
    for dataset in ("clinc", "banking"):
        cl.main(["intents", "--checkpoint", "ckpt", "--dataset", dataset, "--arms", "icl", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == sorted(f"continual_{d}{end}" for d in ("clinc", "banking")
                                                  for end in (".json", "_accuracy.png", "_R_icl.png"))
    # a folder where the results file goes: one line (it was an IsADirectoryError traceback)
    (tmp_path / "taken" / "continual_clinc.json").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        cl.main(["intents", "--checkpoint", "ckpt", "--arms", "icl", "--out", str(tmp_path / "taken")])
    assert e.value.code == 2 and "Is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["domains", "--seq-len", "0"], "argument --seq-len: must be >= 1, got 0"),     # not "the checkpoint's"
    (["domains", "--seq-len", "-5"], "argument --seq-len: must be >= 1, got -5"),
    (["domains", "--eval-tokens", "0"], "argument --eval-tokens: must be >= 1, got 0"),
    (["domains", "--steps", "-1"], "argument --steps: must be >= 0, got -1"),
    (["intents", "--icl-shots", "-1"], "argument --icl-shots: must be >= 1, got -1"),
    (["intents", "--icl-shots", "0"], "argument --icl-shots: must be >= 1, got 0"),
    (["intents", "--stream-per-label", "0"], "argument --stream-per-label: must be >= 1, got 0"),
    (["intents", "--max-len", "0"], "argument --max-len: must be >= 1, got 0"),
    (["intents", "--tasks", "0"], "argument --tasks: must be >= 1, got 0"),
    (["intents", "--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["intents", "--batch-size", "x"], "argument --batch-size: expected an integer >= 1, got 'x'"),
])
def test_cli_bad_flags_are_one_line_errors_naming_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cl.main([*argv, "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert os.listdir(tmp_path) == []


def test_cli_checks_out_before_loading(tmp_path, monkeypatch, capsys):
    """A file as --out is an error up front, not after the arms have run."""
    monkeypatch.setattr(cl, "load_checkpoint", lambda *a: pytest.fail("loaded before checking --out"))
    monkeypatch.setattr(cl, "intent_tasks", lambda *a: pytest.fail("read data before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for command in ("intents", "domains"):
        with pytest.raises(SystemExit) as exit_info:
            cl.main([command, "--checkpoint", "ckpt", "--out", str(a_file)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: --out {a_file} is a file, not a folder; give a folder\n"
    assert a_file.read_text() == "keep me"


def test_settings_are_checked_by_the_library_functions_too():
    with pytest.raises(ValueError, match="icl_shots"):
        cl.run_intents(None, None, [], ["icl"], cl.IntentSettings(icl_shots=-1), log=None)
    with pytest.raises(ValueError, match="seq_len"):
        cl.run_domains(None, None, [{"name": "a"}], cl.DomainSettings(seq_len=0), device="cpu")


# -----------------------------------------------------------------------------
# metrics by hand, held-out loss, class-incremental scoring, state copies

def test_forgetting_is_negative_when_a_task_improves_later():
    """forgetting_j = max over the stages j <= l before the last of R[l][j], minus R[T][j]
    (Chaudhry et al., from the stage the task is learned); a task that improved later has negative forgetting (the final row is not
    among the l). Kills taking the max over l up to T (which clips forgetting at 0)."""
    m = cl.continual_metrics([[0.5, None], [0.8, 0.6]])
    assert m["forgetting"] == pytest.approx(0.5 - 0.8)
    assert m["BWT"] == pytest.approx(0.8 - 0.5)


def test_forgetting_counts_only_stages_after_the_task_is_learned():
    """With a full R (every task scored at every stage), forgetting_j's max runs over the
    stages l >= j only: task 1 scored 0.9 at stage 0, before it was learned, and that is not
    a score it could forget (docs/CONTINUAL.md). By hand: task 0: max(0.5, 0.6) - 0.5 = 0.1;
    task 1: 0.4 - 0.3 = 0.1 (0.9 - 0.3 = 0.6 if stage 0 counted). Kills the max from l = 0."""
    m = cl.continual_metrics([[0.5, 0.9, 0.1], [0.6, 0.4, 0.2], [0.5, 0.3, 0.8]])
    assert m["forgetting"] == pytest.approx((0.1 + 0.1) / 2)


def test_fwt_subtracts_each_tasks_own_baseline():
    """FWT = mean over j >= 1 of R[j-1][j] - b_j, with b_j the starting model's score on task j
    (distinct baselines here). Kills pairing R[j-1][j] with b_{j-1}."""
    R = [[0.5, 0.2, 0.1],
         [0.9, 0.6, 0.3],
         [0.7, 0.5, 0.8]]
    m = cl.continual_metrics(R, baseline=[0.05, 0.15, 0.4])
    assert m["FWT"] == pytest.approx(((0.2 - 0.15) + (0.3 - 0.4)) / 2)


def test_domain_metrics_on_three_hand_written_domains():
    """L[i][j] = loss on domain j after stage i, P = exp(L): final mean loss and perplexity,
    forgetting_j = P[T][j] - P[j][j], relative P[T][j] / P[j][j] - 1 and their means over
    the T - 1 earlier domains, BWT in loss. Kills final_mean_loss from another row, means
    divided by T, and a relative forgetting against row 0 instead of the diagonal."""
    L = [[1.0, 3.0, 3.5],
         [1.5, 0.5, 3.0],
         [2.0, 1.0, 0.8]]
    m = cl.domain_metrics(L)
    e = math.exp
    assert m["final_mean_loss"] == pytest.approx((2.0 + 1.0 + 0.8) / 3)
    assert m["final_mean_perplexity"] == pytest.approx((e(2.0) + e(1.0) + e(0.8)) / 3)
    assert m["forgetting"] == [pytest.approx(e(2.0) - e(1.0)), pytest.approx(e(1.0) - e(0.5))]
    assert m["relative_forgetting"] == [pytest.approx(e(1.0) - 1), pytest.approx(e(0.5) - 1)]
    assert m["mean_forgetting"] == pytest.approx((e(2.0) - e(1.0) + e(1.0) - e(0.5)) / 2)
    assert m["mean_relative_forgetting"] == pytest.approx((e(1.0) - 1 + e(0.5) - 1) / 2)
    assert m["BWT_loss"] == pytest.approx(((2.0 - 1.0) + (1.0 - 0.5)) / 2)


def test_domain_metrics_of_a_diverged_stage_are_infinite_not_an_overflow_error():
    """A stage that sends a domain's loss past ~709 nats (a diverged fine-tune) raised
    math.exp's OverflowError after the whole protocol had run: its perplexity is inf."""
    m = cl.domain_metrics([[1.0, 2.0], [1000.0, 0.5]])
    assert m["forgetting"] == [math.inf] and m["final_mean_perplexity"] == math.inf
    assert m["BWT_loss"] == pytest.approx(999.0)


class BigramTable(nn.Module):
    """Stateless stub with p(next | current) = table[current][next]."""

    def __init__(self, table):
        super().__init__()
        self.log_table = nn.Parameter(torch.tensor(table).log(), requires_grad=False)

    def forward(self, idx, targets=None, state=None):
        return self.log_table[idx], None, state


def test_held_out_loss_scores_each_token_of_consecutive_windows_once():
    """held_out_loss: windows of seq_len + 1 tokens starting every seq_len tokens, then one
    shorter window for the rest, so each token after the first is a target exactly once; the
    mean NLL by hand from the bigram table. 11 tokens, seq_len 4: targets are tokens 1..10
    (two full windows, then a window of 3 tokens). Kills a stride of seq_len + 1 (tokens
    skipped) and dropping the tokens after the last full window, which run_domains counted
    in held_out_tokens as scored (builtin's ~7.3K GPT-2 tokens at seq_len 4096: 4,096 scored)."""
    table = [[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]]
    ids = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0]
    expected = -sum(math.log(table[a][b]) for a, b in zip(ids[:10], ids[1:11])) / 10
    for batch_size in (1, 2, 8):           # the short window is batched on its own
        assert cl.held_out_loss(BigramTable(table), ids, 4, batch_size, "cpu") == pytest.approx(expected, rel=1e-6)


def test_run_domains_scores_as_many_tokens_as_held_out_tokens_says():
    """held_out_tokens is the number of targets the model is scored on, not more: 300
    held-out tokens at seq_len 128 are 2 full windows and a window of the last 45 targets."""
    seen = []

    class Counting(BigramTable):
        def forward(self, idx, targets=None, state=None):
            seen.append(idx.numel())
            return super().forward(idx, targets, state)
    model = Counting([[1 / 257] * 257] * 257)
    domains = [{"name": "d", "train": "ab" * 200, "eval": "abc" * 200}]
    r = cl.run_domains(model, ByteTokenizer(), domains, cl.DomainSettings(steps_per_domain=0, seq_len=128,
                                                                          eval_tokens=300), "cpu", log=None)
    assert r["held_out_tokens"] == [300] and sum(seen) == 2 * 300     # the initial row and stage 1


def test_rows_score_every_seen_label_without_a_task_id():
    """Class-incremental: after task i, the test queries of every task j <= i are ranked over
    the labels of ALL tasks seen so far (no task id). With CopyModel a query 'aa' picks 'aaa'
    over 'bbb', so task 1's query labelled 'bbb' is missed once 'aaa' is a candidate; no
    training (0 steps), so R is fixed by the labels offered. Kills ranking over the current
    task's labels only, or over task j's labels (task-incremental)."""
    tasks = [{"name": "a", "labels": ["aaa"], "train": [("aa", "aaa")], "test": [("aa", "aaa")]},
             {"name": "b", "labels": ["bbb"], "train": [("bb", "bbb")], "test": [("aa", "bbb"), ("bb", "bbb")]}]
    r = cl.run_arm("sequential", CopyModel(), ByteTokenizer(), tasks, cl.IntentSettings(steps_per_task=0))
    assert r["R"] == [[1.0, None], [1.0, 0.5]]


def test_classify_from_a_state_leaves_that_state_unchanged():
    """The icl / in_context_memory arms classify every query from one context state, reading
    each query and scoring its labels on that state itself (no copy): a forward leaves the
    state it is passed as it was, so the state after classifying is the one before and a
    second pass answers the same. A tiny HOPE, whose state holds fast weights and CMS levels."""
    from model import build_model
    torch.manual_seed(0)
    model, tok = build_model({"arch": "hope", "vocab_size": 257, "d_model": 16, "n_layer": 1, "n_head": 2}), ByteTokenizer()
    _, state = cl.prefill(model, tok.encode("q" * 40), 16, torch.device("cpu"))
    before = [t.clone() for t in state_tensors(state)]
    first = cl.classify(model, tok, ["x", "xxxxxxxxxxxx"], ["xxx", "qqq", "zzz"], state=state, segment_len=8)
    assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(state), strict=True))
    assert cl.classify(model, tok, ["x", "xxxxxxxxxxxx"], ["xxx", "qqq", "zzz"], state=state, segment_len=8) == first


@pytest.mark.parametrize("arm", ["icl", "in_context_memory"])
def test_context_arms_carry_every_seen_task_into_the_state(arm):
    """After task i the icl arm shows demonstrations of every label seen so far, and the
    in_context_memory arm has streamed every task so far with the state carried. CopyModel
    ranks by letter counts in its context: with task 0's 'aaaa' example still in it, the
    neutral query 'x' goes to 'aaa' (a: 7 > b: 5), so R[1] = [1, 0]; a context of task 1
    alone would flip it. Kills icl demonstrations of the current task only and a stream that
    restarts from an empty state at each task."""
    tasks = [{"name": "a", "labels": ["aaa"], "train": [("aaaa", "aaa")], "test": [("x", "aaa")]},
             {"name": "b", "labels": ["bbb"], "train": [("bb", "bbb")], "test": [("x", "bbb")]}]
    r = cl.run_arm(arm, CopyModel(), ByteTokenizer(), tasks, cl.IntentSettings(segment_len=16))
    assert r["R"] == [[1.0, None], [1.0, 0.0]]


def test_max_len_limits_only_the_arms_that_read_a_context():
    """max_len (--max-len, default the checkpoint's seq_len) bounds the icl / in_context_memory
    context; the sequential and joint arms read no context and ran into context_room's "leaves
    no context" error all the same (a byte-level model at seq_len 128 on CLINC, whose longest
    query and label take 166 bytes, could run no arm). context_tokens is recorded only with a
    context arm."""
    tasks = [{"name": "a", "labels": ["aaa"], "train": [("aaaa", "aaa")], "test": [("x" * 40, "aaa")]},
             {"name": "b", "labels": ["bbb"], "train": [("bb", "bbb")], "test": [("x", "bbb")]}]
    settings = cl.IntentSettings(steps_per_task=0, max_len=40, segment_len=16)
    r = cl.run_intents(CopyModel(), ByteTokenizer(), tasks, ("sequential", "joint"), settings, device="cpu", log=None)
    assert list(r["arms"]) == ["sequential", "joint"] and "context_tokens" not in r
    with pytest.raises(ValueError, match=r"^max_len=40 leaves no context: the longest query and label take 59 tokens$"):
        cl.run_intents(CopyModel(), ByteTokenizer(), tasks, ("sequential", "icl"), settings, device="cpu", log=None)


@pytest.mark.parametrize("arm", ["icl", "in_context_memory"])
def test_attention_context_arms_read_at_most_max_len(arm, monkeypatch):
    """An attention model (CopyModel has no recurrent config) reads its context cut to the
    last max_len - (longest query + label) tokens: the query 'x' (16 bytes with the prompt)
    and a 3-letter label leave 45 - 20 = 25 for the context, so after task 1 the stream's
    last 25 bytes hold task 1's example and none of task 0's 'aaaa': 'x' goes to 'bbb' and
    R[1] = [0, 1], the flip of the uncut test above. Every context read fits the room.
    Kills an unbounded KV cache past the trained context (a Transformer read ~29K tokens
    of CLINC stream at seq_len 4096)."""
    tasks = [{"name": "a", "labels": ["aaa"], "train": [("aaaa", "aaa")], "test": [("x", "aaa")]},
             {"name": "b", "labels": ["bbb"], "train": [("bb", "bbb")], "test": [("x", "bbb")]}]
    read, prefill = [], cl.prefill
    monkeypatch.setattr(cl, "prefill", lambda model, ids, *a, **kw: read.append(len(ids)) or prefill(model, ids, *a, **kw))
    r = cl.run_arm(arm, CopyModel(), ByteTokenizer(), tasks, cl.IntentSettings(segment_len=16, max_len=45))
    assert max(read) <= 25 and read
    if arm == "in_context_memory":
        assert r["R"] == [[1.0, None], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"^max_len=20 leaves no context: the longest query and label take 20 tokens$"):
        cl.run_arm(arm, CopyModel(), ByteTokenizer(), tasks, cl.IntentSettings(max_len=20))
    # a recurrent model reads everything: its state is constant-size
    assert cl.context_room(build_model({**TINY, "arch": "hope"}), ByteTokenizer(), tasks, 45) is None


@pytest.mark.parametrize("dataset, files, message", [
    ("clinc", {"clinc150/domains.json": b"{", "clinc150/data_full.json": b"{}"},
     "clinc150/domains.json is not valid JSON: Expecting property name enclosed in double quotes (line 1)"),
    ("clinc", {"clinc150/domains.json": b'{"a": ["x"]}', "clinc150/data_full.json": b'{"train": 5, "test": []}'},
     "clinc150/data_full.json does not hold {'train': [[text, intent], ...], 'test': [...]}"),
    ("clinc", {"clinc150/domains.json": b'{"a": ["x"]}', "clinc150/data_full.json": b'{"train": [], "test": [\xff]}'},
     "clinc150/data_full.json is not UTF-8 text (byte 0xff at offset 23)"),
    ("banking", {"banking77/categories.json": b'["a"]', "banking77/train.csv": b"foo,bar\n1,2\n"},
     "banking77/train.csv has the columns ['foo', 'bar'], expected text,category"),
    ("banking", {"banking77/categories.json": b'{"a": 1}'}, "banking77/categories.json does not hold a list of category names"),
])
def test_cli_damaged_intent_data_is_one_line_naming_the_file(dataset, files, message, tmp_path, monkeypatch, capsys):
    """A --data-dir whose CLINC150 / Banking77 files are not JSON, not UTF-8 or not shaped as
    the loaders expect: one line naming the file, before the checkpoint loads."""
    monkeypatch.setattr(cl, "load_checkpoint", lambda *a: pytest.fail("loaded the checkpoint before the data"))
    for name, content in files.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        cl.main(["intents", "--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--checkpoint", "ckpt",
                 "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path / 'data'}/{message}\n"


def test_cli_domains_and_data_dir_are_checked_by_name(tmp_path, monkeypatch, capsys):
    """An empty --domains and a --data-dir that is not a folder name their flag, before the
    checkpoint loads; held-out text shorter than a window names its domain and eval_tokens."""
    monkeypatch.setattr(cl, "load_checkpoint", lambda *a: pytest.fail("loaded the checkpoint"))
    for extra, message in ((["--domains", ","], "--domains ',' names no domain; choose from "),
                           (["--domains", "nope"],
                            "unknown domain 'nope'; choose from builtin, austen, shakespeare, babi\n"),
                           (["--data-dir", str(tmp_path / "none")], f"--data-dir {tmp_path / 'none'} is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            cl.main(["domains", *extra, "--checkpoint", "ckpt", "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")
    model = build_model(TINY)
    domains = [{"name": "tiny", "train": "x" * 100, "eval": "y" * 100}]
    with pytest.raises(ValueError, match=r"^domain tiny: 6 held-out tokens, fewer than seq_len \+ 1 = 17 "
                                         r"\(eval_tokens=5\)$"):
        cl.run_domains(model, ByteTokenizer(), domains, cl.DomainSettings(seq_len=16, eval_tokens=5), "cpu", log=None)


def test_held_out_loss_scores_a_last_window_that_ends_on_the_last_token():
    """run_domains scores eval_tokens + 1 tokens, k x seq_len + 1 with the defaults (16,385 =
    128 x 128 + 1), so the last window ends exactly on the last token and must be scored.
    9 tokens, seq_len 4: targets are tokens 1..8. Kills a range that stops a window early."""
    table = [[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]]
    ids = [0, 1, 2, 2, 1, 0, 0, 2, 1]
    expected = -sum(math.log(table[a][b]) for a, b in zip(ids[:8], ids[1:9])) / 8
    assert cl.held_out_loss(BigramTable(table), ids, 4, 1, "cpu") == pytest.approx(expected, rel=1e-6)


def test_classify_from_a_state_scores_space_label(monkeypatch):
    """The icl / in_context_memory arms score " " + label name after 'Intent:', as the
    stateless path does (encode_pair). Kills scoring the names without their space."""
    model, tok = CopyModel(), ByteTokenizer()
    _, state = cl.prefill(model, tok.encode("q"), 16, torch.device("cpu"))
    scored = []
    monkeypatch.setattr(cl, "continuation_logprobs", lambda m, last, s, ids, device, batch_size: scored.extend(ids)
                        or [0.0] * len(ids))
    cl.classify(model, tok, ["x"], ["card arrival", "balance"], state=state)
    assert scored == [tok.encode(" card arrival"), tok.encode(" balance")]


def test_joint_arm_trains_steps_per_task_times_tasks_on_every_example(monkeypatch, tiny_tasks):
    """joint, the upper bound: one fine-tuning on all tasks' examples with as many steps as
    sequential takes over the whole stream (steps_per_task x T). Kills giving it the steps
    of one task."""
    calls = []
    monkeypatch.setattr(cl, "finetune_on", lambda model, tok, examples, steps, *rest: calls.append(
        (len(examples), steps)) or ([], 0))
    cl.run_arm("joint", CopyModel(), ByteTokenizer(), tiny_tasks, cl.IntentSettings(steps_per_task=3))
    assert calls == [(sum(len(t["train"]) for t in tiny_tasks), 3 * len(tiny_tasks))]


def test_held_out_domain_texts_are_the_documented_parts():
    """domain_text's held-out parts: austen holds out Persuasion (the other five novels
    train), shakespeare the last 10% of tiny-shakespeare. Kills another book or cut."""
    from cli import read_text
    text = read_text(os.path.join(SHARED_DATA, "shakespeare", "tinyshakespeare.txt"))
    train, held = cl.domain_text("shakespeare", SHARED_DATA)
    assert train + held == text and len(held) == len(text) - int(0.9 * len(text))
    _, held = cl.domain_text("austen", SHARED_DATA)
    assert held == read_text(os.path.join(SHARED_DATA, "austen", "persuasion.txt"))


def test_icl_context_has_icl_shots_demonstrations_per_seen_label_after_end_of_text(monkeypatch, tiny_tasks):
    """The icl arm's context: end-of-text, then icl_shots demonstrations of every label seen
    so far. in_context_memory starts its stream with end-of-text once, then carries the state
    (no end-of-text before the next task). Kills ignoring icl_shots and moving end-of-text."""
    tok, read = ByteTokenizer(), []
    monkeypatch.setattr(cl, "prefill", lambda model, ids, segment_len, device, state=None: read.append(ids) or
                        (None, "state"))
    settings = cl.IntentSettings(icl_shots=2, stream_per_label=1)
    cl._icl_state(None, tok, tiny_tasks, settings, random.Random(0), "cpu")
    n_labels = sum(len(t["labels"]) for t in tiny_tasks)
    assert read[0][0] == tok.eot_id and tok.decode(read[0][1:]).count("\nIntent:") == 2 * n_labels
    monkeypatch.setattr(cl, "accuracy", lambda *a, **kw: 0.0)
    cl.run_arm("in_context_memory", nn.Linear(1, 1), tok, tiny_tasks[:2], settings, device="cpu")
    assert read[1][0] == tok.eot_id and read[2][0] != tok.eot_id


def test_shrink_tasks_samples_examples_with_its_seed():
    """--train-per-label / --test-per-label keep a seeded sample of each label's examples,
    not its first ones: another seed, another sample. Kills taking the first examples."""
    tasks = cl.clinc_tasks(SHARED_DATA)[:1]
    first = cl.shrink_tasks(tasks, labels_per_task=2, train_per_label=3, seed=0)[0]["train"]
    assert first != cl.shrink_tasks(tasks, labels_per_task=2, train_per_label=3, seed=1)[0]["train"]
    assert first != [ex for ex in tasks[0]["train"] if ex[1] == tasks[0]["labels"][0]][:3] + \
        [ex for ex in tasks[0]["train"] if ex[1] == tasks[0]["labels"][1]][:3]
