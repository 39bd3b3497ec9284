"""eval.run: the quick suite on a tiny trained checkpoint writes results.json (all four
sections) and results.md; during-training metrics; CLI errors."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA
from helpers import prepare_shakespeare

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.d_model=32", "--data.tokenizer=bytes",
        "--train.batch_size=4", "--train.seq_len=64", "--train.lr=3e-3", "--optim.warmup_steps=2",
        "--train.eval_batches=1", "--train.sample_tokens=0", "--logging.wandb=disabled"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny byte-level Transformer trained for a few steps on tiny-shakespeare documents."""
    root = tmp_path_factory.mktemp("run")
    prepared = prepare_shakespeare(root, 60_000, 150)
    out = str(root / "train")
    env = dict(os.environ, WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "train.py", *TINY, f"--data.dataset={prepared}", f"--train.out_dir={out}",
                        "--train.max_steps=6", "--train.eval_every=0", "--train.ckpt_every=6", "--eval.final=false"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_quick_suite_writes_all_sections(checkpoint, tmp_path):
    out = str(tmp_path / "eval")
    env = dict(os.environ, NL_DATA_DIR=SHARED_DATA)
    r = subprocess.run([sys.executable, "-m", "eval.run", "--suite", "quick", "--checkpoint", checkpoint,
                        "--out", out, "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(os.path.join(out, "results.json")))
    for section in ("perplexity", "babilong", "niah", "continual"):
        assert "skipped" not in results[section], (section, results[section])
    p = results["perplexity"]
    assert p["val"]["loss"] > 0 and p["wikitext"]["word_perplexity"] > 1 and 0 <= p["lambada"]["accuracy"] <= 1
    assert p["lambada"]["n"] == 20 and p["wikitext"]["docs"] == 1
    b = results["babilong"]
    assert set(b["label_ranking"]) == {"qa1", "qa2"} and set(b["label_ranking"]["qa1"]) == {"0k", "1k"}
    assert results["niah"]["accuracy"]["niah_single_1"]["1k"] is not None
    c = results["continual"]
    arms = c["intents"]["clinc"]["arms"]
    assert set(arms) == {"sequential", "icl", "in_context_memory", "joint"}
    assert len(arms["icl"]["R"]) == 2 and arms["icl"]["R"][0][1] is None
    assert c["domains"]["domains"] == ["austen", "shakespeare", "babi"] and len(c["domains"]["perplexity"]) == 3
    md = open(os.path.join(out, "results.md")).read()
    for heading in ("## Perplexity", "## BABILong", "## S-NIAH", "## Continual learning", "R matrix, sequential",
                    "Sequential domains"):
        assert heading in md
    for png in ("babilong_heatmap.png", "continual_clinc_accuracy.png", "continual_clinc_R_icl.png",
                "continual_domains_perplexity.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000, png


def test_run_during_training_returns_flat_metrics(checkpoint):
    from checkpoint import load_model
    from data.tokenizer import get_tokenizer
    from eval.run import run_during_training
    model, cfg = load_model(checkpoint)
    model.train()
    metrics = run_during_training(model, get_tokenizer("bytes"), ["perplexity", "continual_quick"],
                                  seq_len=cfg.train.seq_len, data_dir=SHARED_DATA)
    assert model.training                                  # mode restored
    assert metrics["wikitext_word_ppl"] > 1 and 0 <= metrics["lambada_acc"] <= 1
    assert 0 <= metrics["continual_icl_ACC"] <= 1 and "continual_in_context_memory_BWT" in metrics
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(ValueError, match="unknown during-training"):
        run_during_training(model, get_tokenizer("bytes"), ["mmlu"])


@pytest.mark.parametrize("args, message", [
    (["--suite", "huge"], "unknown suite"),
    (["--sections", "perplexity,mmlu"], "unknown section"),
])
def test_cli_errors_exit_2(checkpoint, tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "eval.run", "--checkpoint", checkpoint, "--out", str(tmp_path), *args],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr


def test_missing_checkpoint_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "eval.run", "--checkpoint", str(tmp_path / "none"), "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_out_is_checked_before_loading(tmp_path, monkeypatch, capsys):
    """--out an existing file (or a path through one) is a one-line error before the
    checkpoint is loaded and the suite runs, not FileExistsError after loading."""
    import eval.run as run
    monkeypatch.setattr(run, "load_checkpoint", lambda *a: pytest.fail("loaded before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "eval", "a_file is not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            run.main(["--checkpoint", "ckpt", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: --out {out}") and message in err
        assert err.count("\n") == 1
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: unrecognized arguments: --bogus\n"),
    (["--device"], "error: argument --device: expected one argument\n"),
    # it said "unknown section(s) []"
    (["--sections", ","], "error: --sections ',' names no section; choose from perplexity, babilong, niah, "
                          "continual\n"),
])
def test_flag_errors_are_one_line(tmp_path, capsys, args, message):
    import eval.run as run
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--checkpoint", "ckpt", "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2 and capsys.readouterr().err == message
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# which number goes where (no checkpoint: the evals are stubbed)

def test_niah_section_keeps_greedy_and_ranking_accuracy_apart(monkeypatch):
    """niah_section files evaluate_niah's accuracy under "accuracy" and its ranking accuracy
    under "ranking_accuracy", per task and length. Kills filing the ranking score as accuracy."""
    import eval.niah as niah
    from eval.run import niah_section
    monkeypatch.setattr(niah, "build_niah", lambda *a, **kw: [])
    monkeypatch.setattr(niah, "evaluate_niah", lambda *a, **kw: {
        "accuracy": 0.25, "ranking_accuracy": 0.75, "n": 4, "n_scored": 4, "n_truncated": 1, "n_skipped": 0,
        "seconds": 0.0})
    settings = {"tasks": ["1"], "lengths": ["1k"], "samples": 4, "depths": [0.0], "max_new_tokens": 4,
                "segment_len": 64}
    out = niah_section(object(), None, settings, 64, "cpu", gpt2=object())
    assert out["accuracy"] == {"niah_single_1": {"1k": 0.25}}
    assert out["ranking_accuracy"] == {"niah_single_1": {"1k": 0.75}}
    assert out["counts"]["niah_single_1"]["1k"]["n_truncated"] == 1


def test_run_during_training_flattens_each_metric_under_its_own_name(monkeypatch):
    """run_during_training's flat metrics are the sections' numbers under their names:
    WikiText word ppl, LAMBADA ppl and accuracy, BABILong mean over tasks per score and length,
    S-NIAH per score, task and length, continual ACC and BWT per arm. Kills a metric read from
    the wrong field (e.g. continual ACC from average_incremental_accuracy, 1 - LAMBADA acc)."""
    import eval.run as run
    monkeypatch.setattr(run, "perplexity_section", lambda *a, **kw: {
        "wikitext": {"word_perplexity": 31.0}, "lambada": {"perplexity": 12.0, "accuracy": 0.3}})
    monkeypatch.setattr(run, "babilong_section", lambda *a, **kw: {
        "mean_over_tasks": {"official": {"0k": 0.5, "1k": 0.25}, "label_ranking": {"0k": 0.75, "1k": 0.125}}})
    monkeypatch.setattr(run, "niah_section", lambda *a, **kw: {
        "accuracy": {"niah_single_1": {"1k": 0.5}}, "ranking_accuracy": {"niah_single_1": {"1k": 1.0}}})
    monkeypatch.setattr(run, "continual_section", lambda *a, **kw: {"intents": {"clinc": {"arms": {
        "icl": {"ACC": 0.4, "BWT": -0.1, "average_incremental_accuracy": 0.6}}}}})
    metrics = run.run_during_training(object(), None, list(run.DURING_TRAINING_EVALS), device="cpu", gpt2=object())
    assert metrics == {"wikitext_word_ppl": 31.0, "lambada_ppl": 12.0, "lambada_acc": 0.3,
                       "babilong_official_0k": 0.5, "babilong_official_1k": 0.25,
                       "babilong_label_ranking_0k": 0.75, "babilong_label_ranking_1k": 0.125,
                       "niah_accuracy_niah_single_1_1k": 0.5, "niah_ranking_accuracy_niah_single_1_1k": 1.0,
                       "continual_icl_ACC": 0.4, "continual_icl_BWT": -0.1}


def test_results_markdown_shows_accuracies_in_percent():
    """results.md: accuracy grids, the continual metrics table and R matrices in % with one
    decimal, perplexity metrics as is, n/a for a missing cell. Kills printing a fraction where
    the heading says %."""
    from eval.run import results_markdown
    results = {"arch": "hope", "suite": "quick", "checkpoint": "c", "tokenizer": "bytes", "context": 64,
               "niah": {"scores": {"accuracy": "greedy", "ranking_accuracy": "ranked"},
                        "accuracy": {"niah_single_1": {"1k": 0.25, "2k": None}},
                        "ranking_accuracy": {"niah_single_1": {"1k": 0.5, "2k": 1.0}}},
               "perplexity": {"val": {"loss": 2.5}, "wikitext": {"word_perplexity": 31.25},
                              "lambada": {"accuracy": 0.125}},
               "continual": {"intents": {"clinc": {"tasks": ["a", "b"], "arms": {"icl": {
                   "ACC": 0.5, "BWT": -0.25, "forgetting": 0.25, "average_incremental_accuracy": 0.75,
                   "R": [[1.0, None], [0.5, 0.5]], "tasks": ["a", "b"]}}}}}}
    md = results_markdown(results)
    assert "| icl | 50.0 | -25.0 | 25.0 | 75.0 |" in md and "| after b | 50.0 | 50.0 |" in md
    assert "| niah_single_1 | 25.0 | n/a |" in md and "| niah_single_1 | 50.0 | 100.0 |" in md
    assert "| wikitext | word_perplexity | 31.2500 |" in md and "| lambada | accuracy | 0.1250 |" in md


def test_results_markdown_names_the_step_the_settings_and_the_units():
    """results.md of an out_dir as --checkpoint: the step scored, what each section scored
    (the quick suite: 4 val batches, 1 WikiText article, 20 LAMBADA passages; the paper
    suite: all of them) and the perplexity units. Kills a results.md whose quick-suite numbers
    read like full-data ones, of a step it does not name."""
    from eval.run import SUITES, results_markdown
    results = {"arch": "hope", "suite": "quick", "checkpoint": "/runs/x", "checkpoint_step": 20, "tokenizer": "gpt2",
               "context": 128, "data_dir": "/data", "settings": {"perplexity": SUITES["quick"]["perplexity"]},
               "perplexity": {"val": {"loss": 2.5}, "wikitext": {"word_perplexity": 31.25},
                              "lambada": {"accuracy": 0.125}}}
    md = results_markdown(results)
    assert "checkpoint `/runs/x` (step 20), tokenizer gpt2, context 128, offline data `/data`" in md
    assert "settings: val_batches 4; wikitext_docs 1; lambada_passages 20; batch_size 8\n" in md
    assert "nats per token" in md and "accuracy a fraction" in md
    results["settings"]["perplexity"] = SUITES["paper"]["perplexity"]
    assert "settings: val_batches all; wikitext_docs all; lambada_passages all" in results_markdown(results)
    # BABILong's section says that it scored the checkpoint as given, not fine-tuned first
    results["babilong"] = {"source": "local", "context_handling": "streamed", "official": {}, "label_ranking": {},
                           "scores": {"official": "greedy", "label_ranking": "ranking"}}
    assert "The checkpoint as given: the BABILong protocol fine-tunes on bAbI first" in results_markdown(results)


def test_the_cli_shows_progress_of_wikitext_and_lambada(tmp_path, monkeypatch):
    """The paper suite's perplexity section ran ~200 s without a word, where eval.perplexity
    shows a bar: `python -m eval.run` passes progress to both scorers (the bar is on stderr)."""
    import eval.perplexity as ppl
    from eval.run import perplexity_section
    for path in (ppl.WIKITEXT_FILE, ppl.LAMBADA_FILE):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    seen = []
    monkeypatch.setattr(ppl, "wikitext_word_perplexity", lambda *a, progress=False, **k: seen.append(progress) or {})
    monkeypatch.setattr(ppl, "lambada", lambda *a, progress=False, **k: seen.append(progress) or {})
    settings = {"batch_size": 8, "val_batches": 1, "wikitext_docs": 1, "lambada_passages": 1}
    perplexity_section(None, None, settings, 16, "cpu", str(tmp_path), progress=True)
    perplexity_section(None, None, settings, 16, "cpu", str(tmp_path))
    assert seen == [True, True, False, False]


@pytest.mark.parametrize("damaged, content, message", [
    ("lambada/lambada_test.jsonl", b"\xff\n", "lambada_test.jsonl is not UTF-8 text (byte 0xff at offset 0)"),
    ("clinc150/domains.json", b"{", "domains.json is not valid JSON"),
])
def test_damaged_data_is_named_before_any_section_runs(damaged, content, message, tmp_path, monkeypatch, capsys):
    """A damaged file in --data-dir used by a later section is one line naming it before the
    checkpoint loads, not an error that throws away the sections already run."""
    import eval.run as run
    data = tmp_path / "data"
    for name in ("wikitext", "lambada", "babi", "austen", "tokenizers", "clinc150", "shakespeare"):
        (data / name).mkdir(parents=True)
        for f in os.listdir(os.path.join(SHARED_DATA, name)):
            os.symlink(os.path.join(SHARED_DATA, name, f), data / name / f)
    os.remove(data / damaged)
    (data / damaged).write_bytes(content)
    monkeypatch.setattr(run, "load_checkpoint", lambda *a: pytest.fail("loaded before reading the data"))
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--checkpoint", "ckpt", "--out", str(tmp_path / "out"), "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {data / damaged}") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_val_row_says_why_the_training_data_cannot_be_read(tmp_path):
    """The suite's val perplexity reads the checkpoint's training data; when it cannot (not
    prepared here, or prepared with another tokenizer) the row says which, not a guess."""
    import types

    from data.prepare import prepare
    from eval import run
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"Line {i}."}) + "\n" for i in range(8)))
    prepared = str(tmp_path / "prepared")
    prepare(f"files:{tmp_path / 'docs.jsonl'}", prepared, tokenizer="bytes", val_fraction=0.4, num_workers=1,
            quiet=True)

    def data(tokenizer, data_dir):
        return types.SimpleNamespace(data=types.SimpleNamespace(tokenizer=tokenizer, data_dir=data_dir,
                                                                dataset="builtin"))
    dataset, why = run._training_data(data("bytes", prepared))
    assert why is None and dataset.num_tokens("val") > 0
    dataset, why = run._training_data(data("gpt2", prepared))
    assert dataset is None and "prepared with tokenizer 'bytes', but data.tokenizer='gpt2'" in why
    dataset, why = run._training_data(data("bytes", str(tmp_path / "none")))
    assert dataset is None and why.startswith("the training data of this checkpoint is not prepared here")
    row = run.perplexity_section(None, None, {"val_batches": 1, "batch_size": 1, "wikitext_docs": 0,
                                              "lambada_passages": 0}, 16, "cpu", str(tmp_path / "no_data"),
                                 None, why)
    assert row["val"] == {"skipped": why}


# -----------------------------------------------------------------------------
# --sections into an --out that already holds results (the sections are stubbed)

def _stub_suite(monkeypatch, tag):
    """run_suite with a stub checkpoint and sections whose numbers carry `tag`, so a test sees
    which run wrote each section."""
    import types

    import eval.babilong as bl
    import eval.run as run
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(seq_len=64, dtype="auto"),
                                model=types.SimpleNamespace(arch="hope"), data=types.SimpleNamespace(tokenizer="bytes"))
    monkeypatch.setattr(run, "read_section_data", lambda *a, **kw: None)
    monkeypatch.setattr(run, "load_checkpoint", lambda *a: (object(), cfg, None, "cpu"))
    monkeypatch.setattr(run, "_training_data", lambda cfg: (None, "stub"))
    monkeypatch.setattr(bl, "length_tokenizer", lambda *a: object())
    monkeypatch.setattr(run, "perplexity_section", lambda *a, **kw: {
        "val": {"loss": tag}, "wikitext": {"word_perplexity": tag}, "lambada": {"accuracy": tag}})
    monkeypatch.setattr(run, "babilong_section", lambda *a, **kw: {
        "source": f"run {tag}", "context_handling": "streamed", "scores": {"official": "o", "label_ranking": "l"},
        "official": {"qa1": {"0k": tag}}, "label_ranking": {"qa1": {"0k": tag}}})
    monkeypatch.setattr(run, "niah_section", lambda *a, **kw: {
        "scores": {"accuracy": "a", "ranking_accuracy": "r"}, "accuracy": {"niah_single_1": {"1k": tag}},
        "ranking_accuracy": {"niah_single_1": {"1k": tag}}})
    monkeypatch.setattr(run, "continual_section", lambda *a, **kw: {"intents": {}, "tag": tag})
    return run


def test_sections_run_again_replace_theirs_and_keep_the_others(tmp_path, monkeypatch):
    """--sections perplexity into the --out of an earlier full run of the same checkpoint and
    suite: perplexity is the new one, babilong / niah / continual (numbers, settings, seconds)
    stay in results.json and results.md. Kills results holding only the last run's sections."""
    out = str(tmp_path / "eval")
    run = _stub_suite(monkeypatch, 0.25)
    run.main(["--checkpoint", "ckpt", "--out", out, "--device", "cpu"])
    first = json.load(open(os.path.join(out, "results.json")))
    run = _stub_suite(monkeypatch, 0.5)
    run.main(["--checkpoint", "ckpt", "--out", out, "--device", "cpu", "--sections", "perplexity"])
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["perplexity"]["val"]["loss"] == 0.5
    for section in ("babilong", "niah", "continual"):
        assert results[section] == first[section]
        assert results["settings"][section] == first["settings"][section]
        assert results["seconds"][section] == first["seconds"][section]
    assert list(results["settings"]) == list(results["seconds"]) == list(run.SECTIONS)
    assert results["checkpoint"] == os.path.abspath("ckpt") and results["suite"] == "quick"
    md = open(os.path.join(out, "results.md")).read()
    assert "| val | loss | 0.5000 |" in md and "| qa1 | 25.0 |" in md and "| niah_single_1 | 25.0 |" in md
    assert "## Continual learning" in md
    run = _stub_suite(monkeypatch, 0.75)                   # and back: the others again, perplexity kept
    run.main(["--checkpoint", "ckpt", "--out", out, "--device", "cpu", "--sections", "niah,babilong"])
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["perplexity"]["val"]["loss"] == 0.5 and results["niah"]["accuracy"]["niah_single_1"]["1k"] == 0.75
    assert results["babilong"]["source"] == "run 0.75" and results["continual"]["tag"] == 0.25
    # an out_dir as --checkpoint names its latest step: once training has moved on, its results
    # are another checkpoint's (they were merged with the older step's)
    monkeypatch.setattr(run, "resolve_checkpoint_arg", lambda checkpoint: "/runs/x/checkpoints/step_000200")
    with pytest.raises(SystemExit):
        run.main(["--checkpoint", "ckpt", "--out", out, "--device", "cpu", "--sections", "niah"])
    assert json.load(open(os.path.join(out, "results.json"))) == results


def test_the_step_loaded_is_the_step_recorded(tmp_path, monkeypatch):
    """An out_dir as --checkpoint is resolved to its latest step once: that step is loaded and
    recorded as checkpoint_dir, even when training saves a newer one while the suite loads.
    Kills resolving the out_dir again after loading (results naming a step never scored)."""
    import checkpoint
    from cli import LATEST, TRAINER_STATE
    run = _stub_suite(monkeypatch, 0.25)
    root = tmp_path / "train" / "checkpoints"
    for step in ("step_000002", "step_000004"):
        (root / step).mkdir(parents=True)
        (root / step / TRAINER_STATE).write_text("")
    (root / LATEST).write_text("step_000002\n")
    stub_model, cfg, _, _ = run.load_checkpoint("stub")
    loaded, resolutions = [], []

    def load_while_training_saves(path, device):
        loaded.append(path)
        (root / LATEST).write_text("step_000004\n")       # training moves on meanwhile
        return stub_model, cfg, None, "cpu"

    def counted(path, resolve=checkpoint.resolve_checkpoint):
        resolutions.append(path)
        return resolve(path)
    monkeypatch.setattr(run, "load_checkpoint", load_while_training_saves)
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", counted)
    results = run.run_suite(str(tmp_path / "train"), "quick", str(tmp_path / "eval"), sections=["perplexity"],
                            log=None)
    assert loaded == [str(root / "step_000002")] and resolutions == [str(tmp_path / "train")]
    assert results["checkpoint_dir"] == str(root / "step_000002") and results["checkpoint_step"] == 2
    assert results["checkpoint"] == str(tmp_path / "train")


def test_a_later_export_to_the_same_file_is_another_checkpoint(tmp_path, monkeypatch, capsys):
    """Step 50 exported to e.safetensors and scored (--sections perplexity), then step 60
    exported to the same path and --sections niah into the same --out: refused, since the
    path alone merged step 50's perplexity with step 60's NIAH. results.json records the
    step and the config hash read from the file's metadata (what export_safetensors writes);
    the same export again still merges. Kills comparing an exported file by its path."""
    import torch
    from safetensors.torch import save_file

    def export(step, config='{"model": {}}', dtype="fp32"):
        save_file({"w": torch.zeros(1)}, str(tmp_path / "e.safetensors"),
                  metadata={"format": "pt", "config": config, "step": str(step), "arch": "hope", "dtype": dtype})
    out = str(tmp_path / "eval")
    export(50)
    run = _stub_suite(monkeypatch, 0.25)
    first = run.run_suite(str(tmp_path / "e.safetensors"), "quick", out, sections=["perplexity"], log=None)
    assert first["checkpoint_step"] == 50 and len(first["checkpoint_config_sha256"]) == 16
    assert run.run_suite(str(tmp_path / "e.safetensors"), "quick", out, sections=["niah"],
                         log=None)["perplexity"] == first["perplexity"]           # the same export: merged
    kept = open(os.path.join(out, "results.json")).read()
    for step, config, dtype, message in (
            (60, '{"model": {}}', "fp32", "holds the results of checkpoint_step 50, not 60"),
            (50, '{"model": {"n_layer": 2}}', "fp32", "holds the results of checkpoint_config_sha256"),
            (50, '{"model": {}}', "bf16", "holds the results of checkpoint_dtype fp32, not bf16")):
        export(step, config, dtype)
        with pytest.raises(SystemExit) as exit_info:
            run.main(["--checkpoint", str(tmp_path / "e.safetensors"), "--out", out, "--sections", "niah"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
        assert open(os.path.join(out, "results.json")).read() == kept
    legacy = json.loads(kept)                  # written before eval.run recorded the step: cannot be told
    del legacy["checkpoint_step"]
    (tmp_path / "eval" / "results.json").write_text(json.dumps(legacy))
    with pytest.raises(SystemExit):
        run.main(["--checkpoint", str(tmp_path / "e.safetensors"), "--out", out, "--sections", "niah"])
    assert "holds results that record no checkpoint_step" in capsys.readouterr().err


def test_a_checkpoint_that_names_none_is_loaded_as_given(tmp_path, monkeypatch, capsys):
    """A --checkpoint that resolves to no checkpoint is handed to load_checkpoint as given, so
    its error names the path as typed (a relative one stays relative)."""
    import eval.run as run
    monkeypatch.setattr(run, "read_section_data", lambda *a, **kw: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--checkpoint", "no_such_ckpt", "--out", "eval"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: checkpoint no_such_ckpt not found\n"


@pytest.mark.parametrize("earlier, message", [
    ({"checkpoint": "OTHER", "suite": "quick"}, "holds the results of checkpoint OTHER, not CKPT"),
    ({"checkpoint": "CKPT", "suite": "paper"}, "holds the results of suite paper, not quick"),
    ("{not json", "holds a results.json that cannot be read (Expecting property name"),
    ([1, 2], "holds a results.json that eval.run did not write"),
    ({"checkpoint": "CKPT", "suite": "quick", "niah": {"accuracy": 0.5}}, "eval.run did not write"),  # no table
])
def test_results_of_another_run_are_refused_before_anything_runs(earlier, message, tmp_path, monkeypatch, capsys):
    """An --out whose results.json is of another checkpoint or suite, or unreadable, cannot
    be merged: one line saying to choose another --out, before the checkpoint loads, and the
    file is left as it was (it used to be overwritten)."""
    import eval.run as run
    out = tmp_path / "eval"
    out.mkdir()
    checkpoint = str(tmp_path / "ckpt")
    if isinstance(earlier, dict):
        earlier = json.dumps({"arch": "hope", "tokenizer": "bytes", "context": 64, "settings": {}, "seconds": {},
                              "perplexity": {"skipped": "x"}, **earlier,
                              "checkpoint": earlier["checkpoint"].replace("CKPT", checkpoint)})
    else:
        earlier = earlier if isinstance(earlier, str) else json.dumps(earlier)
    (out / "results.json").write_text(earlier)
    monkeypatch.setattr(run, "read_section_data", lambda *a, **kw: pytest.fail("read data before refusing"))
    monkeypatch.setattr(run, "load_checkpoint", lambda *a: pytest.fail("loaded before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--checkpoint", checkpoint, "--out", str(out), "--sections", "perplexity"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out {out} ") and message.replace("CKPT", checkpoint) in err
    assert err.rstrip().endswith(": choose another --out")
    assert (out / "results.json").read_text() == earlier and os.listdir(out) == ["results.json"]


def test_niah_section_hands_on_the_long_stream_notes(monkeypatch):
    """eval.run's S-NIAH section records the notes of its cells once (eval.common.notes_of),
    as the BABILong section does through _summarise."""
    import eval.run as run
    from eval import niah
    monkeypatch.setattr(niah, "build_niah", lambda *a, **k: ["sample"])
    monkeypatch.setattr(niah, "evaluate_niah", lambda *a, **k: {
        "accuracy": 0.5, "ranking_accuracy": 0.5, "n": 1, "n_scored": 1, "n_truncated": 0, "n_skipped": 0,
        "seconds": 0.0, "note": "inputs of up to 2048 tokens with ..."})
    out = run.niah_section(None, None, {"tasks": ["niah_single_1", "niah_single_2"], "lengths": ["1k"], "samples": 1,
                                        "depths": [0.0], "segment_len": 64, "max_new_tokens": 4}, 128, "cpu",
                           gpt2=object())
    assert out["notes"] == ["inputs of up to 2048 tokens with ..."]


def test_continual_section_notes_held_out_text_the_checkpoint_trained_on(monkeypatch):
    """eval.run's continual section carries the domains protocol's notes, and hands it the
    checkpoint's config, from which run_domains notes a builtin run of another
    data.val_fraction (whose training split may hold the builtin domain's held-out chapters)."""
    import eval.run as run
    from config import Config, DataConfig
    from eval import continual as cl
    from model import build_model
    monkeypatch.setattr(cl, "load_domains", lambda names, data_dir=None: [{"name": n} for n in names])

    def run_domains(*args, cfg=None, **kwargs):
        overlap = cl.builtin_overlap_note(cfg, ["builtin"]) if cfg is not None else None
        return {"notes": ([overlap] if overlap else []) + ["domain builtin: short"]}
    monkeypatch.setattr(cl, "run_domains", run_domains)
    model = build_model({"n_layer": 1, "n_head": 1, "d_model": 8, "vocab_size": 11})
    settings = {"intents": [], "intent_settings": {}, "domains": ["builtin"], "domain_settings": {}}
    cfg = Config(data=DataConfig(val_fraction=0.05))
    out = run.continual_section(model, None, settings, 16, "cpu", cfg=cfg)
    assert out["notes"] == [cl.builtin_overlap_note(cfg, ["builtin"]), "domain builtin: short"]
    assert out["notes"][0].startswith("the checkpoint trained on the built-in corpus with data.val_fraction=0.05")
    assert run.continual_section(model, None, settings, 16, "cpu")["notes"] == ["domain builtin: short"]


def test_niah_section_lets_attention_models_read_the_whole_input(monkeypatch):
    """The paper suite's S-NIAH: an attention model reads up to its max_len (16384, the longest
    length), not just its training context (seq_len 64 here), which would cut most needles at
    8K / 16K; the results say so (context_handling). A recurrent model streams as before."""
    import eval.niah as niah
    from eval.run import SUITES, niah_section
    seen = []
    monkeypatch.setattr(niah, "build_niah", lambda *a, **kw: [])
    monkeypatch.setattr(niah, "evaluate_niah", lambda *a, **kw: seen.append(kw["max_len"]) or {
        "accuracy": 1.0, "ranking_accuracy": 1.0, "n": 1, "n_scored": 1, "n_truncated": 0, "n_skipped": 0,
        "seconds": 0.0})
    paper = SUITES["paper"]["niah"]
    assert paper["max_len"] == 16384 == max(int(x[:-1]) * 1024 for x in paper["lengths"])
    out = niah_section(object(), None, {**paper, "tasks": ["1"], "lengths": ["16k"]}, 64, "cpu", gpt2=object())
    assert seen == [16384] and "max_len 16384" in out["context_handling"]
    out = niah_section(object(), None, {**paper, "tasks": ["1"], "lengths": ["16k"], "max_len": None}, 64, "cpu",
                       gpt2=object())                                                  # the quick suite's way
    assert seen[-1] == 64 and "max_len 64" in out["context_handling"]
    import eval.common
    monkeypatch.setattr(eval.common, "is_recurrent", lambda model: True)
    out = niah_section(object(), None, {**paper, "tasks": ["1"], "lengths": ["16k"]}, 64, "cpu", gpt2=object())
    assert seen[-1] is None and out["context_handling"].startswith("streamed")
