"""Checkpoints: DCP (torch.distributed.checkpoint) directories, saved atomically.

    <out_dir>/checkpoints/step_000100/   DCP shards of {"model", "optim"} + trainer_state.pt + config.yaml
    <out_dir>/checkpoints/latest         the name of the newest complete checkpoint

A save writes into `.tmp-step_N`, then renames it and rewrites `latest` (temp file + fsync
+ rename), so a process killed mid-save leaves the previous checkpoint untouched and
`latest` pointing at it. DCP works with or without a process group: the same code saves
one shard per rank under torchrun and one file in a single process, and a checkpoint can
be loaded on any number of ranks.

For inference and sharing, export one consolidated safetensors file (one process):

    python -m checkpoint export out/run/checkpoints/step_001000 model.safetensors [--dtype bf16]
    model, cfg = load_model("model.safetensors")      # or build_model + safetensors.torch.load_model

load_model (so sample.py and every eval) reads such a file as it reads a checkpoint; a resume
or another export, which need the optimiser and trainer state, refuse it (resolve_checkpoint).
"""
from __future__ import annotations

import itertools
import json
import logging
import numbers
import os
import pickle
import random
import sys
import shutil
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from cli import (LATEST, TRAINER_STATE, OneLineArgumentParser, check_output_file, first_free_path, keep_aside,
                 shown_path, write_atomic)
from config import Config, ConfigError, check_vocab, config_from_dict, dump_yaml, read_yaml, to_dict
from distributed import all_reduce_max

# DCP warns on every single-process save/load that no process group exists: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# What train.py reads back on resume (its checkpoint() writes them), checked by
# load_training_state(required=RESUME_KEYS) before anything is loaded. Other callers (export,
# a bAbI fine-tune's checkpoints, which have no sampler or RNG state) need `step` only.
RESUME_KEYS = ("step", "stats", "sampler", "rng")
# what those entries hold (train.py reads these fields): a damaged or foreign trainer state is
# named here, not a KeyError or TypeError after the model has loaded
RESUME_FIELDS = {"stats": ("skipped_steps", "tokens"), "sampler": ("step", "seed"), "rng": ("python", "numpy", "torch")}


def _restores(restore):
    """A check that a saved RNG state restores a scratch generator, as train.set_rng_state
    restores the global one (the same code judges it: a tuple of the wrong length or a tensor
    of the wrong size is refused here, not after the model has loaded)."""
    def check(value):
        try:
            restore(value)
        except Exception:
            return False
        return True
    return check


_COUNT = (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_SIZE = (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
_STR = (lambda v: isinstance(v, str), "a string")
# what each field of those entries must be (check, description), where present: the fields of
# RESUME_FIELDS must be, the others (data/loader.py BatchSampler.state_dict's later additions,
# "cuda" of a GPU run) may be missing
RESUME_FIELD_TYPES = {
    "stats": {"skipped_steps": _COUNT, "tokens": _COUNT},
    "sampler": {"step": _COUNT, "seed": _COUNT, "split": _STR, "sampling": _STR, "batch_size": _SIZE,
                "seq_len": _SIZE, "num_windows": _SIZE,
                "recipe": (lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
                           "None or a dict"),
                "shard_lengths": (lambda v: isinstance(v, (list, tuple)) and all(_COUNT[0](n) for n in v),
                                  "a list of token counts")},
    "rng": {"python": (_restores(lambda v: random.Random().setstate(v)), "a state random.setstate accepts"),
            "numpy": (_restores(lambda v: np.random.RandomState().set_state(v)),
                      "a state numpy.random.set_state accepts"),
            "torch": (_restores(lambda v: torch.Generator().set_state(v)), "a state torch.set_rng_state accepts"),
            "cuda": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in v)), "None or a list of uint8 tensors")},
}


def _brief(value) -> str:
    """A value for a one-line message: its repr when short, else its type."""
    text = repr(value) if isinstance(value, (str, numbers.Number, type(None))) else ""
    return text if text and len(text) <= 40 and "\n" not in text else f"a {type(value).__name__}"


# What DCP raises for a missing, truncated or mismatched checkpoint: CheckpointException is a
# BaseException (it wraps the per-rank failures), so `except Exception` alone lets it escape.
DCP_ERRORS = (Exception, CheckpointException)


def _dcp_load(state, ckpt):
    """dcp.load without DCP's own logging: on a missing or truncated checkpoint it logs each
    failed metadata read with its traceback to the root logger (and the failure once more to
    its dcp logger) before raising, so a user would see tracebacks above our one-line error."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        dcp.load(state, checkpoint_id=ckpt)
    finally:
        logging.disable(previous)


def _first_line(e: BaseException) -> str:
    """The first line of an error's message (of the first rank's failure for DCP's wrapper),
    or its type name when the message is empty; a long line is cut after its first sentence
    (torch's "PytorchStreamReader failed ..." goes on for four)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(line) > 160 and ". " in line:
        line = line[:line.index(". ")]
    return line


def _rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_root, step, model, optimizer, trainer_state: dict, cfg: Config, keep=2):
    """Collective under torchrun: every rank calls it. Returns the checkpoint directory."""
    name = f"step_{step:06d}"
    final, tmp = os.path.join(ckpt_root, name), os.path.join(ckpt_root, f".tmp-{name}")

    def prepare():
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _on_rank0(prepare, ckpt_root, tmp, final)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)   # raises on every rank
    except DCP_ERRORS as e:
        stop = _stop_request(e)
        if stop is not None:             # Ctrl-C or SIGTERM mid-save: a stop, not a failed save
            shutil.rmtree(tmp, ignore_errors=True)
            raise stop from None
        raise OSError(_save_failed(ckpt_root, tmp, final, e)) from None

    def finish():
        torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))
        dump_yaml(cfg, os.path.join(tmp, "config.yaml"))
        _fsync_tree(tmp)
        # Re-saving the same step replaces it: the old folder is renamed aside, not deleted,
        # before the new one is renamed in, so `latest` names a missing step only between two
        # renames (not for a whole rmtree); a kill leaves the aside copy for _prune to clear.
        aside = os.path.join(ckpt_root, f".tmp-old-{name}")
        shutil.rmtree(aside, ignore_errors=True)
        if os.path.lexists(final):
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        write_atomic(os.path.join(ckpt_root, LATEST), name + "\n")
        _prune(ckpt_root, keep, name)
    _on_rank0(finish, ckpt_root, tmp, final)
    return final


def _on_rank0(fn, ckpt_root, tmp, final):
    """fn() on rank 0 alone (the checkpoint's folders and files), the other ranks waiting. Its
    failure is the OSError of _save_failed on every rank: raised on rank 0 alone, the others
    went on into the next collective and died there with a gloo/NCCL traceback printed above
    rank 0's line (it was so for the folder made before the shards are written)."""
    error = None
    if _rank0():
        try:
            fn()
        except Exception as e:
            error = _save_failed(ckpt_root, tmp, final, e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        message = [error]
        dist.broadcast_object_list(message, src=0)      # also the barrier: every rank stops on rank 0's error
        error = message[0]
    if error:
        raise OSError(error)


def _stop_request(e):
    """The KeyboardInterrupt (or train.Terminated: any BaseException that is no Exception) that
    DCP wrapped in a CheckpointException during a save or load, for the caller to re-raise;
    None for a real error."""
    for exc, _ in getattr(e, "failures", {}).values():
        if not isinstance(exc, Exception):
            return exc
    return None


def _save_failed(ckpt_root, tmp, final, e) -> str:
    """The one-line reason a save failed (DCP's own, e.g. "unexpected pos 704 vs 598" on a full
    disk, does not say so: the free space does); its half-written folder is removed."""
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(ckpt_root).free / 2**30:.1f} GiB free there"
    except OSError:
        free = "free space unknown"
    return f"could not write checkpoint {final} ({_first_line(e)}; {free}); the earlier checkpoints are untouched"


def saved_steps(ckpt_root) -> list[str]:
    """The step_N directories under a checkpoints/ root, oldest first ([] without the root)."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    return sorted((d for d in names if d.startswith("step_")), key=step_number)


def step_number(name):
    """step_000042 -> 42 (step order, also past 6 digits); a stray step_* name sorts first."""
    digits = name.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def holds_checkpoints(path) -> bool:
    """Whether `path` holds train.py checkpoints: it is a checkpoint (trainer_state.pt), a
    checkpoints/ root or an out_dir with one (a `latest` file or step_* folders)."""
    for root in (path, os.path.join(path, "checkpoints")):
        if (os.path.lexists(os.path.join(root, TRAINER_STATE)) or os.path.lexists(os.path.join(root, LATEST))
                or saved_steps(root)):
            return True
    return False


def _prune(ckpt_root, keep, newest):
    """Keep the `keep` latest checkpoints up to `newest` (the one just written). Steps past it
    (train.py sets a rollback's aside first: set_aside_later_steps) are neither counted nor
    deleted here, nor are folders named step_<not a number> (a copy kept by hand, e.g.
    step_000100-good: the oldest in step order, it was the first deleted)."""
    done = [d for d in saved_steps(ckpt_root) if 0 <= step_number(d) <= step_number(newest)]
    for d in done[:-keep] if keep > 0 else []:
        if d != newest:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    for d in os.listdir(ckpt_root):                  # leftovers of killed saves
        if d.startswith(".tmp-") and d != f".tmp-{newest}":
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def set_aside_later_steps(ckpt_root, step) -> list[str]:
    """A rollback (train.resume=PATH of the run's own earlier step): the run's later
    checkpoints are renamed abandoned-step_N (kept, but no longer resumed or pruned) and
    `latest` names `step`, so a crash before the next save resumes the rollback, not the
    abandoned run. Rank 0, once the resume has loaded. -> the new names."""
    renamed = []
    for d in saved_steps(ckpt_root):
        if step_number(d) > step:
            new = first_free_path(os.path.join(ckpt_root, f"abandoned-{d}" + (f"-{n}" if n > 1 else ""))
                                  for n in itertools.count(1))            # -2, ...: after an earlier rollback
            os.replace(os.path.join(ckpt_root, d), new)
            renamed.append(os.path.basename(new))
    if renamed:
        write_atomic(os.path.join(ckpt_root, LATEST), f"step_{step:06d}\n")
    return renamed


def find_checkpoint(path) -> str | None:
    """A checkpoint dir, a checkpoints/ root, or a training out_dir -> the checkpoint dir."""
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(root, TRAINER_STATE)):
            return root
        latest = os.path.join(root, LATEST)
        if os.path.isfile(latest):
            try:
                with open(latest) as f:
                    name = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{latest} is unreadable: {_first_line(e)}") from None
            if not name or os.sep in name or name in (".", ".."):
                raise ValueError(f"{latest} does not name a checkpoint directory (it holds {name!r})")
            ckpt = os.path.join(root, name)
            if not os.path.isfile(os.path.join(ckpt, TRAINER_STATE)):
                raise FileNotFoundError(f"{latest} names {name}, which is missing or incomplete")
            return ckpt
    return None


def resolve_checkpoint(path) -> str:
    """A checkpoint dir, a checkpoints/ root or an out_dir -> the DCP checkpoint dir, for what
    needs its training state (a resume, an export); anything else is a one-line error."""
    if os.path.isfile(path):
        export = (" (an exported .safetensors holds the weights and config only, without the optimiser and "
                  "trainer state needed here)" if path.endswith(".safetensors") else "")
        raise ValueError(f"{path} is a file, not a checkpoint directory{export}: pass a step_N directory or an "
                         "out_dir")
    ckpt = find_checkpoint(path) if os.path.exists(path) else None
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found at {shown_path(path)} ({_complete_step_hint(path)})")
    return ckpt


def newest_complete_step(root) -> str | None:
    """The path of the newest step_N directory under a checkpoints/ root that holds its trainer
    state (what to resume where `latest` is missing: a save killed before writing it, or a
    copied folder); None without one."""
    complete = [d for d in saved_steps(root) if os.path.isfile(os.path.join(root, d, TRAINER_STATE))]
    return os.path.join(root, complete[-1]) if complete else None


def _complete_step_hint(path) -> str:
    """What to pass instead of `path`, which holds no `latest`: its newest complete step_N
    directory, else what is expected."""
    if os.path.isfile(os.path.join(path, ".metadata")):     # DCP's index: "expected a step_N directory" misled
        return (f"it is a DCP checkpoint without {TRAINER_STATE}: a save cut short (.tmp-step_N), or one not "
                "written by train.py")
    for root in (path, os.path.join(path, "checkpoints")) if os.path.isdir(path) else ():
        step = newest_complete_step(root)
        if step:
            return f"it has no {LATEST} file, but {step} is a complete checkpoint: pass that"
    return "expected a step_N directory or an out_dir with checkpoints/latest"


def _read_metadata(ckpt):
    """DCP's index of `ckpt`, after checking that every shard file it names is there and at
    least as long as the index says: a truncated or missing shard is a one-line ValueError
    naming the file, not a "does not match" (or EOFError) from inside dcp.load."""
    try:
        metadata = dcp.FileSystemReader(ckpt).read_metadata()
    except DCP_ERRORS as e:
        raise ValueError(f"checkpoint {ckpt} is unreadable: {_first_line(e)}") from None
    needed = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        path = getattr(info, "relative_path", None)
        if path is not None:
            needed[path] = max(needed.get(path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {ckpt} is incomplete: its shard {path} is missing")
        have = os.path.getsize(path)
        if have < size:
            raise ValueError(f"checkpoint {ckpt} is truncated: its shard {path} has {have:,} of "
                             f"{size:,} bytes")
    return metadata


# What reading a damaged shard or torch.save file raises (a torch.save zip with a bad central
# directory: RuntimeError "PytorchStreamReader failed ..."), as opposed to a template mismatch.
_READ_ERRORS = (EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError)   # flipped bytes


def _is_read_error(e: BaseException) -> bool:
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return isinstance(e, _READ_ERRORS) or "PytorchStreamReader" in str(e)


class CheckpointMismatch(ValueError):
    """A readable checkpoint of another model or optimiser: not damage (an earlier step of
    the same run would not match either)."""


def _dcp_load_checked(state, ckpt, mismatch: str, metadata):
    """_dcp_load, with its failures as one-line ValueErrors: a shard that cannot be read is
    "corrupt" (naming the checkpoint), anything else is a CheckpointMismatch saying `mismatch`
    (what the template and the checkpoint disagree on). `metadata`: the checkpoint's DCP index."""
    # dcp.load fills the template's entries and ignores the checkpoint's others, so a
    # checkpoint with weights this model lacks (more layers than its config.yaml says, a
    # parameter a later model.py dropped) would load as a part of itself, silently (an
    # exported file is refused then: safetensors loads strictly)
    ours = {f"model.{name}" for name in state["model"]}
    extra = [k for k in metadata.state_dict_metadata if k.startswith("model.") and k not in ours]
    if extra:
        raise CheckpointMismatch(f"checkpoint {ckpt} {mismatch}: it holds {extra[0].removeprefix('model.')}"
                                 + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                 + ", which this model lacks")
    try:
        _dcp_load(state, ckpt)
    except DCP_ERRORS as e:
        stop = _stop_request(e)
        if stop is not None:             # Ctrl-C or SIGTERM mid-load: a stop, not a mismatch or damage
            raise stop from None
        if _is_read_error(e):
            raise ValueError(f"checkpoint {ckpt} has a corrupt shard (cannot be read: "
                             f"{_first_line(e)})") from None
        raise CheckpointMismatch(f"checkpoint {ckpt} {mismatch}: {_first_line(e)}") from None


def read_trainer_state(ckpt, required=("step",)) -> dict:
    """<ckpt>/trainer_state.pt, checked: a missing, truncated or corrupt file, one that holds
    no dict, or one without a `required` key, or a field of a wrong type or value in one of
    them (RESUME_FIELD_TYPES) is a one-line error naming the file (and key)."""
    path = os.path.join(ckpt, TRAINER_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {ckpt} has no {TRAINER_STATE}")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:          # a truncated zip, a bad pickle, a class that no longer exists
        raise ValueError(f"{path} is truncated or corrupt (cannot be read: {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a trainer state dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path} has no {missing[0]!r} (it holds {', '.join(map(repr, state)) or 'nothing'})")
    step = state.get("step", 0)         # else a TypeError later, or a negative step trained silently
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"{path} has step {step!r}, not an integer >= 0")
    for key in required:
        fields = RESUME_FIELDS.get(key, ())
        if fields and not (isinstance(state[key], dict) and all(f in state[key] for f in fields)):
            raise ValueError(f"{path} has a damaged {key!r} entry: expected a dict with {', '.join(fields)}, "
                             f"got {type(state[key]).__name__}"
                             + (f" with {', '.join(map(str, state[key]))}" if isinstance(state[key], dict) else ""))
        for field, (check, what) in RESUME_FIELD_TYPES.get(key, {}).items():
            if field in state[key] and not check(state[key][field]):
                raise ValueError(f"{path} has a damaged {key!r} entry: its {field} is {_brief(state[key][field])}, "
                                 f"not {what}")
    return state


def _saved_state_fqns(metadata, fqns) -> set:
    """The parameter FQNs among `fqns` with optimiser state in a checkpoint (its DCP `metadata`). Keys read
    "optim.state.<fqn>.<leaf>" and a leaf may itself be dotted (nested state), so each dotted
    prefix of a key is matched against the template's FQNs: O(keys + params), not their product."""
    keys = metadata.state_dict_metadata
    fqns, saved, head = set(fqns), set(), "optim.state."
    for key in keys:
        if key.startswith(head):
            rest = key[len(head):]
            dot = rest.find(".")
            while dot != -1:
                if rest[:dot] in fqns:
                    saved.add(rest[:dot])
                dot = rest.find(".", dot + 1)
    return saved


def _drop_unsaved_param_states(optim_sd: dict, saved: set) -> None:
    """A parameter that never received a gradient (e.g. a CMS level's W_v when no chunk
    completes inside seq_len) has no optimiser state in the saved run, while the template of a
    fresh optimiser has one for every parameter. Drop those from the template so the resumed
    optimiser, like the saved one, has no state for them; a parameter with part of its state
    missing is still a mismatch and fails in dcp.load."""
    for fqn in [fqn for fqn in optim_sd.get("state", {}) if fqn not in saved]:
        del optim_sd["state"][fqn]


def load_training_state(ckpt, model, optimizer, required=("step",)) -> dict:
    """Load model + optimiser in place (any rank count) and return the trainer state.

    Everything is checked before the model and optimiser are touched: the trainer state reads
    and has the `required` keys (train.py: RESUME_KEYS), the DCP index reads and no shard is
    missing or truncated. A bad
    checkpoint is a one-line ValueError (FileNotFoundError without trainer_state.pt)."""
    metadata = _read_metadata(ckpt)     # unreadable: reported as such, before any "does not match"
    trainer_state = read_trainer_state(ckpt, required)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _drop_unsaved_param_states(optim_sd, _saved_state_fqns(metadata, optim_sd.get("state", {})))
    # shape/key mismatch: a checkpoint of another model
    _dcp_load_checked(state, ckpt, "does not match this model/optimiser", metadata)
    # strict=False only lets the parameters dropped above stay without state: every entry of
    # both templates was loaded (dcp.load fails on anything the checkpoint lacks)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    check_finite(model, f"checkpoint {ckpt}")
    # the saved groups' settings (weight decay, betas, ...) came back with the state: the
    # config's win, as config.yaml records (train.py sets lr every step anyway)
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    return trainer_state


def _local(tensor):
    """This rank's shard of an FSDP2 parameter (a DTensor); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def first_non_finite(model) -> str | None:
    """The name of the first parameter holding a NaN or inf, None if there is none. Under
    FSDP2 each rank checks its local shards and the first bad parameter (by index) is agreed
    on across ranks, so every rank gets the same answer (a collective: all ranks call it).
    A NaN or inf makes a parameter's sum non-finite, so the sums screen them (one device sync;
    ~16x cheaper than torch.isfinite(p).all() per parameter on CPU: bench/checks_cpu.py,
    BENCHMARKS.md); a non-finite sum is confirmed element-wise (finite weights whose sum
    overflows pass)."""
    params = list(model.named_parameters())
    if not params:
        return None
    with torch.no_grad():
        sums_finite = torch.stack([torch.isfinite(_local(p).sum()) for _, p in params]).cpu()
        first = next((i for i in (~sums_finite).nonzero().flatten().tolist()
                      if not torch.isfinite(_local(params[i][1])).all()), len(params))
    # the smallest index over ranks (a no-op without a process group of 2+ ranks)
    first = int(-all_reduce_max(-float(first), _local(params[0][1]).device))
    return params[first][0] if first < len(params) else None


def check_finite(model, what):
    """A ValueError naming `what` and its first non-finite parameter: DCP keeps no checksum,
    so flipped bytes inside a shard's tensor data load silently (and every step after a
    resume would be non-finite)."""
    bad = first_non_finite(model)
    if bad:
        raise ValueError(f"{what} holds non-finite weights ({bad}): it is damaged")


def load_config_of(ckpt) -> Config:
    path = os.path.join(ckpt, "config.yaml")
    try:
        cfg = config_from_dict(read_yaml(path))
        check_vocab(cfg)                 # an edited tokenizer, or vocab_size 0: sample and every eval tokenize
        return cfg
    except ConfigError as e:
        raise ConfigError(str(e) if path in str(e) else f"{path}: {e}") from None


def _for_device(cfg: Config, device) -> Config:
    """A checkpoint's config, made to run on `device`: Triton kernels and flash-attn become
    "auto" where they cannot run (speed settings, not the math: a GPU run's checkpoint
    evaluates on CPU, or on a GPU without flash-attn; "auto" is flash-attn wherever it runs,
    model.causal_attention)."""
    from kernels.checks import triton_blocker
    from model import flash_attn_func
    if triton_blocker(cfg.model, device):
        cfg.model.kernels = "auto"
    if cfg.model.attention == "flash" and (flash_attn_func is None or torch.device(device).type != "cuda"):
        cfg.model.attention = "auto"
    return cfg


def load_model(path, device="cpu"):
    """For inference and evals: (model in eval mode, full Config) from a checkpoint, an out_dir,
    or a consolidated file written by export_safetensors."""
    from model import build_model
    if os.path.isfile(path):        # a DCP checkpoint is always a folder: a file can only be an export
        return load_exported(path, device)
    ckpt = resolve_checkpoint(path)
    cfg = _for_device(load_config_of(ckpt), device)
    model = build_model(cfg.model)
    sd = get_model_state_dict(model, options=StateDictOptions())
    state = {"model": sd}
    metadata = _read_metadata(ckpt)     # unreadable index, missing or truncated shard: named
    _dcp_load_checked(state, ckpt, "is unreadable or does not match its config", metadata)
    model.load_state_dict(state["model"])
    check_finite(model, f"checkpoint {ckpt}")
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------
# consolidated safetensors export

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_safetensors(ckpt, out_path, dtype="fp32", log=None) -> str:
    """Gather a (possibly sharded, any rank count) DCP checkpoint into one safetensors file.

    Tensors are named as in `build_model(cfg.model).state_dict()`; a tied head weight is
    stored once (under embed.weight), which `safetensors.torch.load_model` restores. The
    file's metadata holds the full training config (JSON: the model, its tokenizer's name,
    train.seq_len, ...) and the step, so the file alone rebuilds the model (`load_model`,
    `load_exported`). Run it in one process, not under torchrun. The file's mode follows the
    umask, as every other output (safetensors itself creates it 0600).

    Bad input is a one-line ValueError (FileNotFoundError for a missing checkpoint) raised
    before anything is written: the output path is checked first, then the checkpoint is read
    in full; the file is written under a temporary name that is removed on any failure. An
    earlier file at out_path is kept as <name>.previous[-N].safetensors (said through `log`)
    once the new one is written (a hard link or copy: the earlier file keeps its name until the
    new one's atomic rename, so a failure or kill at any point leaves it there)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of: {', '.join(EXPORT_DTYPES)}")
    if not str(out_path).endswith(".safetensors"):
        raise ValueError(f"output file {out_path} must end in .safetensors")
    check_output_file(out_path, "output file")
    ckpt = resolve_checkpoint(ckpt)
    step = read_trainer_state(ckpt, required=("step",))["step"]
    model = load_model(ckpt)[0].to(EXPORT_DTYPES[dtype])
    # the checkpoint's config as saved, not load_model's copy fitted to this CPU (a GPU run's
    # model.kernels=triton or attention=flash read "auto" there): the file is the checkpoint
    cfg = load_config_of(ckpt)
    metadata = {"format": "pt", "config": json.dumps(to_dict(cfg)), "step": str(step), "arch": cfg.model.arch,
                "dtype": dtype}

    def write(tmp):
        save_model(model, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        kept = keep_aside(out_path, copy=True)     # an earlier export: kept, while it still holds the name
        if kept and log:
            log(f"the earlier {out_path} is kept as {kept}")
    try:
        return write_atomic(out_path, write)
    except (OSError, SafetensorError) as e:  # disk full, permissions changed, a directory appeared, a
        # file name too long (safetensors reports its own I/O errors as SafetensorError)
        raise ValueError(f"cannot write {out_path}: {getattr(e, 'strerror', None) or _first_line(e)}") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def export_metadata(path) -> dict:
    """The metadata (str -> str) of a safetensors file, from its header alone: export_safetensors
    writes the config (JSON) and the step there. A file that is not one (truncated, another
    format) is a one-line ValueError."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({_first_line(e)}): expected a checkpoint "
                         "directory, an out_dir or a file from `python -m checkpoint export`") from None


def load_exported(path, device="cpu"):
    """(model in eval mode, Config) from a file written by export_safetensors (load_model
    comes here for a file). The parameters are fp32 whatever the export's dtype (a bf16
    export's values, rounded to bf16): the evals run on them as on a checkpoint's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors_into
    from model import build_model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path}")
    metadata = export_metadata(path)
    if "config" not in metadata:                     # someone else's safetensors file
        raise ValueError(f"{path} has no config in its metadata: not written by `python -m checkpoint export`")
    try:
        data = json.loads(metadata["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has a config in its metadata that is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} has a config in its metadata that is a {type(data).__name__}, not a mapping")
    try:
        cfg = config_from_dict(data)
        check_vocab(cfg)                 # as load_config_of: sample and every eval tokenize
    except ConfigError as e:
        raise ConfigError(f"{path}: config in its metadata: {e}") from None
    cfg = _for_device(cfg, device)
    model = build_model(cfg.model)
    try:
        load_safetensors_into(model, path, device=str(device))
    except (SafetensorError, RuntimeError) as e:     # truncated data, names or shapes of another model
        raise ValueError(f"{path} does not load into the model of its config: {_first_line(e)}") from None
    check_finite(model, path)
    return model.to(device).eval(), cfg


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m checkpoint", description="Checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write one consolidated safetensors file from a DCP checkpoint")
    export.add_argument("checkpoint", help="a step_N directory, a checkpoints/ root, or a training out_dir")
    export.add_argument("out", help="output file, e.g. model.safetensors")
    export.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES))
    args = parser.parse_args(argv)
    try:
        path = export_safetensors(args.checkpoint, args.out, dtype=args.dtype, log=print)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
