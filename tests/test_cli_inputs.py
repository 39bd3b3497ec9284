"""Bad input to checkpoint.py (resume, load, `python -m checkpoint export`) and sample.py: one
line "error: ..." naming what is wrong, exit status 2, no traceback, and nothing lost (no file
written or left behind, the model untouched when a check fails before loading); and cli.py,
which every entry point builds on: its parser, flag types, output-path checks and atomic write.
(bench/ CLIs: tests/test_bench.py; eval CLIs: tests/test_eval_common.py and each eval's tests.)"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO

STEP = os.path.join("checkpoints", "step_000002")


def _tiny_model():
    from config import ModelConfig
    from model import build_model
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="transformer", vocab_size=257, d_model=32, n_layer=1, n_head=2))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A training out_dir as train.py leaves it: a 1-layer byte Transformer after one AdamW
    step (so the optimiser has state), saved at step 2 with train.py's trainer-state keys."""
    import train
    from checkpoint import RESUME_KEYS, save_checkpoint
    from config import Config, DataConfig, ModelConfig
    out = tmp_path_factory.mktemp("cli_inputs") / "run"
    cfg = Config(model=ModelConfig(arch="transformer", vocab_size=257, d_model=32, n_layer=1, n_head=2),
                 data=DataConfig(tokenizer="bytes"))
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 257, (1, 9)))[0].float().square().mean().backward()
    opt.step()
    state = {"step": 2, "stats": {"skipped_steps": 0, "tokens": 16}, "sampler": {"step": 2, "seed": 0},
             "rng": train.rng_state()}
    assert set(state) == set(RESUME_KEYS)
    save_checkpoint(os.path.join(str(out), "checkpoints"), 2, model, opt, state, cfg)
    return str(out)


@pytest.fixture
def run(saved_run, tmp_path):
    """A fresh copy of saved_run to damage."""
    return shutil.copytree(saved_run, str(tmp_path / "run"))


def _shard(run):
    (name,) = [n for n in os.listdir(os.path.join(run, STEP)) if n.endswith(".distcp")]
    return os.path.join(run, STEP, name)


def _truncate(path, keep_fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep_fraction))


def test_a_triton_kernels_checkpoint_evaluates_where_triton_cannot_run(run, monkeypatch):
    """model.kernels is a speed setting: a checkpoint trained with model.kernels=triton (on a
    GPU) loads for evaluation on CPU without Triton's interpreter with kernels "auto", instead
    of failing at its first forward; under the interpreter it keeps "triton"."""
    import yaml

    from checkpoint import load_model
    path = os.path.join(run, STEP, "config.yaml")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["kernels"] = "triton"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, loaded = load_model(run)
    assert loaded.model.kernels == "auto" and model(torch.randint(0, 257, (1, 5)))[0].shape == (1, 5, 257)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert load_model(run)[1].model.kernels == "triton"


def _edit_trainer_state(run, edit):
    path = os.path.join(run, STEP, "trainer_state.pt")
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)
    return path


def _fresh():
    model = _tiny_model()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _export(argv, capsys):
    """`python -m checkpoint export ...` in process -> (exit status, stderr)."""
    import checkpoint
    code = checkpoint.main(["export", *argv])
    return code, capsys.readouterr().err


def _one_line(err, *parts):
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ----------------------------------------------------------------------------------------
# checkpoint.py: damaged checkpoints

def test_a_good_checkpoint_resumes_and_exports(run, tmp_path, capsys):
    from checkpoint import RESUME_KEYS, load_training_state
    model, opt = _fresh()
    state = load_training_state(os.path.join(run, STEP), model, opt, required=RESUME_KEYS)
    assert state["step"] == 2 and state["stats"]["tokens"] == 16
    code, err = _export([run, str(tmp_path / "m.safetensors")], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "run"]        # no *.tmp-PID left
    first = (tmp_path / "m.safetensors").read_bytes()        # exported again: the earlier file is kept
    import checkpoint
    assert checkpoint.main(["export", run, str(tmp_path / "m.safetensors"), "--dtype", "bf16"]) == 0
    assert f"the earlier {tmp_path / 'm.safetensors'} is kept as {tmp_path / 'm.previous.safetensors'}" in \
        capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["m.previous.safetensors", "m.safetensors", "run"]
    assert (tmp_path / "m.previous.safetensors").read_bytes() == first != (tmp_path / "m.safetensors").read_bytes()


def test_truncated_trainer_state_is_one_line_and_touches_nothing(run, tmp_path, capsys):
    from checkpoint import load_training_state
    path = os.path.join(run, STEP, "trainer_state.pt")
    _truncate(path)
    model, opt = _fresh()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="trainer_state.pt is truncated or corrupt") as e:
        load_training_state(os.path.join(run, STEP), model, opt)
    assert path in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state                                            # nothing loaded
    code, err = _export([run, str(tmp_path / "m.safetensors")], capsys)
    assert code == 2
    _one_line(err, path, "truncated or corrupt")
    assert not os.path.exists(tmp_path / "m.safetensors")


@pytest.mark.parametrize("key", ["stats", "sampler", "rng"])
def test_trainer_state_without_a_resume_key_names_it(run, key, capsys):
    """required=RESUME_KEYS (train.py's call): a missing key is named before anything is
    loaded."""
    from checkpoint import RESUME_KEYS, load_training_state
    path = _edit_trainer_state(run, lambda s: s.pop(key))
    model, opt = _fresh()
    with pytest.raises(ValueError, match=f"{path} has no '{key}'"):
        load_training_state(os.path.join(run, STEP), model, opt, required=RESUME_KEYS)
    assert load_training_state(os.path.join(run, STEP), model, opt)["step"] == 2   # export's check


@pytest.mark.parametrize("key, value, message", [
    ("rng", {"torch": 1}, "a damaged 'rng' entry: expected a dict with python, numpy, torch, got dict with torch"),
    ("sampler", {"x": 1}, "a damaged 'sampler' entry: expected a dict with step, seed, got dict with x"),
    ("stats", None, "a damaged 'stats' entry: expected a dict with skipped_steps, tokens, got NoneType")])
def test_trainer_state_with_a_damaged_resume_entry_names_it(run, key, value, message):
    """The keys present but their contents wrong were a KeyError / TypeError traceback on
    resume, after the model had loaded (and, for stats, after a step and open_outputs)."""
    from checkpoint import RESUME_KEYS, load_training_state
    path = _edit_trainer_state(run, lambda s: s.update({key: value}))
    model, opt = _fresh()
    with pytest.raises(ValueError, match=f"^{path} has {re.escape(message)}$"):
        load_training_state(os.path.join(run, STEP), model, opt, required=RESUME_KEYS)
    assert not opt.state                                            # nothing loaded


def test_trainer_state_without_step_or_not_a_dict(run, tmp_path, capsys):
    from checkpoint import load_training_state
    path = _edit_trainer_state(run, lambda s: s.pop("step"))
    model, opt = _fresh()
    with pytest.raises(ValueError, match=f"{path} has no 'step'"):
        load_training_state(os.path.join(run, STEP), model, opt)
    code, err = _export([run, str(tmp_path / "m.safetensors")], capsys)
    assert code == 2
    _one_line(err, path, "has no 'step'")
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="holds a list, not a trainer state dict"):
        load_training_state(os.path.join(run, STEP), model, opt)


@pytest.mark.parametrize("step", ["2", 2.5, None, -1, True])
def test_trainer_state_with_a_step_that_is_not_a_count(run, step, tmp_path, capsys):
    """A step of another type was a TypeError (resume) or went into the export; a negative
    one resumed and trained from it."""
    from checkpoint import RESUME_KEYS, load_training_state
    path = _edit_trainer_state(run, lambda s: s.update(step=step))
    model, opt = _fresh()
    with pytest.raises(ValueError, match=f"^{path} has step {step!r}, not an integer >= 0$"):
        load_training_state(os.path.join(run, STEP), model, opt, required=RESUME_KEYS)
    code, err = _export([run, str(tmp_path / "m.safetensors")], capsys)
    assert code == 2
    _one_line(err, path, "not an integer >= 0")
    assert os.listdir(tmp_path) == ["run"]


def test_truncated_shard_is_named_not_a_mismatch(run, tmp_path, capsys):
    from checkpoint import load_model, load_training_state
    shard = _shard(run)
    _truncate(shard)
    model, opt = _fresh()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="is truncated: its shard") as e:
        load_training_state(os.path.join(run, STEP), model, opt)
    assert shard in str(e.value) and "does not match" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=f"is truncated: its shard {shard} has"):
        load_model(run)
    code, err = _export([run, str(tmp_path / "m.safetensors")], capsys)
    assert code == 2
    _one_line(err, shard, "truncated")
    assert os.listdir(tmp_path) == ["run"]


def test_missing_and_corrupt_shards(run):
    from checkpoint import load_training_state
    shard = _shard(run)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:                    # same length, garbage inside every tensor
        for offset in range(0, size, 1000):
            f.seek(offset)
            f.write(b"\xff" * 40)
    model, opt = _fresh()
    with pytest.raises(ValueError, match="has a corrupt shard") as e:
        load_training_state(os.path.join(run, STEP), model, opt)
    assert "\n" not in str(e.value) and "does not match" not in str(e.value)
    from checkpoint import _is_read_error        # flipped bytes in a pickled shard entry's text
    assert _is_read_error(UnicodeDecodeError("utf-8", b"\x8a", 0, 1, "invalid start byte"))
    os.remove(shard)
    with pytest.raises(ValueError, match=f"is incomplete: its shard {shard} is missing"):
        load_training_state(os.path.join(run, STEP), model, opt)


def test_a_checkpoint_of_another_model_still_says_does_not_match(run):
    from checkpoint import load_training_state
    from config import ModelConfig
    from model import build_model
    model = build_model(ModelConfig(arch="transformer", vocab_size=257, d_model=64, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="does not match this model/optimiser: .*[Ss]ize mismatch"):
        load_training_state(os.path.join(run, STEP), model, torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("content", ["", "../elsewhere\n", b"\xff\xfe\x00"])
def test_a_bad_latest_file_is_one_line(run, content):
    from checkpoint import resolve_checkpoint
    latest = os.path.join(run, "checkpoints", "latest")
    with open(latest, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=f"{latest} (does not name a checkpoint directory|is unreadable)") as e:
        resolve_checkpoint(run)
    assert "\n" not in str(e.value)


def test_a_bad_config_yaml_names_the_file(run):
    from checkpoint import load_model
    from config import ConfigError
    path = os.path.join(run, STEP, "config.yaml")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("d_model: 32", "d_model: -1"))
    with pytest.raises(ConfigError, match=f"^{path}: .*d_model"):
        load_model(run)


# ----------------------------------------------------------------------------------------
# python -m checkpoint export: the output path

def test_export_to_a_directory_fails_first_and_leaves_nothing(run, tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, err = _export([run, str(target)], capsys)
    assert code == 2
    _one_line(err, str(target), "is a folder")
    assert _files(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_export_below_a_file_fails_first(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _export([run, str(tmp_path / "afile" / "sub" / "m.safetensors")], capsys)
    assert code == 2
    _one_line(err, "afile is not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_export_that_fails_at_its_rename_leaves_the_earlier_file_in_place(run, tmp_path, monkeypatch, capsys):
    """The earlier export is kept as m.previous.safetensors by a link, not moved: when the new
    file's rename fails (a full disk at the last moment, a kill), m.safetensors still holds
    the earlier export. Kills moving it aside before the rename."""
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old export")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_replace)
    code, err = _export([run, str(out)], capsys)
    assert code == 2
    assert out.read_bytes() == b"old export" == (tmp_path / "m.previous.safetensors").read_bytes()


def test_export_write_failure_removes_the_temporary_file(run, tmp_path, monkeypatch, capsys):
    """Disk full (or any OSError) while writing: one line, no *.tmp-PID and no output file;
    a file already at the output path is kept as it was."""
    import safetensors.torch
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old export")

    def half_written(model, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_model", half_written)
    code, err = _export([run, str(out)], capsys)
    assert code == 2
    _one_line(err, f"cannot write {out}: No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "run"]
    assert out.read_bytes() == b"old export"


def test_export_to_a_file_name_too_long_is_one_line(run, tmp_path, capsys):
    """safetensors reports its own write errors as SafetensorError, not OSError: it was a traceback."""
    out = tmp_path / ("m" * 300 + ".safetensors")
    code, err = _export([run, str(out)], capsys)
    assert code == 2
    _one_line(err, f"cannot write {out}: ", "File name too long")
    assert os.listdir(tmp_path) == ["run"]


def test_load_exported_of_a_truncated_file_is_one_line(run, tmp_path, capsys):
    from checkpoint import load_exported
    out = str(tmp_path / "m.safetensors")
    assert _export([run, out], capsys)[0] == 0
    _truncate(out, 0.6)
    with pytest.raises(ValueError, match="m.safetensors (is not a readable safetensors file|does not load)") as e:
        load_exported(out)
    assert "\n" not in str(e.value)


def test_export_cli_prints_no_traceback(run, tmp_path):
    """The real command line, once: a truncated trainer state and a directory as output."""
    _truncate(os.path.join(run, STEP, "trainer_state.pt"))
    r = subprocess.run([sys.executable, "-m", "checkpoint", "export", run, str(tmp_path / "m.safetensors")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    _one_line(r.stderr, "trainer_state.pt is truncated or corrupt")
    assert os.listdir(tmp_path) == ["run"]


# ----------------------------------------------------------------------------------------
# sample.py

BAD_SAMPLE_FLAGS = [
    (["--top-k", "-3"], "argument --top-k: must be >= 0, got -3"),
    (["--top-k", "two"], "argument --top-k: expected an integer >= 0, got 'two'"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
    (["--temperature", "inf"], "argument --temperature: expected a finite number, got 'inf'"),
    (["--temperature", "-0.5"], "argument --temperature: must be >= 0, got -0.5"),
    (["--temperature", "hot"], "argument --temperature: expected a number, got 'hot'"),
    (["--temperature", "1e-45"], "argument --temperature: must be 0 (greedy) or >= 1e-06, got 1e-45"),
    (["--prompt", "\udcff"], "argument --prompt: is not UTF-8 text, got '\\udcff'"),
    (["--tokens", "-1"], "argument --tokens: must be >= 0, got -1"),
    (["--tokens", "1.5"], "argument --tokens: expected an integer >= 0, got '1.5'"),
    (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
    (["--seed", str(2**64)], f"argument --seed: must be < 4294967296, got {2**64}"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
]


@pytest.mark.parametrize("argv, message", BAD_SAMPLE_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_sample_bad_flags_are_one_line(argv, message, capsys):
    """Before any checkpoint is read (the path does not exist): exit 2, one line, no usage."""
    import sample
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", "/nonexistent", *argv])
    assert e.value.code == 2
    _one_line(capsys.readouterr().err, message)


def test_sample_without_checkpoint_flag_is_one_line(capsys):
    import sample
    with pytest.raises(SystemExit) as e:
        sample.main([])
    assert e.value.code == 2
    _one_line(capsys.readouterr().err, "the following arguments are required: --checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_sample_device_cuda_without_cuda_is_one_line(saved_run, capsys):
    import sample
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", saved_run, "--device", "cuda"])
    assert e.value.code == 2
    _one_line(capsys.readouterr().err, "argument --device: cuda is not available")


def test_sample_top_k_0_samples_from_the_whole_vocabulary(saved_run, capsys):
    import sample
    assert sample.main(["--checkpoint", saved_run, "--top-k", "0", "--tokens", "3", "--device", "cpu",
                        "--prompt", "ab"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- sample 0\nab")


def test_sample_or_eval_of_a_config_whose_tokenizer_outgrows_the_model_is_one_line(run, capsys):
    """config.yaml edited to a tokenizer with more ids than the embedding has rows: the prompt's
    ids were an IndexError traceback inside the model (config.validate now names it, before
    the GPT-2 files or the weights load)."""
    import sample
    from config import ConfigError
    from eval.common import load_checkpoint
    path = os.path.join(run, STEP, "config.yaml")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("tokenizer: bytes", "tokenizer: gpt2"))
    message = f"{path}: model.vocab_size=257 is smaller than the gpt2 tokenizer's 50257"
    assert sample.main(["--checkpoint", run, "--tokens", "2", "--device", "cpu", "--prompt", "hello"]) == 2
    _one_line(capsys.readouterr().err, message)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(run, "cpu")
    assert str(e.value) == message


def test_sample_of_a_damaged_checkpoint_is_one_line(run, capsys):
    import sample
    shard = _shard(run)
    _truncate(shard)
    assert sample.main(["--checkpoint", run, "--tokens", "2", "--device", "cpu"]) == 2
    _one_line(capsys.readouterr().err, shard, "truncated")
    assert sample.main(["--checkpoint", os.path.join(run, "nothing"), "--device", "cpu"]) == 2
    _one_line(capsys.readouterr().err, "no checkpoint found at")


# ----------------------------------------------------------------------------------------
# cli.py

def _parser():
    from cli import (OneLineArgumentParser, fraction_list, non_negative_float, non_negative_int, open_fraction,
                     positive_float, positive_int)
    parser = OneLineArgumentParser(prog="python -m eval.x")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("go")
    p.add_argument("--max-len", type=positive_int)
    p.add_argument("--distractors", type=non_negative_int, default=4)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--val-fraction", type=open_fraction, default=0.01)
    p.add_argument("--depths", type=fraction_list, default="0,1")
    p.add_argument("--overflow", choices=("truncate", "skip"), default="truncate")
    p.add_argument("--out", required=True)
    return parser


@pytest.mark.parametrize("argv, message", [
    (["go", "--out", "o", "--max-len", "0"], "argument --max-len: must be >= 1, got 0"),
    (["go", "--out", "o", "--max-len", "-5"], "argument --max-len: must be >= 1, got -5"),
    (["go", "--out", "o", "--max-len", "4k"], "argument --max-len: expected an integer >= 1, got '4k'"),
    (["go", "--out", "o", "--distractors", "-1"], "argument --distractors: must be >= 0, got -1"),
    (["go", "--out", "o", "--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["go", "--out", "o", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["go", "--out", "o", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["go", "--out", "o", "--weight-decay", "-0.1"], "argument --weight-decay: must be >= 0, got -0.1"),
    (["go", "--out", "o", "--val-fraction", "1"], "argument --val-fraction: must lie in (0, 1), got 1"),
    (["go", "--out", "o", "--val-fraction", "inf"], "argument --val-fraction: expected a finite number, got 'inf'"),
    (["go", "--out", "o", "--depths", "x"], "argument --depths: expected numbers in [0, 1], got 'x'"),
    (["go", "--out", "o", "--depths", "0,1.5"], "argument --depths: expected numbers in [0, 1], got '1.5'"),
    (["go", "--out", "o", "--depths", ","], "argument --depths: expected a comma list"),
    (["go", "--out", "o", "--overflow", "drop"], "argument --overflow: invalid choice: 'drop'"),
    (["go"], "the following arguments are required: --out"),
    (["go", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: command"),
])
def test_parser_errors_are_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage" not in err
    _one_line(err, message)


def test_parser_values_and_help(capsys):
    args = _parser().parse_args(["go", "--out", "o", "--max-len", "8", "--depths", "0.5, 1", "--lr", "3e-4",
                                 "--val-fraction", "0.5"])
    assert (args.max_len, args.depths, args.lr, args.distractors, args.val_fraction) == (8, [0.5, 1.0], 3e-4, 4, 0.5)
    assert _parser().parse_args(["go", "--out", "o"]).depths == [0.0, 1.0]      # a string default is parsed
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["go", "--help"])
    assert exit_info.value.code == 0 and "usage: python -m eval.x go" in capsys.readouterr().out


def test_output_paths_are_checked_not_made(tmp_path):
    from cli import check_output_dir, check_output_file, output_dir_problem, output_file_problem
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert output_dir_problem(str(tmp_path)) is None and output_dir_problem(str(tmp_path / "new" / "deeper")) is None
    assert output_file_problem(str(tmp_path / "new" / "r.json")) is None
    assert output_file_problem(str(a_file)) is None                            # a results file may be replaced
    assert not (tmp_path / "new").exists()                                    # checked, not made
    assert output_dir_problem(str(a_file)) == "is a file, not a folder; give a folder"
    assert output_file_problem(str(tmp_path)) == "is a folder; give a file name"
    for problem in (output_dir_problem(str(a_file / "sub")), output_file_problem(str(a_file / "sub" / "r.json"))):
        assert problem == f"cannot be created: {a_file} is not a folder"
    assert check_output_dir(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=r"^--results-root .*a_file/sub cannot be created: .*a_file is not a folder$"):
        check_output_dir(str(a_file / "sub"), "--results-root")
    with pytest.raises(ValueError, match=r"^--out .* is a folder; give a file name$"):
        check_output_file(str(tmp_path))
    assert a_file.read_text() == "keep me"
    # an empty --out passed every check, and eval.continual / eval.mini_repro lost the whole run
    # at os.makedirs('') after it
    with pytest.raises(ValueError, match=r"^--out '' is empty; give a folder$"):
        check_output_dir("")
    with pytest.raises(ValueError, match=r"^--out '' is empty; give a file name$"):
        check_output_file("")


def test_no_output_file_inside_a_checkpoint(tmp_path):
    """eval.perplexity --out .../step_N/trainer_state.pt (or checkpoints/latest) replaced the
    checkpoint's file and exited 0; every output-file flag now refuses a checkpoint folder."""
    import checkpoint
    import cli
    from cli import output_file_problem
    assert (cli.TRAINER_STATE, cli.LATEST) == (checkpoint.TRAINER_STATE, checkpoint.LATEST)
    for marker, beside in (("trainer_state.pt", None), (".metadata", "__0_0.distcp"), ("latest", "step_000002")):
        folder = tmp_path / marker.strip(".")
        folder.mkdir()
        (folder / marker).write_text("keep me")
        assert output_file_problem(str(folder / "results.json")) is None or beside is None   # a lone `latest` is no checkpoint
        if beside:
            (folder / beside).mkdir()
        for name in (marker, "results.json", os.path.join("sub", "r.json")):    # a subfolder of it too
            assert output_file_problem(str(folder / name)) == "is inside a checkpoint folder; write it elsewhere"
        assert (folder / marker).read_text() == "keep me"
    # every parent is asked: a `latest` beside notes is no checkpoints/ root, and a parent that
    # may be passed through but not listed (mode 711: PermissionError) is no checkpoint either
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "latest").write_text("x")
    (notes / "step_notes.md").write_text("x")
    assert cli.enclosing_checkpoint(str(notes / "sub" / "out")) is None
    real_listdir = os.listdir

    def unlistable(path):
        if os.path.abspath(path) == str(notes):
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)
    (notes / "step_000001").mkdir()
    assert cli.enclosing_checkpoint(str(notes / "sub")) == str(notes)
    import unittest.mock
    with unittest.mock.patch("os.listdir", unlistable):
        assert cli.enclosing_checkpoint(str(notes / "sub")) is None
        assert output_file_problem(str(notes / "sub" / "x.json")) is None


@pytest.mark.parametrize("argv, message", [
    (["-m", "eval.babi"], "error: eval.babi has no command line"),
    (["-m", "eval.lm_eval_adapter"], "error: eval.lm_eval_adapter has no command line"),
    (["-m", "data.prepare", "--source", "builtin", "--out", ""], "error: argument --out: is empty; give a folder")])
def test_commands_that_did_nothing_say_so(argv, message):
    """python -m eval.babi / eval.lm_eval_adapter exited 0 having done nothing; data.prepare
    --out '' named the folder '.'."""
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


def test_a_list_flag_naming_an_item_twice_is_refused():
    """--tasks qa1,qa1 (or qa1,1, or --lengths 300,0300) ran the same cell twice."""
    from eval import babilong, continual
    for call, message in [(lambda: babilong.parse_list("qa1,1", "tasks"), "--tasks names 'qa1' twice"),
                          (lambda: babilong.parse_list("1k,01k", "lengths"), "--lengths names '1k' twice (as '01k')"),
                          (lambda: continual._parse_arms("icl,icl"), "--arms names 'icl' twice")]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()
    assert babilong.parse_list("qa1,qa2", "tasks") == ["qa1", "qa2"]


def test_write_atomic_makes_folders_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import cli
    out = tmp_path / "new" / "r.json"
    assert cli.write_atomic(str(out), "first") == str(out) and out.read_text() == "first"

    def write(path):
        with open(path, "w") as f:
            f.write("second")
    cli.write_atomic(str(out), write)
    assert out.read_text() == "second"

    def no_space(*paths):
        if paths[0].endswith(f".tmp-{os.getpid()}"):
            with open(paths[0], "w") as f:
                f.write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        cli.write_atomic(str(out), no_space)                  # the write fails
    monkeypatch.setattr(cli.os, "replace", no_space)
    with pytest.raises(OSError):
        cli.write_atomic(str(out), "third")                   # the rename fails
    assert out.read_text() == "second" and os.listdir(out.parent) == ["r.json"]   # no *.tmp-PID left


# every --seed: [0, 2**32), train.seed's range (numpy's); outside it they failed late naming no
# flag ("Overflow when unpacking long long"), mini_repro's only in the train.py it started
SEED_CLIS = [
    ("sample", ["--checkpoint", "/nonexistent"]),
    ("data.prepare", ["--source", "builtin", "--out", "/nonexistent/out"]),
    ("eval.niah", ["--checkpoint", "/nonexistent", "--out", "/nonexistent/out"]),
    ("eval.babilong", ["eval", "--checkpoint", "/nonexistent", "--out", "/nonexistent/out.json"]),
    ("eval.continual", ["domains", "--checkpoint", "/nonexistent", "--out", "/nonexistent/out"]),
]


@pytest.mark.parametrize("seed, message", [("-1", "must be >= 0, got -1"),
                                           (str(2**32), "must be < 4294967296, got 4294967296"),
                                           (str(10**20), f"must be < 4294967296, got {10**20}")])
@pytest.mark.parametrize("module, argv", SEED_CLIS, ids=[m for m, _ in SEED_CLIS])
def test_every_seed_flag_takes_train_seeds_range(module, argv, seed, message, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([*argv, "--seed", seed])
    assert e.value.code == 2
    _one_line(capsys.readouterr().err, f"argument --seed: {message}")


def test_mini_repro_seeds_take_train_seeds_range(capsys):
    from eval import mini_repro
    for seeds in ("0,-1", f"0,{2**32}"):
        with pytest.raises(SystemExit) as e:
            mini_repro.parse_args(["--seeds", seeds])
        assert e.value.code == 2
        _one_line(capsys.readouterr().err, f"--seeds '{seeds}': expected a comma list of integers in [0, 4294967296)")


def test_an_unreachable_hub_is_one_line_at_once(monkeypatch, tmp_path, capsys):
    """Without network a Hub load retried for ~30 s and printed ten 'Retrying in 8s' lines
    before its error: cli.hub_unreachable asks huggingface.co (3 s) first, and data.prepare,
    eval.perplexity and eval.babilong's Hub loaders stop in one line. HF_HUB_OFFLINE (the
    local cache) and a proxy skip the check; local files (hf:json) never ask."""
    import socket

    import cli
    from data.prepare import main as prepare_main
    from eval import babilong, perplexity
    asked = []

    def no_network(address, timeout=None):
        asked.append(address)
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                 "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    why = ("huggingface.co cannot be reached (Name or service not known); with the data in the local Hugging Face "
           "cache, set HF_HUB_OFFLINE=1")
    assert cli.hub_unreachable() == why and asked == [("huggingface.co", 443)]
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--source", "hf:wikitext:wikitext-2-raw-v1", "--out", str(tmp_path / "d")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: could not load HF dataset 'wikitext' (config 'wikitext-2-raw-v1', split 'train'): {why}\n")
    pytest.importorskip("datasets")
    with pytest.raises(ConnectionError, match=r"^cannot load EleutherAI/lambada_openai .*: huggingface.co cannot be "
                                              r"reached .*; offline, pass the file's path instead of 'hf'$"):
        perplexity._hf_column(("EleutherAI/lambada_openai", "default", "test"), "text")
    with pytest.raises(ConnectionError, match=r"huggingface.co cannot be reached \(Name or service not known\); a "
                                              r"streamed load needs the network; offline, use --source local$"):
        babilong.load_babilong_hf("qa1", "0k", limit=1)       # streamed: no cache to fall back on
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert cli.hub_unreachable().startswith("mirror.example cannot be reached") and asked[-1] == ("mirror.example", 8080)
    count = len(asked)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert cli.hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):    # the libraries' offline modes
        monkeypatch.setenv(offline, "1")
        assert cli.hub_unreachable() is None and len(asked) == count
        monkeypatch.delenv(offline)


def test_abbreviated_flags_are_refused(capsys):
    """Walkthrough: argparse's prefix matching read `eval.reproduce nl_table2 --ru` as --run and
    started the plan, `sample.py --dtyp` as --dtype. OneLineArgumentParser takes no
    abbreviation, in subcommands too: one line naming the flag."""
    from cli import OneLineArgumentParser
    parser = OneLineArgumentParser(prog="x")
    parser.add_argument("--run", action="store_true")
    sub = parser.add_subparsers(dest="command").add_parser("go")
    sub.add_argument("--steps", type=int)
    assert parser.parse_args(["--run"]).run
    for argv in (["--ru"], ["go", "--step", "3"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unrecognized arguments: --") and err.count("\n") == 1
