"""Damaged checkpoints that DCP and torch.load accept: a trainer state whose fields have the
wrong type or value, and weights that hold a NaN or inf (DCP keeps no checksum). Each is a
one-line error naming the file and what is wrong, before anything is written (train.py's
resume, sample.py and the evals through checkpoint.load_model). Other damage (a truncated
or missing file, a missing key): tests/test_cli_inputs.py."""
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


@pytest.mark.slow
def test_non_finite_weights_are_agreed_on_across_fsdp2_ranks():
    """first_non_finite under FSDP2 on 2 gloo ranks: a NaN in rank 1's shard only and an inf
    in rank 0's shard of a later parameter give both ranks the same first bad parameter (the
    smallest index over ranks), and clean shards give None on both. Kills a max over ranks
    (rank 0 would name the later parameter, and each rank decide apart whether to save)."""
    import subprocess
    import sys
    from helpers import assert_torchrun_finished
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert_torchrun_finished(result, [f"rank {r}: clean None, poisoned 1.weight" for r in (0, 1)])


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


if __name__ == "__main__":   # torchrun worker; the test sets PYTHONPATH to the repository root
    _non_finite_worker()
