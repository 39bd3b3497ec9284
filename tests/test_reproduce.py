"""eval.reproduce (commands per table, execution with skipping, markdown next to the paper's
numbers) and eval.paper_numbers (the tables as transcribed from paper-digest §5)."""
import json
import os
import re
import shlex
import subprocess
import sys
import types

import pytest

from config import load_config
from eval import reproduce as rp
from eval.paper_numbers import NL_TABLE1_SNIAH, NL_TABLE2, NL_TABLE6, PAPER, TITANS_TABLE1, TITANS_TABLE2

TORCHRUN = ["python", "-m", "torch.distributed.run"]     # torchrun through the interpreter: none on PATH needed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGEST = os.path.join(os.path.dirname(REPO), "shared", "reference", "paper-digest.md")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)             # commands name configs/ relative to the repository


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


# -----------------------------------------------------------------------------
# commands

@pytest.mark.parametrize("table", rp.TABLES)
def test_every_table_plans_valid_commands(table, tmp_path, monkeypatch):
    steps = rp.plan(table, str(tmp_path))
    trains = [s for s in steps if s.argv[:3] == ["python", "-m", "torch.distributed.run"]]
    prepares = [s for s in steps if s.argv[:3] == ["python", "-m", "data.prepare"]]
    evals = [s for s in steps if s.argv[0] == "python" and s not in prepares + trains]
    assert trains and evals and len(prepares) + len(trains) + len(evals) == len(steps)
    # the corpus is prepared once, before every launch, into the folder train.py reads with
    # the recipe it checks (else rank 0 tokenizes sample-100BT while the others time out)
    assert steps[:len(prepares)] == prepares and len(prepares) == 1
    from data.prepare import main as prepare_main
    from train import resolve_data_dir
    cfg = load_config(trains[0].argv[6], [a for a in trains[0].argv[7:] if not a.startswith("--train.out_dir=")])
    assert prepares[0].marker == os.path.join(resolve_data_dir(cfg), "meta.json")
    argv = prepares[0].argv[3:]
    assert argv[argv.index("--source") + 1] == cfg.data.dataset == "hf:HuggingFaceFW/fineweb-edu:sample-100BT"
    assert "--streaming" in argv and argv[argv.index("--val-fraction") + 1] == repr(cfg.data.val_fraction)
    import data.prepare
    seen = {}
    monkeypatch.setattr(data.prepare, "prepare", lambda source, out, tokenizer, **kw: seen.update(
        kw, source=source, tokenizer=tokenizer) or {"splits": {}})
    prepare_main([*argv, "--quiet"])                 # data.prepare parses them into train.py's recipe
    d = cfg.data
    assert {k: seen[k] for k in ("source", "tokenizer", "val_fraction", "text_field", "split", "streaming",
                                 "max_docs", "data_files", "seed")} == {
        "source": d.dataset, "tokenizer": d.tokenizer, "val_fraction": d.val_fraction, "text_field": d.text_field,
        "split": d.hf_split, "streaming": d.hf_streaming, "max_docs": d.max_docs,
        "data_files": d.hf_data_files or None, "seed": 0}
    out_dirs = set()
    for s in trains:
        config, overrides = s.argv[6], [a for a in s.argv[7:] if not a.startswith("--train.out_dir=")]
        assert os.path.isfile(config), config
        cfg = load_config(config, overrides)           # every override is a valid config key and value
        out_dir = next(a.split("=", 1)[1] for a in s.argv if a.startswith("--train.out_dir="))
        assert out_dir == os.path.join(str(tmp_path), "runs", s.run.name)
        assert s.marker.endswith(os.path.join(f"step_{cfg.train.max_steps:06d}", "trainer_state.pt"))
        out_dirs.add(out_dir)
    assert len(out_dirs) == len(trains), "a run is trained twice"
    finals = {os.path.dirname(s.marker) for s in trains}
    for s in evals:                # every eval reads the last step of a run this plan trains, and records it
        assert s.argv[1] == "-m" and s.argv[2].startswith("eval.")
        ckpt = s.argv[s.argv.index("--checkpoint") + 1]
        assert ckpt in finals or (os.path.dirname(os.path.dirname(ckpt)) in out_dirs
                                  and os.path.basename(os.path.dirname(ckpt)) == "babilong_ft"), ckpt
        assert s.source == ckpt or s.title.startswith("babilong fine-tune")
    assert len({s.marker for s in steps}) == len(steps)
    text = rp.script(table, steps, str(tmp_path))
    assert text.count("# [todo]") == len(steps) - os.path.exists(prepares[0].marker)
    assert f"{shlex.join(TORCHRUN)} --standalone --nproc_per_node=1 train.py" in text


def test_babilong_steps_evaluate_what_they_fine_tuned():
    run = rp.Run("hope_760m", "configs/hope_760m.yaml")
    finetune, evaluate = rp.babilong_steps(run, "ckpt", "res", "qa1,qa2", "0k,1k", "0k,4k",
                                           finetune=("--steps", "5"), evaluate=("--samples", "3"))
    finetuned = os.path.join("ckpt", "babilong_ft")
    assert finetune.argv == ["python", "-m", "eval.babilong", "finetune", "--checkpoint", "ckpt", "--tasks", "qa1,qa2",
                             "--lengths", "0k,1k", "--steps", "5", "--out", finetuned]
    assert finetune.marker == os.path.join(finetuned, "checkpoints", "latest")
    assert evaluate.argv == ["python", "-m", "eval.babilong", "eval", "--checkpoint", finetuned, "--tasks", "qa1,qa2",
                             "--lengths", "0k,4k", "--samples", "3", "--out", "res"]
    assert evaluate.marker == os.path.join("res", "babilong.json")
    assert (finetune.title, evaluate.title, finetune.run, evaluate.run) == ("babilong fine-tune hope_760m",
                                                                              "babilong hope_760m", run, run)


def test_table_rows_use_the_right_configs():
    runs = {r.label: r.run for r in rp.table_rows("nl_table2") if r.group == "1.3B / 100B" and r.run}
    assert {k: v.config for k, v in runs.items()} == {
        "Transformer++": "configs/transformer_1.3b.yaml", "Titans": "configs/titans_lmm_1.3b.yaml",
        "Hope": "configs/hope_1.3b.yaml"}
    t1 = {(r.group, r.label): r.run.name for r in rp.table_rows("titans_table1") if r.run}
    assert t1[("340M / 15B", "MAC*")] == "titans_mac_340m" and t1[("760M / 30B", "MAL")] == "titans_mal_760m"
    assert not any(g == "400M / 15B" for g, _ in t1)
    niah = {r.label: r.run for r in rp.table_rows("nl_niah") if r.group == "50B tokens" and r.run}
    for run in niah.values():
        assert load_config(run.config, list(run.overrides)).train.max_steps == round(50e9 / 524288)


def test_ablations_switch_what_table6_names():
    rows = {r.label: r for r in rp.table_rows("nl_table6")}
    expect = {"w/o DGD (plain GD)": ("inner_opt", "gd"), "w/o weight decay (α)": ("retention", False),
              "w/o CMS": ("cms", False), "w/o inner-projection k": ("adaptive_k", False),
              "w/o inner-projection v": ("adaptive_v", False), "Hope + adaptive q (ours)": ("adaptive_q", True)}
    base = load_config("configs/hope_1.3b.yaml").model.hope
    for label, (key, value) in expect.items():
        run = rows[label].run
        hope = load_config(run.config, list(run.overrides)).model.hope
        assert getattr(hope, key) == value != getattr(base, key), label
    assert rows["w/o Momentum"].run is None and "momentum" in rows["w/o Momentum"].note
    assert rows["w/o inner-projection q"].run == rows["Hope"].run          # our Hope has a static q
    assert base.adaptive_q is False
    small = {r.label: r.run.name for r in rp.table_rows("nl_table6", "hope_760m") if r.run}
    assert small["w/o CMS"] == "hope_760m-nocms"
    with pytest.raises(rp.ReproduceError, match="ablation-base"):
        rp.table_rows("nl_table6", "hope_9b")


def test_runs_are_shared_between_rows_and_tables(tmp_path):
    t6 = rp.plan("nl_table6", str(tmp_path))
    assert sum(s.title == "train hope_1.3b" for s in t6) == 1          # Hope and w/o q rows share it
    assert sum(s.title == "perplexity hope_1.3b" for s in t6) == 1
    t2 = rp.plan("nl_table2", str(tmp_path))
    assert {s.marker for s in t6 if s.title == "train hope_1.3b"} <= {s.marker for s in t2}


def test_nproc_keeps_the_global_batch(tmp_path):
    one = rp.train_step(rp._run("hope_760m"), str(tmp_path), nproc=1)
    assert not any(a.startswith("--train.grad_accum") for a in one.argv)
    eight = rp.train_step(rp._run("hope_760m"), str(tmp_path), nproc=8)
    assert "--nproc_per_node=8" in eight.argv and "--train.grad_accum=2" in eight.argv   # 128 = 8 ranks x 2 x 8
    many = rp.train_step(rp._run("hope_760m"), str(tmp_path), nproc=64)
    assert "--train.grad_accum=1" in many.argv
    with pytest.raises(rp.ReproduceError, match="does not divide"):
        rp.train_step(rp._run("hope_760m"), str(tmp_path), nproc=3)
    with pytest.raises(rp.ReproduceError, match="nproc"):
        rp.plan("nl_table2", str(tmp_path), nproc=0)
    extra = rp.train_step(rp._run("hope_760m"), str(tmp_path), 1, ("--train.compile=true",))
    assert extra.argv[-1] == "--train.compile=true"
    with pytest.raises(rp.ReproduceError, match="train.nonsense"):
        rp.train_step(rp._run("hope_760m"), str(tmp_path), 1, ("--train.nonsense=1",))


def test_execute_skips_done_steps_and_stops_on_failure(tmp_path):
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    steps = [rp.Step(f"s{i}", ["python", "-c", "pass"], m) for i, m in enumerate(markers)]
    open(markers[1], "w").close()
    calls = []

    def runner(argv):
        calls.append(argv)
        open(markers[len(calls) * 2 - 2], "w").close()          # steps 0 and 2 write their markers
        return types.SimpleNamespace(returncode=0)

    assert rp.execute(steps, runner, log=lambda *_: None) == 2
    assert [c[0] for c in calls] == [sys.executable] * 2        # "python" is this interpreter
    assert rp.execute(steps, runner, log=lambda *_: None) == 0  # everything done: nothing runs
    fail = [rp.Step("bad", ["python", "-c", "x"], str(tmp_path / "never"))]
    with pytest.raises(RuntimeError, match="exit code 3"):
        rp.execute(fail, lambda argv: types.SimpleNamespace(returncode=3), log=lambda *_: None)
    with pytest.raises(RuntimeError, match="did not write"):
        rp.execute(fail, lambda argv: types.SimpleNamespace(returncode=0), log=lambda *_: None)


def test_a_failed_run_still_writes_the_table(tmp_path, monkeypatch, capsys):
    """--run stopped by a failing step (an offline zero-shot step: no lm-eval) still writes
    TABLE.md with the numbers of the steps that finished, then stops in one line. It left the
    table of before the run (or none), though the perplexity column was there to show."""
    root = str(tmp_path)
    steps = rp.plan("titans_table1", root)
    data = {"perplexity": {"wikitext": {"word_perplexity": 15.0}, "lambada": {"perplexity": 11.0, "accuracy": 0.5}}}
    _write_counted(steps, _step(steps, "perplexity transformer_340m").marker, data)

    def execute(steps):
        raise RuntimeError("step 'zeroshot transformer_340m' failed with exit code 2: python -m eval.reproduce ...")
    monkeypatch.setattr(rp, "execute", execute)
    with pytest.raises(SystemExit) as exit_info:
        rp.main(["titans_table1", "--run", "--results-root", root])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err == "error: step 'zeroshot transformer_340m' failed with exit code 2: " \
                                                "python -m eval.reproduce ...\n"
    # offline, the first zero-shot step fails: every other evaluation comes before it
    titles = [st.title for st in steps if not st.title.startswith(("prepare ", "train "))]
    first_zeroshot = next(i for i, t in enumerate(titles) if t.startswith("zeroshot "))
    assert all(t.startswith("zeroshot ") for t in titles[first_zeroshot:]) and len(titles) - first_zeroshot == 10
    md = (tmp_path / "titans_table1.md").read_text()
    assert _cells(md, "Transformer++", "340M / 15B")[3] == "15.00 / 31.52" and md in out


# -----------------------------------------------------------------------------
# our numbers next to the paper's

def _fake_lm_results(root, run, wiki, lmb, lmb_acc, zero_shot=None):
    d = os.path.join(root, "runs", run)
    _write(os.path.join(d, "eval", "perplexity", "results.json"),
           {"perplexity": {"wikitext": {"word_perplexity": wiki}, "lambada": {"perplexity": lmb, "accuracy": lmb_acc},
                           "val": {"skipped": "not prepared here"}}})
    if zero_shot is not None:
        _write(os.path.join(d, "eval", "zeroshot", "zeroshot.json"), {"accuracy": zero_shot})


ZS = {"piqa": 0.70, "hellaswag": 0.50, "winogrande": 0.55, "arc_easy": 0.65, "arc_challenge": 0.35,
      "social_iqa": 0.40, "boolq": 0.60}


def _cells(md, label, group=None):
    line = next(l for l in md.splitlines() if f"| {label} |" in l and (group is None or l.startswith(f"| {group} |")))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_puts_ours_next_to_the_paper(tmp_path):
    root = str(tmp_path)
    _fake_lm_results(root, "hope_1.3b", 15.0, 11.0, 0.5, ZS)
    _fake_lm_results(root, "hope_760m", 19.5, 21.25, 0.375)                # no zero-shot yet
    md = rp.markdown("nl_table2", root)
    hope13 = _cells(md, "Hope", "1.3B / 100B")
    assert hope13[2] == "`hope_1.3b`"
    assert hope13[3:6] == ["15.00 / 14.39", "11.00 / 10.08", "50.0 / 51.0"]
    assert hope13[6] == "70.0 / 73.9" and hope13[12] == "60.0 / 61.4"
    ours_avg = (50 + 70 + 50 + 55 + 65 + 35 + 40 + 60) / 8
    assert hope13[13] == f"{ours_avg:.2f} / 58.04"
    hope760 = _cells(md, "Hope", "760M / 30B")
    assert hope760[3] == "19.50 / 18.68" and hope760[5] == "37.5 / 38.8"
    assert hope760[6] == "— / 69.2" and hope760[13] == "— / 52.28"             # missing zero-shot -> no Avg
    assert _cells(md, "Transformer++", "1.3B / 100B")[3] == "— / 17.92"     # not run yet
    samba = _cells(md, "Samba*", "760M / 30B")
    assert samba[2] == "—" and samba[3] == "— / 21.07" and samba[-1] == "paper only"
    t6 = rp.markdown("nl_table6", root)
    assert _cells(t6, "Hope")[3:5] == ["13.00 / 12.24", f"{ours_avg:.1f} / 58.1"]   # ppl = mean(Wiki, LMB)
    assert _cells(t6, "w/o inner-projection q")[3] == "13.00 / 12.19"
    assert _cells(t6, "w/o CMS")[3] == "— / 13.04"
    # the Wiki ppl column is on the offline WikiText copy, not lm-eval's text: said under each such table
    for md_of in (md, t6, rp.markdown("titans_table1", root)):
        assert rp.OUR_PERPLEXITY_NOTE in md_of and "no blank lines" in md_of
    assert "no blank lines" not in rp.markdown("nl_niah", root)


def test_markdown_niah_babilong_continual(tmp_path):
    root = str(tmp_path)
    _write(os.path.join(root, "runs", "hope_760m-50b", "eval", "niah", "results.json"),
           {"niah": {"accuracy": {"niah_single_1": {"4k": 1.0, "8k": 0.9}, "niah_single_3": {"16k": 0.25}}}})
    _write(os.path.join(root, "runs", "titans_mac_760m", "eval", "niah_titans", "niah.json"),
           {"accuracy": {"niah_single_1": {"2k": 0.99}, "niah_single_2": {"16384": 0.5}}})   # label; old key
    md = rp.markdown("nl_niah", root)
    hope = _cells(md, "Hope", "50B tokens")
    assert hope[3:5] == ["100.0 / 100.0", "90.0 / 100.0"] and hope[11] == "25.0 / 24.8" and hope[6] == "— / 99.2"
    mac = _cells(md, "MAC", "Titans S-NIAH")
    assert mac[3] == "99.0 / 99.2" and mac[10] == "50.0 / 97.4" and mac[11] == "— / 98.2"   # W: no task here

    _write(os.path.join(root, "runs", "hope_760m", "eval", "babilong", "babilong.json"),
           {"mean_over_tasks": {"official": {"0k": 0.8, "1M": 0.4, "4k": None}}})
    bl = _cells(rp.markdown("babilong", root), "Hope")
    assert bl[3] == "80.0" and bl[13] == "40.0" and bl[6] == "—"
    assert "figure only" in rp.markdown("babilong", root)

    arms = {"sequential": {"ACC": 0.3, "BWT": -0.5}, "in_context_memory": {"ACC": 0.6, "BWT": None}}
    _write(os.path.join(root, "runs", "hope_760m", "eval", "continual", "results.json"),
           {"continual": {"intents": {"clinc": {"arms": arms}}, "domains": {"mean_forgetting": 1.25}}})
    cl = _cells(rp.markdown("continual", root), "Hope")
    assert cl[3:7] == ["30.0", "-50.0", "60.0", "—"] and cl[7] == "—" and cl[11] == "1.25"


def test_cli_prints_commands_and_writes_the_table(tmp_path, capsys):
    root = str(tmp_path / "results")
    path = rp.main(["titans_table1", "--results-root", root, "--out", str(tmp_path / "tables"), "--nproc", "4"])
    out = capsys.readouterr().out
    assert path == str(tmp_path / "tables" / "titans_table1.md") and os.path.isfile(path)
    assert "torch.distributed.run --standalone --nproc_per_node=4 train.py configs/titans_mag_340m.yaml" in out
    assert "python -m eval.run --suite paper --sections perplexity" in out
    assert "| 400M / 15B | MAG |" in open(path).read()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "eval.reproduce", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_cli_errors(tmp_path, capsys):
    bad = _cli("nl_table99", "--results-root", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown table 'nl_table99'")
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    for args, message in ((["--nproc", "0"], "argument --nproc: must be >= 1"),
                          (["--train-args", "train.compile=true"], "--train-args must be overrides"),
                          (["--train-args", "--train.max_stepz=3"], "train.max_stepz"),
                          # every run of the table trained into that one folder
                          (["--train-args=--train.out_dir=x"], "--train-args may not set --train.out_dir: each run"),
                          (["--train-args", "--train.resume=never"], "--train-args may not set --train.resume")):
        with pytest.raises(SystemExit) as e:
            rp.main(["nl_table2", "--results-root", str(tmp_path), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rp.main(["zeroshot", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)])


def test_zeroshot_without_lm_eval_or_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rp.main(["zeroshot", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        os.makedirs(tmp_path / "ckpt")
        with pytest.raises(SystemExit):
            rp.main(["zeroshot", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path)])
        assert "pip install -r requirements-eval.txt" in capsys.readouterr().err


def test_zero_shot_scores_read_the_papers_metrics():
    raw = {"results": {task: {"acc,none": 0.1, "acc_norm,none": 0.9, "acc_stderr,none": 0.01} for task in rp.ZERO_SHOT_TASKS}}
    scores = rp.zero_shot_scores(raw)
    assert scores["hellaswag"] == scores["arc_challenge"] == 0.9                 # acc_norm
    assert scores["piqa"] == scores["arc_easy"] == scores["social_iqa"] == 0.1   # acc
    del raw["results"]["boolq"]
    with pytest.raises(ValueError, match="boolq"):
        rp.zero_shot_scores(raw)


# -----------------------------------------------------------------------------
# the paper's numbers

def test_paper_numbers_spot_checks():
    assert NL_TABLE2.value("1.3B / 100B", "Hope", "wiki_ppl") == 14.39
    assert NL_TABLE2.value("1.3B / 100B", "Hope", "avg") == 58.04
    assert NL_TABLE2.value("760M / 30B", "Transformer++", "lmb_ppl") == 24.27
    assert NL_TABLE2.value("760M / 30B", "Titans", "arc_challenge") == 35.7
    assert NL_TABLE6.value("1.3B / 100B (inferred)", "w/o CMS", "ppl") == 13.04
    assert TITANS_TABLE1.value("400M / 15B", "MAG", "wiki_ppl") == 23.59
    assert TITANS_TABLE1.value("760M / 30B", "MAC", "avg") == 52.51
    assert NL_TABLE1_SNIAH.value("50B tokens", "Hope", "s_niah_3_16k") == 24.8
    assert TITANS_TABLE2.value("Titans S-NIAH", "LMM", "n_16k") == 80.2
    with pytest.raises(KeyError, match="rows"):
        NL_TABLE2.row("760M / 30B", "Mamba")


def test_paper_avg_is_the_mean_of_the_accuracies():
    """Avg = mean of the 8 accuracy columns in every row of NL Table 2 but two, whose Avg the
    paper itself prints inconsistently (the digest copies them verbatim): a check on the transcription."""
    from eval.paper_numbers import average_accuracy
    off = {(group, model) for group, rows in NL_TABLE2.groups.items() for model in rows
           if abs(average_accuracy(NL_TABLE2.row(group, model)) - NL_TABLE2.value(group, model, "avg")) > 0.011}
    assert off == {("760M / 30B", "TTT"), ("1.3B / 100B", "Comba")}
    # Table 6 Hope = mean(Wiki, LMB) and Avg of the 1.3B Hope row
    hope = NL_TABLE2.row("1.3B / 100B", "Hope")
    assert abs((hope["wiki_ppl"] + hope["lmb_ppl"]) / 2 - NL_TABLE6.value("1.3B / 100B (inferred)", "Hope", "ppl")) < 0.0051
    assert abs(hope["avg"] - NL_TABLE6.value("1.3B / 100B (inferred)", "Hope", "acc")) <= 0.1   # 58.04 vs 58.1


def _digest_tables():
    with open(DIGEST) as f:
        text = f.read()

    def rows_after(marker):
        lines = text[text.index(marker):].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|")) + 2
        rows = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            rows.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
        return rows
    return text, rows_after


@pytest.mark.skipif(not os.path.isfile(DIGEST), reason="../shared/reference/paper-digest.md not here")
def test_every_cell_matches_the_digest():
    text, rows_after = _digest_tables()
    group = None
    for cells in rows_after("### 5.2"):
        if not cells[1]:
            group = cells[0]
            continue
        assert NL_TABLE2.groups[group][cells[0]] == tuple(float(c) for c in cells[1:]), cells[0]
    for marker, table in (("### 5.3", NL_TABLE1_SNIAH), ("**Titans Table 2**", TITANS_TABLE2),
                          ("**HOPE Table 6.**", NL_TABLE6)):
        rows = next(iter(table.groups.values()))
        digest = {cells[0]: tuple(float(c) for c in cells[1:]) for cells in rows_after(marker)}
        assert rows == digest, table.name
    line = next(l for l in text.splitlines() if l.startswith("**Titans Table 1**"))
    groups = re.findall(r"(\d+M)/(?:15|30)B: (.*?)(?=\. \d+M/|\.$)", line)
    assert [g for g, _ in groups] == ["340M", "400M", "760M"]
    for group, body in groups:
        rows = next(rows for name, rows in TITANS_TABLE1.groups.items() if name.startswith(group))
        digest = {m.group(1): tuple(float(x) for x in m.group(2, 3, 4))
                  for m in re.finditer(r"([\w+*\- ]+?) ([\d.]+)/([\d.]+)/([\d.]+)", body)}
        assert {k.strip(): v for k, v in digest.items()} == rows, group
    assert set(PAPER) == {"nl_table2", "nl_table6", "titans_table1", "nl_table1_sniah", "titans_table2"}


@pytest.mark.parametrize("content, message", [
    (b'{"perplexity": {"wikitext": {"word_perplexity": 12.', "is not valid JSON (Expecting ',' delimiter, line 1)"),
    (b"\xff", "is not UTF-8 text (byte 0xff at offset 0)"),
])
def test_cli_damaged_results_file_is_one_line_and_keeps_the_table(content, message, tmp_path, capsys):
    """A results JSON cut short (an eval killed while writing it) or not UTF-8: one line naming
    it (not a traceback), and the earlier TABLE.md stays as it was."""
    path = tmp_path / "runs" / "transformer_340m" / rp.EVAL_FILES["perplexity"]
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    (tmp_path / "titans_table1.md").write_text("earlier table")
    with pytest.raises(SystemExit) as exit_info:
        rp.main(["titans_table1", "--results-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {path} {message}") and err.count("\n") == 1
    assert "delete it to run its step again" in err
    assert (tmp_path / "titans_table1.md").read_text() == "earlier table"


def _write_counted(steps, marker, data):
    """`data` written as its eval step's output that counts (step_status): it records the
    run's final checkpoint and the step's settings."""
    step = next(st for st in steps if st.marker == marker)
    data = {**data, "checkpoint": step.source, "checkpoint_dir": step.source}
    for key, wanted in step.settings.items():
        *parents, leaf = key.split("/")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = wanted
    _write(marker, data)
    assert rp.step_status(step) == (True, None)


@pytest.mark.parametrize("table, run, file, data, message", [
    ("titans_table1", "transformer_340m", "perplexity",
     {"perplexity": {"wikitext": {"word_perplexity": "12.5"}}}, "'perplexity/wikitext/word_perplexity' is '12.5'"),
    ("titans_table1", "transformer_340m", "zeroshot", {"accuracy": {"piqa": True}}, "'accuracy/piqa' is True"),
    ("nl_niah", "hope_760m-50b", "niah", {"niah": {"accuracy": {"niah_single_1": {"4k": "1.0"}}}},
     "'niah_single_1/4k' is '1.0'"),
    ("nl_niah", "hope_760m-50b", "niah", {"niah": {"accuracy": {"niah_single_1": 0.5}}},
     "'niah_single_1' is 0.5, not a table"),
    ("babilong", "hope_760m", "babilong", {"mean_over_tasks": {"official": {"4k": [0.5]}}},
     "'mean_over_tasks/official/4k' is [0.5]"),
    ("continual", "hope_760m", "continual", {"continual": {"domains": {"mean_forgetting": "n/a"}}},
     "'domains/mean_forgetting' is 'n/a'"),
])
def test_cli_results_file_with_text_for_a_number_is_one_line(table, run, file, data, message, tmp_path, capsys):
    """A results JSON edited by hand so a metric holds text (or a bool, a list): one line naming
    the run folder and the metric's keys, not a format traceback; the earlier TABLE.md stays."""
    run_path = tmp_path / "runs" / run
    _write_counted(rp.plan(table, str(tmp_path)), str(run_path / rp.EVAL_FILES[file]), data)
    (tmp_path / f"{table}.md").write_text("earlier table")
    with pytest.raises(SystemExit) as exit_info:
        rp.main([table, "--results-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: a results file under {run_path}: {message}"), err
    assert (tmp_path / f"{table}.md").read_text() == "earlier table"


def test_train_args_takes_a_single_override(tmp_path, capsys):
    """`--train-args "--train.compile=true"` (one override, the documented form) was read by
    argparse as a flag, not as the value: "error: argument --train-args: expected one argument"."""
    rp.main(["nl_table2", "--results-root", str(tmp_path), "--train-args", "--train.compile=true"])
    out = capsys.readouterr().out
    assert "configs/hope_760m.yaml --train.out_dir=" in out and "--train.compile=true" in out
    with pytest.raises(SystemExit) as e:
        rp.main(["nl_table2", "--results-root", str(tmp_path), "--train-args", "--train.max_stepz=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "train.max_stepz" in err
    assert len(err.strip().splitlines()) == 1


def test_zeroshot_writes_what_lm_metrics_reads(tmp_path, monkeypatch):
    """`eval.reproduce zeroshot` runs lm-eval zero-shot on the seven tasks and writes
    zeroshot.json; lm_metrics reads the tables' columns back from it (in %). lm-eval and the
    checkpoint are stubbed. Kills another key in the file or a few-shot run."""
    import eval.lm_eval_adapter as adapter
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {task: {f"{metric},none": 0.5 + 0.01 * i}
                            for i, (task, (metric, _)) in enumerate(rp.ZERO_SHOT_TASKS.items())}}
    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate,
                                                                      __version__="stub"))
    monkeypatch.setattr(adapter, "_OUR_LM", types.SimpleNamespace(from_checkpoint=lambda *a, **kw: "lm"))
    os.makedirs(tmp_path / "ckpt")
    run = tmp_path / "runs" / "r"
    rp.run_zero_shot(str(tmp_path / "ckpt"), str(run / os.path.dirname(rp.EVAL_FILES["zeroshot"])))
    assert calls == [{"model": "lm", "tasks": list(rp.ZERO_SHOT_TASKS), "num_fewshot": 0, "limit": None}]
    row = rp.lm_metrics(str(run))
    assert [row[column] for _, column in rp.ZERO_SHOT_TASKS.values()] == pytest.approx([50, 51, 52, 53, 54, 55, 56])


# -----------------------------------------------------------------------------
# what counts as done; launches

def _step(steps, title):
    return next(s for s in steps if s.title == title)


def test_an_eval_of_an_earlier_checkpoint_is_redone_and_kept_aside(tmp_path):
    """A smoke run (--train.max_steps=4) then the full run into the same results root: the
    step-4 eval JSON exists but scored step_000004, so the full plan's eval is todo (the plan
    says why) and --run keeps the old file aside before rerunning (eval.run refuses an --out
    holding another checkpoint's results). Kills 'done when its JSON exists'."""
    root = str(tmp_path)
    smoke = _step(rp.plan("titans_table1", root, train_args=("--train.max_steps=4",)), "perplexity transformer_340m")
    assert smoke.source.endswith(os.path.join("checkpoints", "step_000004"))
    assert smoke.argv[smoke.argv.index("--checkpoint") + 1] == smoke.source
    old = {"checkpoint": smoke.source, "checkpoint_dir": smoke.source, "settings": smoke.settings and
           {"perplexity": smoke.settings["settings/perplexity"]},
           "perplexity": {"wikitext": {"word_perplexity": 900.0}, "lambada": {"perplexity": 9e3, "accuracy": 0.0}}}
    _write(smoke.marker, old)
    old_md = os.path.join(os.path.dirname(smoke.marker), "results.md")      # eval.run writes it beside
    with open(old_md, "w") as f:
        f.write("# step 4's tables")
    assert rp.step_status(smoke) == (True, None)
    steps = rp.plan("titans_table1", root)
    full = _step(steps, "perplexity transformer_340m")
    assert full.marker == smoke.marker and full.source.endswith("step_028610")
    done, why = rp.step_status(full)
    assert not done and "step_000004" in why and "step_028610" in why
    text = rp.script("titans_table1", steps, root)
    assert re.search(r"# \[todo\] perplexity transformer_340m \(.*scored the checkpoint .*step_000004", text)
    zeroshot = _step(steps, "zeroshot transformer_340m")       # zeroshot.json records the path it was given
    _write(zeroshot.marker, {"checkpoint": smoke.source, "accuracy": ZS})
    assert not rp.step_status(zeroshot)[0]

    def runner(argv):
        # kept aside before the eval runs, results.md with it: an interrupted redo left step 4's
        # tables beside no results.json
        assert not os.path.exists(full.marker) and not os.path.exists(old_md)
        _write(full.marker, {**old, "checkpoint": full.source, "checkpoint_dir": full.source})
        return types.SimpleNamespace(returncode=0)
    logs = []
    assert rp.execute([full], runner, log=logs.append) == 1
    aside = os.path.join(os.path.dirname(full.marker), "results.previous.json")
    assert json.load(open(aside)) == old and any("kept aside" in line and "step_000004" in line for line in logs)
    assert open(aside.replace(".json", ".md")).read() == "# step 4's tables"
    assert rp.step_status(full) == (True, None)


def test_a_shorter_runs_checkpoints_are_named_in_the_plan(tmp_path):
    """After a smoke run (--train.max_steps=2) into the same results root, the full run's
    training step was '[todo]' with no reason, and --run resumed from the smoke run's step 2
    without a word; a smoke run of another model made train.py refuse. The plan and --run say
    which, and the model-mismatch case says to move the folder aside."""
    from checkpoint import TRAINER_STATE
    from cli import LATEST
    from config import dump_yaml
    root = str(tmp_path)
    full = _step(rp.plan("titans_table1", root), "train transformer_340m")
    assert rp.resume_note(full) is None                     # nothing there yet
    ckpt = os.path.join(os.path.dirname(os.path.dirname(full.marker)), "step_000002")
    os.makedirs(ckpt)
    open(os.path.join(ckpt, TRAINER_STATE), "w").close()
    with open(os.path.join(os.path.dirname(ckpt), LATEST), "w") as f:
        f.write("step_000002\n")
    run_path = rp.run_dir(root, full.run)
    for smoke_args, said in (
            (("--train.max_steps=2",),
             f"{run_path} holds checkpoints up to step 2 of 28610: training resumes from them"),
            (("--train.max_steps=2", "--model.n_head=4"),
             f"{run_path} holds checkpoints that train.py will refuse to resume (")):
        dump_yaml(rp.run_config(full.run, smoke_args), os.path.join(ckpt, "config.yaml"))
        steps = rp.plan("titans_table1", root)
        text = rp.script("titans_table1", steps, root)
        assert f"# [todo] train transformer_340m ({said}" in text, text
        logs = []
        with pytest.raises(RuntimeError, match="did not write"):
            rp.execute([_step(steps, "train transformer_340m")], lambda argv: types.SimpleNamespace(returncode=0),
                       log=logs.append)
        assert logs[0].startswith(f"note: {said}")
    assert "model.n_head=4" in text and "smoke runs belong under another --results-root" in text


@pytest.mark.parametrize("kind, data, section", [
    ("perplexity", {"perplexity": {"val": {"skipped": "not prepared"}, "wikitext": {"skipped": "wiki.txt not found"},
                                   "lambada": {"perplexity": 9.0, "accuracy": 0.5}}}, "perplexity/wikitext"),
    ("niah", {"niah": {"skipped": "no Austen books\nin the data folder"}}, "niah"),
    ("continual", {"continual": {"skipped": "clinc150.json not found"}}, "continual"),
])
def test_a_skipped_section_is_not_done(kind, data, section, tmp_path):
    """eval.run records missing data as {"skipped": why} and exits 0: that step is todo in the
    plan, and after --run it is a one-line error naming the section and the reason. A skipped
    val split (not a table column) is fine. Kills [done] with a dash in the table forever."""
    run = rp._run("hope_760m")
    step = rp.eval_steps(kind, run, str(tmp_path), os.path.join(str(tmp_path), "final"))[0]
    made = {"checkpoint_dir": step.source, "settings": {kind: step.settings[f"settings/{kind}"]}}
    _write(step.marker, {**made, **data})
    done, why = rp.step_status(step)
    assert not done and f"section {section} was skipped" in why
    with pytest.raises(RuntimeError, match=f"does not count as done: .*section {section} was skipped") as e:
        rp.execute([step], lambda argv: _write(step.marker, {**made, **data})
                   or types.SimpleNamespace(returncode=0), log=lambda *_: None)     # the data is still missing
    assert "\n" not in str(e.value) and os.path.isfile(step.marker.replace(".json", ".previous.json"))
    if kind == "perplexity":
        data["perplexity"]["wikitext"] = {"word_perplexity": 20.0}
        _write(step.marker, {**made, **data})
        assert rp.step_status(step) == (True, None)


def test_user_grad_accum_with_nproc_launches(tmp_path, capsys):
    """--train-args "--train.grad_accum=4" with --nproc 2: the printed launch passes the per-rank
    grad_accum only (the user's value appended last made torchrun fail "must be divisible by 2
    ranks x train.grad_accum=4"); the micro-batch stays the user's 128 / 4 = 32 sequences."""
    rp.main(["nl_table2", "--results-root", str(tmp_path), "--nproc", "2", "--train-args", "--train.grad_accum=4"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "configs/hope_760m.yaml" in l and "train.py" in l)
    argv = shlex.split(line)
    assert argv[:3] == TORCHRUN and sum(a.startswith("--train.grad_accum") for a in argv) == 1
    cfg = load_config(argv[6], [a for a in argv[7:] if not a.startswith("--train.out_dir=")])
    assert cfg.train.grad_accum == 2
    assert cfg.train.batch_size % (2 * cfg.train.grad_accum) == 0        # distributed.setup's check
    assert cfg.train.batch_size // (2 * cfg.train.grad_accum) == 32
    assert rp._without_override(["--train.grad_accum", "4", "--train.lr=1e-3", "--train.grad-accum=2"],
                                "train.grad_accum") == ["--train.lr=1e-3"]     # either form, either spelling


def test_training_launches_through_this_interpreter(tmp_path):
    """No torchrun on PATH needed: the launch is `python -m torch.distributed.run`, run with
    sys.executable."""
    step = rp.train_step(rp._run("hope_760m"), str(tmp_path), nproc=2)
    calls = []
    with pytest.raises(RuntimeError, match="did not write"):
        rp.execute([step], lambda argv: calls.append(argv) or types.SimpleNamespace(returncode=0),
                   log=lambda *_: None)
    assert calls[0][:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize("base, group", [("hope_760m", "760M / 30B"), ("hope_340m", "340M / 15B")])
def test_table6_at_a_smaller_base_says_so(base, group, tmp_path):
    """--ablation-base hope_760m / hope_340m: the group is the base's scale and each paper row
    notes that the paper's numbers are at 1.3B, which they are still compared with."""
    rows = rp.table_rows("nl_table6", base)
    assert {r.group for r in rows} == {group}
    assert all("1.3B / 100B" in r.note for r in rows if r.paper)
    _fake_lm_results(str(tmp_path), base, 15.0, 11.0, 0.5, ZS)
    md = rp.markdown("nl_table6", str(tmp_path), base)
    hope = _cells(md, "Hope", group)
    assert hope[2] == f"`{base}`" and hope[3] == "13.00 / 12.24" and "paper's numbers: 1.3B / 100B" in hope[-1]
    assert "1.3B" not in "".join(r.group for r in rows)
    assert {r.group for r in rp.table_rows("nl_table6")} == {"1.3B / 100B (inferred)"}


def test_tables_leave_out_outputs_that_do_not_count_and_a_moved_root_keeps_them(tmp_path):
    """TABLE.md shows '—' and says why for a run whose eval output does not count (here made
    with other settings: an earlier NIAH cut to 4K), not its numbers; a results root moved
    elsewhere keeps its finished evals (the recorded checkpoint's last parts are compared,
    not its absolute path)."""
    import shutil
    root = tmp_path / "a"
    steps = rp.plan("titans_table1", str(root))
    step = _step(steps, "perplexity transformer_340m")
    data = {"perplexity": {"wikitext": {"word_perplexity": 12.5}, "lambada": {"perplexity": 9.0, "accuracy": 0.5}}}
    _write_counted(steps, step.marker, data)
    assert "12.50" in rp.markdown("titans_table1", str(root), steps=steps)
    shutil.copytree(root, tmp_path / "b")
    moved = _step(rp.plan("titans_table1", str(tmp_path / "b")), "perplexity transformer_340m")
    assert rp.step_status(moved) == (True, None)
    stale = json.load(open(step.marker))
    stale["settings"]["perplexity"] = {**stale["settings"]["perplexity"], "wikitext_docs": 1}
    _write(step.marker, stale)
    done, why = rp.step_status(step)
    assert not done and "made with other settings (settings/perplexity" in why
    text = rp.markdown("titans_table1", str(root), steps=steps)
    assert "12.50" not in text and "not counted: " in text and "(--run redoes it)" in text
