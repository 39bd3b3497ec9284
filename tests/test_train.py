"""End-to-end training on a tiny byte-level corpus: loss falls, exact resume after SIGKILL,
NaN steps are skipped, metrics/config files are written."""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.d_model=32", "--data.tokenizer=bytes",
        "--train.batch_size=4", "--train.seq_len=32", "--train.lr=3e-3", "--optim.warmup_steps=5",
        "--train.eval_batches=2", "--train.sample_tokens=0", "--logging.wandb=disabled"]


def run_train(args, **kw):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, **kw)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_run_loss_falls_and_writes_files(corpus, tmp_path):
    out = str(tmp_path / "run")
    r = run_train([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out}", "--train.max_steps=60",
                   "--train.eval_every=30", "--train.ckpt_every=30", "--train.log_every=10"])
    assert r.returncode == 0, r.stderr
    assert "training done" in r.stdout
    rows = read_metrics(out)
    for key in ("step", "tokens", "loss", "lr", "tokens_per_s"):
        assert key in rows[0]
    evals = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in evals] == [30, 60]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0          # ln(257) = 5.55 at init
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_000060"
    final = json.load(open(os.path.join(out, "final_eval.json")))
    assert final["val_bpb"] < 8.0 and final["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(corpus, tmp_path):
    common = [*TINY, f"--data.dataset={corpus}", "--train.max_steps=40", "--train.eval_every=0",
              "--train.ckpt_every=5", "--train.log_every=1", "--eval.final=false"]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert run_train([*common, f"--train.out_dir={ref_dir}"]).returncode == 0
    # start a run, SIGKILL it once it has logged past a checkpoint, then resume it
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--train.out_dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 17/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    r = run_train([*common, f"--train.out_dir={run_dir}"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step_000015" in r.stdout
    ref, resumed = read_metrics(ref_dir), read_metrics(run_dir)
    assert [x["step"] for x in resumed] == [x["step"] for x in ref] == list(range(1, 41))
    assert [x["loss"] for x in resumed] == [x["loss"] for x in ref]       # bit-identical


def nan_losses_at(monkeypatch, is_bad):
    """Training forwards (the n-th, from 1) whose loss is NaN where is_bad(n)."""
    import model as model_mod
    real_forward = model_mod.LanguageModel.forward
    calls = {"n": 0}

    def flaky_forward(self, idx, targets=None, state=None, return_state=True):
        logits, loss, st = real_forward(self, idx, targets, state, return_state)
        if targets is not None and self.training:
            calls["n"] += 1
            if is_bad(calls["n"]):
                loss = loss * float("nan")
        return logits, loss, st

    monkeypatch.setattr(model_mod.LanguageModel, "forward", flaky_forward)


def test_nan_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch, capsys):
    import train as train_mod
    from config import load_config
    nan_losses_at(monkeypatch, lambda n: n in (3, 4) or n >= 8)     # two isolated bad steps, then forever
    cfg = load_config(None, [*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path}/nan",
                             "--train.max_steps=30", "--train.eval_every=0", "--train.ckpt_every=5",
                             "--train.log_every=1", "--train.max_bad_steps=3"])
    assert train_mod.train(cfg) == 1
    err = capsys.readouterr()
    assert "step skipped" in err.out and "3 non-finite steps in a row; stopping" in err.err
    rows = read_metrics(f"{tmp_path}/nan")
    assert [r["step"] for r in rows] == [1, 2, 5, 6, 7]                  # steps 3, 4 skipped
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    with open(f"{tmp_path}/nan/checkpoints/latest") as f:                  # last good checkpoint kept
        assert f.read().strip() == "step_000005"


def test_bad_resume_path_and_data_errors(corpus, tmp_path):
    r = run_train([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path}/x",
                   f"--train.resume={tmp_path}/missing"])
    assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint found at")
    assert "no such file or folder (train.resume takes auto, never or the path of a checkpoint)" in r.stderr
    r = run_train([*TINY, "--data.dataset=files:/nonexistent/*.txt", f"--train.out_dir={tmp_path}/y",
                   f"--data.data_dir={tmp_path}/y-data"])
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run_train([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path}/z", "--model.vocab_size=200"])
    assert r.returncode == 2 and r.stderr == "error: model.vocab_size=200 is smaller than the bytes tokenizer's 257\n"
    assert not os.path.exists(f"{tmp_path}/z")


@pytest.mark.parametrize("optimizer", ["muon", "delta_momentum", "dmgd"])
@pytest.mark.slow
def test_deep_optimiser_via_config_and_exact_resume(corpus, tmp_path, optimizer):
    """optim.name selects a deep optimiser; its state round-trips through the checkpoint."""
    common = [*TINY, f"--data.dataset={corpus}", f"--optim.name={optimizer}", "--train.max_steps=8",
              "--train.eval_every=0", "--train.log_every=1", "--eval.final=false"]
    ref, split = str(tmp_path / "ref"), str(tmp_path / "split")
    assert run_train([*common, f"--train.out_dir={ref}", "--train.ckpt_every=0"]).returncode == 0
    r = run_train([*common, f"--train.out_dir={split}", "--train.ckpt_every=4", "--train.max_steps=4"])
    assert r.returncode == 0, r.stderr
    r = run_train([*common, f"--train.out_dir={split}", "--train.ckpt_every=4"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert [x["loss"] for x in read_metrics(split)] == [x["loss"] for x in read_metrics(ref)]
    assert read_metrics(ref)[-1]["loss"] < read_metrics(ref)[0]["loss"]


def test_evals_during_training_are_logged(corpus, tmp_path):
    out = str(tmp_path / "ev")
    r = run_train([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out}", "--train.max_steps=4",
                   "--train.eval_every=4", "--train.ckpt_every=0", "--eval.final=false",
                   "--eval.during_training=[perplexity]"])
    assert r.returncode == 0, r.stderr
    row = read_metrics(out)[-1]
    assert {"wikitext_word_ppl", "lambada_ppl", "lambada_acc"} <= set(row), row
    r = run_train([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out}", "--eval.during_training=[bogus]"])
    assert r.returncode == 2 and "eval.during_training has unknown eval(s) ['bogus']" in r.stderr


@pytest.mark.parametrize("dtype, device_type, bf16, precision", [
    ("auto", "cpu", False, "highest"), ("auto", "cuda", True, "high"),
    ("float32", "cuda", False, "highest"), ("bfloat16", "cpu", True, "highest")])
def test_setup_precision(dtype, device_type, bf16, precision):
    """bf16 autocast for train.dtype bfloat16, or auto on CUDA; then, on CUDA only, fp32
    matmuls (and the memory kernels' fp32 products, kernels.triton_delta.dot_precision) may
    use TF32. Needs no GPU: it only sets torch's flag."""
    from config import TrainConfig
    from train import setup_precision
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        assert setup_precision(TrainConfig(dtype=dtype), device_type) is bf16
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(old)


def test_start_up_says_which_memory_parts_run_fused(corpus, tmp_path, capsys):
    """train.py prints model.kernel_report: for a Titans model on the CPU, the memory's
    per-chunk path and why (so a GPU user sees whether model.kernels picked the fused kernel)."""
    import train as train_mod
    from config import load_config
    cfg = load_config(None, [*TINY, "--model.arch=titans", f"--data.dataset={corpus}",
                             f"--train.out_dir={tmp_path}/titans", "--train.max_steps=1",
                             "--train.eval_every=0", "--train.ckpt_every=0"])
    assert train_mod.train(cfg) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("kernels: Titans memory x2: per-chunk path (backend 'auto' on cpu runs the chunked "
            "PyTorch path)") in out
    assert any(line.startswith("data: random windows of 33 tokens; 1 step read ") for line in out)
    # TINY warms up for 5 steps: a 1-step run never reaches train.lr (3e-3), and says so
    assert ("note: optim.warmup_steps=5 > train.max_steps=1: the lr never leaves warm-up (it peaks at "
            "0.0006, train.lr=0.003)") in out


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_resumed_run_logs_into_the_same_wandb_run(corpus, tmp_path, monkeypatch, capsys):
    """Every resume opened a new W&B run, so a preempted job's curve was split over several.
    A run records its W&B id in <out_dir>/wandb_run_id and a resume of that out_dir continues
    it (resume="allow"); a run started over, or resumed from another out_dir, is a new one;
    a damaged id file is a one-line error naming it. wandb is a stub here (offline, fast)."""
    import types

    import train as train_mod
    inits = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                        finish=lambda exit_code=0: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    base = [*TINY, f"--data.dataset={corpus}", "--train.ckpt_every=2", "--eval.final=false", "--logging.wandb=offline"]
    argv = [*base, f"--train.out_dir={out}"]
    assert train_mod.main([*argv, "--train.max_steps=2"]) == 0
    first = (out / "wandb_run_id").read_text().strip()
    assert inits[0]["id"] == first and inits[0]["resume"] is None
    assert train_mod.main([*argv, "--train.max_steps=4"]) == 0                   # resumed at step 2
    assert (inits[1]["id"], inits[1]["resume"]) == (first, "allow")
    other = tmp_path / "branch"          # resumed from this run's checkpoint into another out_dir
    assert train_mod.main([*base, f"--train.out_dir={other}", f"--train.resume={out}/checkpoints/step_000002",
                           "--train.max_steps=3"]) == 0
    assert inits[2]["resume"] is None and inits[2]["id"] not in (first, None)
    assert (other / "wandb_run_id").read_text().strip() == inits[2]["id"]
    capsys.readouterr()
    (out / "wandb_run_id").write_text("not an id!\n")
    _fails_and_keeps(tmp_path / "run", [*argv, "--train.max_steps=5"],
                     f"{out / 'wandb_run_id'} holds no W&B run id (got 'not an id!'): delete it", capsys)


def _fails_and_keeps(root, argv, message, capsys):
    """train.main(argv) exits 2 with one line "error: ..." holding `message`; no file under `root` changes."""
    import train as train_mod
    before = _snapshot(root)
    assert train_mod.main(argv) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert _snapshot(root) == before
    return out


def test_long_context_warning_where_memories_explode():
    """HOPE above an inner clip of 1.5 on sequences of 1K+ tokens (docs/FIDELITY.md, HOPE
    choice 12), and Titans on 1K+ tokens with a step budget above 0.5 or an inner clip above
    1 (or none; Titans choice 14), get one warning line at start-up: MAC and MAG at any head
    dim (head dim 32 explodes from 256 tokens), LMM and MAL from head dim 64 (32 held); the
    paper configs (HOPE clip 1.0,
    Titans budget 0.5 and clip 1.0), the tiny configs at their 128 tokens, memories without
    writes and other archs get none."""
    from config import load_config
    from train import long_context_warning

    def warning(config, *overrides):
        return long_context_warning(load_config(os.path.join(REPO, "configs", config), list(overrides)))
    assert warning("hope_760m.yaml") is None and warning("hope_tiny.yaml") is None
    assert warning("hope_760m.yaml", "--model.hope.max_grad_norm=1.5") is None
    assert warning("hope_760m.yaml", "--model.hope.max_grad_norm=3") == (
        "warning: train.seq_len=4096 with model.hope.max_grad_norm=3.0: HOPE's memories diverge from ~1024 tokens "
        "above a clip of 1.5 (the paper configs use 1.0; docs/FIDELITY.md, HOPE choice 12); there the outer "
        "gradients explode and train.py skips the steps")
    long = ("--train.seq_len=1024", "--model.max_seq_len=1024")
    assert warning("hope_tiny.yaml", *long) is not None
    assert warning("hope_tiny.yaml", *long, "--model.hope.max_grad_norm=null") is not None
    assert warning("hope_tiny.yaml", *long, "--model.hope.inner_lr_fixed=0") is None
    assert warning("hope_tiny.yaml", "--train.seq_len=1023", "--model.max_seq_len=1023") is None
    assert warning("transformer_tiny.yaml", *long) is None
    assert warning("titans_mag_760m.yaml") is None and warning("titans_lmm_1.3b.yaml") is None
    assert warning("titans_mag_760m.yaml", "--model.titans.step_budget=1").startswith(
        "warning: train.seq_len=4096 with model.titans.step_budget=1.0 and max_grad_norm=1.0: Titans' memories "
        "can diverge from ~1024 tokens")
    assert warning("titans_mac_340m.yaml", "--model.titans.step_budget=null") is not None
    assert warning("titans_mac_340m.yaml", "--model.titans.max_grad_norm=10") is not None
    assert warning("titans_mac_340m.yaml", "--model.titans.max_grad_norm=null") is not None
    assert warning("titans_mac_340m.yaml", "--model.titans.step_budget=0.25", "--model.titans.max_grad_norm=0.5") is None
    assert warning("titans_mac_340m.yaml", "--model.titans.step_budget=null", "--model.titans.inner_lr_fixed=0") is None
    assert warning("titans_lmm_tiny.yaml", *long) is None and warning("titans_mal_tiny.yaml", *long) is None
    for variant in ("mac", "mag"):      # head dim 32: their tiny configs set the two
        assert warning(f"titans_{variant}_tiny.yaml", *long) is None
        assert warning(f"titans_{variant}_tiny.yaml", *long, "--model.titans.step_budget=null",
                       "--model.titans.max_grad_norm=10") is not None
    assert warning("titans_mal_760m.yaml", "--train.seq_len=512", "--model.titans.step_budget=null") is None


def test_train_notes_settings_its_architecture_does_not_read(corpus, tmp_path, capsys):
    import train as train_mod
    assert train_mod.main([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path}/run", "--train.max_steps=1",
                           "--train.eval_every=0", "--train.ckpt_every=0", "--model.arch=transformer",
                           "--model.cms.chunk_sizes=[16,null]"]) == 0
    assert ("note: model.cms.chunk_sizes is set, but model.arch=transformer does not read it"
            in capsys.readouterr().out.splitlines())
    # the same for another rule's options, a schedule's, and settings of another kind of source
    assert train_mod.main([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path}/run2", "--train.max_steps=1",
                           "--train.eval_every=0", "--train.ckpt_every=0", "--optim.m3_frequency=3",
                           "--optim.decay_fraction=0.5", "--data.hf_split=validation"]) == 0
    out = capsys.readouterr().out.splitlines()
    for key in ("optim.m3_frequency", "optim.decay_fraction"):
        assert f"note: {key} is set, but optim.name=adamw with schedule=cosine does not read it" in out
    assert f"note: data.hf_split is set, but data.dataset={corpus} does not read it" in out
    assert train_mod.main([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path}/run3", "--train.max_steps=1",
                           "--train.eval_every=0", "--train.ckpt_every=0", "--data.val_fraction=0.5"]) == 0
    assert (f"note: data.val_fraction is set, but data.dataset={corpus} does not read it"      # prepared already
            in capsys.readouterr().out.splitlines())


def test_the_data_cache_folder_names_the_settings_its_source_reads():
    """data.val_fraction etc. off their defaults get their own data/cache folder (two configs
    of one corpus rebuilt one folder in turn); settings the source does not read (hf: only,
    the text field of builtin) change neither the folder nor what data.prepare is asked."""
    from config import load_config
    from train import resolve_data_dir, source_settings

    def folder(*overrides):
        return resolve_data_dir(load_config(None, list(overrides)))
    assert folder() == os.path.join("data", "cache", "builtin-gpt2")
    assert folder("--data.val_fraction=0.2") == os.path.join("data", "cache", "builtin-gpt2-val_fraction0.2")
    assert folder("--data.hf_split=validation", "--data.text_field=body") == folder()
    assert folder("--data.dataset=hf:org/set:cfg", "--data.hf_split=validation", "--data.hf_streaming=true") == \
        os.path.join("data", "cache", "hf_org_set_cfg-gpt2-hf_splitvalidation")
    assert folder("--data.dataset=files:c/*.jsonl", "--data.text_field=body") == \
        os.path.join("data", "cache", "files_c__.jsonl-gpt2-text_fieldbody")
    assert set(source_settings(load_config(None, []).data)) == {"val_fraction", "max_docs"}


def test_during_training_evals_without_an_eval_cadence_are_refused(corpus, tmp_path):
    """eval.during_training with train.eval_every=0 never ran; train.py refuses it before step 1
    (not config.validate: a checkpoint saved with it before must still load for sampling and evals)."""
    import train as train_mod
    from config import ConfigError, config_from_dict
    cfg = _cfg(corpus, tmp_path / "run", "--eval.during_training=[perplexity]")      # _cfg: eval_every 0
    with pytest.raises(ConfigError, match=r"^eval.during_training=\['perplexity'\] never runs with "
                                          r"train.eval_every=0$"):
        train_mod.train(cfg)
    assert not (tmp_path / "run").exists()
    assert config_from_dict({"eval": {"during_training": ["perplexity"]}, "train": {"eval_every": 0}})


def test_bad_out_dir_and_resume_lose_nothing(corpus, tmp_path, capsys):
    """A finished run's out_dir under the settings that used to overwrite it: resume=never
    refuses; checkpoints without `latest` refuse resume=auto (naming the one to pass); a
    mismatched model fails at the resume without rewriting config.yaml; a checkpoint past
    max_steps says so; an out_dir that is a file or empty, or a val split shorter than a
    window, stop before anything is prepared or written. Each: one line, exit 2, files
    untouched."""
    import train as train_mod
    out = tmp_path / "run"
    common = [*TINY, f"--data.dataset={corpus}", "--train.eval_every=0", "--train.ckpt_every=2"]
    assert train_mod.main([*common, f"--train.out_dir={out}", "--train.max_steps=2"]) == 0
    capsys.readouterr()

    def fails(args, message):
        return _fails_and_keeps(out, [*common, *args], message, capsys)

    fails([f"--train.out_dir={out}", "--train.resume=never"], "already holds checkpoints (step_000002)")
    fails([f"--train.out_dir={out}", "--model.d_model=64"], "was trained with model.d_model=32, this run has 64")
    # refused before "resumed from" (the walkthrough read both lines, the first untrue)
    assert "resumed from" not in fails([f"--train.out_dir={out}", "--train.max_steps=1"],
                                       "at step 2, past train.max_steps=1")
    fails([f"--train.out_dir={out / 'metrics.jsonl'}"], "is a file, not a folder")
    fails(["--train.out_dir="], "train.out_dir must name a folder")
    fails([f"--train.out_dir={tmp_path / 'long'}", "--train.seq_len=100000"], "fewer than train.seq_len + 1")
    # an out_dir in a checkpoint (its config.yaml replaced the checkpoint's, exit 0), or in checkpoints/
    ckpt = out / "checkpoints" / "step_000002"
    for inside in (ckpt, ckpt / "sub", out / "checkpoints"):
        fails([f"--train.out_dir={inside}"], f"train.out_dir {inside} is inside the checkpoint "
                                             f"{ckpt if inside != out / 'checkpoints' else inside}: choose another")
    # a corpus prepared by train.py, resumed with another recipe: refused before it is tokenized
    # again (it rebuilt data.data_dir in place, then the resume failed)
    files = [f"--data.dataset=files:{os.path.dirname(corpus)}/*.txt", f"--data.data_dir={tmp_path / 'fdata'}",
             "--data.val_fraction=0.1"]
    assert train_mod.main([*common, *files, f"--train.out_dir={tmp_path / 'frun'}", "--train.max_steps=2"]) == 0
    capsys.readouterr()
    _fails_and_keeps(tmp_path, [*common, *files[:2], "--data.val_fraction=0.2", f"--train.out_dir={tmp_path / 'frun'}",
                                "--train.max_steps=3"], "was trained with data.val_fraction=0.1, this run has 0.2", capsys)
    # resumed on data of another recipe (it trained on without a word)
    from data.prepare import prepare
    other = str(tmp_path / "other-data")
    prepare(f"files:{os.path.dirname(corpus)}/*.txt", other, tokenizer="bytes", val_fraction=0.2, num_workers=1,
            quiet=True)
    fails([f"--train.out_dir={out}", "--train.max_steps=3", f"--data.dataset={other}"],
          "data position was saved on data prepared with val_fraction=0.1, this run reads data prepared with "
          "val_fraction=0.2: the batch stream would differ")
    (out / "checkpoints" / "latest").unlink()
    fails([f"--train.out_dir={out}"], f"--train.resume={out / 'checkpoints' / 'step_000002'}")
    assert not (tmp_path / "long").exists()


def test_what_would_fail_after_training_or_overwrite_another_run_fails_first(corpus, tmp_path, capsys,
                                                                               monkeypatch):
    """Checked before step 1, each one line, exit 2, files untouched: a file where the run
    writes checkpoints/ (it failed at the first save, after training) or a folder where it
    writes a file (a traceback); train.resume=PATH of another run's checkpoint into an out_dir
    with checkpoints of its own (it overwrote them and the metrics); train.resume=''; and
    during-training evals that need the offline eval data when there is none (they failed at
    the first eval); an out_dir name too long to make (a traceback). Resuming the out_dir's
    own earlier checkpoint is still allowed."""
    import eval.common
    import train as train_mod
    out, other = tmp_path / "run", tmp_path / "other"
    common = [*TINY, f"--data.dataset={corpus}", "--train.eval_every=0", "--train.ckpt_every=2",
              "--eval.final=false"]
    for run_dir in (out, other):
        assert train_mod.main([*common, f"--train.out_dir={run_dir}", "--train.max_steps=2"]) == 0
    capsys.readouterr()
    foreign = other / "checkpoints" / "step_000002"
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={out}", "--train.max_steps=4",
                                f"--train.resume={foreign}"], f"train.resume={foreign} (another run's)", capsys)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={out}", "--train.resume="],
                     "train.resume must be auto, never or a checkpoint path, got ''", capsys)
    for name, is_folder in train_mod.OUT_DIR_ENTRIES.items():    # the other kind in the way
        way = tmp_path / f"way-{name}"
        way.mkdir()
        if is_folder:
            (way / name).write_text("x")
        else:
            (way / name).mkdir()
        _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={way}"],
                         f"holds a {'file' if is_folder else 'folder'} {name} where the run writes", capsys)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={tmp_path / ('a' * 300)}"],   # an OSError: no traceback
                     "File name too long", capsys)
    (tmp_path / "afile").write_text("x")          # a data cache under a file: named by its key
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={tmp_path / 'cache'}", f"--data.data_dir={tmp_path}/afile/d"],
                     f"data.data_dir {tmp_path}/afile/d cannot be created: {tmp_path}/afile is not a folder", capsys)
    partial = tmp_path / "partial-data"                     # a data folder without the bAbI files
    partial.mkdir()
    monkeypatch.setenv("NL_DATA_DIR", str(partial))
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={tmp_path / 'evals'}", "--train.eval_every=1",
                                "--eval.during_training=[babilong_quick]"],
                     f"eval.during_training ['babilong_quick']: bAbI file {partial}/babi/en/", capsys)
    monkeypatch.setattr(eval.common, "default_data_dir", lambda: None)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={tmp_path / 'evals'}", "--train.eval_every=1",
                                "--eval.during_training=[perplexity, niah_quick]"],
                     "eval.during_training ['perplexity', 'niah_quick'] needs the offline eval data", capsys)
    monkeypatch.setattr(eval.common, "default_data_dir", lambda: str(partial))   # perplexity reads WikiText
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={tmp_path / 'evals'}", "--train.eval_every=1",
                                "--eval.during_training=[perplexity]"],
                     f"eval.during_training ['perplexity']: WikiText file {partial}/wikitext/wiki.test.raw not found", capsys)
    assert not (tmp_path / "evals").exists()
    # sizes past memory or int64: one line naming the sizes (a TypeError / RuntimeError traceback)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={out}", "--train.max_steps=4", "--model.d_model=2**62"],
                     "model.d_model must be", capsys)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={tmp_path / 'huge'}", f"--model.d_model={2**62}"],
                     f"cannot build the model (model.n_layer=2, d_model={2**62}, vocab_size=257) on cpu: ", capsys)
    # wandb: missing, or refusing its settings, before the out_dir's files are rewritten
    monkeypatch.setitem(sys.modules, "wandb", None)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={out}", "--train.max_steps=4", "--logging.wandb=offline"],
                     "logging.wandb=offline needs the wandb package: pip install wandb", capsys)
    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].init = lambda **kw: (_ for _ in ()).throw(RuntimeError("Invalid project name 'a/b'\nmore"))
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={out}", "--train.max_steps=4", "--logging.wandb=offline"],
                     "logging.wandb=offline: wandb.init failed: Invalid project name 'a/b' more", capsys)
    # a wandb run started, then the outputs refused (a damaged metrics.jsonl): the run is finished
    import types
    finished = []
    sys.modules["wandb"].init = lambda **kw: types.SimpleNamespace(finish=lambda exit_code=0: finished.append(exit_code))
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text("not json\n" + good)
    _fails_and_keeps(tmp_path, [*common, f"--train.out_dir={out}", "--train.max_steps=4", "--logging.wandb=offline"],
                     "metrics.jsonl line 1 is not a metrics record", capsys)
    assert finished == [1]
    metrics.write_text(good)
    monkeypatch.delitem(sys.modules, "wandb")
    own = out / "checkpoints" / "step_000002"
    assert train_mod.main([*common, f"--train.out_dir={out}", "--train.max_steps=3", f"--train.resume={own}"]) == 0


def test_triton_kernels_without_cuda_or_interpreter_fail_before_step_1(corpus, tmp_path, capsys, monkeypatch):
    """model.kernels=triton on CPU without Triton's interpreter: one line naming the fix,
    nothing written (it failed at the first step's kernel launch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _fails_and_keeps(tmp_path, [*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path / 'run'}",
                                "--model.kernels=triton"],
                     "model.kernels=triton needs a CUDA device (or TRITON_INTERPRET=1", capsys)
    assert not (tmp_path / "run").exists()


def test_help_lists_every_override(capsys):
    """python train.py --help: the usage and every config key with its default, exit 0."""
    import train as train_mod
    from config import Config, to_dict
    assert train_mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Pretrain a language model.") and "--train.lr=0.001" in out
    n_keys = sum(1 for line in out.splitlines() if line.startswith("  --"))

    def count(d):
        return sum(count(v) if isinstance(v, dict) else 1 for v in d.values())
    assert n_keys == count(to_dict(Config()))


def test_metrics_log_on_resume_drops_a_cut_last_line_and_names_a_bad_one(tmp_path):
    """MetricsLog(resume_step): lines past the step go; a last line cut short by a kill goes
    too; an unreadable line elsewhere is a one-line error naming the file and line, with the
    file left as it was."""
    from train import MetricsLog
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(rows) + '{"step": 4, "lo')
    MetricsLog(str(path), resume_step=2).start()
    assert path.read_text() == "".join(rows[:2])
    path.write_text("".join(rows))                 # a rollback keeps the later steps' records
    log = MetricsLog(str(path), resume_step=1)
    assert log.keep_dropped() == str(tmp_path / "metrics.abandoned.jsonl")
    log.start()
    assert path.read_text() == rows[0] and (tmp_path / "metrics.abandoned.jsonl").read_text() == "".join(rows[1:])
    bad = rows[0] + "not json\n" + rows[1]
    path.write_text(bad)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record .*fix or remove it"):
        MetricsLog(str(path), resume_step=2)
    assert path.read_text() == bad


# ----------------------------------------------------------------------------------------
# what optimizer.step receives (lr, clipped gradient, the seeded batches in micro-batches),
# grad accumulation, throughput, NaN steps, exact resume with RNG, the last step's
# log/eval/checkpoint and pruning: each against an independent oracle (hand-computed values,
# a fresh BatchSampler, a fake clock, an uninterrupted run)

def _cfg(corpus, out_dir, *args):
    """TINY in one process, logging every step, no evals, no checkpoints unless `args` say so."""
    from config import load_config
    return load_config(None, [*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out_dir}", "--train.log_every=1",
                              "--train.eval_every=0", "--train.ckpt_every=0", "--eval.final=false", *args])


@pytest.fixture
def probe(monkeypatch):
    """At every optimizer.step of train.py: the lr of each param group and the total norm of the
    gradients the optimiser is about to apply (not the lr-0 step with which DCP initialises
    an empty optimiser's state on resume); and train.py's clock (time.time) is a fake one
    that advances exactly 1 s per optimiser step."""
    import train as train_mod
    seen = {"lrs": [], "grad_norms": [], "clock": 1000.0}
    real_make_optimizer = train_mod.make_optimizer

    def make_optimizer(model, cfg, device_type):
        opt = real_make_optimizer(model, cfg, device_type)

        def before_step(optimizer, args, kwargs):
            if all(g["lr"] == 0 for g in optimizer.param_groups):
                return      # DCP's set_state_dict initialising the optimiser state on resume
            seen["lrs"].append([g["lr"] for g in optimizer.param_groups])
            grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen["grad_norms"].append(torch.cat(grads).double().norm().item())
            seen["clock"] += 1.0
        opt.register_step_pre_hook(before_step)
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", make_optimizer)
    monkeypatch.setattr(train_mod, "time", type("FakeTime", (), {"time": staticmethod(lambda: seen["clock"])}))
    return seen


def test_optimizer_applies_the_schedule_and_the_clipped_gradient(corpus, tmp_path, probe):
    """What optimizer.step() actually receives, step by step: every param group at the
    hand-computed warmup + cosine lr (lr 3e-3, 2 warmup steps, 6 steps, min 3e-4), and a
    gradient of norm min(logged grad_norm, optim.grad_clip). Kills: the schedule computed and
    logged but not written into the param groups; gradient clipping skipped."""
    import train as train_mod
    cfg = _cfg(corpus, tmp_path / "run", "--train.max_steps=6", "--optim.warmup_steps=2", "--optim.min_lr_ratio=0.1",
               "--optim.grad_clip=0.05")
    assert train_mod.train(cfg) == 0
    cos = [1 + math.cos(math.pi * k / 4) for k in range(4)]       # cosine over steps 2..6
    want = [1.5e-3, 3e-3] + [3e-4 + 0.5 * 2.7e-3 * v for v in cos]
    assert len(probe["lrs"]) == 6
    for lrs, lr in zip(probe["lrs"], want):
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-12)
    rows = read_metrics(tmp_path / "run")
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
    logged = [r["grad_norm"] for r in rows]
    assert max(logged) > 0.05                                      # clipping is active
    assert probe["grad_norms"] == pytest.approx([min(g, 0.05) for g in logged], rel=1e-4)


def test_steps_read_the_seeded_stream_in_micro_batches(corpus, tmp_path, monkeypatch):
    """train.seed=5, batch 4 in 2 micro-batches: the initial weights are those of build_model
    after torch.manual_seed(5); step s's two forwards see the two halves of batch s of an
    independent BatchSampler(seed=5), in order; the logged loss is the mean of the two
    micro-batch losses. Kills: a fixed torch seed, a fixed sampler seed, wrong micro-batch
    slices, the logged loss summed instead of averaged over micro-batches."""
    import model as model_mod
    import train as train_mod
    from data.loader import BatchSampler, TokenDataset
    seen = {"x": [], "y": [], "loss": [], "init": None}
    real_forward = model_mod.LanguageModel.forward

    def forward(self, idx, targets=None, state=None, return_state=True):
        if seen["init"] is None:
            seen["init"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        logits, loss, st = real_forward(self, idx, targets, state, return_state)
        if targets is not None and self.training:
            seen["x"].append(idx.clone())
            seen["y"].append(targets.clone())
            seen["loss"].append(loss.item())
        return logits, loss, st

    monkeypatch.setattr(model_mod.LanguageModel, "forward", forward)
    cfg = _cfg(corpus, tmp_path / "run", "--train.max_steps=3", "--train.seed=5", "--train.grad_accum=2")
    assert train_mod.train(cfg) == 0

    torch.manual_seed(5)
    fresh = model_mod.build_model(cfg.model).state_dict()
    assert fresh.keys() == seen["init"].keys()
    assert all(torch.equal(fresh[k], seen["init"][k]) for k in fresh)
    sampler = BatchSampler(TokenDataset(corpus), "train", batch_size=4, seq_len=32, seed=5)
    assert len(seen["x"]) == 6
    for step in range(3):
        x, y = sampler.next_batch()
        assert torch.equal(torch.cat(seen["x"][2 * step:2 * step + 2]), x)
        assert torch.equal(torch.cat(seen["y"][2 * step:2 * step + 2]), y)
    rows = read_metrics(tmp_path / "run")
    assert [r["loss"] for r in rows] == pytest.approx(
        [(seen["loss"][2 * s] + seen["loss"][2 * s + 1]) / 2 for s in range(3)], rel=1e-6)


def test_grad_accum_matches_one_big_batch(corpus, tmp_path):
    """The same global batch of 4 in 1 or in 4 micro-batches: the same logged loss and
    gradient norm at every step, within float rounding, and the same token count (the global
    batch's 128 per step). Kills: each micro-batch's backward not divided by grad_accum (4x the
    gradient), the logged loss not divided (4x the loss), tokens counted per micro-batch
    forward (grad_accum x the tokens)."""
    import train as train_mod
    for accum in (1, 4):
        assert train_mod.train(_cfg(corpus, tmp_path / f"accum{accum}", "--train.max_steps=4",
                                    f"--train.grad_accum={accum}")) == 0
    one, four = read_metrics(tmp_path / "accum1"), read_metrics(tmp_path / "accum4")
    assert [r["step"] for r in four] == [r["step"] for r in one] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in four] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert [r["tokens"] for r in four] == [r["tokens"] for r in one] == [128, 256, 384, 512]


def test_throughput_and_token_counts_against_a_fake_clock(corpus, tmp_path, probe):
    """With a clock that advances 1 s per optimiser step, every logged interval (steps 1, 2,
    4, 5 at log_every=2, max_steps=5) ran at batch_size * seq_len = 128 tokens/s, whatever its
    length, and `tokens` is 128 per step so far. Kills: the token counter not reset after a log
    line (tokens/s that grows with every interval), tokens/s over the wrong time span."""
    import train as train_mod
    assert train_mod.train(_cfg(corpus, tmp_path / "run", "--train.max_steps=5", "--train.log_every=2")) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert [r["tokens"] for r in rows] == [128 * r["step"] for r in rows]
    assert [r["tokens_per_s"] for r in rows] == pytest.approx([128.0] * 4, rel=1e-9)
    assert [r["tokens_per_s_per_device"] for r in rows] == pytest.approx([128.0] * 4, rel=1e-9)


def test_isolated_nan_steps_are_counted_but_do_not_stop(corpus, tmp_path, monkeypatch):
    """NaN losses at steps 2, 4 and 6 with max_bad_steps=2: never two in a row, so the run
    finishes (exit 0) with skipped_steps=3, and only the 4 good steps count tokens. Kills: the
    bad-step streak not reset by a good step (it would stop at step 4), skipped steps not
    counted."""
    import train as train_mod
    nan_losses_at(monkeypatch, lambda n: n % 2 == 0)
    assert train_mod.train(_cfg(corpus, tmp_path / "run", "--train.max_steps=7", "--train.max_bad_steps=2")) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 3, 5, 7]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3]
    assert [r["tokens"] for r in rows] == [128, 256, 384, 512]


def test_a_skipped_step_on_the_cadence_still_evaluates_and_checkpoints(corpus, tmp_path, monkeypatch):
    """The last step (4, on the checkpoint and eval cadence) is NaN: skipped, but the step
    counts, so its checkpoint is written and `latest` names it (a rerun has nothing left to
    train, instead of resuming at 3 and skipping step 4 forever), and its eval line has the
    val numbers with no training loss. Kills: the skip bypassing the eval/checkpoint block."""
    import train as train_mod
    nan_losses_at(monkeypatch, lambda n: n == 4)
    out = tmp_path / "run"
    args = ("--train.max_steps=4", "--train.eval_every=2", "--train.ckpt_every=2", "--train.log_every=2")
    assert train_mod.train(_cfg(corpus, out, *args)) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 4] and rows[-1]["loss"] is None
    assert math.isfinite(rows[-1]["val_loss"]) and rows[-1]["tokens"] == 3 * 128
    assert train_mod.train(_cfg(corpus, out, *args)) == 0          # resumed at 4: nothing to train
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 4]


def test_resume_restores_the_random_streams_exactly(corpus, tmp_path, monkeypatch, probe):
    """A model whose training forward draws from torch's, numpy's and Python's global RNGs
    (as dropout would): a run that crashes in step 5 (checkpoint at step 3) and is resumed
    equals an uninterrupted run bit for bit (losses, gradient norms, the lrs the optimiser
    applied, tokens, final weights). Kills: the RNG state saved but not restored on resume
    (the streams would restart from the seed)."""
    import random

    import numpy as np

    import model as model_mod
    import train as train_mod
    from checkpoint import load_model
    real_forward = model_mod.LanguageModel.forward
    calls = {"n": 0, "crash_at": None}

    def noisy_forward(self, idx, targets=None, state=None, return_state=True):
        logits, loss, st = real_forward(self, idx, targets, state, return_state)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise RuntimeError("simulated crash")
            loss = loss * (1 + 0.01 * (torch.rand(()) + random.random() + float(np.random.rand())))
        return logits, loss, st

    monkeypatch.setattr(model_mod.LanguageModel, "forward", noisy_forward)
    args = ["--train.max_steps=6", "--train.ckpt_every=3", "--optim.warmup_steps=2"]
    assert train_mod.train(_cfg(corpus, tmp_path / "ref", *args)) == 0
    ref_lrs = probe["lrs"][:]
    calls.update(n=0, crash_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.train(_cfg(corpus, tmp_path / "split", *args))
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    calls.update(crash_at=None)
    del probe["lrs"][:]
    assert train_mod.train(_cfg(corpus, tmp_path / "split", *args)) == 0
    assert probe["lrs"] == ref_lrs[3:]
    ref, split = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "split")
    for key in ("step", "loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in split] == [r[key] for r in ref], key
    a = load_model(str(tmp_path / "ref"))[0].state_dict()
    b = load_model(str(tmp_path / "split"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accum", [[], ["--train.grad_accum=2", "--train.eval_batch_size=4"]])
def test_last_step_off_the_cadence_is_logged_evaluated_and_checkpointed(corpus, tmp_path, accum):
    """max_steps=5 with log/eval/checkpoint every 2 steps: lines for steps 1, 2, 4, 5, evals
    at 2, 4, 5, checkpoints step 2, 4, 5 (keep_checkpoints=0: all), `latest` at 5. The val
    loss logged at step 5 and in final_eval.json is the hand-computed mean cross-entropy of the
    step-5 weights on the first eval_batches (2) x batch 4 windows of 32 tokens of the val
    split (batch_size / grad_accum, or train.eval_batch_size with grad_accum 2), and bits/byte
    is its NLL over those windows' share of the split's bytes. Kills: no checkpoint/eval/log
    line at a max_steps off the cadence, a wrong number or size of eval batches."""
    import torch.nn.functional as F

    import train as train_mod
    from checkpoint import load_model
    from data.loader import TokenDataset
    out = tmp_path / "run"
    cfg = _cfg(corpus, out, "--train.max_steps=5", "--train.log_every=2", "--train.eval_every=2",
               "--train.ckpt_every=2", "--train.keep_checkpoints=0", "--eval.final=true", *accum)
    assert train_mod.train(cfg) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000002", "step_000004", "step_000005"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000005"

    model = load_model(str(out / "checkpoints" / "step_000005"))[0]
    dataset = TokenDataset(corpus)
    tokens = torch.from_numpy(dataset.tokens("val", 0, 8 * 32 + 1).astype("int64"))
    windows = torch.stack([tokens[j * 32:j * 32 + 33] for j in range(8)])
    with torch.no_grad():
        nll = F.cross_entropy(model(windows[:, :-1])[0].flatten(0, 1), windows[:, 1:].flatten(),
                              reduction="sum").item()
    split = dataset.meta["splits"]["val"]
    bpb = nll / math.log(2) / (256 / split["tokens"] * split["bytes"])
    assert rows[-1]["val_loss"] == pytest.approx(nll / 256, rel=1e-5)
    assert rows[-1]["val_bpb"] == pytest.approx(bpb, rel=1e-5)
    final = json.load(open(out / "final_eval.json"))
    assert final["val_loss"] == pytest.approx(nll / 256, rel=1e-5) and final["val_bpb"] == pytest.approx(bpb, rel=1e-5)
    assert final["tokens"] == 5 * 128 and final["skipped_steps"] == 0


def test_final_eval_reuses_the_last_steps_eval(corpus, tmp_path, monkeypatch):
    """The last step's eval (train.eval_every, which always runs at max_steps) scores the same
    weights on the same batches as the final eval: it ran twice, doubling the end-of-run eval
    time for the same numbers. Without an eval at the last step the final eval still runs."""
    import eval.perplexity
    import train as train_mod
    calls = []
    real = eval.perplexity.evaluate_split
    monkeypatch.setattr(eval.perplexity, "evaluate_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=3", "--train.eval_every=2", "--eval.final=true")) == 0
    assert len(calls) == 2          # steps 2 and 3; the final eval is step 3's
    final = json.load(open(out / "final_eval.json"))
    assert final["val_loss"] == read_metrics(out)[-1]["val_loss"]
    calls.clear()
    assert train_mod.train(_cfg(corpus, tmp_path / "run2", "--train.max_steps=2", "--eval.final=true")) == 0
    assert len(calls) == 1          # train.eval_every=0: the final eval alone


def test_schedule_change_note_says_only_what_changes(tmp_path):
    """A resume under another train.max_steps: the note claimed the lr changed from the resumed
    step on even where max_steps changes no step's lr (a warmup, a constant schedule, WSD's
    stable phase). Now it names the first step whose lr differs from the checkpoint's run's,
    and past that run's end the lr the run goes on at (a finished cosine jumps back up)."""
    from config import load_config
    from train import lr_at, schedule_change_note

    def cfg(*args):
        return load_config(None, ["--train.lr=1e-3", "--optim.min_lr_ratio=0.1", f"--train.out_dir={tmp_path}", *args])
    warmup = cfg("--train.max_steps=9", "--optim.warmup_steps=40")
    assert schedule_change_note(warmup, 20, 4) is None          # steps 5-9 keep their warmup lr
    assert schedule_change_note(cfg("--train.max_steps=50", "--optim.schedule=constant"), 100, 10) is None
    wsd = cfg("--train.max_steps=10", "--optim.schedule=wsd", "--optim.warmup_steps=2")
    assert "so from step 10 on the lr is not" in schedule_change_note(wsd, 20, 3)    # steps 4-9: stable in both
    assert schedule_change_note(warmup, 9, 4) is None            # the same max_steps
    cosine = cfg("--train.max_steps=200", "--optim.warmup_steps=10")
    assert schedule_change_note(cosine, 100, 50) == (
        "note: train.max_steps=200, the checkpoint's run had 100: the lr schedule now ends at step 200, so from "
        "step 51 on the lr is not the one the checkpoint's run would have used (step 51: 0.000905, not 0.000628)")
    assert schedule_change_note(cosine, 5, 5) == (     # the warmup is shared: past the run's end
        "note: train.max_steps=200, the checkpoint's run had 5: the lr schedule now ends at step 200; the steps "
        "after 5, its last, go on at lr 0.0006 (step 5 had 0.0005)")
    note = schedule_change_note(cosine, 100, 100)      # a finished cosine: from its floor back up
    assert note.endswith(f"go on at lr {lr_at(100, cosine):.3g} (step 100 had 0.0001)") and lr_at(100, cosine) > 5e-4


def test_save_checkpoint_keeps_the_newest_and_latest_names_one(tmp_path):
    """save_checkpoint's pruning on a toy model: keep=2 over steps 1-4 leaves step 3 and 4 and
    `latest` at 4, and clears a .tmp- folder left by a killed save; re-saving a step replaces
    it; saving an older step than the newest with keep=1 keeps the one just saved (what
    `latest` names) and the later ones (a rollback's abandoned future, replaced when the run
    gets there); keep=0 keeps all; steps past 6 digits sort as numbers. Kills: pruning one too
    many or too few, keep=0 pruning, killed-save leftovers kept, a re-save failing on the
    existing folder, pruning the checkpoint just saved or the one resumed from at a rollback,
    name order past step 999999."""
    from checkpoint import find_checkpoint, read_trainer_state, save_checkpoint, saved_steps
    from config import Config
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000099").mkdir(parents=True)

    def save(step, keep, **extra):
        save_checkpoint(str(root), step, model, opt, {"step": step, **extra}, Config(), keep=keep)

    for step in range(1, 5):
        save(step, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "step_000003", "step_000004"]
    assert find_checkpoint(str(root)) == str(root / "step_000004")
    (root / ".tmp-old-step_000001").mkdir()                 # the aside copy of a killed re-save
    save(4, keep=2, again=True)
    assert sorted(os.listdir(root)) == ["latest", "step_000003", "step_000004"]   # no aside copy left
    assert read_trainer_state(str(root / "step_000004"))["again"] is True
    save(2, keep=1)                  # a rollback to step 2: steps 3 and 4 are its abandoned future,
    assert saved_steps(str(root)) == ["step_000002", "step_000003", "step_000004"]   # not pruned for it
    assert find_checkpoint(str(root)) == str(root / "step_000002")
    save(3, keep=1, rerun=True)      # replaced when the run gets there; step 2 is then pruned
    assert saved_steps(str(root)) == ["step_000003", "step_000004"]
    assert read_trainer_state(str(root / "step_000003"))["rerun"] is True

    root = tmp_path / "all"
    for step in (1, 2, 999_999, 1_000_000):
        save(step, keep=0)
    assert saved_steps(str(root)) == ["step_000001", "step_000002", "step_999999", "step_1000000"]
    save(1_000_001, keep=2)          # step order past 6 digits: the two latest stay
    assert saved_steps(str(root)) == ["step_1000000", "step_1000001"]


def test_a_rollback_sets_the_abandoned_checkpoints_aside(corpus, tmp_path, monkeypatch, capsys):
    """train.resume=PATH of the run's own step 4 (of 2, 4, 6): step 6 becomes
    abandoned-step_000006 (kept) and `latest` names step 4 at once. Before, a crash before
    the rollback's first save resumed the abandoned step 6 under `auto`, and a rollback that
    passed step 6 without saving it (ckpt_every 5) pruned its own step 5 and kept the
    abandoned step 6."""
    import train as train_mod
    from checkpoint import saved_steps
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2",
                                "--train.keep_checkpoints=0")) == 0
    real_save = train_mod.save_checkpoint

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(train_mod, "save_checkpoint", crash)
    rollback = _cfg(corpus, out, "--train.max_steps=10", "--train.ckpt_every=5", "--train.keep_checkpoints=2",
                    f"--train.resume={root / 'step_000004'}{os.sep}", "--train.lr=1e-2")   # a shell's trailing /
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.train(rollback)
    assert ("rollback to step 4: the later checkpoints are kept as abandoned-step_000006, their metrics in "
            f"{out / 'metrics.abandoned.jsonl'}") in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]     # 5: the rollback's, before its crash
    assert [json.loads(line)["step"] for line in open(out / "metrics.abandoned.jsonl")] == [5, 6]
    assert (root / "latest").read_text().strip() == "step_000004"
    assert saved_steps(str(root)) == ["step_000002", "step_000004"] and (root / "abandoned-step_000006").is_dir()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=10", "--train.ckpt_every=5",
                                "--train.keep_checkpoints=2", "--train.lr=1e-2")) == 0
    assert "resumed from " + str(root / "step_000004") in capsys.readouterr().out
    assert saved_steps(str(root)) == ["step_000005", "step_000010"]
    assert (root / "abandoned-step_000006").is_dir()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    # the abandoned branch resumed here would interleave with the live one (metrics, pruning):
    # refused before anything is read; into another out_dir it is an ordinary checkpoint
    abandoned = f"--train.resume={root / 'abandoned-step_000006'}"
    from config import ConfigError
    with pytest.raises(ConfigError, match=r"^train.resume=.*abandoned-step_000006 is a checkpoint this out_dir "
                                          r"abandoned in a rollback; to continue that branch, resume it into another"):
        train_mod.train(_cfg(corpus, out, "--train.max_steps=12", abandoned))
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    other = _cfg(corpus, tmp_path / "branch", "--train.max_steps=12", abandoned)
    assert train_mod.checkpoint_to_resume(other.train) == str(root / "abandoned-step_000006")


def test_a_damaged_latest_checkpoint_names_the_one_before_it(corpus, tmp_path, capsys):
    """resume=auto on a latest checkpoint with a truncated shard: the one-line error says
    which earlier checkpoint the run kept and how to resume it (it said only what was wrong)."""
    import train as train_mod
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = [*TINY, f"--data.dataset={corpus}", "--train.eval_every=0", "--train.ckpt_every=2",
              f"--train.out_dir={out}"]
    assert train_mod.main([*common, "--train.max_steps=4"]) == 0
    (shard,) = [p for p in (root / "step_000004").iterdir() if p.suffix == ".distcp"]
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert train_mod.main([*common, "--train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_000004 is truncated" in err
    assert err.rstrip().endswith(f"; the earlier step_000002 is kept: --train.resume={root / 'step_000002'} resumes it")
    assert train_mod.main([*common, "--train.max_steps=6", f"--train.resume={root / 'step_000002'}"]) == 0


def test_a_checkpoint_that_does_not_fit_gets_no_earlier_checkpoint_hint(corpus, tmp_path, capsys, monkeypatch):
    """A readable checkpoint of another model or optimiser (CheckpointMismatch) or a config
    refusal is not damage: the earlier step would not fit either, so the error names no
    earlier checkpoint to resume (it told a user who changed optim.name to roll back). And a
    model build that fails for a bug, not a size, keeps its traceback."""
    import checkpoint
    import train as train_mod
    from config import ConfigError
    out = tmp_path / "run"
    common = [*TINY, f"--data.dataset={corpus}", "--train.eval_every=0", "--train.ckpt_every=2",
              f"--train.out_dir={out}"]
    assert train_mod.main([*common, "--train.max_steps=4"]) == 0
    for error in (checkpoint.CheckpointMismatch("checkpoint X does not match this model/optimiser: why"),
                  ConfigError("checkpoint X: a config refusal")):
        monkeypatch.setattr(train_mod, "load_training_state", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        capsys.readouterr()
        assert train_mod.main([*common, "--train.max_steps=6"]) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    import model as model_mod                       # train.py imports build_model from it at run time
    monkeypatch.setattr(model_mod, "build_model", lambda cfg: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        train_mod.main([*common, "--train.max_steps=6", f"--train.out_dir={tmp_path / 'other'}"])


def test_starting_over_keeps_the_earlier_results(corpus, tmp_path, capsys):
    """A run without checkpoints (ckpt_every 0) run again starts over: its metrics.jsonl and
    final_eval.json were overwritten without a word; they are now kept as
    metrics.previous.jsonl / final_eval.previous.json (then .previous-2, ...)."""
    import train as train_mod
    out = tmp_path / "run"
    args = ("--train.ckpt_every=0", "--eval.final=true")
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=3", *args)) == 0
    first = (out / "metrics.jsonl").read_text(), (out / "final_eval.json").read_text()
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=1", *args)) == 0
    assert "starting over: the earlier metrics.jsonl is kept as " + str(out / "metrics.previous.jsonl") in \
        capsys.readouterr().out
    assert ((out / "metrics.previous.jsonl").read_text(), (out / "final_eval.previous.json").read_text()) == first
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=2", *args)) == 0
    assert [json.loads(line)["step"] for line in open(out / "metrics.previous-2.jsonl")] == [1]


def test_resume_refuses_a_changed_model_tokenizer_or_seed(corpus, tmp_path, capsys):
    """A change that keeps every shape loaded silently before: n_head 4 -> 2 resumed into
    another model; a new train.seed was recorded but the data stream stayed the checkpoint's.
    Speed settings (model.kernels) and the inner-loop stabilisers may change; so may sections
    the architecture does not read. Nothing is written by a refused resume."""
    import train as train_mod
    from config import ConfigError
    out = tmp_path / "run"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=2", "--train.ckpt_every=2")) == 0
    ckpt = re.escape(str(out / "checkpoints" / "step_000002"))
    before = _snapshot(out)
    for flag, message in [("--model.n_head=4", "model.n_head=2, this run has 4"),
                          ("--model.rope_theta=500000", "model.rope_theta=10000.0, this run has 500000.0"),
                          ("--train.seed=7", "train.seed=1337, this run has 7"),
                          # refused by the data sampler after the model was built, naming no key
                          ("--train.batch_size=2", "train.batch_size=4, this run has 2"),
                          ("--train.seq_len=16", "train.seq_len=32, this run has 16"),
                          ("--data.sampling=shuffled", "data.sampling='random', this run has 'shuffled'"),
                          # its state would not load: a DCP metadata error named the earlier checkpoint
                          # as if this one were damaged
                          ("--optim.name=m3", "optim.name='adamw', this run has 'm3'")]:
        with pytest.raises(ConfigError, match=f"^{ckpt} was trained with {re.escape(message)}: resume with the "
                                              "checkpoint's setting, or start a new train.out_dir$"):
            train_mod.train(_cfg(corpus, out, "--train.max_steps=3", flag))
        assert _snapshot(out) == before
    capsys.readouterr()
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=3", "--model.kernels=torch",
                                "--model.hope.chunk_mem=8", "--model.titans.max_grad_norm=1.0")) == 0
    # a longer run stretches the schedule: said, since the resumed lr is not the first run's
    assert "note: train.max_steps=3, the checkpoint's run had 2: the lr schedule now ends at step 3; the steps after " \
           "2, its last, go on at lr" in capsys.readouterr().out


def test_resume_takes_the_optimiser_settings_of_the_config(tmp_path):
    """Resuming loads the optimiser's state (moments, step) but keeps the settings of the
    optimiser it loads into: set_state_dict brought the saved weight decay, betas and eps
    back, while the resumed run's config.yaml recorded the new ones."""
    from checkpoint import load_training_state, save_checkpoint
    from config import Config
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(str(tmp_path), 1, model, opt, {"step": 1}, Config(), keep=0)
    model.zero_grad()                # as in a fresh process (get_state_dict skips the state template else)
    resumed = torch.optim.AdamW(model.parameters(), weight_decay=0.5, betas=(0.8, 0.9), eps=1e-5)
    load_training_state(path, model, resumed)
    group = resumed.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.5, (0.8, 0.9), 1e-5)
    assert torch.equal(resumed.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


@pytest.mark.parametrize("fails", ["dcp.save", "torch.save", "write_atomic"])
def test_a_failed_save_is_one_line_and_leaves_the_earlier_checkpoints(tmp_path, monkeypatch, fails):
    """A save that fails (a full disk: DCP says "unexpected pos 704 vs 598", torch.save
    errno 28) was a 57-line traceback that left a half-written .tmp- folder. It is one OSError
    naming the checkpoint, the cause and the free space; the folder is removed and `latest`
    still names the last good step."""
    import checkpoint
    from config import Config
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(str(root), 1, model, opt, {"step": 1}, Config())

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") \
            if fails == "dcp.save" else OSError(28, "No space left on device")
    if fails == "write_atomic":      # the `latest` file, after the step folder is in place
        monkeypatch.setattr(checkpoint, "write_atomic", full)
    else:
        monkeypatch.setattr(checkpoint.dcp if fails == "dcp.save" else checkpoint.torch, "save", full)
    with pytest.raises(OSError, match=rf"^could not write checkpoint {re.escape(str(root))}/step_000002 \(.*"
                                      r"(unexpected pos 704 vs 598|No space left on device); [0-9.]+ GiB free there\); "
                                      r"the earlier checkpoints are untouched$"):
        checkpoint.save_checkpoint(str(root), 2, model, opt, {"step": 2}, Config())
    assert sorted(os.listdir(root)) == ["latest", "step_000001"] + (["step_000002"] if fails == "write_atomic" else [])
    assert (root / "latest").read_text().strip() == "step_000001"


@pytest.mark.parametrize("stop", ["KeyboardInterrupt", "Terminated"])
def test_a_stop_during_a_save_is_a_stop_not_a_failed_save(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM while DCP writes arrives wrapped in DCP's CheckpointException: it was
    reported as "could not write checkpoint ... (Terminated; ...)", exit 2. Now the stop itself
    is re-raised (train.main's one line, 130 / 143), the half-written folder removed; the same
    while DCP reads a checkpoint to resume."""
    import checkpoint
    import train as train_mod
    from config import Config
    from torch.distributed.checkpoint.api import CheckpointException
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(str(root), 1, model, opt, {"step": 1}, Config())
    error = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": train_mod.Terminated}[stop]

    def stopped(*args, **kwargs):
        raise CheckpointException("save failed", {0: (error(), None)})
    monkeypatch.setattr(checkpoint.dcp, "save", stopped)
    with pytest.raises(error):
        checkpoint.save_checkpoint(str(root), 2, model, opt, {"step": 2}, Config())
    assert sorted(os.listdir(root)) == ["latest", "step_000001"]
    # and while a resume loads (it was "does not match this model: Terminated", exit 2, with a
    # hint to resume an earlier checkpoint)
    monkeypatch.setattr(checkpoint.dcp, "load", stopped)
    with pytest.raises(error):
        checkpoint.load_training_state(str(root / "step_000001"), model, opt)


def test_throughput_leaves_out_checkpoint_and_eval_time_off_the_log_cadence(corpus, tmp_path, probe,
                                                                           monkeypatch):
    """Checkpoints every 2 steps, each taking 5 s on the fake clock, log lines at 1, 4, 8:
    every step took 1 s for 128 tokens, so every line must say 128 tokens/s. Kills resetting
    t_last after a checkpoint (192 at step 4: steps 2-4's tokens over the 2 s since the step-2
    checkpoint) and counting the checkpoint time in (steps 2-4's 384 tokens over 3 + 5 s)."""
    import train as train_mod
    real_save = train_mod.save_checkpoint

    def slow_save(*args, **kwargs):
        probe["clock"] += 5.0
        return real_save(*args, **kwargs)
    monkeypatch.setattr(train_mod, "save_checkpoint", slow_save)
    assert train_mod.train(_cfg(corpus, tmp_path / "run", "--train.max_steps=8", "--train.log_every=4",
                                "--train.ckpt_every=2", "--train.eval_every=3")) == 0
    rows = [r for r in read_metrics(tmp_path / "run") if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == [1, 4, 8]
    assert [r["tokens_per_s"] for r in rows] == pytest.approx([128.0] * 3, rel=1e-9)


def test_rank_zero_of_two_logs_global_tokens_per_device_rate_and_mfu(corpus, tmp_path, probe, monkeypatch):
    """Rank 0 of a 2-rank data-parallel job, faked in one process (the env of
    distributed.setup with world_size 2, no process group, no wrapper: the collectives are
    no-ops and this rank trains its 2 rows of every global batch of 4), on a GPU whose
    peak is 1e6 FLOP/s, with a clock that advances 1 s per step: every line logs the global
    tokens (128 per step, not this rank's 64), 128 tokens/s in all, 64 per device, and
    mfu = tokens/s per device x model.flops_per_token(seq_len) / peak, and mfu_memory the same
    with memory_flops_per_token (a Titans model: its memory updates are counted apart). Kills:
    tokens counted per rank, tokens/s per device not divided by the rank count, MFU from the
    all-rank rate, mfu_memory from the 6N flops."""
    import distributed
    import train as train_mod
    from model import build_model
    monkeypatch.setattr(train_mod.distributed, "setup", lambda cfg: distributed.DistEnv(world_size=2))
    monkeypatch.setattr(train_mod, "peak_flops", lambda device_type: 1e6)
    cfg = _cfg(corpus, tmp_path / "run", "--train.max_steps=3", "--model.arch=titans")
    assert train_mod.train(cfg) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["tokens"] for r in rows] == [128, 256, 384]
    assert [r["tokens_per_s"] for r in rows] == pytest.approx([128.0] * 3, rel=1e-9)
    assert [r["tokens_per_s_per_device"] for r in rows] == pytest.approx([64.0] * 3, rel=1e-9)
    model = build_model(cfg.model)
    flops, memory_flops = model.flops_per_token(32), model.memory_flops_per_token(32)
    assert flops > 0 and memory_flops > 0 and memory_flops != flops
    assert [r["mfu"] for r in rows] == pytest.approx([64.0 * flops / 1e6] * 3, rel=1e-9)
    assert [r["mfu_memory"] for r in rows] == pytest.approx([64.0 * memory_flops / 1e6] * 3, rel=1e-9)


def test_a_save_that_fails_before_its_rename_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    """save_checkpoint killed (here: an OSError) at the rename of its finished .tmp-step_N
    folder, i.e. after DCP wrote every shard: `latest` still names the previous checkpoint,
    which still loads, and no step_N folder exists; the next save of that step succeeds and
    moves `latest`. Kills: `latest` rewritten before the checkpoint is complete and renamed
    into place (a kill then resumes from a missing or partial checkpoint)."""
    import checkpoint as ckpt_mod
    from checkpoint import find_checkpoint, load_training_state, save_checkpoint, saved_steps
    from config import Config
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    save_checkpoint(str(root), 1, model, opt, {"step": 1}, Config(), keep=2)
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(src)).startswith(".tmp-step_"):
            raise OSError("simulated kill before the rename")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated kill"):
        save_checkpoint(str(root), 2, model, opt, {"step": 2}, Config(), keep=2)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert (root / "latest").read_text().strip() == "step_000001"
    assert saved_steps(str(root)) == ["step_000001"]
    fresh = torch.nn.Linear(3, 2)
    state = load_training_state(find_checkpoint(str(root)), fresh, torch.optim.AdamW(fresh.parameters()))
    assert state["step"] == 1 and torch.equal(fresh.weight, saved_weight)
    save_checkpoint(str(root), 2, model, opt, {"step": 2}, Config(), keep=2)
    assert find_checkpoint(str(root)) == str(root / "step_000002")
    assert sorted(os.listdir(root)) == ["latest", "step_000001", "step_000002"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="maps file descriptors to paths through /proc")
def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """When save_checkpoint renames its .tmp-step_N folder to step_N, every file in it (DCP
    shards and index, trainer_state.pt, config.yaml) and the folder itself have been fsynced,
    so after a power loss `latest` cannot name a checkpoint whose data never reached the disk.
    Kills the fsync of the finished folder left out (renames alone are not durable)."""
    import checkpoint as ckpt_mod
    from checkpoint import save_checkpoint
    from config import Config
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    synced, checked = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        synced.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def checking_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(src)).startswith(".tmp-step_"):
            files = {os.path.realpath(os.path.join(d, f)) for d, _, names in os.walk(src) for f in names}
            assert {"trainer_state.pt", "config.yaml", ".metadata"} <= {os.path.basename(f) for f in files}
            assert files | {os.path.realpath(src)} <= synced, sorted(files - synced)
            checked.append(os.path.basename(str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.os, "fsync", spy_fsync)
    monkeypatch.setattr(ckpt_mod.os, "replace", checking_replace)
    save_checkpoint(str(tmp_path / "checkpoints"), 1, model, opt, {"step": 1}, Config(), keep=2)
    assert checked == ["step_000001"]


def test_the_eval_split_check_needs_exactly_one_window(corpus):
    """check_eval_split (run before step 1) accepts a val split of seq_len + 1 tokens, the one
    window an eval scores, and refuses one of seq_len tokens, which would otherwise fail the
    first eval after training. Kills the bound off by one (`n < seq_len`)."""
    import train as train_mod
    from config import ConfigError, load_config
    from data.loader import TokenDataset
    dataset = TokenDataset(corpus)
    n = dataset.num_tokens("val")
    fits = load_config(None, [*TINY, f"--train.seq_len={n - 1}", "--train.eval_every=10"])
    train_mod.check_eval_split(fits, dataset, corpus)
    short = load_config(None, [*TINY, f"--train.seq_len={n}", "--train.eval_every=10"])
    with pytest.raises(ConfigError, match=rf"has {n} tokens, fewer than train.seq_len \+ 1 = {n + 1}"):
        train_mod.check_eval_split(short, dataset, corpus)


def test_a_rollback_killed_before_its_metrics_rewrite_loses_no_records(corpus, tmp_path, monkeypatch):
    """A kill after the rollback set the later checkpoints aside but before metrics.jsonl is
    cut: `latest` already names the rollback's step, so the next auto resume continues the
    rollback with every step logged once, and the abandoned run's records are in
    metrics.abandoned.jsonl. Before, metrics.jsonl was cut first: a kill then resumed the
    abandoned step 6 with the records of steps 5-6 gone for good."""
    import train as train_mod
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2")) == 0
    first = read_metrics(out)

    def killed(self):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train_mod.MetricsLog, "start", killed)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2",
                                 f"--train.resume={root / 'step_000004'}"))
    assert (root / "latest").read_text().strip() == "step_000004" and read_metrics(out) == first
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line) for line in open(out / "metrics.abandoned.jsonl")] == first[4:]


def test_a_failed_metrics_rewrite_is_one_line_and_keeps_the_file(corpus, tmp_path, monkeypatch, capsys):
    """Resuming rewrites metrics.jsonl atomically: a full disk is one line naming the file and
    leaves every record (before, open(path, 'w') had emptied it first)."""
    import train as train_mod
    out = tmp_path / "run"
    common = [*TINY, f"--data.dataset={corpus}", "--train.eval_every=0", "--train.ckpt_every=2",
              f"--train.out_dir={out}"]
    assert train_mod.main([*common, "--train.max_steps=3", "--train.log_every=1"]) == 0
    before = (out / "metrics.jsonl").read_text()

    def full_disk(path, content):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_mod, "write_atomic", full_disk)
    capsys.readouterr()
    assert train_mod.main([*common, "--train.max_steps=4", "--train.log_every=1"]) == 2
    assert capsys.readouterr().err == f"error: cannot write {out / 'metrics.jsonl'}: No space left on device\n"
    assert (out / "metrics.jsonl").read_text() == before


def test_a_second_run_on_a_busy_out_dir_is_refused(corpus, tmp_path, capsys):
    """One run per out_dir: while another process holds <out_dir>/.lock, train.py stops in
    one line naming its pid, before writing anything; once it has ended, the run proceeds.
    Before, two runs deleted each other's checkpoint in progress and interleaved metrics."""
    import subprocess
    import sys
    import train as train_mod
    done = tmp_path / "done"                      # a checkpoint the busy out_dir will hold
    assert train_mod.main([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={done}", "--train.max_steps=2"]) == 0
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write('node7:4242'); f.flush(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        args = [*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out}", "--train.max_steps=2"]
        assert train_mod.main(args) == 2
        assert capsys.readouterr().err == (f"error: train.out_dir {out} is in use by another run (node7:4242): wait "
                                           "for it to end or choose another train.out_dir\n")
        assert sorted(os.listdir(out)) == [".lock"]
        # with the other run's checkpoint there: refused before reading it (not "resumed from")
        shutil.copytree(done / "checkpoints", out / "checkpoints")
        assert train_mod.main(args) == 2
        printed = capsys.readouterr()
        assert "in use by another run" in printed.err and "resumed from" not in printed.out
    finally:
        holder.kill()
        holder.wait()
    assert train_mod.main([*args, "--train.max_steps=4"]) == 0
    assert (out / ".lock").read_text() == f"{socket.gethostname()}:{os.getpid()}\n"


def test_sigterm_is_one_line_and_the_run_resumes(corpus, tmp_path):
    """Walkthrough: SIGTERM (SLURM preemption, scancel) ended train.py silently with 143. Now
    one line, exit 143, as Ctrl-C's 130; the checkpoints saved so far resume."""
    import signal
    import time
    out = tmp_path / "run"
    args = [*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out}", "--train.max_steps=100000",
            "--train.ckpt_every=2", "--train.eval_every=0", "--eval.final=false", "--train.log_every=1"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert err.startswith("terminated (SIGTERM): checkpoints are written atomically, so train.resume=auto continues "
                          f"from the last one ({out / 'checkpoints' / 'step_'}") and err.count("\n") == 1
    r = run_train([*args[:-4], "--train.max_steps=" + str(read_metrics(out)[-1]["step"] + 1), "--train.eval_every=0",
                   "--eval.final=false"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr


def test_interrupt_and_unlockable_out_dir(corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C is one line (exit 130), no traceback. A filesystem without locks (flock raising
    ENOSYS, as on Lustre mounted without flock) runs unlocked rather than calling the out_dir
    busy."""
    import errno
    import fcntl
    import train as train_mod

    def interrupted(cfg):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train_mod, "train", interrupted)
        assert train_mod.main([*TINY, f"--train.out_dir={tmp_path / 'a'}", "--train.ckpt_every=5"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.count("\n") == 1
    # it said the rerun continues from the last checkpoint also where none had been saved
    assert err == ("interrupted: no checkpoint of this run was saved yet (train.ckpt_every=5): the same command "
                   "starts it again\n")

    def no_locks(f, how):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert train_mod.main([*TINY, f"--data.dataset={corpus}", f"--train.out_dir={tmp_path / 'b'}",
                           "--train.max_steps=1"]) == 0
    assert f"note: train.out_dir {tmp_path / 'b'} cannot be locked (Function not implemented)" in capsys.readouterr().out


def test_no_checkpoint_of_non_finite_weights(corpus, tmp_path, monkeypatch, capsys):
    """Weights that turn NaN (here after step 3) are never checkpointed: the save at step 4 is
    skipped with a line naming the parameter, so keep_checkpoints=1 does not prune step 2, the
    last good one, which the stop message then truthfully names. Before, step 4's NaN weights
    were saved and step 2 pruned."""
    import train as train_mod
    real_make_optimizer = train_mod.make_optimizer

    def poisoning_optimizer(model, cfg, device_type):
        opt = real_make_optimizer(model, cfg, device_type)
        real_step, calls = opt.step, {"n": 0}

        def step(*a, **kw):
            out = real_step(*a, **kw)
            calls["n"] += 1
            if calls["n"] == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            return out
        opt.step = step
        return opt
    monkeypatch.setattr(train_mod, "make_optimizer", poisoning_optimizer)
    out = tmp_path / "run"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=8", "--train.ckpt_every=2",
                                "--train.keep_checkpoints=1", "--train.max_bad_steps=3")) == 1
    err = capsys.readouterr().err
    assert "step 4: no checkpoint: the weights hold a NaN or inf (" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000002"]


def test_a_latest_naming_a_missing_step_names_the_one_before_it(corpus, tmp_path, capsys):
    """`latest` names a step folder that is gone: the one-line error also names the earlier
    checkpoint the run kept (it did for a damaged step, not for a missing one)."""
    import train as train_mod
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = [*TINY, f"--data.dataset={corpus}", "--train.eval_every=0", "--train.ckpt_every=2",
              f"--train.out_dir={out}"]
    assert train_mod.main([*common, "--train.max_steps=4"]) == 0
    shutil.rmtree(root / "step_000004")
    capsys.readouterr()
    assert train_mod.main([*common, "--train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_000004" in err
    assert err.rstrip().endswith(f"the earlier step_000002 is kept: --train.resume={root / 'step_000002'} resumes it")


def test_a_read_only_out_dir_is_not_called_uncreatable(tmp_path, monkeypatch):
    """An existing folder without write permission 'cannot be written in'; a missing one
    under it 'cannot be created' (the tests run as root, so os.access says no here)."""
    import cli
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    assert cli.output_dir_problem(str(tmp_path / "ro")) == \
        f"cannot be written in: no write permission in {tmp_path / 'ro'}"
    assert cli.output_dir_problem(str(tmp_path / "ro" / "x")) == \
        f"cannot be created: no write permission in {tmp_path / 'ro'}"


def test_a_rollback_killed_after_setting_checkpoints_aside_keeps_the_abandoned_records(corpus, tmp_path, monkeypatch):
    """The rollback's order: the abandoned run's records are copied aside before `latest`
    moves, so a kill right after the checkpoints were set aside (the next auto resume then
    cuts metrics.jsonl back to the rollback's step) loses none of them. Kills swapping the
    two steps."""
    import train as train_mod
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2")) == 0
    first = read_metrics(out)
    real_set_aside = train_mod.set_aside_later_steps

    def set_aside_then_killed(*a, **kw):
        real_set_aside(*a, **kw)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train_mod, "set_aside_later_steps", set_aside_then_killed)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2",
                                 f"--train.resume={root / 'step_000004'}"))
    assert [json.loads(line) for line in open(out / "metrics.abandoned.jsonl")] == first[4:]
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_an_explicit_resume_of_the_latest_step_is_not_a_rollback(corpus, tmp_path, capsys):
    """--train.resume=<out_dir> names its latest step: nothing later to set aside, so it
    resumes as auto does (a killed run's record past the step is dropped, to be logged
    again), without a rollback message or an abandoned-metrics file."""
    import train as train_mod
    out = tmp_path / "run"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=4", "--train.ckpt_every=2")) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    capsys.readouterr()
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=6", "--train.ckpt_every=2",
                                f"--train.resume={out}")) == 0
    assert "rollback" not in capsys.readouterr().out and not (out / "metrics.abandoned.jsonl").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_no_checkpoint_before_the_first_optimiser_step(corpus, tmp_path, monkeypatch, capsys):
    """Step 1 is NaN (skipped) with ckpt_every=1: no checkpoint at step 1, whose optimiser has
    no state yet (DCP's get_state_dict would make one up: a zero step, so a resume's Adam
    step counters would run one ahead of the uninterrupted run's); step 2 is saved."""
    import train as train_mod
    nan_losses_at(monkeypatch, lambda n: n == 1)
    out = tmp_path / "run"
    assert train_mod.train(_cfg(corpus, out, "--train.max_steps=2", "--train.ckpt_every=1")) == 0
    assert "step 1: no checkpoint before the first optimiser step" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000002"]


def test_end_of_training_sample_prints_no_substituted_eot_and_survives_nan_logits(monkeypatch):
    """train.py's sample after training: an empty train.sample_prompt starts after the
    end-of-text token, which is not text (GPT-2 printed "<|endoftext|>" first); a model whose
    logits went non-finite gets "(none: ...)" rather than failing the finished run (generate
    raises on them now)."""
    from contextlib import nullcontext

    import train as train_mod
    from config import TrainConfig
    from data.tokenizer import get_tokenizer
    from model import build_model
    tok = get_tokenizer("bytes")
    m = build_model({"vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "d_model": 32})
    t = TrainConfig(sample_prompt="", sample_tokens=4, seed=3)
    text = train_mod.sample_after_training(m, tok, t, "cpu", nullcontext())
    again = m.generate(torch.tensor([[tok.eot_id]]), 4, temperature=0.8, top_k=50,
                       generator=torch.Generator().manual_seed(3), vocab_size=tok.vocab_size)
    assert text == tok.decode(again[0, 1:].tolist())
    assert tok.encode_prompt("") == ([tok.eot_id], 1) and tok.encode_prompt("ab") == ([97, 98], 0)
    monkeypatch.setattr(m.head, "forward", lambda x: torch.full((*x.shape[:-1], tok.vocab_size), float("nan")))
    assert train_mod.sample_after_training(m, tok, t, "cpu", nullcontext()).startswith(
        "(none: the model's logits are not finite (NaN or inf) at new token 1 of 4")


def test_peak_flops_is_the_named_gpus(monkeypatch):
    """The MFU's peak is that of the GPU the run uses (`cuda:1`: that GPU's name, not the
    current device's, cuda:0 unless set); None off CUDA. Kills get_device_name() without it."""
    import train as train_mod
    names = {"cuda:0": "Tesla T4", "cuda:1": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[str(device or "cuda:0")])
    assert train_mod.peak_flops("cuda:1") == train_mod.PEAK_FLOPS["H100"]
    assert train_mod.peak_flops("cuda:0") is None and train_mod.peak_flops("cpu") is None
