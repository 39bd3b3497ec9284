"""torchrun on CPU (gloo, 2 ranks): FSDP2 and DDP reproduce the 1-process losses on the
same global batch, a SIGKILLed 2-rank run resumes exactly, a 2-rank checkpoint resumes on
1 rank, and a sharded checkpoint exports to one safetensors file with the same logits.

Every architecture that `build_model` can build is tested (the in-context memory updates
stay on under FSDP2): the list grows by itself as architectures land in model.py.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from helpers import assert_torchrun_finished, save_tiny_checkpoint

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.d_model=32", "--data.tokenizer=bytes",
        "--train.batch_size=4", "--train.grad_accum=2", "--train.seq_len=32", "--train.lr=3e-3",
        "--optim.warmup_steps=3", "--train.max_steps=8", "--train.log_every=1", "--train.eval_every=4",
        "--train.eval_batches=2", "--train.ckpt_every=4", "--train.keep_checkpoints=3",
        "--train.sample_tokens=0", "--eval.final=false", "--logging.wandb=disabled"]
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
ONE_PROCESS = [sys.executable, "train.py"]
RTOL = 1e-4


def _builds(arch):
    from model import build_model
    try:
        build_model({"arch": arch, "vocab_size": 16, "n_layer": 1, "n_head": 2, "d_model": 32})
        return True
    except NotImplementedError:
        return False


ARCHS = [pytest.param(arch, marks=pytest.mark.skipif(not _builds(arch), reason=f"{arch} not in model.py yet"))
         for arch in ("transformer", "titans", "hope", "hope_attention")]


def _env():
    return dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run(launcher, args):
    r = subprocess.run([*launcher, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    # the success line (rank 0 prints it after the last step): a finished run, also where gloo
    # then aborts at exit (helpers.GLOO_EXIT_ABORT)
    assert_torchrun_finished(r, ["training done"])
    assert r.stdout.count("training done") == 1, r.stdout[-3000:]
    return r


def test_finished_run_check_tolerates_only_the_exit_abort():
    """assert_torchrun_finished: exit 0 with the success lines passes, and so does gloo's abort
    at exit after them (helpers.GLOO_EXIT_ABORT); a missing line or any other failure does not."""
    from subprocess import CompletedProcess
    from helpers import GLOO_EXIT_ABORT
    done = "training done\n"
    assert_torchrun_finished(CompletedProcess([], 0, done, ""), ["training done"])
    assert_torchrun_finished(CompletedProcess([], 1, done, GLOO_EXIT_ABORT + "\n"), ["training done"])
    for bad in (CompletedProcess([], 0, "", ""), CompletedProcess([], 1, "", GLOO_EXIT_ABORT),
                CompletedProcess([], 1, done, "Traceback: RuntimeError")):
        with pytest.raises(AssertionError):
            assert_torchrun_finished(bad, ["training done"])


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_losses(rows, ref, exact=False):
    """Same steps, losses and pre-clip gradient norms (under FSDP2 the norm of the sharded
    gradients, summed over ranks: a rank's own shards alone would be ~1/sqrt(2) of it)."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for key in ("loss", "val_loss", "grad_norm"):
        got = [r[key] for r in rows if key in r]
        want = [r[key] for r in ref if key in r]
        assert len(got) == len(want)
        if exact:
            assert got == want, key
        else:
            assert got == pytest.approx(want, rel=RTOL), key


def _children(pid):
    """Process ids whose parent is `pid` (torchrun starts each worker in its own session)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def run_and_kill(launcher, args, kill_at_line):
    """Start a job and SIGKILL all its processes at once (like a lost node) when it prints
    a line starting with `kill_at_line`."""
    proc = subprocess.Popen([*launcher, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith(kill_at_line):
                break
        else:
            raise AssertionError(f"the job ended before printing {kill_at_line!r}")
        workers = _children(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", params=ARCHS)
def runs(request, corpus, tmp_path_factory):
    """Per architecture: a 1-process run, and a 2-rank FSDP2 run (activation checkpointing
    on, 2 micro-batches per step) on the same global batches that is SIGKILLed after step 7
    (its last checkpoint: step 4) and resumed."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"runs-{arch}")
    common = [*TINY, f"--model.arch={arch}", f"--data.dataset={corpus}"]
    one, two = str(root / "one"), str(root / "two")
    run(ONE_PROCESS, [*common, f"--train.out_dir={one}"])
    two_args = [*common, f"--train.out_dir={two}", "--distributed.activation_checkpointing=true"]
    run_and_kill(TWO_RANKS, two_args, "step 7/")
    before_kill = metrics(two)
    with open(os.path.join(two, "checkpoints", "latest")) as f:
        latest_at_kill = f.read().strip()
    resumed = run(TWO_RANKS, two_args)
    return {"arch": arch, "common": common, "root": root, "one": one, "two": two, "before_kill": before_kill,
            "latest_at_kill": latest_at_kill, "resumed_stdout": resumed.stdout}


@pytest.mark.slow
def test_two_ranks_fsdp_match_one_process(runs):
    assert "parallel: fsdp on 2 rank(s)" in runs["resumed_stdout"]
    ref, rows = metrics(runs["one"]), metrics(runs["two"])
    assert len(rows) == 8                    # >= 6 steps, one line each: rank 0 alone writes
    assert_same_losses(rows, ref)
    assert_same_losses(runs["before_kill"], ref[:len(runs["before_kill"])])
    assert rows[-1]["loss"] < rows[0]["loss"]
    for r in rows:
        assert r["tokens"] == r["step"] * 4 * 32                  # the global batch, not one rank's
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
        assert r["peak_mem_gib"] > 0


def test_two_ranks_sigkill_and_resume_is_exact(runs):
    assert runs["latest_at_kill"] == "step_000004"
    assert "resumed from" in runs["resumed_stdout"] and "step_000004" in runs["resumed_stdout"]
    before, after = runs["before_kill"], metrics(runs["two"])
    assert [x["step"] for x in before][:6] == list(range(1, 7))
    assert [x["step"] for x in after] == list(range(1, 9))
    # steps 5-6 (7) ran before the kill and again after the resume from step 4: bit-identical
    assert_same_losses(after[:len(before)], before, exact=True)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    out = str(runs["root"] / "one-from-two")
    ckpt = os.path.join(runs["two"], "checkpoints", "step_000004")
    r = run(ONE_PROCESS, [*runs["common"], f"--train.out_dir={out}", f"--train.resume={ckpt}"])
    assert f"resumed from {ckpt} at step 4" in r.stdout
    rows = metrics(out)
    assert [x["step"] for x in rows] == [5, 6, 7, 8]
    assert_same_losses(rows, metrics(runs["two"])[4:])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    """Resharding the other way (a requeue on more GPUs): the 1-process run's checkpoint at
    step 4, whole tensors, loads into 2 FSDP2 ranks' shards of the weights and the AdamW
    moments, and steps 5-8 give the 1-process run's losses."""
    out = str(runs["root"] / "two-from-one")
    ckpt = os.path.join(runs["one"], "checkpoints", "step_000004")
    r = run(TWO_RANKS, [*runs["common"], f"--train.out_dir={out}", f"--train.resume={ckpt}"])
    assert f"resumed from {ckpt} at step 4" in r.stdout and "parallel: fsdp on 2 rank(s)" in r.stdout
    rows = metrics(out)
    assert [x["step"] for x in rows] == [5, 6, 7, 8]
    assert_same_losses(rows, metrics(runs["one"])[4:])


def test_export_safetensors_of_sharded_checkpoint(runs):
    from safetensors import safe_open
    from safetensors.torch import load_model as load_safetensors_into

    from checkpoint import export_safetensors, load_exported, load_model
    from model import build_model
    ckpt = os.path.join(runs["two"], "checkpoints", "step_000008")
    path = str(runs["root"] / "export" / "model.safetensors")
    assert export_safetensors(ckpt, path) == path
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "8" and meta["arch"] == runs["arch"]
    model = build_model(json.loads(meta["config"])["model"])
    load_safetensors_into(model, path)
    reference, _ = load_model(ckpt)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(idx)[0]
        assert torch.equal(model.eval()(idx)[0], want)
        assert torch.equal(load_exported(path)[0](idx)[0], want)
        assert torch.equal(load_model(path)[0](idx)[0], want)       # what sample.py and the evals call


# ----------------------------------------------------------------------------------------
# what reads an exported file: load_model (so sample.py and every eval), not a resume or export


@pytest.fixture
def exported(tmp_path):
    """A tiny 1-process checkpoint (out_dir) and its export -> (out_dir, file)."""
    import checkpoint
    run_dir = save_tiny_checkpoint(tmp_path / "run")
    path = str(tmp_path / "model.safetensors")
    checkpoint.export_safetensors(run_dir, path)
    return run_dir, path


def _one_line_error(err, *parts):
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, err


def test_load_model_reads_an_exported_file_as_its_checkpoint(exported):
    from checkpoint import load_model
    from config import to_dict
    run_dir, path = exported
    model, cfg = load_model(path)
    reference, want_cfg = load_model(run_dir)
    assert to_dict(cfg) == to_dict(want_cfg) and not model.training
    assert cfg.train.seq_len == 256 and cfg.data.tokenizer == "bytes"     # what the evals read
    idx = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], reference(idx)[0])


def test_sample_and_the_eval_loader_run_on_an_exported_file(exported, capsys):
    import sample
    from data.tokenizer import ByteTokenizer
    from eval.common import load_checkpoint
    _, path = exported
    assert sample.main(["--checkpoint", path, "--tokens", "3", "--device", "cpu", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("--- sample 0\n")
    model, cfg, tokenizer, device = load_checkpoint(path, "cpu")
    assert isinstance(tokenizer, ByteTokenizer) and str(device) == "cpu" and cfg.train.seq_len == 256


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_export_file_mode_follows_the_umask(tmp_path, umask, mode):
    """safetensors creates its file 0600; the export is 0666 & ~umask like every other output."""
    from checkpoint import export_safetensors
    run_dir = save_tiny_checkpoint(tmp_path / "run")
    previous = os.umask(umask)
    try:
        path = export_safetensors(run_dir, str(tmp_path / "model.safetensors"))
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == mode


def test_a_safetensors_file_not_ours_is_one_line(tmp_path, capsys):
    import sample
    from safetensors.torch import save_file

    from checkpoint import load_model
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="has no config in its metadata: not written by"):
        load_model(foreign)
    assert sample.main(["--checkpoint", foreign, "--device", "cpu"]) == 2
    _one_line_error(capsys.readouterr().err, foreign, "has no config in its metadata")
    save_file({"weight": torch.zeros(3)}, foreign, metadata={"config": "[1, 2]"})
    with pytest.raises(ValueError, match="config in its metadata that is a list, not a mapping"):
        load_model(foreign)
    text = str(tmp_path / "notes.txt")
    with open(text, "w") as f:
        f.write("not a model\n")
    assert sample.main(["--checkpoint", text, "--device", "cpu"]) == 2
    _one_line_error(capsys.readouterr().err, text, "is not a readable safetensors file")


def test_what_needs_training_state_refuses_an_exported_file(exported, capsys):
    """Another export or a resume needs the trainer state (and a resume the optimiser): one
    line saying the file holds neither, not "no checkpoint found" for a file that exists."""
    import checkpoint
    _, path = exported
    with pytest.raises(ValueError, match=r"is a file, not a checkpoint directory \(an exported"):
        checkpoint.resolve_checkpoint(path)         # train.py's train.resume=PATH goes through it
    latest = os.path.join(os.path.dirname(path), "latest")      # a file, but no export
    with open(latest, "w") as f:
        f.write("step_000001\n")
    with pytest.raises(ValueError, match=r"latest is a file, not a checkpoint directory: pass a step_N directory"):
        checkpoint.resolve_checkpoint(latest)
    assert checkpoint.main(["export", path, path.replace("model", "again")]) == 2
    _one_line_error(capsys.readouterr().err, path, "without the optimiser and trainer state")


@pytest.mark.slow
def test_two_ranks_ddp_match_one_process(runs):
    if runs["arch"] != "transformer":
        pytest.skip("checked once on the transformer (HOPE: test_two_ranks_ddp_with_parameters_no_gradient_reaches)")
    out = str(runs["root"] / "ddp")
    r = run(TWO_RANKS, [*runs["common"], f"--train.out_dir={out}", "--distributed.data_parallel=ddp"])
    assert "parallel: ddp on 2 rank(s)" in r.stdout
    assert_same_losses(metrics(out), metrics(runs["one"]))


@pytest.mark.slow
def test_two_ranks_ddp_with_parameters_no_gradient_reaches(corpus, tmp_path):
    """HOPE whose CMS fast level's chunk (32) is not shorter than seq_len (32): its W_v gets no
    gradient (LanguageModel.idle_parameters), which DDP must be told of (else it stops at
    step 2: "Expected to have finished reduction in the prior iteration"); the losses match
    one process, and start-up names the parameters."""
    args = [*TINY, "--model.arch=hope", "--model.cms.chunk_sizes=[32,null]", f"--data.dataset={corpus}",
            "--train.max_steps=3", "--train.eval_every=0", "--train.ckpt_every=0"]
    r = run(TWO_RANKS, [*args, f"--train.out_dir={tmp_path}/ddp", "--distributed.data_parallel=ddp"])
    assert "note: 2 parameter(s) get no gradient at train.seq_len=32" in r.stdout
    assert "blocks.0.ffn.levels.0.w_target.weight" in r.stdout
    run(ONE_PROCESS, [*args, f"--train.out_dir={tmp_path}/one"])
    assert_same_losses(metrics(f"{tmp_path}/ddp"), metrics(f"{tmp_path}/one"))


def test_fsdp_on_one_device_without_torchrun(corpus, tmp_path):
    """distributed.data_parallel=fsdp in a plain process (1-GPU FSDP throughput checks)."""
    import torch.distributed as dist

    import train
    from config import load_config
    args = [*TINY, f"--data.dataset={corpus}", "--train.max_steps=3", "--train.eval_every=0", "--train.ckpt_every=0"]
    assert train.train(load_config(None, [*args, f"--train.out_dir={tmp_path}/plain"])) == 0
    assert train.train(load_config(None, [*args, f"--train.out_dir={tmp_path}/fsdp",
                                          "--distributed.data_parallel=fsdp"])) == 0
    assert not dist.is_initialized()                      # its 1-rank process group is gone again
    assert_same_losses(metrics(f"{tmp_path}/fsdp"), metrics(f"{tmp_path}/plain"))


@pytest.mark.parametrize("precision", [["--train.dtype=bfloat16"], ["--distributed.mixed_precision=bf16"]])
def test_fsdp_bf16_parameters_keep_the_streaming_fast_weights_fp32(precision, corpus, tmp_path, monkeypatch):
    """Under FSDP2 with bf16 parameters the end-of-run sample streams HOPE token by token with
    its state: the fast weights in it stay fp32 (FSDP2 would cast every forward input, the
    state included, to bf16; the read then met fp32 inputs: "expected m1 and m2 to have the
    same dtype"), also where only distributed.mixed_precision asks for bf16 (autocast on)."""
    import memory
    import train
    from config import load_config
    seen, real_read = set(), memory.NeuralMemory.read

    def read(self, weights, x):
        seen.update(w.dtype for w in weights)
        return real_read(self, weights, x)
    monkeypatch.setattr(memory.NeuralMemory, "read", read)
    args = [*TINY, "--model.arch=hope", f"--data.dataset={corpus}", "--train.max_steps=1", "--train.eval_every=0",
            "--train.ckpt_every=0", "--train.sample_tokens=3", "--distributed.data_parallel=fsdp", *precision]
    assert train.train(load_config(None, [*args, f"--train.out_dir={tmp_path}/run"])) == 0
    assert seen == {torch.float32}


def test_global_batch_not_divisible_by_ranks(monkeypatch):
    import distributed
    from config import ConfigError, load_config
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    cfg = load_config(None, ["--train.batch_size=6", "--train.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"^train.batch_size=6 is the global batch: it must be divisible by "
                                          r"2 ranks x train.grad_accum=2$"):
        distributed.setup(cfg)


@pytest.mark.parametrize("rank, local_rank, world_size", [("0", "0", "0"), ("2", "0", "2"), ("-1", "0", "2"),
                                                         ("0", "-1", "1")])
def test_rank_environment_out_of_range_is_named(monkeypatch, rank, local_rank, world_size):
    """WORLD_SIZE=0 was a ZeroDivisionError; RANK >= WORLD_SIZE a rendezvous waiting for ranks."""
    import distributed
    from config import ConfigError, load_config
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^environment variables RANK={rank}, LOCAL_RANK={local_rank}, "
                                          rf"WORLD_SIZE={world_size} need 0 <= RANK < WORLD_SIZE"):
        distributed.setup(load_config(None, []))


def _two_ranks_failing(args):
    r = subprocess.run([*TWO_RANKS, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    return r.stdout + r.stderr


@pytest.mark.slow
def test_two_ranks_rank0_data_error_is_one_line_per_rank(tmp_path):
    """Rank 0 alone prepares the data: its one-line error left rank 1 in the barrier, which
    died with a gloo 'Connection closed by peer' traceback printed above the real error."""
    out = _two_ranks_failing([*TINY, f"--data.dataset=files:{tmp_path}/none/*.txt", f"--train.out_dir={tmp_path}/o"])
    assert "[rank1]: Traceback" not in out and "[rank0]: Traceback" not in out, out[-3000:]
    assert out.count(f"error: files: glob '{tmp_path}/none/*.txt' matches no files\n") == 2, out[-3000:]


@pytest.mark.slow
def test_two_ranks_rank0_metrics_error_on_resume_is_one_line_per_rank(corpus, tmp_path):
    """Rank 0 alone rewrites metrics.jsonl on resume: a damaged line stopped it with one line
    while rank 1 went on into the first collective and died with a traceback."""
    out_dir = tmp_path / "run"
    args = [*TINY, f"--data.dataset={corpus}", f"--train.out_dir={out_dir}", "--train.eval_every=0"]
    run(ONE_PROCESS, [*args, "--train.max_steps=2", "--train.ckpt_every=1"])
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    (out_dir / "metrics.jsonl").write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    out = _two_ranks_failing([*args, "--train.max_steps=4"])
    assert "[rank1]: Traceback" not in out and "[rank0]: Traceback" not in out, out[-3000:]
    assert out.count(f"error: {out_dir / 'metrics.jsonl'} line 1 is not a metrics record") == 2, out[-3000:]


def test_export_cli_errors(tmp_path, capsys):
    import checkpoint
    assert checkpoint.main(["export", str(tmp_path / "missing"), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint found at") and len(err.strip().splitlines()) == 1
    assert checkpoint.main(["export", str(tmp_path), str(tmp_path / "m.bin")]) == 2
    assert capsys.readouterr().err.strip() == f"error: output file {tmp_path / 'm.bin'} must end in .safetensors"
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["export", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: the following arguments are required")


# ----------------------------------------------------------------------------------------
# evals over ranks (perplexity, bits per byte, the rows of each batch), and the parallelism
# switches that the losses alone do not show (FSDP2 parameter dtype, activation checkpointing)


def test_two_ranks_report_the_same_perplexity_and_bits_per_byte(runs):
    """The 2-rank evals (evaluate_split with rank / world_size, all-reduced) log the val
    perplexity and bits per byte of the 1-process evals, not only the same loss. Kills: a
    rank's sums not reduced, or reduced twice."""
    ref, rows = metrics(runs["one"]), metrics(runs["two"])
    for key in ("val_ppl", "val_bpb"):
        want = [r[key] for r in ref if key in r]
        assert len(want) == 2 and [r[key] for r in rows if key in r] == pytest.approx(want, rel=RTOL), key


def test_evaluate_split_ranks_split_the_rows_of_every_batch(corpus):
    """The whole val split (its last batch a single tail row) in batches of 3 rows, scored as
    rank 0 and rank 1 of 2 one after the other (no process group: each returns its own part):
    rank 0 scores rows 0-1 of each batch, rank 1 row 2 (nothing of the tail batch), and
    together they score every val token once, with the total NLL of one process. Kills:
    overlapping or missing row slices, the unscored forward of a rank without rows counted."""
    from config import ModelConfig
    from data.loader import TokenDataset
    from eval.perplexity import evaluate_split
    from model import build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", vocab_size=257, n_layer=1, n_head=2, d_model=32)).eval()
    dataset = TokenDataset(corpus)
    n = dataset.num_tokens("val")
    rows, tail = (n - 1) // 256, (n - 1) % 256
    assert tail > 0                                        # the last batch is one short row
    sizes = [min(3, rows - first) for first in range(0, rows, 3)]          # rows per full-window batch
    parts = [evaluate_split(model, dataset, "val", batch_size=3, seq_len=256, device="cpu", rank=r, world_size=2)
             for r in (0, 1)]
    assert [p["tokens"] for p in parts] == [sum(min(k, 2) for k in sizes) * 256 + tail,
                                            sum(max(k - 2, 0) for k in sizes) * 256]
    want = evaluate_split(model, dataset, "val", batch_size=3, seq_len=256, device="cpu")
    assert want["tokens"] == n - 1
    nll = sum(p["loss"] * p["tokens"] for p in parts)
    assert nll == pytest.approx(want["loss"] * want["tokens"], rel=1e-6)


@pytest.mark.parametrize("choice, dtype, device_type, want", [
    ("auto", "auto", "cuda", torch.bfloat16), ("auto", "auto", "cpu", torch.float32),
    ("auto", "bfloat16", "cpu", torch.bfloat16), ("auto", "float32", "cuda", torch.float32),
    ("bf16", "float32", "cpu", torch.bfloat16), ("fp32", "auto", "cuda", torch.float32)])
def test_fsdp_param_dtype_follows_the_compute_dtype(choice, dtype, device_type, want):
    """distributed.mixed_precision: auto gathers FSDP2 parameters in bf16 exactly when the run
    computes in bf16 (train.dtype bfloat16, or auto on CUDA); bf16/fp32 force it. Needs no
    GPU: only the choice is checked. Kills: auto always fp32 (bf16 runs gathering fp32
    weights: twice the all-gather traffic), a forced choice ignored."""
    from config import load_config
    from distributed import DistEnv, mixed_precision_dtype
    cfg = load_config(None, [f"--distributed.mixed_precision={choice}", f"--train.dtype={dtype}"])
    assert mixed_precision_dtype(cfg, DistEnv(device_type=device_type)) == want


def test_activation_checkpointing_recomputes_each_block_in_backward():
    """distributed.activation_checkpointing=true: each block's forward runs again during
    backward (its activations were not kept), parameter names are unchanged, and the gradients
    equal those without it. Kills: activation checkpointing switched on but not applied."""
    from config import load_config
    from distributed import DistEnv, parallelize
    from model import build_model
    grads, calls = {}, {}
    for ac in (False, True):
        cfg = load_config(None, ["--model.n_layer=2", "--model.n_head=2", "--model.d_model=32",
                                 "--model.vocab_size=257", f"--distributed.activation_checkpointing={str(ac).lower()}"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        names = [n for n, _ in model.named_parameters()]
        calls[ac] = 0
        for block in model.blocks:
            inner = block.forward

            def counted(*args, _inner=inner, **kwargs):
                calls[ac] += 1
                return _inner(*args, **kwargs)
            block.forward = counted
        model = parallelize(model, cfg, DistEnv())
        assert [n for n, _ in model.named_parameters()] == names
        idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
        model(idx, idx)[1].backward()
        grads[ac] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == {False: 2, True: 4}
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-6, atol=1e-7)


def test_an_exported_config_is_checked_and_fitted_to_the_device_as_a_checkpoints(exported, monkeypatch):
    """load_exported treats the config in the file as load_model treats a checkpoint's: a GPU
    run's model.kernels=triton becomes auto where Triton cannot run (it failed at the first
    forward), and a vocabulary smaller than its tokenizer's is a one-line error."""
    import json

    import checkpoint
    import kernels.checks
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    _, path = exported
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)

    def export_with(**model):
        config = json.loads(metadata["config"])
        config["model"].update(model)
        changed = path.replace("model", "changed")
        save_file(tensors, changed, metadata={**metadata, "config": json.dumps(config)})
        return changed
    monkeypatch.setattr(kernels.checks, "cpu_tensors_allowed", lambda: False)      # no interpreter
    assert checkpoint.load_model(export_with(kernels="triton"), "cpu")[1].model.kernels == "auto"
    with pytest.raises(ValueError, match=r"changed.safetensors: config in its metadata: .*vocab"):
        checkpoint.load_model(export_with(vocab_size=100), "cpu")


def test_an_export_keeps_the_checkpoints_config_as_saved(tmp_path, monkeypatch):
    """The export runs on a CPU, where load_model fits a GPU run's config to the device
    (model.kernels=triton and attention=flash become auto): the file's metadata held that
    fitted copy, so the export evaluated on a GPU without the fused kernels it was trained
    with. It holds the checkpoint's config.yaml as saved; loading it on CPU still fits it."""
    import yaml

    import checkpoint
    import kernels.checks
    from config import to_dict
    run_dir = save_tiny_checkpoint(tmp_path / "run")
    path = os.path.join(run_dir, "checkpoints", "step_000000", "config.yaml")
    with open(path) as f:
        data = yaml.safe_load(f)
    data["model"].update(kernels="triton", attention="flash")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    monkeypatch.setattr(kernels.checks, "cpu_tensors_allowed", lambda: False)      # no interpreter
    out = checkpoint.export_safetensors(run_dir, str(tmp_path / "model.safetensors"))
    saved = json.loads(checkpoint.export_metadata(out)["config"])
    assert saved == to_dict(checkpoint.load_config_of(os.path.dirname(path)))
    assert (saved["model"]["kernels"], saved["model"]["attention"]) == ("triton", "flash")
    model_cfg = checkpoint.load_model(out, "cpu")[1].model
    assert (model_cfg.kernels, model_cfg.attention) == ("auto", "auto")
