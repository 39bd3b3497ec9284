"""eval/mini_repro.py: the plan (same recipe for every run), the parallel step runner, and
the report built from the runs' JSON files. The real runs are docs/MINI_REPRO.md's."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from eval import mini_repro
from eval.reproduce import ABLATIONS, Step


def args_for(tmp_path, *extra):
    return mini_repro.parse_args(["--out", str(tmp_path), *extra])


def test_every_run_shares_data_steps_and_seed(tmp_path):
    args = args_for(tmp_path, "--steps", "7")
    assert args.seeds == [0, 1]                                   # two seeds by default
    trains, evals = mini_repro.plan(args)
    steps = [group[0] for group in trains]
    assert len(steps) == 2 * (len(mini_repro.MODELS) + len(ABLATIONS))
    for seed in (0, 1):
        argvs = [s.argv for s in steps if s.run.name.endswith(f"-s{seed}")]
        assert len(argvs) == len(mini_repro.MODELS) + len(ABLATIONS)
        for argv in argvs:
            for shared in mini_repro.MINI_MODEL + mini_repro.MINI_TRAIN + ("--train.max_steps=7",
                                                                            f"--train.seed={seed}"):
                assert shared in argv, (argv, shared)
    names = [s.run.name for s in steps]
    assert len(set(names)) == len(names)
    assert names[0].startswith("hope")                             # slowest first
    ablation = next(s for s in steps if s.run.name == "hope-gd-s1")
    assert ablation.argv[-1] == "--model.hope.inner_opt=gd" and ablation.run.config == "configs/hope_tiny.yaml"
    # one eval chain per (model, seed): fine-tune -> BABILong eval -> forgetting
    assert len(evals) == 2 * len(mini_repro.MODELS)
    finetune, babilong, forgetting = evals[0]
    assert finetune.argv[3:5] == ["finetune", "--checkpoint"] and "qa1" in finetune.argv
    assert babilong.argv[babilong.argv.index("--checkpoint") + 1] == os.path.dirname(
        os.path.dirname(finetune.marker))                          # evaluates the fine-tuned model
    assert forgetting.argv[2:4] == ["eval.continual", "domains"]


def test_babilong_finetune_reads_the_context_it_is_evaluated_at(tmp_path):
    """Without --max-len the fine-tune cuts attention models' examples to train.seq_len (128 bytes)."""
    _, evals = mini_repro.plan(args_for(tmp_path))
    for finetune, babilong, _ in evals:
        lengths = [argv[argv.index("--max-len") + 1] for argv in (finetune.argv, babilong.argv)]
        assert lengths == [str(mini_repro.BABILONG_MAX_LEN)] * 2, (finetune.argv, babilong.argv)


def test_delta_vs_hope_pairs_seeds():
    """Δ is the mean of per-seed differences over the seeds both rows have, not a difference of
    means over different seed sets."""
    hope = {0: {"bits_per_byte": 2.0}, 1: {"bits_per_byte": 3.0}}
    assert mini_repro.paired_delta({1: {"bits_per_byte": 3.5}}, hope) == "+0.500 (n=1)"   # unpaired: +1.000
    assert mini_repro.paired_delta({0: {"bits_per_byte": 2.25}, 1: {"bits_per_byte": 3.75}}, hope) == "+0.500 (n=2)"
    assert mini_repro.paired_delta({2: {"bits_per_byte": 1.0}}, hope) == "—"
    assert mini_repro.paired_delta({0: {"bits_per_byte": None}}, hope) == "—"


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "a,b"], "--seeds"), (["--seeds", ","], "--seeds"), (["--steps", "0"], "--steps"),
    (["--jobs", "0"], "--jobs"), (["--domain-steps", "-1"], "--domain-steps"), (["--seeds", "0,0"], "--seeds 0,0"),
    (["--report-only", "--out", "/nonexistent/mini"], "/nonexistent/mini"),
    (["--report-only", "--out", "/tmp"], "'/tmp' holds no runs")])      # an all-"—" report, exit 0
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        mini_repro.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_groups_runs_each_step_once_and_stops_on_failure(tmp_path):
    def step(name, code="pass"):
        marker = tmp_path / name
        return Step(name, ["python", "-c", f"{code}; open({str(marker)!r}, 'w').write('x')"], str(marker))
    groups = [[step("a"), step("b")], [step("c")]]
    mini_repro.run_groups(groups, jobs=2, log=lambda *_: None)
    assert all((tmp_path / n).exists() for n in "abc")
    (tmp_path / "b").write_text("kept")
    mini_repro.run_groups(groups, jobs=1, log=lambda *_: None)     # done steps are skipped
    assert (tmp_path / "b").read_text() == "kept"
    with pytest.raises(RuntimeError, match="bad"):
        mini_repro.run_groups([[step("bad", "import sys; sys.exit(3)")]], jobs=1, log=lambda *_: None)
    # a failing group cancels the groups still queued behind it (one worker: "later" never starts)
    with pytest.raises(RuntimeError, match="bad2"):
        mini_repro.run_groups([[step("bad2", "import sys; sys.exit(3)")], [step("later")]], jobs=1,
                              log=lambda *_: None)
    assert not (tmp_path / "later").exists()


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_report_means_ranges_and_missing_cells(tmp_path):
    root = str(tmp_path)
    for seed, bpb in ((0, 2.0), (1, 2.5)):
        run = os.path.join(root, "runs", f"hope-s{seed}")
        write_json(os.path.join(run, "final_eval.json"),
                   {"val_loss": 1.0, "val_ppl": 4.0 + seed, "val_bpb": bpb, "params": 170_000})
        write_json(os.path.join(run, "babilong", "babilong.json"),
                   {"label_ranking": {"qa1": {"0k": 0.5 + 0.1 * seed, "1k": 0.25}}, "official": {"qa1": {"0k": 0.0}}})
        write_json(os.path.join(run, "continual", "continual_domains.json"),
                   {"mean_forgetting": 1.5, "mean_relative_forgetting": 0.1, "final_mean_perplexity": 5.0,
                    "perplexity": [[9, 9], [1, 1]]})                # the report reads the stored mean
    write_json(os.path.join(root, "runs", "hope-gd-s0", "final_eval.json"), {"val_bpb": 2.5, "params": 1})
    results = mini_repro.collect(root, [0, 1], steps=5)
    assert results["models"]["HOPE"][1]["bits_per_byte"] == 2.5
    assert results["models"]["HOPE"][0]["final_mean_ppl"] == 5.0
    text = mini_repro.markdown(results, "header line")
    assert text.startswith("header line")
    assert "| HOPE | 0.17M | 2.250 (2.000–2.500) | 4.500 (4.000–5.000) |" in text
    assert "| Transformer++ | — | — | — |" in text
    assert "| w/o DGD (plain GD) | 2.500 (n=1) | +0.500 (n=1) |" in text  # seed 0 only: 2.5 - HOPE's 2.0
    assert "| HOPE | 55 (50–60) | 25 (25–25) | — |" in text        # label ranking, in %
    assert "| HOPE | 1.500 (1.500–1.500) | +10.0% (+10.0%–+10.0%) | 5.00 (5.00–5.00) |" in text


def test_report_only_writes_json_and_markdown(tmp_path, capsys):
    write_json(os.path.join(tmp_path, "runs", "transformer-s0", "final_eval.json"), {"val_bpb": 3.0, "params": 10})
    assert mini_repro.main(["--out", str(tmp_path), "--seeds", "0", "--report-only"]) == 0
    data = json.load(open(tmp_path / "mini_repro.json"))
    assert data["models"]["Transformer++"]["0"]["bits_per_byte"] == 3.0
    assert data["meta"]["seeds"] == [0]
    assert "Wall time" in (tmp_path / "MINI_REPRO.md").read_text()


def test_results_folder_keeps_the_settings_it_was_made_with(tmp_path, monkeypatch, capsys):
    """Step outputs are named by run and seed only: a second run with other settings would take
    them as done. The first run writes them to manifest.json; another run with other settings is
    a one-line error; --report-only reports with the manifest's settings. Nothing is deleted."""
    monkeypatch.setattr(mini_repro, "run_groups", lambda *a, **k: None)   # the runs themselves: not here
    out = str(tmp_path / "mini")
    assert mini_repro.main(["--out", out, "--seeds", "0", "--steps", "7", "--ft-steps", "3"]) == 0
    made = {"steps": 7, "ft_steps": 3, "samples": 25, "domain_steps": 30}
    assert json.load(open(os.path.join(out, "manifest.json"))) == made
    result = os.path.join(out, "runs", "hope-s0", "final_eval.json")
    write_json(result, {"val_bpb": 2.0})
    capsys.readouterr()
    for argv, message in ((["--steps", "7"], "--ft-steps 60 differs from the --ft-steps 3"),   # the default
                          (["--steps", "8", "--ft-steps", "3", "--plan"], "--steps 8 differs from the --steps 7"),
                          (["--steps", "7", "--ft-steps", "3", "--samples", "5"], "--samples 5"),
                          (["--report-only", "--domain-steps", "9"], "leave --domain-steps out")):
        with pytest.raises(SystemExit):
            mini_repro.main(["--out", out, "--seeds", "0", *argv])
        err = capsys.readouterr().err
        assert message in err and out in err and len(err.strip().splitlines()) == 1, err
    assert mini_repro.parse_args(["--out", out, "--steps", "7", "--ft-steps", "3"]).samples == 25   # same: fine
    assert mini_repro.main(["--out", out, "--seeds", "0", "--report-only"]) == 0
    meta = json.load(open(os.path.join(out, "mini_repro.json")))["meta"]
    assert {k: meta[k] for k in made} == made and meta["tokens_per_run"] == 7 * 8 * 128
    assert "Settings: `--steps 7 --ft-steps 3 --samples 25 --domain-steps 30`" in open(
        os.path.join(out, "MINI_REPRO.md")).read()
    assert json.load(open(result)) == {"val_bpb": 2.0}
    assert json.load(open(os.path.join(out, "manifest.json"))) == made


def test_results_without_a_manifest_are_not_continued(tmp_path, capsys):
    """A folder from before the manifest: its settings are unknown, so only --report-only reads it."""
    write_json(os.path.join(tmp_path, "runs", "hope-s0", "final_eval.json"), {"val_bpb": 2.0})
    with pytest.raises(SystemExit):
        args_for(tmp_path, "--plan")
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "another --out" in err
    assert args_for(tmp_path, "--report-only").steps == 150
    assert mini_repro.main(["--out", str(tmp_path), "--seeds", "0", "--report-only"]) == 0
    assert "(assumed: the results predate manifest.json)" in (tmp_path / "MINI_REPRO.md").read_text()
    for damaged in ({"steps": 7}, ""):             # "": an empty file, not only a wrong object
        with open(tmp_path / "manifest.json", "w") as f:
            f.write(damaged if isinstance(damaged, str) else json.dumps(damaged))
        with pytest.raises(SystemExit):
            args_for(tmp_path)
        assert "not a mini_repro manifest" in capsys.readouterr().err


def test_report_only_refuses_seeds_without_results(tmp_path, capsys):
    """--seeds naming only seeds that were never run rewrote the report with every cell "—",
    exit 0 (as a folder without runs/ did): now a one-line error, and nothing is written."""
    write_json(os.path.join(tmp_path, "runs", "transformer-s0", "final_eval.json"), {"val_bpb": 3.0})
    (tmp_path / "MINI_REPRO.md").write_text("kept")
    with pytest.raises(SystemExit):
        mini_repro.main(["--out", str(tmp_path), "--seeds", "7,8", "--report-only"])
    err = capsys.readouterr().err
    assert "no results for --seeds 7,8" in err and os.path.join(str(tmp_path), "runs") in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "MINI_REPRO.md").read_text() == "kept" and not (tmp_path / "mini_repro.json").exists()
    assert mini_repro.main(["--out", str(tmp_path), "--seeds", "0,7", "--report-only"]) == 0   # one seed has some


def test_header_counts_the_seeds_that_have_results(tmp_path, capsys):
    """'mean over 2 seed(s)' counted the seeds asked for (default 0,1) with seed 0 alone run.
    It names the seeds with results, and a cell that fewer of them have says n=K."""
    for seed in (0, 1):
        write_json(os.path.join(tmp_path, "runs", f"transformer-s{seed}", "final_eval.json"), {"val_bpb": 3.0 + seed})
    write_json(os.path.join(tmp_path, "runs", "transformer-s0", "babilong", "babilong.json"),
               {"label_ranking": {"qa1": {"0k": 0.5}}})
    assert mini_repro.main(["--out", str(tmp_path), "--seeds", "0,1,2", "--report-only"]) == 0
    text = (tmp_path / "MINI_REPRO.md").read_text()
    assert "mean over the 2 seed(s) with results (0, 1)" in text
    assert "| Transformer++ | — | 3.500 (3.000–4.000) | — |" in text
    assert "| Transformer++ | 50 (n=1) | — | — |" in text
    assert json.load(open(tmp_path / "mini_repro.json"))["meta"]["seeds_with_results"] == [0, 1]


@pytest.mark.parametrize("content", ["", "{", "[]", '{"val_bpb": "3.1"}', b"\xff\xfe"])
def test_a_damaged_result_file_is_named_not_a_dash(tmp_path, capsys, monkeypatch, content):
    """An empty or damaged final_eval.json counted as done for ever (its step never reran) and
    the report showed "—": mini_repro's own loader swallowed the error. It is now read as
    eval.reproduce reads results (its load_result): a one-line error naming the file, before any
    step runs and before any file is written."""
    ran = []
    monkeypatch.setattr(mini_repro, "run_groups", lambda *a, **k: ran.append(a))
    write_json(os.path.join(tmp_path, "manifest.json"), mini_repro.SETTINGS)
    bad = os.path.join(tmp_path, "runs", "transformer-s0", "final_eval.json")
    write_json(bad, {})
    with open(bad, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    for extra in ([], ["--plan"], ["--report-only"]):
        with pytest.raises(SystemExit):
            mini_repro.main(["--out", str(tmp_path), *extra])
        err = capsys.readouterr().err
        assert bad in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not ran and sorted(os.listdir(tmp_path)) == ["manifest.json", "runs"]


def test_plan_marks_done_as_the_run_does(tmp_path, capsys):
    """--plan said [done] wherever the step's file existed; the run (execute: step_status) redoes
    an eval that scored another checkpoint. --plan now says what the run will do, and why."""
    write_json(os.path.join(tmp_path, "manifest.json"), mini_repro.SETTINGS)
    write_json(os.path.join(tmp_path, "runs", "transformer-s0", "babilong", "babilong.json"),
               {"checkpoint": "/elsewhere/other/babilong_ft", "label_ranking": {}})
    assert mini_repro.main(["--out", str(tmp_path), "--seeds", "0", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "# [todo] babilong transformer-s0 (" in out and "/elsewhere/other/babilong_ft" in out


def test_wall_time_says_it_covers_this_invocation(tmp_path, monkeypatch, capsys):
    """A resumed run's wall time leaves out the steps done before it: the header says so."""
    monkeypatch.setattr(mini_repro, "run_groups", lambda *a, **k: None)
    write_json(os.path.join(tmp_path, "manifest.json"), mini_repro.SETTINGS)
    write_json(os.path.join(tmp_path, "runs", "transformer-s0", "final_eval.json"), {"val_bpb": 3.0})
    assert mini_repro.main(["--out", str(tmp_path), "--seeds", "0"]) == 0
    steps = sum(len(group) for phase in mini_repro.plan(args_for(tmp_path, "--seeds", "0")) for group in phase)
    header = (tmp_path / "MINI_REPRO.md").read_text()
    assert f"(this invocation only: 1 of the {steps} steps were done before it)" in header


CTRL_C_DRIVER = """
import sys
from eval import mini_repro
from eval.reproduce import Step
out, started, later = sys.argv[1:]
# the first step ignores Ctrl-C and ends well (a step between two others at Ctrl-C); the next must not start
first = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         f"open({started!r}, 'w').close(); time.sleep(1.5); open({started!r} + '.done', 'w').close()")
mini_repro.plan = lambda args: [[[Step("first", ["python", "-c", first], started + ".done"),
                                  Step("later", ["python", "-c", f"open({later!r}, 'w').close()"], later)]]]
sys.exit(mini_repro.main(["--out", out, "--seeds", "0", "--jobs", "1"]))
"""


def test_ctrl_c_is_one_line_and_starts_no_further_step(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback after the step's own line, and a group whose
    step survived it went on to its next step. Now: one line, exit 130, no step started after."""
    started, later = str(tmp_path / "started"), str(tmp_path / "later")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_DRIVER, str(tmp_path / "out"), started, later], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 30
    while not os.path.exists(started) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)                    # as Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert err == "error: interrupted; rerun the same command to continue\n", err
    assert proc.returncode == 130
    assert os.path.exists(started + ".done") and not os.path.exists(later)


def _doc_command(doc: str, start: str) -> list[str]:
    """The backticked command in docs/MINI_REPRO.md's recipe table that begins with `start`."""
    line = next(l for l in doc.splitlines() if l.startswith("| ") and f"`{start}" in l)
    return shlex.split(line.split(f"`{start}", 1)[1].split("`", 1)[0])


def test_doc_recipe_lists_the_flags_the_driver_passes(tmp_path):
    """docs/MINI_REPRO.md's commands left out --seed, --segment-len and --train-chars: every
    flag of the driver's BABILong and forgetting commands (but the paths) is in the doc, and no other."""
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "MINI_REPRO.md"),
               encoding="utf-8").read()
    finetune, babilong, forgetting = mini_repro.plan(args_for(tmp_path, "--seeds", "3"))[1][0]

    def flags(argv):
        pairs = dict(zip(argv[::2], argv[1::2]))    # flag -> value (each of these flags takes one)
        return {k: v.replace("3", "<seed>") if k == "--seed" else v for k, v in pairs.items()
                if k not in ("--checkpoint", "--out")}
    for step, start in ((finetune, "eval.babilong finetune"), (babilong, "eval "),
                        (forgetting, "eval.continual domains")):
        argv = step.argv[step.argv.index("--checkpoint"):]                  # the flags after the subcommand
        assert flags(_doc_command(doc, start)) == flags(argv), (start, argv)
