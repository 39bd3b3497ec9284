"""Damaged checkpoints that DCP and torch.load accept: a trainer state whose fields have the
wrong type or value, and weights that hold a NaN or inf (DCP keeps no checksum). Each is a
one-line error naming the file and what is wrong, before anything is written (train.py's
resume, sample.py and the evals through checkpoint.load_model). Other damage (a truncated
or missing file, a missing key): tests/test_cli_inputs.py. Also: shards holding weights the
model lacks (DCP ignores them), a DCP folder without trainer state, a hand-kept step copy
that pruning must leave, and a save that fails on rank 0 of 2."""
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

from test_train import TINY, _fails_and_keeps

STEP = os.path.join("checkpoints", "step_000002")
COMMON = [*TINY, "--train.eval_every=0", "--train.ckpt_every=2"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """An out_dir of train.py after 2 steps, checkpointed at step 2 (real sampler and RNG states)."""
    import train as train_mod
    out = tmp_path_factory.mktemp("checkpoint") / "run"
    assert train_mod.main([*COMMON, f"--data.dataset={corpus}", f"--train.out_dir={out}", "--train.max_steps=2"]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of `trained` to damage."""
    return shutil.copytree(trained, tmp_path / "run")


def _resume_fails(run, corpus, message, capsys):
    """Resuming `run` exits 2 with one line holding `message`; no file in it changes."""
    capsys.readouterr()
    _fails_and_keeps(run, [*COMMON, f"--data.dataset={corpus}", f"--train.out_dir={run}", "--train.max_steps=4"],
                     message, capsys)


@pytest.mark.parametrize("key, field, value, what", [
    ("stats", "tokens", "a", "'a', not an integer >= 0"),
    ("stats", "skipped_steps", -1, "-1, not an integer >= 0"),
    ("stats", "skipped_steps", 1.0, "1.0, not an integer >= 0"),
    ("sampler", "step", "x", "'x', not an integer >= 0"),
    ("sampler", "seed", None, "None, not an integer >= 0"),
    ("sampler", "batch_size", 0, "0, not an integer >= 1"),
    ("sampler", "sampling", 3, "3, not a string"),
    ("sampler", "recipe", "x", "'x', not None or a dict"),
    ("sampler", "shard_lengths", 7, "7, not a list of token counts"),
    ("rng", "python", (3, (1, 2), None), "a tuple, not a state random.setstate accepts"),
    ("rng", "numpy", "x", "'x', not a state numpy.random.set_state accepts"),
    ("rng", "torch", torch.zeros(3, dtype=torch.uint8), "a Tensor, not a state torch.set_rng_state accepts"),
    ("rng", "torch", [1, 2], "a list, not a state torch.set_rng_state accepts"),
    ("rng", "cuda", "x", "'x', not None or a list of uint8 tensors"),
])
def test_a_damaged_trainer_state_field_is_named(run, corpus, key, field, value, what, capsys):
    """Each field a resume reads, of a wrong type or value: one line naming the file, the entry
    and the field (it was "invalid literal for int()", a TypeError traceback, or a run that
    resumed and crashed at its next step)."""
    path = run / STEP / "trainer_state.pt"
    state = torch.load(path, weights_only=False)
    state[key][field] = value
    torch.save(state, path)
    _resume_fails(run, corpus, f"{path} has a damaged {key!r} entry: its {field} is {what}", capsys)


def test_the_rng_checks_leave_the_global_streams_alone():
    """The RNG states are judged by restoring scratch generators, never the global ones."""
    from checkpoint import RESUME_FIELD_TYPES
    import train as train_mod
    saved = train_mod.rng_state()
    assert all(RESUME_FIELD_TYPES["rng"][k][0](v) for k, v in saved.items())
    assert RESUME_FIELD_TYPES["rng"]["numpy"][0](np.random.get_state(legacy=False))    # the dict form
    expected = (random.random(), np.random.rand(), torch.rand(1))
    train_mod.set_rng_state(saved)
    assert all(RESUME_FIELD_TYPES["rng"][k][0](v) for k, v in saved.items())
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def _poison(path, tensor):
    """Overwrite the first value of `tensor`'s bytes in the file at `path` with a NaN (as flipped
    bits inside a shard's tensor data: the file still reads)."""
    data = path.read_bytes()
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0 and data.find(tensor.numpy().tobytes(), at + 1) < 0
    path.write_bytes(data[:at] + np.float32("nan").tobytes() + data[at + 4:])


def test_non_finite_weights_are_refused_on_resume_and_load(run, corpus, tmp_path, capsys):
    """A shard whose weights DCP loads but holds a NaN: the resume stops (it trained on, every
    step non-finite), naming the checkpoint and the parameter, with the earlier-checkpoint hint
    of damage; load_model (sample.py, the evals) and an exported file refuse it as well."""
    import checkpoint
    ckpt = run / STEP
    assert checkpoint.main(["export", str(run), str(tmp_path / "m.safetensors")]) == 0
    name = "blocks.1.mixer.w_in.weight"
    weight = checkpoint.load_model(str(run))[0].state_dict()[name]
    (shard,) = ckpt.glob("*.distcp")
    _poison(shard, weight)
    message = f"checkpoint {ckpt} holds non-finite weights ({name}): it is damaged"
    _resume_fails(run, corpus, message, capsys)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        checkpoint.load_model(str(run))
    _poison(tmp_path / "m.safetensors", weight)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'm.safetensors'} holds non-finite weights ({name})")):
        checkpoint.load_model(str(tmp_path / "m.safetensors"))


def test_check_finite_screens_by_sums_but_decides_by_elements():
    """Finite weights whose sum overflows pass; an inf or a NaN anywhere is named (the first)."""
    from checkpoint import check_finite
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(3e38)
    check_finite(model, "m")
    for bad in (float("inf"), float("-inf"), float("nan")):
        with torch.no_grad():
            model[1].bias[2] = bad
        with pytest.raises(ValueError, match=r"^m holds non-finite weights \(1\.bias\): it is damaged$"):
            check_finite(model, "m")


def _save(root, step, n_layer, keep=2):
    """A byte Transformer (d 32) of `n_layer` layers saved at `step` under `root` -> its folder."""
    from checkpoint import save_checkpoint
    from config import Config, DataConfig, ModelConfig
    from model import build_model
    cfg = Config(model=ModelConfig(arch="transformer", vocab_size=257, d_model=32, n_layer=n_layer, n_head=2),
                 data=DataConfig(tokenizer="bytes"))
    model = build_model(cfg.model)
    return save_checkpoint(str(root), step, model, torch.optim.AdamW(model.parameters()), {"step": step}, cfg, keep)


def test_a_checkpoint_holding_weights_the_model_lacks_is_refused(tmp_path):
    """dcp.load fills the template and ignores the checkpoint's other entries: a 2-layer
    checkpoint whose config.yaml says 1 layer (or a parameter a later model.py dropped) loaded
    as its first layer, silently, in load_model and in a resume. One line naming the first
    weight the model lacks (an exported file was refused already: safetensors is strict)."""
    import yaml

    from checkpoint import CheckpointMismatch, load_config_of, load_model, load_training_state
    from model import build_model
    ckpt = _save(tmp_path / "checkpoints", 1, n_layer=2)
    path = os.path.join(ckpt, "config.yaml")
    with open(path) as f:
        data = yaml.safe_load(f)
    data["model"]["n_layer"] = 1
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    message = (f"checkpoint {ckpt} is unreadable or does not match its config: it holds "
               "blocks.1.mixer_norm.weight (and 6 more), which this model lacks")
    with pytest.raises(CheckpointMismatch, match=f"^{re.escape(message)}$"):
        load_model(ckpt)
    model = build_model(load_config_of(ckpt).model)
    with pytest.raises(CheckpointMismatch, match=r"does not match this model/optimiser: it holds blocks\.1\."):
        load_training_state(ckpt, model, torch.optim.AdamW(model.parameters()))


def test_a_dcp_folder_without_trainer_state_is_named_as_such(tmp_path):
    """A save cut short before trainer_state.pt (its .tmp-step_N), or a DCP checkpoint of
    another trainer, passed to load_model or export: it said "expected a step_N directory" of
    the step_N directory given."""
    from checkpoint import load_model, resolve_checkpoint
    ckpt = _save(tmp_path / "checkpoints", 1, n_layer=1)
    cut = shutil.copytree(ckpt, tmp_path / "checkpoints" / ".tmp-step_000002")
    os.remove(cut / "trainer_state.pt")
    message = (f"no checkpoint found at {cut} (it is a DCP checkpoint without trainer_state.pt: a save cut short "
               "(.tmp-step_N), or one not written by train.py)")
    for read in (load_model, resolve_checkpoint):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
            read(str(cut))


def test_pruning_keeps_a_step_folder_that_is_no_step(tmp_path):
    """keep=2 prunes the oldest steps, but not a copy kept by hand beside them
    (step_000001-good: step_number -1 sorted it first, so it was the first deleted)."""
    root = tmp_path / "checkpoints"
    _save(root, 1, n_layer=1)
    shutil.copytree(root / "step_000001", root / "step_000001-good")
    for step in (2, 3):
        _save(root, step, n_layer=1)
    assert sorted(os.listdir(root)) == ["latest", "step_000001-good", "step_000002", "step_000003"]


@pytest.mark.slow
def test_non_finite_weights_are_agreed_on_across_fsdp2_ranks():
    """first_non_finite under FSDP2 on 2 gloo ranks: a NaN in rank 1's shard only and an inf
    in rank 0's shard of a later parameter give both ranks the same first bad parameter (the
    smallest index over ranks), and clean shards give None on both. Kills a max over ranks
    (rank 0 would name the later parameter, and each rank decide apart whether to save)."""
    from helpers import assert_torchrun_finished
    assert_torchrun_finished(_two_ranks("non_finite"), [f"rank {r}: clean None, poisoned 1.weight" for r in (0, 1)])


def _two_ranks(*args):
    """This file run by torchrun on 2 gloo ranks with `args` (a worker below) -> its result."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_save_failing_on_rank_0_before_the_shards_is_one_line_on_every_rank(tmp_path):
    """Rank 0 alone makes the checkpoints folder before the ranks write their shards: where
    that failed (here its parent is a file) rank 0 raised alone, and rank 1, waiting at a
    barrier, died with a gloo traceback. Every rank now raises rank 0's one line."""
    from helpers import assert_torchrun_finished
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _two_ranks("save_fails", str(blocker / "checkpoints"))
    assert_torchrun_finished(result, [f"rank {r}: could not write checkpoint {blocker}/checkpoints/step_000001 "
                                      f"([Errno 20] Not a directory: '{blocker}/checkpoints'" for r in (0, 1)])


def _non_finite_worker():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from checkpoint import first_non_finite
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    fully_shard(model)
    clean = first_non_finite(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        if rank == 1:
            params["1.weight"].to_local().fill_(float("nan"))
        else:
            params["2.weight"].to_local().fill_(float("inf"))
    print(f"rank {rank}: clean {clean}, poisoned {first_non_finite(model)}", flush=True)
    dist.destroy_process_group()


def _save_fails_worker(root):
    import datetime

    import torch.distributed as dist
    from checkpoint import save_checkpoint
    from config import Config
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))     # not 30 minutes on a bug
    model = torch.nn.Linear(4, 4)
    try:
        save_checkpoint(root, 1, model, torch.optim.AdamW(model.parameters()), {"step": 1}, Config())
    except OSError as e:
        print(f"rank {dist.get_rank()}: {e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":   # torchrun worker; the test sets PYTHONPATH to the repository root
    import sys
    {"non_finite": _non_finite_worker, "save_fails": _save_fails_worker}[sys.argv[1]](*sys.argv[2:])
