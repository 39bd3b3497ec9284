"""End-to-end training on a tiny byte-level corpus: loss falls, exact resume after SIGKILL,
NaN steps are skipped, metrics/config files are written."""
import json
import os
import signal
import subprocess
import sys
import time

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


def test_nan_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch, capsys):
    import model as model_mod
    import train as train_mod
    from config import load_config
    real_forward = model_mod.LanguageModel.forward
    calls = {"n": 0}

    def flaky_forward(self, idx, targets=None, state=None):
        logits, loss, st = real_forward(self, idx, targets, state)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] in (3, 4) or calls["n"] >= 8:          # two isolated bad steps, then forever
                loss = loss * float("nan")
        return logits, loss, st

    monkeypatch.setattr(model_mod.LanguageModel, "forward", flaky_forward)
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
    r = run_train([*TINY, "--data.dataset=files:/nonexistent/*.txt", f"--train.out_dir={tmp_path}/y",
                   f"--data.data_dir={tmp_path}/y-data"])
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("optimizer", ["muon", "delta_momentum"])
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
    assert ("kernels: Titans memory x2: per-chunk path (backend 'auto' on cpu runs the chunked "
            "PyTorch path)") in capsys.readouterr().out.splitlines()


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

    def snapshot():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    def fails(args, message):
        before = snapshot()
        assert train_mod.main([*common, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
        assert snapshot() == before

    fails([f"--train.out_dir={out}", "--train.resume=never"], "already holds checkpoints (step_000002)")
    fails([f"--train.out_dir={out}", "--model.d_model=64"], "does not match")
    fails([f"--train.out_dir={out}", "--train.max_steps=1"], "at step 2, past train.max_steps=1")
    fails([f"--train.out_dir={out / 'metrics.jsonl'}"], "is a file, not a folder")
    fails(["--train.out_dir="], "train.out_dir must name a folder")
    fails([f"--train.out_dir={tmp_path / 'long'}", "--train.seq_len=100000"], "fewer than train.seq_len + 1")
    (out / "checkpoints" / "latest").unlink()
    fails([f"--train.out_dir={out}"], f"--train.resume={out / 'checkpoints' / 'step_000002'}")
    assert not (tmp_path / "long").exists()


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
    MetricsLog(str(path), resume_step=2)
    assert path.read_text() == "".join(rows[:2])
    bad = rows[0] + "not json\n" + rows[1]
    path.write_text(bad)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record .*fix or remove it"):
        MetricsLog(str(path), resume_step=2)
    assert path.read_text() == bad
